//! Every step of the writing layers killed at least once, at a known moment: `strata speed`,
//! `strata batch --every 1s` and `strata serve` run as separate processes over one data
//! directory, and for each fault point (`strata_common::fault::POINTS`: the speed layer's dead
//! letters queued and acknowledged, its flush before and after its WriteBatch, its group
//! commit; the archiver's segment before and after its rename, its group commit; the recompute
//! after folding; the publish before and after CURRENT is swapped) the layer that owns it is
//! restarted with `STRATA_FAULT=<point>` while a stream arrives. It must die there (SIGABRT,
//! naming the point); restarted normally, every answer, the counters (`accepted`, `rejected`,
//! `duplicates`) and, for the batch points, the next published version equal the ground truth.
//! At the end every malformed message has its dead letter; `strata verify` closes the run.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use crate::support::*;
use strata_common::fault::POINTS;
use strata_common::time::now_millis;

/// Waits until `p` dies at `point`: by SIGABRT, its log naming the point.
fn dies_at(p: &mut Proc, point: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = p.exit_status() {
            assert_eq!(
                status.signal(),
                Some(6),
                "{} ended by {status}, not at {point}: {}",
                p.name,
                p.tail()
            );
            let log = std::fs::read_to_string(&p.log).unwrap_or_default();
            assert!(
                log.contains(&format!("fault point {point}: aborting")),
                "{}: {}",
                p.name,
                p.tail()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never reached {point}: {}",
            p.name,
            p.tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_fault_point_is_killed_and_nothing_is_lost() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique_topic("e2e-faults");
    let addr = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("data");
    let mut common = layer_args(&topic, &data_dir, 500, Some(&addr));
    common.extend(["--admin-key".to_string(), ADMIN_KEY.to_string()]);
    let with = |cmd: &str| -> Vec<String> {
        let mut v = vec![cmd.to_string()];
        v.extend_from_slice(&common);
        if cmd == "batch" {
            v.extend(["--every".to_string(), "1s".to_string()]);
        }
        v
    };
    let logs = dir.path();
    let now = now_millis();
    let mut truth = Truth::default();
    truth.produce(
        &common,
        gen_config(61, 8_000, now - 3 * 3_600_000, 3_600_000, false),
    );
    let mut speed = Proc::spawn("speed", &with("speed"), logs);
    let mut batch = Proc::spawn("batch", &with("batch"), logs);
    let mut serve = Proc::spawn("serve", &with("serve"), logs);
    wait_http(&addr);
    wait_speed_offsets(&addr, truth.messages);
    truth.check(&addr);

    let version = |addr: &str| -> u64 {
        let (_, v) = get_json(addr, "/v1/status");
        v["batch"]["version"].as_u64().unwrap_or(0)
    };
    for (i, point) in POINTS.iter().enumerate() {
        let round = i as u64;
        let first = version(&addr);
        // The layer that owns the point, restarted with it armed, while a stream arrives.
        let owner = if point.starts_with("speed.") {
            &mut speed
        } else {
            &mut batch
        };
        let layer = if point.starts_with("speed.") {
            "speed"
        } else {
            "batch"
        };
        owner.terminate();
        *owner = Proc::spawn_env(
            &format!("{layer}-{point}"),
            &with(layer),
            &[("STRATA_FAULT", point)],
            logs,
        );
        truth.produce(
            &common,
            gen_config(
                62 + round,
                6_000,
                now - 2 * 3_600_000 + (round as i64) * 60_000,
                3_600_000,
                false,
            ),
        );
        dies_at(owner, point);
        // The version the killed process left (it may have published before dying).
        let before = version(&addr);
        *owner = Proc::spawn(&format!("{layer}-after-{point}"), &with(layer), logs);
        wait_speed_offsets(&addr, truth.messages);
        truth.check(&addr);
        truth.check_counters(&addr);
        if layer == "batch" {
            // The restarted process publishes a version of its own.
            wait_for(
                &format!("a batch version after {point}"),
                Duration::from_secs(60),
                || (version(&addr) > before).then_some(()),
            );
            wait_speed_offsets(&addr, truth.messages);
            truth.check(&addr);
        }
        speed.assert_running();
        batch.assert_running();
        serve.assert_running();
        eprintln!(
            "{point}: killed there, restarted; {} messages, batch version {} -> {}",
            truth.messages,
            first,
            version(&addr)
        );
    }
    let checked = truth.check(&addr) + truth.check_insights(&addr);
    truth.check_counters(&addr);
    // Every malformed message has its dead letter, whichever step its layer died at (a letter
    // sent again after a restart is a copy of one already there: at least once, by source).
    let (sources, _) = dead_letters(&format!("{topic}.dlq"), truth.malformed);
    assert_eq!(
        sources.len() as u64,
        truth.malformed,
        "dead letters by source"
    );
    let (code, out) = verify(&common, &addr, true, &[]);
    assert_eq!(code, 0, "{out}");
    eprintln!(
        "e2e_faults: {} points, {} messages, {checked} answers checked at the end, {:.1}s\n{}",
        POINTS.len(),
        truth.messages,
        started.elapsed().as_secs_f64(),
        verify_summary(&out)
    );
}
