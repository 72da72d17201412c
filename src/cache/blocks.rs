//! The block cache: clean object data kept on local disk, so re-reads need no request.
//!
//! Each object version (key and ETag) has one cache file, in which block `i` sits at offset
//! `i × block size` and missing blocks are holes, and beside it a checksum file with each
//! block's length and CRC-32. A replaced object is another file, so it never serves old
//! blocks. Blocks are evicted least recently used first (their range is punched out of the
//! file; a file's last block takes the file with it), under one byte budget that also
//! counts the staged (dirty) files: room is made before a block is written, and when none
//! can be made it is not cached. The cache filesystem also keeps a minimum of free space.
//! A block that fails its checksum is dropped and fetched again, never served.
//!
//! An object whose every block is cached can be handed out whole (`open_whole`), for the
//! kernel to read from the file directly. Its blocks are checked against their checksums
//! first, unless the file is unchanged (inode, size, change time) since this mount last
//! wrote or checked it; and they are kept from eviction while it is open.
//!
//! A file this mount uploaded is kept as it is: its cache file is a hard link to the
//! write-back's sealed copy, which is never written again. Such an object is never punched,
//! so that the copy keeps its content; it is removed whole.
//!
//! Blocks survive a remount: the index is rebuilt from the checksum files at start.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use lru::LruCache;
use md5::{Digest, Md5};
use parking_lot::Mutex;

use super::direct::{DirectWrites, Pages, DIRECT_ALIGN};
use super::staging::StagedFile;
use crate::store::ETag;

/// The checksum file's header: magic, format version, block size.
const SUMS_HEADER: u64 = 16;
const SUMS_MAGIC: &[u8; 4] = b"S3MS";
const SUMS_VERSION: u32 = 1;
/// Each block's entry in the checksum file: data length (0: not cached), CRC-32.
const SUMS_ENTRY: u64 = 8;
/// Space is accounted in the units filesystems allocate.
const ALLOC_UNIT: u64 = 4096;
/// Objects whose upload this mount just finished, remembered with their ETag.
const KNOWN_ETAGS: usize = 10_000;

/// Names one object version: a hash of its key and ETag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectId(u128);

impl ObjectId {
    pub fn new(key: &str, etag: &ETag) -> Self {
        let mut h = Md5::new();
        h.update(key.as_bytes());
        h.update([0u8]);
        h.update(etag.value().as_bytes());
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

/// What the cache keeps on disk for one object beyond its blocks: its checksum file up to
/// block `index`, a unit for the file's own bookkeeping (directory entries, extents), and
/// one for the directory it lives in (removed with its last object).
fn object_overhead(index: u64) -> u64 {
    allocated(SUMS_HEADER + SUMS_ENTRY * (index + 1)) + OBJECT_BOOKKEEPING
}

/// The file's own bookkeeping and its directory's, per object.
const OBJECT_BOOKKEEPING: u64 = 2 * ALLOC_UNIT;

/// One cached block, as the index knows it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    cost: u64,
    len: u32,
    crc: u32,
}

/// What identifies a cache file's state: any write to it changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
}

impl Fingerprint {
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// The same file, not written since: only its change time may differ (a rename or a
    /// link changes it).
    pub(super) fn same_content_as(&self, other: &Fingerprint) -> bool {
        (self.dev, self.ino, self.size, self.mtime)
            == (other.dev, other.ino, other.size, other.mtime)
    }

