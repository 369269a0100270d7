//! DreamBench evaluation on the tiny DINO / CLIP parity fixtures of blipd-models
//! (`scripts/reference/gen_{dino,clip}.py`): the image processors against transformers' pixel values,
//! scores of two synthetic subjects with known relations (a copy of a real image has DINO = CLIP-I = 1,
//! CLIP-T equals transformers' `image_embeds · text_embeds`), bad images reported, caching, reports.
//! The real DreamBench (`../shared/dreambench`) is parsed when present.

mod common;

use std::path::{Path, PathBuf};

use blipd_apps::eval::{
    ClipImageProcessor, DreamBench, DreamBenchEval, EvalEvent, EvalOptions, Scores,
};
use blipd_apps::segment::ClipSegImageProcessor;
use blipd_apps::RgbImage;
use blipd_models::weights::StateDict;
use burn::prelude::*;

type B = blipd_testkit::Cpu;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../blipd-models/tests/fixtures")
        .join(name)
}

fn io(name: &str) -> StateDict {
    StateDict::read(&fixture(name).join("io.safetensors")).expect("fixture io")
}

fn floats(sd: &StateDict, key: &str) -> Vec<f32> {
    sd.data(key)
        .unwrap()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap()
}

use common::max_abs_diff as max_abs;

/// Complete transformers folders for the tiny models (the tiny processor configs as
/// `preprocessor_config.json`, the reference weights as `model.safetensors`).
fn model_dirs(root: &Path) -> (PathBuf, PathBuf) {
    let mut out = Vec::new();
    for (name, extra) in [
        ("clip", &["vocab.json", "merges.txt"][..]),
        ("dino", &[][..]),
    ] {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let f = fixture(name);
        std::fs::copy(f.join("config.json"), d.join("config.json")).unwrap();
        std::fs::copy(f.join("weights.safetensors"), d.join("model.safetensors")).unwrap();
        std::fs::copy(
            f.join("tiny_preprocessor_config.json"),
            d.join("preprocessor_config.json"),
        )
        .unwrap();
        for e in extra {
            std::fs::copy(f.join(e), d.join(e)).unwrap();
        }
        out.push(d);
    }
    (out[0].clone(), out[1].clone())
}

const PROMPTS_FILE: &str = "Classes

subject_name,class
dog,dog
teapot,teapot

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red cube shaped {0} {1}'.format(unique_token, class_token),
'a {0} {1} on top of pink fabric'.format(unique_token, class_token)
]
";

fn save_png(img: &RgbImage, path: &Path) {
    image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone())
        .unwrap()
        .save(path)
        .unwrap();
}

fn photo() -> RgbImage {
    RgbImage::open(&fixture("clip").join("image.png")).unwrap()
}

fn mirrored(img: &RgbImage) -> RgbImage {
    let mut data = Vec::with_capacity(img.data.len());
    for y in 0..img.height {
        for x in (0..img.width).rev() {
            let p = (y * img.width + x) * 3;
            data.extend_from_slice(&img.data[p..p + 3]);
        }
    }
    RgbImage::new(img.width, img.height, data).unwrap()
}

fn gradient() -> RgbImage {
    let (w, h) = (64, 48);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&[(x * 4) as u8, (y * 5) as u8, ((x * y) % 256) as u8]);
        }
    }
    RgbImage::new(w, h, data).unwrap()
}

#[test]
fn processors_match_transformers() {
    let img = photo();
    // CLIPImageProcessor (openai/clip-vit-base-patch32's file): 187×150 → 279×224 → crop at x = 27.
    let clip_io = io("clip");
    let p =
        ClipImageProcessor::from_file(&fixture("clip").join("preprocessor_config.json")).unwrap();
    assert_eq!(p, ClipImageProcessor::vit_b32());
    let err = max_abs(
        &p.pixel_values(&img).unwrap(),
        &floats(&clip_io, "image_pixel_values_224"),
    );
    println!("CLIPImageProcessor 224: max-abs error {err:.3e}");
    assert!(err <= 1e-6, "{err}");
    let p = ClipImageProcessor::from_file(&fixture("clip").join("tiny_preprocessor_config.json"))
        .unwrap();
    let err = max_abs(
        &p.pixel_values(&img).unwrap(),
        &floats(&clip_io, "image_pixel_values"),
    );
    println!("CLIPImageProcessor 32: max-abs error {err:.3e}");
    assert!(err <= 1e-6, "{err}");

    // ViTImageProcessor (facebook/dino-vits16's file): squash to 224×224, bilinear, ImageNet stats.
    let dino_io = io("dino");
    let p = ClipSegImageProcessor::from_file(&fixture("dino").join("preprocessor_config.json"))
        .unwrap();
    assert_eq!(p.size, (224, 224));
    let err = max_abs(
        &p.pixel_values(&img).unwrap(),
        &floats(&dino_io, "image_pixel_values_224"),
    );
    println!("ViTImageProcessor (DINO) 224: max-abs error {err:.3e}");
    assert!(err <= 1e-6, "{err}");
    let p =
        ClipSegImageProcessor::from_file(&fixture("dino").join("tiny_preprocessor_config.json"))
            .unwrap();
    let err = max_abs(
        &p.pixel_values(&img).unwrap(),
        &floats(&dino_io, "image_pixel_values"),
    );
    println!("ViTImageProcessor (DINO) 32: max-abs error {err:.3e}");
    assert!(err <= 1e-6, "{err}");
}

