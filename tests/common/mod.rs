//! Test harness: mounts the real `s3mediafs` binary with FUSE against the real S3 server
//! that `scripts/test.sh` started (its settings come from S3MEDIAFS_TEST_* variables), each
//! test under its own key prefix, and talks to the bucket directly for checks.
#![allow(dead_code)]

pub mod faults;

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use s3mediafs::store::{ObjectStore, S3Store, StoreConfig};
use sha2::{Digest, Sha256};

pub const BIN: &str = env!("CARGO_BIN_EXE_s3mediafs");

/// What test mounts log: everything at trace level, the mount's own code and the S3 SDK's
/// (signing included), but the HTTP, TLS, runtime and FUSE plumbing.
pub const TEST_LOG_FILTER: &str =
    "trace,fuser=info,hyper=info,hyper_util=info,h2=info,tokio=info,tokio_util=info,rustls=info,mio=info,tower=info";

#[derive(Clone, Debug)]
pub struct S3Env {
    pub backend: String,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3Env {
    /// The server the tests run against, from the settings `scripts/s3-server.sh` prints.
    /// With none set, the integration tests are skipped with a message (`cargo test` alone
    /// runs the tests that need no server), unless `S3MEDIAFS_TEST_REQUIRE_SERVER` says a
    /// server must be there (`scripts/test.sh` sets it), when they fail.
    pub fn get() -> S3Env {
        if std::env::var_os("S3MEDIAFS_TEST_BACKEND").is_none()
            && std::env::var_os("S3MEDIAFS_TEST_REQUIRE_SERVER").is_none()
        {
            // Once: tests running at the same time wait here while the process exits.
            static SKIP: std::sync::Once = std::sync::Once::new();
            SKIP.call_once(|| {
                let binary = std::env::args().next().unwrap_or_default();
                // Straight to stderr: the harness would keep a test's eprintln! to itself.
                let _ = writeln!(
                    std::io::stderr(),
                    "\nskipping the tests of {binary}: they mount the filesystem against a local S3 \
                     server, and none is set up (S3MEDIAFS_TEST_BACKEND is unset). Run them with \
                     scripts/test.sh, which starts one, or after `scripts/s3-server.sh start garage` \
                     with its settings in the environment."
                );
                std::process::exit(0);
            });
            unreachable!("the process exited");
        }
        let var = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| {
                panic!("{k} is not set: run the tests with scripts/test.sh, which starts a local S3 server")
            })
        };
        S3Env {
            backend: var("S3MEDIAFS_TEST_BACKEND"),
            endpoint: var("S3MEDIAFS_TEST_ENDPOINT"),
            region: var("S3MEDIAFS_TEST_REGION"),
            bucket: var("S3MEDIAFS_TEST_BUCKET"),
            access_key: var("S3MEDIAFS_TEST_ACCESS_KEY"),
            secret_key: var("S3MEDIAFS_TEST_SECRET_KEY"),
        }
    }

    /// Whether the server checks request signatures (moto does not by default).
    pub fn checks_credentials(&self) -> bool {
        self.backend != "moto"
    }

    /// Arguments that point a mount at this server.
    pub fn mount_args(&self) -> Vec<String> {
        vec![
            "--endpoint".into(),
            self.endpoint.clone(),
            "--region".into(),
            self.region.clone(),
        ]
    }
}

