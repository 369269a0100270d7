//! Convolutional blocks of the SD U-Net (diffusers `ResnetBlock2D`, `Downsample2D`, `Upsample2D`,
//! `TimestepEmbedding`, the sinusoidal `Timesteps` projection) and the down / mid / up blocks built
//! from them (`CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D` / `UpBlock2D`). Shared with [`crate::controlnet`].

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use super::attention::{AttentionContext, Transformer2DModel, UNetPlace};
use crate::nn::{group_norm_silu, linear, silu};

/// A PyTorch-style `nn.Conv2d(c_in, c_out, k, stride, padding)` (symmetric padding).
pub fn conv2d<B: Backend>(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    device: &B::Device,
) -> Conv2d<B> {
    Conv2dConfig::new([c_in, c_out], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .init(device)
}

/// Sinusoidal timestep embedding, as diffusers `get_timestep_embedding` (`Timesteps` module):
/// `freq_i = exp(-ln(10000) · i / (half − shift))` computed in f32, `[sin(t·f), cos(t·f)]`, swapped to
/// `[cos, sin]` when `flip_sin_to_cos`, zero-padded when `dim` is odd. `timesteps`: `[N]` → `[N, dim]`.
pub fn timestep_embedding<B: Backend>(
    timesteps: Tensor<B, 1>,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor<B, 2> {
    let device = timesteps.device();
    let [n] = timesteps.dims();
    let half = dim / 2;
    // torch: exponent = -ln(max_period) * arange(half, f32) / (half - shift), all in f32.
    let neg_log = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((neg_log * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::<B, 1>::from_floats(freqs.as_slice(), &device).reshape([1, half]);
    let args = timesteps.reshape([n, 1]) * freqs;
    let (first, second) = if flip_sin_to_cos {
        (args.clone().cos(), args.sin())
    } else {
        (args.clone().sin(), args.cos())
    };
    let mut parts = vec![first, second];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros([n, 1], &device));
    }
    Tensor::cat(parts, 1)
}

/// diffusers `TimestepEmbedding`: `linear_2(silu(linear_1(t_emb)))`.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    pub fn new(in_dim: usize, time_embed_dim: usize, device: &B::Device) -> Self {
        Self {
            linear_1: linear(in_dim, time_embed_dim, true, device),
            linear_2: linear(time_embed_dim, time_embed_dim, true, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        crate::amp::linear(&self.linear_2, silu(crate::amp::linear(&self.linear_1, x)))
    }
}

/// diffusers `ResnetBlock2D` with `time_embedding_norm="default"`, SiLU, pre-norm:
/// `(shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / output_scale_factor`.
/// `time_emb_proj` is `None` for blocks without a time embedding (e.g. a VAE).
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    pub norm1: GroupNorm<B>,
    pub conv1: Conv2d<B>,
    pub time_emb_proj: Option<Linear<B>>,
    pub norm2: GroupNorm<B>,
    pub conv2: Conv2d<B>,
    pub conv_shortcut: Option<Conv2d<B>>,
    pub output_scale_factor: f64,
}

impl<B: Backend> ResnetBlock2D<B> {
    pub fn new(
        c_in: usize,
        c_out: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
        device: &B::Device,
    ) -> Self {
        Self {
            norm1: GroupNormConfig::new(groups, c_in)
                .with_epsilon(eps)
                .init(device),
            conv1: conv2d(c_in, c_out, 3, 1, 1, device),
            time_emb_proj: temb_channels.map(|t| linear(t, c_out, true, device)),
            norm2: GroupNormConfig::new(groups, c_out)
                .with_epsilon(eps)
                .init(device),
            conv2: conv2d(c_out, c_out, 3, 1, 1, device),
            conv_shortcut: (c_in != c_out).then(|| conv2d(c_in, c_out, 1, 1, 0, device)),
            output_scale_factor,
        }
    }

    /// `x`: `[B, C_in, H, W]`, `temb`: `[B, temb_channels]` (ignored without `time_emb_proj`).
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<Tensor<B, 2>>) -> Tensor<B, 4> {
        let mut h = crate::amp::conv2d(&self.conv1, group_norm_silu(&self.norm1, x.clone()));
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = crate::amp::linear(proj, silu(temb));
            let [b, c] = t.dims();
            h = h + t.reshape([b, c, 1, 1]);
        }
        let h = crate::amp::conv2d(&self.conv2, group_norm_silu(&self.norm2, h));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => crate::amp::conv2d(conv, x),
            None => x,
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers `Downsample2D(use_conv=True)`: 3×3 conv, stride 2, padding `downsample_padding`
/// (padding 0 pads right/bottom by one first, as diffusers).
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    pub conv: Conv2d<B>,
}

