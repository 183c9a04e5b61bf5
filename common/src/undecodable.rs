//! Record batches a consumer cannot decode: corrupt on the broker's disk, or compressed with a
//! codec librdkafka does not have.
//!
//! librdkafka reports such a batch as a consume error that does not name its partition, and
//! fetches the same batch again and again: that partition stops while the others go on. A layer
//! therefore watches its partitions with a [`StallWatch`]: when such errors arrive, every
//! partition whose position has not moved is fetched alone by a probe consumer at that position,
//! so that an error can only be that partition's. A partition found that way is *stalled*: its
//! offset and the reason show in the log, `/v1/status` and `/metrics`.
//!
//! What then happens is the operator's choice, `kafka.undecodable`:
//! - `stall` (the default): the partition waits at the batch, nothing is lost; the operator
//!   repairs or deletes the data on the broker, or restarts the layer with `skip`;
//! - `skip`: the layer finds where the undecodable records end ([`Prober::batch_end`]) and moves
//!   past them; the range and the reason go to the dead-letter topic and into the layer's state,
//!   so that every later answer (and `strata verify`) knows those offsets hold no events.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::KafkaConfig;
use crate::handoff::Partition;
use crate::kafka::client_config_with;
use crate::time::{now_millis, Millis};
use crate::{Error, Result};

/// The dead-letter code of a skipped range of undecodable records.
pub const DLQ_CODE: &str = "undecodable_batch";

/// The most offsets passed over at once: a range that does not end within it is not skipped.
pub const MAX_SKIP: i64 = 1 << 24;

pub use crate::config::Policy;

/// A partition stopped in front of records it cannot decode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stall {
    /// The partition's next offset: the first record it cannot read is at or after it.
    pub offset: i64,
    /// librdkafka's error, e.g. `Local: Invalid compressed data`.
    pub reason: String,
    /// When the stall was found (epoch ms).
    pub since: Millis,
}

/// A range of offsets a layer passed over because it could not decode them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// First offset passed over.
    pub from: i64,
    /// Exclusive end: the first offset read again.
    pub to: i64,
    pub reason: String,
    /// When (epoch ms).
    pub at: Millis,
}

/// Whether a consume error is one librdkafka raises for a batch it cannot decode (and so will
/// raise again at every fetch of it); its code when so.
pub fn undecodable(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    let code = match e {
        KafkaError::MessageConsumption(c) => *c,
        _ => return None,
    };
    matches!(
        code,
        RDKafkaErrorCode::BadCompression
            | RDKafkaErrorCode::BadMessage
            | RDKafkaErrorCode::NotImplemented
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::UnsupportedCompressionType
    )
    .then_some(code)
}

/// What fetching one partition alone at an offset gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A record at or after the offset, or the partition's end: the offset can be read from.
    Readable,
    /// The undecodable error, with librdkafka's description.
    Undecodable(String),
    /// Nothing within the time allowed (a slow broker): no conclusion.
    Unknown,
}

/// A consumer of its own that fetches one partition at a time, directly assigned (it joins no
/// group and commits nothing), so that any error it sees belongs to that partition.
pub struct Prober {
    consumer: BaseConsumer,
    topic: String,
    patience: Duration,
}

impl Prober {
    pub fn new(cfg: &KafkaConfig) -> Result<Self> {
        let consumer: BaseConsumer = client_config_with(
            cfg,
            &[
                ("group.id", "strata.probe"),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("enable.partition.eof", "true"),
                ("fetch.wait.max.ms", "50"),
                ("queued.min.messages", "1"),
            ],
        )
        .create()
        .map_err(|e| Error::kafka("create the probe consumer", e))?;
        Ok(Prober {
            consumer,
            topic: cfg.topic.clone(),
            patience: Duration::from_secs(5),
        })
    }

