//! Unknown-only closed-form matting system on a padded pixel grid, its incomplete Cholesky preconditioner and
//! preconditioned conjugate gradients (used by [`crate::matting`]).
//!
//! Layout (chosen so that every inner loop is a contiguous, vectorisable loop):
//!
//! * the image grid is padded by two pixels on each side, so a 5×5 neighbour of any pixel is at the constant
//!   offset `dy·W + dx` (`W = width + 4`) without bounds checks;
//! * unknown pixels are numbered in raster order (compact index `c`) and grouped into *runs*: maximal
//!   horizontal segments of consecutive unknown pixels, so within a run both the compact index and the grid
//!   index advance by one;
//! * the matrix is stored as 25 bands (5×5 neighbourhood, raster order, band 12 is the diagonal) in structure-
//!   of-arrays `f32` (`a[s·n + c]`); the entries are accumulated in `f64` and rounded once (rounding the matrix
//!   to `f32` changes α by < 1e-5 on the benchmark photos, see `docs/data-pipeline.md`);
//! * the vectors the stencil reads (`p` for the product, `z` for the triangular solves) live on the padded grid
//!   with zeros at known pixels; the others are compact. The iterate `x` and the residual `r` are `f64`; the
//!   search direction `p`, its product `Ap` and the preconditioner's sweeps (`z`) are `f32`, and the factor is
//!   stored as bf16: these only change the search directions, not the residual that decides convergence,
//!   which is confirmed on the `f64` matrix at the end (CG restarts from it where the `f32` product drifted;
//!   tolerance 1e-7 still reproduces pymatting, with one restart);
//! * the runs are short (30–80 pixels at 512²), so the hot loops use AVX-512 or AVX2+FMA kernels with masked
//!   tails (`matting_simd.rs`) when the CPU has them (selected at run time).
//!
//! The incomplete Cholesky factor keeps the 12 lower bands of the matrix (zero fill). Fill-in that IC(0) drops
//! is compensated on the diagonal (after Ajiz & Jennings 1984: a dropped `f` adds `κ|f|` to both `aᵢᵢ` and
//! `aⱼⱼ`; the √(aᵢᵢ/aⱼⱼ) weighting of the paper made no difference in iterations here and costs four loads
//! per dropped entry); with κ = 1 this cannot break down in exact arithmetic, smaller κ give a
//! stronger preconditioner and fall back to κ = 1 and then to pymatting's diagonal-shift ladder when a pivot
//! fails. κ = 0.3 needs no shift on the benchmark photos, where plain IC(0) needed a shift of 1e-2–1e-1.

// Band and window loops read best with explicit indices.
#![allow(clippy::needless_range_loop)]

use super::pool::Buf;
use super::simd;
use crate::error::{DataError, Result};

/// `Σ_{k < len} $e` over a run whose slices `$s` (read) and `$m` (written by `$e`) are indexed by `k`. Summed in
/// eight interleaved partial sums over blocks of eight (the slices seen as `[_; 8]` arrays), so the loop
/// vectorises: one running `f64` sum is a strict sequential chain that kept every `$e` scalar, and these fused
/// update-and-dot loops were about a sixth of a solve.
macro_rules! lanes_sum {
    ($len:expr, [$($s:ident),*], [$($m:ident),*], |$k:ident| $e:expr) => {{
        let len = $len;
        let n8 = len - len % 8;
        let mut acc = [0.0f64; 8];
        {
            $(let $s = $s[..n8].as_chunks::<8>().0;)*
            $(let $m = $m[..n8].as_chunks_mut::<8>().0;)*
            for c in 0..n8 / 8 {
                $(let $s = &$s[c];)*
                $(let $m = &mut $m[c];)*
                for $k in 0..8 {
                    acc[$k] += $e;
                }
            }
        }
        let mut tail = 0.0f64;
        for $k in n8..len {
            tail += $e;
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
    }};
}

/// Instruction-set levels the solver is compiled for (selected at run time in `matting::solve_dispatch`).
pub(crate) const ISA_GENERIC: u8 = 0;
/// AVX2 + FMA.
pub(crate) const ISA_AVX2: u8 = 1;
/// AVX-512F (+ AVX2, FMA).
pub(crate) const ISA_AVX512: u8 = 2;

/// Grid padding on each side (the stencil reaches two pixels).
const PAD: usize = 2;
/// Bands of the 5×5 stencil; band `DIAG` is the diagonal, bands below it are the lower neighbours.
const BANDS: usize = 25;
const DIAG: usize = 12;
/// Band of pixel `j` of a 3×3 window (raster index) in the row of pixel `i`.
const PAIR_BAND: [[usize; 9]; 9] = {
    let mut t = [[0usize; 9]; 9];
    let mut i = 0;
    while i < 9 {
        let mut j = 0;
        while j < 9 {
            t[i][j] = (j / 3 + 2 - i / 3) * 5 + (j % 3 + 2 - i % 3);
            j += 1;
        }
        i += 1;
    }
    t
};
/// 1/9 (3×3 window size).
const NINTH: f64 = 1.0 / 9.0;
/// Marks a grid cell that is not an unknown pixel.
pub(crate) const NONE: u32 = u32::MAX;

/// (dy, dx) of band `s`.
#[inline(always)]
fn band_dyx(s: usize) -> (isize, isize) {
    ((s / 5) as isize - 2, (s % 5) as isize - 2)
}

/// `out ⊕= Σ_{i<5} a[i]·x[i]` elementwise in `f32` (⊕ by `MODE`); SIMD kernel per `ISA`.
#[inline(always)]
fn group5_f32<const ISA: u8, const MODE: u8>(a: [&[f32]; 5], x: [&[f32]; 5], out: &mut [f32]) {
    let len = out.len();
    let a = [
        &a[0][..len],
        &a[1][..len],
        &a[2][..len],
        &a[3][..len],
        &a[4][..len],
    ];
    let x = [
        &x[0][..len],
        &x[1][..len],
        &x[2][..len],
        &x[3][..len],
        &x[4][..len],
    ];
    #[cfg(target_arch = "x86_64")]
    if ISA == ISA_AVX512 {
        // SAFETY: ISA levels above generic are only used after run-time detection of the features
        // (`matting::solve_dispatch`); all slices were cut to the output's length above.
        unsafe { simd::group5_f32_512::<MODE>(a, x, out, &[]) };
        return;
    } else if ISA == ISA_AVX2 {
        // SAFETY: as above.
        unsafe { simd::group5_f32::<MODE>(a, x, out, &[]) };
        return;
    }
    for k in 0..len {
        let v = a[0][k] * x[0][k]
            + a[1][k] * x[1][k]
            + a[2][k] * x[2][k]
            + a[3][k] * x[3][k]
            + a[4][k] * x[4][k];
        out[k] = match MODE {
            simd::SET => v,
            _ => out[k] + v,
        };
    }
}

/// The slices `v[g0 + off_s ..][..len]` of the five stencil bands `s0 .. s0 + 5` (one stencil row) around a
/// run starting at grid cell `g0`. (`#[inline(always)]` helpers rather than closures or `array::map`: the
/// solver is one large function after inlining, and LLVM leaves those as calls there, once per run and band.)
#[inline(always)]
fn stencil_row<'a, T>(
    v: &'a [T],
    off: &[isize; BANDS],
    s0: usize,
    g0: usize,
    len: usize,
) -> [&'a [T]; 5] {
    let at = |s: usize| (g0 as isize + off[s]) as usize;
    [
        &v[at(s0)..at(s0) + len],
        &v[at(s0 + 1)..at(s0 + 1) + len],
        &v[at(s0 + 2)..at(s0 + 2) + len],
        &v[at(s0 + 3)..at(s0 + 3) + len],
        &v[at(s0 + 4)..at(s0 + 4) + len],
    ]
}

/// The slices `v[base + s·stride ..][..len]` of five consecutive bands `s0 .. s0 + 5`.
#[inline(always)]
fn five_bands<T>(v: &[T], base: usize, stride: usize, s0: usize, len: usize) -> [&[T]; 5] {
    let at = |s: usize| base + s * stride;
    [
        &v[at(s0)..at(s0) + len],
        &v[at(s0 + 1)..at(s0 + 1) + len],
        &v[at(s0 + 2)..at(s0 + 2) + len],
        &v[at(s0 + 3)..at(s0 + 3) + len],
        &v[at(s0 + 4)..at(s0 + 4) + len],
    ]
}

