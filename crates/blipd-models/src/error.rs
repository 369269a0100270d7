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
    /// A LoRA file that cannot be read or applied (the message names the file).
    #[error("{0}")]
    Lora(String),
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

/// Write a value as pretty JSON (temp file + rename, so a reader never sees half a file), creating the
/// parent folder; `class_name` adds diffusers' `_class_name` to an object.
pub fn write_json<T: serde::Serialize>(
    path: &std::path::Path,
    value: &T,
    class_name: Option<&str>,
) -> Result<(), ModelError> {
    let mut v = serde_json::to_value(value)
        .map_err(|e| ModelError::Invalid(format!("serialising {}: {e}", path.display())))?;
    if let (Some(name), Some(obj)) = (class_name, v.as_object_mut()) {
        obj.insert("_class_name".into(), name.into());
    }
    let text = serde_json::to_string_pretty(&v)
        .map_err(|e| ModelError::Invalid(format!("serialising {}: {e}", path.display())))?;
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    crate::weights::atomic_write(path, text.as_bytes()).map_err(io)
}
