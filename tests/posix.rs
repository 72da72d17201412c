//! POSIX behaviour through a real mount: the errnos callers rely on, files unlinked while
//! open, overwrite, truncate, random writes, append, rename, and names S3 keys allow.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::time::Duration;

use common::*;

#[test]
fn errnos_match_a_local_filesystem() {
    let m = TestMount::new("errnos");
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"x").unwrap();
    fs::write(m.path("file"), b"y").unwrap();

    assert_eq!(errno(fs::create_dir(m.path("d"))), libc::EEXIST);
    assert_eq!(errno(fs::metadata(m.path("missing"))), libc::ENOENT);
    assert_eq!(errno(fs::metadata(m.path("missing/deeper"))), libc::ENOENT);
    assert_eq!(errno(File::open(m.path("missing"))), libc::ENOENT);
    assert_eq!(errno(fs::remove_dir(m.path("d"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::remove_dir(m.path("missing"))), libc::ENOENT);
    assert_eq!(errno(fs::remove_file(m.path("missing"))), libc::ENOENT);
    assert_eq!(errno(File::create(m.path("d"))), libc::EISDIR);
    assert_eq!(errno(fs::remove_file(m.path("d"))), libc::EISDIR);
    assert_eq!(errno(fs::remove_dir(m.path("file"))), libc::ENOTDIR);
    assert_eq!(errno(fs::create_dir(m.path("file/sub"))), libc::ENOTDIR);
    assert_eq!(errno(File::create(m.path("file/sub"))), libc::ENOTDIR);
    assert_eq!(errno(fs::read_dir(m.path("file"))), libc::ENOTDIR);

    let long = "n".repeat(256);
    assert_eq!(errno(File::create(m.path(&long))), libc::ENAMETOOLONG);
    assert_eq!(errno(fs::create_dir(m.path(&long))), libc::ENAMETOOLONG);
    File::create(m.path(&"n".repeat(255))).unwrap();
}

#[test]
fn keys_longer_than_s3_allows_are_refused_before_any_request() {
    // A long prefix stands in for deep directories: S3 keys end at 1024 bytes.
    let prefix = format!("{}{}/", unique_prefix("longkey"), "p".repeat(880));
    let m = TestMount::with_prefix(prefix.clone(), &[]);
    let room = 1024 - prefix.len();
    assert_eq!(
        errno(File::create(m.path(&"n".repeat(room + 1)))),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno(fs::create_dir(m.path(&"d".repeat(room)))),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno(fs::metadata(m.path(&"n".repeat(room + 1)))),
        libc::ENAMETOOLONG
    );
    assert!(Bucket::new(&m.env).keys(&prefix).is_empty());
}

#[test]
fn unlinked_or_renamed_file_stays_readable_through_open_handles() {
    let m = TestMount::new("unlinked");
    let data = pseudo_random(300_000, 7);
    fs::write(m.path("f"), &data).unwrap();
    // In the bucket: an unlink of a file whose upload has not begun drops the upload.
    m.sync();
    let mut reader = File::open(m.path("f")).unwrap();
    let mut first = vec![0u8; 1000];
    reader.read_exact(&mut first).unwrap();
    fs::remove_file(m.path("f")).unwrap();
    assert_eq!(errno(fs::metadata(m.path("f"))), libc::ENOENT);
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert_eq!([first, rest].concat(), data);
    // The reader reads the object: it is deleted once the last handle closes.
    assert_eq!(m.object("f").as_deref(), Some(&data[..]));
    drop(reader);
    wait_for(Duration::from_secs(10), || match m.object("f") {
        None => Ok(()),
        Some(_) => Err("the object of a file unlinked while open outlived its last close".into()),
    });

    // The same for a file unlinked while it is still being written.
    let mut w = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("g"))
        .unwrap();
    w.write_all(b"written before unlink").unwrap();
    fs::remove_file(m.path("g")).unwrap();
    w.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    w.read_to_string(&mut s).unwrap();
    assert_eq!(s, "written before unlink");
    drop(w);
    assert_eq!(m.object("g"), None, "an unlinked file must not be uploaded");

    // An object of 40 MiB another host put, opened, and its first page read from the bucket.
    let open_reading = |name: &str, seed: u64| {
        let data = pseudo_random(40 << 20, seed);
        Bucket::new(&m.env).put(&m.key(name), &data);
        let mut reader = File::open(m.path(name)).unwrap();
        let mut first = vec![0u8; 4096];
        reader.read_exact(&mut first).unwrap();
        (data, reader, first)
    };

    // A file renamed while a handle reads it from the bucket: the handle reads on.
    let (big, mut reader, first) = open_reading("v.mp4", 8);
    fs::rename(m.path("v.mp4"), m.path("w.mp4")).unwrap();
    // Longer than deletes wait to be gathered: a delete of the old key not deferred lands.
    std::thread::sleep(Duration::from_secs(1));
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(
        [first, rest].concat() == big,
        "the renamed file read other bytes"
    );
    drop(reader);
    wait_for(Duration::from_secs(10), || match m.object("v.mp4") {
        None => Ok(()),
        Some(_) => Err("the old name's object outlived the reader's close".into()),
    });
    assert!(
        m.object("w.mp4") == Some(big),
        "the new name lacks the content"
    );

    // Its old name taken by a new file (log rotation: `mv log log.1`, a new `log`): the
    // handle reads on, from the name the file has now.
    let (old, mut reader, first) = open_reading("log", 9);
    fs::rename(m.path("log"), m.path("log.1")).unwrap();
    fs::write(m.path("log"), b"a new log").unwrap();
    m.sync();
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(
        [first, rest].concat() == old,
        "the rotated file read other bytes"
    );
}

