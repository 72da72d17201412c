//! Durability: a file whose close() succeeded is never lost, even when the mount process
//! is killed with SIGKILL before uploading it.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// A Synapse-shaped path for file `i`, with a size from 1 KiB to 20 MiB.
fn media(i: u64) -> (String, usize) {
    let id: String = pseudo_random(24, i)
        .iter()
        .map(|b| (b'a' + b % 26) as char)
        .collect();
    let kind = if i % 3 == 0 {
        "local_thumbnails"
    } else {
        "local_content"
    };
    let rel = if kind == "local_thumbnails" {
        format!(
            "{kind}/{}/{}/{}/320-240-image-jpeg-scale",
            &id[0..2],
            &id[2..4],
            &id[4..]
        )
    } else {
        format!("{kind}/{}/{}/{}", &id[0..2], &id[2..4], &id[4..])
    };
    let size = match i {
        i if i % 150 == 0 => 20 << 20,
        i if i % 40 == 0 => 3 << 20,
        i => 1024 + (i as usize * 7919) % (96 << 10),
    };
    (rel, size)
}

/// Writers closing files at the same time: their closes share journal fsyncs.
const WRITERS: u64 = 64;

#[test]
fn files_closed_before_a_sigkill_are_all_in_the_bucket_after_remount() {
    let mut m = TestMount::new("crash");
    let recorded: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // A writer says when it has just closed a 20 MiB file past the 520th acknowledged: its
    // upload is then surely still running, so the kill leaves work for the journal, and
    // the other writers are in the middle of their closes.
    let (kill_now, kill_signal) = std::sync::mpsc::channel();
    // The writers reach the mount through a descriptor of its root: once the mount is
    // killed and lazily unmounted, their paths fail instead of falling through to the
    // directory underneath (which would then hold files, and the remount would refuse it).
    let root = File::open(&m.mnt).unwrap();
    let root_path = std::path::PathBuf::from(format!("/proc/self/fd/{}", root.as_raw_fd()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (mnt, recorded, stop) = (root_path.clone(), recorded.clone(), stop.clone());
            let kill_now = kill_now.clone();
            std::thread::spawn(move || {
                for i in (1 + w..=4000u64).step_by(WRITERS as usize) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (rel, size) = media(i);
                    let data = pseudo_random(size, i);
                    let sha = sha256(&data);
                    if let Err(e) = write_closed(&mnt.join(&rel), &data) {
                        if !stop.load(Ordering::Relaxed) {
                            eprintln!("writing {rel} failed: {e}");
                        }
                        break;
                    }
                    let n = {
                        let mut r = recorded.lock().unwrap();
                        r.insert(rel, sha);
                        r.len()
                    };
                    if n >= 520 && size == 20 << 20 {
                        let _ = kill_now.send(());
                    }
                }
            })
        })
        .collect();
    drop(kill_now);
    // Kill the mount mid-run.
    kill_signal
        .recv_timeout(Duration::from_secs(600))
        .unwrap_or_else(|_| panic!("the writer did not get far enough:\n{}", m.log()));
    // Left mounted, dead, as a crash leaves it: the next mount clears it by itself.
    m.kill_process();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    drop(root);
    let recorded = recorded.lock().unwrap().clone();
    assert!(recorded.len() >= 520);

    let bucket = Bucket::new(&m.env);
    let missing_at_kill = recorded
        .keys()
        .filter(|rel| bucket.get(&m.key(rel)).is_none())
        .count();
    eprintln!(
        "{} files acknowledged, {missing_at_kill} not yet in the bucket when the mount was killed",
        recorded.len()
    );
    assert!(
        missing_at_kill > 0,
        "the kill came after every upload finished, so recovery went untested:\n{}",
        m.log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Remount with the same cache directory, on the dead mount: the journal is replayed
    // first.
    m.start(&[]);
    for (rel, sha) in recorded.iter().take(50) {
        // The mount shows them at once, before the uploads finish.
        assert_eq!(
            &sha256(&std::fs::read(m.path(rel)).unwrap()),
            sha,
            "{rel} through the mount"
        );
    }
    m.sync();
    for (rel, sha) in &recorded {
        let data = bucket
            .get(&m.key(rel))
            .unwrap_or_else(|| panic!("{rel} was acknowledged but is not in the bucket"));
        assert_eq!(&sha256(&data), sha, "{rel} in the bucket");
    }
    for said in [
        "resuming changes journaled by an earlier run",
        "the mountpoint holds the dead mount of an s3mediafs process",
    ] {
        assert!(m.log().contains(said), "{said}: {}", m.log());
    }
}

#[test]
fn a_file_renamed_while_open_and_changed_survives_a_sigkill_under_its_new_name() {
    let mut m = TestMount::new("crash-rename");
    let bucket = Bucket::new(&m.env);
    let closed = pseudo_random(200_000, 7);
    std::fs::write(m.path("a"), &closed).unwrap();
    m.sync();
    // A writer changes the file and keeps it open while it is renamed.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("a"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"changed", 0).unwrap();
    std::fs::rename(m.path("a"), m.path("b")).unwrap();
    let old_key = m.key("a");
    wait_for(Duration::from_secs(30), || match bucket.get(&old_key) {
        None => Ok(()),
        Some(_) => Err("the old name is still in the bucket".to_string()),
    });
    // The old name is gone from the bucket and the writer has not closed: a crash now.
    m.kill();
    drop(f);
    m.start(&[]);
    m.sync();
    let got = bucket.get(&m.key("b")).unwrap_or_else(|| {
        panic!(
            "the content closed before the rename is under neither name:\n{}",
            m.log()
        )
    });
    let mut changed = closed.clone();
    changed[..7].copy_from_slice(b"changed");
    assert!(
        got == closed || got == changed,
        "b holds neither the closed content nor the changed one"
    );
}

