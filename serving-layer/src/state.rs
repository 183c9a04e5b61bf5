//! What the serving layer holds: the loaded batch version and a reader of the speed state, and
//! the one place where the two are merged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use rocksdb::DB;
use serde::Serialize;
use strata_common::batch_store::{self, Manifest};
use strata_common::config::{Config, SpeedSource};
use strata_common::handoff::{
    block_of, coverage, speed_ranges, BlockRange, HandoffError, Offsets, Partition,
};
use strata_common::speed_store::{self, SpeedMeta, SpeedReader, ViewReads};
use strata_common::time::Millis;
use strata_common::varint::{put as put_varint, take as take_varint, unzigzag, zigzag};
use strata_common::version_file::VersionFile;
use strata_common::views::{
    absorb_opt, tag, Basis, FastMap, Gran, ItemStats, Monoid, Name, Partial, ViewKey,
};

use crate::cooccur::CoIndex;
use crate::error::ApiError;
use crate::tail::{Runs, Tail};

/// A published batch version, read from its file ([`VersionFile`]: the index of its blocks in
/// memory, a block read when asked for), sorted by encoded key so that one view, or one time
/// range of a series, is a range scan.
pub struct LoadedBatch {
    pub manifest: Manifest,
    pub views: VersionFile,
    /// The data directory it was published in, where the files beside its views are read from
    /// (`None`: its views alone).
    pub data_dir: Option<std::path::PathBuf>,
    /// The most pairs each row memo over this version keeps (`serve.memo-mb`).
    pub memo_pairs: usize,
    /// Milliseconds from reading the version's files to holding it, ready to answer from.
    pub load_ms: u64,
    /// Per-item totals over a window's buckets, computed once per window start: a version never
    /// changes, so the batch's share of a windowed query is the same for every request until
    /// the window moves on to the next bucket.
    item_totals: Mutex<Vec<(TotalsKey, Arc<Totals>)>>,
    /// The audiences and histories by number, per basis (view, purchase), built when first asked.
    co_index: [OnceLock<Arc<CoIndex>>; 2],
    /// The item series of the buckets a window may start at while the version is served, by
    /// bucket and item number ([`LoadedBatch::index_recent`]); `None`: windows scan the file.
    recent: Option<RecentSeries>,
}

/// How many buckets before the current one a window of item totals reaches back, at most, per
/// granularity: `1h` is the last 60 minute buckets, `7d` the last 168 hour buckets
/// (`crate::insights::Window::buckets`, which a test there holds to these).
pub const WINDOW_REACH: [(Gran, i64); 2] = [(Gran::Minute, 59), (Gran::Hour, 167)];

/// A version's item series from some bucket on, per granularity, held by bucket and item
/// number: the totals of every window starting at or after the first bucket held are a sum of
/// these rows, not a scan of the version's keys. Windows end at the current bucket and their
/// starts only move on, so the buckets a window may start at while the version is served are
/// those from [`WINDOW_REACH`] before the bucket it was loaded in.
struct RecentSeries {
    /// Item names by number.
    items: Vec<Name>,
    /// Category names by number.
    categories: Vec<Name>,
    /// Per granularity of [`WINDOW_REACH`].
    grans: Vec<Held>,
    rows: usize,
    bytes: usize,
}

/// The buckets of one granularity held.
struct Held {
    gran: Gran,
    /// The first bucket a window may start at.
    first: Millis,
    /// Each bucket's rows (see [`Rows`]), in time order.
    buckets: Vec<(Millis, Vec<u8>)>,
    /// The sums of every bucket from each [`SUFFIX_EVERY`]th one on (the first, the tenth,
    /// ...), by item, encoded: a window's totals read one of these and fewer than
    /// [`SUFFIX_EVERY`] buckets before it.
    suffixes: Vec<Vec<u8>>,
}

/// How far apart the held sums of a granularity's last buckets start ([`Held::suffixes`]).
const SUFFIX_EVERY: usize = 10;

/// Items' totals ([`ItemStats`] with the item and category names numbered) written one after
/// another as LEB128 varints, about 11 bytes a row against 96 as an `ItemStats`: the item
/// number's step from the row before (zigzag), the category's number plus one (0: none), the
/// six counts of [`ItemStats::counts`], the revenue (zigzag).
struct Rows {
    out: Vec<u8>,
    before: u32,
}

impl Rows {
    fn new() -> Self {
        Rows {
            out: Vec::new(),
            before: 0,
        }
    }

    /// Appends item `item`'s totals `s`, its category numbered `category` (`None`: none).
    fn push(&mut self, item: u32, category: Option<u32>, s: &ItemStats) {
        put_varint(
            &mut self.out,
            zigzag(i128::from(item) - i128::from(self.before)),
        );
        put_varint(&mut self.out, category.map_or(0, |c| u128::from(c) + 1));
        for c in s.counts() {
            put_varint(&mut self.out, u128::from(c));
        }
        put_varint(&mut self.out, zigzag(s.revenue_micros));
        self.before = item;
    }

    /// The encoded rows, their memory trimmed.
    fn done(mut self) -> Vec<u8> {
        self.out.shrink_to_fit();
        self.out
    }

    /// Calls `f` with each row of `bytes`: its item number and totals, the category named from
    /// `categories`. `None` if a row does not decode.
    #[inline]
    fn each(
        bytes: &[u8],
        categories: &[Name],
        mut f: impl FnMut(u32, ItemStats) -> Option<()>,
    ) -> Option<()> {
        let (mut at, mut before) = (0, 0u32);
        while at < bytes.len() {
            let step = unzigzag(take_varint(bytes, &mut at)?);
            let item = u32::try_from(i128::from(before) + step).ok()?;
            let category = match take_varint(bytes, &mut at)? {
                0 => None,
                c => Some(categories.get(usize::try_from(c - 1).ok()?)?.clone()),
            };
            let mut counts = [0u64; 6];
            for c in &mut counts {
                *c = u64::try_from(take_varint(bytes, &mut at)?).ok()?;
            }
            let [views, carts, purchases, quantity, ratings, rating_sum] = counts;
            let s = ItemStats {
                views,
                carts,
                purchases,
                quantity,
                revenue_micros: unzigzag(take_varint(bytes, &mut at)?),
                ratings,
                rating_sum,
                category,
            };
            f(item, s)?;
            before = item;
        }
        Some(())
    }
}

