//! Subject fine-tuning on the tiny BlipDiffusion pipeline fixture (crates/blipd-models/tests/fixtures/
//! pipeline) with generated subject photos: the subject embedding and the loss against the released
//! forward computed with diffusers (`scripts/reference/gen_finetune_loss.py` → fixtures/finetune_loss),
//! the subject embedding starts as the mean of the Q-Former's outputs over the photos, only the U-Net and
//! the embedding train (the loss falls), the export holds the trained U-Net and embedding beside the
//! untouched base components, and bad inputs are named. Every test holds `blipd_testkit::serial()`: the
//! backend's random generator is process-global, and exact resumption needs its draws undisturbed.

use blipd_models::ctx_clip_text::{CTX_CACHE_FILE, CTX_CACHE_KEY};
use blipd_models::weights::{collect_reference, KeyMap, StateDict};
use blipd_stage2::finetune::{build, export_dir, run_finetune, FinetuneRunConfig};
use blipd_stage2::{Stage2Components, Stage2Config};
use blipd_train::parse_config;
use burn::prelude::*;

type B = blipd_testkit::CpuTrain;
type I = blipd_testkit::Cpu;

fn fixture() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../blipd-models/tests/fixtures/pipeline")
}

/// Two distinct photos of a "subject" (a disc on a gradient).
fn photos(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, c) in [[200u8, 40, 40], [40, 40, 200]].iter().enumerate() {
        let img = image::RgbImage::from_fn(48, 40, |x, y| {
            let (dx, dy) = (x as i32 - 24, y as i32 - 20);
            if dx * dx + dy * dy < 150 {
                image::Rgb(*c)
            } else {
                image::Rgb([(x * 5) as u8, (y * 6) as u8, 128])
            }
        });
        img.save(dir.join(format!("{i:02}.png"))).unwrap();
    }
}

fn config(dir: &std::path::Path, images: &std::path::Path, steps: u64) -> FinetuneRunConfig {
    let text = format!(
        "[run]\ndir = {:?}\nseed = 3\n[train]\nmax_steps = {steps}\nbatch_size = 2\nprogress = false\n\
         [optimizer]\nlr = 0.002\nweight_decay = 0.01\nmax_grad_norm = 1.0\n[checkpoint]\nevery = 0\n\
         [sample]\nat_end = false\n[stage]\nmodel_dir = {:?}\nsubject = \"dog\"\nsample_steps = 2\n\
         [data]\nimages = {:?}\ntarget_size = 16\n",
        dir.display().to_string(),
        fixture().display().to_string(),
        images.display().to_string()
    );
    parse_config(&text, &[]).unwrap()
}

fn tensors<BB: Backend, M: burn_store::ModuleSnapshot<BB>>(m: &M) -> Vec<(String, Vec<f32>)> {
    collect_reference(m, &KeyMap::new(&[]))
        .unwrap()
        .into_iter()
        .map(|(k, d)| (k, d.to_vec::<f32>().unwrap()))
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    blipd_testkit::max_abs_diff(a, b) as f32
}

