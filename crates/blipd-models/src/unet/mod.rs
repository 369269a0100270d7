//! Stable Diffusion's conditional U-Net: diffusers `UNet2DConditionModel`, the SD-1.5 variant
//! (`CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D` /
//! `CrossAttnUpBlock2D`, spatial transformers with 1×1-conv projections and GEGLU feed-forward,
//! GroupNorm + SiLU resnets, sinusoidal timestep embedding with `flip_sin_to_cos`).
//!
//! Widths, depths, heads, cross-attention width, group count and which blocks carry cross-attention
//! come from the diffusers `unet/config.json` ([`UNet2DConditionConfig`], serde names as diffusers);
//! options that change the architecture beyond the SD-1.5 family are rejected by
//! [`UNet2DConditionConfig::validate`] rather than silently ignored.
//!
//! [`UNet2DConditionModel::forward`] takes optional [`UNetExtras`]: ControlNet residuals (added as
//! diffusers does: one per skip tensor, and one after the mid block) and an [`AttentionHook`] for
//! prompt-to-prompt (see [`attention`] for its contract). Latent sizes that are not a multiple of
//! `2^(blocks−1)` work as in diffusers: each upsampler resizes to its skip tensor's size.
//!
//! Module fields mirror the diffusers keys, so the [`key_map`] only rewrites `to_out.0` → `to_out`,
//! `ff.net.0.proj` → `ff.net_0.proj` and `ff.net.2` → `ff.net_2` (norm `weight`/`bias` ↔
//! `gamma`/`beta` and Linear transposition are done by the loader's adapter).

pub mod attention;
pub mod blocks;

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, GroupNormConfig};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

pub use attention::{
    AttentionContext, AttentionHook, AttentionKernel, AttentionSite, Transformer2DModel, UNetPlace,
};
pub use blocks::{
    timestep_embedding, BlockSpec, DownBlock2D, ResnetBlock2D, TimestepEmbedding,
    UNetMidBlock2DCrossAttn, UpBlock2D,
};

use crate::weights::{load_strict, save_safetensors, ComponentDir, KeyMap, StateDict};
use crate::ModelError;

/// A config value that diffusers accepts either as one value or as one value per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// One value per block (`n` blocks); a list must have exactly `n` entries.
    pub fn per_block(&self, n: usize, field: &str) -> Result<Vec<T>, ModelError> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => Err(ModelError::Invalid(format!(
                "`{field}` has {} entries, expected one per block ({n})",
                v.len()
            ))),
        }
    }
}

pub(crate) const CROSS_DOWN: &str = "CrossAttnDownBlock2D";
pub(crate) const PLAIN_DOWN: &str = "DownBlock2D";
pub(crate) const CROSS_UP: &str = "CrossAttnUpBlock2D";
pub(crate) const PLAIN_UP: &str = "UpBlock2D";
pub(crate) const CROSS_MID: &str = "UNetMidBlock2DCrossAttn";

fn d_down_types() -> Vec<String> {
    vec![
        CROSS_DOWN.into(),
        CROSS_DOWN.into(),
        CROSS_DOWN.into(),
        PLAIN_DOWN.into(),
    ]
}
fn d_up_types() -> Vec<String> {
    vec![
        PLAIN_UP.into(),
        CROSS_UP.into(),
        CROSS_UP.into(),
        CROSS_UP.into(),
    ]
}
fn d_mid_type() -> Option<String> {
    Some(CROSS_MID.into())
}
fn d_4() -> usize {
    4
}
fn d_3() -> usize {
    3
}
fn d_1() -> usize {
    1
}
fn d_true() -> bool {
    true
}
fn d_one_f() -> f64 {
    1.0
}
fn d_eps() -> f64 {
    1e-5
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn d_one_many() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn d_cross_dim() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn d_heads() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn d_false_many() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn d_silu() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}

