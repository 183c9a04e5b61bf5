//! The recompute on Apache DataFusion and on a Ballista cluster, on a real broker: a stream of 40
//! days (duplicates and malformed messages included) archived by `strata batch --once`, then the
//! same master dataset recomputed by each engine, and each version compared with the local
//! engine's byte for byte. The cluster is a `strata-engine scheduler` and two
//! `strata-engine executor` processes on loopback; both executors must have run tasks. The
//! comparison is made twice: on the raw dataset, and after `strata retention` rolled up old
//! device events (so the fold starts from the rollup generation's prefix).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;
use strata_common::batch_store;
use strata_common::time::{format_rfc3339, now_millis};

const DAY: i64 = 86_400_000;

fn engine_bin() -> PathBuf {
    strata_bin()
        .parent()
        .expect("the binaries' directory")
        .join("strata-engine")
}

/// Every file of version `v` but its manifest, and the manifest without what names the run
/// (its number, when and how long). The dedupe states are compared as what they hold: the
/// file lists the remembered ids in hash order, which differs between any two runs.
fn version(data_dir: &Path, v: u64) -> (BTreeMap<String, Vec<u8>>, serde_json::Value) {
    let dir = batch_store::version_dir(data_dir, v);
    let mut files = BTreeMap::new();
    let mut manifest = serde_json::Value::Null;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a file name")
            .to_string();
        let bytes = std::fs::read(&path).expect("read a version file");
        if name == "manifest.json" {
            manifest = serde_json::from_slice(&bytes).expect("a manifest");
            for k in ["version", "published_at", "duration_ms"] {
                manifest
                    .as_object_mut()
                    .expect("a manifest object")
                    .remove(k);
            }
        } else if name.starts_with("dedupe.") {
            let (watermark, mut ids) =
                strata_common::dedupe::decode_handover(&bytes).expect("a dedupe state");
            ids.sort();
            files.insert(name, format!("{watermark} {ids:?}").into_bytes());
        } else {
            files.insert(name, bytes);
        }
    }
    (files, manifest)
}

fn assert_same_version(data_dir: &Path, local: u64, other: u64, engine: &str) {
    let (a, ma) = version(data_dir, local);
    let (b, mb) = version(data_dir, other);
    assert_eq!(ma, mb, "{engine}: the manifests differ");
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{engine}: the versions hold different files"
    );
    assert!(a.keys().any(|n| n.starts_with("dedupe.")), "{a:?}");
    for (name, bytes) in &a {
        assert!(
            bytes == &b[name],
            "{engine}: {name} of version {other} differs from the local engine's version {local} ({} and {} bytes)",
            b[name].len(),
            bytes.len()
        );
    }
    eprintln!(
        "e2e_engine: {engine}: version {other} equals the local version {local} ({} files, {} bytes, {} keys)",
        a.len(),
        a.values().map(Vec::len).sum::<usize>(),
        ma["keys"]
    );
}

fn current(data_dir: &Path) -> u64 {
    batch_store::read_current(data_dir)
        .expect("read CURRENT")
        .expect("a published version")
        .version
}

/// Tasks an executor's log says it ran.
fn tasks_run(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Execute task") || l.contains("Received task"))
        .count()
}

