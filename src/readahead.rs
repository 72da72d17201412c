//! Reading objects through the block cache, with readahead for sequential readers.
//!
//! Each open handle has a `ReadStream` that watches its access pattern. While reads follow
//! each other, a window ahead of the reader (starting at `initial_window`, doubling with
//! each new block up to `max_window`) is fetched with concurrent ranged GETs into the block
//! cache; each GET spans a few blocks, and each block goes to its reader as soon as it has
//! arrived. A read outside the window collapses it to nothing, so a thumbnailer seeking
//! through an image costs one block-sized GET per seek and no wasted megabytes.
//!
//! Memory is bounded by one budget (`max_memory`) shared by all handles: half for data in
//! flight, a quarter for each handle's current block, a quarter for blocks fetched ahead
//! and not yet read (kept so that the reader need not read back from disk what was just
//! written there). Prefetching stops when its half is spent, a handle that cannot get room
//! for its current block reads it from disk each time, and blocks fetched ahead that do not
//! fit are read from the disk cache.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::cache::{BlockCache, BlockId, ObjectId};
use crate::store::{ETag, ObjectStore, StoreError, StoreResult};

#[derive(Debug, Clone)]
pub struct ReadaheadOptions {
    /// Readahead after the first sequential reads.
    pub initial_window: u64,
    /// Largest readahead window.
    pub max_window: u64,
    /// Memory for data in flight and buffered blocks, across all handles.
    pub max_memory: u64,
    /// Most blocks one GET fetches while reading ahead.
    pub blocks_per_request: u64,
}

impl Default for ReadaheadOptions {
    fn default() -> Self {
        ReadaheadOptions {
            initial_window: 1 << 20,
            max_window: 32 << 20,
            max_memory: 64 << 20,
            blocks_per_request: 4,
        }
    }
}

/// The object version a handle reads.
#[derive(Debug, Clone)]
pub struct ObjectRef {
    pub key: String,
    pub etag: ETag,
    pub size: u64,
    id: ObjectId,
}

impl ObjectRef {
    pub fn new(key: String, etag: ETag, size: u64) -> Self {
        let id = ObjectId::new(&key, &etag);
        ObjectRef {
            key,
            etag,
            size,
            id,
        }
    }
}

/// The read state of one open handle.
pub struct ReadStream {
    object: ObjectRef,
    state: Mutex<StreamState>,
}

#[derive(Default)]
struct StreamState {
    /// Where the next sequential read starts.
    next: u64,
    /// The last block read.
    last_block: Option<u64>,
    /// Current readahead window in bytes (0: not reading ahead).
    window: u64,
    /// Blocks before this one have been asked for ahead of the reader.
    ahead_to: u64,
    current: Option<Buffered>,
}

struct Buffered {
    index: u64,
    data: Bytes,
    _memory: OwnedSemaphorePermit,
}

impl ReadStream {
    pub fn new(object: ObjectRef) -> Self {
        ReadStream {
            object,
            state: Mutex::new(StreamState::default()),
        }
    }

    pub fn object(&self) -> &ObjectRef {
        &self.object
    }

    /// Current readahead window, for tests and status.
    pub fn window(&self) -> u64 {
        self.state.lock().window
    }
}

type Fetched = Option<StoreResult<Bytes>>;

enum Claim {
    /// Someone else is fetching the block; wait for it here.
    Wait(watch::Receiver<Fetched>),
    /// The caller fetches the block and publishes it here.
    Fetch(watch::Sender<Fetched>),
}

/// Counters for metrics and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadStats {
    pub requests: u64,
    pub bytes: u64,
}

pub struct Readahead {
    store: Arc<dyn ObjectStore>,
    blocks: Arc<BlockCache>,
    opts: ReadaheadOptions,
    /// The memory budget, in KiB: half for data in flight, a quarter for handles' buffers
    /// (so buffers held by idle handles can never stall a fetch); the last quarter is for
    /// blocks fetched ahead.
    fetch_memory: Arc<Semaphore>,
    buffer_memory: Arc<Semaphore>,
    inflight: Mutex<HashMap<BlockId, watch::Receiver<Fetched>>>,
    ahead: Mutex<FetchedAhead>,
    stats: Mutex<ReadStats>,
}