/// diffusers `UNet2DConditionModel` config (`unet/config.json`), defaults as diffusers 0.33.1.
///
/// `attention_head_dim` is, as in diffusers, the **number of heads** (see diffusers issue #2011);
/// `num_attention_heads` overrides it when set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default)]
    pub sample_size: Option<OneOrMany<usize>>,
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_many")]
    pub only_cross_attention: OneOrMany<bool>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: OneOrMany<usize>,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross_dim")]
    pub cross_attention_dim: OneOrMany<usize>,
    #[serde(default = "d_one_many")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    #[serde(default = "d_heads")]
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Only changes fp16 numerics in diffusers; attention here runs in the model dtype.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default = "d_3")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_3")]
    pub conv_out_kernel: usize,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    // Options of other U-Net families; accepted only when absent / null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_embed_type: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_class_embeds: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addition_embed_type: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addition_time_embed_dim: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hid_dim: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hid_dim_type: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_embedding_act_fn: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_post_act: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_cond_proj_dim: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_class_embeddings_input_dim: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_attention_norm: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid_block_only_cross_attention: Option<serde_json::Value>,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// Everything the constructor needs, derived from a validated config.
#[derive(Debug, Clone)]
pub(crate) struct UNetPlan {
    pub time_proj_dim: usize,
    pub time_embed_dim: usize,
    pub down: Vec<BlockSpec>,
    pub mid: Option<BlockSpec>,
    pub up: Vec<BlockSpec>,
    pub groups: usize,
}

/// Reject a non-null value of an option this port does not implement.
pub(crate) fn must_be_unset(name: &str, v: &Option<serde_json::Value>) -> Result<(), ModelError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(v) => Err(ModelError::Invalid(format!(
            "`{name}` = {v} is not supported (SD-1.5-family U-Nets only)"
        ))),
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> ModelError {
    ModelError::Invalid(msg.into())
}

impl UNet2DConditionConfig {
    /// SD-1.5's U-Net: `runwayml/stable-diffusion-v1-5`, `unet/config.json` (diffusers 0.6.0 export):
    /// in/out 4, sample 64, blocks (320, 640, 1280, 1280), 2 layers per block, 3 × CrossAttnDown +
    /// Down, Up + 3 × CrossAttnUp, cross_attention_dim 768, attention_head_dim 8 (8 heads), GroupNorm
    /// 32 / eps 1e-5, SiLU, flip_sin_to_cos, freq_shift 0, downsample_padding 1. 859,520,964 params.
    pub fn sd15() -> Self {
        Self {
            sample_size: Some(OneOrMany::One(64)),
            cross_attention_dim: OneOrMany::One(768),
            ..Self::default()
        }
    }

    /// A tiny U-Net with the SD-1.5 block types, for tests: blocks (16, 32), 1 layer per block,
    /// CrossAttnDown + Down, Up + CrossAttnUp, 2 then 4 heads, 8 groups, cross_attention_dim 24
    /// (the layout of the parity fixture, `scripts/reference/gen_unet.py`).
    pub fn tiny() -> Self {
        Self {
            sample_size: Some(OneOrMany::One(16)),
            down_block_types: vec![CROSS_DOWN.into(), PLAIN_DOWN.into()],
            up_block_types: vec![PLAIN_UP.into(), CROSS_UP.into()],
            block_out_channels: vec![16, 32],
            layers_per_block: OneOrMany::One(1),
            norm_num_groups: Some(8),
            cross_attention_dim: OneOrMany::One(24),
            attention_head_dim: OneOrMany::Many(vec![2, 4]),
            ..Self::default()
        }
    }

    /// The micro preset (the procedural world at 32 px, 16×16 latents): blocks (32, 64), 1 layer per
    /// block, cross-attention at both levels (2 then 4 heads) and in the middle, 8 groups;
    /// `cross_attention_dim` is set to the text encoder's width by the caller.
    pub fn micro() -> Self {
        Self {
            sample_size: Some(OneOrMany::One(16)),
            down_block_types: vec![CROSS_DOWN.into(), CROSS_DOWN.into()],
            up_block_types: vec![CROSS_UP.into(), CROSS_UP.into()],
            block_out_channels: vec![32, 64],
            layers_per_block: OneOrMany::One(1),
            norm_num_groups: Some(8),
            cross_attention_dim: OneOrMany::One(32),
            attention_head_dim: OneOrMany::Many(vec![2, 4]),
            ..Self::default()
        }
    }

