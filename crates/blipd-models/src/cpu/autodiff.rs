//! Our kernels as operations of Burn's autodiff graph, for training on the CPU backend
//! (`Autodiff<Flex>`): each forward pass runs the kernel on the inner burn-flex tensors and records
//! one graph node whose backward pass is ours too (`conv2d_backward`, `linear_backward`, the
//! GroupNorm/LayerNorm backward with recomputed pre-activations, attention's backward from the saved
//! log-sum-exp). Burn 0.21 would otherwise build each of these from a dozen generic ops (broadcast
//! bias additions, decomposed norms, the materialised attention fallback), each recorded and
//! differentiated separately.
//!
//! This is the extension mechanism the Burn book describes for custom kernels (a `Backward`
//! implementation prepared on the node's parents); the state a backward pass needs is kept in the
//! node (NoCheckpointing semantics: nothing is recomputed by the graph). Gradients flow to every
//! parent that requires one; untracked inputs (a frozen tower) still get the fast forward pass.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::Flex;
use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear};

use crate::nn::LayerNorm;
use burn::prelude::*;
use burn::tensor::backend::BackendTypes;
use burn::tensor::{DType, TensorMetadata, TensorPrimitive};

use super::attention::AttentionSpec;
use super::conv::Conv2dSpec;
use super::flex::{self as fx, FlexTensor};
use super::math::Act;
use super::norm::GroupNormSpec;

/// The training backend the kernels extend.
pub(crate) type Ad = Autodiff<Flex>;
/// Its float tensor: the inner burn-flex tensor and its graph node.
pub(crate) type AdTensor = <Ad as BackendTypes>::FloatTensorPrimitive;

/// Whether `B` is `Autodiff<Flex>` and the kernels may run now.
pub(crate) fn active<B: Backend>() -> bool {
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<AdTensor>()
        && super::enabled()
        && crate::amp::autocast_dtype().is_none()
}

fn take<B: Backend, const D: usize>(x: Tensor<B, D>) -> Result<AdTensor, Tensor<B, D>> {
    if !active::<B>() || x.dtype() != DType::F32 {
        return Err(x);
    }
    match x.into_primitive() {
        TensorPrimitive::Float(p) => fx::cast::<B::FloatTensorPrimitive, AdTensor>(p)
            .map_err(|p| Tensor::from_primitive(TensorPrimitive::Float(p))),
        q => Err(Tensor::from_primitive(q)),
    }
}

