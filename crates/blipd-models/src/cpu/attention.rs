//! Scaled dot-product attention read straight from the projections' token layout.
//!
//! `q [B, Lq, H·D]`, `k [B, Lk, H·D]`, `v [B, Lk, H·Dv]` — what `to_q`/`to_k`/`to_v` write — are used
//! in place: head `h` is the column block `h·D..(h+1)·D` of each row, read through strides, so no
//! `[B, H, L, D]` permutation is ever copied, and the result is written as `[B, Lq, H·Dv]`, what
//! `to_out` reads. Work is split into tasks of (batch, head, block of query rows); each task computes
//! the block's scores against every key with one product into a per-thread scratch (at most 1 MiB),
//! the row softmax in place (vectorised `exp`), one product with `V` into the output, and scales each
//! row by its 1/Σ. The scores of a whole row are kept, so the result is the materialised attention's
//! up to summation order, while memory stays bounded by the block (an SD 64×64 self-attention would
//! materialise 512 MiB per image).

use rayon::prelude::*;

use super::gemm::{matmul, Operand};
use super::math::{exp, multiversion, row_max, scale_slice, softmax_exp};
use super::{output, with_scratch, SendPtr};

/// Score floats per task (1 MiB).
const SCORE_FLOATS: usize = 1 << 18;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    /// Query/key width per head.
    pub head_dim: usize,
    /// Value width per head.
    pub value_dim: usize,
    /// Multiplies `q·kᵀ` before the softmax (usually `head_dim^-½`).
    pub scale: f32,
    /// Query `i` sees keys `0..=i` only (CLIP's text encoder; needs `q_len == kv_len`).
    pub causal: bool,
}

impl AttentionSpec {
    fn check(&self, q: usize, k: usize, v: usize) {
        let (hd, hdv) = (self.heads * self.head_dim, self.heads * self.value_dim);
        assert_eq!(q, self.batch * self.q_len * hd, "attention: query size");
        assert_eq!(k, self.batch * self.kv_len * hd, "attention: key size");
        assert_eq!(v, self.batch * self.kv_len * hdv, "attention: value size");
        assert!(self.kv_len > 0, "attention: no keys");
        assert!(self.scale > 0.0, "attention: the scale must be positive");
        assert!(
            !self.causal || self.q_len == self.kv_len,
            "attention: causal masking needs as many queries as keys"
        );
    }

    /// Query rows per task.
    fn block(&self) -> usize {
        (SCORE_FLOATS / self.kv_len)
            .clamp(8, 256)
            .min(self.q_len.max(1))
    }

    /// Keys query `i` sees.
    fn visible(&self, i: usize) -> usize {
        if self.causal {
            i + 1
        } else {
            self.kv_len
        }
    }
}

/// `softmax(q·kᵀ·scale)·v` per head; layouts in the module docs. Returns `[B, Lq, H·Dv]`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttentionSpec) -> Vec<f32> {
    attention_with_lse(q, k, v, s, None)
}

