//! The speed layer's state in RocksDB: the layout both the speed layer (writer) and the serving
//! layer (reader) use.
//!
//! Column families ([`Cf`]):
//! - `blocks`: `partition u32 BE | block u64 BE | view key` -> [`Partial`], for the *finished*
//!   blocks of each partition (those its next offset has passed the end of). A block is written
//!   there once, whole, as an SST file ingested when the speed layer's next offset leaves it, so
//!   its keys never go through a memtable or a compaction;
//! - `journal`: `partition u32 BE | next offset u64 BE` -> the deltas of one flush of one
//!   partition (every view's, with their blocks) and the offset the flush started from. The
//!   partition's *live* block, the one its next offset lies in, is the merge of the deltas the
//!   journal holds for it: readers build it from there and bring it forward flush by flush
//!   ([`LiveBlock`]). Entries whose blocks are all finished are removed;
//! - `meta`: per partition the next offset to consume, the dedupe watermark and the first live
//!   block; the block size the state was built with and its layout ([`LAYOUT`]);
//! - `dedupe`: `partition u32 BE | event id` -> expiry (the dedupe rule's memory).
//!
//! The speed layer writes the journal, the dedupe ids and the meta family in one `WriteBatch`
//! per flush, so its state and its offsets never disagree, whatever moment it is killed at. A
//! block's SST file is ingested before the write that moves the offset past its end: killed in
//! between, the block is still live by the stored offset (readers take it from the journal and
//! pass over its keys in `blocks`), and the restarted layer ingests the same keys again.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode,
    Options, ReadOptions, DB,
};

use crate::handoff::{block_of, BlockRange, Offset, Partition, SpeedPartition};
use crate::time::Millis;
use crate::views::{absorb_opt, tag, Partial, ViewKey};
use crate::{Error, Result};

/// The column families of the speed state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cf {
    Blocks,
    Meta,
    Dedupe,
    Journal,
}

impl Cf {
    pub const ALL: [Cf; 4] = [Cf::Blocks, Cf::Meta, Cf::Dedupe, Cf::Journal];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Blocks => "blocks",
            Cf::Meta => "meta",
            Cf::Dedupe => "dedupe",
            Cf::Journal => "journal",
        }
    }
}

/// The block cache of the `blocks` family: its data blocks, and the index and filter of each of
/// its tables.
const BLOCKS_CACHE_BYTES: usize = 64 << 20;

fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(4);
    // Every new version of the database that adds tables (an ingested finished block, a
    // memtable flush, a compaction; for a follower, every catch-up that brings one) opens the
    // new tables' readers on this many threads, started and joined each time: at RocksDB's
    // default of 16 that is 15 threads made per finished block, for a file or two.
    opts.set_max_file_opening_threads(1);
    opts
}

impl Cf {
    /// The memtable size of the family. RocksDB's default (64 MiB, two of them per family) would
    /// let the three families hold 384 MiB of memtables; a heap profile of the speed layer over
    /// 4M events showed memtables as its largest consumer (115 MiB). `blocks` takes nearly all
    /// writes; `meta` is a few keys rewritten at every flush, so its memtable only needs to
    /// hold the latest versions until they are flushed.
    fn write_buffer_size(self) -> usize {
        const MIB: usize = 1 << 20;
        // `blocks` takes no writes but the range deletions of covered blocks (its keys arrive as
        // ingested files); the journal takes every flush's deltas.
        match self {
            Cf::Blocks => 2 * MIB,
            Cf::Dedupe => 8 * MIB,
            Cf::Meta => 2 * MIB,
            Cf::Journal => 16 * MIB,
        }
    }

    /// The family's options. `cache` is the block cache its tables' index and filter blocks go
    /// through (the `blocks` family only); without one they are built the same way.
    fn options(self, cache: Option<&Cache>) -> Options {
        let mut opts = Options::default();
        opts.set_write_buffer_size(self.write_buffer_size());
        opts.set_max_write_buffer_number(2);
        if self == Cf::Dedupe {
            // Event ids arrive in no key order, so each compaction from level 0 into level 1
            // rewrites all of level 1. At RocksDB's default size for it (256 MiB) level 1 held
            // every id of a 10M-event run, and those compactions read 0.7M, 1.4M, ... 9.0M
            // records in turn: about a quarter of the CPU, and the ceiling fell to about half
            // its 1M-event rate. A level 1 of 32 MiB (files of 8 MiB) sends ids on to level 2
            // after a few million, which bounds each compaction: 35M records read in all over
            // the run, 117-131k -> 146-159k events/s (docs/PERFORMANCE.md).
            opts.set_max_bytes_for_level_base(32 << 20);
            opts.set_target_file_size_base(8 << 20);
        }
        if self == Cf::Journal {
            // Entries live about as long as a block does: most are deleted before a compaction
            // reaches them, so compressing them at each memtable flush is work thrown away.
            opts.set_compression_type(rocksdb::DBCompressionType::None);
        }
        if self != Cf::Meta && self != Cf::Journal {
            // Most point reads ask for a key a table does not hold: a block's partial of an
            // item nobody touched in that block (recommendations read hundreds per request), an
            // event id never seen (the dedupe check of every event). A filter answers those
            // without reading the table's index and data blocks, for 10 bits a key.
            let mut table = BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            if let Some(cache) = cache.filter(|_| self == Cf::Blocks) {
                // The finished blocks' tables grow with history, and RocksDB holds every open
                // table's index and filter in the heap unless they go through the block cache:
                // 92 MiB over 55 million view keys, about 1.7 MiB more each million
                // (docs/PERFORMANCE.md). Through a cache of fixed size they take at most its
                // capacity, the newest and most read first; the writer reads none of them, a
                // reader sharing its database keeps the ones it asks for.
                table.set_block_cache(cache);
                table.set_cache_index_and_filter_blocks(true);
            }
            opts.set_block_based_table_factory(&table);
            // Blocks: no filter for the last level, which holds most keys: a filter there would
            // cost its memory (about 60 MiB more peak RSS over 14 million keys) to spare one
            // read. The dedupe check is the other way round: nearly every id it asks for is new,
            // so without a filter on the last level each event read an index and a data block
            // there once the ids outgrew the upper levels (the layer slowed from 46,000 to
            // 17,000 events/s over 10 million events). 10 bits per id: 12 MiB per 10 million.
            opts.set_optimize_filters_for_hits(self == Cf::Blocks);
        }
        opts
    }
}

/// The options finished blocks' SST files are built with: those of the `blocks` family (its
/// Bloom filter, its compression). Building a file reads no table, so it needs no cache.
pub fn block_file_options() -> Options {
    Cf::Blocks.options(None)
}

/// The families of one open database, with one block cache for the `blocks` family.
fn descriptors(families: &[Cf]) -> Vec<ColumnFamilyDescriptor> {
    let cache = Cache::new_lru_cache(BLOCKS_CACHE_BYTES);
    families
        .iter()
        .map(|&cf| ColumnFamilyDescriptor::new(cf.name(), cf.options(Some(&cache))))
        .collect()
}

/// The families a follower opens: all but `dedupe`, which only the speed layer reads. A
/// follower replays the writer's log into the families it has open and passes over the rest,
/// so the event ids (one write per event, the log's most numerous entries) cost it nothing.
const FOLLOWED: [Cf; 3] = [Cf::Blocks, Cf::Meta, Cf::Journal];

/// What RocksDB holds in memory for the speed state, in bytes, summed over its families: the
/// memtables (active and waiting to be flushed), the open tables' readers (their index and
/// filter blocks where these are not in a block cache) and the block caches' contents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RocksMemory {
    pub memtables: u64,
    pub table_readers: u64,
    pub block_cache: u64,
}

