//! diffusers `ControlNetModel` for SD-1.5 (lllyasviel ControlNet v1.0 layout, e.g.
//! `lllyasviel/sd-controlnet-canny`, used by BLIP-Diffusion's stylisation / structure control,
//! model.md §5.3).
//!
//! A copy of the U-Net's encoder (`conv_in`, `time_embedding`, `down_blocks`, `mid_block`, built from
//! the same block types as [`crate::unet`]) plus
//! * `controlnet_cond_embedding`: `conv_in` (3→16) + SiLU, then per consecutive channel pair
//!   (16, 32, 96, 256) a 3×3 conv and a stride-2 3×3 conv, each + SiLU, then a zero-initialised
//!   `conv_out` to `block_out_channels[0]`. Its output is added to `conv_in(sample)`; the conditioning
//!   image must therefore be `2^(len−1)` = 8× the latent size (512² image for 64² latents).
//! * `controlnet_down_blocks.{i}`: one zero-initialised 1×1 conv per skip tensor (12 for SD-1.5) and
//!   `controlnet_mid_block` for the mid output.
//!
//! [`ControlNetModel::forward`] returns the residuals scaled by `conditioning_scale` (or, in guess
//! mode, by `logspace(-1, 0, n+1) · scale`), ready for [`crate::unet::UNetExtras::residuals`].

use crate::nn::silu;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::unet::blocks::conv2d;
use crate::unet::{
    broadcast_timesteps, invalid, must_be_unset, save_component, timestep_embedding,
    AttentionContext, AttentionHook, AttentionKernel, BlockSpec, DownBlock2D, OneOrMany,
    TimestepEmbedding, UNetExtras, UNetMidBlock2DCrossAttn, CROSS_DOWN, CROSS_MID, PLAIN_DOWN,
};
pub use crate::unet::{key_map, reverse_key_map};
use crate::weights::{load_strict, ComponentDir, StateDict};
use crate::ModelError;