#[test]
fn embedding_starts_as_the_mean_subject_embedding_and_training_moves_only_unet_and_ctx() {
    let _serial = blipd_testkit::serial();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("photos");
    photos(&images);
    let cfg = config(&tmp.path().join("run"), &images, 30);
    let dev = Default::default();
    let (stage, model, _) = build::<B>(&cfg, &dev).unwrap();

    // The same Q-Former, photo by photo: the initial embedding is the mean of the two.
    let base = Stage2Config {
        model_dir: Some(fixture()),
        ..Stage2Config::default()
    };
    let parts = Stage2Components::<I>::from_diffusers(&fixture(), &base, &dev).unwrap();
    let s = parts.image_size;
    let mut each = Vec::new();
    for i in 0..2 {
        let img = image::open(images.join(format!("{i:02}.png")))
            .unwrap()
            .to_rgb8();
        let px = Tensor::<I, 4>::from_data(
            TensorData::new(blipd_data::preprocess::clip_input(&img, s), [1, 3, s, s]),
            &dev,
        );
        let toks = parts.bert_tokenizer.encode_batch(&["dog"]).unwrap();
        let q = &parts.model.qformer;
        let h = q.multimodal(
            &q.image_embeds(px),
            toks.ids_tensor(&dev),
            toks.mask_tensor::<I>(&dev).int(),
        );
        each.push(q.project(h).into_data().to_vec::<f32>().unwrap());
    }
    let want: Vec<f32> = each[0]
        .iter()
        .zip(&each[1])
        .map(|(a, b)| (a + b) / 2.0)
        .collect();
    let got = model.ctx.val().into_data().to_vec::<f32>().unwrap();
    let err = max_abs(&got, &want);
    println!(
        "initial subject embedding vs the mean of per-photo Q-Former outputs: max |Δ| {err:.2e}"
    );
    assert!(err < 1e-5, "{err}");
    assert!(
        max_abs(&each[0], &each[1]) > 1e-3,
        "the two photos must differ"
    );
    drop(stage);

    // Train, then compare with the base components.
    let summary = run_finetune::<B>(&cfg, dev).unwrap();
    let losses: Vec<f64> = blipd_train::metrics::read_metrics(&cfg.run.dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| r.loss)
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[losses.len() - 5..]));
    println!("fine-tuning loss, mean of steps 1-5 → 26-30: {first:.4} → {last:.4} ({summary:?})");
    assert!(last < 0.8 * first, "{losses:?}");

    let export = export_dir(&cfg);
    let back = Stage2Components::<I>::from_diffusers(&export, &base, &dev).unwrap();
    let (u0, u1) = (tensors(&parts.model.unet), tensors(&back.model.unet));
    let moved = u0
        .iter()
        .zip(&u1)
        .filter(|(a, b)| max_abs(&a.1, &b.1) > 0.0)
        .count();
    assert!(
        moved > u0.len() / 2,
        "only {moved} of {} U-Net tensors changed",
        u0.len()
    );
    for (what, a, b) in [
        (
            "text_encoder",
            tensors(&parts.model.text_encoder),
            tensors(&back.model.text_encoder),
        ),
        (
            "qformer",
            tensors(&parts.model.qformer),
            tensors(&back.model.qformer),
        ),
        ("vae", tensors(&parts.vae), tensors(&back.vae)),
    ] {
        for ((k, x), (_, y)) in a.iter().zip(&b) {
            assert_eq!(max_abs(x, y), 0.0, "{what}.{k} changed");
        }
    }
    let cache = StateDict::read(&export.join(CTX_CACHE_FILE)).unwrap();
    let trained = cache.data(CTX_CACHE_KEY).unwrap().to_vec::<f32>().unwrap();
    let moved = max_abs(&trained, &want);
    println!("subject embedding moved by max |Δ| {moved:.2e}");
    assert!(moved > 1e-4, "the subject embedding did not train");
    let index: serde_json::Value =
        blipd_models::read_json(&export.join("model_index.json")).unwrap();
    assert_eq!(index[CTX_CACHE_KEY], CTX_CACHE_FILE);
    assert_eq!(index["ctx_begin_pos"], 2, "the base index is kept");
}

#[test]
fn bad_inputs_are_named() {
    let _serial = blipd_testkit::serial();
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "no photos").unwrap();
    let err = build::<B>(
        &config(&tmp.path().join("a"), &empty, 1),
        &Default::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("no .jpg") && err.contains("empty"), "{err}");
    let bad = tmp.path().join("bad");
    photos(&bad);
    std::fs::write(bad.join("02.jpg"), b"\xff\xd8\xff truncated").unwrap();
    let err = build::<B>(&config(&tmp.path().join("b"), &bad, 1), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("02.jpg"), "{err}");
}

