//! One fsync for many callers: a caller that needs what it did before the call (a rename
//! into a directory, say) made durable waits for an fsync that began after the call, and
//! runs one itself when none is running; callers arriving while one runs share the next.
//! A failed fsync fails every caller it was to cover.

use std::io;

use parking_lot::{Condvar, Mutex};

#[derive(Default)]
struct State {
    /// fsyncs begun, and the last one that succeeded, by number.
    begun: u64,
    done: u64,
    running: bool,
    /// The last fsync that failed, and its errno.
    failed: Option<(u64, i32)>,
}

#[derive(Default)]
pub struct GroupSync {
    state: Mutex<State>,
    finished: Condvar,
}

impl GroupSync {
    /// Returns once `fsync` has succeeded in a run that began after this call, or fails
    /// with the error of the run that was to cover it.
    pub fn sync(&self, fsync: impl Fn() -> io::Result<()>) -> io::Result<()> {
        let mut s = self.state.lock();
        // A run under way may have begun before what the caller did.
        let need = s.begun + 1;
        loop {
            if let Some((run, errno)) = s.failed {
                if run >= need {
                    return Err(io::Error::from_raw_os_error(errno));
                }
            }
            if s.done >= need {
                return Ok(());
            }
            if s.running {
                self.finished.wait(&mut s);
                continue;
            }
            s.running = true;
            s.begun += 1;
            let run = s.begun;
            let result = parking_lot::MutexGuard::unlocked(&mut s, &fsync);
            s.running = false;
            match result {
                Ok(()) => s.done = run,
                Err(e) => s.failed = Some((run, e.raw_os_error().unwrap_or(libc::EIO))),
            }
            self.finished.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[test]
    fn callers_at_the_same_time_share_fsyncs() {
        let g = GroupSync::default();
        let runs = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..16 {
                s.spawn(|| {
                    for _ in 0..20 {
                        g.sync(|| {
                            runs.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(2));
                            Ok(())
                        })
                        .unwrap();
                    }
                });
            }
        });
        let runs = runs.load(Ordering::Relaxed);
        assert!(runs < 16 * 20 / 2, "{runs} fsyncs for 320 calls");
    }

    #[test]
    fn a_failed_fsync_fails_its_callers_and_the_next_run_serves_the_next_ones() {
        let g = GroupSync::default();
        let e = g
            .sync(|| Err(io::Error::from_raw_os_error(libc::EIO)))
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        g.sync(|| Ok(())).unwrap();
    }
}
