//! Strata's batch recompute on Apache DataFusion, in this process or on a Ballista cluster.
//!
//! The recompute is one DataFusion plan over the Parquet master dataset, with Strata's view
//! definitions as two aggregate functions ([`functions`]): `strata_fold` folds one partition's
//! events, in offset order, through the dedupe rule into every view (the same
//! [`strata_batch::recompute::PartitionFold`] the local engine runs) and yields its
//! (key, partial) records; `strata_merge` is the views' monoid, which merges the records of one
//! key from every partition. [`plan`] builds the plan: one scan and fold per partition, their
//! union, and the merge grouped by key. DataFusion runs it on this host's cores; Ballista runs
//! each partition's fold (and a partial merge) as a task on an executor and the final merge
//! after the shuffle
//! ([`cluster`] starts a scheduler and executors that know the two functions). The result is
//! published by the same code as the local engine's, so the two versions are byte for byte the
//! same.

pub mod cluster;
pub mod functions;
pub mod plan;

pub use plan::recompute;
