//! GroupNorm (optionally followed by SiLU, as every resnet block of SD does) in two passes over each
//! group: the moments (f64 accumulators, 8 lanes so they vectorise), then `y = x·a_c + b_c` per channel
//! with the activation fused. Burn 0.21 builds GroupNorm from reshapes, reductions and several
//! element-wise ops, each a pass and a fresh buffer; the SiLU after it is one more.

use rayon::prelude::*;

use super::math::{exp, multiversion, silu1};

/// The layout and parameters of one GroupNorm.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormSpec<'a> {
    pub batch: usize,
    pub channels: usize,
    /// Elements per channel (`H·W`).
    pub spatial: usize,
    pub groups: usize,
    pub eps: f64,
    /// Per-channel scale and shift (`None`: 1 and 0).
    pub gamma: Option<&'a [f32]>,
    pub beta: Option<&'a [f32]>,
    /// Apply SiLU after the affine.
    pub silu: bool,
}

multiversion! {
    fn moments(x: &[f32]) -> (f64, f64) {
        let mut s = [0.0f64; 8];
        let mut q = [0.0f64; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                let v = c[l] as f64;
                s[l] += v;
                q[l] += v * v;
            }
        }
        let (mut sum, mut sq): (f64, f64) = (s.iter().sum(), q.iter().sum());
        for &v in chunks.remainder() {
            sum += v as f64;
            sq += v as f64 * v as f64;
        }
        (sum, sq)
    }
}

multiversion! {
    fn affine(x: &mut [f32], a: f32, b: f32, silu: bool) {
        if silu {
            x.iter_mut().for_each(|v| *v = silu1(*v * a + b));
        } else {
            x.iter_mut().for_each(|v| *v = *v * a + b);
        }
    }
}

multiversion! {
    fn affine_to(src: &[f32], dst: &mut [f32], a: f32, b: f32, silu: bool) {
        if silu {
            dst.iter_mut().zip(src).for_each(|(d, v)| *d = silu1(*v * a + b));
        } else {
            dst.iter_mut().zip(src).for_each(|(d, v)| *d = *v * a + b);
        }
    }
}

impl GroupNormSpec<'_> {
    fn check(&self, len: usize) -> usize {
        assert!(
            self.groups > 0 && self.channels.is_multiple_of(self.groups),
            "group_norm: {} channels in {} groups",
            self.channels,
            self.groups
        );
        assert_eq!(
            len,
            self.batch * self.channels * self.spatial,
            "group_norm: input size"
        );
        for p in [self.gamma, self.beta].into_iter().flatten() {
            assert_eq!(p.len(), self.channels, "group_norm: parameter size");
        }
        self.channels / self.groups * self.spatial
    }

    /// Per-channel `(a, b)` of group `g` (of any batch item) from its moments.
    fn coefficients(&self, g: usize, (sum, sq): (f64, f64), out: &mut Vec<(f32, f32)>) {
        let cpg = self.channels / self.groups;
        let n = (cpg * self.spatial) as f64;
        let mean = sum / n;
        let var = (sq / n - mean * mean).max(0.0);
        let rstd = 1.0 / (var + self.eps).sqrt();
        out.clear();
        for c in g * cpg..(g + 1) * cpg {
            let gamma = self.gamma.map_or(1.0, |p| p[c] as f64);
            let beta = self.beta.map_or(0.0, |p| p[c] as f64);
            let a = rstd * gamma;
            out.push((a as f32, (beta - mean * a) as f32));
        }
    }
}

/// GroupNorm over `x [B, C, spatial]` in place.
pub fn group_norm_inplace(x: &mut [f32], s: &GroupNormSpec<'_>) {
    let _timer = super::profile::Timer::start(6);
    let group_len = s.check(x.len());
    x.par_chunks_mut(group_len)
        .enumerate()
        .for_each_init(Vec::new, |coef, (bg, chunk)| {
            s.coefficients(bg % s.groups, moments(chunk), coef);
            for (&(a, b), ch) in coef.iter().zip(chunk.chunks_exact_mut(s.spatial)) {
                affine(ch, a, b, s.silu);
            }
        });
}

