//! `blipd edit`: subject-driven editing with prompt-to-prompt, as LAVIS does it (paper fig. 4 right, fig. 5 rows 9–10;
//! `blipd_apps::edit`). A generated scene (`"a {src} {prompt}"`), or a photo through DDIM inversion,
//! has its `--src-subject` replaced by the reference subject, the rest kept by LocalBlend's mask.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blipd_apps::edit::{self, EditRequest, RefineConfig};
use blipd_apps::{BlipDiffusionPipeline, GenerateOptions};
use clap::Args;

#[derive(Args)]
pub struct EditArgs {
    /// The pipeline folder (diffusers `Salesforce/blipdiffusion` layout, a stage-2 export, or a
    /// fine-tuned folder, whose cached subject embedding then replaces --image).
    #[arg(long)]
    pub model: PathBuf,
    /// Reference image of the subject to put in (LAVIS `cond_images`).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The reference subject's category for the Q-Former, e.g. "dog" (LAVIS `cond_subject`).
    #[arg(long)]
    pub cond_subject: String,
    /// The word naming the subject to replace in the source prompt, e.g. "cat" (one word: LocalBlend
    /// finds its attention by word).
    #[arg(long)]
    pub src_subject: String,
    /// The subject's category in the edited prompt (default: --cond-subject).
    #[arg(long)]
    pub tgt_subject: Option<String>,
    /// The rest of the scene, e.g. "sitting on a sofa": the source is "a {src} {prompt}".
    #[arg(long)]
    pub prompt: String,
    /// Edit this photo (DDIM-inverted first, LAVIS `edit`) instead of a generated source
    /// (LAVIS `generate_then_edit`).
    #[arg(long)]
    pub source_image: Option<PathBuf>,
    /// Denoising steps (PNDM for a generated source, DDIM for a photo). LAVIS: 250 generated, 50 photo.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// DDIM inversion steps of --source-image.
    #[arg(long, default_value_t = 50)]
    pub inversion_steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    #[arg(long, default_value = "")]
    pub neg_prompt: String,
    /// LocalBlend threshold (LAVIS 0.3; its try-on notebook 0.15): lower keeps less of the source.
    #[arg(long, default_value_t = 0.3)]
    pub threshold: f64,
    /// Fraction of steps with cross-attention replacement.
    #[arg(long, default_value_t = 0.8)]
    pub cross_replace: f64,
    /// Fraction of steps with self-attention replacement.
    #[arg(long, default_value_t = 0.4)]
    pub self_replace: f64,
    /// Query-grid side of the LocalBlend layers (default: the latent side / 4, 16 at 512²).
    #[arg(long)]
    pub blend_grid: Option<usize>,
    /// Output size (a photo is resized on its shorter side and centre-cropped to it: square only).
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Seed of the initial noise (generated source) or of the VAE posterior sample (photo).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The initial latent, float32 `(1, 4, h, w)` `.npy`, instead of --seed's (generated source).
    #[arg(long, conflicts_with = "source_image")]
    pub latents: Option<PathBuf>,
    /// LAVIS preprocessing of the reference (shorter-side resize + centre crop) instead of diffusers'.
    #[arg(long)]
    pub lavis: bool,
    /// BERT-uncased vocab.txt for the Q-Former (else <model>/qformer/vocab.txt or $BLIPD_BERT_VOCAB).
    #[arg(long)]
    pub bert_vocab: Option<PathBuf>,
    /// Output folder: source.png, edit.png, mask.png, edit.json.
    #[arg(long, default_value = "edit")]
    pub out_dir: PathBuf,
}

