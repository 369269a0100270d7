//! Small building blocks shared by every network: activations, attention core, masks.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation;

/// Additive value used to mask attention scores. Large enough that `exp` underflows to 0 in f32
/// and bf16, small enough not to overflow when added to finite scores.
pub const MASK_VALUE: f32 = -1.0e9;

/// CLIP's `quick_gelu`: `x * sigmoid(1.702 x)`.
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() * activation::sigmoid(x * 1.702)
}

/// Exact (erf) GELU, as `torch.nn.functional.gelu` with `approximate="none"`: `x · ½(1 + erf(x/√2))`.
///
/// Written with tensor ops rather than `burn::tensor::activation::gelu` because Burn 0.21's GELU
/// backward uses the derivative of the tanh approximation while its forward is exact, which puts
/// gradients ~3e-4 (relative) away from PyTorch's; through `erf` autodiff gets the exact derivative.
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() * ((x * std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0) * 0.5
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
