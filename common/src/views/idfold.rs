//! The batch layer's fold of every view: [`contribute`]'s deltas stored under dense ids instead
//! of [`ViewKey`]s.
//!
//! A [`ViewSet`] fold builds a key (with its names) and a one-entry partial for each of the ten
//! or so deltas of an event and looks the key up in one large hash map: most of the time goes to
//! cache misses on that map and to allocating and freeing the small partials. [`IdFold`] is a
//! [`Sink`] that turns each name (item, user, device, metric) into a number once per fold and
//! keeps each view in a shape that suits it:
//!
//! - item totals and devices: vectors indexed by id;
//! - item series and item daily users: per time bucket, cells of (item id, partial), so the
//!   bucket being filled stays small and warm in the cache;
//! - the series view: a small map per granularity;
//! - user histories and item audiences (sets of names): (user, item) id pairs appended in
//!   arrival order, with no lookup per event; sorted and deduplicated when the list has doubled
//!   and once at the end.
//!
//! The partials themselves are the views' own monoids ([`ItemStats`], [`DeviceStats`],
//! [`SeriesStats`], [`Hll`]), merged by their own `merge`. [`IdFold::into_entries`] merges the
//! folds of several partitions and returns every (key, partial) in key order, in chunks computed in
//! parallel: the same entries as a [`ViewSet`] fold of the same events (property-tested below).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rayon::prelude::*;

use super::{
    at_id, contribute, hash64, register, Basis, DeviceStats, FastMap, Gran, Hll, ItemStats, Monoid,
    Name, Partial, Recent, SeriesDelta, SeriesStats, Set, Sink, ViewKey,
};
use crate::event::Event;
use crate::time::Millis;

/// No id.
const NONE: u32 = u32::MAX;

/// (id, partial) cells of one time bucket.
type Cells<V> = Vec<(u32, V)>;

/// (user id, item id, time) of the user history view.
type Seen = (u32, u32, Millis);

/// (day, item id, register) of the item daily users view: the register's index and rank as
/// `index << 8 | rank`, so that they sort by index then rank.
type Reg<K> = (K, u32, u32);

/// Sorts registers by (day, item, index), keeping each one's highest rank.
fn compact_regs<K: Ord + Copy>(list: &mut Vec<Reg<K>>) {
    list.sort_unstable();
    list.dedup_by(|later, kept| {
        let same = (later.0, later.1, later.2 >> 8) == (kept.0, kept.1, kept.2 >> 8);
        if same {
            kept.2 = kept.2.max(later.2);
        }
        same
    });
}

/// Time buckets numbered in order of first sight.
#[derive(Default)]
struct Slots {
    starts: Vec<Millis>,
    ids: FastMap<Millis, u32>,
    last: u32,
}

impl Slots {
    fn slot(&mut self, start: Millis) -> u32 {
        if self.starts.get(self.last as usize) == Some(&start) {
            return self.last;
        }
        let next = self.starts.len() as u32;
        let id = *self.ids.entry(start).or_insert(next);
        if id == next {
            self.starts.push(start);
        }
        self.last = id;
        id
    }
}

/// Names of one kind and their ids, from 0 in order of first sight.
#[derive(Clone, Default)]
pub struct Interner {
    ids: FastMap<Name, u32>,
    /// By id.
    pub names: Vec<Name>,
    /// The name looked up last and its id: consecutive calls are mostly for the same name. A
    /// copy, so that checking it reads no memory the previous event may have pushed out of the
    /// cache.
    last: Option<(Name, u32)>,
}

impl Interner {
    /// `names` numbered by their places.
    pub fn from_names(names: Vec<Name>) -> Self {
        let mut ids = FastMap::default();
        ids.reserve(names.len());
        for (n, name) in names.iter().enumerate() {
            ids.insert(name.clone(), n as u32);
        }
        Interner {
            ids,
            names,
            last: None,
        }
    }

    /// The id of `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// The id of `name`, the next one if it has none yet.
    pub fn id(&mut self, name: &str) -> u32 {
        if let Some((n, id)) = &self.last {
            if n.as_str() == name {
                return *id;
            }
        }
        let id = match self.ids.get(name) {
            Some(&id) => id,
            None => {
                let id = self.names.len() as u32;
                let name = Name::from(name);
                self.names.push(name.clone());
                self.ids.insert(name, id);
                id
            }
        };
        self.last = Some((Name::from(name), id));
        id
    }
}

