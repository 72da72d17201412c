//! Command-line flags, `-o` mount options and credentials, validated into one `Config`.
//!
//! Every flag has an `-o` spelling: `--cache-dir D` is `-o cache_dir=D`, `--allow-other` is
//! `-o allow_other`. Options that `mount(8)` and systemd pass for their own use are accepted
//! and ignored; any other unknown option is an error.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::cache::{CacheLimits, MinFree};
use crate::fs::FsOptions;
use crate::readahead::ReadaheadOptions;
use crate::store::{Encryption, ObjectOptions, StoreConfig};
use crate::writeback::WritebackOptions;

#[derive(Parser, Debug)]
#[command(
    name = "s3mediafs",
    version,
    about = "Mount an S3 or S3-compatible bucket as a directory.",
    long_about = "Mount an S3 or S3-compatible bucket as a directory: one file is one object, \
prefixes are directories. Built to hold a Matrix homeserver's media store.\n\n\
Also usable as a mount helper: `s3mediafs BUCKET[:PREFIX] MOUNTPOINT -o opt[=val],...` \
(what `mount -t fuse.s3mediafs` and /etc/fstab run) is the same as `s3mediafs mount \
--background ...` with each option spelled as a flag.",
    after_help = "Credentials are read from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, from a \
KEY:SECRET file given with --credentials (mode 0600), or from the AWS shared credentials file \
(~/.aws/credentials, profile from --profile or AWS_PROFILE). They never go on the command line."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount BUCKET[:PREFIX] at MOUNTPOINT.
    Mount(Box<MountArgs>),
    /// Copy an existing media store (a local directory) into the bucket, keeping the
    /// relative paths as keys. Resumable: objects already there with the same size and
    /// content are skipped. Never changes or deletes the source.
    Import(Box<ImportArgs>),
    /// Show what a running mount is doing: uploads pending, cache use, requests, errors.
    Status(StatusArgs),
    /// Write the man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// When close() returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WriteMode {
    /// Once the file is fsynced and journaled in the cache directory; it is uploaded in the
    /// background.
    Writeback,
    /// Once the file is in the bucket.
    Writethrough,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    Mount(Box<MountArgs>),
    Import(Box<ImportArgs>),
    Status(StatusArgs),
    GenerateDocs(PathBuf),
}

