//! Recomputing every view from the master dataset, in parallel, and publishing the result.
//!
//! A recompute has three steps, and the engines that run it share the first and the last:
//! [`inputs`] decides what is read (each partition's segments from the rollup generation's end up
//! to its cutoff), a fold turns it into every view's entries, and [`publish`] writes them as a
//! new version with the manifest. The fold here is the local one: each partition is folded in
//! offset order (the dedupe rule needs it) into an [`IdFold`] (every view keyed by ids of that
//! fold's names) on rayon's pool; the partitions' folds are then merged into entries in key
//! order, view by view and time bucket by time bucket in parallel. `strata-engine` runs the same
//! fold on Apache DataFusion, in process or on a Ballista cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;
use strata_common::batch_store::{self, DatasetStats, Manifest};
use strata_common::config::{Config, Engine};
use strata_common::dedupe::{Dedupe, PartitionDeduper};
use strata_common::disk;
use strata_common::event::{Event, Rules};
use strata_common::handoff::{cutoff_below, Offsets, Partition};
use strata_common::progress::Progress;
use strata_common::retention::Marks;
use strata_common::time::{format_rfc3339, now_millis, Millis};
use strata_common::views::{Entries, Gran, IdFold};

use crate::retention::{self, Generation, Size};
use crate::segment::{self, Segment};
use crate::Result;

/// Segments parsed at once per partition: enough to keep every core busy.
const CHUNK: usize = 8;

/// What a recompute reads: per partition, the segments from the rollup generation's end (its
/// start) up to its cutoff.
pub struct Inputs {
    pub started: Instant,
    pub master: PathBuf,
    pub segments: BTreeMap<Partition, Vec<Segment>>,
    pub generation: Option<Generation>,
    /// Where each partition's raw segments begin to count: below it, the rollup generation.
    pub starts: Offsets,
    pub cutoffs: Offsets,
    /// Segments to read, over every partition.
    pub total: usize,
    raw_size: Size,
    replaced: Size,
}

impl Inputs {
    /// The segments of partition `p` that the recompute reads, in offset order.
    pub fn wanted(&self, p: Partition) -> Vec<&Segment> {
        let (start, cutoff) = (self.starts[&p], self.cutoffs[&p]);
        self.segments.get(&p).map_or_else(Vec::new, |segs| {
            segs.iter()
                .filter(|s| s.start < cutoff && s.start >= start)
                .collect()
        })
    }
}

/// What a fold produced: every view's entries in key order, and per-partition bookkeeping.
pub struct Folded {
    /// Chunks whose concatenation is sorted with no key twice.
    pub entries: Vec<Entries>,
    pub events: u64,
    pub duplicates: u64,
    /// Raw events read, per type.
    pub raw_rows: BTreeMap<String, u64>,
    /// Per partition, the dedupe rule's state at its cutoff (published with the version).
    pub dedupe_states: BTreeMap<Partition, Vec<u8>>,
    /// Microseconds spent encoding those states, summed over partitions.
    pub dedupe_state_us: u64,
}

/// One partition's fold, whichever engine runs it: the rollup generation's prefix first, then
/// its raw events in offset order through the dedupe rule into every view.
pub struct PartitionFold {
    pub partition: Partition,
    pub views: IdFold,
    pub events: u64,
    pub duplicates: u64,
    /// Raw events read, per type.
    pub raw_rows: BTreeMap<String, u64>,
    dedupe: PartitionDeduper,
}

impl PartitionFold {
    /// The fold of partition `p` before its raw segments: the prefix `generation` rolled up
    /// (kept events and rollup records), and the dedupe rule as it stood at the prefix's end.
    pub fn start(
        master: &Path,
        generation: Option<&Generation>,
        p: Partition,
        rule: Dedupe,
        rules: &Rules,
    ) -> Result<Self> {
        let mut fold = PartitionFold {
            partition: p,
            views: IdFold::new(),
            events: 0,
            duplicates: 0,
            raw_rows: BTreeMap::new(),
            dedupe: PartitionDeduper::new(rule),
        };
        let prefix = match generation {
            Some(g) => retention::read_prefix(master, g, p, rule, rules)?,
            None => None,
        };
        if let Some(pr) = prefix {
            fold.events += pr.events();
            fold.duplicates += pr.duplicates;
            for (_, e) in &pr.kept {
                fold.views.fold(e);
            }
            for r in &pr.rollups {
                fold.views.fold_rollup(r);
            }
            fold.dedupe = pr.dedupe;
        }
        Ok(fold)
    }

