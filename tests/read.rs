//! The read path through a real mount: bytes at any offset, large sequential reads, several
//! readers at once, replaced objects, the block cache's size cap and what readahead fetches.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::faults::{policy, FaultProxy};
use common::*;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

/// Reads `path` front to back in `chunk`-sized reads; returns the sha256.
fn sha256_of_file(path: &Path, chunk: usize) -> (String, u64) {
    let mut f = File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; chunk];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    (format!("{:x}", h.finalize()), total)
}

/// Small deterministic generator for offsets.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Disk space used by everything under `dir`, as `du` counts it: a file with several
/// names once.
fn disk_usage(dir: &Path) -> u64 {
    fn walk(dir: &Path, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
            if meta.is_dir() {
                total += walk(&e.path(), seen);
            }
        }
        total
    }
    walk(dir, &mut Default::default())
}

#[test]
fn random_reads_over_a_64_mib_object_return_the_source_bytes() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-random");
    let data = pseudo_random(64 << 20, 7);
    Bucket::new(&env).put_large(&format!("{prefix}video.mp4"), &data);
    let m = TestMount::with_prefix(prefix, &[]);
    let f = File::open(m.path("video.mp4")).unwrap();
    let mut rng = Rng(99);
    for i in 0..400 {
        let len = 1 + rng.below(if i % 4 == 0 { 3 * MIB } else { 70_000 }) as usize;
        let offset = rng.below(data.len() as u64 + 1000);
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = f.read_at(&mut buf[got..], offset + got as u64).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        let start = (offset as usize).min(data.len());
        let end = (offset as usize + len).min(data.len());
        assert_eq!(got, end - start, "read of {len} at {offset}");
        assert!(
            buf[..got] == data[start..end],
            "bytes of the read of {len} at {offset}"
        );
    }
}

#[test]
fn a_300_mib_object_reads_sequentially_with_the_right_sha256_and_bounded_memory() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-seq");
    let data = pseudo_random(300 << 20, 11);
    let want = sha256(&data);
    Bucket::new(&env).put_large(&format!("{prefix}movie.mkv"), &data);
    drop(data);
    let m = TestMount::with_prefix(prefix, &["--cache-size", "64M"]);
    // Synapse streams media in 16 KiB reads.
    let (got, len) = sha256_of_file(&m.path("movie.mkv"), 16 << 10);
    assert_eq!(len, 300 << 20);
    assert_eq!(got, want);
    let (_, peak) = m.memory();
    assert!(peak < 256 * MIB, "peak RSS of the mount {} MiB", peak / MIB);
    // Read ahead in requests of several blocks, not one request per FUSE read.
    let gets = m.requests("get");
    assert!(gets < 300, "{gets} GETs for 300 MiB");
}

#[test]
fn concurrent_readers_of_the_same_and_different_objects_get_their_bytes() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-concurrent");
    let bucket = Bucket::new(&env);
    let objects: Vec<Vec<u8>> = (0..3)
        .map(|i| pseudo_random(24 << 20 | (i * 4097), 100 + i as u64))
        .collect();
    for (i, o) in objects.iter().enumerate() {
        bucket.put_large(&format!("{prefix}o{i}"), o);
    }
    let m = TestMount::with_prefix(prefix, &["--max-memory", "16M"]);
    let want: Vec<String> = objects.iter().map(|o| sha256(o)).collect();
    std::thread::scope(|s| {
        for reader in 0..6usize {
            let (m, want) = (&m, &want);
            s.spawn(move || {
                let i = reader % 3;
                let chunk = [4096, 16 << 10, 128 << 10, 1 << 20, 7000, 64 << 10][reader];
                let (got, _) = sha256_of_file(&m.path(&format!("o{i}")), chunk);
                assert_eq!(got, want[i], "reader {reader} of o{i}");
            });
        }
    });
}

