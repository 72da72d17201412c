"""Synapse on the mount against Synapse on local disk: the same real Synapse, the same media
workload, media store first in a local directory, then on an s3mediafs mount of the local
server, directly and through the latency proxy at each other round trip asked for
(--rtt 0,20ms).

Phases, each timed: upload (images, blobs and one big video through the client API, with
--parallel requests at once; Synapse writes the original and its thumbnails), reading the
stored originals straight from the media directory, download of every media through Synapse
(sha256 checked), the video alone, thumbnails (five sizes per image), admin deletes, and
after a Synapse restart, every media downloaded again. Then the requests the mount sent, by
kind, from its own metrics (all of them landed: fsync of the mount's root waits for that),
per stored file and per upload, and the requests each phase cost (the same metrics, read
between phases).

Run by scripts/bench-synapse.sh, with the Synapse venv's Python and the S3MEDIAFS_TEST_*
environment of the bench server."""
import argparse, concurrent.futures, datetime, hashlib, io, json, os, pathlib, random
import shutil, statistics, subprocess, sys, tempfile, time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import BUCKET, ENDPOINT, ROOT, CountingProxy, S3mediafs, cpu_seconds, duration, fmt, metrics, s3, server_pid  # noqa: E402
from synapse_server import SERVER_NAME, Synapse, check, free_port  # noqa: E402


def workload(images, blobs, video_mib):
    """name -> (bytes, content type): photos and graphics of several sizes, random blobs and
    one big video, the same every run."""
    rnd = random.Random(7)
    media = {}
    for i in range(images):
        w, h = rnd.choice([(1600, 1200), (1200, 900), (800, 600), (640, 480)])
        buf = io.BytesIO()
        if i % 2 == 0:
            Image.effect_noise((w, h), 32 + i).convert("RGB").save(buf, "JPEG", quality=85)
            media["photo-%02d.jpg" % i] = (buf.getvalue(), "image/jpeg")
        else:
            Image.linear_gradient("L").resize((w, h)).convert("RGB").save(buf, "PNG")
            media["graphic-%02d.png" % i] = (buf.getvalue(), "image/png")
    for i in range(blobs):
        media["file-%d.bin" % i] = (rnd.randbytes(4 << 20), "application/octet-stream")
    media["video.mp4"] = (rnd.randbytes(video_mib << 20), "video/mp4")
    return media


def seed(prefix, media):
    """Puts `media` media of an earlier life of the store under `prefix`, in Synapse's layout:
    each an original and two thumbnails, so that the mount meets a bucket whose directories
    it cannot list in one request, as a homeserver's store is."""
    rnd = random.Random(11)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    keys = []
    for _ in range(media):
        mid = "".join(rnd.choice(letters) for _ in range(24))
        rel = "%s/%s/%s" % (mid[:2], mid[2:4], mid[4:])
        keys.append(prefix + "local_content/" + rel)
        keys += [prefix + "local_thumbnails/%s/%s" % (rel, t) for t in ("32-32-image-jpeg-crop", "640-480-image-jpeg-scale")]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=b"x" * 1024), keys))
    return len(keys)


def sha(b):
    return hashlib.sha256(b).hexdigest()


def mount_counts(mount):
    """The mount's FUSE opens and reads so far and the opens it passed through to the kernel,
    from its metrics; empty for local disk."""
    if not mount:
        return {}
    fuse = metrics(mount.metrics_addr, "s3mediafs_fuse_requests_total")
    passed = metrics(mount.metrics_addr, "s3mediafs_passthrough_opens_total")
    return {"open": fuse.get("open", 0), "read": fuse.get("read", 0), "passthrough": passed.get("", 0)}


THUMBS = [(32, 32, "crop"), (96, 96, "crop"), (320, 240, "scale"), (640, 480, "scale"), (800, 600, "scale")]


