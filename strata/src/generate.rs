//! `strata generate`: the seeded stream, produced to the topic.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer,
};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use strata_common::config::{Config, KafkaConfig};
use strata_common::generate::{GenConfig, Generated, Generator};
use strata_common::progress::Progress;
use strata_common::time::{now_millis, parse_rfc3339};
use strata_common::{fault, kafka};

pub struct GenerateArgs {
    pub count: u64,
    pub seed: u64,
    pub rate: u64,
    pub span: Duration,
    pub start: Option<String>,
    pub patterns: bool,
    pub malformed_rate: f64,
}

pub async fn run(cfg: &Config, args: GenerateArgs) -> anyhow::Result<()> {
    kafka::ensure_topics(
        &cfg.kafka,
        &[
            (&cfg.kafka.topic, cfg.kafka.partitions),
            (&cfg.dlq_topic(), cfg.kafka.partitions),
        ],
    )
    .await?;
    let span_ms = args.span.as_millis() as i64;
    let start_ts = match &args.start {
        Some(s) => parse_rfc3339(s).with_context(|| format!("--start {s:?} is not RFC 3339"))?,
        None => now_millis() - span_ms,
    };
    let mut gen_cfg = GenConfig::new(args.seed, args.count, start_ts);
    gen_cfg.span_ms = span_ms;
    gen_cfg.patterns = args.patterns;
    if !(0.0..=1.0).contains(&args.malformed_rate) {
        anyhow::bail!("--malformed-rate must be between 0 and 1");
    }
    gen_cfg.malformed_rate = args.malformed_rate;
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || produce(&cfg, gen_cfg, args.rate)).await?
}

fn produce(cfg: &Config, gen_cfg: GenConfig, rate: u64) -> anyhow::Result<()> {
    let count = gen_cfg.count;
    let mut sender = Sender::new(&cfg.kafka)?;
    let mut progress = Progress::new("generate", Some(count));
    let started = Instant::now();
    for (i, g) in Generator::new(gen_cfg).enumerate() {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        sender.send(i, g)?;
        if fault::tripped("generate.stalled") {
            // As if the acknowledgements of everything unacknowledged so far were lost: the
            // read-back has to find what the broker wrote, and send only the rest.
            sender.recover("STRATA_FAULT generate.stalled", false)?;
        }
        if i % 1_000 == 999 {
            sender.pump()?;
        }
        progress.inc(1);
    }
    // Until every event is acknowledged, say every 10 s how many are still waiting.
    let waiting = Instant::now();
    let mut said = waiting;
    while !sender.unacked.is_empty() {
        match sender.producer.flush(Duration::from_secs(1)) {
            Ok(()) | Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {}
            Err(e) => return Err(e).context("waiting for the broker to acknowledge every event"),
        }
        sender.pump()?;
        if said.elapsed() >= Duration::from_secs(10) && !sender.unacked.is_empty() {
            said = Instant::now();
            tracing::warn!(
                unacknowledged = sender.unacked.len(),
                waited_secs = waiting.elapsed().as_secs(),
                "events not yet acknowledged by the broker"
            );
        }
    }
    progress.finish();
    Ok(())
}

/// How long a producer may go with events unacknowledged and no delivery report at all before
/// it is taken for stuck. Seen in a broker restart: an idempotent producer that had reconnected
/// sat on 106,342 events for minutes without sending them or timing them out.
const STALL: Duration = Duration::from_secs(30);

/// New producers made in one run before `strata generate` gives up.
const MAX_RECOVERIES: u32 = 5;

/// The events produced and not yet acknowledged, and the producer they went through.
///
/// Each event is produced once, also when a producer gets stuck: idempotence keeps a producer's
/// retries from writing an event twice, and a stuck producer is replaced this way: its queue is
/// purged and it is closed, then the topic is read from each partition's last acknowledged
/// offset to its end, and only the unacknowledged events not found there are sent again, through
/// a new producer.
struct Sender<'a> {
    cfg: &'a KafkaConfig,
    producer: ThreadedProducer<Deliveries>,
    unacked: HashMap<usize, Generated>,
    /// Per partition, where the topic may hold events this run has not seen acknowledged: one
    /// past the last acknowledged offset, or the partition's end when the run began.
    read_from: BTreeMap<i32, i64>,
    last_report: Instant,
    recoveries: u32,
}

