//! Subject fine-tuning (BLIP-Diffusion §3.4), the recipe of the released code (LAVIS
//! `BlipDiffusion` with the `blip_diffusion_finetune` dataset; model.md §3.1–3.2):
//!
//! - before training, the subject's photos go through ViT → Q-Former (with the subject text) →
//!   projection, and the mean over photos becomes a trainable subject embedding `ctx` (`[1, 16, D]`,
//!   LAVIS `ctx_embeddings_cache`); the Q-Former is not used again;
//! - every step: the targets (the photos at 512 in [−1, 1]) through the frozen VAE, DDPM noise at a
//!   uniform timestep, the caption `"a {subject}"` tokenized *without padding* with `ctx` spliced after
//!   token 2 (`[BOS, a, ctx×16, dog, EOS]`), the frozen text encoder, the U-Net, ε-prediction MSE;
//! - trainable: the U-Net and `ctx` (the text encoder with `train_text_encoder = true`); no subject
//!   dropping, no augmentation; AdamW lr 5e-6, weight decay 0.01 (matrices and `ctx`), batch 3, 40–120
//!   steps, constant lr (`configs/finetune/dreambench-dog.toml`).
//!
//! The run ends with a pipeline folder (`<run.dir>/export`): the base folder's components with the
//! trained U-Net and `ctx_embeddings_cache.safetensors`; `blipd generate` then uses the cached subject
//! embedding instead of a reference image, as LAVIS does for fine-tuned checkpoints.
//!
//! **LoRA** (`[stage.lora]`, `blipd finetune --lora RANK`; not in the released code): the U-Net is
//! frozen and low-rank adapters on its attention projections ([`blipd_models::lora`]) train with the
//! subject embedding. The export is then an adapter folder of a few MB instead of a pipeline with a
//! 3.4 GB U-Net (LAVIS issue #515): `pytorch_lora_weights.safetensors` (the diffusers/PEFT layout
//! `load_lora_weights` reads), `ctx_embeddings_cache.safetensors` beside it, and `blipd_lora.json`
//! naming the base; `blipd generate --model BASE --lora <export>` applies both.

use std::path::{Path, PathBuf};

use blipd_data::preprocess::{clip_input, vae_target};
use blipd_models::conditioning::{self, BlipDiffusionPrompt, PromptRow, TrainedConditioning};
use blipd_models::ctx_clip_text::{ContextClipTextModel, CTX_CACHE_FILE, CTX_CACHE_KEY};
use blipd_models::lora::{self, LoraSpec};
use blipd_models::qformer::Blip2QFormerModel;
use blipd_models::schedulers::ddpm::DdpmScheduler;
use blipd_models::tokenizers::{BertTokenizer, ClipTokenizer};
use blipd_models::unet::UNet2DConditionModel;
use blipd_models::vae::AutoencoderKL;
use blipd_models::weights::write_safetensors;
use blipd_train::{
    EpochSampler, KeyedSource, RunConfig, RunSummary, SampleContext, Stage, StepOutput, TrainRng,
    Trainer,
};
use burn::module::{AutodiffModule, Module, Param};

use crate::checkpoint::InnerGrads;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::export::{io, replace_dir};
use crate::stage::plms_image;
use crate::{Stage2Components, Stage2Config, Stage2Error};

