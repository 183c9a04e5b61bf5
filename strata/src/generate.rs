//! `strata generate`: the seeded stream, produced to the topic.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use strata_common::config::Config;
use strata_common::generate::{GenConfig, Generator};
use strata_common::kafka;
use strata_common::progress::Progress;
use strata_common::time::{now_millis, parse_rfc3339};

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
    // Idempotent, so that a batch sent again after a broker restart is written once; any
    // property given with --kafka (compression.type=zstd, ...) wins over these.
    // Each event the broker does not acknowledge (librdkafka gives up after
    // `message.timeout.ms`) is counted and logged, so that a stream that did not arrive is never
    // reported as produced.
    let producer: ThreadedProducer<kafka::DeliveryTracker> = kafka::client_config_with(
        &cfg.kafka,
        &[
            ("linger.ms", "20"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.messages", "500000"),
            ("compression.type", "none"),
            ("enable.idempotence", "true"),
        ],
    )
    .create_with_context(kafka::DeliveryTracker::new("event"))
    .context("creating the producer")?;
    let count = gen_cfg.count;
    let mut progress = Progress::new("generate", Some(count));
    let started = Instant::now();
    for (i, g) in Generator::new(gen_cfg).enumerate() {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let mut record = BaseRecord::to(&cfg.kafka.topic)
            .key(g.key.as_bytes())
            .payload(g.payload.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err((e, _)) => return Err(e).context("producing an event"),
            }
        }
        progress.inc(1);
    }
    // librdkafka gives up on an event after `message.timeout.ms`; until then, say every 10 s
    // how many are still waiting for the broker.
    let waiting = Instant::now();
    let mut said = waiting;
    while producer.in_flight_count() > 0 {
        match producer.flush(Duration::from_secs(1)) {
            Ok(()) => break,
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {}
            Err(e) => return Err(e).context("waiting for the broker to acknowledge every event"),
        }
        if said.elapsed() >= Duration::from_secs(10) {
            said = Instant::now();
            tracing::warn!(
                in_flight = producer.in_flight_count(),
                waited_secs = waiting.elapsed().as_secs(),
                "events not yet acknowledged by the broker"
            );
        }
    }
    let failed = producer.context().failed();
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {count} events were not acknowledged by the broker (each is in the log)"
        );
    }
    progress.finish();
    Ok(())
}