/// Where the bucket is and how to sign requests to it; shared by every subcommand.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// S3 endpoint URL for S3-compatible stores (Garage, MinIO, Ceph, B2, R2...).
    /// Default: AWS S3 for the region. Also read from AWS_ENDPOINT_URL.
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub endpoint: Option<String>,

    /// Region to sign requests for (Garage's default is `garage`).
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,

    /// Bucket addressing: `path` (https://host/bucket/key), `virtual`
    /// (https://bucket.host/key), or `auto` = path with a custom endpoint, virtual on AWS.
    #[arg(long, default_value = "auto", value_parser = ["auto", "path", "virtual"])]
    pub addressing: String,

    /// Profile in the AWS shared credentials file.
    #[arg(long, env = "AWS_PROFILE")]
    pub profile: Option<String>,

    /// File holding `ACCESS_KEY:SECRET_KEY` on one line; must not be readable by group or others.
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,

    /// Storage class of the objects written (`-o storage_class=`): STANDARD, STANDARD_IA,
    /// INTELLIGENT_TIERING, ... as the store names them. Default: the bucket's.
    #[arg(long, value_name = "CLASS")]
    pub storage_class: Option<String>,

    /// Server-side encryption of the objects written (`-o sse=`): `aes256` (SSE-S3) or
    /// `aws:kms` (SSE-KMS, with --sse-kms-key-id or the bucket's default key). Default:
    /// the bucket's.
    #[arg(long, value_name = "KIND", value_parser = ["aes256", "aws:kms"])]
    pub sse: Option<String>,

    /// The KMS key for --sse aws:kms (`-o sse_kms_key_id=`): its id, ARN or alias.
    #[arg(long, value_name = "KEY_ID")]
    pub sse_kms_key_id: Option<String>,

    /// Encrypt with a key of your own, SSE-C (`-o sse_c_key_file=`): a file of mode 0600
    /// holding 32 bytes, raw or in base64. Every read sends it: without it the objects
    /// cannot be read by anyone, this mount included.
    #[arg(long, value_name = "FILE")]
    pub sse_c_key_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// The directory to copy, e.g. /var/lib/matrix-synapse/media.
    #[arg(value_name = "SRC_DIR")]
    pub source_dir: PathBuf,

    /// The bucket, optionally with a key prefix (as for `mount`).
    #[arg(value_name = "BUCKET[:PREFIX]")]
    pub target: String,

    #[command(flatten)]
    pub store: StoreArgs,

    /// Files copied at once.
    #[arg(long, short = 'j', default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,

    /// After copying, read every object back and compare it with its source file.
    #[arg(long)]
    pub verify: bool,

    /// Only report what would be copied (and, with --verify, check what is there).
    #[arg(long)]
    pub dry_run: bool,

    /// Part size of multipart uploads.
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    pub part_size: u64,

    /// No progress bar (it is also left out when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Where the bucket is mounted.
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,

    /// Print every metric, in the Prometheus text format, instead of a summary.
    #[arg(long)]
    pub raw: bool,
}

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// The bucket, optionally with a key prefix: `media` or `media:synapse/`. The prefix is
    /// used verbatim (give the trailing `/` yourself), like synapse-s3-storage-provider.
    #[arg(value_name = "BUCKET[:PREFIX]")]
    pub source: String,

    /// An existing, empty directory to mount on.
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,

    /// Mount options, comma-separated: each flag below as `name` or `name=value`
    /// (e.g. `-o allow_other,uid=115,endpoint=http://127.0.0.1:3900`).
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    pub options: Vec<String>,

    #[command(flatten)]
    pub store: StoreArgs,

    /// Owner shown for every file and directory, a user name or number
    /// [default: the mounting user].
    #[arg(long, value_parser = parse_uid)]
    pub uid: Option<u32>,

    /// Group shown for every file and directory, a group name or number
    /// [default: the mounting user's group].
    #[arg(long, value_parser = parse_gid)]
    pub gid: Option<u32>,

    /// Permission bits of files, in octal.
    #[arg(long, default_value = "0644", value_parser = parse_mode)]
    pub file_mode: u16,

    /// Permission bits of directories, in octal.
    #[arg(long, default_value = "0755", value_parser = parse_mode)]
    pub dir_mode: u16,

    /// Let users other than the mounting one use the mount (needed when Synapse runs as its
    /// own user and root mounts). Turns on --default-permissions: other users get only what
    /// --uid, --gid and the modes give them.
    #[arg(long)]
    pub allow_other: bool,

    /// Have the kernel check permissions against uid, gid and the modes (always on with
    /// --allow-other).
    #[arg(long)]
    pub default_permissions: bool,

    /// Mount read-only (`-o ro`).
    #[arg(long)]
    pub read_only: bool,

    /// Local directory for staged writes [default: /var/cache/s3mediafs/<bucket>-<id> as
    /// root, else ~/.cache/s3mediafs/<bucket>-<id>].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// How long file attributes and directory listings are trusted (e.g. 10s, 500ms, 0,
    /// forever): a file added, changed or deleted on another host may be seen as it was for
    /// this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub metadata_ttl: Duration,

    /// How long a name a lookup found missing is remembered, in a directory whose complete
    /// listing is not held (a complete listing answers for the metadata TTL).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub negative_ttl: Duration,

    /// Smallest multipart part size; larger files use larger parts (S3 allows 10 000).
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    pub part_size: u64,

    /// When close() returns.
    #[arg(long, value_enum, default_value_t = WriteMode::Writeback)]
    pub write_mode: WriteMode,

    /// Bytes of closed files waiting for upload above which writers wait for uploads
    /// [default: half of --cache-size, at most 1G].
    #[arg(long, value_parser = parse_size)]
    pub max_dirty: Option<u64>,

    /// Most local disk the cache directory uses: cached blocks of read files plus files
    /// being written or waiting for upload. Never exceeded: clean blocks are evicted first
    /// (least recently used), and blocks that do not fit are not cached.
    #[arg(long, default_value = "10G", value_parser = parse_size)]
    pub cache_size: u64,

    /// Free space the cache filesystem keeps: a share (`5%`) or a size (`2G`). Clean blocks
    /// are evicted, or not cached, to keep it.
    #[arg(long, default_value = "5%", value_parser = parse_min_free)]
    pub cache_min_free: MinFree,

    /// Size of the blocks read data is fetched and cached in.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub block_size: u64,

    /// Largest readahead window of a sequential reader (it starts at one block and doubles
    /// while reads stay sequential; random reads collapse it).
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    pub max_readahead: u64,

    /// Do not let the kernel read fully cached files straight from the cache directory.
    /// By default (Linux 6.9 or later, mounted as root) a file whose every block is cached
    /// is passed through to its cache file, so re-reads of large media run at local-disk
    /// speed; the cache file is checked against its block checksums first whenever it
    /// changed since this mount last wrote or checked it. With this flag every read goes
    /// through the mount and each block is checked as it is read.
    #[arg(long)]
    pub no_passthrough: bool,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9108), at /metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Memory for read data in flight and read buffers, shared by all open files.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub max_memory: u64,

    /// How long one read from the store may take, retries included, before the reading
    /// program gets EIO.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub read_timeout: Duration,

    /// How long unmounting waits for pending uploads; what is left stays journaled and is
    /// uploaded by the next mount with the same cache directory.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Allow mounting over a directory that is not empty (its files are hidden meanwhile).
    #[arg(long)]
    pub nonempty: bool,

    /// Stay in the foreground (the default for `s3mediafs mount`).
    #[arg(short = 'f', long, conflicts_with = "background")]
    pub foreground: bool,

    /// Return once the mount is ready and keep serving it in the background (the default
    /// in the mount-helper form).
    #[arg(long)]
    pub background: bool,

    /// Log level: error, warn, info, debug or trace (RUST_LOG, if set, wins).
    #[arg(long, default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: String,
}

