//! The views, each defined once as a keyed monoid and run unchanged by both layers.
//!
//! An event contributes a partial aggregate ([`Partial`]) to one or more view keys ([`ViewKey`]);
//! [`contribute`] is the one definition of every view, written against a [`Sink`]:
//! [`contributions`] is its keyed form, [`IdFold`] the batch layer's form keyed by ids. Partials of
//! one key merge associatively and commutatively, with `Default` as the identity, so the batch
//! layer's fold over all history, the speed layer's folds over offset blocks, and the serving
//! layer's merge of the two are the same computation cut in different places. A [`ViewSet`] is
//! the map monoid over those keys.
//!
//! | view | key | partial | answers |
//! |---|---|---|---|
//! | item totals | `Item(item)` | [`ItemStats`] | item lookup, all-time top items |
//! | item series | `ItemSeries{gran, start, item}` | [`ItemStats`] | windowed top and trending items, item time series |
//! | series | `Series{gran, start}` | [`SeriesStats`] | global time series (events, revenue, distinct users) |
//! | item daily users | `ItemDayUsers{day, item}` | [`Hll`] | distinct users per item and day |
//! | user history | `UserItems{basis, user}` | [`Recent`] | personal recommendations |
//! | item audience | `ItemUsers{basis, item}` | [`Set`] | co-occurrence ("bought together") |
//! | device | `Device(device)` | [`DeviceStats`] | device health, fleet summary |
//! | device metric hour | `DeviceMetricHour{start, device, metric}` | [`DeviceStats`] | readings per window, out-of-range flags |
//!
//! All sums are integers (money and readings in millionths), so a merge in any order gives
//! bit-identical answers. Buckets are by event time: a late event lands in the bucket it belongs to.

mod hll;
mod idfold;
mod key;
mod stats;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

pub use hll::{
    hash64, register, Hll, REGISTERS as HLL_REGISTERS, STANDARD_ERROR as HLL_STANDARD_ERROR,
};
pub use idfold::{Entries, IdFold, Interner};
pub use key::{tag, Basis, Gran, ViewKey};
pub use stats::{DeviceStats, ItemStats, Recent, SeriesStats, Set};

use crate::event::{Event, ItemRef, Kind, EVENT_TYPES};
use crate::time::Millis;

/// A name in a view key or a partial (item, user, device, metric, category). Names of up to 24
/// bytes are stored inline, so hashing, comparing, cloning and dropping a key touches no other
/// memory; it orders, hashes and serializes exactly as the `str` it holds.
pub type Name = compact_str::CompactString;

/// A mergeable aggregate: `merge` is associative and `Default::default()` is its identity.
pub trait Monoid: Default {
    fn merge(&mut self, other: &Self);
}

/// A partial aggregate of one view key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Partial {
    Item(ItemStats),
    Device(DeviceStats),
    Series(SeriesStats),
    Distinct(Hll),
    Recent(Recent),
    Set(Set),
}

impl Partial {
    /// The identity for a key's view.
    pub fn identity(key: &ViewKey) -> Partial {
        match key {
            ViewKey::Item(_) | ViewKey::ItemSeries { .. } => Partial::Item(ItemStats::default()),
            ViewKey::Device(_) | ViewKey::DeviceMetricHour { .. } => {
                Partial::Device(DeviceStats::default())
            }
            ViewKey::Series { .. } => Partial::Series(SeriesStats::default()),
            ViewKey::ItemDayUsers { .. } => Partial::Distinct(Hll::default()),
            ViewKey::UserItems { .. } => Partial::Recent(Recent::default()),
            ViewKey::ItemUsers { .. } => Partial::Set(Set::default()),
        }
    }

    /// Merges `other` into `self`. Partials of different views never share a key; if they did
    /// (corrupt input), `self` is kept unchanged.
    pub fn merge(&mut self, other: &Partial) {
        match (self, other) {
            (Partial::Item(a), Partial::Item(b)) => a.merge(b),
            (Partial::Device(a), Partial::Device(b)) => a.merge(b),
            (Partial::Series(a), Partial::Series(b)) => a.merge(b),
            (Partial::Distinct(a), Partial::Distinct(b)) => Monoid::merge(a, b),
            (Partial::Recent(a), Partial::Recent(b)) => a.merge(b),
            (Partial::Set(a), Partial::Set(b)) => a.merge(b),
            _ => debug_assert!(false, "partials of different views under one key"),
        }
    }

