//! An exclusive lock on a cache directory, held for the life of the mount.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

#[derive(Debug)]
pub struct CacheLock {
    _file: File,
}

impl CacheLock {
    /// Takes the lock, or says which process holds it.
    pub fn acquire(cache_dir: &Path) -> Result<Self, String> {
        let path = cache_dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| format!("cannot open the lock file {}: {e}", path.display()))?;
        // SAFETY: flock on a valid, owned file descriptor.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                format!(
                    "the cache directory {} is in use by another s3mediafs mount (pid {}); \
                     give each mount its own --cache-dir",
                    cache_dir.display(),
                    holder.trim()
                )
            } else {
                format!("cannot lock {}: {err}", path.display())
            });
        }
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| write!(file, "{}", std::process::id()))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(CacheLock { _file: file })
    }
}
