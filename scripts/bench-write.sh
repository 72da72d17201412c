#!/usr/bin/env bash
# Write benchmark: Synapse-style creation of 2000 x 64 KiB files and one 1 GiB sequential
# write, through s3mediafs (write-back and write-through), s3fs and rclone mount
# (--vfs-cache-mode full), all against the same local Garage. Prints a table with ratios and
# writes it to bench/results/; then close() latency percentiles (64 KiB and 16 MiB files, 1 and
# 8 writers) on the mount and on local disk. Usage: scripts/bench-write.sh [--files N]
# [--big-mib N] [--sections write,close]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh bench
echo "== building s3mediafs (release)" >&2
cargo build --release --quiet

export S3MEDIAFS_STATE="$PWD/target/bench-server"
export S3MEDIAFS_GARAGE_PORT="${S3MEDIAFS_GARAGE_PORT:-3910}"
scripts/s3-server.sh start garage >/dev/null
trap 'scripts/s3-server.sh stop garage' EXIT
set -a
. "$S3MEDIAFS_STATE/garage/env"
set +a
"${S3MEDIAFS_TOOLS:-$HOME/.cache/s3mediafs-tools}/bench-venv-1/bin/python" scripts/bench_write.py "$@"
