//! Typed TOML run configs with strict keys and `--set key.sub=value` overrides.
//!
//! Every section is `#[serde(deny_unknown_fields)]`, so a misspelt key is an error that names
//! it (with its line in the file). Overrides are applied to the TOML document (after its
//! defaults have been filled in) before it is deserialised again; an override whose key the
//! schema does not have fails with an error naming the dotted key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ema::EmaConfig;
use crate::error::ConfigError;
use crate::optim::AdamWConfig;
use crate::schedule::ScheduleConfig;

/// `[run]`: where the run lives and its seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Run directory: config, metrics, checkpoints and samples go here.
    pub dir: PathBuf,
    /// Seed of every random stream of the run (stage, data order, sampling).
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_seed() -> u64 {
    42
}

/// `[train]`: loop length, batch geometry, logging.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Number of optimizer steps of the whole run.
    pub max_steps: u64,
    /// Samples per micro-batch per rank (informational for the trainer: the data source makes
    /// the batches; it is used for samples/s and the samples counter).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[serde(default = "one_usize")]
    pub grad_accum_steps: usize,
    /// Write a metrics line every this many steps (the line averages the steps since the last).
    #[serde(default = "one_u64")]
    pub log_every: u64,
    /// Show a progress bar (only drawn on a terminal).
    #[serde(default = "yes")]
    pub progress: bool,
    /// Before each micro-step, seed the backend's own generator (`Tensor::random`) from the
    /// stage stream, so that backend randomness is part of the exact resume too.
    #[serde(default = "yes")]
    pub seed_backend: bool,
    /// `"bf16"`: the stages run their matrix products (linear, convolution, attention) in bf16
    /// under an autocast scope, with f32 weights, gradients and optimizer state ("master weights";
    /// accelerate's `--mixed_precision bf16`). `"no"` (default): all f32. Needs a backend with bf16
    /// kernels (the `cuda` build); fp16 is not offered (it would need loss scaling).
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
    /// `max_steps = 0` trains nothing and is refused, unless this says the run exists to export its
    /// initial weights on purpose (the paper's "without multimodal pre-training" ablation runs stage 1
    /// with 0 steps, so stage 2 starts from the Q-Former as stage 1 initialises it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub export_untrained: bool,
}

/// `[train] mixed_precision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    #[default]
    No,
    Bf16,
}

impl MixedPrecision {
    /// The autocast dtype (`None`: no autocast).
    pub fn dtype(self) -> Option<burn::tensor::FloatDType> {
        match self {
            MixedPrecision::No => None,
            MixedPrecision::Bf16 => Some(burn::tensor::FloatDType::BF16),
        }
    }

    /// Checks that backend `name` (`Backend::name`) has the dtype's kernels: ndarray has no bf16.
    /// `setting` names where the user chose it (`[train] mixed_precision`, `--mixed-precision`).
    pub fn check_backend(self, name: &str, setting: &str) -> std::result::Result<(), String> {
        if self == MixedPrecision::Bf16 && name.contains("ndarray") {
            return Err(format!(
                "{setting} bf16 needs a backend with bf16 kernels (build with --features cuda or \
                 flex); this build's backend is {name}, which has none: use \"no\""
            ));
        }
        Ok(())
    }
}

fn one_usize() -> usize {
    1
}
fn one_u64() -> u64 {
    1
}
fn yes() -> bool {
    true
}

/// `[checkpoint]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Save every this many steps (0 = only at the end, if `at_end`).
    #[serde(default)]
    pub every: u64,
    /// Keep the newest N checkpoints (0 = keep all).
    #[serde(default = "default_keep")]
    pub keep_last: usize,
    /// Save when the run reaches `max_steps`.
    #[serde(default = "yes")]
    pub at_end: bool,
    /// Resume from the newest valid checkpoint of the run directory when there is one.
    #[serde(default = "yes")]
    pub resume: bool,
    /// When the run directory has checkpoints and none of them verifies, set them aside and start
    /// from step 0 instead of stopping with the list of what was rejected (`--restart`). Not written
    /// to configs: it is a decision for one invocation.
    #[serde(default, skip_serializing)]
    pub restart: bool,
}

