//! CLIPSeg masks against transformers 4.44.2 (`scripts/reference/gen_clipseg_masks.py`): the fixture is a
//! complete local model folder (tiny random CLIPSegForImageSegmentation, rd64-refined's
//! preprocessor_config.json, a CLIP BPE vocabulary) and two photos; the reference ran
//! `CLIPSegProcessor(text=classes, images=photos, padding=True)` → model → sigmoid.

mod common;

use std::path::{Path, PathBuf};

use blipd_apps::segment::{
    write_clipseg_masks, ClipSegSegmenter, MaskEvent, MaskJobOptions, MaskMap, SegmentError,
};
use blipd_apps::RgbImage;
use blipd_models::weights::StateDict;
use burn::tensor::TensorData;

type B = blipd_testkit::Cpu;

const IDS: [&str; 2] = ["0a1b2c3d4e5f6071", "1f2e3d4c5b6a7988"];
const CLASSES: [&str; 2] = ["dog", "stuffed animal"];

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clipseg_masks")
}

fn io() -> StateDict {
    StateDict::read_safetensors(&fixture().join("io.safetensors")).unwrap()
}

fn f32s(sd: &StateDict, key: &str) -> (Vec<usize>, Vec<f32>) {
    let d: TensorData = sd.data(key).unwrap();
    (
        d.shape.to_vec(),
        d.convert::<f32>().to_vec::<f32>().unwrap(),
    )
}

use common::max_abs_diff as max_abs;

fn images() -> Vec<RgbImage> {
    IDS.iter()
        .map(|id| RgbImage::open(&fixture().join(format!("images/{id}.png"))).unwrap())
        .collect()
}

fn segmenter() -> ClipSegSegmenter<B> {
    ClipSegSegmenter::<B>::load(&fixture().join("model"), &Default::default()).unwrap()
}

#[test]
fn tokens_and_pixels_match_clipseg_processor() {
    let seg = segmenter();
    let sd = io();
    let ids = sd.data("input_ids").unwrap();
    let l = ids.shape[1];
    let ids: Vec<i64> = ids.convert::<i64>().to_vec().unwrap();
    let mask: Vec<i64> = sd
        .data("attention_mask")
        .unwrap()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    let ours = seg.tokenize(&CLASSES).unwrap();
    for (i, (row, m)) in ours.input_ids.iter().zip(&ours.attention_mask).enumerate() {
        let r: Vec<i64> = row.iter().map(|&v| i64::from(v)).collect();
        let mm: Vec<i64> = m.iter().map(|&v| i64::from(v)).collect();
        assert_eq!(r, ids[i * l..(i + 1) * l], "input_ids row {i}");
        assert_eq!(mm, mask[i * l..(i + 1) * l], "attention_mask row {i}");
    }

    let (shape, sub) = f32s(&sd, "pixel_values_sub");
    assert_eq!(shape, [2, 3, 32, 32]);
    let (_, sums) = f32s(&sd, "pixel_sums");
    let s = seg.map_size();
    assert_eq!(s, 352);
    let mut worst = 0f32;
    for (i, img) in images().iter().enumerate() {
        let pv = seg.processor.pixel_values(img).unwrap();
        for c in 0..3 {
            let plane = &pv[c * s * s..(c + 1) * s * s];
            let mut ours_sub = Vec::new();
            for y in (0..s).step_by(11) {
                for x in (0..s).step_by(11) {
                    ours_sub.push(plane[y * s + x]);
                }
            }
            let off = (i * 3 + c) * 32 * 32;
            worst = worst.max(max_abs(&ours_sub, &sub[off..off + 32 * 32]));
            let sum: f64 = plane.iter().map(|&v| f64::from(v)).sum();
            let r = f64::from(sums[i * 3 + c]);
            assert!(
                (sum - r).abs() <= 1e-3 * r.abs().max(1.0),
                "image {i} channel {c}: pixel sum {sum} vs {r} (the resize is not Pillow's)"
            );
        }
    }
    println!("pixel_values (every 11th pixel) max-abs error {worst:.3e}");
    assert!(worst <= 1e-6, "pixel_values max-abs {worst}");
}

