//! `s3mediafs status MOUNTPOINT`: reads a running mount's metrics through the mount itself
//! (an extended attribute of its root, see `fuse::STATUS_XATTR`) and prints the essentials
//! for a person: what is mounted, uploads pending, cache use, requests and their outcomes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use crate::config::StatusArgs;
use crate::fuse::STATUS_XATTR;

pub fn run(args: StatusArgs) -> Result<ExitCode, String> {
    let text = read_status(&args.mountpoint)?;
    if args.raw {
        print!("{text}");
    } else {
        print!("{}", summarize(&Samples::parse(&text)));
    }
    Ok(ExitCode::SUCCESS)
}

/// The metrics text of the mount at `mountpoint`.
pub fn read_status(mountpoint: &Path) -> Result<String, String> {
    let shown = mountpoint.display();
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{shown}: the path holds a NUL byte"))?;
    let name = std::ffi::CString::new(STATUS_XATTR).expect("no NUL");
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: valid C strings and a buffer of the given length.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return String::from_utf8(buf)
                .map_err(|_| format!("{shown}: the mount's status is not text"));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) if buf.len() < 16 << 20 => buf.resize(buf.len() * 4, 0),
            Some(libc::ENOTSUP) | Some(libc::ENODATA) => {
                return Err(format!(
                    "{shown} is not an s3mediafs mount (its root has no status); `findmnt {shown}` shows what is mounted there"
                ))
            }
            Some(libc::ENOTCONN) => {
                return Err(format!(
                    "{shown} is a dead FUSE mount (its process is gone); clear it with `fusermount3 -u {shown}` and mount again"
                ))
            }
            _ => return Err(format!("cannot read the status of {shown}: {e}")),
        }
    }
}

/// One sample of the metrics text: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Samples(Vec<Sample>);

impl Samples {
    /// Parses the Prometheus/OpenMetrics text format (comments skipped).
    pub fn parse(text: &str) -> Samples {
        Samples(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .filter_map(parse_line)
                .collect(),
        )
    }

    /// The sum of `name` over the samples whose labels include `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.matching(name, want).fold(0.0, |a, s| a + s.value)
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        want: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The values of label `key` seen on `name`, in order.
    fn label_values(&self, name: &str, key: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .matching(name, &[])
            .filter_map(|s| s.labels.get(key).cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name_labels, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, labels) = match name_labels.split_once('{') {
        Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}')?)?),
        None => (name_labels, BTreeMap::new()),
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key, value);
    }
}

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h {}m", s / 3600, s / 60 % 60),
        _ => format!("{}d {}h", s / 86400, s / 3600 % 24),
    }
}