/// `[stage]` of a fine-tuning run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// The pipeline folder to start from (the released `Salesforce/blipdiffusion`, or a stage-2 run's
    /// `export/`).
    pub model_dir: PathBuf,
    /// The subject's class noun, e.g. `"dog"`: the Q-Former's subject text and the caption's noun.
    pub subject: String,
    /// BERT `vocab.txt` when the folder has no `qformer/vocab.txt`.
    #[serde(default)]
    pub bert_vocab: Option<PathBuf>,
    /// Train the subject embedding (LAVIS: yes).
    #[serde(default = "yes")]
    pub train_ctx: bool,
    /// Train the CLIP text encoder too (LAVIS: no).
    #[serde(default)]
    pub train_text_encoder: bool,
    /// Token index after which the subject embeddings go (2: after BOS and "a").
    #[serde(default = "default_ctx_pos")]
    pub ctx_begin_pos: usize,
    /// Sample sheets: the prompt, PLMS steps and guidance (`[sample]` says when).
    #[serde(default = "default_sample_prompt")]
    pub sample_prompt: String,
    #[serde(default = "default_sample_steps")]
    pub sample_steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance_scale: f64,
    /// Min-SNR-γ weighting and noise offset, as in stage 2 (off by default; [`crate::loss`]).
    #[serde(default)]
    pub min_snr_gamma: Option<f64>,
    #[serde(default)]
    pub noise_offset: f64,
    /// Train LoRA adapters on the frozen U-Net's attention projections instead of the whole U-Net
    /// (`[stage.lora]`: `rank`, `alpha` (default `rank`), `targets`).
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    /// Gradient checkpointing of the U-Net blocks, as in stage 2 ([`crate::checkpoint`]; off by default).
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

impl FinetuneConfig {
    /// The loss options of the run.
    pub fn loss_options(&self) -> crate::loss::LossOptions {
        crate::loss::LossOptions {
            min_snr_gamma: self.min_snr_gamma,
            noise_offset: self.noise_offset,
        }
    }
}

/// `[data]` of a fine-tuning run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneData {
    /// A folder of the subject's photos (`.jpg`, `.jpeg`, `.png`, `.webp`).
    pub images: PathBuf,
    /// Target (VAE) resolution: 512 for SD-1.5.
    #[serde(default = "default_target")]
    pub target_size: usize,
    #[serde(default = "yes")]
    pub shuffle: bool,
}

impl Default for FinetuneData {
    fn default() -> Self {
        Self {
            images: PathBuf::new(),
            target_size: default_target(),
            shuffle: true,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_ctx_pos() -> usize {
    2
}
fn default_sample_prompt() -> String {
    "on the beach".into()
}
fn default_sample_steps() -> usize {
    50
}
fn default_guidance() -> f64 {
    7.5
}
fn default_target() -> usize {
    512
}

/// The full fine-tuning run config.
pub type FinetuneRunConfig = RunConfig<FinetuneConfig, FinetuneData>;

/// What fine-tuning trains (the text encoder is frozen unless `train_text_encoder`; it is part of the
/// model because the subject embedding's gradient flows through it).
#[derive(Module, Debug)]
pub struct FinetuneModel<B: Backend> {
    pub unet: UNet2DConditionModel<B>,
    pub text_encoder: ContextClipTextModel<B>,
    /// The cached subject embedding `[1, N, D]`.
    pub ctx: Param<Tensor<B, 3>>,
}

/// One micro-batch: targets `[B, 3, S, S]` in [−1, 1].
#[derive(Clone, Debug)]
pub struct FinetuneBatch {
    pub target: TensorData,
}

/// The fine-tuning stage: frozen VAE, noise schedule, the fixed caption.
pub struct Finetune<B: AutodiffBackend> {
    pub config: FinetuneConfig,
    pub vae: AutoencoderKL<B::InnerBackend>,
    pub ddpm: DdpmScheduler,
    pub clip_tokenizer: ClipTokenizer,
    pub bert_tokenizer: BertTokenizer,
    /// `[BOS] a {subject} [EOS]`, unpadded, truncated to `max_len − N`.
    pub caption_ids: Vec<u32>,
    pub max_text_len: usize,
    pub num_ctx: usize,
    pub target_size: usize,
    pub latent_factor: usize,
    pub device: B::Device,
    pub autocast: Option<burn::tensor::FloatDType>,
    /// With LoRA: where the frozen U-Net and text encoder come from ([`Stage::frozen_source`]), so
    /// checkpoints hold only the adapters and the subject embedding.
    pub frozen_source: Option<String>,
}

/// The base folder's U-Net and text-encoder weight files (path, size, modification time): what a
/// LoRA checkpoint's frozen weights are rebuilt from.
fn frozen_files(model_dir: &Path) -> Result<String, Stage2Error> {
    let dir = model_dir.canonicalize().map_err(io(model_dir))?;
    let mut parts = vec![dir.display().to_string()];
    for c in ["unet", "text_encoder"] {
        let f = blipd_models::weights::component_weight_file(&dir.join(c))?;
        let m = std::fs::metadata(&f).map_err(io(&f))?;
        let modified = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        parts.push(format!(
            "{} ({} bytes, modified at {modified})",
            f.strip_prefix(&dir).unwrap_or(&f).display(),
            m.len()
        ));
    }
    Ok(parts.join(", "))
}

/// The subject's photos in file-name order; an unreadable one is an error naming it.
pub fn read_images(dir: &Path) -> Result<Vec<(PathBuf, image::RgbImage)>, Stage2Error> {
    let rd = std::fs::read_dir(dir).map_err(io(dir))?;
    let mut paths: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                matches!(
                    e.to_ascii_lowercase().as_str(),
                    "jpg" | "jpeg" | "png" | "webp"
                )
            })
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(Stage2Error::Config(format!(
            "[data] images = {}: no .jpg/.jpeg/.png/.webp file",
            dir.display()
        )));
    }
    paths
        .into_iter()
        .map(|p| {
            // The pipeline's decoder: EXIF orientation, CMYK/grey/16-bit/alpha, size limits.
            let bytes = std::fs::read(&p).map_err(io(&p))?;
            let id = p.display().to_string();
            let img = blipd_data::imageio::decode_image(&bytes, &id, &Default::default())
                .map_err(|e| Stage2Error::Config(format!("subject image {id}: {e}")))?
                .to_rgb8();
            Ok((p, img))
        })
        .collect()
}

