//! Deployment: the shipped systemd units pass `systemd-analyze verify` once installed,
//! `mount -t fuse.s3mediafs` and an fstab entry mount through fuse3's mount helper and
//! `umount` uploads what is pending, systemd hears READY=1 only once the mount answers, and
//! `s3mediafs status` tells a person what the mount is doing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::faults::{policy, FaultProxy};
use common::{
    is_mounted, pseudo_random, sha256, statfs, unique_prefix, Bucket, S3Env, TestMount, BIN,
};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs scripts/install.sh with the test build, under `root`.
fn install_under(root: &Path) {
    let out = Command::new(repo().join("scripts/install.sh"))
        .arg("--binary")
        .arg(BIN)
        .arg("--prefix")
        .arg(root.join("usr"))
        .arg("--root")
        .arg(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn installed_units_pass_systemd_analyze_verify() {
    let root = tempfile::tempdir().unwrap();
    install_under(root.path());
    let units = root.path().join("etc/systemd/system");
    let mount_unit = "var-lib-matrix\\x2dsynapse-media.mount";
    let instance = "s3mediafs@var-lib-matrix\\x2dsynapse-media.service";
    let dropin = "matrix-synapse.service.d/s3mediafs.conf";
    assert!(units.join("s3mediafs@.service").is_file());
    // Nothing that would take effect before the site's paths are in it: the mount unit
    // and Synapse's drop-in are examples, copied as README's steps say.
    let examples = root.path().join("usr/share/doc/s3mediafs/examples");
    for unit in [mount_unit, dropin] {
        assert!(!units.join(unit).exists(), "{unit} installed live");
        std::fs::create_dir_all(units.join(unit).parent().unwrap()).unwrap();
        std::fs::copy(examples.join(unit), units.join(unit)).unwrap();
    }
    // The drop-in is checked on a stand-in for Debian's matrix-synapse.service.
    std::fs::write(
        units.join("matrix-synapse.service"),
        "[Unit]\nDescription=Synapse\n[Service]\nExecStart=/usr/bin/env true\n",
    )
    .unwrap();
    // A template is verified through an instance of it.
    std::fs::copy(units.join("s3mediafs@.service"), units.join(instance)).unwrap();
    for unit in [mount_unit, instance, "matrix-synapse.service"] {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(unit)
            .current_dir(&units)
            .output()
            .expect("systemd-analyze (Debian's systemd package)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {unit}: {}\n{said}",
            out.status
        );
    }
    let text = std::fs::read_to_string(units.join(instance)).unwrap();
    assert!(text.contains("Type=notify"), "{text}");
    let dropin =
        std::fs::read_to_string(units.join("matrix-synapse.service.d/s3mediafs.conf")).unwrap();
    assert!(
        dropin.contains("RequiresMountsFor=/var/lib/matrix-synapse/media"),
        "{dropin}"
    );
    // Settings that hold secrets are private, as is the cache.
    let mode = |p: &str| {
        std::fs::metadata(root.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("etc/s3mediafs"), 0o700);
    assert_eq!(mode("etc/s3mediafs/s3mediafs.env.example"), 0o600);
    assert_eq!(mode("etc/s3mediafs/credentials.example"), 0o600);
    assert_eq!(mode("var/cache/s3mediafs"), 0o700);
    let helper = std::fs::read_link(root.path().join("sbin/mount.s3mediafs")).unwrap();
    assert_eq!(helper, root.path().join("usr/bin/s3mediafs"));
}

/// `mount -t fuse.s3mediafs` and `mount DIR` with an fstab entry, as root, in a private
/// mount namespace whose /usr/local/bin holds the test build (mount.fuse3 looks for
/// `s3mediafs` on the default PATH). After each `umount`, the mount process uploads what
/// is pending and exits; then every file is in the bucket.
#[test]
fn mount_helper_and_fstab_entry_mount_and_umount_flushes() {
    let env = S3Env::get();
    let bucket = Bucket::new(&env);
    let prefix = unique_prefix("fstab");
    bucket.put(&format!("{prefix}existing/hello.txt"), b"already here\n");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bin = d.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::copy(BIN, bin.join("s3mediafs")).unwrap();
    std::os::unix::fs::symlink("s3mediafs", bin.join("mount.s3mediafs")).unwrap();
    let mnt = d.join("media");
    std::fs::create_dir(&mnt).unwrap();
    let cred = d.join("media.credentials");
    std::fs::write(&cred, format!("{}:{}\n", env.access_key, env.secret_key)).unwrap();
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
    let options = format!(
        "_netdev,nofail,noauto,x-systemd.automount,allow_other,default_permissions,uid=root,gid=root,\
         credentials={},endpoint={},region={},cache_dir={}",
        cred.display(),
        env.endpoint,
        env.region,
        d.join("cache").display()
    );
    let source = format!("{}:{prefix}", env.bucket);
    std::fs::write(
        d.join("fstab"),
        format!("{source} {} fuse.s3mediafs {options} 0 0\n", mnt.display()),
    )
    .unwrap();
    let big = pseudo_random(24 << 20, 7);
    std::fs::write(d.join("big.src"), &big).unwrap();

    let script = r#"
set -euo pipefail
mount --bind "$D/bin" /usr/local/bin
wait_for_exit() {  # the mount process uploads what is pending after umount, then exits
    local pid=$1 n=0
    while kill -0 "$pid" 2>/dev/null; do
        n=$((n + 1)); [ $n -lt 3000 ] || { echo "mount process $pid still running" >&2; exit 1; }
        sleep 0.1
    done
}
mount -t fuse.s3mediafs "$SOURCE" "$MNT" -o "$OPTIONS"
findmnt -n -o SOURCE "$MNT"
pid=$(pgrep -f -n -- "s3mediafs $SOURCE $MNT")
cat "$MNT/existing/hello.txt"
mkdir -p "$MNT/local_content/ab/cd"
cp "$D/big.src" "$MNT/local_content/ab/cd/big"
echo "written by mount -t" > "$MNT/local_content/ab/cd/small"
umount "$MNT"
wait_for_exit "$pid"
echo "first mount exited"

mount -T "$D/fstab" "$MNT"
pid=$(pgrep -f -n -- "s3mediafs $SOURCE $MNT")
cmp "$D/big.src" "$MNT/local_content/ab/cd/big"
cat "$MNT/local_content/ab/cd/small"
echo "written through fstab" > "$MNT/from-fstab"
umount "$MNT"
wait_for_exit "$pid"
echo "second mount exited"

# As mount(8) runs the helper for fstab type `s3mediafs`, with its own flags.
"$D/bin/mount.s3mediafs" "$SOURCE" "$MNT" -v -o "$OPTIONS"
pid=$(pgrep -f -n -- "s3mediafs $SOURCE $MNT")
cat "$MNT/from-fstab"
umount "$MNT"
wait_for_exit "$pid"
echo "third mount exited"
"#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", script])
        .env("D", d)
        .env("MNT", &mnt)
        .env("SOURCE", &source)
        .env("OPTIONS", &options)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            source.as_str(),
            "already here",
            "first mount exited",
            "written by mount -t",
            "second mount exited",
            "written through fstab",
            "third mount exited"
        ],
        "{stderr}"
    );
    let big_key = format!("{prefix}local_content/ab/cd/big");
    assert_eq!(
        sha256(&bucket.get(&big_key).expect("big file uploaded")),
        sha256(&big)
    );
    assert_eq!(
        bucket
            .get(&format!("{prefix}local_content/ab/cd/small"))
            .unwrap(),
        b"written by mount -t\n"
    );
    assert_eq!(
        bucket.get(&format!("{prefix}from-fstab")).unwrap(),
        b"written through fstab\n"
    );
    // Nothing was left behind on the host.
    assert!(!is_mounted(&mnt));
    bucket.delete_prefix(&prefix);
}

