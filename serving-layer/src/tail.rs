//! Point reads of the speed tail in a few files instead of one table per block.
//!
//! A point read (an item's stats, a user's history) merges the key's partial in every finished
//! speed block past the batch cutoffs: one lookup per block, each in its own table (the speed
//! layer ingests a file per block), so its cost grows with the blocks since the last batch run.
//! Finished blocks never change, so the serving layer merges them, `serve.run-blocks` at a
//! time, into **runs**: files in the batch version's own format ([`version_file`]), each holding
//! the merged partials of its blocks, chained from the batch cutoffs on. A point read then looks
//! in each run once and in the finished blocks no run holds yet. Runs are built in the
//! background from blocks that are finished and still held; a batch version moves the cutoffs,
//! and the runs of the version before are dropped (their files deleted when no read holds
//! them). Answers do not change: a run is the monoid merge of exactly the partials the reads
//! would have merged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use strata_common::handoff::{BlockRange, Partition};
use strata_common::speed_store::SpeedReader;
use strata_common::version_file::{self, VersionFile};
use strata_common::views::{absorb_opt, Partial};

/// The merged partials of some finished blocks (per partition, one contiguous range).
pub struct Run {
    batch_version: Option<u64>,
    blocks: Vec<BlockRange>,
    /// 0 for a run of blocks; a run merged from [`MERGED`] runs of level `l` is of level `l + 1`.
    level: u32,
    file: VersionFile,
    path: PathBuf,
}

impl Run {
    /// How many blocks this run holds.
    pub fn blocks(&self) -> u64 {
        self.blocks.iter().map(|b| b.last - b.first + 1).sum()
    }

