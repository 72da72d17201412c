//! Flag definitions: the subcommands and their flags as clap declares them (what `--help`
//! and the man pages show), and the parsers of their values (sizes, durations, owners).
//! Parsing the command line is options.rs; checking the values together is the `Config`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cache::MinFree;
use crate::fs::WriteMode;

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

    /// Memory for read data in flight and read buffers, shared by all open files; the
    /// bodies of uploads being sent get as much again.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub max_memory: u64,

    /// How long one read from the store may take, retries included, before the reading
    /// program gets EIO.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub read_timeout: Duration,

    /// How long unmounting waits for pending uploads (a second SIGTERM or Ctrl-C ends the
    /// wait); what is left stays journaled and is uploaded by the next mount with the same
    /// cache directory, which waits for this one to finish.
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

/// An octal permission mode like `0644`.
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

/// What `forever` means: a century, which any timer can still add to the current time.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `500ms`, `2s`, `1m`, `1h`, a plain number of seconds, `0`, or `forever`.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
