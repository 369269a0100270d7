//! BLIP-Diffusion's image encoder: OpenAI CLIP ViT-L/14 truncated to 23 blocks, plus BLIP-2's
//! `ln_vision`, in the layout of diffusers' `Blip2VisionModel` (the `visual_encoder` of the
//! `qformer/` component of `Salesforce/blipdiffusion`).
//!
//! References: diffusers 0.33.1 `pipelines/blip_diffusion/modeling_blip2.py::Blip2VisionModel` (which
//! reuses transformers 4.44.2 `Blip2Encoder`/`Blip2Attention`/`Blip2MLP`), and LAVIS
//! `lavis/models/clip_vit.py::VisionTransformer` + `Blip2Base.ln_vision`.
//!
//! Forward (`[B, 3, H, W]` → `[B, N+1, D]`, all tokens kept):
//! 1. `patch_embedding` (conv, kernel = stride = patch, no bias) → `[B, N, D]` patches,
//!    prepend `class_embedding`, add `position_embedding` (`[1, N+1, D]`);
//! 2. `pre_layernorm` (LAVIS `ln_pre`);
//! 3. `num_hidden_layers` pre-LN blocks: `x += proj(attn(LN1(x)))` with a fused `qkv` linear (rows
//!    q | k | v), `x += fc2(act(fc1(LN2(x))))`, act = `quick_gelu` for CLIP;
//! 4. `post_layernorm` (LAVIS `ln_vision`, outside the ViT in LAVIS). No CLIP `ln_post`, no projection.
//!
//! LayerNorm eps differs between the two references: diffusers/transformers use `layer_norm_eps`
//! (default 1e-6, not overridden in the BLIP-Diffusion config), LAVIS uses torch's 1e-5 everywhere —
//! [`Blip2VisionConfig::blipdiffusion_lavis`] reproduces LAVIS numbers.

use crate::nn::{LayerNorm, LayerNormConfig};
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation;
use serde::{Deserialize, Serialize};

use crate::nn::{attention_probs, linear, merge_heads, quick_gelu, split_heads};
use crate::weights::{load_strict, save_safetensors, KeyMap, StateDict};
use crate::ModelError;

/// transformers `Blip2VisionConfig` (json field names). Missing fields take transformers 4.44.2's
/// defaults (the EVA ViT-g of BLIP-2, *not* BLIP-Diffusion's CLIP ViT-L: use the presets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Blip2VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub attention_dropout: f64,
    pub initializer_range: f64,
    pub qkv_bias: bool,
}

impl Default for Blip2VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1408,
            intermediate_size: 6144,
            num_hidden_layers: 39,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            attention_dropout: 0.0,
            initializer_range: 1e-10,
            qkv_bias: true,
        }
    }
}

