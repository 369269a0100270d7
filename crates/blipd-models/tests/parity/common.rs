#![allow(dead_code)]
use std::path::PathBuf;

use blipd_models::weights::StateDict;
use burn::prelude::*;

pub type B = burn::backend::NdArray<f32>;

pub fn device() -> burn::backend::ndarray::NdArrayDevice {
    Default::default()
}

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

/// Assert `max |actual - expected| <= tol`, printing both values at the worst element on failure.
pub fn assert_close<const D: usize>(
    what: &str,
    actual: Tensor<B, D>,
    expected: Tensor<B, D>,
    tol: f32,
) -> f32 {
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "{what}: shape differs (actual vs expected)"
    );
    let a = actual.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    let e = expected
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap();
    let mut worst = (0usize, 0f32);
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        let d = (x - y).abs();
        if d > worst.1 || d.is_nan() {
            worst = (i, d);
            if d.is_nan() {
                break;
            }
        }
    }
    let (i, err) = worst;
    println!(
        "parity {what}: max-abs error {err:.3e} (tolerance {tol:.0e}, {} values)",
        a.len()
    );
    assert!(
        err <= tol,
        "{what}: max-abs error {err:e} > {tol:e} at flat index {i}: ours {} vs reference {}",
        a[i],
        e[i]
    );
    err
}
