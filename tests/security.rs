//! Security: the secret key never appears in the log at any level, nor in `ps`; the cache
//! directory is private; without `allow_other` other users cannot enter the mount, and with
//! it the kernel enforces the configured owner and modes (`default_permissions`); object
//! keys cannot name a path outside the mount.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{is_mounted, unique_prefix, wait_for, Bucket, S3Env, TestMount, BIN};

/// Mounts with everything logged (`RUST_LOG=trace`, every crate) and the keys in a
/// credentials file; returns the child and where its log goes.
fn mount_at_trace(env: &S3Env, secret: &str, dir: &Path, prefix: &str) -> Child {
    let cred = dir.join("credentials");
    std::fs::write(&cred, format!("{}:{secret}\n", env.access_key)).unwrap();
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let log = std::fs::File::create(dir.join("trace.log")).unwrap();
    Command::new(BIN)
        .arg("mount")
        .arg(format!("{}:{prefix}", env.bucket))
        .arg(&mnt)
        .args(env.mount_args())
        .arg("--credentials")
        .arg(&cred)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .env("RUST_LOG", "trace")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Waits (up to 30 s) until the mount is in place; panics if the process exits first.
fn wait_mounted(child: &mut Child, mnt: &Path) {
    wait_for(Duration::from_secs(30), || {
        if is_mounted(mnt) {
            return Ok(());
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the mount exited before it came up ({status})");
        }
        Err("the mount did not come up in 30 s".to_string())
    })
}

#[test]
fn the_secret_never_appears_in_the_log_or_in_ps() {
    let env = S3Env::get();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("secret");
    let mnt = dir.path().join("mnt");
    let mut child = mount_at_trace(&env, &env.secret_key, dir.path(), &prefix);
    wait_mounted(&mut child, &mnt);
    // A workload that makes every kind of request: PUT, multipart, GET, LIST, HEAD, DELETE,
    // copy (rename).
    std::fs::create_dir_all(mnt.join("local_content/ab/cd")).unwrap();
    std::fs::write(mnt.join("local_content/ab/cd/small"), b"hello").unwrap();
    std::fs::write(mnt.join("big"), vec![7u8; 20 << 20]).unwrap();
    std::fs::rename(mnt.join("big"), mnt.join("big2")).unwrap();
    std::fs::File::open(&mnt).unwrap().sync_all().unwrap();
    assert_eq!(
        std::fs::read(mnt.join("local_content/ab/cd/small")).unwrap(),
        b"hello"
    );
    assert_eq!(std::fs::read(mnt.join("big2")).unwrap().len(), 20 << 20);
    let _ = std::fs::metadata(mnt.join("missing"));
    std::fs::remove_file(mnt.join("big2")).unwrap();
    std::fs::File::open(&mnt).unwrap().sync_all().unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap();
    let ps = Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap()
        .stdout;
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    assert!(child.wait().unwrap().success());

    let log = std::fs::read_to_string(dir.path().join("trace.log")).unwrap();
    assert!(
        log.lines().count() > 100,
        "the trace log is too short to mean anything:\n{log}"
    );
    assert!(
        log.contains(&env.access_key),
        "the access key id is logged (it is not secret)"
    );
    assert!(
        !log.contains(&env.secret_key),
        "the secret key is in the trace log"
    );
    let shown = String::from_utf8_lossy(&cmdline);
    assert!(
        !shown.contains(&env.secret_key),
        "the secret key is on the command line"
    );
    assert!(
        !String::from_utf8_lossy(&ps).contains(&env.secret_key),
        "the secret key shows in ps"
    );
    Bucket::new(&env).delete_prefix(&prefix);
}

#[test]
fn a_wrong_secret_is_not_logged_either() {
    let env = S3Env::get();
    if !env.checks_credentials() {
        return; // moto accepts any signature, so the wrong secret is not an error there.
    }
    let dir = tempfile::tempdir().unwrap();
    let wrong = "Wr0ngSecretThatMustNotBeLogged0123456789";
    let mut child = mount_at_trace(&env, wrong, dir.path(), &unique_prefix("wrong"));
    let status = child.wait().unwrap();
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("trace.log")).unwrap();
    assert!(log.contains("rejected the credentials"), "{log}");
    assert!(!log.contains(wrong), "the wrong secret is in the log");
}

