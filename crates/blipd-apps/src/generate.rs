//! Zero-shot subject-driven generation: the equivalent of diffusers' `BlipDiffusionPipeline`
//! (0.33.1) and LAVIS `BlipDiffusion.generate` (model.md §1.8, §5.1).
//!
//! Dataflow for a batch of B requests:
//!
//! 1. reference image → `[B, 3, S, S]` normalised pixels ([`crate::preprocess`]);
//! 2. Q-Former (ViT + BERT queries cross-attending, subject text `[CLS] cond_subject [SEP]`) →
//!    ProjLayer → subject ("ctx") embeddings `[B, Q, D]`;
//! 3. prompt `"a {tgt_subject} {prompt}"` repeated `int(prompt_strength · prompt_reps)` times, joined by
//!    `", "`, tokenized to `77 − Q` tokens; ctx spliced after token `ctx_begin_pos` (2) → context CLIP
//!    text encoder → `[B, 77, D]`; negative prompt (no ctx) → `[B, 77, D]`; CFG batch `[uncond; cond]`;
//! 4. PLMS (PNDM, `skip_prk_steps`) over `num_inference_steps` (+1 network call), with
//!    `ε = ε_u + g·(ε_c − ε_u)` when `g > 1`;
//! 5. VAE decode of `latents / scaling_factor` → `(x/2 + 0.5).clamp(0, 1)`.

use std::path::Path;

use blipd_models::conditioning::{self, BlipDiffusionPrompt, TrainedConditioning};
use blipd_models::controlnet::{self, ControlNetModel};
use blipd_models::ctx_clip_text::{ContextClipTextModel, CTX_CACHE_FILE, CTX_CACHE_KEY};
use blipd_models::qformer::{Blip2Config, Blip2QFormerModel};
use blipd_models::sampling::{self, Control, Steps};
pub use blipd_models::sampling::{Sampler, StepInfo};
use blipd_models::schedulers::{
    DdimScheduler, DdimSchedulerConfig, PndmScheduler, PndmSchedulerConfig,
};
use blipd_models::tokenizers::{BertTokenizer, ClipTokenizer, TextNormalization};
use blipd_models::unet::{self, UNet2DConditionModel};
use blipd_models::vae::{to_uint8_image, AutoencoderKL, Uint8Images};
use blipd_models::weights::{DiffusersFolder, StateDict};
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::preprocess::{preprocess_reference, ReferenceResize, RgbImage, CLIP_MEAN, CLIP_STD};
use crate::AppError;

/// Sampling and prompt options (defaults = diffusers `BlipDiffusionPipeline.__call__`).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Classifier-free guidance scale; CFG runs only when `> 1` (7.5).
    pub guidance_scale: f64,
    /// PNDM steps (50); the U-Net runs `num_inference_steps + 1` times.
    pub num_inference_steps: usize,
    /// Output size in pixels (512 × 512). The latent size is `height // 2^(len(unet blocks) − 1)`, as
    /// diffusers computes it.
    pub height: usize,
    pub width: usize,
    /// Negative prompt for the unconditional branch (`""`).
    pub neg_prompt: String,
    /// Prompt amplification: the built prompt is repeated `int(prompt_strength · prompt_reps)` times.
    pub prompt_strength: f64,
    /// `None`: the model's own (`_blipd_prompt_reps` of a blipd export, else the released 20).
    pub prompt_reps: Option<usize>,
    /// Subject / prompt normalisation (diffusers: none; LAVIS notebooks: `blip_caption`).
    pub normalization: TextNormalization,
    /// Reference-image resize (diffusers squash vs LAVIS shorter side + centre crop).
    pub reference_resize: ReferenceResize,
    /// Seed for the initial latents when none are given (Burn's RNG; not torch's).
    pub seed: u64,
    /// Weight of the ControlNet residuals (diffusers `controlnet_conditioning_scale`, 1.0).
    pub controlnet_conditioning_scale: f64,
    /// The sampler: PNDM (diffusers' pipeline) or DDIM with η = 0 (LAVIS `use_ddim`, built from the
    /// same scheduler config as `DDIMScheduler.from_config`).
    pub sampler: Sampler,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            guidance_scale: 7.5,
            num_inference_steps: 50,
            height: 512,
            width: 512,
            neg_prompt: String::new(),
            prompt_strength: 1.0,
            prompt_reps: None,
            normalization: TextNormalization::None,
            reference_resize: ReferenceResize::Diffusers,
            seed: 42,
            controlnet_conditioning_scale: 1.0,
            sampler: Sampler::Pndm,
        }
    }
}

impl GenerateOptions {
    /// LAVIS `BlipDiffusion.generate` as its notebooks call it: shorter-side resize + centre crop and
    /// `blip_caption` text normalisation (other defaults are the same as diffusers').
    pub fn lavis() -> Self {
        Self {
            normalization: TextNormalization::lavis(),
            reference_resize: ReferenceResize::Lavis,
            ..Self::default()
        }
    }

