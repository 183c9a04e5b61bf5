//! The speed layer's consume loop.

use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::Message;
use strata_common::batch_store;
use strata_common::config::Config;
use strata_common::dedupe::Decision;
use strata_common::disk;
use strata_common::event::{decode, Rules};
use strata_common::handoff::block_of;
use strata_common::kafka::{self, DeadLetters};
use strata_common::speed_store::{self, meta_key, Cf, SpeedReader};
use strata_common::undecodable::{self, Change, Skipped, StallWatch};
use tokio_util::sync::CancellationToken;

use crate::pending::Pending;
use crate::state::SpeedState;
use crate::Result;

/// A speed layer bound to its state directory.
pub struct SpeedLayer {
    cfg: Config,
    rules: Rules,
    state: SpeedState,
}

impl SpeedLayer {
    /// Opens the speed state under the configured data directory.
    pub fn open(cfg: Config) -> Result<Self> {
        let rules = cfg.validation.rules()?;
        disk::check(&cfg.data_dir, cfg.min_free_mb)?;
        let state = SpeedState::open(&cfg.speed_dir(), cfg.handoff.block_size)?;
        Ok(SpeedLayer { cfg, rules, state })
    }

    /// A reader of this layer's state for a serving layer in the same process.
    pub fn reader(&self) -> SpeedReader {
        SpeedReader::shared(self.state.db())
    }

    /// Consumes until `shutdown` is cancelled, then flushes and returns. Blocking: run it on a
    /// thread of its own.
    pub fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let db = self.state.db();
        let positions = Box::new(move |p| -> strata_common::Result<Option<i64>> {
            let v = db
                .get_cf(speed_store::cf(&db, Cf::Meta)?, meta_key::next_offset(p))
                .map_err(|e| strata_common::Error::rocks("read speed offsets", e))?;
            Ok(v.and_then(|b| speed_store::decode_i64(&b)))
        });
        let group = self.cfg.consumer_group("speed");
        let consumer = kafka::resuming_consumer(&self.cfg.kafka, &group, positions)?;
        let mut dlq = DeadLetters::new(&self.cfg.kafka, self.cfg.dlq_topic())?;
        let rule = self.cfg.dedupe_rule();
        let topic = self.cfg.kafka.topic.clone();
        let flush_every = Duration::from_millis(self.cfg.speed.flush_interval_ms);
        let flush_max = self.cfg.speed.flush_max_events;
        let block_size = self.state.block_size();

        let mut pending = Pending::default();
        let mut last_flush = Instant::now();
        let mut last_drop_check = Instant::now() - Duration::from_secs(60);
        let mut last_sweep = Instant::now();
        let mut last_position_check = Instant::now();
        let mut last_log = Instant::now();
        let mut consumed_since_log = 0u64;
        let mut errors_since_log = 0u64;
        let mut stalls = StallWatch::new(&self.cfg.kafka);
        tracing::info!(topic = %topic, group = %group, state = %self.state.path().display(), "speed layer consuming");

