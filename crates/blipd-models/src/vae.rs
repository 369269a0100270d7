//! diffusers `AutoencoderKL`, as used by Stable Diffusion 1.5 (and BLIP-Diffusion).
//!
//! Structure (module fields mirror the diffusers state-dict keys):
//! - `encoder`: `conv_in` → `down_blocks[i]` (`DownEncoderBlock2D`: `resnets`, then one stride-2
//!   `downsamplers.0.conv` with diffusers' asymmetric `(0, 1, 0, 1)` zero padding, except the last block)
//!   → `mid_block` (`resnets[0]`, then per layer `attentions[i]` and `resnets[i+1]`) → `conv_norm_out`
//!   → SiLU → `conv_out` (2 × latent channels: mean and log-variance).
//! - `quant_conv` (1×1) on the moments, `post_quant_conv` (1×1) on the latents.
//! - `decoder`: `conv_in` → `mid_block` → `up_blocks[i]` (`UpDecoderBlock2D`: `layers_per_block + 1`
//!   resnets, then nearest 2× upsampling + `upsamplers.0.conv`, except the last block)
//!   → `conv_norm_out` → SiLU → `conv_out`.
//!
//! Resnet blocks are diffusers `ResnetBlock2D` without time embedding (GroupNorm eps 1e-6, SiLU,
//! `output_scale_factor` 1, 1×1 `conv_shortcut` when the width changes). The mid-block attention is a
//! single-head self-attention over the H·W positions with its own GroupNorm and a residual connection.
//! Older checkpoints (e.g. the SD-1.5 `.bin`) name its projections `query`/`key`/`value`/`proj_attn`;
//! [`AutoencoderKL::key_map`] accepts both layouts, [`AutoencoderKL::reverse_key_map`] writes the current one.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use serde::{Deserialize, Serialize};

use crate::nn::linear;
use crate::weights::{load_strict, save_safetensors, ComponentDir, KeyMap, StateDict};
use crate::ModelError;

/// GroupNorm / resnet epsilon used everywhere in diffusers' `Encoder`/`Decoder`.
pub const VAE_EPS: f64 = 1e-6;

/// diffusers `AutoencoderKL` config (`vae/config.json`). Field names and defaults follow
/// `AutoencoderKL.__init__` in diffusers 0.33.1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// An int, or `[h, w]` in some configs; only used for tiling in diffusers.
    pub sample_size: serde_json::Value,
    pub scaling_factor: f64,
    /// `None` for SD-1.5; when set (SD3/Flux VAEs), latents are `(z - shift) · scale`.
    pub shift_factor: Option<f64>,
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: serde_json::Value::from(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Stable Diffusion 1.5's VAE: `runwayml/stable-diffusion-v1-5` `vae/config.json`
    /// (block_out_channels (128, 256, 512, 512), layers_per_block 2, 4 latent channels, 32 groups,
    /// sample_size 512; `scaling_factor` 0.18215 is diffusers' default, which that file predates).
    /// 83,653,863 parameters.
    pub fn sd15() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: serde_json::Value::from(512),
            ..Self::default()
        }
    }

    /// Tiny config for tests, the same as the parity fixture (`scripts/reference/gen_vae.py`):
    /// three blocks (16, 32, 32), 2 layers per block, 8 groups, 16×16 images → 4×4 latents.
    pub fn tiny() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); 3],
            up_block_types: vec!["UpDecoderBlock2D".into(); 3],
            block_out_channels: vec![16, 32, 32],
            layers_per_block: 2,
            norm_num_groups: 8,
            sample_size: serde_json::Value::from(16),
            ..Self::default()
        }
    }

    /// The micro preset (`blipd pretrain` on the procedural world, `configs/micro.toml`): two blocks
    /// (16, 32), 1 layer per block, 8 groups, 4 latent channels, 32×32 images → 16×16 latents
    /// (factor 2, so a 32-px subject keeps its pattern). Trained as an autoencoder before stage 2.
    pub fn micro() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); 2],
            up_block_types: vec!["UpDecoderBlock2D".into(); 2],
            block_out_channels: vec![16, 32],
            layers_per_block: 1,
            norm_num_groups: 8,
            sample_size: serde_json::Value::from(32),
            ..Self::default()
        }
    }

    /// Read `config.json` (diffusers layout) and check it.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ModelError> {
        let cfg: Self = crate::read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Spatial downsampling factor between images and latents (8 for SD-1.5).
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Reject configs this implementation does not cover, with the reason.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Invalid(format!("VAE config: {m}")));
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "{} down and {} up block types for {} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len(),
                n
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return bad(format!(
                "unsupported down block type `{t}` (only DownEncoderBlock2D)"
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return bad(format!(
                "unsupported up block type `{t}` (only UpDecoderBlock2D)"
            ));
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return bad(format!("unsupported act_fn `{}` (only silu)", self.act_fn));
        }
        if self.norm_num_groups == 0 {
            return bad("norm_num_groups is 0".into());
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| **c == 0 || **c % self.norm_num_groups != 0)
        {
            return bad(format!(
                "block width {c} is not a positive multiple of norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return bad("zero in/out/latent channels".into());
        }
        if self.layers_per_block == 0 {
            return bad("layers_per_block is 0".into());
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return bad(format!(
                "scaling_factor {} must be finite and non-zero",
                self.scaling_factor
            ));
        }
        Ok(())
    }

    /// Build the model with freshly initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<AutoencoderKL<B>, ModelError> {
        self.validate()?;
        Ok(AutoencoderKL::new(self, device))
    }
}

