//! Command-line flags, and how they become a [`Config`]: defaults < `--config` file <
//! `STRATA__SECTION__KEY` variables < flags (a flag counts only when given, on the command line or
//! through its own `STRATA_…` variable).

use std::ffi::OsString;
use std::io::Write;
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
    /// Show the effective configuration (defaults < --config file < STRATA__SECTION__KEY
    /// variables < flags) as TOML, with the admin key redacted; or only validate it.
    Config {
        #[command(flatten)]
        common: CommonArgs,
        /// Print the effective configuration as TOML (the default).
        #[arg(long)]
        print: bool,
        /// Only validate: exit 0 if the configuration is valid, 1 (naming the key) if not.
        #[arg(long, conflicts_with = "print")]
        check: bool,
    },
    /// Roll up heartbeats and readings past their age (`retention.*`) into hourly records,
    /// recompute and publish a version from the rollup, then delete the raw segments it
    /// replaced. Stop the batch layer first (it runs retention itself every
    /// `retention.every-secs`), or use --dry-run, which changes nothing.
    Retention {
        #[command(flatten)]
        common: CommonArgs,
        /// Show what would be rolled up and deleted, with sizes, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Take this instant (RFC 3339) as now, e.g. to preview a later rollup.
        #[arg(long)]
        as_of: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recompute every view from scratch (master dataset plus the Kafka tail) and diff it against
    /// what the serving layer merges. Exit status: 0 equal, 1 differences, 2 could not verify.
    Verify {
        #[command(flatten)]
        common: CommonArgs,
        /// The serving layer to check (needs its admin key: --admin-key or STRATA_ADMIN_KEY).
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// First wait (at most this long, e.g. `60s`) until the serving layer covers the topic's
        /// current end.
        #[arg(long, value_parser = parse_duration)]
        wait: Option<Duration>,
        /// Differences to print in full.
        #[arg(long, default_value_t = 20)]
        show: usize,
        /// PEM certificates to trust for an `https://` URL, e.g. a private CA's (default: the
        /// system's bundle, /etc/ssl/certs/ca-certificates.crt).
        #[arg(long)]
        ca_cert: Option<std::path::PathBuf>,
    },
}

/// Flags every layer shares. Each overrides its configuration key only when given (on the command
/// line or through its `STRATA_…` variable); otherwise the key comes from the `--config` file,
/// `STRATA__SECTION__KEY` variables or the default (see `strata config --print`).
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// TOML configuration file (see strata.example.toml).
    #[arg(long = "config", env = "STRATA_CONFIG", value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// Kafka bootstrap servers [key: kafka.brokers, default: 127.0.0.1:9092].
    #[arg(long, env = "STRATA_BROKERS")]
    pub brokers: Option<String>,
    /// The events topic (its dead-letter topic is `<topic>.dlq`) [key: kafka.topic, default:
    /// events].
    #[arg(long, env = "STRATA_TOPIC")]
    pub topic: Option<String>,
    /// Consumer group prefix [key: kafka.group, default: strata].
    #[arg(long, env = "STRATA_GROUP")]
    pub group: Option<String>,
    /// Partitions for topics Strata creates [key: kafka.partitions, default: 4].
    #[arg(long)]
    pub partitions: Option<i32>,
    /// `group`: partitions come from the consumer group (cooperative-sticky; several processes
    /// can share the topic); `all`:
    /// this process consumes every partition itself [key: kafka.assignment, default: group].
    #[arg(long, value_parser = |s: &str| s.parse::<strata_common::kafka::Assignment>())]
    pub assignment: Option<strata_common::kafka::Assignment>,
    /// Where all state lives; layers run as separate processes share it [key: data-dir, default:
    /// .data/strata].
    #[arg(long, env = "STRATA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Stop writing layers when the data directory has less free space than this, in MiB
    /// [key: min-free-mb, default: 256].
    #[arg(long)]
    pub min_free_mb: Option<u64>,
    /// HTTP listen address of the serving layer [key: serve.http, default: 127.0.0.1:8080].
    #[arg(long, env = "STRATA_HTTP")]
    pub http: Option<String>,
    /// Bearer key for the admin routes; empty for none [key: serve.admin-key].
    #[arg(long, env = "STRATA_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Bearer key for the read routes; empty for none (open) [key: serve.read-key].
    #[arg(long, env = "STRATA_READ_KEY", hide_env_values = true)]
    pub read_key: Option<String>,
    /// An origin allowed to call the API from a browser (CORS); repeat for more, `*` for any
    /// [key: serve.cors-origins].
    #[arg(long = "cors-origin")]
    pub cors_origins: Vec<String>,
    /// PEM certificate chain for HTTPS (with --tls-key) [key: serve.tls-cert].
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS [key: serve.tls-key].
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Offsets per speed-layer block; batch cutoffs are multiples of it. Every layer sharing a
    /// data directory must use the same value [key: handoff.block-size, default: 10000].
    #[arg(long)]
    pub block_size: Option<u64>,
    /// How long an event id is remembered for deduplication, in event time (e.g. `24h`) [key:
    /// dedupe.horizon-secs, default: 24h].
    #[arg(long, value_parser = parse_duration)]
    pub dedupe_horizon: Option<Duration>,
    /// A device is `late` after this long without an event [key: serve.late-after-secs,
    /// default: 2m].
    #[arg(long, value_parser = parse_duration)]
    pub late_after: Option<Duration>,
    /// A device is `silent` after this long without an event [key: serve.silent-after-secs,
    /// default: 10m].
    #[arg(long, value_parser = parse_duration)]
    pub silent_after: Option<Duration>,
    /// Expected range of a reading metric, `metric=min:max` (repeatable); device windows outside
    /// it are flagged. Adds to or replaces the configured ranges [key: serve.metric-bounds,
    /// defaults: temp_c=-20:60, humidity=0:100].
    #[arg(long = "metric-bounds", value_parser = parse_bounds)]
    pub metric_bounds: Vec<(String, f64, f64)>,
    /// Extra librdkafka property, `key=value` (repeatable), e.g. `security.protocol=SSL` [key:
    /// kafka.properties].
    #[arg(long = "kafka", value_parser = parse_kv)]
    pub kafka: Vec<(String, String)>,
}

