//! The partial aggregates: each a monoid under `merge`, with `Default` as identity.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::hll::Hll;
use super::{Monoid, Name};
use crate::time::Millis;

/// All-time totals of one item.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemStats {
    pub views: u64,
    pub carts: u64,
    pub purchases: u64,
    /// Units bought (sum of `qty` over purchases).
    pub quantity: u64,
    /// Sum of `qty * price` over purchases, in millionths.
    pub revenue_micros: i128,
    pub ratings: u64,
    pub rating_sum: u64,
    /// The item's category; if events disagree, the smallest name wins (a deterministic choice).
    pub category: Option<Name>,
}

impl ItemStats {
    /// The count for one wire event type (`view`, `add_to_cart`, `purchase`, `rating`).
    pub fn count(&self, event_type: &str) -> Option<u64> {
        match event_type {
            "view" => Some(self.views),
            "add_to_cart" => Some(self.carts),
            "purchase" => Some(self.purchases),
            "rating" => Some(self.ratings),
            _ => None,
        }
    }

    /// The counts that add up: views, carts, purchases, quantity, ratings, rating sum.
    pub fn counts(&self) -> [u64; 6] {
        [
            self.views,
            self.carts,
            self.purchases,
            self.quantity,
            self.ratings,
            self.rating_sum,
        ]
    }

    pub fn revenue(&self) -> f64 {
        self.revenue_micros as f64 / 1e6
    }
}

impl Monoid for ItemStats {
    fn merge(&mut self, o: &Self) {
        self.views += o.views;
        self.carts += o.carts;
        self.purchases += o.purchases;
        self.quantity += o.quantity;
        self.revenue_micros += o.revenue_micros;
        self.ratings += o.ratings;
        self.rating_sum += o.rating_sum;
        // The smaller of two categories (a missing one is no candidate), copied only if it
        // changes: events of one item nearly always carry the same one.
        if let Some(theirs) = &o.category {
            if self.category.as_ref().is_none_or(|mine| theirs < mine) {
                self.category = Some(theirs.clone());
            }
        }
    }
}

/// Liveness and reading statistics of one device.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// Latest event time seen from the device (heartbeat or reading).
    pub last_seen: Option<Millis>,
    pub heartbeats: u64,
    pub readings: u64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Sum of reading values, in millionths.
    pub sum_micros: i128,
}

impl DeviceStats {
    pub fn mean(&self) -> Option<f64> {
        (self.readings > 0).then(|| self.sum_micros as f64 / 1e6 / self.readings as f64)
    }
}

impl Monoid for DeviceStats {
    fn merge(&mut self, o: &Self) {
        self.last_seen = max_opt(self.last_seen, o.last_seen);
        self.heartbeats += o.heartbeats;
        self.readings += o.readings;
        self.min = match (self.min, o.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, o.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.sum_micros += o.sum_micros;
    }
}

pub(crate) fn max_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Everything that happened in one time bucket.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SeriesStats {
    /// Events per type, in the order of [`crate::event::EVENT_TYPES`].
    pub counts: [u64; 6],
    pub quantity: u64,
    pub revenue_micros: i128,
    /// Distinct users with a commerce event in the bucket.
    pub users: Hll,
}

impl SeriesStats {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Events of one wire type, or all of them for `None`.
    pub fn count(&self, event_type: Option<&str>) -> Option<u64> {
        match event_type {
            None => Some(self.total()),
            Some(t) => crate::event::EVENT_TYPES
                .iter()
                .position(|&x| x == t)
                .map(|i| self.counts[i]),
        }
    }
}

impl Monoid for SeriesStats {
    fn merge(&mut self, o: &Self) {
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a += b;
        }
        self.quantity += o.quantity;
        self.revenue_micros += o.revenue_micros;
        self.users.merge(&o.users);
    }
}

impl Monoid for Hll {
    fn merge(&mut self, o: &Self) {
        Hll::merge(self, o);
    }
}

/// Names with the latest time each was seen (union, keeping the later time).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recent(pub BTreeMap<Name, Millis>);

impl Monoid for Recent {
    fn merge(&mut self, o: &Self) {
        for (k, &t) in &o.0 {
            let e = self.0.entry(k.clone()).or_insert(t);
            *e = (*e).max(t);
        }
    }
}

/// A set of names (union).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Set(pub BTreeSet<Name>);

impl Monoid for Set {
    fn merge(&mut self, o: &Self) {
        if self.0.is_empty() {
            self.0 = o.0.clone();
        } else {
            self.0.extend(o.0.iter().cloned());
        }
    }
}
