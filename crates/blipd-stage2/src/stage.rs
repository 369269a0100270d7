//! The stage-2 [`Stage`] implementation: diffusion loss on (composite → original) pairs.

use blipd_models::conditioning::{self, BlipDiffusionPrompt};
use blipd_models::ctx_clip_text::ClipTextConfig;
use blipd_models::qformer::Blip2Config;
use blipd_models::sampling::{self, Steps};
use blipd_models::schedulers::ddpm::DdpmScheduler;
use blipd_models::tokenizers::{BertTokenizer, ClipTokenizer};
use blipd_models::vae::{AutoencoderKL, VaeConfig};
use blipd_train::{SampleContext, Stage, StepOutput, TrainRng};
use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Distribution;
use rand::Rng;

use crate::checkpoint::InnerGrads;
use crate::config::Stage2Config;
use crate::model::{Stage2Components, Stage2Model};
use crate::Stage2Error;

pub use blipd_data::preprocess::{clip_input, clip_pixels_to_rgb, vae_target, CLIP_MEAN, CLIP_STD};

/// One micro-batch of stage 2, on the host.
#[derive(Clone, Debug)]
pub struct Stage2Batch {
    /// Subject composites for the vision tower, `[B, 3, S, S]`, CLIP-normalised.
    pub input: TensorData,
    /// The diffusion targets: the original images for the frozen VAE, or their cached posterior.
    pub target: Targets,
    /// Class names ("dog"), fed to the Q-Former and named in the prompt.
    pub subjects: Vec<String>,
    /// Captions (the text prompt).
    pub captions: Vec<String>,
    /// One random stream per sample (`[data] per_sample_rng`): the sample's timestep, subject-drop
    /// decision, VAE posterior noise and diffusion noise are drawn from it instead of from the rank's
    /// stage stream and the backend generator, so they depend only on the sample's global position
    /// and a run gives the same numbers whatever its number of ranks. `None`: the rank's stream.
    pub sample_rngs: Option<Vec<TrainRng>>,
}

/// A batch's diffusion targets.
#[derive(Clone, Debug)]
pub enum Targets {
    /// Original images `[B, 3, H, W]` in [−1, 1], encoded by the frozen VAE in the step.
    Pixels(TensorData),
    /// Their VAE posterior, cached by `blipd data encode-latents`: mean and std, `[B, C, h, w]`.
    /// The step samples `mean + std·ε` with its own noise, as it does from an encoded posterior.
    Moments { mean: TensorData, std: TensorData },
}

/// The target latents' distribution in a step: encoded now, or read from the cache.
#[derive(Clone, Debug)]
pub enum TargetPosterior<B: Backend> {
    Encoded(blipd_models::vae::DiagonalGaussian<B>),
    Cached {
        mean: Tensor<B, 4>,
        std: Tensor<B, 4>,
    },
}

impl<B: Backend> TargetPosterior<B> {
    pub fn shape(&self) -> burn::tensor::Shape {
        match self {
            TargetPosterior::Encoded(p) => p.mean.shape(),
            TargetPosterior::Cached { mean, .. } => mean.shape(),
        }
    }

    /// `mean + std·noise` (the encoded posterior's own `sample`, the same arithmetic).
    pub fn sample(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            TargetPosterior::Encoded(p) => p.sample(noise),
            TargetPosterior::Cached { mean, std } => mean.clone() + std.clone() * noise,
        }
    }
}

impl<B: Backend> From<blipd_models::vae::DiagonalGaussian<B>> for TargetPosterior<B> {
    fn from(p: blipd_models::vae::DiagonalGaussian<B>) -> Self {
        TargetPosterior::Encoded(p)
    }
}

impl Stage2Batch {
    pub fn len(&self) -> usize {
        self.subjects.len()
    }
    pub fn is_empty(&self) -> bool {
        self.subjects.is_empty()
    }
}

