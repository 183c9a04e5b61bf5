//! Strata's serving layer: an HTTP API that answers from the newest batch version merged with
//! exactly the speed layer's blocks past that version's cutoffs.
//!
//! Its modules depend on each other in one direction, from where the partials come from to the
//! routes:
//!
//! 1. **Sources.** The batch version's views and its co-occurrence index ([`cooccur`]); the speed
//!    tail, from the speed layer's RocksDB (the same database in one process, a follower across
//!    processes) or from a mirror of several speed instances ([`cluster`]; [`peer`] is the
//!    instances' side). [`tail`] merges the speed layer's finished blocks into runs, so that a
//!    point read looks in a few files rather than one table per block.
//! 2. **The merge.** [`state`] holds the loaded batch version and the speed reader and hands each
//!    query one consistent merge of both, with `as_of`: what it covers.
//! 3. **The queries.** [`query`], [`insights`], [`rankings`], [`recommend`], [`devices`] read a
//!    merge through the view definitions of `strata-common`; what they keep between requests
//!    ([`answers`], row and window memos) is handed to them, not held by the state.
//! 4. **The routes.** [`app`] holds the state and what the queries keep; [`api`] maps routes to
//!    queries and errors to JSON, [`metrics`] renders `/metrics`, [`server`] runs it over TCP.

pub mod answers;
pub mod api;
pub mod app;
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
pub mod tail;

pub use error::{ApiError, Error, Result};
pub use state::ServingState;
