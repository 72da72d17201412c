//! Metadata at scale through a real mount: what `ls -l` and `stat` cost in requests, answers
//! from fresh listings, a directory of 100 000 entries, memory after a walk of a
//! Synapse-shaped tree, what one mount sees of another's changes, and lookups of one
//! directory asking the bucket side by side.

mod common;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1 << 20;

/// Runs a command, checks it succeeded, returns its standard output.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn ls_l_of_2000_files_costs_a_few_lists_and_no_head() {
    let m = TestMount::with_args("lsl", &["--metadata-ttl", "30s"]);
    let bucket = Bucket::new(&m.env);
    let keys: Vec<String> = (0..2000)
        .map(|i| m.key(&format!("d/f{i:04}.png")))
        .collect();
    bucket.put_many(&keys, b"0123456789");
    let dir = m.path("d");
    assert!(dir.is_dir());

    let (lists, heads) = (m.requests("list"), m.requests("head"));
    let fuse_ops = |op: &str| m.metric(&format!("s3mediafs_fuse_requests_total{{op=\"{op}\""));
    let (lookups, plus) = (fuse_ops("lookup"), fuse_ops("readdirplus"));
    let text = run(Command::new("ls").arg("-l").arg(&dir));
    // Entries came with their attributes (readdirplus): no lookup per entry either.
    assert!(
        fuse_ops("readdirplus") > plus,
        "ls -l was not answered with readdirplus"
    );
    let per_entry = fuse_ops("lookup") - lookups;
    assert!(
        per_entry < 20,
        "ls -l of 2000 files made {per_entry} lookups"
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("total")).collect();
    assert_eq!(lines.len(), 2000, "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("-rw") && l.contains(" 10 ")),
        "{text}"
    );
    let list_cost = m.requests("list") - lists;
    assert!(
        list_cost <= 3,
        "ls -l of 2000 files sent {list_cost} LIST requests"
    );
    assert_eq!(m.requests("head") - heads, 0, "ls -l sent HEAD requests");

    // Within the TTL, stat and lookups of missing names are answered without a request.
    let before = (m.requests("list"), m.requests("head"), m.requests("get"));
    for i in (0..2000).step_by(97) {
        assert_eq!(
            fs::metadata(dir.join(format!("f{i:04}.png")))
                .unwrap()
                .len(),
            10
        );
    }
    for i in 0..50 {
        assert_eq!(
            errno(fs::metadata(dir.join(format!("missing{i}.png")))),
            libc::ENOENT
        );
    }
    assert_eq!(
        (m.requests("list"), m.requests("head"), m.requests("get")),
        before
    );
}

#[test]
fn with_a_zero_ttl_every_stat_asks_the_bucket() {
    let m = TestMount::with_args("ttl0", &["--metadata-ttl", "0", "--negative-ttl", "0"]);
    fs::write(m.path("f"), b"abc").unwrap();
    m.sync();
    let heads = m.requests("head");
    for _ in 0..3 {
        assert_eq!(fs::metadata(m.path("f")).unwrap().len(), 3);
    }
    assert!(
        m.requests("head") - heads >= 3,
        "stat with a zero TTL answered from memory"
    );
    // A name created behind the mount's back is seen at once.
    Bucket::new(&m.env).put(&m.key("g"), b"12345");
    assert_eq!(fs::metadata(m.path("g")).unwrap().len(), 5);
}