/// Mount options that belong to mount(8), systemd or the kernel's generic set; they mean
/// nothing to the bucket and are accepted silently.
const GENERIC_OPTIONS: &[&str] = &[
    "_netdev",
    "nofail",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "defaults",
    "rw",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "async",
    "sync",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "dirsync",
    "loop",
    "comment",
];

fn is_generic_option(name: &str) -> bool {
    GENERIC_OPTIONS.contains(&name) || name.starts_with("x-") || name.starts_with("comment=")
}

/// Parses the process arguments. The mount-helper form (`s3mediafs SRC MNT -o ...`)
/// becomes `s3mediafs mount SRC MNT --background ...`, and each `-o` option becomes its
/// flag, so both forms share one set of rules.
const SUBCOMMANDS: &[&str] = &["mount", "import", "status", "generate-docs", "help"];

/// Drops the flags mount(8) gives its helpers (-s sloppy, -f fake, -n no mtab, -v verbose,
/// -N namespace, -t type), which mean nothing here.
fn strip_mount_helper_flags(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter();
    out.extend(it.next());
    while let Some(a) = it.next() {
        match a.to_string_lossy().as_ref() {
            "-s" | "-f" | "-n" | "-v" => {}
            "-N" | "-t" => {
                it.next();
            }
            _ => out.push(a),
        }
    }
    out
}