/// Stage 2: owns the frozen VAE (on the inner backend: no autodiff graph), the noise schedule and
/// the tokenizers; the trainer owns [`Stage2Model`].
pub struct Stage2<B: AutodiffBackend> {
    pub config: Stage2Config,
    pub vae: AutoencoderKL<B::InnerBackend>,
    pub vae_config: VaeConfig,
    /// Configs of the Q-Former composite and the text encoder (for [`crate::export::export_pipeline`]).
    pub blip_config: Blip2Config,
    pub text_config: ClipTextConfig,
    pub ddpm: DdpmScheduler,
    pub clip_tokenizer: ClipTokenizer,
    pub bert_tokenizer: BertTokenizer,
    /// How captions and subject embeddings become the CLIP prompt (the `[stage]` template).
    pub prompt: BlipDiffusionPrompt,
    pub image_size: usize,
    pub target_size: usize,
    /// Pixels per latent cell (8 for SD-1.5's VAE).
    pub latent_factor: usize,
    pub device: B::Device,
    /// Validation inputs for [`Stage::sample`]: (subject image `[3,S,S]`, subject, prompt).
    pub sample_inputs: Vec<(Vec<f32>, String, String)>,
    /// Matrix products in this dtype during the forward pass (`[train] mixed_precision`; see
    /// [`blipd_models::amp`]).
    pub autocast: Option<burn::tensor::FloatDType>,
}

impl<B: AutodiffBackend> Stage2<B> {
    /// Split loaded components into the stage and its trainable model.
    pub fn new(
        config: Stage2Config,
        parts: Stage2Components<B>,
        target_size: usize,
        device: B::Device,
    ) -> Result<(Self, Stage2Model<B>), Stage2Error> {
        config.validate()?;
        let factor = parts.vae_config.downsample_factor();
        if target_size == 0 || !target_size.is_multiple_of(factor) {
            return Err(Stage2Error::Config(format!(
                "[data] target_size = {target_size}: must be a positive multiple of {factor} (the \
                 VAE's down-sampling factor)"
            )));
        }
        let prompt = config
            .trained_conditioning()
            .prompt(parts.num_ctx, parts.max_text_len);
        let model = parts.model.with_frozen(&config);
        let stage = Self {
            vae: parts.vae.valid(),
            vae_config: parts.vae_config.clone(),
            blip_config: parts.blip_config,
            text_config: parts.text_config,
            ddpm: DdpmScheduler::sd15(),
            clip_tokenizer: parts.clip_tokenizer,
            bert_tokenizer: parts.bert_tokenizer,
            prompt,
            image_size: parts.image_size,
            target_size,
            latent_factor: parts.vae_config.downsample_factor(),
            device,
            sample_inputs: Vec::new(),
            autocast: None,
            config,
        };
        Ok((stage, model))
    }

    /// Text-encoder hidden states `[B, max_len, D]` for the batch: subject embeddings spliced into
    /// the conditional prompt, or the text-only prompt where `keep[i]` is false
    /// ([`blipd_models::conditioning::condition`], the path generation takes too).
    pub fn prompt_states<BB: Backend>(
        &self,
        text_encoder: &blipd_models::ctx_clip_text::ContextClipTextModel<BB>,
        ctx: Tensor<BB, 3>,
        captions: &[String],
        subjects: &[String],
        keep: &[bool],
    ) -> Result<Tensor<BB, 3>, Stage2Error> {
        let captions: Vec<&str> = captions.iter().map(String::as_str).collect();
        let subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
        Ok(conditioning::condition(
            text_encoder,
            &self.clip_tokenizer,
            &self.prompt,
            ctx,
            &captions,
            &subjects,
            keep,
        )?)
    }

    /// Subject embeddings `[B, N, D]` from subject images (CLIP-normalised `[B, 3, S, S]`) and class
    /// names, as the training step computes them.
    pub fn subject_embeddings<BB: Backend>(
        &self,
        qformer: &blipd_models::qformer::Blip2QFormerModel<BB>,
        input: Tensor<BB, 4>,
        subjects: &[String],
    ) -> Result<Tensor<BB, 3>, Stage2Error> {
        let refs: Vec<&str> = subjects.iter().map(String::as_str).collect();
        Ok(conditioning::subject_embeddings(
            qformer,
            &self.bert_tokenizer,
            input,
            self.config.use_subject_text.then_some(&refs[..]),
        )?)
    }
}

/// `n` standard normal draws (Box–Muller, cosine branch) from `rng`.
pub(crate) fn std_normal(rng: &mut TrainRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-12);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

impl<B: AutodiffBackend> Stage<B> for Stage2<B> {
    type Model = Stage2Model<B>;
    type Batch = Stage2Batch;

