//! What the bucket was last seen to hold, by directory, for the metadata TTL: the attributes
//! of every name a LIST returned (so the lookups and stats after a `readdir` ask nothing),
//! and the complete list of names of a directory listed to its end (so `readdir`, `rmdir`
//! and a lookup of a missing name ask nothing again); and, for the negative TTL, single
//! names a lookup found absent in a directory with no complete listing. Changes this mount
//! makes are noted as they happen, so a listing never hides or resurrects them. Bounded by a
//! total number of remembered names; whole directories are evicted least recently used.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant, SystemTime};

use lru::LruCache;
use parking_lot::Mutex;

use super::inode::{Kind, Remote};
use crate::store::ETag;

/// Most absent paths remembered for the negative TTL.
const NEGATIVE_CAPACITY: usize = 10_000;

/// What the cache can say about one name.
#[derive(Debug, Clone)]
pub enum Answer {
    /// The name exists, with these attributes, as of `at`.
    Present(Remote, Instant),
    /// The name does not exist (a complete listing lacks it, this mount removed it, or a
    /// lookup found nothing within the negative TTL).
    Absent,
    /// Nothing fresh is known: ask the bucket.
    Unknown,
}

/// One remembered name. Attributes are kept small: the ETag is stored as given but most
/// names carry a 34-byte quoted MD5.
#[derive(Debug, Clone)]
enum Entry {
    Present {
        kind: Kind,
        size: u64,
        mtime: SystemTime,
        etag: Option<ETag>,
    },
    /// Removed by this mount while the listing was fresh.
    Removed,
}

struct DirListing {
    /// When the first LIST of this listing was sent: nothing older is in it.
    at: Instant,
    /// Identifies this listing among successive listings of the same directory.
    generation: u64,
    /// Every page has been recorded: names not in `names` do not exist.
    complete: bool,
    /// Recording stopped because the directory is larger than the whole budget.
    overflowed: bool,
    names: HashMap<Box<str>, Entry>,
    /// Names this mount changed while the listing was being made: a page fetched before the
    /// change must not overwrite what the mount knows.
    pinned: Vec<Box<str>>,
}

struct Inner {
    dirs: LruCache<String, DirListing>,
    /// Names held by all listings together.
    entries: usize,
    absent: LruCache<String, Instant>,
    next_generation: u64,
}

/// What a listing says of a directory's contents.
#[derive(Debug, Clone, Copy)]
pub struct Contents {
    /// It holds at least one name.
    pub any: bool,
    /// It was recorded to its end.
    pub complete: bool,
    /// When its first LIST was sent.
    pub at: Instant,
}

/// A listing being recorded by one directory handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListingId(u64);

pub struct ListingCache {
    inner: Mutex<Inner>,
    ttl: Duration,
    negative_ttl: Duration,
    max_entries: usize,
}

impl ListingCache {
    pub fn new(ttl: Duration, negative_ttl: Duration, max_entries: usize) -> Self {
        ListingCache {
            inner: Mutex::new(Inner {
                dirs: LruCache::unbounded(),
                entries: 0,
                absent: LruCache::new(NonZeroUsize::new(NEGATIVE_CAPACITY).unwrap()),
                next_generation: 1,
            }),
            ttl,
            negative_ttl,
            max_entries: max_entries.max(1),
        }
    }

