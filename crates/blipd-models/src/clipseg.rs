//! transformers `CLIPSegForImageSegmentation` (checkpoint `CIDAS/clipseg-rd64-refined`), used by the
//! pre-training data pipeline to segment the subject named by its class text.
//!
//! Module fields mirror the transformers state-dict keys (`clip.vision_model.…`, `clip.text_model.…`,
//! `clip.visual_projection`, `clip.text_projection`, `clip.logit_scale`, `decoder.…`), so the key map
//! only renames the refined head's `nn.Sequential` indices (`transposed_convolution.{0,2,4}`).
//!
//! Forward (transformers 4.44.2):
//! 1. Vision (CLIP ViT): patch conv (no bias) → prepend `class_embedding` → + position embeddings
//!    (bicubic-interpolated, `align_corners=False`, when the patch grid differs from the configured one,
//!    e.g. 22×22 at 352 px for a 14×14 table) → `pre_layrnorm` → pre-LN encoder layers. The outputs of
//!    layers `extract_layers` (0-based) are kept; later layers only feed `pooled_output`, so
//!    [`ClipSegForImageSegmentation::forward`] stops after the deepest extracted layer.
//! 2. Condition: CLIP text transformer (causal mask, optional padding mask) → `final_layer_norm` → the
//!    token at the EOS position (argmax token id when `eos_token_id == 2`, as in the hub checkpoint's
//!    legacy config; otherwise the first `eos_token_id`) → `text_projection` (not normalised).
//! 3. Decoder: for the activations in reverse order, `reduces[i]` (+ running output), FiLM with the
//!    condition at `conditional_layer`, then a **post-LN** layer with ReLU MLP. Drop CLS, reshape to
//!    `[B, reduce_dim, g, g]`, then the head: refined = conv3×3 → ReLU → convT(k=s=p/4) → ReLU →
//!    convT(k=s=p/4) → 1 channel; otherwise one convT(k=s=p). Logits `[B, g·p, g·p]` for the refined
//!    head with patch 16 (`[B, 352, 352]` at 352 px).

use crate::nn::{LayerNorm, LayerNormConfig};
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, Linear, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

use crate::nn::{
    attention, attention_tokens, causal_bias, gelu, linear, merge_heads, padding_bias, quick_gelu,
    split_heads,
};
use crate::weights::{
    collect_reference, load_strict, write_safetensors, ComponentDir, KeyMap, StateDict,
};
use crate::ModelError;

/// transformers `CLIPSegTextConfig` (defaults of transformers 4.44.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipSegTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub attention_dropout: f64,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<i64>,
    /// `2` (the legacy value in the CIDAS checkpoints) selects argmax-id pooling.
    pub eos_token_id: Option<i64>,
}

impl Default for ClipSegTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
        }
    }
}

/// transformers `CLIPSegVisionConfig` (defaults of transformers 4.44.2: ViT-B/32 at 224).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipSegVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub attention_dropout: f64,
}

impl Default for ClipSegVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
        }
    }
}

/// transformers `CLIPSegConfig` (`config.json` of a CLIPSeg checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipSegConfig {
    pub text_config: ClipSegTextConfig,
    pub vision_config: ClipSegVisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
    pub extract_layers: Vec<usize>,
    pub reduce_dim: usize,
    pub decoder_num_attention_heads: usize,
    pub decoder_attention_dropout: f64,
    /// Present in configs but ignored by transformers: decoder layers always use ReLU.
    pub decoder_hidden_act: String,
    pub decoder_intermediate_size: usize,
    pub conditional_layer: usize,
    pub use_complex_transposed_convolution: bool,
}

impl Default for ClipSegConfig {
    fn default() -> Self {
        Self {
            text_config: ClipSegTextConfig::default(),
            vision_config: ClipSegVisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
            extract_layers: vec![3, 6, 9],
            reduce_dim: 64,
            decoder_num_attention_heads: 4,
            decoder_attention_dropout: 0.0,
            decoder_hidden_act: "quick_gelu".into(),
            decoder_intermediate_size: 2048,
            conditional_layer: 0,
            use_complex_transposed_convolution: false,
        }
    }
}

const ACTIVATIONS: &[&str] = &["quick_gelu", "gelu", "relu"];

impl ClipSegConfig {
    /// `CIDAS/clipseg-rd64-refined` `config.json`: defaults except `vision_config.patch_size` 16,
    /// `use_complex_transposed_convolution` true and the legacy `text_config` `bos_token_id` 0 /
    /// `eos_token_id` 2 (argmax pooling). CLIP ViT-B/16 + CLIP text, extract layers [3, 6, 9],
    /// reduce_dim 64. 150,747,746 parameters (decoder 1,127,009).
    pub fn rd64_refined() -> Self {
        Self {
            text_config: ClipSegTextConfig {
                bos_token_id: Some(0),
                eos_token_id: Some(2),
                ..ClipSegTextConfig::default()
            },
            vision_config: ClipSegVisionConfig {
                patch_size: 16,
                ..ClipSegVisionConfig::default()
            },
            use_complex_transposed_convolution: true,
            ..Self::default()
        }
    }

