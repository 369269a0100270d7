//! Spatial transformer of the SD U-Net (diffusers `Transformer2DModel` on continuous input, with
//! `BasicTransformerBlock`s) and the attention-processor hook used by prompt-to-prompt editing.
//!
//! # The attention hook
//!
//! LAVIS's prompt-to-prompt replaces every U-Net attention processor with one that computes
//! `softmax(Q Kᵀ · scale)` explicitly and hands the probabilities to a controller **before** the value
//! matmul; the controller may store them and/or return edited ones (model.md §5.2). Here that is the
//! [`AttentionHook`] trait, passed to [`super::UNet2DConditionModel::forward`] through
//! [`super::UNetExtras::attention_hook`]:
//!
//! * [`AttentionHook::on_attention`] is called once per attention layer and forward pass, in
//!   execution order (for each transformer block: self-attention `attn1`, then cross-attention
//!   `attn2`), with an [`AttentionSite`] (place down/mid/up, block index, self/cross, heads, the
//!   query grid `height × width`, key length, running index) and the probabilities as
//!   **`[batch, heads, query_pixels, keys]`** (each row sums to 1; the CFG batch layout is the
//!   caller's, e.g. `[uncond…, cond…]`). It returns the probabilities to multiply with `V`, same shape.
//!   Returning the input unchanged is exact (bit-identical to not editing).
//! * [`AttentionHook::wants`] lets a hook skip layers it neither records nor edits (e.g. LAVIS's
//!   `AttentionStore` only keeps maps with ≤ 32² query pixels). Skipped layers keep using the fused
//!   kernel, which matters for memory: a materialised 64×64 self-attention map is
//!   `B · 8 · 4096² · 4 B` = 512 MiB per latent in f32 (performance.md / burn.md §3).
//!
//! * [`AttentionHook::forward_done`] is called at the end of each U-Net forward (one denoising step
//!   of a CFG-batched sampler), for step bookkeeping.
//!
//! SD-1.5 has 32 attention layers per forward (16 self + 16 cross: down 12, mid 2, up 18;
//! [`super::UNet2DConditionModel::num_attention_layers`]); `AttentionSite::index` runs over all of
//! them, including layers a hook did not want.

use crate::nn::{LayerNorm, LayerNormConfig};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear};
use burn::prelude::*;

use crate::nn::{
    attention_probs, attention_tokens, conv1x1_to_tokens, geglu, group_norm, linear, merge_heads,
    split_heads, tokens_to_conv1x1,
};

/// Which part of the U-Net an attention layer sits in (LAVIS's `place_in_unet`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UNetPlace {
    Down,
    Mid,
    Up,
}

impl UNetPlace {
    /// `"down"`, `"mid"` or `"up"`, as LAVIS names the places.
    pub fn as_str(&self) -> &'static str {
        match self {
            UNetPlace::Down => "down",
            UNetPlace::Mid => "mid",
            UNetPlace::Up => "up",
        }
    }
}

/// Where one attention call happens, handed to [`AttentionHook`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionSite {
    /// Running index of this attention call within the current forward pass (0-based; SD-1.5: 0..32).
    pub index: usize,
    /// Down, mid or up path.
    pub place: UNetPlace,
    /// Index in `down_blocks` / `up_blocks` (0 for the mid block).
    pub block: usize,
    /// Index in the block's `attentions` list (which `Transformer2DModel`).
    pub attention: usize,
    /// Index in that transformer's `transformer_blocks`.
    pub transformer_block: usize,
    /// `true` for `attn2` (keys from the text states), `false` for `attn1` (self-attention).
    pub is_cross: bool,
    /// Number of heads (the probabilities' dim 1).
    pub heads: usize,
    /// Query grid: the latent feature map's height and width at this layer.
    pub height: usize,
    pub width: usize,
    /// Number of keys (`height·width` for self-attention, text length for cross-attention).
    pub key_len: usize,
}

impl AttentionSite {
    /// Number of query pixels (`height · width`), what LAVIS compares against 32² / 16².
    pub fn query_pixels(&self) -> usize {
        self.height * self.width
    }
}

/// Reads and optionally replaces attention probabilities before the value matmul (prompt-to-prompt).
/// See the [module docs](self) for the calling convention.
pub trait AttentionHook<B: Backend> {
    /// Whether [`on_attention`](Self::on_attention) should be called for this layer. Layers a hook does
    /// not want run with the fused kernel and are not materialised. Default: every layer.
    fn wants(&self, site: &AttentionSite) -> bool {
        let _ = site;
        true
    }

    /// `probs`: `[batch, heads, query_pixels, key_len]`. Return the probabilities to use (same shape).
    fn on_attention(&mut self, site: &AttentionSite, probs: Tensor<B, 4>) -> Tensor<B, 4>;

    /// Called once at the end of every U-Net forward that carried this hook, with the number of
    /// attention layers the pass ran (wanted or not). One forward is one denoising step for a
    /// CFG-batched sampler, so this is where a controller does LAVIS's `between_steps` bookkeeping.
    /// (`ControlNetModel::forward_with` does not call it.) Default: nothing.
    fn forward_done(&mut self, layers: usize) {
        let _ = layers;
    }

