//! Reference-model tests: random sequences of operations run against the filesystem layer
//! (on the in-memory store, no FUSE), against a tiny model of the expected namespace, and
//! against a real local directory, with every result compared.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use s3mediafs::fs::testing::{instance, stop};
use s3mediafs::fs::{BucketFs, Kind, ROOT};
use s3mediafs::store::{MemoryStore, ObjectStore};
use s3mediafs::writeback::WritebackQueue;

/// A small cache, so blocks are evicted.
const CACHE_BYTES: u64 = 128 << 10;

#[derive(Debug, Clone)]
enum Op {
    Mkdir(String),
    Write {
        path: String,
        data: Vec<u8>,
        truncate: bool,
    },
    Read(String),
    Unlink(String),
    Rmdir(String),
    Rename(String, String),
    List(String),
    /// Unmount cleanly (pending uploads drain) and mount again.
    Remount,
    /// Stop dead, as on SIGKILL (pending uploads stay in the journal), and mount again.
    Crash,
}

fn path() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec!["a", "b", "c"]);
    prop::collection::vec(name, 1..=3).prop_map(|v| v.join("/"))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => path().prop_map(Op::Mkdir),
        4 => (path(), prop::collection::vec(any::<u8>(), 0..40), any::<bool>())
            .prop_map(|(path, data, truncate)| Op::Write { path, data, truncate }),
        2 => path().prop_map(Op::Read),
        2 => path().prop_map(Op::Unlink),
        2 => path().prop_map(Op::Rmdir),
        2 => (path(), path()).prop_map(|(a, b)| Op::Rename(a, b)),
        2 => prop::sample::select(vec!["", "a", "b", "a/b", "c"]).prop_map(|p| Op::List(p.to_string())),
        1 => Just(Op::Remount),
        1 => Just(Op::Crash),
    ]
}

/// What each operation returned: data, names, or an errno.
type Outcome = Result<Vec<u8>, i32>;

fn names_outcome(mut names: Vec<String>) -> Outcome {
    names.sort();
    Ok(names.join("\n").into_bytes())
}

// ---- the model ----

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Dir,
    File(Vec<u8>),
}

#[derive(Default)]
struct Model {
    nodes: BTreeMap<String, Node>,
}

fn parent_of(p: &str) -> &str {
    p.rfind('/').map(|i| &p[..i]).unwrap_or("")
}

impl Model {
    /// Checks every ancestor of `p` is a directory.
    fn walk(&self, p: &str) -> Result<(), i32> {
        let parts: Vec<&str> = p.split('/').collect();
        for i in 1..parts.len() {
            match self.nodes.get(&parts[..i].join("/")) {
                None => return Err(libc::ENOENT),
                Some(Node::File(_)) => return Err(libc::ENOTDIR),
                Some(Node::Dir) => {}
            }
        }
        Ok(())
    }

