//! Retention: heartbeats and readings older than their type's age are rolled up into one record
//! per device (and metric) and hour, and the raw segments they came from are deleted, with every
//! view's answer unchanged (but the series view's minute buckets: `common/src/retention.rs`).
//!
//! ```text
//! <data>/master/retention/CURRENT                       the live generation (JSON)
//! <data>/master/retention/g<G>/generation.json          the same, kept with its files
//! <data>/master/retention/g<G>/p<P>.kept.parquet        accepted events below `upto`, kept raw
//! <data>/master/retention/g<G>/p<P>.heartbeat.parquet   rollup records (columnar::ROLLUP_SCHEMA)
//! <data>/master/retention/g<G>/p<P>.reading.parquet
//! <data>/master/retention/g<G>/p<P>.dedupe              the dedupe rule's state at `upto`
//! ```
//!
//! A **generation** replaces, per partition, a prefix of the archive `[0, upto)` (`upto` a
//! segment boundary at or below the newest batch version's cutoff, never the end of the last
//! segment, which stays raw and tells the archiver where to resume). It is built from the
//! previous generation's files and the raw segments between the two `upto`s, replayed through
//! the dedupe rule: every accepted event of a rolled-up type older than the threshold goes into
//! a record, every other accepted event into the kept file, copies are dropped, and the rule's
//! state at `upto` is saved so that the events after it are decided exactly as before. Readers
//! (the recompute, `strata verify`) take a partition's prefix from the generation `CURRENT`
//! names and its raw segments from `upto` on; raw segments below `upto` are ignored.
//!
//! **Crash safety.** The files are written into `g<G>.partial`, fsynced, the directory renamed
//! to `g<G>`, then `CURRENT` replaced by rename: the one step that makes the generation live. A
//! kill before it leaves the old generation (or the raw files) counted, a kill after it the new
//! one; the leftovers are removed at the next rollup. Raw segments are deleted ([`purge`]) only
//! once a batch version computed from the generation is published, oldest first, so the
//! remaining segments always tile one range.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use strata_common::batch_store::{self, DatasetFiles};
use strata_common::config::Config;
use strata_common::dedupe::{Dedupe, PartitionDeduper};
use strata_common::event::{Event, Rules};
use strata_common::handoff::{Offset, Partition};
use strata_common::progress::Progress;
use strata_common::retention::Marks;
use strata_common::time::{format_rfc3339, Millis};
use strata_common::views::{Gran, Monoid, Name, Rollup};

use crate::segment::{self, Segment};
use crate::{columnar, Error, Result};

/// The event types retention can roll up.
pub const ROLLUP_TYPES: [&str; 2] = ["heartbeat", "reading"];

/// One generation of rolled-up prefixes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub generation: u64,
    pub created_at: String,
    /// Per rolled-up type: its events with an event time before this are in records.
    pub thresholds: BTreeMap<String, Millis>,
    pub partitions: BTreeMap<Partition, PartitionRollup>,
}

/// What a generation holds of one partition.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionRollup {
    /// Every offset below this is in the generation's files.
    pub upto: Offset,
    /// Accepted events kept raw.
    pub kept: u64,
    /// Accepted events rolled up, per type.
    pub rolled: BTreeMap<String, u64>,
    /// Records written, per type.
    pub records: BTreeMap<String, u64>,
    /// Copies the dedupe rule skipped below `upto`.
    pub duplicates: u64,
}

impl Generation {
    /// The minute buckets a version computed from this generation cannot hold.
    pub fn marks(&self) -> Marks {
        Marks {
            series_minute_from: self.thresholds.values().copied().max(),
            item_minute_from: None,
        }
    }
}

pub fn root(master: &Path) -> PathBuf {
    master.join("retention")
}

fn generation_dir(master: &Path, g: u64) -> PathBuf {
    root(master).join(format!("g{g:010}"))
}

fn kept_path(dir: &Path, p: Partition) -> PathBuf {
    dir.join(format!("p{p:05}.kept.parquet"))
}

fn rollup_path(dir: &Path, p: Partition, event_type: &str) -> PathBuf {
    dir.join(format!("p{p:05}.{event_type}.parquet"))
}

fn dedupe_path(dir: &Path, p: Partition) -> PathBuf {
    dir.join(format!("p{p:05}.dedupe"))
}

