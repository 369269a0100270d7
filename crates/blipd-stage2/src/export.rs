//! The trained stage-2 model as a BlipDiffusion pipeline folder, the `Salesforce/blipdiffusion` layout
//! that `blipd generate --model`, `blipd eval --model` and stage 2's own `model_dir` read:
//!
//! ```text
//! model_index.json                     ctx_begin_pos, mean/std (null: the image processor's), components,
//!                                      _blipd_prompt_template/_prompt_reps/_subject_text (how it was trained)
//! qformer/{config.json, model.safetensors, vocab.txt}   ViT + Q-Former + projection, BERT vocabulary
//! text_encoder/{config.json, model.safetensors}          context CLIP text encoder
//! unet/, vae/                          config.json + diffusion_pytorch_model.safetensors
//! tokenizer/{vocab.json, merges.txt}   CLIP BPE
//! scheduler/scheduler_config.json      PNDM, as the released pipeline samples
//! image_processor/preprocessor_config.json   BlipImageProcessor at the ViT's input size
//! ```
//!
//! The folder is written next to its final place and renamed over it, so a reader (or a run killed
//! mid-export) sees either the previous export or the new one, never a mix.

use std::path::{Path, PathBuf};

use blipd_data::preprocess::{CLIP_MEAN, CLIP_STD};
use blipd_models::schedulers::pndm::PndmSchedulerConfig;
use blipd_models::write_json;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde_json::json;

use crate::model::Stage2Model;
use crate::stage::Stage2;
use crate::Stage2Error;

/// An I/O error with the path it concerns.
pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Stage2Error + '_ {
    move |source| Stage2Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `model` (with the stage's frozen VAE, tokenizers and configs) as a pipeline folder at `dir`,
/// replacing what was there. Returns `dir`. `model` may live on either backend (the trained model, or
/// its EMA copy on the inner backend).
pub fn export_pipeline<B: AutodiffBackend, M: Backend>(
    stage: &Stage2<B>,
    model: &Stage2Model<M>,
    dir: &Path,
) -> Result<PathBuf, Stage2Error> {
    replace_dir(dir, |tmp| write_folder(stage, model, tmp))
}

/// Writes a folder with `write` beside `dir` and swaps it in: the old folder is moved aside, the new
/// one renamed into place, the old one removed. A reader sees the old folder or the new one.
pub(crate) fn replace_dir(
    dir: &Path,
    write: impl FnOnce(&Path) -> Result<(), Stage2Error>,
) -> Result<PathBuf, Stage2Error> {
    let name = dir
        .file_name()
        .ok_or_else(|| Stage2Error::Config(format!("export folder {} has no name", dir.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = parent.join(format!(".{name}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    write(&tmp)?;
    // Swap: move the old export aside, the new one in, then drop the old one.
    let old = parent.join(format!(".{name}.old"));
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(dir.to_path_buf())
}

fn write_folder<B: AutodiffBackend, M: Backend>(
    stage: &Stage2<B>,
    model: &Stage2Model<M>,
    dir: &Path,
) -> Result<(), Stage2Error> {
    let q = dir.join("qformer");
    write_json(&q.join("config.json"), &stage.blip_config, None)?;
    model.qformer.save(&q.join("model.safetensors"))?;
    stage.bert_tokenizer.save_vocab(&q)?;

    let t = dir.join("text_encoder");
    write_json(&t.join("config.json"), &stage.text_config, None)?;
    model.text_encoder.save(&t.join("model.safetensors"))?;

    model.unet.save_diffusers(&dir.join("unet"))?;
    stage
        .vae
        .save_diffusers(&stage.vae_config, &dir.join("vae"))?;
    stage.clip_tokenizer.save_dir(&dir.join("tokenizer"))?;

    write_json(
        &dir.join("scheduler").join("scheduler_config.json"),
        &PndmSchedulerConfig::blip_diffusion(),
        Some("PNDMScheduler"),
    )?;
    let size = stage.image_size;
    write_json(
        &dir.join("image_processor").join("preprocessor_config.json"),
        &json!({
            "do_center_crop": true,
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "image_processor_type": "BlipImageProcessor",
            "resample": 3,
            "rescale_factor": 1.0 / 255.0,
            "size": {"height": size, "width": size},
        }),
        None,
    )?;
    let mut index = json!({
            "_class_name": "BlipDiffusionPipeline",
            "_blipd_version": env!("CARGO_PKG_VERSION"),
            "mean": null,
            "std": null,
            "image_processor": ["blip_diffusion", "BlipImageProcessor"],
            "qformer": ["blip_diffusion", "Blip2QFormerModel"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
    });
    // How the model was trained to read its prompt (ctx_begin_pos, template, repetitions, subject
    // text): the pipeline prompts the same way.
    if let Some(obj) = index.as_object_mut() {
        obj.extend(stage.config.trained_conditioning().index_entries());
    }
    write_json(&dir.join("model_index.json"), &index, None)?;
    Ok(())
}