    /// Tiny config for tests, the same as the parity fixture (`scripts/reference/gen_clipseg.py`).
    pub fn tiny() -> Self {
        Self {
            text_config: ClipSegTextConfig {
                vocab_size: 1000,
                hidden_size: 24,
                intermediate_size: 40,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                max_position_embeddings: 16,
                bos_token_id: Some(0),
                eos_token_id: Some(2),
                ..ClipSegTextConfig::default()
            },
            vision_config: ClipSegVisionConfig {
                hidden_size: 32,
                intermediate_size: 48,
                num_hidden_layers: 5,
                num_attention_heads: 4,
                image_size: 32,
                patch_size: 8,
                layer_norm_eps: 1e-4,
                ..ClipSegVisionConfig::default()
            },
            projection_dim: 16,
            extract_layers: vec![0, 2, 3],
            reduce_dim: 16,
            decoder_num_attention_heads: 2,
            decoder_intermediate_size: 24,
            use_complex_transposed_convolution: true,
            ..Self::default()
        }
    }

    /// Read a transformers `config.json` and check it.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ModelError> {
        let cfg: Self = crate::read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The configured patch grid side (`image_size / patch_size`).
    pub fn grid(&self) -> usize {
        self.vision_config.image_size / self.vision_config.patch_size
    }

    /// Reject configs this implementation does not cover, with the reason.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Invalid(format!("CLIPSeg config: {m}")));
        let (t, v) = (&self.text_config, &self.vision_config);
        for (what, act) in [("text", &t.hidden_act), ("vision", &v.hidden_act)] {
            if !ACTIVATIONS.contains(&act.as_str()) {
                return bad(format!(
                    "unsupported {what} hidden_act `{act}` (one of {ACTIVATIONS:?})"
                ));
            }
        }
        for (what, d, h) in [
            ("text", t.hidden_size, t.num_attention_heads),
            ("vision", v.hidden_size, v.num_attention_heads),
            ("decoder", self.reduce_dim, self.decoder_num_attention_heads),
        ] {
            if h == 0 || d == 0 || d % h != 0 {
                return bad(format!(
                    "{what} width {d} is not a positive multiple of {h} heads"
                ));
            }
        }
        if v.patch_size == 0 || v.image_size < v.patch_size {
            return bad(format!(
                "patch_size {} does not fit image_size {}",
                v.patch_size, v.image_size
            ));
        }
        if self.use_complex_transposed_convolution && (v.patch_size % 4 != 0 || self.reduce_dim < 2)
        {
            return bad(format!(
                "the refined head needs patch_size divisible by 4 and reduce_dim ≥ 2 (patch {}, reduce {})",
                v.patch_size, self.reduce_dim
            ));
        }
        if self.extract_layers.is_empty() {
            return bad("extract_layers is empty".into());
        }
        if let Some(l) = self
            .extract_layers
            .iter()
            .find(|l| **l >= v.num_hidden_layers)
        {
            return bad(format!(
                "extract layer {l} ≥ the vision tower's {} layers",
                v.num_hidden_layers
            ));
        }
        if t.max_position_embeddings == 0 || t.vocab_size == 0 {
            return bad("empty text vocabulary or positions".into());
        }
        Ok(())
    }

    /// Build the model with freshly initialised weights.
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<ClipSegForImageSegmentation<B>, ModelError> {
        self.validate()?;
        Ok(ClipSegForImageSegmentation::new(self, device))
    }
}

fn layer_norm<B: Backend>(d: usize, eps: f64, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d).with_epsilon(eps).init(device)
}

fn activate<B: Backend>(act: &str, x: Tensor<B, 3>) -> Tensor<B, 3> {
    match act {
        "quick_gelu" => quick_gelu(x),
        "gelu" => gelu(x),
        // Validated at construction; "relu" is the decoder's.
        _ => relu(x),
    }
}

/// CLIP multi-head self-attention (`q_proj`/`k_proj`/`v_proj`/`out_proj`, scale `head_dim^-0.5`).
#[derive(Module, Debug)]
pub struct ClipSegAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub heads: usize,
}

impl<B: Backend> ClipSegAttention<B> {
    pub fn new(d: usize, heads: usize, device: &B::Device) -> Self {
        Self {
            q_proj: linear(d, d, true, device),
            k_proj: linear(d, d, true, device),
            v_proj: linear(d, d, true, device),
            out_proj: linear(d, d, true, device),
            heads,
        }
    }

