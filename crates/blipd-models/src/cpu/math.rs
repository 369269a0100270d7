//! Element-wise maths the kernels need, written so that LLVM vectorises it: a branch-free `exp`
//! (Cephes' `expf` polynomial), `erf` (FreeBSD's piecewise rational approximations, about 1 ulp),
//! and the activations built on them. Each public loop is compiled
//! twice, for the baseline target and for AVX2 + FMA, and picks one at run time
//! (`multiversion!`).

use rayon::prelude::*;

/// Defines a function twice — the baseline build and an AVX2 + FMA one — and dispatches at run time
/// (`is_x86_feature_detected!` is cached by std). The body must be the function's whole work, so that
/// the `#[inline(always)]` helpers it calls are compiled with the wider instruction set.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Elements per parallel chunk of the element-wise loops (256 KiB of f32).
const PAR_CHUNK: usize = 1 << 16;

/// `e^x` in f32, relative error about 2e-7 over the clamped range `[-87.3, 88.3]` (inputs outside it
/// are clamped: `exp(-1e9)` is 6e-39, not 0). NaN propagates.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * C1 - n * C2;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.0e-1;
    let y = p * z + r + 1.0;
    // n ∈ [-126, 127] after the clamp: a normal power of two.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    y * scale
}

/// `erf(x)` to about 1 ulp (|error| ≤ 1.2e-7): the piecewise rational approximations of FreeBSD's
/// `s_erff.c` (`x + x·P/Q` below 0.84375, `erx + P/Q` to 1.25, `erfc` by `exp(−x²)·exp(R/S)/x` to 6,
/// 1 beyond), all evaluated and the right one selected so that the loop vectorises. Gradients of
/// GELU inside the Q-Former are checked against LAVIS at 1e-5, which the 4e-7 error of the shorter
/// Abramowitz–Stegun 7.1.26 formula (ATen's) exceeded.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const ERX: f32 = 8.450_629e-1;
    const PP: [f32; 5] = [
        1.283_791_7e-1,
        -3.250_421e-1,
        -2.848_175e-2,
        -5.770_270_4e-3,
        -2.376_301_7e-5,
    ];
    const QQ: [f32; 5] = [
        3.979_172e-1,
        6.502_225e-2,
        5.081_306e-3,
        1.324_947_4e-4,
        -3.960_228_2e-6,
    ];
    const PA: [f32; 7] = [
        -2.362_118_6e-3,
        4.148_561e-1,
        -3.722_079e-1,
        3.183_466e-1,
        -1.108_947e-1,
        3.547_830_5e-2,
        -2.166_375_5e-3,
    ];
    const QA: [f32; 6] = [
        1.064_208_8e-1,
        5.403_979_6e-1,
        7.182_865_6e-2,
        1.261_712_2e-1,
        1.363_708_4e-2,
        1.198_450_1e-2,
    ];
    const RA: [f32; 8] = [
        -9.864_944e-3,
        -6.938_586e-1,
        -1.055_862_6e1,
        -6.237_533e1,
        -1.623_966_7e2,
        -1.846_050_9e2,
        -8.128_744e1,
        -9.814_329,
    ];
    const SA: [f32; 8] = [
        1.965_127_2e1,
        1.376_577_6e2,
        4.345_659e2,
        6.453_872_7e2,
        4.290_081_5e2,
        1.086_350_1e2,
        6.570_25,
        -6.042_441_4e-2,
    ];
    const RB: [f32; 7] = [
        -9.864_943e-3,
        -7.992_833e-1,
        -1.775_795_6e1,
        -1.606_363_8e2,
        -6.375_664_7e2,
        -1.025_095_1e3,
        -4.835_192e2,
    ];
    const SB: [f32; 7] = [
        3.033_806e1,
        3.257_925e2,
        1.536_729_6e3,
        3.199_858_2e3,
        2.553_050_3e3,
        4.745_285_4e2,
        -2.244_095_2e1,
    ];
    #[inline(always)]
    fn poly<const N: usize>(c: &[f32; N], z: f32) -> f32 {
        let mut acc = c[N - 1];
        for k in (0..N - 1).rev() {
            acc = acc * z + c[k];
        }
        acc
    }
    let a = x.abs();
    // [0, 0.84375): x + x·P(x²)/Q(x²).
    let z = a * a;
    let small = a + a * (poly(&PP, z) / (1.0 + z * poly(&QQ, z)));
    // [0.84375, 1.25): erx + P(s)/Q(s), s = |x| − 1.
    let s = a - 1.0;
    let mid = ERX + poly(&PA, s) / (1.0 + s * poly(&QA, s));
    // [1.25, 6): 1 − erfc, erfc = exp(−t² − 0.5625)·exp((t − x)(t + x) + R/S)/x with t = x rounded
    // to 12 significant bits (so that −t² is exact).
    let u = 1.0 / z.max(1.0);
    let near = a < 1.0 / 0.35;
    let r = if near { poly(&RA, u) } else { poly(&RB, u) };
    let q = if near {
        1.0 + u * poly(&SA, u)
    } else {
        1.0 + u * poly(&SB, u)
    };
    let t = f32::from_bits(a.to_bits() & 0xffff_e000);
    let erfc = exp(-t * t - 0.5625) * exp((t - a) * (t + a) + r / q) / a.max(1.0);
    let large = 1.0 - erfc;
    let y = if a < 0.843_75 {
        small
    } else if a < 1.25 {
        mid
    } else if a < 6.0 {
        large
    } else {
        1.0
    };
    if x.is_nan() {
        x
    } else {
        y.copysign(x)
    }
}