/// GroupNorm of `src [B, C, spatial]` into a new buffer.
pub fn group_norm(src: &[f32], s: &GroupNormSpec<'_>) -> Vec<f32> {
    let _timer = super::profile::Timer::start(6);
    let group_len = s.check(src.len());
    let mut out = super::output(src.len());
    out.par_chunks_mut(group_len)
        .zip(src.par_chunks(group_len))
        .enumerate()
        .for_each_init(Vec::new, |coef, (bg, (dst, chunk))| {
            s.coefficients(bg % s.groups, moments(chunk), coef);
            for ((&(a, b), d), c) in coef
                .iter()
                .zip(dst.chunks_exact_mut(s.spatial))
                .zip(chunk.chunks_exact(s.spatial))
            {
                affine_to(c, d, a, b, s.silu);
            }
        });
    out
}

multiversion! {
    /// `Σ x` with f64 lanes.
    pub(crate) fn sum(x: &[f32]) -> f64 {
        let mut s = [0.0f64; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                s[l] += c[l] as f64;
            }
        }
        let mut total: f64 = s.iter().sum();
        for &v in chunks.remainder() {
            total += v as f64;
        }
        total
    }
}

multiversion! {
    /// Pass 1 of the GroupNorm backward over one channel: `dz` (the gradient before the affine,
    /// through SiLU when `silu`) into `out`, and `(Σ dz, Σ dz·x̂)`.
    fn gn_back_channel(x: &[f32], dy: &[f32], out: &mut [f32], a: f32, b: f32, mean: f32, rstd: f32, silu: bool) -> (f64, f64) {
        let mut s = [0.0f32; 8];
        let mut sx = [0.0f32; 8];
        let n = x.len();
        let mut i = 0;
        while i + 8 <= n {
            for l in 0..8 {
                let xv = x[i + l];
                let mut g = dy[i + l];
                if silu {
                    let z = xv * a + b;
                    let sg = 1.0 / (1.0 + exp(-z));
                    g *= sg * (1.0 + z * (1.0 - sg));
                }
                out[i + l] = g;
                s[l] += g;
                sx[l] += g * (xv - mean) * rstd;
            }
            i += 8;
        }
        let (mut s1, mut s2): (f64, f64) = (
            s.iter().map(|v| *v as f64).sum(),
            sx.iter().map(|v| *v as f64).sum(),
        );
        while i < n {
            let xv = x[i];
            let mut g = dy[i];
            if silu {
                let z = xv * a + b;
                let sg = 1.0 / (1.0 + exp(-z));
                g *= sg * (1.0 + z * (1.0 - sg));
            }
            out[i] = g;
            s1 += g as f64;
            s2 += (g * (xv - mean) * rstd) as f64;
            i += 1;
        }
        (s1, s2)
    }
}

multiversion! {
    /// Pass 2: `dx = rstd·(γ·dz − m1 − x̂·m2)` in place over `dz`.
    fn gn_back_apply(x: &[f32], dz: &mut [f32], gamma: f32, mean: f32, rstd: f32, m1: f32, m2: f32) {
        for (d, xv) in dz.iter_mut().zip(x) {
            let xhat = (*xv - mean) * rstd;
            *d = rstd * (gamma * *d - m1 - xhat * m2);
        }
    }
}