/// bf16 (the high half of an `f32`, round to nearest even) of `v`; the incomplete Cholesky factor is stored
/// this way (see [`Ic`]).
#[inline(always)]
fn to_bf16(v: f64) -> u16 {
    let b = (v as f32).to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The `f32` value of a bf16.
#[inline(always)]
fn bf(v: u16) -> f32 {
    f32::from_bits(u32::from(v) << 16)
}

/// [`group5_f32`] with bf16 bands `a` (and bf16 `scale`). The bf16 slices reach one element past
/// the run (the SIMD kernels read pairs), so they must be cut from the factor's padded arrays.
#[inline(always)]
fn group5_bf16<const ISA: u8, const MODE: u8>(
    a: [&[u16]; 5],
    x: [&[f32]; 5],
    out: &mut [f32],
    scale: &[u16],
) {
    let len = out.len();
    // (Explicit arrays, not `map`: the solver is one large function after inlining, and LLVM leaves small
    // generic helpers such as `array::map` or closures as calls there, once per run and band.)
    let a = [
        &a[0][..len + 1],
        &a[1][..len + 1],
        &a[2][..len + 1],
        &a[3][..len + 1],
        &a[4][..len + 1],
    ];
    let x = [
        &x[0][..len],
        &x[1][..len],
        &x[2][..len],
        &x[3][..len],
        &x[4][..len],
    ];
    let scale = if MODE == simd::SUB_SCALE {
        &scale[..len + 1]
    } else {
        scale
    };
    #[cfg(target_arch = "x86_64")]
    if ISA == ISA_AVX512 {
        // SAFETY: ISA levels above generic are only used after run-time detection of the features
        // (`matting::solve_dispatch`); all slices were cut above to the lengths the kernels read.
        unsafe { simd::group5_bf16_512::<MODE>(a, x, out, scale) };
        return;
    } else if ISA == ISA_AVX2 {
        // SAFETY: as above.
        unsafe { simd::group5_bf16::<MODE>(a, x, out, scale) };
        return;
    }
    for k in 0..len {
        let v = bf(a[0][k]) * x[0][k]
            + bf(a[1][k]) * x[1][k]
            + bf(a[2][k]) * x[2][k]
            + bf(a[3][k]) * x[3][k]
            + bf(a[4][k]) * x[4][k];
        out[k] = match MODE {
            simd::SET => v,
            simd::ADD => out[k] + v,
            simd::SUB => out[k] - v,
            _ => (out[k] - v) * bf(scale[k]),
        };
    }
}

/// `z[j] −= Σ_{i<5} l[i][j + 4 − i] · t[j + 4 − i]` for `j < z.len()`, bf16 `l`: the transposed product of the
/// five bands `dx = i − 2` of one row above onto that row (`l[i]` and `t` start four places before the run;
/// `t` is zero outside it). `l[i]` and `t` hold `z.len() + 5` values (one more for the pairwise bf16 reads).
#[inline(always)]
fn scatter_row5<const ISA: u8>(l: [&[u16]; 5], t: &[f32], z: &mut [f32]) {
    let len = z.len();
    let l = [
        &l[0][..len + 5],
        &l[1][..len + 5],
        &l[2][..len + 5],
        &l[3][..len + 5],
        &l[4][..len + 5],
    ];
    let t = &t[..len + 5];
    #[cfg(target_arch = "x86_64")]
    if ISA == ISA_AVX512 {
        // SAFETY: as in `group5_bf16`; the slices were cut above to the lengths the kernel reads.
        unsafe { simd::scatter_row5_512(l, t, z) };
        return;
    } else if ISA == ISA_AVX2 {
        // SAFETY: as above.
        unsafe { simd::scatter_row5(l, t, z) };
        return;
    }
    for j in 0..len {
        let mut acc = 0.0f32;
        for i in 0..5 {
            acc += bf(l[i][j + 4 - i]) * t[j + 4 - i];
        }
        z[j] -= acc;
    }
}

/// Windows per block of the vectorised assembly (eight `f64` lanes: one AVX-512 register, two AVX2 ones).
const LANES: usize = 8;

/// Lanes of a block.
type Lanes = [f64; LANES];

/// Adds the matting-Laplacian entries of the windows centred at grid columns `col0 .. col0 + LANES` of one
/// window row (lanes where `valid` is false add nothing) to the lower-band ring. `rows[r]` is the offset of
/// the planar colours of window row `r` (0..3, top to bottom) in `planes`; `slots[r]` its ring slot.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn window_block(
    planes: &[f64],
    rw: usize,
    rows: [usize; 3],
    col0: usize,
    eps: f64,
    valid: &[bool; LANES],
    ring: &mut [f64],
    slots: [usize; 3],
) {
    let zero: Lanes = [0.0; LANES];
    // Centred colours c[k][ch] of window pixel k (raster order in the window).
    let mut c = [[zero; 3]; 9];
    let mut mean = [zero; 3];
    for k in 0..9 {
        for ch in 0..3 {
            let src = &planes[rows[k / 3] + ch * rw + col0 + k % 3 - 1..][..LANES];
            c[k][ch].copy_from_slice(src);
            for l in 0..LANES {
                mean[ch][l] += src[l];
            }
        }
    }
    for m in &mut mean {
        for v in m.iter_mut() {
            *v *= NINTH;
        }
    }
    let mut cov = [zero; 6];
    for ck in c.iter_mut() {
        for l in 0..LANES {
            let (r, g, b) = (
                ck[0][l] - mean[0][l],
                ck[1][l] - mean[1][l],
                ck[2][l] - mean[2][l],
            );
            ck[0][l] = r;
            ck[1][l] = g;
            ck[2][l] = b;
            cov[0][l] += r * r;
            cov[1][l] += r * g;
            cov[2][l] += r * b;
            cov[3][l] += g * g;
            cov[4][l] += g * b;
            cov[5][l] += b * b;
        }
    }
    // Inverse of the window covariance + ε/9 (see `build_scalar`), pre-divided by the window size.
    let mut m = [zero; 6];
    for l in 0..LANES {
        let (a00, a01, a02, a11, a12, a22) = (
            (cov[0][l] + eps) * NINTH,
            cov[1][l] * NINTH,
            cov[2][l] * NINTH,
            (cov[3][l] + eps) * NINTH,
            cov[4][l] * NINTH,
            (cov[5][l] + eps) * NINTH,
        );
        let c00 = a11 * a22 - a12 * a12;
        let c01 = a02 * a12 - a01 * a22;
        let c02 = a01 * a12 - a02 * a11;
        let c11 = a00 * a22 - a02 * a02;
        let c12 = a01 * a02 - a00 * a12;
        let c22 = a00 * a11 - a01 * a01;
        let inv_det = 1.0 / (9.0 * (a00 * c00 + a01 * c01 + a02 * c02));
        m[0][l] = c00 * inv_det;
        m[1][l] = c01 * inv_det;
        m[2][l] = c02 * inv_det;
        m[3][l] = c11 * inv_det;
        m[4][l] = c12 * inv_det;
        m[5][l] = c22 * inv_det;
    }
    let mut v = [[zero; 3]; 9];
    for k in 0..9 {
        for l in 0..LANES {
            let (s, t, u) = (c[k][0][l], c[k][1][l], c[k][2][l]);
            v[k][0][l] = m[0][l] * s + m[1][l] * t + m[2][l] * u;
            v[k][1][l] = m[1][l] * s + m[3][l] * t + m[4][l] * u;
            v[k][2][l] = m[2][l] * s + m[4][l] * t + m[5][l] * u;
        }
    }
    // Pixel columns right to left: a cell receives the entries of the windows of a block in window order
    // (left to right), as in the one-window-at-a-time assembly.
    // Lanes of windows that add nothing get zero weights (multiplying instead of selecting per entry).
    let keep: Lanes = std::array::from_fn(|l| if valid[l] { 1.0 } else { 0.0 });
    for k in 0..9 {
        for ch in 0..3 {
            for l in 0..LANES {
                v[k][ch][l] *= keep[l];
            }
        }
    }
    let diag_base: Lanes = std::array::from_fn(|l| (1.0 - NINTH) * keep[l]);
    let off_base: Lanes = std::array::from_fn(|l| -NINTH * keep[l]);
    // The last entry any pair writes (bounds check once per block instead of per pair).
    let top =
        (slots.iter().max().copied().unwrap_or(0) * (DIAG + 1) + DIAG) * rw + col0 + 1 + LANES;
    assert!(col0 >= 1 && top <= ring.len());
    for j in [2, 1, 0, 5, 4, 3, 8, 7, 6] {
        let cj = c[j];
        let dst0 = (slots[j / 3] * (DIAG + 1)) * rw + col0 + j % 3 - 1;
        for i in 0..=j {
            let base = if i == j { &diag_base } else { &off_base };
            let vi = v[i];
            // SAFETY: dst0 + band·rw + LANES ≤ `top` ≤ ring.len() (checked above; band ≤ DIAG, j % 3 ≤ 2).
            let dst = unsafe {
                ring.get_unchecked_mut(
                    dst0 + PAIR_BAND[j][i] * rw..dst0 + PAIR_BAND[j][i] * rw + LANES,
                )
            };
            for l in 0..LANES {
                dst[l] +=
                    base[l] - (vi[0][l] * cj[0][l] + vi[1][l] * cj[1][l] + vi[2][l] * cj[2][l]);
            }
        }
    }
}