    /// The partial of the encoded key `key` over this run's blocks.
    pub fn get(&self, key: &[u8]) -> strata_common::Result<Option<Partial>> {
        self.file.get(key)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How many runs of one level, last in the chain, are merged into one of the next level: the
/// runs a read looks in stay fewer than `MERGED` per level, and levels grow as the log of the
/// blocks past the cutoffs.
pub const MERGED: usize = 4;

/// The runs of one serving layer, and the build under way (at most one).
pub struct Runs {
    dir: PathBuf,
    per_run: u64,
    chain: Mutex<Vec<Arc<Run>>>,
    building: AtomicBool,
    /// Run files started (their numbers name them).
    started: AtomicU64,
}

/// What a merge reads of the tail: the runs that hold the first finished blocks past the
/// cutoffs, in order, and per partition the first finished block none of them holds.
#[derive(Default)]
pub struct Tail {
    pub runs: Vec<Arc<Run>>,
    pub next: BTreeMap<Partition, u64>,
}

impl Tail {
    /// `ranges` (a merge's blocks, finished and live) without the blocks the runs hold.
    pub fn past_runs(&self, ranges: &[BlockRange]) -> Vec<BlockRange> {
        ranges
            .iter()
            .map(|r| BlockRange {
                first: self
                    .next
                    .get(&r.partition)
                    .map_or(r.first, |&n| n.max(r.first)),
                ..*r
            })
            .collect()
    }
}

impl Runs {
    /// Runs of `per_run` blocks each, written under `dir` (emptied first: runs of an earlier
    /// process are of a state this one has not read).
    pub fn new(dir: PathBuf, per_run: u64) -> Self {
        let _ = std::fs::remove_dir_all(&dir);
        remove_stale_dirs(&dir);
        Runs {
            dir,
            per_run,
            chain: Mutex::default(),
            building: AtomicBool::new(false),
            started: AtomicU64::new(0),
        }
    }

    /// How many run files were started since start (written, or given up).
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// The runs a merge over batch version `version` and the finished blocks `done` (per
    /// partition, from the cutoffs on) reads: those chained from the cutoffs whose blocks
    /// `done` all holds.
    pub fn tail(&self, version: Option<u64>, done: &[BlockRange]) -> Tail {
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        if chain.first().is_some_and(|r| r.batch_version != version) {
            // A new version: its cutoffs are past these runs' first blocks.
            chain.clear();
        }
        let mut next: BTreeMap<Partition, (u64, u64)> = done
            .iter()
            .map(|r| (r.partition, (r.first, r.last)))
            .collect();
        let mut runs = Vec::new();
        for run in chain.iter() {
            let fits = run.blocks.iter().all(|b| {
                next.get(&b.partition)
                    .is_some_and(|&(at, last)| b.first == at && b.last <= last)
            });
            if !fits {
                break;
            }
            for b in &run.blocks {
                if let Some(n) = next.get_mut(&b.partition) {
                    n.0 = b.last + 1;
                }
            }
            runs.push(run.clone());
        }
        Tail {
            runs,
            next: next.into_iter().map(|(p, (at, _))| (p, at)).collect(),
        }
    }

    /// Starts building the next run in the background if `tail` leaves at least `per_run` of
    /// the finished blocks `done` unread by runs and no build is under way.
    pub fn maybe_build(
        self: &Arc<Self>,
        reader: &Arc<SpeedReader>,
        version: Option<u64>,
        block_size: u64,
        done: &[BlockRange],
        tail: &Tail,
    ) {
        if self.per_run == 0 || block_size == 0 {
            return;
        }
        if let Some(merging) = tail.runs.last_chunk::<MERGED>() {
            if merging.iter().all(|r| r.level == merging[0].level)
                && !self.building.swap(true, Ordering::AcqRel)
            {
                self.merge(merging.to_vec(), version);
                return;
            }
        }
        // The blocks left, per partition, taken in turn until a run's worth.
        let mut left: Vec<(Partition, u64, u64)> = done
            .iter()
            .filter_map(|r| {
                let at = tail.next.get(&r.partition).copied().unwrap_or(r.first);
                (at <= r.last).then_some((r.partition, at, r.last))
            })
            .collect();
        let total: u64 = left.iter().map(|(_, at, last)| last - at + 1).sum();
        if total < self.per_run || self.building.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut pick: BTreeMap<Partition, (u64, u64)> = BTreeMap::new();
        let mut taken = 0;
        while taken < self.per_run {
            for (p, at, last) in left.iter_mut() {
                if taken < self.per_run && *at <= *last {
                    pick.entry(*p).or_insert((*at, *at)).1 = *at;
                    *at += 1;
                    taken += 1;
                }
            }
        }
        let blocks: Vec<BlockRange> = pick
            .into_iter()
            .map(|(partition, (first, last))| BlockRange {
                partition,
                first,
                last,
            })
            .collect();
        let after = tail.runs.last().cloned();
        let reader = reader.clone();
        self.in_background("written", move |me, path| {
            let Some(file) = build(&reader, block_size, &blocks, &path)? else {
                return Ok(None);
            };
            let run = Run {
                batch_version: version,
                blocks,
                level: 0,
                file,
                path,
            };
            let mut chain = me.chain.lock().unwrap_or_else(|e| e.into_inner());
            // Only onto the runs it was chained after, over the same version.
            let last_is = match (&after, chain.last()) {
                (None, None) => true,
                (Some(a), Some(l)) => Arc::ptr_eq(a, l),
                _ => false,
            };
            if last_is && chain.first().is_none_or(|r| r.batch_version == version) {
                chain.push(Arc::new(run));
                return Ok(Some(0));
            }
            Ok(None)
        });
    }

    /// Merges `runs` (consecutive in the chain, of one level) into one run in the background,
    /// which takes their place if they are still in the chain.
    fn merge(self: &Arc<Self>, runs: Vec<Arc<Run>>, version: Option<u64>) {
        self.in_background("merged", move |me, path| {
            let file = merge_files(&runs, &path)?;
            let mut blocks: BTreeMap<Partition, BlockRange> = BTreeMap::new();
            for b in runs.iter().flat_map(|r| &r.blocks) {
                let e = blocks.entry(b.partition).or_insert(*b);
                e.first = e.first.min(b.first);
                e.last = e.last.max(b.last);
            }
            let level = runs[0].level + 1;
            let run = Run {
                batch_version: version,
                blocks: blocks.into_values().collect(),
                level,
                file,
                path,
            };
            let mut chain = me.chain.lock().unwrap_or_else(|e| e.into_inner());
            let at = chain.iter().position(|r| Arc::ptr_eq(r, &runs[0]));
            let Some(at) = at.filter(|&at| {
                chain.len() >= at + runs.len()
                    && (chain[at..at + runs.len()].iter().zip(&runs))
                        .all(|(a, b)| Arc::ptr_eq(a, b))
            }) else {
                return Ok(None);
            };
            chain.splice(at..at + runs.len(), [Arc::new(run)]);
            Ok(Some(level))
        });
    }

    /// Runs `work` on a thread of its own with the path of a new run's file. `work` returns the
    /// level of the run it added to the chain, or `None` (a run not added drops its file). The
    /// build flag, set by the caller, is cleared when it ends.
    fn in_background(
        self: &Arc<Self>,
        what: &'static str,
        work: impl FnOnce(&Runs, PathBuf) -> strata_common::Result<Option<u32>> + Send + 'static,
    ) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tail-runs".into())
            .spawn(move || {
                // Runs only spare point reads: they take what CPU time the speed layer (in
                // `strata up`), the queries and the catch-up leave.
                strata_common::process::background_thread();
                let n = me.started.fetch_add(1, Ordering::Relaxed);
                let path = me.dir.join(format!("run-{n}.blocks"));
                match work(&me, path.clone()) {
                    Ok(Some(level)) => tracing::debug!(run = n, level, "tail run {what}"),
                    Ok(None) => {
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        tracing::warn!(error = %e, "a run of finished speed blocks could not be {what}; reading what it would hold apart");
                    }
                }
                me.building.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread for the tail's runs");
            self.building.store(false, Ordering::Release);
        }
    }
}

/// Merges the files of `runs` into one at `path`, a block of each at a time: an entry only one
/// of them holds is copied as it is, the partials of a key several hold are merged.
fn merge_files(runs: &[Arc<Run>], path: &Path) -> strata_common::Result<VersionFile> {
    let mut cursors: Vec<_> = runs.iter().map(|r| r.file.cursor()).collect();
    let mut w = version_file::Writer::create(path)?;
    loop {
        let mut least: Option<Vec<u8>> = None;
        for c in cursors.iter_mut() {
            if let Some(k) = c.key()? {
                if least.as_deref().is_none_or(|l| k < l) {
                    least = Some(k.to_vec());
                }
            }
        }
        let Some(key) = least else {
            break;
        };
        let mut values: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, c) in cursors.iter_mut().enumerate() {
            if c.key()? == Some(key.as_slice()) {
                if let Some((_, v)) = c.take() {
                    values.push((i, v));
                }
            }
        }
        match values.as_slice() {
            [(_, v)] => w.push_raw(&key, v)?,
            _ => {
                let mut acc: Option<Partial> = None;
                for (i, v) in &values {
                    absorb_opt(&mut acc, cursors[*i].decode(v)?);
                }
                if let Some(p) = acc {
                    w.push(&key, &p)?;
                }
            }
        }
    }
    w.finish()?;
    VersionFile::open(path)
}

/// Removes the run directories beside `dir` (`<name>-<pid>`) of processes no longer running:
/// a serving layer killed before its runs were dropped leaves its files.
fn remove_stale_dirs(dir: &Path) {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str()))
    else {
        return;
    };
    let Some((stem, _)) = name.rsplit_once('-') else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let other = e.file_name();
        let Some(pid) = (other.to_str())
            .and_then(|n| n.strip_prefix(stem)?.strip_prefix('-'))
            .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Merges the partials of `blocks` into a file at `path`; `None` if one of them is no longer