fn conv<B: Backend>(
    c_in: usize,
    c_out: usize,
    k: usize,
    padding: PaddingConfig2d,
    device: &B::Device,
) -> Conv2d<B> {
    Conv2dConfig::new([c_in, c_out], [k, k])
        .with_padding(padding)
        .init(device)
}

fn conv3<B: Backend>(c_in: usize, c_out: usize, device: &B::Device) -> Conv2d<B> {
    conv(
        c_in,
        c_out,
        3,
        PaddingConfig2d::Explicit(1, 1, 1, 1),
        device,
    )
}

fn group_norm<B: Backend>(groups: usize, channels: usize, device: &B::Device) -> GroupNorm<B> {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(VAE_EPS)
        .init(device)
}

/// diffusers `ResnetBlock2D` without time embedding (`temb_channels=None`).
#[derive(Module, Debug)]
pub struct VaeResnetBlock<B: Backend> {
    pub norm1: GroupNorm<B>,
    pub conv1: Conv2d<B>,
    pub norm2: GroupNorm<B>,
    pub conv2: Conv2d<B>,
    /// 1×1 projection of the residual when in ≠ out channels.
    pub conv_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> VaeResnetBlock<B> {
    pub fn new(c_in: usize, c_out: usize, groups: usize, device: &B::Device) -> Self {
        Self {
            norm1: group_norm(groups, c_in, device),
            conv1: conv3(c_in, c_out, device),
            norm2: group_norm(groups, c_out, device),
            conv2: conv3(c_out, c_out, device),
            conv_shortcut: (c_in != c_out)
                .then(|| conv(c_in, c_out, 1, PaddingConfig2d::Valid, device)),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = crate::amp::conv2d(
            &self.conv1,
            crate::nn::group_norm_silu(&self.norm1, x.clone()),
        );
        let h = crate::amp::conv2d(&self.conv2, crate::nn::group_norm_silu(&self.norm2, h));
        let skip = match &self.conv_shortcut {
            Some(c) => crate::amp::conv2d(c, x),
            None => x,
        };
        skip + h
    }
}

/// The mid-block attention: GroupNorm → single-head self-attention over H·W positions →
/// `to_out` → + residual (diffusers `Attention(..., norm_num_groups, residual_connection=True)`).
#[derive(Module, Debug)]
pub struct VaeAttention<B: Backend> {
    pub group_norm: GroupNorm<B>,
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    /// `to_out.0` in diffusers (`proj_attn` in legacy checkpoints).
    pub to_out: Linear<B>,
    pub heads: usize,
}

impl<B: Backend> VaeAttention<B> {
    pub fn new(channels: usize, groups: usize, heads: usize, device: &B::Device) -> Self {
        Self {
            group_norm: group_norm(groups, channels, device),
            to_q: linear(channels, channels, true, device),
            to_k: linear(channels, channels, true, device),
            to_v: linear(channels, channels, true, device),
            to_out: linear(channels, channels, true, device),
            heads,
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let hs = crate::nn::group_norm(&self.group_norm, x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let q = crate::amp::linear(&self.to_q, hs.clone());
        let k = crate::amp::linear(&self.to_k, hs.clone());
        let v = crate::amp::linear(&self.to_v, hs);
        let scale = 1.0 / ((c / self.heads) as f64).sqrt();
        let out = crate::nn::attention_tokens(q, k, v, self.heads, scale);
        let out = crate::amp::linear(&self.to_out, out)
            .swap_dims(1, 2)
            .reshape([b, c, h, w]);
        out + x
    }
}

/// diffusers `Downsample2D(use_conv=True, padding=0)`: pad right and bottom by one, 3×3 conv stride 2.
#[derive(Module, Debug)]
pub struct VaeDownsample<B: Backend> {
    pub conv: Conv2d<B>,
}

impl<B: Backend> VaeDownsample<B> {
    pub fn new(channels: usize, device: &B::Device) -> Self {
        // PaddingConfig2d::Explicit is (top, left, bottom, right); torch F.pad (0, 1, 0, 1) pads right and bottom.
        let conv = Conv2dConfig::new([channels, channels], [3, 3])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Explicit(0, 0, 1, 1))
            .init(device);
        Self { conv }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        crate::amp::conv2d(&self.conv, x)
    }
}

/// diffusers `Upsample2D(use_conv=True)`: nearest 2× upsampling, then a 3×3 conv.
#[derive(Module, Debug)]
pub struct VaeUpsample<B: Backend> {
    pub conv: Conv2d<B>,
}

impl<B: Backend> VaeUpsample<B> {
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            conv: conv3(channels, channels, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let up = interpolate(
            x,
            [2 * h, 2 * w],
            InterpolateOptions::new(InterpolateMode::Nearest),
        );
        crate::amp::conv2d(&self.conv, up)
    }
}

/// diffusers `DownEncoderBlock2D`.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D<B: Backend> {
    pub resnets: Vec<VaeResnetBlock<B>>,
    /// One downsampler, or none for the last block.
    pub downsamplers: Vec<VaeDownsample<B>>,
}

impl<B: Backend> DownEncoderBlock2D<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.resnets.iter().fold(x, |x, r| r.forward(x));
        self.downsamplers.iter().fold(x, |x, d| d.forward(x))
    }
}

