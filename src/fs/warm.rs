//! Which directories are worth listing whole, and when again: the bookkeeping behind the
//! namespace's warm listings. A lookup of a name that nothing fresh answers costs one LIST
//! (the name's own); a directory where that happens three times within the metadata TTL (a
//! Synapse's `local_content` while media arrive, each upload looking up a new hash prefix),
//! and more often than its last whole listing took LISTs, is listed whole in the
//! background, so that its next lookups, of names present or missing, ask nothing.
//! The listing is of the directory's whole subtree (one flat LIST per 1000 keys) while that
//! stays small, else of the directory alone (one LIST per 1000 names); a directory larger
//! than that is left to single lookups. A listing is made again, once half of its TTL has
//! passed, only when a lookup needs it and it has answered at least as many lookups as it
//! took LISTs: an idle directory costs nothing. A listing of the directory alone counts only
//! the answers that spare a LIST: a name missing, or a file; a subdirectory found is looked
//! into next, which asks anyway (a Synapse's `local_content` of 20 000 media: every hash
//! prefix exists). One that expired without paying for itself rests for ten TTLs. What
//! listings found about a directory's size outlives the counts of the many directories
//! asked about, for sixty TTLs.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use lru::LruCache;

use super::names;

/// Most directories whose lookups are counted.
const DIRS_KEPT: usize = 1024;
/// Most directories whose size is remembered apart (`WarmDirs::learned`).
const DIRS_LEARNED: usize = 256;
/// How many TTLs what a listing found about a directory's size is believed, once the
/// directory's counts are gone: a directory purged since is found small again.
const RELEARN: u32 = 60;
/// How many TTLs after its expiry a directory whose warm listing did not pay for itself is
/// not listed whole.
const REST: u32 = 10;
/// Lookups asking the bucket within the metadata TTL that make a directory worth listing
/// whole, at least: fewer are as likely a few names of one operation (`os.makedirs` looking
/// up two trees of the root) as a stream of them.
const ASKS: u32 = 3;

/// How to list a directory whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// The directory and everything below it, with flat LISTs.
    Subtree,
    /// The directory's own names, with LISTs by delimiter.
    Directory,
}

/// How a listing of a directory ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Listed {
    /// Recorded whole, begun at `began`, in `lists` LISTs, with `reach`.
    Whole {
        began: Instant,
        lists: u32,
        reach: Reach,
    },
    /// Larger than a warm listing may be, even of the directory alone; begun at `began`.
    TooLarge { began: Instant },
    /// The store failed it; single lookups go on.
    Failed,
}

#[derive(Debug)]
struct Warmth {
    /// Lookups that asked the bucket since `window` began.
    asks: u32,
    window: Instant,
    /// The last listing recorded whole: when it began and the LISTs it took.
    last: Option<(Instant, u32)>,
    /// Lookups that listing answered, of those it counts (see the top of the file).
    answered: u32,
    /// Whether the last listing, expired, was judged on what it answered.
    judged: bool,
    /// Not listed whole again before this: its last listing did not pay for itself.
    resting_until: Option<Instant>,
    /// A listing is being made.
    listing: bool,
    /// How to list it: its subtree, until that was found larger than a warm listing may be.
    reach: Reach,
    /// Never listed whole here again: the directory alone is too large too, or it rests
    /// longer than an `Instant` can say.
    retired: bool,
}

/// What a listing begun `at` found, at the cost of many LISTs: the directory's subtree is
/// too large for a warm listing, and if `retired`, the directory alone too.
#[derive(Debug, Clone, Copy)]
struct Learned {
    retired: bool,
    at: Instant,
}

pub(super) struct WarmDirs {
    dirs: LruCache<String, Warmth>,
    /// What listings found about directories' sizes, kept apart from `dirs`, which every
    /// directory asked about passes through: a busy tree's many small directories would
    /// push a large one out, and its next asks would pay again to find it large.
    learned: LruCache<String, Learned>,
}

impl Default for WarmDirs {
    fn default() -> Self {
        WarmDirs {
            dirs: LruCache::new(NonZeroUsize::new(DIRS_KEPT).expect("not zero")),
            learned: LruCache::new(NonZeroUsize::new(DIRS_LEARNED).expect("not zero")),
        }
    }
}

