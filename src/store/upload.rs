//! Uploading a local file as one object: a single PUT when it fits in one part, otherwise a
//! multipart upload with a few parts in flight. A failed multipart upload is aborted so no
//! orphaned parts are left to bill.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::{ETag, ObjectStore, StoreError, StoreResult};
use crate::retry::Backoff;

/// S3 allows at most this many parts in one upload.
pub const MAX_PARTS: u64 = 10_000;

/// S3 stores objects of at most 5 TiB.
pub const MAX_OBJECT_SIZE: u64 = 5 << 40;

/// The part size for an object of `size` bytes: `base`, grown in whole MiB so that the
/// object fits in `MAX_PARTS` parts.
pub fn part_size_for(size: u64, base: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let needed = size.div_ceil(MAX_PARTS);
    base.max(needed.div_ceil(MIB) * MIB)
}

/// How uploads are cut into parts, and the memory the bodies in flight may take together.
#[derive(Clone)]
pub struct UploadLimits {
    /// Smallest part size; larger objects get larger parts (`part_size_for`).
    pub part_size: u64,
    /// Parts of one upload sent at once.
    pub parts_in_flight: usize,
    /// Bytes of bodies read and not yet sent, in KiB, shared by every upload: each waits
    /// for room before it reads (one body larger than the whole still goes, alone).
    memory: Arc<Semaphore>,
    memory_kib: u32,
}

impl UploadLimits {
    pub fn new(part_size: u64, parts_in_flight: usize, memory: u64) -> Self {
        let memory_kib = (memory >> 10).clamp(1, u32::MAX as u64) as u32;
        UploadLimits {
            part_size,
            parts_in_flight,
            memory: Arc::new(Semaphore::new(memory_kib as usize)),
            memory_kib,
        }
    }

    /// Room for a body of `len` bytes, held until it is sent.
    async fn room_for(&self, len: usize) -> OwnedSemaphorePermit {
        let kib = (len as u64)
            .div_ceil(1 << 10)
            .clamp(1, self.memory_kib as u64) as u32;
        self.memory
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("never closed")
    }
}

/// Bytes `offset..offset + len` of `file`, with their CRC-32, once `limits` has room for
/// them; the permit goes with the body until it is sent.
async fn read_part(
    file: Arc<File>,
    offset: u64,
    len: usize,
    limits: &UploadLimits,
) -> StoreResult<(Bytes, crc32fast::Hasher, OwnedSemaphorePermit)> {
    let room = limits.room_for(len).await;
    let (body, crc) = tokio::task::spawn_blocking(move || {
        let buf = crate::cache::read_at_most(&file, offset, len)?;
        if buf.len() < len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{} bytes where {len} were sealed", buf.len()),
            ));
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&buf);
        Ok((Bytes::from(buf), crc))
    })
    .await
    .map_err(|e| StoreError::Local(format!("reading the staged file failed: {e}")))?
    .map_err(|e| StoreError::Local(format!("reading the staged file failed: {e}")))?;
    Ok((body, crc, room))
}

/// The bytes read for upload are the ones sealed: a copy damaged on disk while it waited,
/// or during its upload, is not sent.
fn check_content(expected: Option<u32>, read: crc32fast::Hasher) -> StoreResult<()> {
    let found = read.finalize();
    match expected {
        Some(expected) if expected != found => Err(StoreError::SourceChanged { expected, found }),
        _ => Ok(()),
    }
}

/// Multipart uploads begun and not yet completed or aborted, by upload id: what an unmount
/// that stops waiting aborts, so no parts are left on the server to bill.
/// Once closed (`abort_all`), no multipart upload begins, and one begun meanwhile is aborted
/// at once.
#[derive(Default)]
pub struct OpenUploads {
    open: parking_lot::Mutex<std::collections::HashMap<String, String>>,
    closed: std::sync::atomic::AtomicBool,
}