/// SiLU `x·σ(x)`.
#[inline(always)]
pub fn silu1(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Exact (erf) GELU `x·½(1 + erf(x/√2))`, torch's `approximate="none"`.
#[inline(always)]
pub fn gelu1(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// CLIP's quick GELU `x·σ(1.702x)`.
#[inline(always)]
pub fn quick_gelu1(x: f32) -> f32 {
    x / (1.0 + exp(-1.702 * x))
}

/// Which activation an element-wise kernel applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Silu,
    Gelu,
    QuickGelu,
}

multiversion! {
    fn act_slice(x: &mut [f32], act: Act) {
        match act {
            Act::Silu => x.iter_mut().for_each(|v| *v = silu1(*v)),
            Act::Gelu => x.iter_mut().for_each(|v| *v = gelu1(*v)),
            Act::QuickGelu => x.iter_mut().for_each(|v| *v = quick_gelu1(*v)),
        }
    }
}

/// Applies `act` to every element, in place (split over the thread pool when large).
pub fn act_inplace(x: &mut [f32], act: Act) {
    let _timer = super::profile::Timer::start(10);
    if x.len() >= 2 * PAR_CHUNK {
        x.par_chunks_mut(PAR_CHUNK).for_each(|c| act_slice(c, act));
    } else {
        act_slice(x, act);
    }
}

multiversion! {
    fn geglu_rows(h: &[f32], out: &mut [f32], inner: usize) {
        for (row, o) in h.chunks_exact(2 * inner).zip(out.chunks_exact_mut(inner)) {
            let (a, gate) = row.split_at(inner);
            for ((o, a), g) in o.iter_mut().zip(a).zip(gate) {
                *o = a * gelu1(*g);
            }
        }
    }
}

/// diffusers' GEGLU on rows of `2·inner` values (`[h | gate]`): `out[r, j] = h[r, j]·gelu(gate[r, j])`.
pub fn geglu(h: &[f32], out: &mut [f32], inner: usize) {
    let _timer = super::profile::Timer::start(10);
    assert_eq!(
        h.len(),
        2 * out.len(),
        "geglu: input must be twice the output"
    );
    let rows = out.len() / inner.max(1);
    let rows_per_task = (PAR_CHUNK / inner.max(1)).max(1);
    if rows >= 2 * rows_per_task {
        h.par_chunks(2 * inner * rows_per_task)
            .zip(out.par_chunks_mut(inner * rows_per_task))
            .for_each(|(h, o)| geglu_rows(h, o, inner));
    } else {
        geglu_rows(h, out, inner);
    }
}

multiversion! {
    /// `x ← exp((x − max)·scale)` over one row; returns the row's sum. `max` is the row's maximum.
    pub(crate) fn softmax_exp(x: &mut [f32], max: f32, scale: f32) -> f32 {
        let mut lanes = [0.0f32; 8];
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(c.iter_mut()) {
                *v = exp((*v - max) * scale);
                *l += *v;
            }
        }
        let mut sum: f32 = lanes.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp((*v - max) * scale);
            sum += *v;
        }
        sum
    }
}

