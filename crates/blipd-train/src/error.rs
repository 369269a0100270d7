//! Errors of the training crate.

use std::path::PathBuf;

/// Boxed error coming from a stage or a data source (their own error types).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors from configuration loading and `--set` overrides.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax error or a schema error (unknown key, wrong type, missing key) in the file;
    /// `message` is the TOML library's message, which quotes the offending key and line.
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A `--set` argument that is not of the form `key.sub=value`.
    #[error("malformed override `{arg}`: {reason}")]
    MalformedOverride { arg: String, reason: String },
    /// A `--set` key that the config schema does not have.
    #[error("unknown config key `{key}` in override `{arg}`: {message}")]
    UnknownKey {
        key: String,
        arg: String,
        message: String,
    },
    /// A `--set` value the schema rejects (wrong type or range).
    #[error("invalid value in override `{arg}`: {message}")]
    InvalidOverride { arg: String, message: String },
    /// A value that parses but is not usable (e.g. `grad_accum_steps = 0`).
    #[error("invalid config value `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("cannot serialise config: {0}")]
    Serialize(String),
}

/// Errors of the training loop, checkpoints, metrics and plots.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("JSON error in {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("safetensors error in {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// A weights / optimizer-state file that does not match the module (missing, unexpected
    /// or shape-mismatched keys, unsupported dtype).
    #[error("{path}: {message}")]
    StateMismatch { path: PathBuf, message: String },
    /// A checkpoint file whose checksum or size differs from its manifest.
    #[error("checkpoint file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("non-finite {what} at step {step}")]
    NonFinite { step: u64, what: String },
    #[error("stage error: {0}")]
    Stage(BoxError),
    #[error("data error: {0}")]
    Data(BoxError),
    #[error("gradient sync error: {0}")]
    Sync(String),
    #[error("plot error ({path}): {reason}")]
    Plot { path: PathBuf, reason: String },
    #[error("TensorBoard: {path}: {reason}")]
    TensorBoard { path: PathBuf, reason: String },
    /// Another process writes the run directory (its lock file names it).
    #[error(
        "{dir} is in use by {holder} (lock {lock}): one process per run directory; wait for it \
         to finish or stop it"
    )]
    Locked {
        dir: PathBuf,
        holder: String,
        lock: PathBuf,
    },
    /// Every checkpoint of a run directory failed verification: resuming would silently restart.
    #[error(
        "no valid checkpoint in {dir}: {}; nothing was changed. Fix or remove them, or rerun with \
         --restart to set them aside (renamed *.invalid) and start from step 0",
        rejected.join("; ")
    )]
    NoValidCheckpoint { dir: PathBuf, rejected: Vec<String> },
}

impl TrainError {
    /// Wraps a stage's own error.
    pub fn stage(e: impl Into<BoxError>) -> Self {
        TrainError::Stage(e.into())
    }

    /// Wraps a data source's own error.
    pub fn data(e: impl Into<BoxError>) -> Self {
        TrainError::Data(e.into())
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