#[test]
fn lookups_of_missing_names_in_one_directory_ask_the_bucket_side_by_side() {
    // Each LIST is held for a while: names looked up one at a time would reach the proxy
    // that long apart, side by side all within it.
    const HOLD: Duration = Duration::from_millis(400);
    const NAMES: usize = 8;
    let env = S3Env::get();
    let arrivals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    let proxy = common::faults::FaultProxy::start(
        env.endpoint.trim_start_matches("http://"),
        std::sync::Arc::new(move |r: &common::faults::RequestInfo| {
            if r.method == "GET" && r.target.contains("list-type") && r.target.contains("missing") {
                seen.lock().unwrap().push(Instant::now());
                return Some(common::faults::Fault::Delay(HOLD));
            }
            None
        }),
    );
    // More names than one LIST returns: the directory is never known whole, so each missing
    // name is asked about.
    let prefix = unique_prefix("parallel-lookups");
    let keys: Vec<String> = (0..1100)
        .map(|i| format!("{prefix}media/a-{i:04}"))
        .collect();
    Bucket::new(&env).put_many(&keys, b"x");
    let m = TestMount::with_prefix_via(prefix, &proxy.endpoint(), &[]);
    assert!(m.path("media").is_dir());
    std::thread::scope(|s| {
        for i in 0..NAMES {
            let path = m.path(&format!("media/missing-{i}"));
            s.spawn(move || assert!(fs::metadata(path).is_err()));
        }
    });
    let arrivals = arrivals.lock().unwrap();
    assert_eq!(arrivals.len(), NAMES, "each missing name costs one LIST");
    let spread = *arrivals.iter().max().unwrap() - *arrivals.iter().min().unwrap();
    assert!(
        spread < HOLD,
        "the LISTs went out one after another ({spread:?} from the first to the last): the \
         kernel sends lookups in one directory one at a time unless the mount asks for \
         parallel directory operations"
    );
}

/// Keys of a media store shaped like Synapse's: content under two levels of hash prefix,
/// and thumbnails in a directory per media id (one in four media has thumbnails).
fn synapse_tree(n: usize) -> Vec<String> {
    let mut keys = Vec::with_capacity(n);
    let mut i: u64 = 0;
    while keys.len() < n {
        let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let (a, b, rest) = (h >> 60, (h >> 56) & 0xf, h & 0xffff_ffff);
        keys.push(format!("local_content/a{a:x}/b{b:x}/{rest:08x}"));
        if i % 4 == 0 {
            for t in [
                "32-32-image-png-crop",
                "96-96-image-png-crop",
                "320-240-image-jpeg-scale",
            ] {
                if keys.len() < n {
                    keys.push(format!("local_thumbnails/a{a:x}/b{b:x}/{rest:08x}/{t}"));
                }
            }
        }
        i += 1;
    }
    keys
}

/// A mount over `n` objects of 6 bytes (`media!`) laid out by `synapse_tree`, their
/// bucket, and their paths in the mount.
fn mount_on_synapse_tree(name: &str, n: usize) -> (TestMount, Bucket, Vec<String>) {
    let m = TestMount::new(name);
    let bucket = Bucket::new(&m.env);
    let rel = synapse_tree(n);
    let keys: Vec<String> = rel.iter().map(|k| m.key(k)).collect();
    bucket.put_many(&keys, b"media!");
    (m, bucket, rel)
}

/// Every directory the keys imply, the root included.
fn dirs_of(keys: &[String]) -> usize {
    let mut dirs = HashSet::from([String::new()]);
    for k in keys {
        let mut end = 0;
        while let Some(i) = k[end..].find('/') {
            end += i + 1;
            dirs.insert(k[..end].to_string());
        }
    }
    dirs.len()
}

