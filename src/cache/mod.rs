//! The on-disk cache directory of one mount: the staged copies of files being written, and
//! the lock that keeps two mounts from sharing one directory.

mod lock;
mod staging;

pub use lock::CacheLock;
pub use staging::{StagedFile, StagingArea};
