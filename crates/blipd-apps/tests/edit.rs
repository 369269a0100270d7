//! Prompt-to-prompt subject editing against a re-statement of LAVIS's algorithm on diffusers 0.33.1 modules
//! (`scripts/reference/gen_edit.py` → `tests/fixtures/edit/`), on the tiny pipeline fixture: the edit
//! prompts, the token alignment (mapper/alphas), LocalBlend's word positions, the text states, a generated
//! edit (PNDM, 5 steps: latents after the first step and at the end, the mask) and a real-image edit
//! (DDIM inversion, then the DDIM edit with the unguided reconstruction row).

use std::path::PathBuf;

use blipd_apps::edit::{self, EditRequest, RefineConfig};
use blipd_apps::BlipDiffusionPipeline;
use blipd_models::weights::StateDict;
use burn::prelude::*;

type B = blipd_testkit::Cpu;

fn pipeline_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../blipd-models/tests/fixtures/pipeline")
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/edit")
        .join(name)
}

fn io() -> StateDict {
    StateDict::read(&fixture("io.safetensors"))
        .expect("tests/fixtures/edit: regenerate with scripts/reference/generate.sh edit")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

fn tensor<const D: usize>(sd: &StateDict, key: &str) -> Tensor<B, D> {
    Tensor::from_data(sd.data(key).unwrap().convert::<f32>(), &Default::default())
}

fn pipe() -> BlipDiffusionPipeline<B> {
    BlipDiffusionPipeline::load(&pipeline_dir(), None, &Default::default()).unwrap()
}

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn settings() -> RefineConfig {
    let s = &expected()["settings"];
    RefineConfig {
        cross_replace_steps: s["cross"].as_f64().unwrap(),
        self_replace_steps: s["self_frac"].as_f64().unwrap(),
        self_replace_max_pixels: s["self_max"].as_u64().unwrap() as usize,
        threshold: s["threshold"].as_f64().unwrap(),
        blend_grid: Some(s["blend_grid"].as_u64().unwrap() as usize),
    }
}

fn request<'a>(
    e: &'a serde_json::Value,
    io: &StateDict,
    refine: RefineConfig,
) -> EditRequest<'a, B> {
    EditRequest {
        ctx: tensor(io, "ctx"),
        src_subject: e["src_subject"].as_str().unwrap(),
        tgt_subject: e["tgt_subject"].as_str().unwrap(),
        prompt: e["prompt"].as_str().unwrap(),
        neg_prompt: "",
        steps: e["steps"].as_u64().unwrap() as usize,
        guidance_scale: e["guidance"].as_f64().unwrap(),
        refine,
    }
}

/// Latents grow to ~30 in 5 steps of random weights at guidance 7.5: max-abs error relative to the
/// reference's largest magnitude.
fn assert_latents(what: &str, ours: Tensor<B, 4>, reference: Tensor<B, 4>) {
    let scale = reference.clone().abs().max().into_scalar().max(1.0);
    blipd_testkit::assert_close(what, ours, reference, 2e-5 * scale as f64);
}

fn assert_mask(what: &str, ours: Tensor<B, 2>, reference: Tensor<B, 2>) {
    let (a, b) = (
        blipd_testkit::values(ours),
        blipd_testkit::values(reference),
    );
    assert_eq!(a.len(), b.len());
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    let inside = b.iter().filter(|&&v| v > 0.5).count();
    println!(
        "{what}: {inside} of {} pixels inside; {differ} differ",
        b.len()
    );
    assert_eq!(differ, 0, "{what}: masks differ in {differ} pixels");
    assert!(
        inside > 0 && inside < b.len(),
        "{what}: a trivial mask cannot show anything"
    );
}