#[test]
fn subject_embedding_and_loss_match_the_released_forward() {
    let _serial = blipd_testkit::serial();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("photos");
    photos(&images);
    let cfg = config(&tmp.path().join("run"), &images, 1);
    let dev = Default::default();
    let (stage, mut model, _) = build::<B>(&cfg, &dev).unwrap();
    let io = StateDict::read(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../blipd-models/tests/fixtures/finetune_loss/io.safetensors"),
    )
    .unwrap();
    let t4 = |k: &str| Tensor::<I, 4>::from_data(io.data(k).unwrap().convert::<f32>(), &dev);
    let ids: Vec<u32> = io
        .data("caption_ids")
        .unwrap()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect();
    assert_eq!(stage.caption_ids, ids, "\"a dog\" without padding");

    let base = Stage2Config {
        model_dir: Some(fixture()),
        ..Stage2Config::default()
    };
    let parts = Stage2Components::<I>::from_diffusers(&fixture(), &base, &dev).unwrap();
    let ctx = blipd_stage2::finetune::subject_embedding(
        &parts.model.qformer,
        &parts.bert_tokenizer,
        t4("photos"),
        Some("dog"),
    )
    .unwrap();
    let want = io
        .data("ctx")
        .unwrap()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap();
    let err = max_abs(&ctx.into_data().to_vec::<f32>().unwrap(), &want);
    println!("subject embedding (mean of 3 photos) vs diffusers: max |Δ| {err:.2e}");
    assert!(err < 1e-4, "{err}");

    model.ctx = burn::module::Param::from_tensor(Tensor::<B, 3>::from_data(
        io.data("ctx").unwrap().convert::<f32>(),
        &dev,
    ));
    let t: Vec<i64> = io
        .data("t")
        .unwrap()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let eps = Tensor::<B, 4>::from_data(io.data("eps").unwrap().convert::<f32>(), &dev);
    let loss = stage
        .loss_from(&model, t4("target"), t4("vae_noise"), eps, t)
        .unwrap()
        .into_scalar();
    let want = io
        .data("loss")
        .unwrap()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap()[0];
    println!("fine-tuning loss: ours {loss:.6}, diffusers {want:.6}");
    assert!(
        (loss - want).abs() < 1e-4 * want.abs().max(1.0),
        "{loss} vs {want}"
    );
}

