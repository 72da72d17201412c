"""What the benchmarks share: the S3 client that watches the bucket, and how each FUSE client
(s3mediafs, s3fs, rclone mount) is mounted, unmounted and measured."""
import os, pathlib, subprocess, sys, time
import boto3
from botocore.config import Config

ENV = os.environ
ENDPOINT, REGION = ENV["S3MEDIAFS_TEST_ENDPOINT"], ENV["S3MEDIAFS_TEST_REGION"]
BUCKET, KEY, SECRET = ENV["S3MEDIAFS_TEST_BUCKET"], ENV["S3MEDIAFS_TEST_ACCESS_KEY"], ENV["S3MEDIAFS_TEST_SECRET_KEY"]
ROOT = pathlib.Path(__file__).resolve().parent.parent
s3 = boto3.client("s3", endpoint_url=ENDPOINT, region_name=REGION, aws_access_key_id=KEY,
                  aws_secret_access_key=SECRET, config=Config(s3={"addressing_style": "path"}))


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


class Client:
    def __init__(self, name, work):
        self.name, self.work, self.proc = name, work, None
        self.mnt = work / "mnt"
        self.mnt.mkdir(parents=True)

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
    def __init__(self, name, work, mode="writeback", extra=()):
        super().__init__(name, work)
        self.mode, self.extra = mode, list(extra)

    def mount(self, prefix):
        env = dict(ENV, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
        self.proc = subprocess.Popen(
            [str(ROOT / "target/release/s3mediafs"), "mount", f"{BUCKET}:{prefix}", str(self.mnt),
             "--endpoint", ENDPOINT, "--region", REGION, "--cache-dir", str(self.work / "cache"),
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
             f"url={ENDPOINT},use_path_request_style,endpoint={REGION},passwd_file={pw},"
             f"use_cache={self.work / 'cache'}"], check=True)
        wait_mounted(self.mnt)


class Rclone(Client):
    def mount(self, prefix):
        env = dict(ENV, RCLONE_CONFIG_BENCH_TYPE="s3", RCLONE_CONFIG_BENCH_PROVIDER="Other",
                   RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=KEY, RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=SECRET,
                   RCLONE_CONFIG_BENCH_ENDPOINT=ENDPOINT, RCLONE_CONFIG_BENCH_REGION=REGION,
                   RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true")
        # rclone 1.60 fails on a custom CA bundle; the local server speaks plain http.
        env.pop("AWS_CA_BUNDLE", None)
        self.proc = subprocess.Popen(
            ["rclone", "mount", f"bench:{BUCKET}/{prefix.rstrip('/')}", str(self.mnt),
             "--vfs-cache-mode", "full", "--cache-dir", str(self.work / "cache")],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.work / "log", "w"))
        wait_mounted(self.mnt, self.proc)