/// [`attention`], also writing each row's log-sum-exp of the scaled scores into `lse`
/// (`[B, H, Lq]`), what the backward pass recomputes the probabilities from.
pub fn attention_with_lse(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &AttentionSpec,
    lse: Option<&mut [f32]>,
) -> Vec<f32> {
    let _timer = super::profile::Timer::start(4);
    s.check(q.len(), k.len(), v.len());
    let (hd, hdv) = (s.heads * s.head_dim, s.heads * s.value_dim);
    let mut out = output(s.batch * s.q_len * hdv);
    if out.is_empty() {
        return out;
    }
    let lse_ptr = lse.map(|l| {
        assert_eq!(l.len(), s.batch * s.heads * s.q_len, "attention: lse size");
        SendPtr(l.as_mut_ptr())
    });
    let block = s.block();
    let blocks = s.q_len.div_ceil(block);
    let tasks = s.batch * s.heads * blocks;
    let dst = SendPtr(out.as_mut_ptr());
    let (qp, kp, vp) = (
        SendPtr(q.as_ptr() as *mut f32),
        SendPtr(k.as_ptr() as *mut f32),
        SendPtr(v.as_ptr() as *mut f32),
    );
    (0..tasks).into_par_iter().for_each(|t| {
        let (bh, qb) = (t / blocks, t % blocks);
        let (b, h) = (bh / s.heads, bh % s.heads);
        let q0 = qb * block;
        let rows = block.min(s.q_len - q0);
        with_scratch(rows * s.kv_len, |scores| {
            // SAFETY: every pointer below addresses inside `q`, `k`, `v` (sizes checked) or inside
            // this task's rows q0..q0+rows × columns h·Dv..(h+1)·Dv of `out` (and its lse entries),
            // which no other task writes; `scores` is this thread's scratch of rows × Lk.
            unsafe {
                let qptr = qp.get().add((b * s.q_len + q0) * hd + h * s.head_dim);
                let kptr = kp.get().add(b * s.kv_len * hd + h * s.head_dim);
                let vptr = vp.get().add(b * s.kv_len * hdv + h * s.value_dim);
                let optr = dst.get().add((b * s.q_len + q0) * hdv + h * s.value_dim);
                matmul(
                    rows,
                    s.kv_len,
                    s.head_dim,
                    scores.as_mut_ptr(),
                    s.kv_len,
                    Operand::rows(qptr, hd),
                    Operand::transposed(kptr, hd),
                    false,
                    1,
                );
                let mut inv = [0.0f32; 256];
                for (r, row) in scores.chunks_exact_mut(s.kv_len).enumerate() {
                    let n = s.visible(q0 + r);
                    let m = row_max(&row[..n]);
                    let sum = softmax_exp(&mut row[..n], m, s.scale);
                    row[n..].fill(0.0);
                    inv[r] = 1.0 / sum;
                    if let Some(l) = lse_ptr {
                        *l.get().add((b * s.heads + h) * s.q_len + q0 + r) = m * s.scale + sum.ln();
                    }
                }
                matmul(
                    rows,
                    s.value_dim,
                    s.kv_len,
                    optr,
                    hdv,
                    Operand::rows(scores.as_ptr(), s.kv_len),
                    Operand::rows(vptr, hdv),
                    false,
                    1,
                );
                for (r, f) in inv.iter().enumerate().take(rows) {
                    scale_slice(
                        std::slice::from_raw_parts_mut(optr.add(r * hdv), s.value_dim),
                        *f,
                    );
                }
            }
        });
    });
    out
}

multiversion! {
    /// `p ← exp(s·scale − lse)` over the first `n` entries, 0 after them.
    fn probs_from_lse(row: &mut [f32], n: usize, scale: f32, lse: f32) {
        let (live, dead) = row.split_at_mut(n);
        live.iter_mut().for_each(|v| *v = exp(*v * scale - lse));
        dead.fill(0.0);
    }
}

multiversion! {
    /// `dS = P ∘ (dP − δ)·scale` in place over `dp`.
    fn softmax_grad(p: &[f32], dp: &mut [f32], delta: f32, scale: f32) {
        dp.iter_mut().zip(p).for_each(|(d, pv)| *d = pv * (*d - delta) * scale);
    }
}

multiversion! {
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0.0f32; 8];
        let mut ca = a.chunks_exact(8);
        let mut cb = b.chunks_exact(8);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..8 {
                lanes[l] += x[l] * y[l];
            }
        }
        let mut s: f32 = lanes.iter().sum();
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            s += x * y;
        }
        s
    }
}

