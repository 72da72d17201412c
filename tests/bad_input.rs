//! Bad input before mounting: each mistake gets one clear sentence, a non-zero exit, leaves
//! nothing mounted and never prints the secret key. The mistakes are rows of one table, run
//! by one test that reports every row that went wrong. A mountpoint or cache directory held
//! by a running mount needs that mount, and has a test of its own; so do the mount helper
//! form with `--help`, and a file larger than S3 holds.

mod common;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

/// One mistake: the command that makes it, what it must say, and how it must exit.
#[derive(Default)]
struct BadInput {
    /// What is wrong, for the report.
    what: &'static str,
    /// The command line as a shell would take it: `NAME=value` environment assignments, then
    /// the arguments to `s3mediafs`, split at spaces ('quoted' arguments may hold spaces).
    /// `{bucket}`, `{endpoint}`, `{region}`, `{key}` and `{secret}` stand for the test
    /// server's, `{dir}` for the row's own scratch directory, `{mnt}` for the empty directory
    /// `{dir}/mnt` and `{cache}` for `{dir}/cache`; `{server}` stands for
    /// `--endpoint {endpoint} --region {region}` and `{keys}` for the server's keys in
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    command: &'static str,
    /// Fragments the error output must contain.
    says: &'static [&'static str],
    /// The exit code: 2 for a usage error, 1 for anything else.
    code: i32,
    /// Prepares the row's scratch directory before the command runs.
    setup: Option<fn(&Path, &S3Env)>,
    /// Only against a server that checks signatures (moto accepts any, Garage does not).
    needs_signature_checks: bool,
}

/// Makes the row's cache directory the way a careful operator would (mode 700).
fn private_cache(dir: &Path) -> PathBuf {
    let cache = dir.join("cache");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&cache)
        .unwrap();
    cache
}

