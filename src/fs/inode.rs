//! The inode table: every file and directory the kernel currently knows, by inode number
//! and by (parent, name), with the attributes last seen and the local state of files
//! being written.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::cache::StagedFile;
use crate::store::{ETag, ObjectMeta};

pub const ROOT: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// What the bucket says about a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: Option<ETag>,
}

impl Remote {
    /// A file, as the store described its object.
    pub fn file(o: &ObjectMeta) -> Remote {
        Remote {
            kind: Kind::File,
            size: o.size,
            mtime: o.last_modified,
            etag: o.etag.clone(),
        }
    }
}

/// Where the truth about an inode lives. Directories are always `Remote` (a directory made
/// here has its marker queued at once) or `Unlinked`.
#[derive(Debug, Clone)]
pub enum State {
    /// The bucket holds it, or a queued change will put it there; no local copy is kept.
    Remote,
    /// Written here and not committed yet: the name exists only on this host.
    LocalOnly { copy: Arc<StagedFile> },
    /// A local copy with changes not committed yet, over an object the bucket holds (or a
    /// queued upload will give it).
    Dirty { copy: Arc<StagedFile> },
    /// Written here and not committed yet, under a name a rename gave it over another file:
    /// the bucket holds that file's object under this name until this file's first commit
    /// replaces it, or an unlink or another rename deletes it.
    OverReplaced { copy: Arc<StagedFile> },
    /// A local copy with nothing left to commit, kept while handles are open.
    Clean { copy: Arc<StagedFile> },
    /// Removed from its directory, alive only through open handles and kernel references;
    /// the local copy, if any, serves their reads and is never uploaded.
    Unlinked { copy: Option<Arc<StagedFile>> },
}

#[derive(Debug)]
pub struct Inode {
    pub ino: u64,
    pub parent: u64,
    pub name: String,
    /// Path relative to the mount root ("" for the root).
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: Option<ETag>,
    /// When the attributes were last confirmed by the bucket (or made here); None when
    /// they must be asked for again.
    pub validated: Option<Instant>,
    /// References the kernel holds (lookups minus forgets).
    pub lookups: u64,
    /// Open file handles.
    pub open: u32,
    /// Local copy, commit state and presence in the bucket; changed only through the
    /// methods below.
    state: State,
    /// Bumped by every change to the local copy, so a commit knows whether it saw the last.
    pub version: u64,
    /// What the kernel's page cache of the file holds, when the mount knows: moved forward
    /// by a write only from a state known to match (the kernel saw that write), None once
    /// the content changed in a way the kernel's pages may not show (a download, a
    /// truncation it was not told of, an open for writing that did not truncate).
    pub page_cache: Option<PageCache>,
    /// Deletes of objects its handles read, journaled when it was unlinked or renamed
    /// while open for reading and deferred until its last handle closes
    /// (`WritebackQueue::delete_after_close`).
    pub deferred_deletes: Vec<u64>,
}

/// The content the kernel's page cache of a file was filled from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageCache {
    /// The object version (ETag and size) an open read through the mount.
    Object(ETag, u64),
    /// The local copy at this `Inode::version`: written through this mount (every write
    /// goes through the kernel's pages), or read from it.
    Local(u64),
}