fn d_4() -> usize {
    4
}
fn d_3() -> usize {
    3
}
fn d_1() -> usize {
    1
}
fn d_2() -> usize {
    2
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
fn d_1280() -> usize {
    1280
}
fn d_down_types() -> Vec<String> {
    vec![
        CROSS_DOWN.into(),
        CROSS_DOWN.into(),
        CROSS_DOWN.into(),
        PLAIN_DOWN.into(),
    ]
}
fn d_mid_type() -> Option<String> {
    Some(CROSS_MID.into())
}
fn d_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_one_many() -> OneOrMany<usize> {
    OneOrMany::One(1)
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
fn d_rgb() -> String {
    "rgb".into()
}
fn d_cond_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

/// diffusers `ControlNetModel` config (`config.json`), defaults as diffusers 0.33.1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlNetConfig {
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub conditioning_channels: usize,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_false_many")]
    pub only_cross_attention: OneOrMany<bool>,
    #[serde(default = "d_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_2")]
    pub layers_per_block: usize,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_1280")]
    pub cross_attention_dim: usize,
    #[serde(default = "d_one_many")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    /// As in diffusers, the number of heads (`num_attention_heads` overrides it).
    #[serde(default = "d_heads")]
    pub attention_head_dim: OneOrMany<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    /// `"rgb"` or `"bgr"` (the conditioning image's channels are flipped for `"bgr"`).
    #[serde(default = "d_rgb")]
    pub controlnet_conditioning_channel_order: String,
    #[serde(default = "d_cond_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Average each residual over space (shuffle ControlNets).
    #[serde(default)]
    pub global_pool_conditions: bool,
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
    pub projection_class_embeddings_input_dim: Option<serde_json::Value>,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl ControlNetConfig {
    /// ControlNet v1.0 for SD-1.5: `lllyasviel/sd-controlnet-{canny,depth,hed}` `config.json`
    /// (diffusers 0.14 export): the SD-1.5 U-Net encoder (blocks (320, 640, 1280, 1280), 2 layers,
    /// 8 heads, cross_attention_dim 768, GroupNorm 32 / 1e-5) + conditioning embedding
    /// (16, 32, 96, 256) from 3 RGB channels. 361,279,120 params.
    pub fn sd15() -> Self {
        Self {
            cross_attention_dim: 768,
            ..Self::default()
        }
    }

    /// A tiny ControlNet matching [`crate::unet::UNet2DConditionConfig::tiny`]'s encoder, with
    /// conditioning embedding (4, 8, 8, 16) (the parity fixture, `scripts/reference/gen_controlnet.py`).
    pub fn tiny() -> Self {
        Self {
            down_block_types: vec![CROSS_DOWN.into(), PLAIN_DOWN.into()],
            block_out_channels: vec![16, 32],
            layers_per_block: 1,
            norm_num_groups: Some(8),
            cross_attention_dim: 24,
            attention_head_dim: OneOrMany::Many(vec![2, 4]),
            conditioning_embedding_out_channels: vec![4, 8, 8, 16],
            ..Self::default()
        }
    }

    fn plan(&self) -> Result<(Vec<BlockSpec>, BlockSpec, usize), ModelError> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n {
            return Err(invalid(format!(
                "{} down_block_types for {n} block_out_channels",
                self.down_block_types.len()
            )));
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return Err(invalid(format!("act_fn `{}` (only silu)", self.act_fn)));
        }
        if self.use_linear_projection {
            return Err(invalid("use_linear_projection=true is not implemented"));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(invalid("resnet_time_scale_shift must be `default`"));
        }
        if self.conditioning_embedding_out_channels.is_empty() {
            return Err(invalid("conditioning_embedding_out_channels is empty"));
        }
        if !matches!(
            self.controlnet_conditioning_channel_order.as_str(),
            "rgb" | "bgr"
        ) {
            return Err(invalid(format!(
                "controlnet_conditioning_channel_order `{}` (rgb or bgr)",
                self.controlnet_conditioning_channel_order
            )));
        }
        for (name, v) in [
            ("class_embed_type", &self.class_embed_type),
            ("num_class_embeds", &self.num_class_embeds),
            ("addition_embed_type", &self.addition_embed_type),
            ("addition_time_embed_dim", &self.addition_time_embed_dim),
            ("encoder_hid_dim", &self.encoder_hid_dim),
            ("encoder_hid_dim_type", &self.encoder_hid_dim_type),
            (
                "projection_class_embeddings_input_dim",
                &self.projection_class_embeddings_input_dim,
            ),
        ] {
            must_be_unset(name, v)?;
        }
        if self
            .only_cross_attention
            .per_block(n, "only_cross_attention")?
            .iter()
            .any(|&b| b)
        {
            return Err(invalid("only_cross_attention is not supported"));
        }
        let groups = self
            .norm_num_groups
            .ok_or_else(|| invalid("norm_num_groups = null is not supported"))?;
        let tlayers = self
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")?;
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .per_block(n, "attention_head_dim")?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || c % groups != 0 || heads[i] == 0 || c % heads[i] != 0 {
                return Err(invalid(format!(
                    "block_out_channels[{i}] = {c} does not fit {groups} groups / {} heads",
                    heads[i]
                )));
            }
        }
        let c0 = self.block_out_channels[0];
        let temb = 4 * c0;
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
                temb_channels: temb,
                num_layers: self.layers_per_block,
                transformer_layers: tlayers[i],
                heads: heads[i],
                cross_attention_dim: self.cross_attention_dim,
                groups,
                eps: self.norm_eps,
                cross_attention,
                resample: i + 1 < n,
                downsample_padding: self.downsample_padding,
                output_scale_factor: 1.0,
            });
        }
        let last = self.block_out_channels[n - 1];
        let mid = match self.mid_block_type.as_deref() {
            Some(CROSS_MID) => BlockSpec {
                in_channels: last,
                out_channels: last,
                prev_output_channels: 0,
                temb_channels: temb,
                num_layers: 1,
                transformer_layers: tlayers[n - 1],
                heads: heads[n - 1],
                cross_attention_dim: self.cross_attention_dim,
                groups,
                eps: self.norm_eps,
                cross_attention: true,
                resample: false,
                downsample_padding: 0,
                output_scale_factor: self.mid_block_scale_factor,
            },
            other => {
                return Err(invalid(format!(
                    "mid_block_type {other:?} (only {CROSS_MID})"
                )))
            }
        };
        Ok((down, mid, temb))
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        self.plan().map(|_| ())
    }

    /// Build a ControlNet with diffusers' init for the zero convolutions (all residual convs and the
    /// conditioning embedding's `conv_out` start at zero); other parameters are lazily initialised.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<ControlNetModel<B>, ModelError> {
        let (down, mid, temb) = self.plan()?;
        let c0 = self.block_out_channels[0];
        let zero_conv = |c: usize, k: usize| -> Conv2d<B> {
            Conv2dConfig::new([c, c], [k, k])
                .with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2))
                .with_initializer(Initializer::Zeros)
                .init(device)
        };
        let cc = &self.conditioning_embedding_out_channels;
        let mut blocks = Vec::with_capacity(2 * (cc.len() - 1));
        for w in cc.windows(2) {
            blocks.push(conv2d(w[0], w[0], 3, 1, 1, device));
            blocks.push(conv2d(w[0], w[1], 3, 2, 1, device));
        }
        let cond_embedding = ControlNetConditioningEmbedding {
            conv_in: conv2d(self.conditioning_channels, cc[0], 3, 1, 1, device),
            blocks,
            conv_out: Conv2dConfig::new([cc[cc.len() - 1], c0], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_initializer(Initializer::Zeros)
                .init(device),
        };
        let mut controlnet_down_blocks = vec![zero_conv(c0, 1)];
        for spec in &down {
            for _ in 0..spec.num_layers {
                controlnet_down_blocks.push(zero_conv(spec.out_channels, 1));
            }
            if spec.resample {
                controlnet_down_blocks.push(zero_conv(spec.out_channels, 1));
            }
        }
        Ok(ControlNetModel {
            conv_in: conv2d(self.in_channels, c0, 3, 1, 1, device),
            time_embedding: TimestepEmbedding::new(c0, temb, device),
            controlnet_cond_embedding: cond_embedding,
            down_blocks: down.iter().map(|s| DownBlock2D::new(s, device)).collect(),
            controlnet_down_blocks,
            mid_block: UNetMidBlock2DCrossAttn::new(&mid, device),
            controlnet_mid_block: zero_conv(mid.out_channels, 1),
            config: self.clone(),
            attention_kernel: AttentionKernel::default(),
        })
    }
}

