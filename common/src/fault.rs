//! Fault points: named steps of the writing layers at which a test makes the process die the way
//! kill -9 or a power cut would, at a known moment instead of a random one.
//!
//! `STRATA_FAULT=<name>` aborts the process the first time the step `<name>` is reached;
//! `STRATA_FAULT=<name>@<n>` the n-th time. Unset (as in any normal run), a point costs one
//! check of a value read once. The names are listed in [`POINTS`]; `e2e_faults` kills every one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Every fault point, in the order a stream passes them.
pub const POINTS: &[&str] = &[
    // The speed layer's dead letters: one queued for the dead-letter topic, not yet
    // acknowledged; then all of a flush's acknowledged, before its WriteBatch.
    "speed.dlq.sent",
    "speed.dlq.acknowledged",
    // The speed layer's flush: the blocks it finishes ingested as a file, then its WriteBatch
    // of journal entries, dedupe ids, counters and offsets.
    "speed.flush.ingested",
    "speed.flush.before_write",
    "speed.flush.after_write",
    // The speed layer's offsets committed to its consumer group (for lag tools only).
    "speed.group.committed",
    // The archiver's segment: written and fsynced under a temporary name, then renamed.
    "batch.segment.before_rename",
    "batch.segment.after_rename",
    // The archiver's offsets committed to its consumer group (for lag tools only).
    "batch.archive.committed",
    // The recompute: folding, then the version written, then CURRENT swapped.
    "batch.recompute.folded",
    "batch.publish.before_current",
    "batch.publish.after_current",
];

/// The fault points of a retention rollup (`e2e_retention` kills each): its files written and
/// fsynced, its directory renamed but `CURRENT` not yet replaced, `CURRENT` replaced, and the
/// deletion of the raw segments it replaced about to begin.
pub const RETENTION_POINTS: &[&str] = &[
    "batch.retention.written",
    "batch.retention.before_current",
    "batch.retention.committed",
    "batch.retention.purging",
];

struct Armed {
    name: String,
    at: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("STRATA_FAULT").ok()?;
            let (name, at) = match v.split_once('@') {
                Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
                None => (v, 1),
            };
            Some(Armed {
                name,
                at: at.max(1),
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// The step `name` is reached: aborts the process if `STRATA_FAULT` names it (and this is the
/// time it names).
pub fn point(name: &str) {
    if tripped(name) {
        eprintln!("fault point {name}: aborting (STRATA_FAULT)");
        std::process::abort();
    }
}

/// The step `name` is reached: true if `STRATA_FAULT` names it and this is the time it names.
/// For a condition that a test cannot bring about at will (`generate.stalled`: a producer that
/// gets no acknowledgement), which the caller then handles as if it had happened.
pub fn tripped(name: &str) -> bool {
    armed().is_some_and(|a| a.name == name && a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.at)
}
