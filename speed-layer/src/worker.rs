//! The speed layer's workers: the consumer thread hands each message to the worker that owns its
//! partition (`p % workers`), and each worker decodes, validates, dedupes and folds its
//! partitions' messages and writes their state, with their offsets, in writes of its own.
//!
//! The guarantee is the single-threaded layer's, per partition: one worker owns a partition, sees
//! its messages in offset order (one FIFO channel per worker), and writes the partition's blocks,
//! dedupe memory and next offset in one `WriteBatch`; shards write disjoint keys of one database,
//! so a crash leaves each partition at its last write. Control messages (a position moved past
//! transaction markers, a stall, a skipped range) travel in the same channel, after the records
//! before them.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use strata_common::batch_store;
use strata_common::dedupe::{Decision, Dedupe};
use strata_common::disk;
use strata_common::event::{decode, Rules};
use strata_common::handoff::{block_of, Offsets, Partition};
pub use strata_common::kafka::Letters;
use strata_common::speed_store::PartitionMeta;
use strata_common::undecodable::{self, Skipped, Stall};
use tokio_util::sync::CancellationToken;

use crate::pending::Pending;
use crate::state::{shard_of, SpeedState};
use crate::{Error, Result};

/// One message as the consumer handed it out.
#[derive(Clone, Debug)]
pub struct Record {
    pub partition: Partition,
    pub offset: i64,
    /// The record's timestamp (epoch ms), if it has one.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// What a worker is sent.
pub enum Input {
    Records(Vec<Record>),
    /// The consumer's position in the partition moved past records it does not hand out (the
    /// markers ending transactions, records of aborted ones).
    Position(Partition, i64),
    /// The partition waits in front of undecodable records (`Some`) or moves again (`None`).
    Stall(Partition, Option<Stall>),
    /// The consumer passed over undecodable records (`kafka.undecodable = "skip"`).
    Skip(Partition, Skipped),
    /// A partition this layer holds no state of starts at a batch version's cutoff, with the
    /// dedupe rule's state there (sent before its first record).
    Seed(Partition, Seed),
}

/// Where a partition taken over without state starts: a published batch version's cutoff, and
/// the dedupe rule's state at it (`batch_store::read_dedupe_state`).
#[derive(Clone, Debug)]
pub struct Seed {
    pub version: u64,
    pub cutoff: i64,
    pub state: Vec<u8>,
}

/// The seed of partition `p` from the newest batch version under `batch_dir`, if it has one
/// (a cutoff past the start and the dedupe state there) and cuts blocks of `block_size`.
pub fn seed_of(
    batch_dir: &std::path::Path,
    p: Partition,
    block_size: u64,
) -> strata_common::Result<Option<Seed>> {
    let Some(m) = batch_store::read_current(batch_dir)? else {
        return Ok(None);
    };
    let cutoff = m.cutoffs.get(&p).copied().unwrap_or(0);
    if cutoff <= 0 || m.block_size != block_size {
        return Ok(None);
    }
    Ok(
        batch_store::read_dedupe_state(batch_dir, m.version, p)?.map(|state| Seed {
            version: m.version,
            cutoff,
            state,
        }),
    )
}

/// What every worker needs to know.
#[derive(Clone)]
pub struct Settings {
    pub topic: String,
    pub rules: Rules,
    pub rule: Dedupe,
    pub flush_every: Duration,
    pub flush_max: usize,
    /// Checked before every write (`min-free-mb`).
    pub data_dir: std::path::PathBuf,
    /// Where published batch versions are read from, to drop the blocks they cover.
    pub batch_dir: std::path::PathBuf,
    pub min_free_mb: u64,
}

/// The workers' bookkeeping as of their last writes, for progress lines, lag commits and status.
#[derive(Default)]
pub struct Shared {
    flushed: Mutex<BTreeMap<Partition, PartitionMeta>>,
}

impl Shared {
    /// Each partition's stored bookkeeping.
    pub fn parts(&self) -> BTreeMap<Partition, PartitionMeta> {
        self.flushed.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Each partition's stored next offset.
    pub fn offsets(&self) -> Offsets {
        self.parts()
            .into_iter()
            .map(|(p, m)| (p, m.next_offset))
            .collect()
    }
}

/// Records a batch holds before it is sent to its worker.
const BATCH: usize = 512;
/// Batches waiting per worker: the consumer thread waits when a worker is this far behind.
const QUEUE: usize = 32;
/// The longest a record waits in a batch that is not full.
const BATCH_AGE: Duration = Duration::from_millis(2);

/// The workers, and the batches being filled for them.
pub struct Pipeline {
    senders: Vec<SyncSender<Input>>,
    handles: Vec<Option<JoinHandle<Result<()>>>>,
    batches: Vec<Vec<Record>>,
    oldest: Option<Instant>,
    shared: Arc<Shared>,
}

impl Pipeline {
    /// Starts one worker per shard of `state`, each with its own dead-letter sink.
    pub fn start<L: Letters + 'static>(
        state: SpeedState,
        workers: usize,
        mut letters: impl FnMut() -> strata_common::Result<L>,
        settings: Settings,
        stop: CancellationToken,
    ) -> Result<Pipeline> {
        let shared = Arc::new(Shared::default());
        if let Ok(mut f) = shared.flushed.lock() {
            *f = state.parts().clone();
        }
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for (i, shard) in state.split(workers).into_iter().enumerate() {
            let (tx, rx) = sync_channel(QUEUE);
            let worker = Worker {
                state: shard,
                pending: Pending::default(),
                letters: letters()?,
                settings: settings.clone(),
                shared: shared.clone(),
                stop: stop.clone(),
                anchor: disk::Anchor::take(&settings.data_dir).ok(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("speed-{i}"))
                .spawn(move || worker.run(rx))
                .map_err(|e| {
                    Error::Common(strata_common::Error::Other(format!(
                        "start a speed worker: {e}"
                    )))
                })?;
            senders.push(tx);
            handles.push(Some(handle));
        }
        Ok(Pipeline {
            batches: vec![Vec::with_capacity(BATCH); senders.len()],
            senders,
            handles,
            oldest: None,
            shared,
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    pub fn workers(&self) -> usize {
        self.senders.len()
    }

    /// Adds a record to its worker's batch, sending the batch when it is full.
    pub fn push(&mut self, record: Record) -> Result<()> {
        let w = shard_of(record.partition, self.senders.len());
        self.batches[w].push(record);
        self.oldest.get_or_insert_with(Instant::now);
        if self.batches[w].len() >= BATCH {
            self.send_batch(w)?;
        }
        Ok(())
    }

    /// Sends every batch that is not empty, when the oldest record has waited long enough or
    /// `now` says so (the consumer has nothing more fetched).
    pub fn send_batches(&mut self, now: bool) -> Result<()> {
        if !now && self.oldest.is_none_or(|t| t.elapsed() < BATCH_AGE) {
            return Ok(());
        }
        for w in 0..self.senders.len() {
            self.send_batch(w)?;
        }
        self.oldest = None;
        Ok(())
    }

    fn send_batch(&mut self, w: usize) -> Result<()> {
        if self.batches[w].is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batches[w], Vec::with_capacity(BATCH));
        self.send(w, Input::Records(batch))
    }

    /// Sends a control message to partition `p`'s worker, after the records before it.
    pub fn control(&mut self, p: Partition, input: Input) -> Result<()> {
        let w = shard_of(p, self.senders.len());
        self.send_batch(w)?;
        self.send(w, input)
    }

    fn send(&mut self, w: usize, input: Input) -> Result<()> {
        if self.senders[w].send(input).is_err() {
            // The worker stopped: its error is the reason.
            return Err(self.join(w).err().unwrap_or_else(|| {
                Error::Common(strata_common::Error::Other(format!(
                    "speed worker {w} stopped"
                )))
            }));
        }
        Ok(())
    }

    fn join(&mut self, w: usize) -> Result<()> {
        match self.handles[w].take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Common(strata_common::Error::Other(format!(
                "speed worker {w} panicked"
            )))),
            None => Ok(()),
        }
    }

    /// Fails with a worker's error if one has stopped.
    pub fn check(&mut self) -> Result<()> {
        for w in 0..self.handles.len() {
            if self.handles[w]
                .as_ref()
                .is_some_and(JoinHandle::is_finished)
            {
                self.join(w)?;
                return Err(Error::Common(strata_common::Error::Other(format!(
                    "speed worker {w} stopped"
                ))));
            }
        }
        Ok(())
    }

    /// Sends what is left, lets every worker write its last state, and waits for them.
    pub fn finish(mut self) -> Result<()> {
        let sent = self.send_batches(true);
        self.senders.clear();
        let mut first = sent;
        for w in 0..self.handles.len() {
            let r = self.join(w);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// One worker: a shard of the state, what it has folded since its last write, its dead letters.
struct Worker<L> {
    state: SpeedState,
    pending: Pending,
    letters: L,
    settings: Settings,
    shared: Arc<Shared>,
    stop: CancellationToken,
    /// The data directory's identity at start: a write that fails because the directory was
    /// removed, moved or replaced under the layer says so (not the file it could not open).
    anchor: Option<disk::Anchor>,
}

impl<L: Letters> Worker<L> {
    fn run(mut self, rx: Receiver<Input>) -> Result<()> {
        let flush_every = self.settings.flush_every;
        let mut last_flush = Instant::now();
        let mut last_drop_check = Instant::now() - Duration::from_secs(60);
        let mut last_sweep = Instant::now();
        loop {
            // With events waiting to be written, wait no longer than until they may be: when
            // nothing comes by then, the consumer has run dry and they are written at once.
            let wait = if self.pending.is_empty() {
                Duration::from_millis(50)
            } else {
                (flush_every / 5).saturating_sub(last_flush.elapsed())
            };
            let mut dry = false;
            match rx.recv_timeout(wait) {
                Ok(input) => self.apply(input)?,
                Err(RecvTimeoutError::Timeout) => dry = true,
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Written every `flush_every` while messages keep coming (a backlog is folded in
            // memory between writes), and as soon as nothing more has come, but not more often
            // than every fifth of `flush_every`.
            let since = last_flush.elapsed();
            if !self.pending.is_empty()
                && (self.pending.messages >= self.settings.flush_max
                    || since >= flush_every
                    || (dry && since >= flush_every / 5))
            {
                self.flush()?;
                last_flush = Instant::now();
                if last_sweep.elapsed() >= Duration::from_secs(60) {
                    let removed = self.state.sweep_dedupe()?;
                    tracing::debug!(removed, "swept expired dedupe memory");
                    last_sweep = Instant::now();
                }
            }
            if last_drop_check.elapsed() >= Duration::from_secs(1) {
                last_drop_check = Instant::now();
                self.drop_covered()?;
            }
        }
        self.flush()
    }

    fn apply(&mut self, input: Input) -> Result<()> {
        match input {
            Input::Records(records) => {
                for r in &records {
                    self.record(r)?;
                }
            }
            Input::Position(p, position) => {
                let part = self.state.part(p);
                if position > part.next_offset {
                    part.next_offset = position;
                    self.pending.touched.insert(p);
                }
            }
            Input::Stall(p, stall) => self.state.set_stall(p, stall)?,
            Input::Seed(p, seed) => self.seed(p, seed)?,
            Input::Skip(p, skipped) => {
                let topic = &self.settings.topic;
                let detail = format!(
                    "offsets {}..{} of {topic}/{p} cannot be decoded ({}) and were skipped",
                    skipped.from,
                    skipped.to - 1,
                    skipped.reason
                );
                tracing::warn!(
                    partition = p,
                    from = skipped.from,
                    to = skipped.to,
                    "{detail}"
                );
                self.letters.send(
                    None,
                    &[],
                    undecodable::DLQ_CODE,
                    &detail,
                    &format!("{topic}/{p}@{}", skipped.from),
                )?;
                let part = self.state.part(p);
                if skipped.to > part.next_offset {
                    part.next_offset = skipped.to;
                }
                part.skipped.push(skipped);
                self.pending.touched.insert(p);
                self.state.set_stall(p, None)?;
            }
        }
        Ok(())
    }

    /// Starts partition `p` at a batch version's cutoff with the dedupe rule's state there,
    /// unless the layer already holds state of it.
    fn seed(&mut self, p: Partition, seed: Seed) -> Result<()> {
        if self.state.part(p).next_offset > 0 {
            return Ok(());
        }
        let Some((watermark, ids)) = strata_common::dedupe::decode_handover(&seed.state) else {
            return Err(strata_common::Error::corrupt(
                "batch version",
                format!(
                    "the dedupe state of partition {p} in version {}",
                    seed.version
                ),
            )
            .into());
        };
        let remembered = ids.len();
        for (id, expiry) in ids {
            self.state
                .remember(&mut self.pending, p, id.to_string(), expiry)?;
        }
        let block_size = self.state.block_size();
        let part = self.state.part(p);
        part.next_offset = seed.cutoff;
        part.watermark = watermark;
        part.first_live_block = part.first_live_block.max(block_of(seed.cutoff, block_size));
        self.pending.touched.insert(p);
        tracing::info!(
            partition = p,
            version = seed.version,
            cutoff = seed.cutoff,
            remembered,
            "partition taken over at the batch version's cutoff, with the dedupe memory there"
        );
        Ok(())
    }

    fn record(&mut self, r: &Record) -> Result<()> {
        let (p, offset) = (r.partition, r.offset);
        if offset < self.state.part(p).next_offset {
            return Ok(());
        }
        match decode(&r.payload, r.timestamp, &self.settings.rules) {
            Err(reject) => {
                let source = format!("{}/{p}@{offset}", self.settings.topic);
                self.letters.send(
                    r.key.as_deref(),
                    &r.payload,
                    reject.code.as_str(),
                    &reject.to_string(),
                    &source,
                )?;
                strata_common::fault::point("speed.dlq.sent");
                let part = self.state.part(p);
                part.rejected += 1;
                part.next_offset = offset + 1;
            }
            Ok(event) => {
                let remembered = self.state.remembered(&self.pending, p, &event.id)?;
                let block_size = self.state.block_size();
                let part = self.state.part(p);
                part.accepted += 1;
                part.next_offset = offset + 1;
                match self
                    .settings
                    .rule
                    .decide(&mut part.watermark, remembered, event.ts)
                {
                    Decision::Count { expiry } => {
                        let first_live = part.first_live_block;
                        self.state
                            .remember(&mut self.pending, p, event.id.clone(), expiry)?;
                        // Blocks below the first live one are covered by a published batch
                        // version already.
                        let block = block_of(offset, block_size);
                        if block >= first_live {
                            self.pending.fold(p, block, &event);
                        }
                    }
                    Decision::Duplicate => part.duplicates += 1,
                }
            }
        }
        self.pending.touched.insert(p);
        self.pending.messages += 1;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // Dead letters must be durable before the offsets move past their messages. If the
        // layer is asked to stop first, nothing is written: the messages are consumed again.
        let stop = self.stop.clone();
        if !self.letters.flush(&|| stop.is_cancelled())? {
            return Ok(());
        }
        strata_common::fault::point("speed.dlq.acknowledged");
        // Stop before a write the disk cannot take: the state and offsets stay as last written.
        disk::check(&self.settings.data_dir, self.settings.min_free_mb)?;
        let touched: Vec<Partition> = self.pending.touched.iter().copied().collect();
        if let Err(e) = self.state.flush(&mut self.pending) {
            if let Some(Err(gone)) = self.anchor.as_ref().map(disk::Anchor::check) {
                return Err(gone.into());
            }
            return Err(e);
        }
        if let Ok(mut f) = self.shared.flushed.lock() {
            for p in touched {
                f.insert(p, self.state.part(p).clone());
            }
        }
        Ok(())
    }

    fn drop_covered(&mut self) -> Result<()> {
        let Some(manifest) = batch_store::read_current(&self.settings.batch_dir)? else {
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
