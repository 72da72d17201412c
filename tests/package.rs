//! The Debian package: built by scripts/package.sh from the test build and installed with
//! `dpkg -i` on this machine, it mounts with `mount -t fuse.s3mediafs` from the installed
//! files, `man` finds its pages, its service unit passes `systemd-analyze verify`, and
//! `dpkg -r` leaves the operator's credentials and the cache directories in place.

mod common;

use std::path::Path;
use std::process::Command;

use common::{is_mounted, unique_prefix, Bucket, S3Env, BIN};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {}\n{said}", out.status);
    said
}

/// Removes the package and what the test put beside it, whatever happened.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file("/etc/s3mediafs/package-test.credentials");
        let _ = std::fs::remove_dir_all("/var/cache/s3mediafs/package-test");
        let _ = Command::new("dpkg").args(["--purge", "s3mediafs"]).output();
    }
}

#[test]
fn the_debian_package_installs_mounts_and_removes_cleanly() {
    let env = S3Env::get();
    let dir = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    run(Command::new(repo.join("scripts/package.sh"))
        .arg("--binary")
        .arg(BIN)
        .arg("--out")
        .arg(dir.path()));
    let deb = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let _installed = Installed;
    run(Command::new("dpkg").arg("-i").arg(&deb));

    for page in ["s3mediafs", "s3mediafs-mount", "mount.s3mediafs"] {
        let path = run(Command::new("man").args(["-w", page]));
        assert!(path.contains("/usr/share/man/"), "man -w {page}: {path}");
    }
    assert!(Path::new("/usr/share/bash-completion/completions/s3mediafs").is_file());
    assert_eq!(
        std::fs::read_link("/sbin/mount.s3mediafs").unwrap(),
        Path::new("/usr/bin/s3mediafs")
    );
    // The template unit, verified through an instance of it.
    let units = dir.path().join("units");
    std::fs::create_dir(&units).unwrap();
    let instance = units.join("s3mediafs@var-lib-matrix\\x2dsynapse-media.service");
    std::fs::copy("/lib/systemd/system/s3mediafs@.service", &instance).unwrap();
    let said = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(instance.file_name().unwrap())
        .current_dir(&units));
    assert!(said.trim().is_empty(), "systemd-analyze verify: {said}");

    // Mounted from the installed files, as /etc/fstab would.
    let cred = Path::new("/etc/s3mediafs/package-test.credentials");
    std::fs::write(cred, format!("{}:{}\n", env.access_key, env.secret_key)).unwrap();
    std::fs::set_permissions(cred, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let prefix = unique_prefix("package");
    let mnt = dir.path().join("media");
    std::fs::create_dir(&mnt).unwrap();
    // The mount process stays behind with mount's output streams: they go nowhere.
    let status = Command::new("mount")
        .args(["-t", "fuse.s3mediafs"])
        .arg(format!("{}:{prefix}", env.bucket))
        .arg(&mnt)
        .arg("-o")
        .arg(format!(
            "credentials={},endpoint={},region={},cache_dir=/var/cache/s3mediafs/package-test",
            cred.display(),
            env.endpoint,
            env.region
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "mount -t fuse.s3mediafs: {status}");
    assert!(is_mounted(&mnt));
    std::fs::write(mnt.join("hello.txt"), b"from the package\n").unwrap();
    run(Command::new("umount").arg(&mnt));
    common::wait_for(std::time::Duration::from_secs(30), || {
        match Bucket::new(&env).get(&format!("{prefix}hello.txt")) {
            Some(b) if b == b"from the package\n" => Ok(()),
            _ => Err("the file written through the package's mount is not in the bucket".into()),
        }
    });

    // Removing the package leaves the credentials and the cache.
    run(Command::new("dpkg").args(["-r", "s3mediafs"]));
    assert!(!Path::new("/usr/bin/s3mediafs").exists());
    assert!(cred.is_file(), "dpkg -r removed the credentials");
    assert!(
        Path::new("/var/cache/s3mediafs/package-test").is_dir(),
        "dpkg -r removed the cache"
    );
    Bucket::new(&env).delete_prefix(&prefix);
}
