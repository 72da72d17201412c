//! Directory handles and listing. A directory whose complete listing is fresh is answered
//! from it with no request. During a walk (the parent was just listed), a directory is listed
//! with its whole subtree by flat LISTs (`subtree.rs`), so the directories below it are
//! answered from memory too. Otherwise one delimited LIST per page of entries is streamed to
//! the kernel (a handle holds one page, however large the directory). Entries are merged
//! with files that exist only locally so far and with pending changes, and recorded in the
//! listing cache for the lookups that follow.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::error::{FsError, FsResult};
use super::inode::{Kind, Remote};
use super::listing::ListingId;
use super::namespace::ListedInode;
use super::{names, Attr, BucketFs};
use crate::writeback::Pending;

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    /// Position of the entry after this one, to resume the listing from.
    pub next_offset: u64,
    pub kind: Kind,
    pub name: String,
    /// What the listing said of the entry, and when: an entry from a local or pending
    /// change has none (the namespace answers for it).
    pub(crate) listed: Option<(Remote, Instant)>,
}

struct OpenDir {
    ino: u64,
    path: String,
    /// Entries from position `base` on that the kernel has not consumed yet.
    entries: VecDeque<DirEntry>,
    base: u64,
    /// Positions handed out so far.
    count: u64,
    /// Hashes of the names listed so far, so that no name is listed twice.
    seen: HashSet<u64>,
    /// Names whose objects are being deleted (directories with a trailing `/`).
    deleted: HashSet<String>,
    token: Option<String>,
    started: bool,
    done: bool,
    /// The listing being recorded for later lookups, and when it began.
    recording: Option<(ListingId, Instant)>,
}

impl OpenDir {
    fn new(ino: u64, path: String) -> Self {
        OpenDir {
            ino,
            path,
            entries: VecDeque::new(),
            base: 0,
            count: 0,
            seen: HashSet::new(),
            deleted: HashSet::new(),
            token: None,
            started: false,
            done: false,
            recording: None,
        }
    }

    /// Forgets entries before position `offset`, which the kernel has consumed.
    fn consume_to(&mut self, offset: u64) {
        while self.base < offset && self.entries.pop_front().is_some() {
            self.base += 1;
        }
    }

    /// Whether `name` (of `kind`) is being deleted by this mount, and so not to be listed.
    fn is_deleted(&self, name: &str, kind: Kind) -> bool {
        match kind {
            Kind::File => self.deleted.contains(name),
            Kind::Dir => self.deleted.contains(&format!("{name}/")),
        }
    }

    /// Whether the name was listed already; marks it listed.
    fn first_time(&mut self, name: &str) -> bool {
        self.seen.insert(name_hash(name))
    }
}

