//! Staged files: the local copy of a file while it is written. Random writes, truncation
//! and appends happen here. When the file is closed its copy is sealed: fsynced (or, for a
//! small file, left to the journal record that carries its content), moved next to the
//! journal and never changed again, until its upload is done.
//!
//! A sealed copy is served and uploaded only while it holds what was written: its CRC-32
//! is taken when it is sealed (as the writes arrive, when they come front to back) and
//! journaled with its upload. Each use checks the file's fingerprint (inode, size, change
//! and modification times) against the one it had when it last matched, and checks the
//! content again when the fingerprint differs; a copy that fails is never read or uploaded.
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

use super::blocks::{allocated, Fingerprint, StagedBytes};

/// What is known of a staged file's content, to tell a damaged copy from a good one.
#[derive(Clone)]
enum Checksum {
    /// Written front to back so far: the CRC-32 of its first `len` bytes.
    Running(crc32fast::Hasher, u64),
    /// Written out of order: the checksum is computed from the file when it is sealed.
    Unknown,
    /// Sealed with this CRC-32 (None: journaled by a version that took none), and the
    /// fingerprint of the file when its content last matched.
    Sealed {
        crc: Option<u32>,
        seen: Option<Fingerprint>,
    },
    /// Sealed with this CRC-32, and found not to hold what was written.
    Damaged { crc: u32 },
}

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

    /// A new staged file with the content of `src` (to change a sealed file). The bytes
    /// copied are checked against `src`'s checksum, so a change made to it on disk during
    /// the copy is not carried into the new file.
    pub fn create_copy(&self, src: &StagedFile) -> io::Result<StagedFile> {
        use std::os::unix::fs::FileExt;
        let staged = self.create()?;
        let from = src.checked_file()?;
        let to = staged.file()?;
        let mut crc = crc32fast::Hasher::new();
        let len = read_chunks(&from, |chunk, at| {
            crc.update(chunk);
            to.write_all_at(chunk, at)
        })?;
        if let Some(expected) = src.crc() {
            let found = crc.clone().finalize();
            if found != expected {
                src.found_changed(expected, found);
                return Err(damaged());
            }
        }
        staged.grew_to(len);
        *staged.checksum.lock() = Checksum::Running(crc, len);
        // Left to the seal's fdatasync: written out here, a large copy would be all at once.
        staged.written_out.store(len, Ordering::Relaxed);
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
    checksum: Mutex<Checksum>,
    /// Disk space counted for this file in `counter`.
    accounted: AtomicU64,
    counter: Arc<StagedBytes>,
    /// Where the write-out of what was written in order began last (`write_at`).
    written_out: AtomicU64,
}

/// Written this far past the last write-out, a copy being written starts the write-out of
/// those bytes to disk, without waiting for it: the fdatasync at its close then finds little
/// left to write (100 MiB take some 55 ms here, and a 4 MiB upload 10–20 ms, during which
/// close() waits, and Synapse with it, on its one thread for file operations).
const WRITE_OUT_EVERY: u64 = 1 << 20;

impl std::fmt::Debug for StagedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StagedFile({})", self.path().display())
    }
}

/// A sealed copy to read and check before use (`StagedFile::check`): the file, its sealed
/// CRC-32 and its fingerprint now.
pub struct ToCheck(Arc<File>, u32, Fingerprint);

impl StagedFile {
    fn new(path: PathBuf, file: Option<File>, sealed: bool, counter: Arc<StagedBytes>) -> Self {
        StagedFile {
            path: Mutex::new(path),
            writable: Mutex::new(file.map(Arc::new)),
            sealed: AtomicBool::new(sealed),
            done: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
            checksum: Mutex::new(Checksum::Running(crc32fast::Hasher::new(), 0)),
            accounted: AtomicU64::new(0),
            counter,
            written_out: AtomicU64::new(0),
        }
    }

    /// A sealed file found by the journal's replay, with the CRC-32 journaled for it. It is
    /// not opened: replaying any number of changes takes no descriptor.
    pub fn open_sealed(
        path: &Path,
        counter: &Arc<StagedBytes>,
        crc: Option<u32>,
    ) -> io::Result<Self> {
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
        *f.checksum.lock() = Checksum::Sealed { crc, seen: None };
        Ok(f)
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = self.writable()?;
        let mut checksum = self.checksum.lock();
        if let Err(e) = file.write_all_at(data, offset) {
            // Part of it may be written.
            *checksum = Checksum::Unknown;
            return Err(e);
        }
        let end = offset + data.len() as u64;
        match &mut *checksum {
            Checksum::Running(crc, len) if *len == offset => {
                crc.update(data);
                *len = end;
            }
            c => *c = Checksum::Unknown,
        }
        drop(checksum);
        self.grew_to(end);
        self.write_out_before(&file, end);
        Ok(())
    }

