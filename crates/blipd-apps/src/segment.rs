//! Text-prompted subject masks with CLIPSeg (`CIDAS/clipseg-rd64-refined`), the first stage of
//! BLIP-Diffusion's synthetic pairs: "we feed the image and a category text of the subject to CLIPSeg".
//!
//! * **Model folder** (local, transformers layout, never downloaded): `config.json`, `model.safetensors` or
//!   `pytorch_model.bin` (read without executing pickle code), `preprocessor_config.json` and the CLIP BPE
//!   tokenizer `vocab.json` + `merges.txt` (or `tokenizer.json`). [`ClipSegSegmenter::load`] names the
//!   missing file, or every missing / unexpected / mis-shaped key, in its error.
//! * **Preprocessing** = transformers `CLIPSegProcessor` (`ViTImageProcessor` + `CLIPTokenizer`), from the
//!   folder's `preprocessor_config.json` (rd64-refined: 352×352 ignoring the aspect ratio, `resample` 2 =
//!   Pillow bilinear, `× rescale_factor` (1/255) in f64 then f32, ImageNet mean/std in f32). The resize is a
//!   port of Pillow's fixed-point `ImagingResample` (all six filters), so pixel values equal the reference's.
//!   Images are decoded with EXIF orientation applied and converted to RGB (alpha dropped), as the synthesis
//!   chain decodes them, so masks line up with what `blipd data synth` mattes.
//! * **Prompt** = the class name put into a template (`"{}"` by default: the paper prompts with the category
//!   text); tokenized `<|startoftext|> … <|endoftext|>`, truncated to the text tower's positions, padded to
//!   the longest prompt of the batch with an attention mask (`padding=True`; padding does not change the
//!   output: the text feature is read at the EOS token, which the causal mask keeps from the pads).
//! * **Output** = `sigmoid(logits)`: [`ClipSegSegmenter::probabilities`] gives the 352×352 map;
//!   [`MaskMap::resize_to`] brings the *logits* to the image size with `F.interpolate(mode="bilinear",
//!   align_corners=False)` semantics before the sigmoid (sharper edges than resizing probabilities).
//!   [`write_clipseg_masks`] writes `<out>/<ImageID>.png` as 16-bit grey (`round(p · 65535)`), which the
//!   `dir` mask source of `blipd-data` reads back as `v / 65535`, so the trimap thresholds (`fg ≥ 0.9`,
//!   `bg ≤ 0.1`) apply to the probabilities directly.
//! * **Runs** are batched (several images per forward), overlap decoding / model / PNG encoding on three
//!   threads (decoding and encoding fan out over rayon), skip masks already on disk (resumable; each file
//!   is written to a temp name, fsynced and renamed), and count bad images (missing, corrupt, too large)
//!   with their row, id and reason instead of stopping.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Instant;

use blipd_data::imageio::{decode_image, ReadLimits};
use blipd_data::synth::SubjectRow;
use blipd_models::clipseg::{ClipSegConfig, ClipSegForImageSegmentation};
use blipd_models::tokenizers::ClipTokenizer;
use blipd_models::weights::{atomic_write, component_weight_file, StateDict};
use blipd_models::ModelError;
use burn::prelude::*;
use burn::tensor::TensorData;
use rayon::prelude::*;
use serde_json::Value;

use crate::preprocess::RgbImage;

/// The released checkpoint this module is written for.
pub const CLIPSEG_CHECKPOINT: &str = "CIDAS/clipseg-rd64-refined";

