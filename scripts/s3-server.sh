#!/usr/bin/env bash
# Starts and stops a local S3 server on 127.0.0.1 for development and tests.
#
#   scripts/s3-server.sh start garage|moto   start (installing it first if needed), create
#                                            the bucket, print the settings
#   scripts/s3-server.sh stop garage|moto    stop the server this script started (by PID)
#   scripts/s3-server.sh env garage|moto     print the settings of a running server
#
# Settings are printed as KEY=VALUE lines and kept in $STATE/<server>/env, ready for
# `set -a; . FILE; set +a`. Data lives in $STATE/<server>/ and survives stop/start;
# `start --fresh` wipes it first. S3MEDIAFS_SERVER_NICE runs Garage that many steps below
# normal priority (benchmarks: it stands in for a bucket whose CPU is on other machines).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS="${S3MEDIAFS_TOOLS:-$HOME/.cache/s3mediafs-tools}"
STATE="${S3MEDIAFS_STATE:-$ROOT/target/s3-server}"
BUCKET="${S3MEDIAFS_BUCKET:-s3mediafs-test}"
GARAGE_PORT="${S3MEDIAFS_GARAGE_PORT:-3900}"
MOTO_PORT="${S3MEDIAFS_MOTO_PORT:-3950}"
GARAGE="$TOOLS/garage-2.5.0/bin/garage"
MOTO_VENV="$TOOLS/moto-5.2.1"

cmd="${1:-}"; server="${2:-}"; fresh="${3:-}"
dir="$STATE/$server"

die() { echo "s3-server: $*" >&2; exit 1; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$(( $(date +%s) + $1 )) what="$2"; shift 2
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "s3-server: $what did not come up; the last lines of $dir/server.log:" >&2
            tail -n 15 "$dir/server.log" 2>/dev/null | sed 's/^/    /' >&2
            exit 1
        fi
        sleep 0.2
    done
}

# Refuses to start a server on a port something else listens on, saying how to pick another.
require_free_port() { # PORT VARIABLE
    if port_open "$1" 2>/dev/null; then
        die "port $1 on 127.0.0.1 is taken (another S3 server or another program); run the command again with other ports, e.g. $2=$(( $1 + 100 ))"
    fi
}