impl RecentSeries {
    /// Reads the item series of `views` from the buckets [`WINDOW_REACH`] before `now`'s.
    fn read(views: &VersionFile, now: Millis) -> Result<Self, ApiError> {
        let mut names = Numbering::default();
        let (mut grans, mut count, mut bytes) = (Vec::new(), 0, 0);
        for (gran, reach) in WINDOW_REACH {
            let first = gran.floor(now) - reach * gran.millis();
            let mut buckets: Vec<(Millis, Rows)> = Vec::new();
            let prefix = ViewKey::series_prefix(tag::ITEM_SERIES, gran);
            let from = ViewKey::series_from(tag::ITEM_SERIES, gran, first);
            views.scan(&prefix, Some(&from), &mut |k, p| {
                let (ViewKey::ItemSeries { start, item, .. }, Partial::Item(s)) = (k, p) else {
                    return;
                };
                if buckets.last().is_none_or(|(at, _)| *at != start) {
                    buckets.push((start, Rows::new()));
                }
                if let Some((_, rows)) = buckets.last_mut() {
                    let (item, category) = names.number(&item, &s.category);
                    rows.push(item, category, &s);
                    count += 1;
                }
            })?;
            // The held sums, from the last bucket back.
            let mut sums: Vec<Option<ItemStats>> = Vec::new();
            let mut suffixes = vec![Vec::new(); buckets.len().div_ceil(SUFFIX_EVERY)];
            let buckets: Vec<(Millis, Vec<u8>)> = (buckets.into_iter())
                .map(|(start, rows)| (start, rows.done()))
                .collect();
            for (i, (_, rows)) in buckets.iter().enumerate().rev() {
                sums.resize(names.items.len(), None);
                add_rows(rows, &names.categories, &mut sums).ok_or_else(|| {
                    ApiError::internal("a held bucket of item series does not decode")
                })?;
                bytes += rows.len();
                if i % SUFFIX_EVERY == 0 {
                    let mut suffix = Rows::new();
                    for (n, s) in sums.iter().enumerate() {
                        if let Some(s) = s {
                            // Every name in the sums was numbered when its rows were read.
                            let category = (s.category.as_ref())
                                .and_then(|c| names.category_numbers.get(c).copied());
                            suffix.push(n as u32, category, s);
                        }
                    }
                    let suffix = suffix.done();
                    bytes += suffix.len();
                    suffixes[i / SUFFIX_EVERY] = suffix;
                }
            }
            grans.push(Held {
                gran,
                first,
                buckets,
                suffixes,
            });
        }
        Ok(RecentSeries {
            items: names.items,
            categories: names.categories,
            grans,
            rows: count,
            bytes,
        })
    }

    /// The totals over the buckets of `gran` from `from` on, if this holds them all.
    fn totals(&self, gran: Gran, from: Millis) -> Option<Totals> {
        let held = self.grans.iter().find(|h| h.gran == gran)?;
        if from < held.first {
            return None;
        }
        let mut sums: Vec<Option<ItemStats>> = vec![None; self.items.len()];
        let later = (held.buckets).partition_point(|(start, _)| *start < from);
        // The held sum from the next bucket that has one, and the buckets before it.
        let next = later.div_ceil(SUFFIX_EVERY);
        let upto = match held.suffixes.get(next) {
            Some(suffix) => {
                add_rows(suffix, &self.categories, &mut sums)?;
                next * SUFFIX_EVERY
            }
            None => held.buckets.len(),
        };
        for (_, bytes) in &held.buckets[later..upto] {
            add_rows(bytes, &self.categories, &mut sums)?;
        }
        let mut totals = Totals::default();
        totals.reserve(sums.iter().filter(|s| s.is_some()).count());
        for (n, s) in sums.into_iter().enumerate() {
            if let Some(s) = s {
                totals.insert(self.items.get(n)?.clone(), s);
            }
        }
        Some(totals)
    }
}

/// Item and category names numbered in the order first met.
#[derive(Default)]
struct Numbering {
    items: Vec<Name>,
    item_numbers: FastMap<Name, u32>,
    categories: Vec<Name>,
    category_numbers: FastMap<Name, u32>,
}

impl Numbering {
    /// The numbers of `item` and `category`, given them if they have none yet.
    fn number(&mut self, item: &Name, category: &Option<Name>) -> (u32, Option<u32>) {
        (
            number_of(&mut self.items, &mut self.item_numbers, item),
            (category.as_ref())
                .map(|c| number_of(&mut self.categories, &mut self.category_numbers, c)),
        )
    }
}

fn number_of(names: &mut Vec<Name>, numbers: &mut FastMap<Name, u32>, name: &Name) -> u32 {
    if let Some(&n) = numbers.get(name) {
        return n;
    }
    let n = names.len() as u32;
    names.push(name.clone());
    numbers.insert(name.clone(), n);
    n
}

/// Merges the encoded rows `bytes` into `sums` (by item number); `None` if they do not decode.
fn add_rows(bytes: &[u8], categories: &[Name], sums: &mut [Option<ItemStats>]) -> Option<()> {
    Rows::each(bytes, categories, |item, s| {
        match sums.get_mut(item as usize)? {
            Some(sum) => sum.merge(&s),
            empty => *empty = Some(s),
        }
        Some(())
    })
}

/// Per-item totals.
pub type Totals = FastMap<Name, ItemStats>;

/// Which buckets item totals cover: every item's all-time totals (`None`), or the series
/// buckets of one granularity from one start on.
pub type TotalsKey = Option<(Gran, Millis)>;

/// The prefix of the keys item totals are made of, and the first of them.
pub fn totals_range(key: TotalsKey) -> (Vec<u8>, Vec<u8>) {
    match key {
        None => (vec![tag::ITEM], vec![tag::ITEM]),
        Some((gran, from)) => (
            ViewKey::series_prefix(tag::ITEM_SERIES, gran),
            ViewKey::series_from(tag::ITEM_SERIES, gran, from),
        ),
    }
}

/// Whether an encoded view key is one of the keys item totals over `range` (see
/// [`totals_range`]) are made of: the range's prefix is the view's tag (and granularity).
pub fn in_totals(key: &[u8], (prefix, start): &(Vec<u8>, Vec<u8>)) -> bool {
    key.starts_with(prefix) && key >= start.as_slice()
}

/// The item and the totals a key of item totals holds (all-time, or one series bucket).
pub fn item_total<'a>(key: &'a ViewKey, p: &'a Partial) -> Option<(&'a Name, &'a ItemStats)> {
    match (key, p) {
        (ViewKey::Item(item), Partial::Item(s))
        | (ViewKey::ItemSeries { item, .. }, Partial::Item(s)) => Some((item, s)),
        _ => None,
    }
}

