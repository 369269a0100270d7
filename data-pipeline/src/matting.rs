//! Closed-form matting (Levin, Lischinski & Weiss 2008) with pymatting's `estimate_alpha_cf` semantics.
//!
//! * Matting Laplacian with 3×3 windows (radius 1) fully inside the image, regularisation ε (1e-7);
//!   windows whose nine pixels are all known are skipped, as in pymatting's `cf_laplacian`.
//! * Trimap split: `t ≥ 0.9` foreground, `t ≤ 0.1` background, anything else unknown. Known pixels are hard
//!   constraints (value 1 for foreground, 0 for background) and keep their trimap value in the output;
//!   only the unknown block `L_UU x = −L_UK α_K` is assembled and solved, and `α = clip(x, 0, 1)`.
//!
//! Solver (ours, not pymatting's; details in `matting_solver.rs`): preconditioned conjugate gradients on the
//! unknown-only system, stored as 25 `f32` bands of the 5×5 stencil over horizontal runs of unknown pixels on a
//! padded grid (contiguous, vectorisable loops; AVX2+FMA code is selected at run time where available). The
//! preconditioner is a zero-fill incomplete Cholesky factorisation on that stencil with diagonal compensation
//! of the dropped fill, retried with a growing diagonal shift when a pivot is not positive. The initial guess
//! comes from the same problem solved on a 2×2-box-downsampled image and trimap (recursively), bilinearly
//! upsampled: this removes most of the smooth error that IC(0) is slow to remove. pymatting instead uses a
//! thresholded incomplete Cholesky with fill-in, which converges in fewer iterations but costs far more to
//! build.

// Fixed-size stencil/window loops read best with explicit indices.
#![allow(clippy::needless_range_loop)]

use crate::buffer::{Gray, Rgb};
use crate::error::{DataError, Result};

#[path = "matting_pool.rs"]
pub(crate) mod pool;
#[path = "matting_simd.rs"]
mod simd;
#[path = "matting_solver.rs"]
mod solver;
use pool::Buf;
use solver::GridSystem;

/// Options of [`estimate_alpha_cf`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CfOptions {
    /// Regularisation ε of the matting Laplacian (pymatting: 1e-7).
    pub epsilon: f64,
    /// Trimap values ≥ this are known foreground (pymatting: 0.9).
    pub fg_threshold: f64,
    /// Trimap values ≤ this are known background (pymatting: 0.1).
    pub bg_threshold: f64,
    /// Stop when ‖r‖ ≤ tolerance·‖b‖ on the full-resolution system (pymatting: 1e-7). Our default 1e-4
    /// keeps mean |Δα| to pymatting below 1e-3 over the image (below 5e-3 over the unknown region) on the
    /// DreamBench benchmark (`scripts/bench/matting.sh`); 1e-5 gives ~5e-5, 1e-7 reproduces it to solver
    /// precision.
    pub tolerance: f64,
    /// Relative tolerance of the coarse solves that only provide an initial guess.
    pub coarse_tolerance: f64,
    /// Iteration limit per level; exceeding it is an error, as in pymatting (10000).
    pub max_iterations: usize,
    /// Initialise from a recursively solved half-resolution problem.
    pub coarse_to_fine: bool,
    /// No coarser level is built once a level has fewer unknown pixels than this. A coarse level costs about
    /// as much as the fine iterations it saves until the fine level has several tens of thousands of unknowns:
    /// at 15000, a 512² benchmark photo (~48k unknowns) gets one coarse level and a 256² one none, the fastest
    /// choice at both sizes (`scripts/bench/matting.sh`; 2000, which gave 4 and 3 levels, was 2–15 % slower).
    pub min_coarse_unknowns: usize,
}

impl Default for CfOptions {
    fn default() -> Self {
        CfOptions {
            epsilon: 1e-7,
            fg_threshold: 0.9,
            bg_threshold: 0.1,
            tolerance: 1e-4,
            coarse_tolerance: 1e-3,
            max_iterations: 10_000,
            coarse_to_fine: true,
            min_coarse_unknowns: 15_000,
        }
    }
}

