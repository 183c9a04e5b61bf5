//! Times recomputes over a data directory whose master dataset is already archived, with no
//! broker: `cargo run --release -p strata-batch --example recompute_only -- DATA_DIR [RUNS]`.
//!
//! Like `strata batch --once --block-size 1` without the archiving step; each run publishes a
//! version (the last 100 are kept, so their `views.blocks` can be compared byte for byte).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: recompute_only DATA_DIR [RUNS]")?);
    let runs: usize = args.next().map_or(Ok(1), |r| r.parse())?;
    let mut cfg = strata_common::config::Config {
        data_dir: dir,
        ..Default::default()
    };
    cfg.handoff.block_size = 1;
    cfg.batch.keep_versions = 100;
    for _ in 0..runs {
        let t = std::time::Instant::now();
        let m = strata_batch::recompute::recompute(&cfg)?;
        println!(
            "version={} events={} keys={} duration_ms={} total_ms={}",
            m.version,
            m.events,
            m.keys,
            m.duration_ms,
            t.elapsed().as_millis()
        );
    }
    Ok(())
}
