//! Running past one machine (decision record 0013): speed instances in one consumer group, each
//! with a state of its own, and serving layers that keep a copy of the speed tail (a **mirror**,
//! in the layout of [`speed_store`]) pulled from whichever instance holds each partition.
//!
//! - Each instance publishes a [`Member`] record (its id and URL) to `<topic>.members`.
//! - A serving layer asks each member for what it holds past the mirror's position
//!   ([`sync_response`]): per partition it holds, the finished blocks the mirror lacks, the live
//!   block's journal entries, and the partition's bookkeeping, all from one snapshot.
//! - The serving layer writes one partition's answer in one `WriteBatch` ([`write_part`]), so its
//!   readers see a partition either before or after, exactly as they see the speed layer's own
//!   flushes. Block contents are a function of the partition's events (the dedupe rule runs per
//!   partition, in offset order), so blocks pulled from two instances that held the partition one
//!   after the other fit together.
//! - Where each partition came from, and what an answer lacks, is written in the mirror's meta
//!   ([`Sources`]), so every answer reads it in the same view as the partials.

use std::collections::{BTreeMap, BTreeSet};

use rocksdb::{WriteBatch, DB};
use serde::{Deserialize, Serialize};

use crate::handoff::{block_of, Offset, Partition};
use crate::speed_store::{
    self, block_prefix, cf, decode_i64, encode_i64, journal_key, meta_key, Cf,
};
use crate::{Error, Result};

/// The topic speed instances publish their [`Member`] records to (compacted, one partition).
pub fn members_topic(topic: &str) -> String {
    format!("{topic}.members")
}

/// One speed instance as it announces itself in the members topic (keyed by `id`; a record
/// without a value removes it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// Base URL of its speed endpoint, e.g. `http://10.0.0.5:7070`.
    pub url: String,
    /// When it published this record (epoch ms).
    pub at: i64,
}

/// What a mirror holds of one partition, sent with a sync request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Have {
    /// The mirror's next offset of the partition (0: nothing).
    pub next: Offset,
    /// The loaded batch version's cutoff: blocks below it are not needed.
    pub cutoff: Offset,
}

/// Encodes what a mirror holds as a query value: `p:next:cutoff,...`.
pub fn encode_have(have: &BTreeMap<Partition, Have>) -> String {
    have.iter()
        .map(|(p, h)| format!("{p}:{}:{}", h.next, h.cutoff))
        .collect::<Vec<_>>()
        .join(",")
}

/// Decodes [`encode_have`]'s form; `Err` names the part that is not `p:next:cutoff`.
pub fn decode_have(s: &str) -> std::result::Result<BTreeMap<Partition, Have>, String> {
    let mut out = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let mut it = part.split(':');
        let mut num = || it.next().and_then(|x| x.parse::<i64>().ok());
        match (num(), num(), num()) {
            (Some(p), Some(next), Some(cutoff))
                if (0..=i64::from(i32::MAX)).contains(&p) && next >= 0 && cutoff >= 0 =>
            {
                out.insert(p as Partition, Have { next, cutoff });
            }
            _ => return Err(format!("{part:?} is not partition:next:cutoff")),
        }
    }
    Ok(out)
}

/// The instance's part of a sync answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceHeader {
    pub id: String,
    /// `None` while the instance's state is new.
    pub block_size: Option<u64>,
    pub flushed_at: Option<i64>,
    /// The partitions the group has assigned to it now.
    pub held: Vec<Partition>,
    /// Its next offset of every partition it holds.
    pub next: BTreeMap<Partition, Offset>,
}

/// One partition's part of a sync answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartHeader {
    pub next: Offset,
    /// The first block the mirror is to keep: the instance's first live block, or the block of
    /// the mirror's batch cutoff when that is later.
    pub first_live_block: u64,
    /// The journal entries replace the mirror's (a new live block, or a chain that does not
    /// continue at the mirror's offset); otherwise they follow them.
    pub reset: bool,
}

/// One partition's part of a sync answer, as decoded: what the mirror writes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PartSync<'a> {
    pub partition: Partition,
    pub header: PartHeader,
    pub meta: Vec<(&'a [u8], &'a [u8])>,
    pub blocks: Vec<(&'a [u8], &'a [u8])>,
    pub journal: Vec<(&'a [u8], &'a [u8])>,
}

