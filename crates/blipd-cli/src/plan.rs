//! A pre-training plan: the stages to run, in order, each a full run config, under one folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use blipd_stage1::run::Stage1RunConfig;
use blipd_stage2::autoencoder::VaeRunConfig;
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
    /// The VAE of a micro world, trained as an autoencoder first; stage 2 then starts from its
    /// export unless `stage2.stage.vae_dir` names another.
    #[serde(default)]
    pub vae: Option<VaeRunConfig>,
    /// Stage 1: BLIP-2 multimodal representation learning (ITC, ITM, ITG). When it runs, stage 2's
    /// Q-Former starts from its export unless `stage2.stage.qformer_init` says otherwise.
    #[serde(default)]
    pub stage1: Option<Stage1RunConfig>,
    /// Stage 2: subject representation learning.
    #[serde(default)]
    pub stage2: Option<Stage2RunConfig>,
    /// Evaluation of the trained model on the held-out subjects of the procedural world (zero-shot
    /// vs text-only), after stage 2: `<dir>/eval/zero_shot.json` and a sample sheet.
    #[serde(default)]
    pub eval: Option<blipd_apps::micro::MicroEvalConfig>,
}

/// The file a plan's resolved config is written to, inside its `dir`.
pub const PLAN_FILE: &str = "plan.toml";

impl PretrainPlan {
    /// Parse a plan (TOML text), apply `--set` overrides, then `run_dir` (replacing `dir`), make
    /// stage run dirs that are relative paths under `dir`, and validate every stage (values, data
    /// sources, the files they name) before anything runs.
    pub fn parse(text: &str, sets: &[String], run_dir: Option<&Path>) -> Result<Self> {
        let mut plan: PretrainPlan = blipd_train::parse_config(text, sets)?;
        if let Some(d) = run_dir {
            plan.dir = d.to_path_buf();
        }
        let root = plan.dir.clone();
        for dir in plan.stage_dirs_mut() {
            if dir.is_relative() {
                *dir = root.join(&*dir);
            }
        }
        if plan.vae.is_none() && plan.stage1.is_none() && plan.stage2.is_none() {
            anyhow::bail!(
                "the plan has no stage to run (add a [vae], [stage1] or [stage2] section)"
            );
        }
        plan.validate()?;
        Ok(plan)
    }

