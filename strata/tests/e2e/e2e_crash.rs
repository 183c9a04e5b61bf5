//! Crash anywhere: the layers run as separate processes (`strata speed`, `strata batch --every 2s`,
//! `strata serve`) while a seeded stream is produced, and a seeded schedule kills one of them with
//! SIGKILL every fraction of a second, at least 20 times, restarting it at once. At the end every
//! answer must equal the ground truth. `STRATA_CRASH_SEED=<n>` replays a schedule. Each restarted
//! speed layer and archiver gets its partitions back at once (static group membership), not
//! after its killed predecessor's session expires.

use std::time::{Duration, Instant};

use crate::support::*;
use strata_common::time::now_millis;

/// A directory left in place unless the test reaches its end.
struct KeptDir(std::path::PathBuf);

impl KeptDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }

    fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small deterministic generator for the kill schedule.
struct Schedule(u64);

impl Schedule {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn kill_nine_in_a_loop_loses_nothing_and_counts_nothing_twice() {
    let seed: u64 = std::env::var("STRATA_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| now_millis() as u64 | 1);
    eprintln!("crash schedule seed: {seed} (STRATA_CRASH_SEED={seed} replays it)");
    let mut schedule = Schedule(seed);
    let started = Instant::now();
    let topic = unique_topic("e2e-crash");
    // Kept on failure, with every process's log, for the post-mortem.
    let dir = KeptDir(std::env::temp_dir().join(&topic));
    std::fs::create_dir_all(dir.path()).expect("test dir");
    eprintln!("logs and data in {}", dir.path().display());
    let addr = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("data");
    let mut common = layer_args(&topic, &data_dir, 3000, Some(&addr));
    common.extend(["--admin-key".to_string(), ADMIN_KEY.to_string()]);
    let args = |cmd: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec![cmd.to_string()];
        v.extend_from_slice(&common);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let roles: [(&str, Vec<String>); 3] = [
        ("speed", args("speed", &[])),
        ("batch", args("batch", &["--every", "2s"])),
        ("serve", args("serve", &[])),
    ];

    // The topic must exist before the layers start.
    let now = now_millis();
    let chunks: u64 = 8;
    let per_chunk: u64 = 20_000;
    let mut truth = Truth::default();
    let chunk_args = |i: u64| -> (Vec<String>, strata_common::generate::GenConfig) {
        let start = now - 3 * 3_600_000 + (i as i64) * 15 * 60_000;
        let cfg = gen_config(seed % 1_000 + i, per_chunk, start, 15 * 60_000, false);
        (generate_args(&common, &cfg), cfg)
    };
    let (first, cfg) = chunk_args(0);
    run_strata(&first);
    truth.add(cfg);

    let mut procs: Vec<Proc> = roles
        .iter()
        .map(|(name, a)| Proc::spawn(name, a, dir.path()))
        .collect();
    let producer = {
        let chunk_list: Vec<_> = (1..chunks).map(chunk_args).collect();
        std::thread::spawn(move || {
            for (a, _) in chunk_list {
                run_strata(&a);
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    for i in 1..chunks {
        truth.add(chunk_args(i).1);
    }

    let mut kills = [0u32; 3];
    // At least 24 kills, and more while the stream is produced, up to 40.
    while kills.iter().sum::<u32>() < 24
        || (!producer.is_finished() && kills.iter().sum::<u32>() < 40)
    {
        std::thread::sleep(Duration::from_millis(200 + schedule.below(1_300)));
        // Every layer is killed at least three times: the first nine kills take turns.
        let done: u32 = kills.iter().sum();
        let victim = if done < 9 {
            (done % 3) as usize
        } else {
            schedule.below(3) as usize
        };
        procs[victim].kill9();
        kills[victim] += 1;
        if schedule.below(4) == 0 {
            std::thread::sleep(Duration::from_millis(schedule.below(1_000)));
        }
        let (name, a) = &roles[victim];
        procs[victim] = Proc::spawn(name, a, dir.path());
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the stream took too long"
        );
    }
    producer.join().expect("producer");
    eprintln!(
        "kills: speed {}, batch {}, serve {}; {} messages",
        kills[0], kills[1], kills[2], truth.messages
    );
    assert!(
        kills.iter().all(|&k| k >= 3),
        "every layer was killed: {kills:?}"
    );

    for p in &mut procs {
        p.assert_running();
    }
    wait_http(&addr);
    wait_speed_offsets(&addr, truth.messages);
    // Let a batch run finish after the last kill, and be served.
    let deadline = Instant::now() + Duration::from_secs(180);
    let v = loop {
        for p in &mut procs {
            p.assert_running();
        }
        let (_, v) = get_json(&addr, "/v1/status");
        let covered: u64 = v["batch"]["cutoffs"]
            .as_object()
            .map(|o| o.values().filter_map(serde_json::Value::as_u64).sum())
            .unwrap_or(0);
        if covered + 4 * 3_000 >= truth.messages {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no batch version covers the stream: {v}\nbatch log: {}",
            procs[1].tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let checked = truth.check(&addr) + truth.check_insights(&addr);
    let ev = &v["speed"]["events"];
    assert_eq!(ev["rejected"].as_u64(), Some(truth.malformed), "{v}");
    assert_eq!(ev["duplicates"].as_u64(), Some(truth.copies), "{v}");
    // And every view, key by key, equals a recomputation from scratch.
    let (code, out) = verify(&common, &addr, true, &[]);
    assert_eq!(code, 0, "verify found differences or failed:\n{out}");
    eprintln!("{}", verify_summary(&out));
    for p in &mut procs {
        p.assert_running();
    }
    // Static membership: every restart that reached its assignment reached it well within the
    // 10 s session its killed predecessor left behind (a dynamic member waits for it to expire).
    for role in ["speed", "batch"] {
        let log =
            std::fs::read_to_string(dir.path().join(format!("{role}.log"))).unwrap_or_default();
        let waits = assignment_waits(&log);
        eprintln!("{role}: start to partitions assigned, ms: {waits:?}");
        assert!(
            waits.len() >= 3,
            "{role}: too few restarts reached an assignment: {waits:?}"
        );
        assert!(
            waits.iter().all(|&ms| ms < 5_000),
            "{role}: a restart waited for its partitions: {waits:?}"
        );
    }
    dir.remove();
    eprintln!(
        "e2e_crash: seed {seed}, {} kills, {} messages, {checked} answers checked, {:.1}s",
        kills.iter().sum::<u32>(),
        truth.messages,
        started.elapsed().as_secs_f64()
    );
}

/// Milliseconds since the Unix epoch of a log line's leading RFC 3339 UTC timestamp
/// (`2026-12-07T04:35:07.847779Z`).
fn log_millis(line: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| line.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi) = (num(11..13)?, num(14..16)?);
    let secs: f64 = line.get(17..line.find('Z')?)?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + (secs * 1000.0) as i64)
}

/// For each start of a consuming layer in `log` (the appended logs of its successive processes)
/// that was followed by a partition assignment before the next start: the milliseconds between.
fn assignment_waits(log: &str) -> Vec<i64> {
    let mut waits = Vec::new();
    let mut started: Option<i64> = None;
    for line in log.lines() {
        if line.contains("speed layer consuming") || line.contains("archiver consuming") {
            started = log_millis(line);
        } else if line.contains("partitions assigned") {
            if let (Some(t0), Some(t)) = (started.take(), log_millis(line)) {
                waits.push(t - t0);
            }
        }
    }
    waits
}

#[test]
fn log_times_and_waits_are_read_from_the_lines() {
    assert_eq!(log_millis("1970-01-01T00:00:01.5Z x"), Some(1_500));
    assert_eq!(
        log_millis("2026-12-07T04:35:07.847779Z  INFO"),
        Some(1_796_618_107_847)
    );
    let log = "2026-12-07T04:35:07.000Z speed layer consuming\n\
               2026-12-07T04:35:07.050Z partitions assigned\n\
               2026-12-07T04:35:09.000Z speed layer consuming\n\
               2026-12-07T04:35:10.000Z speed layer consuming\n\
               2026-12-07T04:35:19.500Z partitions assigned\n";
    assert_eq!(assignment_waits(log), vec![50, 9_500]);
}