impl CommonArgs {
    /// The configuration: defaults, the `--config` file, `STRATA__…` variables, then the flags
    /// given; checked.
    pub fn config(&self) -> anyhow::Result<Config> {
        self.config_with_env(std::env::vars_os())
    }

    /// [`CommonArgs::config`] with `env` in place of the process environment.
    pub fn config_with_env(
        &self,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> anyhow::Result<Config> {
        let mut c = Config::load(self.config_file.as_deref(), env)?;
        self.apply(&mut c);
        c.check()?;
        Ok(c)
    }

    /// Sets the keys whose flags were given.
    fn apply(&self, c: &mut Config) {
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = self.min_free_mb {
            c.min_free_mb = v;
        }
        if let Some(v) = &self.brokers {
            c.kafka.brokers = v.clone();
        }
        if let Some(v) = &self.topic {
            c.kafka.topic = v.clone();
        }
        if let Some(v) = &self.group {
            c.kafka.group = v.clone();
        }
        if let Some(v) = self.partitions {
            c.kafka.partitions = v;
        }
        if let Some(v) = self.assignment {
            c.kafka.assignment = v;
        }
        c.kafka.properties.extend(self.kafka.iter().cloned());
        if let Some(v) = &self.http {
            c.serve.http = v.clone();
        }
        if let Some(v) = &self.admin_key {
            c.serve.admin_key = Some(v.clone()).filter(|k| !k.is_empty());
        }
        if let Some(v) = &self.read_key {
            c.serve.read_key = Some(v.clone()).filter(|k| !k.is_empty());
        }
        if !self.cors_origins.is_empty() {
            c.serve.cors_origins = self.cors_origins.clone();
        }
        if let Some(v) = &self.tls_cert {
            c.serve.tls_cert = Some(v.clone());
        }
        if let Some(v) = &self.tls_key {
            c.serve.tls_key = Some(v.clone());
        }
        if let Some(v) = self.late_after {
            c.serve.late_after_secs = v.as_secs() as i64;
        }
        if let Some(v) = self.silent_after {
            c.serve.silent_after_secs = v.as_secs() as i64;
        }
        if let Some(v) = self.block_size {
            c.handoff.block_size = v;
        }
        for (metric, min, max) in &self.metric_bounds {
            c.serve.metric_bounds.insert(
                metric.clone(),
                strata_common::config::MetricBounds {
                    min: *min,
                    max: *max,
                },
            );
        }
        if let Some(v) = self.dedupe_horizon {
            c.dedupe.horizon_secs = v.as_secs() as i64;
        }
    }
}

/// `strata config`: prints the effective configuration as TOML (admin key redacted), or with
/// `check` only validates it. An invalid configuration is an error either way.
pub fn config_command(common: &CommonArgs, check: bool) -> anyhow::Result<()> {
    let cfg = common.config()?;
    let out = if check {
        "configuration is valid\n".to_string()
    } else {
        cfg.to_toml_redacted()?
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    Ok(())
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

    fn common(args: &[&str]) -> CommonArgs {
        let cli = Cli::try_parse_from(["strata", "config"].iter().chain(args)).expect("parses");
        let Command::Config { common, .. } = cli.command else {
            panic!("config")
        };
        common
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn only_given_flags_override() {
        // No flags, no file, no variables: exactly the defaults.
        let c = common(&[]).config_with_env(env(&[])).expect("defaults");
        assert_eq!(c, Config::default());
        // Flags beat STRATA__ variables; keys without a flag keep the variable's value.
        let c = common(&[
            "--brokers",
            "flag:9092",
            "--late-after",
            "1m",
            "--kafka",
            "client.id=flag",
            "--metric-bounds",
            "pressure=900:1100",
            "--admin-key",
            "",
        ])
        .config_with_env(env(&[
            ("STRATA__KAFKA__BROKERS", "env:9092"),
            ("STRATA__KAFKA__TOPIC", "env-topic"),
            ("STRATA__KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SSL"),
            ("STRATA__SERVE__ADMIN_KEY", "env-admin-key"),
            ("STRATA__SERVE__LATE_AFTER_SECS", "30"),
        ]))
        .expect("valid");
        assert_eq!(c.kafka.brokers, "flag:9092");
        assert_eq!(c.kafka.topic, "env-topic");
        assert_eq!(c.serve.late_after_secs, 60);
        assert_eq!(c.kafka.properties.len(), 2);
        assert_eq!(c.serve.metric_bounds.len(), 3);
        assert_eq!(c.serve.admin_key, None, "an empty --admin-key means none");
        // The merged configuration is checked, naming the key.
        let e = common(&["--late-after", "20m"])
            .config_with_env(env(&[]))
            .expect_err("late after silent")
            .to_string();
        assert!(e.contains("serve.silent-after-secs"), "{e}");
    }
}