impl OpenUploads {
    fn closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Aborts every multipart upload still open, each within `timeout`, and lets no other
    /// begin; returns how many were aborted.
    pub async fn abort_all(&self, store: &Arc<dyn ObjectStore>, timeout: Duration) -> usize {
        let open: Vec<(String, String)> = {
            let mut open = self.open.lock();
            self.closed
                .store(true, std::sync::atomic::Ordering::Release);
            open.drain().collect()
        };
        // All at once, within one `timeout`: with the store down, an unmount told to stop
        // waiting must not wait for each in turn.
        let count = open.len();
        let mut aborts = JoinSet::new();
        for (id, key) in open {
            let store = store.clone();
            aborts.spawn(async move {
                match tokio::time::timeout(timeout, store.abort_multipart(&key, &id)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(key, error = %e, "could not abort an unfinished multipart upload")
                    }
                    Err(_) => {
                        tracing::warn!(key, "aborting an unfinished multipart upload timed out")
                    }
                }
            });
        }
        while aborts.join_next().await.is_some() {}
        count
    }
}

/// Uploads the first `size` bytes of `file` as `key`; returns the new ETag. With `crc`,
/// the bytes read must have that CRC-32, or nothing is stored (`SourceChanged`). A
/// multipart upload is in `open` from its creation until it is completed or aborted.
pub async fn upload_file(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    file: Arc<File>,
    (size, crc): (u64, Option<u32>),
    limits: &UploadLimits,
    open: &OpenUploads,
) -> StoreResult<Option<ETag>> {
    let part_size = part_size_for(size, limits.part_size);
    if size <= part_size {
        let (body, read, _room) = read_part(file, 0, size as usize, limits).await?;
        check_content(crc, read)?;
        return store.put(key, body).await;
    }
    if open.closed() {
        return Err(StoreError::ShuttingDown);
    }
    let upload_id = store.create_multipart(key).await?;
    {
        let mut registered = open.open.lock();
        if open.closed() {
            drop(registered);
            let _ = store.abort_multipart(key, &upload_id).await;
            return Err(StoreError::ShuttingDown);
        }
        registered.insert(upload_id.clone(), key.to_string());
    }
    let result =
        upload_multipart(store, key, &upload_id, file, (size, crc), part_size, limits).await;
    open.open.lock().remove(&upload_id);
    result
}

async fn upload_multipart(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    upload_id: &str,
    file: Arc<File>,
    (size, crc): (u64, Option<u32>),
    part_size: u64,
    limits: &UploadLimits,
) -> StoreResult<Option<ETag>> {
    let result = upload_parts(store, key, upload_id, file, size, part_size, limits)
        .await
        .and_then(|(parts, read)| check_content(crc, read).map(|_| parts));
    match result {
        Ok(parts) => {
            let expected = multipart_etag(&parts);
            match store.complete_multipart(key, upload_id, parts).await {
                Ok(etag) => Ok(etag),
                Err(e) => {
                    // Some servers complete the upload but answer in a form the client cannot
                    // read: the object itself says whether it is the one just assembled.
                    if let (Some(expected), Ok(meta)) = (expected, store.head(key).await) {
                        if meta.size == size && meta.etag.as_ref() == Some(&expected) {
                            tracing::debug!(key, error = %e, "the upload completed though its answer could not be read");
                            return Ok(meta.etag);
                        }
                    }
                    let _ = store.abort_multipart(key, upload_id).await;
                    Err(e)
                }
            }
        }
        Err(e) => {
            if let Err(abort) = store.abort_multipart(key, upload_id).await {
                tracing::warn!(key, error = %abort, "could not abort a failed multipart upload");
            }
            Err(e)
        }
    }
}

