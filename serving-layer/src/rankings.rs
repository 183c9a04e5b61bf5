//! Per-item totals over a window, and the rankings read from them, computed once per state of
//! what they come from instead of once per request.
//!
//! A window's totals are the merge of three parts: the batch version's buckets, the speed blocks
//! every partition has consumed past (never written again until a batch version covers them),
//! and each partition's last block, which the speed layer may still be writing. The first two
//! are kept as one [`Base`] per batch version and window start, extended by the blocks finished
//! since when it is asked for again; the last blocks are read for each request. A ranking of the
//! base (items by one count, in one category; trending scores) is sorted once per base, on first
//! use. A query's answer is then exact without sorting every item: an item the last blocks do
//! not touch has the base's totals, so its place in the base's ranking stands; the items they do
//! touch are ranked from their merged totals. The top `n` are among those and the first `n` of
//! the base's ranking that the last blocks do not touch.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};

use strata_common::handoff::{BlockRange, Partition};
use strata_common::speed_store::{scan_layer, LiveLayer};
use strata_common::views::{FastMap, ItemStats, Monoid, Name, ViewKey};

use crate::error::ApiError;
use crate::state::{
    blocks_since, in_totals, item_total, totals_range, AsOf, Merge, PerState, StateId, Totals,
    TotalsKey,
};

/// How many bases are kept (the least recently asked go first).
const BASES_KEPT: usize = 8;

/// How many rankings one base keeps before it drops them all and starts again.
const RANKINGS_KEPT: usize = 64;

/// A window's totals over a batch version and the finished speed blocks, by item number.
pub struct Base {
    version: Option<u64>,
    key: TotalsKey,
    /// The finished speed blocks merged in.
    done: Vec<BlockRange>,
    /// A number for this base, unique in the process (for keys of what is derived from it).
    pub stamp: u64,
    names: Vec<Name>,
    stats: Vec<ItemStats>,
    numbers: FastMap<Name, u32>,
    /// Rankings asked of this base, by what they rank.
    rankings: Mutex<FastMap<RankKey, Arc<Vec<u32>>>>,
}

/// What a ranking orders items by: one event type's count, and, if any, the one category kept.
pub type RankKey = (&'static str, Option<Name>);

impl Base {
    fn build(version: Option<u64>, key: TotalsKey, done: Vec<BlockRange>, totals: Totals) -> Self {
        static STAMPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut rows: Vec<(Name, ItemStats)> = totals.into_iter().collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let numbers = (rows.iter().enumerate())
            .map(|(i, (n, _))| (n.clone(), i as u32))
            .collect();
        let (names, stats) = rows.into_iter().unzip();
        Base {
            version,
            key,
            done,
            stamp: STAMPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            names,
            stats,
            numbers,
            rankings: Mutex::default(),
        }
    }

    fn totals(&self) -> Totals {
        (self.names.iter().cloned())
            .zip(self.stats.iter().cloned())
            .collect()
    }

    /// The number of an item, if the base holds it.
    pub fn number(&self, item: &str) -> Option<u32> {
        self.numbers.get(item).copied()
    }

    pub fn name(&self, n: u32) -> &Name {
        &self.names[n as usize]
    }

    pub fn stats(&self, n: u32) -> &ItemStats {
        &self.stats[n as usize]
    }

    pub fn get(&self, item: &str) -> Option<&ItemStats> {
        self.number(item).map(|n| self.stats(n))
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The items with a count of `event_type` above 0 (in `category`, if one), most first, ties
    /// by name: sorted once, on first use.
    pub fn ranking(&self, event_type: &'static str, category: Option<&str>) -> Arc<Vec<u32>> {
        let key = (event_type, category.map(Name::from));
        let kept = self.rankings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = kept.get(&key) {
            return r.clone();
        }
        drop(kept);
        let count = |n: u32| self.stats(n).count(event_type).unwrap_or(0);
        let mut ranked: Vec<u32> = (0..self.names.len() as u32)
            .filter(|&n| count(n) > 0)
            .filter(|&n| category.is_none() || self.stats(n).category.as_deref() == category)
            .collect();
        ranked.sort_unstable_by(|&a, &b| count(b).cmp(&count(a)).then_with(|| a.cmp(&b)));
        let ranked = Arc::new(ranked);
        let mut kept = self.rankings.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= RANKINGS_KEPT {
            kept.clear();
        }
        kept.insert(key, ranked.clone());
        ranked
    }
}

/// What each partition's last block adds to a base, read once per state and window: the
/// items touched, with their merged totals (the base's and the last blocks'), and by base
/// number whether an item is touched. What a query ranks them by is sorted once per state too
/// (on first use), so that a request reads the first few of a ranking instead of every item
/// touched.
#[derive(Default)]
pub struct Open {
    merged: Totals,
    touched: Vec<bool>,
    /// Per event type: the touched items with a count above 0, most first, ties by name.
    rankings: Mutex<FastMap<&'static str, Arc<OpenRanking>>>,
}

/// Touched items of one ranking: (item, merged count, category).
type OpenRanking = Vec<(Name, u64, Option<Name>)>;

/// A trending answer's row: item, score, recent count, baseline count without the recent one.
pub type TrendRow = (Name, f64, u64, u64);

impl Open {
    /// `adds` (the last blocks' totals) over `base`.
    fn over(base: &Base, adds: Totals) -> Self {
        let mut touched = vec![false; base.len()];
        let merged = (adds.into_iter())
            .map(|(item, s)| {
                let merged = match base.number(&item) {
                    Some(n) => {
                        touched[n as usize] = true;
                        let mut m = base.stats(n).clone();
                        m.merge(&s);
                        m
                    }
                    None => s,
                };
                (item, merged)
            })
            .collect();
        Open {
            merged,
            touched,
            ..Open::default()
        }
    }

    /// Whether the last blocks touch an item.
    pub fn touches(&self, item: &str) -> bool {
        self.merged.contains_key(item)
    }

    /// The touched items with a count of `event_type` above 0, most first, ties by name.
    fn ranking(&self, event_type: &'static str) -> Arc<OpenRanking> {
        let kept = self.rankings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = kept.get(event_type) {
            return r.clone();
        }
        drop(kept);
        let mut ranked: OpenRanking = (self.merged.iter())
            .filter_map(|(item, s)| {
                let c = s.count(event_type).filter(|&c| c > 0)?;
                Some((item.clone(), c, s.category.clone()))
            })
            .collect();
        ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let ranked = Arc::new(ranked);
        let mut kept = self.rankings.lock().unwrap_or_else(|e| e.into_inner());
        kept.entry(event_type).or_insert(ranked).clone()
    }
}

/// Per-item totals over a window in one merge: the base and the last blocks' share.
pub struct ItemTotals {
    pub base: Arc<Base>,
    pub open: Arc<Open>,
}

impl ItemTotals {
    /// One item's merged totals.
    pub fn get(&self, item: &str) -> Option<&ItemStats> {
        self.open.merged.get(item).or_else(|| self.base.get(item))
    }

    /// Calls `f` with each item the last blocks touch and its merged totals.
    pub fn for_each_open<'a>(&'a self, mut f: impl FnMut(&'a Name, &'a ItemStats)) {
        for (item, s) in self.open.merged.iter() {
            f(item, s);
        }
    }

    /// The `limit` items with the most events of `event_type` (in `category`, if one), most
    /// first, ties by name: those the last blocks touch, ranked from their merged totals, and
    /// the first `limit` of the base's ranking that they do not touch.
    pub fn top(
        &self,
        event_type: &'static str,
        category: Option<&str>,
        limit: usize,
    ) -> Vec<(Name, u64)> {
        let mut ranked: Vec<(Name, u64)> = Vec::new();
        // The touched items' ranking is in the same order as the answer, so the first `limit`
        // of it in the category are the only touched ones that can be in the answer.
        let open = self.open.ranking(event_type);
        let in_category = (open.iter())
            .filter(|(_, _, c)| category.is_none() || c.as_deref() == category)
            .take(limit);
        for (item, c, _) in in_category {
            ranked.push((item.clone(), *c));
        }
        let order = self.base.ranking(event_type, category);
        for n in self.untouched(&order).take(limit) {
            let b = &self.base;
            ranked.push((b.name(n).clone(), b.stats(n).count(event_type).unwrap_or(0)));
        }
        top_n(&mut ranked, limit, |a, b| {
            b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0))
        });
        ranked
    }

    /// The items of `ranking` (of the base) that the last blocks do not touch, in its order:
    /// their merged totals are the base's.
    pub fn untouched<'a>(&'a self, ranking: &'a [u32]) -> impl Iterator<Item = u32> + 'a {
        let touched = &self.open.touched;
        (ranking.iter().copied())
            .filter(move |&n| !touched.get(n as usize).copied().unwrap_or(false))
    }
}

