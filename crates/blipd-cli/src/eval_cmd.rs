//! `blipd eval`: DreamBench DINO / CLIP-I / CLIP-T scores of a folder of generated images (see
//! `blipd_apps::eval` and docs/eval.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use blipd_apps::dreambench::{generate_dreambench, DreamBenchGenOptions, GenEvent, GenSummary};
use blipd_apps::eval::{DreamBench, DreamBenchEval, EvalEvent, EvalOptions, EvalReport};
use blipd_apps::{BlipDiffusionPipeline, GenerateOptions};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct EvalArgs {
    /// Generated images: <DIR>/<subject>/<prompt index>_<sample index>.png (prompt index 0-based into
    /// the subject's DreamBench prompt list).
    #[arg(long, required_unless_present = "oracle")]
    pub generated: Option<PathBuf>,
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
    /// The papers' "Real Images (Oracle)" row instead: each real photo against the subject's other
    /// photos (DINO, CLIP-I) — checks the metric setup (paper: 0.774 / 0.885). Needs no --generated.
    #[arg(long)]
    pub oracle: bool,
    #[command(flatten)]
    pub gen: GenArgs,
}

/// Generating the images first (`--model`).
#[derive(Args, Clone, Debug)]
pub struct GenArgs {
    /// A BlipDiffusion pipeline folder (the released weights, or a stage-2 run's `export/`): generate
    /// the DreamBench images into --generated first (images already there are kept), then score them.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// BERT `vocab.txt` when the pipeline folder has no `qformer/vocab.txt`.
    #[arg(long)]
    pub bert_vocab: Option<PathBuf>,
    /// Samples per prompt (DreamBooth's protocol: 4).
    #[arg(long, default_value_t = 4)]
    pub images_per_prompt: usize,
    /// Only the first N prompts of each subject (default: all 25).
    #[arg(long)]
    pub prompts_per_subject: Option<usize>,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    #[arg(long, default_value = "")]
    pub neg_prompt: String,
    /// Output size (square).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Generate and score N times, with seeds `--seed` … `--seed + N − 1`, into <generated>/seed-<s>/;
    /// the report gives each subject's DINO / CLIP-I / CLIP-T and their average as mean ± std over the
    /// seeds (the papers' tables 5/6 and 1), and <out>.png a contact sheet of the first seed.
    #[arg(long, default_value_t = 1, requires = "model")]
    pub seeds: u64,
}

impl GenArgs {
    pub fn options(&self, subjects: &[String]) -> DreamBenchGenOptions {
        let generate = GenerateOptions {
            num_inference_steps: self.steps,
            guidance_scale: self.guidance_scale,
            neg_prompt: self.neg_prompt.clone(),
            height: self.size,
            width: self.size,
            seed: self.seed,
            ..GenerateOptions::default()
        };
        DreamBenchGenOptions {
            subjects: subjects.to_vec(),
            prompts_per_subject: self.prompts_per_subject,
            images_per_prompt: self.images_per_prompt,
            generate,
        }
    }
}

/// Generates the DreamBench images of `model` into `out` with a progress bar (kept images skipped).
pub fn generate_images(
    model: &Path,
    bert_vocab: Option<&Path>,
    bench: &DreamBench,
    opts: &DreamBenchGenOptions,
    out: &Path,
) -> Result<GenSummary> {
    let device = super::device();
    let pipe = BlipDiffusionPipeline::<super::Inner>::load(model, bert_vocab, &device)
        .with_context(|| format!("loading {}", model.display()))?;
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(
            "generate {bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}, {per_sec}] {msg}",
        )
        .expect("static template"),
    );
    let summary = generate_dreambench(&pipe, bench, opts, out, &mut |e| match e {
        GenEvent::Planned { images } => pb.set_length(images as u64),
        GenEvent::Prompt {
            subject,
            prompt,
            images,
            skipped,
        } => {
            pb.set_message(format!(
                "{subject}: {prompt}{}",
                if skipped { " (kept)" } else { "" }
            ));
            pb.inc(images as u64);
        }
    })
    .with_context(|| format!("generating DreamBench images into {}", out.display()))?;
    pb.finish_and_clear();
    tracing::info!(
        "DreamBench generation: {} images written, {} kept, in {}",
        summary.written,
        summary.skipped,
        out.display()
    );
    Ok(summary)
}