/// A block fetched ahead and not read within this long gives way to newer ones.
const AHEAD_STALE: Duration = Duration::from_secs(1);

/// Blocks fetched ahead of their reader, until it reads them. Bounded in bytes; when full,
/// blocks left unread for `AHEAD_STALE` (their reader went elsewhere) make room, and a
/// new block that still does not fit is not kept.
struct FetchedAhead {
    blocks: HashMap<BlockId, (Bytes, Instant)>,
    /// Insertion order, oldest first (entries already taken are skipped).
    order: VecDeque<(BlockId, Instant)>,
    bytes: u64,
    max_bytes: u64,
}

impl FetchedAhead {
    fn new(max_bytes: u64) -> Self {
        FetchedAhead {
            blocks: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    fn keep(&mut self, id: BlockId, data: Bytes) {
        let len = data.len() as u64;
        let now = Instant::now();
        // Drop what was read already or left unread too long from the front.
        while let Some(&(old, at)) = self.order.front() {
            let live = self.blocks.get(&old).is_some_and(|(_, t)| *t == at);
            if live && now.duration_since(at) < AHEAD_STALE {
                break;
            }
            self.order.pop_front();
            if live {
                self.take(&old);
            }
        }
        if self.bytes + len > self.max_bytes {
            return;
        }
        if let Some((old, _)) = self.blocks.insert(id, (data, now)) {
            self.bytes -= old.len() as u64;
        }
        self.bytes += len;
        self.order.push_back((id, now));
    }

    fn take(&mut self, id: &BlockId) -> Option<Bytes> {
        let (data, _) = self.blocks.remove(id)?;
        self.bytes -= data.len() as u64;
        if self.blocks.is_empty() {
            self.order.clear();
        }
        Some(data)
    }
}

fn kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).min(u32::MAX as u64) as u32
}