/// One horizontal run of consecutive unknown pixels.
#[derive(Clone, Copy, Debug)]
struct Run {
    /// Grid index of the first pixel.
    g0: usize,
    /// Compact index of the first pixel.
    c0: usize,
    len: usize,
}

/// Unknown-only system of one level.
pub(crate) struct GridSystem {
    /// Padded grid width and cell count.
    gw: usize,
    gsize: usize,
    /// Unknown pixels.
    pub(crate) n: usize,
    /// Grid index of each unknown pixel, raster order.
    pub(crate) cells: Buf<u32>,
    /// Compact index per grid cell, or [`NONE`].
    cidx: Buf<u32>,
    runs: Vec<Run>,
    /// Grid offset of each band.
    off: [isize; BANDS],
    /// Matrix bands `a[s·n + c]`.
    a: Buf<f32>,
    /// The lower bands and diagonal (bands 0..=12, `lo64[s·n + c]`, zero where the neighbour is known) in
    /// `f64`, for the final residual check.
    lo64: Buf<f64>,
    /// Right-hand side `−L_UK α_K`.
    pub(crate) rhs: Buf<f64>,
}

impl GridSystem {
    /// The runs of unknown pixels as (image x of the first pixel, image y, compact index of the first pixel,
    /// length).
    pub(crate) fn pixel_runs(&self) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        self.runs.iter().map(|r| {
            let (gy, gx) = (r.g0 / self.gw, r.g0 % self.gw);
            (gx - PAD, gy - PAD, r.c0, r.len)
        })
    }

    /// Builds the system. `unknown[q]` / `fg[q]` classify image pixel `q`; `rgb` is interleaved (3 per pixel).
    ///
    /// Windows are processed a row at a time in blocks of [`LANES`] consecutive window centres, in structure-
    /// of-arrays form (every per-window quantity is a `[f64; LANES]`), so the covariance, the 3×3 inverse and
    /// each of the 45 pair entries are plain element-wise loops the compiler vectorises. The pair entry of
    /// pixels `i ≤ j` of the windows of a block lands in lower band `PAIR_BAND[j][i]` of consecutive grid cells,
    /// so the scatter is contiguous too. The lower bands of all cells (known ones included) are accumulated
    /// in `f64` in a ring of five grid rows; a row is complete once the windows two rows further down are done,
    /// and is then rounded into the `f32` bands of its unknown pixels (upper bands from the lower bands of the
    /// rows below), with `−L_UK α_K` from its entries towards known foreground pixels. Per-window values and
    /// summation order equal those of the one-window-at-a-time assembly.
    #[inline(always)]
    pub(crate) fn build(
        w: usize,
        h: usize,
        rgb: &[f64],
        unknown: &[bool],
        fg: &[bool],
        eps: f64,
    ) -> GridSystem {
        let (gw, gsize, cidx, cells, runs) = Self::layout(w, h, unknown);
        let n = cells.len();

        let mut off = [0isize; BANDS];
        for (s, o) in off.iter_mut().enumerate() {
            let (dy, dx) = band_dyx(s);
            *o = dy * gw as isize + dx;
        }
        // Row length of the planar colour rows and the band ring: grid columns plus room for the lanes of a
        // block that run past the last window (they read zeros and add masked zeros).
        let rw = gw + LANES + 2;
        const RING: usize = 5;
        // Planar colours of image rows (ring of three, by row mod 3), at grid columns.
        let mut planes = vec![0.0f64; 3 * 3 * rw];
        // Column intervals (inclusive) of the unknown pixels of each row, from the runs: row y's are
        // `row_iv[row_at[y]..row_at[y + 1]]`, left to right.
        let mut row_iv: Vec<(usize, usize)> = Vec::with_capacity(runs.len());
        let mut row_at = vec![0usize; h + 1];
        for run in &runs {
            let (y, x) = (run.g0 / gw - PAD, run.g0 % gw - PAD);
            row_iv.push((x, x + run.len - 1));
            row_at[y + 1] = row_iv.len();
        }
        for y in 0..h {
            row_at[y + 1] = row_at[y + 1].max(row_at[y]);
        }
        // The union of the intervals of rows y − r ..= y + r, each widened by `grow` and clipped to the image,
        // merged and sorted, into `out`: the columns that windows or stencils near unknown pixels reach.
        let near = |out: &mut Vec<(usize, usize)>, y: usize, r: usize, grow: usize| {
            out.clear();
            for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
                for &(a, b) in &row_iv[row_at[yy]..row_at[yy + 1]] {
                    out.push((a.saturating_sub(grow), (b + grow).min(w - 1)));
                }
            }
            out.sort_unstable();
            let mut m = 0;
            for i in 0..out.len() {
                if m > 0 && out[i].0 <= out[m - 1].1 + 1 {
                    out[m - 1].1 = out[m - 1].1.max(out[i].1);
                } else {
                    out[m] = out[i];
                    m += 1;
                }
            }
            out.truncate(m);
        };
        let mut iv: Vec<(usize, usize)> = Vec::with_capacity(16);
        // Only the columns that windows touching an unknown pixel read are filled (the others are not read,
        // or only by masked lanes).
        let fill_plane = |planes: &mut [f64], iv: &mut Vec<(usize, usize)>, y: usize| {
            let base = (y % 3) * 3 * rw;
            near(iv, y, 2, 2);
            for &(xa, xb) in iv.iter() {
                for x in xa..=xb {
                    let o = (y * w + x) * 3;
                    for ch in 0..3 {
                        planes[base + ch * rw + x + PAD] = rgb[o + ch];
                    }
                }
            }
        };
        // Lower bands of five grid rows (ring by image row mod 5): ring[(slot·13 + s)·rw + col].
        let mut ring = vec![0.0f64; RING * (DIAG + 1) * rw];
        // Grid foreground mask (1.0 at known foreground cells) for the right-hand side; only cells within
        // two pixels of an unknown one are read.
        let mut fgg = Buf::filled(gsize, 0.0f64);
        for y in 0..h {
            near(&mut iv, y, 2, 2);
            for &(xa, xb) in iv.iter() {
                let (f, u) = (
                    &fg[y * w + xa..=y * w + xb],
                    &unknown[y * w + xa..=y * w + xb],
                );
                let dst = &mut fgg[(y + PAD) * gw + xa + PAD..=(y + PAD) * gw + xb + PAD];
                for k in 0..dst.len() {
                    dst[k] = f64::from(u8::from(f[k] & !u[k]));
                }
            }
        }
        // Every entry of `a` and `lo64` is written below (all bands of every run).
        let mut a = Buf::for_overwrite(BANDS * n, 0.0f32);
        let mut lo64 = Buf::for_overwrite((DIAG + 1) * n, 0.0f64);
        let mut rhs = Buf::filled(n, 0.0f64);
        let mut colu = vec![false; w];
        let mut win = vec![false; w + LANES];
        let mut next_run = 0usize;
        if h >= 1 {
            fill_plane(&mut planes, &mut iv, 0);
        }
        for y in 0..h + 3 {
            if y + 1 < h {
                fill_plane(&mut planes, &mut iv, y + 1);
            }
            // Windows centred on row y (inside the image) that touch an unknown pixel, interval by interval.
            if y >= 1 && y + 1 < h {
                near(&mut iv, y, 1, 1);
                let rows = [(y - 1) % 3, y % 3, (y + 1) % 3].map(|r| r * 3 * rw);
                let slots = [(y - 1) % RING, y % RING, (y + 1) % RING];
                for &(xa, xb) in iv.iter() {
                    let (xa, xb) = (xa.max(1), xb.min(w - 2));
                    if xa > xb {
                        continue;
                    }
                    for x in xa - 1..=xb + 1 {
                        colu[x] = unknown[(y - 1) * w + x]
                            || unknown[y * w + x]
                            || unknown[(y + 1) * w + x];
                    }
                    for x in xa..=xb {
                        win[x] = colu[x - 1] || colu[x] || colu[x + 1];
                    }
                    let mut x0 = xa;
                    while x0 <= xb {
                        if !win[x0] {
                            x0 += 1;
                            continue;
                        }
                        let valid: [bool; LANES] =
                            std::array::from_fn(|l| x0 + l <= xb && win[x0 + l]);
                        window_block(&planes, rw, rows, x0 + PAD, eps, &valid, &mut ring, slots);
                        x0 += LANES;
                    }
                }
            }
            // Row p = y − 3 is complete (windows up to row p + 3 cannot reach it or the two rows below it).
            if y >= 3 {
                let p = y - 3;
                let gy = (p + PAD) * gw;
                while next_run < runs.len() && runs[next_run].g0 < gy + gw {
                    let run = runs[next_run];
                    next_run += 1;
                    let (g0, c0, len) = (run.g0, run.c0, run.len);
                    let col0 = g0 - gy;
                    let rr = &mut rhs[c0..c0 + len];
                    for s in 0..BANDS {
                        let (dy, dx) = band_dyx(s);
                        // Lower entries are stored in row p; the upper entry (c, c + off_s) is the lower entry
                        // (band 24 − s) of the neighbour.
                        let (slot, sb, col) = if s <= DIAG {
                            (p % RING, s, col0)
                        } else {
                            (
                                (p + dy as usize) % RING,
                                BANDS - 1 - s,
                                (col0 as isize + dx) as usize,
                            )
                        };
                        let src = &ring[(slot * (DIAG + 1) + sb) * rw + col..][..len];
                        let q0 = (g0 as isize + off[s]) as usize;
                        let ci = &cidx[q0..q0 + len];
                        let fgq = &fgg[q0..q0 + len];
                        let dst = &mut a[s * n + c0..s * n + c0 + len];
                        if s == DIAG {
                            for k in 0..len {
                                dst[k] = src[k] as f32;
                            }
                            lo64[s * n + c0..s * n + c0 + len].copy_from_slice(src);
                            continue;
                        }
                        if s < DIAG {
                            let l64 = &mut lo64[s * n + c0..s * n + c0 + len];
                            for k in 0..len {
                                let v = if ci[k] != NONE { src[k] } else { 0.0 };
                                dst[k] = v as f32;
                                l64[k] = v;
                                rr[k] -= src[k] * fgq[k];
                            }
                        } else {
                            for k in 0..len {
                                let v = if ci[k] != NONE { src[k] } else { 0.0 };
                                dst[k] = v as f32;
                                rr[k] -= src[k] * fgq[k];
                            }
                        }
                    }
                }
                let slot = p % RING;
                ring[slot * (DIAG + 1) * rw..(slot + 1) * (DIAG + 1) * rw].fill(0.0);
            }
        }
        GridSystem {
            gw,
            gsize,
            n,
            cells,
            cidx,
            runs,
            off,
            a,
            lo64,
            rhs,
        }
    }

    /// Padded grid, compact numbering and runs of the unknown pixels: (grid width, grid cells, compact index
    /// per cell, grid index per unknown pixel, runs).
    #[allow(clippy::type_complexity)]
    fn layout(
        w: usize,
        h: usize,
        unknown: &[bool],
    ) -> (usize, usize, Buf<u32>, Buf<u32>, Vec<Run>) {
        let gw = w + 2 * PAD;
        let gsize = gw * (h + 2 * PAD);
        let mut cidx = Buf::filled(gsize, NONE);
        let mut cells = Buf::filled(0, 0u32);
        let mut runs: Vec<Run> = Vec::new();
        for y in 0..h {
            let mut open = false;
            for x in 0..w {
                if unknown[y * w + x] {
                    let g = (y + PAD) * gw + x + PAD;
                    let c = cells.len();
                    cidx[g] = c as u32;
                    cells.push(g as u32);
                    if open {
                        if let Some(r) = runs.last_mut() {
                            r.len += 1;
                        }
                    } else {
                        runs.push(Run {
                            g0: g,
                            c0: c,
                            len: 1,
                        });
                        open = true;
                    }
                } else {
                    open = false;
                }
            }
        }
        (gw, gsize, cidx, cells, runs)
    }

    /// Straightforward per-window assembly (one 3×3 window at a time, entries scattered pair by pair); the
    /// reference the vectorised [`GridSystem::build`] is tested against.
    #[cfg(test)]
    pub(crate) fn build_scalar(
        w: usize,
        h: usize,
        rgb: &[f64],
        unknown: &[bool],
        fg: &[bool],
        eps: f64,
    ) -> GridSystem {
        let (gw, gsize, cidx, cells, runs) = Self::layout(w, h, unknown);
        let n = cells.len();
        // Lower bands and diagonal (bands 0..=DIAG) per unknown pixel, accumulated in f64.
        let mut acc = vec![[0.0f64; DIAG + 1]; n];
        let mut rhs = vec![0.0f64; n];
        // Windows touching an unknown pixel: those whose centre is within one pixel of one.
        let mut near = vec![false; w * h];
        for y in 0..h {
            for x in 0..w {
                if unknown[y * w + x] {
                    for yy in y.saturating_sub(1)..(y + 2).min(h) {
                        for xx in x.saturating_sub(1)..(x + 2).min(w) {
                            near[yy * w + xx] = true;
                        }
                    }
                }
            }
        }
        let mut c = [[0.0f64; 3]; 9];
        let mut v = [[0.0f64; 3]; 9];
        let mut wc = [NONE; 9];
        let mut wfg = [false; 9];
        for y in 1..h.saturating_sub(1) {
            for x in 1..w.saturating_sub(1) {
                if !near[y * w + x] {
                    continue;
                }
                let mut mean = [0.0f64; 3];
                for k in 0..9 {
                    let q = (y + k / 3 - 1) * w + (x + k % 3 - 1);
                    let o = q * 3;
                    c[k] = [rgb[o], rgb[o + 1], rgb[o + 2]];
                    mean[0] += c[k][0];
                    mean[1] += c[k][1];
                    mean[2] += c[k][2];
                    wc[k] = cidx[(y + k / 3 - 1 + PAD) * gw + x + k % 3 - 1 + PAD];
                    wfg[k] = fg[q];
                }
                for m in &mut mean {
                    *m *= NINTH;
                }
                let (mut a00, mut a01, mut a02, mut a11, mut a12, mut a22) =
                    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
                for ck in c.iter_mut() {
                    ck[0] -= mean[0];
                    ck[1] -= mean[1];
                    ck[2] -= mean[2];
                    a00 += ck[0] * ck[0];
                    a01 += ck[0] * ck[1];
                    a02 += ck[0] * ck[2];
                    a11 += ck[1] * ck[1];
                    a12 += ck[1] * ck[2];
                    a22 += ck[2] * ck[2];
                }
                // Window covariance + ε/9 (pymatting: (Σ c cᵀ + ε I) / 9 with ε added before the division).
                let (a00, a01, a02, a11, a12, a22) = (
                    (a00 + eps) * NINTH,
                    a01 * NINTH,
                    a02 * NINTH,
                    (a11 + eps) * NINTH,
                    a12 * NINTH,
                    (a22 + eps) * NINTH,
                );
                let c00 = a11 * a22 - a12 * a12;
                let c01 = a02 * a12 - a01 * a22;
                let c02 = a01 * a12 - a02 * a11;
                let c11 = a00 * a22 - a02 * a02;
                let c12 = a01 * a02 - a00 * a12;
                let c22 = a00 * a11 - a01 * a01;
                // The inverse, pre-divided by the window size (g = δ − 1/9 − cᵢᵀ (M/9) cⱼ below).
                let inv_det = 1.0 / (9.0 * (a00 * c00 + a01 * c01 + a02 * c02));
                let (m00, m01, m02, m11, m12, m22) = (
                    c00 * inv_det,
                    c01 * inv_det,
                    c02 * inv_det,
                    c11 * inv_det,
                    c12 * inv_det,
                    c22 * inv_det,
                );
                for k in 0..9 {
                    let [s, t, u] = c[k];
                    v[k] = [
                        m00 * s + m01 * t + m02 * u,
                        m01 * s + m11 * t + m12 * u,
                        m02 * s + m12 * t + m22 * u,
                    ];
                }
                if wc.iter().all(|&q| q != NONE) {
                    // Every pixel unknown (most windows): no branches, constant bands.
                    for j in 0..9 {
                        let cj = wc[j] as usize;
                        let cjv = c[j];
                        let row = &mut acc[cj];
                        for i in 0..=j {
                            let g = (if i == j { 1.0 - NINTH } else { -NINTH })
                                - (v[i][0] * cjv[0] + v[i][1] * cjv[1] + v[i][2] * cjv[2]);
                            row[PAIR_BAND[j][i]] += g;
                        }
                    }
                    continue;
                }
                for i in 0..9 {
                    let ci = wc[i];
                    let vi = v[i];
                    for j in i..9 {
                        let cj = wc[j];
                        if ci == NONE && cj == NONE {
                            continue;
                        }
                        let g = (if i == j { 1.0 - NINTH } else { -NINTH })
                            - (vi[0] * c[j][0] + vi[1] * c[j][1] + vi[2] * c[j][2]);
                        match (ci != NONE, cj != NONE) {
                            // j follows i in raster order: the entry is stored once, in j's lower
                            // half (the upper bands are mirrored from it below).
                            (true, true) => acc[cj as usize][PAIR_BAND[j][i]] += g,
                            (true, false) => {
                                if wfg[j] {
                                    rhs[ci as usize] -= g;
                                }
                            }
                            (false, true) => {
                                if wfg[i] {
                                    rhs[cj as usize] -= g;
                                }
                            }
                            (false, false) => {}
                        }
                    }
                }
            }
        }
        let mut off = [0isize; BANDS];
        for (s, o) in off.iter_mut().enumerate() {
            let (dy, dx) = band_dyx(s);
            *o = dy * gw as isize + dx;
        }
        // Band s and band 24 − s are mirror offsets: the upper entry (c, c + off_s) is the lower entry
        // (c + off_s, c) of the neighbour.
        let mut a = vec![0.0f32; BANDS * n];
        for (ci, row) in acc.iter().enumerate() {
            for s in 0..=DIAG {
                a[s * n + ci] = row[s] as f32;
            }
            let g = cells[ci] as isize;
            for s in DIAG + 1..BANDS {
                let cj = cidx[(g + off[s]) as usize];
                if cj != NONE {
                    a[s * n + ci] = acc[cj as usize][BANDS - 1 - s] as f32;
                }
            }
        }
        let lo64 = (0..=DIAG)
            .flat_map(|s| {
                let (acc, cells, cidx) = (&acc, &cells, &cidx);
                (0..n).map(move |c| {
                    if cidx[(cells[c] as isize + off[s]) as usize] == NONE {
                        0.0
                    } else {
                        acc[c][s]
                    }
                })
            })
            .collect::<Vec<f64>>();
        GridSystem {
            gw,
            gsize,
            n,
            cells,
            cidx,
            runs,
            off,
            a: a.into(),
            lo64: lo64.into(),
            rhs: rhs.into(),
        }
    }

    /// `r = b − A x` with the matrix in `f64` (the entries as assembled, before rounding to `f32`) for `x` on
    /// the grid (zeros at known cells); returns `‖r‖₂`. This is the residual pymatting's criterion is about.
    ///
    /// Only the lower half is stored, so every lower entry `(c, c + off)` is used twice, run by run: gathered
    /// into row `c` and scattered (mirrored) into `mirror`, a grid-sized scratch that is added at the end. Both
    /// are contiguous over a run, so the loops vectorise; the mirror writes that land on known cells are
    /// never read.
    #[inline(always)]
    pub(crate) fn residual64(&self, x: &[f64], r: &mut [f64], mirror: &mut Vec<f64>) -> f64 {
        let n = self.n;
        // `mirror` is zero between calls: only unknown cells are written with non-zero values (the lower
        // entries towards known cells are zero), and the final pass resets them.
        if mirror.len() != self.gsize {
            mirror.clear();
            mirror.resize(self.gsize, 0.0);
        }
        for run in &self.runs {
            let (g0, c0, len) = (run.g0, run.c0, run.len);
            let xr = &x[g0..g0 + len];
            let rr = &mut r[c0..c0 + len];
            let (b, d) = (
                &self.rhs[c0..c0 + len],
                &self.lo64[DIAG * n + c0..DIAG * n + c0 + len],
            );
            for k in 0..len {
                rr[k] = b[k] - d[k] * xr[k];
            }
            for s in 0..DIAG {
                let v = &self.lo64[s * n + c0..s * n + c0 + len];
                let st = (g0 as isize + self.off[s]) as usize;
                let xn = &x[st..st + len];
                for k in 0..len {
                    rr[k] -= v[k] * xn[k];
                }
                let m = &mut mirror[st..st + len];
                for k in 0..len {
                    m[k] += v[k] * xr[k];
                }
            }
        }
        let mut rn = 0.0;
        for run in &self.runs {
            let (g0, c0, len) = (run.g0, run.c0, run.len);
            let (rr, m) = (&mut r[c0..c0 + len], &mut mirror[g0..g0 + len]);
            rn += lanes_sum!(len, [], [rr, m], |k| {
                rr[k] -= m[k];
                m[k] = 0.0;
                rr[k] * rr[k]
            });
        }
        rn.sqrt()
    }

    /// `y = A x` for `x` on the grid (zeros at known cells); returns `xᵀ y`.
    #[inline(always)]
    fn matvec<const ISA: u8>(&self, x: &[f32], y: &mut [f32]) -> f64 {
        let n = self.n;
        let mut xy = 0.0;
        for run in &self.runs {
            let (g0, c0, len) = (run.g0, run.c0, run.len);
            let yr = &mut y[c0..c0 + len];
            // One stencil row (five bands) at a time.
            for row in 0..5 {
                let s0 = row * 5;
                let a5 = five_bands(&self.a, c0, n, s0, len);
                let x5 = stencil_row(x, &self.off, s0, g0, len);
                if row == 0 {
                    group5_f32::<ISA, { simd::SET }>(a5, x5, yr);
                } else {
                    group5_f32::<ISA, { simd::ADD }>(a5, x5, yr);
                }
            }
            let xr = &x[g0..g0 + len];
            xy += lanes_sum!(len, [xr, yr], [], |k| f64::from(xr[k]) * f64::from(yr[k]));
        }
        xy
    }

    /// Diagonal entry of compact row `c`.
    #[inline(always)]
    fn diag(&self, c: usize) -> f64 {
        f64::from(self.a[DIAG * self.n + c])
    }
}

