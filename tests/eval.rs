//! `blipd eval` end to end on the tiny DINO / CLIP fixtures of blipd-models: a synthetic two-subject
//! DreamBench, generated images with a copy of a real photo (DINO = CLIP-I = 1), a corrupt image reported
//! with its path while the run goes on, the JSON + Markdown reports, and clear errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fixture, model_dir, text, tiny_bench};

fn blipd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_blipd"));
    c.env("BLIPD_LOG", "warn");
    c
}

fn run_eval(clip: &Path, dino: &Path, bench: &Path, generated: &Path, out: &Path) -> Output {
    blipd()
        .arg("eval")
        .arg("--generated")
        .arg(generated)
        .arg("--dreambench")
        .arg(bench)
        .arg("--clip")
        .arg(clip)
        .arg("--dino")
        .arg(dino)
        .arg("--out")
        .arg(out)
        .args(["--batch-size", "2"])
        .output()
        .unwrap()
}

#[test]
fn eval_scores_a_generated_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let clip = model_dir(root, "clip", &["vocab.json", "merges.txt"]);
    let dino = model_dir(root, "dino", &[]);
    // The vase's real image is a gradient, so the dog photo generated for it is not a copy.
    let bench = tiny_bench(root);
    let generated = root.join("generated");
    for d in ["dog", "vase"] {
        std::fs::create_dir_all(generated.join(d)).unwrap();
    }
    let photo = fixture("clip").join("image.png");
    for p in 0..3 {
        std::fs::copy(&photo, generated.join(format!("dog/{p}_0.png"))).unwrap();
    }
    std::fs::copy(&photo, generated.join("vase/1_0.png")).unwrap();
    std::fs::write(generated.join("vase/0_0.png"), b"\x89PNG broken").unwrap();

    let out = root.join("report/scores.json");
    let o = run_eval(&clip, &dino, &bench, &generated, &out);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("vase/0_0.png"), "bad image path reported: {t}");
    assert!(t.contains("| dog | dog | 3 | 1.000 | 1.000 |"), "{t}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["n_images"], 4);
    let bad = v["bad_images"].as_array().unwrap();
    assert_eq!(bad.len(), 1);
    assert!(bad[0]["path"].as_str().unwrap().ends_with("vase/0_0.png"));
    let dog = v["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subject"] == "dog")
        .unwrap();
    assert!((dog["dino"].as_f64().unwrap() - 1.0).abs() < 1e-5);
    assert!((dog["clip_i"].as_f64().unwrap() - 1.0).abs() < 1e-5);
    // CLIP-T of the dog photo with "a dog in the jungle" etc. = transformers' (gen_clip.py): mean of
    // photo_clip_t.
    let io =
        blipd_models::weights::StateDict::read(&fixture("clip").join("io.safetensors")).unwrap();
    let ct = io
        .data("photo_clip_t")
        .unwrap()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap();
    let want = ct.iter().map(|&x| f64::from(x)).sum::<f64>() / 3.0;
    assert!(
        (dog["clip_t"].as_f64().unwrap() - want).abs() < 1e-4,
        "{dog} vs {want}"
    );
    let vase = v["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subject"] == "vase")
        .unwrap();
    assert!(vase["dino"].as_f64().unwrap() < 0.999);
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert!(md.contains("| vase | vase | 1 |"), "{md}");

    // The oracle row: a second dog photo (the first mirrored) against the first; the vase has one.
    let mirrored = image::imageops::flip_horizontal(&image::open(&photo).unwrap().to_rgb8());
    mirrored.save(bench.join("dog/01.png")).unwrap();
    let oracle_out = root.join("oracle.json");
    let o = blipd()
        .arg("eval")
        .arg("--oracle")
        .arg("--dreambench")
        .arg(&bench)
        .arg("--clip")
        .arg(&clip)
        .arg("--dino")
        .arg(&dino)
        .arg("--out")
        .arg(&oracle_out)
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("| dog | 2 |") && !t.contains("| vase |"), "{t}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&oracle_out).unwrap()).unwrap();
    let d = v["mean"]["dino"].as_f64().unwrap();
    assert!(d > -1.0 && d < 0.99999, "{v}");
    std::fs::remove_file(bench.join("dog/01.png")).unwrap();

    // Errors: a missing model folder, no scorable image.
    let o = run_eval(&clip, &root.join("no_dino"), &bench, &generated, &out);
    assert!(!o.status.success());
    assert!(text(&o).contains("no_dino"), "{}", text(&o));
    let empty = root.join("empty");
    std::fs::create_dir_all(empty.join("dog")).unwrap();
    let o = run_eval(&clip, &dino, &bench, &empty, &root.join("e.json"));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no generated image"), "{}", text(&o));
}

#[test]
fn eval_generates_with_a_pipeline_then_scores_and_keeps_what_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let clip = model_dir(root, "clip", &["vocab.json", "merges.txt"]);
    let dino = model_dir(root, "dino", &[]);
    let bench = tiny_bench(root);
    let generated = root.join("generated");
    let out = root.join("scores.json");
    let gen = |extra: &[&str]| {
        blipd()
            .arg("eval")
            .arg("--model")
            .arg(fixture("pipeline"))
            .arg("--generated")
            .arg(&generated)
            .arg("--dreambench")
            .arg(&bench)
            .arg("--clip")
            .arg(&clip)
            .arg("--dino")
            .arg(&dino)
            .arg("--out")
            .arg(&out)
            .args(["--prompts-per-subject", "1", "--images-per-prompt", "2"])
            .args(["--steps", "2", "--size", "16"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = gen(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let files = ["dog/0_0.png", "dog/0_1.png", "vase/0_0.png", "vase/0_1.png"];
    for f in files {
        assert!(generated.join(f).is_file(), "{f} missing: {}", text(&o));
    }
    // The two samples of a prompt start from different noise.
    let a = image::open(generated.join("dog/0_0.png"))
        .unwrap()
        .to_rgb8();
    let b = image::open(generated.join("dog/0_1.png"))
        .unwrap()
        .to_rgb8();
    assert_ne!(a.as_raw(), b.as_raw());
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["n_images"], 4, "{v}");
    let dino_mean = v["mean"]["dino"].as_f64().unwrap();
    assert!(dino_mean.is_finite() && dino_mean.abs() <= 1.0, "{v}");

    // A rerun keeps the images there (same bytes, untouched) and regenerates a deleted one identically.
    let mtime = |f: &str| {
        std::fs::metadata(generated.join(f))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = [mtime("vase/0_0.png"), mtime("dog/0_0.png")];
    std::fs::remove_file(generated.join("dog/0_1.png")).unwrap();
    let o = gen(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let after = [mtime("vase/0_0.png"), mtime("dog/0_0.png")];
    assert_eq!(before, after, "an existing image was rewritten");
    let b2 = image::open(generated.join("dog/0_1.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(b.as_raw(), b2.as_raw(), "the regenerated image differs");

    // An unknown subject is a clear error.
    let o = gen(&["--subject", "unicorn"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("unicorn"), "{}", text(&o));
}