/// diffusers `UpDecoderBlock2D`.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D<B: Backend> {
    pub resnets: Vec<VaeResnetBlock<B>>,
    /// One upsampler, or none for the last block.
    pub upsamplers: Vec<VaeUpsample<B>>,
}

impl<B: Backend> UpDecoderBlock2D<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.resnets.iter().fold(x, |x, r| r.forward(x));
        self.upsamplers.iter().fold(x, |x, u| u.forward(x))
    }
}

/// diffusers `UNetMidBlock2D` with `temb_channels=None` (one layer: resnet, attention, resnet).
#[derive(Module, Debug)]
pub struct VaeMidBlock<B: Backend> {
    pub resnets: Vec<VaeResnetBlock<B>>,
    /// Empty when `mid_block_add_attention` is false.
    pub attentions: Vec<VaeAttention<B>>,
}

impl<B: Backend> VaeMidBlock<B> {
    pub fn new(channels: usize, groups: usize, add_attention: bool, device: &B::Device) -> Self {
        Self {
            resnets: (0..2)
                .map(|_| VaeResnetBlock::new(channels, channels, groups, device))
                .collect(),
            // attention_head_dim = channels → one head.
            attentions: if add_attention {
                vec![VaeAttention::new(channels, groups, 1, device)]
            } else {
                Vec::new()
            },
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x);
        for (i, resnet) in self.resnets.iter().skip(1).enumerate() {
            if let Some(attn) = self.attentions.get(i) {
                x = attn.forward(x);
            }
            x = resnet.forward(x);
        }
        x
    }
}

