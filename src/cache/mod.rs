//! The on-disk cache directory of one mount: the staged copies of files being written, the
//! write-back journal with the sealed copies it refers to, and the lock that keeps two
//! mounts from sharing one directory.

mod journal;
mod lock;
mod staging;

pub use journal::{sync_dir, Change, Journal, Replay};
pub use lock::CacheLock;
pub use staging::{StagedFile, StagingArea};
