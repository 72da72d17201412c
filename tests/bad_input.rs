//! Bad input before mounting: each mistake gets one clear sentence, a non-zero exit, and
//! leaves nothing mounted.

mod common;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

use common::*;

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mnt")).unwrap();
        Case { dir }
    }

    fn mnt(&self) -> String {
        self.dir.path().join("mnt").to_str().unwrap().to_string()
    }

    fn cache(&self) -> String {
        self.dir.path().join("cache").to_str().unwrap().to_string()
    }

    /// Runs `s3mediafs mount SOURCE MNT` with the test server's settings plus `extra`.
    fn mount(
        &self,
        env: &S3Env,
        source: &str,
        mnt: &str,
        extra: &[&str],
        creds: (&str, &str),
    ) -> (i32, String) {
        let cache = self.cache();
        let mut args = vec!["mount", source, mnt, "--cache-dir", &cache];
        let base = env.mount_args();
        for pair in base.chunks(2) {
            if !extra.contains(&pair[0].as_str()) {
                args.extend(pair.iter().map(String::as_str));
            }
        }
        args.extend_from_slice(extra);
        let (code, err) = run_cli(
            &args,
            &[
                ("AWS_ACCESS_KEY_ID", creds.0),
                ("AWS_SECRET_ACCESS_KEY", creds.1),
            ],
        );
        assert!(
            !is_mounted(std::path::Path::new(mnt)),
            "left a mount behind: {err}"
        );
        (code, err)
    }
}

fn creds(env: &S3Env) -> (&str, &str) {
    (&env.access_key, &env.secret_key)
}

#[test]
fn missing_bucket_is_named() {
    let env = S3Env::get();
    let c = Case::new();
    let (code, err) = c.mount(&env, "no-such-bucket-here", &c.mnt(), &[], creds(&env));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("the bucket 'no-such-bucket-here' does not exist"),
        "{err}"
    );
}

#[test]
fn wrong_secret_is_reported_as_rejected_credentials() {
    let env = S3Env::get();
    if !env.checks_credentials() {
        // moto accepts any signature; Garage, which checks, runs this test in the same suite.
        eprintln!("{} does not check signatures", env.backend);
        return;
    }
    let c = Case::new();
    let (code, err) = c.mount(
        &env,
        &env.bucket,
        &c.mnt(),
        &[],
        (&env.access_key, "wrong-secret"),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("rejected the credentials"), "{err}");
    assert!(
        !err.contains("wrong-secret"),
        "the secret must not be printed: {err}"
    );
    let (code, err) = c.mount(
        &env,
        &env.bucket,
        &c.mnt(),
        &[],
        ("GK000000000000000000000000", "x"),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("rejected the credentials"), "{err}");
}

