//! How the bodies sent to the store are checked on the way. A body goes with its CRC-32
//! (`x-amz-checksum-crc32`), which costs next to nothing, and a store that checks it answers
//! with the same value. A store that does not (an older S3-compatible one) gets the body's
//! MD5 as Content-MD5 instead, which every store checks, and its ETag, where that is an MD5,
//! is compared with it here. The first bodies carry both, and the store's answers decide for
//! the rest of the mount's life: an MD5 costs about 1.6 ms of CPU per MiB, most of what an
//! upload costs the mount when the store is close.
//!
//! A store that refuses the header outright (Backblaze B2 answers 400 InvalidArgument,
//! "Unsupported header") is taken as one that does not check it: the body is sent again with
//! its MD5. So is a store that answers with another CRC-32 while its ETag is the MD5 sent: it
//! does not compare the two. An answer with the same value is taken as the store's word that
//! it checked the body; over HTTPS the body is also kept intact on the way by TLS.
//!
//! A multipart upload declares CRC-32 when it begins (S3 refuses a part checksum its upload
//! did not declare, and a completion that leaves one out), so only an upload begun once the
//! store is known to check them sends them; the value of each part sent is kept here until
//! the upload is completed or aborted. A store that refuses a declared upload's requests is
//! one that does not check them either: the upload fails and is made again without.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;

use super::{StoreError, StoreResult};

/// What the store's answers showed it checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StoreChecks {
    /// No answer yet: bodies carry both checks.
    Unknown = 0,
    /// It answered with the CRC-32 sent: bodies carry that alone.
    Crc32 = 1,
    /// It answered without one: bodies carry their MD5, for good.
    Md5Only = 2,
}

impl StoreChecks {
    fn from_u8(v: u8) -> StoreChecks {
        match v {
            1 => StoreChecks::Crc32,
            2 => StoreChecks::Md5Only,
            _ => StoreChecks::Unknown,
        }
    }
}

/// The checks of one body.
pub(super) struct BodyCheck {
    /// The CRC-32 in base64, as `x-amz-checksum-crc32` carries it.
    pub crc32: Option<String>,
    pub md5: Option<BodyDigest>,
}

pub(super) struct BodyChecks {
    learned: AtomicU8,
    /// Multipart uploads begun with CRC-32 declared, by upload id: each part's value sent.
    crc_uploads: Mutex<HashMap<String, BTreeMap<i32, String>>>,
}

impl BodyChecks {
    pub fn new() -> BodyChecks {
        BodyChecks {
            learned: AtomicU8::new(StoreChecks::Unknown as u8),
            crc_uploads: Mutex::default(),
        }
    }

    pub fn learned(&self) -> StoreChecks {
        StoreChecks::from_u8(self.learned.load(Ordering::Relaxed))
    }

    /// The checks for the body of a PUT.
    pub async fn for_put(&self, body: &Bytes) -> StoreResult<BodyCheck> {
        let learned = self.learned();
        BodyCheck::of(
            body,
            learned != StoreChecks::Md5Only,
            learned != StoreChecks::Crc32,
        )
        .await
    }

    /// Whether a multipart upload begun now declares CRC-32.
    pub fn declares_crc32(&self) -> bool {
        self.learned() == StoreChecks::Crc32
    }

    /// A multipart upload begun with CRC-32 declared.
    pub fn begun_with_crc32(&self, upload_id: &str) {
        self.crc_uploads
            .lock()
            .insert(upload_id.to_string(), BTreeMap::new());
    }

    /// The checks for a part: its CRC-32 when its upload declared them (and then its MD5 too
    /// once the store has stopped confirming them), else its MD5.
    pub async fn for_part(&self, upload_id: &str, body: &Bytes) -> StoreResult<BodyCheck> {
        let declared = self.crc_uploads.lock().contains_key(upload_id);
        BodyCheck::of(
            body,
            declared,
            !declared || self.learned() != StoreChecks::Crc32,
        )
        .await
    }

    /// A part the store took, with its checks.
    pub fn part_taken(&self, upload_id: &str, part_number: i32, check: &BodyCheck) {
        if let (Some(parts), Some(crc)) = (self.crc_uploads.lock().get_mut(upload_id), &check.crc32)
        {
            parts.insert(part_number, crc.clone());
        }
    }

    /// The CRC-32 of each part of an upload begun with them declared, for its completion.
    pub fn parts_of(&self, upload_id: &str) -> Option<BTreeMap<i32, String>> {
        self.crc_uploads.lock().get(upload_id).cloned()
    }

