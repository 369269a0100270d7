//! DreamBench evaluation (the DINO, CLIP-I and CLIP-T scores of BLIP-Diffusion's Tables 1–2, following
//! DreamBooth's protocol).
//!
//! * **DINO**: `last_hidden_state[:, 0]` of the DINO ViT-S/16 (`facebook/dino-vits16`, transformers
//!   `ViTModel`) — the `[CLS]` token after the final LayerNorm, the vector DINO's own hub model returns —
//!   *not* `pooler_output` (the hub checkpoint has no pooler; transformers initialises it at random).
//!   Score = cosine between each generated image and each real image of its subject, averaged.
//! * **CLIP-I**: the same with CLIP `image_embeds` (`visual_projection` of the pooled CLS, L2-normalised);
//!   DreamBooth uses ViT-B/32 (`openai/clip-vit-base-patch32`), any transformers `CLIPModel` folder works.
//! * **CLIP-T**: cosine between a generated image's `image_embeds` and its prompt's `text_embeds`, the
//!   prompt written with the subject's class noun and no identifier token (`"a dog in the jungle"`).
//! * **Preprocessing** = the checkpoints' transformers image processors, read from each folder's
//!   `preprocessor_config.json`: DINO's `ViTImageProcessor` (dino-vits16: squash to 224×224 with Pillow
//!   bilinear — no 256-resize/224-crop —, `×1/255` in f64 → f32, ImageNet mean/std) through
//!   [`ClipSegImageProcessor`] (the same ViT processor), and [`ClipImageProcessor`] (shortest side 224
//!   with Pillow bicubic, `int()` of the long side, centre crop with `floor` offsets, CLIP mean/std).
//!   Resizing is Pillow's fixed-point resampler ([`pil_resize`]), so pixel values equal transformers'.
//!   Images are decoded with `blipd_data::imageio` (truncated JPEGs rejected, RGB, alpha dropped).
//!
//! **Layout.** The benchmark folder is DreamBench as in `../shared/dreambench`: `<subject>/*.jpg|png`
//! (real photos) and `prompts_and_classes.txt` (DreamBooth's `subject_name,class` table and the two
//! 25-prompt lists, `'a {0} {1} …'.format(unique_token, class_token)`). Live subjects (DreamBooth's
//! `live subject prompts`) are those of class `cat` or `dog`. Generated images are laid out as
//! `<generated>/<subject>/<prompt index>_<sample index>.<png|jpg|jpeg|webp>`, the prompt index (0-based)
//! into the subject's list. Files with an image extension that do not follow the pattern, that cannot
//! be decoded, or whose prompt index is out of range are reported as bad (path and reason) and the run
//! goes on; other files are ignored.
//!
//! **Aggregation.** Per image: DINO and CLIP-I averaged over the subject's real images, CLIP-T for its
//! prompt. Per subject: the mean over its generated images. `mean`: the mean over all generated images;
//! `mean_of_subjects`: the mean of the per-subject scores (the same when every subject has as many
//! generations, as in the paper's 25 prompts × 4 samples).
//!
//! Real-image embeddings are computed once per subject and text embeddings once per prompt, and kept in
//! the [`DreamBenchEval`] (an ablation sweep scores several generation folders with one evaluator).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use blipd_data::imageio::{decode_image, ReadLimits};
use blipd_models::clip::{l2_normalize, ClipModel};
use blipd_models::dino::DinoVitModel;
use blipd_models::tokenizers::ClipTokenizer;
use blipd_models::ModelError;
use burn::prelude::*;
use burn::tensor::TensorData;
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::preprocess::{RgbImage, CLIP_MEAN, CLIP_STD};
use crate::segment::{
    pil_resize, processor_fields, ClipSegImageProcessor, PilResample, SegmentError,
};

/// Image extensions the evaluation reads (generated and real).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];
/// Classes whose subjects take DreamBooth's live-subject prompt list.
pub const LIVE_CLASSES: &[&str] = &["cat", "dog"];

