//! `blipd interpolate`: a grid of 2–4 subjects' embeddings blended bilinearly and rendered in one
//! context from one noise (BLIP-Diffusion fig. 9; `blipd_apps::interpolate`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blipd_apps::interpolate::{grid_weights, interpolate};
use blipd_apps::{BlipDiffusionPipeline, GenerateOptions};
use clap::Args;

#[derive(Args)]
pub struct InterpolateArgs {
    /// The pipeline folder (diffusers `Salesforce/blipdiffusion` layout, or a stage-2 export).
    #[arg(long)]
    pub model: PathBuf,
    /// 2–4 reference images, one per subject: 2 make a row A → B; 3 a square with A top-left, B
    /// top-right and C along the bottom; 4 a bilinear square A, B (top), C, D (bottom).
    #[arg(long, required = true, num_args = 1)]
    pub image: Vec<PathBuf>,
    /// Subject category of each image (fed to the Q-Former), e.g. "dog"; one per --image.
    #[arg(long, required = true, num_args = 1)]
    pub subject: Vec<String>,
    /// Subject category named in the prompt (default: the first --subject).
    #[arg(long)]
    pub target_subject: Option<String>,
    /// The context, e.g. "on the beach".
    #[arg(long)]
    pub prompt: String,
    /// Cells from one subject to the next along a side (2–16).
    #[arg(long, default_value_t = 5)]
    pub side: usize,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    #[arg(long, default_value = "")]
    pub neg_prompt: String,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Seed of the one initial noise every cell starts from.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Cells denoised together.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// LAVIS preprocessing (shorter-side resize + centre crop, `blip_caption` text) instead of diffusers'.
    #[arg(long)]
    pub lavis: bool,
    /// BERT-uncased vocab.txt for the Q-Former (else <model>/qformer/vocab.txt or $BLIPD_BERT_VOCAB).
    #[arg(long)]
    pub bert_vocab: Option<PathBuf>,
    /// The grid PNG; the cells' weights go to the same name with `.json`.
    #[arg(long, default_value = "interpolation.png")]
    pub out: PathBuf,
}

pub fn run(a: InterpolateArgs) -> Result<ExitCode> {
    let start = Instant::now();
    if a.image.len() != a.subject.len() {
        bail!(
            "{} --image and {} --subject: give one subject per image",
            a.image.len(),
            a.subject.len()
        );
    }
    if a.out.extension().is_none_or(|e| e != "png") {
        bail!("--out {}: the grid is written as a .png", a.out.display());
    }
    let grid = grid_weights(a.image.len(), a.side)?;
    let mut opts = if a.lavis {
        GenerateOptions::lavis()
    } else {
        GenerateOptions::default()
    };
    opts.num_inference_steps = a.steps;
    opts.guidance_scale = a.guidance_scale;
    opts.neg_prompt = a.neg_prompt.clone();
    opts.seed = a.seed;
    opts.height = a.height;
    opts.width = a.width;
    opts.validate()?;
    // Every image is read before the model, so a bad path fails fast.
    let references = a
        .image
        .iter()
        .map(|p| blipd_apps::RgbImage::open(p).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let device = super::device();
    let pipe =
        BlipDiffusionPipeline::<super::Inner>::load(&a.model, a.bert_vocab.as_deref(), &device)
            .with_context(|| format!("loading {}", a.model.display()))?;
    let mut ctxs = Vec::with_capacity(references.len());
    for (reference, subject) in references.iter().zip(&a.subject) {
        ctxs.push(pipe.reference_embedding(reference, subject, &opts)?);
    }
    let tgt = a
        .target_subject
        .clone()
        .unwrap_or_else(|| a.subject[0].clone());
    tracing::info!(
        "interpolating {} subjects on a {}×{} grid ({} cells, {} per call)",
        ctxs.len(),
        grid.rows,
        grid.cols,
        grid.weights.len(),
        a.batch
    );
    let images = interpolate(&pipe, &ctxs, &grid, &tgt, &a.prompt, &opts, a.batch)?;
    let out = blipd_models::vae::to_uint8_image(images * 2.0 - 1.0)?;
    let (w, h) = (out.width as u32, out.height as u32);
    let mut sheet = image::RgbImage::new(w * grid.cols as u32, h * grid.rows as u32);
    for i in 0..out.batch {
        let cell = image::RgbImage::from_raw(w, h, out.image(i).to_vec())
            .context("decoded image has an unexpected size")?;
        let (r, c) = (i / grid.cols, i % grid.cols);
        image::imageops::overlay(
            &mut sheet,
            &cell,
            (c as u32 * w) as i64,
            (r as u32 * h) as i64,
        );
    }
    let tmp = a.out.with_extension("png.tmp");
    sheet
        .save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    let json = a.out.with_extension("json");
    let meta = serde_json::json!({
        "rows": grid.rows,
        "cols": grid.cols,
        "subjects": a.subject,
        "images": a.image,
        "prompt": a.prompt,
        "target_subject": tgt,
        "seed": a.seed,
        "weights": grid.weights,
    });
    blipd_models::weights::atomic_write(&json, serde_json::to_string_pretty(&meta)?.as_bytes())
        .with_context(|| format!("writing {}", json.display()))?;
    println!("{}", a.out.display());
    println!(
        "{}×{} grid of {}×{} images ({:.1} s); weights in {}",
        grid.rows,
        grid.cols,
        a.width,
        a.height,
        start.elapsed().as_secs_f64(),
        json.display()
    );
    Ok(ExitCode::SUCCESS)
}
