//! ControlNet parity against a tiny random diffusers `ControlNetModel`
//! (scripts/reference/gen_controlnet.py).

use blipd_models::controlnet::{self, ControlNetConfig, ControlNetModel, ControlNetOutput};
use blipd_models::unet::UNet2DConditionConfig;

use crate::common::{assert_close, device, fixture_dir, io, tensor, weights, B};

const TOL: f32 = 1e-4;

fn config() -> ControlNetConfig {
    blipd_models::read_json(&fixture_dir("controlnet").join("config.json")).expect("fixture config")
}

fn model() -> ControlNetModel<B> {
    let cn = config().init::<B>(&device()).expect("valid config");
    controlnet::load_state_dict(cn, weights("controlnet")).expect("weights fit through the key map")
}

fn run(cn: &ControlNetModel<B>, scale: f64, guess_mode: bool) -> ControlNetOutput<B> {
    let io = io("controlnet");
    cn.forward_with(
        tensor(&io, "sample"),
        tensor(&io, "timesteps"),
        tensor(&io, "encoder"),
        tensor(&io, "cond"),
        scale,
        guess_mode,
        None,
    )
}

#[test]
fn config_is_the_tiny_preset() {
    assert_eq!(config(), ControlNetConfig::tiny());
}

#[test]
fn controlnet_residuals() {
    let cn = model();
    let io = io("controlnet");
    let out = run(&cn, 0.7, false);
    assert_eq!(out.down_block_res_samples.len(), 4);
    for (i, d) in out.down_block_res_samples.into_iter().enumerate() {
        assert_close(
            &format!("controlnet down {i}"),
            d,
            tensor(&io, &format!("down_{i}")),
            TOL,
        );
    }
    assert_close(
        "controlnet mid",
        out.mid_block_res_sample,
        tensor(&io, "mid"),
        TOL,
    );
}

#[test]
fn controlnet_guess_mode() {
    let cn = model();
    let io = io("controlnet");
    let out = run(&cn, 1.0, true);
    for (i, d) in out.down_block_res_samples.into_iter().enumerate() {
        let name = format!("guess_down_{i}");
        assert_close(&format!("controlnet {name}"), d, tensor(&io, &name), TOL);
    }
    assert_close(
        "controlnet guess mid",
        out.mid_block_res_sample,
        tensor(&io, "guess_mid"),
        TOL,
    );
}

#[test]
fn controlnet_bgr_channel_order() {
    let mut cn = model();
    cn.config.controlnet_conditioning_channel_order = "bgr".into();
    let io = io("controlnet");
    let out = run(&cn, 1.0, false);
    assert_close(
        "controlnet bgr mid",
        out.mid_block_res_sample,
        tensor(&io, "bgr_mid"),
        TOL,
    );
}

#[test]
fn controlnet_residuals_fit_the_matching_unet() {
    // The tiny presets pair up: a ControlNet's outputs have the U-Net's skip shapes.
    let dev = device();
    let cn = model();
    let unet = UNet2DConditionConfig::tiny().init::<B>(&dev).unwrap();
    let out = run(&cn, 1.0, false);
    assert_eq!(out.down_block_res_samples.len(), unet.num_down_residuals());
    let io = io("controlnet");
    let y = unet.forward(
        tensor(&io, "sample"),
        tensor(&io, "timesteps"),
        tensor(&io, "encoder"),
        Some(out.into_extras()),
    );
    assert_eq!(y.dims(), [2, 4, 8, 8]);
}

#[test]
fn controlnet_saves_in_diffusers_layout() {
    let cn = model();
    let dir = std::env::temp_dir().join(format!("blipd-controlnet-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    cn.save_diffusers(&dir).expect("save");
    let saved =
        blipd_models::weights::StateDict::read(&dir.join("diffusion_pytorch_model.safetensors"))
            .unwrap();
    let reference = weights("controlnet");
    assert_eq!(
        saved.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>()
    );
    let cfg: ControlNetConfig = blipd_models::read_json(&dir.join("config.json")).unwrap();
    assert_eq!(cfg, config());
    std::fs::remove_dir_all(&dir).ok();
}
