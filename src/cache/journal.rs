//! The write-back journal: an append-only file in the cache directory that records every
//! change acknowledged to a caller but not yet in the bucket, and its completion.
//!
//! Each record is `[len: u32][crc32: u32][payload]`, appended and fsynced before the caller
//! is answered. On open the journal is replayed: a record cut short or failing its checksum
//! ends the replay (a crash mid-append), changes without a `Done` are returned to be carried
//! out again, and the file is rewritten with only those.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

/// One change to carry out in the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Upload the sealed file `pending/<seq>` (of `size` bytes) as `key`.
    Upload { key: String, size: u64 },
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
    Done(u64),
}

const UPLOAD: u8 = 1;
const DELETE: u8 = 2;
const MARKER: u8 = 3;
const DONE: u8 = 4;

fn encode(r: &Record) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    let (kind, seq, size, key) = match r {
        Record::Change(seq, Change::Upload { key, size }) => (UPLOAD, *seq, *size, key.as_str()),
        Record::Change(seq, Change::Delete { key }) => (DELETE, *seq, 0, key.as_str()),
        Record::Change(seq, Change::Marker { key }) => (MARKER, *seq, 0, key.as_str()),
        Record::Done(seq) => (DONE, *seq, 0, ""),
    };
    p.push(kind);
    p.extend_from_slice(&seq.to_le_bytes());
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(key.as_bytes());
    let mut out = Vec::with_capacity(p.len() + 8);
    out.extend_from_slice(&(p.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&p).to_le_bytes());
    out.extend_from_slice(&p);
    out
}

/// Decodes records until the data ends or a record is torn or corrupt.
fn decode_all(data: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while data.len() - pos >= 8 {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().unwrap());
        if len < 17 || data.len() - pos - 8 < len {
            break;
        }
        let p = &data[pos + 8..pos + 8 + len];
        if crc32fast::hash(p) != crc {
            break;
        }
        let seq = u64::from_le_bytes(p[1..9].try_into().unwrap());
        let size = u64::from_le_bytes(p[9..17].try_into().unwrap());
        let Ok(key) = std::str::from_utf8(&p[17..]).map(str::to_string) else {
            break;
        };
        let r = match p[0] {
            UPLOAD => Record::Change(seq, Change::Upload { key, size }),
            DELETE => Record::Change(seq, Change::Delete { key }),
            MARKER => Record::Change(seq, Change::Marker { key }),
            DONE => Record::Done(seq),
            _ => break,
        };
        out.push(r);
        pos += 8 + len;
    }
    (out, pos)
}

pub struct Journal {
    path: PathBuf,
    pending_dir: PathBuf,
    file: Mutex<File>,
}

/// What a replay found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Changes recorded and not done, in order, with their sequence numbers.
    pub pending: Vec<(u64, Change)>,
    /// The next free sequence number.
    pub next_seq: u64,
    /// Bytes of a torn or corrupt tail that were dropped.
    pub dropped_bytes: usize,
}

impl Journal {
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
        let (records, used) = decode_all(&data);
        let mut changes: BTreeMap<u64, Change> = BTreeMap::new();
        // The newest finished change of each key: an older one still pending is obsolete
        // (the changes of a key take effect in order), and replaying it would undo a newer.
        let mut finished: std::collections::HashMap<String, u64> = Default::default();
        let mut next_seq = 1;
        for r in records {
            match r {
                Record::Change(seq, c) => {
                    next_seq = next_seq.max(seq + 1);
                    changes.insert(seq, c);
                }
                Record::Done(seq) => {
                    if let Some(c) = changes.remove(&seq) {
                        let newest = finished.entry(c.key().to_string()).or_insert(seq);
                        *newest = (*newest).max(seq);
                    }
                }
            }
        }
        changes.retain(|seq, c| finished.get(c.key()).is_none_or(|done| done < seq));
        let mut replay = Replay {
            pending: Vec::new(),
            next_seq,
            dropped_bytes: data.len() - used,
        };
        for (seq, c) in changes {
            if let Change::Upload { size, .. } = &c {
                let file = pending_dir.join(pending_name(seq));
                match std::fs::metadata(&file) {
                    Ok(m) if m.len() == *size => {}
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
        let keep: std::collections::HashSet<String> = replay
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
        // Rewrite the journal with only what is pending.
        let tmp = cache_dir.join("journal.new");
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            let mut buf = Vec::new();
            for (seq, c) in &replay.pending {
                buf.extend_from_slice(&encode(&Record::Change(*seq, c.clone())));
            }
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        sync_dir(cache_dir)?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok((
            Journal {
                path,
                pending_dir,
                file: Mutex::new(file),
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

    /// Records a change durably.
    pub fn record(&self, seq: u64, change: &Change) -> io::Result<()> {
        self.append(&encode(&Record::Change(seq, change.clone())))
    }

    /// Records that change `seq` is in the bucket.
    pub fn done(&self, seq: u64) -> io::Result<()> {
        self.append(&encode(&Record::Done(seq)))
    }

    /// Records that changes `seqs` are in the bucket, with one write.
    pub fn done_all(&self, seqs: &[u64]) -> io::Result<()> {
        let mut bytes = Vec::new();
        for seq in seqs {
            bytes.extend_from_slice(&encode(&Record::Done(*seq)));
        }
        self.append(&bytes)
    }

    /// Empties the journal when nothing is pending, so it does not grow without bound.
    pub fn reset(&self) -> io::Result<()> {
        let f = self.file.lock();
        f.set_len(0)?;
        f.sync_data()
    }

    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        let mut f = self.file.lock();
        f.write_all(bytes)?;
        f.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn pending_name(seq: u64) -> String {
    format!("{seq:016x}")
}

/// Makes a rename or file creation in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let path = dir.path().join("journal");
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        std::fs::write(dir.path().join("pending").join(pending_name(99)), b"orphan").unwrap();

        let (j, r) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            r.pending,
            vec![
                (
                    1,
                    Change::Upload {
                        key: "a/b".into(),
                        size: 3
                    }
                ),
                (3, Change::Marker { key: "d/".into() }),
            ]
        );
        assert!(r.dropped_bytes > 0);
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
        assert_eq!(again.dropped_bytes, 0);
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
                },
            )
            .unwrap();
        }
        let (_, r) = Journal::open(dir.path()).unwrap();
        assert!(r.pending.is_empty());
    }
}
