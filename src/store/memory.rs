//! An object store that keeps everything in memory, with the same listing and error
//! semantics as S3. Used by unit and model tests of the filesystem layer.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::{ETag, ListPage, ObjectMeta, ObjectStore, StoreError, StoreResult};

#[derive(Clone)]
struct Object {
    data: Bytes,
    etag: ETag,
    modified: SystemTime,
}

#[derive(Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Object>>,
    uploads: Mutex<HashMap<String, BTreeMap<i32, Bytes>>>,
    next_etag: AtomicU64,
    /// See `hold_pieces_after_the_first`.
    piece_gate: Mutex<Option<Arc<Semaphore>>>,
    /// See `hold_heads`.
    head_gate: Mutex<Option<Arc<Semaphore>>>,
    /// See `hold_lists`.
    list_gate: Mutex<Option<Arc<Semaphore>>>,
    /// See `list_strays`.
    strays: Mutex<Vec<String>>,
    /// See `set_unreachable`.
    unreachable: std::sync::atomic::AtomicBool,
    /// See `refuse_batch_deletes`.
    no_batch_deletes: std::sync::atomic::AtomicBool,
    /// LIST requests answered.
    lists: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// While `down`, every request fails as if the endpoint did not answer.
    pub fn set_unreachable(&self, down: bool) {
        self.unreachable.store(down, Ordering::SeqCst);
    }

    /// From now on, DeleteObjects is answered as a store that does not implement it answers.
    pub fn refuse_batch_deletes(&self) {
        self.no_batch_deletes.store(true, Ordering::SeqCst);
    }

    fn answer(&self) -> StoreResult<()> {
        if self.unreachable.load(Ordering::SeqCst) {
            return Err(StoreError::Unreachable(
                "the in-memory store is set unreachable".into(),
            ));
        }
        Ok(())
    }

    /// LIST requests answered so far.
    pub fn lists(&self) -> u64 {
        self.lists.load(Ordering::SeqCst)
    }

    /// All keys currently stored, in order.
    pub fn keys(&self) -> Vec<String> {
        self.objects.lock().keys().cloned().collect()
    }

    /// The bytes of one object, if present.
    pub fn object(&self, key: &str) -> Option<Bytes> {
        self.objects.lock().get(key).map(|o| o.data.clone())
    }

    /// From now on, a GET of several pieces hands over its first piece and then waits for
    /// a permit of the returned semaphore before the rest, as a slow answer would: tests
    /// see what readers get meanwhile.
    pub fn hold_pieces_after_the_first(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.piece_gate.lock() = Some(gate.clone());
        gate
    }

    /// From now on, each HEAD waits for a permit of the returned semaphore before it
    /// answers, as a slow store would: tests see what happens meanwhile.
    pub fn hold_heads(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.head_gate.lock() = Some(gate.clone());
        gate
    }

    /// From now on, each LIST takes its answer, then waits for a permit of the returned
    /// semaphore before it hands it over, as a slow answer would: changes made meanwhile
    /// are missing from it.
    pub fn hold_lists(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.list_gate.lock() = Some(gate.clone());
        gate
    }

    /// From now on, every LIST page also carries `keys` as objects and as prefixes, wherever
    /// they sort and whatever prefix was asked for, as a broken or hostile store would.
    pub fn list_strays(&self, keys: &[&str]) {
        *self.strays.lock() = keys.iter().map(|k| k.to_string()).collect();
    }

    /// The page a LIST asks for, as the store holds its keys now.
    fn list_now(
        &self,
        prefix: &str,
        recursive: bool,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> ListPage {
        use std::ops::Bound;
        let max = max_keys.unwrap_or(1000).clamp(1, 1000) as usize;
        let objects = self.objects.lock();
        let mut page = ListPage::default();
        // The token is the last entry returned: an object key, or a common prefix whose
        // keys must all be skipped.
        let lower = match &token {
            Some(t) => Bound::Excluded(t.clone()),
            None => Bound::Included(prefix.to_string()),
        };
        let mut skip_prefix: Option<String> = token.filter(|t| t.ends_with('/'));
        let mut last = None;
        for (key, o) in objects.range((lower, Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            if skip_prefix.as_deref().is_some_and(|p| key.starts_with(p)) {
                continue;
            }
            if page.objects.len() + page.prefixes.len() == max {
                page.next_token = last;
                break;
            }
            let rest = &key[prefix.len()..];
            match rest.find('/') {
                Some(i) if !recursive => {
                    let p = format!("{}{}", prefix, &rest[..=i]);
                    page.prefixes.push(p.clone());
                    skip_prefix = Some(p.clone());
                    last = Some(p);
                }
                _ => {
                    page.objects.push(Self::meta(key, o));
                    last = Some(key.clone());
                }
            }
        }
        for stray in self.strays.lock().iter() {
            page.objects.insert(
                0,
                ObjectMeta {
                    key: stray.clone(),
                    size: 1,
                    etag: None,
                    last_modified: SystemTime::UNIX_EPOCH,
                },
            );
            page.prefixes.push(stray.clone());
        }
        page
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn open_uploads(&self) -> usize {
        self.uploads.lock().len()
    }

    fn store(&self, key: &str, data: Bytes) -> ETag {
        let etag = ETag::new(format!(
            "\"m{}\"",
            self.next_etag.fetch_add(1, Ordering::Relaxed)
        ));
        let object = Object {
            data,
            etag: etag.clone(),
            modified: SystemTime::now(),
        };
        self.objects.lock().insert(key.to_string(), object);
        etag
    }

    fn meta(key: &str, o: &Object) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size: o.data.len() as u64,
            etag: Some(o.etag.clone()),
            last_modified: o.modified,
        }
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let gate = self.head_gate.lock().clone();
        if let Some(gate) = gate {
            gate.acquire().await.expect("never closed").forget();
        }
        self.answer()?;
        let objects = self.objects.lock();
        objects
            .get(key)
            .map(|o| Self::meta(key, o))
            .ok_or(StoreError::NotFound)
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&ETag>,
    ) -> StoreResult<Bytes> {
        self.answer()?;
        let objects = self.objects.lock();
        let o = objects.get(key).ok_or(StoreError::NotFound)?;
        if if_match.is_some_and(|etag| *etag != o.etag) {
            return Err(StoreError::PreconditionFailed);
        }
        let len = o.data.len() as u64;
        if range.start >= len && len > 0 {
            return Err(StoreError::InvalidRange);
        }
        let end = range.end.min(len);
        Ok(o.data.slice(range.start.min(end) as usize..end as usize))
    }

    async fn get_pieces(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&ETag>,
        piece: u64,
        sink: &mut (dyn FnMut(Bytes) + Send),
    ) -> StoreResult<u64> {
        self.answer()?;
        let data = self.get_range(key, range, if_match).await?;
        let gate = self.piece_gate.lock().clone();
        for (i, chunk) in data.chunks(piece.max(1) as usize).enumerate() {
            if let Some(gate) = gate.as_ref().filter(|_| i == 1) {
                gate.acquire()
                    .await
                    .map_err(|_| StoreError::ShuttingDown)?
                    .forget();
            }
            sink(Bytes::copy_from_slice(chunk));
        }
        Ok(data.len() as u64)
    }

    async fn list(
        &self,
        prefix: &str,
        recursive: bool,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        self.answer()?;
        self.lists.fetch_add(1, Ordering::SeqCst);
        let page = self.list_now(prefix, recursive, token, max_keys);
        let gate = self.list_gate.lock().clone();
        if let Some(gate) = gate {
            gate.acquire().await.expect("never closed").forget();
        }
        Ok(page)
    }

    async fn put(&self, key: &str, body: Bytes) -> StoreResult<Option<ETag>> {
        self.answer()?;
        Ok(Some(self.store(key, body)))
    }

    async fn create_multipart(&self, key: &str) -> StoreResult<String> {
        self.answer()?;
        let id = format!("{key}#{}", self.next_etag.fetch_add(1, Ordering::Relaxed));
        self.uploads.lock().insert(id.clone(), BTreeMap::new());
        Ok(id)
    }

    async fn upload_part(
        &self,
        _key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
    ) -> StoreResult<ETag> {
        self.answer()?;
        let mut uploads = self.uploads.lock();
        let parts = uploads.get_mut(upload_id).ok_or(StoreError::NotFound)?;
        parts.insert(part_number, body);
        Ok(ETag::new(format!("\"p{part_number}\"")))
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<(i32, ETag)>,
    ) -> StoreResult<Option<ETag>> {
        self.answer()?;
        let stored = self
            .uploads
            .lock()
            .remove(upload_id)
            .ok_or(StoreError::NotFound)?;
        let mut data = BytesMut::new();
        for (n, _) in parts {
            let part = stored
                .get(&n)
                .ok_or_else(|| StoreError::Protocol(format!("part {n} was never uploaded")))?;
            data.extend_from_slice(part);
        }
        Ok(Some(self.store(key, data.freeze())))
    }

    async fn abort_multipart(&self, _key: &str, upload_id: &str) -> StoreResult<()> {
        self.answer()?;
        self.uploads.lock().remove(upload_id);
        Ok(())
    }

    async fn unfinished_multipart(&self, key: &str) -> StoreResult<Vec<String>> {
        self.answer()?;
        // Upload ids here are `<key>#<n>`.
        Ok(self
            .uploads
            .lock()
            .keys()
            .filter(|id| id.rsplit_once('#').is_some_and(|(k, _)| k == key))
            .cloned()
            .collect())
    }

    async fn copy(&self, from: &str, to: &str) -> StoreResult<Option<ETag>> {
        self.answer()?;
        let data = self
            .objects
            .lock()
            .get(from)
            .map(|o| o.data.clone())
            .ok_or(StoreError::NotFound)?;
        Ok(Some(self.store(to, data)))
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.answer()?;
        self.objects.lock().remove(key);
        Ok(())
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<Vec<String>> {
        self.answer()?;
        if self.no_batch_deletes.load(Ordering::SeqCst) {
            return Err(StoreError::NotImplemented {
                op: "DeleteObjects",
                message: "the in-memory store is set to refuse batch deletes".into(),
            });
        }
        let mut objects = self.objects.lock();
        for key in keys {
            objects.remove(key);
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn delimited_listing_pages_through_files_and_prefixes() {
        let s = MemoryStore::new();
        block_on(async {
            for k in ["p/a", "p/b/1", "p/b/2", "p/c", "p/d/x", "q/z"] {
                s.put(k, Bytes::from_static(b"x")).await.unwrap();
            }
            let mut names = Vec::new();
            let mut token = None;
            loop {
                let page = s.list("p/", false, token, Some(2)).await.unwrap();
                names.extend(page.objects.iter().map(|o| o.key.clone()));
                names.extend(page.prefixes.iter().cloned());
                token = page.next_token;
                if token.is_none() {
                    break;
                }
            }
            names.sort();
            assert_eq!(names, ["p/a", "p/b/", "p/c", "p/d/"]);
        });
    }
}
