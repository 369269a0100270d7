//! transformers `ViTModel` (DINO layout) parity (fixture: `scripts/reference/gen_dino.py`).

use blipd_models::dino::{DinoConfig, DinoVitModel};
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::common::{assert_close, device, fixture_dir, io, tensor, weights, B};

const TOL: f32 = 1e-4;

fn config() -> DinoConfig {
    DinoConfig::from_file(&fixture_dir("dino").join("config.json")).expect("fixture config")
}

fn model() -> DinoVitModel<B> {
    DinoVitModel::from_state_dict(&config(), weights("dino"), &device())
        .expect("load fixture weights")
}

#[test]
fn dino_parity() {
    assert_eq!(
        config(),
        DinoConfig::tiny(),
        "fixture config parses to DinoConfig::tiny()"
    );
    let m = model();
    let io = io("dino");

    let out = m.forward(tensor(&io, "pixel_values")).unwrap();
    assert_close(
        "dino last_hidden_state",
        out,
        tensor(&io, "last_hidden_state"),
        TOL,
    );

    // 48×40 input: 6×5 grid vs the 4×4 table → transformers' interpolate_pos_encoding.
    let out = m
        .forward_with(tensor(&io, "pixel_values_interp"), true)
        .unwrap();
    assert_close(
        "dino last_hidden_state (interpolated positions, 6×5 grid)",
        out,
        tensor(&io, "last_hidden_state_interp"),
        TOL,
    );
    // Without interpolation another size is an error (transformers raises too).
    assert!(m.forward(tensor(&io, "pixel_values_interp")).is_err());

    // The DINO embedding of the processed photo.
    let cls = m.cls_embedding(tensor(&io, "image_pixel_values")).unwrap();
    assert_close(
        "dino image_cls (last_hidden_state[:, 0])",
        cls,
        tensor(&io, "image_cls"),
        TOL,
    );
}

#[test]
fn dino_pooler_keys_are_dropped_and_round_trip() {
    // A ViTModel saved with its pooler (add_pooling_layer=True) loads: the pooler is unused.
    let mut sd = weights("dino");
    sd.insert(
        "pooler.dense.weight",
        TensorData::new(vec![0f32; 32 * 32], [32, 32]),
    );
    sd.insert("pooler.dense.bias", TensorData::new(vec![0f32; 32], [32]));
    let m = DinoVitModel::<B>::from_state_dict(&config(), sd, &device()).unwrap();

    // Any other stray key is an error naming it.
    let mut sd = weights("dino");
    sd.insert(
        "embeddings.mask_token",
        TensorData::new(vec![0f32; 32], [1, 1, 32]),
    );
    let err = DinoVitModel::<B>::from_state_dict(&config(), sd, &device())
        .expect_err("unexpected key must fail")
        .to_string();
    assert!(err.contains("mask_token"), "{err}");

    // Save in the transformers layout and reload: same outputs, same key set as the reference.
    let dir = std::env::temp_dir().join(format!("blipd-dino-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    m.save(&path).unwrap();
    let saved = blipd_models::weights::StateDict::read(&path).unwrap();
    let mut a: Vec<_> = saved.keys().cloned().collect();
    let mut b: Vec<_> = weights("dino").keys().cloned().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let m2 = DinoVitModel::<B>::from_state_dict(&config(), saved, &device()).unwrap();
    let io = io("dino");
    let x: Tensor<B, 4> = tensor(&io, "pixel_values");
    assert_close(
        "dino save → load",
        m2.forward(x.clone()).unwrap(),
        m.forward(x).unwrap(),
        0.0,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