impl<B: AutodiffBackend> Finetune<B> {
    /// The fine-tuning loss for given randomness: target latents `posterior.sample(vae_noise) · scale`,
    /// DDPM-noised with `noise` at timesteps `t`, the caption with the subject embedding, ε-prediction
    /// MSE (mean over all elements), or min-SNR-weighted ([`crate::loss`]).
    pub fn loss_from(
        &self,
        model: &FinetuneModel<B>,
        target: Tensor<B::InnerBackend, 4>,
        vae_noise: Tensor<B::InnerBackend, 4>,
        noise: Tensor<B, 4>,
        t: Vec<i64>,
    ) -> Result<Tensor<B, 1>, Stage2Error> {
        Ok(self.denoising(model, target, vae_noise, noise, t, false)?.0)
    }

    /// [`Self::loss_from`]; with `checkpointing`, the U-Net goes through [`crate::checkpoint`] and the loss
    /// comes with the gradients of every trainable parameter (already differentiated).
    fn denoising(
        &self,
        model: &FinetuneModel<B>,
        target: Tensor<B::InnerBackend, 4>,
        vae_noise: Tensor<B::InnerBackend, 4>,
        noise: Tensor<B, 4>,
        t: Vec<i64>,
        checkpointing: bool,
    ) -> Result<(Tensor<B, 1>, Option<InnerGrads<B>>), Stage2Error> {
        let b = t.len();
        let posterior = self.vae.encode(target);
        let latents =
            Tensor::<B, 4>::from_inner(posterior.sample(vae_noise) * self.vae.scaling_factor);
        let t_int = Tensor::<B, 1, Int>::from_data(TensorData::new(t.clone(), [b]), &self.device);
        let noisy = self.ddpm.add_noise(latents, noise.clone(), t_int.clone());
        let [_, n, d] = model.ctx.val().dims();
        let ctx = model.ctx.val().expand([b, n, d]);
        let states = self.states(&model.text_encoder, ctx)?;
        let opts = self.config.loss_options();
        Ok(crate::checkpoint::denoising_loss(
            model,
            &model.unet,
            noisy,
            t_int.float(),
            states,
            self.config.train_ctx || self.config.train_text_encoder,
            checkpointing,
            |pred| opts.loss(pred, noise, &t, self.ddpm.alphas_cumprod()),
        ))
    }

