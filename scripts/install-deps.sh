#!/usr/bin/env bash
# Installs what building, mounting and testing s3mediafs need, and nothing already there:
# fuse3 (fusermount3, mount.fuse3), a single-node Garage, and moto's S3 server in a
# virtualenv. Safe to run again; quiet unless something is installed or fails.
set -euo pipefail

TOOLS="${S3MEDIAFS_TOOLS:-$HOME/.cache/s3mediafs-tools}"
GARAGE_VERSION="2.5.0"
MOTO_VERSION="5.2.1"
GARAGE_BIN="$TOOLS/garage-$GARAGE_VERSION/bin/garage"
MOTO_VENV="$TOOLS/moto-$MOTO_VERSION"
BENCH_VENV="$TOOLS/bench-venv-1"
SYNAPSE_VERSION="1.163.2"
SYNAPSE_VENV="$TOOLS/synapse-$SYNAPSE_VERSION"

what="${1:-all}"   # all | fuse | garage | moto | synapse | synapse-venv | bench

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "install-deps: need root to run: $*" >&2; exit 1; fi
}

# Whether `cmd` is installed, in /sbin and /usr/sbin too (not on a user's PATH).
has() { command -v "$1" >/dev/null || [ -x "/sbin/$1" ] || [ -x "/usr/sbin/$1" ]; }

install_test_tools() {
    # The power-cut test puts a cache directory on an ext4 loop device; the durability test
    # reads the mount's syscalls with strace.
    if has mkfs.ext4 && has strace; then return; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq e2fsprogs strace >/dev/null
}

install_fuse() {
    if command -v fusermount3 >/dev/null && [ -e /dev/fuse ]; then return; fi
    echo "install-deps: installing fuse3 from Debian's packages" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 >/dev/null
    if [ ! -e /dev/fuse ]; then
        as_root modprobe fuse 2>/dev/null || true
    fi
    [ -e /dev/fuse ] || { echo "install-deps: /dev/fuse is missing; this machine cannot mount FUSE filesystems" >&2; exit 1; }
}

install_garage() {
    # scripts/s3-server.sh makes Garage's secrets and checks its ports with python3.
    if ! command -v python3 >/dev/null; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
    fi
    if [ -x "$GARAGE_BIN" ]; then return; fi
    echo "install-deps: building Garage $GARAGE_VERSION from crates.io (takes a while, once)" >&2
    mkdir -p "$TOOLS"
    local log="$TOOLS/garage-install.log"
    if ! cargo install --locked --quiet garage --version "$GARAGE_VERSION" \
            --no-default-features --features bundled-libs,lmdb \
            --root "$TOOLS/garage-$GARAGE_VERSION" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "install-deps: building Garage failed; the log is $log" >&2
        exit 1
    fi
}

install_moto() {
    if [ -x "$MOTO_VENV/bin/moto_server" ]; then return; fi
    echo "install-deps: installing moto[server] $MOTO_VERSION into $MOTO_VENV" >&2
    mkdir -p "$TOOLS"
    rm -rf "$MOTO_VENV"
    ensure_venv_support
    python3 -m venv "$MOTO_VENV"
    "$MOTO_VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
}

ensure_venv_support() {
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
}

# A real Synapse (from PyPI, pinned) for the end-to-end test, with boto3 to look into the bucket.
install_synapse() {
    if [ -x "$SYNAPSE_VENV/bin/synctl" ] && "$SYNAPSE_VENV/bin/python" -c 'import boto3' 2>/dev/null; then return; fi
    echo "install-deps: installing matrix-synapse $SYNAPSE_VERSION into $SYNAPSE_VENV" >&2
    mkdir -p "$TOOLS"
    ensure_venv_support
    rm -rf "$SYNAPSE_VENV"
    python3 -m venv "$SYNAPSE_VENV"
    "$SYNAPSE_VENV/bin/pip" install -q --disable-pip-version-check \
        "matrix-synapse==$SYNAPSE_VERSION" "boto3==1.44.5" >&2
}

# The benchmarks' peers (s3fs, rclone from Debian) and their Python driver's packages.
install_bench() {
    local missing=()
    command -v s3fs >/dev/null || missing+=(s3fs)
    command -v rclone >/dev/null || missing+=(rclone)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "install-deps: installing ${missing[*]} from Debian's packages" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ -x "$BENCH_VENV/bin/python" ] && "$BENCH_VENV/bin/python" -c 'import boto3, matplotlib' 2>/dev/null; then return; fi
    echo "install-deps: installing boto3 and matplotlib into $BENCH_VENV" >&2
    ensure_venv_support
    rm -rf "$BENCH_VENV"
    python3 -m venv "$BENCH_VENV"
    "$BENCH_VENV/bin/pip" install -q --disable-pip-version-check "boto3==1.44.5" "matplotlib==3.10.8" >&2
}

case "$what" in
    all) install_fuse; install_test_tools; install_garage; install_moto; install_synapse ;;
    fuse) install_fuse ;;
    garage) install_garage ;;
    moto) install_moto ;;
    synapse) install_synapse ;;
    synapse-venv) install_synapse; echo "$SYNAPSE_VENV" ;;
    bench) install_fuse; install_garage; install_bench ;;
    *) echo "usage: $0 [all|fuse|garage|moto|synapse|bench]" >&2; exit 2 ;;
esac
