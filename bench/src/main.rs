//! `strata-bench`: the pieces of `scripts/bench.sh` that need a program: the raw-consume and
//! hello-world peers, the freshness probe, watching the speed state, triggering a batch run, and
//! writing the results file. Each measuring subcommand prints `key=value` lines on stdout and
//! progress on stderr.

mod ceiling;
mod compare;
mod fresh;
mod http;
mod kafka;
mod keys;
mod report;
mod retention;
mod soak;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "strata-bench", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Read a topic from the beginning to its end (as of the start) and discard every message:
    /// the peer of the speed layer's ingest.
    Consume {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        /// When the caller started this (ns since the epoch, `date +%s%N`); default: now.
        #[arg(long)]
        started_at_ns: Option<u128>,
    },
    /// The master dataset's bytes and the recompute's time before and after a retention rollup,
    /// over a dataset written directly (a share of old heartbeats and readings, the rest the
    /// generator's recent stream).
    Retention {
        /// A data directory that does not exist yet.
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Share of the events that are heartbeats and readings older than the rollup age.
        #[arg(long, default_value_t = 0.3)]
        old_share: f64,
    },
    /// The speed layer with the broker taken out: the same workers fed records in Kafka message
    /// form from a file (written once from the seeded generator when missing).
    SpeedCeiling {
        /// The records file: read if it exists, else written first.
        #[arg(long)]
        records: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Worker threads; 0: one per core (the default of `speed.workers`).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// A data directory that does not exist yet.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// The end offset (high watermark) of every partition, and their sum.
    EndOffsets {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
    },
    /// Wait until a consumer group's committed offsets reach the topic's end (the batch layer's
    /// archiver commits `<group>.<topic>.archive` as it archives).
    WaitGroup {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        group: String,
        #[arg(long, default_value_t = 900)]
        timeout_secs: u64,
    },
    /// Poll `GET /v1/status` until the speed offsets reach the topic's end (or `--until-sum`
    /// messages); prints the time from `--started-at-ns`.
    Watch {
        /// The serving layer (`strata serve` or `strata up`).
        #[arg(long)]
        url: String,
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        /// Wait for this many messages in all instead of the topic's end.
        #[arg(long)]
        until_sum: Option<i64>,
        #[arg(long)]
        started_at_ns: Option<u128>,
        #[arg(long, default_value_t = 20)]
        poll_ms: u64,
        #[arg(long, default_value_t = 900)]
        timeout_secs: u64,
        /// Fail as soon as this process has exited.
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, default_value = "watch")]
        label: String,
    },
    /// Produce events at a steady rate, each for a new item, and time how long sampled ones take
    /// to be visible at `GET /v1/items/{item}`.
    Freshness {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        url: String,
        /// Events per second.
        #[arg(long, default_value_t = 5_000)]
        rate: u64,
        /// Seconds of producing.
        #[arg(long, default_value_t = 30)]
        secs: u64,
        /// Probe one event in this many (each probe polls the serving layer: keep the polling
        /// small next to what is measured).
        #[arg(long, default_value_t = 250)]
        sample: u64,
        /// Shortest wait between polls of one probe, in ms (a probe waits a tenth of its age
        /// when that is longer): each measurement is within this or 10 % of the truth.
        #[arg(long, default_value_t = 5)]
        poll_ms: u64,
        /// Seconds after which a probe not visible yet counts as a timeout.
        #[arg(long, default_value_t = 30)]
        patience_secs: u64,
        /// The producer's linger.ms (librdkafka's default: 5).
        #[arg(long, default_value_t = 5)]
        linger_ms: u64,
    },
    /// A steady query load for a long span at a fraction of the measured maximum, sampled every
    /// interval: latency, rate, errors and the server's resident memory.
    Soak(soak::SoakArgs),
    /// Request a batch recompute (`POST /v1/admin/batch`) and wait until it is published.
    Batch {
        #[arg(long)]
        url: String,
        #[arg(long, env = "STRATA_ADMIN_KEY", hide_env_values = true)]
        admin_key: String,
        #[arg(long, default_value_t = 900)]
        timeout_secs: u64,
    },
    /// A bare warp hello-world server on a multi-threaded tokio runtime, as the serving layer
    /// runs: the peer of the HTTP API.
    Hello {
        #[arg(long, default_value = "127.0.0.1:8089")]
        addr: String,
    },
    /// A TCP port free on 127.0.0.1 right now.
    FreePort,
    /// What `strata generate` with these flags produces, counted from the generator itself:
    /// messages, new events, copies and malformed messages (the truth of the hostile run).
    GenCounts {
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 0.005)]
        malformed_rate: f64,
    },
    /// Count the keys of a stopped speed layer's state (view keys of every block, remembered
    /// event ids).
    CountKeys {
        #[arg(long)]
        speed_dir: PathBuf,
    },
    /// Check DuckDB's aggregates (the JSON `bench/duckdb_views.py` writes) against the batch
    /// version published in a data directory; exit non-zero on any difference.
    CompareBatch {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        duckdb: PathBuf,
    },
    /// Write the results file from `name value unit [run,run,...]` and `check name ok|fail
    /// detail` lines.
    Report {
        #[arg(long)]
        lines: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// `key=value` facts about the run (repeatable).
        #[arg(long = "meta", value_parser = parse_kv)]
        meta: Vec<(String, String)>,
    },
}

fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// The `key=value` lines a subcommand prints.
#[derive(Default)]
pub struct Out {
    lines: Vec<String>,
}

impl Out {
    pub fn num(&mut self, key: &str, v: f64) {
        self.lines.push(format!("{key}={v}"));
    }
    pub fn text(&mut self, key: &str, v: &str) {
        self.lines.push(format!("{key}={v}"));
    }
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Seconds from `started_at_ns` (ns since the epoch) to now.
pub fn elapsed_since(started_at_ns: u128) -> f64 {
    now_ns().saturating_sub(started_at_ns) as f64 / 1e9
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // The flavour the serving layer runs on (strata/src/main.rs).
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli, out: &mut Out) -> Result<()> {
    match cli.command {
        Cmd::Consume {
            brokers,
            topic,
            started_at_ns,
        } => kafka::consume(&brokers, &topic, started_at_ns.unwrap_or_else(now_ns), out),
        Cmd::SpeedCeiling {
            records,
            events,
            seed,
            partitions,
            workers,
            data_dir,
        } => ceiling::run(
            ceiling::Args {
                records: &records,
                events,
                seed,
                partitions,
                workers,
                data_dir: &data_dir,
            },
            out,
        ),
        Cmd::EndOffsets { brokers, topic } => {
            let ends = kafka::end_offsets(&brokers, &topic)?;
            for (p, o) in &ends {
                out.num(&format!("partition.{p}"), *o as f64);
            }
            out.num("total", ends.values().sum::<i64>() as f64);
            Ok(())
        }
        Cmd::WaitGroup {
            brokers,
            topic,
            group,
            timeout_secs,
        } => kafka::wait_group(
            &brokers,
            &topic,
            &group,
            Duration::from_secs(timeout_secs),
            out,
        ),
        Cmd::Watch {
            url,
            brokers,
            topic,
            until_sum,
            started_at_ns,
            poll_ms,
            timeout_secs,
            pid,
            label,
        } => {
            let started_at_ns = started_at_ns.unwrap_or_else(now_ns);
            let ends = match until_sum {
                Some(_) => None,
                None => Some(kafka::end_offsets(&brokers, &topic)?),
            };
            runtime()?.block_on(watch::watch(
                watch::WatchArgs {
                    url,
                    ends,
                    until_sum,
                    started_at_ns,
                    poll: Duration::from_millis(poll_ms.max(1)),
                    timeout: Duration::from_secs(timeout_secs),
                    pid,
                    label,
                },
                out,
            ))
        }
        Cmd::Freshness {
            brokers,
            topic,
            url,
            rate,
            secs,
            sample,
            poll_ms,
            patience_secs,
            linger_ms,
        } => {
            if rate == 0 || secs == 0 {
                bail!("--rate and --secs must be positive");
            }
            runtime()?.block_on(fresh::run(
                fresh::FreshArgs {
                    brokers,
                    topic,
                    url,
                    rate,
                    secs,
                    sample,
                    poll: Duration::from_millis(poll_ms.max(1)),
                    patience: Duration::from_secs(patience_secs),
                    linger_ms,
                },
                out,
            ))
        }
        Cmd::Soak(args) => runtime()?.block_on(soak::run(args, out)),
        Cmd::Batch {
            url,
            admin_key,
            timeout_secs,
        } => runtime()?.block_on(batch(
            &url,
            &admin_key,
            Duration::from_secs(timeout_secs),
            out,
        )),
        Cmd::Hello { addr } => runtime()?.block_on(hello(&addr)),
        Cmd::FreePort => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("finding a free port")?
                .port();
            out.num("port", f64::from(port));
            Ok(())
        }
        Cmd::GenCounts {
            seed,
            count,
            malformed_rate,
        } => {
            let mut cfg = strata_common::generate::GenConfig::new(
                seed,
                count,
                strata_common::time::now_millis(),
            );
            cfg.malformed_rate = malformed_rate;
            let (mut events, mut copies, mut malformed) = (0u64, 0u64, 0u64);
            for g in strata_common::generate::Generator::new(cfg) {
                match g.class {
                    strata_common::generate::Class::Event(_) => events += 1,
                    strata_common::generate::Class::Copy(_) => copies += 1,
                    strata_common::generate::Class::Malformed(_) => malformed += 1,
                }
            }
            out.num("messages", (events + copies + malformed) as f64);
            out.num("events", events as f64);
            out.num("copies", copies as f64);
            out.num("malformed", malformed as f64);
            Ok(())
        }
        Cmd::CountKeys { speed_dir } => keys::run(&speed_dir, out),
        Cmd::Retention {
            data_dir,
            events,
            old_share,
        } => retention::run(&data_dir, events, old_share, out),
        Cmd::CompareBatch { data_dir, duckdb } => compare::run(&data_dir, &duckdb, out),
        Cmd::Report {
            lines,
            out: path,
            meta,
        } => report::write(&lines, &path, &meta),
    }
}