/// Calls `f` with the merge of the batch side's and the speed side's value of one key: the one
/// that is there, lent as it is, or a merged copy when both are.
pub fn with_merged<V: Clone, T>(
    batch: Option<&V>,
    speed: Option<&V>,
    merge: impl FnOnce(&mut V, &V),
    f: impl FnOnce(Option<&V>) -> T,
) -> T {
    match (batch, speed) {
        (Some(b), Some(s)) => {
            let mut merged = b.clone();
            merge(&mut merged, s);
            f(Some(&merged))
        }
        (Some(b), None) => f(Some(b)),
        (None, s) => f(s),
    }
}

/// How many windows' totals a loaded version keeps (the least recently asked go first).
const TOTALS_KEPT: usize = 8;

impl LoadedBatch {
    pub fn new(manifest: Manifest, views: VersionFile) -> Self {
        LoadedBatch {
            manifest,
            views,
            data_dir: None,
            memo_pairs: crate::cooccur::INDEX_ROW_PAIRS,
            load_ms: 0,
            item_totals: Mutex::new(Vec::new()),
            co_index: Default::default(),
            recent: None,
        }
    }

    /// Holds the version's item series of the buckets a window may start at from `now` on
    /// ([`RecentSeries`]), so that a window's totals are a sum of rows. Returns how many rows,
    /// and their bytes.
    pub fn index_recent(&mut self, now: Millis) -> Result<(usize, usize), ApiError> {
        let recent = RecentSeries::read(&self.views, now)?;
        let held = (recent.rows, recent.bytes);
        self.recent = Some(recent);
        Ok(held)
    }

    /// The version's audiences and histories of `basis` by number (see [`crate::cooccur`]).
    pub fn co_index(&self, basis: Basis) -> Result<Arc<CoIndex>, ApiError> {
        let slot = &self.co_index[basis.index()];
        if let Some(ix) = slot.get() {
            return Ok(ix.clone());
        }
        // Numbered at publish (with the rows counted then), or indexed from the views for a
        // version published before those files were written.
        let numbered = self.data_dir.as_deref().and_then(|dir| {
            let audiences = batch_store::read_audiences(dir, self.manifest.version, basis)
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "the version's numbered audiences cannot be read; indexing its views instead");
                    None
                })?;
            let rows = batch_store::open_rows(dir, self.manifest.version, basis).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the version's precounted rows cannot be read; counting rows when asked");
                None
            });
            Some(CoIndex::from_audiences(audiences, rows))
        });
        let built = match numbered {
            Some(ix) => ix,
            None => CoIndex::build(&self.views, basis)?,
        };
        let built = Arc::new(built.keeping(self.memo_pairs));
        Ok(slot.get_or_init(|| built).clone())
    }

    /// Calls `f` with the entries whose encoded key starts with `prefix`, from `from` (a longer
    /// key inside the prefix; `None`: the prefix itself) on, in key order.
    pub fn scan(
        &self,
        prefix: &[u8],
        from: Option<&[u8]>,
        f: &mut dyn FnMut(ViewKey, Partial),
    ) -> Result<(), ApiError> {
        Ok(self.views.scan(prefix, from, f)?)
    }

    /// The version's per-item totals over the buckets `key` names.
    pub fn item_totals(&self, key: TotalsKey) -> Result<Arc<Totals>, ApiError> {
        let mut kept = self.item_totals.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = kept.iter().position(|(k, _)| *k == key) {
            // Last is the most recently asked: a window whose start moves on every bucket (1h
            // by minutes) then pushes out its own old starts, not the windows still asked for.
            let hit = kept.remove(at);
            let totals = hit.1.clone();
            kept.push(hit);
            return Ok(totals);
        }
        drop(kept);
        let held = key.and_then(|(gran, from)| self.recent.as_ref()?.totals(gran, from));
        let totals = match held {
            Some(totals) => totals,
            None => {
                let mut totals = Totals::default();
                let (prefix, start) = totals_range(key);
                self.scan(&prefix, Some(&start), &mut |key, p| {
                    if let Some((item, s)) = item_total(&key, &p) {
                        totals.entry(item.clone()).or_default().merge(s);
                    }
                })?;
                totals
            }
        };
        let totals = Arc::new(totals);
        let mut kept = self.item_totals.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= TOTALS_KEPT {
            kept.remove(0);
        }
        kept.push((key, totals.clone()));
        Ok(totals)
    }
}

/// The serving layer's shared state.
pub struct ServingState {
    pub cfg: Config,
    batch: RwLock<Option<Arc<LoadedBatch>>>,
    speed: RwLock<Option<Arc<SpeedReader>>>,
    /// Whether the speed reader follows another process (and must catch up) or shares the
    /// writer's database.
    follower: bool,
    /// The topic's high watermarks, refreshed in the background, for lag.
    high_watermarks: RwLock<Option<Offsets>>,
    /// What the last probes of the broker found.
    broker: RwLock<BrokerHealth>,
    /// The finished speed blocks merged into runs for point reads (`serve.run-blocks`).
    runs: Option<Arc<Runs>>,
}

/// Whether the broker answered the serving layer's last probe, and since when it has not.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BrokerHealth {
    pub reachable: bool,
    /// When the broker last answered (RFC 3339).
    pub last_ok: Option<String>,
    /// When the current outage began (RFC 3339); `None` while the broker answers.
    pub unreachable_since: Option<String>,
    pub last_error: Option<String>,
}

/// Where an answer comes from: the batch version and the speed offsets merged.
#[derive(Clone, Debug, Serialize)]
pub struct AsOf {
    pub batch: Option<BatchAsOf>,
    pub speed: SpeedAsOf,
    /// Per partition, the offset below which every accepted event is in the answer.
    pub coverage: Offsets,
    /// With `serve.speed = "cluster"`: where each partition's speed tail came from, and which
    /// partitions the answer may lack newer events of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<strata_common::cluster::ClusterAsOf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BatchAsOf {
    pub version: u64,
    pub published_at: String,
    pub cutoffs: Offsets,
}

#[derive(Clone, Debug, Serialize)]
pub struct SpeedAsOf {
    /// Next offset per partition: everything below it is in the speed layer's state.
    pub offsets: Offsets,
    /// When the speed layer last wrote its state (RFC 3339), and how long ago that was.
    pub updated_at: Option<String>,
    pub age_ms: Option<i64>,
}

impl SpeedAsOf {
    fn new(offsets: Offsets, flushed_at: Option<i64>) -> Self {
        SpeedAsOf {
            offsets,
            updated_at: flushed_at.map(strata_common::time::format_rfc3339),
            age_ms: flushed_at.map(|t| (strata_common::time::now_millis() - t).max(0)),
        }
    }
}