/// The human summary of a mount's metrics.
pub fn summarize(m: &Samples) -> String {
    let mut out = String::new();
    let info = m.matching("s3mediafs_mount", &[]).next();
    let label = |k: &str| {
        info.and_then(|s| s.labels.get(k).cloned())
            .unwrap_or_else(|| "?".into())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let started = m.sum("s3mediafs_start_time_seconds", &[]);
    let _ = writeln!(
        out,
        "{} on {} ({}), up {}",
        label("source"),
        label("mountpoint"),
        label("endpoint"),
        duration(now - started)
    );
    let _ = writeln!(
        out,
        "  s3mediafs {}, {} mode, cache directory {}",
        label("version"),
        label("write_mode"),
        label("cache_dir")
    );
    let objects = label("objects");
    if !objects.is_empty() {
        let _ = writeln!(out, "  objects written with {objects}");
    }

    let pending = m.sum("s3mediafs_pending_changes", &[]);
    let dirty = m.sum("s3mediafs_dirty_bytes", &[]);
    let _ = writeln!(
        out,
        "Uploads:  {}",
        if pending == 0.0 {
            "none pending; every change is in the bucket".to_string()
        } else {
            format!(
                "{pending:.0} changes pending, {} of file data waiting",
                bytes(dirty)
            )
        }
    );
    let unrecorded = m.sum("s3mediafs_unrecorded_changes", &[]);
    if unrecorded > 0.0 {
        let _ = writeln!(
            out,
            "          {unrecorded:.0} changes in the bucket the journal could not record as done \
             (is the cache disk failing or full?); their copies are kept, and a restart now \
             uploads them again"
        );
    }
    let hits = m.sum("s3mediafs_cache_hits_total", &[]);
    let misses = m.sum("s3mediafs_cache_misses_total", &[]);
    let ratio = if hits + misses > 0.0 {
        format!("{:.0}%", 100.0 * hits / (hits + misses))
    } else {
        "-".into()
    };
    let _ = writeln!(
        out,
        "Cache:    {} of {} used ({} cached blocks, {} files being written or waiting)",
        bytes(
            m.sum("s3mediafs_cache_block_bytes", &[]) + m.sum("s3mediafs_cache_staged_bytes", &[])
        ),
        bytes(m.sum("s3mediafs_cache_limit_bytes", &[])),
        bytes(m.sum("s3mediafs_cache_block_bytes", &[])),
        bytes(m.sum("s3mediafs_cache_staged_bytes", &[])),
    );
    let _ = writeln!(
        out,
        "          block hits {hits:.0}, misses {misses:.0} (hit ratio {ratio}), evicted {:.0}, damaged and refetched {:.0}",
        m.sum("s3mediafs_cache_evictions_total", &[]),
        m.sum("s3mediafs_cache_corrupt_total", &[]),
    );
    let _ = writeln!(
        out,
        "Memory:   {} of read buffers; {:.0} inodes, {:.0} listed names remembered",
        bytes(m.sum("s3mediafs_read_memory_bytes", &[])),
        m.sum("s3mediafs_inodes", &[]),
        m.sum("s3mediafs_listed_names", &[]),
    );
    let _ = writeln!(
        out,
        "Traffic:  {} down, {} up; {:.0} retries",
        bytes(m.sum("s3mediafs_downloaded_bytes_total", &[])),
        bytes(m.sum("s3mediafs_uploaded_bytes_total", &[])),
        m.sum("s3mediafs_retries_total", &[]),
    );
    let ops = m.label_values("s3mediafs_requests_total", "op");
    if !ops.is_empty() {
        let _ = writeln!(out, "Requests: {:<10} {:>10} {:>10}", "", "ok", "failed");
        for op in ops {
            let all = m.sum("s3mediafs_requests_total", &[("op", &op)]);
            let ok = m.sum(
                "s3mediafs_requests_total",
                &[("op", &op), ("outcome", "ok")],
            ) + m.sum(
                "s3mediafs_requests_total",
                &[("op", &op), ("outcome", "not_found")],
            );
            let _ = writeln!(out, "          {op:<10} {ok:>10.0} {:>10.0}", all - ok);
        }
    }
    let fuse_ops = m.label_values("s3mediafs_fuse_op_seconds_count", "op");
    if !fuse_ops.is_empty() {
        let _ = writeln!(
            out,
            "Requests from the kernel: {:<8} {:>10} {:>12}",
            "", "count", "mean"
        );
        for op in fuse_ops {
            let n = m.sum("s3mediafs_fuse_op_seconds_count", &[("op", &op)]);
            let total = m.sum("s3mediafs_fuse_op_seconds_sum", &[("op", &op)]);
            let mean_ms = if n > 0.0 { 1000.0 * total / n } else { 0.0 };
            let _ = writeln!(
                out,
                "                          {op:<8} {n:>10.0} {mean_ms:>9.2} ms"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_labels() {
        let m = Samples::parse(
            "# HELP x y\ns3mediafs_requests_total{op=\"get\",outcome=\"ok\"} 3\n\
             s3mediafs_requests_total{op=\"get\",outcome=\"error\"} 1\n\
             s3mediafs_mount{source=\"media:a \\\"b\\\"\",endpoint=\"http://x\"} 1\n\
             s3mediafs_dirty_bytes 2048\ns3mediafs_pending_changes 2\n\
             s3mediafs_unrecorded_changes 3\n# EOF\n",
        );
        assert_eq!(m.sum("s3mediafs_requests_total", &[("op", "get")]), 4.0);
        assert_eq!(
            m.sum(
                "s3mediafs_requests_total",
                &[("op", "get"), ("outcome", "ok")]
            ),
            3.0
        );
        let info = m.matching("s3mediafs_mount", &[]).next().unwrap();
        assert_eq!(info.labels["source"], "media:a \"b\"");
        let text = summarize(&m);
        assert!(text.contains("media:a \"b\""), "{text}");
        assert!(
            text.contains("2 changes pending, 2.0 KiB of file data waiting"),
            "{text}"
        );
        assert!(
            text.contains("3 changes in the bucket the journal could not record as done"),
            "{text}"
        );
        assert!(!text.contains("-0"), "{text}");
        assert!(text.contains("get"), "{text}");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(duration(59.0), "59s");
        assert_eq!(duration(7300.0), "2h 1m");
    }
}
