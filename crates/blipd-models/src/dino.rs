//! DINO ViT image encoder (transformers `ViTModel`, the layout of `facebook/dino-vits16`), used by the
//! DreamBench evaluation (DreamBooth's DINO score: the ViT-S/16 DINO `[CLS]` embedding).
//!
//! Reference: transformers 4.44.2 `models/vit/modeling_vit.py` (`ViTModel`). Forward
//! (`[B, 3, H, W]` → `last_hidden_state [B, 1 + N, D]`):
//! 1. `embeddings`: patch conv (kernel = stride = patch, **with** bias) → prepend `cls_token` → add
//!    `position_embeddings` (`[1, 1 + N, D]`; bicubic-interpolated for another input size with
//!    `interpolate_pos_encoding`, as transformers does — DINO's own `interpolate_pos_encoding`);
//! 2. `num_hidden_layers` pre-LN blocks: `x += attn(layernorm_before(x))`, `x += mlp(layernorm_after(x))`
//!    with separate `query`/`key`/`value`, exact GELU for DINO;
//! 3. the final `layernorm`.
//!
//! The DINO embedding is `last_hidden_state[:, 0]` ([`DinoVitModel::cls_embedding`]), the same vector as
//! the original DINO hub model's output (`norm(x)[:, 0]`). `pooler_output` is *not* it: the hub's DINO
//! checkpoints are converted with `ViTModel(config, add_pooling_layer=False)`, so `ViTModel.from_pretrained`
//! initialises `pooler.dense` at random; this port has no pooler and drops `pooler.*` keys if a file has
//! them.
//!
//! The encoder layers reuse the CLIP pre-LN layer of [`crate::clipseg`] (same math: q/k/v/out
//! projections with bias, scale `head_dim^-½`, `fc1` → act → `fc2`); [`key_map`] renames ViT's keys
//! (`attention.attention.query` → `self_attn.q_proj`, `intermediate.dense` → `mlp.fc1`, …).

use crate::nn::{LayerNorm, LayerNormConfig};
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::clipseg::{bicubic_matrix_with_scale, ClipSegLayer};
use crate::weights::{load_strict, save_safetensors, ComponentDir, KeyMap, StateDict};
use crate::ModelError;

/// transformers `ViTConfig` (json field names; missing fields take transformers 4.44.2's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DinoConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub layer_norm_eps: f64,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub qkv_bias: bool,
}

impl Default for DinoConfig {
    /// transformers 4.44.2 `ViTConfig()` (ViT-B/16 at 224).
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            layer_norm_eps: 1e-12,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            qkv_bias: true,
        }
    }
}

const ACTIVATIONS: &[&str] = &["gelu", "quick_gelu", "relu"];

impl DinoConfig {
    /// `facebook/dino-vits16` (DINO ViT-S/16, the DreamBooth/BLIP-Diffusion DINO metric): width 384,
    /// 12 layers, 6 heads, MLP 1536, 224 px, patch 16, exact GELU. `layer_norm_eps` is the `ViTConfig`
    /// default the hub file keeps (1e-12; DINO itself trained with 1e-6) — read the folder's
    /// `config.json` rather than relying on this preset for numerics.
    pub fn dino_vits16() -> Self {
        Self {
            hidden_size: 384,
            num_hidden_layers: 12,
            num_attention_heads: 6,
            intermediate_size: 1536,
            ..Self::default()
        }
    }

    /// The parity fixture's numbers (`scripts/reference/gen_dino.py`): width 32, 2 layers, 4 heads,
    /// MLP 64, 32 px with patch 8 (17 tokens), eps 1e-6.
    pub fn tiny() -> Self {
        Self {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            layer_norm_eps: 1e-6,
            image_size: 32,
            patch_size: 8,
            ..Self::default()
        }
    }

