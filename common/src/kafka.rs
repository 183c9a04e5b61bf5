//! Kafka plumbing shared by the consuming layers: client configuration, topic creation, a
//! consumer that resumes from offsets the layer stores itself, and the dead-letter producer.
//!
//! Strata never trusts the consumer group's committed offsets for its position: each layer
//! stores its offsets with its own state (RocksDB for the speed layer, segment names for the
//! archiver) and [`ResumeContext`] seeks every assigned partition there. Offsets are still
//! committed to the group afterwards, so that standard tools show the lag.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::handoff::{Offsets, Partition};
use crate::{Error, Result};

/// The base client configuration: brokers plus the pass-through properties.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    client_config_with(cfg, &[])
}

/// The client configuration with Strata's `defaults` for one kind of client, under the
/// pass-through properties: a property the user sets wins over Strata's choice.
pub fn client_config_with(cfg: &KafkaConfig, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    // A broker in its controlled shutdown can answer a metadata request with no brokers at
    // all; librdkafka then forgets every broker it knew and, by default, goes back to
    // `bootstrap.servers` only after 5 minutes without metadata: a producer or consumer that
    // outlived a broker restart sat idle that long. 5 s (README, "Kafka").
    c.set("metadata.recovery.rebootstrap.trigger.ms", "5000");
    // A partition whose leader went away (-1 while the only broker shut down) is looked up
    // again only on an error or at the periodic refresh, 5 minutes by default; a stream
    // produced through a broker restart was once still waiting after 3. Every 10 s bounds that
    // wait, for one small metadata request per client.
    c.set("topic.metadata.refresh.interval.ms", "10000");
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// Runs `f` until it succeeds, waiting 100 ms, 200 ms, ... up to 5 s between tries and logging
/// each failure; gives up with the last error after `patience`. For start-up steps that need the
/// broker, so that a slow or restarting broker delays a layer instead of stopping it. An
/// authentication failure is not retried: waiting does not fix credentials.
pub fn with_retries<T>(
    what: &str,
    patience: Duration,
    mut f: impl FnMut() -> Result<T>,
) -> Result<T> {
    let started = std::time::Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if is_auth_failure(&e) => return Err(e),
            Err(e) if started.elapsed() + wait < patience => {
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what} failed; retrying");
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// librdkafka's codes for credentials the broker refused, and for a TLS handshake that failed
/// (a certificate that does not verify: waiting does not fix it either).
fn is_auth_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::SSL
    )
}

/// Whether `e` says the broker refused the client's credentials (not worth retrying).
fn is_auth_failure(e: &Error) -> bool {
    match e {
        Error::Kafka { source, .. } => source.rdkafka_error_code().is_some_and(is_auth_code),
        Error::Other(m) => m.starts_with(AUTH_FAILED),
        _ => false,
    }
}

const AUTH_FAILED: &str = "authentication failed at ";

/// `authentication failed at <brokers> (security.protocol=..., sasl.mechanism=...): <reason>`.
fn auth_failure_message(cfg: &KafkaConfig, reason: &str) -> String {
    let prop = |k: &str| {
        cfg.properties
            .get(k)
            .map_or("(librdkafka's default)", String::as_str)
            .to_string()
    };
    format!(
        "{AUTH_FAILED}{} (security.protocol={}, sasl.mechanism={}): {reason}",
        cfg.brokers,
        prop("security.protocol"),
        prop("sasl.mechanism")
    )
}

/// A client context that forwards librdkafka's logs and errors like the layers' own clients, and
/// keeps the first authentication failure librdkafka reports (they arrive through this
/// callback; the request that was waiting for the broker only times out).
#[derive(Default)]
struct AuthWatch {
    failure: Mutex<Option<String>>,
}

impl AuthWatch {
    fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

impl ClientContext for AuthWatch {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code().is_some_and(is_auth_code) {
            if let Ok(mut f) = self.failure.lock() {
                f.get_or_insert_with(|| reason.to_string());
            }
        }
        forward_error(&error, reason);
    }
}

impl ProducerContext for AuthWatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// Creates the topics that do not exist yet; existing topics are used as they are. Retries while
/// the broker is unreachable, for up to two minutes; stops at once if it refuses the credentials.
pub async fn ensure_topics(cfg: &KafkaConfig, topics: &[(&str, i32)]) -> Result<()> {
    ensure_topics_with(cfg, topics, false).await
}

