//! Kernel passthrough: open files that the kernel reads straight from their cache file,
//! without a request to the mount per read.
//!
//! The kernel allows an inode's open files to be either all passed through, to one backing
//! file, or all read through the mount; an open that would mix the two fails with EIO. This
//! module keeps that rule: it counts each inode's open files of either kind. While an inode
//! is passed through, an open that cannot join it (for writing, or of another version of
//! the object) is refused with ETXTBSY, as Linux refuses writes to a running program; with
//! files read through the mount open, new opens are read through the mount too. Counts fall
//! when the kernel releases a handle, which it does after it has let go of the handle
//! itself, so they never undercount what the kernel holds.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use fuser::{BackingId, Errno, FileHandle, FopenFlags, ReplyOpen};
use parking_lot::Mutex;

/// How `reply_open` answered an open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The kernel reads the backing file.
    PassedThrough,
    /// The kernel reads through the mount.
    ThroughMount,
    /// Refused with ETXTBSY: the handle must be released.
    Refused,
}

/// How the kernel reads one open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Through the mount.
    Mount,
    /// From the backing file.
    Passthrough,
}

/// The backing file the kernel reads an inode's passed-through files from.
struct Backing {
    /// Device and inode of the cache file.
    file: (u64, u64),
    /// What content it holds, as the file system named it (`Backed::File`).
    content: String,
    id: Arc<BackingId>,
    handles: u32,
}

/// What an open may be passed through to, as the file system decides.
pub enum Backed {
    /// Nothing: it is read through the mount.
    No,
    /// The file the inode is passed through to already, whose content the file system knows
    /// to be the one this open reads.
    Same,
    /// This local file, holding the content named by the string.
    File(File, String),
}

#[derive(Default)]
struct InodeFiles {
    cached: u32,
    backing: Option<Backing>,
}

#[derive(Default)]
struct Files {
    inodes: HashMap<u64, InodeFiles>,
    handles: HashMap<u64, (u64, Mode)>,
}

pub struct Passthrough {
    enabled: AtomicBool,
    files: Mutex<Files>,
    opened: AtomicU64,
}

