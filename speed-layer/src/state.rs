//! The speed layer's RocksDB state: loading it, flushing deltas with offsets in one write, and
//! dropping blocks that a published batch version covers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{WriteBatch, WriteOptions, DB};
use strata_common::handoff::{block_of, Offsets, Partition};
use strata_common::speed_store::{
    self, block_key, block_prefix, cf, decode_i64, dedupe_key, encode_i64, encode_journal,
    journal_key, meta_key, Cf, PartitionMeta,
};
use strata_common::time::Millis;
use strata_common::undecodable::Stall;
use strata_common::views::{FastMap, Partial};

use crate::filter::IdFilter;
use crate::pending::Pending;
use crate::{Error, Result};

/// Deletes per write when sweeping the dedupe memory. One write of every expired id (hundreds
/// of thousands after a day of event time) grew the dedupe memtable past its size within that
/// write (a flush is only considered between writes) and held the whole batch in memory.
const SWEEP_CHUNK: usize = 4_096;

/// The speed layer's state: the database and, per partition, the bookkeeping as of the last
/// flush plus what has been folded since.
pub struct SpeedState {
    db: Arc<DB>,
    path: PathBuf,
    block_size: u64,
    parts: BTreeMap<Partition, PartitionMeta>,
    /// Per partition, the stored values of its newest one or two blocks, so that a flush merges
    /// deltas into them without reading them back.
    hot: HashMap<Partition, Vec<HotBlock>>,
    /// Each partition's stored position when the state was opened.
    opened_at: BTreeMap<Partition, i64>,
    /// How many values flushes have read back from the database.
    pub(crate) read_back: u64,
    /// This state's share of the partitions: those with `p % count == index`.
    shard: (usize, usize),
    /// The ids this shard remembers (built from the stored ones on first use).
    filter: Option<IdFilter>,
    /// Per partition, the next offset its last journal entry ended at (as stored), and the
    /// newest block the journal holds entries of (older blocks' entries are removed).
    journal: HashMap<Partition, (i64, Option<u64>)>,
}

/// The dedupe key of partition `p`'s id given as bytes.
fn dedupe_key_bytes(p: Partition, id: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + id.len());
    out.extend_from_slice(&(p as u32).to_be_bytes());
    out.extend_from_slice(id);
    out
}

/// The shard (worker) of `n` that partition `p` belongs to.
pub fn shard_of(p: Partition, n: usize) -> usize {
    (p.rem_euclid(n.max(1) as Partition)) as usize
}

/// The stored partials of one block that this process has read or written.
struct HotBlock {
    block: u64,
    /// Whether every key of the block that is stored is in `values`: true for a block this
    /// process began (nothing of it was stored before), so a key it lacks is not stored at all.
    complete: bool,
    values: FastMap<Vec<u8>, Partial>,
}

impl SpeedState {
    /// Opens (or creates) the state; refuses a store built with another block size.
    pub fn open(path: &Path, block_size: u64) -> Result<Self> {
        let db = Arc::new(speed_store::open_primary(path)?);
        let meta = speed_store::read_meta(&db, &())?;
        match meta.block_size {
            Some(stored) if stored != block_size => {
                return Err(Error::BlockSize {
                    path: path.display().to_string(),
                    stored,
                    configured: block_size,
                })
            }
            Some(_) => {}
            None => db
                .put_cf(
                    cf(&db, Cf::Meta)?,
                    meta_key::BLOCK_SIZE,
                    encode_i64(block_size as i64),
                )
                .map_err(Error::Write)?,
        }
        Ok(SpeedState {
            db,
            path: path.to_path_buf(),
            block_size,
            opened_at: meta
                .partitions
                .iter()
                .map(|(&p, m)| (p, m.next_offset))
                .collect(),
            parts: meta.partitions,
            hot: HashMap::new(),
            read_back: 0,
            shard: (0, 1),
            filter: None,
            journal: HashMap::new(),
        })
    }

