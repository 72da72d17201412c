//! Fast fs-level tests: rules of the filesystem layer (the metadata TTL, offline mode,
//! which content may be passed through to the kernel) driven against the in-memory store,
//! with no FUSE, no root and no server. The same rules are proven on a real mount by the
//! integration tests; these say where a break is, in seconds.

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::testing::instance;
use super::{BucketFs, FsResult, ROOT};
use crate::passthrough::Backed;
use crate::store::{MemoryStore, ObjectStore};
use crate::writeback::WritebackQueue;

struct Fixture {
    store: Arc<MemoryStore>,
    fs: BucketFs,
    queue: Arc<WritebackQueue>,
    rt: tokio::runtime::Runtime,
    cache: tempfile::TempDir,
}

impl Fixture {
    fn new(ttl: Duration, cache_bytes: u64) -> Fixture {
        let store = Arc::new(MemoryStore::new());
        let cache = tempfile::tempdir().unwrap();
        let (fs, queue, rt) = instance(&store, cache.path(), ttl, cache_bytes);
        Fixture {
            store,
            fs,
            queue,
            rt,
            cache,
        }
    }

    /// Puts an object under the mount's prefix, as another host would.
    fn put(&self, name: &str, data: &[u8]) {
        let body = Bytes::copy_from_slice(data);
        self.rt
            .block_on(self.store.put(&format!("pre/{name}"), body))
            .unwrap();
    }

    fn size(&self, name: &str) -> FsResult<u64> {
        self.rt
            .block_on(self.fs.lookup(ROOT, OsStr::new(name)))
            .map(|a| a.size)
    }

    /// What `path` (a/b/c) is, looked up one component at a time as the kernel does.
    fn lookup_path(&self, path: &str) -> FsResult<crate::fs::Attr> {
        self.rt.block_on(async {
            let mut ino = ROOT;
            let mut attr = None;
            for name in path.split('/') {
                let a = self.fs.lookup(ino, OsStr::new(name)).await?;
                ino = a.ino;
                attr = Some(a);
            }
            Ok(attr.expect("a path of at least one name"))
        })
    }

    /// Creates `name` with `data`, closed as close() does.
    fn write(&self, name: &str, data: &[u8]) -> FsResult<u64> {
        self.rt.block_on(async {
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
            let (attr, fh) = self.fs.create(ROOT, OsStr::new(name), flags).await?;
            self.fs.write(fh, 0, data).await?;
            self.fs.flush(fh).await?;
            self.fs.release(fh).await?;
            Ok(attr.ino)
        })
    }

    /// Opens `ino` read-only: what can be passed through, and what a read of it returns.
    fn open_and_read(&self, ino: u64, len: u32) -> (Backed, FsResult<Bytes>) {
        self.rt.block_on(async {
            let fh = self.fs.open(ino, libc::O_RDONLY).await.unwrap();
            let backed = self.fs.passthrough_file(fh, None).await;
            let read = self.fs.read(fh, 0, len).await;
            self.fs.release(fh).await.unwrap();
            (backed, read)
        })
    }

    /// Runs the filesystem's background work until `done` holds, for at most ten seconds.
    fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "waited ten seconds for {what}"
            );
            self.rt
                .block_on(async { tokio::time::sleep(Duration::from_millis(5)).await });
        }
    }

    fn drain(&self) {
        let left = self.rt.block_on(self.queue.drain(Duration::from_secs(60)));
        assert_eq!(left, 0, "changes left after the store came back");
    }
}

/// Whether `fut` is still waiting after `patience`, for something the test holds back.
async fn still_waiting<F: std::future::Future>(
    fut: std::pin::Pin<&mut F>,
    patience: Duration,
) -> bool {
    tokio::time::timeout(patience, fut).await.is_err()
}

fn is_passed_through(b: &Backed) -> bool {
    matches!(b, Backed::File(..))
}

