//! Rendered answers kept for the state they were computed from.
//!
//! An answer is a function of the request, the loaded batch version, the speed state and, for
//! some routes (windows ending now, device status by age), the wall clock. So it is kept under a
//! [`Tag`] of the state: the serving state's generation (moved whenever another batch version or
//! speed reader is put in place) and the speed database's sequence number (moved by every write
//! the speed layer makes, or by a follower catching up); an answer that reads the clock is kept
//! with the second it was computed in, and only for requests in that same second. The first
//! request after the state moves computes afresh; every other request of the same URL gets the
//! same bytes, without reading RocksDB or waiting for a turn on the blocking pool. Answers are
//! therefore exactly as fresh as uncached ones, and clock-dependent parts at most a second older.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use bytes::Bytes;

/// What an answer was computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub generation: u64,
    pub speed_sequence: Option<u64>,
}

/// The answers of one tag: a new tag drops them all.
pub struct Answers {
    max_entries: usize,
    kept: RwLock<Kept>,
    hits: AtomicU64,
    computed: AtomicU64,
}

#[derive(Default)]
struct Kept {
    tag: Option<Tag>,
    /// The answer to a URL, with the second it was computed in if it read the clock.
    by_url: HashMap<String, (Option<i64>, Bytes)>,
}

impl Answers {
    /// Keeps up to `max_entries` answers of the current tag; 0 keeps none.
    pub fn new(max_entries: usize) -> Self {
        Answers {
            max_entries,
            kept: RwLock::new(Kept::default()),
            hits: AtomicU64::new(0),
            computed: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    /// The answer to `url` computed at `tag` (and, for one that reads the clock, in `second`),
    /// if kept.
    pub fn get(&self, tag: Tag, url: &str, second: Option<i64>) -> Option<Bytes> {
        if !self.enabled() {
            return None;
        }
        let kept = self.kept.read().unwrap_or_else(|e| e.into_inner());
        let found = (kept.tag == Some(tag))
            .then(|| kept.by_url.get(url))
            .flatten()
            .filter(|(at, _)| *at == second)
            .map(|(_, body)| body.clone());
        drop(kept);
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Counts an answer computed afresh.
    pub fn computed(&self) {
        self.computed.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps the answer to `url` computed at `tag` (in `second`, if it read the clock). The
    /// caller must have read the same tag and second before and after computing it (so nothing
    /// moved in between).
    pub fn put(&self, tag: Tag, url: &str, second: Option<i64>, body: Bytes) {
        if !self.enabled() {
            return;
        }
        let mut kept = self.kept.write().unwrap_or_else(|e| e.into_inner());
        if kept.tag != Some(tag) {
            // Tags only move forward, but a slow request can finish after a faster one already
            // kept answers of a newer tag: never replace newer answers with older ones.
            if kept.tag.is_some_and(|t| newer(t, tag)) {
                return;
            }
            kept.tag = Some(tag);
            kept.by_url.clear();
        }
        if kept.by_url.len() < self.max_entries || kept.by_url.contains_key(url) {
            kept.by_url.insert(url.to_owned(), (second, body));
        }
    }

    /// Answers served from memory, and answers computed, since start-up.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.computed.load(Ordering::Relaxed),
        )
    }
}

/// Whether `a` is past `b` (each part only grows).
fn newer(a: Tag, b: Tag) -> bool {
    a != b && a.generation >= b.generation && a.speed_sequence >= b.speed_sequence
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(generation: u64, seq: u64) -> Tag {
        Tag {
            generation,
            speed_sequence: Some(seq),
        }
    }

    #[test]
    fn answers_are_kept_for_their_tag_and_second_only() {
        let a = Answers::new(10);
        let t = tag(1, 7);
        assert_eq!(a.get(t, "/v1/items/i1", None), None);
        a.put(t, "/v1/items/i1", None, Bytes::from_static(b"one"));
        a.put(
            t,
            "/v1/devices/health",
            Some(100),
            Bytes::from_static(b"fleet"),
        );
        assert_eq!(a.get(t, "/v1/items/i1", None).as_deref(), Some(&b"one"[..]));
        assert_eq!(a.get(t, "/v1/items/i2", None), None);
        for moved in [tag(2, 7), tag(1, 8)] {
            assert_eq!(a.get(moved, "/v1/items/i1", None), None, "{moved:?}");
        }
        let fleet = |second| a.get(t, "/v1/devices/health", Some(second));
        assert_eq!(fleet(100).as_deref(), Some(&b"fleet"[..]));
        assert_eq!(
            fleet(101),
            None,
            "an answer that read the clock lasts its second"
        );
        a.computed();
        assert_eq!(a.counts(), (2, 1));
    }

    #[test]
    fn a_newer_tag_drops_older_answers_and_is_never_replaced_by_them() {
        let a = Answers::new(10);
        a.put(tag(1, 7), "/a", None, Bytes::from_static(b"old"));
        a.put(tag(1, 9), "/b", None, Bytes::from_static(b"new"));
        assert_eq!(a.get(tag(1, 7), "/a", None), None);
        // A slow request of the older state finishing late keeps nothing.
        a.put(tag(1, 7), "/a", None, Bytes::from_static(b"old"));
        assert_eq!(a.get(tag(1, 7), "/a", None), None);
        assert_eq!(a.get(tag(1, 9), "/b", None).as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn bounded_in_entries_and_off_at_zero() {
        let a = Answers::new(2);
        let t = tag(0, 0);
        for url in ["/1", "/2", "/3"] {
            a.put(t, url, None, Bytes::from_static(b"x"));
        }
        assert!(a.get(t, "/1", None).is_some() && a.get(t, "/2", None).is_some());
        assert_eq!(a.get(t, "/3", None), None);
        let off = Answers::new(0);
        off.put(t, "/1", None, Bytes::from_static(b"x"));
        assert_eq!(off.get(t, "/1", None), None);
        assert_eq!(off.counts(), (0, 0));
    }
}