    /// Check that the config describes a U-Net this port implements; derive the block shapes.
    pub(crate) fn plan(&self) -> Result<UNetPlan, ModelError> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(invalid("`block_out_channels` is empty"));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(invalid(format!(
                "{} down_block_types and {} up_block_types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return Err(invalid(format!("act_fn `{}` (only silu)", self.act_fn)));
        }
        if self.dropout != 0.0 {
            return Err(invalid(format!("dropout {} (only 0)", self.dropout)));
        }
        if self.use_linear_projection {
            return Err(invalid(
                "use_linear_projection=true (SD-2 style) is not implemented; SD-1.5 uses 1×1 convs",
            ));
        }
        if self.dual_cross_attention {
            return Err(invalid("dual_cross_attention is not supported"));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(invalid(format!(
                "resnet_time_scale_shift `{}` (only default)",
                self.resnet_time_scale_shift
            )));
        }
        if self.resnet_skip_time_act || self.resnet_out_scale_factor != 1.0 {
            return Err(invalid(
                "resnet_skip_time_act / resnet_out_scale_factor are not supported",
            ));
        }
        if self.time_embedding_type != "positional" {
            return Err(invalid(format!(
                "time_embedding_type `{}` (only positional)",
                self.time_embedding_type
            )));
        }
        if self.attention_type != "default" {
            return Err(invalid(format!(
                "attention_type `{}` (only default)",
                self.attention_type
            )));
        }
        if self.class_embeddings_concat {
            return Err(invalid("class_embeddings_concat is not supported"));
        }
        for (name, v) in [
            ("class_embed_type", &self.class_embed_type),
            ("num_class_embeds", &self.num_class_embeds),
            ("addition_embed_type", &self.addition_embed_type),
            ("addition_time_embed_dim", &self.addition_time_embed_dim),
            ("encoder_hid_dim", &self.encoder_hid_dim),
            ("encoder_hid_dim_type", &self.encoder_hid_dim_type),
            ("time_embedding_act_fn", &self.time_embedding_act_fn),
            ("timestep_post_act", &self.timestep_post_act),
            ("time_cond_proj_dim", &self.time_cond_proj_dim),
            (
                "projection_class_embeddings_input_dim",
                &self.projection_class_embeddings_input_dim,
            ),
            ("cross_attention_norm", &self.cross_attention_norm),
            (
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
            ),
        ] {
            must_be_unset(name, v)?;
        }
        if let Some(serde_json::Value::Bool(true)) = self.mid_block_only_cross_attention {
            return Err(invalid("mid_block_only_cross_attention is not supported"));
        }
        if self
            .only_cross_attention
            .per_block(n, "only_cross_attention")?
            .iter()
            .any(|&b| b)
        {
            return Err(invalid("only_cross_attention is not supported"));
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return Err(invalid("conv_in_kernel / conv_out_kernel must be odd"));
        }
        let groups = self
            .norm_num_groups
            .ok_or_else(|| invalid("norm_num_groups = null is not supported"))?;
        let layers = self.layers_per_block.per_block(n, "layers_per_block")?;
        let tlayers = self
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")?;
        let cross = self
            .cross_attention_dim
            .per_block(n, "cross_attention_dim")?;
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .per_block(n, "attention_head_dim")?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || c % groups != 0 {
                return Err(invalid(format!(
                    "block_out_channels[{i}] = {c} is not a multiple of norm_num_groups {groups}"
                )));
            }
            if heads[i] == 0 || c % heads[i] != 0 {
                return Err(invalid(format!(
                    "block_out_channels[{i}] = {c} is not divisible into {} heads",
                    heads[i]
                )));
            }
        }
        let c0 = self.block_out_channels[0];
        let time_embed_dim = self.time_embedding_dim.unwrap_or(4 * c0);
        let eps = self.norm_eps;

        let mut down = Vec::with_capacity(n);
        let mut output = c0;
        for (i, ty) in self.down_block_types.iter().enumerate() {
            let input = output;
            output = self.block_out_channels[i];
            let cross_attention = match ty.as_str() {
                CROSS_DOWN => true,
                PLAIN_DOWN => false,
                other => {
                    return Err(invalid(format!(
                        "down_block_types[{i}] = `{other}` (only {CROSS_DOWN} / {PLAIN_DOWN})"
                    )))
                }
            };
            down.push(BlockSpec {
                in_channels: input,
                out_channels: output,
                prev_output_channels: 0,
                temb_channels: time_embed_dim,
                num_layers: layers[i],
                transformer_layers: tlayers[i],
                heads: heads[i],
                cross_attention_dim: cross[i],
                groups,
                eps,
                cross_attention,
                resample: i + 1 < n,
                downsample_padding: self.downsample_padding,
                output_scale_factor: 1.0,
            });
        }

        let last = self.block_out_channels[n - 1];
        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some(CROSS_MID) => Some(BlockSpec {
                in_channels: last,
                out_channels: last,
                prev_output_channels: 0,
                temb_channels: time_embed_dim,
                num_layers: 1,
                transformer_layers: tlayers[n - 1],
                heads: heads[n - 1],
                cross_attention_dim: cross[n - 1],
                groups,
                eps,
                cross_attention: true,
                resample: false,
                downsample_padding: 0,
                output_scale_factor: self.mid_block_scale_factor,
            }),
            Some(other) => {
                return Err(invalid(format!(
                    "mid_block_type `{other}` (only {CROSS_MID} or null)"
                )))
            }
        };