    fn step(
        &mut self,
        model: &Stage2Model<B>,
        batch: Stage2Batch,
        rng: &mut TrainRng,
    ) -> blipd_train::Result<StepOutput<B>> {
        let _autocast = blipd_models::amp::Autocast::enter(self.autocast);
        let dev = self.device.clone();
        let b = batch.len();
        if b == 0 || batch.captions.len() != b {
            return Err(Stage2Error::Batch(format!(
                "{} subjects and {} captions",
                b,
                batch.captions.len()
            ))
            .into());
        }
        // Target latents through the frozen VAE (no graph), or their cached posterior.
        let t0 = std::time::Instant::now();
        let posterior: TargetPosterior<B::InnerBackend> = match batch.target {
            Targets::Pixels(px) => self
                .vae
                .encode(Tensor::<B::InnerBackend, 4>::from_data(px, &dev))
                .into(),
            Targets::Moments { mean, std } => TargetPosterior::Cached {
                mean: Tensor::from_data(mean, &dev),
                std: Tensor::from_data(std, &dev),
            },
        };
        tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "target posterior");
        let shape = posterior.shape();
        let channels = shape[1];
        let loss_opts = self.config.loss_options();
        let n_train = self.ddpm.num_train_timesteps();
        let drop = self.config.subject_drop_prob;
        let (vae_noise, noise, t, keep) = match batch.sample_rngs {
            Some(mut rngs) => {
                if rngs.len() != b {
                    return Err(Stage2Error::Batch(format!(
                        "{} sample streams for {b} samples",
                        rngs.len()
                    ))
                    .into());
                }
                // Per sample, in this order: timestep, keep, VAE noise, diffusion noise.
                let per = shape.num_elements() / b;
                let (mut vn, mut dn) = (Vec::with_capacity(b * per), Vec::with_capacity(b * per));
                let mut t = Vec::with_capacity(b);
                let mut keep = Vec::with_capacity(b);
                let mut delta = Vec::new();
                for r in rngs.iter_mut() {
                    t.push(r.random_range(0..n_train) as i64);
                    keep.push(r.random::<f64>() >= drop);
                    vn.extend(std_normal(r, per));
                    dn.extend(std_normal(r, per));
                    // Only with a noise offset, so the streams are unchanged without one.
                    if loss_opts.wants_offset() {
                        delta.extend(std_normal(r, channels));
                    }
                }
                let vn = Tensor::from_data(TensorData::new(vn, shape.clone()), &dev);
                let dn = Tensor::<B, 4>::from_data(TensorData::new(dn, shape), &dev);
                let dn = if loss_opts.wants_offset() {
                    loss_opts.offset_noise(
                        dn,
                        Tensor::from_data(TensorData::new(delta, [b, channels, 1, 1]), &dev),
                    )
                } else {
                    dn
                };
                (vn, dn, t, keep)
            }
            None => {
                let vn = Tensor::random(shape.clone(), Distribution::Normal(0.0, 1.0), &dev);
                let dn = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
                let dn = if loss_opts.wants_offset() {
                    loss_opts.offset_noise(
                        dn,
                        Tensor::random([b, channels, 1, 1], Distribution::Normal(0.0, 1.0), &dev),
                    )
                } else {
                    dn
                };
                let t: Vec<i64> = (0..b)
                    .map(|_| rng.random_range(0..n_train) as i64)
                    .collect();
                let keep: Vec<bool> = (0..b).map(|_| rng.random::<f64>() >= drop).collect();
                (vn, dn, t, keep)
            }
        };
        let input = Tensor::<B, 4>::from_data(batch.input, &dev);
        let (loss, grads) = self.denoising(
            model,
            input,
            posterior,
            &batch.subjects,
            &batch.captions,
            t,
            &keep,
            vae_noise,
            noise,
            self.config.gradient_checkpointing,
        )?;
        let dropped = keep.iter().filter(|k| !**k).count() as f32 / b as f32;
        let mut out = StepOutput::new(loss.clone())
            .with_metric("mse", loss)
            .with_metric("dropped", Tensor::from_floats([dropped], &dev));
        out.grads = grads;
        Ok(out)
    }

    fn broadcast_frozen(
        &mut self,
        sync: &mut blipd_train::dist_sync::DistSync,
    ) -> blipd_train::Result<()> {
        self.vae = sync.broadcast_module(self.vae.clone(), "frozen VAE")?;
        Ok(())
    }

    fn sample(
        &mut self,
        model: &<Stage2Model<B> as AutodiffModule<B>>::InnerModule,
        ctx: SampleContext,
    ) -> blipd_train::Result<()> {
        if self.sample_inputs.is_empty() {
            return Ok(());
        }
        let mut rng = ctx.rng;
        let mut rows = Vec::new();
        let mut legend = String::new();
        for (i, (pixels, subject, prompt)) in self.sample_inputs.clone().into_iter().enumerate() {
            let img = self
                .generate(model, &pixels, &subject, &prompt, &mut rng)
                .map_err(blipd_train::TrainError::stage)?;
            let reference = clip_pixels_to_rgb(&pixels, self.image_size);
            let reference = image::imageops::resize(
                &reference,
                img.width(),
                img.height(),
                image::imageops::FilterType::Triangle,
            );
            rows.push(grid(&[reference, img]));
            legend.push_str(&format!(
                "row {i}: subject {subject:?}, prompt {prompt:?}\n"
            ));
        }
        let sheet = stack(&rows);
        let path = ctx.dir.join("samples.png");
        sheet.save(&path).map_err(|e| {
            blipd_train::TrainError::stage(format!("writing {}: {e}", path.display()))
        })?;
        let txt = ctx.dir.join("samples.txt");
        std::fs::write(
            &txt,
            format!("left: subject image, right: generated\n{legend}"),
        )
        .map_err(|e| blipd_train::TrainError::stage(format!("writing {}: {e}", txt.display())))?;
        Ok(())
    }
}