/// Gradients of [`group_norm`] (with its SiLU when `s.silu`) for the output gradient `dy`:
/// `(dx, dγ, dβ)` (`dγ`, `dβ` are `None` without affine parameters). The group statistics and the
/// pre-activation are recomputed from `x`.
pub fn group_norm_backward(
    x: &[f32],
    dy: &[f32],
    s: &GroupNormSpec<'_>,
) -> (Vec<f32>, Option<Vec<f32>>, Option<Vec<f32>>) {
    let group_len = s.check(x.len());
    assert_eq!(dy.len(), x.len(), "group_norm_backward: gradient size");
    let cpg = s.channels / s.groups;
    let mut dx = super::output(x.len());
    // Per (batch, group) task: the per-channel (Σ dz, Σ dz·x̂) for the affine parameters' gradients.
    let partial: Vec<Vec<(f64, f64)>> = dx
        .par_chunks_mut(group_len)
        .zip(x.par_chunks(group_len).zip(dy.par_chunks(group_len)))
        .enumerate()
        .map(|(bg, (out, (xg, dyg)))| {
            let g = bg % s.groups;
            let (sum, sq) = moments(xg);
            let n = group_len as f64;
            let mean = sum / n;
            let var = (sq / n - mean * mean).max(0.0);
            let rstd = 1.0 / (var + s.eps).sqrt();
            let mut per = Vec::with_capacity(cpg);
            let (mut m1, mut m2) = (0.0f64, 0.0f64);
            for (ci, ((xc, dyc), oc)) in xg
                .chunks_exact(s.spatial)
                .zip(dyg.chunks_exact(s.spatial))
                .zip(out.chunks_exact_mut(s.spatial))
                .enumerate()
            {
                let c = g * cpg + ci;
                let gamma = s.gamma.map_or(1.0, |p| p[c] as f64);
                let beta = s.beta.map_or(0.0, |p| p[c] as f64);
                let a = rstd * gamma;
                let b = beta - mean * a;
                let (sdz, sdzx) = gn_back_channel(
                    xc,
                    dyc,
                    oc,
                    a as f32,
                    b as f32,
                    mean as f32,
                    rstd as f32,
                    s.silu,
                );
                m1 += gamma * sdz;
                m2 += gamma * sdzx;
                per.push((sdz, sdzx));
            }
            let (m1, m2) = ((m1 / n) as f32, (m2 / n) as f32);
            for (ci, (xc, oc)) in xg
                .chunks_exact(s.spatial)
                .zip(out.chunks_exact_mut(s.spatial))
                .enumerate()
            {
                let gamma = s.gamma.map_or(1.0, |p| p[g * cpg + ci]);
                gn_back_apply(xc, oc, gamma, mean as f32, rstd as f32, m1, m2);
            }
            per
        })
        .collect();
    let (dgamma, dbeta) = if s.gamma.is_some() || s.beta.is_some() {
        let mut dg = vec![0.0f64; s.channels];
        let mut dbt = vec![0.0f64; s.channels];
        for (bg, per) in partial.iter().enumerate() {
            let g = bg % s.groups;
            for (ci, (sdz, sdzx)) in per.iter().enumerate() {
                dg[g * cpg + ci] += sdzx;
                dbt[g * cpg + ci] += sdz;
            }
        }
        let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        (
            s.gamma.is_some().then(|| to32(dg)),
            s.beta.is_some().then(|| to32(dbt)),
        )
    } else {
        (None, None)
    };
    (dx, dgamma, dbeta)
}