/// What a walk of a Synapse-shaped tree costs in requests on a fresh mount: `find` lists
/// whole subtrees with flat LISTs; `find` again, `stat` of every file and a cold open of a
/// file whose directory is known ask (almost) nothing more; `rm -rf` deletes in batches.
#[test]
fn walking_a_2000_file_tree_costs_a_few_lists_and_rm_rf_a_few_batches() {
    let (m, bucket, rel) = mount_on_synapse_tree("walk2k", 2000);
    let count = |m: &TestMount| {
        ["list", "head", "get", "put", "delete", "delete_many"].map(|op| m.requests(op))
    };
    let spent = |before: [u64; 6], m: &TestMount| {
        let now = count(m);
        let mut d = [0u64; 6];
        for i in 0..6 {
            d[i] = now[i] - before[i];
        }
        d
    };

    let before = count(&m);
    let found = run(Command::new("find").arg(&m.mnt).arg("-type").arg("f"));
    assert_eq!(found.lines().count(), 2000);
    let [list, head, ..] = spent(before, &m);
    eprintln!(
        "find over {} directories: {list} LIST, {head} HEAD",
        dirs_of(&rel)
    );
    assert!(list <= 5, "find of 2000 files sent {list} LIST requests");
    assert_eq!(head, 0, "find sent HEAD requests");

    // Everything below is known now: another find, and a stat of every file, ask nothing.
    let before = count(&m);
    let again = run(Command::new("find").arg(&m.mnt).arg("-type").arg("f"));
    assert_eq!(again.lines().count(), 2000);
    for k in &rel {
        assert_eq!(fs::metadata(m.path(k)).unwrap().len(), 6, "{k}");
    }
    assert_eq!(
        spent(before, &m),
        [0; 6],
        "find again and stat asked the bucket"
    );

    // A cold open and read of a file whose directory is known: one GET, nothing else.
    let before = count(&m);
    assert_eq!(fs::read(m.path(&rel[7])).unwrap(), b"media!");
    assert_eq!(
        spent(before, &m),
        [0, 0, 1, 0, 0, 0],
        "requests for one cold read"
    );

    let before = count(&m);
    let started = Instant::now();
    run(Command::new("rm")
        .arg("-rf")
        .arg(m.path("local_content"))
        .arg(m.path("local_thumbnails")));
    let rm_took = started.elapsed();
    m.sync();
    let [list, head, get, put, delete, delete_many] = spent(before, &m);
    eprintln!(
        "rm -rf of 2000 files took {rm_took:?}: {delete_many} DeleteObjects, {delete} DELETE, {put} PUT, {list} LIST, {head} HEAD, {get} GET"
    );
    assert!(
        delete_many <= 5,
        "rm -rf of 2000 files sent {delete_many} DeleteObjects requests"
    );
    assert_eq!(
        (delete, put, head, get),
        (0, 0, 0, 0),
        "rm -rf sent single requests"
    );
    // Listings that expired while rm ran are fetched again, a subtree at a time.
    assert!(list <= 40, "rm -rf sent {list} LIST requests");
    assert_eq!(
        bucket.keys(&m.prefix),
        Vec::<String>::new(),
        "keys left after rm -rf"
    );
    assert_eq!(names_in(&m.mnt), Vec::<String>::new());
}

/// Tests over 100 000 and 20 000 objects. They need a server whose LIST does not cost time in
/// proportion to the whole bucket, so scripts/test.sh runs them against Garage only.
mod scale {
    use super::*;

    #[test]
    fn a_directory_of_100000_entries_lists_completely_with_bounded_memory() {
        let m = TestMount::new("big");
        let bucket = Bucket::new(&m.env);
        let names: Vec<String> = (0..100_000u32)
            .map(|i| format!("{:02x}-{i:06}", i.wrapping_mul(2_654_435_761) >> 24))
            .collect();
        let keys: Vec<String> = names.iter().map(|n| m.key(&format!("big/{n}"))).collect();
        bucket.put_many(&keys, b"x");
        let (rss_before, _) = m.memory();

        // Another client adds names while the listing runs: no name twice, none of the old ones
        // missing, nothing else.
        let added: Vec<String> = (0..300).map(|i| format!("zz-new-{i:03}")).collect();
        let added_keys: Vec<String> = added.iter().map(|n| m.key(&format!("big/{n}"))).collect();
        let adder = {
            let env = m.env.clone();
            std::thread::spawn(move || Bucket::new(&env).put_many(&added_keys, b"y"))
        };
        let listed = names_in(&m.path("big"));
        adder.join().unwrap();
        let set: HashSet<&String> = listed.iter().collect();
        assert_eq!(set.len(), listed.len(), "a name was listed twice");
        let missing = names.iter().filter(|n| !set.contains(n)).count();
        assert_eq!(missing, 0, "{missing} names were not listed");
        let known: HashSet<&String> = names.iter().chain(added.iter()).collect();
        let strays: Vec<&String> = listed
            .iter()
            .filter(|n| !known.contains(n))
            .take(5)
            .collect();
        assert!(strays.is_empty(), "listed names nobody created: {strays:?}");

        // Listed again once the additions are in: exactly everything.
        let mut again = names_in(&m.path("big"));
        again.sort();
        let mut want: Vec<String> = names.iter().chain(added.iter()).cloned().collect();
        want.sort();
        assert!(
            again == want,
            "the second listing differs ({} names, {} expected)",
            again.len(),
            want.len()
        );

        let (rss, hwm) = m.memory();
        eprintln!(
            "100 000-entry directory: RSS {} MiB before, {} MiB after, peak {} MiB; {} names remembered",
            rss_before >> 20,
            rss >> 20,
            hwm >> 20,
            m.metric("s3mediafs_listed_names")
        );
        assert!(
            hwm < 160 << 20,
            "peak RSS {} MiB listing a 100 000-entry directory",
            hwm >> 20
        );
        let prefix = m.prefix.clone();
        drop(m);
        bucket.delete_prefix(&prefix);
    }

