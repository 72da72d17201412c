"""Metadata at a distance (run by scripts/bench.py --sections namespace).

Every client (s3mediafs, s3fs, rclone mount, and a raw boto3 client with no FUSE) talks to
the server through the counting proxy with one more round trip per request (--rtt), so what a
client costs in requests, and how many of them it waits for one after the other, shows up as
time. Over N x 64 KiB files in Synapse's layout (local_content/ab/cd/<rest>) it times creating
them, `find` (on a fresh mount, then again on the same one), a stat of every file, `ls -lR`, a
cold read of every file, `rm -rf`, and the first 64 KiB of a cold 64 MiB file; each step on a
fresh mount with the page cache dropped unless said otherwise, with the requests the proxy saw
for it."""
import concurrent.futures, os, random, string, subprocess, sys, time

from bench_common import BUCKET, CountingProxy, count_objects, fmt, ratio, read_all, s3, s3_client, timed, wait_bucket
from bench_tree import on_fresh_mount

FILE_SIZE = 64 << 10
BIG_MIB = 64
FIRST = 64 << 10
PARALLEL = 8

STEPS = [
    ("create", "makedirs + write + close of every file (files/s)", True),
    ("landed", "create: every object in the bucket (s from the first file)", False),
    ("find_cold", "`find` on a fresh mount (entries/s)", True),
    ("find_warm", "`find` again on the same mount (entries/s)", True),
    ("stat", "`find -type f`, then stat of each file (files/s)", True),
    ("ls_lr", "`ls -lR` (entries/s)", True),
    ("read", "cold read of every file, one after another (files/s)", True),
    ("rm", "`rm -rf` of the tree (files/s)", True),
    ("ttfb", f"first 64 KiB of a cold {BIG_MIB} MiB file after open (ms)", False),
]

NOTES = [
    "Each step runs on a fresh mount (empty client cache) with the page cache dropped, except `find` again, "
    "which follows `find` on the same mount. Entries are the tree's files and directories.",
    "create: `os.makedirs` of the file's directory, then open, one 64 KiB write and close, file after file; "
    "timed until the last close() returned. The row below it is when the bucket (watched directly, not "
    "through the proxy) held every object. Its requests are counted until the mount was unmounted, so they "
    "include uploads deferred past close(). The tree is then replaced by the same tree uploaded with boto3 "
    "(no directory markers), so every client reads the same objects.",
    "stat: `find <mnt> -type f` in a subprocess, then `os.stat` of each path it printed, in order, from "
    "Python; timed over both.",
    "read: every file by its known path, one after another, whole (no listing).",
    "rm: `rm -rf <mnt>/local_content`, timed until it returned; requests counted until the bucket held none "
    "of the objects and the mount was unmounted.",
    "ttfb: open() of the big file and reads until 64 KiB are in, on a fresh mount.",
    "raw (boto3, no FUSE, one request at a time): create = put_object per file; find = list_objects_v2 "
    "paginated, flat (no delimiter), twice; stat = the same listing, then head_object per key; `ls -lR` = "
    "the flat listing (it carries sizes and dates); read = get_object per key; rm = the flat listing, then "
    "delete_objects in batches of 1000; ttfb = one ranged get_object of the first 64 KiB.",
]


class Tree:
    """n relative keys in Synapse's local_content layout (local_content/ab/cd/<rest>, ab cd and
    rest from a 24-letter media ID, as Synapse makes them), and the directories they imply."""

    def __init__(self, n, seed=1):
        rng = random.Random(seed)
        self.files = []
        for _ in range(n):
            mid = "".join(rng.choice(string.ascii_letters) for _ in range(24))
            self.files.append(f"local_content/{mid[:2]}/{mid[2:4]}/{mid[4:]}")
        self.dirs = sorted({k[:i] for k in self.files for i in range(len(k)) if k[i] == "/"})
        self.entries = len(self.files) + len(self.dirs)




