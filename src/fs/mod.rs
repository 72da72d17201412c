//! Filesystem semantics over an object store, independent of FUSE: lookups, directories
//! implied by key prefixes, file handles backed by staged copies, and the errnos POSIX
//! callers expect. `crate::fuse` only translates kernel requests into calls on `BucketFs`.

mod dir;
mod error;
mod file;
mod inode;
mod listing;
pub mod names;
mod subtree;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use crate::cache::{BlockCache, StagingArea};
use crate::readahead::Readahead;
use crate::store::{ObjectStore, StoreError};
use crate::writeback::{Pending, WritebackQueue};

pub use dir::DirEntry;
pub use error::{FsError, FsResult};
use inode::{InodeTable, Remote};
pub use inode::{Kind, ROOT};
use listing::{Answer, ListingCache};
use names::KeyMap;

/// Settings of the filesystem layer.
#[derive(Debug, Clone)]
pub struct FsOptions {
    pub uid: u32,
    pub gid: u32,
    pub file_mode: u16,
    pub dir_mode: u16,
    /// How long attributes and listings are trusted before asking the bucket again.
    pub metadata_ttl: Duration,
    /// How long the kernel may remember that a name does not exist.
    pub negative_ttl: Duration,
    /// `close()` waits until the file is in the bucket, instead of returning once it is
    /// journaled on local disk.
    pub write_through: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
            metadata_ttl: Duration::from_secs(10),
            negative_ttl: Duration::from_secs(2),
            write_through: false,
        }
    }
}

/// Attributes of one file or directory, as `stat` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
}

/// What pending changes say about a name.
enum PendingAnswer {
    Present(Remote),
    Deleted,
    Nothing,
}

/// Most names remembered from listings (about 160 bytes each) for the metadata TTL.
const LISTED_NAMES: usize = 200_000;
/// Keys a lookup lists to tell whether a directory exists.
const DIR_PROBE: i32 = 10;
/// Most distinct keys warned about once.
const WARNED_CAPACITY: usize = 10_000;
/// Stripes of the per-file commit lock.
const COMMIT_LOCKS: u64 = 64;
/// A failure of the same request is logged at most once in this long.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

pub struct BucketFs {
    store: Arc<dyn ObjectStore>,
    keys: KeyMap,
    opts: FsOptions,
    table: Mutex<InodeTable>,
    listing: ListingCache,
    staging: StagingArea,
    writeback: Arc<WritebackQueue>,
    readahead: Arc<Readahead>,
    files: file::FileHandles,
    dirs: dir::DirHandles,
    warned: Mutex<HashSet<String>>,
    /// When a failed request was last logged, by operation and key: a failure repeated
    /// within `FAILURE_LOG_INTERVAL` (the kernel retrying a read, say) is logged once.
    failures_logged: Mutex<HashMap<(String, String), Instant>>,
    /// Commits of one file never interleave (a FLUSH can come from any process holding a
    /// copy of the descriptor, e.g. a child between fork and exec, while the owner writes
    /// and closes): locks striped by inode number.
    commit_locks: Vec<tokio::sync::Mutex<()>>,
    mount_time: SystemTime,
    /// Until when lookups answer from local knowledge because the store is unreachable.
    offline_until: Mutex<Option<Instant>>,
}

/// How long lookups stop asking an unreachable store before trying it again.
const OFFLINE_GRACE: Duration = Duration::from_secs(5);

