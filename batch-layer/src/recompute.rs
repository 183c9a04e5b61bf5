//! Recomputing every view from the master dataset, in parallel, and publishing the result.
//!
//! Each partition is folded in offset order (the dedupe rule needs it) into an [`IdFold`] (every
//! view keyed by ids of that fold's names); the partitions' folds are then merged into entries in
//! key order, view by view and time bucket by time bucket in parallel, and published.

use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;
use strata_common::batch_store::{self, Manifest};
use strata_common::config::Config;
use strata_common::dedupe::PartitionDeduper;
use strata_common::disk;
use strata_common::handoff::{cutoff_below, Offsets};
use strata_common::progress::Progress;
use strata_common::time::{format_rfc3339, now_millis};
use strata_common::views::IdFold;

use crate::segment::{self, Segment};
use crate::Result;

/// Segments parsed at once per partition: enough to keep every core busy.
const CHUNK: usize = 8;

/// What one partition contributes.
struct PartitionFold {
    views: IdFold,
    events: u64,
    duplicates: u64,
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
    let segments = segment::list(&cfg.master_dir())?;
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
        .map(|(p, segs)| segs.iter().filter(|s| s.start < cutoffs[p]).count())
        .sum();
    let progress = Mutex::new(Progress::new("recompute segments", Some(total as u64)));

    let folds: Vec<Result<PartitionFold>> = segments
        .par_iter()
        .map(|(p, segs)| {
            let cutoff = cutoffs[p];
            let wanted: Vec<&Segment> = segs.iter().filter(|s| s.start < cutoff).collect();
            let mut fold = PartitionFold {
                views: IdFold::new(),
                events: 0,
                duplicates: 0,
            };
            let mut dedupe = PartitionDeduper::new(rule);
            for chunk in wanted.chunks(CHUNK) {
                let parsed: Vec<_> = chunk
                    .par_iter()
                    .map(|s| segment::read(s, cutoff, &rules))
                    .collect::<Result<_>>()?;
                for events in parsed {
                    for (_, e) in events {
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
            Ok(fold)
        })
        .collect();

    let (mut events, mut duplicates) = (0, 0);
    let mut parts = Vec::with_capacity(folds.len());
    for f in folds {
        let f = f?;
        events += f.events;
        duplicates += f.duplicates;
        parts.push(f.views);
    }
    let entries = IdFold::into_entries(parts);
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
        },
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
        "published batch version"
    );
    Ok(manifest)
}
