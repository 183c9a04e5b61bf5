//! The batch layer's error type.

use std::path::PathBuf;

/// Errors that stop an archive or a recompute.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] strata_common::Error),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("master dataset: {0}")]
    Dataset(String),
}

impl Error {
    /// See [`strata_common::Error::is_disk`].
    pub fn is_disk(&self) -> bool {
        match self {
            Error::Common(e) => e.is_disk(),
            Error::Io { source, .. } => strata_common::error::io_is_disk(source),
            _ => false,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with the batch layer's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
