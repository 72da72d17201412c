//! An exclusive lock on a cache directory, held for the life of the mount.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct CacheLock {
    file: File,
}

/// What the lock file says after the holder's pid once its mount is gone and it only
/// uploads what is pending.
const DRAINING: &str = "draining";

/// How long a holder that does not say it drains is given to say so: the time between its
/// unmount and its note.
const HANDOVER: Duration = Duration::from_secs(3);

impl CacheLock {
    /// Takes the lock, or says which process holds it. A process that holds it only to
    /// finish the uploads of a mount already unmounted (a remount, a restart of the unit)
    /// is waited for, with a log line.
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
        let mut next_log: Option<Instant> = None;
        let mut first_refused: Option<Instant> = None;
        loop {
            // SAFETY: flock on a valid, owned file descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(format!("cannot lock {}: {err}", path.display()));
            }
            let mut holder = String::new();
            let _ = file.rewind().and_then(|_| file.read_to_string(&mut holder));
            let (pid, state) = holder.trim().split_once(' ').unwrap_or((holder.trim(), ""));
            // A holder just unmounted may not have said it drains yet: given a moment.
            let refused_since = *first_refused.get_or_insert_with(Instant::now);
            if state != DRAINING {
                if refused_since.elapsed() >= HANDOVER {
                    return Err(format!(
                        "the cache directory {} is in use by another s3mediafs mount (pid {pid}); \
                         give each mount its own --cache-dir",
                        cache_dir.display(),
                    ));
                }
            } else if next_log.is_none_or(|at| Instant::now() >= at) {
                tracing::warn!(pid, cache_dir = %cache_dir.display(),
                    "the previous mount of this cache directory is still uploading what was pending when it was unmounted; waiting for it to finish (`kill` it twice to stop it at once: what is pending stays journaled and this mount uploads it)");
                next_log = Some(Instant::now() + Duration::from_secs(60));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Written before the old text is cut off, so a reader never finds it empty.
        let pid = std::process::id().to_string();
        file.write_all_at(pid.as_bytes(), 0)
            .and_then(|_| file.set_len(pid.len() as u64))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(CacheLock { file })
    }

    /// The mount is gone; the lock is held only while what is pending is uploaded: a new
    /// mount of this cache directory waits for that instead of failing.
    pub fn mark_draining(&self) {
        let said = format!("{} {DRAINING}", std::process::id());
        let _ = self.file.write_all_at(said.as_bytes(), 0);
    }
}
