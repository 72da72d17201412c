//! Open files: creating, reading, writing through a staged copy, truncating, and
//! uploading the staged copy as one object when the file is flushed.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;

use super::error::{FsError, FsResult};
use super::inode::{Kind, PageCache, Remote, State};
use super::{names, Attr, BucketFs, WriteMode, COMMIT_LOCKS};
use crate::cache::{allocated, ObjectId, StagedFile, WholeObject};
use crate::passthrough::Backed;
use crate::readahead::{ObjectRef, ReadStream};
use crate::store::{ETag, StoreError, MAX_OBJECT_SIZE};

/// The smallest file whose local content is passed through to the kernel. Below it, one
/// FUSE read answers the whole file and the kernel's pages are kept across opens, so re-reads
/// cost no request, where a passthrough open costs a backing-file registration every time
/// (bench/results/readback-2026-12-02.md).
const PASSTHROUGH_MIN_SIZE: u64 = 128 << 10;

/// How much of an object one GET fetches while a file is copied to local disk.
const DOWNLOAD_CHUNK: u64 = 8 << 20;

struct OpenFile {
    ino: u64,
    /// The file's key when it was opened: what the handle reads from the bucket, even once
    /// the file is renamed (the rename's delete of this key waits for the last such handle).
    key: String,
    writable: bool,
    /// The object version this handle reads, with its size; a changed object fails the
    /// read rather than mix versions.
    etag: Option<ETag>,
    size: u64,
    /// Access pattern and readahead of reads from the bucket, made at the first one.
    stream: OnceLock<Arc<ReadStream>>,
    /// The file's key now and its reads there, once `key` no longer held its version.
    moved: OnceLock<(String, Arc<ReadStream>)>,
    /// The cached object, held whole while the kernel reads it directly.
    whole: Mutex<Option<WholeObject>>,
    /// The kernel may keep what it cached of the file: it is the version it was cached from.
    keep_cache: bool,
    /// The sealed copy of the file's upload waiting when it was opened, for a handle whose
    /// inode kept no copy of its own: what it reads even once the name is removed or taken
    /// by another file.
    local: Option<Arc<StagedFile>>,
}

impl OpenFile {
    fn new(ino: u64, key: String, writable: bool, etag: Option<ETag>, size: u64) -> Self {
        OpenFile {
            ino,
            key,
            writable,
            etag,
            size,
            stream: OnceLock::new(),
            moved: OnceLock::new(),
            whole: Mutex::new(None),
            keep_cache: false,
            local: None,
        }
    }
}

#[derive(Default)]
pub(super) struct FileHandles {
    map: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next: AtomicU64,
}

impl FileHandles {
    fn add(&self, f: OpenFile) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.map.lock().insert(fh, Arc::new(f));
        fh
    }

    fn get(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        self.map.lock().get(&fh).cloned().ok_or(FsError::BADF)
    }

    fn remove(&self, fh: u64) -> FsResult<Arc<OpenFile>> {
        self.map.lock().remove(&fh).ok_or(FsError::BADF)
    }
}

/// How a file is opened.
#[derive(Debug, Clone, Copy)]
pub struct OpenMode {
    pub write: bool,
    pub truncate: bool,
    pub exclusive: bool,
}

impl OpenMode {
    /// An `O_RDONLY | O_TRUNC` open changes the file (Linux empties it, given write
    /// permission), so it is a writing open here: its handle commits the truncation.
    pub fn from_flags(flags: i32) -> Self {
        let acc = flags & libc::O_ACCMODE;
        let truncate = flags & libc::O_TRUNC != 0;
        OpenMode {
            write: acc == libc::O_WRONLY || acc == libc::O_RDWR || truncate,
            truncate,
            exclusive: flags & libc::O_EXCL != 0,
        }
    }
}

/// An open under way, counted in its inode's `open` until it succeeds (then its handle's
/// release undoes it) or fails (then this does).
struct Opening<'a> {
    fs: &'a BucketFs,
    ino: u64,
    done: bool,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut t = self.fs.ns.table.lock();
        if let Some(i) = t.get_mut(self.ino) {
            for seq in i.close_one() {
                self.fs.writeback.release_deferred(seq);
            }
            i.drop_clean_copy();
        }
        t.maybe_drop(self.ino);
    }
}