/// Scores the images in `generated` with a progress bar.
pub fn score(
    ev: &mut DreamBenchEval<super::Inner>,
    bench: &DreamBench,
    generated: &Path,
    opts: &EvalOptions,
) -> Result<EvalReport> {
    let pb = bar();
    let mut n_bad = 0u64;
    let report = ev.evaluate(bench, generated, opts, |e| match e {
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
    Ok(report)
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
    if args.gen.seeds == 0 {
        bail!("--seeds must be at least 1");
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
    if args.oracle {
        let report = ev.oracle(&bench, &args.subjects, args.batch_size)?;
        let md = report.to_markdown();
        if let Some(out) = &args.out {
            let text = serde_json::to_string_pretty(&report.to_json())?;
            std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
            let md_path = out.with_extension("md");
            std::fs::write(&md_path, &md)
                .with_context(|| format!("writing {}", md_path.display()))?;
        }
        print!("{md}");
        if report.mean.is_none() {
            eprintln!("error: no subject has two or more real images");
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let generated = args
        .generated
        .clone()
        .context("--generated is required (or --oracle)")?;
    if args.gen.seeds > 1 {
        return run_seeds(&args, &bench, &mut ev, &generated);
    }
    if let Some(model) = &args.gen.model {
        generate_images(
            model,
            args.gen.bert_vocab.as_deref(),
            &bench,
            &args.gen.options(&args.subjects),
            &generated,
        )?;
    }
    let opts = EvalOptions {
        batch_size: args.batch_size,
        subjects: args.subjects.clone(),
    };
    let report = score(&mut ev, &bench, &generated, &opts)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| generated.join("scores.json"));
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
            generated.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `--seeds N`: one generation and scoring per seed, then the summary over seeds and a contact sheet.
fn run_seeds(
    args: &EvalArgs,
    bench: &DreamBench,
    ev: &mut DreamBenchEval<super::Inner>,
    generated: &Path,
) -> Result<ExitCode> {
    let model = args.gen.model.as_ref().context("--seeds needs --model")?;
    let opts = EvalOptions {
        batch_size: args.batch_size,
        subjects: args.subjects.clone(),
    };
    let seeds: Vec<u64> = (0..args.gen.seeds).map(|k| args.gen.seed + k).collect();
    let mut reports = Vec::with_capacity(seeds.len());
    for &seed in &seeds {
        let dir = generated.join(format!("seed-{seed}"));
        let mut gen = args.gen.options(&args.subjects);
        gen.generate.seed = seed;
        generate_images(model, args.gen.bert_vocab.as_deref(), bench, &gen, &dir)?;
        let report = score(ev, bench, &dir, &opts)?;
        if report.n_images() == 0 {
            bail!(
                "seed {seed}: no generated image could be scored in {}",
                dir.display()
            );
        }
        report.write(&dir.join("scores.json"))?;
        println!(
            "seed {seed}: {} images scored → {}",
            report.n_images(),
            dir.join("scores.json").display()
        );
        reports.push(report);
    }
    let summary = blipd_apps::eval_seeds::SeedsReport { seeds, reports };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| generated.join("scores.json"));
    let md = summary.write(&out)?;
    let sheet_path = out.with_extension("png");
    blipd_apps::eval_seeds::contact_sheet(bench, &summary.reports[0], 8, 128)
        .save(&sheet_path)
        .with_context(|| format!("writing {}", sheet_path.display()))?;
    print!("{}", summary.to_markdown());
    println!(
        "\nscores: {} and {}; contact sheet (first seed): {}",
        out.display(),
        md.display(),
        sheet_path.display()
    );
    Ok(ExitCode::SUCCESS)
}
