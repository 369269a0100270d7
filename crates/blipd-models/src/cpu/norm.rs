//! GroupNorm (optionally followed by SiLU, as every resnet block of SD does) in two passes over each
//! group: the moments (f64 accumulators, 8 lanes so they vectorise), then `y = x·a_c + b_c` per channel
//! with the activation fused. Burn 0.21 builds GroupNorm from reshapes, reductions and several
//! element-wise ops, each a pass and a fresh buffer; the SiLU after it is one more.

use rayon::prelude::*;

use super::math::{multiversion, silu1};

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