    #[test]
    fn walking_20000_files_then_dropping_caches_frees_their_inodes() {
        let (m, bucket, rel) = mount_on_synapse_tree("walk", 20_000);
        let (rss_start, _) = m.memory();
        let lists = m.requests("list");
        let heads = m.requests("head");

        let found = run(Command::new("find").arg(&m.mnt).arg("-type").arg("f"));
        assert_eq!(found.lines().count(), 20_000);
        let dirs = dirs_of(&rel) as u64;
        let list_cost = m.requests("list") - lists;
        // About one flat LIST per 1000 keys, not one per directory.
        eprintln!(
            "find over {dirs} directories: {list_cost} LIST, {} HEAD",
            m.requests("head") - heads
        );
        assert!(
            list_cost <= 30,
            "find over 20 000 files in {dirs} directories sent {list_cost} LIST requests"
        );
        assert_eq!(m.requests("head"), heads, "find sent HEAD requests");

        // `du` stats every file, so the kernel holds an inode for each.
        let du = run(Command::new("du").arg("-s").arg("-b").arg(&m.mnt));
        let total: u64 = du.split_whitespace().next().unwrap().parse().unwrap();
        assert!(total >= 20_000 * 6, "du -sb said {total}");
        let held = m.metric("s3mediafs_inodes");
        let (rss_walked, _) = m.memory();
        assert!(
            held >= 20_000,
            "only {held} inodes held after stat of 20 000 files"
        );
        let per_inode = rss_walked.saturating_sub(rss_start) / held;
        eprintln!(
            "{held} inodes held: RSS {} MiB -> {} MiB, about {per_inode} bytes each",
            rss_start >> 20,
            rss_walked >> 20
        );
        assert!(per_inode < 4096, "{per_inode} bytes of RSS per inode");

        // Once the kernel forgets them, so does the mount.
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        let mut dropped = Instant::now();
        wait_for(Duration::from_secs(30), || {
            let left = m.metric("s3mediafs_inodes");
            if left < 100 {
                return Ok(());
            }
            // Asked again now and then (not at every check: it costs the whole host).
            if dropped.elapsed() >= Duration::from_millis(200) {
                fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
                dropped = Instant::now();
            }
            Err(format!(
                "{left} inodes still held 30 s after the kernel dropped its caches"
            ))
        });
        // A second walk does not grow the mount's memory much past the first.
        run(Command::new("du").arg("-s").arg("-b").arg(&m.mnt));
        let (rss_again, _) = m.memory();
        assert!(
            rss_again < rss_walked + (32 << 20),
            "RSS grew from {} to {} MiB on a second walk",
            rss_walked >> 20,
            rss_again >> 20
        );
        let prefix = m.prefix.clone();
        drop(m);
        bucket.delete_prefix(&prefix);
    }
}

/// The cross-host delay README states for the default TTLs: a file added, replaced or
/// deleted on one host is seen so on another at most `--metadata-ttl` (10 s) after its
/// upload, and never read half old, half new.
const METADATA_TTL: Duration = Duration::from_secs(10);
const MARGIN: Duration = Duration::from_millis(700);

