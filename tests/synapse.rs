//! Replays what Synapse does to its media store (shared/synapse-media.md), syscall for
//! syscall, through a real mount, and checks what the bucket holds afterwards.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;

use common::*;

const MEDIA_ID: &str = "CBQfJFgaUGgsMXPpckCwGXRY";

#[test]
fn upload_thumbnail_download_and_delete_like_synapse() {
    let m = TestMount::new("synapse");
    let rel = format!(
        "local_content/{}/{}/{}",
        &MEDIA_ID[0..2],
        &MEDIA_ID[2..4],
        &MEDIA_ID[4..]
    );
    let original = m.path(&rel);

    // os.makedirs(dirname, exist_ok=True): stat up the tree, mkdir top-down.
    assert_eq!(
        errno(fs::metadata(m.path("local_content/CB"))),
        libc::ENOENT
    );
    fs::create_dir_all(original.parent().unwrap()).unwrap();
    fs::create_dir_all(original.parent().unwrap()).unwrap();
    assert_eq!(
        errno(fs::create_dir(original.parent().unwrap())),
        libc::EEXIST
    );

    // open(path, "wb"), 64 KiB writes from the thread pool, the tail at close().
    let content = pseudo_random(8 * 65536 + 5499, 1);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&original)
            .unwrap();
        // Python probes isatty() on every open.
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, [0u8; 64].as_mut_ptr()) };
        assert_eq!(rc, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOTTY)
        );
        assert_eq!(f.stream_position().unwrap(), 0);
        for chunk in content.chunks(65536) {
            f.write_all(chunk).unwrap();
        }
    }
    // os.path.getsize right after close.
    assert_eq!(fs::metadata(&original).unwrap().len(), content.len() as u64);

    // Thumbnailing re-reads at once: a 4096-byte header sniff, then the rest.
    {
        let mut f = File::open(&original).unwrap();
        let mut head = vec![0u8; 4096];
        f.read_exact(&mut head).unwrap();
        assert_eq!(head, content[..4096]);
        let mut rest = Vec::new();
        f.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, content[4096..]);
        // An animated GIF is read with seeks back and forth.
        for off in [63u64, 25, 375, 687, 999, 1311, 400_000, 17] {
            f.seek(SeekFrom::Start(off)).unwrap();
            let mut buf = vec![0u8; 4096];
            f.read_exact(&mut buf).unwrap();
            assert_eq!(buf, content[off as usize..off as usize + 4096], "at {off}");
        }
    }

    // Thumbnails: single small writes flushed explicitly, in a per-media directory.
    let thumb_dir = format!(
        "local_thumbnails/{}/{}/{}",
        &MEDIA_ID[0..2],
        &MEDIA_ID[2..4],
        &MEDIA_ID[4..]
    );
    fs::create_dir_all(m.path(&thumb_dir)).unwrap();
    let thumbs = [
        ("32-32-image-jpeg-crop", 680usize),
        ("96-96-image-jpeg-crop", 989),
        ("320-240-image-jpeg-scale", 5_400),
        ("640-480-image-jpeg-scale", 57_000),
        ("800-600-image-jpeg-scale", 113_000),
    ];
    for (i, (name, size)) in thumbs.iter().enumerate() {
        let path = m.path(&format!("{thumb_dir}/{name}"));
        let mut f = File::create(&path).unwrap();
        f.write_all(&pseudo_random(*size, 10 + i as u64)).unwrap();
        f.flush().unwrap();
        drop(f);
        assert_eq!(fs::metadata(&path).unwrap().len(), *size as u64);
    }
    // A thumbnail regenerated in place with O_TRUNC.
    let regen = m.path(&format!("{thumb_dir}/800-600-image-jpeg-scale"));
    let new_thumb = pseudo_random(90_000, 99);
    fs::write(&regen, &new_thumb).unwrap();
    assert_eq!(fs::read(&regen).unwrap(), new_thumb);

    // A client downloads with sequential 16 KiB reads.
    {
        let mut f = File::open(&original).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16384];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(sha256(&got), sha256(&content));
    }

    // What the bucket holds: plain objects at exactly the relative paths.
    assert_eq!(m.object(&rel).as_deref(), Some(&content[..]));
    assert_eq!(
        m.object(&format!("{thumb_dir}/800-600-image-jpeg-scale")),
        Some(new_thumb)
    );

    // Admin delete: unlink the original, rmtree the thumbnail directory.
    fs::remove_file(&original).unwrap();
    assert_eq!(errno(fs::remove_file(&original)), libc::ENOENT);
    fs::remove_dir_all(m.path(&thumb_dir)).unwrap();
    assert_eq!(errno(fs::metadata(m.path(&thumb_dir))), libc::ENOENT);
    assert_eq!(errno(fs::metadata(&original)), libc::ENOENT);
    let left = m.keys("");
    assert!(
        !left.iter().any(|k| k.contains(&MEDIA_ID[4..])),
        "deleted media still in the bucket: {left:?}"
    );
    // The fan-out directories stay, as on a local disk.
    assert!(fs::metadata(m.path("local_content/CB/Qf"))
        .unwrap()
        .is_dir());
    assert!(fs::metadata(m.path("local_thumbnails/CB/Qf"))
        .unwrap()
        .is_dir());
}

