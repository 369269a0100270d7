//! `blipd inspect-weights DIR`: what a diffusers pipeline folder holds, and whether every component
//! loads strictly into our networks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use blipd_models::ctx_clip_text::ContextClipTextModel;
use blipd_models::qformer::Blip2Config;
use blipd_models::schedulers::pndm::PndmSchedulerConfig;
use blipd_models::tokenizers::ClipTokenizer;
use blipd_models::vae::AutoencoderKL;
use blipd_models::weights::{DiffusersFolder, StateDict};
use blipd_models::{controlnet, unet};
use burn::prelude::*;

/// One component of the folder.
#[derive(Debug, Clone)]
pub struct ComponentReport {
    pub name: String,
    /// Class named in `model_index.json` (if any).
    pub class: Option<String>,
    pub weight_file: Option<PathBuf>,
    /// Scalars in the weight file.
    pub num_params: usize,
    /// Dtypes found in the weight file.
    pub dtypes: BTreeSet<String>,
    /// Everything wrong with it (empty = loads strictly).
    pub problems: Vec<String>,
}

/// Inspect every component named in `model_index.json` (or every sub-folder with a `config.json`).
/// Networks are built from their `config.json` and loaded strictly on `device`.
pub fn inspect_folder<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<Vec<ComponentReport>, crate::AppError> {
    let folder = DiffusersFolder::open(dir)?;
    let mut out = Vec::new();
    for (name, class) in folder.components() {
        let comp = folder.component(&name);
        let mut rep = ComponentReport {
            name: name.clone(),
            class: class.clone(),
            weight_file: None,
            num_params: 0,
            dtypes: BTreeSet::new(),
            problems: Vec::new(),
        };
        if !comp.dir.is_dir() {
            rep.problems
                .push(format!("folder {} is missing", comp.dir.display()));
            out.push(rep);
            continue;
        }
        let kind = class.clone().unwrap_or_else(|| name.clone());
        let has_weights = matches!(
            kind.as_str(),
            "Blip2QFormerModel"
                | "qformer"
                | "ContextCLIPTextModel"
                | "CLIPTextModel"
                | "text_encoder"
                | "UNet2DConditionModel"
                | "unet"
                | "AutoencoderKL"
                | "vae"
                | "ControlNetModel"
                | "controlnet"
        );
        if has_weights {
            match comp.weight_file() {
                Ok(f) => {
                    match StateDict::read(&f) {
                        Ok(sd) => {
                            rep.num_params = sd.num_params();
                            rep.dtypes = sd
                                .tensors
                                .values()
                                .map(|s| format!("{:?}", s.dtype))
                                .collect();
                        }
                        Err(e) => rep.problems.push(e.to_string()),
                    }
                    rep.weight_file = Some(f);
                }
                Err(e) => rep.problems.push(e.to_string()),
            }
        }
        if rep.problems.is_empty() {
            let result: Result<(), String> = match kind.as_str() {
                "Blip2QFormerModel" | "qformer" => (|| {
                    let cfg =
                        Blip2Config::from_file(&comp.config_path()).map_err(|e| e.to_string())?;
                    let m = cfg.init::<B>(device).map_err(|e| e.to_string())?;
                    let sd = comp.state_dict().map_err(|e| e.to_string())?;
                    m.load_state_dict(sd).map(|_| ()).map_err(|e| e.to_string())
                })(),
                "ContextCLIPTextModel" | "CLIPTextModel" | "text_encoder" => {
                    ContextClipTextModel::<B>::from_dir(&comp.dir, device)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                "UNet2DConditionModel" | "unet" => unet::load::<B>(&comp, device)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                "AutoencoderKL" | "vae" => AutoencoderKL::<B>::load(&comp, device)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                "ControlNetModel" | "controlnet" => controlnet::load::<B>(&comp, device)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                "PNDMScheduler" | "scheduler" => {
                    let p = comp.dir.join("scheduler_config.json");
                    PndmSchedulerConfig::from_file(&p)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                "CLIPTokenizer" | "tokenizer" => ClipTokenizer::from_dir(&comp.dir)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                _ => Ok(()),
            };
            if let Err(e) = result {
                rep.problems.push(e.trim_end().to_string());
            }
        }
        out.push(rep);
    }
    if out.is_empty() {
        return Err(crate::AppError::Folder {
            path: dir.to_path_buf(),
            message: "no components: expected model_index.json or sub-folders with config.json"
                .into(),
        });
    }
    Ok(out)
}
