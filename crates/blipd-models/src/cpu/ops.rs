//! Burn modules and tensors through our kernels. Each function returns `Err` with its input untouched
//! when the kernels may not take it ([`super::flex::take`]: not burn-flex, not `f32`, autocast, off)
//! or when the op is one they do not cover (grouped convolutions, say); the caller — a function of
//! [`crate::amp`] or [`crate::nn`] — then runs Burn's op. Results are the same maths as Burn's ops,
//! to float rounding; `tests/cpu_kernels.rs` compares every function with Burn's path.

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear, PaddingConfig2d};
use burn::prelude::*;

use super::attention::AttentionSpec;
use super::autodiff as ad;
use super::conv::Conv2dSpec;
use super::flex::{self as fx, FlexTensor};
use super::gemm::{matmul, Operand};
use super::math::Act;
use super::norm::GroupNormSpec;

/// `l.forward(x)`.
pub(crate) fn linear<B: Backend, const D: usize>(
    l: &Linear<B>,
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if ad::active::<B>() {
        return ad::linear(l, x);
    }
    let Some(w) = fx::param(&l.weight) else {
        return Err(x);
    };
    let bias = match &l.bias {
        Some(b) => match fx::param(b) {
            Some(b) => Some(b),
            None => return Err(x),
        },
        None => None,
    };
    let x = fx::take(x)?;
    let shape = fx::dims(&x);
    let [d_in, d_out] = [fx::dims(&w)[0], fx::dims(&w)[1]];
    assert_eq!(
        shape[D - 1],
        d_in,
        "linear: input width {shape:?} vs weight [{d_in}, {d_out}]"
    );
    let rows: usize = shape[..D - 1].iter().product();
    let xs = fx::values(&x);
    let bs = bias.as_ref().map(fx::values);
    let mut w_owned = Vec::new();
    let wm = fx::matrix_or_copy(&w, &mut w_owned);
    let out = super::gemm::linear(&xs, rows, wm, bs.as_deref());
    let mut out_shape = shape;
    out_shape[D - 1] = d_out;
    Ok(fx::give(fx::tensor(out, &out_shape)))
}

/// Padding `[top, left, bottom, right]` of `c`, if our convolution covers it (one group).
pub(crate) fn conv_spec<B: Backend>(c: &Conv2d<B>, x: &[usize]) -> Option<Conv2dSpec> {
    if c.groups != 1 {
        return None;
    }
    let [c_out, c_in, kh, kw] = c.weight.dims();
    let pad = match c.padding {
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
        PaddingConfig2d::Same if c.stride == [1, 1] && kh % 2 == 1 && kw % 2 == 1 => {
            let (ph, pw) = (c.dilation[0] * (kh - 1) / 2, c.dilation[1] * (kw - 1) / 2);
            [ph, pw, ph, pw]
        }
        _ => return None,
    };
    let spec = Conv2dSpec {
        batch: x[0],
        c_in,
        h: x[2],
        w: x[3],
        c_out,
        kh,
        kw,
        stride: c.stride,
        dilation: c.dilation,
        pad,
    };
    (x[1] == c_in && spec.out_hw().is_some()).then_some(spec)
}

fn conv_params<B: Backend>(c: &Conv2d<B>) -> Option<(FlexTensor, Option<FlexTensor>)> {
    let w = fx::param(&c.weight)?;
    let b = match &c.bias {
        Some(b) => Some(fx::param(b)?),
        None => None,
    };
    Some((w, b))
}

/// `c.forward(x)`.
pub(crate) fn conv2d<B: Backend>(
    c: &Conv2d<B>,
    x: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    if ad::active::<B>() {
        return ad::conv2d(c, x);
    }
    let (Some(spec), Some((w, b))) = (conv_spec(c, &x.dims()), conv_params(c)) else {
        return Err(x);
    };
    let x = fx::take(x)?;
    let (ho, wo) = spec.out_hw().expect("checked by conv_spec");
    let bs = b.as_ref().map(fx::values);
    let out = super::conv::conv2d(&fx::values(&x), &fx::values(&w), bs.as_deref(), &spec);
    Ok(fx::give(fx::tensor(out, &[spec.batch, spec.c_out, ho, wo])))
}

