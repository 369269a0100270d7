use std::path::PathBuf;

/// Errors raised while building models or reading their configs.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing config {path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
}

/// Read a JSON config file into `T`, with the path in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Config {
        path: path.to_path_buf(),
        source,
    })
}
