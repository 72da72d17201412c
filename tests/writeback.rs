//! Write-back ordering: whatever happens to a file while its upload waits or runs, the
//! bucket ends with exactly its last state; and write-through makes close() wait.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;

use common::*;

#[test]
fn unlink_during_an_inflight_multipart_upload_leaves_nothing() {
    let m = TestMount::new("unlink-inflight");
    let data = pseudo_random(40 << 20, 1);
    fs::write(m.path("video.mp4"), &data).unwrap();
    // The upload (five 8 MiB parts) is under way or queued; delete the file now.
    fs::remove_file(m.path("video.mp4")).unwrap();
    assert_eq!(errno(fs::metadata(m.path("video.mp4"))), libc::ENOENT);
    assert_eq!(
        m.object("video.mp4"),
        None,
        "a deleted file must not reappear"
    );
    assert_eq!(m.keys(""), Vec::<String>::new());
}

#[test]
fn the_last_version_wins_over_pending_uploads() {
    let m = TestMount::new("overwrite-pending");
    fs::write(m.path("thumb"), pseudo_random(12 << 20, 2)).unwrap();
    fs::write(m.path("thumb"), b"second").unwrap();
    let f = File::options().write(true).open(m.path("thumb")).unwrap();
    f.write_all_at(b"S", 0).unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("thumb")).unwrap(), b"Second");
    assert_eq!(m.object("thumb").unwrap(), b"Second");

    // Truncate a file whose upload is pending.
    fs::write(m.path("t"), pseudo_random(3 << 20, 3)).unwrap();
    let c = std::ffi::CString::new(m.path("t").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 10) }, 0);
    assert_eq!(fs::metadata(m.path("t")).unwrap().len(), 10);
    assert_eq!(
        m.object("t").unwrap(),
        pseudo_random(3 << 20, 3)[..10].to_vec()
    );
}

#[test]
fn rename_of_a_pending_file_moves_the_upload() {
    let m = TestMount::new("rename-pending");
    let data = pseudo_random(9 << 20, 4);
    fs::write(m.path("a"), &data).unwrap();
    fs::rename(m.path("a"), m.path("b")).unwrap();
    assert_eq!(fs::read(m.path("b")).unwrap(), data);
    assert_eq!(m.object("a"), None);
    assert_eq!(sha256(&m.object("b").unwrap()), sha256(&data));
    // And back again, over an existing file.
    fs::write(m.path("c"), b"old").unwrap();
    fs::rename(m.path("b"), m.path("c")).unwrap();
    assert_eq!(m.keys(""), vec![m.key("c")]);
    assert_eq!(sha256(&m.object("c").unwrap()), sha256(&data));
}

