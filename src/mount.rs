//! Mount lifecycle: checks before mounting (mountpoint, cache directory, bucket), running
//! in the foreground or detaching once the mount is ready, and unmounting on a signal.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fuser::{MountOption, SessionACL};

use crate::cache::{BlockCache, CacheLock, Journal, StagedBytes, StagingArea};
use crate::config::{Config, Target};
use crate::fs::BucketFs;
use crate::fuse::FuseAdapter;
use crate::metrics::{Metrics, MountInfo, StateReading};
use crate::passthrough::Passthrough;
use crate::readahead::Readahead;
use crate::store::{MeteredStore, ObjectStore, S3Store, StoreError};
use crate::writeback::WritebackQueue;

/// Set in the environment of the process that serves a background mount.
pub const DAEMON_ENV: &str = "S3MEDIAFS_DAEMON_CHILD";
const READY_LINE: &str = "S3MEDIAFS-READY";

/// Mounts and serves until unmounted. Errors are sentences for the user.
pub fn run(cfg: Config) -> Result<(), String> {
    if !cfg.foreground {
        return detach();
    }
    check_fuse()?;
    check_mountpoint(&cfg.mountpoint, cfg.nonempty, &cfg.target.source())?;
    let lock = prepare_cache_dir(&cfg.cache_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("s3mediafs-worker")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    raise_fd_limit();
    let bucket_check = check_bucket(&rt, &cfg.target);
    let metrics_listener = match cfg.metrics_addr {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .map_err(|e| {
                    format!("cannot serve metrics on {addr}: {e}; choose another --metrics-addr")
                })?,
        ),
        None => None,
    };

    let source = cfg.target.source();
    let metrics = Metrics::for_mount(&MountInfo {
        source: source.clone(),
        endpoint: cfg.target.endpoint_name(),
        mountpoint: cfg.mountpoint.display().to_string(),
        cache_dir: cfg.cache_dir.display().to_string(),
        cache_limit: cfg.cache.max_bytes,
        write_mode: cfg.fs.write_mode.name(),
        objects: format!(
            "storage class {}, encryption {}",
            cfg.target
                .objects
                .storage_class
                .as_deref()
                .unwrap_or("the bucket's"),
            cfg.target.objects.encryption.describe()
        ),
    });
    let store_config = cfg.store_config();
    let attempts = store_config.attempts.clone();
    let s3: Arc<dyn ObjectStore> =
        Arc::new(S3Store::new(&store_config).with_object_options(cfg.target.objects.clone()));
    let store: Arc<dyn ObjectStore> = Arc::new(MeteredStore::new(s3, metrics.store()));
    let cache_err = |e: std::io::Error| {
        format!(
            "cannot use the cache directory {}: {e}",
            cfg.cache_dir.display()
        )
    };
    let staged = Arc::new(StagedBytes::default());
    let blocks =
        Arc::new(BlockCache::open(&cfg.cache_dir, cfg.cache, staged.clone()).map_err(cache_err)?);
    let staging = StagingArea::open(&cfg.cache_dir, staged).map_err(cache_err)?;
    // Changes journaled by an earlier run are queued before anything is served, so nothing
    // can shadow them.
    let (journal, replay) = Journal::open(&cfg.cache_dir).map_err(cache_err)?;
    if let Err(problem) = bucket_check {
        // Work an earlier run acknowledged is served from the cache directory through an
        // outage, and uploads when the endpoint answers; anything else waits for the
        // endpoint (systemd retries).
        if !problem.unreachable || replay.pending.is_empty() {
            return Err(problem.message);
        }
        tracing::warn!(
            changes = replay.pending.len(),
            "{}; mounting anyway to serve the changes an earlier run journaled: they upload \
             once the endpoint answers",
            problem.message
        );
    }
    if replay.torn_bytes > 0 || replay.skipped_regions > 0 {
        tracing::warn!(
            torn_bytes = replay.torn_bytes,
            skipped_regions = replay.skipped_regions,
            skipped_bytes = replay.skipped_bytes,
            "the journal had damaged records, and replay went past them: torn bytes are a \
             record cut short at its end by a crash; skipped regions lay before valid records, \
             and the changes they held are lost"
        );
    }
    let writeback = WritebackQueue::new(
        store.clone(),
        journal,
        replay,
        cfg.writeback.clone(),
        blocks.clone(),
    )
    .map_err(cache_err)?;
    {
        let _rt = rt.enter();
        writeback.start();
    }
    let readahead = Readahead::new(store.clone(), blocks.clone(), cfg.readahead.clone());
    let fs = Arc::new(BucketFs::new(
        store,
        &cfg.target.prefix,
        staging,
        writeback.clone(),
        readahead.clone(),
        cfg.fs.clone(),
    ));
    let passthrough = Arc::new(Passthrough::new(cfg.passthrough));
    {
        let (writeback, fs, passthrough) = (writeback.clone(), fs.clone(), passthrough.clone());
        metrics.set_source(Box::new(move || {
            let b = blocks.stats();
            StateReading {
                cache_bytes: blocks.bytes(),
                staged_bytes: blocks.staged_bytes().get(),
                dirty_bytes: writeback.dirty_bytes(),
                pending_changes: writeback.pending() as u64,
                unrecorded_changes: writeback.unrecorded() as u64,
                read_memory_bytes: readahead.memory_used(),
                cache_hits: b.hits,
                cache_misses: b.misses,
                cache_stored: b.inserted,
                cache_evictions: b.evicted,
                cache_skipped: b.skipped,
                cache_corrupt: b.corrupt,
                passthrough_opens: passthrough.opened(),
                passthrough_checks: b.whole_checks,
                passthrough_open_files: passthrough.open_count(),
                inodes: fs.inode_count() as u64,
                listed_names: fs.listed_names() as u64,
                retries: attempts.retries(),
            }
        }));
    }
    if let Some(listener) = metrics_listener {
        let _rt = rt.enter();
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| format!("cannot serve metrics: {e}"))?;
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving metrics at /metrics");
        rt.spawn(metrics.clone().serve(listener));
    }
    let adapter = FuseAdapter::new(fs, rt.handle().clone(), metrics.clone(), passthrough);
    let mut options = vec![
        MountOption::FSName(source.clone()),
        MountOption::Subtype("s3mediafs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoAtime,
    ];
    if cfg.read_only {
        options.push(MountOption::RO);
    }
    if cfg.default_permissions {
        options.push(MountOption::DefaultPermissions);
    }
    let mut fuse_cfg = fuser::Config::default();
    fuse_cfg.mount_options = options;
    fuse_cfg.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse_cfg.n_threads = Some(4);

    let mut session = fuser::Session::new(adapter, &cfg.mountpoint, &fuse_cfg)
        .map_err(|e| mount_error(&cfg, e))?;
    let mut unmounter = session.unmount_callable();
    let mountpoint = cfg.mountpoint.clone();
    // SIGTERM, SIGINT and SIGHUP, counted for the life of the process: the first unmounts,
    // the second ends the wait for pending uploads that follows an unmount.
    let (signals, _) = tokio::sync::watch::channel(0u32);
    let signals = Arc::new(signals);
    {
        let signals = signals.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let handler = |kind| signal(kind).expect("signal handler");
            let mut term = handler(SignalKind::terminate());
            let mut int = handler(SignalKind::interrupt());
            let mut hup = handler(SignalKind::hangup());
            let mut unmounted = false;
            loop {
                let reason = tokio::select! {
                    _ = term.recv() => "SIGTERM received",
                    _ = int.recv() => "SIGINT received",
                    _ = hup.recv() => "SIGHUP received",
                };
                signals.send_modify(|n| *n += 1);
                if unmounted {
                    tracing::warn!("{reason} again: not waiting for the uploads any longer");
                    continue;
                }
                unmounted = true;
                tracing::info!(mountpoint = %mountpoint.display(), "{reason}: unmounting");
                if let Err(e) = unmounter.unmount() {
                    tracing::warn!(error = %e, "unmount failed (is the mount busy?); detaching it lazily");
                    lazy_unmount(&mountpoint);
                }
            }
        });
    }
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    announce_when_answering(
        cfg.mountpoint.clone(),
        source.clone(),
        cfg.cache_dir.clone(),
        ready_tx,
    );
    {
        let (writeback, source, mountpoint) =
            (writeback.clone(), source.clone(), cfg.mountpoint.clone());
        rt.spawn(async move {
            // Status lines follow READY=1, never precede it.
            if ready_rx.await.is_err() {
                return;
            }
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                let status = serving_status(&source, &mountpoint, &writeback);
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
            }
        });
    }
    let result = match session.run() {
        // The kernel ends the connection with ECONNABORTED rather than ENODEV when it was
        // aborted (which an unmount racing with requests in flight can do): the session is
        // over all the same, and what is pending is uploaded below.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            tracing::info!(mountpoint = %cfg.mountpoint.display(), "the kernel aborted the FUSE connection; the mount is gone");
            Ok(())
        }
        r => r,
    };
    lock.mark_draining();
    let pending = writeback.pending();
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status(&format!(
            "Unmounted; uploading {pending} pending changes ({} bytes) before exiting",
            writeback.dirty_bytes()
        )),
    ]);
    if pending > 0 {
        tracing::info!(
            pending,
            timeout_s = cfg.drain_timeout.as_secs(),
            "unmounted; uploading what is pending"
        );
    }
    // A second signal (Ctrl-C again, with the store down) ends the wait: everything
    // pending is journaled, and the next mount uploads it. (A first one after an unmount
    // by other means, as systemd sends to what is left of a stopped mount unit, does not.)
    let left = rt.block_on(async {
        let mut count = signals.subscribe();
        let drain = writeback.drain(cfg.drain_timeout);
        tokio::pin!(drain);
        tokio::select! {
            left = &mut drain => left,
            _ = count.wait_for(|n| *n >= 2) => writeback.drain(Duration::ZERO).await,
        }
    });
    if left > 0 {
        tracing::warn!(left, cache_dir = %cfg.cache_dir.display(),
            "changes not yet recorded as in the bucket stay journaled; the next mount with this cache directory uploads them");
    }
    tracing::info!(mountpoint = %cfg.mountpoint.display(), "unmounted");
    rt.shutdown_timeout(Duration::from_secs(5));
    result.map_err(|e| format!("the FUSE session ended with an error: {e}"))
}

