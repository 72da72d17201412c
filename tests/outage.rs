//! The mount keeps accepting writes while the S3 server is unreachable or slow, keeps the
//! cache within its dirty budget, and drains pending uploads when it is stopped.

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::proxy::Proxy;
use common::*;

fn server_addr(env: &S3Env) -> String {
    env.endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

#[test]
fn writes_and_reads_work_while_the_store_is_down_and_upload_when_it_is_back() {
    let env = S3Env::get();
    let proxy = Proxy::start(&server_addr(&env));
    let m = TestMount::via("outage", &proxy.endpoint(), &[]);
    fs::create_dir_all(m.path("local_content/ab/cd")).unwrap();
    fs::write(m.path("local_content/ab/cd/before"), b"before the outage").unwrap();
    m.sync();

    proxy.down();
    let mut written = Vec::new();
    for i in 0..5u64 {
        let rel = format!("local_content/ab/cd/during{i}");
        let data = pseudo_random(50_000 + i as usize, i);
        fs::write(m.path(&rel), &data).unwrap();
        assert_eq!(fs::metadata(m.path(&rel)).unwrap().len(), data.len() as u64);
        assert_eq!(fs::read(m.path(&rel)).unwrap(), data);
        written.push((rel, data));
    }
    // A new directory tree, made during the outage.
    fs::create_dir_all(m.path("local_thumbnails/xy/zw/abcdefghijklmnopqrst")).unwrap();
    let thumb = "local_thumbnails/xy/zw/abcdefghijklmnopqrst/32-32-image-jpeg-crop";
    fs::write(m.path(thumb), b"thumbnail").unwrap();
    assert_eq!(fs::read(m.path(thumb)).unwrap(), b"thumbnail");
    written.push((thumb.to_string(), b"thumbnail".to_vec()));
    let bucket = Bucket::new(&env);
    for (rel, _) in &written {
        assert_eq!(
            bucket.get(&m.key(rel)),
            None,
            "{rel} cannot be in the bucket during the outage"
        );
    }
    assert!(
        m.log().contains("the object store is unreachable"),
        "{}",
        m.log()
    );

    proxy.up();
    m.sync();
    for (rel, data) in &written {
        assert_eq!(
            bucket.get(&m.key(rel)).as_deref(),
            Some(&data[..]),
            "{rel} after the outage"
        );
    }
}

/// Bytes of files under `dir`, leaving out the clean block cache (bounded on its own by
/// --cache-size).
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "objects")
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn writers_wait_when_the_dirty_budget_is_full() {
    let env = S3Env::get();
    let proxy = Proxy::start(&server_addr(&env));
    proxy.throttle(8 << 20);
    let m = TestMount::via("budget", &proxy.endpoint(), &["--max-dirty", "4M"]);
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (cache, peak, done) = (m.cache.clone(), peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(dir_size(&cache), Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    const FILE: usize = 2 << 20;
    for i in 0..16u64 {
        fs::write(m.path(&format!("f{i}")), pseudo_random(FILE, i)).unwrap();
    }
    m.sync();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    // The budget, plus the file being written and the one that crossed the line.
    let bound = (4 << 20) + 2 * FILE as u64 + 64 * 1024;
    assert!(
        peak <= bound,
        "the cache directory reached {peak} bytes, over {bound}"
    );
    assert!(peak > 0);
    for i in 0..16u64 {
        assert_eq!(
            m.object(&format!("f{i}")).map(|d| sha256(&d)),
            Some(sha256(&pseudo_random(FILE, i))),
            "f{i}"
        );
    }
}

#[test]
fn sigterm_uploads_what_is_pending_before_exiting() {
    let env = S3Env::get();
    let proxy = Proxy::start(&server_addr(&env));
    proxy.throttle(16 << 20);
    let mut m = TestMount::via("drain", &proxy.endpoint(), &[]);
    let files: Vec<(String, Vec<u8>)> = (0..3u64)
        .map(|i| (format!("v{i}.mp4"), pseudo_random(8 << 20, i)))
        .collect();
    for (rel, data) in &files {
        fs::write(m.path(rel), data).unwrap();
    }
    let status = m.terminate();
    assert!(status.success(), "{status}\n{}", m.log());
    assert!(!is_mounted(&m.mnt));
    let bucket = Bucket::new(&env);
    for (rel, data) in &files {
        assert_eq!(
            bucket.get(&m.key(rel)).map(|d| sha256(&d)),
            Some(sha256(data)),
            "{rel}"
        );
    }
}

#[test]
fn a_full_cache_disk_fails_the_write_with_enospc_and_harms_nothing_committed() {
    let env = S3Env::get();
    // A cache directory on a 16 MiB tmpfs, and uploads slowed so files wait there.
    let proxy = Proxy::start(&server_addr(&env));
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("small");
    fs::create_dir(&cache).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(st.success(), "mounting a tmpfs for the cache needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(cache.clone());
    let cache_s = cache.to_str().unwrap().to_string();
    let m = TestMount::via("enospc", &proxy.endpoint(), &["--cache-dir", &cache_s]);

    let kept = pseudo_random(2 << 20, 1);
    fs::write(m.path("kept"), &kept).unwrap();
    proxy.down();
    let big = pseudo_random(32 << 20, 2);
    let err = fs::write(m.path("too-big"), &big).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    // What was committed before is intact and readable, and the mount still works.
    assert_eq!(fs::read(m.path("kept")).unwrap(), kept);
    // The partial file is committed at close like on any disk; deleting it frees the space
    // once its upload is dropped in favour of the delete.
    fs::remove_file(m.path("too-big")).unwrap();
    proxy.up();
    m.sync();
    fs::write(m.path("after"), b"still writable").unwrap();
    assert_eq!(m.object("kept"), Some(kept));
    assert_eq!(m.object("after").unwrap(), b"still writable");
}
