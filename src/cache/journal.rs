//! The write-back journal: an append-only file in the cache directory that records every
//! change acknowledged to a caller but not yet in the bucket, and its completion.
//!
//! The file starts with a preamble (a tag and a random salt, `MAGIC`); each record is
//! `[len: u32][crc32: u32][payload]`, its checksum salted, appended and fsynced before the
//! caller is answered. A small upload's record carries the file's content (`CARRIED_MAX`),
//! so that its fsync alone makes the close durable; the copy is synced before a rewrite
//! drops the content, and a replay restores it from the record. Appends share their fsyncs (group commit): a caller writes its record, then
//! waits until an fdatasync that began after its write has returned, running one itself when
//! none is under way; callers arriving while one runs are covered by the next. An append
//! that fails, or whose fsync fails, is cut back off with every record not yet durable, so
//! the file holds only whole records and each of their callers gets the error; if even that
//! fails, the journal refuses every append until it is rewritten. On open the
//! journal is replayed (`decode_all` reads past damaged records, `Journal::open` says which
//! changes are carried out again) and rewritten with only the changes still to carry out;
//! while the mount runs it is rewritten the same way whenever it grows past a threshold
//! (`Journal::compact`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// One change to carry out in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Upload the sealed file `pending/<seq>` (of `size` bytes, with CRC-32 `crc` when it
    /// was taken) as `key`.
    Upload {
        key: String,
        size: u64,
        crc: Option<u32>,
    },
    /// Delete `key`.
    Delete { key: String },
    /// Store an empty directory marker `key`.
    Marker { key: String },
}

impl Change {
    pub fn key(&self) -> &str {
        match self {
            Change::Upload { key, .. } | Change::Delete { key } | Change::Marker { key } => key,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    Change(u64, Change),
    /// An upload whose record carries the file's content (`CARRIED_MAX`).
    Carrying(u64, Change, Vec<u8>),
    Done(u64),
}

const UPLOAD: u8 = 1;
const DELETE: u8 = 2;
const MARKER: u8 = 3;
const DONE: u8 = 4;
/// An upload with the CRC-32 of its sealed file. Journals written before it existed hold
/// `UPLOAD`; a version that does not know it skips the record, so the queue is emptied
/// (`s3mediafs status` shows 0 pending) before going back to one.
const UPLOAD_CHECKED: u8 = 5;
/// An upload with the CRC-32 of its file and the file's content. Only in salted journals.
const UPLOAD_CARRYING: u8 = 6;

/// Uploads of files up to this size carry their content in their journal record: one
/// fdatasync of the journal makes such a close durable, where a larger file's close needs
/// three in turn (its copy's, the rename of the copy into `pending/`, the journal's). The
/// copy itself is made durable later, before a compaction drops the record
/// (`Journal::compact`), and restored from the record by a replay that finds it missing or
/// different (an intact one is only synced). Synapse's thumbnails and most of its small
/// images fall under it.
pub const CARRIED_MAX: u64 = 256 << 10;

/// Copies `Journal::harden` holds open at once.
const HARDEN_BATCH: usize = 128;

/// A journal written since records could carry content starts with `PREAMBLE` bytes: this
/// tag and a random salt that every frame's checksum covers. File content in a record is
/// anyone's (a remote user's upload): a frame hidden in it must never pass for a record
/// when a torn or damaged record before it makes the replay look for the next valid one,
/// and without the salt no one can make one that does.
const MAGIC: &[u8; 8] = b"s3mfsJ2\n";
const PREAMBLE: usize = 16;

fn preamble(salt: u64) -> [u8; PREAMBLE] {
    let mut p = [0; PREAMBLE];
    p[..8].copy_from_slice(MAGIC);
    p[8..].copy_from_slice(&salt.to_le_bytes());
    p
}

/// The checksum of a frame's payload: salted in journals that have a preamble, plain in
/// those written before.
fn frame_crc(salt: Option<u64>, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if let Some(salt) = salt {
        h.update(&salt.to_le_bytes());
    }
    h.update(payload);
    h.finalize()
}

/// A fresh random salt.
fn new_salt() -> io::Result<u64> {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from_le_bytes(b))
}

/// The frame of a change's record; `content` is the uploaded file's, for a record that
/// carries it.
fn encode_change(salt: u64, seq: u64, change: &Change, content: Option<&[u8]>) -> Vec<u8> {
    let (kind, size, crc, key) = match change {
        Change::Upload { key, size, crc } => {
            let kind = match (content, crc) {
                (Some(_), _) => UPLOAD_CARRYING,
                (None, Some(_)) => UPLOAD_CHECKED,
                (None, None) => UPLOAD,
            };
            (kind, *size, *crc, key.as_str())
        }
        Change::Delete { key } => (DELETE, 0, None, key.as_str()),
        Change::Marker { key } => (MARKER, 0, None, key.as_str()),
    };
    let mut p = Vec::with_capacity(64 + content.map_or(0, |c| c.len()));
    p.push(kind);
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&size.to_le_bytes());
    if let Some(content) = content {
        p.extend_from_slice(
            &crc.unwrap_or_else(|| crc32fast::hash(content))
                .to_le_bytes(),
        );
        p.extend_from_slice(&(key.len() as u16).to_le_bytes());
        p.extend_from_slice(key.as_bytes());
        p.extend_from_slice(content);
    } else {
        if let Some(crc) = crc {
            p.extend_from_slice(&crc.to_le_bytes());
        }
        p.extend_from_slice(key.as_bytes());
    }
    frame(salt, &p)
}

fn encode_done(salt: u64, seq: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(FIXED);
    p.push(DONE);
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    frame(salt, &p)
}