    fn do_cfg(&self) -> bool {
        sampling::guided(self.guidance_scale)
    }

    /// The values that need no model to check: sizes above 0, at least one step, finite scales.
    /// [`BlipDiffusionPipeline::check_request`] adds the checks that depend on the networks.
    pub fn validate(&self) -> Result<(), AppError> {
        let bad = |m: String| Err(AppError::Request(m));
        if self.height == 0 || self.width == 0 {
            return bad(format!(
                "image size {}×{} (width × height): both must be positive",
                self.width, self.height
            ));
        }
        if self.num_inference_steps == 0 {
            return bad("--steps 0: at least one denoising step is needed".into());
        }
        for (name, v) in [
            ("guidance scale", self.guidance_scale),
            ("prompt strength", self.prompt_strength),
            (
                "ControlNet conditioning scale",
                self.controlnet_conditioning_scale,
            ),
        ] {
            if !v.is_finite() {
                return bad(format!("{name} {v} is not a finite number"));
            }
        }
        if self.prompt_strength < 0.0 {
            return bad(format!(
                "prompt strength {} must not be negative",
                self.prompt_strength
            ));
        }
        Ok(())
    }
}

/// Bytes of memory the system can still give (`MemAvailable` of `/proc/meminfo`), where known.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Result of a generation.
#[derive(Debug, Clone)]
pub struct GenerateOutput<B: Backend> {
    /// Images `[B, 3, H, W]` in `[0, 1]` (diffusers `output_type="pt"`).
    pub images: Tensor<B, 4>,
    /// Final latents `[B, 4, h, w]` (before the VAE).
    pub latents: Tensor<B, 4>,
}

impl<B: Backend> GenerateOutput<B> {
    /// 8-bit NHWC images, as diffusers' `output_type="pil"` produces them.
    pub fn to_uint8(&self) -> Result<Uint8Images, AppError> {
        // to_uint8_image expects [-1, 1]; images are already in [0, 1].
        Ok(to_uint8_image(
            self.images.clone().mul_scalar(2.0).sub_scalar(1.0),
        )?)
    }
}

/// The networks, tokenizers and scheduler of BLIP-Diffusion zero-shot generation.
#[derive(Debug)]
pub struct BlipDiffusionPipeline<B: Backend> {
    /// ViT + Q-Former + ProjLayer (diffusers `qformer/`).
    pub qformer: Blip2QFormerModel<B>,
    /// Context CLIP text encoder (`text_encoder/`).
    pub text_encoder: ContextClipTextModel<B>,
    pub unet: UNet2DConditionModel<B>,
    pub vae: AutoencoderKL<B>,
    /// Sampler config (`scheduler/scheduler_config.json`, else [`PndmSchedulerConfig::blip_diffusion`]).
    pub scheduler: PndmSchedulerConfig,
    /// The DDIM sampler's config: the folder's `scheduler_config.json` read as `DDIMScheduler`
    /// reads it (`from_config`: DDIM's defaults for what the file lacks).
    pub ddim_scheduler: DdimSchedulerConfig,
    /// CLIP tokenizer of the text encoder (`tokenizer/`).
    pub tokenizer: ClipTokenizer,
    /// BERT-uncased tokenizer of the Q-Former (+ `[DEC]`).
    pub qformer_tokenizer: BertTokenizer,
    /// ViT input size `S` (preprocessor `size`, else the vision config's `image_size`).
    pub image_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// How the model reads its prompt: the template, repetitions and splice position it was trained
    /// with (`ctx_begin_pos`, and a blipd export's `_blipd_prompt_template` / `_blipd_prompt_reps`;
    /// the released form otherwise), for its text encoder's positions and the Q-Former's queries.
    pub prompt: BlipDiffusionPrompt,
    /// Whether the Q-Former reads the subject's class text beside the image (true; a blipd export of
    /// the "without subject text" ablation sets `_blipd_subject_text: false`).
    pub subject_text: bool,
    /// A fine-tuned folder's cached subject embedding `[1, N, D]` (`ctx_embeddings_cache.safetensors`,
    /// written by `blipd finetune`): generation uses it instead of a reference image, as LAVIS does.
    pub ctx_cache: Option<Tensor<B, 3>>,
    /// A ControlNet (the folder's `controlnet/`, as `Salesforce/blipdiffusion-controlnet`, or one added
    /// with [`Self::with_controlnet`]) for structure-conditioned generation and stylization.
    pub controlnet: Option<ControlNetModel<B>>,
    pub device: B::Device,
}