    /// `ctx` `[b, N, D]` into the caption → text-encoder states `[b, L, D]`.
    fn states<BB: Backend>(
        &self,
        text_encoder: &ContextClipTextModel<BB>,
        ctx: Tensor<BB, 3>,
    ) -> Result<Tensor<BB, 3>, Stage2Error> {
        let [b, _, _] = ctx.dims();
        let row = PromptRow {
            ids: self.caption_ids.clone(),
            ctx_pos: Some(self.config.ctx_begin_pos),
        };
        Ok(conditioning::encode_rows(
            text_encoder,
            &vec![row; b],
            Some(ctx),
        )?)
    }
}

impl<B: AutodiffBackend> Stage<B> for Finetune<B> {
    type Model = FinetuneModel<B>;
    type Batch = FinetuneBatch;

    fn step(
        &mut self,
        model: &FinetuneModel<B>,
        batch: FinetuneBatch,
        rng: &mut TrainRng,
    ) -> blipd_train::Result<StepOutput<B>> {
        let _autocast = blipd_models::amp::Autocast::enter(self.autocast);
        let dev = self.device.clone();
        let target = Tensor::<B::InnerBackend, 4>::from_data(batch.target, &dev);
        let [b, _, h, w] = target.dims();
        let f = self.latent_factor;
        let channels = model.unet.conv_in.weight.dims()[1];
        let shape = [b, channels, h / f, w / f];
        let vae_noise = Tensor::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let noise = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let opts = self.config.loss_options();
        let noise = if opts.wants_offset() {
            opts.offset_noise(
                noise,
                Tensor::random([b, channels, 1, 1], Distribution::Normal(0.0, 1.0), &dev),
            )
        } else {
            noise
        };
        let n_train = self.ddpm.num_train_timesteps();
        let t: Vec<i64> = (0..b)
            .map(|_| rng.random_range(0..n_train) as i64)
            .collect();
        let checkpointing = self.config.gradient_checkpointing;
        let (loss, grads) = self.denoising(model, target, vae_noise, noise, t, checkpointing)?;
        let mut out = StepOutput::new(loss);
        out.grads = grads;
        Ok(out)
    }

    fn frozen_source(&self) -> Option<String> {
        self.frozen_source.clone()
    }

    fn sample(
        &mut self,
        model: &<FinetuneModel<B> as AutodiffModule<B>>::InnerModule,
        ctx: SampleContext,
    ) -> blipd_train::Result<()> {
        let mut rng = ctx.rng;
        let prompt = BlipDiffusionPrompt {
            num_ctx_tokens: self.num_ctx,
            max_position_embeddings: self.max_text_len,
            ctx_begin_pos: self.config.ctx_begin_pos,
            ..BlipDiffusionPrompt::default()
        };
        let states = conditioning::guided_states(
            &model.text_encoder,
            &self.clip_tokenizer,
            &prompt,
            model.ctx.val(),
            &[self.config.sample_prompt.as_str()],
            &[self.config.subject.as_str()],
            blipd_models::sampling::guided(self.config.guidance_scale).then_some(""),
        )
        .map_err(Stage2Error::from)?;
        let img = plms_image(
            &model.unet,
            &self.vae,
            states,
            self.target_size / self.latent_factor,
            self.config.sample_steps,
            self.config.guidance_scale,
            &mut rng,
        )?;
        let path = ctx.dir.join("samples.png");
        img.save(&path).map_err(|e| {
            blipd_train::TrainError::stage(format!("writing {}: {e}", path.display()))
        })?;
        let txt = ctx.dir.join("samples.txt");
        std::fs::write(
            &txt,
            format!(
                "\"a {} {}\" with the fine-tuned subject embedding\n",
                self.config.subject, self.config.sample_prompt
            ),
        )
        .map_err(|e| blipd_train::TrainError::stage(format!("writing {}: {e}", txt.display())))?;
        Ok(())
    }
}