fn frame(salt: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + HEADER);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame_crc(Some(salt), payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Bytes of a frame's header: the payload's length and checksum.
const HEADER: usize = 8;
/// Bytes of a payload before its key: kind, sequence number, size (and an upload's CRC-32
/// after them, in an `UPLOAD_CHECKED` record; its CRC-32 and the key's length, in an
/// `UPLOAD_CARRYING` one).
const FIXED: usize = 17;
/// Longest key a record holds (S3 allows 1024 bytes): a length field beyond it marks damage.
const MAX_KEY: usize = 4096;
/// Longest payload of a frame: of a carrying record in a salted journal, of a record with a
/// checksum and a key in one written before.
fn max_payload(salt: Option<u64>) -> usize {
    match salt {
        Some(_) => FIXED + 6 + MAX_KEY + CARRIED_MAX as usize,
        None => FIXED + 4 + MAX_KEY,
    }
}

/// The record of the whole, valid frame that starts at `pos`, and the frame's length; None
/// when none starts there (a length out of range or past the data, a checksum that does not
/// match, an unknown kind).
fn decode_at(data: &[u8], pos: usize, salt: Option<u64>) -> Option<(Record, usize)> {
    let frame = data.get(pos..).filter(|f| f.len() >= HEADER)?;
    let len = u32::from_le_bytes(frame[0..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(frame[4..8].try_into().unwrap());
    if !(FIXED..=max_payload(salt)).contains(&len) || frame.len() - HEADER < len {
        return None;
    }
    let p = &frame[HEADER..HEADER + len];
    let kind = p[0];
    let seq = u64::from_le_bytes(p[1..9].try_into().unwrap());
    let size = u64::from_le_bytes(p[9..17].try_into().unwrap());
    // Where the fields lie and that the lengths agree, found before the checksum: a resync
    // past a torn record tries every offset, and content made of lengths in range would
    // otherwise cost a checksum of up to `max_payload` bytes at each.
    let (file_crc, key, content) = if kind == UPLOAD_CARRYING && salt.is_some() {
        let file_crc = u32::from_le_bytes(p.get(FIXED..FIXED + 4)?.try_into().unwrap());
        let key_len = u16::from_le_bytes(p.get(FIXED + 4..FIXED + 6)?.try_into().unwrap()) as usize;
        if key_len > MAX_KEY {
            return None;
        }
        let (key, content) = p.get(FIXED + 6..)?.split_at_checked(key_len)?;
        if content.len() as u64 != size {
            return None;
        }
        (Some(file_crc), key, Some(content))
    } else {
        if len > FIXED + 4 + MAX_KEY {
            return None;
        }
        match kind {
            UPLOAD_CHECKED => {
                let file_crc = p.get(FIXED..FIXED + 4)?;
                (
                    Some(u32::from_le_bytes(file_crc.try_into().unwrap())),
                    &p[FIXED + 4..],
                    None,
                )
            }
            UPLOAD | DELETE | MARKER | DONE => (None, &p[FIXED..], None),
            _ => return None,
        }
    };
    if frame_crc(salt, p) != crc {
        return None;
    }
    let key = std::str::from_utf8(key).ok()?.to_string();
    let record = match (kind, content) {
        (_, Some(content)) => Record::Carrying(
            seq,
            Change::Upload {
                key,
                size,
                crc: file_crc,
            },
            content.to_vec(),
        ),
        (UPLOAD | UPLOAD_CHECKED, None) => Record::Change(
            seq,
            Change::Upload {
                key,
                size,
                crc: file_crc,
            },
        ),
        (DELETE, None) => Record::Change(seq, Change::Delete { key }),
        (MARKER, None) => Record::Change(seq, Change::Marker { key }),
        (DONE, None) => Record::Done(seq),
        _ => return None,
    };
    Some((record, HEADER + len))
}

/// The records of a journal file, and the damage passed over to read them.
#[derive(Debug, Default)]
struct Decoded {
    records: Vec<Record>,
    /// Damaged stretches with valid records after them, and their bytes.
    skipped_regions: usize,
    skipped_bytes: usize,
    /// Bytes at the end where no valid record starts.
    torn_bytes: usize,
}

/// Decodes every valid record of a journal file. Where a frame is torn or corrupt, decoding goes on
/// at the next offset where a valid frame starts (`decode_at`), so one damaged record does
/// not take the records after it along. Damage that reaches the end is a torn tail, the
/// trace of a crash in the middle of an append.
///
/// A false resync (a frame taken as valid inside damaged bytes) needs a length in range and
/// a CRC-32 that matches by chance: about one offset in four billion. Nor can a whole frame
/// hide inside a key: its length field holds zero bytes, and keys come from path names,
/// which hold none. File content carried in a record may hold anything: a frame made to hide
/// in it needs the journal's salt to pass (`MAGIC`).
fn decode_all(file: &[u8]) -> Decoded {
    let (data, salt) = match file.strip_prefix(MAGIC.as_slice()) {
        Some(rest) if rest.len() >= PREAMBLE - MAGIC.len() => (
            &rest[PREAMBLE - MAGIC.len()..],
            Some(u64::from_le_bytes(rest[..8].try_into().unwrap())),
        ),
        // The first append of a journal torn inside its preamble: nothing of it was durable.
        Some(rest) => {
            return Decoded {
                torn_bytes: MAGIC.len() + rest.len(),
                ..Decoded::default()
            }
        }
        // Written before journals had a preamble.
        None => (file, None),
    };
    let mut d = Decoded::default();
    let mut pos = 0;
    while pos < data.len() {
        if let Some((record, len)) = decode_at(data, pos, salt) {
            d.records.push(record);
            pos += len;
            continue;
        }
        match (pos + 1..data.len()).find(|&at| decode_at(data, at, salt).is_some()) {
            Some(next) => {
                d.skipped_regions += 1;
                d.skipped_bytes += next - pos;
                pos = next;
            }
            None => {
                d.torn_bytes = data.len() - pos;
                break;
            }
        }
    }
    d
}

pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    pending_dir: PathBuf,
    /// Covered by the checksum of every frame written (`MAGIC`).
    salt: u64,
    /// Appends and rewrites take turns on it.
    file: Mutex<Active>,
    /// Signalled when an fdatasync of the file has returned.
    synced: Condvar,
    /// fsyncs of `pending/` after renames into it, shared by the closes at the same time.
    pending_dir_sync: super::group_sync::GroupSync,
    /// Times `compact` has durably rewritten or emptied the file (`rewrites`).
    rewrites: std::sync::atomic::AtomicU64,
}

/// A record written to the journal and not yet known durable: `Journal::wait_durable` waits
/// for it. While one is alive the journal is never rewritten (the write-back queue keeps it
/// until the change is in its queue, which a rewrite copies).
pub struct Written<'a> {
    journal: &'a Journal,
    /// Where the record ends in the file.
    end: u64,
    /// The failures of the file's fsyncs before the record was written.
    epoch: u64,
}

impl Drop for Written<'_> {
    fn drop(&mut self) {
        let mut a = self.journal.file.lock();
        a.in_flight -= 1;
        if a.in_flight == 0 {
            a.cut_at.clear();
        }
    }
}

/// The journal file appended to, and its condition.
struct Active {
    file: std::sync::Arc<File>,
    /// Bytes written to it, and of those, made durable by an fdatasync.
    written: u64,
    synced: u64,
    /// An fdatasync runs, outside the lock.
    syncing: bool,
    /// Someone waits for a record `wait_durable_within` is patient with (`hurry`).
    hurry: bool,
    /// fsyncs of the file that failed; each cut the file back to what was durable, at the
    /// offset `cut_at` gives for the epoch it ended (kept while records are in flight).
    epoch: u64,
    cut_at: HashMap<u64, (u64, i32)>,
    /// Records written and not yet settled (`Written` alive).
    in_flight: usize,
    /// Uploads whose records in the file carry their content and whose copies in
    /// `pending/` have not been made durable: a rewrite syncs them before it drops the
    /// content (`harden`).
    carried: BTreeSet<u64>,
    /// Bytes of content those records carry.
    carried_bytes: u64,
    /// Those whose copies could not be made durable: while one is pending, the file keeps
    /// its content and is not rewritten.
    unhardened: BTreeSet<u64>,
    /// fdatasyncs run for appends.
    syncs: u64,
    /// Its length after the last rewrite: the next is due at twice that.
    compacted: u64,
    /// A failed append left it without a record it should have (a `Done`): the next
    /// `compact` rewrites it, whatever its size.
    stale: bool,
    /// It may end in a partial record, or its name may not survive a crash: appends are
    /// refused until a rewrite succeeds.
    broken: bool,
    /// This many of the next writes (an append, the cut back after a failed one) fail.
    #[cfg(test)]
    failing_writes: u32,
    /// This many of the next fdatasyncs of appends fail.
    #[cfg(test)]
    failing_syncs: u32,
    /// This many of the next appends wait this long first.
    #[cfg(test)]
    slow_writes: (u32, Duration),
    /// fdatasyncs wait, `syncing`, until this is cleared.
    #[cfg(test)]
    hold_syncs: bool,
}