pub fn parse_args(args: Vec<OsString>) -> Result<Invocation, clap::Error> {
    let mut args = args;
    // mount(8) runs `mount.s3mediafs SRC DIR [-sfnv] [-o OPTS]`; mount.fuse3 and fstab
    // run `s3mediafs SRC DIR -o OPTS`.
    let as_mount_helper = args.first().is_some_and(|a| {
        Path::new(a)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("mount."))
    });
    if as_mount_helper {
        args = strip_mount_helper_flags(args);
    }
    let helper_form = as_mount_helper
        || args.get(1).is_some_and(|a| {
            let a = a.to_string_lossy();
            !a.starts_with('-') && !SUBCOMMANDS.contains(&a.as_ref())
        });
    if helper_form {
        args.insert(1, "mount".into());
    }
    let first = match Cli::try_parse_from(&args)?.command {
        Command::Mount(m) => m,
        Command::Import(i) => return Ok(Invocation::Import(i)),
        Command::Status(s) => return Ok(Invocation::Status(s)),
        Command::GenerateDocs { dir } => return Ok(Invocation::GenerateDocs(dir)),
    };
    if first.options.is_empty() && !helper_form {
        return Ok(Invocation::Mount(with_default_mode(first, false)));
    }
    // Re-parse with the -o options spelled as flags, so they get the same validation.
    let mut flags: Vec<OsString> = Vec::new();
    let mut skip_next = false;
    for (i, a) in args.iter().enumerate() {
        if skip_next {
            skip_next = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "-o" {
            skip_next = true;
            continue;
        }
        if i > 0 && s.starts_with("-o") && s.len() > 2 {
            continue;
        }
        flags.push(a.clone());
    }
    let known = known_long_flags();
    for opt in first.options.iter().flat_map(|o| o.split(',')) {
        let opt = opt.trim();
        if opt.is_empty() || is_generic_option(opt.split('=').next().unwrap_or(opt)) {
            continue;
        }
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (opt, None),
        };
        let flag = match name {
            "ro" => "read-only".to_string(),
            "nonempty" => "nonempty".to_string(),
            n => n.replace('_', "-"),
        };
        let Some(takes_value) = known.iter().find(|(f, _)| *f == flag).map(|(_, v)| *v) else {
            return Err(Cli::command().error(
                clap::error::ErrorKind::UnknownArgument,
                format!(
                    "unknown mount option '{name}'; see `s3mediafs mount --help` for the options"
                ),
            ));
        };
        match (takes_value, value) {
            (true, Some(v)) => {
                flags.push(format!("--{flag}").into());
                flags.push(v.into());
            }
            (true, None) => {
                return Err(Cli::command().error(
                    clap::error::ErrorKind::InvalidValue,
                    format!("mount option '{name}' needs a value: -o {name}=VALUE"),
                ))
            }
            (false, None) => flags.push(format!("--{flag}").into()),
            (false, Some(_)) => {
                return Err(Cli::command().error(
                    clap::error::ErrorKind::InvalidValue,
                    format!("mount option '{name}' takes no value"),
                ))
            }
        }
    }
    match Cli::try_parse_from(&flags)?.command {
        Command::Mount(m) => Ok(Invocation::Mount(with_default_mode(m, helper_form))),
        _ => unreachable!("the flags were built for `mount`"),
    }
}

fn with_default_mode(mut a: Box<MountArgs>, helper_form: bool) -> Box<MountArgs> {
    if !a.foreground && !a.background {
        a.background = helper_form;
        a.foreground = !helper_form;
    }
    a.foreground = !a.background;
    a
}

/// Long flags of `mount`, with whether each takes a value.
fn known_long_flags() -> Vec<(String, bool)> {
    let cmd = Cli::command();
    let mount = cmd
        .find_subcommand("mount")
        .expect("mount subcommand")
        .clone();
    mount
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            let takes = a.get_action().takes_values();
            Some((long, takes))
        })
        .filter(|(l, _)| l != "help" && l != "version")
        .collect()
}

fn parse_mode(s: &str) -> Result<u16, String> {
    let t = s.trim_start_matches("0o");
    u16::from_str_radix(t, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("'{s}' is not an octal permission mode like 0644"))
}

/// A user id, or a user name looked up in the password database.
fn parse_uid(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(s).map_err(|_| format!("'{s}' is not a user"))?;
    // SAFETY: a valid C string; the result is read before any other lookup.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(format!("there is no user '{s}' on this system"));
    }
    // SAFETY: getpwnam returned a valid entry.
    Ok(unsafe { (*pw).pw_uid })
}

/// A group id, or a group name looked up in the group database.
fn parse_gid(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(s).map_err(|_| format!("'{s}' is not a group"))?;
    // SAFETY: a valid C string; the result is read before any other lookup.
    let gr = unsafe { libc::getgrnam(name.as_ptr()) };
    if gr.is_null() {
        return Err(format!("there is no group '{s}' on this system"));
    }
    // SAFETY: getgrnam returned a valid entry.
    Ok(unsafe { (*gr).gr_gid })
}

