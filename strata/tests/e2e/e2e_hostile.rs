//! Hostile input: half of the messages (40,000 by default; `STRATA_HOSTILE_COUNT` sets it, and
//! `STRATA_HOSTILE_SEED` the generator's seed, 31 by default) are
//! malformed in every way the generator knows (bad JSON, invalid UTF-8, wrong types, missing fields, unknown types, absurd and future timestamps,
//! deep nesting, huge payloads, non-objects, empty). Every one must reach the dead-letter topic
//! with its reason, no layer may stop, and every valid event around them must be counted.

use std::time::Instant;

use crate::support::*;
use strata_common::time::now_millis;

#[test]
fn bad_events_go_to_the_dlq_and_the_rest_count() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique_topic("e2e-hostile");
    let addr = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("data");
    let common = layer_args(&topic, &data_dir, 10_000, Some(&addr));
    let count: u64 = std::env::var("STRATA_HOSTILE_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40_000);
    let seed: u64 = std::env::var("STRATA_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(31);
    let start = now_millis() - 2 * 3_600_000;
    let mut cfg = gen_config(seed, count, start, 3_600_000, false);
    cfg.malformed_rate = 0.5;
    let mut truth = Truth::default();
    truth.produce(&common, cfg);
    assert!(
        truth.malformed * 2 >= count * 95 / 100,
        "{} malformed of {count}",
        truth.malformed
    );

    let mut up_args = vec!["up".to_string()];
    up_args.extend_from_slice(&common);
    let mut up = Proc::spawn("up", &up_args, dir.path());
    wait_http(&addr);

    // The broker stores every huge payload twice (topic and DLQ): allow time in proportion.
    wait_speed_offsets_for(
        &addr,
        truth.messages,
        std::time::Duration::from_secs(300.max(count / 100)),
    );
    up.assert_running();
    let checked = truth.check(&addr);
    let (_, st) = get_json(&addr, "/v1/status");
    assert_eq!(
        st["speed"]["events"]["rejected"].as_u64(),
        Some(truth.malformed),
        "{st}"
    );

    // Every rejected message is in the DLQ once or more, each with a reason.
    let (sources, codes) = dead_letters(&format!("{topic}.dlq"), truth.malformed);
    assert_eq!(
        sources.len() as u64,
        truth.malformed,
        "codes seen: {codes:?}"
    );
    for code in [
        "bad_json",
        "missing_field",
        "bad_field",
        "unknown_type",
        "bad_timestamp",
        "empty",
        "too_large",
    ] {
        assert!(
            codes.get(code).copied().unwrap_or(0) > 0,
            "no {code} among {codes:?}"
        );
    }
    up.assert_running();
    eprintln!(
        "e2e_hostile: seed {seed}, {} messages, {} malformed in the DLQ ({codes:?}), {} events counted, {checked} answers checked, {:.1}s",
        truth.messages,
        sources.len(),
        truth.events,
        started.elapsed().as_secs_f64()
    );
}