/// The initial subject embedding `[1, N, D]`: the mean over the photos (`pixels` `[n, 3, S, S]`,
/// CLIP-normalised) of ViT → Q-Former (reading the subject text, as LAVIS `before_training` does; `None`
/// for a model trained without it) → projection.
pub fn subject_embedding<IB: Backend>(
    qformer: &Blip2QFormerModel<IB>,
    tokenizer: &BertTokenizer,
    pixels: Tensor<IB, 4>,
    subject: Option<&str>,
) -> Result<Tensor<IB, 3>, Stage2Error> {
    let n = pixels.dims()[0];
    let subjects = subject.map(|s| vec![s; n]);
    Ok(
        conditioning::subject_embeddings(qformer, tokenizer, pixels, subjects.as_deref())?
            .mean_dim(0),
    )
}

/// The fine-tuning data: the subject's targets, sampled with repetition (LAVIS repeats the folder
/// 100,000 times, so a batch of 3 from one photo is that photo three times).
pub type FinetuneSource = KeyedSource<MakeFinetuneBatch>;

/// Builds a fine-tuning batch from sample indices (and their keys in the sample stream, unused).
pub type MakeFinetuneBatch = Box<dyn FnMut(&[usize], &[u64]) -> blipd_train::Result<FinetuneBatch>>;