/// Where a bucket's cell of an id is: a map while the bucket holds few of the ids, an index by id
/// once it holds at least an eighth of them (then the index costs less than the cells).
enum Index {
    Map(FastMap<u32, u32>),
    Dense(Vec<u32>),
}

/// One time bucket of a view keyed by (bucket, item).
struct Bucket<V> {
    start: Millis,
    index: Index,
    cells: Vec<(u32, V)>,
}

impl<V: Default> Bucket<V> {
    /// The cell of `id`, made if new; `ids` is how many ids there are so far.
    fn cell(&mut self, id: u32, ids: usize) -> &mut V {
        let next = self.cells.len() as u32;
        let i = match &mut self.index {
            Index::Dense(at) => {
                if at.len() <= id as usize {
                    at.resize(ids.max(id as usize + 1), NONE);
                }
                let slot = &mut at[id as usize];
                if *slot == NONE {
                    *slot = next;
                }
                *slot
            }
            Index::Map(m) => {
                let i = *m.entry(id).or_insert(next);
                if i == next && (self.cells.len() + 1) * 8 >= ids {
                    let mut at = vec![NONE; ids.max(id as usize + 1)];
                    for (&k, &v) in m.iter() {
                        at[k as usize] = v;
                    }
                    self.index = Index::Dense(at);
                }
                i
            }
        };
        if i == next {
            self.cells.push((id, V::default()));
        }
        &mut self.cells[i as usize].1
    }
}

/// A view keyed by (time bucket, item id).
struct Grid<V> {
    slots: FastMap<Millis, u32>,
    /// The bucket used last (events arrive roughly in time order).
    last: u32,
    buckets: Vec<Bucket<V>>,
}

impl<V> Default for Grid<V> {
    fn default() -> Self {
        Grid {
            slots: FastMap::default(),
            last: NONE,
            buckets: Vec::new(),
        }
    }
}

impl<V: Default> Grid<V> {
    fn cell(&mut self, start: Millis, id: u32, ids: usize) -> &mut V {
        let slot = match self.buckets.get(self.last as usize) {
            Some(b) if b.start == start => self.last as usize,
            _ => {
                let next = self.buckets.len() as u32;
                let slot = *self.slots.entry(start).or_insert(next);
                if slot == next {
                    self.buckets.push(Bucket {
                        start,
                        index: Index::Map(FastMap::default()),
                        cells: Vec::new(),
                    });
                }
                self.last = slot;
                slot as usize
            }
        };
        self.buckets[slot].cell(id, ids)
    }
}

/// Sorts (user, item, time) by user and item, keeping each pair's latest time.
fn compact_seen(list: &mut Vec<Seen>) {
    list.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)).then(b.2.cmp(&a.2)));
    list.dedup_by_key(|e| (e.0, e.1));
}

/// Sorts (item, user) pairs, each once.
fn compact_pairs(list: &mut Vec<(u32, u32)>) {
    list.sort_unstable();
    list.dedup();
}

/// Entries appended in arrival order (no lookup per event); compacted when the list has doubled
/// since the last compaction, so it never holds more than twice the distinct entries.
struct Appended<T> {
    list: Vec<T>,
    compact_at: usize,
}

impl<T> Default for Appended<T> {
    fn default() -> Self {
        Appended {
            list: Vec::new(),
            compact_at: 1 << 20,
        }
    }
}

impl<T> Appended<T> {
    fn push(&mut self, value: T, compact: fn(&mut Vec<T>)) {
        if self.list.len() >= self.compact_at {
            compact(&mut self.list);
            self.compact_at = (self.list.len() * 2).max(1 << 20);
        }
        self.list.push(value);
    }
}

/// Every view of some events (one partition's, as a rule), keyed by ids of this fold.
#[derive(Default)]
pub struct IdFold {
    items: Interner,
    users: Interner,
    devices: Interner,
    metrics: Interner,
    item_totals: Vec<Option<ItemStats>>,
    item_series: [Grid<ItemStats>; 3],
    /// Item daily users: the register each event sets, appended (a sketch per (day, item) is
    /// built from them at the end, in order, instead of being looked up per event).
    days: Slots,
    item_day_users: Appended<Reg<u32>>,
    /// Per basis: (user id, item id, time).
    user_items: [Appended<Seen>; 2],
    /// Per basis: (item id, user id).
    item_users: [Appended<(u32, u32)>; 2],
    devices_stats: Vec<Option<DeviceStats>>,
    device_metric_hours: FastMap<(Millis, u32, u32), DeviceStats>,
    series: [FastMap<Millis, SeriesStats>; 3],
}

