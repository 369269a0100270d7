//! The interface between a training stage (its losses) and the generic trainer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

use crate::error::Result;
use crate::grads::{GradSet, GradSync};
use crate::rng::TrainRng;

/// What one forward pass of a stage returns.
#[derive(Clone, Debug)]
pub struct StepOutput<B: AutodiffBackend> {
    /// Scalar loss (shape `[1]`) to differentiate: the mean over this micro-batch.
    pub loss: Tensor<B, 1>,
    /// Extra scalars to log (shape `[1]` each, detached), e.g. `itc`, `itm`, `itg`.
    /// Read back once per step together with the loss; averaged over micro-steps and ranks.
    pub metrics: BTreeMap<String, Tensor<B::InnerBackend, 1>>,
    /// Gradients the stage computed itself (gradient checkpointing differentiates block by block); the
    /// trainer then uses them instead of differentiating `loss`, which is only logged. They are the
    /// gradients of `loss` (the trainer divides them by the accumulation count as it would the loss).
    pub grads: Option<GradSet<B::InnerBackend>>,
}

impl<B: AutodiffBackend> StepOutput<B> {
    pub fn new(loss: Tensor<B, 1>) -> Self {
        Self {
            loss,
            metrics: BTreeMap::new(),
            grads: None,
        }
    }

    /// Adds a metric from an autodiff tensor (it is detached; shape `[1]` or reducible to it).
    pub fn with_metric(mut self, name: impl Into<String>, value: Tensor<B, 1>) -> Self {
        let v = value.inner();
        let n = v.dims()[0];
        let v = if n == 1 { v } else { v.mean() };
        self.metrics.insert(name.into(), v);
        self
    }
}

/// Arguments of [`Stage::sample`].
#[derive(Debug)]
pub struct SampleContext {
    /// Optimizer steps completed.
    pub step: u64,
    /// Folder for this call's outputs (`<run_dir>/samples/step-…`), already created.
    pub dir: PathBuf,
    /// A stream for sampling only (`seed`, `SAMPLE + step`): sampling never perturbs training
    /// randomness, and the same step gives the same samples after a resume.
    pub rng: TrainRng,
    /// Whether `model` holds the EMA weights.
    pub ema: bool,
}

/// A training stage: the losses of stage 1 (BLIP-2 ITC/ITM/ITG) or stage 2 (diffusion).
///
/// The stage owns everything frozen (VAE, ViT, tokenizers, noise schedule, ...) and its
/// configuration; the [`crate::Trainer`] owns the trainable model (`Self::Model`, a Burn module
/// grouping every trainable part, e.g. `{ qformer, proj, text_encoder, unet }`) so that the
/// optimizer can move it through its update without a second copy. Each float parameter of the
/// model with `require_grad` is optimized; freeze a sub-module with `.no_grad()` to keep it in
/// the model (and its checkpoints) without training it.
///
/// Randomness: draw everything from `rng` (the stage stream, saved in checkpoints). The trainer
/// also seeds the backend generator from it before each micro-step (`train.seed_backend`), so
/// `Tensor::random` is reproducible too.
pub trait Stage<B: AutodiffBackend> {
    /// The trainable model.
    type Model: AutodiffModule<B>;
    /// One micro-batch, as the data source makes it.
    type Batch;

    /// Forward pass on one micro-batch: the loss (not yet divided by the accumulation count;
    /// the trainer does that) and metrics to log.
    fn step(
        &mut self,
        model: &Self::Model,
        batch: Self::Batch,
        rng: &mut TrainRng,
    ) -> Result<StepOutput<B>>;

    /// [`Stage::step`] for stages whose loss couples samples across data-parallel ranks (stage 1's
    /// ITC/ITM compare each sample with the whole global batch): `comm` is the trainer's gradient
    /// synchronisation, for [`GradSync::all_gather`] of host values. The trainer always calls this;
    /// the default ignores `comm`.
    fn step_dist(
        &mut self,
        model: &Self::Model,
        batch: Self::Batch,
        rng: &mut TrainRng,
        comm: &mut dyn GradSync<B::InnerBackend>,
    ) -> Result<StepOutput<B>> {
        let _ = comm;
        self.step(model, batch, rng)
    }

    /// Produces samples (images, captions, validation losses) when `[sample]` says so; `model`
    /// is the EMA model when EMA is on, else the current weights, without autodiff.
    fn sample(
        &mut self,
        model: &<Self::Model as AutodiffModule<B>>::InnerModule,
        ctx: SampleContext,
    ) -> Result<()> {
        let _ = (model, ctx);
        Ok(())
    }

    /// In a data-parallel run, replaces the stage's frozen networks (those outside [`Stage::Model`],
    /// e.g. stage 2's VAE) by rank 0's, with [`crate::dist_sync::DistSync::broadcast_module`]; the default has none.
    fn broadcast_frozen(&mut self, sync: &mut crate::dist_sync::DistSync) -> Result<()> {
        let _ = sync;
        Ok(())
    }

    /// Where the model's frozen parameters come from, when the stage rebuilds them from fixed inputs
    /// at every start (e.g. LoRA fine-tuning: the base U-Net read from its folder). Checkpoints then
    /// hold only the trainable parameters (a LoRA run's checkpoint is megabytes, not the 3.4 GB
    /// U-Net), and a resume requires the same source (the description is compared). `None` (the
    /// default): checkpoints hold every parameter.
    fn frozen_source(&self) -> Option<String> {
        None
    }

    /// Writes the stage's own resumable state (anything besides the model weights, e.g. a
    /// running statistic) into `dir` (an empty folder inside the checkpoint being written).
    fn save_state(&self, dir: &Path) -> Result<()> {
        let _ = dir;
        Ok(())
    }

    /// Restores what [`Stage::save_state`] wrote.
    fn load_state(&mut self, dir: &Path) -> Result<()> {
        let _ = dir;
        Ok(())
    }
}