#[test]
fn an_object_replaced_behind_the_mount_is_read_new_after_the_ttl_never_mixed() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-replaced");
    let bucket = Bucket::new(&env);
    let key = format!("{prefix}avatar.png");
    let old = pseudo_random(12 << 20, 1);
    let new = pseudo_random(9 << 20 | 123, 2);
    bucket.put_large(&key, &old);
    let m = TestMount::with_prefix(prefix, &["--metadata-ttl", "300ms"]);
    // Read it once so its blocks are cached, and keep one handle open halfway.
    assert_eq!(
        sha256_of_file(&m.path("avatar.png"), 64 << 10).0,
        sha256(&old)
    );
    let early = File::open(m.path("avatar.png")).unwrap();
    let mut head = vec![0u8; 1 << 20];
    early.read_exact_at(&mut head, 0).unwrap();
    assert!(head == old[..1 << 20]);

    bucket.put_large(&key, &new);
    std::thread::sleep(Duration::from_millis(600)); // past the metadata TTL

    // The handle opened before reads old bytes until its end or an error (EIO, or an
    // early end once the kernel learns the new size); never new bytes.
    let mut offset = 1 << 20;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match early.read_at(&mut buf, offset) {
            Ok(0) => break,
            Ok(n) => {
                assert!(
                    buf[..n] == old[offset as usize..offset as usize + n],
                    "old bytes at {offset}"
                );
                offset += n as u64;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
                break;
            }
        }
    }
    drop(early);

    // A fresh open reads the new object whole, not cached old blocks.
    let mut f = File::open(m.path("avatar.png")).unwrap();
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), new.len());
    assert!(got == new, "a fresh open reads the new object");
    assert_eq!(
        std::fs::metadata(m.path("avatar.png")).unwrap().len(),
        new.len() as u64
    );
}

#[test]
fn the_cache_directory_stays_under_cache_size_and_hot_files_need_no_gets() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-cap");
    let bucket = Bucket::new(&env);
    let cold: Vec<Vec<u8>> = (0..25).map(|i| pseudo_random(8 << 20, 500 + i)).collect();
    for (i, o) in cold.iter().enumerate() {
        bucket.put_large(&format!("{prefix}cold/{i}"), o);
    }
    let hot: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(700_000, 900 + i)).collect();
    for (i, o) in hot.iter().enumerate() {
        bucket.put(&format!("{prefix}hot/{i}"), o);
    }
    let m = TestMount::with_prefix(prefix, &["--cache-size", "32M"]);
    let cap = 32 * MIB;
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak, samples, cache) =
            (done.clone(), peak.clone(), samples.clone(), m.cache.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(disk_usage(&cache), Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    for (i, o) in cold.iter().enumerate() {
        let (got, _) = sha256_of_file(&m.path(&format!("cold/{i}")), 128 << 10);
        assert_eq!(got, sha256(o), "cold/{i}");
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert!(samples.load(Ordering::Relaxed) > 10);
    assert!(
        peak <= cap,
        "the cache directory reached {} bytes with --cache-size 32M",
        peak
    );
    assert!(
        m.metric("s3mediafs_cache_evictions_total") > 0,
        "200 MiB through a 32 MiB cache evicts"
    );

    // A small hot set is read twice: the second time from the block cache alone.
    for (i, o) in hot.iter().enumerate() {
        assert!(std::fs::read(m.path(&format!("hot/{i}"))).unwrap() == *o);
    }
    let gets = m.requests("get");
    let hits = m.metric("s3mediafs_cache_hits_total");
    let reads = r#"s3mediafs_fuse_requests_total{op="read"}"#;
    let mount_reads = m.metric(reads);
    for (i, o) in hot.iter().enumerate() {
        assert!(std::fs::read(m.path(&format!("hot/{i}"))).unwrap() == *o);
    }
    assert_eq!(
        m.requests("get"),
        gets,
        "re-reading cached files sends no GET"
    );
    // From the block cache, or from the pages the kernel kept (the files did not change).
    assert!(
        m.metric("s3mediafs_cache_hits_total") > hits || m.metric(reads) == mount_reads,
        "the re-reads were served by neither the block cache nor the kernel's pages"
    );
    assert!(disk_usage(&m.cache) <= cap);
}

#[test]
fn random_4k_reads_on_a_cold_256_mib_object_fetch_about_one_block_each() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-sparse");
    let data = pseudo_random(256 << 20, 77);
    Bucket::new(&env).put_large(&format!("{prefix}anim.gif"), &data);
    let m = TestMount::with_prefix(prefix, &[]);
    let f = File::open(m.path("anim.gif")).unwrap();
    let before = m.metric("s3mediafs_downloaded_bytes_total");
    let mut rng = Rng(1234);
    let n = 40u64;
    for _ in 0..n {
        // Far apart, as a decoder seeking through frames.
        let offset = rng.below(data.len() as u64 - 4096);
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, offset).unwrap();
        assert!(buf == data[offset as usize..offset as usize + 4096]);
    }
    let fetched = m.metric("s3mediafs_downloaded_bytes_total") - before;
    assert!(
        fetched <= 3 * n * MIB,
        "{n} random 4 KiB reads fetched {} MiB",
        fetched / MIB
    );
}