/// Pairs of lower-stencil neighbours `(si, sj)`, `si < sj`, of a pivot `k`: rows `i = k − off(si)` and
/// `j = k − off(sj)` (`j` comes before `i`). Whether `j` is inside `i`'s lower stencil (band `t`) decides if
/// the pivot's update `L_ik L_jk` lands on a stored entry (`UPD`: (si, sj, t)) or is dropped fill (`DROP`).
const fn pair_split<const U: usize, const D: usize>() -> ([Upd; U], [(usize, usize); D]) {
    let mut upd = [(0, 0, 0); U];
    let mut drop = [(0, 0); D];
    let (mut nu, mut nd) = (0, 0);
    let mut si = 0;
    while si < DIAG {
        let mut sj = si + 1;
        while sj < DIAG {
            let dy = (si / 5) as isize - (sj / 5) as isize;
            let dx = (si % 5) as isize - (sj % 5) as isize;
            let t = (dy + 2) * 5 + dx + 2;
            if dy.abs() <= 2 && dx.abs() <= 2 && (t as usize) < DIAG {
                upd[nu] = (si, sj, t as usize);
                nu += 1;
            } else {
                drop[nd] = (si, sj);
                nd += 1;
            }
            sj += 1;
        }
        si += 1;
    }
    assert!(nu == U && nd == D);
    (upd, drop)
}
/// An update `(si, sj, t)`.
type Upd = (usize, usize, usize);
#[allow(clippy::type_complexity)]
const PAIRS: ([Upd; 48], [(usize, usize); 18]) = pair_split::<48, 18>();
const UPD: [Upd; 48] = PAIRS.0;
const DROP: [(usize, usize); 18] = PAIRS.1;