impl WarmDirs {
    /// A lookup in `dir` is asking the bucket. Returns how to list `dir` whole when it is
    /// time to: the `ASKS`th such lookup within `ttl`, and one more than the LISTs of its last
    /// whole listing; none being made; not too large; not resting (its last listing expired
    /// without paying for itself less than `REST` TTLs ago).
    pub fn asked(&mut self, dir: &str, ttl: Duration, now: Instant) -> Option<Reach> {
        let learned = self
            .learned
            .get(dir)
            .filter(|l| now.saturating_duration_since(l.at) < ttl.saturating_mul(RELEARN))
            .copied();
        let w = self.dirs.get_or_insert_mut(dir.to_string(), || Warmth {
            asks: 0,
            window: now,
            last: None,
            answered: 0,
            judged: true,
            resting_until: None,
            listing: false,
            reach: match learned {
                Some(_) => Reach::Directory,
                None => Reach::Subtree,
            },
            retired: learned.is_some_and(|l| l.retired),
        });
        if let Some((began, lists)) = w.last {
            if !w.judged && now.saturating_duration_since(began) >= ttl {
                w.judged = true;
                if w.answered < lists {
                    match began.checked_add(ttl.saturating_mul(REST + 1)) {
                        Some(until) => w.resting_until = Some(until),
                        None => w.retired = true,
                    }
                }
            }
        }
        if w.resting_until.is_some_and(|until| now < until) {
            return None;
        }
        if now.saturating_duration_since(w.window) >= ttl {
            w.asks = 0;
            w.window = now;
        }
        w.asks = w.asks.saturating_add(1);
        let needed = ASKS.max(w.last.map_or(0, |(_, lists)| lists + 1));
        if w.asks < needed || w.listing || w.retired {
            return None;
        }
        w.listing = true;
        Some(w.reach)
    }

    /// A lookup in `dir` was answered from what is known; `spared` when the answer spares a
    /// LIST even where only `dir`'s own names are known (the name is missing, or a file).
    /// Returns the directory (`dir` or one above it) whose warm listing answered and is to
    /// be made again now: half its `ttl` has passed, it answered at least as many lookups
    /// as it took LISTs, and none is being made.
    pub fn answered(
        &mut self,
        dir: &str,
        spared: bool,
        ttl: Duration,
        now: Instant,
    ) -> Option<(String, Reach)> {
        let mut at = dir;
        loop {
            if let Some(w) = self.dirs.get_mut(at) {
                if let Some((began, lists)) = w.last {
                    let age = now.saturating_duration_since(began);
                    if age < ttl && (w.reach == Reach::Subtree || at == dir) {
                        if w.reach == Reach::Subtree || spared {
                            w.answered = w.answered.saturating_add(1);
                        }
                        if age >= ttl / 2 && w.answered >= lists && !w.listing {
                            w.listing = true;
                            return Some((at.to_string(), w.reach));
                        }
                        return None;
                    }
                }
            }
            if at.is_empty() {
                return None;
            }
            at = names::split(at).0;
        }
    }

