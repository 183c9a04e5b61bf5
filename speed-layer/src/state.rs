//! The speed layer's RocksDB state: loading it, flushing deltas with offsets in one write,
//! writing each block once when it is finished, and dropping blocks that a published batch
//! version covers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{IngestExternalFileOptions, SstFileWriter, WriteBatch, WriteOptions, DB};
use strata_common::handoff::{block_of, Offsets, Partition};
use strata_common::speed_store::{
    self, block_prefix, cf, decode_i64, dedupe_key, encode_i64, encode_journal, journal_key,
    meta_key, Cf, JournalValue, PartitionMeta,
};
use strata_common::time::Millis;
use strata_common::undecodable::Stall;
use strata_common::views::{absorb_into, FastMap, Partial, ViewKey};

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
    /// Per partition, the partials of its live block (and, within a flush, of a block the
    /// flush finishes): every value of the block, since the journal holds only deltas and the
    /// block is written whole, once, when it is finished.
    hot: HashMap<Partition, BTreeMap<u64, FastMap<ViewKey, Partial>>>,
    /// Per partition, how many keys its last finished block held: a new block's values are
    /// given that much room at once instead of growing to it by rehashing.
    block_keys: HashMap<Partition, usize>,
    /// Each partition's stored position when the state was opened.
    opened_at: BTreeMap<Partition, i64>,
    /// This state's share of the partitions: those with `p % count == index`.
    shard: (usize, usize),
    /// The ids this shard remembers (built from the stored ones on first use).
    filter: Option<IdFilter>,
    /// Per partition, the next offset its last journal entry ended at (as stored), and the
    /// newest block the journal holds entries of (older blocks' entries are removed).
    journal: HashMap<Partition, (i64, Option<u64>)>,
    /// A flush failed after folding its deltas into `hot`: what is held in memory is ahead of
    /// what is stored, so no later flush may write (a restart resumes from what is stored).
    failed: bool,
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

fn rocks(what: &'static str) -> impl FnOnce(rocksdb::Error) -> Error {
    move |e| Error::Common(strata_common::Error::rocks(what, e))
}

