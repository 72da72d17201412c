"""Metadata benchmark over a Synapse-shaped tree (run by scripts/bench.py --sections tree).

Uploads N small objects laid out like Synapse's media store (local_content/aa/bb/id,
remote_content/server/aa/bb/id, local_thumbnails/aa/bb/id/WxH-type-method), then on each
FUSE client runs `ls -R`, `find -type f`, a stat of every file and `du -s`, each on a fresh
mount with the page cache dropped. Every workload runs twice: once straight to the server for
the time, once through a counting proxy for the number of requests by kind."""
import concurrent.futures, os, shutil, subprocess, time

from bench_common import BUCKET, CountingProxy, s3

WORKLOADS = [
    ("ls_r", "`ls -R`"),
    ("find", "`find -type f`"),
    ("stat", "stat of every file"),
    ("du", "`du -s`"),
]


def synapse_tree(n):
    """n relative keys in Synapse's media layout, with the fan-out a real store has."""
    keys, i = [], 0
    servers = ["matrix.org", "example.com", "chat.example.net", "kde.org"]
    while len(keys) < n:
        h = (i * 0x9E3779B97F4A7C15) & (2**64 - 1)
        a, b, rest = f"{h >> 56:02x}", f"{(h >> 48) & 0xff:02x}", f"{h & 0xffffffffffff:012x}"
        if i % 3 == 2:
            keys.append(f"remote_content/{servers[i % 4]}/{a[0]}{b[0]}/{a[1]}{b[1]}/{rest}")
        else:
            keys.append(f"local_content/{a[0]}{b[0]}/{a[1]}{b[1]}/{rest}")
            if i % 3 == 0:
                for t in ("32-32-image-png-crop", "96-96-image-jpeg-crop", "320-240-image-jpeg-scale"):
                    if len(keys) < n:
                        keys.append(f"local_thumbnails/{a[0]}{b[0]}/{a[1]}{b[1]}/{rest}/{t}")
        i += 1
    return keys


def upload_tree(prefix, keys):
    body = os.urandom(4096)
    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        list(ex.map(lambda k: s3.put_object(Bucket=BUCKET, Key=prefix + k, Body=body[:1024 + hash(k) % 3072]), keys))


def delete_tree(prefix, keys):
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": prefix + k} for k in keys[i:i + 1000]], "Quiet": True})


def run_workload(name, mnt, keys):
    """Runs one workload on a mounted tree; returns how many files it saw."""
    out = subprocess.DEVNULL
    if name == "ls_r":
        r = subprocess.run(["ls", "-R", str(mnt)], stdout=subprocess.PIPE, check=True, text=True)
        return sum(1 for line in r.stdout.splitlines() if line and not line.endswith(":"))
    if name == "find":
        r = subprocess.run(["find", str(mnt), "-type", "f"], stdout=subprocess.PIPE, check=True, text=True)
        return len(r.stdout.splitlines())
    if name == "stat":
        for k in sorted(keys):
            os.stat(mnt / k)
        return len(keys)
    if name == "du":
        subprocess.run(["du", "-s", str(mnt)], stdout=out, check=True)
        return len(keys)
    raise ValueError(name)


def on_fresh_mount(client, prefix, drop_page_cache, work):
    """Mounts `client` with an empty cache, drops the page cache, runs `work(client)` and
    unmounts, clearing the client's cache again."""
    client.mount(prefix)
    try:
        drop_page_cache()
        return work(client)
    finally:
        client.unmount()
        shutil.rmtree(client.work / "cache", ignore_errors=True)


def run_client(make, prefix, keys, drop_page_cache, counts=True):
    """Times each workload on a fresh mount, then counts its requests on another fresh mount
    through the proxy. Returns {workload: {"secs", "requests"}} and the peak RSS."""
    result, rss = {}, 0.0
    proxy = CountingProxy() if counts else None
    for name, _ in WORKLOADS:
        def timed_run(client):
            t = time.perf_counter()
            seen = run_workload(name, client.mnt, keys)
            return seen, time.perf_counter() - t, client.peak_rss_mib() or 0

        client = make(None)
        seen, secs, peak = on_fresh_mount(client, prefix, drop_page_cache, timed_run)
        rss = max(rss, peak)
        if name == "find" and seen != len(keys):
            raise SystemExit(f"bench: {client.name} found {seen} of {len(keys)} files")
        requests = None
        if proxy is not None:
            def counted_run(client):
                proxy.take()
                run_workload(name, client.mnt, keys)
                return proxy.take()

            requests = on_fresh_mount(make(proxy.endpoint), prefix, drop_page_cache, counted_run)
        result[name] = {"secs": secs, "requests": requests}
    result["rss_mib"] = rss
    return result


def fmt_requests(r):
    if not r:
        return "n/a"
    return ", ".join(f"{v} {k}" for k, v in sorted(r.items(), key=lambda kv: -kv[1]))


def report(results, n_files, n_dirs):
    names = list(results)
    lines = [f"{n_files} files in {n_dirs} directories laid out like Synapse's media store; each "
             "workload on a fresh mount with the page cache dropped. Time in seconds (lower is better); "
             "requests counted by a proxy in front of the server on a second fresh run.", "",
             "| workload | " + " | ".join(f"{n} (s)" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in WORKLOADS:
        lines.append(f"| {label} | " + " | ".join(f"{results[n][key]['secs']:.2f}" for n in names) + " |")
    lines.append("| peak RSS (MiB) | " + " | ".join(f"{results[n]['rss_mib']:.0f}" for n in names) + " |")
    lines += ["", "| requests | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in WORKLOADS:
        lines.append(f"| {label} | " + " | ".join(fmt_requests(results[n][key]["requests"]) for n in names) + " |")
    if "s3mediafs" in results:
        ours = results["s3mediafs"]
        others = [n for n in names if n != "s3mediafs"]
        lines += ["", "s3mediafs speed relative to each (goal: 10x s3fs):", "",
                  "| workload | " + " | ".join(f"vs {n}" for n in others) + " |", "|---" * (len(others) + 1) + "|"]
        for key, label in WORKLOADS:
            lines.append(f"| {label} | " + " | ".join(
                f"{results[n][key]['secs'] / ours[key]['secs']:.1f}x" for n in others) + " |")
    return lines


def chart(results, dest):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(16, 4.5))
    for ax, (key, label) in zip(axes, WORKLOADS):
        vals = [results[n][key]["secs"] for n in names]
        bars = ax.bar(range(len(names)), vals, color=["#2b7bba", "#999999", "#bbbbbb"][:len(names)])
        ax.set_title(label.replace("`", "") + " (s)", fontsize=10)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    fig.suptitle("Metadata over a Synapse-shaped tree (seconds, lower is better)")
    fig.tight_layout()
    fig.savefig(dest, dpi=80)