        let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
        let (r_ch, r_heads, r_layers, r_cross, r_tl) = (
            rev(&self.block_out_channels),
            rev(&heads),
            rev(&layers),
            rev(&cross),
            rev(&tlayers),
        );
        let mut up = Vec::with_capacity(n);
        let mut output = r_ch[0];
        for (i, ty) in self.up_block_types.iter().enumerate() {
            let prev = output;
            output = r_ch[i];
            let input = r_ch[(i + 1).min(n - 1)];
            let cross_attention = match ty.as_str() {
                CROSS_UP => true,
                PLAIN_UP => false,
                other => {
                    return Err(invalid(format!(
                        "up_block_types[{i}] = `{other}` (only {CROSS_UP} / {PLAIN_UP})"
                    )))
                }
            };
            up.push(BlockSpec {
                in_channels: input,
                out_channels: output,
                prev_output_channels: prev,
                temb_channels: time_embed_dim,
                num_layers: r_layers[i] + 1,
                transformer_layers: r_tl[i],
                heads: r_heads[i],
                cross_attention_dim: r_cross[i],
                groups,
                eps,
                cross_attention,
                resample: i + 1 < n,
                downsample_padding: 0,
                output_scale_factor: 1.0,
            });
        }
        Ok(UNetPlan {
            time_proj_dim: c0,
            time_embed_dim,
            down,
            mid,
            up,
            groups,
        })
    }

    /// Check the config without building anything.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.plan().map(|_| ())
    }

    /// Build a randomly initialised U-Net (parameters are lazily initialised, so loading weights
    /// right after `init` does not pay for the random init).
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<UNet2DConditionModel<B>, ModelError> {
        let plan = self.plan()?;
        let c0 = self.block_out_channels[0];
        let c_last_up = plan.up.last().map(|s| s.out_channels).unwrap_or(c0);
        Ok(UNet2DConditionModel {
            conv_in: blocks::conv2d(
                self.in_channels,
                c0,
                self.conv_in_kernel,
                1,
                (self.conv_in_kernel - 1) / 2,
                device,
            ),
            time_embedding: TimestepEmbedding::new(plan.time_proj_dim, plan.time_embed_dim, device),
            down_blocks: plan
                .down
                .iter()
                .map(|s| DownBlock2D::new(s, device))
                .collect(),
            mid_block: plan
                .mid
                .as_ref()
                .map(|s| UNetMidBlock2DCrossAttn::new(s, device)),
            up_blocks: plan.up.iter().map(|s| UpBlock2D::new(s, device)).collect(),
            conv_norm_out: GroupNormConfig::new(plan.groups, c_last_up)
                .with_epsilon(self.norm_eps)
                .init(device),
            conv_out: blocks::conv2d(
                c_last_up,
                self.out_channels,
                self.conv_out_kernel,
                1,
                (self.conv_out_kernel - 1) / 2,
                device,
            ),
            config: self.clone(),
            attention_kernel: AttentionKernel::default(),
        })
    }
}

/// Optional inputs of [`UNet2DConditionModel::forward`].
pub struct UNetExtras<'a, B: Backend> {
    /// ControlNet down residuals, one per skip tensor in production order (`conv_in` output, each
    /// resnet/attention output, each downsampler output: 12 for SD-1.5). Added to the skips before
    /// the up path. Must be given together with `mid_block_additional_residual`.
    pub down_block_additional_residuals: Option<Vec<Tensor<B, 4>>>,
    /// ControlNet residual added to the mid block output.
    pub mid_block_additional_residual: Option<Tensor<B, 4>>,
    /// Prompt-to-prompt attention hook (see [`attention`]).
    pub attention_hook: Option<&'a mut (dyn AttentionHook<B> + 'a)>,
}