#[test]
fn mkdir_and_rmdir_go_through_the_queue() {
    let m = TestMount::new("dirs-pending");
    fs::create_dir(m.path("d")).unwrap();
    fs::remove_dir(m.path("d")).unwrap();
    fs::create_dir_all(m.path("e/f")).unwrap();
    fs::write(m.path("e/f/x"), b"x").unwrap();
    assert_eq!(errno(fs::remove_dir(m.path("e/f"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::remove_dir(m.path("e"))), libc::ENOTEMPTY);
    fs::remove_file(m.path("e/f/x")).unwrap();
    fs::remove_dir(m.path("e/f")).unwrap();
    let mut names: Vec<String> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["e"]);
    assert_eq!(m.keys(""), vec![m.key("e/")], "{}", m.log());
}

#[test]
fn files_are_readable_and_listed_while_their_upload_waits() {
    let m = TestMount::new("read-pending");
    fs::create_dir_all(m.path("local_content/ab/cd")).unwrap();
    let mut expected = Vec::new();
    for i in 0..20u64 {
        let rel = format!("local_content/ab/cd/file{i:02}");
        let data = pseudo_random(100_000 + i as usize * 1000, i);
        fs::write(m.path(&rel), &data).unwrap();
        // stat and read straight after close, as Synapse does.
        assert_eq!(fs::metadata(m.path(&rel)).unwrap().len(), data.len() as u64);
        assert_eq!(fs::read(m.path(&rel)).unwrap(), data);
        expected.push(format!("file{i:02}"));
    }
    let mut listed: Vec<String> = fs::read_dir(m.path("local_content/ab/cd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, expected);
}

#[test]
fn write_through_close_returns_once_the_object_is_in_the_bucket() {
    let m = TestMount::with_args("writethrough", &["--write-mode", "writethrough"]);
    let data = pseudo_random(10 << 20, 5);
    fs::write(m.path("f"), &data).unwrap();
    // No sync: close() itself waited.
    let direct = Bucket::new(&m.env)
        .get(&m.key("f"))
        .expect("in the bucket when close returned");
    assert_eq!(sha256(&direct), sha256(&data));
}

#[test]
fn fsync_returns_once_the_object_is_in_the_bucket() {
    let m = TestMount::new("fsync-wb");
    let data = pseudo_random(17 << 20, 6);
    let mut f = File::create(m.path("f")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    let direct = Bucket::new(&m.env)
        .get(&m.key("f"))
        .expect("in the bucket when fsync returned");
    assert_eq!(sha256(&direct), sha256(&data));
}

/// Every fork+exec elsewhere in the process closes the child's copies of open descriptors,
/// and each such close is a FLUSH of the file being written: commits then race with the
/// writes and with the final close. The object must still end as what the last close saw.
#[test]
fn flushes_from_forked_children_never_cost_the_final_close() {
    let m = TestMount::new("fork-flush");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::process::Command::new("true").status();
            }
        })
    };
    let mut expected = Vec::new();
    for i in 0..6u64 {
        let data = pseudo_random(6 << 20, 40 + i);
        let mut f = std::fs::File::create(m.path(&format!("f{i}"))).unwrap();
        for chunk in data.chunks(64 << 10) {
            std::io::Write::write_all(&mut f, chunk).unwrap();
        }
        drop(f);
        expected.push(data);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    forker.join().unwrap();
    for (i, data) in expected.iter().enumerate() {
        let got = m.object(&format!("f{i}")).expect("uploaded");
        assert_eq!(got.len(), data.len(), "f{i}");
        assert_eq!(sha256(&got), sha256(data), "f{i}");
    }
}

#[test]
fn flushes_racing_writes_never_fail_or_lose_a_write() {
    use std::os::fd::AsRawFd;
    let m = TestMount::new("flush-race");
    let data = pseudo_random(8 << 20, 77);
    let f = File::create(m.path("f")).unwrap();
    let fd = f.as_raw_fd();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Another holder of the descriptor closes its copy over and over: each close is a FLUSH
    // that commits the file while the owner keeps writing.
    let flusher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut flushes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: dup of a descriptor the test keeps open, closed at once.
                let copy = unsafe { libc::dup(fd) };
                assert!(copy >= 0);
                unsafe { libc::close(copy) };
                flushes += 1;
            }
            flushes
        })
    };
    for (i, chunk) in data.chunks(4096).enumerate() {
        f.write_all_at(chunk, (i * 4096) as u64)
            .unwrap_or_else(|e| panic!("write {i} failed while flushes raced it: {e}"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flushes = flusher.join().unwrap();
    drop(f);
    eprintln!("{flushes} flushes raced 2048 writes");
    assert_eq!(sha256(&fs::read(m.path("f")).unwrap()), sha256(&data));
    assert_eq!(m.object("f").map(|d| sha256(&d)), Some(sha256(&data)));
}

/// The bodies of uploads being sent share one memory budget (`--max-memory`), however many
/// large files upload at once: with the store slow to take them, twelve 30 MiB files
/// (forty-eight 5 MiB parts in flight without the budget) keep the mount's memory low.
#[test]
fn upload_bodies_in_flight_share_one_memory_budget() {
    use common::faults::{Fault, FaultProxy, RequestInfo};
    use std::sync::Arc;
    use std::time::Duration;
    let env = S3Env::get();
    let proxy = FaultProxy::start(
        env.endpoint.trim_start_matches("http://"),
        Arc::new(|r: &RequestInfo| {
            r.is_upload()
                .then_some(Fault::Delay(Duration::from_millis(600)))
        }),
    );
    let m = TestMount::via(
        "upload-memory",
        &proxy.endpoint(),
        &["--part-size", "5M", "--max-memory", "16M"],
    );
    let (_, before) = m.memory();
    let files: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| (format!("v{i}.mp4"), pseudo_random(30 << 20, i)))
        .collect();
    for (name, data) in &files {
        fs::write(m.path(name), data).unwrap();
    }
    m.sync();
    let (_, peak) = m.memory();
    eprintln!("peak RSS {} MiB, {} MiB before", peak >> 20, before >> 20);
    // 16 MiB of bodies, the copies the client makes of them while it sends, and what the
    // allocator keeps: about 75 MiB here, against 200 MiB with no shared budget.
    assert!(
        peak < before + (100 << 20),
        "peak RSS {} MiB, {} MiB before the uploads",
        peak >> 20,
        before >> 20
    );
    for (name, data) in files.iter().step_by(5) {
        assert_eq!(m.object(name).as_ref(), Some(data), "{name}");
    }
}
