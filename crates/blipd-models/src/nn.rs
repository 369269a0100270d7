//! Small building blocks shared by every network: activations, attention core, masks.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::module::attention as fused_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::TensorPrimitive;

use crate::cpu::math::Act;
use crate::cpu::ops as kernels;

/// Additive value used to mask attention scores. Large enough that `exp` underflows to 0 in f32
/// and bf16, small enough not to overflow when added to finite scores.
pub const MASK_VALUE: f32 = -1.0e9;

/// CLIP's `quick_gelu`: `x * sigmoid(1.702 x)`.
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match kernels::act(x, Act::QuickGelu) {
        Ok(y) => y,
        Err(x) => x.clone() * activation::sigmoid(x * 1.702),
    }
}

/// SiLU `x·σ(x)`.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    kernels::act(x, Act::Silu).unwrap_or_else(activation::silu)
}

/// `gn.forward(x)` (our fused kernel on the CPU).
pub fn group_norm<B: Backend, const D: usize>(gn: &GroupNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    kernels::group_norm(gn, x, false).unwrap_or_else(|x| gn.forward(x))
}

/// `silu(gn.forward(x))`, what every resnet block of SD and its VAE computes: one pass per group on the
/// CPU.
pub fn group_norm_silu<B: Backend, const D: usize>(
    gn: &GroupNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    kernels::group_norm(gn, x, true).unwrap_or_else(|x| activation::silu(gn.forward(x)))
}

/// diffusers' `GEGLU` after its projection: `h [.., 2·I]` → `h[.., :I] · gelu(h[.., I:])`.
pub fn geglu<B: Backend, const D: usize>(h: Tensor<B, D>) -> Tensor<B, D> {
    match kernels::geglu(h) {
        Ok(y) => y,
        Err(h) => {
            let mut parts = h.chunk(2, D - 1);
            let gate = parts.pop().expect("chunk(2) yields two parts");
            let h = parts.pop().expect("chunk(2) yields two parts");
            h * gelu(gate)
        }
    }
}

/// Unmasked scaled dot-product attention on the projections' token layout: `q [B, Lq, H·D]`,
/// `k [B, Lk, H·D]`, `v [B, Lk, H·Dv]` → `[B, Lq, H·Dv]`. Our kernel on the CPU (no head permutation,
/// scores bounded per block); in training on other backends [`crate::efficient_attention`] (the
/// backend's attention forward, a blocked backward); elsewhere `burn::tensor::module::attention` (flash
/// attention on CubeCL backends), in the autocast dtype.
pub fn attention_tokens<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    scale: f64,
) -> Tensor<B, 3> {
    let [b, lq, hd] = q.dims();
    let [_, lk, hdv] = v.dims();
    crate::flops::attention([b, heads, lq, hd / heads], lk, hdv / heads);
    let (q, k, v) = match kernels::attention(q, k, v, heads, scale, false) {
        Ok(out) => return out,
        Err(qkv) => qkv,
    };
    let (q, back) = crate::amp::lower(split_heads(q, heads));
    let (k, _) = crate::amp::lower(split_heads(k, heads));
    let (v, _) = crate::amp::lower(split_heads(v, heads));
    let out = match crate::efficient_attention::try_attention(q, k, v, scale, false) {
        Ok(out) => out,
        Err((q, k, v)) => fused_attention(
            q,
            k,
            v,
            None,
            None,
            AttentionModuleOptions {
                scale: Some(scale),
                ..Default::default()
            },
        ),
    };
    merge_heads(crate::amp::restore(out, back))
}

