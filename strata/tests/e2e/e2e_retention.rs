//! Retention on a real broker: a stream of 40 days of old events and two recent hours, served by
//! `strata speed` and `strata serve` as processes, published by `strata batch --once`. Then
//! `strata retention` rolls up heartbeats and readings older than 30 days, killed with SIGABRT at
//! each of its steps (`strata_common::fault::RETENTION_POINTS`) and run again, and finally a
//! continuously running `strata batch` rolls up more on its own schedule. Throughout, every
//! answer equals the ground truth counted in the test, `strata verify` finds no difference, and
//! every key of the batch version is unchanged by the rollups but the series view's minute
//! buckets before the rollup threshold, which the API answers with 410 `beyond_retention`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::support::*;
use strata_common::batch_store;
use strata_common::fault::RETENTION_POINTS;
use strata_common::time::{format_rfc3339, now_millis};
use strata_common::views::{Partial, ViewKey};

const DAY: i64 = 86_400_000;

fn version_entries(data_dir: &Path) -> (batch_store::Manifest, BTreeMap<ViewKey, Partial>) {
    let m = batch_store::read_current(data_dir)
        .expect("read CURRENT")
        .expect("a published version");
    let views = batch_store::load_views(data_dir, &m).expect("load the version");
    (m, views.entries.into_iter().collect())
}

