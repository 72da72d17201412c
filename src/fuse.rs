//! The FUSE adapter: turns kernel requests into calls on `BucketFs` and its answers into
//! replies. It decides nothing about semantics. Requests that have to wait (on the network,
//! the disk, a lock) go on as tasks on the tokio runtime, so one slow request never holds up
//! the others.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Waker};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use tokio::runtime::Handle;

use crate::fs::{Attr, BucketFs, FsError, Kind, OpenMode};
use crate::metrics::{FuseMetrics, Metrics};
use crate::passthrough::{Backed, Opened, Passthrough};

/// The extended attribute of the mount's root that holds the mount's metrics, for
/// `s3mediafs status`.
pub const STATUS_XATTR: &str = "user.s3mediafs.status";

/// The largest read the kernel sends, and how far it reads ahead of a sequential reader
/// (see `mount::raise_kernel_readahead`): 1 MiB per request instead of the default 128 KiB
/// makes a sequential read one request per cache block.
pub const KERNEL_READ_SIZE: u32 = 1 << 20;

pub struct FuseAdapter {
    fs: Arc<BucketFs>,
    rt: Handle,
    ttl: Duration,
    negative_ttl: Duration,
    metrics: Arc<Metrics>,
    latency: FuseMetrics,
    passthrough: Arc<Passthrough>,
    /// Writes through write-only handles bypass the kernel's page cache (see
    /// `write_handle_flags`); set at init when the kernel invalidates cached pages that
    /// such a write overlaps.
    direct_writes: bool,
}

impl FuseAdapter {
    pub fn new(
        fs: Arc<BucketFs>,
        rt: Handle,
        metrics: Arc<Metrics>,
        passthrough: Arc<Passthrough>,
    ) -> Self {
        let ttl = fs.options().metadata_ttl;
        let negative_ttl = fs.options().negative_ttl;
        FuseAdapter {
            fs,
            rt,
            ttl,
            negative_ttl,
            latency: metrics.fuse(),
            metrics,
            passthrough,
            direct_writes: false,
        }
    }

    /// The open flags of a handle that writes. A write-only handle bypasses the kernel's
    /// page cache: its writes go to the mount without first being copied into pages that
    /// nobody reads through it, and the file's first read-only open, passed through to the
    /// local copy, has no pages to drop (13–19 ms per 100 MiB written otherwise). A handle
    /// that also reads keeps the page cache, which its reads and shared mmaps need.
    fn write_handle_flags(&self, flags: i32) -> FopenFlags {
        if self.direct_writes && flags & libc::O_ACCMODE == libc::O_WRONLY {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        }
    }

    /// Runs the request `op`; its time to reply is recorded. The request starts on the
    /// thread that received it, so one answered from memory (a read of a buffered block, a
    /// cached attribute) costs no hand-over; if it has to wait, it goes on as a task on the
    /// runtime.
    fn spawn<F>(&self, op: &'static str, f: impl FnOnce(Arc<BucketFs>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let started = Instant::now();
        let latency = self.latency.clone();
        latency.arrived(op);
        let work = f(self.fs.clone());
        let mut task = Box::pin(async move {
            work.await;
            latency.observe(op, started.elapsed());
        });
        let _in_runtime = self.rt.enter();
        let mut cx = Context::from_waker(Waker::noop());
        if task.as_mut().poll(&mut cx).is_pending() {
            // The runtime polls it again at once, with a waker that counts.
            self.rt.spawn(task);
        }
    }
}

/// A failure repeated within this long (the kernel retrying a read, say) is logged once.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Most distinct failures remembered for that.
const FAILURES_REMEMBERED: usize = 10_000;

/// When each failure was last logged, by what failed; at most `capacity` of them.
struct FailureLog {
    logged: Mutex<HashMap<String, Instant>>,
    interval: Duration,
    capacity: usize,
}

impl FailureLog {
    fn new(interval: Duration, capacity: usize) -> Self {
        FailureLog {
            logged: Mutex::new(HashMap::new()),
            interval,
            capacity,
        }
    }

