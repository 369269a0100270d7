//! Memory-efficient attention for training on any backend: one node of Burn's autodiff graph whose
//! forward pass is the inner backend's own attention (flash attention on the CubeCL backends, so the
//! CUDA build gets it) and whose backward pass recomputes the scores one block of queries at a time
//! (`S = QKᵀ·s`, `P = softmax(S)`, `dV += Pᵀ·dO`, `dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O))`,
//! `dQ = dS·K·s`, `dK += dSᵀ·Q·s`). Burn 0.21's autodiff runs attention as its materialised fallback
//! and keeps every `[B, H, Lq, Lk]` score and probability tensor until the backward pass; here the
//! node keeps `Q`, `K`, `V` and the output, and the backward holds at most
//! [`SCORE_BLOCK_ELEMS`] scores at once.
//!
//! Written against the generic tensor API of the inner backend `X` (any `Autodiff<X>` works; the tests
//! use burn-flex). [`try_attention`] dispatches to it from the generic networks for the backends it is
//! built for: `Autodiff<Flex>` when our CPU kernels decline (bf16 autocast, `BLIPD_CPU_KERNELS=burn`)
//! and, with feature `cuda`, `Autodiff<Cuda>`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::backend::BackendTypes;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::TensorPrimitive;

/// The most attention scores (`B·H·block·Lk` elements) the backward pass materialises at once
/// (16 Mi elements: 64 MiB in f32).
pub const SCORE_BLOCK_ELEMS: usize = 1 << 24;

#[derive(Debug)]
struct EfficientAttentionBackward {
    scale: f64,
    causal: bool,
    /// The score budget of one block ([`SCORE_BLOCK_ELEMS`]; smaller in tests).
    budget: usize,
}

type Prim<X> = <X as BackendTypes>::FloatTensorPrimitive;

/// `q`, `k`, `v` and the output of the forward pass, all `[B, H, L, D]` on the inner backend.
#[derive(Clone, Debug)]
struct State<X: Backend> {
    q: Prim<X>,
    k: Prim<X>,
    v: Prim<X>,
    out: Prim<X>,
}

fn wrap<X: Backend>(p: Prim<X>) -> Tensor<X, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn unwrap<X: Backend>(t: Tensor<X, 4>) -> Prim<X> {
    t.into_primitive().tensor()
}

/// Queries per block so that one block's scores stay within `budget` elements.
fn query_block(budget: usize, batch_heads: usize, q_len: usize, k_len: usize) -> usize {
    (budget / (batch_heads * k_len).max(1)).clamp(1, q_len.max(1))
}

/// `dq`, `dk`, `dv` of attention given the output gradient `dout`, recomputing the probabilities one
/// query block at a time.
fn backward_blocked<X: Backend>(
    st: State<X>,
    dout: Tensor<X, 4>,
    scale: f64,
    causal: bool,
    budget: usize,
) -> [Tensor<X, 4>; 3] {
    let (q, k, v, out) = (
        wrap::<X>(st.q),
        wrap::<X>(st.k),
        wrap::<X>(st.v),
        wrap::<X>(st.out),
    );
    let [b, h, lq, _] = q.dims();
    let lk = k.dims()[2];
    let device = q.device();
    let kt = k.clone().swap_dims(2, 3);
    let vt = v.clone().swap_dims(2, 3);
    let mut dk = k.zeros_like();
    let mut dv = v.zeros_like();
    let mut dq = Vec::new();
    let block = query_block(budget, b * h, lq, lk);
    let mut i0 = 0;
    while i0 < lq {
        let i1 = (i0 + block).min(lq);
        let qb = q.clone().slice([0..b, 0..h, i0..i1, 0..q.dims()[3]]);
        let mut s = qb.clone().matmul(kt.clone()).mul_scalar(scale);
        if causal {
            // Query i sees keys 0..=i (the queries and keys are the same positions).
            let rows = Tensor::<X, 1, Int>::arange(i0 as i64..i1 as i64, &device).reshape([
                1,
                1,
                i1 - i0,
                1,
            ]);
            let cols = Tensor::<X, 1, Int>::arange(0..lk as i64, &device).reshape([1, 1, 1, lk]);
            let hidden = cols.greater(rows).expand([b, h, i1 - i0, lk]);
            s = s.mask_fill(hidden, f32::NEG_INFINITY);
        }
        let p = softmax(s, 3);
        let dob = dout.clone().slice([0..b, 0..h, i0..i1, 0..dout.dims()[3]]);
        let ob = out.clone().slice([0..b, 0..h, i0..i1, 0..out.dims()[3]]);
        dv = dv + p.clone().swap_dims(2, 3).matmul(dob.clone());
        let dp = dob.clone().matmul(vt.clone());
        let delta = (dob * ob).sum_dim(3);
        let ds = p * (dp - delta);
        dq.push(ds.clone().matmul(k.clone()).mul_scalar(scale));
        dk = dk + ds.swap_dims(2, 3).matmul(qb).mul_scalar(scale);
        i0 = i1;
    }
    [Tensor::cat(dq, 2), dk, dv]
}

