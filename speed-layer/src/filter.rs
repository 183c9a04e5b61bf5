//! A Bloom filter, in memory, of the event ids a shard of the speed state remembers: nearly every
//! event brings an id never seen, and without the filter its dedupe check read RocksDB (a
//! memtable search and a table filter per level; 15% of the layer's time in a profile). The
//! filter has no false negatives: every id the shard remembers is added to it before it is
//! written, and the ids stored before are added when the filter is built. A positive answer
//! (a copy, or about 1% of new ids) is checked against RocksDB as before.

use strata_common::handoff::Partition;

/// Bits per id: with 7 probes, about 1% of new ids are answered "maybe".
const BITS_PER_ID: u64 = 10;
const PROBES: u64 = 7;
/// The smallest filter: 2^20 bits (128 KiB).
const MIN_BITS: u64 = 1 << 20;

/// One filter of fixed size; [`IdFilter`] chains them as ids are added.
struct Bloom {
    bits: Vec<u64>,
    mask: u64,
    count: u64,
    capacity: u64,
}

impl Bloom {
    fn with_capacity(ids: u64) -> Bloom {
        let nbits = (ids.saturating_mul(BITS_PER_ID))
            .max(MIN_BITS)
            .next_power_of_two();
        Bloom {
            bits: vec![0; (nbits / 64) as usize],
            mask: nbits - 1,
            count: 0,
            capacity: nbits / BITS_PER_ID,
        }
    }

    /// The bits of hash `h`: double hashing, `h1 + i * h2`.
    fn positions(mask: u64, h: u64) -> impl Iterator<Item = u64> {
        let (h1, h2) = (h, h.rotate_left(32) | 1);
        (0..PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & mask)
    }

    fn insert(&mut self, h: u64) {
        for b in Self::positions(self.mask, h) {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
        self.count += 1;
    }

    fn may_contain(&self, h: u64) -> bool {
        Self::positions(self.mask, h).all(|b| self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0)
    }
}

/// The ids a shard remembers, as a chain of Bloom filters each twice the size of the one
/// before (so its false-positive rate stays near 1% however many ids come).
pub struct IdFilter {
    blooms: Vec<Bloom>,
    hasher: ahash::RandomState,
}

impl IdFilter {
    /// A filter sized for `ids` ids.
    pub fn with_capacity(ids: u64) -> IdFilter {
        IdFilter {
            blooms: vec![Bloom::with_capacity(ids)],
            hasher: ahash::RandomState::new(),
        }
    }

    fn hash(&self, p: Partition, id: &[u8]) -> u64 {
        self.hasher.hash_one((p, id))
    }

    pub fn insert(&mut self, p: Partition, id: &[u8]) {
        let h = self.hash(p, id);
        let next = match self.blooms.last() {
            Some(b) if b.count >= b.capacity => Some(b.capacity * 2),
            Some(_) => None,
            None => Some(0),
        };
        if let Some(capacity) = next {
            self.blooms.push(Bloom::with_capacity(capacity));
        }
        if let Some(b) = self.blooms.last_mut() {
            b.insert(h);
        }
    }

    /// False: the id was never added. True: it may have been.
    pub fn may_contain(&self, p: Partition, id: &[u8]) -> bool {
        let h = self.hash(p, id);
        self.blooms.iter().any(|b| b.may_contain(h))
    }

    /// Ids added.
    pub fn len(&self) -> u64 {
        self.blooms.iter().map(|b| b.count).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives_as_it_grows() {
        let mut f = IdFilter::with_capacity(1_000);
        let n = 300_000u64;
        for i in 0..n {
            f.insert((i % 4) as Partition, format!("id-{i}").as_bytes());
        }
        assert!(f.blooms.len() > 1, "it grew");
        for i in 0..n {
            assert!(f.may_contain((i % 4) as Partition, format!("id-{i}").as_bytes()));
        }
        let false_positives = (0..100_000u64)
            .filter(|i| f.may_contain(0, format!("other-{i}").as_bytes()))
            .count();
        assert!(false_positives < 3_000, "{false_positives} of 100,000");
        // The same id in another partition is another id.
        let mut g = IdFilter::with_capacity(10);
        g.insert(1, b"x");
        assert!(g.may_contain(1, b"x"));
        assert_eq!(g.len(), 1);
    }
}