/// The slot of `key` among `kept` (made empty if there is none), now the most recently asked;
/// the least recently asked go first past [`BASES_KEPT`].
fn slot_of<K: PartialEq, T>(kept: &Slots<K, T>, key: K) -> Slot<T> {
    let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
    let slot = match kept.iter().position(|(k, _)| *k == key) {
        Some(i) => kept.remove(i).1,
        None => Arc::default(),
    };
    if kept.len() >= BASES_KEPT {
        kept.remove(0);
    }
    kept.push((key, slot.clone()));
    slot
}

/// The order of trend rows: best score first, ties by name.
fn trend_order(a: &TrendRow, b: &TrendRow) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0))
}

/// The bases asked for lately, and the trending rankings read from them.
#[derive(Default)]
pub struct TotalsMemo {
    kept: Mutex<Vec<Arc<Base>>>,
    trending: Mutex<FastMap<TrendKey, Arc<Vec<u32>>>>,
    /// The last blocks' totals per window, for one state: read by one request of the state
    /// while the others wait, then shared.
    open: Mutex<PerState<FastMap<TotalsKey, Arc<Open>>>>,
    /// Per live layer (by address, held) and window: the layer's per-item totals.
    layers: Mutex<FastMap<(usize, TotalsKey), LayerTotals>>,
    /// Per window, its totals kept current for rankings (the least recently asked first).
    current: Mutex<Vec<(TotalsKey, CurrentSlot)>>,
    /// Per pair of windows (and their hours), their totals kept current for trending.
    trend_current: Mutex<Vec<(TrendId, TrendSlot)>>,
}

/// Which [`TrendCurrent`]: the recent and the baseline window, and their hours (as bits).
type TrendId = (TotalsKey, TotalsKey, u64, u64);

/// One pair of windows' [`TrendCurrent`], locked while it is moved forward and read.
type TrendSlot = Arc<Mutex<Option<TrendCurrent>>>;

/// A trending ranking's key: the score's bits (non-negative floats order as their bits), best
/// first, then the item.
type ScoreKey = (Reverse<u64>, Name);

/// Two windows' totals kept current together (see [`Current`]), for trending: per event type
/// and least recent count asked for, the items the last blocks touch in either window, by
/// trend score, kept sorted as their totals move.
pub struct TrendCurrent {
    recent: Current,
    baseline: Current,
    hours: (f64, f64),
    rankings: FastMap<(&'static str, u64), BTreeSet<ScoreKey>>,
}

impl TrendCurrent {
    /// `item`'s trend row, if it has at least `min_support` events of `event_type` in the
    /// recent window.
    fn row(&self, item: &Name, event_type: &'static str, min_support: u64) -> Option<TrendRow> {
        let count = |c: &Current| {
            (c.merged.get(item))
                .or_else(|| c.base.get(item))
                .and_then(|s| s.count(event_type))
        };
        let r = count(&self.recent).filter(|&r| r >= min_support)?;
        let (before, score) = trend(
            r,
            count(&self.baseline).unwrap_or(r),
            self.hours.0,
            self.hours.1,
        );
        Some((item.clone(), score, r, before))
    }

