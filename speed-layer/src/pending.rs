//! What the speed layer has folded since its last flush.

use std::collections::{BTreeMap, BTreeSet};

use strata_common::event::Event;
use strata_common::handoff::Partition;
use strata_common::time::Millis;
use strata_common::views::{fold_into, FastMap, Partial, ViewKey};

/// Deltas of one flush: partials per (partition, block) and view key, ids newly remembered by
/// the dedupe rule, and which partitions moved.
#[derive(Default)]
pub struct Pending {
    /// One map per block: an event's contributions look their block up once, and a flush
    /// drains each map into its block's values (keeping the map's room for the next flush).
    pub deltas: BTreeMap<(Partition, u64), FastMap<ViewKey, Partial>>,
    /// Per partition, ids newly remembered and their expiry.
    pub remembered: BTreeMap<Partition, FastMap<String, Millis>>,
    pub touched: BTreeSet<Partition>,
    pub messages: usize,
}

impl Pending {
    /// Folds a counted event into the block it belongs to.
    pub fn fold(&mut self, partition: Partition, block: u64, event: &Event) {
        fold_into(self.deltas.entry((partition, block)).or_default(), event);
    }

    /// Remembers an id until `expiry` (written with the next flush).
    pub fn remember(&mut self, p: Partition, id: String, expiry: Millis) {
        self.remembered.entry(p).or_default().insert(id, expiry);
    }

    /// The expiry of an id remembered since the last flush.
    pub fn remembered(&self, p: Partition, id: &str) -> Option<Millis> {
        self.remembered.get(&p)?.get(id).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0 && self.touched.is_empty()
    }

    /// Drops the (drained) maps of partition `p`'s blocks before `live`.
    pub fn forget_before(&mut self, p: Partition, live: u64) {
        self.deltas
            .retain(|&(q, block), m| q != p || block >= live || !m.is_empty());
    }
}
