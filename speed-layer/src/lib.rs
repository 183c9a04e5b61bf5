//! Strata's speed layer: consumes the events topic in real time and keeps incremental views in
//! RocksDB.
//!
//! Each message is decoded and validated ([`strata_common::event`]); a rejected one goes to the
//! dead-letter topic with its reason. A valid one passes the dedupe rule, then its contributions
//! to every view are folded into the partial of the offset block it belongs to ([`pending`]).
//! Every flush ([`state`]) writes the folded deltas (through the views' merge operator), the new
//! dedupe memory, and each partition's next offset, watermark and counters in one RocksDB
//! `WriteBatch`, so a crash at any moment loses nothing and counts nothing twice: on restart the
//! consumer resumes exactly at the stored offsets ([`run`]). Blocks wholly covered by the newest
//! published batch version are dropped.
//!
//! The work runs on `speed.workers` threads ([`worker`]), each owning the partitions
//! `p % workers`: the consumer thread only polls and hands messages over.

pub mod error;
pub mod filter;
pub mod pending;
pub mod run;
pub mod state;
pub mod worker;

pub use error::{Error, Result};
pub use run::SpeedLayer;