    /// Starts writing bytes up to `end` out to disk once `WRITE_OUT_EVERY` of them are
    /// waiting since the last time. Durability is still the fdatasync's at the seal: this
    /// only starts early what it would write.
    fn write_out_before(&self, file: &File, end: u64) {
        let from = self.written_out.load(Ordering::Relaxed);
        if end < from.saturating_add(WRITE_OUT_EVERY) {
            return;
        }
        // One writer starts each stretch; a write far past the last one starts only the
        // stretch before it, not everything since.
        let moved =
            self.written_out
                .compare_exchange(from, end, Ordering::Relaxed, Ordering::Relaxed);
        if moved.is_err() {
            return;
        }
        let from = from.max(end.saturating_sub(2 * WRITE_OUT_EVERY));
        start_write_out(file, from, end - from);
    }

    /// Truncates or extends the file to `len` bytes.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        let file = self.writable()?;
        let mut checksum = self.checksum.lock();
        if let Err(e) = file.set_len(len) {
            *checksum = Checksum::Unknown;
            return Err(e);
        }
        match &*checksum {
            _ if len == 0 => *checksum = Checksum::Running(crc32fast::Hasher::new(), 0),
            // Cut back to exactly what was checksummed: nothing to change.
            Checksum::Running(_, at) if *at == len => {}
            _ => *checksum = Checksum::Unknown,
        }
        drop(checksum);
        self.set_accounted(len);
        // Written again after a cut, the file is written out again as it grows.
        self.written_out.fetch_min(len, Ordering::Relaxed);
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

    /// The content, open for reading, as `file`; a sealed copy only while it still holds
    /// what was written. The first use after its fingerprint changed reads it whole.
    pub fn checked_file(&self) -> io::Result<Arc<File>> {
        match self.file_unread()? {
            Ok(file) => Ok(file),
            Err(to_check) => self.check(to_check),
        }
    }

    /// Reads a sealed copy `file_unread` could not trust whole: it is handed out if it still
    /// has its sealed CRC-32, and never read again if not.
    pub fn check(&self, ToCheck(file, crc, now): ToCheck) -> io::Result<Arc<File>> {
        let found = crc_of(&file)?;
        if found == crc {
            if let Checksum::Sealed { seen, .. } = &mut *self.checksum.lock() {
                *seen = Some(now);
            }
            return Ok(file);
        }
        self.found_changed(crc, found);
        Err(damaged())
    }

    /// `checked_file` as far as it goes without reading: the content open for reading, or,
    /// for a sealed copy whose fingerprint changed since it was last found intact, what
    /// `check` must read first.
    pub fn file_unread(&self) -> io::Result<Result<Arc<File>, ToCheck>> {
        let file = self.file()?;
        if !self.is_sealed() {
            return Ok(Ok(file));
        }
        match &*self.checksum.lock() {
            Checksum::Damaged { .. } => Err(damaged()),
            Checksum::Sealed {
                crc: Some(crc),
                seen,
            } => {
                let now = Fingerprint::of(&file)?;
                Ok(if *seen == Some(now) {
                    Ok(file)
                } else {
                    Err(ToCheck(file, *crc, now))
                })
            }
            _ => Ok(Ok(file)),
        }
    }

    /// The copy was read with CRC-32 `found` where `expected` was sealed: it is never read
    /// or uploaded again. Logged once.
    pub fn found_changed(&self, expected: u32, found: u32) {
        let mut checksum = self.checksum.lock();
        if !matches!(*checksum, Checksum::Damaged { .. }) {
            *checksum = Checksum::Damaged { crc: expected };
            tracing::error!(
                path = %self.path().display(),
                expected = format_args!("{expected:08x}"),
                found = format_args!("{found:08x}"),
                "a local copy waiting for upload was changed on disk since it was closed: it is neither read nor uploaded; restore it from a backup of the cache directory, or write the file again"
            );
        }
    }

    /// The copy got another name (see `BlockCache::adopt`), which changed its change time:
    /// read whole at `before` with the CRC-32 it was sealed with, and the same file but for
    /// that change since, it needs no check at its next use.
    pub(super) fn linked(&self, before: &Fingerprint, after: Fingerprint) {
        if let Checksum::Sealed { seen, .. } = &mut *self.checksum.lock() {
            if after.same_content_as(before) {
                *seen = Some(after);
            }
        }
    }

