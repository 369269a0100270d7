//! Element-wise maths the kernels need, written so that LLVM vectorises it: a branch-free `exp`
//! (Cephes' `expf` polynomial), `erf` (Abramowitz–Stegun 7.1.26, the formula ATen's vectorised
//! `erf` uses, |error| ≤ 4.3e-7 in f32), and the activations built on them. Each public loop is compiled
//! twice, for the baseline target and for AVX2 + FMA, and picks one at run time
//! (`multiversion!`).

use rayon::prelude::*;

/// Defines a function twice — the baseline build and an AVX2 + FMA one — and dispatches at run time
/// (`is_x86_feature_detected!` is cached by std). The body must be the function's whole work, so that
/// the `#[inline(always)]` helpers it calls are compiled with the wider instruction set.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
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

/// `erf(x)`, Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7 in exact arithmetic, 4.3e-7 in f32), as ATen's
/// vectorised CPU `erf`.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
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
        assert!(worst[0] < 6e-7, "erf {}", worst[0]);
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