fn give<B: Backend, const D: usize>(t: AdTensor) -> Tensor<B, D> {
    let p = fx::cast::<AdTensor, B::FloatTensorPrimitive>(t)
        .unwrap_or_else(|_| panic!("cpu::autodiff::give on a backend that is not Autodiff<Flex>"));
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn param<B: Backend, const D: usize>(p: &Param<Tensor<B, D>>) -> Option<AdTensor> {
    take(p.val()).ok()
}

/// Parameters that are all present, or `None` when one cannot be taken.
fn opt_param<B: Backend, const D: usize>(
    p: &Option<Param<Tensor<B, D>>>,
) -> Result<Option<AdTensor>, ()> {
    match p {
        None => Ok(None),
        Some(p) => param(p).map(Some).ok_or(()),
    }
}

fn dims(t: &AdTensor) -> Vec<usize> {
    t.primitive.shape().iter().copied().collect()
}

/// Records `out` as the result of `op` on `parents`, with the state `state()` when any parent needs
/// a gradient.
fn record<BO, const N: usize>(
    op: BO,
    parents: [&AdTensor; N],
    out: FlexTensor,
    state: impl FnOnce() -> BO::State,
) -> AdTensor
where
    BO: Backward<Flex, N>,
{
    match op
        .prepare::<NoCheckpointing>(parents.map(|p| p.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Registers `g()` (shaped `shape`) as the gradient of parent `i` when it has a node.
macro_rules! grad_to {
    ($grads:expr, $parents:expr, $i:expr, $g:expr, $shape:expr) => {
        if let Some(Some(node)) = $parents.get($i) {
            if let Some(g) = $g {
                $grads.register::<Flex>(node.id, fx::tensor(g, $shape));
            }
        }
    };
}

fn wants<T>(parents: &[Option<T>], i: usize) -> bool {
    matches!(parents.get(i), Some(Some(_)))
}

// ---------------------------------------------------------------------------------------------
// Linear

#[derive(Debug)]
struct LinearBackward;

#[derive(Clone, Debug)]
struct LinearState {
    x: FlexTensor,
    w: FlexTensor,
    x_shape: Vec<usize>,
}

impl<const N: usize> Backward<Flex, N> for LinearBackward {
    type State = LinearState;

    fn backward(self, ops: Ops<LinearState, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let start = std::time::Instant::now();
        let dy = grads.consume::<Flex>(&ops.node);
        let LinearState { x, w, x_shape } = ops.state;
        let [d_in, d_out] = [fx::dims(&w)[0], fx::dims(&w)[1]];
        let rows = x_shape.iter().product::<usize>() / d_in;
        let want = [0, 1, 2].map(|i| wants(&ops.parents, i));
        let mut w_owned = Vec::new();
        let wm = fx::matrix_or_copy(&w, &mut w_owned);
        let [dx, dw, db] =
            super::gemm::linear_backward(&fx::values(&x), rows, wm, &fx::values(&dy), want);
        grad_to!(grads, ops.parents, 0, dx, &x_shape);
        grad_to!(grads, ops.parents, 1, dw, &[d_in, d_out]);
        grad_to!(grads, ops.parents, 2, db, &[d_out]);
        super::profile::add(3, start);
    }
}

/// `l.forward(x)` as one graph node.
pub(crate) fn linear<B: Backend, const D: usize>(
    l: &Linear<B>,
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let (Some(w), Ok(b)) = (param(&l.weight), opt_param(&l.bias)) else {
        return Err(x);
    };
    let x = take(x)?;
    let shape = dims(&x);
    let [d_in, d_out] = [dims(&w)[0], dims(&w)[1]];
    assert_eq!(
        shape[D - 1],
        d_in,
        "linear: input width {shape:?} vs weight [{d_in}, {d_out}]"
    );
    let rows: usize = shape[..D - 1].iter().product();
    let bias = b.as_ref().map(|b| fx::values(&b.primitive).into_owned());
    let mut w_owned = Vec::new();
    let wm = fx::matrix_or_copy(&w.primitive, &mut w_owned);
    let y = super::gemm::linear(&fx::values(&x.primitive), rows, wm, bias.as_deref());
    let mut out_shape = shape.clone();
    out_shape[D - 1] = d_out;
    let out = fx::tensor(y, &out_shape);
    let state = || LinearState {
        x: x.primitive.clone(),
        w: w.primitive.clone(),
        x_shape: shape,
    };
    let t = match &b {
        Some(b) => record(LinearBackward, [&x, &w, b], out, state),
        None => record(LinearBackward, [&x, &w], out, state),
    };
    Ok(give(t))
}

// ---------------------------------------------------------------------------------------------
// Conv2d

#[derive(Debug)]
struct ConvBackward;

#[derive(Clone, Debug)]
struct ConvState {
    x: FlexTensor,
    w: FlexTensor,
    spec: Conv2dSpec,
}

impl<const N: usize> Backward<Flex, N> for ConvBackward {
    type State = ConvState;

    fn backward(self, ops: Ops<ConvState, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let start = std::time::Instant::now();
        let dy = grads.consume::<Flex>(&ops.node);
        let ConvState { x, w, spec: s } = ops.state;
        let want = [0, 1, 2].map(|i| wants(&ops.parents, i));
        let [dx, dw, db] = super::conv::conv2d_backward(
            &fx::values(&x),
            &fx::values(&w),
            &fx::values(&dy),
            &s,
            want,
        );
        grad_to!(grads, ops.parents, 0, dx, &[s.batch, s.c_in, s.h, s.w]);
        grad_to!(grads, ops.parents, 1, dw, &[s.c_out, s.c_in, s.kh, s.kw]);
        grad_to!(grads, ops.parents, 2, db, &[s.c_out]);
        super::profile::add(1, start);
    }
}

/// `c.forward(x)` as one graph node.
pub(crate) fn conv2d<B: Backend>(
    c: &Conv2d<B>,
    x: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let Some(spec) = super::ops::conv_spec(c, &x.dims()) else {
        return Err(x);
    };
    let (Some(w), Ok(b)) = (param(&c.weight), opt_param(&c.bias)) else {
        return Err(x);
    };
    let x = take(x)?;
    let (ho, wo) = spec.out_hw().expect("checked by conv_spec");
    let bias = b.as_ref().map(|b| fx::values(&b.primitive).into_owned());
    let y = super::conv::conv2d(
        &fx::values(&x.primitive),
        &fx::values(&w.primitive),
        bias.as_deref(),
        &spec,
    );
    let out = fx::tensor(y, &[spec.batch, spec.c_out, ho, wo]);
    let state = || ConvState {
        x: x.primitive.clone(),
        w: w.primitive.clone(),
        spec,
    };
    let t = match &b {
        Some(b) => record(ConvBackward, [&x, &w, b], out, state),
        None => record(ConvBackward, [&x, &w], out, state),
    };
    Ok(give(t))
}

// ---------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU)

#[derive(Debug)]
struct GroupNormBackward;

#[derive(Clone, Debug)]
struct GroupNormState {
    x: FlexTensor,
    gamma: Option<FlexTensor>,
    beta: Option<FlexTensor>,
    shape: Vec<usize>,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl<const N: usize> Backward<Flex, N> for GroupNormBackward {
    type State = GroupNormState;

    fn backward(self, ops: Ops<GroupNormState, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let start = std::time::Instant::now();
        let dy = grads.consume::<Flex>(&ops.node);
        let st = ops.state;
        let (g, b) = (
            st.gamma.as_ref().map(fx::values),
            st.beta.as_ref().map(fx::values),
        );
        let spec = GroupNormSpec {
            batch: st.shape[0],
            channels: st.shape[1],
            spatial: st.shape[2..].iter().product(),
            groups: st.groups,
            eps: st.eps,
            gamma: g.as_deref(),
            beta: b.as_deref(),
            silu: st.silu,
        };
        let (dx, dg, db) =
            super::norm::group_norm_backward(&fx::values(&st.x), &fx::values(&dy), &spec);
        let c = st.shape[1];
        grad_to!(grads, ops.parents, 0, Some(dx), &st.shape);
        grad_to!(grads, ops.parents, 1, dg, &[c]);
        grad_to!(grads, ops.parents, 2, db, &[c]);
        super::profile::add(7, start);
    }
}

/// `gn.forward(x)` (then SiLU when `silu`) as one graph node.
pub(crate) fn group_norm<B: Backend, const D: usize>(
    gn: &GroupNorm<B>,
    x: Tensor<B, D>,
    silu: bool,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let dims_x = x.dims();
    if D < 2 || dims_x[1] != gn.num_channels {
        return Err(x);
    }
    let (gamma, beta) = if gn.affine {
        match (opt_param(&gn.gamma), opt_param(&gn.beta)) {
            (Ok(g), Ok(b)) if g.is_some() && b.is_some() => (g, b),
            _ => return Err(x),
        }
    } else {
        (None, None)
    };
    let x = take(x)?;
    let shape = dims_x.to_vec();
    let (gv, bv) = (
        gamma
            .as_ref()
            .map(|t| fx::values(&t.primitive).into_owned()),
        beta.as_ref().map(|t| fx::values(&t.primitive).into_owned()),
    );
    let spec = GroupNormSpec {
        batch: shape[0],
        channels: shape[1],
        spatial: shape[2..].iter().product(),
        groups: gn.num_groups,
        eps: gn.epsilon,
        gamma: gv.as_deref(),
        beta: bv.as_deref(),
        silu,
    };
    let y = super::norm::group_norm(&fx::values(&x.primitive), &spec);
    let out = fx::tensor(y, &shape);
    let state = || GroupNormState {
        x: x.primitive.clone(),
        gamma: gamma.as_ref().map(|t| t.primitive.clone()),
        beta: beta.as_ref().map(|t| t.primitive.clone()),
        shape: shape.clone(),
        groups: gn.num_groups,
        eps: gn.epsilon,
        silu,
    };
    let t = match (&gamma, &beta) {
        (Some(g), Some(b)) => record(GroupNormBackward, [&x, g, b], out, state),
        _ => record(GroupNormBackward, [&x], out, state),
    };
    Ok(give(t))
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

#[derive(Debug)]
struct LayerNormBackward;

#[derive(Clone, Debug)]
struct LayerNormState {
    x: FlexTensor,
    gamma: FlexTensor,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    shape: Vec<usize>,
}

impl<const N: usize> Backward<Flex, N> for LayerNormBackward {
    type State = LayerNormState;

    fn backward(self, ops: Ops<LayerNormState, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let start = std::time::Instant::now();
        let dy = grads.consume::<Flex>(&ops.node);
        let st = ops.state;
        let d = *st
            .shape
            .last()
            .expect("layer_norm of a tensor with dimensions");
        let (dx, dg, db) = super::norm::layer_norm_backward(
            &fx::values(&st.x),
            &fx::values(&dy),
            d,
            Some(&fx::values(&st.gamma)),
            &st.mean,
            &st.rstd,
        );
        grad_to!(grads, ops.parents, 0, Some(dx), &st.shape);
        grad_to!(grads, ops.parents, 1, Some(dg), &[d]);
        grad_to!(grads, ops.parents, 2, Some(db), &[d]);
        super::profile::add(9, start);
    }
}

/// `ln.forward(x)` as one graph node.
pub(crate) fn layer_norm<B: Backend, const D: usize>(
    ln: &LayerNorm<B>,
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let (Some(gamma), Ok(beta)) = (param(&ln.gamma), opt_param(&ln.beta)) else {
        return Err(x);
    };
    let x = take(x)?;
    let shape = dims(&x);
    let d = shape[D - 1];
    let bv = beta.as_ref().map(|t| fx::values(&t.primitive).into_owned());
    let (y, mean, rstd) = super::norm::layer_norm(
        &fx::values(&x.primitive),
        d,
        Some(&fx::values(&gamma.primitive)),
        bv.as_deref(),
        ln.epsilon,
    );
    let out = fx::tensor(y, &shape);
    let state = || LayerNormState {
        x: x.primitive.clone(),
        gamma: gamma.primitive.clone(),
        mean,
        rstd,
        shape: shape.clone(),
    };
    let t = match &beta {
        Some(b) => record(LayerNormBackward, [&x, &gamma, b], out, state),
        None => record(LayerNormBackward, [&x, &gamma], out, state),
    };
    Ok(give(t))
}

// ---------------------------------------------------------------------------------------------
// Element-wise activations and GEGLU

#[derive(Debug)]
struct ActBackward;

#[derive(Clone, Debug)]
struct ActState {
    x: FlexTensor,
    act: Act,
}

impl Backward<Flex, 1> for ActBackward {
    type State = ActState;

    fn backward(self, ops: Ops<ActState, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let start = std::time::Instant::now();
        let dy = grads.consume::<Flex>(&ops.node);
        let shape = fx::dims(&ops.state.x);
        let dx =
            super::math::act_backward(&fx::values(&ops.state.x), &fx::values(&dy), ops.state.act);
        grad_to!(grads, ops.parents, 0, Some(dx), &shape);
        super::profile::add(11, start);
    }
}

/// An activation as one graph node.
pub(crate) fn act<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    act: Act,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let x = take(x)?;
    let shape = dims(&x);
    let mut y = fx::values(&x.primitive).into_owned();
    super::math::act_inplace(&mut y, act);
    let out = fx::tensor(y, &shape);
    let t = record(ActBackward, [&x], out, || ActState {
        x: x.primitive.clone(),
        act,
    });
    Ok(give(t))
}

#[derive(Debug)]
struct GegluBackward;

impl Backward<Flex, 1> for GegluBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let start = std::time::Instant::now();
        let dy = grads.consume::<Flex>(&ops.node);
        let shape = fx::dims(&ops.state);
        let inner = shape[shape.len() - 1] / 2;
        let dh = super::math::geglu_backward(&fx::values(&ops.state), &fx::values(&dy), inner);
        grad_to!(grads, ops.parents, 0, Some(dh), &shape);
        super::profile::add(11, start);
    }
}

/// GEGLU as one graph node.
pub(crate) fn geglu<B: Backend, const D: usize>(
    h: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let mut shape = h.dims();
    if !shape[D - 1].is_multiple_of(2) {
        return Err(h);
    }
    let h = take(h)?;
    let inner = shape[D - 1] / 2;
    shape[D - 1] = inner;
    let mut y = super::output(shape.iter().product());
    super::math::geglu(&fx::values(&h.primitive), &mut y, inner);
    let out = fx::tensor(y, &shape);
    let t = record(GegluBackward, [&h], out, || h.primitive.clone());
    Ok(give(t))
}

// ---------------------------------------------------------------------------------------------
// Attention

#[derive(Debug)]
struct AttentionBackward;

#[derive(Clone, Debug)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    out: FlexTensor,
    lse: Vec<f32>,
    spec: AttentionSpec,
}

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<AttentionState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let start = std::time::Instant::now();
        let dy = grads.consume::<Flex>(&ops.node);
        let st = ops.state;
        let shapes = [fx::dims(&st.q), fx::dims(&st.k), fx::dims(&st.v)];
        let (dq, dk, dv) = super::attention::attention_backward(
            &fx::values(&st.q),
            &fx::values(&st.k),
            &fx::values(&st.v),
            &fx::values(&st.out),
            &st.lse,
            &fx::values(&dy),
            &st.spec,
        );
        grad_to!(grads, ops.parents, 0, Some(dq), &shapes[0]);
        grad_to!(grads, ops.parents, 1, Some(dk), &shapes[1]);
        grad_to!(grads, ops.parents, 2, Some(dv), &shapes[2]);
        super::profile::add(5, start);
    }
}