impl<B: AutodiffBackend> Stage2<B> {
    /// The stage-2 loss for given randomness: target latents `posterior.sample(vae_noise) · scale`,
    /// DDPM-noised with `noise` at timesteps `t`; subject embeddings of `input` (CLIP-normalised
    /// subject images) spliced into each caption's prompt where `keep[i]`, the text-only prompt
    /// elsewhere; ε-prediction MSE (mean over all elements, as `F.mse_loss`), or min-SNR-weighted
    /// ([`crate::loss`]). `noise` already carries the noise offset when one is configured.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_from(
        &self,
        model: &Stage2Model<B>,
        input: Tensor<B, 4>,
        posterior: impl Into<TargetPosterior<B::InnerBackend>>,
        subjects: &[String],
        captions: &[String],
        t: Vec<i64>,
        keep: &[bool],
        vae_noise: Tensor<B::InnerBackend, 4>,
        noise: Tensor<B, 4>,
    ) -> Result<Tensor<B, 1>, Stage2Error> {
        let (loss, _) = self.denoising(
            model, input, posterior, subjects, captions, t, keep, vae_noise, noise, false,
        )?;
        Ok(loss)
    }

    /// [`Self::loss_from`]; with `checkpointing`, the U-Net goes through [`crate::checkpoint`] and the
    /// loss comes with the gradients of every trainable parameter (already differentiated).
    #[allow(clippy::too_many_arguments)]
    fn denoising(
        &self,
        model: &Stage2Model<B>,
        input: Tensor<B, 4>,
        posterior: impl Into<TargetPosterior<B::InnerBackend>>,
        subjects: &[String],
        captions: &[String],
        t: Vec<i64>,
        keep: &[bool],
        vae_noise: Tensor<B::InnerBackend, 4>,
        noise: Tensor<B, 4>,
        checkpointing: bool,
    ) -> Result<(Tensor<B, 1>, Option<InnerGrads<B>>), Stage2Error> {
        let dev = self.device.clone();
        let b = t.len();
        let latents = posterior.into().sample(vae_noise) * self.vae.scaling_factor;
        let latents = Tensor::<B, 4>::from_inner(latents);
        // DDPM forward process at the given timestep per sample.
        let t_int = Tensor::<B, 1, Int>::from_data(TensorData::new(t.clone(), [b]), &dev);
        let noisy = self.ddpm.add_noise(latents, noise.clone(), t_int.clone());
        // Subject embeddings → prompt → U-Net.
        let t0 = std::time::Instant::now();
        let ctx = self.subject_embeddings(&model.qformer, input, subjects)?;
        let t1 = std::time::Instant::now();
        let states = self.prompt_states(&model.text_encoder, ctx, captions, subjects, keep)?;
        let t2 = std::time::Instant::now();
        let opts = self.config.loss_options();
        // The Q-Former is always trained, so the text states carry a graph.
        let (loss, grads) = crate::checkpoint::denoising_loss(
            model,
            &model.unet,
            noisy,
            t_int.float(),
            states,
            true,
            checkpointing,
            |pred| opts.loss(pred, noise, &t, self.ddpm.alphas_cumprod()),
        );
        tracing::debug!(
            subject_s = (t1 - t0).as_secs_f64(),
            text_s = (t2 - t1).as_secs_f64(),
            // With checkpointing the U-Net's time includes its backward.
            unet_s = t2.elapsed().as_secs_f64(),
            checkpointing,
            "forward"
        );
        Ok((loss, grads))
    }

    /// Zero-shot generation with the current weights: PNDM (PLMS), classifier-free guidance with an
    /// empty negative prompt, one image.
    pub fn generate(
        &self,
        model: &Stage2Model<B::InnerBackend>,
        pixels: &[f32],
        subject: &str,
        prompt: &str,
        rng: &mut TrainRng,
    ) -> Result<image::RgbImage, Stage2Error> {
        type I<B> = <B as AutodiffBackend>::InnerBackend;
        let dev = &self.device;
        let s = self.image_size;
        let input =
            Tensor::<I<B>, 4>::from_data(TensorData::new(pixels.to_vec(), [1, 3, s, s]), dev);
        let ctx = self.subject_embeddings(&model.qformer, input, &[subject.to_string()])?;
        let guidance = self.config.guidance_scale;
        let states = conditioning::guided_states(
            &model.text_encoder,
            &self.clip_tokenizer,
            &self.prompt,
            ctx,
            &[prompt],
            &[subject],
            sampling::guided(guidance).then_some(""),
        )?;
        plms_image(
            &model.unet,
            &self.vae,
            states,
            self.target_size / self.latent_factor,
            self.config.sample_steps,
            guidance,
            rng,
        )
    }
}

