//! The SD-1.5 CLIP text encoder, extended as BLIP-Diffusion's context text encoder.
//!
//! Module names mirror transformers' `CLIPTextModel` (`text_model.embeddings.token_embedding`, …,
//! `text_model.final_layer_norm`), so a diffusers `text_encoder/` state dict loads with an identity key
//! map (the non-persistent `position_ids` buffer is dropped).
//!
//! [`ContextClipTextModel::forward`] follows diffusers' `ContextCLIPTextModel` (a copy of LAVIS'
//! `CtxCLIPTextModel`): the `L` prompt tokens are embedded, the 16 subject embeddings are spliced in
//! **after** token `ctx_begin_pos` (2 in the released pipeline: after `<BOS>` and `"a"`), position
//! embeddings `0..L+16` are added and a plain causal mask covers the whole spliced sequence (the
//! subject tokens attend causally too; no padding mask). The output is the last hidden state after
//! `final_layer_norm`. Without context embeddings it is exactly `CLIPTextModel.last_hidden_state`.
//!
//! One quirk kept in mind: diffusers' `ContextCLIPTextTransformer` builds `final_layer_norm` with
//! torch's default eps (1e-5) while `CLIPTextModel` uses `config.layer_norm_eps`. Every released CLIP
//! text config has `layer_norm_eps = 1e-5`, so both agree; this port uses `layer_norm_eps`.

use crate::nn::{LayerNorm, LayerNormConfig};
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::nn::{
    attention, causal_attention_tokens, gelu, linear, merge_heads, quick_gelu, split_heads,
};
use crate::weights::{load_strict, save_safetensors, KeyMap, StateDict};
use crate::ModelError;

/// Number of subject (context) embeddings BLIP-Diffusion splices into the prompt.
pub const NUM_CTX_TOKENS: usize = 16;
/// Splice position used by the released pipeline (`model_index.json`: `ctx_begin_pos: 2`).
pub const DEFAULT_CTX_BEGIN_POS: usize = 2;

/// File of a fine-tuned pipeline's cached subject embedding (`[1, N, D]` under [`CTX_CACHE_KEY`];
/// LAVIS `ctx_embeddings_cache`): generation uses it instead of a reference image.
pub const CTX_CACHE_FILE: &str = "ctx_embeddings_cache.safetensors";
/// Tensor name in [`CTX_CACHE_FILE`] (LAVIS' parameter name).
pub const CTX_CACHE_KEY: &str = "ctx_embeddings_cache";

/// transformers `CLIPTextConfig` (json field names). Missing fields take transformers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub attention_dropout: f64,
    pub initializer_range: f64,
    pub initializer_factor: f64,
    pub pad_token_id: i64,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
}

impl Default for ClipTextConfig {
    /// transformers 4.44.2 `CLIPTextConfig()` defaults (the ViT-B/32 text tower).
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            initializer_range: 0.02,
            initializer_factor: 1.0,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
        }
    }
}

