//! `blipd sweep FILE`: run variants of a pre-training plan (the paper's Table 2 ablations) and write one
//! comparison table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

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

/// One result.
#[derive(Clone, Debug, Serialize)]
pub struct VariantResult {
    pub name: String,
    pub description: String,
    pub steps: u64,
    /// Mean training loss over the last 10% of steps (at least the last step).
    pub final_loss: f64,
    /// Mean training loss over all steps.
    pub mean_loss: f64,
    pub wall_s: f64,
}

pub fn run(path: &Path, extra_sets: &[String]) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let sweep: SweepConfig =
        toml::from_str(&text).with_context(|| format!("sweep file {}", path.display()))?;
    if sweep.variants.is_empty() {
        bail!("{}: no [[variant]]", path.display());
    }
    let base = path.parent().unwrap_or(Path::new(".")).join(&sweep.base);
    let base_text = std::fs::read_to_string(&base)
        .with_context(|| format!("reading base plan {}", base.display()))?;
    let mut results = Vec::new();
    for v in &sweep.variants {
        let mut sets = sweep.set.clone();
        sets.extend(v.set.iter().cloned());
        sets.extend(extra_sets.iter().cloned());
        let dir = sweep.dir.join(&v.name);
        let plan = PretrainPlan::parse(&base_text, &sets, Some(&dir))
            .with_context(|| format!("variant {}", v.name))?;
        tracing::info!("sweep: variant {} → {}", v.name, dir.display());
        let start = Instant::now();
        crate::pretrain(plan.clone()).with_context(|| format!("variant {}", v.name))?;
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
        results.push(VariantResult {
            name: v.name.clone(),
            description: v.description.clone(),
            steps: losses.len() as u64,
            final_loss,
            mean_loss,
            wall_s,
        });
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

fn table(rows: &[VariantResult]) -> String {
    let mut s = String::from(
        "| variant | change | steps | final loss (last 10%) | mean loss | wall s |\n|---|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {:.1} |\n",
            r.name, r.description, r.steps, r.final_loss, r.mean_loss, r.wall_s
        ));
    }
    s
}
