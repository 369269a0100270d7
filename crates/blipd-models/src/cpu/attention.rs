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
use super::math::{row_max, scale_slice, softmax_exp};
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
}

/// `softmax(q·kᵀ·scale)·v` per head; layouts in the module docs. Returns `[B, Lq, H·Dv]`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttentionSpec) -> Vec<f32> {
    let (hd, hdv) = (s.heads * s.head_dim, s.heads * s.value_dim);
    assert_eq!(q.len(), s.batch * s.q_len * hd, "attention: query size");
    assert_eq!(k.len(), s.batch * s.kv_len * hd, "attention: key size");
    assert_eq!(v.len(), s.batch * s.kv_len * hdv, "attention: value size");
    assert!(s.kv_len > 0, "attention: no keys");
    assert!(s.scale > 0.0, "attention: the scale must be positive");
    let mut out = output(s.batch * s.q_len * hdv);
    if out.is_empty() {
        return out;
    }
    let block = (SCORE_FLOATS / s.kv_len).clamp(8, 256).min(s.q_len);
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
            // SAFETY: every pointer below addresses inside `q`, `k`, `v` (sizes checked above) or
            // inside this task's rows q0..q0+rows × columns h·Dv..(h+1)·Dv of `out`, which no other
            // task writes; `scores` is this thread's scratch of rows × Lk.
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
                    let m = row_max(row);
                    inv[r] = 1.0 / softmax_exp(row, m, s.scale);
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
        let (hd, hdv) = (s.heads * s.head_dim, s.heads * s.value_dim);
        let mut out = vec![0.0f32; s.batch * s.q_len * hdv];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.q_len {
                    let scores: Vec<f64> = (0..s.kv_len)
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
                        let acc: f64 = (0..s.kv_len)
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
            };
            let q = data(batch * q_len * heads * head_dim, i as u32);
            let k = data(batch * kv_len * heads * head_dim, 10 + i as u32);
            let v = data(batch * kv_len * heads * value_dim, 20 + i as u32);
            let got = attention(&q, &k, &v, &s);
            let want = reference(&q, &k, &v, &s);
            blipd_testkit::assert_close_slice(&format!("attention {s:?}"), &got, &want, 2e-5);
        }
    }
}