/// Builds the stage, the model (with the subject embedding computed from the photos) and the data.
pub fn build<B: AutodiffBackend>(
    cfg: &FinetuneRunConfig,
    device: &B::Device,
) -> Result<(Finetune<B>, FinetuneModel<B>, FinetuneSource), Stage2Error> {
    B::seed(device, cfg.run.seed);
    cfg.train
        .mixed_precision
        .check_backend(&B::name(device), "[train] mixed_precision")
        .map_err(Stage2Error::Config)?;
    let c = &cfg.stage;
    if c.subject.trim().is_empty() {
        return Err(Stage2Error::Config("[stage] subject is empty".into()));
    }
    c.loss_options().validate()?;
    if let Some(spec) = &c.lora {
        spec.validate()?;
        if c.train_text_encoder {
            return Err(Stage2Error::Config(
                "[stage] lora trains adapters on the U-Net only; set train_text_encoder = false"
                    .into(),
            ));
        }
    }
    let images = read_images(&cfg.data.images)?;
    let base = Stage2Config {
        model_dir: Some(c.model_dir.clone()),
        bert_vocab: c.bert_vocab.clone(),
        ..Stage2Config::default()
    };
    let parts = Stage2Components::<B>::from_diffusers(&c.model_dir, &base, device)?;
    let size = cfg.data.target_size;
    let latent_factor = parts.vae_config.downsample_factor();
    if size == 0 || !size.is_multiple_of(latent_factor) {
        return Err(Stage2Error::Config(format!(
            "[data] target_size = {size} is not a positive multiple of the VAE's factor {latent_factor}"
        )));
    }

    let s = parts.image_size;
    let mut pixels = Vec::with_capacity(images.len() * 3 * s * s);
    for (_, img) in &images {
        pixels.extend(clip_input(img, s));
    }
    let n_img = images.len();
    let input =
        Tensor::<B::InnerBackend, 4>::from_data(TensorData::new(pixels, [n_img, 3, s, s]), device);
    // A blipd export of a model trained without the subject text says so; its Q-Former reads none.
    let folder = blipd_models::weights::DiffusersFolder::open(&c.model_dir)?;
    let subject_text = TrainedConditioning::from_index(&folder.index)?.subject_text;
    let ctx = subject_embedding(
        &parts.model.qformer.valid(),
        &parts.bert_tokenizer,
        input,
        subject_text.then_some(c.subject.as_str()),
    )?;
    let num_ctx = ctx.dims()[1];
    let ctx = Param::from_tensor(Tensor::<B, 3>::from_inner(ctx)).set_require_grad(c.train_ctx);
    let text_encoder = if c.train_text_encoder {
        parts.model.text_encoder
    } else {
        parts.model.text_encoder.no_grad()
    };

    let max_text_len = parts.max_text_len;
    let mut caption_ids = vec![parts.clip_tokenizer.bos_id()];
    let mut body = parts.clip_tokenizer.tokenize(&format!("a {}", c.subject))?;
    body.truncate(max_text_len.saturating_sub(num_ctx + 2));
    caption_ids.extend(body);
    caption_ids.push(parts.clip_tokenizer.eos_id());
    if c.ctx_begin_pos > caption_ids.len() {
        return Err(Stage2Error::Config(format!(
            "[stage] ctx_begin_pos = {} is past the caption's {} tokens",
            c.ctx_begin_pos,
            caption_ids.len()
        )));
    }

    let stage = Finetune {
        config: c.clone(),
        vae: parts.vae.valid(),
        ddpm: DdpmScheduler::sd15(),
        clip_tokenizer: parts.clip_tokenizer,
        bert_tokenizer: parts.bert_tokenizer,
        caption_ids,
        max_text_len,
        num_ctx,
        target_size: size,
        latent_factor,
        device: device.clone(),
        autocast: cfg.train.mixed_precision.dtype(),
        frozen_source: match &c.lora {
            Some(_) => Some(frozen_files(&c.model_dir)?),
            None => None,
        },
    };
    let unet = match &c.lora {
        None => parts.model.unet,
        Some(spec) => {
            let unet = lora::attach(parts.model.unet.no_grad(), spec, device)?;
            tracing::info!(
                "LoRA rank {} (alpha {}) on {:?} of every attention layer: {} trainable U-Net parameters",
                spec.rank,
                spec.alpha.unwrap_or(spec.rank as f64),
                spec.targets.iter().map(|t| t.key()).collect::<Vec<_>>(),
                lora::num_adapter_params(&unet)
            );
            unet
        }
    };
    let model = FinetuneModel {
        unet,
        text_encoder,
        ctx,
    };
    blipd_train::params::param_infos::<B, _>(&model);

    let targets: Vec<Vec<f32>> = images
        .iter()
        .map(|(_, img)| vae_target(img, size))
        .collect();
    tracing::info!(
        "fine-tuning on {} photo(s) of {:?} from {} ({} subject embeddings)",
        n_img,
        c.subject,
        cfg.data.images.display(),
        num_ctx
    );
    let batch = cfg.train.batch_size;
    // Enough repetitions that one epoch holds at least one global batch of any size used here.
    let reps = batch.div_ceil(n_img).max(1) * 64;
    let sampler = EpochSampler::new(n_img * reps, batch, cfg.run.seed, cfg.data.shuffle);
    let make: MakeFinetuneBatch = Box::new(move |idx: &[usize], _keys: &[u64]| {
        let mut v = Vec::with_capacity(idx.len() * 3 * size * size);
        for &i in idx {
            v.extend_from_slice(&targets[i % targets.len()]);
        }
        Ok(FinetuneBatch {
            target: TensorData::new(v, [idx.len(), 3, size, size]),
        })
    });
    Ok((stage, model, KeyedSource::new(sampler, batch, make)))
}

/// Where [`run_finetune`] exports: `<run.dir>/export`.
pub fn export_dir(cfg: &FinetuneRunConfig) -> PathBuf {
    cfg.run.dir.join("export")
}

/// Builds, trains to `train.max_steps` (resuming from the newest checkpoint of the run folder), and
/// exports the fine-tuned pipeline (EMA weights when EMA is on). Data-parallel when launched as one
/// rank of several.
pub fn run_finetune<B: AutodiffBackend>(
    cfg: &FinetuneRunConfig,
    device: B::Device,
) -> Result<RunSummary, blipd_train::TrainError> {
    fit::<B>(cfg, device, blipd_train::join_from_env()?)
}