    /// Splits the state into `n` shards over the same database, one per worker: shard `i` owns
    /// the partitions `p % n == i` (their bookkeeping, hot blocks, dedupe memory and blocks).
    /// Shards write disjoint keys, each partition's state with its offsets in one write.
    pub fn split(self, n: usize) -> Vec<SpeedState> {
        let n = n.max(1);
        (0..n)
            .map(|i| {
                let owns = |p: &Partition| shard_of(*p, n) == i;
                SpeedState {
                    db: self.db.clone(),
                    path: self.path.clone(),
                    block_size: self.block_size,
                    parts: self
                        .parts
                        .iter()
                        .filter(|(p, _)| owns(p))
                        .map(|(&p, m)| (p, m.clone()))
                        .collect(),
                    hot: HashMap::new(),
                    opened_at: self
                        .opened_at
                        .iter()
                        .filter(|(p, _)| owns(p))
                        .map(|(&p, &o)| (p, o))
                        .collect(),
                    read_back: 0,
                    shard: (i, n),
                    filter: None,
                    journal: HashMap::new(),
                }
            })
            .collect()
    }

    /// Whether partition `p` belongs to this shard.
    pub fn owns(&self, p: Partition) -> bool {
        shard_of(p, self.shard.1) == self.shard.0
    }

    pub fn db(&self) -> Arc<DB> {
        self.db.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The in-memory bookkeeping of a partition (including folded, unflushed messages).
    pub fn part(&mut self, p: Partition) -> &mut PartitionMeta {
        self.parts.entry(p).or_default()
    }

    pub fn parts(&self) -> &BTreeMap<Partition, PartitionMeta> {
        &self.parts
    }

    /// Next offsets of every partition, as folded in memory.
    pub fn next_offsets(&self) -> Offsets {
        self.parts
            .iter()
            .map(|(&p, m)| (p, m.next_offset))
            .collect()
    }

    /// The expiry remembered for an event id: unflushed first, then stored (read only when the
    /// filter says the id may be stored).
    pub fn remembered(
        &mut self,
        pending: &Pending,
        p: Partition,
        id: &str,
    ) -> Result<Option<Millis>> {
        if let Some(e) = pending.remembered(p, id) {
            return Ok(Some(e));
        }
        if !self.filter()?.may_contain(p, id.as_bytes()) {
            return Ok(None);
        }
        let v = self
            .db
            .get_cf(cf(&self.db, Cf::Dedupe)?, dedupe_key(p, id))
            .map_err(|e| strata_common::Error::rocks("read dedupe memory", e))?;
        Ok(v.and_then(|b| decode_i64(&b)))
    }

    /// Remembers an id (until the next flush writes it, `pending` holds it; the filter from now).
    pub fn remember(
        &mut self,
        pending: &mut Pending,
        p: Partition,
        id: String,
        expiry: Millis,
    ) -> Result<()> {
        self.filter()?.insert(p, id.as_bytes());
        pending.remember(p, id, expiry);
        Ok(())
    }

    /// The filter of remembered ids, built on first use from this shard's stored ones.
    fn filter(&mut self) -> Result<&mut IdFilter> {
        if self.filter.is_none() {
            let started = std::time::Instant::now();
            let mut stored = Vec::new();
            self.scan_dedupe(|p, id, _| {
                stored.push((p, id.to_vec()));
                Ok(())
            })?;
            let mut f = IdFilter::with_capacity(2 * stored.len() as u64);
            for (p, id) in &stored {
                f.insert(*p, id);
            }
            if !stored.is_empty() {
                tracing::info!(
                    ids = stored.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "dedupe filter built from the stored ids"
                );
            }
            self.filter = Some(f);
        }
        self.filter
            .as_mut()
            .ok_or_else(|| Error::Common(strata_common::Error::Other("no dedupe filter".into())))
    }

    /// Calls `f(partition, id, expiry)` for every id this shard's partitions remember.
    fn scan_dedupe(
        &self,
        mut f: impl FnMut(Partition, &[u8], Option<Millis>) -> Result<()>,
    ) -> Result<()> {
        let dedupe = cf(&self.db, Cf::Dedupe)?;
        // Each partition's ids share its 4-byte prefix: only this shard's are scanned.
        for &p in self.parts.keys() {
            let prefix = (p as u32).to_be_bytes();
            let from = rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward);
            for item in self.db.iterator_cf(dedupe, from) {
                let (k, v) =
                    item.map_err(|e| strata_common::Error::rocks("scan dedupe memory", e))?;
                if !k.starts_with(&prefix) {
                    break;
                }
                f(p, &k[4..], decode_i64(&v))?;
            }
        }
        Ok(())
    }

