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

/// A strided matrix inside a slice, its extent checked against the slice when made: element
/// `(i, j)` is `data[offset + i·rs + j·cs]`. A safe way to hand [`matmul`] a transposed or strided
/// operand (a transposed or strided weight, e.g.) without copying it.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    offset: usize,
    pub rows: usize,
    pub cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// Panics when an element would fall outside `data`.
    pub fn new(
        data: &'a [f32],
        offset: usize,
        [rows, cols]: [usize; 2],
        [rs, cs]: [usize; 2],
    ) -> Self {
        if rows > 0 && cols > 0 {
            let last = offset + (rows - 1) * rs + (cols - 1) * cs;
            assert!(
                last < data.len(),
                "MatRef: a {rows}×{cols} view with strides ({rs}, {cs}) from {offset} overruns {} values",
                data.len()
            );
        }
        Self {
            data,
            offset,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// A contiguous row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, 0, [rows, cols], [cols, 1])
    }

    /// The transpose (a view: strides swapped).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// The operand for [`matmul`]; valid while `data` is borrowed.
    pub fn operand(&self) -> Operand {
        Operand {
            ptr: self.data[self.offset..].as_ptr(),
            rs: self.rs as isize,
            cs: self.cs as isize,
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

/// `out (rows × d_out) = x (rows × d_in) · w (d_in × d_out) [+ bias]`, `x` and `out` row-major, `w`
/// any strides; what a `Linear` computes (Burn's weight is `[in, out]`).
pub fn linear(x: &[f32], rows: usize, w: MatRef<'_>, bias: Option<&[f32]>) -> Vec<f32> {
    let _timer = super::profile::Timer::start(2);
    let (d_in, d_out) = (w.rows, w.cols);
    assert_eq!(x.len(), rows * d_in, "linear: input size");
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
            w.operand(),
            bias.is_some(),
            super::threads(),
        );
    }
    out
}

/// Gradients of [`linear`] for the output gradient `dy (rows × d_out)`: `dx = dy · wᵀ`,
/// `dw = xᵀ · dy`, `db = Σ_rows dy`, each computed only when asked for.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    rows: usize,
    w: MatRef<'_>,
    dy: &[f32],
    [want_dx, want_dw, want_db]: [bool; 3],
) -> [Option<Vec<f32>>; 3] {
    let (d_in, d_out) = (w.rows, w.cols);
    assert_eq!(x.len(), rows * d_in, "linear_backward: input size");
    assert_eq!(dy.len(), rows * d_out, "linear_backward: gradient size");
    let threads = super::threads();
    let dx = want_dx.then(|| {
        let mut dx = super::output(rows * d_in);
        // SAFETY: dx is rows × d_in; dy rows × d_out; wᵀ a checked view (d_out × d_in).
        unsafe {
            matmul(
                rows,
                d_in,
                d_out,
                dx.as_mut_ptr(),
                d_in,
                Operand::rows(dy.as_ptr(), d_out),
                w.t().operand(),
                false,
                threads,
            )
        };
        dx
    });
    let dw = want_dw.then(|| {
        let mut dw = super::output(d_in * d_out);
        // SAFETY: dw is d_in × d_out; xᵀ read from x (rows × d_in); dy rows × d_out.
        unsafe {
            matmul(
                d_in,
                d_out,
                rows,
                dw.as_mut_ptr(),
                d_out,
                Operand::transposed(x.as_ptr(), d_in),
                Operand::rows(dy.as_ptr(), d_out),
                false,
                threads,
            )
        };
        dw
    });
    let db = want_db.then(|| column_sums(dy, d_out));
    [dx, dw, db]
}

super::math::multiversion! {
    fn add_into(acc: &mut [f32], x: &[f32]) {
        acc.iter_mut().zip(x).for_each(|(a, v)| *a += v);
    }
}

/// Sums of the columns of a row-major matrix with `cols` columns (f32 accumulation per row block,
/// f64 across blocks).
pub fn column_sums(m: &[f32], cols: usize) -> Vec<f32> {
    const BLOCK: usize = 64;
    let mut total = vec![0.0f64; cols];
    let mut acc = vec![0.0f32; cols];
    for block in m.chunks(cols * BLOCK) {
        acc.fill(0.0);
        for row in block.chunks_exact(cols) {
            add_into(&mut acc, row);
        }
        for (t, a) in total.iter_mut().zip(&acc) {
            *t += *a as f64;
        }
    }
    total.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(3);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn linear_and_its_gradients_match_loops() {
        let (rows, d_in, d_out) = (7, 5, 6);
        let x = data(rows * d_in, 1);
        let w = data(d_in * d_out, 2);
        let b = data(d_out, 3);
        let dy = data(rows * d_out, 4);
        let wm = MatRef::row_major(&w, d_in, d_out);
        let y = linear(&x, rows, wm, Some(&b));
        let mut want = vec![0.0f32; rows * d_out];
        for r in 0..rows {
            for o in 0..d_out {
                want[r * d_out + o] = b[o]
                    + (0..d_in)
                        .map(|i| x[r * d_in + i] * w[i * d_out + o])
                        .sum::<f32>();
            }
        }
        blipd_testkit::assert_close_slice("linear", &y, &want, 1e-6);
        let [dx, dw, db] = linear_backward(&x, rows, wm, &dy, [true; 3]);
        // The same weight stored transposed ([out, in], as in the files) and viewed.
        let mut wt = vec![0.0f32; d_in * d_out];
        for i in 0..d_in {
            for o in 0..d_out {
                wt[o * d_in + i] = w[i * d_out + o];
            }
        }
        let view = MatRef::row_major(&wt, d_out, d_in).t();
        blipd_testkit::assert_close_slice(
            "linear, transposed view",
            &linear(&x, rows, view, Some(&b)),
            &y,
            1e-6,
        );
        let [dx2, _, _] = linear_backward(&x, rows, view, &dy, [true, false, false]);
        let mut wdx = vec![0.0f32; rows * d_in];
        let mut wdw = vec![0.0f32; d_in * d_out];
        let mut wdb = vec![0.0f32; d_out];
        for r in 0..rows {
            for o in 0..d_out {
                let g = dy[r * d_out + o];
                wdb[o] += g;
                for i in 0..d_in {
                    wdx[r * d_in + i] += g * w[i * d_out + o];
                    wdw[i * d_out + o] += g * x[r * d_in + i];
                }
            }
        }
        let dx = dx.unwrap();
        blipd_testkit::assert_close_slice("dx", &dx, &wdx, 1e-6);
        blipd_testkit::assert_close_slice("dx, transposed view", &dx2.unwrap(), &dx, 1e-6);
        blipd_testkit::assert_close_slice("dw", &dw.unwrap(), &wdw, 1e-6);
        blipd_testkit::assert_close_slice("db", &db.unwrap(), &wdb, 1e-6);
        let sums = column_sums(&data(300 * 3, 9), 3);
        assert_eq!(sums.len(), 3);
    }
}
