//! One call into the `gemm` crate (the GEMM burn-flex uses; 170–190 GFLOP/s on two Zen 3 cores for
//! the shapes of SD's layers), with the strides named, so that the kernels read transposed and
//! strided operands in place instead of copying them.

/// A strided matrix operand: element `(i, j)` is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: *const f32,
    /// Distance between rows.
    pub rs: isize,
    /// Distance between columns.
    pub cs: isize,
}

impl Operand {
    /// A row-major `rows × cols` block whose rows are `ld` apart.
    pub fn rows(ptr: *const f32, ld: usize) -> Self {
        Self {
            ptr,
            rs: ld as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `ld` apart: element `(i, j)` is the stored
    /// `(j, i)`.
    pub fn transposed(ptr: *const f32, ld: usize) -> Self {
        Self {
            ptr,
            rs: 1,
            cs: ld as isize,
        }
    }
}

/// `dst (m × n) = [dst +] a (m × k) · b (k × n)`, `dst` row-major with rows `ld_dst` apart;
/// `accumulate` adds to what `dst` holds (otherwise it is only written). Splits over `threads`.
///
/// # Safety
/// Every element the strides address must be inside live allocations: `m × n` of `dst` (not
/// aliased by `a` or `b`), `m × k` of `a`, `k × n` of `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld_dst: usize,
    a: Operand,
    b: Operand,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller. gemm's argument order is (column stride, row stride).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ld_dst as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Fills each of the `rows` rows of `dst` (length `cols`, `ld` apart) with `bias[row]`.
pub fn fill_rows(dst: &mut [f32], rows: usize, cols: usize, ld: usize, bias: &[f32]) {
    for (r, b) in bias.iter().enumerate().take(rows) {
        dst[r * ld..r * ld + cols].fill(*b);
    }
}

/// Fills every row of a row-major `rows × bias.len()` block with `bias`.
pub fn fill_cols(dst: &mut [f32], bias: &[f32]) {
    for row in dst.chunks_exact_mut(bias.len()) {
        row.copy_from_slice(bias);
    }
}

/// `out (rows × d_out) = x (rows × d_in) · w (d_in × d_out) [+ bias]`, all row-major; what a
/// `Linear` computes (Burn stores the weight `[in, out]`).
pub fn linear(
    x: &[f32],
    rows: usize,
    d_in: usize,
    w: &[f32],
    d_out: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(x.len(), rows * d_in, "linear: input size");
    assert_eq!(w.len(), d_in * d_out, "linear: weight size");
    let mut out = super::output(rows * d_out);
    if let Some(b) = bias {
        assert_eq!(b.len(), d_out, "linear: bias size");
        fill_cols(&mut out, b);
    }
    // SAFETY: the shapes were checked against the slices above.
    unsafe {
        matmul(
            rows,
            d_out,
            d_in,
            out.as_mut_ptr(),
            d_out,
            Operand::rows(x.as_ptr(), d_in),
            Operand::rows(w.as_ptr(), d_out),
            bias.is_some(),
            super::threads(),
        );
    }
    out
}