/// One consistent merge of a batch version and the speed state, handed to a query.
pub struct Merge<'a> {
    batch: Option<&'a LoadedBatch>,
    speed: Option<(&'a DB, &'a dyn ViewReads)>,
    ranges: Vec<BlockRange>,
    /// Where the runs of finished blocks come from ([`crate::tail`]).
    runs: Option<RunsAt<'a>>,
    /// The runs point reads look in, and `ranges` without their blocks: found on the first
    /// point read, so that an answer making none (a ranking, `/v1/status`) neither walks the
    /// runs nor starts building one.
    tail: OnceLock<(Tail, Vec<BlockRange>)>,
    pub speed_meta: Arc<SpeedMeta>,
    pub as_of: AsOf,
    /// Which state this merge reads, when known exactly.
    pub state_id: Option<StateId>,
}

/// The runs of one serving state, and what a merge needs to find its own among them.
struct RunsAt<'a> {
    runs: &'a Arc<Runs>,
    reader: &'a Arc<SpeedReader>,
    version: Option<u64>,
    block_size: u64,
}

impl Merge<'_> {
    /// The runs point reads look in, and the ranges left past them; the first call may start
    /// building the next run in the background.
    fn point_tail(&self) -> &(Tail, Vec<BlockRange>) {
        self.tail.get_or_init(|| {
            let tail = match &self.runs {
                Some(at) => {
                    let done = finished_of(&self.ranges);
                    let tail = at.runs.tail(at.version, &done);
                    (at.runs).maybe_build(at.reader, at.version, at.block_size, &done, &tail);
                    tail
                }
                None => Tail::default(),
            };
            let point_ranges = tail.past_runs(&self.ranges);
            (tail, point_ranges)
        })
    }

    /// The minute buckets the batch version left out (`strata_common::retention`).
    pub fn retention(&self) -> strata_common::retention::Marks {
        self.batch.map(|b| b.manifest.retention).unwrap_or_default()
    }
}

/// A state of what answers are computed from: the loaded batch version (if any) and the speed
/// database's sequence number (if a speed state is read; every speed write, or a follower's
/// catch-up that brings writes, moves it). Both only grow. Equal ids, equal answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateId {
    pub batch_version: Option<u64>,
    pub speed_sequence: Option<u64>,
}

impl StateId {
    /// Whether `self` is a later state than `other`.
    pub fn is_past(self, other: StateId) -> bool {
        self != other
            && self.batch_version >= other.batch_version
            && self.speed_sequence >= other.speed_sequence
    }
}

/// What is kept for one state only (rendered answers, co-occurrence rows): emptied when a later
/// state keeps its own, and never replaced by an earlier one (a slow request of an older state
/// can finish after a faster one of a newer state).
#[derive(Default)]
pub struct PerState<M> {
    at: Option<StateId>,
    kept: M,
}

impl<M: Default> PerState<M> {
    /// What is kept for `at`, if that is the state kept for.
    pub fn at(&self, at: StateId) -> Option<&M> {
        (self.at == Some(at)).then_some(&self.kept)
    }

    /// What is kept for `at` to add to: emptied first if it was kept for an earlier state;
    /// `None` if it is kept for a later one.
    pub fn for_state(&mut self, at: StateId) -> Option<&mut M> {
        if self.at != Some(at) {
            if self.at.is_some_and(|k| k.is_past(at)) {
                return None;
            }
            self.at = Some(at);
            self.kept = M::default();
        }
        Some(&mut self.kept)
    }
}