/// Errors of loading the CLIPSeg folder and of writing masks.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("CLIPSeg model folder {0} does not exist (expected a local copy of {CLIPSEG_CHECKPOINT} in the transformers layout)")]
    NoFolder(PathBuf),
    #[error("CLIPSeg model folder {dir}: missing {file} ({what})")]
    MissingFile {
        dir: PathBuf,
        file: String,
        what: String,
    },
    #[error("{path}: `{key}`: {message}")]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("CLIPSeg config {path}: {source}")]
    ModelConfig {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("CLIPSeg weights {weights} do not fit {config}: {source}")]
    Weights {
        weights: PathBuf,
        config: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("CLIPSeg tokenizer in {dir}: {source}")]
    Tokenizer {
        dir: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("image {id}: {reason}")]
    Image { id: String, reason: String },
    #[error("invalid request: {0}")]
    Request(String),
    #[error("CLIPSeg forward: {0}")]
    Forward(#[source] ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------------------
// Pillow resampling
// ---------------------------------------------------------------------------------------------

pub use crate::preprocess::PilResample;

/// [`crate::preprocess::pil_resize`] with this module's error type.
pub fn pil_resize(
    img: &RgbImage,
    width: usize,
    height: usize,
    filter: PilResample,
) -> Result<RgbImage, SegmentError> {
    crate::preprocess::pil_resize(img, width, height, filter)
        .map_err(|e| SegmentError::Request(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Image processor
// ---------------------------------------------------------------------------------------------

/// What transformers' image processors share, for [`ClipSegImageProcessor`] and the CLIP processor
/// of [`crate::eval`]: the `preprocessor_config.json` fields they read the same way (each with the
/// processor's own default) and the rescale + normalise step.
pub(crate) mod processor_fields {
    use super::PilResample;
    use serde_json::Value;

    /// A `do_*` flag (absent or null: true).
    pub(crate) fn flag<E>(
        v: &Value,
        key: &str,
        bad: &dyn Fn(&str, String) -> E,
    ) -> Result<bool, E> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(true),
            Some(Value::Bool(b)) => Ok(*b),
            Some(o) => Err(bad(key, format!("expected true/false, found {o}"))),
        }
    }

    /// `resample` as a Pillow filter number.
    pub(crate) fn resample<E>(
        v: &Value,
        default: PilResample,
        bad: &dyn Fn(&str, String) -> E,
    ) -> Result<PilResample, E> {
        match v.get("resample") {
            None | Some(Value::Null) => Ok(default),
            Some(r) => r
                .as_i64()
                .and_then(PilResample::from_pil)
                .ok_or_else(|| bad("resample", format!("{r} is not a Pillow filter (0–5)"))),
        }
    }

    /// `rescale_factor`.
    pub(crate) fn rescale_factor<E>(
        v: &Value,
        default: f64,
        bad: &dyn Fn(&str, String) -> E,
    ) -> Result<f64, E> {
        match v.get("rescale_factor") {
            None | Some(Value::Null) => Ok(default),
            Some(r) => r
                .as_f64()
                .ok_or_else(|| bad("rescale_factor", format!("{r} is not a number"))),
        }
    }

    /// `image_mean` / `image_std`: three numbers, or one for all channels.
    pub(crate) fn triple<E>(
        v: &Value,
        key: &str,
        default: [f32; 3],
        bad: &dyn Fn(&str, String) -> E,
    ) -> Result<[f32; 3], E> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(f64::from(default[0])) as f32; 3]),
            Some(Value::Array(a)) if a.len() == 3 => {
                let mut out = [0f32; 3];
                for (o, x) in out.iter_mut().zip(a) {
                    *o = x
                        .as_f64()
                        .ok_or_else(|| bad(key, format!("{x} is not a number")))?
                        as f32;
                }
                Ok(out)
            }
            Some(o) => Err(bad(key, format!("expected 3 numbers, found {o}"))),
        }
    }

    /// Interleaved RGB bytes → channel-major `[3, plane]` f32, as numpy does it in transformers:
    /// uint8 · `rescale_factor` in float64, cast to float32, then `(x − mean) / std` in float32.
    pub(crate) fn rescale_normalize(
        rgb: &[u8],
        rescale: Option<f64>,
        normalize: Option<([f32; 3], [f32; 3])>,
    ) -> Vec<f32> {
        let plane = rgb.len() / 3;
        let mut chw = vec![0f32; 3 * plane];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut x = match rescale {
                    Some(f) => (f64::from(px[c]) * f) as f32,
                    None => f32::from(px[c]),
                };
                if let Some((mean, std)) = normalize {
                    x = (x - mean[c]) / std[c];
                }
                chw[c * plane + i] = x;
            }
        }
        chw
    }
}

