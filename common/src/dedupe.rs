//! Which events count: the idempotency rule, one definition for both layers.
//!
//! Copies of an event share its `id` and its Kafka key, so they land in one partition. Within a
//! partition, in offset order, the rule is:
//!
//! - the partition's watermark `W` is the largest event time of any valid event so far;
//! - an event whose id was counted earlier, while `W` has not yet passed that first count's time
//!   plus the horizon, is a duplicate and is not counted;
//! - otherwise it counts, and its id is remembered until the watermark passes `W + horizon`.
//!
//! The decision depends only on the partition's messages before it, so the batch layer (scanning
//! the master dataset) and the speed layer (consuming live, across restarts) make the same
//! decision for every message. Remembered ids whose expiry the watermark has passed can never match
//! again, so dropping them from storage at any time changes nothing.

use std::collections::hash_map::Entry;

use crate::time::Millis;
use crate::views::{FastMap, Name};

/// The rule's one parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dedupe {
    pub horizon_ms: Millis,
}

/// The outcome for one valid event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Count the event and remember its id until the watermark passes `expiry`.
    Count { expiry: Millis },
    /// A copy of an event already counted.
    Duplicate,
}

/// The watermark of a partition before its first event.
pub const START_WATERMARK: Millis = Millis::MIN;

impl Dedupe {
    pub fn new(horizon_ms: Millis) -> Self {
        Dedupe { horizon_ms }
    }

    /// Decides one event at time `ts`, given the expiry remembered for its id (if any), and
    /// advances the partition's watermark.
    pub fn decide(
        &self,
        watermark: &mut Millis,
        remembered: Option<Millis>,
        ts: Millis,
    ) -> Decision {
        *watermark = (*watermark).max(ts);
        match remembered {
            Some(expiry) if expiry >= *watermark => Decision::Duplicate,
            _ => Decision::Count {
                expiry: watermark.saturating_add(self.horizon_ms),
            },
        }
    }
}

/// The rule run in memory over one partition, as the batch layer and tests use it.
#[derive(Debug)]
pub struct PartitionDeduper {
    rule: Dedupe,
    watermark: Millis,
    /// Ids are short as a rule, so most are stored inline, with no allocation of their own.
    seen: FastMap<Name, Millis>,
    /// Size at which expired ids are next swept out.
    sweep_at: usize,
}

impl PartitionDeduper {
    pub fn new(rule: Dedupe) -> Self {
        PartitionDeduper {
            rule,
            watermark: START_WATERMARK,
            seen: FastMap::default(),
            sweep_at: 1 << 16,
        }
    }

    /// Whether the event with this id and time counts. Call in offset order.
    pub fn admit(&mut self, id: &str, ts: Millis) -> bool {
        // One probe of the map: the id's entry is read, then updated in place if it counts.
        let entry = self.seen.entry(Name::from(id));
        let remembered = match &entry {
            Entry::Occupied(e) => Some(*e.get()),
            Entry::Vacant(_) => None,
        };
        let counted = match self.rule.decide(&mut self.watermark, remembered, ts) {
            Decision::Count { expiry } => {
                entry.insert_entry(expiry);
                true
            }
            Decision::Duplicate => false,
        };
        if counted && self.seen.len() >= self.sweep_at {
            let w = self.watermark;
            self.seen.retain(|_, e| *e >= w);
            self.sweep_at = (self.seen.len() * 2).max(1 << 16);
        }
        counted
    }

    pub fn watermark(&self) -> Millis {
        self.watermark
    }

    /// The rule's state after the events admitted so far: the watermark and every id still
    /// remembered (expired ones can never match again, so they are left out), in id order.
    /// [`PartitionDeduper::resume`] continues from it with the same decisions.
    pub fn encode_state(&self) -> Vec<u8> {
        let mut ids: Vec<(&str, Millis)> = self
            .seen
            .iter()
            .filter(|(_, &e)| e >= self.watermark)
            .map(|(k, &e)| (k.as_str(), e))
            .collect();
        ids.sort_unstable();
        postcard::to_stdvec(&(self.watermark, ids)).unwrap_or_default()
    }

    /// The rule continued from a state [`PartitionDeduper::encode_state`] wrote; `None` if the
    /// bytes are not one.
    pub fn resume(rule: Dedupe, state: &[u8]) -> Option<PartitionDeduper> {
        let (watermark, ids) = decode_state(state)?;
        let seen: FastMap<Name, Millis> = ids.into_iter().collect();
        Some(PartitionDeduper {
            rule,
            watermark,
            sweep_at: (seen.len() * 2).max(1 << 16),
            seen,
        })
    }
}

