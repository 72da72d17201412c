"""What the benchmarks share: the S3 client that watches the bucket, and how each FUSE client
(s3mediafs, s3fs, rclone mount) is mounted, unmounted and measured."""
import argparse, os, pathlib, re, socket, subprocess, sys, time, urllib.request
import boto3
from botocore.config import Config

ENV = os.environ
ENDPOINT, REGION = ENV["S3MEDIAFS_TEST_ENDPOINT"], ENV["S3MEDIAFS_TEST_REGION"]
BUCKET, KEY, SECRET = ENV["S3MEDIAFS_TEST_BUCKET"], ENV["S3MEDIAFS_TEST_ACCESS_KEY"], ENV["S3MEDIAFS_TEST_SECRET_KEY"]
ROOT = pathlib.Path(__file__).resolve().parent.parent


def s3_client(endpoint=None, **config):
    """A boto3 S3 client for the bench bucket, at `endpoint` (the server by default)."""
    return boto3.client("s3", endpoint_url=endpoint or ENDPOINT, region_name=REGION, aws_access_key_id=KEY,
                        aws_secret_access_key=SECRET, config=Config(s3={"addressing_style": "path"}, **config))


s3 = s3_client()



def timed(fn):
    """Runs fn; returns the seconds it took and what it returned."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def read_all(path, chunk=1 << 20):
    """Reads a whole file unbuffered, `chunk` bytes a call; returns the bytes read."""
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(chunk)
            if not b:
                return n
            n += len(b)


def fmt(v):
    """A figure for a table: whole above 100, one decimal below, n/a when missing."""
    if v is None:
        return "n/a"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def ratio(ours, theirs, higher_better):
    """How many times better ours is than theirs, for a table."""
    if ours is None or theirs is None or ours == 0 or theirs == 0:
        return "n/a"
    return f"{(ours / theirs if higher_better else theirs / ours):.2f}x"

def duration(text):
    """Seconds from `20ms`, `0.02s` or `0`."""
    t = text.strip().lower()
    try:
        if t.endswith("ms"):
            v = float(t[:-2]) / 1000
        elif t.endswith("s"):
            v = float(t[:-1])
        elif float(t) == 0:
            v = 0.0
        else:
            raise argparse.ArgumentTypeError(f"{text}: give a unit, as in 20ms or 0.02s")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: not a duration (20ms, 0.02s, 0)")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text}: negative")
    return v


def mounted(path):
    p = str(pathlib.Path(path).resolve())
    return any(l.split()[4] == p for l in open("/proc/self/mountinfo"))


def wait_mounted(path, proc=None, timeout=60):
    end = time.time() + timeout
    while not mounted(path):
        if proc is not None and proc.poll() is not None:
            sys.exit(f"bench: the mount exited early ({proc.returncode})")
        if time.time() > end:
            sys.exit(f"bench: {path} was not mounted within {timeout} s")
        time.sleep(0.02)


def count_objects(prefix):
    n, token = 0, None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        r = s3.list_objects_v2(**kw)
        n += sum(1 for o in r.get("Contents", []) if not o["Key"].endswith("/"))
        token = r.get("NextContinuationToken")
        if not token:
            return n


def wait_bucket(check, timeout=900):
    end = time.time() + timeout
    while not check():
        if time.time() > end:
            return None
        time.sleep(0.1)
    return time.time()


def free_port():
    """A TCP port on 127.0.0.1 free right now, for a mount's --metrics-addr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """User and system CPU time a process (all its threads) has used so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid():
    """The local Garage the benchmark started, if it did."""
    try:
        return int((pathlib.Path(os.environ["S3MEDIAFS_STATE"]) / "garage" / "pid").read_text())
    except (KeyError, OSError, ValueError):
        return None


def metrics(addr, family="s3mediafs_requests_total", number=int):
    """Values by operation from a mount's Prometheus endpoint: by default the requests it
    sent to the store; with `family="s3mediafs_fuse_requests_total"` the FUSE requests it got,
    with `"s3mediafs_fuse_op_seconds_sum", float` the seconds it spent answering them. A
    family without an operation label is given under the empty name."""
    text = urllib.request.urlopen("http://%s/metrics" % addr, timeout=10).read().decode()
    out = {}
    for m in re.finditer(r'^%s(?:\{op="([a-z_]+)"[^}]*\})? (\S+)' % family, text, re.M):
        op = m.group(1) or ""
        out[op] = out.get(op, 0) + number(m.group(2))
    return out


