//! Storage class and server-side encryption of the objects a mount writes: against moto
//! (which records and returns them) an object written, renamed and overwritten carries the
//! class and SSE-S3 or SSE-KMS asked for; against Garage (which encrypts with a customer's
//! key and refuses reads without it) SSE-C objects read back through a mount with the key
//! and not without it. A key file that is unreadable, too open or the wrong size is refused
//! before mounting, in one sentence.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

/// Writes a small and a multipart file, renames the small one and overwrites the large one.
fn write_rename_overwrite(m: &TestMount) -> (Vec<u8>, Vec<u8>) {
    let small = pseudo_random(40_000, 1);
    let large = pseudo_random(12 << 20, 2);
    std::fs::write(m.path("a"), &small).unwrap();
    std::fs::write(m.path("big"), pseudo_random(11 << 20, 3)).unwrap();
    m.sync();
    std::fs::rename(m.path("a"), m.path("renamed")).unwrap();
    std::fs::write(m.path("big"), &large).unwrap();
    m.sync();
    (small, large)
}

#[test]
fn objects_carry_the_storage_class_and_encryption_asked_for() {
    let env = S3Env::get();
    if env.backend != "moto" {
        eprintln!(
            "moto records storage classes and SSE headers; {} is checked for SSE-C",
            env.backend
        );
        return;
    }
    let (rt, client) = raw_client(&env);
    for (args, class, sse) in [
        (
            vec!["--storage-class", "STANDARD_IA", "--sse", "aes256"],
            "STANDARD_IA",
            "AES256",
        ),
        (
            vec!["--storage-class", "INTELLIGENT_TIERING", "--sse", "aws:kms"],
            "INTELLIGENT_TIERING",
            "aws:kms",
        ),
    ] {
        let mut all = vec!["--part-size", "5M"];
        all.extend(args.iter());
        let m = TestMount::with_args("objects", &all);
        write_rename_overwrite(&m);
        for rel in ["renamed", "big"] {
            let head = rt
                .block_on(
                    client
                        .head_object()
                        .bucket(&env.bucket)
                        .key(m.key(rel))
                        .send(),
                )
                .unwrap();
            assert_eq!(
                head.storage_class().map(|c| c.as_str()),
                Some(class),
                "{rel} with {args:?}"
            );
            assert_eq!(
                head.server_side_encryption().map(|e| e.as_str()),
                Some(sse),
                "{rel} with {args:?}"
            );
        }
        let status = m.path("").display().to_string();
        let (code, out) = run_cli(&["status", &status], &[]);
        assert_eq!(code, 0, "{out}");
    }
}

#[test]
fn sse_c_objects_read_back_with_the_key_and_not_without_it() {
    let env = S3Env::get();
    if env.backend != "garage" {
        eprintln!(
            "Garage enforces SSE-C; {} is checked for storage classes and SSE-S3/KMS",
            env.backend
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("media.key");
    std::fs::write(&key_file, pseudo_random(32, 99)).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key_arg = key_file.to_str().unwrap();
    let args = ["--part-size", "5M", "--sse-c-key-file", key_arg];
    let m = TestMount::with_args("sse-c", &args);
    let (small, large) = write_rename_overwrite(&m);
    let prefix = m.prefix.clone();
    drop(m);
    // A fresh mount with the key (an empty cache) reads them from the bucket.
    let m = TestMount::with_prefix(prefix.clone(), &args);
    assert!(std::fs::read(m.path("renamed")).unwrap() == small);
    assert!(std::fs::read(m.path("big")).unwrap() == large);
    // Without the key, the store refuses them.
    let (rt, client) = raw_client(&env);
    let plain = rt.block_on(
        client
            .get_object()
            .bucket(&env.bucket)
            .key(m.key("renamed"))
            .send(),
    );
    assert!(plain.is_err(), "a GET without the key succeeded");
    drop(m);
    Bucket::new(&env).delete_prefix(&prefix);
}

#[test]
fn bad_customer_key_files_are_refused_before_mounting() {
    let env = S3Env::get();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let file = |name: &str, content: &[u8], mode: u32| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p.to_str().unwrap().to_string()
    };
    // A base64 key is read as one; with --sse too, it is refused.
    let b64 = file(
        "b64.key",
        b"MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=\n",
        0o600,
    );
    let missing = dir.path().join("missing.key").to_str().unwrap().to_string();
    let cases: [(String, &[&str], &str); 4] = [
        (
            file("short.key", &[7u8; 16], 0o600),
            &[],
            "does not hold a 32-byte key",
        ),
        (
            file("open.key", &[7u8; 32], 0o644),
            &[],
            "can be read by other users",
        ),
        (missing, &[], "cannot read the SSE-C key file"),
        (b64, &["--sse", "aes256"], "exclude each other"),
    ];
    let source = format!("{}:{}", env.bucket, unique_prefix("bad-key"));
    let mnt = mnt.to_str().unwrap();
    let creds = [
        ("AWS_ACCESS_KEY_ID", env.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", env.secret_key.as_str()),
    ];
    for (key_file, extra, sentence) in &cases {
        let mut args = vec![
            "mount",
            &source,
            mnt,
            "--endpoint",
            &env.endpoint,
            "--region",
            &env.region,
            "--sse-c-key-file",
            key_file,
        ];
        args.extend_from_slice(extra);
        let (code, err) = run_cli(&args, &creds);
        assert_eq!(code, 1, "{key_file} {extra:?}: {err}");
        assert!(err.contains(sentence), "{key_file} {extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    }
}