#[test]
fn a_second_mount_sees_writes_replacements_and_deletes_within_the_stated_delays() {
    let a = TestMount::new("two");
    let b = TestMount::with_prefix(a.prefix.clone(), &[]);
    let uploaded_then = |delay: Duration| {
        a.sync();
        std::thread::sleep(delay + MARGIN);
    };
    fs::create_dir(a.path("media")).unwrap();
    fs::write(a.path("media/old"), b"x").unwrap();
    a.sync();
    assert!(b.path("media").is_dir());
    // B lists the directory and looks for the file before it exists: both are remembered.
    assert_eq!(names_in(&b.path("media")), vec!["old".to_string()]);
    assert_eq!(errno(fs::metadata(b.path("media/f"))), libc::ENOENT);

    let v1 = pseudo_random(3 * MIB + 11, 1);
    fs::write(a.path("media/f"), &v1).unwrap();
    // B holds a complete listing of media: it trusts it for the metadata TTL.
    a.sync();
    assert_eq!(errno(fs::metadata(b.path("media/f"))), libc::ENOENT);
    uploaded_then(METADATA_TTL);
    assert!(
        fs::read(b.path("media/f")).unwrap() == v1,
        "B read other bytes than A wrote"
    );
    assert!(
        names_in(&b.path("media")).contains(&"f".to_string()),
        "a name B found is missing from its listing"
    );

    // Replaced on A: B, whose block cache holds the old version, reads only the new one.
    let v2 = pseudo_random(2 * MIB + 5, 2);
    fs::write(a.path("media/f"), &v2).unwrap();
    uploaded_then(METADATA_TTL);
    assert!(
        fs::read(b.path("media/f")).unwrap() == v2,
        "B read stale or mixed bytes after a replace"
    );

    // Deleted on A while B has it open: new lookups on B fail with ENOENT, and the open
    // handle either reads the version it opened or fails; never other bytes.
    let mut h = File::open(b.path("media/f")).unwrap();
    let mut head = vec![0u8; 4096];
    h.read_exact(&mut head).unwrap();
    assert!(head == v2[..4096]);
    fs::remove_file(a.path("media/f")).unwrap();
    uploaded_then(METADATA_TTL);
    assert_eq!(errno(fs::metadata(b.path("media/f"))), libc::ENOENT);
    assert!(!names_in(&b.path("media")).contains(&"f".to_string()));
    let mut rest = Vec::new();
    match h.read_to_end(&mut rest) {
        Ok(_) => assert!(
            rest == v2[4096..],
            "the open handle read other bytes after a delete"
        ),
        Err(e) => assert!(
            matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENOENT)),
            "{e}"
        ),
    }

    // A file added on A shows in B's fresh listing of its directory once that listing
    // expires, at most the metadata TTL after the upload.
    assert!(!names_in(&b.path("media")).contains(&"g".to_string()));
    fs::write(a.path("media/g"), b"g").unwrap();
    uploaded_then(METADATA_TTL);
    assert!(names_in(&b.path("media")).contains(&"g".to_string()));
}

#[test]
fn concurrent_writes_of_one_path_from_two_mounts_end_as_one_whole_object() {
    let a = TestMount::new("race");
    let b = TestMount::with_prefix(a.prefix.clone(), &[]);
    let bucket = Bucket::new(&a.env);
    fs::create_dir_all(a.path("thumbnails")).unwrap();
    a.sync();
    fs::create_dir_all(b.path("thumbnails")).unwrap();
    for round in 0..4 {
        let rel = format!("thumbnails/32-32-image-png-crop-{round}");
        // One side's file is large enough for a multipart upload.
        let big = round % 2 == 0;
        let da = pseudo_random(if big { 12 * MIB + 3 } else { 300_000 }, 10 + round);
        let db = pseudo_random(if big { 200_000 } else { 9 * MIB + 7 }, 20 + round);
        let writer = |path: std::path::PathBuf, data: Vec<u8>| {
            std::thread::spawn(move || {
                let mut f = File::create(path).unwrap();
                for chunk in data.chunks(64 << 10) {
                    f.write_all(chunk).unwrap();
                }
            })
        };
        let (ta, tb) = (
            writer(a.path(&rel), da.clone()),
            writer(b.path(&rel), db.clone()),
        );
        ta.join().unwrap();
        tb.join().unwrap();
        a.sync();
        b.sync();
        let got = bucket.get(&a.key(&rel)).expect("the object exists");
        assert!(
            got == da || got == db,
            "round {round}: the object ({} bytes) is neither writer's file",
            got.len()
        );
    }
}

/// `os.makedirs(p, exist_ok=True)`: stat of the parent (recursively while missing), mkdir.
fn makedirs(p: &std::path::Path) {
    let parent = p.parent().unwrap();
    if fs::metadata(parent).is_err() {
        makedirs(parent);
    }
    match fs::create_dir(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("mkdir {}: {e}", p.display()),
    }
}