/// transformers `ViTImageProcessor` as configured by a CLIPSeg `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipSegImageProcessor {
    /// `(height, width)` after resizing.
    pub size: (usize, usize),
    pub resample: PilResample,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl ClipSegImageProcessor {
    /// `CIDAS/clipseg-rd64-refined`'s `preprocessor_config.json`: 352×352, bilinear, 1/255, ImageNet
    /// mean/std.
    pub fn rd64_refined() -> Self {
        Self {
            size: (352, 352),
            resample: PilResample::Bilinear,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
        }
    }

    /// Parse a `preprocessor_config.json`. Keys it lacks take `ViTImageProcessor`'s defaults (224×224,
    /// bilinear, 1/255, mean = std = 0.5), as `from_pretrained` does.
    pub fn from_file(path: &Path) -> Result<Self, SegmentError> {
        let text = std::fs::read_to_string(path).map_err(|source| SegmentError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| SegmentError::Config {
            path: path.to_path_buf(),
            key: "(file)".into(),
            message: format!("not JSON: {e}"),
        })?;
        Self::from_json(&v, path)
    }

    fn from_json(v: &Value, path: &Path) -> Result<Self, SegmentError> {
        let bad = |key: &str, message: String| SegmentError::Config {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        };
        for key in ["image_processor_type", "feature_extractor_type"] {
            if let Some(t) = v.get(key) {
                let t = t.as_str().unwrap_or("");
                if !matches!(
                    t,
                    "ViTImageProcessor" | "ViTFeatureExtractor" | "ViTImageProcessorFast"
                ) {
                    return Err(bad(
                        key,
                        format!("`{t}` is not the ViT image processor CLIPSeg uses"),
                    ));
                }
            }
        }
        let flag = |key: &str| processor_fields::flag(v, key, &bad);
        if !flag("do_resize")? {
            return Err(bad(
                "do_resize",
                "false is not supported: images of different sizes cannot share a batch".into(),
            ));
        }
        let size = match v.get("size") {
            None | Some(Value::Null) => (224, 224),
            Some(Value::Number(n)) => {
                let s = n
                    .as_u64()
                    .ok_or_else(|| bad("size", format!("{n} is not a size")))?;
                (s as usize, s as usize)
            }
            Some(Value::Object(m)) => {
                let dim = |k: &str| {
                    m.get(k)
                        .and_then(Value::as_u64)
                        .map(|x| x as usize)
                        .ok_or_else(|| {
                            bad(
                                "size",
                                format!("needs integer `height` and `width` (ViTImageProcessor), found {m:?}"),
                            )
                        })
                };
                (dim("height")?, dim("width")?)
            }
            Some(o) => return Err(bad("size", format!("unexpected value {o}"))),
        };
        if size.0 == 0 || size.0 != size.1 {
            return Err(bad(
                "size",
                format!("CLIPSeg needs a square input, found {}×{}", size.1, size.0),
            ));
        }
        let resample = processor_fields::resample(v, PilResample::Bilinear, &bad)?;
        let rescale_factor = processor_fields::rescale_factor(v, 1.0 / 255.0, &bad)?;
        let triple = |key: &str| processor_fields::triple(v, key, [0.5; 3], &bad);
        let image_std = triple("image_std")?;
        if image_std.contains(&0.0) {
            return Err(bad("image_std", "a zero standard deviation".into()));
        }
        Ok(Self {
            size,
            resample,
            do_rescale: flag("do_rescale")?,
            rescale_factor,
            do_normalize: flag("do_normalize")?,
            image_mean: triple("image_mean")?,
            image_std,
        })
    }

    /// Normalised `[3, H, W]` pixels (channel-major, f32), as `processor(images=…).pixel_values[i]`.
    pub fn pixel_values(&self, img: &RgbImage) -> Result<Vec<f32>, SegmentError> {
        let (h, w) = self.size;
        let r = pil_resize(img, w, h, self.resample)?;
        Ok(processor_fields::rescale_normalize(
            &r.data,
            self.do_rescale.then_some(self.rescale_factor),
            self.do_normalize
                .then_some((self.image_mean, self.image_std)),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Probability maps
// ---------------------------------------------------------------------------------------------

/// A single-channel f32 map, row-major (logits or probabilities).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskMap {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

/// `1 / (1 + e^{-x})` in f32.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// torch `upsample_bilinear2d` source coordinates (`align_corners=False`, no scale factor): for each
/// output index, `(i0, i1, λ0, λ1)`, computed in f32 as torch does for float tensors.
fn bilinear_taps(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|d| {
            let src = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(n_in - 1);
            let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
            let l1 = src - i0 as f32;
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

impl MaskMap {
    /// `F.interpolate(x[None, None], size=(height, width), mode="bilinear", align_corners=False)`.
    pub fn resize_to(&self, width: usize, height: usize) -> MaskMap {
        if (width, height) == (self.width, self.height) {
            return self.clone();
        }
        let xs = bilinear_taps(self.width, width);
        let ys = bilinear_taps(self.height, height);
        let mut data = Vec::with_capacity(width * height);
        for &(y0, y1, h0, h1) in &ys {
            let r0 = &self.data[y0 * self.width..(y0 + 1) * self.width];
            let r1 = &self.data[y1 * self.width..(y1 + 1) * self.width];
            for &(x0, x1, w0, w1) in &xs {
                data.push(h0 * (w0 * r0[x0] + w1 * r0[x1]) + h1 * (w0 * r1[x0] + w1 * r1[x1]));
            }
        }
        MaskMap {
            width,
            height,
            data,
        }
    }

    /// Element-wise sigmoid.
    pub fn sigmoid(mut self) -> MaskMap {
        self.data.iter_mut().for_each(|v| *v = sigmoid(*v));
        self
    }

    /// Probabilities in `[0, 1]` → a 16-bit grey PNG (`round(p · 65535)`).
    pub fn to_png16(&self) -> Result<Vec<u8>, SegmentError> {
        let px: Vec<u16> = self
            .data
            .iter()
            .map(|&p| (f64::from(p.clamp(0.0, 1.0)) * 65535.0).round() as u16)
            .collect();
        let img: image::ImageBuffer<image::Luma<u16>, Vec<u16>> =
            image::ImageBuffer::from_raw(self.width as u32, self.height as u32, px).ok_or_else(
                || SegmentError::Request(format!("{}×{} mask buffer", self.width, self.height)),
            )?;
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| SegmentError::Request(format!("PNG encoding: {e}")))?;
        Ok(bytes)
    }
}

// ---------------------------------------------------------------------------------------------
// Segmenter
// ---------------------------------------------------------------------------------------------

/// The files of a CLIPSeg folder.
#[derive(Debug, Clone)]
pub struct ClipSegFolder {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: PathBuf,
    /// `None`: the rd64-refined values (the hub folder always has one).
    pub preprocessor: Option<PathBuf>,
}

impl ClipSegFolder {
    /// Check that `dir` holds a CLIPSeg model in the transformers layout.
    pub fn open(dir: &Path) -> Result<Self, SegmentError> {
        if !dir.is_dir() {
            return Err(SegmentError::NoFolder(dir.to_path_buf()));
        }
        let missing = |file: &str, what: &str| SegmentError::MissingFile {
            dir: dir.to_path_buf(),
            file: file.into(),
            what: what.into(),
        };
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(missing(
                "config.json",
                "the CLIPSegConfig of the checkpoint",
            ));
        }
        let weights = component_weight_file(dir).map_err(|_| {
            missing(
                "model.safetensors or pytorch_model.bin",
                "the CLIPSegForImageSegmentation weights",
            )
        })?;
        let has_vocab = dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file();
        if !has_vocab && !dir.join("tokenizer.json").is_file() {
            let file = if dir.join("vocab.json").is_file() {
                "merges.txt"
            } else {
                "vocab.json"
            };
            return Err(missing(
                file,
                "the CLIP BPE tokenizer: vocab.json + merges.txt, or tokenizer.json",
            ));
        }
        let pp = dir.join("preprocessor_config.json");
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            preprocessor: pp.is_file().then_some(pp),
        })
    }
}

/// CLIPSeg with its processor: images + class names → probability maps.
pub struct ClipSegSegmenter<B: Backend> {
    pub model: ClipSegForImageSegmentation<B>,
    pub config: ClipSegConfig,
    pub tokenizer: ClipTokenizer,
    pub processor: ClipSegImageProcessor,
    pub folder: ClipSegFolder,
    device: B::Device,
}

/// A tokenized batch of prompts, padded to its longest row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
}

impl<B: Backend> ClipSegSegmenter<B> {
    /// Load a local CLIPSeg folder (see [`ClipSegFolder::open`]) onto `device`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, SegmentError> {
        let folder = ClipSegFolder::open(dir)?;
        let text = std::fs::read_to_string(&folder.config).map_err(|source| SegmentError::Io {
            path: folder.config.clone(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| SegmentError::Config {
            path: folder.config.clone(),
            key: "(file)".into(),
            message: format!("not JSON: {e}"),
        })?;
        if let Some(t) = json.get("model_type") {
            if t.as_str() != Some("clipseg") {
                return Err(SegmentError::Config {
                    path: folder.config.clone(),
                    key: "model_type".into(),
                    message: format!("{t} is not a CLIPSeg model (expected \"clipseg\")"),
                });
            }
        }
        let config = ClipSegConfig::from_file(&folder.config).map_err(|source| {
            SegmentError::ModelConfig {
                path: folder.config.clone(),
                source,
            }
        })?;
        let processor = match &folder.preprocessor {
            Some(p) => ClipSegImageProcessor::from_file(p)?,
            None => ClipSegImageProcessor::rd64_refined(),
        };
        let patch = config.vision_config.patch_size;
        if processor.size.0 % patch != 0 {
            return Err(SegmentError::Config {
                path: folder
                    .preprocessor
                    .clone()
                    .unwrap_or_else(|| folder.dir.join("preprocessor_config.json")),
                key: "size".into(),
                message: format!(
                    "{} is not a multiple of the vision patch size {patch}",
                    processor.size.0
                ),
            });
        }
        let tokenizer =
            ClipTokenizer::from_dir(&folder.dir).map_err(|source| SegmentError::Tokenizer {
                dir: folder.dir.clone(),
                source,
            })?;
        if tokenizer.vocab_size() > config.text_config.vocab_size {
            return Err(SegmentError::Config {
                path: folder.config.clone(),
                key: "text_config.vocab_size".into(),
                message: format!(
                    "{} is smaller than the tokenizer's {} tokens (vocab.json belongs to another model)",
                    config.text_config.vocab_size,
                    tokenizer.vocab_size()
                ),
            });
        }
        let sd = StateDict::read(&folder.weights).map_err(|e| SegmentError::Weights {
            weights: folder.weights.clone(),
            config: folder.config.clone(),
            source: e.into(),
        })?;
        let model = ClipSegForImageSegmentation::from_state_dict(&config, sd, device).map_err(
            |source| SegmentError::Weights {
                weights: folder.weights.clone(),
                config: folder.config.clone(),
                source,
            },
        )?;
        Ok(Self {
            model,
            config,
            tokenizer,
            processor,
            folder,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Output side of the probability map (352 for rd64-refined).
    pub fn map_size(&self) -> usize {
        self.processor.size.0
    }

    /// Tokenize prompts as `CLIPSegProcessor(text=prompts, padding=True)` (truncated to the text tower's
    /// positions with the EOS kept last).
    pub fn tokenize(&self, prompts: &[&str]) -> Result<PromptBatch, SegmentError> {
        let max = self.config.text_config.max_position_embeddings;
        let mut rows = Vec::with_capacity(prompts.len());
        for p in prompts {
            let mut body =
                self.tokenizer
                    .tokenize(p)
                    .map_err(|source| SegmentError::Tokenizer {
                        dir: self.folder.dir.clone(),
                        source,
                    })?;
            body.truncate(max.saturating_sub(2));
            let mut ids = Vec::with_capacity(body.len() + 2);
            ids.push(self.tokenizer.bos_id());
            ids.extend(body);
            ids.push(self.tokenizer.eos_id());
            rows.push(ids);
        }
        let len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut attention_mask = Vec::with_capacity(rows.len());
        for r in &mut rows {
            let mut m = vec![1u32; r.len()];
            m.resize(len, 0);
            r.resize(len, self.tokenizer.pad_id());
            attention_mask.push(m);
        }
        Ok(PromptBatch {
            input_ids: rows,
            attention_mask,
        })
    }

    /// Logits `[B, S, S]` for already preprocessed pixels (`B` blocks of `3·S·S` values, see
    /// [`ClipSegImageProcessor::pixel_values`]) and one prompt per image.
    pub fn logits_from_pixels(
        &self,
        pixels: &[f32],
        prompts: &[&str],
    ) -> Result<Vec<MaskMap>, SegmentError> {
        let s = self.map_size();
        let b = prompts.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        if pixels.len() != b * 3 * s * s {
            return Err(SegmentError::Request(format!(
                "{} pixel values for {b} images of 3×{s}×{s}",
                pixels.len()
            )));
        }
        let tokens = self.tokenize(prompts)?;
        let l = tokens.input_ids[0].len();
        let ids: Vec<i64> = tokens
            .input_ids
            .iter()
            .flatten()
            .map(|&i| i64::from(i))
            .collect();
        let mask: Vec<f32> = tokens
            .attention_mask
            .iter()
            .flatten()
            .map(|&m| m as f32)
            .collect();
        let dev = &self.device;
        let pv = Tensor::<B, 4>::from_data(TensorData::new(pixels.to_vec(), [b, 3, s, s]), dev);
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, l]), dev);
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, l]), dev);
        let logits = self
            .model
            .forward_with_mask(pv, ids, Some(mask))
            .map_err(SegmentError::Forward)?;
        let [_, h, w] = logits.dims();
        let flat = logits
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| SegmentError::Forward(ModelError::Invalid(format!("logits: {e:?}"))))?;
        Ok(flat
            .chunks_exact(h * w)
            .map(|c| MaskMap {
                width: w,
                height: h,
                data: c.to_vec(),
            })
            .collect())
    }

    /// Logits `[S, S]` per image (preprocessing included).
    pub fn logits(
        &self,
        images: &[RgbImage],
        prompts: &[&str],
    ) -> Result<Vec<MaskMap>, SegmentError> {
        if images.len() != prompts.len() {
            return Err(SegmentError::Request(format!(
                "{} images but {} prompts (one prompt per image)",
                images.len(),
                prompts.len()
            )));
        }
        let mut pixels = Vec::new();
        for img in images {
            pixels.extend(self.processor.pixel_values(img)?);
        }
        self.logits_from_pixels(&pixels, prompts)
    }

    /// `sigmoid(logits)` at the model's resolution (352×352 for rd64-refined).
    pub fn probabilities(
        &self,
        images: &[RgbImage],
        prompts: &[&str],
    ) -> Result<Vec<MaskMap>, SegmentError> {
        Ok(self
            .logits(images, prompts)?
            .into_iter()
            .map(MaskMap::sigmoid)
            .collect())
    }

    /// Probability maps at each image's own size (logits resized bilinearly, then sigmoid).
    pub fn masks(
        &self,
        images: &[RgbImage],
        prompts: &[&str],
    ) -> Result<Vec<MaskMap>, SegmentError> {
        Ok(self
            .logits(images, prompts)?
            .into_iter()
            .zip(images)
            .map(|(l, img)| l.resize_to(img.width, img.height).sigmoid())
            .collect())
    }
}