def list_keys(client, prefix):
    """Every key under prefix, with list_objects_v2 pages of 1000, flat."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def wipe(prefix):
    """Deletes every object under prefix, directly on the server."""
    keys = list_keys(s3, prefix)
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})


def upload_tree(prefix, tree):
    """Replaces whatever is under prefix by the tree's files, uploaded directly with boto3."""
    wipe(prefix)
    body = os.urandom(FILE_SIZE)
    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        list(ex.map(lambda k: s3.put_object(Bucket=BUCKET, Key=prefix + k, Body=body), tree.files))


def upload_big(key):
    s3.put_object(Bucket=BUCKET, Key=key, Body=os.urandom(BIG_MIB << 20))


def proxy_check(proxy, key, n=20):
    """How long a HEAD takes directly and through the proxy, one after another (seconds each),
    and how long PARALLEL HEADs sent at once through the proxy take in all."""
    direct = s3_client()
    direct.head_object(Bucket=BUCKET, Key=key)
    d, _ = timed(lambda: [direct.head_object(Bucket=BUCKET, Key=key) for _ in range(n)])
    c = s3_client(proxy.endpoint, max_pool_connections=PARALLEL)
    c.head_object(Bucket=BUCKET, Key=key)
    p, _ = timed(lambda: [c.head_object(Bucket=BUCKET, Key=key) for _ in range(n)])
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as ex:
        head = lambda _: c.head_object(Bucket=BUCKET, Key=key)
        list(ex.map(head, range(PARALLEL)))
        par = min(timed(lambda: list(ex.map(head, range(PARALLEL))))[0] for _ in range(3))
    proxy.take()
    return {"direct": d / n, "proxied": p / n, "parallel": par, "n": n}


def write_tree(mnt, tree):
    data = os.urandom(FILE_SIZE)
    for k in tree.files:
        p = mnt / k
        os.makedirs(p.parent, exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)




def first_bytes(path):
    n = 0
    with open(path, "rb", buffering=0) as f:
        while n < FIRST:
            b = f.read(FIRST - n)
            if not b:
                break
            n += len(b)
    return n


def find_entries(mnt):
    """Runs `find <mnt>`; returns the entries it printed below mnt."""
    out = subprocess.run(["find", str(mnt)], stdout=subprocess.PIPE, check=True, text=True).stdout
    return len(out.splitlines()) - 1


def ls_lr_entries(mnt):
    """Runs `ls -lR <mnt>`; returns the entries it listed (not its headers and totals)."""
    out = subprocess.run(["ls", "-lR", str(mnt)], stdout=subprocess.PIPE, check=True, text=True).stdout
    return sum(1 for l in out.splitlines() if l and not l.endswith(":") and not l.startswith("total "))


def find_then_stat(mnt):
    out = subprocess.run(["find", str(mnt), "-type", "f"], stdout=subprocess.PIPE, check=True, text=True).stdout
    paths = out.splitlines()
    for p in paths:
        os.stat(p)
    return len(paths)


def check(client, step, seen, want):
    if seen != want:
        raise SystemExit(f"bench: {client}: {step} saw {seen} of {want}")