/// diffusers `ControlNetConditioningEmbedding`.
#[derive(Module, Debug)]
pub struct ControlNetConditioningEmbedding<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub blocks: Vec<Conv2d<B>>,
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> ControlNetConditioningEmbedding<B> {
    pub fn forward(&self, cond: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = silu(crate::amp::conv2d(&self.conv_in, cond));
        for block in &self.blocks {
            x = silu(crate::amp::conv2d(block, x));
        }
        crate::amp::conv2d(&self.conv_out, x)
    }
}

/// Residuals for the U-Net: one per skip tensor, and one for the mid block.
#[derive(Debug, Clone)]
pub struct ControlNetOutput<B: Backend> {
    pub down_block_res_samples: Vec<Tensor<B, 4>>,
    pub mid_block_res_sample: Tensor<B, 4>,
}

impl<B: Backend> ControlNetOutput<B> {
    /// As U-Net extras (`down_block_additional_residuals`, `mid_block_additional_residual`).
    pub fn into_extras<'a>(self) -> UNetExtras<'a, B> {
        UNetExtras::residuals(self.down_block_res_samples, self.mid_block_res_sample)
    }
}

/// diffusers `ControlNetModel` (SD-1.5 family). Field names are the diffusers keys.
#[derive(Module, Debug)]
pub struct ControlNetModel<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub time_embedding: TimestepEmbedding<B>,
    pub controlnet_cond_embedding: ControlNetConditioningEmbedding<B>,
    pub down_blocks: Vec<DownBlock2D<B>>,
    pub controlnet_down_blocks: Vec<Conv2d<B>>,
    pub mid_block: UNetMidBlock2DCrossAttn<B>,
    pub controlnet_mid_block: Conv2d<B>,
    pub config: ControlNetConfig,
    pub attention_kernel: AttentionKernel,
}

impl<B: Backend> ControlNetModel<B> {
    pub fn with_attention_kernel(mut self, kernel: AttentionKernel) -> Self {
        self.attention_kernel = kernel;
        self
    }

    /// Residuals scaled by `conditioning_scale`.
    ///
    /// * `sample`: `[B, 4, h, w]` latents; `timesteps`: `[B]` or `[1]`;
    ///   `encoder_hidden_states`: `[B, L, cross_attention_dim]`.
    /// * `controlnet_cond`: `[B, 3, 8h, 8w]` conditioning image in `[0, 1]` (RGB, as the
    ///   diffusers pipelines prepare it).
    pub fn forward(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
        controlnet_cond: Tensor<B, 4>,
        conditioning_scale: f64,
    ) -> ControlNetOutput<B> {
        self.forward_with(
            sample,
            timesteps,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale,
            false,
            None,
        )
    }