/// Reads [`RocksMemory`] from RocksDB's properties; a property it does not report counts 0.
pub fn rocks_memory(db: &DB) -> RocksMemory {
    let mut m = RocksMemory::default();
    for &family in &Cf::ALL {
        let Ok(handle) = cf(db, family) else { continue };
        let prop = |name: &str| {
            db.property_int_value_cf(handle, name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        m.memtables += prop("rocksdb.cur-size-all-mem-tables");
        m.table_readers += prop("rocksdb.estimate-table-readers-mem");
        m.block_cache += prop("rocksdb.block-cache-usage");
    }
    m
}

/// Opens (creating if missing) the speed state for writing.
pub fn open_primary(path: &Path) -> Result<DB> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
    DB::open_cf_descriptors(&db_options(), path, descriptors(&Cf::ALL))
        .map_err(|e| Error::rocks("open speed state", e))
}

/// Opens the speed state of another process as a read-only follower; `scratch` holds the
/// follower's own logs.
pub fn open_secondary(path: &Path, scratch: &Path) -> Result<DB> {
    std::fs::create_dir_all(scratch).map_err(|e| Error::io(scratch, e))?;
    let mut opts = db_options();
    opts.set_max_open_files(-1);
    // The follower writes nothing but its info log, and every catch-up logs there: on a full
    // disk that write fails and the next one trips an assertion inside RocksDB that aborts the
    // serving process. Only the header at open and fatal messages are logged; a catch-up that
    // fails returns its error, which the serving layer reports itself.
    opts.set_log_level(rocksdb::LogLevel::Fatal);
    DB::open_cf_descriptors_as_secondary(&opts, path, scratch, descriptors(&FOLLOWED))
        .map_err(|e| Error::rocks("open speed state as a follower", e))
}

pub fn cf(db: &DB, cf: Cf) -> Result<&ColumnFamily> {
    db.cf_handle(cf.name()).ok_or_else(|| {
        Error::corrupt(
            "speed state",
            format!("missing column family {}", cf.name()),
        )
    })
}

fn partition_bytes(p: Partition) -> [u8; 4] {
    (p as u32).to_be_bytes()
}

/// The key of one view key's partial in one block.
pub fn block_key(p: Partition, block: u64, key: &ViewKey) -> Vec<u8> {
    let mut out = block_prefix(p, block);
    out.extend_from_slice(&key.encode());
    out
}

/// The key every finished block's file holds besides its view keys, with an empty value: a
/// reader that finds it knows the file is there (see [`SpeedReader::with_view`]).
pub fn block_marker(p: Partition, block: u64) -> Vec<u8> {
    block_prefix(p, block)
}

/// The prefix of every key of one block.
pub fn block_prefix(p: Partition, block: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + 24);
    out.extend_from_slice(&partition_bytes(p));
    out.extend_from_slice(&block.to_be_bytes());
    out
}

/// The key remembering an event id in the dedupe family.
pub fn dedupe_key(p: Partition, id: impl AsRef<[u8]>) -> Vec<u8> {
    let id = id.as_ref();
    let mut out = Vec::with_capacity(4 + id.len());
    out.extend_from_slice(&partition_bytes(p));
    out.extend_from_slice(id);
    out
}

/// Keys of the meta family.
pub mod meta_key {
    use super::*;

    pub const BLOCK_SIZE: &[u8] = b"block-size";
    /// The layout the state is written in ([`LAYOUT`](super::LAYOUT)); absent in states
    /// written before finished blocks were ingested (every block's keys in `blocks`).
    pub const LAYOUT: &[u8] = b"layout";
    /// Wall-clock time (epoch ms) of the last flush.
    pub const FLUSHED_AT: &[u8] = b"flushed-at";
    /// In a serving layer's mirror of several speed instances: the JSON of where each partition
    /// came from (`crate::cluster::Sources`).
    pub const SOURCES: &[u8] = b"cluster-sources";

    fn tagged(tag: u8, p: Partition) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&partition_bytes(p));
        out
    }

    pub fn next_offset(p: Partition) -> Vec<u8> {
        tagged(b'o', p)
    }

    pub fn watermark(p: Partition) -> Vec<u8> {
        tagged(b'w', p)
    }

    pub fn first_live_block(p: Partition) -> Vec<u8> {
        tagged(b'd', p)
    }

    /// The newest block of the partition written to `blocks`.
    pub fn written_block(p: Partition) -> Vec<u8> {
        tagged(b'f', p)
    }

    pub fn accepted(p: Partition) -> Vec<u8> {
        tagged(b'a', p)
    }

    pub fn rejected(p: Partition) -> Vec<u8> {
        tagged(b'r', p)
    }

    pub fn duplicates(p: Partition) -> Vec<u8> {
        tagged(b'u', p)
    }

    /// JSON of the partition's [`Stall`](crate::undecodable::Stall), while it is stalled.
    pub fn stall(p: Partition) -> Vec<u8> {
        tagged(b's', p)
    }

    /// JSON list of the offset ranges passed over as undecodable
    /// ([`Skipped`](crate::undecodable::Skipped)).
    pub fn skipped(p: Partition) -> Vec<u8> {
        tagged(b'k', p)
    }

    /// Splits a partition key back into its tag and partition.
    pub fn parse(key: &[u8]) -> Option<(u8, Partition)> {
        if key.len() != 5 {
            return None;
        }
        let mut p = [0u8; 4];
        p.copy_from_slice(&key[1..]);
        Some((key[0], u32::from_be_bytes(p) as Partition))
    }
}

pub fn encode_i64(v: i64) -> [u8; 8] {
    v.to_be_bytes()
}

pub fn decode_i64(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(bytes.try_into().ok()?))
}

/// Per-partition bookkeeping of the speed layer, written with the state it describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionMeta {
    pub next_offset: Offset,
    pub watermark: Millis,
    pub first_live_block: u64,
    /// The newest block written to `blocks` (its file ingested), if any.
    pub written_block: Option<u64>,
    /// Messages accepted as events (copies included), rejected, and skipped as copies.
    pub accepted: u64,
    pub rejected: u64,
    pub duplicates: u64,
    /// Stopped in front of records that cannot be decoded (`kafka.undecodable = "stall"`).
    pub stall: Option<crate::undecodable::Stall>,
    /// Offset ranges passed over as undecodable (`kafka.undecodable = "skip"`).
    pub skipped: Vec<crate::undecodable::Skipped>,
}

impl PartitionMeta {
    /// Offsets passed over as undecodable.
    pub fn skipped_records(&self) -> u64 {
        self.skipped
            .iter()
            .map(|s| (s.to - s.from).max(0) as u64)
            .sum()
    }
}

impl Default for PartitionMeta {
    fn default() -> Self {
        PartitionMeta {
            next_offset: 0,
            watermark: crate::dedupe::START_WATERMARK,
            first_live_block: 0,
            written_block: None,
            accepted: 0,
            rejected: 0,
            duplicates: 0,
            stall: None,
            skipped: Vec::new(),
        }
    }
}

/// The layout this code writes: finished blocks in `blocks`, each partition's live block in the
/// journal. A state without a layout mark keeps every block's keys in `blocks` (the speed layer
/// moves it to this layout when it opens it; readers read it as it is).
pub const LAYOUT: u64 = 2;

/// Everything in the meta family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpeedMeta {
    /// The block size the state was built with; `None` for a new store.
    pub block_size: Option<u64>,
    /// The state's layout mark (`None`: written before [`LAYOUT`]).
    pub layout: Option<u64>,
    /// Wall-clock time (epoch ms) of the speed layer's last write.
    pub flushed_at: Option<Millis>,
    pub partitions: BTreeMap<Partition, PartitionMeta>,
    /// In a serving layer's mirror of several speed instances, where each partition came from
    /// (JSON of `cluster::Sources`); `None` in a speed layer's own state.
    pub sources: Option<Vec<u8>>,
}