/// Starts this program again as the serving process, and returns once it reports the mount
/// ready, or with its error.
fn detach() -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let mut cmd = Command::new(exe);
    // The name it was called by too: as `mount.s3mediafs`, the arguments mount(8) adds
    // (-v, -s, -n) are read as a mount helper's.
    if let Some(name) = std::env::args_os().next() {
        cmd.arg0(name);
    }
    cmd.args(std::env::args_os().skip(1))
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: setsid is async-signal-safe; it detaches the server from the terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the mount process: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        match line {
            Ok(l) if l.trim() == READY_LINE => return Ok(()),
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("lost the mount process: {e}"))?;
    Err(format!("the mount failed ({status})"))
}

/// Once the kernel passes requests for `mountpoint` to this process and they are answered,
/// tells whoever waits: the parent of a background mount, and systemd (READY=1) when run
/// as a `Type=notify` service.
fn announce_when_answering(
    mountpoint: PathBuf,
    source: String,
    cache_dir: PathBuf,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    const FUSE_SUPER_MAGIC: libc::c_long = 0x65735546;
    std::thread::Builder::new()
        .name("s3mediafs-ready".into())
        .spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let root = loop {
                if nix_statfs(&mountpoint).is_some_and(|f_type| f_type == FUSE_SUPER_MAGIC) {
                    if let Some(root) = std::fs::metadata(&mountpoint).ok().filter(|m| m.is_dir()) {
                        break root;
                    }
                }
                if std::time::Instant::now() > deadline {
                    tracing::error!(mountpoint = %mountpoint.display(), "the mount did not answer within 60 s");
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            raise_kernel_readahead(&root);
            tracing::info!(source, mountpoint = %mountpoint.display(), cache_dir = %cache_dir.display(), "mounted");
            signal_ready();
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&format!(
                    "Serving {source} on {}",
                    mountpoint.display()
                )),
            ]);
            let _ = ready.send(());
        })
        .expect("spawning a thread");
}