/// `gn.forward(x)`, then SiLU when `silu`; in place when `x` is not shared.
pub(crate) fn group_norm<B: Backend, const D: usize>(
    gn: &GroupNorm<B>,
    x: Tensor<B, D>,
    silu: bool,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if ad::active::<B>() {
        return ad::group_norm(gn, x, silu);
    }
    let gamma = match &gn.gamma {
        Some(p) => match fx::param(p) {
            Some(t) => Some(t),
            None => return Err(x),
        },
        None => None,
    };
    let beta = match &gn.beta {
        Some(p) => match fx::param(p) {
            Some(t) => Some(t),
            None => return Err(x),
        },
        None => None,
    };
    let dims = x.dims();
    if D < 2 || dims[1] != gn.num_channels {
        return Err(x);
    }
    let mut x = fx::take(x)?;
    let (g, b) = (
        gamma.as_ref().map(fx::values),
        beta.as_ref().map(fx::values),
    );
    let spec = GroupNormSpec {
        batch: dims[0],
        channels: dims[1],
        spatial: dims[2..].iter().product(),
        groups: gn.num_groups,
        eps: gn.epsilon,
        gamma: if gn.affine { g.as_deref() } else { None },
        beta: if gn.affine { b.as_deref() } else { None },
        silu,
    };
    if let Some(data) = fx::unique_mut(&mut x) {
        super::norm::group_norm_inplace(data, &spec);
        return Ok(fx::give(x));
    }
    let out = super::norm::group_norm(&fx::values(&x), &spec);
    Ok(fx::give(fx::tensor(out, &dims)))
}

/// An activation, in place when `x` is not shared.
pub(crate) fn act<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    act: Act,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if ad::active::<B>() {
        return ad::act(x, act);
    }
    let dims = x.dims();
    let mut x = fx::take(x)?;
    if let Some(data) = fx::unique_mut(&mut x) {
        super::math::act_inplace(data, act);
        return Ok(fx::give(x));
    }
    let mut out = fx::values(&x).into_owned();
    super::math::act_inplace(&mut out, act);
    Ok(fx::give(fx::tensor(out, &dims)))
}

/// diffusers' GEGLU on `h [.., 2·inner]`: `h[.., :inner] · gelu(h[.., inner:])`.
pub(crate) fn geglu<B: Backend, const D: usize>(
    h: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if ad::active::<B>() {
        return ad::geglu(h);
    }
    let mut dims = h.dims();
    if !dims[D - 1].is_multiple_of(2) {
        return Err(h);
    }
    let h = fx::take(h)?;
    let inner = dims[D - 1] / 2;
    dims[D - 1] = inner;
    let mut out = super::output(dims.iter().product());
    super::math::geglu(&fx::values(&h), &mut out, inner);
    Ok(fx::give(fx::tensor(out, &dims)))
}

/// `ln.forward(x)`: one graph node with our backward when training on the CPU backend (burn-flex's
/// own inference kernel is already fused, so inference keeps Burn's op).
pub(crate) fn layer_norm<B: Backend, const D: usize>(
    ln: &crate::nn::LayerNorm<B>,
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if ad::active::<B>() {
        return ad::layer_norm(ln, x);
    }
    Err(x)
}

/// Query, key and value handed back when the kernel does not take them.
pub(crate) type Qkv<B> = (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>);

/// Attention of `q [B, Lq, H·D]` over `k [B, Lk, H·D]`, `v [B, Lk, H·Dv]` (the projections' layout),
/// `heads` heads, scores scaled by `scale`, query `i` seeing keys `0..=i` only when `causal`; returns
/// `[B, Lq, H·Dv]`.
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor<B, 3>, Qkv<B>> {
    let ([b, lq, hd], [bk, lk, hdk], [bv, lv, hdv]) = (q.dims(), k.dims(), v.dims());
    let shapes_ok = heads > 0
        && b == bk
        && b == bv
        && lk == lv
        && lk > 0
        && hd == hdk
        && hd.is_multiple_of(heads)
        && hdv.is_multiple_of(heads)
        && scale > 0.0
        && (!causal || lq == lk);
    if !shapes_ok {
        return Err((q, k, v));
    }
    let spec = AttentionSpec {
        batch: b,
        heads,
        q_len: lq,
        kv_len: lk,
        head_dim: hd / heads,
        value_dim: hdv / heads,
        scale: scale as f32,
        causal,
    };
    if ad::active::<B>() {
        return ad::attention(q, k, v, spec);
    }
    if !fx::active::<B>() {
        return Err((q, k, v));
    }
    let (q, k, v) = match (fx::take(q), fx::take(k), fx::take(v)) {
        (Ok(q), Ok(k), Ok(v)) => (q, k, v),
        (q, k, v) => {
            let back = |r: Result<FlexTensor, Tensor<B, 3>>| match r {
                Ok(t) => fx::give(t),
                Err(t) => t,
            };
            return Err((back(q), back(k), back(v)));
        }
    };
    let out = super::attention::attention(&fx::values(&q), &fx::values(&k), &fx::values(&v), &spec);
    Ok(fx::give(fx::tensor(out, &[b, lq, hdv])))
}

