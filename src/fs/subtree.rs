//! Listings of a whole subtree from one flat LIST: the keys under a directory come back
//! sorted, 1000 a request whatever their depth, and the keys under any one directory are
//! contiguous in that order. So once the listing has gone past a directory's keys, that
//! directory's listing is complete, and a walk (`find`, `du`, `rm -rf`) of a tree of many
//! small directories costs one request per 1000 keys instead of one per directory.

use std::collections::HashMap;
use std::time::SystemTime;

use super::inode::{Kind, Remote};
use super::names;
use crate::store::ObjectMeta;

/// A directory whose keys are still arriving.
struct Open {
    path: String,
    names: HashMap<String, Remote>,
}

/// Builds the complete listings of a directory and every directory below it from the pages
/// of a flat (undelimited) LIST of its key prefix, fed in order.
pub struct Subtree {
    /// Key prefix of the subtree's root, ending in `/` (or the mount prefix for the root).
    prefix: String,
    /// The root and the directories below it that the current key lies in, outermost first.
    open: Vec<Open>,
    done: Vec<(String, Vec<(String, Remote)>)>,
    /// The root had at least one key under it.
    exists: bool,
    mount_time: SystemTime,
    /// Keys that were skipped because no path can show them.
    skipped: Vec<String>,
}

impl Subtree {
    /// A subtree rooted at mount path `path`, whose keys start with `prefix`.
    pub fn new(path: &str, prefix: &str, mount_time: SystemTime) -> Self {
        Subtree {
            prefix: prefix.to_string(),
            open: vec![Open {
                path: path.to_string(),
                names: HashMap::new(),
            }],
            done: Vec::new(),
            exists: false,
            mount_time,
            skipped: Vec::new(),
        }
    }