/// A whole sync answer, decoded.
#[derive(Debug)]
pub struct SyncAnswer<'a> {
    pub instance: InstanceHeader,
    pub parts: Vec<PartSync<'a>>,
}

const T_INSTANCE: u8 = b'I';
const T_PART: u8 = b'H';
const T_META: u8 = b'M';
const T_BLOCK: u8 = b'B';
const T_JOURNAL: u8 = b'J';

fn frame(out: &mut Vec<u8>, tag: u8, p: Partition, k: &[u8], v: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(p as u32).to_be_bytes());
    out.extend_from_slice(&(k.len() as u32).to_be_bytes());
    out.extend_from_slice(k);
    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
    out.extend_from_slice(v);
}

fn json_frame(out: &mut Vec<u8>, tag: u8, p: Partition, v: &impl Serialize) -> Result<()> {
    let bytes =
        serde_json::to_vec(v).map_err(|e| Error::Other(format!("encode a sync header: {e}")))?;
    frame(out, tag, p, &[], &bytes);
    Ok(())
}

/// The meta keys of one partition that travel with it (its first live block is the header's).
fn part_meta_keys(p: Partition) -> [Vec<u8>; 8] {
    [
        meta_key::next_offset(p),
        meta_key::watermark(p),
        meta_key::written_block(p),
        meta_key::accepted(p),
        meta_key::rejected(p),
        meta_key::duplicates(p),
        meta_key::stall(p),
        meta_key::skipped(p),
    ]
}

/// A key and value as RocksDB hands them out.
type RawKv = (Box<[u8]>, Box<[u8]>);

/// What a speed instance answers a mirror holding `have`: for each partition in `held`, what
/// the mirror lacks, read from one snapshot of the instance's state `db`.
pub fn sync_response(
    db: &DB,
    id: &str,
    held: &[Partition],
    have: &BTreeMap<Partition, Have>,
) -> Result<Vec<u8>> {
    let snap = db.snapshot();
    let meta = speed_store::read_meta(db, &snap)?;
    let mut out = Vec::new();
    let next = held
        .iter()
        .map(|&p| (p, meta.partitions.get(&p).map_or(0, |m| m.next_offset)))
        .collect();
    json_frame(
        &mut out,
        T_INSTANCE,
        0,
        &InstanceHeader {
            id: id.to_string(),
            block_size: meta.block_size,
            flushed_at: meta.flushed_at,
            held: held.to_vec(),
            next,
        },
    )?;
    let Some(bs) = meta
        .block_size
        .filter(|_| meta.layout == Some(speed_store::LAYOUT))
    else {
        return Ok(out);
    };
    let (blocks_cf, journal_cf) = (cf(db, Cf::Blocks)?, cf(db, Cf::Journal)?);
    let read = |e: rocksdb::Error| Error::rocks("read the speed state for a mirror", e);
    for &p in held {
        let Some(m) = meta.partitions.get(&p) else {
            continue;
        };
        let h = have.get(&p).copied().unwrap_or_default();
        let r = m.next_offset;
        if r <= h.next {
            continue;
        }
        let fl = m.first_live_block.max(block_of(h.cutoff, bs));
        // The journal: a live block's entries, following the mirror's when they chain from
        // its offset inside the same block, else all of them.
        let live = block_of(r, bs);
        let first = i64::try_from(live.saturating_mul(bs)).unwrap_or(i64::MAX);
        let mut journal: Vec<RawKv> = Vec::new();
        let mut reset = true;
        if r % bs as i64 != 0 && live >= fl {
            let after = if block_of(h.next, bs) == live && h.next > first {
                h.next
            } else {
                first
            };
            let scan = |after: i64| -> Result<Vec<RawKv>> {
                let start = journal_key(p, after.saturating_add(1));
                let end = journal_key(p, r.saturating_add(1));
                let mut opts = rocksdb::ReadOptions::default();
                opts.set_snapshot(&snap);
                opts.set_iterate_upper_bound(end.to_vec());
                let it = db.iterator_cf_opt(
                    journal_cf,
                    opts,
                    rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
                );
                it.map(|i| i.map_err(read)).collect()
            };
            journal = scan(after)?;
            if after > first {
                let starts_here = journal
                    .first()
                    .and_then(|(_, v)| v.get(..8).and_then(decode_i64))
                    == Some(after);
                if starts_here {
                    reset = false;
                } else {
                    journal = scan(first)?;
                }
            }
        }
        json_frame(
            &mut out,
            T_PART,
            p,
            &PartHeader {
                next: r,
                first_live_block: fl,
                reset,
            },
        )?;
        for k in part_meta_keys(p) {
            if let Some(v) = snap.get_cf(cf(db, Cf::Meta)?, &k).map_err(read)? {
                frame(&mut out, T_META, p, &k, &v);
            }
        }
        // Finished blocks the mirror lacks: from its live block (or the first kept) up to the
        // instance's live block.
        let from = block_of(h.next, bs).max(fl);
        if from < live {
            let mut opts = rocksdb::ReadOptions::default();
            opts.set_snapshot(&snap);
            opts.set_iterate_upper_bound(block_prefix(p, live));
            let start = block_prefix(p, from);
            for item in db.iterator_cf_opt(
                blocks_cf,
                opts,
                rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
            ) {
                let (k, v) = item.map_err(read)?;
                frame(&mut out, T_BLOCK, p, &k, &v);
            }
        }
        for (k, v) in &journal {
            frame(&mut out, T_JOURNAL, p, k, v);
        }
    }
    Ok(out)
}

