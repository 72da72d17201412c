//! Listing ahead of a tree walk. When `find`, `du` or `ls -R` has read a directory with no
//! subdirectories, and its parent was listed moments ago, the walker is about to go on to
//! the next sibling directories: those are listed in the background, several at once, into
//! the listing cache, and when the walker reaches them its `readdir` and lookups are
//! answered from memory. A walk then waits on a few concurrent LISTs instead of one LIST
//! after another. Only after a leaf, so that what is listed ahead is used within moments
//! (a sibling after a large subtree would be stale by the time the walker got there). A
//! lone `ls` or a lookup lists nothing extra.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use tokio::sync::{watch, Semaphore};

use super::inode::{Kind, Remote};
use super::listing::ListingCache;
use super::names::{self, KeyMap};
use crate::store::{ListPage, ObjectStore};

/// How many sibling subdirectories past the one being entered are listed ahead.
const WINDOW: usize = 8;
/// How many of those LISTs run at once, across the whole mount.
const CONCURRENCY: usize = 8;
/// Directories with more names than this are not searched for the next siblings.
const MAX_SEARCHED: usize = 4096;
/// Keys per LIST page.
const PAGE: i32 = 1000;

/// A directory being listed ahead of the walker.
enum Ahead {
    /// Waiting for a free LIST slot; the walker takes it over if it gets there first.
    Queued,
    /// Its LIST is out; becomes true once the listing is recorded (or failed).
    Running(watch::Receiver<bool>),
}

pub struct WalkAhead {
    store: Arc<dyn ObjectStore>,
    keys: KeyMap,
    listing: Arc<ListingCache>,
    mount_time: SystemTime,
    in_flight: Arc<Mutex<HashMap<String, Ahead>>>,
    permits: Arc<Semaphore>,
}

impl WalkAhead {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        keys: KeyMap,
        listing: Arc<ListingCache>,
        mount_time: SystemTime,
    ) -> Self {
        WalkAhead {
            store,
            keys,
            listing,
            mount_time,
            in_flight: Default::default(),
            permits: Arc::new(Semaphore::new(CONCURRENCY)),
        }
    }

    /// Directory `path`, which has no subdirectories, has just been read to its end. If its
    /// parent was listed within the TTL, list the parent's next subdirectories now.
    pub fn after_leaf(&self, path: &str) {
        if path.is_empty() {
            return;
        }
        let (parent, name) = names::split(path);
        for sub in self
            .listing
            .subdirs_after(parent, name, WINDOW, MAX_SEARCHED)
        {
            let dir = names::join(parent, &sub);
            if self.listing.is_fresh(&dir) {
                continue;
            }
            {
                let mut in_flight = self.in_flight.lock();
                if in_flight.contains_key(&dir) {
                    continue;
                }
                in_flight.insert(dir.clone(), Ahead::Queued);
            }
            let (store, listing, in_flight, permits) = (
                self.store.clone(),
                self.listing.clone(),
                self.in_flight.clone(),
                self.permits.clone(),
            );
            let prefix = self.keys.dir_prefix(&dir);
            let mount_time = self.mount_time;
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                let (done_tx, done_rx) = watch::channel(false);
                {
                    let mut in_flight = in_flight.lock();
                    match in_flight.get_mut(&dir) {
                        Some(a @ Ahead::Queued) => *a = Ahead::Running(done_rx),
                        // The walker got there first and lists it itself.
                        _ => return,
                    }
                }
                if !listing.is_fresh(&dir) {
                    let (id, at) = listing.begin();
                    match store.list(&prefix, false, None, Some(PAGE)).await {
                        Ok(page) => {
                            let done = page.next_token.is_none();
                            let entries = entries_of_page(&prefix, &page, mount_time).0;
                            listing.add_page(&dir, id, at, entries);
                            if done {
                                listing.finish(&dir, id);
                            }
                        }
                        Err(e) => {
                            tracing::debug!(prefix, error = %e, "listing ahead of a walk failed; the walker will list it");
                        }
                    }
                }
                in_flight.lock().remove(&dir);
                let _ = done_tx.send(true);
            });
        }
    }
}

impl WalkAhead {
    /// The walker is about to list `path`: if a LIST of it is already out, wait for it
    /// rather than send a second one; if one is only queued, take it over.
    pub async fn wait_for(&self, path: &str) {
        let rx = {
            let mut in_flight = self.in_flight.lock();
            match in_flight.get(path) {
                None => return,
                Some(Ahead::Queued) => {
                    in_flight.remove(path);
                    return;
                }
                Some(Ahead::Running(rx)) => rx.clone(),
            }
        };
        let mut rx = rx;
        let _ = rx.wait_for(|done| *done).await;
    }
}

/// The names one page of a delimited LIST of `prefix` shows, sorted, with the attributes the
/// LIST gives (a file before a directory of the same name); and the keys that cannot be shown
/// as paths, which are left out.
pub fn entries_of_page(
    prefix: &str,
    page: &ListPage,
    mount_time: SystemTime,
) -> (Vec<(String, Remote)>, Vec<String>) {
    let mut found: Vec<(String, Remote)> = Vec::new();
    let mut skipped = Vec::new();
    for o in &page.objects {
        let name = &o.key[prefix.len()..];
        if name.is_empty() {
            continue; // the directory's own marker
        }
        if !names::listable(name) {
            skipped.push(o.key.clone());
            continue;
        }
        found.push((
            name.to_string(),
            Remote {
                kind: Kind::File,
                size: o.size,
                mtime: o.last_modified,
                etag: o.etag.clone(),
            },
        ));
    }
    for p in &page.prefixes {
        let name = &p[prefix.len()..p.len() - 1];
        if !names::listable(name) {
            skipped.push(p.clone());
            continue;
        }
        found.push((
            name.to_string(),
            Remote {
                kind: Kind::Dir,
                size: 0,
                mtime: mount_time,
                etag: None,
            },
        ));
    }
    // Objects and prefixes come in two sorted runs: merge them so `a` and `a/` meet.
    found.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then((a.1.kind == Kind::Dir).cmp(&(b.1.kind == Kind::Dir)))
    });
    (found, skipped)
}