#[test]
fn files_written_here_are_read_back_without_gets() {
    let m = TestMount::new("read-own");
    let data = pseudo_random(5 << 20 | 17, 3);
    std::fs::write(m.path("upload.jpg"), &data).unwrap();
    assert!(
        std::fs::read(m.path("upload.jpg")).unwrap() == data,
        "read while the upload is pending"
    );
    m.sync();
    assert!(
        std::fs::read(m.path("upload.jpg")).unwrap() == data,
        "read after the upload"
    );
    assert_eq!(m.requests("get"), 0);
    assert!(m.requests("put") + m.requests("upload_part") > 0);
}

#[test]
fn cached_blocks_survive_a_remount() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-remount");
    let data = pseudo_random(6 << 20 | 5, 8);
    Bucket::new(&env).put_large(&format!("{prefix}clip.webm"), &data);
    let mut m = TestMount::with_prefix(prefix, &[]);
    assert!(std::fs::read(m.path("clip.webm")).unwrap() == data);
    assert!(m.requests("get") > 0);
    m.stop();
    m.start(&[]);
    assert!(std::fs::read(m.path("clip.webm")).unwrap() == data);
    assert_eq!(
        m.requests("get"),
        0,
        "the blocks cached before the remount were used"
    );
    // Written by an earlier run: checked block by block once, then passed through.
    assert_eq!(m.metric("s3mediafs_passthrough_checks_total"), 1);
    assert_eq!(m.metric("s3mediafs_passthrough_opens_total"), 1);
    assert!(std::fs::read(m.path("clip.webm")).unwrap() == data);
    assert_eq!(m.metric("s3mediafs_passthrough_checks_total"), 1);
    assert_eq!(m.metric("s3mediafs_passthrough_opens_total"), 2);

    // Without passthrough, the mount reads the cached blocks itself.
    m.stop();
    m.start(&["--no-passthrough"]);
    assert!(std::fs::read(m.path("clip.webm")).unwrap() == data);
    assert_eq!(m.requests("get"), 0);
    assert!(m.metric("s3mediafs_cache_hits_total") > 0);
    assert_eq!(m.metric("s3mediafs_passthrough_opens_total"), 0);
}

/// Blocks are stored just after a read is answered: waits until `n` have been.
fn wait_until_cached(m: &TestMount, n: u64) {
    wait_for(Duration::from_secs(30), || {
        match m.metric("s3mediafs_cache_stored_total") {
            stored if stored >= n => Ok(()),
            stored => Err(format!("{stored} of {n} blocks stored")),
        }
    });
}

/// Waits until no file is passed through: the kernel tells the mount of a close a moment
/// after close() returns.
fn wait_until_released(m: &TestMount) {
    wait_for(Duration::from_secs(10), || {
        match m.metric("s3mediafs_passthrough_open_files") {
            0 => Ok(()),
            n => Err(format!(
                "{n} files still passed through after their readers closed"
            )),
        }
    });
}