    /// An upload completed or aborted.
    pub fn forget(&self, upload_id: &str) {
        self.crc_uploads.lock().remove(upload_id);
    }

    /// Whether the store holds the body sent, from its answer: the CRC-32 it answered with
    /// (`echoed`) and its ETag, compared with the MD5 sent where `etag_is_md5`.
    pub fn confirm(
        &self,
        check: &BodyCheck,
        op: &str,
        key: &str,
        echoed: Option<&str>,
        etag: Option<&str>,
        etag_is_md5: bool,
    ) -> StoreResult<()> {
        let md5_matched = match (&check.md5, etag_is_md5) {
            (Some(md5), true) => md5.check(op, key, etag)?,
            _ => false,
        };
        match (&check.crc32, echoed) {
            (Some(sent), Some(got)) if sent == got => {
                self.learn(StoreChecks::Crc32, "");
                Ok(())
            }
            // The bytes are the ones sent, and the store's CRC-32 is not theirs: it does not
            // compare the header with the body.
            (Some(_), Some(got)) if md5_matched => {
                self.learn(
                    StoreChecks::Md5Only,
                    &format!("it answered a body's CRC-32 with another value ({got}) though it stored the bytes sent"),
                );
                Ok(())
            }
            (Some(sent), Some(got)) => Err(StoreError::Damaged(format!(
                "{op} {key}: the store took a body with CRC-32 {got}, and {sent} was sent; the body was damaged on the way and is sent again"
            ))),
            (Some(_), None) => {
                self.learn(StoreChecks::Md5Only, "it answered without one");
                match check.md5 {
                    Some(_) => Ok(()),
                    None => Err(StoreError::Damaged(format!(
                        "{op} {key}: the store did not confirm the body's CRC-32; it is sent again with its MD5"
                    ))),
                }
            }
            (None, _) => Ok(()),
        }
    }

    /// The store refused a request that carried a CRC-32 (`refuses_checksums`): bodies go
    /// with their MD5 from now on.
    pub fn refused(&self, what: &str) {
        self.learn(
            StoreChecks::Md5Only,
            &format!("it refused a request that carried one: {what}"),
        );
    }

    /// Moves on from what was known: from not knowing to either answer, and from CRC-32 to
    /// MD5, never back. `why` says why the store is taken not to check CRC-32s.
    fn learn(&self, to: StoreChecks, why: &str) {
        let mut from = self.learned();
        loop {
            let moves = matches!(
                (from, to),
                (
                    StoreChecks::Unknown,
                    StoreChecks::Crc32 | StoreChecks::Md5Only
                ) | (StoreChecks::Crc32, StoreChecks::Md5Only)
            );
            if !moves {
                return;
            }
            match self.learned.compare_exchange(
                from as u8,
                to as u8,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => from = StoreChecks::from_u8(now),
            }
        }
        match to {
            StoreChecks::Crc32 => tracing::info!(
                "the store checks the CRC-32 of each body sent: bodies go without their MD5"
            ),
            _ => tracing::info!(
                "the store does not confirm CRC-32 checksums ({why}): bodies go with their MD5 (Content-MD5), which costs CPU"
            ),
        }
    }
}

/// Whether an error answer is the way a store refuses a checksum header it does not take:
/// a bad request or "not implemented", with none of the codes that say the body was damaged.
pub(super) fn refuses_checksums(status: Option<u16>, code: Option<&str>) -> bool {
    matches!(status, Some(400 | 501))
        && matches!(
            code,
            Some("InvalidArgument" | "InvalidRequest" | "NotImplemented" | "UnsupportedHeader")
        )
}

impl BodyCheck {
    /// The checks of `body` asked for, taken off the runtime's threads when an MD5 of a
    /// large body is: an 8 MiB part costs over 10 ms of it, which the FUSE requests waiting
    /// behind it would pay.
    async fn of(body: &Bytes, crc32: bool, md5: bool) -> StoreResult<BodyCheck> {
        const INLINE: usize = 64 << 10;
        let crc32 = crc32.then(|| crc32_base64(body));
        let md5 = match md5 {
            false => None,
            true if body.len() <= INLINE => Some(BodyDigest::of(body)),
            true => {
                let body = body.clone();
                Some(
                    tokio::task::spawn_blocking(move || BodyDigest::of(&body))
                        .await
                        .map_err(|e| {
                            StoreError::Local(format!("taking the MD5 of a body failed: {e}"))
                        })?,
                )
            }
        };
        Ok(BodyCheck { crc32, md5 })
    }
}