/// diffusers `Encoder` with `double_z=True`.
#[derive(Module, Debug)]
pub struct VaeEncoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub down_blocks: Vec<DownEncoderBlock2D<B>>,
    pub mid_block: VaeMidBlock<B>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> VaeEncoder<B> {
    pub fn new(cfg: &VaeConfig, device: &B::Device) -> Self {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut c_prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let last = i + 1 == ch.len();
            let resnets = (0..cfg.layers_per_block)
                .map(|j| VaeResnetBlock::new(if j == 0 { c_prev } else { c }, c, g, device))
                .collect();
            let downsamplers = if last {
                Vec::new()
            } else {
                vec![VaeDownsample::new(c, device)]
            };
            down_blocks.push(DownEncoderBlock2D {
                resnets,
                downsamplers,
            });
            c_prev = c;
        }
        let top = ch[ch.len() - 1];
        Self {
            conv_in: conv3(cfg.in_channels, ch[0], device),
            down_blocks,
            mid_block: VaeMidBlock::new(top, g, cfg.mid_block_add_attention, device),
            conv_norm_out: group_norm(g, top, device),
            conv_out: conv3(top, 2 * cfg.latent_channels, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = crate::amp::conv2d(&self.conv_in, x);
        let x = self.down_blocks.iter().fold(x, |x, b| b.forward(x));
        let x = self.mid_block.forward(x);
        crate::amp::conv2d(
            &self.conv_out,
            crate::nn::group_norm_silu(&self.conv_norm_out, x),
        )
    }
}

/// diffusers `Decoder` (`norm_type="group"`).
#[derive(Module, Debug)]
pub struct VaeDecoder<B: Backend> {
    pub conv_in: Conv2d<B>,
    pub mid_block: VaeMidBlock<B>,
    pub up_blocks: Vec<UpDecoderBlock2D<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> VaeDecoder<B> {
    pub fn new(cfg: &VaeConfig, device: &B::Device) -> Self {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut c_prev = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let last = i + 1 == rev.len();
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| VaeResnetBlock::new(if j == 0 { c_prev } else { c }, c, g, device))
                .collect();
            let upsamplers = if last {
                Vec::new()
            } else {
                vec![VaeUpsample::new(c, device)]
            };
            up_blocks.push(UpDecoderBlock2D {
                resnets,
                upsamplers,
            });
            c_prev = c;
        }
        let bottom = cfg.block_out_channels[0];
        Self {
            conv_in: conv3(cfg.latent_channels, rev[0], device),
            mid_block: VaeMidBlock::new(rev[0], g, cfg.mid_block_add_attention, device),
            up_blocks,
            conv_norm_out: group_norm(g, bottom, device),
            conv_out: conv3(bottom, cfg.out_channels, device),
        }
    }

    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = crate::amp::conv2d(&self.conv_in, z);
        let x = self.mid_block.forward(x);
        let x = self.up_blocks.iter().fold(x, |x, b| b.forward(x));
        crate::amp::conv2d(
            &self.conv_out,
            crate::nn::group_norm_silu(&self.conv_norm_out, x),
        )
    }
}

/// The VAE posterior `N(mean, exp(logvar))` (diffusers `DiagonalGaussianDistribution`).
#[derive(Debug, Clone)]
pub struct DiagonalGaussian<B: Backend> {
    pub mean: Tensor<B, 4>,
    /// Clamped to `[-30, 20]` as diffusers does.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> DiagonalGaussian<B> {
    /// Split `[B, 2C, H, W]` moments into mean and (clamped) log-variance.
    pub fn from_moments(moments: Tensor<B, 4>) -> Self {
        let [b, c2, h, w] = moments.dims();
        let c = c2 / 2;
        let mean = moments.clone().slice([0..b, 0..c, 0..h, 0..w]);
        let logvar = moments.slice([0..b, c..c2, 0..h, 0..w]).clamp(-30.0, 20.0);
        Self { mean, logvar }
    }

    /// The mean (diffusers `mode()`).
    pub fn mean(&self) -> Tensor<B, 4> {
        self.mean.clone()
    }

    /// Same as [`Self::mean`], for diffusers' name.
    pub fn mode(&self) -> Tensor<B, 4> {
        self.mean.clone()
    }

    pub fn std(&self) -> Tensor<B, 4> {
        (self.logvar.clone() * 0.5).exp()
    }

    pub fn var(&self) -> Tensor<B, 4> {
        self.logvar.clone().exp()
    }

    /// `mean + std · noise`, with standard-normal `noise` of the mean's shape supplied by the caller
    /// (so runs are reproducible and the RNG stays with the caller).
    pub fn sample(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        assert_eq!(
            noise.dims(),
            self.mean.dims(),
            "DiagonalGaussian::sample: noise shape must equal the mean's"
        );
        self.mean.clone() + self.std() * noise
    }

    /// KL divergence to the standard normal, summed over C, H, W: `[B]`.
    pub fn kl(&self) -> Tensor<B, 1> {
        let t = self.mean.clone().powf_scalar(2.0) + self.var() - 1.0 - self.logvar.clone();
        let [b, c, h, w] = t.dims();
        t.reshape([b, c * h * w]).sum_dim(1).reshape([b]) * 0.5
    }
}

/// diffusers `AutoencoderKL`.
#[derive(Module, Debug)]
pub struct AutoencoderKL<B: Backend> {
    pub encoder: VaeEncoder<B>,
    pub decoder: VaeDecoder<B>,
    pub quant_conv: Option<Conv2d<B>>,
    pub post_quant_conv: Option<Conv2d<B>>,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
}

