//! Strata on several hosts, on loopback with real processes: three `strata speed` instances in
//! one consumer group (each with a data directory of its own and its endpoint on a port of its
//! own), one archiver, two `strata serve` mirroring the instances (`serve.speed = "cluster"`).
//! One instance is killed with kill -9 mid-stream: the answers say which partitions they lack
//! until the group moves them, and stay exact at their stated coverage (`strata verify`); then
//! every answer equals the ground truth again. A new instance joins later and takes partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;
use strata_common::generate::{Class, Generated, Generator};
use strata_common::time::now_millis;

/// Produces generated messages as they are (key and payload).
fn produce_raw(topic: &str, messages: &[Generated]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer");
    for g in messages {
        p.send(BaseRecord::to(topic).key(&g.key).payload(&g.payload))
            .map_err(|(err, _)| err)
            .expect("enqueue a message");
    }
    p.flush(Duration::from_secs(30))
        .expect("every message acknowledged");
}

/// Deletes every record of each partition below its offset in `below` (Kafka's DeleteRecords).
fn delete_below(topic: &str, below: &BTreeMap<i32, i64>) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (&p, &o) in below {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset(o))
            .expect("partition");
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let done = rt
        .block_on(admin.delete_records(&tpl, &AdminOptions::new()))
        .expect("delete records");
    for e in done.elements() {
        assert!(
            e.error().is_ok(),
            "delete records of {topic}/{}: {:?}",
            e.partition(),
            e.error()
        );
    }
}

/// Waits until the serving layer at `addr` covers `messages` messages and lacks nothing.
fn wait_covered(addr: &str, messages: u64, what: &str) -> Value {
    wait_for(
        &format!("{what}: {addr} to cover {messages} messages with no partition lacking"),
        Duration::from_secs(180),
        || {
            let (s, v) = get_json(addr, "/v1/status");
            let covered: u64 = v["as_of"]["coverage"]
                .as_object()?
                .values()
                .filter_map(Value::as_u64)
                .sum();
            let whole = v["as_of"]["cluster"]["partial"] == false;
            (s == 200 && covered >= messages && whole).then_some(v)
        },
    )
}