impl SpeedMeta {
    pub fn speed_partitions(&self) -> BTreeMap<Partition, SpeedPartition> {
        self.partitions
            .iter()
            .map(|(&p, m)| {
                (
                    p,
                    SpeedPartition {
                        next_offset: m.next_offset,
                        first_live_block: m.first_live_block,
                    },
                )
            })
            .collect()
    }
}

/// Read access shared by a live database and a snapshot of one.
pub trait Reads {
    fn get_cf_bytes(&self, db: &DB, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn read_options(&self) -> ReadOptions;
}

impl Reads for () {
    fn get_cf_bytes(&self, db: &DB, c: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        db.get_cf(cf(db, c)?, key)
            .map_err(|e| Error::rocks("read speed state", e))
    }
    fn read_options(&self) -> ReadOptions {
        ReadOptions::default()
    }
}

impl Reads for rocksdb::Snapshot<'_> {
    fn get_cf_bytes(&self, db: &DB, c: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_cf(cf(db, c)?, key)
            .map_err(|e| Error::rocks("read speed state", e))
    }
    fn read_options(&self) -> ReadOptions {
        let mut o = ReadOptions::default();
        o.set_snapshot(self);
        o
    }
}

/// Reads the whole meta family.
pub fn read_meta(db: &DB, reads: &impl Reads) -> Result<SpeedMeta> {
    let mut meta = SpeedMeta {
        block_size: reads
            .get_cf_bytes(db, Cf::Meta, meta_key::BLOCK_SIZE)?
            .and_then(|v| decode_i64(&v))
            .map(|v| v as u64),
        flushed_at: reads
            .get_cf_bytes(db, Cf::Meta, meta_key::FLUSHED_AT)?
            .and_then(|v| decode_i64(&v)),
        layout: reads
            .get_cf_bytes(db, Cf::Meta, meta_key::LAYOUT)?
            .and_then(|v| decode_i64(&v))
            .map(|v| v as u64),
        sources: reads.get_cf_bytes(db, Cf::Meta, meta_key::SOURCES)?,
        ..SpeedMeta::default()
    };
    let handle = cf(db, Cf::Meta)?;
    for item in db.iterator_cf_opt(handle, reads.read_options(), IteratorMode::Start) {
        let (k, v) = item.map_err(|e| Error::rocks("scan speed meta", e))?;
        let Some((tag, p)) = meta_key::parse(&k) else {
            continue;
        };
        match tag {
            b's' => {
                meta.partitions.entry(p).or_default().stall = serde_json::from_slice(&v)
                    .map_err(|e| Error::corrupt("speed meta", format!("stall: {e}")))?;
                continue;
            }
            b'k' => {
                meta.partitions.entry(p).or_default().skipped = serde_json::from_slice(&v)
                    .map_err(|e| Error::corrupt("speed meta", format!("skipped: {e}")))?;
                continue;
            }
            _ => {}
        }
        let v =
            decode_i64(&v).ok_or_else(|| Error::corrupt("speed meta", "value is not 8 bytes"))?;
        let m = meta.partitions.entry(p).or_default();
        match tag {
            b'o' => m.next_offset = v,
            b'w' => m.watermark = v,
            b'd' => m.first_live_block = v as u64,
            b'a' => m.accepted = v as u64,
            b'r' => m.rejected = v as u64,
            b'u' => m.duplicates = v as u64,
            b'f' => m.written_block = Some(v as u64),
            _ => {}
        }
    }
    Ok(meta)
}

/// Merges the partials of `key` over the given block ranges.
pub fn read_partial(
    db: &DB,
    reads: &impl Reads,
    ranges: &[BlockRange],
    key: &ViewKey,
) -> Result<Option<Partial>> {
    let handle = cf(db, Cf::Blocks)?;
    let keys: Vec<Vec<u8>> = ranges
        .iter()
        .flat_map(|r| (r.first..=r.last).map(move |b| block_key(r.partition, b, key)))
        .collect();
    let mut acc: Option<Partial> = None;
    let values = db.batched_multi_get_cf_opt(handle, &keys, false, &reads.read_options());
    for v in values {
        let v = v.map_err(|e| Error::rocks("read speed block", e))?;
        if let Some(bytes) = v {
            let p = Partial::decode(&bytes)
                .ok_or_else(|| Error::corrupt("speed block", "undecodable partial"))?;
            absorb_opt(&mut acc, p);
        }
    }
    Ok(acc)
}

/// Calls `f` with every partial whose encoded view key starts with `key_prefix` (e.g. one
/// view's tag byte) and is at or after `from` (a longer key within the prefix; `None`: the
/// prefix itself), in the given block ranges.
pub fn scan_view(
    db: &DB,
    reads: &impl Reads,
    ranges: &[BlockRange],
    key_prefix: &[u8],
    from: Option<&[u8]>,
    mut f: impl FnMut(ViewKey, Partial),
) -> Result<()> {
    let handle = cf(db, Cf::Blocks)?;
    let from = from.filter(|f| *f > key_prefix).unwrap_or(key_prefix);
    for r in ranges {
        for block in r.first..=r.last {
            let mut prefix = block_prefix(r.partition, block);
            let mut start = prefix.clone();
            prefix.extend_from_slice(key_prefix);
            start.extend_from_slice(from);
            scan_prefixed(
                db,
                handle,
                reads,
                &start,
                &prefix,
                "scan speed block",
                |k, v| {
                    if k.len() == 12 {
                        return Ok(()); // a block's marker
                    }
                    let key = ViewKey::decode(&k[12..])
                        .ok_or_else(|| Error::corrupt("speed block", "undecodable view key"))?;
                    let p = Partial::decode(v)
                        .ok_or_else(|| Error::corrupt("speed block", "undecodable partial"))?;
                    f(key, p);
                    Ok(())
                },
            )?;
        }
    }
    Ok(())
}

/// Calls `f` with each entry of `handle` from `start` on, in key order, while its key starts
/// with `prefix`.
fn scan_prefixed(
    db: &DB,
    handle: &ColumnFamily,
    reads: &impl Reads,
    start: &[u8],
    prefix: &[u8],
    what: &'static str,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<()>,
) -> Result<()> {
    let mut opts = reads.read_options();
    // Bounded, so that the iterator stops at the prefix's end instead of stepping over the
    // deleted entries past it (a partition's dropped journal entries, a dropped block's keys)
    // to find the next live key.
    if let Some(end) = prefix_end(prefix) {
        opts.set_iterate_upper_bound(end);
    }
    let iter = db.iterator_cf_opt(handle, opts, IteratorMode::From(start, Direction::Forward));
    for item in iter {
        let (k, v) = item.map_err(|e| Error::rocks(what, e))?;
        if !k.starts_with(prefix) {
            break;
        }
        f(&k, &v)?;
    }
    Ok(())
}

/// The first key past every key that starts with `prefix` (`None`: no such key, the prefix
/// being all 0xff bytes or empty).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The journal key of the flush that brought partition `p` to next offset `end`.
pub fn journal_key(p: Partition, end: i64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&partition_bytes(p));
    out[4..].copy_from_slice(&encode_i64(end));
    out
}

/// One flush of one partition as the journal holds it: the next offset before and after it, and
/// the deltas of every view it folded, with their blocks. Readers that hold a partition's live
/// block as of `start` bring it to `end` from the deltas alone.
#[derive(Debug, Default, PartialEq)]
pub struct JournalEntry {
    pub start: i64,
    pub end: i64,
    pub deltas: Vec<(u64, ViewKey, Partial)>,
}

/// Whether an encoded view key is one of the co-occurrence views (item audiences, user
/// histories): its first byte is the view's tag.
pub fn co_occurrence(key: &[u8]) -> bool {
    matches!(key.first(), Some(&tag::ITEM_USERS) | Some(&tag::USER_ITEMS))
}

