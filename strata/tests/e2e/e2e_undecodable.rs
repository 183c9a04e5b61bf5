//! Record batches that cannot be decoded, made the way they happen: data damaged on the broker's
//! disk. A stream goes to four partitions; partitions 1 and 3 also get three zstd-compressed
//! parts each (A, B, C) from a stock producer. With the broker stopped, partition 1's B batches
//! get their compressed data damaged and partition 3's B batches a compression codec no client
//! knows; the broker is started again.
//!
//! `strata up` (default `kafka.undecodable = "stall"`): partitions 0 and 2 are consumed to their
//! end, partitions 1 and 3 stop exactly at B's first offset; `/v1/status` and `/metrics` name them
//! with the offset and the reason, and every answer equals the ground truth of what lies before
//! the damage. Restarted with `kafka.undecodable = "skip"`: both partitions pass over exactly B's
//! offsets (found by the layers themselves), the ranges are in the dead-letter topic and in
//! `/v1/status`, C is counted, every answer equals the ground truth without B, a batch run
//! changes nothing, and `strata verify` agrees.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::support::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use serde_json::Value;
use strata_common::generate::{GenConfig, Generator};
use strata_common::time::now_millis;

const PARTITIONS: i32 = 4;
const DAMAGED: [i32; 2] = [1, 3];

fn high_watermark(brokers: &str, topic: &str, p: i32) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    c.fetch_watermarks(topic, p, Duration::from_secs(10))
        .expect("watermarks")
        .1
}