    /// The listing of `dir` ended as `how`.
    pub fn listed(&mut self, dir: &str, how: Listed) {
        // Learned even if `dir`'s counts were pushed out while it was listed.
        match how {
            Listed::Whole {
                reach: Reach::Subtree,
                ..
            } => {
                self.learned.pop(dir);
            }
            Listed::Whole { began, .. } => {
                let alone = Learned {
                    retired: false,
                    at: began,
                };
                self.learned.put(dir.to_string(), alone);
            }
            Listed::TooLarge { began } => {
                let too_large = Learned {
                    retired: true,
                    at: began,
                };
                self.learned.put(dir.to_string(), too_large);
            }
            Listed::Failed => {}
        }
        let Some(w) = self.dirs.get_mut(dir) else {
            return;
        };
        w.listing = false;
        match how {
            Listed::Whole {
                began,
                lists,
                reach,
            } => {
                w.last = Some((began, lists));
                w.answered = 0;
                w.judged = false;
                w.reach = reach;
                w.asks = 0;
            }
            Listed::TooLarge { .. } => w.retired = true,
            // Tried again after as many asks as the first time, and a refresh only once
            // the listing in place answered as many lookups again.
            Listed::Failed => {
                w.asks = 0;
                w.answered = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn secs(t: Instant, s: u64) -> Instant {
        t + Duration::from_secs(s)
    }

    fn whole(began: Instant, lists: u32, reach: Reach) -> Listed {
        Listed::Whole {
            began,
            lists,
            reach,
        }
    }

    #[test]
    fn a_directory_is_listed_whole_at_its_third_ask_within_the_ttl() {
        let mut w = WarmDirs::default();
        let t = Instant::now();
        assert_eq!(w.asked("media", TTL, t), None);
        assert_eq!(w.asked("media", TTL, secs(t, 1)), None);
        let expired = w.asked("media", TTL, secs(t, 11));
        assert_eq!(expired, None, "the first asks expired");
        assert_eq!(w.asked("media", TTL, secs(t, 12)), None);
        assert_eq!(w.asked("media", TTL, secs(t, 12)), Some(Reach::Subtree));
        let again = w.asked("media", TTL, secs(t, 12));
        assert_eq!(again, None, "one is being made");
        assert_eq!(w.asked("other", TTL, secs(t, 12)), None);
    }

    #[test]
    fn a_directory_whose_listing_took_many_lists_needs_more_asks() {
        let mut w = WarmDirs::default();
        let t = Instant::now();
        let asks = |w: &mut WarmDirs, at| (0..20).find(|_| w.asked("media", TTL, at).is_some());
        assert_eq!(asks(&mut w, t), Some(2), "the third ask");
        w.listed("media", whole(t, 5, Reach::Subtree));
        // It paid for itself, before half its TTL.
        for _ in 0..5 {
            assert_eq!(w.answered("media/ab", false, TTL, secs(t, 1)), None);
        }
        assert_eq!(asks(&mut w, secs(t, 20)), Some(5), "the sixth ask");
    }

    #[test]
    fn a_listing_is_made_again_past_half_its_ttl_once_it_paid_for_itself() {
        let mut w = WarmDirs::default();
        let t = Instant::now();
        w.asked("media", TTL, t);
        w.listed("media", whole(t, 3, Reach::Subtree));
        // Answers below the directory count for its subtree listing.
        assert_eq!(w.answered("media/ab", true, TTL, secs(t, 1)), None);
        assert_eq!(
            w.answered("media", true, TTL, secs(t, 6)),
            None,
            "two answers"
        );
        assert_eq!(
            w.answered("media/ab/cd", true, TTL, secs(t, 6)),
            Some(("media".to_string(), Reach::Subtree))
        );
        assert_eq!(
            w.answered("media", true, TTL, secs(t, 7)),
            None,
            "one is being made"
        );
        // Unused, it is not made again; expired, it answers nothing.
        w.listed(
            "media",
            Listed::Whole {
                began: secs(t, 7),
                lists: 3,
                reach: Reach::Subtree,
            },
        );
        assert_eq!(w.answered("media", true, TTL, secs(t, 13)), None);
        assert_eq!(w.answered("media", true, TTL, secs(t, 18)), None, "expired");
    }

    #[test]
    fn a_directory_too_large_is_listed_alone_then_not_at_all() {
        let mut w = WarmDirs::default();
        let t = Instant::now();
        w.asked("media", TTL, t);
        w.asked("media", TTL, t);
        assert_eq!(w.asked("media", TTL, t), Some(Reach::Subtree));
        w.listed("media", whole(t, 1, Reach::Directory));
        // A listing of the directory alone answers for its own names only.
        assert_eq!(w.answered("media/ab", true, TTL, secs(t, 6)), None);
        assert_eq!(
            w.answered("media", true, TTL, secs(t, 6)),
            Some(("media".to_string(), Reach::Directory))
        );
        w.listed("media", Listed::TooLarge { began: secs(t, 7) });
        for _ in 0..10 {
            assert_eq!(w.asked("media", TTL, secs(t, 20)), None, "too large");
        }
        // Asks in as many other directories as are counted do not make it forget...
        let others = |w: &mut WarmDirs, at| {
            for i in 0..2 * DIRS_KEPT {
                w.asked(&format!("media/{i:04x}"), TTL, at);
            }
        };
        others(&mut w, secs(t, 21));
        for _ in 0..10 {
            assert_eq!(w.asked("media", TTL, secs(t, 22)), None, "still too large");
        }
        // ...for a while: then it is tried again, from its subtree.
        let later = secs(t, 7 + 10 * u64::from(RELEARN));
        others(&mut w, later);
        let asks = (0..3)
            .map(|_| w.asked("media", TTL, later))
            .collect::<Vec<_>>();
        assert_eq!(asks, [None, None, Some(Reach::Subtree)]);
    }

    #[test]
    fn a_listing_of_the_directory_alone_that_spared_nothing_rests() {
        let mut w = WarmDirs::default();
        let t = Instant::now();
        let asks = |w: &mut WarmDirs, at| (0..6).find(|_| w.asked("media", TTL, at).is_some());
        assert_eq!(asks(&mut w, t), Some(2));
        w.listed("media", whole(t, 3, Reach::Directory));
        // Every answer is a subdirectory, looked into next: not made again.
        for s in 5..10 {
            assert_eq!(w.answered("media", false, TTL, secs(t, s)), None);
        }
        assert_eq!(asks(&mut w, secs(t, 11)), None, "resting");
        assert_eq!(asks(&mut w, secs(t, 100)), None, "resting");
        assert_eq!(
            asks(&mut w, secs(t, 111)),
            Some(3),
            "rested, ten TTLs after it expired"
        );
    }

    #[test]
    fn a_failed_refresh_is_tried_again_once_the_listing_paid_again() {
        let mut w = WarmDirs::default();
        let t = Instant::now();
        w.asked("media", TTL, t);
        w.listed("media", whole(t, 2, Reach::Subtree));
        assert_eq!(w.answered("media", true, TTL, secs(t, 6)), None);
        assert!(w.answered("media", true, TTL, secs(t, 6)).is_some());
        w.listed("media", Listed::Failed);
        assert_eq!(
            w.answered("media", true, TTL, secs(t, 7)),
            None,
            "not at once"
        );
        assert!(w.answered("media", true, TTL, secs(t, 7)).is_some());
    }

    #[test]
    fn a_failed_listing_is_tried_again_after_as_many_asks() {
        let mut w = WarmDirs::default();
        let t = Instant::now();
        let asks = |w: &mut WarmDirs| (0..20).find(|_| w.asked("media", TTL, t).is_some());
        assert_eq!(asks(&mut w), Some(2));
        w.listed("media", Listed::Failed);
        assert_eq!(asks(&mut w), Some(2));
    }
}