// ---------------------------------------------------------------------------------------------
// Mask folder job
// ---------------------------------------------------------------------------------------------

/// Settings of [`write_clipseg_masks`].
#[derive(Debug, Clone)]
pub struct MaskJobOptions {
    /// Folder of `<ImageID>.<ext>` images.
    pub images_dir: PathBuf,
    /// Extensions tried in order.
    pub image_extensions: Vec<String>,
    /// Output folder of `<ImageID>.png`.
    pub out_dir: PathBuf,
    /// Images per forward.
    pub batch_size: usize,
    /// Prompt template; `{}` is replaced by the class name.
    pub prompt_template: String,
    pub limits: ReadLimits,
}

impl MaskJobOptions {
    pub fn new(images_dir: &Path, out_dir: &Path) -> Self {
        Self {
            images_dir: images_dir.to_path_buf(),
            image_extensions: vec!["jpg".into(), "jpeg".into(), "png".into()],
            out_dir: out_dir.to_path_buf(),
            batch_size: 8,
            prompt_template: "{}".into(),
            limits: ReadLimits::default(),
        }
    }
}

/// The prompt for a class name: `template` with its `{}` replaced.
pub fn render_prompt(template: &str, class_name: &str) -> Result<String, SegmentError> {
    match template.matches("{}").count() {
        1 => Ok(template.replacen("{}", class_name, 1)),
        n => Err(SegmentError::Request(format!(
            "prompt template {template:?} must contain `{{}}` (the class name) exactly once, found {n}"
        ))),
    }
}