/// Sends a generated stream to one partition with a zstd producer, in as few batches as it takes.
fn produce_to(brokers: &str, topic: &str, p: i32, cfg: &GenConfig) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("compression.type", "zstd")
        .set("linger.ms", "200")
        .set("batch.size", "4000000")
        .set("batch.num.messages", "100000")
        .create()
        .expect("producer");
    for g in Generator::new(cfg.clone()) {
        let mut record = BaseRecord::to(topic)
            .partition(p)
            .key(g.key.as_str())
            .payload(g.payload.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("flush the producer");
}

/// Damages, in partition `p`'s log segment, every record batch whose base offset is in
/// `range`; returns how many. Batch layout (magic 2): base offset (8 bytes), length (4), leader
/// epoch (4), magic (1), CRC (4), attributes (2), ..., records from byte 61.
fn damage(log: &Path, range: std::ops::Range<i64>, codec_only: bool) -> usize {
    let mut bytes = std::fs::read(log).expect("read the log segment");
    let mut at = 0usize;
    let mut damaged = 0;
    while at + 61 <= bytes.len() {
        let base = i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let len = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
        assert_eq!(bytes[at + 16], 2, "record batch magic at byte {at}");
        if range.contains(&base) {
            if codec_only {
                // Codec 5: no Kafka client knows it.
                bytes[at + 22] = (bytes[at + 22] & !0x07) | 0x05;
            } else {
                assert_eq!(bytes[at + 22] & 0x07, 4, "a zstd batch");
                // The zstd frame's magic number and header: the data no longer decompresses.
                for b in &mut bytes[at + 61..at + 69] {
                    *b = 0;
                }
            }
            damaged += 1;
        }
        at += 12 + len;
    }
    assert_eq!(at, bytes.len(), "whole batches in {}", log.display());
    std::fs::write(log, bytes).expect("write the log segment");
    damaged
}

fn partition_status(st: &Value, p: i32) -> &Value {
    &st["speed"]["partitions"][p.to_string()]
}

fn metric(addr: &str, line_start: &str) -> Option<String> {
    let (_, body) = http(addr, "GET", "/metrics", &[]);
    body.lines()
        .find(|l| l.starts_with(line_start))
        .map(|l| l[line_start.len()..].trim().to_string())
}

#[test]
fn undecodable_batches_stall_visibly_and_are_skipped_on_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(&dir.path().join("broker"), &[]);
    let brokers = broker.addr();
    let topic = unique_topic("e2e-undecodable");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut common = layer_args(&topic, &dir.path().join("data"), 500, None);
    set_brokers(&mut common, &brokers);

    let now = now_millis();
    let mut before = Truth::default();
    let mut without_b = Truth::default();
    // Keyed over every partition, by `strata generate` (which creates the topic).
    let spread = gen_config(81, 6_000, now - 3 * 3_600_000, 3_600_000, false);
    let mut gen = generate_args(&common, &spread);
    gen.extend(["--partitions".into(), PARTITIONS.to_string()]);
    run_strata(&gen);
    before.add(spread.clone());
    without_b.add(spread);

    let mut b_ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    for (i, &p) in DAMAGED.iter().enumerate() {
        let seed = 90 + 10 * i as u64;
        let part = |n: u64, count: u64| {
            gen_config(
                seed + n,
                count,
                now - 2 * 3_600_000 + n as i64 * 600_000,
                600_000,
                false,
            )
        };
        let (a, b, c) = (part(0, 1_500), part(1, 700), part(2, 1_500));
        produce_to(&brokers, &topic, p, &a);
        let b_from = high_watermark(&brokers, &topic, p);
        produce_to(&brokers, &topic, p, &b);
        let b_to = high_watermark(&brokers, &topic, p);
        produce_to(&brokers, &topic, p, &c);
        assert_eq!(b_to - b_from, 700);
        b_ranges.insert(p, (b_from, b_to));
        before.add(a.clone());
        without_b.add(a);
        without_b.add(c);
    }

    broker.stop();
    for (&p, &(from, to)) in &b_ranges {
        let log = broker
            .dir
            .join("data")
            .join(format!("{topic}-{p}"))
            .join("00000000000000000000.log");
        let n = damage(&log, from..to, p == 3);
        assert!(n >= 1, "no batch of B found in partition {p}");
    }
    broker.restart();

    // Stall (the default): the others go on, the damaged ones wait at B and say so.
    let mut up = Proc::spawn("up-stall", &up_args(&common, &addr, ADMIN_KEY), dir.path());
    wait_http(&addr);
    let st = wait_for(
        "partitions 1 and 3 reported stalled, the others at their end",
        Duration::from_secs(120),
        || {
            up.assert_running();
            let (_, st) = get_json(&addr, "/v1/status");
            let stalled = DAMAGED.iter().all(|&p| {
                partition_status(&st, p)["stall"]["offset"].as_i64() == Some(b_ranges[&p].0)
            });
            let others = [0, 2].iter().all(|&p| {
                partition_status(&st, p)["next_offset"].as_i64()
                    == Some(high_watermark(&brokers, &topic, p))
            });
            let archive = DAMAGED.iter().all(|&p| {
                st["archive"]["stalled"][p.to_string()]["offset"].as_i64() == Some(b_ranges[&p].0)
            });
            (stalled && others && archive).then_some(st)
        },
    );
    for &p in &DAMAGED {
        let s = partition_status(&st, p);
        assert_eq!(s["next_offset"].as_i64(), Some(b_ranges[&p].0), "{st}");
        let reason = s["stall"]["reason"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "a reason: {st}");
        assert_eq!(
            metric(
                &addr,
                &format!("strata_speed_partition_stalled{{partition=\"{p}\"}}")
            ),
            Some("1".into())
        );
        assert_eq!(
            metric(
                &addr,
                &format!("strata_archive_partition_stalled{{partition=\"{p}\"}}")
            ),
            Some("1".into())
        );
    }
    assert!(
        partition_status(&st, 3)["stall"]["reason"] != partition_status(&st, 1)["stall"]["reason"],
        "damaged data and an unknown codec are told apart: {st}"
    );
    assert_eq!(
        metric(&addr, "strata_speed_partition_stalled{partition=\"0\"}"),
        Some("0".into())
    );
    let ev = &st["speed"]["events"];
    assert_eq!(
        ev["accepted"].as_u64(),
        Some(before.messages - before.malformed),
        "{st}"
    );
    assert_eq!(ev["rejected"].as_u64(), Some(before.malformed), "{st}");
    assert_eq!(ev["duplicates"].as_u64(), Some(before.copies), "{st}");
    // Each check panics on the first answer that differs from the truth.
    let checked_stalled = before.check(&addr) + before.check_insights(&addr);
    up.terminate();

    // Skip, on request: exactly B's offsets are passed over, and recorded.
    let mut up = Proc::spawn_env(
        "up-skip",
        &up_args(&common, &addr, ADMIN_KEY),
        &[("STRATA__KAFKA__UNDECODABLE", "skip")],
        dir.path(),
    );
    wait_http(&addr);
    let ends: BTreeMap<i32, i64> = (0..PARTITIONS)
        .map(|p| (p, high_watermark(&brokers, &topic, p)))
        .collect();
    let st = wait_for(
        "every partition at its end",
        Duration::from_secs(180),
        || {
            up.assert_running();
            let (_, st) = get_json(&addr, "/v1/status");
            ends.iter()
                .all(|(&p, &end)| partition_status(&st, p)["next_offset"].as_i64() == Some(end))
                .then_some(st)
        },
    );
    for &p in &DAMAGED {
        let s = partition_status(&st, p);
        let skipped = s["skipped"].as_array().cloned().unwrap_or_default();
        assert_eq!(skipped.len(), 1, "{st}");
        assert_eq!(skipped[0]["from"].as_i64(), Some(b_ranges[&p].0), "{st}");
        assert_eq!(skipped[0]["to"].as_i64(), Some(b_ranges[&p].1), "{st}");
        assert!(s["stall"].is_null(), "{st}");
        assert_eq!(
            metric(
                &addr,
                &format!("strata_speed_skipped_records_total{{partition=\"{p}\"}}")
            ),
            Some("700".into())
        );
    }
    let ev = &st["speed"]["events"];
    assert_eq!(
        ev["accepted"].as_u64(),
        Some(without_b.messages - without_b.malformed),
        "{st}"
    );
    assert_eq!(ev["rejected"].as_u64(), Some(without_b.malformed), "{st}");
    let checked_skipped = without_b.check(&addr) + without_b.check_insights(&addr);

    let (_, codes) = dead_letters_at(&brokers, &format!("{topic}.dlq"), without_b.malformed + 2);
    assert_eq!(codes.get("undecodable_batch"), Some(&2), "{codes:?}");

    let st = run_batch(&addr, ADMIN_KEY, 0);
    let cutoffs = &st["batch"]["cutoffs"];
    assert_eq!(
        cutoffs.as_object().map(|o| o.len()),
        Some(PARTITIONS as usize),
        "{st}"
    );
    let checked_batch = without_b.check(&addr) + without_b.check_insights(&addr);
    assert!(
        st["archive"]["stalled"]
            .as_object()
            .is_none_or(|o| o.is_empty()),
        "{st}"
    );
    let mut vcommon = common.clone();
    vcommon.extend(["--admin-key".to_string(), ADMIN_KEY.to_string()]);
    let (code, out) = verify(&vcommon, &addr, true, &[]);
    assert_eq!(code, 0, "verify found differences or failed:\n{out}");
    up.assert_running();
    up.terminate();
    eprintln!(
        "e2e_undecodable: {checked_stalled} answers checked while stalled ({} messages before the damage), {checked_skipped} after the skip ({} messages without B), {checked_batch} after a batch run; {}",
        before.messages,
        without_b.messages,
        verify_summary(&out)
    );
}