#[test]
fn prompts_alignment_and_word_positions() {
    let e = expected();
    let p = pipe();
    let prompts = edit::edit_prompts(4, "cat", "dog", e["prompt"].as_str().unwrap());
    assert_eq!(prompts[0], e["prompts"][0].as_str().unwrap());
    assert_eq!(prompts[1], e["prompts"][1].as_str().unwrap());
    let (mapper, alphas) =
        edit::refinement_mapper(&p.tokenizer, &prompts[0], &prompts[1], 77).unwrap();
    assert_eq!(mapper, ints(&e["mapper"]));
    let want: Vec<f32> = e["alphas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(alphas, want);
    for case in e["align_cases"].as_array().unwrap() {
        let x: Vec<u32> = ints(&case["x"]).into_iter().map(|v| v as u32).collect();
        let y: Vec<u32> = ints(&case["y"]).into_iter().map(|v| v as u32).collect();
        assert_eq!(edit::align(&x, &y), ints(&case["map"]), "align {x:?} {y:?}");
    }
    let inds = edit::word_inds(&p.tokenizer, &prompts[0], "cat").unwrap();
    assert_eq!(
        inds.iter().map(|&i| i as i64).collect::<Vec<_>>(),
        ints(&e["blend_inds"])
    );
    for (text, words) in e["word_inds"].as_object().unwrap() {
        for (word, want) in words.as_object().unwrap() {
            let got = edit::word_inds(&p.tokenizer, text, word).unwrap();
            assert_eq!(
                got.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                ints(want),
                "word_inds({text:?}, {word:?})"
            );
        }
    }
}

#[test]
fn text_states_match() {
    let e = expected();
    let io = io();
    let p = pipe();
    let prompts = edit::edit_prompts(4, "cat", "dog", e["prompt"].as_str().unwrap());
    let states = edit::edit_states(&p, &prompts, tensor(&io, "ctx"), "").unwrap();
    blipd_testkit::assert_close("edit states", states, tensor::<3>(&io, "text_states"), 1e-5);
}

#[test]
fn generated_edit_matches_the_reference() {
    let e = expected();
    let io = io();
    let p = pipe();
    let out = edit::generate_then_edit(
        &p,
        &request(&e, &io, settings()),
        tensor(&io, "latents0"),
        false,
    )
    .unwrap();
    assert_latents(
        "generated edit latents",
        out.output.latents.clone(),
        tensor(&io, "gen_latents"),
    );
    assert_mask("generated edit mask", out.mask, tensor(&io, "gen_mask"));
    assert_eq!(out.output.images.dims()[0], 2);
    // Not vacuous: without the refinement (no cross or self replacement) the edit row differs.
    let plain = RefineConfig {
        cross_replace_steps: 0.0,
        self_replace_steps: 0.0,
        ..settings()
    };
    let other =
        edit::generate_then_edit(&p, &request(&e, &io, plain), tensor(&io, "latents0"), false)
            .unwrap();
    let d = (other.output.latents - out.output.latents)
        .abs()
        .max()
        .into_scalar();
    assert!(d > 1e-2, "the refinement changed nothing ({d})");
}

#[test]
fn step_bounds_match() {
    let e = expected();
    let p = pipe();
    let prompts = edit::edit_prompts(4, "cat", "dog", e["prompt"].as_str().unwrap());
    let steps = e["steps"].as_u64().unwrap() as usize;
    let ctl = edit::Refine::<B>::new(
        &p.tokenizer,
        &prompts,
        "cat",
        steps,
        16,
        77,
        settings(),
        &Default::default(),
    )
    .unwrap();
    let (cross, (lo, hi)) = ctl.bounds();
    assert_eq!(cross as i64, e["cross_until"].as_i64().unwrap());
    assert_eq!(vec![lo as i64, hi as i64], ints(&e["self_range"]));
}

#[test]
fn inverted_photo_edit_matches_the_reference() {
    let e = expected();
    let io = io();
    let p = pipe();
    let (inv, text) = edit::ddim_invert(
        &p,
        tensor(&io, "image_latents"),
        e["src_subject"].as_str().unwrap(),
        e["prompt"].as_str().unwrap(),
        e["steps"].as_u64().unwrap() as usize,
    )
    .unwrap();
    assert_eq!(
        text,
        e["inv_text"].as_str().unwrap(),
        "LAVIS's first-character prompt"
    );
    assert_latents("inverted latents", inv, tensor(&io, "inv_latents"));
    let out = edit::generate_then_edit(
        &p,
        &request(&e, &io, settings()),
        tensor(&io, "inv_latents"),
        true,
    )
    .unwrap();
    assert_latents(
        "inverted edit latents",
        out.output.latents,
        tensor(&io, "inv_edit_latents"),
    );
    assert_mask("inverted edit mask", out.mask, tensor(&io, "inv_mask"));
}

#[test]
fn bad_requests_are_refused() {
    let e = expected();
    let io = io();
    let p = pipe();
    let mut req = request(&e, &io, settings());
    req.guidance_scale = 1.0;
    let err = edit::generate_then_edit(&p, &req, tensor(&io, "latents0"), false).unwrap_err();
    assert!(err.to_string().contains("guidance"), "{err}");
    let mut req = request(&e, &io, settings());
    req.src_subject = "teddy bear";
    let err = edit::generate_then_edit(&p, &req, tensor(&io, "latents0"), false).unwrap_err();
    assert!(err.to_string().contains("single word"), "{err}");
    let mut req = request(&e, &io, settings());
    req.refine.blend_grid = Some(5);
    let err = edit::generate_then_edit(&p, &req, tensor(&io, "latents0"), false).unwrap_err();
    assert!(err.to_string().contains("5×5"), "{err}");
    let mut req = request(&e, &io, settings());
    req.refine.threshold = 1.5;
    assert!(edit::generate_then_edit(&p, &req, tensor(&io, "latents0"), false).is_err());
    let mut req = request(&e, &io, settings());
    let long = "on a sofa ".repeat(40);
    req.prompt = &long;
    let err = edit::generate_then_edit(&p, &req, tensor(&io, "latents0"), false).unwrap_err();
    assert!(err.to_string().contains("shorten --prompt"), "{err}");
}
