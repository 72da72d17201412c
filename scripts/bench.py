"""Benchmark driver (run by scripts/bench.sh, which starts the server).

Runs the same workloads on s3mediafs, s3fs and rclone mount (--vfs-cache-mode full), and on
a raw client with no FUSE (parallel ranged GETs and PUTs with boto3), against one local S3
server; prints a Markdown table with ratios and writes it, with a PNG chart, to
bench/results/. Three sections: `read` (large media and small files), `tree` (metadata over a
Synapse-shaped tree, in bench_tree.py) and `namespace` (metadata at a distance: every client
through a proxy that adds --rtt to each request, in bench_namespace.py)."""
import argparse, concurrent.futures, datetime, os, pathlib, shutil, statistics, subprocess, sys, tempfile, time

from bench_common import (BUCKET, ENDPOINT, ROOT, CountingProxy, Rclone, S3fs, S3mediafs, cpu_seconds, duration, fmt,
                          ratio, read_all, s3, server_pid, timed)

MIB = 1 << 20
THREADS = 8


def drop_page_cache():
    subprocess.run(["sync"], check=True)
    pathlib.Path("/proc/sys/vm/drop_caches").write_text("3\n")




def measure_cold(read, pid=None):
    """Runs a cold read (page cache dropped first); returns its MB/s and the CPU seconds per
    GiB read of the client (the FUSE process, or this process for the raw client) and of
    the S3 server."""
    client = (lambda: cpu_seconds(pid)) if pid else time.process_time
    spid = server_pid()
    server = (lambda: cpu_seconds(spid)) if spid else (lambda: None)
    drop_page_cache()
    c0, s0 = client(), server()
    secs, n = timed(read)
    c1, s1 = client(), server()
    gib = n / (1 << 30)
    return {"cold_mbs": n / MIB / secs, "client_cpu": (c1 - c0) / gib,
            "server_cpu": None if s0 is None else (s1 - s0) / gib}




def upload_fixture(prefix, big_mib, ttfb_files):
    """The objects every client reads: one big file and a few smaller ones for first-byte
    latency, uploaded once with boto3's multipart transfer."""
    from boto3.s3.transfer import TransferConfig
    cfg = TransferConfig(multipart_chunksize=16 * MIB, max_concurrency=THREADS)
    src = pathlib.Path(tempfile.mkdtemp(prefix="s3mediafs-bench-src-"))
    big = src / "big.bin"
    with open(big, "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(MIB))
    s3.upload_file(str(big), BUCKET, prefix + "data/big.bin", Config=cfg)
    for i in range(ttfb_files):
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}data/ttfb-{i}.bin", Body=os.urandom(8 * MIB))
    return big


def local_disk_read(big):
    """A local-disk read of the same file under a warm re-read's conditions: a copy written
    just before (as a client's cache writes its copy during the cold read), page cache
    dropped. A file that has sat on a virtual disk for a while reads faster than one just
    written, which is what a client cache reads back."""
    copy = big.parent / "copy.bin"
    shutil.copyfile(big, copy)
    drop_page_cache()
    secs, n = timed(lambda: read_all(copy))
    copy.unlink()
    return n / MIB / secs


