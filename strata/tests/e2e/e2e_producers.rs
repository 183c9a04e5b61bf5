//! Producers as users run them, with a stock client (librdkafka through rdkafka): one stream
//! produced in five parts with `compression.type` none, gzip, snappy, lz4 and zstd, every record
//! with headers; then a transactional producer that commits one transaction, aborts one, and
//! commits another. `strata up` counts every committed event once and no aborted one: every
//! item, device, ranking and series equals the ground truth of the committed streams, the
//! counters are exact, the speed layer's offsets reach each partition's end (past the markers
//! that close the transactions), and so does a batch run and `strata verify`. And `strata
//! generate` replacing a stuck producer writes each message once.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message};
use strata_common::generate::Generator;
use strata_common::time::now_millis;

fn producer(settings: &[(&str, &str)]) -> ThreadedProducer<DefaultProducerContext> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers()).set("linger.ms", "10");
    for (k, v) in settings {
        c.set(*k, *v);
    }
    c.create().expect("producer")
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str, payload: &[u8]) {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "trace-id",
            value: Some("0af7651916cd43dd8448eb211c80319c"),
        })
        .insert(Header {
            key: "content-type",
            value: Some("application/json"),
        })
        .insert::<[u8]>(Header {
            key: "empty",
            value: None,
        });
    let mut record = BaseRecord::to(topic)
        .key(key)
        .payload(payload)
        .headers(headers);
    loop {
        match p.send(record) {
            Ok(()) => return,
            Err((_, r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// The next offset to be written in every partition of `topic`.
fn ends(topic: &str) -> BTreeMap<String, u64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("consumer");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut out = BTreeMap::new();
    for t in md.topics() {
        for p in t.partitions() {
            let (_, high) = c
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            out.insert(p.id().to_string(), high as u64);
        }
    }
    out
}

fn offsets(v: &serde_json::Value) -> BTreeMap<String, u64> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_codec_and_only_committed_transactions_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique_topic("e2e-producers");
    let addr = format!("127.0.0.1:{}", free_port());
    let common = layer_args(&topic, &dir.path().join("data"), 2000, None);
    let mut up = Proc::spawn("up", &up_args(&common, &addr, ADMIN_KEY), dir.path());
    wait_for("strata up to listen", Duration::from_secs(60), || {
        up.assert_running();
        std::net::TcpStream::connect(&addr).ok()
    });
    wait_http(&addr);

    let now = now_millis();
    let mut truth = Truth::default();
    // One stream, five codecs: each codec's producer sends one contiguous part of it, in order.
    let plain = gen_config(61, 25_000, now - 3 * 3_600_000, 3_600_000, false);
    let all: Vec<_> = Generator::new(plain.clone()).collect();
    let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
    for (codec, part) in codecs
        .iter()
        .zip(all.chunks(all.len().div_ceil(codecs.len())))
    {
        let p = producer(&[("compression.type", codec)]);
        for g in part {
            send(&p, &topic, &g.key, &g.payload);
        }
        p.flush(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{codec}: {e}"));
    }
    truth.add(plain);

    // Transactions: committed, aborted, committed.
    let tx = producer(&[
        ("transactional.id", &format!("{topic}-tx")),
        ("compression.type", "zstd"),
    ]);
    tx.init_transactions(Duration::from_secs(30))
        .expect("init transactions");
    let committed = [
        gen_config(62, 8_000, now - 2 * 3_600_000, 3_600_000, false),
        gen_config(64, 8_000, now - 3_600_000, 3_600_000, false),
    ];
    let aborted = gen_config(63, 8_000, now - 2 * 3_600_000, 3_600_000, false);
    let mut aborted_messages = 0u64;
    for (cfg, commit) in [
        (&committed[0], true),
        (&aborted, false),
        (&committed[1], true),
    ] {
        tx.begin_transaction().expect("begin");
        for g in Generator::new(cfg.clone()) {
            send(&tx, &topic, &g.key, &g.payload);
            if !commit {
                aborted_messages += 1;
            }
        }
        // Everything is written to the log before the transaction ends, so the aborted records
        // are there for a consumer to skip (an abort would purge what is still queued).
        tx.flush(Duration::from_secs(60))
            .expect("flush the transaction");
        if commit {
            tx.commit_transaction(Duration::from_secs(60))
                .expect("commit");
        } else {
            tx.abort_transaction(Duration::from_secs(60))
                .expect("abort");
        }
    }
    for cfg in committed {
        truth.add(cfg);
    }
    assert!(aborted_messages > 0);

    // The speed layer reaches every partition's end: the last records there are the marker
    // that commits the last transaction, which no consumer is handed.
    let end = ends(&topic);
    let end_sum: u64 = end.values().sum();
    assert!(
        end_sum > truth.messages + aborted_messages,
        "markers take offsets: {end_sum} vs {}",
        truth.messages + aborted_messages
    );
    let st = wait_for(
        "the speed layer to reach every partition's end",
        Duration::from_secs(120),
        || {
            let (_, v) = get_json(&addr, "/v1/status");
            (offsets(&v["speed"]["offsets"]) == end).then_some(v)
        },
    );
    let ev = &st["speed"]["events"];
    assert_eq!(
        ev["accepted"].as_u64(),
        Some(truth.messages - truth.malformed),
        "{st}"
    );
    assert_eq!(ev["rejected"].as_u64(), Some(truth.malformed), "{st}");
    assert_eq!(ev["duplicates"].as_u64(), Some(truth.copies), "{st}");
    let before = truth.check(&addr) + truth.check_insights(&addr);

    // A batch run archives to the same end and changes no answer.
    let st = run_batch(&addr, ADMIN_KEY, 0);
    assert_eq!(offsets(&st["batch"]["cutoffs"]).len(), end.len(), "{st}");
    let after = truth.check(&addr) + truth.check_insights(&addr);
    let mut vcommon = common.clone();
    vcommon.extend(["--admin-key".to_string(), ADMIN_KEY.to_string()]);
    let (code, out) = verify(&vcommon, &addr, true, &[]);
    assert_eq!(code, 0, "verify found differences or failed:\n{out}");
    up.assert_running();
    eprintln!("{}", verify_summary(&out));
    eprintln!(
        "e2e_producers: {} messages over 5 codecs and 2 committed transactions, {aborted_messages} aborted, {before} answers checked before the batch run and {after} after",
        truth.messages
    );
}

/// `strata generate` when its producer gets stuck (the fault point `generate.stalled` stands for
/// a producer that got no acknowledgement, as one was seen after a broker restart): it closes
/// the producer, reads the topic back and sends again only what the topic does not hold. Every
/// generated message is in the topic exactly as often as the generator made it, read back here
/// with a plain consumer.
#[test]
fn generate_replaces_a_stuck_producer_and_writes_each_message_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique_topic("e2e-generate-stuck");
    let common = layer_args(&topic, &dir.path().join("data"), 2000, None);
    let cfg = gen_config(71, 40_000, now_millis() - 3_600_000, 3_600_000, false);
    let mut args = generate_args(&common, &cfg);
    args.extend(["--rate".to_string(), "8000".to_string()]);
    let mut generate = Proc::spawn_env(
        "generate",
        &args,
        &[("STRATA_FAULT", "generate.stalled@20000")],
        dir.path(),
    );
    generate.wait_success(Duration::from_secs(120));
    // The ground truth: how often the generator makes each message.
    let mut expected: BTreeMap<(String, Vec<u8>), u64> = BTreeMap::new();
    for g in Generator::new(cfg) {
        *expected.entry((g.key, g.payload)).or_default() += 1;
    }
    let ends = ends(&topic);
    let total: u64 = ends.values().sum();
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{topic}-check"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    c.subscribe(&[&topic]).expect("subscribe");
    let mut seen: BTreeMap<(String, Vec<u8>), u64> = BTreeMap::new();
    let mut read = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while read < total {
        assert!(
            std::time::Instant::now() < deadline,
            "read {read} of {total} in 60 s"
        );
        if let Some(m) = c.poll(Duration::from_millis(500)) {
            let m = m.expect("message");
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            *seen
                .entry((key, m.payload().unwrap_or_default().to_vec()))
                .or_default() += 1;
            read += 1;
        }
    }
    assert_eq!(total, 40_000, "messages in the topic: {ends:?}");
    let differ: Vec<_> = expected
        .iter()
        .filter(|(k, n)| seen.get(*k) != Some(n))
        .map(|(k, n)| (k.0.clone(), *n, seen.get(k).copied().unwrap_or(0)))
        .take(5)
        .collect();
    assert!(
        differ.is_empty() && seen.len() == expected.len(),
        "{differ:?}"
    );

    let log = std::fs::read_to_string(&generate.log).expect("generate log");
    let line = log
        .lines()
        .find(|l| l.contains("unacknowledged events read back from the topic"))
        .unwrap_or_else(|| panic!("no read-back in the log:\n{log}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    // Events the broker had written when their acknowledgements were dropped: found, not sent
    // again (20,000 at 8,000/s leaves hundreds written since the last report was taken).
    assert!(field("already_written") > 0, "{line}");
    eprintln!("{line}");
}