    /// `x`: `[B, L, D]`; `bias` broadcasts to `[B, H, L, L]` (additive mask). Unmasked (the vision tower and
    /// the decoder) it is [`attention_tokens`]: on the CPU our kernel on the projections' layout, without
    /// materialising the `[B, H, L, L]` scores (at 352² and batch 8, 90 MB per layer).
    pub fn forward(&self, x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let [_, _, d] = x.dims();
        let q = crate::amp::linear(&self.q_proj, x.clone());
        let k = crate::amp::linear(&self.k_proj, x.clone());
        let v = crate::amp::linear(&self.v_proj, x);
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let out = match bias {
            None => attention_tokens(q, k, v, self.heads, scale),
            Some(bias) => {
                let (q, k, v) = (
                    split_heads(q, self.heads),
                    split_heads(k, self.heads),
                    split_heads(v, self.heads),
                );
                merge_heads(attention(q, k, v, scale, Some(bias)))
            }
        };
        crate::amp::linear(&self.out_proj, out)
    }
}

/// CLIP MLP: `fc1` → activation → `fc2`.
#[derive(Module, Debug)]
pub struct ClipSegMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    pub act: String,
}

impl<B: Backend> ClipSegMlp<B> {
    pub fn new(d: usize, hidden: usize, act: &str, device: &B::Device) -> Self {
        Self {
            fc1: linear(d, hidden, true, device),
            fc2: linear(hidden, d, true, device),
            act: act.to_string(),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        crate::amp::linear(
            &self.fc2,
            activate(&self.act, crate::amp::linear(&self.fc1, x)),
        )
    }
}

/// An encoder layer (pre-LN for the CLIP towers, post-LN for the decoder; same parameters).
#[derive(Module, Debug)]
pub struct ClipSegLayer<B: Backend> {
    pub self_attn: ClipSegAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: ClipSegMlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

impl<B: Backend> ClipSegLayer<B> {
    pub fn new(
        d: usize,
        heads: usize,
        hidden: usize,
        act: &str,
        eps: f64,
        device: &B::Device,
    ) -> Self {
        Self {
            self_attn: ClipSegAttention::new(d, heads, device),
            layer_norm1: layer_norm(d, eps, device),
            mlp: ClipSegMlp::new(d, hidden, act, device),
            layer_norm2: layer_norm(d, eps, device),
        }
    }

    /// CLIP encoder layer: `x += attn(ln1 x); x += mlp(ln2 x)`.
    pub fn forward_pre_ln(&self, x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), bias);
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }

    /// CLIPSeg decoder layer: `x = ln1(x + attn(x)); x = ln2(x + mlp(x))`.
    pub fn forward_post_ln(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self
            .layer_norm1
            .forward(x.clone() + self.self_attn.forward(x, None));
        self.layer_norm2.forward(x.clone() + self.mlp.forward(x))
    }
}

/// `encoder.layers`.
#[derive(Module, Debug)]
pub struct ClipSegEncoder<B: Backend> {
    pub layers: Vec<ClipSegLayer<B>>,
}

/// `text_model.embeddings`.
#[derive(Module, Debug)]
pub struct ClipSegTextEmbeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

/// CLIP text transformer (`clip.text_model`).
#[derive(Module, Debug)]
pub struct ClipSegTextTransformer<B: Backend> {
    pub embeddings: ClipSegTextEmbeddings<B>,
    pub encoder: ClipSegEncoder<B>,
    pub final_layer_norm: LayerNorm<B>,
    /// `-1` when the config has none (then the argmax rule is used, as for the legacy `2`).
    pub eos_token_id: i64,
}

impl<B: Backend> ClipSegTextTransformer<B> {
    pub fn new(c: &ClipSegTextConfig, device: &B::Device) -> Self {
        Self {
            embeddings: ClipSegTextEmbeddings {
                token_embedding: EmbeddingConfig::new(c.vocab_size, c.hidden_size).init(device),
                position_embedding: EmbeddingConfig::new(c.max_position_embeddings, c.hidden_size)
                    .init(device),
            },
            encoder: ClipSegEncoder {
                layers: (0..c.num_hidden_layers)
                    .map(|_| {
                        ClipSegLayer::new(
                            c.hidden_size,
                            c.num_attention_heads,
                            c.intermediate_size,
                            &c.hidden_act,
                            c.layer_norm_eps,
                            device,
                        )
                    })
                    .collect(),
            },
            final_layer_norm: layer_norm(c.hidden_size, c.layer_norm_eps, device),
            eos_token_id: c.eos_token_id.unwrap_or(-1),
        }
    }