#[test]
fn unreachable_endpoint_is_reported() {
    let env = S3Env::get();
    let c = Case::new();
    let (code, err) = c.mount(
        &env,
        &env.bucket,
        &c.mnt(),
        &["--endpoint", "http://127.0.0.1:9"],
        creds(&env),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the S3 endpoint"), "{err}");
}

#[test]
fn bad_options_are_usage_errors() {
    let env = S3Env::get();
    let c = Case::new();
    let mnt = c.mnt();
    let (code, err) = run_cli(&[&env.bucket, &mnt, "-o", "allow_other,bogus_option"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown mount option 'bogus_option'"), "{err}");
    let (code, err) = run_cli(&["mount", &env.bucket, &mnt, "--metadata-ttl", "soon"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'soon' is not a duration"), "{err}");
    let (code, err) = run_cli(&[&env.bucket, &mnt, "-o", "file_mode=999"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not an octal permission mode"), "{err}");
    let (code, err) = c.mount(
        &env,
        &env.bucket,
        &mnt,
        &["--endpoint", "not a url"],
        creds(&env),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not a URL"), "{err}");
    let (code, err) = c.mount(&env, "Bad_Bucket!", &mnt, &[], creds(&env));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a valid bucket name"), "{err}");
}

#[test]
fn no_credentials_or_an_open_credentials_file_are_refused() {
    let env = S3Env::get();
    let c = Case::new();
    let mnt = c.mnt();
    let (code, err) = run_cli(
        &["mount", &env.bucket, &mnt, "--endpoint", &env.endpoint],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no credentials found"), "{err}");

    let file = c.dir.path().join("creds");
    std::fs::write(&file, format!("{}:{}\n", env.access_key, env.secret_key)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = file.to_str().unwrap();
    let (code, err) = run_cli(
        &[
            "mount",
            &env.bucket,
            &mnt,
            "--endpoint",
            &env.endpoint,
            "--credentials",
            f,
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("can be read by other users") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(&env.secret_key), "{err}");
}

#[test]
fn unusable_mountpoints_are_explained() {
    let env = S3Env::get();
    let c = Case::new();
    let missing = c.dir.path().join("nope").to_str().unwrap().to_string();
    let (code, err) = c.mount(&env, &env.bucket, &missing, &[], creds(&env));
    assert_eq!(code, 1);
    assert!(
        err.contains("does not exist; create it with `mkdir -p"),
        "{err}"
    );

    let file = c.dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let (code, err) = c.mount(&env, &env.bucket, file.to_str().unwrap(), &[], creds(&env));
    assert_eq!(code, 1);
    assert!(err.contains("is not a directory"), "{err}");

    std::fs::write(c.dir.path().join("mnt/occupant"), b"x").unwrap();
    let (code, err) = c.mount(&env, &env.bucket, &c.mnt(), &[], creds(&env));
    assert_eq!(code, 1);
    assert!(
        err.contains("is not empty") && err.contains("nonempty"),
        "{err}"
    );
}

/// A cache directory others could write into is refused before anything is mounted: they
/// could plant files the mount would upload, or point its lock or journal elsewhere.
#[test]
fn a_cache_directory_others_can_write_is_refused() {
    let env = S3Env::get();
    type Spoil = fn(&std::path::Path);
    let cases: [(&str, Spoil, &str); 4] = [
        (
            "world-writable",
            |d| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap(),
            "can be written by its group or by others (mode 777)",
        ),
        (
            "another user's",
            |d| std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap(),
            "belongs to uid 65534, not to the mounting user",
        ),
        (
            "a symbolic link",
            |d| {
                let real = d.with_extension("real");
                std::fs::rename(d, &real).unwrap();
                std::os::unix::fs::symlink(&real, d).unwrap();
            },
            "is a symbolic link",
        ),
        (
            "a lock file that is a symbolic link",
            |d| {
                let victim = d.with_extension("victim");
                std::fs::write(&victim, b"not yours").unwrap();
                std::os::unix::fs::symlink(&victim, d.join("lock")).unwrap();
            },
            "cannot open the lock file",
        ),
    ];
    for (what, spoil, sentence) in cases {
        let c = Case::new();
        let cache = std::path::PathBuf::from(c.cache());
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&cache)
            .unwrap();
        spoil(&cache);
        let (code, err) = c.mount(&env, &env.bucket, &c.mnt(), &[], creds(&env));
        assert_eq!(code, 1, "{what}: {err}");
        assert!(err.contains(sentence), "{what}: {err}");
    }
}

#[test]
fn busy_mountpoint_and_shared_cache_dir_are_refused() {
    let m = TestMount::new("busy");
    let env = m.env.clone();
    let mnt = m.mnt.to_str().unwrap().to_string();
    let other_cache = m.dir.path().join("cache2").to_str().unwrap().to_string();
    let (code, err) = run_cli(
        &[
            "mount",
            &m.source(),
            &mnt,
            "--endpoint",
            &env.endpoint,
            "--region",
            &env.region,
            "--cache-dir",
            &other_cache,
        ],
        &[
            ("AWS_ACCESS_KEY_ID", &env.access_key),
            ("AWS_SECRET_ACCESS_KEY", &env.secret_key),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is already a mount point"), "{err}");

    let other = tempfile::tempdir().unwrap();
    let other_mnt = other.path().to_str().unwrap();
    let cache = m.cache.to_str().unwrap();
    let (code, err) = run_cli(
        &[
            "mount",
            &m.source(),
            other_mnt,
            "--endpoint",
            &env.endpoint,
            "--region",
            &env.region,
            "--cache-dir",
            cache,
        ],
        &[
            ("AWS_ACCESS_KEY_ID", &env.access_key),
            ("AWS_SECRET_ACCESS_KEY", &env.secret_key),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is in use by another s3mediafs mount"),
        "{err}"
    );
    assert!(!is_mounted(other.path()));
    // The first mount is unharmed.
    std::fs::write(m.path("still"), b"works").unwrap();
    assert_eq!(std::fs::read(m.path("still")).unwrap(), b"works");
}

#[test]
fn helper_form_detaches_once_mounted_and_help_explains() {
    let env = S3Env::get();
    let c = Case::new();
    let mnt = c.mnt();
    let prefix = unique_prefix("helper");
    let source = format!("{}:{}", env.bucket, prefix);
    let opts = format!(
        "rw,_netdev,nofail,endpoint={},region={},cache_dir={}",
        env.endpoint,
        env.region,
        c.cache()
    );
    let (code, err) = run_cli(
        &[&source, &mnt, "-o", &opts],
        &[
            ("AWS_ACCESS_KEY_ID", &env.access_key),
            ("AWS_SECRET_ACCESS_KEY", &env.secret_key),
        ],
    );
    assert_eq!(code, 0, "{err}");
    // The helper returned only once the mount was there.
    assert!(is_mounted(std::path::Path::new(&mnt)));
    std::fs::write(format!("{mnt}/hello"), b"from the helper form").unwrap();
    std::fs::File::open(&mnt).unwrap().sync_all().unwrap();
    assert_eq!(
        Bucket::new(&env).get(&format!("{prefix}hello")).unwrap(),
        b"from the helper form"
    );
    let st = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());

    let (code, help) = {
        let out = std::process::Command::new(BIN)
            .args(["mount", "--help"])
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8(out.stdout).unwrap(),
        )
    };
    assert_eq!(code, 0);
    for flag in [
        "--endpoint",
        "--cache-dir",
        "--allow-other",
        "--metadata-ttl",
        "[default: 10s]",
        "-o <OPTIONS>",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn a_region_other_than_the_buckets_is_named() {
    let env = S3Env::get();
    if !env.checks_credentials() {
        eprintln!("{} accepts any region", env.backend);
        return;
    }
    let c = Case::new();
    let (code, err) = c.mount(
        &env,
        &env.bucket,
        &c.mnt(),
        &["--region", "eu-west-3"],
        creds(&env),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("another region"), "{err}");
    assert!(err.contains("--region"), "{err}");
}

#[test]
fn conflicting_options_are_refused() {
    let env = S3Env::get();
    let c = Case::new();
    let mnt = c.mnt();
    let (code, err) = run_cli(
        &["mount", &env.bucket, &mnt, "--foreground", "--background"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, err) = c.mount(
        &env,
        &env.bucket,
        &mnt,
        &["--cache-size", "1G", "--max-dirty", "2G"],
        creds(&env),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is larger than --cache-size"), "{err}");
    let (code, err) = c.mount(&env, &env.bucket, &mnt, &["--part-size", "1M"], creds(&env));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("outside what S3 allows"), "{err}");
}

#[test]
fn a_file_larger_than_s3_holds_fails_with_efbig_and_an_empty_file_is_an_empty_object() {
    let m = TestMount::new("efbig");
    let f = std::fs::File::create(m.path("huge")).unwrap();
    // 10 000 parts of 5 GiB would be more, but S3 caps an object at 5 TiB.
    assert_eq!(errno(f.set_len((5u64 << 40) + 1)), libc::EFBIG);
    drop(f);
    assert_eq!(std::fs::metadata(m.path("huge")).unwrap().len(), 0);
    std::fs::write(m.path("empty"), b"").unwrap();
    assert_eq!(m.object("empty").unwrap(), Vec::<u8>::new());
    assert_eq!(m.object("huge").unwrap(), Vec::<u8>::new());
    assert!(m.log().contains("at most 5 TiB"), "{}", m.log());
}