#[test]
fn the_cache_directory_and_its_files_are_private() {
    let m = TestMount::new("private-cache");
    std::fs::create_dir_all(m.path("a/b")).unwrap();
    std::fs::write(m.path("a/b/f"), vec![1u8; 3 << 20]).unwrap();
    m.sync();
    assert_eq!(std::fs::read(m.path("a/b/f")).unwrap().len(), 3 << 20);
    let mut dirs = vec![m.cache.clone()];
    let mut files = 0;
    while let Some(d) = dirs.pop() {
        let mode = std::fs::metadata(&d).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", d.display());
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dirs.push(e.path());
            } else {
                files += 1;
                let mode = meta.mode() & 0o777;
                assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", e.path().display());
            }
        }
    }
    assert!(files > 0, "nothing in the cache directory to check");
}

/// Runs `args` as the user `nobody`; returns whether it succeeded and its stderr.
fn as_nobody(args: &[&str]) -> (bool, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn other_users_stay_out_without_allow_other_and_modes_hold_with_it() {
    let m = TestMount::new("other-users");
    std::fs::write(m.path("f"), b"private").unwrap();
    // The mount's parent directories must be passable for `nobody` to try at all.
    std::fs::set_permissions(m.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let f = m.path("f").display().to_string();
    let (ok, err) = as_nobody(&["cat", &f]);
    assert!(!ok && err.contains("Permission denied"), "{err}");
    let (ok, err) = as_nobody(&["ls", &m.mnt.display().to_string()]);
    assert!(!ok && err.contains("Permission denied"), "{err}");
    drop(m);

    let m = TestMount::with_args(
        "other-users-allowed",
        // allow_other alone: the kernel checks permissions all the same.
        &[
            "--allow-other",
            "--file-mode",
            "0640",
            "--uid",
            "0",
            "--gid",
            "0",
        ],
    );
    std::fs::write(m.path("f"), b"private").unwrap();
    std::fs::set_permissions(m.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = m.mnt.display().to_string();
    let f = m.path("f").display().to_string();
    let (ok, err) = as_nobody(&["ls", &mnt]);
    assert!(
        ok,
        "with allow_other a directory of mode 0755 is listable: {err}"
    );
    let (ok, err) = as_nobody(&["cat", &f]);
    assert!(
        !ok && err.contains("Permission denied"),
        "mode 0640 owned by root: {err}"
    );
    let (ok, err) = as_nobody(&["touch", &format!("{mnt}/new")]);
    assert!(
        !ok && err.contains("Permission denied"),
        "directory mode 0755 owned by root: {err}"
    );
    assert!(!m.path("new").exists());
}

#[test]
fn keys_that_climb_out_of_the_prefix_stay_inside() {
    let env = S3Env::get();
    let bucket = Bucket::new(&env);
    let prefix = unique_prefix("escape");
    for key in ["../escaped", "a/../../escaped2", "b/./c", "/abs", "ok/file"] {
        bucket.put(&format!("{prefix}{key}"), b"x");
    }
    let m = TestMount::with_prefix(prefix.clone(), &[]);
    let mut seen = Vec::new();
    let mut dirs = vec![m.mnt.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(&m.mnt).unwrap().display().to_string();
            assert!(
                !rel.split('/')
                    .any(|c| c == ".." || c == "." || c.is_empty()),
                "{rel}"
            );
            if e.file_type().unwrap().is_dir() {
                dirs.push(p);
            } else {
                seen.push(rel);
            }
        }
    }
    assert!(seen.contains(&"ok/file".to_string()), "{seen:?}");
    assert!(!seen.iter().any(|s| s.contains("escaped")), "{seen:?}");
    // Nothing appeared next to the mount.
    assert!(!m.dir.path().join("escaped").exists());
    drop(m);
    bucket.delete_prefix(&prefix);
}
