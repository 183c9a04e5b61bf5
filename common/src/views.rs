//! The views, each defined once as a keyed monoid and run unchanged by both layers.
//!
//! An event contributes a partial aggregate ([`Partial`]) to one or more view keys ([`ViewKey`]).
//! Partials of one key merge associatively and commutatively, with `Default` as the identity, so
//! the batch layer's fold over all history, the speed layer's folds over offset blocks, and the
//! serving layer's merge of the two are the same computation cut in different places. A
//! [`ViewSet`] is the map monoid over those keys: fold events in, merge sets together.
//!
//! All sums are integers (money and readings in millionths), so a merge in any order gives
//! bit-identical answers.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::event::{Event, Kind};
use crate::time::Millis;

/// A mergeable aggregate: `merge` is associative and `Default::default()` is its identity.
pub trait Monoid: Default {
    fn merge(&mut self, other: &Self);
}

/// What a partial aggregate is about. The variant decides the [`Partial`] variant stored with it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ViewKey {
    /// All-time totals of one item.
    Item(String),
    /// Liveness and reading statistics of one device.
    Device(String),
}

impl ViewKey {
    const ITEM: u8 = 1;
    const DEVICE: u8 = 2;

    /// The tag byte that starts the key's encoding; keys of one view sort together.
    pub fn tag(&self) -> u8 {
        match self {
            ViewKey::Item(_) => Self::ITEM,
            ViewKey::Device(_) => Self::DEVICE,
        }
    }

    pub fn tag_of_items() -> u8 {
        Self::ITEM
    }

    pub fn tag_of_devices() -> u8 {
        Self::DEVICE
    }

    /// Tag byte, then the UTF-8 name.
    pub fn encode(&self) -> Vec<u8> {
        let name = match self {
            ViewKey::Item(s) | ViewKey::Device(s) => s,
        };
        let mut out = Vec::with_capacity(1 + name.len());
        out.push(self.tag());
        out.extend_from_slice(name.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<ViewKey> {
        let (&tag, rest) = bytes.split_first()?;
        let name = std::str::from_utf8(rest).ok()?.to_string();
        match tag {
            Self::ITEM => Some(ViewKey::Item(name)),
            Self::DEVICE => Some(ViewKey::Device(name)),
            _ => None,
        }
    }
}

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
    pub category: Option<String>,
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
        self.category = min_opt(self.category.take(), o.category.clone());
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

fn min_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// A partial aggregate of one view key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Partial {
    Item(ItemStats),
    Device(DeviceStats),
}

impl Partial {
    /// The identity for a key's view.
    pub fn identity(key: &ViewKey) -> Partial {
        match key {
            ViewKey::Item(_) => Partial::Item(ItemStats::default()),
            ViewKey::Device(_) => Partial::Device(DeviceStats::default()),
        }
    }

