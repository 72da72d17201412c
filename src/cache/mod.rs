//! The on-disk cache directory of one mount: the staged copies of files being written, the
//! write-back journal with the sealed copies it refers to, the clean block cache, and the
//! lock that keeps two mounts from sharing one directory.

mod blocks;
mod direct;
mod group_sync;
mod journal;
mod lock;
mod staging;

pub use blocks::{
    allocated, BlockCache, BlockId, BlockStats, CacheLimits, MinFree, ObjectId, StagedBytes,
    WholeObject,
};
pub use direct::DIRECT_ALIGN;
pub use journal::{create_dir_durably, sync_dir, Change, Journal, Replay, CARRIED_MAX};
pub use lock::CacheLock;
pub use staging::{StagedFile, StagingArea};

/// `len` bytes of `file` from `offset`, read into a new buffer without zeroing it first:
/// upload bodies and reads of staged copies are MiBs at a time, and zeroing them cost a
/// tenth of the mount's CPU while it uploads. Ends early only where the file does.
pub fn read_at_most(file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        let at = libc::off_t::try_from(at)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let want = len - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..want];
        // SAFETY: pread writes at most `spare.len()` bytes into the vector's spare capacity,
        // which is valid for writes; only the bytes it reports written are taken in.
        let n =
            unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at) };
        match n {
            0 => break,
            n if n > 0 => {
                // SAFETY: the first `n` bytes of the spare capacity were just written.
                unsafe { buf.set_len(buf.len() + n as usize) };
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn read_at_most_reads_what_the_file_holds_from_the_offset() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123456789").unwrap();
        assert_eq!(super::read_at_most(&f, 0, 10).unwrap(), b"0123456789");
        assert_eq!(super::read_at_most(&f, 3, 4).unwrap(), b"3456");
        assert_eq!(super::read_at_most(&f, 7, 100).unwrap(), b"789");
        assert!(super::read_at_most(&f, 20, 5).unwrap().is_empty());
        assert!(super::read_at_most(&f, 0, 0).unwrap().is_empty());
    }
}
