//! The stage-2 loss against the PyTorch reference (scripts/reference/gen_stage2_loss.py): the tiny
//! diffusers pipeline fixture's weights, fixed subject images, targets, timesteps, VAE posterior noise,
//! diffusion noise and subject-drop decisions → the same ε-MSE.

use std::path::PathBuf;

use blipd_models::weights::StateDict;
use blipd_stage2::{Stage2, Stage2Components, Stage2Config};
use burn::prelude::*;

type B = blipd_testkit::CpuTrain;
type I = blipd_testkit::Cpu;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../blipd-models/tests/fixtures")
}

fn t<BB: Backend, const D: usize>(sd: &StateDict, k: &str) -> Tensor<BB, D> {
    Tensor::from_data(sd.data(k).unwrap().convert::<f32>(), &Default::default())
}

fn max_abs<BB: Backend, const D: usize>(what: &str, a: Tensor<BB, D>, b: Tensor<BB, D>, tol: f32) {
    blipd_testkit::assert_close(&format!("parity {what}"), a, b, tol as f64);
}

#[test]
fn stage2_loss_matches_reference() {
    let io = StateDict::read(&fixtures().join("stage2_loss/io.safetensors")).unwrap();
    let req: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("stage2_loss/request.json")).unwrap(),
    )
    .unwrap();
    let strings = |k: &str| -> Vec<String> {
        req[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let (subjects, captions) = (strings("subjects"), strings("captions"));
    let dev = Default::default();
    let cfg = Stage2Config::default();
    let parts =
        Stage2Components::<B>::from_diffusers(&fixtures().join("pipeline"), &cfg, &dev).unwrap();
    let (stage, mut model) = Stage2::<B>::new(cfg, parts, 16, dev).unwrap();
    // The reference runs in eval mode: no dropout.
    model.qformer.set_dropout(0.0);
    let keep: Vec<bool> = io
        .data("keep")
        .unwrap()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|k| k != 0)
        .collect();
    let steps: Vec<i64> = io
        .data("t")
        .unwrap()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let posterior = stage.vae.encode(t::<I, 4>(&io, "target"));
    let loss = stage
        .loss_from(
            &model,
            t::<B, 4>(&io, "pixel_values"),
            posterior,
            &subjects,
            &captions,
            steps,
            &keep,
            t::<I, 4>(&io, "vae_noise"),
            t::<B, 4>(&io, "eps"),
        )
        .unwrap();
    let reference = t::<I, 1>(&io, "loss");
    println!(
        "stage-2 loss: ours {} reference {}",
        loss.clone().into_scalar(),
        reference.clone().into_scalar()
    );
    max_abs("stage-2 loss", loss.inner(), reference, 1e-5);

    // The check can fail: the other subject-drop decision gives another loss.
    let flipped: Vec<bool> = keep.iter().map(|k| !k).collect();
    let posterior = stage.vae.encode(t::<I, 4>(&io, "target"));
    let steps: Vec<i64> = io
        .data("t")
        .unwrap()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let other = stage
        .loss_from(
            &model,
            t::<B, 4>(&io, "pixel_values"),
            posterior,
            &subjects,
            &captions,
            steps,
            &flipped,
            t::<I, 4>(&io, "vae_noise"),
            t::<B, 4>(&io, "eps"),
        )
        .unwrap()
        .into_scalar();
    let r: f32 = t::<I, 1>(&io, "loss").into_scalar();
    assert!(
        (other - r).abs() > 1e-4,
        "flipping the drop decisions changed nothing ({other} vs {r})"
    );
}