    pub(super) fn of(f: &File) -> io::Result<Self> {
        let m = f.metadata()?;
        Ok(Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            ctime: (m.ctime(), m.ctime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

/// One object version with blocks in the cache.
struct ObjectState {
    /// Blocks in the index.
    blocks: u64,
    /// The highest block index ever stored.
    highest: u64,
    /// Bytes accounted for the checksum file and bookkeeping.
    overhead: u64,
    /// Blocks being written right now.
    writers: u32,
    /// Handles given out by `open_whole` that are still open.
    pins: u32,
    /// Bytes of blocks kept from eviction while pinned.
    pinned_cost: u64,
    /// The files are being removed: nothing new is written.
    removing: bool,
    /// The cache file as this mount last left it (wrote, punched or checked it), while
    /// nothing else is known to have touched it since.
    trusted: Option<Fingerprint>,
    /// Serialises changes to the cache file, so `trusted` follows them.
    file_lock: Arc<Mutex<()>>,
    /// The cache file is another name of a sealed copy of the write-back (see `adopt`):
    /// no block is written into it or punched out of it, and it goes whole.
    shared: bool,
}

impl ObjectState {
    fn new() -> Self {
        ObjectState {
            blocks: 0,
            highest: 0,
            overhead: 0,
            writers: 0,
            pins: 0,
            pinned_cost: 0,
            removing: false,
            trusted: None,
            file_lock: Arc::new(Mutex::new(())),
            shared: false,
        }
    }
}

struct Index {
    lru: LruCache<BlockId, Entry>,
    objects: HashMap<ObjectId, ObjectState>,
    /// Blocks whose range is being punched out of their file.
    evicting: HashMap<BlockId, Arc<Mutex<()>>>,
    /// Bytes of blocks of objects open whole, which cannot be evicted.
    pinned: u64,
    /// Bytes of cached blocks and object overheads, plus blocks being written.
    bytes: u64,
    /// Bytes reserved for blocks being written: not yet taken from the disk's free space.
    writing: u64,
    /// Bytes taken out of `bytes` for blocks being punched and files being removed: still
    /// on the disk until that is done, so room made meanwhile counts them.
    releasing: u64,
}

/// Disk work that eviction leaves to be done outside the index lock, with the bytes it
/// gives back (counted in `Index::releasing` until it is done). A block to punch carries
/// its object's file lock, which tells that object from one made again under the same name
/// meanwhile.
enum Eviction {
    Punch(BlockId, u32, u64, Arc<Mutex<()>>),
    Remove(ObjectId, u64),
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
    /// Objects handed out whole.
    pub whole_opens: u64,
    /// Of those, the ones whose every block was checked first.
    pub whole_checks: u64,
}

pub struct BlockCache {
    dir: PathBuf,
    limits: CacheLimits,
    index: Mutex<Index>,
    staged: Arc<StagedBytes>,
    known_etags: Mutex<LruCache<String, ETag>>,
    stats: Mutex<BlockStats>,
    /// Set while the free-space floor keeps new blocks out, so that it is logged once.
    below_floor: AtomicBool,
    /// Set once punching holes failed, so that it is logged once.
    no_punch: AtomicBool,
    /// Set once linking an uploaded file failed, so that it is logged once.
    no_link: AtomicBool,
    direct: DirectWrites,
}

/// An object whose every block is cached, open for reading as one file. Its blocks stay in
/// the cache until this is dropped.
pub struct WholeObject {
    cache: Arc<BlockCache>,
    object: ObjectId,
    file: File,
}

/// An object opened whole whose file must be read and checked before it is handed out
/// (`BlockCache::check_whole`). Its blocks stay in the cache until this is dropped.
pub struct UncheckedWhole {
    whole: WholeObject,
    entries: Vec<Entry>,
    seen: Fingerprint,
    size: u64,
    file_lock: Arc<Mutex<()>>,
}

impl WholeObject {
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for WholeObject {
    fn drop(&mut self) {
        self.cache.unpin(self.object);
    }
}

impl std::fmt::Debug for WholeObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WholeObject({:032x})", self.object.0)
    }
}

impl BlockCache {
    /// Opens `cache_dir/objects`, indexing the blocks an earlier run left (oldest first) and
    /// evicting what no longer fits the limits.
    pub fn open(
        cache_dir: &Path,
        limits: CacheLimits,
        staged: Arc<StagedBytes>,
    ) -> io::Result<Self> {
        let old = cache_dir.join("blocks");
        if old.exists() {
            // The layout of earlier versions: one file per block.
            tracing::info!(dir = %old.display(), "removing cached blocks kept in an older layout");
            let _ = std::fs::remove_dir_all(&old);
        }
        let dir = cache_dir.join("objects");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let mut found = Vec::new();
        // Files may vanish while this runs; they are skipped.
        for sub in std::fs::read_dir(&dir)? {
            let Ok(sub) = sub else { continue };
            if !sub.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_file(sub.path());
                continue;
            }
            let Ok(entries) = std::fs::read_dir(sub.path()) else {
                continue;
            };
            let mut names = HashSet::new();
            for entry in entries.flatten() {
                names.insert(entry.file_name().to_string_lossy().into_owned());
            }
            for name in &names {
                let path = sub.path().join(name);
                let keep = match name.strip_suffix(".sums") {
                    Some(data) => names.contains(data) && parse_name(data).is_some(),
                    None => names.contains(&format!("{name}.sums")) && parse_name(name).is_some(),
                };
                if !keep {
                    // Strangers, and halves of objects whose other half is gone.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                let Some(data) = name.strip_suffix(".sums") else {
                    continue;
                };
                let object = parse_name(data).expect("checked above");
                match read_sums(&path, limits.block_size) {
                    Ok(Some((mtime, len, blocks))) => found.push((mtime, object, len, blocks)),
                    _ => {
                        let _ = std::fs::remove_file(&path);
                        let _ = std::fs::remove_file(sub.path().join(data));
                    }
                }
            }
            // A directory left empty takes disk space no object accounts for.
            let _ = std::fs::remove_dir(sub.path());
        }
        found.sort_by_key(|(t, ..)| *t);
        let mut index = Index {
            lru: LruCache::unbounded(),
            objects: HashMap::new(),
            evicting: HashMap::new(),
            pinned: 0,
            bytes: 0,
            writing: 0,
            releasing: 0,
        };
        let mut count = 0;
        for (_, object, sums_len, blocks) in &found {
            if blocks.iter().all(|(len, _)| *len == 0) {
                // Objects left without blocks go at once.
                remove_files(&dir, object);
                continue;
            }
            let mut state = ObjectState::new();
            // Linked to a sealed copy that is still waiting (a crash came before the
            // write-back let go of it): kept from being punched while the copy is there.
            state.shared = std::fs::metadata(data_path(&dir, object)).is_ok_and(|m| m.nlink() > 1);
            for (i, (len, crc)) in blocks.iter().enumerate() {
                if *len == 0 {
                    continue;
                }
                let cost = allocated(u64::from(*len));
                index.lru.put(
                    BlockId {
                        object: *object,
                        index: i as u64,
                    },
                    Entry {
                        cost,
                        len: *len,
                        crc: *crc,
                    },
                );
                index.bytes += cost;
                state.blocks += 1;
                state.highest = i as u64;
                count += 1;
            }
            state.overhead = allocated(*sums_len) + OBJECT_BOOKKEEPING;
            index.bytes += state.overhead;
            index.objects.insert(*object, state);
        }
        let cache = BlockCache {
            dir,
            limits,
            index: Mutex::new(index),
            staged,
            known_etags: Mutex::new(LruCache::new(KNOWN_ETAGS.try_into().unwrap())),
            stats: Mutex::new(BlockStats::default()),
            below_floor: AtomicBool::new(false),
            no_punch: AtomicBool::new(false),
            no_link: AtomicBool::new(false),
            // Blocks smaller than a page (tests use them) are written the ordinary way.
            direct: DirectWrites::new(
                limits.block_size,
                limits.block_size % DIRECT_ALIGN as u64 == 0,
            ),
        };
        if count > 0 {
            tracing::info!(
                blocks = count,
                bytes = cache.bytes(),
                "block cache kept from the last run"
            );
        }
        cache.fit_beside(cache.staged.get());
        Ok(cache)
    }

    pub fn block_size(&self) -> u64 {
        self.limits.block_size
    }

    pub fn limits(&self) -> CacheLimits {
        self.limits
    }

    /// Bytes the cache takes on disk.
    pub fn bytes(&self) -> u64 {
        self.index.lock().bytes
    }

    pub fn staged_bytes(&self) -> &Arc<StagedBytes> {
        &self.staged
    }

    pub fn stats(&self) -> BlockStats {
        *self.stats.lock()
    }

    fn data_path(&self, object: &ObjectId) -> PathBuf {
        data_path(&self.dir, object)
    }

    fn sums_path(&self, object: &ObjectId) -> PathBuf {
        sums_path(&self.dir, object)
    }

    pub fn contains(&self, id: &BlockId) -> bool {
        self.index.lock().lru.contains(id)
    }

    /// The data of block `id`, which must be `len` bytes long, if it is cached and intact.
    pub fn get(&self, id: &BlockId, len: usize) -> Option<Bytes> {
        let entry = self.index.lock().lru.get(id).copied();
        let Some(entry) = entry else {
            self.stats.lock().misses += 1;
            return None;
        };
        let read = (|| {
            let f = File::open(self.data_path(&id.object))?;
            let mut buf = BytesMut::zeroed(len);
            f.read_exact_at(&mut buf, id.index * self.limits.block_size)?;
            Ok::<_, io::Error>(buf.freeze())
        })();
        match read {
            Ok(data) if entry.len as usize == len && crc32fast::hash(&data) == entry.crc => {
                self.stats.lock().hits += 1;
                Some(data)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The directory was cleaned behind the mount's back.
                self.drop_object(id.object);
                self.stats.lock().misses += 1;
                None
            }
            other => {
                let still = self
                    .index
                    .lock()
                    .lru
                    .peek(id)
                    .is_some_and(|e| e.crc == entry.crc && e.len == entry.len);
                if still {
                    // Damaged, or of the wrong size: never served.
                    let error = match other {
                        Err(e) => e.to_string(),
                        Ok(_) => "checksum or size mismatch".to_string(),
                    };
                    self.drop_corrupt(&[*id], &error);
                }
                self.stats.lock().misses += 1;
                None
            }
        }
    }

    fn drop_corrupt(&self, ids: &[BlockId], error: &str) {
        if let Some(id) = ids.first() {
            tracing::warn!(file = %self.data_path(&id.object).display(), blocks = ids.len(), first = id.index, error,
                "cached blocks are damaged; fetching them again");
        }
        self.stats.lock().corrupt += ids.len() as u64;
        // Blocks evicted meanwhile are skipped by `take_victims`.
        let evictions = take_victims(&mut self.index.lock(), ids, None);
        self.evict(evictions);
    }

    /// Forgets every block of `object` and removes its files.
    fn drop_object(&self, object: ObjectId) {
        let evictions = {
            let mut idx = self.index.lock();
            let Some(highest) = idx.objects.get(&object).map(|o| o.highest) else {
                return;
            };
            let ids: Vec<BlockId> = (0..=highest)
                .map(|index| BlockId { object, index })
                .collect();
            take_victims(&mut idx, &ids, None)
        };
        self.evict(evictions);
    }

    /// Asks the kernel to start reading cached blocks `ids` from disk, for a reader that
    /// will want them soon.
    pub fn prefetch(&self, ids: &[BlockId]) {
        let bs = self.limits.block_size;
        let mut open: Option<(ObjectId, File)> = None;
        for id in ids {
            if open.as_ref().is_none_or(|(o, _)| *o != id.object) {
                open = File::open(self.data_path(&id.object))
                    .ok()
                    .map(|f| (id.object, f));
            }
            if let Some((_, f)) = &open {
                // SAFETY: a valid open descriptor; the advice has no memory effects.
                unsafe {
                    libc::posix_fadvise(
                        f.as_raw_fd(),
                        (id.index * bs) as libc::off_t,
                        bs as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    )
                };
            }
        }
    }

    /// Caches `data` as block `id`, making room first. Returns false when the block could
    /// not be cached (no room, or a write error); nothing is then left behind.
    pub fn put(&self, id: BlockId, data: &[u8]) -> bool {
        self.put_block(id, data, Pages::Bypass)
    }

    /// `put`, keeping the block in the page cache or not as `pages` says.
    fn put_block(&self, id: BlockId, data: &[u8], pages: Pages) -> bool {
        if data.is_empty() || data.len() as u64 > self.limits.block_size {
            return false;
        }
        let Some((cost, file_lock)) = self.make_room(&id, data.len() as u64) else {
            self.stats.lock().skipped += 1;
            return false;
        };
        let crc = crc32fast::hash(data);
        // Held until the index has the block, so that `trusted` follows the writes in
        // the order they reached the file.
        let file_guard = file_lock.lock();
        let written = self.write_block(&id, data, crc, pages);
        let mut idx = self.index.lock();
        idx.writing -= cost;
        let state = idx
            .objects
            .get_mut(&id.object)
            .expect("an object being written stays indexed");
        state.writers -= 1;
        match written {
            Ok((before, after)) => {
                state.trusted = match (before, state.trusted) {
                    (None, _) => Some(after),
                    (Some(b), Some(t)) if b == t => Some(after),
                    _ => None,
                };
                state.blocks += 1;
                state.highest = state.highest.max(id.index);
                let entry = Entry {
                    cost: allocated(data.len() as u64),
                    len: data.len() as u32,
                    crc,
                };
                // The reservation already counted the block and the object's grown overhead.
                idx.lru.put(id, entry);
                drop(idx);
                drop(file_guard);
                self.stats.lock().inserted += 1;
                true
            }
            Err(e) => {
                state.trusted = None;
                let abandon = state.blocks == 0 && state.writers == 0 && state.pins == 0;
                let mut freed = allocated(data.len() as u64);
                let mut evictions = Vec::new();
                if abandon {
                    state.removing = true;
                    freed += state.overhead;
                    evictions.push(Eviction::Remove(id.object, 0));
                }
                idx.bytes -= freed;
                drop(idx);
                drop(file_guard);
                self.evict(evictions);
                tracing::warn!(error = %e, dir = %self.dir.display(), "cannot write to the block cache; reading on without it");
                false
            }
        }
    }

    /// Reserves room for a block of `len` bytes (and its object's grown overhead),
    /// evicting the least recently used blocks as needed. Returns the bytes reserved and
    /// the object's file lock, or None when there is not enough room (or the block is
    /// cached already, or on its way out).
    fn make_room(&self, id: &BlockId, len: u64) -> Option<(u64, Arc<Mutex<()>>)> {
        let mut idx = self.index.lock();
        if idx.lru.contains(id) || idx.evicting.contains_key(id) {
            return None;
        }
        let state = idx.objects.get(&id.object);
        if state.is_some_and(|o| o.removing || o.shared) {
            return None;
        }
        let overhead = state.map_or(0, |o| o.overhead);
        let cost = allocated(len) + object_overhead(id.index).saturating_sub(overhead);
        // Blocks other readers are writing right now will take their room too.
        let short_of_free = self.free_space_shortfall(cost + idx.writing);
        let staged = self.staged.get();
        let over_budget =
            (idx.bytes + idx.releasing + staged + cost).saturating_sub(self.limits.max_bytes);
        let need = over_budget.max(short_of_free);
        let (victims, freed) = choose_victims(&idx, need, Some(id.object));
        let mut evictions = Vec::new();
        let room = if freed >= need {
            if self.below_floor.swap(false, Ordering::Relaxed) {
                tracing::info!(dir = %self.dir.display(), "the cache filesystem has room again; caching blocks");
            }
            true
        } else if short_of_free > 0 && short_of_free >= over_budget {
            // Something else filled the disk: give back every block, cache nothing new.
            self.note_below_floor();
            evictions = take_victims(&mut idx, &victims, Some(id.object));
            false
        } else {
            false
        };
        if room {
            evictions = take_victims(&mut idx, &victims, Some(id.object));
            let state = idx
                .objects
                .entry(id.object)
                .or_insert_with(ObjectState::new);
            state.writers += 1;
            state.overhead = state.overhead.max(object_overhead(id.index));
            let file_lock = state.file_lock.clone();
            idx.bytes += cost;
            idx.writing += cost;
            drop(idx);
            self.evict(evictions);
            return Some((cost, file_lock));
        }
        drop(idx);
        self.evict(evictions);
        None
    }

    /// Evicts blocks until blocks and staged files, grown by `extra` bytes, fit the budget.
    /// Returns false when the staged files alone would exceed it.
    pub fn fit_staged(&self, extra: u64) -> bool {
        self.fit_beside(self.staged.get() + extra)
    }

    /// Evicts blocks until they fit the budget beside `others` bytes; returns whether
    /// they do.
    fn fit_beside(&self, others: u64) -> bool {
        let (evictions, fits) = {
            let mut idx = self.index.lock();
            let over = (idx.bytes + idx.releasing + others).saturating_sub(self.limits.max_bytes);
            let (victims, _) = choose_victims(&idx, over, None);
            let evictions = take_victims(&mut idx, &victims, None);
            (evictions, idx.bytes + others <= self.limits.max_bytes)
        };
        self.evict(evictions);
        fits
    }

    /// Does the disk work of `evictions`, and counts them.
    fn evict(&self, evictions: Vec<Eviction>) {
        if evictions.is_empty() {
            return;
        }
        let mut blocks = 0;
        for e in evictions {
            match e {
                Eviction::Punch(id, len, cost, file_lock) => {
                    blocks += 1;
                    let file_guard = file_lock.lock();
                    // Under its file lock: the object is still the one the block was taken
                    // from, not removed and made again since (as a link, maybe).
                    let (same, shared) = match self.index.lock().objects.get(&id.object) {
                        Some(o) if Arc::ptr_eq(&o.file_lock, &file_lock) => (true, o.shared),
                        _ => (false, false),
                    };
                    let punched = if same && !shared {
                        self.punch(&id, len)
                    } else {
                        Ok(None)
                    };
                    let mut idx = self.index.lock();
                    if idx
                        .evicting
                        .get(&id)
                        .is_some_and(|l| Arc::ptr_eq(l, &file_lock))
                    {
                        idx.evicting.remove(&id);
                    }
                    idx.releasing -= cost;
                    match punched {
                        Ok(Some((before, after))) => {
                            if let Some(o) = idx.objects.get_mut(&id.object) {
                                o.trusted = match (before, after, o.trusted) {
                                    (Some(b), Some(a), Some(t)) if b == t => Some(a),
                                    _ => None,
                                };
                            }
                        }
                        Ok(None) => {
                            drop(idx);
                            drop(file_guard);
                            // Punched, the sealed copy it shares its data with would lose
                            // it: the object goes whole instead.
                            if same {
                                self.drop_object(id.object);
                            }
                        }
                        Err(e) => {
                            drop(idx);
                            drop(file_guard);
                            if !self.no_punch.swap(true, Ordering::Relaxed) {
                                tracing::warn!(dir = %self.dir.display(), error = %e,
                                    "the cache filesystem cannot punch holes in files; evicting whole objects instead");
                            }
                            self.drop_object(id.object);
                        }
                    }
                }
                Eviction::Remove(object, bytes) => {
                    remove_files(&self.dir, &object);
                    let mut idx = self.index.lock();
                    idx.releasing -= bytes;
                    if idx
                        .objects
                        .get(&object)
                        .is_some_and(|o| o.removing && o.blocks == 0)
                    {
                        idx.objects.remove(&object);
                    }
                }
            }
        }
        self.stats.lock().evicted += blocks;
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

    /// Whether `bytes` more can be written to the cache filesystem and still keep the free
    /// space `--cache-min-free` asks for, once clean blocks are evicted to make it.
    pub fn disk_has_room(&self, bytes: u64) -> bool {
        let short = self.free_space_shortfall(bytes);
        if short == 0 {
            return true;
        }
        let evictions = {
            let mut idx = self.index.lock();
            let (victims, _) = choose_victims(&idx, short, None);
            take_victims(&mut idx, &victims, None)
        };
        self.evict(evictions);
        self.free_space_shortfall(bytes) == 0
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

    /// Writes block `id` and its checksum entry. Returns the data file's state before
    /// (None if this created it) and after. The caller holds the object's file lock.
    fn write_block(
        &self,
        id: &BlockId,
        data: &[u8],
        crc: u32,
        pages: Pages,
    ) -> io::Result<(Option<Fingerprint>, Fingerprint)> {
        let path = self.data_path(&id.object);
        let open = |p: &Path, new: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true).mode(0o600);
            if new {
                o.create_new(true);
            } else {
                o.create(true);
            }
            o.open(p)
        };
        let created = |p: &Path| match open(p, true) {
            Ok(f) => Ok((f, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok((open(p, false)?, false)),
            Err(e) => Err(e),
        };
        let (f, created) = match created(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_parent(&path)?;
                created(&path)?
            }
            other => other?,
        };
        if f.metadata()?.nlink() > 1 {
            return Err(io::Error::other(
                "the cache file is a sealed copy's too; it is never written",
            ));
        }
        let before = Fingerprint::of(&f)?;
        let sums = open(&self.sums_path(&id.object), false)?;
        if sums.metadata()?.len() < SUMS_HEADER {
            sums.write_all_at(&sums_header(self.limits.block_size), 0)?;
        }
        // Data first: a checksum entry that outlives its data fails the check, never the
        // other way round.
        self.direct
            .write_at(&path, &f, data, id.index * self.limits.block_size, pages)?;
        sums.write_all_at(
            &sums_entry(data.len() as u32, crc),
            SUMS_HEADER + SUMS_ENTRY * id.index,
        )?;
        let after = Fingerprint::of(&f)?;
        Ok((if created { None } else { Some(before) }, after))
    }

    /// Clears block `id`'s checksum entry and releases its range of the data file. Returns
    /// the data file's state before and after, or None when the file has another name (a
    /// sealed copy's, see `adopt`) and is left as it is.
    #[allow(clippy::type_complexity)]
    fn punch(
        &self,
        id: &BlockId,
        len: u32,
    ) -> io::Result<Option<(Option<Fingerprint>, Option<Fingerprint>)>> {
        let f = match OpenOptions::new()
            .write(true)
            .open(self.data_path(&id.object))
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some((None, None))),
            Err(e) => return Err(e),
        };
        if f.metadata()?.nlink() > 1 {
            return Ok(None);
        }
        let before = Fingerprint::of(&f).ok();
        if let Ok(sums) = OpenOptions::new()
            .write(true)
            .open(self.sums_path(&id.object))
        {
            sums.write_all_at(
                &[0u8; SUMS_ENTRY as usize],
                SUMS_HEADER + SUMS_ENTRY * id.index,
            )?;
        }
        // SAFETY: a valid open descriptor; the range lies within the file or past its end.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (id.index * self.limits.block_size) as libc::off_t,
                allocated(u64::from(len)) as libc::off_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some((before, Fingerprint::of(&f).ok())))
    }