fn default_keep() -> usize {
    3
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: 0,
            keep_last: default_keep(),
            at_end: true,
            resume: true,
            restart: false,
        }
    }
}

/// `[sample]`: calls of [`crate::Stage::sample`] during training.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSection {
    /// Sample every this many steps (0 = never).
    #[serde(default)]
    pub every: u64,
    /// Also sample after the last step.
    #[serde(default)]
    pub at_end: bool,
}

/// The trainer's part of a run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerConfig {
    pub run: RunSection,
    pub train: TrainSection,
    pub optimizer: AdamWConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub ema: EmaConfig,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub sample: SampleSection,
}

impl TrainerConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                reason: reason.into(),
            })
        };
        if self.train.max_steps == 0 && !self.train.export_untrained {
            return bad(
                "train.max_steps",
                "0 trains nothing; set train.export_untrained = true if the run is meant to export \
                 its initial weights (as the \"without multimodal pre-training\" ablation does)",
            );
        }
        if self.train.grad_accum_steps == 0 {
            return bad("train.grad_accum_steps", "must be at least 1");
        }
        if self.train.batch_size == 0 {
            return bad("train.batch_size", "must be at least 1");
        }
        if self.train.log_every == 0 {
            return bad("train.log_every", "must be at least 1");
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr >= 0.0) {
            return bad("optimizer.lr", "must be a finite non-negative number");
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return bad("optimizer.betas", "each beta must be in [0, 1)");
        }
        if o.eps.is_nan() || o.eps <= 0.0 {
            return bad("optimizer.eps", "must be positive");
        }
        if let Some(m) = o.max_grad_norm {
            if m.is_nan() || m <= 0.0 {
                return bad("optimizer.max_grad_norm", "must be positive");
            }
        }
        if !(0.0..=1.0).contains(&self.ema.decay) {
            return bad("ema.decay", "must be in [0, 1]");
        }
        Ok(())
    }
}

/// A complete run config: the trainer's sections plus the stage's `[stage]` and the data
/// pipeline's `[data]` (both typed by the stage crate; make them `deny_unknown_fields` too).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig<S, D = NoConfig> {
    pub run: RunSection,
    pub train: TrainSection,
    pub optimizer: AdamWConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub ema: EmaConfig,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub sample: SampleSection,
    pub stage: S,
    #[serde(default)]
    pub data: D,
}

impl<S, D> RunConfig<S, D> {
    /// The trainer's sections.
    pub fn trainer(&self) -> TrainerConfig {
        TrainerConfig {
            run: self.run.clone(),
            train: self.train.clone(),
            optimizer: self.optimizer.clone(),
            schedule: self.schedule.clone(),
            ema: self.ema.clone(),
            checkpoint: self.checkpoint.clone(),
            sample: self.sample.clone(),
        }
    }
}

/// An empty section (for stages without a `[data]` table).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Reads a TOML config file into `C`, then applies `--set` overrides (`key.sub=value`).
pub fn load_config<C>(path: &Path, overrides: &[String]) -> Result<C, ConfigError>
where
    C: DeserializeOwned + Serialize,
{
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        source: e,
    })?;
    parse_config(&text, overrides).map_err(|e| match e {
        ConfigError::Parse { message, .. } => ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        },
        other => other,
    })
}

