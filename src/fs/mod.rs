//! Filesystem semantics over an object store, independent of FUSE: lookups, directories
//! implied by key prefixes, file handles backed by staged copies, and the errnos POSIX
//! callers expect. `crate::fuse` only translates kernel requests into calls on `BucketFs`.

mod dir;
mod error;
mod file;
mod inode;
mod landings;
mod listing;
pub mod names;
mod namespace;
mod subtree;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
#[cfg(test)]
mod tests;
mod warm;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::cache::{BlockCache, StagingArea};
use crate::readahead::Readahead;
use crate::store::{ETag, ObjectStore, StoreError};
use crate::writeback::{LandingObserver, Pending, WritebackQueue};

pub use dir::DirEntry;
pub use error::{FsError, FsResult};
pub use file::OpenMode;
use inode::{Inode, Remote, State};
pub use inode::{Kind, ROOT};
use listing::Answer;
use namespace::Namespace;

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
    /// When `close()` returns.
    pub write_mode: WriteMode,
}

/// When close() returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WriteMode {
    /// Once the file is durable and journaled in the cache directory; it is uploaded in
    /// the background.
    Writeback,
    /// Once the file is in the bucket.
    Writethrough,
}

impl WriteMode {
    /// The name `--write-mode` takes, for metrics and messages.
    pub fn name(self) -> &'static str {
        match self {
            WriteMode::Writeback => "writeback",
            WriteMode::Writethrough => "writethrough",
        }
    }
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
            write_mode: WriteMode::Writeback,
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

/// Stripes of the per-file commit lock.
const COMMIT_LOCKS: u64 = 64;

/// What a renamed file's inode knows of the version its new key holds.
enum RenamedVersion {
    /// Its content is local (being written, or a sealed copy on its way up).
    Local,
    /// A server-side copy, with the ETag the store gave it.
    Copied(ETag),
    /// A server-side copy whose ETag the store did not say: asked for at the next open.
    Unknown,
}

pub struct BucketFs {
    store: Arc<dyn ObjectStore>,
    opts: FsOptions,
    /// What names exist: the inode table, listings, pending changes and landings.
    ns: Arc<Namespace>,
    staging: StagingArea,
    writeback: Arc<WritebackQueue>,
    readahead: Arc<Readahead>,
    files: file::FileHandles,
    dirs: dir::DirHandles,
    /// A commit of a file excludes other commits and every change to its local copy (a
    /// FLUSH can come from any process holding a copy of the descriptor, e.g. a child
    /// between fork and exec, while the owner writes): writes and truncations hold it
    /// shared, commits exclusively. Striped by inode number.
    commit_locks: Vec<tokio::sync::RwLock<()>>,
}