/// The CRC-32 of `body` as S3 writes it (`x-amz-checksum-crc32`): the big-endian value in
/// base64.
pub fn crc32_base64(body: &[u8]) -> String {
    base64(&crc32fast::hash(body).to_be_bytes())
}

/// The MD5 of a body sent to the store. It goes along as Content-MD5, which the store checks
/// (a body damaged on the way is refused with BadDigest); and a store that does not check
/// it still answers with the MD5 of what it stored as the ETag, which is compared here, so
/// a damaged body is never taken for the file (the change is sent again).
pub(super) struct BodyDigest([u8; 16]);

impl BodyDigest {
    pub fn of(body: &[u8]) -> BodyDigest {
        use md5::{Digest, Md5};
        BodyDigest(Md5::digest(body).into())
    }

    /// The Content-MD5 header: the digest in base64.
    pub fn header(&self) -> String {
        base64(&self.0)
    }

    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Fails when the store says it stored other bytes: its ETag is an MD5 (32 hex digits)
    /// other than the one sent. Tells whether the ETag was one to compare.
    fn check(&self, op: &str, key: &str, etag: Option<&str>) -> StoreResult<bool> {
        let Some(etag) = etag.map(|t| t.trim_matches('"')) else {
            return Ok(false);
        };
        let is_md5 = etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit());
        if is_md5 && !etag.eq_ignore_ascii_case(&self.hex()) {
            return Err(StoreError::Damaged(format!(
                "{op} {key}: the store holds other bytes than were sent (ETag {etag}, MD5 sent {}); the body was damaged on the way and is sent again",
                self.hex()
            )));
        }
        Ok(is_md5)
    }
}