    pub fn load(path: &Path, sets: &[String], run_dir: Option<&Path>) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, sets, run_dir).with_context(|| format!("config {}", path.display()))
    }

    /// The plan of an existing run folder (`blipd resume RUN_DIR`): its `plan.toml`, with every stage
    /// folder inside `run_dir` wherever the folder is now (moved, copied, or named by a relative path
    /// from another working directory).
    pub fn open_run(run_dir: &Path, sets: &[String]) -> Result<Self> {
        let path = run_dir.join(PLAN_FILE);
        if !path.is_file() {
            anyhow::bail!(
                "{} has no {PLAN_FILE}: is it the folder `blipd pretrain` wrote?",
                run_dir.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let text =
            migrate_run_relative(&text).with_context(|| format!("config {}", path.display()))?;
        Self::parse(&text, sets, Some(run_dir))
            .with_context(|| format!("config {}", path.display()))
    }

    /// Adds `k` to the seed of every stage and of `[eval]` (`blipd sweep`'s `seeds`).
    pub fn shift_seeds(&mut self, k: u64) {
        if let Some(s) = self.vae.as_mut() {
            s.run.seed = s.run.seed.wrapping_add(k);
        }
        if let Some(s) = self.stage1.as_mut() {
            s.run.seed = s.run.seed.wrapping_add(k);
        }
        if let Some(s) = self.stage2.as_mut() {
            s.run.seed = s.run.seed.wrapping_add(k);
        }
        if let Some(e) = self.eval.as_mut() {
            e.seed = e.seed.wrapping_add(k);
        }
    }

    /// Every stage's values checked before any stage starts (a bad stage-2 value fails before stage 1).
    pub fn validate(&self) -> Result<()> {
        if let Some(v) = &self.vae {
            blipd_stage2::autoencoder::validate_config(v).context("[vae]")?;
        }
        if let Some(e) = &self.eval {
            e.validate().context("[eval]")?;
            if self.stage2.is_none() {
                anyhow::bail!("[eval] evaluates stage 2's export: the plan has no [stage2]");
            }
        }
        if let Some(s1) = &self.stage1 {
            blipd_stage1::run::validate_config(s1).context("[stage1]")?;
        }
        if let Some(s2) = &self.stage2 {
            blipd_stage2::run::validate_config(s2).context("[stage2]")?;
        }
        Ok(())
    }

    /// The `[checkpoint]` section of every stage of the plan.
    pub fn checkpoint_sections_mut(
        &mut self,
    ) -> impl Iterator<Item = &mut blipd_train::config::CheckpointSection> {
        let v = self.vae.as_mut().map(|s| &mut s.checkpoint);
        let s1 = self.stage1.as_mut().map(|s| &mut s.checkpoint);
        let s2 = self.stage2.as_mut().map(|s| &mut s.checkpoint);
        v.into_iter().chain(s1).chain(s2)
    }

    fn stage_dirs_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        let v = self.vae.as_mut().map(|s| &mut s.run.dir);
        let s1 = self.stage1.as_mut().map(|s| &mut s.run.dir);
        let s2 = self.stage2.as_mut().map(|s| &mut s.run.dir);
        v.into_iter().chain(s1).chain(s2)
    }

    /// Write the resolved plan into its folder (what `blipd resume` reads). The file does not depend
    /// on where the folder is: `dir = "."`, stage folders inside it are written relative to it, and
    /// inputs named by relative paths (data, weights, vocabularies) are written absolute, so the run
    /// resumes from any working directory, after `mv`, and in a copy (which then writes only to itself).
    pub fn write(&self) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let path = self.dir.join(PLAN_FILE);
        let text = self.portable_toml()?;
        blipd_models::weights::atomic_write(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The text [`write`](Self::write) puts in `plan.toml`.
    pub fn portable_toml(&self) -> Result<String> {
        let mut portable = self.clone();
        let cwd = std::env::current_dir().context("reading the working directory")?;
        let root = std::path::absolute(&self.dir).unwrap_or_else(|_| cwd.join(&self.dir));
        portable.dir = PathBuf::from(".");
        for dir in portable.stage_dirs_mut() {
            let abs = std::path::absolute(&*dir).unwrap_or_else(|_| cwd.join(&*dir));
            match abs.strip_prefix(&root) {
                Ok(rel) if rel.as_os_str().is_empty() => *dir = PathBuf::from("."),
                Ok(rel) => *dir = rel.to_path_buf(),
                Err(_) => {
                    tracing::warn!(
                        "stage folder {} is outside the run folder {}: a moved or copied run still \
                         writes there",
                        abs.display(),
                        root.display()
                    );
                    *dir = abs;
                }
            }
        }
        for input in portable.input_paths_mut() {
            if input.is_relative() {
                *input = cwd.join(&*input);
            }
        }
        Ok(blipd_train::config::to_toml_string(&portable)?)
    }

    /// Every input path of the plan (read, never written by the run).
    fn input_paths_mut(&mut self) -> Vec<&mut PathBuf> {
        let mut out: Vec<&mut PathBuf> = Vec::new();
        if let Some(s1) = self.stage1.as_mut() {
            let (st, d) = (&mut s1.stage, &mut s1.data);
            out.extend(
                [
                    st.model_dir.as_mut(),
                    st.bert_init.as_mut(),
                    st.heads_init.as_mut(),
                    st.bert_vocab.as_mut(),
                    d.list.as_mut(),
                    d.image_root.as_mut(),
                    d.shards.as_mut(),
                ]
                .into_iter()
                .flatten(),
            );
        }
        if let Some(s2) = self.stage2.as_mut() {
            let (st, d) = (&mut s2.stage, &mut s2.data);
            out.extend(
                [
                    st.model_dir.as_mut(),
                    st.bert_vocab.as_mut(),
                    st.vae_dir.as_mut(),
                    d.shards.as_mut(),
                ]
                .into_iter()
                .flatten(),
            );
            if let blipd_stage2::QFormerInit::Stage1(p) = &mut st.qformer_init {
                out.push(p);
            }
        }
        out
    }
}

/// `plan.toml` files written before run folders were self-relative stored `dir = "runs/tiny"` and
/// stage folders as `"runs/tiny/stage1"` (relative to the working directory, and one level deeper after
/// each resume): strip the stored `dir` from the front of such stage folders so they resolve inside the
/// run folder again. A file with `dir = "."` is returned unchanged.
fn migrate_run_relative(text: &str) -> Result<String> {
    let mut doc: toml::Table = text.parse().context("parsing TOML")?;
    let Some(dir) = doc.get("dir").and_then(|d| d.as_str()).map(PathBuf::from) else {
        return Ok(text.to_string());
    };
    if dir == Path::new(".") || dir.is_absolute() || dir.as_os_str().is_empty() {
        return Ok(text.to_string());
    }
    let mut changed = false;
    for stage in ["vae", "stage1", "stage2"] {
        let Some(run) = doc
            .get_mut(stage)
            .and_then(|s| s.get_mut("run"))
            .and_then(|r| r.as_table_mut())
        else {
            continue;
        };
        let Some(mut sdir) = run.get("dir").and_then(|d| d.as_str()).map(PathBuf::from) else {
            continue;
        };
        while sdir.is_relative() {
            match sdir.strip_prefix(&dir) {
                Ok(rest) if !rest.as_os_str().is_empty() => {
                    sdir = rest.to_path_buf();
                    changed = true;
                }
                _ => break,
            }
        }
        run.insert(
            "dir".into(),
            toml::Value::String(sdir.to_string_lossy().into_owned()),
        );
    }
    if !changed {
        return Ok(text.to_string());
    }
    tracing::info!(
        "{PLAN_FILE} was written by an older blipd (stage folders relative to the working directory): \
         reading its stage folders inside the run folder"
    );
    toml::to_string(&doc).context("re-serialising the plan")
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
                    // Full-size configs name weights and data this checkout does not have: those
                    // (and only those) may fail validation, on the missing file.
                    let text = std::fs::read_to_string(&p).unwrap();
                    let plan: PretrainPlan = blipd_train::parse_config(&text, &[])
                        .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                    assert!(plan.vae.is_some() || plan.stage1.is_some() || plan.stage2.is_some());
                    if let Err(e) = PretrainPlan::load(&p, &[], None) {
                        let msg = format!("{e:#}");
                        assert!(msg.contains("no such file"), "{}: {msg}", p.display());
                    }
                    n += 1;
                }
            }
        }
        assert!(n >= 5, "found {n} plan configs");
        let tiny = PretrainPlan::parse(TINY, &[], None).unwrap();
        assert!(tiny.stage1.is_some() && tiny.stage2.is_some());
    }

    /// The micro plan's sections are checked before anything runs, each error naming its key.
    #[test]
    fn micro_plan_sections_are_validated() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/micro.toml"),
        )
        .unwrap();
        let plan = PretrainPlan::parse(&text, &[], None).unwrap();
        assert!(plan.vae.is_some() && plan.eval.is_some());
        let err = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            format!("{:#}", PretrainPlan::parse(&text, &sets, None).unwrap_err())
        };
        let e = err(&["vae.stage.preset=\"huge\""]);
        assert!(e.contains("[vae]") && e.contains("huge"), "{e}");
        let e = err(&["vae.data.size=31"]);
        assert!(e.contains("size = 31"), "{e}");
        let e = err(&["eval.steps=0"]);
        assert!(e.contains("[eval]") && e.contains("steps"), "{e}");
        let e = err(&["stage2.stage.preset=\"giant\""]);
        assert!(e.contains("giant"), "{e}");
        // [eval.finetune]: overridable, unset keys default, bad values named.
        let ft = PretrainPlan::parse(&text, &["eval.finetune.steps=40".into()], None).unwrap();
        let ft = ft.eval.unwrap().finetune.unwrap();
        assert_eq!((ft.steps, ft.subjects, ft.batch_size), (40, 8, 3));
        // subjects = 0 turns fine-tuning off: its other keys are then not checked.
        let off = [
            "eval.finetune.subjects=0".into(),
            "eval.finetune.steps=0".into(),
        ];
        let off = PretrainPlan::parse(&text, &off, None).unwrap();
        assert_eq!(off.eval.unwrap().finetune.unwrap().subjects, 0);
        let e = err(&["eval.finetune.steps=0"]);
        assert!(e.contains("[eval.finetune]") && e.contains("steps"), "{e}");
        let e = err(&["eval.finetune.subjects=20"]);
        assert!(e.contains("only 19 held-out"), "{e}");
        let e = err(&["eval.finetune.lr=-1.0"]);
        assert!(e.contains("lr"), "{e}");
        // Seeds shift every stage and the evaluation together.
        let mut shifted = plan.clone();
        shifted.shift_seeds(2);
        assert_eq!(
            shifted.vae.unwrap().run.seed,
            plan.vae.as_ref().unwrap().run.seed + 2
        );
        assert_eq!(
            shifted.stage2.unwrap().run.seed,
            plan.stage2.as_ref().unwrap().run.seed + 2
        );
        assert_eq!(
            shifted.eval.unwrap().seed,
            plan.eval.as_ref().unwrap().seed + 2
        );
    }

    /// An old plan.toml (stage folders relative to the working directory, possibly nested deeper by
    /// earlier resumes) resolves its stage folders inside the run folder again.
    #[test]
    fn old_plan_files_are_migrated_to_run_relative_stage_dirs() {
        let old = "dir = \"runs/tiny\"\n[stage1.run]\ndir = \"runs/tiny/runs/tiny/stage1\"\n\
                   [stage2.run]\ndir = \"runs/tiny/stage2\"\n";
        let new: toml::Table = migrate_run_relative(old).unwrap().parse().unwrap();
        assert_eq!(new["stage1"]["run"]["dir"].as_str(), Some("stage1"));
        assert_eq!(new["stage2"]["run"]["dir"].as_str(), Some("stage2"));
        // Already self-relative, absolute, or not under dir: unchanged.
        for text in [
            "dir = \".\"\n[stage1.run]\ndir = \"stage1\"\n",
            "dir = \"/abs/run\"\n[stage1.run]\ndir = \"/abs/run/stage1\"\n",
            "dir = \"runs/a\"\n[stage1.run]\ndir = \"elsewhere/stage1\"\n",
        ] {
            assert_eq!(migrate_run_relative(text).unwrap(), text);
        }
    }

    /// The written plan does not depend on where the run folder is: `dir = "."`, stage folders relative
    /// to it, and `open_run` from the folder's new place (after a move) puts the stages inside it.
    #[test]
    fn written_plan_is_self_relative_and_follows_a_moved_folder() {
        let tmp = std::env::temp_dir().join(format!("blipd-plan-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let run = tmp.join("run");
        let plan = PretrainPlan::parse(TINY, &[], Some(&run)).unwrap();
        assert_eq!(plan.stage1.as_ref().unwrap().run.dir, run.join("stage1"));
        let path = plan.write().unwrap();
        let written: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        assert_eq!(written["dir"].as_str(), Some("."));
        assert_eq!(written["stage1"]["run"]["dir"].as_str(), Some("stage1"));
        assert_eq!(written["stage2"]["run"]["dir"].as_str(), Some("stage2"));
        let moved = tmp.join("moved");
        std::fs::rename(&run, &moved).unwrap();
        let reopened = PretrainPlan::open_run(&moved, &[]).unwrap();
        assert_eq!(reopened.dir, moved);
        assert_eq!(reopened.stage1.unwrap().run.dir, moved.join("stage1"));
        assert_eq!(reopened.stage2.unwrap().run.dir, moved.join("stage2"));
        let err = PretrainPlan::open_run(&run, &[]).unwrap_err();
        assert!(format!("{err:#}").contains("has no plan.toml"), "{err:#}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