    /// Opens object `object` of `size` bytes as one file, if every block of it is cached
    /// and intact. Blocks that fail their checksum are dropped (and None returned), so that
    /// the reader fetches them again.
    pub fn open_whole(self: &Arc<Self>, object: ObjectId, size: u64) -> Option<WholeObject> {
        match self.open_whole_unread(object, size)? {
            Ok(whole) => Some(whole),
            Err(unchecked) => self.check_whole(unchecked),
        }
    }

    /// `open_whole` as far as it goes without reading the file: `Ok` when it is as this
    /// mount last wrote or checked it, which takes an open and a stat; `Err` when its blocks
    /// must be read and checked first (`check_whole`), which takes as long as the file is big.
    pub fn open_whole_unread(
        self: &Arc<Self>,
        object: ObjectId,
        size: u64,
    ) -> Option<Result<WholeObject, UncheckedWhole>> {
        let bs = self.limits.block_size;
        let n = size.div_ceil(bs);
        if n == 0 {
            return None;
        }
        let (entries, trusted, shared, file_lock) = {
            let mut idx = self.index.lock();
            let state = idx.objects.get(&object)?;
            if state.removing || state.blocks < n {
                return None;
            }
            let mut entries = Vec::with_capacity(n as usize);
            for index in 0..n {
                let len = bs.min(size - index * bs);
                let e = *idx.lru.get(&BlockId { object, index })?;
                if u64::from(e.len) != len {
                    return None;
                }
                entries.push(e);
            }
            // Objects open whole may hold at most half the cache, so that new blocks and
            // staged files still find room.
            let cost: u64 = entries.iter().map(|e| e.cost).sum();
            let already = idx.objects.get(&object).is_some_and(|o| o.pins > 0);
            if !already && idx.pinned + cost > self.limits.max_bytes / 2 {
                return None;
            }
            let state = idx.objects.get_mut(&object).expect("looked up above");
            state.pins += 1;
            let (trusted, shared) = (state.trusted, state.shared);
            let file_lock = state.file_lock.clone();
            if state.pins == 1 {
                state.pinned_cost = cost;
                idx.pinned += cost;
            }
            (entries, trusted, shared, file_lock)
        };
        let file = match File::open(self.data_path(&object)) {
            Ok(f) => f,
            Err(_) => {
                self.unpin(object);
                self.drop_object(object);
                return None;
            }
        };
        let whole = WholeObject {
            cache: self.clone(),
            object,
            file,
        };
        let seen = Fingerprint::of(&whole.file).ok()?;
        // A file shared with a sealed copy changes its change time when the copy's name
        // goes; nothing else of it may change.
        let unchanged = match trusted {
            Some(t) if shared => seen.same_content_as(&t),
            t => Some(seen) == t,
        };
        if unchanged && seen.size == size {
            self.stats.lock().whole_opens += 1;
            return Some(Ok(whole));
        }
        Some(Err(UncheckedWhole {
            whole,
            entries,
            seen,
            size,
            file_lock,
        }))
    }

