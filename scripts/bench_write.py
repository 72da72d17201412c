"""Write benchmark driver (run by scripts/bench-write.sh, which starts the server).

For each client it mounts a fresh prefix, runs the workloads, and reports when the writer's
close() calls returned and when the bucket held everything (watched with boto3)."""
import argparse, datetime, os, pathlib, sys, tempfile, time

from bench_common import BUCKET, ENDPOINT, ROOT, Rclone, S3fs, S3mediafs, count_objects, s3, wait_bucket


def synapse_files(mnt, n):
    """makedirs + open(wb) + 64 KiB write + close, in Synapse's fan-out layout."""
    data = os.urandom(65536)
    start = time.time()
    for i in range(n):
        mid = f"{i:024d}"
        d = mnt / "local_content" / mid[:2] / mid[20:22] / mid[22:24]
        os.makedirs(d, exist_ok=True)
        with open(d / mid[4:], "wb") as f:
            f.write(data)
    return start, time.time()


def big_file(mnt, mib):
    chunk = os.urandom(1 << 20)
    start = time.time()
    with open(mnt / "big.bin", "wb") as f:
        for _ in range(mib):
            f.write(chunk)
    return start, time.time()


def run(client, files, big_mib):
    prefix = f"bench/{client.name}-{int(time.time())}/"
    client.mount(prefix)
    try:
        s, closed = synapse_files(client.mnt, files)
        landed = wait_bucket(lambda: count_objects(prefix + "local_content/") >= files)
        small = (files / (closed - s), closed - s, (landed - s) if landed else None)
        s, closed = big_file(client.mnt, big_mib)
        size = big_mib << 20

        def big_there():
            try:
                return s3.head_object(Bucket=BUCKET, Key=prefix + "big.bin")["ContentLength"] == size
            except Exception:
                return False
        landed = wait_bucket(big_there)
        big = (big_mib * 1.048576 / (closed - s), closed - s, (landed - s) if landed else None)
    finally:
        client.unmount()
    return small, big


def fmt(x, unit=""):
    return "timeout" if x is None else f"{x:.1f}{unit}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--big-mib", type=int, default=1024)
    a = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="s3mediafs-bench-"))
    clients = [S3mediafs("s3mediafs-writeback", work / "wb", "writeback"),
               S3mediafs("s3mediafs-writethrough", work / "wt", "writethrough"),
               S3fs("s3fs", work / "s3fs"), Rclone("rclone-full", work / "rclone")]
    results = {}
    for c in clients:
        print(f"== {c.name}", file=sys.stderr)
        results[c.name] = run(c, a.files, a.big_mib)
    base = {k: v for k, v in results.items() if not k.startswith("s3mediafs")}
    lines = [f"# Write benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "", f"Local Garage at {ENDPOINT}; {a.files} x 64 KiB Synapse-style files; one {a.big_mib} MiB file.", "",
             "| client | files/s (until close returned) | small files: all in bucket after | 1 GiB write MB/s (close returned) | big file in bucket after |",
             "|---|---|---|---|---|"]
    for name, (small, big) in results.items():
        lines.append(f"| {name} | {small[0]:.0f} | {fmt(small[2], ' s')} | {big[0]:.0f} | {fmt(big[2], ' s')} |")
    lines += ["", "Ratios of s3mediafs (write-back) to each peer:", ""]
    wb = results["s3mediafs-writeback"]
    for name, (small, big) in base.items():
        def ratio(a, b, inverse=False):
            if a is None or b is None:
                return "n/a"
            return f"{(b / a if inverse else a / b):.1f}x"
        lines.append(f"- vs {name}: files/s {ratio(wb[0][0], small[0])}, small files in bucket {ratio(wb[0][2], small[2], True)} sooner, "
                     f"write MB/s {ratio(wb[1][0], big[0])}, big file in bucket {ratio(wb[1][2], big[2], True)} sooner")
    out = "\n".join(lines) + "\n"
    print(out)
    dest = ROOT / "bench/results" / f"write-{datetime.date.today()}.md"
    dest.write_text(out)
    print(f"written to {dest.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
