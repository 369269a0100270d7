//! Parity of the zero-shot generation pipeline against diffusers 0.33.1 `BlipDiffusionPipeline` with tiny
//! random weights (`scripts/reference/gen_pipeline.py` → `crates/blipd-models/tests/fixtures/pipeline/`):
//! the diffusers folder is loaded through the real loaders, the reference image goes through our
//! preprocessing, and 3 PNDM steps (4 U-Net calls, CFG 7.5) run from the reference's initial latents.

use std::path::PathBuf;

use blipd_apps::generate::{BlipDiffusionPipeline, GenerateOptions, StepInfo};
use blipd_apps::preprocess::{
    preprocess_reference, ReferenceResize, RgbImage, CLIP_MEAN, CLIP_STD,
};
use blipd_models::weights::StateDict;
use burn::prelude::*;

type B = blipd_testkit::Cpu;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../blipd-models/tests/fixtures/pipeline")
}

fn io() -> StateDict {
    let p = fixture().join("io.safetensors");
    StateDict::read(&p).unwrap_or_else(|e| {
        panic!(
            "missing fixture {p:?} ({e}); regenerate with scripts/reference/generate.sh pipeline"
        )
    })
}

fn tensor<const D: usize>(sd: &StateDict, key: &str) -> Tensor<B, D> {
    Tensor::from_data(sd.data(key).unwrap().convert::<f32>(), &Default::default())
}

fn max_abs<const D: usize>(
    what: &str,
    ours: Tensor<B, D>,
    reference: Tensor<B, D>,
    tol: f32,
) -> f32 {
    blipd_testkit::assert_close(&format!("parity {what}"), ours, reference, tol as f64) as f32
}

fn u8_image(sd: &StateDict, key: &str) -> RgbImage {
    let data = sd.data(key).unwrap();
    let shape = data.shape.clone();
    let bytes = data.convert::<i32>().to_vec::<i32>().unwrap();
    RgbImage::new(
        shape[1],
        shape[0],
        bytes.into_iter().map(|v| v as u8).collect(),
    )
    .unwrap()
}

#[test]
fn reference_preprocessing_matches_pil() {
    let sd = io();
    let dev = Default::default();
    let png = RgbImage::open(&fixture().join("reference.png")).unwrap();
    assert_eq!(png, u8_image(&sd, "ref_image_u8"), "PNG decoding");
    for (img_key, suffix) in [("ref_image_u8", ""), ("small_image_u8", "_small")] {
        let img = u8_image(&sd, img_key);
        for (mode, key) in [
            (ReferenceResize::Diffusers, format!("pixel_values{suffix}")),
            (
                ReferenceResize::Lavis,
                format!("lavis_pixel_values{suffix}"),
            ),
        ] {
            let ours =
                preprocess_reference::<B>(&img, 28, mode, CLIP_MEAN, CLIP_STD, &dev).unwrap();
            max_abs(&key, ours, tensor(&sd, &key), 1e-6);
        }
    }
}

#[test]
fn blip_diffusion_pipeline_3_steps() {
    let sd = io();
    let dev = Default::default();
    let pipe = BlipDiffusionPipeline::<B>::load(&fixture(), None, &dev).unwrap();
    let req: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("request.json")).unwrap())
            .unwrap();
    let s = |k: &str| req[k].as_str().unwrap().to_string();
    let opts = GenerateOptions {
        guidance_scale: req["guidance_scale"].as_f64().unwrap(),
        num_inference_steps: req["steps"].as_u64().unwrap() as usize,
        height: req["height"].as_u64().unwrap() as usize,
        width: req["width"].as_u64().unwrap() as usize,
        neg_prompt: s("neg_prompt"),
        ..GenerateOptions::default()
    };
    let (prompt, cond, tgt) = (s("prompt"), s("cond_subject"), s("tgt_subject"));

    let reference = RgbImage::open(&fixture().join("reference.png")).unwrap();
    let pixels = pipe
        .preprocess(&reference, ReferenceResize::Diffusers)
        .unwrap();
    max_abs(
        "pipeline pixel_values",
        pixels.clone(),
        tensor(&sd, "pixel_values"),
        1e-6,
    );

    let ctx = pipe
        .subject_embeddings(pixels.clone(), &[&cond], opts.normalization)
        .unwrap();
    max_abs(
        "pipeline query_embeds",
        ctx.clone(),
        tensor(&sd, "query_embeds"),
        1e-4,
    );
    let text = pipe
        .text_embeddings(ctx, &[&prompt], &[&tgt], &opts)
        .unwrap();
    max_abs(
        "pipeline text_embeddings",
        text,
        tensor(&sd, "text_embeddings"),
        1e-4,
    );

    let timesteps: Vec<usize> = sd
        .data("timesteps")
        .unwrap()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| t as usize)
        .collect();
    let noise_ref: Tensor<B, 5> = tensor(&sd, "noise_pred");
    let latents_ref: Tensor<B, 5> = tensor(&sd, "latents");
    let at = |t: &Tensor<B, 5>, i: usize| {
        let [_, b, c, h, w] = t.dims();
        t.clone().narrow(0, i, 1).reshape([b, c, h, w])
    };
    let mut seen = vec![];
    let mut check = |s: StepInfo<'_, B>| {
        seen.push(s.timestep);
        max_abs(
            &format!("pipeline noise_pred {}", s.index),
            s.noise_pred.clone(),
            at(&noise_ref, s.index),
            1e-3,
        );
        max_abs(
            &format!("pipeline latents {}", s.index),
            s.latents.clone(),
            at(&latents_ref, s.index),
            1e-3,
        );
    };
    let out = pipe
        .generate_batch(
            pixels,
            &[&cond],
            &[&tgt],
            &[&prompt],
            &opts,
            Some(tensor(&sd, "latents0")),
            &mut check,
        )
        .unwrap();
    assert_eq!(seen, timesteps, "PLMS timesteps");
    max_abs(
        "pipeline image",
        out.images.clone(),
        tensor(&sd, "image"),
        1e-3,
    );

    let ours = out.to_uint8().unwrap();
    let reference = sd
        .data("image_u8")
        .unwrap()
        .convert::<i32>()
        .to_vec::<i32>()
        .unwrap();
    let worst = ours
        .data
        .iter()
        .zip(&reference)
        .map(|(&a, &b)| (i32::from(a) - b).abs())
        .max()
        .unwrap();
    println!("parity pipeline image_u8: max difference {worst} levels");
    assert!(worst <= 1, "uint8 images differ by {worst} levels");

    // The one-call API gives the same image.
    let again = pipe
        .generate(
            &reference_image(),
            &cond,
            &tgt,
            &prompt,
            &opts,
            Some(tensor(&sd, "latents0")),
        )
        .unwrap();
    max_abs("pipeline generate()", again.images, out.images, 0.0);
}

