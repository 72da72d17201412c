#!/usr/bin/env bash
# End-to-end test with a real Synapse from PyPI (pinned in install-deps.sh): Synapse keeps
# its media store on an s3mediafs mount; uploads, downloads, thumbnails, admin deletes and
# a restart are checked against the bucket (tests/synapse_e2e.py). Uses the S3 server of
# the S3MEDIAFS_TEST_* environment, or starts a fresh local Garage.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="$(scripts/install-deps.sh synapse-venv)"
cargo build --quiet
if [ -z "${S3MEDIAFS_TEST_ENDPOINT:-}" ]; then
    scripts/install-deps.sh garage
    scripts/s3-server.sh start garage --fresh >/dev/null
    trap 'scripts/s3-server.sh stop garage' EXIT
    set -a
    # shellcheck disable=SC1091
    . target/s3-server/garage/env
    set +a
fi
S3MEDIAFS_BIN="$PWD/target/debug/s3mediafs" "$venv/bin/python" tests/synapse_e2e.py