/// [`run_finetune`] in this process alone, whatever the environment says (a plan's evaluation
/// fine-tunes on rank 0 only).
pub fn run_finetune_single<B: AutodiffBackend>(
    cfg: &FinetuneRunConfig,
    device: B::Device,
) -> Result<RunSummary, blipd_train::TrainError> {
    fit::<B>(cfg, device, None)
}

fn fit<B: AutodiffBackend>(
    cfg: &FinetuneRunConfig,
    device: B::Device,
    dist: Option<blipd_train::dist_sync::DistSync>,
) -> Result<RunSummary, blipd_train::TrainError> {
    let parts = build::<B>(cfg, &device)?;
    let export = |trainer: &Trainer<B, Finetune<B>>| -> blipd_train::Result<()> {
        let out = export_dir(cfg);
        let base = &cfg.stage.model_dir;
        let stage = trainer.stage();
        match trainer.ema_model() {
            Some(ema) => export(stage, ema, base, &out)?,
            None => export(stage, trainer.model(), base, &out)?,
        };
        tracing::info!(
            "fine-tuned {} exported to {}",
            if cfg.stage.lora.is_some() {
                "LoRA"
            } else {
                "pipeline"
            },
            out.display()
        );
        Ok(())
    };
    blipd_train::fit(cfg, device, parts, dist, "fine-tuning model", export)
}

/// Links `from` to `to` (same filesystem), else copies it.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), Stage2Error> {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).map_err(io(from))?;
    }
    Ok(())
}

