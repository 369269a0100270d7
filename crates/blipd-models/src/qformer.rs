//! BLIP-2's Q-Former (BERT-base with learned query tokens) as used by BLIP-Diffusion, plus the
//! diffusers component that wraps it.
//!
//! References:
//! - diffusers 0.33.1 `pipelines/blip_diffusion/modeling_blip2.py::Blip2QFormerModel` (the `qformer/`
//!   component of `Salesforce/blipdiffusion`: `visual_encoder` + `query_tokens` + `embeddings` +
//!   `encoder` + `proj_layer`), built on transformers 4.44.2 `Blip2QFormer{Attention,Intermediate,Output}`;
//! - LAVIS `lavis/models/blip2_models/Qformer.py` (`BertModel`/`BertLMHeadModel` with `query_embeds`) and
//!   `blip2_qformer.py::Blip2Qformer` (stage-1 heads and the three attention patterns).
//!
//! Architecture (BLIP-Diffusion numbers): 12 post-LN BERT layers, width 768, 12 heads, FFN 3072 (erf
//! GELU), LayerNorm eps 1e-12. The sequence is `[queries (16); text]`; the embedding LayerNorm covers the
//! whole sequence, text tokens get word + absolute position embeddings (positions from 0), queries get
//! none. Each layer: shared self-attention over the sequence; then, for the query rows only,
//! cross-attention to the image tokens (K/V from width 1024) in every `cross_attention_frequency`-th
//! layer; then separate FFNs: `intermediate_query`/`output_query` for query rows, `intermediate`/`output`
//! for text rows.
//!
//! Attention modes (all with the reference's additive −10000 mask):
//! - [`Blip2QFormerModel::multimodal`]: bidirectional over queries + text with a text padding mask (ITM,
//!   LAVIS `extract_features(mode="multimodal")`, what BLIP-Diffusion uses);
//! - [`Blip2QFormerModel::query_pass`]: queries only (+ cross-attention), returning each layer's
//!   self-attention K/V ([`QueryCache`], LAVIS `use_cache=True`) (ITC image side);
//! - [`Blip2QFormerModel::text_pass`]: text only with padding mask (ITC text side);
//! - [`Blip2QFormerModel::causal_text`] / [`Blip2QFormerModel::causal_text_cached`]: ITG — text row `i`
//!   sees every query and text tokens `≤ i` (padding masked). The first recomputes the queries in the same
//!   pass (queries see only queries: LAVIS's UniLM mask); the second reuses a [`QueryCache`] as
//!   `Blip2Qformer.forward` does. Both give the same text states.
//!
//! Stage-1 heads (`vision_proj`, `text_proj`, `itm_head`, `temp`, LM head `cls.predictions.*`) live in
//! [`QFormerHeads`], outside the diffusers component so that it stays strictly loadable from diffusers
//! weights.
//!
//! Dropout (`hidden_dropout_prob`, `attention_probs_dropout_prob`, 0.1 in BERT) follows Burn's convention:
//! active only on autodiff backends. Run frozen/eval passes on `B::InnerBackend` (`module.valid()`) to get
//! PyTorch `eval()` numerics there.

use crate::nn::{LayerNorm, LayerNormConfig};
use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, Linear};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::clip_vision::{Blip2VisionConfig, Blip2VisionModel, HiddenAct};
use crate::nn::{attention_probs, linear, merge_heads, split_heads};
use crate::proj::{ProjConfig, ProjLayer};
use crate::weights::{load_strict, save_safetensors, KeyMap, StateDict};
use crate::ModelError;

/// The additive value BERT/BLIP-2 put on masked attention scores (`(1 - mask) * -10000`).
pub const BERT_MASK_VALUE: f32 = -10000.0;

/// `[DEC]`, the BOS token BLIP-2 adds to the BERT uncased vocabulary (id 30522, vocab 30523).
pub const DEC_TOKEN_ID: i64 = 30522;

/// transformers `Blip2QFormerConfig` (json field names). Missing fields take transformers 4.44.2's
/// defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Blip2QFormerConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub pad_token_id: usize,
    pub position_embedding_type: String,
    pub cross_attention_frequency: usize,
    pub encoder_hidden_size: usize,
}

impl Default for Blip2QFormerConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: "absolute".into(),
            cross_attention_frequency: 2,
            encoder_hidden_size: 1408,
        }
    }
}

impl Blip2QFormerConfig {
    /// `Salesforce/blipdiffusion` `qformer/config.json` → `qformer_config`: `cross_attention_frequency 1`,
    /// `encoder_hidden_size 1024`, `vocab_size 30523` (BERT uncased + `[DEC]`); the rest defaults
    /// (bert-base: 768 / 12 layers / 12 heads / 3072, gelu, eps 1e-12, 512 positions).
    pub fn blipdiffusion() -> Self {
        Self {
            vocab_size: 30523,
            cross_attention_frequency: 1,
            encoder_hidden_size: 1024,
            ..Self::default()
        }
    }

