//! `blipd sweep FILE`: run variants of a pre-training plan (the paper's Table 2 ablations) and write one
//! comparison table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use blipd_apps::eval::{DreamBench, DreamBenchEval, EvalOptions};

use crate::eval_cmd::GenArgs;
use crate::plan::PretrainPlan;

/// A sweep file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// The plan every variant starts from (relative to the sweep file).
    pub base: PathBuf,
    /// Where the variants' run folders and the table go.
    pub dir: PathBuf,
    /// Overrides applied to every variant (before the variant's own).
    #[serde(default)]
    pub set: Vec<String>,
    #[serde(rename = "variant")]
    pub variants: Vec<Variant>,
    /// Runs of every variant, each with every seed of the plan (stages and `[eval]`) shifted by
    /// 0, 1, …, seeds − 1 (in `<dir>/<variant>/seed-<k>` when more than one); the table shows
    /// mean ± standard deviation over them.
    #[serde(default = "one")]
    pub seeds: usize,
    /// DreamBench scores of every variant's exported pipeline (the paper's Table 2 metrics).
    #[serde(default)]
    pub eval: Option<SweepEval>,
}

/// `[eval]` of a sweep file: generate DreamBench images with each variant's `stage2/export` and score
/// them (DINO, CLIP-I, CLIP-T). Paths are relative to the sweep file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SweepEval {
    /// DreamBench folder (`<subject>/*.jpg`, `prompts_and_classes.txt`).
    pub dreambench: PathBuf,
    /// transformers CLIPModel folder (openai/clip-vit-base-patch32 in DreamBooth's protocol).
    pub clip: PathBuf,
    /// transformers ViTModel folder of facebook/dino-vits16.
    pub dino: PathBuf,
    /// Only these subjects (default all 30).
    #[serde(default)]
    pub subjects: Vec<String>,
    /// The first N prompts of each subject (default all 25).
    #[serde(default)]
    pub prompts_per_subject: Option<usize>,
    #[serde(default = "default_images_per_prompt")]
    pub images_per_prompt: usize,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance_scale: f64,
    #[serde(default)]
    pub neg_prompt: String,
    /// Output size (square).
    #[serde(default = "default_size")]
    pub size: usize,
    #[serde(default)]
    pub seed: u64,
    /// Images per scoring forward.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn one() -> usize {
    1
}

fn default_images_per_prompt() -> usize {
    4
}
fn default_steps() -> usize {
    50
}
fn default_guidance() -> f64 {
    7.5
}
fn default_size() -> usize {
    512
}
fn default_batch() -> usize {
    16
}

