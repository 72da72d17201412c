"""Write benchmark driver (run by scripts/bench-write.sh, which starts the server).

For each client it mounts a fresh prefix, runs the workloads, and reports when the writer's
close() calls returned and when the bucket held everything (watched with boto3)."""
import argparse, datetime, os, pathlib, shutil, subprocess, sys, tempfile, time

from bench_common import (BUCKET, ENDPOINT, ROOT, CountingProxy, Rclone, S3fs, S3mediafs, count_objects, cpu_seconds, duration,
                          free_port, metrics, s3, server_pid, wait_bucket)


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
    """Writes the small files, then the big one, each until the bucket holds it all; returns
    for each (rate, seconds until close returned, seconds until in the bucket, CPU seconds
    of the client and of the S3 server per GiB written, GiB the client had written to its
    disk per GiB written)."""
    prefix = f"bench/{client.name}-{int(time.time())}/"
    client.mount(prefix)
    pid, spid = client.pid(), server_pid()

    def cpu_now():
        return cpu_seconds(pid), (cpu_seconds(spid) if spid else None), disk_written(pid) / (1 << 30)

    def per_gib(before, after, gib):
        return tuple(None if a is None or b is None else (b - a) / gib for a, b in zip(before, after))
    try:
        c0 = cpu_now()
        s, closed = synapse_files(client.mnt, files)
        landed = wait_bucket(lambda: count_objects(prefix + "local_content/") >= files)
        c1 = cpu_now()
        small = (files / (closed - s), closed - s, (landed - s) if landed else None, *per_gib(c0, c1, files * 65536 / (1 << 30)))
        s, closed = big_file(client.mnt, big_mib)
        size = big_mib << 20

        def big_there():
            try:
                return s3.head_object(Bucket=BUCKET, Key=prefix + "big.bin")["ContentLength"] == size
            except Exception:
                return False
        landed = wait_bucket(big_there)
        c2 = cpu_now()
        big = (big_mib * 1.048576 / (closed - s), closed - s, (landed - s) if landed else None, *per_gib(c1, c2, big_mib / 1024))
    finally:
        client.unmount()
    return small, big


def close_latencies(root, size, writers, per_writer):
    """Milliseconds each close() took: `writers` threads each write `per_writer` files of
    `size` bytes (open, one write call per MiB, close) in Synapse's layout under `root`."""
    import concurrent.futures
    data = os.urandom(size)
    chunk = 1 << 20

    def writer(w):
        out = []
        for i in range(per_writer):
            mid = f"{w:02d}{i:022d}"
            d = root / "local_content" / mid[:2] / mid[22:24]
            os.makedirs(d, exist_ok=True)
            f = open(d / mid[4:], "wb", buffering=0)
            for off in range(0, size, chunk):
                f.write(data[off:off + chunk])
            t = time.perf_counter()
            f.close()
            out.append((time.perf_counter() - t) * 1000)
        return out

    with concurrent.futures.ThreadPoolExecutor(writers) as pool:
        return [ms for part in pool.map(writer, range(writers)) for ms in part]