pub fn run(a: EditArgs) -> Result<ExitCode> {
    let start = Instant::now();
    let refine = RefineConfig {
        cross_replace_steps: a.cross_replace,
        self_replace_steps: a.self_replace,
        threshold: a.threshold,
        blend_grid: a.blend_grid,
        ..RefineConfig::default()
    };
    refine.validate()?;
    if a.src_subject.trim().is_empty() || a.src_subject.contains(char::is_whitespace) {
        bail!(
            "--src-subject {:?}: one word, as it appears in the source prompt (LocalBlend finds it by word)",
            a.src_subject
        );
    }
    if a.source_image.is_some() && a.height != a.width {
        bail!(
            "--source-image is centre-cropped to a square: --height {} and --width {} must be equal",
            a.height,
            a.width
        );
    }
    let mut opts = if a.lavis {
        GenerateOptions::lavis()
    } else {
        GenerateOptions::default()
    };
    opts.num_inference_steps = a.steps;
    opts.guidance_scale = a.guidance_scale;
    opts.seed = a.seed;
    opts.height = a.height;
    opts.width = a.width;
    opts.validate()?;
    // Inputs are read before the model, so a bad path fails fast.
    let reference = a
        .image
        .as_ref()
        .map(|p| blipd_apps::RgbImage::open(p))
        .transpose()?;
    let photo = a
        .source_image
        .as_ref()
        .map(|p| blipd_apps::RgbImage::open(p))
        .transpose()?;
    let device = super::device();
    let pipe =
        BlipDiffusionPipeline::<super::Inner>::load(&a.model, a.bert_vocab.as_deref(), &device)
            .with_context(|| format!("loading {}", a.model.display()))?;
    let ctx = match (&reference, &pipe.ctx_cache) {
        (Some(r), _) => pipe.reference_embedding(r, &a.cond_subject, &opts)?,
        (None, Some(cache)) => cache.clone(),
        (None, None) => bail!(
            "--image is needed: {} is not a fine-tuned folder with a cached subject embedding",
            a.model.display()
        ),
    };
    pipe.check_request(2, &opts)?;
    let tgt = a
        .tgt_subject
        .clone()
        .unwrap_or_else(|| a.cond_subject.clone());
    let req = EditRequest {
        ctx,
        src_subject: &a.src_subject,
        tgt_subject: &tgt,
        prompt: &a.prompt,
        neg_prompt: &a.neg_prompt,
        steps: a.steps,
        guidance_scale: a.guidance_scale,
        refine,
    };
    let (latents, inverted, inversion_prompt) = match (&photo, &a.latents) {
        (Some(photo), _) => {
            let l = edit::photo_latents(&pipe, photo, a.height, a.seed)?;
            tracing::info!("inverting the photo: {} DDIM steps", a.inversion_steps);
            let (inv, text) =
                edit::ddim_invert(&pipe, l, &a.src_subject, &a.prompt, a.inversion_steps)?;
            (inv, true, Some(text))
        }
        (None, Some(p)) => {
            let (l, _, _) = super::arrays::read_latents::<super::Inner>(
                p,
                pipe.latent_factor(),
                Some(a.height),
                Some(a.width),
                &device,
            )?;
            if l.dims()[0] != 1 {
                bail!("{}: one latent (1, 4, h, w) expected", p.display());
            }
            (l, false, None)
        }
        (None, None) => (pipe.initial_latents(1, &opts), false, None),
    };
    let out = edit::generate_then_edit(&pipe, &req, latents, inverted)?;
    write_outputs(&a, &out, inversion_prompt.as_deref(), start)
}

/// source.png, edit.png, mask.png (the LocalBlend mask, nearest-upsampled to the image) and edit.json,
/// written into a fresh folder beside `out_dir` and moved into place, so a failure leaves nothing
/// half-written.
fn write_outputs(
    a: &EditArgs,
    out: &edit::EditOutput<super::Inner>,
    inversion_prompt: Option<&str>,
    start: Instant,
) -> Result<ExitCode> {
    let img = out.output.to_uint8()?;
    let (w, h) = (img.width as u32, img.height as u32);
    let tmp = tmp_dir(&a.out_dir);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("clearing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for (i, name) in ["source.png", "edit.png"].iter().enumerate() {
        let rgb = image::RgbImage::from_raw(w, h, img.image(i).to_vec())
            .context("decoded image has an unexpected size")?;
        let p = tmp.join(name);
        rgb.save(&p)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    let [mh, mw] = out.mask.dims();
    let m: Vec<f32> = out
        .mask
        .clone()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    let mask = image::GrayImage::from_fn(w, h, |x, y| {
        let (my, mx) = (y as usize * mh / h as usize, x as usize * mw / w as usize);
        image::Luma([if m[my * mw + mx] > 0.5 { 255 } else { 0 }])
    });
    let p = tmp.join("mask.png");
    mask.save(&p)
        .with_context(|| format!("writing {}", p.display()))?;
    let inside = m.iter().filter(|&&v| v > 0.5).count() as f64 / m.len().max(1) as f64;
    let meta = serde_json::json!({
        "source_prompt": out.prompts[0],
        "target_prompt": out.prompts[1],
        "inversion_prompt": inversion_prompt,
        "source_image": a.source_image,
        "reference_image": a.image,
        "cond_subject": a.cond_subject,
        "src_subject": a.src_subject,
        "steps": a.steps,
        "inversion_steps": a.source_image.as_ref().map(|_| a.inversion_steps),
        "guidance_scale": a.guidance_scale,
        "threshold": a.threshold,
        "cross_replace": a.cross_replace,
        "self_replace": a.self_replace,
        "seed": a.seed,
        "mask_fraction": inside,
    });
    blipd_models::weights::atomic_write(
        &tmp.join("edit.json"),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    if a.out_dir.exists() {
        std::fs::remove_dir_all(&a.out_dir)
            .with_context(|| format!("replacing {}", a.out_dir.display()))?;
    }
    std::fs::rename(&tmp, &a.out_dir)
        .with_context(|| format!("writing {}", a.out_dir.display()))?;
    for f in ["source.png", "edit.png", "mask.png"] {
        println!("{}", a.out_dir.join(f).display());
    }
    println!(
        "edit: \"{}\" → \"{}\", {:.0} % of the image edited ({:.1} s)",
        out.prompts[0],
        out.prompts[1],
        100.0 * inside,
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn tmp_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "edit".into());
    out.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}