    fn touched(&self, item: &Name) -> bool {
        self.recent.merged.contains_key(item) || self.baseline.merged.contains_key(item)
    }

    /// Adds what the last blocks added since: per item, its totals and whether they count in
    /// the recent window and in the baseline.
    fn add(&mut self, deltas: &[(&Name, &ItemStats, bool, bool)]) {
        let mut items: Vec<&Name> = deltas.iter().map(|d| d.0).collect();
        items.sort_unstable();
        items.dedup();
        let keys: Vec<(&'static str, u64)> = self.rankings.keys().copied().collect();
        // Only touched items are in the rankings.
        let was_touched: Vec<&Name> = items.iter().copied().filter(|i| self.touched(i)).collect();
        for item in &was_touched {
            for &(t, min) in &keys {
                if let Some((_, score, ..)) = self.row(item, t, min) {
                    if let Some(r) = self.rankings.get_mut(&(t, min)) {
                        r.remove(&(Reverse(score.to_bits()), (*item).clone()));
                    }
                }
            }
        }
        for &(item, s, in_recent, in_baseline) in deltas {
            if in_recent {
                self.recent.add(item, s);
            }
            if in_baseline {
                self.baseline.add(item, s);
            }
        }
        for item in &items {
            for &(t, min) in &keys {
                if let Some((_, score, ..)) = self.row(item, t, min) {
                    if let Some(r) = self.rankings.get_mut(&(t, min)) {
                        r.insert((Reverse(score.to_bits()), (*item).clone()));
                    }
                }
            }
        }
    }

    /// The `limit` items with at least `min_support` events of `event_type` in the recent
    /// window that trend most, best first, ties by name: the first `limit` touched ones, and
    /// the first `limit` of the bases' trending `order` that neither window's last blocks
    /// touch.
    fn top(
        &mut self,
        order: &[u32],
        event_type: &'static str,
        min_support: u64,
        limit: usize,
    ) -> Vec<TrendRow> {
        let mut rows = self.top_touched(event_type, min_support, limit);
        let (recent, baseline) = (&self.recent, &self.baseline);
        let untouched = (order.iter().copied())
            .filter(|&n| !recent.touched.get(n as usize).copied().unwrap_or(false))
            .filter(|&n| !baseline.merged.contains_key(recent.base.name(n)))
            .take(limit);
        for n in untouched {
            if let Some(row) = self.row(recent.base.name(n), event_type, min_support) {
                rows.push(row);
            }
        }
        top_n(&mut rows, limit, trend_order);
        rows
    }

    /// The first `limit` of the touched items' trend rows, best first, ties by name.
    fn top_touched(
        &mut self,
        event_type: &'static str,
        min_support: u64,
        limit: usize,
    ) -> Vec<TrendRow> {
        if !self.rankings.contains_key(&(event_type, min_support)) {
            let mut items: Vec<&Name> = (self.recent.merged.keys())
                .chain(self.baseline.merged.keys())
                .collect();
            items.sort_unstable();
            items.dedup();
            let ranked: BTreeSet<ScoreKey> = (items.into_iter())
                .filter_map(|i| self.row(i, event_type, min_support))
                .map(|(i, score, ..)| (Reverse(score.to_bits()), i))
                .collect();
            self.rankings.insert((event_type, min_support), ranked);
        }
        let Some(ranked) = self.rankings.get(&(event_type, min_support)) else {
            return Vec::new();
        };
        (ranked.iter())
            .take(limit)
            .filter_map(|(_, i)| self.row(i, event_type, min_support))
            .collect()
    }
}

/// A live layer, weakly (its address stays its own while the weak pointer lives, but its
/// partials go when the last reader lets it go), and its per-item totals.
type LayerTotals = (Weak<LiveLayer>, Arc<Totals>);

/// What is kept current for one window (or pair), locked while it is moved forward and read.
type Slot<T> = Arc<Mutex<Option<T>>>;

/// Slots by what they are of, the least recently asked first.
type Slots<K, T> = Mutex<Vec<(K, Slot<T>)>>;

/// One window's [`Current`].
type CurrentSlot = Slot<Current>;

/// One window's totals kept current for rankings. A live stream makes a new state every few
/// milliseconds, and reading every item the last blocks touch for each state cost more than the
/// requests themselves; instead, the totals are moved from one state to the next by what the
/// speed journal says the last blocks added in between, and each ranking of the touched items
/// is kept sorted as they move. A request then reads the first entries of two rankings. A
/// request of an earlier state than the one kept is answered from the kept one (a later state,
/// exact as of its own `as_of`); read again whole when the base changes (a batch version, a
/// block finished, the window moved on) or the journal does not chain.
pub struct Current {
    state: StateId,
    base: Arc<Base>,
    /// The last blocks covered, and each partition's next offset covered in them.
    open: Vec<BlockRange>,
    covered: BTreeMap<Partition, i64>,
    /// The items the last blocks touch, with their merged totals (the base's and theirs).
    merged: Totals,
    /// By base number: whether the last blocks touch an item.
    touched: Vec<bool>,
    /// Per event type asked for: the touched items with a count above 0, most first, ties by
    /// name.
    rankings: FastMap<&'static str, BTreeSet<(Reverse<u64>, Name)>>,
    as_of: AsOf,
    flushed_at: Option<i64>,
}

impl Current {
    /// `adds` (the last blocks `open`'s totals, as of next offsets `covered`) over `base`, in
    /// state `at`.
    fn build(
        base: Arc<Base>,
        (open, covered): (Vec<BlockRange>, BTreeMap<Partition, i64>),
        adds: Totals,
        (at, as_of, flushed_at): (StateId, AsOf, Option<i64>),
    ) -> Self {
        let Open {
            merged, touched, ..
        } = Open::over(&base, adds);
        Current {
            state: at,
            base,
            open,
            covered,
            merged,
            touched,
            rankings: FastMap::default(),
            as_of,
            flushed_at,
        }
    }