/// Statistics of one solve, for logs and benchmarks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CfStats {
    /// Unknown pixels at full resolution.
    pub unknown: usize,
    /// PCG iterations at full resolution.
    pub iterations: usize,
    /// PCG iterations summed over the coarse levels.
    pub coarse_iterations: usize,
    /// Levels solved (1 = full resolution only).
    pub levels: usize,
    /// Diagonal shift the full-resolution IC(0) factorisation needed.
    pub shift: f64,
    /// Final relative residual ‖b − A x‖₂/‖b‖₂ at full resolution, computed with the `f64` matrix (the
    /// quantity pymatting's `rtol` bounds).
    pub relative_residual: f64,
    /// CG restarts at full resolution because the `f64` residual had not yet met the tolerance when the
    /// recursively updated one had (see `matting_solver::pcg`).
    pub restarts: usize,
}

/// Pixel class from the trimap.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Bg,
    Fg,
    Unknown,
}

fn classify(trimap: &Gray, opts: &CfOptions) -> Vec<Class> {
    trimap
        .data
        .iter()
        .map(|&t| {
            if t >= opts.fg_threshold {
                Class::Fg
            } else if t <= opts.bg_threshold {
                Class::Bg
            } else {
                Class::Unknown
            }
        })
        .collect()
}

/// 2×2 box downsample of the image (edge pixels replicated for odd sizes) and of the classes
/// (a coarse pixel is known only when all its fine pixels are known with the same label).
fn downsample(img: &Rgb, class: &[Class]) -> (Rgb, Vec<Class>) {
    let (w, h) = (img.width, img.height);
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let mut data = vec![0.0; cw * ch * 3];
    let mut cc = vec![Class::Unknown; cw * ch];
    for y in 0..ch {
        let (ya, yb) = (2 * y, (2 * y + 1).min(h - 1));
        let (ia, ib) = (
            &img.data[ya * w * 3..(ya + 1) * w * 3],
            &img.data[yb * w * 3..(yb + 1) * w * 3],
        );
        let (ka, kb) = (&class[ya * w..(ya + 1) * w], &class[yb * w..(yb + 1) * w]);
        let (drow, crow) = (
            &mut data[y * cw * 3..(y + 1) * cw * 3],
            &mut cc[y * cw..(y + 1) * cw],
        );
        for x in 0..cw {
            let (xa, xb) = (2 * x, (2 * x + 1).min(w - 1));
            for c in 0..3 {
                drow[x * 3 + c] =
                    (ia[xa * 3 + c] + ia[xb * 3 + c] + ib[xa * 3 + c] + ib[xb * 3 + c]) / 4.0;
            }
            let k = ka[xa];
            crow[x] = if k != Class::Unknown && ka[xb] == k && kb[xa] == k && kb[xb] == k {
                k
            } else {
                Class::Unknown
            };
        }
    }
    (
        Rgb {
            width: cw,
            height: ch,
            data,
        },
        cc,
    )
}

/// Bilinear samples (pixel centres aligned) of a coarse grid of size `cw`×`chh` at the fine pixels
/// `x0 .. x0 + out.len()` of fine row `y` (the fine grid is twice the coarse one, edges clamped).
fn upsample_row(coarse: &[f64], cw: usize, chh: usize, x0: usize, y: usize, out: &mut [f64]) {
    let v = ((y as f64 + 0.5) / 2.0 - 0.5).clamp(0.0, (chh - 1) as f64);
    let ya = v.floor() as usize;
    let yb = (ya + 1).min(chh - 1);
    let fy = v - ya as f64;
    let (ra, rb) = (
        &coarse[ya * cw..(ya + 1) * cw],
        &coarse[yb * cw..(yb + 1) * cw],
    );
    for (k, o) in out.iter_mut().enumerate() {
        let u = ((x0 + k) as f64 * 0.5 - 0.25).clamp(0.0, (cw - 1) as f64);
        let xa = u as usize;
        let xb = (xa + 1).min(cw - 1);
        let fx = u - xa as f64;
        let a = ra[xa] + (ra[xb] - ra[xa]) * fx;
        let b = rb[xa] + (rb[xb] - rb[xa]) * fx;
        *o = a + (b - a) * fy;
    }
}