    /// `input_ids` `[B, L]` (+ optional 0/1 `attention_mask` `[B, L]`) → pooled output `[B, D]`.
    pub fn pooled(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>, ModelError> {
        let [b, l] = input_ids.dims();
        let max_pos = self.embeddings.position_embedding.weight.dims()[0];
        let vocab = self.embeddings.token_embedding.weight.dims()[0];
        if l == 0 || l > max_pos {
            return Err(ModelError::Invalid(format!(
                "CLIPSeg text: sequence length {l} not in 1..={max_pos}"
            )));
        }
        if let Some(m) = &attention_mask {
            if m.dims() != [b, l] {
                return Err(ModelError::Invalid(format!(
                    "CLIPSeg text: attention_mask {:?} does not match input_ids [{b}, {l}]",
                    m.dims()
                )));
            }
        }
        let ids: Vec<i64> = input_ids
            .to_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .map_err(|e| ModelError::Invalid(format!("CLIPSeg text: reading input_ids: {e:?}")))?;
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= vocab) {
            return Err(ModelError::Invalid(format!(
                "CLIPSeg text: token id {bad} outside the vocabulary of {vocab}"
            )));
        }
        // Pooling position per row (transformers: argmax id for the legacy eos 2, else first EOS;
        // a row without EOS gives 0, as torch's argmax over all-zero rows).
        let legacy = self.eos_token_id == 2 || self.eos_token_id < 0;
        let pos: Vec<i64> = ids
            .chunks(l)
            .enumerate()
            .map(|(r, row)| {
                let p = if legacy {
                    let mut best = 0;
                    for (i, &t) in row.iter().enumerate() {
                        if t > row[best] {
                            best = i;
                        }
                    }
                    best
                } else {
                    row.iter()
                        .position(|&t| t == self.eos_token_id)
                        .unwrap_or(0)
                };
                (r * l + p) as i64
            })
            .collect();

        let device = input_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..l as i64, &device).reshape([1, l]);
        let x = self.embeddings.token_embedding.forward(input_ids)
            + self.embeddings.position_embedding.forward(positions);
        let mut bias = causal_bias::<B>(l, &device);
        if let Some(m) = attention_mask {
            bias = bias + padding_bias(m);
        }
        let mut x = x;
        for layer in &self.encoder.layers {
            x = layer.forward_pre_ln(x, Some(bias.clone()));
        }
        let x = self.final_layer_norm.forward(x);
        let d = x.dims()[2];
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(pos, [b]), &device);
        Ok(x.reshape([b * l, d]).select(0, idx))
    }
}

/// `vision_model.embeddings`.
#[derive(Module, Debug)]
pub struct ClipSegVisionEmbeddings<B: Backend> {
    pub class_embedding: Param<Tensor<B, 1>>,
    pub patch_embedding: Conv2d<B>,
    pub position_embedding: Embedding<B>,
    pub patch_size: usize,
}

impl<B: Backend> ClipSegVisionEmbeddings<B> {
    /// Position embeddings for a `g × g` grid: the table itself when `g` is the configured grid,
    /// otherwise the patch part bicubic-interpolated (PyTorch `interpolate(mode="bicubic",
    /// align_corners=False)`, A = −0.75, border-clamped taps), CLS row kept. `[1 + g², D]`.
    pub fn position_embeddings(&self, g: usize) -> Tensor<B, 2> {
        let table = self.position_embedding.weight.val();
        let [n, d] = table.dims();
        let g0 = integer_sqrt(n - 1);
        if g == g0 {
            return table;
        }
        let device = table.device();
        let cls = table.clone().slice([0..1, 0..d]);
        // [g0·g0, D] → [D, g0, g0]
        let grid = table
            .slice([1..n, 0..d])
            .swap_dims(0, 1)
            .reshape([d, g0, g0]);
        let w = bicubic_matrix(g0, g); // [g, g0], row-major
        let wt = Tensor::<B, 1>::from_floats(w.as_slice(), &device)
            .reshape([g, g0])
            .transpose();
        // Along x: [D·g0, g0] @ [g0, g] → [D, g0(y), g(x)]
        let x = grid
            .reshape([d * g0, g0])
            .matmul(wt.clone())
            .reshape([d, g0, g]);
        // Along y: [D·g(x), g0(y)] @ [g0, g] → [D, g(x), g(y)] → [D, g(y), g(x)]
        let y = x
            .swap_dims(1, 2)
            .reshape([d * g, g0])
            .matmul(wt)
            .reshape([d, g, g])
            .swap_dims(1, 2);
        let patches = y.reshape([d, g * g]).swap_dims(0, 1);
        Tensor::cat(vec![cls, patches], 0)
    }

    /// `[B, C, H, W]` (square, H a multiple of the patch size) → `[B, 1 + g², D]`.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let patches = crate::amp::conv2d(&self.patch_embedding, pixel_values); // [B, D, g, g]
        let [b, d, gh, gw] = patches.dims();
        let patches = patches.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let cls = self
            .class_embedding
            .val()
            .reshape([1, 1, d])
            .expand([b, 1, d]);
        let x = Tensor::cat(vec![cls, patches], 1);
        x + self.position_embeddings(gh).unsqueeze::<3>()
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

/// PyTorch's cubic convolution weights (A = −0.75) for one output coordinate.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let c1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

/// Row-major `[n_out, n_in]` matrix of 1-D bicubic resampling with `align_corners=False` and the
/// scale `n_in / n_out` (PyTorch `upsample_bicubic2d` given an output size), taps clamped to the border.
pub fn bicubic_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    bicubic_matrix_with_scale(n_in, n_out, n_in as f64 / n_out as f64)
}