impl SweepEval {
    fn gen_args(&self) -> GenArgs {
        GenArgs {
            model: None,
            bert_vocab: None,
            images_per_prompt: self.images_per_prompt,
            prompts_per_subject: self.prompts_per_subject,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            neg_prompt: self.neg_prompt.clone(),
            size: self.size,
            seed: self.seed,
            seeds: 1,
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    /// What the variant changes, for the table.
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub set: Vec<String>,
}

/// One result (one seed of one variant).
#[derive(Clone, Debug, Serialize)]
pub struct VariantResult {
    pub name: String,
    pub description: String,
    /// Offset added to every seed of the plan.
    pub seed_offset: u64,
    pub steps: u64,
    /// Mean training loss over the last 10% of steps (at least the last step).
    pub final_loss: f64,
    /// Mean training loss over all steps.
    pub mean_loss: f64,
    pub wall_s: f64,
    /// DreamBench means over all generated images (with `[eval]`).
    pub dino: Option<f64>,
    pub clip_i: Option<f64>,
    pub clip_t: Option<f64>,
    pub images_scored: Option<usize>,
    /// The plan's own `[eval]` (the micro world's zero-shot vs text-only), when it has one.
    pub zero_shot: Option<blipd_apps::micro::ZeroShotReport>,
}

pub fn run(path: &Path, extra_sets: &[String]) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let sweep: SweepConfig =
        toml::from_str(&text).with_context(|| format!("sweep file {}", path.display()))?;
    if sweep.variants.is_empty() {
        bail!("{}: no [[variant]]", path.display());
    }
    let here = path.parent().unwrap_or(Path::new("."));
    let base = here.join(&sweep.base);
    let base_text = std::fs::read_to_string(&base)
        .with_context(|| format!("reading base plan {}", base.display()))?;
    // The evaluation models and DreamBench load before any training, so a wrong path fails now.
    let mut eval = match &sweep.eval {
        None => None,
        Some(e) => {
            let bench = DreamBench::open(&here.join(&e.dreambench))?;
            let ev = DreamBenchEval::<crate::Inner>::load(
                &here.join(&e.clip),
                &here.join(&e.dino),
                &crate::device(),
            )
            .context("[eval]: loading the evaluation models")?;
            Some((e, bench, ev))
        }
    };
    if sweep.seeds == 0 {
        bail!("{}: seeds = 0", path.display());
    }
    // Every variant's plan is checked before the first one trains.
    let mut plans = Vec::with_capacity(sweep.variants.len() * sweep.seeds);
    for v in &sweep.variants {
        let mut sets = sweep.set.clone();
        sets.extend(v.set.iter().cloned());
        sets.extend(extra_sets.iter().cloned());
        for k in 0..sweep.seeds as u64 {
            let dir = match sweep.seeds {
                1 => sweep.dir.join(&v.name),
                _ => sweep.dir.join(&v.name).join(format!("seed-{k}")),
            };
            let mut plan = PretrainPlan::parse(&base_text, &sets, Some(&dir))
                .with_context(|| format!("variant {}", v.name))?;
            plan.shift_seeds(k);
            plans.push((v, k, dir, plan));
        }
    }
    let mut results = Vec::new();
    for (v, seed_offset, dir, plan) in plans {
        tracing::info!("sweep: variant {} → {}", v.name, dir.display());
        let start = Instant::now();
        crate::pretrain(plan.clone(), false, "sweep")
            .with_context(|| format!("variant {}", v.name))?;
        let wall_s = start.elapsed().as_secs_f64();
        let s2 = plan.stage2.as_ref().context("the plan has no stage 2")?;
        let losses: Vec<f64> =
            blipd_train::metrics::read_metrics(&s2.run.dir.join("metrics.jsonl"))?
                .into_iter()
                .map(|r| r.loss)
                .collect();
        if losses.is_empty() {
            bail!("variant {}: no metrics", v.name);
        }
        let tail = (losses.len() / 10).max(1);
        let final_loss = losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64;
        let mean_loss = losses.iter().sum::<f64>() / losses.len() as f64;
        let zero_shot = match &plan.eval {
            Some(_) => {
                let p = plan.dir.join("eval").join("zero_shot.json");
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("variant {}: reading {}", v.name, p.display()))?;
                Some(serde_json::from_str(&text).with_context(|| p.display().to_string())?)
            }
            None => None,
        };
        let mut row = VariantResult {
            name: v.name.clone(),
            description: v.description.clone(),
            seed_offset,
            zero_shot,
            steps: losses.len() as u64,
            final_loss,
            mean_loss,
            wall_s,
            dino: None,
            clip_i: None,
            clip_t: None,
            images_scored: None,
        };
        if let Some((e, bench, ev)) = eval.as_mut() {
            let generated = dir.join("dreambench");
            let export = blipd_stage2::run::export_dir(s2);
            crate::eval_cmd::generate_images(
                &export,
                None,
                bench,
                &e.gen_args().options(&e.subjects),
                &generated,
            )
            .with_context(|| format!("variant {}", v.name))?;
            let opts = EvalOptions {
                batch_size: e.batch_size.max(1),
                subjects: e.subjects.clone(),
            };
            let report = crate::eval_cmd::score(ev, bench, &generated, &opts)
                .with_context(|| format!("variant {}: scoring", v.name))?;
            report.write(&generated.join("scores.json"))?;
            let mean = report
                .mean
                .with_context(|| format!("variant {}: no image could be scored", v.name))?;
            (row.dino, row.clip_i, row.clip_t) =
                (Some(mean.dino), Some(mean.clip_i), Some(mean.clip_t));
            row.images_scored = Some(report.n_images());
            tracing::info!(
                "sweep: variant {}: DINO {:.3}, CLIP-I {:.3}, CLIP-T {:.3} over {} images",
                v.name,
                mean.dino,
                mean.clip_i,
                mean.clip_t,
                report.n_images()
            );
        }
        results.push(row);
    }
    std::fs::create_dir_all(&sweep.dir)?;
    let md = table(&results);
    let md_path = sweep.dir.join("ablation.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    std::fs::write(
        sweep.dir.join("ablation.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("{md}\n{}", md_path.display());
    Ok(())
}

/// Mean and sample standard deviation ("m ± s"; "m" alone for one value, "-" for none).
fn mean_std(v: &[f64]) -> String {
    match v.len() {
        0 => "-".into(),
        1 => format!("{:.3}", v[0]),
        n => {
            let m = v.iter().sum::<f64>() / n as f64;
            let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64;
            format!("{m:.3} ± {:.3}", var.sqrt())
        }
    }
}

/// One line per variant, each number the mean ± std over its seeds.
fn table(rows: &[VariantResult]) -> String {
    let scored = rows.iter().any(|r| r.dino.is_some());
    let micro = rows.iter().any(|r| r.zero_shot.is_some());
    let mut s =
        String::from("| variant | change | seeds | steps | final loss (last 10%) | mean loss |");
    let mut rule = String::from("|---|---|---:|---:|---:|---:|");
    if micro {
        s.push_str(
            " subject fidelity, zero-shot | subject fidelity, text-only | text alignment, zero-shot \
             | text alignment, text-only |",
        );
        rule.push_str("---:|---:|---:|---:|");
    }
    if scored {
        s.push_str(" DINO | CLIP-I | CLIP-T | images |");
        rule.push_str("---:|---:|---:|---:|");
    }
    s.push_str(" wall s |\n");
    rule.push_str("---:|\n");
    s.push_str(&rule);
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.name.as_str()) {
            names.push(&r.name);
        }
    }
    for name in names {
        let group: Vec<&VariantResult> = rows.iter().filter(|r| r.name == name).collect();
        let col = |f: &dyn Fn(&VariantResult) -> Option<f64>| {
            mean_std(&group.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |",
            name,
            group[0].description,
            group.len(),
            group[0].steps,
            col(&|r| Some(r.final_loss)),
            col(&|r| Some(r.mean_loss)),
        ));
        if micro {
            let z = |f: fn(&blipd_apps::micro::ZeroShotReport) -> f64| {
                col(&|r: &VariantResult| r.zero_shot.as_ref().map(f))
            };
            s.push_str(&format!(
                " {} | {} | {} | {} |",
                z(|z| z.subject_fidelity_zero_shot),
                z(|z| z.subject_fidelity_text_only),
                z(|z| z.text_alignment_zero_shot),
                z(|z| z.text_alignment_text_only),
            ));
        }
        if scored {
            s.push_str(&format!(
                " {} | {} | {} | {} |",
                col(&|r| r.dino),
                col(&|r| r.clip_i),
                col(&|r| r.clip_t),
                group.iter().filter_map(|r| r.images_scored).sum::<usize>()
            ));
        }
        s.push_str(&format!(" {} |\n", col(&|r| Some(r.wall_s))));
    }
    s
}
