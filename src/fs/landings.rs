//! When this mount's changes last reached the bucket, by key and by every directory prefix
//! above a created key, as the write-back queue reports them: a listing made before a change
//! landed is not believed about that name, nor (for a created key) about its directory.

use std::time::Instant;

/// Most keys and directory prefixes whose last landing is remembered.
const LANDINGS_KEPT: usize = 65_536;

/// When changes last reached the bucket, by key and by every directory prefix above it, so
/// that a listing made before a change landed is not believed about that name.
pub struct Landings {
    at: lru::LruCache<String, Instant>,
    /// Landings before this instant may have been forgotten.
    forgot_before: Option<Instant>,
}

impl Default for Landings {
    fn default() -> Self {
        Landings {
            at: lru::LruCache::unbounded(),
            forgot_before: None,
        }
    }
}

impl Landings {
    /// Dates the landing of a change of `key`; a change that creates a key (an upload or a
    /// marker) also dates every directory above it, whose listings may now lack a name.
    pub fn record(&mut self, key: &str, creates: bool, now: Instant) {
        let mut k = key;
        loop {
            self.at.put(k.to_string(), now);
            if !creates {
                break;
            }
            // The parent directory's prefix, with its slash.
            let Some(i) = k.trim_end_matches('/').rfind('/') else {
                break;
            };
            k = &k[..=i];
        }
        while self.at.len() > LANDINGS_KEPT {
            if let Some((_, t)) = self.at.pop_lru() {
                self.forgot_before = Some(self.forgot_before.map_or(t, |f| f.max(t)));
            }
        }
    }

    /// The latest instant at or after which `keys` may have changed by this mount's doing:
    /// a listing begun at or before it is out of date about them.
    pub fn newest(&self, keys: &[&str]) -> Option<Instant> {
        keys.iter()
            .filter_map(|k| self.at.peek(*k).copied())
            .chain(self.forgot_before)
            .max()
    }

    pub fn since(&self, key: &str, since: Instant) -> bool {
        self.at.peek(key).is_some_and(|t| *t >= since)
            || self.forgot_before.is_some_and(|f| since <= f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_landing_dates_its_key_and_every_directory_above_it() {
        let mut l = Landings::default();
        let before = Instant::now();
        l.record("pre/a/b/file", true, Instant::now());
        let after = Instant::now();
        for key in ["pre/a/b/file", "pre/a/b/", "pre/a/", "pre/"] {
            assert!(l.since(key, before), "{key}");
            assert!(!l.since(key, after), "{key}");
        }
        assert!(!l.since("pre/a/b/other", before));
        assert!(!l.since("pre/a/bb/", before));
        l.record("pre/c/", true, Instant::now());
        assert!(l.since("pre/c/", after) && l.since("pre/", after));
        // A delete dates only its key: no listing can lack a name because of it.
        let after_c = Instant::now();
        l.record("pre/d/gone", false, Instant::now());
        assert!(l.since("pre/d/gone", after_c));
        assert!(!l.since("pre/d/", after_c) && !l.since("pre/", after_c));
    }

    #[test]
    fn forgotten_landings_make_older_listings_doubtful() {
        let mut l = Landings::default();
        let start = Instant::now();
        for i in 0..LANDINGS_KEPT {
            l.record(&format!("k{i}"), true, Instant::now());
        }
        assert!(l.forgot_before.is_none());
        l.record("one-more", true, Instant::now());
        // k0 is forgotten: anything older than its landing may be out of date.
        assert!(l.since("k0", start));
        assert!(!l.since("k0", Instant::now()));
    }
}
