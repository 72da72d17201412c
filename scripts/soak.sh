#!/usr/bin/env bash
# Outage soak: 20 000 Synapse-sized files (16 KiB) written through a mount limited to 1024
# open files during a 10-minute outage of the store, the mount restarted twice with all of
# them pending, then the store comes back. Prints writes refused, files lost and corrupt,
# how long the uploads took to land, and the mount's peak memory and descriptors, and writes
# them to bench/results/soak-<date>.md. Runs the ignored test
# `soak_twenty_thousand_files_through_a_ten_minute_outage_and_two_restarts` (tests/faults.rs)
# against a local Garage of its own. Needs root (FUSE, the descriptor limit).
#
#   --files N          files to write (default 20000)
#   --outage-secs S    length of the outage (default 600)
#
# Usage: scripts/soak.sh [--files N] [--outage-secs S]
set -euo pipefail
cd "$(dirname "$0")/.."

files=20000
outage=600
while [ $# -gt 0 ]; do
    case "$1" in
        --files) files="$2"; shift 2 ;;
        --outage-secs) outage="$2"; shift 2 ;;
        *) echo "soak: unknown argument $1 (see the top of scripts/soak.sh)" >&2; exit 2 ;;
    esac
done

scripts/install-deps.sh fuse
scripts/install-deps.sh garage
. scripts/bench-server.sh soak-server 3920

rev="$(git describe --always --dirty)"
echo "== building (release)" >&2
cargo test --release --quiet --test faults --no-run
out="$(mktemp)"
echo "== soak: $files files, ${outage}s outage, two restarts" >&2
SOAK_FILES="$files" SOAK_OUTAGE_SECS="$outage" cargo test --release --quiet --test faults -- \
    --ignored --exact soak_twenty_thousand_files_through_a_ten_minute_outage_and_two_restarts \
    --nocapture 2>&1 | tee "$out" | grep -E '^soak:|test result' >&2
mkdir -p bench/results
result="bench/results/soak-$(date -u +%Y-%m-%d).md"
{
    echo "# Outage soak"
    echo
    echo "\`scripts/soak.sh --files $files --outage-secs $outage\` on $(date -u +%Y-%m-%d)," \
        "s3mediafs $rev, against a local Garage through a proxy that" \
        "refuses every connection for the length of the outage. The mount runs with a hard limit of" \
        "1024 open files and is restarted twice during the outage with every file pending."
    echo
    echo '```'
    grep -E '^soak:' "$out"
    echo '```'
} > "$result"
rm -f "$out"
echo "soak: wrote $result" >&2
