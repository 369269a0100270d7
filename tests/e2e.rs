//! What a user does, start to finish, through the `blipd` binary:
//!
//! - pre-train on the embedded default plan → resume with a longer schedule → plot → generate from the
//!   run's exported pipeline → score it on a (tiny) DreamBench with `blipd eval --model`;
//! - make data from OpenImages-style inputs (`data filter` on a box CSV → `data masks` from the
//!   OpenImages segmentation masks, and with CLIPSeg → `data synth` into shards) → pre-train both stages
//!   on those shards → generate. (The synthesis uses the OpenImages-style masks: the random-weight
//!   CLIPSeg fixture's maps are not subject-shaped, so no trimap survives them.)

mod common;

use std::path::Path;

use common::{blipd, run_ok};

/// [`common::generate_16px`] from a tiny-preset export: 32-px images.
fn generate_16px(model: &Path, subject: &str, prompt: &str, out_png: &Path) {
    common::generate_16px(model, subject, prompt, out_png);
    // As in diffusers, the latent size is height / 2^(U-Net levels − 1) (2 for the tiny U-Net), and
    // the tiny VAE decodes ×4: 16 → 8×8 latents → 32×32 pixels (both factors are 8 for SD-1.5).
    assert_eq!(
        image::open(out_png).unwrap().to_rgb8().dimensions(),
        (32, 32)
    );
}