fn folder_err(path: &Path, message: impl Into<String>) -> AppError {
    AppError::Folder {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn rgb_triplet(
    v: Option<&serde_json::Value>,
    what: &str,
    path: &Path,
) -> Result<Option<[f32; 3]>, AppError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Array(a)) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| folder_err(path, format!("`{what}` holds a non-number")))?
                    as f32;
            }
            Ok(Some(out))
        }
        Some(serde_json::Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(0.0) as f32;
            Ok(Some([x; 3]))
        }
        Some(other) => Err(folder_err(
            path,
            format!("`{what}` must be 3 numbers, got {other}"),
        )),
    }
}

/// A fine-tuned subject embedding (`ctx_embeddings_cache.safetensors`): `[1, q, D]` for a Q-Former of
/// `q` queries.
fn read_ctx_cache<B: Backend>(
    path: &Path,
    q: usize,
    device: &B::Device,
) -> Result<Tensor<B, 3>, AppError> {
    let sd = StateDict::read(path)?;
    let data = sd.data(CTX_CACHE_KEY)?.convert::<f32>();
    let shape = data.shape.clone();
    if shape.len() != 3 || shape[0] != 1 || shape[1] != q {
        return Err(folder_err(
            path,
            format!("`{CTX_CACHE_KEY}` has shape {shape:?}, expected [1, {q}, D]"),
        ));
    }
    Ok(Tensor::<B, 3>::from_data(data, device))
}

impl<B: Backend> BlipDiffusionPipeline<B> {
    /// Load a diffusers BlipDiffusion folder (a local copy of `Salesforce/blipdiffusion`):
    /// `qformer/`, `text_encoder/`, `unet/`, `vae/`, `tokenizer/`, optional `scheduler/` and
    /// `image_processor/`, `model_index.json` (`ctx_begin_pos`, `mean`, `std`; blipd exports add
    /// `_blipd_prompt_template`, `_blipd_prompt_reps`).
    ///
    /// The Q-Former's BERT vocabulary is not part of the released folder: it is looked up as
    /// `qformer/vocab.txt`, then `bert_vocab`, then `$BLIPD_BERT_VOCAB`.
    pub fn load(
        dir: &Path,
        bert_vocab: Option<&Path>,
        device: &B::Device,
    ) -> Result<Self, AppError> {
        let folder = DiffusersFolder::open(dir)?;
        let missing: Vec<String> = ["qformer", "text_encoder", "unet", "vae", "tokenizer"]
            .iter()
            .filter(|c| !dir.join(c).is_dir())
            .map(|c| format!("{c}/"))
            .collect();
        if !missing.is_empty() {
            return Err(folder_err(
                dir,
                format!(
                    "not a BlipDiffusion pipeline folder: no {} (it needs qformer/, text_encoder/, unet/, \
                     vae/ and tokenizer/: a local copy of Salesforce/blipdiffusion or a blipd export)",
                    missing.join(", ")
                ),
            ));
        }

        let qdir = folder.component("qformer");
        let qcfg = Blip2Config::from_file(&qdir.config_path())?;
        let qformer = qcfg
            .init::<B>(device)?
            .load_state_dict(StateDict::read(&qdir.weight_file()?)?)?;

        let text_encoder = ContextClipTextModel::from_dir(&dir.join("text_encoder"), device)?;
        let unet = unet::load(&folder.component("unet"), device)?;
        let (vae, _) = AutoencoderKL::load(&folder.component("vae"), device)?;

        let sched_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler = if sched_path.is_file() {
            PndmSchedulerConfig::from_file(&sched_path)?
        } else {
            PndmSchedulerConfig::blip_diffusion()
        };
        PndmScheduler::<B>::new(scheduler.clone())?; // validate now, not at the first step
        let ddim_scheduler = if sched_path.is_file() {
            DdimSchedulerConfig::from_file(&sched_path)?
        } else {
            DdimSchedulerConfig {
                num_train_timesteps: scheduler.num_train_timesteps,
                beta_start: scheduler.beta_start,
                beta_end: scheduler.beta_end,
                beta_schedule: scheduler.beta_schedule,
                trained_betas: scheduler.trained_betas.clone(),
                set_alpha_to_one: scheduler.set_alpha_to_one,
                steps_offset: scheduler.steps_offset,
                prediction_type: scheduler.prediction_type,
                timestep_spacing: scheduler.timestep_spacing,
                ..DdimSchedulerConfig::default()
            }
        };
        DdimScheduler::new(ddim_scheduler.clone())?;

        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let qformer_tokenizer = BertTokenizer::resolve(Some(dir), bert_vocab)?;

        let mut image_size = qcfg.vision_config.image_size;
        let (mut image_mean, mut image_std) = (CLIP_MEAN, CLIP_STD);
        let pp = dir.join("image_processor").join("preprocessor_config.json");
        if pp.is_file() {
            let v: serde_json::Value = blipd_models::read_json(&pp)?;
            if let Some(size) = v.get("size") {
                let (h, w) = (
                    size.get("height").and_then(|x| x.as_u64()),
                    size.get("width").and_then(|x| x.as_u64()),
                );
                match (h, w) {
                    (Some(h), Some(w)) if h == w => image_size = h as usize,
                    _ => {
                        return Err(folder_err(
                            &pp,
                            format!("`size` must be a square {{height, width}}, got {size}"),
                        ))
                    }
                }
            }
            if let Some(m) = rgb_triplet(v.get("image_mean"), "image_mean", &pp)? {
                image_mean = m;
            }
            if let Some(s) = rgb_triplet(v.get("image_std"), "image_std", &pp)? {
                image_std = s;
            }
        }
        let idx = dir.join("model_index.json");
        if let Some(m) = rgb_triplet(folder.index.get("mean"), "mean", &idx)? {
            image_mean = m;
        }
        if let Some(s) = rgb_triplet(folder.index.get("std"), "std", &idx)? {
            image_std = s;
        }
        if image_size != qcfg.vision_config.image_size {
            return Err(folder_err(
                &pp,
                format!(
                    "image processor size {image_size} differs from the ViT's image_size {}",
                    qcfg.vision_config.image_size
                ),
            ));
        }
        let trained = TrainedConditioning::from_index(&folder.index)
            .map_err(|e| folder_err(&idx, e.to_string()))?;
        let prompt = trained.prompt(qcfg.num_query_tokens, text_encoder.max_position_embeddings);
        let subject_text = trained.subject_text;
        let cache_path = dir.join(CTX_CACHE_FILE);
        let ctx_cache = if cache_path.is_file() {
            Some(read_ctx_cache(&cache_path, qcfg.num_query_tokens, device)?)
        } else {
            None
        };

        let controlnet = if dir.join("controlnet").join("config.json").is_file() {
            Some(controlnet::load(&folder.component("controlnet"), device)?)
        } else {
            None
        };

        Ok(Self {
            controlnet,
            ctx_cache,
            qformer,
            text_encoder,
            unet,
            vae,
            scheduler,
            ddim_scheduler,
            tokenizer,
            qformer_tokenizer,
            image_size,
            image_mean,
            image_std,
            prompt,
            subject_text,
            device: device.clone(),
        })
    }