/// Errors of the evaluation (bad generated images are not errors: they are reported).
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{what} folder {path} does not exist")]
    NoFolder { what: String, path: PathBuf },
    #[error("{what} folder {dir}: missing {file}")]
    MissingFile {
        what: String,
        dir: PathBuf,
        file: String,
    },
    #[error("{path}: `{key}`: {message}")]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{what} model in {dir}: {source}")]
    Model {
        what: String,
        dir: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("DINO image processor: {0}")]
    DinoProcessor(#[source] SegmentError),
    #[error("DreamBench {path}: {message}")]
    Bench { path: PathBuf, message: String },
    #[error("real image {path}: {reason}")]
    RealImage { path: PathBuf, reason: String },
    #[error("forward: {0}")]
    Forward(#[source] ModelError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EvalError + '_ {
    move |source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------------------
// CLIP image processor
// ---------------------------------------------------------------------------------------------

/// How [`ClipImageProcessor`] resizes before the crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipResize {
    /// `{"shortest_edge": s}` (an integer `size` in old files): shorter side to `s`, the longer
    /// `int(s · long / short)`, aspect ratio kept.
    ShortestEdge(usize),
    /// `{"height": h, "width": w}`: squash.
    Exact { height: usize, width: usize },
}

/// transformers `CLIPImageProcessor` (4.44.2) as configured by a `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    pub resize: Option<ClipResize>,
    pub resample: PilResample,
    /// `(height, width)` of the centre crop, `None` when `do_center_crop` is false.
    pub crop: Option<(usize, usize)>,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl ClipImageProcessor {
    /// `openai/clip-vit-base-patch32`'s `preprocessor_config.json`: shortest edge 224, bicubic, crop
    /// 224×224, 1/255, OpenAI CLIP mean/std.
    pub fn vit_b32() -> Self {
        Self {
            resize: Some(ClipResize::ShortestEdge(224)),
            resample: PilResample::Bicubic,
            crop: Some((224, 224)),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    /// Parse a `preprocessor_config.json`; keys it lacks take `CLIPImageProcessor`'s defaults (the
    /// values of [`Self::vit_b32`]), as `from_pretrained` does.
    pub fn from_file(path: &Path) -> Result<Self, EvalError> {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| EvalError::Config {
            path: path.to_path_buf(),
            key: "(file)".into(),
            message: format!("not JSON: {e}"),
        })?;
        Self::from_json(&v, path)
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<Self, EvalError> {
        let bad = |key: &str, message: String| EvalError::Config {
            path: path.to_path_buf(),
            key: key.into(),
            message,
        };
        for key in ["image_processor_type", "feature_extractor_type"] {
            if let Some(t) = v.get(key) {
                let t = t.as_str().unwrap_or("");
                if !matches!(
                    t,
                    "CLIPImageProcessor" | "CLIPFeatureExtractor" | "CLIPImageProcessorFast"
                ) {
                    return Err(bad(key, format!("`{t}` is not a CLIP image processor")));
                }
            }
        }
        let d = Self::vit_b32();
        let flag = |key: &str| processor_fields::flag(v, key, &bad);
        let int = |key: &str, x: &Value| -> Result<usize, EvalError> {
            x.as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| bad(key, format!("{x} is not a positive integer")))
        };
        let dims =
            |key: &str, m: &serde_json::Map<String, Value>| -> Result<(usize, usize), EvalError> {
                match (m.get("height"), m.get("width")) {
                    (Some(h), Some(w)) => Ok((int(key, h)?, int(key, w)?)),
                    _ => Err(bad(
                        key,
                        format!("expected `height` and `width`, found {m:?}"),
                    )),
                }
            };
        let resize = if flag("do_resize")? {
            Some(match v.get("size") {
                None | Some(Value::Null) => ClipResize::ShortestEdge(224),
                Some(n @ Value::Number(_)) => ClipResize::ShortestEdge(int("size", n)?),
                Some(Value::Object(m)) => match m.get("shortest_edge") {
                    Some(s) => ClipResize::ShortestEdge(int("size", s)?),
                    None => {
                        let (height, width) = dims("size", m)?;
                        ClipResize::Exact { height, width }
                    }
                },
                Some(o) => return Err(bad("size", format!("unexpected value {o}"))),
            })
        } else {
            None
        };
        let crop = if flag("do_center_crop")? {
            Some(match v.get("crop_size") {
                None | Some(Value::Null) => (224, 224),
                Some(n @ Value::Number(_)) => {
                    let s = int("crop_size", n)?;
                    (s, s)
                }
                Some(Value::Object(m)) => dims("crop_size", m)?,
                Some(o) => return Err(bad("crop_size", format!("unexpected value {o}"))),
            })
        } else {
            None
        };
        let resample = processor_fields::resample(v, d.resample, &bad)?;
        let rescale_factor = processor_fields::rescale_factor(v, d.rescale_factor, &bad)?;
        let triple = |key: &str, default| processor_fields::triple(v, key, default, &bad);
        let image_std = triple("image_std", d.image_std)?;
        if image_std.contains(&0.0) {
            return Err(bad("image_std", "a zero standard deviation".into()));
        }
        if crop.is_none() && !matches!(resize, Some(ClipResize::Exact { .. })) {
            return Err(bad(
                "do_center_crop",
                "without a centre crop or a fixed resize, images of different shapes cannot be batched"
                    .into(),
            ));
        }
        Ok(Self {
            resize,
            resample,
            crop,
            do_rescale: flag("do_rescale")?,
            rescale_factor,
            do_normalize: flag("do_normalize")?,
            image_mean: triple("image_mean", d.image_mean)?,
            image_std,
        })
    }

    /// The `(height, width)` of [`Self::pixel_values`]' output.
    pub fn output_size(&self) -> Option<(usize, usize)> {
        match (self.crop, self.resize) {
            (Some(c), _) => Some(c),
            (None, Some(ClipResize::Exact { height, width })) => Some((height, width)),
            _ => None,
        }
    }

    /// transformers' `get_resize_output_image_size(default_to_square=False)`: `(width, height)`.
    pub fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        match self.resize {
            None => (width, height),
            Some(ClipResize::Exact {
                height: h,
                width: w,
            }) => (w, h),
            Some(ClipResize::ShortestEdge(s)) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python: int(size * long / short) (true division, truncated).
                let new_long = ((s * long) as f64 / short as f64) as usize;
                if width <= height {
                    (s, new_long)
                } else {
                    (new_long, s)
                }
            }
        }
    }

    /// Normalised `[3, H, W]` pixels (channel-major f32), as `processor(images=…).pixel_values[i]`.
    pub fn pixel_values(&self, img: &RgbImage) -> Result<Vec<f32>, EvalError> {
        let (w, h) = self.resized_size(img.width, img.height);
        let img = pil_resize(img, w, h, self.resample).map_err(EvalError::DinoProcessor)?;
        let img = match self.crop {
            None => img,
            Some((ch, cw)) => {
                if ch > img.height || cw > img.width {
                    return Err(EvalError::Config {
                        path: PathBuf::from("preprocessor_config.json"),
                        key: "crop_size".into(),
                        message: format!(
                            "crop {cw}×{ch} is larger than the resized {}×{} image (transformers would pad; not supported)",
                            img.width, img.height
                        ),
                    });
                }
                // transformers `center_crop`: floor division of the margins.
                let top = (img.height - ch) / 2;
                let left = (img.width - cw) / 2;
                img.crop(left, top, cw, ch)
                    .map_err(|e| EvalError::DinoProcessor(SegmentError::Request(e.to_string())))?
            }
        };
        Ok(processor_fields::rescale_normalize(
            &img.data,
            self.do_rescale.then_some(self.rescale_factor),
            self.do_normalize
                .then_some((self.image_mean, self.image_std)),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// DreamBench
// ---------------------------------------------------------------------------------------------

/// One DreamBench subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DreamBenchSubject {
    /// Folder name, e.g. `backpack_dog`.
    pub name: String,
    /// Class noun, e.g. `backpack`, `stuffed animal`.
    pub class_name: String,
    /// Takes the live-subject prompt list (class `cat` or `dog`).
    pub live: bool,
    /// Real photos, sorted by file name.
    pub images: Vec<PathBuf>,
}

/// A DreamBench folder: subjects, their photos and the two prompt lists.
#[derive(Debug, Clone)]
pub struct DreamBench {
    pub root: PathBuf,
    pub subjects: Vec<DreamBenchSubject>,
    /// Templates with `{0}` (identifier token) and `{1}` (class noun), in file order.
    pub object_prompts: Vec<String>,
    pub live_prompts: Vec<String>,
}

fn quoted_template(line: &str) -> Option<String> {
    let l = line.trim();
    let q = l.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let rest = &l[1..];
    let end = rest.find(q)?;
    let after = &rest[end + 1..];
    after
        .trim_start()
        .starts_with(".format(")
        .then(|| rest[..end].to_string())
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Fill a DreamBooth template: `{0}` = identifier token (dropped with its space when `None`), `{1}` =
/// class noun. `("a {0} {1} in the snow", None, "dog")` → `"a dog in the snow"`.
pub fn render_prompt(template: &str, token: Option<&str>, class_name: &str) -> String {
    let s = match token {
        Some(t) => template.replace("{0}", t),
        None => template
            .replace("{0} ", "")
            .replace(" {0}", "")
            .replace("{0}", ""),
    };
    s.replace("{1}", class_name)
}

impl DreamBench {
    /// Read `root/prompts_and_classes.txt` and list each subject's photos.
    pub fn open(root: &Path) -> Result<Self, EvalError> {
        if !root.is_dir() {
            return Err(EvalError::NoFolder {
                what: "DreamBench".into(),
                path: root.to_path_buf(),
            });
        }
        let spec = root.join("prompts_and_classes.txt");
        if !spec.is_file() {
            return Err(EvalError::MissingFile {
                what: "DreamBench".into(),
                dir: root.to_path_buf(),
                file: "prompts_and_classes.txt".into(),
            });
        }
        let text = std::fs::read_to_string(&spec).map_err(io_err(&spec))?;
        let bad = |message: String| EvalError::Bench {
            path: spec.clone(),
            message,
        };
        #[derive(PartialEq)]
        enum Section {
            Preamble,
            Classes,
            Object,
            Live,
        }
        let mut section = Section::Preamble;
        let mut classes: Vec<(String, String)> = Vec::new();
        let (mut object_prompts, mut live_prompts) = (Vec::new(), Vec::new());
        for line in text.lines() {
            let l = line.trim();
            let lower = l.to_ascii_lowercase();
            if lower == "subject_name,class" {
                section = Section::Classes;
                continue;
            }
            if lower.starts_with("object prompts") {
                section = Section::Object;
                continue;
            }
            if lower.starts_with("live subject prompts") {
                section = Section::Live;
                continue;
            }
            match section {
                Section::Classes => {
                    if l.is_empty() {
                        continue;
                    }
                    if lower == "prompts" {
                        section = Section::Preamble;
                        continue;
                    }
                    let Some((s, c)) = l.split_once(',') else {
                        return Err(bad(format!("class line {l:?} is not `subject,class`")));
                    };
                    classes.push((s.trim().to_string(), c.trim().to_string()));
                }
                Section::Object => object_prompts.extend(quoted_template(l)),
                Section::Live => live_prompts.extend(quoted_template(l)),
                Section::Preamble => {}
            }
        }
        if classes.is_empty() {
            return Err(bad("no `subject_name,class` table".into()));
        }
        if object_prompts.is_empty() || live_prompts.is_empty() {
            return Err(bad(format!(
                "expected the object and live prompt lists, found {} and {} prompts",
                object_prompts.len(),
                live_prompts.len()
            )));
        }
        for t in object_prompts.iter().chain(&live_prompts) {
            if !t.contains("{1}") {
                return Err(bad(format!("prompt {t:?} has no class slot {{1}}")));
            }
        }
        let mut subjects = Vec::with_capacity(classes.len());
        for (name, class_name) in classes {
            let dir = root.join(&name);
            if !dir.is_dir() {
                return Err(bad(format!(
                    "subject `{name}` has no folder {}",
                    dir.display()
                )));
            }
            let mut images: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(io_err(&dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            images.sort();
            if images.is_empty() {
                return Err(bad(format!(
                    "subject `{name}` has no images in {}",
                    dir.display()
                )));
            }
            let live = LIVE_CLASSES.contains(&class_name.as_str());
            subjects.push(DreamBenchSubject {
                name,
                class_name,
                live,
                images,
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            subjects,
            object_prompts,
            live_prompts,
        })
    }

    pub fn subject(&self, name: &str) -> Option<&DreamBenchSubject> {
        self.subjects.iter().find(|s| s.name == name)
    }

    /// The prompt templates of a subject (live or object list).
    pub fn templates(&self, subject: &DreamBenchSubject) -> &[String] {
        if subject.live {
            &self.live_prompts
        } else {
            &self.object_prompts
        }
    }

    /// The CLIP-T prompt: template `index` with the class noun and no identifier token.
    pub fn eval_prompt(&self, subject: &DreamBenchSubject, index: usize) -> Option<String> {
        self.templates(subject)
            .get(index)
            .map(|t| render_prompt(t, None, &subject.class_name))
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluator
// ---------------------------------------------------------------------------------------------

/// A generated image that was not scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadImage {
    pub path: PathBuf,
    pub reason: String,
}

/// Scores of one generated image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageScore {
    pub path: PathBuf,
    pub subject: String,
    pub prompt_index: usize,
    pub sample_index: usize,
    pub prompt: String,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
}

/// DINO / CLIP-I / CLIP-T.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scores {
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
}

impl Scores {
    fn mean<'a>(items: impl Iterator<Item = Scores> + 'a) -> Option<Self> {
        let (mut s, mut n) = (Scores::default(), 0usize);
        for x in items {
            s.dino += x.dino;
            s.clip_i += x.clip_i;
            s.clip_t += x.clip_t;
            n += 1;
        }
        (n > 0).then(|| Scores {
            dino: s.dino / n as f64,
            clip_i: s.clip_i / n as f64,
            clip_t: s.clip_t / n as f64,
        })
    }

    fn json(&self) -> Value {
        json!({"dino": self.dino, "clip_i": self.clip_i, "clip_t": self.clip_t})
    }
}

/// Per-subject result.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectScores {
    pub subject: String,
    pub class_name: String,
    pub live: bool,
    pub n_real: usize,
    pub n_generated: usize,
    pub scores: Scores,
}

/// What an evaluation found.
#[derive(Debug, Clone, Default)]
pub struct EvalReport {
    pub generated: PathBuf,
    pub dreambench: PathBuf,
    pub clip_model: PathBuf,
    pub dino_model: PathBuf,
    pub subjects: Vec<SubjectScores>,
    /// Mean over all generated images (`None` when nothing was scored).
    pub mean: Option<Scores>,
    /// Mean of the per-subject scores.
    pub mean_of_subjects: Option<Scores>,
    pub images: Vec<ImageScore>,
    pub bad: Vec<BadImage>,
    /// DreamBench subjects without a generated folder (not in the means).
    pub missing_subjects: Vec<String>,
    pub elapsed_s: f64,
}

impl EvalReport {
    pub fn n_images(&self) -> usize {
        self.images.len()
    }

    pub fn to_json(&self) -> Value {
        let opt = |s: &Option<Scores>| s.map(|s| s.json()).unwrap_or(Value::Null);
        json!({
            "protocol": {
                "dino": "cosine of DINO ViT last_hidden_state[:, 0] (generated vs each real image of the subject), averaged",
                "clip_i": "cosine of CLIP image_embeds (generated vs each real image of the subject), averaged",
                "clip_t": "cosine of CLIP image_embeds and text_embeds of the prompt with the class noun",
                "mean": "over generated images; mean_of_subjects: over per-subject scores",
            },
            "generated": self.generated.display().to_string(),
            "dreambench": self.dreambench.display().to_string(),
            "clip_model": self.clip_model.display().to_string(),
            "dino_model": self.dino_model.display().to_string(),
            "n_images": self.images.len(),
            "n_subjects": self.subjects.len(),
            "mean": opt(&self.mean),
            "mean_of_subjects": opt(&self.mean_of_subjects),
            "subjects": self.subjects.iter().map(|s| json!({
                "subject": s.subject,
                "class": s.class_name,
                "live": s.live,
                "n_real": s.n_real,
                "n_generated": s.n_generated,
                "dino": s.scores.dino,
                "clip_i": s.scores.clip_i,
                "clip_t": s.scores.clip_t,
            })).collect::<Vec<_>>(),
            "missing_subjects": self.missing_subjects,
            "bad_images": self.bad.iter().map(|b| json!({
                "path": b.path.display().to_string(),
                "reason": b.reason,
            })).collect::<Vec<_>>(),
            "images": self.images.iter().map(|i| json!({
                "path": i.path.display().to_string(),
                "subject": i.subject,
                "prompt_index": i.prompt_index,
                "sample_index": i.sample_index,
                "prompt": i.prompt,
                "dino": i.dino,
                "clip_i": i.clip_i,
                "clip_t": i.clip_t,
            })).collect::<Vec<_>>(),
            "elapsed_s": self.elapsed_s,
        })
    }

    /// A Markdown table: one row per subject, then the means.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "DreamBench scores for `{}` ({} images, {} subjects{})\n\n",
            self.generated.display(),
            self.images.len(),
            self.subjects.len(),
            if self.bad.is_empty() {
                String::new()
            } else {
                format!(", {} bad images", self.bad.len())
            }
        ));
        s.push_str("| subject | class | images | DINO | CLIP-I | CLIP-T |\n");
        s.push_str("|---|---|---:|---:|---:|---:|\n");
        for r in &self.subjects {
            s.push_str(&format!(
                "| {} | {} | {} | {:.3} | {:.3} | {:.3} |\n",
                r.subject,
                r.class_name,
                r.n_generated,
                r.scores.dino,
                r.scores.clip_i,
                r.scores.clip_t
            ));
        }
        if let Some(m) = self.mean {
            s.push_str(&format!(
                "| **mean (images)** | | {} | **{:.3}** | **{:.3}** | **{:.3}** |\n",
                self.images.len(),
                m.dino,
                m.clip_i,
                m.clip_t
            ));
        }
        if let Some(m) = self.mean_of_subjects {
            s.push_str(&format!(
                "| mean (subjects) | | {} | {:.3} | {:.3} | {:.3} |\n",
                self.subjects.len(),
                m.dino,
                m.clip_i,
                m.clip_t
            ));
        }
        if !self.missing_subjects.is_empty() {
            s.push_str(&format!(
                "\nNot generated: {}\n",
                self.missing_subjects.join(", ")
            ));
        }
        for b in &self.bad {
            s.push_str(&format!("\nbad: {} — {}", b.path.display(), b.reason));
        }
        if !self.bad.is_empty() {
            s.push('\n');
        }
        s
    }

    /// Write the JSON to `path` and the Markdown table next to it (`.md`).
    pub fn write(&self, path: &Path) -> Result<PathBuf, EvalError> {
        write_report(path, &self.to_json(), &self.to_markdown())
    }
}

/// Writes `json` to `path` and `markdown` next to it (`.md`), each atomically; returns the `.md` path.
pub(crate) fn write_report(
    path: &Path,
    json: &Value,
    markdown: &str,
) -> Result<PathBuf, EvalError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let text = serde_json::to_string_pretty(json).unwrap_or_default();
    blipd_models::weights::atomic_write(path, text.as_bytes()).map_err(io_err(path))?;
    let md = path.with_extension("md");
    blipd_models::weights::atomic_write(&md, markdown.as_bytes()).map_err(io_err(&md))?;
    Ok(md)
}