pub(super) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_digests_are_checked_against_md5_etags_only() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        let d = BodyDigest::of(b"hello");
        assert_eq!(d.header(), "XUFAKrxLKna5cZ2REBfFkg==");
        assert!(d
            .check("PUT", "k", Some("\"5d41402abc4b2a76b9719d911017c592\""))
            .unwrap());
        assert!(d
            .check("PUT", "k", Some("\"5d41402abc4b2a76b9719d911017c593\""))
            .is_err());
        // Not an MD5: nothing to compare (an encrypted object, a multipart ETag).
        assert!(!d.check("PUT", "k", Some("\"abc-2\"")).unwrap());
        assert!(!d.check("PUT", "k", None).unwrap());
    }

    #[test]
    fn the_crc32_is_written_as_s3_writes_it() {
        // The value Garage and AWS answer for these bytes.
        assert_eq!(crc32_base64(&b"hello".repeat(100)), "yIt4KA==");
    }

    const MD5_OF_HELLO: &str = "\"5d41402abc4b2a76b9719d911017c592\"";

    fn put(checks: &BodyChecks) -> BodyCheck {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(checks.for_put(&Bytes::from_static(b"hello")))
            .unwrap()
    }

    /// The CRC-32 the store answers a body with.
    enum Echo {
        Sent,
        Other,
        Missing,
    }

    struct Case {
        /// The store's answers to the bodies before.
        before: &'static [Echo],
        answer: Echo,
        /// Whether the store's ETag is the MD5 of the body sent.
        etag_right: bool,
        /// Whether the body carried its CRC-32 and its MD5.
        carried: (bool, bool),
        taken: bool,
        learned: StoreChecks,
    }

    #[test]
    fn the_store_answers_decide_which_checks_bodies_carry() {
        use StoreChecks::*;
        const RIGHT: bool = true;
        const WRONG: bool = false;
        let crc = crc32_base64(b"hello");
        let other = crc32_base64(b"hellp");
        let echoed = |e: &Echo| match e {
            Echo::Sent => Some(crc.clone()),
            Echo::Other => Some(other.clone()),
            Echo::Missing => None,
        };
        #[rustfmt::skip]
        let cases = [
            Case { before: &[], answer: Echo::Sent, etag_right: RIGHT, carried: (true, true), taken: true, learned: Crc32 },
            Case { before: &[], answer: Echo::Sent, etag_right: WRONG, carried: (true, true), taken: false, learned: Unknown },
            Case { before: &[], answer: Echo::Missing, etag_right: RIGHT, carried: (true, true), taken: true, learned: Md5Only },
            Case { before: &[], answer: Echo::Missing, etag_right: WRONG, carried: (true, true), taken: false, learned: Unknown },
            // The bytes stored are the ones sent, the CRC-32 answered is not theirs: the
            // store does not compare them.
            Case { before: &[], answer: Echo::Other, etag_right: RIGHT, carried: (true, true), taken: true, learned: Md5Only },
            Case { before: &[], answer: Echo::Other, etag_right: WRONG, carried: (true, true), taken: false, learned: Unknown },
            Case { before: &[Echo::Sent], answer: Echo::Sent, etag_right: WRONG, carried: (true, false), taken: true, learned: Crc32 },
            Case { before: &[Echo::Sent], answer: Echo::Other, etag_right: RIGHT, carried: (true, false), taken: false, learned: Crc32 },
            // A store that stops confirming: the body, which carried no MD5, is sent again.
            Case { before: &[Echo::Sent], answer: Echo::Missing, etag_right: RIGHT, carried: (true, false), taken: false, learned: Md5Only },
            Case { before: &[Echo::Missing], answer: Echo::Missing, etag_right: RIGHT, carried: (false, true), taken: true, learned: Md5Only },
            Case { before: &[Echo::Missing], answer: Echo::Missing, etag_right: WRONG, carried: (false, true), taken: false, learned: Md5Only },
            Case { before: &[Echo::Missing], answer: Echo::Sent, etag_right: RIGHT, carried: (false, true), taken: true, learned: Md5Only },
        ];
        for (i, case) in cases.iter().enumerate() {
            let checks = BodyChecks::new();
            for e in case.before {
                let c = put(&checks);
                let _ = checks.confirm(
                    &c,
                    "PUT",
                    "k",
                    echoed(e).as_deref(),
                    Some(MD5_OF_HELLO),
                    true,
                );
            }
            let c = put(&checks);
            assert_eq!(
                (c.crc32.is_some(), c.md5.is_some()),
                case.carried,
                "case {i}"
            );
            let etag = if case.etag_right {
                MD5_OF_HELLO
            } else {
                "\"5d41402abc4b2a76b9719d911017c593\""
            };
            let r = checks.confirm(
                &c,
                "PUT",
                "k",
                echoed(&case.answer).as_deref(),
                Some(etag),
                true,
            );
            assert_eq!(r.is_ok(), case.taken, "case {i}: {r:?}");
            if let Err(e) = r {
                assert!(e.part_worth_resending(), "case {i}: {e}");
            }
            assert_eq!(checks.learned(), case.learned, "case {i}");
        }
    }

    #[test]
    fn a_refusal_of_the_header_is_told_from_a_damaged_body() {
        for (status, code, refuses) in [
            (Some(400), Some("InvalidArgument"), true),
            (Some(400), Some("InvalidRequest"), true),
            (Some(501), Some("NotImplemented"), true),
            (Some(400), Some("BadDigest"), false),
            (Some(400), Some("InvalidDigest"), false),
            (Some(400), Some("XAmzContentSHA256Mismatch"), false),
            (Some(403), Some("InvalidArgument"), false),
            (Some(500), Some("InternalError"), false),
            (None, None, false),
        ] {
            assert_eq!(
                refuses_checksums(status, code),
                refuses,
                "{status:?} {code:?}"
            );
        }
    }

    #[test]
    fn a_multipart_upload_declares_crc32_only_once_the_store_confirms_them() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let part = Bytes::from_static(b"part");
        let checks = BodyChecks::new();
        assert!(!checks.declares_crc32());
        let c = rt.block_on(checks.for_part("u1", &part)).unwrap();
        assert!(c.crc32.is_none() && c.md5.is_some(), "an undeclared upload");
        let c = put(&checks);
        checks
            .confirm(&c, "PUT", "k", c.crc32.as_deref(), None, false)
            .unwrap();
        assert!(checks.declares_crc32());
        checks.begun_with_crc32("u2");
        let c = rt.block_on(checks.for_part("u2", &part)).unwrap();
        assert_eq!(c.crc32.as_deref(), Some(crc32_base64(b"part").as_str()));
        assert!(c.md5.is_none());
        checks.part_taken("u2", 1, &c);
        // The store stops confirming: a part of the declared upload still carries its CRC-32,
        // which the completion lists, and its MD5 now too.
        checks.learn(StoreChecks::Md5Only, "a test");
        let c = rt.block_on(checks.for_part("u2", &part)).unwrap();
        assert!(c.crc32.is_some() && c.md5.is_some());
        checks.part_taken("u2", 2, &c);
        let parts = checks.parts_of("u2").unwrap();
        assert_eq!(parts.keys().copied().collect::<Vec<_>>(), [1, 2]);
        checks.forget("u2");
        assert!(checks.parts_of("u2").is_none(), "forgotten");
        assert!(checks.parts_of("u1").is_none());
    }
}