/// held (a batch version covered it) or not finished.
fn build(
    reader: &SpeedReader,
    block_size: u64,
    blocks: &[BlockRange],
    path: &Path,
) -> strata_common::Result<Option<VersionFile>> {
    let mut merged: BTreeMap<Vec<u8>, Option<Partial>> = BTreeMap::new();
    for r in blocks {
        for block in r.first..=r.last {
            let one = [BlockRange {
                first: block,
                last: block,
                ..*r
            }];
            let read = reader.with_view(|db, reads, meta, _| {
                let held = meta.partitions.get(&r.partition).is_some_and(|m| {
                    m.first_live_block <= block
                        && u64::try_from(m.next_offset).unwrap_or(0) >= (block + 1) * block_size
                });
                if !held {
                    return Ok(false);
                }
                reads.scan_finished(db, &one, &[], None, &mut |key, p| {
                    absorb_opt(merged.entry(key.encode()).or_default(), p)
                })?;
                Ok(true)
            })?;
            if !read {
                return Ok(None);
            }
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| strata_common::Error::io(dir, e))?;
    }
    let mut w = version_file::Writer::create(path)?;
    for (key, p) in &merged {
        if let Some(p) = p {
            w.push(key, p)?;
        }
    }
    w.finish()?;
    VersionFile::open(path).map(Some)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use strata_common::speed_store::{self, block_key, encode_i64, meta_key, Cf};
    use strata_common::views::{ItemStats, Name, Set, ViewKey};

    use super::*;

    const BLOCK: u64 = 100;
    const BLOCKS: u64 = 10;

    fn item_key(i: u64) -> ViewKey {
        ViewKey::Item(format!("i{i}").into())
    }

    fn audience_key(i: u64) -> ViewKey {
        ViewKey::ItemUsers {
            basis: strata_common::views::Basis::View,
            item: format!("i{i}").into(),
        }
    }

    /// Point reads over runs and the blocks past them equal the sums and unions of what was
    /// written to every block, counted here from the numbers written; a new batch version drops
    /// the runs.
    #[test]
    fn point_reads_over_runs_equal_the_blocks_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(speed_store::open_primary(&dir.path().join("speed")).expect("open"));
        let meta = speed_store::cf(&db, Cf::Meta).expect("cf");
        let blocks = speed_store::cf(&db, Cf::Blocks).expect("cf");
        db.put_cf(meta, meta_key::BLOCK_SIZE, encode_i64(BLOCK as i64))
            .expect("put");
        // Per item: views written, and the users of its audience.
        let mut views: BTreeMap<u64, u64> = BTreeMap::new();
        let mut users: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
        for p in 0..2i32 {
            db.put_cf(
                meta,
                meta_key::next_offset(p),
                encode_i64((BLOCKS * BLOCK + 5) as i64),
            )
            .expect("put");
            for b in 0..BLOCKS {
                for i in 0..20u64 {
                    if (i + b + p as u64).is_multiple_of(3) {
                        continue;
                    }
                    let n = 1 + (i * 7 + b * 3 + p as u64) % 5;
                    *views.entry(i).or_default() += n;
                    let stats = Partial::Item(ItemStats {
                        views: n,
                        ..ItemStats::default()
                    });
                    db.put_cf(blocks, block_key(p, b, &item_key(i)), stats.encode())
                        .expect("put");
                    let who: BTreeSet<Name> = (0..3)
                        .map(|u| Name::from(format!("u{}", (i + b * 5 + u) % 17)))
                        .collect();
                    users
                        .entry(i)
                        .or_default()
                        .extend(who.iter().map(|u| u.to_string()));
                    db.put_cf(
                        blocks,
                        block_key(p, b, &audience_key(i)),
                        Partial::Set(Set(who)).encode(),
                    )
                    .expect("put");
                }
            }
        }
        let reader = Arc::new(SpeedReader::shared(db.clone()));
        let runs = Arc::new(Runs::new(dir.path().join("runs-1"), 3));
        // Blocks 0..=9 of each partition finished, block 10 live.
        let ranges: Vec<BlockRange> = (0..2)
            .map(|partition| BlockRange {
                partition,
                first: 0,
                last: BLOCKS,
            })
            .collect();
        let done: Vec<BlockRange> = ranges
            .iter()
            .map(|r| BlockRange {
                last: BLOCKS - 1,
                ..*r
            })
            .collect();
        // Build until nothing more is built: runs of three blocks, merged four at a time.
        let mut tail = runs.tail(Some(1), &done);
        for _ in 0..100 {
            runs.maybe_build(&reader, Some(1), BLOCK, &done, &tail);
            while runs.building.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let next = runs.tail(Some(1), &done);
            let same = next.runs.len() == tail.runs.len()
                && next
                    .runs
                    .iter()
                    .zip(&tail.runs)
                    .all(|(a, b)| Arc::ptr_eq(a, b));
            tail = next;
            if same {
                break;
            }
        }
        // 20 finished blocks: six runs of three, the first four merged into one; two blocks
        // read one by one.
        let levels: Vec<u32> = tail.runs.iter().map(|r| r.level).collect();
        assert_eq!(levels, [1, 0, 0]);
        assert_eq!(tail.runs[0].blocks(), 12);
        let past = tail.past_runs(&ranges);
        let left: u64 = past.iter().map(|r| r.last - r.first).sum();
        assert_eq!(left, 2, "{past:?}");
        for i in 0..20u64 {
            let read = |key: &ViewKey| {
                let mut acc = reader
                    .with_view(|db, reads, _, _| reads.partial(db, &past, key))
                    .expect("read");
                for run in &tail.runs {
                    if let Some(p) = run.get(&key.encode()).expect("run") {
                        match &mut acc {
                            Some(a) => a.merge(&p),
                            None => acc = Some(p),
                        }
                    }
                }
                acc
            };
            match read(&item_key(i)) {
                Some(Partial::Item(s)) => assert_eq!(Some(&s.views), views.get(&i), "item i{i}"),
                other => assert!(!views.contains_key(&i), "item i{i}: {other:?}"),
            }
            match read(&audience_key(i)) {
                Some(Partial::Set(s)) => {
                    let got: BTreeSet<String> = s.0.iter().map(|u| u.to_string()).collect();
                    assert_eq!(Some(&got), users.get(&i), "audience of i{i}");
                }
                other => assert!(!users.contains_key(&i), "audience of i{i}: {other:?}"),
            }
        }
        // A new version's cutoffs: the runs go, and their files with them.
        let files = |d: &Path| std::fs::read_dir(d).map_or(0, |e| e.count());
        assert_eq!(files(&dir.path().join("runs-1")), 3);
        drop(tail);
        assert!(runs.tail(Some(2), &done).runs.is_empty());
        assert_eq!(files(&dir.path().join("runs-1")), 0);
    }
}
