//! The error type of the common crate.

use std::path::PathBuf;

/// Errors raised by the shared state formats, Kafka plumbing and configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("RocksDB error ({context}): {source}")]
    Rocks {
        context: &'static str,
        #[source]
        source: rocksdb::Error,
    },
    #[error("Kafka error ({context}): {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("corrupt state in {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("invalid configuration: {key}: {reason}")]
    Config { key: String, reason: String },
    #[error(
        "data directory {path}: {reason}; stopping before writing (nothing stored was changed)"
    )]
    Disk { path: PathBuf, reason: String },
    #[error("{0}")]
    Other(String),
}

/// Whether an I/O error says the file system is full or read-only.
pub fn io_is_disk(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::ReadOnlyFilesystem
    )
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The data directory is full or read-only: nothing more can be written there until space
    /// or write access returns, so a writer stops rather than retry.
    pub fn is_disk(&self) -> bool {
        match self {
            Error::Disk { .. } => true,
            Error::Io { source, .. } => io_is_disk(source),
            _ => false,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn rocks(context: &'static str, source: rocksdb::Error) -> Self {
        Error::Rocks { context, source }
    }

    pub fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Error::Kafka {
            context: context.into(),
            source,
        }
    }

    pub fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Error::Corrupt {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}