impl<B: Backend> Downsample2D<B> {
    pub fn new(channels: usize, padding: usize, device: &B::Device) -> Self {
        let pad = if padding == 0 {
            PaddingConfig2d::Explicit(0, 0, 1, 1)
        } else {
            PaddingConfig2d::Explicit(padding, padding, padding, padding)
        };
        Self {
            conv: Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                .with_padding(pad)
                .init(device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        crate::amp::conv2d(&self.conv, x)
    }
}

/// diffusers `Upsample2D(use_conv=True)`: nearest upsampling to `size` (2× by default), 3×3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    pub conv: Conv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            conv: conv2d(channels, channels, 3, 1, 1, device),
        }
    }

    /// `size`: output `[H, W]` (diffusers' `upsample_size`); `None` doubles the input.
    pub fn forward(&self, x: Tensor<B, 4>, size: Option<[usize; 2]>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let size = size.unwrap_or([2 * h, 2 * w]);
        let x = interpolate(x, size, InterpolateOptions::new(InterpolateMode::Nearest));
        crate::amp::conv2d(&self.conv, x)
    }
}

/// Shape of one down or up block (what diffusers' `get_down_block` / `get_up_block` receive).
#[derive(Debug, Clone)]
pub struct BlockSpec {
    /// Down: block input channels. Up: channels of the deepest skip this block consumes
    /// (diffusers' `in_channels` of up blocks).
    pub in_channels: usize,
    pub out_channels: usize,
    /// Up blocks only: channels coming from the previous (deeper) block.
    pub prev_output_channels: usize,
    pub temb_channels: usize,
    pub num_layers: usize,
    pub transformer_layers: usize,
    pub heads: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub eps: f64,
    /// `CrossAttn*Block2D` (true) or plain `DownBlock2D` / `UpBlock2D` (false).
    pub cross_attention: bool,
    /// Add a downsampler (down) / upsampler (up).
    pub resample: bool,
    pub downsample_padding: usize,
    pub output_scale_factor: f64,
}

/// `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (empty `attentions`).
#[derive(Module, Debug)]
pub struct DownBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
    pub downsamplers: Vec<Downsample2D<B>>,
}