#[test]
fn pretrain_resume_plot_generate_and_evaluate() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let short = [
        "--set",
        "stage1.train.max_steps=3",
        "--set",
        "stage2.train.max_steps=4",
        "--set",
        "stage2.checkpoint.every=2",
        "--set",
        "stage2.sample.every=0",
        "--set",
        "stage2.data.synthetic.pairs=8",
    ];
    let stdout = run_ok(
        blipd()
            .arg("pretrain")
            .arg("--run-dir")
            .arg(&run)
            .args(short),
    );
    assert!(stdout.contains("stage 1: step 3"), "{stdout}");
    assert!(stdout.contains("stage 2: step 4"), "{stdout}");
    assert!(run
        .join("stage1/export/qformer/model.safetensors")
        .is_file());
    let s2cfg = std::fs::read_to_string(run.join("stage2/config.toml")).unwrap();
    assert!(
        s2cfg.contains("stage1/export/qformer/model.safetensors"),
        "stage 2 starts from stage 1:\n{s2cfg}"
    );
    assert!(run.join("plan.toml").is_file());
    let metrics = std::fs::read_to_string(run.join("stage2/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);
    assert!(
        run.join("stage2/samples").is_dir(),
        "a sample grid at the end"
    );
    // The run ends with a pipeline folder that `blipd generate` takes.
    generate_16px(
        &run.join("stage2/export"),
        "ball",
        "on a beach",
        &run.join("gen.png"),
    );

    // Resume with a longer schedule continues from step 4.
    let stdout = run_ok(
        blipd()
            .arg("resume")
            .arg(&run)
            .args(["--set", "stage2.train.max_steps=6"]),
    );
    assert!(stdout.contains("resumed from step 4"), "{stdout}");
    let metrics = std::fs::read_to_string(run.join("stage2/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 6);
    // TensorBoard event files beside metrics.jsonl: the loss curve of both sessions as
    // metrics.jsonl has it, and the sample sheet as an image.
    let s2 = run.join("stage2");
    let tb_loss = blipd_train::tensorboard::read_scalars(&s2, "train/loss").unwrap();
    let jsonl: Vec<(u64, f32)> = blipd_train::metrics::read_metrics(&s2.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| (r.step, r.loss as f32))
        .collect();
    assert_eq!(tb_loss, jsonl);
    let images: Vec<String> = blipd_train::tensorboard::event_files(&s2)
        .unwrap()
        .iter()
        .flat_map(|f| blipd_train::tensorboard::read_events(f).unwrap())
        .flat_map(|e| e.summary.into_iter().flat_map(|s| s.value))
        .filter(|v| v.image.is_some())
        .map(|v| v.tag)
        .collect();
    assert!(
        images.contains(&"samples/samples".to_string()),
        "{images:?}"
    );

    run_ok(blipd().arg("plot").arg(&run));
    assert!(run.join("stage2/loss.png").is_file());
    // The plan's two stages in one figure too.
    assert!(run.join("loss-all.png").is_file());

    // The resumed run's export, generated from and scored on a two-subject DreamBench.
    let export = run.join("stage2/export");
    generate_16px(&export, "ball", "on a beach", &run.join("gen-resumed.png"));
    let root = tmp.path();
    let clip = common::model_dir(root, "clip", &["vocab.json", "merges.txt"]);
    let dino = common::model_dir(root, "dino", &[]);
    let bench = common::tiny_bench(root);
    let scores = root.join("eval/scores.json");
    let t = run_ok(
        blipd()
            .arg("eval")
            .arg("--model")
            .arg(&export)
            .arg("--dreambench")
            .arg(&bench)
            .arg("--clip")
            .arg(&clip)
            .arg("--dino")
            .arg(&dino)
            .arg("--out")
            .arg(&scores)
            .arg("--generated")
            .arg(root.join("eval"))
            .args(["--prompts-per-subject", "1", "--images-per-prompt", "1"])
            .args(["--steps", "2", "--size", "16", "--batch-size", "2"])
            .args(["--seeds", "2"]),
    );
    // Two seeds, each generated and scored on its own, then mean ± std over them (tables 5/6 and 1).
    for seed in [0, 1] {
        for d in ["dog", "vase"] {
            let img = root.join(format!("eval/seed-{seed}/{d}/0_0.png"));
            assert!(img.is_file(), "{}\n{t}", img.display());
        }
        assert!(root.join(format!("eval/seed-{seed}/scores.json")).is_file());
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&scores).unwrap()).unwrap();
    assert_eq!(report["seeds"], serde_json::json!([0, 1]), "{report}");
    let subjects = report["subjects"].as_array().unwrap();
    assert_eq!(subjects.len(), 2, "{report}");
    for s in subjects.iter().chain([&report["average"]]) {
        for k in ["dino", "clip_i", "clip_t"] {
            let (m, sd) = (
                s[k]["mean"].as_f64().unwrap(),
                s[k]["std"].as_f64().unwrap(),
            );
            assert!(m.abs() <= 1.0 && (0.0..=2.0).contains(&sd), "{k}: {s}");
        }
    }
    let md = std::fs::read_to_string(scores.with_extension("md")).unwrap();
    assert!(md.contains("| **average** |") && md.contains(" ± "), "{md}");
    // The contact sheet: a row per subject (real photo + its generated image).
    let sheet = image::open(scores.with_extension("png")).unwrap().to_rgb8();
    assert!(
        sheet.width() >= 2 * 128 && sheet.height() >= 2 * 128,
        "{:?}",
        sheet.dimensions()
    );
}

/// A binary ellipse inscribed in the box `[x_min, x_max, y_min, y_max]` (fractions of `w`×`h`).
fn ellipse(w: u32, h: u32, b: [f64; 4]) -> image::GrayImage {
    let (cx, cy) = (
        (b[0] + b[1]) / 2.0 * w as f64,
        (b[2] + b[3]) / 2.0 * h as f64,
    );
    let (rx, ry) = (
        (b[1] - b[0]) / 2.0 * w as f64,
        (b[3] - b[2]) / 2.0 * h as f64,
    );
    image::GrayImage::from_fn(w, h, |x, y| {
        let (dx, dy) = ((x as f64 + 0.5 - cx) / rx, (y as f64 + 0.5 - cy) / ry);
        image::Luma([if dx * dx + dy * dy <= 1.0 { 255 } else { 0 }])
    })
}

/// Two subject photos as OpenImages JPEGs, with a box CSV and class descriptions as the dataset ships
/// them (13-column boxes: ImageID, Source, LabelName, Confidence, XMin, XMax, YMin, YMax, IsOccluded,
/// IsTruncated, IsGroupOf, IsDepiction, IsInside).
fn openimages_sample(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let photos = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../blipd-apps/tests/fixtures/clipseg_masks/images");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for id in ["0a1b2c3d4e5f6071", "1f2e3d4c5b6a7988"] {
        image::open(photos.join(format!("{id}.png")))
            .unwrap()
            .to_rgb8()
            .save(images.join(format!("{id}.jpg")))
            .unwrap();
    }
    let boxes = dir.join("boxes.csv");
    std::fs::write(
        &boxes,
        "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n\
         0a1b2c3d4e5f6071,xclick,/m/0bt9lr,1,0.1,0.9,0.05,0.95,0,0,0,0,0\n\
         0a1b2c3d4e5f6071,xclick,/m/0bt9lr,1,0.4,0.5,0.4,0.5,0,0,0,0,0\n\
         1f2e3d4c5b6a7988,xclick,/m/0kmg4,1,0.2,0.8,0.1,0.9,0,0,0,0,0\n\
         1f2e3d4c5b6a7988,xclick,/m/0kmg4,1,0.1,0.9,0.1,0.9,0,0,1,0,0\n",
    )
    .unwrap();
    let classes = dir.join("classes.csv");
    std::fs::write(&classes, "/m/0bt9lr,Dog\n/m/0kmg4,Stuffed animal\n").unwrap();
    (images, boxes, classes)
}

#[test]
fn data_filter_masks_synth_then_pretrain_on_the_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (images, boxes, classes) = openimages_sample(root);

    // Filter: a box too small and a group box are dropped, one subject per image kept.
    let kept = root.join("kept.csv");
    let t = run_ok(
        blipd()
            .args(["data", "filter", "--boxes"])
            .arg(&boxes)
            .arg("--classes")
            .arg(&classes)
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(&kept),
    );
    let csv = std::fs::read_to_string(&kept).unwrap();
    assert_eq!(csv.lines().count(), 3, "header + 2 subjects:\n{csv}\n{t}");
    assert!(
        csv.contains("Dog") && csv.contains("Stuffed animal"),
        "{csv}"
    );

    // Masks from the OpenImages segmentation masks (`<ImageID>_<mid>_<BoxID>.png`, in sub-folders as
    // unzipped; an ellipse in each box here)...
    let segm = root.join("segm/train-masks-0");
    std::fs::create_dir_all(&segm).unwrap();
    for (id, mid, b) in [
        ("0a1b2c3d4e5f6071", "m0bt9lr", [0.1, 0.9, 0.05, 0.95]),
        ("1f2e3d4c5b6a7988", "m0kmg4", [0.2, 0.8, 0.1, 0.9]),
    ] {
        let (w, h) = image::image_dimensions(images.join(format!("{id}.jpg"))).unwrap();
        ellipse(w, h, b)
            .save(segm.join(format!("{id}_{mid}_a1b2c3d4.png")))
            .unwrap();
    }
    let masks = root.join("masks");
    let t = run_ok(
        blipd()
            .args(["data", "masks", "--source", "openimages", "--from"])
            .arg(root.join("segm"))
            .arg("--subjects")
            .arg(&kept)
            .arg("--out")
            .arg(&masks),
    );
    assert!(masks.join("0a1b2c3d4e5f6071.png").is_file(), "{t}");
    assert!(masks.join("1f2e3d4c5b6a7988.png").is_file(), "{t}");
    // ... and from CLIPSeg prompted with the class names (the tiny transformers-layout fixture).
    let clipseg = repo.join("crates/blipd-apps/tests/fixtures/clipseg_masks/model");
    let t = run_ok(
        blipd()
            .args(["data", "masks", "--source", "clipseg", "--batch-size", "2"])
            .arg("--from")
            .arg(&clipseg)
            .arg("--images")
            .arg(&images)
            .arg("--subjects")
            .arg(&kept)
            .arg("--out")
            .arg(root.join("masks-clipseg")),
    );
    assert!(t.contains("2 masks written"), "{t}");

    // Synthesis: trimap → matting → foreground → composite → shards.
    let pairs = root.join("pairs");
    let t = run_ok(
        blipd()
            .args(["data", "synth", "--config"])
            .arg(repo.join("configs/data/pipeline.toml"))
            .arg("--subjects")
            .arg(&kept)
            .arg("--images")
            .arg(&images)
            .arg("--masks")
            .arg(&masks)
            .args(["--mask-source", "dir", "--backgrounds"])
            .arg(&images)
            .arg("--out")
            .arg(&pairs),
    );
    assert!(pairs.join("manifest.json").is_file(), "{t}");
    assert!(t.contains("2 pairs in total"), "{t}");

    // Both stages of the embedded-default plan train on the shards instead of procedural data.
    let tiny = std::fs::read_to_string(repo.join("configs/tiny.toml")).unwrap();
    let synthetic1 = "[stage1.data.synthetic]\npairs = 64\nseed = 0\nsize = 32\n";
    assert!(tiny.contains(synthetic1), "configs/tiny.toml changed");
    let plan = tiny.replace(
        synthetic1,
        &format!(
            "[stage1.data]\nshards = {:?}\n",
            pairs.display().to_string()
        ),
    );
    let plan_path = root.join("plan.toml");
    std::fs::write(&plan_path, plan).unwrap();
    let run = root.join("run");
    let stdout = run_ok(
        blipd()
            .arg("pretrain")
            .arg("--config")
            .arg(&plan_path)
            .arg("--run-dir")
            .arg(&run)
            .args(["--set", "stage1.train.max_steps=2"])
            .args(["--set", "stage1.train.batch_size=2"])
            .args(["--set", "stage2.train.max_steps=2"])
            .args(["--set", "stage2.train.batch_size=2"])
            .args(["--set", "stage2.sample.at_end=false"])
            .args(["--set", "stage2.sample.every=0"])
            .arg("--set")
            .arg(format!(
                "stage2.data.shards={:?}",
                pairs.display().to_string()
            )),
    );
    assert!(stdout.contains("stage 1: step 2"), "{stdout}");
    assert!(stdout.contains("stage 2: step 2"), "{stdout}");
    let s1 = std::fs::read_to_string(run.join("stage1/config.toml")).unwrap();
    let s2 = std::fs::read_to_string(run.join("stage2/config.toml")).unwrap();
    for (stage, cfg) in [("stage 1", &s1), ("stage 2", &s2)] {
        assert!(
            cfg.contains(&pairs.display().to_string()),
            "{stage} reads the shards:\n{cfg}"
        );
    }
    generate_16px(
        &run.join("stage2/export"),
        "dog",
        "in the snow",
        &root.join("gen.png"),
    );
}