impl Blip2VisionConfig {
    /// `Salesforce/blipdiffusion` `qformer/config.json` → `vision_config`: hidden 1024, intermediate 4096,
    /// 23 layers, `quick_gelu`; the rest transformers defaults (16 heads, 224 px, patch 14, eps 1e-6,
    /// `qkv_bias`). Same numbers as `BLIP2_CONFIG` in diffusers' `scripts/convert_blipdiffusion_to_diffusers.py`.
    pub fn blipdiffusion() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            image_size: 224,
            patch_size: 14,
            hidden_act: "quick_gelu".into(),
            ..Self::default()
        }
    }

    /// [`Self::blipdiffusion`] with LAVIS's LayerNorm eps (1e-5, torch default in `clip_vit.py` and
    /// `ln_vision`): reproduces LAVIS's `BlipDiffusion` numerics.
    pub fn blipdiffusion_lavis() -> Self {
        Self {
            layer_norm_eps: 1e-5,
            ..Self::blipdiffusion()
        }
    }

    /// Tiny tower for tests: width 32, 4 heads, 2 layers, MLP 64, 28×28 px with patch 7 (17 tokens).
    pub fn tiny() -> Self {
        Self {
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 28,
            patch_size: 7,
            hidden_act: "quick_gelu".into(),
            ..Self::default()
        }
    }

    /// Number of patches per image (`(image_size / patch_size)²`).
    pub fn num_patches(&self) -> usize {
        let g = self.image_size / self.patch_size;
        g * g
    }

    /// Sequence length of the output (`num_patches + 1`, 257 for ViT-L/14 at 224 px).
    pub fn num_positions(&self) -> usize {
        self.num_patches() + 1
    }

    pub fn validate(&self) -> Result<HiddenAct, ModelError> {
        let bad = |m: String| Err(ModelError::Invalid(format!("Blip2VisionConfig: {m}")));
        if self.hidden_size == 0 || self.num_attention_heads == 0 {
            return bad("zero hidden_size or num_attention_heads".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return bad(format!(
                "image_size {} / patch_size {} gives no patch",
                self.image_size, self.patch_size
            ));
        }
        if !(0.0..=1.0).contains(&self.attention_dropout) {
            return bad(format!(
                "attention_dropout {} not in [0, 1]",
                self.attention_dropout
            ));
        }
        HiddenAct::parse(&self.hidden_act)
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Blip2VisionModel<B>, ModelError> {
        let act = self.validate()?;
        let d = self.hidden_size;
        let ln = |device: &B::Device| {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let layers = (0..self.num_hidden_layers)
            .map(|_| VisionEncoderLayer {
                self_attn: VisionAttention {
                    qkv: linear(d, 3 * d, self.qkv_bias, device),
                    projection: linear(d, d, true, device),
                    dropout: DropoutConfig::new(self.attention_dropout).init(),
                    num_heads: self.num_attention_heads,
                },
                layer_norm1: ln(device),
                mlp: VisionMlp {
                    fc1: linear(d, self.intermediate_size, true, device),
                    fc2: linear(self.intermediate_size, d, true, device),
                    act,
                },
                layer_norm2: ln(device),
            })
            .collect();
        Ok(Blip2VisionModel {
            embeddings: VisionEmbeddings {
                class_embedding: Param::from_tensor(Tensor::zeros([1, 1, d], device)),
                patch_embedding: Conv2dConfig::new([3, d], [self.patch_size, self.patch_size])
                    .with_stride([self.patch_size, self.patch_size])
                    .with_bias(false)
                    .init(device),
                position_embedding: Param::from_tensor(Tensor::zeros(
                    [1, self.num_positions(), d],
                    device,
                )),
            },
            pre_layernorm: ln(device),
            encoder: VisionEncoder { layers },
            post_layernorm: ln(device),
        })
    }
}

/// transformers `ACT2FN` names used by BLIP-2 configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAct {
    /// `gelu`: exact erf GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x·σ(1.702x)` (CLIP).
    QuickGelu,
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl HiddenAct {
    pub fn parse(name: &str) -> Result<Self, ModelError> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => {
                return Err(ModelError::Invalid(format!(
                    "hidden_act `{other}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, quick_gelu, relu, silu)"
                )))
            }
        })
    }

    pub fn apply<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Gelu => crate::nn::gelu(x),
            Self::GeluTanh => activation::gelu_approximate(x),
            Self::QuickGelu => quick_gelu(x),
            Self::Relu => activation::relu(x),
            Self::Silu => activation::silu(x),
        }
    }
}

/// diffusers `Blip2VisionModel`: embeddings → `pre_layernorm` → encoder → `post_layernorm`.
#[derive(Module, Debug)]
pub struct Blip2VisionModel<B: Backend> {
    pub embeddings: VisionEmbeddings<B>,
    pub pre_layernorm: LayerNorm<B>,
    pub encoder: VisionEncoder<B>,
    pub post_layernorm: LayerNorm<B>,
}

/// `Blip2VisionEmbeddings`: class token, patch conv, learned absolute positions.
#[derive(Module, Debug)]
pub struct VisionEmbeddings<B: Backend> {
    /// `[1, 1, D]` (LAVIS stores `[D]`; the LAVIS loader reshapes).
    pub class_embedding: Param<Tensor<B, 3>>,
    /// Conv `[D, 3, P, P]`, stride P, no bias.
    pub patch_embedding: Conv2d<B>,
    /// `[1, N+1, D]` (LAVIS stores `[N+1, D]`).
    pub position_embedding: Param<Tensor<B, 3>>,
}

/// `Blip2Encoder` (`layers` as in transformers).
#[derive(Module, Debug)]
pub struct VisionEncoder<B: Backend> {
    pub layers: Vec<VisionEncoderLayer<B>>,
}

