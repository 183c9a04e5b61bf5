//! The speed layer's error type.

/// Errors that stop the speed layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] strata_common::Error),
    #[error("RocksDB write failed: {0}")]
    Write(#[source] rocksdb::Error),
    #[error("the speed state in {path} was built with handoff.block-size {stored}, but the configuration says {configured}; use {stored} or start from an empty speed state")]
    BlockSize {
        path: String,
        stored: u64,
        configured: u64,
    },
}

/// `Result` with the speed layer's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
