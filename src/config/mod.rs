//! The configuration of a mount: the command line (flags.rs declares the flags, options.rs
//! parses the command line and translates `-o` options into flags, credentials.rs reads keys)
//! checked and resolved into one `Config`.
//!
//! Every flag has an `-o` spelling: `--cache-dir D` is `-o cache_dir=D`, `--allow-other` is
//! `-o allow_other`.

mod credentials;
mod flags;
mod options;

use std::path::PathBuf;
use std::time::Duration;

use crate::cache::CacheLimits;
use crate::fs::FsOptions;
use crate::readahead::ReadaheadOptions;
use crate::store::{Encryption, ObjectOptions, StoreConfig};
use crate::writeback::WritebackOptions;

pub use crate::fs::WriteMode;
pub use credentials::Credentials;
use credentials::{read_customer_key, resolve_credentials};
pub use flags::{
    parse_duration, parse_min_free, parse_size, Cli, Command, ImportArgs, MountArgs, StatusArgs,
    StoreArgs,
};
pub use options::{parse_args, Invocation};

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
        at_least_blocks("--cache-size", a.cache_size, 16, a.block_size)?;
        let max_dirty = a.max_dirty.unwrap_or((a.cache_size / 2).min(1 << 30));
        if max_dirty > a.cache_size {
            return Err(format!(
                "--max-dirty {max_dirty} is larger than --cache-size {}; files waiting for upload live in the cache directory",
                a.cache_size
            ));
        }
        at_least_blocks("--max-memory", a.max_memory, 8, a.block_size)?;
        if a.part_size > a.max_memory {
            return Err(format!(
                "--part-size {} is larger than --max-memory {}: the parts being uploaded are \
                 held in memory; raise --max-memory or lower --part-size",
                a.part_size, a.max_memory
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
                write_mode: a.write_mode,
            },
            writeback: WritebackOptions {
                workers: 8,
                part_size: a.part_size,
                parts_in_flight: 4,
                part_memory: a.max_memory,
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

/// Refuses `flag`'s `value` when it holds fewer than `blocks` blocks of `block_size`.
fn at_least_blocks(flag: &str, value: u64, blocks: u64, block_size: u64) -> Result<(), String> {
    if value < blocks * block_size {
        return Err(format!(
            "{flag} {value} is too small; give at least {blocks} blocks ({} bytes with --block-size {block_size})",
            blocks * block_size
        ));
    }
    Ok(())
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
            // Keys in the URL would reach logs, metrics and `ps`; the URL is not repeated.
            let authority = ep.split_once("://").map_or(ep.as_str(), |(_, rest)| rest);
            if authority
                .split(['/', '?', '#'])
                .next()
                .is_some_and(|a| a.contains('@'))
            {
                return Err(
                    "the endpoint holds credentials (user:secret@host); give the endpoint \
                     as https://host and the keys with --credentials or the environment"
                        .to_string(),
                );
            }
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

#[cfg(test)]
mod tests {
    use super::*;

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
