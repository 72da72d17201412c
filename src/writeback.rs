//! The write-back queue: carries changes acknowledged to callers (uploads of closed files,
//! deletes, directory markers) to the bucket in the background, and answers for them until
//! they are there.
//!
//! Every change is journaled (fsynced) before it is queued, so it survives a crash; a newer
//! change to a key supersedes an older one still waiting, and changes to one key run one at
//! a time in order, so the bucket always ends with the last state. Failed requests are
//! retried with backoff for as long as it takes; nothing is dropped silently.
//!
//! Light changes wait a moment, so that fewer requests carry them: deletes are gathered into
//! DeleteObjects requests of up to 1000 keys (`rm -rf` of a tree costs a few requests, not
//! one per file), and a directory marker is not sent at all when a file under it is on its
//! way (the file makes the directory), or when an `rmdir` supersedes it. Anyone waiting for a
//! change (`fsync`, unmount) ends the wait at once.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::cache::{BlockCache, Change, Journal, Replay, StagedFile, CARRIED_MAX};
use crate::retry::Backoff;
use crate::store::{
    part_size_for, upload_file, ETag, ObjectStore, OpenUploads, StoreError, StoreResult,
    UploadLimits, MAX_DELETE_BATCH,
};

/// What the queue says about a key while a change to it is pending.
#[derive(Debug, Clone)]
pub enum Pending {
    /// A file of this size is on its way; its content is in the sealed file.
    Upload { size: u64, file: Arc<StagedFile> },
    /// The key is being deleted.
    Delete,
    /// A directory marker is being stored.
    Marker,
}

#[derive(Debug, Clone)]
pub struct WritebackOptions {
    /// Changes carried out at once.
    pub workers: usize,
    pub part_size: u64,
    pub parts_in_flight: usize,
    /// Bytes of upload bodies read and not yet sent, across all uploads.
    pub part_memory: u64,
    /// Bytes of closed files waiting for upload above which writers wait.
    pub max_dirty: u64,
}

impl Default for WritebackOptions {
    fn default() -> Self {
        WritebackOptions {
            workers: 8,
            part_size: 8 << 20,
            parts_in_flight: 4,
            part_memory: 64 << 20,
            max_dirty: 1 << 30,
        }
    }
}

struct Op {
    change: Change,
    file: Option<Arc<StagedFile>>,
    started: bool,
    attempts: u32,
    last_error: Option<StoreError>,
    /// When the change first failed, if it has.
    failing_since: Option<Instant>,
    /// It failed, and is tried again at this instant (it is in `State::retrying`).
    retry_at: Option<Instant>,
    /// A delete deferred until the file's last open handle closes (`State::deferred`).
    deferred: bool,
    /// When the change was queued.
    queued: Instant,
    /// Someone waits for it: it goes without delay.
    urgent: bool,
}

/// A directory marker waits this long before it is sent, for a file under it or an `rmdir`
/// to make it unnecessary.
const MARKER_DELAY: Duration = Duration::from_secs(3);
/// Deletes are sent once none has been queued for this long...
const DELETE_QUIET: Duration = Duration::from_millis(200);
/// ...or once the oldest has waited this long.
const DELETE_MAX_WAIT: Duration = Duration::from_secs(5);

/// What a worker does next.
enum Next {
    One(u64, Change, Option<Arc<StagedFile>>),
    Deletes(Vec<(u64, Change)>),
    /// Nothing to do before this instant (or until work comes, if None).
    Wait(Option<Instant>),
}

/// How long `fsync` waits on a change that keeps failing before it reports the error.
const WAIT_PATIENCE: Duration = Duration::from_secs(30);

/// How long the done records of landed changes wait for an fdatasync of the journal that
/// a close runs anyway, before they run their own: while files keep closing, a landing
/// costs no fdatasync, and closes do not queue behind the landings' ones.
const DONE_PATIENCE: Duration = Duration::from_millis(10);

/// How soon the done records of changes in the bucket are tried again after they failed,
/// doubled at each failure up to `DONE_RETRY_MAX`.
const DONE_RETRY: Duration = Duration::from_secs(1);
const DONE_RETRY_MAX: Duration = Duration::from_secs(8);

/// Lets the copies of changes whose done records are durable go (or that a rewrite of the
/// journal dropped).
fn release(finished: Vec<(u64, Option<Arc<StagedFile>>)>) {
    for (_, file) in finished {
        if let Some(f) = file {
            f.finish();
        }
    }
}

#[derive(Default)]
struct State {
    next_seq: u64,
    ops: BTreeMap<u64, Op>,
    /// Changes out of `ops` whose journal record of being done is not yet durable, and
    /// whose data is not yet released: `wait` still waits for them.
    finishing: HashSet<u64>,
    /// The newest change of each key with one pending, ordered for prefix scans.
    latest: BTreeMap<String, u64>,
    in_flight: HashSet<String>,
    /// Bytes of uploads pending.
    dirty_bytes: u64,
    /// Changes not started, deletes aside (they are gathered), in the order they came.
    idle: BTreeSet<u64>,
    /// Deletes not started, to be gathered into batches.
    idle_deletes: BTreeSet<u64>,
    /// Changes that failed, by the instant they are tried again; they join `idle` then. A
    /// change that keeps failing thus holds no worker while it waits, and cannot stop the
    /// queue however many of them there are.
    retrying: BTreeSet<(Instant, u64)>,
    /// Deletes of files still open for reading (`delete_after_close`): journaled, and not
    /// started until `release_deferred` lets them go, so readers keep reading the object.
    deferred: HashSet<u64>,
    /// Someone waits for a gathered delete: the batch goes now.
    urgent_deletes: bool,
    /// A batch of deletes failed because the store is down: no batch before then.
    deletes_retry_at: Option<Instant>,
    deletes_attempts: u32,
    /// Unmounting: delayed changes go at once.
    hurry: bool,
    /// The store refused DeleteObjects: deletes go one key a request.
    single_deletes: bool,
    /// The sequence number of the last change of each key that landed (recent keys): a
    /// change numbered before it that is queued only now (its file took long to seal) is
    /// already obsolete.
    last_landed: Option<lru::LruCache<String, u64>>,
    closed: bool,
}

/// Whether `change` makes its key exist (an upload or a marker), rather than deleting it.
fn creates(change: &Change) -> bool {
    !matches!(change, Change::Delete { .. })
}

/// Keys whose last landed change is remembered.
const LAST_LANDED_KEPT: usize = 65_536;

/// The share of the block cache an uploaded file may take when its content is kept there
/// afterwards: a quarter, so one large upload never evicts the whole cache.
const ADOPT_SHARE: u64 = 4;

pub struct WritebackQueue {
    store: Arc<dyn ObjectStore>,
    journal: Journal,
    /// Files this mount uploaded are cached here, so reading them back needs no request.
    blocks: Arc<BlockCache>,
    opts: WritebackOptions,
    state: Mutex<State>,
    /// Work was queued, or a key became free.
    work: Notify,
    /// A change finished or failed an attempt.
    progress: Notify,
    /// Told of every landing (the filesystem's namespace).
    observer: Mutex<Option<Weak<dyn LandingObserver>>>,
    /// Multipart uploads under way, aborted when an unmount stops waiting for them.
    open_uploads: OpenUploads,
    upload_limits: UploadLimits,
    /// Uploads resumed from the journal that may have left a multipart upload unfinished
    /// on the server when the last run ended; it is aborted before they start again.
    resumed: Mutex<std::collections::HashSet<u64>>,
    /// Changes out of the queue whose done records the finisher thread writes.
    to_finish: Arc<ToFinish>,
}

/// Changes out of the queue (landed, or replaced by newer ones) for the finisher thread
/// (`WritebackQueue::finisher`): it records them as done in the journal, takes them out of
/// `finishing`, and once that record is durable, releases their data.
#[derive(Default)]
struct ToFinish {
    list: Mutex<FinishList>,
    queued: parking_lot::Condvar,
    /// Told when the finisher has ended (`FinishList::ended`).
    ended: parking_lot::Condvar,
}

#[derive(Default)]
struct FinishList {
    changes: Vec<(u64, Option<Arc<StagedFile>>)>,
    /// Changes in the bucket whose done records failed, their copies kept until one is
    /// written (`WritebackQueue::finisher`).
    held: usize,
    /// The queue is gone: the finisher stops.
    closed: bool,
    /// The finisher has stopped.
    ended: bool,
}

impl Drop for WritebackQueue {
    fn drop(&mut self) {
        // The finisher stops; what it had not recorded is carried out again by the next
        // mount, from the copies it had not released.
        self.to_finish.list.lock().closed = true;
        self.to_finish.queued.notify_all();
    }
}

/// Told of every change that reaches the bucket, before the change leaves the queue, so
/// that whoever asks about a key sees it pending, landed, or both, never neither.
pub trait LandingObserver: Send + Sync {
    /// A change of `key` reached the bucket; `creates` when it made the key exist (an
    /// upload or a marker), not when it deleted it.
    fn landed(&self, key: &str, creates: bool);
}

