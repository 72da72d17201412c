//! `s3mediafs import SRC_DIR BUCKET[:PREFIX]`: copies an existing media store into the
//! bucket, one object per file under the same relative path, several files at a time.
//!
//! It is resumable and safe to run again, also while Synapse keeps writing: objects already
//! in the bucket with the file's size and content (compared through the ETag, which S3
//! makes the MD5 of the content, or of the parts' MD5s for multipart uploads) are skipped,
//! so a second pass copies only what is new or changed. The source is only ever read.
//! `--verify` reads every object back and compares it with its file.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{ErrorKind, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use md5::{Digest, Md5};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::{ImportArgs, Target};
use crate::store::{
    part_size_for, upload_file, ETag, ObjectStore, OpenUploads, S3Store, UploadLimits,
};

/// Part sizes other tools upload with, tried when an object's ETag says it was assembled
/// from parts: boto3 and synapse-s3-storage-provider (8 MiB), the S3 minimum (5 MiB),
/// and 16 MiB.
const KNOWN_PART_SIZES: [u64; 3] = [8 << 20, 5 << 20, 16 << 20];

/// One regular file of the source tree.
#[derive(Debug, Clone)]
struct SourceFile {
    path: PathBuf,
    key: String,
    size: u64,
    modified: Option<SystemTime>,
}

/// What an object in the bucket looks like.
#[derive(Debug, Clone)]
struct Present {
    size: u64,
    etag: Option<ETag>,
}

#[derive(Default)]
struct Tally {
    copied: AtomicU64,
    copied_bytes: AtomicU64,
    skipped: AtomicU64,
    skipped_bytes: AtomicU64,
    verified: AtomicU64,
    /// Files removed from the source while the import ran (Synapse expires and deletes
    /// media all the time): left out, not failures.
    gone: AtomicU64,
    /// The keys of the files not copied (left out, or failed), which verification passes
    /// over.
    not_copied: parking_lot::Mutex<HashSet<String>>,
    /// Files copied (or already in the bucket), then removed from the source before their
    /// verification: not verified, not failures either.
    gone_unverified: AtomicU64,
    failures: parking_lot::Mutex<Vec<(String, String)>>,
}

