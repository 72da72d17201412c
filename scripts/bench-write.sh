#!/usr/bin/env bash
# Write benchmark: Synapse-style creation of 2000 x 64 KiB files and one 1 GiB sequential
# write, through s3mediafs (write-back and write-through), s3fs and rclone mount
# (--vfs-cache-mode full), all against the same local Garage. Prints a table with ratios and
# writes it to bench/results/; then close() latency percentiles (64 KiB and 16 MiB files, 1 and
# 8 writers) on the mount and on local disk; then reading back files just written (16 KiB to
# 4 MiB) against local disk. Usage: scripts/bench-write.sh [--files N]
# [--big-mib N] [--sections write,close,readback] [--readback-mib N] [--rtt 20ms] [--peers]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh bench
echo "== building s3mediafs (release)" >&2
cargo build --release --quiet

. scripts/bench-server.sh bench-server 3910
"${S3MEDIAFS_TOOLS:-$HOME/.cache/s3mediafs-tools}/bench-venv-1/bin/python" scripts/bench_write.py "$@"