/// Requests a recompute and waits for its record to say `published`.
async fn batch(url: &str, key: &str, timeout: Duration, out: &mut Out) -> Result<()> {
    let started = std::time::Instant::now();
    let mut client = http::Client::new(url);
    let r = client.request("POST", "/v1/admin/batch", Some(key)).await?;
    if r.status != 202 {
        bail!(
            "POST /v1/admin/batch answered {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
    }
    let id = r.json()?["run_id"]
        .as_str()
        .map(str::to_string)
        .context("no run_id in the answer")?;
    let mut last_log = std::time::Instant::now();
    loop {
        let r = client
            .request("GET", &format!("/v1/admin/batch/{id}"), Some(key))
            .await?;
        let v = r.json()?;
        match v["state"].as_str() {
            Some("published") => {
                out.num("secs", started.elapsed().as_secs_f64());
                out.num("version", v["version"].as_f64().unwrap_or(-1.0));
                out.num("events", v["events"].as_f64().unwrap_or(-1.0));
                return Ok(());
            }
            Some("failed") => bail!("batch run {id} failed: {}", v["error"]),
            _ => {}
        }
        if started.elapsed() >= timeout {
            bail!("batch run {id} not published after {timeout:?}: {v}");
        }
        if last_log.elapsed() >= Duration::from_secs(2) {
            eprintln!("[batch] run {id}: {} {}", v["state"], v["progress"]);
            last_log = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Serves `Hello, World!` on every path, with the serving layer's plain-HTTP setup
/// (serving-layer/src/server.rs): warp over a bound tokio listener.
async fn hello(addr: &str) -> Result<()> {
    use warp::Filter;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("[hello] listening on {}", listener.local_addr()?);
    let routes = warp::any().map(|| "Hello, World!");
    warp::serve(routes).incoming(listener).run().await;
    Ok(())
}

/// mimalloc rather than glibc's malloc: see the workspace manifest.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    strata_common::process::set_up();
    let cli = Cli::parse();
    let mut out = Out::default();
    match run(cli, &mut out) {
        Ok(()) => {
            for l in &out.lines {
                println!("{l}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
