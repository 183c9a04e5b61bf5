//! Master-dataset segments: immutable files of archived events, one offset range of one partition
//! each.
//!
//! ```text
//! <data>/master/p00003/00000000000000012000-00000000000000014875.parquet
//! ```
//!
//! The name holds the partition and the offset range `[start, end)` the segment covers (rejected
//! messages inside the range are simply absent). Each segment is a Parquet file, one row per
//! event with its `_offset` ([`crate::columnar`] has the schema), so DuckDB, Spark or pandas read
//! the dataset as it is (`read_parquet('<data>/master/*/*.parquet')`). Segments written as JSON
//! lines (`.jsonl`, the wire JSON plus `"_offset"`) by earlier versions are still read. A segment
//! is written to a temporary name, fsynced, then renamed into place: it either exists whole or
//! not at all.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_common::event::{validate, Event, Rules, Wire};
use strata_common::handoff::{Offset, Partition};

use crate::columnar;
use crate::{Error, Result};

/// One segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub partition: Partition,
    pub start: Offset,
    pub end: Offset,
    pub path: PathBuf,
}

/// One archived event.
#[derive(Serialize, Deserialize)]
struct Record {
    #[serde(rename = "_offset")]
    offset: Offset,
    #[serde(flatten)]
    wire: Wire,
}

fn partition_dir(root: &Path, p: Partition) -> PathBuf {
    root.join(format!("p{p:05}"))
}

/// Writes a segment atomically.
pub fn write(
    root: &Path,
    partition: Partition,
    start: Offset,
    end: Offset,
    events: &[(Offset, Event)],
) -> Result<Segment> {
    let dir = partition_dir(root, partition);
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = format!("{start:020}-{end:020}.parquet");
    let tmp = dir.join(format!(".tmp-{name}"));
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    columnar::write(&file, &tmp, events)?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    let path = dir.join(name);
    strata_common::fault::point("batch.segment.before_rename");
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    strata_common::fault::point("batch.segment.after_rename");
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(&dir, e))?;
    Ok(Segment {
        partition,
        start,
        end,
        path,
    })
}

fn parse_name(name: &str) -> Option<(Offset, Offset)> {
    let stem = name
        .strip_suffix(".parquet")
        .or_else(|| name.strip_suffix(".jsonl"))?;
    let (a, b) = stem.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Every segment, per partition in offset order (temporary files of a writer are skipped). Fails
/// if a partition's segments do not tile one contiguous range.
pub fn list(root: &Path) -> Result<BTreeMap<Partition, Vec<Segment>>> {
    let mut out: BTreeMap<Partition, Vec<Segment>> = BTreeMap::new();
    let rd = match fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(root, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(p) = name
            .strip_prefix('p')
            .and_then(|s| s.parse::<Partition>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        for f in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let f = f.map_err(|e| Error::io(&dir, e))?;
            let fname = f.file_name().to_string_lossy().to_string();
            if fname.starts_with(".tmp-") {
                continue;
            }
            if let Some((start, end)) = parse_name(&fname) {
                out.entry(p).or_default().push(Segment {
                    partition: p,
                    start,
                    end,
                    path: f.path(),
                });
            }
        }
    }
    for (p, segs) in &mut out {
        segs.sort_by_key(|s| s.start);
        for pair in segs.windows(2) {
            if pair[0].end != pair[1].start {
                return Err(Error::Dataset(format!(
                    "partition {p}: segment {} ends at {} but the next starts at {}",
                    pair[0].path.display(),
                    pair[0].end,
                    pair[1].start
                )));
            }
        }
    }
    Ok(out)
}

/// Removes the temporary files a killed writer left. Only the archiver calls it, before it writes:
/// a recompute listing segments concurrently must not touch a file being written.
pub fn remove_leftovers(root: &Path) -> Result<()> {
    let rd = match fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(root, e)),
    };
    for entry in rd {
        let dir = entry.map_err(|e| Error::io(root, e))?.path();
        if !dir.is_dir() {
            continue;
        }
        for f in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let f = f.map_err(|e| Error::io(&dir, e))?;
            if f.file_name().to_string_lossy().starts_with(".tmp-") {
                fs::remove_file(f.path()).map_err(|e| Error::io(f.path(), e))?;
            }
        }
    }
    Ok(())
}

/// The end of the archive in each partition: where the archiver resumes.
pub fn ends(root: &Path) -> Result<BTreeMap<Partition, Offset>> {
    Ok(list(root)?
        .into_iter()
        .filter_map(|(p, segs)| segs.last().map(|s| (p, s.end)))
        .collect())
}

/// Reads a segment's events with offsets below `below`, in offset order.
pub fn read(seg: &Segment, below: Offset, rules: &Rules) -> Result<Vec<(Offset, Event)>> {
    if seg.path.extension().is_some_and(|x| x == "parquet") {
        columnar::read(&seg.path, below, rules)
    } else {
        read_json_lines(seg, below, rules)
    }
}

