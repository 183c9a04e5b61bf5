//! The speed layer's consume loop: one thread polls the consumer and hands each message to the
//! worker that owns its partition ([`crate::worker`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::Message;
use strata_common::config::Config;
use strata_common::disk;
use strata_common::handoff::Partition;
use strata_common::kafka::{self, DeadLetters};
use strata_common::speed_store::{self, meta_key, Cf, SpeedReader};
use strata_common::undecodable::{self, Change, Skipped, StallWatch};
use tokio_util::sync::CancellationToken;

use crate::state::SpeedState;
use crate::worker::{seed_of, Input, Pipeline, Record, Seed, Settings};
use crate::Result;

/// The partitions the consumer group has assigned to this instance, as of the last rebalance
/// (refreshed every 100 ms); what it offers serving layers that mirror it.
pub type Held = std::sync::Arc<std::sync::Mutex<Vec<Partition>>>;

/// A speed layer bound to its state directory.
pub struct SpeedLayer {
    cfg: Config,
    state: SpeedState,
    held: Held,
}

impl SpeedLayer {
    /// Opens the speed state under the configured data directory.
    pub fn open(cfg: Config) -> Result<Self> {
        cfg.validation.rules()?;
        disk::check(&cfg.data_dir, cfg.min_free_mb)?;
        let state = SpeedState::open(&cfg.speed_dir(), cfg.handoff.block_size)?;
        Ok(SpeedLayer {
            cfg,
            state,
            held: Held::default(),
        })
    }

    /// The layer's database, for the endpoint serving layers pull from in the same process.
    pub fn db(&self) -> std::sync::Arc<rocksdb::DB> {
        self.state.db()
    }

    /// The partitions assigned to this instance now.
    pub fn held(&self) -> Held {
        self.held.clone()
    }

    /// A reader of this layer's state for a serving layer in the same process.
    pub fn reader(&self) -> SpeedReader {
        SpeedReader::shared(self.state.db())
    }

    /// What the workers need, from the configuration.
    pub fn settings(cfg: &Config) -> Result<Settings> {
        Ok(Settings {
            topic: cfg.kafka.topic.clone(),
            rules: cfg.validation.rules()?,
            rule: cfg.dedupe_rule(),
            flush_every: Duration::from_millis(cfg.speed.flush_interval_ms),
            flush_max: cfg.speed.flush_max_events,
            data_dir: cfg.data_dir.clone(),
            batch_dir: cfg.speed_batch_dir(),
            min_free_mb: cfg.min_free_mb,
        })
    }

