//! Typed configuration shared by every layer, with documented defaults.
//!
//! Each field has a default. [`Config::load`] layers a TOML file and `STRATA__SECTION__KEY`
//! environment variables over the defaults (the `strata` command then applies its flags), rejecting
//! unknown keys and wrongly typed values with the full key path and where it came from.
//! [`Config::check`] rejects bad values with the name of the key at fault.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dedupe::Dedupe;
use crate::event::Validation;
use crate::{Error, Result};

/// Everything a Strata process needs to know.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Config {
    /// Where all state lives: speed state, master dataset, batch versions.
    pub data_dir: PathBuf,
    /// The speed and batch layers stop with an error, before writing, when the data directory's
    /// file system has less than this many MiB free (or is read-only).
    pub min_free_mb: u64,
    /// After SIGINT or SIGTERM, the most seconds a process spends stopping (state written,
    /// Kafka clients closed) before it exits anyway, with exit code 3; a second signal exits at
    /// once (130). Nothing is lost either way: a restart resumes at the stored offsets.
    pub shutdown_timeout_secs: u64,
    pub kafka: KafkaConfig,
    pub validation: Validation,
    pub dedupe: DedupeConfig,
    pub handoff: HandoffConfig,
    pub speed: SpeedConfig,
    pub batch: BatchConfig,
    pub serve: ServeConfig,
    pub retention: RetentionConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    pub brokers: String,
    /// The events topic; its dead-letter topic is `<topic>.dlq`.
    pub topic: String,
    /// Consumer group prefix: the speed layer uses `<group>.<topic>.speed`, the archiver
    /// `<group>.<topic>.archive`, so pipelines on different topics never share a group.
    pub group: String,
    /// Partitions for topics Strata creates.
    pub partitions: i32,
    /// `group` (default): partitions come from the consumer group, so several processes can
    /// share the topic; `all`: this process takes every partition itself.
    pub assignment: Assignment,
    /// With `assignment = group`: each consumer joins as a static member, its
    /// `group.instance.id` kept in its state directory, so that a restarted process takes its
    /// partitions back at once instead of waiting for its dead predecessor's session to expire
    /// (`session.timeout.ms`, 10 s); a process stopped for good then releases its partitions
    /// after that timeout rather than at once.
    pub static_membership: bool,
    /// At a record batch that cannot be decoded (corrupt, or an unknown codec): `stall` (default)
    /// waits there and reports the partition; `skip` passes over the undecodable records,
    /// recording the range in the dead-letter topic and the state.
    pub undecodable: Policy,
    /// Extra librdkafka properties passed through unchanged (e.g. `security.protocol`).
    pub properties: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DedupeConfig {
    /// How long, in event time, an event id is remembered.
    pub horizon_secs: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct HandoffConfig {
    /// Offsets per speed-layer block; batch cutoffs are multiples of it.
    pub block_size: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SpeedConfig {
    /// Longest time folded events wait before being written (with their offsets) to RocksDB
    /// while messages keep coming; when the consumer runs dry they are written at once, but
    /// not more often than every fifth of this.
    pub flush_interval_ms: u64,
    /// Most events folded in memory before a write.
    pub flush_max_events: usize,
    /// Worker threads that decode, validate, dedupe, fold and write, each owning the partitions
    /// `p % workers` (their state and offsets in writes of its own); 0: one per core.
    pub workers: usize,
    /// Listen address of this instance's endpoint for serving layers that mirror several speed
    /// instances of one consumer group (`serve.speed = "cluster"`); unset: none, and the
    /// instance is not announced in `<topic>.members`.
    pub http: Option<String>,
    /// The URL serving layers reach that endpoint at; unset: `http://` and `speed.http`.
    pub advertise: Option<String>,
    /// Where published batch versions are read from, to drop the speed blocks they cover: the
    /// archiver's data directory (on shared storage) for an instance on another host; unset:
    /// the data directory.
    pub batch_dir: Option<PathBuf>,
}

impl SpeedConfig {
    /// The number of workers: `workers`, or one per core when it is 0.
    pub fn workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct BatchConfig {
    /// Recompute every this many seconds; `None` only on demand.
    pub every_secs: Option<u64>,
    /// Most events in one master-dataset segment.
    pub segment_max_events: usize,
    /// Longest a segment stays open before it is written, in milliseconds.
    pub segment_max_age_ms: u64,
    /// Published versions kept on disk.
    pub keep_versions: usize,
    /// What runs the recompute ([`Engine`]): `local` (rayon, in this process), `datafusion`
    /// (Apache DataFusion, in the `strata-engine` process) or a Ballista scheduler's URL
    /// (`df://host:port`: the recompute runs on that cluster's executors).
    pub engine: String,
}

impl BatchConfig {
    /// The engine `batch.engine` names; the error names the key.
    pub fn engine(&self) -> Result<Engine> {
        self.engine
            .parse()
            .map_err(|e: String| bad("batch.engine", e))
    }
}

/// What runs a batch recompute (`batch.engine`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Rayon's pool in the batch layer's own process.
    Local,
    /// Apache DataFusion in the `strata-engine` process, on this host's cores.
    DataFusion,
    /// A Ballista cluster: the scheduler's `df://host:port`.
    Ballista(String),
}

impl std::str::FromStr for Engine {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "local" => Ok(Engine::Local),
            "datafusion" => Ok(Engine::DataFusion),
            url => {
                let addr = url.strip_prefix("df://").ok_or_else(|| {
                    format!("{url:?} is none of \"local\", \"datafusion\" or a Ballista scheduler's \"df://host:port\"")
                })?;
                let (host, port) = addr
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{url:?} names no port (df://host:port)"))?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(format!("{url:?} is not df://host:port"));
                }
                Ok(Engine::Ballista(url.to_string()))
            }
        }
    }
}