    /// Takes the next keys of the listing, in the store's (sorted) order. Keys outside the
    /// prefix (a store that ignores it) are skipped.
    pub fn feed<'a>(&mut self, objects: impl IntoIterator<Item = &'a ObjectMeta>) {
        for o in objects {
            let Some(rel) = o.key.strip_prefix(self.prefix.as_str()) else {
                self.skipped.push(o.key.clone());
                continue;
            };
            self.exists = true;
            if !rel.is_empty() {
                // (An empty rest is the root's own marker.)
                self.add(rel, o);
            }
        }
    }

    fn add(&mut self, rel: &str, o: &ObjectMeta) {
        // A key ending in `/` is a directory marker: every part names a directory.
        let (dirs, file) = match rel.strip_suffix('/') {
            Some(d) => (Some(d), None),
            None => match rel.rfind('/') {
                Some(i) => (Some(&rel[..i]), Some(&rel[i + 1..])),
                None => (None, Some(rel)),
            },
        };
        let parts: Vec<&str> = dirs.map(|d| d.split('/').collect()).unwrap_or_default();
        // How many of the directories on the way can be shown as paths.
        let shown = parts.iter().take_while(|p| names::listable(p)).count();
        if shown < parts.len() || file.is_some_and(|f| !names::listable(f)) {
            self.skipped.push(o.key.clone());
        }
        // Close the directories this key is not under: their keys are all seen.
        let mut depth = 1;
        while depth < self.open.len()
            && depth <= shown
            && names::split(&self.open[depth].path).1 == parts[depth - 1]
        {
            depth += 1;
        }
        while self.open.len() > depth {
            self.close_last();
        }
        for (i, part) in parts.iter().take(shown).enumerate() {
            let is_marker = file.is_none() && i + 1 == parts.len();
            let mtime = if is_marker {
                o.last_modified
            } else {
                self.mount_time
            };
            let dir = &mut self.open[i].names;
            // A directory wins over a file of the same name; a marker's date is kept.
            match dir.get(*part) {
                Some(r) if r.kind == Kind::Dir && !is_marker => {}
                _ => {
                    dir.insert(
                        part.to_string(),
                        Remote {
                            kind: Kind::Dir,
                            size: 0,
                            mtime,
                            etag: None,
                        },
                    );
                }
            }
            if self.open.len() == i + 1 {
                let path = names::join(&self.open[i].path, part);
                self.open.push(Open {
                    path,
                    names: HashMap::new(),
                });
            }
        }
        if let Some(name) = file.filter(|f| shown == parts.len() && names::listable(f)) {
            let dir = &mut self.open[shown].names;
            if !dir.get(name).is_some_and(|r| r.kind == Kind::Dir) {
                dir.insert(name.to_string(), Remote::file(o));
            }
        }
    }

    fn close_last(&mut self) {
        if let Some(d) = self.open.pop() {
            self.done.push((d.path, d.names.into_iter().collect()));
        }
    }

    /// The listings known complete so far, taken out.
    pub fn take_complete(&mut self) -> Vec<(String, Vec<(String, Remote)>)> {
        std::mem::take(&mut self.done)
    }

    /// The listing has reached its end, or gone past the subtree's keys: every directory
    /// still open is complete too.
    pub fn finish(&mut self) {
        while !self.open.is_empty() {
            self.close_last();
        }
    }

    /// Whether any key lay under the subtree's root.
    pub fn exists(&self) -> bool {
        self.exists
    }

    /// Keys that were left out, to be logged once each.
    pub fn take_skipped(&mut self) -> Vec<String> {
        std::mem::take(&mut self.skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ETag;

    fn meta(key: &str, size: u64) -> ObjectMeta {
        ObjectMeta {
            key: key.to_string(),
            size,
            etag: Some(ETag::new("\"e\"")),
            last_modified: SystemTime::UNIX_EPOCH,
        }
    }

    fn listing(
        done: &[(String, Vec<(String, Remote)>)],
        dir: &str,
    ) -> Option<Vec<(String, Kind, u64)>> {
        let (_, names) = done.iter().find(|(p, _)| p == dir)?;
        let mut v: Vec<_> = names
            .iter()
            .map(|(n, r)| (n.clone(), r.kind, r.size))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Some(v)
    }

    #[test]
    fn a_flat_listing_fills_every_directory_below_and_closes_them_in_order() {
        let mut t = Subtree::new("m", "p/m/", SystemTime::UNIX_EPOCH);
        let mut keys = [
            "p/m/a/b/1",
            "p/m/a/b/2",
            "p/m/a/b.txt",
            "p/m/a/c/",
            "p/m/a/c/d/3",
            "p/m/z",
        ];
        keys.sort();
        let metas: Vec<ObjectMeta> = keys.iter().map(|k| meta(k, 7)).collect();
        t.feed(&metas[..3]);
        // "a/b.txt" sorts before "a/b/": nothing is closed yet but what the keys left behind.
        t.feed(&metas[3..]);
        let early = t.take_complete();
        assert!(listing(&early, "m/a/b").is_some());
        assert!(listing(&early, "m/a").is_some(), "left behind by m/z");
        assert!(listing(&early, "m").is_none(), "the root is still open");
        t.finish();
        let mut all = early;
        all.extend(t.take_complete());
        assert_eq!(
            listing(&all, "m").unwrap(),
            vec![("a".into(), Kind::Dir, 0), ("z".into(), Kind::File, 7)]
        );
        assert_eq!(
            listing(&all, "m/a").unwrap(),
            vec![
                ("b".into(), Kind::Dir, 0),
                ("b.txt".into(), Kind::File, 7),
                ("c".into(), Kind::Dir, 0)
            ]
        );
        assert_eq!(
            listing(&all, "m/a/c").unwrap(),
            vec![("d".into(), Kind::Dir, 0)]
        );
        assert_eq!(
            listing(&all, "m/a/c/d").unwrap(),
            vec![("3".into(), Kind::File, 7)]
        );
        assert!(t.exists());
    }

    #[test]
    fn hostile_keys_are_skipped_never_shown_twice_and_never_panic() {
        let mut t = Subtree::new("", "pre/", SystemTime::UNIX_EPOCH);
        let metas: Vec<ObjectMeta> = [
            "elsewhere/x",
            "pr",
            "pre/a",
            "pre/a/",
            "pre/a/x",
            "pre/a//y",
            "pre/b/../c",
            "pre/é/ü",
        ]
        .iter()
        .map(|k| meta(k, 1))
        .collect();
        t.feed(&metas);
        t.finish();
        let all = t.take_complete();
        // `a` is both a file and a directory: the directory wins, once.
        assert_eq!(
            listing(&all, "").unwrap(),
            vec![
                ("a".into(), Kind::Dir, 0),
                ("b".into(), Kind::Dir, 0),
                ("é".into(), Kind::Dir, 0)
            ]
        );
        assert_eq!(
            listing(&all, "a").unwrap(),
            vec![("x".into(), Kind::File, 1)]
        );
        assert_eq!(listing(&all, "b").unwrap(), vec![]);
        assert_eq!(
            listing(&all, "é").unwrap(),
            vec![("ü".into(), Kind::File, 1)]
        );
        let skipped = t.take_skipped();
        for k in ["elsewhere/x", "pr", "pre/a//y", "pre/b/../c"] {
            assert!(skipped.iter().any(|s| s == k), "{k} not skipped");
        }
    }

    #[test]
    fn an_empty_name_right_under_the_root_is_skipped() {
        let mut t = Subtree::new("bad", "pre/bad/", SystemTime::UNIX_EPOCH);
        t.feed(&[meta("pre/bad//double", 1), meta("pre/bad//", 0)]);
        t.finish();
        assert_eq!(listing(&t.take_complete(), "bad").unwrap(), vec![]);
        assert_eq!(t.take_skipped().len(), 2);
    }

    #[test]
    fn an_empty_listing_leaves_an_empty_complete_root() {
        let mut t = Subtree::new("d", "d/", SystemTime::UNIX_EPOCH);
        t.feed(&[]);
        t.finish();
        assert!(!t.exists());
        assert_eq!(listing(&t.take_complete(), "d").unwrap(), vec![]);
        // A directory that holds only its marker exists, and is empty.
        let mut t = Subtree::new("d", "d/", SystemTime::UNIX_EPOCH);
        t.feed(&[meta("d/", 0)]);
        t.finish();
        assert!(t.exists());
        assert!(t.take_skipped().is_empty());
        assert_eq!(listing(&t.take_complete(), "d").unwrap(), vec![]);
    }
}