    /// Names currently remembered across all directories.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.inner.lock().entries
    }

    /// Starts recording a new listing whose first LIST goes out now. It replaces any older
    /// listing of its directory once its first page arrives.
    pub fn begin(&self) -> (ListingId, Instant) {
        let mut inner = self.inner.lock();
        let generation = inner.next_generation;
        inner.next_generation += 1;
        (ListingId(generation), Instant::now())
    }

    /// Records the first page of listing `id` of `dir`, begun at `at`.
    pub fn add_page(&self, dir: &str, id: ListingId, at: Instant, page: Vec<(String, Remote)>) {
        self.add(dir, id, at, page, true);
    }

    /// Records a later page of listing `id` of `dir`, while that listing is still the
    /// directory's: one evicted or replaced since its first page is not recorded again from
    /// the middle, or it would end complete without the names of its earlier pages.
    pub fn add_later_page(
        &self,
        dir: &str,
        id: ListingId,
        at: Instant,
        page: Vec<(String, Remote)>,
    ) {
        self.add(dir, id, at, page, false);
    }

    fn add(&self, dir: &str, id: ListingId, at: Instant, page: Vec<(String, Remote)>, first: bool) {
        if self.ttl.is_zero() {
            return;
        }
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let current = inner.dirs.get(dir).map(|d| d.generation);
        if current != Some(id.0) {
            if !first {
                return;
            }
            if let Some(old) = inner.dirs.peek(dir) {
                // A newer listing of the same directory is already recording: leave it.
                if old.generation > id.0 {
                    return;
                }
            }
            let mut fresh = DirListing {
                at,
                generation: id.0,
                complete: false,
                overflowed: false,
                names: HashMap::new(),
                pinned: Vec::new(),
            };
            if let Some(old) = inner.dirs.pop(dir) {
                inner.entries -= old.names.len();
                // What this mount changed since the new listing began stays as noted.
                if old.at.elapsed() < self.ttl {
                    for name in old.pinned {
                        if let Some(e) = old.names.get(&name) {
                            fresh.names.insert(name.clone(), e.clone());
                        }
                        fresh.pinned.push(name);
                    }
                    inner.entries += fresh.names.len();
                }
            }
            inner.dirs.put(dir.to_string(), fresh);
        }
        let listing = inner.dirs.get_mut(dir).expect("just ensured");
        if listing.overflowed {
            return;
        }
        let mut added = 0;
        for (name, remote) in page {
            if listing.pinned.iter().any(|p| **p == *name) {
                continue;
            }
            if listing
                .names
                .insert(name.into_boxed_str(), Entry::from(&remote))
                .is_none()
            {
                added += 1;
            }
        }
        inner.entries += added;
        self.make_room(inner, dir);
    }

    /// Listing `id` of `dir` has been recorded to its last page.
    pub fn finish(&self, dir: &str, id: ListingId) {
        let mut inner = self.inner.lock();
        if let Some(l) = inner.dirs.peek_mut(dir) {
            if l.generation == id.0 && !l.overflowed {
                l.complete = true;
            }
        }
    }

    /// A directory this mount just created: it holds nothing, and is known to hold nothing
    /// for the TTL.
    pub fn created_dir(&self, dir: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let (id, at) = self.begin();
        self.add_page(dir, id, at, Vec::new());
        self.finish(dir, id);
    }

    /// Directory `dir` was removed by this mount: its listing is no longer worth keeping.
    pub fn forget_dir(&self, dir: &str) {
        let mut inner = self.inner.lock();
        if let Some(old) = inner.dirs.pop(dir) {
            inner.entries -= old.names.len();
        }
    }

    /// What is known of `name` in directory `dir`. `changed_at` is when the name last
    /// changed in the bucket by this mount's own doing (a change that landed), if it did:
    /// what was seen before then is not believed.
    pub fn lookup(&self, dir: &str, name: &str, path: &str, changed_at: Option<Instant>) -> Answer {
        let changed_since = |t: Instant| changed_at.is_some_and(|c| c >= t);
        let mut inner = self.inner.lock();
        if let Some(l) = inner.dirs.get(dir) {
            // A name this mount changed is as noted; another may have changed since the
            // listing was made (the listing stays good for its neighbours). An expired
            // listing answers nothing, but stays until the budget needs its room: it tells
            // a walk that the directory was listed a moment ago.
            let believed = || l.pinned.iter().any(|p| **p == *name) || !changed_since(l.at);
            if l.at.elapsed() < self.ttl && believed() {
                match l.names.get(name) {
                    Some(e @ Entry::Present { .. }) => {
                        return Answer::Present(e.remote().expect("present"), l.at);
                    }
                    Some(Entry::Removed) => return Answer::Absent,
                    None if l.complete => return Answer::Absent,
                    None => {}
                }
            }
        }
        match inner.absent.get(path) {
            Some(at) if at.elapsed() < self.negative_ttl && !changed_since(*at) => Answer::Absent,
            Some(_) => {
                inner.absent.pop(path);
                Answer::Unknown
            }
            None => Answer::Unknown,
        }
    }

    /// The names directory `dir` holds, with their attributes, and when the listing began:
    /// only from a fresh listing recorded to its end. Names this mount removed are left out.
    pub fn complete(&self, dir: &str) -> Option<(Vec<(String, Remote)>, Instant)> {
        let mut inner = self.inner.lock();
        let l = inner.dirs.get(dir)?;
        if !l.complete || l.at.elapsed() >= self.ttl {
            return None;
        }
        let mut names: Vec<(String, Remote)> = l
            .names
            .iter()
            .filter_map(|(name, e)| Some((name.to_string(), e.remote()?)))
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        Some((names, l.at))
    }

    /// What a fresh listing of `dir` says of its contents: whether it holds any name, whether
    /// it is complete (so holding none means empty), and when it began.
    pub fn contents(&self, dir: &str) -> Option<Contents> {
        let inner = self.inner.lock();
        let l = inner.dirs.peek(dir)?;
        if l.at.elapsed() >= self.ttl || l.overflowed {
            return None;
        }
        Some(Contents {
            any: l.names.values().any(|e| matches!(e, Entry::Present { .. })),
            complete: l.complete,
            at: l.at,
        })
    }

    /// Whether `dir` was listed (completely or not) within `window`, fresh or not, without
    /// touching its place in the eviction order.
    pub fn listed_within(&self, dir: &str, window: Duration) -> bool {
        let inner = self.inner.lock();
        inner
            .dirs
            .peek(dir)
            .is_some_and(|l| l.at.elapsed() < window.max(self.ttl))
    }

    /// Records the whole listing of `dir`, made by a LIST begun at `at`.
    pub fn record(&self, dir: &str, id: ListingId, at: Instant, names: Vec<(String, Remote)>) {
        self.add_page(dir, id, at, names);
        self.finish(dir, id);
    }

    /// A lookup asked the bucket and found nothing at `path`.
    pub fn note_absent(&self, path: &str) {
        if !self.negative_ttl.is_zero() {
            self.inner
                .lock()
                .absent
                .put(path.to_string(), Instant::now());
        }
    }

    /// Whether this mount removed `name` from `dir` while its listing was fresh.
    pub fn removed_here(&self, dir: &str, name: &str) -> bool {
        let inner = self.inner.lock();
        inner
            .dirs
            .peek(dir)
            .is_some_and(|l| matches!(l.names.get(name), Some(Entry::Removed)))
    }

    /// A lookup asked the bucket at `asked` about `name` in `dir` and found `remote` (None:
    /// nothing): a fresh listing of `dir` begun before that takes the news, unless this mount
    /// changed the name itself. A listing begun after it is newer news.
    pub fn saw(&self, dir: &str, name: &str, remote: Option<&Remote>, asked: Instant) {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let Some(l) = inner.dirs.peek_mut(dir) else {
            return;
        };
        if l.at > asked
            || l.at.elapsed() >= self.ttl
            || l.overflowed
            || l.pinned.iter().any(|p| **p == *name)
        {
            return;
        }
        match remote {
            Some(r) => {
                if l.names.insert(name.into(), Entry::from(r)).is_none() {
                    inner.entries += 1;
                    self.make_room(inner, dir);
                }
            }
            None => {
                if l.names.remove(name).is_some() {
                    inner.entries -= 1;
                }
            }
        }
    }

    /// This mount created or changed `name` in `dir`; `remote` is what it is now.
    pub fn note_present(&self, dir: &str, name: &str, path: &str, remote: &Remote) {
        self.note(dir, name, path, Entry::from(remote));
    }

    /// This mount removed `name` from `dir`.
    pub fn note_removed(&self, dir: &str, name: &str, path: &str) {
        self.note(dir, name, path, Entry::Removed);
    }

    fn note(&self, dir: &str, name: &str, path: &str, entry: Entry) {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        inner.absent.pop(path);
        let Some(l) = inner.dirs.get_mut(dir) else {
            return;
        };
        if l.at.elapsed() >= self.ttl || l.overflowed {
            return;
        }
        if l.names.insert(name.into(), entry).is_none() {
            inner.entries += 1;
        }
        if !l.pinned.iter().any(|p| **p == *name) {
            l.pinned.push(name.into());
        }
        self.make_room(inner, dir);
    }

    /// Evicts whole directories, least recently used first, until the names fit the budget;
    /// a directory that alone exceeds it stops being recorded (and is never complete).
    fn make_room(&self, inner: &mut Inner, keep: &str) {
        while inner.entries > self.max_entries {
            match inner.dirs.peek_lru() {
                Some((k, _)) if k != keep => {
                    if let Some((_, old)) = inner.dirs.pop_lru() {
                        inner.entries -= old.names.len();
                    }
                }
                _ => {
                    if let Some(l) = inner.dirs.peek_mut(keep) {
                        inner.entries -= l.names.len();
                        l.names = HashMap::new();
                        l.pinned = Vec::new();
                        l.overflowed = true;
                        l.complete = false;
                    }
                    break;
                }
            }
        }
    }
}