    /// Read a transformers `config.json` and check it.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ModelError> {
        let cfg: Self = crate::read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configured patch grid side (`image_size / patch_size`, 14 for ViT-S/16 at 224).
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Invalid(format!("DINO ViT config: {m}")));
        if !ACTIVATIONS.contains(&self.hidden_act.as_str()) {
            return bad(format!(
                "unsupported hidden_act `{}` (one of {ACTIVATIONS:?})",
                self.hidden_act
            ));
        }
        if self.num_attention_heads == 0
            || self.hidden_size == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} is not a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || self.image_size < self.patch_size || self.num_channels == 0 {
            return bad(format!(
                "image_size {} / patch_size {} / num_channels {} gives no patch",
                self.image_size, self.patch_size, self.num_channels
            ));
        }
        Ok(())
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<DinoVitModel<B>, ModelError> {
        self.validate()?;
        let d = self.hidden_size;
        let g = self.grid();
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let layers = (0..self.num_hidden_layers)
            .map(|_| {
                let mut l = ClipSegLayer::new(
                    d,
                    self.num_attention_heads,
                    self.intermediate_size,
                    &self.hidden_act,
                    self.layer_norm_eps,
                    device,
                );
                if !self.qkv_bias {
                    l.self_attn.q_proj.bias = None;
                    l.self_attn.k_proj.bias = None;
                    l.self_attn.v_proj.bias = None;
                }
                l
            })
            .collect();
        Ok(DinoVitModel {
            embeddings: DinoEmbeddings {
                cls_token: Param::from_tensor(Tensor::zeros([1, 1, d], device)),
                position_embeddings: Param::from_tensor(Tensor::zeros([1, g * g + 1, d], device)),
                patch_embeddings: PatchEmbeddings {
                    projection: Conv2dConfig::new(
                        [self.num_channels, d],
                        [self.patch_size, self.patch_size],
                    )
                    .with_stride([self.patch_size, self.patch_size])
                    .with_padding(PaddingConfig2d::Valid)
                    .with_bias(true)
                    .init(device),
                },
                patch_size: self.patch_size,
            },
            encoder: DinoEncoder { layers },
            layernorm: ln(),
        })
    }
}

/// `embeddings.patch_embeddings`.
#[derive(Module, Debug)]
pub struct PatchEmbeddings<B: Backend> {
    /// Conv `[D, C, P, P]`, stride P, with bias.
    pub projection: Conv2d<B>,
}

/// `embeddings` (`ViTEmbeddings`; no mask token).
#[derive(Module, Debug)]
pub struct DinoEmbeddings<B: Backend> {
    /// `[1, 1, D]`.
    pub cls_token: Param<Tensor<B, 3>>,
    /// `[1, 1 + g², D]`.
    pub position_embeddings: Param<Tensor<B, 3>>,
    pub patch_embeddings: PatchEmbeddings<B>,
    pub patch_size: usize,
}

impl<B: Backend> DinoEmbeddings<B> {
    /// Position embeddings `[1, 1 + gh·gw, D]` for a `gh × gw` patch grid: the table when it already has
    /// `gh·gw` patch rows and the image is square (transformers' condition), otherwise the patch part
    /// resampled as transformers' `interpolate_pos_encoding`: PyTorch bicubic (A = −0.75,
    /// `align_corners=False`) with `scale_factor = (g + 0.1) / g0` per axis (so source coordinates use
    /// `g0 / (g + 0.1)`, not `g0 / g`), CLS row kept.
    pub fn position_embeddings_for(&self, gh: usize, gw: usize, square: bool) -> Tensor<B, 3> {
        let table = self.position_embeddings.val();
        let [_, n, d] = table.dims();
        if n - 1 == gh * gw && square {
            return table;
        }
        let g0 = integer_sqrt(n - 1);
        let device = table.device();
        let cls = table.clone().slice([0..1, 0..1, 0..d]).reshape([1, d]);
        // [g0·g0, D] → [D, g0(y), g0(x)]
        let grid = table
            .slice([0..1, 1..n, 0..d])
            .reshape([g0 * g0, d])
            .swap_dims(0, 1)
            .reshape([d, g0, g0]);
        let matrix = |g: usize| {
            let scale = g0 as f64 / (g as f64 + 0.1);
            let w = bicubic_matrix_with_scale(g0, g, scale);
            Tensor::<B, 1>::from_floats(w.as_slice(), &device)
                .reshape([g, g0])
                .transpose()
        };
        // Along x: [D·g0, g0] @ [g0, gw] → [D, g0(y), gw]
        let x = grid
            .reshape([d * g0, g0])
            .matmul(matrix(gw))
            .reshape([d, g0, gw]);
        // Along y: [D·gw, g0] @ [g0, gh] → [D, gw, gh] → [D, gh, gw]
        let y = x
            .swap_dims(1, 2)
            .reshape([d * gw, g0])
            .matmul(matrix(gh))
            .reshape([d, gw, gh])
            .swap_dims(1, 2);
        let patches = y.reshape([d, gh * gw]).swap_dims(0, 1);
        Tensor::cat(vec![cls, patches], 0).unsqueeze::<3>()
    }

