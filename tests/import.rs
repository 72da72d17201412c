//! `s3mediafs import`: copies a Synapse media store into the bucket under the same relative
//! keys; a second run copies nothing; an interrupted run picks up where it stopped;
//! `--verify` catches an object whose content differs; the source is never changed; and
//! the mount reads what was imported.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::faults::{policy, FaultProxy};
use common::{pseudo_random, sha256, unique_prefix, wait_for, Bucket, S3Env, TestMount, BIN};

/// A small Synapse media store: originals, thumbnails, remote media, an empty file, a
/// multipart-sized file.
fn media_store(root: &Path, small_files: usize) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for i in 0..small_files {
        let id = format!("{:024x}", i * 7919 + 13);
        let rel = format!("local_content/{}/{}/{}", &id[..2], &id[2..4], &id[4..]);
        files.insert(rel, pseudo_random(1000 + i * 37, i as u64));
        let thumb = format!(
            "local_thumbnails/{}/{}/{}/32-32-image-jpeg-crop",
            &id[..2],
            &id[2..4],
            &id[4..]
        );
        files.insert(thumb, pseudo_random(200 + i, 1000 + i as u64));
    }
    files.insert(
        "remote_content/matrix.org/ab/cd/efghijklmnop".into(),
        pseudo_random(20 << 20, 99),
    );
    files.insert("local_content/ze/ro/empty".into(), Vec::new());
    for (rel, data) in &files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    files
}

/// Names, sizes, modes, modification times and content hashes of every file under `root`.
fn tree_state(root: &Path) -> Vec<(PathBuf, u64, u32, i64, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dirs.push(e.path());
            }
            let hash = if m.is_file() {
                sha256(&std::fs::read(e.path()).unwrap())
            } else {
                String::new()
            };
            out.push((
                e.path(),
                m.len(),
                m.mode(),
                m.mtime_nsec() + m.mtime() * 1_000_000_000,
                hash,
            ));
        }
    }
    out.sort();
    out
}

fn import_cmd(env: &S3Env, endpoint: &str, src: &Path, target: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("import")
        .arg(src)
        .arg(target)
        .args(["--endpoint", endpoint, "--region", &env.region])
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", &env.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &env.secret_key)
        .stdin(Stdio::null());
    c
}

fn import(env: &S3Env, src: &Path, target: &str, extra: &[&str]) -> (Output, String) {
    let out = import_cmd(env, &env.endpoint, src, target, extra)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, report)
}

fn assert_bucket_holds(bucket: &Bucket, prefix: &str, files: &BTreeMap<String, Vec<u8>>) {
    let keys = bucket.keys(prefix);
    let want: Vec<String> = files.keys().map(|k| format!("{prefix}{k}")).collect();
    let mut keys_sorted = keys.clone();
    keys_sorted.sort();
    assert_eq!(keys_sorted, want);
    for (rel, data) in files {
        let got = bucket.get(&format!("{prefix}{rel}")).unwrap();
        assert_eq!(sha256(&got), sha256(data), "{rel}");
    }
}

#[test]
fn import_copies_once_and_leaves_the_source_alone() {
    let env = S3Env::get();
    let bucket = Bucket::new(&env);
    let prefix = unique_prefix("import");
    let src = tempfile::tempdir().unwrap();
    let files = media_store(src.path(), 40);
    let before = tree_state(src.path());
    let target = format!("{}:{prefix}", env.bucket);

    let (out, report) = import(&env, src.path(), &target, &[]);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.starts_with(&format!("copied {} files", files.len())),
        "{report}"
    );
    assert!(report.contains("failed 0"), "{report}");
    assert_bucket_holds(&bucket, &prefix, &files);

    // A second run finds everything in place and uploads nothing.
    let (out, report) = import(&env, src.path(), &target, &["--verify"]);
    assert!(out.status.success(), "{report}");
    assert!(report.starts_with("copied 0 files"), "{report}");
    assert!(
        report.contains(&format!("skipped {} already in the bucket", files.len())),
        "{report}"
    );
    assert!(
        report.contains(&format!("verified {}", files.len())),
        "{report}"
    );
    assert_eq!(tree_state(src.path()), before, "the source changed");

    // The mount serves the imported store as it was.
    let m = TestMount::with_prefix(prefix.clone(), &[]);
    for (rel, data) in files.iter().step_by(9) {
        assert_eq!(
            sha256(&std::fs::read(m.path(rel)).unwrap()),
            sha256(data),
            "{rel}"
        );
    }
    drop(m);
    bucket.delete_prefix(&prefix);
}

