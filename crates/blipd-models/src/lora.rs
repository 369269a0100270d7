//! LoRA (Hu et al. 2021) on the U-Net's attention projections: what PEFT's `LoraConfig(target_modules=
//! ["to_q", "to_k", "to_v", "to_out.0"])` adds to a diffusers `UNet2DConditionModel`, the layers
//! diffusers' `train_dreambooth_lora.py` trains.
//!
//! A projection `y = W x + b` becomes `y = W x + b + s · B(A x)` with `A: in → r` (PEFT `lora_A`), `B:
//! r → out` (`lora_B`, zero at initialisation so training starts from the base model) and `s =
//! lora_alpha / r` times the adapter weight ([`LoraLinear`], carried by
//! [`crate::unet::attention::Attention::lora`]).
//!
//! # Files
//! - **Written** ([`save_adapters`]): the diffusers layout `StableDiffusionPipeline.load_lora_weights`
//!   reads (`pytorch_lora_weights.safetensors`): `unet.<module>.lora_A.weight` `(r, in)` and
//!   `unet.<module>.lora_B.weight` `(out, r)`, PyTorch orientation, with `s` **folded into `lora_B`**:
//!   diffusers 0.33 stores no alpha and loads every adapter at scale 1, so an adapter trained with
//!   `alpha ≠ r` would otherwise load at the wrong strength (checked against diffusers by
//!   `scripts/reference/gen_lora.py`).
//! - **Read** ([`LoraWeights::read`]): that layout, or a PEFT folder (`adapter_model.safetensors`
//!   without the `unet.` prefix, plus `adapter_config.json` whose `lora_alpha / r` — or `/ √r` with
//!   `use_rslora` — is the scale), or keys with per-module `.alpha` entries. Text-encoder adapters,
//!   Kohya's `lora_unet_*` names, DoRA and per-module rank/alpha patterns are refused by name.
//!
//! # Applying
//! [`apply`] checks every adapted module against the U-Net (it must be one of its attention
//! projections, with matching input and output sizes: a LoRA for another network is an error naming the
//! first mismatches) and either **fuses** `s · AᵀBᵀ` into the base weights (generation: no cost per
//! step, as diffusers' `fuse_lora`) or attaches the adapters as modules (evaluation of the unmerged
//! form, further training). [`attach`] adds fresh, trainable adapters for fine-tuning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::unet::attention::{Attention, Transformer2DModel};
use crate::unet::UNet2DConditionModel;
use crate::weights::{write_safetensors, StateDict};

/// diffusers' LoRA weight file name (`save_lora_weights` / `load_lora_weights`).
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
/// PEFT's adapter weight file name (`save_pretrained`).
pub const PEFT_FILE: &str = "adapter_model.safetensors";
/// PEFT's adapter config file name.
pub const PEFT_CONFIG: &str = "adapter_config.json";

/// One attention projection an adapter can sit on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LoraTarget {
    #[serde(rename = "to_q")]
    ToQ,
    #[serde(rename = "to_k")]
    ToK,
    #[serde(rename = "to_v")]
    ToV,
    #[serde(rename = "to_out.0", alias = "to_out")]
    ToOut,
}

impl LoraTarget {
    /// The four projections, diffusers' LoRA training default.
    pub const ALL: [LoraTarget; 4] = [
        LoraTarget::ToQ,
        LoraTarget::ToK,
        LoraTarget::ToV,
        LoraTarget::ToOut,
    ];

    /// The diffusers module name (`to_q`, …, `to_out.0`).
    pub fn key(self) -> &'static str {
        match self {
            LoraTarget::ToQ => "to_q",
            LoraTarget::ToK => "to_k",
            LoraTarget::ToV => "to_v",
            LoraTarget::ToOut => "to_out.0",
        }
    }
}

/// The adapters a fine-tuning run trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// `r`.
    pub rank: usize,
    /// `lora_alpha` (default `r`: scale 1, as diffusers' training scripts).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Which projections (default all four).
    #[serde(default = "all_targets")]
    pub targets: Vec<LoraTarget>,
}

fn all_targets() -> Vec<LoraTarget> {
    LoraTarget::ALL.to_vec()
}

