//! Strata's serving layer: an HTTP API that answers from the newest batch version merged with
//! exactly the speed layer's blocks past that version's cutoffs.
//!
//! [`state`] holds the loaded batch version (reloaded when a newer one is published) and a
//! reader of the speed layer's RocksDB state (the same database in one process, a follower of it
//! across processes). [`query`] merges the two for each question through the view definitions of
//! `strata-common`; every answer carries `as_of`, the batch version and speed offsets it used.
//! [`api`] maps routes to queries and errors to JSON, [`server`] runs it over TCP; [`answers`]
//! keeps rendered answers for as long as the state they were computed from stands.

pub mod answers;
pub mod api;
pub mod cluster;
pub mod cooccur;
pub mod dashboard;
pub mod devices;
pub mod error;
pub mod insights;
pub mod metrics;
pub mod peer;
pub mod query;
pub mod rankings;
pub mod recommend;
pub mod server;
pub mod state;

pub use error::{ApiError, Error, Result};
pub use state::ServingState;
