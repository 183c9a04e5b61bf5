//! End to end through `strata up` on a real broker: a seeded stream of 220,000 messages, batch
//! runs part-way, kill -9 and graceful restarts; every item, every device and the rankings must
//! equal a ground truth computed from the generated events after each step.

use std::time::{Duration, Instant};

use crate::support::*;
use strata_common::event::{Event, Kind};
use strata_common::time::now_millis;

const HOUR: i64 = 3_600_000;
const KEY: &str = "test-admin-key";

fn sum(v: &serde_json::Value) -> u64 {
    v.as_object()
        .map(|o| o.values().filter_map(serde_json::Value::as_u64).sum())
        .unwrap_or(0)
}

#[test]
fn up_answers_equal_ground_truth_across_batches_and_restarts() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique_topic("e2e-up");
    let addr = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("data");
    let common = layer_args(&topic, &data_dir, 5000, None);
    let up_args = up_args(&common, &addr, KEY);
    let mut up = Proc::spawn("up", &up_args, dir.path());
    wait_http(&addr);

    // The admin route refuses requests without the right key.
    assert_eq!(http(&addr, "POST", "/v1/admin/batch", &[]).0, 401);
    assert_eq!(
        http(
            &addr,
            "POST",
            "/v1/admin/batch",
            &[("Authorization", "Bearer wrong-key-1")]
        )
        .0,
        401
    );
    let (status, body) = http(&addr, "GET", "/v1/items/nope", &[]);
    assert_eq!(status, 404);
    assert!(body.contains("\"error\""), "{body}");

    // Phase 1: 120,000 messages, answered by the speed layer alone.
    let mut truth = Truth::default();
    let now = now_millis();
    truth.produce(
        &common,
        gen_config(11, 120_000, now - 3 * HOUR, 2 * HOUR, false),
    );
    wait_speed_offsets(&addr, truth.messages);
    let mut checked = truth.check_all(&addr, false);

    // A batch run part-way through.
    std::thread::sleep(Duration::from_millis(1_500));
    let st = run_batch(&addr, KEY, 0);
    let covered = sum(&st["batch"]["cutoffs"]);
    assert!(
        covered > 0,
        "the first batch covers part of the stream: {st}"
    );
    checked += truth.check_all(&addr, false);

    // Phase 2: 100,000 more; the answer is batch v1 plus the speed blocks past its cutoffs.
    truth.produce(&common, gen_config(12, 100_000, now - HOUR, HOUR, true));
    let st = wait_speed_offsets(&addr, truth.messages);
    assert!(
        sum(&st["batch"]["cutoffs"]) < truth.messages,
        "the speed layer covers the tail: {st}"
    );
    checked += truth.check_all(&addr, true);

    // kill -9 the whole process, restart: no answer changes.
    up.kill9();
    let mut up = Proc::spawn("up", &up_args, dir.path());
    wait_http(&addr);
    wait_speed_offsets(&addr, truth.messages);
    checked += truth.check_all(&addr, true);

    // A second batch run changes no answer, and the speed layer drops the blocks it covers.
    std::thread::sleep(Duration::from_millis(1_500));
    let st = run_batch(&addr, KEY, 1);
    assert!(
        sum(&st["batch"]["cutoffs"]) > covered,
        "the second batch covers more: {st}"
    );
    checked += truth.check_all(&addr, true);
    let st = wait_for(
        "speed blocks to be dropped",
        Duration::from_secs(30),
        || {
            let (_, v) = get_json(&addr, "/v1/status");
            let dropped = v["speed"]["partitions"]
                .as_object()?
                .values()
                .any(|p| p["first_live_block"].as_u64().unwrap_or(0) > 0);
            dropped.then_some(v)
        },
    );
    assert_eq!(sum(&st["speed"]["offsets"]), truth.messages);
    checked += truth.check_all(&addr, true);

    // Graceful restart: SIGTERM flushes and exits cleanly.
    up.terminate();
    let mut up = Proc::spawn("up", &up_args, dir.path());
    wait_http(&addr);
    wait_speed_offsets(&addr, truth.messages);
    checked += truth.check_all(&addr, true);

    // A ladder of devices last seen 0 to 15 minutes ago, one every 15 s, and readings at and
    // just past each metric's bounds: each status threshold (2 and 10 minutes) and each bound
    // lies between two rungs, so moving one by 15 s or 0.01 (in the server or in the truth
    // above) changes some device's status, window flag or the fleet's counts.
    let now = now_millis();
    let mut ladder: Vec<Event> = (0..=60i64)
        .map(|k| Event {
            id: format!("ladder-heartbeat-{k}"),
            ts: now - k * 15_000,
            kind: Kind::Heartbeat {
                device: format!("ladder-{k:02}"),
            },
        })
        .collect();
    let edges = [
        ("temp_c", -20.0),
        ("temp_c", -20.01),
        ("temp_c", 60.0),
        ("temp_c", 60.01),
        ("humidity", 0.0),
        ("humidity", -0.01),
        ("humidity", 100.0),
        ("humidity", 100.01),
    ];
    for (i, (metric, value)) in edges.into_iter().enumerate() {
        ladder.push(Event {
            id: format!("ladder-reading-{i}"),
            ts: now - 30_000,
            kind: Kind::Reading {
                device: format!("edge-{i}"),
                metric: metric.to_string(),
                value,
            },
        });
    }
    produce_events(&topic, &ladder);
    for e in ladder {
        truth.add_event(e);
    }
    wait_speed_offsets(&addr, truth.messages);
    checked += truth.check_all(&addr, true);
    let (_, fleet) = get_json(&addr, "/v1/devices/health");
    for status in ["ok", "late", "silent"] {
        assert!(
            fleet["counts"][status].as_u64().unwrap_or(0) > 0,
            "the ladder puts devices in every status: {fleet}"
        );
    }

    // Counters: every message accepted or rejected exactly once.
    truth.check_counters(&addr);

    // Every malformed message is in the dead-letter topic with its reason.
    let (sources, _) = dead_letters(&format!("{topic}.dlq"), truth.malformed);
    assert_eq!(sources.len() as u64, truth.malformed);
    up.assert_running();
    eprintln!(
        "e2e_up: {} messages ({} events, {} copies, {} malformed), {checked} answers checked, {:.1}s",
        truth.messages,
        truth.events,
        truth.copies,
        truth.malformed,
        started.elapsed().as_secs_f64()
    );
}