impl LoraSpec {
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: None,
            targets: all_targets(),
        }
    }

    /// `lora_alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64) / self.rank as f64
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if self.rank == 0 {
            return Err(ModelError::Invalid("LoRA rank must be at least 1".into()));
        }
        if let Some(a) = self.alpha {
            if !(a.is_finite() && a > 0.0) {
                return Err(ModelError::Invalid(format!(
                    "LoRA alpha must be a positive number, got {a}"
                )));
            }
        }
        if self.targets.is_empty() {
            return Err(ModelError::Invalid("LoRA targets is empty".into()));
        }
        Ok(())
    }
}

/// `y = s · B(A x)`, the low-rank update of one projection.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// PEFT `lora_A`: `in → r`, no bias (Burn layout `[in, r]`).
    pub down: Linear<B>,
    /// PEFT `lora_B`: `r → out`, no bias (Burn layout `[r, out]`).
    pub up: Linear<B>,
    /// `lora_alpha / r` × the adapter weight.
    pub scale: f64,
}

impl<B: Backend> LoraLinear<B> {
    /// A fresh adapter as PEFT initialises one (`init_lora_weights=True`): `A` as `nn.Linear`'s default
    /// (Kaiming-uniform, a = √5), `B` zero.
    pub fn new(d_in: usize, d_out: usize, rank: usize, scale: f64, device: &B::Device) -> Self {
        Self {
            down: crate::nn::linear(d_in, rank, false, device),
            up: LinearConfig::new(rank, d_out)
                .with_bias(false)
                .with_initializer(Initializer::Zeros)
                .init(device),
            scale,
        }
    }

    /// From PyTorch-oriented `a` `(r, in)` and `b` `(out, r)`.
    pub fn from_weights(a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64) -> Self {
        Self {
            down: Linear {
                weight: Param::from_tensor(a.transpose()),
                bias: None,
            },
            up: Linear {
                weight: Param::from_tensor(b.transpose()),
                bias: None,
            },
            scale,
        }
    }

    pub fn rank(&self) -> usize {
        self.down.weight.dims()[1]
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = crate::amp::linear(&self.up, crate::amp::linear(&self.down, x));
        if self.scale == 1.0 {
            y
        } else {
            y * self.scale
        }
    }

    /// `s · Aᵀ Bᵀ` in Burn's `[in, out]` weight layout: what fusing adds to the base weight.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.down.weight.val().matmul(self.up.weight.val()) * self.scale
    }
}

/// `base(x)`, plus the adapter's update when there is one: every U-Net attention projection goes
/// through here.
pub fn project<B: Backend, const D: usize>(
    base: &Linear<B>,
    lora: Option<&LoraLinear<B>>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    match lora {
        None => crate::amp::linear(base, x),
        Some(l) => crate::amp::linear(base, x.clone()) + l.forward(x),
    }
}

/// The adapters of one attention layer.
#[derive(Module, Debug)]
pub struct AttentionLora<B: Backend> {
    pub to_q: Option<LoraLinear<B>>,
    pub to_k: Option<LoraLinear<B>>,
    pub to_v: Option<LoraLinear<B>>,
    pub to_out: Option<LoraLinear<B>>,
}

impl<B: Backend> AttentionLora<B> {
    fn empty() -> Self {
        Self {
            to_q: None,
            to_k: None,
            to_v: None,
            to_out: None,
        }
    }

    pub fn get(&self, t: LoraTarget) -> Option<&LoraLinear<B>> {
        match t {
            LoraTarget::ToQ => self.to_q.as_ref(),
            LoraTarget::ToK => self.to_k.as_ref(),
            LoraTarget::ToV => self.to_v.as_ref(),
            LoraTarget::ToOut => self.to_out.as_ref(),
        }
    }

    fn slot(&mut self, t: LoraTarget) -> &mut Option<LoraLinear<B>> {
        match t {
            LoraTarget::ToQ => &mut self.to_q,
            LoraTarget::ToK => &mut self.to_k,
            LoraTarget::ToV => &mut self.to_v,
            LoraTarget::ToOut => &mut self.to_out,
        }
    }
}

/// `[in, out]` of a projection, without initialising a lazy parameter.
fn dims<B: Backend>(l: &Linear<B>) -> [usize; 2] {
    let s = l.weight.lazy_shape();
    [s[0], s[1]]
}

fn base<B: Backend>(attn: &Attention<B>, t: LoraTarget) -> &Linear<B> {
    match t {
        LoraTarget::ToQ => &attn.to_q,
        LoraTarget::ToK => &attn.to_k,
        LoraTarget::ToV => &attn.to_v,
        LoraTarget::ToOut => &attn.to_out,
    }
}

