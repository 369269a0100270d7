//! Evaluation in the procedural micro world ([`blipd_data::synthetic`]): does a model trained there
//! render a subject it never saw from its subject embedding alone?
//!
//! A small probe classifier, trained on ground-truth renders of the *training* identities, reads
//! palette, pattern, scene and shape off an image; its accuracy on renders of the *held-out*
//! identities is reported beside the results. The trained pipeline then generates every held-out
//! subject in scenes from their captions ("a star on grass") twice from the same initial noise:
//! **zero-shot** (the reference image's subject embeddings in the prompt, as `blipd generate`) and
//! **text-only** (the caption alone, as the 15 % dropped training samples). The text never names the
//! palette or the pattern, so text-only can only guess them.
//!
//! - subject fidelity = mean over images of (palette agrees + pattern agrees) / 2, with the reference
//!   subject's palette and pattern;
//! - text alignment = share of images whose scene agrees with the prompt's.
//!
//! The probe is evaluation tooling (like a linear probe), trained here with Burn's Adam; the
//! diffusion stages' training lives in the stage crates.

use blipd_data::synthetic::{
    caption, held_out_ids, render_pair, synth_pair, Identity, NUM_PALETTES, PATTERNS, SCENES,
    SHAPES,
};
use burn::module::{AutodiffModule, Module};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::backend::AutodiffBackend;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::error::AppError;
use crate::generate::{BlipDiffusionPipeline, GenerateOptions};

/// `[eval]` of a pre-training plan on the procedural world.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MicroEvalConfig {
    /// Held-out subjects to evaluate (unset: all of them, a tenth of the identities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects: Option<usize>,
    /// Scenes each subject is rendered in.
    #[serde(default = "default_scenes")]
    pub scenes_per_subject: usize,
    /// PNDM steps and classifier-free guidance of the generations.
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance_scale: f64,
    /// Seed of the initial latents and of the reference poses.
    #[serde(default)]
    pub seed: u64,
    /// Image size (the stage-2 `target_size`).
    #[serde(default = "default_size")]
    pub size: usize,
    /// Optimizer steps of the probe classifier (batch 64).
    #[serde(default = "default_probe_steps")]
    pub probe_steps: usize,
    /// Evaluate the held-out identities (`"held_out"`, the measure of zero-shot generalisation) or,
    /// as a diagnostic, as many *training* identities (`"train"`: what the model memorised).
    #[serde(default)]
    pub split: Split,
    /// `[eval.finetune]`: also fine-tune the pipeline on the first held-out subjects and compare with
    /// zero-shot ([`compare_finetuned`]; the plan runs the fine-tuning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<MicroFinetuneConfig>,
}

/// `[eval.finetune]`: subject fine-tuning (the released recipe: U-Net and the cached subject
/// embedding trained on the caption `"a {shape}"`, constant lr) on each of the first `subjects`
/// held-out identities, from `images` renders of it on unrelated textures (its "photos").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MicroFinetuneConfig {
    /// Held-out subjects to fine-tune on; 0 turns the comparison off (e.g. `--set
    /// eval.finetune.subjects=0` in a sweep that needs only the zero-shot numbers).
    #[serde(default = "default_ft_subjects")]
    pub subjects: usize,
    /// Optimizer steps per subject (the paper: 40–120).
    #[serde(default = "default_ft_steps")]
    pub steps: usize,
    #[serde(default = "default_ft_lr")]
    pub lr: f64,
    #[serde(default = "default_ft_batch")]
    pub batch_size: usize,
    #[serde(default = "default_ft_images")]
    pub images: usize,
    /// Fine-tune LoRA adapters of this rank on the frozen U-Net instead of the whole U-Net
    /// (`blipd finetune --lora`); `lr` then applies to the adapters and the subject embedding.
    #[serde(default)]
    pub lora_rank: Option<usize>,
}

fn default_ft_subjects() -> usize {
    4
}
fn default_ft_steps() -> usize {
    120
}
fn default_ft_lr() -> f64 {
    5e-4
}
fn default_ft_batch() -> usize {
    3
}
fn default_ft_images() -> usize {
    4
}

impl Default for MicroFinetuneConfig {
    fn default() -> Self {
        Self {
            subjects: default_ft_subjects(),
            steps: default_ft_steps(),
            lr: default_ft_lr(),
            batch_size: default_ft_batch(),
            images: default_ft_images(),
            lora_rank: None,
        }
    }
}

