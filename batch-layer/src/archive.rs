//! The archiver: appends every valid event of the topic to the master dataset.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::Message;
use strata_common::config::Config;
use strata_common::disk;
use strata_common::event::{decode, Event, Rules};
use strata_common::handoff::{Offset, Offsets, Partition};
use strata_common::kafka;
use strata_common::undecodable::{self, Change, Stall, StallWatch};
use tokio_util::sync::CancellationToken;

use crate::{segment, Result};

/// An open segment: events buffered for one partition since the last write.
struct Open {
    start: Offset,
    next: Offset,
    events: Vec<(Offset, Event)>,
    opened: Instant,
}

/// Progress of the archiver, shared with the scheduler.
#[derive(Debug, Default, Clone)]
pub struct ArchiveStatus {
    /// Exclusive end of what is durably archived, per partition.
    pub archived: Offsets,
    pub rejected: u64,
    pub segments_written: u64,
    /// Partitions waiting in front of records that cannot be decoded.
    pub stalled: BTreeMap<Partition, Stall>,
}

/// Consumes the topic into the master dataset until `shutdown`, or, with `until`, until every
/// partition's archive reaches the given offsets.
pub fn run(
    cfg: &Config,
    status: Arc<Mutex<ArchiveStatus>>,
    until: Option<Offsets>,
    shutdown: CancellationToken,
) -> Result<()> {
    let rules: Rules = cfg.validation.rules()?;
    let root: PathBuf = cfg.master_dir();
    let _lock = disk::DirLock::acquire(&root, "the archiver")?;
    segment::remove_leftovers(&root)?;
    let ends = segment::ends(&root)?;
    if let Ok(mut s) = status.lock() {
        s.archived = ends.clone();
    }
    let group = cfg.consumer_group("archive");
    let member = kafka::member_id(&root, "archive")?;
    // A consumer resuming every partition at `from` (what is archived, or at a new consumer
    // after a fencing, what is read: the loop passes over what it has).
    let new_consumer = |from: BTreeMap<Partition, Offset>| {
        let positions = Box::new(move |p: Partition| -> strata_common::Result<Option<i64>> {
            Ok(from.get(&p).copied())
        });
        kafka::resuming_consumer(&cfg.kafka, &group, Some(&member), positions)
    };
    let mut consumer = new_consumer(ends.clone())?;
    let mut fences = kafka::Fences::default();
    let topic = cfg.kafka.topic.clone();
    let max_events = cfg.batch.segment_max_events;
    let max_age = Duration::from_millis(cfg.batch.segment_max_age_ms);
    disk::check(&cfg.data_dir, cfg.min_free_mb)?;

    let mut next: BTreeMap<Partition, Offset> = ends;
    let mut open: BTreeMap<Partition, Open> = BTreeMap::new();
    let mut rejected = 0u64;
    let mut last_log = Instant::now();
    let mut archived_since_log = 0u64;
    tracing::info!(topic = %topic, root = %root.display(), "archiver consuming");

    let done = |next: &BTreeMap<Partition, Offset>, open: &BTreeMap<Partition, Open>| {
        until.as_ref().is_some_and(|u| {
            open.is_empty()
                && u.iter()
                    .all(|(p, &end)| end <= 0 || next.get(p).copied().unwrap_or(0) >= end)
        })
    };

    let mut last_position_check = Instant::now();
    let mut stalls = StallWatch::new(&cfg.kafka);
    let anchor = disk::Anchor::take(&cfg.data_dir)?;
    let mut last_anchor_check = Instant::now();
    undecodable::write_stalls(&root, &BTreeMap::new())?;
    while !shutdown.is_cancelled() && !done(&next, &open) {
        let polled = consumer.poll(Duration::from_millis(50));
        // Nothing to hand out: records passed over (transaction markers, aborted records) are
        // covered by the open segment's range, so the archive reaches the partition's end.
        if polled.is_none() && last_position_check.elapsed() >= Duration::from_millis(100) {
            last_position_check = Instant::now();
            for (p, position) in kafka::positions(&consumer, &topic) {
                let expected = next.get(&p).copied().unwrap_or(0);
                if position > expected {
                    let seg = open.entry(p).or_insert_with(|| Open {
                        start: expected,
                        next: expected,
                        events: Vec::new(),
                        opened: Instant::now(),
                    });
                    seg.next = position;
                    next.insert(p, position);
                }
            }
        }
        if let Some(result) = polled {
            match result {
                Err(e) => {
                    if kafka::check_fatal(&consumer, "archiver", &mut fences)?
                        == kafka::Fatal::Fenced
                    {
                        consumer = new_consumer(next.clone())?;
                        continue;
                    }
                    // An undecodable batch: the stall watch finds its partition.
                    if !stalls.on_error(&e) {
                        tracing::warn!(error = %e, "archiver consume error; retrying");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                Ok(msg) => {
                    let p = msg.partition();
                    let offset = msg.offset();
                    let expected = next.get(&p).copied().unwrap_or(0);
                    if offset >= expected {
                        let seg = open.entry(p).or_insert_with(|| Open {
                            start: expected,
                            next: expected,
                            events: Vec::new(),
                            opened: Instant::now(),
                        });
                        match decode(
                            msg.payload().unwrap_or(&[]),
                            msg.timestamp().to_millis(),
                            &rules,
                        ) {
                            Ok(event) => seg.events.push((offset, event)),
                            Err(_) => rejected += 1,
                        }
                        seg.next = offset + 1;
                        next.insert(p, offset + 1);
                    }
                }
            }
        }
        if last_anchor_check.elapsed() >= Duration::from_secs(1) {
            last_anchor_check = Instant::now();
            anchor.check()?;
        }
        if stalls.due() {
            let (held, _) = consumer.context().assignment();
            let positions = held
                .iter()
                .map(|&p| (p, next.get(&p).copied().unwrap_or(0)))
                .collect();
            let changes = stalls.check(&positions)?;
            let stalls_changed = !changes.is_empty();
            for change in changes {
                let Change::Stalled(p, stall) = change else {
                    continue;
                };
                tracing::error!(
                    partition = p,
                    offset = stall.offset,
                    reason = %stall.reason,
                    policy = ?cfg.kafka.undecodable,
                    "archiver: {topic}/{p} cannot be decoded from offset {}",
                    stall.offset
                );
                if cfg.kafka.undecodable != undecodable::Policy::Skip {
                    continue;
                }
                let Some(end) = stalls.end_of(p, &stall)? else {
                    continue;
                };
                tracing::warn!(
                partition = p,
                from = stall.offset,
                to = end,
                "archiver: offsets {}..{} of {topic}/{p} cannot be decoded ({}) and were skipped",
                stall.offset,
                end - 1,
                stall.reason
            );
                // Like records passed over by the consumer: the open segment's range covers them.
                let seg = open.entry(p).or_insert_with(|| Open {
                    start: stall.offset,
                    next: stall.offset,
                    events: Vec::new(),
                    opened: Instant::now(),
                });
                seg.next = end;
                next.insert(p, end);
                kafka::seek(&consumer, &topic, p, end)?;
                stalls.clear(p);
            }
            if stalls_changed {
                undecodable::write_stalls(&root, stalls.stalled())?;
                if let Ok(mut s) = status.lock() {
                    s.stalled = stalls.stalled().clone();
                }
            }
        }
        let mut wrote = false;
        let ready: Vec<Partition> = open
            .iter()
            .filter(|(p, o)| {
                o.events.len() >= max_events
                    || o.opened.elapsed() >= max_age
                    || shutdown.is_cancelled()
                    || until
                        .as_ref()
                        .is_some_and(|u| u.get(p).is_some_and(|&end| o.next >= end))
            })
            .map(|(&p, _)| p)
            .collect();
        for p in ready {
            if let Some(o) = open.remove(&p) {
                archived_since_log += o.events.len() as u64;
                disk::check(&cfg.data_dir, cfg.min_free_mb)?;
                segment::write(&root, p, o.start, o.next, &o.events)?;
                wrote = true;
                if let Ok(mut s) = status.lock() {
                    s.archived.insert(p, o.next);
                    s.segments_written += 1;
                    s.rejected = rejected;
                }
            }
        }
        if wrote {
            let archived = status
                .lock()
                .map(|s| s.archived.clone())
                .unwrap_or_default();
            kafka::commit_for_lag(&consumer, &topic, &archived);
            strata_common::fault::point("batch.archive.committed");
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            if archived_since_log > 0 {
                let rate = archived_since_log as f64 / last_log.elapsed().as_secs_f64();
                // Catching up to a known end (`batch --once`): how much is left, and when done.
                let left: Option<i64> = until.as_ref().map(|u| {
                    u.iter()
                        .map(|(p, &end)| (end - next.get(p).copied().unwrap_or(0)).max(0))
                        .sum()
                });
                tracing::info!(
                    rate = format!("{rate:.0}/s"),
                    archived = ?next,
                    left,
                    eta = left.map(|l| format!("{:.0}s", l as f64 / rate.max(1.0))),
                    rejected,
                    "archiver progress"
                );
            }
            archived_since_log = 0;
            last_log = Instant::now();
        }
    }
    // Write what is open: each open segment is a complete, contiguous range.
    for (p, o) in std::mem::take(&mut open) {
        disk::check(&cfg.data_dir, cfg.min_free_mb)?;
        segment::write(&root, p, o.start, o.next, &o.events)?;
        if let Ok(mut s) = status.lock() {
            s.archived.insert(p, o.next);
            s.segments_written += 1;
        }
    }
    Ok(())
}