/// A prefix no other test uses.
pub fn unique_prefix(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "t/{name}-{}-{nanos:x}-{}/",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A plain aws-sdk-s3 client of the test bucket's server, for what `Bucket` does not ask.
#[allow(dead_code)]
pub fn raw_client(env: &S3Env) -> (tokio::runtime::Runtime, aws_sdk_s3::Client) {
    let creds =
        aws_sdk_s3::config::Credentials::new(&env.access_key, &env.secret_key, None, None, "test");
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .region(aws_sdk_s3::config::Region::new(env.region.clone()))
        .endpoint_url(&env.endpoint)
        .force_path_style(true)
        .credentials_provider(creds)
        .build();
    (
        tokio::runtime::Runtime::new().unwrap(),
        aws_sdk_s3::Client::from_conf(conf),
    )
}

/// Direct access to the test bucket, bypassing the mount.
pub struct Bucket {
    store: Arc<S3Store>,
    config: StoreConfig,
    rt: tokio::runtime::Runtime,
}

impl Bucket {
    /// How its store is reached.
    #[allow(dead_code)]
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn new(env: &S3Env) -> Bucket {
        let config = StoreConfig {
            bucket: env.bucket.clone(),
            endpoint: Some(env.endpoint.clone()),
            region: env.region.clone(),
            path_style: true,
            access_key: env.access_key.clone(),
            secret_key: env.secret_key.clone(),
            session_token: None,
            max_attempts: 3,
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(120),
            attempts: Default::default(),
            read_deadline: Duration::from_secs(120),
        };
        let store = S3Store::new(&config);
        Bucket {
            store: Arc::new(store),
            config,
            rt: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    /// Stores `data` under every key in `keys`, many requests at a time.
    pub fn put_many(&self, keys: &[String], data: &[u8]) {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let keys = Arc::new(keys.to_vec());
        let body = bytes::Bytes::copy_from_slice(data);
        self.rt.block_on(async {
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..32 {
                let (next, keys, body, store) =
                    (next.clone(), keys.clone(), body.clone(), self.store.clone());
                workers.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(key) = keys.get(i) else { return };
                        store
                            .put(key, body.clone())
                            .await
                            .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
                    }
                });
            }
            while let Some(r) = workers.join_next().await {
                r.unwrap();
            }
        });
    }

    /// Deletes every key under `prefix`, a thousand per request.
    /// Multipart uploads under `prefix` begun and neither completed nor aborted.
    pub fn unfinished_uploads(&self, prefix: &str) -> Vec<String> {
        self.rt
            .block_on(self.store.unfinished_uploads(prefix))
            .unwrap_or_else(|e| panic!("ListMultipartUploads: {e}"))
    }

    pub fn delete_prefix(&self, prefix: &str) {
        let keys = self.keys(prefix);
        self.rt.block_on(async {
            for chunk in keys.chunks(1000) {
                let refused = self
                    .store
                    .delete_many(chunk)
                    .await
                    .unwrap_or_else(|e| panic!("DeleteObjects: {e}"));
                assert!(
                    refused.is_empty(),
                    "the store refused to delete {refused:?}"
                );
            }
        });
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.rt
            .block_on(Self::fetch(self.store.clone(), key.to_string()))
    }

    /// `get` of every key in `keys`, many requests at a time, in the same order.
    #[allow(dead_code)]
    pub fn get_many(&self, keys: &[String]) -> Vec<Option<Vec<u8>>> {
        self.rt.block_on(async {
            let mut workers = tokio::task::JoinSet::new();
            let gate = Arc::new(tokio::sync::Semaphore::new(16));
            for (i, key) in keys.iter().enumerate() {
                let (store, key, gate) = (self.store.clone(), key.clone(), gate.clone());
                workers.spawn(async move {
                    let _turn = gate.acquire_owned().await.unwrap();
                    (i, Self::fetch(store, key).await)
                });
            }
            let mut got = vec![None; keys.len()];
            while let Some(r) = workers.join_next().await {
                let (i, data) = r.unwrap();
                got[i] = data;
            }
            got
        })
    }

    async fn fetch(store: Arc<S3Store>, key: String) -> Option<Vec<u8>> {
        let key = key.as_str();
        {
            let meta = match store.head(key).await {
                Ok(m) => m,
                Err(s3mediafs::store::StoreError::NotFound) => return None,
                Err(e) => panic!("HEAD {key}: {e}"),
            };
            if meta.size == 0 {
                return Some(Vec::new());
            }
            // Deleted between the HEAD and the GET: gone.
            match store.get_range(key, 0..meta.size, None).await {
                Ok(data) => Some(data.to_vec()),
                Err(s3mediafs::store::StoreError::NotFound) => None,
                Err(e) => panic!("GET {key}: {e}"),
            }
        }
    }

    pub fn put(&self, key: &str, data: &[u8]) {
        self.rt
            .block_on(self.store.put(key, bytes::Bytes::copy_from_slice(data)))
            .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
    }

    /// Stores a large object the way other tools do, with a multipart upload.
    pub fn put_large(&self, key: &str, data: &[u8]) {
        use std::io::Write;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        let file = Arc::new(f);
        self.rt
            .block_on(s3mediafs::store::upload_file(
                &(self.store.clone() as Arc<dyn ObjectStore>),
                key,
                file,
                (data.len() as u64, None),
                &s3mediafs::store::UploadLimits::new(16 << 20, 4, 64 << 20),
                &Default::default(),
            ))
            .unwrap_or_else(|e| panic!("multipart upload of {key}: {e}"));
    }

    /// Every key under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut token = None;
            loop {
                let page = self
                    .store
                    .list(prefix, true, token, None)
                    .await
                    .expect("LIST");
                out.extend(page.objects.into_iter().map(|o| o.key));
                token = page.next_token;
                if token.is_none() {
                    break;
                }
            }
            out.sort();
            out
        })
    }
}

/// A running mount of `bucket:prefix`, unmounted when dropped.
pub struct TestMount {
    pub env: S3Env,
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub cache: PathBuf,
    /// Where the mount serves its metrics.
    pub metrics_port: u16,
    /// Soft and hard limit on open files the next `start` gives the mount process.
    pub fd_limit: Option<u64>,
    child: Option<Child>,
}