impl ClipTextConfig {
    /// SD-1.5 text encoder (OpenAI CLIP ViT-L/14 text tower), as in
    /// `runwayml/stable-diffusion-v1-5/text_encoder/config.json` (same numbers in
    /// `Salesforce/blipdiffusion/text_encoder/config.json`, model.md §1.4/§2.1).
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
            initializer_range: 0.02,
            initializer_factor: 1.0,
            pad_token_id: 1,
            bos_token_id: 0,
            eos_token_id: 2,
        }
    }

    /// A tiny config for tests (the parity fixture uses the same numbers). 16 context tokens plus
    /// an 8-token prompt fit in `max_position_embeddings = 24`.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 99,
            hidden_size: 32,
            intermediate_size: 64,
            projection_dim: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: 24,
            ..Self::sd15()
        }
    }

    /// Read a `config.json` (e.g. `text_encoder/config.json`).
    pub fn from_file(path: &std::path::Path) -> Result<Self, ModelError> {
        let cfg: Self = crate::read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    fn activation(&self) -> Result<HiddenAct, ModelError> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(HiddenAct::QuickGelu),
            "gelu" => Ok(HiddenAct::Gelu),
            other => Err(ModelError::Invalid(format!(
                "CLIP text hidden_act `{other}` is not supported (expected `quick_gelu` or `gelu`)"
            ))),
        }
    }

    /// Check the numbers are consistent before building a model.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(ModelError::Invalid(format!(
                "CLIP text hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 || self.hidden_size == 0 {
            return Err(ModelError::Invalid(format!(
                "CLIP text config has a zero size (vocab_size {}, max_position_embeddings {}, hidden_size {})",
                self.vocab_size, self.max_position_embeddings, self.hidden_size
            )));
        }
        self.activation().map(|_| ())
    }

    /// Build a randomly initialised model (load weights with [`ContextClipTextModel::load_state_dict`]).
    pub fn init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<ContextClipTextModel<B>, ModelError> {
        self.validate()?;
        let act = self.activation()?;
        let d = self.hidden_size;
        let ln = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let layers = (0..self.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: linear(d, d, true, device),
                    k_proj: linear(d, d, true, device),
                    v_proj: linear(d, d, true, device),
                    out_proj: linear(d, d, true, device),
                    num_heads: self.num_attention_heads,
                },
                layer_norm1: ln(),
                mlp: ClipMlp {
                    fc1: linear(d, self.intermediate_size, true, device),
                    fc2: linear(self.intermediate_size, d, true, device),
                    act,
                },
                layer_norm2: ln(),
            })
            .collect();
        Ok(ContextClipTextModel {
            text_model: ClipTextTransformer {
                embeddings: ClipTextEmbeddings {
                    token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
                    position_embedding: EmbeddingConfig::new(self.max_position_embeddings, d)
                        .init(device),
                },
                encoder: ClipEncoder { layers },
                final_layer_norm: ln(),
            },
            max_position_embeddings: self.max_position_embeddings,
            hidden_size: d,
        })
    }
}

/// MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAct {
    QuickGelu,
    Gelu,
}

/// `text_model.embeddings`.
#[derive(Module, Debug)]
pub struct ClipTextEmbeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

/// `text_model.encoder.layers.{i}.self_attn`.
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub num_heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    /// `x`: `[B, L, D]`, `bias`: additive mask broadcastable to `[B, H, L, L]`.
    pub fn forward(&self, x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let [_, _, d] = x.dims();
        let scale = ((d / self.num_heads) as f64).powf(-0.5);
        let q = split_heads(crate::amp::linear(&self.q_proj, x.clone()), self.num_heads);
        let k = split_heads(crate::amp::linear(&self.k_proj, x.clone()), self.num_heads);
        let v = split_heads(crate::amp::linear(&self.v_proj, x), self.num_heads);
        let out = merge_heads(attention(q, k, v, scale, bias));
        crate::amp::linear(&self.out_proj, out)
    }

    /// [`Self::forward`] with the causal mask (what the text encoder uses), without materialising
    /// it where our attention kernel runs.
    pub fn forward_causal(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [_, _, d] = x.dims();
        let scale = ((d / self.num_heads) as f64).powf(-0.5);
        let q = crate::amp::linear(&self.q_proj, x.clone());
        let k = crate::amp::linear(&self.k_proj, x.clone());
        let v = crate::amp::linear(&self.v_proj, x);
        let out = causal_attention_tokens(q, k, v, self.num_heads, scale);
        crate::amp::linear(&self.out_proj, out)
    }
}

/// `text_model.encoder.layers.{i}.mlp`.
#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    #[module(skip)]
    pub act: HiddenAct,
}

impl<B: Backend> ClipMlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = crate::amp::linear(&self.fc1, x);
        let h = match self.act {
            HiddenAct::QuickGelu => quick_gelu(h),
            HiddenAct::Gelu => gelu(h),
        };
        crate::amp::linear(&self.fc2, h)
    }
}

/// `text_model.encoder.layers.{i}`: pre-LN residual block.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    pub self_attn: ClipAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: ClipMlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

