//! transformers `CLIPModel` parity (fixture: `scripts/reference/gen_clip.py`).

use blipd_models::clip::{ClipConfig, ClipModel};
use blipd_models::weights::StateDict;
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::common::{assert_close, device, fixture_dir, int_tensor, io, tensor, weights, B};

const TOL: f32 = 1e-4;

fn config() -> ClipConfig {
    ClipConfig::from_file(&fixture_dir("clip").join("config.json")).expect("fixture config")
}

fn model() -> ClipModel<B> {
    ClipModel::from_state_dict(&config(), weights("clip"), &device()).expect("load fixture weights")
}

#[test]
fn clip_parity() {
    assert_eq!(
        config(),
        ClipConfig::tiny(),
        "fixture config parses to ClipConfig::tiny()"
    );
    let m = model();
    let io = io("clip");
    let ids = int_tensor::<2>(&io, "input_ids");
    let mask = tensor::<2>(&io, "attention_mask");

    let tf = m.text_features(ids.clone(), Some(mask.clone())).unwrap();
    assert_close("clip text_features", tf, tensor(&io, "text_features"), TOL);
    // The padding mask does not change the EOS row (causal mask), as in transformers.
    let te = m.text_embeds(ids.clone(), None).unwrap();
    assert_close(
        "clip text_embeds (no mask)",
        te.clone(),
        tensor(&io, "text_embeds"),
        TOL,
    );

    let x: Tensor<B, 4> = tensor(&io, "pixel_values");
    let imf = m.image_features(x.clone()).unwrap();
    assert_close(
        "clip image_features",
        imf,
        tensor(&io, "image_features"),
        TOL,
    );
    let ie = m.image_embeds(x).unwrap();
    assert_close(
        "clip image_embeds",
        ie.clone(),
        tensor(&io, "image_embeds"),
        TOL,
    );
    assert_close(
        "clip logits_per_image",
        m.logits_per_image(ie, te.clone()),
        tensor(&io, "logits_per_image"),
        TOL,
    );

    // The processed photo and its CLIP-T against each prompt.
    let pe = m.image_embeds(tensor(&io, "image_pixel_values")).unwrap();
    assert_close(
        "clip photo image_embeds",
        pe.clone(),
        tensor(&io, "photo_image_embeds"),
        TOL,
    );
    let clip_t = pe.matmul(te.transpose()).reshape([3]);
    assert_close(
        "clip photo CLIP-T",
        clip_t,
        tensor(&io, "photo_clip_t"),
        TOL,
    );

    // No position interpolation in transformers 4.44.2's CLIP: another size is an error.
    let big = Tensor::<B, 4>::zeros([1, 3, 40, 40], &device());
    assert!(m.image_features(big).is_err());
}

#[test]
fn clip_state_dict_variants_and_round_trip() {
    // Older files carry the non-persistent position_ids buffers: dropped.
    let mut sd = weights("clip");
    let ids: Vec<i64> = (0..77).collect();
    sd.insert(
        "text_model.embeddings.position_ids",
        TensorData::new(ids, [1, 77]),
    );
    let ids: Vec<i64> = (0..17).collect();
    sd.insert(
        "vision_model.embeddings.position_ids",
        TensorData::new(ids, [1, 17]),
    );
    let m = ClipModel::<B>::from_state_dict(&config(), sd, &device()).unwrap();
    let scale = m.logit_scale.val().into_data().to_vec::<f32>().unwrap();
    assert_eq!(scale, vec![2.0]);

    // A missing tensor is named in the error.
    let mut sd = weights("clip");
    sd.take("visual_projection.weight").unwrap();
    let err = ClipModel::<B>::from_state_dict(&config(), sd, &device())
        .expect_err("missing key must fail")
        .to_string();
    assert!(err.contains("visual_projection"), "{err}");

    let dir = std::env::temp_dir().join(format!("blipd-clip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    m.save(&path).unwrap();
    let saved = StateDict::read(&path).unwrap();
    let reference = weights("clip");
    let mut a: Vec<_> = saved.keys().cloned().collect();
    let mut b: Vec<_> = reference.keys().cloned().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(
        saved.data("logit_scale").unwrap().shape,
        reference.data("logit_scale").unwrap().shape
    );
    let m2 = ClipModel::<B>::from_state_dict(&config(), saved, &device()).unwrap();
    let io = io("clip");
    let x: Tensor<B, 4> = tensor(&io, "pixel_values");
    assert_close(
        "clip save → load",
        m2.image_features(x.clone()).unwrap(),
        m.image_features(x).unwrap(),
        0.0,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
