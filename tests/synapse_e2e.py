"""End-to-end: a real Synapse (from PyPI) keeps its media store on an s3mediafs mount.

Mounts a fresh prefix of the test bucket, starts Synapse on 127.0.0.1 with SQLite and
`media_store_path` on the mount, registers an admin user, then over Synapse's HTTP API:
uploads images and files (one of 100 MiB), downloads them and compares sha256, asks for
crop and scale thumbnails, deletes one media through the admin API and checks its objects
are gone from the bucket, then stops Synapse, unmounts, mounts again with an empty cache,
starts Synapse again and downloads everything once more.

Run by scripts/synapse-e2e.sh (which installs Synapse and sets the environment):
S3MEDIAFS_BIN and the S3MEDIAFS_TEST_* variables of scripts/s3-server.sh.
"""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import boto3
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from synapse_server import SERVER_NAME, Synapse, check  # noqa: E402

ENV = os.environ
BIN = ENV["S3MEDIAFS_BIN"]
BUCKET = ENV["S3MEDIAFS_TEST_BUCKET"]
PREFIX = "synapse-e2e-%d-%d/" % (os.getpid(), int(time.time()))


def log(msg):
    print("synapse-e2e: " + msg, flush=True)


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def s3():
    return boto3.client(
        "s3",
        endpoint_url=ENV["S3MEDIAFS_TEST_ENDPOINT"],
        region_name=ENV["S3MEDIAFS_TEST_REGION"],
        aws_access_key_id=ENV["S3MEDIAFS_TEST_ACCESS_KEY"],
        aws_secret_access_key=ENV["S3MEDIAFS_TEST_SECRET_KEY"],
    )


def keys_under(client, prefix):
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


class Mount:
    def __init__(self, workdir):
        self.mnt = os.path.join(workdir, "media")
        self.workdir = workdir
        os.makedirs(self.mnt, exist_ok=True)
        self.n = 0

    def start(self):
        """Mounts in the background form; returns once the mount answers."""
        self.n += 1
        cache = os.path.join(self.workdir, "cache-%d" % self.n)
        env = dict(ENV)
        env["AWS_ACCESS_KEY_ID"] = ENV["S3MEDIAFS_TEST_ACCESS_KEY"]
        env["AWS_SECRET_ACCESS_KEY"] = ENV["S3MEDIAFS_TEST_SECRET_KEY"]
        self.log = open(os.path.join(self.workdir, "mount-%d.log" % self.n), "w")
        subprocess.run(
            [BIN, BUCKET + ":" + PREFIX, self.mnt, "-o",
             "endpoint=%s,region=%s,cache_dir=%s" % (
                 ENV["S3MEDIAFS_TEST_ENDPOINT"], ENV["S3MEDIAFS_TEST_REGION"], cache)],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=self.log,
        )
        check(is_mounted(self.mnt), "the mount is not there after s3mediafs returned")
        self.pid = int(subprocess.run(
            ["pgrep", "-n", "-f", "s3mediafs " + BUCKET + ":" + PREFIX + " " + self.mnt],
            check=True, capture_output=True, text=True).stdout.split()[0])

    def stop(self):
        """Unmounts and waits until the mount process has uploaded everything and exited."""
        subprocess.run(["fusermount3", "-u", self.mnt], check=True)
        deadline = time.time() + 300
        while os.path.exists("/proc/%d" % self.pid):
            check(time.time() < deadline, "the mount process did not exit after unmounting")
            time.sleep(0.1)