    /// Adds the partition's next raw event (in offset order).
    pub fn add(&mut self, e: &Event) {
        *self.raw_rows.entry(e.type_name().to_string()).or_default() += 1;
        if self.dedupe.admit(&e.id, e.ts) {
            self.views.fold(e);
            self.events += 1;
        } else {
            self.duplicates += 1;
        }
    }

    /// The dedupe rule's state now, as a version publishes it, and the microseconds its
    /// encoding took.
    pub fn dedupe_handover(&self) -> (Vec<u8>, u64) {
        let encoding = Instant::now();
        let state = self.dedupe.encode_handover();
        (state, encoding.elapsed().as_micros() as u64)
    }
}

/// Recomputes every view from the archive below the current cutoffs and publishes it as a new
/// version. On any error nothing is published and the previous version stays served.
pub fn recompute(cfg: &Config) -> Result<Manifest> {
    recompute_with(cfg, &|_, _| {})
}

/// [`recompute`], telling `on_progress(done, total)` segments as they are folded.
/// Runs on the engine `batch.engine` names: here, or in `strata-engine` ([`crate::engine`]),
/// which reports its own progress.
pub fn recompute_with(cfg: &Config, on_progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Manifest> {
    if cfg.batch.engine()? != Engine::Local {
        return crate::engine::recompute(cfg);
    }
    let inputs = inputs(cfg)?;
    let folded = fold_local(cfg, &inputs, on_progress)?;
    publish(cfg, &inputs, folded)
}

/// Checks the disk, removes old and unfinished versions, and decides what the recompute reads.
pub fn inputs(cfg: &Config) -> Result<Inputs> {
    let started = Instant::now();
    let block_size = cfg.handoff.block_size;
    disk::check(&cfg.data_dir, cfg.min_free_mb)?;
    let removed = batch_store::clean(&cfg.data_dir, cfg.batch.keep_versions)?;
    if !removed.is_empty() {
        tracing::info!(versions = ?removed, "removed old and unfinished batch versions");
    }
    let master = cfg.master_dir();
    let segments = segment::list(&master)?;
    let generation = retention::current(&master)?;
    let starts: Offsets = segments
        .keys()
        .map(|&p| {
            let upto = generation
                .as_ref()
                .and_then(|g| g.partitions.get(&p))
                .map_or(0, |r| r.upto);
            (p, upto)
        })
        .collect();
    let cutoffs: Offsets = segments
        .iter()
        .map(|(&p, segs)| {
            (
                p,
                segs.last().map_or(0, |s| cutoff_below(s.end, block_size)),
            )
        })
        .collect();
    let total: usize = segments
        .iter()
        .map(|(p, segs)| {
            segs.iter()
                .filter(|s| s.start < cutoffs[p] && s.start >= starts[p])
                .count()
        })
        .sum();
    let (mut raw_size, mut replaced) = (Size::default(), Size::default());
    for (p, segs) in &segments {
        for s in segs {
            let size = std::fs::metadata(&s.path).map_or(0, |m| m.len());
            let into = if s.start < starts[p] {
                &mut replaced
            } else {
                &mut raw_size
            };
            into.files += 1;
            into.bytes += size;
        }
    }
    Ok(Inputs {
        started,
        master,
        segments,
        generation,
        starts,
        cutoffs,
        total,
        raw_size,
        replaced,
    })
}

/// The local fold: partitions in parallel on rayon's pool, segments parsed in parallel chunks.
fn fold_local(
    cfg: &Config,
    inputs: &Inputs,
    on_progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Folded> {
    let rules = cfg.validation.rules()?;
    let rule = cfg.dedupe_rule();
    let total = inputs.total;
    let progress = Mutex::new(Progress::new("recompute segments", Some(total as u64)));
    let folds: Vec<Result<(PartitionFold, Vec<u8>, u64)>> = inputs
        .segments
        .par_iter()
        .map(|(p, _)| {
            let cutoff = inputs.cutoffs[p];
            let mut fold =
                PartitionFold::start(&inputs.master, inputs.generation.as_ref(), *p, rule, &rules)?;
            for chunk in inputs.wanted(*p).chunks(CHUNK) {
                let parsed: Vec<_> = chunk
                    .par_iter()
                    .map(|s| segment::read(s, cutoff, &rules))
                    .collect::<Result<_>>()?;
                for events in parsed {
                    for (_, e) in events {
                        fold.add(&e);
                    }
                }
                if let Ok(mut pr) = progress.lock() {
                    pr.inc(chunk.len() as u64);
                    on_progress(pr.done(), total as u64);
                }
            }
            let (state, us) = fold.dedupe_handover();
            Ok((fold, state, us))
        })
        .collect();
    let mut out = Folded {
        entries: Vec::new(),
        events: 0,
        duplicates: 0,
        raw_rows: BTreeMap::new(),
        dedupe_states: BTreeMap::new(),
        dedupe_state_us: 0,
    };
    let mut parts = Vec::with_capacity(folds.len());
    for f in folds {
        let (f, state, us) = f?;
        out.dedupe_state_us += us;
        out.dedupe_states.insert(f.partition, state);
        out.events += f.events;
        out.duplicates += f.duplicates;
        for (t, n) in f.raw_rows {
            *out.raw_rows.entry(t).or_default() += n;
        }
        parts.push(f.views);
    }
    out.entries = IdFold::into_entries(parts);
    if let Ok(pr) = progress.lock() {
        pr.finish();
    }
    Ok(out)
}

/// Publishes a fold's entries as a new version: the retention marks applied, the manifest
/// written with the cutoffs and the dataset's figures, the dedupe states beside it.
pub fn publish(cfg: &Config, inputs: &Inputs, folded: Folded) -> Result<Manifest> {
    let Folded {
        mut entries,
        events,
        duplicates,
        raw_rows,
        dedupe_states,
        dedupe_state_us,
    } = folded;
    let generation = &inputs.generation;
    let mut marks = generation
        .as_ref()
        .map(retention::Generation::marks)
        .unwrap_or_default();
    if cfg.retention.minute_series_days > 0 {
        let from = Gran::Day
            .floor(now_millis() - Millis::from(cfg.retention.minute_series_days) * 86_400_000);
        marks = marks.union(Marks {
            series_minute_from: Some(from),
            item_minute_from: Some(from),
        });
    }
    if !marks.is_empty() {
        entries
            .par_iter_mut()
            .for_each(|chunk| chunk.retain(|(k, _)| marks.keeps(k)));
    }
    let dedupe_state_bytes: usize = dedupe_states.values().map(Vec::len).sum();
    strata_common::fault::point("batch.recompute.folded");
    let manifest = batch_store::publish_sorted(
        &cfg.data_dir,
        &entries,
        Manifest {
            version: 0,
            published_at: format_rfc3339(now_millis()),
            block_size: cfg.handoff.block_size,
            cutoffs: inputs.cutoffs.clone(),
            events,
            duplicates,
            keys: 0,
            duration_ms: inputs.started.elapsed().as_millis() as u64,
            retention: marks,
            rollup_generation: generation.as_ref().map(|g| g.generation),
            dataset: DatasetStats {
                files: retention::dataset_files(
                    &raw_rows,
                    inputs.raw_size,
                    inputs.replaced,
                    generation.as_ref().map(|g| (g, inputs.master.as_path())),
                ),
            },
        },
        &dedupe_states,
    )?;
    let with_publish_ms = inputs.started.elapsed().as_millis() as u64;
    entries.into_par_iter().for_each(drop);
    // `ms`: the fold (the manifest's `duration_ms`); `with_publish_ms`: read, fold and the
    // version written and published, the span a peer engine is timed over in the benchmark.
    tracing::info!(
        version = manifest.version,
        events,
        duplicates,
        keys = manifest.keys,
        cutoffs = ?manifest.cutoffs,
        ms = manifest.duration_ms,
        with_publish_ms,
        dedupe_state_ms = dedupe_state_us / 1000,
        dedupe_state_bytes,
        "published batch version"
    );
    Ok(manifest)
}
