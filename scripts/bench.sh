#!/usr/bin/env bash
# Benchmarks: cold sequential read, warm re-read and time to first byte
# of large media, then 2000 x 64 KiB files created, stat'ed, found, read and deleted, on
# s3mediafs, s3fs (use_path_request_style), rclone mount (--vfs-cache-mode full) and a raw
# boto3 client with no FUSE, all against the same local Garage; then `ls -R`, `find`, a stat
# of every file and `du -s` over a 10 000-file Synapse-shaped tree, with request counts; then
# metadata at a distance (section `namespace`): every client, the raw one included, talks to
# the server through a proxy that adds a round trip to every request and counts requests,
# while 300 x 64 KiB files in Synapse's layout are created, found twice, stat'ed, `ls -lR`'d,
# read cold and `rm -rf`'d, and the first 64 KiB of a cold 64 MiB file is read.
# Drops the page cache between cold runs (needs root). The cold read is repeated in rounds
# that take every client in turn (--rounds, default 3) and reported as the median, with the
# client's and the server's CPU per GiB; warm re-reads and the local-disk baseline are also
# medians of --rounds. Prints tables with ratios and writes them with PNG charts to
# bench/results/ (namespace-<rtt>-<date>.md for the namespace section).
#
#   --sections a,b     read, tree, namespace (default: all three)
#   --clients a,b      s3mediafs, s3fs, rclone-full, raw (default: all; tree skips raw)
#   --rtt D            round trip the namespace proxy adds to each request, half each way:
#                      20ms, 0.02s or 0 (default 0)
#   --ns-files N       files in the namespace tree (default 300)
#
# Usage: scripts/bench.sh [--sections read,tree,namespace] [--big-mib N] [--files N]
# [--rounds N] [--tree-files N] [--ns-files N] [--rtt 20ms] [--clients a,b,...]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh bench
echo "== building s3mediafs (release)" >&2
cargo build --release --quiet

. scripts/bench-server.sh bench-server 3910
"${S3MEDIAFS_TOOLS:-$HOME/.cache/s3mediafs-tools}/bench-venv-1/bin/python" scripts/bench.py "$@"
