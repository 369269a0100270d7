//! `blipd sweep FILE`: run variants of a pre-training plan (the paper's Table 2 ablations) and write one
//! comparison table.

use std::collections::HashMap;
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
    /// Runs at once (`--jobs` overrides): each run is a `blipd resume` process and the cores are
    /// split between them. On a CPU, two runs of one thread each get more done than one of two
    /// (small networks do not keep two threads busy).
    #[serde(default = "one")]
    pub jobs: usize,
    /// Train a `[vae]` or `[stage1]` section once per seed where several variants resolve it to the
    /// same values (every variant that changes only stage 2), and start the others' stage 2 from
    /// that export ([`share_stages`]). `false`: every run trains all its stages.
    #[serde(default = "yes")]
    pub share_stages: bool,
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

fn yes() -> bool {
    true
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
    /// Mean training loss over the last 10% of the logged steps (at least the last); none when
    /// stage 2 trained no step.
    pub final_loss: Option<f64>,
    /// Mean training loss over all steps.
    pub mean_loss: Option<f64>,
    pub wall_s: f64,
    /// DreamBench means over all generated images (with `[eval]`).
    pub dino: Option<f64>,
    pub clip_i: Option<f64>,
    pub clip_t: Option<f64>,
    pub images_scored: Option<usize>,
    /// The plan's own `[eval]` (the micro world's zero-shot vs text-only), when it has one.
    pub zero_shot: Option<blipd_apps::micro::ZeroShotReport>,
}

/// Command-line overrides of a sweep file's `jobs` and `seeds`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Overrides {
    pub jobs: Option<usize>,
    pub seeds: Option<usize>,
}

/// One run of the sweep: a variant with one seed offset.
struct Job<'a> {
    variant: &'a Variant,
    /// Its place in the file (the table's row order).
    variant_index: usize,
    seed_offset: u64,
    plan: PretrainPlan,
    /// Runs that train a stage this one starts from (see [`share_stages`]); they finish first.
    after: Vec<usize>,
}

/// Where a sweep records that a run finished: the plan it ran and its wall time. A rerun of the sweep
/// skips a run whose marker holds the plan it would run (a killed sweep redoes only what it had not
/// finished); any other run is resumed from its checkpoints (`blipd resume`).
const DONE_FILE: &str = "sweep-done.json";

#[derive(Serialize, Deserialize)]
struct Done {
    plan: String,
    wall_s: f64,
}

enum State {
    Waiting,
    Running(std::process::Child, Instant),
    Done(f64),
    Failed,
}