impl Merge<'_> {
    /// The merged partial of one view key, `None` if neither side has it.
    pub fn get(&self, key: &ViewKey) -> Result<Option<Partial>, ApiError> {
        self.with_partial(key, |p| p.cloned())
    }

    /// Calls `f` with the merged partial of one view key (`None` if neither side has it),
    /// lending the batch version's own partial when the speed layer has nothing to add.
    pub fn with_partial<T>(
        &self,
        key: &ViewKey,
        f: impl FnOnce(Option<&Partial>) -> T,
    ) -> Result<T, ApiError> {
        let encoded = key.encode();
        let batch = match self.batch {
            Some(b) => b.views.get(&encoded)?,
            None => None,
        };
        let speed = match self.speed {
            Some((db, reads)) => {
                let (tail, point_ranges) = self.point_tail();
                let mut acc = reads.partial(db, point_ranges, key)?;
                for run in &tail.runs {
                    if let Some(p) = run.get(&encoded)? {
                        absorb_opt(&mut acc, p);
                    }
                }
                acc
            }
            None => None,
        };
        Ok(with_merged(
            batch.as_ref(),
            speed.as_ref(),
            Partial::merge,
            f,
        ))
    }

    /// The batch version's audiences and histories of `basis` by number (empty without one).
    pub fn co_index(&self, basis: Basis) -> Result<Arc<CoIndex>, ApiError> {
        self.batch
            .map_or_else(|| Ok(Arc::new(CoIndex::default())), |b| b.co_index(basis))
    }

    /// The merged partials of every key whose encoding starts with `prefix` and is at or after
    /// `from` (a longer key inside the prefix), keeping those `keep` accepts.
    pub fn collect(
        &self,
        prefix: &[u8],
        from: Option<&[u8]>,
        keep: impl Fn(&ViewKey) -> bool,
    ) -> Result<BTreeMap<ViewKey, Partial>, ApiError> {
        let mut out: BTreeMap<ViewKey, Partial> = BTreeMap::new();
        let mut add = |k: ViewKey, p: &Partial| {
            if !keep(&k) {
                return;
            }
            match out.get_mut(&k) {
                Some(existing) => existing.merge(p),
                None => {
                    out.insert(k, p.clone());
                }
            }
        };
        if let Some(b) = self.batch {
            b.scan(prefix, from, &mut |key, p| add(key, &p))?;
        }
        self.scan_speed(prefix, from, &mut |k, p| add(k, &p))?;
        Ok(out)
    }

    /// How many runs of finished blocks this merge's point reads look in, and how many blocks
    /// they hold ([`crate::tail`]).
    pub fn tail_runs(&self) -> (usize, u64) {
        let (tail, _) = self.point_tail();
        (tail.runs.len(), tail.runs.iter().map(|r| r.blocks()).sum())
    }

    /// The batch version of this merge, if there is one.
    pub fn batch(&self) -> Option<&LoadedBatch> {
        self.batch
    }

    /// Calls `f` with each of the speed layer's partials (not merged: a key may come once per
    /// block) whose encoding starts with `prefix` and is at or after `from`.
    pub fn scan_speed(
        &self,
        prefix: &[u8],
        from: Option<&[u8]>,
        f: &mut dyn FnMut(ViewKey, Partial),
    ) -> Result<(), ApiError> {
        self.scan_speed_in(&self.ranges, prefix, from, f)
    }

    /// [`Merge::scan_speed`] over some of this merge's blocks only (see [`Merge::speed_blocks`]).
    pub fn scan_speed_in(
        &self,
        ranges: &[BlockRange],
        prefix: &[u8],
        from: Option<&[u8]>,
        f: &mut dyn FnMut(ViewKey, Partial),
    ) -> Result<(), ApiError> {
        if let Some((db, reads)) = self.speed {
            reads.scan(db, ranges, prefix, from, f)?;
        }
        Ok(())
    }

    /// [`Merge::scan_speed_in`] without the live blocks, whose layers [`Merge::live_layers`]
    /// gives.
    pub fn scan_finished_in(
        &self,
        ranges: &[BlockRange],
        prefix: &[u8],
        from: Option<&[u8]>,
        f: &mut dyn FnMut(ViewKey, Partial),
    ) -> Result<(), ApiError> {
        if let Some((db, reads)) = self.speed {
            reads.scan_finished(db, ranges, prefix, from, f)?;
        }
        Ok(())
    }

    /// The layers of the live blocks within `ranges` (see [`speed_store::LiveLayer`]).
    pub fn live_layers(
        &self,
        ranges: &[BlockRange],
    ) -> Result<Vec<Arc<speed_store::LiveLayer>>, ApiError> {
        match self.speed {
            Some((_, reads)) => Ok(reads.live_layers(ranges)?),
            None => Ok(Vec::new()),
        }
    }

    /// Calls `f` with partition `p`'s journal entries ending after offset `after`, in the
    /// snapshot this merge reads (see [`strata_common::speed_store::JournalEntry`]).
    /// Only the deltas whose encoded view key `keep` accepts are decoded and given.
    pub fn speed_journal(
        &self,
        p: strata_common::handoff::Partition,
        after: i64,
        keep: &dyn Fn(&[u8]) -> bool,
        f: &mut dyn FnMut(strata_common::speed_store::JournalEntry),
    ) -> Result<(), ApiError> {
        if let Some((db, reads)) = self.speed {
            reads.journal(db, p, after, keep, f)?;
        }
        Ok(())
    }

    /// The deltas of the views `keep` accepts (by encoded key) that the journal holds for the
    /// last blocks `open` (see [`Merge::speed_blocks`]) from offsets `covered` to `next`, per
    /// partition; `None` if the journal does not hold all of them (entries not chained from
    /// `covered` to `next`, e.g. written by a speed layer without a journal, or reaching back
    /// before the block: an entry holds no deltas of a block it finished).
    pub fn journal_since(
        &self,
        open: &[BlockRange],
        covered: &BTreeMap<Partition, i64>,
        next: &BTreeMap<Partition, i64>,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<Option<Vec<(ViewKey, Partial)>>, ApiError> {
        let Some(block_size) = self.speed_meta.block_size else {
            return Ok(None);
        };
        let mut deltas = Vec::new();
        for r in open {
            let (Some(&from), Some(&to)) = (covered.get(&r.partition), next.get(&r.partition))
            else {
                return Ok(None);
            };
            if from == to {
                continue;
            }
            let (mut at, mut whole) = (from, true);
            self.speed_journal(r.partition, from, &keep, &mut |e| {
                if !whole || e.end > to {
                    return;
                }
                if e.start != at || block_of(e.start, block_size) != r.last {
                    whole = false;
                    return;
                }
                at = e.end;
                for (block, key, partial) in e.deltas {
                    if block != r.last {
                        whole = false;
                        return;
                    }
                    deltas.push((key, partial));
                }
            })?;
            if !whole || at != to {
                return Ok(None);
            }
        }
        Ok(Some(deltas))
    }

    /// Each partition's next offset in this merge's speed state, for the partitions of `open`.
    pub fn next_offsets(&self, open: &[BlockRange]) -> BTreeMap<Partition, i64> {
        (self.speed_meta.speed_partitions().into_iter())
            .filter(|(p, _)| open.iter().any(|r| r.partition == *p))
            .map(|(p, s)| (p, s.next_offset))
            .collect()
    }

    /// The speed blocks this merge reads, split into those every partition has consumed past
    /// (never written again: their values stay as they are until a batch version covers them) and
    /// each partition's last block, which may still be written.
    pub fn speed_blocks(&self) -> (Vec<BlockRange>, Vec<BlockRange>) {
        let open = (self.ranges.iter())
            .map(|r| BlockRange {
                first: r.last,
                ..*r
            })
            .collect();
        (finished_of(&self.ranges), open)
    }

    /// Every merged partial of one view (by key tag).
    pub fn all(&self, tag: u8) -> Result<BTreeMap<ViewKey, Partial>, ApiError> {
        self.collect(&[tag], None, |_| true)
    }
}

/// The blocks of `ranges` before each partition's last (the finished ones).
fn finished_of(ranges: &[BlockRange]) -> Vec<BlockRange> {
    (ranges.iter())
        .filter(|r| r.last > r.first)
        .map(|r| BlockRange {
            last: r.last - 1,
            ..*r
        })
        .collect()
}

/// The blocks of `now` that `before` does not hold, if `now` holds every block of `before` (each
/// partition's range starting where it did and ending no earlier).
pub fn blocks_since(before: &[BlockRange], now: &[BlockRange]) -> Option<Vec<BlockRange>> {
    let held = |r: &BlockRange| before.iter().find(|b| b.partition == r.partition);
    let kept_all = before.iter().all(|b| {
        now.iter()
            .any(|r| r.partition == b.partition && r.first == b.first && r.last >= b.last)
    });
    if !kept_all {
        return None;
    }
    Some(
        now.iter()
            .filter_map(|r| match held(r) {
                None => Some(*r),
                Some(b) if r.last > b.last => Some(BlockRange {
                    first: b.last + 1,
                    ..*r
                }),
                Some(_) => None,
            })
            .collect(),
    )
}

enum Attempt<T> {
    Done(Result<T, ApiError>),
    StaleBatch(HandoffError),
}

impl ServingState {
    /// State reading the speed layer's database directly (all layers in one process).
    pub fn shared(cfg: Config, speed: SpeedReader) -> Self {
        Self::build(cfg, Some(Arc::new(speed)), false)
    }

    /// State following a speed layer in another process (opened as soon as its state exists).
    pub fn following(cfg: Config) -> Self {
        let s = Self::build(cfg, None, true);
        s.try_open_follower();
        s
    }

