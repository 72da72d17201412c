"""A real Synapse homeserver (from PyPI) for the end-to-end test and the Synapse benchmark:
generated config with SQLite on local disk and `media_store_path` where the caller says,
started and stopped as a process, spoken to over its client and admin HTTP API."""

import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import yaml
from PIL import Image

SERVER_NAME = "localhost"


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Synapse:
    def __init__(self, workdir, media_path, venv_bin):
        self.dir = os.path.join(workdir, "synapse")
        os.makedirs(self.dir, exist_ok=True)
        self.python = os.path.join(venv_bin, "python")
        self.venv_bin = venv_bin
        self.port = free_port()
        self.base = "http://127.0.0.1:%d" % self.port
        self.config = os.path.join(self.dir, "homeserver.yaml")
        subprocess.run(
            [self.python, "-m", "synapse.app.homeserver", "--server-name", SERVER_NAME,
             "--config-path", self.config, "--data-directory", self.dir,
             "--generate-config", "--report-stats=no"],
            check=True, cwd=self.dir, stdout=subprocess.DEVNULL,
        )
        with open(self.config) as f:
            cfg = yaml.safe_load(f)
        cfg.update({
            "listeners": [{
                "port": self.port, "bind_addresses": ["127.0.0.1"], "type": "http",
                "tls": False, "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }],
            "database": {"name": "sqlite3", "args": {"database": os.path.join(self.dir, "homeserver.db")}},
            "media_store_path": media_path,
            "max_upload_size": "200M",
            "registration_shared_secret": "e2e-shared-secret",
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "url_preview_enabled": False,
            "rc_message": {"per_second": 1000, "burst_count": 1000},
            "rc_login": {"address": {"per_second": 1000, "burst_count": 1000},
                         "account": {"per_second": 1000, "burst_count": 1000}},
        })
        with open(self.config, "w") as f:
            yaml.safe_dump(cfg, f)
        self.proc = None

    def start(self):
        self.out = open(os.path.join(self.dir, "stdout.log"), "a")
        self.proc = subprocess.Popen(
            [self.python, "-m", "synapse.app.homeserver", "-c", self.config],
            cwd=self.dir, stdout=self.out, stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while True:
            check(self.proc.poll() is None, "Synapse exited at start; see %s" % self.dir)
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            check(time.time() < deadline, "Synapse did not answer within 120 s")
            time.sleep(0.2)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)

    def register_admin(self, user, password):
        subprocess.run(
            [os.path.join(self.venv_bin, "register_new_matrix_user"), "-u", user, "-p", password,
             "-a", "-c", self.config, self.base],
            check=True, stdout=subprocess.DEVNULL,
        )
        body = self.request("POST", "/_matrix/client/v3/login", json.dumps({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
        }).encode(), "application/json", token=None)
        self.token = json.loads(body)["access_token"]

    def request(self, method, path, data=None, content_type=None, token="default", status=200):
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if token == "default":
            token = self.token
        if token:
            req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                got, body, headers = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            got, body, headers = e.code, e.read(), e.headers
        check(got == status, "%s %s: expected %d, got %d: %r" % (method, path, status, got, body[:300]))
        self.last_headers = headers
        return body

    def upload(self, name, data, content_type):
        body = self.request("POST", "/_matrix/media/v3/upload?filename=" + name, data, content_type)
        uri = json.loads(body)["content_uri"]
        check(uri.startswith("mxc://%s/" % SERVER_NAME), uri)
        return uri.rsplit("/", 1)[1]

    def download(self, media_id):
        return self.request("GET", "/_matrix/client/v1/media/download/%s/%s" % (SERVER_NAME, media_id))

    def thumbnail(self, media_id, width, height, method):
        body = self.request(
            "GET", "/_matrix/client/v1/media/thumbnail/%s/%s?width=%d&height=%d&method=%s"
            % (SERVER_NAME, media_id, width, height, method))
        return Image.open(io.BytesIO(body))