/// [`bicubic_matrix`] with an explicit source step `scale` (source coordinate `(o + ½)·scale − ½`):
/// PyTorch `interpolate(scale_factor=f, mode="bicubic", align_corners=False)` uses `scale = 1/f`
/// rather than `n_in / n_out` (transformers' ViT position interpolation relies on it).
pub fn bicubic_matrix_with_scale(n_in: usize, n_out: usize, scale: f64) -> Vec<f32> {
    let mut m = vec![0f64; n_out * n_in];
    for o in 0..n_out {
        let src = (o as f64 + 0.5) * scale - 0.5;
        let i0 = src.floor();
        let t = src - i0;
        let w = cubic_weights(t);
        for (k, wk) in w.iter().enumerate() {
            let idx = (i0 as i64 - 1 + k as i64).clamp(0, n_in as i64 - 1) as usize;
            m[o * n_in + idx] += wk;
        }
    }
    m.into_iter().map(|v| v as f32).collect()
}

/// CLIP vision transformer (`clip.vision_model`).
#[derive(Module, Debug)]
pub struct ClipSegVisionTransformer<B: Backend> {
    pub embeddings: ClipSegVisionEmbeddings<B>,
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: ClipSegEncoder<B>,
    pub post_layernorm: LayerNorm<B>,
}

impl<B: Backend> ClipSegVisionTransformer<B> {
    pub fn new(c: &ClipSegVisionConfig, device: &B::Device) -> Self {
        let grid = c.image_size / c.patch_size;
        Self {
            embeddings: ClipSegVisionEmbeddings {
                class_embedding: Param::from_tensor(Tensor::random(
                    [c.hidden_size],
                    burn::tensor::Distribution::Normal(0.0, 1.0),
                    device,
                )),
                patch_embedding: Conv2dConfig::new(
                    [c.num_channels, c.hidden_size],
                    [c.patch_size, c.patch_size],
                )
                .with_stride([c.patch_size, c.patch_size])
                .with_padding(PaddingConfig2d::Valid)
                .with_bias(false)
                .init(device),
                position_embedding: EmbeddingConfig::new(grid * grid + 1, c.hidden_size)
                    .init(device),
                patch_size: c.patch_size,
            },
            pre_layrnorm: layer_norm(c.hidden_size, c.layer_norm_eps, device),
            encoder: ClipSegEncoder {
                layers: (0..c.num_hidden_layers)
                    .map(|_| {
                        ClipSegLayer::new(
                            c.hidden_size,
                            c.num_attention_heads,
                            c.intermediate_size,
                            &c.hidden_act,
                            c.layer_norm_eps,
                            device,
                        )
                    })
                    .collect(),
            },
            post_layernorm: layer_norm(c.hidden_size, c.layer_norm_eps, device),
        }
    }

    fn check_pixels(&self, pixel_values: &Tensor<B, 4>) -> Result<(), ModelError> {
        let [_, c, h, w] = pixel_values.dims();
        let p = self.embeddings.patch_size;
        let c_expected = self.embeddings.patch_embedding.weight.dims()[1];
        if c != c_expected || h != w || h < p || h % p != 0 {
            return Err(ModelError::Invalid(format!(
                "CLIPSeg vision: pixel_values [_, {c}, {h}, {w}] must have {c_expected} channels and a square \
                 size that is a multiple of the patch size {p}"
            )));
        }
        Ok(())
    }

    /// Outputs of encoder layers `0..n` (each `[B, 1 + g², D]`), `n` ≤ the number of layers.
    pub fn hidden_states(&self, pixel_values: Tensor<B, 4>, n: usize) -> Vec<Tensor<B, 3>> {
        let mut x = self
            .pre_layrnorm
            .forward(self.embeddings.forward(pixel_values));
        let mut out = Vec::with_capacity(n);
        for layer in self.encoder.layers.iter().take(n) {
            x = layer.forward_pre_ln(x, None);
            out.push(x.clone());
        }
        out
    }
}

/// `clip` (`CLIPSegModel`): both towers, projections and the contrastive temperature.
#[derive(Module, Debug)]
pub struct ClipSegModel<B: Backend> {
    pub text_model: ClipSegTextTransformer<B>,
    pub vision_model: ClipSegVisionTransformer<B>,
    pub visual_projection: Linear<B>,
    pub text_projection: Linear<B>,
    /// A 0-d tensor in transformers; `[1]` here (the loaders reshape).
    pub logit_scale: Param<Tensor<B, 1>>,
}

