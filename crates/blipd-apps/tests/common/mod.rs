//! Helpers shared by the blipd-apps integration tests.

/// Max-abs difference of two equally long slices (`blipd_testkit::max_abs_diff`): a length mismatch, a
/// NaN or an infinity panics, so no tolerance accepts it.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    blipd_testkit::max_abs_diff(a, b) as f32
}