/// Which identities [`evaluate`] renders.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    #[default]
    HeldOut,
    Train,
}

fn default_scenes() -> usize {
    2
}
fn default_steps() -> usize {
    25
}
fn default_guidance() -> f64 {
    3.0
}
fn default_size() -> usize {
    32
}
fn default_probe_steps() -> usize {
    500
}

impl Default for MicroEvalConfig {
    fn default() -> Self {
        Self {
            subjects: None,
            scenes_per_subject: default_scenes(),
            steps: default_steps(),
            guidance_scale: default_guidance(),
            seed: 0,
            size: default_size(),
            probe_steps: default_probe_steps(),
            split: Split::HeldOut,
            finetune: None,
        }
    }
}

impl MicroEvalConfig {
    pub fn validate(&self) -> Result<(), AppError> {
        let bad = |m: &str| Err(AppError::Request(m.into()));
        if self.subjects == Some(0) || self.scenes_per_subject == 0 {
            return bad("subjects and scenes_per_subject must be ≥ 1");
        }
        if self.steps == 0 || self.probe_steps == 0 {
            return bad("steps and probe_steps must be ≥ 1");
        }
        if !(self.guidance_scale.is_finite() && self.guidance_scale >= 0.0) {
            return bad("guidance_scale must be finite and ≥ 0");
        }
        if self.size < 8 {
            return bad("size must be ≥ 8 pixels");
        }
        if let Some(ft) = self.finetune.as_ref().filter(|f| f.subjects > 0) {
            if ft.steps == 0 || ft.batch_size == 0 || ft.images == 0 {
                return bad("[eval.finetune] steps, batch_size and images must be ≥ 1");
            }
            let held = held_out_ids()
                .len()
                .min(self.subjects.unwrap_or(usize::MAX));
            if ft.subjects > held {
                return Err(AppError::Request(format!(
                    "[eval.finetune] subjects = {} but only {held} held-out subjects are evaluated",
                    ft.subjects
                )));
            }
            if !(ft.lr.is_finite() && ft.lr > 0.0) {
                return bad("[eval.finetune] lr must be finite and > 0");
            }
            if self.split != Split::HeldOut {
                return bad("[eval.finetune] needs split = \"held_out\"");
            }
        }
        Ok(())
    }
}

/// Number of outputs of each probe head.
const HEADS: [usize; 4] = [NUM_PALETTES, PATTERNS.len(), SCENES.len(), SHAPES.len()];

/// The probe: three strided convolutions, global mean+max pooling, one linear layer whose outputs
/// are the logits of the four heads (palette, pattern, scene, shape).
#[derive(Module, Debug)]
pub struct Probe<B: Backend> {
    conv1: Conv2d<B>,
    conv2: Conv2d<B>,
    conv3: Conv2d<B>,
    head: Linear<B>,
}

/// What the probe reads off an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub palette: usize,
    pub pattern: usize,
    pub scene: usize,
    pub shape: usize,
}

impl<B: Backend> Probe<B> {
    pub fn new(device: &B::Device) -> Self {
        let conv = |i, o, s| {
            Conv2dConfig::new([i, o], [3, 3])
                .with_stride([s, s])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        Self {
            conv1: conv(3, 24, 2),
            conv2: conv(24, 48, 2),
            conv3: conv(48, 64, 1),
            head: LinearConfig::new(128, HEADS.iter().sum()).init(device),
        }
    }

    /// Images `[B, 3, S, S]` in [0, 1] → logits `[B, Σ heads]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = x * 2.0 - 1.0;
        let x = relu(self.conv1.forward(x));
        let x = relu(self.conv2.forward(x));
        let x = relu(self.conv3.forward(x));
        let [b, c, h, w] = x.dims();
        let flat = x.reshape([b, c, h * w]);
        let mean = flat.clone().mean_dim(2).reshape([b, c]);
        let max = flat.max_dim(2).reshape([b, c]);
        self.head.forward(Tensor::cat(vec![mean, max], 1))
    }