/// [`attention_tokens`] where query `i` sees keys `0..=i` only (CLIP's causal text encoder; `Lq = Lk`).
/// Elsewhere than the CPU kernels: [`crate::efficient_attention`] in training, the materialised
/// attention with [`causal_bias`] in inference.
pub fn causal_attention_tokens<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    scale: f64,
) -> Tensor<B, 3> {
    let [b, lq, hd] = q.dims();
    let [_, lk, hdv] = v.dims();
    crate::flops::attention([b, heads, lq, hd / heads], lk, hdv / heads);
    let (q, k, v) = match kernels::attention(q, k, v, heads, scale, true) {
        Ok(out) => return out,
        Err(qkv) => qkv,
    };
    let (q, k, v) = (
        split_heads(q, heads),
        split_heads(k, heads),
        split_heads(v, heads),
    );
    let (q, back) = crate::amp::lower(q);
    let (k, _) = crate::amp::lower(k);
    let (v, _) = crate::amp::lower(v);
    let (q, k, v) = match crate::efficient_attention::try_attention(q, k, v, scale, true) {
        Ok(out) => return merge_heads(crate::amp::restore(out, back)),
        // The materialised path lowers its own products.
        Err((q, k, v)) => (
            crate::amp::restore(q, back),
            crate::amp::restore(k, back),
            crate::amp::restore(v, back),
        ),
    };
    let bias = causal_bias::<B>(lq, &q.device());
    merge_heads(attention(q, k, v, scale, Some(bias)))
}

/// A `1×1` convolution of `x [B, C, H, W]` returned as tokens `[B, H·W, C_out]` (one product on the CPU;
/// convolution then `NCHW → NLC` permutation elsewhere).
pub fn conv1x1_to_tokens<B: Backend>(c: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, _, h, w] = x.dims();
    let c_out = c.weight.dims()[0];
    crate::flops::conv2d([b, c_out, h, w], c.weight.dims());
    match kernels::conv1x1_to_tokens(c, x) {
        Ok(t) => t,
        Err(x) => crate::amp::conv2d_uncounted(c, x)
            .permute([0, 2, 3, 1])
            .reshape([b, h * w, c_out]),
    }
}

/// A `1×1` convolution of tokens `t [B, H·W, C]` back to `[B, C_out, H, W]`, plus `residual` (one
/// product accumulating onto the residual's buffer on the CPU).
pub fn tokens_to_conv1x1<B: Backend>(
    c: &Conv2d<B>,
    t: Tensor<B, 3>,
    hw: [usize; 2],
    residual: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, _, c_in] = t.dims();
    let c_out = c.weight.dims()[0];
    crate::flops::conv2d([b, c_out, hw[0], hw[1]], c.weight.dims());
    match kernels::tokens_to_conv1x1(c, t, hw, residual) {
        Ok(y) => y,
        Err((t, residual)) => {
            let x = t.reshape([b, hw[0], hw[1], c_in]).permute([0, 3, 1, 2]);
            crate::amp::conv2d_uncounted(c, x) + residual
        }
    }
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` with `approximate="none"`: `x · ½(1 + erf(x/√2))`.
///
/// Written with tensor ops rather than `burn::tensor::activation::gelu` because Burn 0.21's GELU
/// backward uses the derivative of the tanh approximation while its forward is exact, which puts
/// gradients ~3e-4 (relative) away from PyTorch's; through `erf` autodiff gets the exact derivative.
///
/// On the CPU backend in inference this is our vectorised kernel (erf as ATen computes it).
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match kernels::act(x, Act::Gelu) {
        Ok(y) => y,
        Err(x) => x.clone() * ((x * std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0) * 0.5,
    }
}

/// `torch.nn.LayerNorm` over the last axis: Burn's `LayerNorm` with the same fields (so weights load
/// and checkpoints key the same, `gamma`/`beta`) and a readable `epsilon`, which our training kernel
/// needs (Burn 0.21 keeps it private). The forward pass is Burn's `layer_norm` op, or one graph node
/// with our backward when training on the CPU backend.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Option<Param<Tensor<B, 1>>>,
    pub epsilon: f64,
}

/// Builds a [`LayerNorm`] like `burn::nn::LayerNormConfig` (ones and zeros, ε 1e-5 by default).
#[derive(Clone, Debug)]
pub struct LayerNormConfig {
    pub d_model: usize,
    pub epsilon: f64,
    pub bias: bool,
}

impl LayerNormConfig {
    pub fn new(d_model: usize) -> Self {
        Self {
            d_model,
            epsilon: 1e-5,
            bias: true,
        }
    }

    pub fn with_epsilon(mut self, epsilon: f64) -> Self {
        self.epsilon = epsilon;
        self
    }

    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> LayerNorm<B> {
        let ln = burn::nn::LayerNormConfig::new(self.d_model)
            .with_epsilon(self.epsilon)
            .with_bias(self.bias)
            .init(device);
        LayerNorm {
            gamma: ln.gamma,
            beta: ln.beta,
            epsilon: self.epsilon,
        }
    }
}

impl<B: Backend> LayerNorm<B> {
    /// `[..., d]` → `[..., d]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = match kernels::layer_norm(self, x) {
            Ok(y) => return y,
            Err(x) => x,
        };
        let gamma = self.gamma.val().into_primitive().tensor();
        let beta = self
            .beta
            .as_ref()
            .map(|b| b.val().into_primitive().tensor());
        Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm(
            x.into_primitive().tensor(),
            gamma,
            beta,
            self.epsilon,
        )))
    }
}