    /// Fetches partition `p` alone from `offset`.
    pub fn probe(&self, p: Partition, offset: i64) -> Result<Probe> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, p, Offset::Offset(offset))
            .map_err(|e| Error::kafka("build the probe's assignment", e))?;
        self.consumer
            .assign(&tpl)
            .map_err(|e| Error::kafka("assign the probe", e))?;
        let deadline = Instant::now() + self.patience;
        let outcome = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Probe::Unknown;
            }
            match self.consumer.poll(left) {
                None => {}
                Some(Ok(m)) if m.partition() == p && m.offset() >= offset => break Probe::Readable,
                Some(Ok(_)) => {}
                Some(Err(KafkaError::PartitionEOF(q))) if q == p => break Probe::Readable,
                Some(Err(e)) => match undecodable(&e) {
                    Some(code) => break Probe::Undecodable(format!("{code}")),
                    None => tracing::debug!(error = %e, "probe: consume error"),
                },
            }
        };
        let _ = self.consumer.unassign();
        Ok(outcome)
    }

    /// The first offset after `from` that partition `p` can be read from again, when it cannot
    /// be read from `from`: librdkafka passes over a batch that ends before the offset it fetches
    /// from without decoding it, so fetching from inside an undecodable batch fails and fetching
    /// from past its end does not. Found by doubling the step, then bisecting; `None` when a
    /// probe is inconclusive or the records do not end within `limit` offsets.
    pub fn batch_end(&self, p: Partition, from: i64, limit: i64) -> Result<Option<i64>> {
        let mut bad = from;
        let mut step = 1i64;
        let good = loop {
            let at = from + step;
            match self.probe(p, at)? {
                Probe::Readable => break at,
                Probe::Undecodable(_) => bad = at,
                Probe::Unknown => return Ok(None),
            }
            if step > limit {
                return Ok(None);
            }
            step *= 2;
        };
        let (mut bad, mut good) = (bad, good);
        while good - bad > 1 {
            let mid = bad + (good - bad) / 2;
            match self.probe(p, mid)? {
                Probe::Readable => good = mid,
                Probe::Undecodable(_) => bad = mid,
                Probe::Unknown => return Ok(None),
            }
        }
        Ok(Some(good))
    }
}

/// Watches a consumer's partitions for stalls at undecodable batches.
pub struct StallWatch {
    cfg: KafkaConfig,
    prober: Option<Prober>,
    /// Undecodable errors since the last check.
    errors: u64,
    last_check: Instant,
    /// Per partition: its next offset at the last check.
    seen: BTreeMap<Partition, i64>,
    /// Per partition: an offset a probe found readable, and when (not probed again there for a
    /// minute: an idle partition does not move either).
    readable: BTreeMap<Partition, (i64, Instant)>,
    stalled: BTreeMap<Partition, Stall>,
}

/// What a check found.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// The partition is stopped in front of undecodable records.
    Stalled(Partition, Stall),
    /// A stalled partition moves again (its data was repaired, or it was skipped).
    Cleared(Partition),
}

/// How often positions are compared while undecodable errors arrive.
const CHECK_EVERY: Duration = Duration::from_secs(2);

impl StallWatch {
    pub fn new(cfg: &KafkaConfig) -> Self {
        StallWatch {
            cfg: cfg.clone(),
            prober: None,
            errors: 0,
            last_check: Instant::now(),
            seen: BTreeMap::new(),
            readable: BTreeMap::new(),
            stalled: BTreeMap::new(),
        }
    }

    /// Takes a consume error; true when it is an undecodable batch's (the caller then need not
    /// log it: the check reports the partition).
    pub fn on_error(&mut self, e: &KafkaError) -> bool {
        if undecodable(e).is_some() {
            self.errors += 1;
            true
        } else {
            false
        }
    }

    /// Partitions stalled now.
    pub fn stalled(&self) -> &BTreeMap<Partition, Stall> {
        &self.stalled
    }

    /// The prober, created on first use.
    pub fn prober(&mut self) -> Result<&Prober> {
        if self.prober.is_none() {
            self.prober = Some(Prober::new(&self.cfg)?);
        }
        match &self.prober {
            Some(p) => Ok(p),
            None => unreachable!("the prober was just created"),
        }
    }

    /// Whether a [`check`](StallWatch::check) is due (every two seconds): callers build the
    /// positions only then, not for every message.
    pub fn due(&self) -> bool {
        self.last_check.elapsed() >= CHECK_EVERY
    }

