//! Stopping whatever the broker does, and writers that keep to their data directory.
//!
//! With its own broker: `strata up` consumes a stream; the broker is stopped for good; SIGTERM
//! makes `strata up` exit within `shutdown-timeout-secs` (5 s here) plus a margin, either cleanly
//! (exit 0, state flushed) or by the watchdog (exit 3, with the log line saying what it gave up
//! on); restarted against the restarted broker, every answer equals the ground truth. A second
//! signal ends a stop at once. A second archiver on one data directory is refused, naming the
//! lock; a speed layer whose data directory is moved away stops, naming the path.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use strata_common::time::now_millis;
use support::*;

fn signal(p: &Proc, sig: &str) {
    let pid = p.pid().to_string();
    let _ = Command::new("kill").args([sig, &pid]).status();
}

/// Waits for `p` to exit; its exit code and how long it took.
fn wait_exit(p: &mut Proc, limit: Duration) -> (Option<i32>, Duration) {
    let started = Instant::now();
    let status = wait_for("the process to exit", limit, || p.exit_status());
    (status.code(), started.elapsed())
}

fn log_of(p: &Proc) -> String {
    std::fs::read_to_string(&p.log).unwrap_or_default()
}

#[test]
fn stops_in_bounded_time_without_a_broker_and_keeps_to_its_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(&dir.path().join("broker"), &[]);
    let topic = unique_topic("e2e-shutdown");
    let mut common = layer_args(&topic, &dir.path().join("data"), 1000, None);
    let at = common
        .iter()
        .position(|a| a == "--brokers")
        .expect("--brokers")
        + 1;
    common[at] = broker.addr();
    let timeout = [("STRATA__SHUTDOWN_TIMEOUT_SECS", "5")];
    let addr = format!("127.0.0.1:{}", free_port());

    let mut up = Proc::spawn_env(
        "up-1",
        &up_args(&common, &addr, ADMIN_KEY),
        &timeout,
        dir.path(),
    );
    wait_http(&addr);
    let now = now_millis();
    let mut truth = Truth::default();
    truth.produce(
        &common,
        gen_config(71, 20_000, now - 3_600_000, 3_600_000, false),
    );
    wait_speed_offsets(&addr, truth.messages);

    // The broker goes away for good; then SIGTERM.
    broker.stop();
    signal(&up, "-TERM");
    let (code, took) = wait_exit(&mut up, Duration::from_secs(30));
    let log = log_of(&up);
    assert!(
        took <= Duration::from_secs(5 + 5),
        "stopped in {took:?} with the broker gone (limit 5 s + 5 s): {}",
        up.tail()
    );
    match code {
        Some(0) => assert!(log.contains("speed layer stopped; state flushed"), "{log}"),
        Some(3) => assert!(log.contains("shutdown did not finish within 5 s"), "{log}"),
        other => panic!("exit code {other:?}: {}", up.tail()),
    }
    eprintln!("broker gone, SIGTERM: exit {code:?} after {took:?}");

    // Everything stored is still there: the restarted layers answer exactly.
    broker.restart();
    let mut up = Proc::spawn_env(
        "up-2",
        &up_args(&common, &addr, ADMIN_KEY),
        &timeout,
        dir.path(),
    );
    wait_http(&addr);
    wait_speed_offsets(&addr, truth.messages);
    let checked = truth.check(&addr);

    // A second archiver on the same data directory is refused at start, naming the lock.
    let mut second = Proc::spawn(
        "batch-second",
        &{
            let mut a = vec!["batch".to_string()];
            a.extend(common.iter().cloned());
            a
        },
        dir.path(),
    );
    let (code, _) = wait_exit(&mut second, Duration::from_secs(60));
    assert_ne!(code, Some(0), "{}", second.tail());
    let log = log_of(&second);
    assert!(
        log.contains("master/.lock") && log.contains("another process"),
        "{log}"
    );

    // A second signal ends the stop at once (or the stop was already done).
    broker.stop();
    signal(&up, "-TERM");
    std::thread::sleep(Duration::from_millis(100));
    signal(&up, "-TERM");
    let (code, took) = wait_exit(&mut up, Duration::from_secs(30));
    assert!(
        took <= Duration::from_secs(3),
        "second signal: exited after {took:?}"
    );
    match code {
        Some(130) => assert!(log_of(&up).contains("second signal: exiting at once")),
        Some(0) => {}
        other => panic!("exit code {other:?}: {}", up.tail()),
    }
    eprintln!("second signal: exit {code:?} after {took:?}");

    // A speed layer whose data directory is moved away stops, naming it.
    broker.restart();
    let data2 = dir.path().join("data2");
    let mut c2 = layer_args(&topic, &data2, 1000, None);
    c2[at] = broker.addr();
    let mut speed = Proc::spawn(
        "speed-moved",
        &{
            let mut a = vec!["speed".to_string()];
            a.extend(c2.iter().cloned());
            a
        },
        dir.path(),
    );
    wait_for(
        "the speed layer to consume",
        Duration::from_secs(60),
        || {
            speed.assert_running();
            log_of(&speed)
                .contains("speed layer progress")
                .then_some(())
        },
    );
    std::fs::rename(&data2, dir.path().join("data2-moved")).expect("move the data dir");
    let (code, took) = wait_exit(&mut speed, Duration::from_secs(30));
    assert_ne!(code, Some(0));
    let log = log_of(&speed);
    assert!(
        log.contains(&format!("the data directory {} is gone", data2.display())),
        "{log}"
    );
    eprintln!(
        "e2e_shutdown: {} messages, {checked} answers checked after the restart; data dir moved: exit {code:?} after {took:?}",
        truth.messages
    );
}