/// `e.forward(ids)`: `[B, L]` token ids → `[B, L, D]` rows of the table; one graph node with a single
/// zeroed gradient table when training on the CPU backend.
pub fn embedding<B: Backend>(e: &burn::nn::Embedding<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    if crate::cpu::autodiff::active::<B>() {
        match crate::cpu::autodiff::embedding(e, ids) {
            Ok(y) => return y,
            Err(ids) => return e.forward(ids),
        }
    }
    e.forward(ids)
}

/// A PyTorch-style `nn.Linear` (weights stored `[in, out]` in Burn; loaders transpose).
pub fn linear<B: Backend>(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

/// `[B, L, H*Dh]` → `[B, H, L, Dh]`.
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, l, c] = x.dims();
    x.reshape([b, l, heads, c / heads]).swap_dims(1, 2)
}

/// `[B, H, L, Dh]` → `[B, L, H*Dh]`.
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, l, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, l, h * d])
}

/// Attention probabilities `softmax(q kᵀ · scale + bias)` on `[B, H, Lq, Dh]` × `[B, H, Lk, Dh]`.
/// `bias` broadcasts to `[B, H, Lq, Lk]` (additive mask, 0 = attend, [`MASK_VALUE`] = masked).
pub fn attention_probs<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    scale: f64,
    bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let mut scores = crate::amp::matmul(q, k.swap_dims(2, 3)) * scale;
    if let Some(bias) = bias {
        scores = scores + bias;
    }
    activation::softmax(scores, 3)
}

/// Scaled dot-product attention, materialised (`probs · v`). Returns `[B, H, Lq, Dh]`.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
    bias: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    crate::amp::matmul(attention_probs(q, k, scale, bias), v)
}

/// Causal additive mask `[1, 1, L, L]`: position i attends to j ≤ i.
pub fn causal_bias<B: Backend>(len: usize, device: &B::Device) -> Tensor<B, 4> {
    let mut data = vec![0.0f32; len * len];
    for i in 0..len {
        for j in (i + 1)..len {
            data[i * len + j] = MASK_VALUE;
        }
    }
    Tensor::<B, 1>::from_floats(data.as_slice(), device).reshape([1, 1, len, len])
}

/// Padding mask `[B, 1, 1, L]` from a 0/1 attention mask `[B, L]` (1 = keep).
pub fn padding_bias<B: Backend>(mask: Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, l] = mask.dims();
    ((mask.neg() + 1.0) * MASK_VALUE).reshape([b, 1, 1, l])
}