    fn has_children(&self, p: &str) -> bool {
        let pre = format!("{p}/");
        self.nodes.keys().any(|k| k.starts_with(&pre))
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        match op {
            Op::Mkdir(p) => {
                self.walk(p)?;
                if self.nodes.contains_key(p) {
                    return Err(libc::EEXIST);
                }
                self.nodes.insert(p.clone(), Node::Dir);
                Ok(vec![])
            }
            Op::Write {
                path,
                data,
                truncate,
            } => {
                self.walk(path)?;
                match self.nodes.get_mut(path) {
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(Node::File(content)) => {
                        if *truncate {
                            content.clear();
                        }
                        if content.len() < data.len() {
                            content.resize(data.len(), 0);
                        }
                        content[..data.len()].copy_from_slice(data);
                        Ok(vec![])
                    }
                    None => {
                        self.nodes.insert(path.clone(), Node::File(data.clone()));
                        Ok(vec![])
                    }
                }
            }
            Op::Read(p) => {
                self.walk(p)?;
                match self.nodes.get(p) {
                    None => Err(libc::ENOENT),
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(Node::File(c)) => Ok(c.clone()),
                }
            }
            Op::Unlink(p) => {
                self.walk(p)?;
                match self.nodes.get(p) {
                    None => Err(libc::ENOENT),
                    Some(Node::Dir) => Err(libc::EISDIR),
                    Some(Node::File(_)) => {
                        self.nodes.remove(p);
                        Ok(vec![])
                    }
                }
            }
            Op::Rmdir(p) => {
                self.walk(p)?;
                match self.nodes.get(p) {
                    None => Err(libc::ENOENT),
                    Some(Node::File(_)) => Err(libc::ENOTDIR),
                    Some(Node::Dir) if self.has_children(p) => Err(libc::ENOTEMPTY),
                    Some(Node::Dir) => {
                        self.nodes.remove(p);
                        Ok(vec![])
                    }
                }
            }
            Op::Rename(a, b) => {
                // Both parents are walked before either name is looked up.
                self.walk(a)?;
                self.walk(b)?;
                let src = self.nodes.get(a).cloned().ok_or(libc::ENOENT)?;
                let dst = self.nodes.get(b).cloned();
                // The kernel refuses renames into one's own subtree before anything else.
                if a.starts_with(&format!("{b}/")) {
                    return Err(libc::ENOTEMPTY);
                }
                if b.starts_with(&format!("{a}/")) {
                    return Err(libc::EINVAL);
                }
                match (&src, &dst) {
                    (Node::Dir, Some(Node::File(_))) => Err(libc::ENOTDIR),
                    (Node::File(_), Some(Node::Dir)) => Err(libc::EISDIR),
                    _ if a == b => Ok(vec![]),
                    // Directories are not renamed in place (the mount answers EXDEV).
                    (Node::Dir, _) => Err(libc::EXDEV),
                    (Node::File(_), _) => {
                        self.nodes.remove(a);
                        self.nodes.insert(b.clone(), src);
                        Ok(vec![])
                    }
                }
            }
            Op::List(p) => {
                if !p.is_empty() {
                    self.walk(p)?;
                    match self.nodes.get(p) {
                        None => return Err(libc::ENOENT),
                        Some(Node::File(_)) => return Err(libc::ENOTDIR),
                        Some(Node::Dir) => {}
                    }
                }
                let names = self
                    .nodes
                    .keys()
                    .filter(|k| parent_of(k) == p.as_str())
                    .map(|k| k.rsplit('/').next().unwrap().to_string())
                    .collect();
                names_outcome(names)
            }
            Op::Remount | Op::Crash => Ok(vec![]),
        }
    }
}

// ---- the filesystem layer on the in-memory store ----

struct FsUnderTest {
    store: Arc<MemoryStore>,
    fs: BucketFs,
    queue: Arc<WritebackQueue>,
    rt: tokio::runtime::Runtime,
    cache: tempfile::TempDir,
    ttl: Duration,
}

impl FsUnderTest {
    fn new(ttl: Duration) -> Self {
        let cache = tempfile::tempdir().unwrap();
        Self::mounted(Arc::new(MemoryStore::new()), cache, ttl)
    }

    /// An instance over `store` with its cache directory `cache`.
    fn mounted(store: Arc<MemoryStore>, cache: tempfile::TempDir, ttl: Duration) -> Self {
        let (fs, queue, rt) = instance(&store, cache.path(), ttl, CACHE_BYTES);
        FsUnderTest {
            store,
            fs,
            queue,
            rt,
            cache,
            ttl,
        }
    }

    /// The same cache and bucket mounted again: after a clean unmount (pending uploads
    /// drain), or after the process stopped dead, as on SIGKILL (they stay in the journal).
    /// The old instance is gone before the new one opens the cache, as a process is.
    fn restarted(self, clean: bool) -> Self {
        if clean {
            let left = self.rt.block_on(self.queue.drain(Duration::from_secs(30)));
            assert_eq!(left, 0, "uploads left after a clean unmount");
        }
        stop(self.fs, self.queue, self.rt);
        Self::mounted(self.store, self.cache, self.ttl)
    }