impl TestMount {
    /// Mounts a fresh prefix named after the test.
    pub fn new(name: &str) -> TestMount {
        Self::with_args(name, &[])
    }

    pub fn with_args(name: &str, extra: &[&str]) -> TestMount {
        Self::with_prefix(unique_prefix(name), extra)
    }

    /// Mounts a fresh prefix through another endpoint (a proxy) to the test server.
    pub fn via(name: &str, endpoint: &str, extra: &[&str]) -> TestMount {
        let mut env = S3Env::get();
        env.endpoint = endpoint.to_string();
        Self::build(env, unique_prefix(name), extra)
    }

    /// Mounts `prefix` (which may already hold objects) through another endpoint.
    pub fn with_prefix_via(prefix: String, endpoint: &str, extra: &[&str]) -> TestMount {
        let mut env = S3Env::get();
        env.endpoint = endpoint.to_string();
        Self::build(env, prefix, extra)
    }

    /// Mounts `prefix` (which may already hold objects).
    pub fn with_prefix(prefix: String, extra: &[&str]) -> TestMount {
        Self::build(S3Env::get(), prefix, extra)
    }

    fn build(env: S3Env, prefix: String, extra: &[&str]) -> TestMount {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        let cache = dir.path().join("cache");
        std::fs::create_dir(&mnt).unwrap();
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut m = TestMount {
            env,
            prefix,
            dir,
            mnt,
            cache,
            metrics_port,
            fd_limit: None,
            child: None,
        };
        m.start(extra);
        m
    }