impl Readahead {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        blocks: Arc<BlockCache>,
        mut opts: ReadaheadOptions,
    ) -> Arc<Self> {
        let bs = blocks.block_size();
        // Reading further ahead than the cache can hold would evict blocks before they
        // are read.
        opts.max_window = opts.max_window.min(blocks.limits().max_bytes / 4).max(bs);
        opts.initial_window = opts.initial_window.clamp(bs, opts.max_window);
        opts.blocks_per_request = opts.blocks_per_request.max(1);
        let (half, quarter) = Self::shares(&opts, bs);
        let (fetch_memory, buffer_memory) = (
            Arc::new(Semaphore::new(half as usize)),
            Arc::new(Semaphore::new(quarter as usize)),
        );
        Arc::new(Readahead {
            store,
            blocks,
            opts,
            fetch_memory,
            buffer_memory,
            inflight: Mutex::new(HashMap::new()),
            ahead: Mutex::new(FetchedAhead::new(quarter as u64 * 1024)),
            stats: Default::default(),
        })
    }

    /// The budget's half and quarter, in KiB, each at least one block.
    fn shares(opts: &ReadaheadOptions, block_size: u64) -> (u32, u32) {
        let m = kib(opts.max_memory);
        ((m / 2).max(kib(block_size)), (m / 4).max(kib(block_size)))
    }

    pub fn blocks(&self) -> &Arc<BlockCache> {
        &self.blocks
    }

    pub fn stats(&self) -> ReadStats {
        *self.stats.lock()
    }

    /// Memory in use for data in flight and buffered blocks.
    pub fn memory_used(&self) -> u64 {
        let (half, quarter) = Self::shares(&self.opts, self.blocks.block_size());
        let free =
            (self.fetch_memory.available_permits() + self.buffer_memory.available_permits()) as u64;
        (half as u64 + quarter as u64 - free) * 1024 + self.ahead.lock().bytes
    }

    fn block_len(&self, object: &ObjectRef, index: u64) -> u64 {
        let bs = self.blocks.block_size();
        bs.min(object.size.saturating_sub(index * bs))
    }

    /// Reads up to `len` bytes at `offset` of the stream's object.
    pub async fn read(
        self: &Arc<Self>,
        stream: &ReadStream,
        offset: u64,
        len: u32,
    ) -> StoreResult<Bytes> {
        let object = &stream.object;
        if offset >= object.size || len == 0 {
            return Ok(Bytes::new());
        }
        let bs = self.blocks.block_size();
        let end = object.size.min(offset + len as u64);
        let (first, last) = (offset / bs, (end - 1) / bs);
        let ahead = self.plan(stream, offset, end, last);
        if let Some(blocks) = ahead {
            self.read_ahead(stream, blocks);
        }
        if first == last {
            let data = self.block(stream, first).await?;
            let from = (offset - first * bs) as usize;
            let to = ((end - first * bs) as usize).min(data.len());
            return Ok(data.slice(from.min(to)..to));
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for index in first..=last {
            let data = self.block(stream, index).await?;
            let start = index * bs;
            let from = offset.saturating_sub(start) as usize;
            let to = ((end - start) as usize).min(data.len());
            out.extend_from_slice(&data[from.min(to)..to]);
        }
        Ok(out.freeze())
    }

    /// Updates the stream's access pattern; returns the blocks to read ahead, if any.
    fn plan(&self, stream: &ReadStream, offset: u64, end: u64, last: u64) -> Option<Range<u64>> {
        let bs = self.blocks.block_size();
        let mut st = stream.state.lock();
        // Reads that overlap, trail by up to a block (the kernel reorders parallel reads)
        // or land inside the window count as sequential.
        let sequential = offset + bs >= st.next && offset <= st.next + st.window.max(bs);
        if sequential {
            // The window grows with each block the reader reaches. (Reads of a block's
            // length that straddle two blocks begin in the block the last one ended in.)
            if st.last_block.is_none_or(|b| last > b) {
                st.window = if st.window == 0 {
                    self.opts.initial_window
                } else {
                    (st.window * 2).min(self.opts.max_window)
                };
            }
        } else {
            st.window = 0;
            st.ahead_to = 0;
        }
        st.next = end;
        st.last_block = Some(last);
        if st.window == 0 {
            return None;
        }
        // Read ahead in large steps: only once less than half the window is left.
        if st.ahead_to > last + 1 && (st.ahead_to - last - 1) * bs >= st.window / 2 {
            return None;
        }
        let until = stream.object.size.min(end + st.window);
        let to = until.div_ceil(bs);
        let from = st.ahead_to.max(last + 1);
        if from >= to {
            return None;
        }
        st.ahead_to = to;
        Some(from..to)
    }

    /// Starts fetching the missing blocks of `range` in the background, a few blocks per
    /// request, while memory allows.
    fn read_ahead(self: &Arc<Self>, stream: &ReadStream, range: Range<u64>) {
        let object = &stream.object;
        let cached: Vec<BlockId> = range
            .clone()
            .map(|index| BlockId {
                object: object.id,
                index,
            })
            .filter(|id| self.blocks.contains(id))
            .collect();
        if !cached.is_empty() {
            let blocks = self.blocks.clone();
            tokio::task::spawn_blocking(move || blocks.prefetch(&cached));
        }
        let mut index = range.start;
        while index < range.end {
            let mut run: Vec<(u64, watch::Sender<Fetched>)> = Vec::new();
            let mut bytes = 0;
            while index < range.end && (run.len() as u64) < self.opts.blocks_per_request {
                let id = BlockId {
                    object: object.id,
                    index,
                };
                if self.blocks.contains(&id) {
                    index += 1;
                    if run.is_empty() {
                        continue;
                    }
                    break;
                }
                match self.claim(id) {
                    Claim::Fetch(tx) => {
                        bytes += self.block_len(object, index);
                        run.push((index, tx));
                        index += 1;
                    }
                    Claim::Wait(_) => {
                        index += 1;
                        if run.is_empty() {
                            continue;
                        }
                        break;
                    }
                }
            }
            if run.is_empty() {
                continue;
            }
            let Ok(permit) = self.fetch_memory.clone().try_acquire_many_owned(kib(bytes)) else {
                // Out of memory budget: give the claims back and read ahead later.
                let first = run[0].0;
                self.unclaim(object, &run);
                let mut st = stream.state.lock();
                st.ahead_to = st.ahead_to.min(first);
                return;
            };
            let me = self.clone();
            let object = object.clone();
            tokio::spawn(async move { me.fetch_run(&object, run, permit).await });
        }
    }

    fn claim(&self, id: BlockId) -> Claim {
        let mut inflight = self.inflight.lock();
        if let Some(rx) = inflight.get(&id) {
            return Claim::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        inflight.insert(id, rx);
        Claim::Fetch(tx)
    }

    fn unclaim(&self, object: &ObjectRef, run: &[(u64, watch::Sender<Fetched>)]) {
        let mut inflight = self.inflight.lock();
        for (index, _) in run {
            inflight.remove(&BlockId {
                object: object.id,
                index: *index,
            });
        }
    }

    /// Fetches consecutive blocks with one GET; each block, as it arrives, goes to whoever
    /// waits for it (or is kept for the reader ahead of whom it was fetched) and to the
    /// block cache.
    async fn fetch_run(
        &self,
        object: &ObjectRef,
        run: Vec<(u64, watch::Sender<Fetched>)>,
        permit: OwnedSemaphorePermit,
    ) {
        let bs = self.blocks.block_size();
        let first = run[0].0;
        let start = first * bs;
        let end = object.size.min((first + run.len() as u64) * bs);
        tracing::trace!(key = object.key, first, blocks = run.len(), "fetching");
        // Counted before any of it reaches a reader, so that the counters never lag
        // behind what readers have seen.
        self.stats.lock().requests += 1;
        let mut arrived = 0;
        let mut short = None;
        let mut held = None;
        let mut writes = Vec::with_capacity(run.len());
        let result = {
            let mut sink = |piece: Bytes| {
                self.stats.lock().bytes += piece.len() as u64;
                let Some((index, _)) = run.get(arrived) else {
                    return;
                };
                let len = self.block_len(object, *index);
                if short.is_some() || piece.len() as u64 != len {
                    short.get_or_insert(StoreError::Truncated {
                        expected: len,
                        got: piece.len() as u64,
                    });
                    return;
                }
                arrived += 1;
                if arrived == run.len() {
                    // The run's last block goes out once the request is over and counted
                    // in the store's metrics: a reader that has read every block then
                    // finds every request counted.
                    held = Some(piece);
                } else {
                    writes.push(self.publish(object, &run[arrived - 1], piece));
                }
            };
            self.store
                .get_pieces(&object.key, start..end, Some(&object.etag), bs, &mut sink)
                .await
        };
        if let Some(piece) = held {
            writes.push(self.publish(object, &run[run.len() - 1], piece));
        }
        let error = match (result, short) {
            (Err(e), _) | (Ok(_), Some(e)) => Some(e),
            (Ok(n), None) if arrived < run.len() => Some(StoreError::Truncated {
                expected: end - start,
                got: n,
            }),
            _ => None,
        };
        if let Some(e) = error {
            for (_, tx) in &run[arrived..] {
                tx.send_replace(Some(Err(e.clone())));
            }
        }
        // Blocks leave the in-flight table once they can be read from the cache.
        for w in writes {
            let _ = w.await;
        }
        self.unclaim(object, &run);
        drop(permit);
    }

    /// Hands a fetched block to whoever waits for it (or keeps it for the reader ahead of
    /// whom it was fetched), and starts writing it to the block cache.
    fn publish(
        &self,
        object: &ObjectRef,
        (index, tx): &(u64, watch::Sender<Fetched>),
        piece: Bytes,
    ) -> tokio::task::JoinHandle<bool> {
        let id = BlockId {
            object: object.id,
            index: *index,
        };
        // Nobody waits for it yet: a reader ahead of whom it was fetched will come for it
        // soon.
        if tx.receiver_count() <= 1 {
            self.ahead.lock().keep(id, piece.clone());
        }
        tx.send_replace(Some(Ok(piece.clone())));
        let blocks = self.blocks.clone();
        tokio::task::spawn_blocking(move || blocks.put(id, &piece))
    }

    /// Block `index` of the stream's object: from the handle's buffer, the block cache, a
    /// fetch in flight, or a new GET.
    async fn block(self: &Arc<Self>, stream: &ReadStream, index: u64) -> StoreResult<Bytes> {
        if let Some(b) = stream
            .state
            .lock()
            .current
            .as_ref()
            .filter(|b| b.index == index)
        {
            return Ok(b.data.clone());
        }
        let object = &stream.object;
        let id = BlockId {
            object: object.id,
            index,
        };
        if let Some(data) = self.take_fetched_ahead(stream, id) {
            return Ok(data);
        }
        let len = self.block_len(object, index) as usize;
        loop {
            let claim = {
                let waiting = self.inflight.lock().get(&id).cloned();
                match waiting {
                    Some(rx) => Claim::Wait(rx),
                    None => {
                        // A fetch may have finished since the first look: its block waits
                        // in memory.
                        if let Some(data) = self.take_fetched_ahead(stream, id) {
                            return Ok(data);
                        }
                        let blocks = self.blocks.clone();
                        let cached = tokio::task::spawn_blocking(move || blocks.get(&id, len))
                            .await
                            .map_err(|e| {
                                StoreError::Local(format!("reading the block cache failed: {e}"))
                            })?;
                        if let Some(data) = cached {
                            self.keep_current(stream, index, data.clone());
                            return Ok(data);
                        }
                        self.claim(id)
                    }
                }
            };
            match claim {
                Claim::Wait(mut rx) => match rx.wait_for(|v| v.is_some()).await {
                    Ok(v) => {
                        let data = v.clone().expect("waited for a value")?;
                        self.ahead.lock().take(&id);
                        self.keep_current(stream, index, data.clone());
                        return Ok(data);
                    }
                    // The fetch was given up; try again.
                    Err(_) => continue,
                },
                Claim::Fetch(tx) => {
                    let permit = self
                        .fetch_memory
                        .clone()
                        .acquire_many_owned(kib(len as u64))
                        .await
                        .map_err(|_| StoreError::ShuttingDown)?;
                    let mut rx = tx.subscribe();
                    self.fetch_run(object, vec![(index, tx)], permit).await;
                    let data = rx.borrow_and_update().clone().expect("published")?;
                    self.keep_current(stream, index, data.clone());
                    return Ok(data);
                }
            }
        }
    }

    /// Block `id`, if it was fetched ahead and waits in memory; it becomes the handle's
    /// current block.
    fn take_fetched_ahead(&self, stream: &ReadStream, id: BlockId) -> Option<Bytes> {
        let data = self.ahead.lock().take(&id)?;
        self.keep_current(stream, id.index, data.clone());
        Some(data)
    }

    /// Keeps `data` as the handle's current block while the memory budget allows.
    fn keep_current(&self, stream: &ReadStream, index: u64, data: Bytes) {
        let mut st = stream.state.lock();
        st.current = None;
        if let Ok(permit) = self
            .buffer_memory
            .clone()
            .try_acquire_many_owned(kib(data.len() as u64))
        {
            st.current = Some(Buffered {
                index,
                data,
                _memory: permit,
            });
        }
    }

    /// Reads an object version whose ETag is unknown, straight from the store.
    pub async fn read_uncached(
        &self,
        key: &str,
        size: u64,
        offset: u64,
        len: u32,
    ) -> StoreResult<Bytes> {
        if offset >= size {
            return Ok(Bytes::new());
        }
        let end = size.min(offset + len as u64);
        let data = self.store.get_range(key, offset..end, None).await?;
        let mut s = self.stats.lock();
        s.requests += 1;
        s.bytes += data.len() as u64;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheLimits, MinFree};
    use crate::store::MemoryStore;

    async fn setup(
        size: usize,
        cache: u64,
    ) -> (tempfile::TempDir, Arc<Readahead>, Vec<u8>, ObjectRef) {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(MemoryStore::new());
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let etag = mem
            .put("obj", Bytes::from(data.clone()))
            .await
            .unwrap()
            .unwrap();
        let limits = CacheLimits {
            max_bytes: cache,
            min_free: MinFree::Bytes(0),
            block_size: 64 << 10,
        };
        let blocks = Arc::new(BlockCache::open(dir.path(), limits, Default::default()).unwrap());
        let opts = ReadaheadOptions {
            initial_window: 64 << 10,
            max_window: 1 << 20,
            // A quarter (for blocks fetched ahead) holds more than the largest window.
            max_memory: 8 << 20,
            blocks_per_request: 4,
        };
        let ra = Readahead::new(mem, blocks, opts);
        (
            dir,
            ra,
            data,
            ObjectRef::new("obj".into(), etag, size as u64),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_reads_return_the_bytes_and_read_ahead() {
        let (_d, ra, data, obj) = setup(3 << 20 | 12345, 64 << 20).await;
        let s = ReadStream::new(obj.clone());
        let mut got = Vec::new();
        while (got.len() as u64) < obj.size {
            let b = ra.read(&s, got.len() as u64, 16 << 10).await.unwrap();
            assert!(!b.is_empty());
            got.extend_from_slice(&b);
        }
        assert_eq!(got, data);
        assert_eq!(s.window(), 1 << 20);
        // Read ahead in requests of several blocks, not one GET per block.
        assert!(
            ra.stats().requests < obj.size / (64 << 10) / 2,
            "{:?}",
            ra.stats()
        );
        // A second pass costs nothing.
        let before = ra.stats().requests;
        let s2 = ReadStream::new(obj.clone());
        let all = ra.read(&s2, 0, obj.size as u32).await.unwrap();
        assert_eq!(all.as_ref(), &data[..]);
        assert_eq!(ra.stats().requests, before);
        assert_eq!(ra.read(&s2, obj.size, 10).await.unwrap().len(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_sized_reads_across_block_boundaries_widen_the_window() {
        // The kernel's 1 MiB readahead requests rarely start on a block boundary.
        let (_d, ra, data, obj) = setup(4 << 20, 64 << 20).await;
        let s = ReadStream::new(obj.clone());
        let bs = 64 << 10;
        let mut offset = 0;
        for len in [16 << 10, 32 << 10, bs as u32] {
            let b = ra.read(&s, offset, len).await.unwrap();
            assert_eq!(
                b.as_ref(),
                &data[offset as usize..offset as usize + len as usize]
            );
            offset += len as u64;
        }
        while offset < obj.size {
            let b = ra.read(&s, offset, bs as u32).await.unwrap();
            assert_eq!(
                b.as_ref(),
                &data[offset as usize..offset as usize + b.len()]
            );
            offset += b.len() as u64;
        }
        assert_eq!(s.window(), 1 << 20);
        assert!(ra.stats().requests < obj.size / bs / 2, "{:?}", ra.stats());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_reads_fetch_one_block_each() {
        let (_d, ra, data, obj) = setup(8 << 20, 64 << 20).await;
        let s = ReadStream::new(obj.clone());
        let offsets = [
            5_000_000u64,
            123,
            7_000_000,
            2_000_000,
            6_500_000,
            4_000_000,
        ];
        for &o in &offsets {
            let b = ra.read(&s, o, 4096).await.unwrap();
            assert_eq!(b.as_ref(), &data[o as usize..o as usize + 4096]);
        }
        let stats = ra.stats();
        assert!(
            stats.bytes <= offsets.len() as u64 * (64 << 10) * 2,
            "{stats:?}"
        );
        assert_eq!(s.window(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replaced_object_fails_instead_of_mixing() {
        let (_d, ra, _data, obj) = setup(1 << 20, 64 << 20).await;
        ra.store
            .put("obj", Bytes::from_static(b"new"))
            .await
            .unwrap();
        let s = ReadStream::new(obj);
        assert_eq!(
            ra.read(&s, 0, 10).await.unwrap_err(),
            StoreError::PreconditionFailed
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocks_fetched_ahead_are_read_from_memory_not_back_from_disk() {
        let (_d, ra, data, obj) = setup(3 << 20, 64 << 20).await;
        let s = ReadStream::new(obj.clone());
        let mut got = Vec::new();
        while (got.len() as u64) < obj.size {
            let b = ra.read(&s, got.len() as u64, 64 << 10).await.unwrap();
            got.extend_from_slice(&b);
        }
        assert_eq!(got, data);
        let cache = ra.blocks().stats();
        assert_eq!(cache.hits, 0, "{cache:?}");
        assert_eq!(ra.ahead.lock().bytes, 0);
        // Every block goes to disk all the same, for the next reader.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ra.blocks().stats().inserted < 48 {
            assert!(Instant::now() < deadline, "{:?}", ra.blocks().stats());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_block_reaches_its_reader_before_the_rest_of_its_request_has_come() {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(MemoryStore::new());
        let data: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 7 % 253) as u8).collect();
        let etag = mem
            .put("obj", Bytes::from(data.clone()))
            .await
            .unwrap()
            .unwrap();
        let gate = mem.hold_pieces_after_the_first();
        let bs = 64 << 10;
        let limits = CacheLimits {
            max_bytes: 64 << 20,
            min_free: MinFree::Bytes(0),
            block_size: bs,
        };
        let blocks = Arc::new(BlockCache::open(dir.path(), limits, Default::default()).unwrap());
        let opts = ReadaheadOptions {
            initial_window: 4 * bs,
            max_window: 1 << 20,
            max_memory: 8 << 20,
            blocks_per_request: 4,
        };
        let ra = Readahead::new(mem, blocks, opts);
        let s = ReadStream::new(ObjectRef::new("obj".into(), etag, data.len() as u64));
        // The first read fetches block 0 alone and reads blocks 1-4 ahead in one request,
        // which hands over block 1 and then stalls.
        assert_eq!(
            ra.read(&s, 0, bs as u32).await.unwrap(),
            data[..bs as usize]
        );
        let second = tokio::time::timeout(Duration::from_secs(10), ra.read(&s, bs, bs as u32))
            .await
            .expect("block 1 waits for the rest of its request");
        assert_eq!(second.unwrap(), data[bs as usize..2 * bs as usize]);
        gate.add_permits(1000);
        let mut got = data[..2 * bs as usize].to_vec();
        while got.len() < data.len() {
            let b = ra.read(&s, got.len() as u64, bs as u32).await.unwrap();
            got.extend_from_slice(&b);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn blocks_kept_ahead_are_bounded_and_give_way_when_left_unread() {
        let id = |index| BlockId {
            object: ObjectId::new("k", &ETag::new("e")),
            index,
        };
        let mut a = FetchedAhead::new(3);
        for i in 0..4 {
            a.keep(id(i), Bytes::from_static(b"x"));
        }
        // Full: the fourth was not kept.
        assert_eq!(a.bytes, 3);
        assert!(a.take(&id(3)).is_none());
        assert_eq!(a.take(&id(0)).as_deref(), Some(&b"x"[..]));
        a.keep(id(3), Bytes::from_static(b"x"));
        assert!(a.blocks.contains_key(&id(3)));
        // Unread for too long: they make room.
        for (_, t) in a.blocks.values_mut() {
            *t -= AHEAD_STALE;
        }
        for e in a.order.iter_mut() {
            e.1 -= AHEAD_STALE;
        }
        a.keep(id(9), Bytes::from_static(b"y"));
        assert_eq!(a.bytes, 1);
        assert!(a.order.len() <= 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_stays_within_budget_with_many_readers() {
        let (_d, ra, data, obj) = setup(4 << 20, 64 << 20).await;
        let mut tasks = Vec::new();
        for r in 0..16u64 {
            let (ra, obj) = (ra.clone(), obj.clone());
            tasks.push(tokio::spawn(async move {
                let s = ReadStream::new(obj.clone());
                let mut got = Vec::new();
                let mut off = r * 4096;
                while off < obj.size {
                    let b = ra.read(&s, off, 32 << 10).await.unwrap();
                    assert!(ra.memory_used() <= 8 << 20);
                    got.extend_from_slice(&b);
                    off += b.len() as u64;
                }
                (r, got)
            }));
        }
        for t in tasks {
            let (r, got) = t.await.unwrap();
            assert_eq!(got, &data[(r * 4096) as usize..]);
        }
    }
}