/// Lets the kernel read ahead `KERNEL_READ_SIZE` on the mount whose root is `root`, so a
/// sequential reader costs one request per cache block rather than eight: FUSE mounts start
/// at 128 KiB and only root may raise it (through the mount's entry in /sys/class/bdi).
/// Without it reads are still right, only slower.
fn raise_kernel_readahead(root: &std::fs::Metadata) {
    use std::os::unix::fs::MetadataExt;
    let dev = root.dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    let kib = crate::fuse::KERNEL_READ_SIZE / 1024;
    match std::fs::write(&knob, format!("{kib}\n")) {
        Ok(()) => tracing::debug!(knob, kib, "kernel readahead raised"),
        Err(e) => tracing::info!(
            knob,
            error = %e,
            "cannot raise the kernel's readahead for this mount (it takes root); sequential reads go in 128 KiB requests"
        ),
    }
}

/// The filesystem type of the filesystem holding `path`.
fn nix_statfs(path: &Path) -> Option<libc::c_long> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statfs buffer of the right type.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (r == 0).then_some(st.f_type)
}

/// One line for `systemctl status`.
fn serving_status(source: &str, mountpoint: &Path, writeback: &WritebackQueue) -> String {
    let pending = writeback.pending();
    let uploads = if pending == 0 {
        "all changes are in the bucket".to_string()
    } else {
        format!(
            "{pending} changes waiting for upload ({:.1} MiB)",
            writeback.dirty_bytes() as f64 / (1 << 20) as f64
        )
    };
    format!("Serving {source} on {}; {uploads}", mountpoint.display())
}