#[test]
fn overwrite_truncate_append_and_random_writes() {
    let m = TestMount::new("rewrite");

    fs::write(m.path("o"), b"a rather long first version").unwrap();
    fs::write(m.path("o"), b"short").unwrap();
    assert_eq!(fs::read(m.path("o")).unwrap(), b"short");
    assert_eq!(m.object("o").unwrap(), b"short");

    // Random writes, out of order and with a hole, against a local model.
    let mut model = vec![0u8; 0];
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path("r"))
        .unwrap();
    for (off, len, seed) in [
        (100_000u64, 5000usize, 1u64),
        (0, 300, 2),
        (50, 70_000, 3),
        (200_000, 10, 4),
    ] {
        let chunk = pseudo_random(len, seed);
        f.write_all_at(&chunk, off).unwrap();
        let end = off as usize + len;
        if model.len() < end {
            model.resize(end, 0);
        }
        model[off as usize..end].copy_from_slice(&chunk);
    }
    let mut back = vec![0u8; model.len()];
    f.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, model);
    // Truncate through the open handle, shorter then longer.
    f.set_len(150_000).unwrap();
    model.truncate(150_000);
    f.set_len(160_000).unwrap();
    model.resize(160_000, 0);
    drop(f);
    assert_eq!(fs::metadata(m.path("r")).unwrap().len(), 160_000);
    assert_eq!(sha256(&fs::read(m.path("r")).unwrap()), sha256(&model));
    assert_eq!(sha256(&m.object("r").unwrap()), sha256(&model));

    // Random write into an existing object (no O_TRUNC): the rest is kept.
    let f = OpenOptions::new().write(true).open(m.path("r")).unwrap();
    f.write_all_at(b"PATCH", 10).unwrap();
    drop(f);
    model[10..15].copy_from_slice(b"PATCH");
    assert_eq!(sha256(&m.object("r").unwrap()), sha256(&model));

    // truncate(2) on a closed file.
    let c = std::ffi::CString::new(m.path("r").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::truncate(c.as_ptr(), 1000) }, 0);
    model.truncate(1000);
    assert_eq!(fs::read(m.path("r")).unwrap(), model);
    assert_eq!(m.object("r").unwrap(), model);

    // O_RDONLY | O_TRUNC: Linux empties the file (given write permission); so does the object.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_TRUNC)
        .open(m.path("r"))
        .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 0);
    drop(f);
    assert_eq!(fs::read(m.path("r")).unwrap(), b"");
    assert_eq!(m.object("r").unwrap(), b"");

    // Append.
    fs::write(m.path("log"), b"one\n").unwrap();
    let mut a = OpenOptions::new().append(true).open(m.path("log")).unwrap();
    a.write_all(b"two\n").unwrap();
    drop(a);
    assert_eq!(fs::read(m.path("log")).unwrap(), b"one\ntwo\n");
    assert_eq!(m.object("log").unwrap(), b"one\ntwo\n");

    // An empty file is an empty object.
    File::create(m.path("empty")).unwrap();
    assert_eq!(fs::metadata(m.path("empty")).unwrap().len(), 0);
    assert_eq!(m.object("empty").unwrap(), b"");
}

#[test]
fn a_reader_sees_at_once_what_a_write_only_handle_writes() {
    // A write-only handle's writes go around the kernel's page cache; pages another handle
    // read before must not hide them.
    let m = TestMount::new("write-only-coherence");
    let old = pseudo_random(64 << 10, 8);
    fs::write(m.path("f"), &old).unwrap();
    let writer = OpenOptions::new().write(true).open(m.path("f")).unwrap();
    let reader = File::open(m.path("f")).unwrap();
    let mut back = vec![0u8; old.len()];
    reader.read_exact_at(&mut back, 0).unwrap();
    assert!(back == old);
    let reads = r#"s3mediafs_fuse_requests_total{op="read"}"#;
    let before = m.metric(reads);
    reader.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(
        m.metric(reads),
        before,
        "the reader's pages were not cached"
    );
    for (off, patch) in [(4096u64, &b"PATCH"[..]), (70_000, b"past the old end")] {
        writer.write_all_at(patch, off).unwrap();
        let mut got = vec![0u8; patch.len()];
        reader.read_exact_at(&mut got, off).unwrap();
        assert_eq!(got, patch, "the reader saw old bytes at {off}");
    }
    drop((writer, reader));
    let mut model = old;
    model[4096..4101].copy_from_slice(b"PATCH");
    model.resize(70_000, 0);
    model.extend_from_slice(b"past the old end");
    assert!(fs::read(m.path("f")).unwrap() == model);
    assert!(m.object("f").unwrap() == model);
}

