//! Master-dataset segments: immutable files of archived events, one offset range of one partition
//! each.
//!
//! ```text
//! <data>/master/p00003/00000000000000012000-00000000000000014875.jsonl
//! ```
//!
//! The name holds the partition and the offset range `[start, end)` the segment covers (rejected
//! messages inside the range are simply absent). Each line is the event's wire JSON plus
//! `"_offset"`, so DuckDB or Spark read the dataset as it is. A segment is written to a temporary
//! name, fsynced, then renamed into place: it either exists whole or not at all.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_common::event::{validate, Event, Rules, Wire};
use strata_common::handoff::{Offset, Partition};

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
    let name = format!("{start:020}-{end:020}.jsonl");
    let tmp = dir.join(format!(".tmp-{name}"));
    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    for (offset, event) in events {
        let rec = Record {
            offset: *offset,
            wire: event.to_wire(),
        };
        serde_json::to_writer(&mut w, &rec)
            .map_err(|e| Error::io(&tmp, std::io::Error::other(e)))?;
        w.write_all(b"\n").map_err(|e| Error::io(&tmp, e))?;
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
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
    let stem = name.strip_suffix(".jsonl")?;
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