/// [`load_config`] on a TOML string (errors report the path as `<string>`).
pub fn parse_config<C>(text: &str, overrides: &[String]) -> Result<C, ConfigError>
where
    C: DeserializeOwned + Serialize,
{
    let base: C = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: PathBuf::from("<string>"),
        message: e.to_string(),
    })?;
    if overrides.is_empty() {
        return Ok(base);
    }
    let mut doc =
        toml::Table::try_from(&base).map_err(|e| ConfigError::Serialize(e.to_string()))?;
    for arg in overrides {
        let (key, value) = split_override(arg)?;
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::MalformedOverride {
                arg: arg.clone(),
                reason: "empty key segment".into(),
            });
        }
        let existed = set_path(&mut doc, &parts, value, arg)?;
        // Deserialise after each override so the error points at this one.
        if let Err(e) = C::deserialize(toml::Value::Table(doc.clone())) {
            let message = e.to_string();
            // A key absent from the document is unknown only if serde says so: an unset optional
            // key (`optimizer.max_grad_norm`) with a value of the wrong type is an invalid value.
            return Err(if existed || !message.contains("unknown field") {
                ConfigError::InvalidOverride {
                    arg: arg.clone(),
                    message,
                }
            } else {
                ConfigError::UnknownKey {
                    key: key.to_string(),
                    arg: arg.clone(),
                    message,
                }
            });
        }
    }
    C::deserialize(toml::Value::Table(doc)).map_err(|e| ConfigError::Parse {
        path: PathBuf::from("<overrides>"),
        message: e.to_string(),
    })
}

fn split_override(arg: &str) -> Result<(&str, toml::Value), ConfigError> {
    let Some((key, raw)) = arg.split_once('=') else {
        return Err(ConfigError::MalformedOverride {
            arg: arg.to_string(),
            reason: "expected key.sub=value".into(),
        });
    };
    let key = key.trim();
    let raw = raw.trim();
    // A TOML value when it parses as one (numbers, booleans, arrays, quoted strings), else the
    // raw text as a string, so `--set run.dir=/tmp/x` needs no quotes.
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    Ok((key, value))
}

/// Sets `parts` in `doc` to `value`; returns whether the key existed. An integer written where
/// the document has a float becomes a float.
fn set_path(
    doc: &mut toml::Table,
    parts: &[&str],
    value: toml::Value,
    arg: &str,
) -> Result<bool, ConfigError> {
    let (last, parents) = parts.split_last().expect("non-empty key");
    let mut table = doc;
    for (i, p) in parents.iter().enumerate() {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(ConfigError::UnknownKey {
                    key: parts.join("."),
                    arg: arg.to_string(),
                    message: format!("`{}` is a value, not a table", parents[..=i].join(".")),
                })
            }
        };
    }
    let value = match (table.get(*last), value) {
        (Some(toml::Value::Float(_)), toml::Value::Integer(i)) => toml::Value::Float(i as f64),
        (_, v) => v,
    };
    Ok(table.insert(last.to_string(), value).is_some())
}

/// The config as TOML text (defaults filled in), for the run directory and checkpoints.
pub fn to_toml_string<C: Serialize>(config: &C) -> Result<String, ConfigError> {
    toml::to_string_pretty(config).map_err(|e| ConfigError::Serialize(e.to_string()))
}