/// Tells a waiting parent that the mount is up, then lets go of its pipe.
fn signal_ready() {
    if std::env::var_os(DAEMON_ENV).is_none() {
        return;
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{READY_LINE}");
    let _ = out.flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto stdout with a valid descriptor.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

fn lazy_unmount(mountpoint: &Path) {
    let status = Command::new("fusermount3")
        .arg("-uz")
        .arg(mountpoint)
        .status();
    if !status.is_ok_and(|s| s.success()) {
        if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid C string path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// What mounting needs of the machine: the FUSE device, and for a user other than root the
/// setuid helper that mounts for it.
fn check_fuse() -> Result<(), String> {
    if !Path::new("/dev/fuse").exists() {
        return Err(
            "/dev/fuse is missing: the kernel has no FUSE support, or this container was \
             started without the device; load the module (`modprobe fuse`), or give the \
             container /dev/fuse"
                .to_string(),
        );
    }
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    // Where fuser looks: FUSERMOUNT_PATH, PATH, then the usual directories.
    let found = |name: &str| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/bin", "/usr/bin", "/sbin", "/usr/sbin"].map(PathBuf::from))
            .any(|d| d.join(name).is_file())
    };
    let told = std::env::var_os("FUSERMOUNT_PATH").is_some();
    if !root && !told && !found("fusermount3") && !found("fusermount") {
        return Err(
            "fusermount3 was not found: a user other than root mounts through \
             it; install fuse3 (apt-get install fuse3)"
                .to_string(),
        );
    }
    Ok(())
}

fn mount_error(cfg: &Config, e: std::io::Error) -> String {
    let mp = cfg.mountpoint.display();
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "mounting on {mp} was not permitted ({e}). Mount as root, or install fuse3 so the \
             setuid fusermount3 helper can mount for you; with allow_other as a normal user, \
             enable user_allow_other in /etc/fuse.conf"
        ),
        Some(libc::ENOENT) if e.to_string().contains("fusermount") => format!(
            "cannot mount {mp}: fusermount3 was not found. Install fuse3 (apt-get install fuse3)"
        ),
        Some(libc::ENODEV) => format!(
            "cannot mount {mp}: the kernel has no FUSE support (/dev/fuse is missing); \
             load it with `modprobe fuse`"
        ),
        _ => format!("cannot mount {mp}: {e}"),
    }
}

/// The mountpoint must exist, be a directory, not be mounted already (an automount
/// trigger excepted: this mount goes on top of it) and, unless `nonempty`, be empty. The
/// dead mount of an s3mediafs process of the same `source` that ended without unmounting
/// (killed, out of memory) is detached first: what it acknowledged is in its journal, and a
/// service restarted after the crash must not fail on it forever.
pub fn check_mountpoint(p: &Path, nonempty: bool, source: &str) -> Result<(), String> {
    let dead = std::fs::metadata(p).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN));
    if dead && dead_mount_is_ours(p, source) {
        tracing::warn!(mountpoint = %p.display(),
            "the mountpoint holds the dead mount of an s3mediafs process that ended without unmounting; detaching it (the changes it acknowledged are resumed from its journal)");
        lazy_unmount(p);
    }
    let shown = p.display();
    let meta = match std::fs::metadata(p) {
        Ok(m) => m,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(format!(
                "{shown} is a dead FUSE mount (transport endpoint is not connected); \
                 clear it with `fusermount3 -u {shown}` (or `umount -l {shown}`) and mount again"
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "the mountpoint {shown} does not exist; create it with `mkdir -p {shown}`"
            ))
        }
        Err(e) => return Err(format!("cannot use the mountpoint {shown}: {e}")),
    };
    if !meta.is_dir() {
        return Err(format!("the mountpoint {shown} is not a directory"));
    }
    let canonical = std::fs::canonicalize(p).map_err(|e| format!("cannot resolve {shown}: {e}"))?;
    match mounted_at(&canonical) {
        // systemd's automount (`x-systemd.automount` in fstab) holds the mountpoint with an
        // autofs trigger until the first access, then runs this mount on top of it. The
        // trigger's directory is empty, and reading it would wait for this very mount.
        Some((fstype, _)) if mounts_over(&fstype) => return Ok(()),
        Some((fstype, source)) => {
            return Err(format!(
                "{shown} is already a mount point ({fstype} from {source}); unmount it first or \
                 choose another directory"
            ))
        }
        None => {}
    }
    if !nonempty {
        let mut entries = std::fs::read_dir(p).map_err(|e| format!("cannot read {shown}: {e}"))?;
        if entries.next().is_some() {
            return Err(format!(
                "the mountpoint {shown} is not empty, and mounting would hide its files; \
                 empty it, or pass -o nonempty if that is intended"
            ));
        }
    }
    Ok(())
}

