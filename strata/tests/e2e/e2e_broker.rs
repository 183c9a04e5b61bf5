//! The broker restarts mid-stream. This suite runs a broker of its own (Apache Kafka through
//! `scripts/broker.sh`, on a free port) so it can stop and start it: while it is down the layers keep running, the serving
//! layer keeps answering from the state it holds and reports the outage in `/v1/status` and
//! `/readyz`; once it is back everything catches up, and every answer, and `strata verify`, agree
//! with the ground truth.

use std::time::{Duration, Instant};

use crate::support::*;
use strata_common::time::now_millis;

#[test]
fn a_broker_restart_mid_stream_loses_nothing() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(&dir.path().join("broker"), &[]);
    let topic = unique_topic("e2e-broker");
    let addr = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("data");
    let mut common = layer_args(&topic, &data_dir, 2000, Some(&addr));
    // This suite's own broker, not the shared one.
    set_brokers(&mut common, &broker.addr());
    common.extend(["--admin-key".to_string(), ADMIN_KEY.to_string()]);
    let with = |cmd: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec![cmd.to_string()];
        v.extend_from_slice(&common);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };

    let now = now_millis();
    let mut truth = Truth::default();
    truth.produce(
        &common,
        gen_config(31, 20_000, now - 2 * 3_600_000, 3_600_000, false),
    );
    let mut procs = [
        Proc::spawn("speed", &with("speed", &[]), dir.path()),
        Proc::spawn("batch", &with("batch", &["--every", "3s"]), dir.path()),
        Proc::spawn("serve", &with("serve", &[]), dir.path()),
    ];
    wait_http(&addr);
    wait_speed_offsets(&addr, truth.messages);
    wait_for("ready", Duration::from_secs(30), || {
        (get_json(&addr, "/readyz").0 == 200).then_some(())
    });
    truth.check(&addr);

    // The broker goes away.
    broker.stop();
    let outage = Instant::now();
    let (_, st) = wait_for(
        "the outage to show in /readyz and /v1/status",
        Duration::from_secs(60),
        || {
            let (code, ready) = get_json(&addr, "/readyz");
            let (_, st) = get_json(&addr, "/v1/status");
            (code == 503 && st["broker"]["reachable"] == false).then_some((ready, st))
        },
    );
    let noticed = outage.elapsed();
    assert!(st["broker"]["unreachable_since"].is_string(), "{st}");
    // The last answers are still served while the broker is down, and no layer gives up.
    std::thread::sleep(Duration::from_secs(10));
    let during = truth.check(&addr);
    for p in &mut procs {
        p.assert_running();
    }
    // Each layer logged the outage.
    for p in &procs[..2] {
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        let outage_lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("librdkafka"))
            .collect();
        assert!(
            !outage_lines.is_empty(),
            "{} logged nothing about the outage: {}",
            p.name,
            p.tail()
        );
        eprintln!("{} logged: {}", p.name, outage_lines[0]);
    }

    // The broker comes back with its data. Then a producer produces at a steady rate, and the
    // broker is restarted again while it is producing and the layers are consuming: the
    // producer's records wait in its queue and are sent again (it is idempotent: nothing
    // written twice, nothing lost), and the layers pick up where they were.
    broker.restart();
    let down_for = outage.elapsed();
    // 40 s at 3,000/s: long enough to still be producing after the layers have rejoined their
    // groups on the restarted broker (seen taking over 20 s once).
    let inflight = gen_config(33, 120_000, now - 3_600_000, 3_600_000, false);
    let mut gen_args = generate_args(&common, &inflight);
    gen_args.extend(["--rate".to_string(), "3000".to_string()]);
    let mut producer = Proc::spawn("generate", &gen_args, dir.path());
    wait_for(
        "the in-flight stream to arrive",
        Duration::from_secs(60),
        || {
            let (_, st) = get_json(&addr, "/v1/status");
            let sum: u64 = st["speed"]["offsets"]
                .as_object()?
                .values()
                .filter_map(serde_json::Value::as_u64)
                .sum();
            (sum > truth.messages + 3_000).then_some(())
        },
    );
    producer.assert_running();
    broker.stop();
    std::thread::sleep(Duration::from_secs(5));
    broker.restart();
    producer.wait_success(Duration::from_secs(180));
    truth.add(inflight);
    truth.produce(
        &common,
        gen_config(32, 20_000, now - 3_600_000, 3_600_000, false),
    );
    // A wait that times out here says what each layer was doing (a stall or a crash).
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_speed_offsets(&addr, truth.messages);
        wait_for("ready again", Duration::from_secs(60), || {
            (get_json(&addr, "/readyz").0 == 200).then_some(())
        });
    }));
    if let Err(e) = waited {
        for p in &procs {
            eprintln!("--- {} (last lines)\n{}", p.name, p.tail());
        }
        std::panic::resume_unwind(e);
    }
    let (_, st) = get_json(&addr, "/v1/status");
    assert_eq!(st["broker"]["reachable"], true, "{st}");
    let after = truth.check(&addr) + truth.check_insights(&addr);
    let ev = &st["speed"]["events"];
    assert_eq!(ev["rejected"].as_u64(), Some(truth.malformed), "{st}");
    assert_eq!(ev["duplicates"].as_u64(), Some(truth.copies), "{st}");
    let (code, out) = verify(&common, &addr, true, &[]);
    assert_eq!(code, 0, "verify found differences or failed:\n{out}");
    for p in &mut procs {
        p.assert_running();
    }
    eprintln!("{}", verify_summary(&out));
    eprintln!(
        "e2e_broker: broker down {:.1}s (outage seen in /readyz after {:.1}s), {} messages, {} answers checked during the outage and {after} after, {:.1}s",
        down_for.as_secs_f64(),
        noticed.as_secs_f64(),
        truth.messages,
        during,
        started.elapsed().as_secs_f64()
    );
}
