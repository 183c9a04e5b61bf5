//! Everything the three layers of Strata share, and nothing that belongs to one of them.
//!
//! Data flows like this: raw Kafka messages are decoded and validated by [`event`] into
//! [`event::Event`]s (or rejected with a [`event::Reject`] reason that goes to the dead-letter
//! topic); [`dedupe`] decides, per partition and in offset order, which events count; each counted
//! event is folded by [`views`] into keyed partial aggregates that merge associatively. The speed
//! layer keeps those partials in RocksDB in the layout of [`speed_store`], the batch layer publishes
//! whole versions in the layout of [`batch_store`], and the serving layer reads both through the
//! same two modules and merges them ([`handoff`] says exactly which speed blocks a batch version
//! leaves to the speed layer).
//!
//! [`kafka`] holds the Kafka plumbing both consuming layers use (a consumer that resumes from
//! offsets the caller stores itself, topic creation, the dead-letter producer), [`generate`] the
//! seeded demo and load generator, [`config`] the typed configuration.

pub mod audience_file;
pub mod batch_store;
pub mod cluster;
pub mod config;
pub mod dedupe;
pub mod disk;
pub mod error;
pub mod event;
pub mod fault;
pub mod generate;
pub mod handoff;
pub mod kafka;
pub mod process;
pub mod progress;
pub mod retention;
pub mod speed_store;
pub mod time;
pub mod undecodable;
pub mod varint;
pub mod version_file;
pub mod views;

pub use error::{Error, Result};
