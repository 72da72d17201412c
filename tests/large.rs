//! A file large enough for a multipart upload, written and read back whole.

mod common;

use std::fs::File;
use std::io::{Read, Write};

use common::*;
use sha2::{Digest, Sha256};

#[test]
fn hundred_mib_file_round_trips_with_the_same_sha256() {
    let m = TestMount::new("large");
    let data = pseudo_random(100 << 20, 42);
    let want = sha256(&data);
    {
        let mut f = File::create(m.path("big.mp4")).unwrap();
        for chunk in data.chunks(1 << 20) {
            f.write_all(chunk).unwrap();
        }
    }
    assert_eq!(
        std::fs::metadata(m.path("big.mp4")).unwrap().len(),
        100 << 20
    );
    let mut h = Sha256::new();
    let mut f = File::open(m.path("big.mp4")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    assert_eq!(
        format!("{:x}", h.finalize()),
        want,
        "read back through the mount"
    );
    let object = m.object("big.mp4").unwrap();
    assert_eq!(sha256(&object), want, "the object in the bucket");
}
