//! The block cache: clean object data kept on local disk in fixed-size blocks, so re-reads
//! need no request. A block is named by its object's key and ETag and its index, so a
//! replaced object never serves old blocks. Blocks are evicted least recently used first,
//! under one byte budget that also counts the staged (dirty) files: before a block is
//! written, room is made for it, and when no room can be made it is not cached. The cache
//! filesystem also keeps a minimum of free space. Every block carries a checksum; a block
//! that fails it is removed and fetched again, never served.
//!
//! Blocks survive a remount: the index is rebuilt from the directory at start, oldest
//! first.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use lru::LruCache;
use md5::{Digest, Md5};
use parking_lot::Mutex;

/// The header in front of each block's data: magic, data length, CRC-32 of the data.
const HEADER: usize = 16;
const MAGIC: &[u8; 4] = b"S3MB";
/// Space is accounted in the units filesystems allocate.
const ALLOC_UNIT: u64 = 4096;
/// Objects whose upload this mount just finished, remembered with their ETag.
const KNOWN_ETAGS: usize = 10_000;

/// Names one object version: a hash of its key and ETag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectId(u128);

impl ObjectId {
    pub fn new(key: &str, etag: &str) -> Self {
        let mut h = Md5::new();
        h.update(key.as_bytes());
        h.update([0u8]);
        h.update(etag.trim_matches('"').as_bytes());
        ObjectId(u128::from_be_bytes(h.finalize().into()))
    }
}

/// One block of one object version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockId {
    pub object: ObjectId,
    pub index: u64,
}

/// How much local disk the cache may use.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Bytes of blocks and staged files together.
    pub max_bytes: u64,
    /// Free space the cache filesystem keeps, in bytes, or as a share of its size.
    pub min_free: MinFree,
    pub block_size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    Bytes(u64),
    Percent(f64),
}

/// Bytes held by staged and sealed files, shared with the staging area.
#[derive(Debug, Default)]
pub struct StagedBytes(AtomicU64);

impl StagedBytes {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(&self, n: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }
}

/// Disk space a file of `len` bytes takes.
pub fn allocated(len: u64) -> u64 {
    len.div_ceil(ALLOC_UNIT) * ALLOC_UNIT
}

struct Index {
    lru: LruCache<BlockId, u64>,
    /// Bytes of cached blocks, plus blocks being written.
    bytes: u64,
    /// Bytes reserved for blocks being written: not yet taken from the disk's free space.
    writing: u64,
}

/// Counters for metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    pub hits: u64,
    pub misses: u64,
    pub inserted: u64,
    pub evicted: u64,
    /// Blocks not cached because no room could be made.
    pub skipped: u64,
    /// Blocks that failed their checksum or size check and were dropped.
    pub corrupt: u64,
}

pub struct BlockCache {
    dir: PathBuf,
    limits: CacheLimits,
    index: Mutex<Index>,
    staged: Arc<StagedBytes>,
    known_etags: Mutex<LruCache<String, String>>,
    stats: Mutex<BlockStats>,
    tmp_seq: AtomicU64,
    /// Set while the free-space floor keeps new blocks out, so that it is logged once.
    below_floor: AtomicBool,
}