impl Active {
    fn new(file: File, len: u64) -> Active {
        Active {
            file: std::sync::Arc::new(file),
            written: len,
            synced: len,
            syncing: false,
            hurry: false,
            epoch: 0,
            cut_at: HashMap::new(),
            in_flight: 0,
            carried: BTreeSet::new(),
            carried_bytes: 0,
            unhardened: BTreeSet::new(),
            syncs: 0,
            compacted: len,
            stale: false,
            broken: false,
            #[cfg(test)]
            failing_writes: 0,
            #[cfg(test)]
            failing_syncs: 0,
            #[cfg(test)]
            slow_writes: (0, Duration::ZERO),
            #[cfg(test)]
            hold_syncs: false,
        }
    }

    /// Appends `bytes`, not yet durably.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if self.slow_writes.0 > 0 {
            self.slow_writes.0 -= 1;
            std::thread::sleep(self.slow_writes.1);
        }
        #[cfg(test)]
        if self.fail_now() {
            // A disk that fills up in the middle of the record.
            (&*self.file).write_all(&bytes[..bytes.len() / 2])?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        (&*self.file).write_all(bytes)
    }

    /// Cuts the file back to `len` bytes, durably. What was durable stays so, but records
    /// the cut keeps past it are not vouched for: an fdatasync of them may be running
    /// meanwhile, and of the two the kernel reports a write error of their pages to one
    /// only. If it is that one, it fails them; if it is this one, the cut fails.
    fn cut(&mut self, len: u64) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_now() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.set_len(len)?;
        self.file.sync_data()?;
        self.written = len;
        self.synced = self.synced.min(len);
        Ok(())
    }

    #[cfg(test)]
    fn fail_now(&mut self) -> bool {
        let fail = self.failing_writes > 0;
        self.failing_writes = self.failing_writes.saturating_sub(1);
        fail
    }
}

/// What a replay found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Changes to carry out again, in order, with their sequence numbers.
    pub pending: Vec<(u64, Change)>,
    /// The next free sequence number.
    pub next_seq: u64,
    /// Bytes of a torn record at the end (a crash while appending it), dropped.
    pub torn_bytes: usize,
    /// Damaged stretches before valid records, skipped to reach those: whatever they
    /// recorded is lost.
    pub skipped_regions: usize,
    pub skipped_bytes: usize,
}

impl Journal {
    /// Size past which the journal is rewritten with only what is pending, or twice its size
    /// after the last rewrite if that is more, so that a large pending set is not rewritten at
    /// every landing. Small under test, so that tests pass it quickly.
    pub const COMPACT_AT: u64 = if cfg!(test) { 16 << 10 } else { 4 << 20 };

    /// Content that records may carry on top of that before a rewrite is due: while the
    /// bucket is away, small files' closes would otherwise make every few dozen of them pay
    /// for a rewrite of the whole pending set. It bounds what a replay reads and restores.
    pub const CARRIED_BUDGET: u64 = if cfg!(test) { 256 << 10 } else { 64 << 20 };

    /// Records carrying content past which that content counts toward the threshold again:
    /// a rewrite syncs their copies under the queue's lock, and this bounds how many.
    pub const CARRIED_RECORDS: usize = 2048;