def run(target, media_path, media, args, venv_bin, work, proxy=None, mount=None):
    """Runs every phase on Synapse with its media store at media_path; returns figures."""
    syn = Synapse(str(work), str(media_path), venv_bin)
    syn.start()
    syn.register_admin("admin", "bench-password")
    out = {"target": target, "phases": [], "cpu": [], "fuse": []}
    total = sum(len(d) for d, _ in media.values())

    def cpu_now():
        """CPU seconds used so far by each process of the run that is alive, by its pid."""
        now = {}
        for who, pid in (("Synapse", syn.proc.pid), ("mount", mount.pid() if mount else None),
                         ("S3 server", server_pid()), ("proxy", proxy.pid if proxy else None)):
            try:
                now[who] = (pid, cpu_seconds(pid))
            except (OSError, TypeError):
                pass
        return now

    cpu_at = [cpu_now()]

    def fuse_seconds():
        """Seconds the mount spent answering FUSE requests so far, by operation."""
        return metrics(mount.metrics_addr, "s3mediafs_fuse_op_seconds_sum", float) if mount else {}

    fuse_at = [fuse_seconds()]

    requests_at = [metrics(mount.metrics_addr) if mount else {}]

    def phase(name):
        """Ends a phase: the requests it cost, from the mount's metrics, and the CPU time of
        each process."""
        if mount:
            now = metrics(mount.metrics_addr)
            out["phases"].append((name, {k: v - requests_at[0].get(k, 0) for k, v in now.items()}))
            requests_at[0] = now
        now, then = cpu_now(), cpu_at[0]
        out["cpu"].append((name, {w: now[w][1] - then[w][1] for w in now if then.get(w, (None,))[0] == now[w][0]}))
        cpu_at[0] = now
        fuse_now = fuse_seconds()
        out["fuse"].append((name, {op: t - fuse_at[0].get(op, 0.0) for op, t in fuse_now.items()}))
        fuse_at[0] = fuse_now

    phase("Synapse start")

    def upload(item):
        name, (data, ctype) = item
        return name, syn.upload(name, data, ctype)

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        ids = dict(pool.map(upload, media.items()))
    out["upload"] = total / (1 << 20) / (time.perf_counter() - t)
    phase("upload")

    originals = [pathlib.Path(media_path, "local_content", i[:2], i[2:4], i[4:]) for i in ids.values()]
    before = mount_counts(mount)
    t = time.perf_counter()
    n = 0
    slowest = (0.0, 0, 0.0)
    for p in originals:
        t_file = time.perf_counter()
        size = 0
        with open(p, "rb", buffering=0) as f:
            opened = time.perf_counter() - t_file
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                size += len(b)
        slowest = max(slowest, (time.perf_counter() - t_file, size, opened))
        n += size
    out["read_stored"] = n / (1 << 20) / (time.perf_counter() - t)
    out["read_slowest"] = slowest
    after = mount_counts(mount)
    out["read_counts"] = {k: after[k] - before[k] for k in after}
    check(n == total, "%s: the stored originals hold %d bytes, not %d" % (target, n, total))
    phase("reading the stored files")

    def download_all():
        t = time.perf_counter()
        for name, mid in ids.items():
            got = syn.download(mid)
            check(sha(got) == sha(media[name][0]), "%s: download of %s differs" % (target, name))
        return sum(len(media[n][0]) for n in ids) / (1 << 20) / (time.perf_counter() - t)

    out["download"] = download_all()
    phase("download")
    t = time.perf_counter()
    syn.download(ids["video.mp4"])
    out["video"] = len(media["video.mp4"][0]) / (1 << 20) / (time.perf_counter() - t)
    phase("the video alone")

    images = [n for n in ids if n.endswith((".jpg", ".png"))]
    t = time.perf_counter()
    for name in images:
        for w, h, m in THUMBS:
            syn.thumbnail(ids[name], w, h, m)
    out["thumbnails"] = len(images) * len(THUMBS) / (time.perf_counter() - t)
    phase("thumbnails")
    thumb_dirs = [pathlib.Path(media_path, "local_thumbnails", i[:2], i[2:4], i[4:]) for i in ids.values()]
    out["stored_files"] = len(ids) + sum(len(os.listdir(d)) for d in thumb_dirs if d.exists())
    phase("counting stored files")

    gone = images[: max(1, len(images) // 3)]
    t = time.perf_counter()
    for name in gone:
        mid = ids.pop(name)
        body = syn.request("DELETE", "/_synapse/admin/v1/media/%s/%s" % (SERVER_NAME, mid), b"")
        check(json.loads(body).get("total") == 1, "%s: admin delete answered %r" % (target, body))
    out["delete"] = len(gone) / (time.perf_counter() - t)
    phase("admin deletes")

    syn.stop()
    syn.start()
    out["restart"] = download_all()
    syn.stop()
    phase("restart and download again")
    out["uploads"] = len(media)
    if mount:
        root = os.open(mount.mnt, os.O_RDONLY)
        try:
            os.fsync(root)  # returns once every change is in the bucket
        finally:
            os.close(root)
        phase("every change landed")
        out["requests"] = metrics(mount.metrics_addr)
        out["peak_rss"] = mount.peak_rss_mib()
    return out


def medians(rounds):
    """The last round's figures with each phase's speed replaced by its median over the rounds,
    and each round's ratios to local disk kept for the report."""
    local, mounts = rounds[-1]
    local = dict(local)
    mounts = [dict(m) for m in mounts]
    for key, _ in PHASES:
        local[key] = statistics.median(r[0][key] for r in rounds)
        for i, m in enumerate(mounts):
            m[key] = statistics.median(r[1][i][key] for r in rounds)
            m["round_ratios_" + key] = [r[1][i][key] / r[0][key] for r in rounds]
    local["rounds"] = len(rounds)
    return local, mounts


PHASES = [("upload", "upload (MiB/s)"), ("read_stored", "reading the stored files (MiB/s)"),
          ("download", "download through Synapse (MiB/s)"), ("video", "the video alone (MiB/s)"),
          ("thumbnails", "thumbnails (/s)"), ("delete", "admin deletes (/s)"),
          ("restart", "after restart, download again (MiB/s)")]


def report(local, mounts, media, commit, date, server_nice):
    lines = ["# Synapse on the mount against Synapse on local disk, %s (%s)" % (date, commit), "",
             "One real Synapse, %d uploads (%d MiB in all, one video of %d MiB), thumbnails of every "
             "image in five sizes, a third of the images deleted, a restart. Local disk and each mount "
             "in the same run; the mount reaches the local Garage directly at rtt 0, and through a "
             "proxy adding the round trip at any other, and the bucket already holds %d objects of %d earlier media in Synapse's "
             "layout (an original and two thumbnails each)." % (
                 len(media), sum(len(d) for d, _ in media.values()) >> 20, len(media["video.mp4"][0]) >> 20,
                 mounts[0]["seeded"], mounts[0]["seeded"] // 3),
             "",
             ("The local Garage and the proxy run at nice %d: they stand in for a bucket and a network on "
              "other machines, whose CPU is not this host's, so Synapse and the mount come first on its two "
              "cores (the CPU table still counts theirs)." % server_nice) if server_nice else
             ("The local Garage and the proxy share this host's two cores with Synapse and the mount at the "
              "same priority."),
             "",
             "%d rounds, each running every target in turn; each figure is the median over the rounds, "
             "and the last column gives each round's ratio (this machine is shared: one round alone "
             "swings by a third). The other tables are of the last round." % local["rounds"], ""]
    head = "| phase | local disk |" + "".join(" mount, rtt %s | ratio | ratio by round |" % m["rtt"] for m in mounts)
    lines += [head, "|---|---|" + "---|---|---|" * len(mounts)]
    for key, label in PHASES:
        row = "| %s | %s |" % (label, fmt(local[key]))
        for m in mounts:
            row += " %s | %.2fx | %s |" % (fmt(m[key]), m[key] / local[key],
                                           ", ".join("%.2f" % x for x in m["round_ratios_" + key]))
        lines.append(row)
    lines += ["", "Reading the stored files, file by file: the slowest, and what the mount's FUSE "
              "requests show (opens passed through to the kernel read no byte through the mount):", ""]
    for m in [local] + mounts:
        t_max, size, opened = m["read_slowest"]
        c = m["read_counts"]
        lines.append("- %s: slowest file %.1f ms (%.1f MiB; its open %.1f ms)%s" % (
            "local disk" if m is local else "mount, rtt %s" % m["rtt"], t_max * 1000, size / (1 << 20),
            opened * 1000,
            "" if not c else "; %d opens, %d passed through, %d FUSE reads" % (
                c["open"], c["passthrough"], c["read"])))
    lines += ["", "Requests the mount sent (its metrics, after every change landed):", "",
              "| rtt | stored files | " + " | ".join(k for k in KINDS) + " | per stored file: PUT | "
              "upload phase: LIST + HEAD per upload | peak RSS (MiB) |",
              "|---|---|" + "---|" * len(KINDS) + "---|---|---|"]
    for m in mounts:
        r = m["requests"]
        up = dict(m["phases"])["upload"]
        lines.append("| %s | %d | %s | %.2f | %.2f | %s |" % (
            m["rtt"], m["stored_files"], " | ".join(str(r.get(k, 0)) for k in KINDS),
            r.get("put", 0) / m["stored_files"],
            (up.get("list", 0) + up.get("head", 0)) / m["uploads"], fmt(m["peak_rss"])))
    who = ("Synapse", "mount", "S3 server", "proxy")
    lines += ["", "CPU seconds each process used in each phase (this machine has %d cores; the local "
              "S3 server's share, and the latency proxy's, is CPU a remote bucket spends "
              "elsewhere):" % os.cpu_count(), "",
              "| phase | " + " | ".join("%s: %s" % (t, w) for t in ["local disk"] + ["rtt %s" % m["rtt"] for m in mounts]
                                         for w in who) + " |",
              "|---|" + "---|" * (len(who) * (1 + len(mounts)))]
    for i, (name, _) in enumerate(local["cpu"]):
        row = []
        for m in [local] + mounts:
            got = m["cpu"][i][1] if i < len(m["cpu"]) else {}
            row += ["%.2f" % got[w] if w in got else "-" for w in who]
        lines.append("| %s | %s |" % (name, " | ".join(row)))
    lines += ["", "Time the mount spent answering FUSE requests in each phase, summed over requests "
              "(requests in parallel each count), the five largest by operation (s):", "",
              "| phase | " + " | ".join("rtt %s" % m["rtt"] for m in mounts) + " |", "|---|" + "---|" * len(mounts)]
    for i, (name, _) in enumerate(mounts[0]["fuse"]):
        row = []
        for m in mounts:
            got = m["fuse"][i][1] if i < len(m["fuse"]) else {}
            top = sorted(got.items(), key=lambda kv: -kv[1])[:5]
            row.append(", ".join("%s %.2f" % kv for kv in top if kv[1] >= 0.005) or "-")
        lines.append("| %s | %s |" % (name, " | ".join(row)))
    for m in mounts:
        lines += ["", "Requests the mount sent in each phase at rtt %s (its metrics):" % m["rtt"], "",
                  "| phase | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
        for name, counts in m["phases"]:
            lines.append("| %s | %s |" % (name, " | ".join(str(counts.get(k, 0)) for k in KINDS)))
    return lines


KINDS = ["put", "create_multipart", "upload_part", "get", "head", "list", "delete", "delete_many", "copy"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rtt", default="0,20ms", help="round trips of the mount runs, comma-separated")
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--blobs", type=int, default=5)
    ap.add_argument("--video-mib", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs of the whole workload on each target, taken in turn; the tables give medians")
    ap.add_argument("--existing", type=int, default=2000,
                    help="media already in the bucket before Synapse starts (an original and two thumbnails each)")
    args = ap.parse_args()
    # How far below normal priority the local S3 server runs (scripts/bench-synapse.sh
    # started it so), and the latency proxy with it.
    args.server_nice = int(os.environ.get("S3MEDIAFS_SERVER_NICE", "0"))
    venv_bin = os.path.dirname(sys.executable)
    media = workload(args.images, args.blobs, args.video_mib)
    base = pathlib.Path(tempfile.mkdtemp(prefix="s3mediafs-bench-synapse-"))
    try:
        rounds = []
        for r in range(1, args.rounds + 1):
            print("== round %d of %d: Synapse, media store on local disk" % (r, args.rounds), file=sys.stderr)
            local = run("local disk", base / ("local-media-%d" % r), media, args, venv_bin, base / ("local-%d" % r))
            mounts = []
            for rtt_text in args.rtt.split(","):
                rtt = duration(rtt_text)
                print("== round %d of %d: Synapse, media store on s3mediafs, rtt %s" % (r, args.rounds, rtt_text),
                      file=sys.stderr)
                # At rtt 0 no proxy stands between: its relaying would cost CPU a direct
                # connection does not.
                proxy = CountingProxy(rtt, nice=args.server_nice) if rtt else None
                work = base / ("mount-%s-%d" % (rtt_text, r))
                mount = S3mediafs("s3mediafs", work, endpoint=proxy.endpoint if proxy else ENDPOINT,
                                  extra=["--metrics-addr", "127.0.0.1:%d" % free_port()])
                mount.metrics_addr = mount.extra[-1]
                prefix = "bench-synapse-%s-%d-%d/" % (rtt_text, os.getpid(), r)
                seeded = seed(prefix, args.existing)
                mount.mount(prefix)
                try:
                    out = run("mount", mount.mnt, media, args, venv_bin, work, proxy, mount)
                finally:
                    mount.unmount()
                    if proxy:
                        proxy.stop()
                out["rtt"] = rtt_text
                out["seeded"] = seeded
                mounts.append(out)
            rounds.append((local, mounts))
        local, mounts = medians(rounds)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        date = datetime.date.today().isoformat()
        lines = report(local, mounts, media, commit, date, args.server_nice)
        print("\n".join(lines))
        dest = ROOT / "bench/results" / ("synapse-%s.md" % date)
        dest.write_text("\n".join(lines) + "\n")
        print("bench: wrote %s" % dest.relative_to(ROOT), file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