impl<X: Backend> Backward<X, 3> for EfficientAttentionBackward {
    type State = State<X>;

    fn backward(self, ops: Ops<State<X>, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dout = wrap::<X>(grads.consume::<X>(&ops.node));
        let g = backward_blocked::<X>(ops.state, dout, self.scale, self.causal, self.budget);
        for (parent, g) in ops.parents.iter().zip(g) {
            if let Some(node) = parent {
                grads.register::<X>(node.id, unwrap(g));
            }
        }
    }
}

/// Scaled dot-product attention of `q [B, H, Lq, D]`, `k [B, H, Lk, D]`, `v [B, H, Lk, Dv]` as one
/// autodiff node with the blocked backward (see the module docs); `causal` hides key `j > i` from
/// query `i` (then `Lq = Lk`).
pub fn attention<X: Backend>(
    q: Tensor<Autodiff<X>, 4>,
    k: Tensor<Autodiff<X>, 4>,
    v: Tensor<Autodiff<X>, 4>,
    scale: f64,
    causal: bool,
) -> Tensor<Autodiff<X>, 4> {
    attention_within(q, k, v, scale, causal, SCORE_BLOCK_ELEMS)
}

/// [`attention`] whose backward materialises at most `budget` scores at once.
fn attention_within<X: Backend>(
    q: Tensor<Autodiff<X>, 4>,
    k: Tensor<Autodiff<X>, 4>,
    v: Tensor<Autodiff<X>, 4>,
    scale: f64,
    causal: bool,
    budget: usize,
) -> Tensor<Autodiff<X>, 4> {
    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let out = burn::tensor::module::attention(
        wrap::<X>(q.primitive.clone()),
        wrap::<X>(k.primitive.clone()),
        wrap::<X>(v.primitive.clone()),
        None,
        None,
        AttentionModuleOptions {
            scale: Some(scale),
            is_causal: causal,
            ..Default::default()
        },
    );
    let out = unwrap(out);
    let node = match (EfficientAttentionBackward {
        scale,
        causal,
        budget,
    })
    .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
    .compute_bound()
    .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            State::<X> {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                out: out.clone(),
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(node))
}

type Qkv<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

/// [`attention`] when `B` is `Autodiff<X>` for an `X` it is built for (see the module docs); the
/// tensors back otherwise.
pub fn try_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    scale: f64,
    causal: bool,
) -> Result<Tensor<B, 4>, Qkv<B>> {
    let qkv = (q, k, v);
    let qkv = match via::<B, burn::backend::Flex>(qkv, scale, causal) {
        Ok(out) => return Ok(out),
        Err(qkv) => qkv,
    };
    #[cfg(feature = "cuda")]
    let qkv = match via::<B, burn::backend::Cuda<f32>>(qkv, scale, causal) {
        Ok(out) => return Ok(out),
        Err(qkv) => qkv,
    };
    Err(qkv)
}