fn bad_inputs() -> Vec<BadInput> {
    vec![
        BadInput {
            what: "a bucket that does not exist",
            command: "{keys} mount no-such-bucket-here {mnt} --cache-dir {cache} {server}",
            says: &["the bucket 'no-such-bucket-here' does not exist"],
            code: 1,
            ..Default::default()
        },
        BadInput {
            what: "a wrong secret",
            command: "AWS_ACCESS_KEY_ID={key} AWS_SECRET_ACCESS_KEY=wrong-secret \
                      mount {bucket} {mnt} --cache-dir {cache} {server}",
            says: &["rejected the credentials"],
            code: 1,
            needs_signature_checks: true,
            ..Default::default()
        },
        BadInput {
            what: "a key id the server does not know",
            command: "AWS_ACCESS_KEY_ID=GK000000000000000000000000 AWS_SECRET_ACCESS_KEY=not-ours \
                      mount {bucket} {mnt} --cache-dir {cache} {server}",
            says: &["rejected the credentials"],
            code: 1,
            needs_signature_checks: true,
            ..Default::default()
        },
        BadInput {
            what: "a region other than the bucket's",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} \
                      --endpoint {endpoint} --region eu-west-3",
            says: &["another region", "--region"],
            code: 1,
            needs_signature_checks: true,
            ..Default::default()
        },
        BadInput {
            what: "an endpoint nothing listens on",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} \
                      --region {region} --endpoint http://127.0.0.1:9",
            says: &["cannot reach the S3 endpoint"],
            code: 1,
            ..Default::default()
        },
        BadInput {
            what: "an endpoint that is not a URL",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} \
                      --region {region} --endpoint 'not a url'",
            says: &["is not a URL"],
            code: 1,
            ..Default::default()
        },
        BadInput {
            what: "an endpoint with the keys in it",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} \
                      --region {region} --endpoint http://{key}:{secret}@127.0.0.1:9",
            says: &["the endpoint holds credentials", "--credentials"],
            code: 1,
            ..Default::default()
        },
        BadInput {
            what: "an invalid bucket name",
            command: "{keys} mount Bad_Bucket! {mnt} --cache-dir {cache} {server}",
            says: &["not a valid bucket name"],
            code: 1,
            ..Default::default()
        },
        BadInput {
            what: "an unknown -o option (mount helper form)",
            command: "{bucket} {mnt} -o allow_other,bogus_option",
            says: &["unknown mount option 'bogus_option'"],
            code: 2,
            ..Default::default()
        },
        BadInput {
            what: "a -o mode that is not octal (mount helper form)",
            command: "{bucket} {mnt} -o file_mode=999",
            says: &["not an octal permission mode"],
            code: 2,
            ..Default::default()
        },
        BadInput {
            what: "a duration that is not one",
            command: "mount {bucket} {mnt} --metadata-ttl soon",
            says: &["'soon' is not a duration"],
            code: 2,
            ..Default::default()
        },
        BadInput {
            what: "--foreground with --background",
            command: "mount {bucket} {mnt} --foreground --background",
            says: &["cannot be used with"],
            code: 2,
            ..Default::default()
        },
        BadInput {
            what: "--max-dirty larger than --cache-size",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} {server} \
                      --cache-size 1G --max-dirty 2G",
            says: &["is larger than --cache-size"],
            code: 1,
            ..Default::default()
        },
        BadInput {
            what: "a part size S3 does not allow",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} {server} --part-size 1M",
            says: &["outside what S3 allows"],
            code: 1,
            ..Default::default()
        },
        BadInput {
            what: "parts larger than the memory they are sent from",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} {server} --part-size 1G",
            says: &[
                "--part-size 1073741824 is larger than --max-memory",
                "raise --max-memory",
            ],
            code: 1,
            ..Default::default()
        },
        BadInput {
            what: "no credentials anywhere",
            command: "mount {bucket} {mnt} --endpoint {endpoint}",
            says: &["no credentials found"],
            code: 1,
            ..Default::default()
        },
        BadInput {
            what: "a credentials file others can read",
            command: "mount {bucket} {mnt} --endpoint {endpoint} --credentials {dir}/creds",
            says: &["can be read by other users", "chmod 600"],
            code: 1,
            setup: Some(|dir, env| {
                let file = dir.join("creds");
                let line = format!("{}:{}\n", env.access_key, env.secret_key);
                std::fs::write(&file, line).unwrap();
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            }),
            ..Default::default()
        },
        BadInput {
            what: "a mountpoint that does not exist",
            command: "{keys} mount {bucket} {dir}/nope --cache-dir {cache} {server}",
            says: &["does not exist; create it with `mkdir -p"],
            code: 1,
            ..Default::default()
        },
        BadInput {
            what: "a mountpoint that is a file",
            command: "{keys} mount {bucket} {dir}/file --cache-dir {cache} {server}",
            says: &["is not a directory"],
            code: 1,
            setup: Some(|dir, _| std::fs::write(dir.join("file"), b"x").unwrap()),
            ..Default::default()
        },
        BadInput {
            what: "a mountpoint that is not empty",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} {server}",
            says: &["is not empty", "nonempty"],
            code: 1,
            setup: Some(|dir, _| std::fs::write(dir.join("mnt/occupant"), b"x").unwrap()),
            ..Default::default()
        },
        // A cache directory others could write into is refused before anything is mounted:
        // they could plant files the mount would upload, or point its lock or journal
        // elsewhere.
        BadInput {
            what: "a world-writable cache directory",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} {server}",
            says: &["can be written by its group or by others (mode 777)"],
            code: 1,
            setup: Some(|dir, _| {
                let mode = std::fs::Permissions::from_mode(0o777);
                std::fs::set_permissions(private_cache(dir), mode).unwrap();
            }),
            ..Default::default()
        },
        BadInput {
            what: "another user's cache directory",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} {server}",
            says: &["belongs to uid 65534, not to the mounting user"],
            code: 1,
            setup: Some(|dir, _| {
                std::os::unix::fs::chown(private_cache(dir), Some(65534), Some(65534)).unwrap();
            }),
            ..Default::default()
        },
        BadInput {
            what: "a cache directory that is a symbolic link",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} {server}",
            says: &["is a symbolic link"],
            code: 1,
            setup: Some(|dir, _| {
                let cache = private_cache(dir);
                let real = cache.with_extension("real");
                std::fs::rename(&cache, &real).unwrap();
                std::os::unix::fs::symlink(&real, &cache).unwrap();
            }),
            ..Default::default()
        },
        BadInput {
            what: "a cache lock file that is a symbolic link",
            command: "{keys} mount {bucket} {mnt} --cache-dir {cache} {server}",
            says: &["cannot open the lock file"],
            code: 1,
            setup: Some(|dir, _| {
                let cache = private_cache(dir);
                let victim = cache.with_extension("victim");
                std::fs::write(&victim, b"not yours").unwrap();
                std::os::unix::fs::symlink(&victim, cache.join("lock")).unwrap();
            }),
            ..Default::default()
        },
    ]
}

