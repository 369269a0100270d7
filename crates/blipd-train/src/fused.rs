//! The optimizer's arithmetic in one pass per parameter on the CPU backend (burn-flex): AdamW reads
//! the parameter, its gradient and both moments once and writes the three updated tensors (in place
//! when nothing else holds them), and the squared gradient norm is one reduction. Written with Burn
//! tensor ops, one AdamW update is a dozen passes and as many fresh buffers per parameter (~6 % of a
//! mid-size stage-2 step). Other backends keep the tensor-op path; the arithmetic is the same, in the
//! same order, in f32.

use std::any::{Any, TypeId};

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::backend::Backend;
use burn::tensor::{Bytes, DType, Tensor, TensorPrimitive};
use rayon::prelude::*;

fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("just filled")),
        None => Err(slot.expect("not taken")),
    }
}

/// Whether `B` is burn-flex itself (`BLIPD_CPU_KERNELS=burn` turns the fused path off, as it does
/// the networks' kernels).
fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<FlexTensor>()
        && !matches!(
            std::env::var("BLIPD_CPU_KERNELS").as_deref(),
            Ok("burn") | Ok("off") | Ok("0")
        )
}

fn take<B: Backend>(x: Tensor<B, 1>) -> FlexTensor {
    match x.into_primitive() {
        TensorPrimitive::Float(p) => cast::<B::FloatTensorPrimitive, FlexTensor>(p)
            .unwrap_or_else(|_| panic!("fused: not a burn-flex tensor")),
        TensorPrimitive::QFloat(_) => panic!("fused: quantized tensor"),
    }
}

fn give<B: Backend>(t: FlexTensor) -> Tensor<B, 1> {
    let p = cast::<FlexTensor, B::FloatTensorPrimitive>(t)
        .unwrap_or_else(|_| panic!("fused: not a burn-flex backend"));
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// `t`'s values for writing in place (when it owns its whole buffer), else a copy.
fn owned(mut t: FlexTensor) -> FlexTensor {
    let n = t.layout().num_elements();
    let whole = t.layout().is_contiguous()
        && t.layout().start_offset() == 0
        && t.bytes().len() == n * 4
        && t.is_unique();
    if whole {
        return t;
    }
    let v = values(&t).to_vec();
    t = FlexTensor::new(
        Bytes::from_elems(v),
        Layout::contiguous([n].into()),
        DType::F32,
    );
    t
}

fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("contiguous")
                .to_vec(),
        ),
    }
}

/// The scalars of one AdamW update (already in f32, as the tensor-op path applies them).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamWScalars {
    /// `1 − lr·weight_decay`, or `None` without decay.
    pub decay: Option<f32>,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub sqrt_bias_correction2: f32,
    pub eps: f32,
    pub step_size: f32,
}

/// `(param, exp_avg, exp_avg_sq)`.
pub(crate) type Triple<B> = (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>);

/// One AdamW update on burn-flex tensors: `(param, exp_avg, exp_avg_sq)` updated from `grad`, in
/// place when the caller held the only references; `Err` with the three inputs untouched when `B` is
/// not burn-flex or a tensor is not `f32`.
pub(crate) fn adamw<B: Backend>(
    (param, exp_avg, exp_avg_sq): Triple<B>,
    grad: &Tensor<B, 1>,
    s: AdamWScalars,
) -> Result<Triple<B>, Triple<B>> {
    if !is_flex::<B>()
        || [&param, grad, &exp_avg, &exp_avg_sq]
            .iter()
            .any(|t| t.dtype() != DType::F32)
    {
        return Err((param, exp_avg, exp_avg_sq));
    }
    let g = take(grad.clone());
    let gv = values(&g);
    let mut p = owned(take(param));
    let mut m = owned(take(exp_avg));
    let mut v = owned(take(exp_avg_sq));
    {
        let (pp, mm, vv) = (
            p.try_storage_mut::<f32>().expect("owned"),
            m.try_storage_mut::<f32>().expect("owned"),
            v.try_storage_mut::<f32>().expect("owned"),
        );
        assert!(
            pp.len() == gv.len() && mm.len() == gv.len() && vv.len() == gv.len(),
            "adamw: parameter, gradient and moments differ in size"
        );
        const CHUNK: usize = 1 << 15;
        pp.par_chunks_mut(CHUNK)
            .zip(mm.par_chunks_mut(CHUNK))
            .zip(vv.par_chunks_mut(CHUNK))
            .zip(gv.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| adamw_chunk(p, m, v, g, s));
    }
    Ok((give(p), give(m), give(v)))
}

/// The tensor-op path's arithmetic, element by element, in its order.
#[inline(always)]
fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: AdamWScalars) {
    for i in 0..p.len() {
        let gi = g[i];
        let pi = match s.decay {
            Some(d) => p[i] * d,
            None => p[i],
        };
        let mi = m[i] + (gi - m[i]) * s.one_minus_beta1;
        let vi = v[i] * s.beta2 + gi * s.one_minus_beta2 * gi;
        let denom = vi.sqrt() / s.sqrt_bias_correction2 + s.eps;
        p[i] = pi - mi / denom * s.step_size;
        m[i] = mi;
        v[i] = vi;
    }
}

/// `Σ x²` of a burn-flex tensor in f64, or `None` on other backends.
pub(crate) fn sum_squares<B: Backend>(x: &Tensor<B, 1>) -> Option<f64> {
    if !is_flex::<B>() || x.dtype() != DType::F32 {
        return None;
    }
    let t = take(x.clone());
    let v = values(&t);
    Some(
        v.par_chunks(1 << 15)
            .map(|c| {
                let mut lanes = [0.0f64; 8];
                let mut it = c.chunks_exact(8);
                for ch in &mut it {
                    for l in 0..8 {
                        lanes[l] += ch[l] as f64 * ch[l] as f64;
                    }
                }
                lanes.iter().sum::<f64>()
                    + it.remainder()
                        .iter()
                        .map(|x| *x as f64 * *x as f64)
                        .sum::<f64>()
            })
            .sum(),
    )
}