/// Files Synapse deletes while the import runs (expired media) are left out, not failures:
/// the run succeeds and says how many, once each, verification included.
#[test]
fn files_removed_from_the_source_while_it_runs_are_left_out() {
    use std::io::{BufRead, BufReader};
    let env = S3Env::get();
    let bucket = Bucket::new(&env);
    let prefix = unique_prefix("import-removed");
    let src = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..300).map(|i| format!("f{i:03}")).collect();
    for n in &names {
        std::fs::write(src.path().join(n), pseudo_random(2000, n.len() as u64)).unwrap();
    }
    let target = format!("{}:{prefix}", env.bucket);
    let args = ["--jobs", "1", "--verify"];
    let mut child = import_cmd(&env, &env.endpoint, src.path(), &target, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the scan is done (its line printed), the last half goes, before its turn comes.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.starts_with("import: 300 files"), "{line}");
    for n in &names[150..] {
        std::fs::remove_file(src.path().join(n)).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("failed 0"), "{report}");
    let copied: usize = report
        .strip_prefix("copied ")
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert!(
        report.contains(&format!(
            "left out {} removed from the source",
            300 - copied
        )),
        "{report}"
    );
    assert!(
        report.contains(&format!("verified {copied} in")),
        "{report}"
    );
    assert!(
        copied < 300,
        "every file was copied before the deletes: {report}"
    );
    assert_eq!(bucket.keys(&prefix).len(), copied);
    bucket.delete_prefix(&prefix);
}

#[test]
fn verify_catches_an_object_whose_content_differs_and_a_new_run_repairs_it() {
    let env = S3Env::get();
    let bucket = Bucket::new(&env);
    let prefix = unique_prefix("import-verify");
    let src = tempfile::tempdir().unwrap();
    let files = media_store(src.path(), 5);
    let target = format!("{}:{prefix}", env.bucket);
    let (out, _) = import(&env, src.path(), &target, &[]);
    assert!(out.status.success());

    // Someone overwrites one object with other bytes of the same size.
    let (rel, data) = files
        .iter()
        .find(|(k, _)| k.starts_with("local_content/"))
        .unwrap();
    let mut bad = data.clone();
    bad[data.len() / 2] ^= 0xff;
    bucket.put(&format!("{prefix}{rel}"), &bad);

    let (out, report) = import(&env, src.path(), &target, &["--verify", "--dry-run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{report}{stderr}");
    assert!(report.starts_with("would copy 1 files"), "{report}");
    assert!(report.contains("failed 1"), "{report}");
    assert!(
        stderr.contains(&format!(
            "FAILED {prefix}{rel}: verification failed: the object's content differs"
        )),
        "{stderr}"
    );
    assert_eq!(
        bucket.get(&format!("{prefix}{rel}")).unwrap(),
        bad,
        "a dry run changed the bucket"
    );

    // A real run sees the content differs (the ETag is not the file's MD5) and copies it.
    let (out, report) = import(&env, src.path(), &target, &["--verify"]);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.starts_with("copied 1 files"), "{report}");
    assert_bucket_holds(&bucket, &prefix, &files);
    bucket.delete_prefix(&prefix);
}

#[test]
fn an_interrupted_import_resumes_where_it_stopped() {
    let env = S3Env::get();
    let bucket = Bucket::new(&env);
    let prefix = unique_prefix("import-resume");
    let src = tempfile::tempdir().unwrap();
    let files = media_store(src.path(), 150);
    let target = format!("{}:{prefix}", env.bucket);
    // Through a slow link, so the first run is surely cut short.
    let proxy = FaultProxy::start(env.endpoint.trim_start_matches("http://"), policy::none());
    proxy.throttle(2 << 20);
    let mut child = import_cmd(&env, &proxy.endpoint(), src.path(), &target, &["-j", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let copied_before_kill = wait_for(Duration::from_secs(120), || {
        let n = bucket.keys(&prefix).len();
        if n >= 20 {
            return Ok(n);
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the import ended before it was cut short"
        );
        Err(format!("the import made no progress ({n} keys copied)"))
    });
    // As a crash or a reboot would.
    child.kill().unwrap();
    child.wait().unwrap();
    // Uploads the proxy was still carrying when the process died may land a moment later:
    // count once the bucket has stopped changing.
    let mut last = (bucket.keys(&prefix).len(), Instant::now());
    let present = wait_for(Duration::from_secs(30), || {
        let n = bucket.keys(&prefix).len();
        if n != last.0 {
            last = (n, Instant::now());
        }
        if last.1.elapsed() >= Duration::from_secs(1) {
            Ok(n)
        } else {
            Err(format!(
                "the bucket kept changing after the import was killed ({n} keys)"
            ))
        }
    });
    assert!(
        present >= copied_before_kill && present < files.len(),
        "{present}"
    );

    let (out, report) = import(&env, src.path(), &target, &[]);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied: usize = report
        .strip_prefix("copied ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert!(
        copied <= files.len() - present + 2,
        "the second run copied {copied} of {} files, though {present} were there: {report}",
        files.len()
    );
    assert!(copied >= files.len() - present, "{report}");
    assert_bucket_holds(&bucket, &prefix, &files);
    bucket.delete_prefix(&prefix);
}

#[test]
fn bad_import_arguments_say_what_is_wrong() {
    let env = S3Env::get();
    let src = tempfile::tempdir().unwrap();
    let (out, _) = import(
        &env,
        &src.path().join("missing"),
        &format!("{}:x/", env.bucket),
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read the source directory"), "{err}");

    let (out, _) = import(&env, src.path(), "no-such-bucket-s3mediafs", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
}