#[test]
fn each_bad_input_is_refused_with_its_sentence_and_exit_code() {
    let env = S3Env::get();
    let rows = bad_inputs();
    let mut failures = Vec::new();
    for row in &rows {
        if row.needs_signature_checks && !env.checks_credentials() {
            eprintln!(
                "{}: skipped, {} does not check signatures",
                row.what, env.backend
            );
            continue;
        }
        if let Err(why) = run_row(row, &env) {
            failures.push(format!("{}: {why}", row.what));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs were not refused as expected:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// Runs one row in a scratch directory of its own; the error says everything that differed
/// from what the row expects.
fn run_row(row: &BadInput, env: &S3Env) -> Result<(), String> {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    std::fs::create_dir(dir.join("mnt")).unwrap();
    if let Some(setup) = row.setup {
        setup(dir, env);
    }
    let line = row
        .command
        .replace(
            "{keys}",
            "AWS_ACCESS_KEY_ID={key} AWS_SECRET_ACCESS_KEY={secret}",
        )
        .replace("{server}", "--endpoint {endpoint} --region {region}")
        .replace("{mnt}", "{dir}/mnt")
        .replace("{cache}", "{dir}/cache")
        .replace("{dir}", dir.to_str().unwrap())
        .replace("{bucket}", &env.bucket)
        .replace("{endpoint}", &env.endpoint)
        .replace("{region}", &env.region)
        .replace("{key}", &env.access_key)
        .replace("{secret}", &env.secret_key);
    let words = split_command_line(&line);
    let is_assignment = |w: &String| {
        w.split_once('=')
            .is_some_and(|(name, _)| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
    };
    let env_count = words.iter().take_while(|w| is_assignment(w)).count();
    let vars: Vec<(&str, &str)> = words[..env_count]
        .iter()
        .map(|w| w.split_once('=').unwrap())
        .collect();
    let args: Vec<&str> = words[env_count..].iter().map(String::as_str).collect();
    let (code, err) = run_cli(&args, &vars);

    let mut wrong = Vec::new();
    if code != row.code {
        wrong.push(format!("exit code {code}, not {}", row.code));
    }
    for fragment in row.says {
        if !err.contains(fragment) {
            wrong.push(format!("does not say {fragment:?}"));
        }
    }
    // Neither the server's secret nor one the command was given is ever printed.
    let secrets = vars
        .iter()
        .filter(|(name, _)| *name == "AWS_SECRET_ACCESS_KEY")
        .map(|(_, secret)| *secret)
        .chain([env.secret_key.as_str()]);
    for secret in secrets {
        if err.contains(secret) {
            wrong.push(format!("prints the secret {:?}", redact(secret, env)));
        }
    }
    let left = mounts_under(dir);
    for mnt in &left {
        let _ = std::process::Command::new("fusermount3")
            .arg("-uz")
            .arg(mnt)
            .status();
    }
    if !left.is_empty() {
        wrong.push(format!("left mounted: {left:?}"));
    }
    match wrong.is_empty() {
        true => Ok(()),
        false => Err(format!(
            "{}\n    stderr: {}",
            wrong.join("; "),
            redact(err.trim(), env)
        )),
    }
}

/// `text` with the server's secret key replaced by `{secret}`, to be shown.
fn redact(text: &str, env: &S3Env) -> String {
    text.replace(&env.secret_key, "{secret}")
}

/// Splits a command line at spaces; an argument in single quotes may hold spaces.
fn split_command_line(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            _ => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Mount points at or under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap();
    let dir = dir.to_str().unwrap().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == dir || m.starts_with(&format!("{dir}/")))
        .map(str::to_string)
        .collect()
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

/// A machine that cannot mount FUSE is told what it lacks, in one sentence: a container
/// started without /dev/fuse (here: a private /dev without it), and, for a user other than
/// root, no fusermount3 on PATH.
#[test]
fn a_machine_without_fuse_is_told_what_it_lacks() {
    let env = S3Env::get();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let source = format!("{}:t/", env.bucket);
    let cache = dir.path().join("cache");
    // A copy another user can run (the build may sit in a private directory).
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(shared.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = shared.path().join("s3mediafs");
    std::fs::copy(BIN, &bin).unwrap();
    let mount = [
        bin.to_str().unwrap(),
        "mount",
        &source,
        mnt.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--endpoint",
        &env.endpoint,
        "--region",
        &env.region,
    ];
    // In a private mount namespace: a /dev without fuse; fusermount3 and fusermount
    // hidden, for a user other than root.
    let private_dev = "mount -t tmpfs none /dev && exec \"$0\" \"$@\"";
    let no_fusermount = "for f in /usr/bin/fusermount3 /usr/bin/fusermount /bin/fusermount3 \
         /bin/fusermount; do [ -e $f ] && mount --bind /dev/null $f; done; \
         exec setpriv --reuid=65534 --regid=65534 --clear-groups \"$0\" \"$@\"";
    let in_namespace = |script| {
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
        ]
    };
    let cases = [
        (in_namespace(private_dev), "/dev/fuse is missing"),
        (in_namespace(no_fusermount), "fusermount3 was not found"),
    ];
    for (wrapper, says) in cases {
        let out = std::process::Command::new(wrapper[0])
            .args(&wrapper[1..])
            .args(mount)
            .env("AWS_ACCESS_KEY_ID", &env.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &env.secret_key)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{wrapper:?}: {err}");
        assert!(err.contains(says), "{wrapper:?}: {err}");
        assert!(!is_mounted(&mnt));
    }
}

#[test]
fn helper_form_detaches_once_mounted_and_help_explains() {
    let env = S3Env::get();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("mnt")).unwrap();
    let mnt = dir.path().join("mnt").to_str().unwrap().to_string();
    let prefix = unique_prefix("helper");
    let source = format!("{}:{}", env.bucket, prefix);
    let opts = format!(
        "rw,_netdev,nofail,endpoint={},region={},cache_dir={}",
        env.endpoint,
        env.region,
        dir.path().join("cache").display()
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