/// Progress of [`DreamBenchEval::evaluate`].
#[derive(Debug, Clone)]
pub enum EvalEvent {
    /// After listing: generated images found (bad names included).
    Planned { images: usize, subjects: usize },
    /// A subject's real photos were embedded (not sent when cached).
    RealEmbedded { subject: String, images: usize },
    /// One generated image done (`ok` false: reported as bad).
    Image { ok: bool },
}

/// Options of [`DreamBenchEval::evaluate`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Images per forward.
    pub batch_size: usize,
    /// Only these subjects (all when empty).
    pub subjects: Vec<String>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch_size: 16,
            subjects: Vec::new(),
        }
    }
}

/// Unit-norm embeddings of a set of images: DINO `[N, D_dino]`, CLIP `[N, P]`.
#[derive(Debug, Clone)]
pub struct Embeddings<B: Backend> {
    pub dino: Tensor<B, 2>,
    pub clip: Tensor<B, 2>,
}

/// Preprocessed pixels of one image: (DINO `[3·H·W]`, CLIP `[3·H'·W']`).
pub type Pixels = (Vec<f32>, Vec<f32>);

/// The two image processors (plain data, shared across decoding threads).
#[derive(Clone, Copy)]
struct Processors<'a> {
    dino: &'a ClipSegImageProcessor,
    clip: &'a ClipImageProcessor,
}