/// The live generation, if any.
pub fn current(master: &Path) -> Result<Option<Generation>> {
    let path = root(master).join("CURRENT");
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Dataset(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// A partition's rolled-up prefix, read back.
pub struct Prefix {
    pub upto: Offset,
    /// Accepted events kept raw, in offset order: each counts (the rule decided them already).
    pub kept: Vec<(Offset, Event)>,
    pub rollups: Vec<Rollup>,
    /// The dedupe rule as it stood at `upto`.
    pub dedupe: PartitionDeduper,
    pub duplicates: u64,
}

impl Prefix {
    /// Accepted events the prefix stands for.
    pub fn events(&self) -> u64 {
        self.kept.len() as u64 + self.rollups.iter().map(Rollup::events).sum::<u64>()
    }
}

/// Reads partition `p`'s prefix from generation `g`, if the generation holds the partition.
pub fn read_prefix(
    master: &Path,
    g: &Generation,
    p: Partition,
    rule: Dedupe,
    rules: &Rules,
) -> Result<Option<Prefix>> {
    let Some(part) = g.partitions.get(&p) else {
        return Ok(None);
    };
    let dir = generation_dir(master, g.generation);
    let kept = columnar::read(&kept_path(&dir, p), Offset::MAX, rules)?;
    let mut rollups = Vec::new();
    for t in ROLLUP_TYPES {
        let path = rollup_path(&dir, p, t);
        if path.exists() {
            rollups.extend(columnar::read_rollups(&path)?);
        }
    }
    let state_path = dedupe_path(&dir, p);
    let state = fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let dedupe = PartitionDeduper::resume(rule, &state)
        .ok_or_else(|| Error::Dataset(format!("{}: not a dedupe state", state_path.display())))?;
    Ok(Some(Prefix {
        upto: part.upto,
        kept,
        rollups,
        dedupe,
        duplicates: part.duplicates,
    }))
}

/// Files and bytes of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Size {
    pub files: u64,
    pub bytes: u64,
}

impl Size {
    fn add(&mut self, path: &Path) {
        self.files += 1;
        self.bytes += fs::metadata(path).map_or(0, |m| m.len());
    }
}

/// What a rollup did (or, dry, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// The generation written (`None`: nothing to roll up, or a dry run).
    pub generation: Option<u64>,
    pub dry_run: bool,
    pub thresholds: BTreeMap<String, String>,
    pub partitions: BTreeMap<Partition, PartitionRollup>,
    /// Raw segments the new generation replaces (deleted once a version of it is published).
    pub replaced_raw: Size,
    /// The previous generation's files, replaced too.
    pub replaced_generation: Size,
    /// What the new generation writes: kept events, and records per type.
    pub written_kept: Size,
    pub written_rollups: BTreeMap<String, Size>,
    /// Why nothing was rolled up, when nothing was.
    pub nothing_because: Option<String>,
    pub seconds: f64,
}

/// The rolled-up records of one partition, merged by (type, device, metric, hour).
type Records = BTreeMap<(Name, Option<Name>, Millis), Rollup>;

fn add_record(records: &mut Records, r: Rollup) {
    match records.entry((r.device.clone(), r.metric.clone(), r.hour)) {
        std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().stats.merge(&r.stats),
        std::collections::btree_map::Entry::Vacant(e) => {
            e.insert(r);
        }
    }
}

/// One partition's new prefix, in memory.
struct Built {
    part: PartitionRollup,
    kept: Vec<(Offset, Event)>,
    records: Records,
    dedupe: PartitionDeduper,
    /// Events rolled up by this generation, not by an earlier one.
    newly: u64,
}

