//! Strata's batch layer: the immutable master dataset and recomputation of every view from it.
//!
//! The [`archive`]r consumes the events topic and appends every valid event to the master
//! dataset as immutable [`segment`]s, each holding one contiguous offset range of one partition;
//! its position is the end of the last segment, so a crash loses nothing and archives nothing
//! twice. A [`recompute`] takes a cutoff per partition (the last handoff-block boundary the
//! archive has passed), replays every segment below it through the dedupe rule and the view
//! definitions in parallel with rayon, and publishes the result as a new batch version in one
//! atomic step. [`retention`] rolls up device events past their age and deletes the raw segments
//! they replaced once a version computed from the rollup is published. [`run`] schedules them.
//! With `batch.engine` set to DataFusion or a Ballista cluster, the recompute runs in the
//! `strata-engine` process instead ([`engine`]), over the same inputs and publishing the same
//! version.

pub mod archive;
pub mod columnar;
pub mod engine;
pub mod error;
pub mod recompute;
pub mod retention;
pub mod run;
pub mod segment;

pub use error::{Error, Result};
pub use run::{BatchLayer, RunMode};