    /// Merges `other` into `self`. Partials of different views never share a key; if they did
    /// (corrupt input), `self` is kept unchanged.
    pub fn merge(&mut self, other: &Partial) {
        match (self, other) {
            (Partial::Item(a), Partial::Item(b)) => a.merge(b),
            (Partial::Device(a), Partial::Device(b)) => a.merge(b),
            _ => debug_assert!(false, "partials of different views under one key"),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Partial> {
        postcard::from_bytes(bytes).ok()
    }

    pub fn as_item(&self) -> Option<&ItemStats> {
        match self {
            Partial::Item(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_device(&self) -> Option<&DeviceStats> {
        match self {
            Partial::Device(s) => Some(s),
            _ => None,
        }
    }
}

/// Calls `emit` with each (key, partial) an event contributes. This is the one definition of
/// every view: both layers fold events only through it.
pub fn contributions(event: &Event, mut emit: impl FnMut(ViewKey, Partial)) {
    let item = |r: &crate::event::ItemRef, stats: ItemStats| {
        (
            ViewKey::Item(r.item.clone()),
            Partial::Item(ItemStats {
                category: r.category.clone(),
                ..stats
            }),
        )
    };
    let (k, p) = match &event.kind {
        Kind::View(r) => item(
            r,
            ItemStats {
                views: 1,
                ..Default::default()
            },
        ),
        Kind::AddToCart(r) => item(
            r,
            ItemStats {
                carts: 1,
                ..Default::default()
            },
        ),
        Kind::Purchase {
            item: r,
            qty,
            price_micros,
        } => item(
            r,
            ItemStats {
                purchases: 1,
                quantity: u64::from(*qty),
                revenue_micros: i128::from(*qty) * i128::from(*price_micros),
                ..Default::default()
            },
        ),
        Kind::Rating { item: r, rating } => item(
            r,
            ItemStats {
                ratings: 1,
                rating_sum: u64::from(*rating),
                ..Default::default()
            },
        ),
        Kind::Heartbeat { device } => (
            ViewKey::Device(device.clone()),
            Partial::Device(DeviceStats {
                last_seen: Some(event.ts),
                heartbeats: 1,
                ..Default::default()
            }),
        ),
        Kind::Reading { device, value, .. } => (
            ViewKey::Device(device.clone()),
            Partial::Device(DeviceStats {
                last_seen: Some(event.ts),
                readings: 1,
                min: Some(*value),
                max: Some(*value),
                sum_micros: (*value * 1e6).round() as i128,
                ..Default::default()
            }),
        ),
    };
    emit(k, p);
}

/// The map monoid over all view keys: what a layer holds for a range of events.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ViewSet {
    pub entries: HashMap<ViewKey, Partial>,
}

impl ViewSet {
    pub fn fold(&mut self, event: &Event) {
        contributions(event, |k, p| self.add(k, &p));
    }

    /// Merges one partial into the set.
    pub fn add(&mut self, key: ViewKey, partial: &Partial) {
        match self.entries.get_mut(&key) {
            Some(existing) => existing.merge(partial),
            None => {
                self.entries.insert(key, partial.clone());
            }
        }
    }

    pub fn merge(&mut self, other: &ViewSet) {
        for (k, p) in &other.entries {
            self.add(k.clone(), p);
        }
    }

    /// Merges another set, consuming it (no clones for keys new to `self`).
    pub fn merge_owned(&mut self, other: ViewSet) {
        if self.entries.len() < other.entries.len() {
            let mut other = other;
            std::mem::swap(self, &mut other);
            return self.merge_owned(other);
        }
        for (k, p) in other.entries {
            match self.entries.get_mut(&k) {
                Some(existing) => existing.merge(&p),
                None => {
                    self.entries.insert(k, p);
                }
            }
        }
    }

    pub fn get(&self, key: &ViewKey) -> Option<&Partial> {
        self.entries.get(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ItemRef;
    use proptest::prelude::*;

    fn arb_event() -> impl Strategy<Value = Event> {
        let item_ref =
            (0..5u8, 0..8u8, proptest::option::of(0..3u8)).prop_map(|(u, i, c)| ItemRef {
                user: format!("u{u}"),
                item: format!("i{i}"),
                category: c.map(|c| format!("c{c}")),
            });
        let kind = prop_oneof![
            item_ref.clone().prop_map(Kind::View),
            item_ref.clone().prop_map(Kind::AddToCart),
            (item_ref.clone(), 1..5u32, 0..100_000_000i64).prop_map(|(item, qty, price_micros)| {
                Kind::Purchase {
                    item,
                    qty,
                    price_micros,
                }
            }),
            (item_ref, 1..=5u8).prop_map(|(item, rating)| Kind::Rating { item, rating }),
            (0..4u8).prop_map(|d| Kind::Heartbeat {
                device: format!("d{d}")
            }),
            (0..4u8, -1000.0..1000.0f64).prop_map(|(d, value)| Kind::Reading {
                device: format!("d{d}"),
                metric: "temp_c".into(),
                value,
            }),
        ];
        (0..1_000_000i64, kind).prop_map(|(ts, kind)| Event {
            id: String::new(),
            ts: 1_700_000_000_000 + ts,
            kind,
        })
    }

    fn fold_all(events: &[Event]) -> ViewSet {
        let mut v = ViewSet::default();
        events.iter().for_each(|e| v.fold(e));
        v
    }

    proptest! {
        #[test]
        fn fold_of_whole_equals_merge_of_parts(events in proptest::collection::vec(arb_event(), 0..200), cuts in proptest::collection::vec(0..200usize, 0..5)) {
            let whole = fold_all(&events);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(events.len())).collect();
            cuts.sort_unstable();
            let mut merged = ViewSet::default();
            let mut start = 0;
            for end in cuts.into_iter().chain([events.len()]) {
                merged.merge_owned(fold_all(&events[start..end]));
                start = end;
            }
            prop_assert_eq!(whole, merged);
        }

        #[test]
        fn merge_is_associative_and_commutative(a in proptest::collection::vec(arb_event(), 0..60), b in proptest::collection::vec(arb_event(), 0..60), c in proptest::collection::vec(arb_event(), 0..60)) {
            let (a, b, c) = (fold_all(&a), fold_all(&b), fold_all(&c));
            let mut ab_c = a.clone();
            ab_c.merge(&b);
            ab_c.merge(&c);
            let mut bc = b.clone();
            bc.merge(&c);
            let mut a_bc = a.clone();
            a_bc.merge(&bc);
            prop_assert_eq!(&ab_c, &a_bc);
            let mut c_b_a = c.clone();
            c_b_a.merge(&b);
            c_b_a.merge(&a);
            prop_assert_eq!(&ab_c, &c_b_a);
        }

        #[test]
        fn identity_is_neutral(events in proptest::collection::vec(arb_event(), 0..60)) {
            let v = fold_all(&events);
            let mut left = ViewSet::default();
            left.merge(&v);
            let mut right = v.clone();
            right.merge(&ViewSet::default());
            prop_assert_eq!(&left, &v);
            prop_assert_eq!(&right, &v);
            for (k, p) in &v.entries {
                let mut id = Partial::identity(k);
                id.merge(p);
                prop_assert_eq!(&id, p);
            }
        }

        #[test]
        fn partials_round_trip(events in proptest::collection::vec(arb_event(), 0..40)) {
            for (k, p) in fold_all(&events).entries {
                prop_assert_eq!(ViewKey::decode(&k.encode()), Some(k));
                prop_assert_eq!(Partial::decode(&p.encode()), Some(p));
            }
        }
    }

    #[test]
    fn purchase_revenue_is_exact() {
        let e = Event {
            id: "a".into(),
            ts: 0,
            kind: Kind::Purchase {
                item: ItemRef {
                    user: "u".into(),
                    item: "i".into(),
                    category: Some("books".into()),
                },
                qty: 3,
                price_micros: 12_500_000,
            },
        };
        let mut v = ViewSet::default();
        v.fold(&e);
        v.fold(&e);
        let s = v
            .get(&ViewKey::Item("i".into()))
            .and_then(Partial::as_item)
            .expect("item");
        assert_eq!(
            (s.purchases, s.quantity, s.revenue_micros),
            (2, 6, 75_000_000)
        );
        assert_eq!(s.revenue(), 75.0);
        assert_eq!(s.category.as_deref(), Some("books"));
    }
}