/// The pivot's updates of [`UPD`] in their order, `lo[up[si]][t] −= lv[si] · lv[sj]`, written out one by one
/// with constant indices (a loop over the table kept `si`, `sj` and `t` in memory and checked each index:
/// 8 % of the AVX2 solve).
#[inline(always)]
fn update_rows(lo: &mut [[f64; ROW]], up: &[usize; DIAG], lv: &[f64; ROW]) {
    macro_rules! upd {
        ($($q:literal)*) => {$({
            const U: Upd = UPD[$q];
            lo[up[U.0]][U.2] -= lv[U.0] * lv[U.1];
        })*};
    }
    upd!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23
         24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47);
}

/// The CG update fused into the forward sweep: (α, x, p on the grid, Ap).
type CgStep<'a> = (f64, &'a mut [f64], &'a [f32], &'a [f32]);

/// Row stride of the factorisation's working rows (12 lower entries padded to two 8-lane vectors).
const ROW: usize = 16;

/// The updates of [`UPD`] by first row `si`, as lane permutations for the AVX-512 path: for target entries
/// `t < 8` (`lo`) and `8 ≤ t < 12` (`hi`, lane `t − 8`), the index `sj` of the multiplier in `lv` and a lane
/// mask. Row `up[si]` then gets `row −= lv[si] · permute(lv)` in two vector operations.
pub(crate) struct UpdLanes {
    pub(crate) idx_lo: [[i64; 8]; DIAG],
    pub(crate) mask_lo: [u8; DIAG],
    pub(crate) idx_hi: [[i64; 8]; DIAG],
    pub(crate) mask_hi: [u8; DIAG],
}

