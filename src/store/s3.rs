//! The object store backed by a real S3 or S3-compatible endpoint, through aws-sdk-s3.
//! Retries with backoff and timeouts come from the SDK's standard retry mode; this module
//! turns the SDK's errors into `StoreError`s that say what went wrong.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::config::interceptors::{
    BeforeSerializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_s3::config::retry::RetryConfig;

use crate::retry::Backoff;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RequestChecksumCalculation,
    ResponseChecksumValidation, RuntimeComponents,
};
use aws_sdk_s3::error::BoxError;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, EncodingType};
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::body_check::{base64, refuses_checksums, BodyCheck, BodyChecks, BodyDigest};

use crate::cache::DIRECT_ALIGN;

use super::{ETag, ListPage, ObjectMeta, ObjectStore, StoreError, StoreResult};

/// Everything needed to talk to one bucket.
#[derive(Clone)]
pub struct StoreConfig {
    pub bucket: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    /// How many times a request is tried in all before its error is returned.
    pub max_attempts: u32,
    pub connect_timeout: Duration,
    /// Limit on one attempt of one request (a whole part upload or ranged GET).
    pub attempt_timeout: Duration,
    /// Where requests and their attempts are counted (retries are the difference).
    pub attempts: AttemptCounts,
    /// Longest a read (one ranged GET, retries included) may take before it fails.
    pub read_deadline: Duration,
}

/// A GET whose answer began but whose body did not arrive whole.
struct BodyError(StoreError);

/// A piece of a GET's body being filled, its first byte on a page boundary, so that the
/// block cache can write it to disk directly (O_DIRECT) with no copy first.
struct Piece {
    buf: Vec<u8>,
    start: usize,
}

impl Piece {
    fn with_capacity(cap: usize) -> Self {
        let mut buf: Vec<u8> = Vec::with_capacity(cap + DIRECT_ALIGN);
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        buf.resize(start, 0);
        Piece { buf, start }
    }

    fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn extend_from_slice(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    fn freeze(self) -> Bytes {
        Bytes::from(self.buf).slice(self.start..)
    }
}

/// Requests sent and attempts made, counted by the SDK's interceptor hooks; every attempt
/// past a request's first is a retry.
#[derive(Clone, Debug, Default)]
pub struct AttemptCounts {
    requests: Arc<AtomicU64>,
    attempts: Arc<AtomicU64>,
    /// Requests sent again by this module (a GET whose body broke off).
    resent: Arc<AtomicU64>,
}

impl AttemptCounts {
    pub fn retries(&self) -> u64 {
        // Requests are counted before their attempts, so this never runs ahead of the truth.
        let requests = self.requests.load(Ordering::Relaxed);
        self.attempts
            .load(Ordering::Relaxed)
            .saturating_sub(requests)
            + self.resent.load(Ordering::Relaxed)
    }

    fn note_retry(&self) {
        self.resent.fetch_add(1, Ordering::Relaxed);
    }
}

impl Intercept for AttemptCounts {
    fn name(&self) -> &'static str {
        "AttemptCounts"
    }

