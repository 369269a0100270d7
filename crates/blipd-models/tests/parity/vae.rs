//! diffusers `AutoencoderKL` parity (fixture: `scripts/reference/gen_vae.py`).

use blipd_models::vae::{to_uint8_image, AutoencoderKL, VaeConfig};
use blipd_models::weights::{ComponentDir, StateDict};
use burn::prelude::*;

use crate::common::{assert_close, device, fixture_dir, io, tensor, weights, B};

const TOL: f32 = 1e-4;

fn config() -> VaeConfig {
    VaeConfig::from_file(&fixture_dir("vae").join("config.json")).expect("fixture config")
}

fn model() -> AutoencoderKL<B> {
    AutoencoderKL::from_state_dict(&config(), weights("vae"), &device())
        .expect("load fixture weights")
}

fn check_all(vae: &AutoencoderKL<B>, label: &str) {
    let io = io("vae");
    let x = tensor::<4>(&io, "x");
    let noise = tensor::<4>(&io, "noise");

    let post = vae.encode(x.clone());
    assert_close(
        &format!("{label} mean"),
        post.mean(),
        tensor(&io, "mean"),
        TOL,
    );
    assert_close(
        &format!("{label} logvar"),
        post.logvar.clone(),
        tensor(&io, "logvar"),
        TOL,
    );
    let sample = post.sample(noise.clone());
    assert_close(
        &format!("{label} sample"),
        sample.clone(),
        tensor(&io, "sample"),
        TOL,
    );

    let decoded = vae.decode(tensor(&io, "sample"));
    assert_close(
        &format!("{label} decoded"),
        decoded,
        tensor(&io, "decoded"),
        TOL,
    );
    let decoded_mean = vae.forward(x.clone(), None);
    assert_close(
        &format!("{label} forward(mode)"),
        decoded_mean,
        tensor(&io, "decoded_mean"),
        TOL,
    );

    let latents = vae.encode_latents(x, Some(noise));
    assert_close(
        &format!("{label} latents_scaled"),
        latents,
        tensor(&io, "latents_scaled"),
        TOL,
    );
    let decoded_scaled = vae.decode_latents(tensor(&io, "latents_scaled"));
    assert_close(
        &format!("{label} decoded_scaled"),
        decoded_scaled.clone(),
        tensor(&io, "decoded_scaled"),
        TOL,
    );

    // uint8 postprocessing: compare against diffusers' bytes computed from *its* decoder output, so a
    // value within TOL of a rounding boundary could flip by one; allow at most one step anywhere.
    let ours = to_uint8_image(decoded_scaled).unwrap();
    let reference: Vec<f32> = io
        .data("image_uint8")
        .unwrap()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    let ref_dims = io.data("image_uint8").unwrap().shape.to_vec();
    assert_eq!(
        ref_dims,
        vec![ours.batch, ours.height, ours.width, ours.channels]
    );
    let mut exact = 0;
    for (a, b) in ours.data.iter().zip(&reference) {
        let d = (*a as f32 - b).abs();
        assert!(d <= 1.0, "{label} uint8 differs by {d}");
        if d == 0.0 {
            exact += 1;
        }
    }
    println!(
        "parity {label} uint8: {exact}/{} bytes identical",
        ours.data.len()
    );
    // The reference bytes of our own float output must match exactly (same rounding rule).
    let ref_from_ref = to_uint8_image(tensor::<4>(&io, "decoded_scaled")).unwrap();
    let exact_ref: Vec<f32> = ref_from_ref.data.iter().map(|v| *v as f32).collect();
    assert_eq!(
        exact_ref, reference,
        "{label} uint8 of the reference float output"
    );
}

#[test]
fn vae_parity() {
    let cfg = config();
    assert_eq!(
        cfg,
        VaeConfig::tiny(),
        "fixture config parses to VaeConfig::tiny()"
    );
    check_all(&model(), "vae");
}

/// The same weights under the legacy attention names (`query`/`key`/`value`/`proj_attn`), as in
/// older `.bin` checkpoints such as SD-1.5's original `vae/diffusion_pytorch_model.bin`.
#[test]
fn vae_parity_legacy_attention_names() {
    let sd = weights("vae");
    let mut renamed = Vec::new();
    let mut n_legacy = 0;
    for key in sd.keys().cloned().collect::<Vec<_>>() {
        let data = sd.data(&key).unwrap();
        let new = key
            .replace(".to_q.", ".query.")
            .replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn.");
        if new != key {
            n_legacy += 1;
        }
        renamed.push((new, data));
    }
    // encoder + decoder mid-block attention: 4 projections × (weight, bias) each.
    assert_eq!(n_legacy, 16);
    let legacy = StateDict::from_tensors("legacy-names", renamed);
    let vae = AutoencoderKL::<B>::from_state_dict(&config(), legacy, &device())
        .expect("legacy names load");
    check_all(&vae, "vae-legacy");
}

#[test]
fn vae_strict_loading_reports_problems() {
    let mut sd = weights("vae");
    sd.drop_keys(|k| k == "encoder.conv_in.bias");
    let conv = sd.data("decoder.conv_out.weight").unwrap();
    sd.insert("decoder.extra.weight", conv);
    let err = AutoencoderKL::<B>::from_state_dict(&config(), sd, &device())
        .expect_err("must fail")
        .to_string();
    assert!(err.contains("encoder.conv_in.bias"), "{err}");
    assert!(err.contains("decoder.extra.weight"), "{err}");
}

/// Save in the diffusers layout, read back through the component-folder loader, same outputs.
#[test]
fn vae_save_roundtrip_component_dir() {
    let vae = model();
    let dir = std::env::temp_dir().join(format!("blipd-vae-roundtrip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    vae.save(&dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    std::fs::copy(
        fixture_dir("vae").join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let saved = StateDict::read(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let reference = weights("vae");
    let mut a: Vec<_> = saved.keys().cloned().collect();
    let mut b: Vec<_> = reference.keys().cloned().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "saved keys are the diffusers keys");
    let comp = ComponentDir {
        name: "vae".into(),
        dir: dir.clone(),
    };
    let (reloaded, cfg) = AutoencoderKL::<B>::load(&comp, &device()).unwrap();
    assert_eq!(cfg, VaeConfig::tiny());
    let io = io("vae");
    assert_close(
        "vae reloaded decoded",
        reloaded.decode(tensor(&io, "sample")),
        tensor(&io, "decoded"),
        TOL,
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Full-size SD-1.5 VAE parameter count (parameters are lazily initialised, so this is cheap).
#[test]
fn vae_sd15_param_count() {
    let vae = VaeConfig::sd15().init::<B>(&device()).unwrap();
    assert_eq!(vae.num_params(), 83_653_863);
}