const UPD_LANES: UpdLanes = {
    let mut u = UpdLanes {
        idx_lo: [[0; 8]; DIAG],
        mask_lo: [0; DIAG],
        idx_hi: [[0; 8]; DIAG],
        mask_hi: [0; DIAG],
    };
    let mut q = 0;
    while q < UPD.len() {
        let (si, sj, t) = UPD[q];
        if t < 8 {
            u.idx_lo[si][t] = sj as i64;
            u.mask_lo[si] |= 1 << t;
        } else {
            u.idx_hi[si][t - 8] = sj as i64;
            u.mask_hi[si] |= 1 << (t - 8);
        }
        q += 1;
    }
    u
};

/// Incomplete Cholesky factor `A ≈ L Lᵀ` on the 12 lower bands, arranged for the triangular solves.
///
/// The factor is computed in `f64` and stored as bf16 (8 significant bits): it only shapes the search
/// directions, and the iterations are memory-bound, so halving its bytes pays. On the benchmark photos this
/// changes the CG iterations by < 1 % (292 → 294 over the six at 1e-4, 1151 → 1166 at 1e-7). Every array
/// has [`BF_PAD`] zeros at its end, since the SIMD kernels read bf16 values in pairs.
pub(crate) struct Ic {
    /// `l[LPAD + s·n + c]`: bands 0–9 (rows above) hold `L_{c, c+off_s}`; the in-row bands 10 and 11 hold
    /// `L_{c, c−2} / L_cc` and `L_{c, c−1} / L_cc` (forward recurrence).
    l: Buf<u16>,
    /// `L_{c+1, c} / L_cc` and `L_{c+2, c} / L_cc` when those pixels are in the same run, else 0
    /// (backward recurrence).
    b1: Buf<u16>,
    b2: Buf<u16>,
    /// 1 / L_cc.
    dinv: Buf<u16>,
}

impl Ic {
    /// Right-looking zero-fill factorisation with diagonal shift `shift` (relative) and fill compensation
    /// `kappa`; `None` when a pivot is not positive.
    #[inline(always)]
    pub(crate) fn factor<const ISA: u8>(sys: &GridSystem, shift: f64, kappa: f64) -> Option<Ic> {
        let n = sys.n;
        // Working copy: lower bands and diagonal of A per row, plus a zero dummy row `n` that stands for
        // absent neighbours, so the elimination below runs without branches.
        // (Row-major `[f64; DIAG]` rows in one flat pooled vector.)
        // (Rows padded to `ROW` so that the AVX-512 path updates a row in two aligned vectors.)
        let mut lo_buf = Buf::for_overwrite((n + 1) * ROW, 0.0f64);
        let lo: &mut [[f64; ROW]] = lo_buf.as_chunks_mut::<ROW>().0;
        let mut d = Buf::for_overwrite(n + 1, 0.0f64);
        lo[n] = [0.0; ROW];
        d[n] = 0.0;
        for c in 0..n {
            for s in 0..DIAG {
                lo[c][s] = f64::from(sys.a[s * n + c]);
            }
            lo[c][DIAG..].fill(0.0);
            d[c] = sys.diag(c) * (1.0 + shift);
        }
        let mut dinv = Buf::for_overwrite(n, 0.0f64);
        let mut up = [0usize; DIAG];
        let mut lv = [0.0f64; ROW];
        for k in 0..n {
            let dk = d[k];
            if dk.is_nan() || dk <= 1e-12 * sys.diag(k).abs() {
                return None;
            }
            let inv = 1.0 / dk.sqrt();
            dinv[k] = inv;
            let gk = sys.cells[k] as isize;
            for s in 0..DIAG {
                let i = sys.cidx[(gk - sys.off[s]) as usize];
                let i = if i == NONE { n } else { i as usize };
                up[s] = i;
                let v = lo[i][s] * inv;
                lo[i][s] = v;
                lv[s] = v;
                d[i] -= v * v;
            }
            #[cfg(target_arch = "x86_64")]
            if ISA == ISA_AVX512 {
                // SAFETY: AVX-512 was detected (`matting::solve_dispatch`); every `up[s]` indexes `lo` (a compact
                // row < n or the dummy row n), whose rows are `ROW` = 16 values.
                unsafe {
                    simd::ic_update_rows_512(lo.as_mut_ptr().cast::<f64>(), &up, &lv, &UPD_LANES)
                };
            } else {
                update_rows(lo, &up, &lv);
            }
            #[cfg(not(target_arch = "x86_64"))]
            update_rows(lo, &up, &lv);
            if kappa > 0.0 {
                for &(si, sj) in DROP.iter() {
                    let (i, j) = (up[si], up[sj]);
                    let fa = kappa * (lv[si] * lv[sj]).abs();
                    d[i] += fa;
                    d[j] += fa;
                }
            }
        }
        let mut l = Buf::for_overwrite(LPAD + DIAG * n + BF_PAD, 0u16);
        l[..LPAD].fill(0);
        l[LPAD + DIAG * n..].fill(0);
        let (mut b1, mut b2) = (Buf::filled(n + BF_PAD, 0u16), Buf::filled(n + BF_PAD, 0u16));
        for (c, row) in lo[..n].iter().enumerate() {
            for s in 0..DIAG - 2 {
                l[LPAD + s * n + c] = to_bf16(row[s]);
            }
            l[LPAD + (DIAG - 2) * n + c] = to_bf16(row[DIAG - 2] * dinv[c]);
            l[LPAD + (DIAG - 1) * n + c] = to_bf16(row[DIAG - 1] * dinv[c]);
            let g = sys.cells[c] as usize;
            if c + 1 < n && sys.cells[c + 1] as usize == g + 1 {
                b1[c] = to_bf16(lo[c + 1][DIAG - 1] * dinv[c]);
            }
            if c + 2 < n && sys.cells[c + 2] as usize == g + 2 {
                b2[c] = to_bf16(lo[c + 2][DIAG - 2] * dinv[c]);
            }
        }
        let dinv = Buf::collect(
            n + BF_PAD,
            dinv.iter().map(|&v| to_bf16(v)).chain([0; BF_PAD]),
        );
        Some(Ic { l, b1, b2, dinv })
    }