/// [`ensure_topics`] for compacted topics (`cleanup.policy=compact`: the newest record of each
/// key is kept), such as the members topic of a speed cluster.
pub async fn ensure_compacted_topics(cfg: &KafkaConfig, topics: &[(&str, i32)]) -> Result<()> {
    ensure_topics_with(cfg, topics, true).await
}

async fn ensure_topics_with(
    cfg: &KafkaConfig,
    topics: &[(&str, i32)],
    compact: bool,
) -> Result<()> {
    let started = std::time::Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        match try_ensure_topics(cfg, topics, compact).await {
            Ok(()) => return Ok(()),
            Err(e) if is_auth_failure(&e) => return Err(e),
            Err(e) if started.elapsed() < Duration::from_secs(120) => {
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot create the topics yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

async fn try_ensure_topics(cfg: &KafkaConfig, topics: &[(&str, i32)], compact: bool) -> Result<()> {
    // The metadata goes through a client whose events are polled (the admin client's are not),
    // so that librdkafka's report of refused credentials is seen; asked for in short tries, for
    // 10 s in all, so that such a report ends the wait at once.
    // A producer's metadata request for a missing topic creates it with the broker's defaults
    // (`num.partitions`) unless told not to; the topics are created below, as asked.
    let probe: ThreadedProducer<AuthWatch> =
        client_config_with(cfg, &[("allow.auto.create.topics", "false")])
            .create_with_context(AuthWatch::default())
            .map_err(|e| Error::kafka("create a client", e))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let existing = loop {
        match existing_topics(probe.client(), topics) {
            Ok(existing) => break existing,
            Err(e) => {
                if let Some(reason) = probe.context().failure() {
                    return Err(Error::Other(auth_failure_message(cfg, &reason)));
                }
                if std::time::Instant::now() >= deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    drop(probe);
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .filter(|(name, _)| !existing.contains(&name.to_string()))
        .map(|(name, partitions)| {
            let t = NewTopic::new(name, *partitions, TopicReplication::Fixed(1));
            if compact {
                // Small segments, so that the log is compacted within minutes.
                t.set("cleanup.policy", "compact")
                    .set("segment.ms", "600000")
                    .set("min.cleanable.dirty.ratio", "0.1")
            } else {
                t
            }
        })
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(cfg)
        .create()
        .map_err(|e| Error::kafka("create admin client", e))?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|e| Error::kafka("create topics", e))?;
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(Error::kafka(
                    format!("create topic {name}"),
                    KafkaError::AdminOp(code),
                ))
            }
        }
    }
    Ok(())
}

/// The topic's `retention.ms` as the broker reports it (`None`: unlimited, -1, or not found).
pub async fn topic_retention_ms(cfg: &KafkaConfig, topic: &str) -> Result<Option<i64>> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg)
        .create()
        .map_err(|e| Error::kafka("create admin client", e))?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .describe_configs(&[rdkafka::admin::ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(|e| Error::kafka("describe the topic's configuration", e))?;
    for r in results {
        let Ok(resource) = r else { continue };
        if let Some(v) = resource
            .get("retention.ms")
            .and_then(|e| e.value.as_deref())
        {
            return Ok(v.parse::<i64>().ok().filter(|&ms| ms >= 0));
        }
    }
    Ok(None)
}

/// The warning start-up gives when the topic keeps less than what a layer may still need to
/// read: everything past the newest batch version's cutoffs, which may be `batch_every_secs`
/// plus a recompute old (`margin_secs`). `None`: the retention is long enough.
pub fn retention_warning(
    topic: &str,
    retention_ms: Option<i64>,
    batch_every_secs: Option<u64>,
    margin_secs: u64,
) -> Option<String> {
    let ms = retention_ms?;
    let needed = (batch_every_secs.unwrap_or(0) + margin_secs) as i64 * 1000;
    (ms < needed).then(|| {
        format!(
            "topic {topic} keeps messages for retention.ms={ms} ({:.1} h), less than batch.every-secs plus retention.kafka-margin-secs ({:.1} h): Kafka must keep every message past the newest batch version's cutoffs, or a speed layer rebuilding a partition and strata verify find them gone; raise the topic's retention.ms",
            ms as f64 / 3.6e6,
            needed as f64 / 3.6e6
        )
    })
}

fn existing_topics<C: ClientContext>(
    client: &Client<C>,
    topics: &[(&str, i32)],
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (name, _) in topics {
        let md = client
            .fetch_metadata(Some(name), Duration::from_secs(1))
            .map_err(|e| Error::kafka(format!("metadata of {name}"), e))?;
        if md
            .topics()
            .iter()
            .any(|t| t.name() == *name && t.error().is_none() && !t.partitions().is_empty())
        {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// Where to resume a partition: the offset stored with the layer's state, `None` for the start.
pub type PositionFn = dyn Fn(Partition) -> Result<Option<i64>> + Send + Sync;

/// A consumer context that assigns every partition at the position the layer stored itself.
pub struct ResumeContext {
    topic: String,
    positions: Box<PositionFn>,
    assigned: Mutex<Vec<Partition>>,
    generation: AtomicU64,
}

impl ResumeContext {
    /// Partitions currently assigned, and a counter that changes with every rebalance.
    pub fn assignment(&self) -> (Vec<Partition>, u64) {
        let a = self.assigned.lock().map(|a| a.clone()).unwrap_or_default();
        (a, self.generation.load(Ordering::Acquire))
    }
}

impl ClientContext for ResumeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        forward_error(&error, reason);
    }
}

/// librdkafka's own log lines, through `tracing` like everything else.
pub fn forward_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// Client-level errors (a broker down, all brokers down): logged as warnings, since librdkafka
/// keeps retrying on its own and the layer carries on once the broker is back. librdkafka
/// reports an unreachable broker many times a second; each kind of error is logged at most once
/// per [`ERROR_LOG_EVERY`], with the number of its reports left out since.
pub fn forward_error(error: &rdkafka::error::KafkaError, reason: &str) {
    let kind = error.to_string();
    if let Some(left_out) = ERROR_LOG.admit(&kind, std::time::Instant::now()) {
        tracing::warn!(target: "librdkafka", error = %error, left_out, "kafka client: {reason}");
    }
}

/// How often one kind of client error is logged while it repeats.
pub const ERROR_LOG_EVERY: Duration = Duration::from_secs(5);

static ERROR_LOG: ErrorLog = ErrorLog::new();

/// When each kind of error was last logged, and how many of its reports were left out since.
struct ErrorLog(std::sync::Mutex<Vec<(String, std::time::Instant, u64)>>);

impl ErrorLog {
    const fn new() -> Self {
        ErrorLog(std::sync::Mutex::new(Vec::new()))
    }

    /// `Some(reports left out since the last line)` if a report of `kind` at `now` is to be
    /// logged; `None` if it is left out.
    fn admit(&self, kind: &str, now: std::time::Instant) -> Option<u64> {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match seen.iter_mut().find(|(k, _, _)| k == kind) {
            Some((_, at, left_out)) if now.duration_since(*at) < ERROR_LOG_EVERY => {
                *left_out += 1;
                None
            }
            Some((_, at, left_out)) => {
                *at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                // A handful of kinds in practice; bounded all the same.
                if seen.len() >= 64 {
                    seen.clear();
                }
                seen.push((kind.to_string(), now, 0));
                Some(0)
            }
        }
    }
}

impl ResumeContext {
    /// Where partition `p` starts: the layer's stored position, or the beginning.
    fn start_offset(&self, p: Partition) -> Result<Offset> {
        Ok((self.positions)(p)?.map_or(Offset::Beginning, Offset::Offset))
    }

    /// Sets each partition of `tpl` to start at the layer's stored position; returns those that
    /// can be consumed (a partition whose position cannot be read is left out and logged).
    fn positioned(&self, tpl: &TopicPartitionList) -> TopicPartitionList {
        let mut out = TopicPartitionList::new();
        for elem in tpl.elements() {
            let p = elem.partition();
            let offset = match self.start_offset(p) {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(partition = p, error = %e, "cannot read the stored position; not consuming this partition");
                    continue;
                }
            };
            if let Err(e) = out.add_partition_offset(elem.topic(), p, offset) {
                tracing::error!(partition = p, error = %e, "cannot set the start offset");
            }
        }
        out
    }

    fn set_assigned(&self, f: impl FnOnce(&mut Vec<Partition>)) {
        if let Ok(mut a) = self.assigned.lock() {
            f(&mut a);
            a.sort_unstable();
            a.dedup();
        }
    }
}

impl ConsumerContext for ResumeContext {
    /// Partitions handed out by the group start at the layer's own stored positions. With the
    /// cooperative protocol (the default, `cooperative-sticky`) a rebalance only adds or removes
    /// the partitions that move; with the eager one every rebalance revokes and reassigns all.
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            base_consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions: Vec<Partition> = tpl.elements().iter().map(|e| e.partition()).collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let start = self.positioned(tpl);
                let done = if cooperative {
                    base_consumer.incremental_assign(&start)
                } else {
                    base_consumer.assign(&start)
                };
                if let Err(e) = done {
                    tracing::error!(error = %e, "assign failed");
                }
                let taken: Vec<Partition> =
                    start.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(topic = %self.topic, partitions = ?taken, "partitions assigned");
                self.set_assigned(|a| {
                    if !cooperative {
                        a.clear();
                    }
                    a.extend(taken);
                });
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(topic = %self.topic, partitions = ?partitions, lost = base_consumer.assignment_lost(), "partitions revoked");
                let done = if cooperative {
                    base_consumer.incremental_unassign(tpl)
                } else {
                    base_consumer.unassign()
                };
                if let Err(e) = done {
                    tracing::error!(error = %e, "unassign failed");
                }
                self.set_assigned(|a| {
                    if cooperative {
                        a.retain(|p| !partitions.contains(p));
                    } else {
                        a.clear();
                    }
                });
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error; unassigning");
                let _ = base_consumer.unassign();
                self.set_assigned(Vec::clear);
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// A group consumer that resumes every partition at the layer's own stored position.
pub type ResumingConsumer = BaseConsumer<ResumeContext>;

pub use crate::config::Assignment;

/// The `group.instance.id` of the consumer whose state lives in `dir`, made once and kept in
/// `dir/.group-member-id`: the same id across restarts, so that the broker gives a restarted
/// process its predecessor's partitions without a rebalance (static membership), and a
/// different one for every state directory (two processes never share one: the state's lock).
pub fn member_id(dir: &Path, role: &str) -> Result<String> {
    let path = dir.join(".group-member-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&path, e)),
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    let id = format!("strata-{role}-{:016x}", h.finish());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = dir.join(".tmp-group-member-id");
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::io(&path, e))?;
    Ok(id)
}

/// A consumer of `topic` that resumes every partition at the position `positions` gives, taking
/// partitions as `assignment` says; `group` receives the committed offsets. `member` is the
/// consumer's `group.instance.id` (static membership: [`member_id`]), when the configuration
/// asks for one.
pub fn resuming_consumer(
    cfg: &KafkaConfig,
    group: &str,
    member: Option<&str>,
    positions: Box<PositionFn>,
) -> Result<ResumingConsumer> {
    let ctx = ResumeContext {
        topic: cfg.topic.clone(),
        positions,
        assigned: Mutex::new(Vec::new()),
        generation: AtomicU64::new(0),
    };
    let member = member.filter(|_| cfg.static_membership && cfg.assignment == Assignment::Group);
    let static_member = member.map(|m| ("group.instance.id", m));
    let c = client_config_with(
        cfg,
        &[
            ("group.id", group),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            // Partitions stay where their state is: a rebalance moves only those that must
            // move, and the others are consumed throughout (docs/decisions/0007-apache-kafka.md).
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("session.timeout.ms", "10000"),
            ("heartbeat.interval.ms", "1000"),
            ("fetch.wait.max.ms", "50"),
            ("queued.min.messages", "200000"),
            // Prefetch keeps fetching while fewer than `queued.min.messages` wait, up to this
            // many KiB of payloads per partition (librdkafka's default is 64 MiB, plus its
            // per-message bookkeeping: about 107 MiB in a heap profile of the speed layer). 4 MiB
            // a partition is half a second of consumption at 150,000 events/s over 4 partitions.
            ("queued.max.messages.kbytes", "4096"),
            // A partition whose prefetch is full is fetched again this soon after the layer
            // takes from it. librdkafka waits 1 s by default: with the smaller prefetch above
            // that wait cut the speed layer's rate to a third (docs/PERFORMANCE.md).
            ("fetch.queue.backoff.ms", "10"),
        ]
        .into_iter()
        .chain(static_member)
        .collect::<Vec<_>>(),
    );
    let consumer: ResumingConsumer = c
        .create_with_context(ctx)
        .map_err(|e| Error::kafka("create consumer", e))?;
    match cfg.assignment {
        Assignment::Group => consumer
            .subscribe(&[&cfg.topic])
            .map_err(|e| Error::kafka(format!("subscribe to {}", cfg.topic), e))?,
        Assignment::All => {
            with_retries("assigning the partitions", Duration::from_secs(120), || {
                assign_all(&consumer, &cfg.topic)
            })?
        }
    }
    Ok(consumer)
}

/// Assigns every partition of the topic at the layer's stored positions.
fn assign_all(consumer: &ResumingConsumer, topic: &str) -> Result<()> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| Error::kafka(format!("metadata of {topic}"), e))?;
    let partitions: Vec<Partition> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Error::Other(format!(
            "topic {topic} has no partitions (does it exist?)"
        )));
    }
    let ctx = consumer.context();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        tpl.add_partition_offset(topic, p, ctx.start_offset(p)?)
            .map_err(|e| Error::kafka("build the assignment", e))?;
    }
    consumer
        .assign(&tpl)
        .map_err(|e| Error::kafka(format!("assign {topic}"), e))?;
    tracing::info!(topic, partitions = ?partitions, "partitions assigned");
    if let Ok(mut a) = ctx.assigned.lock() {
        *a = partitions;
    }
    ctx.generation.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