    /// The CRC-32 taken when the copy was sealed, if it was (found damaged since or not).
    pub fn crc(&self) -> Option<u32> {
        match &*self.checksum.lock() {
            Checksum::Sealed { crc, .. } => *crc,
            Checksum::Damaged { crc } => Some(*crc),
            _ => None,
        }
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

    /// The length of the file on disk now.
    pub fn size_on_disk(&self) -> io::Result<u64> {
        Ok(std::fs::symlink_metadata(&*self.path.lock())?.len())
    }

    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// An fdatasync of it failed: it can never be sealed, and its content is in doubt.
    pub fn sync_failed(&self) -> bool {
        self.sync_failed.load(Ordering::Acquire)
    }

    /// As if an fdatasync of it had failed.
    #[cfg(test)]
    pub(crate) fn fail_sync(&self) {
        self.sync_failed.store(true, Ordering::Release);
    }

    /// Makes the content durable under `dest`; from now on it never changes. `sync_dir`
    /// makes the rename into `dest`'s directory durable.
    pub fn seal(&self, dest: &Path, sync_dir: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        self.seal_as(dest, Some(sync_dir))
    }

    /// Moves the content to `dest`, where from now on it never changes, without making it
    /// durable there: for a copy whose journal record carries its content (`sealed_content`).
    pub fn seal_unsynced(&self, dest: &Path) -> io::Result<()> {
        self.seal_as(dest, None::<fn() -> io::Result<()>>)
    }

    fn seal_as(
        &self,
        dest: &Path,
        sync_dir: Option<impl FnOnce() -> io::Result<()>>,
    ) -> io::Result<()> {
        if self.sync_failed.load(Ordering::Acquire) {
            // After a failed fdatasync the kernel may have dropped the dirty pages and a
            // second one would succeed without them: this copy is never trusted again.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let file = self.writable()?;
        let before = Fingerprint::of(&file)?;
        let len = before.size();
        let crc = match self.checksum.lock().clone() {
            Checksum::Running(crc, at) if at == len => crc.finalize(),
            _ => crc_of(&file)?,
        };
        if sync_dir.is_some() {
            if let Err(e) = file.sync_data() {
                self.sync_failed.store(true, Ordering::Release);
                return Err(e);
            }
        }
        {
            let mut path = self.path.lock();
            std::fs::rename(&*path, dest)?;
            *path = dest.to_path_buf();
        }
        if let Some(sync_dir) = sync_dir {
            sync_dir()?;
        }
        // The rename changes the inode's change time; any other change since the checksum
        // was taken leaves the copy to be checked at its first use.
        let after = Fingerprint::of(&file).ok();
        *self.checksum.lock() = Checksum::Sealed {
            crc: Some(crc),
            seen: after.filter(|a| a.same_content_as(&before)),
        };
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
        StagedFile::open_sealed(dest, &self.counter, self.crc())
    }

    /// The whole content of a sealed copy, checked against its sealed CRC-32 when it has
    /// one: what a journal record carries in place of the copy's own durability.
    pub fn sealed_content(&self) -> io::Result<Vec<u8>> {
        let file = self.file()?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let content = super::read_at_most(&file, 0, len)?;
        if let Some(crc) = self.crc() {
            let found = crc32fast::hash(&content);
            if found != crc || content.len() != len {
                self.found_changed(crc, found);
                return Err(damaged());
            }
        }
        Ok(content)
    }

    /// The change that carried this file is in the bucket: the file may go.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }
}

/// Starts writing `len` bytes of `file` from `at` (all from `at` when `len` is 0) out to
/// disk, without waiting for it: an fdatasync after it finds less to write. Its failure
/// costs only the head start.
pub fn start_write_out(file: &File, at: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(at), Ok(len)) = (libc::off64_t::try_from(at), libc::off64_t::try_from(len)) else {
        return;
    };
    // SAFETY: a plain system call on a descriptor the caller holds; it touches no memory.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), at, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

fn damaged() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "the local copy was changed on disk since the file was closed",
    )
}

/// The CRC-32 of the whole content of `file`.
fn crc_of(file: &File) -> io::Result<u32> {
    let mut crc = crc32fast::Hasher::new();
    read_chunks(file, |chunk, _| {
        crc.update(chunk);
        Ok(())
    })?;
    Ok(crc.finalize())
}