    /// The most likely value of each head.
    pub fn read(&self, x: Tensor<B, 4>) -> Vec<Reading> {
        let logits = self.forward(x);
        let [b, _] = logits.dims();
        let mut heads = Vec::new();
        let mut o = 0;
        for &n in &HEADS {
            let arg: Vec<i64> = logits
                .clone()
                .slice([0..b, o..o + n])
                .argmax(1)
                .into_data()
                .convert::<i64>()
                .to_vec()
                .unwrap_or_default();
            heads.push(arg);
            o += n;
        }
        (0..b)
            .map(|i| Reading {
                palette: heads[0][i] as usize,
                pattern: heads[1][i] as usize,
                scene: heads[2][i] as usize,
                shape: heads[3][i] as usize,
            })
            .collect()
    }
}

/// Images → `[N, 3, S, S]` in [0, 1].
pub fn to_tensor<B: Backend>(images: &[RgbImage], device: &B::Device) -> Tensor<B, 4> {
    let (w, h) = images
        .first()
        .map_or((0, 0), |i| (i.width() as usize, i.height() as usize));
    let mut v = Vec::with_capacity(images.len() * 3 * w * h);
    for img in images {
        for c in 0..3 {
            v.extend(img.pixels().map(|p| p[c] as f32 / 255.0));
        }
    }
    Tensor::from_data(TensorData::new(v, [images.len(), 3, h, w]), device)
}

/// `[N, 3, H, W]` in [0, 1] → images.
fn to_images<B: Backend>(x: Tensor<B, 4>) -> Result<Vec<RgbImage>, AppError> {
    let u = blipd_models::vae::to_uint8_image(x * 2.0 - 1.0)?;
    (0..u.batch)
        .map(|i| {
            RgbImage::from_raw(u.width as u32, u.height as u32, u.image(i).to_vec())
                .ok_or_else(|| AppError::Request("image buffer size".into()))
        })
        .collect()
}

/// Accuracy of each head on held-out renders.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProbeAccuracy {
    pub palette: f64,
    pub pattern: f64,
    pub scene: f64,
    pub shape: f64,
    /// Renders it was measured on (held-out identities, scenes and poses never in the probe's data).
    pub renders: usize,
}

fn truth(p: &blipd_data::synthetic::SyntheticPair) -> Reading {
    Reading {
        palette: p.identity.palette,
        pattern: p.identity.pattern,
        scene: p.scene,
        shape: p.identity.shape,
    }
}

/// Trains the probe on ground-truth targets of training identities (Adam, lr 3e-3, batch 64) and
/// measures it on 4 renders of every held-out identity.
pub fn train_probe<B: AutodiffBackend>(
    cfg: &MicroEvalConfig,
    device: &B::Device,
) -> (Probe<B::InnerBackend>, ProbeAccuracy) {
    B::seed(device, 0x9_0BE);
    let mut probe = Probe::<B>::new(device);
    let mut optim = AdamConfig::new().init::<B, Probe<B>>();
    let size = cfg.size as u32;
    let batch = 64usize;
    let total: usize = HEADS.iter().sum();
    for step in 0..cfg.probe_steps {
        let pairs: Vec<_> = (0..batch)
            .map(|i| synth_pair((step * batch + i) as u64, 0x9_0BE, size))
            .collect();
        let images: Vec<RgbImage> = pairs.iter().map(|p| p.target.clone()).collect();
        let mut onehot = vec![0f32; batch * total];
        for (i, p) in pairs.iter().enumerate() {
            let t = truth(p);
            let mut o = 0;
            for (k, &n) in HEADS.iter().enumerate() {
                let v = [t.palette, t.pattern, t.scene, t.shape][k];
                onehot[i * total + o + v] = 1.0;
                o += n;
            }
        }
        let logits = probe.forward(to_tensor::<B>(&images, device));
        let target = Tensor::<B, 2>::from_data(TensorData::new(onehot, [batch, total]), device);
        let mut loss = Tensor::<B, 1>::zeros([1], device);
        let mut o = 0;
        for &n in &HEADS {
            let lp = log_softmax(logits.clone().slice([0..batch, o..o + n]), 1);
            let t = target.clone().slice([0..batch, o..o + n]);
            loss = loss - (lp * t).sum().reshape([1]) / batch as f64;
            o += n;
        }
        let lr = if step < cfg.probe_steps * 3 / 4 {
            3e-3
        } else {
            5e-4
        };
        let grads = GradientsParams::from_grads(loss.backward(), &probe);
        probe = optim.step(lr, probe, grads);
    }
    let probe = probe.valid();
    // Held-out renders: every held-out identity in 4 scenes and poses.
    let mut pairs = Vec::new();
    for (k, &id) in held_out_ids().iter().enumerate() {
        for j in 0..4 {
            let scene = (k + j) % SCENES.len();
            pairs.push(render_pair(
                Identity::from_id(id),
                scene,
                (k * 4 + j) as u64,
                0xACC,
                size,
            ));
        }
    }
    let images: Vec<RgbImage> = pairs.iter().map(|p| p.target.clone()).collect();
    let reads = probe.read(to_tensor::<B::InnerBackend>(&images, device));
    let n = pairs.len() as f64;
    let acc = |f: &dyn Fn(&Reading, &Reading) -> bool| {
        pairs
            .iter()
            .zip(&reads)
            .filter(|(p, r)| f(&truth(p), r))
            .count() as f64
            / n
    };
    let accuracy = ProbeAccuracy {
        palette: acc(&|t, r| t.palette == r.palette),
        pattern: acc(&|t, r| t.pattern == r.pattern),
        scene: acc(&|t, r| t.scene == r.scene),
        shape: acc(&|t, r| t.shape == r.shape),
        renders: pairs.len(),
    };
    (probe, accuracy)
}