    /// `[B, C, H, W]` → `[B, 1 + N, D]`. With `interpolate` false the input must have the configured
    /// size (transformers raises otherwise); with it true any size ≥ one patch works.
    pub fn forward(
        &self,
        pixel_values: Tensor<B, 4>,
        interpolate: bool,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let [b, c, h, w] = pixel_values.dims();
        let p = self.patch_size;
        let c_expected = self.patch_embeddings.projection.weight.dims()[1];
        let n_table = self.position_embeddings.dims()[1] - 1;
        let g0 = integer_sqrt(n_table);
        if c != c_expected || h < p || w < p {
            return Err(ModelError::Invalid(format!(
                "DINO ViT: pixel_values [{b}, {c}, {h}, {w}] needs {c_expected} channels and at least one {p}×{p} patch"
            )));
        }
        if !interpolate && (h != g0 * p || w != g0 * p) {
            return Err(ModelError::Invalid(format!(
                "DINO ViT: input {h}×{w} does not match the model's {s}×{s} (preprocess to {s} or enable \
                 position interpolation)",
                s = g0 * p
            )));
        }
        let patches = crate::amp::conv2d(&self.patch_embeddings.projection, pixel_values); // [B, D, gh, gw]
        let [_, d, gh, gw] = patches.dims();
        let patches = patches.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let cls = self.cls_token.val().expand([b, 1, d]);
        let x = Tensor::cat(vec![cls, patches], 1);
        let pos = if interpolate {
            self.position_embeddings_for(gh, gw, h == w)
        } else {
            self.position_embeddings.val()
        };
        Ok(x + pos)
    }
}

fn integer_sqrt(n: usize) -> usize {
    let mut r = (n as f64).sqrt() as usize;
    while r * r > n {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= n {
        r += 1;
    }
    r
}

/// `encoder` (`layers` ← ViT's `encoder.layer`).
#[derive(Module, Debug)]
pub struct DinoEncoder<B: Backend> {
    pub layers: Vec<ClipSegLayer<B>>,
}

/// transformers `ViTModel` without the pooler.
#[derive(Module, Debug)]
pub struct DinoVitModel<B: Backend> {
    pub embeddings: DinoEmbeddings<B>,
    pub encoder: DinoEncoder<B>,
    pub layernorm: LayerNorm<B>,
}

impl<B: Backend> DinoVitModel<B> {
    /// `last_hidden_state [B, 1 + N, D]` (after the final `layernorm`) for input of the configured size.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Result<Tensor<B, 3>, ModelError> {
        self.forward_with(pixel_values, false)
    }

    /// [`Self::forward`] with transformers' `interpolate_pos_encoding` flag.
    pub fn forward_with(
        &self,
        pixel_values: Tensor<B, 4>,
        interpolate_pos_encoding: bool,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let mut x = self
            .embeddings
            .forward(pixel_values, interpolate_pos_encoding)?;
        for layer in &self.encoder.layers {
            x = layer.forward_pre_ln(x, None);
        }
        Ok(self.layernorm.forward(x))
    }

    /// The DINO image embedding: `last_hidden_state[:, 0]`, `[B, D]`.
    pub fn cls_embedding(&self, pixel_values: Tensor<B, 4>) -> Result<Tensor<B, 2>, ModelError> {
        let h = self.forward(pixel_values)?;
        let [b, _, d] = h.dims();
        Ok(h.slice([0..b, 0..1, 0..d]).reshape([b, d]))
    }

    /// Build from `cfg` and a transformers-layout state dict (strict). Drops the unused `pooler.*`
    /// (random in the hub DINO checkpoints, see the module docs); accepts a `vit.` prefix
    /// (`ViTFor…` heads' backbones), whose head keys are then unexpected.
    pub fn from_state_dict(
        cfg: &DinoConfig,
        mut sd: StateDict,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        sd.drop_keys(|k| k.starts_with("pooler.") || k.starts_with("vit.pooler."));
        let model = cfg.init(device)?;
        Ok(load_strict(model, sd, &key_map(), "dino")?)
    }

    /// Load a transformers model folder (`config.json` + `model.safetensors` or `pytorch_model.bin`).
    pub fn load(
        dir: &std::path::Path,
        device: &B::Device,
    ) -> Result<(Self, DinoConfig), ModelError> {
        let comp = ComponentDir {
            name: "dino".into(),
            dir: dir.to_path_buf(),
        };
        let cfg = DinoConfig::from_file(&comp.config_path())?;
        let model = Self::from_state_dict(&cfg, comp.state_dict()?, device)?;
        Ok((model, cfg))
    }

    /// Save in the transformers `ViTModel` layout (no pooler).
    pub fn save(&self, path: &std::path::Path) -> Result<(), ModelError> {
        Ok(save_safetensors(self, &reverse_key_map(), path)?)
    }
}

