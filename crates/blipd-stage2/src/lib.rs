//! Stage 2 of BLIP-Diffusion: subject representation learning ("prompted context generation").
//!
//! Input: the subject composited onto a random background, at the vision tower's resolution, through
//! the frozen ViT → Q-Former (with the subject's class text) → projection → N subject embeddings that are
//! spliced into the CLIP text prompt. Target: the original image through the frozen VAE. Loss: DDPM
//! ε-prediction MSE of the U-Net. Trainable: Q-Former, projection, text encoder (optional), U-Net. With
//! probability `subject_drop_prob` (0.15) a sample gets the text-only prompt, so the model keeps its
//! plain text-to-image ability.

pub mod autoencoder;
pub mod checkpoint;
pub mod config;
pub mod export;
pub mod finetune;
pub mod latents;
pub mod loss;
pub mod model;
pub mod run;
pub mod stage;
pub mod tiny;

pub use config::{PromptTemplate, QFormerInit, Stage2Config};
pub use export::export_pipeline;
pub use model::{Stage2Components, Stage2Model};
pub use stage::{Stage2, Stage2Batch, TargetPosterior, Targets};

/// Errors of stage 2 (wrapped into the trainer's error at the `Stage` boundary).
#[derive(Debug, thiserror::Error)]
pub enum Stage2Error {
    #[error(transparent)]
    Model(#[from] blipd_models::ModelError),
    #[error(transparent)]
    Weights(#[from] blipd_models::weights::WeightsError),
    #[error("stage 2 config: {0}")]
    Config(String),
    #[error("stage 2 batch: {0}")]
    Batch(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<Stage2Error> for blipd_train::TrainError {
    fn from(e: Stage2Error) -> Self {
        blipd_train::TrainError::stage(e)
    }
}