fn gran_index(g: Gran) -> usize {
    match g {
        Gran::Minute => 0,
        Gran::Hour => 1,
        Gran::Day => 2,
    }
}

impl IdFold {
    pub fn new() -> Self {
        IdFold::default()
    }

    /// Folds one (counted) event.
    pub fn fold(&mut self, event: &Event) {
        contribute(event, self);
    }

    /// Folds one rollup record of the master dataset.
    pub fn fold_rollup(&mut self, r: &super::Rollup) {
        super::contribute_rollup(r, self);
    }
}

impl Sink for IdFold {
    fn item(&mut self, item: &str, delta: &ItemStats) {
        let id = self.items.id(item);
        at_id(&mut self.item_totals, id)
            .get_or_insert_with(ItemStats::default)
            .merge(delta);
    }

    fn item_series(&mut self, gran: Gran, start: Millis, item: &str, delta: &ItemStats) {
        let id = self.items.id(item);
        let ids = self.items.names.len();
        self.item_series[gran_index(gran)]
            .cell(start, id, ids)
            .merge(delta);
    }

    fn item_day_user(&mut self, day: Millis, item: &str, user: &str) {
        let id = self.items.id(item);
        let (idx, rank) = register(hash64(user));
        let reg = u32::from(idx) << 8 | u32::from(rank);
        let d = self.days.slot(day);
        self.item_day_users.push((d, id, reg), compact_regs::<u32>);
    }

    fn user_item(&mut self, basis: Basis, user: &str, item: &str, ts: Millis) {
        let (u, i) = (self.users.id(user), self.items.id(item));
        self.user_items[basis.index()].push((u, i, ts), compact_seen);
    }

    fn item_user(&mut self, basis: Basis, item: &str, user: &str) {
        let (u, i) = (self.users.id(user), self.items.id(item));
        self.item_users[basis.index()].push((i, u), compact_pairs);
    }

    fn device(&mut self, device: &str, delta: &DeviceStats) {
        let id = self.devices.id(device);
        at_id(&mut self.devices_stats, id)
            .get_or_insert_with(DeviceStats::default)
            .merge(delta);
    }

    fn device_metric_hour(
        &mut self,
        start: Millis,
        device: &str,
        metric: &str,
        delta: &DeviceStats,
    ) {
        let (d, m) = (self.devices.id(device), self.metrics.id(metric));
        self.device_metric_hours
            .entry((start, d, m))
            .or_default()
            .merge(delta);
    }

    fn series(&mut self, gran: Gran, start: Millis, delta: &SeriesDelta<'_>) {
        let h = delta.user.map(hash64);
        self.series[gran_index(gran)]
            .entry(start)
            .or_default()
            .add(delta, h);
    }
}

/// The names of one kind across folds: sorted, so that ids (positions) order as names do, and
/// each fold's ids mapped to them.
struct Names {
    names: Vec<Name>,
    /// Per fold: its id -> the global id.
    maps: Vec<Vec<u32>>,
}

impl Names {
    fn of(interners: &[&Interner]) -> Names {
        let mut names: Vec<Name> = interners
            .iter()
            .flat_map(|i| i.names.iter().cloned())
            .collect();
        names.par_sort_unstable();
        names.dedup();
        let maps = interners
            .par_iter()
            .map(|i| {
                i.names
                    .iter()
                    .map(|n| names.binary_search(n).map_or(NONE, |g| g as u32))
                    .collect()
            })
            .collect();
        Names { names, maps }
    }
}

/// Every kind of name of the folds being merged.
struct AllNames {
    items: Names,
    users: Names,
    devices: Names,
    metrics: Names,
}

/// The entries of one view (or part of one), in key order.
pub type Entries = Vec<(ViewKey, Partial)>;