    /// Reads and checks every block of an object `open_whole_unread` found changed since
    /// this mount last wrote or checked it (or never checked since the mount started), and
    /// hands it out when all are intact.
    pub fn check_whole(self: &Arc<Self>, unchecked: UncheckedWhole) -> Option<WholeObject> {
        let UncheckedWhole {
            whole,
            entries,
            seen,
            size,
            file_lock,
        } = unchecked;
        let (bs, object) = (self.limits.block_size, whole.object);
        let n = entries.len() as u64;
        let mut buf = vec![0u8; bs as usize];
        let mut damaged = Vec::new();
        for (index, e) in entries.iter().enumerate() {
            let buf = &mut buf[..e.len as usize];
            let ok = whole.file.read_exact_at(buf, index as u64 * bs).is_ok()
                && crc32fast::hash(buf) == e.crc;
            if !ok {
                damaged.push(BlockId {
                    object,
                    index: index as u64,
                });
            }
        }
        if seen.size != size && damaged.is_empty() {
            // Longer than the object: something wrote past its end.
            damaged.push(BlockId {
                object,
                index: n - 1,
            });
        }
        if !damaged.is_empty() {
            drop(whole);
            self.drop_corrupt(&damaged, "checksum mismatch");
            return None;
        }
        {
            let _file = file_lock.lock();
            if Fingerprint::of(&whole.file).ok() == Some(seen) {
                if let Some(o) = self.index.lock().objects.get_mut(&object) {
                    o.trusted = Some(seen);
                }
            }
        }
        let mut stats = self.stats.lock();
        stats.whole_opens += 1;
        stats.whole_checks += 1;
        drop(stats);
        Some(whole)
    }