fn base_mut<B: Backend>(attn: &mut Attention<B>, t: LoraTarget) -> &mut Linear<B> {
    match t {
        LoraTarget::ToQ => &mut attn.to_q,
        LoraTarget::ToK => &mut attn.to_k,
        LoraTarget::ToV => &mut attn.to_v,
        LoraTarget::ToOut => &mut attn.to_out,
    }
}

fn transformers<B: Backend>(
    unet: &UNet2DConditionModel<B>,
) -> Vec<(String, &Transformer2DModel<B>)> {
    let mut v = Vec::new();
    for (i, b) in unet.down_blocks.iter().enumerate() {
        for (j, t) in b.attentions.iter().enumerate() {
            v.push((format!("down_blocks.{i}.attentions.{j}"), t));
        }
    }
    if let Some(m) = &unet.mid_block {
        for (j, t) in m.attentions.iter().enumerate() {
            v.push((format!("mid_block.attentions.{j}"), t));
        }
    }
    for (i, b) in unet.up_blocks.iter().enumerate() {
        for (j, t) in b.attentions.iter().enumerate() {
            v.push((format!("up_blocks.{i}.attentions.{j}"), t));
        }
    }
    v
}

fn transformers_mut<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
) -> Vec<(String, &mut Transformer2DModel<B>)> {
    let mut v = Vec::new();
    for (i, b) in unet.down_blocks.iter_mut().enumerate() {
        for (j, t) in b.attentions.iter_mut().enumerate() {
            v.push((format!("down_blocks.{i}.attentions.{j}"), t));
        }
    }
    if let Some(m) = &mut unet.mid_block {
        for (j, t) in m.attentions.iter_mut().enumerate() {
            v.push((format!("mid_block.attentions.{j}"), t));
        }
    }
    for (i, b) in unet.up_blocks.iter_mut().enumerate() {
        for (j, t) in b.attentions.iter_mut().enumerate() {
            v.push((format!("up_blocks.{i}.attentions.{j}"), t));
        }
    }
    v
}

