//! Helpers shared by the blipd-apps integration tests.

/// Max-abs difference of two equally long slices. A length mismatch panics; a NaN or infinity on
/// either side makes the result infinite, so no tolerance accepts it (a plain running maximum
/// would skip a NaN).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        if !(x.is_finite() && y.is_finite()) {
            return f32::INFINITY;
        }
        worst = worst.max((x - y).abs());
    }
    worst
}

#[test]
fn max_abs_diff_fails_on_nan_and_inf() {
    assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
    assert_eq!(max_abs_diff(&[f32::NAN, 2.0], &[1.0, 2.0]), f32::INFINITY);
    assert_eq!(max_abs_diff(&[1.0], &[f32::INFINITY]), f32::INFINITY);
    assert!(std::panic::catch_unwind(|| max_abs_diff(&[1.0], &[1.0, 2.0])).is_err());
}