impl<B: Backend> ClipSegModel<B> {
    /// `get_text_features`: `[B, projection_dim]`.
    pub fn text_features(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>, ModelError> {
        Ok(crate::amp::linear(
            &self.text_projection,
            self.text_model.pooled(input_ids, attention_mask)?,
        ))
    }

    /// `get_image_features` (all vision layers, CLS → `post_layernorm` → `visual_projection`).
    pub fn image_features(&self, pixel_values: Tensor<B, 4>) -> Result<Tensor<B, 2>, ModelError> {
        self.vision_model.check_pixels(&pixel_values)?;
        let n = self.vision_model.encoder.layers.len();
        let last = self
            .vision_model
            .hidden_states(pixel_values, n)
            .pop()
            .ok_or_else(|| ModelError::Invalid("CLIPSeg vision: no encoder layers".into()))?;
        let [b, _, d] = last.dims();
        let cls = last.slice([0..b, 0..1, 0..d]).reshape([b, d]);
        Ok(crate::amp::linear(
            &self.visual_projection,
            self.vision_model.post_layernorm.forward(cls),
        ))
    }
}

/// The decoder's output head (`decoder.transposed_convolution`): refined = `conv` (Sequential 0) →
/// ReLU → `up1` (2) → ReLU → `up2` (4); otherwise `up1` alone (the single `ConvTranspose2d`).
#[derive(Module, Debug)]
pub struct ClipSegHead<B: Backend> {
    pub conv: Option<Conv2d<B>>,
    pub up1: ConvTranspose2d<B>,
    pub up2: Option<ConvTranspose2d<B>>,
}

impl<B: Backend> ClipSegHead<B> {
    fn new(reduce: usize, patch: usize, refined: bool, device: &B::Device) -> Self {
        if refined {
            let k = patch / 4;
            Self {
                conv: Some(
                    Conv2dConfig::new([reduce, reduce], [3, 3])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(device),
                ),
                up1: ConvTranspose2dConfig::new([reduce, reduce / 2], [k, k])
                    .with_stride([k, k])
                    .init(device),
                up2: Some(
                    ConvTranspose2dConfig::new([reduce / 2, 1], [k, k])
                        .with_stride([k, k])
                        .init(device),
                ),
            }
        } else {
            Self {
                conv: None,
                up1: ConvTranspose2dConfig::new([reduce, 1], [patch, patch])
                    .with_stride([patch, patch])
                    .init(device),
                up2: None,
            }
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = match &self.conv {
            Some(c) => relu(crate::amp::conv2d(c, x)),
            None => x,
        };
        let x = self.up1.forward(x);
        match &self.up2 {
            Some(u) => u.forward(relu(x)),
            None => x,
        }
    }
}

/// `decoder` (`CLIPSegDecoder`).
#[derive(Module, Debug)]
pub struct ClipSegDecoder<B: Backend> {
    pub film_mul: Linear<B>,
    pub film_add: Linear<B>,
    pub transposed_convolution: ClipSegHead<B>,
    pub reduces: Vec<Linear<B>>,
    pub layers: Vec<ClipSegLayer<B>>,
    pub conditional_layer: usize,
}

impl<B: Backend> ClipSegDecoder<B> {
    fn new(c: &ClipSegConfig, device: &B::Device) -> Self {
        let v = &c.vision_config;
        let depth = c.extract_layers.len();
        Self {
            film_mul: linear(c.projection_dim, c.reduce_dim, true, device),
            film_add: linear(c.projection_dim, c.reduce_dim, true, device),
            transposed_convolution: ClipSegHead::new(
                c.reduce_dim,
                v.patch_size,
                c.use_complex_transposed_convolution,
                device,
            ),
            reduces: (0..depth)
                .map(|_| linear(v.hidden_size, c.reduce_dim, true, device))
                .collect(),
            // transformers copies the vision config for these layers (so its LayerNorm eps) and
            // forces hidden_act = "relu".
            layers: (0..depth)
                .map(|_| {
                    ClipSegLayer::new(
                        c.reduce_dim,
                        c.decoder_num_attention_heads,
                        c.decoder_intermediate_size,
                        "relu",
                        v.layer_norm_eps,
                        device,
                    )
                })
                .collect(),
            conditional_layer: c.conditional_layer,
        }
    }