impl BucketFs {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        staging: StagingArea,
        writeback: Arc<WritebackQueue>,
        readahead: Arc<Readahead>,
        opts: FsOptions,
    ) -> Self {
        let ns = Namespace::new(
            store.clone(),
            prefix,
            writeback.clone(),
            opts.metadata_ttl,
            opts.negative_ttl,
        );
        BucketFs {
            store,
            opts,
            ns,
            staging,
            writeback,
            readahead,
            files: Default::default(),
            dirs: Default::default(),
            commit_locks: (0..COMMIT_LOCKS)
                .map(|_| tokio::sync::RwLock::new(()))
                .collect(),
        }
    }

    /// Names remembered from directory listings.
    pub fn listed_names(&self) -> usize {
        self.ns.listed_names()
    }

    /// The inode of `name` in `parent`, if this mount knows it (no request is made).
    pub fn child(&self, parent: u64, name: &std::ffi::OsStr) -> Option<u64> {
        self.ns.child(parent, name)
    }

    /// Number of inodes currently held.
    pub fn inode_count(&self) -> usize {
        self.ns.inode_count()
    }

    pub fn options(&self) -> &FsOptions {
        &self.opts
    }

    fn blocks(&self) -> &Arc<BlockCache> {
        self.readahead.blocks()
    }

    fn attr_of(&self, i: &inode::Inode) -> Attr {
        Attr {
            ino: i.ino,
            kind: i.kind,
            size: if i.kind == Kind::File { i.size } else { 0 },
            mtime: if i.kind == Kind::Dir && i.mtime == SystemTime::UNIX_EPOCH {
                self.ns.mount_time
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

    /// Takes a kernel reference on `ino` and returns its attributes.
    fn remember(&self, ino: u64) -> FsResult<Attr> {
        let mut t = self.ns.table.lock();
        let i = t.get_mut(ino).ok_or(FsError::NOENT)?;
        i.lookups += 1;
        let i = t.get(ino).expect("live");
        Ok(self.attr_of(i))
    }

    pub async fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = names::component(name)?;
        match self.ns.lookup(parent, name).await? {
            Some(ino) => self.remember(ino),
            None => Err(FsError::NOENT),
        }
    }

    pub fn forget(&self, ino: u64, n: u64) {
        self.ns.table.lock().forget(ino, n);
    }

    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let path = {
            let t = self.ns.table.lock();
            let i = t.get(ino).ok_or(FsError::NOENT)?;
            if i.kind == Kind::Dir || i.is_fresh(self.opts.metadata_ttl) || !i.in_bucket() {
                return Ok(self.attr_of(i));
            }
            i.path.clone()
        };
        let key = self.ns.keys.file_key(&path)?;
        // What the bucket holds, and when that was seen.
        let found = match self.writeback.lookup(&key) {
            Some(Pending::Upload { size, .. }) => {
                let mut t = self.ns.table.lock();
                let i = t.get_mut(ino).ok_or(FsError::NOENT)?;
                if i.copy().is_none() {
                    i.size = size;
                }
                return Ok(self.attr_of(i));
            }
            Some(Pending::Delete) => Err(StoreError::NotFound),
            _ if self.ns.is_offline() => return self.attr(ino),
            _ => {
                // A fresh listing of the directory knows the file too.
                let (dir, name) = names::split(&path);
                match self.ns.listed_answer(dir, name, &path) {
                    Answer::Present(r, at) if r.kind == Kind::File => Ok((r, at)),
                    _ => self
                        .store
                        .head(&key)
                        .await
                        .map(|meta| (Remote::file(&meta), Instant::now())),
                }
            }
        };
        if let Err(e @ StoreError::Unreachable(_)) = &found {
            self.ns.go_offline(e);
            return self.attr(ino);
        }
        match found {
            Ok((remote, seen)) => {
                let mut t = self.ns.table.lock();
                let i = t.get_mut(ino).ok_or(FsError::NOENT)?;
                if i.copy().is_none() && i.path == path {
                    i.take_remote(&remote, seen);
                }
                Ok(self.attr_of(t.get(ino).expect("live")))
            }
            Err(StoreError::NotFound) => {
                let mut t = self.ns.table.lock();
                if t.get(ino)
                    .is_some_and(|i| i.copy().is_none() && i.path == path)
                {
                    t.detach(ino);
                }
                Err(FsError::NOENT)
            }
            Err(e) => Err(FsError::store("HEAD", &key, e)),
        }
    }

    pub async fn mkdir(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = names::new_component(name)?;
        if self.ns.lookup(parent, name).await?.is_some() {
            return Err(FsError::EXIST);
        }
        let path = names::join(&self.ns.dir_path(parent)?, name);
        let marker = self.ns.keys.dir_prefix(&path);
        if marker.len() > names::MAX_KEY {
            return Err(FsError::NAMETOOLONG);
        }
        self.queue(self.writeback.marker(&marker))?;
        // `find` just said nothing had this name: the directory starts out empty.
        self.ns.listing.created_dir(&path);
        let remote = Remote {
            kind: Kind::Dir,
            size: 0,
            mtime: SystemTime::now(),
            etag: None,
        };
        self.ns.note_present(&path, &remote);
        let ino = {
            let mut t = self.ns.table.lock();
            t.insert(parent, name, path, Kind::Dir).ino
        };
        self.remember(ino)
    }

    pub async fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let name = names::component(name)?;
        let ino = self.ns.lookup(parent, name).await?.ok_or(FsError::NOENT)?;
        // No commit of the file runs meanwhile: one that read its state before the unlink
        // would upload it after its name is gone.
        let _alone = self.commit_lock(ino).write().await;
        let (path, in_bucket, read_from_bucket) = {
            let t = self.ns.table.lock();
            let i = t.get(ino).ok_or(FsError::NOENT)?;
            if i.kind == Kind::Dir {
                return Err(FsError::ISDIR);
            }
            (i.path.clone(), i.in_bucket(), i.copy().is_none())
        };
        let deferred = if in_bucket {
            self.queue_delete(&self.ns.keys.file_key(&path)?, read_from_bucket)?
        } else {
            None
        };
        let go_now = Self::wait_for_readers(self.ns.table.lock().get_mut(ino), deferred);
        if let Some(seq) = go_now {
            self.writeback.release_deferred(seq);
        }
        self.removed(parent, name, ino, &path).await
    }

    /// Journals the delete of `key`, the object a file had. When `read_from_bucket` (it has
    /// no local copy: its handles read the object), the delete is deferred and returned,
    /// for `wait_for_readers`.
    fn queue_delete(&self, key: &str, read_from_bucket: bool) -> FsResult<Option<u64>> {
        if read_from_bucket {
            return self.queue(self.writeback.delete_after_close(key)).map(Some);
        }
        self.queue(self.writeback.delete(key))?;
        Ok(None)
    }

    /// The deferred delete `seq` waits for the last handle open on `i` now to close, with
    /// nothing downloaded (a large file would hold the unlink or rename for as long as that
    /// takes); with none open, it is returned, to be let go once the table's lock is. A
    /// rename calls it under the lock that changes the name: an open counts itself before
    /// it reads the name, so one that read the old name counts here.
    fn wait_for_readers(i: Option<&mut Inode>, seq: Option<u64>) -> Option<u64> {
        match (i, seq) {
            (Some(i), Some(seq)) if i.open > 0 => {
                i.deferred_deletes.push(seq);
                None
            }
            (_, seq) => seq,
        }
    }

    pub async fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let name = names::component(name)?;
        let ino = self.ns.lookup(parent, name).await?.ok_or(FsError::NOENT)?;
        let path = {
            let t = self.ns.table.lock();
            let i = t.get(ino).ok_or(FsError::NOENT)?;
            if i.kind != Kind::Dir {
                return Err(FsError::NOTDIR);
            }
            if !t.local_children(ino).is_empty() {
                return Err(FsError::NOTEMPTY);
            }
            i.path.clone()
        };
        if !self.ns.dir_is_empty(&path).await? {
            return Err(FsError::NOTEMPTY);
        }
        let prefix = self.ns.keys.dir_prefix(&path);
        // Files unlinked under it while open wait for their last close to be deleted; the
        // bucket would list the directory again meanwhile: they go now.
        self.writeback.release_deferred_under(&prefix);
        self.queue(self.writeback.delete(&prefix))?;
        self.ns.listing.forget_dir(&path);
        self.removed(parent, name, ino, &path).await
    }

    /// Forgets `parent/name` after its object or marker was deleted, keeping `parent`.
    async fn removed(&self, parent: u64, name: &str, ino: u64, path: &str) -> FsResult<()> {
        {
            let mut t = self.ns.table.lock();
            if t.child(parent, name) == Some(ino) {
                t.detach(ino);
            }
        }
        let (dir, _) = names::split(path);
        self.ns.listing.note_removed(dir, name, path);
        self.keep_dir(parent).await
    }

    /// After an entry went away, the directory it was in must stay (POSIX): it gets a marker,
    /// in the background, when the namespace says nothing else keeps it.
    async fn keep_dir(&self, dir: u64) -> FsResult<()> {
        if let Some(marker) = self.ns.marker_to_keep(dir) {
            self.queue(self.writeback.marker(&marker))?;
        }
        Ok(())
    }

    /// Turns a failure to journal a change into an errno, with one log line.
    fn queue(&self, r: std::io::Result<u64>) -> FsResult<u64> {
        r.map_err(|e| FsError::from(e).context("journaling a change in the cache directory"))
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
        let new_name = names::new_component(new_name)?;
        let ino = self.ns.lookup(parent, name).await?.ok_or(FsError::NOENT)?;
        if self
            .ns
            .table
            .lock()
            .get(ino)
            .is_some_and(|i| i.kind == Kind::Dir)
        {
            return Err(FsError::XDEV);
        }
        let target = self.ns.lookup(new_parent, new_name).await?;
        let new_path = names::join(&self.ns.dir_path(new_parent)?, new_name);
        let new_key = self.ns.keys.file_key(&new_path)?;
        if target == Some(ino) {
            return Ok(());
        }
        if let Some(t_ino) = target {
            if no_replace {
                return Err(FsError::EXIST);
            }
            let t = self.ns.table.lock();
            if t.get(t_ino).is_some_and(|i| i.kind == Kind::Dir) {
                return Err(FsError::ISDIR);
            }
        }
        // No write or commit of the file runs until the rename is done. The content closed
        // last must exist under one of the names at every moment: changes not committed yet
        // are committed first, so the new name gets all of it before the old one is deleted.
        // Nor does a commit of the file it replaces: one under way is queued before the
        // rename's changes of the new name, which then come last.
        let _alone = self.commit_locks_of_both(ino, target).await;
        // The object of the file replaced (as its commits left it: they are done now) stays
        // in the bucket until the renamed file's content replaces it, or an unlink deletes it.
        let target_in_bucket = target.is_some_and(|t_ino| {
            self.ns
                .table
                .lock()
                .get(t_ino)
                .is_some_and(|i| i.in_bucket())
        });
        // Only a file whose closed content the bucket holds has content to keep: one never
        // closed (`LocalOnly`, or `OverReplaced` under another file's object) commits first
        // when it is closed, under the name it has then.
        let closed_content_changed = self
            .ns
            .table
            .lock()
            .get(ino)
            .is_some_and(|i| matches!(i.state(), State::Dirty { .. }));
        if closed_content_changed {
            self.commit_locked(ino)?;
        }
        let (old_path, in_bucket, dirty, open, size, local) = {
            let t = self.ns.table.lock();
            let i = t.get(ino).ok_or(FsError::NOENT)?;
            (
                i.path.clone(),
                i.in_bucket(),
                i.is_dirty(),
                i.open,
                i.size,
                i.copy().cloned(),
            )
        };
        let old_key = self.ns.keys.file_key(&old_path)?;
        // Without a local copy, handles opened before the rename read the old key from the
        // bucket until they close.
        let read_from_bucket = local.is_none();
        // A sealed copy of the content, in the inode or still waiting in the queue.
        let sealed = local
            .filter(|s| s.is_sealed())
            .or_else(|| self.writeback.pending_upload(&old_key));
        let mut version = RenamedVersion::Local;
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
                    .map_err(|e| FsError::store("COPY", key, e.0))?;
            }
            let etag = self
                .store
                .copy(&old_key, &new_key)
                .await
                .map_err(|e| FsError::store("COPY", &old_key, e))?;
            // A change of this mount, as an upload's landing is: listings made while it ran
            // may lack the new name.
            self.ns.landed(&new_key, true);
            version = match etag {
                Some(etag) => RenamedVersion::Copied(etag),
                None => RenamedVersion::Unknown,
            };
        }
        let noted_etag = match &version {
            RenamedVersion::Copied(etag) => Some(etag.clone()),
            _ => None,
        };
        let deferred = if in_bucket {
            self.queue_delete(&old_key, read_from_bucket)?
        } else {
            None
        };
        let go_now = {
            let mut t = self.ns.table.lock();
            t.reparent(ino, new_parent, new_name, new_path.clone());
            let go_now = Self::wait_for_readers(t.get_mut(ino), deferred);
            if let Some(i) = t.get_mut(ino) {
                if dirty {
                    i.renamed_while_dirty(target_in_bucket);
                }
                match version {
                    RenamedVersion::Local => {
                        i.etag = None;
                        i.validated = Some(Instant::now());
                    }
                    RenamedVersion::Copied(etag) => {
                        i.etag = Some(etag);
                        i.validated = Some(Instant::now());
                    }
                    RenamedVersion::Unknown => {
                        // A copy whose ETag the store did not say: ask next time.
                        i.etag = None;
                        i.validated = None;
                    }
                }
            }
            go_now
        };
        if let Some(seq) = go_now {
            self.writeback.release_deferred(seq);
        }
        {
            let (old_dir, old_name) = names::split(&old_path);
            self.ns.listing.note_removed(old_dir, old_name, &old_path);
            let remote = Remote {
                kind: Kind::File,
                size,
                mtime: SystemTime::now(),
                etag: noted_etag,
            };
            self.ns.note_present(&new_path, &remote);
        }
        if dirty && open == 0 {
            self.commit_locked(ino)?;
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