/// A mean with its 95 % normal interval half-width (1.96 · sd / √n).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Estimate {
    pub mean: f64,
    pub ci95: f64,
}

fn estimate(v: &[f64]) -> Estimate {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Estimate {
        mean,
        ci95: 1.96 * (var / n).sqrt(),
    }
}

/// `<run>/eval/zero_shot.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ZeroShotReport {
    pub subject_fidelity_zero_shot: f64,
    pub subject_fidelity_text_only: f64,
    pub text_alignment_zero_shot: f64,
    pub text_alignment_text_only: f64,
    /// The same with 95 % intervals, and the palette and pattern agreements apart.
    pub zero_shot: Detail,
    pub text_only: Detail,
    /// The probe's own accuracy on ground-truth renders of the held-out identities.
    pub probe: ProbeAccuracy,
    /// Chance level of subject fidelity (a uniform guess of palette and pattern).
    pub chance_subject_fidelity: f64,
    pub images: usize,
    /// Subjects evaluated (held-out ones unless `config.split` says `train`).
    pub held_out_subjects: usize,
    pub config: MicroEvalConfig,
}

/// One condition's measurements.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Detail {
    pub subject_fidelity: Estimate,
    pub text_alignment: Estimate,
    pub palette: f64,
    pub pattern: f64,
    pub shape: f64,
}

/// One evaluated request.
struct Case {
    /// Index of the subject in the evaluated list.
    subject: usize,
    identity: Identity,
    scene: usize,
    reference: RgbImage,
}

fn cases(cfg: &MicroEvalConfig) -> Vec<Case> {
    let held = match cfg.split {
        Split::HeldOut => held_out_ids(),
        // As many training identities, spread over the list.
        Split::Train => {
            let train = blipd_data::synthetic::train_ids();
            let n = held_out_ids().len();
            (0..n).map(|i| train[i * train.len() / n]).collect()
        }
    };
    let mut out = Vec::new();
    for (k, &id) in held
        .iter()
        .take(cfg.subjects.unwrap_or(usize::MAX))
        .enumerate()
    {
        let identity = Identity::from_id(id);
        for j in 0..cfg.scenes_per_subject {
            let scene = (k * 3 + j * 2 + cfg.seed as usize) % SCENES.len();
            // The reference: the subject on an unrelated texture, another pose.
            let reference = render_pair(
                identity,
                (scene + 1) % SCENES.len(),
                (k * 16 + j) as u64,
                cfg.seed ^ 0xEF,
                cfg.size as u32,
            )
            .input;
            out.push(Case {
                subject: k,
                identity,
                scene,
                reference,
            });
        }
    }
    out
}

/// The generation settings of `[eval]`.
fn generate_options(cfg: &MicroEvalConfig) -> GenerateOptions {
    GenerateOptions {
        guidance_scale: cfg.guidance_scale,
        num_inference_steps: cfg.steps,
        height: cfg.size,
        width: cfg.size,
        seed: cfg.seed,
        ..GenerateOptions::default()
    }
}