    pub fn source(&self) -> String {
        format!("{}:{}", self.env.bucket, self.prefix)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mount.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts (or restarts) the mount process and waits until the mount is in place.
    pub fn start(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("mount")
            .arg(self.source())
            .arg(&self.mnt)
            .args(self.env.mount_args())
            .args(if extra.contains(&"--cache-dir") {
                vec![]
            } else {
                vec!["--cache-dir".into(), self.cache.clone()]
            })
            // The cache lives on the host's disk; tests of caching must not depend on how
            // full that disk happens to be. The floor's own behaviour has its own tests.
            .args(if extra.contains(&"--cache-min-free") {
                vec![]
            } else {
                vec!["--cache-min-free", "64M"]
            })
            .arg("--log-level")
            .arg("debug")
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .args(extra)
            .env("AWS_ACCESS_KEY_ID", &self.env.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.env.secret_key)
            // The whole suite runs at trace level (the transport's own chatter aside), and
            // every mount's log is scanned for the secret when the mount is dropped.
            .env("RUST_LOG", TEST_LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(n) = self.fd_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("start s3mediafs");
        wait_for(Duration::from_secs(30), || {
            // Mounted and answering: a dead mount left by a killed process fails stat.
            if is_mounted(&self.mnt) && std::fs::metadata(&self.mnt).is_ok() {
                return Ok(());
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "s3mediafs exited before mounting ({status}):\n{}",
                    self.log()
                );
            }
            // Not the log itself: it can be large after a restart, and this runs every 20 ms.
            // Its last lines are printed when the failed test drops the mount.
            Err("mount did not appear in 30 s".to_string())
        });
        self.child = Some(child);
    }

    /// The sum of the metric series whose text starts with `series`, e.g.
    /// `s3mediafs_requests_total{op="get"` (every outcome) or `s3mediafs_cache_hits_total`.
    pub fn metric(&self, series: &str) -> u64 {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .expect("connect to the metrics port");
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Requests of one kind (`get`, `head`, `list`, `put`...) the mount has sent.
    pub fn requests(&self, op: &str) -> u64 {
        self.metric(&format!("s3mediafs_requests_total{{op=\"{op}\""))
    }

    /// Resident and peak resident memory of the mount process, in bytes.
    pub fn memory(&self) -> (u64, u64) {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .unwrap()
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Returns once every change made through the mount is in the bucket (fsync on the
    /// mount's root directory).
    pub fn sync(&self) {
        File::open(&self.mnt).unwrap().sync_all().unwrap();
    }

    /// The object at `rel` under the mount's prefix, once pending changes are uploaded.
    pub fn object(&self, rel: &str) -> Option<Vec<u8>> {
        self.sync();
        Bucket::new(&S3Env::get()).get(&self.key(rel))
    }

    /// Every key under `rel` (full keys), once pending changes are uploaded.
    pub fn keys(&self, rel: &str) -> Vec<String> {
        self.sync();
        Bucket::new(&S3Env::get()).keys(&self.key(rel))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn key(&self, rel: &str) -> String {
        format!("{}{}", self.prefix, rel)
    }

    /// Unmounts and waits for the mount process to exit; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let exited = poll(Duration::from_secs(60), || {
            if is_mounted(&self.mnt) {
                let _ = Command::new("fusermount3")
                    .arg("-u")
                    .arg(&self.mnt)
                    .stderr(Stdio::null())
                    .status();
            }
            child
                .try_wait()
                .unwrap()
                .ok_or_else(|| "the mount process has not exited".to_string())
        });
        match exited {
            Ok(status) => Some(status),
            Err(_) => {
                let _ = child.kill();
                let _ = Command::new("fusermount3")
                    .arg("-uz")
                    .arg(&self.mnt)
                    .status();
                child.wait().ok()
            }
        }
    }

    /// Whether the mount process is still running (a test may have stopped it).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The mount process's id.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Descriptors the mount process has open now.
    pub fn open_fds(&self) -> usize {
        let pid = self.child.as_ref().expect("running").id();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Sends SIGTERM to the mount process and waits (up to 120 s) for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_ref().expect("running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        self.wait_for_exit("SIGTERM")
    }

    /// Waits (up to 120 s) for the mount process to exit after `what`.
    pub fn wait_for_exit(&mut self, what: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_for(Duration::from_secs(120), || {
            match child.try_wait().unwrap() {
                Some(status) => Ok(status),
                None => Err(format!("no exit 120 s after {what}:\n{}", self.log())),
            }
        })
    }

    /// Sends SIGKILL to the mount process and leaves the dead mount in place: every call on
    /// it fails with ENOTCONN until `kill` or `stop` unmounts it.
    pub fn kill_process(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGKILL to the mount process, as a crash would, and unmounts what is left.
    pub fn kill(&mut self) {
        self.kill_process();
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        self.stop();
        // Every mount of the suite is a log scan: the secret key never reaches the log.
        if !std::thread::panicking() {
            assert!(
                !self.log().contains(&self.env.secret_key),
                "the secret key is in the mount log {}",
                self.log_path().display()
            );
        }
        if std::thread::panicking() {
            // The mount logs at trace level; the SDK's chatter would bury what matters.
            let log = self.log();
            // A record's continuation lines (no timestamp) go with the record.
            let mut keep = true;
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| {
                    // Records begin with a timestamp, 2026-11-23T...
                    let b = l.as_bytes();
                    if b.len() > 4 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' {
                        keep = !l.contains(" TRACE ") && !l.contains(" DEBUG ");
                    }
                    keep
                })
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .take(30)
                .collect();
            eprintln!("--- last lines of the mount log above debug level ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Whether something is mounted exactly at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let want = want.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Runs the binary to completion (up to 60 s) and returns its exit code and stderr.
pub fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    // stderr goes to a file: a detached mount process keeps it open after the command ends.
    let err_file = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file.reopen().unwrap());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let status = wait_for(Duration::from_secs(60), || {
        child
            .0
            .try_wait()
            .unwrap()
            .ok_or_else(|| format!("s3mediafs {args:?} did not finish in 60 s"))
    });
    let err = std::fs::read_to_string(err_file.path()).unwrap();
    (status.code().unwrap_or(-1), err)
}

/// A child process killed when dropped, so one a test gave up waiting for does not outlive
/// the test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Nothing is signalled once the process has been waited for.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn sha256(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Deterministic pseudo-random bytes (xorshift), cheap enough for hundreds of MiB.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a file and closes it; Ok only if every call, close() included, succeeded.
#[allow(dead_code)]
pub fn write_closed(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(path.parent().unwrap())?;
    let mut f = File::create(path)?;
    for chunk in data.chunks(65536) {
        f.write_all(chunk)?;
    }
    let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
    // SAFETY: the descriptor was just taken out of the File.
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Checks again every 20 ms until `check` gives a value, for up to `timeout`; `check`
/// says what it is still waiting for, and the last of that is the panic message.
#[allow(dead_code)]
pub fn wait_for<T>(timeout: Duration, check: impl FnMut() -> Result<T, String>) -> T {
    poll(timeout, check).unwrap_or_else(|waiting| panic!("{waiting}"))
}

/// `wait_for` for a caller with something to do when the time runs out: the last thing
/// `check` was waiting for comes back as the error.
#[allow(dead_code)]
pub fn poll<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(waiting) if Instant::now() >= deadline => return Err(waiting),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// What statfs(2) says of the filesystem holding `path`: its type (`f_type`), name length
/// limit, and sizes and free space in blocks of `f_frsize` bytes.
/// Drops the kernel's cached pages of the file at `path`, so that the next read asks the
/// mount (an unchanged file keeps its pages across opens).
pub fn drop_pages(path: &Path) {
    let f = File::open(path).unwrap();
    // SAFETY: a valid descriptor; the advice only drops clean cached pages.
    let rc = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0, "posix_fadvise: {rc}");
}

pub fn statfs(path: &Path) -> libc::statfs {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and out-pointer.
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    st
}

pub fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("no errno in {e}")),
    }
}