/// LayerNorm over the last axis of `x [rows, d]`: `(y, mean, rstd)`, the statistics per row for the
/// backward pass. The arithmetic follows Burn's (and torch's) own: f32 mean, f32 variance of the
/// centred values (two passes), `(x − mean) / √(var + ε) · γ + β` — LayerNorm feeds losses whose
/// gradients are checked against LAVIS at 1e-5, and f64 statistics round differently from the
/// references.
pub fn layer_norm(
    x: &[f32],
    d: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let _timer = super::profile::Timer::start(8);
    assert!(d > 0 && x.len().is_multiple_of(d), "layer_norm: input size");
    let rows = x.len() / d;
    let mut y = super::output(x.len());
    let mut mean = vec![0.0f32; rows];
    let mut rstd = vec![0.0f32; rows];
    let per = (PAR_ROWS_FLOATS / d).max(1);
    let eps = eps as f32;
    y.par_chunks_mut(d * per)
        .zip(x.par_chunks(d * per))
        .zip(mean.par_chunks_mut(per).zip(rstd.par_chunks_mut(per)))
        .for_each(|((yb, xb), (mb, rb))| {
            for (((yr, xr), m), r) in yb
                .chunks_exact_mut(d)
                .zip(xb.chunks_exact(d))
                .zip(mb.iter_mut())
                .zip(rb.iter_mut())
            {
                let (mu, denom) = ln_stats(xr, eps);
                *m = mu;
                *r = 1.0 / denom;
                ln_row(xr, yr, mu, denom, gamma, beta);
            }
        });
    (y, mean, rstd)
}

multiversion! {
    /// `(mean, √(var + ε))` of one row in f32, two passes.
    fn ln_stats(x: &[f32], eps: f32) -> (f32, f32) {
        let n = x.len() as f32;
        let mut lanes = [0.0f32; 8];
        let mut it = x.chunks_exact(8);
        for c in &mut it {
            for l in 0..8 {
                lanes[l] += c[l];
            }
        }
        let mut s: f32 = lanes.iter().sum();
        s += it.remainder().iter().sum::<f32>();
        let mean = s / n;
        let mut lanes = [0.0f32; 8];
        let mut it = x.chunks_exact(8);
        for c in &mut it {
            for l in 0..8 {
                let d = c[l] - mean;
                lanes[l] += d * d;
            }
        }
        let mut q: f32 = lanes.iter().sum();
        q += it.remainder().iter().map(|v| (v - mean) * (v - mean)).sum::<f32>();
        (mean, (q / n + eps).sqrt())
    }
}

/// Rows per LayerNorm task: about 64 Ki floats.
const PAR_ROWS_FLOATS: usize = 1 << 16;

multiversion! {
    fn ln_row(x: &[f32], y: &mut [f32], mean: f32, denom: f32, gamma: Option<&[f32]>, beta: Option<&[f32]>) {
        match (gamma, beta) {
            (Some(g), Some(b)) => {
                for (((yv, xv), gv), bv) in y.iter_mut().zip(x).zip(g).zip(b) {
                    *yv = (*xv - mean) / denom * gv + bv;
                }
            }
            (Some(g), None) => {
                for ((yv, xv), gv) in y.iter_mut().zip(x).zip(g) {
                    *yv = (*xv - mean) / denom * gv;
                }
            }
            (None, Some(b)) => {
                for ((yv, xv), bv) in y.iter_mut().zip(x).zip(b) {
                    *yv = (*xv - mean) / denom + bv;
                }
            }
            (None, None) => {
                for (yv, xv) in y.iter_mut().zip(x) {
                    *yv = (*xv - mean) / denom;
                }
            }
        }
    }
}

multiversion! {
    /// One row of the LayerNorm backward: `dx`, and `dγ += dy·x̂`, `dβ += dy` into the accumulators.
    fn ln_back_row(x: &[f32], dy: &[f32], dx: &mut [f32], gamma: Option<&[f32]>, mean: f32, rstd: f32, dg: &mut [f32], db: &mut [f32]) {
        let d = x.len() as f32;
        let (mut s1, mut s2) = (0.0f32, 0.0f32);
        for i in 0..x.len() {
            let xhat = (x[i] - mean) * rstd;
            let g = dy[i] * gamma.map_or(1.0, |p| p[i]);
            s1 += g;
            s2 += g * xhat;
            dg[i] += dy[i] * xhat;
            db[i] += dy[i];
        }
        let (m1, m2) = (s1 / d, s2 / d);
        for i in 0..x.len() {
            let xhat = (x[i] - mean) * rstd;
            let g = dy[i] * gamma.map_or(1.0, |p| p[i]);
            dx[i] = rstd * (g - m1 - xhat * m2);
        }
    }
}

