//! A HyperLogLog sketch of distinct strings, mergeable by register-wise maximum.
//!
//! 2^11 registers: standard error 1.04 / sqrt(2048) ≈ 2.3%. Small sketches are kept sparse (only
//! the registers set), so a bucket with a few users costs a few bytes. The hash is a fixed
//! function (FNV-1a, then a SplitMix64 finalizer), so sketches written by one build merge with
//! sketches written by any other.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

const P: u32 = 11;
const M: usize = 1 << P;
/// Above this many set registers the sketch switches to the dense form.
const SPARSE_MAX: usize = M / 8;

/// How many registers a sketch has.
pub const REGISTERS: usize = M;

/// The relative standard error of [`Hll::estimate`].
pub const STANDARD_ERROR: f64 = 0.023;

/// A mergeable distinct-count sketch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hll {
    Sparse(BTreeMap<u16, u8>),
    Dense(Vec<u8>),
}

impl Default for Hll {
    fn default() -> Self {
        Hll::Sparse(BTreeMap::new())
    }
}

/// A fixed 64-bit hash of a string.
pub fn hash64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The register a value whose [`hash64`] is `x` sets, with the rank it sets it to (a register
/// keeps the highest rank set).
pub fn register(x: u64) -> (u16, u8) {
    let idx = (x >> (64 - P)) as u16;
    let rest = x << P;
    let rank = (rest.leading_zeros().min(64 - P) + 1) as u8;
    (idx, rank)
}

impl Hll {
    /// A sketch holding one value.
    pub fn of(value: &str) -> Self {
        let mut h = Hll::default();
        h.insert(value);
        h
    }

    pub fn insert(&mut self, value: &str) {
        self.insert_hash(hash64(value));
    }

    /// [`Hll::insert`] of a value whose [`hash64`] is `x`.
    pub fn insert_hash(&mut self, x: u64) {
        let (idx, rank) = register(x);
        self.set(idx, rank);
    }

    /// The sketch whose set registers are `regs` (sorted by index, each index once, every rank
    /// above 0): what inserting any values that set exactly those registers, to those ranks,
    /// gives, form included. The form depends only on how many registers are set: inserting
    /// keeps the sparse form while at most 2^11 / 8 are and the dense form from then on.
    pub fn from_registers(regs: &[(u16, u8)]) -> Hll {
        if regs.len() <= SPARSE_MAX {
            Hll::Sparse(regs.iter().copied().collect())
        } else {
            let mut dense = vec![0u8; M];
            for &(i, r) in regs {
                dense[usize::from(i) % M] = r;
            }
            Hll::Dense(dense)
        }
    }

    fn set(&mut self, idx: u16, rank: u8) {
        match self {
            Hll::Sparse(map) => {
                let r = map.entry(idx).or_insert(0);
                *r = (*r).max(rank);
                if map.len() > SPARSE_MAX {
                    let mut dense = vec![0u8; M];
                    for (&i, &r) in map.iter() {
                        dense[i as usize] = r;
                    }
                    *self = Hll::Dense(dense);
                }
            }
            Hll::Dense(regs) => {
                let r = &mut regs[idx as usize];
                *r = (*r).max(rank);
            }
        }
    }

    /// Register-wise maximum: the sketch of the union.
    pub fn merge(&mut self, other: &Hll) {
        match other {
            Hll::Sparse(map) => {
                for (&i, &r) in map {
                    self.set(i, r);
                }
            }
            Hll::Dense(regs) => {
                if let Hll::Sparse(map) = self {
                    let mut dense = regs.clone();
                    for (&i, &r) in map.iter() {
                        dense[i as usize] = dense[i as usize].max(r);
                    }
                    *self = Hll::Dense(dense);
                } else if let Hll::Dense(mine) = self {
                    for (a, &b) in mine.iter_mut().zip(regs) {
                        *a = (*a).max(b);
                    }
                }
            }
        }
    }

    /// The estimated number of distinct values.
    pub fn estimate(&self) -> f64 {
        let m = M as f64;
        let (sum, zeros) = match self {
            Hll::Sparse(map) => {
                let set: f64 = map.values().map(|&r| 2f64.powi(-i32::from(r))).sum();
                (set + (M - map.len()) as f64, M - map.len())
            }
            Hll::Dense(regs) => (
                regs.iter().map(|&r| 2f64.powi(-i32::from(r))).sum(),
                regs.iter().filter(|&&r| r == 0).count(),
            ),
        };
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Hll::Sparse(m) if m.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_within_a_few_standard_errors() {
        for n in [1usize, 10, 100, 1_000, 10_000, 100_000] {
            let mut h = Hll::default();
            for i in 0..n {
                h.insert(&format!("user-{i}"));
                h.insert(&format!("user-{i}"));
            }
            let e = h.estimate();
            let err = (e - n as f64).abs() / n as f64;
            assert!(err <= 4.0 * STANDARD_ERROR, "n={n} estimate={e}");
        }
    }

    #[test]
    fn from_registers_is_what_inserting_gives() {
        for n in [0usize, 1, 5, 200, 256, 257, 300, 400, 5_000] {
            let mut h = Hll::default();
            let mut regs = std::collections::BTreeMap::new();
            for i in 0..n {
                for v in [i, i / 2] {
                    let x = hash64(&format!("user-{v}"));
                    h.insert_hash(x);
                    let (idx, rank) = register(x);
                    let r = regs.entry(idx).or_insert(0);
                    *r = rank.max(*r);
                }
            }
            let regs: Vec<(u16, u8)> = regs.into_iter().collect();
            assert_eq!(Hll::from_registers(&regs), h, "n={n}");
        }
    }

    #[test]
    fn merge_is_union_whatever_the_forms() {
        let mut a = Hll::default();
        let mut b = Hll::default();
        let mut all = Hll::default();
        for i in 0..5_000 {
            let v = format!("v{i}");
            if i % 3 == 0 {
                a.insert(&v);
            } else if i < 100 {
                b.insert(&v);
            }
            if i % 3 == 0 || i < 100 {
                all.insert(&v);
            }
        }
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, all);
        assert_eq!(ba, all);
    }
}