    /// Whether the failure `what`, seen `now`, is worth a log line: it was not logged within
    /// the interval. Failures logged longer ago are forgotten when the log is full; if all
    /// are recent, all are forgotten, so memory stays bounded and no failure goes unlogged.
    fn fresh(&self, what: &str, now: Instant) -> bool {
        let mut logged = self.logged.lock();
        if let Some(at) = logged.get_mut(what) {
            if now.duration_since(*at) < self.interval {
                return false;
            }
            *at = now;
            return true;
        }
        if logged.len() >= self.capacity {
            logged.retain(|_, at| now.duration_since(*at) < self.interval);
            if logged.len() >= self.capacity {
                logged.clear();
            }
        }
        logged.insert(what.to_string(), now);
        true
    }
}

static FAILURES_LOGGED: LazyLock<FailureLog> =
    LazyLock::new(|| FailureLog::new(FAILURE_LOG_INTERVAL, FAILURES_REMEMBERED));

/// The errno the kernel gets for `e`, which request `op` ends with: the one place a failure
/// is logged (at most once in `FAILURE_LOG_INTERVAL`, then at debug level). Answers such as
/// ENOENT are not failures and are not logged.
fn errno(op: &'static str, e: FsError) -> Errno {
    if e.is_failure() {
        if FAILURES_LOGGED.fresh(&e.what(), Instant::now()) {
            tracing::warn!(op, error = %e, "request failed");
        } else {
            tracing::debug!(op, error = %e, "request failed again");
        }
    }
    Errno::from_i32(reply_errno(op, e.errno()))
}

/// The errno the kernel is answered for a failed `op`. ENOSYS to a flush or an fsync tells
/// the kernel the operation is not implemented, and it never sends it again: every later
/// close() or fsync() on the mount would succeed without making anything durable. A
/// failure of those (an ENOSYS from the cache directory's filesystem, say) is answered EIO.
fn reply_errno(op: &str, errno: i32) -> i32 {
    match op {
        "flush" | "fsync" | "fsyncdir" if errno == libc::ENOSYS => libc::EIO,
        _ => errno,
    }
}