    /// Consumes until `shutdown` is cancelled, then lets the workers write their state and
    /// returns. Blocking: run it on a thread of its own.
    pub fn run(self, shutdown: CancellationToken) -> Result<()> {
        let SpeedLayer { cfg, state, held } = self;
        let db = state.db();
        // In a speed cluster, a partition the instance holds no state of starts at the newest batch version's cutoff
        // when the version has the dedupe rule's state there (the worker is sent it before the
        // partition's first record), else at the start of what Kafka holds.
        let seeds: Arc<Mutex<BTreeMap<Partition, Seed>>> = Arc::default();
        let seeding = Arc::new(AtomicBool::new(false));
        let (batch_dir, block_size) = (cfg.speed_batch_dir(), cfg.handoff.block_size);
        // Only an instance of a speed cluster (`speed.http`): a single speed layer reads every
        // partition whole, so that its counters (accepted, rejected, copies) cover the topic.
        let seeded = cfg.speed.http.is_some();
        let positions = || {
            let (seeds, seeding, db) = (seeds.clone(), seeding.clone(), db.clone());
            let batch_dir = batch_dir.clone();
            Box::new(move |p| -> strata_common::Result<Option<i64>> {
                let v = db
                    .get_cf(speed_store::cf(&db, Cf::Meta)?, meta_key::next_offset(p))
                    .map_err(|e| strata_common::Error::rocks("read speed offsets", e))?;
                if let Some(at) = v.and_then(|b| speed_store::decode_i64(&b)) {
                    return Ok(Some(at));
                }
                if !seeded {
                    return Ok(None);
                }
                match seed_of(&batch_dir, p, block_size) {
                    Ok(Some(seed)) => {
                        let at = seed.cutoff;
                        if let Ok(mut s) = seeds.lock() {
                            s.insert(p, seed);
                            seeding.store(true, Ordering::Release);
                            return Ok(Some(at));
                        }
                        Ok(None)
                    }
                    Ok(None) => Ok(None),
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "cannot read the batch version's dedupe state; reading the partition from Kafka's start");
                        Ok(None)
                    }
                }
            })
        };
        let group = cfg.consumer_group("speed");
        let member = kafka::member_id(state.path(), "speed")?;
        let new_consumer =
            || kafka::resuming_consumer(&cfg.kafka, &group, Some(&member), positions());
        let mut consumer = new_consumer()?;
        let mut fences = kafka::Fences::default();
        let topic = cfg.kafka.topic.clone();
        let workers = cfg.speed.workers();
        let path = state.path().to_path_buf();
        let db = state.db();
        let settings = Self::settings(&cfg)?;
        let (kafka_cfg, dlq_topic) = (cfg.kafka.clone(), cfg.dlq_topic());
        // Per partition: the offset after the last record handed to a worker, or the last
        // position forwarded to it; at first, the stored offset (where the consumer starts).
        let mut handed: BTreeMap<Partition, i64> = state
            .parts()
            .iter()
            .map(|(&p, m)| (p, m.next_offset))
            .collect();
        let mut pipeline = Pipeline::start(
            state,
            workers,
            || DeadLetters::new(&kafka_cfg, dlq_topic.clone()),
            settings,
            shutdown.clone(),
        )?;
        let shared = pipeline.shared();
        let anchor = disk::Anchor::take(&cfg.data_dir)?;

        let mut last_position_check = Instant::now();
        let mut last_held = Instant::now();
        let mut last_commit = Instant::now();
        let mut last_log = Instant::now();
        let mut consumed_since_log = 0u64;
        let mut errors_since_log = 0u64;
        let mut stalls = StallWatch::new(&cfg.kafka);
        let policy = cfg.kafka.undecodable;
        tracing::info!(topic = %topic, group = %group, workers, state = %path.display(), "speed layer consuming");

        let outcome: Result<()> = (|| {
            loop {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                let polled = consumer.poll(Duration::from_millis(20));
                // Partitions assigned during that poll start at their seeds, if any, before
                // any record of theirs reaches a worker.
                if seeding.swap(false, Ordering::AcqRel) {
                    let taken = seeds.lock().map(|mut s| std::mem::take(&mut *s));
                    for (p, seed) in taken.unwrap_or_default() {
                        handed.insert(p, seed.cutoff);
                        pipeline.control(p, Input::Seed(p, seed))?;
                    }
                }
                match polled {
                    None => {
                        // Nothing more fetched: what waits in the batches goes to the workers.
                        pipeline.send_batches(true)?;
                        if last_position_check.elapsed() >= Duration::from_millis(100) {
                            last_position_check = Instant::now();
                            for (p, position) in kafka::positions(&consumer, &topic) {
                                let at = handed.entry(p).or_insert(0);
                                if position > *at {
                                    *at = position;
                                    pipeline.control(p, Input::Position(p, position))?;
                                }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        if kafka::check_fatal(&consumer, "speed layer", &mut fences)?
                            == kafka::Fatal::Fenced
                        {
                            // Records handed to the workers and not yet written come again
                            // from the stored offsets; the workers pass over those they have.
                            consumer = new_consumer()?;
                            continue;
                        }
                        // An undecodable batch is fetched again at once, without delaying the
                        // other partitions; the stall watch finds which partition it is.
                        if !stalls.on_error(&e) {
                            if errors_since_log == 0 {
                                tracing::warn!(error = %e, "consume error; retrying");
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        errors_since_log += 1;
                    }
                    Some(Ok(msg)) => {
                        let (p, offset) = (msg.partition(), msg.offset());
                        consumed_since_log += 1;
                        handed.insert(p, offset + 1);
                        pipeline.push(Record {
                            partition: p,
                            offset,
                            timestamp: msg.timestamp().to_millis(),
                            key: msg.key().map(<[u8]>::to_vec),
                            payload: msg.payload().unwrap_or(&[]).to_vec(),
                        })?;
                        pipeline.send_batches(false)?;
                    }
                }
                if last_held.elapsed() >= Duration::from_millis(100) {
                    last_held = Instant::now();
                    let (now_held, _) = consumer.context().assignment();
                    if let Ok(mut h) = held.lock() {
                        *h = now_held;
                    }
                }
                if stalls.due() {
                    watch_stalls(
                        policy,
                        &mut stalls,
                        &mut pipeline,
                        &consumer,
                        &topic,
                        &mut handed,
                    )?;
                }
                if last_commit.elapsed() >= Duration::from_secs(1) {
                    last_commit = Instant::now();
                    pipeline.check()?;
                    anchor.check()?;
                    kafka::commit_for_lag(&consumer, &topic, &shared.offsets());
                    strata_common::fault::point("speed.group.committed");
                }
                if last_log.elapsed() >= Duration::from_secs(5) {
                    let secs = last_log.elapsed().as_secs_f64();
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let m = speed_store::rocks_memory(&db);
                        tracing::debug!(
                            memtables_mib = m.memtables >> 20,
                            table_readers_mib = m.table_readers >> 20,
                            block_cache_mib = m.block_cache >> 20,
                            "speed state memory in RocksDB"
                        );
                    }
                    let parts = shared.parts();
                    let (accepted, rejected, duplicates) =
                        parts.values().fold((0, 0, 0), |(a, r, d), m| {
                            (a + m.accepted, r + m.rejected, d + m.duplicates)
                        });
                    if consumed_since_log > 0 || errors_since_log > 0 {
                        tracing::info!(
                            rate = format!("{:.0}/s", consumed_since_log as f64 / secs),
                            accepted,
                            rejected,
                            duplicates,
                            errors = errors_since_log,
                            stalled = ?stalls.stalled().keys().collect::<Vec<_>>(),
                            offsets = ?shared.offsets(),
                            "speed layer progress"
                        );
                    }
                    consumed_since_log = 0;
                    errors_since_log = 0;
                    last_log = Instant::now();
                }
            }
        })();
        let finished = pipeline.finish();
        outcome?;
        finished?;
        tracing::info!(offsets = ?shared.offsets(), "speed layer stopped; state flushed");
        Ok(())
    }
}

/// Finds partitions stopped at undecodable records and, with `kafka.undecodable = "skip"`,
/// moves them past: the worker records the range (dead-letter topic first, then the new offset
/// in its next atomic write) and the consumer seeks past it.
fn watch_stalls(
    policy: undecodable::Policy,
    stalls: &mut StallWatch,
    pipeline: &mut Pipeline,
    consumer: &kafka::ResumingConsumer,
    topic: &str,
    handed: &mut BTreeMap<Partition, i64>,
) -> Result<()> {
    let (held, _) = consumer.context().assignment();
    let positions = held
        .iter()
        .map(|&p| (p, handed.get(&p).copied().unwrap_or(0)))
        .collect();
    for change in stalls.check(&positions)? {
        match change {
            Change::Cleared(p) => {
                tracing::info!(partition = p, "partition moves again");
                pipeline.control(p, Input::Stall(p, None))?;
            }
            Change::Stalled(p, stall) => {
                tracing::error!(
                    partition = p,
                    offset = stall.offset,
                    reason = %stall.reason,
                    policy = ?policy,
                    "{topic}/{p} cannot be decoded from offset {}; {}",
                    stall.offset,
                    match policy {
                        undecodable::Policy::Stall => "waiting there (set kafka.undecodable = \"skip\" to pass over it)",
                        undecodable::Policy::Skip => "passing over the undecodable records",
                    }
                );
                if policy == undecodable::Policy::Stall {
                    pipeline.control(p, Input::Stall(p, Some(stall)))?;
                    continue;
                }
                let Some(end) = stalls.end_of(p, &stall)? else {
                    pipeline.control(p, Input::Stall(p, Some(stall)))?;
                    continue;
                };
                let skipped = Skipped {
                    from: stall.offset,
                    to: end,
                    reason: stall.reason,
                    at: strata_common::time::now_millis(),
                };
                pipeline.control(p, Input::Skip(p, skipped))?;
                handed.insert(p, end);
                kafka::seek(consumer, topic, p, end)?;
                stalls.clear(p);
            }
        }
    }
    Ok(())
}