    fn unpin(&self, object: ObjectId) {
        let mut idx = self.index.lock();
        let Some(o) = idx.objects.get_mut(&object) else {
            return;
        };
        o.pins = o.pins.saturating_sub(1);
        if o.pins > 0 {
            return;
        }
        let cost = std::mem::take(&mut o.pinned_cost);
        // Its blocks were dropped while it was open: its files go now.
        let emptied = o.blocks == 0 && o.writers == 0 && !o.removing;
        let overhead = o.overhead;
        if emptied {
            o.removing = true;
        }
        idx.pinned -= cost;
        if emptied {
            idx.bytes -= overhead;
            idx.releasing += overhead;
            drop(idx);
            self.evict(vec![Eviction::Remove(object, overhead)]);
        }
    }

    /// Caches the content of a file this mount just uploaded as object `key` with `etag`,
    /// so that reading it back needs no request. The cache file is another name (a hard
    /// link) of the sealed copy itself: no byte is written again, and its pages in the page
    /// cache serve the reader at once. Such an object is never written or punched, only
    /// removed whole, so the copy keeps its content. Where the link cannot be made (another
    /// filesystem), the content is copied, through the page cache.
    /// The copy is read whole first: the bytes must have the CRC-32 it was sealed with, `crc`.
    /// If they do not, no block is kept and the CRC-32 found is returned; when the file was
    /// linked, the fingerprints before and after the link are.
    pub(super) fn adopt(
        &self,
        key: &str,
        etag: &ETag,
        file: &File,
        size: u64,
        crc: Option<u32>,
    ) -> Result<Option<(Fingerprint, Fingerprint)>, u32> {
        self.note_uploaded(key, etag);
        let object = ObjectId::new(key, etag);
        let Ok(before) = Fingerprint::of(file) else {
            return Ok(None);
        };
        if before.size != size {
            return Ok(None);
        }
        let bs = self.limits.block_size;
        let mut buf = vec![0u8; bs.min(size) as usize];
        let mut whole = crc32fast::Hasher::new();
        let mut sums = Vec::with_capacity(size.div_ceil(bs) as usize);
        let mut index = 0;
        while index * bs < size {
            let len = bs.min(size - index * bs) as usize;
            if file.read_exact_at(&mut buf[..len], index * bs).is_err() {
                return Ok(None);
            }
            let mut block = crc32fast::Hasher::new();
            block.update(&buf[..len]);
            sums.push((len as u32, block.clone().finalize()));
            whole.combine(&block);
            index += 1;
        }
        let found = whole.finalize();
        if crc.is_some_and(|expected| expected != found) {
            self.drop_object(object);
            return Err(found);
        }
        match self.link_whole(object, file, &sums, &before) {
            Ok(Some(after)) => return Ok(Some((before, after))),
            Ok(None) => return Ok(None),
            // Cached already: the copy below fills what is missing, if anything.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                if !self.no_link.swap(true, Ordering::Relaxed) {
                    tracing::warn!(dir = %self.dir.display(), error = %e,
                        "cannot keep an uploaded file in the block cache as a hard link to its local copy; \
                         copying it instead, which writes its bytes to the cache disk a second time");
                }
            }
        }
        self.adopt_copy(object, file, size, Some(found))
            .map(|()| None)
    }

    /// Makes `file`, whose blocks have the lengths and CRC-32s `sums` and which was as
    /// `before` when they were read, the cache file of `object`, by a hard link. Returns its
    /// fingerprint after the link, or None when the cache has no room for it. Fails when
    /// the object is cached already, the link cannot be made, or the file changed.
    fn link_whole(
        &self,
        object: ObjectId,
        file: &File,
        sums: &[(u32, u32)],
        before: &Fingerprint,
    ) -> io::Result<Option<Fingerprint>> {
        let n = sums.len() as u64;
        if n == 0 {
            return Ok(None);
        }
        let data_cost: u64 = sums.iter().map(|(len, _)| allocated(u64::from(*len))).sum();
        let overhead = object_overhead(n - 1);
        let cost = data_cost + overhead;
        let (evictions, file_lock) = {
            let mut idx = self.index.lock();
            if idx.objects.contains_key(&object) {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            // The link takes no new disk space but for the checksum file, and the copy's
            // bytes, counted as staged until it goes, are these.
            let staged = self.staged.get().saturating_sub(data_cost);
            let need =
                (idx.bytes + idx.releasing + staged + cost).saturating_sub(self.limits.max_bytes);
            let (victims, freed) = choose_victims(&idx, need, None);
            if freed < need {
                self.stats.lock().skipped += n;
                return Ok(None);
            }
            let evictions = take_victims(&mut idx, &victims, None);
            let mut state = ObjectState::new();
            state.shared = true;
            state.writers = 1;
            state.overhead = overhead;
            let file_lock = state.file_lock.clone();
            idx.objects.insert(object, state);
            idx.bytes += cost;
            idx.writing += cost;
            (evictions, file_lock)
        };
        self.evict(evictions);
        let file_guard = file_lock.lock();
        let linked = self.link_files(&object, file, sums);
        let mut idx = self.index.lock();
        idx.writing -= cost;
        let state = idx
            .objects
            .get_mut(&object)
            .expect("an object being written stays indexed");
        state.writers -= 1;
        match linked {
            Ok(after) if after.same_content_as(before) => {
                state.trusted = Some(after);
                state.blocks = n;
                state.highest = n - 1;
                for (index, (len, crc)) in sums.iter().enumerate() {
                    let entry = Entry {
                        cost: allocated(u64::from(*len)),
                        len: *len,
                        crc: *crc,
                    };
                    idx.lru.put(
                        BlockId {
                            object,
                            index: index as u64,
                        },
                        entry,
                    );
                }
                drop(idx);
                drop(file_guard);
                self.stats.lock().inserted += n;
                Ok(Some(after))
            }
            other => {
                state.removing = true;
                idx.bytes -= cost;
                drop(idx);
                drop(file_guard);
                self.evict(vec![Eviction::Remove(object, 0)]);
                match other {
                    Err(e) => Err(e),
                    Ok(_) => Err(io::Error::other("the file changed while it was linked")),
                }
            }
        }
    }

    /// Links the open `file` as `object`'s cache file, and writes its checksum file.
    fn link_files(
        &self,
        object: &ObjectId,
        file: &File,
        sums: &[(u32, u32)],
    ) -> io::Result<Fingerprint> {
        use std::os::unix::ffi::OsStrExt;
        let path = self.data_path(object);
        create_parent(&path)?;
        // The open file itself, not whatever its path names by now.
        let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .expect("no NUL in a number");
        let to = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: both paths are NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // The data is there before its checksums, as for any block.
        let mut raw = Vec::with_capacity((SUMS_HEADER + SUMS_ENTRY * sums.len() as u64) as usize);
        raw.extend_from_slice(&sums_header(self.limits.block_size));
        for (len, crc) in sums {
            raw.extend_from_slice(&sums_entry(*len, *crc));
        }
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(self.sums_path(object))
            .and_then(|mut f| std::io::Write::write_all(&mut f, &raw));
        written?;
        Fingerprint::of(file)
    }

    /// `adopt` where the file cannot be linked: its blocks are written to the cache, through
    /// the page cache, until the cache turns one away; the bytes read must have CRC-32 `crc`.
    fn adopt_copy(
        &self,
        object: ObjectId,
        file: &File,
        size: u64,
        crc: Option<u32>,
    ) -> Result<(), u32> {
        let bs = self.limits.block_size;
        let mut buf = vec![0u8; bs as usize];
        let mut read = crc32fast::Hasher::new();
        let mut storing = true;
        let mut index = 0;
        while index * bs < size {
            let len = bs.min(size - index * bs) as usize;
            if file.read_exact_at(&mut buf[..len], index * bs).is_err() {
                self.drop_object(object);
                return Ok(());
            }
            read.update(&buf[..len]);
            // Once the cache turns a block away, the rest is only read for the checksum.
            storing =
                storing && self.put_block(BlockId { object, index }, &buf[..len], Pages::Keep);
            index += 1;
        }
        match (crc, read.finalize()) {
            (Some(expected), found) if expected != found => {
                self.drop_object(object);
                Err(found)
            }
            _ => {
                // Written through the page cache, a block reaches the disk later: a write
                // error then would leave pages to be read back as whatever the disk holds,
                // from a file trusted unchecked. Synced here, a failure drops the object.
                let synced = File::open(self.data_path(&object)).and_then(|f| f.sync_data());
                if let Err(e) = synced {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(error = %e, dir = %self.dir.display(), "cannot write an uploaded file to the block cache; it is read from the bucket instead");
                        self.drop_object(object);
                    }
                }
                Ok(())
            }
        }
    }

    /// `adopt` for the sealed copy `staged` of a file uploaded as `key` with `etag`: a copy
    /// found changed since it was sealed is marked so, and one linked stays trusted as it
    /// was (the link changed its change time only).
    pub fn adopt_staged(&self, key: &str, etag: &ETag, staged: &StagedFile, size: u64) {
        let (Ok(file), crc) = (staged.file(), staged.crc()) else {
            return self.forget_key(key);
        };
        match self.adopt(key, etag, &file, size, crc) {
            Ok(Some((before, after))) => staged.linked(&before, after),
            Ok(None) => {}
            Err(found) => {
                if let Some(expected) = crc {
                    staged.found_changed(expected, found);
                }
            }
        }
    }

    /// The ETag of `key` as this mount last uploaded it.
    pub fn known_etag(&self, key: &str) -> Option<ETag> {
        self.known_etags.lock().get(key).cloned()
    }

    /// This mount just uploaded `key` as `etag`: reads of it name that version, whether its
    /// content is kept here (`adopt`) or read back through readahead and this cache.
    pub fn note_uploaded(&self, key: &str, etag: &ETag) {
        self.known_etags.lock().put(key.to_string(), etag.clone());
    }

    /// Forgets what this mount knew of `key` (it was deleted or replaced here).
    pub fn forget_key(&self, key: &str) {
        self.known_etags.lock().pop(key);
    }
}