impl<B: Backend> AutoencoderKL<B> {
    fn new(cfg: &VaeConfig, device: &B::Device) -> Self {
        let l = cfg.latent_channels;
        Self {
            encoder: VaeEncoder::new(cfg, device),
            decoder: VaeDecoder::new(cfg, device),
            quant_conv: cfg
                .use_quant_conv
                .then(|| conv(2 * l, 2 * l, 1, PaddingConfig2d::Valid, device)),
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv(l, l, 1, PaddingConfig2d::Valid, device)),
            scaling_factor: cfg.scaling_factor,
            shift_factor: cfg.shift_factor,
        }
    }

    /// Images `[B, in, H, W]` (in `[-1, 1]`) → posterior over `[B, latent, H/f, W/f]`.
    pub fn encode(&self, x: Tensor<B, 4>) -> DiagonalGaussian<B> {
        let h = self.encoder.forward(x);
        let h = match &self.quant_conv {
            Some(c) => crate::amp::conv2d(c, h),
            None => h,
        };
        DiagonalGaussian::from_moments(h)
    }

    /// Unscaled latents `[B, latent, h, w]` → images `[B, out, h·f, w·f]` (roughly in `[-1, 1]`).
    pub fn decode(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = match &self.post_quant_conv {
            Some(c) => crate::amp::conv2d(c, z),
            None => z,
        };
        self.decoder.forward(z)
    }

    /// diffusers `AutoencoderKL.forward`: encode, take the posterior sample (with `noise`) or its mean
    /// (`None`), decode.
    pub fn forward(&self, x: Tensor<B, 4>, noise: Option<Tensor<B, 4>>) -> Tensor<B, 4> {
        let post = self.encode(x);
        let z = match noise {
            Some(n) => post.sample(n),
            None => post.mean(),
        };
        self.decode(z)
    }

    /// Latents as the diffusion model sees them: `(z - shift) · scaling_factor` with `z` the posterior
    /// sample for `noise` (training, as LAVIS/diffusers `latent_dist.sample()`) or its mean (`None`).
    pub fn encode_latents(&self, x: Tensor<B, 4>, noise: Option<Tensor<B, 4>>) -> Tensor<B, 4> {
        let post = self.encode(x);
        let z = match noise {
            Some(n) => post.sample(n),
            None => post.mean(),
        };
        let z = match self.shift_factor {
            Some(s) => z - s,
            None => z,
        };
        z * self.scaling_factor
    }

    /// Inverse of [`Self::encode_latents`]'s scaling, then decode: `decode(z / scaling_factor + shift)`.
    pub fn decode_latents(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = z / self.scaling_factor;
        let z = match self.shift_factor {
            Some(s) => z + s,
            None => z,
        };
        self.decode(z)
    }

    /// Reference key names (diffusers, current or legacy attention names) → our module paths.
    pub fn key_map() -> KeyMap {
        KeyMap::new(&[
            (r"\.to_out\.0\.", ".to_out."),
            (r"(attentions\.\d+)\.query\.", "$1.to_q."),
            (r"(attentions\.\d+)\.key\.", "$1.to_k."),
            (r"(attentions\.\d+)\.value\.", "$1.to_v."),
            (r"(attentions\.\d+)\.proj_attn\.", "$1.to_out."),
        ])
    }

    /// Our module paths → current diffusers key names.
    pub fn reverse_key_map() -> KeyMap {
        KeyMap::new(&[(r"\.to_out\.", ".to_out.0.")])
    }

    /// Build from `cfg` and a diffusers-layout state dict (strict: every key must match).
    pub fn from_state_dict(
        cfg: &VaeConfig,
        sd: StateDict,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let model = cfg.init(device)?;
        Ok(load_strict(model, sd, &Self::key_map(), "vae")?)
    }

    /// Load a diffusers component folder (`vae/` with `config.json` and a weight file).
    pub fn load(dir: &ComponentDir, device: &B::Device) -> Result<(Self, VaeConfig), ModelError> {
        let cfg = VaeConfig::from_file(&dir.config_path())?;
        let model = Self::from_state_dict(&cfg, dir.state_dict()?, device)?;
        Ok((model, cfg))
    }

    /// Save in the diffusers layout (safetensors).
    pub fn save(&self, path: &std::path::Path) -> Result<(), ModelError> {
        Ok(save_safetensors(self, &Self::reverse_key_map(), path)?)
    }

    /// Save as a diffusers component folder (`config.json` + `diffusion_pytorch_model.safetensors`),
    /// what [`Self::load`] reads.
    pub fn save_diffusers(
        &self,
        config: &VaeConfig,
        dir: &std::path::Path,
    ) -> Result<(), ModelError> {
        crate::unet::save_component(self, config, &Self::reverse_key_map(), dir, "AutoencoderKL")
    }
}