/// Copies `from` into `to` recursively, leaving out the top-level entries in `skip`.
fn copy_tree(from: &Path, to: &Path, skip: &[&str]) -> Result<(), Stage2Error> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for e in std::fs::read_dir(from).map_err(io(from))?.flatten() {
        let name = e.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if src.is_dir() {
            copy_tree(&src, &dst, &[])?;
        } else {
            link_or_copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// The run's export: [`export_lora`] with `[stage.lora]`, else [`export_finetuned`].
pub fn export<B: AutodiffBackend, M: Backend>(
    stage: &Finetune<B>,
    model: &FinetuneModel<M>,
    base: &Path,
    out: &Path,
) -> Result<PathBuf, Stage2Error> {
    if stage.config.lora.is_some() {
        export_lora(stage, model, base, out)
    } else {
        export_finetuned(stage, model, base, out)
    }
}

/// The trained subject embedding as `dir/ctx_embeddings_cache.safetensors` (LAVIS's cache).
fn write_ctx_cache<M: Backend>(model: &FinetuneModel<M>, dir: &Path) -> Result<(), Stage2Error> {
    let ctx = model.ctx.val().into_data().convert::<f32>();
    write_safetensors(
        &dir.join(CTX_CACHE_FILE),
        &[(CTX_CACHE_KEY.to_string(), ctx)],
        None,
    )?;
    Ok(())
}

/// What a LoRA fine-tuning run exports beside its adapter (`blipd_lora.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraExportInfo {
    /// The pipeline folder the adapter was trained on (`--model` of `blipd generate`).
    pub base_model: PathBuf,
    pub subject: String,
    pub rank: usize,
    /// `lora_alpha` during training; the written `lora_B` has `alpha / rank` folded in.
    pub alpha: f64,
    pub targets: Vec<blipd_models::lora::LoraTarget>,
    pub ctx_begin_pos: usize,
}

/// Name of [`LoraExportInfo`]'s file in a LoRA export.
pub const LORA_INFO_FILE: &str = "blipd_lora.json";

/// A LoRA run's export: the adapters ([`lora::LORA_FILE`]), the subject embedding
/// ([`CTX_CACHE_FILE`]) and [`LoraExportInfo`], nothing of the base.
pub fn export_lora<B: AutodiffBackend, M: Backend>(
    stage: &Finetune<B>,
    model: &FinetuneModel<M>,
    base: &Path,
    out: &Path,
) -> Result<PathBuf, Stage2Error> {
    let spec =
        stage.config.lora.as_ref().ok_or_else(|| {
            Stage2Error::Config("export_lora on a run without [stage.lora]".into())
        })?;
    replace_dir(out, |tmp| {
        let info = LoraExportInfo {
            base_model: base.to_path_buf(),
            subject: stage.config.subject.clone(),
            rank: spec.rank,
            alpha: spec.alpha.unwrap_or(spec.rank as f64),
            targets: spec.targets.clone(),
            ctx_begin_pos: stage.config.ctx_begin_pos,
        };
        lora::save_adapters(
            &model.unet,
            &tmp.join(lora::LORA_FILE),
            &[
                ("blipd_rank", spec.rank.to_string()),
                ("blipd_alpha", info.alpha.to_string()),
                ("blipd_alpha_folded_into_lora_B", "true".into()),
            ],
        )?;
        write_ctx_cache(model, tmp)?;
        blipd_models::write_json(&tmp.join(LORA_INFO_FILE), &info, None)?;
        Ok(())
    })
}

/// The fine-tuned pipeline: `base`'s components with `model`'s U-Net (and text encoder when trained),
/// the BERT vocabulary, and the subject embedding in [`CTX_CACHE_FILE`], named in `model_index.json`.
pub fn export_finetuned<B: AutodiffBackend, M: Backend>(
    stage: &Finetune<B>,
    model: &FinetuneModel<M>,
    base: &Path,
    out: &Path,
) -> Result<PathBuf, Stage2Error> {
    replace_dir(out, |tmp| {
        let mut skip = vec!["unet", "model_index.json", CTX_CACHE_FILE];
        if stage.config.train_text_encoder {
            skip.push("text_encoder");
        }
        copy_tree(base, tmp, &skip)?;
        model.unet.save_diffusers(&tmp.join("unet"))?;
        if stage.config.train_text_encoder {
            let t = tmp.join("text_encoder");
            std::fs::create_dir_all(&t).map_err(io(&t))?;
            link_or_copy(
                &base.join("text_encoder/config.json"),
                &t.join("config.json"),
            )?;
            model.text_encoder.save(&t.join("model.safetensors"))?;
        }
        let vocab = tmp.join("qformer/vocab.txt");
        if !vocab.is_file() {
            stage.bert_tokenizer.save_vocab(&tmp.join("qformer"))?;
        }
        write_ctx_cache(model, tmp)?;
        let idx_path = base.join("model_index.json");
        let mut index: serde_json::Value = if idx_path.is_file() {
            blipd_models::read_json(&idx_path)?
        } else {
            serde_json::json!({"_class_name": "BlipDiffusionPipeline"})
        };
        if let Some(obj) = index.as_object_mut() {
            obj.insert(CTX_CACHE_KEY.into(), CTX_CACHE_FILE.into());
            obj.insert(
                "_blipd_finetuned_subject".into(),
                stage.config.subject.clone().into(),
            );
        }
        blipd_models::write_json(&tmp.join("model_index.json"), &index, None)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_finetune_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/finetune");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap();
            let cfg: FinetuneRunConfig = blipd_train::parse_config(&text, &[])
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            let lora = e.path().to_string_lossy().contains("lora");
            assert_eq!(cfg.stage.lora.is_some(), lora, "{}", e.path().display());
            if let Some(spec) = cfg.stage.lora {
                assert_eq!((spec.rank, spec.scale()), (4, 1.0));
                assert_eq!(spec.targets, blipd_models::lora::LoraTarget::ALL.to_vec());
            }
            n += 1;
        }
        assert!(n >= 3);
        // Unknown LoRA keys are named.
        let e = blipd_train::parse_config::<FinetuneRunConfig>(
            "[stage]\nmodel_dir = \"m\"\nsubject = \"dog\"\n[stage.lora]\nrank = 4\nrnak = 2\n[data]\nimages = \"x\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("rnak"), "{e}");
    }
}