    /// `z = (L Lᵀ)⁻¹ r` with `r` compact and `z` on the grid (known cells stay zero); returns `rᵀ z`. `ISA`
    /// above generic selects the SIMD kernels and fused multiply-adds for the in-row recurrences.
    #[inline(always)]
    fn apply<const ISA: u8>(
        &self,
        sys: &GridSystem,
        r: &mut [f64],
        z: &mut [f32],
        tmp: &mut [f32],
        tpad: &mut [f32],
    ) -> f64 {
        self.forward::<ISA>(sys, r, z, tmp, None);
        self.backward::<ISA>(sys, r, z, tpad)
    }

    /// Forward sweep `L y = r` into `z`. With `step = (α, x, p, Ap)` it first applies the CG update
    /// `x += α p`, `r −= α Ap` run by run (the data is then in cache for the sweep) and returns `‖r‖²` of the
    /// updated residual (else 0).
    #[inline(always)]
    fn forward<const ISA: u8>(
        &self,
        sys: &GridSystem,
        r: &mut [f64],
        z: &mut [f32],
        tmp: &mut [f32],
        mut step: Option<CgStep<'_>>,
    ) -> f64 {
        let n = sys.n;
        let l_all = &self.l[..];
        // In-row bands are kept pre-divided by the row's pivot (see `factor`).
        let mut rr = 0.0;
        for run in &sys.runs {
            let (g0, c0, len) = (run.g0, run.c0, run.len);
            let t = &mut tmp[..len];
            if let Some((alpha, x, p, ap)) = step.as_mut() {
                let alpha = *alpha;
                let (xr, pr, apr) = (&mut x[c0..c0 + len], &p[g0..g0 + len], &ap[c0..c0 + len]);
                let rr_ = &mut r[c0..c0 + len];
                rr += lanes_sum!(len, [pr, apr], [xr, rr_, t], |k| {
                    xr[k] += alpha * f64::from(pr[k]);
                    rr_[k] -= alpha * f64::from(apr[k]);
                    t[k] = rr_[k] as f32;
                    rr_[k] * rr_[k]
                });
            } else {
                let rr_ = &r[c0..c0 + len];
                for k in 0..len {
                    t[k] = rr_[k] as f32;
                }
            }
            let dv = &self.dinv[c0..c0 + len + 1];
            for half in 0..2 {
                let s0 = half * 5;
                // bf16 slices reach one past the run (see `group5_bf16`); the arrays are padded for it.
                let a5 = five_bands(l_all, LPAD + c0, n, s0, len + 1);
                let z5 = stencil_row(z, &sys.off, s0, g0, len);
                if half == 0 {
                    group5_bf16::<ISA, { simd::SUB }>(a5, z5, t, &[]);
                } else {
                    group5_bf16::<ISA, { simd::SUB_SCALE }>(a5, z5, t, dv);
                }
            }
            let l2 = &l_all[LPAD + (DIAG - 2) * n + c0..][..len];
            let l1 = &l_all[LPAD + (DIAG - 1) * n + c0..][..len];
            // z[g0-1], z[g0-2]: known cells (zero) or the end of an earlier run in this row (final).
            let (mut zm2, mut zm1) = (z[g0 - 2], z[g0 - 1]);
            let zr = &mut z[g0..g0 + len];
            for k in 0..len {
                let u = fnma::<ISA>(bf(l2[k]), zm2, t[k]);
                let zk = fnma::<ISA>(bf(l1[k]), zm1, u);
                zr[k] = zk;
                zm2 = zm1;
                zm1 = zk;
            }
        }
        rr
    }

    /// Backward sweep `Lᵀ z = y` in place on `z` (runs in reverse, scatter form); returns `rᵀ z`.
    #[inline(always)]
    fn backward<const ISA: u8>(
        &self,
        sys: &GridSystem,
        r: &[f64],
        z: &mut [f32],
        tpad: &mut [f32],
    ) -> f64 {
        let n = sys.n;
        let l_all = &self.l[..];
        let mut rz = 0.0;
        // `tpad` (at least the longest run + 9, its first four values zero): the run's solution `t` at 4..,
        // four zeros before it and five after it for the shifted row scatter below.
        for run in sys.runs.iter().rev() {
            let (g0, c0, len) = (run.g0, run.c0, run.len);
            let dv = &self.dinv[c0..c0 + len + 1];
            let (b1, b2) = (&self.b1[c0..c0 + len], &self.b2[c0..c0 + len]);
            let tp = &mut tpad[..len + 9];
            // Zeros after the run (an earlier, longer run left values there); the four before stay zero.
            tp[4 + len] = 0.0;
            tp[5 + len] = 0.0;
            tp[6 + len] = 0.0;
            tp[7 + len] = 0.0;
            tp[8 + len] = 0.0;
            let t = &mut tp[4..4 + len];
            {
                let zr = &z[g0..g0 + len];
                let (mut zp1, mut zp2) = (0.0f32, 0.0f32);
                for k in (0..len).rev() {
                    let u = fnma::<ISA>(bf(b2[k]), zp2, zr[k] * bf(dv[k]));
                    let zk = fnma::<ISA>(bf(b1[k]), zp1, u);
                    t[k] = zk;
                    zp2 = zp1;
                    zp1 = zk;
                }
            }
            let (rr_, zr) = (&r[c0..c0 + len], &mut z[g0..g0 + len]);
            rz += lanes_sum!(len, [rr_, t], [zr], |k| {
                zr[k] = t[k];
                rr_[k] * f64::from(t[k])
            });
            // In-row lower neighbours left of the run (zero coefficients where they are known cells); bands
            // 10 and 11 hold L/L_kk, so multiply the pivot back.
            let (f2, f1) = (LPAD + (DIAG - 2) * n + c0, LPAD + (DIAG - 1) * n + c0);
            let piv0 = 1.0 / bf(dv[0]);
            z[g0 - 1] -= bf(l_all[f1]) * piv0 * t[0];
            z[g0 - 2] -= bf(l_all[f2]) * piv0 * t[0];
            if len > 1 {
                z[g0 - 1] -= bf(l_all[f2 + 1]) * (1.0 / bf(dv[1])) * t[1];
            }
            // Rows above: cell k of the run sends −L_{k, k+off_s}·t[k] to z[k + off_s], five bands (dx = −2..=2)
            // per row above; per row this is one pass over the run widened by two on each side, reading the
            // bands and t shifted (t zero-padded by four, so terms from outside the run vanish).
            for row in 0..2 {
                let s0 = row * 5;
                let lb = five_bands(l_all, LPAD + c0 - 4, n, s0, len + 9);
                let st = (g0 as isize + sys.off[s0]) as usize;
                scatter_row5::<ISA>(lb, tp, &mut z[st..st + len + 4]);
            }
        }
        rz
    }
}

/// `c − a·b` (a fused multiply-add above the generic ISA level).
#[inline(always)]
fn fnma<const ISA: u8>(a: f32, b: f32, c: f32) -> f32 {
    if ISA != ISA_GENERIC {
        (-a).mul_add(b, c)
    } else {
        c - a * b
    }
}

