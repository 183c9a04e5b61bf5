//! Test support: a real broker on 127.0.0.1, the real `strata` binary as child processes, plain
//! HTTP/1.1 over TCP, and a ground truth computed from the generated stream by a separate, naive
//! oracle (not the view code under test).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_common::event::{Event, Kind};
use strata_common::generate::{Class, GenConfig, Generator};

pub fn brokers() -> String {
    std::env::var("STRATA_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A topic name no other test run uses.
pub fn unique_topic(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{nanos}", std::process::id())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A free port `p` whose next port is free too, neither in `taken`: for a process that binds
/// both (a Ballista executor binds its port and the next one for gRPC).
pub fn free_port_pair(taken: &[u16]) -> u16 {
    for _ in 0..1000 {
        let p = free_port();
        let Some(q) = p.checked_add(1) else { continue };
        if taken.contains(&p) || taken.contains(&q) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", q)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free ports in 1000 tries");
}

/// The flags every layer of one test shares: broker, topic, data directory, block size, and the
/// HTTP address if given.
pub fn layer_args(
    topic: &str,
    data_dir: &Path,
    block_size: u64,
    http: Option<&str>,
) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--brokers".into(),
        brokers(),
        "--topic".into(),
        topic.into(),
        "--data-dir".into(),
        data_dir.to_str().expect("utf-8 path").into(),
        "--block-size".into(),
        block_size.to_string(),
    ];
    if let Some(h) = http {
        v.extend(["--http".into(), h.into()]);
    }
    v
}

/// Points `common` (from [`layer_args`]) at `brokers` instead of the shared test broker.
pub fn set_brokers(common: &mut [String], brokers: &str) {
    let at = common
        .iter()
        .position(|a| a == "--brokers")
        .expect("--brokers");
    common[at + 1] = brokers.to_string();
}

/// Whether process `pid` exists (`kill -0`).
pub fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `strata up` with a test's shared flags (`common`), serving on `addr` with `admin_key`.
pub fn up_args(common: &[String], addr: &str, admin_key: &str) -> Vec<String> {
    let mut v: Vec<String> = vec!["up".into()];
    v.extend_from_slice(common);
    v.extend([
        "--http".into(),
        addr.into(),
        "--admin-key".into(),
        admin_key.into(),
    ]);
    v
}

pub fn strata_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_strata"))
}

/// A `strata` child process whose output goes to a log file.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, args: &[String], log_dir: &Path) -> Proc {
        Proc::spawn_env(name, args, &[], log_dir)
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_env(name: &str, args: &[String], env: &[(&str, &str)], log_dir: &Path) -> Proc {
        Proc::spawn_bin(&strata_bin(), name, args, env, log_dir)
    }

    /// [`Proc::spawn_env`] of another binary (`strata-engine`).
    pub fn spawn_bin(
        bin: &Path,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.wait_success(Duration::from_secs(30));
    }

    /// The exit status if the process has ended.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status}; log: {}", self.name, self.tail());
        }
    }

    /// Waits for a process that is meant to finish by itself.
    pub fn wait_success(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "{} exited with {status}; log: {}",
                    self.name,
                    self.tail()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not finish in {timeout:?}; log: {}",
            self.name,
            self.tail()
        );
    }

    pub fn tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `[{"item", "count"}, ...]` as pairs, in order.
