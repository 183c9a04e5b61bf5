//! Recomputing every view from the master dataset, in parallel, and publishing the result.
//!
//! Each partition is folded in offset order (the dedupe rule needs it) into an [`IdFold`] (every
//! view keyed by ids of that fold's names); the partitions' folds are then merged into entries in
//! key order, view by view and time bucket by time bucket in parallel, and published.

use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;
use strata_common::batch_store::{self, DatasetStats, Manifest};
use strata_common::config::Config;
use strata_common::dedupe::PartitionDeduper;
use strata_common::disk;
use strata_common::handoff::{cutoff_below, Offsets};
use strata_common::progress::Progress;
use strata_common::retention::Marks;
use strata_common::time::{format_rfc3339, now_millis, Millis};
use strata_common::views::{Gran, IdFold};

use crate::retention::{self, Size};
use crate::segment::{self, Segment};
use crate::Result;

/// Segments parsed at once per partition: enough to keep every core busy.
const CHUNK: usize = 8;

/// What one partition contributes.
struct PartitionFold {
    views: IdFold,
    events: u64,
    duplicates: u64,
    /// Raw events read, per type.
    raw_rows: std::collections::BTreeMap<String, u64>,
    /// The partition, and the dedupe rule's state at its cutoff, published with the version.
    dedupe_state: (strata_common::handoff::Partition, Vec<u8>),
    /// Microseconds spent encoding that state.
    dedupe_state_us: u64,
}

/// Recomputes every view from the archive below the current cutoffs and publishes it as a new
/// version. On any error nothing is published and the previous version stays served.
pub fn recompute(cfg: &Config) -> Result<Manifest> {
    recompute_with(cfg, &|_, _| {})
}

/// [`recompute`], telling `on_progress(done, total)` segments as they are folded.
pub fn recompute_with(cfg: &Config, on_progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Manifest> {
    let started = Instant::now();
    let rules = cfg.validation.rules()?;
    let rule = cfg.dedupe_rule();
    let block_size = cfg.handoff.block_size;
    disk::check(&cfg.data_dir, cfg.min_free_mb)?;
    let removed = batch_store::clean(&cfg.data_dir, cfg.batch.keep_versions)?;
    if !removed.is_empty() {
        tracing::info!(versions = ?removed, "removed old and unfinished batch versions");
    }
    let master = cfg.master_dir();
    let segments = segment::list(&master)?;
    let generation = retention::current(&master)?;
    // Where each partition's raw segments begin to count: below it, the rollup generation.
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
    let progress = Mutex::new(Progress::new("recompute segments", Some(total as u64)));

    let folds: Vec<Result<PartitionFold>> = segments
        .par_iter()
        .map(|(p, segs)| {
            let cutoff = cutoffs[p];
            let start = starts[p];
            let wanted: Vec<&Segment> = segs
                .iter()
                .filter(|s| s.start < cutoff && s.start >= start)
                .collect();
            let mut fold = PartitionFold {
                views: IdFold::new(),
                events: 0,
                duplicates: 0,
                raw_rows: Default::default(),
                dedupe_state: (*p, Vec::new()),
                dedupe_state_us: 0,
            };
            let prefix = match &generation {
                Some(g) => retention::read_prefix(&master, g, *p, rule, &rules)?,
                None => None,
            };
            let mut dedupe = match prefix {
                Some(pr) => {
                    fold.events += pr.events();
                    fold.duplicates += pr.duplicates;
                    for (_, e) in &pr.kept {
                        fold.views.fold(e);
                    }
                    for r in &pr.rollups {
                        fold.views.fold_rollup(r);
                    }
                    pr.dedupe
                }
                None => PartitionDeduper::new(rule),
            };
            for chunk in wanted.chunks(CHUNK) {
                let parsed: Vec<_> = chunk
                    .par_iter()
                    .map(|s| segment::read(s, cutoff, &rules))
                    .collect::<Result<_>>()?;
                for events in parsed {
                    for (_, e) in events {
                        *fold.raw_rows.entry(e.type_name().to_string()).or_default() += 1;
                        if dedupe.admit(&e.id, e.ts) {
                            fold.views.fold(&e);
                            fold.events += 1;
                        } else {
                            fold.duplicates += 1;
                        }
                    }
                }
                if let Ok(mut pr) = progress.lock() {
                    pr.inc(chunk.len() as u64);
                    on_progress(pr.done(), total as u64);
                }
            }
            let encoding = Instant::now();
            fold.dedupe_state.1 = dedupe.encode_handover();
            fold.dedupe_state_us = encoding.elapsed().as_micros() as u64;
            Ok(fold)
        })
        .collect();

    let (mut events, mut duplicates) = (0, 0);
    let mut raw_rows = std::collections::BTreeMap::new();
    let mut parts = Vec::with_capacity(folds.len());
    let mut dedupe_states = std::collections::BTreeMap::new();
    let mut dedupe_state_us = 0;
    for f in folds {
        let f = f?;
        dedupe_state_us += f.dedupe_state_us;
        dedupe_states.insert(f.dedupe_state.0, f.dedupe_state.1);
        events += f.events;
        duplicates += f.duplicates;
        for (t, n) in f.raw_rows {
            *raw_rows.entry(t).or_default() += n;
        }
        parts.push(f.views);
    }
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
    let mut entries = IdFold::into_entries(parts);
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
            block_size,
            cutoffs,
            events,
            duplicates,
            keys: 0,
            duration_ms: started.elapsed().as_millis() as u64,
            retention: marks,
            rollup_generation: generation.as_ref().map(|g| g.generation),
            dataset: DatasetStats {
                files: retention::dataset_files(
                    &raw_rows,
                    raw_size,
                    replaced,
                    generation.as_ref().map(|g| (g, master.as_path())),
                ),
            },
        },
        &dedupe_states,
    )?;
    if let Ok(pr) = progress.lock() {
        pr.finish();
    }
    let with_publish_ms = started.elapsed().as_millis() as u64;
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