/// `500ms`, `2s`, `1m`, `1h`, a plain number of seconds, `0`, or `forever`.
/// What `forever` means: a century, which any timer can still add to the current time.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("'{s}' is not a duration; use e.g. 500ms, 1s, 5m, 0 or forever");
    let s = s.trim();
    if s == "forever" || s == "inf" {
        return Ok(FOREVER);
    }
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(err()),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(err());
    }
    if secs > FOREVER.as_secs_f64() {
        return Err(format!(
            "'{s}' is longer than any timer can wait; use forever"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `512`, `64K`, `8M`, `2G`, `1T` (powers of 1024; a trailing `B` or `iB` is allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("'{s}' is not a size; use e.g. 8M, 512K or 2G");
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(err)
}

/// `5%` or a size like `2G`.
pub fn parse_min_free(s: &str) -> Result<MinFree, String> {
    match s.trim().strip_suffix('%') {
        Some(p) => p
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|p| (0.0..=90.0).contains(p))
            .map(MinFree::Percent)
            .ok_or_else(|| format!("'{s}' is not a share of the disk; use e.g. 5% (0% to 90%)")),
        None => parse_size(s)
            .map(MinFree::Bytes)
            .map_err(|_| format!("'{s}' is neither a share like 5% nor a size like 2G")),
    }
}

/// Access keys, with a `Debug` that never shows the secret.
#[derive(Clone)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
    /// Where they came from, for messages.
    pub source: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ access_key: {:?}, from: {} }}",
            self.access_key, self.source
        )
    }
}

/// Everything a mount needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The bucket and prefix served, where they are and the credentials.
    pub target: Target,
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    pub default_permissions: bool,
    pub read_only: bool,
    pub nonempty: bool,
    pub cache_dir: PathBuf,
    pub foreground: bool,
    pub log_level: String,
    pub fs: FsOptions,
    pub writeback: WritebackOptions,
    pub cache: CacheLimits,
    pub readahead: ReadaheadOptions,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub drain_timeout: Duration,
    pub read_timeout: Duration,
    /// Let the kernel read fully cached files from the cache directory.
    pub passthrough: bool,
}

impl Config {
    pub fn from_args(a: MountArgs) -> Result<Config, String> {
        let target = Target::resolve(&a.source, &a.store)?;
        if a.part_size < 5 << 20 || a.part_size > 5 << 30 {
            return Err(format!(
                "--part-size {} is outside what S3 allows (5M to 5G)",
                a.part_size
            ));
        }
        if !a.block_size.is_power_of_two() || !(64 << 10..=16 << 20).contains(&a.block_size) {
            return Err(format!(
                "--block-size {} must be a power of two from 64K to 16M (e.g. 1M)",
                a.block_size
            ));
        }
        if a.cache_size < 16 * a.block_size {
            return Err(format!(
                "--cache-size {} is too small; give at least 16 blocks ({} bytes with --block-size {})",
                a.cache_size,
                16 * a.block_size,
                a.block_size
            ));
        }
        let max_dirty = a.max_dirty.unwrap_or((a.cache_size / 2).min(1 << 30));
        if max_dirty > a.cache_size {
            return Err(format!(
                "--max-dirty {max_dirty} is larger than --cache-size {}; files waiting for upload live in the cache directory",
                a.cache_size
            ));
        }
        if a.max_memory < 8 * a.block_size {
            return Err(format!(
                "--max-memory {} is too small; give at least 8 blocks ({} bytes with --block-size {})",
                a.max_memory,
                8 * a.block_size,
                a.block_size
            ));
        }
        // SAFETY: geteuid/getegid cannot fail.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let cache_dir = match a.cache_dir {
            Some(d) => d,
            None => default_cache_dir(
                &target.bucket,
                target.endpoint.as_deref(),
                &target.prefix,
                euid,
            ),
        };
        Ok(Config {
            target,
            mountpoint: a.mountpoint,
            allow_other: a.allow_other,
            // Without it, every local user could read, overwrite and delete every file.
            default_permissions: a.default_permissions || a.allow_other,
            read_only: a.read_only,
            nonempty: a.nonempty,
            cache_dir,
            foreground: a.foreground,
            log_level: a.log_level,
            fs: FsOptions {
                uid: a.uid.unwrap_or(euid),
                gid: a.gid.unwrap_or(egid),
                file_mode: a.file_mode,
                dir_mode: a.dir_mode,
                metadata_ttl: a.metadata_ttl,
                negative_ttl: a.negative_ttl,
                write_through: a.write_mode == WriteMode::Writethrough,
            },
            writeback: WritebackOptions {
                workers: 8,
                part_size: a.part_size,
                parts_in_flight: 4,
                max_dirty,
            },
            cache: CacheLimits {
                max_bytes: a.cache_size,
                min_free: a.cache_min_free,
                block_size: a.block_size,
            },
            readahead: ReadaheadOptions {
                initial_window: a.block_size,
                max_window: a.max_readahead,
                max_memory: a.max_memory,
                ..ReadaheadOptions::default()
            },
            metrics_addr: a.metrics_addr,
            drain_timeout: a.drain_timeout,
            read_timeout: a.read_timeout,
            passthrough: !a.no_passthrough,
        })
    }

    pub fn store_config(&self) -> StoreConfig {
        let mut sc = self.target.store_config();
        sc.read_deadline = self.read_timeout;
        sc
    }
}