/// The ETag S3 gives an object assembled from parts with these ETags: the MD5 of the
/// parts' MD5s, then `-` and the number of parts. None when a part ETag is not an MD5.
fn multipart_etag(parts: &[(i32, ETag)]) -> Option<ETag> {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    for (_, etag) in parts {
        let hex = etag.md5_hex()?;
        for i in (0..32).step_by(2) {
            h.update([u8::from_str_radix(&hex[i..i + 2], 16).ok()?]);
        }
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Some(ETag::new(format!("{hex}-{}", parts.len())))
}

async fn upload_parts(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    upload_id: &str,
    file: Arc<File>,
    size: u64,
    part_size: u64,
    limits: &UploadLimits,
) -> StoreResult<(Vec<(i32, ETag)>, crc32fast::Hasher)> {
    let count = size.div_ceil(part_size);
    let mut parts = Vec::with_capacity(count as usize);
    let mut tasks = JoinSet::new();
    let mut next = 0u64;
    loop {
        while next < count && tasks.len() < limits.parts_in_flight.max(1) {
            let offset = next * part_size;
            let len = part_size.min(size - offset) as usize;
            let number = next as i32 + 1;
            let (store, key, id, file, limits) = (
                store.clone(),
                key.to_string(),
                upload_id.to_string(),
                file.clone(),
                limits.clone(),
            );
            tasks.spawn(async move {
                let (body, read, _room) = read_part(file, offset, len, &limits).await?;
                // A part the store refused for what it received (a body damaged on the way)
                // is sent again by itself, rather than the whole upload.
                let mut attempt = 1;
                loop {
                    match store.upload_part(&key, &id, number, body.clone()).await {
                        Ok(etag) => return Ok::<_, StoreError>((number, etag, read)),
                        Err(e) if e.part_worth_resending() && Backoff::PART.tries_again(attempt) => {
                            tracing::debug!(key, part = number, error = %e, "sending the part again");
                            tokio::time::sleep(Backoff::PART.delay(attempt)).await;
                            attempt += 1;
                        }
                        Err(e) => return Err(e),
                    }
                }
            });
            next += 1;
        }
        match tasks.join_next().await {
            Some(Ok(Ok(part))) => parts.push(part),
            Some(Ok(Err(e))) => return Err(e),
            Some(Err(e)) => return Err(StoreError::Local(format!("part upload task failed: {e}"))),
            None => break,
        }
    }
    parts.sort_by_key(|(n, _, _)| *n);
    let mut read = crc32fast::Hasher::new();
    for (_, _, part) in &parts {
        read.combine(part);
    }
    Ok((
        parts.into_iter().map(|(n, etag, _)| (n, etag)).collect(),
        read,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::io::Write;

    #[test]
    fn part_size_grows_to_fit_ten_thousand_parts() {
        const MIB: u64 = 1 << 20;
        assert_eq!(part_size_for(1, 8 * MIB), 8 * MIB);
        assert_eq!(part_size_for(80_000 * MIB, 8 * MIB), 8 * MIB);
        let five_tib = 5u64 << 40;
        let p = part_size_for(five_tib, 8 * MIB);
        assert!(p % MIB == 0 && five_tib.div_ceil(p) <= MAX_PARTS, "{p}");
    }

    #[test]
    fn multipart_etag_follows_s3s_rule() {
        // Two parts whose MD5s are those of "a" and "b".
        let parts = vec![
            (1, ETag::new("\"0cc175b9c0f1b6a831c399e269772661\"")),
            (2, ETag::new("\"92eb5ffee6ae2fec3ad71c777531578f\"")),
        ];
        let mut h = md5::Md5::new();
        use md5::Digest;
        h.update(hex_bytes("0cc175b9c0f1b6a831c399e269772661"));
        h.update(hex_bytes("92eb5ffee6ae2fec3ad71c777531578f"));
        let want: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(multipart_etag(&parts).unwrap().value(), format!("{want}-2"));
        assert_eq!(multipart_etag(&[(1, ETag::new("\"not-md5\""))]), None);
    }

    fn hex_bytes(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn an_upload_reassembles_the_file_and_never_stores_bytes_not_sealed() {
        let mem = Arc::new(MemoryStore::new());
        let store: Arc<dyn ObjectStore> = mem.clone();
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(3 * 1024 * 1024 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&data).unwrap();
        let f = Arc::new(f);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let crc = crc32fast::hash(&data);
        let upload = |size: u64, crc: u32| {
            rt.block_on(upload_file(
                &store,
                "k",
                f.clone(),
                (size, Some(crc)),
                // Room for two parts at a time.
                &UploadLimits::new(1 << 20, 3, 2 << 20),
                &OpenUploads::default(),
            ))
        };
        upload(data.len() as u64, crc).unwrap();
        assert_eq!(mem.object("k").unwrap().as_ref(), &data[..]);
        assert_eq!(mem.open_uploads(), 0);
        // Bytes that are not the ones sealed are never stored, in one PUT or in parts.
        let small = crc32fast::hash(&data[..1000]);
        for (size, crc) in [(1000, small ^ 1), (data.len() as u64, crc ^ 1)] {
            let e = upload(size, crc).unwrap_err();
            assert!(matches!(e, StoreError::SourceChanged { .. }), "{e}");
            assert_eq!(mem.object("k").unwrap().as_ref(), &data[..]);
            assert_eq!(mem.open_uploads(), 0);
        }
    }
}