    /// Applies a LoRA to the U-Net, fused at `weight` (diffusers' `lora_scale`; 1 = as trained): a
    /// diffusers/PEFT LoRA file or folder ([`blipd_models::lora::LoraWeights::read`]), or the folder
    /// `blipd finetune --lora` exports, whose `ctx_embeddings_cache.safetensors` (beside the adapter)
    /// becomes the cached subject embedding, as a fine-tuned pipeline folder's does.
    pub fn with_lora(mut self, path: &Path, weight: f64) -> Result<Self, AppError> {
        let lora = blipd_models::lora::LoraWeights::read(path)?;
        let unet = self.unet;
        self.unet = blipd_models::lora::apply(
            unet,
            &lora,
            weight,
            blipd_models::lora::ApplyMode::Fuse,
            &self.device,
        )?;
        tracing::info!(
            "LoRA {} fused at weight {weight}: {} projections, rank {}, {} parameters",
            lora.source.display(),
            lora.modules.len(),
            lora.rank(),
            lora.num_params()
        );
        let cache = lora
            .source
            .parent()
            .map(|d| d.join(CTX_CACHE_FILE))
            .filter(|p| p.is_file());
        if let Some(cache) = cache {
            if self.ctx_cache.is_some() {
                tracing::warn!(
                    "{}: replaces the model folder's cached subject embedding",
                    cache.display()
                );
            }
            self.ctx_cache = Some(read_ctx_cache(
                &cache,
                self.prompt.num_ctx_tokens,
                &self.device,
            )?);
        }
        Ok(self)
    }

    /// Adds (or replaces) the ControlNet from a diffusers `ControlNetModel` folder (config.json + weights,
    /// e.g. a local copy of `lllyasviel/sd-controlnet-canny`).
    pub fn with_controlnet(mut self, dir: &Path) -> Result<Self, AppError> {
        let component = blipd_models::weights::ComponentDir {
            name: "controlnet".into(),
            dir: dir.to_path_buf(),
        };
        self.controlnet = Some(controlnet::load(&component, &self.device)?);
        Ok(self)
    }