/// A bucket (and key prefix) with where it is and the credentials to use it, checked.
#[derive(Debug, Clone)]
pub struct Target {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
    pub credentials: Credentials,
    /// Storage class and encryption of the objects written.
    pub objects: ObjectOptions,
}

impl Target {
    /// Checks `BUCKET[:PREFIX]` and the connection flags, and finds the credentials.
    pub fn resolve(source: &str, a: &StoreArgs) -> Result<Target, String> {
        let (bucket, prefix) = match source.split_once(':') {
            Some((b, p)) => (b.to_string(), p.to_string()),
            None => (source.to_string(), String::new()),
        };
        validate_bucket(&bucket)?;
        if prefix.starts_with('/') {
            return Err(format!(
                "the prefix '{prefix}' starts with '/'; S3 keys are written without a leading slash"
            ));
        }
        if let Some(ep) = &a.endpoint {
            let ok = (ep.starts_with("http://") || ep.starts_with("https://"))
                && ep
                    .split("://")
                    .nth(1)
                    .is_some_and(|h| !h.is_empty() && !h.starts_with('/'));
            if !ok {
                return Err(format!(
                    "the endpoint '{ep}' is not a URL; give it as http://host:port or https://host"
                ));
            }
        }
        let path_style = match a.addressing.as_str() {
            "path" => true,
            "virtual" => false,
            _ => a.endpoint.is_some(),
        };
        let credentials = resolve_credentials(a.credentials.as_deref(), a.profile.as_deref())?;
        Ok(Target {
            bucket,
            prefix,
            endpoint: a.endpoint.clone(),
            region: a.region.clone(),
            path_style,
            credentials,
            objects: object_options(a)?,
        })
    }

    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            bucket: self.bucket.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            path_style: self.path_style,
            access_key: self.credentials.access_key.clone(),
            secret_key: self.credentials.secret_key.clone(),
            session_token: self.credentials.session_token.clone(),
            max_attempts: 5,
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(120),
            attempts: Default::default(),
            read_deadline: Duration::from_secs(60),
        }
    }

    /// `BUCKET` or `BUCKET:PREFIX`, as given.
    pub fn source(&self) -> String {
        if self.prefix.is_empty() {
            self.bucket.clone()
        } else {
            format!("{}:{}", self.bucket, self.prefix)
        }
    }

    /// Where requests go, for messages.
    pub fn endpoint_name(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| format!("AWS S3 ({})", self.region))
    }
}

fn validate_bucket(b: &str) -> Result<(), String> {
    let ok = (3..=63).contains(&b.len())
        && b.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.' || c == '_'
        })
        && b.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{b}' is not a valid bucket name: 3 to 63 lowercase letters, digits, '.', '-' or '_'"
        ))
    }
}