/// Token-layout attention (see [`super::attention`]) as one graph node.
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    spec: AttentionSpec,
) -> Result<Tensor<B, 3>, super::ops::Qkv<B>> {
    let (q, k, v) = match (take(q), take(k), take(v)) {
        (Ok(q), Ok(k), Ok(v)) => (q, k, v),
        (q, k, v) => {
            let back = |r: Result<AdTensor, Tensor<B, 3>>| r.map(give).unwrap_or_else(|t| t);
            return Err((back(q), back(k), back(v)));
        }
    };
    let mut lse = vec![0.0f32; spec.batch * spec.heads * spec.q_len];
    let y = super::attention::attention_with_lse(
        &fx::values(&q.primitive),
        &fx::values(&k.primitive),
        &fx::values(&v.primitive),
        &spec,
        Some(&mut lse),
    );
    let out = fx::tensor(y, &[spec.batch, spec.q_len, spec.heads * spec.value_dim]);
    let t = record(AttentionBackward, [&q, &k, &v], out.clone(), || {
        AttentionState {
            q: q.primitive.clone(),
            k: k.primitive.clone(),
            v: v.primitive.clone(),
            out,
            lse,
            spec,
        }
    });
    Ok(give(t))
}

// ---------------------------------------------------------------------------------------------
// Embedding lookup