impl Inode {
    /// Takes the attributes the bucket gave at time `seen`, unless what the inode holds was
    /// confirmed or made later.
    pub fn take_remote(&mut self, remote: &Remote, seen: Instant) {
        if self.validated.is_some_and(|v| v > seen) {
            return;
        }
        self.size = remote.size;
        self.mtime = remote.mtime;
        self.etag = remote.etag.clone();
        self.validated = Some(seen);
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The local copy, if one is kept.
    pub fn copy(&self) -> Option<&Arc<StagedFile>> {
        match &self.state {
            State::Remote => None,
            State::LocalOnly { copy }
            | State::Dirty { copy }
            | State::OverReplaced { copy }
            | State::Clean { copy } => Some(copy),
            State::Unlinked { copy } => copy.as_ref(),
        }
    }

    /// The local copy, not the bucket, says what this is: a file being written, or one that
    /// has not reached the bucket yet. The bucket's answers do not replace it.
    pub fn is_local_only(&self) -> bool {
        !matches!(self.state, State::Remote)
    }

    /// The bucket holds an object for it, or a queued change will put one there.
    pub fn in_bucket(&self) -> bool {
        matches!(
            self.state,
            State::Remote | State::Dirty { .. } | State::OverReplaced { .. } | State::Clean { .. }
        )
    }

    /// The local copy has changes that are not committed (sealed and queued) yet.
    pub fn is_dirty(&self) -> bool {
        matches!(
            self.state,
            State::LocalOnly { .. } | State::Dirty { .. } | State::OverReplaced { .. }
        )
    }

    /// One open handle fewer; returns the deferred deletes to let go when it was the last.
    pub fn close_one(&mut self) -> Vec<u64> {
        self.open = self.open.saturating_sub(1);
        if self.open == 0 {
            std::mem::take(&mut self.deferred_deletes)
        } else {
            Vec::new()
        }
    }

    pub fn is_unlinked(&self) -> bool {
        matches!(self.state, State::Unlinked { .. })
    }

    pub fn is_fresh(&self, ttl: Duration) -> bool {
        self.copy().is_some() || self.validated.is_some_and(|v| v.elapsed() < ttl)
    }

    /// A new file, written here.
    pub fn created(&mut self, copy: Arc<StagedFile>) {
        self.state = State::LocalOnly { copy };
        self.version = 1;
        // A new inode: the kernel has no pages of it.
        self.page_cache = Some(PageCache::Local(1));
    }

    /// Replaces the local copy (a writable one instead of a sealed one, or the downloaded
    /// content), keeping what else the state says.
    pub fn set_copy(&mut self, new: Arc<StagedFile>) {
        self.page_cache = None;
        self.state = match std::mem::replace(&mut self.state, State::Remote) {
            State::Remote | State::Clean { .. } => State::Clean { copy: new },
            State::LocalOnly { .. } => State::LocalOnly { copy: new },
            State::Dirty { .. } => State::Dirty { copy: new },
            State::OverReplaced { .. } => State::OverReplaced { copy: new },
            State::Unlinked { .. } => State::Unlinked { copy: Some(new) },
        };
    }

    /// `copy` was changed. It is the inode's copy again if something let go of it meanwhile.
    /// An unlinked file's changes are never uploaded.
    pub fn written_to(&mut self, copy: &Arc<StagedFile>) {
        if !self.copy().is_some_and(|c| Arc::ptr_eq(c, copy)) {
            self.set_copy(copy.clone());
        }
        // The kernel's pages follow the write when they matched the copy before it.
        self.page_cache = match self.page_cache {
            Some(PageCache::Local(v)) if v == self.version => Some(PageCache::Local(v + 1)),
            _ => None,
        };
        self.version += 1;
        if let State::Clean { copy } = &self.state {
            self.state = State::Dirty { copy: copy.clone() };
        }
    }

    /// The local copy as of `version` was committed: the bucket will have it.
    pub fn committed(&mut self, version: u64) {
        let fully = self.version == version;
        self.state = match std::mem::replace(&mut self.state, State::Remote) {
            State::LocalOnly { copy } | State::Dirty { copy } | State::OverReplaced { copy }
                if !fully =>
            {
                State::Dirty { copy }
            }
            State::LocalOnly { copy }
            | State::Dirty { copy }
            | State::OverReplaced { copy }
            | State::Clean { copy } => State::Clean { copy },
            other => other,
        };
    }

    /// Its changes will be committed under another name: until then, this name exists only
    /// here, unless `over_object`, the object of the file the rename replaced, which the
    /// bucket holds until the commit replaces it (or an unlink or a rename deletes it).
    pub fn renamed_while_dirty(&mut self, over_object: bool) {
        if let State::Dirty { copy } | State::OverReplaced { copy } | State::LocalOnly { copy } =
            &self.state
        {
            let copy = copy.clone();
            self.state = if over_object {
                State::OverReplaced { copy }
            } else {
                State::LocalOnly { copy }
            };
        }
    }

    /// Lets go of a local copy that nothing needs any more: no handle is open and everything
    /// in it is committed.
    pub fn drop_clean_copy(&mut self) {
        if self.open == 0 && matches!(self.state, State::Clean { .. }) {
            self.state = State::Remote;
        }
    }
}

pub struct InodeTable {
    inodes: HashMap<u64, Inode>,
    /// Directory inode -> name -> child inode.
    children: HashMap<u64, HashMap<String, u64>>,
    next_ino: u64,
}

impl InodeTable {
    pub fn new(mount_time: SystemTime) -> Self {
        let root = Inode {
            ino: ROOT,
            parent: ROOT,
            name: String::new(),
            path: String::new(),
            kind: Kind::Dir,
            size: 0,
            mtime: mount_time,
            etag: None,
            validated: Some(Instant::now()),
            lookups: 1,
            open: 0,
            state: State::Remote,
            version: 0,
            page_cache: None,
            deferred_deletes: Vec::new(),
        };
        InodeTable {
            inodes: HashMap::from([(ROOT, root)]),
            children: HashMap::new(),
            next_ino: 2,
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Inode> {
        self.inodes.get_mut(&ino)
    }

    pub fn child(&self, parent: u64, name: &str) -> Option<u64> {
        self.children.get(&parent)?.get(name).copied()
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    /// Inodes under directory `parent` that exist only locally so far.
    pub fn local_children(&self, parent: u64) -> Vec<(String, u64, Kind)> {
        let Some(names) = self.children.get(&parent) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|(name, ino)| {
                let i = self.inodes.get(ino)?;
                (!i.in_bucket()).then(|| (name.clone(), *ino, i.kind))
            })
            .collect()
    }

    /// Adds a new inode under `parent`, replacing whatever that name pointed to. It starts
    /// out `Remote`: the caller says otherwise when it made it here.
    pub fn insert(&mut self, parent: u64, name: &str, path: String, kind: Kind) -> &mut Inode {
        if let Some(old) = self.child(parent, name) {
            self.detach(old);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = SystemTime::now();
        self.inodes.insert(
            ino,
            Inode {
                ino,
                parent,
                name: name.to_string(),
                path,
                kind,
                size: 0,
                mtime: now,
                etag: None,
                validated: Some(Instant::now()),
                lookups: 0,
                open: 0,
                state: State::Remote,
                version: 0,
                page_cache: None,
                deferred_deletes: Vec::new(),
            },
        );
        self.link(parent, name, ino);
        self.inodes.get_mut(&ino).expect("just inserted")
    }

    /// Records what the bucket said about `parent/name` at time `seen`; local changes not yet
    /// uploaded win over it. Returns the inode number.
    pub fn upsert_remote(
        &mut self,
        parent: u64,
        name: &str,
        path: String,
        remote: &Remote,
        seen: Instant,
    ) -> u64 {
        if let Some(ino) = self.child(parent, name) {
            let i = self
                .inodes
                .get_mut(&ino)
                .expect("child points at a live inode");
            if i.copy().is_some() {
                return ino;
            }
            if i.kind == remote.kind {
                i.take_remote(remote, seen);
                return ino;
            }
        }
        let i = self.insert(parent, name, path, remote.kind);
        // New: what the bucket said is all it knows.
        i.validated = None;
        i.take_remote(remote, seen);
        i.ino
    }

    /// Removes `ino` from its directory. The inode lives on while the kernel or an open
    /// handle refers to it.
    pub fn detach(&mut self, ino: u64) {
        let Some(i) = self.inodes.get_mut(&ino) else {
            return;
        };
        let copy = i.copy().cloned();
        i.state = State::Unlinked { copy };
        let (parent, name) = (i.parent, i.name.clone());
        self.unlink(parent, &name, ino);
        self.maybe_drop(ino);
    }

    /// Moves a file to a new parent and name (the rename itself is done in the bucket).
    pub fn reparent(&mut self, ino: u64, parent: u64, name: &str, path: String) {
        if let Some(old) = self.child(parent, name) {
            if old != ino {
                self.detach(old);
            }
        }
        let Some(i) = self.inodes.get_mut(&ino) else {
            return;
        };
        let (old_parent, old_name) = (i.parent, i.name.clone());
        i.parent = parent;
        i.name = name.to_string();
        i.path = path;
        self.unlink(old_parent, &old_name, ino);
        self.link(parent, name, ino);
    }

    /// The kernel dropped `n` references.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.lookups = i.lookups.saturating_sub(n);
        }
        self.maybe_drop(ino);
    }

    /// Frees an inode nobody refers to any more.
    pub fn maybe_drop(&mut self, ino: u64) {
        let Some(i) = self.inodes.get(&ino) else {
            return;
        };
        if ino == ROOT || i.lookups > 0 || i.open > 0 || i.is_dirty() {
            return;
        }
        // A directory stays while any child of it is still known.
        if self.children.get(&ino).is_some_and(|c| !c.is_empty()) {
            return;
        }
        let (parent, name) = (i.parent, i.name.clone());
        self.unlink(parent, &name, ino);
        self.children.remove(&ino);
        self.inodes.remove(&ino);
        // The parent may have been waiting for its last child to go.
        if parent != ino && self.inodes.get(&parent).is_some_and(|p| p.lookups == 0) {
            self.maybe_drop(parent);
        }
    }

    fn link(&mut self, parent: u64, name: &str, ino: u64) {
        self.children
            .entry(parent)
            .or_default()
            .insert(name.to_string(), ino);
    }

    fn unlink(&mut self, parent: u64, name: &str, ino: u64) {
        if let Some(names) = self.children.get_mut(&parent) {
            if names.get(name) == Some(&ino) {
                names.remove(name);
                if names.is_empty() {
                    self.children.remove(&parent);
                }
            }
        }
    }
}