def percentile(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


CLOSE_CASES = [(64 << 10, 1, 400), (64 << 10, 8, 100), (16 << 20, 1, 16), (16 << 20, 8, 4)]


def close_section(work):
    """close() latency percentiles on s3mediafs (write-back) and on the local disk of its
    cache directory, for 64 KiB and 16 MiB files with 1 and 8 writers."""
    lines = ["", "## close() latency", "",
             "Each writer writes its files (one write call per MiB) and times close() alone; "
             "local disk is the filesystem of the mount's cache directory.", "",
             "| file | writers | files | s3mediafs p50 / p90 / p99 / max (ms) | local disk p50 / p90 / p99 / max (ms) |",
             "|---|---|---|---|---|"]
    client = S3mediafs("s3mediafs-close", work / "close", "writeback")
    client.mount(f"bench/close-{int(time.time())}/")
    try:
        rows = []
        for size, writers, each in CLOSE_CASES:
            case = f"{size >> 10} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
            print(f"== close latency, {case}, {writers} writers", file=sys.stderr)
            ours = close_latencies(client.mnt / f"{size}-{writers}", size, writers, each)
            local_root = work / "local" / f"{size}-{writers}"
            local = close_latencies(local_root, size, writers, each)

            def cell(v):
                return " / ".join(f"{percentile(v, p):.2f}" for p in (50, 90, 99)) + f" / {max(v):.2f}"
            rows.append(f"| {case} | {writers} | {len(ours)} | {cell(ours)} | {cell(local)} |")
    finally:
        client.unmount()
    return lines + rows


READBACK_SIZES = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
# The default: files just written are read back within it, as a user's are; a shorter TTL
# makes every lookup of a read that outlasts it ask the bucket again.
READBACK_TTL = "10s"


def read_files(paths):
    """Seconds to open, read whole and close each file in turn."""
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
    return time.perf_counter() - start


def readback_section(work, total_mib, rtt, peers):
    """Reading back files a mount wrote: right after writing them (what Synapse does when it
    thumbnails an upload), then once their uploads landed and the metadata TTL ran out (the
    open asks the bucket whether the file changed elsewhere), then again; against the same
    files on local disk (in its page cache), file sizes from 16 KiB to 4 MiB. Every mount
    reaches the server through the counting proxy, `rtt` seconds away."""
    proxy = CountingProxy(rtt)
    lines = ["", f"## Reading back files just written, {rtt * 1000:g} ms RTT", "",
             f"Files of each size (about {total_mib} MiB in all, at most 2000) are written in Synapse's layout "
             "and read whole at once (just written); then, once their uploads landed and s3mediafs's metadata TTL "
             f"({READBACK_TTL}) ran out, read again (after upload: each open may ask the bucket whether the "
             "file changed elsewhere) and once more right after. s3fs and rclone run with their defaults "
             "(s3fs keeps attributes for 900 s, rclone for 5 min), so they do not ask again. Every mount "
             f"reaches the server through a proxy adding {rtt * 1000:g} ms to each request. Local disk is "
             "the filesystem of the mount's cache directory, its files in the page cache.", "",
             "Each cell gives files/s and MiB/s; s3mediafs's cells add the FUSE requests per file "
             "(lookups, opens, reads...); after upload, every mount's requests to the store per file.", "",
             "| file | files | client | just written | after upload | again | just written / local | after upload / local |",
             "|---|---|---|---|---|---|---|---|"]
    addr = f"127.0.0.1:{free_port()}"
    clients = [S3mediafs("s3mediafs", work / "readback", "writeback", endpoint=proxy.endpoint,
                         extra=["--metadata-ttl", READBACK_TTL, "--metrics-addr", addr])]
    if peers:
        clients += [S3fs("s3fs", work / "readback-s3fs", endpoint=proxy.endpoint),
                    Rclone("rclone-full", work / "readback-rclone", endpoint=proxy.endpoint)]
    local_rates = {}
    rows = {size: [] for size in READBACK_SIZES}
    for client in clients:
        prefix = f"bench/readback-{client.name}-{int(time.time())}/"
        client.mount(prefix)
        ours = client.name == "s3mediafs"
        try:
            for size in READBACK_SIZES:
                n = max(20, min(2000, (total_mib << 20) // size))
                case = f"{size >> 10} KiB" if size < 1 << 20 else f"{size >> 20} MiB"
                print(f"== {client.name}: read back, {n} files of {case}", file=sys.stderr)
                data = os.urandom(size)
                roots = [("mount", client.mnt / f"rb-{size}")]
                if size not in local_rates:
                    roots.append(("local", work / "local-rb" / f"{size}"))
                paths = {}
                for where, root in roots:
                    paths[where] = []
                    for i in range(n):
                        mid = f"{i:024d}"
                        d = root / "local_content" / mid[:2] / mid[22:24]
                        os.makedirs(d, exist_ok=True)
                        (d / mid[4:]).write_bytes(data)
                        paths[where].append(d / mid[4:])

                def timed():
                    """Reads every file; seconds, and the FUSE requests per file."""
                    fuse = "s3mediafs_fuse_requests_total"
                    before = metrics(addr, fuse) if ours else {}
                    took = read_files(paths["mount"])
                    if not ours:
                        return took, None
                    after = metrics(addr, fuse)
                    sent = {op: after.get(op, 0) - before.get(op, 0) for op in after}
                    return took, ", ".join(f"{v / n:.2f} {op}" for op, v in sorted(sent.items()) if v) or "none"

                fresh, fresh_ops = timed()
                landed = time.time()
                wait_bucket(lambda: count_objects(f"{prefix}rb-{size}/") >= n)
                time.sleep(max(0.0, landed + duration(READBACK_TTL) + 1 - time.time()))
                proxy.take()
                first, first_ops = timed()
                sent = proxy.take()
                again, again_ops = timed()
                if "local" in paths:
                    local_rates[size] = read_files(paths["local"])
                local = local_rates[size]
                mib = n * size / (1 << 20)
                store = ", ".join(f"{v / n:.2f} {op}" for op, v in sorted(sent.items()) if v) or "none"

                def cell(t, ops, store=None):
                    more = [f"FUSE: {ops}"] if ops else []
                    more += [f"store: {store}"] if store else []
                    return f"{n / t:.0f}, {mib / t:.0f}" + (f" ({'; '.join(more)})" if more else "")
                if not rows[size]:
                    rows[size].append(f"| {case} | {n} | local disk | {n / local:.0f}, {mib / local:.0f} | | | | |")
                rows[size].append(f"| {case} | {n} | {client.name} | {cell(fresh, fresh_ops)} | {cell(first, first_ops, store)} | "
                                  f"{cell(again, again_ops)} | {local / fresh:.2f}x | {local / first:.2f}x |")
        finally:
            client.unmount()
    for size in READBACK_SIZES:
        lines += rows[size]
    return lines


def fmt(x, unit=""):
    return "timeout" if x is None else f"{x:.1f}{unit}"


def cpu(x):
    return "-" if x is None else f"{x:.2f}"


def disk_written(pid):
    """Bytes process `pid` has had written to disk so far (its cache), or 0 if not known."""
    try:
        for line in open(f"/proc/{pid}/io"):
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--sections", default="write,close,readback",
                    help="write (throughput against peers), close (close() latency), readback (reading back files just written)")
    ap.add_argument("--readback-mib", type=int, default=64, help="MiB written per file size in the readback section")
    ap.add_argument("--rtt", type=duration, default=0.0, help="round trip added to each request in the readback section (e.g. 20ms)")
    ap.add_argument("--peers", action="store_true", help="read back through s3fs and rclone too")
    a = ap.parse_args()
    sections = a.sections.split(",")
    # The clients' caches and mountpoints: gigabytes after a full run, removed however it ends.
    work = pathlib.Path(tempfile.mkdtemp(prefix="s3mediafs-bench-"))
    try:
        run_sections(a, sections, work)
    finally:
        remove_work(work)


def remove_work(work):
    """Removes the bench's directory, and never what is under a mount left in it (a run
    cut short): such a mount is detached first."""
    for top, dirs, _ in os.walk(work):
        for d in list(dirs):
            if os.path.ismount(os.path.join(top, d)):
                subprocess.run(["fusermount3", "-uz", os.path.join(top, d)], capture_output=True)
                dirs.remove(d)
    if not any(os.path.ismount(os.path.join(top, d)) for top, dirs, _ in os.walk(work) for d in dirs):
        shutil.rmtree(work, ignore_errors=True)


def run_sections(a, sections, work):
    """Runs the sections asked for in `work` and writes their report."""
    if "write" not in sections:
        lines = [f"# Write benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]
        if "close" in sections:
            lines += close_section(work)
        if "readback" in sections:
            lines += readback_section(work, a.readback_mib, a.rtt, a.peers)
        out = "\n".join(lines) + "\n"
        print(out)
        name = "-".join(s for s in sections if s in ("close", "readback"))
        if "readback" in sections:
            name += f"-{a.rtt * 1000:g}ms" + ("-peers" if a.peers else "")
        dest = ROOT / "bench/results" / f"{name}-{datetime.date.today()}.md"
        dest.write_text(out)
        print(f"written to {dest.relative_to(ROOT)}", file=sys.stderr)
        return
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
             "| client | files/s (until close returned) | small files: all in bucket after | client CPU per GiB of small files (s) | "
             "big file write MB/s (close returned) | big file in bucket after | client CPU per GiB of the big file (s) | "
             "S3 server CPU per GiB: small, big (s) | client's disk writes per GiB: small, big (GiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, (small, big) in results.items():
        lines.append(f"| {name} | {small[0]:.0f} | {fmt(small[2], ' s')} | {cpu(small[3])} | {big[0]:.0f} | {fmt(big[2], ' s')} | "
                     f"{cpu(big[3])} | {cpu(small[4])}, {cpu(big[4])} | {cpu(small[5])}, {cpu(big[5])} |")
    lines += ["", "CPU is user and system time of the process serving the mount and of the local S3 server, from the "
              "first write until the bucket held every byte, per GiB written. Bodies go over plain HTTP to the local "
              "server: s3mediafs sends them unsigned to a loopback endpoint, as over HTTPS (their checksum guards "
              "them), where a client that signs them spends a SHA-256 of every byte. Disk writes are what the "
              "kernel counted for the client process (`write_bytes` in /proc/PID/io): its cache and journal."]
    lines += ["", "Ratios of s3mediafs (write-back) to each peer:", ""]
    wb = results["s3mediafs-writeback"]
    for name, (small, big) in base.items():
        def ratio(a, b, inverse=False):
            if a is None or b is None:
                return "n/a"
            return f"{(b / a if inverse else a / b):.1f}x"
        lines.append(f"- vs {name}: files/s {ratio(wb[0][0], small[0])}, small files in bucket {ratio(wb[0][2], small[2], True)} sooner, "
                     f"write MB/s {ratio(wb[1][0], big[0])}, big file in bucket {ratio(wb[1][2], big[2], True)} sooner")
    if "close" in sections:
        lines += close_section(work)
    if "readback" in sections:
        lines += readback_section(work, a.readback_mib, a.rtt, a.peers)
    out = "\n".join(lines) + "\n"
    print(out)
    dest = ROOT / "bench/results" / f"write-{datetime.date.today()}.md"
    dest.write_text(out)
    print(f"written to {dest.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