impl BlockCache {
    /// Opens `cache_dir/blocks`, indexing the blocks an earlier run left (oldest first) and
    /// evicting what no longer fits the limits.
    pub fn open(
        cache_dir: &Path,
        limits: CacheLimits,
        staged: Arc<StagedBytes>,
    ) -> io::Result<Self> {
        let dir = cache_dir.join("blocks");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let mut found: Vec<(SystemTime, BlockId, u64)> = Vec::new();
        // Files may vanish while this runs (a block being replaced); they are skipped.
        for sub in std::fs::read_dir(&dir)? {
            let Ok(sub) = sub else { continue };
            if !sub.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_file(sub.path());
                continue;
            }
            let Ok(entries) = std::fs::read_dir(sub.path()) else {
                continue;
            };
            for entry in entries {
                let Ok(entry) = entry else { continue };
                let name = entry.file_name();
                let parsed = name.to_str().and_then(parse_name);
                let Ok(meta) = entry.metadata() else { continue };
                match parsed {
                    Some(id) if meta.is_file() => found.push((
                        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        id,
                        allocated(meta.len()),
                    )),
                    // Unfinished writes and strangers.
                    _ => {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        found.sort_by_key(|(t, _, _)| *t);
        let mut index = Index {
            lru: LruCache::unbounded(),
            bytes: 0,
            writing: 0,
        };
        for (_, id, size) in &found {
            index.lru.put(*id, *size);
            index.bytes += size;
        }
        let cache = BlockCache {
            dir,
            limits,
            index: Mutex::new(index),
            staged,
            known_etags: Mutex::new(LruCache::new(KNOWN_ETAGS.try_into().unwrap())),
            stats: Mutex::new(BlockStats::default()),
            tmp_seq: AtomicU64::new(0),
            below_floor: AtomicBool::new(false),
        };
        if !found.is_empty() {
            tracing::info!(
                blocks = found.len(),
                bytes = cache.bytes(),
                "block cache kept from the last run"
            );
        }
        let victims = {
            let mut idx = cache.index.lock();
            let mut victims = Vec::new();
            while idx.bytes + cache.staged.get() > limits.max_bytes {
                let Some((id, size)) = idx.lru.pop_lru() else {
                    break;
                };
                idx.bytes -= size;
                victims.push(id);
            }
            victims
        };
        cache.remove_files(&victims);
        Ok(cache)
    }

    pub fn block_size(&self) -> u64 {
        self.limits.block_size
    }

    pub fn limits(&self) -> CacheLimits {
        self.limits
    }

    /// Bytes of blocks on disk.
    pub fn bytes(&self) -> u64 {
        self.index.lock().bytes
    }

    pub fn staged_bytes(&self) -> &Arc<StagedBytes> {
        &self.staged
    }

    pub fn stats(&self) -> BlockStats {
        *self.stats.lock()
    }

    fn path(&self, id: &BlockId) -> PathBuf {
        let name = format!("{:032x}-{:x}", id.object.0, id.index);
        self.dir.join(&name[..2]).join(name)
    }

    pub fn contains(&self, id: &BlockId) -> bool {
        self.index.lock().contains(id)
    }

    /// The data of block `id`, which must be `len` bytes long, if it is cached and intact.
    pub fn get(&self, id: &BlockId, len: usize) -> Option<Bytes> {
        if self.index.lock().get(id).is_none() {
            self.stats.lock().misses += 1;
            return None;
        }
        match read_block(&self.path(id), len) {
            Ok(data) => {
                self.stats.lock().hits += 1;
                Some(data)
            }
            Err(e) => {
                // Missing (the directory was cleaned) or damaged: never served.
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(block = %self.path(id).display(), error = %e, "a cached block is damaged; fetching it again");
                    self.stats.lock().corrupt += 1;
                }
                self.forget(id);
                self.stats.lock().misses += 1;
                None
            }
        }
    }

    fn forget(&self, id: &BlockId) {
        let removed = {
            let mut idx = self.index.lock();
            let r = idx.lru.pop(id);
            if let Some(size) = r {
                idx.bytes -= size;
            }
            r.is_some()
        };
        if removed {
            let _ = std::fs::remove_file(self.path(id));
        }
    }

    /// Asks the kernel to start reading cached blocks `ids` from disk, for a reader that
    /// will want them soon.
    pub fn prefetch(&self, ids: &[BlockId]) {
        use std::os::unix::io::AsRawFd;
        for id in ids {
            if let Ok(f) = File::open(self.path(id)) {
                // SAFETY: a valid open descriptor; the advice has no memory effects.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
            }
        }
    }

    /// Caches `data` as block `id`, making room first. Returns false when the block could
    /// not be cached (no room, or a write error); nothing is then left behind.
    pub fn put(&self, id: BlockId, data: &[u8]) -> bool {
        if self.contains(&id) {
            return true;
        }
        let cost = allocated((HEADER + data.len()) as u64);
        let Some(victims) = self.make_room(&id, cost) else {
            self.stats.lock().skipped += 1;
            return false;
        };
        self.remove_files(&victims);
        let written = self.write_block(&id, data);
        let mut idx = self.index.lock();
        idx.writing -= cost;
        match written {
            Ok(()) => {
                if let Some(old) = idx.lru.put(id, cost) {
                    // Written twice at once: the room was reserved twice.
                    idx.bytes -= old;
                }
                drop(idx);
                self.stats.lock().inserted += 1;
                true
            }
            Err(e) => {
                idx.bytes -= cost;
                drop(idx);
                tracing::warn!(error = %e, dir = %self.dir.display(), "cannot write to the block cache; reading on without it");
                false
            }
        }
    }

    /// Reserves `cost` bytes for a new block, evicting the least recently used blocks as
    /// needed. Returns the evicted blocks, or None when there is not enough room (or the
    /// block is cached already).
    fn make_room(&self, id: &BlockId, cost: u64) -> Option<Vec<BlockId>> {
        let mut idx = self.index.lock();
        if idx.lru.contains(id) {
            return None;
        }
        // Blocks other readers are writing right now will take their room too.
        let short_of_free = self.free_space_shortfall(cost + idx.writing);
        let staged = self.staged.get();
        let evictable: u64 = idx.bytes;
        let over_budget = (idx.bytes + staged + cost).saturating_sub(self.limits.max_bytes);
        let need = over_budget.max(short_of_free);
        if short_of_free > evictable {
            // Something else filled the disk: give back every block, cache nothing new.
            self.note_below_floor();
        } else if need > evictable {
            return None;
        } else if self.below_floor.swap(false, Ordering::Relaxed) {
            tracing::info!(dir = %self.dir.display(), "the cache filesystem has room again; caching blocks");
        }
        let mut freed = 0;
        let mut victims = Vec::new();
        while freed < need {
            let Some((vid, size)) = idx.lru.pop_lru() else {
                break;
            };
            freed += size;
            victims.push(vid);
        }
        if freed < need {
            // Everything left is being written right now, or the disk is below its floor.
            idx.bytes -= freed;
            drop(idx);
            self.stats.lock().evicted += victims.len() as u64;
            self.remove_files(&victims);
            return None;
        }
        idx.bytes = idx.bytes - freed + cost;
        idx.writing += cost;
        self.stats.lock().evicted += victims.len() as u64;
        Some(victims)
    }

    /// Evicts blocks until blocks and staged files, grown by `extra` bytes, fit the budget.
    /// Returns false when the staged files alone would exceed it.
    pub fn fit_staged(&self, extra: u64) -> bool {
        let staged = self.staged.get() + extra;
        let victims = {
            let mut idx = self.index.lock();
            let mut victims = Vec::new();
            while idx.bytes + staged > self.limits.max_bytes {
                let Some((id, size)) = idx.lru.pop_lru() else {
                    break;
                };
                idx.bytes -= size;
                victims.push(id);
            }
            victims
        };
        self.stats.lock().evicted += victims.len() as u64;
        self.remove_files(&victims);
        staged <= self.limits.max_bytes
    }

    fn note_below_floor(&self) {
        if self.below_floor.swap(true, Ordering::Relaxed) {
            return;
        }
        let (avail, total) = fs_space(&self.dir).unwrap_or((0, 0));
        tracing::warn!(
            dir = %self.dir.display(),
            free_bytes = avail,
            size_bytes = total,
            min_free = ?self.limits.min_free,
            "the cache filesystem is below the free space --cache-min-free keeps; \
             reads go to the bucket uncached until space is freed or the floor is lowered"
        );
    }

    /// How many bytes must be freed so that writing `cost` more keeps the minimum free
    /// space on the cache filesystem.
    fn free_space_shortfall(&self, cost: u64) -> u64 {
        let Some((avail, total)) = fs_space(&self.dir) else {
            return 0;
        };
        let min_free = match self.limits.min_free {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
        };
        (min_free + cost).saturating_sub(avail)
    }

    fn remove_files(&self, ids: &[BlockId]) {
        for id in ids {
            let _ = std::fs::remove_file(self.path(id));
        }
    }

    fn write_block(&self, id: &BlockId, data: &[u8]) -> io::Result<()> {
        let path = self.path(id);
        let parent = path.parent().expect("block paths have a parent");
        let tmp = parent.join(format!(
            ".tmp-{}",
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let open = |p: &Path| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
        };
        let mut f = match open(&tmp) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)?;
                open(&tmp)?
            }
            Err(e) => return Err(e),
        };
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(MAGIC);
        header[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
        header[8..12].copy_from_slice(&crc32fast::hash(data).to_le_bytes());
        let written = f.write_all(&header).and_then(|_| f.write_all(data));
        drop(f);
        if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, &path)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(())
    }