pub fn run(path: &Path, extra_sets: &[String], overrides: Overrides) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut sweep: SweepConfig =
        toml::from_str(&text).with_context(|| format!("sweep file {}", path.display()))?;
    sweep.jobs = overrides.jobs.unwrap_or(sweep.jobs);
    sweep.seeds = overrides.seeds.unwrap_or(sweep.seeds);
    if sweep.variants.is_empty() {
        bail!("{}: no [[variant]]", path.display());
    }
    if sweep.seeds == 0 || sweep.jobs == 0 {
        bail!("{}: seeds and jobs must be ≥ 1", path.display());
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
    // Every run's plan is checked before the first one trains. Seed by seed, so that a sweep stopped
    // early has whole rows of seeds.
    let mut jobs = Vec::with_capacity(sweep.variants.len() * sweep.seeds);
    for k in 0..sweep.seeds as u64 {
        for (variant_index, v) in sweep.variants.iter().enumerate() {
            let mut sets = sweep.set.clone();
            sets.extend(v.set.iter().cloned());
            sets.extend(extra_sets.iter().cloned());
            let dir = match sweep.seeds {
                1 => sweep.dir.join(&v.name),
                _ => sweep.dir.join(&v.name).join(format!("seed-{k}")),
            };
            let mut plan = PretrainPlan::parse(&base_text, &sets, Some(&dir))
                .with_context(|| format!("variant {}", v.name))?;
            plan.shift_seeds(k);
            if plan.stage2.is_none() {
                bail!("variant {}: the plan has no stage 2", v.name);
            }
            jobs.push(Job {
                variant: v,
                variant_index,
                seed_offset: k,
                plan,
                after: Vec::new(),
            });
        }
    }
    if sweep.share_stages {
        share_stages(&mut jobs)?;
    }
    let walls = run_all(&jobs, sweep.jobs)?;

    let mut results = Vec::new();
    // Rows variant by variant (the table groups them), seeds in order.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| (jobs[i].variant_index, jobs[i].seed_offset));
    for i in order {
        let Job {
            variant: v,
            seed_offset,
            plan,
            ..
        } = &jobs[i];
        let s2 = plan.stage2.as_ref().context("the plan has no stage 2")?;
        let records = blipd_train::metrics::read_metrics(&s2.run.dir.join("metrics.jsonl"))?;
        let losses: Vec<f64> = records.iter().map(|r| r.loss).collect();
        if losses.is_empty() && s2.train.max_steps > 0 {
            bail!("variant {}: no metrics in {}", v.name, s2.run.dir.display());
        }
        // A stage 2 that trains nothing (the "before stage 2" row) has no loss.
        let tail = (losses.len() / 10).max(1);
        let mean = |xs: &[f64]| (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64);
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
            seed_offset: *seed_offset,
            zero_shot,
            steps: records.last().map_or(0, |r| r.step),
            final_loss: mean(&losses[losses.len().saturating_sub(tail)..]),
            mean_loss: mean(&losses),
            wall_s: walls[i],
            dino: None,
            clip_i: None,
            clip_t: None,
            images_scored: None,
        };
        if let Some((e, bench, ev)) = eval.as_mut() {
            let generated = plan.dir.join("dreambench");
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

/// A `[vae]` or `[stage1]` section that resolves to the same values (all but its folder) in several
/// runs — the variants that change only stage 2, for one seed — is trained once, by the first run
/// that has it. The others drop the section, start stage 2 from that run's export exactly as a plan
/// starts from its own (`stage2.stage.vae_dir`, `qformer_init = { stage1 = … }`, each only where the
/// plan would have), and wait for that run.
fn share_stages(jobs: &mut [Job]) -> Result<()> {
    let mut owners: HashMap<String, usize> = HashMap::new();
    for i in 0..jobs.len() {
        let mut shared = Vec::new();
        let vae = jobs[i].plan.vae.as_ref().map(|c| {
            let mut c = c.clone();
            c.run.dir = PathBuf::new();
            section_owner(&mut owners, "vae", &c, i)
        });
        if let Some(j) = vae.transpose()?.filter(|&j| j != i) {
            let owner = jobs[j].plan.vae.as_ref().context("the owner's [vae]")?;
            let export = blipd_stage2::autoencoder::export_dir(owner);
            let plan = &mut jobs[i].plan;
            if let Some(s2) = plan.stage2.as_mut() {
                if s2.stage.vae_dir.is_none() && s2.stage.model_dir.is_none() {
                    s2.stage.vae_dir = Some(export);
                }
            }
            plan.vae = None;
            shared.push(("[vae]", j));
        }
        let stage1 = jobs[i].plan.stage1.as_ref().map(|c| {
            let mut c = c.clone();
            c.run.dir = PathBuf::new();
            section_owner(&mut owners, "stage1", &c, i)
        });
        if let Some(j) = stage1.transpose()?.filter(|&j| j != i) {
            let owner = jobs[j]
                .plan
                .stage1
                .as_ref()
                .context("the owner's [stage1]")?;
            let export = blipd_stage1::run::export_dir(owner).join("qformer/model.safetensors");
            let plan = &mut jobs[i].plan;
            if let Some(s2) = plan.stage2.as_mut() {
                if s2.stage.qformer_init == blipd_stage2::QFormerInit::Pretrained {
                    s2.stage.qformer_init = blipd_stage2::QFormerInit::Stage1(export);
                }
            }
            plan.stage1 = None;
            shared.push(("[stage1]", j));
        }
        if !shared.is_empty() {
            let what: Vec<String> = shared
                .iter()
                .map(|&(s, j)| format!("{s} with {}", jobs[j].plan.dir.display()))
                .collect();
            tracing::info!(
                "sweep: {} shares {}",
                jobs[i].plan.dir.display(),
                what.join(" and ")
            );
        }
        let mut after: Vec<usize> = shared.into_iter().map(|(_, j)| j).collect();
        after.dedup();
        jobs[i].after = after;
    }
    Ok(())
}

/// The first run whose section `[tag]` has `cfg`'s values (its folder cleared), which is run `i` when no
/// run before it had them.
fn section_owner<C: Serialize>(
    owners: &mut HashMap<String, usize>,
    tag: &str,
    cfg: &C,
    i: usize,
) -> Result<usize> {
    let key = format!("[{tag}]\n{}", blipd_train::config::to_toml_string(cfg)?);
    Ok(*owners.entry(key).or_insert(i))
}

/// Runs every job, `parallel` at once, each as a `blipd resume <run dir>` process (after writing its
/// `plan.toml`) with the cores split between them (`RAYON_NUM_THREADS`); with more than one at once,
/// each one's output goes to `<run dir>/sweep.log`. Returns each job's wall time in seconds (a finished
/// run skipped: the time its marker recorded). On a failure no further run starts; those running
/// finish, then the sweep fails naming the failed runs and their logs.
fn run_all(jobs: &[Job], parallel: usize) -> Result<Vec<f64>> {
    let cores = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let threads = (cores / parallel).max(1);
    let exe = std::env::current_exe().context("locating the blipd binary")?;
    let mut state: Vec<State> = Vec::with_capacity(jobs.len());
    for job in jobs {
        let plan_text = job.plan.portable_toml()?;
        let done = std::fs::read_to_string(job.plan.dir.join(DONE_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<Done>(&t).ok())
            .filter(|d| d.plan == plan_text);
        state.push(match done {
            Some(d) => {
                tracing::info!(
                    "sweep: {} finished in an earlier sweep ({DONE_FILE} holds this plan); skipped",
                    job.plan.dir.display()
                );
                State::Done(d.wall_s)
            }
            None => State::Waiting,
        });
    }
    let total = jobs.len();
    let mut failed: Vec<String> = Vec::new();
    loop {
        let running = state
            .iter()
            .filter(|s| matches!(s, State::Running(..)))
            .count();
        let mut free = parallel.saturating_sub(running);
        for i in 0..jobs.len() {
            if free == 0 || !failed.is_empty() {
                break;
            }
            let ready = matches!(state[i], State::Waiting)
                && jobs[i]
                    .after
                    .iter()
                    .all(|&j| matches!(state[j], State::Done(_)));
            if !ready {
                continue;
            }
            let job = &jobs[i];
            job.plan.write()?;
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("resume")
                .arg(&job.plan.dir)
                .env("RAYON_NUM_THREADS", threads.to_string());
            let log = job.plan.dir.join("sweep.log");
            if parallel > 1 {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .with_context(|| format!("opening {}", log.display()))?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            let child = cmd
                .spawn()
                .with_context(|| format!("starting {} resume", exe.display()))?;
            let done = state.iter().filter(|s| matches!(s, State::Done(_))).count();
            tracing::info!(
                "sweep: [{done}/{total} done] variant {} seed +{} → {} (RAYON_NUM_THREADS={threads}{})",
                job.variant.name,
                job.seed_offset,
                job.plan.dir.display(),
                if parallel > 1 {
                    format!(", log {}", log.display())
                } else {
                    String::new()
                }
            );
            state[i] = State::Running(child, Instant::now());
            free -= 1;
        }
        if !state.iter().any(|s| matches!(s, State::Running(..))) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        for (i, s) in state.iter_mut().enumerate() {
            let State::Running(child, start) = s else {
                continue;
            };
            let Some(status) = child.try_wait()? else {
                continue;
            };
            let job = &jobs[i];
            let wall_s = start.elapsed().as_secs_f64();
            if status.success() {
                let done = Done {
                    plan: job.plan.portable_toml()?,
                    wall_s,
                };
                std::fs::write(
                    job.plan.dir.join(DONE_FILE),
                    serde_json::to_string_pretty(&done)?,
                )?;
                tracing::info!(
                    "sweep: variant {} seed +{} finished in {wall_s:.0} s",
                    job.variant.name,
                    job.seed_offset
                );
                *s = State::Done(wall_s);
            } else {
                let msg = format!(
                    "variant {} seed +{} ({}) {status}{}",
                    job.variant.name,
                    job.seed_offset,
                    job.plan.dir.display(),
                    if parallel > 1 {
                        format!("; its output: {}", job.plan.dir.join("sweep.log").display())
                    } else {
                        String::new()
                    }
                );
                tracing::error!("sweep: {msg}");
                failed.push(msg);
                *s = State::Failed;
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} run(s) failed (rerun the sweep to resume them; finished runs are skipped):\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    Ok(state
        .into_iter()
        .map(|s| match s {
            State::Done(w) => w,
            _ => f64::NAN,
        })
        .collect())
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
            " subject fidelity, zero-shot | subject fidelity, text-only | gap | text alignment, \
             zero-shot | text alignment, text-only |",
        );
        rule.push_str("---:|---:|---:|---:|---:|");
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
            col(&|r| r.final_loss),
            col(&|r| r.mean_loss),
        ));
        if micro {
            let z = |f: fn(&blipd_apps::micro::ZeroShotReport) -> f64| {
                col(&|r: &VariantResult| r.zero_shot.as_ref().map(f))
            };
            s.push_str(&format!(
                " {} | {} | {} | {} | {} |",
                z(|z| z.subject_fidelity_zero_shot),
                z(|z| z.subject_fidelity_text_only),
                // Per seed, then mean ± std: the seeds' spread of the difference itself.
                z(|z| z.subject_fidelity_zero_shot - z.subject_fidelity_text_only),
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