/// A batch of 8-bit images, `NHWC`, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uint8Images {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Uint8Images {
    /// The `i`-th image, `H·W·C` bytes.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.height * self.width * self.channels;
        &self.data[i * n..(i + 1) * n]
    }
}

/// diffusers `VaeImageProcessor.postprocess` + `numpy_to_pil`: `(x/2 + 0.5).clamp(0, 1)`, `× 255`,
/// round half to even (numpy), as `u8`, NCHW → NHWC. NaN maps to 0.
pub fn to_uint8_image<B: Backend>(x: Tensor<B, 4>) -> Result<Uint8Images, ModelError> {
    let [b, c, h, w] = x.dims();
    let values = x
        .swap_dims(1, 2)
        .swap_dims(2, 3)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| ModelError::Invalid(format!("to_uint8_image: reading tensor: {e:?}")))?;
    let data = values
        .into_iter()
        .map(|v| {
            let v = (v * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0;
            // NaN survives clamp; `as u8` maps it to 0.
            v.round_ties_even() as u8
        })
        .collect();
    Ok(Uint8Images {
        batch: b,
        height: h,
        width: w,
        channels: c,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    type B = burn::backend::NdArray<f32>;

    #[test]
    fn sd15_config_matches_diffusers_json() {
        let json = r#"{
          "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
          "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
          "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
          "out_channels": 3, "sample_size": 512,
          "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
        }"#;
        let cfg: VaeConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg, VaeConfig::sd15());
        assert_eq!(cfg.downsample_factor(), 8);
        cfg.validate().unwrap();
    }

    #[test]
    fn validate_rejects_unsupported() {
        let mut c = VaeConfig::tiny();
        c.up_block_types[0] = "AttnUpDecoderBlock2D".into();
        assert!(c.validate().is_err());
        let mut c = VaeConfig::tiny();
        c.norm_num_groups = 5;
        assert!(c.validate().is_err());
        let mut c = VaeConfig::tiny();
        c.block_out_channels.pop();
        assert!(c.validate().is_err());
    }

    #[test]
    fn posterior_clamps_logvar_and_samples() {
        let dev = Default::default();
        let moments =
            Tensor::<B, 1>::from_floats([1.0, -2.0, -100.0, 50.0], &dev).reshape([1, 4, 1, 1]);
        let post = DiagonalGaussian::from_moments(moments);
        let lv = post.logvar.clone().into_data().to_vec::<f32>().unwrap();
        assert_eq!(lv, vec![-30.0, 20.0]);
        let noise = Tensor::<B, 1>::from_floats([1.0, -1.0], &dev).reshape([1, 2, 1, 1]);
        let s = post.sample(noise).into_data().to_vec::<f32>().unwrap();
        assert!((s[0] - (1.0 + (-15.0f32).exp())).abs() < 1e-6);
        assert!((s[1] - (-2.0 - 10.0f32.exp())).abs() < 1e-1);
    }

    #[test]
    fn uint8_rounds_half_to_even_and_clamps() {
        let dev = Default::default();
        // x = 2·(k/255) - 1 gives exactly k after the map; 0.5/255 offsets test ties and clamping.
        let vals = [-1.0f32, 1.0, 3.0, -7.0, f32::NAN, 0.0];
        let x = Tensor::<B, 1>::from_floats(vals, &dev).reshape([1, 1, 2, 3]);
        let img = to_uint8_image(x).unwrap();
        assert_eq!(
            (img.batch, img.height, img.width, img.channels),
            (1, 2, 3, 1)
        );
        // 0.0 → 0.5·255 = 127.5 → 128 (ties to even)
        assert_eq!(img.data, vec![0, 255, 255, 0, 0, 128]);
    }

    #[test]
    fn downsample_pads_right_and_bottom_only() {
        let dev = Default::default();
        let d = VaeDownsample::<B>::new(1, &dev);
        let x = Tensor::<B, 4>::ones([1, 1, 5, 5], &dev);
        assert_eq!(d.forward(x).dims(), [1, 1, 2, 2]);
        let x = Tensor::<B, 4>::ones([1, 1, 8, 8], &dev);
        assert_eq!(d.forward(x).dims(), [1, 1, 4, 4]);
    }
}