/// Reads a segment written as JSON lines.
fn read_json_lines(seg: &Segment, below: Offset, rules: &Rules) -> Result<Vec<(Offset, Event)>> {
    let file = File::open(&seg.path).map_err(|e| Error::io(&seg.path, e))?;
    let mut out = Vec::new();
    for (n, line) in BufReader::with_capacity(1 << 20, file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(&seg.path, e))?;
        let rec: Record = serde_json::from_str(&line)
            .map_err(|e| Error::Dataset(format!("{} line {}: {e}", seg.path.display(), n + 1)))?;
        if rec.offset >= below {
            break;
        }
        let event = validate(rec.wire, None, rules)
            .map_err(|r| Error::Dataset(format!("{} line {}: {r}", seg.path.display(), n + 1)))?;
        out.push((rec.offset, event));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_common::event::Kind;

    fn ev(id: &str) -> Event {
        Event {
            id: id.into(),
            ts: 1_795_615_200_123,
            kind: Kind::Heartbeat {
                device: "d1".into(),
            },
        }
    }

    fn every_kind() -> Vec<(Offset, Event)> {
        let item = |cat: Option<&str>| strata_common::event::ItemRef {
            user: "u1".into(),
            item: "i\u{e9}1".into(),
            category: cat.map(Into::into),
        };
        let kinds = vec![
            Kind::View(item(Some("books"))),
            Kind::AddToCart(item(None)),
            Kind::Purchase {
                item: item(Some("c")),
                qty: 3,
                price_micros: 12_345_678,
            },
            Kind::Rating {
                item: item(None),
                rating: 5,
            },
            Kind::Heartbeat {
                device: "d1".into(),
            },
            Kind::Reading {
                device: "d2".into(),
                metric: "temp".into(),
                value: 0.1 + 0.2,
            },
        ];
        kinds
            .into_iter()
            .enumerate()
            .map(|(n, kind)| {
                (
                    n as Offset * 2,
                    Event {
                        id: format!("e{n}"),
                        ts: 1_795_615_200_123 + n as i64,
                        kind,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn parquet_segments_keep_every_field_and_stop_at_the_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let events = every_kind();
        let seg = write(dir.path(), 0, 0, 12, &events).expect("write");
        assert!(seg.path.to_string_lossy().ends_with(".parquet"));
        assert_eq!(read(&seg, 100, &Rules::default()).expect("read"), events);
        assert_eq!(
            read(&seg, 5, &Rules::default()).expect("read"),
            events[..3].to_vec()
        );
    }

    #[test]
    fn large_parquet_segments_read_back_across_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let events: Vec<(Offset, Event)> = (0..50_000)
            .map(|n| {
                let mut e = every_kind()[n % 6].1.clone();
                e.id = format!("event-{n:08}");
                (n as Offset, e)
            })
            .collect();
        let seg = write(dir.path(), 1, 0, 50_000, &events).expect("write");
        assert_eq!(read(&seg, 50_000, &Rules::default()).expect("read"), events);
    }

    #[test]
    fn json_lines_segments_are_still_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let events = every_kind();
        let pdir = partition_dir(dir.path(), 4);
        fs::create_dir_all(&pdir).expect("mkdir");
        let mut text = String::new();
        for (offset, e) in &events {
            let rec = Record {
                offset: *offset,
                wire: e.to_wire(),
            };
            text.push_str(&serde_json::to_string(&rec).expect("json"));
            text.push('\n');
        }
        fs::write(pdir.join(format!("{:020}-{:020}.jsonl", 0, 12)), text).expect("write");
        write(dir.path(), 4, 12, 13, &[]).expect("write");
        let segs = list(dir.path()).expect("list");
        assert_eq!(segs[&4].len(), 2, "both formats tile one range");
        assert_eq!(
            read(&segs[&4][0], 100, &Rules::default()).expect("read"),
            events
        );
        assert!(read(&segs[&4][1], 100, &Rules::default())
            .expect("read")
            .is_empty());
    }

    #[test]
    fn a_file_that_is_not_parquet_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pdir = partition_dir(dir.path(), 0);
        fs::create_dir_all(&pdir).expect("mkdir");
        fs::write(
            pdir.join(format!("{:020}-{:020}.parquet", 0, 5)),
            b"PAR1 not really",
        )
        .expect("write");
        let segs = list(dir.path()).expect("list");
        let err = read(&segs[&0][0], 10, &Rules::default()).expect_err("garbage");
        assert!(err.to_string().contains(".parquet"), "{err}");
    }

    #[test]
    fn segments_round_trip_and_must_be_contiguous() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), 2, 0, 10, &[(3, ev("a")), (7, ev("b"))]).expect("write");
        write(dir.path(), 2, 10, 12, &[(11, ev("c"))]).expect("write");
        let segs = list(dir.path()).expect("list");
        assert_eq!(segs[&2].len(), 2);
        assert_eq!(ends(dir.path()).expect("ends"), BTreeMap::from([(2, 12)]));
        let got = read(&segs[&2][0], 5, &Rules::default()).expect("read");
        assert_eq!(got, vec![(3, ev("a"))]);
        write(dir.path(), 2, 20, 25, &[]).expect("write");
        assert!(list(dir.path()).is_err(), "a gap must be reported");
    }
}