/// A subject row that produced no mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadImage {
    /// Data row of the subjects CSV (0-based).
    pub row: u64,
    pub image_id: String,
    /// `csv` or `image`.
    pub stage: String,
    pub reason: String,
}

/// Progress of [`write_clipseg_masks`].
#[derive(Debug, Clone)]
pub enum MaskEvent {
    /// After planning: images to segment in this run, masks already on disk, repeated ImageIDs.
    Planned {
        todo: u64,
        existing: u64,
        duplicates: u64,
    },
    /// One image finished: mask written or bad.
    Image { ok: bool },
}

/// What a [`write_clipseg_masks`] run did.
#[derive(Debug, Clone, Default)]
pub struct MaskJobReport {
    pub rows: u64,
    pub written: u64,
    /// Masks already on disk (skipped).
    pub existing: u64,
    /// Rows repeating an earlier row's ImageID (one mask per image: the first row's class is used).
    pub duplicates: u64,
    pub bad: Vec<BadImage>,
    pub batches: u64,
    pub elapsed_s: f64,
    /// Time in the model forward (host → device, forward, device → host).
    pub model_s: f64,
}

impl MaskJobReport {
    /// Masks written per second of wall time.
    pub fn images_per_s(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.written as f64 / self.elapsed_s
        } else {
            0.0
        }
    }
}