impl Processors<'_> {
    fn pixel_values(&self, img: &RgbImage) -> Result<Pixels, EvalError> {
        let dino = self
            .dino
            .pixel_values(img)
            .map_err(EvalError::DinoProcessor)?;
        let clip = self.clip.pixel_values(img)?;
        Ok((dino, clip))
    }
}

/// The DreamBench scorer: DINO and CLIP models with their processors and the CLIP tokenizer.
pub struct DreamBenchEval<B: Backend> {
    pub clip: ClipModel<B>,
    pub clip_processor: ClipImageProcessor,
    pub tokenizer: ClipTokenizer,
    pub dino: DinoVitModel<B>,
    pub dino_processor: ClipSegImageProcessor,
    clip_dir: PathBuf,
    dino_dir: PathBuf,
    max_text_len: usize,
    device: B::Device,
    real_cache: HashMap<(PathBuf, String), Embeddings<B>>,
    text_cache: HashMap<String, Tensor<B, 2>>,
}

fn need(dir: &Path, file: &str, what: &str) -> Result<PathBuf, EvalError> {
    let p = dir.join(file);
    if p.is_file() {
        Ok(p)
    } else {
        Err(EvalError::MissingFile {
            what: what.into(),
            dir: dir.to_path_buf(),
            file: file.into(),
        })
    }
}

