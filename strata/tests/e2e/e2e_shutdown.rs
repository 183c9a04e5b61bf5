//! Stopping whatever the broker does, and writers that keep to their data directory.
//!
//! With its own broker: `strata up` consumes a stream; the broker is stopped for good; SIGTERM
//! makes `strata up` exit within `shutdown-timeout-secs` (5 s here) plus a margin, either cleanly
//! (exit 0, state flushed) or by the watchdog (exit 3, with the log line saying what it gave up
//! on); restarted against the restarted broker, every answer equals the ground truth. A second
//! signal ends a stop at once. A second archiver on one data directory is refused, naming the
//! lock; a speed layer whose data directory is moved away stops, naming the path.
//!
//! Then the race between a broker going away and SIGTERM, 20 times on a seeded schedule, and
//! `scripts/run.sh` stopped by a signal to its whole process group.

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::support::*;
use strata_common::time::now_millis;

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

/// The tests of this suite run one at a time: each measures stop times, and two brokers
/// starting beside them on 2 cores would be measured too.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn stops_in_bounded_time_without_a_broker_and_keeps_to_its_data_dir() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = Broker::start(&dir.path().join("broker"), &[]);
    let topic = unique_topic("e2e-shutdown");
    let mut common = layer_args(&topic, &dir.path().join("data"), 1000, None);
    set_brokers(&mut common, &broker.addr());
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
    set_brokers(&mut c2, &broker.addr());
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

/// SplitMix64: the race schedule, reproducible from its seed.
struct Schedule(u64);

