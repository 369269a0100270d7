//! 2-D convolution on NCHW `f32` data as matrix products.
//!
//! A `1×1` stride-1 convolution is one product per image, `out_b [C_out, H·W] = W [C_out, C_in] · x_b`.
//! Any other (strides, dilation, asymmetric padding; one group) unfolds the input (im2col) into a
//! reused scratch buffer one band of output rows at a time, `col [C_in·kh·kw, rows·W_out]`, and
//! multiplies `W [C_out, C_in·kh·kw] · col` straight into the output rows of that band. The band is
//! sized so the unfolded copy stays near 16 MiB — burn-flex unfolds the whole input into a fresh
//! buffer per call (302 MB for one 128-channel 3×3 convolution of the VAE at 256²). Small feature maps
//! of a batch (the U-Net's deep levels at a CFG batch of 2) are unfolded side by side into one product,
//! so the weights (59 MB for a 1280-channel 3×3 kernel) are packed once rather than once per image.
//! The bias is written into the output first and the product accumulates onto it.

use rayon::prelude::*;

use super::gemm::{fill_rows, matmul, Operand};
use super::{output, threads, with_scratch};

/// Unfolded floats per band (16 MiB).
const BAND_FLOATS: usize = 1 << 22;

/// Output pixels per image below which the images of a batch are unfolded into one product.
const COMBINE_BELOW: usize = 1024;

/// The geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dSpec {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// Top, left, bottom, right.
    pub pad: [usize; 4],
}

impl Conv2dSpec {
    /// Output height and width, `None` if the (dilated) kernel does not fit the padded input.
    pub fn out_hw(&self) -> Option<(usize, usize)> {
        let [pt, pl, pb, pr] = self.pad;
        let ekh = self.dilation[0] * (self.kh - 1) + 1;
        let ekw = self.dilation[1] * (self.kw - 1) + 1;
        let (hp, wp) = (self.h + pt + pb, self.w + pl + pr);
        if self.kh == 0 || self.kw == 0 || hp < ekh || wp < ekw || self.stride.contains(&0) {
            return None;
        }
        Some((
            (hp - ekh) / self.stride[0] + 1,
            (wp - ekw) / self.stride[1] + 1,
        ))
    }

    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.pad == [0; 4]
    }
}

