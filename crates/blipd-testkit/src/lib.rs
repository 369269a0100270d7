//! Test support shared by every blipd crate (a dev-dependency only; nothing ships it).
//!
//! * [`Cpu`] / [`CpuTrain`]: the CPU backend the suite runs on. It is burn-flex, the backend the `blipd`
//!   binary uses by default, so the parity suite checks what users run.
//! * [`max_abs_diff`] / [`assert_close`]: comparisons that fail on NaN, on infinity and on a length or shape
//!   mismatch, and print both values at the worst element. A running `fold(0.0, f32::max)` would skip a NaN
//!   (`0.0f32.max(NaN) == 0.0`), so a diverged loss would pass a tolerance: never write one.

use burn::prelude::*;

/// The suite's CPU backend (burn-flex: multi-threaded GEMM, bf16 kernels; the binary's default).
pub type Cpu = burn::backend::Flex;
/// [`Cpu`] with autodiff, for training tests.
pub type CpuTrain = burn::backend::Autodiff<Cpu>;

/// The CPU device.
pub fn device() -> burn::tensor::Device<Cpu> {
    Default::default()
}

/// Serialises the tests of one binary that seed or draw from the backend's random generator: burn-flex's (like
/// burn-ndarray's) is process-global, so two training tests running at once would interleave their draws and
/// neither would be reproducible. Hold the guard for the whole test.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why two value lists cannot be compared, or the first non-finite value met.
#[derive(Debug, Clone, PartialEq)]
pub enum Mismatch {
    Length {
        actual: usize,
        expected: usize,
    },
    NonFinite {
        index: usize,
        actual: f64,
        expected: f64,
    },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Length { actual, expected } => {
                write!(f, "lengths differ: {actual} values vs {expected} expected")
            }
            Mismatch::NonFinite {
                index,
                actual,
                expected,
            } => write!(
                f,
                "non-finite value at flat index {index}: actual {actual} vs expected {expected}"
            ),
        }
    }
}

/// Largest `|a - b|` and its flat index, or why there is none (length mismatch, NaN or infinity on
/// either side). Empty inputs give `(0, 0.0)`.
pub fn max_abs_diff_at<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> Result<(usize, f64), Mismatch> {
    if a.len() != b.len() {
        return Err(Mismatch::Length {
            actual: a.len(),
            expected: b.len(),
        });
    }
    let mut worst = (0usize, 0.0f64);
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let (x, y): (f64, f64) = (x.into(), y.into());
        if !(x.is_finite() && y.is_finite()) {
            return Err(Mismatch::NonFinite {
                index: i,
                actual: x,
                expected: y,
            });
        }
        let d = (x - y).abs();
        if d > worst.1 {
            worst = (i, d);
        }
    }
    Ok(worst)
}

/// Largest `|a - b|`; panics on a length mismatch, on NaN and on infinity.
pub fn max_abs_diff<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    match max_abs_diff_at(a, b) {
        Ok((_, d)) => d,
        Err(e) => panic!("max_abs_diff: {e}"),
    }
}

/// Largest `|a - b| / max(|b|, floor)` (relative to the expected side); panics on a length mismatch, on
/// NaN and on infinity.
pub fn max_rel_diff<T: Copy + Into<f64>>(a: &[T], b: &[T], floor: f64) -> f64 {
    if let Err(e) = max_abs_diff_at(a, b) {
        panic!("max_rel_diff: {e}");
    }
    a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| {
        let (x, y): (f64, f64) = (x.into(), y.into());
        m.max((x - y).abs() / y.abs().max(floor))
    })
}

/// Asserts `max |actual - expected| <= tol` over two value lists; prints the error and, on failure, both
/// values at the worst element. Returns the error.
pub fn assert_close_slice<T: Copy + Into<f64>>(
    what: &str,
    actual: &[T],
    expected: &[T],
    tol: f64,
) -> f64 {
    let (i, err) = match max_abs_diff_at(actual, expected) {
        Ok(w) => w,
        Err(e) => panic!("{what}: {e}"),
    };
    println!(
        "{what}: max-abs error {err:.3e} (tolerance {tol:.0e}, {} values)",
        actual.len()
    );
    assert!(
        err <= tol,
        "{what}: max-abs error {err:e} > {tol:e} at flat index {i}: actual {} vs expected {}",
        actual[i].into(),
        expected[i].into()
    );
    err
}

/// Float values of a tensor, as `f32`.
pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("tensor data converts to f32")
}

/// Asserts two tensors have the same shape and `max |actual - expected| <= tol` (see
/// [`assert_close_slice`]). The tensors may live on different backends.
pub fn assert_close<B1: Backend, B2: Backend, const D: usize>(
    what: &str,
    actual: Tensor<B1, D>,
    expected: Tensor<B2, D>,
    tol: f64,
) -> f64 {
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "{what}: shapes differ (actual vs expected)"
    );
    assert_close_slice(what, &values(actual), &values(expected), tol)
}

/// Copies the folder `from` into `to`, recursively (fixture folders into a test's temporary folder).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_abs_diff_fails_on_nan_inf_and_length() {
        assert_eq!(max_abs_diff(&[1.0f32, 2.0], &[1.5, 2.0]), 0.5);
        assert_eq!(max_abs_diff_at(&[1.0f32, 3.0], &[1.0, 2.0]), Ok((1, 1.0)));
        assert!(matches!(
            max_abs_diff_at(&[f32::NAN, 2.0], &[1.0, 2.0]),
            Err(Mismatch::NonFinite { index: 0, .. })
        ));
        assert!(max_abs_diff_at(&[1.0f32], &[f32::INFINITY]).is_err());
        assert_eq!(
            max_abs_diff_at(&[1.0f32], &[1.0, 2.0]),
            Err(Mismatch::Length {
                actual: 1,
                expected: 2
            })
        );
        assert!(std::panic::catch_unwind(|| max_abs_diff(&[f32::NAN], &[0.0f32])).is_err());
        assert_eq!(max_rel_diff(&[1.0f64, 3.0], &[2.0, 3.0], 1e-12), 0.5);
        assert!(std::panic::catch_unwind(|| max_rel_diff(&[f64::NAN], &[1.0f64], 1e-12)).is_err());
    }

    #[test]
    fn assert_close_fails_beyond_tolerance_and_on_nan() {
        assert_close_slice("ok", &[1.0f32, 2.0], &[1.0, 2.0 + 1e-6], 1e-5);
        assert!(
            std::panic::catch_unwind(|| assert_close_slice("far", &[1.0f32], &[2.0], 1e-3))
                .is_err()
        );
        assert!(std::panic::catch_unwind(|| assert_close_slice(
            "nan",
            &[f32::NAN],
            &[0.0f32],
            1e9
        ))
        .is_err());
        let d = device();
        let a = Tensor::<Cpu, 2>::from_floats([[1.0, 2.0]], &d);
        let b = Tensor::<Cpu, 2>::from_floats([[1.0, 2.5]], &d);
        assert!(
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| assert_close(
                "t",
                a.clone(),
                b.clone(),
                0.1
            )))
            .is_err()
        );
        assert_eq!(assert_close("t", a, b, 0.5), 0.5);
        let c = Tensor::<Cpu, 2>::from_floats([[1.0], [2.0]], &d);
        let e = Tensor::<Cpu, 2>::from_floats([[1.0, 2.0]], &d);
        assert!(
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| assert_close(
                "shape", c, e, 1.0
            )))
            .is_err()
        );
    }
}