is_running() { [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; }

random_hex() { python3 -c "import secrets,sys; print(secrets.token_hex(int(sys.argv[1])))" "$1"; }

port_open() { python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1"; }

write_env() { # endpoint region key secret
    cat >"$dir/env" <<ENV
S3MEDIAFS_TEST_BACKEND=$server
S3MEDIAFS_TEST_ENDPOINT=$1
S3MEDIAFS_TEST_REGION=$2
S3MEDIAFS_TEST_BUCKET=$BUCKET
S3MEDIAFS_TEST_ACCESS_KEY=$3
S3MEDIAFS_TEST_SECRET_KEY=$4
ENV
    chmod 600 "$dir/env"
}

start_garage() {
    "$ROOT/scripts/install-deps.sh" garage
    mkdir -p "$dir"; chmod 700 "$dir"
    local conf="$dir/garage.toml"
    if [ ! -f "$conf" ]; then
        # Made before the file, so that a failure stops here instead of writing it empty.
        local rpc_secret
        rpc_secret="$(random_hex 32)"
        cat >"$conf" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((GARAGE_PORT + 1))"
rpc_public_addr = "127.0.0.1:$((GARAGE_PORT + 1))"
rpc_secret = "$rpc_secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$GARAGE_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$((GARAGE_PORT + 3))"
TOML
        chmod 600 "$conf"
    fi
    if ! is_running; then
        # The ports follow S3MEDIAFS_GARAGE_PORT, also for a server set up before.
        for p in "$GARAGE_PORT" $((GARAGE_PORT + 1)) $((GARAGE_PORT + 3)); do
            require_free_port "$p" S3MEDIAFS_GARAGE_PORT
        done
        sed -i -e "s|^rpc_bind_addr = .*|rpc_bind_addr = \"127.0.0.1:$((GARAGE_PORT + 1))\"|" \
            -e "s|^rpc_public_addr = .*|rpc_public_addr = \"127.0.0.1:$((GARAGE_PORT + 1))\"|" \
            -e "/^\[s3_api\]/,/^\[/ s|^api_bind_addr = .*|api_bind_addr = \"127.0.0.1:$GARAGE_PORT\"|" \
            -e "/^\[admin\]/,\$ s|^api_bind_addr = .*|api_bind_addr = \"127.0.0.1:$((GARAGE_PORT + 3))\"|" "$conf"
        if [ -f "$dir/env" ]; then
            sed -i "s|^S3MEDIAFS_TEST_ENDPOINT=.*|S3MEDIAFS_TEST_ENDPOINT=http://127.0.0.1:$GARAGE_PORT|" "$dir/env"
        fi
        nohup nice -n "${S3MEDIAFS_SERVER_NICE:-0}" "$GARAGE" -c "$conf" server >>"$dir/server.log" 2>&1 &
        echo $! >"$dir/pid"
    fi
    wait_for 60 "Garage" "$GARAGE" -c "$conf" status
    if [ ! -f "$dir/initialized" ]; then
        local node key secret
        node="$("$GARAGE" -c "$conf" node id -q | cut -d@ -f1)"
        "$GARAGE" -c "$conf" layout assign -z dc1 -c 1G "$node" >/dev/null
        "$GARAGE" -c "$conf" layout apply --version 1 >/dev/null
        key="GK$(random_hex 12)"; secret="$(random_hex 32)"
        wait_for 30 "Garage's layout" "$GARAGE" -c "$conf" key import --yes -n s3mediafs "$key" "$secret"
        "$GARAGE" -c "$conf" bucket create "$BUCKET" >/dev/null
        "$GARAGE" -c "$conf" bucket allow --read --write --owner "$BUCKET" --key s3mediafs >/dev/null
        write_env "http://127.0.0.1:$GARAGE_PORT" garage "$key" "$secret"
        touch "$dir/initialized"
    fi
    wait_for 30 "Garage's S3 API" port_open "$GARAGE_PORT"
}

start_moto() {
    "$ROOT/scripts/install-deps.sh" moto
    mkdir -p "$dir"; chmod 700 "$dir"
    if ! is_running; then
        require_free_port "$MOTO_PORT" S3MEDIAFS_MOTO_PORT
        nohup "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >>"$dir/server.log" 2>&1 &
        echo $! >"$dir/pid"
    fi
    wait_for 60 "moto" port_open "$MOTO_PORT"
    # moto keeps objects in memory: the bucket is made on every start.
    "$MOTO_VENV/bin/python" - "$MOTO_PORT" "$BUCKET" <<'PY'
import sys, urllib.request, urllib.error
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/{sys.argv[2]}", method="PUT")
try:
    urllib.request.urlopen(req).read()
except urllib.error.HTTPError as e:
    if e.code != 409:
        raise
PY
    write_env "http://127.0.0.1:$MOTO_PORT" us-east-1 "moto-access-key" "moto-secret-key"
}

stop() {
    if is_running; then
        local pid; pid="$(cat "$dir/pid")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/pid"
}

case "$server" in garage|moto) ;; *) die "usage: $0 start|stop|env garage|moto [--fresh]" ;; esac
case "$cmd" in
    start)
        if [ "$fresh" = "--fresh" ]; then stop; rm -rf "$dir"; fi
        "start_$server"
        cat "$dir/env"
        ;;
    stop) stop ;;
    env) is_running || die "$server is not running; start it with: $0 start $server"; cat "$dir/env" ;;
    *) die "usage: $0 start|stop|env garage|moto [--fresh]" ;;
esac