    fn build(cfg: Config, speed: Option<Arc<SpeedReader>>, follower: bool) -> Self {
        let cfg_runs = cfg.serve.run_blocks;
        let runs_dir =
            (cfg.data_dir.join("serve")).join(format!("tail-runs-{}", std::process::id()));
        let s = ServingState {
            cfg,
            batch: RwLock::new(None),
            speed: RwLock::new(speed),
            follower,
            high_watermarks: RwLock::new(None),
            broker: RwLock::new(BrokerHealth::default()),
            runs: (cfg_runs > 0).then(|| Arc::new(Runs::new(runs_dir, cfg_runs))),
        };
        if let Err(e) = s.refresh_batch() {
            tracing::warn!(error = %e, "no batch version loaded yet");
        }
        s
    }

    fn try_open_follower(&self) {
        if !self.follower || self.speed_reader().is_some() {
            return;
        }
        let dir = self.cfg.speed_dir();
        if !dir.join("CURRENT").exists() {
            return;
        }
        let scratch = self
            .cfg
            .data_dir
            .join("serve")
            .join(format!("speed-follower-{}", std::process::id()));
        match SpeedReader::follow(&dir, &scratch) {
            Ok(r) => {
                tracing::info!(path = %dir.display(), "following the speed layer's state");
                if let Ok(mut s) = self.speed.write() {
                    *s = Some(Arc::new(r));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot follow the speed state yet"),
        }
    }

    /// How many run files of finished speed blocks were started since start (0 with runs off).
    pub fn tail_run_files(&self) -> u64 {
        self.runs.as_ref().map_or(0, |r| r.started())
    }

    /// The state an answer computed now would read (see [`crate::answers`]). Read it before
    /// and after computing: an answer is kept only when both readings agree.
    pub fn state_id(&self) -> StateId {
        // Read under the locks, not through clones of the `Arc`s: this runs for every request.
        let batch_version = (self.batch.read().unwrap_or_else(|e| e.into_inner()))
            .as_ref()
            .map(|b| b.manifest.version);
        let speed_sequence = (self.speed.read().unwrap_or_else(|e| e.into_inner()))
            .as_ref()
            .map(|r| r.sequence());
        StateId {
            batch_version,
            speed_sequence,
        }
    }

    /// Reads the speed layer's live blocks before the first request needs them
    /// ([`SpeedReader::read_live`]); a failure is left for a request to meet and report.
    pub fn read_live(&self) {
        if let Some(Err(e)) = self.speed_reader().map(|r| r.read_live()) {
            tracing::debug!(error = %e, "the live blocks are read on the first request");
        }
    }

    fn speed_reader(&self) -> Option<Arc<SpeedReader>> {
        self.speed.read().ok().and_then(|s| s.clone())
    }

    pub fn batch(&self) -> Option<Arc<LoadedBatch>> {
        self.batch.read().ok().and_then(|b| b.clone())
    }

    /// Loads the newest published batch version if it is not the loaded one. Returns whether a
    /// new version was loaded.
    pub fn refresh_batch(&self) -> strata_common::Result<bool> {
        let Some(manifest) = batch_store::read_current(&self.cfg.data_dir)? else {
            return Ok(false);
        };
        if self
            .batch()
            .is_some_and(|b| b.manifest.version == manifest.version)
        {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let views = batch_store::open_views(&self.cfg.data_dir, &manifest)?;
        let mut loaded = LoadedBatch::new(manifest, views);
        loaded.data_dir = Some(self.cfg.data_dir.clone());
        loaded.memo_pairs = crate::cooccur::memo_pairs(self.cfg.serve.memo_mb / 8);
        // Recommendations read the version's audiences and histories by number: read them
        // (numbered by the batch layer at publish; indexed from the views for a version
        // published before that) before the version is served, while the old one still
        // answers, so that the first request after the swap does not pay for it.
        for basis in Basis::ALL {
            if let Err(e) = loaded.co_index(basis) {
                tracing::warn!(error = %e.message, "indexing the batch version's histories failed; retried on first use");
            }
        }
        // Windowed rankings read the item series of the last buckets: held by number, so that
        // the first of them after the swap, and each as its window moves on, sums rows.
        let (recent_rows, recent_bytes) = loaded
            .index_recent(strata_common::time::now_millis())
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e.message, "holding the batch version's recent item series failed; windows scan the version");
                (0, 0)
            });
        loaded.load_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            version = loaded.manifest.version,
            keys = loaded.views.len(),
            recent_rows,
            recent_bytes,
            index_bytes = loaded.views.index_bytes(),
            load_ms = loaded.load_ms,
            "loaded batch version"
        );
        if let Ok(mut b) = self.batch.write() {
            *b = Some(Arc::new(loaded));
        }
        Ok(true)
    }

    /// Background upkeep: follow the speed layer's newest writes (or open it once it exists).
    pub fn catch_up(&self) {
        if !self.follower {
            return;
        }
        match self.speed_reader() {
            Some(r) => {
                if let Err(e) = r.catch_up() {
                    tracing::warn!(error = %e, "cannot catch up with the speed layer");
                }
            }
            None => self.try_open_follower(),
        }
    }

    pub fn set_high_watermarks(&self, hw: Offsets) {
        if let Ok(mut h) = self.high_watermarks.write() {
            *h = Some(hw);
        }
    }

    /// Records the outcome of one probe of the broker, logging when an outage begins and ends.
    pub fn broker_probed(&self, outcome: std::result::Result<Offsets, String>) {
        let now = strata_common::time::format_rfc3339(strata_common::time::now_millis());
        let Ok(mut b) = self.broker.write() else {
            return;
        };
        match outcome {
            Ok(hw) => {
                if let Some(since) = b.unreachable_since.take() {
                    tracing::info!(%since, "broker reachable again");
                }
                b.reachable = true;
                b.last_ok = Some(now);
                b.last_error = None;
                drop(b);
                self.set_high_watermarks(hw);
            }
            Err(e) => {
                if b.unreachable_since.is_none() {
                    tracing::warn!(error = %e, "broker unreachable; still answering from the state held");
                    b.unreachable_since = Some(now);
                }
                b.reachable = false;
                b.last_error = Some(e);
            }
        }
    }

    pub fn broker(&self) -> BrokerHealth {
        self.broker.read().map(|b| b.clone()).unwrap_or_default()
    }

    pub fn high_watermarks(&self) -> Option<Offsets> {
        self.high_watermarks.read().ok().and_then(|h| h.clone())
    }

    /// Whether anything can be answered: a batch version is loaded or the speed state is open.
    pub fn has_views(&self) -> bool {
        self.batch().is_some() || self.speed_reader().is_some()
    }

    /// Ready to take traffic: views loaded and the broker answering (so answers keep getting
    /// fresher). `Err` says why not.
    pub fn ready(&self) -> std::result::Result<(), String> {
        if !self.has_views() {
            return Err("no batch version and no speed state yet".into());
        }
        let b = self.broker();
        if !b.reachable {
            return Err(match (b.unreachable_since, b.last_error) {
                (Some(since), Some(e)) => format!(
                    "the broker has been unreachable since {since} ({e}); answers are served from the state held"
                ),
                _ => "the broker has not been reached yet".into(),
            });
        }
        Ok(())
    }

    /// `as_of.cluster` when the speed tail is mirrored from a cluster.
    fn cluster_as_of(
        &self,
        sources: Option<&[u8]>,
        known: impl Iterator<Item = Partition>,
    ) -> Option<strata_common::cluster::ClusterAsOf> {
        (self.cfg.serve.speed == SpeedSource::Cluster)
            .then(|| strata_common::cluster::ClusterAsOf::new(sources, known))
    }

    /// Runs `f` on one consistent merge of the newest batch version and the speed state.
    pub fn with_merge<T>(
        &self,
        f: impl Fn(&Merge<'_>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        for _ in 0..3 {
            match self.attempt(&f)? {
                Attempt::Done(r) => return r,
                Attempt::StaleBatch(e) => {
                    tracing::debug!(error = %e, "speed blocks moved past the loaded batch; reloading");
                    self.refresh_batch()?;
                }
            }
        }
        Err(ApiError::unavailable(
            "the batch version and the speed state are being swapped; retry",
        ))
    }

    fn attempt<T>(
        &self,
        f: &impl Fn(&Merge<'_>) -> Result<T, ApiError>,
    ) -> Result<Attempt<T>, ApiError> {
        let batch = self.batch();
        let cutoffs = batch
            .as_ref()
            .map(|b| b.manifest.cutoffs.clone())
            .unwrap_or_default();
        let batch_as_of = batch.as_ref().map(|b| BatchAsOf {
            version: b.manifest.version,
            published_at: b.manifest.published_at.clone(),
            cutoffs: b.manifest.cutoffs.clone(),
        });
        let Some(reader) = self.speed_reader() else {
            let merge = Merge {
                batch: batch.as_deref(),
                speed: None,
                ranges: Vec::new(),
                runs: None,
                tail: OnceLock::new(),
                speed_meta: Arc::default(),
                as_of: AsOf {
                    batch: batch_as_of,
                    speed: SpeedAsOf::new(BTreeMap::new(), None),
                    cluster: self.cluster_as_of(None, cutoffs.keys().copied()),
                    coverage: cutoffs,
                },
                state_id: Some(StateId {
                    batch_version: batch.as_ref().map(|b| b.manifest.version),
                    speed_sequence: None,
                }),
            };
            return Ok(Attempt::Done(f(&merge)));
        };
        let batch_block_size = batch.as_ref().map_or(0, |b| b.manifest.block_size);
        let outcome = reader.with_view(|db, reads, meta, seq| {
            let speed = meta.speed_partitions();
            let speed_block_size = meta.block_size.unwrap_or(self.cfg.handoff.block_size);
            let ranges = match speed_ranges(&cutoffs, batch_block_size, &speed, speed_block_size) {
                Ok(r) => r,
                Err(e @ HandoffError::BatchTooOld { .. }) => return Ok(Attempt::StaleBatch(e)),
                Err(e) => return Ok(Attempt::Done(Err(ApiError::unavailable(e.to_string())))),
            };
            let merge = Merge {
                batch: batch.as_deref(),
                speed: Some((db, reads)),
                ranges,
                runs: self.runs.as_ref().map(|runs| RunsAt {
                    runs,
                    reader: &reader,
                    version: batch.as_ref().map(|b| b.manifest.version),
                    block_size: speed_block_size,
                }),
                tail: OnceLock::new(),
                as_of: AsOf {
                    batch: batch_as_of.clone(),
                    speed: SpeedAsOf::new(
                        speed.iter().map(|(&p, s)| (p, s.next_offset)).collect(),
                        meta.flushed_at,
                    ),
                    coverage: coverage(&cutoffs, &speed),
                    cluster: self.cluster_as_of(
                        meta.sources.as_deref(),
                        cutoffs.keys().chain(speed.keys()).copied(),
                    ),
                },
                speed_meta: meta,
                state_id: seq.map(|seq| StateId {
                    batch_version: batch.as_ref().map(|b| b.manifest.version),
                    speed_sequence: Some(seq),
                }),
            };
            Ok(Attempt::Done(f(&merge)))
        })?;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_common::handoff::Offsets;

    #[test]
    fn item_totals_keep_the_windows_still_asked_for() {
        let manifest = Manifest {
            version: 1,
            published_at: "2026-11-25T00:00:00.000Z".into(),
            block_size: 10_000,
            cutoffs: Offsets::new(),
            events: 0,
            duplicates: 0,
            keys: 0,
            duration_ms: 0,
            ..Default::default()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let views = strata_common::version_file::create(&dir.path().join("v"), &[]).expect("file");
        let batch = LoadedBatch::new(manifest, views);
        let all = batch.item_totals(None).expect("totals");
        // A window moving on by the minute asks for a new start each time; the all-time totals,
        // asked for in between, stay kept.
        for minute in 0..(2 * TOTALS_KEPT as i64) {
            batch
                .item_totals(Some((Gran::Minute, minute * 60_000)))
                .expect("totals");
            assert!(
                Arc::ptr_eq(&all, &batch.item_totals(None).expect("totals")),
                "minute {minute}"
            );
        }
    }

    /// A few pseudo-random numbers, the same on every run.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    #[test]
    fn window_totals_from_the_held_rows_equal_naive_sums_of_the_series() {
        let now: Millis = 1_796_700_000_000 + 12_345;
        let mut rng = Rng(7);
        let categories = ["books", "garden", "toys"];
        // Item series over three hours (by minute) and nine days (by hour) to a little past
        // `now`: each bucket but a few holds a random third of 40 items, with categories that differ
        // between buckets (or are missing), counts that take several bytes, negative revenue.
        let mut series: Vec<(Gran, Millis, Name, ItemStats)> = Vec::new();
        for (gran, back) in [(Gran::Minute, 180), (Gran::Hour, 216)] {
            for b in -back..=2 {
                let start = gran.floor(now) + b * gran.millis();
                // Some buckets hold nothing.
                if rng.below(6) == 0 {
                    continue;
                }
                for i in 0..40 {
                    if rng.below(3) != 0 {
                        continue;
                    }
                    let stats = ItemStats {
                        views: rng.below(5),
                        carts: rng.below(3),
                        purchases: rng.below(2),
                        quantity: rng.below(400),
                        revenue_micros: i128::from(rng.below(1 << 40)) - (1 << 39),
                        ratings: rng.below(2),
                        rating_sum: rng.below(1 << 50),
                        category: (rng.below(5) > 0)
                            .then(|| Name::from(categories[rng.below(3) as usize])),
                    };
                    series.push((gran, start, Name::from(format!("i{i}")), stats));
                }
            }
        }
        let all_time = ItemStats {
            views: 1,
            ..ItemStats::default()
        };
        let mut entries: Vec<(Vec<u8>, Partial)> = (series.iter())
            .map(|(gran, start, item, s)| {
                let key = ViewKey::ItemSeries {
                    gran: *gran,
                    start: *start,
                    item: item.clone(),
                };
                (key.encode(), Partial::Item(s.clone()))
            })
            .collect();
        // Keys windows do not read.
        entries.push((ViewKey::Item("i1".into()).encode(), Partial::Item(all_time)));
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let refs: Vec<(Vec<u8>, &Partial)> = entries.iter().map(|(k, p)| (k.clone(), p)).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v");
        strata_common::version_file::create(&path, &refs).expect("file");
        let open =
            || LoadedBatch::new(Manifest::default(), VersionFile::open(&path).expect("open"));
        let mut held = open();
        let (rows, bytes) = held.index_recent(now).expect("held");
        assert!(rows > 0 && bytes > rows, "{rows} rows in {bytes} bytes");
        let scanned = open();

        for (gran, reach) in WINDOW_REACH {
            let first = gran.floor(now) - reach * gran.millis();
            for b in -3..=reach + 4 {
                let from = first + b * gran.millis();
                // Naively: every series entry of the granularity from `from` on, summed; the
                // smallest category name, a missing one no candidate.
                let mut want: BTreeMap<Name, ItemStats> = BTreeMap::new();
                for (g, start, item, s) in &series {
                    if *g != gran || *start < from {
                        continue;
                    }
                    let w = want.entry(item.clone()).or_default();
                    w.views += s.views;
                    w.carts += s.carts;
                    w.purchases += s.purchases;
                    w.quantity += s.quantity;
                    w.revenue_micros += s.revenue_micros;
                    w.ratings += s.ratings;
                    w.rating_sum += s.rating_sum;
                    if let Some(c) = &s.category {
                        if w.category.as_ref().is_none_or(|mine| c < mine) {
                            w.category = Some(c.clone());
                        }
                    }
                }
                let key = Some((gran, from));
                let got: BTreeMap<Name, ItemStats> =
                    (held.item_totals(key).expect("totals").iter())
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                assert_eq!(got, want, "{gran:?} from bucket {b}");
                let got: BTreeMap<Name, ItemStats> =
                    (scanned.item_totals(key).expect("totals").iter())
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                assert_eq!(got, want, "{gran:?} from bucket {b}, scanned");
                // Starts from the first held bucket on are sums of the held rows; earlier
                // ones are scanned.
                let recent = held.recent.as_ref().expect("recent");
                assert_eq!(recent.totals(gran, from).is_some(), b >= 0, "{gran:?} {b}");
            }
        }
    }

    #[test]
    fn totals_keys_are_known_by_their_encoded_bytes() {
        use strata_common::views::Basis;
        let t = 1_796_700_000_000;
        let keys = [
            ViewKey::Item("i1".into()),
            ViewKey::Device("i1".into()),
            ViewKey::ItemSeries {
                gran: Gran::Minute,
                start: t,
                item: "i1".into(),
            },
            ViewKey::ItemSeries {
                gran: Gran::Minute,
                start: t - 60_000,
                item: "i1".into(),
            },
            ViewKey::ItemSeries {
                gran: Gran::Hour,
                start: t,
                item: "i1".into(),
            },
            ViewKey::Series {
                gran: Gran::Minute,
                start: t,
            },
            ViewKey::ItemDayUsers {
                day: t,
                item: "i1".into(),
            },
            ViewKey::UserItems {
                basis: Basis::View,
                user: "u1".into(),
            },
            ViewKey::ItemUsers {
                basis: Basis::Purchase,
                item: "i1".into(),
            },
        ];
        for range in [None, Some((Gran::Minute, t)), Some((Gran::Hour, t - 1))] {
            let r = totals_range(range);
            for k in &keys {
                // What the totals over the range are made of, said by the key's fields.
                let want = match (k, range) {
                    (ViewKey::Item(_), None) => true,
                    (ViewKey::ItemSeries { gran, start, .. }, Some((g, from))) => {
                        *gran == g && *start >= from
                    }
                    _ => false,
                };
                assert_eq!(in_totals(&k.encode(), &r), want, "{k:?} in {range:?}");
            }
        }
    }

    #[test]
    fn item_rows_decode_to_what_was_encoded() {
        let categories = [Name::from("books"), Name::from("toys")];
        let rows = [
            (
                5,
                None,
                ItemStats {
                    views: 0,
                    carts: 1,
                    purchases: 127,
                    quantity: 128,
                    revenue_micros: i128::MIN,
                    ratings: u64::MAX,
                    rating_sum: 1 << 40,
                    category: None,
                },
            ),
            (
                0,
                Some(0),
                ItemStats {
                    revenue_micros: i128::MAX,
                    category: Some(categories[0].clone()),
                    ..ItemStats::default()
                },
            ),
            (
                u32::MAX,
                Some(1),
                ItemStats {
                    views: 1,
                    carts: 1,
                    purchases: 1,
                    quantity: 1,
                    revenue_micros: -1,
                    ratings: 1,
                    rating_sum: 1,
                    category: Some(categories[1].clone()),
                },
            ),
        ];
        let mut out = Rows::new();
        for (item, category, s) in &rows {
            out.push(*item, *category, s);
        }
        let out = out.done();
        let mut got = Vec::new();
        Rows::each(&out, &categories, |item, s| {
            got.push((item, s));
            Some(())
        })
        .expect("rows");
        let want: Vec<(u32, ItemStats)> = rows.iter().map(|(i, _, s)| (*i, s.clone())).collect();
        assert_eq!(got, want);
        // A row cut short is no row.
        assert!(Rows::each(&out[..3], &categories, |_, _| Some(())).is_none());
    }
}