    /// [`forward`](Self::forward) with diffusers' `guess_mode` (residual `i` of `n+1` scaled by
    /// `10^(−1 + i/n)·scale`, mid by `scale`) and an optional attention hook on the ControlNet's own
    /// attention layers.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with(
        &self,
        sample: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        encoder_hidden_states: Tensor<B, 3>,
        controlnet_cond: Tensor<B, 4>,
        conditioning_scale: f64,
        guess_mode: bool,
        hook: Option<&mut dyn AttentionHook<B>>,
    ) -> ControlNetOutput<B> {
        let mut actx = AttentionContext::new(hook, self.attention_kernel);
        let [batch, _, _, _] = sample.dims();
        let cond = if self.config.controlnet_conditioning_channel_order == "bgr" {
            controlnet_cond.flip([1])
        } else {
            controlnet_cond
        };
        let t = broadcast_timesteps(timesteps, batch);
        let t_emb = timestep_embedding(
            t,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        );
        let emb = self.time_embedding.forward(t_emb);
        let context = encoder_hidden_states;

        let mut x = crate::amp::conv2d(&self.conv_in, sample)
            + self.controlnet_cond_embedding.forward(cond);
        let mut skips = vec![x.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let (out, res) = block.forward(x, emb.clone(), context.clone(), &mut actx, i);
            x = out;
            skips.extend(res);
        }
        x = self.mid_block.forward(x, emb, context, &mut actx);

        assert_eq!(skips.len(), self.controlnet_down_blocks.len());
        let down: Vec<Tensor<B, 4>> = skips
            .into_iter()
            .zip(&self.controlnet_down_blocks)
            .map(|(s, conv)| crate::amp::conv2d(conv, s))
            .collect();
        let mid = crate::amp::conv2d(&self.controlnet_mid_block, x);

        let n = down.len();
        let (mut down, mut mid): (Vec<_>, _) = if guess_mode && !self.config.global_pool_conditions
        {
            // torch.logspace(-1, 0, n + 1) · scale
            let scale_at = |i: usize| {
                let e = -1.0 + i as f64 / n as f64;
                10f64.powf(e) as f32 as f64 * conditioning_scale
            };
            (
                down.into_iter()
                    .enumerate()
                    .map(|(i, d)| d * scale_at(i))
                    .collect(),
                mid * scale_at(n),
            )
        } else {
            (
                down.into_iter().map(|d| d * conditioning_scale).collect(),
                mid * conditioning_scale,
            )
        };
        if self.config.global_pool_conditions {
            down = down
                .into_iter()
                .map(|d| d.mean_dim(3).mean_dim(2))
                .collect();
            mid = mid.mean_dim(3).mean_dim(2);
        }
        ControlNetOutput {
            down_block_res_samples: down,
            mid_block_res_sample: mid,
        }
    }

    /// Save in the diffusers layout (`config.json` + `diffusion_pytorch_model.safetensors`).
    pub fn save_diffusers(&self, dir: &std::path::Path) -> Result<(), ModelError> {
        save_component(
            self,
            &self.config,
            &reverse_key_map(),
            dir,
            "ControlNetModel",
        )
    }
}

/// Apply a diffusers-layout state dict to a ControlNet, strictly.
pub fn load_state_dict<B: Backend>(
    model: ControlNetModel<B>,
    sd: StateDict,
) -> Result<ControlNetModel<B>, ModelError> {
    Ok(load_strict(model, sd, &key_map(), "controlnet")?)
}

/// Load a diffusers ControlNet folder (`config.json` + weight file).
pub fn load<B: Backend>(
    dir: &ComponentDir,
    device: &B::Device,
) -> Result<ControlNetModel<B>, ModelError> {
    let config: ControlNetConfig = crate::read_json(&dir.config_path())?;
    let model = config.init(device)?;
    load_state_dict(model, dir.state_dict()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::lazy_num_params;
    type TB = burn::backend::NdArray<f32>;

    #[test]
    fn sd15_parameter_count() {
        let dev = Default::default();
        let cn = ControlNetConfig::sd15().init::<TB>(&dev).unwrap();
        // diffusers 0.33.1: sum(p.numel()) of ControlNetModel(cross_attention_dim=768) on "meta".
        assert_eq!(lazy_num_params::<TB, _>(&cn), 361_279_120);
        assert_eq!(cn.controlnet_down_blocks.len(), 12);
    }

    #[test]
    fn fresh_controlnet_outputs_zero_residuals() {
        let dev = Default::default();
        let cn = ControlNetConfig::tiny().init::<TB>(&dev).unwrap();
        let out = cn.forward(
            Tensor::ones([1, 4, 8, 8], &dev),
            Tensor::from_floats([10.0], &dev),
            Tensor::ones([1, 5, 24], &dev),
            Tensor::ones([1, 3, 64, 64], &dev),
            1.0,
        );
        assert_eq!(out.down_block_res_samples.len(), 4);
        for d in out.down_block_res_samples {
            assert_eq!(d.abs().max().into_scalar(), 0.0);
        }
        assert_eq!(out.mid_block_res_sample.dims(), [1, 32, 4, 4]);
    }
}
