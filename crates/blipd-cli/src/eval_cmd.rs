//! `blipd eval`: DreamBench DINO / CLIP-I / CLIP-T scores of a folder of generated images (see
//! `blipd_apps::eval` and docs/eval.md).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use blipd_apps::eval::{DreamBench, DreamBenchEval, EvalEvent, EvalOptions};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct EvalArgs {
    /// Generated images: <DIR>/<subject>/<prompt index>_<sample index>.png (prompt index 0-based into
    /// the subject's DreamBench prompt list).
    #[arg(long)]
    pub generated: PathBuf,
    /// DreamBench folder: <subject>/*.jpg and prompts_and_classes.txt (e.g. ../shared/dreambench).
    #[arg(long)]
    pub dreambench: PathBuf,
    /// A transformers CLIPModel folder (DreamBooth: openai/clip-vit-base-patch32): config.json,
    /// model.safetensors or pytorch_model.bin, preprocessor_config.json, vocab.json + merges.txt.
    #[arg(long)]
    pub clip: PathBuf,
    /// A transformers ViTModel folder of DINO ViT-S/16 (facebook/dino-vits16): config.json, weights,
    /// preprocessor_config.json.
    #[arg(long)]
    pub dino: PathBuf,
    /// Scores as JSON (a Markdown table is written next to it as .md). Default: <generated>/scores.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Images per forward.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Score only this subject (repeatable).
    #[arg(long = "subject")]
    pub subjects: Vec<String>,
}

fn bar() -> ProgressBar {
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "eval {bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}, {per_sec}] {msg}",
        )
        .expect("static template"),
    );
    pb
}

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let device = super::device();
    let bench = DreamBench::open(&args.dreambench)?;
    let mut ev = DreamBenchEval::<super::Inner>::load(&args.clip, &args.dino, &device)
        .context("loading the evaluation models")?;
    tracing::info!(
        "DreamBench {}: {} subjects; CLIP {}, DINO {}",
        args.dreambench.display(),
        bench.subjects.len(),
        args.clip.display(),
        args.dino.display()
    );
    let opts = EvalOptions {
        batch_size: args.batch_size,
        subjects: args.subjects.clone(),
    };
    let pb = bar();
    let mut n_bad = 0u64;
    let report = ev.evaluate(&bench, &args.generated, &opts, |e| match e {
        EvalEvent::Planned { images, .. } => pb.set_length(images as u64),
        EvalEvent::RealEmbedded { subject, images } => {
            pb.set_message(format!("{subject}: {images} real images embedded"))
        }
        EvalEvent::Image { ok } => {
            if !ok {
                n_bad += 1;
                pb.set_message(format!("{n_bad} bad"));
            }
            pb.inc(1);
        }
    })?;
    pb.finish_and_clear();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.generated.join("scores.json"));
    let md = report.write(&out)?;
    print!("{}", report.to_markdown());
    println!(
        "\n{} images scored in {:.1} s; scores: {} and {}",
        report.n_images(),
        report.elapsed_s,
        out.display(),
        md.display()
    );
    if !report.bad.is_empty() {
        eprintln!(
            "warning: {} bad images (listed above and in the JSON's bad_images)",
            report.bad.len()
        );
    }
    if report.n_images() == 0 {
        eprintln!(
            "error: no generated image could be scored in {} (expected <subject>/<prompt>_<sample>.png)",
            args.generated.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