/// What the master dataset and the batch versions keep (`common/src/retention.rs`,
/// `batch-layer/src/retention.rs`). Only device events (heartbeats, readings) can be rolled up;
/// business events (views, carts, purchases, ratings) are always kept raw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct RetentionConfig {
    pub heartbeat: TypeRetention,
    pub reading: TypeRetention,
    /// Minute buckets (series and item series) older than this many days are left out of each
    /// batch version, and queries for them answer "beyond retention"; hours and days are kept.
    /// 0: minute buckets are kept forever.
    pub minute_series_days: u32,
    /// A continuously running batch layer rolls up what has aged at most this often (then
    /// recomputes, publishes and deletes the raw files the rollup replaced).
    pub every_secs: u64,
    /// Start-up warns when the topic's `retention.ms` is shorter than `batch.every-secs` plus
    /// this: Kafka must keep everything past the newest batch version's cutoffs.
    pub kafka_margin_secs: u64,
}

/// Retention of one device event type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct TypeRetention {
    /// Raw events older than this many days (event time, below the newest batch version's
    /// cutoffs) are rolled up into one record per device, metric and hour; 0 keeps them raw.
    pub rollup_after_days: u32,
}

impl RetentionConfig {
    /// The days after which events of `event_type` are rolled up, if they are.
    pub fn rollup_after_days(&self, event_type: &str) -> Option<u32> {
        let days = match event_type {
            "heartbeat" => self.heartbeat.rollup_after_days,
            "reading" => self.reading.rollup_after_days,
            _ => 0,
        };
        (days > 0).then_some(days)
    }

    /// Whether anything is ever rolled up.
    pub fn rolls_up(&self) -> bool {
        self.heartbeat.rollup_after_days > 0 || self.reading.rollup_after_days > 0
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            heartbeat: TypeRetention {
                rollup_after_days: 30,
            },
            reading: TypeRetention {
                rollup_after_days: 30,
            },
            minute_series_days: 0,
            every_secs: 3_600,
            kafka_margin_secs: 3_600,
        }
    }
}

impl Default for TypeRetention {
    fn default() -> Self {
        TypeRetention {
            rollup_after_days: 30,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ServeConfig {
    /// Listen address of the HTTP API.
    pub http: String,
    /// Bearer key for `/v1/admin/*`; admin routes answer 401 without it, 503 if none is set.
    pub admin_key: Option<String>,
    /// Bearer key the read routes (`/v1/*` but admin and the OpenAPI document) need when set; the
    /// admin key is accepted too. Unset: read routes are open.
    pub read_key: Option<String>,
    /// Origins allowed to call the API from a browser (CORS), e.g. `https://app.example.com`;
    /// `*` allows any. Empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// PEM certificate chain: with `tls-key`, the API is served over HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls-cert`.
    pub tls_key: Option<PathBuf>,
    /// A device is `late` after this many seconds without an event.
    pub late_after_secs: i64,
    /// A device is `silent` after this many seconds without an event.
    pub silent_after_secs: i64,
    /// Largest `limit` a query may ask for.
    pub max_limit: usize,
    /// Rendered answers kept while the state they were computed from stands (same batch
    /// version, same speed writes; same second for answers that read the clock), 64 MiB at
    /// most; 0 computes every answer afresh.
    pub answer_cache: usize,
    /// MiB of co-occurrence counts kept once counted: an eighth for each of the four row memos
    /// (per basis, the batch version's and the finished speed blocks'), half for item
    /// recommendations' ranked rows per state. 0 keeps none (each is counted when asked).
    pub memo_mb: usize,
    /// Finished speed blocks merged into one file (a run) for point reads, so that reading a
    /// key looks in one run per this many blocks instead of in every block past the batch
    /// cutoffs; 0 reads every block.
    pub run_blocks: u64,
    /// Expected range of each reading metric; device windows outside it are flagged.
    pub metric_bounds: BTreeMap<String, MetricBounds>,
    /// Where `strata serve` reads the speed tail: `local`, the speed layer's state under the
    /// data directory; `cluster`, a mirror pulled from the speed instances announced in
    /// `<topic>.members` (each with `speed.http` set).
    pub speed: SpeedSource,
}

/// Where the serving layer reads the speed tail (`serve.speed`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpeedSource {
    #[default]
    Local,
    Cluster,
}

/// The expected range of one reading metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricBounds {
    pub min: f64,
    pub max: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(".data/strata"),
            min_free_mb: 256,
            shutdown_timeout_secs: 10,
            kafka: KafkaConfig::default(),
            validation: Validation::default(),
            dedupe: DedupeConfig::default(),
            handoff: HandoffConfig::default(),
            speed: SpeedConfig::default(),
            batch: BatchConfig::default(),
            serve: ServeConfig::default(),
            retention: RetentionConfig::default(),
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic: "events".into(),
            group: "strata".into(),
            partitions: 4,
            assignment: Assignment::Group,
            static_membership: true,
            undecodable: Policy::Stall,
            properties: BTreeMap::new(),
        }
    }
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig {
            horizon_secs: 24 * 3600,
        }
    }
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig { block_size: 10_000 }
    }
}