def small_file_workloads(root, n):
    """Synapse-style creation of n x 64 KiB files, then stat of every file, find, reading
    them all, and deleting them. Returns seconds per phase."""
    data = os.urandom(64 << 10)
    paths = []
    for i in range(n):
        mid = f"{i:024d}"
        paths.append(root / "local_content" / mid[:2] / mid[20:22] / mid[22:24] / mid[4:])
    out = {}

    def create():
        for p in paths:
            os.makedirs(p.parent, exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
    out["create"] = timed(create)[0]
    drop_page_cache()
    out["stat"] = timed(lambda: [os.stat(p) for p in paths])[0]
    drop_page_cache()

    def find():
        return sum(len(files) for _, _, files in os.walk(root / "local_content"))
    secs, found = timed(find)
    if found != n:
        sys.exit(f"bench: find saw {found} of {n} files")
    out["find"] = secs
    drop_page_cache()
    out["read"] = timed(lambda: [read_all(p) for p in paths])[0]
    out["delete"] = timed(lambda: [os.unlink(p) for p in paths])[0]
    return out


def own_cache_file(client):
    """The cache file s3mediafs keeps the big file in (its largest), once the cold read has
    cached all of it; None for other clients."""
    if not isinstance(client, S3mediafs):
        return None
    files = [p for p in (client.work / "cache" / "objects").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size, default=None)


def run_client(client, prefix, args):
    r = {}
    client.mount(prefix)
    try:
        mnt = client.mnt
        drop_page_cache()
        ttfb = []
        for i in range(args.ttfb_files):
            def first_byte():
                with open(mnt / "data" / f"ttfb-{i}.bin", "rb", buffering=0) as f:
                    return f.read(16 << 10)
            ttfb.append(timed(first_byte)[0])
        r["ttfb_ms"] = statistics.median(ttfb) * 1000
        r.update(measure_cold(lambda: read_all(mnt / "data" / "big.bin"), client.pid()))
        own = own_cache_file(client)
        warm, direct = [], []
        for _ in range(args.rounds):
            drop_page_cache()
            secs, n = timed(lambda: read_all(mnt / "data" / "big.bin"))
            warm.append(n / MIB / secs)
            if own is not None:
                # The same bytes on the same disk, read without the mount, in turn with the
                # reads through it: a virtual disk's speed drifts from one read to the next.
                drop_page_cache()
                secs, n = timed(lambda: read_all(own))
                direct.append(n / MIB / secs)
        r["warm_mbs"] = statistics.median(warm)
        r["warm_runs"] = warm
        if direct:
            r["own_file_mbs"] = statistics.median(direct)
            r["own_file_runs"] = direct
        small = small_file_workloads(mnt / f"small-{client.name}", args.files)
        for k, v in small.items():
            r[f"{k}_fps"] = args.files / v
        r["rss_mib"] = client.peak_rss_mib()
    finally:
        client.unmount()
    return r


def raw_big_reader(prefix):
    """A function that reads the big file on an executor with 8 MiB ranged GETs in
    parallel and returns the bytes read (its size is asked for here, outside any timing)."""
    key = prefix + "data/big.bin"
    size = s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
    ranges = [(o, min(size, o + 8 * MIB) - 1) for o in range(0, size, 8 * MIB)]

    def get(rg):
        return len(s3.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={rg[0]}-{rg[1]}")["Body"].read())
    return lambda ex: sum(ex.map(get, ranges))


def run_raw(prefix, args):
    """The same work with no FUSE: boto3 with THREADS parallel requests."""
    r = {}
    ttfb = []
    for i in range(args.ttfb_files):
        ttfb.append(timed(lambda: s3.get_object(Bucket=BUCKET, Key=f"{prefix}data/ttfb-{i}.bin", Range="bytes=0-16383")["Body"].read())[0])
    r["ttfb_ms"] = statistics.median(ttfb) * 1000
    read_big = raw_big_reader(prefix)
    with concurrent.futures.ThreadPoolExecutor(THREADS) as ex:
        # Cold as for the FUSE clients: the server reads its data from disk.
        r.update(measure_cold(lambda: read_big(ex)))
        secs, got = timed(lambda: read_big(ex))
        r["warm_mbs"] = got / MIB / secs
        data = os.urandom(64 << 10)
        keys = [f"{prefix}small-raw/{i:024d}" for i in range(args.files)]
        phases = {
            "create": lambda: list(ex.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=data), keys)),
            "stat": lambda: list(ex.map(lambda k: s3.head_object(Bucket=BUCKET, Key=k), keys)),
            "find": lambda: list(s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}small-raw/")),
            "read": lambda: list(ex.map(lambda k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read(), keys)),
            "delete": lambda: [s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
                               for i in range(0, len(keys), 1000)],
        }
        for name, fn in phases.items():
            r[f"{name}_fps"] = args.files / timed(fn)[0]
    r["rss_mib"] = None
    return r


def cold_again(name, makers, prefix, work):
    """One more cold read of the big file by client `name`, with an empty client cache."""
    if name == "raw":
        read_big = raw_big_reader(prefix)
        with concurrent.futures.ThreadPoolExecutor(THREADS) as ex:
            return measure_cold(lambda: read_big(ex))
    client = makers[name](None)
    client.mount(prefix)
    try:
        return measure_cold(lambda: read_all(client.mnt / "data" / "big.bin"), client.pid())
    finally:
        client.unmount()
        shutil.rmtree(client.work, ignore_errors=True)


COLD = ("cold_mbs", "client_cpu", "server_cpu")

ROWS = [
    ("cold_mbs", "cold sequential read of the big file (MB/s)", True),
    ("client_cpu", "client CPU per GiB of the cold read (s)", False),
    ("server_cpu", "S3 server CPU per GiB of the cold read (s)", False),
    ("warm_mbs", "warm re-read (MB/s)", True),
    ("ttfb_ms", "time to first 16 KiB of a cold file (ms)", False),
    ("create_fps", "create 64 KiB files (files/s)", True),
    ("stat_fps", "stat every file (files/s)", True),
    ("find_fps", "find (files/s)", True),
    ("read_fps", "read every file (files/s)", True),
    ("delete_fps", "delete every file (files/s)", True),
    ("rss_mib", "peak RSS of the FUSE process (MiB)", False),
]