/// Reads `file` from start to end, handing each chunk and its offset to `each`; returns
/// the length read.
fn read_chunks(file: &File, mut each: impl FnMut(&[u8], u64) -> io::Result<()>) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    loop {
        match file.read_at(&mut buf, at) {
            Ok(0) => return Ok(at),
            Ok(n) => {
                each(&buf[..n], at)?;
                at += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn area() -> (tempfile::TempDir, StagingArea) {
        let dir = tempfile::tempdir().unwrap();
        let area = StagingArea::open(dir.path(), Arc::default()).unwrap();
        (dir, area)
    }

    #[test]
    fn a_copy_being_written_starts_its_write_out_as_it_grows() {
        let (_dir, area) = area();
        let f = area.create().unwrap();
        // Writes of an eighth of the stretch each.
        let step = WRITE_OUT_EVERY / 8;
        let chunk = vec![7u8; step as usize];
        let written_out = || f.written_out.load(Ordering::Relaxed);
        for i in 0..7 {
            f.write_at(&chunk, i * step).unwrap();
        }
        assert_eq!(
            written_out(),
            0,
            "less than WRITE_OUT_EVERY waits for the seal"
        );
        f.write_at(&chunk, 7 * step).unwrap();
        assert_eq!(written_out(), WRITE_OUT_EVERY);
        for i in 8..20 {
            f.write_at(&chunk, i * step).unwrap();
        }
        assert_eq!(written_out(), 2 * WRITE_OUT_EVERY);
        // Cut and written again, it is written out again as it grows.
        f.set_len(0).unwrap();
        assert_eq!(written_out(), 0);
        for i in 0..8 {
            f.write_at(&chunk, i * step).unwrap();
        }
        assert_eq!(written_out(), WRITE_OUT_EVERY);
    }

    fn sealed(area: &StagingArea, dir: &Path, writes: &[(u64, &[u8])], len: u64) -> StagedFile {
        let f = area.create().unwrap();
        for (offset, data) in writes {
            f.write_at(data, *offset).unwrap();
        }
        f.set_len(len).unwrap();
        f.seal(&dir.join("sealed"), || Ok(())).unwrap();
        f
    }

    fn damage(path: &Path, at: u64) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(b"X", at).unwrap();
    }

    #[test]
    fn the_checksum_of_a_sealed_copy_is_the_one_of_what_was_written() {
        let (dir, area) = area();
        // The writes (offset, bytes), the length it is cut to, and the content sealed.
        type Case<'a> = (&'a [(u64, &'a [u8])], u64, &'a [u8]);
        let cases: [Case; 4] = [
            (&[(0, b"hello "), (6, b"world")], 11, b"hello world"),
            (&[(6, b"world"), (0, b"hello ")], 11, b"hello world"),
            (&[(0, b"hello world"), (0, b"J")], 5, b"Jello"),
            (&[(0, b"ab"), (4, b"cd")], 8, b"ab\0\0cd\0\0"),
        ];
        for (writes, len, content) in cases {
            let f = sealed(&area, dir.path(), writes, len);
            assert_eq!(f.crc(), Some(crc32fast::hash(content)), "{content:?}");
            assert_eq!(std::fs::read(f.path()).unwrap(), content);
            f.finish();
        }
    }

    #[test]
    fn a_copy_made_to_change_a_sealed_file_keeps_a_running_checksum() {
        let (dir, area) = area();
        let f = sealed(&area, dir.path(), &[(0, b"hello")], 5);
        let copy = area.create_copy(&f).unwrap();
        copy.write_at(b" world", 5).unwrap();
        copy.seal(&dir.path().join("copy"), || Ok(())).unwrap();
        assert_eq!(copy.crc(), Some(crc32fast::hash(b"hello world")));
        assert!(copy.checked_file().is_ok());
    }

    #[test]
    fn a_sealed_copy_changed_on_disk_is_never_read_again() {
        let (dir, area) = area();
        let f = sealed(&area, dir.path(), &[(0, &[7u8; 100_000])], 100_000);
        assert!(f.checked_file().is_ok());
        // Touched but not changed: its content is read once and found the same.
        let t = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        File::options()
            .write(true)
            .open(f.path())
            .unwrap()
            .set_modified(t)
            .unwrap();
        assert!(f.checked_file().is_ok());
        damage(&f.path(), 50_000);
        let e = f.checked_file().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // Even put back as it was, a copy once found damaged stays refused.
        File::options()
            .write(true)
            .open(f.path())
            .unwrap()
            .write_all_at(&[7], 50_000)
            .unwrap();
        assert!(f.checked_file().is_err());
        // A copy made to change the file is refused too.
        assert!(area.create_copy(&f).is_err());
    }

    #[test]
    fn a_copy_found_by_replay_is_checked_against_its_journaled_checksum() {
        let (dir, area) = area();
        let f = sealed(&area, dir.path(), &[(0, b"content")], 7);
        let counter = Arc::default();
        let good = StagedFile::open_sealed(&f.path(), &counter, f.crc()).unwrap();
        assert!(good.checked_file().is_ok());
        let older = StagedFile::open_sealed(&f.path(), &counter, None).unwrap();
        assert!(older.checked_file().is_ok());
        damage(&f.path(), 0);
        let after = StagedFile::open_sealed(&f.path(), &counter, f.crc()).unwrap();
        assert!(after.checked_file().is_err());
    }
}