    fn read_before_execution(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret and the session token never appear in logs or panics.
        f.debug_struct("StoreConfig")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

pub struct S3Store {
    client: Client,
    bucket: String,
    endpoint: String,
    max_attempts: u32,
    read_deadline: Duration,
    attempts: AttemptCounts,
    objects: ObjectOptions,
    /// Whether the bodies sent are covered by the request's signature (a SHA-256 of every
    /// byte): over plain HTTP to another host only (`signs_bodies`). Over TLS, which keeps a
    /// body intact on the way, and to this host's loopback, they are sent as
    /// UNSIGNED-PAYLOAD, as the AWS CLI sends them over TLS; the signed checksum (CRC-32 or
    /// Content-MD5, `body_check.rs`) is checked by the store either way.
    sign_bodies: bool,
    /// Which checksums bodies carry, as the store's answers showed (`body_check.rs`).
    body_checks: BodyChecks,
}

/// Sends a request that carries a body, the body covered by the signature only when `$sign`
/// (`S3Store::sign_bodies`).
macro_rules! send_body {
    ($request:expr, $sign:expr) => {{
        let request = $request;
        if $sign {
            request.send().await
        } else {
            request.customize().disable_payload_signing().send().await
        }
    }};
}

/// Whether bodies sent to `endpoint` (None: AWS S3, over TLS) are signed: over plain HTTP to
/// another host. A body to this host's loopback never crosses a network, and one over TLS
/// arrives as sent; the signed checksum guards both.
fn signs_bodies(endpoint: Option<&str>) -> bool {
    let Some(ep) = endpoint.map(|ep| ep.trim().to_ascii_lowercase()) else {
        return false;
    };
    if ep.starts_with("https://") {
        return false;
    }
    // The authority ends at the first of these, as a URL parser ends it.
    let authority = ep
        .trim_start_matches("http://")
        .split(['/', '?', '#', '\\'])
        .next()
        .unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// What every object written gets (storage class, server-side encryption), and what reading
/// it back needs (the customer's key, for SSE-C).
#[derive(Clone, Default, Debug)]
pub struct ObjectOptions {
    /// Default: the bucket's.
    pub storage_class: Option<String>,
    pub encryption: Encryption,
}

#[derive(Clone, Default)]
pub enum Encryption {
    /// The bucket's default.
    #[default]
    Bucket,
    /// SSE-S3: the store's own keys (AES256).
    S3,
    /// SSE-KMS, with this key or the bucket's default KMS key.
    Kms { key_id: Option<String> },
    /// SSE-C: a key of the operator's own, sent with every write and read.
    Customer {
        key_base64: String,
        key_md5_base64: String,
    },
}

impl Encryption {
    /// SSE-C with `key` (32 bytes).
    pub fn customer(key: &[u8; 32]) -> Encryption {
        use md5::{Digest, Md5};
        Encryption::Customer {
            key_base64: base64(key),
            key_md5_base64: base64(&Md5::digest(key)),
        }
    }

    /// Whether the store's ETag of an object written this way is the MD5 of its body:
    /// not with KMS or a customer's key.
    fn etag_is_md5(&self) -> bool {
        matches!(self, Encryption::Bucket | Encryption::S3)
    }

    /// How it reads in `status` and logs; never the key.
    pub fn describe(&self) -> String {
        match self {
            Encryption::Bucket => "the bucket's default".into(),
            Encryption::S3 => "SSE-S3 (AES256)".into(),
            Encryption::Kms { key_id: Some(k) } => format!("SSE-KMS with key {k}"),
            Encryption::Kms { key_id: None } => "SSE-KMS with the bucket's key".into(),
            Encryption::Customer { .. } => "SSE-C (the key from --sse-c-key-file)".into(),
        }
    }
}

impl fmt::Debug for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Adds the SSE-C headers (algorithm, key, key MD5) to a request builder, when the objects
/// are encrypted with the customer's key.
macro_rules! customer_key {
    ($builder:expr, $encryption:expr, $algorithm:ident, $key:ident, $md5:ident) => {{
        let b = $builder;
        match $encryption {
            Encryption::Customer {
                key_base64,
                key_md5_base64,
            } => b.$algorithm("AES256").$key(key_base64).$md5(key_md5_base64),
            _ => b,
        }
    }};
    ($builder:expr, $encryption:expr) => {
        customer_key!(
            $builder,
            $encryption,
            sse_customer_algorithm,
            sse_customer_key,
            sse_customer_key_md5
        )
    };
}

/// Adds the storage class and encryption of new objects to a request builder.
macro_rules! object_options {
    ($builder:expr, $options:expr) => {{
        let o: &ObjectOptions = $options;
        let mut b = $builder;
        if let Some(class) = &o.storage_class {
            b = b.storage_class(aws_sdk_s3::types::StorageClass::from(class.as_str()));
        }
        b = match &o.encryption {
            Encryption::S3 => {
                b.server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::Aes256)
            }
            Encryption::Kms { key_id } => b
                .server_side_encryption(aws_sdk_s3::types::ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(key_id.clone()),
            _ => b,
        };
        customer_key!(b, &o.encryption)
    }};
}

impl S3Store {
    /// The same store, signing bodies as over plain HTTP to another host, though it is
    /// reached on this host's loopback: for tests of what the signature guards.
    #[cfg(any(test, feature = "test-util"))]
    pub fn with_signed_bodies(mut self) -> Self {
        self.sign_bodies = true;
        self
    }

    /// The same store, writing objects with `objects`.
    pub fn with_object_options(mut self, objects: ObjectOptions) -> Self {
        self.objects = objects;
        self
    }

    pub fn new(cfg: &StoreConfig) -> Self {
        let creds = Credentials::new(
            cfg.access_key.clone(),
            cfg.secret_key.clone(),
            cfg.session_token.clone(),
            None,
            "s3mediafs",
        );
        let mut b = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .credentials_provider(creds)
            .force_path_style(cfg.path_style)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(cfg.max_attempts.max(1))
                    .with_initial_backoff(Backoff::REQUEST.first)
                    .with_max_backoff(Backoff::REQUEST.max),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(cfg.connect_timeout)
                    .operation_attempt_timeout(cfg.attempt_timeout)
                    .build(),
            )
            // Many S3-compatible stores reject or mishandle the newer default checksums.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .interceptor(cfg.attempts.clone());
        if let Some(ep) = &cfg.endpoint {
            b = b.endpoint_url(ep.clone());
        }
        S3Store {
            client: Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            endpoint: cfg
                .endpoint
                .clone()
                .unwrap_or_else(|| format!("AWS S3 ({})", cfg.region)),
            max_attempts: cfg.max_attempts.max(1),
            read_deadline: cfg.read_deadline,
            attempts: cfg.attempts.clone(),
            objects: ObjectOptions::default(),
            sign_bodies: signs_bodies(cfg.endpoint.as_deref()),
            body_checks: BodyChecks::new(),
        }
    }

    /// Deletes up to 1000 keys in one request (DeleteObjects); missing keys are not an
    /// error. Returns the keys the store refused to delete.
    /// One GET; a body that broke off or ended short is a `BodyError`, worth another try.
    async fn get_range_once(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&ETag>,
        piece: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> Result<StoreResult<()>, BodyError> {
        let r = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_if_match(if_match.map(|e| e.as_str().to_string()))
            .pipe(|b| customer_key!(b, &self.objects.encryption))
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return Ok(Err(self.map_err("GET", key, e))),
        };
        // Pieces are handed over before the answer is complete, so it must be known first
        // that the answer starts where asked (a store that ignores ranges sends the whole
        // object).
        let answered_from = match r.content_range() {
            Some(cr) => cr
                .strip_prefix("bytes ")
                .and_then(|c| c.split('-').next())
                .and_then(|s| s.trim().parse::<u64>().ok()),
            None => Some(0),
        };
        if answered_from != Some(range.start) {
            return Ok(Err(StoreError::Protocol(format!(
                "GET {key:?}: asked for bytes {}-{}, the store answered {}; it does not seem to support ranged reads",
                range.start,
                range.end - 1,
                r.content_range().unwrap_or("with the whole object")
            ))));
        }
        let expected = r.content_length().map(|l| l.max(0) as u64);
        // The body arrives in chunks of a few KiB; each is copied once, into its piece, and
        // a piece goes to the sink as soon as it is full.
        let total = expected.unwrap_or(range.end - range.start);
        let piece = piece.max(1);
        let mut got = 0u64;
        let mut cur = Piece::with_capacity(piece.min(total) as usize);
        let mut body = r.body;
        while let Some(chunk) = body.next().await {
            let mut chunk = chunk.map_err(|e| {
                BodyError(StoreError::BrokenOff(format!(
                    "GET {key:?}: the body broke off: {e}"
                )))
            })?;
            got += chunk.len() as u64;
            while !chunk.is_empty() {
                let take = (piece as usize - cur.len()).min(chunk.len());
                cur.extend_from_slice(&chunk.split_to(take));
                if cur.len() as u64 == piece {
                    let next = piece.min(total.saturating_sub(got)).max(1);
                    sink(std::mem::replace(&mut cur, Piece::with_capacity(next as usize)).freeze());
                }
            }
        }
        match expected {
            Some(expected) if got != expected => {
                Err(BodyError(StoreError::Truncated { expected, got }))
            }
            _ => {
                if !cur.is_empty() {
                    sink(cur.freeze());
                }
                Ok(Ok(()))
            }
        }
    }

    /// Keys of the multipart uploads begun under `prefix` and neither completed nor aborted
    /// (first page only, up to 1000).
    pub async fn unfinished_uploads(&self, prefix: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .list_uploads(prefix)
            .await?
            .into_iter()
            .map(|(key, _)| key)
            .collect())
    }

    /// (key, upload id) of the multipart uploads begun under `prefix` and neither
    /// completed nor aborted (first page only, up to 1000).
    async fn list_uploads(&self, prefix: &str) -> StoreResult<Vec<(String, String)>> {
        let r = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(prefix)
            .encoding_type(EncodingType::Url)
            .send()
            .await
            .map_err(|e| self.map_err("ListMultipartUploads", prefix, e))?;
        let encoded = r.encoding_type() == Some(&EncodingType::Url);
        Ok(r.uploads()
            .iter()
            .filter_map(|u| Some((listed_key(u.key()?, encoded), u.upload_id()?.to_string())))
            .collect())
    }

    fn map_err<E>(
        &self,
        op: &'static str,
        key: &str,
        err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().unwrap_or_default().to_string();
        let message = err.message().unwrap_or_default().to_string();
        match &err {
            SdkError::DispatchFailure(d) => {
                let detail = d
                    .as_connector_error()
                    .map(|c| source_chain(c))
                    .unwrap_or_else(|| format!("{err:?}"));
                return StoreError::Unreachable(format!("{}: {detail}", self.endpoint));
            }
            SdkError::TimeoutError(_) => {
                return StoreError::Unreachable(format!(
                    "{}: the request timed out",
                    self.endpoint
                ));
            }
            _ => {}
        }
        match (status, code.as_str()) {
            (_, "NoSuchBucket") => StoreError::NoSuchBucket(self.bucket.clone()),
            (_, "NoSuchKey") | (Some(404), _) => StoreError::NotFound,
            (_, "PreconditionFailed") | (Some(412), _) => StoreError::PreconditionFailed,
            (_, "InvalidRange") | (Some(416), _) => StoreError::InvalidRange,
            (
                _,
                "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "InvalidToken" | "ExpiredToken",
            ) => StoreError::BadCredentials(if message.is_empty() { code } else { message }),
            (_, "AuthorizationHeaderMalformed" | "PermanentRedirect") | (Some(301), _) => {
                StoreError::WrongRegion(format!("{code}: {message}"))
            }
            // Some stores answer with another code and say so in words.
            (_, "NotImplemented") | (Some(501), _) => StoreError::NotImplemented {
                op,
                message: match (message.is_empty(), code.is_empty()) {
                    (false, _) => message,
                    (true, false) => code,
                    (true, true) => format!("HTTP {}", status.unwrap_or(501)),
                },
            },
            _ if message.to_ascii_lowercase().contains("not implemented") => {
                StoreError::NotImplemented { op, message }
            }
            // Some stores (Garage) answer a bad signature or an unknown key with a bare 403.
            (Some(403), _)
                if message.to_ascii_lowercase().contains("signature")
                    || message.to_ascii_lowercase().contains("no such key") =>
            {
                StoreError::BadCredentials(message)
            }
            (Some(403), _) => StoreError::AccessDenied(if message.is_empty() {
                format!("{op} {key:?} was refused")
            } else {
                message
            }),
            _ if code.is_empty() && message.is_empty() => StoreError::Service(format!(
                "{op} {key:?} failed: {}{}",
                status.map(|s| format!("HTTP {s}: ")).unwrap_or_default(),
                aws_sdk_s3::error::DisplayErrorContext(&err)
            )),
            _ => StoreError::Service(format!(
                "{op} {key:?} failed: {}{}{}",
                status.map(|s| format!("HTTP {s} ")).unwrap_or_default(),
                code,
                if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                }
            )),
        }
    }
}