struct Work {
    row: u64,
    id: String,
    prompt: String,
}

struct Loaded {
    work: Work,
    width: usize,
    height: usize,
    pixels: Vec<f32>,
}

struct Segmented {
    work: Work,
    width: usize,
    height: usize,
    logits: MaskMap,
}

fn find_image(opts: &MaskJobOptions, id: &str) -> Option<PathBuf> {
    opts.image_extensions
        .iter()
        .map(|ext| opts.images_dir.join(format!("{id}.{ext}")))
        .find(|p| p.is_file())
}

fn load_one(
    opts: &MaskJobOptions,
    processor: &ClipSegImageProcessor,
    work: Work,
) -> Result<Loaded, (Work, String)> {
    let id = work.id.as_str();
    let Some(path) = find_image(opts, id) else {
        let reason = format!(
            "not found: {}/{id}.{{{}}}",
            opts.images_dir.display(),
            opts.image_extensions.join(",")
        );
        return Err((work, reason));
    };
    let loaded = (|| -> Result<(usize, usize, Vec<f32>), String> {
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let img = decode_image(&bytes, id, &opts.limits).map_err(|e| e.to_string())?;
        let rgb = img.to_rgb8();
        drop(img);
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let rgb = RgbImage::new(w, h, rgb.into_raw()).map_err(|e| e.to_string())?;
        let pixels = processor.pixel_values(&rgb).map_err(|e| e.to_string())?;
        Ok((w, h, pixels))
    })();
    match loaded {
        Ok((width, height, pixels)) => Ok(Loaded {
            work,
            width,
            height,
            pixels,
        }),
        Err(reason) => Err((work, reason)),
    }
}

fn write_one(out_dir: &Path, s: &Segmented) -> Result<(), SegmentError> {
    let map = s.logits.resize_to(s.width, s.height).sigmoid();
    let bytes = map.to_png16()?;
    let path = out_dir.join(format!("{}.png", s.work.id));
    atomic_write(&path, &bytes).map_err(|source| SegmentError::Io { path, source })
}