/// The least recently used blocks whose eviction frees `need` bytes (counting the overhead
/// of objects left without blocks), skipping objects open whole. Returns them and the bytes
/// they free, which fall short of `need` when not enough can be evicted.
fn choose_victims(idx: &Index, need: u64, writing: Option<ObjectId>) -> (Vec<BlockId>, u64) {
    let mut victims = Vec::new();
    let mut freed = 0;
    if need == 0 {
        return (victims, freed);
    }
    let mut left: HashMap<ObjectId, u64> = HashMap::new();
    for (id, e) in idx.lru.iter().rev() {
        if freed >= need {
            break;
        }
        let Some(state) = idx.objects.get(&id.object) else {
            continue;
        };
        if state.pins > 0 || idx.evicting.contains_key(id) {
            continue;
        }
        freed += e.cost;
        let remaining = left.entry(id.object).or_insert(state.blocks);
        *remaining -= 1;
        if *remaining == 0 && state.writers == 0 && writing != Some(id.object) {
            freed += state.overhead;
        }
        victims.push(*id);
    }
    (victims, freed)
}

/// Takes `victims` out of the index (skipping those no longer in it) and returns the disk
/// work that is left.
fn take_victims(idx: &mut Index, victims: &[BlockId], writing: Option<ObjectId>) -> Vec<Eviction> {
    let mut out = Vec::new();
    let mut emptied = Vec::new();
    for id in victims {
        let Some(e) = idx.lru.pop(id) else { continue };
        idx.bytes -= e.cost;
        idx.releasing += e.cost;
        let state = idx
            .objects
            .get_mut(&id.object)
            .expect("indexed blocks have an object");
        state.blocks -= 1;
        if state.blocks == 0 && state.writers == 0 && state.pins == 0 && writing != Some(id.object)
        {
            state.removing = true;
            let overhead = state.overhead;
            idx.bytes -= overhead;
            idx.releasing += overhead;
            emptied.push((id.object, overhead + e.cost));
        } else {
            idx.evicting.insert(*id, state.file_lock.clone());
            out.push(Eviction::Punch(*id, e.len, e.cost, state.file_lock.clone()));
        }
    }
    // An emptied object's files go whole; its blocks need no punching.
    for (object, mut bytes) in emptied {
        out.retain(|e| match e {
            Eviction::Punch(id, _, cost, _) if id.object == object => {
                bytes += cost;
                false
            }
            _ => true,
        });
        idx.evicting.retain(|id, _| id.object != object);
        out.push(Eviction::Remove(object, bytes));
    }
    out
}

/// The checksum file's header, for blocks of `block_size` bytes.
fn sums_header(block_size: u64) -> [u8; SUMS_HEADER as usize] {
    let mut header = [0u8; SUMS_HEADER as usize];
    header[..4].copy_from_slice(SUMS_MAGIC);
    header[4..8].copy_from_slice(&SUMS_VERSION.to_le_bytes());
    header[8..16].copy_from_slice(&block_size.to_le_bytes());
    header
}

/// A block's entry in the checksum file.
fn sums_entry(len: u32, crc: u32) -> [u8; SUMS_ENTRY as usize] {
    let mut entry = [0u8; SUMS_ENTRY as usize];
    entry[..4].copy_from_slice(&len.to_le_bytes());
    entry[4..].copy_from_slice(&crc.to_le_bytes());
    entry
}

/// Where object `object`'s cache file lives under `dir`.
fn data_path(dir: &Path, object: &ObjectId) -> PathBuf {
    let name = format!("{:032x}", object.0);
    dir.join(&name[..2]).join(name)
}

/// Makes the directory of the cache file at `path`, if it is missing (it goes with its
/// last object).
fn create_parent(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path.parent().expect("cache files have a parent"))
}

/// Its checksum file, beside it.
fn sums_path(dir: &Path, object: &ObjectId) -> PathBuf {
    let mut p = data_path(dir, object).into_os_string();
    p.push(".sums");
    PathBuf::from(p)
}