impl Default for SpeedConfig {
    fn default() -> Self {
        SpeedConfig {
            flush_interval_ms: 100,
            flush_max_events: 20_000,
            workers: 0,
            http: None,
            advertise: None,
            batch_dir: None,
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            every_secs: None,
            segment_max_events: 100_000,
            segment_max_age_ms: 1_000,
            keep_versions: 2,
            engine: "local".into(),
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            http: "127.0.0.1:8080".into(),
            admin_key: None,
            read_key: None,
            cors_origins: Vec::new(),
            tls_cert: None,
            tls_key: None,
            late_after_secs: 120,
            silent_after_secs: 600,
            max_limit: 1_000,
            answer_cache: 10_000,
            memo_mb: 96,
            run_blocks: 8,
            speed: SpeedSource::Local,
            metric_bounds: BTreeMap::from([
                (
                    "temp_c".to_string(),
                    MetricBounds {
                        min: -20.0,
                        max: 60.0,
                    },
                ),
                (
                    "humidity".to_string(),
                    MetricBounds {
                        min: 0.0,
                        max: 100.0,
                    },
                ),
            ]),
        }
    }
}

fn bad(key: &str, reason: impl Into<String>) -> Error {
    Error::Config {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// Checks every value; the error names the key at fault.
    pub fn check(&self) -> Result<()> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(bad("kafka.brokers", "must name at least one broker"));
        }
        if self.kafka.topic.trim().is_empty() {
            return Err(bad("kafka.topic", "must not be empty"));
        }
        if !(1..=10_000).contains(&self.kafka.partitions) {
            return Err(bad("kafka.partitions", "must be between 1 and 10000"));
        }
        if self.dedupe.horizon_secs < 0 {
            return Err(bad("dedupe.horizon-secs", "must not be negative"));
        }
        if self.handoff.block_size == 0 {
            return Err(bad("handoff.block-size", "must be positive"));
        }
        if self.shutdown_timeout_secs == 0 {
            return Err(bad("shutdown-timeout-secs", "must be at least 1"));
        }
        if self.speed.workers > 1024 {
            return Err(bad(
                "speed.workers",
                "must be at most 1024 (0: one per core)",
            ));
        }
        if self.speed.flush_max_events == 0 {
            return Err(bad("speed.flush-max-events", "must be positive"));
        }
        if self.batch.segment_max_events == 0 {
            return Err(bad("batch.segment-max-events", "must be positive"));
        }
        if self.batch.every_secs == Some(0) {
            return Err(bad("batch.every-secs", "must be positive"));
        }
        if let Err(e) = self.batch.engine.parse::<Engine>() {
            return Err(bad("batch.engine", &e));
        }
        if let Some(http) = &self.speed.http {
            if http.parse::<std::net::SocketAddr>().is_err() {
                return Err(bad(
                    "speed.http",
                    format!("{http:?} is not an address such as 127.0.0.1:7070"),
                ));
            }
        }
        if let Some(url) = &self.speed.advertise {
            if !url.starts_with("http://") || url.len() <= "http://".len() {
                return Err(bad(
                    "speed.advertise",
                    format!("{url:?} is not a URL such as http://10.0.0.5:7070"),
                ));
            }
        }
        if self.serve.http.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(
                "serve.http",
                format!(
                    "{:?} is not an address such as 127.0.0.1:8080",
                    self.serve.http
                ),
            ));
        }
        if self.serve.late_after_secs <= 0
            || self.serve.silent_after_secs < self.serve.late_after_secs
        {
            return Err(bad(
                "serve.silent-after-secs",
                "thresholds must satisfy 0 < late-after-secs <= silent-after-secs",
            ));
        }
        if let Some(k) = &self.serve.admin_key {
            if k.len() < 8 {
                return Err(bad("serve.admin-key", "must be at least 8 characters"));
            }
        }
        if let Some(k) = &self.serve.read_key {
            if k.len() < 8 {
                return Err(bad("serve.read-key", "must be at least 8 characters"));
            }
        }
        match (&self.serve.tls_cert, &self.serve.tls_key) {
            (Some(_), None) => {
                return Err(bad("serve.tls-key", "tls-cert is set but tls-key is not"))
            }
            (None, Some(_)) => {
                return Err(bad("serve.tls-cert", "tls-key is set but tls-cert is not"))
            }
            _ => {}
        }
        for (key, path) in [
            ("serve.tls-cert", &self.serve.tls_cert),
            ("serve.tls-key", &self.serve.tls_key),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(bad(key, format!("{} is not a readable file", p.display())));
                }
            }
        }
        for o in &self.serve.cors_origins {
            let ok = o == "*"
                || ((o.starts_with("http://") || o.starts_with("https://"))
                    && !o.ends_with('/')
                    && !o.contains(char::is_whitespace));
            if !ok {
                return Err(bad(
                    "serve.cors-origins",
                    format!("{o:?} is not an origin (scheme://host[:port], no path) or *"),
                ));
            }
        }
        for (metric, b) in &self.serve.metric_bounds {
            if !(b.min.is_finite() && b.max.is_finite() && b.min <= b.max) {
                return Err(bad(
                    &format!("serve.metric-bounds.{metric}"),
                    "needs finite min <= max",
                ));
            }
        }
        if self.retention.every_secs == 0 {
            return Err(bad("retention.every-secs", "must be positive"));
        }
        self.validation.rules()?;
        Ok(())
    }

    pub fn dedupe_rule(&self) -> Dedupe {
        Dedupe::new(self.dedupe.horizon_secs.saturating_mul(1000))
    }

    /// The consumer group of one role (`speed`, `archive`).
    pub fn consumer_group(&self, role: &str) -> String {
        format!("{}.{}.{role}", self.kafka.group, self.kafka.topic)
    }

    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.kafka.topic)
    }

    /// The URL this speed instance announces: `speed.advertise`, or `http://` and `speed.http`.
    pub fn speed_url(&self) -> Option<String> {
        self.speed
            .advertise
            .clone()
            .or_else(|| self.speed.http.as_ref().map(|h| format!("http://{h}")))
    }

    /// Where the speed layer reads published batch versions: `speed.batch-dir`, or the data
    /// directory.
    pub fn speed_batch_dir(&self) -> PathBuf {
        self.speed
            .batch_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.clone())
    }

    pub fn speed_dir(&self) -> PathBuf {
        self.data_dir.join("speed")
    }

    pub fn master_dir(&self) -> PathBuf {
        self.data_dir.join("master")
    }
}