/// Calls a function on a request builder in the middle of a chain.
trait Pipe: Sized {
    fn pipe(self, f: impl FnOnce(Self) -> Self) -> Self {
        f(self)
    }
}

impl<T> Pipe for T {}

/// An error answer in a few words: its status, code and message.
fn describe<E: ProvideErrorMetadata>(
    err: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> String {
    let status = err.raw_response().map(|r| r.status().as_u16());
    format!(
        "HTTP {} {}: {}",
        status.map(|s| s.to_string()).unwrap_or_default(),
        err.code().unwrap_or_default(),
        err.message().unwrap_or_default()
    )
}

impl S3Store {
    /// Whether the store refused a request the way a store does that does not take its
    /// checksum header.
    fn refuses_checksums<E: ProvideErrorMetadata>(
        &self,
        err: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> bool {
        let status = err.raw_response().map(|r| r.status().as_u16());
        refuses_checksums(status, err.code())
    }

    /// Whether the ETag of an object just written is the MD5 of its body: not for one
    /// encrypted with KMS or a customer's key, asked for here or by the bucket's default
    /// encryption (the answer says which).
    fn etag_is_md5(
        &self,
        encrypted_with: Option<&aws_sdk_s3::types::ServerSideEncryption>,
        customer_algorithm: Option<&str>,
    ) -> bool {
        let kms = encrypted_with.is_some_and(|e| e.as_str().starts_with("aws:kms"));
        self.objects.encryption.etag_is_md5() && !kms && customer_algorithm.is_none()
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_str = s.to_string();
        if !out.contains(&s_str) {
            out.push_str(": ");
            out.push_str(&s_str);
        }
        cur = s.source();
    }
    out
}

fn to_system_time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Percent-encodes a key for the `x-amz-copy-source` header, keeping `/`.
fn encode_copy_source(bucket: &str, key: &str) -> String {
    let mut out = String::with_capacity(bucket.len() + key.len() + 8);
    out.push_str(bucket);
    out.push('/');
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let r = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .pipe(|b| customer_key!(b, &self.objects.encryption))
            .send()
            .await
            .map_err(|e| self.map_err("HEAD", key, e))?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: r.content_length().unwrap_or(0).max(0) as u64,
            etag: r.e_tag().map(ETag::new),
            last_modified: to_system_time(r.last_modified()),
        })
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&ETag>,
    ) -> StoreResult<Bytes> {
        let len = range.end.saturating_sub(range.start);
        let mut pieces = Vec::with_capacity(1);
        self.get_pieces(key, range, if_match, len, &mut |p| pieces.push(p))
            .await?;
        Ok(match pieces.len() {
            0 => Bytes::new(),
            1 => pieces.pop().expect("one piece"),
            // A store that ignored the range and sent more.
            _ => Bytes::from(pieces.concat()),
        })
    }

    async fn get_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&ETag>,
        piece: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> StoreResult<u64> {
        if range.end <= range.start {
            return Ok(0);
        }
        // The SDK retries a request until its answer starts; a body that breaks off or ends
        // short is fetched again here from the first piece not yet handed over, with
        // jittered backoff, all within the read deadline.
        let deadline = tokio::time::Instant::now() + self.read_deadline;
        let mut attempt = 1;
        let mut handed = 0u64;
        loop {
            let from = range.start + handed;
            if from >= range.end {
                // Everything came; only the end of the answer broke off.
                return Ok(handed);
            }
            let mut counted = |b: Bytes| {
                handed += b.len() as u64;
                sink(b)
            };
            let once = self.get_range_once(key, from..range.end, if_match, piece, &mut counted);
            let result = match tokio::time::timeout_at(deadline, once).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(StoreError::Unreachable(format!(
                        "GET {key:?} got no complete answer within {} s",
                        self.read_deadline.as_secs()
                    )))
                }
            };
            match result {
                Err(BodyError(e)) if attempt < self.max_attempts => {
                    tracing::debug!(key, attempt, handed, error = %e, "the body of a GET broke off; fetching the rest again");
                    self.attempts.note_retry();
                    let pause = Backoff::BODY.delay(attempt);
                    if tokio::time::Instant::now() + pause >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(BodyError(e)) => return Err(e),
                Ok(r) => return r.map(|()| handed),
            }
        }
    }

    async fn list(
        &self,
        prefix: &str,
        recursive: bool,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        let mut req = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            // Keys come URL-encoded: a key with a character XML cannot carry (a control
            // character another tool stored) would otherwise make the whole page unreadable.
            .encoding_type(EncodingType::Url)
            .set_continuation_token(token)
            .set_max_keys(max_keys);
        if !recursive {
            req = req.delimiter("/");
        }
        let r = req
            .send()
            .await
            .map_err(|e| self.map_err("LIST", prefix, e))?;
        let encoded = r.encoding_type() == Some(&EncodingType::Url);
        let objects = r
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ObjectMeta {
                    key: listed_key(o.key()?, encoded),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().map(ETag::new),
                    last_modified: to_system_time(o.last_modified()),
                })
            })
            .collect();
        let prefixes = r
            .common_prefixes()
            .iter()
            .filter_map(|p| Some(listed_key(p.prefix()?, encoded)))
            .collect();
        let next_token = if r.is_truncated().unwrap_or(false) {
            r.next_continuation_token().map(str::to_string)
        } else {
            None
        };
        Ok(ListPage {
            objects,
            prefixes,
            next_token,
        })
    }

    async fn put(&self, key: &str, body: Bytes) -> StoreResult<Option<ETag>> {
        let len = body.len() as i64;
        let send = |check: &BodyCheck| {
            let r = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_length(len)
                .set_checksum_crc32(check.crc32.clone())
                .set_content_md5(check.md5.as_ref().map(BodyDigest::header))
                .body(ByteStream::from(body.clone()))
                .pipe(|b| object_options!(b, &self.objects));
            async move { send_body!(r, self.sign_bodies) }
        };
        let mut check = self.body_checks.for_put(&body).await?;
        let r = match send(&check).await {
            Err(e) if check.crc32.is_some() && self.refuses_checksums(&e) => {
                self.body_checks.refused(&describe(&e));
                check = self.body_checks.for_put(&body).await?;
                send(&check).await
            }
            r => r,
        }
        .map_err(|e| self.map_err("PUT", key, e))?;
        self.body_checks.confirm(
            &check,
            "PUT",
            key,
            r.checksum_crc32(),
            r.e_tag(),
            self.etag_is_md5(r.server_side_encryption(), r.sse_customer_algorithm()),
        )?;
        Ok(r.e_tag().map(ETag::new))
    }

    async fn create_multipart(&self, key: &str) -> StoreResult<String> {
        let send = |crc32: bool| {
            self.client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .set_checksum_algorithm(crc32.then_some(ChecksumAlgorithm::Crc32))
                .pipe(|b| object_options!(b, &self.objects))
                .send()
        };
        let mut crc32 = self.body_checks.declares_crc32();
        let r = match send(crc32).await {
            Err(e) if crc32 && self.refuses_checksums(&e) => {
                self.body_checks.refused(&describe(&e));
                crc32 = false;
                send(crc32).await
            }
            r => r,
        }
        .map_err(|e| self.map_err("CreateMultipartUpload", key, e))?;
        let id = r
            .upload_id()
            .map(str::to_string)
            .ok_or_else(|| StoreError::Protocol("the store returned no upload id".into()))?;
        if crc32 {
            self.body_checks.begun_with_crc32(&id);
        }
        Ok(id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
    ) -> StoreResult<ETag> {
        let len = body.len() as i64;
        let check = self.body_checks.for_part(upload_id, &body).await?;
        let r = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(part_number)
            .content_length(len)
            .set_checksum_crc32(check.crc32.clone())
            .set_content_md5(check.md5.as_ref().map(BodyDigest::header))
            .body(ByteStream::from(body))
            .pipe(|b| customer_key!(b, &self.objects.encryption));
        let r = send_body!(r, self.sign_bodies).map_err(|e| {
            // The upload fails, and is made again without checksums.
            if check.crc32.is_some() && self.refuses_checksums(&e) {
                self.body_checks.refused(&describe(&e));
            }
            self.map_err("UploadPart", key, e)
        })?;
        self.body_checks.confirm(
            &check,
            "UploadPart",
            key,
            r.checksum_crc32(),
            r.e_tag(),
            self.etag_is_md5(r.server_side_encryption(), r.sse_customer_algorithm()),
        )?;
        self.body_checks.part_taken(upload_id, part_number, &check);
        r.e_tag()
            .map(ETag::new)
            .ok_or_else(|| StoreError::Protocol("the store returned no part ETag".into()))
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, ETag)>,
    ) -> StoreResult<Option<ETag>> {
        let crc32s = self.body_checks.parts_of(upload_id);
        let parts = parts
            .into_iter()
            .map(|(n, etag)| {
                CompletedPart::builder()
                    .part_number(n)
                    .e_tag(etag.as_str())
                    .set_checksum_crc32(crc32s.as_ref().and_then(|c| c.get(&n).cloned()))
                    .build()
            })
            .collect();
        let r = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            // With checksums, the store checks them against the object's parts, which it
            // decrypts with the customer's key.
            .pipe(|b| match crc32s.is_some() {
                true => customer_key!(b, &self.objects.encryption),
                false => b,
            })
            .send()
            .await;
        // Whatever the answer, the upload is not completed again under this id: it is
        // found assembled, or aborted and made again.
        self.body_checks.forget(upload_id);
        let r = r.map_err(|e| {
            if crc32s.is_some() && self.refuses_checksums(&e) {
                self.body_checks.refused(&describe(&e));
            }
            self.map_err("CompleteMultipartUpload", key, e)
        })?;
        Ok(r.e_tag().map(ETag::new))
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        let r = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
        self.body_checks.forget(upload_id);
        r.map_err(|e| self.map_err("AbortMultipartUpload", key, e))?;
        Ok(())
    }

    async fn unfinished_multipart(&self, key: &str) -> StoreResult<Vec<String>> {
        Ok(self
            .list_uploads(key)
            .await?
            .into_iter()
            .filter(|(k, _)| k == key)
            .map(|(_, id)| id)
            .collect())
    }

    async fn copy(&self, from: &str, to: &str) -> StoreResult<Option<ETag>> {
        let r = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(to)
            .copy_source(encode_copy_source(&self.bucket, from))
            .pipe(|b| object_options!(b, &self.objects))
            .pipe(|b| {
                customer_key!(
                    b,
                    &self.objects.encryption,
                    copy_source_sse_customer_algorithm,
                    copy_source_sse_customer_key,
                    copy_source_sse_customer_key_md5
                )
            })
            .send()
            .await
            .map_err(|e| self.map_err("COPY", from, e))?;
        Ok(r.copy_object_result()
            .and_then(|c| c.e_tag())
            .map(ETag::new))
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.map_err("DELETE", key, e) {
                StoreError::NotFound => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<Vec<String>> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let objects = keys
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Protocol(format!("DeleteObjects could not be built: {e}")))?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| StoreError::Protocol(format!("DeleteObjects could not be built: {e}")))?;
        let r = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| {
                // A request refused for its form (`MalformedXML`, a checksum header the store
                // does not take) would be refused again: the keys must go one by one. Other
                // 400s (`RequestTimeout`, a body damaged on the way) pass.
                let malformed = e.raw_response().is_some_and(|r| r.status().as_u16() == 400)
                    && matches!(
                        e.code(),
                        Some(
                            "MalformedXML"
                                | "InvalidRequest"
                                | "InvalidArgument"
                                | "InvalidDigest"
                                | "MissingContentMD5"
                        )
                    );
                match self.map_err("DeleteObjects", &keys[0], e) {
                    StoreError::Service(message) if malformed => StoreError::NotImplemented {
                        op: "DeleteObjects",
                        message,
                    },
                    other => other,
                }
            })?;
        // A refusal that names no key leaves every key of the batch in doubt.
        if r.errors().iter().any(|e| e.key().is_none()) {
            return Ok(keys.to_vec());
        }
        Ok(r.errors()
            .iter()
            .filter_map(|e| e.key().map(str::to_string))
            .collect())
    }
}