/// Decodes a sync answer; `Err` says where it is damaged.
pub fn decode_sync(body: &[u8]) -> Result<SyncAnswer<'_>> {
    let bad = |what: &str| Error::corrupt("speed sync answer", what.to_string());
    let mut rest = body;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = (rest.get(..n)?, rest.get(n..)?);
        rest = b;
        Some(a)
    };
    let mut instance = None;
    let mut parts: Vec<PartSync<'_>> = Vec::new();
    while let Some(tag) = take(1) {
        let mut field = |n: usize| take(n).ok_or_else(|| bad("cut short"));
        let p = u32::from_be_bytes(field(4)?.try_into().map_err(|_| bad("partition"))?);
        let p = Partition::try_from(p).map_err(|_| bad("partition out of range"))?;
        let klen = u32::from_be_bytes(field(4)?.try_into().map_err(|_| bad("length"))?) as usize;
        let k = field(klen)?;
        let vlen = u32::from_be_bytes(field(4)?.try_into().map_err(|_| bad("length"))?) as usize;
        let v = field(vlen)?;
        match tag[0] {
            T_INSTANCE => {
                instance = Some(
                    serde_json::from_slice(v).map_err(|e| bad(&format!("instance header: {e}")))?,
                )
            }
            T_PART => parts.push(PartSync {
                partition: p,
                header: serde_json::from_slice(v)
                    .map_err(|e| bad(&format!("partition header: {e}")))?,
                ..PartSync::default()
            }),
            t => {
                let part = parts
                    .last_mut()
                    .filter(|s| s.partition == p)
                    .ok_or_else(|| bad("a record outside its partition"))?;
                match t {
                    T_META => part.meta.push((k, v)),
                    T_BLOCK => part.blocks.push((k, v)),
                    T_JOURNAL => part.journal.push((k, v)),
                    _ => return Err(bad("unknown record")),
                }
            }
        }
    }
    Ok(SyncAnswer {
        instance: instance.ok_or_else(|| bad("no instance header"))?,
        parts,
    })
}

/// Writes one partition of a sync answer into the mirror `db` in one `WriteBatch`: its blocks
/// and journal entries, its bookkeeping, and (when it moved) its first live block, dropping the
/// blocks below. `kept_from` is the mirror's first live block of the partition before.
pub fn write_part(db: &DB, block_size: u64, part: &PartSync<'_>, kept_from: u64) -> Result<()> {
    let p = part.partition;
    let (meta, blocks, journal) = (cf(db, Cf::Meta)?, cf(db, Cf::Blocks)?, cf(db, Cf::Journal)?);
    let mut wb = WriteBatch::default();
    wb.put_cf(meta, meta_key::BLOCK_SIZE, encode_i64(block_size as i64));
    wb.put_cf(
        meta,
        meta_key::LAYOUT,
        encode_i64(speed_store::LAYOUT as i64),
    );
    if part.header.reset {
        wb.delete_range_cf(journal, journal_key(p, 0), journal_key(p, i64::MAX));
    }
    for (k, v) in &part.journal {
        wb.put_cf(journal, k, v);
    }
    for (k, v) in &part.blocks {
        wb.put_cf(blocks, k, v);
    }
    let fl = part.header.first_live_block;
    if fl > kept_from {
        wb.delete_range_cf(blocks, block_prefix(p, 0), block_prefix(p, fl));
    }
    wb.delete_cf(meta, meta_key::stall(p));
    wb.delete_cf(meta, meta_key::skipped(p));
    for (k, v) in &part.meta {
        if meta_key::parse(k).map(|(_, q)| q) != Some(p) {
            return Err(Error::corrupt(
                "speed sync answer",
                "meta of another partition",
            ));
        }
        wb.put_cf(meta, k, v);
    }
    wb.put_cf(meta, meta_key::first_live_block(p), encode_i64(fl as i64));
    db.write(wb)
        .map_err(|e| Error::rocks("write the speed mirror", e))
}