fn name_hash(name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

#[derive(Default)]
pub(super) struct DirHandles {
    map: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<OpenDir>>>>,
    next: AtomicU64,
}

/// Entries per LIST request.
pub(super) const PAGE: i32 = 1000;

/// An inode number for a listed name the kernel has not looked up: stable for the path,
/// and never equal to one the inode table hands out (those count up from 1).
fn listing_ino(path: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    h.finish() | (1 << 63)
}

impl BucketFs {
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let path = self.ns.dir_path(ino)?;
        let fh = self.dirs.next.fetch_add(1, Ordering::Relaxed) + 1;
        let dir = OpenDir::new(ino, path);
        self.dirs
            .map
            .lock()
            .insert(fh, Arc::new(tokio::sync::Mutex::new(dir)));
        Ok(fh)
    }

    /// `fsync` on a directory: returns once every change made under it is in the bucket.
    pub async fn fsyncdir(&self, ino: u64) -> FsResult<()> {
        let prefix = self.ns.keys.dir_prefix(&self.ns.dir_path(ino)?);
        self.writeback.settle_under(&prefix).await.map_err(|e| {
            FsError::from(e.0).context(format!(
                "changes under {prefix} are not in the bucket yet; they stay queued"
            ))
        })
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.map.lock().remove(&fh);
    }

    /// Entries from position `offset` on (0 is the start), fetching more pages as needed.
    /// An empty result means the end of the directory. Going back to a position already
    /// consumed (`rewinddir`) lists the directory again.
    pub async fn readdir(&self, fh: u64, offset: u64, max: usize) -> FsResult<Vec<DirEntry>> {
        Ok(self.entries(fh, offset, max).await?.1)
    }

    /// Entries from position `offset` on with their attributes, each holding a kernel
    /// reference as a lookup would (`.` and `..` aside: the kernel takes none for them).
    /// Attributes come from the listing, so `ls -l`, `find` and `du` after a listing ask
    /// nothing more, however many entries. An entry that went away meanwhile is left out.
    pub async fn readdirplus(
        &self,
        fh: u64,
        offset: u64,
        max: usize,
    ) -> FsResult<Vec<(DirEntry, Attr)>> {
        let (dir, entries) = self.entries(fh, offset, max).await?;
        let mut out: Vec<(DirEntry, Attr)> = Vec::with_capacity(entries.len());
        for mut e in entries {
            let attr = match self.entry_attr(dir, &e).await {
                Ok(Some(a)) => a,
                Ok(None) => continue,
                Err(err) => {
                    // The references taken so far are not handed to the kernel.
                    self.release_entries(&out);
                    return Err(err);
                }
            };
            e.ino = attr.ino;
            out.push((e, attr));
        }
        Ok(out)
    }

    /// Gives back the kernel references `readdirplus` took for `entries`, which are not
    /// handed to the kernel after all (`.` and `..` hold none).
    pub fn release_entries(&self, entries: &[(DirEntry, Attr)]) {
        for (e, a) in entries {
            if e.name != "." && e.name != ".." {
                self.forget(a.ino, 1);
            }
        }
    }

    /// The attributes of one entry of directory `dir` for readdirplus, with a kernel
    /// reference taken (none for `.` and `..`); None when the name went away meanwhile.
    async fn entry_attr(&self, dir: u64, e: &DirEntry) -> FsResult<Option<Attr>> {
        if e.name == "." || e.name == ".." {
            return Ok(Some(match self.attr(e.ino) {
                Ok(a) => a,
                Err(_) => self.attr(dir)?,
            }));
        }
        if let Some((remote, seen)) = &e.listed {
            match self.ns.listed_inode(dir, &e.name, remote, *seen) {
                ListedInode::Known(ino) => return Ok(self.remember(ino).ok()),
                ListedInode::Gone => return Ok(None),
                ListedInode::Ask => {}
            }
        }
        match self.lookup(dir, std::ffi::OsStr::new(&e.name)).await {
            Ok(a) => Ok(Some(a)),
            Err(e) if e.is(libc::ENOENT) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The directory a handle lists, and its entries from position `offset` on.
    async fn entries(&self, fh: u64, offset: u64, max: usize) -> FsResult<(u64, Vec<DirEntry>)> {
        let dir = self
            .dirs
            .map
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BADF)?;
        let mut d = dir.lock().await;
        if !d.started || offset < d.base {
            let (ino, path) = (d.ino, std::mem::take(&mut d.path));
            *d = OpenDir::new(ino, path);
            self.start_listing(&mut d).await?;
        }
        let want = offset + max.max(1) as u64;
        d.consume_to(offset);
        while d.base + (d.entries.len() as u64) < want && !d.done {
            self.next_page(&mut d).await?;
            d.consume_to(offset);
        }
        Ok((d.ino, d.entries.iter().take(max).cloned().collect()))
    }

    async fn start_listing(&self, d: &mut OpenDir) -> FsResult<()> {
        d.started = true;
        let parent = {
            let t = self.ns.table.lock();
            t.get(d.ino).map(|i| i.parent).unwrap_or(d.ino)
        };
        push(d, ".", d.ino, Kind::Dir);
        push(d, "..", parent, Kind::Dir);
        // Files created here and not committed yet are listed though the bucket lacks them.
        let local = self.ns.table.lock().local_children(d.ino);
        for (name, ino, kind) in local {
            if d.first_time(&name) {
                push(d, &name, ino, kind);
            }
        }
        // So are changes still waiting in the write-back queue; deletions hide names.
        let prefix = self.ns.keys.dir_prefix(&d.path);
        let mut pending = self.writeback.under(&prefix);
        pending.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, p) in pending {
            let rest = &key[prefix.len()..];
            let (name, kind) = match rest.find('/') {
                Some(0) => continue,
                Some(i) => (&rest[..i], Kind::Dir),
                None if rest.is_empty() => continue,
                None => (rest, Kind::File),
            };
            if !names::listable(name) {
                continue;
            }
            if matches!(p, Pending::Delete) {
                // A file being deleted; or a directory whose marker is, which rmdir found
                // empty (anything added since is a pending change of its own, listed here).
                if kind == Kind::File || rest.len() == name.len() + 1 {
                    d.deleted.insert(if kind == Kind::File {
                        name.to_string()
                    } else {
                        format!("{name}/")
                    });
                }
                continue;
            }
            if d.first_time(name) {
                let path = names::join(&d.path, name);
                let ino = self
                    .ns
                    .table
                    .lock()
                    .child(d.ino, name)
                    .unwrap_or_else(|| listing_ino(&path));
                push(d, name, ino, kind);
            }
        }
        if let Some((names, at)) = self.ns.listed(&d.path).await? {
            self.push_found(d, names, at);
            d.done = true;
        }
        Ok(())
    }

    async fn next_page(&self, d: &mut OpenDir) -> FsResult<()> {
        let prefix = self.ns.keys.dir_prefix(&d.path);
        let (id, began) = *d.recording.get_or_insert_with(|| self.ns.listing.begin());
        let first_page = d.token.is_none();
        let page = self.ns.list_page(&prefix, false, d.token.take()).await?;
        d.token = page.next_token.clone();
        d.done = d.token.is_none();
        // Names being deleted are neither recorded nor listed; names this mount changed
        // while the listing ran are listed (a file deleted meanwhile, as a readdir racing an
        // unlink may) but not recorded, so lookups ask about them.
        let found = self
            .ns
            .names_in_page(&d.path, &prefix, &page, |name, kind| {
                !d.is_deleted(name, kind)
            });
        let recorded: Vec<(String, Remote)> = found
            .iter()
            .filter(|(name, r)| !self.ns.landed_since(&prefix, name, r.kind, began))
            .cloned()
            .collect();
        if first_page {
            self.ns.listing.add_page(&d.path, id, began, recorded);
        } else {
            self.ns.listing.add_later_page(&d.path, id, began, recorded);
        }
        if d.done {
            self.ns.listing.finish(&d.path, id);
        }
        self.push_found(d, found, began);
        Ok(())
    }

    /// Hands the kernel what the bucket holds in the directory, seen at `seen`: names not
    /// listed yet and not being deleted; attributes go to the inodes the kernel holds.
    fn push_found(&self, d: &mut OpenDir, found: Vec<(String, Remote)>, seen: Instant) {
        let mut t = self.ns.table.lock();
        for (name, remote) in found {
            if d.is_deleted(&name, remote.kind) {
                continue;
            }
            let path = names::join(&d.path, &name);
            if !d.first_time(&name) {
                // Listed already (a local or pending entry, or `a` before `a/`). When the
                // bucket has a directory where the mount knew a file, the directory wins.
                if remote.kind == Kind::Dir {
                    if let Some(ino) = t.child(d.ino, &name) {
                        if t.get(ino)
                            .is_some_and(|i| i.kind == Kind::File && i.copy().is_none())
                        {
                            self.ns.warn_once(
                                &path,
                                "both a file and a directory have this name; showing the directory",
                            );
                            t.detach(ino);
                        }
                    }
                }
                continue;
            }
            let ino = match t.child(d.ino, &name) {
                Some(ino) => {
                    let i = t.get(ino).expect("live");
                    if i.copy().is_none() && i.kind == remote.kind {
                        t.upsert_remote(d.ino, &name, path.clone(), &remote, seen);
                    }
                    ino
                }
                None => listing_ino(&path),
            };
            push_listed(d, &name, ino, remote.kind, Some((remote, seen)));
        }
    }
}

fn push(d: &mut OpenDir, name: &str, ino: u64, kind: Kind) {
    push_listed(d, name, ino, kind, None);
}

fn push_listed(
    d: &mut OpenDir,
    name: &str,
    ino: u64,
    kind: Kind,
    listed: Option<(Remote, Instant)>,
) {
    d.count += 1;
    d.entries.push_back(DirEntry {
        ino,
        next_offset: d.count,
        kind,
        name: name.to_string(),
        listed,
    });
}