/// A `1×1` convolution of `x [B, C, H, W]` written as tokens `[B, H·W, C_out]` (the convolution and
/// the `NCHW → NLC` permutation in one product: `tokens_b = x_bᵀ · Wᵀ`).
pub(crate) fn conv1x1_to_tokens<B: Backend>(
    c: &Conv2d<B>,
    x: Tensor<B, 4>,
) -> Result<Tensor<B, 3>, Tensor<B, 4>> {
    let _timer = super::profile::Timer::start(12);
    let dims = x.dims();
    let pointwise = matches!(conv_spec(c, &dims), Some(s) if s.kh == 1 && s.kw == 1 && s.stride == [1, 1] && s.pad == [0; 4] && s.dilation == [1, 1]);
    let (true, Some((w, bias))) = (pointwise, conv_params(c)) else {
        return Err(x);
    };
    let x = fx::take(x)?;
    let [batch, c_in, h, wd] = dims;
    let (hw, c_out) = (h * wd, fx::dims(&w)[0]);
    let (xs, ws) = (fx::values(&x), fx::values(&w));
    let mut out = super::output(batch * hw * c_out);
    if let Some(b) = &bias {
        super::gemm::fill_cols(&mut out, &fx::values(b));
    }
    for (xb, ob) in xs
        .chunks_exact(c_in * hw)
        .zip(out.chunks_exact_mut(hw * c_out))
    {
        // SAFETY: `ob` is HW × C_out; `xb` is C_in × HW read transposed; `ws` is C_out × C_in read
        // transposed.
        unsafe {
            matmul(
                hw,
                c_out,
                c_in,
                ob.as_mut_ptr(),
                c_out,
                Operand::transposed(xb.as_ptr(), hw),
                Operand::transposed(ws.as_ptr(), c_in),
                bias.is_some(),
                super::threads(),
            )
        };
    }
    Ok(fx::give(fx::tensor(out, &[batch, hw, c_out])))
}

/// A `1×1` convolution of tokens `t [B, H·W, C]` back to `[B, C_out, H, W]`, plus `residual`
/// (`[B, C_out, H, W]`, whose buffer is reused when not shared): `out_b = W · t_bᵀ + bias + res_b`.
pub(crate) fn tokens_to_conv1x1<B: Backend>(
    c: &Conv2d<B>,
    t: Tensor<B, 3>,
    [h, wd]: [usize; 2],
    residual: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, (Tensor<B, 3>, Tensor<B, 4>)> {
    let _timer = super::profile::Timer::start(12);
    let [batch, hw, c_in] = t.dims();
    let rdims = residual.dims();
    let pointwise = matches!(conv_spec(c, &[batch, c_in, h, wd]), Some(s) if s.kh == 1 && s.kw == 1 && s.stride == [1, 1] && s.pad == [0; 4] && s.dilation == [1, 1]);
    let Some((w, bias)) = conv_params(c).filter(|_| pointwise && hw == h * wd) else {
        return Err((t, residual));
    };
    let c_out = fx::dims(&w)[0];
    if rdims != [batch, c_out, h, wd] || !fx::active::<B>() {
        return Err((t, residual));
    }
    let (t, res) = match (fx::take(t), fx::take(residual)) {
        (Ok(t), Ok(r)) => (t, r),
        (t, r) => {
            let t = t.map(fx::give).unwrap_or_else(|t| t);
            let r = r.map(fx::give).unwrap_or_else(|r| r);
            return Err((t, r));
        }
    };
    let mut res = fx::contiguous(res);
    if fx::unique_mut(&mut res).is_none() {
        res = fx::tensor(fx::values(&res).into_owned(), &rdims);
    }
    let out = fx::unique_mut(&mut res).expect("a fresh tensor owns its buffer");
    if let Some(b) = &bias {
        let b = fx::values(b);
        for ob in out.chunks_exact_mut(c_out * hw) {
            for (row, bv) in ob.chunks_exact_mut(hw).zip(b.iter()) {
                row.iter_mut().for_each(|v| *v += bv);
            }
        }
    }
    let (ts, ws) = (fx::values(&t), fx::values(&w));
    for (tb, ob) in ts
        .chunks_exact(hw * c_in)
        .zip(out.chunks_exact_mut(c_out * hw))
    {
        // SAFETY: `ob` is C_out × HW; `ws` is C_out × C_in; `tb` is HW × C_in read transposed.
        unsafe {
            matmul(
                c_out,
                hw,
                c_in,
                ob.as_mut_ptr(),
                hw,
                Operand::rows(ws.as_ptr(), c_in),
                Operand::transposed(tb.as_ptr(), c_in),
                true,
                super::threads(),
            )
        };
    }
    Ok(fx::give(res))
}
