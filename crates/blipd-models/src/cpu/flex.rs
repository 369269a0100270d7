//! The bridge between Burn tensors and our kernels: a tensor of a generic backend `B` is handed to
//! the kernels only when `B` *is* burn-flex (its float primitive is a [`FlexTensor`]), the tensor is
//! `f32`, no autocast scope is active and the kernels are on; the primitive is then moved out
//! through `Any` (no copy, no `unsafe`) and the result moved back the same way.

use std::any::{Any, TypeId};
use std::borrow::Cow;

pub(crate) use burn::backend::flex::FlexTensor;
use burn::backend::flex::Layout;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::{Bytes, DType, TensorPrimitive};

/// Whether `B`'s float tensors are burn-flex's (inference on the CPU backend, not autodiff).
pub(crate) fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<FlexTensor>()
}

/// Whether the kernels may run for `B` right now.
pub(crate) fn active<B: Backend>() -> bool {
    is_flex::<B>() && super::enabled() && crate::amp::autocast_dtype().is_none()
}

/// `t` as a `U` when `T` is `U` (moved, not copied); `t` back otherwise.
pub(crate) fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("just filled")),
        None => Err(slot.expect("not taken")),
    }
}

/// `x` as an `f32` burn-flex tensor when the kernels may take it; the tensor back otherwise.
pub(crate) fn take<B: Backend, const D: usize>(
    x: Tensor<B, D>,
) -> Result<FlexTensor, Tensor<B, D>> {
    if !active::<B>() || x.dtype() != DType::F32 {
        return Err(x);
    }
    match x.into_primitive() {
        TensorPrimitive::Float(p) => cast::<B::FloatTensorPrimitive, FlexTensor>(p)
            .map_err(|p| Tensor::from_primitive(TensorPrimitive::Float(p))),
        q => Err(Tensor::from_primitive(q)),
    }
}

/// A clone of `x`'s primitive (shares the storage) when the kernels may take it.
pub(crate) fn peek<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<FlexTensor> {
    take(x.clone()).ok()
}

/// A parameter's value as an `f32` burn-flex tensor (shares the storage).
pub(crate) fn param<B: Backend, const D: usize>(p: &Param<Tensor<B, D>>) -> Option<FlexTensor> {
    peek(&p.val())
}

/// A burn-flex tensor back as a tensor of `B` (which must be burn-flex).
pub(crate) fn give<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    let p = cast::<FlexTensor, B::FloatTensorPrimitive>(t)
        .unwrap_or_else(|_| panic!("cpu::flex::give on a backend that is not burn-flex"));
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// A new contiguous `f32` tensor of `shape` owning `data`.
pub(crate) fn tensor(data: Vec<f32>, shape: &[usize]) -> FlexTensor {
    assert_eq!(
        data.len(),
        shape.iter().product::<usize>(),
        "cpu::flex::tensor: data length"
    );
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(shape.into()),
        DType::F32,
    )
}

pub(crate) fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().iter().copied().collect()
}

/// The logical values of `t`, row-major: borrowed when contiguous, copied otherwise.
pub(crate) fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("contiguous after to_contiguous")
                .to_vec(),
        ),
    }
}

/// A 2-D tensor as a strided view of its storage (no copy), when its strides are non-negative.
pub(crate) fn matrix(t: &FlexTensor) -> Option<super::gemm::MatRef<'_>> {
    let l = t.layout();
    let (shape, strides) = (l.shape(), l.strides());
    if shape.len() != 2 || strides.iter().any(|s| *s < 0) {
        return None;
    }
    Some(super::gemm::MatRef::new(
        t.storage::<f32>(),
        l.start_offset(),
        [shape[0], shape[1]],
        [strides[0] as usize, strides[1] as usize],
    ))
}

/// [`matrix`], or when the strides do not allow a view, a row-major copy kept in `owned`.
pub(crate) fn matrix_or_copy<'a>(
    t: &'a FlexTensor,
    owned: &'a mut Vec<f32>,
) -> super::gemm::MatRef<'a> {
    if let Some(m) = matrix(t) {
        return m;
    }
    let dims = dims(t);
    *owned = values(t).into_owned();
    super::gemm::MatRef::row_major(owned, dims[0], dims[1])
}

/// `t` made contiguous (a no-op when it is).
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The values of `t` for writing in place: only when `t` owns its whole buffer, contiguous from 0.
pub(crate) fn unique_mut(t: &mut FlexTensor) -> Option<&mut [f32]> {
    let n = t.layout().num_elements();
    let whole = t.layout().is_contiguous()
        && t.layout().start_offset() == 0
        && t.bytes().len() == n * std::mem::size_of::<f32>();
    if !whole {
        return None;
    }
    t.try_storage_mut::<f32>()
}