/// What Synapse does on the media store for one upload of an image, media `i`: `os.makedirs`
/// of its content directory, the file, `os.makedirs` of its thumbnail directory and five
/// thumbnails.
fn upload_like_synapse(m: &TestMount, i: u64) {
    let id = &sha256(&i.to_le_bytes())[..24];
    let (a, b) = (&id[0..1], &id[1..2]);
    let content = m.path(&format!("local_content/a{a}/b{b}/{id}"));
    makedirs(content.parent().unwrap());
    fs::write(&content, pseudo_random(40_000, i)).unwrap();
    let thumbs = m.path(&format!("local_thumbnails/a{a}/b{b}/{id}"));
    makedirs(&thumbs);
    for t in [
        "32-32-image-png-crop",
        "96-96-image-png-crop",
        "320-240-image-jpeg-scale",
        "640-480-image-jpeg-scale",
        "800-600-image-jpeg-scale",
    ] {
        fs::write(thumbs.join(t), pseudo_random(8_000, i)).unwrap();
    }
}

/// What Synapse's write pattern costs in requests once the mount's knowledge has expired
/// between uploads (uploads arrive minutes apart; here the TTLs are 1 s and uploads 1.2 s
/// apart), over a 2000-file store.
#[test]
fn synapse_uploads_cost_one_put_per_file_and_few_listings() {
    const MEDIA: usize = 8;
    let env = S3Env::get();
    let prefix = unique_prefix("synapse-writes");
    let bucket = Bucket::new(&env);
    let keys: Vec<String> = synapse_tree(2000)
        .iter()
        .map(|k| format!("{prefix}{k}"))
        .collect();
    bucket.put_many(&keys, b"media!");
    let m = TestMount::with_prefix(
        prefix.clone(),
        &["--metadata-ttl", "1s", "--negative-ttl", "1s"],
    );
    let ops = ["list", "head", "put", "get"];
    let before = ops.map(|op| m.requests(op));
    for i in 0..MEDIA {
        std::thread::sleep(Duration::from_millis(1200));
        upload_like_synapse(&m, i as u64);
    }
    m.sync();
    let spent: Vec<u64> = ops
        .iter()
        .zip(before)
        .map(|(op, b)| m.requests(op) - b)
        .collect();
    let (list, head, put, get) = (spent[0], spent[1], spent[2], spent[3]);
    let files = MEDIA * 6;
    eprintln!(
        "{MEDIA} uploads ({files} files): {put} PUT, {list} LIST, {head} HEAD, {get} GET; \
         {:.2} PUT per file, {:.2} LIST+HEAD per upload",
        put as f64 / files as f64,
        (list + head) as f64 / MEDIA as f64
    );
    // No directory marker is sent for a directory a file makes redundant.
    assert!(
        put as f64 <= files as f64 * 1.1,
        "{put} PUT for {files} files"
    );
    assert_eq!(head, 0, "HEAD requests for new files");
    // Per upload: the content and thumbnail directories' listings, expired since the last
    // upload, and the new names' absence.
    assert!(
        list <= 3 * MEDIA as u64,
        "{list} LIST requests for {MEDIA} uploads"
    );
    drop(m);
    bucket.delete_prefix(&prefix);
}

/// What a burst of Synapse uploads costs (media arriving within the metadata TTL, here back
/// to back): each upload looks up a hash prefix in both trees, one LIST each while nothing
/// is known; after a few, each tree is listed whole in the background, once, and the rest
/// of the burst asks nothing before its uploads.
#[test]
fn a_burst_of_synapse_uploads_lists_each_tree_whole_instead_of_asking_per_upload() {
    const MEDIA: u64 = 40;
    let (m, bucket, _) = mount_on_synapse_tree("synapse-burst", 4000);
    let before = m.requests("list");
    for i in 0..MEDIA {
        upload_like_synapse(&m, i);
    }
    let list = m.requests("list") - before;
    eprintln!("{MEDIA} uploads in a burst: {list} LIST");
    assert!(
        list <= MEDIA / 2,
        "{list} LIST requests for {MEDIA} uploads in a burst"
    );
    // Every upload landed: the lookups that asked nothing created no file twice.
    let content = m.keys("local_content/").len();
    let thumbnails = m.keys("local_thumbnails/").len();
    assert_eq!((content, thumbnails), (2285 + 40, 1715 + 5 * 40));
    bucket.delete_prefix(&m.prefix);
}