/// One delta as the journal is written: its block, encoded view key and encoded partial.
pub type JournalDelta = (u64, Vec<u8>, Vec<u8>);

/// Encodes a journal value: `start`, then per delta its block, its encoded key and partial
/// (each with a 4-byte length).
pub fn encode_journal(start: i64, deltas: &[JournalDelta]) -> Vec<u8> {
    let mut value = JournalValue::default();
    for (block, k, v) in deltas {
        value.push_raw(*block, k, v);
    }
    value.finish(start)
}

/// A journal value being written delta by delta, encoded in place (what [`encode_journal`]
/// returns for the same deltas).
pub struct JournalValue(Vec<u8>);

impl Default for JournalValue {
    fn default() -> Self {
        // `start` comes first, written by `finish`.
        JournalValue(vec![0; 8])
    }
}

impl JournalValue {
    /// Appends a delta as view key and partial.
    pub fn push(&mut self, block: u64, key: &ViewKey, partial: &Partial) {
        self.0.extend_from_slice(&block.to_be_bytes());
        self.field(|out| key.encode_into(out));
        self.field(|out| partial.encode_into(out));
    }

    /// Appends a delta already encoded.
    pub fn push_raw(&mut self, block: u64, key: &[u8], partial: &[u8]) {
        self.0.extend_from_slice(&block.to_be_bytes());
        self.field(|out| out.extend_from_slice(key));
        self.field(|out| out.extend_from_slice(partial));
    }

    /// Writes a 4-byte length, then what `write` appends, then the length it appended.
    fn field(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let at = self.0.len();
        self.0.extend_from_slice(&[0; 4]);
        write(&mut self.0);
        let len = (self.0.len() - at - 4) as u32;
        self.0[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The value, starting at offset `start`.
    pub fn finish(mut self, start: i64) -> Vec<u8> {
        self.0[..8].copy_from_slice(&encode_i64(start));
        self.0
    }
}

/// A journal entry's offsets and its deltas as stored: (block, encoded key, encoded partial).
struct RawEntry<'a> {
    start: i64,
    end: i64,
    deltas: Vec<(u64, &'a [u8], &'a [u8])>,
}

fn decode_raw<'a>(key: &[u8], value: &'a [u8]) -> Option<RawEntry<'a>> {
    let end = decode_i64(key.get(4..12)?)?;
    let start = decode_i64(value.get(..8)?)?;
    let mut rest = &value[8..];
    let mut take = |n: usize| -> Option<&'a [u8]> {
        let (a, b) = (rest.get(..n)?, rest.get(n..)?);
        rest = b;
        Some(a)
    };
    let mut deltas = Vec::new();
    while let Some(block) = take(8) {
        let block = u64::from_be_bytes(block.try_into().ok()?);
        let klen = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
        let key = take(klen)?;
        let vlen = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
        deltas.push((block, key, take(vlen)?));
    }
    Some(RawEntry { start, end, deltas })
}

/// Calls `f` with partition `p`'s journal entries that end after offset `after`, as stored, in
/// offset order.
fn read_journal_raw(
    db: &DB,
    reads: &impl Reads,
    p: Partition,
    after: i64,
    f: &mut dyn FnMut(RawEntry<'_>) -> Result<()>,
) -> Result<()> {
    let handle = cf(db, Cf::Journal)?;
    let start = journal_key(p, after.saturating_add(1));
    scan_prefixed(
        db,
        handle,
        reads,
        &start,
        &partition_bytes(p),
        "read speed journal",
        |k, v| f(decode_raw(k, v).ok_or_else(|| corrupt_journal("undecodable entry"))?),
    )
}

fn corrupt_journal(what: impl Into<String>) -> Error {
    Error::corrupt("speed journal", what.into())
}

/// Calls `f` with partition `p`'s journal entries that end after offset `after`, in offset
/// order, each with the deltas whose encoded view key `keep` accepts (decoded only those: most
/// readers want a view or two of the many an entry holds).
pub fn read_journal(
    db: &DB,
    reads: &impl Reads,
    p: Partition,
    after: i64,
    keep: &dyn Fn(&[u8]) -> bool,
    f: &mut dyn FnMut(JournalEntry),
) -> Result<()> {
    read_journal_raw(db, reads, p, after, &mut |e| {
        let mut deltas = Vec::new();
        for (block, k, v) in e.deltas {
            if !keep(k) {
                continue;
            }
            let key = ViewKey::decode(k).ok_or_else(|| corrupt_journal("undecodable view key"))?;
            let partial =
                Partial::decode(v).ok_or_else(|| corrupt_journal("undecodable partial"))?;
            deltas.push((block, key, partial));
        }
        f(JournalEntry {
            start: e.start,
            end: e.end,
            deltas,
        });
        Ok(())
    })
}

/// Layers a live block is held in before they are merged.
const LIVE_LAYERS: usize = 8;

/// Live blocks a reader holds per partition (the newest states').
const LIVE_HELD: usize = 8;

/// The partials of one partition's live block, the one its next offset lies in: not in the
/// `blocks` family, but the merge of the deltas the journal holds for it, up to `through`.
/// Held in layers (one per bringing forward, merged into one past [`LIVE_LAYERS`]), so that
/// bringing it forward adds a layer instead of copying what readers still hold.
#[derive(Clone, Debug, Default)]
pub struct LiveBlock {
    pub block: u64,
    /// The partition's next offset the block is folded up to.
    pub through: Offset,
    layers: Vec<Arc<LiveLayer>>,
}

/// One layer of a live block: partials by encoded view key. A layer never changes once made,
/// and every view holding it shares it, so what is derived from a layer holds for as long as
/// the layer is held.
pub type LiveLayer = BTreeMap<Vec<u8>, Partial>;

/// Calls `f` with the partials of `layer` whose encoded key starts with `prefix` and is at or
/// after `start`.
pub fn scan_layer(
    layer: &LiveLayer,
    start: &[u8],
    prefix: &[u8],
    f: &mut dyn FnMut(&[u8], &Partial),
) {
    let from = (std::ops::Bound::Included(start), std::ops::Bound::Unbounded);
    for (k, p) in layer.range::<[u8], _>(from) {
        if !k.starts_with(prefix) {
            break;
        }
        f(k, p);
    }
}

impl LiveBlock {
    /// The merged partial of one encoded view key.
    pub fn get(&self, key: &[u8]) -> Option<Partial> {
        let mut acc: Option<Partial> = None;
        for l in &self.layers {
            if let Some(p) = l.get(key) {
                match &mut acc {
                    Some(a) => a.merge(p),
                    None => acc = Some(p.clone()),
                }
            }
        }
        acc
    }

    /// Calls `f` with each layer's partials whose encoded key starts with `prefix` and is at or
    /// after `start` (a key may come once per layer).
    pub fn scan(&self, start: &[u8], prefix: &[u8], f: &mut dyn FnMut(&[u8], &Partial)) {
        for l in &self.layers {
            scan_layer(l, start, prefix, f);
        }
    }

    /// Every key's merged partial, in key order.
    pub fn merged(&self) -> BTreeMap<Vec<u8>, Partial> {
        merge_layers(&self.layers)
    }

    /// Adds a newer layer. Past [`LIVE_LAYERS`], the layers after the first are merged into
    /// one, and all of them only once those are half as large as the first: merging every
    /// layer each time copied the whole block every few flushes (a fifth of a serving layer's
    /// time under a live stream).
    fn push(&mut self, layer: LiveLayer) {
        if layer.is_empty() {
            return;
        }
        self.layers.push(Arc::new(layer));
        if self.layers.len() > LIVE_LAYERS {
            let newer: usize = self.layers[1..].iter().map(|l| l.len()).sum();
            let from = if 2 * newer >= self.layers[0].len() {
                0
            } else {
                1
            };
            let merged = merge_layers(&self.layers[from..]);
            self.layers.truncate(from);
            self.layers.push(Arc::new(merged));
        }
    }
}

/// `layers` merged into one, oldest first.
fn merge_layers(layers: &[Arc<LiveLayer>]) -> LiveLayer {
    let mut out = BTreeMap::new();
    for l in layers {
        merge_into(&mut out, l.iter().map(|(k, p)| (k.clone(), p.clone())));
    }
    out
}

fn merge_into(
    out: &mut BTreeMap<Vec<u8>, Partial>,
    items: impl IntoIterator<Item = (Vec<u8>, Partial)>,
) {
    for (k, p) in items {
        match out.entry(k) {
            std::collections::btree_map::Entry::Occupied(mut o) => o.get_mut().absorb(p),
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(p);
            }
        }
    }
}