/// Decode an image file into 8-bit RGB.
pub fn read_rgb(path: &Path) -> Result<RgbImage, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("reading: {e}"))?;
    let id = path.display().to_string();
    let img = decode_image(&bytes, &id, &ReadLimits::default()).map_err(|e| e.to_string())?;
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    RgbImage::new(w as usize, h as usize, rgb.into_raw()).map_err(|e| e.to_string())
}

impl<B: Backend> DreamBenchEval<B> {
    /// Load a transformers `CLIPModel` folder and a DINO `ViTModel` folder. Each needs `config.json`,
    /// `model.safetensors` or `pytorch_model.bin` and `preprocessor_config.json`; the CLIP folder also
    /// the tokenizer (`vocab.json` + `merges.txt`, or `tokenizer.json`).
    pub fn load(clip_dir: &Path, dino_dir: &Path, device: &B::Device) -> Result<Self, EvalError> {
        for (what, dir) in [("CLIP", clip_dir), ("DINO", dino_dir)] {
            if !dir.is_dir() {
                return Err(EvalError::NoFolder {
                    what: format!("{what} model"),
                    path: dir.to_path_buf(),
                });
            }
            need(dir, "config.json", what)?;
            need(dir, "preprocessor_config.json", what)?;
        }
        let clip_processor =
            ClipImageProcessor::from_file(&clip_dir.join("preprocessor_config.json"))?;
        let dino_processor =
            ClipSegImageProcessor::from_file(&dino_dir.join("preprocessor_config.json"))
                .map_err(EvalError::DinoProcessor)?;
        let tokenizer = ClipTokenizer::from_dir(clip_dir).map_err(|source| EvalError::Model {
            what: "CLIP tokenizer".into(),
            dir: clip_dir.to_path_buf(),
            source,
        })?;
        let model_err = |what: &str, dir: &Path| {
            let (what, dir) = (what.to_string(), dir.to_path_buf());
            move |source| EvalError::Model { what, dir, source }
        };
        let (clip, clip_cfg) =
            ClipModel::load(clip_dir, device).map_err(model_err("CLIP", clip_dir))?;
        let (dino, dino_cfg) =
            DinoVitModel::load(dino_dir, device).map_err(model_err("DINO", dino_dir))?;
        let vocab = clip_cfg.text_config.vocab_size;
        if tokenizer.vocab_size() > vocab {
            return Err(EvalError::Model {
                what: "CLIP tokenizer".into(),
                dir: clip_dir.to_path_buf(),
                source: ModelError::Invalid(format!(
                    "the tokenizer has {} tokens but the text model's vocab_size is {vocab}",
                    tokenizer.vocab_size()
                )),
            });
        }
        let s = clip_cfg.vision_config.image_size;
        if clip_processor.output_size() != Some((s, s)) {
            return Err(EvalError::Config {
                path: clip_dir.join("preprocessor_config.json"),
                key: "crop_size".into(),
                message: format!(
                    "the processor gives {:?} (height, width) but the vision model takes {s}×{s}",
                    clip_processor.output_size()
                ),
            });
        }
        let ds = dino_cfg.image_size;
        if dino_processor.size != (ds, ds) {
            return Err(EvalError::Config {
                path: dino_dir.join("preprocessor_config.json"),
                key: "size".into(),
                message: format!(
                    "the processor gives {:?} but the DINO ViT takes {ds}×{ds}",
                    dino_processor.size
                ),
            });
        }
        Ok(Self {
            clip,
            clip_processor,
            tokenizer,
            dino,
            dino_processor,
            clip_dir: clip_dir.to_path_buf(),
            dino_dir: dino_dir.to_path_buf(),
            max_text_len: clip_cfg.text_config.max_position_embeddings,
            device: device.clone(),
            real_cache: HashMap::new(),
            text_cache: HashMap::new(),
        })
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Both processors' pixels for one image: (DINO `[3·H·W]`, CLIP `[3·H'·W']`).
    pub fn pixel_values(&self, img: &RgbImage) -> Result<Pixels, EvalError> {
        self.processors().pixel_values(img)
    }

    fn processors(&self) -> Processors<'_> {
        Processors {
            dino: &self.dino_processor,
            clip: &self.clip_processor,
        }
    }