#[test]
fn rename_moves_the_object() {
    let m = TestMount::new("rename");
    fs::create_dir_all(m.path("a")).unwrap();
    fs::create_dir_all(m.path("b")).unwrap();
    let data = pseudo_random(123_456, 5);
    fs::write(m.path("a/src"), &data).unwrap();
    fs::rename(m.path("a/src"), m.path("b/dst")).unwrap();
    assert_eq!(errno(fs::metadata(m.path("a/src"))), libc::ENOENT);
    assert_eq!(fs::read(m.path("b/dst")).unwrap(), data);
    assert_eq!(m.object("a/src"), None);
    assert_eq!(m.object("b/dst"), Some(data.clone()));
    assert!(
        fs::metadata(m.path("a")).unwrap().is_dir(),
        "the emptied directory stays"
    );

    // Over an existing file.
    fs::write(m.path("b/other"), b"old").unwrap();
    fs::rename(m.path("b/dst"), m.path("b/other")).unwrap();
    assert_eq!(fs::read(m.path("b/other")).unwrap(), data);
    assert_eq!(m.object("b/other"), Some(data));

    // The temp-file-and-rename pattern of many tools, while the file is still open.
    let mut t = File::create(m.path("b/.tmp")).unwrap();
    t.write_all(b"atomic").unwrap();
    t.flush().unwrap();
    fs::rename(m.path("b/.tmp"), m.path("b/final")).unwrap();
    drop(t);
    assert_eq!(fs::read(m.path("b/final")).unwrap(), b"atomic");
    assert_eq!(m.object("b/final").unwrap(), b"atomic");
    assert_eq!(m.object("b/.tmp"), None);

    assert_eq!(
        errno(fs::rename(m.path("missing"), m.path("x"))),
        libc::ENOENT
    );
    assert_eq!(
        errno(fs::rename(m.path("b/final"), m.path("a"))),
        libc::EISDIR
    );
    // Directories are not renamed in place; `mv` falls back to copying on EXDEV.
    assert_eq!(errno(fs::rename(m.path("a"), m.path("c"))), libc::EXDEV);
}

#[test]
fn metadata_changes_are_accepted_and_modes_are_mount_wide() {
    let m = TestMount::with_args("modes", &["--file-mode", "0640", "--dir-mode", "0750"]);
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/f"), b"x").unwrap();
    assert_eq!(
        fs::metadata(m.path("d")).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    assert_eq!(
        fs::metadata(m.path("d/f")).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    // cp -a / rsync -a set modes and times; that must succeed.
    fs::set_permissions(m.path("d/f"), fs::Permissions::from_mode(0o600)).unwrap();
    let f = File::options().write(true).open(m.path("d/f")).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    drop(f);
    assert_eq!(fs::read(m.path("d/f")).unwrap(), b"x");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(m.path("d"))
        .arg(m.path("copy"))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(fs::read(m.path("copy/f")).unwrap(), b"x");
}

#[test]
fn names_with_odd_characters_round_trip() {
    let m = TestMount::new("names");
    let names = [
        "a b",
        "x:y",
        "[::1]:8448",
        "100%",
        "a+b",
        "ünïcødé ✓",
        "semi;colon",
        "q?u#e&r=y",
    ];
    for (i, n) in names.iter().enumerate() {
        fs::create_dir_all(m.path(&format!("dir {n}"))).unwrap();
        let rel = format!("dir {n}/{n}");
        fs::write(m.path(&rel), format!("content {i}")).unwrap();
        assert_eq!(
            m.object(&rel).unwrap(),
            format!("content {i}").as_bytes(),
            "{rel}"
        );
        assert_eq!(
            fs::read_to_string(m.path(&rel)).unwrap(),
            format!("content {i}")
        );
    }
    let mut listed: Vec<String> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listed.sort();
    let mut want: Vec<String> = names.iter().map(|n| format!("dir {n}")).collect();
    want.sort();
    assert_eq!(listed, want);
    // Renames and deletes work on them too.
    fs::rename(m.path("dir 100%/100%"), m.path("dir a+b/moved ✓")).unwrap();
    assert_eq!(m.object("dir a+b/moved ✓").unwrap(), b"content 3");
    fs::remove_dir_all(m.path("dir [::1]:8448")).unwrap();
    assert!(m.keys("dir [::1]:8448/").is_empty());
}

#[test]
fn fsync_and_statfs_answer() {
    let m = TestMount::new("fsync");
    let mut f = File::create(m.path("f")).unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_all().unwrap();
    assert_eq!(Bucket::new(&m.env).get(&m.key("f")).unwrap(), b"synced");
    drop(f);
    let st = statfs(&m.mnt);
    assert!(st.f_bavail > 0 && st.f_namelen == 255);
}