def make_images():
    jpeg = io.BytesIO()
    img = Image.effect_noise((1200, 900), 64).convert("RGB")
    img.save(jpeg, "JPEG", quality=90)
    png = io.BytesIO()
    Image.linear_gradient("L").resize((640, 480)).convert("RGBA").save(png, "PNG")
    gif = io.BytesIO()
    frames = [Image.new("P", (200, 150), color=i * 40) for i in range(5)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {"photo.jpg": (jpeg.getvalue(), "image/jpeg"),
            "gradient.png": (png.getvalue(), "image/png"),
            "anim.gif": (gif.getvalue(), "image/gif")}


def local_keys(media_id):
    """Keys of an original and of its thumbnails' directory."""
    rel = "%s/%s/%s" % (media_id[:2], media_id[2:4], media_id[4:])
    return PREFIX + "local_content/" + rel, PREFIX + "local_thumbnails/" + rel + "/"


def main():
    venv_bin = os.path.dirname(sys.executable)
    workdir = tempfile.mkdtemp(prefix="s3mediafs-synapse-")
    client = s3()
    mount = Mount(workdir)
    synapse = None
    ok = False
    try:
        mount.start()
        synapse = Synapse(workdir, mount.mnt, venv_bin)
        synapse.start()
        log("Synapse %s answers on %s, media store on %s" % (
            subprocess.run([synapse.python, "-c", "import synapse; print(synapse.__version__)"],
                           capture_output=True, text=True).stdout.strip(), synapse.base, mount.mnt))
        synapse.register_admin("admin", "e2e-password")

        files = make_images()
        files["notes.txt"] = (b"plain text, written by Synapse onto S3\n" * 100, "text/plain")
        files["empty.bin"] = (b"", "application/octet-stream")
        files["video.bin"] = (os.urandom(100 << 20), "application/octet-stream")
        ids = {}
        for name, (data, ctype) in files.items():
            ids[name] = synapse.upload(name, data, ctype)
        log("uploaded %d media, one of 100 MiB" % len(ids))

        for name, media_id in ids.items():
            got = synapse.download(media_id)
            check(sha256(got) == sha256(files[name][0]), "download of %s differs" % name)
        log("downloads match what was uploaded")

        for name in ("photo.jpg", "gradient.png", "anim.gif"):
            crop = synapse.thumbnail(ids[name], 32, 32, "crop")
            check(crop.size == (32, 32), "%s crop thumbnail is %s" % (name, crop.size))
            scale = synapse.thumbnail(ids[name], 320, 240, "scale")
            check(max(scale.size) <= 320 and min(scale.size) > 0,
                  "%s scale thumbnail is %s" % (name, scale.size))
        log("crop and scale thumbnails served")

        # Everything is in the bucket, under Synapse's own layout.
        for name, media_id in ids.items():
            original, thumbs = local_keys(media_id)
            mount_file = os.path.join(mount.mnt, original[len(PREFIX):])
            with open(mount_file, "rb") as f:
                os.fsync(f.fileno())
            body = client.get_object(Bucket=BUCKET, Key=original)["Body"].read()
            check(sha256(body) == sha256(files[name][0]), "object of %s differs" % name)
            if name in ("photo.jpg", "gradient.png", "anim.gif"):
                check(keys_under(client, thumbs), "no thumbnails of %s in the bucket" % name)
        log("every original and its thumbnails are objects in the bucket")

        gone = ids.pop("photo.jpg")
        body = synapse.request("DELETE", "/_synapse/admin/v1/media/%s/%s" % (SERVER_NAME, gone), b"")
        check(json.loads(body).get("total") == 1, "admin delete answered %r" % body)
        synapse.request("GET", "/_matrix/client/v1/media/download/%s/%s" % (SERVER_NAME, gone), status=404)
        root = os.open(mount.mnt, os.O_RDONLY)
        try:
            os.fsync(root)  # returns once every change is in the bucket
        finally:
            os.close(root)
        original, thumbs = local_keys(gone)
        left = [k for k in keys_under(client, original) if k == original] + keys_under(client, thumbs)
        check(not left, "deleted media left objects behind: %r" % left)
        check(not os.path.exists(os.path.join(mount.mnt, thumbs[len(PREFIX):])),
              "the thumbnail directory of deleted media is still listed")
        log("admin delete removed the original and its thumbnails from the bucket")

        synapse.stop()
        mount.stop()
        mount.start()
        synapse.start()
        for name, media_id in ids.items():
            got = synapse.download(media_id)
            check(sha256(got) == sha256(files[name][0]), "after restart, %s differs" % name)
        crop = synapse.thumbnail(ids["gradient.png"], 32, 32, "crop")
        check(crop.size == (32, 32), "after restart, crop thumbnail is %s" % (crop.size,))
        log("after a Synapse restart and a fresh mount with an empty cache, all media still match")
        ok = True
    finally:
        if synapse and synapse.proc and synapse.proc.poll() is None:
            synapse.stop()
        if is_mounted(mount.mnt):
            subprocess.run(["fusermount3", "-u", mount.mnt])
        if ok:
            for k in keys_under(client, PREFIX):
                client.delete_object(Bucket=BUCKET, Key=k)
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log("FAILED; Synapse's files and logs are in " + workdir)
            for logname in ("synapse/homeserver.log",):
                path = os.path.join(workdir, logname)
                if os.path.exists(path):
                    with open(path) as f:
                        tail = f.readlines()[-40:]
                    sys.stderr.write("--- %s (last lines) ---\n%s" % (logname, "".join(tail)))
    log("passed")


if __name__ == "__main__":
    main()