/// What the delivery reports said since they were last taken.
#[derive(Default)]
struct Reports {
    acked: Vec<(usize, i32, i64)>,
    failed: Vec<usize>,
    last_error: Option<String>,
}

/// The producer's context: delivery reports kept for the producing thread.
struct Deliveries(Mutex<Reports>);

impl ClientContext for Deliveries {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        kafka::forward_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        kafka::forward_error(&error, reason);
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, seq: usize) {
        let mut r = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(m) => r.acked.push((seq, m.partition(), m.offset())),
            Err((e, _)) => {
                r.failed.push(seq);
                r.last_error = Some(e.to_string());
            }
        }
    }
}

impl<'a> Sender<'a> {
    fn new(cfg: &'a KafkaConfig) -> anyhow::Result<Self> {
        // A topic created a moment ago may not have its leaders yet.
        let read_from =
            kafka::with_retries("reading the topic's ends", Duration::from_secs(60), || {
                topic_ends(cfg)
            })?;
        Ok(Sender {
            cfg,
            producer: new_producer(cfg)?,
            unacked: HashMap::new(),
            read_from,
            last_report: Instant::now(),
            recoveries: 0,
        })
    }

    /// Produces event `seq`, waiting while librdkafka's queue is full.
    fn send(&mut self, seq: usize, g: Generated) -> anyhow::Result<()> {
        self.enqueue(seq, &g)?;
        self.unacked.insert(seq, g);
        Ok(())
    }