#[test]
fn a_fully_cached_file_is_read_by_the_kernel_from_its_cache_file() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-passthrough");
    let data = pseudo_random(16 << 20 | 3, 41);
    Bucket::new(&env).put_large(&format!("{prefix}movie.mp4"), &data);
    let m = TestMount::with_prefix(prefix, &[]);
    let reads = r#"s3mediafs_fuse_requests_total{op="read"}"#;
    assert!(std::fs::read(m.path("movie.mp4")).unwrap() == data);
    assert!(m.metric(reads) > 0, "a cold read goes through the mount");
    wait_until_cached(&m, 17);
    let (gets, before) = (m.requests("get"), m.metric(reads));
    let (sum, len) = sha256_of_file(&m.path("movie.mp4"), 16 << 10);
    assert_eq!((sum, len), (sha256(&data), data.len() as u64));
    assert_eq!(m.metric("s3mediafs_passthrough_opens_total"), 1);
    assert_eq!(m.metric(reads), before, "the mount answered reads itself");
    assert_eq!(m.requests("get"), gets);
    assert_eq!(
        m.metric("s3mediafs_passthrough_checks_total"),
        0,
        "a cache file this mount wrote is trusted until it changes"
    );
    // Random reads through the kernel return the same bytes as the source.
    let f = File::open(m.path("movie.mp4")).unwrap();
    let mut rng = Rng(5);
    for _ in 0..200 {
        let off = rng.below(data.len() as u64);
        let len = rng.below(300 << 10) as usize;
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, off).unwrap();
        let end = (off as usize + len).min(data.len());
        assert!(buf[..n] == data[off as usize..end], "at {off}+{len}");
    }
    drop(f);
    wait_until_released(&m);
}

#[test]
fn a_file_written_here_is_read_by_the_kernel_before_during_and_after_its_upload() {
    let env = S3Env::get();
    let proxy = FaultProxy::start(env.endpoint.trim_start_matches("http://"), policy::none());
    let m = TestMount::via("read-passthrough-local", &proxy.endpoint(), &[]);
    let reads = r#"s3mediafs_fuse_requests_total{op="read"}"#;
    let opens = "s3mediafs_passthrough_opens_total";
    let data = pseudo_random(8 << 20 | 7, 44);
    let expect = (sha256(&data), data.len() as u64);
    // Waiting for upload: the store is away, the sealed copy is all there is.
    proxy.down();
    let disk_before = disk_writes(m.pid());
    std::fs::write(m.path("clip.mp4"), &data).unwrap();
    let before = m.metric(reads);
    assert_eq!(sha256_of_file(&m.path("clip.mp4"), 16 << 10), expect);
    assert_eq!(
        m.metric(opens),
        1,
        "the waiting copy was not passed through"
    );
    // A second reader joins the first while the upload goes on.
    let reader = File::open(m.path("clip.mp4")).unwrap();
    proxy.up();
    assert_eq!(sha256_of_file(&m.path("clip.mp4"), 16 << 10), expect);
    m.sync();
    // Landed while a reader holds the copy: a new reader joins it (the kernel cannot mix
    // backing files, and the content is the same).
    assert_eq!(sha256_of_file(&m.path("clip.mp4"), 16 << 10), expect);
    let mut head = vec![0u8; 4096];
    reader.read_exact_at(&mut head, 1 << 20).unwrap();
    assert!(head[..] == data[1 << 20..(1 << 20) + 4096]);
    drop(reader);
    wait_until_released(&m);
    // Landed: read from the cache the upload filled, again by the kernel, with no GET.
    assert_eq!(sha256_of_file(&m.path("clip.mp4"), 16 << 10), expect);
    assert_eq!(m.metric(opens), 5);
    assert_eq!(m.metric(reads), before, "the mount answered reads itself");
    assert_eq!(m.requests("get"), 0);
    wait_until_released(&m);
    // The cache keeps the sealed copy itself: the file's bytes went to the cache disk
    // once, not once more for the cache.
    let written = disk_writes(m.pid()) - disk_before;
    assert!(
        written < data.len() as u64 * 3 / 2,
        "the mount wrote {written} bytes to disk for a file of {}",
        data.len()
    );
}

/// Bytes process `pid` has had written to disk so far.
fn disk_writes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes in /proc/PID/io")
}