/// Every regular file under `dir` whose length is `len`.
fn files_of_length(dir: &Path, len: u64) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = e.metadata().unwrap();
        if meta.is_dir() {
            out.extend(files_of_length(&e.path(), len));
        } else if meta.len() == len {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn attributes_are_trusted_for_the_metadata_ttl_and_absence_for_the_negative_ttl() {
    let f = Fixture::new(Duration::from_millis(300), 1 << 20);
    let negative_ttl = f.fs.options().negative_ttl;
    assert!(negative_ttl > Duration::from_millis(500));
    f.put("a.png", b"old");
    assert_eq!(f.size("a.png").unwrap(), 3);
    assert!(f.size("b.png").unwrap_err().is(libc::ENOENT));
    let absent_since = std::time::Instant::now();
    // Another host replaces one object and adds another.
    f.put("a.png", b"newer");
    f.put("b.png", b"b");
    assert_eq!(f.size("a.png").unwrap(), 3, "within the TTL, what was seen");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        f.size("a.png").unwrap(),
        5,
        "after the TTL, the bucket's answer"
    );
    assert!(
        f.size("b.png").unwrap_err().is(libc::ENOENT),
        "within the negative TTL, still absent"
    );
    std::thread::sleep(
        (absent_since + negative_ttl).saturating_duration_since(std::time::Instant::now()),
    );
    assert_eq!(f.size("b.png").unwrap(), 1, "after the negative TTL, there");
}

#[test]
fn a_directory_whose_lookups_keep_asking_is_listed_whole_and_asks_no_more() {
    let f = Fixture::new(Duration::from_secs(60), 1 << 20);
    // Synapse's fan-out: hash prefixes, each holding media; uploads look up new prefixes.
    // More keys than one LIST returns, so no lookup alone learns the directory whole.
    for i in 0..1200 {
        f.put(&format!("media/p{i:04}/q/file"), b"stored");
    }
    assert!(f.lookup_path("media").is_ok());
    let before = f.store.lists();
    for i in 0..3 {
        let missing = f.lookup_path(&format!("media/new-{i}"));
        assert!(missing.unwrap_err().is(libc::ENOENT));
    }
    assert_eq!(f.store.lists() - before, 3, "one LIST per name asked about");
    // The third ask started a listing of the whole subtree in the background: two LISTs.
    f.wait_until("the background listing", || f.store.lists() - before >= 5);
    let after = f.store.lists();
    for i in 3..100 {
        let missing = f.lookup_path(&format!("media/new-{i}"));
        assert!(missing.unwrap_err().is(libc::ENOENT));
    }
    for i in (0..1200).step_by(7) {
        let stored = f.lookup_path(&format!("media/p{i:04}/q/file")).unwrap();
        assert_eq!(stored.size, 6);
        let missing = f.lookup_path(&format!("media/p{i:04}/q/new"));
        assert!(missing.unwrap_err().is(libc::ENOENT));
    }
    assert_eq!(
        f.store.lists(),
        after,
        "lookups in a directory listed whole asked the bucket"
    );
}

#[test]
fn a_file_deleted_while_its_directory_is_listed_whole_does_not_come_back() {
    // In the root, which keeps no marker once a file goes, so nothing else dates the change;
    // named to come in the listing's first page.
    let f = Fixture::new(Duration::from_secs(60), 1 << 20);
    for i in 0..1200 {
        f.put(&format!("p{i:04}/q/file"), b"stored");
    }
    f.put("a-victim.png", b"victim");
    f.lookup_path("a-victim.png").unwrap();
    assert!(f.lookup_path("new-0").is_err());
    // The third ask starts the background listing; its first page is taken and held.
    let gate = f.store.hold_lists();
    gate.add_permits(1);
    let before = f.store.lists();
    assert!(f.lookup_path("new-1").is_err());
    f.wait_until("the background listing's first LIST", || {
        f.store.lists() > before + 1
    });
    // Meanwhile the file is deleted, and the delete reaches the bucket.
    f.rt.block_on(f.fs.unlink(ROOT, OsStr::new("a-victim.png")))
        .unwrap();
    f.drain();
    gate.add_permits(100);
    // On this one-thread runtime the listing records its pages in the poll that sent its
    // last LIST: once that LIST is counted, the listing is recorded.
    f.wait_until("the background listing's last LIST", || {
        f.store.lists() > before + 2
    });
    let listed = f.rt.block_on(async {
        let fh = f.fs.opendir(ROOT).unwrap();
        let entries = f.fs.readdir(fh, 0, 10_000).await.unwrap();
        f.fs.releasedir(fh);
        entries.into_iter().map(|e| e.name).collect::<Vec<_>>()
    });
    assert!(
        !listed.contains(&"a-victim.png".to_string()),
        "the deleted file is listed"
    );
    assert_eq!(listed.len(), 2 + 1200, "., .. and the prefixes");
    assert!(f.lookup_path("a-victim.png").unwrap_err().is(libc::ENOENT));
}