impl<B: Backend> Default for UNetExtras<'_, B> {
    fn default() -> Self {
        Self {
            down_block_additional_residuals: None,
            mid_block_additional_residual: None,
            attention_hook: None,
        }
    }
}

impl<'a, B: Backend> UNetExtras<'a, B> {
    /// Extras with ControlNet residuals (e.g. from [`crate::controlnet::ControlNetOutput`]).
    pub fn residuals(down: Vec<Tensor<B, 4>>, mid: Tensor<B, 4>) -> Self {
        Self {
            down_block_additional_residuals: Some(down),
            mid_block_additional_residual: Some(mid),
            attention_hook: None,
        }
    }

    /// Extras with only an attention hook.
    pub fn hook(hook: &'a mut (dyn AttentionHook<B> + 'a)) -> Self {
        Self {
            attention_hook: Some(hook),
            ..Self::default()
        }
    }

    /// Add an attention hook.
    pub fn with_hook(mut self, hook: &'a mut (dyn AttentionHook<B> + 'a)) -> Self {
        self.attention_hook = Some(hook);
        self
    }
}

/// diffusers `UNet2DConditionModel` (SD-1.5 family). Field names are the diffusers keys.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub time_embedding: TimestepEmbedding<B>,
    pub down_blocks: Vec<DownBlock2D<B>>,
    pub mid_block: Option<UNetMidBlock2DCrossAttn<B>>,
    pub up_blocks: Vec<UpBlock2D<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
    pub config: UNet2DConditionConfig,
    pub attention_kernel: AttentionKernel,
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// Choose how attention is computed where no hook asks for the probabilities.
    pub fn with_attention_kernel(mut self, kernel: AttentionKernel) -> Self {
        self.attention_kernel = kernel;
        self
    }

    /// Sinusoidal projection + `time_embedding` MLP: `timesteps` `[1]` or `[batch]` → `[batch, 4·C0]`.
    pub fn time_embed(&self, timesteps: Tensor<B, 1>, batch: usize) -> Tensor<B, 2> {
        let t_emb = self.time_proj(timesteps, batch);
        self.time_embedding.forward(t_emb)
    }

    /// diffusers `time_proj` (broadcast to `batch`): `[batch, block_out_channels[0]]`.
    pub fn time_proj(&self, timesteps: Tensor<B, 1>, batch: usize) -> Tensor<B, 2> {
        let timesteps = broadcast_timesteps(timesteps, batch);
        timestep_embedding(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )
    }

    /// Number of attention calls per forward (self + cross per transformer block; 32 for SD-1.5).
    pub fn num_attention_layers(&self) -> usize {
        self.down_blocks
            .iter()
            .map(DownBlock2D::num_attention_layers)
            .sum::<usize>()
            + self
                .mid_block
                .as_ref()
                .map_or(0, UNetMidBlock2DCrossAttn::num_attention_layers)
            + self
                .up_blocks
                .iter()
                .map(UpBlock2D::num_attention_layers)
                .sum::<usize>()
    }

    /// Number of skip tensors the down path produces (= ControlNet down residuals; 12 for SD-1.5).
    pub fn num_down_residuals(&self) -> usize {
        1 + self
            .down_blocks
            .iter()
            .map(|b| b.resnets.len() + b.downsamplers.len())
            .sum::<usize>()
    }

    /// Predict the noise.
    ///
    /// * `sample`: `[B, in_channels, h, w]` noisy latents (any `h, w` ≥ 1).
    /// * `timesteps`: `[B]` or `[1]` (broadcast) float timesteps.
    /// * `encoder_hidden_states`: `[B, L, cross_attention_dim]` (SD-1.5: `[B, 77, 768]`).
    /// * `extras`: ControlNet residuals and/or an attention hook.
    ///
    /// Returns `[B, out_channels, h, w]`.
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
        extras: Option<UNetExtras<'_, B>>,
    ) -> Tensor<B, 4> {
        let UNetExtras {
            down_block_additional_residuals: down_res,
            mid_block_additional_residual: mid_res,
            attention_hook,
        } = extras.unwrap_or_default();
        assert_eq!(
            down_res.is_some(),
            mid_res.is_some(),
            "ControlNet residuals: give both down_block_additional_residuals and \
             mid_block_additional_residual, or neither"
        );
        let mut actx = AttentionContext::new(attention_hook, self.attention_kernel);
        let [batch, _, _, _] = sample.dims();

        let sample = if self.config.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample
        };
        let emb = self.time_embed(timesteps, batch);
        let context = encoder_hidden_states;

        let mut x = crate::amp::conv2d(&self.conv_in, sample);
        let mut skips = vec![x.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let (out, res) = block.forward(x, emb.clone(), context.clone(), &mut actx, i);
            x = out;
            skips.extend(res);
        }

        if let Some(down_res) = down_res {
            assert_eq!(
                down_res.len(),
                skips.len(),
                "{} ControlNet down residuals for {} skip tensors",
                down_res.len(),
                skips.len()
            );
            skips = skips
                .into_iter()
                .zip(down_res)
                .map(|(s, r)| s + r)
                .collect();
        }

        if let Some(mid) = &self.mid_block {
            x = mid.forward(x, emb.clone(), context.clone(), &mut actx);
        }
        if let Some(mid_res) = mid_res {
            x = x + mid_res;
        }

        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let n = block.resnets.len();
            let rest = skips
                .len()
                .checked_sub(n)
                .expect("skip tensors match up-block resnets");
            let res = skips.split_off(rest);
            let upsample_size = if i + 1 < n_up {
                skips.last().map(|s| {
                    let [_, _, h, w] = s.dims();
                    [h, w]
                })
            } else {
                None
            };
            x = block.forward(
                x,
                res,
                emb.clone(),
                context.clone(),
                upsample_size,
                &mut actx,
                i,
            );
        }

        actx.finish();
        let x = crate::nn::group_norm_silu(&self.conv_norm_out, x);
        crate::amp::conv2d(&self.conv_out, x)
    }

    /// Save in the diffusers layout: `dir/config.json` and `dir/diffusion_pytorch_model.safetensors`.
    /// A U-Net carrying LoRA adapters is refused: merge them first ([`crate::lora::merge`]) or save
    /// them apart ([`crate::lora::save_adapters`]).
    pub fn save_diffusers(&self, dir: &Path) -> Result<(), ModelError> {
        if crate::lora::has_adapters(self) {
            return Err(ModelError::Invalid(
                "this U-Net carries LoRA adapters: merge them (lora::merge) or save them with lora::save_adapters".into(),
            ));
        }
        save_component(
            self,
            &self.config,
            &reverse_key_map(),
            dir,
            "UNet2DConditionModel",
        )
    }
}