    fn moved_to(&mut self, m: &Merge<'_>, at: StateId, covered: BTreeMap<Partition, i64>) {
        self.state = at;
        self.covered = covered;
        self.as_of = m.as_of.clone();
        self.flushed_at = m.speed_meta.flushed_at;
    }

    /// The state's `as_of`, its age taken now.
    fn as_of(&self) -> AsOf {
        let mut a = self.as_of.clone();
        if let Some(t) = self.flushed_at {
            a.speed.age_ms = Some((strata_common::time::now_millis() - t).max(0));
        }
        a
    }

    /// Adds what the last blocks added to one item since.
    fn add(&mut self, item: &Name, s: &ItemStats) {
        let before = self.merged.get(item).cloned();
        let after = match self.merged.get_mut(item) {
            Some(m) => {
                m.merge(s);
                m.clone()
            }
            None => {
                let mut m = match self.base.number(item) {
                    Some(n) => {
                        self.touched[n as usize] = true;
                        self.base.stats(n).clone()
                    }
                    None => ItemStats::default(),
                };
                m.merge(s);
                self.merged.insert(item.clone(), m.clone());
                m
            }
        };
        // An item touched before moves within the touched ones' rankings; one touched now for
        // the first time joins them (and leaves the base's, by `touched`).
        for (t, ranked) in self.rankings.iter_mut() {
            if let Some(old) = before.as_ref().and_then(|b| b.count(t)).filter(|&c| c > 0) {
                ranked.remove(&(Reverse(old), item.clone()));
            }
            if let Some(new) = after.count(t).filter(|&c| c > 0) {
                ranked.insert((Reverse(new), item.clone()));
            }
        }
    }

    /// Sorts the touched items with a count of `event_type` above 0, most first, ties by
    /// name, unless that ranking is kept already.
    fn rank(&mut self, event_type: &'static str) {
        let merged = &self.merged;
        self.rankings.entry(event_type).or_insert_with(|| {
            (merged.iter())
                .filter_map(|(item, s)| {
                    let c = s.count(event_type).filter(|&c| c > 0)?;
                    Some((Reverse(c), item.clone()))
                })
                .collect()
        });
    }

    /// The `limit` items with the most events of `event_type` (in `category`, if one), most
    /// first, ties by name: the first `limit` touched ones in the category, and the first
    /// `limit` of the base's ranking that are not touched.
    fn top(
        &mut self,
        event_type: &'static str,
        category: Option<&str>,
        limit: usize,
    ) -> Vec<(Name, u64)> {
        let mut rows: Vec<(Name, u64)> = Vec::new();
        self.rank(event_type);
        let Some(ranking) = self.rankings.get(event_type) else {
            return rows;
        };
        let merged = &self.merged;
        let in_category = |item: &Name| {
            category.is_none() || merged.get(item).and_then(|s| s.category.as_deref()) == category
        };
        for (Reverse(c), item) in ranking.iter().filter(|(_, i)| in_category(i)).take(limit) {
            rows.push((item.clone(), *c));
        }
        let order = self.base.ranking(event_type, category);
        let touched = &self.touched;
        let untouched = (order.iter().copied())
            .filter(|&n| !touched.get(n as usize).copied().unwrap_or(false))
            .take(limit);
        for n in untouched {
            let b = &self.base;
            rows.push((b.name(n).clone(), b.stats(n).count(event_type).unwrap_or(0)));
        }
        top_n(&mut rows, limit, |a, b| {
            b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0))
        });
        rows
    }
}

/// How many live layers' totals are kept (per window) before they are all dropped: a live
/// block is held in at most a few layers per partition.
const LAYERS_KEPT: usize = 64;