#[test]
fn datafusion_and_a_ballista_cluster_publish_the_local_version() {
    let started = std::time::Instant::now();
    assert!(
        engine_bin().is_file(),
        "{} is not built (cargo build --release -p strata-engine)",
        engine_bin().display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique_topic("e2e-engine");
    let data_dir = dir.path().join("data");
    let mut common = layer_args(&topic, &data_dir, 2000, None);
    common.extend(["--dedupe-horizon".to_string(), "100d".to_string()]);
    let config = dir.path().join("strata.toml");
    std::fs::write(
        &config,
        "[batch]\nsegment-max-events = 1000\nkeep-versions = 20\n",
    )
    .expect("write config");
    common.extend(["--config".to_string(), config.display().to_string()]);
    let with = |cmd: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec![cmd.to_string()];
        v.extend_from_slice(&common);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let now = now_millis();
    let mut truth = Truth::default();
    let mut old = gen_config(41, 30_000, now - 45 * DAY, 40 * DAY, false);
    old.duplicate_rate = 0.05;
    old.malformed_rate = 0.01;
    truth.produce(&common, old);
    truth.produce(
        &common,
        gen_config(42, 10_000, now - 2 * 3_600_000, 2 * 3_600_000, true),
    );
    let batch = |label: &str, engine: Option<&str>| -> u64 {
        let env: Vec<(&str, &str)> = engine
            .map(|e| vec![("STRATA__BATCH__ENGINE", e)])
            .unwrap_or_default();
        let mut p = Proc::spawn_env(label, &with("batch", &["--once"]), &env, dir.path());
        p.wait_success(Duration::from_secs(300));
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        if engine.is_some() {
            assert!(
                log.contains("batch recompute handed to strata-engine")
                    && log.contains("recompute plan submitted"),
                "{label}: the recompute ran in strata-engine: {log}"
            );
        }
        current(&data_dir)
    };

    // The local engine, then DataFusion in the strata-engine process.
    let local = batch("batch-local", None);
    let m = batch_store::read_current(&data_dir)
        .expect("CURRENT")
        .expect("a version");
    assert!(m.duplicates > 0, "the stream has copies: {m:?}");
    assert!(m.events > 30_000, "{m:?}");
    let datafusion = batch("batch-datafusion", Some("datafusion"));
    assert!(datafusion > local);
    assert_same_version(&data_dir, local, datafusion, "datafusion");

    // A Ballista cluster: a scheduler and two executors, one task at a time each.
    let scheduler_port = free_port();
    let scheduler = format!("127.0.0.1:{scheduler_port}");
    let mut procs = vec![Proc::spawn_bin(
        &engine_bin(),
        "scheduler",
        &["scheduler".into(), "--bind".into(), scheduler.clone()],
        &[],
        dir.path(),
    )];
    let mut executor_logs = Vec::new();
    // Each executor binds its port and the next one: the pairs are kept apart.
    let mut taken = vec![scheduler_port];
    for k in 0..2 {
        let port = free_port_pair(&taken);
        taken.extend([port, port + 1]);
        let work = dir.path().join(format!("executor-{k}"));
        let p = Proc::spawn_bin(
            &engine_bin(),
            &format!("executor-{k}"),
            &[
                "executor".into(),
                "--scheduler".into(),
                scheduler.clone(),
                "--port".into(),
                port.to_string(),
                "--slots".into(),
                "1".into(),
                "--work-dir".into(),
                work.display().to_string(),
            ],
            &[],
            dir.path(),
        );
        executor_logs.push(p.log.clone());
        procs.push(p);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(&procs[0].log).unwrap_or_default();
        if log.matches("register executor request").count() >= 2 {
            break;
        }
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = procs
                .iter()
                .map(|p| format!("{}:\n{}", p.name, p.tail()))
                .collect();
            panic!(
                "two executors did not register with the scheduler:\n{}",
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("df://{scheduler}");
    let ballista = batch("batch-ballista", Some(&url));
    assert_same_version(&data_dir, local, ballista, "ballista");
    for log in &executor_logs {
        assert!(
            tasks_run(log) > 0,
            "every executor ran tasks: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    // After a rollup (published by `strata retention`'s own local recompute).
    let as_of = format_rfc3339(now + DAY);
    run_strata(&with("retention", &["--as-of", &as_of]));
    assert!(
        data_dir.join("master/retention/CURRENT").is_file(),
        "the rollup wrote a generation"
    );
    // Its recompute ran before the purge of the raw files the rollup replaced, which the
    // manifest counts: the local engine again, then the cluster, on the purged dataset.
    let rolled = batch("batch-local-rolled", None);
    let ballista_rolled = batch("batch-ballista-rolled", Some(&url));
    assert_same_version(
        &data_dir,
        rolled,
        ballista_rolled,
        "ballista after a rollup",
    );

    // A bad engine stops the batch layer naming the key.
    let out = std::process::Command::new(strata_bin())
        .args(with("batch", &["--once"]))
        .env("STRATA__BATCH__ENGINE", "spark://nowhere")
        .output()
        .expect("run strata batch");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("batch.engine"),
        "{err}"
    );
    for p in &mut procs {
        p.kill9();
    }
    eprintln!("e2e_engine: passed in {:?}", started.elapsed());
}