/// One image by PNDM (PLMS) sampling ([`blipd_models::sampling::denoise`], the loop generation
/// runs): `states` from [`conditioning::guided_states`] (`[uncond; cond]` when guided), the initial
/// `lat`×`lat` latents from `rng` (Box–Muller), the result decoded by `vae`. For sample sheets.
pub fn plms_image<B: Backend>(
    unet: &blipd_models::unet::UNet2DConditionModel<B>,
    vae: &AutoencoderKL<B>,
    states: Tensor<B, 3>,
    lat: usize,
    steps: usize,
    guidance_scale: f64,
    rng: &mut TrainRng,
) -> Result<image::RgbImage, Stage2Error> {
    let dev = &states.device();
    let channels = unet.conv_in.weight.dims()[1];
    let noise = std_normal(rng, channels * lat * lat);
    let x = Tensor::<B, 4>::from_data(TensorData::new(noise, [1, channels, lat, lat]), dev);
    let x = sampling::denoise(
        unet,
        None,
        Steps::blip_diffusion_pndm(steps.max(1))?,
        x,
        states,
        guidance_scale,
        &mut |_| {},
    )?;
    Ok(to_rgb(vae.decode_latents(x)))
}

/// `[1, 3, H, W]` in [−1, 1] → RGB image (diffusers postprocess: (x/2+0.5).clamp(0,1)·255, rounded).
pub fn to_rgb<B: Backend>(x: Tensor<B, 4>) -> image::RgbImage {
    let [_, _, h, w] = x.dims();
    let v = x
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default();
    let mut img = image::RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for xx in 0..w {
            let mut p = [0u8; 3];
            for (c, pc) in p.iter_mut().enumerate() {
                let val = v[c * h * w + y * w + xx];
                *pc = ((val / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
            }
            img.put_pixel(xx as u32, y as u32, image::Rgb(p));
        }
    }
    img
}

/// Rows stacked vertically.
pub fn stack(rows: &[image::RgbImage]) -> image::RgbImage {
    let w = rows.iter().map(|t| t.width()).max().unwrap_or(1);
    let h: u32 = rows.iter().map(|t| t.height()).sum::<u32>().max(1);
    let mut out = image::RgbImage::new(w, h);
    let mut y0 = 0;
    for r in rows {
        image::imageops::overlay(&mut out, r, 0, y0 as i64);
        y0 += r.height();
    }
    out
}

/// Tiles in one row.
pub fn grid(tiles: &[image::RgbImage]) -> image::RgbImage {
    let h = tiles.iter().map(|t| t.height()).max().unwrap_or(1);
    let w: u32 = tiles.iter().map(|t| t.width()).sum::<u32>().max(1);
    let mut out = image::RgbImage::new(w, h);
    let mut x0 = 0;
    for t in tiles {
        image::imageops::overlay(&mut out, t, x0 as i64, 0);
        x0 += t.width();
    }
    out
}