        loop {
            if shutdown.is_cancelled() {
                break;
            }
            // With events waiting to be written, wait no longer than until they may be: when
            // nothing comes by then, the consumer has run dry and they are written at once.
            let wait = if pending.is_empty() {
                Duration::from_millis(20)
            } else {
                (flush_every / 5).saturating_sub(last_flush.elapsed())
            };
            let mut dry = false;
            match consumer.poll(wait) {
                None => {
                    dry = true;
                    if last_position_check.elapsed() >= Duration::from_millis(100) {
                        last_position_check = Instant::now();
                        for (p, position) in kafka::positions(&consumer, &topic) {
                            let part = self.state.part(p);
                            if position > part.next_offset {
                                part.next_offset = position;
                                pending.touched.insert(p);
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    kafka::check_fatal(&consumer, "speed layer")?;
                    // An undecodable batch is fetched again at once, without delaying the other
                    // partitions; the stall watch finds which partition it is.
                    if !stalls.on_error(&e) {
                        if errors_since_log == 0 {
                            tracing::warn!(error = %e, "consume error; retrying");
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    errors_since_log += 1;
                }
                Some(Ok(msg)) => {
                    let p = msg.partition();
                    let offset = msg.offset();
                    let part = self.state.part(p);
                    if offset < part.next_offset {
                        continue;
                    }
                    consumed_since_log += 1;
                    let payload = msg.payload().unwrap_or(&[]);
                    match decode(payload, msg.timestamp().to_millis(), &self.rules) {
                        Err(reject) => {
                            let source = format!("{topic}/{p}@{offset}");
                            dlq.send(
                                msg.key(),
                                payload,
                                reject.code.as_str(),
                                &reject.to_string(),
                                &source,
                            )?;
                            let part = self.state.part(p);
                            part.rejected += 1;
                            part.next_offset = offset + 1;
                        }
                        Ok(event) => {
                            let remembered = self.state.remembered(&pending, p, &event.id)?;
                            let part = self.state.part(p);
                            part.accepted += 1;
                            part.next_offset = offset + 1;
                            match rule.decide(&mut part.watermark, remembered, event.ts) {
                                Decision::Count { expiry } => {
                                    pending.remembered.insert((p, event.id.clone()), expiry);
                                    // Blocks below the first live one are covered by a
                                    // published batch version already.
                                    let block = block_of(offset, block_size);
                                    if block >= part.first_live_block {
                                        pending.fold(p, block, &event);
                                    }
                                }
                                Decision::Duplicate => part.duplicates += 1,
                            }
                        }
                    }
                    pending.touched.insert(p);
                    pending.messages += 1;
                }
            }

            // Written every `flush_every` while messages keep coming (a backlog is folded in
            // memory between writes), and as soon as the consumer runs dry, but not more often
            // than every fifth of `flush_every`: the answers then lag the broker's delivery by
            // the time to fold and write, not by up to a whole interval.
            let since = last_flush.elapsed();
            if !pending.is_empty()
                && (pending.messages >= flush_max
                    || since >= flush_every
                    || (dry && since >= flush_every / 5))
            {
                self.flush(&mut pending, &mut dlq, &consumer, &topic, &shutdown)?;
                last_flush = Instant::now();
                if last_sweep.elapsed() >= Duration::from_secs(60) {
                    let removed = self.state.sweep_dedupe()?;
                    tracing::debug!(removed, "swept expired dedupe memory");
                    last_sweep = Instant::now();
                }
            }
            self.watch_stalls(&mut stalls, &mut pending, &mut dlq, &consumer, &topic)?;
            if last_drop_check.elapsed() >= Duration::from_secs(1) {
                last_drop_check = Instant::now();
                self.drop_covered()?;
            }
            if last_log.elapsed() >= Duration::from_secs(5) {
                let secs = last_log.elapsed().as_secs_f64();
                let (accepted, rejected, duplicates) =
                    self.state.parts().values().fold((0, 0, 0), |(a, r, d), m| {
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
                        offsets = ?self.state.next_offsets(),
                        "speed layer progress"
                    );
                }
                consumed_since_log = 0;
                errors_since_log = 0;
                last_log = Instant::now();
            }
        }
        self.flush(&mut pending, &mut dlq, &consumer, &topic, &shutdown)?;
        tracing::info!(offsets = ?self.state.next_offsets(), "speed layer stopped; state flushed");
        Ok(())
    }

    fn flush(
        &mut self,
        pending: &mut Pending,
        dlq: &mut DeadLetters,
        consumer: &kafka::ResumingConsumer,
        topic: &str,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        // Dead letters must be durable before the offsets move past their messages. If the
        // layer is asked to stop first, nothing is written: the messages are consumed again.
        if !dlq.flush(&|| shutdown.is_cancelled())? {
            return Ok(());
        }
        // Stop before a write the disk cannot take: the state and offsets stay as last written.
        disk::check(&self.cfg.data_dir, self.cfg.min_free_mb)?;
        self.state.flush(pending)?;
        kafka::commit_for_lag(consumer, topic, &self.state.next_offsets());
        Ok(())
    }

    /// Finds partitions stopped at undecodable records and, with `kafka.undecodable = "skip"`,
    /// moves them past: the range goes to the dead-letter topic and, with the new offset, into
    /// the next flush's atomic write.
    fn watch_stalls(
        &mut self,
        stalls: &mut StallWatch,
        pending: &mut Pending,
        dlq: &mut DeadLetters,
        consumer: &kafka::ResumingConsumer,
        topic: &str,
    ) -> Result<()> {
        let (held, _) = consumer.context().assignment();
        let positions = held
            .iter()
            .map(|&p| (p, self.state.part(p).next_offset))
            .collect();
        for change in stalls.check(&positions)? {
            match change {
                Change::Cleared(p) => {
                    tracing::info!(partition = p, "partition moves again");
                    self.state.set_stall(p, None)?;
                }
                Change::Stalled(p, stall) => {
                    let policy = self.cfg.kafka.undecodable;
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
                        self.state.set_stall(p, Some(stall))?;
                        continue;
                    }
                    let Some(end) = stalls.end_of(p, &stall)? else {
                        self.state.set_stall(p, Some(stall))?;
                        continue;
                    };
                    let detail = format!(
                        "offsets {}..{} of {topic}/{p} cannot be decoded ({}) and were skipped",
                        stall.offset,
                        end - 1,
                        stall.reason
                    );
                    tracing::warn!(partition = p, from = stall.offset, to = end, "{detail}");
                    dlq.send(
                        None,
                        &[],
                        undecodable::DLQ_CODE,
                        &detail,
                        &format!("{topic}/{p}@{}", stall.offset),
                    )?;
                    let part = self.state.part(p);
                    part.skipped.push(Skipped {
                        from: stall.offset,
                        to: end,
                        reason: stall.reason,
                        at: strata_common::time::now_millis(),
                    });
                    part.next_offset = end;
                    pending.touched.insert(p);
                    kafka::seek(consumer, topic, p, end)?;
                    stalls.clear(p);
                    self.state.set_stall(p, None)?;
                }
            }
        }
        Ok(())
    }

    fn drop_covered(&mut self) -> Result<()> {
        let Some(manifest) = batch_store::read_current(&self.cfg.data_dir)? else {
            return Ok(());
        };
        let dropped = self
            .state
            .drop_covered(&manifest.cutoffs, manifest.block_size)?;
        if dropped > 0 {
            tracing::info!(
                version = manifest.version,
                blocks = dropped,
                "dropped speed blocks covered by the batch version"
            );
        }
        Ok(())
    }
}