/// Every attention layer of the U-Net with its diffusers path (e.g.
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn1`), in forward order.
pub fn attentions<B: Backend>(unet: &UNet2DConditionModel<B>) -> Vec<(String, &Attention<B>)> {
    let mut v = Vec::new();
    for (p, t) in transformers(unet) {
        for (k, tb) in t.transformer_blocks.iter().enumerate() {
            v.push((format!("{p}.transformer_blocks.{k}.attn1"), &tb.attn1));
            v.push((format!("{p}.transformer_blocks.{k}.attn2"), &tb.attn2));
        }
    }
    v
}

/// [`attentions`], mutably.
pub fn attentions_mut<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
) -> Vec<(String, &mut Attention<B>)> {
    let mut v = Vec::new();
    for (p, t) in transformers_mut(unet) {
        for (k, tb) in t.transformer_blocks.iter_mut().enumerate() {
            v.push((format!("{p}.transformer_blocks.{k}.attn1"), &mut tb.attn1));
            v.push((format!("{p}.transformer_blocks.{k}.attn2"), &mut tb.attn2));
        }
    }
    v
}

/// Adds fresh trainable adapters ([`LoraLinear::new`]) to `spec.targets` of every attention layer.
/// Freeze the base first (`unet.no_grad()`) to train the adapters alone.
pub fn attach<B: Backend>(
    mut unet: UNet2DConditionModel<B>,
    spec: &LoraSpec,
    device: &B::Device,
) -> Result<UNet2DConditionModel<B>, ModelError> {
    spec.validate()?;
    let scale = spec.scale();
    for (_, attn) in attentions_mut(&mut unet) {
        let mut lora = attn.lora.take().unwrap_or_else(AttentionLora::empty);
        for &t in &spec.targets {
            let [d_in, d_out] = dims(base(attn, t));
            *lora.slot(t) = Some(LoraLinear::new(d_in, d_out, spec.rank, scale, device));
        }
        attn.lora = Some(lora);
    }
    Ok(unet)
}

/// Whether any attention layer carries an adapter.
pub fn has_adapters<B: Backend>(unet: &UNet2DConditionModel<B>) -> bool {
    num_adapter_params(unet) > 0
}

/// Number of adapter parameters the U-Net carries (from the shapes: nothing is read back).
pub fn num_adapter_params<B: Backend>(unet: &UNet2DConditionModel<B>) -> usize {
    attentions(unet)
        .iter()
        .filter_map(|(_, a)| a.lora.as_ref())
        .flat_map(|l| LoraTarget::ALL.into_iter().filter_map(|t| l.get(t)))
        .map(|l| {
            let ([i, r], [_, o]) = (dims(&l.down), dims(&l.up));
            i * r + r * o
        })
        .sum()
}

/// The adapters in the diffusers layout (`unet.<module>.lora_A.weight` `(r, in)`,
/// `unet.<module>.lora_B.weight` `(out, r)` with the scale folded in), sorted by key.
pub fn adapter_tensors<B: Backend>(unet: &UNet2DConditionModel<B>) -> Vec<(String, TensorData)> {
    let mut out = Vec::new();
    for (path, attn) in attentions(unet) {
        let Some(lora) = &attn.lora else { continue };
        for t in LoraTarget::ALL {
            let Some(l) = lora.get(t) else { continue };
            let a = l.down.weight.val().transpose().into_data().convert::<f32>();
            let b = (l.up.weight.val().transpose() * l.scale)
                .into_data()
                .convert::<f32>();
            out.push((format!("unet.{path}.{}.lora_A.weight", t.key()), a));
            out.push((format!("unet.{path}.{}.lora_B.weight", t.key()), b));
        }
    }
    out.sort_by(|x, y| x.0.cmp(&y.0));
    out
}

/// Writes [`adapter_tensors`] to `path` (safetensors, `format: pt` plus `metadata`).
pub fn save_adapters<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    path: &Path,
    metadata: &[(&str, String)],
) -> Result<(), ModelError> {
    let tensors = adapter_tensors(unet);
    if tensors.is_empty() {
        return Err(ModelError::Invalid(
            "the U-Net carries no LoRA adapter to save".into(),
        ));
    }
    let mut meta: std::collections::HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    meta.insert("format".into(), "pt".into());
    Ok(write_safetensors(path, &tensors, Some(meta))?)
}

/// `W ← W + s·AᵀBᵀ`: `l` folded into the projection it adapts.
fn fold<B: Backend>(base: &mut Linear<B>, l: &LoraLinear<B>) {
    let delta = l.delta();
    base.weight = base.weight.clone().map(|w| w + delta);
}

/// Folds every adapter into its base weight (`W ← W + s·AᵀBᵀ`) and removes the adapters.
pub fn merge<B: Backend>(mut unet: UNet2DConditionModel<B>) -> UNet2DConditionModel<B> {
    for (_, attn) in attentions_mut(&mut unet) {
        let Some(lora) = attn.lora.take() else {
            continue;
        };
        for t in LoraTarget::ALL {
            if let Some(l) = lora.get(t) {
                fold(base_mut(attn, t), l);
            }
        }
    }
    unet
}

/// One adapted projection read from a file: PyTorch-oriented `a` `(r, in)`, `b` `(out, r)`, and its
/// scale (`lora_alpha / r`, 1 where the file says nothing).
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub a: TensorData,
    pub b: TensorData,
    pub scale: f64,
}

/// A LoRA file (or PEFT folder) for a U-Net, keyed by diffusers module path (e.g.
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
#[derive(Clone, Debug)]
pub struct LoraWeights {
    pub source: PathBuf,
    pub modules: BTreeMap<String, LoraModule>,
}

/// The parts of PEFT's `adapter_config.json` that change the maths.
#[derive(Debug, Deserialize)]
struct PeftConfig {
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    peft_type: Option<String>,
}

fn invalid(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Lora(format!("LoRA {}: {msg}", path.display()))
}

impl LoraWeights {
    /// Reads a LoRA safetensors file, or a folder holding `pytorch_lora_weights.safetensors` (diffusers)
    /// or `adapter_model.safetensors` (PEFT). An `adapter_config.json` in the same folder sets the
    /// scale; see the [module docs](self).
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let file = if path.is_dir() {
            [LORA_FILE, PEFT_FILE]
                .iter()
                .map(|f| path.join(f))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    invalid(path, format!("no {LORA_FILE} or {PEFT_FILE} in the folder"))
                })?
        } else {
            path.to_path_buf()
        };
        if file.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(invalid(&file, "expected a .safetensors file"));
        }
        let config_scale = match file.parent().map(|d| d.join(PEFT_CONFIG)) {
            Some(c) if c.is_file() => Some(Self::config_scale(&c)?),
            _ => None,
        };
        let sd = StateDict::read(&file)?;
        let mut a = BTreeMap::new();
        let mut b = BTreeMap::new();
        let mut alpha = BTreeMap::new();
        for key in sd.keys() {
            if key.starts_with("text_encoder") || key.starts_with("lora_te") {
                return Err(invalid(
                    &file,
                    format!(
                        "`{key}` adapts the text encoder; blipd applies LoRA to the U-Net only"
                    ),
                ));
            }
            if key.starts_with("lora_unet_") {
                return Err(invalid(
                    &file,
                    format!(
                        "`{key}` is a Kohya-style name; convert the file to the diffusers/PEFT layout \
                         (diffusers' `load_lora_weights` then `save_lora_weights`)"
                    ),
                ));
            }
            let k = key
                .strip_prefix("unet.")
                .or_else(|| key.strip_prefix("base_model.model."))
                .unwrap_or(key);
            if let Some(m) = k.strip_suffix(".lora_A.weight") {
                a.insert(m.to_string(), sd.data(key)?.convert::<f32>());
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                b.insert(m.to_string(), sd.data(key)?.convert::<f32>());
            } else if let Some(m) = k.strip_suffix(".alpha") {
                let v = sd.data(key)?.convert::<f32>();
                let v = v.as_slice::<f32>().ok().and_then(|s| s.first().copied());
                let v = v.ok_or_else(|| invalid(&file, format!("`{key}` holds no number")))?;
                alpha.insert(m.to_string(), v as f64);
            } else if k.contains("lora_magnitude_vector") {
                return Err(invalid(
                    &file,
                    format!("`{key}`: DoRA adapters are not supported"),
                ));
            } else {
                return Err(invalid(
                    &file,
                    format!("`{key}` is not a LoRA key (expected `<module>.lora_A.weight` / `.lora_B.weight`)"),
                ));
            }
        }
        if a.is_empty() {
            return Err(invalid(&file, "holds no LoRA weights"));
        }
        let mut modules = BTreeMap::new();
        for (m, a) in a {
            let b = b
                .remove(&m)
                .ok_or_else(|| invalid(&file, format!("`{m}` has lora_A but no lora_B")))?;
            let (sa, sb) = (a.shape.to_vec(), b.shape.to_vec());
            if sa.len() != 2 || sb.len() != 2 || sa[0] != sb[1] {
                return Err(invalid(
                    &file,
                    format!("`{m}`: lora_A {sa:?} and lora_B {sb:?} are not (r, in) and (out, r)"),
                ));
            }
            let r = sa[0] as f64;
            let scale = match alpha.get(&m) {
                Some(al) => al / r,
                None => match config_scale {
                    Some((al, true)) => al / r.sqrt(),
                    Some((al, false)) => al / r,
                    None => 1.0,
                },
            };
            modules.insert(m, LoraModule { a, b, scale });
        }
        if let Some(m) = b.keys().next() {
            return Err(invalid(&file, format!("`{m}` has lora_B but no lora_A")));
        }
        Ok(Self {
            source: file,
            modules,
        })
    }

    /// `(lora_alpha, use_rslora)` from PEFT's config.
    fn config_scale(path: &Path) -> Result<(f64, bool), ModelError> {
        let c: PeftConfig = crate::read_json(path)?;
        if c.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return Err(invalid(
                path,
                format!("peft_type {:?} is not LORA", c.peft_type),
            ));
        }
        if c.use_dora {
            return Err(invalid(path, "DoRA adapters (use_dora) are not supported"));
        }
        if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
            return Err(invalid(
                path,
                "per-module rank_pattern/alpha_pattern are not supported",
            ));
        }
        if c.r == 0 || !(c.lora_alpha.is_finite() && c.lora_alpha > 0.0) {
            return Err(invalid(
                path,
                format!("r = {}, lora_alpha = {}", c.r, c.lora_alpha),
            ));
        }
        Ok((c.lora_alpha, c.use_rslora))
    }

    /// The largest rank in the file.
    pub fn rank(&self) -> usize {
        self.modules
            .values()
            .map(|m| m.a.shape[0])
            .max()
            .unwrap_or(0)
    }

    /// Number of adapter parameters.
    pub fn num_params(&self) -> usize {
        self.modules
            .values()
            .map(|m| m.a.num_elements() + m.b.num_elements())
            .sum()
    }
}

/// How [`apply`] puts a LoRA into the U-Net.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyMode {
    /// Add `weight · s · AᵀBᵀ` to the base weights (diffusers' `fuse_lora`): no extra work per step.
    Fuse,
    /// Attach the adapters as modules at scale `weight · s` (PEFT's unmerged form).
    Adapters,
}

/// Applies `lora` at `weight` (diffusers' `lora_scale`/adapter weight, 1 = as trained). Every adapted
/// module must be an attention projection of `unet` with matching sizes, or nothing is applied and
/// the error names the mismatches.
pub fn apply<B: Backend>(
    mut unet: UNet2DConditionModel<B>,
    lora: &LoraWeights,
    weight: f64,
    mode: ApplyMode,
    device: &B::Device,
) -> Result<UNet2DConditionModel<B>, ModelError> {
    if !weight.is_finite() {
        return Err(ModelError::Invalid(format!("LoRA weight {weight}")));
    }
    // Check everything before changing anything.
    let mut shapes = BTreeMap::new();
    for (path, attn) in attentions(&unet) {
        for t in LoraTarget::ALL {
            let [d_in, d_out] = dims(base(attn, t));
            shapes.insert(format!("{path}.{}", t.key()), (d_in, d_out));
        }
    }
    let mut problems = Vec::new();
    for (m, w) in &lora.modules {
        match shapes.get(m) {
            None => problems.push(format!(
                "`{m}` is not an attention projection of this U-Net"
            )),
            Some(&(d_in, d_out)) => {
                let (r, a_in, b_out) = (w.a.shape[0], w.a.shape[1], w.b.shape[0]);
                if a_in != d_in || b_out != d_out {
                    problems.push(format!(
                        "`{m}`: the adapter maps {a_in} → {b_out} (rank {r}), the U-Net's projection {d_in} → {d_out}"
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(5);
        return Err(ModelError::Lora(format!(
            "LoRA {} does not fit this U-Net (a LoRA for another network?): {n} problem(s): {}{}",
            lora.source.display(),
            problems.join("; "),
            if n > 5 { "; …" } else { "" }
        )));
    }
    for (path, attn) in attentions_mut(&mut unet) {
        for t in LoraTarget::ALL {
            let Some(w) = lora.modules.get(&format!("{path}.{}", t.key())) else {
                continue;
            };
            let a = Tensor::<B, 2>::from_data(w.a.clone(), device);
            let b = Tensor::<B, 2>::from_data(w.b.clone(), device);
            let adapter = LoraLinear::from_weights(a, b, w.scale * weight);
            match mode {
                ApplyMode::Fuse => fold(base_mut(attn, t), &adapter),
                ApplyMode::Adapters => {
                    let mut l = attn.lora.take().unwrap_or_else(AttentionLora::empty);
                    *l.slot(t) = Some(adapter);
                    attn.lora = Some(l);
                }
            }
        }
    }
    Ok(unet)
}

#[cfg(test)]
mod tests {
    use super::*;
    type TB = burn::backend::NdArray<f32>;

    /// SD-1.5 at rank 4 on the four projections: 16 transformer blocks, each `56·d + 8·r·768`
    /// parameters (d = 320…1280) = 797,184 parameters, 3.2 MB in f32 — against 859.5 M for the U-Net.
    #[test]
    fn sd15_rank4_adapter_size() {
        let dev = Default::default();
        let unet = crate::unet::UNet2DConditionConfig::sd15()
            .init::<TB>(&dev)
            .unwrap();
        let unet = attach(unet, &LoraSpec::new(4), &dev).unwrap();
        assert_eq!(attentions(&unet).len(), 32);
        let n: usize = adapter_tensors(&unet)
            .iter()
            .map(|(_, d)| d.num_elements())
            .sum();
        assert_eq!(n, 797_184);
        assert_eq!(num_adapter_params(&unet), n);
        let paths: Vec<String> = attentions(&unet).into_iter().map(|(p, _)| p).collect();
        assert_eq!(
            paths[0],
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
        );
        assert_eq!(
            paths[13],
            "mid_block.attentions.0.transformer_blocks.0.attn2"
        );
        assert_eq!(
            paths[31],
            "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
        );
    }

    #[test]
    fn spec_validation() {
        assert!(LoraSpec::new(0).validate().is_err());
        let mut s = LoraSpec::new(8);
        assert_eq!(s.scale(), 1.0);
        s.alpha = Some(16.0);
        assert_eq!(s.scale(), 2.0);
        s.alpha = Some(f64::NAN);
        assert!(s.validate().is_err());
        s.alpha = None;
        s.targets.clear();
        assert!(s.validate().is_err());
    }
}
