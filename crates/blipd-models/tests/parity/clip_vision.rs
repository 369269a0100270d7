//! BLIP-2 vision tower (CLIP ViT-L/14 + ln_vision) vs diffusers 0.33.1 `Blip2VisionModel` and LAVIS's
//! `clip_vit.py` (tests/fixtures/clip_vision, gen_clip_vision.py).

use blipd_models::clip_vision::{reverse_key_map, Blip2VisionConfig};
use blipd_models::read_json;
use blipd_models::weights::{collect_reference, lavis, StateDict};

use crate::common::*;

fn config(file: &str) -> Blip2VisionConfig {
    read_json(&fixture_dir("clip_vision").join(file)).unwrap()
}

fn fixture_weights(file: &str) -> StateDict {
    StateDict::read(&fixture_dir("clip_vision").join(file)).unwrap()
}

#[test]
fn vision_tower_matches_diffusers() {
    let cfg = config("config.json");
    assert_eq!(
        cfg,
        Blip2VisionConfig::tiny(),
        "fixture config differs from tiny()"
    );
    let model = cfg
        .init::<B>(&device())
        .unwrap()
        .load_state_dict(weights("clip_vision"))
        .unwrap();
    let io = io("clip_vision");
    let out = model.forward(tensor::<4>(&io, "pixel_values"));
    assert_eq!(out.dims(), [2, 17, 32]);
    assert_close(
        "clip_vision last_hidden_state",
        out.clone(),
        tensor::<3>(&io, "last_hidden_state"),
        1e-4,
    );
    assert_close(
        "clip_vision pooler_output",
        model.pooled(out),
        tensor::<2>(&io, "pooler_output"),
        1e-4,
    );
}

#[test]
fn vision_tower_gelu_without_qkv_bias_matches_diffusers() {
    let cfg = config("config_b.json");
    assert_eq!(cfg.hidden_act, "gelu");
    assert!(!cfg.qkv_bias);
    assert_eq!(cfg.layer_norm_eps, 1e-5);
    let model = cfg
        .init::<B>(&device())
        .unwrap()
        .load_state_dict(fixture_weights("weights_b.safetensors"))
        .unwrap();
    let io = io("clip_vision");
    let out = model.forward(tensor::<4>(&io, "pixel_values"));
    assert_close(
        "clip_vision (gelu, no qkv bias, eps 1e-5)",
        out,
        tensor::<3>(&io, "b_last_hidden_state"),
        1e-4,
    );
}

/// LAVIS-named weights (`visual_encoder.*` CLIP names + `ln_vision`, as in `blip_weight.pt`) through the
/// LAVIS key map, run with LAVIS's eps 1e-5, against LAVIS's own `VisionTransformer` code.
#[test]
fn vision_tower_from_lavis_weights_matches_lavis() {
    let cfg = config("config_lavis.json");
    assert_eq!(cfg.layer_norm_eps, 1e-5);
    let lavis_sd = fixture_weights("weights_lavis.safetensors");
    let sd = lavis::to_diffusers_qformer(&lavis_sd, "").unwrap();
    // The qformer-level names carry a `visual_encoder.` prefix; the tower alone takes the rest.
    let sd = sd.sub("visual_encoder.");
    assert_eq!(sd.len(), lavis_sd.len());
    let model = cfg
        .init::<B>(&device())
        .unwrap()
        .load_state_dict(sd)
        .unwrap();
    let io = io("clip_vision");
    let out = model.forward(tensor::<4>(&io, "pixel_values"));
    assert_close(
        "clip_vision from LAVIS weights (eps 1e-5)",
        out.clone(),
        tensor::<3>(&io, "lavis_last_hidden_state"),
        1e-4,
    );

    // Same weights with the diffusers eps (1e-6) drift measurably from LAVIS: the eps is load-bearing.
    let mut cfg6 = cfg.clone();
    cfg6.layer_norm_eps = 1e-6;
    let sd = lavis::to_diffusers_qformer(&lavis_sd, "")
        .unwrap()
        .sub("visual_encoder.");
    let m6 = cfg6
        .init::<B>(&device())
        .unwrap()
        .load_state_dict(sd)
        .unwrap();
    let out6 = m6.forward(tensor::<4>(&io, "pixel_values"));
    let diff = (out6 - out).abs().max().into_scalar();
    assert!(diff > 1e-5, "eps 1e-6 vs 1e-5 should differ, got {diff}");
}

#[test]
fn vision_tower_saves_diffusers_names() {
    let model = Blip2VisionConfig::tiny()
        .init::<B>(&device())
        .unwrap()
        .load_state_dict(weights("clip_vision"))
        .unwrap();
    let saved = collect_reference(&model, &reverse_key_map()).unwrap();
    let names: Vec<&str> = saved.iter().map(|(k, _)| k.as_str()).collect();
    let reference = weights("clip_vision");
    let expected: Vec<&str> = reference.keys().map(String::as_str).collect();
    assert_eq!(names, expected);
}

#[test]
fn vision_config_presets() {
    let c = Blip2VisionConfig::blipdiffusion();
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.num_positions()),
        (1024, 23, 257)
    );
    assert_eq!(c.layer_norm_eps, 1e-6);
    assert_eq!(
        Blip2VisionConfig::blipdiffusion_lavis().layer_norm_eps,
        1e-5
    );
    // Missing fields take transformers' defaults.
    let c: Blip2VisionConfig = serde_json::from_str(r#"{"hidden_size": 1024}"#).unwrap();
    assert_eq!(
        (c.num_hidden_layers, c.hidden_act.as_str(), c.layer_norm_eps),
        (39, "gelu", 1e-6)
    );
    let mut bad = Blip2VisionConfig::tiny();
    bad.hidden_act = "swiglu".into();
    assert!(bad.init::<B>(&device()).is_err());
}