    /// Writes everything in `pending`, and the bookkeeping of the partitions it touched, in one
    /// atomic write.
    pub fn flush(&mut self, pending: &mut Pending) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let written = self.write(pending);
        if written.is_err() {
            // Values were taken out of `hot` and may not be stored: read everything back.
            for hot in self.hot.values_mut().flatten() {
                hot.complete = false;
                hot.values.clear();
            }
        }
        written
    }

    fn write(&mut self, pending: &mut Pending) -> Result<()> {
        let blocks = cf(&self.db, Cf::Blocks)?;
        let dedupe = cf(&self.db, Cf::Dedupe)?;
        let meta = cf(&self.db, Cf::Meta)?;
        let mut batch = WriteBatch::default();
        // Read-modify-write: the stored partial merged with the delta, written whole. Whole
        // values keep every write idempotent, so a follower replaying the log twice still
        // reads the right answer. Values of each partition's newest block are kept in memory
        // (`hot`), so only keys this process has not seen yet in a block it did not begin are
        // read back.
        let mut merged: Vec<(Partition, u64, Vec<u8>, Partial)> =
            Vec::with_capacity(pending.deltas.len());
        let mut unknown: Vec<usize> = Vec::new();
        // The co-occurrence views' deltas, per partition, for the journal (see
        // `speed_store::JournalEntry`).
        let mut journal: HashMap<Partition, Vec<speed_store::JournalDelta>> = HashMap::new();
        for ((p, block, key), partial) in pending.deltas.drain() {
            if speed_store::journaled(&key) {
                journal
                    .entry(p)
                    .or_default()
                    .push((block, key.encode(), partial.encode()));
            }
            let k = block_key(p, block, &key);
            // The newest two blocks of each partition are kept: a flush can span a boundary.
            let slots = self.hot.entry(p).or_default();
            if slots.last().is_none_or(|h| block > h.block) {
                // Complete if this process consumed the block's first offset: then nothing of
                // it was stored before and every value written since went through `hot`.
                let opened_at = self.opened_at.get(&p).copied().unwrap_or(0);
                slots.push(HotBlock {
                    block,
                    complete: i64::try_from(block.saturating_mul(self.block_size))
                        .is_ok_and(|first| first >= opened_at),
                    values: FastMap::default(),
                });
                if slots.len() > 2 {
                    slots.remove(0);
                }
            }
            let slot = slots.iter_mut().find(|h| h.block == block);
            let (cached, complete) = match slot {
                Some(h) => (h.values.remove(&k), h.complete),
                None => (None, false),
            };
            match cached {
                Some(mut m) => {
                    m.merge(&partial);
                    merged.push((p, block, k, m));
                }
                None if complete => merged.push((p, block, k, partial)),
                None => {
                    unknown.push(merged.len());
                    merged.push((p, block, k, partial));
                }
            }
        }
        if !unknown.is_empty() {
            self.read_back += unknown.len() as u64;
            let stored =
                self.db
                    .batched_multi_get_cf(blocks, unknown.iter().map(|&i| &merged[i].2), false);
            for (&i, old) in unknown.iter().zip(stored) {
                let old = old.map_err(|e| strata_common::Error::rocks("read speed block", e))?;
                if let Some(old) = old {
                    let mut m = Partial::decode(&old).ok_or_else(|| {
                        strata_common::Error::corrupt("speed block", "undecodable partial")
                    })?;
                    m.merge(&merged[i].3);
                    merged[i].3 = m;
                }
            }
        }
        // In key order: the memtable's skiplist then finds each insert's place next to the one
        // before it instead of searching from its top (in hash order, that search was a third
        // of the layer's time, mostly comparing keys).
        merged.sort_unstable_by(|a, b| a.2.cmp(&b.2));
        for (_, _, k, partial) in &merged {
            batch.put_cf(blocks, k, partial.encode());
        }
        let mut journaled_to: Vec<(Partition, i64, u64)> = Vec::new();
        let mut ids: Vec<(Vec<u8>, i64)> = std::mem::take(&mut pending.remembered)
            .into_iter()
            .flat_map(|(p, ids)| {
                ids.into_iter()
                    .map(move |(id, expiry)| (dedupe_key(p, &id), expiry))
            })
            .collect();
        ids.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (k, expiry) in ids {
            batch.put_cf(dedupe, k, encode_i64(expiry));
        }
        let journal_cf = cf(&self.db, Cf::Journal)?;
        for p in std::mem::take(&mut pending.touched) {
            let m = self.parts.entry(p).or_default();
            // The journal entry of this flush: from the partition's stored next offset to the
            // one written now. Entries of blocks before the partition's newest one go.
            let opened = self.opened_at.get(&p).copied().unwrap_or(-1);
            let (start, held) = self.journal.get(&p).copied().unwrap_or((opened, None));
            if m.next_offset > start {
                let mut deltas = journal.remove(&p).unwrap_or_default();
                deltas.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
                batch.put_cf(
                    journal_cf,
                    journal_key(p, m.next_offset),
                    encode_journal(start, &deltas),
                );
                let newest = block_of(m.next_offset - 1, self.block_size);
                if held.is_none_or(|b| newest > b) {
                    let first =
                        i64::try_from(newest.saturating_mul(self.block_size)).unwrap_or(i64::MAX);
                    batch.delete_range_cf(journal_cf, journal_key(p, 0), journal_key(p, first + 1));
                }
                journaled_to.push((p, m.next_offset, newest));
            }
            batch.put_cf(meta, meta_key::next_offset(p), encode_i64(m.next_offset));
            batch.put_cf(meta, meta_key::watermark(p), encode_i64(m.watermark));
            batch.put_cf(meta, meta_key::accepted(p), encode_i64(m.accepted as i64));
            batch.put_cf(meta, meta_key::rejected(p), encode_i64(m.rejected as i64));
            batch.put_cf(
                meta,
                meta_key::duplicates(p),
                encode_i64(m.duplicates as i64),
            );
            if !m.skipped.is_empty() {
                let skipped = serde_json::to_vec(&m.skipped).map_err(|e| {
                    Error::Common(strata_common::Error::Other(format!(
                        "encode skipped ranges: {e}"
                    )))
                })?;
                batch.put_cf(meta, meta_key::skipped(p), skipped);
            }
        }
        batch.put_cf(
            meta,
            meta_key::FLUSHED_AT,
            encode_i64(strata_common::time::now_millis()),
        );
        pending.messages = 0;
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        strata_common::fault::point("speed.flush.before_write");
        self.db.write_opt(batch, &opts).map_err(Error::Write)?;
        strata_common::fault::point("speed.flush.after_write");
        for (p, end, newest) in journaled_to {
            self.journal.insert(p, (end, Some(newest)));
        }
        for (p, block, k, partial) in merged {
            let slot = self
                .hot
                .get_mut(&p)
                .into_iter()
                .flatten()
                .find(|h| h.block == block);
            if let Some(hot) = slot {
                hot.values.insert(k, partial);
            }
        }
        // Offsets only grow: once a partition's newest block has values, its older one is done.
        for slots in self.hot.values_mut() {
            if slots.len() > 1 && slots.last().is_some_and(|h| !h.values.is_empty()) {
                slots.drain(..slots.len() - 1);
            }
        }
        Ok(())
    }

    /// Records (or, with `None`, clears) that partition `p` waits in front of undecodable
    /// records. A report only, written at once on its own: the offsets do not move.
    pub fn set_stall(&mut self, p: Partition, stall: Option<Stall>) -> Result<()> {
        let meta = cf(&self.db, Cf::Meta)?;
        match &stall {
            Some(s) => {
                let v = serde_json::to_vec(s).map_err(|e| {
                    Error::Common(strata_common::Error::Other(format!("encode a stall: {e}")))
                })?;
                self.db.put_cf(meta, meta_key::stall(p), v)
            }
            None => self.db.delete_cf(meta, meta_key::stall(p)),
        }
        .map_err(Error::Write)?;
        self.part(p).stall = stall;
        Ok(())
    }

    /// Drops the blocks wholly below the cutoffs of a published batch version. Returns how many
    /// blocks were dropped.
    pub fn drop_covered(&mut self, cutoffs: &Offsets, batch_block_size: u64) -> Result<u64> {
        if batch_block_size != self.block_size {
            tracing::warn!(
                batch = batch_block_size,
                speed = self.block_size,
                "the batch version uses another block size; keeping every speed block"
            );
            return Ok(0);
        }
        let blocks = cf(&self.db, Cf::Blocks)?;
        let meta = cf(&self.db, Cf::Meta)?;
        let mut batch = WriteBatch::default();
        let mut dropped = 0;
        let (index, count) = self.shard;
        for (&p, &cutoff) in cutoffs.iter().filter(|(&p, _)| shard_of(p, count) == index) {
            let below = block_of(cutoff, self.block_size);
            let m = self.parts.entry(p).or_default();
            if below <= m.first_live_block {
                continue;
            }
            batch.delete_range_cf(
                blocks,
                block_prefix(p, m.first_live_block),
                block_prefix(p, below),
            );
            batch.put_cf(
                meta,
                meta_key::first_live_block(p),
                encode_i64(below as i64),
            );
            dropped += below - m.first_live_block;
            m.first_live_block = below;
            // The block's stored values are being deleted: so are the ones kept in memory (a
            // block below the first live one is never folded into again).
            for hot in self.hot.get_mut(&p).into_iter().flatten() {
                if hot.block < below {
                    hot.values.clear();
                }
            }
        }
        if dropped > 0 {
            self.db.write(batch).map_err(Error::Write)?;
        }
        Ok(dropped)
    }

    /// Forgets remembered ids whose expiry their partition's watermark has passed. Such ids can
    /// never match again, so this changes no decision. Call it only right after a flush: the
    /// watermarks it compares with must be the stored ones, or a replay after a crash could
    /// decide differently. Returns how many were removed.
    /// The ids kept are the filter's from then on, so forgotten ones stop answering "maybe".
    pub fn sweep_dedupe(&mut self) -> Result<u64> {
        let dedupe = cf(&self.db, Cf::Dedupe)?;
        let mut batch = WriteBatch::default();
        let mut removed = 0;
        let mut kept: Vec<(Partition, Vec<u8>)> = Vec::new();
        let write = |batch: &mut WriteBatch| -> Result<()> {
            self.db.write(std::mem::take(batch)).map_err(Error::Write)
        };
        self.scan_dedupe(|p, id, expiry| {
            let watermark = self.parts.get(&p).map_or(i64::MIN, |m| m.watermark);
            match expiry {
                Some(expiry) if expiry < watermark => {
                    batch.delete_cf(dedupe, dedupe_key_bytes(p, id));
                    removed += 1;
                    if batch.len() >= SWEEP_CHUNK {
                        write(&mut batch)?;
                    }
                }
                _ => kept.push((p, id.to_vec())),
            }
            Ok(())
        })?;
        if !batch.is_empty() {
            write(&mut batch)?;
        }
        let mut f = IdFilter::with_capacity(2 * kept.len() as u64);
        for (p, id) in &kept {
            f.insert(*p, id);
        }
        self.filter = Some(f);
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use strata_common::event::{Event, ItemRef, Kind};
    use strata_common::views::{contributions, ViewKey};

    fn event(n: u64) -> Event {
        let item = ItemRef {
            user: format!("u{}", n % 7),
            item: format!("i{}", n % 5),
            category: None,
        };
        Event {
            id: format!("e{n}"),
            ts: 1_795_615_200_000 + (n as i64) * 1_000,
            kind: if n.is_multiple_of(3) {
                Kind::Purchase {
                    item,
                    qty: 1,
                    price_micros: 2_500_000,
                }
            } else {
                Kind::View(item)
            },
        }
    }

    /// Consumes offsets `from..to` of partition 0, flushing every `every` messages.
    fn consume(state: &mut SpeedState, from: u64, to: u64, every: u64) {
        let mut pending = Pending::default();
        for offset in from..to {
            let block = block_of(offset as i64, state.block_size());
            pending.fold(0, block, &event(offset));
            state.part(0).next_offset = offset as i64 + 1;
            pending.touched.insert(0);
            pending.messages += 1;
            if (offset + 1).is_multiple_of(every) {
                state.flush(&mut pending).expect("flush");
            }
        }
        state.flush(&mut pending).expect("flush");
    }

    fn stored(state: &SpeedState) -> BTreeMap<Vec<u8>, Partial> {
        let blocks = cf(&state.db, Cf::Blocks).expect("cf");
        state
            .db
            .iterator_cf(blocks, rocksdb::IteratorMode::Start)
            .map(|kv| {
                let (k, v) = kv.expect("scan");
                (k.to_vec(), Partial::decode(&v).expect("decode"))
            })
            .collect()
    }

    #[test]
    fn the_journal_chains_flush_to_flush_and_its_deltas_make_the_newest_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let block_size = 100;
        let mut state = SpeedState::open(dir.path(), block_size).expect("open");
        consume(&mut state, 0, 250, 7);
        drop(state);
        let mut state = SpeedState::open(dir.path(), block_size).expect("reopen");
        consume(&mut state, 250, 420, 13);
        let mut entries = Vec::new();
        speed_store::read_journal(&state.db, &(), 0, -1, &mut |e| entries.push(e)).expect("read");
        let first = entries.first().expect("entries");
        assert!(
            first.end > 400,
            "entries of finished blocks are removed: {}",
            first.end
        );
        assert!(
            first.start <= 400,
            "the newest block is covered from its start"
        );
        for w in entries.windows(2) {
            assert_eq!(
                w[1].start, w[0].end,
                "each entry starts where the one before ended"
            );
        }
        assert_eq!(entries.last().map(|e| e.end), Some(420));
        // The newest block's audiences and histories, merged from the deltas, equal those
        // stored; and an independent fold of its events gives the same.
        let mut from_journal: BTreeMap<Vec<u8>, Partial> = BTreeMap::new();
        for (block, key, delta) in entries.iter().flat_map(|e| &e.deltas) {
            if *block == 4 {
                match from_journal.entry(block_key(0, 4, key)) {
                    std::collections::btree_map::Entry::Occupied(mut o) => o.get_mut().merge(delta),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(delta.clone());
                    }
                }
            }
        }
        let stored: BTreeMap<Vec<u8>, Partial> = stored(&state)
            .into_iter()
            .filter(|(k, _)| k.starts_with(&block_prefix(0, 4)))
            .filter(|(k, _)| ViewKey::decode(&k[12..]).is_some_and(|v| speed_store::journaled(&v)))
            .collect();
        assert!(!stored.is_empty());
        assert_eq!(from_journal, stored);
        let mut audiences: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for n in 400..420u64 {
            if let Kind::View(r) = &event(n).kind {
                audiences
                    .entry(r.item.clone())
                    .or_default()
                    .insert(r.user.clone());
            }
        }
        for (item, users) in &audiences {
            let key = ViewKey::ItemUsers {
                basis: strata_common::views::Basis::View,
                item: item.as_str().into(),
            };
            match from_journal.get(&block_key(0, 4, &key)) {
                Some(Partial::Set(s)) => {
                    let got: std::collections::BTreeSet<String> =
                        s.0.iter().map(|n| n.to_string()).collect();
                    assert_eq!(&got, users, "audience of {item}");
                }
                other => panic!("audience of {item}: {other:?}"),
            }
        }
    }

    #[test]
    fn flushes_from_memory_equal_a_fold_from_scratch_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let block_size = 100;
        let mut state = SpeedState::open(dir.path(), block_size).expect("open");
        consume(&mut state, 0, 250, 7);
        assert_eq!(state.read_back, 0, "a new state reads nothing back");
        drop(state);
        // Reopened inside block 2: its stored values must be read back, not overwritten.
        let mut state = SpeedState::open(dir.path(), block_size).expect("reopen");
        consume(&mut state, 250, 420, 13);
        drop(state);
        let mut state = SpeedState::open(dir.path(), block_size).expect("reopen");
        consume(&mut state, 420, 600, 50);

        let mut expected: HashMap<Vec<u8>, Partial> = HashMap::new();
        for offset in 0..600u64 {
            let block = block_of(offset as i64, block_size);
            contributions(&event(offset), |key: ViewKey, partial| {
                match expected.entry(block_key(0, block, &key)) {
                    std::collections::hash_map::Entry::Occupied(mut o) => {
                        o.get_mut().merge(&partial)
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(partial);
                    }
                }
            });
        }
        let got = stored(&state);
        assert_eq!(got.len(), expected.len());
        for (k, v) in &expected {
            assert_eq!(got.get(k), Some(v), "key {k:?}");
        }
    }

    #[test]
    fn sweeping_forgets_expired_ids_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = SpeedState::open(dir.path(), 100).expect("open");
        let expired = 2 * SWEEP_CHUNK + 5;
        let mut pending = Pending::default();
        for n in 0..expired {
            pending.remember(0, format!("old{n}"), 900);
        }
        for n in 0..10 {
            pending.remember(0, format!("new{n}"), 5_000);
        }
        state.part(0).watermark = 1_000;
        pending.touched.insert(0);
        state.flush(&mut pending).expect("flush");
        let seq = state.db.latest_sequence_number();
        assert_eq!(state.sweep_dedupe().expect("sweep"), expired as u64);
        // Spans several writes of SWEEP_CHUNK deletes: one sequence number per delete.
        assert_eq!(state.db.latest_sequence_number() - seq, expired as u64);
        let pending = Pending::default();
        assert_eq!(state.remembered(&pending, 0, "old0").expect("read"), None);
        assert_eq!(
            state.remembered(&pending, 0, "new3").expect("read"),
            Some(5_000)
        );
        let dedupe = cf(&state.db, Cf::Dedupe).expect("cf");
        let left = state
            .db
            .iterator_cf(dedupe, rocksdb::IteratorMode::Start)
            .count();
        assert_eq!(left, 10);
        assert_eq!(state.sweep_dedupe().expect("sweep again"), 0);
    }

    #[test]
    fn stored_ids_are_found_after_a_reopen_in_every_shard() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = SpeedState::open(dir.path(), 100).expect("open");
        let mut pending = Pending::default();
        for p in 0..4 {
            state
                .remember(&mut pending, p, format!("seen-{p}"), 5_000)
                .expect("remember");
            pending.touched.insert(p);
        }
        state.flush(&mut pending).expect("flush");
        drop(state);
        let shards = SpeedState::open(dir.path(), 100).expect("reopen").split(2);
        for mut shard in shards {
            let pending = Pending::default();
            let owned: Vec<Partition> = (0..4).filter(|&p| shard.owns(p)).collect();
            assert_eq!(owned.len(), 2);
            for p in owned {
                let id = format!("seen-{p}");
                assert_eq!(
                    shard.remembered(&pending, p, &id).expect("read"),
                    Some(5_000)
                );
                assert_eq!(shard.remembered(&pending, p, "never").expect("read"), None);
            }
        }
    }

    #[test]
    fn dropped_blocks_stay_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = SpeedState::open(dir.path(), 100).expect("open");
        consume(&mut state, 0, 150, 10);
        let dropped = state
            .drop_covered(&BTreeMap::from([(0, 200)]), 100)
            .expect("drop");
        assert_eq!(dropped, 2);
        assert!(stored(&state).is_empty());
        // The next block begins empty; nothing of the dropped ones comes back.
        state.part(0).first_live_block = 2;
        consume(&mut state, 200, 230, 10);
        let got = stored(&state);
        assert!(!got.is_empty());
        assert!(got.keys().all(|k| k.starts_with(&block_prefix(0, 2))));
    }
}