/// transformers `ViTModel` keys → our module paths.
pub fn key_map() -> KeyMap {
    KeyMap::new(&[
        (r"^vit\.", ""),
        (r"^encoder\.layer\.", "encoder.layers."),
        (r"\.attention\.attention\.query\.", ".self_attn.q_proj."),
        (r"\.attention\.attention\.key\.", ".self_attn.k_proj."),
        (r"\.attention\.attention\.value\.", ".self_attn.v_proj."),
        (r"\.attention\.output\.dense\.", ".self_attn.out_proj."),
        (r"\.intermediate\.dense\.", ".mlp.fc1."),
        (r"\.output\.dense\.", ".mlp.fc2."),
        (r"\.layernorm_before\.", ".layer_norm1."),
        (r"\.layernorm_after\.", ".layer_norm2."),
    ])
}

/// Our module paths → transformers `ViTModel` keys.
pub fn reverse_key_map() -> KeyMap {
    KeyMap::new(&[
        (r"^encoder\.layers\.", "encoder.layer."),
        (r"\.self_attn\.q_proj\.", ".attention.attention.query."),
        (r"\.self_attn\.k_proj\.", ".attention.attention.key."),
        (r"\.self_attn\.v_proj\.", ".attention.attention.value."),
        (r"\.self_attn\.out_proj\.", ".attention.output.dense."),
        (r"\.mlp\.fc1\.", ".intermediate.dense."),
        (r"\.mlp\.fc2\.", ".output.dense."),
        (r"\.layer_norm1\.", ".layernorm_before."),
        (r"\.layer_norm2\.", ".layernorm_after."),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_config_parses_to_dino_vits16() {
        // facebook/dino-vits16 config.json.
        let json = r#"{"architectures": ["ViTModel"], "attention_probs_dropout_prob": 0.0,
          "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 384, "image_size": 224,
          "initializer_range": 0.02, "intermediate_size": 1536, "layer_norm_eps": 1e-12,
          "model_type": "vit", "num_attention_heads": 6, "num_channels": 3, "num_hidden_layers": 12,
          "patch_size": 16, "qkv_bias": true, "transformers_version": "4.13.0.dev0"}"#;
        let cfg: DinoConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg, DinoConfig::dino_vits16());
        cfg.validate().unwrap();
        assert_eq!(cfg.grid(), 14);
    }

    #[test]
    fn validate_rejects_bad_configs() {
        let mut c = DinoConfig::tiny();
        c.hidden_act = "swish".into();
        assert!(c.validate().is_err());
        let mut c = DinoConfig::tiny();
        c.num_attention_heads = 5;
        assert!(c.validate().is_err());
        let mut c = DinoConfig::tiny();
        c.patch_size = 64;
        assert!(c.validate().is_err());
    }
}