/// Folds the deltas of `block` from `entries` into one layer.
fn layer_of(
    block: u64,
    deltas: &[(u64, &[u8], &[u8])],
    layer: &mut BTreeMap<Vec<u8>, Partial>,
) -> Result<()> {
    for &(b, k, v) in deltas {
        if b != block {
            continue;
        }
        let p = Partial::decode(v).ok_or_else(|| corrupt_journal("undecodable partial"))?;
        merge_into(layer, [(k.to_vec(), p)]);
    }
    Ok(())
}

/// Partition `p`'s live block `block` as folded up to next offset `next`, read from the journal:
/// from `held` on (the same block as of an earlier offset) when the journal chains from there,
/// else from the block's start.
pub fn read_live(
    db: &DB,
    reads: &impl Reads,
    p: Partition,
    block: u64,
    block_size: u64,
    next: Offset,
    held: Option<&LiveBlock>,
) -> Result<LiveBlock> {
    if let Some(h) = held.filter(|h| h.block == block && h.through <= next) {
        if h.through == next {
            return Ok(h.clone());
        }
        let (mut at, mut whole, mut layer) = (h.through, true, BTreeMap::new());
        read_journal_raw(db, reads, p, h.through, &mut |e| {
            if whole && e.end <= next {
                whole = e.start == at;
                at = e.end;
                layer_of(block, &e.deltas, &mut layer)?;
            }
            Ok(())
        })?;
        if whole && at == next {
            let mut out = h.clone();
            out.through = next;
            out.push(layer);
            return Ok(out);
        }
    }
    // Every entry ending past the block's first offset may hold deltas of it.
    let first = i64::try_from(block.saturating_mul(block_size)).unwrap_or(i64::MAX);
    let (mut reached, mut layer) = (None, BTreeMap::new());
    read_journal_raw(db, reads, p, first, &mut |e| {
        if e.end <= next {
            if reached.is_none() && e.start > first {
                return Err(corrupt_journal(format!(
                    "partition {p}: the journal begins at offset {} inside block {block} (from {first})",
                    e.start
                )));
            }
            reached = Some(e.end);
            layer_of(block, &e.deltas, &mut layer)?;
        }
        Ok(())
    })?;
    if next > first && reached != Some(next) {
        return Err(corrupt_journal(format!(
            "partition {p}: the journal reaches offset {reached:?}, not the next offset {next}"
        )));
    }
    let mut out = LiveBlock {
        block,
        through: next,
        layers: Vec::new(),
    };
    out.push(layer);
    Ok(out)
}

/// The number of each partition's live block, for the partitions of `meta` that have one (a
/// next offset inside a block). Empty for a state without the layout mark, whose blocks are all
/// in `blocks`.
fn live_block_numbers(
    meta: &SpeedMeta,
) -> impl Iterator<Item = (Partition, &PartitionMeta, u64)> + '_ {
    let block_size = meta.block_size.filter(|_| meta.layout == Some(LAYOUT));
    meta.partitions.iter().filter_map(move |(&p, m)| {
        let (size, next) = (block_size?, m.next_offset);
        (next > 0 && !(next as u64).is_multiple_of(size)).then(|| (p, m, block_of(next, size)))
    })
}

/// The live block of each partition of `meta` that has one (a next offset inside a block), read
/// from the journal; `held` are live blocks read before, brought forward when they still apply.
/// Empty for a state without the layout mark, whose blocks are all in `blocks`.
pub fn live_blocks(
    db: &DB,
    reads: &impl Reads,
    meta: &SpeedMeta,
    held: &BTreeMap<Partition, Arc<LiveBlock>>,
) -> Result<BTreeMap<Partition, Arc<LiveBlock>>> {
    let mut out = BTreeMap::new();
    let Some(block_size) = meta.block_size else {
        return Ok(out);
    };
    for (p, m, block) in live_block_numbers(meta) {
        let next = m.next_offset;
        let live = match held.get(&p) {
            Some(h) if h.block == block && h.through == next => h.clone(),
            // Below the first live block nothing is folded: a batch version covers it.
            _ if block < m.first_live_block => Arc::new(LiveBlock {
                block,
                through: next,
                layers: Vec::new(),
            }),
            h => Arc::new(read_live(
                db,
                reads,
                p,
                block,
                block_size,
                next,
                h.map(|h| &**h),
            )?),
        };
        out.insert(p, live);
    }
    Ok(out)
}

/// What [`for_each_partial`] calls: partition, block, encoded view key, partial.
pub type EachPartial<'a> = dyn FnMut(Partition, u64, &[u8], &Partial) + 'a;

/// Calls `f` with every partial the state holds: the finished blocks' from `blocks`, the live
/// blocks' from the journal (for counting keys and for tests; not for queries).
pub fn for_each_partial(db: &DB, f: &mut EachPartial<'_>) -> Result<()> {
    let meta = read_meta(db, &())?;
    let live = live_blocks(db, &(), &meta, &BTreeMap::new())?;
    let handle = cf(db, Cf::Blocks)?;
    for item in db.iterator_cf(handle, IteratorMode::Start) {
        let (k, v) = item.map_err(|e| Error::rocks("scan speed blocks", e))?;
        if k.len() == 12 {
            continue; // a block's marker
        }
        let (Some(p), Some(block)) = (k.get(..4), k.get(4..12)) else {
            return Err(Error::corrupt("speed block", "short key"));
        };
        let p = u32::from_be_bytes(p.try_into().unwrap_or_default()) as Partition;
        let block = u64::from_be_bytes(block.try_into().unwrap_or_default());
        if live.get(&p).is_some_and(|l| l.block <= block) {
            continue;
        }
        let partial = Partial::decode(&v)
            .ok_or_else(|| Error::corrupt("speed block", "undecodable partial"))?;
        f(p, block, &k[12..], &partial);
    }
    for (&p, l) in &live {
        for (k, partial) in l.merged() {
            f(p, l.block, &k, &partial);
        }
    }
    Ok(())
}

/// A handle on the speed state for readers: the writer's own database (in one process), or a
/// follower of another process's database that catches up on demand.
pub struct SpeedReader {
    db: Arc<DB>,
    follower: bool,
    /// Readers hold it shared; catching up holds it exclusively, so a reader never sees state
    /// change under it.
    gate: RwLock<()>,
    /// The meta family as of a sequence number. Every write moves the sequence number, so
    /// while it stands still the meta read at it is still the meta: answering a query then
    /// costs no scan of the meta family (whose memtable holds every flush's overwritten
    /// versions until it is flushed, and a scan steps over all of them).
    meta: RwLock<Option<(u64, Arc<SpeedMeta>)>>,
    /// Per partition, the live blocks read last (the newest [`LIVE_HELD`], oldest first),
    /// brought forward by later reads (see [`live_blocks`]). More than one, so that a reader of
    /// a snapshot a little older than the newest finds its own instead of reading the block
    /// from the journal's start.
    live: Mutex<BTreeMap<Partition, Vec<Arc<LiveBlock>>>>,
    /// The sequence number whose finished blocks were last found in `blocks`.
    checked: Mutex<Option<u64>>,
}