#[test]
fn offline_lookups_answer_from_what_is_known_and_writes_wait_for_the_store() {
    let f = Fixture::new(Duration::ZERO, 1 << 20);
    f.put("seen.png", b"seen");
    assert_eq!(f.size("seen.png").unwrap(), 4);
    f.store.set_unreachable(true);
    // A name never seen reads as absent, not as an I/O error, so a writer can create it.
    assert!(f.size("unseen.png").unwrap_err().is(libc::ENOENT));
    let ino = f.write("new.png", b"written offline").unwrap();
    assert_eq!(f.size("new.png").unwrap(), 15);
    let (_, read) = f.open_and_read(ino, 64);
    assert_eq!(read.unwrap().as_ref(), b"written offline");
    assert!(f.store.object("pre/new.png").is_none());
    f.store.set_unreachable(false);
    f.drain();
    assert_eq!(
        f.store.object("pre/new.png").as_deref(),
        Some(&b"written offline"[..])
    );
}

#[test]
fn only_read_only_opens_of_whole_local_content_from_128_kib_are_passed_through() {
    let f = Fixture::new(Duration::from_secs(10), 4 << 20);
    f.store.set_unreachable(true); // the sealed copies stay waiting for upload
    let big: Vec<u8> = (0..200u32 << 10).map(|i| (i % 251) as u8).collect();
    let big_ino = f.write("video.mp4", &big).unwrap();
    let (backed, read) = f.open_and_read(big_ino, 64 << 10);
    assert!(
        is_passed_through(&backed),
        "a closed file waiting for upload"
    );
    assert!(read.unwrap().as_ref() == &big[..64 << 10]);

    let small_ino = f.write("thumb.png", &big[..16 << 10]).unwrap();
    let (backed, _) = f.open_and_read(small_ino, 16 << 10);
    assert!(
        !is_passed_through(&backed),
        "below 128 KiB the kernel's pages do better"
    );

    let writer = f.rt.block_on(async {
        let fh = f.fs.open(big_ino, libc::O_RDWR).await.unwrap();
        let backed = f.fs.passthrough_file(fh, None).await;
        f.fs.release(fh).await.unwrap();
        backed
    });
    assert!(
        !is_passed_through(&writer),
        "a handle that writes is never passed through"
    );
}

#[test]
fn a_sealed_copy_changed_on_disk_is_never_passed_through_or_read() {
    let f = Fixture::new(Duration::from_secs(10), 4 << 20);
    f.store.set_unreachable(true);
    let data: Vec<u8> = (0..(256u32 << 10) + 5).map(|i| (i % 253) as u8).collect();
    let ino = f.write("clip.mp4", &data).unwrap();
    let copies = files_of_length(f.cache.path(), data.len() as u64);
    assert_eq!(copies.len(), 1, "one sealed copy in the cache directory");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&copies[0])
        .unwrap();
    file.write_at(b"X", 1000).unwrap();
    let (backed, read) = f.open_and_read(ino, 4096);
    assert!(!is_passed_through(&backed));
    match read {
        Err(e) => assert!(e.is(libc::EIO), "{e}"),
        Ok(b) => assert!(b.as_ref() == &data[..4096], "the damaged bytes were served"),
    }
}

#[test]
fn the_kernel_keeps_its_pages_only_of_content_they_were_filled_from() {
    let f = Fixture::new(Duration::from_millis(100), 1 << 20);
    let ino = f.write("a.png", b"written here").unwrap();
    let keeps = |f: &Fixture| {
        f.rt.block_on(async {
            let fh = f.fs.open(ino, libc::O_RDONLY).await.unwrap();
            let keep = f.fs.keep_cache(fh);
            f.fs.release(fh).await.unwrap();
            keep
        })
    };
    let ttl = Duration::from_millis(150);
    assert!(keeps(&f), "the pages of its writes, waiting for upload");
    f.drain();
    std::thread::sleep(ttl);
    assert!(keeps(&f), "the bucket holds what this mount uploaded");
    // Replaced elsewhere with content of the same size: the pages go, once.
    f.put("a.png", b"WRITTEN HERE");
    std::thread::sleep(ttl);
    assert!(!keeps(&f), "replaced elsewhere");
    assert!(keeps(&f));
    // A truncation that changes no size downloads the bucket's version: the kernel never
    // saw it, so the pages it kept are not that content.
    f.put("a.png", b"third versio");
    std::thread::sleep(ttl);
    f.rt.block_on(f.fs.getattr(ino)).unwrap();
    f.rt.block_on(f.fs.setattr_size(ino, 12, None)).unwrap();
    assert!(!keeps(&f), "content downloaded behind the kernel's back");
}

