//! The VAE of a micro world, trained as an autoencoder before stage 2 (`[vae]` of a pre-training
//! plan). Stable Diffusion's VAE was trained before its U-Net; a micro model trained from scratch needs
//! the same, or its latents decode to noise whatever the U-Net learns.
//!
//! Loss: `mean((decode(z) − x)²) + kl_weight · KL(q(z|x) ‖ N(0, I))` with `z` a posterior sample, the
//! KL summed over latent elements and averaged over the batch (the LDM recipe without its perceptual
//! and adversarial terms: at 32 px the squared error alone gives sharp enough reconstructions). At the
//! end the latent scale is measured (`scaling_factor = 1 / std` of the posterior means of 512 training
//! images, as SD's 0.18215 was chosen) and the VAE is exported as a diffusers component folder that
//! `[stage] vae_dir` of stage 2 loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use blipd_data::preprocess::vae_target;
use blipd_data::synthetic::synth_pair;
use blipd_models::vae::{AutoencoderKL, VaeConfig};
use blipd_train::KeyedSource;
use blipd_train::{
    EpochSampler, RunConfig, RunSummary, SampleContext, StepOutput, TrainRng, Trainer,
};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use serde::{Deserialize, Serialize};

use crate::stage::{grid, stack, to_rgb};
use crate::Stage2Error;

/// `[stage]` of a VAE run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeStageConfig {
    /// `"micro"` ([`VaeConfig::micro`]) or `"tiny"` ([`VaeConfig::tiny`]).
    #[serde(default = "default_preset")]
    pub preset: String,
    /// Weight of the KL term (1e-6 in the LDM configs of SD's VAE).
    #[serde(default = "default_kl")]
    pub kl_weight: f64,
    /// Write `<run.dir>/export/vae` at the end (what stage 2 loads).
    #[serde(default = "yes")]
    pub export: bool,
}

fn default_preset() -> String {
    "micro".into()
}
fn default_kl() -> f64 {
    1e-6
}
fn yes() -> bool {
    true
}

impl Default for VaeStageConfig {
    fn default() -> Self {
        Self {
            preset: default_preset(),
            kl_weight: default_kl(),
            export: true,
        }
    }
}

/// `[data]` of a VAE run: the targets of the procedural world.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeData {
    /// Procedural training pairs (their targets are the images).
    pub pairs: usize,
    #[serde(default)]
    pub seed: u64,
    /// Image size (32 for the micro world).
    #[serde(default = "default_size")]
    pub size: usize,
}

fn default_size() -> usize {
    32
}

impl Default for VaeData {
    fn default() -> Self {
        Self {
            pairs: 4096,
            seed: 0,
            size: default_size(),
        }
    }
}

/// The full VAE run config.
pub type VaeRunConfig = RunConfig<VaeStageConfig, VaeData>;

/// The preset's config.
pub fn preset_config(preset: &str) -> Result<VaeConfig, Stage2Error> {
    match preset {
        "micro" => Ok(VaeConfig::micro()),
        "tiny" => Ok(VaeConfig::tiny()),
        other => Err(Stage2Error::Config(format!(
            "[stage] preset = {other:?}: expected \"micro\" or \"tiny\""
        ))),
    }
}

/// Checks a VAE run config without building anything.
pub fn validate_config(cfg: &VaeRunConfig) -> Result<(), Stage2Error> {
    cfg.trainer()
        .validate()
        .map_err(|e| Stage2Error::Config(e.to_string()))?;
    let vae = preset_config(&cfg.stage.preset)?;
    if !(cfg.stage.kl_weight.is_finite() && cfg.stage.kl_weight >= 0.0) {
        return Err(Stage2Error::Config(format!(
            "[stage] kl_weight = {}: must be finite and ≥ 0",
            cfg.stage.kl_weight
        )));
    }
    if cfg.data.pairs < cfg.train.batch_size {
        return Err(Stage2Error::Config(format!(
            "[data] pairs = {} is fewer than train.batch_size = {}",
            cfg.data.pairs, cfg.train.batch_size
        )));
    }
    let f = vae.downsample_factor();
    if cfg.data.size == 0 || !cfg.data.size.is_multiple_of(f) {
        return Err(Stage2Error::Config(format!(
            "[data] size = {}: must be a positive multiple of {f} (the VAE's down-sampling factor)",
            cfg.data.size
        )));
    }
    Ok(())
}

/// The autoencoder's training stage.
pub struct AutoencoderStage<B: AutodiffBackend> {
    kl_weight: f64,
    /// Validation images `[N, 3, S, S]` in [−1, 1] (reconstructed in the sample sheets).
    samples: Vec<f32>,
    size: usize,
    device: B::Device,
}

impl<B: AutodiffBackend> blipd_train::Stage<B> for AutoencoderStage<B> {
    type Model = AutoencoderKL<B>;
    type Batch = TensorData;

    fn step(
        &mut self,
        model: &Self::Model,
        batch: TensorData,
        _rng: &mut TrainRng,
    ) -> blipd_train::Result<StepOutput<B>> {
        let x = Tensor::<B, 4>::from_data(batch, &self.device);
        let post = model.encode(x.clone());
        let noise = Tensor::random(
            post.mean().dims(),
            Distribution::Normal(0.0, 1.0),
            &self.device,
        );
        let rec = model.decode(post.sample(noise));
        let mse = (rec - x).powf_scalar(2.0).mean().reshape([1]);
        let kl = post.kl().mean().reshape([1]);
        let loss = mse.clone() + kl.clone() * self.kl_weight;
        Ok(StepOutput::new(loss)
            .with_metric("mse", mse)
            .with_metric("kl", kl))
    }