/// The consumer's position in each assigned partition of `topic`: the offset after the last
/// record it handed out, or after records it passed over without handing them out: the
/// markers that commit or abort a transaction, and the records of aborted transactions (the
/// consumers read committed records only, librdkafka's `isolation.level` default). A layer whose
/// stored next offset is below the position moves it up to the position, so that its coverage
/// reaches the partition's end even when the last record there is a marker.
pub fn positions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Vec<(Partition, i64)> {
    let Ok(tpl) = consumer.position() else {
        return Vec::new();
    };
    tpl.elements()
        .iter()
        .filter(|e| e.topic() == topic)
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Moves the consumer's position in partition `p` of `topic` to `offset`.
pub fn seek<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    p: Partition,
    offset: i64,
) -> Result<()> {
    consumer
        .seek(topic, p, Offset::Offset(offset), Duration::from_secs(10))
        .map_err(|e| Error::kafka(format!("seek {topic}/{p} to {offset}"), e))
}

/// After a consume error: fails when librdkafka has raised a fatal error on the consumer (it
/// consumes nothing more after one), so the layer stops with the reason instead of polling a
/// dead client; a restart resumes at the stored offsets. A static member's fencing is not such a
/// failure the first time in a while: `fences` says whether to start a new consumer instead (see
/// [`Fences`]). Any other error is recorded in `fences` as a consume error.
pub fn check_fatal<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    layer: &str,
    fences: &mut Fences,
) -> Result<Fatal> {
    match consumer.client().fatal_error() {
        Some((RDKafkaErrorCode::FencedInstanceId, reason)) => {
            fences.fenced(layer, &reason)?;
            Ok(Fatal::Fenced)
        }
        Some((code, reason)) => Err(Error::Other(format!(
            "the {layer}'s Kafka consumer failed fatally ({code:?}): {reason}"
        ))),
        None => {
            fences.last_error = Some(std::time::Instant::now());
            Ok(Fatal::No)
        }
    }
}