impl SpeedReader {
    /// Reads the writer's own database (same process); reads go through snapshots.
    pub fn shared(db: Arc<DB>) -> Self {
        SpeedReader {
            db,
            follower: false,
            gate: RwLock::new(()),
            meta: RwLock::new(None),
            live: Mutex::default(),
            checked: Mutex::default(),
        }
    }

    /// Follows the database of a speed layer running in another process.
    pub fn follow(path: &Path, scratch: &Path) -> Result<Self> {
        Ok(SpeedReader {
            db: Arc::new(open_secondary(path, scratch)?),
            follower: true,
            gate: RwLock::new(()),
            meta: RwLock::new(None),
            live: Mutex::default(),
            checked: Mutex::default(),
        })
    }

    /// Brings a follower up to date with the writer; a no-op for a shared database.
    pub fn catch_up(&self) -> Result<()> {
        if self.follower {
            let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
            self.db
                .try_catch_up_with_primary()
                .map_err(|e| Error::rocks("catch up with the speed layer", e))?;
        }
        Ok(())
    }

    /// The database's newest sequence number: every write of the speed layer moves it (for a
    /// follower, every catch-up that brought writes).
    pub fn sequence(&self) -> u64 {
        self.db.latest_sequence_number()
    }

    /// Runs `f` against one consistent view of the state and its meta family, and the view's
    /// sequence number when it is known exactly.
    pub fn with_view<T>(
        &self,
        f: impl FnOnce(&DB, &dyn ViewReads, Arc<SpeedMeta>, Option<u64>) -> Result<T>,
    ) -> Result<T> {
        let mut tries = 0;
        loop {
            let g = self.gate.read().unwrap_or_else(|e| e.into_inner());
            if self.follower {
                // Nothing moves while the gate is held: only catching up writes to a follower.
                let seq = self.db.latest_sequence_number();
                let meta = self.meta_at(Some(seq), || read_meta(&self.db, &()))?;
                if let Some(view) = self.view(&(), &meta, Some(seq))? {
                    return f(&self.db, &view, meta, Some(seq));
                }
            } else {
                // The snapshot's sequence number lies between the two readings; when they
                // agree, it is that number.
                let before = self.db.latest_sequence_number();
                let snap = self.db.snapshot();
                let after = self.db.latest_sequence_number();
                let seq = (before == after).then_some(before);
                let meta = self.meta_at(seq, || read_meta(&self.db, &snap))?;
                if let Some(view) = self.view(&snap, &meta, seq)? {
                    return f(&self.db, &view, meta, seq);
                }
            }
            // A catch-up reads the writer's MANIFEST before its log: one that came between the
            // writer's ingesting a finished block and its write moving the offsets past that
            // block sees the write without the file. The next catch-up brings the file.
            drop(g);
            tries += 1;
            if tries > 500 || !self.follower {
                return Err(Error::corrupt(
                    "speed state",
                    "a finished block's file is missing from `blocks`",
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            self.catch_up()?;
        }
    }

    /// Reads the partitions' live blocks as of the newest view and holds them. Live blocks are
    /// read whole from the journal on the first read that needs them (tens of milliseconds
    /// under a stream) and brought forward from the ones held after that: a reader calls this
    /// when it starts, so that its first request does not wait for them.
    pub fn read_live(&self) -> Result<()> {
        self.with_view(|_, reads, _, _| reads.read_live())
    }

    /// The reads of one consistent view; its live blocks are read on the first read that needs
    /// them (see [`View`]). `None` when a finished block the meta family names is not in
    /// `blocks` yet.
    fn view<'r, R: Reads>(
        &'r self,
        reads: &'r R,
        meta: &Arc<SpeedMeta>,
        seq: Option<u64>,
    ) -> Result<Option<View<'r, R>>> {
        if seq.is_none() || *self.checked.lock().unwrap_or_else(|e| e.into_inner()) != seq {
            for (&p, m) in &meta.partitions {
                let Some(block) = m.written_block.filter(|&b| b >= m.first_live_block) else {
                    continue;
                };
                if reads
                    .get_cf_bytes(&self.db, Cf::Blocks, &block_marker(p, block))?
                    .is_none()
                {
                    return Ok(None);
                }
            }
            *self.checked.lock().unwrap_or_else(|e| e.into_inner()) = seq;
        }
        Ok(Some(View {
            reads,
            reader: self,
            meta: meta.clone(),
            live: OnceLock::new(),
        }))
    }

    /// The live blocks of a view of `meta`, brought forward from the ones held.
    fn live_of<R: Reads>(
        &self,
        reads: &R,
        meta: &SpeedMeta,
    ) -> Result<BTreeMap<Partition, Arc<LiveBlock>>> {
        let mut held = self.live.lock().unwrap_or_else(|e| e.into_inner());
        // Per partition, the held block this view's is, or the newest it can be brought
        // forward from.
        let start: BTreeMap<Partition, Arc<LiveBlock>> = (meta.partitions.iter())
            .filter_map(|(p, m)| {
                let kept = held.get(p)?;
                let before = kept.iter().rev().find(|l| l.through <= m.next_offset)?;
                Some((*p, before.clone()))
            })
            .collect();
        let live = live_blocks(&self.db, reads, meta, &start)?;
        for (p, l) in &live {
            let kept = held.entry(*p).or_default();
            if kept
                .iter()
                .any(|h| (h.block, h.through) == (l.block, l.through))
            {
                continue;
            }
            kept.push(l.clone());
            kept.sort_by_key(|h| (h.block, h.through));
            if kept.len() > LIVE_HELD {
                kept.remove(0);
            }
        }
        Ok(live)
    }

    /// The meta family at sequence number `seq` (unknown: `None`), read only when the cached
    /// one is of another sequence number.
    fn meta_at(
        &self,
        seq: Option<u64>,
        read: impl FnOnce() -> Result<SpeedMeta>,
    ) -> Result<Arc<SpeedMeta>> {
        if let Some(seq) = seq {
            let cached = self.meta.read().unwrap_or_else(|e| e.into_inner());
            if let Some((at, meta)) = cached.as_ref() {
                if *at == seq {
                    return Ok(meta.clone());
                }
            }
        }
        let meta = Arc::new(read()?);
        if let Some(seq) = seq {
            *self.meta.write().unwrap_or_else(|e| e.into_inner()) = Some((seq, meta.clone()));
        }
        Ok(meta)
    }
}

/// Object-safe reads of one consistent view, for [`SpeedReader::with_view`].
pub trait ViewReads {
    fn partial(&self, db: &DB, ranges: &[BlockRange], key: &ViewKey) -> Result<Option<Partial>>;
    fn scan(
        &self,
        db: &DB,
        ranges: &[BlockRange],
        key_prefix: &[u8],
        from: Option<&[u8]>,
        f: &mut dyn FnMut(ViewKey, Partial),
    ) -> Result<()>;
    /// [`ViewReads::scan`] of the finished blocks of `ranges` only; the live blocks' share is
    /// in [`ViewReads::live_layers`].
    fn scan_finished(
        &self,
        db: &DB,
        ranges: &[BlockRange],
        key_prefix: &[u8],
        from: Option<&[u8]>,
        f: &mut dyn FnMut(ViewKey, Partial),
    ) -> Result<()>;
    /// The layers of the live blocks within `ranges` (see [`LiveLayer`]).
    fn live_layers(&self, ranges: &[BlockRange]) -> Result<Vec<Arc<LiveLayer>>>;
    /// Reads this view's live blocks (see [`SpeedReader::read_live`]).
    fn read_live(&self) -> Result<()>;
    /// See [`read_journal`].
    fn journal(
        &self,
        db: &DB,
        p: Partition,
        after: i64,
        keep: &dyn Fn(&[u8]) -> bool,
        f: &mut dyn FnMut(JournalEntry),
    ) -> Result<()>;
}

/// The reads of one consistent view of a state: its finished blocks from `blocks`, each
/// partition's live block from the journal (held in memory, see [`LiveBlock`]).
///
/// The live blocks are read on the view's first read that needs them, not when the view is
/// made: an answer from the meta family alone (`/v1/status`, `/metrics`) folds no journal
/// entry. Reading them brings forward the blocks the reader holds (one view at a time; the
/// others wait and take its result).
pub struct View<'r, R> {
    reads: &'r R,
    reader: &'r SpeedReader,
    meta: Arc<SpeedMeta>,
    live: OnceLock<BTreeMap<Partition, Arc<LiveBlock>>>,
}