/// `Blip2EncoderLayer` (pre-LN residual block).
#[derive(Module, Debug)]
pub struct VisionEncoderLayer<B: Backend> {
    pub self_attn: VisionAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: VisionMlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

/// `Blip2Attention`: fused `qkv` (rows q | k | v, as LAVIS `attn.in_proj_weight`) and `projection`.
#[derive(Module, Debug)]
pub struct VisionAttention<B: Backend> {
    pub qkv: Linear<B>,
    pub projection: Linear<B>,
    pub dropout: Dropout,
    pub num_heads: usize,
}

/// `Blip2MLP`: `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct VisionMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    #[module(skip)]
    pub act: HiddenAct,
}

impl<B: Backend> VisionEmbeddings<B> {
    /// `[B, 3, H, W]` → `[B, N+1, D]`.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let patches = crate::amp::conv2d(&self.patch_embedding, pixel_values); // [B, D, g, g]
        let [b, d, gh, gw] = patches.dims();
        let patches = patches.reshape([b, d, gh * gw]).swap_dims(1, 2); // [B, N, D]
        let cls = self.class_embedding.val().expand([b, 1, d]);
        let x = Tensor::cat(vec![cls, patches], 1);
        let n = gh * gw + 1;
        let [_, max_pos, _] = self.position_embedding.dims();
        assert!(
            n <= max_pos,
            "image gives {n} tokens but the position embedding has {max_pos} (image_size too large)"
        );
        x + self.position_embedding.val().slice([0..1, 0..n, 0..d])
    }
}

impl<B: Backend> VisionAttention<B> {
    /// `[B, L, D]` → `[B, L, D]` (bidirectional, no mask).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [_, _, d] = x.dims();
        let qkv = crate::amp::linear(&self.qkv, x);
        let mut parts = qkv.chunk(3, 2).into_iter();
        let (q, k, v) = match (parts.next(), parts.next(), parts.next()) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            _ => unreachable!("chunk(3) of a 3·D axis yields three parts"),
        };
        let h = self.num_heads;
        let scale = ((d / h) as f64).powf(-0.5);
        if self.dropout.prob == 0.0 {
            // No attention dropout (CLIP's is 0): the probabilities need not exist.
            let out = crate::nn::attention_tokens(q, k, v, h, scale);
            return crate::amp::linear(&self.projection, out);
        }
        let probs = attention_probs(split_heads(q, h), split_heads(k, h), scale, None);
        let probs = self.dropout.forward(probs);
        crate::amp::linear(
            &self.projection,
            merge_heads(crate::amp::matmul(probs, split_heads(v, h))),
        )
    }
}

impl<B: Backend> VisionMlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        crate::amp::linear(&self.fc2, self.act.apply(crate::amp::linear(&self.fc1, x)))
    }
}

impl<B: Backend> VisionEncoderLayer<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

impl<B: Backend> Blip2VisionModel<B> {
    /// `pixel_values [B, 3, H, W]` (CLIP-normalised) → `last_hidden_state [B, N+1, D]` after
    /// `post_layernorm` (= LAVIS `ln_vision(visual_encoder(x))`; `[B, 257, 1024]` for BLIP-Diffusion).
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let mut x = self
            .pre_layernorm
            .forward(self.embeddings.forward(pixel_values));
        for layer in &self.encoder.layers {
            x = layer.forward(x);
        }
        self.post_layernorm.forward(x)
    }

    /// diffusers' `pooler_output`: `post_layernorm` applied once more to the CLS row of
    /// `last_hidden_state` (`[B, D]`). Unused by BLIP-Diffusion; kept for parity.
    pub fn pooled(&self, last_hidden_state: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, _, d] = last_hidden_state.dims();
        let cls = last_hidden_state.slice([0..b, 0..1, 0..d]).reshape([b, d]);
        self.post_layernorm.forward(cls)
    }

    /// Load a diffusers/transformers `Blip2VisionModel` state dict (keys as in the reference), strictly.
    pub fn load_state_dict(self, sd: StateDict) -> Result<Self, ModelError> {
        Ok(load_strict(self, sd, &key_map(), "visual_encoder")?)
    }

    /// Save in the diffusers `Blip2VisionModel` layout.
    pub fn save(&self, path: &std::path::Path) -> Result<(), ModelError> {
        Ok(save_safetensors(self, &reverse_key_map(), path)?)
    }
}

/// diffusers `Blip2VisionModel` key → our module path: the names are identical.
pub fn key_map() -> KeyMap {
    KeyMap::identity()
}

/// Our module path → diffusers key: identical.
pub fn reverse_key_map() -> KeyMap {
    KeyMap::identity()
}