/// What [`check_fatal`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Fatal {
    No,
    /// Fenced as a static member: the consumer is dead; start a new one (at the layer's own
    /// positions, as a restarted process would).
    Fenced,
}

/// How long after one fencing another one stops the layer, and how long after a consume error
/// (the broker unreachable, a lost session) a fencing is taken for librdkafka's own.
const FENCED_AGAIN: Duration = Duration::from_secs(60);

/// The static member's fencings. librdkafka fences a static member by itself after a
/// coordinator outage longer than its session (the session times out, it joins again under a
/// new member id, and a request still carrying the old one is refused: an open librdkafka
/// issue, seen here after every broker restart of `e2e_broker`). A fencing within a minute of a
/// consume error is taken for that, and answered with a new consumer. Otherwise the broker was
/// answering all along, so another consumer holds the `group.instance.id` (a copy of the state
/// directory running elsewhere: the directory's lock keeps a second process on this host away):
/// a first such fencing is still answered with a new consumer, a second one within a minute
/// stops the layer with that reason.
#[derive(Debug, Default)]
pub struct Fences {
    last: Option<std::time::Instant>,
    last_error: Option<std::time::Instant>,
}

impl Fences {
    fn fenced(&mut self, layer: &str, reason: &str) -> Result<()> {
        let after_error = self.last_error.is_some_and(|t| t.elapsed() < FENCED_AGAIN);
        if let Some(t) = self
            .last
            .filter(|t| !after_error && t.elapsed() < FENCED_AGAIN)
        {
            return Err(Error::Other(format!(
                "the {layer}'s Kafka consumer was fenced twice in {:.0} s with the broker \
                 answering ({reason}): another consumer holds its group.instance.id (a copy of \
                 its state directory, with .group-member-id, running elsewhere?)",
                t.elapsed().as_secs_f64()
            )));
        }
        if after_error {
            tracing::warn!(layer, reason, "the consumer was fenced as a static member after a broker outage (librdkafka does so by itself when its session was lost); joining again with a new consumer at the stored positions");
        } else {
            tracing::warn!(layer, reason, "the consumer was fenced as a static member with the broker answering; joining again with a new consumer at the stored positions (a second fencing within a minute stops the layer)");
            self.last = Some(std::time::Instant::now());
        }
        Ok(())
    }
}

