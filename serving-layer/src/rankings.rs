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

use std::sync::{Arc, Mutex};

use strata_common::handoff::BlockRange;
use strata_common::views::{FastMap, ItemStats, Monoid, Name};

use crate::error::ApiError;
use crate::state::{blocks_since, item_total, totals_range, Merge, PerState, Totals, TotalsKey};

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
/// number whether an item is touched.
#[derive(Default)]
pub struct Open {
    merged: Totals,
    touched: Vec<bool>,
}

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
        Open { merged, touched }
    }

    /// Whether the last blocks touch an item.
    pub fn touches(&self, item: &str) -> bool {
        self.merged.contains_key(item)
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
    ) -> Vec<(&Name, u64)> {
        let mut ranked: Vec<(&Name, u64)> = Vec::new();
        self.for_each_open(|item, s| {
            if category.is_some() && s.category.as_deref() != category {
                return;
            }
            if let Some(c) = s.count(event_type).filter(|&c| c > 0) {
                ranked.push((item, c));
            }
        });
        let order = self.base.ranking(event_type, category);
        for n in self.untouched(&order).take(limit) {
            let b = &self.base;
            ranked.push((b.name(n), b.stats(n).count(event_type).unwrap_or(0)));
        }
        top_n(&mut ranked, limit, |a, b| {
            b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0))
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

/// The bases asked for lately, and the trending rankings read from them.
#[derive(Default)]
pub struct TotalsMemo {
    kept: Mutex<Vec<Arc<Base>>>,
    trending: Mutex<FastMap<TrendKey, Arc<Vec<u32>>>>,
    /// The last blocks' totals per window, for one state: read by one request of the state
    /// while the others wait, then shared.
    open: Mutex<PerState<FastMap<TotalsKey, Arc<Open>>>>,
}

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
            let mut open = Totals::default();
            let (prefix, start) = totals_range(key);
            m.scan_speed_in(&open_blocks, &prefix, Some(&start), &mut |k, p| {
                if let Some((item, s)) = item_total(&k, &p) {
                    open.entry(item.clone()).or_default().merge(s);
                }
            })?;
            Ok(Arc::new(Open::over(&base, open)))
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

    /// The items of `recent`'s base with at least `min_support` events of `event_type`, by
    /// trend score over `baseline`'s base, best first, ties by name: sorted once per pair of
    /// bases.
    fn trending(
        &self,
        recent: &ItemTotals,
        baseline: &ItemTotals,
        event_type: &'static str,
        min_support: u64,
        hours: (f64, f64),
    ) -> Arc<Vec<u32>> {
        let (r, b) = (&recent.base, &baseline.base);
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
    pub fn trending_top(
        &self,
        recent: &ItemTotals,
        baseline: &ItemTotals,
        event_type: &'static str,
        min_support: u64,
        hours: (f64, f64),
        limit: usize,
    ) -> Vec<(Name, f64, u64, u64)> {
        let count = |s: Option<&ItemStats>| s.and_then(|s| s.count(event_type));
        let mut rows: Vec<(Name, f64, u64, u64)> = Vec::new();
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
        let order = self.trending(recent, baseline, event_type, min_support, hours);
        let untouched = (recent.untouched(&order))
            .filter(|&n| !baseline.open.touches(recent.base.name(n)))
            .take(limit);
        for n in untouched {
            let item = recent.base.name(n);
            add(item, recent.get(item), baseline.get(item));
        }
        top_n(&mut rows, limit, |a, b| {
            b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0))
        });
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
