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
pub use journal::{create_dir_durably, sync_dir, Change, Journal, Replay};
pub use lock::CacheLock;
pub use staging::{StagedFile, StagingArea};