def chart(results, dest):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, axes = plt.subplots((len(ROWS) + 2) // 3, 3, figsize=(15, 14))
    for ax, (key, label, _) in zip(axes.flat, ROWS):
        vals = [results[n].get(key) or 0 for n in names]
        bars = ax.bar(range(len(names)), vals, color=["#2b7bba", "#999999", "#bbbbbb", "#555555"][:len(names)])
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        for b, v in zip(bars, vals):
            ax.annotate(fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    for ax in list(axes.flat)[len(ROWS):]:
        ax.axis("off")
    fig.suptitle("s3mediafs vs peers on one local S3 server (higher is better, except latency and RSS)")
    fig.tight_layout()
    fig.savefig(dest, dpi=80)


def read_section(a, work, makers):
    prefix = f"bench/read-{int(time.time())}/"
    print(f"== uploading {a.big_mib} MiB of fixtures", file=sys.stderr)
    big = upload_fixture(prefix, a.big_mib, a.ttfb_files)
    local = statistics.median(local_disk_read(big) for _ in range(a.rounds))
    shutil.rmtree(big.parent)
    results = {}
    for name in a.clients.split(","):
        print(f"== read: {name}", file=sys.stderr)
        results[name] = run_raw(prefix, a) if name == "raw" else run_client(makers[name](None), prefix, a)
        shutil.rmtree(work / name, ignore_errors=True)
    names = list(results)
    # The machine's load drifts: the cold read is repeated in rounds that take every client
    # in turn, and the median of each client's rounds is reported.
    rounds = {n: [{k: results[n].get(k) for k in COLD}] for n in names}
    for i in range(2, a.rounds + 1):
        for name in names:
            print(f"== cold read, round {i}: {name}", file=sys.stderr)
            rounds[name].append(cold_again(name, makers, prefix, work))
    for name in names:
        for k in COLD:
            vals = [r[k] for r in rounds[name] if r.get(k) is not None]
            results[name][k] = statistics.median(vals) if vals else None
    lines = [f"# Read and small-file benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"One local S3 server at {ENDPOINT}; a {a.big_mib} MiB file read cold (page cache dropped, empty client cache) "
             f"and again warm (page cache dropped, client cache kept); {a.files} x 64 KiB files in Synapse's layout. "
             f"`raw` is boto3 with {THREADS} parallel requests and no FUSE. A local-disk read of the same file "
             f"(a copy written just before, page cache dropped; median of {a.rounds}) ran at {local:.0f} MB/s. "
             f"Cold-read figures are medians of {a.rounds} rounds, each round reading with every client in turn, "
             f"and warm re-reads medians of {a.rounds} in a row; "
             f"CPU is user and system time of the client process (the FUSE daemon; for `raw`, the boto3 process) "
             f"and of the S3 server during the read.", "",
             "| workload | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label, _ in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt(results[n].get(key)) for n in names) + " |")
    if "s3mediafs" in results:
        ours = results["s3mediafs"]
        others = [n for n in names if n != "s3mediafs"]
        lines += ["", "s3mediafs relative to each (above 1 = s3mediafs better):", "",
                  "| workload | " + " | ".join(f"vs {n}" for n in others) + " |", "|---" * (len(others) + 1) + "|"]
        for key, label, hb in ROWS:
            lines.append(f"| {label} | " + " | ".join(ratio(ours.get(key), results[n].get(key), hb) for n in others) + " |")
        lines += ["", f"Warm re-read vs local disk: {ours['warm_mbs'] / local:.2f}x (target 0.8x)."]
        if ours.get("own_file_mbs"):
            runs = lambda k: ", ".join(f"{v:.0f}" for v in ours[k])
            lines.append(f"Warm re-read vs a direct read of s3mediafs's own cache file of it, the two taken in turn: "
                         f"{ours['warm_mbs'] / ours['own_file_mbs']:.2f}x (through the mount {runs('warm_runs')} MB/s; "
                         f"the cache file read directly {runs('own_file_runs')} MB/s).")
        if "raw" in results:
            lines.append(f"Cold read vs raw: {ours['cold_mbs'] / results['raw']['cold_mbs']:.2f}x (target 0.9x).")
    lines += ["", "Cold reads by round (MB/s):", ""]
    for name in names:
        lines.append(f"- {name}: " + ", ".join(f"{r['cold_mbs']:.0f}" for r in rounds[name]))
    write_result("read", lines, lambda png: chart(results, png))


def tree_section(a, work, makers):
    import bench_tree
    prefix = f"bench/tree-{int(time.time())}/"
    keys = bench_tree.synapse_tree(a.tree_files)
    dirs = {k[:i] for k in keys for i in range(len(k)) if k[i] == "/"}
    print(f"== uploading a tree of {len(keys)} files", file=sys.stderr)
    bench_tree.upload_tree(prefix, keys)
    results = {}
    try:
        for name in a.clients.split(","):
            if name == "raw":
                continue
            print(f"== tree: {name}", file=sys.stderr)
            results[name] = bench_tree.run_client(lambda ep: makers[name](ep), prefix, keys, drop_page_cache)
            shutil.rmtree(work / name, ignore_errors=True)
    finally:
        bench_tree.delete_tree(prefix, keys)
    lines = [f"# Metadata benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", ""]
    lines += bench_tree.report(results, len(keys), len(dirs) + 1)
    write_result("tree", lines, lambda png: bench_tree.chart(results, png))


def namespace_section(a, work, makers):
    import bench_namespace as ns
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode:
        commit += " (with uncommitted changes)"
    stamp = int(time.time())
    prefix, big_prefix = f"bench/ns-{stamp}/tree/", f"bench/ns-{stamp}/big/"
    tree = ns.Tree(a.ns_files)
    proxy = CountingProxy(rtt=a.rtt)
    print(f"== namespace: uploading a {ns.BIG_MIB} MiB file; {len(tree.files)} files at {a.rtt * 1000:g} ms RTT", file=sys.stderr)
    ns.upload_big(big_prefix + "big.bin")
    results, built = {}, None
    try:
        check = ns.proxy_check(proxy, big_prefix + "big.bin")
        print(f"== proxy check: HEAD {check['direct'] * 1000:.1f} ms directly, {check['proxied'] * 1000:.1f} ms "
              f"through the proxy; {ns.PARALLEL} at once {check['parallel'] * 1000:.1f} ms", file=sys.stderr)
        for name in a.clients.split(","):
            print(f"== namespace: {name}", file=sys.stderr)
            p = f"{prefix}{name}/"
            try:
                if name == "s3mediafs":
                    built = datetime.datetime.fromtimestamp((ROOT / "target/release/s3mediafs").stat().st_mtime, datetime.timezone.utc)
                if name == "raw":
                    results[name] = ns.run_raw(p, big_prefix, tree, proxy)
                else:
                    results[name] = ns.run_client(lambda ep: makers[name](ep), p, big_prefix, tree, proxy, drop_page_cache)
            finally:
                ns.wipe(p)
            shutil.rmtree(work / name, ignore_errors=True)
    finally:
        ns.wipe(big_prefix)
    if built:
        commit += f"; target/release/s3mediafs built {built:%Y-%m-%d %H:%M} UTC"
    lines = ns.report(results, tree, a.rtt, commit, datetime.datetime.now(datetime.timezone.utc), check)
    write_result(f"namespace-{a.rtt * 1000:g}ms", lines, lambda png: ns.chart(results, a.rtt, png))


def write_result(kind, lines, draw):
    dest = ROOT / "bench/results" / f"{kind}-{datetime.date.today()}.md"
    png = dest.with_suffix(".png")
    lines += ["", f"![chart]({png.name})"]
    out = "\n".join(lines) + "\n"
    print(out)
    dest.write_text(out)
    draw(png)
    print(f"written to {dest.relative_to(ROOT)} and {png.relative_to(ROOT)}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="read,tree,namespace", help="read, tree, namespace, comma-separated")
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--ttfb-files", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="cold reads per client (in rounds over the clients), warm re-reads and local-disk reads, each reported as the median")
    ap.add_argument("--tree-files", type=int, default=10000)
    ap.add_argument("--ns-files", type=int, default=300, help="files in the namespace section's tree")
    ap.add_argument("--rtt", type=duration, default=0.0, help="round trip the namespace section's proxy adds to every request: 20ms, 0.02s, 0")
    ap.add_argument("--clients", default="s3mediafs,s3fs,rclone-full,raw")
    a = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="s3mediafs-bench-"))
    makers = {
        "s3mediafs": lambda ep: S3mediafs("s3mediafs", work / "s3mediafs", endpoint=ep),
        "s3fs": lambda ep: S3fs("s3fs", work / "s3fs", endpoint=ep),
        "rclone-full": lambda ep: Rclone("rclone-full", work / "rclone", endpoint=ep),
    }
    sections = a.sections.split(",")
    if set(sections) - {"read", "tree", "namespace"}:
        ap.error(f"unknown section in {a.sections}: read, tree, namespace")
    if "read" in sections:
        read_section(a, work, makers)
    if "tree" in sections:
        tree_section(a, work, makers)
    if "namespace" in sections:
        namespace_section(a, work, makers)


if __name__ == "__main__":
    main()