def run_client(make, prefix, big_prefix, tree, proxy, drop_page_cache):
    """Every step on FUSE client make(proxy.endpoint), each on a fresh mount. Returns
    {step: {"value", "requests"}}."""
    n, r = len(tree.files), {}
    name = make(proxy.endpoint).name
    wipe(prefix)

    def create(c):
        proxy.take()
        t0 = time.time()
        secs, _ = timed(lambda: write_tree(c.mnt, tree))
        landed = wait_bucket(lambda: count_objects(prefix + "local_content/") >= n)
        return secs, (landed - t0) if landed else None
    (secs, landed) = on_fresh_mount(make(proxy.endpoint), prefix, drop_page_cache, create)
    r["create"] = {"value": n / secs, "requests": proxy.take()}
    r["landed"] = {"value": landed, "requests": None}
    upload_tree(prefix, tree)

    def finds(c):
        proxy.take()
        cold, seen = timed(lambda: find_entries(c.mnt))
        check(name, "find", seen, tree.entries)
        cold_req = proxy.take()
        warm, seen = timed(lambda: find_entries(c.mnt))
        check(name, "find again", seen, tree.entries)
        return (cold, cold_req), (warm, proxy.take())
    (cold, cold_req), (warm, warm_req) = on_fresh_mount(make(proxy.endpoint), prefix, drop_page_cache, finds)
    r["find_cold"] = {"value": tree.entries / cold, "requests": cold_req}
    r["find_warm"] = {"value": tree.entries / warm, "requests": warm_req}

    for step, fn, want in (("stat", find_then_stat, n), ("ls_lr", ls_lr_entries, tree.entries),
                           ("read", lambda mnt: sum(read_all(mnt / k) for k in tree.files), n * FILE_SIZE)):
        def run(c):
            proxy.take()
            secs, seen = timed(lambda: fn(c.mnt))
            check(name, step, seen, want)
            return secs, proxy.take()
        secs, req = on_fresh_mount(make(proxy.endpoint), prefix, drop_page_cache, run)
        r[step] = {"value": (tree.entries if step == "ls_lr" else n) / secs, "requests": req}

    def rm(c):
        proxy.take()
        secs, _ = timed(lambda: subprocess.run(["rm", "-rf", str(c.mnt / "local_content")], check=True))
        if wait_bucket(lambda: count_objects(prefix) == 0, timeout=300) is None:
            print(f"bench: {name}: objects left in the bucket 300 s after rm -rf", file=sys.stderr)
        return secs
    secs = on_fresh_mount(make(proxy.endpoint), prefix, drop_page_cache, rm)
    r["rm"] = {"value": n / secs, "requests": proxy.take()}
    wipe(prefix)

    def ttfb(c):
        proxy.take()
        secs, got = timed(lambda: first_bytes(c.mnt / "big.bin"))
        check(name, "ttfb", got, FIRST)
        return secs, proxy.take()
    secs, req = on_fresh_mount(make(proxy.endpoint), big_prefix, drop_page_cache, ttfb)
    r["ttfb"] = {"value": secs * 1000, "requests": req}
    return r


def run_raw(prefix, big_prefix, tree, proxy):
    """The nearest equivalent of every step with boto3 through the proxy, one request at a time."""
    n, r = len(tree.files), {}
    keys = [prefix + k for k in tree.files]
    wipe(prefix)

    def step(key, fn, count, want=None):
        c = s3_client(proxy.endpoint)
        proxy.take()
        secs, seen = timed(lambda: fn(c))
        if want is not None:
            check("raw", key, seen, want)
        r[key] = {"value": count / secs, "requests": proxy.take()}
        return secs

    data = os.urandom(FILE_SIZE)
    secs = step("create", lambda c: [c.put_object(Bucket=BUCKET, Key=k, Body=data) for k in keys], n)
    r["landed"] = {"value": secs, "requests": None}
    upload_tree(prefix, tree)

    def find_twice(c):
        cold, seen = timed(lambda: len(list_keys(c, prefix)))
        check("raw", "find", seen, n)
        cold_req = proxy.take()
        warm, seen = timed(lambda: len(list_keys(c, prefix)))
        check("raw", "find again", seen, n)
        r["find_cold"] = {"value": tree.entries / cold, "requests": cold_req}
        r["find_warm"] = {"value": tree.entries / warm, "requests": proxy.take()}
    c = s3_client(proxy.endpoint)
    proxy.take()
    find_twice(c)
    step("stat", lambda c: len([c.head_object(Bucket=BUCKET, Key=k) for k in list_keys(c, prefix)]), n, n)
    step("ls_lr", lambda c: len(list_keys(c, prefix)), tree.entries, n)
    step("read", lambda c: sum(len(c.get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in keys), n, n * FILE_SIZE)

    def rm(c):
        ks = list_keys(c, prefix)
        for i in range(0, len(ks), 1000):
            c.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in ks[i:i + 1000]], "Quiet": True})
        return len(ks)
    step("rm", rm, n, n)
    check("raw", "rm", count_objects(prefix), 0)
    secs = step("ttfb", lambda c: len(c.get_object(Bucket=BUCKET, Key=big_prefix + "big.bin",
                                                   Range=f"bytes=0-{FIRST - 1}")["Body"].read()), 1, FIRST)
    r["ttfb"]["value"] = secs * 1000
    return r