#[test]
fn a_handle_reads_the_file_it_opened_after_its_name_is_taken_by_another() {
    let f = Fixture::new(Duration::from_secs(10), 1 << 20);
    f.store.set_unreachable(true); // the uploads stay waiting
    let first = f.write("f.png", b"first file").unwrap();
    let open = |ino| f.rt.block_on(f.fs.open(ino, libc::O_RDONLY)).unwrap();
    let read = |fh| f.rt.block_on(f.fs.read(fh, 0, 64)).unwrap();
    // Removed, then created again.
    let fh = open(first);
    f.rt.block_on(f.fs.unlink(ROOT, OsStr::new("f.png")))
        .unwrap();
    let second = f.write("f.png", b"SECOND FILE!").unwrap();
    assert_eq!(read(fh).as_ref(), b"first file", "after rm and create");
    // Renamed over.
    let fh2 = open(second);
    f.write("tmp.png", b"third, renamed").unwrap();
    f.rt.block_on(f.fs.rename(
        ROOT,
        OsStr::new("tmp.png"),
        ROOT,
        OsStr::new("f.png"),
        false,
    ))
    .unwrap();
    assert_eq!(read(fh2).as_ref(), b"SECOND FILE!", "after mv over it");
    for fh in [fh, fh2] {
        f.rt.block_on(f.fs.release(fh)).unwrap();
    }
}

/// Unlinking a file open for reading downloads nothing: the handle reads the object, and
/// its delete waits for the last close.
#[test]
fn unlinking_a_file_open_for_reading_defers_its_delete_to_the_last_close() {
    let f = Fixture::new(Duration::from_secs(1), 1 << 20);
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    f.put("v.mp4", &data);
    let ino =
        f.rt.block_on(f.fs.lookup(ROOT, OsStr::new("v.mp4")))
            .unwrap()
            .ino;
    let fh = f.rt.block_on(f.fs.open(ino, libc::O_RDONLY)).unwrap();
    f.rt.block_on(f.fs.unlink(ROOT, OsStr::new("v.mp4")))
        .unwrap();
    assert!(
        files_of_length(f.cache.path(), data.len() as u64).is_empty(),
        "the unlink copied the object"
    );
    assert!(f.size("v.mp4").unwrap_err().is(libc::ENOENT));
    // Longer than deletes wait to be gathered: one not deferred would have gone.
    f.rt.block_on(async { tokio::time::sleep(Duration::from_millis(600)).await });
    assert!(f.store.object("pre/v.mp4").is_some(), "deleted while open");
    assert_eq!(
        f.rt.block_on(f.fs.read(fh, 0, 8192)).unwrap().as_ref(),
        &data[..]
    );
    f.rt.block_on(f.fs.release(fh)).unwrap();
    f.wait_until("the delete after the last close", || {
        f.store.object("pre/v.mp4").is_none()
    });
}

/// An open still asking the bucket about the file (revalidating it) counts as open: an
/// unlink meanwhile defers the delete, and the handle reads the file.
#[test]
fn an_unlink_during_an_open_leaves_the_opened_file_readable() {
    let f = Fixture::new(Duration::from_millis(50), 1 << 20);
    let data = b"opened before it was unlinked".to_vec();
    f.put("v.mp4", &data);
    let ino =
        f.rt.block_on(f.fs.lookup(ROOT, OsStr::new("v.mp4")))
            .unwrap()
            .ino;
    // Stale: the open asks the bucket, and waits for its answer.
    std::thread::sleep(Duration::from_millis(100));
    let heads = f.store.hold_heads();
    f.rt.block_on(async {
        let open = f.fs.open(ino, libc::O_RDONLY);
        tokio::pin!(open);
        assert!(
            still_waiting(open.as_mut(), Duration::from_millis(50)).await,
            "the open did not ask the bucket"
        );
        f.fs.unlink(ROOT, OsStr::new("v.mp4")).await.unwrap();
        heads.add_permits(1000);
        let fh = open.await.unwrap();
        // Longer than deletes wait to be gathered: one not deferred would have gone.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(f.fs.read(fh, 0, 100).await.unwrap().as_ref(), &data[..]);
        f.fs.release(fh).await.unwrap();
    });
    f.drain();
    assert!(f.store.object("pre/v.mp4").is_none());
}