/// Commits `offsets` (next offsets to read) of the partitions the consumer holds to the
/// consumer group, without waiting. Only for lag visibility: positions come from the layer's
/// own state. Nothing is committed while the consumer holds no partition (a rebalance, a lost
/// session): a commit sent across a rejoin carries the old member id, which a static member is
/// fenced for.
pub fn commit_for_lag<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    offsets: &Offsets,
) {
    let Ok(held) = consumer.assignment() else {
        return;
    };
    let held: Vec<Partition> = (held.elements().iter())
        .filter(|e| e.topic() == topic)
        .map(|e| e.partition())
        .collect();
    let mut tpl = TopicPartitionList::new();
    for (&p, &o) in offsets.iter().filter(|(p, _)| held.contains(p)) {
        if tpl
            .add_partition_offset(topic, p, Offset::Offset(o))
            .is_err()
        {
            return;
        }
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
            tracing::debug!(error = %e, "offset commit for lag visibility failed");
        }
    }
}

/// The high watermark (next offset to be written) of every partition of `topic`.
pub fn high_watermarks<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Result<Offsets> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(|e| Error::kafka(format!("metadata of {topic}"), e))?;
    let mut out = BTreeMap::new();
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(5))
                .map_err(|e| Error::kafka(format!("watermarks of {topic}/{}", p.id()), e))?;
            out.insert(p.id(), high);
        }
    }
    Ok(out)
}

