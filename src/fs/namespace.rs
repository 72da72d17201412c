//! The namespace: which names exist, as this mount knows them, and the one `lookup` that
//! answers from that knowledge or asks the bucket. It owns the inode table, the listings
//! (`listing.rs`, filled page by page or a subtree at a time, `subtree.rs`), the landings of
//! this mount's changes the write-back queue reports (`landings.rs`), and offline mode; it
//! asks the write-back queue what is pending. `BucketFs` keeps file handles and I/O and asks
//! the namespace what a name is.
//!
//! Consistency rules, in the order a lookup applies them:
//! 1. an inode validated within `--metadata-ttl`, or a file that exists only here, is as known;
//! 2. a fresh listing of the directory answers, unless a change of this mount landed after it
//!    began (a name this mount changed itself is as noted); a complete one answers "absent"
//!    for names it lacks; a name a lookup found missing is remembered for `--negative-ttl`;
//! 3. pending changes win over both: an upload or a marker makes the name exist, a delete
//!    makes a file absent;
//! 4. else one LIST of the key as a prefix decides, and fills the listings below it; while
//!    the store is unreachable, names not known locally read as absent. A directory whose
//!    lookups keep asking is listed whole in the background (`warm.rs`), so that rule 2
//!    answers its next ones.
//!
//! Lock order: a lock may be taken while holding the ones above it, never the other way.
//! 1. a directory handle's lock (`dir.rs`), a file's commit lock (`file.rs`; a rename takes
//!    those of both files, in the order of their places in `commit_locks`);
//! 2. `Namespace::table`;
//! 3. the write-back queue's state (pending changes);
//! 4. `ListingCache`, `Namespace::landings`, `offline_until`, the keys warned about,
//!    `Namespace::warm`, the journal's file (`cache/journal.rs`; the fdatasync closes share
//!    runs outside it), and the failures `fuse.rs` logged: leaves, under which nothing else
//!    is taken.
//!
//! No lock is held across an await but the commit lock (a tokio lock: writes hold it shared
//! while they find and change the local copy, commits, unlink and rename exclusively), and
//! no callback runs under a lock: the write-back queue
//! reports a landing before it takes its own lock, and the listing cache is handed the time
//! of the last landing instead of asking for it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use super::error::{FsError, FsResult};
use super::inode::{InodeTable, Kind, Remote, ROOT};
use super::landings::Landings;
use super::listing::{self, Answer, ListingCache};
use super::names::{self, KeyMap};
use super::warm::{Listed, Reach, WarmDirs};
use super::{dir, subtree};
use crate::store::{ObjectStore, StoreError};
use crate::writeback::{LandingObserver, Pending, WritebackQueue};

/// Which inode a listed entry handed to the kernel with its attributes stands for.
pub(super) enum ListedInode {
    /// This one, with the listing's attributes taken where they are the newest.
    Known(u64),
    /// The name went away since it was listed.
    Gone,
    /// Local or pending changes decide: ask `lookup`.
    Ask,
}

/// What pending changes say about a name.
enum PendingAnswer {
    Present(Remote),
    Deleted,
    Nothing,
}

/// What asking the bucket about a path told.
enum Asked {
    /// What the path is (a file, a directory), or nothing, as of the instant given: when
    /// the LIST that told went out.
    Known(Option<Remote>, Instant),
    /// The store did not answer: the mount is offline for a while.
    Offline,
}

/// Most names remembered from listings (about 160 bytes each) for the metadata TTL.
pub(super) const LISTED_NAMES: usize = 200_000;
/// Keys a lookup lists to tell whether a directory exists.
const DIR_PROBE: i32 = 10;
/// Most distinct keys warned about once.
const WARNED_CAPACITY: usize = 10_000;
/// How long lookups stop asking an unreachable store before trying it again.
const OFFLINE_GRACE: Duration = Duration::from_secs(5);
/// A directory listed this recently makes a listing of one of its subdirectories part of a
/// walk, which lists that subdirectory's whole subtree at once.
const WALK_WINDOW: Duration = Duration::from_secs(60);
/// Most keys a warm listing of a subtree, or names of a directory alone, may hold
/// (`warm.rs`): ten LISTs.
const WARM_NAMES: usize = 10_000;
/// Most warm listings under way at once.
const WARMING_AT_ONCE: usize = 4;