/// 64-bit FNV-1a: a hash that stays the same across builds, for directory names.
fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn default_cache_dir(bucket: &str, endpoint: Option<&str>, prefix: &str, euid: u32) -> PathBuf {
    let id = format!(
        "{bucket}-{:08x}",
        stable_hash(&[endpoint.unwrap_or("aws"), bucket, prefix]) as u32
    );
    if euid == 0 {
        return PathBuf::from("/var/cache/s3mediafs").join(id);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("s3mediafs").join(id)
}

/// Credentials from, in order: `--credentials FILE`, the environment, the shared
/// credentials file.
fn resolve_credentials(file: Option<&Path>, profile: Option<&str>) -> Result<Credentials, String> {
    if let Some(path) = file {
        return read_key_file(path);
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(access_key), Some(secret_key)) =
        (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
    {
        return Ok(Credentials {
            access_key,
            secret_key,
            session_token: env("AWS_SESSION_TOKEN"),
            source: "the environment".into(),
        });
    }
    let shared = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")));
    let profile = profile.unwrap_or("default");
    if let Some(path) = shared.filter(|p| p.exists()) {
        return read_shared_file(&path, profile);
    }
    Err(
        "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, pass \
         --credentials FILE (a KEY:SECRET file, mode 0600), or add a profile to \
         ~/.aws/credentials"
            .into(),
    )
}

/// Storage class and encryption from the flags, the SSE-C key read and checked.
fn object_options(a: &StoreArgs) -> Result<ObjectOptions, String> {
    if let Some(class) = &a.storage_class {
        if class.is_empty()
            || !class
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(format!(
                "the storage class '{class}' is not one; give it as the store names it, e.g. STANDARD or STANDARD_IA"
            ));
        }
    }
    let encryption = match (a.sse.as_deref(), &a.sse_kms_key_id, &a.sse_c_key_file) {
        (Some(_), _, Some(_)) => {
            return Err(
                "--sse and --sse-c-key-file exclude each other: objects are encrypted either with the store's keys or with yours"
                    .into(),
            )
        }
        (Some("aes256"), Some(_), None) | (None, Some(_), None) => {
            return Err("--sse-kms-key-id goes with --sse aws:kms".into())
        }
        (Some("aes256"), None, None) => Encryption::S3,
        (Some(_), key_id, None) => Encryption::Kms {
            key_id: key_id.clone(),
        },
        (None, _, Some(file)) => Encryption::customer(&read_customer_key(file)?),
        (None, None, None) => Encryption::Bucket,
    };
    Ok(ObjectOptions {
        storage_class: a.storage_class.clone(),
        encryption,
    })
}

/// The SSE-C key: 32 bytes, raw or in base64, in a file only its owner can read.
fn read_customer_key(path: &Path) -> Result<[u8; 32], String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the SSE-C key file {}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "the SSE-C key file {} can be read by other users (mode {:04o}); run `chmod 600 {}`",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        ));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the SSE-C key file {}: {e}", path.display()))?;
    let key = if bytes.len() == 32 {
        Some(bytes)
    } else {
        decode_base64(std::str::from_utf8(&bytes).unwrap_or("").trim())
    };
    key.and_then(|k| <[u8; 32]>::try_from(k).ok()).ok_or_else(|| {
        format!(
            "the SSE-C key file {} does not hold a 32-byte key (raw, or in base64); make one with `head -c 32 /dev/urandom > FILE`",
            path.display()
        )
    })
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let text = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    for chunk in text.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

fn check_private(path: &Path) -> Result<std::fs::Metadata, String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the credentials file {}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "the credentials file {} can be read by other users (mode {:04o}); run `chmod 600 {}`",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        ));
    }
    Ok(meta)
}

fn read_key_file(path: &Path) -> Result<Credentials, String> {
    check_private(path)?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the credentials file {}: {e}", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'));
    match line.and_then(|l| l.split_once(':')) {
        Some((k, s)) if !k.is_empty() && !s.is_empty() => Ok(Credentials {
            access_key: k.to_string(),
            secret_key: s.to_string(),
            session_token: None,
            source: path.display().to_string(),
        }),
        _ => Err(format!(
            "the credentials file {} must hold one line ACCESS_KEY:SECRET_KEY",
            path.display()
        )),
    }
}