/// The subject embeddings `[n, Q, D]` of the cases' reference images, as `blipd generate` makes them.
fn subject_embeddings<B: Backend>(
    pipe: &BlipDiffusionPipeline<B>,
    cases: &[&Case],
    subjects: &[&str],
    opts: &GenerateOptions,
) -> Result<Tensor<B, 3>, AppError> {
    let mut pixels = Vec::with_capacity(cases.len());
    for c in cases {
        let r = &c.reference;
        let img = crate::preprocess::RgbImage::new(
            r.width() as usize,
            r.height() as usize,
            r.as_raw().clone(),
        )?;
        pixels.push(pipe.preprocess(&img, opts.reference_resize)?);
    }
    pipe.subject_embeddings(Tensor::cat(pixels, 0), subjects, opts.normalization)
}

/// The measurements of `reads` (one per case).
fn detail(cases: &[Case], reads: &[Reading]) -> Detail {
    let n = cases.len().max(1) as f64;
    let fid: Vec<f64> = cases
        .iter()
        .zip(reads)
        .map(|(c, r)| fidelity(c, r))
        .collect();
    let align: Vec<f64> = cases
        .iter()
        .zip(reads)
        .map(|(c, r)| (c.scene == r.scene) as u8 as f64)
        .collect();
    let share = |f: &dyn Fn(&Case, &Reading) -> bool| {
        cases.iter().zip(reads).filter(|(c, r)| f(c, r)).count() as f64 / n
    };
    Detail {
        subject_fidelity: estimate(&fid),
        text_alignment: estimate(&align),
        palette: share(&|c, r| c.identity.palette == r.palette),
        pattern: share(&|c, r| c.identity.pattern == r.pattern),
        shape: share(&|c, r| c.identity.shape == r.shape),
    }
}

/// (palette agrees + pattern agrees) / 2.
fn fidelity(c: &Case, r: &Reading) -> f64 {
    ((c.identity.palette == r.palette) as u8 as f64
        + (c.identity.pattern == r.pattern) as u8 as f64)
        / 2.0
}

/// Generates every case zero-shot and text-only from the same initial latents and scores both with
/// `probe`. Returns the report and a sheet (rows: reference, zero-shot, text-only; one column per
/// case, at most 16).
pub fn evaluate<B: Backend>(
    pipe: &BlipDiffusionPipeline<B>,
    probe: &Probe<B>,
    accuracy: ProbeAccuracy,
    cfg: &MicroEvalConfig,
) -> Result<(ZeroShotReport, RgbImage), AppError> {
    cfg.validate()?;
    let cases = cases(cfg);
    let n = cases.len();
    let opts = generate_options(cfg);
    pipe.check_request(n, &opts)?;
    let subjects: Vec<&str> = cases.iter().map(|c| SHAPES[c.identity.shape]).collect();
    let prompts: Vec<String> = cases
        .iter()
        .map(|c| caption(c.identity.shape, c.scene))
        .collect();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let refs: Vec<&Case> = cases.iter().collect();
    let ctx = subject_embeddings(pipe, &refs, &subjects, &opts)?;
    let latents = pipe.initial_latents(n, &opts);
    let zero_text = pipe.text_embeddings(ctx, &prompts, &subjects, &opts)?;
    let text_text = pipe.text_only_embeddings(&prompts, &opts)?;
    let mut none = |_: crate::generate::StepInfo<'_, B>| {};
    let zero = pipe.decode(pipe.denoise(latents.clone(), zero_text, &opts, &mut none)?);
    let text = pipe.decode(pipe.denoise(latents, text_text, &opts, &mut none)?);
    let zero_reads = probe.read(zero.clone());
    let text_reads = probe.read(text.clone());
    let (zd, td) = (detail(&cases, &zero_reads), detail(&cases, &text_reads));
    let report = ZeroShotReport {
        subject_fidelity_zero_shot: zd.subject_fidelity.mean,
        subject_fidelity_text_only: td.subject_fidelity.mean,
        text_alignment_zero_shot: zd.text_alignment.mean,
        text_alignment_text_only: td.text_alignment.mean,
        zero_shot: zd,
        text_only: td,
        probe: accuracy,
        chance_subject_fidelity: (1.0 / NUM_PALETTES as f64 + 1.0 / PATTERNS.len() as f64) / 2.0,
        images: n,
        held_out_subjects: cases.len() / cfg.scenes_per_subject,
        config: cfg.clone(),
    };
    let cols = n.min(16);
    let zero_img = to_images(zero)?;
    let text_img = to_images(text)?;
    let s = cfg.size as u32;
    let mut sheet = RgbImage::new(s * cols as u32, s * 3);
    for (i, case) in cases.iter().take(cols).enumerate() {
        let x = (i as u32 * s) as i64;
        image::imageops::overlay(&mut sheet, &case.reference, x, 0);
        image::imageops::overlay(&mut sheet, &zero_img[i], x, s as i64);
        image::imageops::overlay(&mut sheet, &text_img[i], x, 2 * s as i64);
    }
    Ok((report, sheet))
}