    /// Tiny Q-Former for tests: width 32, 3 layers, 4 heads, FFN 48, cross-attention every 2nd layer.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 31,
            hidden_size: 32,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            intermediate_size: 48,
            max_position_embeddings: 16,
            cross_attention_frequency: 2,
            encoder_hidden_size: 24,
            ..Self::default()
        }
    }

    /// Whether layer `i` has a cross-attention block (`i % cross_attention_frequency == 0`).
    pub fn has_cross_attention(&self, layer: usize) -> bool {
        layer.is_multiple_of(self.cross_attention_frequency)
    }

    pub fn validate(&self) -> Result<HiddenAct, ModelError> {
        let bad = |m: String| Err(ModelError::Invalid(format!("Blip2QFormerConfig: {m}")));
        if self.hidden_size == 0 || self.num_attention_heads == 0 {
            return bad("zero hidden_size or num_attention_heads".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.cross_attention_frequency == 0 {
            return bad("cross_attention_frequency must be ≥ 1".into());
        }
        if self.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                self.position_embedding_type
            ));
        }
        for p in [self.hidden_dropout_prob, self.attention_probs_dropout_prob] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("dropout probability {p} not in [0, 1]"));
            }
        }
        HiddenAct::parse(&self.hidden_act)
    }
}

/// transformers `Blip2Config` as diffusers writes it to `qformer/config.json` (`vision_config`,
/// `qformer_config`, `num_query_tokens`; the OPT `text_config` and generation fields are ignored).
///
/// As in transformers, `qformer_config.encoder_hidden_size` is overwritten with
/// `vision_config.hidden_size` on parsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawBlip2Config")]
pub struct Blip2Config {
    pub vision_config: Blip2VisionConfig,
    pub qformer_config: Blip2QFormerConfig,
    pub num_query_tokens: usize,
}

#[derive(Deserialize)]
#[serde(default)]
struct RawBlip2Config {
    vision_config: Blip2VisionConfig,
    qformer_config: Blip2QFormerConfig,
    num_query_tokens: usize,
}

impl Default for RawBlip2Config {
    fn default() -> Self {
        Self {
            vision_config: Blip2VisionConfig::default(),
            qformer_config: Blip2QFormerConfig::default(),
            num_query_tokens: 32,
        }
    }
}

impl From<RawBlip2Config> for Blip2Config {
    fn from(raw: RawBlip2Config) -> Self {
        let mut qformer_config = raw.qformer_config;
        qformer_config.encoder_hidden_size = raw.vision_config.hidden_size;
        Self {
            vision_config: raw.vision_config,
            qformer_config,
            num_query_tokens: raw.num_query_tokens,
        }
    }
}

impl Blip2Config {
    /// `Salesforce/blipdiffusion` `qformer/config.json` (model.md §2.1; same values as `BLIP2_CONFIG` in
    /// diffusers `scripts/convert_blipdiffusion_to_diffusers.py`): 16 queries, CLIP ViT-L/14 (23 layers),
    /// BERT-base Q-Former with cross-attention in every layer.
    pub fn blipdiffusion() -> Self {
        Self {
            vision_config: Blip2VisionConfig::blipdiffusion(),
            qformer_config: Blip2QFormerConfig::blipdiffusion(),
            num_query_tokens: 16,
        }
    }

    /// Tiny config matching `tests/fixtures/qformer` (ViT width 24 / MLP 96, Q-Former width 32, 4 queries).
    pub fn tiny() -> Self {
        Self {
            vision_config: Blip2VisionConfig {
                hidden_size: 24,
                intermediate_size: 96,
                ..Blip2VisionConfig::tiny()
            },
            qformer_config: Blip2QFormerConfig::tiny(),
            num_query_tokens: 4,
        }
    }

    /// Read a `qformer/config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ModelError> {
        crate::read_json(path)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        self.vision_config.validate()?;
        self.qformer_config.validate()?;
        if self.qformer_config.encoder_hidden_size != self.vision_config.hidden_size {
            return Err(ModelError::Invalid(format!(
                "Blip2Config: qformer encoder_hidden_size {} != vision hidden_size {}",
                self.qformer_config.encoder_hidden_size, self.vision_config.hidden_size
            )));
        }
        if self.num_query_tokens == 0 {
            return Err(ModelError::Invalid(
                "Blip2Config: num_query_tokens is 0".into(),
            ));
        }
        Ok(())
    }

    /// The diffusers component (`Blip2QFormerModel`) with zero/default-initialised weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Blip2QFormerModel<B>, ModelError> {
        self.validate()?;
        let q = &self.qformer_config;
        Ok(Blip2QFormerModel {
            visual_encoder: self.vision_config.init(device)?,
            query_tokens: Param::from_tensor(Tensor::zeros(
                [1, self.num_query_tokens, q.hidden_size],
                device,
            )),
            embeddings: QFormerEmbeddings::new(q, device),
            encoder: QFormerEncoder::new(q, device)?,
            proj_layer: ProjConfig::for_hidden_size(q.hidden_size).init(device)?,
        })
    }
}

// ---------------------------------------------------------------------------------------------------
// Modules (field names mirror the diffusers / transformers keys; `LayerNorm` → `layer_norm`).

/// `Blip2TextEmbeddings` (LAVIS `BertEmbeddings`): word + absolute position embeddings for text,
/// queries prepended, then LayerNorm over the whole sequence.
#[derive(Module, Debug)]
pub struct QFormerEmbeddings<B: Backend> {
    pub word_embeddings: Embedding<B>,
    pub position_embeddings: Embedding<B>,
    pub layer_norm: LayerNorm<B>,
    pub dropout: Dropout,
}

