//! s3mediafs: mount an S3 or S3-compatible bucket as a directory, built to hold a Matrix
//! homeserver's media store.
//!
//! Layers, from the kernel down: `fuse` (translation only) -> `fs` (filesystem semantics,
//! FUSE-agnostic) -> `store` (the object store trait, S3 and in-memory) and `cache` (the local
//! cache directory). `config` validates options; `mount` runs the mount's lifecycle.
//! `import` copies an existing media store into a bucket; `status` reports on a running
//! mount.

pub mod cache;
pub mod config;
pub mod docs;
pub mod fs;
pub mod fuse;
pub mod import;
pub mod metrics;
pub mod mount;
pub mod passthrough;
pub mod readahead;
pub mod retry;
pub mod status;
pub mod store;
pub mod writeback;