    /// [`Partial::merge`], consuming `other`: names in sets and maps move instead of being
    /// copied.
    pub fn absorb(&mut self, other: Partial) {
        match (self, other) {
            (Partial::Recent(a), Partial::Recent(b)) => {
                if a.0.is_empty() {
                    a.0 = b.0;
                    return;
                }
                for (k, t) in b.0 {
                    let e = a.0.entry(k).or_insert(t);
                    *e = (*e).max(t);
                }
            }
            (Partial::Set(a), Partial::Set(b)) => {
                if a.0.is_empty() {
                    a.0 = b.0;
                } else {
                    a.0.extend(b.0);
                }
            }
            (a, b) => a.merge(&b),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Appends the encoded partial to `out` (what [`Partial::encode`] returns), with no
    /// allocation of its own.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let len = out.len();
        if postcard::serialize_with_flavor(self, Append(out)).is_err() {
            // Encoding into memory does not fail; were it to, nothing is appended.
            out.truncate(len);
        }
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
}

/// A postcard flavor that appends to a vector it borrows.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

fn item_delta(kind: &Kind) -> Option<(&ItemRef, usize, ItemStats)> {
    let d = ItemStats::default;
    Some(match kind {
        Kind::View(r) => (r, 0, ItemStats { views: 1, ..d() }),
        Kind::AddToCart(r) => (r, 1, ItemStats { carts: 1, ..d() }),
        Kind::Purchase {
            item,
            qty,
            price_micros,
        } => (
            item,
            2,
            ItemStats {
                purchases: 1,
                quantity: u64::from(*qty),
                revenue_micros: i128::from(*qty) * i128::from(*price_micros),
                ..d()
            },
        ),
        Kind::Rating { item, rating } => (
            item,
            3,
            ItemStats {
                ratings: 1,
                rating_sum: u64::from(*rating),
                ..d()
            },
        ),
        Kind::Heartbeat { .. } | Kind::Reading { .. } => return None,
    })
}

/// What a device event adds to its device's views: the device, the metric (readings), and the
/// statistics of that one event.
fn device_delta(event: &Event) -> Option<(&str, Option<&str>, DeviceStats)> {
    let last_seen = Some(event.ts);
    match &event.kind {
        Kind::Heartbeat { device } => Some((
            device,
            None,
            DeviceStats {
                last_seen,
                heartbeats: 1,
                ..Default::default()
            },
        )),
        Kind::Reading {
            device,
            metric,
            value,
        } => Some((
            device,
            Some(metric),
            DeviceStats {
                last_seen,
                readings: 1,
                min: Some(*value),
                max: Some(*value),
                sum_micros: (*value * 1e6).round() as i128,
                ..Default::default()
            },
        )),
        _ => None,
    }
}

/// The receiving end of [`contribute`]: one method per view, each called with what one event
/// adds to one key of that view. [`contributions`] turns every call into a (key, partial) pair;
/// a fold may store the same deltas in another shape (the batch layer's [`IdFold`]), as long as
/// it merges them with the view's monoid.
pub trait Sink {
    /// `ViewKey::Item(item)` gets `delta`.
    fn item(&mut self, item: &str, delta: &ItemStats);
    /// `ViewKey::ItemSeries { gran, start, item }` gets `delta`.
    fn item_series(&mut self, gran: Gran, start: Millis, item: &str, delta: &ItemStats);
    /// `ViewKey::ItemDayUsers { day, item }` gets the sketch of `user`.
    fn item_day_user(&mut self, day: Millis, item: &str, user: &str);
    /// `ViewKey::UserItems { basis, user }` gets `item` seen at `ts`.
    fn user_item(&mut self, basis: Basis, user: &str, item: &str, ts: Millis);
    /// `ViewKey::ItemUsers { basis, item }` gets `user`.
    fn item_user(&mut self, basis: Basis, item: &str, user: &str);
    /// `ViewKey::Device(device)` gets `delta`.
    fn device(&mut self, device: &str, delta: &DeviceStats);
    /// `ViewKey::DeviceMetricHour { start, device, metric }` gets `delta`.
    fn device_metric_hour(
        &mut self,
        start: Millis,
        device: &str,
        metric: &str,
        delta: &DeviceStats,
    );
    /// `ViewKey::Series { gran, start }` gets `delta`.
    fn series(&mut self, gran: Gran, start: Millis, delta: &SeriesDelta<'_>);
}

/// What one event adds to a time bucket of the series view: its [`SeriesStats`] is
/// [`SeriesDelta::to_stats`], and [`SeriesStats::add`] merges it without building that.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SeriesDelta<'a> {
    /// The event's type, as an index into [`EVENT_TYPES`].
    pub type_index: usize,
    /// Events of that type the delta stands for: 1 for an event, a rollup's count for a rollup.
    pub events: u64,
    pub quantity: u64,
    pub revenue_micros: i128,
    /// The user of a commerce event.
    pub user: Option<&'a str>,
}

impl SeriesDelta<'_> {
    /// The delta as a partial.
    pub fn to_stats(&self) -> SeriesStats {
        let mut s = SeriesStats::default();
        s.counts[self.type_index] = self.events;
        s.quantity = self.quantity;
        s.revenue_micros = self.revenue_micros;
        if let Some(user) = self.user {
            s.users = Hll::of(user);
        }
        s
    }
}

impl SeriesStats {
    /// Merges `delta.to_stats()` into `self`, given `hash64` of its user (if any).
    pub fn add(&mut self, delta: &SeriesDelta<'_>, user_hash: Option<u64>) {
        self.counts[delta.type_index] += delta.events;
        self.quantity += delta.quantity;
        self.revenue_micros += delta.revenue_micros;
        if let Some(h) = user_hash {
            self.users.insert_hash(h);
        }
    }
}

/// Calls `sink` with everything an event contributes, view by view. This is the one definition
/// of every view: both layers fold events only through it (the keyed form is
/// [`contributions`]).
pub fn contribute(event: &Event, sink: &mut impl Sink) {
    let ts = event.ts;
    let type_index = EVENT_TYPES
        .iter()
        .position(|&t| t == event.type_name())
        .unwrap_or(0);
    let mut series = SeriesDelta {
        type_index,
        events: 1,
        quantity: 0,
        revenue_micros: 0,
        user: None,
    };

    if let Some((r, _, stats)) = item_delta(&event.kind) {
        let stats = ItemStats {
            category: r.category.as_deref().map(Name::from),
            ..stats
        };
        let item = r.item.as_str();
        series.quantity = stats.quantity;
        series.revenue_micros = stats.revenue_micros;
        series.user = Some(&r.user);
        for gran in Gran::ALL {
            sink.item_series(gran, gran.floor(ts), item, &stats);
        }
        sink.item_day_user(Gran::Day.floor(ts), item, &r.user);
        let basis = match event.kind {
            Kind::View(_) => Some(Basis::View),
            Kind::Purchase { .. } => Some(Basis::Purchase),
            _ => None,
        };
        if let Some(basis) = basis {
            sink.user_item(basis, &r.user, item, ts);
            sink.item_user(basis, item, &r.user);
        }
        sink.item(item, &stats);
    }
    if let Some((device, metric, stats)) = device_delta(event) {
        if let Some(metric) = metric {
            sink.device_metric_hour(Gran::Hour.floor(ts), device, metric, &stats);
        }
        sink.device(device, &stats);
    }
    for gran in Gran::ALL {
        sink.series(gran, gran.floor(ts), &series);
    }
}

/// What one event adds to one view key, borrowed from the event: [`Delta::to_partial`] builds
/// it as a partial, [`Delta::merge_into`] merges it into a partial in place.
#[derive(Clone, Copy)]
enum Delta<'a> {
    Item(&'a ItemStats),
    Device(&'a DeviceStats),
    Series(&'a SeriesDelta<'a>),
    /// A user, for a distinct-count sketch.
    Distinct(&'a str),
    /// An item seen at a time.
    Recent(&'a str, Millis),
    /// A name, for a set.
    Set(&'a str),
}

impl Delta<'_> {
    fn to_partial(self) -> Partial {
        match self {
            Delta::Item(d) => Partial::Item(d.clone()),
            Delta::Device(d) => Partial::Device(d.clone()),
            Delta::Series(d) => Partial::Series(d.to_stats()),
            Delta::Distinct(user) => Partial::Distinct(Hll::of(user)),
            Delta::Recent(item, ts) => {
                Partial::Recent(Recent(BTreeMap::from([(Name::from(item), ts)])))
            }
            Delta::Set(name) => Partial::Set(Set(BTreeSet::from([Name::from(name)]))),
        }
    }

    /// Merges the delta into `p` as `p.merge(&self.to_partial())` would, without building that;
    /// `false` if `p` is of another view (corrupt input), which is left unchanged.
    fn merge_into(self, p: &mut Partial) -> bool {
        match (p, self) {
            (Partial::Item(a), Delta::Item(d)) => a.merge(d),
            (Partial::Device(a), Delta::Device(d)) => a.merge(d),
            (Partial::Series(a), Delta::Series(d)) => a.add(d, d.user.map(hll::hash64)),
            (Partial::Distinct(h), Delta::Distinct(user)) => h.insert(user),
            (Partial::Recent(r), Delta::Recent(item, ts)) => {
                if let Some(t) = r.0.get_mut(item) {
                    *t = (*t).max(ts);
                } else {
                    r.0.insert(Name::from(item), ts);
                }
            }
            (Partial::Set(s), Delta::Set(name)) => {
                if !s.0.contains(name) {
                    s.0.insert(Name::from(name));
                }
            }
            _ => return false,
        }
        true
    }
}

/// [`contribute`] in keyed form: each contribution as its view key and its [`Delta`].
struct Keyed<F>(F);

impl<F: FnMut(ViewKey, Delta<'_>)> Sink for Keyed<F> {
    fn item(&mut self, item: &str, delta: &ItemStats) {
        (self.0)(ViewKey::Item(Name::from(item)), Delta::Item(delta));
    }

    fn item_series(&mut self, gran: Gran, start: Millis, item: &str, delta: &ItemStats) {
        let item = Name::from(item);
        (self.0)(
            ViewKey::ItemSeries { gran, start, item },
            Delta::Item(delta),
        );
    }

    fn item_day_user(&mut self, day: Millis, item: &str, user: &str) {
        let item = Name::from(item);
        (self.0)(ViewKey::ItemDayUsers { day, item }, Delta::Distinct(user));
    }

    fn user_item(&mut self, basis: Basis, user: &str, item: &str, ts: Millis) {
        let user = Name::from(user);
        (self.0)(ViewKey::UserItems { basis, user }, Delta::Recent(item, ts));
    }

    fn item_user(&mut self, basis: Basis, item: &str, user: &str) {
        let item = Name::from(item);
        (self.0)(ViewKey::ItemUsers { basis, item }, Delta::Set(user));
    }

    fn device(&mut self, device: &str, delta: &DeviceStats) {
        (self.0)(ViewKey::Device(Name::from(device)), Delta::Device(delta));
    }

    fn device_metric_hour(
        &mut self,
        start: Millis,
        device: &str,
        metric: &str,
        delta: &DeviceStats,
    ) {
        let key = ViewKey::DeviceMetricHour {
            start,
            device: Name::from(device),
            metric: Name::from(metric),
        };
        (self.0)(key, Delta::Device(delta));
    }

    fn series(&mut self, gran: Gran, start: Millis, delta: &SeriesDelta<'_>) {
        (self.0)(ViewKey::Series { gran, start }, Delta::Series(delta));
    }
}

/// Calls `emit` with each (key, partial) an event contributes: [`contribute`] in keyed form.
pub fn contributions(event: &Event, mut emit: impl FnMut(ViewKey, Partial)) {
    contribute(
        event,
        &mut Keyed(|key, d: Delta<'_>| emit(key, d.to_partial())),
    );
}

/// Folds everything `event` contributes into `map`, merging into a key's partial in place:
/// the same map as absorbing each pair of [`contributions`], without building a partial (a
/// sketch, a set, a map of one name) for a key the map holds already.
pub fn fold_into(map: &mut FastMap<ViewKey, Partial>, event: &Event) {
    contribute(
        event,
        &mut Keyed(|key, d: Delta<'_>| match map.entry(key) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                if !d.merge_into(e.get_mut()) {
                    // Of another view (corrupt input): absorbing keeps it unchanged too.
                    e.get_mut().absorb(d.to_partial());
                }
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(d.to_partial());
            }
        }),
    );
}

/// Device events of one device (and metric, for readings) in one hour, rolled up: what the
/// retention step keeps in the master dataset instead of the raw heartbeats and readings
/// (`batch-layer/src/retention.rs`). `stats` is the merge of what each event contributed to the
/// device views: count, last seen, and for readings min, max and sum.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollup {
    pub device: Name,
    /// `Some` for readings, `None` for heartbeats.
    pub metric: Option<Name>,
    /// The hour's start (event time).
    pub hour: Millis,
    pub stats: DeviceStats,
}

impl Rollup {
    /// The rollup of one event, if it is a device event: merged per (device, metric, hour),
    /// these are the records retention writes.
    pub fn of(event: &Event) -> Option<Rollup> {
        let (device, metric, stats) = device_delta(event)?;
        Some(Rollup {
            device: Name::from(device),
            metric: metric.map(Name::from),
            hour: Gran::Hour.floor(event.ts),
            stats,
        })
    }