impl<B: Backend> ClipEncoderLayer<B> {
    pub fn forward(&self, x: Tensor<B, 3>, bias: Option<Tensor<B, 4>>) -> Tensor<B, 3> {
        let h = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), bias);
        h.clone() + self.mlp.forward(self.layer_norm2.forward(h))
    }

    /// [`Self::forward`] with the causal mask.
    pub fn forward_causal(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = x.clone() + self.self_attn.forward_causal(self.layer_norm1.forward(x));
        h.clone() + self.mlp.forward(self.layer_norm2.forward(h))
    }
}

/// `text_model.encoder`.
#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// `text_model`.
#[derive(Module, Debug)]
pub struct ClipTextTransformer<B: Backend> {
    pub embeddings: ClipTextEmbeddings<B>,
    pub encoder: ClipEncoder<B>,
    pub final_layer_norm: LayerNorm<B>,
}

/// CLIP text encoder with BLIP-Diffusion's subject-embedding splice (diffusers
/// `ContextCLIPTextModel`; also a plain `CLIPTextModel` when no context is given).
#[derive(Module, Debug)]
pub struct ContextClipTextModel<B: Backend> {
    pub text_model: ClipTextTransformer<B>,
    pub max_position_embeddings: usize,
    pub hidden_size: usize,
}