impl Passthrough {
    pub fn new(enabled: bool) -> Self {
        Passthrough {
            enabled: AtomicBool::new(enabled),
            files: Mutex::new(Files::default()),
            opened: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Turns passthrough off for the rest of the mount, saying why.
    pub fn disable(&self, why: &str) {
        if self.enabled.swap(false, Ordering::Relaxed) {
            tracing::info!(
                reason = why,
                "kernel passthrough is off; cached files are read through the mount"
            );
        }
    }

    /// What content inode `ino` is passed through to right now, if it is.
    pub fn backing_content(&self, ino: u64) -> Option<String> {
        let files = self.files.lock();
        Some(files.inodes.get(&ino)?.backing.as_ref()?.content.clone())
    }

    /// Answers the read-only open of `fh` on inode `ino`: passed through as `backed` says
    /// when the inode allows it, else read through the mount, keeping the kernel's page cache
    /// of the file when `keep_cache`. The kernel sends no flush at its close(): a handle that
    /// only reads has nothing to commit, and the close costs no round trip to the mount.
    /// Says how the kernel reads the handle; `Refused` (ETXTBSY) when `fh` must be released.
    pub fn reply_open(
        &self,
        reply: ReplyOpen,
        ino: u64,
        fh: u64,
        backed: Backed,
        keep_cache: bool,
    ) -> Opened {
        let mut files = self.files.lock();
        let inode = files.inodes.entry(ino).or_default();
        let id = match backed {
            _ if !self.enabled() || inode.cached > 0 => None,
            Backed::No => None,
            Backed::Same => inode.backing.as_mut().map(|b| {
                b.handles += 1;
                b.id.clone()
            }),
            Backed::File(file, content) => match file.metadata() {
                Err(_) => None,
                Ok(m) => {
                    let identity = (m.dev(), m.ino());
                    match &mut inode.backing {
                        Some(b) if b.file == identity => {
                            b.handles += 1;
                            Some(b.id.clone())
                        }
                        // Passed through to another version of the object.
                        Some(_) => None,
                        None => match reply.open_backing(&file) {
                            Ok(id) => {
                                let id = Arc::new(id);
                                inode.backing = Some(Backing {
                                    file: identity,
                                    content,
                                    id: id.clone(),
                                    handles: 1,
                                });
                                Some(id)
                            }
                            Err(e) => {
                                self.disable(&format!("the kernel refused a backing file: {e}"));
                                None
                            }
                        },
                    }
                }
            },
        };
        if let Some(id) = id {
            // The kernel takes no FOPEN_KEEP_CACHE with a backing file (it fails the open
            // with EIO): a passed-through open drops the pages the file's writes filled.
            files.handles.insert(fh, (ino, Mode::Passthrough));
            drop(files);
            self.opened.fetch_add(1, Ordering::Relaxed);
            reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &id);
            return Opened::PassedThrough;
        }
        if Self::through_mount(&mut files, ino, fh) {
            drop(files);
            let flags = if keep_cache {
                FopenFlags::FOPEN_NOFLUSH | FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::FOPEN_NOFLUSH
            };
            reply.opened(FileHandle(fh), flags);
            Opened::ThroughMount
        } else {
            drop(files);
            reply.error(Errno::ETXTBSY);
            Opened::Refused
        }
    }

    /// Keeps inode `ino` read through the mount for a handle being opened for writing, before
    /// the open changes anything (O_TRUNC): from now on no open of it is passed through.
    /// Returns false, changing nothing, when it is passed through already. The place is
    /// given to the handle with `bind_reserved`, or back with `cancel_reserved`.
    pub fn reserve(&self, ino: u64) -> bool {
        let mut files = self.files.lock();
        let inode = files.inodes.entry(ino).or_default();
        if inode.backing.is_some() {
            return false;
        }
        inode.cached += 1;
        true
    }

    /// The handle `fh` opened on inode `ino` takes the place `reserve` kept.
    pub fn bind_reserved(&self, ino: u64, fh: u64) {
        self.files.lock().handles.insert(fh, (ino, Mode::Mount));
    }

    /// The open that `reserve` kept a place for failed.
    pub fn cancel_reserved(&self, ino: u64) {
        let mut files = self.files.lock();
        if let Some(inode) = files.inodes.get_mut(&ino) {
            inode.cached = inode.cached.saturating_sub(1);
            if inode.cached == 0 && inode.backing.is_none() {
                files.inodes.remove(&ino);
            }
        }
    }

    /// Records `fh`, a new handle on inode `ino` that is read through the mount. Returns
    /// false when the inode is passed through, so that the kernel would refuse the handle.
    pub fn open_through_mount(&self, ino: u64, fh: u64) -> bool {
        Self::through_mount(&mut self.files.lock(), ino, fh)
    }

    fn through_mount(files: &mut Files, ino: u64, fh: u64) -> bool {
        let inode = files.inodes.entry(ino).or_default();
        if inode.backing.is_some() {
            return false;
        }
        inode.cached += 1;
        files.handles.insert(fh, (ino, Mode::Mount));
        true
    }

    /// The kernel has released `fh`.
    pub fn released(&self, fh: u64) {
        let mut files = self.files.lock();
        let Some((ino, mode)) = files.handles.remove(&fh) else {
            return;
        };
        let Some(inode) = files.inodes.get_mut(&ino) else {
            return;
        };
        match mode {
            Mode::Mount => inode.cached = inode.cached.saturating_sub(1),
            Mode::Passthrough => {
                if let Some(b) = &mut inode.backing {
                    b.handles -= 1;
                    if b.handles == 0 {
                        // Dropping the last reference closes the backing file in the kernel.
                        inode.backing = None;
                    }
                }
            }
        }
        if inode.cached == 0 && inode.backing.is_none() {
            files.inodes.remove(&ino);
        }
    }

    /// Opens passed through so far.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Open files passed through right now.
    pub fn open_count(&self) -> u64 {
        self.files
            .lock()
            .handles
            .values()
            .filter(|(_, m)| *m == Mode::Passthrough)
            .count() as u64
    }
}