/// `Blip2QFormerMultiHeadAttention` (LAVIS `BertSelfAttention`): `query`, `key`, `value`.
#[derive(Module, Debug)]
pub struct QFormerMultiHeadAttention<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub dropout: Dropout,
    pub num_heads: usize,
}

/// `Blip2QFormerSelfOutput`: `LayerNorm(dropout(dense(x)) + residual)`.
#[derive(Module, Debug)]
pub struct QFormerSelfOutput<B: Backend> {
    pub dense: Linear<B>,
    pub layer_norm: LayerNorm<B>,
    pub dropout: Dropout,
}

/// `Blip2QFormerAttention`: `attention` (LAVIS `self`) + `output`.
#[derive(Module, Debug)]
pub struct QFormerAttention<B: Backend> {
    pub attention: QFormerMultiHeadAttention<B>,
    pub output: QFormerSelfOutput<B>,
}

/// `Blip2QFormerIntermediate`: `act(dense(x))`.
#[derive(Module, Debug)]
pub struct QFormerIntermediate<B: Backend> {
    pub dense: Linear<B>,
    #[module(skip)]
    pub act: HiddenAct,
}

/// `Blip2QFormerOutput`: `LayerNorm(dropout(dense(x)) + residual)`.
#[derive(Module, Debug)]
pub struct QFormerOutput<B: Backend> {
    pub dense: Linear<B>,
    pub layer_norm: LayerNorm<B>,
    pub dropout: Dropout,
}

/// `Blip2QFormerLayer` (LAVIS `BertLayer`).
#[derive(Module, Debug)]
pub struct QFormerLayer<B: Backend> {
    pub attention: QFormerAttention<B>,
    /// Present in layers `i % cross_attention_frequency == 0`.
    pub crossattention: Option<QFormerAttention<B>>,
    pub intermediate: QFormerIntermediate<B>,
    pub output: QFormerOutput<B>,
    pub intermediate_query: QFormerIntermediate<B>,
    pub output_query: QFormerOutput<B>,
}

/// `Blip2QFormerEncoder` (`layer` as in the checkpoints).
#[derive(Module, Debug)]
pub struct QFormerEncoder<B: Backend> {
    pub layer: Vec<QFormerLayer<B>>,
}

/// diffusers `Blip2QFormerModel`: the whole `qformer/` component of `Salesforce/blipdiffusion`.
#[derive(Module, Debug)]
pub struct Blip2QFormerModel<B: Backend> {
    pub visual_encoder: Blip2VisionModel<B>,
    /// `[1, Q, D]` learned queries.
    pub query_tokens: Param<Tensor<B, 3>>,
    pub embeddings: QFormerEmbeddings<B>,
    pub encoder: QFormerEncoder<B>,
    pub proj_layer: ProjLayer<B>,
}

