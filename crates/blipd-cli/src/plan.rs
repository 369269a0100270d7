//! A pre-training plan: the stages to run, in order, each a full run config, under one folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use blipd_stage1::run::Stage1RunConfig;
use blipd_stage2::run::Stage2RunConfig;
use serde::{Deserialize, Serialize};

/// The embedded default (`configs/tiny.toml`).
pub const TINY: &str = include_str!("../../../configs/tiny.toml");

/// `blipd pretrain --config FILE`: the root folder and each stage's run config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainPlan {
    /// Root folder of the run; stage run dirs that are relative are taken inside it.
    pub dir: PathBuf,
    /// Stage 1: BLIP-2 multimodal representation learning (ITC, ITM, ITG). When it runs, stage 2's
    /// Q-Former starts from its export unless `stage2.stage.qformer_init` says otherwise.
    #[serde(default)]
    pub stage1: Option<Stage1RunConfig>,
    /// Stage 2: subject representation learning.
    #[serde(default)]
    pub stage2: Option<Stage2RunConfig>,
}

/// The file a plan's resolved config is written to, inside its `dir`.
pub const PLAN_FILE: &str = "plan.toml";

impl PretrainPlan {
    /// Parse a plan (TOML text), apply `--set` overrides, then `run_dir` (replacing `dir`), and make
    /// stage run dirs absolute under `dir`.
    pub fn parse(text: &str, sets: &[String], run_dir: Option<&Path>) -> Result<Self> {
        let mut plan: PretrainPlan = blipd_train::parse_config(text, sets)?;
        if let Some(d) = run_dir {
            plan.dir = d.to_path_buf();
        }
        let root = plan.dir.clone();
        if let Some(s1) = plan.stage1.as_mut() {
            if s1.run.dir.is_relative() {
                s1.run.dir = root.join(&s1.run.dir);
            }
        }
        if let Some(s2) = plan.stage2.as_mut() {
            if s2.run.dir.is_relative() {
                s2.run.dir = root.join(&s2.run.dir);
            }
        }
        if plan.stage1.is_none() && plan.stage2.is_none() {
            anyhow::bail!("the plan has no stage to run (add a [stage1] or [stage2] section)");
        }
        Ok(plan)
    }

    pub fn load(path: &Path, sets: &[String], run_dir: Option<&Path>) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, sets, run_dir).with_context(|| format!("config {}", path.display()))
    }

    /// Write the resolved plan into its folder (what `blipd resume` reads).
    pub fn write(&self) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let path = self.dir.join(PLAN_FILE);
        let text = blipd_train::config::to_toml_string(self)?;
        blipd_models::weights::atomic_write(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped plan config parses (unknown keys would be errors) and names at least one stage.
    #[test]
    fn shipped_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for sub in ["", "stage1", "stage2"] {
            for e in std::fs::read_dir(root.join(sub)).unwrap().flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "toml") {
                    let plan = PretrainPlan::load(&p, &[], None)
                        .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                    assert!(plan.stage1.is_some() || plan.stage2.is_some());
                    n += 1;
                }
            }
        }
        assert!(n >= 5, "found {n} plan configs");
        let tiny = PretrainPlan::parse(TINY, &[], None).unwrap();
        assert!(tiny.stage1.is_some() && tiny.stage2.is_some());
    }
}