/// Segment every kept subject whose mask is not yet in `opts.out_dir` and write `<ImageID>.png`
/// (16-bit grey probabilities at the image's size). Bad CSV rows and missing / corrupt / oversized
/// images are returned in the report; I/O errors on the output folder and model errors stop the run.
pub fn write_clipseg_masks<B: Backend>(
    seg: &ClipSegSegmenter<B>,
    rows: &[SubjectRow],
    opts: &MaskJobOptions,
    progress: &(dyn Fn(MaskEvent) + Sync),
) -> Result<MaskJobReport, SegmentError> {
    let start = Instant::now();
    if opts.batch_size == 0 {
        return Err(SegmentError::Request(
            "batch size must be at least 1".into(),
        ));
    }
    render_prompt(&opts.prompt_template, "")?;
    if !opts.images_dir.is_dir() {
        return Err(SegmentError::Request(format!(
            "image folder {} does not exist",
            opts.images_dir.display()
        )));
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| SegmentError::Io {
        path: opts.out_dir.clone(),
        source,
    })?;
    let mut report = MaskJobReport {
        rows: rows.len() as u64,
        ..Default::default()
    };
    // Plan.
    let mut seen = HashSet::new();
    let mut todo = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        match r {
            Err(b) => report.bad.push(BadImage {
                row: i as u64,
                image_id: b.image_id.clone(),
                stage: b.stage.clone(),
                reason: b.reason.clone(),
            }),
            Ok(s) => {
                if !seen.insert(s.image_id.clone()) {
                    report.duplicates += 1;
                } else if opts.out_dir.join(format!("{}.png", s.image_id)).is_file() {
                    report.existing += 1;
                } else {
                    todo.push(Work {
                        row: i as u64,
                        id: s.image_id.clone(),
                        prompt: render_prompt(&opts.prompt_template, &s.class_name)?,
                    });
                }
            }
        }
    }
    progress(MaskEvent::Planned {
        todo: todo.len() as u64,
        existing: report.existing,
        duplicates: report.duplicates,
    });

    type LoadedBatch = Vec<Result<Loaded, (Work, String)>>;
    let processor = &seg.processor;
    let (load_tx, load_rx): (SyncSender<LoadedBatch>, Receiver<LoadedBatch>) = sync_channel(2);
    let (seg_tx, seg_rx): (SyncSender<Vec<Segmented>>, Receiver<Vec<Segmented>>) = sync_channel(2);
    let bs = opts.batch_size;
    let out_dir = &opts.out_dir;

    let mut bad = Vec::new();
    let (model_result, write_result) = std::thread::scope(|scope| {
        // Decoding + preprocessing, one batch ahead of the model.
        scope.spawn(move || {
            let mut todo = todo.into_iter().peekable();
            while todo.peek().is_some() {
                let chunk: Vec<Work> = todo.by_ref().take(bs).collect();
                let loaded: LoadedBatch = chunk
                    .into_par_iter()
                    .map(|w| load_one(opts, processor, w))
                    .collect();
                if load_tx.send(loaded).is_err() {
                    return; // the model loop stopped
                }
            }
        });
        // PNG encoding + atomic writes, behind the model.
        let writer = scope.spawn(move || -> Result<u64, SegmentError> {
            let mut written = 0;
            for batch in seg_rx {
                let res: Vec<Result<(), SegmentError>> =
                    batch.par_iter().map(|s| write_one(out_dir, s)).collect();
                for r in res {
                    r?;
                    progress(MaskEvent::Image { ok: true });
                    written += 1;
                }
            }
            Ok(written)
        });
        // The model, on this thread.
        let model_result = (|| -> Result<(f64, u64), SegmentError> {
            let (mut model_s, mut batches) = (0.0, 0u64);
            for loaded in load_rx {
                let mut ok = Vec::with_capacity(loaded.len());
                for l in loaded {
                    match l {
                        Ok(l) => ok.push(l),
                        Err((w, reason)) => {
                            progress(MaskEvent::Image { ok: false });
                            bad.push(BadImage {
                                row: w.row,
                                image_id: w.id,
                                stage: "image".into(),
                                reason,
                            });
                        }
                    }
                }
                if ok.is_empty() {
                    continue;
                }
                let t = Instant::now();
                let mut pixels = Vec::with_capacity(ok.len() * ok[0].pixels.len());
                for l in &mut ok {
                    pixels.append(&mut l.pixels);
                }
                let prompts: Vec<&str> = ok.iter().map(|l| l.work.prompt.as_str()).collect();
                let logits = seg.logits_from_pixels(&pixels, &prompts)?;
                model_s += t.elapsed().as_secs_f64();
                batches += 1;
                let out: Vec<Segmented> = ok
                    .into_iter()
                    .zip(logits)
                    .map(|(l, logits)| Segmented {
                        work: l.work,
                        width: l.width,
                        height: l.height,
                        logits,
                    })
                    .collect();
                if seg_tx.send(out).is_err() {
                    break; // the writer failed: its error is returned below
                }
            }
            Ok((model_s, batches))
        })();
        drop(seg_tx);
        let write_result = writer.join().unwrap_or_else(|_| {
            Err(SegmentError::Request(
                "the mask writer thread panicked".into(),
            ))
        });
        (model_result, write_result)
    });
    let (model_s, batches) = model_result?;
    report.written = write_result?;
    report.bad.append(&mut bad);
    report.bad.sort_by_key(|b| b.row);
    report.batches = batches;
    report.model_s = model_s;
    report.elapsed_s = start.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> RgbImage {
        let data = (0..w * h * 3)
            .map(|i| ((i * 37 + (i / 3) * 11) % 256) as u8)
            .collect();
        RgbImage::new(w, h, data).unwrap()
    }

    #[test]
    fn generic_bicubic_equals_the_pillow_exact_bicubic_port() {
        // `RgbImage::resize_bicubic` is this resampler at `Bicubic` (one implementation) and is
        // checked byte for byte against Pillow in the pipeline tests; this pins the two entry points.
        for (w, h, ow, oh) in [(37, 23, 64, 64), (90, 61, 33, 47), (20, 30, 20, 71)] {
            let img = ramp(w, h);
            let ours = pil_resize(&img, ow, oh, PilResample::Bicubic).unwrap();
            assert_eq!(
                ours,
                img.resize_bicubic(ow, oh).unwrap(),
                "{w}×{h} → {ow}×{oh}"
            );
        }
    }

    #[test]
    fn bilinear_and_box_keep_constant_images_and_nearest_picks_pixels() {
        let img = RgbImage::new(5, 3, [10u8, 200, 77].repeat(15)).unwrap();
        for f in [
            PilResample::Bilinear,
            PilResample::Box,
            PilResample::Hamming,
            PilResample::Lanczos,
        ] {
            let r = pil_resize(&img, 11, 2, f).unwrap();
            assert!(r.data.chunks(3).all(|p| p == [10, 200, 77]), "{f:?}");
        }
        let img = ramp(4, 2);
        let r = pil_resize(&img, 8, 4, PilResample::Nearest).unwrap();
        // Doubling: every source pixel is repeated 2×2.
        for y in 0..4 {
            for x in 0..8 {
                let s = ((y / 2) * 4 + x / 2) * 3;
                let d = (y * 8 + x) * 3;
                assert_eq!(r.data[d..d + 3], img.data[s..s + 3]);
            }
        }
    }

    #[test]
    fn torch_bilinear_upsampling() {
        // F.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4), mode="bilinear")
        let m = MaskMap {
            width: 2,
            height: 2,
            data: vec![0.0, 1.0, 2.0, 3.0],
        };
        let r = m.resize_to(4, 4);
        let expected = [
            0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
        ];
        for (a, b) in r.data.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{:?}", r.data);
        }
        assert_eq!(m.resize_to(2, 2), m);
        // Downsampling by 2 (no antialias) averages the two middle taps.
        let m = MaskMap {
            width: 4,
            height: 1,
            data: vec![0.0, 4.0, 8.0, 12.0],
        };
        assert_eq!(m.resize_to(2, 1).data, vec![2.0, 10.0]);
    }

    #[test]
    fn png16_round_trip_through_the_mask_reader() {
        let m = MaskMap {
            width: 3,
            height: 2,
            data: vec![0.0, 0.1, 0.5, 0.9, 1.0, 1.2],
        };
        let bytes = m.to_png16().unwrap();
        let g = blipd_data::imageio::decode_image(&bytes, "t", &ReadLimits::default())
            .unwrap()
            .to_luma16();
        let back: Vec<f64> = g.as_raw().iter().map(|&v| f64::from(v) / 65535.0).collect();
        for (a, b) in back.iter().zip([0.0, 0.1, 0.5, 0.9, 1.0, 1.0]) {
            assert!((a - b).abs() <= 0.5 / 65535.0 + 1e-9, "{back:?}");
        }
    }

    #[test]
    fn processor_config_semantics() {
        let p = Path::new("preprocessor_config.json");
        let hub = serde_json::json!({
            "do_normalize": true, "do_resize": true, "image_processor_type": "ViTImageProcessor",
            "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
            "processor_class": "CLIPSegProcessor", "resample": 2,
            "rescale_factor": 0.00392156862745098, "size": {"height": 352, "width": 352}
        });
        assert_eq!(
            ClipSegImageProcessor::from_json(&hub, p).unwrap(),
            ClipSegImageProcessor::rd64_refined()
        );
        let empty = ClipSegImageProcessor::from_json(&serde_json::json!({}), p).unwrap();
        assert_eq!(empty.size, (224, 224));
        assert_eq!(empty.image_mean, [0.5; 3]);
        for bad in [
            serde_json::json!({"size": {"shortest_edge": 352}}),
            serde_json::json!({"size": {"height": 352, "width": 300}}),
            serde_json::json!({"resample": 9}),
            serde_json::json!({"image_processor_type": "CLIPImageProcessor"}),
            serde_json::json!({"do_resize": false}),
        ] {
            let e = ClipSegImageProcessor::from_json(&bad, p).unwrap_err();
            assert!(matches!(e, SegmentError::Config { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn prompt_templates() {
        assert_eq!(render_prompt("{}", "dog").unwrap(), "dog");
        assert_eq!(
            render_prompt("a photo of a {}", "teddy bear").unwrap(),
            "a photo of a teddy bear"
        );
        assert!(render_prompt("a photo", "dog").is_err());
        assert!(render_prompt("{} {}", "dog").is_err());
    }
}