/// Gradients of [`layer_norm`]: `(dx, dγ, dβ)` from the input, the saved row statistics and `dy`.
pub fn layer_norm_backward(
    x: &[f32],
    dy: &[f32],
    d: usize,
    gamma: Option<&[f32]>,
    mean: &[f32],
    rstd: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), dy.len(), "layer_norm_backward: gradient size");
    let mut dx = super::output(x.len());
    let per = (PAR_ROWS_FLOATS / d).max(1);
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(d * per)
        .zip(x.par_chunks(d * per).zip(dy.par_chunks(d * per)))
        .zip(mean.par_chunks(per).zip(rstd.par_chunks(per)))
        .map(|((dxb, (xb, dyb)), (mb, rb))| {
            let mut dg = vec![0.0f32; d];
            let mut db = vec![0.0f32; d];
            for ((((dxr, xr), dyr), m), r) in dxb
                .chunks_exact_mut(d)
                .zip(xb.chunks_exact(d))
                .zip(dyb.chunks_exact(d))
                .zip(mb)
                .zip(rb)
            {
                ln_back_row(xr, dyr, dxr, gamma, *m, *r, &mut dg, &mut db);
            }
            (dg, db)
        })
        .collect();
    let mut dg = vec![0.0f64; d];
    let mut db = vec![0.0f64; d];
    for (g, b) in &partial {
        for i in 0..d {
            dg[i] += g[i] as f64;
            db[i] += b[i] as f64;
        }
    }
    (
        dx,
        dg.into_iter().map(|v| v as f32).collect(),
        db.into_iter().map(|v| v as f32).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(5);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 3.0
            })
            .collect()
    }

    /// Central differences of `L = Σ dy·f(x)` in f64 around `x` along direction `u`.
    fn directional(f: &dyn Fn(&[f32]) -> Vec<f32>, x: &[f32], dy: &[f32], u: &[f32]) -> f64 {
        let eps = 1e-2f32;
        let plus: Vec<f32> = x.iter().zip(u).map(|(a, b)| a + eps * b).collect();
        let minus: Vec<f32> = x.iter().zip(u).map(|(a, b)| a - eps * b).collect();
        let l = |v: Vec<f32>| {
            v.iter()
                .zip(dy)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
        };
        (l(f(&plus)) - l(f(&minus))) / (2.0 * eps as f64)
    }

    #[test]
    fn group_norm_forward_and_backward() {
        let (b, c, sp, g) = (2, 6, 10, 3);
        let x = data(b * c * sp, 1);
        let gamma = data(c, 2);
        let beta = data(c, 3);
        let dy = data(x.len(), 4);
        for silu in [false, true] {
            let spec = GroupNormSpec {
                batch: b,
                channels: c,
                spatial: sp,
                groups: g,
                eps: 1e-5,
                gamma: Some(&gamma),
                beta: Some(&beta),
                silu,
            };
            let y = group_norm(&x, &spec);
            let mut y2 = x.clone();
            group_norm_inplace(&mut y2, &spec);
            blipd_testkit::assert_close_slice("in place", &y2, &y, 0.0);
            // Reference forward in f64.
            let cpg = c / g;
            for bi in 0..b {
                for gi in 0..g {
                    let r = (bi * c + gi * cpg) * sp..(bi * c + (gi + 1) * cpg) * sp;
                    let v = &x[r.clone()];
                    let m = v.iter().map(|a| *a as f64).sum::<f64>() / v.len() as f64;
                    let var =
                        v.iter().map(|a| (*a as f64 - m).powi(2)).sum::<f64>() / v.len() as f64;
                    for (k, i) in r.enumerate() {
                        let ch = gi * cpg + k / sp;
                        let z = (x[i] as f64 - m) / (var + 1e-5).sqrt() * gamma[ch] as f64
                            + beta[ch] as f64;
                        let want = if silu { z / (1.0 + (-z).exp()) } else { z };
                        assert!(
                            (y[i] as f64 - want).abs() < 1e-5,
                            "forward {i}: {} vs {want}",
                            y[i]
                        );
                    }
                }
            }
            let (dx, dg, db) = group_norm_backward(&x, &dy, &spec);
            let u = data(x.len(), 9);
            let f = |xx: &[f32]| group_norm(xx, &spec);
            let num = directional(&f, &x, &dy, &u);
            let ana: f64 = dx.iter().zip(&u).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!(
                (num - ana).abs() < 2e-3 * num.abs().max(1.0),
                "dx silu={silu}: {num} vs {ana}"
            );
            let ug = data(c, 10);
            let fg = |gg: &[f32]| {
                group_norm(
                    &x,
                    &GroupNormSpec {
                        gamma: Some(gg),
                        ..spec
                    },
                )
            };
            let num = directional(&fg, &gamma, &dy, &ug);
            let ana: f64 = dg
                .unwrap()
                .iter()
                .zip(&ug)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            assert!(
                (num - ana).abs() < 2e-3 * num.abs().max(1.0),
                "dgamma: {num} vs {ana}"
            );
            let fb = |bb: &[f32]| {
                group_norm(
                    &x,
                    &GroupNormSpec {
                        beta: Some(bb),
                        ..spec
                    },
                )
            };
            let num = directional(&fb, &beta, &dy, &ug);
            let ana: f64 = db
                .unwrap()
                .iter()
                .zip(&ug)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            assert!(
                (num - ana).abs() < 2e-3 * num.abs().max(1.0),
                "dbeta: {num} vs {ana}"
            );
        }
    }

    #[test]
    fn layer_norm_forward_and_backward() {
        let (rows, d) = (5, 12);
        let x = data(rows * d, 11);
        let gamma = data(d, 12);
        let beta = data(d, 13);
        let dy = data(x.len(), 14);
        let (y, mean, rstd) = layer_norm(&x, d, Some(&gamma), Some(&beta), 1e-5);
        for r in 0..rows {
            let v = &x[r * d..(r + 1) * d];
            let m = v.iter().map(|a| *a as f64).sum::<f64>() / d as f64;
            let var = v.iter().map(|a| (*a as f64 - m).powi(2)).sum::<f64>() / d as f64;
            for i in 0..d {
                let want =
                    (v[i] as f64 - m) / (var + 1e-5).sqrt() * gamma[i] as f64 + beta[i] as f64;
                assert!((y[r * d + i] as f64 - want).abs() < 1e-5);
            }
        }
        let (dx, dg, db) = layer_norm_backward(&x, &dy, d, Some(&gamma), &mean, &rstd);
        let u = data(x.len(), 15);
        let f = |xx: &[f32]| layer_norm(xx, d, Some(&gamma), Some(&beta), 1e-5).0;
        let num = directional(&f, &x, &dy, &u);
        let ana: f64 = dx.iter().zip(&u).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!(
            (num - ana).abs() < 2e-3 * num.abs().max(1.0),
            "dx: {num} vs {ana}"
        );
        let ug = data(d, 16);
        let fg = |gg: &[f32]| layer_norm(&x, d, Some(gg), Some(&beta), 1e-5).0;
        let num = directional(&fg, &gamma, &dy, &ug);
        let ana: f64 = dg.iter().zip(&ug).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!(
            (num - ana).abs() < 2e-3 * num.abs().max(1.0),
            "dgamma: {num} vs {ana}"
        );
        let fb = |bb: &[f32]| layer_norm(&x, d, Some(&gamma), Some(bb), 1e-5).0;
        let num = directional(&fb, &beta, &dy, &ug);
        let ana: f64 = db.iter().zip(&ug).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!(
            (num - ana).abs() < 2e-3 * num.abs().max(1.0),
            "dbeta: {num} vs {ana}"
        );
    }
}