/// The `j`-th fine-tuned subject: its index `k` in the evaluated held-out list (the
/// `[eval.finetune] subjects` are spread over that list), its identity, and its fine-tuning "photos":
/// `images` renders of it on unrelated textures, in poses none of the evaluation references uses.
pub fn finetune_subject(
    cfg: &MicroEvalConfig,
    j: usize,
) -> Result<(usize, Identity, Vec<RgbImage>), AppError> {
    let ft = cfg.finetune.clone().unwrap_or_default();
    let held = held_out_ids();
    let evaluated = held.len().min(cfg.subjects.unwrap_or(usize::MAX));
    if j >= ft.subjects || ft.subjects > evaluated {
        return Err(AppError::Request(format!(
            "fine-tuned subject {j}: [eval.finetune] subjects = {} of {evaluated} evaluated",
            ft.subjects
        )));
    }
    let k = j * evaluated / ft.subjects;
    let identity = Identity::from_id(held[k]);
    let images = (0..ft.images)
        .map(|i| {
            render_pair(
                identity,
                i % SCENES.len(),
                (5000 + k * 64 + i) as u64,
                cfg.seed ^ 0xF17E,
                cfg.size as u32,
            )
            .input
        })
        .collect();
    Ok((k, identity, images))
}

/// `<run>/eval/finetune.json`: fine-tuned against zero-shot on the same held-out subjects, scenes and
/// initial latents.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FinetuneReport {
    pub subject_fidelity_finetuned: f64,
    pub subject_fidelity_zero_shot: f64,
    pub text_alignment_finetuned: f64,
    pub text_alignment_zero_shot: f64,
    pub finetuned: Detail,
    pub zero_shot: Detail,
    pub subjects: Vec<SubjectResult>,
    pub images: usize,
    pub config: MicroEvalConfig,
}

/// One fine-tuned subject.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SubjectResult {
    pub id: usize,
    pub subject: String,
    pub subject_fidelity_zero_shot: f64,
    pub subject_fidelity_finetuned: f64,
}