fn reply_empty(op: &'static str, reply: ReplyEmpty, result: Result<(), FsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(op, e)),
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: match a.kind {
            Kind::File => FileType::RegularFile,
            Kind::Dir => FileType::Directory,
        },
        perm: a.perm,
        nlink: if a.kind == Kind::Dir { 2 } else { 1 },
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// A negative entry: the kernel remembers that the name does not exist.
fn negative_attr() -> FileAttr {
    let mut a = file_attr(&Attr {
        ino: 0,
        kind: Kind::File,
        size: 0,
        mtime: SystemTime::UNIX_EPOCH,
        perm: 0,
        uid: 0,
        gid: 0,
    });
    a.ino = INodeNo(0);
    a
}

impl fuser::Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // O_TRUNC arrives with open, so truncating a file never downloads it first.
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        // Entries come with their attributes from the listing: no lookup per entry after
        // a readdir. The kernel uses it when lookups follow a listing (`ls -l`, `find`).
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        // Lookups and listings of one directory run side by side: without it the kernel
        // sends them one at a time, and names missing from a directory (each a LIST) queue
        // behind each other, a round trip each.
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // With it the kernel drops the cached pages a direct write overlaps (Linux 6.6 and
        // later), so readers of other handles see the write: write-only handles may then
        // bypass the page cache. (Linux 6.18 was seen to drop them without it too;
        // asking makes it not depend on the kernel's version.)
        self.direct_writes = config
            .add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
            .is_ok();
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(KERNEL_READ_SIZE);
        if self.passthrough.enabled() {
            // Cache files live on an ordinary filesystem, one level below this one.
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) => {
                    let _ = config.set_max_stack_depth(1);
                }
                Err(_) => self
                    .passthrough
                    .disable("the kernel does not offer it (it needs Linux 6.9 or later)"),
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (name, ttl, neg) = (name.to_owned(), self.ttl, self.negative_ttl);
        self.spawn("lookup", |fs| async move {
            match fs.lookup(parent.0, &name).await {
                Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
                Err(e) if e.is(libc::ENOENT) && !neg.is_zero() => {
                    reply.entry(&neg, &negative_attr(), Generation(0))
                }
                Err(e) => reply.error(errno("lookup", e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.ttl;
        self.spawn("getattr", |fs| async move {
            match fs.getattr(ino.0).await {
                Ok(a) => reply.attr(&ttl, &file_attr(&a)),
                Err(e) => reply.error(errno("getattr", e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Owner, mode and times are mount-wide; changing them succeeds and changes nothing,
        // so `cp -a` and `rsync -a` work.
        let ttl = self.ttl;
        // truncate(2) by path changes the file as an open for writing would: refused while
        // it is passed through, and no open is passed through meanwhile. (A handle's
        // ftruncate comes from an open for writing, which holds such a place already.)
        let by_path = size.is_some() && fh.is_none();
        let passthrough = self.passthrough.clone();
        if by_path && !passthrough.reserve(ino.0) {
            reply.error(Errno::ETXTBSY);
            return;
        }
        self.spawn("setattr", |fs| async move {
            let r = match size {
                Some(size) => fs.setattr_size(ino.0, size, fh.map(|f| f.0)).await,
                None => fs.getattr(ino.0).await,
            };
            if by_path {
                passthrough.cancel_reserved(ino.0);
            }
            match r {
                Ok(a) => reply.attr(&ttl, &file_attr(&a)),
                Err(e) => reply.error(errno("setattr", e)),
            }
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let (name, ttl) = (name.to_owned(), self.ttl);
        self.spawn("mkdir", |fs| async move {
            match fs.mkdir(parent.0, &name).await {
                Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
                Err(e) => reply.error(errno("mkdir", e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn("unlink", |fs| async move {
            reply_empty("unlink", reply, fs.unlink(parent.0, &name).await)
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn("rmdir", |fs| async move {
            reply_empty("rmdir", reply, fs.rmdir(parent.0, &name).await)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.spawn("rename", |fs| async move {
            reply_empty(
                "rename",
                reply,
                fs.rename(parent.0, &name, newparent.0, &newname, no_replace)
                    .await,
            )
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let passthrough = self.passthrough.clone();
        let write = OpenMode::from_flags(flags.0).write;
        if write {
            let open_flags = self.write_handle_flags(flags.0);
            // Before the open changes anything (O_TRUNC), readers stop being passed through;
            // with one passed through already, the file is refused untouched.
            if !passthrough.reserve(ino.0) {
                reply.error(Errno::ETXTBSY);
                return;
            }
            self.spawn("open", |fs| async move {
                match fs.open(ino.0, flags.0).await {
                    Ok(fh) => {
                        passthrough.bind_reserved(ino.0, fh);
                        reply.opened(FileHandle(fh), open_flags);
                    }
                    Err(e) => {
                        passthrough.cancel_reserved(ino.0);
                        reply.error(errno("open", e));
                    }
                }
            });
            return;
        }
        self.spawn("open", |fs| async move {
            match fs.open(ino.0, flags.0).await {
                Ok(fh) => {
                    let backed = if passthrough.enabled() {
                        fs.passthrough_file(fh, passthrough.backing_content(ino.0))
                            .await
                    } else {
                        Backed::No
                    };
                    let keep_cache = fs.keep_cache(fh);
                    match passthrough.reply_open(reply, ino.0, fh, backed, keep_cache) {
                        Opened::PassedThrough => {}
                        // The cached object held for the kernel would only keep its blocks
                        // from eviction.
                        Opened::ThroughMount => fs.let_go_of_whole(fh),
                        Opened::Refused => {
                            let _ = fs.release(fh).await;
                        }
                    }
                }
                Err(e) => reply.error(errno("open", e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn("read", |fs| async move {
            match fs.read(fh.0, offset, size).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno("read", e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.spawn("write", |fs| async move {
            match fs.write(fh.0, offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno("write", e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.spawn("flush", |fs| async move {
            reply_empty("flush", reply, fs.flush(fh.0).await)
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.passthrough.released(fh.0);
        self.spawn("release", |fs| async move {
            reply_empty("release", reply, fs.release(fh.0).await)
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn("fsync", |fs| async move {
            reply_empty("fsync", reply, fs.fsync(fh.0).await)
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn("readdir", |fs| async move {
            match fs.readdir(fh.0, offset, 512).await {
                Ok(entries) => {
                    for e in entries {
                        let kind = match e.kind {
                            Kind::File => FileType::RegularFile,
                            Kind::Dir => FileType::Directory,
                        };
                        if reply.add(INodeNo(e.ino), e.next_offset, kind, &e.name) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno("readdir", e)),
            }
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.ttl;
        self.spawn("readdirplus", |fs| async move {
            match fs.readdirplus(fh.0, offset, 512).await {
                Ok(entries) => {
                    let sent = entries
                        .iter()
                        .take_while(|(e, a)| {
                            !reply.add(
                                INodeNo(a.ino),
                                e.next_offset,
                                &e.name,
                                &ttl,
                                &file_attr(a),
                                Generation(0),
                            )
                        })
                        .count();
                    // The kernel takes no reference for entries the reply had no room for.
                    fs.release_entries(&entries[sent..]);
                    reply.ok()
                }
                Err(e) => reply.error(errno("readdirplus", e)),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _ds: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn("fsyncdir", |fs| async move {
            reply_empty("fsyncdir", reply, fs.fsyncdir(ino.0).await)
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (name, ttl) = (name.to_owned(), self.ttl);
        let passthrough = self.passthrough.clone();
        let open_flags = self.write_handle_flags(flags);
        // An existing file is kept from readers passed through before the open can truncate
        // it; one passed through already cannot be opened for writing.
        let existing = self.fs.child(parent.0, &name);
        if let Some(ino) = existing {
            if !passthrough.reserve(ino) {
                reply.error(Errno::ETXTBSY);
                return;
            }
        }
        self.spawn("create", |fs| async move {
            let result = fs.create(parent.0, &name, flags).await;
            let opened = match &result {
                Ok((a, fh)) if existing == Some(a.ino) => {
                    passthrough.bind_reserved(a.ino, *fh);
                    true
                }
                Ok((a, fh)) => {
                    if let Some(ino) = existing {
                        passthrough.cancel_reserved(ino);
                    }
                    passthrough.open_through_mount(a.ino, *fh)
                }
                Err(_) => {
                    if let Some(ino) = existing {
                        passthrough.cancel_reserved(ino);
                    }
                    false
                }
            };
            match result {
                Ok((a, fh)) if opened => reply.created(
                    &ttl,
                    &file_attr(&a),
                    Generation(0),
                    FileHandle(fh),
                    open_flags,
                ),
                Ok((_, fh)) => {
                    let _ = fs.release(fh).await;
                    reply.error(Errno::ETXTBSY);
                }
                Err(e) => reply.error(errno("create", e)),
            }
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permissions are mount-wide; with default_permissions the kernel checks them.
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        size: u32,
        reply: fuser::ReplyXattr,
    ) {
        if ino.0 != crate::fs::ROOT || name != STATUS_XATTR {
            // Objects carry no extended attributes.
            reply.error(Errno::from_i32(libc::ENOTSUP));
            return;
        }
        let text = self.metrics.render();
        let len = text.len() as u32;
        if size == 0 {
            reply.size(len);
        } else if size < len {
            reply.error(Errno::from_i32(libc::ERANGE));
        } else {
            reply.data(text.as_bytes());
        }
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::from_i32(libc::ENOTSUP));
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_logged_once_per_interval_and_distinct_failures_each_once() {
        let log = FailureLog::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert!(log.fresh("GET of a", t0));
        assert!(!log.fresh("GET of a", t0 + Duration::from_secs(1)));
        assert!(!log.fresh("GET of a", t0 + Duration::from_secs(9)));
        assert!(log.fresh("GET of b", t0 + Duration::from_secs(9)));
        assert!(log.fresh("GET of a", t0 + Duration::from_secs(10)));
        assert!(!log.fresh("GET of a", t0 + Duration::from_secs(15)));
    }

    #[test]
    fn a_flush_or_fsync_is_never_answered_not_implemented() {
        for (op, errno, answered) in [
            ("flush", libc::ENOSYS, libc::EIO),
            ("fsync", libc::ENOSYS, libc::EIO),
            ("fsyncdir", libc::ENOSYS, libc::EIO),
            ("flush", libc::ENOSPC, libc::ENOSPC),
            ("getxattr", libc::ENOSYS, libc::ENOSYS),
        ] {
            assert_eq!(
                reply_errno(op, errno),
                answered,
                "{op} failing with {errno}"
            );
        }
    }

    #[test]
    fn the_failure_log_stays_bounded_under_a_flood_of_distinct_failures() {
        let log = FailureLog::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        for i in 0..10_000 {
            assert!(log.fresh(&format!("GET of {i}"), t0));
            assert!(log.logged.lock().len() <= 100);
        }
        // Past the interval, old failures make room before anything recent is forgotten.
        let later = t0 + Duration::from_secs(11);
        assert!(log.fresh("GET of x", later));
        assert!(!log.fresh("GET of x", later));
    }
}
