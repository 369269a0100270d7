//! Our 2-D convolution for the CPU: stride 1 as k² shifted matrix products over the padded input.
//!
//! burn-flex 0.21 convolves by unfolding its input (im2col) into a fresh buffer of `C_in·k²·H·W` floats
//! per call — 302 MB for one 128-channel 3×3 convolution of the VAE at 256² — so most of a
//! full-size generation's page zeroing and copying was the convolution path (docs/performance.md).
//! Here the input is padded once (`C_in·(H+2p)·(W+2p)`), and the output is computed on the padded-width
//! grid: for kernel offset `(i, j)` the input of every output pixel is the padded plane shifted by
//! `i·Wp + j`, a strided *view*, so `out[C_out, H·Wp] += W[:, :, i, j] · P[C_in, shift…]` is one GEMM
//! with no copy; the `Wp − W_out` extra columns per row are dropped at the end. The work is the same
//! multiply-adds as im2col's single GEMM; the extra memory is one padded copy of the input.
//!
//! Used by [`crate::amp::conv2d`] for inference on burn-flex (not under autodiff, which needs Burn's
//! op for the backward); every other backend and every other convolution (strided, dilated, grouped)
//! takes Burn's path.

use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::prelude::*;
use burn::tensor::TensorData;

/// The padding, if `c` is a convolution this path handles: stride 1, no dilation, one group, the
/// same explicit padding on opposite sides.
fn handled<B: Backend>(c: &Conv2d<B>) -> Option<(usize, usize)> {
    if c.stride != [1, 1] || c.dilation != [1, 1] || c.groups != 1 {
        return None;
    }
    let [kh, kw] = c.kernel_size;
    match c.padding {
        PaddingConfig2d::Valid => Some((0, 0)),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            Some((top, left))
        }
        PaddingConfig2d::Same if kh % 2 == 1 && kw % 2 == 1 => Some((kh / 2, kw / 2)),
        _ => None,
    }
}

/// Im2col buffers below this many floats (32 MiB) come from the heap and are reused; above it
/// each call maps fresh pages, the case this path is for.
const UNFOLD_FLOATS: usize = 8 << 20;

/// Whether an inference convolution of `x_dims` on `B` takes [`conv2d_shifted`]: burn-flex (not
/// under autodiff), a convolution [`handles`] covers, and one whose im2col buffer burn-flex would map
/// fresh (≥ 32 MiB). Smaller ones stay on Burn's path: measured on the full-size U-Net at 32² latents
/// (inputs of 4–32² pixels), the k² products with small `H·W` and the per-call weight copy made a
/// call 7.9 → 10.5 s, while the VAE decode at 256² went 13.1 → 9.8 s (docs/performance.md).
pub fn fast_path<B: Backend>(c: &Conv2d<B>, x_dims: &[usize; 4]) -> bool {
    let [b, c_in, h, w] = *x_dims;
    let [_, _, kh, kw] = c.weight.dims();
    b * c_in * kh * kw * h * w >= UNFOLD_FLOATS
        && handles(c, x_dims)
        && B::name(&c.weight.device()) == "flex"
}

/// Whether [`conv2d_shifted`] computes `c` on an input of shape `x_dims`: stride 1, no dilation,
/// one group, symmetric padding, a kernel that fits the padded input.
pub fn handles<B: Backend>(c: &Conv2d<B>, x_dims: &[usize; 4]) -> bool {
    let [_, c_in, h, w] = *x_dims;
    let [_, w_in, kh, kw] = c.weight.dims();
    matches!(handled(c), Some((ph, pw)) if w_in == c_in && h + 2 * ph >= kh && w + 2 * pw >= kw)
}

/// `c.forward(x)` by the shifted-GEMM method (see the module docs); `c` and `x` must pass [`handles`].
pub fn conv2d_shifted<B: Backend>(c: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    assert!(
        handles(c, &x.dims()),
        "conv2d_shifted: not a stride-1 convolution of this input"
    );
    let (ph, pw) = handled(c).expect("checked by handles");
    let [b, c_in, h, w] = x.dims();
    let [c_out, _, kh, kw] = c.weight.dims();
    let device = x.device();
    let xs = x
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data");
    let ws = c
        .weight
        .val()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data");
    let bias = c.bias.as_ref().map(|b| {
        b.val()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 data")
    });
    let out = conv2d_shifted_f32(
        &xs,
        [b, c_in, h, w],
        &ws,
        [c_out, kh, kw],
        (ph, pw),
        bias.as_deref(),
    );
    let (ho, wo) = (h + 2 * ph - kh + 1, w + 2 * pw - kw + 1);
    Tensor::from_data(TensorData::new(out, [b, c_out, ho, wo]), &device)
}