    /// Caches the content of a file this mount just uploaded as object `key` with `etag`,
    /// so reading it back needs no request.
    pub fn adopt(&self, key: &str, etag: &str, file: &File, size: u64) {
        use std::os::unix::fs::FileExt;
        self.known_etags
            .lock()
            .put(key.to_string(), etag.to_string());
        let object = ObjectId::new(key, etag);
        let bs = self.limits.block_size;
        let mut buf = vec![0u8; bs as usize];
        let mut index = 0;
        while index * bs < size {
            let len = bs.min(size - index * bs) as usize;
            if file.read_exact_at(&mut buf[..len], index * bs).is_err()
                || !self.put(BlockId { object, index }, &buf[..len])
            {
                return;
            }
            index += 1;
        }
    }

    /// The ETag of `key` as this mount last uploaded it.
    pub fn known_etag(&self, key: &str) -> Option<String> {
        self.known_etags.lock().get(key).cloned()
    }

    /// Forgets what this mount knew of `key` (it was deleted or replaced here).
    pub fn forget_key(&self, key: &str) {
        self.known_etags.lock().pop(key);
    }
}

impl Index {
    fn contains(&self, id: &BlockId) -> bool {
        self.lru.contains(id)
    }

    fn get(&mut self, id: &BlockId) -> Option<u64> {
        self.lru.get(id).copied()
    }
}