/// Generates the evaluation cases of each fine-tuned subject `(k, pipeline)` (`k` indexes the
/// held-out list, the pipeline is its fine-tuned folder, with `ctx_embeddings_cache`) with the
/// fine-tuned pipeline and its cached subject embedding, and zero-shot with `base` from the same
/// initial latents; scores both with `probe`. The sheet has one column per subject (its first scene):
/// reference, zero-shot, fine-tuned.
pub fn compare_finetuned<B: Backend>(
    base: &BlipDiffusionPipeline<B>,
    tuned: &[(usize, &BlipDiffusionPipeline<B>)],
    probe: &Probe<B>,
    cfg: &MicroEvalConfig,
) -> Result<(FinetuneReport, RgbImage), AppError> {
    cfg.validate()?;
    if tuned.is_empty() {
        return Err(AppError::Request("no fine-tuned subject to compare".into()));
    }
    let all = cases(cfg);
    let opts = generate_options(cfg);
    let mut none = |_: crate::generate::StepInfo<'_, B>| {};
    let (mut done, mut zero_reads, mut ft_reads) = (Vec::new(), Vec::new(), Vec::new());
    let mut subjects = Vec::new();
    let s = cfg.size as u32;
    let mut sheet = RgbImage::new(s * tuned.len() as u32, s * 3);
    for (col, &(k, pipe)) in tuned.iter().enumerate() {
        let cs: Vec<&Case> = all.iter().filter(|c| c.subject == k).collect();
        let Some(first) = cs.first() else {
            return Err(AppError::Request(format!(
                "fine-tuned subject {k} is not among the {} evaluated",
                all.len() / cfg.scenes_per_subject
            )));
        };
        let m = cs.len();
        let ctx_cache = pipe.ctx_cache.clone().ok_or_else(|| {
            AppError::Request(format!(
                "the fine-tuned pipeline of subject {k} has no ctx_embeddings_cache"
            ))
        })?;
        let o = GenerateOptions {
            seed: cfg.seed.wrapping_add(1 + k as u64),
            ..opts.clone()
        };
        base.check_request(m, &o)?;
        pipe.check_request(m, &o)?;
        let names: Vec<&str> = cs.iter().map(|c| SHAPES[c.identity.shape]).collect();
        let prompts: Vec<String> = cs
            .iter()
            .map(|c| caption(c.identity.shape, c.scene))
            .collect();
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let latents = base.initial_latents(m, &o);
        let ctx = subject_embeddings(base, &cs, &names, &o)?;
        let text = base.text_embeddings(ctx, &prompts, &names, &o)?;
        let zero = base.decode(base.denoise(latents.clone(), text, &o, &mut none)?);
        let text = pipe.text_embeddings(ctx_cache.repeat_dim(0, m), &prompts, &names, &o)?;
        let ft = pipe.decode(pipe.denoise(latents, text, &o, &mut none)?);
        let (zr, fr) = (probe.read(zero.clone()), probe.read(ft.clone()));
        let mean = |reads: &[Reading]| {
            cs.iter()
                .zip(reads)
                .map(|(c, r)| fidelity(c, r))
                .sum::<f64>()
                / m as f64
        };
        subjects.push(SubjectResult {
            id: first.identity.id(),
            subject: first.identity.describe(),
            subject_fidelity_zero_shot: mean(&zr),
            subject_fidelity_finetuned: mean(&fr),
        });
        let x = (col as u32 * s) as i64;
        image::imageops::overlay(&mut sheet, &first.reference, x, 0);
        image::imageops::overlay(&mut sheet, &to_images(zero)?[0], x, s as i64);
        image::imageops::overlay(&mut sheet, &to_images(ft)?[0], x, 2 * s as i64);
        done.extend(cs.into_iter().map(|c| Case {
            subject: c.subject,
            identity: c.identity,
            scene: c.scene,
            reference: RgbImage::new(1, 1),
        }));
        zero_reads.extend(zr);
        ft_reads.extend(fr);
    }
    let (zd, fd) = (detail(&done, &zero_reads), detail(&done, &ft_reads));
    let report = FinetuneReport {
        subject_fidelity_finetuned: fd.subject_fidelity.mean,
        subject_fidelity_zero_shot: zd.subject_fidelity.mean,
        text_alignment_finetuned: fd.text_alignment.mean,
        text_alignment_zero_shot: zd.text_alignment.mean,
        finetuned: fd,
        zero_shot: zd,
        subjects,
        images: done.len(),
        config: cfg.clone(),
    };
    Ok((report, sheet))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finetune_subjects_are_spread_over_the_held_out_list_and_posed_apart() {
        let cfg = MicroEvalConfig {
            finetune: Some(MicroFinetuneConfig {
                subjects: 4,
                ..MicroFinetuneConfig::default()
            }),
            ..MicroEvalConfig::default()
        };
        cfg.validate().unwrap();
        let held = held_out_ids();
        let ks: Vec<usize> = (0..4)
            .map(|j| finetune_subject(&cfg, j).unwrap().0)
            .collect();
        assert_eq!(
            ks,
            vec![0, held.len() / 4, held.len() / 2, 3 * held.len() / 4]
        );
        let (k, identity, images) = finetune_subject(&cfg, 1).unwrap();
        assert_eq!(identity.id(), held[k]);
        assert_eq!(images.len(), 4);
        // The photos are not the evaluation references of that subject.
        for c in cases(&cfg).iter().filter(|c| c.subject == k) {
            assert!(images.iter().all(|i| i.as_raw() != c.reference.as_raw()));
        }
        assert!(finetune_subject(&cfg, 4).is_err());
        let bad = MicroEvalConfig {
            subjects: Some(3),
            ..cfg.clone()
        };
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("only 3 held-out"), "{e}");
    }

    #[test]
    fn zero_finetune_subjects_turn_the_comparison_off() {
        let with = |subjects, steps| MicroEvalConfig {
            finetune: Some(MicroFinetuneConfig {
                subjects,
                steps,
                ..MicroFinetuneConfig::default()
            }),
            ..MicroEvalConfig::default()
        };
        // Off: the other values are not used, so not checked.
        with(0, 0).validate().unwrap();
        let e = with(1, 0).validate().unwrap_err().to_string();
        assert!(e.contains("steps"), "{e}");
    }
}