    fn enqueue(&mut self, seq: usize, g: &Generated) -> anyhow::Result<()> {
        loop {
            let record = BaseRecord::with_opaque_to(&self.cfg.topic, seq)
                .key(g.key.as_bytes())
                .payload(g.payload.as_slice());
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(2));
                    self.pump()?;
                }
                Err((e, _)) => return Err(e).context("producing an event"),
            }
        }
    }

    /// Takes the delivery reports; replaces the producer if it is stuck or gave up on events.
    fn pump(&mut self) -> anyhow::Result<()> {
        let idle = self.producer.in_flight_count() == 0;
        let reports = std::mem::take(
            &mut *self
                .producer
                .context()
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        self.take(&reports);
        if self.unacked.is_empty() {
            return Ok(());
        }
        if !reports.failed.is_empty() || idle {
            let why = format!(
                "{} deliveries failed ({})",
                reports.failed.len(),
                reports.last_error.as_deref().unwrap_or("no error given")
            );
            return self.recover(&why, true);
        }
        if self.last_report.elapsed() >= STALL {
            let why = format!("no delivery report in {} s", STALL.as_secs());
            return self.recover(&why, true);
        }
        Ok(())
    }

    fn take(&mut self, reports: &Reports) {
        if !reports.acked.is_empty() || !reports.failed.is_empty() {
            self.last_report = Instant::now();
        }
        for &(seq, partition, offset) in &reports.acked {
            self.unacked.remove(&seq);
            let from = self.read_from.entry(partition).or_insert(0);
            *from = (*from).max(offset + 1);
        }
    }

    /// Replaces the producer: closes it, keeps as acknowledged the unacknowledged events that
    /// the topic holds, and sends the others again through a new one. `reports`: whether the
    /// delivery reports of the closing producer are taken (always, except under the fault).
    fn recover(&mut self, why: &str, reports: bool) -> anyhow::Result<()> {
        self.recoveries += 1;
        if self.recoveries > MAX_RECOVERIES {
            anyhow::bail!(
                "{} events were not acknowledged by the broker after {MAX_RECOVERIES} new producers ({why})",
                self.unacked.len()
            );
        }
        tracing::warn!(
            unacknowledged = self.unacked.len(),
            "producer replaced: {why}; the topic is read back so that no event is sent twice"
        );
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        let _ = self.producer.flush(Duration::from_secs(5));
        let fresh = new_producer(self.cfg)?;
        let old = std::mem::replace(&mut self.producer, fresh);
        let last = std::mem::take(
            &mut *old
                .context()
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        drop(old);
        // A produce request the broker had read before the connection closed is still written;
        // give it time to land before reading the topic.
        std::thread::sleep(Duration::from_secs(2));
        if reports {
            self.take(&last);
        }
        let found =
            kafka::with_retries("reading back the topic", Duration::from_secs(300), || {
                self.found_in_topic()
                    .map_err(|e| strata_common::Error::Other(format!("{e:#}")))
            })?;
        for seq in &found {
            self.unacked.remove(seq);
        }
        let mut resend: Vec<usize> = self.unacked.keys().copied().collect();
        resend.sort_unstable();
        let (already, again) = (found.len(), resend.len());
        for seq in resend {
            if let Some(g) = self.unacked.remove(&seq) {
                self.enqueue(seq, &g)?;
                self.unacked.insert(seq, g);
            }
        }
        tracing::info!(
            already_written = already,
            sent_again = again,
            "unacknowledged events read back from the topic"
        );
        self.last_report = Instant::now();
        Ok(())
    }

    /// The unacknowledged events that the topic holds past the acknowledged offsets.
    fn found_in_topic(&self) -> anyhow::Result<Vec<usize>> {
        let mut waiting: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut seqs: Vec<usize> = self.unacked.keys().copied().collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        for seq in seqs {
            let g = &self.unacked[&seq];
            waiting
                .entry(identity(g.key.as_bytes(), &g.payload))
                .or_default()
                .push(seq);
        }
        let consumer: BaseConsumer = kafka::client_config_with(
            self.cfg,
            &[
                // Assigned, never subscribed: the group only names the client, nothing is
                // committed under it.
                ("group.id", "strata-generate-read-back"),
                ("enable.partition.eof", "true"),
                ("enable.auto.commit", "false"),
            ],
        )
        .create()
        .context("creating a consumer to read the topic back")?;
        let ends = kafka::high_watermarks(&consumer, &self.cfg.topic)?;
        let mut tpl = TopicPartitionList::new();
        let mut open = BTreeMap::new();
        for (&p, &end) in &ends {
            let from = self.read_from.get(&p).copied().unwrap_or(0).min(end);
            if from < end {
                tpl.add_partition_offset(&self.cfg.topic, p, Offset::Offset(from))?;
                open.insert(p, end);
            }
        }
        consumer
            .assign(&tpl)
            .context("assigning the partitions to read back")?;
        let mut found = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !open.is_empty() {
            if Instant::now() > deadline {
                anyhow::bail!("reading the topic back did not reach its end in 120 s");
            }
            match consumer.poll(Duration::from_millis(500)) {
                None => {}
                Some(Ok(m)) => {
                    let id = identity(m.key().unwrap_or_default(), m.payload().unwrap_or_default());
                    if let Some(seq) = waiting.get_mut(&id).and_then(Vec::pop) {
                        found.push(seq);
                    }
                    if open
                        .get(&m.partition())
                        .is_some_and(|&end| m.offset() + 1 >= end)
                    {
                        open.remove(&m.partition());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                }
                Some(Err(e)) => return Err(e).context("reading the topic back"),
            }
        }
        Ok(found)
    }
}

/// The producer: idempotent, so that a batch sent again after a broker restart is written
/// once. Any property given with --kafka (compression.type=zstd, ...) wins over these.
fn new_producer(cfg: &KafkaConfig) -> anyhow::Result<ThreadedProducer<Deliveries>> {
    kafka::client_config_with(
        cfg,
        &[
            ("linger.ms", "20"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.messages", "500000"),
            ("compression.type", "none"),
            ("enable.idempotence", "true"),
        ],
    )
    .create_with_context(Deliveries(Mutex::default()))
    .context("creating the producer")
}

/// Each partition's end (its high watermark).
fn topic_ends(cfg: &KafkaConfig) -> strata_common::Result<BTreeMap<i32, i64>> {
    let consumer: BaseConsumer = kafka::client_config(cfg).create().map_err(|e| {
        strata_common::Error::kafka("creating a client to read the topic's ends", e)
    })?;
    kafka::high_watermarks(&consumer, &cfg.topic)
}

/// A message's identity for the read-back: its key and payload, hashed.
fn identity(key: &[u8], payload: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}