impl<R: Reads> View<'_, R> {
    fn live(&self) -> Result<&BTreeMap<Partition, Arc<LiveBlock>>> {
        if let Some(live) = self.live.get() {
            return Ok(live);
        }
        let live = self.reader.live_of(self.reads, &self.meta)?;
        Ok(self.live.get_or_init(|| live))
    }

    /// The ranges without the live blocks, which `blocks` does not hold (or holds keys of that
    /// are not yet theirs: a block ingested by a speed layer killed before its offsets moved).
    fn finished(&self, ranges: &[BlockRange]) -> Vec<BlockRange> {
        let live: BTreeMap<Partition, u64> = (live_block_numbers(&self.meta))
            .map(|(p, _, block)| (p, block))
            .collect();
        ranges
            .iter()
            .filter_map(|r| match live.get(&r.partition) {
                // Lazily: a live block 0 has no block before it.
                Some(&l) if l <= r.last => (l > r.first).then(|| BlockRange { last: l - 1, ..*r }),
                _ => Some(*r),
            })
            .collect()
    }

    fn live_in<'a>(
        &'a self,
        ranges: &'a [BlockRange],
    ) -> Result<impl Iterator<Item = &'a LiveBlock> + 'a> {
        let live = self.live()?;
        Ok(ranges.iter().filter_map(|r| {
            live.get(&r.partition)
                .filter(|l| l.block >= r.first && l.block <= r.last)
                .map(|l| &**l)
        }))
    }
}