impl Tally {
    /// The file at `source`, of object `key`, could not be copied: a failure, unless the
    /// file is gone.
    fn copy_failed(&self, key: &str, source: &Path, why: String) {
        self.not_copied.lock().insert(key.to_string());
        if is_gone(source) {
            self.gone.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.failures
            .lock()
            .push((source.display().to_string(), why));
    }

    /// Whether the file of object `key` was copied, or found in the bucket already.
    fn copied(&self, key: &str) -> bool {
        !self.not_copied.lock().contains(key)
    }

    /// The object `key` could not be verified against the file at `source`: a failure,
    /// unless the file is gone.
    fn verify_failed(&self, key: String, source: &Path, why: String) {
        if is_gone(source) {
            self.gone_unverified.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.failures
            .lock()
            .push((key, format!("verification failed: {why}")));
    }
}

fn is_gone(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == ErrorKind::NotFound)
}

/// Memory the bodies of the uploads in flight take together.
const IMPORT_PART_MEMORY: u64 = 128 << 20;

pub fn run(args: ImportArgs) -> Result<ExitCode, String> {
    let src = &args.source_dir;
    let meta = std::fs::metadata(src)
        .map_err(|e| format!("cannot read the source directory {}: {e}", src.display()))?;
    if !meta.is_dir() {
        return Err(format!("the source {} is not a directory", src.display()));
    }
    if args.part_size < 5 << 20 || args.part_size > 5 << 30 {
        return Err(format!(
            "--part-size {} is outside what S3 allows (5M to 5G)",
            args.part_size
        ));
    }
    let target = Target::resolve(&args.target, &args.store)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    crate::mount::check_bucket(&rt, &target)?;
    let store: Arc<dyn ObjectStore> =
        Arc::new(S3Store::new(&target.store_config()).with_object_options(target.objects.clone()));

    let started = Instant::now();
    let tally = Arc::new(Tally::default());
    let files = scan(src, &target.prefix, &tally)?;
    let total_bytes: u64 = files.iter().map(|f| f.size).sum();
    eprintln!(
        "import: {} files ({}) under {} -> {}{}",
        files.len(),
        human_bytes(total_bytes),
        src.display(),
        args.target,
        if args.dry_run { " (dry run)" } else { "" }
    );
    let present = Arc::new(rt.block_on(list_present(&store, &target.prefix))?);

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (mut int, mut term) = (
                signal(SignalKind::interrupt()).expect("SIGINT handler"),
                signal(SignalKind::terminate()).expect("SIGTERM handler"),
            );
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
            eprintln!(
                "import: stopping after the files in progress; run the same command again to go on"
            );
            stop.store(true, Ordering::SeqCst);
        });
    }

    let show = !args.no_progress && std::io::stderr().is_terminal();
    let bar = progress_bar(show, total_bytes, "copying");
    let dry_run = args.dry_run;
    // Every job's parts in flight share this much memory.
    let limits = UploadLimits::new(args.part_size, 4, IMPORT_PART_MEMORY);
    rt.block_on(for_each_file(&files, args.jobs, &bar, &stop, |f| {
        let (store, present, tally) = (store.clone(), present.clone(), tally.clone());
        let limits = limits.clone();
        async move {
            let result = copy_one(&store, &f, present.get(&f.key), &limits, dry_run, &tally);
            if let Err(why) = result.await {
                tally.copy_failed(&f.key, &f.path, why);
            }
        }
    }));
    bar.finish_and_clear();

    if args.verify && !stop.load(Ordering::SeqCst) {
        let bar = progress_bar(show, total_bytes, "verifying");
        rt.block_on(for_each_file(&files, args.jobs, &bar, &stop, |f| {
            let (store, tally) = (store.clone(), tally.clone());
            async move {
                if !tally.copied(&f.key) {
                    return;
                }
                match verify_one(&store, &f).await {
                    Ok(()) => {
                        tally.verified.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(why) => tally.verify_failed(f.key, &f.path, why),
                }
            }
        }));
        bar.finish_and_clear();
    }

    let failures = std::mem::take(&mut *tally.failures.lock());
    for (what, why) in failures.iter().take(50) {
        eprintln!("import: FAILED {what}: {why}");
    }
    if failures.len() > 50 {
        eprintln!("import: ... and {} more failures", failures.len() - 50);
    }
    let verb = if args.dry_run { "would copy" } else { "copied" };
    println!(
        "{verb} {} files ({}), skipped {} already in the bucket ({}), failed {}{}{} in {:.1}s",
        tally.copied.load(Ordering::Relaxed),
        human_bytes(tally.copied_bytes.load(Ordering::Relaxed)),
        tally.skipped.load(Ordering::Relaxed),
        human_bytes(tally.skipped_bytes.load(Ordering::Relaxed)),
        failures.len(),
        match tally.gone.load(Ordering::Relaxed) {
            0 => String::new(),
            n => format!(", left out {n} removed from the source meanwhile"),
        },
        if args.verify {
            format!(
                ", verified {}{}",
                tally.verified.load(Ordering::Relaxed),
                match tally.gone_unverified.load(Ordering::Relaxed) {
                    0 => String::new(),
                    n => format!(" ({n} more removed from the source before their turn)"),
                }
            )
        } else {
            String::new()
        },
        started.elapsed().as_secs_f64()
    );
    if stop.load(Ordering::SeqCst) {
        eprintln!("import: interrupted; run the same command again to copy the rest");
        return Ok(ExitCode::from(130));
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn progress_bar(show: bool, total: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .expect("a valid template"),
    );
    bar.set_prefix(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Every regular file under `root`, with the key it gets. Symbolic links and special files
/// are left out with a note, as are files and directories removed while they are scanned
/// (counted in `tally`); names that are not UTF-8, or hold a character S3's XML cannot
/// carry, are refused.
fn scan(root: &Path, prefix: &str, tally: &Tally) -> Result<Vec<SourceFile>, String> {
    let mut out = Vec::new();
    let mut dirs = vec![(root.to_path_buf(), String::new())];
    let gone = |e: &std::io::Error| {
        let gone = e.kind() == ErrorKind::NotFound;
        if gone {
            tally.gone.fetch_add(1, Ordering::Relaxed);
        }
        gone
    };
    while let Some((dir, rel)) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Err(e) if dir != root && gone(&e) => continue,
            other => {
                other.map_err(|e| format!("cannot read the directory {}: {e}", dir.display()))?
            }
        };
        let mut entries: Vec<_> = entries
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot read the directory {}: {e}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                return Err(format!(
                    "{} has a name that is not UTF-8 and cannot be an S3 key; rename it and run again",
                    path.display()
                ));
            };
            if !crate::fs::names::xml_safe(&name) {
                return Err(format!(
                    "{} has a control character in its name, which S3's XML cannot carry; rename it and run again",
                    path.display().to_string().escape_debug()
                ));
            }
            let ft = match e.file_type() {
                Err(e) if gone(&e) => continue,
                other => other.map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            };
            let child_rel = format!("{rel}{name}");
            if ft.is_dir() {
                dirs.push((path, format!("{child_rel}/")));
            } else if ft.is_file() {
                let m = match e.metadata() {
                    Err(e) if gone(&e) => continue,
                    other => other.map_err(|e| format!("cannot read {}: {e}", path.display()))?,
                };
                out.push(SourceFile {
                    path,
                    key: format!("{prefix}{child_rel}"),
                    size: m.len(),
                    modified: m.modified().ok(),
                });
            } else {
                eprintln!(
                    "import: leaving out {} (not a regular file or directory)",
                    path.display()
                );
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// The objects already under `prefix`, by key.
async fn list_present(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
) -> Result<HashMap<String, Present>, String> {
    let mut present = HashMap::new();
    let mut token = None;
    loop {
        let page = store
            .list(prefix, true, token, None)
            .await
            .map_err(|e| format!("cannot list what is already in the bucket: {e}"))?;
        for o in page.objects {
            present.insert(
                o.key,
                Present {
                    size: o.size,
                    etag: o.etag,
                },
            );
        }
        match page.next_token {
            Some(t) => token = Some(t),
            None => return Ok(present),
        }
    }
}

/// Runs `work` on every file, `jobs` at a time, advancing `bar` by each file's size; stops
/// starting new files once `stop` is set.
async fn for_each_file<F, Fut>(
    files: &[SourceFile],
    jobs: u16,
    bar: &ProgressBar,
    stop: &AtomicBool,
    work: F,
) where
    F: Fn(SourceFile) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(jobs as usize));
    let mut tasks = JoinSet::new();
    for f in files {
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let (size, job, bar) = (f.size, work(f.clone()), bar.clone());
        tasks.spawn(async move {
            let _permit = permit;
            job.await;
            bar.inc(size);
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Copies one file unless the bucket already holds the same content under its key.
async fn copy_one(
    store: &Arc<dyn ObjectStore>,
    f: &SourceFile,
    present: Option<&Present>,
    limits: &UploadLimits,
    dry_run: bool,
    tally: &Tally,
) -> Result<(), String> {
    let part_size = limits.part_size;
    if let Some(p) = present {
        if p.size == f.size && same_content(&f.path, f.size, p.etag.as_ref(), part_size).await? {
            tally.skipped.fetch_add(1, Ordering::Relaxed);
            tally.skipped_bytes.fetch_add(f.size, Ordering::Relaxed);
            return Ok(());
        }
    }
    if dry_run {
        tally.copied.fetch_add(1, Ordering::Relaxed);
        tally.copied_bytes.fetch_add(f.size, Ordering::Relaxed);
        return Ok(());
    }
    let file = File::open(&f.path).map_err(|e| format!("cannot open: {e}"))?;
    let before = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    let size = before.len();
    let uploaded = upload_file(
        store,
        &f.key,
        Arc::new(file),
        (size, None),
        limits,
        &OpenUploads::default(),
    )
    .await
    .map_err(|e| format!("upload failed: {e}"))?;
    // A file that changed while it was read may have been copied half old, half new: the
    // next run copies it again, as it does any file Synapse writes meanwhile.
    let after = std::fs::metadata(&f.path).map_err(|e| format!("cannot stat: {e}"))?;
    if after.len() != size || after.modified().ok() != before.modified().ok() {
        return Err("the file changed while it was copied; run the import again".into());
    }
    let expected = local_etag(&f.path, size, upload_part_size(size, part_size)).await?;
    if let Some(etag) = uploaded.as_ref().map(ETag::value) {
        if is_md5_etag(etag) && etag != expected {
            return Err(format!(
                "the bucket reports ETag {etag} but the file's checksum is {expected}"
            ));
        }
    }
    tally.copied.fetch_add(1, Ordering::Relaxed);
    tally.copied_bytes.fetch_add(size, Ordering::Relaxed);
    Ok(())
}

/// The part size `upload_file` uses for `size` bytes, or None for a single PUT.
fn upload_part_size(size: u64, base: u64) -> Option<u64> {
    let p = part_size_for(size, base);
    (size > p).then_some(p)
}

/// Whether an ETag has the form S3 gives unencrypted objects: an MD5, or an MD5 and `-N`.
fn is_md5_etag(etag: &str) -> bool {
    let (hex, parts) = match etag.split_once('-') {
        Some((h, n)) => (h, Some(n)),
        None => (etag, None),
    };
    hex.len() == 32
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && parts.is_none_or(|n| n.parse::<u32>().is_ok_and(|n| n > 0))
}

/// Whether the file's content is what an object with this ETag holds. Stores whose ETags
/// are not MD5s (some encrypt, some hash differently) can only be compared by size.
async fn same_content(
    path: &Path,
    size: u64,
    etag: Option<&ETag>,
    our_part_size: u64,
) -> Result<bool, String> {
    let Some(etag) = etag.map(|t| t.value().to_ascii_lowercase()) else {
        return Ok(true);
    };
    if !is_md5_etag(&etag) {
        return Ok(true);
    }
    let Some((_, parts)) = etag.split_once('-') else {
        return Ok(local_etag(path, size, None).await? == etag);
    };
    let parts: u64 = parts.parse().unwrap_or(0);
    let mut candidates = vec![part_size_for(size, our_part_size)];
    candidates.extend(KNOWN_PART_SIZES);
    candidates.dedup();
    for p in candidates {
        if size.div_ceil(p) == parts && local_etag(path, size, Some(p)).await? == etag {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The ETag S3 gives this file's content: its MD5, or with `part_size`, the MD5 of the
/// parts' MD5s and `-N`.
async fn local_etag(path: &Path, size: u64, part_size: Option<u64>) -> Result<String, String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut file = File::open(&path)?;
        let part = part_size.unwrap_or(u64::MAX);
        let mut whole = Md5::new();
        let mut part_hash = Md5::new();
        let (mut in_part, mut parts) = (0u64, 0u64);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(left as usize).min((part - in_part) as usize);
            let n = file.read(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file became shorter while it was read",
                ));
            }
            part_hash.update(&buf[..n]);
            in_part += n as u64;
            left -= n as u64;
            if in_part == part || left == 0 {
                if part_size.is_some() {
                    whole.update(part_hash.finalize_reset());
                    parts += 1;
                } else {
                    whole = part_hash.clone();
                }
                in_part = 0;
            }
        }
        let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        Ok(match part_size {
            Some(_) => format!("{}-{parts}", hex(&whole.finalize())),
            None if size == 0 => hex(&Md5::new().finalize()),
            None => hex(&whole.finalize()),
        })
    })
    .await
    .map_err(|e| format!("hashing failed: {e}"))?
    .map_err(|e| format!("cannot read: {e}"))
}

/// Reads the object back and compares its bytes' MD5 with the file's.
async fn verify_one(store: &Arc<dyn ObjectStore>, f: &SourceFile) -> Result<(), String> {
    const CHUNK: u64 = 8 << 20;
    let meta = store
        .head(&f.key)
        .await
        .map_err(|e| format!("the object cannot be read: {e}"))?;
    let local = std::fs::metadata(&f.path).map_err(|e| format!("cannot stat: {e}"))?;
    if local.modified().ok() != f.modified && local.len() != meta.size {
        return Err("the file changed since it was copied; run the import again".into());
    }
    if meta.size != local.len() {
        return Err(format!(
            "the object has {} bytes, the file {}",
            meta.size,
            local.len()
        ));
    }
    let mut remote = Md5::new();
    let mut at = 0;
    while at < meta.size {
        let end = (at + CHUNK).min(meta.size);
        let bytes = store
            .get_range(&f.key, at..end, meta.etag.as_ref())
            .await
            .map_err(|e| format!("reading the object failed: {e}"))?;
        if bytes.len() as u64 != end - at {
            return Err(format!(
                "the store returned {} bytes for a range of {}",
                bytes.len(),
                end - at
            ));
        }
        remote.update(&bytes);
        at = end;
    }
    let remote: String = remote
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let local = local_etag(&f.path, meta.size, None).await?;
    if remote != local {
        return Err(format!(
            "the object's content differs from the file (MD5 {remote}, file {local})"
        ));
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Names that cannot be keys are refused with the path, before anything is uploaded.
    #[test]
    fn names_that_cannot_be_keys_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        for (name, says) in [
            (&b"a\x01b"[..], "control character"),
            (&b"tab\there"[..], "control character"),
            (&b"bad\xffname"[..], "not UTF-8"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(std::ffi::OsStr::from_bytes(name)), b"x").unwrap();
            let e = scan(dir.path(), "media/", &Tally::default()).expect_err("scanned");
            assert!(e.contains(says), "{e}");
        }
    }

    fn md5_hex(b: &[u8]) -> String {
        Md5::digest(b).iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn etag_forms() {
        assert!(is_md5_etag("d41d8cd98f00b204e9800998ecf8427e"));
        assert!(is_md5_etag("d41d8cd98f00b204e9800998ecf8427e-3"));
        assert!(!is_md5_etag("d41d8cd98f00b204e9800998ecf8427e-0"));
        assert!(!is_md5_etag("not-an-md5"));
        assert!(!is_md5_etag(""));
    }

    #[test]
    fn local_etags_match_what_s3_computes() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..(11u32 << 20) / 4)
            .flat_map(|i| i.to_le_bytes())
            .collect();
        f.write_all(&data).unwrap();
        let size = data.len() as u64;
        let whole = rt.block_on(local_etag(f.path(), size, None)).unwrap();
        assert_eq!(whole, md5_hex(&data));
        // Two parts of 8 MiB and 3 MiB: MD5 of the two MD5s, then -2.
        let mut h = Md5::new();
        h.update(Md5::digest(&data[..8 << 20]));
        h.update(Md5::digest(&data[8 << 20..]));
        let expected: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let parts = rt
            .block_on(local_etag(f.path(), size, Some(8 << 20)))
            .unwrap();
        assert_eq!(parts, format!("{expected}-2"));
        // An object uploaded in 8 MiB parts by another tool is recognised as the same.
        assert!(rt
            .block_on(same_content(
                f.path(),
                size,
                Some(&ETag::new(parts.clone())),
                32 << 20
            ))
            .unwrap());
        assert!(!rt
            .block_on(same_content(
                f.path(),
                size,
                Some(&ETag::new("00000000000000000000000000000000-2")),
                8 << 20
            ))
            .unwrap());
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(
            rt.block_on(local_etag(empty.path(), 0, None)).unwrap(),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
    }
}