impl Schedule {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

#[derive(Debug, Clone, Copy)]
enum Outage {
    /// SIGTERM: Kafka's controlled shutdown, then started again.
    Stop,
    /// SIGKILL, then started again.
    Kill,
    /// SIGSTOP, then SIGCONT: the broker hangs with every connection open.
    Pause,
}

/// The race between a broker going away and a stop, repeated on a seeded schedule
/// (`STRATA_RACE_SEED`, default: from the clock, printed, so that each run tries new moments
/// and a failure can be replayed; `STRATA_RACE_RUNS`, default 8): a stream is being produced
/// and consumed, the broker is stopped, killed or paused (in turn) at a random moment, and
/// SIGTERM reaches `strata up` a random 0 to
/// 50 ms later. Every stop must end within `shutdown-timeout-secs` (3 s here) plus a margin,
/// either clean (exit 0) or by the watchdog (exit 3, naming what it gave up on); each restart,
/// against the broker brought back, must resume from the stored offsets with every answer equal
/// to the ground truth of every event produced so far.
#[test]
fn seeded_races_between_the_broker_and_sigterm() {
    let _serial = serial();
    let seed: u64 = std::env::var("STRATA_RACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_millis().unsigned_abs() % 1_000_000);
    let runs: u64 = std::env::var("STRATA_RACE_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let mut schedule = Schedule(seed);
    eprintln!("race schedule: seed {seed} (replay with STRATA_RACE_SEED={seed}), {runs} runs");

    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    // A dead member's partitions wait for its session to expire before a restarted one gets
    // them: 2 s here instead of 10, so that the restarts fit in a CI run.
    let props = dir.join("broker.properties");
    std::fs::write(&props, "group.min.session.timeout.ms=1000\n").expect("write properties");
    let mut broker = Broker::start(
        &dir.join("broker"),
        &[(
            "STRATA_BROKER_PROPERTIES",
            props.to_str().expect("utf-8 path"),
        )],
    );
    let topic = unique_topic("e2e-race");
    let mut common = layer_args(&topic, &dir.join("data"), 500, None);
    set_brokers(&mut common, &broker.addr());
    let timeout_secs = 3;
    let timeout = [
        ("STRATA__SHUTDOWN_TIMEOUT_SECS", "3"),
        ("STRATA__KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", "2000"),
        ("STRATA__KAFKA__PROPERTIES__HEARTBEAT_INTERVAL_MS", "500"),
    ];
    let addr = format!("127.0.0.1:{}", free_port());
    let start_ts = now_millis() - 3 * 3_600_000;

    let mut truth = Truth::default();
    let mut checked = 0;
    let mut outcomes = Vec::new();
    for run in 0..runs {
        let mut up = Proc::spawn_env(
            &format!("race-up-{run}"),
            &up_args(&common, &addr, ADMIN_KEY),
            &timeout,
            dir,
        );
        let restarted = Instant::now();
        wait_http(&addr);
        if truth.messages > 0 {
            // The restart after the previous race: resumed, and exact.
            wait_speed_offsets(&addr, truth.messages);
            checked += truth.check(&addr);
        }
        let resumed = restarted.elapsed();

        // A stream running: 3,000 events at 2,000/s, produced by a process of its own that
        // retries through the outage.
        let cfg = gen_config(
            500 + run,
            3_000,
            start_ts + (run as i64) * 60_000,
            60_000,
            false,
        );
        let mut args = generate_args(&common, &cfg);
        args.extend(["--rate".to_string(), "2000".to_string()]);
        let mut stream = Proc::spawn(&format!("race-stream-{run}"), &args, dir);

        let before = schedule.between(200, 1_400);
        // Each kind of outage in turn, so that every run of the suite meets all three; the
        // moments are the schedule's.
        let outage = match run % 3 {
            0 => Outage::Stop,
            1 => Outage::Kill,
            _ => Outage::Pause,
        };
        let gap = schedule.between(0, 50);
        std::thread::sleep(Duration::from_millis(before));
        up.assert_running();
        broker.signal(match outage {
            Outage::Stop => "-TERM",
            Outage::Kill => "-KILL",
            Outage::Pause => "-STOP",
        });
        std::thread::sleep(Duration::from_millis(gap));
        signal(&up, "-TERM");
        let (code, took) = wait_exit(&mut up, Duration::from_secs(60));
        let log = log_of(&up);
        let bound = Duration::from_secs(timeout_secs + 2);
        assert!(
            took <= bound,
            "run {run} ({outage:?} after {before} ms, SIGTERM {gap} ms later): stopped in \
             {took:?}, over {bound:?}: {}",
            up.tail()
        );
        match code {
            Some(0) => assert!(log.contains("speed layer stopped; state flushed"), "{log}"),
            Some(3) => assert!(
                log.contains(&format!(
                    "shutdown did not finish within {timeout_secs} s; exiting anyway"
                )),
                "{log}"
            ),
            other => panic!("run {run}: exit code {other:?}: {}", up.tail()),
        }

        // The broker comes back; the stream finishes; the truth takes it in.
        match outage {
            Outage::Stop | Outage::Kill => {
                broker.wait_gone(Duration::from_secs(60));
                broker.restart();
            }
            Outage::Pause => broker.signal("-CONT"),
        }
        stream.wait_success(Duration::from_secs(180));
        truth.add(cfg);
        eprintln!(
            "run {run:2}: resumed and checked in {} ms; {outage:?} after {before:4} ms, SIGTERM \
             {gap:2} ms later: exit {code:?} in {} ms",
            resumed.as_millis(),
            took.as_millis()
        );
        outcomes.push((outage, code, took));
    }

    // The last restart, checked like the others, then by `strata verify`.
    let mut up = Proc::spawn_env(
        "race-up-last",
        &up_args(&common, &addr, ADMIN_KEY),
        &timeout,
        dir,
    );
    wait_http(&addr);
    wait_speed_offsets(&addr, truth.messages);
    checked += truth.check(&addr);
    checked += truth.check_insights(&addr);
    let (code, out) = verify(&common, &addr, true, &["--admin-key", ADMIN_KEY]);
    assert_eq!(code, 0, "strata verify: {out}");
    up.terminate();

    let clean = outcomes.iter().filter(|o| o.1 == Some(0)).count();
    let slowest = outcomes.iter().map(|o| o.2).max().unwrap_or_default();
    eprintln!(
        "e2e_shutdown race: {runs} runs (seed {seed}), {clean} clean stops, {} by the watchdog, \
         slowest {slowest:?}; {} messages, {checked} answers checked",
        outcomes.len() - clean,
        truth.messages
    );
}

/// `scripts/run.sh` stopped as a terminal stops it (SIGINT to its whole process group), then as
/// a service manager might (SIGTERM to the group): `strata up` stops first and cleanly, then the
/// broker, all within a bound, nothing left running; the second start resumes on the same data.
#[test]
fn run_sh_stops_in_order_on_a_signal_to_its_process_group() {
    use std::os::unix::process::CommandExt;
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_port().to_string();
    let http = format!("127.0.0.1:{}", free_port());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/run.sh");

    for (round, sig) in [(1u64, "-INT"), (2, "-TERM")] {
        let out_path = dir.path().join(format!("run-{round}.out"));
        let out = std::fs::File::create(&out_path).expect("output file");
        // As from a terminal: the signals at their default disposition, even when this test
        // runs in the background of a non-interactive shell (which starts its children with
        // SIGINT ignored, and a shell cannot trap a signal ignored on entry).
        let mut child = Command::new("env")
            .arg("--default-signal=INT,TERM,HUP")
            .arg("bash")
            .arg(&script)
            .env("STRATA_BIN", strata_bin())
            .env("STRATA_DATA", &data)
            .env("STRATA_BROKER_PORT", &port)
            .env("STRATA_HTTP", &http)
            .env("STRATA_ADMIN_KEY", ADMIN_KEY)
            .env("STRATA_DEMO_EVENTS", "20000")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("output file"))
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("run scripts/run.sh");
        let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
        wait_for("scripts/run.sh to be up", Duration::from_secs(300), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("scripts/run.sh exited with {status}: {}", output());
            }
            output().contains("Strata is up. Try:").then_some(())
        });
        // Every demo event of every round is consumed.
        wait_speed_offsets(&http, 20_000 * round);
        let text = output();
        let strata_pid: u32 = text
            .split("strata up is running (pid ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no strata pid in: {text}"));
        let broker_pid: u32 = std::fs::read_to_string(data.join("broker/broker.pid"))
            .expect("broker.pid")
            .trim()
            .parse()
            .expect("a pid");