    /// Uploads everything pending.
    fn settle(&self) {
        let left = self.rt.block_on(self.queue.drain(Duration::from_secs(30)));
        assert_eq!(
            left,
            0,
            "changes left after 30 s: pending {:?}, queued {}, unrecorded {}",
            self.queue.under(""),
            self.queue.pending(),
            self.queue.unrecorded()
        );
    }

    /// Walks `path` from the root as the kernel would, one lookup per component.
    async fn resolve(fs: &BucketFs, path: &str) -> Result<(u64, Kind), i32> {
        let mut ino = ROOT;
        let mut kind = Kind::Dir;
        if path.is_empty() {
            return Ok((ino, kind));
        }
        for part in path.split('/') {
            if kind != Kind::Dir {
                return Err(libc::ENOTDIR);
            }
            let a = fs
                .lookup(ino, OsStr::new(part))
                .await
                .map_err(|e| e.errno())?;
            ino = a.ino;
            kind = a.kind;
        }
        Ok((ino, kind))
    }

    async fn parent(fs: &BucketFs, path: &str) -> Result<u64, i32> {
        match Self::resolve(fs, parent_of(path)).await? {
            (ino, Kind::Dir) => Ok(ino),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn name(path: &str) -> &OsStr {
        OsStr::new(path.rsplit('/').next().unwrap())
    }

    async fn read_all(fs: &BucketFs, ino: u64) -> Result<Vec<u8>, i32> {
        let fh = fs.open(ino, libc::O_RDONLY).await.map_err(|e| e.errno())?;
        let mut out = Vec::new();
        loop {
            let chunk = fs
                .read(fh, out.len() as u64, 7)
                .await
                .map_err(|e| e.errno())?;
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(&chunk);
        }
        fs.release(fh).await.map_err(|e| e.errno())?;
        Ok(out)
    }

    fn apply(&self, op: &Op) -> Outcome {
        let fs = &self.fs;
        self.rt.block_on(async move {
            let e = |e: s3mediafs::fs::FsError| e.errno();
            match op {
                Op::Mkdir(p) => {
                    let parent = Self::parent(fs, p).await?;
                    fs.mkdir(parent, Self::name(p)).await.map_err(e)?;
                    Ok(vec![])
                }
                Op::Write {
                    path,
                    data,
                    truncate,
                } => {
                    let parent = Self::parent(fs, path).await?;
                    let fh = match fs.lookup(parent, Self::name(path)).await {
                        Ok(a) if a.kind == Kind::Dir => return Err(libc::EISDIR),
                        Ok(a) => {
                            let flags = libc::O_WRONLY | if *truncate { libc::O_TRUNC } else { 0 };
                            fs.open(a.ino, flags).await.map_err(e)?
                        }
                        Err(err) if err.errno() == libc::ENOENT => {
                            fs.create(parent, Self::name(path), libc::O_WRONLY | libc::O_CREAT)
                                .await
                                .map_err(e)?
                                .1
                        }
                        Err(err) => return Err(err.errno()),
                    };
                    // Two writes, second first, to exercise out-of-order writes.
                    let mid = data.len() / 2;
                    fs.write(fh, mid as u64, &data[mid..]).await.map_err(e)?;
                    fs.write(fh, 0, &data[..mid]).await.map_err(e)?;
                    fs.flush(fh).await.map_err(e)?;
                    fs.release(fh).await.map_err(e)?;
                    Ok(vec![])
                }
                Op::Read(p) => match Self::resolve(fs, p).await? {
                    (_, Kind::Dir) => Err(libc::EISDIR),
                    (ino, Kind::File) => Self::read_all(fs, ino).await,
                },
                Op::Unlink(p) => {
                    let parent = Self::parent(fs, p).await?;
                    fs.unlink(parent, Self::name(p)).await.map_err(e)?;
                    Ok(vec![])
                }
                Op::Rmdir(p) => {
                    let parent = Self::parent(fs, p).await?;
                    fs.rmdir(parent, Self::name(p)).await.map_err(e)?;
                    Ok(vec![])
                }
                Op::Rename(a, b) => {
                    // The checks the kernel makes before asking the filesystem.
                    let pa = Self::parent(fs, a).await?;
                    let pb = Self::parent(fs, b).await?;
                    let (src, src_kind) = Self::resolve(fs, a).await?;
                    let dst = Self::resolve(fs, b).await;
                    if a.starts_with(&format!("{b}/")) {
                        return Err(libc::ENOTEMPTY);
                    }
                    if b.starts_with(&format!("{a}/")) {
                        return Err(libc::EINVAL);
                    }
                    match dst {
                        Ok((dst, _)) if dst == src => return Ok(vec![]),
                        Ok((_, Kind::File)) if src_kind == Kind::Dir => return Err(libc::ENOTDIR),
                        Ok((_, Kind::Dir)) if src_kind == Kind::File => return Err(libc::EISDIR),
                        _ => {}
                    }
                    fs.rename(pa, Self::name(a), pb, Self::name(b), false)
                        .await
                        .map_err(e)?;
                    Ok(vec![])
                }
                Op::List(p) => {
                    let (ino, kind) = Self::resolve(fs, p).await?;
                    if kind != Kind::Dir {
                        return Err(libc::ENOTDIR);
                    }
                    let fh = fs.opendir(ino).map_err(e)?;
                    let mut names = Vec::new();
                    let mut offset = 0;
                    loop {
                        let batch = fs.readdir(fh, offset, 2).await.map_err(e)?;
                        let Some(last) = batch.last() else { break };
                        offset = last.next_offset;
                        names.extend(
                            batch
                                .into_iter()
                                .map(|d| d.name)
                                .filter(|n| n != "." && n != ".."),
                        );
                    }
                    fs.releasedir(fh);
                    names_outcome(names)
                }
                Op::Remount | Op::Crash => unreachable!(),
            }
        })
    }
}

// ---- a real local directory ----

fn local_apply(root: &std::path::Path, op: &Op) -> Option<Outcome> {
    use std::io::Write;
    let errno = |e: std::io::Error| e.raw_os_error().unwrap();
    Some(match op {
        Op::Mkdir(p) => std::fs::create_dir(root.join(p))
            .map(|_| vec![])
            .map_err(errno),
        Op::Write {
            path,
            data,
            truncate,
        } => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(*truncate)
            .open(root.join(path))
            .and_then(|mut f| f.write_all(data))
            .map(|_| vec![])
            .map_err(errno),
        Op::Read(p) => std::fs::read(root.join(p)).map_err(errno),
        Op::Unlink(p) => std::fs::remove_file(root.join(p))
            .map(|_| vec![])
            .map_err(errno),
        Op::Rmdir(p) => std::fs::remove_dir(root.join(p))
            .map(|_| vec![])
            .map_err(errno),
        // A local disk renames directories, which the mount declines: not comparable.
        Op::Rename(a, _) if root.join(a).is_dir() => return None,
        Op::Rename(a, b) => std::fs::rename(root.join(a), root.join(b))
            .map(|_| vec![])
            .map_err(errno),
        Op::List(p) => std::fs::read_dir(root.join(p))
            .map_err(errno)
            .and_then(|rd| {
                names_outcome(
                    rd.map(|e| e.unwrap().file_name().into_string().unwrap())
                        .collect(),
                )
            }),
        Op::Remount | Op::Crash => Ok(vec![]),
    })
}

fn run(ops: Vec<Op>, ttl: Duration) -> Result<(), TestCaseError> {
    let mut model = Model::default();
    let mut fs = FsUnderTest::new(ttl);
    let local = tempfile::tempdir().unwrap();
    for (i, op) in ops.iter().enumerate() {
        let want = model.apply(op);
        let got = match op {
            Op::Remount | Op::Crash => {
                fs = fs.restarted(matches!(op, Op::Remount));
                Ok(vec![])
            }
            _ => fs.apply(op),
        };
        prop_assert_eq!(&got, &want, "step {}: {:?}", i, op);
        if let Some(local_got) = local_apply(local.path(), op) {
            // A local filesystem allows renaming a dir onto an empty one etc.; only
            // compare where the model did not answer EXDEV.
            if want != Err(libc::EXDEV) {
                prop_assert_eq!(&local_got, &want, "local directory, step {}: {:?}", i, op);
            }
        }
    }
    // Once uploads are done, every file the model holds is exactly one object with exactly
    // its bytes.
    fs.settle();
    let mut files: Vec<(String, Vec<u8>)> = model
        .nodes
        .iter()
        .filter_map(|(k, n)| match n {
            Node::File(c) => Some((format!("pre/{k}"), c.clone())),
            Node::Dir => None,
        })
        .collect();
    files.sort();
    let mut objects: Vec<(String, Vec<u8>)> = fs
        .store
        .keys()
        .into_iter()
        .filter(|k| !k.ends_with('/'))
        .map(|k| {
            let data = fs.store.object(&k).unwrap().to_vec();
            (k, data)
        })
        .collect();
    objects.sort();
    prop_assert_eq!(objects, files);
    Ok(())
}

/// Reads every name of directory `ino` through a handle, a few entries at a time.
fn list_names(rt: &tokio::runtime::Runtime, fs: &BucketFs, ino: u64) -> Vec<String> {
    rt.block_on(async {
        let fh = fs.opendir(ino).unwrap();
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let batch = fs.readdir(fh, offset, 3).await.unwrap();
            let Some(last) = batch.last() else { break };
            offset = last.next_offset;
            names.extend(batch.into_iter().map(|d| d.name));
        }
        fs.releasedir(fh);
        names
    })
}

/// A store that answers LISTs with keys outside the prefix asked for, `a` and `a/` both, and
/// names that cannot be paths: the mount never panics, shows no name twice, and shows only
/// what lies under its prefix.
#[test]
fn a_hostile_listing_never_panics_or_shows_a_name_twice() {
    let store = Arc::new(MemoryStore::new());
    let cache = tempfile::tempdir().unwrap();
    let rt0 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt0.block_on(async {
        for k in [
            "pre/a",
            "pre/a/x",
            "pre/b/1",
            "pre/b//2",
            "pre/c/../d",
            "pre/e",
            "other/z",
        ] {
            store.put(k, bytes::Bytes::from_static(b"v")).await.unwrap();
        }
    });
    store.list_strays(&["", "p", "pr", "pre", "other/", "zzz/q", "pre/\u{0}"]);
    for ttl in [Duration::ZERO, Duration::from_secs(60)] {
        let (fs, _queue, rt) = instance(&store, cache.path(), ttl, CACHE_BYTES);
        let root = list_names(&rt, &fs, ROOT);
        let mut unique = root.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), root.len(), "a name listed twice: {root:?}");
        for name in [".", "..", "a", "b", "c", "e"] {
            assert!(
                root.contains(&name.to_string()),
                "{name} missing from {root:?}"
            );
        }
        assert_eq!(root.len(), 6, "names outside the prefix listed: {root:?}");
        for dir in ["a", "b", "c"] {
            let a = rt.block_on(fs.lookup(ROOT, OsStr::new(dir))).unwrap();
            assert_eq!(a.kind, Kind::Dir, "{dir}");
            let names = list_names(&rt, &fs, a.ino);
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(
                unique.len(),
                names.len(),
                "a name listed twice in {dir}: {names:?}"
            );
        }
        let b = rt.block_on(fs.lookup(ROOT, OsStr::new("b"))).unwrap();
        assert_eq!(list_names(&rt, &fs, b.ino), [".", "..", "1"]);
        assert!(rt.block_on(fs.lookup(ROOT, OsStr::new("other"))).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn matches_the_model_when_every_lookup_asks_the_store(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, Duration::ZERO)?;
    }

    #[test]
    fn matches_the_model_with_cached_metadata(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, Duration::from_secs(3600))?;
    }
}