/// Fill-compensation factor κ of the incomplete Cholesky factorisation (see `matting_solver.rs`).
const KAPPA: f64 = 0.3;

/// Solves one level from an optional coarse solution (full coarse grid, its width and height); returns the
/// full-grid solution (constraint values at known pixels), the PCG iterations, the IC shift, the final
/// relative residual and the CG restarts.
#[inline(always)]
fn solve_level<const ISA: u8>(
    img: &Rgb,
    class: &[Class],
    coarse: Option<(&[f64], usize, usize)>,
    opts: &CfOptions,
    tol: f64,
    start_shift: f64,
) -> Result<(Buf<f64>, usize, f64, f64, usize)> {
    let (w, h) = (img.width, img.height);
    let unknown = Buf::collect(class.len(), class.iter().map(|&c| c == Class::Unknown));
    let fg = Buf::collect(class.len(), class.iter().map(|&c| c == Class::Fg));
    let mut full = Buf::collect(class.len(), fg.iter().map(|&f| if f { 1.0 } else { 0.0 }));
    if !unknown.iter().any(|&u| u) {
        return Ok((full, 0, 0.0, 0.0, 0));
    }
    let t0 = std::time::Instant::now();
    let sys = GridSystem::build(w, h, &img.data, &unknown, &fg, opts.epsilon);
    let t1 = std::time::Instant::now();
    let mut x = if coarse.is_some() {
        Buf::for_overwrite(sys.n, 0.0)
    } else {
        Buf::filled(sys.n, 0.0)
    };
    if let Some((calpha, cw, chh)) = coarse {
        for (px, py, c0, len) in sys.pixel_runs() {
            upsample_row(calpha, cw, chh, px, py, &mut x[c0..c0 + len]);
        }
    }
    let t2 = std::time::Instant::now();
    let (pre, shift) = solver::factor_robust::<ISA>(&sys, KAPPA, start_shift)?;
    let t3 = std::time::Instant::now();
    let (it, rel, restarts) = solver::pcg::<ISA>(&sys, &pre, &mut x, tol, opts.max_iterations)?;
    let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
    tracing::trace!(
        unknown = sys.n,
        it,
        rel,
        restarts,
        shift,
        build_ms = ms(t0, t1),
        factor_ms = ms(t2, t3),
        pcg_ms = ms(t3, std::time::Instant::now()),
        "closed-form level solved"
    );
    for (px, py, c0, len) in sys.pixel_runs() {
        full[py * w + px..py * w + px + len].copy_from_slice(&x[c0..c0 + len]);
    }
    Ok((full, it, shift, rel, restarts))
}