/// Write `config.json` (with `_class_name`) and the weights of a diffusers component.
pub fn save_component<B: Backend, M: burn_store::ModuleSnapshot<B>, C: Serialize>(
    module: &M,
    config: &C,
    reverse: &KeyMap,
    dir: &Path,
    class_name: &str,
) -> Result<(), ModelError> {
    crate::write_json(&dir.join("config.json"), config, Some(class_name))?;
    save_safetensors(
        module,
        reverse,
        &dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    Ok(())
}

/// `[1]` or `[batch]` timesteps → `[batch]`.
pub(crate) fn broadcast_timesteps<B: Backend>(
    timesteps: Tensor<B, 1>,
    batch: usize,
) -> Tensor<B, 1> {
    let [n] = timesteps.dims();
    if n == batch {
        timesteps
    } else {
        assert_eq!(n, 1, "{n} timesteps for a batch of {batch}");
        timesteps.expand([batch])
    }
}

/// diffusers U-Net / ControlNet keys → our module paths.
pub fn key_map() -> KeyMap {
    KeyMap::new(&[
        (r"\.to_out\.0\.", ".to_out."),
        (r"\.ff\.net\.0\.proj\.", ".ff.net_0.proj."),
        (r"\.ff\.net\.2\.", ".ff.net_2."),
    ])
}

/// Our module paths → diffusers keys (for saving).
pub fn reverse_key_map() -> KeyMap {
    KeyMap::new(&[
        (r"\.to_out\.", ".to_out.0."),
        (r"\.ff\.net_0\.proj\.", ".ff.net.0.proj."),
        (r"\.ff\.net_2\.", ".ff.net.2."),
    ])
}

/// Apply a diffusers-layout state dict to a U-Net, strictly.
pub fn load_state_dict<B: Backend>(
    model: UNet2DConditionModel<B>,
    sd: StateDict,
) -> Result<UNet2DConditionModel<B>, ModelError> {
    Ok(load_strict(model, sd, &key_map(), "unet")?)
}

/// Load a diffusers `unet/` folder (`config.json` + weight file).
pub fn load<B: Backend>(
    dir: &ComponentDir,
    device: &B::Device,
) -> Result<UNet2DConditionModel<B>, ModelError> {
    let config: UNet2DConditionConfig = crate::read_json(&dir.config_path())?;
    let model = config.init(device)?;
    load_state_dict(model, dir.state_dict()?)
}

/// Parameter count without initialising any parameter (uses the lazy shapes), so the full-size
/// SD-1.5 U-Net can be counted in milliseconds.
pub fn lazy_num_params<B: Backend, M: Module<B>>(module: &M) -> usize {
    struct Count(usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 += param.lazy_shape().num_elements();
        }
    }
    let mut c = Count(0);
    module.visit(&mut c);
    c.0
}