/// The arithmetic of [`conv2d_shifted`] on NCHW slices; weight `[C_out, C_in, kh, kw]`.
pub fn conv2d_shifted_f32(
    x: &[f32],
    [b, c_in, h, w]: [usize; 4],
    weight: &[f32],
    [c_out, kh, kw]: [usize; 3],
    (ph, pw): (usize, usize),
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let (hp, wp) = (h + 2 * ph, w + 2 * pw);
    let (ho, wo) = (hp - kh + 1, wp - kw + 1);
    let plane = hp * wp;
    // Output on the padded-width grid: ho rows of wp columns (the last wp − wo are dropped).
    let n = ho * wp;
    // Reads for the dropped columns run up to kw − 1 floats past a plane: slack at the end.
    let mut padded = vec![0.0f32; c_in * plane + kw];
    let mut ext = vec![0.0f32; c_out * n];
    let mut out = vec![0.0f32; b * c_out * ho * wo];
    let threads = rayon::current_num_threads();
    for bi in 0..b {
        let xb = &x[bi * c_in * h * w..(bi + 1) * c_in * h * w];
        for ci in 0..c_in {
            for y in 0..h {
                let src = &xb[(ci * h + y) * w..(ci * h + y + 1) * w];
                let at = ci * plane + (y + ph) * wp + pw;
                padded[at..at + w].copy_from_slice(src);
            }
        }
        for i in 0..kh {
            for j in 0..kw {
                let first = i == 0 && j == 0;
                // SAFETY: dst is `c_out × n` row-major in `ext`; lhs reads weight[co, ci, i, j] with
                // strides (C_in·kh·kw, kh·kw) inside `weight`; rhs reads padded[ci·plane + i·wp + j + m]
                // for m < n, whose largest index c_in·plane − plane + (kh−1)·wp + kw−1 + ho·wp − 1
                // = c_in·plane + kw − 2 < padded.len().
                unsafe {
                    gemm::gemm(
                        c_out,
                        n,
                        c_in,
                        ext.as_mut_ptr(),
                        1,
                        n as isize,
                        !first,
                        weight.as_ptr().add(i * kw + j),
                        (kh * kw) as isize,
                        (c_in * kh * kw) as isize,
                        padded.as_ptr().add(i * wp + j),
                        1,
                        plane as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        if threads > 1 {
                            gemm::Parallelism::Rayon(threads)
                        } else {
                            gemm::Parallelism::None
                        },
                    );
                }
            }
        }
        let ob = &mut out[bi * c_out * ho * wo..(bi + 1) * c_out * ho * wo];
        for co in 0..c_out {
            let add = bias.map_or(0.0, |b| b[co]);
            for y in 0..ho {
                let src = &ext[co * n + y * wp..co * n + y * wp + wo];
                let dst = &mut ob[(co * ho + y) * wo..(co * ho + y + 1) * wo];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s + add;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::conv::Conv2dConfig;

    type B = burn::backend::NdArray<f32>;

    fn check(c_in: usize, c_out: usize, k: usize, pad: usize, h: usize, w: usize, bias: bool) {
        let device = Default::default();
        let conv = Conv2dConfig::new([c_in, c_out], [k, k])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_bias(bias)
            .init::<B>(&device);
        let x = Tensor::<B, 4>::random(
            [2, c_in, h, w],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let want = conv.forward(x.clone());
        assert!(handles(&conv, &x.dims()));
        let got = conv2d_shifted(&conv, x);
        assert_eq!(got.dims(), want.dims());
        let (g, r) = (
            got.into_data().to_vec::<f32>().unwrap(),
            want.into_data().to_vec::<f32>().unwrap(),
        );
        assert_eq!(g.len(), r.len());
        let mut worst = 0.0f32;
        for (a, b) in g.iter().zip(&r) {
            assert!(a.is_finite() && b.is_finite(), "non-finite: {a} vs {b}");
            worst = worst.max((a - b).abs());
        }
        println!("conv {c_in}->{c_out} k{k} p{pad} {h}x{w}: max |Δ| = {worst:.2e}");
        assert!(worst < 1e-4, "max |Δ| {worst} (ours vs Burn's)");
    }

    #[test]
    fn equals_burns_convolution() {
        check(3, 5, 3, 1, 7, 9, true);
        check(16, 8, 3, 1, 12, 10, false);
        check(4, 6, 1, 0, 5, 5, true);
        check(2, 3, 3, 0, 6, 8, true);
        check(3, 4, 5, 2, 9, 7, true);
    }

    #[test]
    fn strided_and_grouped_are_left_to_burn() {
        let device = Default::default();
        let strided = Conv2dConfig::new([2, 2], [3, 3])
            .with_stride([2, 2])
            .init::<B>(&device);
        let x = Tensor::<B, 4>::zeros([1, 2, 8, 8], &device);
        assert!(!handles(&strided, &x.dims()));
        let grouped = Conv2dConfig::new([2, 2], [3, 3])
            .with_groups(2)
            .init::<B>(&device);
        assert!(!handles(&grouped, &x.dims()));
    }
}
