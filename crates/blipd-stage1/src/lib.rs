//! Stage 1 of BLIP-Diffusion: BLIP-2 multimodal representation learning of the Q-Former.
//!
//! The frozen vision tower (CLIP ViT-L/14, 23 layers) encodes an image; the Q-Former (BERT-base with 16
//! learned queries, cross-attending to the image tokens) is trained on image–caption pairs with the three
//! BLIP-2 objectives of LAVIS `Blip2Qformer.forward` ([`losses`]): image–text contrastive (ITC),
//! image–text matching with hard negatives (ITM) and image-grounded text generation (ITG). The result
//! is exported in the diffusers `qformer/` layout ([`export_qformer`]) for stage 2
//! (`QFormerInit::Stage1(path)`).

pub mod augment;
pub mod bert;
pub mod config;
pub mod data;
pub mod losses;
pub mod model;
pub mod run;
pub mod stage;
pub mod tiny;

pub use config::Stage1Config;
pub use data::{Stage1Batch, Stage1Data};
pub use losses::{
    stage1_losses, GatherFn, Gathered, LossOptions, NegativeWeights, Negatives, Stage1Losses,
    TextBatch,
};
pub use model::{export, export_qformer, Stage1Components, Stage1Model};
pub use run::{run_stage1, Stage1RunConfig};
pub use stage::Stage1;

/// Errors of stage 1 (wrapped into the trainer's error at the `Stage` boundary).
#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    #[error(transparent)]
    Model(#[from] blipd_models::ModelError),
    #[error(transparent)]
    Weights(#[from] blipd_models::weights::WeightsError),
    #[error("stage 1 config: {0}")]
    Config(String),
    #[error("stage 1 batch: {0}")]
    Batch(String),
    #[error("stage 1 data: {0}")]
    Data(String),
    /// A cross-rank collective of the loss (ITC/ITM gather) failed.
    #[error("stage 1 gather across ranks: {0}")]
    Gather(String),
}

impl From<Stage1Error> for blipd_train::TrainError {
    fn from(e: Stage1Error) -> Self {
        blipd_train::TrainError::stage(e)
    }
}