#[derive(Debug)]
struct EmbeddingBackward;

#[derive(Clone, Debug)]
struct EmbeddingState {
    ids: Vec<usize>,
    vocab: usize,
    dim: usize,
}

impl Backward<Flex, 1> for EmbeddingBackward {
    type State = EmbeddingState;

    fn backward(self, ops: Ops<EmbeddingState, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let start = std::time::Instant::now();
        let dy = grads.consume::<Flex>(&ops.node);
        let EmbeddingState { ids, vocab, dim } = ops.state;
        if wants(&ops.parents, 0) {
            // The dense gradient PyTorch's embedding backward also makes, allocated zeroed (fresh
            // zero pages: the rows no token touched are never written), with one row added per token.
            let mut g = vec![0.0f32; vocab * dim];
            let dy = fx::values(&dy);
            for (row, &id) in dy.chunks_exact(dim).zip(&ids) {
                g[id * dim..(id + 1) * dim]
                    .iter_mut()
                    .zip(row)
                    .for_each(|(a, b)| *a += b);
            }
            grad_to!(grads, ops.parents, 0, Some(g), &[vocab, dim]);
        }
        super::profile::add(13, start);
    }
}

/// `e.forward(ids)` as one graph node: rows of the table gathered; the backward pass adds the
/// output gradient's rows into a zeroed table-sized gradient (one allocation, instead of Burn's
/// zeros + copy + scatter).
pub(crate) fn embedding<B: Backend>(
    e: &burn::nn::Embedding<B>,
    ids: Tensor<B, 2, Int>,
) -> Result<Tensor<B, 3>, Tensor<B, 2, Int>> {
    let Some(w) = param(&e.weight) else {
        return Err(ids);
    };
    let [batch, len] = ids.dims();
    let [vocab, dim] = [dims(&w)[0], dims(&w)[1]];
    let idx: Vec<usize> = ids
        .to_data()
        .iter::<i64>()
        .map(|i| {
            assert!(
                i >= 0 && (i as usize) < vocab,
                "embedding: token id {i} outside the table of {vocab} rows"
            );
            i as usize
        })
        .collect();
    let table = fx::values(&w.primitive);
    let mut y = super::output(idx.len() * dim);
    for (row, &id) in y.chunks_exact_mut(dim).zip(&idx) {
        row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    }
    drop(table);
    let out = fx::tensor(y, &[batch, len, dim]);
    let t = record(EmbeddingBackward, [&w], out, || EmbeddingState {
        ids: idx,
        vocab,
        dim,
    });
    Ok(give(t))
}