    /// `activations` in extraction order (shallow → deep), `cond` `[B, projection_dim]` → logits
    /// `[B, H, W]`.
    pub fn forward(&self, activations: &[Tensor<B, 3>], cond: Tensor<B, 2>) -> Tensor<B, 3> {
        let mut out: Option<Tensor<B, 3>> = None;
        for (i, ((act, layer), reduce)) in activations
            .iter()
            .rev()
            .zip(&self.layers)
            .zip(&self.reduces)
            .enumerate()
        {
            let r = crate::amp::linear(reduce, act.clone());
            let mut o = match out {
                Some(prev) => r + prev,
                None => r,
            };
            if i == self.conditional_layer {
                let mul = crate::amp::linear(&self.film_mul, cond.clone()).unsqueeze_dim::<3>(1);
                let add = crate::amp::linear(&self.film_add, cond.clone()).unsqueeze_dim::<3>(1);
                o = mul * o + add;
            }
            out = Some(layer.forward_post_ln(o));
        }
        let out = out.expect("the decoder has at least one layer (validated config)");
        let [b, n, r] = out.dims();
        let g = integer_sqrt(n - 1);
        let x = out
            .slice([0..b, 1..n, 0..r])
            .swap_dims(1, 2)
            .reshape([b, r, g, g]);
        let logits = self.transposed_convolution.forward(x);
        let [b, _, h, w] = logits.dims();
        logits.reshape([b, h, w])
    }
}

/// transformers `CLIPSegForImageSegmentation`.
#[derive(Module, Debug)]
pub struct ClipSegForImageSegmentation<B: Backend> {
    pub clip: ClipSegModel<B>,
    pub decoder: ClipSegDecoder<B>,
    pub extract_layers: Vec<usize>,
}

impl<B: Backend> ClipSegForImageSegmentation<B> {
    fn new(c: &ClipSegConfig, device: &B::Device) -> Self {
        Self {
            clip: ClipSegModel {
                text_model: ClipSegTextTransformer::new(&c.text_config, device),
                vision_model: ClipSegVisionTransformer::new(&c.vision_config, device),
                visual_projection: linear(
                    c.vision_config.hidden_size,
                    c.projection_dim,
                    false,
                    device,
                ),
                text_projection: linear(c.text_config.hidden_size, c.projection_dim, false, device),
                logit_scale: Param::from_tensor(Tensor::from_floats(
                    [c.logit_scale_init_value as f32],
                    device,
                )),
            },
            decoder: ClipSegDecoder::new(c, device),
            extract_layers: c.extract_layers.clone(),
        }
    }

    /// Segmentation logits `[B, H, W]` for images `[B, 3, S, S]` (normalised, S a multiple of the
    /// patch size; 352 for rd64-refined) and one tokenised prompt per image `[B, L]` (CLIP BPE ids).
    pub fn forward(
        &self,
        pixel_values: Tensor<B, 4>,
        input_ids: Tensor<B, 2, Int>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        self.forward_with_mask(pixel_values, input_ids, None)
    }

    /// [`Self::forward`] with the tokenizer's 0/1 `attention_mask` `[B, L]` (it does not change the
    /// result: pooling reads the EOS token, which the causal mask already keeps from the pads).
    pub fn forward_with_mask(
        &self,
        pixel_values: Tensor<B, 4>,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let [b, ..] = pixel_values.dims();
        let [bt, _] = input_ids.dims();
        if b != bt {
            return Err(ModelError::Invalid(format!(
                "CLIPSeg: {b} images but {bt} prompts (one prompt per image)"
            )));
        }
        let cond = self.conditional_embeddings(input_ids, attention_mask)?;
        self.forward_with_conditional(pixel_values, cond)
    }

    /// The FiLM condition from text: `clip.get_text_features` `[B, projection_dim]`.
    pub fn conditional_embeddings(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2>>,
    ) -> Result<Tensor<B, 2>, ModelError> {
        self.clip.text_features(input_ids, attention_mask)
    }

    /// Logits from precomputed conditional embeddings `[B, projection_dim]` (text features, or
    /// [`ClipSegModel::image_features`] of a visual prompt).
    pub fn forward_with_conditional(
        &self,
        pixel_values: Tensor<B, 4>,
        cond: Tensor<B, 2>,
    ) -> Result<Tensor<B, 3>, ModelError> {
        self.clip.vision_model.check_pixels(&pixel_values)?;
        let [b, ..] = pixel_values.dims();
        let proj = self.clip.text_projection.weight.dims()[1];
        if cond.dims() != [b, proj] {
            return Err(ModelError::Invalid(format!(
                "CLIPSeg: conditional embeddings {:?}, expected [{b}, {proj}]",
                cond.dims()
            )));
        }
        let deepest = self.extract_layers.iter().copied().max().unwrap_or(0);
        let hidden = self
            .clip
            .vision_model
            .hidden_states(pixel_values, deepest + 1);
        let acts: Vec<Tensor<B, 3>> = self
            .extract_layers
            .iter()
            .map(|&i| hidden[i].clone())
            .collect();
        Ok(self.decoder.forward(&acts, cond))
    }

    /// transformers key names → our module paths.
    pub fn key_map() -> KeyMap {
        KeyMap::new(&[
            (
                r"^decoder\.transposed_convolution\.0\.",
                "decoder.transposed_convolution.conv.",
            ),
            (
                r"^decoder\.transposed_convolution\.2\.",
                "decoder.transposed_convolution.up1.",
            ),
            (
                r"^decoder\.transposed_convolution\.4\.",
                "decoder.transposed_convolution.up2.",
            ),
            (
                r"^decoder\.transposed_convolution\.(weight|bias)$",
                "decoder.transposed_convolution.up1.$1",
            ),
        ])
    }

