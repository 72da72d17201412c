//! A store that counts every request it passes on, by operation and outcome, and the bytes
//! moved, for the metrics endpoint.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ETag, ListPage, ObjectMeta, ObjectStore, StoreError, StoreResult};
use crate::metrics::StoreMetrics;

pub struct MeteredStore {
    inner: Arc<dyn ObjectStore>,
    metrics: StoreMetrics,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn ObjectStore>, metrics: StoreMetrics) -> Self {
        MeteredStore { inner, metrics }
    }

    fn count<T>(&self, op: &'static str, r: &StoreResult<T>) {
        let outcome = match r {
            Ok(_) => "ok",
            Err(StoreError::NotFound) => "not_found",
            Err(StoreError::PreconditionFailed) => "precondition_failed",
            Err(StoreError::AccessDenied(_) | StoreError::BadCredentials(_)) => "denied",
            Err(StoreError::Unreachable(_)) => "unreachable",
            Err(_) => "error",
        };
        self.metrics.request(op, outcome);
    }
}

#[async_trait]
impl ObjectStore for MeteredStore {
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let r = self.inner.head(key).await;
        self.count("head", &r);
        r
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&ETag>,
    ) -> StoreResult<Bytes> {
        let r = self.inner.get_range(key, range, if_match).await;
        self.count("get", &r);
        if let Ok(b) = &r {
            self.metrics.downloaded(b.len() as u64);
        }
        r
    }

    async fn get_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&ETag>,
        piece: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> StoreResult<u64> {
        let r = self
            .inner
            .get_pieces(key, range, if_match, piece, sink)
            .await;
        self.count("get", &r);
        if let Ok(n) = &r {
            self.metrics.downloaded(*n);
        }
        r
    }

    async fn list(
        &self,
        prefix: &str,
        recursive: bool,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        let r = self.inner.list(prefix, recursive, token, max_keys).await;
        self.count("list", &r);
        r
    }

    async fn put(&self, key: &str, body: Bytes) -> StoreResult<Option<ETag>> {
        let len = body.len() as u64;
        let r = self.inner.put(key, body).await;
        self.count("put", &r);
        if r.is_ok() {
            self.metrics.uploaded(len);
        }
        r
    }

    async fn create_multipart(&self, key: &str) -> StoreResult<String> {
        let r = self.inner.create_multipart(key).await;
        self.count("create_multipart", &r);
        r
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
    ) -> StoreResult<ETag> {
        let len = body.len() as u64;
        let r = self
            .inner
            .upload_part(key, upload_id, part_number, body)
            .await;
        self.count("upload_part", &r);
        if r.is_ok() {
            self.metrics.uploaded(len);
        }
        r
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, ETag)>,
    ) -> StoreResult<Option<ETag>> {
        let r = self.inner.complete_multipart(key, upload_id, parts).await;
        self.count("complete_multipart", &r);
        r
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        let r = self.inner.abort_multipart(key, upload_id).await;
        self.count("abort_multipart", &r);
        r
    }

    async fn unfinished_multipart(&self, key: &str) -> StoreResult<Vec<String>> {
        let r = self.inner.unfinished_multipart(key).await;
        self.count("list_uploads", &r);
        r
    }

    async fn copy(&self, from: &str, to: &str) -> StoreResult<Option<ETag>> {
        let r = self.inner.copy(from, to).await;
        self.count("copy", &r);
        r
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let r = self.inner.delete(key).await;
        self.count("delete", &r);
        r
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<Vec<String>> {
        let r = self.inner.delete_many(keys).await;
        self.count("delete_many", &r);
        r
    }
}