impl SpeedState {
    /// Opens (or creates) the state; refuses a store built with another block size. A state
    /// written in the earlier layout (every block's keys in `blocks`) is moved to this one.
    pub fn open(path: &Path, block_size: u64) -> Result<Self> {
        let db = Arc::new(speed_store::open_primary(path)?);
        let mut meta = speed_store::read_meta(&db, &())?;
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
        meta.block_size = Some(block_size);
        if meta.layout != Some(speed_store::LAYOUT) {
            upgrade(&db, &meta, block_size)?;
            meta.layout = Some(speed_store::LAYOUT);
        }
        // The live blocks, from the journal: folding goes on where it stopped.
        let mut hot: HashMap<Partition, BTreeMap<u64, FastMap<ViewKey, Partial>>> = HashMap::new();
        for (p, live) in speed_store::live_blocks(&db, &(), &meta, &BTreeMap::new())? {
            let mut values = FastMap::default();
            for (k, partial) in live.merged() {
                let key = ViewKey::decode(&k).ok_or_else(|| {
                    strata_common::Error::corrupt("speed journal", "undecodable view key")
                })?;
                values.insert(key, partial);
            }
            hot.entry(p).or_default().insert(live.block, values);
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
            hot,
            block_keys: HashMap::new(),
            shard: (0, 1),
            filter: None,
            journal: HashMap::new(),
            failed: false,
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
                    hot: self
                        .hot
                        .iter()
                        .filter(|(p, _)| owns(p))
                        .map(|(&p, h)| (p, h.clone()))
                        .collect(),
                    opened_at: self
                        .opened_at
                        .iter()
                        .filter(|(p, _)| owns(p))
                        .map(|(&p, &o)| (p, o))
                        .collect(),
                    block_keys: HashMap::new(),
                    shard: (i, n),
                    filter: None,
                    journal: HashMap::new(),
                    failed: false,
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
    /// atomic write; first, as an ingested file, every block the flush finishes.
    pub fn flush(&mut self, pending: &mut Pending) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        if self.failed {
            return Err(Error::Common(strata_common::Error::Other(
                "an earlier write of the speed state failed; restart to resume from what is stored"
                    .into(),
            )));
        }
        self.failed = true;
        let dedupe = cf(&self.db, Cf::Dedupe)?;
        let meta = cf(&self.db, Cf::Meta)?;
        let journal_cf = cf(&self.db, Cf::Journal)?;
        let mut batch = WriteBatch::default();
        // Every delta goes into the block's values held here, and to the journal (readers build
        // the live blocks from it) unless this flush finishes its block: such a block is written
        // whole below, and no reader builds it from the journal. Nothing is written per view
        // key until the block is done.
        let mut journal: HashMap<Partition, JournalValue> = HashMap::new();
        for (&(p, block), deltas) in pending.deltas.iter_mut() {
            if deltas.is_empty() {
                continue;
            }
            let next = self.parts.get(&p).map_or(0, |m| m.next_offset);
            let journaled = block >= block_of(next, self.block_size);
            let journal = journal.entry(p).or_default();
            let room = self.block_keys.get(&p).copied().unwrap_or(0);
            let values = self
                .hot
                .entry(p)
                .or_default()
                .entry(block)
                .or_insert_with(|| FastMap::with_capacity_and_hasher(room, Default::default()));
            for (key, partial) in deltas.drain() {
                if journaled {
                    journal.push(block, &key, &partial);
                }
                absorb_into(values, key, partial);
            }
        }
        let mut ids: Vec<(Vec<u8>, i64)> = std::mem::take(&mut pending.remembered)
            .into_iter()
            .flat_map(|(p, ids)| {
                ids.into_iter()
                    .map(move |(id, expiry)| (dedupe_key(p, &id), expiry))
            })
            .collect();
        // In key order: the memtable's skiplist then finds each insert's place next to the one
        // before it instead of searching from its top.
        ids.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (k, expiry) in ids {
            batch.put_cf(dedupe, k, encode_i64(expiry));
        }
        let mut journaled_to: Vec<(Partition, i64, u64)> = Vec::new();
        let mut finished: Vec<(Partition, u64, FastMap<ViewKey, Partial>)> = Vec::new();
        let touched = std::mem::take(&mut pending.touched);
        for &p in &touched {
            let m = self.parts.entry(p).or_default();
            // The journal entry of this flush: from the partition's stored next offset to the
            // one written now. Entries of blocks before the partition's newest one go.
            let opened = self.opened_at.get(&p).copied().unwrap_or(-1);
            let (start, held) = self.journal.get(&p).copied().unwrap_or((opened, None));
            if m.next_offset > start {
                let deltas = journal.remove(&p).unwrap_or_default();
                batch.put_cf(
                    journal_cf,
                    journal_key(p, m.next_offset),
                    deltas.finish(start),
                );
                let newest = block_of(m.next_offset - 1, self.block_size);
                if held.is_none_or(|b| newest > b) {
                    let first =
                        i64::try_from(newest.saturating_mul(self.block_size)).unwrap_or(i64::MAX);
                    batch.delete_range_cf(journal_cf, journal_key(p, 0), journal_key(p, first + 1));
                }
                journaled_to.push((p, m.next_offset, newest));
            }
            // The blocks the partition's next offset has left are finished: written whole below.
            let live = block_of(m.next_offset, self.block_size);
            pending.forget_before(p, live);
            if let Some(blocks) = self.hot.get_mut(&p) {
                let keep = blocks.split_off(&live);
                for (block, values) in std::mem::replace(blocks, keep) {
                    self.block_keys.insert(p, values.len());
                    if block >= m.first_live_block && !values.is_empty() {
                        finished.push((p, block, values));
                        m.written_block = Some(block);
                    }
                }
            }
            if let Some(block) = m.written_block {
                batch.put_cf(meta, meta_key::written_block(p), encode_i64(block as i64));
            }
            batch.put_cf(meta, meta_key::next_offset(p), encode_i64(m.next_offset));
            batch.put_cf(meta, meta_key::watermark(p), encode_i64(m.watermark));
            batch.put_cf(
                meta,
                meta_key::first_live_block(p),
                encode_i64(m.first_live_block as i64),
            );
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
        // The finished blocks first: until the write below moves the offsets past them they
        // are still live by the stored offsets, read from the journal.
        self.ingest(finished)?;
        strata_common::fault::point("speed.flush.before_write");
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        self.db.write_opt(batch, &opts).map_err(Error::Write)?;
        strata_common::fault::point("speed.flush.after_write");
        for (p, end, newest) in journaled_to {
            self.journal.insert(p, (end, Some(newest)));
        }
        self.failed = false;
        Ok(())
    }

    /// Writes finished blocks into `blocks` as SST files, one per partition, ingested together:
    /// their keys go through no memtable and, since a file holds blocks of one partition later
    /// than any block before them, overlap no other file, which keeps them on the last level,
    /// out of every compaction.
    fn ingest(&self, mut finished: Vec<(Partition, u64, FastMap<ViewKey, Partial>)>) -> Result<()> {
        if finished.is_empty() {
            return Ok(());
        }
        finished.sort_unstable_by_key(|(p, block, _)| (*p, *block));
        let opts = speed_store::block_file_options();
        let mut files: Vec<PathBuf> = Vec::new();
        let mut open: Option<(Partition, SstFileWriter)> = None;
        for (p, block, values) in finished {
            if open.as_ref().is_none_or(|(q, _)| *q != p) {
                if let Some((_, mut w)) = open.take() {
                    w.finish()
                        .map_err(rocks("finish a finished block's file"))?;
                }
                let file = self.path.join(format!("finished-p{p}.sst"));
                // Unlinked first, never truncated: ingesting moves the file in as a hard link,
                // so after a crash between the ingestion and the removal of this name, writing
                // through it would overwrite a file of the database.
                let _ = std::fs::remove_file(&file);
                let w = SstFileWriter::create(&opts);
                w.open(&file)
                    .map_err(rocks("open a finished block's file"))?;
                files.push(file);
                open = Some((p, w));
            }
            let Some((_, writer)) = open.as_mut() else {
                continue;
            };
            // Sorted by encoded key; the partials stay where they are, indexed.
            let mut partials: Vec<Partial> = Vec::with_capacity(values.len());
            let mut keys: Vec<(Vec<u8>, usize)> = Vec::with_capacity(values.len());
            for (k, v) in values {
                let mut key = block_prefix(p, block);
                k.encode_into(&mut key);
                keys.push((key, partials.len()));
                partials.push(v);
            }
            keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            // The marker first (the block's prefix alone sorts before its keys).
            writer
                .put(block_prefix(p, block), [])
                .map_err(rocks("write a finished block"))?;
            let mut value = Vec::new();
            for (key, i) in keys {
                value.clear();
                partials[i].encode_into(&mut value);
                writer
                    .put(&key, &value)
                    .map_err(rocks("write a finished block"))?;
            }
        }
        if let Some((_, mut w)) = open.take() {
            w.finish()
                .map_err(rocks("finish a finished block's file"))?;
        }
        let mut ingest = IngestExternalFileOptions::default();
        ingest.set_move_files(true);
        self.db
            .ingest_external_file_cf_opts(cf(&self.db, Cf::Blocks)?, &ingest, files.clone())
            .map_err(rocks("ingest finished blocks"))?;
        for file in files {
            let _ = std::fs::remove_file(file);
        }
        strata_common::fault::point("speed.flush.ingested");
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
        let mut freed = Vec::new();
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
            // A block below the first live one is never folded into again, nor written.
            if let Some(blocks) = self.hot.get_mut(&p) {
                *blocks = blocks.split_off(&below);
            }
            freed.push((block_prefix(p, 0), block_prefix(p, below)));
        }
        if dropped > 0 {
            self.db.write(batch).map_err(Error::Write)?;
            // The files of the dropped blocks, each one block's, go now rather than at a
            // compaction (ingested blocks are never compacted).
            for (from, to) in freed {
                self.db
                    .delete_file_in_range_cf(blocks, &from, &to)
                    .map_err(rocks("delete the files of covered blocks"))?;
            }
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

/// Moves a state written in the earlier layout (every block's keys in `blocks`, the journal
/// holding only the co-occurrence views' deltas) to this one: each partition's live block is
/// read from `blocks` into one journal entry from the block's start to its next offset, and its
/// keys leave `blocks`; the layout mark goes in the same write.
fn upgrade(db: &DB, meta: &speed_store::SpeedMeta, block_size: u64) -> Result<()> {
    let blocks = cf(db, Cf::Blocks)?;
    let journal = cf(db, Cf::Journal)?;
    let mut batch = WriteBatch::default();
    for (&p, m) in &meta.partitions {
        let next = m.next_offset;
        batch.delete_range_cf(journal, journal_key(p, 0), journal_key(p, i64::MAX));
        if next <= 0 || (next as u64).is_multiple_of(block_size) {
            continue;
        }
        let block = block_of(next, block_size);
        let (from, to) = (block_prefix(p, block), block_prefix(p, block + 1));
        let mut deltas = Vec::new();
        let iter = db.iterator_cf(
            blocks,
            rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(rocks("read a live block to move it"))?;
            if k.as_ref() >= to.as_slice() {
                break;
            }
            deltas.push((block, k[12..].to_vec(), v.to_vec()));
        }
        let first = i64::try_from(block.saturating_mul(block_size)).unwrap_or(i64::MAX);
        batch.put_cf(
            journal,
            journal_key(p, next),
            encode_journal(first, &deltas),
        );
        batch.delete_range_cf(blocks, from, to);
    }
    batch.put_cf(
        cf(db, Cf::Meta)?,
        meta_key::LAYOUT,
        encode_i64(speed_store::LAYOUT as i64),
    );
    db.write(batch).map_err(Error::Write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use strata_common::event::{Event, ItemRef, Kind};
    use strata_common::speed_store::block_key;
    use strata_common::views::contributions;

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

    /// Every partial the state holds, finished blocks and live ones, by block key.
    fn stored(state: &SpeedState) -> BTreeMap<Vec<u8>, Partial> {
        let mut out = BTreeMap::new();
        speed_store::for_each_partial(&state.db, &mut |p, block, k, partial| {
            let mut key = block_prefix(p, block);
            key.extend_from_slice(k);
            assert!(out.insert(key, partial.clone()).is_none(), "a key twice");
        })
        .expect("read the state");
        out
    }

    /// Asserts that the state holds exactly a fold from scratch of offsets `0..to` of partition
    /// 0, key by key; returns what it holds.
    fn assert_folded(state: &SpeedState, to: u64, block_size: u64) -> BTreeMap<Vec<u8>, Partial> {
        let got = stored(state);
        let want = expected(to, block_size, 0);
        assert_eq!(got.len(), want.len());
        for (k, v) in &want {
            assert_eq!(got.get(k), Some(v), "key {k:?}");
        }
        got
    }

    /// The keys `blocks` holds, as stored (finished blocks only, or leftovers).
    fn in_blocks(state: &SpeedState) -> Vec<Vec<u8>> {
        let blocks = cf(&state.db, Cf::Blocks).expect("cf");
        state
            .db
            .iterator_cf(blocks, rocksdb::IteratorMode::Start)
            .map(|kv| kv.expect("scan").0.to_vec())
            .collect()
    }

    /// What a fold from scratch of offsets `0..to` of partition 0 gives, by block key, for
    /// blocks from `first` on.
    fn expected(to: u64, block_size: u64, first: u64) -> HashMap<Vec<u8>, Partial> {
        let mut expected: HashMap<Vec<u8>, Partial> = HashMap::new();
        for offset in 0..to {
            let block = block_of(offset as i64, block_size);
            if block < first {
                continue;
            }
            contributions(&event(offset), |key: ViewKey, partial| {
                expected
                    .entry(block_key(0, block, &key))
                    .or_insert_with(|| Partial::identity(&key))
                    .merge(&partial)
            });
        }
        expected
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
        speed_store::read_journal(&state.db, &(), 0, -1, &|_| true, &mut |e| entries.push(e))
            .expect("read");
        // Read keeping the co-occurrence views only: the same entries, with exactly the deltas
        // of those views.
        let mut kept = Vec::new();
        let keep = speed_store::co_occurrence;
        speed_store::read_journal(&state.db, &(), 0, -1, &keep, &mut |e| kept.push(e))
            .expect("read kept");
        assert_eq!(kept.len(), entries.len());
        let mut some = 0;
        for (k, e) in kept.iter().zip(&entries) {
            assert_eq!((k.start, k.end), (e.start, e.end));
            let want: Vec<_> = (e.deltas.iter())
                .filter(|(_, key, _)| {
                    matches!(key, ViewKey::ItemUsers { .. } | ViewKey::UserItems { .. })
                })
                .collect();
            assert_eq!(k.deltas.iter().collect::<Vec<_>>(), want);
            some += want.len();
        }
        assert!(some > 0 && some < entries.iter().map(|e| e.deltas.len()).sum::<usize>());
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
        // The flush that crossed into block 4 finished block 3 and wrote it whole: its entry
        // holds block 4's deltas only.
        assert!(first.start < 400, "an entry crosses into block 4");
        for e in &entries {
            assert!(
                (e.deltas.iter()).all(|(b, _, _)| *b == block_of(e.end - 1, block_size)),
                "the entry from {} to {} holds deltas of a block it finished",
                e.start,
                e.end
            );
        }
        // The newest block, merged from the deltas, equals a fold of its events from scratch;
        // and its audiences equal those counted naively.
        let mut from_journal: BTreeMap<Vec<u8>, Partial> = BTreeMap::new();
        for (block, key, delta) in entries.iter().flat_map(|e| &e.deltas) {
            if *block == 4 {
                from_journal
                    .entry(block_key(0, 4, key))
                    .or_insert_with(|| Partial::identity(key))
                    .merge(delta);
            }
        }
        let want: BTreeMap<Vec<u8>, Partial> = expected(420, block_size, 4).into_iter().collect();
        assert!(!want.is_empty());
        assert_eq!(from_journal, want);
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
        drop(state);
        // Reopened inside block 2: its values so far come back from the journal.
        let mut state = SpeedState::open(dir.path(), block_size).expect("reopen");
        consume(&mut state, 250, 420, 13);
        drop(state);
        let mut state = SpeedState::open(dir.path(), block_size).expect("reopen");
        consume(&mut state, 420, 650, 50);

        let got = assert_folded(&state, 650, block_size);
        // Only finished blocks are in `blocks`; the live one (6) is in the journal alone.
        let blocks = in_blocks(&state);
        assert!(blocks.iter().any(|k| k.starts_with(&block_prefix(0, 5))));
        assert!(!blocks.iter().any(|k| k.starts_with(&block_prefix(0, 6))));
        assert!(got.keys().any(|k| k.starts_with(&block_prefix(0, 6))));
    }

    #[test]
    fn a_block_ingested_before_a_crash_is_read_from_the_journal_and_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let block_size = 100;
        let mut state = SpeedState::open(dir.path(), block_size).expect("open");
        consume(&mut state, 0, 150, 10);
        // A speed layer killed after ingesting block 1 and before the write that moves its
        // offset past it: block 1's keys are in `blocks` (here with wrong values, to tell them
        // apart), the stored offset is still inside block 1.
        let mut wrong = FastMap::default();
        wrong.insert(
            ViewKey::Item("i0".into()),
            Partial::Item(strata_common::views::ItemStats {
                views: 1_000_000,
                ..Default::default()
            }),
        );
        state.ingest(vec![(0, 1, wrong)]).expect("ingest");
        drop(state);
        // Readers take block 1 from the journal, not from those keys.
        let db = Arc::new(speed_store::open_primary(dir.path()).expect("open"));
        let reader = speed_store::SpeedReader::shared(db.clone());
        let ranges = [strata_common::handoff::BlockRange {
            partition: 0,
            first: 0,
            last: 1,
        }];
        let key = ViewKey::Item("i0".into());
        let want = |to: u64| {
            expected(to, block_size, 0)
                .into_iter()
                .filter(|(k, _)| k.ends_with(&key.encode()))
                .map(|(_, p)| p.as_item().map_or(0, |s| s.views))
                .sum::<u64>()
        };
        let views = |reader: &speed_store::SpeedReader| {
            reader
                .with_view(|db, reads, _, _| reads.partial(db, &ranges, &key))
                .expect("read")
                .and_then(|p| p.as_item().map(|s| s.views))
                .unwrap_or(0)
        };
        assert_eq!(views(&reader), want(150));
        drop(reader);
        drop(db);
        // Restarted, the layer finishes block 1 again: its keys are written anew.
        let mut state = SpeedState::open(dir.path(), block_size).expect("reopen");
        consume(&mut state, 150, 230, 10);
        assert_folded(&state, 230, block_size);
    }

    #[test]
    fn readers_bring_the_live_block_forward_and_read_finished_blocks_from_their_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let block_size = 100;
        let mut state = SpeedState::open(dir.path(), block_size).expect("open");
        let shared = speed_store::SpeedReader::shared(state.db());
        let scratch = tempfile::tempdir().expect("tempdir");
        let follower =
            speed_store::SpeedReader::follow(dir.path(), scratch.path()).expect("follow");
        let keys = [
            ViewKey::Item("i0".into()),
            ViewKey::Item("i3".into()),
            ViewKey::UserItems {
                basis: strata_common::views::Basis::View,
                user: "u2".into(),
            },
        ];
        // Every reader's view, after each flush, equals a fold of the offsets so far from
        // scratch: point reads over all blocks, and a scan of the item totals.
        let check = |reader: &speed_store::SpeedReader, to: u64| {
            let want = expected(to, block_size, 0);
            let ranges = [strata_common::handoff::BlockRange {
                partition: 0,
                first: 0,
                last: block_of(to as i64 - 1, block_size),
            }];
            reader
                .with_view(|db, reads, meta, _| {
                    assert_eq!(meta.partitions[&0].next_offset, to as i64);
                    for key in &keys {
                        let mut naive: Option<Partial> = None;
                        for (k, v) in &want {
                            if k[12..] == key.encode()[..] {
                                match &mut naive {
                                    Some(n) => n.merge(v),
                                    None => naive = Some(v.clone()),
                                }
                            }
                        }
                        assert_eq!(reads.partial(db, &ranges, key)?, naive, "{key:?} at {to}");
                    }
                    let mut scanned: BTreeMap<ViewKey, Partial> = BTreeMap::new();
                    reads.scan(
                        db,
                        &ranges,
                        &[ViewKey::tag_of_items()],
                        None,
                        &mut |k, p| {
                            let id = Partial::identity(&k);
                            scanned.entry(k).or_insert(id).merge(&p)
                        },
                    )?;
                    let mut naive: BTreeMap<ViewKey, Partial> = BTreeMap::new();
                    for (k, v) in &want {
                        let key = ViewKey::decode(&k[12..]).expect("key");
                        if matches!(key, ViewKey::Item(_)) {
                            let id = Partial::identity(&key);
                            naive.entry(key).or_insert(id).merge(v);
                        }
                    }
                    assert_eq!(scanned, naive, "item totals at {to}");
                    Ok(())
                })
                .expect("view");
        };
        let mut pending = Pending::default();
        for offset in 0..330u64 {
            let block = block_of(offset as i64, block_size);
            pending.fold(0, block, &event(offset));
            state.part(0).next_offset = offset as i64 + 1;
            pending.touched.insert(0);
            pending.messages += 1;
            // Flushes of uneven sizes, some ending on a block's last offset, some past it; block 1
            // in more flushes than a live block is held in layers.
            if [
                17, 40, 99, 100, 110, 120, 130, 150, 151, 160, 170, 180, 190, 200, 260, 329,
            ]
            .contains(&offset)
            {
                state.flush(&mut pending).expect("flush");
                check(&shared, offset + 1);
                follower.catch_up().expect("catch up");
                check(&follower, offset + 1);
            }
        }
    }

    #[test]
    fn a_file_name_left_linked_to_an_ingested_file_is_not_written_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = SpeedState::open(dir.path(), 100).expect("open");
        // A crash after an ingestion and before its source name went: the name and a database
        // file are one inode.
        let ingested = dir.path().join("ingested-copy");
        std::fs::write(&ingested, b"a file of the database").expect("write");
        std::fs::hard_link(&ingested, dir.path().join("finished-p0.sst")).expect("link");
        consume(&mut state, 0, 250, 10);
        assert_eq!(
            std::fs::read(&ingested).expect("read"),
            b"a file of the database"
        );
    }

    #[test]
    fn after_a_failed_write_no_flush_writes_until_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let block_size = 100;
        let mut state = SpeedState::open(dir.path(), block_size).expect("open");
        consume(&mut state, 0, 90, 10);
        // Block 0's file cannot be written (a directory stands where it goes): the flush that
        // finishes block 0 fails after folding its deltas into memory.
        std::fs::create_dir(dir.path().join("finished-p0.sst")).expect("mkdir");
        let mut pending = Pending::default();
        for offset in 90..120u64 {
            pending.fold(0, block_of(offset as i64, block_size), &event(offset));
            state.part(0).next_offset = offset as i64 + 1;
            pending.touched.insert(0);
            pending.messages += 1;
        }
        assert!(state.flush(&mut pending).is_err());
        std::fs::remove_dir(dir.path().join("finished-p0.sst")).expect("rmdir");
        pending.fold(0, 1, &event(120));
        state.part(0).next_offset = 121;
        pending.touched.insert(0);
        pending.messages += 1;
        let err = state.flush(&mut pending).expect_err("refused");
        assert!(err.to_string().contains("restart"), "{err}");
        drop(state);
        // Restarted from what is stored (offset 90), the same offsets give the fold from scratch.
        let mut state = SpeedState::open(dir.path(), block_size).expect("reopen");
        assert_eq!(state.part(0).next_offset, 90);
        consume(&mut state, 90, 150, 10);
        assert_folded(&state, 150, block_size);
    }

    #[test]
    fn a_state_of_the_earlier_layout_is_moved_with_its_live_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let block_size = 100;
        {
            // Written as the earlier layout did: every block's keys in `blocks`, no mark.
            let db = speed_store::open_primary(dir.path()).expect("open");
            let blocks = cf(&db, Cf::Blocks).expect("cf");
            let meta = cf(&db, Cf::Meta).expect("cf");
            for (k, v) in expected(150, block_size, 0) {
                db.put_cf(blocks, k, v.encode()).expect("put");
            }
            db.put_cf(meta, meta_key::BLOCK_SIZE, encode_i64(block_size as i64))
                .expect("put");
            db.put_cf(meta, meta_key::next_offset(0), encode_i64(150))
                .expect("put");
        }
        let mut state = SpeedState::open(dir.path(), block_size).expect("open");
        assert_folded(&state, 150, block_size);
        assert!(!in_blocks(&state)
            .iter()
            .any(|k| k.starts_with(&block_prefix(0, 1))));
        // Folding goes on in the moved live block.
        consume(&mut state, 150, 260, 10);
        assert_folded(&state, 260, block_size);
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

    /// A serving layer's mirror pulled from one instance, then from another that rebuilt the
    /// partition with other flush sizes, holds exactly a fold from scratch after every pull;
    /// an instance behind the mirror sends nothing; a batch cutoff drops the blocks below it.
    #[test]
    fn a_mirror_pulled_from_instances_in_turn_equals_a_fold_from_scratch() {
        use strata_common::cluster::{self, Have};
        let block_size = 100;
        let (da, dbb, dm) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        let mut a = SpeedState::open(da.path(), block_size).expect("open a");
        let mut b = SpeedState::open(dbb.path(), block_size).expect("open b");
        let mirror = Arc::new(speed_store::open_primary(dm.path()).expect("mirror"));
        let reader = speed_store::SpeedReader::shared(mirror.clone());
        // One pull: what the mirror holds, the instance's answer, written; the partitions sent.
        let pull = |from: &SpeedState, cutoff: i64| -> usize {
            let meta = speed_store::read_meta(&mirror, &()).expect("meta");
            let m = meta.partitions.get(&0);
            let next = m.map_or(0, |m| m.next_offset);
            let kept = m.map_or(0, |m| m.first_live_block);
            let have = BTreeMap::from([(0, Have { next, cutoff })]);
            let body = cluster::sync_response(&from.db, "i", &[0], &have).expect("answer");
            let answer = cluster::decode_sync(&body).expect("decode");
            for part in &answer.parts {
                cluster::write_part(&mirror, block_size, part, kept).expect("write");
            }
            answer.parts.len()
        };
        let check = |to: u64, first: u64| {
            let mut got: BTreeMap<Vec<u8>, Partial> = BTreeMap::new();
            speed_store::for_each_partial(&mirror, &mut |p, block, k, partial| {
                let mut key = block_prefix(p, block);
                key.extend_from_slice(k);
                assert!(got.insert(key, partial.clone()).is_none(), "a key twice");
            })
            .expect("read the mirror");
            let want = expected(to, block_size, first);
            assert_eq!(got.len(), want.len(), "keys at {to}");
            for (k, v) in &want {
                assert_eq!(got.get(k), Some(v), "key {k:?} at {to}");
            }
            // Through a reader, as the serving layer reads it: one item over every block.
            let key = ViewKey::Item("i2".into());
            let mut naive: Option<Partial> = None;
            for (k, v) in &want {
                if k[12..] == key.encode()[..] {
                    match &mut naive {
                        Some(n) => n.merge(v),
                        None => naive = Some(v.clone()),
                    }
                }
            }
            let ranges = [strata_common::handoff::BlockRange {
                partition: 0,
                first,
                last: block_of(to as i64 - 1, block_size),
            }];
            let read = reader
                .with_view(|db, reads, meta, _| {
                    assert_eq!(meta.partitions[&0].next_offset, to as i64);
                    reads.partial(db, &ranges, &key)
                })
                .expect("view");
            assert_eq!(read, naive, "{key:?} at {to}");
        };
        consume(&mut a, 0, 150, 7);
        assert_eq!(pull(&a, 0), 1);
        check(150, 0);
        // The same live block, its journal following the mirror's.
        consume(&mut a, 150, 180, 11);
        assert_eq!(pull(&a, 0), 1);
        check(180, 0);
        // The partition moved: b rebuilt it from the start with other flush sizes. Its journal
        // does not chain at the mirror's offset inside the same live block.
        consume(&mut b, 0, 195, 13);
        assert_eq!(pull(&b, 0), 1);
        check(195, 0);
        consume(&mut b, 195, 230, 13);
        assert_eq!(pull(&b, 0), 1);
        check(230, 0);
        // a, behind the mirror now, has nothing to give.
        assert_eq!(pull(&a, 0), 0);
        check(230, 0);
        // A batch version cut at 200: blocks 0 and 1 leave the mirror.
        consume(&mut b, 230, 400, 50);
        assert_eq!(pull(&b, 200), 1);
        check(400, 2);
        consume(&mut b, 400, 455, 9);
        assert_eq!(pull(&b, 200), 1);
        check(455, 2);
    }
}