fn parse_name(name: &str) -> Option<BlockId> {
    let (obj, idx) = name.split_once('-')?;
    if obj.len() != 32 {
        return None;
    }
    Some(BlockId {
        object: ObjectId(u128::from_str_radix(obj, 16).ok()?),
        index: u64::from_str_radix(idx, 16).ok()?,
    })
}

/// Reads a block file and checks its header, length and checksum.
fn read_block(path: &Path, len: usize) -> io::Result<Bytes> {
    let mut f = File::open(path)?;
    let mut buf = Vec::with_capacity(HEADER + len);
    Read::by_ref(&mut f)
        .take((HEADER + len + 1) as u64)
        .read_to_end(&mut buf)?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    if buf.len() != HEADER + len || &buf[..4] != MAGIC {
        return Err(bad("wrong size or header"));
    }
    let stored_len = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    if stored_len != len || crc32fast::hash(&buf[HEADER..]) != crc {
        return Err(bad("checksum mismatch"));
    }
    Ok(Bytes::from(buf).slice(HEADER..))
}

/// Available and total bytes of the filesystem holding `dir`.
fn fs_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    Some((st.f_bavail as u64 * unit, st.f_blocks as u64 * unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u64) -> CacheLimits {
        CacheLimits {
            max_bytes: max,
            min_free: MinFree::Bytes(0),
            block_size: 64 << 10,
        }
    }

    fn id(n: u64) -> BlockId {
        BlockId {
            object: ObjectId::new("k", "e"),
            index: n,
        }
    }

    fn dir_bytes(dir: &Path) -> u64 {
        let mut total = 0;
        for sub in std::fs::read_dir(dir.join("blocks")).unwrap() {
            for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
                total += allocated(f.unwrap().metadata().unwrap().len());
            }
        }
        total
    }

    #[test]
    fn blocks_round_trip_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let staged = Arc::new(StagedBytes::default());
        let c = BlockCache::open(dir.path(), limits(1 << 20), staged.clone()).unwrap();
        assert!(c.put(id(0), b"hello"));
        assert_eq!(c.get(&id(0), 5).unwrap().as_ref(), b"hello");
        assert!(c.get(&id(0), 4).is_none(), "a wrong length is never served");
        assert!(c.put(id(1), b"world"));
        drop(c);
        let c = BlockCache::open(dir.path(), limits(1 << 20), staged).unwrap();
        assert_eq!(c.get(&id(1), 5).unwrap().as_ref(), b"world");
        assert!(c.get(&id(2), 5).is_none());
    }

    #[test]
    fn the_budget_is_never_exceeded() {
        let dir = tempfile::tempdir().unwrap();
        let staged = Arc::new(StagedBytes::default());
        let c = BlockCache::open(dir.path(), limits(256 << 10), staged.clone()).unwrap();
        let data = vec![7u8; 60 << 10];
        for n in 0..20 {
            assert!(c.put(id(n), &data));
            assert!(dir_bytes(dir.path()) <= 256 << 10);
            assert!(c.bytes() <= 256 << 10);
        }
        // The most recent blocks are kept.
        assert!(c.get(&id(19), data.len()).is_some());
        assert!(c.get(&id(0), data.len()).is_none());
        // Staged files take room from blocks; with none left, blocks are not cached.
        assert!(c.fit_staged(200 << 10));
        staged.add(200 << 10);
        assert!(c.bytes() + staged.get() <= 256 << 10);
        assert!(c.fit_staged(56 << 10));
        staged.add(56 << 10);
        assert!(!c.fit_staged(1));
        assert!(!c.put(id(100), &data), "no room: not cached");
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn damaged_blocks_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), limits(1 << 20), Default::default()).unwrap();
        assert!(c.put(id(0), b"payload"));
        let path = c.path(&id(0));
        let mut raw = std::fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        std::fs::write(&path, raw).unwrap();
        assert!(c.get(&id(0), 7).is_none());
        assert!(!path.exists());
        assert_eq!(c.stats().corrupt, 1);
        assert!(c.put(id(0), b"payload"));
        assert_eq!(c.get(&id(0), 7).unwrap().as_ref(), b"payload");
    }

    #[test]
    fn another_etag_is_another_object() {
        assert_ne!(ObjectId::new("k", "\"a\""), ObjectId::new("k", "\"b\""));
        assert_eq!(ObjectId::new("k", "\"a\""), ObjectId::new("k", "a"));
        assert_ne!(ObjectId::new("ka", ""), ObjectId::new("k", "a"));
    }
}