impl BucketFs {
    /// Creates `name` in `parent` (or opens it, if it appeared meanwhile and `O_EXCL` was
    /// not given) and returns its attributes and a handle.
    pub async fn create(&self, parent: u64, name: &OsStr, flags: i32) -> FsResult<(Attr, u64)> {
        let name = names::new_component(name)?;
        let mode = OpenMode::from_flags(flags);
        let path = names::join(&self.ns.dir_path(parent)?, name);
        let key = self.ns.keys.file_key(&path)?;
        let existing = {
            let t = self.ns.table.lock();
            t.child(parent, name)
                .filter(|ino| t.get(*ino).is_some_and(|i| !i.is_unlinked()))
        };
        if let Some(ino) = existing {
            if mode.exclusive {
                return Err(FsError::EXIST);
            }
            let fh = self.open(ino, flags).await?;
            return Ok((self.remember(ino)?, fh));
        }
        let staged = self.staging.create()?;
        let ino = {
            let mut t = self.ns.table.lock();
            let i = t.insert(parent, name, path.clone(), Kind::File);
            i.created(Arc::new(staged));
            i.open = 1;
            i.ino
        };
        self.ns.note_present(
            &path,
            &Remote {
                kind: Kind::File,
                size: 0,
                mtime: SystemTime::now(),
                etag: None,
            },
        );
        let fh = self.files.add(OpenFile::new(ino, key, true, None, 0));
        Ok((self.remember(ino)?, fh))
    }