/// [`attention`] on `Autodiff<X>` when `B` is that backend.
fn via<B: Backend, X: Backend>(
    (q, k, v): Qkv<B>,
    scale: f64,
    causal: bool,
) -> Result<Tensor<B, 4>, Qkv<B>> {
    use crate::cpu::flex::cast;
    type AdPrim<X> = <Autodiff<X> as BackendTypes>::FloatTensorPrimitive;
    if std::any::TypeId::of::<B::FloatTensorPrimitive>() != std::any::TypeId::of::<AdPrim<X>>() {
        return Err((q, k, v));
    }
    let to = |t: Tensor<B, 4>| -> Tensor<Autodiff<X>, 4> {
        let p = cast::<B::FloatTensorPrimitive, AdPrim<X>>(t.into_primitive().tensor())
            .unwrap_or_else(|_| unreachable!("the types were compared"));
        Tensor::from_primitive(TensorPrimitive::Float(p))
    };
    let out = attention::<X>(to(q), to(k), to(v), scale, causal);
    let p = cast::<AdPrim<X>, B::FloatTensorPrimitive>(out.into_primitive().tensor())
        .unwrap_or_else(|_| unreachable!("the types were compared"));
    Ok(Tensor::from_primitive(TensorPrimitive::Float(p)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    type Ad = Autodiff<Flex>;

    fn materialised(
        q: Tensor<Ad, 4>,
        k: Tensor<Ad, 4>,
        v: Tensor<Ad, 4>,
        scale: f64,
        causal: bool,
    ) -> Tensor<Ad, 4> {
        let [_, _, lq, _] = q.dims();
        let lk = k.dims()[2];
        let mut s = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
        if causal {
            let hidden =
                Tensor::<Ad, 2, Bool>::tril_mask([lq, lk], 0, &s.device()).unsqueeze::<4>();
            let dims = s.dims();
            s = s.mask_fill(hidden.expand(dims), f32::NEG_INFINITY);
        }
        softmax(s, 3).matmul(v)
    }

    fn max_abs(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) -> f64 {
        blipd_testkit::max_abs_diff(
            &a.into_data().to_vec::<f32>().unwrap(),
            &b.into_data().to_vec::<f32>().unwrap(),
        )
    }

    #[test]
    fn gradients_match_the_materialised_attention_in_several_blocks() {
        let device = Default::default();
        for causal in [false, true] {
            let (lq, lk) = if causal { (37, 37) } else { (37, 23) };
            let draw = |l: usize, d: usize| {
                Tensor::<Ad, 4>::random([2, 3, l, d], Distribution::Normal(0.0, 1.0), &device)
                    .require_grad()
            };
            let (q, k, v) = (draw(lq, 8), draw(lk, 8), draw(lk, 5));
            let w = Tensor::<Ad, 4>::random([2, 3, lq, 5], Distribution::Normal(0.0, 1.0), &device);
            let scale = 0.3;
            // Blocks of 5 queries: several blocks and a ragged last one.
            let budget = 2 * 3 * 5 * lk;
            assert_eq!(query_block(budget, 6, lq, lk), 5);
            let run = |f: &dyn Fn(_, _, _) -> Tensor<Ad, 4>| {
                let (q, k, v) = (q.clone(), k.clone(), v.clone());
                let y = f(q.clone(), k.clone(), v.clone());
                let grads = (y.clone() * w.clone()).sum().backward();
                (
                    y.inner(),
                    [
                        q.grad(&grads).unwrap(),
                        k.grad(&grads).unwrap(),
                        v.grad(&grads).unwrap(),
                    ],
                )
            };
            let (y0, g0) = run(&|q, k, v| materialised(q, k, v, scale, causal));
            let (y1, g1) = run(&|q, k, v| attention_within::<Flex>(q, k, v, scale, causal, budget));
            let (y2, g2) = run(&|q, k, v| attention::<Flex>(q, k, v, scale, causal));
            assert!(max_abs(y1.clone(), y2) == 0.0);
            for (a, b) in g1.iter().zip(g2) {
                assert!(max_abs(a.clone(), b) < 1e-5, "one block vs several");
            }
            let e = max_abs(y0, y1);
            println!("causal {causal}: output max |Δ| {e:.2e}");
            assert!(e < 1e-5);
            for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(g0.into_iter().zip(g1)) {
                let e = max_abs(a, b);
                println!("causal {causal}: {name} max |Δ| {e:.2e}");
                assert!(e < 1e-5, "{name}");
            }
        }
    }

    #[test]
    fn taken_in_training_only() {
        let device = Default::default();
        let t = |l| Tensor::<Ad, 4>::ones([1, 2, l, 4], &device);
        assert!(try_attention(t(3), t(5), t(5), 0.5, false).is_ok());
        let t = |l| Tensor::<Flex, 4>::ones([1, 2, l, 4], &device);
        let back = try_attention(t(3), t(5), t(5), 0.5, false);
        assert!(back.is_err(), "inference keeps the backend's own attention");
        type Nd = Autodiff<burn::backend::NdArray>;
        let t = |l| Tensor::<Nd, 4>::ones([1, 2, l, 4], &Default::default());
        assert!(try_attention(t(3), t(5), t(5), 0.5, false).is_err());
    }

    #[test]
    fn query_blocks_bound_the_scores() {
        let b = SCORE_BLOCK_ELEMS;
        assert_eq!(query_block(b, 16, 4096, 4096), b / (16 * 4096));
        assert_eq!(query_block(b, 1, 10, 10), 10);
        assert_eq!(query_block(b, 1 << 20, 10, 1 << 10), 1);
    }
}
