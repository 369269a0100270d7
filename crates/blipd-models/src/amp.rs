//! Mixed precision in the manner of `torch.autocast`: inside an [`Autocast`] scope the matrix products
//! of every network (`Linear`, `Conv2d`, the attention products) run in a low-precision dtype (bf16),
//! while everything else — normalisations, softmax, activations, residual sums, losses — and the
//! weights themselves stay in f32.
//!
//! Burn 0.21 has no autocast, so the networks call [`linear`], [`conv2d`] and [`matmul`] instead of
//! the modules' `forward`. Outside a scope (the default) these are exactly the modules' own forward
//! passes, bit for bit. Inside one, the input and the weights are cast to the scope's dtype, the product
//! runs there, and the result is cast back to the input's dtype. The casts are differentiable, so on an
//! autodiff backend the gradients reach the f32 weights as f32 ("master weights"): the optimizer and
//! its state never see bf16, which keeps updates such as the paper's lr 2e-6 representable.
//!
//! The scope is per thread, like torch's, and is entered by the trainer around a step's forward pass
//! (`[train] mixed_precision = "bf16"`). bf16 needs no loss scaling (its exponent range is f32's).

use std::cell::Cell;

use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::ops::PadMode;
use burn::tensor::{DType, FloatDType};

thread_local! {
    static AUTOCAST: Cell<Option<FloatDType>> = const { Cell::new(None) };
}

/// The dtype matrix products run in on this thread (`None`: the inputs' own).
pub fn autocast_dtype() -> Option<FloatDType> {
    AUTOCAST.with(|c| c.get())
}

/// An autocast scope: set on creation, the previous setting restored on drop (scopes nest).
#[must_use = "the scope ends when this guard is dropped"]
#[derive(Debug)]
pub struct Autocast {
    prev: Option<FloatDType>,
}

impl Autocast {
    /// Matrix products in `dtype` until the guard drops; `None` turns autocast off inside the scope.
    pub fn enter(dtype: Option<FloatDType>) -> Self {
        let prev = AUTOCAST.with(|c| c.replace(dtype));
        Self { prev }
    }
}

impl Drop for Autocast {
    fn drop(&mut self) {
        AUTOCAST.with(|c| c.set(self.prev));
    }
}

/// The dtype to cast back to: the input's float dtype.
fn float_dtype(d: DType) -> FloatDType {
    match d {
        DType::F64 => FloatDType::F64,
        DType::F16 => FloatDType::F16,
        DType::BF16 => FloatDType::BF16,
        _ => FloatDType::F32,
    }
}

/// The scope's dtype when it differs from `x`'s (nothing to do otherwise).
fn low<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<(FloatDType, FloatDType)> {
    let low = autocast_dtype()?;
    let own = float_dtype(x.dtype());
    (own != low).then_some((low, own))
}

/// `l.forward(x)`, in the autocast dtype inside a scope.
pub fn linear<B: Backend, const D: usize>(l: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    crate::flops::linear(&x.dims(), l.weight.dims()[1]);
    let x = match crate::cpu::ops::linear(l, x) {
        Ok(y) => return y,
        Err(x) => x,
    };
    match low(&x) {
        None => l.forward(x),
        Some((low, own)) => burn::tensor::module::linear(
            x.cast(low),
            l.weight.val().cast(low),
            l.bias.as_ref().map(|b| b.val().cast(low)),
        )
        .cast(own),
    }
}

/// `c.forward(x)`, in the autocast dtype inside a scope.
pub fn conv2d<B: Backend>(c: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let y = conv2d_uncounted(c, x);
    crate::flops::conv2d(y.dims(), c.weight.dims());
    y
}

/// [`conv2d`] without adding to the FLOP count (callers that count themselves).
pub(crate) fn conv2d_uncounted<B: Backend>(c: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let x = match crate::cpu::ops::conv2d(c, x) {
        Ok(y) => return y,
        Err(x) => x,
    };
    match low(&x) {
        None => c.forward(x),
        Some((low, own)) => {
            // Burn 0.21 pads asymmetric convolutions with a tensor of the backend's default dtype
            // (`Tensor::pad` → `Tensor::full`), which cannot take a bf16 input: pad here, before the
            // cast, and convolve without padding.
            let (x, padding) = match c.padding {
                PaddingConfig2d::Explicit(top, left, bottom, right)
                    if top != bottom || left != right =>
                {
                    (
                        x.pad((left, right, top, bottom), PadMode::Constant(0.0)),
                        PaddingConfig2d::Valid,
                    )
                }
                ref p => (x, p.clone()),
            };
            let cast = Conv2d {
                weight: c.weight.clone().map(|w| w.cast(low)),
                bias: c.bias.clone().map(|b| b.map(|t| t.cast(low))),
                stride: c.stride,
                kernel_size: c.kernel_size,
                dilation: c.dilation,
                groups: c.groups,
                padding,
            };
            cast.forward(x.cast(low)).cast(own)
        }
    }
}

/// `x` in the autocast dtype, and the dtype to [`restore`] the result to (`None` outside a scope), for
/// kernels other than the three above (e.g. fused attention).
pub fn lower<B: Backend, const D: usize>(x: Tensor<B, D>) -> (Tensor<B, D>, Option<FloatDType>) {
    match low(&x) {
        None => (x, None),
        Some((low, own)) => (x.cast(low), Some(own)),
    }
}

/// The result of a lowered computation back in the input's dtype.
pub fn restore<B: Backend, const D: usize>(
    y: Tensor<B, D>,
    back: Option<FloatDType>,
) -> Tensor<B, D> {
    match back {
        None => y,
        Some(own) => y.cast(own),
    }
}

/// `a.matmul(b)`, in the autocast dtype inside a scope.
pub fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    crate::flops::matmul(&a.dims(), &b.dims());
    match low(&a) {
        None => a.matmul(b),
        Some((low, own)) => a.cast(low).matmul(b.cast(low)).cast(own),
    }
}