/// A piece of the merge, owning its inputs (in global ids); the pieces in order give the keys in
/// order.
enum Job {
    Items(Vec<Vec<Option<ItemStats>>>),
    Devices(Vec<Vec<Option<DeviceStats>>>),
    ItemSeries(Gran, Millis, Vec<Vec<(u32, ItemStats)>>),
    Series([BTreeMap<Millis, SeriesStats>; 3]),
    /// Items `lo..hi` of one day of the folds' sorted registers.
    ItemDayUsers(Arc<Vec<Vec<Reg<Millis>>>>, Millis, u32, u32),
    /// Users `lo..hi` of the folds' sorted (user, item, time) lists.
    UserItems(Basis, Arc<Vec<Vec<Seen>>>, u32, u32),
    /// Items `lo..hi` of the folds' sorted (item, user) lists.
    ItemUsers(Basis, Arc<Vec<Vec<(u32, u32)>>>, u32, u32),
    DeviceMetricHours(Vec<((Millis, u32, u32), DeviceStats)>),
}

/// Merges cells of several folds (global ids) into one list in id order.
fn merge_cells<V>(parts: Vec<Vec<(u32, V)>>, merge: impl Fn(&mut V, &V)) -> Vec<(u32, V)> {
    let mut all: Vec<(u32, V)> = if parts.len() == 1 {
        parts.into_iter().flatten().collect()
    } else {
        let n = parts.iter().map(Vec::len).sum();
        let mut all = Vec::with_capacity(n);
        for p in parts {
            all.extend(p);
        }
        all
    };
    all.sort_unstable_by_key(|c| c.0);
    let mut out: Vec<(u32, V)> = Vec::with_capacity(all.len());
    for (id, v) in all {
        match out.last_mut() {
            Some(last) if last.0 == id => merge(&mut last.1, &v),
            _ => out.push((id, v)),
        }
    }
    out
}

/// Merges per-id vectors of several folds (global ids).
fn merge_dense<V: Monoid + Clone>(parts: Vec<Vec<Option<V>>>, n: usize) -> Vec<Option<V>> {
    let mut out: Vec<Option<V>> = Vec::new();
    for p in parts {
        if out.is_empty() {
            out = p;
            out.resize_with(n, || None);
            continue;
        }
        for (o, v) in out.iter_mut().zip(p) {
            if let Some(v) = v {
                match o {
                    Some(o) => o.merge(&v),
                    None => *o = Some(v),
                }
            }
        }
    }
    out
}

/// The entries with first id in `lo..hi` of several sorted, compacted lists, as one such list.
fn gather<T: Copy, K: Ord>(
    parts: &[Vec<T>],
    lo: K,
    hi: K,
    first: impl Fn(&T) -> K,
    compact: fn(&mut Vec<T>),
) -> Vec<T> {
    let mut out = Vec::new();
    let mut from = 0;
    for p in parts {
        let a = p.partition_point(|e| first(e) < lo);
        let b = p.partition_point(|e| first(e) < hi);
        if a < b {
            out.extend_from_slice(&p[a..b]);
            from += 1;
        }
    }
    if from > 1 {
        compact(&mut out);
    }
    out
}