/// Receives notify messages for up to `within`.
fn receive(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A mountpoint and a notify socket the test reads, as systemd would give a service.
struct NotifySetup {
    dir: tempfile::TempDir,
    mnt: std::path::PathBuf,
    sock: UnixDatagram,
}

impl NotifySetup {
    fn new() -> NotifySetup {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let sock = UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
        NotifySetup { dir, mnt, sock }
    }

    /// `s3mediafs mount SOURCE` in the foreground, with NOTIFY_SOCKET set.
    fn mount_command(&self, env: &S3Env, source: &str) -> Command {
        let mut c = Command::new(BIN);
        c.arg("mount")
            .arg(source)
            .arg(&self.mnt)
            .args(env.mount_args())
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .env("AWS_ACCESS_KEY_ID", &env.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &env.secret_key)
            .env("NOTIFY_SOCKET", self.dir.path().join("notify.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }
}

#[test]
fn ready_is_sent_only_once_the_mount_answers() {
    let env = S3Env::get();
    let n = NotifySetup::new();
    let (mnt, sock) = (&n.mnt, &n.sock);
    let mut child = n
        .mount_command(&env, &format!("{}:{}", env.bucket, unique_prefix("notify")))
        .spawn()
        .unwrap();
    let first = receive(sock, Duration::from_secs(60)).expect("a message within 60 s");
    // The first message is READY=1, and by then the mount is in place and answers.
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");
    assert!(is_mounted(mnt), "READY=1 before the mount was there");
    assert_eq!(
        statfs(mnt).f_type,
        0x65735546,
        "READY=1 before the mount answered"
    );
    assert!(
        first.contains("STATUS=Serving"),
        "a status line for systemctl status: {first}"
    );
    std::fs::write(mnt.join("f"), b"x").unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut seen = String::new();
    while let Some(m) = receive(sock, Duration::from_secs(30)) {
        seen.push_str(&m);
        if m.contains("STOPPING=1") {
            break;
        }
    }
    assert!(seen.contains("STOPPING=1"), "{seen}");
    assert!(child.wait().unwrap().success());
    assert!(!is_mounted(mnt));
}

#[test]
fn ready_is_never_sent_when_mounting_fails() {
    let env = S3Env::get();
    let n = NotifySetup::new();
    let (mnt, sock) = (&n.mnt, &n.sock);
    let status = n
        .mount_command(&env, "no-such-bucket-s3mediafs")
        .status()
        .unwrap();
    assert!(!status.success());
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let got = sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec());
    assert!(
        got.as_deref()
            .is_none_or(|m| !String::from_utf8_lossy(m).contains("READY=1")),
        "READY=1 sent by a mount that failed"
    );
    assert!(!is_mounted(mnt));
}

fn status_of(mnt: &Path) -> String {
    let out = Command::new(BIN).arg("status").arg(mnt).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn status_shows_pending_uploads_until_the_store_is_back() {
    let env = S3Env::get();
    let proxy = FaultProxy::start(env.endpoint.trim_start_matches("http://"), policy::none());
    let m = TestMount::via("status", &proxy.endpoint(), &[]);
    std::fs::write(m.path("before.txt"), b"one").unwrap();
    m.sync();
    let s = status_of(&m.mnt);
    assert!(s.contains(&m.source()), "{s}");
    assert!(s.contains(&m.mnt.display().to_string()), "{s}");
    assert!(
        s.contains("Uploads:  none pending"),
        "after fsync nothing is pending: {s}"
    );
    assert!(s.lines().any(|l| l.trim().starts_with("put")), "{s}");
    assert!(s.lines().any(|l| l.trim().starts_with("write")), "{s}");

    proxy.down();
    std::fs::write(m.path("during.txt"), vec![b'x'; 3 << 20]).unwrap();
    let s = status_of(&m.mnt);
    assert!(
        s.contains("1 changes pending, 3.0 MiB of file data waiting"),
        "{s}"
    );
    let raw = Command::new(BIN)
        .args(["status", "--raw"])
        .arg(&m.mnt)
        .output()
        .unwrap();
    let raw = String::from_utf8(raw.stdout).unwrap();
    assert!(raw.contains("s3mediafs_pending_changes 1"), "{raw}");
    assert!(raw.contains("s3mediafs_fuse_op_seconds_bucket"), "{raw}");

    proxy.up();
    m.sync();
    let s = status_of(&m.mnt);
    assert!(s.contains("Uploads:  none pending"), "{s}");
    assert_eq!(m.object("during.txt").unwrap().len(), 3 << 20);

    // Anything else is told it is not a mount of ours.
    let out = Command::new(BIN)
        .arg("status")
        .arg(m.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not an s3mediafs mount"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The local server scripts/quickstart.sh starts (scripts/s3-server.sh): with its port
/// taken by another listener it refuses in one sentence saying how to choose another, and
/// with another port it comes up there.
#[test]
fn the_quickstart_server_names_a_taken_port_and_comes_up_on_another() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let state = tempfile::tempdir().unwrap();
    let server = |port: u16, cmd: &str| {
        Command::new(repo().join("scripts/s3-server.sh"))
            .args([cmd, "garage"])
            .env("S3MEDIAFS_STATE", state.path())
            .env("S3MEDIAFS_GARAGE_PORT", port.to_string())
            .output()
            .unwrap()
    };
    let out = server(port, "start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a taken port: {err}");
    assert!(
        err.contains(&format!("port {port} on 127.0.0.1 is taken"))
            && err.contains("S3MEDIAFS_GARAGE_PORT="),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    // A port whose neighbours Garage also uses (+1, +3) are free.
    let free = (0..200)
        .map(|i| 20_000 + (std::process::id() as u16 % 5000) * 4 + i * 7)
        .find(|p| {
            [*p, p + 1, p + 3]
                .iter()
                .all(|q| std::net::TcpListener::bind(("127.0.0.1", *q)).is_ok())
        })
        .expect("free ports");
    let out = server(free, "start");
    let said = String::from_utf8_lossy(&out.stdout);
    let stopped = server(free, "stop");
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains(&format!("http://127.0.0.1:{free}")), "{said}");
    assert!(stopped.status.success());
}
