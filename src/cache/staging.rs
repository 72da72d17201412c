//! Staged files: the local copy of a file while it is written. Random writes, truncation
//! and appends happen here. When the file is closed its copy is sealed: fsynced, moved
//! next to the journal and never changed again, until its upload is done.
//!
//! Only a copy being written holds a descriptor. A sealed copy is opened for each use (a
//! read, an upload) and closed after it, so thousands of files waiting for upload cost no
//! descriptors: the number open follows the uploads and reads in flight, not the backlog.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::blocks::{allocated, StagedBytes};

pub struct StagingArea {
    dir: PathBuf,
    seq: AtomicU64,
    bytes: Arc<StagedBytes>,
}

impl StagingArea {
    /// Opens `cache_dir/staging`, removing copies a previous run left behind: files that
    /// were never closed, so never acknowledged.
    /// The space staged files take is added to `bytes`.
    pub fn open(cache_dir: &Path, bytes: Arc<StagedBytes>) -> io::Result<Self> {
        let dir = cache_dir.join("staging");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let mut stale = 0;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if std::fs::remove_file(entry.path()).is_ok() {
                stale += 1;
            }
        }
        if stale > 0 {
            tracing::info!(count = stale, dir = %dir.display(), "removed copies of files that were open for writing when the last run ended");
        }
        Ok(StagingArea {
            dir,
            seq: AtomicU64::new(0),
            bytes,
        })
    }

    fn new_path(&self) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{n:016x}"))
    }

    /// A new, empty staged file.
    pub fn create(&self) -> io::Result<StagedFile> {
        let path = self.new_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(StagedFile::new(path, Some(file), false, self.bytes.clone()))
    }

    /// Bytes all staged and sealed files take on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    /// A new staged file with the content of `src` (to change a sealed file).
    pub fn create_copy(&self, src: &StagedFile) -> io::Result<StagedFile> {
        let staged = self.create()?;
        let from = src.file()?;
        let to = staged.file()?;
        let len = io::copy(&mut &*from, &mut &*to)?;
        staged.grew_to(len);
        Ok(staged)
    }
}

/// One staged or sealed file. An unsealed file is removed when dropped; a sealed one only
/// once its upload is done, so a crash or an unmount keeps it for the journal.
pub struct StagedFile {
    path: Mutex<PathBuf>,
    /// The descriptor of a copy being written; None once sealed.
    writable: Mutex<Option<Arc<File>>>,
    sealed: AtomicBool,
    done: AtomicBool,
    /// An fdatasync of it failed.
    sync_failed: AtomicBool,
    /// Disk space counted for this file in `counter`.
    accounted: AtomicU64,
    counter: Arc<StagedBytes>,
}

impl std::fmt::Debug for StagedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StagedFile({})", self.path().display())
    }
}

impl StagedFile {
    fn new(path: PathBuf, file: Option<File>, sealed: bool, counter: Arc<StagedBytes>) -> Self {
        StagedFile {
            path: Mutex::new(path),
            writable: Mutex::new(file.map(Arc::new)),
            sealed: AtomicBool::new(sealed),
            done: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
            accounted: AtomicU64::new(0),
            counter,
        }
    }

    /// A sealed file found by the journal's replay. It is not opened: replaying any number
    /// of changes takes no descriptor.
    pub fn open_sealed(path: &Path, counter: &Arc<StagedBytes>) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file",
            ));
        }
        let len = meta.len();
        let f = StagedFile::new(path.to_path_buf(), None, true, counter.clone());
        f.set_accounted(len);
        Ok(f)
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.writable()?.write_all_at(data, offset)?;
        self.grew_to(offset + data.len() as u64);
        Ok(())
    }

    /// Truncates or extends the file to `len` bytes.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?.set_len(len)?;
        self.set_accounted(len);
        Ok(())
    }

    /// Space this file takes on disk, as counted.
    pub fn accounted(&self) -> u64 {
        self.accounted.load(Ordering::Relaxed)
    }

    fn grew_to(&self, len: u64) {
        if allocated(len) > self.accounted() {
            self.set_accounted(len);
        }
    }

    fn set_accounted(&self, len: u64) {
        let new = allocated(len);
        let old = self.accounted.swap(new, Ordering::Relaxed);
        if new > old {
            self.counter.add(new - old);
        } else {
            self.counter.sub(old - new);
        }
    }

    /// The content, open for reading: the descriptor of a copy being written, or the sealed
    /// copy opened for this use (closed when the last clone is dropped).
    pub fn file(&self) -> io::Result<Arc<File>> {
        if let Some(f) = &*self.writable.lock() {
            return Ok(f.clone());
        }
        // The path lock keeps a seal's rename from moving the file while it is opened.
        let path = self.path.lock();
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&*path)?;
        Ok(Arc::new(file))
    }

    fn writable(&self) -> io::Result<Arc<File>> {
        self.writable.lock().clone().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "a sealed copy never changes",
            )
        })
    }

    pub fn path(&self) -> PathBuf {
        self.path.lock().clone()
    }

    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// Makes the content durable under `dest`; from now on it never changes. `sync_dir`
    /// makes the rename into `dest`'s directory durable.
    pub fn seal(&self, dest: &Path, sync_dir: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        if self.sync_failed.load(Ordering::Acquire) {
            // After a failed fdatasync the kernel may have dropped the dirty pages and a
            // second one would succeed without them: this copy is never trusted again.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if let Err(e) = self.writable()?.sync_data() {
            self.sync_failed.store(true, Ordering::Release);
            return Err(e);
        }
        {
            let mut path = self.path.lock();
            std::fs::rename(&*path, dest)?;
            *path = dest.to_path_buf();
        }
        sync_dir()?;
        self.sealed.store(true, Ordering::Release);
        // Readers that hold the descriptor keep it until they are done with it.
        *self.writable.lock() = None;
        Ok(())
    }

    /// A second sealed file with the same content under `dest` (a hard link); `sync_dir`
    /// makes the link durable.
    pub fn link_sealed(
        &self,
        dest: &Path,
        sync_dir: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<StagedFile> {
        std::fs::hard_link(self.path(), dest)?;
        sync_dir()?;
        StagedFile::open_sealed(dest, &self.counter)
    }

    /// The change that carried this file is in the bucket: the file may go.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        self.counter.sub(*self.accounted.get_mut());
        if !self.sealed.load(Ordering::Acquire) || self.done.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(self.path.get_mut());
        }
    }
}