impl Job {
    fn run(self, names: &AllNames) -> Entries {
        let item = |id: u32| names.items.names[id as usize].clone();
        match self {
            Job::Items(parts) => merge_dense(parts, names.items.names.len())
                .into_iter()
                .enumerate()
                .filter_map(|(id, s)| Some((ViewKey::Item(item(id as u32)), Partial::Item(s?))))
                .collect(),
            Job::Devices(parts) => merge_dense(parts, names.devices.names.len())
                .into_iter()
                .enumerate()
                .filter_map(|(id, s)| {
                    let name = names.devices.names[id].clone();
                    Some((ViewKey::Device(name), Partial::Device(s?)))
                })
                .collect(),
            Job::ItemSeries(gran, start, parts) => merge_cells(parts, ItemStats::merge)
                .into_iter()
                .map(|(id, s)| {
                    let key = ViewKey::ItemSeries {
                        gran,
                        start,
                        item: item(id),
                    };
                    (key, Partial::Item(s))
                })
                .collect(),
            Job::Series(grans) => Gran::ALL
                .into_iter()
                .zip(grans)
                .flat_map(|(gran, m)| {
                    m.into_iter().map(move |(start, s)| {
                        (ViewKey::Series { gran, start }, Partial::Series(s))
                    })
                })
                .collect(),
            Job::ItemDayUsers(parts, day, lo, hi) => {
                let regs = gather(&parts, (day, lo), (day, hi), |e| (e.0, e.1), compact_regs);
                regs.chunk_by(|a, b| a.1 == b.1)
                    .map(|run| {
                        let set: Vec<(u16, u8)> = run
                            .iter()
                            .map(|e| ((e.2 >> 8) as u16, (e.2 & 0xff) as u8))
                            .collect();
                        let key = ViewKey::ItemDayUsers {
                            day,
                            item: item(run[0].1),
                        };
                        (key, Partial::Distinct(Hll::from_registers(&set)))
                    })
                    .collect()
            }
            Job::UserItems(basis, parts, lo, hi) => {
                let seen = gather(&parts, lo, hi, |e| e.0, compact_seen);
                seen.chunk_by(|a, b| a.0 == b.0)
                    .map(|run| {
                        let recent: BTreeMap<Name, Millis> =
                            run.iter().map(|e| (item(e.1), e.2)).collect();
                        let user = names.users.names[run[0].0 as usize].clone();
                        (
                            ViewKey::UserItems { basis, user },
                            Partial::Recent(Recent(recent)),
                        )
                    })
                    .collect()
            }
            Job::ItemUsers(basis, parts, lo, hi) => {
                let pairs = gather(&parts, lo, hi, |e| e.0, compact_pairs);
                pairs
                    .chunk_by(|a, b| a.0 == b.0)
                    .map(|run| {
                        let users: BTreeSet<Name> = run
                            .iter()
                            .map(|e| names.users.names[e.1 as usize].clone())
                            .collect();
                        let key = ViewKey::ItemUsers {
                            basis,
                            item: item(run[0].0),
                        };
                        (key, Partial::Set(Set(users)))
                    })
                    .collect()
            }
            Job::DeviceMetricHours(mut cells) => {
                cells.sort_unstable_by_key(|c| c.0);
                let mut merged: Vec<((Millis, u32, u32), DeviceStats)> = Vec::new();
                for (k, s) in cells {
                    match merged.last_mut() {
                        Some(last) if last.0 == k => last.1.merge(&s),
                        _ => merged.push((k, s)),
                    }
                }
                merged
                    .into_iter()
                    .map(|((start, d, m), s)| {
                        let key = ViewKey::DeviceMetricHour {
                            start,
                            device: names.devices.names[d as usize].clone(),
                            metric: names.metrics.names[m as usize].clone(),
                        };
                        (key, Partial::Device(s))
                    })
                    .collect()
            }
        }
    }
}

/// Users or items per job of the set views.
const LIST_CHUNK: usize = 4096;

/// A fold's views with its ids replaced by the merge's global ids.
struct Global {
    item_totals: Vec<Option<ItemStats>>,
    devices: Vec<Option<DeviceStats>>,
    item_series: [Vec<(Millis, Cells<ItemStats>)>; 3],
    /// (day, item, register) in global ids, sorted and compacted.
    item_day_users: Vec<Reg<Millis>>,
    /// Per basis: (user, item, time) in global ids, sorted and compacted.
    user_items: [Vec<Seen>; 2],
    /// Per basis: (item, user) in global ids, sorted and compacted.
    item_users: [Vec<(u32, u32)>; 2],
    device_metric_hours: Vec<((Millis, u32, u32), DeviceStats)>,
    series: [FastMap<Millis, SeriesStats>; 3],
}

fn to_global<T>(local: Vec<Option<T>>, map: &[u32], n: usize) -> Vec<Option<T>> {
    let mut out: Vec<Option<T>> = Vec::new();
    out.resize_with(n, || None);
    for (id, v) in local.into_iter().enumerate() {
        if let (Some(v), Some(&g)) = (v, map.get(id)) {
            if let Some(o) = out.get_mut(g as usize) {
                *o = Some(v);
            }
        }
    }
    out
}

fn grid_to_global<V>(grid: Grid<V>, map: &[u32]) -> Vec<(Millis, Vec<(u32, V)>)> {
    grid.buckets
        .into_iter()
        .map(|b| {
            let cells = b
                .cells
                .into_iter()
                .map(|(id, v)| (map[id as usize], v))
                .collect();
            (b.start, cells)
        })
        .collect()
}

