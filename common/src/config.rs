//! Typed configuration shared by every layer, with documented defaults.
//!
//! Each field has a default; the `strata` command fills fields from its flags and environment.
//! [`Config::check`] rejects bad values with the name of the key at fault.

use std::collections::BTreeMap;
use std::path::PathBuf;

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
    pub kafka: KafkaConfig,
    pub validation: Validation,
    pub dedupe: DedupeConfig,
    pub handoff: HandoffConfig,
    pub speed: SpeedConfig,
    pub batch: BatchConfig,
    pub serve: ServeConfig,
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
    /// `all`: this process takes every partition (default); `group`: partitions come from the
    /// consumer group, for several processes sharing the topic.
    pub assignment: crate::kafka::Assignment,
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
    /// Longest time folded events wait before being written (with their offsets) to RocksDB.
    pub flush_interval_ms: u64,
    /// Most events folded in memory before a write.
    pub flush_max_events: usize,
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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ServeConfig {
    /// Listen address of the HTTP API.
    pub http: String,
    /// Bearer key for `/v1/admin/*`; admin routes answer 401 without it, 503 if none is set.
    pub admin_key: Option<String>,
    /// A device is `late` after this many seconds without an event.
    pub late_after_secs: i64,
    /// A device is `silent` after this many seconds without an event.
    pub silent_after_secs: i64,
    /// Largest `limit` a query may ask for.
    pub max_limit: usize,
    /// Expected range of each reading metric; device windows outside it are flagged.
    pub metric_bounds: BTreeMap<String, MetricBounds>,
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
            data_dir: PathBuf::from(".data"),
            kafka: KafkaConfig::default(),
            validation: Validation::default(),
            dedupe: DedupeConfig::default(),
            handoff: HandoffConfig::default(),
            speed: SpeedConfig::default(),
            batch: BatchConfig::default(),
            serve: ServeConfig::default(),
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
            assignment: crate::kafka::Assignment::All,
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
            flush_max_events: 50_000,
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
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            http: "127.0.0.1:8080".into(),
            admin_key: None,
            late_after_secs: 120,
            silent_after_secs: 600,
            max_limit: 1_000,
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
        if self.speed.flush_max_events == 0 {
            return Err(bad("speed.flush-max-events", "must be positive"));
        }
        if self.batch.segment_max_events == 0 {
            return Err(bad("batch.segment-max-events", "must be positive"));
        }
        if self.batch.every_secs == Some(0) {
            return Err(bad("batch.every-secs", "must be positive"));
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
        for (metric, b) in &self.serve.metric_bounds {
            if !(b.min.is_finite() && b.max.is_finite() && b.min <= b.max) {
                return Err(bad(
                    &format!("serve.metric-bounds.{metric}"),
                    "needs finite min <= max",
                ));
            }
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

    pub fn speed_dir(&self) -> PathBuf {
        self.data_dir.join("speed")
    }

    pub fn master_dir(&self) -> PathBuf {
        self.data_dir.join("master")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