/// Zeros after each bf16 array of the factor (the SIMD kernels read up to five values past a run).
const BF_PAD: usize = 16;
/// Zeros before the factor's bands (the backward sweep reads a band from four places before a run).
const LPAD: usize = 4;

/// Diagonal shifts tried in turn when a factorisation fails, as pymatting's `ichol` does.
const SHIFTS: [f64; 12] = [
    0.0, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5,
];

/// Factorises with fill compensation `kappa`, then the shift ladder from `start`; returns the factor and
/// the shift used.
#[inline(always)]
pub(crate) fn factor_robust<const ISA: u8>(
    sys: &GridSystem,
    kappa: f64,
    start: f64,
) -> Result<(Ic, f64)> {
    for &shift in SHIFTS.iter().filter(|&&s| s >= start) {
        if let Some(f) = Ic::factor::<ISA>(sys, shift, kappa) {
            return Ok((f, shift));
        }
        if let Some(f) = Ic::factor::<ISA>(sys, shift, 1.0) {
            return Ok((f, shift));
        }
    }
    Err(DataError::Solver(format!(
        "incomplete Cholesky failed for all shifts up to {} ({} unknowns)",
        SHIFTS[SHIFTS.len() - 1],
        sys.n
    )))
}

/// Restarts from the `f64` residual allowed when the recursively updated residual has converged but the
/// residual of the `f64` system has not (see [`pcg`]).
const MAX_RESTARTS: usize = 8;

/// PCG from `x` (compact); returns (iterations, relative residual ‖b − A x‖₂/‖b‖₂ of the `f64` system,
/// restarts after the first start).
///
/// The iterations use the `f32` bands; the stopping test is pymatting's (‖r‖₂ ≤ tol·‖b‖₂, x₀ = our initial
/// guess instead of 0, same norm). It is first applied to the recursively updated residual, then confirmed on
/// the residual of the `f64` matrix as assembled; where that one is still above the tolerance (the `f32`
/// rounding of the matrix matters below ~1e-6), CG restarts from it, so the result always meets the
/// criterion on the `f64` system, as pymatting's does.
#[inline(always)]
pub(crate) fn pcg<const ISA: u8>(
    sys: &GridSystem,
    pre: &Ic,
    x: &mut [f64],
    tol: f64,
    max_it: usize,
) -> Result<(usize, f64, usize)> {
    let n = sys.n;
    let nb = sys.rhs.iter().map(|v| v * v).sum::<f64>().sqrt();
    if nb == 0.0 {
        x.iter_mut().for_each(|v| *v = 0.0);
        return Ok((0, 0.0, 0));
    }
    // The search direction and its product are `f32` (the residual and the iterate stay `f64`, and the stop is
    // confirmed on the `f64` residual, restarting from it where the `f32` product drifted).
    let mut p = Buf::filled(sys.gsize, 0.0f32);
    let mut xg = Buf::filled(sys.gsize, 0.0f64);
    let mut z = Buf::filled(sys.gsize, 0.0f32);
    // `r` is set by `residual64`, `ap` by every product before it is read.
    let mut r = Buf::for_overwrite(n, 0.0f64);
    let mut ap = Buf::for_overwrite(n, 0.0f32);
    // Per-run scratch of the triangular sweeps (the longest run plus padding; `tpad` starts with zeros).
    let longest = sys.runs.iter().map(|r| r.len).max().unwrap_or(0);
    let mut tmp = vec![0.0f32; longest + 16];
    let mut tpad = vec![0.0f32; longest + 16];
    let mut mirror = Buf::filled(0, 0.0f64);
    let mut it = 0;
    let mut rn;
    let mut restart = 0usize;
    loop {
        for (c, &g) in sys.cells.iter().enumerate() {
            xg[g as usize] = x[c];
        }
        rn = sys.residual64(&xg, &mut r, &mut mirror);
        if rn <= tol * nb {
            return Ok((it, rn / nb, restart.saturating_sub(1)));
        }
        if restart == MAX_RESTARTS || it >= max_it || !rn.is_finite() {
            break;
        }
        if restart > 0 {
            tracing::trace!(
                it,
                rel = rn / nb,
                "closed-form CG restarted from the f64 residual"
            );
        }
        restart += 1;
        let mut rz = pre.apply::<ISA>(sys, &mut r, &mut z, &mut tmp, &mut tpad);
        for run in &sys.runs {
            let (g0, len) = (run.g0, run.len);
            let (pr, zr) = (&mut p[g0..g0 + len], &z[g0..g0 + len]);
            pr.copy_from_slice(zr);
        }
        while it < max_it {
            it += 1;
            let pap = sys.matvec::<ISA>(&p, &mut ap);
            let alpha = rz / pap;
            // x += α p, r −= α Ap inside the forward sweep; the backward sweep only runs if not converged.
            let rr = pre.forward::<ISA>(
                sys,
                &mut r,
                &mut z,
                &mut tmp,
                Some((alpha, &mut x[..], &p[..], &ap[..])),
            );
            rn = rr.sqrt();
            if !rn.is_finite() || rn <= tol * nb {
                break;
            }
            let rz_new = pre.backward::<ISA>(sys, &r, &mut z, &mut tpad);
            let beta = rz_new / rz;
            rz = rz_new;
            for run in &sys.runs {
                let (g0, len) = (run.g0, run.len);
                let (pr, zr) = (&mut p[g0..g0 + len], &z[g0..g0 + len]);
                let beta = beta as f32;
                for k in 0..len {
                    pr[k] = zr[k] + beta * pr[k];
                }
            }
        }
    }
    Err(DataError::Solver(format!(
        "conjugate gradients did not reach relative residual {tol:e} in {it} iterations and {} \
         restarts ({n} unknowns, residual {:.3e})",
        restart.saturating_sub(1),
        rn / nb
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised assembly gives the matrix of the one-window-at-a-time assembly (same per-window values
    /// and summation order, so the `f32` bands are equal bit for bit) and the same right-hand side up to
    /// summation order, on random images whose unknown pixels touch the image border and form runs of every
    /// length (including blocks with masked lanes).
    #[test]
    fn vectorised_build_matches_scalar_build() {
        let mut seed = 99u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        for (w, h, p_unknown) in [
            (23, 17, 0.5),
            (40, 9, 0.9),
            (3, 3, 0.5),
            (31, 12, 0.1),
            (9, 30, 1.0),
            (37, 29, -1.0),
            (64, 40, -1.0),
        ] {
            let rgb: Vec<f64> = (0..w * h * 3)
                .map(|_| (rnd() * 255.0).round() / 255.0)
                .collect();
            // p_unknown < 0: an annulus of unknown pixels (row spans that move and split), else random.
            let unknown: Vec<bool> = (0..w * h)
                .map(|q| {
                    let (x, y) = (
                        (q % w) as f64 - w as f64 / 2.0,
                        (q / w) as f64 - h as f64 / 2.0,
                    );
                    let d = (x * x + y * y).sqrt();
                    let r = rnd();
                    if p_unknown < 0.0 {
                        (6.0..9.0).contains(&d) || (r < 0.02)
                    } else {
                        r < p_unknown
                    }
                })
                .collect();
            let fg: Vec<bool> = (0..w * h).map(|q| !unknown[q] && rnd() < 0.5).collect();
            let v = GridSystem::build(w, h, &rgb, &unknown, &fg, 1e-7);
            let s = GridSystem::build_scalar(w, h, &rgb, &unknown, &fg, 1e-7);
            assert_eq!((v.n, &v.cells, &v.cidx), (s.n, &s.cells, &s.cidx));
            assert_eq!(v.runs.len(), s.runs.len());
            assert!(v.a == s.a, "{w}×{h}: f32 bands differ");
            if let Some(i) = (0..v.lo64.len()).find(|&i| v.lo64[i] != s.lo64[i]) {
                panic!(
                    "{w}×{h}: f64 band {} row {}: {} vs {}",
                    i / v.n,
                    i % v.n,
                    v.lo64[i],
                    s.lo64[i]
                );
            }
            let scale = s.a.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
            for (c, (x, y)) in v.rhs.iter().zip(&s.rhs).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-12 * scale,
                    "{w}×{h}: rhs[{c}] {x} vs {y}"
                );
            }
        }
    }
}