/// `conv2d(x, weight) + bias` for `x [B, C_in, H, W]`, `weight [C_out, C_in, kh, kw]` (contiguous,
/// row-major); returns `[B, C_out, H_out, W_out]`.
pub fn conv2d(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: &Conv2dSpec) -> Vec<f32> {
    let _timer = super::profile::Timer::start(0);
    let (ho, wo) = s
        .out_hw()
        .expect("conv2d: the kernel does not fit the padded input");
    let (hw_in, hw) = (s.h * s.w, ho * wo);
    let k = s.c_in * s.kh * s.kw;
    assert_eq!(x.len(), s.batch * s.c_in * hw_in, "conv2d: input size");
    assert_eq!(weight.len(), s.c_out * k, "conv2d: weight size");
    if let Some(b) = bias {
        assert_eq!(b.len(), s.c_out, "conv2d: bias size");
    }
    let mut out = output(s.batch * s.c_out * hw);
    let threads = threads();
    let wop = Operand::rows(weight.as_ptr(), k);

    if s.pointwise() {
        for (xb, ob) in x
            .chunks_exact(s.c_in * hw_in)
            .zip(out.chunks_exact_mut(s.c_out * hw))
        {
            if let Some(b) = bias {
                fill_rows(ob, s.c_out, hw, hw, b);
            }
            // SAFETY: `ob` is C_out × HW, `weight` C_out × C_in, `xb` C_in × HW (checked above).
            unsafe {
                matmul(
                    s.c_out,
                    hw,
                    s.c_in,
                    ob.as_mut_ptr(),
                    hw,
                    wop,
                    Operand::rows(xb.as_ptr(), hw),
                    bias.is_some(),
                    threads,
                )
            };
        }
        return out;
    }

    let n_all = s.batch * hw;
    if s.batch > 1 && hw < COMBINE_BELOW && k * n_all <= BAND_FLOATS {
        with_scratch(k * n_all + s.c_out * n_all, |buf| {
            let (col, tmp) = buf.split_at_mut(k * n_all);
            for (bi, xb) in x.chunks_exact(s.c_in * hw_in).enumerate() {
                im2col(xb, s, 0, ho, wo, col, n_all, bi * hw);
            }
            // SAFETY: `tmp` is C_out × (B·HW), `col` K × (B·HW), `weight` C_out × K.
            unsafe {
                matmul(
                    s.c_out,
                    n_all,
                    k,
                    tmp.as_mut_ptr(),
                    n_all,
                    wop,
                    Operand::rows(col.as_ptr(), n_all),
                    false,
                    threads,
                )
            };
            for (bi, ob) in out.chunks_exact_mut(s.c_out * hw).enumerate() {
                for (co, orow) in ob.chunks_exact_mut(hw).enumerate() {
                    let src = &tmp[co * n_all + bi * hw..][..hw];
                    let add = bias.map_or(0.0, |b| b[co]);
                    for (o, v) in orow.iter_mut().zip(src) {
                        *o = v + add;
                    }
                }
            }
        });
        return out;
    }

    let band_rows = (BAND_FLOATS / (k * wo).max(1)).clamp(1, ho);
    with_scratch(k * band_rows * wo, |col| {
        for (xb, ob) in x
            .chunks_exact(s.c_in * hw_in)
            .zip(out.chunks_exact_mut(s.c_out * hw))
        {
            let mut y0 = 0;
            while y0 < ho {
                let y1 = (y0 + band_rows).min(ho);
                let n = (y1 - y0) * wo;
                im2col(xb, s, y0, y1, wo, col, n, 0);
                let dst = &mut ob[y0 * wo..];
                if let Some(b) = bias {
                    fill_rows(dst, s.c_out, n, hw, b);
                }
                // SAFETY: rows of `dst` are HW apart and C_out of them, each with n ≤ HW − y0·W_out
                // elements left in `ob`; `col` holds K × n.
                unsafe {
                    matmul(
                        s.c_out,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        hw,
                        wop,
                        Operand::rows(col.as_ptr(), n),
                        bias.is_some(),
                        threads,
                    )
                };
                y0 = y1;
            }
        }
    });
    out
}

/// Unfolds output rows `y0..y1` of one image `xb [C_in, H, W]` into `col`: row `(c, i, j)` of `col`
/// (rows `ld` apart) gets, from column `off`, the input pixel under kernel tap `(i, j)` of each output
/// pixel, 0 in the padding.
#[allow(clippy::too_many_arguments)]
fn im2col(
    xb: &[f32],
    s: &Conv2dSpec,
    y0: usize,
    y1: usize,
    wo: usize,
    col: &mut [f32],
    ld: usize,
    off: usize,
) {
    let k = s.c_in * s.kh * s.kw;
    let n = (y1 - y0) * wo;
    let [pt, pl, _, _] = s.pad;
    let [sh, sw] = s.stride;
    let [dh, dw] = s.dilation;
    let (h, w) = (s.h, s.w);
    let fill = |kk: usize, row: &mut [f32]| {
        let c = kk / (s.kh * s.kw);
        let i = (kk / s.kw) % s.kh;
        let j = kk % s.kw;
        let plane = &xb[c * h * w..(c + 1) * h * w];
        let x0 = (j * dw) as isize - pl as isize;
        for (t, oy) in (y0..y1).enumerate() {
            let seg = &mut row[off + t * wo..off + (t + 1) * wo];
            let iy = (oy * sh + i * dh) as isize - pt as isize;
            if iy < 0 || iy >= h as isize {
                seg.fill(0.0);
                continue;
            }
            let src = &plane[iy as usize * w..(iy as usize + 1) * w];
            if sw == 1 {
                // ox valid where 0 ≤ ox + x0 < w.
                let lo = (-x0).clamp(0, wo as isize) as usize;
                let hi = (w as isize - x0).clamp(lo as isize, wo as isize) as usize;
                seg[..lo].fill(0.0);
                seg[lo..hi].copy_from_slice(
                    &src[(lo as isize + x0) as usize..(hi as isize + x0) as usize],
                );
                seg[hi..].fill(0.0);
            } else {
                for (ox, v) in seg.iter_mut().enumerate() {
                    let ix = (ox * sw) as isize + x0;
                    *v = if ix >= 0 && ix < w as isize {
                        src[ix as usize]
                    } else {
                        0.0
                    };
                }
            }
        }
    };
    let rows = col[..k * ld].chunks_exact_mut(ld);
    if k * n >= 1 << 16 {
        let min = ((1 << 14) / n.max(1)).max(1);
        rows.enumerate()
            .collect::<Vec<_>>()
            .into_par_iter()
            .with_min_len(min)
            .for_each(|(kk, row)| fill(kk, row));
    } else {
        rows.enumerate().for_each(|(kk, row)| fill(kk, row));
    }
}

