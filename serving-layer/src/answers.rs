//! Rendered answers kept for the state they were computed from.
//!
//! An answer is a function of the request, the loaded batch version, the speed state and, for
//! some routes (windows ending now, device status by age), the wall clock. So it is kept under
//! the [`StateId`] it was computed from (batch version and the speed database's sequence number,
//! which every speed write, or a follower catching up, moves); an answer that reads the clock is
//! kept with the second it was computed in, and only for requests in that same second. The first
//! request after the state moves computes afresh; every other request of the same URL gets the
//! same bytes, without reading RocksDB or waiting for a turn on the blocking pool. Answers are
//! therefore exactly as fresh as uncached ones, and clock-dependent parts at most a second older.
//! The one clock-dependent part of every answer, `as_of.speed.age_ms`, is written into the
//! bytes as each answer goes out (see [`Answer`]), so it is always the age at that moment.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};

use bytes::Bytes;
use serde_json::Value;
use strata_common::time::{now_millis, parse_rfc3339, Millis};

use crate::state::{PerState, StateId};

/// A rendered answer: its JSON, and where in it the age of the speed state goes.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    body: Bytes,
    /// The span of a placeholder for `as_of.speed.age_ms`, and when the speed state was written.
    age: Option<(usize, usize, Millis)>,
}

impl Answer {
    /// Renders `value`, leaving a placeholder for `as_of.speed.age_ms` when it has one.
    pub fn render(mut value: Value) -> serde_json::Result<Self> {
        let updated_at = value
            .pointer("/as_of/speed/updated_at")
            .and_then(Value::as_str)
            .and_then(parse_rfc3339);
        let token = age_token();
        let slot = match (updated_at, value.pointer_mut("/as_of/speed/age_ms")) {
            (Some(t), Some(age)) => {
                *age = Value::String(token.clone());
                Some(t)
            }
            _ => None,
        };
        let body = serde_json::to_vec(&value)?;
        let quoted = format!("\"{token}\"");
        let age = slot.and_then(|t| {
            let at = body
                .windows(quoted.len())
                .position(|w| w == quoted.as_bytes())?;
            Some((at, at + quoted.len(), t))
        });
        Ok(Answer {
            body: Bytes::from(body),
            age,
        })
    }

    /// The bytes to send now: the age of the speed state as of this moment.
    pub fn body(&self) -> Bytes {
        let Some((from, to, updated_at)) = self.age else {
            return self.body.clone();
        };
        let age = (now_millis() - updated_at).max(0).to_string();
        let mut out = Vec::with_capacity(self.body.len() + age.len());
        out.extend_from_slice(&self.body[..from]);
        out.extend_from_slice(age.as_bytes());
        out.extend_from_slice(&self.body[to..]);
        Bytes::from(out)
    }
}

/// A placeholder no answer's own text can hold: random per process.
fn age_token() -> String {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN
        .get_or_init(|| {
            let random = |n: u64| {
                let mut h = RandomState::new().build_hasher();
                h.write_u64(n);
                h.finish()
            };
            format!("age-{:016x}{:016x}", random(1), random(2))
        })
        .clone()
}

/// Bytes of kept answers at most (URLs and bodies), whatever the number of entries.
pub const MAX_KEPT_BYTES: usize = 64 << 20;

/// The answers of one tag: a new tag drops them all.
pub struct Answers {
    max_entries: usize,
    kept: RwLock<PerState<Kept>>,
    hits: AtomicU64,
    computed: AtomicU64,
}

#[derive(Default)]
struct Kept {
    /// The answer to a URL, with the second it was computed in if it read the clock.
    by_url: HashMap<String, (Option<i64>, Answer)>,
    /// Bytes of the URLs and bodies held.
    bytes: usize,
}