/// A change `fsync` or a write-through `close` waits for failed; it stays queued.
#[derive(Debug, Clone)]
pub struct WaitError(pub StoreError);

impl WritebackQueue {
    /// A queue over `journal`, with the changes its replay found queued again.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        journal: Journal,
        replay: Replay,
        opts: WritebackOptions,
        blocks: Arc<BlockCache>,
    ) -> io::Result<Arc<Self>> {
        let upload_limits =
            UploadLimits::new(opts.part_size, opts.parts_in_flight, opts.part_memory);
        let q = Arc::new(WritebackQueue {
            store,
            journal,
            blocks,
            opts,
            state: Mutex::new(State {
                next_seq: replay.next_seq.max(1),
                ..State::default()
            }),
            work: Notify::new(),
            progress: Notify::new(),
            observer: Mutex::new(None),
            open_uploads: OpenUploads::default(),
            upload_limits,
            resumed: Mutex::default(),
            to_finish: Arc::default(),
        });
        let mut restored = 0;
        for (seq, change) in replay.pending {
            let file = match &change {
                Change::Upload { crc, .. } => match StagedFile::open_sealed(
                    &q.journal.pending_path(seq),
                    q.blocks.staged_bytes(),
                    *crc,
                ) {
                    Ok(f) => Some(Arc::new(f)),
                    // Not a regular file: nothing this mount wrote.
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        tracing::error!(key = change.key(), error = %e, "a journaled upload's data is not a regular file; it cannot be uploaded");
                        continue;
                    }
                    // Kept for a later mount to read again.
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!(
                                "cannot open the data of a journaled upload of {}, {}: {e}",
                                change.key(),
                                q.journal.pending_path(seq).display()
                            ),
                        ))
                    }
                },
                _ => None,
            };
            if let Change::Upload { size, .. } = &change {
                if *size > part_size_for(*size, q.opts.part_size) {
                    q.resumed.lock().insert(seq);
                }
            }
            q.insert(seq, change, file);
            restored += 1;
        }
        if restored > 0 {
            tracing::info!(
                changes = restored,
                "resuming changes journaled by an earlier run"
            );
        }
        // Started once the queue is whole: what the replay dropped is finished first.
        let (to_finish, queue) = (q.to_finish.clone(), Arc::downgrade(&q));
        std::thread::Builder::new()
            .name("journal-done".into())
            .spawn(move || {
                // Told however the thread ends.
                struct Ended<'a>(&'a ToFinish);
                impl Drop for Ended<'_> {
                    fn drop(&mut self) {
                        self.0.list.lock().ended = true;
                        self.0.ended.notify_all();
                    }
                }
                let _ended = Ended(&to_finish);
                Self::finisher(&to_finish, &queue);
            })
            .expect("a thread for the journal's done records");
        Ok(q)
    }

    /// Stops the finisher thread and waits until it has: a test that stops an instance
    /// dead, as a crash would, and opens its cache again in the same process, must not
    /// have the old instance's thread release copies the new one has made since. The
    /// queue's runtime must be gone first: what its workers finished later would never be
    /// recorded, and `wait` and `drain` would wait for it for ever.
    #[cfg(any(test, feature = "test-util"))]
    pub fn halt(&self) {
        let mut list = self.to_finish.list.lock();
        list.closed = true;
        self.to_finish.queued.notify_all();
        while !list.ended {
            self.to_finish.ended.wait(&mut list);
        }
    }

    /// Tells `observer` of every landing from now on.
    pub fn observe(&self, observer: Weak<dyn LandingObserver>) {
        *self.observer.lock() = Some(observer);
    }

    /// Starts the workers on the current runtime.
    pub fn start(self: &Arc<Self>) {
        for _ in 0..self.opts.workers.max(1) {
            let q = self.clone();
            tokio::spawn(async move { q.worker().await });
        }
    }

    fn insert(&self, seq: u64, change: Change, file: Option<Arc<StagedFile>>) {
        let mut s = self.state.lock();
        let dropped = Self::insert_locked(&mut s, seq, change, file, false);
        drop(s);
        if let Some(dropped) = dropped {
            self.finish_records(vec![dropped]);
            self.progress.notify_waiters();
        }
        self.wake();
    }

    /// Whether a change of `key` newer than `seq` already landed.
    fn landed_newer(s: &mut State, key: &str, seq: u64) -> bool {
        s.last_landed
            .as_mut()
            .and_then(|l| l.get(key).copied())
            .is_some_and(|landed| landed > seq)
    }

    /// Queues change `seq`. The newest change of a key decides its final state, whatever
    /// order concurrent submissions reach this point in, so an older change of the key that
    /// has not started is dropped at once: it must never outlive the newer one (after a
    /// restart it would be the key's last). Returns the dropped change, whose journal record
    /// the caller finishes.
    fn insert_locked(
        s: &mut State,
        seq: u64,
        change: Change,
        file: Option<Arc<StagedFile>>,
        deferred: bool,
    ) -> Option<(u64, Option<Arc<StagedFile>>)> {
        if let Change::Upload { size, .. } = &change {
            s.dirty_bytes += size;
        }
        let key = change.key().to_string();
        s.ops.insert(
            seq,
            Op {
                change,
                file,
                started: false,
                attempts: 0,
                last_error: None,
                failing_since: None,
                retry_at: None,
                deferred,
                queued: Instant::now(),
                urgent: false,
            },
        );
        let landed_newer = Self::landed_newer(s, &key, seq);
        match s.latest.get(&key).copied() {
            Some(newer) if newer > seq => Some(Self::drop_op(s, seq)),
            None if landed_newer => Some(Self::drop_op(s, seq)),
            older => {
                s.latest.insert(key, seq);
                Self::idle(s, seq);
                let older = older.filter(|o| s.ops.get(o).is_some_and(|op| !op.started))?;
                s.idle.remove(&older);
                s.idle_deletes.remove(&older);
                Some(Self::drop_op(s, older))
            }
        }
    }

    /// Records that change `seq` failed with `e`, for `wait`; returns its attempts so far,
    /// if it is still queued.
    fn note_failure(s: &mut State, seq: u64, e: &StoreError) -> Option<u32> {
        let op = s.ops.get_mut(&seq)?;
        op.attempts += 1;
        op.last_error = Some(e.clone());
        op.failing_since.get_or_insert_with(Instant::now);
        Some(op.attempts)
    }

    /// Change `seq` failed or was refused and waits to be tried again (at `retry_at`, in
    /// `retrying`, holding no worker; else at once), unless a newer change of its key came
    /// meanwhile: then it is dropped (returned for its record to be finished), so it can
    /// never outlive the newer one.
    fn requeue(
        s: &mut State,
        seq: u64,
        retry_at: Option<Instant>,
    ) -> Option<(u64, Option<Arc<StagedFile>>)> {
        let key = s.ops.get(&seq)?.change.key();
        s.in_flight.remove(key);
        if s.latest.get(key) != Some(&seq) {
            tracing::debug!(key, seq, "a failing change was superseded; dropping it");
            return Some(Self::drop_op(s, seq));
        }
        match retry_at {
            Some(at) => {
                let op = s.ops.get_mut(&seq).expect("queued");
                op.started = false;
                op.retry_at = Some(at);
                s.retrying.insert((at, seq));
            }
            None => Self::idle(s, seq),
        }
        None
    }

    /// Change `seq`, if it waits out its backoff in `retrying`, is tried again at once.
    fn retry_now(s: &mut State, seq: u64) {
        if let Some(at) = s.ops.get_mut(&seq).and_then(|op| op.retry_at.take()) {
            s.retrying.remove(&(at, seq));
            Self::idle(s, seq);
        }
    }

    /// Change `seq` waits to be started (again).
    fn idle(s: &mut State, seq: u64) {
        let Some(op) = s.ops.get_mut(&seq) else {
            return;
        };
        op.started = false;
        if op.deferred {
            s.deferred.insert(seq);
        } else if matches!(op.change, Change::Delete { .. })
            && !s.single_deletes
            && crate::fs::names::xml_safe(op.change.key())
        {
            // Gathered into a DeleteObjects request: XML, which cannot carry a control
            // character; a key with one (another tool stored it) goes on its own.
            s.idle_deletes.insert(seq);
        } else {
            s.idle.insert(seq);
        }
    }

    fn wake(&self) {
        self.work.notify_waiters();
        self.work.notify_one();
    }

    fn next_seq(&self) -> u64 {
        let mut s = self.state.lock();
        let seq = s.next_seq;
        s.next_seq += 1;
        seq
    }

    /// Journals change `seq` and queues it. The record is written under the state lock and
    /// waits to be durable outside it, sharing an fdatasync with the closes that commit at
    /// the same time; the journal is not rewritten until the change is in the queue. An
    /// upload's record carries `content` when its file is not durable by itself.
    fn commit(
        &self,
        seq: u64,
        mut change: Change,
        file: Option<Arc<StagedFile>>,
        content: Option<Vec<u8>>,
        deferred: bool,
    ) -> io::Result<u64> {
        // The checksum taken when the file was sealed is journaled with it, so that a copy
        // damaged on disk is found after a restart too.
        if let (Change::Upload { crc, .. }, Some(f)) = (&mut change, &file) {
            *crc = f.crc();
        }
        let written = {
            let mut s = self.state.lock();
            // A newer change of the key already landed (this one was sealed late): it is
            // never carried out, so it is not journaled either. Journaled, a crash before its
            // done record could carry it out over the newer one, whose record a compaction
            // may already have dropped.
            if Self::landed_newer(&mut s, change.key(), seq) {
                drop(s);
                tracing::debug!(
                    seq,
                    key = change.key(),
                    "a newer change of the key landed first; this one is dropped"
                );
                if let Some(f) = file {
                    f.finish();
                }
                return Ok(seq);
            }
            if self.journal.is_broken() {
                // A journal that could not be cut back after a failed append is rewritten from
                // what is pending before anything is appended to it again.
                let pending = s.ops.iter().map(|(seq, op)| (*seq, &op.change));
                self.journal.compact(pending)?;
            }
            self.journal
                .write_record(seq, &change, content.as_deref())?
        };
        self.journal.wait_durable(&written)?;
        tracing::debug!(seq, key = change.key(), "change journaled");
        let mut s = self.state.lock();
        let dropped = Self::insert_locked(&mut s, seq, change, file, deferred);
        drop(written);
        // A rewrite a landing put off because records were in flight is done by the
        // last of them (it costs nothing when none is due).
        self.reset_journal_if_idle(&s);
        drop(s);
        if let Some(dropped) = dropped {
            self.finish_records(vec![dropped]);
            self.progress.notify_waiters();
        }
        self.work.notify_one();
        Ok(seq)
    }

    /// Journals `change` and queues it; returns its sequence number. A small file's upload
    /// is made durable by its record alone, which carries its content (`CARRIED_MAX`); a
    /// larger file is made durable in `pending/` before its record is written.
    fn submit(&self, change: Change, file: Option<Arc<StagedFile>>) -> io::Result<u64> {
        let seq = self.next_seq();
        let Some(f) = file else {
            return self.commit(seq, change, None, None, false);
        };
        let dest = self.journal.pending_path(seq);
        // Decided by what the copy holds: only a copy that small is ever left unsynced.
        let carried = f.size_on_disk()? <= CARRIED_MAX;
        let f = if f.is_sealed() {
            // Sealed by an earlier commit whose journal record failed: its data lies under
            // that commit's number, so this one gets a link under its own, where replay
            // looks for it.
            Arc::new(self.link_sealed(&f, &dest, carried)?)
        } else if carried {
            f.seal_unsynced(&dest)?;
            f
        } else {
            f.seal(&dest, || self.journal.sync_pending_dir())?;
            f
        };
        let content = if carried {
            Some(f.sealed_content()?)
        } else {
            None
        };
        self.commit(seq, change, Some(f), content, false)
    }

    /// A link of sealed `from` at `dest`, made durable unless its record is to carry its
    /// content.
    fn link_sealed(&self, from: &StagedFile, dest: &Path, carried: bool) -> io::Result<StagedFile> {
        from.link_sealed(dest, || {
            if carried {
                Ok(())
            } else {
                self.journal.sync_pending_dir()
            }
        })
    }

    /// Queues the upload of a closed file's staged copy, sealing it.
    pub fn upload(&self, key: &str, file: Arc<StagedFile>, size: u64) -> io::Result<u64> {
        self.submit(
            Change::Upload {
                key: key.to_string(),
                size,
                crc: None,
            },
            Some(file),
        )
    }

    /// Queues an upload of the content of an already sealed file under another key.
    pub fn upload_copy(&self, key: &str, from: &StagedFile, size: u64) -> io::Result<u64> {
        let seq = self.next_seq();
        let carried = from.size_on_disk()? <= CARRIED_MAX;
        let file = Arc::new(self.link_sealed(from, &self.journal.pending_path(seq), carried)?);
        // The copy linked may be durable only by the content its own record carries.
        let content = if carried {
            Some(file.sealed_content()?)
        } else {
            None
        };
        self.commit(
            seq,
            Change::Upload {
                key: key.to_string(),
                size,
                crc: None,
            },
            Some(file),
            content,
            false,
        )
    }

    pub fn delete(&self, key: &str) -> io::Result<u64> {
        self.submit(
            Change::Delete {
                key: key.to_string(),
            },
            None,
        )
    }

    /// Journals the delete of `key`, a file still open for reading, and defers it until
    /// `release_deferred(seq)` (its last handle closed) or an unmount: the readers keep
    /// reading the object meanwhile, and a crash carries the delete out at the next mount.
    /// A newer change of the key replaces it as usual; `settle` lets it go at once.
    pub fn delete_after_close(&self, key: &str) -> io::Result<u64> {
        let seq = self.next_seq();
        let change = Change::Delete {
            key: key.to_string(),
        };
        self.commit(seq, change, None, None, true)
    }

    /// Lets a delete deferred by `delete_after_close` go.
    pub fn release_deferred(&self, seq: u64) {
        let released = {
            let mut guard = self.state.lock();
            Self::undefer(&mut guard, seq)
        };
        if released {
            self.wake();
        }
    }

    /// Lets every deferred delete under `prefix` go: the directory is removed, and the
    /// bucket would show it again while the objects under it stay.
    pub fn release_deferred_under(&self, prefix: &str) {
        let released = {
            let mut guard = self.state.lock();
            let s = &mut *guard;
            let under: Vec<u64> = s
                .deferred
                .iter()
                .copied()
                .filter(|seq| {
                    s.ops
                        .get(seq)
                        .is_some_and(|op| op.change.key().starts_with(prefix))
                })
                .collect();
            under
                .into_iter()
                .filter(|seq| Self::undefer(s, *seq))
                .count()
        };
        if released > 0 {
            self.wake();
        }
    }

    fn undefer(s: &mut State, seq: u64) -> bool {
        if !s.deferred.remove(&seq) {
            return false;
        }
        if let Some(op) = s.ops.get_mut(&seq) {
            op.deferred = false;
        }
        Self::idle(s, seq);
        true
    }

    pub fn marker(&self, key: &str) -> io::Result<u64> {
        self.submit(
            Change::Marker {
                key: key.to_string(),
            },
            None,
        )
    }

    /// Changes in the bucket whose done records the journal could not write: their local
    /// copies are kept, and a restart would carry them out again.
    pub fn unrecorded(&self) -> usize {
        self.to_finish.list.lock().held
    }

    /// The pending change of `key`, if any.
    pub fn lookup(&self, key: &str) -> Option<Pending> {
        let s = self.state.lock();
        let seq = s.latest.get(key)?;
        Some(Self::view(s.ops.get(seq)?))
    }

    /// The sealed local copy of `key` while its upload is pending.
    pub fn pending_upload(&self, key: &str) -> Option<Arc<StagedFile>> {
        match self.lookup(key)? {
            Pending::Upload { file, .. } => Some(file),
            _ => None,
        }
    }

    /// Pending changes of keys under `prefix`.
    pub fn under(&self, prefix: &str) -> Vec<(String, Pending)> {
        let s = self.state.lock();
        s.latest
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter_map(|(k, seq)| Some((k.clone(), Self::view(s.ops.get(seq)?))))
            .collect()
    }

    fn view(op: &Op) -> Pending {
        match (&op.change, &op.file) {
            (Change::Upload { size, .. }, Some(file)) => Pending::Upload {
                size: *size,
                file: file.clone(),
            },
            (Change::Delete { .. }, _) => Pending::Delete,
            _ => Pending::Marker,
        }
    }

    /// The newest pending change of `key`.
    pub fn latest_seq(&self, key: &str) -> Option<u64> {
        self.state.lock().latest.get(key).copied()
    }

    /// Number of changes not yet in the bucket.
    pub fn pending(&self) -> usize {
        self.state.lock().ops.len()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.state.lock().dirty_bytes
    }

    /// Waits until change `seq` is in the bucket (or superseded). A change that is failing
    /// is tried again at once; if it still fails `WAIT_PATIENCE` after the call, its error
    /// is returned, and it stays queued and keeps being retried.
    pub async fn wait(&self, seq: u64) -> Result<(), WaitError> {
        let asked = tokio::time::Instant::now();
        let mut seq = seq;
        let key = self.hurry_change(seq);
        let mut hurried = false;
        loop {
            let notified = self.progress.notified();
            let (finishing, replaced_by) = {
                let s = self.state.lock();
                match s.ops.get(&seq) {
                    Some(op) if op.failing_since.is_some() && asked.elapsed() >= WAIT_PATIENCE => {
                        return Err(WaitError(
                            op.last_error
                                .clone()
                                .unwrap_or(StoreError::Service("the upload failed".into())),
                        ))
                    }
                    // Journaled, and carried out once the file's last handle closes.
                    Some(op) if op.deferred => return Ok(()),
                    Some(_) => (false, None),
                    None => (
                        s.finishing.contains(&seq),
                        key.as_deref()
                            .and_then(|key| Self::replaced_by(&s, key, seq)),
                    ),
                }
            };
            if let Some(newer) = replaced_by {
                // Dropped for a newer change of its key before it landed: the key's content
                // is in the bucket once that one is.
                seq = newer;
                self.hurry_change(seq);
                continue;
            }
            if !finishing && !self.state.lock().ops.contains_key(&seq) {
                return Ok(());
            }
            if finishing && !hurried {
                // In the bucket, and its done record waits for a close's fdatasync: someone
                // waits, so it runs its own now.
                hurried = true;
                self.journal.hurry();
            }
            if asked.elapsed() < WAIT_PATIENCE {
                let _ = tokio::time::timeout_at(asked + WAIT_PATIENCE, notified).await;
            } else {
                notified.await;
            }
        }
    }

    /// Someone waits for change `seq`: it goes without delay, and a retry it waits for
    /// goes at once. Returns its key, if it is still queued.
    fn hurry_change(&self, seq: u64) -> Option<String> {
        let key = {
            let mut guard = self.state.lock();
            let s = &mut *guard;
            let op = s.ops.get_mut(&seq)?;
            let key = op.change.key().to_string();
            if op.deferred {
                // Carried out at the file's last close, not sooner.
                return Some(key);
            }
            op.urgent = true;
            if matches!(op.change, Change::Delete { .. }) {
                s.urgent_deletes = true;
                s.deletes_retry_at = None;
            }
            Self::retry_now(s, seq);
            key
        };
        self.wake();
        Some(key)
    }

    /// The newer change of `key` that change `seq`, no longer queued, was dropped for before
    /// it could land, while that one is still queued.
    fn replaced_by(s: &State, key: &str, seq: u64) -> Option<u64> {
        let landed = s.last_landed.as_ref().and_then(|l| l.peek(key)).copied();
        if landed.is_some_and(|l| l >= seq) {
            return None;
        }
        s.latest.get(key).copied().filter(|newer| *newer > seq)
    }

    /// Waits until nothing is pending for `key`.
    pub async fn settle(&self, key: &str) -> Result<(), WaitError> {
        while let Some(seq) = self.latest_seq(key) {
            // A deferred delete goes now: the key is about to change in the bucket anyway.
            self.release_deferred(seq);
            self.wait(seq).await?;
        }
        Ok(())
    }

    /// Waits until every change pending now under `prefix` is in the bucket.
    pub async fn settle_under(&self, prefix: &str) -> Result<(), WaitError> {
        let seqs: Vec<u64> = {
            let s = self.state.lock();
            s.ops
                .iter()
                .filter(|(_, o)| o.change.key().starts_with(prefix))
                .map(|(q, _)| *q)
                .collect()
        };
        for seq in seqs {
            self.wait(seq).await?;
        }
        Ok(())
    }

    /// Waits while uploads waiting in the queue exceed the dirty budget.
    pub async fn reserve(&self) {
        loop {
            let notified = self.progress.notified();
            {
                let s = self.state.lock();
                if s.dirty_bytes <= self.opts.max_dirty || s.closed {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Waits until every change is in the bucket or `timeout` passes; returns how many are
    /// left. The workers stop taking new work afterwards.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        // Unmounted: no file is open any more.
        self.release_deferred_under("");
        self.state.lock().hurry = true;
        self.wake();
        loop {
            let notified = self.progress.notified();
            // Landed changes whose journal record of being done is being written, or failed,
            // count: the next mount would carry them out again.
            let left = {
                let s = self.state.lock();
                s.ops.len() + s.finishing.len()
            } + self.to_finish.list.lock().held;
            if left == 0 || Instant::now() >= deadline {
                self.state.lock().closed = true;
                self.work.notify_waiters();
                // Uploads cut short here start again from the journal; their parts would
                // only sit on the server.
                let aborted = self
                    .open_uploads
                    .abort_all(&self.store, Duration::from_secs(5))
                    .await;
                if aborted > 0 {
                    tracing::info!(
                        aborted,
                        "aborted the multipart uploads under way; they start again at the next mount"
                    );
                }
                return left;
            }
            let _ = tokio::time::timeout_at(deadline.into(), notified).await;
        }
    }

    /// Picks the oldest change whose key has nothing in flight and that need not wait, or a
    /// batch of deletes that are due; drops superseded changes and markers a pending file
    /// under them makes unnecessary.
    fn next_op(&self) -> Next {
        let mut finished = Vec::new();
        let now = Instant::now();
        let next = {
            let mut guard = self.state.lock();
            let s = &mut *guard;
            let mut wake: Option<Instant> = None;
            let mut later = |t: Instant| wake = Some(wake.map_or(t, |w: Instant| w.min(t)));
            while let Some(&(t, seq)) = s.retrying.first() {
                if t > now {
                    later(t);
                    break;
                }
                s.retrying.pop_first();
                Self::retry_now(s, seq);
            }
            let mut picked = None;
            let mut dropped = Vec::new();
            for &seq in &s.idle {
                let op = &s.ops[&seq];
                let key = op.change.key();
                if s.latest.get(key) != Some(&seq) {
                    dropped.push(seq);
                    continue;
                }
                if s.in_flight.contains(key) {
                    continue;
                }
                if let Change::Marker { .. } = op.change {
                    if !op.urgent && !s.hurry && now < op.queued + MARKER_DELAY {
                        later(op.queued + MARKER_DELAY);
                        continue;
                    }
                    if Self::made_by_file(s, key) {
                        tracing::debug!(
                            key,
                            "a file under this directory makes its marker unnecessary"
                        );
                        dropped.push(seq);
                        continue;
                    }
                }
                picked = Some(seq);
                break;
            }
            for seq in dropped {
                s.idle.remove(&seq);
                finished.push(Self::drop_op(s, seq));
            }
            let batch = self.due_deletes(s, now, picked, &mut later, &mut finished);
            if !batch.is_empty() {
                for (seq, change) in &batch {
                    s.idle_deletes.remove(seq);
                    s.in_flight.insert(change.key().to_string());
                    s.ops.get_mut(seq).expect("idle").started = true;
                }
                s.urgent_deletes = false;
                Next::Deletes(batch)
            } else if let Some(seq) = picked {
                s.idle.remove(&seq);
                let op = s.ops.get_mut(&seq).expect("idle");
                op.started = true;
                s.in_flight.insert(op.change.key().to_string());
                Next::One(seq, op.change.clone(), op.file.clone())
            } else {
                Next::Wait(wake)
            }
        };
        self.finish_records(finished);
        self.progress.notify_waiters();
        next
    }

    /// The deletes to send now in one batch, if they are due and older than the change
    /// `picked` otherwise; else none, with the time they will be due passed to `later`.
    fn due_deletes(
        &self,
        s: &mut State,
        now: Instant,
        picked: Option<u64>,
        later: &mut impl FnMut(Instant),
        finished: &mut Vec<(u64, Option<Arc<StagedFile>>)>,
    ) -> Vec<(u64, Change)> {
        let (Some(&first), Some(&last)) = (s.idle_deletes.first(), s.idle_deletes.last()) else {
            return Vec::new();
        };
        if picked.is_some_and(|p| p < first) {
            return Vec::new();
        }
        let hurry = s.hurry || s.urgent_deletes;
        if let Some(t) = s.deletes_retry_at.filter(|t| *t > now) {
            later(t);
            return Vec::new();
        }
        let (oldest, newest) = (s.ops[&first].queued, s.ops[&last].queued);
        let due = hurry
            || s.idle_deletes.len() >= MAX_DELETE_BATCH
            || now >= newest + DELETE_QUIET
            || now >= oldest + DELETE_MAX_WAIT;
        if !due {
            later((newest + DELETE_QUIET).min(oldest + DELETE_MAX_WAIT));
            return Vec::new();
        }
        let mut batch = Vec::new();
        let mut dropped = Vec::new();
        for &seq in &s.idle_deletes {
            let key = s.ops[&seq].change.key();
            if s.latest.get(key) != Some(&seq) {
                dropped.push(seq);
            } else if !s.in_flight.contains(key) {
                batch.push((seq, s.ops[&seq].change.clone()));
                if batch.len() == MAX_DELETE_BATCH {
                    break;
                }
            }
        }
        for seq in dropped {
            s.idle_deletes.remove(&seq);
            finished.push(Self::drop_op(s, seq));
        }
        batch
    }

    /// Whether a pending change under directory marker `key` makes the directory exist.
    fn made_by_file(s: &State, key: &str) -> bool {
        s.latest
            .range::<str, _>((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(key))
            .any(|(_, q)| {
                s.ops
                    .get(q)
                    .is_some_and(|o| !matches!(o.change, Change::Delete { .. }))
            })
    }

    /// Removes change `seq` from the queue without carrying it out (superseded, or made
    /// unnecessary), into `finishing`; returns what its journal record needs to be finished
    /// (`finish_records`).
    fn drop_op(s: &mut State, seq: u64) -> (u64, Option<Arc<StagedFile>>) {
        let op = s.ops.remove(&seq).expect("queued");
        if let Some(t) = op.retry_at {
            s.retrying.remove(&(t, seq));
        }
        s.deferred.remove(&seq);
        s.finishing.insert(seq);
        if let Change::Upload { size, .. } = op.change {
            s.dirty_bytes -= size;
        }
        if s.latest.get(op.change.key()) == Some(&seq) {
            s.latest.remove(op.change.key());
        }
        (seq, op.file)
    }

    /// Another change succeeded, so the store answers again: changes that failed need not
    /// wait out their backoff.
    fn retry_failed_now(&self) {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        let gathered = s.deletes_retry_at.take().is_some();
        if !gathered && s.retrying.is_empty() {
            return;
        }
        for (_, seq) in std::mem::take(&mut s.retrying) {
            Self::retry_now(s, seq);
        }
        drop(guard);
        self.wake();
    }

    /// Change `seq` failed with `e`: it waits out its backoff in `retrying`, holding no
    /// worker, unless a newer change of its key came meanwhile: then it is dropped.
    fn failed(&self, seq: u64, change: &Change, e: StoreError) {
        let (attempts, wait, dropped) = {
            let mut guard = self.state.lock();
            let s = &mut *guard;
            let Some(attempts) = Self::note_failure(s, seq, &e) else {
                s.in_flight.remove(change.key());
                return;
            };
            let wait = Backoff::CHANGE.delay(attempts);
            let dropped = Self::requeue(s, seq, Some(Instant::now() + wait));
            (attempts, wait, dropped)
        };
        if attempts == 1 || attempts % 10 == 0 {
            tracing::warn!(key = change.key(), attempts, error = %e, retry_in_ms = wait.as_millis() as u64,
                "a change could not be carried out; retrying");
        }
        if let Some(d) = dropped {
            self.finish_records(vec![d]);
        }
        self.progress.notify_waiters();
        // The key is free for a newer change, and the worker for another.
        self.wake();
    }

    /// Changes out of the queue (landed, or replaced by newer ones) are recorded as done,
    /// and their data released once that record is durable, by the finisher thread. Until
    /// the record is written (or has failed) they are in `finishing`, where they were put as
    /// they left the queue, under the same lock (`drop_op`, `remove_landed`): `wait` and
    /// `drain` wait for them.
    fn finish_records(&self, finished: Vec<(u64, Option<Arc<StagedFile>>)>) {
        if finished.is_empty() {
            return;
        }
        self.to_finish.list.lock().changes.extend(finished);
        self.to_finish.queued.notify_one();
    }

    /// The finisher thread: takes what `finish_records` queued, all at once, until the
    /// queue is gone. It holds the queue only while it works, so that dropping the queue
    /// ends it.
    ///
    /// A copy is released only once nothing can carry its change out again: its done record
    /// is durable, or the journal was rewritten (or emptied) without its change record
    /// since it left the queue. Until then a change whose done record failed is held here,
    /// its copy kept, and its done record tried again (`DONE_RETRY`); should the queue
    /// go first, its copy stays on disk for the next mount, which carries it out again.
    /// Its waiters are let go at once all the same: the change is in the bucket.
    fn finisher(to_finish: &ToFinish, queue: &Weak<WritebackQueue>) {
        let mut held: Vec<(u64, Option<Arc<StagedFile>>)> = Vec::new();
        // The journal's rewrites when the held changes had all left the queue.
        let mut held_before = 0;
        let mut retry_in = DONE_RETRY;
        loop {
            let finished = {
                let mut list = to_finish.list.lock();
                while list.changes.is_empty() && !list.closed {
                    if held.is_empty() {
                        to_finish.queued.wait(&mut list);
                    } else if to_finish.queued.wait_for(&mut list, retry_in).timed_out() {
                        break;
                    }
                }
                if list.changes.is_empty() && list.closed {
                    return;
                }
                std::mem::take(&mut list.changes)
            };
            let Some(q) = queue.upgrade() else {
                return;
            };
            if !held.is_empty() && q.journal.rewrites() > held_before {
                Self::release_held(to_finish, &mut held);
            }
            let new: Vec<u64> = finished.iter().map(|(seq, _)| *seq).collect();
            let retrying = !held.is_empty();
            let rewrites = q.journal.rewrites();
            let mut batch = std::mem::take(&mut held);
            batch.extend(finished);
            let seqs: Vec<u64> = batch.iter().map(|(seq, _)| *seq).collect();
            let recorded =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| q.record_done(&seqs)));
            match recorded {
                Ok(Ok(())) => {
                    if retrying {
                        tracing::info!(changes = batch.len(), "the done records of changes in the bucket were written at last; their local copies are released");
                    }
                    to_finish.list.lock().held = 0;
                    release(batch);
                }
                failed => {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "recording them panicked".to_string(),
                    };
                    if retrying {
                        retry_in = (retry_in * 2).min(DONE_RETRY_MAX);
                        tracing::debug!(%error, changes = seqs.len(), "the done records of changes in the bucket failed again; their local copies stay");
                    } else {
                        retry_in = DONE_RETRY;
                        tracing::error!(%error, changes = seqs.len(), "cannot record changes in the bucket as done in the journal; their local copies are kept and the records tried again until one is written or the journal is rewritten without them (a restart meanwhile uploads them again)");
                    }
                    held = batch;
                    held_before = rewrites;
                    to_finish.list.lock().held = held.len();
                }
            }
            let mut s = q.state.lock();
            for seq in &new {
                s.finishing.remove(seq);
            }
            // A rewrite put off while the record was in flight is done now; after a failed
            // record it drops the held changes' records.
            q.reset_journal_if_idle(&s);
            drop(s);
            if !held.is_empty() && q.journal.rewrites() > held_before {
                Self::release_held(to_finish, &mut held);
            }
            q.progress.notify_waiters();
        }
    }

    /// The journal was rewritten without the changes `held` since their done records failed:
    /// nothing carries them out again, and their copies go.
    fn release_held(to_finish: &ToFinish, held: &mut Vec<(u64, Option<Arc<StagedFile>>)>) {
        tracing::info!(changes = held.len(), "the journal was rewritten without the changes whose done records failed; their local copies are released");
        to_finish.list.lock().held = 0;
        release(std::mem::take(held));
    }

    /// Records changes `seqs` as done with one write, made durable by the next fdatasync of
    /// the journal (`DONE_PATIENCE`).
    fn record_done(&self, seqs: &[u64]) -> std::io::Result<()> {
        let written = self.journal.write_done(seqs)?;
        self.journal.wait_durable_within(&written, DONE_PATIENCE)
    }

    async fn worker(self: Arc<Self>) {
        loop {
            let notified = self.work.notified();
            if self.state.lock().closed {
                return;
            }
            match self.next_op() {
                Next::One(seq, change, file) => {
                    match self.carry_out(seq, &change, file.as_ref()).await {
                        Ok(etag) => {
                            self.retry_failed_now();
                            self.keep_uploaded(&change, etag, file.as_ref()).await;
                            self.landed(seq, &change, file);
                        }
                        Err(e) => self.failed(seq, &change, e),
                    }
                }
                Next::Deletes(batch) => self.delete_batch(batch).await,
                Next::Wait(Some(t)) => {
                    let _ = tokio::time::timeout_at(t.into(), notified).await;
                }
                Next::Wait(None) => notified.await,
            }
        }
    }

    /// Change `seq` is in the bucket: it leaves the queue and the journal.
    fn landed(&self, seq: u64, change: &Change, file: Option<Arc<StagedFile>>) {
        self.tell_landed([change]);
        let finished = {
            let mut s = self.state.lock();
            // A file that stays makes the directories above it: unless a newer change of the
            // key (a delete) is on its way.
            let mut finished = if creates(change) && s.latest.get(change.key()) == Some(&seq) {
                Self::drop_markers_above(&mut s, change.key())
            } else {
                Vec::new()
            };
            Self::remove_landed(&mut s, seq, change);
            finished.push((seq, file));
            finished
        };
        self.finish_records(finished);
        self.progress.notify_waiters();
        self.work.notify_waiters();
    }

    /// Tells the observer that `changes` reached the bucket, before they leave the queue, so
    /// that a lookup sees each pending, landed, or both.
    fn tell_landed<'a>(&self, changes: impl IntoIterator<Item = &'a Change>) {
        let observer = self.observer.lock().as_ref().and_then(Weak::upgrade);
        if let Some(o) = observer {
            for change in changes {
                o.landed(change.key(), creates(change));
            }
        }
    }

    /// Takes landed change `seq` out of the queue's state, into `finishing` (its record is
    /// finished by `finish_records`), and remembers it as its key's last landing.
    fn remove_landed(s: &mut State, seq: u64, change: &Change) {
        s.in_flight.remove(change.key());
        s.finishing.insert(seq);
        if let Some(op) = s.ops.remove(&seq) {
            if let Change::Upload { size, .. } = op.change {
                s.dirty_bytes -= size;
            }
        }
        if s.latest.get(change.key()) == Some(&seq) {
            s.latest.remove(change.key());
        }
        let landed = s.last_landed.get_or_insert_with(|| {
            lru::LruCache::new(LAST_LANDED_KEPT.try_into().expect("non-zero"))
        });
        if landed.peek(change.key()).is_none_or(|l| *l < seq) {
            landed.put(change.key().to_string(), seq);
        }
    }

    /// Keeps the journal small at every landing: with nothing pending it starts over, and
    /// past its size threshold it is rewritten with only the pending changes, so that it does
    /// not depend on the queue ever being idle. `s` is locked, and records are written only
    /// under that lock, so the pending set is whole but for records waiting for their
    /// fsync, while which the journal puts the rewrite off (the last of them calls this).
    fn reset_journal_if_idle(&self, s: &State) {
        let pending = s.ops.iter().map(|(seq, op)| (*seq, &op.change));
        if let Err(e) = self.journal.compact(pending) {
            tracing::warn!(error = %e, "cannot compact the journal; it is tried again at the next landing");
        }
    }

    /// A key landed: markers of the directories above it that have not been sent are not
    /// needed any more. Returns them, to be finished (`finish_records`).
    fn drop_markers_above(s: &mut State, key: &str) -> Vec<(u64, Option<Arc<StagedFile>>)> {
        let mut dropped = Vec::new();
        let mut k = key;
        while let Some(i) = k.trim_end_matches('/').rfind('/') {
            k = &k[..=i];
            let Some(&seq) = s.latest.get(k) else {
                continue;
            };
            let waiting = s
                .ops
                .get(&seq)
                .is_some_and(|o| !o.started && matches!(o.change, Change::Marker { .. }));
            if waiting {
                s.idle.remove(&seq);
                dropped.push(Self::drop_op(s, seq));
                tracing::debug!(
                    key = k,
                    "a file under this directory landed; its marker is not needed"
                );
            }
        }
        dropped
    }

    /// Carries out gathered deletes with one DeleteObjects request. Keys the store refused
    /// go back to the queue as single deletes, retried with backoff; a store that is down or
    /// failing has the batch wait and try again; a store that does not implement
    /// DeleteObjects, or refuses it as malformed, gets one key a request from then on.
    async fn delete_batch(&self, batch: Vec<(u64, Change)>) {
        let keys: Vec<String> = batch.iter().map(|(_, c)| c.key().to_string()).collect();
        let started = Instant::now();
        let result = self.store.delete_many(&keys).await;
        let e = match result {
            Ok(refused) => {
                tracing::debug!(
                    keys = keys.len(),
                    refused = refused.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "deletes carried out"
                );
                self.state.lock().deletes_attempts = 0;
                let refused: HashSet<String> = refused.into_iter().collect();
                let (failed, done): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|(_, c)| refused.contains(c.key()));
                // Only a delete carried out says the store is back: keys it refuses
                // again and again must not call each other out of their backoff.
                if !done.is_empty() {
                    self.retry_failed_now();
                }
                for (_, change) in &done {
                    self.blocks.forget_key(change.key());
                }
                self.landed_all(done);
                if failed.is_empty() {
                    return;
                }
                tracing::warn!(
                    keys = failed.len(),
                    "the store refused to delete some keys; each is retried on its own"
                );
                self.requeue_failed(
                    &failed,
                    &StoreError::Service("DeleteObjects refused the key".into()),
                    true,
                );
                return;
            }
            Err(e) => e,
        };
        let not_implemented = matches!(e, StoreError::NotImplemented { .. });
        let attempts = {
            let mut s = self.state.lock();
            if not_implemented && !s.single_deletes {
                tracing::warn!(error = %e, "the store does not take DeleteObjects as this mount sends it; deleting one key per request from now on");
                s.single_deletes = true;
                let waiting = std::mem::take(&mut s.idle_deletes);
                s.idle.extend(waiting);
                None
            } else {
                s.deletes_attempts += 1;
                s.deletes_retry_at =
                    Some(Instant::now() + Backoff::CHANGE.delay(s.deletes_attempts));
                Some(s.deletes_attempts)
            }
        };
        if let Some(attempts) = attempts.filter(|a| *a == 1 || a % 10 == 0) {
            tracing::warn!(keys = keys.len(), attempts, error = %e, "deletes could not be carried out; retrying");
        }
        self.requeue_failed(&batch, &e, false);
    }

    /// Changes that failed go back to the queue (`single`: each as a request of its own),
    /// with their failure recorded for `wait`; those a newer change replaced meanwhile are
    /// dropped.
    fn requeue_failed(&self, failed: &[(u64, Change)], e: &StoreError, single: bool) {
        let mut dropped = Vec::new();
        {
            let mut guard = self.state.lock();
            let s = &mut *guard;
            for (seq, _) in failed {
                Self::note_failure(s, *seq, e);
                match Self::requeue(s, *seq, None) {
                    Some(d) => dropped.push(d),
                    None if single => {
                        s.idle_deletes.remove(seq);
                        s.idle.insert(*seq);
                    }
                    None => {}
                }
            }
        }
        self.finish_records(dropped);
        self.progress.notify_waiters();
        self.wake();
    }

    /// Changes carried out together (deletes) are in the bucket: as `landed` for each, with
    /// one journal write for all.
    fn landed_all(&self, done: Vec<(u64, Change)>) {
        self.tell_landed(done.iter().map(|(_, c)| c));
        let finished: Vec<(u64, Option<Arc<StagedFile>>)> = {
            let mut s = self.state.lock();
            for (seq, change) in &done {
                Self::remove_landed(&mut s, *seq, change);
            }
            done.iter().map(|(seq, _)| (*seq, None)).collect()
        };
        self.finish_records(finished);
        self.progress.notify_waiters();
        self.work.notify_waiters();
    }

    /// One attempt to upload the sealed copy `f` as `key`. The copy is opened for this
    /// attempt only: waiting uploads hold no descriptor. An upload resumed from the journal
    /// first aborts the multipart upload the earlier run may have left.
    async fn upload_attempt(
        &self,
        seq: u64,
        key: &str,
        size: u64,
        f: &Arc<StagedFile>,
    ) -> Result<Option<ETag>, StoreError> {
        // A copy changed on disk since it was sealed is never uploaded: the change fails
        // each attempt, and `status` shows why.
        let checked = {
            let f = f.clone();
            tokio::task::spawn_blocking(move || f.checked_file()).await
        };
        let file = checked
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|e| {
                StoreError::Local(format!(
                    "cannot read the sealed copy {}: {e}",
                    f.path().display()
                ))
            })?;
        if self.resumed.lock().contains(&seq) {
            self.abort_leftover_uploads(key).await?;
            self.resumed.lock().remove(&seq);
        }
        let uploaded = upload_file(
            &self.store,
            key,
            file,
            (size, f.crc()),
            &self.upload_limits,
            &self.open_uploads,
        )
        .await;
        // Changed after the check above, while it was read for upload.
        if let Err(StoreError::SourceChanged { expected, found }) = &uploaded {
            f.found_changed(*expected, *found);
        }
        uploaded
    }

    /// Aborts the multipart uploads of `key` a run that ended while uploading it left
    /// unfinished on the server.
    async fn abort_leftover_uploads(&self, key: &str) -> Result<(), StoreError> {
        for id in self.store.unfinished_multipart(key).await? {
            self.store.abort_multipart(key, &id).await?;
            tracing::info!(
                key,
                "aborted a multipart upload an earlier run left unfinished; the file is uploaded again"
            );
        }
        Ok(())
    }

    /// After a change reached the bucket: the content of an uploaded file moves into the
    /// block cache (a file of up to a quarter of it), so that reading it back needs no
    /// request and is passed through to the kernel; a deleted key's last ETag is forgotten.
    async fn keep_uploaded(
        &self,
        change: &Change,
        etag: Option<ETag>,
        file: Option<&Arc<StagedFile>>,
    ) {
        match (change, etag, file) {
            (Change::Upload { key, size, .. }, Some(etag), Some(file))
                if *size <= self.blocks.limits().max_bytes / ADOPT_SHARE =>
            {
                let (blocks, key, size, file) =
                    (self.blocks.clone(), key.clone(), *size, file.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    blocks.adopt_staged(&key, &etag, &file, size)
                })
                .await;
            }
            // Too large to keep: its version is known all the same.
            (Change::Upload { key, .. }, Some(etag), _) => self.blocks.note_uploaded(key, &etag),
            (change, _, _) => self.blocks.forget_key(change.key()),
        }
    }

    /// Tries change `seq` once; returns the ETag of an uploaded object, when the store gave
    /// one.
    async fn carry_out(
        &self,
        seq: u64,
        change: &Change,
        file: Option<&Arc<StagedFile>>,
    ) -> StoreResult<Option<ETag>> {
        let started = Instant::now();
        let result = match (change, file) {
            // The sealed copy is opened for this attempt only: waiting uploads hold no
            // descriptor.
            (Change::Upload { key, size, .. }, Some(f)) => {
                self.upload_attempt(seq, key, *size, f).await
            }
            (Change::Upload { .. }, None) => Ok(None),
            (Change::Delete { key }, _) => self.store.delete(key).await.map(|_| None),
            (Change::Marker { key }, _) => {
                self.store.put(key, bytes::Bytes::new()).await.map(|_| None)
            }
        };
        if result.is_ok() {
            tracing::debug!(
                key = change.key(),
                seq,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "change carried out"
            );
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{BlockId, CacheLimits, MinFree, ObjectId, StagedBytes, StagingArea};
    use crate::store::MemoryStore;

    fn setup(
        dir: &std::path::Path,
    ) -> (
        Arc<MemoryStore>,
        Arc<WritebackQueue>,
        StagingArea,
        Arc<BlockCache>,
    ) {
        let mem = Arc::new(MemoryStore::new());
        let (journal, replay) = Journal::open(dir).unwrap();
        let staged = Arc::new(StagedBytes::default());
        let limits = CacheLimits {
            max_bytes: 1 << 30,
            min_free: MinFree::Bytes(0),
            block_size: 1 << 20,
        };
        let blocks = Arc::new(BlockCache::open(dir, limits, staged.clone()).unwrap());
        let q = WritebackQueue::new(
            mem.clone(),
            journal,
            replay,
            WritebackOptions::default(),
            blocks.clone(),
        )
        .unwrap();
        (mem, q, StagingArea::open(dir, staged).unwrap(), blocks)
    }

    /// Waits until `done` holds, for at most ten seconds.
    async fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "waited ten seconds for {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Blocks until the finisher thread has recorded every change out of the queue.
    fn finished(q: &WritebackQueue) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !q.state.lock().finishing.is_empty() {
            assert!(
                Instant::now() < deadline,
                "waited ten seconds for done records"
            );
            // As a waiter does: the done records need not wait for a close's fdatasync.
            q.journal.hurry();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn staged(area: &StagingArea, data: &[u8]) -> Arc<StagedFile> {
        let f = area.create().unwrap();
        f.write_at(data, 0).unwrap();
        Arc::new(f)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_change_of_a_key_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, q, area, blocks) = setup(dir.path());
        let a = q.upload("k", staged(&area, b"first"), 5).unwrap();
        let b = q.upload("k", staged(&area, b"second"), 6).unwrap();
        let c = q.delete("k").unwrap();
        let d = q.upload("k2", staged(&area, b"kept"), 4).unwrap();
        q.start();
        for s in [a, b, c, d] {
            q.wait(s).await.unwrap();
        }
        assert_eq!(mem.object("k"), None);
        assert_eq!(mem.object("k2").unwrap().as_ref(), b"kept");
        assert_eq!(q.pending(), 0);
        assert_eq!(q.dirty_bytes(), 0);
        // Finished uploads leave no data behind, and their content is in the block cache.
        assert_eq!(
            std::fs::read_dir(dir.path().join("pending"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(area.bytes(), 0);
        let etag = blocks.known_etag("k2").unwrap();
        let id = BlockId {
            object: ObjectId::new("k2", &etag),
            index: 0,
        };
        assert_eq!(blocks.get(&id, 4).unwrap().as_ref(), b"kept");
        assert_eq!(blocks.known_etag("k"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_drain_ends_once_every_landing_is_journaled_as_done() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, q, area, _) = setup(dir.path());
        q.upload("k", staged(&area, b"data"), 4).unwrap();
        // The landing's done record is the next append: it is slow to be written.
        q.journal.slow_writes(1, Duration::from_secs(1));
        q.start();
        // Landed, out of the queue, while its done record is being written: an unmount now.
        wait_until("the upload to land", || q.pending() == 0).await;
        assert_eq!(q.drain(Duration::from_secs(10)).await, 0);
        assert_eq!(mem.object("k").unwrap().as_ref(), b"data");
        // The next mount finds nothing to carry out again.
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert!(replay.pending.is_empty(), "{:?}", replay.pending);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deletes_go_one_key_per_request_on_a_store_without_delete_objects() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, q, area, _) = setup(dir.path());
        q.start();
        let keys = ["a", "b", "c", "d"];
        for k in keys {
            let s = q.upload(k, staged(&area, b"x"), 1).unwrap();
            q.wait(s).await.unwrap();
        }
        mem.refuse_batch_deletes();
        let seqs: Vec<u64> = keys.iter().map(|k| q.delete(k).unwrap()).collect();
        for s in seqs {
            tokio::time::timeout(Duration::from_secs(10), q.wait(s))
                .await
                .expect("the deletes did not land one by one")
                .unwrap();
        }
        assert_eq!(mem.keys(), Vec::<String>::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resumed_upload_aborts_the_multipart_upload_an_earlier_run_left() {
        let dir = tempfile::tempdir().unwrap();
        let size = 3 * WritebackOptions::default().part_size;
        let data = vec![7u8; size as usize];
        {
            let (_mem, q, area, _) = setup(dir.path());
            q.upload("big", staged(&area, &data), size).unwrap();
            // The run ends in the middle of the multipart upload.
        }
        let (mem, q, _area, _) = setup(dir.path());
        mem.create_multipart("big").await.unwrap();
        assert_eq!(mem.open_uploads(), 1);
        q.start();
        wait_until("the upload to land", || mem.object("big").is_some()).await;
        assert_eq!(
            mem.open_uploads(),
            0,
            "the earlier run's upload is still open"
        );
    }

    #[test]
    fn a_commit_retried_after_a_failed_journal_record_is_replayed_with_its_data() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_mem, q, area, _) = setup(dir.path());
            let file = staged(&area, b"content");
            // The copy is sealed, then the journal record fails: the close fails.
            q.journal.fail_writes(1);
            assert!(q.upload("k", file.clone(), 7).is_err());
            assert!(file.is_sealed());
            // The next close commits the same sealed copy.
            q.upload("k", file, 7).unwrap();
            // The process dies before the upload.
        }
        let (journal, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay.pending.len(), 1, "{:?}", replay.pending);
        let (seq, change) = &replay.pending[0];
        assert_eq!(
            change,
            &Change::Upload {
                key: "k".into(),
                size: 7,
                crc: Some(crc32fast::hash(b"content")),
            }
        );
        assert_eq!(
            std::fs::read(journal.pending_path(*seq)).unwrap(),
            b"content"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_change_never_outlives_a_newer_one_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mem, q, area, _) = setup(dir.path());
            // The delete waits to be gathered; the upload that supersedes it goes at once.
            q.delete("k").unwrap();
            q.upload("k", staged(&area, b"new"), 3).unwrap();
            q.start();
            wait_until("the upload to land", || mem.object("k").is_some()).await;
            // Dropped here with nothing drained, as if the process died.
        }
        let (_mem, q, _area, _) = setup(dir.path());
        // The upload may come back (the process died before its completion was journaled);
        // the delete it superseded never does.
        assert!(
            !matches!(q.lookup("k"), Some(Pending::Delete)),
            "a change older than the last one came back after a restart"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_sealed_after_a_newer_one_of_its_key_landed_is_not_journaled() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, q, area, _) = setup(dir.path());
        // The older close takes its number, then seals late.
        let older = q.next_seq();
        q.start();
        let newer = q.upload("k", staged(&area, b"newer"), 5).unwrap();
        q.wait(newer).await.unwrap();
        let journal = dir.path().join("journal");
        let before = std::fs::metadata(&journal).unwrap().len();
        let f = staged(&area, b"older!");
        f.seal(&q.journal.pending_path(older), || {
            q.journal.sync_pending_dir()
        })
        .unwrap();
        let change = Change::Upload {
            key: "k".into(),
            size: 6,
            crc: None,
        };
        q.commit(older, change, Some(f), None, false).unwrap();
        q.wait(older).await.unwrap();
        assert_eq!(
            std::fs::metadata(&journal).unwrap().len(),
            before,
            "the superseded change was journaled"
        );
        assert_eq!(mem.object("k").unwrap().as_ref(), b"newer");
        assert_eq!(
            std::fs::read_dir(dir.path().join("pending"))
                .unwrap()
                .count(),
            0,
            "its data was left behind"
        );
    }

    /// A landed upload's copy is released only once the journal says durably that it is
    /// done: while that fdatasync is held back, the change is still finishing and its copy is
    /// still there; once it runs, a waiter is let go and the copy goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_landed_copy_is_released_only_once_its_done_record_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, q, area, _) = setup(dir.path());
        q.start();
        let seq = q.upload("k", staged(&area, b"data"), 4).unwrap();
        let copy = q.journal.pending_path(seq);
        // The next fdatasync of the journal, the done record's, is held.
        q.journal.hold_syncs(true);
        wait_until("the landing", || mem.object("k").is_some()).await;
        wait_until("the done record's fdatasync", || q.journal.is_syncing()).await;
        assert!(
            q.state.lock().finishing.contains(&seq),
            "finished before its done record was durable"
        );
        assert!(
            copy.exists(),
            "the copy went before its done record was durable"
        );
        q.journal.hold_syncs(false);
        q.wait(seq).await.unwrap();
        assert!(!q.state.lock().finishing.contains(&seq));
        wait_until("the copy's removal", || !copy.exists()).await;
    }

    /// Changes that keep failing hold no worker while they wait: twice as many of them as
    /// there are workers do not keep a change behind them from landing, and a newer change
    /// of a failing key replaces it at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_that_keep_failing_do_not_stop_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, q, area, _) = setup(dir.path());
        let failing = 2 * WritebackOptions::default().workers;
        for i in 0..failing {
            let f = staged(&area, b"data");
            q.upload(&format!("bad{i}"), f.clone(), 4).unwrap();
            // Its copy changed on disk since it was sealed: it is never uploaded.
            f.found_changed(1, 2);
        }
        let good = q.upload("good", staged(&area, b"good"), 4).unwrap();
        q.start();
        tokio::time::timeout(Duration::from_secs(10), q.wait(good))
            .await
            .expect("a change behind failing ones never landed")
            .unwrap();
        assert_eq!(mem.object("good").unwrap().as_ref(), b"good");
        let fixed = q.upload("bad0", staged(&area, b"fixed"), 5).unwrap();
        tokio::time::timeout(Duration::from_secs(10), q.wait(fixed))
            .await
            .expect("the newer change of a failing key never landed")
            .unwrap();
        assert_eq!(mem.object("bad0").unwrap().as_ref(), b"fixed");
        assert!(mem.object("bad1").is_none());
        assert_eq!(q.pending(), failing - 1);
    }

    /// A wait for a change (fsync) that a newer change of its key replaced before it
    /// could land returns once that newer one is in the bucket, not when the older is
    /// dropped: until then the bucket holds neither.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wait_follows_the_change_that_replaced_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, q, area, _) = setup(dir.path());
        mem.set_unreachable(true);
        let older = q.upload("k", staged(&area, b"older"), 5).unwrap();
        q.start();
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.wait(older).await })
        };
        wait_until("a failed attempt", || {
            q.state
                .lock()
                .ops
                .get(&older)
                .is_some_and(|o| o.attempts > 0)
        })
        .await;
        let newer = q.upload("k", staged(&area, b"newer"), 5).unwrap();
        wait_until("the older change's drop", || {
            !q.state.lock().ops.contains_key(&older)
        })
        .await;
        finished(&q);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiter.is_finished(),
            "the wait returned while the bucket held neither change"
        );
        mem.set_unreachable(false);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the wait never returned")
            .unwrap()
            .unwrap();
        assert_eq!(mem.object("k").unwrap().as_ref(), b"newer");
        assert!(!q.state.lock().ops.contains_key(&newer));
    }

    /// What a mount would carry out again if the host lost power now, with `durable` bytes
    /// of the journal made durable: the changes it replays whose copies it still finds.
    fn replayed_after_power_cut(dir: &std::path::Path, durable: u64) -> Vec<String> {
        let copy = tempfile::tempdir().unwrap();
        let journal = std::fs::read(dir.join("journal")).unwrap();
        let durable = (durable as usize).min(journal.len());
        std::fs::write(copy.path().join("journal"), &journal[..durable]).unwrap();
        std::fs::create_dir(copy.path().join("pending")).unwrap();
        for entry in std::fs::read_dir(dir.join("pending")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(
                entry.path(),
                copy.path().join("pending").join(entry.file_name()),
            )
            .unwrap();
        }
        let (journal, replay) = Journal::open(copy.path()).unwrap();
        replay
            .pending
            .iter()
            .filter(|(seq, _)| journal.pending_path(*seq).exists())
            .map(|(_, change)| change.key().to_string())
            .collect()
    }

    /// A landed upload whose done record cannot be made durable keeps its copy: a power
    /// cut then replays the change with its data, rather than without it. The copy goes
    /// once the journal is rewritten without the change, even while done records still
    /// fail; after that nothing is replayed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_landed_copy_stays_while_its_done_record_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, q, area, _) = setup(dir.path());
        let seq = q.upload("k", staged(&area, b"data"), 4).unwrap();
        let durable = std::fs::metadata(dir.path().join("journal")).unwrap().len();
        let copy = q.journal.pending_path(seq);
        // Every fdatasync of an append fails from now on, and so does every rewrite.
        q.journal.fail_syncs(u32::MAX);
        let blocker = dir.path().join("journal.new");
        std::fs::create_dir(&blocker).unwrap();
        q.start();
        wait_until("the landing", || mem.object("k").is_some()).await;
        wait_until("the done record's attempt", || {
            !q.state.lock().finishing.contains(&seq)
        })
        .await;
        q.wait(seq).await.unwrap();
        // A retry or two of the done record, which fail too.
        tokio::time::sleep(DONE_RETRY + DONE_RETRY / 2).await;
        assert!(
            copy.exists(),
            "the copy went though its change is still journaled"
        );
        assert_eq!(q.unrecorded(), 1);
        assert_eq!(
            replayed_after_power_cut(dir.path(), durable),
            ["k"],
            "a power cut would replay the upload without its data"
        );
        // The next rewrite drops the change's record: then its copy goes.
        std::fs::remove_dir(&blocker).unwrap();
        wait_until("the copy's release after the rewrite", || !copy.exists()).await;
        assert_eq!(q.unrecorded(), 0);
        q.journal.fail_syncs(0);
        let durable = std::fs::metadata(dir.path().join("journal")).unwrap().len();
        assert!(replayed_after_power_cut(dir.path(), durable).is_empty());
    }

    /// A done record that failed is tried again, and once it is durable the copy goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_done_record_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mem, q, area, _) = setup(dir.path());
        let seq = q.upload("k", staged(&area, b"data"), 4).unwrap();
        let copy = q.journal.pending_path(seq);
        q.journal.fail_syncs(1);
        // No rewrite can drop the change's record meanwhile.
        let blocker = dir.path().join("journal.new");
        std::fs::create_dir(&blocker).unwrap();
        q.start();
        wait_until("the landing", || mem.object("k").is_some()).await;
        q.wait(seq).await.unwrap();
        assert!(copy.exists(), "the copy went though its done record failed");
        wait_until("the copy's release after the retry", || !copy.exists()).await;
        let durable = std::fs::metadata(dir.path().join("journal")).unwrap().len();
        assert!(replayed_after_power_cut(dir.path(), durable).is_empty());
        std::fs::remove_dir(&blocker).unwrap();
    }

    /// While files keep closing, a landing's done record is made durable by the fdatasync
    /// of a close's record: the journal syncs about once a close, not once a close and once
    /// a landing. And what landed is not carried out again after a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn landings_are_journaled_by_the_fdatasyncs_of_closes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mem, q, area, _) = setup(dir.path());
            q.start();
            let (before, closes) = (q.journal.syncs(), 300u64);
            for i in 0..closes {
                let seq = q
                    .upload(&format!("k{i}"), staged(&area, b"data"), 4)
                    .unwrap();
                // Each lands before the next close, as uploads of small files do.
                wait_until("the landing", || !q.state.lock().ops.contains_key(&seq)).await;
            }
            wait_until("every done record", || q.state.lock().finishing.is_empty()).await;
            let syncs = q.journal.syncs() - before;
            assert!(
                syncs < closes * 7 / 4,
                "{syncs} fdatasyncs for {closes} closes and their landings"
            );
            assert_eq!(mem.object("k7").unwrap().as_ref(), b"data");
        }
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert!(replay.pending.is_empty(), "{:?}", replay.pending);
    }

    #[test]
    fn the_journal_stays_small_while_the_queue_is_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let mut held = Vec::new();
        {
            let (_mem, q, area, _) = setup(dir.path());
            // Changes are due at once; the test carries them out in place of the workers.
            q.state.lock().hurry = true;
            q.upload("slow", staged(&area, b"abc"), 3).unwrap();
            let Next::One(seq, change, _) = q.next_op() else {
                panic!("the upload is due");
            };
            // In flight all along: the queue is never empty.
            held.push((seq, change));
            for i in 0..1000 {
                q.delete(&format!("gone/{i}")).unwrap();
                let Next::Deletes(batch) = q.next_op() else {
                    panic!("the delete is due");
                };
                if i % 100 == 0 {
                    held.extend(batch);
                } else {
                    q.landed_all(batch);
                    finished(&q);
                }
                assert!(std::fs::metadata(&journal).unwrap().len() <= Journal::COMPACT_AT);
            }
            assert_eq!(q.pending(), held.len());
            // Dropped with nothing drained, as if the process died.
        }
        let (_, replay) = Journal::open(dir.path()).unwrap();
        assert_eq!(replay.pending, held);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn journaled_changes_resume_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_mem, q, area, _) = setup(dir.path());
            q.upload("a/b", staged(&area, b"payload"), 7).unwrap();
            q.marker("a/").unwrap();
            q.marker("c/").unwrap();
            // Not started: as if the process died here.
            assert!(q.lookup("a/b").is_some());
        }
        let (mem, q, _area, _) = setup(dir.path());
        assert!(matches!(
            q.lookup("a/b"),
            Some(Pending::Upload { size: 7, .. })
        ));
        q.start();
        let left = q.drain(Duration::from_secs(10)).await;
        assert_eq!(left, 0);
        assert_eq!(mem.object("a/b").unwrap().as_ref(), b"payload");
        // The file makes directory a; the empty directory c needs its marker.
        assert_eq!(mem.object("a/"), None);
        assert_eq!(mem.object("c/").unwrap().len(), 0);
    }
}