struct Setup {
    _tmp: tempfile::TempDir,
    clip: PathBuf,
    dino: PathBuf,
    bench: PathBuf,
    generated: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let (clip, dino) = model_dirs(tmp.path());
    let bench = tmp.path().join("bench");
    let generated = tmp.path().join("generated");
    for d in ["dog", "teapot"] {
        std::fs::create_dir_all(bench.join(d)).unwrap();
        std::fs::create_dir_all(generated.join(d)).unwrap();
    }
    std::fs::create_dir_all(generated.join("cat")).unwrap();
    std::fs::write(bench.join("prompts_and_classes.txt"), PROMPTS_FILE).unwrap();
    let (a, b) = (mirrored(&photo()), gradient());
    std::fs::copy(fixture("clip").join("image.png"), bench.join("dog/00.png")).unwrap();
    save_png(&a, &bench.join("teapot/00.png"));
    save_png(&b, &bench.join("teapot/01.png"));
    for p in 0..3 {
        std::fs::copy(
            fixture("clip").join("image.png"),
            generated.join(format!("dog/{p}_0.png")),
        )
        .unwrap();
    }
    save_png(&b, &generated.join("teapot/0_0.png"));
    std::fs::write(generated.join("teapot/1_0.png"), b"not a png").unwrap();
    save_png(&b, &generated.join("teapot/notes.png"));
    save_png(&b, &generated.join("teapot/5_0.png"));
    save_png(&b, &generated.join("cat/0_0.png"));
    std::fs::write(generated.join("teapot/prompts.txt"), "ignored").unwrap();
    Setup {
        _tmp: tmp,
        clip,
        dino,
        bench,
        generated,
    }
}

fn dot(a: &Tensor<B, 2>, i: usize, b: &Tensor<B, 2>, j: usize) -> f64 {
    let [_, d] = a.dims();
    let x = a.clone().slice([i..i + 1, 0..d]);
    let y = b.clone().slice([j..j + 1, 0..d]);
    f64::from((x * y).sum().into_scalar())
}

