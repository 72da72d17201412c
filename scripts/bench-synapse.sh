#!/usr/bin/env bash
# Synapse on the mount against Synapse on local disk (scripts/bench_synapse.py): one real
# Synapse from PyPI, the same media workload with the media store first on local disk, then
# on an s3mediafs mount (release build) of a fresh local Garage reached through a latency
# proxy, at each round trip of --rtt (default 0,20ms). Prints per-phase figures and ratios
# and the requests the mount sent, and writes them to bench/results/synapse-<date>.md.
#
# Usage: scripts/bench-synapse.sh [--rtt 0,20ms] [--images 30] [--blobs 5] [--video-mib 100]
#        [--parallel 4] [--rounds 3] [--existing 2000]
# S3MEDIAFS_SERVER_NICE (default 19) is how far below normal priority the local Garage and
# the latency proxy run; 0 shares the CPU with Synapse and the mount evenly.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="$(scripts/install-deps.sh synapse-venv)"
scripts/install-deps.sh fuse
scripts/install-deps.sh garage
echo "== building s3mediafs (release)" >&2
cargo build --release --quiet

# The local Garage and the latency proxy stand in for a bucket and a network on other
# machines: they get what CPU Synapse and the mount leave.
export S3MEDIAFS_SERVER_NICE="${S3MEDIAFS_SERVER_NICE:-19}"
. scripts/bench-server.sh bench-server 3910
"$venv/bin/python" scripts/bench_synapse.py "$@"