multiversion! {
    /// The largest element of a non-empty row (NaN-propagating is not needed: scores are finite).
    pub(crate) fn row_max(x: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l = l.max(*v);
            }
        }
        let mut m = lanes.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
        for v in chunks.remainder() {
            m = m.max(*v);
        }
        m
    }
}

multiversion! {
    /// `x ← x·s`.
    pub(crate) fn scale_slice(x: &mut [f32], s: f32) {
        x.iter_mut().for_each(|v| *v *= s);
    }
}

/// The derivative of `act` at `x`.
#[inline(always)]
pub fn act_grad1(x: f32, act: Act) -> f32 {
    match act {
        Act::Silu => {
            let s = 1.0 / (1.0 + exp(-x));
            s * (1.0 + x * (1.0 - s))
        }
        Act::Gelu => gelu_grad1(x),
        Act::QuickGelu => {
            let s = 1.0 / (1.0 + exp(-1.702 * x));
            s + 1.702 * x * s * (1.0 - s)
        }
    }
}

/// `d gelu(x) / dx = Φ(x) + x·φ(x)`.
#[inline(always)]
pub fn gelu_grad1(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x)
}

multiversion! {
    fn act_back_slice(x: &[f32], dy: &[f32], dx: &mut [f32], act: Act) {
        for ((d, xv), g) in dx.iter_mut().zip(x).zip(dy) {
            *d = g * act_grad1(*xv, act);
        }
    }
}

/// `dx = dy · act'(x)`.
pub fn act_backward(x: &[f32], dy: &[f32], act: Act) -> Vec<f32> {
    assert_eq!(x.len(), dy.len(), "act_backward: gradient size");
    let mut dx = super::output(x.len());
    if x.len() >= 2 * PAR_CHUNK {
        dx.par_chunks_mut(PAR_CHUNK)
            .zip(x.par_chunks(PAR_CHUNK).zip(dy.par_chunks(PAR_CHUNK)))
            .for_each(|(d, (x, g))| act_back_slice(x, g, d, act));
    } else {
        act_back_slice(x, dy, &mut dx, act);
    }
    dx
}

multiversion! {
    fn geglu_back_rows(h: &[f32], dy: &[f32], dh: &mut [f32], inner: usize) {
        for ((row, g), d) in h.chunks_exact(2 * inner).zip(dy.chunks_exact(inner)).zip(dh.chunks_exact_mut(2 * inner)) {
            let (a, gate) = row.split_at(inner);
            let (da, dg) = d.split_at_mut(inner);
            for j in 0..inner {
                da[j] = g[j] * gelu1(gate[j]);
                dg[j] = g[j] * a[j] * gelu_grad1(gate[j]);
            }
        }
    }
}