#[test]
fn scores_of_synthetic_subjects() {
    let s = setup();
    let device = Default::default();
    let mut ev = DreamBenchEval::<B>::load(&s.clip, &s.dino, &device).unwrap();
    let bench = DreamBench::open(&s.bench).unwrap();
    assert_eq!(bench.subjects.len(), 2);
    assert!(bench.subject("dog").unwrap().live && !bench.subject("teapot").unwrap().live);

    // Our tokenization of the rendered prompts equals the fixture's CLIPTokenizer ids.
    let clip_io = io("clip");
    let ids = clip_io
        .data("input_ids")
        .unwrap()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let l = ids.len() / 3;
    let dog = bench.subject("dog").unwrap().clone();
    for i in 0..3 {
        let prompt = bench.eval_prompt(&dog, i).unwrap();
        let ours: Vec<i64> = ev
            .tokenizer
            .tokenize(&prompt)
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        let row = &ids[i * l..(i + 1) * l];
        assert_eq!(&row[1..ours.len() + 1], ours.as_slice(), "{prompt}");
    }

    let mut events = Vec::new();
    let report = ev
        .evaluate(&bench, &s.generated, &EvalOptions::default(), |e| {
            events.push(e)
        })
        .unwrap();
    println!("{}", report.to_markdown());

    // Bad images: corrupt, bad name, prompt index out of range, unknown subject; the run went on.
    let bad: Vec<String> = report
        .bad
        .iter()
        .map(|b| format!("{} {}", b.path.display(), b.reason))
        .collect();
    assert_eq!(report.bad.len(), 4, "{bad:#?}");
    for needle in [
        "teapot/1_0.png",
        "teapot/notes.png",
        "teapot/5_0.png",
        "generated/cat",
    ] {
        assert!(
            bad.iter().any(|b| b.contains(needle)),
            "{needle} not in {bad:#?}"
        );
    }
    assert_eq!(report.images.len(), 4);
    assert!(report.missing_subjects.is_empty());
    let n_ok = events
        .iter()
        .filter(|e| matches!(e, EvalEvent::Image { ok: true }))
        .count();
    let n_bad = events
        .iter()
        .filter(|e| matches!(e, EvalEvent::Image { ok: false }))
        .count();
    assert_eq!((n_ok, n_bad), (4, 4));
    assert!(matches!(
        events[0],
        EvalEvent::Planned {
            images: 8,
            subjects: 2
        }
    ));

    // dog: each generation is the (only) real photo → DINO = CLIP-I = 1; CLIP-T = transformers'.
    let clip_t = floats(&clip_io, "photo_clip_t");
    for im in report.images.iter().filter(|i| i.subject == "dog") {
        assert!((im.dino - 1.0).abs() < 1e-5, "DINO {}", im.dino);
        assert!((im.clip_i - 1.0).abs() < 1e-5, "CLIP-I {}", im.clip_i);
        let want = f64::from(clip_t[im.prompt_index]);
        println!(
            "CLIP-T `{}`: ours {:.6}, transformers {want:.6}",
            im.prompt, im.clip_t
        );
        assert!((im.clip_t - want).abs() < 1e-4, "{} vs {want}", im.clip_t);
    }

    // teapot: generation = real image B of {A, B} → DINO = (cos(A, B) + 1) / 2, likewise CLIP-I.
    let (a, b) = (mirrored(&photo()), gradient());
    let e = ev.embed_images(&[a, b], 2).unwrap();
    let cos_dino = dot(&e.dino, 0, &e.dino, 1);
    let cos_clip = dot(&e.clip, 0, &e.clip, 1);
    assert!(
        cos_dino < 0.99 && cos_clip < 0.99,
        "A and B must differ: {cos_dino} {cos_clip}"
    );
    let text = ev.text_embeds("a teapot in the jungle").unwrap();
    let want_t = dot(&e.clip, 1, &text, 0);
    let tp = report
        .subjects
        .iter()
        .find(|s| s.subject == "teapot")
        .unwrap();
    assert_eq!((tp.n_generated, tp.n_real), (1, 2));
    assert!(
        (tp.scores.dino - (cos_dino + 1.0) / 2.0).abs() < 1e-5,
        "{tp:?} {cos_dino}"
    );
    assert!(
        (tp.scores.clip_i - (cos_clip + 1.0) / 2.0).abs() < 1e-5,
        "{tp:?} {cos_clip}"
    );
    assert!((tp.scores.clip_t - want_t).abs() < 1e-5, "{tp:?} {want_t}");

    // Means: over images (3 dog + 1 teapot) and over subjects.
    let m = report.mean.unwrap();
    let dog_s = report
        .subjects
        .iter()
        .find(|s| s.subject == "dog")
        .unwrap()
        .scores;
    let want = Scores {
        dino: (3.0 * dog_s.dino + tp.scores.dino) / 4.0,
        clip_i: (3.0 * dog_s.clip_i + tp.scores.clip_i) / 4.0,
        clip_t: (3.0 * dog_s.clip_t + tp.scores.clip_t) / 4.0,
    };
    assert!((m.dino - want.dino).abs() < 1e-9 && (m.clip_t - want.clip_t).abs() < 1e-9);
    let ms = report.mean_of_subjects.unwrap();
    assert!((ms.clip_i - (dog_s.clip_i + tp.scores.clip_i) / 2.0).abs() < 1e-9);

    // Reports.
    let out = s.generated.parent().unwrap().join("out/scores.json");
    let md = report.write(&out).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["n_images"], 4);
    assert_eq!(v["bad_images"].as_array().unwrap().len(), 4);
    assert!((v["mean"]["dino"].as_f64().unwrap() - m.dino).abs() < 1e-12);
    let md = std::fs::read_to_string(md).unwrap();
    assert!(md.contains("| teapot | teapot | 1 |"), "{md}");

    // A second run reuses the real embeddings (no RealEmbedded events) and gives the same numbers;
    // a subject filter leaves the other subject out.
    let mut events = Vec::new();
    let opts = EvalOptions {
        batch_size: 1,
        subjects: vec!["teapot".into()],
    };
    let again = ev
        .evaluate(&bench, &s.generated, &opts, |e| events.push(e))
        .unwrap();
    assert!(!events
        .iter()
        .any(|e| matches!(e, EvalEvent::RealEmbedded { .. })));
    assert_eq!(again.subjects.len(), 1);
    let t2 = again.subjects[0].scores;
    assert!((t2.dino - tp.scores.dino).abs() < 1e-6 && (t2.clip_t - tp.scores.clip_t).abs() < 1e-6);
    assert!(ev
        .evaluate(
            &bench,
            &s.generated,
            &EvalOptions {
                subjects: vec!["nope".into()],
                ..Default::default()
            },
            |_| {}
        )
        .is_err());
}