    /// Our module paths → transformers key names (`refined` selects the Sequential layout).
    pub fn reverse_key_map(refined: bool) -> KeyMap {
        if refined {
            KeyMap::new(&[
                (
                    r"^decoder\.transposed_convolution\.conv\.",
                    "decoder.transposed_convolution.0.",
                ),
                (
                    r"^decoder\.transposed_convolution\.up1\.",
                    "decoder.transposed_convolution.2.",
                ),
                (
                    r"^decoder\.transposed_convolution\.up2\.",
                    "decoder.transposed_convolution.4.",
                ),
            ])
        } else {
            KeyMap::new(&[(
                r"^decoder\.transposed_convolution\.up1\.",
                "decoder.transposed_convolution.",
            )])
        }
    }

    /// Build from `cfg` and a transformers-layout state dict (strict). Drops the non-persistent
    /// `position_ids` buffers older files carry and reshapes the 0-d `clip.logit_scale`.
    pub fn from_state_dict(
        cfg: &ClipSegConfig,
        mut sd: StateDict,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        sd.drop_keys(|k| k.ends_with("embeddings.position_ids"));
        const SCALE: &str = "clip.logit_scale";
        if sd
            .tensors
            .get(SCALE)
            .is_some_and(|s| s.shape.num_dims() == 0)
        {
            let v = sd.take(SCALE)?.convert::<f32>();
            let v = v
                .to_vec::<f32>()
                .map_err(|e| ModelError::Invalid(format!("{SCALE}: {e:?}")))?;
            sd.insert(SCALE, TensorData::new(v, [1]));
        }
        let model = cfg.init(device)?;
        Ok(load_strict(model, sd, &Self::key_map(), "clipseg")?)
    }

    /// Load a transformers model folder (`config.json` + `model.safetensors` or `pytorch_model.bin`).
    pub fn load(
        dir: &ComponentDir,
        device: &B::Device,
    ) -> Result<(Self, ClipSegConfig), ModelError> {
        let cfg = ClipSegConfig::from_file(&dir.config_path())?;
        let model = Self::from_state_dict(&cfg, dir.state_dict()?, device)?;
        Ok((model, cfg))
    }

    /// Save in the transformers layout (safetensors; `clip.logit_scale` 0-d as in transformers).
    pub fn save(&self, path: &std::path::Path) -> Result<(), ModelError> {
        let refined = self.decoder.transposed_convolution.conv.is_some();
        let mut tensors = collect_reference(self, &Self::reverse_key_map(refined))?;
        for (name, data) in tensors.iter_mut() {
            if name == "clip.logit_scale" {
                let v = data
                    .clone()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .map_err(|e| ModelError::Invalid(format!("{name}: {e:?}")))?;
                *data = TensorData::new(v, Vec::<usize>::new());
            }
        }
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        Ok(write_safetensors(path, &tensors, Some(meta))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_rows_sum_to_one_and_identity_at_same_size() {
        let m = bicubic_matrix(14, 22);
        for r in m.chunks(14) {
            let s: f32 = r.iter().sum();
            assert!((s - 1.0).abs() < 1e-6, "{s}");
        }
        let id = bicubic_matrix(5, 5);
        for (i, r) in id.chunks(5).enumerate() {
            for (j, v) in r.iter().enumerate() {
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-7);
            }
        }
    }

    #[test]
    fn hub_config_parses_to_rd64_refined() {
        // CIDAS/clipseg-rd64-refined config.json (transformers 4.37 re-save).
        let json = r#"{
          "_name_or_path": "CIDAS/clipseg-rd64-refined", "architectures": ["CLIPSegForImageSegmentation"],
          "conditional_layer": 0, "decoder_attention_dropout": 0.0, "decoder_hidden_act": "quick_gelu",
          "decoder_intermediate_size": 2048, "decoder_num_attention_heads": 4, "extract_layers": [3, 6, 9],
          "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clipseg",
          "projection_dim": 512, "reduce_dim": 64,
          "text_config": {"bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "model_type": "clipseg_text_model"},
          "transformers_version": "4.37.0.dev0", "use_complex_transposed_convolution": true,
          "vision_config": {"dropout": 0.0, "model_type": "clipseg_vision_model", "patch_size": 16}
        }"#;
        let cfg: ClipSegConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg, ClipSegConfig::rd64_refined());
        cfg.validate().unwrap();
        assert_eq!(cfg.grid(), 14);
    }

    #[test]
    fn validate_rejects_bad_configs() {
        let mut c = ClipSegConfig::tiny();
        c.extract_layers = vec![9];
        assert!(c.validate().is_err());
        let mut c = ClipSegConfig::tiny();
        c.vision_config.hidden_act = "swish".into();
        assert!(c.validate().is_err());
        let mut c = ClipSegConfig::tiny();
        c.vision_config.patch_size = 6;
        assert!(c.validate().is_err());
    }
}