/// The instances each partition is pulled from, as a serving layer's status says.
fn instances(status: &Value) -> BTreeSet<String> {
    status["as_of"]["cluster"]["partitions"]
        .as_object()
        .map(|ps| {
            ps.values()
                .filter_map(|s| s["instance"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn speed_instances_in_a_group_serve_exact_answers_through_a_kill_and_a_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique_topic("e2e-cluster");
    let arch = dir.path().join("arch");
    let mut common = layer_args(&topic, &arch, 2000, None);
    let arch_dir = arch.to_str().expect("utf-8 path");
    common.extend(["--admin-key".to_string(), ADMIN_KEY.to_string()]);
    // A crashed instance leaves the group after 6 s instead of 45.
    let group_env = [
        ("STRATA__KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", "6000"),
        ("STRATA__KAFKA__PROPERTIES__HEARTBEAT_INTERVAL_MS", "1000"),
    ];
    let speed = |n: usize| -> (Proc, String) {
        let port = free_port();
        let http = format!("127.0.0.1:{port}");
        let mut args = vec!["speed".to_string()];
        args.extend(layer_args(
            &topic,
            &dir.path().join(format!("speed{n}")),
            2000,
            None,
        ));
        let mut env = group_env.to_vec();
        env.push(("STRATA__SPEED__HTTP", &http));
        // The archiver's directory stands for the shared storage batch versions are read from.
        env.push(("STRATA__SPEED__BATCH_DIR", arch_dir));
        let p = Proc::spawn_env(&format!("speed{n}"), &args, &env, dir.path());
        (p, format!("http://{http}"))
    };
    let serve = |n: usize| -> (Proc, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["serve".to_string()];
        args.extend_from_slice(&common);
        args.extend(["--http".into(), addr.clone()]);
        let p = Proc::spawn_env(
            &format!("serve{n}"),
            &args,
            &[("STRATA__SERVE__SPEED", "cluster")],
            dir.path(),
        );
        (p, addr)
    };

    let mut truth = Truth::default();
    let now = now_millis();
    let mut instances_up: Vec<(Proc, String)> = (0..3).map(speed).collect();
    let (mut serve_a, a) = serve(0);
    let (mut serve_b, b) = serve(1);
    wait_http(&a);
    wait_http(&b);
    // The group settles with a partition or more on each instance (4 partitions, 3 members).
    for addr in [&a, &b] {
        wait_for(
            "every instance to hold a partition",
            Duration::from_secs(60),
            || {
                let (_, v) = get_json(addr, "/v1/status");
                (instances(&v).len() == 3).then_some(())
            },
        );
    }
    truth.produce(
        &common,
        gen_config(31, 30_000, now - 2 * 3_600_000, 3_600_000, false),
    );
    for addr in [&a, &b] {
        wait_covered(addr, truth.messages, "first stream");
        truth.check(addr);
    }

    // A batch version over what the archiver has: both serving layers merge it with the mirror.
    let mut once = vec!["batch".to_string()];
    once.extend_from_slice(&common);
    once.push("--once".into());
    Proc::spawn("batch1", &once, dir.path()).wait_success(Duration::from_secs(120));
    for addr in [&a, &b] {
        wait_for("batch version 1", Duration::from_secs(30), || {
            let (_, v) = get_json(addr, "/v1/status");
            (v["batch"]["version"].as_u64() == Some(1)).then_some(())
        });
        truth.check(addr);
    }
    // Each instance drops the blocks the version covers, reading it from the shared directory.
    for (p, _) in &instances_up {
        wait_for(
            &format!("{} to drop the blocks batch version 1 covers", p.name),
            Duration::from_secs(30),
            || {
                let log = std::fs::read_to_string(&p.log).ok()?;
                log.contains("dropped speed blocks covered by the batch version")
                    .then_some(())
            },
        );
    }

    // Copies of events below the cutoffs, produced again as they were (same key, same
    // partition): duplicates by the dedupe rule, which an instance taking a partition over
    // must know from the version's dedupe state. Then Kafka drops every record below the
    // cutoffs, so that a partition taken over can only start there.
    let copies: Vec<Generated> = Generator::new(gen_config(
        31,
        30_000,
        now - 2 * 3_600_000,
        3_600_000,
        false,
    ))
    .filter(|g| matches!(g.class, Class::Event(_)))
    .take(3_000)
    .collect();
    produce_raw(&topic, &copies);
    truth.messages += copies.len() as u64;
    truth.copies += copies.len() as u64;
    for addr in [&a, &b] {
        wait_covered(addr, truth.messages, "the copies");
        truth.check(addr);
    }
    let (_, st) = get_json(&a, "/v1/status");
    let cutoffs: BTreeMap<i32, i64> =
        serde_json::from_value(st["batch"]["cutoffs"].clone()).expect("cutoffs");
    assert!(cutoffs.values().all(|&c| c > 0), "{st}");
    delete_below(&topic, &cutoffs);

    // kill -9 one instance while a stream is being produced.
    let stream = gen_config(32, 20_000, now - 3_600_000, 1_800_000, false);
    let mut gen_args = generate_args(&common, &stream);
    gen_args.extend(["--rate".into(), "5000".into()]);
    let mut producing = Proc::spawn("generate2", &gen_args, dir.path());
    truth.add(stream);
    std::thread::sleep(Duration::from_secs(1));
    let (mut killed, killed_url) = instances_up.remove(1);
    killed.kill9();
    let st = wait_for(
        "the serving layer to report the killed instance's partitions",
        Duration::from_secs(10),
        || {
            let (_, v) = get_json(&a, "/v1/status");
            let lacking = v["as_of"]["cluster"]["lacking"].as_array()?.clone();
            let unreachable = v["as_of"]["cluster"]["partitions"]
                .as_object()?
                .values()
                .any(|s| s["state"] == "unreachable" && s["instance"] == killed_url.as_str());
            (!lacking.is_empty() && unreachable).then_some(v)
        },
    );
    eprintln!("while the instance is down: {}", st["as_of"]["cluster"]);
    // An answer is flagged too, not only the status.
    let (_, items) = get_json(&a, "/v1/insights/top-items?type=view&limit=5");
    assert_eq!(items["as_of"]["cluster"]["partial"], true, "{items}");
    // Exact at the coverage it states, while partial: verify recomputes every view up to it.
    let (code, out) = verify(&common, &a, false, &[]);
    assert_eq!(code, 0, "verify while an instance is down:\n{out}");
    assert!(out.contains(" 0 differences"), "{out}");
    eprintln!("{}", verify_summary(&out));
    producing.wait_success(Duration::from_secs(120));
    // The group moves the killed instance's partitions; the new holders start them at the
    // version's cutoffs, with its dedupe memory.
    for addr in [&a, &b] {
        let st = wait_covered(addr, truth.messages, "after the kill");
        assert!(!instances(&st).contains(&killed_url), "{st}");
        truth.check(addr);
    }
    let taken_over = |p: &Proc| {
        std::fs::read_to_string(&p.log)
            .unwrap_or_default()
            .contains("partition taken over at the batch version's cutoff")
    };
    assert!(
        instances_up.iter().any(|(p, _)| taken_over(p)),
        "a surviving instance took a partition over at the cutoff"
    );

    // A new instance joins and takes partitions over.
    instances_up.push(speed(3));
    let joined = instances_up
        .last()
        .map(|(_, u)| u.clone())
        .unwrap_or_default();
    truth.produce(
        &common,
        gen_config(33, 10_000, now - 1_800_000, 900_000, false),
    );
    wait_for(
        "the new instance to hold a partition",
        Duration::from_secs(60),
        || {
            let (_, v) = get_json(&b, "/v1/status");
            instances(&v).contains(&joined).then_some(())
        },
    );
    truth.produce(
        &common,
        gen_config(34, 5_000, now - 900_000, 600_000, false),
    );
    for addr in [&a, &b] {
        wait_covered(addr, truth.messages, "after the join");
        truth.check(addr);
    }
    truth.check_insights(&b);
    let (code, out) = verify(&common, &b, true, &[]);
    assert_eq!(code, 0, "verify against the cluster:\n{out}");
    assert!(out.contains(" 0 differences"), "{out}");
    eprintln!("{}", verify_summary(&out));
    for (p, _) in &mut instances_up {
        p.assert_running();
    }
    serve_a.assert_running();
    serve_b.assert_running();
}

/// Two speed instances given one `group.instance.id` (a state directory copied with its
/// `.group-member-id`): the broker fences one, it joins again with a new consumer (what a
/// fencing after a coordinator outage needs) and fences the other in turn; fenced a second time
/// within a minute, a process stops with a message that names the cause, and the other goes on
/// holding every partition and consuming.
#[test]
fn two_instances_of_one_member_id_end_with_one_and_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique_topic("e2e-fenced");
    let data = |n: usize| dir.path().join(format!("speed{n}"));
    let common = layer_args(&topic, &data(1), 2000, None);
    let now = now_millis();
    run_strata(&generate_args(
        &common,
        &gen_config(41, 4_000, now - 3_600_000, 3_600_000, false),
    ));
    let speed = |n: usize| {
        let mut args = vec!["speed".to_string()];
        args.extend(layer_args(&topic, &data(n), 2000, None));
        Proc::spawn(&format!("speed{n}"), &args, dir.path())
    };
    let assigned = |p: &Proc| {
        std::fs::read_to_string(&p.log)
            .unwrap_or_default()
            .contains("partitions assigned")
    };
    let mut first = speed(1);
    wait_for(
        "the first instance's partitions",
        Duration::from_secs(60),
        || assigned(&first).then_some(()),
    );
    // The second gets the first one's member id.
    let id_file = |n: usize| data(n).join("speed").join(".group-member-id");
    std::fs::create_dir_all(data(2).join("speed")).expect("second state directory");
    std::fs::copy(id_file(1), id_file(2)).expect("copy the member id");
    let mut second = speed(2);
    let (stopped, log) = wait_for("one instance to stop", Duration::from_secs(60), || {
        for p in [&mut first, &mut second] {
            if p.exit_status().is_some() {
                return Some((p.name.clone(), p.tail()));
            }
        }
        None
    });
    assert!(
        log.contains("fenced twice") && log.contains("with the broker answering"),
        "{stopped} stopped without naming the cause: {log}"
    );
    let survivor = if stopped == "speed1" {
        &mut second
    } else {
        &mut first
    };
    // The survivor was fenced once and joined again, and goes on: new records reach it.
    let joined = std::fs::read_to_string(&survivor.log).unwrap_or_default();
    assert!(
        joined.contains("joining again with a new consumer"),
        "{}",
        survivor.tail()
    );
    let accepted = |p: &Proc| -> u64 {
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        (log.lines().rev())
            .find(|l| l.contains("speed layer progress"))
            .and_then(|l| l.split("accepted=").nth(1)?.split(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = accepted(survivor);
    run_strata(&generate_args(
        &common,
        &gen_config(42, 2_000, now - 1_800_000, 1_800_000, false),
    ));
    wait_for(
        "the survivor to go on consuming",
        Duration::from_secs(60),
        || (accepted(survivor) >= before + 1_000).then_some(()),
    );
    survivor.assert_running();
}