/// Prefix of the environment variables that override configuration keys: sections and keys are
/// separated by `__`, and `_` in a key stands for `-`, so `STRATA__SERVE__MAX_LIMIT=500` sets
/// `serve.max-limit`. Under `kafka.properties` every `_` stands for `.`
/// (`STRATA__KAFKA__PROPERTIES__SECURITY_PROTOCOL=SSL` sets `security.protocol`); metric names
/// under `serve.metric-bounds` are kept as written, lower-cased (`..._METRIC_BOUNDS__TEMP_C__MIN`).
pub const ENV_PREFIX: &str = "STRATA__";

/// What `serve.admin-key` is replaced with when a configuration is shown.
pub const REDACTED: &str = "<redacted>";

impl Config {
    /// The configuration from the defaults, overridden by the TOML file `file` (when given),
    /// overridden by the [`ENV_PREFIX`] variables among `env` (other variables are ignored).
    /// Tables merge key by key, so a layer only changes the keys it names.
    ///
    /// An unknown key or a wrongly typed value is an error naming the full key path and the file
    /// or variable it came from. The result is not [checked](Config::check): the caller may still
    /// apply its own overrides (flags) first.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Config> {
        let mut table = toml::Table::try_from(Config::default())
            .map_err(|e| Error::Other(format!("cannot represent the defaults as TOML: {e}")))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::Other(format!(
                    "cannot read the configuration file {}: {e}",
                    path.display()
                ))
            })?;
            let layer: toml::Table = toml::from_str(&text).map_err(|e| {
                Error::Other(format!(
                    "{} is not a valid TOML file: {}",
                    path.display(),
                    e.to_string().trim_end()
                ))
            })?;
            merge(&mut table, layer);
            if let Err(e) = decode(table.clone()) {
                return Err(e.into_error(&path.display().to_string(), None));
            }
        }
        apply_env(table, env_overrides(env)?)
    }

    /// The configuration as a TOML document, with the admin key (if any) replaced by
    /// [`REDACTED`].
    pub fn to_toml_redacted(&self) -> Result<String> {
        let mut shown = self.clone();
        if shown.serve.admin_key.is_some() {
            shown.serve.admin_key = Some(REDACTED.into());
        }
        if shown.serve.read_key.is_some() {
            shown.serve.read_key = Some(REDACTED.into());
        }
        toml::to_string_pretty(&shown)
            .map_err(|e| Error::Other(format!("cannot write the configuration as TOML: {e}")))
    }
}