#[test]
fn probability_maps_match_transformers() {
    let seg = segmenter();
    let sd = io();
    let imgs = images();
    let (shape, reference) = f32s(&sd, "probs");
    assert_eq!(shape, [2, 352, 352]);
    let probs = seg.probabilities(&imgs, &CLASSES).unwrap();
    let ours: Vec<f32> = probs.iter().flat_map(|m| m.data.clone()).collect();
    let err = max_abs(&ours, &reference);
    let (lo, hi) = (
        reference.iter().filter(|&&p| p <= 0.1).count(),
        reference.iter().filter(|&&p| p >= 0.9).count(),
    );
    println!(
        "CLIPSeg 352×352 probability maps (2 images): max-abs error {err:.3e} ({lo} px ≤ 0.1, {hi} px ≥ 0.9 of {})",
        reference.len()
    );
    assert!(
        lo > 1000 && hi > 1000,
        "the fixture should exercise both trimap ends"
    );
    assert!(err <= 1e-4, "probability max-abs error {err}");

    // Per-image batches give the same maps as the batch of two (padding does not matter).
    let single = seg.probabilities(&imgs[1..], &CLASSES[1..]).unwrap();
    let e1 = max_abs(&single[0].data, &probs[1].data);
    assert!(e1 <= 1e-5, "batch of one vs two: {e1}");

    // At the image size: logits resized bilinearly (align_corners=False), then sigmoid.
    let full = seg.masks(&imgs, &CLASSES).unwrap();
    for (i, (m, img)) in full.iter().zip(&imgs).enumerate() {
        assert_eq!((m.width, m.height), (img.width, img.height));
        let (shape, r) = f32s(&sd, &format!("mask_{i}"));
        let step = if i == 0 { 1 } else { 2 };
        let sub: Vec<f32> = (0..m.height)
            .step_by(step)
            .flat_map(|y| {
                (0..m.width)
                    .step_by(step)
                    .map(move |x| (y, x))
                    .collect::<Vec<_>>()
            })
            .map(|(y, x)| m.data[y * m.width + x])
            .collect();
        assert_eq!(shape, [m.height.div_ceil(step), m.width.div_ceil(step)]);
        let e = max_abs(&sub, &r);
        println!(
            "mask {i} at {}×{}: max-abs error {e:.3e}",
            m.width, m.height
        );
        assert!(e <= 1e-4, "image-size mask {i}: {e}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn broken_model_folders_name_the_file_or_key() {
    let err = |dir: &Path| match ClipSegSegmenter::<B>::load(dir, &Default::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => {
            println!("{}: {e}\n", dir.file_name().unwrap().to_string_lossy());
            e
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let e = err(&tmp.path().join("nowhere"));
    assert!(matches!(e, SegmentError::NoFolder(_)), "{e}");

    let base = tmp.path().join("m");
    let fresh = |name: &str| {
        let d = tmp.path().join(name);
        copy_dir(&base, &d);
        d
    };
    copy_dir(&fixture().join("model"), &base);

    let d = fresh("no_weights");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = err(&d).to_string();
    assert!(e.contains("model.safetensors or pytorch_model.bin"), "{e}");

    let d = fresh("no_merges");
    std::fs::remove_file(d.join("merges.txt")).unwrap();
    let e = err(&d).to_string();
    assert!(e.contains("missing merges.txt"), "{e}");

    let d = fresh("no_config");
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert!(err(&d).to_string().contains("missing config.json"));

    // A config that no longer fits the weights: every mis-shaped key is listed.
    let d = fresh("mismatch");
    let p = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["reduce_dim"] = serde_json::json!(8);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = err(&d);
    let text = e.to_string();
    assert!(matches!(e, SegmentError::Weights { .. }), "{text}");
    assert!(text.contains("model.safetensors"), "{text}");
    assert!(
        text.contains("mismatched") && text.contains("decoder.reduces.0.weight"),
        "{text}"
    );

    // Not a CLIPSeg config.
    let d = fresh("clip");
    let p = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["model_type"] = serde_json::json!("clip");
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = err(&d).to_string();
    assert!(e.contains("model_type"), "{e}");

    // A processor that squashes to a size the patch grid cannot take.
    let d = fresh("size");
    let p = d.join("preprocessor_config.json");
    let mut pp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    pp["size"] = serde_json::json!({"height": 350, "width": 350});
    std::fs::write(&p, pp.to_string()).unwrap();
    let e = err(&d).to_string();
    assert!(e.contains("`size`") && e.contains("patch size 16"), "{e}");
}

#[test]
fn mask_folder_job_writes_skips_and_reports() {
    let seg = segmenter();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    copy_dir(&fixture().join("images"), &images);
    std::fs::write(
        images.join("c0ffee0000000001.jpg"),
        b"\xff\xd8\xff\xe0 not a jpeg",
    )
    .unwrap();
    let csv = tmp.path().join("kept.csv");
    std::fs::write(
        &csv,
        format!(
            "ImageID,LabelName,ClassName,XMin,XMax,YMin,YMax\n\
             {},/m/0bt9lr,Dog,0.1,0.9,0.05,0.95\n\
             c0ffee0000000001,/m/01yrx,Cat,0.1,0.9,0.1,0.9\n\
             deadbeef00000002,/m/01yrx,Cat,0.1,0.9,0.1,0.9\n\
             {},/m/0kmg4,Stuffed animal,0.2,0.8,0.1,0.9\n\
             {},/m/0bt9lr,Dog,0.1,0.9,0.05,0.95\n",
            IDS[0], IDS[1], IDS[0]
        ),
    )
    .unwrap();
    let rows = blipd_data::synth::read_subjects_csv(&csv).unwrap();
    let out = tmp.path().join("masks");
    let mut opts = MaskJobOptions::new(&images, &out);
    opts.batch_size = 2;
    let events = std::sync::Mutex::new(Vec::new());
    let progress = |e: MaskEvent| events.lock().unwrap().push(format!("{e:?}"));
    let report = write_clipseg_masks(&seg, &rows, &opts, &progress).unwrap();
    assert_eq!(
        (report.written, report.existing, report.duplicates),
        (2, 0, 1)
    );
    let bad: Vec<(&str, &str)> = report
        .bad
        .iter()
        .map(|b| (b.image_id.as_str(), b.stage.as_str()))
        .collect();
    assert_eq!(
        bad,
        [("c0ffee0000000001", "image"), ("deadbeef00000002", "image")]
    );
    assert!(
        report.bad[1].reason.contains("not found"),
        "{:?}",
        report.bad
    );
    assert_eq!(events.lock().unwrap().len(), 1 + 4);

    // The written PNGs are the image-size probability maps, 16-bit, read back by the `dir` mask source.
    let store =
        blipd_data::masks::MaskStore::open(blipd_data::masks::MaskSource::Dir, &out).unwrap();
    let imgs = images_from(&images);
    let expected = seg.masks(&imgs, &CLASSES).unwrap();
    for (i, (s, m)) in [0usize, 3]
        .iter()
        .map(|&r| rows[r].as_ref().unwrap())
        .zip(&expected)
        .enumerate()
    {
        let loaded = store
            .load_native(s, &blipd_data::ReadLimits::default())
            .unwrap();
        assert_eq!((loaded.mask.width, loaded.mask.height), (m.width, m.height));
        let back: Vec<f32> = loaded.mask.data.iter().map(|&v| v as f32).collect();
        let e = max_abs(&back, &m.data);
        assert!(
            e <= 0.6 / 65535.0,
            "mask {i}: 16-bit quantisation error {e}"
        );
        let raw = image::open(out.join(format!("{}.png", s.image_id))).unwrap();
        assert!(matches!(raw, image::DynamicImage::ImageLuma16(_)));
    }

    // Rerun: everything present is skipped; a deleted mask is rebuilt identically.
    let first = std::fs::read(out.join(format!("{}.png", IDS[1]))).unwrap();
    std::fs::remove_file(out.join(format!("{}.png", IDS[1]))).unwrap();
    let report = write_clipseg_masks(&seg, &rows, &opts, &|_| {}).unwrap();
    assert_eq!((report.written, report.existing), (1, 1));
    assert_eq!(
        std::fs::read(out.join(format!("{}.png", IDS[1]))).unwrap(),
        first
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".png"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    // A template without `{}` is refused before anything runs.
    opts.prompt_template = "a photo".into();
    assert!(write_clipseg_masks(&seg, &rows, &opts, &|_| {}).is_err());
}

fn images_from(dir: &Path) -> Vec<RgbImage> {
    IDS.iter()
        .map(|id| RgbImage::open(&dir.join(format!("{id}.png"))).unwrap())
        .collect()
}

#[test]
fn resize_then_sigmoid_is_what_gets_written() {
    // A 2×2 logit map brought to 4×3: values between the corner logits, sigmoid applied after.
    let m = MaskMap {
        width: 2,
        height: 2,
        data: vec![-4.0, 4.0, 4.0, -4.0],
    };
    let r = m.resize_to(4, 3).sigmoid();
    assert_eq!((r.width, r.height), (4, 3));
    assert!(r.data.iter().all(|&p| (0.0..=1.0).contains(&p)));
    assert!(r.data[0] < 0.05 && r.data[3] > 0.95);
}

/// Full-width check against a real-size random-weight model (150.7 M parameters, the hub config):
/// `python scripts/reference/gen_clipseg_masks.py --full-size DIR`, then
/// `BLIPD_CLIPSEG_FULL=DIR cargo test -p blipd-apps --test segment full_size -- --ignored --nocapture`.
#[test]
#[ignore = "needs BLIPD_CLIPSEG_FULL (a 600 MB model written by gen_clipseg_masks.py --full-size)"]
fn full_size_probability_maps_match_transformers() {
    let dir = PathBuf::from(std::env::var("BLIPD_CLIPSEG_FULL").expect("BLIPD_CLIPSEG_FULL"));
    let t = std::time::Instant::now();
    let seg = ClipSegSegmenter::<B>::load(&dir.join("model"), &Default::default()).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    assert_eq!(
        seg.config,
        blipd_models::clipseg::ClipSegConfig::rd64_refined()
    );
    let reference = StateDict::read_safetensors(&dir.join("io.safetensors")).unwrap();
    let (_, reference) = f32s(&reference, "probs");
    let t = std::time::Instant::now();
    let probs = seg.probabilities(&images(), &CLASSES).unwrap();
    let fwd_s = t.elapsed().as_secs_f64();
    let ours: Vec<f32> = probs.iter().flat_map(|m| m.data.clone()).collect();
    let err = max_abs(&ours, &reference);
    let mid = reference.iter().filter(|&&p| p > 0.1 && p < 0.9).count();
    println!(
        "full-size CLIPSeg (random weights): load {load_s:.1} s, batch of 2 in {fwd_s:.1} s, 352² max-abs \
         error {err:.3e} ({mid} of {} px in (0.1, 0.9))",
        reference.len()
    );
    assert!(err <= 1e-4, "full-size probability max-abs error {err}");
}