#[test]
fn url_cache_expiry_rmdir_chain() {
    let m = TestMount::new("urlcache");
    let day = m.path("url_cache/2026-11-22");
    fs::create_dir_all(&day).unwrap();
    fs::write(day.join("hSIUigOavAhFoLPq"), b"<html>preview</html>").unwrap();
    fs::write(day.join("aaaaaaaaaaaaaaaa"), b"other").unwrap();
    let thumbs = m.path("url_cache_thumbnails/2026-11-22/hSIUigOavAhFoLPq");
    fs::create_dir_all(&thumbs).unwrap();
    fs::write(thumbs.join("32-32-image-jpeg-crop"), b"jpeg").unwrap();

    // Expiry: unlink the file, then rmdir up the chain until ENOTEMPTY.
    fs::remove_file(day.join("hSIUigOavAhFoLPq")).unwrap();
    assert_eq!(errno(fs::remove_dir(&day)), libc::ENOTEMPTY);
    fs::remove_file(day.join("aaaaaaaaaaaaaaaa")).unwrap();
    fs::remove_dir(&day).unwrap();
    assert_eq!(errno(fs::remove_dir(&day)), libc::ENOENT);
    assert_eq!(
        errno(fs::remove_dir(m.path("url_cache_thumbnails/2026-11-22"))),
        libc::ENOTEMPTY
    );
    fs::remove_dir_all(&thumbs).unwrap();
    fs::remove_dir(m.path("url_cache_thumbnails/2026-11-22")).unwrap();
    fs::remove_dir(m.path("url_cache")).unwrap();
    fs::remove_dir(m.path("url_cache_thumbnails")).unwrap();
    assert!(fs::read_dir(&m.mnt).unwrap().next().is_none());
    assert_eq!(m.keys(""), Vec::<String>::new());
}

#[test]
fn remote_media_with_federation_server_names() {
    let m = TestMount::new("remote");
    for server in ["matrix.org", "example.com:8448", "[::1]:8448"] {
        let rel = format!("remote_content/{server}/ab/cd/efghijklmnopqrstuvwx");
        fs::create_dir_all(m.path(&rel).parent().unwrap()).unwrap();
        let data = pseudo_random(70_000, server.len() as u64);
        // Remote downloads arrive in network-sized writes.
        let mut f = File::create(m.path(&rel)).unwrap();
        for chunk in data.chunks(29_696) {
            f.write_all(chunk).unwrap();
        }
        drop(f);
        assert_eq!(fs::read(m.path(&rel)).unwrap(), data);
        assert_eq!(m.object(&rel), Some(data));
    }
    let mut servers: Vec<String> = fs::read_dir(m.path("remote_content"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    servers.sort();
    assert_eq!(servers, ["[::1]:8448", "example.com:8448", "matrix.org"]);
}
