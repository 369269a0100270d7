//! `blipd generate`: zero-shot subject-driven generation (diffusers' `BlipDiffusionPipeline`), with
//! subject mixing, ControlNet (a condition image, or Canny edges computed from a photo), fixed
//! latents and fine-tuned folders.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{arrays, device, Inner, Precision};

/// `--scheduler` of `generate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulerArg {
    /// PNDM (PLMS), diffusers' `BlipDiffusionPipeline`.
    Pndm,
    /// DDIM, η = 0 (LAVIS `use_ddim`).
    Ddim,
}

#[derive(Args, Clone)]
pub struct GenerateArgs {
    /// The pipeline folder (model_index.json, qformer/, text_encoder/, unet/, vae/, tokenizer/, …).
    #[arg(long)]
    pub model: PathBuf,
    /// Reference image of the subject (not needed for a fine-tuned folder, whose cached subject
    /// embedding is used instead). Repeat with --subject for subject interpolation: the subject
    /// embeddings are mixed by --ratio (LAVIS' multi-subject input).
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// Subject category of each reference image (fed to the Q-Former), e.g. "dog".
    #[arg(long, required = true)]
    pub subject: Vec<String>,
    /// Mixing weights of the subjects (sum 1; default uniform).
    #[arg(long)]
    pub ratio: Vec<f64>,
    /// A ControlNet condition image (canny edges, depth, …; resized bicubic to the output size):
    /// structure-controlled generation, or stylization with a style image as the subject.
    #[arg(long)]
    pub control_image: Option<PathBuf>,
    /// Compute the condition as Canny edges of --control-image (a photo), prepared as LAVIS does:
    /// shorter side to 512, sides to multiples of 64, thresholds LOW,HIGH (LAVIS' stylization: 30,70).
    /// The edge map is also written beside --out as `<stem>.canny.png`.
    #[arg(long, value_name = "LOW,HIGH", requires = "control_image")]
    pub canny: Option<String>,
    /// A diffusers ControlNetModel folder (e.g. lllyasviel/sd-controlnet-canny) when the model
    /// folder has no controlnet/.
    #[arg(long)]
    pub controlnet: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0)]
    pub controlnet_scale: f64,
    /// `bf16`: matrix products in bf16 (autocast, as diffusers users run fp16/bf16 pipelines);
    /// needs the cuda build.
    #[arg(long, value_enum, default_value_t = Precision::No)]
    pub mixed_precision: Precision,
    /// Subject category named in the prompt (defaults to --subject), e.g. "tiger".
    #[arg(long)]
    pub target_subject: Option<String>,
    /// The text prompt, e.g. "swimming underwater".
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    #[arg(long, default_value = "")]
    pub neg_prompt: String,
    /// Output height in pixels (default 512, or what --latents gives).
    #[arg(long)]
    pub height: Option<usize>,
    /// Output width in pixels (default 512, or what --latents gives).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Initial latents, float32 `(K, 4, h, w)` `.npy` (e.g. saved from diffusers or LAVIS): K
    /// images of `h·f × w·f` pixels (f: the VAE's down-sampling factor), instead of --seed's.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Images per call (default 1, or K of --latents).
    #[arg(long)]
    pub num_images: Option<usize>,
    /// The sampler.
    #[arg(long, value_enum, default_value_t = SchedulerArg::Pndm)]
    pub scheduler: SchedulerArg,
    /// LAVIS preprocessing (shorter-side resize + centre crop, `blip_caption` text) instead of diffusers'.
    #[arg(long)]
    pub lavis: bool,
    /// A LoRA for the U-Net, fused before sampling: a diffusers/PEFT LoRA file or folder, or what
    /// `blipd finetune --lora` exports (its cached subject embedding is then used, no --image needed).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// The LoRA's weight (diffusers' `lora_scale`): 1 as trained, 0 the base model.
    #[arg(long, default_value_t = 1.0, requires = "lora")]
    pub lora_scale: f64,
    /// BERT-uncased vocab.txt for the Q-Former (else <model>/qformer/vocab.txt or $BLIPD_BERT_VOCAB).
    #[arg(long)]
    pub bert_vocab: Option<PathBuf>,
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
}

pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    let GenerateArgs {
        model,
        image,
        subject,
        ratio,
        control_image,
        canny,
        controlnet,
        controlnet_scale,
        mixed_precision,
        target_subject,
        prompt,
        steps,
        guidance_scale,
        neg_prompt,
        height,
        width,
        seed,
        latents,
        num_images,
        scheduler,
        lavis,
        lora,
        lora_scale,
        bert_vocab,
        out,
    } = args;
    let start = Instant::now();
    if let Some(t) = &canny {
        blipd_apps::canny::parse_thresholds(t)?;
    }
    let out_npy = out.extension().is_some_and(|e| e == "npy");
    let mut opts = if lavis {
        blipd_apps::GenerateOptions::lavis()
    } else {
        blipd_apps::GenerateOptions::default()
    };
    opts.num_inference_steps = steps;
    opts.guidance_scale = guidance_scale;
    opts.neg_prompt = neg_prompt;
    opts.seed = seed;
    opts.sampler = match scheduler {
        SchedulerArg::Pndm => blipd_apps::Sampler::Pndm,
        SchedulerArg::Ddim => blipd_apps::Sampler::Ddim,
    };
    opts.controlnet_conditioning_scale = controlnet_scale;
    let mut pipe =
        blipd_apps::BlipDiffusionPipeline::<Inner>::load(&model, bert_vocab.as_deref(), &device())
            .with_context(|| format!("loading {}", model.display()))?;
    if let Some(l) = &lora {
        pipe = pipe
            .with_lora(l, lora_scale)
            .with_context(|| format!("applying the LoRA {}", l.display()))?;
    }
    let init = match &latents {
        None => None,
        Some(p) => Some(arrays::read_latents::<Inner>(
            p,
            pipe.latent_factor(),
            height,
            width,
            &device(),
        )?),
    };
    let (k, height, width) = match &init {
        Some((l, h, w)) => {
            let k = l.dims()[0];
            if num_images.is_some_and(|n| n != k) {
                bail!(
                    "--num-images {} but {} holds {k} latents",
                    num_images.unwrap_or(0),
                    latents
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            }
            (k, *h, *w)
        }
        None => (
            num_images.unwrap_or(1),
            height.unwrap_or(512),
            width.unwrap_or(512),
        ),
    };
    if k == 0 {
        bail!("--num-images must be at least 1");
    }
    opts.height = height;
    opts.width = width;
    opts.validate()?;
    if let Some(dir) = &controlnet {
        pipe = pipe
            .with_controlnet(dir)
            .with_context(|| format!("loading the ControlNet {}", dir.display()))?;
    }
    let tgt = target_subject.unwrap_or_else(|| subject[0].clone());
    let mp: blipd_train::MixedPrecision = mixed_precision.into();
    mp.check_backend(
        &<Inner as burn::tensor::backend::Backend>::name(&device()),
        "--mixed-precision",
    )
    .map_err(anyhow::Error::msg)?;
    let _autocast = blipd_models::amp::Autocast::enter(mp.dtype());
    let ctx = match &pipe.ctx_cache {
        Some(cache) => {
            if !image.is_empty() {
                tracing::warn!(
                        "{} is a fine-tuned folder: its cached subject embedding is used, --image is ignored",
                        model.display()
                    );
            }
            cache.clone()
        }
        None => {
            if image.is_empty() {
                anyhow::bail!(
                        "--image is required: {} has no cached subject embedding (not a fine-tuned model)",
                        model.display()
                    );
            }
            if image.len() != subject.len() {
                anyhow::bail!(
                    "{} --image and {} --subject: give one subject per image",
                    image.len(),
                    subject.len()
                );
            }
            let mut ctxs = Vec::with_capacity(image.len());
            for (path, subj) in image.iter().zip(&subject) {
                let reference = blipd_apps::RgbImage::open(path)?;
                ctxs.push(pipe.reference_embedding(&reference, subj, &opts)?);
            }
            blipd_apps::BlipDiffusionPipeline::<Inner>::mix_subject_embeddings(ctxs, &ratio)?
        }
    };
    // The request against the networks and the machine (size, memory), once the inputs
    // are known to be there and before the first full-size allocation.
    pipe.check_request(k, &opts)?;
    let control = match &control_image {
        None => None,
        Some(p) => {
            let photo = blipd_apps::RgbImage::open(p)?;
            let cond = match &canny {
                None => photo,
                Some(t) => {
                    let edges = canny_map(&photo, t, &out)?;
                    tracing::info!(
                        "Canny edges of {} ({}×{}) as the condition",
                        p.display(),
                        edges.width,
                        edges.height
                    );
                    edges
                }
            };
            Some(pipe.control_image(&cond, height, width)?)
        }
    };
    let ctx = if k > 1 { ctx.repeat_dim(0, k) } else { ctx };
    let result = pipe.generate_with_ctx_controlled(
        ctx,
        &vec![tgt.as_str(); k],
        &vec![prompt.as_str(); k],
        control,
        &opts,
        init.map(|(l, _, _)| l),
        &mut |_| {},
    )?;
    let written = write_images(&result, &out, out_npy)?;
    for p in &written {
        println!("{}", p.display());
    }
    println!(
        "{k} image{} of {width}×{height} ({:.1} s)",
        if k == 1 { "" } else { "s" },
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// The Canny condition of `photo` (thresholds `"LOW,HIGH"`), also written as `<out stem>.canny.png`.
pub fn canny_map(
    photo: &blipd_apps::RgbImage,
    thresholds: &str,
    out: &Path,
) -> Result<blipd_apps::RgbImage> {
    let (low, high) = blipd_apps::canny::parse_thresholds(thresholds)?;
    let edges = blipd_apps::canny::canny_condition(photo, low, high, 512)?;
    let path = out.with_extension("canny.png");
    image::RgbImage::from_raw(edges.width as u32, edges.height as u32, edges.data.clone())
        .context("edge map buffer")?
        .save(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(edges)
}

/// The images of a generation: float32 NHWC in [0, 1] into one `.npy`, or 8-bit PNGs (`out` for one
/// image, `<stem>_<i>.<ext>` for several). Returns the files written.
fn write_images(
    result: &blipd_apps::GenerateOutput<Inner>,
    out: &Path,
    npy: bool,
) -> Result<Vec<PathBuf>> {
    if npy {
        let (data, dims) = arrays::nhwc_values(result.images.clone())?;
        let tmp = out.with_extension("npy.tmp");
        blipd_data::npy::write_f32(&tmp, &dims, &data)?;
        std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
        return Ok(vec![out.to_path_buf()]);
    }
    let img = result.to_uint8()?;
    let n = img.batch;
    let mut written = Vec::with_capacity(n);
    for i in 0..n {
        let path = if n == 1 {
            out.to_path_buf()
        } else {
            let stem = out.file_stem().unwrap_or_default().to_string_lossy();
            let ext = out.extension().map(|e| e.to_string_lossy().into_owned());
            out.with_file_name(match ext {
                Some(e) => format!("{stem}_{i}.{e}"),
                None => format!("{stem}_{i}"),
            })
        };
        let rgb =
            image::RgbImage::from_raw(img.width as u32, img.height as u32, img.image(i).to_vec())
                .context("decoded image has an unexpected size")?;
        rgb.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