    /// Opens (or creates) the journal in `cache_dir`, replays it and compacts it.
    pub fn open(cache_dir: &Path) -> io::Result<(Journal, Replay)> {
        let path = cache_dir.join("journal");
        let pending_dir = cache_dir.join("pending");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&pending_dir)?;
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut data)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let decoded = decode_all(&data);
        // What is carried out again: only the last change recorded for a key, and only if it
        // is not done. The changes of a key take effect in order, and the queue drops an older
        // change that has not started as soon as a newer one comes (`insert_locked` in the
        // write-back queue), so an older change is superseded whether or not the newer one
        // finished; carrying it out again could undo the newer (an upload bringing back a
        // deleted file). Later means a higher sequence number, the order the queue goes by,
        // not a later place in the file.
        let mut last: HashMap<String, (u64, Change, Option<Vec<u8>>)> = HashMap::new();
        let mut done = HashSet::new();
        let mut next_seq = 1;
        let records = decoded.records.len();
        for r in decoded.records {
            let (seq, c, content) = match r {
                Record::Change(seq, c) => (seq, c, None),
                Record::Carrying(seq, c, content) => (seq, c, Some(content)),
                Record::Done(seq) => {
                    done.insert(seq);
                    continue;
                }
            };
            next_seq = next_seq.max(seq + 1);
            if last.get(c.key()).is_none_or(|(newer, ..)| *newer < seq) {
                last.insert(c.key().to_string(), (seq, c, content));
            }
        }
        // What the file held, for the record of a crash's aftermath.
        tracing::debug!(
            bytes = data.len(),
            records,
            highest_change = next_seq - 1,
            highest_done = done.iter().max(),
            "journal read"
        );
        let changes: BTreeMap<u64, (Change, Option<Vec<u8>>)> = last
            .into_values()
            .filter(|(seq, ..)| !done.contains(seq))
            .map(|(seq, c, content)| (seq, (c, content)))
            .collect();
        let mut replay = Replay {
            pending: Vec::new(),
            next_seq,
            torn_bytes: decoded.torn_bytes,
            skipped_regions: decoded.skipped_regions,
            skipped_bytes: decoded.skipped_bytes,
        };
        let mut restored = 0;
        for (seq, (c, content)) in changes {
            if let Some(content) = content {
                // The copy may not have reached the disk whole: the record's content is
                // what was acknowledged.
                restore(&pending_dir, seq, &content).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "cannot restore the data of a journaled upload of {} in {}: {e}; \
                             nothing was changed in the cache directory",
                            c.key(),
                            pending_dir.display()
                        ),
                    )
                })?;
                restored += 1;
            }
            if let Change::Upload { size, .. } = &c {
                let file = pending_dir.join(pending_name(seq));
                match std::fs::metadata(&file) {
                    Ok(m) if m.len() == *size => {}
                    // Not known missing: the journal is left as it is, to be read again.
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!(
                                "cannot look at the data of a journaled upload of {}, {}: {e}; \
                                 nothing was changed in the cache directory",
                                c.key(),
                                file.display()
                            ),
                        ));
                    }
                    other => {
                        tracing::error!(key = c.key(), file = %file.display(), found = ?other.map(|m| m.len()).ok(),
                            expected = size, "a journaled upload's data is missing or damaged; it cannot be uploaded");
                        continue;
                    }
                }
            }
            replay.pending.push((seq, c));
        }
        // Data files no pending change refers to are left from finished uploads.
        let keep: HashSet<String> = replay
            .pending
            .iter()
            .map(|(seq, _)| pending_name(*seq))
            .collect();
        for entry in std::fs::read_dir(&pending_dir)? {
            let entry = entry?;
            if !keep.contains(entry.file_name().to_string_lossy().as_ref()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        if restored > 0 {
            sync_dir(&pending_dir)?;
            tracing::debug!(
                uploads = restored,
                "journaled uploads' data restored from their records"
            );
        }
        let salt = new_salt()?;
        let (file, len) = rewrite(&path, salt, replay.pending.iter().map(|(seq, c)| (*seq, c)))?;
        sync_dir(cache_dir)?;
        Ok((
            Journal {
                dir: cache_dir.to_path_buf(),
                path,
                pending_dir,
                salt,
                file: Mutex::new(Active::new(file, len)),
                synced: Condvar::new(),
                pending_dir_sync: Default::default(),
                rewrites: Default::default(),
            },
            replay,
        ))
    }

    /// Where the data of upload `seq` lives.
    pub fn pending_path(&self, seq: u64) -> PathBuf {
        self.pending_dir.join(pending_name(seq))
    }

    pub fn pending_dir(&self) -> &Path {
        &self.pending_dir
    }

    /// Makes the renames and links into `pending/` done before this call durable, with an
    /// fsync of the directory shared with the callers at the same time.
    pub fn sync_pending_dir(&self) -> io::Result<()> {
        self.pending_dir_sync.sync(|| sync_dir(&self.pending_dir))
    }

    /// Records a change durably.
    pub fn record(&self, seq: u64, change: &Change) -> io::Result<()> {
        self.wait_durable(&self.write_record(seq, change, None)?)
    }

    /// Writes the record of a change, to be made durable with `wait_durable`; the journal is
    /// not rewritten while the returned `Written` lives.
    /// An upload's record carries `content`, the whole content of its file in `pending/`
    /// (at most `CARRIED_MAX` bytes), when the copy has not been made durable.
    pub fn write_record(
        &self,
        seq: u64,
        change: &Change,
        content: Option<&[u8]>,
    ) -> io::Result<Written<'_>> {
        if change.key().len() > MAX_KEY {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        if let Some(content) = content {
            let size = match change {
                Change::Upload { size, .. } => Some(*size),
                _ => None,
            };
            if content.len() as u64 > CARRIED_MAX || size != Some(content.len() as u64) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a journal record can carry only the whole content of a small upload",
                ));
            }
        }
        let bytes = encode_change(self.salt, seq, change, content);
        self.write(&bytes, content.map(|c| (seq, c.len() as u64)))
    }

    /// An append failed and could not be cut back: nothing more is appended until the
    /// journal is rewritten (`compact`).
    pub fn is_broken(&self) -> bool {
        self.file.lock().broken
    }

    /// Records that change `seq` is in the bucket.
    pub fn done(&self, seq: u64) -> io::Result<()> {
        self.append(&encode_done(self.salt, seq))
    }

    /// Records that changes `seqs` are in the bucket, with one write, not yet durable:
    /// `wait_durable` or `wait_durable_within` makes it so.
    pub fn write_done(&self, seqs: &[u64]) -> io::Result<Written<'_>> {
        let mut bytes = Vec::new();
        for seq in seqs {
            bytes.extend_from_slice(&encode_done(self.salt, *seq));
        }
        self.write(&bytes, None)
    }

    /// Ends the patience of `wait_durable_within` now, or at its next call: someone waits
    /// for the record.
    pub fn hurry(&self) {
        self.file.lock().hurry = true;
        self.synced.notify_all();
    }

    /// `wait_durable`, after giving an fdatasync someone else runs up to `patience` to make
    /// `w` durable along with their own record: then `w` costs no fdatasync of its own.
    pub fn wait_durable_within(&self, w: &Written<'_>, patience: Duration) -> io::Result<()> {
        let deadline = Instant::now() + patience;
        {
            let mut a = self.file.lock();
            while w.epoch == a.epoch
                && a.synced < w.end
                && !a.hurry
                && !self.synced.wait_until(&mut a, deadline).timed_out()
            {}
            a.hurry = false;
        }
        self.wait_durable(w)
    }

    /// Keeps the journal small while changes keep coming. `pending` must be every change
    /// recorded and not finished, and no record may be appended between taking it and this
    /// call's end (the write-back queue calls this under its state lock, which it appends
    /// its records under). With nothing pending the journal is emptied; once it has grown
    /// past its threshold (`COMPACT_AT`), or a failed append damaged it, it is rewritten
    /// with only `pending`. Appends wait meanwhile.
    pub fn compact<'a>(
        &self,
        pending: impl IntoIterator<Item = (u64, &'a Change)>,
    ) -> io::Result<()> {
        let mut a = self.file.lock();
        if a.in_flight > 0 {
            // Records written and not yet in the queue would be lost to a rewrite; the
            // next call does it.
            return Ok(());
        }
        let mut pending = pending.into_iter().peekable();
        if !a.stale && !a.broken {
            let len = a.written;
            if pending.peek().is_none() {
                if len > 0 {
                    a.cut(0)?;
                    a.compacted = 0;
                    a.carried.clear();
                    a.carried_bytes = 0;
                    a.unhardened.clear();
                    self.rewrites.fetch_add(1, Ordering::Release);
                }
                return Ok(());
            }
            let carried = if a.carried.len() > Self::CARRIED_RECORDS {
                0
            } else {
                a.carried_bytes.min(Self::CARRIED_BUDGET)
            };
            if len <= Self::COMPACT_AT.max(2 * a.compacted) + carried {
                return Ok(());
            }
        }
        let pending: Vec<(u64, &Change)> = pending.collect();
        self.harden(&mut a, &pending)?;
        let (file, len) = rewrite(&self.path, self.salt, pending.into_iter())?;
        let fresh = Active::new(file, len);
        // Faults a test set up outlast the file they were set on.
        #[cfg(test)]
        let fresh = Active {
            failing_writes: a.failing_writes,
            failing_syncs: a.failing_syncs,
            slow_writes: a.slow_writes,
            hold_syncs: a.hold_syncs,
            ..fresh
        };
        *a = fresh;
        if let Err(e) = sync_dir(&self.dir) {
            // The rename may not survive a crash, and the old file would lack what is
            // appended from now on.
            a.broken = true;
            return Err(e);
        }
        self.rewrites.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Makes durable the copies of the `pending` uploads whose records carry their content,
    /// so that a rewrite may leave the content out: starts the write-out of a batch of them,
    /// then waits for each, then syncs their directory. A copy that cannot be made durable
    /// (a write-back error the kernel reports once, to one fsync) leaves its record the only
    /// trustworthy copy of the data: from then on the journal is never rewritten while this
    /// mount runs, and the next one restores the copy from the record.
    fn harden(&self, a: &mut Active, pending: &[(u64, &Change)]) -> io::Result<()> {
        let seqs: Vec<u64> = pending
            .iter()
            .map(|(seq, _)| *seq)
            .filter(|seq| a.carried.contains(seq))
            .collect();
        // Once their changes are done, the copies that failed matter no more.
        a.unhardened.retain(|seq| seqs.contains(seq));
        if !a.unhardened.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        for batch in seqs.chunks(HARDEN_BATCH) {
            let mut files = Vec::with_capacity(batch.len());
            for seq in batch {
                match File::open(self.pending_path(*seq)) {
                    Ok(f) => {
                        super::staging::start_write_out(&f, 0, 0);
                        files.push((*seq, f));
                    }
                    // Gone: its record holds the only copy of the data.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(self.unhardened(a, *seq, e))
                    }
                    // Out of descriptors, say: the next compaction tries again.
                    Err(e) => return Err(e),
                }
            }
            for (seq, f) in files {
                f.sync_data().map_err(|e| self.unhardened(a, seq, e))?;
            }
        }
        if seqs.is_empty() {
            return Ok(());
        }
        sync_dir(&self.pending_dir)
    }

    /// The copy of carried upload `seq` cannot be made durable (its write-back failed, which
    /// the kernel reports once, to one fsync): its record keeps the only trustworthy copy of
    /// the data, and the journal is not rewritten while the upload is pending.
    fn unhardened(&self, a: &mut Active, seq: u64, e: io::Error) -> io::Error {
        a.unhardened.insert(seq);
        tracing::error!(error = %e, file = %self.pending_path(seq).display(),
            "a small file's copy waiting for upload could not be made durable; the journal keeps its content \
             and is not compacted until it is uploaded; a restart restores the copy from the journal");
        e
    }

    /// How many times the file has been durably rewritten with only what was pending, or
    /// emptied, since the journal was opened. A change out of the queue before a rewrite
    /// counted here is no longer in the file: it needs no done record to be forgotten.
    pub fn rewrites(&self) -> u64 {
        self.rewrites.load(Ordering::Acquire)
    }

    /// Appends `bytes` durably, or leaves the file as it was and fails.
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        self.wait_durable(&self.write(bytes, None)?)
    }

    /// Writes `bytes` at the end of the file, or leaves the file as it was and fails;
    /// `carrying` is the upload whose record carries its content, and the content's length.
    /// An empty file gets its preamble first.
    fn write(&self, bytes: &[u8], carrying: Option<(u64, u64)>) -> io::Result<Written<'_>> {
        let mut a = self.file.lock();
        if a.broken {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let before = a.written;
        let with_preamble;
        let bytes = if before == 0 {
            with_preamble = [&preamble(self.salt)[..], bytes].concat();
            &with_preamble[..]
        } else {
            bytes
        };
        if let Err(e) = a.write(bytes) {
            a.stale = true;
            // Records before this one stay: their callers wait for them to be durable.
            if let Err(cut) = a.cut(before) {
                // The cut's fsync may have taken the error of their pages with it, and a
                // later fsync would succeed without them: none of them is durable.
                Self::fail_in_flight(&mut a, cut.raw_os_error().unwrap_or(libc::EIO));
                self.synced.notify_all();
                a.broken = true;
                tracing::error!(journal = %self.path.display(), error = %e, cut_error = %cut,
                    "a journal append failed and the journal could not be cut back to its last whole record; \
                     every change is refused with EIO until the journal is rewritten");
            }
            return Err(e);
        }
        a.written = before + bytes.len() as u64;
        a.in_flight += 1;
        if let Some((seq, bytes)) = carrying {
            a.carried.insert(seq);
            a.carried_bytes += bytes;
        }
        Ok(Written {
            journal: self,
            end: a.written,
            epoch: a.epoch,
        })
    }

    /// Waits until the record `w` is durable: when an fdatasync that began after it was
    /// written has returned. Runs that fdatasync itself, outside the lock, when none is
    /// running; records written meanwhile wait for the next. A failed fdatasync cuts the
    /// file back to what was durable before it and fails every record it was to cover.
    pub fn wait_durable(&self, w: &Written<'_>) -> io::Result<()> {
        let mut a = self.file.lock();
        loop {
            if w.epoch != a.epoch {
                // A failed fsync cut the file back since: the record survived if it ended
                // before the cut.
                let (at, errno) = a.cut_at[&w.epoch];
                return if w.end <= at {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(errno))
                };
            }
            if a.synced >= w.end {
                return Ok(());
            }
            if a.syncing {
                self.synced.wait(&mut a);
                continue;
            }
            a.syncing = true;
            a.syncs += 1;
            #[cfg(test)]
            while a.hold_syncs {
                self.synced.wait(&mut a);
            }
            let target = a.written;
            let file = a.file.clone();
            #[cfg(test)]
            let fail = a.failing_syncs > 0;
            #[cfg(test)]
            {
                a.failing_syncs = a.failing_syncs.saturating_sub(1);
            }
            let result = parking_lot::MutexGuard::unlocked(&mut a, || {
                #[cfg(test)]
                if fail {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                file.sync_data()
            });
            a.syncing = false;
            match result {
                Ok(()) => a.synced = a.synced.max(target),
                Err(e) => {
                    let at = a.synced;
                    Self::fail_in_flight(&mut a, e.raw_os_error().unwrap_or(libc::EIO));
                    if let Err(cut) = a.cut(at) {
                        a.broken = true;
                        tracing::error!(journal = %self.path.display(), error = %e, cut_error = %cut,
                            "a journal fsync failed and the journal could not be cut back to its last durable record; \
                             every change is refused with EIO until the journal is rewritten");
                    }
                }
            }
            self.synced.notify_all();
        }
    }

    /// Every record written past the last durable offset fails with `errno`.
    fn fail_in_flight(a: &mut Active, errno: i32) {
        let (epoch, at) = (a.epoch, a.synced);
        a.cut_at.insert(epoch, (at, errno));
        a.epoch += 1;
        a.stale = true;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next `n` writes to the file (an append, the cut back after a failed one) fail.
    #[cfg(test)]
    pub(crate) fn fail_writes(&self, n: u32) {
        self.file.lock().failing_writes = n;
    }

    /// The next `n` appends wait `pause` before they write.
    #[cfg(test)]
    pub(crate) fn slow_writes(&self, n: u32, pause: Duration) {
        self.file.lock().slow_writes = (n, pause);
    }

    /// While `held`, every fdatasync of appends waits before it runs (`is_syncing`).
    #[cfg(test)]
    pub(crate) fn hold_syncs(&self, held: bool) {
        self.file.lock().hold_syncs = held;
        self.synced.notify_all();
    }

    /// Whether an fdatasync of appends is under way (or held, `hold_syncs`).
    #[cfg(test)]
    pub(crate) fn is_syncing(&self) -> bool {
        self.file.lock().syncing
    }

    /// The next `n` fdatasyncs of appends fail, each after 20 ms.
    #[cfg(test)]
    pub(crate) fn fail_syncs(&self, n: u32) {
        self.file.lock().failing_syncs = n;
    }

    /// fdatasyncs run for appends since the journal was opened.
    pub fn syncs(&self) -> u64 {
        self.file.lock().syncs
    }
}