/// An open for writing that keeps the content sees the file as another host last left it
/// (close-to-open, as an open for reading): the change lands on that content.
#[test]
fn an_open_for_writing_sees_a_file_another_host_replaced() {
    let f = Fixture::new(Duration::from_millis(50), 1 << 20);
    f.put("log.txt", b"first");
    let ino =
        f.rt.block_on(f.fs.lookup(ROOT, OsStr::new("log.txt")))
            .unwrap()
            .ino;
    f.put("log.txt", b"second version");
    std::thread::sleep(Duration::from_millis(100));
    f.rt.block_on(async {
        let fh = f.fs.open(ino, libc::O_RDWR).await.unwrap();
        f.fs.write(fh, 0, b"S").await.unwrap();
        f.fs.flush(fh).await.unwrap();
        f.fs.release(fh).await.unwrap();
    });
    f.drain();
    assert_eq!(
        f.store.object("pre/log.txt").as_deref(),
        Some(&b"Second version"[..])
    );
}

/// A file uploaded here that is too large to keep in the cache is read as the version this
/// mount uploaded: replaced by another host meanwhile, the read fails rather than hand
/// out the other version's bytes as this one's.
#[test]
fn a_file_too_large_to_keep_is_read_as_the_version_uploaded() {
    let f = Fixture::new(Duration::from_secs(60), 1 << 20);
    let mine = vec![7u8; 400_000];
    let ino = f.write("big.mp4", &mine).unwrap();
    f.wait_until("the upload landed", || {
        f.store.object("pre/big.mp4").is_some() && f.queue.under("").is_empty()
    });
    f.put("big.mp4", &vec![9u8; 400_000]);
    let (_, read) = f.open_and_read(ino, 4096);
    match read {
        Ok(b) => panic!(
            "read {} bytes of another host's version as this mount's",
            b.len()
        ),
        Err(e) => assert_eq!(e.errno(), libc::EIO, "{e:?}"),
    }
}

/// A file whose close failed because the fdatasync of its copy did (EIO, ENOSPC) closes
/// again once it is written anew: the copy in doubt is replaced, not kept failing.
#[test]
fn a_file_whose_fdatasync_failed_can_be_written_anew() {
    let f = Fixture::new(Duration::from_secs(1), 1 << 20);
    f.rt.block_on(async {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
        let (attr, fh) = f.fs.create(ROOT, OsStr::new("t.png"), flags).await.unwrap();
        f.fs.write(fh, 0, b"first").await.unwrap();
        let copy = f.fs.ns.table.lock().get(attr.ino).unwrap().copy().cloned();
        copy.unwrap().fail_sync();
        assert!(f.fs.flush(fh).await.unwrap_err().is(libc::EIO));
        let _ = f.fs.release(fh).await;
    });
    f.write("t.png", b"written anew").unwrap();
    f.drain();
    assert_eq!(
        f.store.object("pre/t.png").unwrap().as_ref(),
        b"written anew"
    );
}

/// A file still being written, renamed over a file in the bucket and unlinked before it
/// is closed, leaves neither object: the unlink deletes the one the rename replaced.
#[test]
fn a_file_renamed_over_another_while_written_then_unlinked_leaves_nothing() {
    let f = Fixture::new(Duration::from_secs(1), 1 << 20);
    f.put("j.png", b"the old j");
    assert_eq!(f.size("j.png").unwrap(), 9);
    f.rt.block_on(async {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
        let (_, fh) =
            f.fs.create(ROOT, OsStr::new("tmp.png"), flags)
                .await
                .unwrap();
        f.fs.write(fh, 0, b"new").await.unwrap();
        f.fs.rename(
            ROOT,
            OsStr::new("tmp.png"),
            ROOT,
            OsStr::new("j.png"),
            false,
        )
        .await
        .unwrap();
        f.fs.unlink(ROOT, OsStr::new("j.png")).await.unwrap();
        f.fs.flush(fh).await.unwrap();
        f.fs.release(fh).await.unwrap();
    });
    f.drain();
    assert_eq!(f.store.keys(), Vec::<String>::new());
}

