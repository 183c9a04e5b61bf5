//! The batch/speed handoff, exactly.
//!
//! Offsets of each partition are cut into blocks of `block_size` offsets: block `k` holds offsets
//! `[k * block_size, (k + 1) * block_size)`. The speed layer keeps one partial view per block; a
//! batch version's cutoff in every partition is a block boundary. The merged answer is then
//! `batch(V) + Σ speed blocks k >= cutoff_p / block_size`: every accepted offset is counted by
//! exactly one side, whatever either side's progress.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A Kafka partition number.
pub type Partition = i32;
/// A Kafka offset.
pub type Offset = i64;
/// Per-partition offsets: a batch version's cutoffs, or a layer's next offsets.
pub type Offsets = BTreeMap<Partition, Offset>;

/// The block holding an offset.
pub fn block_of(offset: Offset, block_size: u64) -> u64 {
    (offset.max(0) as u64) / block_size.max(1)
}

/// The largest block boundary at or below `end` (the exclusive end of what has been archived).
pub fn cutoff_below(end: Offset, block_size: u64) -> Offset {
    let b = block_size.max(1) as i64;
    end.max(0) / b * b
}

/// The speed blocks of one partition that a batch version leaves to the speed layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRange {
    pub partition: Partition,
    pub first: u64,
    pub last: u64,
}

/// What the speed layer has, per partition, at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeedPartition {
    /// The next offset to consume: everything below it is folded into the blocks.
    pub next_offset: Offset,
    /// Blocks below this one have been dropped (covered by a published batch version).
    pub first_live_block: u64,
}

/// Why a batch version and the speed layer's state cannot be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    #[error("the batch version uses blocks of {batch} offsets, the speed layer {speed}")]
    BlockSizeMismatch { batch: u64, speed: u64 },
    #[error("partition {partition}: the speed layer dropped blocks below {first_live_block}, but the batch version covers only up to block {needed}; a newer batch version must be loaded")]
    BatchTooOld {
        partition: Partition,
        first_live_block: u64,
        needed: u64,
    },
}

/// The speed blocks to merge with a batch version whose cutoffs are `cutoffs`.
pub fn speed_ranges(
    cutoffs: &Offsets,
    batch_block_size: u64,
    speed: &BTreeMap<Partition, SpeedPartition>,
    speed_block_size: u64,
) -> Result<Vec<BlockRange>, HandoffError> {
    let mut out = Vec::new();
    for (&partition, sp) in speed {
        let cutoff = cutoffs.get(&partition).copied().unwrap_or(0);
        if sp.next_offset <= cutoff {
            continue;
        }
        if batch_block_size != speed_block_size && !cutoffs.is_empty() {
            return Err(HandoffError::BlockSizeMismatch {
                batch: batch_block_size,
                speed: speed_block_size,
            });
        }
        let first = block_of(cutoff, speed_block_size);
        if sp.first_live_block > first {
            return Err(HandoffError::BatchTooOld {
                partition,
                first_live_block: sp.first_live_block,
                needed: first,
            });
        }
        let last = block_of(sp.next_offset - 1, speed_block_size);
        out.push(BlockRange {
            partition,
            first,
            last,
        });
    }
    Ok(out)
}

/// How far the merged answer reaches in each partition: the later of the batch cutoff and the
/// speed layer's next offset.
pub fn coverage(cutoffs: &Offsets, speed: &BTreeMap<Partition, SpeedPartition>) -> Offsets {
    let mut out = cutoffs.clone();
    for (&p, sp) in speed {
        let e = out.entry(p).or_insert(0);
        *e = (*e).max(sp.next_offset);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(next_offset: Offset, first_live_block: u64) -> SpeedPartition {
        SpeedPartition {
            next_offset,
            first_live_block,
        }
    }

    #[test]
    fn ranges_start_at_the_cutoff_block() {
        let cutoffs = Offsets::from([(0, 200), (1, 0)]);
        let speed = BTreeMap::from([(0, sp(450, 0)), (1, sp(99, 0)), (2, sp(0, 0))]);
        let r = speed_ranges(&cutoffs, 100, &speed, 100).expect("mergeable");
        assert_eq!(
            r,
            vec![
                BlockRange {
                    partition: 0,
                    first: 2,
                    last: 4
                },
                BlockRange {
                    partition: 1,
                    first: 0,
                    last: 0
                }
            ]
        );
        assert_eq!(
            coverage(&cutoffs, &speed),
            Offsets::from([(0, 450), (1, 99), (2, 0)])
        );
    }

    #[test]
    fn speed_behind_batch_contributes_nothing() {
        let cutoffs = Offsets::from([(0, 300)]);
        let speed = BTreeMap::from([(0, sp(120, 0))]);
        assert!(speed_ranges(&cutoffs, 100, &speed, 100)
            .expect("ok")
            .is_empty());
    }

    #[test]
    fn dropped_blocks_need_a_newer_batch() {
        let cutoffs = Offsets::from([(0, 100)]);
        let speed = BTreeMap::from([(0, sp(450, 3))]);
        assert!(matches!(
            speed_ranges(&cutoffs, 100, &speed, 100),
            Err(HandoffError::BatchTooOld { .. })
        ));
    }

    #[test]
    fn cutoffs_are_block_boundaries() {
        assert_eq!(cutoff_below(0, 100), 0);
        assert_eq!(cutoff_below(99, 100), 0);
        assert_eq!(cutoff_below(100, 100), 100);
        assert_eq!(cutoff_below(12_345, 1_000), 12_000);
        assert_eq!(block_of(12_345, 1_000), 12);
    }
}