impl Answers {
    /// Keeps up to `max_entries` answers of the current tag; 0 keeps none.
    pub fn new(max_entries: usize) -> Self {
        Answers {
            max_entries,
            kept: RwLock::new(PerState::default()),
            hits: AtomicU64::new(0),
            computed: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    /// The body to send now of the answer to `url` computed at `tag` (and, for one that reads
    /// the clock, in `second`), if kept.
    pub fn get(&self, tag: StateId, url: &str, second: Option<i64>) -> Option<Bytes> {
        if !self.enabled() {
            return None;
        }
        let kept = self.kept.read().unwrap_or_else(|e| e.into_inner());
        let found = kept
            .at(tag)
            .and_then(|k| k.by_url.get(url))
            .filter(|(at, _)| *at == second)
            .map(|(_, answer)| answer.body());
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
    pub fn put(&self, tag: StateId, url: &str, second: Option<i64>, answer: Answer) {
        if !self.enabled() {
            return;
        }
        let mut kept = self.kept.write().unwrap_or_else(|e| e.into_inner());
        let Some(kept) = kept.for_state(tag) else {
            return;
        };
        let size = url.len() + answer.body.len();
        let replaced = kept.by_url.get(url).map(|(_, a)| url.len() + a.body.len());
        let fits = kept.bytes - replaced.unwrap_or(0) + size <= MAX_KEPT_BYTES;
        if fits && (replaced.is_some() || kept.by_url.len() < self.max_entries) {
            kept.bytes = kept.bytes - replaced.unwrap_or(0) + size;
            kept.by_url.insert(url.to_owned(), (second, answer));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Answer {
        Answer::render(serde_json::from_str(text).expect("json")).expect("render")
    }

    fn tag(batch: u64, seq: u64) -> StateId {
        StateId {
            batch_version: Some(batch),
            speed_sequence: Some(seq),
        }
    }

    #[test]
    fn answers_are_kept_for_their_tag_and_second_only() {
        let a = Answers::new(10);
        let t = tag(1, 7);
        assert_eq!(a.get(t, "/v1/items/i1", None), None);
        a.put(t, "/v1/items/i1", None, json(r#"{"n":"one"}"#));
        a.put(t, "/v1/devices/health", Some(100), json(r#"{"n":"fleet"}"#));
        assert_eq!(
            a.get(t, "/v1/items/i1", None),
            Some(Bytes::from_static(br#"{"n":"one"}"#))
        );
        assert_eq!(a.get(t, "/v1/items/i2", None), None);
        for moved in [tag(2, 7), tag(1, 8)] {
            assert_eq!(a.get(moved, "/v1/items/i1", None), None, "{moved:?}");
        }
        let fleet = |second| a.get(t, "/v1/devices/health", Some(second));
        assert_eq!(fleet(100), Some(Bytes::from_static(br#"{"n":"fleet"}"#)));
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
        a.put(tag(1, 7), "/a", None, json(r#"{"n":"old"}"#));
        a.put(tag(1, 9), "/b", None, json(r#"{"n":"new"}"#));
        assert_eq!(a.get(tag(1, 7), "/a", None), None);
        // A slow request of the older state finishing late keeps nothing.
        a.put(tag(1, 7), "/a", None, json(r#"{"n":"old"}"#));
        assert_eq!(a.get(tag(1, 7), "/a", None), None);
        assert_eq!(
            a.get(tag(1, 9), "/b", None),
            Some(Bytes::from_static(br#"{"n":"new"}"#))
        );
    }

    #[test]
    fn the_age_of_the_speed_state_is_written_as_the_answer_goes_out() {
        let updated = now_millis() - 5_000;
        let value = serde_json::json!({
            "item": "\"age_ms\":",
            "as_of": {"speed": {"updated_at": strata_common::time::format_rfc3339(updated), "age_ms": 1}},
        });
        let answer = Answer::render(value.clone()).expect("render");
        let sent: Value = serde_json::from_slice(&answer.body()).expect("json");
        let age = sent["as_of"]["speed"]["age_ms"].as_i64().expect("age");
        assert!((5_000..60_000).contains(&age), "{sent}");
        let mut expected = value;
        expected["as_of"]["speed"]["age_ms"] = age.into();
        assert_eq!(sent, expected, "everything else as rendered");
        // No speed state: nothing to write.
        let none = serde_json::json!({"as_of": {"speed": {"updated_at": null, "age_ms": null}}});
        let answer = Answer::render(none.clone()).expect("render");
        assert_eq!(
            serde_json::from_slice::<Value>(&answer.body()).expect("json"),
            none
        );
    }

    #[test]
    fn bounded_in_entries_and_off_at_zero() {
        let a = Answers::new(2);
        let t = tag(0, 0);
        for url in ["/1", "/2", "/3"] {
            a.put(t, url, None, json(r#"{"n":"x"}"#));
        }
        assert!(a.get(t, "/1", None).is_some() && a.get(t, "/2", None).is_some());
        assert_eq!(a.get(t, "/3", None), None);
        // Bounded in bytes too.
        let big = Answers::new(10);
        let body = serde_json::json!({ "n": "x".repeat(MAX_KEPT_BYTES / 3) });
        for url in ["/1", "/2", "/3"] {
            big.put(t, url, None, Answer::render(body.clone()).expect("render"));
        }
        assert!(big.get(t, "/2", None).is_some());
        assert_eq!(big.get(t, "/3", None), None);
        // Replacing an entry frees its bytes first.
        big.put(t, "/2", None, json(r#"{"n":"small"}"#));
        big.put(t, "/3", None, Answer::render(body).expect("render"));
        assert!(big.get(t, "/3", None).is_some());
        let off = Answers::new(0);
        off.put(t, "/1", None, json(r#"{"n":"x"}"#));
        assert_eq!(off.get(t, "/1", None), None);
        assert_eq!(off.counts(), (0, 0));
    }
}
