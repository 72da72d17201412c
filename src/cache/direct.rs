//! Block writes that bypass the page cache.
//!
//! A block fetched for a reader is already in the kernel's cache of the mounted file. Written
//! to its cache file through the page cache, it would sit in memory a second time, and the
//! write would cost a copy into newly allocated pages, which on a virtual machine can cost
//! several times the copy itself. So blocks are written with O_DIRECT: their page-aligned
//! part from a reused aligned buffer, the tail under one page through the page cache. Where
//! the cache filesystem refuses O_DIRECT (tmpfs on older kernels, some network and FUSE
//! filesystems), every write goes through the page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// The alignment O_DIRECT asks of offsets, lengths and buffers on common filesystems. Data
/// handed over on this boundary is written with no copy first.
pub const DIRECT_ALIGN: usize = 4096;
/// Aligned buffers kept for reuse; more concurrent writes allocate their own.
const KEPT_BUFFERS: usize = 4;

/// Whether a block written to the cache stays in the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    /// Written around it (O_DIRECT where the filesystem takes it): a block a reader fetched,
    /// already in the kernel's cache of the mounted file.
    Bypass,
    /// Written through it: the content of a file this mount uploaded, which is read next
    /// through its cache file (passed through to the kernel), not the mounted file's pages.
    Keep,
}

pub struct DirectWrites {
    enabled: AtomicBool,
    block_size: usize,
    buffers: Mutex<Vec<Vec<u8>>>,
}

impl DirectWrites {
    pub fn new(block_size: u64, enabled: bool) -> Self {
        DirectWrites {
            enabled: AtomicBool::new(enabled),
            block_size: block_size as usize,
            buffers: Mutex::new(Vec::new()),
        }
    }

    /// Writes `data`, at most one block, at the page-aligned `offset` of the file at
    /// `path`, of which `file` is an ordinary open handle.
    pub fn write_at(
        &self,
        path: &Path,
        file: &File,
        data: &[u8],
        offset: u64,
        pages: Pages,
    ) -> io::Result<()> {
        debug_assert!(
            !self.enabled.load(Ordering::Relaxed)
                || offset % DIRECT_ALIGN as u64 == 0 && data.len() <= self.block_size
        );
        let aligned = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        let mut done = 0;
        if aligned > 0 && pages == Pages::Bypass && self.enabled.load(Ordering::Relaxed) {
            match self.write_direct(path, &data[..aligned], offset) {
                Ok(()) => done = aligned,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if self.enabled.swap(false, Ordering::Relaxed) {
                        tracing::info!(dir = %path.parent().unwrap_or(path).display(),
                            "the cache filesystem does not take direct writes; caching blocks through the page cache");
                    }
                }
                Err(e) => return Err(e),
            }
        }
        file.write_all_at(&data[done..], offset + done as u64)
    }

    fn write_direct(&self, path: &Path, data: &[u8], offset: u64) -> io::Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        if data.as_ptr() as usize % DIRECT_ALIGN == 0 {
            return f.write_all_at(data, offset);
        }
        let mut buf = self
            .buffers
            .lock()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.block_size + DIRECT_ALIGN]);
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let copy = &mut buf[start..start + data.len()];
        copy.copy_from_slice(data);
        let written = f.write_all_at(copy, offset);
        let mut kept = self.buffers.lock();
        if kept.len() < KEPT_BUFFERS {
            kept.push(buf);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn blocks_of_any_length_and_alignment_read_back_whole() {
        for direct in [true, false] {
            write_three_blocks(direct);
        }
    }

    fn write_three_blocks(direct: bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let bs = 64 << 10;
        let w = DirectWrites::new(bs as u64, direct);
        let data: Vec<u8> = (0..3 * bs + 1).map(|i| (i * 7 % 251) as u8).collect();
        // Block 0 from an unaligned slice, block 1 whole, block 2 short with a tail.
        w.write_at(&path, &file, &data[1..bs + 1], 0, Pages::Bypass)
            .unwrap();
        w.write_at(&path, &file, &data[bs..2 * bs], bs as u64, Pages::Bypass)
            .unwrap();
        w.write_at(
            &path,
            &file,
            &data[2 * bs..2 * bs + 5000],
            2 * bs as u64,
            Pages::Bypass,
        )
        .unwrap();
        let mut back = vec![0u8; 2 * bs + 5000];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[..bs], &data[1..bs + 1]);
        assert_eq!(&back[bs..], &data[bs..2 * bs + 5000]);
        assert_eq!(file.metadata().unwrap().len(), 2 * bs as u64 + 5000);
    }
}