        // The signal goes to the whole process group, as Ctrl-C sends it.
        let group = format!("-{}", child.id());
        let started = Instant::now();
        let status = Command::new("kill")
            .args([sig, "--", &group])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        let code = loop {
            if let Ok(Some(code)) = child.try_wait() {
                break code;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(data.join("strata.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "scripts/run.sh ({sig}, round {round}) did not exit within 60 s: {}\nstrata.log, last lines:\n{}",
                    output(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let took = started.elapsed();
        let text = output();
        assert!(code.success(), "scripts/run.sh exited with {code}: {text}");
        assert!(
            took <= Duration::from_secs(40),
            "stopping took {took:?} (limit: strata's 10 s plus the broker's 30 s): {text}"
        );
        for pid in [strata_pid, broker_pid] {
            assert!(
                !alive(pid),
                "pid {pid} still running after scripts/run.sh exited"
            );
        }
        // In order: strata up, stopped cleanly, then the broker.
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("no {needle:?} in: {text}"))
        };
        let stopping = at("stopping strata up");
        let stopped = at("strata up stopped (exit 0)");
        let broker_stopped = at("broker stopped");
        assert!(stopping < stopped && stopped < broker_stopped, "{text}");
        let log = std::fs::read_to_string(data.join("strata.log")).unwrap_or_default();
        let this_run = log
            .rsplit("shutting down: draining")
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(
            this_run.contains("speed layer stopped; state flushed"),
            "{this_run}"
        );
        assert!(
            !this_run.contains("second signal: exiting at once"),
            "{this_run}"
        );
        eprintln!("scripts/run.sh, {sig} to its process group: exit 0 in {took:?}, in order");
    }
}