impl Entry {
    fn remote(&self) -> Option<Remote> {
        match self {
            Entry::Present {
                kind,
                size,
                mtime,
                etag,
            } => Some(Remote {
                kind: *kind,
                size: *size,
                mtime: *mtime,
                etag: etag.clone(),
            }),
            Entry::Removed => None,
        }
    }
}

impl From<&Remote> for Entry {
    fn from(remote: &Remote) -> Entry {
        Entry::Present {
            kind: remote.kind,
            size: remote.size,
            mtime: remote.mtime,
            etag: remote.etag.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> Remote {
        Remote {
            kind: Kind::File,
            size,
            mtime: SystemTime::UNIX_EPOCH,
            etag: Some(ETag::new("\"e\"")),
        }
    }

    fn cache() -> ListingCache {
        ListingCache::new(Duration::from_secs(60), Duration::from_secs(60), 100)
    }

    fn size_of(a: Answer) -> Option<u64> {
        match a {
            Answer::Present(r, _) => Some(r.size),
            Answer::Absent => None,
            Answer::Unknown => panic!("unknown"),
        }
    }

    const NEVER: Option<Instant> = None;

    #[test]
    fn a_listing_older_than_a_landed_change_is_not_believed_about_that_name() {
        let c = cache();
        let (id, at) = c.begin();
        c.add_page("d", id, at, vec![("a".into(), file(1))]);
        c.note_present("d", "mine", "d/mine", &file(5));
        c.finish("d", id);
        c.note_absent("e/x");
        let after_landing = Some(Instant::now());
        // A change (replayed from the journal, say) reached the bucket after the listing.
        assert!(matches!(
            c.lookup("d", "a", "d/a", after_landing),
            Answer::Unknown
        ));
        assert!(matches!(
            c.lookup("d", "b", "d/b", after_landing),
            Answer::Unknown
        ));
        assert!(matches!(
            c.lookup("e", "x", "e/x", after_landing),
            Answer::Unknown
        ));
        // What this mount noted itself stays, and so do the names nothing changed.
        assert_eq!(
            size_of(c.lookup("d", "mine", "d/mine", after_landing)),
            Some(5)
        );
        assert_eq!(size_of(c.lookup("d", "a", "d/a", NEVER)), Some(1));
        assert_eq!(size_of(c.lookup("d", "b", "d/b", NEVER)), None);
    }

    #[test]
    fn a_complete_listing_answers_absent_for_other_names() {
        let c = cache();
        let (id, at) = c.begin();
        c.add_page("d", id, at, vec![("a".into(), file(1))]);
        assert!(matches!(c.lookup("d", "b", "d/b", NEVER), Answer::Unknown));
        c.add_page("d", id, at, vec![("c".into(), file(3))]);
        c.finish("d", id);
        assert_eq!(size_of(c.lookup("d", "a", "d/a", NEVER)), Some(1));
        assert_eq!(size_of(c.lookup("d", "c", "d/c", NEVER)), Some(3));
        assert_eq!(size_of(c.lookup("d", "b", "d/b", NEVER)), None);
        assert!(matches!(c.lookup("e", "b", "e/b", NEVER), Answer::Unknown));
    }

    #[test]
    fn local_changes_win_over_pages_fetched_before_them() {
        let c = cache();
        let (id, at) = c.begin();
        c.add_page("d", id, at, vec![("a".into(), file(1))]);
        c.note_removed("d", "a", "d/a");
        c.note_present("d", "z", "d/z", &file(9));
        // The next page was fetched before the changes reached the bucket.
        c.add_page("d", id, at, vec![("z".into(), file(2))]);
        c.finish("d", id);
        assert_eq!(size_of(c.lookup("d", "a", "d/a", NEVER)), None);
        assert_eq!(size_of(c.lookup("d", "z", "d/z", NEVER)), Some(9));
        // A newer listing keeps them too, while the old one is fresh.
        let (id2, at2) = c.begin();
        c.add_page(
            "d",
            id2,
            at2,
            vec![("a".into(), file(1)), ("z".into(), file(2))],
        );
        c.finish("d", id2);
        assert_eq!(size_of(c.lookup("d", "a", "d/a", NEVER)), None);
        assert_eq!(size_of(c.lookup("d", "z", "d/z", NEVER)), Some(9));
    }

    #[test]
    fn stale_listings_and_zero_ttl_answer_nothing() {
        let c = ListingCache::new(Duration::ZERO, Duration::ZERO, 100);
        let (id, at) = c.begin();
        c.add_page("d", id, at, vec![("a".into(), file(1))]);
        c.finish("d", id);
        c.note_absent("d/b");
        assert!(matches!(c.lookup("d", "a", "d/a", NEVER), Answer::Unknown));
        assert!(matches!(c.lookup("d", "b", "d/b", NEVER), Answer::Unknown));
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn negative_answers_end_when_the_name_is_created_here() {
        let c = cache();
        c.note_absent("d/x");
        assert_eq!(size_of(c.lookup("d", "x", "d/x", NEVER)), None);
        c.note_present("d", "x", "d/x", &file(4));
        assert!(matches!(c.lookup("d", "x", "d/x", NEVER), Answer::Unknown));
    }

    #[test]
    fn a_listing_evicted_between_its_pages_never_ends_complete_without_its_first() {
        let c = cache();
        let (id, at) = c.begin();
        c.add_page("d", id, at, vec![("a".into(), file(1))]);
        // Listings of other directories push it out before its next page comes.
        for d in 0..3 {
            let (other, at) = c.begin();
            let names = (0..40).map(|i| (format!("n{i}"), file(i))).collect();
            c.record(&format!("o{d}"), other, at, names);
        }
        c.add_later_page("d", id, at, vec![("z".into(), file(2))]);
        c.finish("d", id);
        assert!(
            matches!(c.lookup("d", "a", "d/a", NEVER), Answer::Unknown),
            "a name of the first page answered as absent"
        );
    }

    #[test]
    fn a_lookup_does_not_undo_a_listing_that_began_after_it_asked() {
        let c = cache();
        let (id, at) = c.begin();
        // Created elsewhere after the lookup's LIST went out and before the listing's.
        let asked = at - Duration::from_millis(1);
        c.record("d", id, at, vec![("new.jpg".into(), file(7))]);
        c.saw("d", "new.jpg", None, asked);
        assert_eq!(
            size_of(c.lookup("d", "new.jpg", "d/new.jpg", NEVER)),
            Some(7)
        );
        // News asked after the listing began is taken.
        c.saw("d", "new.jpg", None, Instant::now());
        assert_eq!(size_of(c.lookup("d", "new.jpg", "d/new.jpg", NEVER)), None);
    }

    #[test]
    fn the_budget_evicts_whole_directories_and_never_lies() {
        let c = cache();
        for d in 0..5 {
            let dir = format!("d{d}");
            let (id, at) = c.begin();
            c.add_page(
                &dir,
                id,
                at,
                (0..40).map(|i| (format!("n{i}"), file(i))).collect(),
            );
            c.finish(&dir, id);
            assert!(c.len() <= 100);
        }
        // The oldest directories were evicted: unknown, never "absent".
        assert!(matches!(
            c.lookup("d0", "n1", "d0/n1", NEVER),
            Answer::Unknown
        ));
        assert_eq!(size_of(c.lookup("d4", "n1", "d4/n1", NEVER)), Some(1));
        // A directory larger than the whole budget is not recorded and never complete.
        let (id, at) = c.begin();
        for p in 0..3 {
            c.add_page(
                "big",
                id,
                at,
                (0..60).map(|i| (format!("p{p}-{i}"), file(i))).collect(),
            );
            assert!(c.len() <= 100);
        }
        c.finish("big", id);
        assert!(matches!(
            c.lookup("big", "nothere", "big/nothere", NEVER),
            Answer::Unknown
        ));
    }
}