/// Which trending ranking: the recent and the baseline window's bases, the event type and the
/// least recent count.
type TrendKey = (u64, u64, &'static str, u64);

/// How an item trends: its recent count, its baseline count without the recent one, and its
/// score, the recent rate against the baseline rate (plus one event, so that an item new in the
/// recent window has a finite score).
pub fn trend(recent: u64, baseline: u64, recent_hours: f64, rest_hours: f64) -> (u64, f64) {
    let before = baseline.saturating_sub(recent);
    let score = (recent as f64 / recent_hours) / ((before as f64 + 1.0) / rest_hours);
    (before, score)
}

impl TotalsMemo {
    /// Per-item totals over the buckets `key` names, in the state of `m`.
    pub fn totals(&self, m: &Merge<'_>, key: TotalsKey) -> Result<ItemTotals, ApiError> {
        let (done, open_blocks) = m.speed_blocks();
        let base = self.base(m, key, done)?;
        let read = || -> Result<Arc<Open>, ApiError> {
            let adds = self.open_adds(m, key, &open_blocks)?;
            Ok(Arc::new(Open::over(&base, adds)))
        };
        let Some(at) = m.state_id else {
            let open = read()?;
            return Ok(ItemTotals { base, open });
        };
        let mut kept = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let open = match kept.for_state(at) {
            Some(per_window) => match per_window.get(&key) {
                Some(open) => open.clone(),
                None => {
                    let open = read()?;
                    if per_window.len() >= RANKINGS_KEPT {
                        per_window.clear();
                    }
                    per_window.insert(key, open.clone());
                    open
                }
            },
            // Kept for a later state: read for this one alone.
            None => {
                drop(kept);
                read()?
            }
        };
        Ok(ItemTotals { base, open })
    }

    /// What the last blocks `open` add to the totals over the buckets `key` names.
    fn open_adds(
        &self,
        m: &Merge<'_>,
        key: TotalsKey,
        open: &[BlockRange],
    ) -> Result<Totals, ApiError> {
        let mut adds = Totals::default();
        let (prefix, start) = totals_range(key);
        m.scan_finished_in(open, &prefix, Some(&start), &mut |k, p| {
            if let Some((item, s)) = item_total(&k, &p) {
                adds.entry(item.clone()).or_default().merge(s);
            }
        })?;
        // A live block's layers outlive the state: each layer's totals are read once.
        for layer in m.live_layers(open)? {
            for (item, s) in self.layer_totals(&layer, key)?.iter() {
                adds.entry(item.clone()).or_default().merge(s);
            }
        }
        Ok(adds)
    }

    /// The `limit` items with the most events of `event_type` (in `category`, if one) over the
    /// buckets `key` names, most first, ties by name, and the state they are of: the state of
    /// `m`, or a later one (see [`Current`]).
    pub fn top(
        &self,
        m: &Merge<'_>,
        key: TotalsKey,
        event_type: &'static str,
        category: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(Name, u64)>, AsOf), ApiError> {
        let Some(at) = m.state_id else {
            let totals = self.totals(m, key)?;
            return Ok((totals.top(event_type, category, limit), m.as_of.clone()));
        };
        let slot = slot_of(&self.current, key);
        let mut cur = slot.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = (cur.as_ref()).is_some_and(|c| c.state == at || c.state.is_past(at));
        if !fresh {
            let (done, open) = m.speed_blocks();
            let base = self.base(m, key, done)?;
            let next = m.next_offsets(&open);
            let mut advanced = false;
            if let Some(c) = cur
                .as_mut()
                .filter(|c| c.base.stamp == base.stamp && c.open == open)
            {
                let range = totals_range(key);
                let in_window = |k: &[u8]| in_totals(k, &range);
                if let Some(deltas) = m.journal_since(&open, &c.covered, &next, in_window)? {
                    for (k, p) in &deltas {
                        if let Some((item, s)) = item_total(k, p) {
                            c.add(item, s);
                        }
                    }
                    c.moved_to(m, at, next.clone());
                    advanced = true;
                }
            }
            if !advanced {
                let adds = self.open_adds(m, key, &open)?;
                let state = (at, m.as_of.clone(), m.speed_meta.flushed_at);
                *cur = Some(Current::build(base, (open, next), adds, state));
            }
        }
        let Some(c) = cur.as_mut() else {
            return Err(ApiError::internal("no totals kept for the window"));
        };
        Ok((c.top(event_type, category, limit), c.as_of()))
    }

    /// The `limit` items of the window `keys.0` with at least `min_support` events of
    /// `event_type` that trend most against the baseline window `keys.1`, best first, ties by
    /// name (see [`TotalsMemo::trending_top`]), and the state they are of: the state of `m`, or
    /// a later one (see [`TrendCurrent`]).
    pub fn trending_now(
        &self,
        m: &Merge<'_>,
        keys: (TotalsKey, TotalsKey),
        event_type: &'static str,
        min_support: u64,
        hours: (f64, f64),
        limit: usize,
    ) -> Result<(Vec<TrendRow>, AsOf), ApiError> {
        let Some(at) = m.state_id else {
            let recent = self.totals(m, keys.0)?;
            let baseline = self.totals(m, keys.1)?;
            let rows = self.trending_top(&recent, &baseline, event_type, min_support, hours, limit);
            return Ok((rows, m.as_of.clone()));
        };
        let id = (keys.0, keys.1, hours.0.to_bits(), hours.1.to_bits());
        let slot = slot_of(&self.trend_current, id);
        let mut cur = slot.lock().unwrap_or_else(|e| e.into_inner());
        let fresh =
            (cur.as_ref()).is_some_and(|c| c.recent.state == at || c.recent.state.is_past(at));
        if !fresh {
            let (done, open) = m.speed_blocks();
            let recent = self.base(m, keys.0, done.clone())?;
            let baseline = self.base(m, keys.1, done)?;
            let next = m.next_offsets(&open);
            let mut advanced = false;
            if let Some(c) = cur.as_mut().filter(|c| {
                c.recent.base.stamp == recent.stamp
                    && c.baseline.base.stamp == baseline.stamp
                    && c.recent.open == open
            }) {
                let ranges = (totals_range(keys.0), totals_range(keys.1));
                let in_range = in_totals;
                let in_either = |k: &[u8]| in_range(k, &ranges.0) || in_range(k, &ranges.1);
                let covered = c.recent.covered.clone();
                if let Some(deltas) = m.journal_since(&open, &covered, &next, in_either)? {
                    let deltas = (deltas.iter())
                        .filter_map(|(k, p)| {
                            let (item, s) = item_total(k, p)?;
                            let e = k.encode();
                            Some((item, s, in_range(&e, &ranges.0), in_range(&e, &ranges.1)))
                        })
                        .collect::<Vec<_>>();
                    c.add(&deltas);
                    c.recent.moved_to(m, at, next.clone());
                    c.baseline.moved_to(m, at, next.clone());
                    advanced = true;
                }
            }
            if !advanced {
                let state = (at, m.as_of.clone(), m.speed_meta.flushed_at);
                let adds = self.open_adds(m, keys.0, &open)?;
                let r = Current::build(recent, (open.clone(), next.clone()), adds, state.clone());
                let adds = self.open_adds(m, keys.1, &open)?;
                let b = Current::build(baseline, (open, next), adds, state);
                *cur = Some(TrendCurrent {
                    recent: r,
                    baseline: b,
                    hours,
                    rankings: FastMap::default(),
                });
            }
        }
        let Some(c) = cur.as_mut() else {
            return Err(ApiError::internal("no totals kept for the windows"));
        };
        let bases = (&*c.recent.base, &*c.baseline.base);
        let order = self.trending(bases, event_type, min_support, hours);
        Ok((
            c.top(&order, event_type, min_support, limit),
            c.recent.as_of(),
        ))
    }

    /// One live layer's per-item totals over the buckets `key` names: read once per layer and
    /// kept while the layer is among those asked for lately.
    fn layer_totals(
        &self,
        layer: &Arc<LiveLayer>,
        key: TotalsKey,
    ) -> Result<Arc<Totals>, ApiError> {
        let id = (Arc::as_ptr(layer) as usize, key);
        if let Some((_, t)) = (self.layers.lock().unwrap_or_else(|e| e.into_inner())).get(&id) {
            // The weak pointer keeps the address from being reused, so the entry is this
            // layer's.
            return Ok(t.clone());
        }
        let (prefix, start) = totals_range(key);
        let mut totals = Totals::default();
        let mut bad = false;
        scan_layer(
            layer,
            &start,
            &prefix,
            &mut |k, p| match ViewKey::decode(k) {
                Some(k) => {
                    if let Some((item, s)) = item_total(&k, p) {
                        totals.entry(item.clone()).or_default().merge(s);
                    }
                }
                None => bad = true,
            },
        );
        if bad {
            return Err(ApiError::internal(
                "a live block holds an undecodable view key",
            ));
        }
        let totals = Arc::new(totals);
        let mut kept = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= LAYERS_KEPT {
            // Layers merged away or of finished blocks are asked for no more: their readers let
            // them go.
            kept.retain(|_, (l, _)| l.strong_count() > 0);
            if kept.len() >= LAYERS_KEPT {
                kept.clear();
            }
        }
        kept.insert(id, (Arc::downgrade(layer), totals.clone()));
        Ok(totals)
    }

    /// The items of `recent`'s base with at least `min_support` events of `event_type`, by
    /// trend score over `baseline`'s base, best first, ties by name: sorted once per pair of
    /// bases.
    fn trending(
        &self,
        (r, b): (&Base, &Base),
        event_type: &'static str,
        min_support: u64,
        hours: (f64, f64),
    ) -> Arc<Vec<u32>> {
        let key = (r.stamp, b.stamp, event_type, min_support);
        if let Some(found) = (self.trending.lock().unwrap_or_else(|e| e.into_inner())).get(&key) {
            return found.clone();
        }
        let score = |n: u32| {
            let c = r.stats(n).count(event_type).unwrap_or(0);
            let base = (b.get(r.name(n))).and_then(|s| s.count(event_type));
            trend(c, base.unwrap_or(c), hours.0, hours.1).1
        };
        let mut ranked: Vec<(u32, f64)> = (0..r.len() as u32)
            .filter(|&n| r.stats(n).count(event_type).unwrap_or(0) >= min_support)
            .map(|n| (n, score(n)))
            .collect();
        ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let ranked = Arc::new(ranked.into_iter().map(|(n, _)| n).collect::<Vec<u32>>());
        let mut kept = self.trending.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= RANKINGS_KEPT {
            kept.clear();
        }
        kept.insert(key, ranked.clone());
        ranked
    }

    /// The `limit` items of `recent` with at least `min_support` events of `event_type` that
    /// trend most against `baseline`, best first, ties by name: (item, score, recent count,
    /// baseline count without the recent one). Those the last blocks touch in either window
    /// are scored from their merged totals; the rest keep their place in the bases' ranking.
    /// For a merge of no known state ([`TotalsMemo::trending_now`] keeps the others current).
    pub fn trending_top(
        &self,
        recent: &ItemTotals,
        baseline: &ItemTotals,
        event_type: &'static str,
        min_support: u64,
        hours: (f64, f64),
        limit: usize,
    ) -> Vec<TrendRow> {
        let count = |s: Option<&ItemStats>| s.and_then(|s| s.count(event_type));
        let mut rows: Vec<TrendRow> = Vec::new();
        let mut add = |item: &Name, r: Option<&ItemStats>, b: Option<&ItemStats>| {
            let Some(r) = count(r).filter(|&r| r >= min_support) else {
                return;
            };
            let (before, score) = trend(r, count(b).unwrap_or(r), hours.0, hours.1);
            rows.push((item.clone(), score, r, before));
        };
        // The items the last blocks touch in either window, each once.
        recent.for_each_open(|item, r| add(item, Some(r), baseline.get(item)));
        baseline.for_each_open(|item, b| {
            if !recent.open.touches(item) {
                add(item, recent.get(item), Some(b));
            }
        });
        let bases = (&*recent.base, &*baseline.base);
        let order = self.trending(bases, event_type, min_support, hours);
        let untouched = (recent.untouched(&order))
            .filter(|&n| !baseline.open.touches(recent.base.name(n)))
            .take(limit);
        for n in untouched {
            let item = recent.base.name(n);
            add(item, recent.get(item), baseline.get(item));
        }
        top_n(&mut rows, limit, trend_order);
        rows
    }

    fn base(
        &self,
        m: &Merge<'_>,
        key: TotalsKey,
        done: Vec<BlockRange>,
    ) -> Result<Arc<Base>, ApiError> {
        let version = m.batch().map(|b| b.manifest.version);
        let found = {
            let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            let at = (kept.iter()).position(|b| b.version == version && b.key == key);
            at.map(|at| {
                let hit = kept.remove(at);
                kept.push(hit.clone());
                hit
            })
        };
        if let Some(b) = &found {
            if b.done == done {
                return Ok(b.clone());
            }
        }
        let (prefix, start) = totals_range(key);
        let scan = |blocks: &[BlockRange], totals: &mut Totals| {
            m.scan_speed_in(blocks, &prefix, Some(&start), &mut |k, p| {
                if let Some((item, s)) = item_total(&k, &p) {
                    totals.entry(item.clone()).or_default().merge(s);
                }
            })
        };
        let since = found.as_ref().and_then(|b| blocks_since(&b.done, &done));
        let totals = match (&found, since) {
            // Blocks finished since the kept base: it, with them merged in.
            (Some(b), Some(since)) => {
                let mut totals = b.totals();
                scan(&since, &mut totals)?;
                totals
            }
            _ => {
                let mut totals = match m.batch() {
                    Some(b) => (*b.item_totals(key)?).clone(),
                    None => Totals::default(),
                };
                scan(&done, &mut totals)?;
                totals
            }
        };
        let base = Arc::new(Base::build(version, key, done, totals));
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        // Bases of an older batch version are asked for no more.
        kept.retain(|b| b.version >= version);
        match (kept.iter()).position(|b| b.version == version && b.key == key) {
            // A request of an older state may finish after one of a newer state: keep the
            // newer base.
            Some(at) if blocks_since(&base.done, &kept[at].done).is_some() => {}
            Some(at) => kept[at] = base.clone(),
            None => {
                if kept.len() >= BASES_KEPT {
                    kept.remove(0);
                }
                kept.push(base.clone());
            }
        }
        Ok(base)
    }
}

/// Keeps the first `n` of `rows` in the order `cmp` gives (a total order), sorted: a selection,
/// then a sort of the `n` kept, instead of sorting every row.
pub fn top_n<T>(rows: &mut Vec<T>, n: usize, cmp: impl Fn(&T, &T) -> std::cmp::Ordering) {
    if rows.len() > n {
        if n == 0 {
            rows.clear();
            return;
        }
        rows.select_nth_unstable_by(n - 1, &cmp);
        rows.truncate(n);
    }
    rows.sort_unstable_by(cmp);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_equals_a_full_sort_cut_short() {
        let rows: Vec<(u64, String)> = (0..500u64)
            .map(|i| ((i * 7919) % 13, format!("i{}", (i * 31) % 97)))
            .collect();
        let cmp = |a: &(u64, String), b: &(u64, String)| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1));
        for n in [0, 1, 5, 13, 499, 500, 800] {
            let mut sorted = rows.clone();
            sorted.sort_by(cmp);
            sorted.truncate(n);
            let mut kept = rows.clone();
            top_n(&mut kept, n, cmp);
            assert_eq!(kept, sorted, "n = {n}");
        }
    }

    /// splitmix64, for reproducible random totals.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        }
    }

    fn stats(rng: &mut Rng, most: u64) -> ItemStats {
        let category = ["a", "b", "c"][rng.below(3) as usize];
        ItemStats {
            views: rng.below(most),
            purchases: rng.below(most / 2 + 1),
            category: Some(category.into()),
            ..ItemStats::default()
        }
    }

    /// Random totals of `items` items; the open side touches some of them and some new ones.
    fn totals(rng: &mut Rng, items: u64, most: u64) -> (Totals, Totals) {
        let mut base = Totals::default();
        let mut open = Totals::default();
        for i in 0..items {
            if rng.below(10) < 8 {
                base.insert(format!("i{i}").into(), stats(rng, most));
            }
            if rng.below(10) < 2 {
                open.insert(format!("i{i}").into(), stats(rng, 4));
            }
        }
        (base, open)
    }

    /// The totals of `base` with `open`'s added, and the same merged naively, item by item.
    fn over(base: Totals, open: Totals) -> (ItemTotals, Vec<(Name, ItemStats)>) {
        let mut all = base.clone();
        for (item, s) in open.iter() {
            all.entry(item.clone()).or_default().merge(s);
        }
        let base = Arc::new(Base::build(None, None, Vec::new(), base));
        let open = Arc::new(Open::over(&base, open));
        (ItemTotals { base, open }, all.into_iter().collect())
    }

    #[test]
    fn top_items_equal_a_sort_of_every_merged_total() {
        let mut rng = Rng(7);
        for round in 0..200 {
            let (n, most) = (1 + rng.below(300), 1 + rng.below(50));
            let (base, open) = totals(&mut rng, n, most);
            let (t, all) = over(base, open);
            for (event_type, category) in [("view", None), ("purchase", Some("b"))] {
                let limit = 1 + rng.below(40) as usize;
                let mut want: Vec<(Name, u64)> = (all.iter())
                    .filter(|(_, s)| category.is_none() || s.category.as_deref() == category)
                    .map(|(i, s)| (i.clone(), s.count(event_type).unwrap_or(0)))
                    .filter(|(_, c)| *c > 0)
                    .collect();
                want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                want.truncate(limit);
                let got: Vec<(Name, u64)> = (t.top(event_type, category, limit).into_iter())
                    .map(|(i, c)| (i.clone(), c))
                    .collect();
                assert_eq!(got, want, "round {round}, {event_type}, {category:?}");
            }
        }
    }

    /// A state and its `as_of`, for totals kept current outside a merge.
    fn a_state() -> (StateId, AsOf) {
        let as_of = AsOf {
            batch: None,
            speed: crate::state::SpeedAsOf {
                offsets: BTreeMap::new(),
                updated_at: None,
                age_ms: None,
            },
            coverage: BTreeMap::new(),
            cluster: None,
        };
        let at = StateId {
            batch_version: None,
            speed_sequence: Some(0),
        };
        (at, as_of)
    }

    #[test]
    fn totals_kept_current_rank_as_a_sort_of_every_merged_total_after_each_delta() {
        let mut rng = Rng(5);
        let (at, as_of) = a_state();
        for round in 0..100 {
            let (n, most) = (1 + rng.below(200), 1 + rng.below(40));
            let (base, open) = totals(&mut rng, n, most);
            // The naive merge, item by item, kept beside.
            let mut all = base.clone();
            for (item, s) in open.iter() {
                all.entry(item.clone()).or_default().merge(s);
            }
            let base = Arc::new(Base::build(None, None, Vec::new(), base));
            let empty = (Vec::new(), BTreeMap::new());
            let mut c = Current::build(base, empty, open, (at, as_of.clone(), None));
            for step in 0..30 {
                // A delta: a few items, some the base and the last blocks never had.
                for _ in 0..1 + rng.below(4) {
                    let item: Name = format!("i{}", rng.below(n + 20)).into();
                    let s = stats(&mut rng, 3);
                    c.add(&item, &s);
                    all.entry(item).or_default().merge(&s);
                }
                let (event_type, category) = match rng.below(4) {
                    0 => ("view", None),
                    1 => ("purchase", None),
                    2 => ("view", Some("a")),
                    _ => ("purchase", Some("c")),
                };
                let limit = 1 + rng.below(25) as usize;
                let mut want: Vec<(Name, u64)> = (all.iter())
                    .filter(|(_, s)| category.is_none() || s.category.as_deref() == category)
                    .map(|(i, s)| (i.clone(), s.count(event_type).unwrap_or(0)))
                    .filter(|(_, c)| *c > 0)
                    .collect();
                want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                want.truncate(limit);
                let got = c.top(event_type, category, limit);
                assert_eq!(
                    got, want,
                    "round {round}, step {step}, {event_type}, {category:?}"
                );
            }
        }
    }

    #[test]
    fn trends_kept_current_equal_a_sort_of_every_merged_score_after_each_delta() {
        let mut rng = Rng(13);
        let memo = TotalsMemo::default();
        let (at, as_of) = a_state();
        let hours = (1.0, 23.0);
        for round in 0..60 {
            let n = 1 + rng.below(150);
            let (recent_base, recent_open) = totals(&mut rng, n, 20);
            let (mut long_base, mut long_open) = totals(&mut rng, n, 60);
            for (item, s) in &recent_base {
                long_base.entry(item.clone()).or_default().merge(s);
            }
            for (item, s) in &recent_open {
                long_open.entry(item.clone()).or_default().merge(s);
            }
            let naive = |base: &Totals, open: &Totals| {
                let mut all = base.clone();
                for (item, s) in open {
                    all.entry(item.clone()).or_default().merge(s);
                }
                all
            };
            let (mut recent_all, mut long_all) = (
                naive(&recent_base, &recent_open),
                naive(&long_base, &long_open),
            );
            let build = |base: Totals, open: Totals| {
                let base = Arc::new(Base::build(None, None, Vec::new(), base));
                let empty = (Vec::new(), BTreeMap::new());
                Current::build(base, empty, open, (at, as_of.clone(), None))
            };
            let mut c = TrendCurrent {
                recent: build(recent_base, recent_open),
                baseline: build(long_base, long_open),
                hours,
                rankings: FastMap::default(),
            };
            for step in 0..25 {
                // A delta: a few items; an event in the recent window is in the baseline too,
                // and some count in the baseline only (older than the recent window).
                let mut deltas: Vec<(Name, ItemStats, bool, bool)> = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    let item: Name = format!("i{}", rng.below(n + 10)).into();
                    let recent = rng.below(4) > 0;
                    deltas.push((item, stats(&mut rng, 3), recent, true));
                }
                for (item, s, recent, _) in &deltas {
                    if *recent {
                        recent_all.entry(item.clone()).or_default().merge(s);
                    }
                    long_all.entry(item.clone()).or_default().merge(s);
                }
                let refs: Vec<(&Name, &ItemStats, bool, bool)> =
                    deltas.iter().map(|(i, s, r, b)| (i, s, *r, *b)).collect();
                c.add(&refs);
                let (min_support, limit) = (1 + rng.below(4), 1 + rng.below(20) as usize);
                let mut want: Vec<TrendRow> = (recent_all.iter())
                    .filter(|(_, s)| s.views >= min_support)
                    .map(|(i, s)| {
                        let b = long_all.get(i).map_or(s.views, |l| l.views);
                        let before = b.saturating_sub(s.views);
                        let score = s.views as f64 / ((before as f64 + 1.0) / 23.0);
                        (i.clone(), score, s.views, before)
                    })
                    .collect();
                want.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                want.truncate(limit);
                let bases = (&*c.recent.base, &*c.baseline.base);
                let order = memo.trending(bases, "view", min_support, hours);
                let got = c.top(&order, "view", min_support, limit);
                assert_eq!(got, want, "round {round}, step {step}");
            }
        }
    }

    #[test]
    fn trending_equals_a_sort_of_every_merged_score() {
        let mut rng = Rng(11);
        let memo = TotalsMemo::default();
        for round in 0..200 {
            let n = 1 + rng.below(200);
            let (recent_base, recent_open) = totals(&mut rng, n, 20);
            let (mut long_base, long_open) = totals(&mut rng, n, 60);
            // A baseline window holds the recent one.
            for (item, s) in &recent_base {
                long_base.entry(item.clone()).or_default().merge(s);
            }
            let mut long_open = long_open;
            for (item, s) in &recent_open {
                long_open.entry(item.clone()).or_default().merge(s);
            }
            let (recent, recent_all) = over(recent_base, recent_open);
            let (long, long_all) = over(long_base, long_open);
            let (min_support, limit) = (1 + rng.below(5), 1 + rng.below(30) as usize);
            let hours = (1.0, 23.0);
            let long_all: FastMap<Name, ItemStats> = long_all.into_iter().collect();
            let mut want: Vec<(Name, f64, u64, u64)> = (recent_all.into_iter())
                .filter(|(_, s)| s.views >= min_support)
                .map(|(i, s)| {
                    let b = long_all.get(&i).map_or(s.views, |l| l.views);
                    let before = b - s.views;
                    let score = s.views as f64 / ((before as f64 + 1.0) / 23.0);
                    (i, score, s.views, before)
                })
                .collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            want.truncate(limit);
            let got = memo.trending_top(&recent, &long, "view", min_support, hours, limit);
            assert_eq!(got, want, "round {round}");
        }
    }
}
