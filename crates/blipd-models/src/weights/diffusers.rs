//! The diffusers folder layout: `model_index.json` and one sub-folder per component, each with a
//! `config.json` and a weight file (`*.safetensors` preferred over PyTorch `*.bin`).

use std::path::{Path, PathBuf};

use super::{StateDict, WeightsError};

/// Weight file names tried in order inside a component folder.
pub const WEIGHT_FILES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
];

/// Find a component folder's weight file.
pub fn component_weight_file(dir: &Path) -> Result<PathBuf, WeightsError> {
    for name in WEIGHT_FILES {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(WeightsError::NoWeightFile {
        component: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        dir: dir.to_path_buf(),
        looked_for: WEIGHT_FILES.join(", "),
    })
}

/// One component folder of a diffusers pipeline.
#[derive(Debug, Clone)]
pub struct ComponentDir {
    pub name: String,
    pub dir: PathBuf,
}

impl ComponentDir {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    pub fn weight_file(&self) -> Result<PathBuf, WeightsError> {
        component_weight_file(&self.dir)
    }

    pub fn state_dict(&self) -> Result<StateDict, WeightsError> {
        StateDict::read(&self.weight_file()?)
    }
}

/// A diffusers pipeline folder (e.g. a local copy of `Salesforce/blipdiffusion`).
#[derive(Debug, Clone)]
pub struct DiffusersFolder {
    pub root: PathBuf,
    /// `model_index.json` as JSON (empty object when the file is absent).
    pub index: serde_json::Value,
}

impl DiffusersFolder {
    pub fn open(root: &Path) -> Result<Self, WeightsError> {
        if !root.is_dir() {
            return Err(WeightsError::Read {
                path: root.to_path_buf(),
                message: "not a folder".into(),
            });
        }
        let idx = root.join("model_index.json");
        let index = if idx.is_file() {
            let text = std::fs::read_to_string(&idx).map_err(|e| WeightsError::Read {
                path: idx.clone(),
                message: e.to_string(),
            })?;
            serde_json::from_str(&text).map_err(|e| WeightsError::Read {
                path: idx.clone(),
                message: e.to_string(),
            })?
        } else {
            serde_json::Value::Object(Default::default())
        };
        Ok(Self {
            root: root.to_path_buf(),
            index,
        })
    }

    /// Components named in `model_index.json` (entries whose value is a `[library, class]` pair),
    /// or, without an index, every sub-folder holding a `config.json`.
    pub fn components(&self) -> Vec<(String, Option<String>)> {
        let mut out = Vec::new();
        if let Some(obj) = self.index.as_object() {
            for (k, v) in obj {
                if let Some(arr) = v.as_array() {
                    if arr.len() == 2 && !k.starts_with('_') {
                        let class = arr[1].as_str().map(str::to_string);
                        out.push((k.clone(), class));
                    }
                }
            }
        }
        if out.is_empty() {
            if let Ok(rd) = std::fs::read_dir(&self.root) {
                for e in rd.flatten() {
                    if e.path().join("config.json").is_file() {
                        out.push((e.file_name().to_string_lossy().into_owned(), None));
                    }
                }
            }
            out.sort();
        }
        out
    }

    pub fn component(&self, name: &str) -> ComponentDir {
        ComponentDir {
            name: name.to_string(),
            dir: self.root.join(name),
        }
    }

    /// An integer entry of `model_index.json` (e.g. `ctx_begin_pos`).
    pub fn index_usize(&self, key: &str) -> Option<usize> {
        self.index
            .get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    }
}