    /// Called by the sampling loop ([`crate::sampling::denoise_with`]) with the latents after each
    /// scheduler step; returns the latents to continue from (LAVIS `controller.step_callback`, where
    /// prompt-to-prompt's LocalBlend works). Default: unchanged.
    fn step_callback(&mut self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        latents
    }
}

/// How attention is computed where no hook asks for the probabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `burn::tensor::module::attention`: flash attention on CubeCL backends in inference (no
    /// `L×L` score tensor), the materialised fallback elsewhere (NdArray, autodiff).
    #[default]
    Fused,
    /// Always `softmax(QKᵀ·scale)·V` with the scores materialised (same maths as the hook path).
    Materialized,
}

/// Per-forward state threaded through the blocks: the optional hook, the kernel and where we are.
pub struct AttentionContext<'a, B: Backend> {
    hook: Option<&'a mut (dyn AttentionHook<B> + 'a)>,
    kernel: AttentionKernel,
    next_index: usize,
    place: UNetPlace,
    block: usize,
    attention: usize,
}

impl<'a, B: Backend> AttentionContext<'a, B> {
    pub fn new(hook: Option<&'a mut (dyn AttentionHook<B> + 'a)>, kernel: AttentionKernel) -> Self {
        Self {
            hook,
            kernel,
            next_index: 0,
            place: UNetPlace::Down,
            block: 0,
            attention: 0,
        }
    }

    /// Number of attention calls made so far in this forward pass.
    pub fn calls(&self) -> usize {
        self.next_index
    }

    /// End of a U-Net forward: tell the hook how many layers ran.
    pub(crate) fn finish(mut self) {
        let calls = self.next_index;
        if let Some(hook) = self.hook.as_deref_mut() {
            hook.forward_done(calls);
        }
    }

    pub(crate) fn enter(&mut self, place: UNetPlace, block: usize) {
        self.place = place;
        self.block = block;
        self.attention = 0;
    }

    pub(crate) fn set_attention(&mut self, attention: usize) {
        self.attention = attention;
    }
}

/// diffusers `Attention` with the default processor: `to_q`/`to_k`/`to_v` without bias, `to_out.0`
/// with bias (stored as `to_out`; the key map handles the `.0`), scale `dim_head^-0.5`.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    pub to_out: Linear<B>,
    /// Low-rank adapters on the projections ([`crate::lora`]); `None` in a plain U-Net.
    pub lora: Option<crate::lora::AttentionLora<B>>,
    pub heads: usize,
    pub dim_head: usize,
}

impl<B: Backend> Attention<B> {
    pub fn new(
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        device: &B::Device,
    ) -> Self {
        let inner = heads * dim_head;
        let kv_dim = cross_attention_dim.unwrap_or(query_dim);
        Self {
            to_q: linear(query_dim, inner, false, device),
            to_k: linear(kv_dim, inner, false, device),
            to_v: linear(kv_dim, inner, false, device),
            to_out: linear(inner, query_dim, true, device),
            lora: None,
            heads,
            dim_head,
        }
    }

    /// `x`: `[B, Lq, C]`; `context`: `[B, Lk, Cc]` for cross-attention, `None` for self-attention.
    /// `site` carries everything but `index`/`key_len`, which are filled in here.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        context: Option<Tensor<B, 3>>,
        mut site: AttentionSite,
        actx: &mut AttentionContext<'_, B>,
    ) -> Tensor<B, 3> {
        let kv = context.unwrap_or_else(|| x.clone());
        let lora = self.lora.as_ref();
        let q = crate::lora::project(&self.to_q, lora.and_then(|l| l.to_q.as_ref()), x);
        let k = crate::lora::project(&self.to_k, lora.and_then(|l| l.to_k.as_ref()), kv.clone());
        let v = crate::lora::project(&self.to_v, lora.and_then(|l| l.to_v.as_ref()), kv);
        let scale = (self.dim_head as f64).powf(-0.5);

        site.index = actx.next_index;
        site.key_len = k.dims()[1];
        site.heads = self.heads;
        actx.next_index += 1;

        let heads = self.heads;
        let kernel = actx.kernel;
        let out = match actx.hook.as_deref_mut().filter(|h| h.wants(&site)) {
            Some(hook) => {
                let probs =
                    attention_probs(split_heads(q, heads), split_heads(k, heads), scale, None);
                let expected = probs.dims();
                let probs = hook.on_attention(&site, probs);
                assert_eq!(
                    probs.dims(),
                    expected,
                    "attention hook returned probabilities of the wrong shape at {site:?}"
                );
                merge_heads(crate::amp::matmul(probs, split_heads(v, heads)))
            }
            None => match kernel {
                AttentionKernel::Fused => attention_tokens(q, k, v, heads, scale),
                AttentionKernel::Materialized => merge_heads(crate::amp::matmul(
                    attention_probs(split_heads(q, heads), split_heads(k, heads), scale, None),
                    split_heads(v, heads),
                )),
            },
        };
        crate::lora::project(&self.to_out, lora.and_then(|l| l.to_out.as_ref()), out)
    }
}