    /// The wire type of the events rolled up.
    pub fn type_name(&self) -> &'static str {
        if self.metric.is_some() {
            "reading"
        } else {
            "heartbeat"
        }
    }

    /// Events the record stands for.
    pub fn events(&self) -> u64 {
        self.stats.heartbeats + self.stats.readings
    }
}

/// Calls `sink` with everything a rollup contributes: what its events contributed through
/// [`contribute`], except the minute buckets of the series view, which an hour's record cannot
/// split (the batch layer drops those buckets below the rollup's threshold, and the API answers
/// them as beyond retention: [`crate::retention`]).
pub fn contribute_rollup(r: &Rollup, sink: &mut impl Sink) {
    if let Some(metric) = &r.metric {
        sink.device_metric_hour(r.hour, &r.device, metric, &r.stats);
    }
    sink.device(&r.device, &r.stats);
    let type_index = EVENT_TYPES
        .iter()
        .position(|&t| t == r.type_name())
        .unwrap_or(0);
    let delta = SeriesDelta {
        type_index,
        events: r.events(),
        quantity: 0,
        revenue_micros: 0,
        user: None,
    };
    for gran in [Gran::Hour, Gran::Day] {
        sink.series(gran, gran.floor(r.hour), &delta);
    }
}

/// [`contribute_rollup`] in keyed form.
pub fn rollup_contributions(r: &Rollup, mut emit: impl FnMut(ViewKey, Partial)) {
    contribute_rollup(r, &mut Keyed(|key, d: Delta<'_>| emit(key, d.to_partial())));
}

/// The map monoid over all view keys: what a layer holds for a range of events.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ViewSet {
    pub entries: FastMap<ViewKey, Partial>,
}

/// A hash map with a fast hasher that is still keyed at random per process (view keys come
/// from event data, so a fixed hash could be attacked with colliding ids).
pub type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// The element numbered `id` of a vector kept by dense ids, the vector grown with defaults to
/// hold it.
pub fn at_id<T: Default>(v: &mut Vec<T>, id: u32) -> &mut T {
    let i = id as usize;
    if v.len() <= i {
        v.resize_with(i + 1, T::default);
    }
    &mut v[i]
}

/// Merges `partial` into `acc` (or makes it `acc`), consuming it: the sum of a key's partials
/// read from several places.
pub fn absorb_opt(acc: &mut Option<Partial>, partial: Partial) {
    match acc {
        Some(a) => a.absorb(partial),
        None => *acc = Some(partial),
    }
}

/// Merges `partial` into `key`'s entry of `map` (or makes it the entry), consuming it.
pub fn absorb_into(map: &mut FastMap<ViewKey, Partial>, key: ViewKey, partial: Partial) {
    match map.entry(key) {
        std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().absorb(partial),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(partial);
        }
    }
}