/// Gradient of [`geglu`]: `dh [rows, 2·inner]` from `h` and the output gradient `dy [rows, inner]`.
pub fn geglu_backward(h: &[f32], dy: &[f32], inner: usize) -> Vec<f32> {
    assert_eq!(h.len(), 2 * dy.len(), "geglu_backward: sizes");
    let mut dh = super::output(h.len());
    let rows_per_task = (PAR_CHUNK / inner.max(1)).max(1);
    dh.par_chunks_mut(2 * inner * rows_per_task)
        .zip(
            h.par_chunks(2 * inner * rows_per_task)
                .zip(dy.par_chunks(inner * rows_per_task)),
        )
        .for_each(|(d, (h, g))| geglu_back_rows(h, g, d, inner));
    dh
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            let rel = ((got - want) / want).abs();
            assert!(rel.is_finite(), "exp({x}) = {got}");
            worst = worst.max(rel);
            x += 0.0137;
        }
        println!("exp: worst relative error {worst:.2e}");
        assert!(worst < 5e-7, "exp relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1e9) < 1e-37);
    }

    #[test]
    fn erf_and_activations_match_f64() {
        let mut worst = [0.0f64; 4];
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = x as f64;
            let erf_ref = erf_f64(xd);
            let refs = [
                erf_ref,
                xd / (1.0 + (-xd).exp()),
                0.5 * xd * (1.0 + erf_f64(xd / 2f64.sqrt())),
                xd / (1.0 + (-1.702 * xd).exp()),
            ];
            let got = [erf(x), silu1(x), gelu1(x), quick_gelu1(x)];
            for i in 0..4 {
                let d = (got[i] as f64 - refs[i]).abs() / refs[i].abs().max(1.0);
                assert!(d.is_finite(), "non-finite at {x}");
                worst[i] = worst[i].max(d);
            }
            x += 0.00731;
        }
        println!("erf / silu / gelu / quick_gelu worst error: {worst:?}");
        assert!(worst[0] < 2e-7, "erf {}", worst[0]);
        for w in &worst[1..] {
            assert!(*w < 1e-6, "activation error {w}");
        }
    }

    /// erf in f64 by its Maclaurin series / continued fraction (reference only).
    fn erf_f64(x: f64) -> f64 {
        if x.abs() < 3.0 {
            // Σ (-1)^n x^(2n+1) / (n! (2n+1)), converges fast for |x| < 3.
            let mut sum = 0.0;
            let mut term = x;
            let mut n = 0.0;
            while term.abs() > 1e-17 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc by its continued fraction.
            let a = x.abs();
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
            (1.0 - erfc).copysign(x)
        }
    }

    #[test]
    fn loops_agree_with_scalar() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.013).collect();
        for act in [Act::Silu, Act::Gelu, Act::QuickGelu] {
            let mut y = xs.clone();
            act_inplace(&mut y, act);
            for (x, y) in xs.iter().zip(&y) {
                let want = match act {
                    Act::Silu => silu1(*x),
                    Act::Gelu => gelu1(*x),
                    Act::QuickGelu => quick_gelu1(*x),
                };
                assert!(
                    (y - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{act:?}({x})"
                );
            }
        }
        let mut row = xs.clone();
        let m = row_max(&row);
        assert_eq!(m, xs.iter().cloned().fold(f32::MIN, f32::max));
        let s = softmax_exp(&mut row, m, 0.5);
        // Derivatives against central differences.
        for act in [Act::Silu, Act::Gelu, Act::QuickGelu] {
            let f = |x: f32| match act {
                Act::Silu => silu1(x) as f64,
                Act::Gelu => gelu1(x) as f64,
                Act::QuickGelu => quick_gelu1(x) as f64,
            };
            for &x in &[-6.0f32, -2.5, -1.0, -0.3, 0.0, 0.2, 1.1, 3.0, 7.0] {
                let e = 1e-2f32;
                let num = (f(x + e) - f(x - e)) / (2.0 * e as f64);
                let ana = act_grad1(x, act) as f64;
                assert!((num - ana).abs() < 2e-3, "{act:?}'({x}): {ana} vs {num}");
            }
        }
        let h: Vec<f32> = (0..24).map(|i| (i as f32 - 12.0) * 0.3).collect();
        let dy: Vec<f32> = (0..12).map(|i| (i as f32 - 5.0) * 0.1).collect();
        let dh = geglu_backward(&h, &dy, 6);
        for r in 0..2 {
            for j in 0..6 {
                let (a, g) = (h[r * 12 + j], h[r * 12 + 6 + j]);
                let gy = dy[r * 6 + j];
                assert!((dh[r * 12 + j] - gy * gelu1(g)).abs() < 1e-6);
                assert!((dh[r * 12 + 6 + j] - gy * a * gelu_grad1(g)).abs() < 1e-6);
            }
        }
        let want: f64 = xs.iter().map(|x| (((x - m) * 0.5) as f64).exp()).sum();
        assert!(((s as f64 - want) / want).abs() < 1e-5, "{s} vs {want}");
    }
}