#[test]
fn the_kernel_keeps_its_pages_of_an_unchanged_file_across_opens() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-keep-cache");
    let bucket = Bucket::new(&env);
    let old = pseudo_random(300 << 10, 45);
    let new = pseudo_random(200 << 10, 46);
    bucket.put(&format!("{prefix}thumb.jpg"), &old);
    let m = TestMount::with_prefix(prefix.clone(), &["--metadata-ttl", "1s"]);
    let reads = r#"s3mediafs_fuse_requests_total{op="read"}"#;
    assert!(std::fs::read(m.path("thumb.jpg")).unwrap() == old);
    let before = m.metric(reads);
    assert!(before > 0, "the first read was not answered by the mount");
    for _ in 0..3 {
        assert!(std::fs::read(m.path("thumb.jpg")).unwrap() == old);
    }
    assert_eq!(
        m.metric(reads),
        before,
        "an unchanged file was read again from the mount"
    );
    // Replaced in the bucket: once the mount sees the new version, the old pages go.
    bucket.put(&format!("{prefix}thumb.jpg"), &new);
    wait_for(Duration::from_secs(10), || {
        match std::fs::read(m.path("thumb.jpg")).unwrap() == new {
            true => Ok(()),
            false => Err("the file still reads as the version replaced in the bucket".into()),
        }
    });
    // A file written here: its pages are those of the writes, then of the uploaded object.
    std::fs::write(m.path("thumb.jpg"), &old).unwrap();
    m.sync();
    for _ in 0..2 {
        assert!(std::fs::read(m.path("thumb.jpg")).unwrap() == old);
    }
    // A small one (not passed through): its writes went around the page cache, so the
    // first read fills it from the mount, and later opens read those pages.
    let small = pseudo_random(64 << 10, 47);
    std::fs::write(m.path("small.jpg"), &small).unwrap();
    let before = m.metric(reads);
    assert!(std::fs::read(m.path("small.jpg")).unwrap() == small);
    assert!(
        m.metric(reads) > before,
        "the writes of a write-only handle filled the kernel's page cache"
    );
    let before = m.metric(reads);
    for _ in 0..2 {
        assert!(std::fs::read(m.path("small.jpg")).unwrap() == small);
    }
    assert_eq!(
        m.metric(reads),
        before,
        "a file just written and read here was read again from the mount"
    );
}

/// A file passed through and renamed is opened again under its new name while its first
/// reader still reads it: the new open joins the same cache file.
#[test]
fn a_file_passed_through_opens_again_under_a_new_name() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-passthrough-rename");
    let data = pseudo_random(2 << 20, 44);
    Bucket::new(&env).put(&format!("{prefix}a.bin"), &data);
    let m = TestMount::with_prefix(prefix, &[]);
    assert!(std::fs::read(m.path("a.bin")).unwrap() == data);
    wait_until_cached(&m, 2);
    let reader = File::open(m.path("a.bin")).unwrap();
    assert_eq!(m.metric("s3mediafs_passthrough_open_files"), 1);
    std::fs::rename(m.path("a.bin"), m.path("b.bin")).unwrap();
    let again = std::fs::read(m.path("b.bin")).unwrap();
    assert!(again == data, "the renamed file read other bytes");
    let mut got = vec![0u8; data.len()];
    reader.read_exact_at(&mut got, 0).unwrap();
    assert!(got == data);
}

#[test]
fn a_file_passed_through_is_written_once_its_readers_close() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-passthrough-write");
    let old = pseudo_random(4 << 20, 42);
    let new = pseudo_random(3 << 20, 43);
    Bucket::new(&env).put_large(&format!("{prefix}a.bin"), &old);
    let m = TestMount::with_prefix(prefix, &[]);
    assert!(std::fs::read(m.path("a.bin")).unwrap() == old);
    wait_until_cached(&m, 4);
    let reader = File::open(m.path("a.bin")).unwrap();
    assert_eq!(m.metric("s3mediafs_passthrough_open_files"), 1);
    // Another reader joins it; a writer is refused until the readers close (as Linux
    // refuses to write a running program), and the file is left as it was.
    let second = std::fs::read(m.path("a.bin")).unwrap();
    assert!(second == old);
    for truncate in [false, true] {
        let err = std::fs::OpenOptions::new()
            .write(true)
            .truncate(truncate)
            .open(m.path("a.bin"))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ETXTBSY), "{err}");
    }
    let err = std::fs::write(m.path("a.bin"), &new).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ETXTBSY), "{err}");
    // truncate(2) by path too.
    let path = std::ffi::CString::new(m.path("a.bin").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string path.
    let rc = unsafe { libc::truncate(path.as_ptr(), 0) };
    let err = std::io::Error::last_os_error();
    assert!(
        rc == -1 && err.raw_os_error() == Some(libc::ETXTBSY),
        "{rc} {err}"
    );
    let mut got = vec![0u8; old.len()];
    reader.read_exact_at(&mut got, 0).unwrap();
    assert!(got == old);
    assert_eq!(
        std::fs::metadata(m.path("a.bin")).unwrap().len(),
        old.len() as u64
    );
    drop(reader);
    wait_until_released(&m);
    // Once they have, it is written as usual.
    std::fs::write(m.path("a.bin"), &new).unwrap();
    assert!(std::fs::read(m.path("a.bin")).unwrap() == new);
    m.sync();
    assert_eq!(m.object("a.bin").unwrap(), new);
    assert!(std::fs::read(m.path("a.bin")).unwrap() == new);
}