/// Checks that every input a config names exists: `(key, path)` pairs, absent paths skipped; the
/// message names the first missing one by its key (`"[stage] model_dir = …: no such file or folder"`).
pub fn require_existing<'a>(
    named: impl IntoIterator<Item = (&'a str, Option<&'a std::path::PathBuf>)>,
) -> std::result::Result<(), String> {
    for (key, path) in named {
        if let Some(p) = path.filter(|p| !p.exists()) {
            return Err(format!("{key} = {}: no such file or folder", p.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct StageCfg {
        width: usize,
        #[serde(default)]
        dropout: f64,
    }

    const GOOD: &str = r#"
[run]
dir = "/tmp/run"

[train]
max_steps = 100
batch_size = 4

[optimizer]
lr = 1e-4

[stage]
width = 8
"#;

    type Cfg = RunConfig<StageCfg>;

    #[test]
    fn defaults_are_pytorch_and_lavis() {
        let c: Cfg = parse_config(GOOD, &[]).unwrap();
        assert_eq!(c.optimizer.betas, [0.9, 0.999]);
        assert_eq!(c.optimizer.eps, 1e-8);
        assert_eq!(c.optimizer.weight_decay, 0.01);
        assert_eq!(c.optimizer.decay_min_ndim, 2);
        assert_eq!(c.train.grad_accum_steps, 1);
        assert_eq!(c.run.seed, 42);
        assert!(!c.ema.enabled);
        c.trainer().validate().unwrap();
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let bad = GOOD.replace("lr = 1e-4", "lr = 1e-4\nlrr = 3");
        let err = parse_config::<Cfg>(&bad, &[]).unwrap_err().to_string();
        assert!(err.contains("lrr"), "{err}");
        let bad = GOOD.replace("width = 8", "widht = 8");
        let err = parse_config::<Cfg>(&bad, &[]).unwrap_err().to_string();
        assert!(err.contains("widht"), "{err}");
        let bad = GOOD.replace("[stage]", "[stagee]");
        let err = parse_config::<Cfg>(&bad, &[]).unwrap_err().to_string();
        assert!(err.contains("stagee"), "{err}");
    }

    #[test]
    fn wrong_type_and_missing_key_are_named() {
        let bad = GOOD.replace("lr = 1e-4", "lr = \"fast\"");
        let err = parse_config::<Cfg>(&bad, &[]).unwrap_err().to_string();
        assert!(err.contains("lr"), "{err}");
        let bad = GOOD.replace("max_steps = 100\n", "");
        let err = parse_config::<Cfg>(&bad, &[]).unwrap_err().to_string();
        assert!(err.contains("max_steps"), "{err}");
    }

    #[test]
    fn overrides_apply_and_coerce() {
        let sets: Vec<String> = [
            "optimizer.lr=3e-4",
            "optimizer.weight_decay=0",
            "optimizer.max_grad_norm=1.0",
            "ema.enabled=true",
            "run.dir=/data/runs/x",
            "stage.dropout=1",
            "train.max_steps=7",
            "schedule.kind=\"cosine\"",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let c: Cfg = parse_config(GOOD, &sets).unwrap();
        assert_eq!(c.optimizer.lr, 3e-4);
        assert_eq!(c.optimizer.weight_decay, 0.0);
        assert_eq!(c.optimizer.max_grad_norm, Some(1.0));
        assert!(c.ema.enabled);
        assert_eq!(c.run.dir, PathBuf::from("/data/runs/x"));
        assert_eq!(c.stage.dropout, 1.0);
        assert_eq!(c.train.max_steps, 7);
        assert_eq!(c.schedule.kind, crate::schedule::ScheduleKind::Cosine);
    }

    #[test]
    fn unknown_override_key_is_named() {
        for (arg, key) in [
            ("optimizer.lrr=1", "optimizer.lrr"),
            ("stage.widht=3", "stage.widht"),
            ("nosuch.key=1", "nosuch.key"),
            ("optimizer.lr.x=1", "optimizer.lr.x"),
        ] {
            let err = parse_config::<Cfg>(GOOD, &[arg.to_string()]).unwrap_err();
            assert!(
                matches!(err, ConfigError::UnknownKey { .. }),
                "{arg}: {err:?}"
            );
            assert!(err.to_string().contains(key), "{arg}: {err}");
        }
        for (arg, key) in [
            ("train.max_steps=abc", "max_steps"),
            // Unset in GOOD (an optional key): still a bad value, not an unknown key.
            ("optimizer.max_grad_norm=abc", "max_grad_norm"),
        ] {
            let err = parse_config::<Cfg>(GOOD, &[arg.to_string()]).unwrap_err();
            assert!(
                matches!(err, ConfigError::InvalidOverride { .. }),
                "{arg}: {err:?}"
            );
            assert!(err.to_string().contains(key), "{arg}: {err}");
        }
        let err = parse_config::<Cfg>(GOOD, &["novalue".to_string()]).unwrap_err();
        assert!(
            matches!(err, ConfigError::MalformedOverride { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn resolved_config_round_trips() {
        let c: Cfg = parse_config(GOOD, &["optimizer.max_grad_norm=0.5".into()]).unwrap();
        let text = to_toml_string(&c).unwrap();
        let back: Cfg = parse_config(&text, &[]).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn validation_names_key() {
        let c: Cfg = parse_config(GOOD, &["train.grad_accum_steps=0".into()]).unwrap();
        let err = c.trainer().validate().unwrap_err().to_string();
        assert!(err.contains("train.grad_accum_steps"), "{err}");
    }
}
