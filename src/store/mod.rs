//! The object store seen by the filesystem: a small async trait over the S3 operations the
//! mount needs, with one implementation that talks to a real S3 endpoint (`s3.rs`) and one
//! that keeps objects in memory for fast unit and model tests (`memory.rs`, compiled only
//! for tests: the crate's own, and with the `test-util` feature, which the crate's
//! integration tests turn on through its dev-dependency on itself).

mod body_check;
mod etag;
#[cfg(any(test, feature = "test-util"))]
mod memory;
mod metered;
mod s3;
mod upload;

use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

pub use body_check::crc32_base64;
pub use etag::ETag;
#[cfg(any(test, feature = "test-util"))]
pub use memory::MemoryStore;
pub use metered::MeteredStore;
pub use s3::{AttemptCounts, Encryption, ObjectOptions, S3Store, StoreConfig};
pub use upload::{
    part_size_for, upload_file, OpenUploads, UploadLimits, MAX_OBJECT_SIZE, MAX_PARTS,
};

/// What the store knows about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    pub etag: Option<ETag>,
    pub last_modified: SystemTime,
}

/// One page of a delimited listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    /// Objects directly under the prefix (their keys contain no delimiter past the prefix).
    pub objects: Vec<ObjectMeta>,
    /// Common prefixes ("subdirectories"), each ending with the delimiter.
    pub prefixes: Vec<String>,
    /// Token for the next page, if the listing was truncated.
    pub next_token: Option<String>,
}

/// Why a store operation failed, in terms the filesystem can act on.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("no such object")]
    NotFound,
    #[error("the object changed while it was being read")]
    PreconditionFailed,
    #[error("the requested range is outside the object")]
    InvalidRange,
    #[error("the bucket {0:?} does not exist")]
    NoSuchBucket(String),
    #[error("access denied: {0}")]
    AccessDenied(String),
    #[error("the credentials were rejected: {0}")]
    BadCredentials(String),
    /// The bucket answers only in another region; the sentence says what to set.
    #[error("the bucket is in another region than the one configured ({0}); set --region (or -o region=) to the bucket's region")]
    WrongRegion(String),
    /// The store does not offer this request (S3's `NotImplemented`, HTTP 501).
    #[error("the store does not implement {op}: {message}")]
    NotImplemented { op: &'static str, message: String },
    #[error("cannot reach the endpoint: {0}")]
    Unreachable(String),
    /// The body of an answer broke off on the way.
    #[error("{0}")]
    BrokenOff(String),
    #[error("the store answered with a body shorter than announced ({got} of {expected} bytes)")]
    Truncated { expected: u64, got: u64 },
    /// The store says it holds other bytes than were sent: the body was damaged on the way.
    #[error("{0}")]
    Damaged(String),
    /// An answer the protocol does not allow: a range ignored, an upload id or part ETag
    /// missing, a part the store never received.
    #[error("{0}")]
    Protocol(String),
    /// The store answered with an error of no kind above: an HTTP 5xx, `SlowDown`,
    /// `InternalError`, a key refused inside a batch. Worth another try later.
    #[error("{0}")]
    Service(String),
    #[error("the local copy read for upload is not the one sealed (CRC-32 {found:08x}, sealed as {expected:08x})")]
    SourceChanged { expected: u32, found: u32 },
    /// A local step of the request failed: reading the copy to upload or the block cache.
    #[error("{0}")]
    Local(String),
    /// The mount is shutting down; the request was not sent, or its answer not awaited.
    #[error("the mount is shutting down")]
    ShuttingDown,
}

impl StoreError {
    /// Whether sending the same part again may succeed where this try failed: the store
    /// refused what it received, the body broke off, or the store had a passing failure.
    /// An unreachable store fails the whole upload instead, which write-back retries.
    pub fn part_worth_resending(&self) -> bool {
        matches!(
            self,
            StoreError::Damaged(_)
                | StoreError::BrokenOff(_)
                | StoreError::Protocol(_)
                | StoreError::Service(_)
        )
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The operations the filesystem performs on a bucket. Keys are full object keys (the mount
/// prefix already applied).
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Metadata of one object, or `NotFound`.
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta>;

    /// Bytes `range` of the object. With `if_match`, fails with `PreconditionFailed` when the
    /// object's ETag is no longer that one. A range past the end is clipped by the store.
    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&ETag>,
    ) -> StoreResult<Bytes>;

    /// Like `get_range`, with the bytes handed to `sink` as they arrive, in order, cut into
    /// pieces of `piece` bytes (the last of the range may be shorter), each its own
    /// allocation: a cache block can be kept or dropped without pinning its neighbours, and
    /// a reader can have the first block of a long request before the rest has come.
    /// Returns the bytes handed over. On an error, the pieces handed over before it are
    /// sound; the short last piece is only handed over once the whole answer has come.
    async fn get_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&ETag>,
        piece: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> StoreResult<u64>;

    /// One page of the listing of `prefix` with delimiter `/` (or no delimiter when
    /// `recursive`), at most `max_keys` entries.
    async fn list(
        &self,
        prefix: &str,
        recursive: bool,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage>;

    /// Store `body` as the whole object; returns its ETag.
    async fn put(&self, key: &str, body: Bytes) -> StoreResult<Option<ETag>>;

    /// Start a multipart upload; returns its upload id.
    async fn create_multipart(&self, key: &str) -> StoreResult<String>;

    /// Upload part `part_number` (1-based); returns the part's ETag.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
    ) -> StoreResult<ETag>;

    /// Assemble the parts, in order; returns the object's ETag.
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, ETag)>,
    ) -> StoreResult<Option<ETag>>;

    /// Give up a multipart upload and free its parts.
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()>;

    /// The ids of multipart uploads of exactly `key` begun and neither completed nor
    /// aborted (one page of ListMultipartUploads).
    async fn unfinished_multipart(&self, key: &str) -> StoreResult<Vec<String>>;

    /// Server-side copy of a whole object; returns the new object's ETag.
    async fn copy(&self, from: &str, to: &str) -> StoreResult<Option<ETag>>;

    /// Delete an object; deleting a missing key succeeds.
    async fn delete(&self, key: &str) -> StoreResult<()>;

    /// Delete up to `MAX_DELETE_BATCH` objects in one request (DeleteObjects); returns the
    /// keys the store could not delete. Missing keys count as deleted.
    async fn delete_many(&self, keys: &[String]) -> StoreResult<Vec<String>>;
}

/// Most keys one DeleteObjects request carries.
pub const MAX_DELETE_BATCH: usize = 1000;