fn reference_image() -> RgbImage {
    RgbImage::open(&fixture().join("reference.png")).unwrap()
}

/// diffusers 0.33.1 `BlipDiffusionControlNetPipeline` on the same components plus a tiny random
/// ControlNet (`scripts/reference/gen_pipeline_controlnet.py` → fixtures/pipeline_controlnet): the
/// condition image's preparation and the 3-step image.
#[test]
fn blip_diffusion_controlnet_pipeline_3_steps() {
    let cn_dir = fixture().join("../pipeline_controlnet");
    let sd = StateDict::read(&cn_dir.join("io.safetensors")).unwrap();
    let dev = Default::default();
    let pipe = BlipDiffusionPipeline::<B>::load(&fixture(), None, &dev)
        .unwrap()
        .with_controlnet(&cn_dir.join("controlnet"))
        .unwrap();
    let req: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("request.json")).unwrap())
            .unwrap();
    let s = |k: &str| req[k].as_str().unwrap().to_string();
    let opts = GenerateOptions {
        guidance_scale: req["guidance_scale"].as_f64().unwrap(),
        num_inference_steps: req["steps"].as_u64().unwrap() as usize,
        height: req["height"].as_u64().unwrap() as usize,
        width: req["width"].as_u64().unwrap() as usize,
        neg_prompt: s("neg_prompt"),
        ..GenerateOptions::default()
    };
    let cond_img = RgbImage::open(&cn_dir.join("cond.png")).unwrap();
    let control = pipe
        .control_image(&cond_img, opts.height, opts.width)
        .unwrap();
    max_abs(
        "controlnet cond_pixels",
        control.clone(),
        tensor(&sd, "cond_pixels"),
        1e-6,
    );
    let reference = RgbImage::open(&fixture().join("reference.png")).unwrap();
    let pixels = pipe
        .preprocess(&reference, ReferenceResize::Diffusers)
        .unwrap();
    let ctx = pipe
        .subject_embeddings(pixels, &[&s("cond_subject")], opts.normalization)
        .unwrap();
    let out = pipe
        .generate_with_ctx_controlled(
            ctx.clone(),
            &[&s("tgt_subject")],
            &[&s("prompt")],
            Some(control),
            &opts,
            Some(tensor(&sd, "latents0")),
            &mut |_| {},
        )
        .unwrap();
    max_abs(
        "controlnet image",
        out.images.clone(),
        tensor(&sd, "image"),
        1e-4,
    );
    // The ControlNet matters: without it the image differs.
    let plain = pipe
        .generate_with_ctx(
            ctx,
            &[&s("tgt_subject")],
            &[&s("prompt")],
            &opts,
            Some(tensor(&sd, "latents0")),
            &mut |_| {},
        )
        .unwrap();
    let diff = (plain.images - out.images).abs().max().into_scalar();
    assert!(diff > 1e-3, "the ControlNet changed nothing ({diff})");
}

/// Subject interpolation: weights 1/0 give the first subject's embedding, uniform weights the mean, and
/// bad weights are refused.
#[test]
fn subject_embeddings_mix_by_ratio() {
    let dev = Default::default();
    let a = Tensor::<B, 3>::from_floats([[[1.0, 2.0], [3.0, 4.0]]], &dev);
    let b = Tensor::<B, 3>::from_floats([[[5.0, 6.0], [7.0, 8.0]]], &dev);
    type P = BlipDiffusionPipeline<B>;
    let first = P::mix_subject_embeddings(vec![a.clone(), b.clone()], &[1.0, 0.0]).unwrap();
    max_abs("mix 1/0", first, a.clone(), 0.0);
    let mean = P::mix_subject_embeddings(vec![a.clone(), b.clone()], &[]).unwrap();
    max_abs("mix uniform", mean, (a.clone() + b.clone()) / 2.0, 1e-7);
    let err = P::mix_subject_embeddings(vec![a.clone(), b.clone()], &[0.7, 0.7])
        .unwrap_err()
        .to_string();
    assert!(err.contains("sum to 1"), "{err}");
    let err = P::mix_subject_embeddings(vec![a, b], &[1.0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 ratios for 2 subjects"), "{err}");
}
