//! Command-line flags, and how they become a [`Config`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use strata_common::config::Config;

/// Strata: a Lambda-architecture data platform. Events in Kafka; a speed layer (RocksDB), a batch
/// layer (master dataset, parallel recompute) and a serving layer (HTTP) that merges them exactly.
#[derive(Parser, Debug)]
#[command(name = "strata", version, about, long_about = None)]
pub struct Cli {
    /// Log format: `text` or `json`. Log level comes from RUST_LOG (default `info`).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run all three layers in one process (single machine). Creates the topic and its
    /// dead-letter topic when missing.
    Up {
        #[command(flatten)]
        common: CommonArgs,
        /// Recompute the batch views this often (e.g. `15m`, `30s`); on demand only if unset.
        #[arg(long, value_parser = parse_duration)]
        batch_every: Option<Duration>,
    },
    /// Run the speed layer: consume in real time, keep incremental views in RocksDB.
    Speed {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Run the batch layer: archive into the master dataset and recompute the views.
    Batch {
        #[command(flatten)]
        common: CommonArgs,
        /// Archive up to the topic's current end, recompute once, and exit.
        #[arg(long, conflicts_with = "every")]
        once: bool,
        /// Recompute this often (e.g. `10m`); with neither flag, only on demand.
        #[arg(long, value_parser = parse_duration)]
        every: Option<Duration>,
    },
    /// Run the serving layer (HTTP API) over the data directory the other layers write.
    Serve {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Produce a seeded, realistic event stream to the topic.
    Generate {
        #[command(flatten)]
        common: CommonArgs,
        /// Messages to produce (copies and malformed ones included).
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Seed: the same seed and count give the same stream.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Messages per second; 0 for as fast as possible.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Event time covered by the stream, ending now (e.g. `2h`).
        #[arg(long, value_parser = parse_duration, default_value = "2h")]
        span: Duration,
        /// Event time of the first event (RFC 3339); default: now minus the span.
        #[arg(long)]
        start: Option<String>,
        /// Share of messages that are malformed (0 to 1).
        #[arg(long, default_value_t = 0.005)]
        malformed_rate: f64,
        /// Plant known patterns: p-a bought with p-b, a jump in p-hot views, device p-quiet
        /// going silent, device p-hot reading out of range.
        #[arg(long)]
        patterns: bool,
    },
}

/// Flags every layer shares. Environment variables give defaults; flags win.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "STRATA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// The events topic (its dead-letter topic is `<topic>.dlq`).
    #[arg(long, env = "STRATA_TOPIC", default_value = "events")]
    pub topic: String,
    /// Consumer group prefix.
    #[arg(long, env = "STRATA_GROUP", default_value = "strata")]
    pub group: String,
    /// Partitions for topics Strata creates.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// `all`: this process consumes every partition, resuming at once after a restart; `group`:
    /// partitions come from the consumer group (several processes sharing the topic).
    #[arg(long, default_value = "all", value_parser = ["all", "group"])]
    pub assignment: String,
    /// Where all state lives; layers run as separate processes share it.
    #[arg(long, env = "STRATA_DATA_DIR", default_value = ".data/strata")]
    pub data_dir: PathBuf,
    /// HTTP listen address of the serving layer.
    #[arg(long, env = "STRATA_HTTP", default_value = "127.0.0.1:8080")]
    pub http: String,
    /// Bearer key for the admin routes.
    #[arg(long, env = "STRATA_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Offsets per speed-layer block; batch cutoffs are multiples of it. Every layer sharing a
    /// data directory must use the same value.
    #[arg(long, default_value_t = 10_000)]
    pub block_size: u64,
    /// How long an event id is remembered for deduplication, in event time (e.g. `24h`).
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub dedupe_horizon: Duration,
    /// A device is `late` after this long without an event.
    #[arg(long, value_parser = parse_duration, default_value = "2m")]
    pub late_after: Duration,
    /// A device is `silent` after this long without an event.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub silent_after: Duration,
    /// Expected range of a reading metric, `metric=min:max` (repeatable); device windows outside
    /// it are flagged. Defaults: temp_c=-20:60, humidity=0:100.
    #[arg(long = "metric-bounds", value_parser = parse_bounds)]
    pub metric_bounds: Vec<(String, f64, f64)>,
    /// Extra librdkafka property, `key=value` (repeatable), e.g. `security.protocol=SSL`.
    #[arg(long = "kafka", value_parser = parse_kv)]
    pub kafka: Vec<(String, String)>,
}

impl CommonArgs {
    /// The configuration these flags describe, checked.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut c = Config {
            data_dir: self.data_dir.clone(),
            ..Config::default()
        };
        c.kafka.brokers = self.brokers.clone();
        c.kafka.topic = self.topic.clone();
        c.kafka.group = self.group.clone();
        c.kafka.partitions = self.partitions;
        c.kafka.assignment = if self.assignment == "group" {
            strata_common::kafka::Assignment::Group
        } else {
            strata_common::kafka::Assignment::All
        };
        c.kafka.properties = self.kafka.iter().cloned().collect();
        c.serve.http = self.http.clone();
        c.serve.admin_key = self.admin_key.clone().filter(|k| !k.is_empty());
        c.serve.late_after_secs = self.late_after.as_secs() as i64;
        c.serve.silent_after_secs = self.silent_after.as_secs() as i64;
        c.handoff.block_size = self.block_size;
        for (metric, min, max) in &self.metric_bounds {
            c.serve.metric_bounds.insert(
                metric.clone(),
                strata_common::config::MetricBounds {
                    min: *min,
                    max: *max,
                },
            );
        }
        c.dedupe.horizon_secs = self.dedupe_horizon.as_secs() as i64;
        c.check()?;
        Ok(c)
    }
}

/// Parses `500ms`, `30s`, `15m`, `2h`, `1d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 30s, 15m or 2h"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n * 1_000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ))
        }
    };
    Ok(Duration::from_millis(ms))
}

fn parse_bounds(s: &str) -> Result<(String, f64, f64), String> {
    let err = || format!("{s:?} is not metric=min:max, e.g. temp_c=-20:60");
    let (metric, range) = s.split_once('=').ok_or_else(err)?;
    let (min, max) = range.split_once(':').ok_or_else(err)?;
    let min: f64 = min.trim().parse().map_err(|_| err())?;
    let max: f64 = max.trim().parse().map_err(|_| err())?;
    Ok((metric.trim().to_string(), min, max))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("42"), Ok(Duration::from_secs(42)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert_eq!(
            parse_bounds("temp_c=-20:60"),
            Ok(("temp_c".into(), -20.0, 60.0))
        );
        assert!(parse_bounds("temp_c=hot").is_err());
    }

    #[test]
    fn bad_flags_name_the_key() {
        let cli = Cli::try_parse_from(["strata", "serve", "--http", "nowhere"]).expect("parses");
        let Command::Serve { common } = cli.command else {
            panic!("serve")
        };
        let e = common.config().expect_err("bad address").to_string();
        assert!(e.contains("serve.http"), "{e}");
    }
}