impl<B: Backend> DownBlock2D<B> {
    pub fn new(spec: &BlockSpec, device: &B::Device) -> Self {
        let resnets = (0..spec.num_layers)
            .map(|i| {
                let c_in = if i == 0 {
                    spec.in_channels
                } else {
                    spec.out_channels
                };
                ResnetBlock2D::new(
                    c_in,
                    spec.out_channels,
                    Some(spec.temb_channels),
                    spec.groups,
                    spec.eps,
                    spec.output_scale_factor,
                    device,
                )
            })
            .collect();
        let attentions = if spec.cross_attention {
            (0..spec.num_layers)
                .map(|_| {
                    Transformer2DModel::new(
                        spec.out_channels,
                        spec.heads,
                        spec.transformer_layers,
                        spec.cross_attention_dim,
                        spec.groups,
                        device,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        let downsamplers = if spec.resample {
            vec![Downsample2D::new(
                spec.out_channels,
                spec.downsample_padding,
                device,
            )]
        } else {
            Vec::new()
        };
        Self {
            resnets,
            attentions,
            downsamplers,
        }
    }

    pub fn has_cross_attention(&self) -> bool {
        !self.attentions.is_empty()
    }

    /// Returns the block output and the skip tensors it contributes (one per resnet, plus the
    /// downsampler output).
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: Tensor<B, 2>,
        context: Tensor<B, 3>,
        actx: &mut AttentionContext<'_, B>,
        block_index: usize,
    ) -> (Tensor<B, 4>, Vec<Tensor<B, 4>>) {
        actx.enter(UNetPlace::Down, block_index);
        let mut x = x;
        let mut skips = Vec::with_capacity(self.resnets.len() + self.downsamplers.len());
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                actx.set_attention(i);
                x = attn.forward(x, context.clone(), actx);
            }
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        (x, skips)
    }

    pub fn num_attention_layers(&self) -> usize {
        self.attentions
            .iter()
            .map(Transformer2DModel::num_attention_layers)
            .sum()
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) × layers.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
}

impl<B: Backend> UNetMidBlock2DCrossAttn<B> {
    /// `spec.in_channels` = `spec.out_channels` = the deepest width; `num_layers` attentions (1 in SD).
    pub fn new(spec: &BlockSpec, device: &B::Device) -> Self {
        let c = spec.in_channels;
        let resnet = || {
            ResnetBlock2D::new(
                c,
                c,
                Some(spec.temb_channels),
                spec.groups,
                spec.eps,
                spec.output_scale_factor,
                device,
            )
        };
        Self {
            resnets: (0..=spec.num_layers).map(|_| resnet()).collect(),
            attentions: (0..spec.num_layers)
                .map(|_| {
                    Transformer2DModel::new(
                        c,
                        spec.heads,
                        spec.transformer_layers,
                        spec.cross_attention_dim,
                        spec.groups,
                        device,
                    )
                })
                .collect(),
        }
    }

    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        temb: Tensor<B, 2>,
        context: Tensor<B, 3>,
        actx: &mut AttentionContext<'_, B>,
    ) -> Tensor<B, 4> {
        actx.enter(UNetPlace::Mid, 0);
        let mut x = self.resnets[0].forward(x, Some(temb.clone()));
        for (i, (attn, resnet)) in self.attentions.iter().zip(&self.resnets[1..]).enumerate() {
            actx.set_attention(i);
            x = attn.forward(x, context.clone(), actx);
            x = resnet.forward(x, Some(temb.clone()));
        }
        x
    }

    pub fn num_attention_layers(&self) -> usize {
        self.attentions
            .iter()
            .map(Transformer2DModel::num_attention_layers)
            .sum()
    }
}

/// `CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D` (empty `attentions`).
#[derive(Module, Debug)]
pub struct UpBlock2D<B: Backend> {
    pub resnets: Vec<ResnetBlock2D<B>>,
    pub attentions: Vec<Transformer2DModel<B>>,
    pub upsamplers: Vec<Upsample2D<B>>,
}

impl<B: Backend> UpBlock2D<B> {
    /// `spec.num_layers` here is diffusers' `layers_per_block + 1`.
    pub fn new(spec: &BlockSpec, device: &B::Device) -> Self {
        let n = spec.num_layers;
        let resnets = (0..n)
            .map(|i| {
                let skip = if i == n - 1 {
                    spec.in_channels
                } else {
                    spec.out_channels
                };
                let c_in = if i == 0 {
                    spec.prev_output_channels
                } else {
                    spec.out_channels
                };
                ResnetBlock2D::new(
                    c_in + skip,
                    spec.out_channels,
                    Some(spec.temb_channels),
                    spec.groups,
                    spec.eps,
                    spec.output_scale_factor,
                    device,
                )
            })
            .collect();
        let attentions = if spec.cross_attention {
            (0..n)
                .map(|_| {
                    Transformer2DModel::new(
                        spec.out_channels,
                        spec.heads,
                        spec.transformer_layers,
                        spec.cross_attention_dim,
                        spec.groups,
                        device,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        let upsamplers = if spec.resample {
            vec![Upsample2D::new(spec.out_channels, device)]
        } else {
            Vec::new()
        };
        Self {
            resnets,
            attentions,
            upsamplers,
        }
    }

    pub fn has_cross_attention(&self) -> bool {
        !self.attentions.is_empty()
    }

    /// `skips`: this block's skip tensors in the order they were produced (the last is consumed
    /// first). `upsample_size`: output size of the upsampler (the next skip's size).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        mut skips: Vec<Tensor<B, 4>>,
        temb: Tensor<B, 2>,
        context: Tensor<B, 3>,
        upsample_size: Option<[usize; 2]>,
        actx: &mut AttentionContext<'_, B>,
        block_index: usize,
    ) -> Tensor<B, 4> {
        assert_eq!(
            skips.len(),
            self.resnets.len(),
            "up block {block_index}: {} skip tensors for {} resnets",
            skips.len(),
            self.resnets.len()
        );
        actx.enter(UNetPlace::Up, block_index);
        let mut x = x;
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("length checked above");
            x = resnet.forward(Tensor::cat(vec![x, skip], 1), Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                actx.set_attention(i);
                x = attn.forward(x, context.clone(), actx);
            }
        }
        for up in &self.upsamplers {
            x = up.forward(x, upsample_size);
        }
        x
    }

    pub fn num_attention_layers(&self) -> usize {
        self.attentions
            .iter()
            .map(Transformer2DModel::num_attention_layers)
            .sum()
    }
}