    /// Unit-norm DINO and CLIP embeddings of preprocessed images (`pixels` from [`Self::pixel_values`]).
    pub fn embed_pixels(&self, pixels: &[Pixels]) -> Result<Embeddings<B>, EvalError> {
        let n = pixels.len();
        let (dh, dw) = self.dino_processor.size;
        let (ch, cw) = self.clip_processor.output_size().unwrap_or((0, 0));
        let dino: Vec<f32> = pixels.iter().flat_map(|p| p.0.iter().copied()).collect();
        let clip: Vec<f32> = pixels.iter().flat_map(|p| p.1.iter().copied()).collect();
        let dino = Tensor::<B, 4>::from_data(TensorData::new(dino, [n, 3, dh, dw]), &self.device);
        let clip = Tensor::<B, 4>::from_data(TensorData::new(clip, [n, 3, ch, cw]), &self.device);
        let dino = self.dino.cls_embedding(dino).map_err(EvalError::Forward)?;
        let clip = self.clip.image_embeds(clip).map_err(EvalError::Forward)?;
        Ok(Embeddings {
            dino: l2_normalize(dino),
            clip,
        })
    }

    /// Unit-norm embeddings of decoded images, `batch_size` per forward.
    pub fn embed_images(
        &self,
        images: &[RgbImage],
        batch_size: usize,
    ) -> Result<Embeddings<B>, EvalError> {
        let mut dino = Vec::new();
        let mut clip = Vec::new();
        let procs = self.processors();
        for chunk in images.chunks(batch_size.max(1)) {
            let px = chunk
                .par_iter()
                .map(|im| procs.pixel_values(im))
                .collect::<Result<Vec<_>, _>>()?;
            let e = self.embed_pixels(&px)?;
            dino.push(e.dino);
            clip.push(e.clip);
        }
        if dino.is_empty() {
            return Err(EvalError::Forward(ModelError::Invalid(
                "no images to embed".into(),
            )));
        }
        Ok(Embeddings {
            dino: Tensor::cat(dino, 0),
            clip: Tensor::cat(clip, 0),
        })
    }