/// Counts failed deliveries so that a flush can tell whether everything arrived; `what` names
/// the messages in the log line of each failure.
pub struct DeliveryTracker {
    what: &'static str,
    failed: AtomicU64,
}

impl DeliveryTracker {
    pub fn new(what: &'static str) -> Self {
        DeliveryTracker {
            what,
            failed: AtomicU64::new(0),
        }
    }

    /// Deliveries that failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Acquire)
    }
}

impl ClientContext for DeliveryTracker {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        forward_error(&error, reason);
    }
}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            tracing::error!(error = %e, "{} delivery failed", self.what);
            self.failed.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// The dead-letter producer: a rejected message, unchanged, with its reason in headers.
///
/// Letters are kept until the broker acknowledges them: a failed or timed-out delivery is sent
/// again (so the dead-letter topic is at-least-once), and the caller must not move its offsets
/// past a letter before [`DeadLetters::flush`] says it is delivered.
pub struct DeadLetters {
    producer: ThreadedProducer<DeliveryTracker>,
    cfg: KafkaConfig,
    topic: String,
    unacked: Vec<Letter>,
}

struct Letter {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    code: String,
    reason: String,
    source: String,
}

/// Header names on dead-letter messages.
pub mod dlq_header {
    pub const REASON: &str = "strata-reason";
    pub const CODE: &str = "strata-code";
    pub const SOURCE: &str = "strata-source";
}