fn generation(data_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(data_dir.join("master/retention/CURRENT")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["generation"].as_u64()
}

/// Sets the topic's `retention.ms` on the broker, as an operator would.
fn set_topic_retention_ms(topic: &str, ms: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let results = rt
        .block_on(admin.alter_configs(
            &[AlterConfig::new(ResourceSpecifier::Topic(topic)).set("retention.ms", ms)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        ))
        .expect("alter the topic's configuration");
    for r in results {
        r.unwrap_or_else(|e| panic!("the broker refused retention.ms={ms} for {topic}: {e:?}"));
    }
}

#[test]
fn rollups_change_no_answer_through_kills_at_every_step() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique_topic("e2e-retention");
    let addr = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("data");
    let mut common = layer_args(&topic, &data_dir, 2000, Some(&addr));
    common.extend(["--admin-key".to_string(), ADMIN_KEY.to_string()]);
    // The ground truth counts each id once; over a stream of 40 days the rule's default
    // horizon (24 h of event time) would count a late copy again.
    common.extend(["--dedupe-horizon".to_string(), "100d".to_string()]);
    // Segments of 1,000 events, as an archiver running continuously writes them: a rollup
    // replaces whole segments and never a partition's last.
    let config = dir.path().join("strata.toml");
    std::fs::write(&config, "[batch]\nsegment-max-events = 1000\n").expect("write config");
    common.extend(["--config".to_string(), config.display().to_string()]);
    let with = |cmd: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec![cmd.to_string()];
        v.extend_from_slice(&common);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let now = now_millis();
    let mut truth = Truth::default();
    // 40 days of old events (45 to 5 days ago), then the last two hours.
    truth.produce(
        &common,
        gen_config(31, 30_000, now - 45 * DAY, 40 * DAY, false),
    );
    truth.produce(
        &common,
        gen_config(32, 10_000, now - 2 * 3_600_000, 2 * 3_600_000, false),
    );
    // A topic that keeps messages for 30 minutes, shorter than the margin a batch version may lag
    // by: a layer starting on it warns (Kafka deletes nothing here: it never deletes the active
    // log segment, which holds the whole test).
    set_topic_retention_ms(&topic, "1800000");
    let mut speed = Proc::spawn("speed", &with("speed", &[]), dir.path());
    let mut serve = Proc::spawn("serve", &with("serve", &[]), dir.path());
    wait_http(&addr);
    wait_speed_offsets(&addr, truth.messages);
    let log = std::fs::read_to_string(&speed.log).unwrap_or_default();
    assert!(
        log.contains("retention.ms=1800000") && log.contains("raise the topic's retention.ms"),
        "the speed layer warns of the topic's short retention: {log}"
    );
    let mut version = 0;
    let mut batch_once = |label: &str| {
        Proc::spawn(label, &with("batch", &["--once"]), dir.path())
            .wait_success(Duration::from_secs(120));
        version += 1;
        let v = version;
        wait_for(
            &format!("batch version {v}"),
            Duration::from_secs(30),
            || {
                let (_, s) = get_json(&addr, "/v1/status");
                (s["batch"]["version"].as_u64() >= Some(v)).then_some(())
            },
        );
    };
    batch_once("batch1");
    let checked = truth.check_all(&addr, false);
    let (before_manifest, before) = version_entries(&data_dir);
    let master = data_dir.join("master");
    let bytes_before = strata_common::disk::dir_bytes(&master);

    // A dry run reports what it would roll up and changes nothing.
    let out = std::process::Command::new(strata_bin())
        .args(with("retention", &["--dry-run", "--json"]))
        .output()
        .expect("run strata retention");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dry: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let rolled: u64 = dry["report"]["partitions"]
        .as_object()
        .expect("partitions")
        .values()
        .flat_map(|p| p["rolled"].as_object().into_iter().flat_map(|r| r.values()))
        .filter_map(serde_json::Value::as_u64)
        .sum();
    assert!(rolled > 1_000, "the dry run finds old device events: {dry}");
    assert!(
        dry["report"]["replaced_raw"]["bytes"].as_u64() > Some(0),
        "{dry}"
    );
    assert!(
        generation(&data_dir).is_none(),
        "a dry run writes no generation"
    );
    assert_eq!(
        strata_common::disk::dir_bytes(&master),
        bytes_before,
        "a dry run changes nothing"
    );

    // Each step of a rollup killed, then the answers checked after a batch run over whatever it
    // left: the old files or the finished rollup, never both and never neither. Each run looks
    // one day later, so that it has more to roll up.
    for (k, point) in RETENTION_POINTS.iter().enumerate() {
        let as_of = format_rfc3339(now + (k as i64 + 1) * DAY);
        let mut p = Proc::spawn_env(
            &format!("retention-{point}"),
            &with("retention", &["--as-of", &as_of]),
            &[("STRATA_FAULT", point)],
            dir.path(),
        );
        let status = wait_for(
            &format!("retention killed at {point}"),
            Duration::from_secs(120),
            || p.exit_status(),
        );
        assert!(
            !status.success(),
            "retention must die at {point}: {}",
            p.tail()
        );
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        assert!(
            log.contains(&format!("fault point {point}: aborting")),
            "{log}"
        );
        eprintln!(
            "e2e_retention: killed at {point}; live generation {:?}",
            generation(&data_dir)
        );
        batch_once(&format!("batch-after-{point}"));
        truth.check_all(&addr, false);
        let (code, out) = verify(&common, &addr, true, &[]);
        assert_eq!(code, 0, "verify after a kill at {point}:\n{out}");
    }
    // Killed before CURRENT: no generation; after it: generations 1 and 2.
    assert_eq!(generation(&data_dir), Some(2));

    // A complete run, then every key of the version compared with the one before any rollup
    // (the same offsets: nothing was produced since).
    let as_of = format_rfc3339(now + 6 * DAY);
    run_strata(&with("retention", &["--as-of", &as_of]));
    let (after_manifest, after) = version_entries(&data_dir);
    assert_eq!(after_manifest.cutoffs, before_manifest.cutoffs);
    assert_eq!(
        after_manifest.events, before_manifest.events,
        "accepted events"
    );
    assert_eq!(
        after_manifest.duplicates, before_manifest.duplicates,
        "copies"
    );
    let marks = after_manifest.retention;
    let horizon = marks
        .series_minute_from
        .expect("the rollup's minute horizon");
    assert_eq!(
        horizon,
        strata_common::views::Gran::Hour.floor(now + 6 * DAY - 30 * DAY)
    );
    let expected: BTreeMap<ViewKey, Partial> = before
        .iter()
        .filter(|(k, _)| marks.keeps(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(
        expected.len() < before.len(),
        "minute buckets before the horizon are left out"
    );
    let differing: Vec<_> = expected
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .take(5)
        .collect();
    assert!(
        differing.is_empty(),
        "keys changed by the rollup: {differing:?}"
    );
    assert_eq!(after.len(), expected.len(), "no key added by the rollup");
    truth.check_all(&addr, false);
    let (code, out) = verify(&common, &addr, true, &[]);
    assert_eq!(code, 0, "verify after the rollups:\n{out}");
    let bytes_after = strata_common::disk::dir_bytes(&master);

    // What the API says of what it no longer holds, and what it still does.
    let from = format_rfc3339(horizon - 3_600_000);
    let to = format_rfc3339(horizon + 3_600_000);
    let (status, body) = get_json(
        &addr,
        &format!("/v1/insights/timeseries?metric=events&bucket=minute&from={from}&to={to}"),
    );
    assert_eq!(status, 410, "{body}");
    assert_eq!(body["error"]["code"], "beyond_retention", "{body}");
    let (status, body) = get_json(
        &addr,
        &format!(
            "/v1/insights/timeseries?metric=events&type=heartbeat&bucket=hour&from={from}&to={to}"
        ),
    );
    assert_eq!(status, 200, "hours are kept: {body}");
    let (_, metrics) = http(&addr, "GET", "/metrics", &[]);
    assert!(
        metrics.contains("strata_master_dataset_files{kind=\"rollup\",type=\"heartbeat\"}"),
        "{metrics}"
    );

    // The batch layer rolls up on its own schedule: a continuously running one with a 3-day
    // age rolls up the rest of the old stream and publishes it.
    let gen_before = generation(&data_dir).expect("generation");
    let mut batch = Proc::spawn_env(
        "batch-continuous",
        &with("batch", &["--every", "2s"]),
        &[
            ("STRATA__RETENTION__HEARTBEAT__ROLLUP_AFTER_DAYS", "3"),
            ("STRATA__RETENTION__READING__ROLLUP_AFTER_DAYS", "3"),
            ("STRATA__RETENTION__EVERY_SECS", "1"),
        ],
        dir.path(),
    );
    wait_for("a scheduled rollup", Duration::from_secs(120), || {
        batch.assert_running();
        generation(&data_dir).filter(|&g| g > gen_before)
    });
    wait_for(
        "a version of the scheduled rollup",
        Duration::from_secs(60),
        || {
            let (m, _) = version_entries(&data_dir);
            (m.rollup_generation > Some(gen_before)).then_some(())
        },
    );
    batch.terminate();
    wait_for("the batch layer to stop", Duration::from_secs(30), || {
        batch.exit_status()
    });
    truth.check_all(&addr, false);
    let (code, out) = verify(&common, &addr, true, &[]);
    assert_eq!(code, 0, "verify after the scheduled rollup:\n{out}");
    speed.assert_running();
    serve.assert_running();
    eprintln!(
        "e2e_retention: {} messages, {checked} answers per check, master dataset {bytes_before} -> {bytes_after} bytes (then {} after the 3-day rollup), {:.1}s",
        truth.messages,
        strata_common::disk::dir_bytes(&master),
        started.elapsed().as_secs_f64()
    );
}