/// Merges `layer` into `base`: tables key by key, any other value replaces what was there.
fn merge(base: &mut toml::Table, layer: toml::Table) {
    for (key, value) in layer {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => merge(inner, value),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Why a table is not a [`Config`]: the path of the key at fault and the reason.
struct DecodeError {
    path: Vec<String>,
    message: String,
}

impl DecodeError {
    /// The error for a key that came from `origin`; `env_key` is the full key a variable set, to
    /// name instead of the unknown section it created.
    fn into_error(self, origin: &str, env_key: Option<&[String]>) -> Error {
        if let Some(rest) = self.message.strip_prefix("unknown field") {
            let path = env_key.unwrap_or(&self.path);
            let expected = rest
                .split_once(", ")
                .map(|(_, expected)| format!(" ({expected})"))
                .unwrap_or_default();
            return bad(
                &path.join("."),
                format!("unknown key in {origin}{expected}"),
            );
        }
        let key = if self.path.is_empty() {
            "(top level)".to_string()
        } else {
            self.path.join(".")
        };
        bad(&key, format!("{} (in {origin})", self.message))
    }
}

fn decode(table: toml::Table) -> std::result::Result<Config, DecodeError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e
            .path()
            .iter()
            .map(|segment| match segment {
                serde_path_to_error::Segment::Map { key } => key.clone(),
                serde_path_to_error::Segment::Enum { variant } => variant.clone(),
                serde_path_to_error::Segment::Seq { index } => index.to_string(),
                serde_path_to_error::Segment::Unknown => "?".to_string(),
            })
            .collect();
        DecodeError {
            path,
            message: e.into_inner().message().to_string(),
        }
    })
}

/// One `STRATA__…` variable: the key it sets and its value.
struct EnvOverride {
    var: String,
    path: Vec<String>,
    raw: String,
    value: toml::Value,
}

impl EnvOverride {
    fn origin(&self) -> String {
        format!("environment variable {}", self.var)
    }

    /// Sets the key in `table`; a key below a value that is not a table is unknown.
    fn apply(&self, table: &mut toml::Table) -> Result<()> {
        let Some((last, parents)) = self.path.split_last() else {
            return Ok(());
        };
        let mut t = table;
        for (depth, segment) in parents.iter().enumerate() {
            match t
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                toml::Value::Table(inner) => t = inner,
                _ => {
                    return Err(bad(
                        &self.path.join("."),
                        format!(
                            "unknown key in {} ({} is not a section)",
                            self.origin(),
                            self.path[..=depth].join(".")
                        ),
                    ))
                }
            }
        }
        t.insert(last.clone(), self.value.clone());
        Ok(())
    }
}

/// The `STRATA__…` variables among `env`, in name order.
fn env_overrides(env: impl IntoIterator<Item = (OsString, OsString)>) -> Result<Vec<EnvOverride>> {
    let mut overrides = Vec::new();
    for (name, value) in env {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path = env_key_path(rest).ok_or_else(|| {
            bad(
                name,
                format!("expected {ENV_PREFIX}SECTION__KEY, e.g. {ENV_PREFIX}SERVE__MAX_LIMIT"),
            )
        })?;
        let raw = value
            .into_string()
            .map_err(|_| bad(&path.join("."), format!("{name} is not valid UTF-8")))?;
        // A TOML scalar (`500`, `true`, `"quoted"`); anything else is taken as a plain string.
        let value = raw
            .parse::<toml::Value>()
            .unwrap_or_else(|_| toml::Value::String(raw.clone()));
        overrides.push(EnvOverride {
            var: name.to_string(),
            path,
            raw,
            value,
        });
    }
    overrides.sort_by(|a, b| a.var.cmp(&b.var));
    Ok(overrides)
}

/// The key path a variable name (without [`ENV_PREFIX`]) stands for; `None` if a part is empty.
fn env_key_path(name: &str) -> Option<Vec<String>> {
    let parts: Vec<String> = name.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    let mut path: Vec<String> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        match path.as_slice() {
            // librdkafka property names are dotted: the rest of the name is one key.
            [kafka, properties] if kafka == "kafka" && properties == "properties" => {
                path.push(parts[i..].join(".").replace('_', "."));
                break;
            }
            // Metric names are data, not field names: keep their underscores.
            [serve, bounds] if serve == "serve" && bounds == "metric-bounds" => {
                path.push(part.clone())
            }
            _ => path.push(part.replace('_', "-")),
        }
    }
    Some(path)
}

