//! Error type of the data pipeline.

use std::path::PathBuf;

/// Every failure of `blipd-data`, with the context needed to find the offending input.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Filesystem error on a path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An image could not be read or decoded (truncated, corrupt, unsupported, too large).
    #[error("image {id}: {reason}")]
    Image { id: String, reason: String },
    /// Two inputs that must agree in size do not.
    #[error("{what}: expected {expected_w}x{expected_h}, got {actual_w}x{actual_h}")]
    SizeMismatch {
        what: String,
        expected_w: u32,
        expected_h: u32,
        actual_w: u32,
        actual_h: u32,
    },
    /// A `.npy` array that is not a float array this crate reads.
    #[error("{path}: {reason}")]
    Npy { path: PathBuf, reason: String },
    /// A CSV file is unusable as a whole (missing header column, unreadable).
    #[error("{path}: {reason}")]
    Csv { path: PathBuf, reason: String },
    /// The matting solver did not converge.
    /// A trimap that cannot be matted (e.g. without a single known pixel).
    #[error("trimap {id}: {reason}")]
    Trimap { id: String, reason: String },
    #[error("matting solver: {0}")]
    Solver(String),
    /// A shard or manifest could not be written or read.
    #[error("shard {path}: {reason}")]
    Shard { path: PathBuf, reason: String },
    /// An invalid configuration value.
    #[error("config: {0}")]
    Config(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, DataError>;