#[cfg(test)]
mod tests {
    use super::*;
    type TB = burn::backend::NdArray<f32>;

    #[test]
    fn sd15_parameter_count_and_layout() {
        let dev = Default::default();
        let unet = UNet2DConditionConfig::sd15().init::<TB>(&dev).unwrap();
        assert_eq!(lazy_num_params::<TB, _>(&unet), 859_520_964);
        assert_eq!(unet.num_attention_layers(), 32);
        assert_eq!(unet.num_down_residuals(), 12);
    }

    #[test]
    fn trains_under_autodiff() {
        use burn::module::AutodiffModule;
        type AD = burn::backend::Autodiff<TB>;
        let dev = Default::default();
        let unet = UNet2DConditionConfig::tiny().init::<AD>(&dev).unwrap();
        let x = Tensor::<AD, 4>::random([1, 4, 8, 8], burn::tensor::Distribution::Default, &dev);
        let ctx = Tensor::<AD, 3>::random([1, 5, 24], burn::tensor::Distribution::Default, &dev);
        let out = unet.forward(x, Tensor::from_floats([10.0], &dev), ctx, None);
        let grads = out.powi_scalar(2).mean().backward();
        let g = unet.down_blocks[0].attentions[0].transformer_blocks[0]
            .attn2
            .to_k
            .weight
            .grad(&grads)
            .expect("cross-attention key projection gets a gradient");
        assert!(g.abs().sum().into_scalar() > 0.0);
        let inner = unet.valid();
        assert_eq!(inner.config, UNet2DConditionConfig::tiny());
    }

    #[test]
    fn config_defaults_match_diffusers() {
        let c: UNet2DConditionConfig = serde_json::from_str(
            r#"{"cross_attention_dim": 768, "sample_size": 64, "_class_name": "UNet2DConditionModel"}"#,
        )
        .unwrap();
        assert_eq!(c, UNet2DConditionConfig::sd15());
    }

    #[test]
    fn rejects_unsupported_options() {
        let mut c = UNet2DConditionConfig::tiny();
        c.use_linear_projection = true;
        assert!(c.validate().is_err());
        let mut c = UNet2DConditionConfig::tiny();
        c.addition_embed_type = Some(serde_json::json!("text_time"));
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("addition_embed_type"));
        let mut c = UNet2DConditionConfig::tiny();
        c.attention_head_dim = OneOrMany::Many(vec![2, 4, 8]);
        assert!(c.validate().is_err());
        let mut c = UNet2DConditionConfig::tiny();
        c.down_block_types[1] = "AttnDownBlock2D".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn key_maps_round_trip() {
        let keys = [
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight",
            "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.bias",
            "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight",
            "conv_in.weight",
        ];
        let (f, r) = (key_map(), reverse_key_map());
        for k in keys {
            let ours = f.map_key(k).unwrap();
            assert!(
                !ours.contains("to_out.0") && !ours.contains("net.0") && !ours.contains("net.2")
            );
            assert_eq!(r.map_key(&ours).unwrap(), k);
        }
    }
}
