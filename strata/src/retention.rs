//! `strata retention`: one rollup, then a recompute that publishes it and the deletion of the raw
//! segments it replaced (`batch-layer/src/retention.rs`), or with `--dry-run` only the report.

use anyhow::{anyhow, Context};
use strata_batch::recompute::recompute;
use strata_batch::retention::{self, Report, Size};
use strata_common::config::Config;
use strata_common::time::{now_millis, parse_rfc3339};

fn mib(s: &Size) -> String {
    format!("{} files, {:.2} MiB", s.files, s.bytes as f64 / 1048576.0)
}

fn print(report: &Report) {
    let verb = if report.dry_run { "would" } else { "did" };
    println!(
        "retention: thresholds (events before these are rolled up): {:?}",
        report.thresholds
    );
    for (p, part) in &report.partitions {
        println!(
            "retention: partition {p}: offsets below {}: {} events kept raw, rolled up {:?} into records {:?}, {} copies skipped",
            part.upto, part.kept, part.rolled, part.records, part.duplicates
        );
    }
    if let Some(why) = &report.nothing_because {
        println!("retention: nothing to roll up: {why}");
        return;
    }
    println!(
        "retention: {verb} replace raw segments: {}",
        mib(&report.replaced_raw)
    );
    println!(
        "retention: {verb} replace the previous generation: {}",
        mib(&report.replaced_generation)
    );
    println!(
        "retention: {verb} write events kept raw: {}",
        mib(&report.written_kept)
    );
    for (t, s) in &report.written_rollups {
        println!("retention: {verb} write {t} rollups: {}", mib(s));
    }
    println!("retention: {:.2} s", report.seconds);
}

pub fn run(cfg: &Config, dry_run: bool, as_of: Option<&str>, json: bool) -> anyhow::Result<()> {
    let now = match as_of {
        Some(t) => {
            parse_rfc3339(t).ok_or_else(|| anyhow!("--as-of {t:?} is not an RFC 3339 time"))?
        }
        None => now_millis(),
    };
    let _lock = if dry_run {
        None
    } else {
        Some(retention::lock(cfg).context("a batch layer may run on this data directory (it rolls up every retention.every-secs itself)")?)
    };
    let report = retention::roll_up(cfg, now, dry_run)?;
    let mut published = None;
    let mut purged = None;
    if report.generation.is_some() {
        let m = recompute(cfg).context("the rollup is written, but the recompute that publishes it failed; the raw segments stay until a version is published")?;
        published = Some(m.version);
        purged = Some(retention::purge(cfg)?);
    }
    if json {
        let out = serde_json::json!({
            "report": report,
            "published_version": published,
            "purged": purged,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print(&report);
        if let (Some(v), Some(p)) = (published, purged) {
            println!("retention: published batch version {v}; deleted raw segments: {}; deleted older generations: {}", mib(&p.raw), mib(&p.generations));
        }
    }
    Ok(())
}