impl<R: Reads> ViewReads for View<'_, R> {
    fn partial(&self, db: &DB, ranges: &[BlockRange], key: &ViewKey) -> Result<Option<Partial>> {
        let mut acc = read_partial(db, self.reads, &self.finished(ranges), key)?;
        let mut encoded = None;
        for l in self.live_in(ranges)? {
            let k = encoded.get_or_insert_with(|| key.encode());
            if let Some(p) = l.get(k) {
                absorb_opt(&mut acc, p);
            }
        }
        Ok(acc)
    }
    fn scan(
        &self,
        db: &DB,
        ranges: &[BlockRange],
        key_prefix: &[u8],
        from: Option<&[u8]>,
        f: &mut dyn FnMut(ViewKey, Partial),
    ) -> Result<()> {
        self.scan_finished(db, ranges, key_prefix, from, &mut *f)?;
        let start = from.filter(|s| *s > key_prefix).unwrap_or(key_prefix);
        let mut bad = false;
        for l in self.live_in(ranges)? {
            l.scan(start, key_prefix, &mut |k, p| match ViewKey::decode(k) {
                Some(key) => f(key, p.clone()),
                None => bad = true,
            });
        }
        if bad {
            return Err(corrupt_journal("undecodable view key"));
        }
        Ok(())
    }
    fn scan_finished(
        &self,
        db: &DB,
        ranges: &[BlockRange],
        key_prefix: &[u8],
        from: Option<&[u8]>,
        f: &mut dyn FnMut(ViewKey, Partial),
    ) -> Result<()> {
        scan_view(
            db,
            self.reads,
            &self.finished(ranges),
            key_prefix,
            from,
            &mut *f,
        )
    }
    fn live_layers(&self, ranges: &[BlockRange]) -> Result<Vec<Arc<LiveLayer>>> {
        Ok((self.live_in(ranges)?)
            .flat_map(|l| l.layers.iter().cloned())
            .collect())
    }
    fn read_live(&self) -> Result<()> {
        self.live().map(drop)
    }
    fn journal(
        &self,
        db: &DB,
        p: Partition,
        after: i64,
        keep: &dyn Fn(&[u8]) -> bool,
        f: &mut dyn FnMut(JournalEntry),
    ) -> Result<()> {
        read_journal(db, self.reads, p, after, keep, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::ItemStats;

    #[test]
    fn a_prefix_ends_at_the_first_key_past_it() {
        assert_eq!(prefix_end(&[0, 0, 0, 3]), Some(vec![0, 0, 0, 4]));
        assert_eq!(prefix_end(&[1, 0xff, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(&[]), None);
    }

    fn next_offset_seen(reader: &SpeedReader) -> Option<Offset> {
        reader
            .with_view(|_, _, meta, _| Ok(meta.partitions.get(&0).map(|m| m.next_offset)))
            .expect("view")
    }

    #[test]
    fn a_finished_blocks_index_and_filter_go_through_the_block_cache_not_the_heap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_primary(&dir.path().join("state")).expect("open");
        let file = dir.path().join("block.sst");
        let opts = block_file_options();
        let mut w = rocksdb::SstFileWriter::create(&opts);
        w.open(&file).expect("open file");
        // 200,000 keys: a filter of about 244 KiB at 10 bits a key, and an index beside it.
        for i in 0..200_000u32 {
            let mut key = block_prefix(0, 0);
            key.extend_from_slice(format!("item-{i:08}").as_bytes());
            w.put(&key, [1u8; 24]).expect("put");
        }
        w.finish().expect("finish");
        let blocks = cf(&db, Cf::Blocks).expect("cf");
        db.ingest_external_file_cf(blocks, vec![&file])
            .expect("ingest");
        let prop = |name: &str| {
            db.property_int_value_cf(blocks, name)
                .expect("property")
                .expect("reported")
        };
        let mut key = block_prefix(0, 0);
        key.extend_from_slice(b"item-00000042");
        assert!(db.get_cf(blocks, &key).expect("get").is_some());
        let readers = prop("rocksdb.estimate-table-readers-mem");
        let cached = prop("rocksdb.block-cache-usage");
        assert!(
            readers < 64 << 10,
            "the table reader holds {readers} bytes in the heap"
        );
        assert!(
            cached > 200 << 10,
            "the block cache holds only {cached} bytes"
        );
        assert!(cached <= BLOCKS_CACHE_BYTES as u64);
        let m = rocks_memory(&db);
        assert!(m.block_cache >= cached && m.table_readers >= readers);
    }

    #[test]
    fn readers_see_every_write_of_the_meta_family() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(open_primary(dir.path()).expect("open"));
        let put = |offset: i64| {
            let meta = cf(&db, Cf::Meta).expect("cf");
            db.put_cf(meta, meta_key::next_offset(0), encode_i64(offset))
                .expect("put");
        };
        let shared = SpeedReader::shared(db.clone());
        assert_eq!(next_offset_seen(&shared), None);
        put(10);
        assert_eq!(next_offset_seen(&shared), Some(10));
        assert_eq!(next_offset_seen(&shared), Some(10));
        // A write of another family moves the sequence number too; the meta read again is
        // the same.
        let blocks = cf(&db, Cf::Blocks).expect("cf");
        db.put_cf(blocks, b"k", b"v").expect("put");
        assert_eq!(next_offset_seen(&shared), Some(10));
        put(20);
        assert_eq!(next_offset_seen(&shared), Some(20));

        let scratch = tempfile::tempdir().expect("tempdir");
        let follower = SpeedReader::follow(dir.path(), scratch.path()).expect("follow");
        assert_eq!(next_offset_seen(&follower), Some(20));
        put(30);
        assert_eq!(next_offset_seen(&follower), Some(20), "not caught up yet");
        follower.catch_up().expect("catch up");
        assert_eq!(next_offset_seen(&follower), Some(30));
        assert_eq!(next_offset_seen(&shared), Some(30));
    }

    /// A state of blocks of 100 offsets in the current layout, with `more` meta keys.
    fn state_of_blocks_of_100(dir: &Path, more: &[(Vec<u8>, i64)]) -> Arc<DB> {
        let db = Arc::new(open_primary(dir).expect("open"));
        let meta = cf(&db, Cf::Meta).expect("cf");
        let layout = [
            (meta_key::BLOCK_SIZE.to_vec(), 100),
            (meta_key::LAYOUT.to_vec(), LAYOUT as i64),
        ];
        for (k, v) in layout.iter().chain(more) {
            db.put_cf(meta, k, encode_i64(*v)).expect("put");
        }
        db
    }

    #[test]
    fn a_view_is_refused_while_a_finished_block_named_by_the_meta_is_not_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = state_of_blocks_of_100(
            dir.path(),
            &[
                (meta_key::next_offset(0), 200),
                (meta_key::written_block(0), 1),
            ],
        );
        let reader = SpeedReader::shared(db.clone());
        let err = reader.with_view(|_, _, _, _| Ok(())).expect_err("refused");
        assert!(err.to_string().contains("missing"), "{err}");
        let scratch = tempfile::tempdir().expect("tempdir");
        let follower = SpeedReader::follow(dir.path(), scratch.path()).expect("follow");
        assert!(follower.with_view(|_, _, _, _| Ok(())).is_err());
        // With the block's marker there, both read.
        db.put_cf(cf(&db, Cf::Blocks).expect("cf"), block_marker(0, 1), [])
            .expect("put");
        reader.with_view(|_, _, _, _| Ok(())).expect("view");
        follower.catch_up().expect("catch up");
        follower.with_view(|_, _, _, _| Ok(())).expect("view");
    }

    #[test]
    fn a_view_reads_its_live_blocks_only_when_a_read_needs_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = state_of_blocks_of_100(dir.path(), &[(meta_key::next_offset(0), 50)]);
        // The journal reaches offset 40 only, short of the next offset 50: the live block
        // cannot be read.
        let key = ViewKey::Item("i1".into());
        let views = |n| {
            Partial::Item(ItemStats {
                views: n,
                ..Default::default()
            })
        };
        let journal = cf(&db, Cf::Journal).expect("cf");
        let mut value = JournalValue::default();
        value.push(0, &key, &views(3));
        db.put_cf(journal, journal_key(0, 40), value.finish(0))
            .expect("put");
        let reader = SpeedReader::shared(db.clone());
        let ranges = [BlockRange {
            partition: 0,
            first: 0,
            last: 0,
        }];
        // An answer from the meta family alone reads no journal, so it is given.
        let next = reader
            .with_view(|_, _, meta, _| Ok(meta.partitions.get(&0).map(|m| m.next_offset)))
            .expect("a view of the meta family");
        assert_eq!(next, Some(50));
        assert!(reader.live.lock().expect("lock").is_empty());
        let err = reader
            .with_view(|db, reads, _, _| reads.partial(db, &ranges, &key))
            .expect_err("the live block is short");
        assert!(err.to_string().contains("journal"), "{err}");
        // With the journal whole, a point read folds it, and the reader holds the block.
        let mut value = JournalValue::default();
        value.push(0, &key, &views(4));
        db.put_cf(journal, journal_key(0, 50), value.finish(40))
            .expect("put");
        let got = reader
            .with_view(|db, reads, _, _| reads.partial(db, &ranges, &key))
            .expect("read");
        assert_eq!(
            got.as_ref().and_then(Partial::as_item).map(|s| s.views),
            Some(7)
        );
        assert_eq!(reader.live.lock().expect("lock").len(), 1);
    }

    #[test]
    fn reads_merge_blocks_of_a_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_primary(dir.path()).expect("open");
        let blocks = cf(&db, Cf::Blocks).expect("cf");
        let key = ViewKey::Item("i1".into());
        for (block, views) in [(1, 1), (4, 2), (7, 3), (12, 100)] {
            let p = Partial::Item(ItemStats {
                views,
                ..Default::default()
            });
            db.put_cf(blocks, block_key(0, block, &key), p.encode())
                .expect("put");
        }
        let ranges = [BlockRange {
            partition: 0,
            first: 0,
            last: 9,
        }];
        let got = read_partial(&db, &(), &ranges, &key).expect("read");
        assert_eq!(
            got.as_ref().and_then(Partial::as_item).map(|s| s.views),
            Some(6)
        );
        let mut seen = Vec::new();
        let items = [ViewKey::tag_of_items()];
        scan_view(&db, &(), &ranges, &items, None, |k, p| {
            seen.push((k, p.as_item().map_or(0, |s| s.views)))
        })
        .expect("scan");
        assert_eq!(
            seen,
            vec![(key.clone(), 1), (key.clone(), 2), (key.clone(), 3)]
        );
        // From a key on, within the prefix: "i1" is before "i2", so only "i2" onwards.
        let later = ViewKey::Item("i2".into());
        db.put_cf(
            blocks,
            block_key(0, 4, &later),
            Partial::Item(ItemStats::default()).encode(),
        )
        .expect("put");
        let mut after = Vec::new();
        scan_view(&db, &(), &ranges, &items, Some(&later.encode()), |k, _| {
            after.push(k)
        })
        .expect("scan");
        assert_eq!(after, vec![later]);
    }

    #[test]
    fn a_journal_value_written_in_place_decodes_to_the_deltas_pushed() {
        use crate::views::{Hll, Recent, Set};
        let deltas = vec![
            (
                3u64,
                ViewKey::Item("i1".into()),
                Partial::Item(ItemStats {
                    views: 2,
                    revenue_micros: -7,
                    category: Some("a-category-name-longer-than-inline".into()),
                    ..ItemStats::default()
                }),
            ),
            (
                4,
                ViewKey::ItemDayUsers {
                    day: 86_400_000,
                    item: "i2".into(),
                },
                Partial::Distinct(Hll::of("u1")),
            ),
            (
                4,
                ViewKey::UserItems {
                    basis: crate::views::Basis::View,
                    user: "u1".into(),
                },
                Partial::Recent(Recent(BTreeMap::from([("i9".into(), 5)]))),
            ),
            (
                5,
                ViewKey::ItemUsers {
                    basis: crate::views::Basis::Purchase,
                    item: "i3".into(),
                },
                Partial::Set(Set(["u2".into(), "u3".into()].into())),
            ),
        ];
        let mut value = JournalValue::default();
        for (block, key, partial) in &deltas {
            value.push(*block, key, partial);
        }
        let value = value.finish(-1);
        let raw = decode_raw(&journal_key(0, 99), &value).expect("decodes");
        assert_eq!((raw.start, raw.end), (-1, 99));
        let got: Vec<(u64, ViewKey, Partial)> = raw
            .deltas
            .iter()
            .map(|&(b, k, v)| {
                (
                    b,
                    ViewKey::decode(k).expect("key"),
                    Partial::decode(v).expect("partial"),
                )
            })
            .collect();
        assert_eq!(got, deltas);
        // The same bytes as the deltas encoded one by one.
        let encoded: Vec<JournalDelta> = deltas
            .iter()
            .map(|(b, k, p)| (*b, k.encode(), p.encode()))
            .collect();
        assert_eq!(encode_journal(-1, &encoded), value);
    }
}