/// Gradients of [`attention_with_lse`] for the output gradient `dout [B, Lq, H·Dv]`, from the inputs,
/// the forward output `out` and its `lse`: `(dq, dk, dv)` in the inputs' layouts. The probabilities
/// are recomputed block by block (`P = exp(S·scale − lse)`), never stored: `dV = Pᵀ·dO`,
/// `dP = dO·Vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`, `dQ = dS·K·scale`, `dK = dSᵀ·Q·scale`. One task per
/// (batch, head), which owns that head's columns of `dq`, `dk` and `dv`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    s: &AttentionSpec,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    s.check(q.len(), k.len(), v.len());
    let (hd, hdv) = (s.heads * s.head_dim, s.heads * s.value_dim);
    assert_eq!(
        out.len(),
        s.batch * s.q_len * hdv,
        "attention_backward: output size"
    );
    assert_eq!(dout.len(), out.len(), "attention_backward: gradient size");
    assert_eq!(
        lse.len(),
        s.batch * s.heads * s.q_len,
        "attention_backward: lse size"
    );
    let mut dq = output(q.len());
    let mut dk = output(k.len());
    let mut dv = output(v.len());
    let block = s.block();
    let ptrs = [
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    ];
    let ins = [
        SendPtr(q.as_ptr() as *mut f32),
        SendPtr(k.as_ptr() as *mut f32),
        SendPtr(v.as_ptr() as *mut f32),
        SendPtr(out.as_ptr() as *mut f32),
        SendPtr(dout.as_ptr() as *mut f32),
    ];
    (0..s.batch * s.heads).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let [dqp, dkp, dvp] = ptrs;
        let [qp, kp, vp, op, dop] = ins;
        with_scratch(2 * block * s.kv_len, |buf| {
            let (p, dp) = buf.split_at_mut(block * s.kv_len);
            // SAFETY: reads stay inside the inputs (sizes checked); writes go to this (batch, head)'s
            // column block of dq (rows of batch b), dk and dv, which no other task touches; `p`, `dp`
            // are this thread's scratch.
            unsafe {
                let qb = qp.get().add(b * s.q_len * hd + h * s.head_dim);
                let kb = kp.get().add(b * s.kv_len * hd + h * s.head_dim);
                let vb = vp.get().add(b * s.kv_len * hdv + h * s.value_dim);
                let ob = op.get().add(b * s.q_len * hdv + h * s.value_dim);
                let dob = dop.get().add(b * s.q_len * hdv + h * s.value_dim);
                let dqb = dqp.get().add(b * s.q_len * hd + h * s.head_dim);
                let dkb = dkp.get().add(b * s.kv_len * hd + h * s.head_dim);
                let dvb = dvp.get().add(b * s.kv_len * hdv + h * s.value_dim);
                let mut q0 = 0;
                while q0 < s.q_len {
                    let rows = block.min(s.q_len - q0);
                    let (p, dp) = (&mut p[..rows * s.kv_len], &mut dp[..rows * s.kv_len]);
                    // S = Q·Kᵀ, then P from the saved log-sum-exp.
                    matmul(
                        rows,
                        s.kv_len,
                        s.head_dim,
                        p.as_mut_ptr(),
                        s.kv_len,
                        Operand::rows(qb.add(q0 * hd), hd),
                        Operand::transposed(kb, hd),
                        false,
                        1,
                    );
                    for (r, row) in p.chunks_exact_mut(s.kv_len).enumerate() {
                        let i = q0 + r;
                        probs_from_lse(
                            row,
                            s.visible(i),
                            s.scale,
                            lse[(b * s.heads + h) * s.q_len + i],
                        );
                    }
                    // dV (+)= Pᵀ·dO.
                    matmul(
                        s.kv_len,
                        s.value_dim,
                        rows,
                        dvb,
                        hdv,
                        Operand::transposed(p.as_ptr(), s.kv_len),
                        Operand::rows(dob.add(q0 * hdv), hdv),
                        q0 > 0,
                        1,
                    );
                    // dP = dO·Vᵀ, then dS = P ∘ (dP − δ)·scale.
                    matmul(
                        rows,
                        s.kv_len,
                        s.value_dim,
                        dp.as_mut_ptr(),
                        s.kv_len,
                        Operand::rows(dob.add(q0 * hdv), hdv),
                        Operand::transposed(vb, hdv),
                        false,
                        1,
                    );
                    for (r, (prow, dprow)) in p
                        .chunks_exact(s.kv_len)
                        .zip(dp.chunks_exact_mut(s.kv_len))
                        .enumerate()
                    {
                        let i = q0 + r;
                        let o = std::slice::from_raw_parts(ob.add(i * hdv), s.value_dim);
                        let g = std::slice::from_raw_parts(dob.add(i * hdv), s.value_dim);
                        softmax_grad(prow, dprow, dot(o, g), s.scale);
                    }
                    // dQ = dS·K, dK (+)= dSᵀ·Q.
                    matmul(
                        rows,
                        s.head_dim,
                        s.kv_len,
                        dqb.add(q0 * hd),
                        hd,
                        Operand::rows(dp.as_ptr(), s.kv_len),
                        Operand::rows(kb, hd),
                        false,
                        1,
                    );
                    matmul(
                        s.kv_len,
                        s.head_dim,
                        rows,
                        dkb,
                        hd,
                        Operand::transposed(dp.as_ptr(), s.kv_len),
                        Operand::rows(qb.add(q0 * hd), hd),
                        q0 > 0,
                        1,
                    );
                    q0 += rows;
                }
            }
        });
    });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(7);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    fn reference(q: &[f32], k: &[f32], v: &[f32], s: &AttentionSpec) -> Vec<f32> {
        let visible = |i: usize| if s.causal { i + 1 } else { s.kv_len };
        let (hd, hdv) = (s.heads * s.head_dim, s.heads * s.value_dim);
        let mut out = vec![0.0f32; s.batch * s.q_len * hdv];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.q_len {
                    let scores: Vec<f64> = (0..visible(i))
                        .map(|j| {
                            (0..s.head_dim)
                                .map(|d| {
                                    q[(b * s.q_len + i) * hd + h * s.head_dim + d] as f64
                                        * k[(b * s.kv_len + j) * hd + h * s.head_dim + d] as f64
                                })
                                .sum::<f64>()
                                * s.scale as f64
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..s.value_dim {
                        let acc: f64 = (0..visible(i))
                            .map(|j| {
                                e[j] * v[(b * s.kv_len + j) * hdv + h * s.value_dim + d] as f64
                            })
                            .sum();
                        out[(b * s.q_len + i) * hdv + h * s.value_dim + d] = (acc / z) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_materialised_softmax() {
        for (i, &(batch, heads, q_len, kv_len, head_dim, value_dim)) in [
            (2, 3, 17, 17, 8, 8),
            (1, 2, 300, 5, 4, 6),
            (2, 1, 5, 1100, 16, 16), // several key blocks per row budget, one query block
            (1, 2, 600, 600, 8, 8),  // several query blocks
            (1, 1, 1, 1, 1, 1),
        ]
        .iter()
        .enumerate()
        {
            let s = AttentionSpec {
                batch,
                heads,
                q_len,
                kv_len,
                head_dim,
                value_dim,
                scale: (head_dim as f32).powf(-0.5),
                causal: false,
            };
            let q = data(batch * q_len * heads * head_dim, i as u32);
            let k = data(batch * kv_len * heads * head_dim, 10 + i as u32);
            let v = data(batch * kv_len * heads * value_dim, 20 + i as u32);
            let got = attention(&q, &k, &v, &s);
            let want = reference(&q, &k, &v, &s);
            blipd_testkit::assert_close_slice(&format!("attention {s:?}"), &got, &want, 2e-5);
        }
    }

    #[test]
    fn causal_and_gradients() {
        for (i, &(batch, heads, len, head_dim, value_dim, causal)) in [
            (2, 2, 9, 4, 3, false),
            (1, 3, 12, 5, 5, true),
            (1, 1, 600, 4, 4, true), // several query blocks
        ]
        .iter()
        .enumerate()
        {
            let s = AttentionSpec {
                batch,
                heads,
                q_len: len,
                kv_len: len,
                head_dim,
                value_dim,
                scale: 0.7,
                causal,
            };
            let q = data(batch * len * heads * head_dim, 40 + i as u32);
            let k = data(batch * len * heads * head_dim, 50 + i as u32);
            let v = data(batch * len * heads * value_dim, 60 + i as u32);
            let dout = data(batch * len * heads * value_dim, 70 + i as u32);
            let mut lse = vec![0.0f32; batch * heads * len];
            let out = attention_with_lse(&q, &k, &v, &s, Some(&mut lse));
            blipd_testkit::assert_close_slice(
                &format!("forward {s:?}"),
                &out,
                &reference(&q, &k, &v, &s),
                2e-5,
            );
            let (dq, dk, dv) = attention_backward(&q, &k, &v, &out, &lse, &dout, &s);
            // Directional derivatives of L = ⟨dout, attention(q, k, v)⟩ (central differences, f64
            // reference forward).
            let l = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
                reference(q, k, v, &s)
                    .iter()
                    .zip(&dout)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum()
            };
            let eps = 1e-3f32;
            let shift = |x: &[f32], u: &[f32], e: f32| -> Vec<f32> {
                x.iter().zip(u).map(|(a, b)| a + e * b).collect()
            };
            for (name, which) in [("dq", 0), ("dk", 1), ("dv", 2)] {
                let base = [&q, &k, &v][which];
                let grad = [&dq, &dk, &dv][which];
                let u = data(base.len(), 80 + which as u32);
                let (plus, minus) = (shift(base, &u, eps), shift(base, &u, -eps));
                let f = |x: &[f32]| match which {
                    0 => l(x, &k, &v),
                    1 => l(&q, x, &v),
                    _ => l(&q, &k, x),
                };
                let num = (f(&plus) - f(&minus)) / (2.0 * eps as f64);
                let ana: f64 = grad
                    .iter()
                    .zip(&u)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!(
                    (num - ana).abs() < 3e-3 * num.abs().max(1.0),
                    "{name} {s:?}: numeric {num} vs analytic {ana}"
                );
            }
        }
    }
}