pub(super) struct Namespace {
    store: Arc<dyn ObjectStore>,
    pub(super) keys: KeyMap,
    /// `--metadata-ttl`.
    ttl: Duration,
    pub(super) mount_time: SystemTime,
    pub(super) table: Mutex<InodeTable>,
    pub(super) listing: ListingCache,
    writeback: Arc<WritebackQueue>,
    landings: Mutex<Landings>,
    /// Until when lookups answer from local knowledge because the store is unreachable.
    offline_until: Mutex<Option<Instant>>,
    warned: Mutex<HashSet<String>>,
    /// Directories whose lookups keep asking the bucket, listed whole in the background.
    warm: Mutex<WarmDirs>,
    /// Background listings under way.
    warming: AtomicUsize,
    /// This namespace, for the background listings it starts.
    me: Weak<Namespace>,
}

impl LandingObserver for Namespace {
    fn landed(&self, key: &str, creates: bool) {
        self.landings.lock().record(key, creates, Instant::now());
    }
}

impl Namespace {
    pub(super) fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        writeback: Arc<WritebackQueue>,
        ttl: Duration,
        negative_ttl: Duration,
    ) -> Arc<Self> {
        let mount_time = SystemTime::now();
        let ns = Arc::new_cyclic(|me| Namespace {
            store,
            keys: KeyMap::new(prefix),
            ttl,
            mount_time,
            table: Mutex::new(InodeTable::new(mount_time)),
            listing: ListingCache::new(ttl, negative_ttl, LISTED_NAMES),
            writeback: writeback.clone(),
            landings: Mutex::new(Landings::default()),
            offline_until: Mutex::new(None),
            warned: Mutex::new(HashSet::new()),
            warm: Mutex::new(WarmDirs::default()),
            warming: AtomicUsize::new(0),
            me: me.clone(),
        });
        let observer: Arc<dyn LandingObserver> = ns.clone();
        writeback.observe(Arc::downgrade(&observer));
        ns
    }

    /// When a change of this mount to `path` (as a file, or anything under it as a
    /// directory) last reached the bucket, if one did.
    fn changed_at(&self, path: &str) -> Option<Instant> {
        let dir = self.keys.dir_prefix(path);
        let landings = self.landings.lock();
        match self.keys.file_key(path) {
            Ok(file) => landings.newest(&[&file, &dir]),
            Err(_) => landings.newest(&[&dir]),
        }
    }

    /// What the listing of `dir` says of `name`, knowing what of this mount's landed since.
    pub(super) fn listed_answer(&self, dir: &str, name: &str, path: &str) -> Answer {
        let changed_at = self.changed_at(path);
        self.listing.lookup(dir, name, path, changed_at)
    }

    /// The inode for `name` in directory `dir`, listed as `remote` at `seen`, for readdirplus:
    /// a name this mount removed since is gone; one with a local copy or a pending change
    /// is answered by `lookup`; else the listing's attributes are taken unless the inode
    /// knows newer ones.
    pub(super) fn listed_inode(
        &self,
        dir: u64,
        name: &str,
        remote: &Remote,
        seen: Instant,
    ) -> ListedInode {
        let mut t = self.table.lock();
        let Some(dir_path) = t.get(dir).map(|i| i.path.clone()) else {
            return ListedInode::Gone;
        };
        let path = names::join(&dir_path, name);
        if let Some(ino) = t.child(dir, name) {
            let i = t.get_mut(ino).expect("child is live");
            if i.kind != remote.kind || i.is_local_only() {
                return ListedInode::Ask;
            }
            i.take_remote(remote, seen);
            return ListedInode::Known(ino);
        }
        if self.listing.removed_here(&dir_path, name) {
            return ListedInode::Gone;
        }
        let Ok(key) = self.keys.file_key(&path) else {
            return ListedInode::Gone;
        };
        match self.pending_changes(&key, &self.keys.dir_prefix(&path)) {
            (None, None, under) if under.is_empty() => {
                ListedInode::Known(t.upsert_remote(dir, name, path, remote, seen))
            }
            _ => ListedInode::Ask,
        }
    }

    /// The marker directory `dir` needs to stay once an entry of it went away, if nothing
    /// else keeps it: not the root, not a removed directory, not one whose listing shows
    /// other names.
    pub(super) fn marker_to_keep(&self, dir: u64) -> Option<String> {
        let path = {
            let t = self.table.lock();
            match t.get(dir) {
                Some(i) if dir != ROOT && !i.is_unlinked() => i.path.clone(),
                _ => return None,
            }
        };
        if self.listing.contents(&path).is_some_and(|c| c.any) {
            return None;
        }
        Some(self.keys.dir_prefix(&path))
    }

    /// Names remembered from directory listings.
    pub(super) fn listed_names(&self) -> usize {
        self.listing.len()
    }

    /// The inode of `name` in `parent`, if this mount knows it (no request is made).
    pub(super) fn child(&self, parent: u64, name: &std::ffi::OsStr) -> Option<u64> {
        let name = names::component(name).ok()?;
        let t = self.table.lock();
        t.child(parent, name)
            .filter(|ino| t.get(*ino).is_some_and(|i| !i.is_unlinked()))
    }

    /// Number of inodes currently held.
    pub(super) fn inode_count(&self) -> usize {
        self.table.lock().len()
    }

    /// Logs a problem with one key once per mount, however often it is met.
    pub(super) fn warn_once(&self, key: &str, what: &str) {
        let mut warned = self.warned.lock();
        if warned.len() < WARNED_CAPACITY && warned.insert(key.to_string()) {
            tracing::warn!(key, "{what}");
        }
    }

    /// The path of a directory inode, checking it is one.
    pub(super) fn dir_path(&self, ino: u64) -> FsResult<String> {
        let t = self.table.lock();
        let i = t.get(ino).ok_or(FsError::NOENT)?;
        if i.kind != Kind::Dir {
            return Err(FsError::NOTDIR);
        }
        if i.is_unlinked() {
            return Err(FsError::NOENT);
        }
        Ok(i.path.clone())
    }

    /// The names one LIST page by delimiter of directory `dir` (keys under `prefix`) shows,
    /// sorted, those `keep` refuses left out: keys that cannot be paths, and keys outside
    /// the prefix a hostile store may list, are logged once and skipped; of a file and a
    /// directory of the same name, the directory is kept.
    pub(super) fn names_in_page(
        &self,
        dir: &str,
        prefix: &str,
        page: &crate::store::ListPage,
        keep: impl Fn(&str, Kind) -> bool,
    ) -> Vec<(String, Remote)> {
        let mut found: Vec<(String, Remote)> = Vec::new();
        for o in &page.objects {
            let Some(name) = o.key.strip_prefix(prefix) else {
                self.warn_once(
                    &o.key,
                    "the store listed a key outside the directory asked for; it is skipped",
                );
                continue;
            };
            if name.is_empty() {
                continue; // the directory's own marker
            }
            if !names::listable(name) {
                self.warn_once(&o.key, "this key cannot be shown as a path and is skipped");
                continue;
            }
            found.push((name.to_string(), Remote::file(o)));
        }
        for p in &page.prefixes {
            let Some(name) = p.strip_prefix(prefix).and_then(|n| n.strip_suffix('/')) else {
                self.warn_once(
                    p,
                    "the store listed a prefix outside the directory asked for; it is skipped",
                );
                continue;
            };
            if !names::listable(name) {
                self.warn_once(
                    p,
                    "this key prefix cannot be shown as a directory and is skipped",
                );
                continue;
            }
            found.push((
                name.to_string(),
                Remote {
                    kind: Kind::Dir,
                    size: 0,
                    mtime: self.mount_time,
                    etag: None,
                },
            ));
        }
        found.retain(|(name, r)| keep(name, r.kind));
        // Objects and prefixes come in two sorted runs: merge them so `a` and `a/` meet, and
        // keep the directory of the two.
        found.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then((a.1.kind == Kind::File).cmp(&(b.1.kind == Kind::File)))
        });
        found.dedup_by(|file, listed_dir| {
            let clash = file.0 == listed_dir.0;
            if clash {
                let path = names::join(dir, &listed_dir.0);
                self.warn_once(
                    &path,
                    "both a file and a directory have this name; showing the directory",
                );
            }
            clash
        });
        found
    }

    /// What `path` is: the write-back queue's pending changes first, then the bucket. One
    /// flat LIST of the key as a prefix answers both questions: the key itself is the file,
    /// keys under `path/` make it a directory, and those keys (up to a page) fill the
    /// listings of the directories under it, so a walk that goes on below costs nothing more.
    async fn ask_bucket(&self, path: &str) -> FsResult<Asked> {
        let key = self.keys.file_key(path)?;
        let dir_prefix = self.keys.dir_prefix(path);
        let (pending, file_pending, under) = self.pending_changes(&key, &dir_prefix);
        if pending.is_some() {
            return Ok(Asked::Known(pending, Instant::now()));
        }
        let deleted: HashSet<String> = under.into_iter().map(|(k, _)| k).collect();
        let file_deleted = matches!(file_pending, Some(Pending::Delete));
        self.warm_asked(names::split(path).0);
        let (id, began) = self.listing.begin();
        let page = match self.store.list(&key, true, None, Some(dir::PAGE)).await {
            Err(e @ StoreError::Unreachable(_)) => {
                self.go_offline(&e);
                return Ok(Asked::Offline);
            }
            other => other.map_err(|e| FsError::store("LIST", &key, e))?,
        };
        let file = page
            .objects
            .iter()
            .find(|o| o.key == key && !file_deleted)
            .cloned();
        let below: Vec<&crate::store::ObjectMeta> = page
            .objects
            .iter()
            .filter(|o| o.key.starts_with(&dir_prefix))
            .collect();
        // Keys are sorted: past the last key under `path/`, every directory below is whole.
        let whole = page.next_token.is_none()
            || page
                .objects
                .last()
                .is_some_and(|o| o.key > dir_prefix && !o.key.starts_with(&dir_prefix));
        let mut tree = subtree::Subtree::new(path, &dir_prefix, self.mount_time);
        tree.feed(below.iter().copied());
        if whole {
            tree.finish();
        }
        self.record_subtree(&mut tree, &dir_prefix, id, began, &deleted);
        let mut is_dir = below.iter().any(|o| !deleted.contains(&o.key));
        let mut marker = below
            .first()
            .filter(|o| o.key == dir_prefix)
            .map(|o| o.last_modified);
        if !is_dir && !whole {
            if below.is_empty() {
                // A page of keys that sort before `path/` (`path.jpg`, ...): ask about the
                // directory alone.
                let probe = self
                    .store
                    .list(&dir_prefix, true, None, Some(DIR_PROBE))
                    .await
                    .map_err(|e| FsError::store("LIST", &dir_prefix, e))?;
                is_dir = probe.objects.iter().any(|o| !deleted.contains(&o.key))
                    || (probe.next_token.is_some() && !probe.objects.is_empty());
                marker = probe
                    .objects
                    .first()
                    .filter(|o| o.key == dir_prefix)
                    .map(|o| o.last_modified);
            } else {
                // Every key seen is being deleted, but more may follow.
                is_dir = true;
            }
        }
        let dir = Remote {
            kind: Kind::Dir,
            size: 0,
            // A marker object's date is the directory's; an implied directory shows the mount's.
            mtime: marker.unwrap_or(self.mount_time),
            etag: None,
        };
        let remote = match file {
            Some(_) if is_dir => {
                self.warn_once(
                    &key,
                    "both a file and a directory have this name; showing the directory",
                );
                Some(dir)
            }
            Some(meta) => Some(Remote::file(&meta)),
            None if is_dir => Some(dir),
            None => None,
        };
        Ok(Asked::Known(remote, began))
    }

    /// Records the listings a flat LIST of `prefix` completed, and logs the keys it could not
    /// show. Names being deleted are left out, as a listing page by page leaves them out.
    fn record_subtree(
        &self,
        tree: &mut subtree::Subtree,
        prefix: &str,
        id: listing::ListingId,
        began: Instant,
        deleted_before: &HashSet<String>,
    ) {
        for key in tree.take_skipped() {
            self.warn_once(&key, "this key cannot be shown as a path and is skipped");
        }
        let complete = tree.take_complete();
        if !tree.exists() || complete.is_empty() {
            return;
        }
        // Deletes pending when the LIST was sent (one may have landed while it ran, after
        // the LIST saw its key) and those pending now.
        let mut deleted = self.pending_deletes(prefix);
        deleted.extend(deleted_before.iter().cloned());
        for (dir, names) in complete {
            let names = self.as_recorded(names, &self.keys.dir_prefix(&dir), &deleted, began);
            self.listing.record(&dir, id, began, names);
        }
    }

    /// Whether a change of this mount to `name` (of `kind`) listed under `prefix` reached
    /// the bucket at or after `since`, while a listing begun then ran: the listing may show
    /// it as it was before (a file deleted meanwhile still there), so it is left out of
    /// what is recorded, and lookups ask (`changed_at` makes them).
    pub(super) fn landed_since(
        &self,
        prefix: &str,
        name: &str,
        kind: Kind,
        since: Instant,
    ) -> bool {
        let slash = if kind == Kind::Dir { "/" } else { "" };
        self.landings
            .lock()
            .since(&format!("{prefix}{name}{slash}"), since)
    }

    /// `names`, listed under `prefix` by a listing begun at `began`, without those among
    /// the `deleted` keys and those this mount changed while it ran.
    fn as_recorded(
        &self,
        mut names: Vec<(String, Remote)>,
        prefix: &str,
        deleted: &HashSet<String>,
        began: Instant,
    ) -> Vec<(String, Remote)> {
        names.retain(|(name, r)| {
            !is_deleted(deleted, prefix, name, r.kind)
                && !self.landed_since(prefix, name, r.kind, began)
        });
        names
    }

    /// Keys under `prefix` being deleted.
    fn pending_deletes(&self, prefix: &str) -> HashSet<String> {
        self.writeback
            .under(prefix)
            .into_iter()
            .filter(|(_, p)| matches!(p, Pending::Delete))
            .map(|(k, _)| k)
            .collect()
    }

    /// What the write-back queue alone says `key` (a file) or `dir_prefix` (a directory)
    /// is; also returns the pending changes it looked at, for `ask_bucket`.
    fn pending_changes(
        &self,
        key: &str,
        dir_prefix: &str,
    ) -> (Option<Remote>, Option<Pending>, Vec<(String, Pending)>) {
        let file_pending = self.writeback.lookup(key);
        if let Some(Pending::Upload { size, .. }) = &file_pending {
            let r = Remote {
                kind: Kind::File,
                size: *size,
                mtime: SystemTime::now(),
                etag: None,
            };
            return (Some(r), file_pending, Vec::new());
        }
        let under = self.writeback.under(dir_prefix);
        if under.iter().any(|(_, p)| !matches!(p, Pending::Delete)) {
            let r = Remote {
                kind: Kind::Dir,
                size: 0,
                mtime: self.mount_time,
                etag: None,
            };
            return (Some(r), file_pending, under);
        }
        (None, file_pending, under)
    }

    pub(super) fn is_offline(&self) -> bool {
        self.offline_until
            .lock()
            .is_some_and(|t| Instant::now() < t)
    }

    /// The store did not answer: for a while, lookups answer from what is known locally
    /// (names not known locally read as absent), while uploads keep retrying.
    pub(super) fn go_offline(&self, e: &StoreError) {
        let mut until = self.offline_until.lock();
        if until.is_none_or(|t| Instant::now() >= t) {
            tracing::warn!(error = %e, grace_s = OFFLINE_GRACE.as_secs(),
                "the object store is unreachable; lookups answer from local knowledge and writes are kept locally until it is back");
        }
        *until = Some(Instant::now() + OFFLINE_GRACE);
    }

    /// The one lookup: what `name` in directory `parent` is, from the inode table, a fresh
    /// listing and the pending changes when they can tell, else from the bucket (one LIST).
    /// Returns its inode, creating one when needed; takes no kernel reference.
    pub(super) async fn lookup(&self, parent: u64, name: &str) -> FsResult<Option<u64>> {
        let dir = self.dir_path(parent)?;
        let path = names::join(&dir, name);
        self.keys.file_key(&path)?;
        let ttl = self.ttl;
        {
            let t = self.table.lock();
            if let Some(ino) = t.child(parent, name) {
                let i = t.get(ino).expect("child is live");
                if i.is_fresh(ttl) || i.open > 0 && i.is_local_only() {
                    return Ok(Some(ino));
                }
            }
        }
        let answer = self.listed_answer(&dir, name, &path);
        match &answer {
            Answer::Present(r, _) => self.warm_answered(&dir, r.kind == Kind::File),
            Answer::Absent => self.warm_answered(&dir, true),
            Answer::Unknown => {}
        }
        match answer {
            Answer::Present(remote, at) => {
                let mut t = self.table.lock();
                return Ok(match self.pending_answer(&path)? {
                    PendingAnswer::Present(r) => {
                        Some(t.upsert_remote(parent, name, path, &r, Instant::now()))
                    }
                    PendingAnswer::Deleted if remote.kind == Kind::File => {
                        self.absent(&mut t, parent, name)
                    }
                    _ => Some(t.upsert_remote(parent, name, path, &remote, at)),
                });
            }
            Answer::Absent => {
                return self.answer_locally(&mut self.table.lock(), parent, name, path, true)
            }
            Answer::Unknown => {}
        }
        let asked = if self.is_offline() {
            Asked::Offline
        } else {
            self.ask_bucket(&path).await?
        };
        let remote = match asked {
            Asked::Offline => {
                return self.answer_locally(&mut self.table.lock(), parent, name, path, false)
            }
            Asked::Known(remote, asked) => {
                // What the bucket just said is newer than a listing of the directory that
                // began before it was asked.
                self.listing.saw(&dir, name, remote.as_ref(), asked);
                remote
            }
        };
        let mut t = self.table.lock();
        // A local file created while the bucket was asked wins over the bucket's answer.
        if let Some(ino) = t.child(parent, name) {
            let i = t.get(ino).expect("child is live");
            if i.is_local_only() {
                return Ok(Some(ino));
            }
        }
        match remote {
            Some(r) => Ok(Some(t.upsert_remote(
                parent,
                name,
                path,
                &r,
                Instant::now(),
            ))),
            None => {
                self.listing.note_absent(&path);
                Ok(self.absent(&mut t, parent, name))
            }
        }
    }

    /// `parent/name` does not exist in the bucket: forgets what the table knew of it.
    fn absent(&self, t: &mut InodeTable, parent: u64, name: &str) -> Option<u64> {
        if let Some(ino) = t.child(parent, name) {
            t.detach(ino);
        }
        None
    }

    /// What the write-back queue says about `path`, for answers taken from a listing.
    fn pending_answer(&self, path: &str) -> FsResult<PendingAnswer> {
        let key = self.keys.file_key(path)?;
        Ok(
            match self.pending_changes(&key, &self.keys.dir_prefix(path)) {
                (Some(r), _, _) => PendingAnswer::Present(r),
                (None, Some(Pending::Delete), _) => PendingAnswer::Deleted,
                _ => PendingAnswer::Nothing,
            },
        )
    }

    /// Answers for `name` without asking the bucket: pending changes answer, and names that exist
    /// only locally stay. Other names the table knows stay too, unless `bucket_lacks_it`
    /// (a fresh complete listing says so); anything else reads as absent.
    fn answer_locally(
        &self,
        t: &mut InodeTable,
        parent: u64,
        name: &str,
        path: String,
        bucket_lacks_it: bool,
    ) -> FsResult<Option<u64>> {
        if let PendingAnswer::Present(r) = self.pending_answer(&path)? {
            return Ok(Some(t.upsert_remote(
                parent,
                name,
                path,
                &r,
                Instant::now(),
            )));
        }
        let Some(ino) = t.child(parent, name) else {
            return Ok(None);
        };
        let i = t.get(ino).expect("child is live");
        if bucket_lacks_it && !i.is_local_only() {
            return Ok(self.absent(t, parent, name));
        }
        Ok(Some(ino))
    }

    /// Records in the listing of its directory that this mount made `path` what `remote` says.
    pub(super) fn note_present(&self, path: &str, remote: &Remote) {
        let (dir, name) = names::split(path);
        self.listing.note_present(dir, name, path, remote);
    }

    /// Whether nothing but its own marker lies under directory `path`, counting changes
    /// still in the write-back queue: from a fresh complete listing when there is one (and
    /// nothing this mount added under it landed since), else from the bucket.
    pub(super) async fn dir_is_empty(&self, path: &str) -> FsResult<bool> {
        let marker = &self.keys.dir_prefix(path);
        let mut deleted = HashSet::new();
        for (key, p) in self.writeback.under(marker) {
            match p {
                Pending::Delete => {
                    deleted.insert(key);
                }
                _ if key == *marker => {}
                _ => return Ok(false),
            }
        }
        if let Some(c) = self.listing.contents(path) {
            if c.complete && !self.landings.lock().since(marker, c.at) {
                return Ok(!c.any);
            }
        }
        let mut token = None;
        loop {
            let page = self
                .store
                .list(marker, true, token, Some(100))
                .await
                .map_err(|e| FsError::store("LIST", marker, e))?;
            if page
                .objects
                .iter()
                .any(|o| o.key != *marker && !deleted.contains(&o.key))
            {
                return Ok(false);
            }
            token = page.next_token;
            if token.is_none() {
                return Ok(true);
            }
        }
    }

    /// The complete listing of `dir`, when it is fresh or a walk makes it worth fetching
    /// with the directories below it; None when the directory is to be listed page by page.
    pub(super) async fn listed(
        &self,
        dir: &str,
    ) -> FsResult<Option<(Vec<(String, Remote)>, Instant)>> {
        if let Some(found) = self.trusted_listing(dir) {
            return Ok(Some(found));
        }
        if dir.is_empty() || self.ttl.is_zero() {
            return Ok(None);
        }
        // A walk: the parent was listed a moment ago, so its other subdirectories follow.
        let (parent, _) = names::split(dir);
        if !self.listing.listed_within(parent, WALK_WINDOW) {
            return Ok(None);
        }
        if !self.list_subtree(dir, LISTED_NAMES / 4).await?.1 {
            return Ok(None);
        }
        Ok(self.trusted_listing(dir))
    }

    /// The fresh complete listing of `dir`, unless a change this mount made under it
    /// reached the bucket after the listing began (the listing may lack it).
    fn trusted_listing(&self, dir: &str) -> Option<(Vec<(String, Remote)>, Instant)> {
        let (names, at) = self.listing.complete(dir)?;
        let prefix = self.keys.dir_prefix(dir);
        (!self.landings.lock().since(&prefix, at)).then_some((names, at))
    }

    /// One page of a LIST of `prefix`: flat when `recursive`, else by delimiter.
    pub(super) async fn list_page(
        &self,
        prefix: &str,
        recursive: bool,
        token: Option<String>,
    ) -> FsResult<crate::store::ListPage> {
        self.store
            .list(prefix, recursive, token, Some(dir::PAGE))
            .await
            .map_err(|e| FsError::store("LIST", prefix, e))
    }

    /// Lists `dir` and everything below it with flat LISTs, recording the listing of every
    /// directory whose keys have all been seen. Returns the LISTs it took, and whether it
    /// reached the end: it gives up once it has seen `max_keys` keys and more follow; the
    /// directories completed by then stay recorded.
    async fn list_subtree(&self, dir: &str, max_keys: usize) -> FsResult<(u32, bool)> {
        let prefix = self.keys.dir_prefix(dir);
        let deleted_before = self.pending_deletes(&prefix);
        let (id, began) = self.listing.begin();
        let mut tree = subtree::Subtree::new(dir, &prefix, self.mount_time);
        let mut token = None;
        let mut keys = 0;
        let mut lists = 0;
        loop {
            let page = self.list_page(&prefix, true, token).await?;
            lists += 1;
            keys += page.objects.len();
            tree.feed(&page.objects);
            token = page.next_token;
            if token.is_none() {
                tree.finish();
            }
            self.record_subtree(&mut tree, &prefix, id, began, &deleted_before);
            if token.is_none() {
                return Ok((lists, true));
            }
            if keys >= max_keys {
                return Ok((lists, false));
            }
        }
    }

    /// Lists directory `dir` alone to its end with LISTs by delimiter and records it, unless
    /// more pages follow once `max_names` names were seen; returns the LISTs it took.
    async fn list_directory(&self, dir: &str, max_names: usize) -> FsResult<Option<u32>> {
        let prefix = self.keys.dir_prefix(dir);
        let deleted_before = self.pending_deletes(&prefix);
        let (id, began) = self.listing.begin();
        let mut names = Vec::new();
        let mut token = None;
        let mut lists = 0;
        loop {
            let page = self.list_page(&prefix, false, token).await?;
            lists += 1;
            let kept = |name: &str, kind| !is_deleted(&deleted_before, &prefix, name, kind);
            names.extend(self.names_in_page(dir, &prefix, &page, kept));
            token = page.next_token;
            if token.is_none() {
                break;
            }
            if names.len() >= max_names {
                return Ok(None);
            }
        }
        let names = self.as_recorded(names, &prefix, &self.pending_deletes(&prefix), began);
        self.listing.record(dir, id, began, names);
        Ok(Some(lists))
    }

    /// A lookup in `dir` is about to ask the bucket: starts listing `dir` whole in the
    /// background when its lookups keep asking (`warm.rs`).
    fn warm_asked(&self, dir: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let reach = self.warm.lock().asked(dir, self.ttl, Instant::now());
        if let Some(reach) = reach {
            self.list_whole(dir.to_string(), reach);
        }
    }

    /// A lookup in `dir` was answered from a listing (`spared`: a file or a missing name):
    /// makes the warm listing that answered again in the background when it is due
    /// (`warm.rs`).
    fn warm_answered(&self, dir: &str, spared: bool) {
        if self.ttl.is_zero() {
            return;
        }
        let due = self
            .warm
            .lock()
            .answered(dir, spared, self.ttl, Instant::now());
        if let Some((dir, reach)) = due {
            self.list_whole(dir, reach);
        }
    }

    /// Lists `dir` whole in the background, its subtree or itself alone as `reach` says
    /// (the subtree first, the directory alone when the subtree is too large), and tells
    /// `warm` how it went.
    fn list_whole(&self, dir: String, reach: Reach) {
        let runtime = tokio::runtime::Handle::try_current();
        let room = self.warming.fetch_add(1, Ordering::SeqCst) < WARMING_AT_ONCE;
        let (Some(ns), Ok(rt), true) = (self.me.upgrade(), runtime, room) else {
            self.warming.fetch_sub(1, Ordering::SeqCst);
            self.warm.lock().listed(&dir, Listed::Failed);
            return;
        };
        rt.spawn(async move {
            // Tells `warm` how it went, and gives its place back, however the task ends.
            let mut warming = Warming {
                ns,
                dir,
                listed: Listed::Failed,
            };
            let (ns, dir) = (&warming.ns, &warming.dir);
            let began = Instant::now();
            let listed = async {
                // LISTs spent on a subtree found too large count as this listing's.
                let mut spent = 0;
                if reach == Reach::Subtree {
                    let (lists, whole) = ns.list_subtree(dir, WARM_NAMES).await?;
                    if whole {
                        return Ok(Listed::Whole { began, lists, reach });
                    }
                    spent = lists;
                }
                Ok::<_, FsError>(match ns.list_directory(dir, WARM_NAMES).await? {
                    Some(lists) => Listed::Whole {
                        began,
                        lists: spent + lists,
                        reach: Reach::Directory,
                    },
                    None => Listed::TooLarge { began },
                })
            }
            .await;
            warming.listed = listed.unwrap_or_else(|e| {
                tracing::debug!(dir = %warming.dir, error = %e, "a warm listing failed; lookups ask one name at a time");
                Listed::Failed
            });
        });
    }
}

/// A warm listing under way: when it ends, `warm` learns how, and its place is free.
struct Warming {
    ns: Arc<Namespace>,
    dir: String,
    listed: Listed,
}

impl Drop for Warming {
    fn drop(&mut self) {
        self.ns.warm.lock().listed(&self.dir, self.listed);
        self.ns.warming.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether `name` (of `kind`) listed under `prefix` is among the `deleted` keys: a file's
/// key, or a directory's marker.
fn is_deleted(deleted: &HashSet<String>, prefix: &str, name: &str, kind: Kind) -> bool {
    let slash = if kind == Kind::Dir { "/" } else { "" };
    deleted.contains(&format!("{prefix}{name}{slash}"))
}