/// The watermark and the remembered ids (with their expiries) of a state
/// [`PartitionDeduper::encode_state`] wrote; `None` if the bytes are not one.
pub fn decode_state(state: &[u8]) -> Option<(Millis, Vec<(Name, Millis)>)> {
    postcard::from_bytes(state).ok()
}

const HANDOVER: &[u8; 4] = b"SDH1";

impl PartitionDeduper {
    /// The rule's state for a speed layer taking the partition over: the watermark and every id
    /// still remembered, as [`decode_handover`] reads it. Unlike [`PartitionDeduper::encode_state`]
    /// the ids are in the map's order, not sorted: this runs for every partition of every batch
    /// version, and sorting was most of its cost.
    pub fn encode_handover(&self) -> Vec<u8> {
        let w = self.watermark;
        let live = self.seen.iter().filter(|(_, &e)| e >= w);
        let size: usize = live.clone().map(|(k, _)| 12 + k.len()).sum();
        let mut out = Vec::with_capacity(16 + size);
        out.extend_from_slice(HANDOVER);
        out.extend_from_slice(&w.to_le_bytes());
        for (k, &e) in live {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&e.to_le_bytes());
        }
        out
    }
}

/// The watermark and remembered ids of [`PartitionDeduper::encode_handover`]'s form; `None` if
/// the bytes are not one.
pub fn decode_handover(bytes: &[u8]) -> Option<(Millis, Vec<(Name, Millis)>)> {
    let rest = bytes.strip_prefix(HANDOVER)?;
    let watermark = Millis::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let mut rest = &rest[8..];
    let mut ids = Vec::new();
    while !rest.is_empty() {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let id = std::str::from_utf8(rest.get(4..4 + len)?).ok()?;
        let expiry = Millis::from_le_bytes(rest.get(4 + len..12 + len)?.try_into().ok()?);
        ids.push((Name::from(id), expiry));
        rest = &rest[12 + len..];
    }
    Some((watermark, ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Millis = 24 * 3600 * 1000;

    #[test]
    fn a_handover_holds_the_watermark_and_the_live_ids() {
        let rule = Dedupe::new(H);
        let mut d = PartitionDeduper::new(rule);
        for n in 0..5_000i64 {
            d.admit(&format!("e{}", n % 3_000), n * 60_000);
        }
        let (w, mut ids) = decode_handover(&d.encode_handover()).expect("decodes");
        let (want_w, mut want) = decode_state(&d.encode_state()).expect("decodes");
        ids.sort();
        want.sort();
        assert_eq!((w, ids), (want_w, want));
        let bytes = d.encode_handover();
        assert!(
            decode_handover(&bytes[..bytes.len() - 3]).is_none(),
            "cut short"
        );
        assert!(decode_handover(b"nope").is_none());
    }

    #[test]
    fn a_resumed_state_decides_as_the_whole_run_would() {
        let rule = Dedupe::new(H);
        let events: Vec<(String, Millis)> = (0..4_000)
            .map(|n: i64| (format!("e{}", n % 1_300), n * 37_000 + (n % 7) * 900_000))
            .collect();
        let mut whole = PartitionDeduper::new(rule);
        let expected: Vec<bool> = events.iter().map(|(id, ts)| whole.admit(id, *ts)).collect();
        for cut in [0, 1, 999, 2_500, 4_000] {
            let mut first = PartitionDeduper::new(rule);
            let mut got: Vec<bool> = events[..cut]
                .iter()
                .map(|(id, ts)| first.admit(id, *ts))
                .collect();
            let mut rest = PartitionDeduper::resume(rule, &first.encode_state()).expect("state");
            got.extend(events[cut..].iter().map(|(id, ts)| rest.admit(id, *ts)));
            assert_eq!(got, expected, "cut at {cut}");
        }
        assert!(PartitionDeduper::resume(rule, b"\xff\xff").is_none());
    }

    #[test]
    fn copies_within_horizon_count_once() {
        let mut d = PartitionDeduper::new(Dedupe::new(H));
        assert!(d.admit("a", 1_000));
        assert!(!d.admit("a", 1_000));
        assert!(d.admit("b", 500));
        assert!(!d.admit("b", 500), "a late copy is still a copy");
        assert!(d.admit("c", 1_000 + H));
        assert!(
            !d.admit("a", 1_000),
            "watermark 1000+H has not passed a's expiry 1000+H"
        );
        assert!(d.admit("d", 1_001 + H));
        assert!(
            d.admit("a", 1_000),
            "forgotten once the watermark passed its expiry"
        );
        assert!(!d.admit("a", 1_000));
    }
}