/// Gradients of [`conv2d`] for the output gradient `dy [B, C_out, H_out, W_out]`: the input's (the
/// transposed product `Wᵀ · dY` folded back onto the input grid, col2im), the weight's
/// (`Σ dY · colᵀ`, the unfolded input recomputed band by band rather than kept from the forward
/// pass) and the bias's (`Σ dY`); each only when asked for.
pub fn conv2d_backward(
    x: &[f32],
    weight: &[f32],
    dy: &[f32],
    s: &Conv2dSpec,
    [want_dx, want_dw, want_db]: [bool; 3],
) -> [Option<Vec<f32>>; 3] {
    let (ho, wo) = s
        .out_hw()
        .expect("conv2d_backward: the kernel does not fit the padded input");
    let (hw_in, hw) = (s.h * s.w, ho * wo);
    let k = s.c_in * s.kh * s.kw;
    assert_eq!(
        x.len(),
        s.batch * s.c_in * hw_in,
        "conv2d_backward: input size"
    );
    assert_eq!(weight.len(), s.c_out * k, "conv2d_backward: weight size");
    assert_eq!(
        dy.len(),
        s.batch * s.c_out * hw,
        "conv2d_backward: gradient size"
    );
    let threads = threads();
    let db = want_db.then(|| {
        let mut db = vec![0.0f64; s.c_out];
        for dyb in dy.chunks_exact(s.c_out * hw) {
            for (acc, row) in db.iter_mut().zip(dyb.chunks_exact(hw)) {
                *acc += super::norm::sum(row);
            }
        }
        db.into_iter().map(|v| v as f32).collect::<Vec<f32>>()
    });
    let mut dw = want_dw.then(|| output(s.c_out * k));
    let mut dx = want_dx.then(|| {
        if s.pointwise() {
            output(x.len())
        } else {
            vec![0.0f32; x.len()]
        }
    });
    if !(want_dx || want_dw) {
        return [dx, dw, db];
    }
    let wt = Operand::transposed(weight.as_ptr(), k);
    if s.pointwise() {
        for bi in 0..s.batch {
            let xb = &x[bi * s.c_in * hw..(bi + 1) * s.c_in * hw];
            let dyb = &dy[bi * s.c_out * hw..(bi + 1) * s.c_out * hw];
            if let Some(dx) = dx.as_mut() {
                // SAFETY: dx_b is C_in × HW; Wᵀ read from W (C_out × C_in); dy_b C_out × HW.
                unsafe {
                    matmul(
                        s.c_in,
                        hw,
                        s.c_out,
                        dx[bi * s.c_in * hw..].as_mut_ptr(),
                        hw,
                        wt,
                        Operand::rows(dyb.as_ptr(), hw),
                        false,
                        threads,
                    )
                };
            }
            if let Some(dw) = dw.as_mut() {
                // SAFETY: dW is C_out × C_in; dy_b C_out × HW; x_bᵀ read from x_b (C_in × HW).
                unsafe {
                    matmul(
                        s.c_out,
                        s.c_in,
                        hw,
                        dw.as_mut_ptr(),
                        s.c_in,
                        Operand::rows(dyb.as_ptr(), hw),
                        Operand::transposed(xb.as_ptr(), hw),
                        bi > 0,
                        threads,
                    )
                };
            }
        }
        return [dx, dw, db];
    }
    let band_rows = (BAND_FLOATS / (k * wo).max(1)).clamp(1, ho);
    with_scratch(k * band_rows * wo, |col| {
        let mut first = true;
        for bi in 0..s.batch {
            let xb = &x[bi * s.c_in * hw_in..(bi + 1) * s.c_in * hw_in];
            let dyb = &dy[bi * s.c_out * hw..(bi + 1) * s.c_out * hw];
            let mut y0 = 0;
            while y0 < ho {
                let y1 = (y0 + band_rows).min(ho);
                let n = (y1 - y0) * wo;
                let dy_band = Operand::rows(dyb[y0 * wo..].as_ptr(), hw);
                if let Some(dw) = dw.as_mut() {
                    im2col(xb, s, y0, y1, wo, col, n, 0);
                    // SAFETY: dW is C_out × K; the band of dy_b is C_out × n with rows HW apart;
                    // colᵀ read from col (K × n).
                    unsafe {
                        matmul(
                            s.c_out,
                            k,
                            n,
                            dw.as_mut_ptr(),
                            k,
                            dy_band,
                            Operand::transposed(col.as_ptr(), n),
                            !first,
                            threads,
                        )
                    };
                    first = false;
                }
                if let Some(dx) = dx.as_mut() {
                    // SAFETY: col is K × n; Wᵀ read from W (C_out × K); the band of dy_b as above.
                    unsafe {
                        matmul(
                            k,
                            n,
                            s.c_out,
                            col.as_mut_ptr(),
                            n,
                            wt,
                            dy_band,
                            false,
                            threads,
                        )
                    };
                    col2im_add(
                        &col[..k * n],
                        s,
                        y0,
                        y1,
                        wo,
                        &mut dx[bi * s.c_in * hw_in..(bi + 1) * s.c_in * hw_in],
                    );
                }
                y0 = y1;
            }
        }
    });
    [dx, dw, db]
}

