//! Strata's end-to-end suites, one module each, in one test binary: real processes of `strata`
//! against a real Kafka broker, over real HTTP and real RocksDB files. One binary instead of one
//! per suite, so that the shared harness (`support`) is compiled and linked once.
//!
//! `scripts/test.sh` runs the suites one after another, each by its module path
//! (`cargo test --release --test e2e -- e2e_up::`), against one fresh broker; by hand:
//! `scripts/test.sh --test e2e_up`.

mod support;

mod e2e_api;
mod e2e_broker;
mod e2e_cluster;
mod e2e_crash;
mod e2e_dashboard;
mod e2e_disk;
mod e2e_engine;
mod e2e_faults;
mod e2e_hostile;
mod e2e_producers;
mod e2e_retention;
mod e2e_secure;
mod e2e_separate;
mod e2e_shutdown;
mod e2e_undecodable;
mod e2e_up;