    fn sample(
        &mut self,
        model: &<Self::Model as AutodiffModule<B>>::InnerModule,
        ctx: SampleContext,
    ) -> blipd_train::Result<()> {
        let n = self.samples.len() / (3 * self.size * self.size);
        let x = Tensor::<B::InnerBackend, 4>::from_data(
            TensorData::new(self.samples.clone(), [n, 3, self.size, self.size]),
            &self.device,
        );
        let rec = model.decode(model.encode(x.clone()).mean());
        let row = |t: Tensor<B::InnerBackend, 4>| {
            grid(
                &(0..n)
                    .map(|i| to_rgb(t.clone().narrow(0, i, 1)))
                    .collect::<Vec<_>>(),
            )
        };
        let sheet = stack(&[row(x), row(rec)]);
        let path = ctx.dir.join("reconstructions.png");
        sheet.save(&path).map_err(|e| {
            blipd_train::TrainError::stage(Stage2Error::Config(format!("{}: {e}", path.display())))
        })?;
        Ok(())
    }
}

/// Images `[-1, 1]` CHW of training pairs `idx` (their targets).
fn targets(idx: impl Iterator<Item = u64>, seed: u64, size: usize) -> (Vec<f32>, usize) {
    let mut out = Vec::new();
    let mut n = 0;
    for i in idx {
        out.extend(vae_target(&synth_pair(i, seed, size as u32).target, size));
        n += 1;
    }
    (out, n)
}

/// Where [`run_vae`] exports the VAE: `<run.dir>/export/vae`.
pub fn export_dir(cfg: &VaeRunConfig) -> PathBuf {
    cfg.run.dir.join("export").join("vae")
}

/// Train the VAE to `train.max_steps` (resuming from the newest checkpoint), then measure its latent
/// scale and export it to [`export_dir`]. One process (the VAE of a micro world trains in a minute).
pub fn run_vae<B: AutodiffBackend>(
    cfg: &VaeRunConfig,
    device: B::Device,
) -> Result<RunSummary, blipd_train::TrainError> {
    validate_config(cfg)?;
    if std::env::var("WORLD_SIZE").is_ok_and(|w| w.trim() != "1") {
        return Err(Stage2Error::Config(
            "the [vae] stage runs in one process: train it first with `blipd pretrain` alone, or \
             name a trained VAE with stage2.stage.vae_dir"
                .into(),
        )
        .into());
    }
    B::seed(&device, cfg.run.seed);
    let vae_cfg = preset_config(&cfg.stage.preset)?;
    let model = vae_cfg.init::<B>(&device).map_err(Stage2Error::from)?;
    let (size, seed) = (cfg.data.size, cfg.data.seed);
    // Validation: 8 pairs beyond the training range would be new poses; the first 8 are fine to look at.
    let (samples, _) = targets(0..8, seed ^ 0x5A11, size);
    let stage = AutoencoderStage::<B> {
        kl_weight: cfg.stage.kl_weight,
        samples,
        size,
        device: device.clone(),
    };
    blipd_train::params::param_infos::<B, _>(&model);
    let make = move |idx: &[usize], _keys: &[u64]| -> blipd_train::Result<TensorData> {
        let (v, n) = targets(idx.iter().map(|&i| i as u64), seed, size);
        Ok(TensorData::new(v, [n, 3, size, size]))
    };
    let sampler = EpochSampler::new(cfg.data.pairs, cfg.train.batch_size, cfg.run.seed, true);
    let mut data = KeyedSource::new(sampler, cfg.train.batch_size, make);
    let mut trainer = Trainer::from_run_config(cfg, stage, model, device.clone())?;
    let summary = trainer.fit(&mut data)?;
    if cfg.stage.export {
        let model = match trainer.ema_model() {
            Some(ema) => ema.clone(),
            None => trainer.model().valid(),
        };
        let scale = latent_scale(&model, seed, size, &device);
        let mut out_cfg = vae_cfg.clone();
        out_cfg.scaling_factor = scale;
        let mut model = model;
        model.scaling_factor = scale;
        let dir = export_dir(cfg);
        model
            .save_diffusers(&out_cfg, &dir)
            .map_err(Stage2Error::from)?;
        write_metrics(&dir, scale, &summary)?;
        tracing::info!(
            "vae: exported to {} (scaling_factor {scale:.4})",
            dir.display()
        );
    }
    Ok(summary)
}

/// `1 / std` of the posterior means of 512 training images.
fn latent_scale<B: Backend>(
    vae: &AutoencoderKL<B>,
    seed: u64,
    size: usize,
    device: &B::Device,
) -> f64 {
    let mut sum = 0f64;
    let mut sq = 0f64;
    let mut count = 0f64;
    for chunk in 0..8u64 {
        let (v, n) = targets(chunk * 64..(chunk + 1) * 64, seed, size);
        let x = Tensor::<B, 4>::from_data(TensorData::new(v, [n, 3, size, size]), device);
        let m: Vec<f32> = vae
            .encode(x)
            .mean()
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap_or_default();
        for &z in &m {
            sum += z as f64;
            sq += (z as f64) * (z as f64);
            count += 1.0;
        }
    }
    let mean = sum / count.max(1.0);
    let std = (sq / count.max(1.0) - mean * mean).max(1e-12).sqrt();
    1.0 / std
}

fn write_metrics(dir: &Path, scale: f64, summary: &RunSummary) -> Result<(), Stage2Error> {
    let mut m = BTreeMap::new();
    m.insert("scaling_factor", serde_json::json!(scale));
    m.insert("steps", serde_json::json!(summary.final_step));
    m.insert(
        "last_loss",
        serde_json::json!(summary.last.as_ref().map(|s| s.loss)),
    );
    let path = dir.join("training.json");
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap_or_default())
        .map_err(crate::export::io(&path))
}