/// Removes an object's checksum file, then its cache file (so a crash between the two
/// leaves a half that the next open removes), then their directory if it is left empty.
fn remove_files(dir: &Path, object: &ObjectId) {
    let _ = std::fs::remove_file(sums_path(dir, object));
    let data = data_path(dir, object);
    let _ = std::fs::remove_file(&data);
    // The directory goes with its last object (a file being created there meanwhile
    // creates it again).
    if let Some(parent) = data.parent() {
        let _ = std::fs::remove_dir(parent);
    }
}

fn parse_name(name: &str) -> Option<ObjectId> {
    if name.len() != 32 {
        return None;
    }
    Some(ObjectId(u128::from_str_radix(name, 16).ok()?))
}

/// Reads a checksum file: its modification time and length, and each block's length (0:
/// not cached) and CRC-32. None when it was written for another block size.
#[allow(clippy::type_complexity)]
fn read_sums(
    path: &Path,
    block_size: u64,
) -> io::Result<Option<(SystemTime, u64, Vec<(u32, u32)>)>> {
    let raw = std::fs::read(path)?;
    let mtime = std::fs::metadata(path)?
        .modified()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if raw.len() < SUMS_HEADER as usize
        || &raw[..4] != SUMS_MAGIC
        || u32::from_le_bytes(raw[4..8].try_into().unwrap()) != SUMS_VERSION
        || u64::from_le_bytes(raw[8..16].try_into().unwrap()) != block_size
    {
        return Ok(None);
    }
    let entries = raw[SUMS_HEADER as usize..]
        .chunks_exact(SUMS_ENTRY as usize)
        .map(|c| {
            let len = u32::from_le_bytes(c[..4].try_into().unwrap());
            let crc = u32::from_le_bytes(c[4..].try_into().unwrap());
            (if u64::from(len) > block_size { 0 } else { len }, crc)
        })
        .collect();
    Ok(Some((mtime, raw.len() as u64, entries)))
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
            object: ObjectId::new("k", &ETag::new("e")),
            index: n,
        }
    }

    fn of(object: &str, n: u64) -> BlockId {
        BlockId {
            object: ObjectId::new(object, &ETag::new("e")),
            index: n,
        }
    }

    /// Disk space the cache directory's files take, as `du` counts it.
    fn dir_bytes(dir: &Path) -> u64 {
        let mut total = 0;
        for sub in std::fs::read_dir(dir.join("objects")).unwrap() {
            for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
                total += f.unwrap().metadata().unwrap().blocks() * 512;
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
        assert!(c.put(id(1), b"world"));
        assert!(c.put(id(3), b"!"));
        assert!(c.get(&id(1), 4).is_none(), "a wrong length is never served");
        drop(c);
        let c = BlockCache::open(dir.path(), limits(1 << 20), staged).unwrap();
        assert_eq!(c.get(&id(0), 5).unwrap().as_ref(), b"hello");
        assert_eq!(c.get(&id(3), 1).unwrap().as_ref(), b"!");
        assert!(c.get(&id(1), 5).is_none());
        assert!(c.get(&id(2), 5).is_none());
    }

    #[test]
    fn an_uploaded_file_is_adopted_only_when_it_still_holds_what_was_sealed() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), limits(1 << 20), Default::default()).unwrap();
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let size = data.len() as u64;
        let crc = crc32fast::hash(&data);
        let block = |etag: &str, index| BlockId {
            object: ObjectId::new("k", &ETag::new(etag)),
            index,
        };
        assert!(c
            .adopt("k", &ETag::new("good"), &f, size, Some(crc))
            .is_ok());
        assert_eq!(
            c.get(&block("good", 2), 150_000 - 2 * (64 << 10))
                .unwrap()
                .as_ref(),
            &data[2 * (64 << 10)..]
        );
        // Changed on disk since it was sealed: no block of it is kept, even the first ones.
        f.write_all_at(b"X", 140_000).unwrap();
        assert!(c
            .adopt("k", &ETag::new("bad"), &f, size, Some(crc))
            .is_err());
        assert!((0..3).all(|i| !c.contains(&block("bad", i))));
    }

    #[test]
    fn an_uploaded_file_is_linked_and_goes_whole_leaving_the_copy_intact() {
        let dir = tempfile::tempdir().unwrap();
        let staged = Arc::new(StagedBytes::default());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let copy = dir.path().join("copy");
        std::fs::write(&copy, &data).unwrap();
        let tail = 300_000 - 4 * (64 << 10);
        // Other blocks fill the cache until the adopted object is the one evicted.
        let fill = |c: &BlockCache, name: &str| {
            for i in 0..16 {
                c.put(of(name, i), &vec![7u8; 64 << 10]);
            }
        };
        for reopened in [false, true] {
            let c = BlockCache::open(dir.path(), limits(1 << 20), staged.clone()).unwrap();
            let f = File::open(&copy).unwrap();
            let etag = ETag::new(if reopened { "after a restart" } else { "e" });
            let object = ObjectId::new("k", &etag);
            let adopted = c.adopt("k", &etag, &f, 300_000, Some(crc32fast::hash(&data)));
            assert!(adopted.unwrap().is_some(), "linked, not copied");
            let cached = std::fs::metadata(c.data_path(&object)).unwrap();
            assert_eq!(cached.ino(), f.metadata().unwrap().ino());
            let c = if reopened {
                // The copy is still waiting: the object is found shared.
                drop(c);
                BlockCache::open(dir.path(), limits(1 << 20), staged.clone()).unwrap()
            } else {
                c
            };
            let last = BlockId { object, index: 4 };
            assert_eq!(
                c.get(&last, tail).unwrap().as_ref(),
                &data[4 * (64 << 10)..]
            );
            fill(&c, if reopened { "b" } else { "a" });
            assert!((0..5).all(|index| !c.contains(&BlockId { object, index })));
            assert!(!c.data_path(&object).exists(), "the object went whole");
            assert_eq!(
                std::fs::read(&copy).unwrap(),
                data,
                "the copy keeps its bytes"
            );
        }
    }

    #[test]
    fn a_block_punched_late_never_touches_the_object_cached_again_under_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), limits(1 << 20), Default::default()).unwrap();
        let block = vec![5u8; 64 << 10];
        assert!(c.put(of("a", 0), &block) && c.put(of("a", 1), &block));
        // Block 0 is taken for eviction; its punch is still to be done.
        let late = take_victims(&mut c.index.lock(), &[of("a", 0)], None);
        // Meanwhile the object goes whole, and is cached again.
        c.drop_object(of("a", 0).object);
        assert!(c.put(of("a", 0), &block));
        c.evict(late);
        assert_eq!(
            c.get(&of("a", 0), block.len()).unwrap().as_ref(),
            &block[..]
        );
    }

    #[test]
    fn a_cache_file_with_another_name_is_never_punched_or_written() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), limits(1 << 20), Default::default()).unwrap();
        let block: Vec<u8> = (0..64u32 << 10).map(|i| (i % 251) as u8).collect();
        for i in 0..3 {
            assert!(c.put(of("a", i), &block));
        }
        // As if the object had been removed and linked again while an eviction of one of
        // its blocks was under way.
        let other = dir.path().join("other");
        std::fs::hard_link(c.data_path(&of("a", 0).object), &other).unwrap();
        assert!(!c.put(of("a", 3), &block), "no block is written into it");
        for i in 0..16 {
            c.put(of("b", i), &vec![7u8; 64 << 10]);
        }
        assert!((0..3).all(|i| !c.contains(&of("a", i))));
        assert_eq!(std::fs::read(&other).unwrap(), block.repeat(3));
    }

    /// Pages of the file at `path` in the page cache, and pages it has.
    fn resident_pages(path: &Path) -> (usize, usize) {
        let f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        // SAFETY: sysconf reads a constant of the system.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let pages = len.div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: a shared read-only mapping of an open file, unmapped before return;
        // mincore writes one byte per page into `vec`, which has that many.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
            libc::munmap(addr, len);
        }
        (vec.iter().filter(|&&b| b & 1 == 1).count(), pages)
    }

    #[test]
    fn an_uploaded_file_stays_in_the_page_cache_once_adopted() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), limits(8 << 20), Default::default()).unwrap();
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let etag = ETag::new("e");
        c.adopt("k", &etag, &f, data.len() as u64, None).unwrap();
        let (resident, pages) = resident_pages(&c.data_path(&ObjectId::new("k", &etag)));
        assert_eq!(
            resident, pages,
            "every page of the adopted file is in memory"
        );
    }

    #[test]
    fn an_object_left_without_blocks_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), limits(1 << 20), Default::default()).unwrap();
        assert!(c.put(of("a", 0), b"kept"));
        assert!(c.put(of("b", 2), b"lost"));
        let (data, sums) = (
            c.data_path(&of("b", 0).object),
            c.sums_path(&of("b", 0).object),
        );
        drop(c);
        // As a crash between clearing the entry and removing the files would leave it.
        let f = OpenOptions::new().write(true).open(&sums).unwrap();
        f.write_all_at(&[0u8; SUMS_ENTRY as usize], SUMS_HEADER + 2 * SUMS_ENTRY)
            .unwrap();
        let c = BlockCache::open(dir.path(), limits(1 << 20), Default::default()).unwrap();
        assert!(!data.exists() && !sums.exists());
        assert_eq!(c.get(&of("a", 0), 4).unwrap().as_ref(), b"kept");
        // Only the object left is accounted.
        assert_eq!(c.bytes(), allocated(4) + object_overhead(0));
    }

    #[test]
    fn the_budget_is_never_exceeded() {
        let dir = tempfile::tempdir().unwrap();
        let staged = Arc::new(StagedBytes::default());
        let c = BlockCache::open(dir.path(), limits(512 << 10), staged.clone()).unwrap();
        let data = vec![7u8; 60 << 10];
        for n in 0..40 {
            // Two objects at once, as two readers would fill them.
            assert!(c.put(of(if n % 2 == 0 { "a" } else { "b" }, n / 2), &data));
            assert!(
                dir_bytes(dir.path()) <= 512 << 10,
                "{}",
                dir_bytes(dir.path())
            );
            assert!(c.bytes() <= 512 << 10);
        }
        // The most recent blocks are kept.
        assert!(c.get(&of("b", 19), data.len()).is_some());
        assert!(c.get(&of("a", 0), data.len()).is_none());
        // Staged files take room from blocks; with none left, blocks are not cached.
        assert!(c.fit_staged(400 << 10));
        staged.add(400 << 10);
        assert!(c.bytes() + staged.get() <= 512 << 10);
        assert!(c.fit_staged(112 << 10));
        staged.add(112 << 10);
        assert!(!c.fit_staged(1));
        assert!(!c.put(id(100), &data), "no room: not cached");
        assert_eq!(c.bytes(), 0);
        assert_eq!(dir_bytes(dir.path()), 0, "emptied objects leave no files");
    }

    #[test]
    fn damaged_blocks_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let c = BlockCache::open(dir.path(), limits(1 << 20), Default::default()).unwrap();
        assert!(c.put(id(0), b"payload"));
        assert!(c.put(id(1), b"other"));
        let path = c.data_path(&id(0).object);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"P", 0).unwrap();
        assert!(c.get(&id(0), 7).is_none());
        assert!(!c.contains(&id(0)));
        assert_eq!(c.stats().corrupt, 1);
        assert_eq!(c.get(&id(1), 5).unwrap().as_ref(), b"other");
        assert!(c.put(id(0), b"payload"));
        assert_eq!(c.get(&id(0), 7).unwrap().as_ref(), b"payload");
        // The files deleted behind the cache's back: every block of the object is gone.
        std::fs::remove_dir_all(dir.path().join("objects")).unwrap();
        assert!(c.get(&id(1), 5).is_none());
        assert!(!c.contains(&id(0)));
        assert_eq!(c.bytes(), 0);
        assert!(c.put(id(0), b"payload"));
    }

    #[test]
    fn a_whole_object_opens_as_one_file_and_is_checked_when_changed() {
        let dir = tempfile::tempdir().unwrap();
        let c =
            Arc::new(BlockCache::open(dir.path(), limits(4 << 20), Default::default()).unwrap());
        let bs = c.block_size() as usize;
        let data: Vec<u8> = (0..bs * 2 + 100).map(|i| (i % 251) as u8).collect();
        let object = ObjectId::new("k", &ETag::new("e"));
        assert!(c.put(id(0), &data[..bs]));
        assert!(c.put(id(2), &data[2 * bs..]));
        assert!(
            c.open_whole(object, data.len() as u64).is_none(),
            "a block is missing"
        );
        assert!(c.put(id(1), &data[bs..2 * bs]));
        let whole = c.open_whole(object, data.len() as u64).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut whole.file(), &mut got).unwrap();
        assert!(got == data);
        assert_eq!(c.stats().whole_checks, 0, "written by this cache: trusted");
        drop(whole);

        // Changed behind the cache's back: checked, and the damaged block dropped.
        let f = OpenOptions::new()
            .write(true)
            .open(c.data_path(&object))
            .unwrap();
        f.write_all_at(b"x", bs as u64 + 5).unwrap();
        assert!(c.open_whole(object, data.len() as u64).is_none());
        assert_eq!(c.stats().corrupt, 1);
        assert!(!c.contains(&id(1)));
        assert!(c.put(id(1), &data[bs..2 * bs]));
        assert!(c.open_whole(object, data.len() as u64).is_some());

        // After a reopen the file is checked once, then trusted.
        drop(c);
        let c =
            Arc::new(BlockCache::open(dir.path(), limits(4 << 20), Default::default()).unwrap());
        assert!(c.open_whole(object, data.len() as u64).is_some());
        assert!(c.open_whole(object, data.len() as u64).is_some());
        assert_eq!(c.stats().whole_checks, 1);
        assert_eq!(c.stats().whole_opens, 2);
    }

    #[test]
    fn an_object_open_whole_is_not_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let c =
            Arc::new(BlockCache::open(dir.path(), limits(640 << 10), Default::default()).unwrap());
        let data = vec![3u8; 64 << 10];
        for n in 0..4 {
            assert!(c.put(id(n), &data));
        }
        let whole = c
            .open_whole(ObjectId::new("k", &ETag::new("e")), 4 * (64 << 10))
            .unwrap();
        for n in 0..20 {
            c.put(of("other", n), &data);
            assert!(c.bytes() <= 640 << 10);
        }
        for n in 0..4 {
            assert!(c.contains(&id(n)));
        }
        drop(whole);
        for n in 0..20 {
            c.put(of("more", n), &data);
        }
        assert!(!c.contains(&id(0)), "evictable again once closed");
        assert!(
            c.open_whole(ObjectId::new("more", &ETag::new("e")), 20 * (64 << 10))
                .is_none(),
            "more than half the cache is never held open"
        );
    }

    #[test]
    fn another_etag_is_another_object() {
        assert_ne!(
            ObjectId::new("k", &ETag::new("\"a\"")),
            ObjectId::new("k", &ETag::new("\"b\""))
        );
        assert_eq!(
            ObjectId::new("k", &ETag::new("\"a\"")),
            ObjectId::new("k", &ETag::new("a"))
        );
        assert_ne!(
            ObjectId::new("ka", &ETag::new("")),
            ObjectId::new("k", &ETag::new("a"))
        );
    }
}