/// Writes a journal of `changes` as `journal.new` beside `path`, makes it durable and renames
/// it over `path`; returns it open for appending, with its length. The caller syncs the
/// directory.
fn rewrite<'a>(
    path: &Path,
    salt: u64,
    changes: impl Iterator<Item = (u64, &'a Change)>,
) -> io::Result<(File, u64)> {
    let tmp = path.with_file_name("journal.new");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let mut buf = Vec::new();
    for (seq, c) in changes {
        if buf.is_empty() {
            buf.extend_from_slice(&preamble(salt));
        }
        buf.extend_from_slice(&encode_change(salt, seq, c, None));
    }
    let written = f
        .write_all(&buf)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((f, buf.len() as u64))
}

/// Makes `content` durable as the data of upload `seq` in `pending_dir` (the directory is
/// synced by the caller): a copy that holds it already is synced (a full disk does not stop
/// it), any other is replaced. A crash meanwhile leaves the journal record it comes from,
/// and the next replay does it again.
fn restore(pending_dir: &Path, seq: u64, content: &[u8]) -> io::Result<()> {
    let path = pending_dir.join(pending_name(seq));
    let found = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path);
    if let Ok(f) = found {
        if f.metadata()?.len() == content.len() as u64
            && super::read_at_most(&f, 0, content.len())? == content
        {
            return f.sync_data();
        }
    }
    let tmp = pending_dir.join(format!("{}.restored", pending_name(seq)));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(content)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)
}

