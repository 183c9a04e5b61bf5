//! `count-keys`: how many keys a stopped speed layer's state holds, per column family.

use std::path::Path;

use anyhow::Result;
use rocksdb::IteratorMode;
use strata_common::speed_store::{self, Cf};

use crate::Out;

pub fn run(speed_dir: &Path, out: &mut Out) -> Result<()> {
    let db = speed_store::open_primary(speed_dir)?;
    for (cf, name) in [(Cf::Blocks, "block_keys"), (Cf::Dedupe, "dedupe_ids")] {
        let handle = speed_store::cf(&db, cf)?;
        let mut n = 0u64;
        for item in db.iterator_cf(handle, IteratorMode::Start) {
            item?;
            n += 1;
        }
        out.num(name, n as f64);
    }
    Ok(())
}