#[test]
fn a_sequential_reader_gets_a_block_per_kernel_request() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-request-size");
    let data = pseudo_random(16 << 20, 21);
    Bucket::new(&env).put_large(&format!("{prefix}movie.mp4"), &data);
    let m = TestMount::with_prefix(prefix, &[]);
    let reads = r#"s3mediafs_fuse_requests_total{op="read"}"#;
    let before = m.metric(reads);
    let (sum, len) = sha256_of_file(&m.path("movie.mp4"), 16 << 10);
    assert_eq!((sum, len), (sha256(&data), data.len() as u64));
    // 16 KiB application reads, 1 MiB kernel requests: about 16, where the kernel's default
    // 128 KiB readahead would take 128.
    let requests = m.metric(reads) - before;
    assert!(
        requests <= 24,
        "reading 16 MiB took {requests} read requests"
    );
}

#[test]
fn a_writer_refused_because_of_passthrough_readers_never_changes_the_file() {
    let env = S3Env::get();
    let prefix = unique_prefix("read-passthrough-race");
    let bucket = Bucket::new(&env);
    const FILES: usize = 12;
    let data = pseudo_random(2 << 20, 44);
    for i in 0..FILES {
        bucket.put_large(&format!("{prefix}f{i}"), &data);
    }
    let m = TestMount::with_prefix(prefix, &[]);
    for i in 0..FILES {
        assert!(std::fs::read(m.path(&format!("f{i}"))).unwrap() == data);
    }
    wait_until_cached(&m, 2 * FILES as u64);
    let mut refused = 0;
    for i in 0..FILES {
        let path = m.path(&format!("f{i}"));
        // Readers open and close the file without pause, passed through to its cache file.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let f = File::open(&path);
                    std::thread::sleep(Duration::from_micros(300));
                    drop(f);
                }
            })
        };
        let opens = "s3mediafs_passthrough_opens_total";
        let before = m.metric(opens);
        wait_for(Duration::from_secs(10), || match m.metric(opens) {
            n if n > before => Ok(()),
            _ => Err("the readers are not passed through".to_string()),
        });
        // A writer with O_TRUNC races them: it is refused with the file untouched, or it
        // opens and empties the file.
        // Either outcome is right; the writer tries for up to 10 s.
        let _ = poll(
            Duration::from_secs(10),
            || match std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)
            {
                Ok(_) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    refused += 1;
                    let len = std::fs::metadata(&path).unwrap().len();
                    assert_eq!(
                        len,
                        data.len() as u64,
                        "f{i}: the open was refused, yet the file was truncated"
                    );
                    Err("the writer was refused".to_string())
                }
                Err(e) => panic!("f{i}: {e}"),
            },
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap();
    }
    eprintln!("{refused} opens for writing refused while readers were passed through");
    m.sync();
}

#[test]
fn a_local_file_from_128_kib_is_passed_through_and_a_smaller_one_read_through_the_mount() {
    let m = TestMount::with_args("read-small-passthrough", &[]);
    let opens = "s3mediafs_passthrough_opens_total";
    let small = pseudo_random(64 << 10, 47);
    let large = pseudo_random(200 << 10, 48);
    std::fs::write(m.path("thumb.jpg"), &small).unwrap();
    std::fs::write(m.path("photo.jpg"), &large).unwrap();
    assert!(std::fs::read(m.path("thumb.jpg")).unwrap() == small);
    assert_eq!(m.metric(opens), 0, "a 64 KiB file was passed through");
    assert!(std::fs::read(m.path("photo.jpg")).unwrap() == large);
    assert_eq!(m.metric(opens), 1, "a 200 KiB file was not passed through");
    wait_until_released(&m);
}