/// Where a layer's dead letters go: the dead-letter topic ([`DeadLetters`]), or a count (the
/// speed layer's in-process benchmark).
pub trait Letters: Send {
    /// Queues one rejected message. `source` names where it came from (`topic/partition@offset`).
    fn send(
        &mut self,
        key: Option<&[u8]>,
        payload: &[u8],
        code: &str,
        reason: &str,
        source: &str,
    ) -> Result<()>;
    /// Waits until every letter sent is stored; `Ok(false)` if `stop()` turned true first.
    fn flush(&mut self, stop: &dyn Fn() -> bool) -> Result<bool>;
}

impl Letters for DeadLetters {
    /// Queues one rejected message. `source` names where it came from (`topic/partition@offset`).
    fn send(
        &mut self,
        key: Option<&[u8]>,
        payload: &[u8],
        code: &str,
        reason: &str,
        source: &str,
    ) -> Result<()> {
        let letter = Letter {
            key: key.map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            code: code.to_string(),
            reason: reason.to_string(),
            source: source.to_string(),
        };
        self.produce(&letter)?;
        self.unacked.push(letter);
        Ok(())
    }

    /// Waits until every queued letter is acknowledged, sending again what failed, with growing
    /// pauses while the broker is slow or away. Returns `Ok(false)` if `stop()` turned true first.
    fn flush(&mut self, stop: &dyn Fn() -> bool) -> Result<bool> {
        let mut wait = Duration::from_millis(100);
        loop {
            if self.unacked.is_empty() {
                return Ok(true);
            }
            let flushed = self.producer.flush(Duration::from_secs(10));
            let failed = self.producer.context().failed.swap(0, Ordering::AcqRel);
            match (flushed, failed) {
                (Ok(()), 0) => {
                    self.unacked.clear();
                    return Ok(true);
                }
                (Ok(()), n) => {
                    tracing::warn!(
                        failed = n,
                        letters = self.unacked.len(),
                        "dead letters were not delivered; sending them again with a new producer"
                    );
                    // A producer that outlived a broker restart was seen timing every letter
                    // out for minutes on end (`e2e_broker`); a new one starts from fresh
                    // metadata and a new producer id. The letters are kept until acknowledged,
                    // so nothing is lost (at-least-once, as before).
                    self.producer = Self::producer(&self.cfg)?;
                    for l in &self.unacked {
                        self.produce(l)?;
                    }
                }
                (Err(e), _) => {
                    tracing::warn!(error = %e, letters = self.unacked.len(), "dead letters not acknowledged yet; waiting");
                }
            }
            if stop() {
                return Ok(false);
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}

/// How long librdkafka tries to deliver one dead letter before `flush` sends it again.
const DEAD_LETTER_TIMEOUT_MS: &str = "30000";

impl DeadLetters {
    pub fn new(cfg: &KafkaConfig, topic: String) -> Result<Self> {
        Ok(DeadLetters {
            producer: Self::producer(cfg)?,
            cfg: cfg.clone(),
            topic,
            unacked: Vec::new(),
        })
    }

    fn producer(cfg: &KafkaConfig) -> Result<ThreadedProducer<DeliveryTracker>> {
        client_config_with(
            cfg,
            &[
                ("linger.ms", "5"),
                ("message.max.bytes", "10000000"),
                ("enable.idempotence", "true"),
                // After a broker restart an idempotent producer's queued letters were seen
                // waiting out the whole default of 300 s before they failed and `flush` sent
                // them again, while the layer's offsets waited on them. 30 s bounds that wait.
                ("message.timeout.ms", DEAD_LETTER_TIMEOUT_MS),
            ],
        )
        .create_with_context(DeliveryTracker::new("dead-letter"))
        .map_err(|e| Error::kafka("create dead-letter producer", e))
    }

    fn produce(&self, l: &Letter) -> Result<()> {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: dlq_header::REASON,
                value: Some(&l.reason),
            })
            .insert(Header {
                key: dlq_header::CODE,
                value: Some(&l.code),
            })
            .insert(Header {
                key: dlq_header::SOURCE,
                value: Some(&l.source),
            });
        let mut record: BaseRecord<'_, [u8], [u8], ()> = BaseRecord::to(&self.topic)
            .payload(l.payload.as_slice())
            .headers(headers);
        if let Some(k) = &l.key {
            record = record.key(k.as_slice());
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(Error::kafka("queue a dead letter", e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_client_error_is_logged_once_per_period_with_the_reports_left_out() {
        let log = ErrorLog::new();
        let t0 = std::time::Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(log.admit("all brokers down", t0), Some(0));
        assert_eq!(log.admit("all brokers down", t0 + ms(50)), None);
        assert_eq!(log.admit("all brokers down", t0 + ms(100)), None);
        // Another kind is not held back by the first.
        assert_eq!(log.admit("transport failure", t0 + ms(100)), Some(0));
        let later = t0 + ERROR_LOG_EVERY + ms(1);
        assert_eq!(log.admit("all brokers down", later), Some(2));
        assert_eq!(log.admit("all brokers down", later + ms(1)), None);
    }

    #[test]
    fn a_topic_retention_shorter_than_the_batch_interval_is_warned_about() {
        let w = retention_warning("events", Some(3_600_000), Some(7_200), 3_600);
        assert!(w.is_some_and(|w| w.contains("retention.ms=3600000")));
        assert!(retention_warning("events", Some(10_800_000), Some(7_200), 3_600).is_none());
        assert!(retention_warning("events", None, Some(7_200), 3_600).is_none());
        assert!(retention_warning("events", Some(1_000), None, 3_600).is_some());
    }

    #[test]
    fn refused_credentials_are_kept_and_named() {
        let watch = AuthWatch::default();
        watch.error(
            KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "127.0.0.1:9093/bootstrap: Connection refused",
        );
        assert_eq!(watch.failure(), None);
        let reason = "sasl_ssl://127.0.0.1:9093/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-256";
        watch.error(KafkaError::Global(RDKafkaErrorCode::Authentication), reason);
        watch.error(
            KafkaError::Global(RDKafkaErrorCode::Authentication),
            "a later one",
        );
        assert_eq!(watch.failure().as_deref(), Some(reason));
        let tls = AuthWatch::default();
        tls.error(
            KafkaError::Global(RDKafkaErrorCode::SSL),
            "ssl://127.0.0.1:9094/bootstrap: SSL handshake failed: certificate verify failed",
        );
        assert!(tls.failure().is_some());

        let mut cfg = KafkaConfig {
            brokers: "127.0.0.1:9093".into(),
            ..KafkaConfig::default()
        };
        cfg.properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        cfg.properties
            .insert("sasl.mechanism".into(), "SCRAM-SHA-256".into());
        let msg = auth_failure_message(&cfg, reason);
        assert_eq!(
            msg,
            format!("authentication failed at 127.0.0.1:9093 (security.protocol=SASL_SSL, sasl.mechanism=SCRAM-SHA-256): {reason}")
        );
        assert!(is_auth_failure(&Error::Other(msg)));
        assert!(!is_auth_failure(&Error::Other(
            "topic x has no partitions".into()
        )));
    }

    #[test]
    fn with_retries_stops_at_an_authentication_failure() {
        let mut tries = 0;
        let r: Result<()> = with_retries("probing", Duration::from_secs(60), || {
            tries += 1;
            Err(Error::kafka(
                "metadata of events",
                KafkaError::MetadataFetch(RDKafkaErrorCode::SaslAuthenticationFailed),
            ))
        });
        assert!(r.is_err());
        assert_eq!(tries, 1);
        let mut tries = 0;
        let r = with_retries("probing", Duration::from_secs(60), || {
            tries += 1;
            if tries < 3 {
                Err(Error::kafka(
                    "metadata of events",
                    KafkaError::MetadataFetch(RDKafkaErrorCode::BrokerTransportFailure),
                ))
            } else {
                Ok(tries)
            }
        });
        assert_eq!(r.ok(), Some(3));
    }
}