/// Adds the unfolded gradient `dcol [C_in·kh·kw, rows·W_out]` of output rows `y0..y1` back onto the
/// input grid `dxb [C_in, H, W]` (the transpose of [`im2col`]); one channel per task.
fn col2im_add(dcol: &[f32], s: &Conv2dSpec, y0: usize, y1: usize, wo: usize, dxb: &mut [f32]) {
    let n = (y1 - y0) * wo;
    let [pt, pl, _, _] = s.pad;
    let [sh, sw] = s.stride;
    let [dh, dw] = s.dilation;
    let (h, w) = (s.h, s.w);
    let taps = s.kh * s.kw;
    let channel = |c: usize, plane: &mut [f32]| {
        for i in 0..s.kh {
            for j in 0..s.kw {
                let row = &dcol[(c * taps + i * s.kw + j) * n..][..n];
                let x0 = (j * dw) as isize - pl as isize;
                for (t, oy) in (y0..y1).enumerate() {
                    let iy = (oy * sh + i * dh) as isize - pt as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * w..(iy as usize + 1) * w];
                    let seg = &row[t * wo..(t + 1) * wo];
                    if sw == 1 {
                        let lo = (-x0).clamp(0, wo as isize) as usize;
                        let hi = (w as isize - x0).clamp(lo as isize, wo as isize) as usize;
                        let d = &mut dst[(lo as isize + x0) as usize..(hi as isize + x0) as usize];
                        d.iter_mut().zip(&seg[lo..hi]).for_each(|(a, g)| *a += g);
                    } else {
                        for (ox, g) in seg.iter().enumerate() {
                            let ix = (ox * sw) as isize + x0;
                            if ix >= 0 && ix < w as isize {
                                dst[ix as usize] += g;
                            }
                        }
                    }
                }
            }
        }
    };
    if s.c_in > 1 && dcol.len() >= 1 << 16 {
        dxb.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(c, plane)| channel(c, plane));
    } else {
        dxb.chunks_mut(h * w)
            .enumerate()
            .for_each(|(c, plane)| channel(c, plane));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 7-loop convolution in f64 (reference).
    fn reference(x: &[f32], w: &[f32], bias: Option<&[f32]>, s: &Conv2dSpec) -> Vec<f32> {
        let (ho, wo) = s.out_hw().unwrap();
        let mut out = vec![0.0f32; s.batch * s.c_out * ho * wo];
        for b in 0..s.batch {
            for co in 0..s.c_out {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = bias.map_or(0.0, |b| b[co] as f64);
                        for c in 0..s.c_in {
                            for i in 0..s.kh {
                                for j in 0..s.kw {
                                    let iy = (oy * s.stride[0] + i * s.dilation[0]) as isize
                                        - s.pad[0] as isize;
                                    let ix = (ox * s.stride[1] + j * s.dilation[1]) as isize
                                        - s.pad[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize
                                    {
                                        continue;
                                    }
                                    let xv = x[((b * s.c_in + c) * s.h + iy as usize) * s.w
                                        + ix as usize];
                                    let wv = w[((co * s.c_in + c) * s.kh + i) * s.kw + j];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * s.c_out + co) * ho + oy) * wo + ox] = acc as f32;
                    }
                }
            }
        }
        out
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_a_direct_convolution() {
        let cases = [
            // batch, c_in, h, w, c_out, k, stride, dilation, pad (t, l, b, r)
            (1, 3, 7, 9, 5, 3, 1, 1, [1, 1, 1, 1]),
            (2, 16, 12, 10, 8, 3, 1, 1, [1, 1, 1, 1]), // combined batch
            (2, 4, 40, 36, 6, 3, 1, 1, [1, 1, 1, 1]),  // per image
            (2, 4, 5, 5, 6, 1, 1, 1, [0, 0, 0, 0]),    // pointwise
            (1, 2, 6, 8, 3, 3, 1, 1, [0, 0, 0, 0]),
            (1, 3, 9, 7, 4, 5, 1, 1, [2, 2, 2, 2]),
            (2, 3, 9, 8, 4, 3, 2, 1, [1, 1, 1, 1]), // stride 2
            (1, 3, 8, 8, 4, 3, 2, 1, [0, 0, 1, 1]), // diffusers' asymmetric downsample
            (1, 2, 9, 9, 3, 3, 1, 2, [2, 2, 2, 2]), // dilation
            (3, 2, 6, 5, 3, 2, 1, 1, [0, 1, 1, 0]),
        ];
        for (ci, &(b, c_in, h, w, c_out, k, st, dil, pad)) in cases.iter().enumerate() {
            let s = Conv2dSpec {
                batch: b,
                c_in,
                h,
                w,
                c_out,
                kh: k,
                kw: k,
                stride: [st, st],
                dilation: [dil, dil],
                pad,
            };
            let x = data(b * c_in * h * w, ci as u32);
            let wt = data(c_out * c_in * k * k, 100 + ci as u32);
            let bias = data(c_out, 200 + ci as u32);
            for bias in [None, Some(bias.as_slice())] {
                let got = conv2d(&x, &wt, bias, &s);
                let want = reference(&x, &wt, bias, &s);
                blipd_testkit::assert_close_slice(&format!("case {ci} {s:?}"), &got, &want, 1e-5);
            }
        }
    }

    /// Gradients by the adjoint identity: ⟨dy, conv(x)⟩ is linear in x, w and b, so the gradients of
    /// `L = ⟨dy, conv(x, w, b)⟩` are checked against directional derivatives (exact for a linear map).
    #[test]
    fn gradients_match_directional_derivatives() {
        let cases = [
            (2, 3, 7, 6, 4, 3, 1, 1, [1, 1, 1, 1]),
            (2, 4, 5, 5, 3, 1, 1, 1, [0, 0, 0, 0]),
            (1, 3, 9, 8, 2, 3, 2, 1, [0, 0, 1, 1]),
            (2, 2, 9, 9, 3, 3, 1, 2, [2, 2, 2, 2]),
            (1, 2, 6, 7, 2, 5, 2, 1, [2, 1, 2, 1]),
        ];
        for (ci, &(b, c_in, h, w, c_out, k, st, dil, pad)) in cases.iter().enumerate() {
            let s = Conv2dSpec {
                batch: b,
                c_in,
                h,
                w,
                c_out,
                kh: k,
                kw: k,
                stride: [st, st],
                dilation: [dil, dil],
                pad,
            };
            let (ho, wo) = s.out_hw().unwrap();
            let x = data(b * c_in * h * w, ci as u32);
            let wt = data(c_out * c_in * k * k, 50 + ci as u32);
            let dy = data(b * c_out * ho * wo, 90 + ci as u32);
            let [dx, dw, db] = conv2d_backward(&x, &wt, &dy, &s, [true; 3]);
            let (dx, dw, db) = (dx.unwrap(), dw.unwrap(), db.unwrap());
            let dot = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| *x as f64 * *y as f64)
                    .sum::<f64>()
            };
            // d/dε ⟨dy, conv(x + ε·u, w)⟩ = ⟨dy, conv(u, w)⟩ = ⟨dx, u⟩ (no bias in the direction).
            let u = data(x.len(), 200 + ci as u32);
            let lhs = dot(&dy, &reference(&u, &wt, None, &s));
            assert!(
                (lhs - dot(&dx, &u)).abs() < 1e-4 * lhs.abs().max(1.0),
                "case {ci} dx: {lhs} vs {}",
                dot(&dx, &u)
            );
            let v = data(wt.len(), 300 + ci as u32);
            let lhs = dot(&dy, &reference(&x, &v, None, &s));
            assert!(
                (lhs - dot(&dw, &v)).abs() < 1e-4 * lhs.abs().max(1.0),
                "case {ci} dw: {lhs} vs {}",
                dot(&dw, &v)
            );
            let bb = data(c_out, 400 + ci as u32);
            let zero = vec![0.0f32; wt.len()];
            let lhs = dot(&dy, &reference(&x, &zero, Some(&bb), &s));
            assert!(
                (lhs - dot(&db, &bb)).abs() < 1e-4 * lhs.abs().max(1.0),
                "case {ci} db"
            );
        }
    }

    #[test]
    fn bands_split_large_inputs() {
        // K·W_out large enough that one band cannot hold every row.
        let s = Conv2dSpec {
            batch: 1,
            c_in: 64,
            h: 300,
            w: 250,
            c_out: 3,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            dilation: [1, 1],
            pad: [1, 1, 1, 1],
        };
        assert!(s.c_in * 9 * 250 * 300 > BAND_FLOATS);
        let x = data(64 * 300 * 250, 7);
        let wt = data(3 * 64 * 9, 8);
        let got = conv2d(&x, &wt, None, &s);
        let want = reference(&x, &wt, None, &s);
        blipd_testkit::assert_close_slice("banded 64-channel 300x250", &got, &want, 1e-4);
    }
}