/// How the speed tail of one partition stands in a mirror.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// Pulled from the instance that holds it, up to that instance's offset.
    Current,
    /// The instance that holds it now is behind the mirror (rebuilding after the partition
    /// moved to it): events past the mirror's offset are not in answers until it catches up.
    Rebuilding,
    /// The instance that held it last does not answer, and no other holds it.
    Unreachable,
    /// No instance holds it.
    Unassigned,
}

/// Where one partition's speed tail comes from, as answers report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub state: SourceState,
    /// The instance it was last pulled from, or that holds it now.
    pub instance: Option<String>,
    /// That instance's own offset when it was last asked (while rebuilding: how far it is).
    pub instance_offset: Option<Offset>,
    /// Since when it has not been current (RFC 3339).
    pub since: Option<String>,
}

/// Every partition's [`Source`], written in the mirror's meta.
pub type Sources = BTreeMap<Partition, Source>;

/// Writes `sources` into the mirror's meta (moving its sequence, so kept answers are dropped).
pub fn write_sources(db: &DB, sources: &Sources) -> Result<()> {
    let v =
        serde_json::to_vec(sources).map_err(|e| Error::Other(format!("encode sources: {e}")))?;
    db.put_cf(cf(db, Cf::Meta)?, meta_key::SOURCES, v)
        .map_err(|e| Error::rocks("write the speed mirror", e))
}

/// What `as_of.cluster` says in a serving layer that mirrors a speed cluster.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterAsOf {
    /// Some partition's speed tail is not current: see `lacking`.
    pub partial: bool,
    /// The partitions whose newest events may be missing from the answer (their source is
    /// rebuilding, unreachable or unassigned); each is still exact up to its `coverage` offset.
    pub lacking: Vec<Partition>,
    pub partitions: Sources,
}

impl ClusterAsOf {
    /// From the sources the mirror holds (`None` before the first pull: every partition of
    /// `known` lacks).
    pub fn new(sources: Option<&[u8]>, known: impl Iterator<Item = Partition>) -> Self {
        let partitions: Sources = sources
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default();
        let mut lacking: BTreeSet<Partition> = partitions
            .iter()
            .filter(|(_, s)| s.state != SourceState::Current)
            .map(|(&p, _)| p)
            .collect();
        if sources.is_none() {
            lacking.extend(known);
        }
        ClusterAsOf {
            partial: !lacking.is_empty() || sources.is_none(),
            lacking: lacking.into_iter().collect(),
            partitions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn have_round_trips_and_names_a_bad_part() {
        let have = BTreeMap::from([
            (
                0,
                Have {
                    next: 10,
                    cutoff: 0,
                },
            ),
            (3, Have { next: 7, cutoff: 5 }),
        ]);
        assert_eq!(decode_have(&encode_have(&have)), Ok(have));
        assert_eq!(decode_have(""), Ok(BTreeMap::new()));
        let e = decode_have("0:1:2,x:1").expect_err("bad");
        assert!(e.contains("\"x:1\""), "{e}");
        assert!(decode_have("-1:0:0").is_err());
    }

    #[test]
    fn a_cut_answer_is_refused() {
        let mut out = Vec::new();
        json_frame(
            &mut out,
            T_INSTANCE,
            0,
            &InstanceHeader {
                id: "a".into(),
                block_size: Some(10),
                flushed_at: None,
                held: vec![0],
                next: BTreeMap::new(),
            },
        )
        .expect("encode");
        assert!(decode_sync(&out).is_ok());
        assert!(decode_sync(&out[..out.len() - 1]).is_err());
        frame(&mut out, T_BLOCK, 0, b"k", b"v");
        assert!(decode_sync(&out).is_err(), "a block before its partition");
    }
}