fn read_shared_file(path: &Path, profile: &str) -> Result<Credentials, String> {
    check_private(path)?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut in_profile = false;
    let (mut key, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            let name = line[1..line.len() - 1].trim();
            in_profile = name == profile || name == format!("profile {profile}");
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = Some(v.trim().to_string());
            match k.trim() {
                "aws_access_key_id" => key = v,
                "aws_secret_access_key" => secret = v,
                "aws_session_token" => token = v,
                _ => {}
            }
        }
    }
    match (key, secret) {
        (Some(access_key), Some(secret_key)) => Ok(Credentials {
            access_key,
            secret_key,
            session_token: token,
            source: format!("{} [{profile}]", path.display()),
        }),
        _ => Err(format!(
            "{} has no aws_access_key_id and aws_secret_access_key in profile [{profile}]",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn parse_mount(v: &[&str]) -> Result<MountArgs, clap::Error> {
        match parse_args(args(v))? {
            Invocation::Mount(m) => Ok(*m),
            other => panic!("not a mount: {other:?}"),
        }
    }

    #[test]
    fn helper_form_maps_options_to_flags() {
        let a = parse_mount(&[
            "s3mediafs", "media:syn/", "/mnt", "-o",
            "rw,_netdev,nofail,x-systemd.automount,allow_other,uid=115,file_mode=0640,ro,endpoint=http://127.0.0.1:3900",
        ])
        .unwrap();
        assert_eq!(a.source, "media:syn/");
        assert!(a.allow_other && a.read_only && a.background && !a.foreground);
        assert_eq!(a.uid, Some(115));
        assert_eq!(a.file_mode, 0o640);
        assert_eq!(a.store.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
    }

    #[test]
    fn mount_helper_name_takes_mounts_flags() {
        let a = parse_mount(&[
            "/sbin/mount.s3mediafs",
            "media",
            "/mnt",
            "-n",
            "-v",
            "-o",
            "rw,uid=5",
            "-t",
            "s3mediafs",
        ])
        .unwrap();
        assert_eq!(a.source, "media");
        assert_eq!(a.uid, Some(5));
        assert!(a.background);
    }

    #[test]
    fn subcommands_parse() {
        match parse_args(args(&[
            "s3mediafs",
            "import",
            "/src",
            "media:p/",
            "--verify",
            "-j",
            "4",
        ]))
        .unwrap()
        {
            Invocation::Import(i) => {
                assert_eq!(i.target, "media:p/");
                assert!(i.verify && !i.dry_run);
                assert_eq!(i.jobs, 4);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_args(args(&["s3mediafs", "status", "/mnt"])).unwrap(),
            Invocation::Status(_)
        ));
    }

    #[test]
    fn mount_subcommand_runs_in_the_foreground() {
        let a = parse_mount(&["s3mediafs", "mount", "b", "/mnt"]).unwrap();
        assert!(a.foreground && !a.background);
        let a = parse_mount(&["s3mediafs", "mount", "b", "/mnt", "--background"]).unwrap();
        assert!(!a.foreground && a.background);
    }

    #[test]
    fn unknown_and_malformed_options_are_errors() {
        let e = parse_mount(&["s3mediafs", "b", "/mnt", "-o", "bogus"]).unwrap_err();
        assert!(
            e.to_string().contains("unknown mount option 'bogus'"),
            "{e}"
        );
        let e = parse_mount(&["s3mediafs", "b", "/mnt", "-o", "uid"]).unwrap_err();
        assert!(e.to_string().contains("needs a value"), "{e}");
        let e = parse_mount(&["s3mediafs", "b", "/mnt", "-o", "metadata_ttl=soon"]).unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
    }

    #[test]
    fn owners_are_numbers_or_names() {
        assert_eq!(parse_uid("115").unwrap(), 115);
        assert_eq!(parse_uid("root").unwrap(), 0);
        assert_eq!(parse_gid("root").unwrap(), 0);
        let e = parse_uid("no-such-user-here").unwrap_err();
        assert!(e.contains("no user 'no-such-user-here'"), "{e}");
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("8M").unwrap(), 8 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("-1s").is_err());
        // Values no timer can add to the current time are refused, not kept to panic later.
        for huge in ["1e30s", "99999999999999999999s", "4000000000h"] {
            assert!(parse_duration(huge).is_err(), "{huge}");
        }
        assert!(parse_duration("forever").unwrap() >= Duration::from_secs(365 * 24 * 3600));
    }

    #[test]
    fn bucket_names_are_checked() {
        assert!(validate_bucket("media-store").is_ok());
        assert!(validate_bucket("Bad_Bucket").is_err());
        assert!(validate_bucket("ab").is_err());
    }

    #[test]
    fn cache_dir_name_is_stable() {
        assert_eq!(stable_hash(&["a", "b"]), stable_hash(&["a", "b"]));
        assert_ne!(stable_hash(&["ab", ""]), stable_hash(&["a", "b"]));
    }
}
