//! Metrics as JSON lines in the run directory.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// File name of the metrics log in the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`: the steps since the previous line, averaged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    /// Optimizer steps completed.
    pub step: u64,
    /// Mean training loss (with `log_every = 1`: this step's loss, exactly as computed, f32).
    pub loss: f64,
    /// Learning rate of the last update.
    pub lr: f64,
    /// Global gradient norm before clipping (mean over the logged steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Samples per second over all ranks.
    pub samples_per_s: f64,
    /// Samples consumed so far over all ranks.
    pub samples: u64,
    /// Data epoch reported by the source state, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Updates skipped for non-finite values since the start of the run.
    #[serde(default)]
    pub skipped: u64,
    /// Stage metrics (averaged like the loss).
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
}

/// Appends records to `metrics.jsonl`.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `<run_dir>/metrics.jsonl` for appending, first dropping every line with a step
    /// above `keep_up_to` (lines written after the checkpoint being resumed) and a torn last line.
    pub fn open(run_dir: &Path, keep_up_to: u64) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        if path.exists() {
            let kept: Vec<String> = read_lines(&path)?
                .into_iter()
                .filter(|(_, step)| *step <= keep_up_to)
                .map(|(l, _)| l)
                .collect();
            let tmp = path.with_extension("jsonl.tmp");
            let mut text = kept.join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            crate::checkpoint::write_file_synced(&tmp, text.as_bytes())?;
            std::fs::rename(&tmp, &path).map_err(|e| TrainError::io(&path, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(Self { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&mut self, record: &MetricsRecord) -> Result<()> {
        let mut line = serde_json::to_string(record).map_err(|e| TrainError::Json {
            path: self.path.clone(),
            source: e,
        })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Parsable lines of a metrics file with their step (torn or foreign lines are skipped).
fn read_lines(path: &Path) -> Result<Vec<(String, u64)>> {
    let f = File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| TrainError::io(path, e))?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if let Some(step) = v.get("step").and_then(|s| s.as_u64()) {
            out.push((line, step));
        }
    }
    Ok(out)
}

/// Reads every record of a metrics file.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    read_lines(path)?
        .into_iter()
        .map(|(l, _)| {
            serde_json::from_str(&l).map_err(|e| TrainError::Json {
                path: path.to_path_buf(),
                source: e,
            })
        })
        .collect()
}

/// `(step, value)` of one numeric key of a metrics file (lines without it are skipped).
pub fn read_series(path: &Path, key: &str) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    for (line, step) in read_lines(path)? {
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| TrainError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        if let Some(x) = v.get(key).and_then(|x| x.as_f64()) {
            out.push((step as f64, x));
        }
    }
    Ok(out)
}
