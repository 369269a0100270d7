//! The `[stage]` section of a stage-2 run config.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use blipd_models::conditioning::PromptTemplate;

/// Where the Q-Former (and projection) start from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QFormerInit {
    /// From `model_dir` (the released BLIP-Diffusion `qformer/`), or random for presets.
    #[default]
    Pretrained,
    /// From a stage-1 checkpoint's model weights (safetensors written by `blipd pretrain` stage 1).
    Stage1(PathBuf),
    /// Random initialisation. (For the paper's "without multimodal pre-training" ablation, a Q-Former
    /// initialised from BERT, run the plan with `stage1.train.max_steps = 0` and
    /// `stage1.train.export_untrained = true`: stage 1 initialises from
    /// its `bert_init` and exports without training, as `configs/sweeps/ablation.toml` does.)
    Random,
}

/// `[stage]` of a stage-2 run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage2Config {
    /// A diffusers folder (`Salesforce/blipdiffusion` layout: qformer/, text_encoder/, unet/, vae/,
    /// tokenizer/) to start from. Without it, `preset` networks are built with random weights.
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// `"tiny"` (tests), `"micro"` (the procedural world of `configs/micro.toml`) or `"sd15"` (full
    /// size, random init) when no `model_dir`.
    #[serde(default = "default_preset")]
    pub preset: String,
    #[serde(default)]
    pub qformer_init: QFormerInit,
    /// A trained VAE component folder (`config.json` + weights, e.g. the `[vae]` stage's
    /// `export/vae`) replacing the preset's random VAE. A pre-training plan with a `[vae]` stage sets
    /// it to that stage's export when it is unset.
    #[serde(default)]
    pub vae_dir: Option<PathBuf>,
    #[serde(default)]
    pub template: PromptTemplate,
    /// Repetitions of the released template's prompt (20 in the released code).
    #[serde(default = "default_reps")]
    pub prompt_reps: usize,
    /// Token index after which the subject embeddings go in the released template (2).
    #[serde(default = "default_ctx_pos")]
    pub ctx_begin_pos: usize,
    /// Probability of training a sample on its text-only prompt (0.15 in the paper).
    #[serde(default = "default_drop")]
    pub subject_drop_prob: f64,
    /// Train the CLIP text encoder (the paper does; ablation "without training the text encoder").
    #[serde(default = "yes")]
    pub train_text_encoder: bool,
    /// Feed the subject's class text to the Q-Former (ablation "without subject text": queries only).
    #[serde(default = "yes")]
    pub use_subject_text: bool,
    /// The BERT-uncased `vocab.txt` for the Q-Former (else `<model_dir>/qformer/vocab.txt`, else
    /// `$BLIPD_BERT_VOCAB`).
    #[serde(default)]
    pub bert_vocab: Option<PathBuf>,
    /// Sampling during training: PNDM steps and guidance.
    #[serde(default = "default_sample_steps")]
    pub sample_steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance_scale: f64,
    /// Write the trained pipeline to `<run.dir>/export` at the end of the run (default on; throughput
    /// benchmarks turn it off: a full-size export is about 6 GB).
    #[serde(default = "yes")]
    pub export: bool,
    /// Min-SNR-γ weighting of the denoising loss (off by default; 5 in Hang et al. 2023), see
    /// [`crate::loss`].
    #[serde(default)]
    pub min_snr_gamma: Option<f64>,
    /// Per-channel offset added to the diffusion noise (off by default; 0.05–0.1 usual).
    #[serde(default)]
    pub noise_offset: f64,
    /// Gradient checkpointing of the U-Net blocks (diffusers' `enable_gradient_checkpointing`; off by
    /// default): the U-Net's forward keeps only each block's input and the backward recomputes one block at
    /// a time ([`crate::checkpoint`]) — activation memory of one block instead of all of them, for about
    /// one more U-Net forward per step. Same gradients.
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

fn default_preset() -> String {
    "tiny".into()
}
fn default_reps() -> usize {
    20
}
fn default_ctx_pos() -> usize {
    2
}
fn default_drop() -> f64 {
    0.15
}
fn yes() -> bool {
    true
}
fn default_sample_steps() -> usize {
    25
}
fn default_guidance() -> f64 {
    7.5
}

impl Default for Stage2Config {
    fn default() -> Self {
        Self {
            model_dir: None,
            preset: default_preset(),
            qformer_init: QFormerInit::default(),
            vae_dir: None,
            template: PromptTemplate::default(),
            prompt_reps: default_reps(),
            ctx_begin_pos: default_ctx_pos(),
            subject_drop_prob: default_drop(),
            train_text_encoder: true,
            use_subject_text: true,
            bert_vocab: None,
            sample_steps: default_sample_steps(),
            guidance_scale: default_guidance(),
            export: true,
            min_snr_gamma: None,
            noise_offset: 0.0,
            gradient_checkpointing: false,
        }
    }
}

impl Stage2Config {
    /// How the run conditions on prompts (what its export records and the pipeline follows).
    pub fn trained_conditioning(&self) -> blipd_models::conditioning::TrainedConditioning {
        blipd_models::conditioning::TrainedConditioning {
            template: self.template,
            prompt_reps: self.prompt_reps,
            ctx_begin_pos: self.ctx_begin_pos,
            subject_text: self.use_subject_text,
        }
    }

    /// The loss options of the run.
    pub fn loss_options(&self) -> crate::loss::LossOptions {
        crate::loss::LossOptions {
            min_snr_gamma: self.min_snr_gamma,
            noise_offset: self.noise_offset,
        }
    }

    pub fn validate(&self) -> Result<(), crate::Stage2Error> {
        self.loss_options().validate()?;
        if !(0.0..=1.0).contains(&self.subject_drop_prob) {
            return Err(crate::Stage2Error::Config(format!(
                "subject_drop_prob = {} must be in [0, 1]",
                self.subject_drop_prob
            )));
        }
        if self.model_dir.is_none() && !matches!(self.preset.as_str(), "tiny" | "micro" | "sd15") {
            return Err(crate::Stage2Error::Config(format!(
                "preset = {:?}: expected \"tiny\", \"micro\" or \"sd15\" (or set model_dir)",
                self.preset
            )));
        }
        if self.prompt_reps == 0 {
            return Err(crate::Stage2Error::Config("prompt_reps must be ≥ 1".into()));
        }
        Ok(())
    }
}
