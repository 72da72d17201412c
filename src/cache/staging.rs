//! Staged files: the local copy of a file while it is written. Random writes, truncation
//! and appends happen here; the whole file is uploaded as one object.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub struct StagingArea {
    dir: PathBuf,
    seq: AtomicU64,
}

impl StagingArea {
    /// Opens `cache_dir/staging`, removing copies a previous run left behind.
    pub fn open(cache_dir: &Path) -> io::Result<Self> {
        let dir = cache_dir.join("staging");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let mut stale = 0;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if std::fs::remove_file(entry.path()).is_ok() {
                stale += 1;
            }
        }
        if stale > 0 {
            tracing::info!(count = stale, dir = %dir.display(), "removed staged copies left by an earlier run");
        }
        Ok(StagingArea { dir, seq: AtomicU64::new(0) })
    }

    /// A new, empty staged file.
    pub fn create(&self) -> io::Result<StagedFile> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{n:016x}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(StagedFile { path, file: Arc::new(file) })
    }
}

/// One staged file; removed from disk when dropped.
#[derive(Debug)]
pub struct StagedFile {
    path: PathBuf,
    file: Arc<File>,
}

impl StagedFile {
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