def fmt_requests(r):
    if r is None:
        return "(in create)"
    if not r:
        return "none"
    return ", ".join(f"{v} {k}" for k, v in sorted(r.items(), key=lambda kv: (-kv[1], kv[0])))


def report(results, tree, rtt, commit, date, check_):
    names = list(results)
    ms = rtt * 1000
    lines = [f"# Namespace benchmark at {ms:g} ms RTT, {date:%Y-%m-%d %H:%M} UTC", "",
             f"Commit {commit}. RTT {ms:g} ms; {len(tree.files)} x 64 KiB files in Synapse's layout "
             f"(`local_content/ab/cd/<rest>`), {len(tree.dirs)} directories, {tree.entries} entries. "
             "Every client talks to one local Garage through a proxy that "
             + (f"adds {ms:g} ms to every request ({ms / 2:g} ms before it goes to the server, {ms / 2:g} ms "
                "before its answer comes back; requests in parallel wait in parallel; opening a connection "
                "costs nothing more) and " if rtt else "adds no delay and ")
             + "counts requests by kind (DELETE_MULTI is a DeleteObjects batch).", "",
             f"Proxy check: a HEAD took {check_['direct'] * 1000:.1f} ms directly and "
             f"{check_['proxied'] * 1000:.1f} ms through the proxy ({check_['n']} one after another); "
             f"{PARALLEL} HEADs sent at once through the proxy took {check_['parallel'] * 1000:.1f} ms in all.", ""]
    lines += [f"- {n}" for n in NOTES]
    lines += ["", "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label, _ in STEPS:
        lines.append(f"| {label} | " + " | ".join(fmt(results[n][key]["value"]) for n in names) + " |")
    lines += ["", "Requests the proxy saw for each step:", "",
              "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label, _ in STEPS:
        if key != "landed":
            lines.append(f"| {label} | " + " | ".join(fmt_requests(results[n][key]["requests"]) for n in names) + " |")
    if "s3mediafs" in results:
        ours = results["s3mediafs"]
        others = [n for n in names if n != "s3mediafs"]
        lines += ["", "s3mediafs relative to each (above 1 = s3mediafs faster):", "",
                  "| step | " + " | ".join(f"vs {n}" for n in others) + " |", "|---" * (len(others) + 1) + "|"]
        for key, label, higher in STEPS:
            cells = [ratio(ours[key]["value"], results[n][key]["value"], higher) for n in others]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def chart(results, rtt, dest):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    others = iter(["#999999", "#bbbbbb", "#555555", "#777777"])
    colors = ["#2b7bba" if n == "s3mediafs" else next(others) for n in names]
    fig, axes = plt.subplots(3, 3, figsize=(15, 12))
    for ax, (key, label, _) in zip(axes.flat, STEPS):
        vals = [results[n][key]["value"] or 0 for n in names]
        bars = ax.bar(range(len(names)), vals, color=colors)
        if all(v > 0 for v in vals) and max(vals) > 20 * min(vals):
            ax.set_yscale("log")
        ax.set_title(label.replace("`", ""), fontsize=10)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        for b, v in zip(bars, vals):
            ax.annotate(fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"Metadata at {rtt * 1000:g} ms RTT (higher is better, except seconds and ms; "
                 "a panel whose values span more than 20x is on a log scale)")
    fig.tight_layout()
    fig.savefig(dest, dpi=80)