    /// `text_embeds` `[1, P]` of a prompt (cached): `<|startoftext|> … <|endoftext|>`, truncated to the
    /// text tower's positions, unpadded (as `processor(text=prompt)` for one prompt).
    pub fn text_embeds(&mut self, prompt: &str) -> Result<Tensor<B, 2>, EvalError> {
        if let Some(t) = self.text_cache.get(prompt) {
            return Ok(t.clone());
        }
        let tok_err = |source| EvalError::Model {
            what: "CLIP tokenizer".into(),
            dir: self.clip_dir.clone(),
            source,
        };
        let n = self.tokenizer.tokenize(prompt).map_err(tok_err)?.len();
        let len = (n + 2).min(self.max_text_len);
        let ids = self
            .tokenizer
            .encode(prompt, len)
            .map_err(|source| EvalError::Model {
                what: "CLIP tokenizer".into(),
                dir: self.clip_dir.clone(),
                source,
            })?;
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, len]), &self.device);
        let t = self
            .clip
            .text_embeds(ids, None)
            .map_err(EvalError::Forward)?;
        self.text_cache.insert(prompt.to_string(), t.clone());
        Ok(t)
    }

    /// Embeddings of a subject's real photos (computed once per benchmark folder and subject).
    pub fn real_embeddings(
        &mut self,
        bench: &DreamBench,
        subject: &DreamBenchSubject,
        batch_size: usize,
    ) -> Result<(Embeddings<B>, bool), EvalError> {
        let key = (bench.root.clone(), subject.name.clone());
        if let Some(e) = self.real_cache.get(&key) {
            return Ok((e.clone(), true));
        }
        let images = subject
            .images
            .par_iter()
            .map(|p| {
                read_rgb(p).map_err(|reason| EvalError::RealImage {
                    path: p.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let e = self.embed_images(&images, batch_size)?;
        self.real_cache.insert(key, e.clone());
        Ok((e, false))
    }

    /// Score decoded generated images of one subject: `(prompt index, image)` pairs → per-image
    /// `(dino, clip_i, clip_t)` in input order. For callers that keep images in memory (sweeps).
    pub fn score_subject_images(
        &mut self,
        bench: &DreamBench,
        subject: &str,
        images: &[(usize, RgbImage)],
        batch_size: usize,
    ) -> Result<Vec<Scores>, EvalError> {
        let subj = bench
            .subject(subject)
            .cloned()
            .ok_or_else(|| EvalError::Bench {
                path: bench.root.clone(),
                message: format!("no subject `{subject}`"),
            })?;
        let procs = self.processors();
        let pixels = images
            .par_iter()
            .map(|(_, im)| procs.pixel_values(im))
            .collect::<Result<Vec<_>, _>>()?;
        let prompts = images
            .iter()
            .map(|(p, _)| {
                bench
                    .eval_prompt(&subj, *p)
                    .ok_or_else(|| EvalError::Bench {
                        path: bench.root.clone(),
                        message: format!(
                            "prompt index {p} is out of range for `{subject}` ({} prompts)",
                            bench.templates(&subj).len()
                        ),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.score_pixels(bench, &subj, &pixels, &prompts, batch_size)
    }

    fn score_pixels(
        &mut self,
        bench: &DreamBench,
        subject: &DreamBenchSubject,
        pixels: &[Pixels],
        prompts: &[String],
        batch_size: usize,
    ) -> Result<Vec<Scores>, EvalError> {
        let (real, _) = self.real_embeddings(bench, subject, batch_size)?;
        let mut out = Vec::with_capacity(pixels.len());
        for (px, pr) in pixels
            .chunks(batch_size.max(1))
            .zip(prompts.chunks(batch_size.max(1)))
        {
            let e = self.embed_pixels(px)?;
            let texts = pr
                .iter()
                .map(|p| self.text_embeds(p))
                .collect::<Result<Vec<_>, _>>()?;
            let texts = Tensor::cat(texts, 0);
            let dino = mean_rows(e.dino.matmul(real.dino.clone().transpose()));
            let clip_i = mean_rows(e.clip.clone().matmul(real.clip.clone().transpose()));
            let clip_t = to_vec((e.clip * texts).sum_dim(1));
            for i in 0..px.len() {
                out.push(Scores {
                    dino: dino[i],
                    clip_i: clip_i[i],
                    clip_t: clip_t[i],
                });
            }
        }
        Ok(out)
    }

    /// Score `generated/<subject>/<prompt>_<sample>.<ext>` against the benchmark (see the module docs).
    pub fn evaluate(
        &mut self,
        bench: &DreamBench,
        generated: &Path,
        opts: &EvalOptions,
        mut on_event: impl FnMut(EvalEvent),
    ) -> Result<EvalReport, EvalError> {
        let start = std::time::Instant::now();
        if !generated.is_dir() {
            return Err(EvalError::NoFolder {
                what: "generated images".into(),
                path: generated.to_path_buf(),
            });
        }
        for s in &opts.subjects {
            if bench.subject(s).is_none() {
                return Err(EvalError::Bench {
                    path: bench.root.clone(),
                    message: format!("no subject `{s}` (asked for with --subject)"),
                });
            }
        }
        let mut report = EvalReport {
            generated: generated.to_path_buf(),
            dreambench: bench.root.clone(),
            clip_model: self.clip_dir.clone(),
            dino_model: self.dino_dir.clone(),
            ..EvalReport::default()
        };
        // Plan: subject folder → [(path, prompt, sample)].
        let mut plan: BTreeMap<String, Vec<(PathBuf, usize, usize)>> = BTreeMap::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(generated)
            .map_err(io_err(generated))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for dir in entries {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !dir.is_dir() {
                if is_image(&dir) {
                    report.bad.push(BadImage {
                        path: dir,
                        reason: "image outside a subject folder (expected <subject>/<prompt>_<sample>.png)"
                            .into(),
                    });
                }
                continue;
            }
            if name.starts_with('.') {
                continue;
            }
            let Some(subj) = bench.subject(&name) else {
                report.bad.push(BadImage {
                    path: dir,
                    reason: format!("`{name}` is not a subject of {}", bench.root.display()),
                });
                continue;
            };
            if !opts.subjects.is_empty() && !opts.subjects.contains(&name) {
                continue;
            }
            let n_prompts = bench.templates(subj).len();
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(io_err(&dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            files.sort();
            let list = plan.entry(name.clone()).or_default();
            for f in files {
                let stem = f
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let parsed = stem
                    .split_once('_')
                    .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
                match parsed {
                    None => report.bad.push(BadImage {
                        path: f,
                        reason: "file name is not <prompt index>_<sample index>".into(),
                    }),
                    Some((p, _)) if p >= n_prompts => report.bad.push(BadImage {
                        path: f,
                        reason: format!(
                            "prompt index {p} is out of range ({n_prompts} {} prompts)",
                            if subj.live { "live-subject" } else { "object" }
                        ),
                    }),
                    Some((p, s)) => list.push((f, p, s)),
                }
            }
        }
        let n_planned: usize = plan.values().map(Vec::len).sum::<usize>() + report.bad.len();
        on_event(EvalEvent::Planned {
            images: n_planned,
            subjects: plan.len(),
        });
        for _ in 0..report.bad.len() {
            on_event(EvalEvent::Image { ok: false });
        }
        report.missing_subjects = bench
            .subjects
            .iter()
            .filter(|s| opts.subjects.is_empty() || opts.subjects.contains(&s.name))
            .filter(|s| plan.get(&s.name).is_none_or(Vec::is_empty))
            .map(|s| s.name.clone())
            .collect();

        let bs = opts.batch_size.max(1);
        for (name, files) in &plan {
            if files.is_empty() {
                continue;
            }
            let subj = bench
                .subject(name)
                .cloned()
                .expect("planned subjects exist");
            let (_, cached) = self.real_embeddings(bench, &subj, bs)?;
            if !cached {
                on_event(EvalEvent::RealEmbedded {
                    subject: name.clone(),
                    images: subj.images.len(),
                });
            }
            let mut subject_scores = Vec::new();
            for chunk in files.chunks(bs) {
                let procs = self.processors();
                let decoded: Vec<Result<Pixels, String>> = chunk
                    .par_iter()
                    .map(|(path, _, _)| {
                        let img = read_rgb(path)?;
                        procs.pixel_values(&img).map_err(|e| e.to_string())
                    })
                    .collect();
                let mut good = Vec::new();
                let mut pixels = Vec::new();
                let mut prompts = Vec::new();
                for ((path, p, s), d) in chunk.iter().zip(decoded) {
                    match d {
                        Ok(px) => {
                            pixels.push(px);
                            let prompt = bench.eval_prompt(&subj, *p).expect("index checked");
                            prompts.push(prompt);
                            good.push((path.clone(), *p, *s));
                        }
                        Err(reason) => {
                            report.bad.push(BadImage {
                                path: path.clone(),
                                reason,
                            });
                            on_event(EvalEvent::Image { ok: false });
                        }
                    }
                }
                if pixels.is_empty() {
                    continue;
                }
                let scores = self.score_pixels(bench, &subj, &pixels, &prompts, bs)?;
                for ((path, p, s), (sc, prompt)) in
                    good.into_iter().zip(scores.into_iter().zip(prompts))
                {
                    subject_scores.push(sc);
                    report.images.push(ImageScore {
                        path,
                        subject: name.clone(),
                        prompt_index: p,
                        sample_index: s,
                        prompt,
                        dino: sc.dino,
                        clip_i: sc.clip_i,
                        clip_t: sc.clip_t,
                    });
                    on_event(EvalEvent::Image { ok: true });
                }
            }
            if let Some(scores) = Scores::mean(subject_scores.iter().copied()) {
                report.subjects.push(SubjectScores {
                    subject: name.clone(),
                    class_name: subj.class_name.clone(),
                    live: subj.live,
                    n_real: subj.images.len(),
                    n_generated: subject_scores.len(),
                    scores,
                });
            }
        }
        report.mean = Scores::mean(report.images.iter().map(|i| Scores {
            dino: i.dino,
            clip_i: i.clip_i,
            clip_t: i.clip_t,
        }));
        report.mean_of_subjects = Scores::mean(report.subjects.iter().map(|s| s.scores));
        report.elapsed_s = start.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// The "Real Images (Oracle)" row of DreamBooth / BLIP-Diffusion Table 1: each real photo of a
/// subject scored against the subject's *other* real photos (DINO, CLIP-I; there is no prompt, so no
/// CLIP-T). It checks the metric setup itself: with the checkpoints the papers used, the means
/// should come out near their reported 0.774 (DINO) and 0.885 (CLIP-I).
#[derive(Debug, Clone, PartialEq)]
pub struct OracleReport {
    /// (subject, real images, mean DINO, mean CLIP-I) per subject with at least two photos.
    pub subjects: Vec<(String, usize, f64, f64)>,
    /// Mean over all scored photos (DINO, CLIP-I).
    pub mean: Option<(f64, f64)>,
}

impl OracleReport {
    pub fn to_json(&self) -> Value {
        json!({
            "protocol": "each real image vs the subject's other real images (self-pairs excluded), averaged",
            "subjects": self.subjects.iter().map(|(s, n, d, c)| json!({
                "subject": s, "n_real": n, "dino": d, "clip_i": c})).collect::<Vec<_>>(),
            "mean": self.mean.map(|(d, c)| json!({"dino": d, "clip_i": c})),
        })
    }

    pub fn to_markdown(&self) -> String {
        let mut out =
            String::from("| subject | real images | DINO | CLIP-I |\n|---|---:|---:|---:|\n");
        for (s, n, d, c) in &self.subjects {
            out.push_str(&format!("| {s} | {n} | {d:.4} | {c:.4} |\n"));
        }
        if let Some((d, c)) = self.mean {
            out.push_str(&format!(
                "| **mean (over images)** | | **{d:.4}** | **{c:.4}** |\n"
            ));
        }
        out
    }
}

/// Mean off-diagonal entry of each row of the square similarity matrix `[N, N]`.
fn mean_rows_off_diagonal<B: Backend>(t: Tensor<B, 2>) -> Vec<f64> {
    let [n, _] = t.dims();
    let v = to_vec(t);
    (0..n)
        .map(|i| {
            let row = &v[i * n..(i + 1) * n];
            (row.iter().sum::<f64>() - row[i]) / (n - 1) as f64
        })
        .collect()
}

impl<B: Backend> DreamBenchEval<B> {
    /// [`OracleReport`] for `subjects` (all when empty); subjects with fewer than two photos are
    /// skipped.
    pub fn oracle(
        &mut self,
        bench: &DreamBench,
        subjects: &[String],
        batch_size: usize,
    ) -> Result<OracleReport, EvalError> {
        let mut rows = Vec::new();
        let (mut sum_d, mut sum_c, mut n_all) = (0f64, 0f64, 0usize);
        for subj in bench.subjects.clone() {
            if !subjects.is_empty() && !subjects.contains(&subj.name) {
                continue;
            }
            let n = subj.images.len();
            if n < 2 {
                continue;
            }
            let (real, _) = self.real_embeddings(bench, &subj, batch_size)?;
            let d = mean_rows_off_diagonal(real.dino.clone().matmul(real.dino.clone().transpose()));
            let c = mean_rows_off_diagonal(real.clip.clone().matmul(real.clip.clone().transpose()));
            let (sd, sc) = (d.iter().sum::<f64>(), c.iter().sum::<f64>());
            sum_d += sd;
            sum_c += sc;
            n_all += n;
            rows.push((subj.name.clone(), n, sd / n as f64, sc / n as f64));
        }
        Ok(OracleReport {
            subjects: rows,
            mean: (n_all > 0).then(|| (sum_d / n_all as f64, sum_c / n_all as f64)),
        })
    }
}

fn to_vec<B: Backend>(t: Tensor<B, 2>) -> Vec<f64> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Row means of `[G, R]` in f64.
fn mean_rows<B: Backend>(t: Tensor<B, 2>) -> Vec<f64> {
    let [g, r] = t.dims();
    let v = to_vec(t);
    (0..g)
        .map(|i| v[i * r..(i + 1) * r].iter().sum::<f64>() / r as f64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_render_without_the_identifier() {
        assert_eq!(
            render_prompt("a {0} {1} in the jungle", None, "dog"),
            "a dog in the jungle"
        );
        assert_eq!(
            render_prompt("a red {0} {1}", None, "stuffed animal"),
            "a red stuffed animal"
        );
        assert_eq!(
            render_prompt("a {0} {1} in the snow", Some("sks"), "dog"),
            "a sks dog in the snow"
        );
        assert_eq!(
            quoted_template("'a {0} {1} in the jungle'.format(unique_token, class_token),")
                .as_deref(),
            Some("a {0} {1} in the jungle")
        );
        assert_eq!(quoted_template("prompt_list = ["), None);
    }

    #[test]
    fn clip_processor_sizes_follow_transformers() {
        let p = ClipImageProcessor::vit_b32();
        // int(224 · 187 / 150) = 279; portrait and landscape.
        assert_eq!(p.resized_size(187, 150), (279, 224));
        assert_eq!(p.resized_size(150, 187), (224, 279));
        assert_eq!(p.resized_size(512, 512), (224, 224));
        let v = json!({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
                       "image_processor_type": "CLIPImageProcessor"});
        let q = ClipImageProcessor::from_json(&v, Path::new("x")).unwrap();
        assert_eq!(q.output_size(), Some((32, 32)));
        assert_eq!(q.resample, PilResample::Bicubic);
        let v = json!({"image_processor_type": "ViTImageProcessor"});
        assert!(ClipImageProcessor::from_json(&v, Path::new("x")).is_err());
    }
}