/// A key as a listing gave it: decoded only when the store says it encoded it (one that
/// ignores `encoding-type=url` sends keys as they are, `%` and `+` included). One that does
/// not decode to UTF-8 is kept as it came, so a directory holding it is never taken for
/// empty.
fn listed_key(s: &str, encoded: bool) -> String {
    match encoded.then(|| url_decoded(s)).flatten() {
        Some(key) => key,
        None => {
            if encoded {
                tracing::warn!(
                    key = s,
                    "a listed key does not decode to UTF-8; it is shown as listed"
                );
            }
            s.to_string()
        }
    }
}

/// A key as a listing with `encoding-type=url` gives it: `%XX` escapes and `+` for a space.
/// None for one that does not decode to UTF-8.
fn url_decoded(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_keys_are_url_decoded() {
        for (listed, key) in [
            ("media%2Fa%01b", Some("media/a\u{1}b")),
            ("a+b%2Bc", Some("a b+c")),
            ("%C3%A9t%C3%A9", Some("été")),
            ("plain/key", Some("plain/key")),
            ("bad%2", None),
            ("bad%zz", None),
            ("bad%+1", None),
            ("%FF", None),
        ] {
            assert_eq!(url_decoded(listed).as_deref(), key, "{listed}");
        }
        // A store that did not encode: as it came.
        assert_eq!(listed_key("a+b%41", false), "a+b%41");
        assert_eq!(listed_key("a+b%41", true), "a bA");
        assert_eq!(listed_key("%FF", true), "%FF");
    }

    #[test]
    fn bodies_are_signed_over_plain_http_to_another_host_only() {
        for (endpoint, signed) in [
            (None, false),
            (Some("https://s3.eu-central-003.backblazeb2.com"), false),
            (Some("HTTPS://minio.example"), false),
            (Some("http://minio.example:9000"), true),
            (Some("http://10.0.0.7:3900/"), true),
            (Some("http://[fd00::7]:3900"), true),
            (Some("http://127.0.0.1:3900"), false),
            (Some("http://127.0.1.1"), false),
            (Some("http://localhost:9000/"), false),
            (Some("http://[::1]:3900"), false),
            (Some("http://user@127.0.0.1:3900"), false),
            (Some("http://localhost.example.com:9000"), true),
            (Some("http://127.evil.example"), true),
            (Some("http://127.0.0.1:3900@store.example"), true),
            (Some("http://store.example#@127.0.0.1"), true),
            (Some("http://store.example?@127.0.0.1"), true),
            (Some("http://store.example\\@127.0.0.1"), true),
            (Some("http://store.example/@127.0.0.1"), true),
        ] {
            assert_eq!(signs_bodies(endpoint), signed, "{endpoint:?}");
        }
    }

    #[test]
    fn copy_source_keeps_slashes_and_escapes_the_rest() {
        assert_eq!(
            encode_copy_source("b", "remote_content/[::1]:8448/a b+%"),
            "b/remote_content/%5B%3A%3A1%5D%3A8448/a%20b%2B%25"
        );
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let cfg = StoreConfig {
            bucket: "b".into(),
            endpoint: None,
            region: "r".into(),
            path_style: true,
            access_key: "AKIDEXAMPLE".into(),
            secret_key: "very-secret-value".into(),
            session_token: Some("token-value".into()),
            max_attempts: 3,
            connect_timeout: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(1),
            attempts: AttemptCounts::default(),
            read_deadline: Duration::from_secs(1),
        };
        let s = format!("{cfg:?}");
        assert!(
            !s.contains("very-secret-value") && !s.contains("token-value"),
            "{s}"
        );
    }
}