#[test]
fn load_errors_name_the_problem() {
    let s = setup();
    let device = Default::default();
    std::fs::remove_file(s.clip.join("merges.txt")).unwrap();
    let err = DreamBenchEval::<B>::load(&s.clip, &s.dino, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tokenizer"), "{err}");
    let err = DreamBenchEval::<B>::load(&s.clip, Path::new("/nonexistent/dino"), &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/dino"), "{err}");
    // The real 224 processor with the 32-px tiny model: a size mismatch, not a crash.
    let (clip, dino) = model_dirs(&s.generated.parent().unwrap().join("m2"));
    std::fs::copy(
        fixture("dino").join("preprocessor_config.json"),
        dino.join("preprocessor_config.json"),
    )
    .unwrap();
    let err = DreamBenchEval::<B>::load(&clip, &dino, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("224"), "{err}");
    assert!(DreamBench::open(&s.generated).is_err());
}

/// The real DreamBench: 30 subjects, 158 photos, 25 prompts per list, live = cats and dogs.
#[test]
fn real_dreambench_layout() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/dreambench");
    if !root.is_dir() {
        eprintln!(
            "SKIPPED real_dreambench_layout: {} is absent",
            root.display()
        );
        return;
    }
    let bench = DreamBench::open(&root).unwrap();
    assert_eq!(bench.subjects.len(), 30);
    assert_eq!(
        bench.subjects.iter().map(|s| s.images.len()).sum::<usize>(),
        158
    );
    assert_eq!(
        (bench.object_prompts.len(), bench.live_prompts.len()),
        (25, 25)
    );
    let live: Vec<&str> = bench
        .subjects
        .iter()
        .filter(|s| s.live)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        live,
        ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    );
    let dog = bench.subject("dog").unwrap();
    assert_eq!(bench.eval_prompt(dog, 0).unwrap(), "a dog in the jungle");
    assert_eq!(
        bench.eval_prompt(dog, 13).unwrap(),
        "a dog wearing a black top hat and a monocle"
    );
    let plush = bench.subject("bear_plushie").unwrap();
    assert_eq!(
        bench.eval_prompt(plush, 24).unwrap(),
        "a cube shaped stuffed animal"
    );
    assert_eq!(
        bench.eval_prompt(plush, 13).unwrap(),
        "a stuffed animal floating on top of water"
    );
    assert!(bench.eval_prompt(plush, 25).is_none());
}

#[test]
fn oracle_scores_real_photos_against_each_other() {
    let s = setup();
    let device = Default::default();
    let mut ev = DreamBenchEval::<B>::load(&s.clip, &s.dino, &device).unwrap();
    let bench = DreamBench::open(&s.bench).unwrap();
    let report = ev.oracle(&bench, &[], 4).unwrap();
    // `dog` has one photo: nothing to compare it with.
    assert_eq!(report.subjects.len(), 1, "{report:?}");
    let (name, n, d, c) = report.subjects[0].clone();
    assert_eq!((name.as_str(), n), ("teapot", 2));
    let teapot = bench.subject("teapot").unwrap().clone();
    let (real, _) = ev.real_embeddings(&bench, &teapot, 4).unwrap();
    let (want_d, want_c) = (
        dot(&real.dino, 0, &real.dino, 1),
        dot(&real.clip, 0, &real.clip, 1),
    );
    println!("oracle teapot: DINO {d:.6} (cos {want_d:.6}), CLIP-I {c:.6} (cos {want_c:.6})");
    assert!((d - want_d).abs() < 1e-6 && (c - want_c).abs() < 1e-6);
    assert!(d < 0.999999, "two different photos are not identical: {d}");
    assert_eq!(report.mean, Some((d, c)));
    assert!(report.to_markdown().contains("| teapot | 2 |"));
    assert!(ev
        .oracle(&bench, &["dog".to_string()], 4)
        .unwrap()
        .mean
        .is_none());
}