/// A directory removed while a file unlinked in it is still open is not listed again: the
/// file's deferred delete goes with the rmdir.
#[test]
fn a_removed_directory_stays_gone_while_a_file_unlinked_in_it_is_open() {
    let f = Fixture::new(Duration::from_secs(1), 1 << 20);
    f.put("d/t.png", b"thumbnail");
    f.rt.block_on(async {
        let d = f.fs.lookup(ROOT, OsStr::new("d")).await.unwrap().ino;
        let t = f.fs.lookup(d, OsStr::new("t.png")).await.unwrap().ino;
        let fh = f.fs.open(t, libc::O_RDONLY).await.unwrap();
        f.fs.unlink(d, OsStr::new("t.png")).await.unwrap();
        f.fs.rmdir(ROOT, OsStr::new("d")).await.unwrap();
        f.queue.settle_under("pre/").await.unwrap();
        let dir = f.fs.opendir(ROOT).unwrap();
        let names: Vec<String> =
            f.fs.readdir(dir, 0, 100)
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect();
        f.fs.releasedir(dir);
        assert_eq!(names, [".", ".."]);
        f.fs.release(fh).await.unwrap();
    });
    assert!(f.store.keys().is_empty(), "{:?}", f.store.keys());
}

/// A file still being written, renamed over a file in the bucket and then renamed again,
/// uploads nothing before it is closed: the middle name's object (the replaced file's) is
/// deleted, and the last name gets the content once it is closed.
#[test]
fn a_file_renamed_twice_while_written_uploads_only_its_closed_content() {
    let f = Fixture::new(Duration::from_secs(1), 1 << 20);
    f.put("j.png", b"the old j");
    assert_eq!(f.size("j.png").unwrap(), 9);
    let fh = f.rt.block_on(async {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
        let (_, fh) =
            f.fs.create(ROOT, OsStr::new("tmp.png"), flags)
                .await
                .unwrap();
        f.fs.write(fh, 0, b"half").await.unwrap();
        for (from, to) in [("tmp.png", "j.png"), ("j.png", "k.png")] {
            f.fs.rename(ROOT, OsStr::new(from), ROOT, OsStr::new(to), false)
                .await
                .unwrap();
        }
        fh
    });
    f.wait_until(
        "the middle name's object deleted, and nothing else queued",
        || f.store.keys().is_empty() && f.queue.under("").is_empty(),
    );
    f.rt.block_on(async {
        f.fs.write(fh, 4, b" and the rest").await.unwrap();
        f.fs.flush(fh).await.unwrap();
        f.fs.release(fh).await.unwrap();
    });
    f.drain();
    assert_eq!(f.store.keys(), ["pre/k.png"]);
    assert_eq!(
        f.store.object("pre/k.png").as_deref(),
        Some(&b"half and the rest"[..])
    );
}

/// A rename over a file waits for a commit of that file under way (a close), so the
/// renamed content is the one the new name keeps, not the content the close queued.
#[test]
fn a_rename_waits_for_a_commit_of_the_file_it_replaces() {
    let f = Fixture::new(Duration::from_secs(1), 1 << 20);
    f.put("b.png", b"from the bucket");
    let k = f.write("k.png", b"closed here").unwrap();
    f.rt.block_on(f.queue.settle("pre/k.png")).unwrap();
    f.rt.block_on(async {
        // A close of k.png commits: it holds the file's commit lock.
        let committing = f.fs.commit_lock(k).write().await;
        let rename =
            f.fs.rename(ROOT, OsStr::new("b.png"), ROOT, OsStr::new("k.png"), false);
        tokio::pin!(rename);
        assert!(
            still_waiting(rename.as_mut(), Duration::from_millis(200)).await,
            "the rename went on while the file it replaces was being committed"
        );
        drop(committing);
        rename.await.unwrap();
    });
    f.drain();
    assert_eq!(
        f.store.object("pre/k.png").unwrap().as_ref(),
        b"from the bucket"
    );
    assert!(f.store.object("pre/b.png").is_none());
}

#[test]
fn a_read_only_open_with_o_trunc_empties_the_file_in_the_bucket() {
    // Linux empties a file opened `O_RDONLY | O_TRUNC` (given write permission), and with
    // atomic O_TRUNC the kernel takes the size 0 from the open: the copy must follow.
    let f = Fixture::new(Duration::from_secs(1), 1 << 20);
    let ino = f.write("a.txt", b"some bytes").unwrap();
    f.rt.block_on(async {
        let fh =
            f.fs.open(ino, libc::O_RDONLY | libc::O_TRUNC)
                .await
                .unwrap();
        assert_eq!(f.fs.read(fh, 0, 100).await.unwrap().len(), 0);
        f.fs.flush(fh).await.unwrap();
        f.fs.release(fh).await.unwrap();
    });
    f.drain();
    assert_eq!(f.size("a.txt").unwrap(), 0);
    assert_eq!(f.store.object("pre/a.txt").unwrap().len(), 0);
}