/// Applies `overrides` over `table` and decodes the result. A value that parsed as a TOML number,
/// boolean or date but is refused where it lands is tried once more as a plain string (a topic
/// named `500`, a librdkafka property `5`); if that fails too, the first error is reported.
fn apply_env(table: toml::Table, mut overrides: Vec<EnvOverride>) -> Result<Config> {
    // The variable whose value was just turned into a string, and the error it gave before.
    let mut retried: Option<(usize, Error)> = None;
    loop {
        let mut merged = table.clone();
        for o in &overrides {
            o.apply(&mut merged)?;
        }
        let e = match decode(merged) {
            Ok(config) => return Ok(config),
            Err(e) => e,
        };
        // The error is about a key some variable set, or about a table holding one.
        let related = |o: &EnvOverride| {
            let n = o.path.len().min(e.path.len());
            o.path[..n] == e.path[..n]
        };
        let culprit = overrides.iter().position(related);
        if let (Some((i, first)), Some(c)) = (retried.take(), culprit) {
            if i == c {
                return Err(first);
            }
        }
        let Some(c) = culprit else {
            return Err(e.into_error("the environment", None));
        };
        let retry = !overrides[c].value.is_str();
        let error = e.into_error(&overrides[c].origin(), Some(&overrides[c].path));
        if !retry {
            return Err(error);
        }
        overrides[c].value = toml::Value::String(overrides[c].raw.clone());
        retried = Some((c, error));
    }
}

/// How a consuming layer gets its partitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Assignment {
    /// Join the consumer group and take the partitions it hands out (the default): several
    /// processes can share a topic, and the broker moves the partitions of a member that died
    /// once its session times out (a restarted process gets them back then).
    #[default]
    Group,
    /// Assign every partition of the topic to this process directly: no group membership, for
    /// tools that want every partition. The group is used only to publish offsets.
    All,
}

impl std::str::FromStr for Assignment {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "group" => Ok(Assignment::Group),
            "all" => Ok(Assignment::All),
            _ => Err(format!("{s:?} is neither \"group\" nor \"all\"")),
        }
    }
}

