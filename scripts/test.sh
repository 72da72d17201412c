#!/usr/bin/env bash
# Runs every test: unit and model tests, then the integration tests against a real local
# Garage (and the end-to-end test with a real Synapse, tests/synapse_e2e.py) and again
# against moto's S3 server. Installs what is missing first (fuse3, Garage, moto, Synapse)
# and stops the servers it started. Extra arguments go to `cargo test` and skip the
# Synapse test (e.g. `scripts/test.sh --test posix`).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh all

started=()
cleanup() {
    for s in "${started[@]}"; do scripts/s3-server.sh stop "$s" || true; done
}
trap cleanup EXIT

echo "== building" >&2
cargo build --quiet --tests
rm -rf target/reliability

# The integration tests skip themselves when no server is set up; here one must be.
export S3MEDIAFS_TEST_REQUIRE_SERVER=1
for server in ${S3MEDIAFS_TEST_SERVERS:-garage moto}; do
    echo "== tests against $server" >&2
    scripts/s3-server.sh start "$server" --fresh >/dev/null
    started+=("$server")
    set -a
    # shellcheck disable=SC1090
    . "target/s3-server/$server/env"
    set +a
    if [ "$server" = garage ]; then
        cargo test --quiet "$@"
        if [ $# -eq 0 ]; then
            echo "== end-to-end with a real Synapse against $server" >&2
            scripts/synapse-e2e.sh
        fi
    else
        # Unit and model tests do not touch a server, and the scale tests (tests/metadata.rs)
        # need a LIST that does not scan the whole bucket; run the other integration tests again.
        cargo test --quiet --test '*' "$@" -- --skip scale::
    fi
    scripts/s3-server.sh stop "$server"
done

if [ $# -eq 0 ]; then
    scripts/reliability-report.sh
fi