    pub async fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let mode = OpenMode::from_flags(flags);
        let stale = {
            let mut t = self.ns.table.lock();
            let i = t.get_mut(ino).ok_or(FsError::NOENT)?;
            if i.kind == Kind::Dir {
                return Err(FsError::ISDIR);
            }
            // Counted before anything is awaited: an unlink meanwhile sees the file open.
            i.open += 1;
            // An open that truncates keeps nothing of what the bucket holds.
            let keeps_content = !(mode.write && mode.truncate);
            keeps_content && !i.is_fresh(self.opts.metadata_ttl) && i.in_bucket()
        };
        let mut opening = Opening {
            fs: self,
            ino,
            done: false,
        };
        if stale {
            // Close-to-open: a file changed elsewhere is seen as it is now.
            self.getattr(ino).await?;
        }
        if mode.write && mode.truncate {
            // Unknown until the open succeeds: then the kernel empties its pages too.
            if let Some(i) = self.ns.table.lock().get_mut(ino) {
                i.page_cache = None;
            }
            self.truncate_local(ino, 0).await?;
        }
        let path = self
            .ns
            .table
            .lock()
            .get(ino)
            .ok_or(FsError::NOENT)?
            .path
            .clone();
        let key = self.ns.keys.file_key(&path)?;
        // The queue records an upload's ETag before it lets go of the upload: asked in this
        // order, one of the two is seen.
        let pending = self.writeback.pending_upload(&key);
        let uploaded = self.blocks().known_etag(&key);
        let mut t = self.ns.table.lock();
        let i = t.get_mut(ino).ok_or(FsError::NOENT)?;
        let size = i.size;
        let has_copy = i.copy().is_some();
        // The kernel keeps its pages of the file when this open reads what they were filled
        // from: the content written here (its local copy, its upload waiting or landed, as
        // long as the bucket has not said otherwise), or the same version of the object.
        let written_here = has_copy
            || match &i.etag {
                None => pending.is_some() || uploaded.is_some(),
                Some(e) => uploaded.as_ref() == Some(e),
            };
        let version = if mode.write {
            // An open that truncates empties the kernel's pages, as the copy just was.
            mode.truncate.then_some(PageCache::Local(i.version))
        } else if written_here {
            Some(PageCache::Local(i.version))
        } else {
            i.etag.clone().map(|e| PageCache::Object(e, size))
        };
        let keep_cache = !mode.write && version.is_some() && i.page_cache == version;
        i.page_cache = version;
        // Without a copy of its own, the handle reads the upload waiting, or else the
        // version the bucket or this mount's last upload of it named, as of now.
        let (local, etag) = match pending {
            _ if has_copy => (None, None),
            Some(pending) => (Some(pending), None),
            None => (None, i.etag.clone().or(uploaded)),
        };
        drop(t);
        let mut file = OpenFile::new(ino, key, mode.write, etag, size);
        file.keep_cache = keep_cache;
        file.local = local;
        opening.done = true;
        Ok(self.files.add(file))
    }

    /// Whether the kernel may keep what it cached of the file the handle `fh` reads.
    pub fn keep_cache(&self, fh: u64) -> bool {
        self.files.get(fh).is_ok_and(|h| h.keep_cache)
    }

    /// What the kernel can read the handle `fh` from directly, when the handle is read-only
    /// and the file at least `PASSTHROUGH_MIN_SIZE`: the sealed copy of a file this mount wrote (just
    /// closed, waiting for upload, or kept after it), which never changes; else the block
    /// cache's file of the object, when every block of it is cached and intact and no local
    /// change of the file is waiting (its blocks stay cached until the handle is released).
    /// `backing` names the content the inode is passed through to already, if it is: an
    /// open that reads the same content joins it, although its upload landed since.
    pub async fn passthrough_file(&self, fh: u64, backing: Option<String>) -> Backed {
        self.choose_backing(fh, backing).await.unwrap_or(Backed::No)
    }

    async fn choose_backing(&self, fh: u64, backing: Option<String>) -> Option<Backed> {
        let h = self.files.get(fh).ok()?;
        if h.writable || h.size < PASSTHROUGH_MIN_SIZE {
            return None;
        }
        let copy = self.ns.table.lock().get(h.ino)?.copy().cloned();
        let key = &h.key;
        if let Some(local) = copy.or_else(|| h.local.clone()) {
            let file = self.sealed_copy(&local, h.size).await?;
            return Some(Backed::File(
                file,
                format!("local:{}", local.path().display()),
            ));
        }
        // The version this handle opened.
        let uploaded = self.blocks().known_etag(key);
        let etag = h.etag.clone()?;
        // Passed through to the copy this mount uploaded, and that is what this reads: no
        // writer could open the file since (passthrough refuses them).
        if backing
            .as_deref()
            .is_some_and(|b| b.starts_with("local:") && uploaded.as_ref() == Some(&etag))
        {
            return Some(Backed::Same);
        }
        // Passed through to this version's cache file already: this handle joins, holding
        // the object whole too, so that its blocks stay while any handle reads them.
        let joins =
            backing.as_deref().and_then(|b| b.strip_prefix("object:")) == Some(etag.as_str());
        let blocks = self.blocks().clone();
        let object = ObjectId::new(key, &etag);
        // Most opens need no read: they are answered here, without a wait on the blocking
        // pool (a thread switch each way).
        let whole = match blocks.open_whole_unread(object, h.size) {
            Some(Ok(whole)) => Some(whole),
            Some(Err(unchecked)) => {
                tokio::task::spawn_blocking(move || blocks.check_whole(unchecked))
                    .await
                    .ok()
                    .flatten()
            }
            None => None,
        };
        if joins {
            // It joins whether or not this key holds the blocks (after a rename they are
            // under the old one, held by the handle that opened them).
            *h.whole.lock() = whole;
            return Some(Backed::Same);
        }
        let whole = whole?;
        let file = whole.file().try_clone().ok()?;
        *h.whole.lock() = Some(whole);
        Some(Backed::File(file, format!("object:{etag}")))
    }

    /// The handle `fh` is read through the mount after all: the object `passthrough_file`
    /// held whole for the kernel is let go.
    pub fn let_go_of_whole(&self, fh: u64) {
        if let Ok(h) = self.files.get(fh) {
            *h.whole.lock() = None;
        }
    }

    /// A descriptor of `local` for the kernel to read from, if it is sealed (its content
    /// never changes again) and holds the `size` bytes the handle opened.
    async fn sealed_copy(&self, local: &Arc<StagedFile>, size: u64) -> Option<std::fs::File> {
        if !local.is_sealed() {
            return None;
        }
        let sized = move |file: Arc<std::fs::File>| {
            let len = file.metadata().ok()?.len();
            (len == size).then(|| file.try_clone().ok()).flatten()
        };
        // Unchanged since it was last found intact: answered here, as in `choose_backing`.
        match local.file_unread().ok()? {
            Ok(file) => sized(file),
            Err(to_check) => {
                let local = local.clone();
                tokio::task::spawn_blocking(move || sized(local.check(to_check).ok()?))
                    .await
                    .ok()?
            }
        }
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let h = self.files.get(fh)?;
        let (staged, file_size) = {
            let t = self.ns.table.lock();
            let i = t.get(h.ino).ok_or(FsError::BADF)?;
            (i.copy().cloned(), i.size)
        };
        // The key the file had when the handle opened it, renamed since or not: the version
        // it pinned is there. A handle that opened neither a copy nor a version (a store
        // without ETags) reads what the file's name holds now.
        let unpinned = h.local.is_none() && h.etag.is_none();
        let key = if unpinned {
            self.key_now(h.ino).unwrap_or_else(|| h.key.clone())
        } else {
            h.key.clone()
        };
        let local = staged.or_else(|| h.local.clone()).or_else(|| {
            unpinned
                .then(|| self.writeback.pending_upload(&key))
                .flatten()
        });
        if let Some(local) = local {
            return read_staged(&local, offset, size).await;
        }
        // The version this handle opened; unpinned, the one this mount uploaded last.
        let version = match &h.etag {
            Some(etag) => Some((etag.clone(), h.size)),
            None => self.blocks().known_etag(&key).map(|etag| (etag, file_size)),
        };
        let result = match (h.moved.get(), version) {
            (Some((_, stream)), _) => self.readahead.read(stream, offset, size).await,
            (None, Some((etag, object_size))) => {
                let stream = h.stream.get_or_init(|| {
                    Arc::new(ReadStream::new(ObjectRef::new(
                        key.clone(),
                        etag,
                        object_size,
                    )))
                });
                self.readahead.read(stream, offset, size).await
            }
            (None, None) => {
                self.readahead
                    .read_uncached(&key, file_size, offset, size)
                    .await
            }
        };
        // The key it opened is gone or holds another file (its old name was taken, or the
        // delete a rename deferred went early: an rmdir, a rename back): the same version
        // under the name the file has now, if the store kept it through the copy; the
        // handle reads there from then on.
        let moved_to = match (&result, &h.etag) {
            (Err(StoreError::NotFound | StoreError::PreconditionFailed), Some(_))
                if h.moved.get().is_none() =>
            {
                self.key_now(h.ino).filter(|now| *now != key)
            }
            _ => None,
        };
        let result = match (moved_to, &h.etag) {
            (Some(now), Some(etag)) => {
                let (_, stream) = h.moved.get_or_init(|| {
                    let object = ObjectRef::new(now.clone(), etag.clone(), h.size);
                    (now, Arc::new(ReadStream::new(object)))
                });
                self.readahead.read(stream, offset, size).await
            }
            _ => result,
        };
        let key = h.moved.get().map_or(&key, |(now, _)| now);
        match result {
            Ok(b) => Ok(b),
            Err(StoreError::InvalidRange) => Ok(Bytes::new()),
            Err(StoreError::PreconditionFailed) => Err(FsError::new(
                libc::EIO,
                format!("reading {key}: the object was replaced while open; the read fails rather than mix versions"),
            )),
            Err(e) => Err(FsError::store("GET", key, e)),
        }
    }

    /// The key of file `ino` under its name now.
    fn key_now(&self, ino: u64) -> Option<String> {
        let path = self.ns.table.lock().get(ino)?.path.clone();
        self.ns.keys.file_key(&path).ok()
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let h = self.files.get(fh)?;
        if !h.writable {
            return Err(FsError::BADF);
        }
        // Backpressure: wait while too many closed files wait for upload.
        self.writeback.reserve().await;
        // A download of the object happens before the lock, so that commits of other files
        // on the same stripe never wait for the bucket.
        self.materialize(h.ino).await?;
        // No commit seals the copy between finding it and writing to it.
        let _changing = self.commit_lock(h.ino).read().await;
        let staged = self.materialize(h.ino).await?;
        let end = offset.checked_add(data.len() as u64).ok_or(FsError::FBIG)?;
        self.room_for_staged(h.ino, &staged, end)?;
        staged.write_at(data, offset)?;
        let mut t = self.ns.table.lock();
        let i = t.get_mut(h.ino).ok_or(FsError::BADF)?;
        i.size = i.size.max(end);
        i.mtime = SystemTime::now();
        i.written_to(&staged);
        Ok(data.len() as u32)
    }

    /// Called at every `close()`: commits what was written (durable on local disk and
    /// queued for upload), or with write-through, waits until the bucket has it.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.files.get(fh)?;
        if h.writable {
            let seq = self.commit_file(h.ino).await?;
            if let (Some(seq), WriteMode::Writethrough) = (seq, self.opts.write_mode) {
                self.wait_uploaded(h.ino, seq).await?;
            }
        }
        Ok(())
    }

    /// Returns once the file's current content is a complete object in the bucket.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let h = self.files.get(fh)?;
        self.commit_file(h.ino).await?;
        let key = {
            let t = self.ns.table.lock();
            self.ns
                .keys
                .file_key(&t.get(h.ino).ok_or(FsError::BADF)?.path)?
        };
        match self.writeback.latest_seq(&key) {
            Some(seq) => self.wait_uploaded(h.ino, seq).await,
            None => Ok(()),
        }
    }

    async fn wait_uploaded(&self, ino: u64, seq: u64) -> FsResult<()> {
        self.writeback.wait(seq).await.map_err(|e| {
            let path = self.path_of(ino);
            FsError::from(e.0).context(format!(
                "waiting for the upload of {path}: it is not done yet, stays queued and is retried"
            ))
        })
    }

    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let h = self.files.remove(fh)?;
        let result = if h.writable {
            self.commit_file(h.ino).await.map(|_| ())
        } else {
            Ok(())
        };
        let mut t = self.ns.table.lock();
        if let Some(i) = t.get_mut(h.ino) {
            for seq in i.close_one() {
                self.writeback.release_deferred(seq);
            }
            i.drop_clean_copy();
            if i.is_dirty() && i.open == 0 {
                let local = i.copy().map(|s| s.path().display().to_string());
                tracing::error!(path = %i.path, local = ?local,
                    "a closed file could not be committed to the cache directory; the next fsync or rename retries");
            }
        }
        t.maybe_drop(h.ino);
        result
    }

    pub async fn setattr_size(&self, ino: u64, size: u64, fh: Option<u64>) -> FsResult<Attr> {
        {
            let t = self.ns.table.lock();
            let i = t.get(ino).ok_or(FsError::NOENT)?;
            if i.kind == Kind::Dir {
                return Err(FsError::ISDIR);
            }
        }
        self.truncate_local(ino, size).await?;
        let writer_open = fh
            .and_then(|fh| self.files.get(fh).ok())
            .is_some_and(|h| h.writable)
            || self
                .files
                .map
                .lock()
                .values()
                .any(|h| h.ino == ino && h.writable);
        if !writer_open {
            // `truncate(1)` on a closed file: nobody will flush it, so commit now.
            self.commit_file(ino).await?;
            let mut t = self.ns.table.lock();
            if let Some(i) = t.get_mut(ino) {
                i.drop_clean_copy();
            }
        }
        self.attr(ino)
    }

    pub fn attr(&self, ino: u64) -> FsResult<Attr> {
        let t = self.ns.table.lock();
        Ok(self.attr_of(t.get(ino).ok_or(FsError::NOENT)?))
    }

    async fn truncate_local(&self, ino: u64, size: u64) -> FsResult<()> {
        let _changing = self.commit_lock(ino).read().await;
        let staged = if size == 0 {
            self.empty_staged(ino)?
        } else {
            self.materialize(ino).await?
        };
        self.room_for_staged(ino, &staged, size)?;
        staged.set_len(size)?;
        let mut t = self.ns.table.lock();
        let i = t.get_mut(ino).ok_or(FsError::NOENT)?;
        i.size = size;
        i.mtime = SystemTime::now();
        i.written_to(&staged);
        Ok(())
    }

    /// The staged copy of `ino`, or a new empty one when there is none (the old content is
    /// not needed because it is being truncated away). A copy whose fdatasync failed can
    /// never be sealed: it is replaced, so that writing the file anew closes without error.
    fn empty_staged(&self, ino: u64) -> FsResult<Arc<StagedFile>> {
        let mut t = self.ns.table.lock();
        let i = t.get_mut(ino).ok_or(FsError::NOENT)?;
        if let Some(s) = i.copy().filter(|s| !s.is_sealed() && !s.sync_failed()) {
            return Ok(s.clone());
        }
        let s = Arc::new(self.staging.create()?);
        i.set_copy(s.clone());
        Ok(s)
    }

    /// A writable staged copy of `ino`: the current one, a copy of a sealed one (sealed
    /// copies never change), or the object downloaded into a new one.
    pub(super) async fn materialize(&self, ino: u64) -> FsResult<Arc<StagedFile>> {
        let (path, size, etag, sealed) = {
            let t = self.ns.table.lock();
            let i = t.get(ino).ok_or(FsError::NOENT)?;
            match i.copy() {
                Some(s) if !s.is_sealed() => return Ok(s.clone()),
                other => (i.path.clone(), i.size, i.etag.clone(), other.cloned()),
            }
        };
        let key = self.ns.keys.file_key(&path)?;
        let sealed = sealed.or_else(|| self.writeback.pending_upload(&key));
        let staged = match sealed {
            Some(src) => self.staging.create_copy(&src)?,
            None => {
                let staged = self.staging.create()?;
                self.room_for_download(ino, &staged, size)?;
                self.download(&staged, &key, size, etag.as_ref()).await?;
                staged
            }
        };
        let mut t = self.ns.table.lock();
        let i = t.get_mut(ino).ok_or(FsError::NOENT)?;
        // Another request may have made a writable copy meanwhile; it wins.
        match i.copy() {
            Some(s) if !s.is_sealed() => Ok(s.clone()),
            _ => {
                let s = Arc::new(staged);
                i.set_copy(s.clone());
                Ok(s)
            }
        }
    }

    /// Copies the object into `staged`, which is empty.
    async fn download(
        &self,
        staged: &StagedFile,
        key: &str,
        size: u64,
        etag: Option<&ETag>,
    ) -> FsResult<()> {
        let mut offset = 0;
        while offset < size {
            let end = size.min(offset + DOWNLOAD_CHUNK);
            let chunk = self
                .store
                .get_range(key, offset..end, etag)
                .await
                .map_err(|e| FsError::store("GET", key, e))?;
            if chunk.len() as u64 != end - offset {
                return Err(FsError::new(
                    libc::EIO,
                    format!("reading {key}: the object is shorter than its listed size"),
                ));
            }
            staged.write_at(&chunk, offset)?;
            offset = end;
        }
        Ok(())
    }

    /// Room for a whole object of `size` bytes about to be copied into `staged`: within
    /// `--cache-size` like any staged file, and leaving the free space `--cache-min-free`
    /// keeps on the cache filesystem (the copy was not asked for byte by byte).
    fn room_for_download(&self, ino: u64, staged: &StagedFile, size: u64) -> FsResult<()> {
        self.room_for_staged(ino, staged, size)?;
        if self.blocks().disk_has_room(size) {
            return Ok(());
        }
        self.warn_once_about(
            ino,
            "changing this file needs a local copy of the whole object, and the cache filesystem \
             has no room for it above --cache-min-free; the change fails with ENOSPC",
        );
        Err(FsError::NOSPC)
    }

    /// Logs `problem` with the path of `ino`, once per mount.
    fn warn_once_about(&self, ino: u64, problem: &str) {
        self.ns.warn_once(&self.path_of(ino), problem);
    }

    /// The path of `ino`, for messages ("" once it is forgotten).
    fn path_of(&self, ino: u64) -> String {
        self.ns
            .table
            .lock()
            .get(ino)
            .map(|i| i.path.clone())
            .unwrap_or_default()
    }

    /// Makes room in the cache directory for `staged` to grow to `len` bytes, evicting
    /// clean blocks; fails with ENOSPC when staged files alone would pass `--cache-size`,
    /// and with EFBIG past the largest object S3 stores.
    fn room_for_staged(&self, ino: u64, staged: &StagedFile, len: u64) -> FsResult<()> {
        let (problem, error) = if len > MAX_OBJECT_SIZE {
            (
                "an S3 object holds at most 5 TiB (10 000 parts of at most 5 GiB); the write fails with EFBIG",
                FsError::FBIG,
            )
        } else {
            let growth = allocated(len).saturating_sub(staged.accounted());
            if growth == 0 || self.blocks().fit_staged(growth) {
                return Ok(());
            }
            (
                "the files being written no longer fit in --cache-size; the write fails with ENOSPC (raise --cache-size)",
                FsError::NOSPC,
            )
        };
        self.warn_once_about(ino, problem);
        Err(error)
    }

    pub(super) fn commit_lock(&self, ino: u64) -> &tokio::sync::RwLock<()> {
        &self.commit_locks[(ino % COMMIT_LOCKS) as usize]
    }

    /// The commit locks of `ino` and of `other` (the file a rename replaces), exclusively,
    /// taken in the order of their places in `commit_locks` so that no two callers wait on
    /// each other; one guard when they share a lock.
    pub(super) async fn commit_locks_of_both(
        &self,
        ino: u64,
        other: Option<u64>,
    ) -> Vec<tokio::sync::RwLockWriteGuard<'_, ()>> {
        let mut places = vec![ino % COMMIT_LOCKS];
        places.extend(other.map(|o| o % COMMIT_LOCKS));
        places.sort_unstable();
        places.dedup();
        let mut guards = Vec::with_capacity(places.len());
        for place in places {
            guards.push(self.commit_locks[place as usize].write().await);
        }
        guards
    }

    /// Commits the staged copy of `ino` if it has changes: seals it (immutable, and durable
    /// by itself or by the journal record that carries it), journals it and queues its
    /// upload. Returns the queued change.
    pub(super) async fn commit_file(&self, ino: u64) -> FsResult<Option<u64>> {
        let _alone = self.commit_lock(ino).write().await;
        self.commit_locked(ino)
    }

    /// `commit_file` for a caller that holds the file's commit lock exclusively.
    pub(super) fn commit_locked(&self, ino: u64) -> FsResult<Option<u64>> {
        let (staged, size, path, version) = {
            let t = self.ns.table.lock();
            let i = t.get(ino).ok_or(FsError::NOENT)?;
            match i.state() {
                State::LocalOnly { copy }
                | State::Dirty { copy }
                | State::OverReplaced { copy } => (copy.clone(), i.size, i.path.clone(), i.version),
                _ => return Ok(None),
            }
        };
        let key = self.ns.keys.file_key(&path)?;
        if !staged.is_sealed() {
            // A write that failed part way may have left bytes past the size written.
            staged.set_len(size)?;
        }
        let seq = self.queue(self.writeback.upload(&key, staged, size))?;
        self.ns.note_present(
            &path,
            &Remote {
                kind: Kind::File,
                size,
                mtime: SystemTime::now(),
                etag: None,
            },
        );
        let mut t = self.ns.table.lock();
        if let Some(i) = t.get_mut(ino) {
            i.committed(version);
            i.etag = None;
            i.validated = Some(Instant::now());
        }
        Ok(Some(seq))
    }
}

async fn read_staged(staged: &Arc<StagedFile>, offset: u64, size: u32) -> FsResult<Bytes> {
    let staged = staged.clone();
    tokio::task::spawn_blocking(move || {
        // A sealed copy changed on disk since its close is never served.
        let file = staged.checked_file()?;
        let buf = crate::cache::read_at_most(&file, offset, size as usize)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(|_| FsError::IO)?
}
