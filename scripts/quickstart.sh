#!/usr/bin/env bash
# Builds s3mediafs, starts a local Garage S3 server with a bucket, and mounts the bucket
# at ./mnt in the foreground. Ctrl-C unmounts and stops Garage; the bucket's data stays in
# target/s3-server/garage for next time. Garage listens on 127.0.0.1:3900, 3901 and 3903;
# when one is taken, S3MEDIAFS_GARAGE_PORT=4000 scripts/quickstart.sh picks others.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh fuse
scripts/install-deps.sh garage
echo "== building s3mediafs (release)" >&2
cargo build --release --quiet

scripts/s3-server.sh start garage >/dev/null
trap 'scripts/s3-server.sh stop garage' EXIT
set -a
. target/s3-server/garage/env
set +a

mkdir -p mnt
if grep -qs " $(pwd)/mnt " /proc/self/mountinfo; then
    fusermount3 -u mnt
fi
cat >&2 <<MSG
== mounting bucket '$S3MEDIAFS_TEST_BUCKET' of the local Garage ($S3MEDIAFS_TEST_ENDPOINT) at ./mnt
   try it from another shell:  echo hello > mnt/hello.txt && ls -l mnt
   press Ctrl-C here to unmount
MSG
AWS_ACCESS_KEY_ID="$S3MEDIAFS_TEST_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3MEDIAFS_TEST_SECRET_KEY" \
    ./target/release/s3mediafs mount "$S3MEDIAFS_TEST_BUCKET" ./mnt \
    --endpoint "$S3MEDIAFS_TEST_ENDPOINT" --region "$S3MEDIAFS_TEST_REGION" \
    --cache-dir "$(pwd)/target/quickstart-cache" || true