/// Builds the coarse-to-fine pyramid and solves it from the coarsest level up.
#[inline(always)]
fn solve_pyramid<const ISA: u8>(
    image: &Rgb,
    class: &[Class],
    opts: &CfOptions,
) -> Result<(Buf<f64>, CfStats)> {
    let fine_unknown = class.iter().filter(|&&c| c == Class::Unknown).count();
    // levels[0] is the finest; each next one is its 2×2 downsample.
    let mut coarse: Vec<(Rgb, Vec<Class>)> = Vec::new();
    if opts.coarse_to_fine {
        let (mut cur_img, mut cur_class, mut cur_unknown) = (image, class, fine_unknown);
        while cur_unknown >= opts.min_coarse_unknowns
            && cur_unknown > 0
            && cur_img.width >= 16
            && cur_img.height >= 16
        {
            let next = downsample(cur_img, cur_class);
            coarse.push(next);
            let last = &coarse[coarse.len() - 1];
            (cur_img, cur_class) = (&last.0, &last.1);
            cur_unknown = cur_class.iter().filter(|&&c| c == Class::Unknown).count();
        }
    }
    let mut stats = CfStats {
        unknown: fine_unknown,
        levels: coarse.len() + 1,
        ..CfStats::default()
    };
    let mut prev: Option<(Buf<f64>, usize, usize)> = None;
    let mut start_shift = 0.0;
    for (cimg, cclass) in coarse.iter().rev() {
        let init = prev.as_ref().map(|(a, w, h)| (a.as_slice(), *w, *h));
        let (a, it, shift, _, _) =
            solve_level::<ISA>(cimg, cclass, init, opts, opts.coarse_tolerance, start_shift)?;
        stats.coarse_iterations += it;
        start_shift = shift;
        prev = Some((a, cimg.width, cimg.height));
    }
    let init = prev.as_ref().map(|(a, w, h)| (a.as_slice(), *w, *h));
    let (x, it, shift, rel, restarts) =
        solve_level::<ISA>(image, class, init, opts, opts.tolerance, start_shift)?;
    stats.iterations = it;
    stats.shift = shift;
    stats.relative_residual = rel;
    stats.restarts = restarts;
    Ok((x, stats))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn solve_pyramid_avx512(
    image: &Rgb,
    class: &[Class],
    opts: &CfOptions,
) -> Result<(Buf<f64>, CfStats)> {
    solve_pyramid::<{ solver::ISA_AVX512 }>(image, class, opts)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn solve_pyramid_avx2(
    image: &Rgb,
    class: &[Class],
    opts: &CfOptions,
) -> Result<(Buf<f64>, CfStats)> {
    solve_pyramid::<{ solver::ISA_AVX2 }>(image, class, opts)
}

fn solve_pyramid_generic(
    image: &Rgb,
    class: &[Class],
    opts: &CfOptions,
) -> Result<(Buf<f64>, CfStats)> {
    solve_pyramid::<{ solver::ISA_GENERIC }>(image, class, opts)
}

/// Runs the solver with AVX-512 or AVX2+FMA code generation where the CPU has it
/// ([`crate::cpu::short_run_level`]).
fn solve_dispatch(image: &Rgb, class: &[Class], opts: &CfOptions) -> Result<(Buf<f64>, CfStats)> {
    #[cfg(target_arch = "x86_64")]
    match crate::cpu::short_run_level() {
        // SAFETY: the CPU supports the features `solve_pyramid_avx512` is compiled for (`short_run_level` is
        // at most the detected level).
        crate::cpu::SimdLevel::Avx512 => {
            return unsafe { solve_pyramid_avx512(image, class, opts) }
        }
        // SAFETY: as above, for `solve_pyramid_avx2`.
        crate::cpu::SimdLevel::Avx2 => return unsafe { solve_pyramid_avx2(image, class, opts) },
        crate::cpu::SimdLevel::Generic => {}
    }
    solve_pyramid_generic(image, class, opts)
}

/// Estimates α from an image and a trimap (pymatting `estimate_alpha_cf` semantics; see the module docs).
pub fn estimate_alpha_cf(image: &Rgb, trimap: &Gray, opts: &CfOptions) -> Result<(Gray, CfStats)> {
    trimap.check_size("trimap", image.width, image.height)?;
    if opts.bg_threshold.partial_cmp(&opts.fg_threshold) != Some(std::cmp::Ordering::Less) {
        return Err(DataError::Config(format!(
            "bg_threshold {} must be below fg_threshold {}",
            opts.bg_threshold, opts.fg_threshold
        )));
    }
    let class = classify(trimap, opts);
    if class.iter().all(|&c| c == Class::Unknown) {
        let (lo, hi) = trimap
            .data
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &t| {
                (lo.min(t), hi.max(t))
            });
        return Err(DataError::Trimap {
            id: format!("{}×{}", trimap.width, trimap.height),
            reason: format!(
                "no known pixel: every value is in ({}, {}) (values span [{lo:.3}, {hi:.3}]); \
                 closed-form matting needs some pixels marked foreground (≥ {}) or background \
                 (≤ {}) to propagate from",
                opts.bg_threshold, opts.fg_threshold, opts.fg_threshold, opts.bg_threshold
            ),
        });
    }
    let (x, stats) = solve_dispatch(image, &class, opts)?;
    let data = x
        .iter()
        .zip(&class)
        .zip(&trimap.data)
        .map(|((&xi, &c), &t)| {
            if c == Class::Unknown {
                xi.clamp(0.0, 1.0)
            } else {
                t.clamp(0.0, 1.0)
            }
        })
        .collect();
    Ok((
        Gray {
            width: image.width,
            height: image.height,
            data,
        },
        stats,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense matting Laplacian of a small image written straight from the definition (pymatting's
    /// `cf_laplacian`: 3×3 windows inside the image, all-known windows skipped).
    fn dense_laplacian(w: usize, h: usize, rgb: &[f64], known: &[bool], eps: f64) -> Vec<Vec<f64>> {
        let n = w * h;
        let mut l = vec![vec![0.0; n]; n];
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                let px: Vec<usize> = (0..9)
                    .map(|k| (y + k / 3 - 1) * w + x + k % 3 - 1)
                    .collect();
                if px.iter().all(|&q| known[q]) {
                    continue;
                }
                let mut mu = [0.0; 3];
                for &q in &px {
                    for c in 0..3 {
                        mu[c] += rgb[q * 3 + c] / 9.0;
                    }
                }
                let mut s = [[0.0; 3]; 3];
                for &q in &px {
                    for a in 0..3 {
                        for b in 0..3 {
                            s[a][b] += (rgb[q * 3 + a] - mu[a]) * (rgb[q * 3 + b] - mu[b]);
                        }
                    }
                }
                for a in 0..3 {
                    s[a][a] += eps;
                    for b in 0..3 {
                        s[a][b] /= 9.0;
                    }
                }
                // Inverse by cofactors.
                let det = s[0][0] * (s[1][1] * s[2][2] - s[1][2] * s[2][1])
                    - s[0][1] * (s[1][0] * s[2][2] - s[1][2] * s[2][0])
                    + s[0][2] * (s[1][0] * s[2][1] - s[1][1] * s[2][0]);
                let mut inv = [[0.0; 3]; 3];
                for a in 0..3 {
                    for b in 0..3 {
                        let (r0, r1) = ((b + 1) % 3, (b + 2) % 3);
                        let (c0, c1) = ((a + 1) % 3, (a + 2) % 3);
                        inv[a][b] = (s[r0][c0] * s[r1][c1] - s[r0][c1] * s[r1][c0]) / det;
                    }
                }
                for &i in &px {
                    for &j in &px {
                        let mut q = 0.0;
                        for a in 0..3 {
                            for b in 0..3 {
                                q +=
                                    (rgb[i * 3 + a] - mu[a]) * inv[a][b] * (rgb[j * 3 + b] - mu[b]);
                            }
                        }
                        l[i][j] += f64::from(u8::from(i == j)) - (1.0 + q) / 9.0;
                    }
                }
            }
        }
        l
    }

    /// Deterministic uniform numbers in [0, 1) (a 64-bit LCG).
    fn uniform(mut seed: u64) -> impl FnMut() -> f64 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// At pymatting's tolerance the solution meets ‖b − A x‖₂ ≤ 1e-7‖b‖₂ for the `f64` Laplacian built from
    /// the definition, and the reported residual is that residual.
    #[test]
    fn tight_tolerance_meets_pymatting_criterion_on_f64_laplacian() {
        let (w, h) = (14, 11);
        let mut rnd = uniform(12345);
        let rgb: Vec<f64> = (0..w * h * 3).map(|_| rnd()).collect();
        let class: Vec<Class> = (0..w * h)
            .map(|q| match q % w {
                0..=3 => Class::Bg,
                10.. => Class::Fg,
                _ => Class::Unknown,
            })
            .collect();
        let img = Rgb {
            width: w,
            height: h,
            data: rgb.clone(),
        };
        let opts = CfOptions {
            tolerance: 1e-7,
            coarse_to_fine: false,
            ..CfOptions::default()
        };
        let (x, _, _, rel, _) =
            solve_level::<{ solver::ISA_GENERIC }>(&img, &class, None, &opts, 1e-7, 0.0).unwrap();
        let known: Vec<bool> = class.iter().map(|&c| c != Class::Unknown).collect();
        let l = dense_laplacian(w, h, &rgb, &known, opts.epsilon);
        let unk: Vec<usize> = (0..w * h).filter(|&q| !known[q]).collect();
        let (mut nr, mut nb) = (0.0, 0.0);
        for &i in &unk {
            // b = −L_UK α_K; r = b − L_UU x_U.
            let b: f64 = -(0..w * h)
                .filter(|&j| known[j])
                .map(|j| l[i][j] * x[j])
                .sum::<f64>();
            let ax: f64 = unk.iter().map(|&j| l[i][j] * x[j]).sum();
            nr += (b - ax) * (b - ax);
            nb += b * b;
        }
        let rel_dense = (nr / nb).sqrt();
        assert!(rel_dense <= 1e-7, "dense f64 residual {rel_dense:e}");
        assert!(
            (rel_dense - rel).abs() <= 1e-9,
            "reported {rel:e} vs dense {rel_dense:e}"
        );
    }

    /// The generic, AVX2 and AVX-512 code paths (whichever this CPU has) give the same solution on an image
    /// whose unknown pixels form runs of every length, odd and even (masked tails, bf16 pair reads) and touch
    /// each other across rows (the backward sweep's shifted row scatter).
    #[test]
    fn instruction_set_paths_agree() {
        let (w, h) = (61, 47);
        let mut rnd = uniform(777);
        let rgb: Vec<f64> = (0..w * h * 3).map(|_| rnd()).collect();
        let class: Vec<Class> = (0..w * h)
            .map(|q| {
                let (x, y) = ((q % w) as f64 - 30.0, (q / w) as f64 - 23.0);
                let d = (x * x + y * y).sqrt() + 3.0 * rnd();
                if d < 8.0 {
                    Class::Fg
                } else if d < 19.0 {
                    Class::Unknown
                } else {
                    Class::Bg
                }
            })
            .collect();
        let img = Rgb {
            width: w,
            height: h,
            data: rgb,
        };
        let opts = CfOptions {
            tolerance: 1e-9,
            min_coarse_unknowns: 100,
            ..CfOptions::default()
        };
        let (reference, stats) = solve_pyramid_generic(&img, &class, &opts).unwrap();
        assert!(stats.levels >= 2, "{stats:?}");
        let mut paths = 0;
        #[cfg(target_arch = "x86_64")]
        {
            let check = |x: &[f64], name: &str| {
                // A NaN on either side is a failure (a running max from 0 would skip it).
                assert_eq!(x.len(), reference.len(), "{name}: length");
                assert!(
                    x.iter().chain(reference.iter()).all(|v| v.is_finite()),
                    "{name}: non-finite values"
                );
                let d = x
                    .iter()
                    .zip(reference.iter())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                println!("{name}: max diff {d:e}");
                assert!(d <= 1e-6, "{name} differs from the generic path by {d:e}");
            };
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the features were detected above.
                let (x, _) = unsafe { solve_pyramid_avx2(&img, &class, &opts) }.unwrap();
                check(&x, "AVX2");
                paths += 1;
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                let (x, _) = unsafe { solve_pyramid_avx512(&img, &class, &opts) }.unwrap();
                check(&x, "AVX-512");
                paths += 1;
            }
        }
        println!("compared {paths} SIMD path(s) with the generic one");
    }
}
