//! The layers as separate processes sharing one data directory: `strata speed`, `strata serve`
//! (following the speed state as a RocksDB secondary) and `strata batch --once`. Restarting the
//! speed layer alone, with kill -9, changes no answer. The serving layer merges finished blocks
//! two at a time into runs here (`serve.run-blocks`), and answers are checked while its point
//! reads go through them.

use std::time::Duration;

use crate::support::*;
use strata_common::time::now_millis;

#[test]
fn separate_processes_answer_exactly_through_speed_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique_topic("e2e-sep");
    let addr = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("data");
    let mut common = layer_args(&topic, &data_dir, 2000, Some(&addr));
    common.extend(["--admin-key".to_string(), ADMIN_KEY.to_string()]);
    let with = |cmd: &str| -> Vec<String> {
        let mut v = vec![cmd.to_string()];
        v.extend_from_slice(&common);
        v
    };
    let generate = |seed: u64, count: u64, start: i64, truth: &mut Truth| {
        truth.produce(&common, gen_config(seed, count, start, 3_600_000, false));
    };

    let mut truth = Truth::default();
    let now = now_millis();
    generate(21, 40_000, now - 2 * 3_600_000, &mut truth);
    let mut speed = Proc::spawn("speed", &with("speed"), dir.path());
    let mut serve = Proc::spawn_env(
        "serve",
        &with("serve"),
        &[("STRATA__SERVE__RUN_BLOCKS", "2")],
        dir.path(),
    );
    wait_http(&addr);
    wait_speed_offsets(&addr, truth.messages);
    truth.check(&addr);

    // One batch run as its own process: archives everything so far, publishes, exits; then the
    // serving layer serves the version.
    let batch_once = |version: u64| -> serde_json::Value {
        let mut args = with("batch");
        args.push("--once".into());
        Proc::spawn(&format!("batch{version}"), &args, dir.path())
            .wait_success(Duration::from_secs(120));
        wait_for(
            &format!("batch version {version}"),
            Duration::from_secs(30),
            || {
                let (_, v) = get_json(&addr, "/v1/status");
                (v["batch"]["version"].as_u64() == Some(version)).then_some(v)
            },
        )
    };
    let st = batch_once(1);
    assert!(st["batch"]["events"].as_u64().unwrap_or(0) > 0, "{st}");
    truth.check(&addr);

    // More events; the serving layer's point reads go through runs of the finished blocks past
    // the version (built when requests come); then the speed layer alone is killed and restarted.
    generate(22, 30_000, now - 3_600_000, &mut truth);
    wait_speed_offsets(&addr, truth.messages);
    let held = wait_for("runs of finished blocks", Duration::from_secs(60), || {
        let (_, text) = http(&addr, "GET", "/metrics", &[("Authorization", ADMIN_BEARER)]);
        let blocks = text
            .lines()
            .find_map(|l| l.strip_prefix("strata_tail_run_blocks "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        (blocks >= 4).then_some(blocks)
    });
    eprintln!("point reads go through runs holding {held} finished blocks");
    truth.check(&addr);
    speed.kill9();
    generate(23, 10_000, now - 1_800_000, &mut truth);
    let mut speed = Proc::spawn("speed", &with("speed"), dir.path());
    wait_speed_offsets(&addr, truth.messages);
    truth.check(&addr);

    // A second batch run over everything changes no answer.
    batch_once(2);
    truth.check(&addr);
    truth.check_insights(&addr);

    // `strata verify` recomputes every view from the master dataset plus the Kafka tail and
    // finds no difference; more events after the batch make it read a tail.
    generate(24, 5_000, now - 900_000, &mut truth);
    wait_speed_offsets(&addr, truth.messages);
    let (code, out) = verify(&common, &addr, true, &[]);
    assert_eq!(code, 0, "verify found differences or failed:\n{out}");
    assert!(out.contains(" 0 differences"), "{out}");
    assert!(
        !out.contains(" 0 from Kafka"),
        "the tail is read from Kafka: {out}"
    );
    eprintln!("{}", verify_summary(&out));
    // Verify catches a double count: with a dedupe horizon of one second, copies that arrive
    // later count again in its recomputation, so it must disagree with the served views.
    let (code, out) = verify(&common, &addr, true, &["--dedupe-horizon", "1s"]);
    assert_eq!(code, 1, "verify must report the differences:\n{out}");
    assert!(out.contains("difference: "), "{out}");
    speed.assert_running();
    serve.assert_running();
}
