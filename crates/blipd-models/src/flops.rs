//! A running count of the floating-point work done by the products of every network.
//!
//! Each linear layer, convolution, matrix product and attention kernel of the networks goes through
//! [`crate::amp`]; those functions add their work here, from the shapes, as it is executed (so the
//! count is what ran: classifier-free guidance's doubled batch, the sizes asked for, the layers a
//! config has). Convention of `../shared/reference/performance.md` §1: one multiply-add is 2 FLOPs;
//! norms, activations, softmax, element-wise work and biases are not counted (a few per cent).
//! Backward passes are not seen here: a training step's count is its forward work.

use std::sync::atomic::{AtomicU64, Ordering};

static FLOPS: AtomicU64 = AtomicU64::new(0);

/// How the count is made, for reports.
pub const CONVENTION: &str = "products only (linear, convolution, matmul, attention QKᵀ and PV), \
     2 FLOPs per multiply-add, counted from the shapes as executed; norms, activations, softmax and \
     element-wise work not counted";

/// FLOPs counted since the process started (or since the last [`take`]).
pub fn total() -> u64 {
    FLOPS.load(Ordering::Relaxed)
}

/// The FLOPs counted so far, resetting the count to 0.
pub fn take() -> u64 {
    FLOPS.swap(0, Ordering::Relaxed)
}

pub(crate) fn add(flops: u64) {
    FLOPS.fetch_add(flops, Ordering::Relaxed);
}

/// `x [.., in] · W [in, out]`.
pub(crate) fn linear(x_dims: &[usize], d_out: usize) {
    let (d_in, rows) = match x_dims.split_last() {
        Some((d_in, rest)) => (*d_in, rest.iter().product::<usize>()),
        None => return,
    };
    add(2 * (rows * d_in * d_out) as u64);
}

/// A convolution whose output is `[B, C_out, H, W]`, with a kernel `[C_out, C_in/groups, kh, kw]`.
pub(crate) fn conv2d(out_dims: [usize; 4], weight_dims: [usize; 4]) {
    let [b, c_out, h, w] = out_dims;
    let [_, c_in_per_group, kh, kw] = weight_dims;
    add(2 * (b * c_out * h * w * c_in_per_group * kh * kw) as u64);
}

/// `a [.., M, K] · b [.., K, N]` (leading dims broadcast).
pub(crate) fn matmul(a: &[usize], b: &[usize]) {
    let d = a.len();
    if d < 2 || b.len() != d {
        return;
    }
    let batch: usize = (0..d - 2).map(|i| a[i].max(b[i])).product();
    add(2 * (batch * a[d - 2] * a[d - 1] * b[d - 1]) as u64);
}

/// Attention of `q [B, H, Lq, D]` over `k [B, H, Lk, D]` with values of width `Dv`: QKᵀ and PV.
pub(crate) fn attention(q: [usize; 4], key_len: usize, value_dim: usize) {
    let [b, h, lq, d] = q;
    add(2 * (b * h * lq * key_len * (d + value_dim)) as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_shapes() {
        // Other tests run in parallel and add to the same counter: compare differences of a private
        // computation instead of the global total.
        let before = total();
        matmul(&[2, 3, 4], &[2, 4, 5]);
        linear(&[7, 10], 3);
        conv2d([1, 8, 4, 4], [8, 2, 3, 3]);
        attention([1, 2, 16, 8], 4, 8);
        let expected =
            2 * 2 * 3 * 4 * 5 + 2 * 7 * 10 * 3 + 2 * 8 * 16 * 2 * 9 + 2 * 2 * 16 * 4 * 16;
        assert!(total() - before >= expected as u64);
    }
}