impl ViewSet {
    pub fn fold(&mut self, event: &Event) {
        fold_into(&mut self.entries, event);
    }

    /// Folds a rollup record ([`contribute_rollup`]).
    pub fn fold_rollup(&mut self, r: &Rollup) {
        rollup_contributions(r, |k, p| self.add_owned(k, p));
    }

    /// Merges one partial into the set, consuming it.
    pub fn add_owned(&mut self, key: ViewKey, partial: Partial) {
        absorb_into(&mut self.entries, key, partial);
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
            self.add_owned(k, p);
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

/// Every merged partial of every view at one moment, with the offsets it covers: what the
/// serving layer hands `strata verify` (`GET /v1/admin/views`, postcard-encoded).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Per partition, the offset below which every accepted event is in `entries`.
    pub coverage: crate::handoff::Offsets,
    /// The batch version merged in, if any.
    pub batch_version: Option<u64>,
    pub entries: Vec<(ViewKey, Partial)>,
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Snapshot> {
        postcard::from_bytes(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ItemRef;
    use proptest::prelude::*;

    pub(super) fn arb_event() -> impl Strategy<Value = Event> {
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
        (0..400_000_000i64, kind).prop_map(|(ts, kind)| Event {
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
        fn folding_in_place_equals_absorbing_each_contribution(events in proptest::collection::vec(arb_event(), 0..300)) {
            let mut in_place: FastMap<ViewKey, Partial> = FastMap::default();
            let mut absorbed: FastMap<ViewKey, Partial> = FastMap::default();
            for e in &events {
                fold_into(&mut in_place, e);
                contributions(e, |k, p| match absorbed.entry(k) {
                    std::collections::hash_map::Entry::Occupied(mut o) => o.get_mut().merge(&p),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(p);
                    }
                });
            }
            prop_assert!(events.is_empty() || !in_place.is_empty());
            prop_assert_eq!(in_place, absorbed);
        }

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
                prop_assert_eq!(ViewKey::decode(&k.encode()), Some(k.clone()));
                prop_assert_eq!(Partial::identity(&k).encode().is_empty(), false);
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