    /// A ControlNet condition image (edges, depth, …) as diffusers prepares it: Pillow bicubic resize
    /// to `width`×`height`, `/255`, no normalisation → `[1, 3, H, W]` in `[0, 1]`.
    pub fn control_image(
        &self,
        image: &RgbImage,
        height: usize,
        width: usize,
    ) -> Result<Tensor<B, 4>, AppError> {
        let img = image.resize_bicubic(width, height)?;
        let plane = height * width;
        let mut v = vec![0f32; 3 * plane];
        for (i, px) in img.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                v[c * plane + i] = f32::from(px[c]) / 255.0;
            }
        }
        Ok(Tensor::from_data(
            TensorData::new(v, [1, 3, height, width]),
            &self.device,
        ))
    }

    /// Reference image → normalised pixels `[1, 3, S, S]`.
    pub fn preprocess(
        &self,
        image: &RgbImage,
        mode: ReferenceResize,
    ) -> Result<Tensor<B, 4>, AppError> {
        preprocess_reference(
            image,
            self.image_size,
            mode,
            self.image_mean,
            self.image_std,
            &self.device,
        )
    }

    /// The subject embeddings `[1, Q, D]` of one reference image and its category, preprocessed and
    /// its subject text normalised as `opts` says (diffusers' or LAVIS's).
    pub fn reference_embedding(
        &self,
        reference: &RgbImage,
        subject: &str,
        opts: &GenerateOptions,
    ) -> Result<Tensor<B, 3>, AppError> {
        let pixels = self.preprocess(reference, opts.reference_resize)?;
        self.subject_embeddings(pixels, &[subject], opts.normalization)
    }

    /// Subject embeddings `[B, Q, D]` from reference pixels `[B or 1, 3, S, S]` (a single image is
    /// shared by all B subjects) and the source subject categories.
    pub fn subject_embeddings(
        &self,
        pixels: Tensor<B, 4>,
        cond_subjects: &[&str],
        normalization: TextNormalization,
    ) -> Result<Tensor<B, 3>, AppError> {
        let b = cond_subjects.len();
        let [pb, c, h, w] = pixels.dims();
        if b == 0 {
            return Err(AppError::Request("no subjects".into()));
        }
        if (c, h, w) != (3, self.image_size, self.image_size) {
            return Err(AppError::Request(format!(
                "reference pixels are [{pb}, {c}, {h}, {w}]; expected [B, 3, {s}, {s}]",
                s = self.image_size
            )));
        }
        let pixels = match pb {
            _ if pb == b => pixels,
            1 => pixels.repeat_dim(0, b),
            _ => {
                return Err(AppError::Request(format!(
                    "{pb} reference images for {b} subjects (give one, or one per subject)"
                )))
            }
        };
        let subjects: Vec<String> = cond_subjects
            .iter()
            .map(|s| normalization.apply(s))
            .collect();
        let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
        Ok(conditioning::subject_embeddings(
            &self.qformer,
            &self.qformer_tokenizer,
            pixels,
            self.subject_text.then_some(&refs[..]),
        )?)
    }

    /// The model's prompt ([`Self::prompt`]) with the request's strength, repetitions and
    /// normalisation.
    fn prompt_builder(&self, opts: &GenerateOptions) -> BlipDiffusionPrompt {
        BlipDiffusionPrompt {
            prompt_strength: opts.prompt_strength,
            prompt_reps: opts.prompt_reps.unwrap_or(self.prompt.prompt_reps),
            normalization: opts.normalization,
            ..self.prompt.clone()
        }
    }

    /// Conditional text embeddings `[B, 77, D]`: each prompt built with its target subject, the
    /// subject embeddings spliced in ([`conditioning::condition`], the path training takes).
    pub fn encode_prompt(
        &self,
        ctx: Tensor<B, 3>,
        prompts: &[&str],
        tgt_subjects: &[&str],
        opts: &GenerateOptions,
    ) -> Result<Tensor<B, 3>, AppError> {
        let [cb, _, _] = ctx.dims();
        if cb != prompts.len() {
            return Err(AppError::Request(format!(
                "{cb} subject embeddings for {} prompts",
                prompts.len()
            )));
        }
        Ok(conditioning::condition(
            &self.text_encoder,
            &self.tokenizer,
            &self.prompt_builder(opts),
            ctx,
            prompts,
            tgt_subjects,
            &vec![true; prompts.len()],
        )?)
    }

    /// Unconditional text embeddings `[batch, 77, D]` of the negative prompt (no subject embeddings).
    pub fn encode_negative(
        &self,
        neg_prompt: &str,
        batch: usize,
        opts: &GenerateOptions,
    ) -> Result<Tensor<B, 3>, AppError> {
        Ok(conditioning::negative_states(
            &self.text_encoder,
            &self.tokenizer,
            &self.prompt_builder(opts),
            neg_prompt,
            batch,
        )?)
    }

    /// With guidance, `[uncond; cond]` (`[2B, 77, D]`) for conditional states `cond` (`[B, 77, D]`);
    /// without, `cond`.
    fn with_negative(
        &self,
        cond: Tensor<B, 3>,
        opts: &GenerateOptions,
    ) -> Result<Tensor<B, 3>, AppError> {
        Ok(conditioning::with_negative(
            &self.text_encoder,
            &self.tokenizer,
            &self.prompt_builder(opts),
            cond,
            opts.do_cfg().then_some(opts.neg_prompt.as_str()),
        )?)
    }

    /// The conditioning of prompts *without* subject embeddings — each prompt alone, as the dropped
    /// samples of stage 2 train (15 % in the paper): `[uncond; text]` with CFG, else `text`.
    pub fn text_only_embeddings(
        &self,
        prompts: &[&str],
        opts: &GenerateOptions,
    ) -> Result<Tensor<B, 3>, AppError> {
        let max = self.text_encoder.max_position_embeddings;
        for p in prompts {
            let dropped = self.tokenizer.overflow(p.trim(), max)?;
            if dropped > 0 {
                return Err(AppError::Request(format!(
                    "prompt {p:?} is {dropped} tokens over the text encoder's {max}"
                )));
            }
        }
        let prompt = self.prompt_builder(opts);
        let rows = prompts
            .iter()
            .map(|p| prompt.text_only(&self.tokenizer, p))
            .collect::<Result<Vec<_>, _>>()?;
        let cond = conditioning::encode_rows(&self.text_encoder, &rows, None)?;
        self.with_negative(cond, opts)
    }

    /// The U-Net conditioning: `[uncond; cond]` (`[2B, 77, D]`) with CFG, else `cond` (`[B, 77, D]`).
    pub fn text_embeddings(
        &self,
        ctx: Tensor<B, 3>,
        prompts: &[&str],
        tgt_subjects: &[&str],
        opts: &GenerateOptions,
    ) -> Result<Tensor<B, 3>, AppError> {
        let cond = self.encode_prompt(ctx, prompts, tgt_subjects, opts)?;
        self.with_negative(cond, opts)
    }

    /// Pixels per latent pixel: `2^(len(unet.block_out_channels) − 1)` (8 for SD-1.5), as diffusers'
    /// BLIP-Diffusion pipeline computes it.
    pub fn latent_factor(&self) -> usize {
        1usize << self.unet.config.block_out_channels.len().saturating_sub(1)
    }

    /// Everything about a request that can be wrong, checked before anything is allocated for it:
    /// [`GenerateOptions::validate`], then the size against the networks: a multiple of
    /// [`Self::latent_factor`], at least the size at which the U-Net's deepest level is one latent
    /// pixel, and (on the CPU, where attention materialises its scores) a lower bound of the peak
    /// memory within what the system has available.
    pub fn check_request(&self, batch: usize, opts: &GenerateOptions) -> Result<(), AppError> {
        opts.validate()?;
        if batch == 0 {
            return Err(AppError::Request("no prompt to generate".into()));
        }
        let f = self.latent_factor();
        let (h, w) = (opts.height, opts.width);
        if h % f != 0 || w % f != 0 {
            return Err(AppError::Request(format!(
                "image size {w}×{h} (width × height) must be a multiple of {f} (the VAE's latent \
                 factor); e.g. {}×{}",
                w.div_ceil(f) * f,
                h.div_ceil(f) * f
            )));
        }
        let levels = self.unet.config.block_out_channels.len().saturating_sub(1);
        let min = f << levels;
        if h < min || w < min {
            return Err(AppError::Request(format!(
                "image size {w}×{h} (width × height) is below this U-Net's minimum of {min}×{min}: \
                 it halves the latents {levels} times"
            )));
        }
        if B::name(&self.device).to_lowercase().contains("cuda") {
            return Ok(());
        }
        let Some(avail) = available_memory() else {
            return Ok(());
        };
        let need = self.peak_memory_lower_bound(batch, opts);
        if need > avail as f64 {
            return Err(AppError::Request(format!(
                "image size {w}×{h} (width × height), batch {batch}: needs at least {:.1} GiB, \
                 {:.1} GiB available (the attention scores of the U-Net's highest-resolution \
                 level grow with the fourth power of the side)",
                need / f64::from(1u32 << 30),
                avail as f64 / f64::from(1u32 << 30)
            )));
        }
        Ok(())
    }

    /// A lower bound of the peak bytes a request needs with materialised attention: the larger of
    /// the U-Net's first self-attention scores (`[B·cfg, heads, L, L]` f32, L latent pixels at the
    /// first attention level) and the decoded images.
    fn peak_memory_lower_bound(&self, batch: usize, opts: &GenerateOptions) -> f64 {
        let c = &self.unet.config;
        let f = self.latent_factor() as f64;
        let n = c.block_out_channels.len();
        let heads = c
            .num_attention_heads
            .as_ref()
            .unwrap_or(&c.attention_head_dim)
            .per_block(n, "attention_head_dim")
            .unwrap_or_else(|_| vec![1; n]);
        let rows = if opts.do_cfg() { 2 * batch } else { batch } as f64;
        let (h, w) = (opts.height as f64 / f, opts.width as f64 / f);
        let scores = c
            .down_block_types
            .iter()
            .position(|t| t.contains("Attn"))
            .map(|i| {
                let l = (h / f64::from(1u32 << i)) * (w / f64::from(1u32 << i));
                rows * heads.get(i).copied().unwrap_or(1) as f64 * l * l * 4.0
            })
            .unwrap_or(0.0);
        let images = batch as f64 * 3.0 * opts.height as f64 * opts.width as f64 * 4.0;
        scores.max(images)
    }

    /// Latent shape for `batch` images of `height × width` pixels (diffusers: the size is divided by
    /// `2^(len(unet.block_out_channels) − 1)`, floor).
    pub fn latent_shape(&self, batch: usize, height: usize, width: usize) -> [usize; 4] {
        let f = self.latent_factor();
        [batch, self.unet.config.in_channels, height / f, width / f]
    }

    /// Standard-normal initial latents from Burn's RNG seeded with `seed` (× `init_noise_sigma` = 1).
    pub fn initial_latents(&self, batch: usize, opts: &GenerateOptions) -> Tensor<B, 4> {
        B::seed(&self.device, opts.seed);
        Tensor::random(
            self.latent_shape(batch, opts.height, opts.width),
            Distribution::Normal(0.0, 1.0),
            &self.device,
        )
    }

    /// The PLMS loop: `latents` `[B, 4, h, w]`, `text_embeddings` from [`Self::text_embeddings`].
    /// `on_step` sees every network call.
    pub fn denoise(
        &self,
        latents: Tensor<B, 4>,
        text_embeddings: Tensor<B, 3>,
        opts: &GenerateOptions,
        on_step: &mut dyn FnMut(StepInfo<'_, B>),
    ) -> Result<Tensor<B, 4>, AppError> {
        self.denoise_controlled(latents, text_embeddings, None, opts, on_step)
    }

    /// [`Self::denoise`] with an optional ControlNet condition `control` (`[B or 1, 3, H, W]` in
    /// `[0, 1]`, from [`Self::control_image`]): each step the ControlNet sees the same latents, timestep
    /// and text as the U-Net (duplicated for guidance, as diffusers' `BlipDiffusionControlNetPipeline`)
    /// and its residuals, × `controlnet_conditioning_scale`, are added to the U-Net's skips.
    pub fn denoise_controlled(
        &self,
        latents: Tensor<B, 4>,
        text_embeddings: Tensor<B, 3>,
        control: Option<Tensor<B, 4>>,
        opts: &GenerateOptions,
        on_step: &mut dyn FnMut(StepInfo<'_, B>),
    ) -> Result<Tensor<B, 4>, AppError> {
        let control = match control {
            None => None,
            Some(image) => Some(Control {
                net: self.controlnet.as_ref().ok_or_else(|| {
                    AppError::Request(
                        "a condition image needs a ControlNet (the folder's controlnet/ or --controlnet)"
                            .into(),
                    )
                })?,
                image,
                scale: opts.controlnet_conditioning_scale,
            }),
        };
        let scheduler = match opts.sampler {
            Sampler::Pndm => {
                let mut s = PndmScheduler::<B>::new(self.scheduler.clone())?;
                s.set_timesteps(opts.num_inference_steps)?;
                Steps::Pndm(s)
            }
            Sampler::Ddim => {
                let mut s = DdimScheduler::new(self.ddim_scheduler.clone())?;
                s.set_timesteps(opts.num_inference_steps)?;
                Steps::Ddim(s)
            }
        };
        Ok(sampling::denoise(
            &self.unet,
            control,
            scheduler,
            latents,
            text_embeddings,
            opts.guidance_scale,
            on_step,
        )?)
    }

    /// VAE decode of diffusion latents → images in `[0, 1]` (`(x/2 + 0.5).clamp(0, 1)`).
    pub fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        self.vae
            .decode_latents(latents)
            .div_scalar(2.0)
            .add_scalar(0.5)
            .clamp(0.0, 1.0)
    }

    /// Generate from precomputed subject embeddings `[B, Q, D]` (e.g. a fine-tuned model's
    /// `ctx_embeddings_cache`, or an interpolation of several subjects).
    pub fn generate_with_ctx(
        &self,
        ctx: Tensor<B, 3>,
        tgt_subjects: &[&str],
        prompts: &[&str],
        opts: &GenerateOptions,
        latents: Option<Tensor<B, 4>>,
        on_step: &mut dyn FnMut(StepInfo<'_, B>),
    ) -> Result<GenerateOutput<B>, AppError> {
        self.generate_with_ctx_controlled(ctx, tgt_subjects, prompts, None, opts, latents, on_step)
    }

    /// [`Self::generate_with_ctx`] with a ControlNet condition image (see [`Self::denoise_controlled`]):
    /// diffusers' `BlipDiffusionControlNetPipeline`, and BLIP-Diffusion's stylization when the subject
    /// embeddings come from a style image.
    #[allow(clippy::too_many_arguments)]
    pub fn generate_with_ctx_controlled(
        &self,
        ctx: Tensor<B, 3>,
        tgt_subjects: &[&str],
        prompts: &[&str],
        control: Option<Tensor<B, 4>>,
        opts: &GenerateOptions,
        latents: Option<Tensor<B, 4>>,
        on_step: &mut dyn FnMut(StepInfo<'_, B>),
    ) -> Result<GenerateOutput<B>, AppError> {
        let b = prompts.len();
        self.check_request(b, opts)?;
        let text = self.text_embeddings(ctx, prompts, tgt_subjects, opts)?;
        let latents = match latents {
            Some(l) => {
                let expected = self.latent_shape(b, opts.height, opts.width);
                if l.dims() != expected {
                    return Err(AppError::Request(format!(
                        "latents {:?}, expected {expected:?} for {b} images of {}×{}",
                        l.dims(),
                        opts.width,
                        opts.height
                    )));
                }
                l
            }
            None => self.initial_latents(b, opts),
        };
        let latents = self.denoise_controlled(latents, text, control, opts, on_step)?;
        Ok(GenerateOutput {
            images: self.decode(latents.clone()),
            latents,
        })
    }

    /// Subject interpolation (LAVIS `forward_ctx_embeddings` with several (image, subject) pairs): the
    /// weighted sum of subject embeddings `[1, Q, D]` with `ratios` summing to 1 (uniform when empty).
    pub fn mix_subject_embeddings(
        ctxs: Vec<Tensor<B, 3>>,
        ratios: &[f64],
    ) -> Result<Tensor<B, 3>, AppError> {
        let n = ctxs.len();
        if n == 0 {
            return Err(AppError::Request("no subject embeddings to mix".into()));
        }
        let ratios: Vec<f64> = if ratios.is_empty() {
            vec![1.0 / n as f64; n]
        } else {
            ratios.to_vec()
        };
        if ratios.len() != n {
            return Err(AppError::Request(format!(
                "{} ratios for {n} subjects",
                ratios.len()
            )));
        }
        let sum: f64 = ratios.iter().sum();
        if (sum - 1.0).abs() > 1e-6 || ratios.iter().any(|r| !r.is_finite()) {
            return Err(AppError::Request(format!(
                "subject ratios {ratios:?} must be finite and sum to 1 (they sum to {sum})"
            )));
        }
        let mut it = ctxs.into_iter().zip(ratios);
        let (first, r0) = it.next().expect("n > 0");
        Ok(it.fold(first.mul_scalar(r0), |acc, (c, r)| acc + c.mul_scalar(r)))
    }

    /// Generation with a fine-tuned folder's cached subject embedding ([`Self::ctx_cache`]), one image
    /// per prompt.
    pub fn generate_cached(
        &self,
        tgt_subjects: &[&str],
        prompts: &[&str],
        opts: &GenerateOptions,
        latents: Option<Tensor<B, 4>>,
        on_step: &mut dyn FnMut(StepInfo<'_, B>),
    ) -> Result<GenerateOutput<B>, AppError> {
        let ctx = self.ctx_cache.clone().ok_or_else(|| {
            AppError::Request(
                "this pipeline folder has no ctx_embeddings_cache (not a fine-tuned model): give a \
                 reference image"
                    .into(),
            )
        })?;
        let ctx = ctx.repeat_dim(0, prompts.len());
        self.generate_with_ctx(ctx, tgt_subjects, prompts, opts, latents, on_step)
    }

    /// Batched zero-shot generation from preprocessed reference pixels (`[B or 1, 3, S, S]`).
    #[allow(clippy::too_many_arguments)]
    pub fn generate_batch(
        &self,
        pixels: Tensor<B, 4>,
        cond_subjects: &[&str],
        tgt_subjects: &[&str],
        prompts: &[&str],
        opts: &GenerateOptions,
        latents: Option<Tensor<B, 4>>,
        on_step: &mut dyn FnMut(StepInfo<'_, B>),
    ) -> Result<GenerateOutput<B>, AppError> {
        if cond_subjects.len() != prompts.len() || tgt_subjects.len() != prompts.len() {
            return Err(AppError::Request(format!(
                "{} prompts, {} source subjects, {} target subjects (must be equal)",
                prompts.len(),
                cond_subjects.len(),
                tgt_subjects.len()
            )));
        }
        let ctx = self.subject_embeddings(pixels, cond_subjects, opts.normalization)?;
        self.generate_with_ctx(ctx, tgt_subjects, prompts, opts, latents, on_step)
    }

    /// One image: `reference` shows a `cond_subject` (e.g. "dog"); the output shows `tgt_subject`
    /// (usually the same word) doing `prompt`.
    pub fn generate(
        &self,
        reference: &RgbImage,
        cond_subject: &str,
        tgt_subject: &str,
        prompt: &str,
        opts: &GenerateOptions,
        latents: Option<Tensor<B, 4>>,
    ) -> Result<GenerateOutput<B>, AppError> {
        let pixels = self.preprocess(reference, opts.reference_resize)?;
        self.generate_batch(
            pixels,
            &[cond_subject],
            &[tgt_subject],
            &[prompt],
            opts,
            latents,
            &mut |_| {},
        )
    }
}
