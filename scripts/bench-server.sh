# Sourced by the benchmark scripts: starts a fresh local Garage of their own beside the test
# server (state under target/<name>, S3 port S3MEDIAFS_GARAGE_PORT or the default given),
# stops it when the script exits, and exports its S3MEDIAFS_TEST_* environment.
#   . scripts/bench-server.sh bench-server 3910
export S3MEDIAFS_STATE="$PWD/target/$1"
export S3MEDIAFS_GARAGE_PORT="${S3MEDIAFS_GARAGE_PORT:-$2}"
scripts/s3-server.sh start garage --fresh >/dev/null
trap 'scripts/s3-server.sh stop garage' EXIT
set -a
# shellcheck disable=SC1091
. "$S3MEDIAFS_STATE/garage/env"
set +a