    /// Compares the layer's next offsets (`positions`, of the partitions it holds) with the last
    /// check's. A stalled partition that moved is cleared; while undecodable errors arrive, each
    /// partition that did not move is probed.
    pub fn check(&mut self, positions: &BTreeMap<Partition, i64>) -> Result<Vec<Change>> {
        self.last_check = Instant::now();
        let mut changes = Vec::new();
        self.stalled.retain(|p, s| {
            let still = positions.get(p) == Some(&s.offset);
            if !still {
                changes.push(Change::Cleared(*p));
            }
            still
        });
        let errors = std::mem::take(&mut self.errors);
        let previous = std::mem::replace(&mut self.seen, positions.clone());
        if errors == 0 {
            return Ok(changes);
        }
        let still: Vec<(Partition, i64)> = positions
            .iter()
            .filter(|(p, o)| previous.get(p) == Some(o) && !self.stalled.contains_key(p))
            .filter(|(p, o)| {
                self.readable
                    .get(p)
                    .is_none_or(|(at, when)| at != *o || when.elapsed() > Duration::from_secs(60))
            })
            .map(|(&p, &o)| (p, o))
            .collect();
        for (p, offset) in still {
            match self.prober()?.probe(p, offset)? {
                Probe::Undecodable(reason) => {
                    let stall = Stall {
                        offset,
                        reason,
                        since: now_millis(),
                    };
                    tracing::debug!(partition = p, offset, "probe: undecodable");
                    self.stalled.insert(p, stall.clone());
                    changes.push(Change::Stalled(p, stall));
                }
                Probe::Readable => {
                    self.readable.insert(p, (offset, Instant::now()));
                }
                Probe::Unknown => {}
            }
        }
        Ok(changes)
    }

    /// Where partition `p`'s undecodable records that begin at `stall` end (see
    /// [`Prober::batch_end`]); `None`, logged, when that cannot be told now.
    pub fn end_of(&mut self, p: Partition, stall: &Stall) -> Result<Option<i64>> {
        let end = self.prober()?.batch_end(p, stall.offset, MAX_SKIP)?;
        if end.is_none() {
            tracing::error!(
                partition = p,
                offset = stall.offset,
                "cannot tell where the undecodable records end; waiting"
            );
        }
        Ok(end)
    }

    /// Forgets a partition's stall (after the layer moved it past the records).
    pub fn clear(&mut self, p: Partition) {
        self.stalled.remove(&p);
    }
}

/// The archiver's stalled partitions, as JSON in the master dataset's directory `root` (for
/// `/v1/status` and `/metrics`, in whichever process serves them); absent when none is.
pub const STALLS_FILE: &str = "_stalled.json";

/// Reads the archiver's stalled partitions (none when the file is absent or unreadable).
pub fn read_stalls(root: &std::path::Path) -> BTreeMap<Partition, Stall> {
    std::fs::read(root.join(STALLS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub fn write_stalls(
    root: &std::path::Path,
    stalls: &BTreeMap<Partition, Stall>,
) -> crate::Result<()> {
    let path = root.join(STALLS_FILE);
    if stalls.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path.clone(), e)),
            _ => Ok(()),
        };
    }
    let tmp = root.join(format!("{STALLS_FILE}.tmp"));
    let body = serde_json::to_vec_pretty(stalls)
        .map_err(|e| Error::Other(format!("encode stalls: {e}")))?;
    std::fs::write(&tmp, body)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::io(path.clone(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_batch_errors_count_as_undecodable() {
        let bad = KafkaError::MessageConsumption(RDKafkaErrorCode::BadCompression);
        assert_eq!(undecodable(&bad), Some(RDKafkaErrorCode::BadCompression));
        let other = KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure);
        assert_eq!(undecodable(&other), None);
        assert_eq!(undecodable(&KafkaError::PartitionEOF(1)), None);
    }

    #[test]
    fn policy_parses() {
        assert_eq!("skip".parse::<Policy>(), Ok(Policy::Skip));
        assert!("skipp".parse::<Policy>().is_err());
    }
}