impl<B: Backend> ContextClipTextModel<B> {
    /// Token ids `[B, L]` (+ optional subject embeddings `[B, N, D]`, N = 16 in BLIP-Diffusion, spliced
    /// after token `ctx_begin_pos`) → last hidden state after `final_layer_norm`, `[B, L + N, D]`.
    ///
    /// Errors (never panics) when `L + N > max_position_embeddings`, when the context batch or width
    /// does not match, or when `ctx_begin_pos > L`. `ctx_begin_pos` is ignored without context.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        ctx_embeddings: Option<Tensor<B, 3>>,
        ctx_begin_pos: usize,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let embeds = self.embed(input_ids, ctx_embeddings, ctx_begin_pos)?;
        Ok(self.encode_embeds(embeds))
    }

    /// The transformer over already-built input embeddings `[B, L, D]` (token + position, subject
    /// embeddings spliced), causal mask over all positions, then `final_layer_norm`.
    pub fn encode_embeds(&self, embeds: Tensor<B, 3>) -> Tensor<B, 3> {
        let mut h = embeds;
        for layer in &self.text_model.encoder.layers {
            h = layer.forward_causal(h);
        }
        self.text_model.final_layer_norm.forward(h)
    }

    /// The embedding step alone (token embeddings, splice, position embeddings): `[B, L + N, D]`.
    pub fn embed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        ctx_embeddings: Option<Tensor<B, 3>>,
        ctx_begin_pos: usize,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let tokens = self.token_embeddings(input_ids);
        self.embed_tokens(tokens, ctx_embeddings, ctx_begin_pos)
    }

    /// The token-embedding rows of `input_ids` `[B, L]` → `[B, L, D]` (no positions). Looking up
    /// several prompts' ids at once (`[1, ΣL]`, then slicing) gives training one gradient table
    /// for the whole batch instead of one per prompt.
    pub fn token_embeddings(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        crate::nn::embedding(&self.text_model.embeddings.token_embedding, input_ids)
    }

    /// [`Self::embed`] from token embeddings `[B, L, D]` already looked up.
    pub fn embed_tokens(
        &self,
        tokens: Tensor<B, 3>,
        ctx_embeddings: Option<Tensor<B, 3>>,
        ctx_begin_pos: usize,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let [batch, len, _] = tokens.dims();
        let ctx_len = match &ctx_embeddings {
            Some(ctx) => {
                let [cb, cn, cd] = ctx.dims();
                if cb != batch || cd != self.hidden_size {
                    return Err(ModelError::Invalid(format!(
                        "context CLIP text: ctx_embeddings shape [{cb}, {cn}, {cd}] does not fit the \
                         [{batch}, {len}] prompt tokens and hidden size {} (expected [{batch}, N, {}])",
                        self.hidden_size, self.hidden_size
                    )));
                }
                if ctx_begin_pos > len {
                    return Err(ModelError::Invalid(format!(
                        "context CLIP text: ctx_begin_pos {ctx_begin_pos} is past the {len} prompt tokens"
                    )));
                }
                cn
            }
            None => 0,
        };
        let seq = len + ctx_len;
        if seq > self.max_position_embeddings {
            return Err(ModelError::Invalid(format!(
                "context CLIP text: {len} tokens + {ctx_len} context embeddings = {seq} positions, more than \
                 max_position_embeddings {} (tokenize the prompt to at most {} tokens)",
                self.max_position_embeddings,
                self.max_position_embeddings.saturating_sub(ctx_len)
            )));
        }
        if len == 0 && ctx_len == 0 {
            return Err(ModelError::Invalid(
                "context CLIP text: empty input (no tokens, no context)".into(),
            ));
        }
        let emb = &self.text_model.embeddings;
        let spliced = match ctx_embeddings {
            None => tokens,
            Some(ctx) => {
                let mut parts = Vec::with_capacity(3);
                if ctx_begin_pos > 0 {
                    parts.push(tokens.clone().narrow(1, 0, ctx_begin_pos));
                }
                parts.push(ctx);
                if ctx_begin_pos < len {
                    parts.push(tokens.narrow(1, ctx_begin_pos, len - ctx_begin_pos));
                }
                Tensor::cat(parts, 1)
            }
        };
        let pos = emb
            .position_embedding
            .weight
            .val()
            .narrow(0, 0, seq)
            .unsqueeze_dim::<3>(0);
        Ok(spliced + pos)
    }

    /// transformers' `pooler_output` for a plain CLIP text pass (no context): the hidden state at the
    /// first `eos_token_id` of each row (the highest id when `eos_token_id == 2`, transformers' legacy
    /// rule for old configs such as SD-1.5's). `last_hidden` is `[B, L, D]`, `input_ids` `[B, L]`.
    pub fn pooled_output(
        last_hidden: Tensor<B, 3>,
        input_ids: Tensor<B, 2, Int>,
        eos_token_id: i64,
    ) -> Tensor<B, 2> {
        let [b, _, d] = last_hidden.dims();
        let idx = if eos_token_id == 2 {
            input_ids.argmax(1)
        } else {
            // argmax over a 0/1 mask returns the first maximum, i.e. the first EOS.
            input_ids.equal_elem(eos_token_id).int().argmax(1)
        };
        let idx = idx.reshape([b, 1, 1]).expand([b, 1, d]);
        last_hidden.gather(1, idx).reshape([b, d])
    }

    /// Load a state dict in the reference (transformers `CLIPTextModel`) layout, strictly.
    pub fn load_state_dict(self, mut sd: StateDict) -> Result<Self, ModelError> {
        sd.drop_keys(|k| k.ends_with("embeddings.position_ids"));
        Ok(load_strict(self, sd, &key_map(), "text_encoder")?)
    }

    /// Build from a `text_encoder/` folder (`config.json` + weight file).
    pub fn from_dir(dir: &std::path::Path, device: &B::Device) -> Result<Self, ModelError> {
        let cfg = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let sd = StateDict::read(&crate::weights::component_weight_file(dir)?)?;
        cfg.init::<B>(device)?.load_state_dict(sd)
    }

    /// Save in the reference layout (loads with `CLIPTextModel.from_pretrained` /
    /// `ContextCLIPTextModel.from_pretrained` after writing a `config.json` beside it).
    pub fn save(&self, path: &std::path::Path) -> Result<(), ModelError> {
        Ok(save_safetensors(self, &reverse_key_map(), path)?)
    }
}

/// Reference keys → module paths. Module fields mirror transformers' names, so this is the identity;
/// LAVIS' `text_encoder/pytorch_model.bin` uses the same `text_model.*` names.
pub fn key_map() -> KeyMap {
    KeyMap::identity()
}

/// Module paths → reference keys (identity, see [`key_map`]); Linear transposes and LayerNorm
/// gamma/beta → weight/bias are handled by the save adapter.
pub fn reverse_key_map() -> KeyMap {
    KeyMap::identity()
}
