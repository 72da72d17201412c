#!/usr/bin/env bash
# Write benchmark: Synapse-style creation of 2000 x 64 KiB files and one 1 GiB sequential
# write, through s3mediafs (write-back and write-through), s3fs and rclone mount
# (--vfs-cache-mode full), all against the same local Garage. Prints a table with ratios and
# writes it to bench/results/. Usage: scripts/bench-write.sh [--files N] [--big-mib N]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh fuse
scripts/install-deps.sh garage
scripts/install-deps.sh moto   # its virtualenv has boto3, used to watch the bucket
missing=()
command -v s3fs >/dev/null || missing+=(s3fs)
command -v rclone >/dev/null || missing+=(rclone)
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: installing ${missing[*]} from Debian's packages" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "== building s3mediafs (release)" >&2
cargo build --release --quiet

export S3MEDIAFS_STATE="$PWD/target/bench-server"
export S3MEDIAFS_GARAGE_PORT="${S3MEDIAFS_GARAGE_PORT:-3910}"
scripts/s3-server.sh start garage >/dev/null
trap 'scripts/s3-server.sh stop garage' EXIT
set -a
. "$S3MEDIAFS_STATE/garage/env"
set +a
"${S3MEDIAFS_TOOLS:-$HOME/.cache/s3mediafs-tools}/moto-5.2.1/bin/python" scripts/bench_write.py "$@"
