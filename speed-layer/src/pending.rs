//! What the speed layer has folded since its last flush.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};

use strata_common::event::Event;
use strata_common::handoff::Partition;
use strata_common::time::Millis;
use strata_common::views::{contributions, FastMap, Partial, ViewKey};

/// Deltas of one flush: partials per (partition, block, view key), ids newly remembered by the
/// dedupe rule, and which partitions moved.
#[derive(Default)]
pub struct Pending {
    pub deltas: FastMap<(Partition, u64, ViewKey), Partial>,
    pub remembered: HashMap<(Partition, String), Millis>,
    pub touched: BTreeSet<Partition>,
    pub messages: usize,
}

impl Pending {
    /// Folds a counted event into the block it belongs to.
    pub fn fold(&mut self, partition: Partition, block: u64, event: &Event) {
        contributions(event, |key, partial| {
            match self.deltas.entry((partition, block, key)) {
                Entry::Occupied(mut existing) => existing.get_mut().absorb(partial),
                Entry::Vacant(slot) => {
                    slot.insert(partial);
                }
            }
        });
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0 && self.touched.is_empty()
    }
}