/// The order of the syscalls that make a close durable, read with strace from the running
/// mount. A file larger than a journal record carries: the copy is fdatasynced, renamed
/// beside the journal, the directory it went to is fsynced, and only then is the journal
/// record written and fdatasynced. (On ext4 a journal fsync also commits the rename, so the
/// power-cut test cannot see a missing directory sync; this test does, on any filesystem.)
/// A small file: its content is written in the journal record before the journal's
/// fdatasync, which is all its close waits for.
#[test]
fn a_close_makes_its_data_durable_before_or_with_its_journal_record() {
    let env = S3Env::get();
    let proxy = common::faults::FaultProxy::start(
        env.endpoint.trim_start_matches("http://"),
        common::faults::policy::none(),
    );
    let m = TestMount::via("close-order", &proxy.endpoint(), &["--drain-timeout", "1s"]);
    // Nothing lands while the files are written, so the journal sees only their records.
    proxy.set_policy(Arc::new(|_: &common::faults::RequestInfo| {
        Some(common::faults::Fault::Drop)
    }));
    proxy.refuse_for(Duration::from_secs(3600));
    let trace = m.dir.path().join("strace.out");
    let mut strace = std::process::Command::new("strace")
        .args(["-f", "-y", "-qq", "-e"])
        .arg("trace=openat,rename,renameat,renameat2,fsync,fdatasync,write,pwrite64")
        .arg("-o")
        .arg(&trace)
        .arg("-p")
        .arg(m.pid().to_string())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("strace (Debian's strace package)");
    // strace says nothing when it has attached; a file written until one shows up in the
    // trace tells.
    let mut n = 0;
    wait_for(Duration::from_secs(20), || {
        n += 1;
        std::fs::write(m.path(&format!("warmup{n}")), b"x").unwrap();
        match std::fs::read_to_string(&trace) {
            Ok(t) if t.contains("/pending/") => Ok(()),
            _ => Err("strace did not attach".to_string()),
        }
    });
    const SMALL: usize = 50_000;
    const LARGE: usize = 300_000;
    for i in 0..5 {
        write_closed(&m.path(&format!("f{i}")), &pseudo_random(LARGE, i)).unwrap();
        write_closed(&m.path(&format!("s{i}")), &pseudo_random(SMALL, i)).unwrap();
    }
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    strace.wait().unwrap();
    let log = std::fs::read_to_string(&trace).unwrap();
    // Calls in the order they began (a call split across lines by another thread is taken at
    // its start).
    let calls: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("resumed>"))
        .map(|l| l.split_once(' ').map_or(l, |(_, c)| c.trim_start()))
        .collect();
    let renames: Vec<usize> = (0..calls.len())
        .filter(|&i| calls[i].starts_with("rename") && calls[i].contains("/pending/"))
        .collect();
    assert!(renames.len() >= 10, "{} seals seen:\n{log}", renames.len());
    // Bytes a write to the journal wrote (its count argument, after the data strace cuts
    // short).
    let journal_write = |c: &str| -> usize {
        if !(c.starts_with("write(") && c.contains("/journal>")) {
            return 0;
        }
        c.split_once("\"..., ")
            .and_then(|(_, rest)| rest.split(|ch: char| !ch.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let mut small = 0;
    for &r in &renames[renames.len() - 10..] {
        let call = calls[r];
        let next_journal_sync = calls[r..]
            .iter()
            .position(|c| c.starts_with("fdatasync(") && c.contains("/journal>"))
            .map(|p| r + p)
            .unwrap_or_else(|| panic!("no journal sync after {call}:\n{log}"));
        let record = calls[r..next_journal_sync]
            .iter()
            .map(|c| journal_write(c))
            .max()
            .unwrap_or(0);
        if record >= SMALL {
            // The record carries the content: nothing else to sync.
            small += 1;
            continue;
        }
        // The copy's own path, as renamed from.
        let from = call.split('"').nth(1).unwrap_or_default();
        let synced_before = calls[..r]
            .iter()
            .any(|c| (c.starts_with("fdatasync(") || c.starts_with("fsync(")) && c.contains(from));
        assert!(
            synced_before,
            "{from} renamed before its data was synced:\n{log}"
        );
        let dir_synced = calls[r..next_journal_sync]
            .iter()
            .any(|c| c.starts_with("fsync(") && c.contains("/pending>"));
        assert!(
            dir_synced,
            "the journal was synced before the directory of {call}:\n{log}"
        );
        let record_written = calls[r..next_journal_sync]
            .iter()
            .any(|c| c.starts_with("write(") && c.contains("/journal>"));
        assert!(record_written, "no journal record after {call}:\n{log}");
    }
    assert_eq!(
        small, 5,
        "the records of the five small files should carry their content:\n{log}"
    );
}