impl BucketFs {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        staging: StagingArea,
        writeback: Arc<WritebackQueue>,
        readahead: Arc<Readahead>,
        opts: FsOptions,
    ) -> Self {
        let mount_time = SystemTime::now();
        let listing = ListingCache::new(opts.metadata_ttl, opts.negative_ttl, LISTED_NAMES);
        BucketFs {
            store,
            keys: KeyMap::new(prefix),
            opts,
            table: Mutex::new(InodeTable::new(mount_time)),
            listing,
            staging,
            writeback,
            readahead,
            files: Default::default(),
            dirs: Default::default(),
            warned: Mutex::new(HashSet::new()),
            failures_logged: Mutex::new(HashMap::new()),
            commit_locks: (0..COMMIT_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            mount_time,
            offline_until: Mutex::new(None),
        }
    }

    pub fn options(&self) -> &FsOptions {
        &self.opts
    }

    fn blocks(&self) -> &Arc<BlockCache> {
        self.readahead.blocks()
    }

    /// Names remembered from directory listings.
    pub fn listed_names(&self) -> usize {
        self.listing.len()
    }

    /// The inode of `name` in `parent`, if this mount knows it (no request is made).
    pub fn child(&self, parent: u64, name: &std::ffi::OsStr) -> Option<u64> {
        let name = names::component(name).ok()?;
        let t = self.table.lock();
        t.child(parent, name)
            .filter(|ino| t.get(*ino).is_some_and(|i| !i.unlinked))
    }

    /// Number of inodes currently held.
    pub fn inode_count(&self) -> usize {
        self.table.lock().len()
    }

    fn attr_of(&self, i: &inode::Inode) -> Attr {
        Attr {
            ino: i.ino,
            kind: i.kind,
            size: if i.kind == Kind::File { i.size } else { 0 },
            mtime: if i.kind == Kind::Dir && i.mtime == SystemTime::UNIX_EPOCH {
                self.mount_time
            } else {
                i.mtime
            },
            perm: if i.kind == Kind::File {
                self.opts.file_mode
            } else {
                self.opts.dir_mode
            },
            uid: self.opts.uid,
            gid: self.opts.gid,
        }
    }

    /// Logs a problem with one key once per mount, however often it is met.
    fn warn_once(&self, key: &str, what: &str) {
        let mut warned = self.warned.lock();
        if warned.len() < WARNED_CAPACITY && warned.insert(key.to_string()) {
            tracing::warn!(key, "{what}");
        }
    }

    /// The path of a directory inode, checking it is one.
    fn dir_path(&self, ino: u64) -> FsResult<String> {
        let t = self.table.lock();
        let i = t.get(ino).ok_or(FsError::NOENT)?;
        if i.kind != Kind::Dir {
            return Err(FsError::NOTDIR);
        }
        if i.unlinked {
            return Err(FsError::NOENT);
        }
        Ok(i.path.clone())
    }

    /// What `path` is: the write-back queue's pending changes first, then the bucket. One
    /// flat LIST of the key as a prefix answers both questions: the key itself is the file,
    /// keys under `path/` make it a directory, and those keys (up to a page) fill the
    /// listings of the directories under it, so a walk that goes on below costs nothing more.
    async fn resolve(&self, path: &str) -> FsResult<Option<Remote>> {
        let key = self.keys.file_key(path)?;
        let dir_prefix = self.keys.dir_prefix(path);
        let (pending, file_pending, under) = self.resolve_pending(&key, &dir_prefix);
        if pending.is_some() {
            return Ok(pending);
        }
        let deleted: HashSet<String> = under.into_iter().map(|(k, _)| k).collect();
        let file_deleted = matches!(file_pending, Some(Pending::Delete));
        let (id, began) = self.listing.begin();
        let page = match self.store.list(&key, true, None, Some(dir::PAGE)).await {
            Err(e @ StoreError::Unreachable(_)) => {
                self.go_offline(&e);
                return Err(FsError::OFFLINE);
            }
            other => other.map_err(|e| self.store_error("LIST", &key, e))?,
        };
        let file = page
            .objects
            .iter()
            .find(|o| o.key == key && !file_deleted)
            .cloned();
        let below: Vec<&crate::store::ObjectMeta> = page
            .objects
            .iter()
            .filter(|o| o.key.starts_with(&dir_prefix))
            .collect();
        // Keys are sorted: past the last key under `path/`, every directory below is whole.
        let whole = page.next_token.is_none()
            || page
                .objects
                .last()
                .is_some_and(|o| o.key > dir_prefix && !o.key.starts_with(&dir_prefix));
        let mut tree = subtree::Subtree::new(path, &dir_prefix, self.mount_time);
        tree.feed(below.iter().copied());
        if whole {
            tree.finish();
        }
        self.record_subtree(&mut tree, &dir_prefix, id, began);
        let mut is_dir = below.iter().any(|o| !deleted.contains(&o.key));
        let mut marker = below.first().filter(|o| o.key == dir_prefix).map(|o| o.last_modified);
        if !is_dir && !whole {
            if below.is_empty() {
                // A page of keys that sort before `path/` (`path.jpg`, ...): ask about the
                // directory alone.
                let probe = self
                    .store
                    .list(&dir_prefix, true, None, Some(DIR_PROBE))
                    .await
                    .map_err(|e| self.store_error("LIST", &dir_prefix, e))?;
                is_dir = probe.objects.iter().any(|o| !deleted.contains(&o.key))
                    || (probe.next_token.is_some() && !probe.objects.is_empty());
                marker = probe
                    .objects
                    .first()
                    .filter(|o| o.key == dir_prefix)
                    .map(|o| o.last_modified);
            } else {
                // Every key seen is being deleted, but more may follow.
                is_dir = true;
            }
        }
        let dir = Remote {
            kind: Kind::Dir,
            size: 0,
            // A marker object's date is the directory's; an implied directory shows the mount's.
            mtime: marker.unwrap_or(self.mount_time),
            etag: None,
        };
        match file {
            Some(_) if is_dir => {
                self.warn_once(
                    &key,
                    "both a file and a directory have this name; showing the directory",
                );
                Ok(Some(dir))
            }
            Some(meta) => Ok(Some(Remote {
                kind: Kind::File,
                size: meta.size,
                mtime: meta.last_modified,
                etag: meta.etag,
            })),
            None if is_dir => Ok(Some(dir)),
            None => Ok(None),
        }
    }

    /// Records the listings a flat LIST of `prefix` completed, and logs the keys it could not
    /// show. Names being deleted are left out, as a listing page by page leaves them out.
    fn record_subtree(
        &self,
        tree: &mut subtree::Subtree,
        prefix: &str,
        id: listing::ListingId,
        began: Instant,
    ) {
        for key in tree.take_skipped() {
            self.warn_once(&key, "this key cannot be shown as a path and is skipped");
        }
        let complete = tree.take_complete();
        if !tree.exists() || complete.is_empty() {
            return;
        }
        let deleted: HashSet<String> = self
            .writeback
            .under(prefix)
            .into_iter()
            .filter(|(_, p)| matches!(p, Pending::Delete))
            .map(|(k, _)| k)
            .collect();
        for (dir, mut names) in complete {
            if !deleted.is_empty() {
                let dir_prefix = self.keys.dir_prefix(&dir);
                names.retain(|(name, r)| {
                    let slash = if r.kind == Kind::Dir { "/" } else { "" };
                    !deleted.contains(&format!("{dir_prefix}{name}{slash}"))
                });
            }
            self.listing.record(&dir, id, began, names);
        }
    }

    /// What the write-back queue alone says `key` (a file) or `dir_prefix` (a directory)
    /// is; also returns the pending changes it looked at, for `resolve`.
    fn resolve_pending(
        &self,
        key: &str,
        dir_prefix: &str,
    ) -> (Option<Remote>, Option<Pending>, Vec<(String, Pending)>) {
        let file_pending = self.writeback.lookup(key);
        if let Some(Pending::Upload { size, .. }) = &file_pending {
            let r = Remote {
                kind: Kind::File,
                size: *size,
                mtime: SystemTime::now(),
                etag: None,
            };
            return (Some(r), file_pending, Vec::new());
        }
        let under = self.writeback.under(dir_prefix);
        if under.iter().any(|(_, p)| !matches!(p, Pending::Delete)) {
            let r = Remote {
                kind: Kind::Dir,
                size: 0,
                mtime: self.mount_time,
                etag: None,
            };
            return (Some(r), file_pending, under);
        }
        (None, file_pending, under)
    }

    fn is_offline(&self) -> bool {
        self.offline_until
            .lock()
            .is_some_and(|t| Instant::now() < t)
    }

    /// The store did not answer: for a while, lookups answer from what is known locally
    /// (names not known locally read as absent), while uploads keep retrying.
    fn go_offline(&self, e: &StoreError) {
        let mut until = self.offline_until.lock();
        if until.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(error = %e, grace_s = OFFLINE_GRACE.as_secs(),
                "the object store is unreachable; lookups answer from local knowledge and writes are kept locally until it is back");
        }
        *until = Some(Instant::now() + OFFLINE_GRACE);
    }

    /// Logs a store failure once, in one line, and turns it into an errno.
    fn store_error(&self, op: &str, key: &str, e: StoreError) -> FsError {
        if e != StoreError::NotFound {
            let now = Instant::now();
            let fresh = {
                let mut logged = self.failures_logged.lock();
                if logged.len() >= WARNED_CAPACITY {
                    logged.retain(|_, at| now.duration_since(*at) < FAILURE_LOG_INTERVAL);
                }
                let k = (op.to_string(), key.to_string());
                match logged.get(&k) {
                    Some(at) if now.duration_since(*at) < FAILURE_LOG_INTERVAL => false,
                    _ => {
                        logged.insert(k, now);
                        true
                    }
                }
            };
            if fresh {
                tracing::warn!(op, key, error = %e, "request to the object store failed");
            } else {
                tracing::debug!(op, key, error = %e, "request to the object store failed again");
            }
        }
        FsError::from(e)
    }

    /// Finds `name` in directory `parent`: from the inode table or a fresh listing when
    /// possible, else from the bucket. Does not take a kernel reference.
    async fn find(&self, parent: u64, name: &str) -> FsResult<Option<u64>> {
        let dir = self.dir_path(parent)?;
        let path = names::join(&dir, name);
        self.keys.file_key(&path)?;
        let ttl = self.opts.metadata_ttl;
        {
            let t = self.table.lock();
            if let Some(ino) = t.child(parent, name) {
                let i = t.get(ino).expect("child is live");
                if i.is_fresh(ttl) || i.open > 0 && i.kind == Kind::File && !i.in_bucket {
                    return Ok(Some(ino));
                }
            }
        }
        match self
            .listing
            .lookup(&dir, name, &path, |at| self.landed_since(&path, at))
        {
            Answer::Present(remote, at) => {
                let mut t = self.table.lock();
                return Ok(match self.pending_answer(&path)? {
                    PendingAnswer::Present(r) => {
                        Some(t.upsert_remote(parent, name, path, &r, Instant::now()))
                    }
                    PendingAnswer::Deleted if remote.kind == Kind::File => {
                        self.absent(&mut t, parent, name)
                    }
                    _ => Some(t.upsert_remote(parent, name, path, &remote, at)),
                });
            }
            Answer::Absent => {
                return self.find_locally(&mut self.table.lock(), parent, name, path, true)
            }
            Answer::Unknown => {}
        }
        let remote = if self.is_offline() {
            Err(FsError::OFFLINE)
        } else {
            self.resolve(&path).await
        };
        let remote = match remote {
            Err(FsError::OFFLINE) => {
                return self.find_locally(&mut self.table.lock(), parent, name, path, false)
            }
            other => other?,
        };
        // What the bucket just said is newer than the listing of the directory.
        self.listing.saw(&dir, name, remote.as_ref());
        let mut t = self.table.lock();
        // A local file created while the bucket was asked wins over the bucket's answer.
        if let Some(ino) = t.child(parent, name) {
            let i = t.get(ino).expect("child is live");
            if i.staged.is_some() || (!i.in_bucket && i.kind == Kind::File) {
                return Ok(Some(ino));
            }
        }
        match remote {
            Some(r) => Ok(Some(t.upsert_remote(
                parent,
                name,
                path,
                &r,
                Instant::now(),
            ))),
            None => {
                self.listing.note_absent(&path);
                Ok(self.absent(&mut t, parent, name))
            }
        }
    }

    /// `parent/name` does not exist in the bucket: forgets what the table knew of it.
    fn absent(&self, t: &mut InodeTable, parent: u64, name: &str) -> Option<u64> {
        if let Some(ino) = t.child(parent, name) {
            t.detach(ino);
        }
        None
    }

    /// Whether a change to `path` (as a file, or anything under it as a directory) reached
    /// the bucket at or after `at`.
    fn landed_since(&self, path: &str, at: Instant) -> bool {
        let dir = self.keys.dir_prefix(path);
        match self.keys.file_key(path) {
            Ok(file) => self.writeback.landed_since(&[&file, &dir], at),
            Err(_) => self.writeback.landed_since(&[&dir], at),
        }
    }

    /// What the write-back queue says about `path`, for answers taken from a listing.
    fn pending_answer(&self, path: &str) -> FsResult<PendingAnswer> {
        let key = self.keys.file_key(path)?;
        Ok(
            match self.resolve_pending(&key, &self.keys.dir_prefix(path)) {
                (Some(r), _, _) => PendingAnswer::Present(r),
                (None, Some(Pending::Delete), _) => PendingAnswer::Deleted,
                _ => PendingAnswer::Nothing,
            },
        )
    }

    /// Finds `name` without asking the bucket: pending changes answer, and names that exist
    /// only locally stay. Other names the table knows stay too, unless `bucket_lacks_it`
    /// (a fresh complete listing says so); anything else reads as absent.
    fn find_locally(
        &self,
        t: &mut InodeTable,
        parent: u64,
        name: &str,
        path: String,
        bucket_lacks_it: bool,
    ) -> FsResult<Option<u64>> {
        if let PendingAnswer::Present(r) = self.pending_answer(&path)? {
            return Ok(Some(t.upsert_remote(
                parent,
                name,
                path,
                &r,
                Instant::now(),
            )));
        }
        let Some(ino) = t.child(parent, name) else {
            return Ok(None);
        };
        let i = t.get(ino).expect("child is live");
        let local_only = i.staged.is_some() || !i.in_bucket;
        if bucket_lacks_it && !local_only {
            return Ok(self.absent(t, parent, name));
        }
        Ok(Some(ino))
    }

    /// Records in the listing of its directory that this mount made `path` what `remote` says.
    fn note_present(&self, path: &str, remote: &Remote) {
        let (dir, name) = names::split(path);
        self.listing.note_present(dir, name, path, remote);
    }

    /// Takes a kernel reference on `ino` and returns its attributes.
    fn remember(&self, ino: u64) -> FsResult<Attr> {
        let mut t = self.table.lock();
        let i = t.get_mut(ino).ok_or(FsError::NOENT)?;
        i.lookups += 1;
        let i = t.get(ino).expect("live");
        Ok(self.attr_of(i))
    }

    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = names::component(name)?;
        match self.find(parent, name).await? {
            Some(ino) => self.remember(ino),
            None => Err(FsError::NOENT),
        }
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.table.lock().forget(ino, n);
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let path = {
            let t = self.table.lock();
            let i = t.get(ino).ok_or(FsError::NOENT)?;
            if i.kind == Kind::Dir
                || i.is_fresh(self.opts.metadata_ttl)
                || i.unlinked
                || !i.in_bucket
            {
                return Ok(self.attr_of(i));
            }
            i.path.clone()
        };
        let key = self.keys.file_key(&path)?;
        // What the bucket holds, and when that was seen.
        let found = match self.writeback.lookup(&key) {
            Some(Pending::Upload { size, .. }) => {
                let mut t = self.table.lock();
                let i = t.get_mut(ino).ok_or(FsError::NOENT)?;
                if i.staged.is_none() {
                    i.size = size;
                }
                return Ok(self.attr_of(i));
            }
            Some(Pending::Delete) => Err(StoreError::NotFound),
            _ if self.is_offline() => return self.attr(ino),
            _ => {
                // A fresh listing of the directory knows the file too.
                let (dir, name) = names::split(&path);
                match self
                    .listing
                    .lookup(dir, name, &path, |at| self.landed_since(&path, at))
                {
                    Answer::Present(r, at) if r.kind == Kind::File => Ok((r, at)),
                    _ => self.store.head(&key).await.map(|meta| {
                        let remote = Remote {
                            kind: Kind::File,
                            size: meta.size,
                            mtime: meta.last_modified,
                            etag: meta.etag,
                        };
                        (remote, Instant::now())
                    }),
                }
            }
        };
        if let Err(e @ StoreError::Unreachable(_)) = &found {
            self.go_offline(e);
            return self.attr(ino);
        }
        match found {
            Ok((remote, seen)) => {
                let mut t = self.table.lock();
                let i = t.get_mut(ino).ok_or(FsError::NOENT)?;
                if i.staged.is_none() && i.path == path {
                    i.take_remote(&remote, seen);
                }
                Ok(self.attr_of(t.get(ino).expect("live")))
            }
            Err(StoreError::NotFound) => {
                let mut t = self.table.lock();
                if t.get(ino)
                    .is_some_and(|i| i.staged.is_none() && i.path == path)
                {
                    t.detach(ino);
                }
                Err(FsError::NOENT)
            }
            Err(e) => Err(self.store_error("HEAD", &key, e)),
        }
    }

    pub async fn mkdir(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = names::component(name)?;
        if self.find(parent, name).await?.is_some() {
            return Err(FsError::EXIST);
        }
        let path = names::join(&self.dir_path(parent)?, name);
        let marker = self.keys.dir_prefix(&path);
        if marker.len() > names::MAX_KEY {
            return Err(FsError::NAMETOOLONG);
        }
        self.queue(self.writeback.marker(&marker))?;
        // `find` just said nothing had this name: the directory starts out empty.
        self.listing.created_dir(&path);
        let remote = Remote {
            kind: Kind::Dir,
            size: 0,
            mtime: SystemTime::now(),
            etag: None,
        };
        self.note_present(&path, &remote);
        let ino = {
            let mut t = self.table.lock();
            let i = t.insert(parent, name, path, Kind::Dir);
            i.in_bucket = true;
            i.ino
        };
        self.remember(ino)
    }

    pub async fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let name = names::component(name)?;
        let ino = self.find(parent, name).await?.ok_or(FsError::NOENT)?;
        let (path, in_bucket, needs_copy) = {
            let t = self.table.lock();
            let i = t.get(ino).ok_or(FsError::NOENT)?;
            if i.kind == Kind::Dir {
                return Err(FsError::ISDIR);
            }
            (
                i.path.clone(),
                i.in_bucket,
                i.open > 0 && i.staged.is_none() && i.in_bucket,
            )
        };
        if needs_copy {
            // Open handles keep reading the content after the object is gone.
            self.materialize(ino).await?;
        }
        if in_bucket {
            self.queue(self.writeback.delete(&self.keys.file_key(&path)?))?;
        }
        self.removed(parent, name, ino, &path).await
    }

    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let name = names::component(name)?;
        let ino = self.find(parent, name).await?.ok_or(FsError::NOENT)?;
        let path = {
            let t = self.table.lock();
            let i = t.get(ino).ok_or(FsError::NOENT)?;
            if i.kind != Kind::Dir {
                return Err(FsError::NOTDIR);
            }
            if !t.local_children(ino).is_empty() {
                return Err(FsError::NOTEMPTY);
            }
            i.path.clone()
        };
        if !self.dir_is_empty(&path).await? {
            return Err(FsError::NOTEMPTY);
        }
        self.queue(self.writeback.delete(&self.keys.dir_prefix(&path)))?;
        self.listing.forget_dir(&path);
        self.removed(parent, name, ino, &path).await
    }

    /// Forgets `parent/name` after its object or marker was deleted, keeping `parent`.
    async fn removed(&self, parent: u64, name: &str, ino: u64, path: &str) -> FsResult<()> {
        {
            let mut t = self.table.lock();
            if t.child(parent, name) == Some(ino) {
                t.detach(ino);
            }
        }
        let (dir, _) = names::split(path);
        self.listing.note_removed(dir, name, path);
        self.keep_dir(parent).await
    }

    /// Whether nothing but its own marker lies under directory `path`, counting changes
    /// still in the write-back queue: from a fresh complete listing when there is one (and
    /// nothing this mount added under it landed since), else from the bucket.
    async fn dir_is_empty(&self, path: &str) -> FsResult<bool> {
        let marker = &self.keys.dir_prefix(path);
        let mut deleted = HashSet::new();
        for (key, p) in self.writeback.under(marker) {
            match p {
                Pending::Delete => {
                    deleted.insert(key);
                }
                _ if key == *marker => {}
                _ => return Ok(false),
            }
        }
        if let Some(c) = self.listing.contents(path) {
            if c.complete && !self.writeback.landed_since(&[marker], c.at) {
                return Ok(!c.any);
            }
        }
        let mut token = None;
        loop {
            let page = self
                .store
                .list(marker, true, token, Some(100))
                .await
                .map_err(|e| self.store_error("LIST", marker, e))?;
            if page
                .objects
                .iter()
                .any(|o| o.key != *marker && !deleted.contains(&o.key))
            {
                return Ok(false);
            }
            token = page.next_token;
            if token.is_none() {
                return Ok(true);
            }
        }
    }

    /// After an entry went away, the directory it was in must stay (POSIX), though in the
    /// bucket it may exist only by implication: it gets a marker, in the background, unless
    /// its listing shows other names that keep it.
    async fn keep_dir(&self, dir: u64) -> FsResult<()> {
        let path = {
            let t = self.table.lock();
            match t.get(dir) {
                Some(i) if dir != ROOT && !i.unlinked => i.path.clone(),
                _ => return Ok(()),
            }
        };
        if self.listing.contents(&path).is_some_and(|c| c.any) {
            return Ok(());
        }
        self.queue(self.writeback.marker(&self.keys.dir_prefix(&path)))?;
        Ok(())
    }

    /// Turns a failure to journal a change into an errno, with one log line.
    fn queue(&self, r: std::io::Result<u64>) -> FsResult<u64> {
        r.map_err(|e| {
            tracing::error!(error = %e, "cannot journal a change in the cache directory");
            FsError::from(e)
        })
    }

    /// Renames a file: a server-side copy and a delete, or only a local move while the file
    /// has not been uploaded yet. Directories cannot be renamed (EXDEV, so `mv` copies).
    pub async fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> FsResult<()> {
        let name = names::component(name)?;
        let new_name = names::component(new_name)?;
        let ino = self.find(parent, name).await?.ok_or(FsError::NOENT)?;
        if self
            .table
            .lock()
            .get(ino)
            .is_some_and(|i| i.kind == Kind::Dir)
        {
            return Err(FsError::XDEV);
        }
        let target = self.find(new_parent, new_name).await?;
        let new_path = names::join(&self.dir_path(new_parent)?, new_name);
        let new_key = self.keys.file_key(&new_path)?;
        if target == Some(ino) {
            return Ok(());
        }
        if let Some(t_ino) = target {
            if no_replace {
                return Err(FsError::EXIST);
            }
            let t = self.table.lock();
            if t.get(t_ino).is_some_and(|i| i.kind == Kind::Dir) {
                return Err(FsError::ISDIR);
            }
        }
        let (old_path, in_bucket, dirty, open, size, local) = {
            let t = self.table.lock();
            let i = t.get(ino).ok_or(FsError::NOENT)?;
            (
                i.path.clone(),
                i.in_bucket,
                i.dirty,
                i.open,
                i.size,
                i.staged.clone(),
            )
        };
        let old_key = self.keys.file_key(&old_path)?;
        // A sealed copy of the content, in the inode or still waiting in the queue.
        let sealed = local
            .filter(|s| s.is_sealed())
            .or_else(|| self.writeback.pending_upload(&old_key));
        // The new object's ETag: Some(..) when known, None when it must be asked for.
        let mut new_etag: Option<Option<String>> = Some(None);
        if dirty {
            // The content is still being written: its next commit goes to the new key.
        } else if let Some(file) = &sealed {
            self.queue(self.writeback.upload_copy(&new_key, file, size))?;
        } else if in_bucket {
            // Only in the bucket: a server-side copy, once changes to either key have landed.
            for key in [&old_key, &new_key] {
                self.writeback
                    .settle(key)
                    .await
                    .map_err(|e| self.store_error("COPY", key, e.0))?;
            }
            let etag = self
                .store
                .copy(&old_key, &new_key)
                .await
                .map_err(|e| self.store_error("COPY", &old_key, e))?;
            new_etag = etag.map(Some);
        }
        if in_bucket {
            self.queue(self.writeback.delete(&old_key))?;
        }
        let noted_etag = new_etag.clone().flatten();
        {
            let mut t = self.table.lock();
            t.reparent(ino, new_parent, new_name, new_path.clone());
            if let Some(i) = t.get_mut(ino) {
                i.in_bucket = !dirty && (in_bucket || sealed.is_some());
                match new_etag {
                    Some(etag) => {
                        i.etag = etag;
                        i.validated = Some(Instant::now());
                    }
                    None => {
                        // A copy whose ETag the store did not say: ask next time.
                        i.etag = None;
                        i.validated = None;
                    }
                }
            }
        }
        {
            let (old_dir, old_name) = names::split(&old_path);
            self.listing.note_removed(old_dir, old_name, &old_path);
            let remote = Remote {
                kind: Kind::File,
                size,
                mtime: SystemTime::now(),
                etag: noted_etag,
            };
            self.note_present(&new_path, &remote);
        }
        if dirty && open == 0 {
            self.commit_file(ino).await?;
        }
        if parent != new_parent {
            self.keep_dir(parent).await?;
        }
        Ok(())
    }

    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: 1 << 40,
            bfree: 1 << 40,
            bavail: 1 << 40,
            files: 1 << 32,
            ffree: 1 << 32,
            bsize: 4096,
            namelen: names::MAX_NAME as u32,
        }
    }
}

/// What `statfs` reports: a bucket has no fixed size, so the figures are large constants.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}