/// Builds a new generation over the archive below the newest batch version's cutoffs, as of
/// `now` (event time thresholds are `now` minus each type's age, floored to the hour). With
/// `dry_run`, the files are written to a temporary directory outside the data directory only
/// to measure them, and nothing changes. The caller holds [`lock`] (or is the batch layer whose
/// archiver holds it).
pub fn roll_up(cfg: &Config, now: Millis, dry_run: bool) -> Result<Report> {
    let started = Instant::now();
    let master = cfg.master_dir();
    let mut report = Report {
        dry_run,
        ..Report::default()
    };
    let rules = cfg.validation.rules()?;
    let rule = cfg.dedupe_rule();
    let prev = current(&master)?;
    let mut thresholds: BTreeMap<String, Millis> = BTreeMap::new();
    for t in ROLLUP_TYPES {
        if let Some(days) = cfg.retention.rollup_after_days(t) {
            let at = Gran::Hour.floor(now - Millis::from(days) * 86_400_000);
            let before = prev.as_ref().and_then(|g| g.thresholds.get(t)).copied();
            thresholds.insert(t.to_string(), before.map_or(at, |b| b.max(at)));
        }
    }
    // A type whose rollup was turned off stays rolled up below its old threshold.
    if let Some(g) = &prev {
        for (t, &at) in &g.thresholds {
            thresholds.entry(t.clone()).or_insert(at);
        }
    }
    report.thresholds = thresholds
        .iter()
        .map(|(t, &at)| (t.clone(), format_rfc3339(at)))
        .collect();
    if thresholds.is_empty() {
        report.nothing_because =
            Some("no event type is rolled up (retention.*.rollup-after-days)".into());
        return Ok(report);
    }
    let Some(version) = batch_store::read_current(&cfg.data_dir)? else {
        report.nothing_because = Some("no batch version is published yet".into());
        return Ok(report);
    };
    let segments = segment::list(&master)?;
    // Per partition: the new raw segments the generation takes in.
    let mut work: Vec<(Partition, Offset, Vec<Segment>)> = Vec::new();
    for (&p, segs) in &segments {
        let cutoff = version.cutoffs.get(&p).copied().unwrap_or(0);
        let from = prev
            .as_ref()
            .and_then(|g| g.partitions.get(&p))
            .map_or(0, |r| r.upto);
        let last_start = segs.last().map_or(0, |s| s.start);
        let take: Vec<Segment> = segs
            .iter()
            .filter(|s| s.start >= from && s.end <= cutoff && s.end <= last_start)
            .cloned()
            .collect();
        for s in &take {
            report.replaced_raw.add(&s.path);
        }
        let upto = take.last().map_or(from, |s| s.end);
        if upto > 0 {
            work.push((p, upto, take));
        }
    }
    if let Some(g) = &prev {
        if let Ok(rd) = fs::read_dir(generation_dir(&master, g.generation)) {
            for f in rd.flatten() {
                report.replaced_generation.add(&f.path());
            }
        }
    }
    let total: u64 = work.iter().map(|(_, _, s)| s.len() as u64 + 1).sum();
    let progress = std::sync::Mutex::new(Progress::new(
        "retention: partitions' segments",
        Some(total),
    ));
    let built: Vec<(Partition, Built)> = work
        .into_par_iter()
        .map(|(p, upto, take)| {
            let prefix = match &prev {
                Some(g) => read_prefix(&master, g, p, rule, &rules)?,
                None => None,
            };
            let (mut dedupe, mut duplicates, mut events, mut records) = match prefix {
                Some(pr) => {
                    let mut records = Records::new();
                    for r in pr.rollups {
                        add_record(&mut records, r);
                    }
                    (pr.dedupe, pr.duplicates, pr.kept, records)
                }
                None => (PartitionDeduper::new(rule), 0, Vec::new(), Records::new()),
            };
            if let Ok(mut pr) = progress.lock() {
                pr.inc(1);
            }
            for s in &take {
                for (o, e) in segment::read(s, Offset::MAX, &rules)? {
                    if dedupe.admit(&e.id, e.ts) {
                        events.push((o, e));
                    } else {
                        duplicates += 1;
                    }
                }
                if let Ok(mut pr) = progress.lock() {
                    pr.inc(1);
                }
            }
            let mut part = PartitionRollup {
                upto,
                duplicates,
                rolled: prev
                    .as_ref()
                    .and_then(|g| g.partitions.get(&p))
                    .map(|r| r.rolled.clone())
                    .unwrap_or_default(),
                ..PartitionRollup::default()
            };
            let mut kept = Vec::with_capacity(events.len());
            let mut newly = 0;
            for (o, e) in events {
                let t = e.type_name();
                let rolled = thresholds.get(t).is_some_and(|&at| e.ts < at);
                match Rollup::of(&e).filter(|_| rolled) {
                    Some(r) => {
                        *part.rolled.entry(t.to_string()).or_default() += 1;
                        newly += 1;
                        add_record(&mut records, r);
                    }
                    None => kept.push((o, e)),
                }
            }
            part.kept = kept.len() as u64;
            for r in records.values() {
                *part.records.entry(r.type_name().to_string()).or_default() += 1;
            }
            Ok((
                p,
                Built {
                    part,
                    kept,
                    records,
                    dedupe,
                    newly,
                },
            ))
        })
        .collect::<Result<_>>()?;
    if let Ok(pr) = progress.lock() {
        pr.finish();
    }
    let newly_rolled: u64 = built.iter().map(|(_, b)| b.newly).sum();
    for (p, b) in &built {
        report.partitions.insert(*p, b.part.clone());
    }
    if newly_rolled == 0 {
        report.nothing_because = Some(format!(
            "no accepted heartbeat or reading below the batch cutoffs is older than the thresholds ({:?})",
            report.thresholds
        ));
        report.replaced_raw = Size::default();
        report.replaced_generation = Size::default();
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let generation = prev.as_ref().map_or(1, |g| g.generation + 1);
    let gen = Generation {
        generation,
        created_at: format_rfc3339(strata_common::time::now_millis()),
        thresholds,
        partitions: built.iter().map(|(p, b)| (*p, b.part.clone())).collect(),
    };
    let (dir, scratch) = if dry_run {
        let d =
            std::env::temp_dir().join(format!("strata-retention-dry-run-{}", std::process::id()));
        (d.clone(), Some(d))
    } else {
        remove_leftovers(&master, prev.as_ref().map(|g| g.generation))?;
        let final_dir = generation_dir(&master, generation);
        (final_dir.with_extension("partial"), None)
    };
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let written: Vec<Result<(Size, BTreeMap<String, Size>)>> = built
        .par_iter()
        .map(|(p, b)| write_partition(&dir, *p, b))
        .collect();
    for w in written {
        let (kept, rollups) = w?;
        report.written_kept.files += kept.files;
        report.written_kept.bytes += kept.bytes;
        for (t, s) in rollups {
            let e = report.written_rollups.entry(t).or_default();
            e.files += s.files;
            e.bytes += s.bytes;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    if let Some(scratch) = scratch {
        let _ = fs::remove_dir_all(scratch);
        return Ok(report);
    }
    let json = serde_json::to_vec_pretty(&gen).map_err(|e| Error::Dataset(e.to_string()))?;
    write_synced(&dir.join("generation.json"), &json)?;
    sync_dir(&dir)?;
    strata_common::fault::point("batch.retention.written");
    let final_dir = generation_dir(&master, generation);
    fs::rename(&dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    let rroot = root(&master);
    sync_dir(&rroot)?;
    let tmp = rroot.join("CURRENT.new");
    write_synced(&tmp, &json)?;
    strata_common::fault::point("batch.retention.before_current");
    let cur = rroot.join("CURRENT");
    fs::rename(&tmp, &cur).map_err(|e| Error::io(&cur, e))?;
    sync_dir(&rroot)?;
    strata_common::fault::point("batch.retention.committed");
    report.generation = Some(generation);
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        generation,
        rolled = newly_rolled,
        replaced_raw_bytes = report.replaced_raw.bytes,
        seconds = report.seconds,
        "retention generation written"
    );
    Ok(report)
}

fn write_partition(dir: &Path, p: Partition, b: &Built) -> Result<(Size, BTreeMap<String, Size>)> {
    let mut kept = Size::default();
    let path = kept_path(dir, p);
    write_file(&path, |f| columnar::write(f, &path, &b.kept))?;
    kept.add(&path);
    let mut rollups = BTreeMap::new();
    for t in ROLLUP_TYPES {
        let records: Vec<Rollup> = b
            .records
            .values()
            .filter(|r| r.type_name() == t)
            .cloned()
            .collect();
        if records.is_empty() {
            continue;
        }
        let path = rollup_path(dir, p, t);
        write_file(&path, |f| columnar::write_rollups(f, &path, &records))?;
        rollups
            .entry(t.to_string())
            .or_insert_with(Size::default)
            .add(&path);
    }
    write_synced(&dedupe_path(dir, p), &b.dedupe.encode_state())?;
    Ok((kept, rollups))
}

fn write_file(path: &Path, body: impl FnOnce(&File) -> Result<()>) -> Result<()> {
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    body(&file)?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, |mut f| {
        use std::io::Write;
        f.write_all(bytes).map_err(|e| Error::io(path, e))
    })
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Removes what a killed rollup left: partial directories, and generations newer than the live
/// one (written, then killed before `CURRENT` named them).
fn remove_leftovers(master: &Path, live: Option<u64>) -> Result<()> {
    let rroot = root(master);
    let Ok(rd) = fs::read_dir(&rroot) else {
        return Ok(());
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let number = name
            .strip_prefix('g')
            .and_then(|n| n.strip_suffix(".partial").or(Some(n)))
            .and_then(|n| n.parse::<u64>().ok());
        let stale =
            name.ends_with(".partial") || number.is_some_and(|g| live.is_none_or(|l| g > l));
        if stale || name == "CURRENT.new" {
            let path = entry.path();
            let _ = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
    }
    Ok(())
}

/// What [`purge`] deleted.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Purged {
    pub raw: Size,
    pub generations: Size,
}

/// Deletes the raw segments the published batch version's generation replaced (oldest first, so
/// what remains tiles one range) and the files of generations older than it. Nothing is deleted
/// unless a version computed from a generation is published. The caller holds [`lock`].
pub fn purge(cfg: &Config) -> Result<Purged> {
    let master = cfg.master_dir();
    let mut purged = Purged::default();
    let Some(published) =
        batch_store::read_current(&cfg.data_dir)?.and_then(|m| m.rollup_generation)
    else {
        return Ok(purged);
    };
    let path = generation_dir(&master, published).join("generation.json");
    let gen: Generation = match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| Error::Dataset(format!("{}: {e}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(purged),
        Err(e) => return Err(Error::io(&path, e)),
    };
    strata_common::fault::point("batch.retention.purging");
    for (p, segs) in segment::list(&master)? {
        let Some(upto) = gen.partitions.get(&p).map(|r| r.upto) else {
            continue;
        };
        for s in segs.iter().filter(|s| s.end <= upto) {
            let size = fs::metadata(&s.path).map_or(0, |m| m.len());
            fs::remove_file(&s.path).map_err(|e| Error::io(&s.path, e))?;
            purged.raw.files += 1;
            purged.raw.bytes += size;
        }
    }
    if let Ok(rd) = fs::read_dir(root(&master)) {
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let older = name
                .strip_prefix('g')
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|g| g < published);
            if older {
                let dir = entry.path();
                if let Ok(files) = fs::read_dir(&dir) {
                    for f in files.flatten() {
                        purged.generations.add(&f.path());
                    }
                }
                fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
        }
    }
    if purged.raw.files > 0 || purged.generations.files > 0 {
        tracing::info!(
            generation = published,
            raw_files = purged.raw.files,
            raw_bytes = purged.raw.bytes,
            "deleted the raw segments a published rollup replaced"
        );
    }
    Ok(purged)
}

/// The lock a process takes to roll up and purge: the archiver's (`master/.lock`), so that a
/// rollup never runs beside a batch layer, which rolls up on its own schedule while its archiver
/// holds the lock.
pub fn lock(cfg: &Config) -> Result<strata_common::disk::DirLock> {
    Ok(strata_common::disk::DirLock::acquire(
        &cfg.master_dir(),
        "retention",
    )?)
}

/// The master dataset's files by kind and type, as a version computed from it reports them.
pub fn dataset_files(
    raw: &BTreeMap<String, u64>,
    raw_size: Size,
    replaced: Size,
    prefix: Option<(&Generation, &Path)>,
) -> Vec<DatasetFiles> {
    let mut out = vec![DatasetFiles {
        kind: "raw".into(),
        event_type: "mixed".into(),
        files: raw_size.files,
        bytes: raw_size.bytes,
        rows: raw.clone(),
    }];
    if replaced.files > 0 {
        out.push(DatasetFiles {
            kind: "replaced".into(),
            event_type: "mixed".into(),
            files: replaced.files,
            bytes: replaced.bytes,
            rows: BTreeMap::new(),
        });
    }
    if let Some((g, master)) = prefix {
        let dir = generation_dir(master, g.generation);
        let mut kept = DatasetFiles {
            kind: "kept".into(),
            event_type: "mixed".into(),
            ..DatasetFiles::default()
        };
        let mut per_type: BTreeMap<&str, DatasetFiles> = BTreeMap::new();
        for (&p, part) in &g.partitions {
            let mut s = Size::default();
            s.add(&kept_path(&dir, p));
            kept.files += s.files;
            kept.bytes += s.bytes;
            *kept.rows.entry("all".into()).or_default() += part.kept;
            for t in ROLLUP_TYPES {
                let path = rollup_path(&dir, p, t);
                if !path.exists() {
                    continue;
                }
                let mut s = Size::default();
                s.add(&path);
                let e = per_type.entry(t).or_insert_with(|| DatasetFiles {
                    kind: "rollup".into(),
                    event_type: t.into(),
                    ..DatasetFiles::default()
                });
                e.files += s.files;
                e.bytes += s.bytes;
                *e.rows.entry("records".into()).or_default() +=
                    part.records.get(t).copied().unwrap_or(0);
                *e.rows.entry("events".into()).or_default() +=
                    part.rolled.get(t).copied().unwrap_or(0);
            }
        }
        out.push(kept);
        out.extend(per_type.into_values());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_common::dedupe::PartitionDeduper;
    use strata_common::event::{ItemRef, Kind};
    use strata_common::views::{ViewKey, ViewSet};

    const DAY: Millis = 86_400_000;
    const NOW: Millis = 1_795_600_000_000;

    /// A stream over 60 days: devices' heartbeats and readings, purchases and views, with copies
    /// (some within the dedupe horizon, some past it), offset by offset.
    fn stream(seed: u64, n: usize, first_offset: Offset) -> Vec<(Offset, Event)> {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut out: Vec<(Offset, Event)> = Vec::new();
        for i in 0..n {
            let r = next();
            let offset = first_offset + i as Offset * 2;
            // Time runs forward with jitter of up to two days, so the watermark moves and
            // late events arrive.
            let ts = NOW - 60 * DAY + (i as Millis) * (60 * DAY / n as Millis)
                - (r % (2 * DAY as u64)) as Millis;
            if r % 10 == 0 && !out.is_empty() {
                // A copy of a recent event (same id), sometimes of one long past.
                let back = if r % 20 == 0 {
                    out.len() - 1
                } else {
                    out.len().saturating_sub(1 + (r % 400) as usize)
                };
                let copy = out[back].1.clone();
                out.push((offset, copy));
                continue;
            }
            let device = format!("d{}", r % 7);
            let user = format!("u{}", r % 11);
            let item = ItemRef {
                user,
                item: format!("i{}", (r >> 8) % 13),
                category: Some("c".into()),
            };
            let kind = match (r >> 4) % 5 {
                0 => Kind::Heartbeat { device },
                1 | 2 => Kind::Reading {
                    device,
                    metric: if r % 3 == 0 {
                        "temp_c".into()
                    } else {
                        "humidity".into()
                    },
                    value: ((r >> 12) % 10_000) as f64 / 100.0 - 20.0,
                },
                3 => Kind::Purchase {
                    item,
                    qty: 1 + (r % 3) as u32,
                    price_micros: 1_250_000,
                },
                _ => Kind::View(item),
            };
            out.push((
                offset,
                Event {
                    id: format!("e{seed}-{i}"),
                    ts,
                    kind,
                },
            ));
        }
        out
    }

    fn write_segments(cfg: &Config, p: Partition, events: &[(Offset, Event)], per: usize) {
        for chunk in events.chunks(per) {
            let start = chunk[0].0;
            let end = chunk[chunk.len() - 1].0 + 2;
            segment::write(&cfg.master_dir(), p, start, end, chunk).expect("segment");
        }
    }

    fn config(dir: &Path) -> Config {
        let mut cfg = Config {
            data_dir: dir.to_path_buf(),
            min_free_mb: 0,
            ..Config::default()
        };
        cfg.handoff.block_size = 100;
        cfg.validation.min_ts = "2020-01-01T00:00:00Z".into();
        cfg.retention.heartbeat.rollup_after_days = 30;
        cfg.retention.reading.rollup_after_days = 20;
        cfg
    }

    /// Every view over the events below `cutoffs`, folded naively in offset order.
    fn naive(
        streams: &BTreeMap<Partition, Vec<(Offset, Event)>>,
        cutoffs: &BTreeMap<Partition, Offset>,
        rule: Dedupe,
    ) -> ViewSet {
        let mut v = ViewSet::default();
        for (p, events) in streams {
            let mut d = PartitionDeduper::new(rule);
            for (o, e) in events {
                if *o < cutoffs[p] && d.admit(&e.id, e.ts) {
                    v.fold(e);
                }
            }
        }
        v
    }

    fn version_entries(
        cfg: &Config,
    ) -> (
        batch_store::Manifest,
        BTreeMap<ViewKey, strata_common::views::Partial>,
    ) {
        let m = batch_store::read_current(&cfg.data_dir)
            .expect("read")
            .expect("a version");
        let views = batch_store::load_views(&cfg.data_dir, &m).expect("load");
        (m, views.entries.into_iter().collect())
    }

    #[test]
    fn a_rollup_changes_no_view_but_minute_series_before_its_threshold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        let rule = cfg.dedupe_rule();
        let mut streams = BTreeMap::new();
        for p in 0..2 {
            let events = stream(p as u64 + 1, 3_000, 0);
            write_segments(&cfg, p, &events, 250);
            streams.insert(p, events);
        }
        let before = crate::recompute::recompute(&cfg).expect("recompute");
        let (_, raw_views) = version_entries(&cfg);
        let truth = naive(&streams, &before.cutoffs, rule);
        assert_eq!(
            raw_views,
            truth
                .entries
                .clone()
                .into_iter()
                .collect::<BTreeMap<_, _>>()
        );

        let report = roll_up(&cfg, NOW, true).expect("dry run");
        assert!(report.generation.is_none() && report.dry_run);
        assert!(
            current(&cfg.master_dir()).expect("current").is_none(),
            "a dry run writes nothing"
        );
        let rolled_dry: u64 = report
            .partitions
            .values()
            .map(|r| r.rolled.values().sum::<u64>())
            .sum();
        assert!(rolled_dry > 1_000, "{report:?}");

        let report = roll_up(&cfg, NOW, false).expect("roll up");
        assert_eq!(report.generation, Some(1));
        let rolled: u64 = report
            .partitions
            .values()
            .map(|r| r.rolled.values().sum::<u64>())
            .sum();
        assert_eq!(rolled, rolled_dry);
        let gen = current(&cfg.master_dir())
            .expect("current")
            .expect("generation");
        assert_eq!(
            gen.thresholds["heartbeat"],
            Gran::Hour.floor(NOW - 30 * DAY)
        );
        assert_eq!(gen.thresholds["reading"], Gran::Hour.floor(NOW - 20 * DAY));
        for (p, part) in &gen.partitions {
            assert!(part.upto > 0 && part.upto <= before.cutoffs[p], "{part:?}");
        }

        let after = crate::recompute::recompute(&cfg).expect("recompute");
        assert_eq!(after.events, before.events, "accepted events");
        assert_eq!(after.duplicates, before.duplicates, "copies");
        assert_eq!(after.cutoffs, before.cutoffs);
        assert_eq!(after.rollup_generation, Some(1));
        let marks = after.retention;
        assert_eq!(
            marks.series_minute_from,
            Some(gen.thresholds["heartbeat"].max(gen.thresholds["reading"]))
        );
        let (_, rolled_views) = version_entries(&cfg);
        let expected: BTreeMap<_, _> = raw_views
            .iter()
            .filter(|(k, _)| marks.keeps(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert!(
            expected.len() < raw_views.len(),
            "minute buckets before the threshold are left out"
        );
        assert_eq!(rolled_views, expected);

        // Raw segments go only once a version of the generation is published; what is left
        // still tiles one range and the next recompute is unchanged.
        let purged = purge(&cfg).expect("purge");
        assert!(purged.raw.files > 0);
        let left = segment::list(&cfg.master_dir()).expect("list");
        for (p, segs) in &left {
            assert_eq!(segs[0].start, gen.partitions[p].upto);
        }
        crate::recompute::recompute(&cfg).expect("recompute");
        let (_, again) = version_entries(&cfg);
        assert_eq!(again, expected);

        // More events, a later rollup: the second generation builds on the first.
        for p in 0..2 {
            let start = left[&p].last().map_or(0, |s| s.end);
            let more = stream(p as u64 + 10, 1_000, start);
            write_segments(&cfg, p, &more, 250);
            streams.get_mut(&p).expect("stream").extend(more);
        }
        let v = crate::recompute::recompute(&cfg).expect("recompute");
        let report = roll_up(&cfg, NOW + 5 * DAY, false).expect("roll up");
        assert_eq!(report.generation, Some(2), "{report:?}");
        assert!(report.replaced_generation.files > 0);
        let v2 = crate::recompute::recompute(&cfg).expect("recompute");
        assert_eq!(
            (v2.events, v2.duplicates, v2.cutoffs.clone()),
            (v.events, v.duplicates, v.cutoffs.clone())
        );
        let (m, views) = version_entries(&cfg);
        let truth: BTreeMap<_, _> = naive(&streams, &m.cutoffs, rule)
            .entries
            .into_iter()
            .filter(|(k, _)| m.retention.keeps(k))
            .collect();
        assert_eq!(views, truth);
        purge(&cfg).expect("purge");
        assert!(
            !generation_dir(&cfg.master_dir(), 1).exists(),
            "the older generation is removed"
        );
    }

    #[test]
    fn minute_buckets_past_their_time_to_live_are_left_out_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        let events = stream(5, 2_000, 0);
        write_segments(&cfg, 0, &events, 200);
        crate::recompute::recompute(&cfg).expect("recompute");
        let (_, all) = version_entries(&cfg);
        // The time to live counts back from the clock, the stream from NOW: 10 days past NOW,
        // whatever the date the test runs on.
        let now = strata_common::time::now_millis();
        let days = (now - NOW).max(0) / DAY + 10;
        cfg.retention.minute_series_days = days as _;
        let m = crate::recompute::recompute(&cfg).expect("recompute");
        let from = Gran::Day.floor(now - days * DAY);
        assert_eq!(m.retention.item_minute_from, Some(from));
        assert_eq!(m.retention.series_minute_from, Some(from));
        let (_, kept) = version_entries(&cfg);
        let minute_start = |k: &ViewKey| match k {
            ViewKey::Series {
                gran: Gran::Minute,
                start,
            }
            | ViewKey::ItemSeries {
                gran: Gran::Minute,
                start,
                ..
            } => Some(*start),
            _ => None,
        };
        let expected: BTreeMap<_, _> = all
            .iter()
            .filter(|(k, _)| minute_start(k).is_none_or(|s| s >= from))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert!(
            expected.len() < all.len(),
            "the stream has minute buckets older than the time to live"
        );
        assert!(
            kept.keys().any(|k| minute_start(k).is_some()),
            "younger minute buckets stay"
        );
        assert_eq!(kept, expected);
    }

    #[test]
    fn leftovers_of_a_killed_rollup_are_never_read_and_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        let events = stream(3, 2_000, 0);
        write_segments(&cfg, 0, &events, 200);
        crate::recompute::recompute(&cfg).expect("recompute");
        let (_, raw_views) = version_entries(&cfg);
        // A generation written but never named by CURRENT, and a partial one.
        let master = cfg.master_dir();
        fs::create_dir_all(generation_dir(&master, 1)).expect("mkdir");
        fs::write(
            generation_dir(&master, 1).join("p00000.kept.parquet"),
            b"junk",
        )
        .expect("write");
        fs::create_dir_all(generation_dir(&master, 2).with_extension("partial")).expect("mkdir");
        crate::recompute::recompute(&cfg).expect("recompute");
        assert_eq!(version_entries(&cfg).1, raw_views, "leftovers are not read");
        let report = roll_up(&cfg, NOW, false).expect("roll up");
        assert_eq!(report.generation, Some(1));
        assert!(!generation_dir(&master, 2)
            .with_extension("partial")
            .exists());
        crate::recompute::recompute(&cfg).expect("recompute");
        let (m, views) = version_entries(&cfg);
        let expected: BTreeMap<_, _> = raw_views
            .into_iter()
            .filter(|(k, _)| m.retention.keeps(k))
            .collect();
        assert_eq!(views, expected);
    }
}
