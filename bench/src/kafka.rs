//! The raw-consume peer and topic end offsets, with plain rdkafka.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::{elapsed_since, Out};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer that reads partitions it is assigned, commits nothing, and fetches as the speed
/// layer's consumer does (`common/src/kafka.rs`), so that the two differ only in what they do with
/// each message.
pub fn consumer(brokers: &str) -> Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "strata-bench-raw")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "50")
        .set("queued.min.messages", "200000")
        .create()
        .context("creating the consumer")
}

/// The high watermark (next offset to be written) of every partition of `topic`, from `c`.
fn ends(c: &BaseConsumer, topic: &str) -> Result<BTreeMap<i32, i64>> {
    let ends = strata_common::kafka::high_watermarks(c, topic)?;
    if ends.is_empty() {
        bail!("topic {topic} has no partitions (does it exist?)");
    }
    Ok(ends)
}

/// The high watermark of every partition of `topic`.
pub fn end_offsets(brokers: &str, topic: &str) -> Result<BTreeMap<i32, i64>> {
    ends(&consumer(brokers)?, topic)
}

/// Reads every partition of `topic` from the beginning to its end as of the start, discarding
/// the messages (their payload bytes are summed, so the reads are not optimised away). The time
/// runs from `started_at_ns` (the caller's clock just before it started this process).
pub fn consume(brokers: &str, topic: &str, started_at_ns: u128, out: &mut Out) -> Result<()> {
    let c = consumer(brokers)?;
    let ends = ends(&c, topic)?;
    let total: i64 = ends.values().sum();
    let mut tpl = TopicPartitionList::new();
    for &p in ends.keys() {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl).context("assigning the partitions")?;

    let mut remaining: BTreeMap<i32, i64> = ends
        .iter()
        .filter(|(_, &h)| h > 0)
        .map(|(&p, &h)| (p, h))
        .collect();
    let (mut messages, mut bytes) = (0u64, 0u64);
    let mut last_log = Instant::now();
    let watchdog = Instant::now();
    let mut last_progress = Instant::now();
    while !remaining.is_empty() {
        match c.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => eprintln!("[consume] error (continuing): {e}"),
            Some(Ok(m)) => {
                messages += 1;
                bytes += m.payload().map_or(0, |p| p.len() as u64);
                last_progress = Instant::now();
                if let Some(&end) = remaining.get(&m.partition()) {
                    if m.offset() + 1 >= end {
                        remaining.remove(&m.partition());
                    }
                }
            }
        }
        if last_log.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "[consume] {messages}/{total} messages, {:.0}/s",
                messages as f64 / watchdog.elapsed().as_secs_f64()
            );
            last_log = Instant::now();
        }
        if last_progress.elapsed() >= Duration::from_secs(60) {
            bail!("no message for 60 s with {remaining:?} still to read");
        }
    }
    let secs = elapsed_since(started_at_ns);
    out.num("messages", messages as f64);
    out.num("bytes", bytes as f64);
    out.num("secs", secs);
    out.num("rate", messages as f64 / secs);
    Ok(())
}

/// Waits until the offsets committed by consumer group `group` reach the end of every partition
/// of `topic` (as of the start): how the batch layer's archiver publishes how far it has archived.
pub fn wait_group(
    brokers: &str,
    topic: &str,
    group: &str,
    timeout: Duration,
    out: &mut Out,
) -> Result<()> {
    let ends = end_offsets(brokers, topic)?;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("creating the consumer")?;
    let mut tpl = TopicPartitionList::new();
    for &p in ends.keys() {
        tpl.add_partition(topic, p);
    }
    let target: i64 = ends.values().sum();
    let started = Instant::now();
    let mut last_log = Instant::now();
    loop {
        let committed: BTreeMap<i32, i64> = match c.committed_offsets(tpl.clone(), TIMEOUT) {
            Ok(list) => list
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(o) => (e.partition(), o),
                    _ => (e.partition(), 0),
                })
                .collect(),
            Err(e) => {
                eprintln!("[{group}] cannot read the committed offsets (retrying): {e}");
                BTreeMap::new()
            }
        };
        let sum: i64 = committed.values().sum();
        if ends
            .iter()
            .all(|(p, &end)| committed.get(p).copied().unwrap_or(0) >= end)
        {
            out.num("secs", started.elapsed().as_secs_f64());
            out.num("sum", sum as f64);
            return Ok(());
        }
        if started.elapsed() >= timeout {
            bail!("group {group}: at {sum} of {target} after {timeout:?}");
        }
        if last_log.elapsed() >= Duration::from_secs(2) {
            eprintln!("[{group}] {sum}/{target} committed");
            last_log = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
