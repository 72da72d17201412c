//! Durability: a file whose close() succeeded is never lost, even when the mount process
//! is killed with SIGKILL before uploading it.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::IntoRawFd;
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

/// Writes a file and closes it; Ok only if every call, close() included, succeeded.
fn write_closed(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap())?;
    let mut f = std::fs::File::create(path)?;
    for chunk in data.chunks(65536) {
        f.write_all(chunk)?;
    }
    let fd = f.into_raw_fd();
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn files_closed_before_a_sigkill_are_all_in_the_bucket_after_remount() {
    let mut m = TestMount::new("crash");
    let recorded: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // The writer says when it has just closed a 20 MiB file past the 520th: its upload is
    // then surely still running, so the kill leaves work for the journal.
    let (kill_now, kill_signal) = std::sync::mpsc::channel();
    let writer = {
        let (mnt, recorded, stop) = (m.mnt.clone(), recorded.clone(), stop.clone());
        std::thread::spawn(move || {
            for i in 1..=2000u64 {
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
    };
    // Kill the mount mid-run.
    kill_signal
        .recv_timeout(Duration::from_secs(600))
        .unwrap_or_else(|_| panic!("the writer did not get far enough:\n{}", m.log()));
    m.kill();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
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

    // Remount with the same cache directory: the journal is replayed first.
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
    assert!(
        m.log()
            .contains("resuming changes journaled by an earlier run"),
        "{}",
        m.log()
    );
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