/// Whether the mount at `p` (which no process serves) is an s3mediafs mount of `source`:
/// of type `fuse.s3mediafs` (mounted through fusermount3) or plain `fuse` (by root).
fn dead_mount_is_ours(p: &Path, source: &str) -> bool {
    // The directory holding it resolved (it can be), the mountpoint itself not (it fails).
    let resolved = match (p.parent(), p.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
        .map(|d| d.join(name)),
        _ => std::path::absolute(p),
    };
    resolved
        .ok()
        .and_then(|abs| mounted_at(&abs))
        .is_some_and(|(fstype, from)| {
            (fstype == "fuse.s3mediafs" || fstype == "fuse") && from == source
        })
}

/// Whether a mount of type `fstype` at the mountpoint is one to mount over: an automount
/// trigger, which stands for this very mount.
fn mounts_over(fstype: &str) -> bool {
    fstype == "autofs"
}

/// The type and source of the mount at exactly `path`, if there is one.
fn mounted_at(path: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let mp = unescape_mountinfo(fields.get(4)?);
        if mp != want {
            return None;
        }
        let sep = fields.iter().position(|f| *f == "-")?;
        Some((
            fields.get(sep + 1)?.to_string(),
            unescape_mountinfo(fields.get(sep + 2)?),
        ))
    })
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates the cache directory (mode 0700) and locks it for this mount. An existing one must
/// belong to the mounting user and be writable by nobody else: whoever can write there can
/// plant files this mount would upload as the user's media.
fn prepare_cache_dir(dir: &Path) -> Result<CacheLock, String> {
    crate::cache::create_dir_durably(dir).map_err(|e| {
        format!(
            "cannot create the cache directory {}: {e}; choose another with --cache-dir",
            dir.display()
        )
    })?;
    check_cache_dir(dir)?;
    CacheLock::acquire(dir)
}

/// Refuses a cache directory that is a symlink, belongs to another user, or that its group
/// or others can write.
fn check_cache_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot read the cache directory {}: {e}", dir.display()))?;
    let uid = unsafe { libc::geteuid() };
    let problem = if meta.file_type().is_symlink() {
        Some("is a symbolic link".to_string())
    } else if meta.uid() != uid {
        Some(format!(
            "belongs to uid {}, not to the mounting user (uid {uid})",
            meta.uid()
        ))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "can be written by its group or by others (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match problem {
        Some(p) => Err(format!(
            "the cache directory {} {p}; anyone who can write there can change what is uploaded: \
             use a directory of your own with mode 0700 (--cache-dir)",
            dir.display()
        )),
        None => Ok(()),
    }
}

