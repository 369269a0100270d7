use std::path::PathBuf;

use blipd_models::weights::WeightsError;
use blipd_models::ModelError;

/// Errors of the applications (pipeline assembly, inputs, generation).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("image: {0}")]
    Image(String),
    #[error("pipeline folder {path}: {message}")]
    Folder { path: PathBuf, message: String },
    #[error("invalid request: {0}")]
    Request(String),
}