impl IdFold {
    fn into_global(self, k: usize, names: &AllNames) -> Global {
        let items = &names.items.maps[k];
        let users = &names.users.maps[k];
        let devices = &names.devices.maps[k];
        let metrics = &names.metrics.maps[k];
        let [s0, s1, s2] = self.item_series;
        let [ui0, ui1] = self.user_items;
        let [iu0, iu1] = self.item_users;
        let user_items = |seen: Appended<Seen>| {
            let mut list = seen.list;
            for e in &mut list {
                *e = (users[e.0 as usize], items[e.1 as usize], e.2);
            }
            compact_seen(&mut list);
            list
        };
        let item_users = |pairs: Appended<(u32, u32)>| {
            let mut list = pairs.list;
            for e in &mut list {
                *e = (items[e.0 as usize], users[e.1 as usize]);
            }
            compact_pairs(&mut list);
            list
        };
        Global {
            item_totals: to_global(self.item_totals, items, names.items.names.len()),
            devices: to_global(self.devices_stats, devices, names.devices.names.len()),
            item_series: [
                grid_to_global(s0, items),
                grid_to_global(s1, items),
                grid_to_global(s2, items),
            ],
            item_day_users: {
                let days = &self.days.starts;
                let mut list: Vec<Reg<Millis>> = self
                    .item_day_users
                    .list
                    .into_iter()
                    .map(|(d, i, r)| (days[d as usize], items[i as usize], r))
                    .collect();
                compact_regs(&mut list);
                list
            },
            user_items: [user_items(ui0), user_items(ui1)],
            item_users: [item_users(iu0), item_users(iu1)],
            device_metric_hours: self
                .device_metric_hours
                .into_iter()
                .map(|((t, d, m), s)| ((t, devices[d as usize], metrics[m as usize]), s))
                .collect(),
            series: self.series,
        }
    }

    /// Merges the folds of several partitions and returns every (key, partial) of the union,
    /// in key order: the concatenation of the chunks is sorted and has no key twice. Runs on
    /// rayon's pool.
    pub fn into_entries(parts: Vec<IdFold>) -> Vec<Entries> {
        let names = {
            let pick = |f: fn(&IdFold) -> &Interner| parts.iter().map(f).collect::<Vec<_>>();
            AllNames {
                items: Names::of(&pick(|p| &p.items)),
                users: Names::of(&pick(|p| &p.users)),
                devices: Names::of(&pick(|p| &p.devices)),
                metrics: Names::of(&pick(|p| &p.metrics)),
            }
        };
        let names = Arc::new(names);
        let globals: Vec<Global> = parts
            .into_par_iter()
            .enumerate()
            .map(|(k, p)| p.into_global(k, &names))
            .collect();
        let jobs = jobs(globals, &names);
        jobs.into_par_iter().map(|j| j.run(&names)).collect()
    }
}

/// Splits the folds' views into jobs, in key order.
fn jobs(globals: Vec<Global>, names: &AllNames) -> Vec<Job> {
    let (n_items, n_users) = (names.items.names.len(), names.users.names.len());
    let mut item_totals = Vec::new();
    let mut devices = Vec::new();
    let mut item_series: [BTreeMap<Millis, Vec<Cells<ItemStats>>>; 3] = Default::default();
    let mut day_users: Vec<Vec<Reg<Millis>>> = Vec::new();
    let mut user_items: [Vec<Vec<Seen>>; 2] = Default::default();
    let mut item_users: [Vec<Vec<(u32, u32)>>; 2] = Default::default();
    let mut dmh = Vec::new();
    let mut series: [BTreeMap<Millis, SeriesStats>; 3] = Default::default();
    for g in globals {
        item_totals.push(g.item_totals);
        devices.push(g.devices);
        for (all, grid) in item_series.iter_mut().zip(g.item_series) {
            for (start, cells) in grid {
                all.entry(start).or_default().push(cells);
            }
        }
        day_users.push(g.item_day_users);
        for (all, list) in user_items.iter_mut().zip(g.user_items) {
            all.push(list);
        }
        for (all, list) in item_users.iter_mut().zip(g.item_users) {
            all.push(list);
        }
        dmh.extend(g.device_metric_hours);
        for (all, m) in series.iter_mut().zip(g.series) {
            for (start, s) in m {
                match all.get_mut(&start) {
                    Some(a) => a.merge(&s),
                    None => {
                        all.insert(start, s);
                    }
                }
            }
        }
    }
    let mut jobs = vec![Job::Items(item_totals), Job::Devices(devices)];
    for (gran, buckets) in Gran::ALL.into_iter().zip(item_series) {
        for (start, parts) in buckets {
            jobs.push(Job::ItemSeries(gran, start, parts));
        }
    }
    jobs.push(Job::Series(series));
    let mut days: Vec<Millis> = day_users.iter().flatten().map(|e| e.0).collect();
    days.dedup();
    days.sort_unstable();
    days.dedup();
    let day_users = Arc::new(day_users);
    for day in days {
        for lo in (0..n_items).step_by(LIST_CHUNK) {
            let hi = (lo + LIST_CHUNK).min(n_items);
            jobs.push(Job::ItemDayUsers(
                day_users.clone(),
                day,
                lo as u32,
                hi as u32,
            ));
        }
    }
    for (basis, parts) in Basis::ALL.into_iter().zip(user_items) {
        let parts = Arc::new(parts);
        for lo in (0..n_users).step_by(LIST_CHUNK) {
            let hi = (lo + LIST_CHUNK).min(n_users);
            jobs.push(Job::UserItems(basis, parts.clone(), lo as u32, hi as u32));
        }
    }
    for (basis, parts) in Basis::ALL.into_iter().zip(item_users) {
        let parts = Arc::new(parts);
        for lo in (0..n_items).step_by(LIST_CHUNK) {
            let hi = (lo + LIST_CHUNK).min(n_items);
            jobs.push(Job::ItemUsers(basis, parts.clone(), lo as u32, hi as u32));
        }
    }
    jobs.push(Job::DeviceMetricHours(dmh));
    jobs
}