/// LoRA fine-tuning: the loss falls with only the adapters and the subject embedding training; a
/// checkpoint holds just those (not the frozen U-Net); stopping at a checkpoint and resuming gives the
/// same adapter as an uninterrupted run, bit for bit; and a base folder whose U-Net changed since the
/// checkpoint is refused on resume instead of silently training on other frozen weights.
#[test]
fn lora_checkpoints_hold_only_the_adapters_and_resume_exactly() {
    let _serial = blipd_testkit::serial();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("photos");
    photos(&images);
    let lora_cfg = |dir: &std::path::Path, steps: u64, every: u64, model: &std::path::Path| {
        let mut c = config(dir, &images, steps);
        c.stage.model_dir = model.to_path_buf();
        c.stage.lora = Some(blipd_models::lora::LoraSpec::new(2));
        c.optimizer.lr = 0.01;
        c.checkpoint.every = every;
        c.checkpoint.keep_last = 0;
        c
    };
    let dev = Default::default();
    // Uninterrupted, 12 steps.
    let full = lora_cfg(&tmp.path().join("full"), 12, 0, &fixture());
    run_finetune::<B>(&full, dev).unwrap();
    let losses: Vec<f64> = blipd_train::metrics::read_metrics(&full.run.dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| r.loss)
        .collect();
    println!("LoRA fine-tuning losses {losses:?}");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&losses[8..]) < 0.95 * mean(&losses[..4]), "{losses:?}");
    let adapter = |cfg: &FinetuneRunConfig| {
        StateDict::read(&export_dir(cfg).join(blipd_models::lora::LORA_FILE)).unwrap()
    };
    let a = adapter(&full);
    assert!(a
        .keys()
        .all(|k| k.starts_with("unet.") && k.contains(".lora_")));
    assert!(!export_dir(&full).join("unet").exists());

    // 6 steps with a checkpoint, then resumed to 12: the same adapter, bit for bit.
    let model = tmp.path().join("base");
    blipd_testkit::copy_dir(&fixture(), &model);
    let half = lora_cfg(&tmp.path().join("half"), 6, 6, &model);
    run_finetune::<B>(&half, dev).unwrap();
    let ckpt = blipd_train::checkpoint::checkpoint_dir(&half.run.dir, 6);
    let saved = StateDict::read(&ckpt.join("model.safetensors")).unwrap();
    let keys: Vec<&String> = saved.keys().collect();
    assert!(
        keys.iter()
            .all(|k| k.contains("lora") || k.as_str() == "ctx"),
        "a LoRA checkpoint holds the frozen weights too: {keys:?}"
    );
    let bytes = std::fs::metadata(ckpt.join("model.safetensors"))
        .unwrap()
        .len();
    let unet = std::fs::metadata(
        blipd_models::weights::component_weight_file(&fixture().join("unet")).unwrap(),
    )
    .unwrap()
    .len();
    println!("LoRA checkpoint model.safetensors: {bytes} bytes (the U-Net alone: {unet} bytes)");
    assert!(bytes < unet);
    let resumed = lora_cfg(&tmp.path().join("half"), 12, 6, &model);
    let s = run_finetune::<B>(&resumed, dev).unwrap();
    assert_eq!(s.resumed_from, Some(6));
    let b = adapter(&resumed);
    for k in a.keys() {
        let (x, y) = (
            a.data(k).unwrap().to_vec::<f32>().unwrap(),
            b.data(k).unwrap().to_vec::<f32>().unwrap(),
        );
        assert_eq!(x, y, "{k} differs after resuming");
    }
    // The base U-Net changes (rewritten): resuming the 12-step run is refused, naming why.
    let more = lora_cfg(&tmp.path().join("half"), 18, 6, &model);
    let f = blipd_models::weights::component_weight_file(&model.join("unet")).unwrap();
    let bytes = std::fs::read(&f).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    std::fs::write(&f, bytes).unwrap();
    let err = run_finetune::<B>(&more, dev).unwrap_err().to_string();
    assert!(err.contains("frozen weights"), "{err}");
}

#[test]
fn checkpointed_fine_tuning_trains_as_the_ordinary_one() {
    let _serial = blipd_testkit::serial();
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("photos");
    photos(&images);
    let curve = |name: &str, lora: bool, checkpointing: bool| -> Vec<(f64, f64)> {
        let mut c = config(&tmp.path().join(name), &images, 3);
        c.stage.gradient_checkpointing = checkpointing;
        if lora {
            c.stage.lora = Some(blipd_models::lora::LoraSpec::new(2));
        }
        run_finetune::<B>(&c, Default::default()).unwrap();
        let out: Vec<(f64, f64)> =
            blipd_train::metrics::read_metrics(&c.run.dir.join("metrics.jsonl"))
                .unwrap()
                .into_iter()
                .map(|r| (r.loss, r.grad_norm.unwrap()))
                .collect();
        println!("{name}: (loss, grad norm) {out:?}");
        out
    };
    for lora in [false, true] {
        let plain = curve(&format!("plain-{lora}"), lora, false);
        let ckpt = curve(&format!("ckpt-{lora}"), lora, true);
        assert_eq!((plain.len(), ckpt.len()), (3, 3));
        for ((l0, g0), (l1, g1)) in plain.iter().zip(&ckpt) {
            assert!(
                (l0 - l1).abs() <= 1e-4 * l0.abs(),
                "lora {lora}: loss {l0} vs {l1}"
            );
            assert!(
                (g0 - g1).abs() <= 1e-4 * g0.abs(),
                "lora {lora}: grad norm {g0} vs {g1}"
            );
        }
    }
}
