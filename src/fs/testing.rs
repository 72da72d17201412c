//! A filesystem over the in-memory store, for the fast tests (the fs-level tests of
//! `fs/tests.rs` and `tests/model.rs`): tiny blocks, and a runtime of its own.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{BucketFs, FsOptions};
use crate::cache::{BlockCache, CacheLimits, Journal, MinFree, StagedBytes, StagingArea};
use crate::readahead::{Readahead, ReadaheadOptions};
use crate::store::{MemoryStore, ObjectStore};
use crate::writeback::{WritebackOptions, WritebackQueue};

/// A filesystem over `store`, its cache directory `cache` holding at most `cache_bytes`, with
/// its own runtime, so that dropping the runtime stops its background uploads dead, as a
/// crash would.
pub fn instance(
    store: &Arc<MemoryStore>,
    cache: &Path,
    ttl: Duration,
    cache_bytes: u64,
) -> (BucketFs, Arc<WritebackQueue>, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let opts = FsOptions {
        metadata_ttl: ttl,
        ..FsOptions::default()
    };
    let dyn_store: Arc<dyn ObjectStore> = store.clone();
    // Tiny blocks, so reads cross blocks and blocks are evicted.
    let staged = Arc::new(StagedBytes::default());
    let limits = CacheLimits {
        max_bytes: cache_bytes,
        min_free: MinFree::Bytes(0),
        block_size: 8,
    };
    let blocks = Arc::new(BlockCache::open(cache, limits, staged.clone()).unwrap());
    let (journal, replay) = Journal::open(cache).unwrap();
    let queue = WritebackQueue::new(
        dyn_store.clone(),
        journal,
        replay,
        WritebackOptions::default(),
        blocks.clone(),
    )
    .unwrap();
    {
        let _g = rt.enter();
        queue.start();
    }
    let ra_opts = ReadaheadOptions {
        initial_window: 8,
        max_window: 64,
        max_memory: 64 << 10,
        blocks_per_request: 3,
    };
    let readahead = Readahead::new(dyn_store.clone(), blocks, ra_opts);
    let staging = StagingArea::open(cache, staged).unwrap();
    let fs = BucketFs::new(dyn_store, "pre/", staging, queue.clone(), readahead, opts);
    (fs, queue, rt)
}

/// Stops an instance as the end of its process would, before its cache is opened again:
/// its runtime goes down with whatever it was doing, and its journal thread stops.
pub fn stop(fs: BucketFs, queue: Arc<WritebackQueue>, rt: tokio::runtime::Runtime) {
    drop(rt);
    queue.halt();
    drop(fs);
}
