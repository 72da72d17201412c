//! Buckets written by other tools mount as they are, and what the mount writes is plain
//! objects other tools can read.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;

use common::*;

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn objects_put_directly_appear_as_files_and_directories() {
    let env = S3Env::get();
    let bucket = Bucket::new(&env);
    let prefix = unique_prefix("interop");
    // What `aws s3 sync` or synapse-s3-storage-provider leave: nested keys, no markers.
    let objects: Vec<(&str, Vec<u8>)> = vec![
        (
            "local_content/ab/cd/efghijklmnopqrstuvwx",
            pseudo_random(70_000, 1),
        ),
        (
            "local_content/ab/cd/zzzzzzzzzzzzzzzzzzzz",
            pseudo_random(3, 2),
        ),
        (
            "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/32-32-image-jpeg-crop",
            pseudo_random(680, 3),
        ),
        (
            "remote_content/matrix.org/Xy/Zw/aaaaaaaaaaaaaaaaaaaa",
            pseudo_random(1, 4),
        ),
        ("top.bin", Vec::new()),
    ];
    for (k, v) in &objects {
        bucket.put(&format!("{prefix}{k}"), v);
    }
    // Keys that cannot be paths, and a name that is both a file and a directory.
    for bad in ["bad//double", "dots/./x", "dots/../y", "clash"] {
        bucket.put(&format!("{prefix}{bad}"), b"skipped");
    }
    bucket.put(&format!("{prefix}clash/inner"), b"inner");

    let m = TestMount::with_prefix(prefix, &[]);
    assert_eq!(
        names(&m.mnt),
        [
            "bad",
            "clash",
            "dots",
            "local_content",
            "local_thumbnails",
            "remote_content",
            "top.bin"
        ]
    );
    for (k, v) in &objects {
        let meta = fs::metadata(m.path(k)).unwrap();
        assert!(meta.is_file(), "{k}");
        assert_eq!(meta.len(), v.len() as u64, "{k}");
        assert_eq!(&fs::read(m.path(k)).unwrap(), v, "{k}");
    }
    assert!(fs::metadata(m.path("local_content/ab")).unwrap().is_dir());
    assert_eq!(
        names(&m.path("local_content/ab/cd")),
        ["efghijklmnopqrstuvwx", "zzzzzzzzzzzzzzzzzzzz"]
    );
    // `ls -l` sizes come from the listing.
    let sizes: Vec<u64> = fs::read_dir(m.path("local_content/ab/cd"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().size())
        .collect();
    assert_eq!(sizes.iter().sum::<u64>(), 70_003);
    // The directory wins over the file of the same name.
    assert!(fs::metadata(m.path("clash")).unwrap().is_dir());
    assert_eq!(fs::read(m.path("clash/inner")).unwrap(), b"inner");
    // Unpathable keys are skipped, not fatal: their valid neighbours still show.
    assert_eq!(names(&m.path("bad")), Vec::<String>::new());
    assert_eq!(names(&m.path("dots")), Vec::<String>::new());
    assert!(m.log().contains("cannot be shown as a"), "{}", m.log());
}

#[test]
fn files_written_through_the_mount_are_plain_objects() {
    let m = TestMount::new("plain");
    fs::create_dir_all(m.path("local_content/AB/CD")).unwrap();
    let data = pseudo_random(200_000, 9);
    fs::write(m.path("local_content/AB/CD/efghijklmnopqrstuvwx"), &data).unwrap();
    fs::write(m.path("top"), b"t").unwrap();
    fs::create_dir_all(m.path("empty/inner")).unwrap();
    let keys: BTreeSet<String> = m.keys("").into_iter().collect();
    // A directory made with mkdir gets a marker only if it stays empty: the file under
    // local_content/AB/CD makes those three.
    let want: BTreeSet<String> = [
        "empty/inner/",
        "local_content/AB/CD/efghijklmnopqrstuvwx",
        "top",
    ]
    .iter()
    .map(|k| m.key(k))
    .collect();
    assert_eq!(
        keys, want,
        "only the files and the markers of directories that stay empty"
    );
    assert_eq!(
        m.object("local_content/AB/CD/efghijklmnopqrstuvwx"),
        Some(data)
    );
    assert_eq!(
        m.object("empty/inner/"),
        Some(Vec::new()),
        "markers are empty"
    );
}

/// Every body goes with a checksum the store checks: its CRC-32 where the store confirms
/// it, else its MD5 (Content-MD5). The objects then carry their CRC-32 for other tools.
#[test]
fn uploads_carry_a_checksum_the_store_checks() {
    let env = S3Env::get();
    let m = TestMount::with_args("checksums", &["--part-size", "5M"]);
    let small = pseudo_random(40_000, 1);
    fs::write(m.path("small"), &small).unwrap();
    m.sync();
    // A multipart upload begun once the store's answers have shown what it checks.
    let large = pseudo_random(11 << 20, 2);
    fs::write(m.path("large"), &large).unwrap();
    m.sync();
    let log = m.log();
    let confirms = log.contains("the store checks the CRC-32 of each body");
    let does_not = log.contains("the store does not confirm CRC-32 checksums");
    assert!(
        confirms != does_not,
        "the mount says which checksum bodies carry:\n{log}"
    );
    match env.backend.as_str() {
        "garage" => assert!(confirms, "Garage checks CRC-32 checksums"),
        "moto" => assert!(does_not, "moto does not check CRC-32 checksums"),
        _ => {}
    }
    if confirms {
        let (rt, client) = raw_client(&env);
        let crc32 = |rel: &str| {
            let head = client
                .head_object()
                .bucket(&env.bucket)
                .key(m.key(rel))
                .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
                .send();
            rt.block_on(head)
                .unwrap()
                .checksum_crc32()
                .map(str::to_string)
        };
        assert_eq!(crc32("small"), Some(s3mediafs::store::crc32_base64(&small)));
        // A multipart object's checksum is of its parts' checksums, and counts them.
        let large_crc = crc32("large").expect("the multipart object has a CRC-32");
        assert!(large_crc.ends_with("-3"), "{large_crc}");
    }
    assert_eq!(m.object("small"), Some(small));
    assert_eq!(m.object("large"), Some(large));
}

#[test]
fn empty_directories_survive_a_remount() {
    let mut m = TestMount::new("remount");
    fs::create_dir_all(m.path("a/b/c")).unwrap();
    fs::create_dir(m.path("lonely")).unwrap();
    fs::write(m.path("a/file"), b"kept").unwrap();
    assert!(m.stop().unwrap().success(), "{}", m.log());
    assert!(!is_mounted(&m.mnt));
    m.start(&[]);
    assert!(fs::metadata(m.path("a/b/c")).unwrap().is_dir());
    assert!(fs::metadata(m.path("lonely")).unwrap().is_dir());
    assert_eq!(names(&m.path("a")), ["b", "file"]);
    assert_eq!(fs::read(m.path("a/file")).unwrap(), b"kept");
}

/// A key with a control character, which the XML of S3's answers cannot carry (another tool
/// stored it), leaves its directory readable: it is listed, read and deleted like any other,
/// and so is a key with `+`, a space and `%`. The mount itself refuses to make such a name.
#[test]
fn keys_with_control_characters_are_listed_read_and_deleted() {
    let m = TestMount::new("control");
    let bucket = Bucket::new(&S3Env::get());
    bucket.put(&m.key("d/a\u{1}b"), b"odd");
    bucket.put(&m.key("d/ok"), b"ok");
    // Listings come URL-encoded: these must come back as they are.
    bucket.put(&m.key("d/32-32-image-svg+xml a%20b"), b"plus");
    assert_eq!(
        names(&m.path("d")),
        ["32-32-image-svg+xml a%20b", "a\u{1}b", "ok"]
    );
    assert_eq!(
        fs::read(m.path("d/32-32-image-svg+xml a%20b")).unwrap(),
        b"plus"
    );
    assert_eq!(fs::read(m.path("d/a\u{1}b")).unwrap(), b"odd");
    fs::remove_file(m.path("d/a\u{1}b")).unwrap();
    assert_eq!(m.object("d/a\u{1}b"), None);
    assert_eq!(m.object("d/ok").as_deref(), Some(&b"ok"[..]));
    for name in ["d/new\u{1}", "d/tab\there", "d/dir\u{7f}"] {
        assert_eq!(
            errno(fs::write(m.path(name), b"x")),
            libc::EINVAL,
            "{name:?}"
        );
    }
    assert_eq!(errno(fs::create_dir(m.path("d/sub\u{2}"))), libc::EINVAL);
}