/// One cheap request that proves the endpoint answers, the credentials work and the bucket
/// exists.
/// Why the bucket check failed, in one sentence, and whether the endpoint merely did not
/// answer (an outage) rather than refused.
pub struct BucketProblem {
    pub message: String,
    pub unreachable: bool,
}

impl From<BucketProblem> for String {
    fn from(p: BucketProblem) -> String {
        p.message
    }
}

/// Raises the soft limit on open files to the hard one: a mount serves many readers, and
/// systemd gives services a soft limit of 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    let old = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        tracing::info!(
            from = old,
            to = lim.rlim_max,
            "raised the open-file limit to the hard limit"
        );
    }
}

/// With a storage class or encryption asked for, writes, reads back and deletes a small
/// object the way every object will be written, so a store that refuses them (an unknown
/// class, a KMS key it cannot use, SSE-C it does not offer) says so now, not at the first
/// upload.
fn check_object_options(
    rt: &tokio::runtime::Runtime,
    store: &S3Store,
    cfg: &Target,
) -> Result<(), BucketProblem> {
    let o = &cfg.objects;
    if o.storage_class.is_none() && matches!(o.encryption, crate::store::Encryption::Bucket) {
        return Ok(());
    }
    // Named for this process and moment, so two mounts starting together do not meet.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let key = format!(
        "{}.s3mediafs-preflight-{}-{stamp}",
        cfg.prefix,
        std::process::id()
    );
    let r = rt.block_on(async {
        store
            .put(&key, bytes::Bytes::from_static(b"s3mediafs"))
            .await?;
        store.head(&key).await?;
        store.delete(&key).await
    });
    r.map_err(|e| BucketProblem {
        message: format!(
            "the store refused an object written with storage class {} and encryption {} ({e}); \
             check that the bucket and the store offer them, and the key",
            o.storage_class.as_deref().unwrap_or("(the bucket's)"),
            o.encryption.describe()
        ),
        unreachable: matches!(e, StoreError::Unreachable(_)),
    })
}

pub fn check_bucket(rt: &tokio::runtime::Runtime, cfg: &Target) -> Result<(), BucketProblem> {
    let mut sc = cfg.store_config();
    sc.max_attempts = 2;
    sc.attempt_timeout = Duration::from_secs(10);
    let store = S3Store::new(&sc).with_object_options(cfg.objects.clone());
    let endpoint = cfg.endpoint_name();
    let b = &cfg.bucket;
    let r = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(30),
            store.list(&cfg.prefix, false, None, Some(1)),
        )
        .await
    });
    let unreachable = matches!(r, Err(_) | Ok(Err(StoreError::Unreachable(_))));
    let message = match r {
        Ok(Ok(_)) => return check_object_options(rt, &store, cfg),
        Err(_) => format!(
            "the S3 endpoint {endpoint} did not answer within 30 s; check --endpoint and the network"
        ),
        Ok(Err(e)) => match e {
            StoreError::Unreachable(d) => format!(
                "cannot reach the S3 endpoint ({d}); check --endpoint and that the server is running"
            ),
            StoreError::BadCredentials(m) => format!(
                "the S3 endpoint {endpoint} rejected the credentials from {} ({m}); check the \
                 access key and secret",
                cfg.credentials.source
            ),
            StoreError::AccessDenied(m) => format!(
                "access to bucket '{b}' was denied ({m}); check that the key may list, read and \
                 write it"
            ),
            StoreError::NoSuchBucket(_) | StoreError::NotFound => format!(
                "the bucket '{b}' does not exist at {endpoint}; create it first, or check the \
                 name and --region"
            ),
            other => format!("checking the bucket '{b}' at {endpoint} failed: {other}"),
        },
    };
    Err(BucketProblem {
        message,
        unreachable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_automount_trigger_is_mounted_over_and_other_mounts_refused() {
        assert!(mounts_over("autofs"));
        for other in ["fuse.s3mediafs", "fuse", "tmpfs", "ext4", "nfs4"] {
            assert!(!mounts_over(other), "{other}");
        }
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/x\\134y\\011"), "/x\\y\t");
        assert_eq!(unescape_mountinfo("/odd\\777"), "/odd\u{fffd}");
        assert_eq!(unescape_mountinfo("/trailing\\04"), "/trailing\\04");
    }
}