/// What a layer does at a batch it cannot decode (`kafka.undecodable`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Wait at the batch and report it (the default): nothing is skipped unless asked.
    #[default]
    Stall,
    /// Move past the undecodable records, recording the range and the reason.
    Skip,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "stall" => Ok(Policy::Stall),
            "skip" => Ok(Policy::Skip),
            _ => Err(format!("{s:?} is neither \"stall\" nor \"skip\"")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_engine_is_local_datafusion_or_a_scheduler_url_and_a_bad_one_names_the_key() {
        assert_eq!("local".parse::<Engine>(), Ok(Engine::Local));
        assert_eq!("datafusion".parse::<Engine>(), Ok(Engine::DataFusion));
        assert_eq!(
            "df://10.0.0.5:50050".parse::<Engine>(),
            Ok(Engine::Ballista("df://10.0.0.5:50050".into()))
        );
        for bad in ["spark://x:1", "df://h", "df://:1", "df://h:port", ""] {
            assert!(bad.parse::<Engine>().is_err(), "{bad:?} is refused");
        }
        let mut c = Config::default();
        assert!(matches!(c.batch.engine(), Ok(Engine::Local)));
        c.batch.engine = "spark://x:1".into();
        let e = c.check().expect_err("refused").to_string();
        assert!(
            e.contains("batch.engine") && e.contains("spark://x:1"),
            "{e}"
        );
    }

    #[test]
    fn defaults_pass_and_errors_name_keys() {
        Config::default().check().expect("defaults are valid");
        let mut c = Config::default();
        c.serve.http = "nope".into();
        let e = c.check().expect_err("bad address").to_string();
        assert!(e.contains("serve.http"), "{e}");
        let mut c = Config::default();
        c.handoff.block_size = 0;
        assert!(c
            .check()
            .expect_err("zero")
            .to_string()
            .contains("handoff.block-size"));
        let parsed: std::result::Result<Config, _> =
            serde_json::from_str(r#"{"kafka": {"brokerz": "x"}}"#);
        assert!(parsed
            .expect_err("unknown key")
            .to_string()
            .contains("brokerz"));
    }

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    /// A TOML file with `text` in a fresh temporary directory (kept alive by the guard).
    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("strata.toml");
        std::fs::write(&path, text).expect("write config file");
        (dir, path)
    }

    fn load_err(file: Option<&Path>, vars: &[(&str, &str)]) -> String {
        Config::load(file, env(vars))
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn file_layers_over_defaults_key_by_key() {
        let (_dir, path) = file(
            r#"
data-dir = "/srv/strata"
[kafka]
brokers = "k1:9092,k2:9092"
assignment = "all"
static-membership = false
[kafka.properties]
"security.protocol" = "SSL"
[serve]
max-limit = 250
admin-key = "0123456789"
[serve.metric-bounds.pressure]
min = 900
max = 1100.5
[batch]
every-secs = 600
"#,
        );
        let c = Config::load(Some(&path), env(&[])).expect("valid file");
        let mut want = Config {
            data_dir: "/srv/strata".into(),
            ..Config::default()
        };
        want.kafka.brokers = "k1:9092,k2:9092".into();
        want.kafka.assignment = Assignment::All;
        want.kafka.static_membership = false;
        want.kafka.properties = BTreeMap::from([("security.protocol".into(), "SSL".into())]);
        want.serve.max_limit = 250;
        want.serve.admin_key = Some("0123456789".into());
        want.serve.metric_bounds.insert(
            "pressure".into(),
            MetricBounds {
                min: 900.0,
                max: 1100.5,
            },
        );
        want.batch.every_secs = Some(600);
        assert_eq!(c, want);
        c.check().expect("still valid");
        // No file, no variables: the defaults.
        assert_eq!(
            Config::load(None, env(&[])).expect("defaults"),
            Config::default()
        );
    }

    #[test]
    fn env_overrides_file_including_nested_keys() {
        let (_dir, path) = file(
            r#"
[kafka]
brokers = "file:9092"
topic = "from-file"
[kafka.properties]
"security.protocol" = "PLAINTEXT"
"client.id" = "from-file"
[serve]
max-limit = 250
"#,
        );
        let c = Config::load(
            Some(&path),
            env(&[
                ("STRATA__SERVE__MAX_LIMIT", "500"),
                ("STRATA__KAFKA__BROKERS", "127.0.0.1:9092"),
                ("STRATA__KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SSL"),
                ("STRATA__KAFKA__PROPERTIES__QUEUE_BUFFERING_MAX_MS", "5"),
                ("STRATA__DATA_DIR", "/x"),
                ("STRATA__SPEED__FLUSH_INTERVAL_MS", "250"),
                ("STRATA__BATCH__EVERY_SECS", "60"),
                ("STRATA__DEDUPE__HORIZON_SECS", "-1"),
                ("STRATA__VALIDATION__MIN_TS", "2001-01-01T00:00:00Z"),
                ("STRATA__SERVE__ADMIN_KEY", "12345678"),
                ("STRATA__SERVE__METRIC_BOUNDS__TEMP_C__MIN", "-30"),
                ("STRATA__SERVE__METRIC_BOUNDS__PRESSURE__MIN", "900"),
                ("STRATA__SERVE__METRIC_BOUNDS__PRESSURE__MAX", "1100.5"),
                ("STRATA__KAFKA__ASSIGNMENT", "all"),
                // Not ours: single-underscore variables are the flags' business.
                ("STRATA_BROKERS", "ignored:1"),
                ("STRATA_TEST_BROKERS", "ignored:2"),
                ("HOME", "/root"),
            ]),
        )
        .expect("valid layers");
        assert_eq!(c.serve.max_limit, 500);
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(c.kafka.topic, "from-file");
        assert_eq!(
            c.kafka.properties,
            BTreeMap::from([
                ("client.id".to_string(), "from-file".to_string()),
                ("queue.buffering.max.ms".to_string(), "5".to_string()),
                ("security.protocol".to_string(), "SSL".to_string()),
            ])
        );
        assert_eq!(c.data_dir, PathBuf::from("/x"));
        assert_eq!(c.speed.flush_interval_ms, 250);
        assert_eq!(c.batch.every_secs, Some(60));
        assert_eq!(c.dedupe.horizon_secs, -1);
        assert_eq!(c.validation.min_ts, "2001-01-01T00:00:00Z");
        // Looks like a number, lands in a string: kept as written.
        assert_eq!(c.serve.admin_key.as_deref(), Some("12345678"));
        assert_eq!(
            c.serve.metric_bounds["temp_c"],
            MetricBounds {
                min: -30.0,
                max: 60.0
            }
        );
        assert_eq!(
            c.serve.metric_bounds["pressure"],
            MetricBounds {
                min: 900.0,
                max: 1100.5
            }
        );
        assert_eq!(c.kafka.assignment, Assignment::All);
        // Values are checked afterwards, naming the key.
        let e = c.check().expect_err("negative horizon").to_string();
        assert!(e.contains("dedupe.horizon-secs"), "{e}");
        // Quoted values are TOML strings; a topic may look like a number.
        let c = Config::load(
            None,
            env(&[
                ("STRATA__KAFKA__TOPIC", "500"),
                ("STRATA__KAFKA__GROUP", "\"quoted\""),
            ]),
        )
        .expect("strings");
        assert_eq!(
            (c.kafka.topic.as_str(), c.kafka.group.as_str()),
            ("500", "quoted")
        );
    }

    #[test]
    fn unknown_key_in_file_is_named_with_the_file() {
        let (_dir, path) = file("[serve]\nmax-limitt = 5\n");
        let e = load_err(Some(&path), &[]);
        assert!(e.contains("serve.max-limitt: unknown key in "), "{e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("`max-limit`"), "lists the known keys: {e}");

        let (_dir, path) = file("[sreve]\nmax-limit = 5\n");
        assert!(load_err(Some(&path), &[]).contains("sreve: unknown key"));
        let (_dir, path) = file("[serve.metric-bounds.pressure]\nmin = 1\nmaxx = 2\n");
        let e = load_err(Some(&path), &[]);
        assert!(
            e.contains("serve.metric-bounds.pressure.maxx: unknown key"),
            "{e}"
        );
        let (_dir, path) = file("data-dirr = \"/x\"\n");
        assert!(load_err(Some(&path), &[]).contains("data-dirr: unknown key"));
        // Not TOML at all, or no such file: the path is named.
        let (_dir, path) = file("[serve\n");
        let e = load_err(Some(&path), &[]);
        assert!(e.contains(&path.display().to_string()), "{e}");
        let missing = path.with_file_name("missing.toml");
        let e = load_err(Some(&missing), &[]);
        assert!(e.contains("missing.toml"), "{e}");
    }

    #[test]
    fn unknown_env_key_is_named_with_the_variable() {
        let e = load_err(None, &[("STRATA__SERVE__MAX_LIMITT", "5")]);
        assert!(e.contains("serve.max-limitt: unknown key in "), "{e}");
        assert!(
            e.contains("environment variable STRATA__SERVE__MAX_LIMITT"),
            "{e}"
        );
        let e = load_err(None, &[("STRATA__SREVE__MAX_LIMIT", "5")]);
        assert!(e.contains("sreve.max-limit: unknown key"), "{e}");
        let e = load_err(None, &[("STRATA__DATA_DIR__X", "5")]);
        assert!(e.contains("data-dir.x: unknown key"), "{e}");
        let e = load_err(None, &[("STRATA__SERVE____MAX_LIMIT", "5")]);
        assert!(e.contains("STRATA__SERVE____MAX_LIMIT"), "{e}");
        // A valid file does not hide a bad variable.
        let (_dir, path) = file("[serve]\nmax-limit = 5\n");
        let e = load_err(Some(&path), &[("STRATA__KAFKA__BROKER", "x:1")]);
        assert!(e.contains("kafka.broker: unknown key"), "{e}");
    }

    #[test]
    fn wrongly_typed_values_are_named() {
        let (_dir, path) = file("[serve]\nmax-limit = \"many\"\n");
        let e = load_err(Some(&path), &[]);
        assert!(e.contains("serve.max-limit: invalid type"), "{e}");
        assert!(e.contains(&path.display().to_string()), "{e}");
        let (_dir, path) = file("[kafka]\nassignment = \"some\"\n");
        assert!(load_err(Some(&path), &[]).contains("kafka.assignment: unknown variant"));
        let (_dir, path) = file("serve = 5\n");
        assert!(load_err(Some(&path), &[]).contains("serve: invalid type"));

        let e = load_err(None, &[("STRATA__KAFKA__PARTITIONS", "lots")]);
        assert!(e.contains("kafka.partitions: invalid type"), "{e}");
        assert!(e.contains("STRATA__KAFKA__PARTITIONS"), "{e}");
        // The first error is reported, not the one from retrying the value as a string.
        let e = load_err(None, &[("STRATA__SERVE__MAX_LIMIT", "-5")]);
        assert!(
            e.contains("serve.max-limit: invalid value: integer `-5`"),
            "{e}"
        );
        let e = load_err(
            None,
            &[("STRATA__SERVE__METRIC_BOUNDS__PRESSURE__MIN", "900")],
        );
        assert!(
            e.contains("serve.metric-bounds.pressure: missing field `max`"),
            "{e}"
        );
    }

    #[test]
    fn printed_configuration_redacts_the_admin_key_and_reads_back() {
        let mut c = Config::default();
        c.serve.admin_key = Some("a-secret-key".into());
        c.batch.every_secs = Some(60);
        c.kafka
            .properties
            .insert("security.protocol".into(), "SSL".into());
        let text = c.to_toml_redacted().expect("toml");
        assert!(!text.contains("a-secret-key"), "{text}");
        assert!(text.contains(REDACTED), "{text}");
        let (_dir, path) = file(&text);
        let back = Config::load(Some(&path), env(&[])).expect("reads back");
        c.serve.admin_key = Some(REDACTED.into());
        assert_eq!(back, c);
        let text = Config::default().to_toml_redacted().expect("toml");
        assert!(!text.contains("admin-key"), "{text}");
    }

    #[test]
    fn example_file_documents_every_key_with_its_default() {
        let text = include_str!("../../strata.example.toml");
        let example: toml::Table = toml::from_str(text).expect("the example is TOML");
        let defaults = toml::Table::try_from(Config::default()).expect("defaults as TOML");
        // Every key with a default is set to it, and there is nothing else.
        assert_eq!(example, defaults);
        let parsed: Config = toml::from_str(text).expect("the example is a Config");
        assert_eq!(parsed, Config::default());
        // Keys without a default are shown commented out.
        for key in ["admin-key", "every-secs"] {
            assert!(
                text.contains(&format!("\n# {key} = ")),
                "{key} is documented"
            );
        }
    }
}