class Client:
    def __init__(self, name, work, endpoint=None):
        self.name, self.work, self.proc = name, work, None
        self.endpoint = endpoint or ENDPOINT
        self.mnt = work / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)

    def mount(self, prefix):
        raise NotImplementedError

    def pid(self):
        """The process serving the mount."""
        if self.proc is not None:
            return self.proc.pid
        out = subprocess.run(["pgrep", "-f", f" {self.mnt}"], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None

    def peak_rss_mib(self):
        pid = self.pid()
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except (OSError, TypeError):
            pass
        return None

    def unmount(self):
        subprocess.run(["fusermount3", "-u", str(self.mnt)], stderr=subprocess.DEVNULL)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        subprocess.run(["fusermount3", "-uz", str(self.mnt)], stderr=subprocess.DEVNULL)


class S3mediafs(Client):
    def __init__(self, name, work, mode="writeback", extra=(), endpoint=None):
        super().__init__(name, work, endpoint)
        self.mode, self.extra = mode, list(extra)

    def mount(self, prefix):
        env = dict(ENV, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
        self.proc = subprocess.Popen(
            [str(ROOT / "target/release/s3mediafs"), "mount", f"{BUCKET}:{prefix}", str(self.mnt),
             "--endpoint", self.endpoint, "--region", REGION, "--cache-dir", str(self.work / "cache"),
             "--write-mode", self.mode, "--log-level", "warn"] + self.extra,
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.work / "log", "w"))
        wait_mounted(self.mnt, self.proc)


class S3fs(Client):
    def mount(self, prefix):
        pw = self.work / "passwd"
        pw.write_text(f"{KEY}:{SECRET}\n")
        pw.chmod(0o600)
        subprocess.run(
            ["s3fs", f"{BUCKET}:/{prefix.rstrip('/')}", str(self.mnt), "-o",
             f"url={self.endpoint},use_path_request_style,endpoint={REGION},passwd_file={pw},"
             f"use_cache={self.work / 'cache'}"], check=True)
        wait_mounted(self.mnt)


class Rclone(Client):
    def mount(self, prefix):
        env = dict(ENV, RCLONE_CONFIG_BENCH_TYPE="s3", RCLONE_CONFIG_BENCH_PROVIDER="Other",
                   RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=KEY, RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=SECRET,
                   RCLONE_CONFIG_BENCH_ENDPOINT=self.endpoint, RCLONE_CONFIG_BENCH_REGION=REGION,
                   RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true")
        # rclone 1.60 fails on a custom CA bundle; the local server speaks plain http.
        env.pop("AWS_CA_BUNDLE", None)
        self.proc = subprocess.Popen(
            ["rclone", "mount", f"bench:{BUCKET}/{prefix.rstrip('/')}", str(self.mnt),
             "--vfs-cache-mode", "full", "--cache-dir", str(self.work / "cache")],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.work / "log", "w"))
        wait_mounted(self.mnt, self.proc)

class CountingProxy:
    """A pass-through HTTP proxy in front of the S3 server that counts requests by kind
    (LIST, HEAD, GET, PUT, DELETE, POST, and DELETE_MULTI for a DeleteObjects batch), so every
    client's request economy can be compared on the same footing. Headers (Host included,
    which requests are signed with) and bodies go through unchanged, but for an unsigned
    `Expect: 100-continue`, which the proxy answers itself. With `rtt` (seconds) every
    request pays one more round trip: rtt/2 before it goes upstream and rtt/2 before its answer
    comes back, in the request's own thread, so requests in parallel overlap their waits as
    they would over a network. Connections are not delayed as they open.

    It runs in a process of its own: relaying bodies in the benchmark's process would hold
    the interpreter lock its clients need (the Synapse benchmark's uploaders), and slow
    them only on the runs that go through it."""

    def __init__(self, rtt=0.0, nice=0):
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        self.rtt = rtt
        self.lock = ctx.Lock()
        self.counts = ctx.Array("q", len(PROXY_KINDS), lock=False)
        ours, theirs = ctx.Pipe()
        self.process = ctx.Process(target=_proxy_main, args=(rtt, nice, self.counts, self.lock, theirs), daemon=True)
        self.process.start()
        self.pid = self.process.pid
        self.endpoint = f"http://127.0.0.1:{ours.recv()}"

    def take(self):
        """The counts so far, and start again from zero."""
        with self.lock:
            out = {k: self.counts[i] for i, k in enumerate(PROXY_KINDS) if self.counts[i]}
            for i in range(len(PROXY_KINDS)):
                self.counts[i] = 0
        return out

    def stop(self):
        self.process.terminate()
        self.process.join()


# What the proxy counts requests as; anything else is OTHER.
PROXY_KINDS = ("LIST", "HEAD", "GET", "PUT", "DELETE", "POST", "DELETE_MULTI", "OTHER")


def _proxy_main(rtt, nice, counts, lock, ready):
    """The proxy's process (`CountingProxy`): serves until it is terminated, counting each
    request in `counts` under `lock`, and sends its port on `ready` once it listens. Runs
    `nice` steps below normal priority."""
    os.nice(nice)
    import http.client, http.server, socket, socketserver, threading, urllib.parse
    upstream = urllib.parse.urlsplit(ENDPOINT)
    local = threading.local()
    half = rtt / 2

    def quick_ack(conn):
        """Has the kernel acknowledge what the server sends at once. A server that leaves
        Nagle's algorithm on (Garage does) holds back a body written after its headers
        until they are acknowledged, and a delayed ACK makes that 40 ms."""
        if conn.sock is not None:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes: with Nagle's algorithm against the
        # peer's delayed ACK, a small answer would wait 40 ms for its body.
        disable_nagle_algorithm = True

        def log_message(self, *a):
            pass

        def forward(self):
            q = urllib.parse.urlsplit(self.path).query
            kind = self.command
            if kind == "GET" and ("list-type" in q or "prefix=" in q or "delimiter" in q):
                kind = "LIST"
            elif kind == "POST" and "delete" in urllib.parse.parse_qs(q, keep_blank_values=True):
                kind = "DELETE_MULTI"
            i = PROXY_KINDS.index(kind) if kind in PROXY_KINDS else len(PROXY_KINDS) - 1
            with lock:
                counts[i] += 1
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else None
            if half:
                time.sleep(half)
            # The client has had its 100 Continue from here and the body is read: the
            # server is not asked for another (its interim answer and its final one, two
            # small writes, would wait on each other), unless the header is signed.
            auth = self.headers.get("Authorization", "")
            signed = auth.split("SignedHeaders=", 1)[1].split(",", 1)[0].split(";") if "SignedHeaders=" in auth else ()
            conn = getattr(local, "conn", None)
            for attempt in (0, 1):
                if conn is None:
                    conn = local.conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=300)
                try:
                    if conn.sock is None:
                        conn.connect()
                        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() != "expect" or "expect" in signed:
                            conn.putheader(k, v)
                    conn.endheaders(body)
                    quick_ack(conn)
                    resp = conn.getresponse()
                    break
                except (http.client.HTTPException, OSError):
                    conn.close()
                    conn = local.conn = None
                    if attempt:
                        raise
            if half:
                time.sleep(half)
            self.send_response_only(resp.status, resp.reason)
            # http.client undoes chunked encoding, so a chunked body is sent on whole.
            chunked = resp.getheader("Transfer-Encoding", "").lower() == "chunked"
            quick_ack(conn)
            whole = resp.read() if chunked else None
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                    self.send_header(k, v)
            if chunked:
                self.send_header("Content-Length", str(len(whole)))
            self.end_headers()
            if whole is not None:
                self.wfile.write(whole)
            elif self.command != "HEAD":
                while True:
                    quick_ack(conn)
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    self.wfile.write(chunk)
            else:
                resp.read()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        # Clients open many connections at once; the default backlog of 5 drops some.
        request_queue_size = 256

        def handle_error(self, request, client_address):
            """A client that hangs up mid-answer (a reader done with a file, a mount going
            away) is not an error of the proxy's."""
            if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), Handler)
    ready.send(server.server_address[1])
    server.serve_forever()