#[cfg(test)]
mod tests {
    use super::super::tests::arb_event;
    use super::*;
    use crate::views::ViewSet;
    use proptest::prelude::*;

    fn keyed(events: &[Event]) -> Vec<(ViewKey, Partial)> {
        let mut v = ViewSet::default();
        events.iter().for_each(|e| v.fold(e));
        let mut entries: Vec<_> = v.entries.into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries
    }

    fn by_ids(events: &[Event], cuts: &[usize]) -> Vec<(ViewKey, Partial)> {
        let mut parts = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&events.len()]) {
            let mut f = IdFold::new();
            events[start..end].iter().for_each(|e| f.fold(e));
            parts.push(f);
            start = end;
        }
        IdFold::into_entries(parts).into_iter().flatten().collect()
    }

    proptest! {
        #[test]
        fn id_fold_equals_the_keyed_fold(
            events in proptest::collection::vec(arb_event(), 0..300),
            cuts in proptest::collection::vec(0..300usize, 0..4),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(events.len())).collect();
            cuts.sort_unstable();
            prop_assert_eq!(by_ids(&events, &cuts), keyed(&events));
        }

        #[test]
        fn id_fold_of_events_in_any_order_and_split(
            events in proptest::collection::vec(arb_event(), 0..200),
            seed in 0..1000u64,
        ) {
            // Events dealt round-robin to parts, as partitions interleave in time.
            let parts = (seed % 4 + 1) as usize;
            let mut dealt: Vec<Event> = Vec::new();
            for k in 0..parts {
                dealt.extend(events.iter().skip(k).step_by(parts).cloned());
            }
            let cuts: Vec<usize> = (1..parts).map(|k| {
                (0..k).map(|j| events.iter().skip(j).step_by(parts).count()).sum()
            }).collect();
            prop_assert_eq!(by_ids(&dealt, &cuts), keyed(&events));
        }
    }

    #[test]
    fn series_delta_add_is_the_merge_of_its_stats() {
        let d = SeriesDelta {
            type_index: 2,
            events: 1,
            quantity: 3,
            revenue_micros: 7,
            user: Some("u1"),
        };
        let mut a = SeriesStats::default();
        a.add(&d, d.user.map(hash64));
        let mut b = SeriesStats::default();
        b.merge(&d.to_stats());
        assert_eq!(a, b);
    }

    #[test]
    fn id_fold_of_a_generated_stream_equals_the_keyed_fold() {
        use crate::generate::{Class, GenConfig, Generator};
        let mut cfg = GenConfig::new(7, 30_000, 1_795_600_000_000);
        cfg.patterns = true;
        let events: Vec<Event> = Generator::new(cfg)
            .filter_map(|g| match g.class {
                Class::Event(e) => Some(e),
                _ => None,
            })
            .collect();
        let n = events.len();
        let got = by_ids(&events, &[n / 5, n / 2, n / 2 + 17]);
        let want = keyed(&events);
        assert!(want.len() > 1_000, "{} keys", want.len());
        assert!(
            want.iter()
                .any(|(_, p)| matches!(p, Partial::Series(s) if matches!(s.users, Hll::Dense(_)))),
            "some sketch is dense"
        );
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w);
        }
    }
}
