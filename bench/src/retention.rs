//! `strata-bench retention`: the master dataset and the recompute before and after a rollup.
//!
//! Writes a master dataset with the archiver's segment writer (about 25 segments per partition,
//! at most `batch.segment-max-events` events each, four partitions, each partition in event-time order as an archiver
//! writes it): a share of the events are heartbeats and readings from before the rollup age
//! (devices sending one heartbeat and one reading per metric a minute), the rest the seeded
//! generator's stream of the last days (every type). Then: a recompute (timed), `retention`'s
//! rollup (timed), a recompute publishing it (timed), the purge, and the dataset's bytes at each
//! step, with the published versions' event counts, which must be equal.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Result};
use strata_batch::{recompute, retention, segment};
use strata_common::config::Config;
use strata_common::event::{Event, Kind};
use strata_common::generate::{Class, GenConfig, Generator};
use strata_common::handoff::Offset;
use strata_common::progress::Progress;
use strata_common::time::{now_millis, Millis};
use strata_common::views::hash64;

use crate::Out;

const DAY: Millis = 86_400_000;
const PARTITIONS: u32 = 4;

/// Appends events to per-partition segments as the archiver would.
struct Writer {
    root: PathBuf,
    per_segment: usize,
    open: Vec<Vec<(Offset, Event)>>,
    next: Vec<Offset>,
    written: u64,
}

impl Writer {
    fn push(&mut self, key: &str, e: Event) -> Result<()> {
        let p = (hash64(key) % u64::from(PARTITIONS)) as usize;
        let o = self.next[p];
        self.next[p] += 1;
        self.open[p].push((o, e));
        if self.open[p].len() >= self.per_segment {
            self.flush(p)?;
        }
        Ok(())
    }

    fn flush(&mut self, p: usize) -> Result<()> {
        let events = std::mem::take(&mut self.open[p]);
        if let (Some(first), Some(last)) = (events.first(), events.last()) {
            segment::write(&self.root, p as i32, first.0, last.0 + 1, &events)?;
            self.written += events.len() as u64;
        }
        Ok(())
    }
}

pub fn run(data_dir: &Path, events: u64, old_share: f64, out: &mut Out) -> Result<()> {
    ensure!(
        !data_dir.exists(),
        "{} exists: give a new directory",
        data_dir.display()
    );
    let mut cfg = Config {
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    };
    cfg.handoff.block_size = 1;
    let now = now_millis();
    let old = (events as f64 * old_share) as u64;
    let recent = events - old;
    let mut w = Writer {
        root: cfg.master_dir(),
        // About 25 segments per partition, at most `batch.segment-max-events` each: an archiver
        // running continuously writes many (its segments also close after a second).
        per_segment: cfg
            .batch
            .segment_max_events
            .min((events as usize / PARTITIONS as usize / 25).max(1_000)),
        open: vec![Vec::new(); PARTITIONS as usize],
        next: vec![0; PARTITIONS as usize],
        written: 0,
    };
    let mut progress = Progress::new("retention bench: write the master dataset", Some(events));
    // Old device events: one heartbeat and two readings a minute per device, from 60 days ago.
    let devices: u64 = 2_000;
    let mut n = 0;
    let mut minute = 0i64;
    'old: loop {
        let ts = now - 60 * DAY + minute * 60_000;
        for d in 0..devices {
            let device = format!("dev-{d:05}");
            let kinds = [
                Kind::Heartbeat {
                    device: device.clone(),
                },
                Kind::Reading {
                    device: device.clone(),
                    metric: "temp_c".into(),
                    value: 20.0 + ((d + minute as u64) % 100) as f64 / 10.0,
                },
                Kind::Reading {
                    device: device.clone(),
                    metric: "humidity".into(),
                    value: 40.0 + ((d * 7 + minute as u64) % 300) as f64 / 10.0,
                },
            ];
            for kind in kinds {
                if n >= old {
                    break 'old;
                }
                w.push(
                    &device,
                    Event {
                        id: format!("old-{n}"),
                        ts: ts + (d % 60) as i64 * 1000,
                        kind,
                    },
                )?;
                n += 1;
                progress.inc(1);
            }
        }
        minute += 1;
    }
    let oldest_recent = now - 25 * DAY;
    ensure!(
        now - 60 * DAY + minute * 60_000 < now - 30 * DAY,
        "the old events reach past the 30-day age: use a smaller share or fewer events"
    );
    // The rest: the generator's stream of the last 25 days (every type).
    let mut gc = GenConfig::new(7, recent, oldest_recent);
    gc.span_ms = 25 * DAY;
    gc.malformed_rate = 0.0;
    gc.duplicate_rate = 0.0;
    for g in Generator::new(gc) {
        if let Class::Event(e) = g.class {
            w.push(&g.key, e)?;
            progress.inc(1);
        }
    }
    for p in 0..PARTITIONS as usize {
        w.flush(p)?;
    }
    progress.finish();
    let master = cfg.master_dir();
    out.num("retention.events", w.written as f64);
    out.num("retention.old_device_events", old as f64);
    out.num(
        "retention.before.master_bytes",
        strata_common::disk::dir_bytes(&master) as f64,
    );
    out.num(
        "retention.before.segments",
        segment::list(&master)?
            .values()
            .map(Vec::len)
            .sum::<usize>() as f64,
    );

    let t = Instant::now();
    let before = recompute::recompute(&cfg)?;
    out.num("retention.before.recompute_s", t.elapsed().as_secs_f64());
    out.num("retention.before.version_events", before.events as f64);

    let t = Instant::now();
    let report = retention::roll_up(&cfg, now, false)?;
    out.num("retention.rollup_s", t.elapsed().as_secs_f64());
    ensure!(
        report.generation.is_some(),
        "nothing rolled up: {:?}",
        report.nothing_because
    );
    let rolled: u64 = report
        .partitions
        .values()
        .map(|p| p.rolled.values().sum::<u64>())
        .sum();
    let records: u64 = report
        .partitions
        .values()
        .map(|p| p.records.values().sum::<u64>())
        .sum();
    out.num("retention.rolled_events", rolled as f64);
    out.num("retention.rollup_records", records as f64);

    let t = Instant::now();
    let after = recompute::recompute(&cfg)?;
    out.num(
        "retention.after_rollup.recompute_s",
        t.elapsed().as_secs_f64(),
    );
    ensure!(
        after.events == before.events,
        "the rollup's version counts {} events, the raw one {}",
        after.events,
        before.events
    );
    let purged = retention::purge(&cfg)?;
    out.num("retention.purged_raw_bytes", purged.raw.bytes as f64);
    out.num(
        "retention.after.master_bytes",
        strata_common::disk::dir_bytes(&master) as f64,
    );

    let t = Instant::now();
    let again = recompute::recompute(&cfg)?;
    out.num("retention.after.recompute_s", t.elapsed().as_secs_f64());
    ensure!(
        again.events == before.events,
        "events changed after the purge"
    );
    out.num("retention.after.version_events", again.events as f64);
    Ok(())
}