/// Per-layer self-attention keys and values of a query-only pass, each `[B, heads, Q, head_dim]`
/// (LAVIS `past_key_values` of `Qformer.bert(query_embeds=…, use_cache=True)`).
#[derive(Debug, Clone)]
pub struct QueryCache<B: Backend> {
    pub layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> QueryCache<B> {
    /// Number of cached query positions.
    pub fn len(&self) -> usize {
        self.layers.first().map(|(k, _)| k.dims()[2]).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn ln<B: Backend>(d: usize, eps: f64, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d).with_epsilon(eps).init(device)
}

impl<B: Backend> QFormerEmbeddings<B> {
    pub fn new(c: &Blip2QFormerConfig, device: &B::Device) -> Self {
        Self {
            word_embeddings: EmbeddingConfig::new(c.vocab_size, c.hidden_size).init(device),
            position_embeddings: EmbeddingConfig::new(c.max_position_embeddings, c.hidden_size)
                .init(device),
            layer_norm: ln(c.hidden_size, c.layer_norm_eps, device),
            dropout: DropoutConfig::new(c.hidden_dropout_prob).init(),
        }
    }

    /// `query [B, Q, D]` and/or `input_ids [B, T]` → `[B, Q+T, D]` (text positions start at 0).
    pub fn forward(
        &self,
        query: Option<Tensor<B, 3>>,
        input_ids: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let text = input_ids.map(|ids| {
            let [_, t] = ids.dims();
            let max_pos = self.position_embeddings.weight.dims()[0];
            assert!(
                t <= max_pos,
                "text length {t} exceeds max_position_embeddings {max_pos}"
            );
            let device = ids.device();
            let pos = Tensor::<B, 1, Int>::arange(0..t as i64, &device).reshape([1, t]);
            crate::nn::embedding(&self.word_embeddings, ids)
                + crate::nn::embedding(&self.position_embeddings, pos)
        });
        let x = match (query, text) {
            (Some(q), Some(t)) => Tensor::cat(vec![q, t], 1),
            (Some(q), None) => q,
            (None, Some(t)) => t,
            (None, None) => panic!("Q-Former embeddings need queries or text"),
        };
        self.dropout.forward(self.layer_norm.forward(x))
    }
}

impl<B: Backend> QFormerMultiHeadAttention<B> {
    fn new(c: &Blip2QFormerConfig, kv_dim: usize, device: &B::Device) -> Self {
        let d = c.hidden_size;
        Self {
            query: linear(d, d, true, device),
            key: linear(kv_dim, d, true, device),
            value: linear(kv_dim, d, true, device),
            dropout: DropoutConfig::new(c.attention_probs_dropout_prob).init(),
            num_heads: c.num_attention_heads,
        }
    }

    /// Keys and values of `x`, split into heads: `[B, H, L, Dh]` each.
    pub fn key_value(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let h = self.num_heads;
        (
            split_heads(crate::amp::linear(&self.key, x.clone()), h),
            split_heads(crate::amp::linear(&self.value, x), h),
        )
    }

    /// Attention of `x`'s queries over keys/values `kv` with an additive `bias`. Returns the merged
    /// context `[B, Lq, D]`.
    pub fn attend(
        &self,
        x: Tensor<B, 3>,
        kv: (Tensor<B, 4>, Tensor<B, 4>),
        bias: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 3> {
        let h = self.num_heads;
        let q = split_heads(crate::amp::linear(&self.query, x), h);
        let dh = q.dims()[3];
        let probs = attention_probs(q, kv.0, 1.0 / (dh as f64).sqrt(), bias);
        merge_heads(crate::amp::matmul(self.dropout.forward(probs), kv.1))
    }
}

impl<B: Backend> QFormerSelfOutput<B> {
    fn new(c: &Blip2QFormerConfig, device: &B::Device) -> Self {
        Self {
            dense: linear(c.hidden_size, c.hidden_size, true, device),
            layer_norm: ln(c.hidden_size, c.layer_norm_eps, device),
            dropout: DropoutConfig::new(c.hidden_dropout_prob).init(),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        self.layer_norm
            .forward(self.dropout.forward(crate::amp::linear(&self.dense, x)) + residual)
    }
}

impl<B: Backend> QFormerAttention<B> {
    fn new(c: &Blip2QFormerConfig, kv_dim: usize, device: &B::Device) -> Self {
        Self {
            attention: QFormerMultiHeadAttention::new(c, kv_dim, device),
            output: QFormerSelfOutput::new(c, device),
        }
    }
}

impl<B: Backend> QFormerIntermediate<B> {
    fn new(c: &Blip2QFormerConfig, act: HiddenAct, device: &B::Device) -> Self {
        Self {
            dense: linear(c.hidden_size, c.intermediate_size, true, device),
            act,
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.act.apply(crate::amp::linear(&self.dense, x))
    }
}

impl<B: Backend> QFormerOutput<B> {
    fn new(c: &Blip2QFormerConfig, device: &B::Device) -> Self {
        Self {
            dense: linear(c.intermediate_size, c.hidden_size, true, device),
            layer_norm: ln(c.hidden_size, c.layer_norm_eps, device),
            dropout: DropoutConfig::new(c.hidden_dropout_prob).init(),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        self.layer_norm
            .forward(self.dropout.forward(crate::amp::linear(&self.dense, x)) + residual)
    }
}

impl<B: Backend> QFormerLayer<B> {
    fn new(c: &Blip2QFormerConfig, index: usize, act: HiddenAct, device: &B::Device) -> Self {
        Self {
            attention: QFormerAttention::new(c, c.hidden_size, device),
            crossattention: c
                .has_cross_attention(index)
                .then(|| QFormerAttention::new(c, c.encoder_hidden_size, device)),
            intermediate: QFormerIntermediate::new(c, act, device),
            output: QFormerOutput::new(c, device),
            intermediate_query: QFormerIntermediate::new(c, act, device),
            output_query: QFormerOutput::new(c, device),
        }
    }

    /// One layer over `x [B, L, D]` whose first `query_len` rows are queries.
    ///
    /// `bias` is the additive self-attention mask over `past ‖ x` keys; `past` holds cached keys/values
    /// prepended to this pass's (ITG with cached queries). Returns the new states and this pass's
    /// self-attention keys/values (past included).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        bias: Option<Tensor<B, 4>>,
        query_len: usize,
        image: Option<&Tensor<B, 3>>,
        past: Option<&(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> (Tensor<B, 3>, (Tensor<B, 4>, Tensor<B, 4>)) {
        let sa = &self.attention.attention;
        let (mut k, mut v) = sa.key_value(x.clone());
        if let Some((pk, pv)) = past {
            k = Tensor::cat(vec![pk.clone(), k], 2);
            v = Tensor::cat(vec![pv.clone(), v], 2);
        }
        let ctx = sa.attend(x.clone(), (k.clone(), v.clone()), bias);
        let att = self.attention.output.forward(ctx, x);
        let [b, l, d] = att.dims();
        let out = if query_len > 0 {
            let mut q = att.clone().slice([0..b, 0..query_len, 0..d]);
            if let Some(cross) = &self.crossattention {
                let image = image.expect("cross-attention layers need image embeddings");
                let ca = &cross.attention;
                let ctx = ca.attend(q.clone(), ca.key_value(image.clone()), None);
                q = cross.output.forward(ctx, q);
            }
            let q = self
                .output_query
                .forward(self.intermediate_query.forward(q.clone()), q);
            if l > query_len {
                let t = att.slice([0..b, query_len..l, 0..d]);
                let t = self.output.forward(self.intermediate.forward(t.clone()), t);
                Tensor::cat(vec![q, t], 1)
            } else {
                q
            }
        } else {
            self.output
                .forward(self.intermediate.forward(att.clone()), att)
        };
        (out, (k, v))
    }
}

impl<B: Backend> QFormerEncoder<B> {
    pub fn new(c: &Blip2QFormerConfig, device: &B::Device) -> Result<Self, ModelError> {
        let act = c.validate()?;
        Ok(Self {
            layer: (0..c.num_hidden_layers)
                .map(|i| QFormerLayer::new(c, i, act, device))
                .collect(),
        })
    }

    /// Run every layer. `cache` (if given) supplies per-layer past keys/values; the returned cache holds
    /// each layer's keys/values of this pass (past included).
    pub fn forward(
        &self,
        mut x: Tensor<B, 3>,
        bias: Option<Tensor<B, 4>>,
        query_len: usize,
        image: Option<&Tensor<B, 3>>,
        cache: Option<&QueryCache<B>>,
    ) -> (Tensor<B, 3>, QueryCache<B>) {
        if let Some(c) = cache {
            assert_eq!(
                c.layers.len(),
                self.layer.len(),
                "query cache has {} layers, the Q-Former {}",
                c.layers.len(),
                self.layer.len()
            );
        }
        let mut kv = Vec::with_capacity(self.layer.len());
        for (i, layer) in self.layer.iter().enumerate() {
            let past = cache.map(|c| &c.layers[i]);
            let (y, layer_kv) = layer.forward(x, bias.clone(), query_len, image, past);
            x = y;
            kv.push(layer_kv);
        }
        (x, QueryCache { layers: kv })
    }
}

// ---------------------------------------------------------------------------------------------------
// Masks.

/// `(1 - keep) * -10000` for a 0/1 mask.
fn additive<B: Backend, const D: usize>(keep: Tensor<B, D>) -> Tensor<B, D> {
    (keep.neg() + 1.0) * BERT_MASK_VALUE
}

/// `[B, Q + T]` keep-mask: ones for the queries, then the text mask.
fn prefixed_mask<B: Backend>(q: usize, text_mask: Tensor<B, 2>) -> Tensor<B, 2> {
    let [b, _] = text_mask.dims();
    if q == 0 {
        return text_mask;
    }
    let ones = Tensor::ones([b, q], &text_mask.device());
    Tensor::cat(vec![ones, text_mask], 1)
}

/// Causal keep-pattern `[R, Q + T]` for ITG: text row `i` sees the `q` queries and text `≤ i`. With
/// `query_rows`, `q` query rows come first and see only the queries (LAVIS's UniLM mask with
/// `has_query=True`).
fn prefix_causal_pattern<B: Backend>(
    q: usize,
    t: usize,
    query_rows: bool,
    device: &B::Device,
) -> Tensor<B, 2> {
    let rows = if query_rows { q + t } else { t };
    let cols = q + t;
    let mut data = vec![0.0f32; rows * cols];
    for r in 0..rows {
        let row = &mut data[r * cols..(r + 1) * cols];
        row[..q].iter_mut().for_each(|v| *v = 1.0);
        let text_row = if query_rows {
            r.checked_sub(q)
        } else {
            Some(r)
        };
        if let Some(i) = text_row {
            row[q..q + i + 1].iter_mut().for_each(|v| *v = 1.0);
        }
    }
    Tensor::<B, 1>::from_floats(data.as_slice(), device).reshape([rows, cols])
}

/// Padding bias `[B, 1, 1, L]` from a 0/1 keep-mask.
fn padding_bias<B: Backend>(keep: Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, l] = keep.dims();
    additive(keep.reshape([b, 1, 1, l]))
}

/// ITG bias `[B, 1, R, Q + T]`.
fn causal_prefix_bias<B: Backend>(
    q: usize,
    text_mask: Tensor<B, 2>,
    query_rows: bool,
) -> Tensor<B, 4> {
    let [b, t] = text_mask.dims();
    let pattern = prefix_causal_pattern::<B>(q, t, query_rows, &text_mask.device());
    let [r, c] = pattern.dims();
    let keep = pattern.reshape([1, 1, r, c]) * prefixed_mask(q, text_mask).reshape([b, 1, 1, c]);
    additive(keep)
}

// ---------------------------------------------------------------------------------------------------
// The component.

impl<B: Backend> Blip2QFormerModel<B> {
    /// Set every dropout probability of the Q-Former and its projection (BERT's 0.1 by default; 0 gives
    /// PyTorch's `eval()` behaviour on an autodiff backend, where Burn applies dropout).
    pub fn set_dropout(&mut self, p: f64) {
        self.embeddings.dropout.prob = p;
        self.proj_layer.dropout.prob = p;
        for l in &mut self.encoder.layer {
            for a in std::iter::once(&mut l.attention).chain(l.crossattention.as_mut()) {
                a.attention.dropout.prob = p;
                a.output.dropout.prob = p;
            }
            l.output.dropout.prob = p;
            l.output_query.dropout.prob = p;
        }
    }

    pub fn num_query_tokens(&self) -> usize {
        self.query_tokens.dims()[1]
    }

    /// The learned queries broadcast to `[batch, Q, D]`.
    pub fn queries(&self, batch: usize) -> Tensor<B, 3> {
        let [_, q, d] = self.query_tokens.dims();
        self.query_tokens.val().expand([batch, q, d])
    }

    /// Image tokens for the cross-attention: `ln_vision(ViT(pixels))`, `[B, N+1, Dv]`.
    pub fn image_embeds(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        self.visual_encoder.forward(pixel_values)
    }

    /// diffusers `Blip2QFormerModel.forward(text_input, image_input, return_dict=False)`: the subject
    /// (ctx) embeddings `proj_layer(last_hidden[:, :Q])`, `[B, Q, D]`.
    ///
    /// `input_ids`/`attention_mask` `[B, T]` are the BERT-uncased tokens of the subject text
    /// (`padding="longest"`, `[CLS] … [SEP]`), mask 1 = keep.
    pub fn forward(
        &self,
        pixel_values: Tensor<B, 4>,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let image = self.image_embeds(pixel_values);
        let hidden = self.multimodal(&image, input_ids, attention_mask);
        self.project(hidden)
    }

    /// `proj_layer(hidden[:, :Q])`.
    pub fn project(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, _, d] = hidden.dims();
        let q = self.num_query_tokens();
        self.proj_layer.forward(hidden.slice([0..b, 0..q, 0..d]))
    }

    /// Bidirectional pass over `[queries; text]` with cross-attention and a text padding mask
    /// (diffusers `last_hidden_state`; LAVIS ITM / `extract_features(mode="multimodal")`). `[B, Q+T, D]`.
    pub fn multimodal(
        &self,
        image_embeds: &Tensor<B, 3>,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let [b, _] = input_ids.dims();
        let q = self.num_query_tokens();
        let x = self
            .embeddings
            .forward(Some(self.queries(b)), Some(input_ids));
        let bias = padding_bias(prefixed_mask(q, attention_mask.float()));
        self.encoder
            .forward(x, Some(bias), q, Some(image_embeds), None)
            .0
    }

    /// Unimodal query pass (queries + cross-attention, no text): `([B, Q, D], per-layer K/V cache)`
    /// (LAVIS `Qformer.bert(query_embeds=…, encoder_hidden_states=…, use_cache=True)`).
    pub fn query_pass(&self, image_embeds: &Tensor<B, 3>) -> (Tensor<B, 3>, QueryCache<B>) {
        let [b, _, _] = image_embeds.dims();
        let q = self.num_query_tokens();
        let x = self.embeddings.forward(Some(self.queries(b)), None);
        self.encoder.forward(x, None, q, Some(image_embeds), None)
    }

    /// Unimodal text pass with padding mask (LAVIS `Qformer.bert(input_ids, attention_mask)`), `[B, T, D]`.
    pub fn text_pass(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let x = self.embeddings.forward(None, Some(input_ids));
        let bias = padding_bias(attention_mask.float());
        self.encoder.forward(x, Some(bias), 0, None, None).0
    }

    /// ITG text states `[B, T, D]`, recomputing the queries in the same pass: queries see queries (and
    /// cross-attend), text row `i` sees all queries and text `≤ i` (LAVIS `BertLMHeadModel` with
    /// `query_embeds`, `is_decoder=True`).
    pub fn causal_text(
        &self,
        image_embeds: &Tensor<B, 3>,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let [b, t] = input_ids.dims();
        let q = self.num_query_tokens();
        let x = self
            .embeddings
            .forward(Some(self.queries(b)), Some(input_ids));
        let bias = causal_prefix_bias(q, attention_mask.float(), true);
        let (h, _) = self
            .encoder
            .forward(x, Some(bias), q, Some(image_embeds), None);
        let d = h.dims()[2];
        h.slice([0..b, q..q + t, 0..d])
    }

    /// ITG text states `[B, T, D]` reusing a query pass's self-attention K/V (what
    /// `Blip2Qformer.forward` does: `past_key_values=query_output.past_key_values`). Text positions
    /// start at 0; the queries are not recomputed.
    pub fn causal_text_cached(
        &self,
        cache: &QueryCache<B>,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let q = cache.len();
        let x = self.embeddings.forward(None, Some(input_ids));
        let bias = causal_prefix_bias(q, attention_mask.float(), false);
        self.encoder.forward(x, Some(bias), 0, None, Some(cache)).0
    }

    /// Load a diffusers `qformer/` state dict (the non-persistent `embeddings.position_ids` buffer is
    /// dropped), strictly.
    pub fn load_state_dict(self, mut sd: StateDict) -> Result<Self, ModelError> {
        sd.drop_keys(|k| k.ends_with("embeddings.position_ids"));
        Ok(load_strict(self, sd, &key_map(), "qformer")?)
    }

    /// Save in the diffusers `qformer/` layout.
    pub fn save(&self, path: &std::path::Path) -> Result<(), ModelError> {
        Ok(save_safetensors(self, &reverse_key_map(), path)?)
    }
}

/// diffusers `Blip2QFormerModel` key → our module path.
pub fn key_map() -> KeyMap {
    KeyMap::new(&[(r"(^|\.)LayerNorm\.", "${1}layer_norm.")])
}

/// Our module path → diffusers key. (The vision tower has `pre_layernorm`/`post_layernorm`/
/// `layer_norm1`, which contain no `.layer_norm.` segment, so they are left alone.)
pub fn reverse_key_map() -> KeyMap {
    KeyMap::new(&[(r"(^|\.)layer_norm\.", "${1}LayerNorm.")])
}

// ---------------------------------------------------------------------------------------------------
// Stage-1 heads.

/// Sizes of BLIP-2's stage-1 heads (LAVIS `Blip2Qformer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QFormerHeadsConfig {
    /// Q-Former width (768).
    pub hidden_size: usize,
    /// ITC embedding size (`embed_dim`, 256).
    pub embed_dim: usize,
    /// LM vocabulary (30523 with `[DEC]`).
    pub vocab_size: usize,
    /// LM head transform activation (BERT `hidden_act`, `gelu`).
    pub hidden_act: String,
    /// LM head transform LayerNorm eps (1e-12).
    pub layer_norm_eps: f64,
    /// LM decoder weight shared with the word embeddings (LAVIS/HF default). When false the head owns
    /// `cls.predictions.decoder.weight`.
    pub tie_word_embeddings: bool,
    /// Initial ITC temperature (`temp`, 0.07).
    pub temp: f64,
    /// Decoder BOS id replacing `[CLS]` for ITG (`[DEC]`, 30522).
    pub dec_token_id: i64,
}

impl Default for QFormerHeadsConfig {
    fn default() -> Self {
        Self::blipdiffusion()
    }
}

impl QFormerHeadsConfig {
    /// LAVIS `Blip2Qformer` with BERT-base: `embed_dim=256`, vocab 30523, `temp` 0.07, tied LM decoder.
    pub fn blipdiffusion() -> Self {
        Self {
            hidden_size: 768,
            embed_dim: 256,
            vocab_size: 30523,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            tie_word_embeddings: true,
            temp: 0.07,
            dec_token_id: DEC_TOKEN_ID,
        }
    }

    /// The heads matching a Q-Former config (`embed_dim` 256).
    pub fn for_qformer(q: &Blip2QFormerConfig) -> Self {
        Self {
            hidden_size: q.hidden_size,
            vocab_size: q.vocab_size,
            hidden_act: q.hidden_act.clone(),
            layer_norm_eps: q.layer_norm_eps,
            dec_token_id: q.vocab_size as i64 - 1,
            ..Self::blipdiffusion()
        }
    }

    /// Heads for [`Blip2QFormerConfig::tiny`] (`embed_dim` 8, `[DEC]` = 30).
    pub fn tiny() -> Self {
        Self {
            embed_dim: 8,
            ..Self::for_qformer(&Blip2QFormerConfig::tiny())
        }
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<QFormerHeads<B>, ModelError> {
        let act = HiddenAct::parse(&self.hidden_act)?;
        let d = self.hidden_size;
        Ok(QFormerHeads {
            vision_proj: linear(d, self.embed_dim, true, device),
            text_proj: linear(d, self.embed_dim, true, device),
            itm_head: linear(d, 2, true, device),
            temp: Param::from_tensor(Tensor::full([1], self.temp, device)),
            cls: LmHead {
                predictions: LmPredictionHead {
                    transform: LmHeadTransform {
                        dense: linear(d, d, true, device),
                        layer_norm: ln(d, self.layer_norm_eps, device),
                        act,
                    },
                    decoder: (!self.tie_word_embeddings)
                        .then(|| linear(d, self.vocab_size, false, device)),
                    bias: Param::from_tensor(Tensor::zeros([self.vocab_size], device)),
                },
            },
        })
    }
}

/// BLIP-2 stage-1 heads (LAVIS `Blip2Qformer.{vision_proj, text_proj, itm_head, temp}` and
/// `Blip2Qformer.Qformer.cls`).
#[derive(Module, Debug)]
pub struct QFormerHeads<B: Backend> {
    pub vision_proj: Linear<B>,
    pub text_proj: Linear<B>,
    pub itm_head: Linear<B>,
    /// ITC temperature, `[1]` (LAVIS stores a 0-d tensor; the LAVIS loader reshapes).
    pub temp: Param<Tensor<B, 1>>,
    pub cls: LmHead<B>,
}

/// `BertOnlyMLMHead`.
#[derive(Module, Debug)]
pub struct LmHead<B: Backend> {
    pub predictions: LmPredictionHead<B>,
}

/// `BertLMPredictionHead`: transform → decoder (tied to the word embeddings unless present) + `bias`.
#[derive(Module, Debug)]
pub struct LmPredictionHead<B: Backend> {
    pub transform: LmHeadTransform<B>,
    pub decoder: Option<Linear<B>>,
    pub bias: Param<Tensor<B, 1>>,
}

/// `BertPredictionHeadTransform`: `LayerNorm(act(dense(x)))`.
#[derive(Module, Debug)]
pub struct LmHeadTransform<B: Backend> {
    pub dense: Linear<B>,
    pub layer_norm: LayerNorm<B>,
    #[module(skip)]
    pub act: HiddenAct,
}

/// `F.normalize(x, dim=-1)`: `x / max(‖x‖₂, 1e-12)`.
pub fn l2_normalize<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let norm = x
        .clone()
        .powi_scalar(2)
        .sum_dim(D - 1)
        .sqrt()
        .clamp_min(1e-12);
    x / norm
}

impl<B: Backend> QFormerHeads<B> {
    /// ITC image side: `normalize(vision_proj(query_hidden))`, `[B, Q, D]` → `[B, Q, E]`.
    pub fn image_feats(&self, query_hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        l2_normalize(crate::amp::linear(&self.vision_proj, query_hidden))
    }

    /// ITC text side: `normalize(text_proj(text_hidden[:, 0]))` (the `[CLS]` row), `[B, T, D]` → `[B, E]`.
    pub fn text_feat(&self, text_hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, _, d] = text_hidden.dims();
        let cls = text_hidden.slice([0..b, 0..1, 0..d]).reshape([b, d]);
        l2_normalize(crate::amp::linear(&self.text_proj, cls))
    }

    /// ITC similarities: `sim_i2t [Bi, Bt]` = max over queries of `⟨image_feat_q, text_feat⟩ / temp`,
    /// and `sim_t2i [Bt, Bi]` likewise (equal to the transpose).
    pub fn similarity(
        &self,
        image_feats: Tensor<B, 3>,
        text_feats: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let [bi, q, e] = image_feats.dims();
        let [bt, _] = text_feats.dims();
        // [Bi·Q, E] × [E, Bt] → [Bi, Q, Bt] → max over Q.
        let sim = image_feats
            .reshape([bi * q, e])
            .matmul(text_feats.transpose())
            .reshape([bi, q, bt])
            .max_dim(1)
            .reshape([bi, bt]);
        let temp = self.temp.val().reshape([1, 1]);
        let sim_i2t = sim / temp;
        let sim_t2i = sim_i2t.clone().transpose();
        (sim_i2t, sim_t2i)
    }

    /// ITM logits `[B, 2]`: `itm_head(hidden[:, :Q])` averaged over the queries.
    pub fn itm_logits(
        &self,
        multimodal_hidden: Tensor<B, 3>,
        num_query_tokens: usize,
    ) -> Tensor<B, 2> {
        let [b, _, d] = multimodal_hidden.dims();
        let q = multimodal_hidden.slice([0..b, 0..num_query_tokens, 0..d]);
        crate::amp::linear(&self.itm_head, q)
            .mean_dim(1)
            .reshape([b, 2])
    }

    /// LM logits `[B, T, V]` of ITG text states. `word_embeddings` is the Q-Former's (used when the
    /// decoder is tied).
    pub fn lm_logits(
        &self,
        text_hidden: Tensor<B, 3>,
        word_embeddings: &Embedding<B>,
    ) -> Tensor<B, 3> {
        let p = &self.cls.predictions;
        let t = &p.transform;
        let h = t
            .layer_norm
            .forward(t.act.apply(crate::amp::linear(&t.dense, text_hidden)));
        let [b, l, d] = h.dims();
        let logits = match &p.decoder {
            Some(dec) => crate::amp::linear(dec, h),
            None => {
                let w = word_embeddings.weight.val(); // [V, D]
                let v = w.dims()[0];
                h.reshape([b * l, d])
                    .matmul(w.transpose())
                    .reshape([b, l, v])
            }
        };
        let v = logits.dims()[2];
        logits + p.bias.val().reshape([1, 1, v])
    }

    /// Load heads from LAVIS `Blip2Qformer`-relative keys (`vision_proj.*`, `text_proj.*`, `itm_head.*`,
    /// `temp` as `[1]`, `Qformer.cls.predictions.*` without the tied duplicates); see
    /// [`crate::weights::lavis::heads_state_dict`] for extracting them from a LAVIS checkpoint.
    pub fn load_state_dict(self, sd: StateDict) -> Result<Self, ModelError> {
        Ok(load_strict(self, sd, &heads_key_map(), "qformer_heads")?)
    }
}

/// LAVIS `Blip2Qformer`-relative head keys → our paths.
pub fn heads_key_map() -> KeyMap {
    KeyMap::new(&[
        (r"^Qformer\.cls\.", "cls."),
        (r"(^|\.)LayerNorm\.", "${1}layer_norm."),
    ])
}

/// Our head paths → LAVIS `Blip2Qformer`-relative keys.
pub fn heads_reverse_key_map() -> KeyMap {
    KeyMap::new(&[
        (r"^cls\.", "Qformer.cls."),
        (r"(^|\.)layer_norm\.", "${1}LayerNorm."),
    ])
}

/// ITG decoder inputs: `input_ids` with the first column (`[CLS]`) replaced by `dec_token_id`
/// (`[DEC]`, LAVIS `decoder_input_ids[:, 0] = tokenizer.bos_token_id`).
pub fn itg_decoder_input_ids<B: Backend>(
    input_ids: Tensor<B, 2, Int>,
    dec_token_id: i64,
) -> Tensor<B, 2, Int> {
    let [b, _] = input_ids.dims();
    let dec = Tensor::<B, 2, Int>::full([b, 1], dec_token_id, &input_ids.device());
    input_ids.slice_assign([0..b, 0..1], dec)
}
