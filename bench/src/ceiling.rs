//! `strata-bench speed-ceiling`: the speed layer with the broker taken out. The same workers as
//! `strata speed` (decode, validation, dedupe, folds, the RocksDB write with offsets) are fed
//! records in Kafka message form (partition, offset, timestamp, key, payload) read from a file
//! written once by this command from the seeded generator, keyed over the partitions as a
//! producer would spread them. Dead letters are counted instead of produced.
//!
//! The configuration is the defaults with `STRATA__…` environment variables over them, as for
//! `strata speed`. The file is read into memory before the clock starts; the clock stops when every worker has
//! written its last state. Prints `rate` (events/s), `secs`, `workers`, `events`.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use strata_common::config::Config;
use strata_common::generate::{GenConfig, Generator};
use strata_common::progress::Progress;
use strata_common::time::now_millis;
use strata_speed::state::SpeedState;
use strata_speed::worker::{Letters, Pipeline, Record};
use strata_speed::SpeedLayer;
use tokio_util::sync::CancellationToken;

use crate::Out;

/// Dead letters, counted.
#[derive(Default)]
struct Counted(u64);

impl Letters for Counted {
    fn send(
        &mut self,
        _: Option<&[u8]>,
        _: &[u8],
        _: &str,
        _: &str,
        _: &str,
    ) -> strata_common::Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn flush(&mut self, _: &dyn Fn() -> bool) -> strata_common::Result<bool> {
        Ok(true)
    }
}

/// The partition a keyed record goes to (FNV-1a of the key; a producer's partitioner spreads
/// keys as evenly).
fn partition_of(key: &[u8], partitions: i32) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in key {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % partitions.max(1) as u32) as i32
}

/// Writes `count` generated messages (seed `seed`, over `partitions`) to `path`.
fn write_records(path: &Path, seed: u64, count: u64, partitions: i32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut w = BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?,
    );
    let mut next = vec![0i64; partitions.max(1) as usize];
    let mut progress = Progress::new("speed-ceiling: write records", Some(count));
    let ts = now_millis();
    for g in Generator::new(GenConfig::new(seed, count, ts - 2 * 3_600_000)) {
        let p = partition_of(g.key.as_bytes(), partitions);
        let offset = next[p as usize];
        next[p as usize] += 1;
        w.write_all(&p.to_be_bytes())?;
        w.write_all(&offset.to_be_bytes())?;
        w.write_all(&ts.to_be_bytes())?;
        w.write_all(&(g.key.len() as u32).to_be_bytes())?;
        w.write_all(g.key.as_bytes())?;
        w.write_all(&(g.payload.len() as u32).to_be_bytes())?;
        w.write_all(&g.payload)?;
        progress.inc(1);
    }
    w.flush()?;
    drop(w);
    progress.finish();
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

fn read_records(path: &Path) -> Result<Vec<Record>> {
    let mut r = BufReader::new(
        std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?,
    );
    let mut out = Vec::new();
    let mut head = [0u8; 4];
    loop {
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let partition = i32::from_be_bytes(head);
        let mut b8 = [0u8; 8];
        r.read_exact(&mut b8)?;
        let offset = i64::from_be_bytes(b8);
        r.read_exact(&mut b8)?;
        let timestamp = Some(i64::from_be_bytes(b8));
        let bytes = |r: &mut BufReader<std::fs::File>| -> Result<Vec<u8>> {
            let mut n = [0u8; 4];
            r.read_exact(&mut n)?;
            let mut v = vec![0u8; u32::from_be_bytes(n) as usize];
            r.read_exact(&mut v)?;
            Ok(v)
        };
        let key = Some(bytes(&mut r)?);
        let payload = bytes(&mut r)?;
        out.push(Record {
            partition,
            offset,
            timestamp,
            key,
            payload,
        });
    }
    Ok(out)
}

pub struct Args<'a> {
    pub records: &'a Path,
    pub events: u64,
    pub seed: u64,
    pub partitions: i32,
    pub workers: usize,
    pub data_dir: &'a Path,
}

pub fn run(a: Args<'_>, out: &mut Out) -> Result<()> {
    if !a.records.exists() {
        write_records(a.records, a.seed, a.events, a.partitions)?;
    }
    let records = read_records(a.records)?;
    if records.len() as u64 != a.events {
        bail!(
            "{} holds {} records, not {}: remove it to write it anew",
            a.records.display(),
            records.len(),
            a.events
        );
    }
    if a.data_dir.exists() {
        bail!(
            "{} exists: the ceiling starts from an empty state",
            a.data_dir.display()
        );
    }
    // The defaults, with `STRATA__…` variables over them as for `strata speed`.
    let mut cfg = Config::load(None, std::env::vars_os())?;
    cfg.data_dir = a.data_dir.to_path_buf();
    let state = SpeedState::open(&cfg.speed_dir(), cfg.handoff.block_size)?;
    let workers = if a.workers == 0 {
        cfg.speed.workers()
    } else {
        a.workers
    };
    let settings = SpeedLayer::settings(&cfg)?;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut pipeline = Pipeline::start(state, workers, || Ok(Counted::default()), settings, stop)?;
    let mut progress = Progress::new("speed-ceiling: fold", Some(records.len() as u64));
    for r in records {
        pipeline.push(r)?;
        progress.inc(1);
    }
    let shared = pipeline.shared();
    pipeline.finish()?;
    let secs = started.elapsed().as_secs_f64();
    progress.finish();
    let parts = shared.parts();
    let counted: u64 = parts.values().map(|m| m.accepted + m.rejected).sum();
    if counted != a.events {
        bail!("the workers counted {counted} messages of {}", a.events);
    }
    out.num("rate", a.events as f64 / secs);
    out.num("secs", secs);
    out.num("workers", workers as f64);
    out.num("events", a.events as f64);
    Ok(())
}
