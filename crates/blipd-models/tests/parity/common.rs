#![allow(dead_code)]
use std::path::PathBuf;

use blipd_models::weights::StateDict;
use burn::prelude::*;

pub use blipd_testkit::device;
pub type B = blipd_testkit::Cpu;

/// Folder of one network's fixtures.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The `io.safetensors` of a fixture (inputs and reference outputs).
pub fn io(name: &str) -> StateDict {
    let p = fixture_dir(name).join("io.safetensors");
    StateDict::read(&p).unwrap_or_else(|e| {
        panic!("missing fixture {p:?} ({e}); regenerate with scripts/reference/generate.sh")
    })
}

/// The reference weights of a fixture, in the reference key layout.
pub fn weights(name: &str) -> StateDict {
    let p = fixture_dir(name).join("weights.safetensors");
    StateDict::read(&p).unwrap_or_else(|e| {
        panic!("missing fixture {p:?} ({e}); regenerate with scripts/reference/generate.sh")
    })
}

pub fn tensor<const D: usize>(sd: &StateDict, name: &str) -> Tensor<B, D> {
    let data = sd.data(name).unwrap().convert::<f32>();
    Tensor::from_data(data, &device())
}

pub fn int_tensor<const D: usize>(sd: &StateDict, name: &str) -> Tensor<B, D, Int> {
    let data = sd.data(name).unwrap().convert::<i64>();
    Tensor::from_data(data, &device())
}

/// Assert `max |actual - expected| <= tol` (NaN, infinity and shape mismatches fail), printing both values
/// at the worst element on failure (`blipd_testkit::assert_close`).
pub fn assert_close<const D: usize>(
    what: &str,
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
    tol: f32,
) -> f32 {
    blipd_testkit::assert_close(&format!("parity {what}"), actual, expected, tol as f64) as f32
}