pub fn item_counts(items: &Value) -> Vec<(String, u64)> {
    items
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["item"].as_str().unwrap_or("").to_string(),
                        x["count"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A time series answer's points: bucket start -> value.
pub fn series_points(v: &Value) -> BTreeMap<i64, f64> {
    v["points"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some((
                        strata_common::time::parse_rfc3339(p["start"].as_str()?)?,
                        p["value"].as_f64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The admin key the test layers run with.
pub const ADMIN_KEY: &str = "test-admin-key";
/// `Authorization` with [`ADMIN_KEY`].
pub const ADMIN_BEARER: &str = "Bearer test-admin-key";

/// `strata verify` against the serving layer at `addr` (with `caught_up`, first waiting up to
/// two minutes for it to cover the topic's end): its exit code and everything it printed.
/// `common` must hold `--admin-key`.
pub fn verify(common: &[String], addr: &str, caught_up: bool, extra: &[&str]) -> (i32, String) {
    verify_url(common, &format!("http://{addr}"), caught_up, extra)
}

/// [`verify`] against any `--url` (e.g. `https://...`).
pub fn verify_url(common: &[String], url: &str, caught_up: bool, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["verify".to_string()];
    args.extend_from_slice(common);
    args.extend(["--url".into(), url.to_string()]);
    if caught_up {
        args.extend(["--wait".into(), "120s".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = Command::new(strata_bin())
        .args(&args)
        .output()
        .expect("run strata verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The summary line `strata verify` ends with.
pub fn verify_summary(out: &str) -> String {
    out.lines()
        .filter(|l| l.starts_with("verify: "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `openssl` with `args` in `dir`; it must succeed.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (scripts/deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA in `dir`: `ca.pem` and `ca.key`.
pub fn make_ca(dir: &Path) {
    std::fs::create_dir_all(dir).expect("CA dir");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=strata-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
}

/// A key (`NAME.key`) and a certificate (`NAME.pem`) for `cn`, signed by [`make_ca`]'s CA in
/// `dir`, with the X.509 extensions in `ext` (e.g. `subjectAltName=IP:127.0.0.1`).
pub fn sign_cert(dir: &Path, name: &str, cn: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).expect("extensions file");
    let (key, csr, pem, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    let subject = format!("/CN={cn}");
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout", &key, "-out",
            &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            &extfile,
            "-out",
            &pem,
        ],
    );
}

/// Runs a `strata` command to completion.
pub fn run_strata(args: &[String]) {
    let out = Command::new(strata_bin())
        .args(args)
        .output()
        .expect("run strata");
    assert!(
        out.status.success(),
        "strata {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Produces `events` (their JSON form, keyed by id) to `topic` on the test broker and waits
/// until the broker has acknowledged every one.
pub fn produce_events(topic: &str, events: &[Event]) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("producer");
    for e in events {
        let json = e.to_json();
        p.send(BaseRecord::to(topic).key(&e.id).payload(&json))
            .map_err(|(err, _)| err)
            .expect("enqueue an event");
    }
    p.flush(Duration::from_secs(30))
        .expect("every event acknowledged");
}

/// One HTTP/1.1 request over a fresh TCP connection; returns status and body.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A GET with the admin key, which the read routes take too when a read key is set (and ignore
/// when none is).
pub fn get_json(addr: &str, path: &str) -> (u16, Value) {
    let (status, body) = http(addr, "GET", path, &[("Authorization", ADMIN_BEARER)]);
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
    (status, v)
}

/// Polls until `f` returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the server answers /healthz.
pub fn wait_http(addr: &str) {
    wait_for("the HTTP server", Duration::from_secs(60), || {
        TcpStream::connect(addr)
            .ok()
            .map(|_| http(addr, "GET", "/healthz", &[]).0)
            .filter(|&s| s == 200)
    });
}

/// Waits until the speed layer has consumed `messages` messages in all.
pub fn wait_speed_offsets(addr: &str, messages: u64) -> Value {
    wait_speed_offsets_for(addr, messages, Duration::from_secs(300))
}

/// [`wait_speed_offsets`] with a timeout of one's own.
pub fn wait_speed_offsets_for(addr: &str, messages: u64, timeout: Duration) -> Value {
    wait_for(
        &format!("the speed layer to reach {messages} messages"),
        timeout,
        || {
            let (s, v) = http_status(addr)?;
            let sum: u64 = v["speed"]["offsets"]
                .as_object()?
                .values()
                .filter_map(Value::as_u64)
                .sum();
            (s == 200 && sum >= messages).then_some(v)
        },
    )
}

fn http_status(addr: &str) -> Option<(u16, Value)> {
    TcpStream::connect(addr).ok()?;
    let (status, body) = http(
        addr,
        "GET",
        "/v1/status",
        &[("Authorization", ADMIN_BEARER)],
    );
    Some((status, serde_json::from_str(&body).ok()?))
}

/// Asks for a batch run, follows it by its id (`GET /v1/admin/batch/{id}`: running with
/// progress, then published), and waits until the version it published is served.
pub fn run_batch(addr: &str, key: &str, previous: u64) -> Value {
    let auth = format!("Bearer {key}");
    let (status, body) = http(addr, "POST", "/v1/admin/batch", &[("Authorization", &auth)]);
    assert_eq!(status, 202, "{body}");
    let v: Value = serde_json::from_str(&body).expect("JSON");
    let id = v["run_id"].as_str().expect("run_id").to_string();
    let run = wait_for(
        &format!("batch run {id} to finish"),
        Duration::from_secs(120),
        || {
            let (s, body) = http(
                addr,
                "GET",
                &format!("/v1/admin/batch/{id}"),
                &[("Authorization", &auth)],
            );
            assert_eq!(s, 200, "{body}");
            let run: Value = serde_json::from_str(&body).ok()?;
            assert_ne!(run["state"], "failed", "{run}");
            (run["state"] == "published").then_some(run)
        },
    );
    let version = run["version"].as_u64().expect("published version");
    assert!(version > previous, "{run}");
    let progress = &run["progress"];
    assert_eq!(progress["done"], progress["total"], "{run}");
    wait_for("the new batch version", Duration::from_secs(30), || {
        let (_, v) = http_status(addr)?;
        (v["batch"]["version"].as_u64()? >= version).then_some(v)
    })
}

/// The generator settings `strata generate` uses for these flags.
pub fn gen_config(seed: u64, count: u64, start_ts: i64, span_ms: i64, patterns: bool) -> GenConfig {
    let mut c = GenConfig::new(seed, count, start_ts);
    c.span_ms = span_ms;
    c.patterns = patterns;
    c
}

/// The `strata generate` command line that produces exactly the stream `cfg` describes, so the
/// ground truth and the produced messages cannot drift apart.
pub fn generate_args(common: &[String], cfg: &GenConfig) -> Vec<String> {
    let mut args = vec![
        "generate".to_string(),
        "--seed".into(),
        cfg.seed.to_string(),
        "--count".into(),
        cfg.count.to_string(),
        "--start".into(),
        strata_common::time::format_rfc3339(cfg.start_ts),
        "--span".into(),
        format!("{}ms", cfg.span_ms),
        "--malformed-rate".into(),
        cfg.malformed_rate.to_string(),
    ];
    if cfg.patterns {
        args.push("--patterns".into());
    }
    args.extend_from_slice(common);
    args
}

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// One hour of everything, computed naively.
#[derive(Default, Debug, Clone, PartialEq)]
pub struct HourTruth {
    pub by_type: BTreeMap<String, u64>,
    pub revenue_micros: i128,
}

/// Ground truth of one item, computed naively from the generated events.
#[derive(Default, Debug, Clone, PartialEq)]
pub struct ItemTruth {
    pub view: u64,
    pub add_to_cart: u64,
    pub purchase: u64,
    pub rating: u64,
    pub quantity: u64,
    pub revenue_micros: i128,
}

#[derive(Default, Debug, Clone)]
pub struct DeviceTruth {
    pub last_seen: i64,
    pub heartbeats: u64,
    pub readings: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
}

/// A device's status at `now` by the default thresholds (`serve.late-after-secs` 120,
/// `serve.silent-after-secs` 600), as the tests run `strata` with them, computed here.
fn status_at(seen: i64, now: i64) -> &'static str {
    match now - seen {
        age if age <= 120_000 => "ok",
        age if age <= 600_000 => "late",
        _ => "silent",
    }
}

/// A device, a metric and an hour's start.
pub type DeviceHour = (String, String, i64);
/// Readings: count, min, max, sum.
pub type Readings = (u64, f64, f64, f64);
/// One hourly window as the device route shows it: metric, start, count, min, max, mean,
/// out of range.
type WindowRow = (String, i64, u64, f64, f64, f64, bool);

/// What every accepted event adds up to.
#[derive(Default, Debug)]
pub struct Truth {
    pub items: BTreeMap<String, ItemTruth>,
    pub devices: BTreeMap<String, DeviceTruth>,
    pub messages: u64,
    pub events: u64,
    pub copies: u64,
    pub malformed: u64,
    pub seen_ids: HashMap<String, ()>,
    pub hours: BTreeMap<i64, HourTruth>,
    pub item_hours: BTreeMap<(String, i64), u64>,
    pub bought: BTreeMap<String, BTreeSet<String>>,
    pub item_day_users: BTreeMap<(String, i64), BTreeSet<String>>,
    /// Every item event: time, type, item, category.
    pub item_events: Vec<(i64, &'static str, String, Option<String>)>,
    /// Per user, the items viewed.
    pub viewed: BTreeMap<String, BTreeSet<String>>,
    /// Per user, each item viewed or bought with the latest time.
    pub latest: BTreeMap<String, BTreeMap<String, i64>>,
    /// Per item, the sum of its ratings.
    pub rating_sums: BTreeMap<String, u64>,
    /// Per device, metric and hour: readings, min, max, sum.
    pub device_hours: BTreeMap<DeviceHour, Readings>,
    /// Events of every type per minute and per day.
    pub minutes: BTreeMap<i64, u64>,
    pub days: BTreeMap<i64, u64>,
}

impl Truth {
    /// Produces the stream `cfg` describes with `strata generate`, and adds it to the truth.
    pub fn produce(&mut self, common: &[String], cfg: GenConfig) {
        run_strata(&generate_args(common, &cfg));
        self.add(cfg);
    }

    /// Adds a generated stream: each event id counts once, malformed messages never.
    pub fn add(&mut self, cfg: GenConfig) {
        for g in Generator::new(cfg) {
            self.messages += 1;
            let e = match g.class {
                Class::Event(e) => e,
                Class::Copy(_) => {
                    self.copies += 1;
                    continue;
                }
                Class::Malformed(_) => {
                    self.malformed += 1;
                    continue;
                }
            };
            self.take(e);
        }
    }

    /// Adds an event the test produced itself, outside any generated stream (one message).
    pub fn add_event(&mut self, e: Event) {
        self.messages += 1;
        self.take(e);
    }

    /// Counts one accepted event in every truth it belongs to.
    fn take(&mut self, e: Event) {
        assert!(
            self.seen_ids.insert(e.id.clone(), ()).is_none(),
            "ids are unique"
        );
        self.events += 1;
        *self
            .minutes
            .entry(e.ts.div_euclid(60_000) * 60_000)
            .or_default() += 1;
        *self
            .days
            .entry(e.ts.div_euclid(DAY_MS) * DAY_MS)
            .or_default() += 1;
        let hour = e.ts.div_euclid(HOUR_MS) * HOUR_MS;
        let h = self.hours.entry(hour).or_default();
        *h.by_type.entry(e.type_name().to_string()).or_default() += 1;
        if let Kind::Purchase {
            qty, price_micros, ..
        } = &e.kind
        {
            h.revenue_micros += i128::from(*qty) * i128::from(*price_micros);
        }
        let item_ref = match &e.kind {
            Kind::View(r) | Kind::AddToCart(r) => Some(r),
            Kind::Purchase { item, .. } | Kind::Rating { item, .. } => Some(item),
            _ => None,
        };
        if let Some(r) = item_ref {
            self.item_events
                .push((e.ts, e.type_name(), r.item.clone(), r.category.clone()));
            if let Kind::Rating { rating, .. } = &e.kind {
                *self.rating_sums.entry(r.item.clone()).or_default() += u64::from(*rating);
            }
            if matches!(e.kind, Kind::View(_) | Kind::Purchase { .. }) {
                let t = self
                    .latest
                    .entry(r.user.clone())
                    .or_default()
                    .entry(r.item.clone())
                    .or_insert(e.ts);
                *t = (*t).max(e.ts);
            }
            if matches!(e.kind, Kind::View(_)) {
                self.viewed
                    .entry(r.user.clone())
                    .or_default()
                    .insert(r.item.clone());
            }
            *self.item_hours.entry((r.item.clone(), hour)).or_default() += 1;
            let day = e.ts.div_euclid(DAY_MS) * DAY_MS;
            self.item_day_users
                .entry((r.item.clone(), day))
                .or_default()
                .insert(r.user.clone());
            if matches!(e.kind, Kind::Purchase { .. }) {
                self.bought
                    .entry(r.user.clone())
                    .or_default()
                    .insert(r.item.clone());
            }
        }
        match &e.kind {
            Kind::View(r) => self.items.entry(r.item.clone()).or_default().view += 1,
            Kind::AddToCart(r) => self.items.entry(r.item.clone()).or_default().add_to_cart += 1,
            Kind::Purchase {
                item,
                qty,
                price_micros,
            } => {
                let t = self.items.entry(item.item.clone()).or_default();
                t.purchase += 1;
                t.quantity += u64::from(*qty);
                t.revenue_micros += i128::from(*qty) * i128::from(*price_micros);
            }
            Kind::Rating { item, .. } => {
                self.items.entry(item.item.clone()).or_default().rating += 1
            }
            Kind::Heartbeat { device } => {
                let d = self.device(device);
                d.heartbeats += 1;
                d.last_seen = d.last_seen.max(e.ts);
            }
            Kind::Reading {
                device,
                metric,
                value,
            } => {
                let w = self
                    .device_hours
                    .entry((device.clone(), metric.clone(), hour))
                    .or_insert((0, *value, *value, 0.0));
                w.0 += 1;
                w.1 = w.1.min(*value);
                w.2 = w.2.max(*value);
                w.3 += *value;
                let d = self.device(device);
                if d.readings == 0 {
                    d.min = *value;
                    d.max = *value;
                }
                d.readings += 1;
                d.min = d.min.min(*value);
                d.max = d.max.max(*value);
                d.sum += *value;
                d.last_seen = d.last_seen.max(e.ts);
            }
        }
    }

    /// Devices per status at `now`: ok, late, silent.
    fn status_counts(&self, now: i64) -> [u64; 3] {
        let mut n = [0; 3];
        for t in self.devices.values() {
            n[match status_at(t.last_seen, now) {
                "ok" => 0,
                "late" => 1,
                _ => 2,
            }] += 1;
        }
        n
    }

    fn device(&mut self, d: &str) -> &mut DeviceTruth {
        self.devices.entry(d.to_string()).or_insert(DeviceTruth {
            last_seen: i64::MIN,
            ..Default::default()
        })
    }

    /// Compares every item, every device and the top-items ranking with the API's answers.
    /// Returns the number of answers checked.
    pub fn check(&self, addr: &str) -> usize {
        let mut checked = 0;
        let mut diffs = Vec::new();
        for (item, t) in &self.items {
            let (status, v) = get_json(addr, &format!("/v1/items/{item}"));
            checked += 1;
            if status != 200 {
                diffs.push(format!("item {item}: status {status}: {v}"));
                continue;
            }
            let got = ItemTruth {
                view: v["counts"]["view"].as_u64().unwrap_or(u64::MAX),
                add_to_cart: v["counts"]["add_to_cart"].as_u64().unwrap_or(u64::MAX),
                purchase: v["counts"]["purchase"].as_u64().unwrap_or(u64::MAX),
                rating: v["counts"]["rating"].as_u64().unwrap_or(u64::MAX),
                quantity: v["quantity"].as_u64().unwrap_or(u64::MAX),
                revenue_micros: (v["revenue"].as_f64().unwrap_or(f64::NAN) * 1e6).round() as i128,
            };
            if &got != t {
                diffs.push(format!("item {item}: expected {t:?}, got {got:?}"));
            }
            let mean = self
                .rating_sums
                .get(item)
                .filter(|_| t.rating > 0)
                .map(|&sum| sum as f64 / t.rating as f64);
            if v["rating"]["mean"].as_f64() != mean {
                diffs.push(format!(
                    "item {item}: rating mean {mean:?}, got {}",
                    v["rating"]
                ));
            }
        }
        // The default bounds (`serve.metric-bounds`), as the tests run `strata` with them.
        let bounds = |metric: &str| match metric {
            "temp_c" => Some((-20.0, 60.0)),
            "humidity" => Some((0.0, 100.0)),
            _ => None,
        };
        for (device, t) in &self.devices {
            let before = strata_common::time::now_millis();
            let (status, v) = get_json(addr, &format!("/v1/devices/{device}/health?hours=168"));
            let after = strata_common::time::now_millis();
            checked += 1;
            // The status, unless it changed while the request ran.
            let (was, is) = (
                status_at(t.last_seen, before),
                status_at(t.last_seen, after),
            );
            if was == is && v["status"].as_str() != Some(was) {
                diffs.push(format!(
                    "device {device}: status {was}, got {}",
                    v["status"]
                ));
            }
            // Every hourly window of the last 168 hours, per metric.
            let from = after.div_euclid(HOUR_MS) * HOUR_MS - 167 * HOUR_MS;
            let mut want: Vec<WindowRow> = self
                .device_hours
                .range((device.clone(), String::new(), i64::MIN)..)
                .take_while(|((d, _, _), _)| d == device)
                .filter(|((_, _, h), _)| *h >= from)
                .map(|((_, m, h), &(n, min, max, sum))| {
                    let out = bounds(m).is_some_and(|(lo, hi)| min < lo || max > hi);
                    (m.clone(), *h, n, min, max, sum / n as f64, out)
                })
                .collect();
            want.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut got: Vec<WindowRow> = Vec::new();
            for (m, ws) in v["windows"]["metrics"].as_object().into_iter().flatten() {
                for w in ws.as_array().into_iter().flatten() {
                    got.push((
                        m.clone(),
                        w["start"]
                            .as_str()
                            .and_then(strata_common::time::parse_rfc3339)
                            .unwrap_or(i64::MIN),
                        w["count"].as_u64().unwrap_or(u64::MAX),
                        w["min"].as_f64().unwrap_or(f64::NAN),
                        w["max"].as_f64().unwrap_or(f64::NAN),
                        w["mean"].as_f64().unwrap_or(f64::NAN),
                        w["out_of_range"].as_bool().unwrap_or(false),
                    ));
                }
            }
            got.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
            let windows_ok = got.len() == want.len()
                && got.iter().zip(&want).all(|(g, w)| {
                    g.0 == w.0
                        && g.1 == w.1
                        && g.2 == w.2
                        && g.3 == w.3
                        && g.4 == w.4
                        && (g.5 - w.5).abs() <= 1e-6 * w.5.abs().max(1.0)
                        && g.6 == w.6
                });
            if !windows_ok {
                diffs.push(format!(
                    "device {device}: windows expected {want:?}, got {}",
                    v["windows"]
                ));
            }
            if status != 200 {
                diffs.push(format!("device {device}: status {status}: {v}"));
                continue;
            }
            let last_seen = v["last_seen"]
                .as_str()
                .and_then(strata_common::time::parse_rfc3339);
            let r = &v["readings"];
            let mean_ok = if t.readings == 0 {
                r["mean"].is_null()
            } else {
                let expected = t.sum / t.readings as f64;
                r["mean"]
                    .as_f64()
                    .is_some_and(|m| (m - expected).abs() <= 1e-6 * expected.abs().max(1.0))
            };
            let same = last_seen == Some(t.last_seen)
                && v["heartbeats"].as_u64() == Some(t.heartbeats)
                && r["count"].as_u64() == Some(t.readings)
                && (t.readings == 0
                    || (r["min"].as_f64() == Some(t.min) && r["max"].as_f64() == Some(t.max)))
                && mean_ok
                && ["ok", "late", "silent"].contains(&v["status"].as_str().unwrap_or(""));
            if !same {
                diffs.push(format!("device {device}: expected {t:?}, got {v}"));
            }
        }
        for kind in ["view", "purchase"] {
            let limit = 25;
            let (status, v) = get_json(
                addr,
                &format!("/v1/insights/top-items?type={kind}&limit={limit}"),
            );
            checked += 1;
            let mut expected: Vec<(String, u64)> = self
                .items
                .iter()
                .map(|(i, t)| (i.clone(), if kind == "view" { t.view } else { t.purchase }))
                .filter(|(_, c)| *c > 0)
                .collect();
            expected.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            expected.truncate(limit);
            let got = item_counts(&v["items"]);
            if status != 200 || got != expected {
                diffs.push(format!("top {kind}: expected {expected:?}, got {v}"));
            }
        }
        assert!(
            diffs.is_empty(),
            "{} of {checked} answers differ from the ground truth; first ones:\n{}",
            diffs.len(),
            diffs[..diffs.len().min(10)].join("\n")
        );
        checked
    }

    /// Compares the exact insights (hourly series, an item's series, co-occurrence counts) and
    /// the sketched ones (distinct users, within the stated error) with the ground truth.
    pub fn check_insights(&self, addr: &str) -> usize {
        let mut checked = 0;
        let (Some(&first), Some(&last)) = (self.hours.keys().next(), self.hours.keys().next_back())
        else {
            panic!("the ground truth has no events to check insights against");
        };
        assert!(!self.bought.is_empty(), "the ground truth has no purchases");
        let range = format!(
            "from={}&to={}",
            strata_common::time::format_rfc3339(first),
            strata_common::time::format_rfc3339(last)
        );
        for t in ["view", "purchase", "heartbeat", "reading"] {
            let (status, v) = get_json(
                addr,
                &format!("/v1/insights/timeseries?metric=events&type={t}&bucket=hour&{range}"),
            );
            assert_eq!(status, 200, "{v}");
            let got = series_points(&v);
            for (&hour, h) in &self.hours {
                let want = h.by_type.get(t).copied().unwrap_or(0) as f64;
                assert_eq!(
                    got.get(&hour).copied(),
                    Some(want),
                    "{t} events in hour {hour}: {v}"
                );
                checked += 1;
            }
        }
        let (_, v) = get_json(
            addr,
            &format!("/v1/insights/timeseries?metric=revenue&bucket=hour&{range}"),
        );
        let got = series_points(&v);
        for (&hour, h) in &self.hours {
            let micros = got.get(&hour).map(|r| (r * 1e6).round() as i128);
            assert_eq!(micros, Some(h.revenue_micros), "revenue in hour {hour}");
            checked += 1;
        }
        let (_, v) = get_json(
            addr,
            &format!("/v1/insights/timeseries?metric=events&item=i0&bucket=hour&{range}"),
        );
        let got = series_points(&v);
        for &hour in self.hours.keys() {
            let want = self
                .item_hours
                .get(&("i0".to_string(), hour))
                .copied()
                .unwrap_or(0) as f64;
            assert_eq!(
                got.get(&hour).copied(),
                Some(want),
                "i0 events in hour {hour}"
            );
            checked += 1;
        }
        // Co-occurrence by purchases, exactly.
        let co_checked = Self::check_co_occurrence(
            addr,
            "purchase",
            &self.bought,
            &["i0", "i1", "i2", "i3", "p-a"],
        );
        checked += co_checked;
        assert!(
            co_checked >= 4,
            "co-occurrence checked for {co_checked} items only"
        );
        // Distinct users of i0 per day, within the sketch's error.
        let days: Vec<i64> = self
            .item_day_users
            .keys()
            .filter(|(i, _)| i == "i0")
            .map(|(_, d)| *d)
            .collect();
        assert!(!days.is_empty(), "i0 has no events in the ground truth");
        if let (Some(&d0), Some(&d1)) = (days.first(), days.last()) {
            let (_, v) = get_json(
                addr,
                &format!(
                    "/v1/insights/timeseries?metric=distinct_users&item=i0&bucket=day&from={}&to={}",
                    strata_common::time::format_rfc3339(d0),
                    strata_common::time::format_rfc3339(d1)
                ),
            );
            let err = v["error_bound"]["relative_standard_error"]
                .as_f64()
                .expect("error bound");
            let got = series_points(&v);
            for d in days {
                let want = self.item_day_users[&("i0".to_string(), d)].len() as f64;
                let est = got.get(&d).copied().unwrap_or(-1.0);
                assert!(
                    (est - want).abs() <= 4.0 * err * want + 1.0,
                    "distinct users of i0 on {d}: {est} vs {want}"
                );
                checked += 1;
            }
        }
        checked += self.check_windows(addr);
        let before = strata_common::time::now_millis();
        let (_, v) = get_json(addr, "/v1/devices/health");
        let after = strata_common::time::now_millis();
        assert_eq!(
            v["devices"].as_u64(),
            Some(self.devices.len() as u64),
            "{v}"
        );
        let c = &v["counts"];
        let got = ["ok", "late", "silent"].map(|k| c[k].as_u64().unwrap_or(u64::MAX));
        assert_eq!(got.iter().sum::<u64>(), self.devices.len() as u64, "{v}");
        // The fleet's counts per status, unless a device changed status while the request ran.
        let want = self.status_counts(before);
        if want == self.status_counts(after) {
            assert_eq!(got, want, "devices per status (ok, late, silent): {v}");
        }
        checked + 1
    }

    /// Counts of one event type per item from `since` (event time) on, in `category` if given.
    fn counts_since(
        &self,
        event_type: &str,
        since: i64,
        category: Option<&str>,
    ) -> BTreeMap<&str, u64> {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for (ts, t, item, cat) in &self.item_events {
            if *t == event_type
                && *ts >= since
                && (category.is_none() || cat.as_deref() == category)
            {
                *counts.entry(item.as_str()).or_default() += 1;
            }
        }
        counts
    }

    /// GETs `path` at a moment whose minute (`1h` windows) and hour (longer ones) stay the same
    /// through the request, and returns that moment with the answer, so that the window the
    /// server used is known.
    fn get_in_one_minute(addr: &str, path: &str) -> (i64, Value) {
        loop {
            let before = strata_common::time::now_millis();
            let (status, v) = get_json(addr, path);
            let after = strata_common::time::now_millis();
            assert_eq!(status, 200, "{path}: {v}");
            if before.div_euclid(60_000) == after.div_euclid(60_000) {
                return (before, v);
            }
        }
    }

    /// The windowed and category top items, trending items, minute and day series, view-basis
    /// co-occurrence and users' recent items and exclusions, each against naive counts of the
    /// generated events. Windows end now and start at the first of their buckets (1h: the last 60
    /// minute buckets; 24h and 7d: the last 24 and 168 hour buckets), as the API documents.
    pub fn check_windows(&self, addr: &str) -> usize {
        let mut checked = 0;
        let start = |window: &str, now: i64| match window {
            "1h" => now.div_euclid(60_000) * 60_000 - 59 * 60_000,
            "24h" => now.div_euclid(HOUR_MS) * HOUR_MS - 23 * HOUR_MS,
            "7d" => now.div_euclid(HOUR_MS) * HOUR_MS - 167 * HOUR_MS,
            _ => i64::MIN,
        };
        let ranked = |counts: BTreeMap<&str, u64>| {
            let mut rows: Vec<(String, u64)> = counts
                .into_iter()
                .filter(|(_, c)| *c > 0)
                .map(|(i, c)| (i.to_string(), c))
                .collect();
            rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            rows.truncate(1000);
            rows
        };
        let mut categories: Vec<&str> = self
            .item_events
            .iter()
            .filter_map(|(_, _, _, c)| c.as_deref())
            .collect();
        categories.sort_unstable();
        categories.dedup();
        categories.truncate(2);
        for window in ["1h", "24h", "7d", "all"] {
            for t in ["view", "purchase"] {
                for category in std::iter::once(None).chain(categories.iter().map(|c| Some(*c))) {
                    let mut path =
                        format!("/v1/insights/top-items?window={window}&type={t}&limit=1000");
                    if let Some(c) = category {
                        path.push_str(&format!("&category={c}"));
                    }
                    let (now, v) = Self::get_in_one_minute(addr, &path);
                    let want = ranked(self.counts_since(t, start(window, now), category));
                    assert_eq!(item_counts(&v["items"]), want, "{path}");
                    checked += 1;
                }
            }
        }
        // Trending: the rate in the window against the rate in the rest of the baseline.
        for (window, baseline, hours, rest) in
            [("1h", "24h", 1.0, 23.0), ("24h", "7d", 24.0, 144.0)]
        {
            let path = format!(
                "/v1/insights/trending?window={window}&baseline={baseline}&type=view&min_support=2&limit=1000"
            );
            let (now, v) = Self::get_in_one_minute(addr, &path);
            let recent = self.counts_since("view", start(window, now), None);
            let base = self.counts_since("view", start(baseline, now), None);
            let mut want: Vec<(String, f64, u64, u64)> = recent
                .iter()
                .filter(|(_, &r)| r >= 2)
                .map(|(item, &r)| {
                    let before = base.get(item).copied().unwrap_or(r).saturating_sub(r);
                    let score = (r as f64 / hours) / ((before as f64 + 1.0) / rest);
                    (item.to_string(), score, r, before)
                })
                .collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            want.truncate(1000);
            let got: Vec<(String, f64, u64, u64)> = v["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|r| {
                            Some((
                                r["item"].as_str()?.to_string(),
                                r["score"].as_f64()?,
                                r["recent"].as_u64()?,
                                r["baseline"].as_u64()?,
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(got.len(), want.len(), "{path}: {v}");
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    g.0 == w.0 && g.2 == w.2 && g.3 == w.3 && (g.1 - w.1).abs() <= 1e-9 * w.1,
                    "{path}: got {g:?}, want {w:?}"
                );
            }
            checked += 1;
        }
        // Minute series over the last two hours of the stream, and the day series.
        for (bucket, buckets, span) in [
            ("minute", &self.minutes, 120 * 60_000),
            ("day", &self.days, 0),
        ] {
            let (Some(&first), Some(&last)) = (buckets.keys().next(), buckets.keys().next_back())
            else {
                continue;
            };
            let from = first.max(last - span);
            let (_, v) = get_json(
                addr,
                &format!(
                    "/v1/insights/timeseries?metric=events&bucket={bucket}&from={}&to={}",
                    strata_common::time::format_rfc3339(from),
                    strata_common::time::format_rfc3339(last)
                ),
            );
            let got = series_points(&v);
            let step = if bucket == "minute" { 60_000 } else { DAY_MS };
            let mut b = from;
            while b <= last {
                let want = buckets.get(&b).copied().unwrap_or(0) as f64;
                assert_eq!(got.get(&b).copied(), Some(want), "{bucket} {b}: {v}");
                checked += 1;
                b += step;
            }
        }
        // Co-occurrence by views, exactly.
        checked += Self::check_co_occurrence(addr, "view", &self.viewed, &["i0", "i1", "i2"]);
        // Users' recommendations: seeded by their 10 most recent items (views and purchases,
        // newest first, ties by name), never an item they bought; each candidate's score is the
        // sum over the seeds it co-occurs with (by views) of co / sqrt(viewers(seed) *
        // viewers(candidate)), counted here from the users' view sets.
        let mut viewers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (user, items) in &self.viewed {
            for i in items {
                viewers.entry(i.as_str()).or_default().push(user.as_str());
            }
        }
        for user in self.latest.keys().take(20) {
            let (status, v) = get_json(addr, &format!("/v1/recommendations/users/{user}?limit=50"));
            assert_eq!(status, 200, "{v}");
            let mut recent: Vec<(&String, i64)> =
                self.latest[user].iter().map(|(i, &t)| (i, t)).collect();
            recent.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            let want: Vec<&str> = recent.iter().take(10).map(|(i, _)| i.as_str()).collect();
            let got: Vec<&str> = v["recent_items"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            assert_eq!(got, want, "recent items of {user}: {v}");
            let bought = self.bought.get(user);
            for r in v["items"].as_array().into_iter().flatten() {
                let item = r["item"].as_str().unwrap_or_default();
                assert!(
                    bought.is_none_or(|b| !b.contains(item)),
                    "{user} is recommended {item}, which they bought: {v}"
                );
            }
            // Per candidate: its score and the seeds it came from.
            let mut scores: BTreeMap<&str, (f64, Vec<&str>)> = BTreeMap::new();
            for seed in &want {
                let Some(users) = viewers.get(seed) else {
                    continue;
                };
                let mut co: BTreeMap<&str, u64> = BTreeMap::new();
                for u in users {
                    for other in &self.viewed[*u] {
                        if other != seed {
                            *co.entry(other.as_str()).or_default() += 1;
                        }
                    }
                }
                for (other, n) in co {
                    let theirs = viewers.get(other).map_or(1, Vec::len).max(1);
                    let e = scores.entry(other).or_default();
                    e.0 += n as f64 / (users.len() as f64 * theirs as f64).sqrt();
                    e.1.push(seed);
                }
            }
            let mut expected: Vec<(&str, f64, Vec<&str>)> = scores
                .into_iter()
                .filter(|(i, _)| bought.is_none_or(|b| !b.contains(*i)))
                .map(|(i, (score, because))| (i, score, because))
                .collect();
            expected.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            expected.truncate(50);
            let got: Vec<(&str, f64, Vec<&str>)> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    (
                        r["item"].as_str().unwrap_or_default(),
                        r["score"].as_f64().unwrap_or(f64::NAN),
                        r["because"]
                            .as_array()
                            .map(|a| a.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default(),
                    )
                })
                .collect();
            let same = got.len() == expected.len()
                && got.iter().zip(&expected).all(|(g, w)| {
                    g.0 == w.0 && (g.1 - w.1).abs() <= 1e-9 * w.1.abs().max(1.0) && g.2 == w.2
                });
            assert!(
                same,
                "recommendations for {user}: expected {expected:?}, got {got:?}"
            );
            checked += 1;
        }
        checked
    }

    /// `/v1/recommendations/items/{item}?basis=BASIS` for each of `items` that has an audience
    /// in `sets` (user -> items of that basis): its audience, and for every other item the users
    /// it shares with it, exactly. Returns how many items were checked.
    fn check_co_occurrence(
        addr: &str,
        basis: &str,
        sets: &BTreeMap<String, BTreeSet<String>>,
        items: &[&str],
    ) -> usize {
        let mut audience: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (user, its) in sets {
            for i in its {
                audience.entry(i).or_default().insert(user);
            }
        }
        let mut checked = 0;
        for item in items {
            let Some(users) = audience.get(item) else {
                continue;
            };
            let mut want: BTreeMap<String, u64> = BTreeMap::new();
            for u in users {
                for other in &sets[*u] {
                    if other != item {
                        *want.entry(other.clone()).or_default() += 1;
                    }
                }
            }
            let (status, v) = get_json(
                addr,
                &format!("/v1/recommendations/items/{item}?basis={basis}&limit=1000"),
            );
            assert_eq!(status, 200, "{v}");
            assert_eq!(
                v["users"].as_u64(),
                Some(users.len() as u64),
                "audience of {item} by {basis}"
            );
            let got: BTreeMap<String, u64> = v["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|r| {
                            Some((
                                r["item"].as_str()?.to_string(),
                                r["co_occurrences"].as_u64()?,
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(got, want, "co-occurrence by {basis} with {item}");
            checked += 1;
        }
        checked
    }

    /// The speed layer's counters: every message accepted (copies included), rejected, or seen
    /// as a duplicate exactly once.
    pub fn check_counters(&self, addr: &str) {
        let (_, st) = get_json(addr, "/v1/status");
        let ev = &st["speed"]["events"];
        assert_eq!(ev["rejected"].as_u64(), Some(self.malformed), "{st}");
        assert_eq!(ev["duplicates"].as_u64(), Some(self.copies), "{st}");
        assert_eq!(
            ev["accepted"].as_u64(),
            Some(self.events + self.copies),
            "{st}"
        );
    }

    /// [`Truth::check`] and [`Truth::check_insights`], and with `patterns` (a stream produced
    /// with `--patterns` is in) [`Truth::check_patterns`].
    pub fn check_all(&self, addr: &str, patterns: bool) -> usize {
        let mut checked = self.check(addr) + self.check_insights(addr);
        if patterns {
            self.check_patterns(addr);
            checked += 4;
        }
        checked
    }

    /// Checks that the API recovers the planted patterns of `--patterns`.
    pub fn check_patterns(&self, addr: &str) {
        let (_, v) = get_json(addr, "/v1/recommendations/items/p-a?basis=purchase&limit=3");
        assert_eq!(v["items"][0]["item"], "p-b", "bought together: {v}");
        let (_, v) = get_json(
            addr,
            "/v1/insights/trending?window=1h&baseline=7d&type=view&limit=3",
        );
        assert_eq!(v["items"][0]["item"], "p-hot", "trending: {v}");
        let (_, v) = get_json(addr, "/v1/devices/health");
        assert_ne!(v["status"], "ok", "{v}");
        let silent: Vec<&str> = v["silent"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d["device"].as_str()).collect())
            .unwrap_or_default();
        assert!(silent.contains(&"p-quiet"), "silent devices: {v}");
        let (_, v) = get_json(addr, "/v1/devices/p-hot/health?hours=48");
        assert!(
            v["windows"]["out_of_range"].as_u64().unwrap_or(0) >= 1,
            "out-of-range readings: {v}"
        );
    }
}

/// Reads the dead-letter topic from the start until `expected` distinct source messages are seen
/// (or three minutes pass); checks that each letter carries a reason. Returns the distinct sources
/// and how many letters carried each code.
pub fn dead_letters(topic: &str, expected: u64) -> (BTreeSet<String>, BTreeMap<String, u64>) {
    dead_letters_at(&brokers(), topic, expected)
}

/// [`dead_letters`] on the broker at `brokers`.
pub fn dead_letters_at(
    brokers: &str,
    topic: &str,
    expected: u64,
) -> (BTreeSet<String>, BTreeMap<String, u64>) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-check"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("tpl");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut sources = BTreeSet::new();
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while (sources.len() as u64) < expected && Instant::now() < deadline {
        let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let headers = msg.headers().expect("dead letters carry headers");
        let (mut reason, mut source) = (None, None);
        for h in headers.iter() {
            let v = h.value.map(|v| String::from_utf8_lossy(v).to_string());
            match h.key {
                "strata-reason" => reason = v,
                "strata-source" => source = v,
                "strata-code" => *codes.entry(v.unwrap_or_default()).or_default() += 1,
                _ => {}
            }
        }
        let reason = reason.expect("a reason header");
        assert!(
            reason.contains(':') && reason.len() > 5,
            "reason {reason:?}"
        );
        sources.insert(source.expect("a source header"));
    }
    (sources, codes)
}

/// An Apache Kafka broker owned by one test, run through `scripts/broker.sh` (the same script
/// that runs the local broker for users) on a free port, restartable on the same data.
pub struct Broker {
    pub dir: PathBuf,
    pub port: u16,
    env: Vec<(String, String)>,
    running: bool,
}

impl Broker {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/broker.sh")
    }

    /// Starts a broker with its data in `dir`; `env` adds settings of `scripts/broker.sh`
    /// (`STRATA_BROKER_PROPERTIES`, `STRATA_BROKER_SCRAM`, ...).
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Broker {
        let mut b = Broker {
            dir: dir.to_path_buf(),
            port: free_port(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            running: false,
        };
        b.restart();
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn run(&self, cmd: &str) -> std::process::Output {
        let out = Command::new("bash")
            .arg(Self::script())
            .args([cmd, self.dir.to_str().expect("utf-8 path")])
            .env("STRATA_BROKER_PORT", self.port.to_string())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run scripts/broker.sh");
        assert!(
            out.status.success(),
            "scripts/broker.sh {cmd} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Starts it again on the same port and data, and waits until it is ready.
    pub fn restart(&mut self) {
        self.run("start");
        self.running = true;
    }

    /// A clean stop (SIGTERM and a controlled shutdown), as an operator restarting it would.
    pub fn stop(&mut self) {
        self.run("stop");
        self.running = false;
    }

    /// The broker's JVM, from the pid file `scripts/broker.sh` keeps.
    pub fn pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.dir.join("broker.pid")).expect("broker.pid");
        text.trim().parse().expect("a pid in broker.pid")
    }

    /// Sends `sig` (`-TERM`, `-KILL`, `-STOP`, `-CONT`) to the broker's JVM itself, without
    /// waiting for anything.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} the broker");
    }

    /// After a TERM or KILL sent with [`Broker::signal`]: waits until the JVM has exited.
    pub fn wait_gone(&mut self, timeout: Duration) {
        let pid = self.pid();
        wait_for("the broker to exit", timeout, || {
            (!alive(pid)).then_some(())
        });
        self.running = false;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.running {
            let _ = Command::new("bash")
                .arg(Self::script())
                .args(["stop", self.dir.to_str().unwrap_or_default()])
                .env("STRATA_BROKER_PORT", self.port.to_string())
                .output();
        }
    }
}