fn pending_name(seq: u64) -> String {
    format!("{seq:016x}")
}

/// Makes a rename or file creation in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates directory `dir` (mode 0700) and its missing parents, and makes each new entry
/// durable in its parent: on a filesystem that does not order them with the journal's own
/// syncs (XFS, btrfs), a power cut could otherwise take away the directory whose journal
/// the mount just acknowledged closes in.
pub fn create_dir_durably(dir: &Path) -> io::Result<()> {
    let mut created = Vec::new();
    let mut d = dir;
    while std::fs::symlink_metadata(d).is_err() {
        created.push(d);
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => d = p,
            _ => break,
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    for d in created {
        let parent = match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        match sync_dir(parent) {
            // A parent the user may write in but not read cannot be opened to be synced.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                tracing::debug!(dir = %parent.display(), "cannot open this directory to sync the cache directory's entry in it");
            }
            other => other?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_created_with_their_missing_parents_and_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/c");
        create_dir_durably(&dir).unwrap();
        create_dir_durably(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for d in ["a", "a/b", "a/b/c"] {
            let mode = std::fs::metadata(root.path().join(d))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{d}");
        }
    }

    #[test]
    fn replay_drops_a_change_older_than_a_finished_one_of_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            std::fs::write(j.pending_path(2), b"new").unwrap();
            j.record(1, &Change::Delete { key: "k".into() }).unwrap();
            j.record(
                2,
                &Change::Upload {
                    key: "k".into(),
                    size: 3,
                    crc: None,
                },
            )
            .unwrap();
            j.record(
                3,
                &Change::Delete {
                    key: "other".into(),
                },
            )
            .unwrap();
            // The upload landed; the delete it replaced was never finished.
            j.done(2).unwrap();
        }
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            r.pending,
            vec![(
                3,
                Change::Delete {
                    key: "other".into()
                }
            )]
        );
    }

    /// Data of a journaled upload that cannot be looked at (here a symlink loop: any error
    /// but "not found", such as EIO from a failing disk) fails the open and drops nothing:
    /// neither the record nor the data.
    #[test]
    fn replay_drops_nothing_it_cannot_look_at() {
        let dir = tempfile::tempdir().unwrap();
        let data = {
            let (j, _) = Journal::open(dir.path()).unwrap();
            let upload = Change::Upload {
                key: "k".into(),
                size: 3,
                crc: None,
            };
            j.record(1, &upload).unwrap();
            j.pending_path(1)
        };
        let journal = std::fs::read(dir.path().join("journal")).unwrap();
        std::os::unix::fs::symlink(&data, &data).unwrap();
        let e = Journal::open(dir.path()).err().expect("opened");
        assert!(e.to_string().contains("journaled upload of k"), "{e}");
        assert_eq!(std::fs::read(dir.path().join("journal")).unwrap(), journal);
        assert!(
            std::fs::symlink_metadata(&data).is_ok(),
            "the data was removed"
        );
    }

    #[test]
    fn replay_returns_what_is_not_done_and_survives_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, r) = Journal::open(dir.path()).unwrap();
            assert!(r.pending.is_empty());
            std::fs::write(j.pending_path(1), b"abc").unwrap();
            j.record(
                1,
                &Change::Upload {
                    key: "a/b".into(),
                    size: 3,
                    crc: None,
                },
            )
            .unwrap();
            j.record(
                2,
                &Change::Delete {
                    key: "x y:[1]".into(),
                },
            )
            .unwrap();
            j.record(3, &Change::Marker { key: "d/".into() }).unwrap();
            j.done(2).unwrap();
            j.record(4, &Change::Delete { key: "torn".into() }).unwrap();
        }
        // A crash in the middle of the last append.
        tear(dir.path(), 3);
        std::fs::write(dir.path().join("pending").join(pending_name(99)), b"orphan").unwrap();

        let (j, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            r.pending,
            vec![
                (
                    1,
                    Change::Upload {
                        key: "a/b".into(),
                        size: 3,
                        crc: None,
                    }
                ),
                (3, Change::Marker { key: "d/".into() }),
            ]
        );
        assert!(r.torn_bytes > 0);
        assert_eq!(r.skipped_regions, 0);
        assert_eq!(r.next_seq, 4);
        assert!(
            !dir.path().join("pending").join(pending_name(99)).exists(),
            "orphans are removed"
        );
        assert!(j.pending_path(1).exists());
        // The compacted journal replays the same way.
        drop(j);
        let (_, again) = Journal::open(dir.path()).unwrap();
        assert_eq!(again.pending, r.pending);
        assert_eq!(again.torn_bytes, 0);
    }

    /// Cuts the last `bytes` off the journal in `dir`, as a crash in an append would.
    fn tear(dir: &Path, bytes: u64) {
        let path = dir.join("journal");
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - bytes)
            .unwrap();
    }

    fn delete(key: &str) -> Change {
        Change::Delete { key: key.into() }
    }

    /// An upload of `key` whose data (3 bytes) is in place.
    fn upload(j: &Journal, seq: u64, key: &str) -> Change {
        std::fs::write(j.pending_path(seq), b"abc").unwrap();
        Change::Upload {
            key: key.into(),
            size: 3,
            crc: None,
        }
    }

    #[test]
    fn replay_skips_a_corrupt_record_and_keeps_the_valid_ones_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let len = || std::fs::metadata(&path).unwrap().len() as usize;
        let (start, end) = {
            let (j, _) = Journal::open(dir.path()).unwrap();
            j.record(1, &delete("a")).unwrap();
            let start = len();
            j.record(2, &delete("b")).unwrap();
            let end = len();
            j.record(3, &delete("c")).unwrap();
            j.done(1).unwrap();
            j.record(4, &upload(&j, 4, "d")).unwrap();
            (start, end)
        };
        // One flipped bit in the key of record 2.
        let mut data = std::fs::read(&path).unwrap();
        data[end - 1] ^= 0x40;
        std::fs::write(&path, data).unwrap();

        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            r.pending,
            vec![
                (3, delete("c")),
                (
                    4,
                    Change::Upload {
                        key: "d".into(),
                        size: 3,
                        crc: None,
                    }
                )
            ]
        );
        assert_eq!(
            (r.skipped_regions, r.skipped_bytes, r.torn_bytes),
            (1, end - start, 0)
        );
        assert_eq!(r.next_seq, 5);
    }

    #[test]
    fn a_failed_append_leaves_the_journal_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            j.record(1, &delete("a")).unwrap();
            let before = std::fs::read(&path).unwrap();
            j.fail_writes(1);
            let e = j.record(2, &delete("b")).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
            assert_eq!(
                std::fs::read(&path).unwrap(),
                before,
                "the partial record is cut off"
            );
            j.record(3, &delete("c")).unwrap();
            j.fail_writes(1);
            j.done(1).unwrap_err();
            j.record(4, &delete("d")).unwrap();
        }
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            r.pending,
            vec![(1, delete("a")), (3, delete("c")), (4, delete("d"))]
        );
        assert_eq!((r.skipped_regions, r.torn_bytes), (0, 0));
    }

    #[test]
    fn an_append_failing_while_an_fsync_runs_does_not_vouch_for_what_that_fsync_covers() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            j.record(1, &delete("a")).unwrap();
            j.fail_syncs(1);
            let w2 = j.write_record(2, &delete("b"), None).unwrap();
            std::thread::scope(|s| {
                let wait = s.spawn(|| j.wait_durable(&w2).map_err(|e| e.raw_os_error()));
                while !j.file.lock().syncing {
                    std::thread::yield_now();
                }
                // An append fails while the fdatasync covering record 2 runs (and fails).
                j.fail_writes(1);
                j.record(3, &delete("c")).unwrap_err();
                assert_eq!(
                    wait.join().unwrap(),
                    Err(Some(libc::EIO)),
                    "a record was reported durable although the fdatasync covering it failed"
                );
            });
            drop(w2);
        }
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.pending, vec![(1, delete("a"))]);
    }

    #[test]
    fn appends_at_the_same_time_share_their_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        const WRITERS: u64 = 16;
        const EACH: u64 = 50;
        std::thread::scope(|s| {
            for w in 0..WRITERS {
                let j = &j;
                s.spawn(move || {
                    for i in 0..EACH {
                        j.record(w * EACH + i + 1, &delete(&format!("k{w}-{i}")))
                            .unwrap();
                    }
                });
            }
        });
        let syncs = j.syncs();
        eprintln!("{} records, {syncs} fdatasyncs", WRITERS * EACH);
        assert!(
            syncs < WRITERS * EACH * 3 / 4,
            "{syncs} fdatasyncs for {} records",
            WRITERS * EACH
        );
        drop(j);
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.pending.len() as u64, WRITERS * EACH);
    }

    #[test]
    fn a_failed_fsync_fails_the_records_it_was_to_cover_and_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            j.record(1, &delete("a")).unwrap();
            // Three records written, the fsync covering them fails: each of them fails, and
            // none is left in the file.
            j.fail_syncs(1);
            let w2 = j.write_record(2, &delete("b"), None).unwrap();
            let w3 = j.write_record(3, &delete("c"), None).unwrap();
            let w4 = j.write_record(4, &delete("d"), None).unwrap();
            std::thread::scope(|s| {
                let waits = [&w3, &w4].map(|w| s.spawn(|| j.wait_durable(w)));
                assert_eq!(
                    j.wait_durable(&w2).unwrap_err().raw_os_error(),
                    Some(libc::EIO)
                );
                for wait in waits {
                    assert_eq!(
                        wait.join().unwrap().unwrap_err().raw_os_error(),
                        Some(libc::EIO)
                    );
                }
            });
            drop((w2, w3, w4));
            j.record(5, &delete("e")).unwrap();
        }
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.pending, vec![(1, delete("a")), (5, delete("e"))]);
        assert_eq!((r.skipped_regions, r.torn_bytes), (0, 0));
    }

    #[test]
    fn the_journal_is_not_rewritten_while_a_record_waits_to_be_queued() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            let w = j.write_record(1, &delete("a"), None).unwrap();
            j.wait_durable(&w).unwrap();
            // Nothing is in the queue yet: an empty pending set must not empty the journal.
            j.compact(std::iter::empty()).unwrap();
            drop(w);
        }
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.pending, vec![(1, delete("a"))]);
    }

    #[test]
    fn a_journal_that_cannot_be_cut_back_refuses_appends_until_it_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            j.record(1, &delete("a")).unwrap();
            // The append fails, and so does cutting it back.
            j.fail_writes(2);
            j.record(2, &delete("b")).unwrap_err();
            let damaged = std::fs::read(&path).unwrap();
            let e = j.record(3, &delete("c")).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            assert_eq!(
                std::fs::read(&path).unwrap(),
                damaged,
                "nothing is appended after a partial record"
            );
            // A rewrite with what is pending repairs it.
            j.compact([(1, &delete("a"))]).unwrap();
            j.record(4, &delete("d")).unwrap();
        }
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.pending, vec![(1, delete("a")), (4, delete("d"))]);
        assert_eq!((r.skipped_regions, r.torn_bytes), (0, 0));
    }

    #[test]
    fn replay_carries_out_only_the_last_change_of_a_key_and_only_if_not_done() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            // An upload not done, then a delete of its key that is.
            j.record(1, &upload(&j, 1, "k")).unwrap();
            j.record(2, &delete("k")).unwrap();
            j.done(2).unwrap();
            // Two uploads of a key, only the second done.
            j.record(3, &upload(&j, 3, "m")).unwrap();
            j.record(4, &upload(&j, 4, "m")).unwrap();
            j.done(4).unwrap();
            // Neither done: only the later one.
            j.record(5, &upload(&j, 5, "n")).unwrap();
            j.record(6, &delete("n")).unwrap();
            // Later by sequence number, not by place in the file.
            j.record(8, &delete("o")).unwrap();
            j.record(7, &upload(&j, 7, "o")).unwrap();
        }
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.pending, vec![(6, delete("n")), (8, delete("o"))]);
    }

    #[test]
    fn compaction_keeps_only_what_is_pending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let kept = {
            let (j, _) = Journal::open(dir.path()).unwrap();
            let kept = upload(&j, 1, "kept");
            j.record(1, &kept).unwrap();
            for seq in 2..1000 {
                j.record(seq, &delete("gone")).unwrap();
                j.done(seq).unwrap();
                j.compact([(1, &kept)]).unwrap();
                assert!(std::fs::metadata(&path).unwrap().len() <= Journal::COMPACT_AT);
            }
            kept
        };
        let (j, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.pending, vec![(1, kept)]);
        // Nothing pending: the journal is emptied.
        j.compact([]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn an_upload_whose_data_is_damaged_is_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            std::fs::write(j.pending_path(1), b"short").unwrap();
            j.record(
                1,
                &Change::Upload {
                    key: "k".into(),
                    size: 100,
                    crc: None,
                },
            )
            .unwrap();
        }
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert!(r.pending.is_empty());
    }

    #[test]
    fn an_upload_record_keeps_its_checksum_and_one_without_reads_as_before() {
        for crc in [Some(0xdead_beef), None] {
            let change = Change::Upload {
                key: "local_content/ab/cd/efgh".into(),
                size: 12345,
                crc,
            };
            let frame = encode_change(7, 9, &change, None);
            assert_eq!(
                frame[HEADER],
                if crc.is_some() {
                    UPLOAD_CHECKED
                } else {
                    UPLOAD
                }
            );
            let (record, len) = decode_at(&frame, 0, Some(7)).unwrap();
            assert_eq!((record, len), (Record::Change(9, change), frame.len()));
        }
    }

    fn carried_upload(key: &str, content: &[u8]) -> Change {
        Change::Upload {
            key: key.into(),
            size: content.len() as u64,
            crc: Some(crc32fast::hash(content)),
        }
    }

    /// `n` deletes from `seq` on, each done and followed by a compaction that leaves
    /// `pending`: how many of those compactions failed.
    fn churn(j: &Journal, seq: u64, n: u64, pending: &[(u64, &Change)]) -> usize {
        (seq..seq + n)
            .filter(|&seq| {
                j.record(seq, &delete("gone")).unwrap();
                j.done(seq).unwrap();
                j.compact(pending.iter().copied()).is_err()
            })
            .count()
    }

    /// Opening the journal in `dir` again finds `upload` (number 1) alone pending, its copy
    /// holding `content`.
    fn reopens_with_upload_1(dir: &Path, upload: Change, content: &[u8]) {
        let (j, r) = Journal::open(dir).unwrap();
        assert_eq!(r.pending, vec![(1, upload)]);
        assert_eq!(std::fs::read(j.pending_path(1)).unwrap(), content);
    }

    /// Upload `seq` of `key`, its copy in place and its record, durable, carrying `content`.
    fn carry(j: &Journal, seq: u64, key: &str, content: &[u8]) -> Change {
        std::fs::write(j.pending_path(seq), content).unwrap();
        let change = carried_upload(key, content);
        let w = j.write_record(seq, &change, Some(content)).unwrap();
        j.wait_durable(&w).unwrap();
        change
    }

    /// The power went before a small file's copy reached the disk (missing, or short): its
    /// record carries the content acknowledged, and the replay puts it back.
    #[test]
    fn an_upload_whose_record_carries_its_content_is_restored_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (pseudo(5000, 1), pseudo(CARRIED_MAX as usize, 2));
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            carry(&j, 1, "a", &a);
            carry(&j, 2, "b", &b);
            std::fs::remove_file(j.pending_path(1)).unwrap();
            std::fs::write(j.pending_path(2), &b[..100]).unwrap();
        }
        let (j, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            r.pending,
            vec![(1, carried_upload("a", &a)), (2, carried_upload("b", &b))]
        );
        assert_eq!(std::fs::read(j.pending_path(1)).unwrap(), a);
        assert_eq!(std::fs::read(j.pending_path(2)).unwrap(), b);
        // The rewritten journal no longer carries the content, and replays the same.
        let len = std::fs::metadata(j.path()).unwrap().len();
        assert!(len < 200, "{len} bytes");
        drop(j);
        assert_eq!(Journal::open(dir.path()).unwrap().1.pending, r.pending);
    }

    /// A compaction leaves the content out of the records it rewrites once their copies are
    /// durable: a replay then takes the copies as they are. A copy that cannot be made
    /// durable (here: gone, as a page the kernel failed to write back would be) leaves the
    /// content in the journal: it is not rewritten, and the next open restores the copy from
    /// the record.
    #[test]
    fn compaction_drops_carried_content_only_once_the_copy_is_durable() {
        for (seed, copy_lost) in [(3, false), (4, true)] {
            let dir = tempfile::tempdir().unwrap();
            let content = pseudo(60_000, seed);
            let kept = carried_upload("kept", &content);
            {
                let (j, _) = Journal::open(dir.path()).unwrap();
                carry(&j, 1, "kept", &content);
                if copy_lost {
                    std::fs::remove_file(j.pending_path(1)).unwrap();
                    assert!(churn(&j, 2, 400, &[(1, &kept)]) > 0);
                    assert_eq!(j.rewrites(), 0);
                } else {
                    assert_eq!(churn(&j, 2, 400, &[(1, &kept)]), 0);
                    assert!(j.rewrites() > 0);
                    let len = std::fs::metadata(j.path()).unwrap().len();
                    assert!(len < content.len() as u64);
                }
            }
            reopens_with_upload_1(dir.path(), kept, &content);
        }
    }

    /// Content carried by pending uploads' records waits for a rewrite until it passes its
    /// budget; then one rewrite drops it, and the journal never holds much more than that.
    #[test]
    fn carried_content_is_rewritten_only_past_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        let content = pseudo(30_000, 5);
        let mut pending = Vec::new();
        for seq in 1..=20u64 {
            pending.push((seq, carry(&j, seq, &format!("k{seq}"), &content)));
            j.compact(pending.iter().map(|(seq, c)| (*seq, c))).unwrap();
            let len = std::fs::metadata(j.path()).unwrap().len();
            assert!(
                len <= Journal::COMPACT_AT + Journal::CARRIED_BUDGET + content.len() as u64,
                "{len} bytes"
            );
            if seq * content.len() as u64 <= Journal::CARRIED_BUDGET {
                assert_eq!(j.rewrites(), 0, "rewritten after {seq} records");
            }
        }
        assert!(j.rewrites() > 0);
    }

    /// A copy that could not be made durable holds rewrites back only while its upload is
    /// pending: once it is done, the journal is compacted again.
    #[test]
    fn a_copy_that_could_not_be_made_durable_holds_rewrites_back_only_while_pending() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        let content = pseudo(60_000, 6);
        let lost = carry(&j, 1, "lost", &content);
        let kept = carry(&j, 2, "kept", &content);
        std::fs::remove_file(j.pending_path(1)).unwrap();
        assert!(churn(&j, 3, 400, &[(1, &lost), (2, &kept)]) > 0);
        assert_eq!(j.rewrites(), 0);
        // Upload 1 landed (its copy had been read while it was still there).
        assert_eq!(churn(&j, 403, 400, &[(2, &kept)]), 0);
        assert!(j.rewrites() > 0);
        drop(j);
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.pending, vec![(2, kept)]);
    }

    /// Content carried in a record is anyone's: a frame hidden in it, plain as journals
    /// before the salt wrote them or salted with a guess, never passes for a record, even
    /// when the record around it is torn and the replay looks for the next valid frame.
    #[test]
    fn a_frame_hidden_in_carried_content_never_passes_for_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let hidden = delete("victim");
        let mut content = Vec::new();
        for salt in [None, Some(0), Some(1)] {
            let frame = encode_change(0, 1000, &hidden, None);
            let payload = &frame[HEADER..];
            content.extend_from_slice(&frame[..4]);
            content.extend_from_slice(&frame_crc(salt, payload).to_le_bytes());
            content.extend_from_slice(payload);
        }
        content.extend_from_slice(&[0; 64]);
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            j.record(1, &delete("a")).unwrap();
            carry(&j, 2, "up", &content);
        }
        // Torn at the end: the record carrying the content fails its checksum.
        tear(dir.path(), 10);
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(r.pending, vec![(1, delete("a"))]);
        assert!(r.torn_bytes > 0);
    }

    /// A journal written before journals had a preamble (plain checksums) replays, and is
    /// rewritten with one.
    #[test]
    fn a_journal_without_a_preamble_replays() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = Vec::new();
        for (seq, change) in [(1, delete("a")), (2, Change::Marker { key: "d/".into() })] {
            let frame = encode_change(0, seq, &change, None);
            old.extend_from_slice(&frame[..4]);
            old.extend_from_slice(&crc32fast::hash(&frame[HEADER..]).to_le_bytes());
            old.extend_from_slice(&frame[HEADER..]);
        }
        std::fs::write(dir.path().join("journal"), &old).unwrap();
        let (j, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            r.pending,
            vec![(1, delete("a")), (2, Change::Marker { key: "d/".into() })]
        );
        assert!(std::fs::read(j.path()).unwrap().starts_with(MAGIC));
    }

    fn pseudo(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}
