//! Multi-level foreground estimation (Germer, Uelwer, Conrad & Harmeling 2020) with pymatting's
//! `estimate_foreground_ml` semantics: f32 buffers, 1×1 initialisation with the mean colours of α>0.9 and
//! α<0.1, levels `round(w^(i/L))` for `i = 0..=L` with `L = ⌈log₂ max(w, h)⌉`, nearest resampling
//! `src = ⌊dst·src_size/dst_size⌋`, and in-place raster-order Gauss–Seidel sweeps of the per-pixel 2×2 system
//! (10 sweeps on levels whose sides are both ≤ 32, else 2), F and B clamped to `[0, 1]`.

use crate::buffer::{Gray, Rgb};
use crate::error::Result;

/// Options of [`estimate_foreground_ml`] (pymatting defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FgOptions {
    pub regularization: f32,
    pub n_small_iterations: usize,
    pub n_big_iterations: usize,
    pub small_size: usize,
    pub gradient_weight: f32,
}

impl Default for FgOptions {
    fn default() -> Self {
        FgOptions {
            regularization: 1e-5,
            n_small_iterations: 10,
            n_big_iterations: 2,
            small_size: 32,
            gradient_weight: 1.0,
        }
    }
}

fn resize_nearest(
    dst: &mut [f32],
    dw: usize,
    dh: usize,
    src: &[f32],
    sw: usize,
    sh: usize,
    depth: usize,
) {
    for y in 0..dh {
        let ys = (y * sh / dh).min(sh - 1);
        for x in 0..dw {
            let xs = (x * sw / dw).min(sw - 1);
            let (d, s) = ((y * dw + x) * depth, (ys * sw + xs) * depth);
            dst[d..d + depth].copy_from_slice(&src[s..s + depth]);
        }
    }
}

/// Estimates foreground F and background B colours (interleaved RGB, f64 from the f32 computation).
pub fn estimate_foreground_ml(image: &Rgb, alpha: &Gray, opts: &FgOptions) -> Result<(Rgb, Rgb)> {
    alpha.check_size("alpha", image.width, image.height)?;
    let (w0, h0) = (image.width, image.height);
    let img0: Vec<f32> = image.data.iter().map(|&v| v as f32).collect();
    let a0: Vec<f32> = alpha.data.iter().map(|&v| v as f32).collect();
    let (mut fm, mut bm) = ([0.0f32; 3], [0.0f32; 3]);
    let (mut fc, mut bc) = (0usize, 0usize);
    for (q, &a) in a0.iter().enumerate() {
        if a > 0.9 {
            for c in 0..3 {
                fm[c] += img0[q * 3 + c];
            }
            fc += 1;
        }
        if a < 0.1 {
            for c in 0..3 {
                bm[c] += img0[q * 3 + c];
            }
            bc += 1;
        }
    }
    for c in 0..3 {
        fm[c] /= fc as f32 + 1e-5;
        bm[c] /= bc as f32 + 1e-5;
    }
    let (mut f_prev, mut b_prev) = (fm.to_vec(), bm.to_vec());
    let (mut wp, mut hp) = (1usize, 1usize);
    let n_levels = (w0.max(h0) as f64).log2().ceil().max(0.0) as i32;
    let mut img = Vec::new();
    let mut al = Vec::new();
    let mut f = Vec::new();
    let mut b = Vec::new();
    let (mut w, mut h) = (1, 1);
    for level in 0..=n_levels {
        let e = if n_levels == 0 {
            1.0
        } else {
            f64::from(level) / f64::from(n_levels)
        };
        w = ((w0 as f64).powf(e).round() as usize).max(1);
        h = ((h0 as f64).powf(e).round() as usize).max(1);
        img.resize(w * h * 3, 0.0);
        al.resize(w * h, 0.0);
        f.resize(w * h * 3, 0.0);
        b.resize(w * h * 3, 0.0);
        resize_nearest(&mut img, w, h, &img0, w0, h0, 3);
        resize_nearest(&mut al, w, h, &a0, w0, h0, 1);
        resize_nearest(&mut f, w, h, &f_prev, wp, hp, 3);
        resize_nearest(&mut b, w, h, &b_prev, wp, hp, 3);
        let n_iter = if w <= opts.small_size && h <= opts.small_size {
            opts.n_small_iterations
        } else {
            opts.n_big_iterations
        };
        for _ in 0..n_iter {
            sweep(&img, &al, &mut f, &mut b, w, h, opts);
        }
        f_prev.clone_from(&f);
        b_prev.clone_from(&b);
        wp = w;
        hp = h;
    }
    let to_rgb = |v: &[f32]| Rgb {
        width: w,
        height: h,
        data: v.iter().map(|&x| f64::from(x)).collect(),
    };
    Ok((to_rgb(&f), to_rgb(&b)))
}

/// One in-place raster-order Gauss–Seidel sweep.
fn sweep(img: &[f32], al: &[f32], f: &mut [f32], b: &mut [f32], w: usize, h: usize, o: &FgOptions) {
    for y in 0..h {
        let ys = [y, y, y.saturating_sub(1), (y + 1).min(h - 1)];
        for x in 0..w {
            let xs = [x.saturating_sub(1), (x + 1).min(w - 1), x, x];
            let q = y * w + x;
            let a0 = al[q];
            let a1 = 1.0 - f64::from(a0);
            let mut a00 = a0 * a0;
            let a01 = f64::from(a0) * a1;
            let mut a11 = a1 * a1;
            let mut b0 = [0.0f32; 3];
            let mut b1 = [0.0f32; 3];
            for c in 0..3 {
                b0[c] = (f64::from(a0) * f64::from(img[q * 3 + c])) as f32;
                b1[c] = (a1 * f64::from(img[q * 3 + c])) as f32;
            }
            for d in 0..4 {
                let q2 = ys[d] * w + xs[d];
                let da = o.regularization + o.gradient_weight * (a0 - al[q2]).abs();
                a00 += da;
                a11 += f64::from(da);
                for c in 0..3 {
                    b0[c] += da * f[q2 * 3 + c];
                    b1[c] += da * b[q2 * 3 + c];
                }
            }
            let det = f64::from(a00) * a11 - a01 * a01;
            let inv = 1.0 / det;
            let (m00, m01, m11) = (inv * a11, -inv * a01, inv * f64::from(a00));
            for c in 0..3 {
                let fc = m00 * f64::from(b0[c]) + m01 * f64::from(b1[c]);
                let bc = m01 * f64::from(b0[c]) + m11 * f64::from(b1[c]);
                f[q * 3 + c] = fc.clamp(0.0, 1.0) as f32;
                b[q * 3 + c] = bc.clamp(0.0, 1.0) as f32;
            }
        }
    }
}
