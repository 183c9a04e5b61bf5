//! `count-keys`: how many keys a stopped speed layer's state holds, per column family.

use std::path::Path;

use anyhow::Result;
use rocksdb::IteratorMode;
use strata_common::speed_store::{self, Cf};

use crate::Out;

pub fn run(speed_dir: &Path, out: &mut Out) -> Result<()> {
    let db = speed_store::open_primary(speed_dir)?;
    // Finished blocks' keys in `blocks`, the live blocks' in the journal: one view key of one
    // block each.
    let mut keys = 0u64;
    speed_store::for_each_partial(&db, &mut |_, _, _, _| keys += 1)?;
    out.num("block_keys", keys as f64);
    let handle = speed_store::cf(&db, Cf::Dedupe)?;
    let mut ids = 0u64;
    for item in db.iterator_cf(handle, IteratorMode::Start) {
        item?;
        ids += 1;
    }
    out.num("dedupe_ids", ids as f64);
    Ok(())
}