/// diffusers `GEGLU`: `proj` to `2·inner`, then `h · gelu(gate)` with `(h, gate) = chunk(2)`.
#[derive(Module, Debug)]
pub struct Geglu<B: Backend> {
    pub proj: Linear<B>,
}

impl<B: Backend> Geglu<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        geglu(crate::amp::linear(&self.proj, x))
    }
}

/// diffusers `FeedForward` with GEGLU (`ff.net.0.proj` → `net_0.proj`, `ff.net.2` → `net_2`; the
/// dropout `net.1` has no weights).
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub net_0: Geglu<B>,
    pub net_2: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    pub fn new(dim: usize, mult: usize, device: &B::Device) -> Self {
        let inner = dim * mult;
        Self {
            net_0: Geglu {
                proj: linear(dim, inner * 2, true, device),
            },
            net_2: linear(inner, dim, true, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        crate::amp::linear(&self.net_2, self.net_0.forward(x))
    }
}

/// diffusers `BasicTransformerBlock` (norm_type `layer_norm`, eps 1e-5): pre-norm self-attention,
/// cross-attention and GEGLU feed-forward, each with a residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    pub norm1: LayerNorm<B>,
    pub attn1: Attention<B>,
    pub norm2: LayerNorm<B>,
    pub attn2: Attention<B>,
    pub norm3: LayerNorm<B>,
    pub ff: FeedForward<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    pub fn new(
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_attention_dim: usize,
        device: &B::Device,
    ) -> Self {
        let ln = || LayerNormConfig::new(dim).with_epsilon(1e-5).init(device);
        Self {
            norm1: ln(),
            attn1: Attention::new(dim, None, heads, dim_head, device),
            norm2: ln(),
            attn2: Attention::new(dim, Some(cross_attention_dim), heads, dim_head, device),
            norm3: ln(),
            ff: FeedForward::new(dim, 4, device),
        }
    }

    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        context: Tensor<B, 3>,
        site: AttentionSite,
        actx: &mut AttentionContext<'_, B>,
    ) -> Tensor<B, 3> {
        let self_site = AttentionSite {
            is_cross: false,
            ..site
        };
        let x = self
            .attn1
            .forward(self.norm1.forward(x.clone()), None, self_site, actx)
            + x;
        let cross_site = AttentionSite {
            is_cross: true,
            ..site
        };
        let x = self.attn2.forward(
            self.norm2.forward(x.clone()),
            Some(context),
            cross_site,
            actx,
        ) + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// diffusers `Transformer2DModel` for continuous input with `use_linear_projection=false`:
/// GroupNorm (eps 1e-6) → 1×1 conv `proj_in` → tokens → transformer blocks → 1×1 conv `proj_out` →
/// residual.
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: Backend> {
    pub norm: GroupNorm<B>,
    pub proj_in: Conv2d<B>,
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    pub proj_out: Conv2d<B>,
}

impl<B: Backend> Transformer2DModel<B> {
    /// `heads` heads of `channels / heads` dims (diffusers' `Transformer2DModel(heads, C // heads, C)`).
    pub fn new(
        channels: usize,
        heads: usize,
        num_layers: usize,
        cross_attention_dim: usize,
        groups: usize,
        device: &B::Device,
    ) -> Self {
        let dim_head = channels / heads;
        let inner = heads * dim_head;
        Self {
            norm: GroupNormConfig::new(groups, channels)
                .with_epsilon(1e-6)
                .init(device),
            proj_in: Conv2dConfig::new([channels, inner], [1, 1]).init(device),
            transformer_blocks: (0..num_layers)
                .map(|_| {
                    BasicTransformerBlock::new(inner, heads, dim_head, cross_attention_dim, device)
                })
                .collect(),
            proj_out: Conv2dConfig::new([inner, channels], [1, 1]).init(device),
        }
    }

    /// `x`: `[B, C, H, W]`, `context`: `[B, L, cross_attention_dim]`.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        context: Tensor<B, 3>,
        actx: &mut AttentionContext<'_, B>,
    ) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let residual = x.clone();
        let mut t = conv1x1_to_tokens(&self.proj_in, group_norm(&self.norm, x));
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            let site = AttentionSite {
                index: 0,
                place: actx.place,
                block: actx.block,
                attention: actx.attention,
                transformer_block: i,
                is_cross: false,
                heads: 0,
                height: h,
                width: w,
                key_len: 0,
            };
            t = block.forward(t, context.clone(), site, actx);
        }
        tokens_to_conv1x1(&self.proj_out, t, [h, w], residual)
    }

    /// Number of attention calls one forward makes (self + cross per transformer block).
    pub fn num_attention_layers(&self) -> usize {
        2 * self.transformer_blocks.len()
    }
}
