//! The `blipd` binary command by command: weights inspection (success and a full problem list),
//! generation (parity with diffusers, ControlNet, mixing, fixed latents, DDIM), fine-tuning,
//! embed-subject, interpolate, stylize, a sweep with DreamBench scores, and config errors. The user's
//! whole journeys are in e2e.rs.

mod common;

use blipd_testkit::copy_dir;
use common::{blipd, generate_16px, pipeline_fixture};

use std::path::{Path, PathBuf};
use std::process::Command;

/// Asserts that a `blipd` run succeeded, printing its stderr otherwise.
fn assert_ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Diffusers' `image` `[1, C, H, W]` of a fixture's io.safetensors as NHWC values, and its (H, W, C).
fn fixture_image_nhwc(io: &blipd_models::weights::StateDict) -> (Vec<f32>, [usize; 3]) {
    let want = io.data("image").unwrap().convert::<f32>();
    let [_, c, h, w] = <[usize; 4]>::try_from(want.shape.as_slice()).unwrap();
    let want = want.to_vec::<f32>().unwrap();
    let nhwc = (0..h * w * c)
        .map(|i| want[(i % c) * h * w + (i / (w * c)) * w + (i / c) % w])
        .collect();
    (nhwc, [h, w, c])
}

/// `blipd generate` with the request the pipeline fixtures were made with (gen_pipeline*.py).
fn fixture_generate() -> Command {
    let mut c = blipd();
    c.arg("generate")
        .arg("--model")
        .arg(pipeline_fixture())
        .arg("--image")
        .arg(pipeline_fixture().join("reference.png"))
        .args(["--subject", "dog", "--prompt", "swimming underwater"])
        .args(["--neg-prompt", "blurry, low quality", "--steps", "3"])
        .args(["--guidance-scale", "7.5"]);
    c
}

#[test]
fn inspect_weights_lists_components_and_every_problem() {
    let out = blipd()
        .arg("inspect-weights")
        .arg(pipeline_fixture())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for comp in [
        "qformer",
        "text_encoder",
        "unet",
        "vae",
        "scheduler",
        "tokenizer",
    ] {
        assert!(stdout.contains(comp), "{comp} missing from:\n{stdout}");
    }
    assert!(
        stdout.contains("203,204"),
        "U-Net parameter count:\n{stdout}"
    );

    // A broken copy: a U-Net config that no longer fits its weights, and a VAE without weights.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad");
    copy_dir(&pipeline_fixture(), &bad);
    let cfg = bad.join("unet/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["cross_attention_dim"] = serde_json::json!(16);
    std::fs::write(&cfg, json.to_string()).unwrap();
    for e in std::fs::read_dir(bad.join("vae")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "safetensors") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let out = blipd().arg("inspect-weights").arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let mismatched = stderr.matches("mismatched: ").count();
    assert_eq!(mismatched, 8, "every attn2 to_k/to_v is listed:\n{stderr}");
    assert!(
        stderr.contains("no weight file for component `vae`"),
        "{stderr}"
    );
}

#[test]
fn unknown_config_keys_are_named() {
    let out = blipd()
        .args(["pretrain", "--set", "stage2.train.max_stepz=3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_stepz"), "{stderr}");

    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("c.toml");
    std::fs::write(&cfg, "dir = \"x\"\n[stage2.run]\ndir = \"s\"\nsede = 1\n").unwrap();
    let out = blipd()
        .arg("pretrain")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sede"), "{stderr}");
}

#[test]
fn generate_writes_an_image() {
    let tmp = tempfile::tempdir().unwrap();
    let out_png = tmp.path().join("gen.png");
    let fx = pipeline_fixture();
    generate_16px(&fx, "dog", "swimming underwater", &out_png);
    let img = image::open(&out_png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (16, 16));
    // A missing reference image is a clear error.
    let out = blipd()
        .arg("generate")
        .arg("--model")
        .arg(&fx)
        .args([
            "--image",
            "/nonexistent.png",
            "--subject",
            "dog",
            "--prompt",
            "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nonexistent.png"));
}

#[test]
fn sweep_writes_one_table_with_dreambench_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // The sweep file names these folders relative to itself.
    common::model_dir(root, "clip", &["vocab.json", "merges.txt"]);
    common::model_dir(root, "dino", &[]);
    common::tiny_bench(root);
    let sweep = root.join("sweep.toml");
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny.toml");
    std::fs::write(
        &sweep,
        format!(
            "base = {:?}\ndir = {:?}\nset = [\"stage1.train.max_steps=2\", \"stage2.train.max_steps=2\", \"stage2.sample.at_end=false\", \"stage2.data.synthetic.pairs=8\"]\n\
             [[variant]]\nname = \"full\"\n[[variant]]\nname = \"frozen_text\"\nset = [\"stage2.stage.train_text_encoder=false\"]\n\
             [eval]\ndreambench = \"bench\"\nclip = \"clip\"\ndino = \"dino\"\nprompts_per_subject = 1\nimages_per_prompt = 1\nsteps = 2\nsize = 16\n",
            base.display().to_string(),
            root.join("out").display().to_string()
        ),
    )
    .unwrap();
    let out = blipd().arg("sweep").arg(&sweep).output().unwrap();
    assert_ok(&out);
    let table = std::fs::read_to_string(root.join("out/ablation.md")).unwrap();
    println!("{table}");
    assert!(
        table.contains("| full |") && table.contains("| frozen_text |"),
        "{table}"
    );
    assert!(table.contains("DINO | CLIP-I | CLIP-T"), "{table}");
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("out/ablation.json")).unwrap())
            .unwrap();
    for r in rows.as_array().unwrap() {
        assert_eq!(r["images_scored"], 2, "{r}");
        for k in ["dino", "clip_i", "clip_t"] {
            let x = r[k].as_f64().unwrap();
            assert!(x.is_finite() && x.abs() <= 1.0, "{k} = {x}");
        }
    }
    for v in ["full", "frozen_text"] {
        for f in ["dog/0_0.png", "vase/0_0.png", "scores.json"] {
            assert!(root
                .join("out")
                .join(v)
                .join("dreambench")
                .join(f)
                .is_file());
        }
    }
    // A wrong evaluation path fails before any training.
    let bad = std::fs::read_to_string(&sweep)
        .unwrap()
        .replace("dino = \"dino\"", "dino = \"no_dino\"");
    std::fs::write(&sweep, bad).unwrap();
    let out = blipd().arg("sweep").arg(&sweep).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no_dino"), "{err}");
    assert!(!err.contains("stage 1:"), "trained before failing: {err}");
}

/// The tiny plan with a 2-step `[vae]` stage, so that both shareable stages are in it.
fn tiny_plan_with_vae(root: &Path) -> PathBuf {
    let tiny = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny.toml");
    let mut text = std::fs::read_to_string(tiny).unwrap();
    text.push_str(
        "\n[vae.run]\ndir = \"vae\"\nseed = 1\n[vae.train]\nmax_steps = 2\nbatch_size = 2\n\
         [vae.optimizer]\nlr = 1e-3\n[vae.stage]\npreset = \"tiny\"\n[vae.data]\npairs = 8\nsize = 32\n",
    );
    let path = root.join("base.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every safetensors file under `dir` (relative path → bytes).
fn safetensors_under(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

/// A sweep with two runs at once and the VAE and stage 1 trained once per seed gives the same models,
/// bit for bit, as one that runs each plan whole, one at a time; a rerun skips what finished and
/// resumes only the run whose marker is gone; a stage 2 that trains nothing has no loss in the table.
#[test]
fn shared_stages_and_parallel_runs_give_the_plain_sweeps_models() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tiny_plan_with_vae(root);
    let sweep_file = |name: &str, extra: &str| {
        let path = root.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "base = \"base.toml\"\ndir = {:?}\nseeds = 2\n{extra}\
                 set = [\"stage1.train.max_steps=2\", \"stage2.train.max_steps=2\", \"stage2.sample.at_end=false\", \"stage2.data.synthetic.pairs=8\"]\n\
                 [[variant]]\nname = \"full\"\n\
                 [[variant]]\nname = \"frozen_text\"\nset = [\"stage2.stage.train_text_encoder=false\"]\n\
                 [[variant]]\nname = \"no_stage1\"\nset = [\"stage1.train.max_steps=0\", \"stage1.train.export_untrained=true\"]\n\
                 [[variant]]\nname = \"untrained\"\nset = [\"stage2.train.max_steps=0\", \"stage2.train.export_untrained=true\"]\n",
                root.join(name).display().to_string()
            ),
        )
        .unwrap();
        path
    };
    // One thread per run in both, so that the arithmetic is the same.
    let plain = sweep_file("plain", "share_stages = false\n");
    let out = blipd()
        .arg("sweep")
        .arg(&plain)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert_ok(&out);
    let shared = sweep_file("shared", "");
    let run_shared = || {
        blipd()
            .arg("sweep")
            .arg(&shared)
            .args(["--jobs", "2"])
            .env("RAYON_NUM_THREADS", "2")
            .env("BLIPD_LOG", "info")
            .output()
            .unwrap()
    };
    let out = run_shared();
    assert_ok(&out);
    let log = common::text(&out);
    assert!(log.contains("RAYON_NUM_THREADS=1"), "{log}");

    let variants = ["full", "frozen_text", "no_stage1", "untrained"];
    for v in variants {
        for k in 0..2 {
            let run = |sweep: &str| root.join(sweep).join(v).join(format!("seed-{k}"));
            let (a, b) = (run("plain"), run("shared"));
            let (wa, wb) = (
                safetensors_under(&a.join("stage2/export")),
                safetensors_under(&b.join("stage2/export")),
            );
            assert_eq!(wa.len(), 4, "{}", a.display());
            assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
            for (f, bytes) in &wa {
                assert!(
                    *bytes == wb[f],
                    "{v} seed {k}: {} differs between the plain and the shared sweep",
                    f.display()
                );
            }
            let plan = std::fs::read_to_string(b.join("plan.toml")).unwrap();
            if v == "full" {
                // The first run of a seed trains the shared stages itself.
                assert!(b.join("vae").is_dir() && b.join("stage1").is_dir());
            } else {
                let owner = root.join("shared/full").join(format!("seed-{k}"));
                assert!(!b.join("vae").exists(), "{v} seed {k} trained its own VAE");
                assert!(
                    plan.contains(&owner.join("vae/export/vae").display().to_string()),
                    "{plan}"
                );
                assert_eq!(b.join("stage1").exists(), v == "no_stage1", "{v} seed {k}");
                if v != "no_stage1" {
                    assert!(
                        plan.contains(
                            &owner
                                .join("stage1/export/qformer/model.safetensors")
                                .display()
                                .to_string()
                        ),
                        "{plan}"
                    );
                }
            }
        }
    }
    // Seeds differ (the sweep shifts every stage's seed): seed 1 did not reuse seed 0's stages.
    assert!(
        safetensors_under(&root.join("shared/full/seed-0/vae/export"))
            != safetensors_under(&root.join("shared/full/seed-1/vae/export"))
    );
    let rows = |sweep: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(root.join(sweep).join("ablation.json")).unwrap(),
        )
        .unwrap()
    };
    let (pa, pb) = (rows("plain"), rows("shared"));
    let (pa, pb) = (pa.as_array().unwrap(), pb.as_array().unwrap());
    assert_eq!(pa.len(), 8);
    for (a, b) in pa.iter().zip(pb) {
        assert_eq!(a["name"], b["name"]);
        assert_eq!(a["seed_offset"], b["seed_offset"]);
        assert_eq!(a["final_loss"], b["final_loss"], "{a}\n{b}");
        if a["name"] == "untrained" {
            assert!(a["final_loss"].is_null() && a["steps"] == 0, "{a}");
        } else {
            assert!(a["final_loss"].as_f64().unwrap().is_finite(), "{a}");
            assert_eq!(a["steps"], 2, "{a}");
        }
    }
    let table = std::fs::read_to_string(root.join("shared/ablation.md")).unwrap();
    println!("{table}");
    assert!(
        table.contains("| untrained |  | 2 | 0 | - | - |"),
        "{table}"
    );

    // A rerun skips every finished run; without its marker, one run is resumed (and stays the same).
    let marker = root.join("shared/frozen_text/seed-1/sweep-done.json");
    std::fs::remove_file(&marker).unwrap();
    let out = run_shared();
    assert_ok(&out);
    let log = common::text(&out);
    assert_eq!(log.matches("skipped").count(), 7, "{log}");
    assert!(
        log.contains("variant frozen_text seed +1 → "),
        "frozen_text seed 1 was not rerun: {log}"
    );
    assert!(marker.is_file());
    let again = rows("shared");
    for (a, b) in again.as_array().unwrap().iter().zip(pb) {
        assert_eq!(
            (&a["name"], &a["final_loss"]),
            (&b["name"], &b["final_loss"])
        );
    }
}

/// A 3-step fine-tuning config on the pipeline fixture's reference photo, run folder `root/run`;
/// `optimizer` is the text after `[optimizer]` (more sections may follow it).
fn finetune_config(root: &Path, optimizer: &str) -> PathBuf {
    let photos = root.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    std::fs::copy(
        pipeline_fixture().join("reference.png"),
        photos.join("00.png"),
    )
    .unwrap();
    let cfg = root.join("finetune.toml");
    std::fs::write(
        &cfg,
        format!(
            "[run]\ndir = {:?}\n[train]\nmax_steps = 3\nbatch_size = 2\n[optimizer]\n{optimizer}\
             [stage]\nmodel_dir = {:?}\nsubject = \"dog\"\nsample_steps = 2\n[data]\nimages = {:?}\ntarget_size = 16\n",
            root.join("run").display().to_string(),
            pipeline_fixture().display().to_string(),
            photos.display().to_string()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn finetune_exports_a_pipeline_that_generates_without_a_reference_image() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = finetune_config(tmp.path(), "lr = 0.001\n");
    let out = blipd()
        .arg("finetune")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("finetune: step 3"), "{stdout}");
    let export = tmp.path().join("run/export");
    assert!(export.join("ctx_embeddings_cache.safetensors").is_file());
    let png = tmp.path().join("dog.png");
    let out = blipd()
        .arg("generate")
        .arg("--model")
        .arg(&export)
        .args([
            "--subject",
            "dog",
            "--prompt",
            "on the beach",
            "--steps",
            "2",
        ])
        .args(["--height", "16", "--width", "16", "--out"])
        .arg(&png)
        .output()
        .unwrap();
    assert_ok(&out);
    assert!(png.is_file());
    // Without a cache, a reference image is required, and the error says so.
    let out = blipd()
        .arg("generate")
        .arg("--model")
        .arg(pipeline_fixture())
        .args(["--subject", "dog", "--prompt", "x", "--out"])
        .arg(tmp.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--image"));
}

/// `blipd finetune --lora` → a few-KB adapter folder (no U-Net) → `blipd generate --lora` on the base
/// draws what a pipeline folder with the adapter merged into its U-Net and the fine-tuned subject
/// embedding cached draws; at `--lora-scale 0` it is the base U-Net again. Bad LoRA input is refused.
#[test]
fn finetune_lora_exports_an_adapter_that_generate_applies() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = finetune_config(tmp.path(), "lr = 0.01\n[sample]\nevery = 0\n");
    let finetune = |extra: &[&str]| {
        blipd()
            .arg("finetune")
            .arg("--config")
            .arg(&cfg)
            .args(extra)
            .output()
            .unwrap()
    };
    // Rank 0 is refused before anything is written.
    let o = finetune(&["--lora", "0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("rank must be at least 1"));
    assert!(!tmp.path().join("run/export").exists());

    let o = finetune(&["--lora", "2", "--lora-alpha", "4"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("--lora"), "{stdout}");
    let export = tmp.path().join("run/export");
    let adapter = export.join(blipd_models::lora::LORA_FILE);
    assert!(export.join("ctx_embeddings_cache.safetensors").is_file());
    assert!(export.join("blipd_lora.json").is_file());
    assert!(
        !export.join("unet").exists(),
        "a LoRA export carries no U-Net"
    );
    let sd = blipd_models::weights::StateDict::read(&adapter).unwrap();
    assert!(sd.keys().all(|k| k.starts_with("unet.")
        && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))));
    let unet_bytes = std::fs::metadata(
        blipd_models::weights::component_weight_file(&pipeline_fixture().join("unet")).unwrap(),
    )
    .unwrap()
    .len();
    let lora_bytes = std::fs::metadata(&adapter).unwrap().len();
    assert!(
        lora_bytes * 4 < unet_bytes,
        "adapter {lora_bytes} B vs U-Net {unet_bytes} B"
    );

    let generate = |model: &Path, extra: &[&str], out: &Path| {
        blipd()
            .arg("generate")
            .arg("--model")
            .arg(model)
            .args([
                "--subject",
                "dog",
                "--prompt",
                "on the beach",
                "--steps",
                "2",
            ])
            .args(["--height", "16", "--width", "16"])
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let export_s = export.display().to_string();
    let with_lora = tmp.path().join("lora.npy");
    assert_ok(&generate(
        &pipeline_fixture(),
        &["--lora", &export_s],
        &with_lora,
    ));

    // The same model built by hand: the base U-Net with the adapter merged, the cached embedding.
    let merged = tmp.path().join("merged");
    copy_dir(&pipeline_fixture(), &merged);
    type Cpu = blipd_testkit::Cpu;
    let dev = blipd_testkit::device();
    let folder = blipd_models::weights::DiffusersFolder::open(&pipeline_fixture()).unwrap();
    let unet = blipd_models::unet::load::<Cpu>(&folder.component("unet"), &dev).unwrap();
    let w = blipd_models::lora::LoraWeights::read(&export).unwrap();
    let unet = blipd_models::lora::apply(unet, &w, 1.0, blipd_models::lora::ApplyMode::Fuse, &dev)
        .unwrap();
    std::fs::remove_dir_all(merged.join("unet")).unwrap();
    unet.save_diffusers(&merged.join("unet")).unwrap();
    std::fs::copy(
        export.join("ctx_embeddings_cache.safetensors"),
        merged.join("ctx_embeddings_cache.safetensors"),
    )
    .unwrap();
    let by_hand = tmp.path().join("merged.npy");
    assert_ok(&generate(&merged, &[], &by_hand));
    let (a, b) = (
        blipd_data::npy::read_f32(&with_lora).unwrap(),
        blipd_data::npy::read_f32(&by_hand).unwrap(),
    );
    blipd_testkit::assert_close_slice("--lora vs merged folder", &a.data, &b.data, 1e-5);

    // At weight 0 the adapter does nothing; trained for 3 steps it does something.
    let off = tmp.path().join("off.npy");
    assert_ok(&generate(
        &pipeline_fixture(),
        &["--lora", &export_s, "--lora-scale", "0"],
        &off,
    ));
    let c = blipd_data::npy::read_f32(&off).unwrap();
    let moved = blipd_testkit::max_abs_diff(&a.data, &c.data);
    assert!(
        moved > 1e-4,
        "the trained adapter changed nothing ({moved})"
    );

    // A LoRA for another U-Net (the parity fixture's: cross-attention width 24, not 32) is named.
    let other = common::fixture("lora")
        .join("adapter")
        .display()
        .to_string();
    let bad = tmp.path().join("bad.npy");
    let o = generate(&pipeline_fixture(), &["--lora", &other], &bad);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("does not fit this U-Net") && err.contains("attn2.to_k"),
        "{err}"
    );
    assert!(!bad.exists());
}

/// `blipd edit` on the tiny pipeline: a generated source and a photo (DDIM inversion) each give
/// source.png, edit.png, mask.png and edit.json; bad requests fail before anything is written.
#[test]
fn edit_writes_source_edit_and_mask_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = pipeline_fixture();
    let edit = |extra: &[&str], out: &Path| {
        blipd()
            .arg("edit")
            .arg("--model")
            .arg(&fx)
            .args([
                "--cond-subject",
                "dog",
                "--prompt",
                "sitting on a sofa",
                "--steps",
                "3",
            ])
            .args([
                "--height",
                "32",
                "--blend-grid",
                "16",
                "--threshold",
                "0.62",
            ])
            .args(if extra.contains(&"--width") {
                &[][..]
            } else {
                &["--width", "32"][..]
            })
            .args(extra)
            .arg("--out-dir")
            .arg(out)
            .output()
            .unwrap()
    };
    let reference = fx.join("reference.png").display().to_string();
    let photo = fx.join("small.png").display().to_string();
    for (name, extra) in [
        (
            "generated",
            vec!["--image", &reference, "--src-subject", "cat"],
        ),
        (
            "photo",
            vec![
                "--image",
                &reference,
                "--src-subject",
                "cat",
                "--source-image",
                &photo,
                "--inversion-steps",
                "3",
            ],
        ),
    ] {
        let out = tmp.path().join(name);
        let o = edit(&extra, &out);
        assert_ok(&o);
        for f in ["source.png", "edit.png", "mask.png", "edit.json"] {
            assert!(out.join(f).is_file(), "{name}: {f}");
        }
        let (s, e) = (
            image::open(out.join("source.png")).unwrap().to_rgb8(),
            image::open(out.join("edit.png")).unwrap().to_rgb8(),
        );
        assert_eq!(s.dimensions(), (32, 32));
        assert_ne!(s.as_raw(), e.as_raw(), "{name}: the edit changed nothing");
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("edit.json")).unwrap()).unwrap();
        let frac = meta["mask_fraction"].as_f64().unwrap();
        assert!(frac > 0.0 && frac < 1.0, "{name}: mask fraction {frac}");
        assert_eq!(meta["inversion_prompt"].is_string(), name == "photo");
    }
    // Bad input: each refused with what to fix; the output folder never appears.
    let bad = tmp.path().join("bad");
    for (extra, needle) in [
        (vec!["--src-subject", "cat"], "--image is needed"),
        (
            vec!["--image", &reference, "--src-subject", "teddy bear"],
            "one word",
        ),
        (
            vec![
                "--image",
                &reference,
                "--src-subject",
                "cat",
                "--guidance-scale",
                "1",
            ],
            "guidance",
        ),
        (
            vec![
                "--image",
                &reference,
                "--src-subject",
                "cat",
                "--threshold",
                "2",
            ],
            "threshold",
        ),
        (
            vec![
                "--image",
                &reference,
                "--src-subject",
                "cat",
                "--source-image",
                &photo,
                "--width",
                "64",
            ],
            "square",
        ),
        (
            vec!["--image", "missing.png", "--src-subject", "cat"],
            "missing.png",
        ),
    ] {
        let o = edit(&extra, &bad);
        assert!(!o.status.success(), "{extra:?} succeeded");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!bad.exists(), "{extra:?} wrote {}", bad.display());
    }
    let o = edit(
        &[
            "--image",
            &reference,
            "--src-subject",
            "cat",
            "--blend-grid",
            "5",
        ],
        &bad,
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--blend-grid"));
}

#[test]
fn generate_with_a_controlnet_and_with_two_mixed_subjects() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = pipeline_fixture();
    let cn = fx.join("../pipeline_controlnet");
    let run = |extra: &[&str], out_png: &Path| {
        blipd()
            .arg("generate")
            .arg("--model")
            .arg(&fx)
            .args([
                "--prompt",
                "on the beach",
                "--steps",
                "2",
                "--height",
                "16",
                "--width",
                "16",
            ])
            .args(extra)
            .arg("--out")
            .arg(out_png)
            .output()
            .unwrap()
    };
    let reference = fx.join("reference.png").display().to_string();
    let small = fx.join("small.png").display().to_string();
    let cond = cn.join("cond.png").display().to_string();
    let controlnet = cn.join("controlnet").display().to_string();
    let png = tmp.path().join("control.png");
    let o = run(
        &[
            "--image",
            &reference,
            "--subject",
            "dog",
            "--control-image",
            &cond,
            "--controlnet",
            &controlnet,
        ],
        &png,
    );
    assert_ok(&o);
    assert!(png.is_file());
    // A condition image without a ControlNet is a clear error.
    let o = run(
        &[
            "--image",
            &reference,
            "--subject",
            "dog",
            "--control-image",
            &cond,
        ],
        &png,
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("ControlNet"));
    // Two subjects mixed 30/70.
    let mix = tmp.path().join("mix.png");
    let o = run(
        &[
            "--image",
            &reference,
            "--subject",
            "dog",
            "--image",
            &small,
            "--subject",
            "cat",
            "--ratio",
            "0.3",
            "--ratio",
            "0.7",
        ],
        &mix,
    );
    assert_ok(&o);
    assert!(mix.is_file());
    let o = run(
        &[
            "--image",
            &reference,
            "--subject",
            "dog",
            "--subject",
            "cat",
        ],
        &mix,
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("one subject per image"));
    // bf16 inference: refused with the reason on the default CPU build (ndarray has no bf16), run on
    // the flex build.
    let o = run(
        &[
            "--image",
            &reference,
            "--subject",
            "dog",
            "--mixed-precision",
            "bf16",
        ],
        &mix,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    if cfg!(feature = "flex") {
        assert!(o.status.success(), "{err}");
    } else {
        assert!(!o.status.success());
        assert!(
            err.contains("--mixed-precision") && err.contains("ndarray"),
            "{err}"
        );
    }
}

#[test]
fn embed_subject_round_trips_through_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = pipeline_fixture().join("reference.png");
    let embed = |out: &Path, images: &[&Path]| {
        let mut c = blipd();
        c.arg("embed-subject")
            .arg("--model")
            .arg(pipeline_fixture())
            .args(["--subject", "dog", "--out"])
            .arg(out);
        for i in images {
            c.arg("--image").arg(i);
        }
        c.output().unwrap()
    };
    // .npy: float32 [1, Q, D]; two copies of one image average to that image's embedding.
    let (one, two) = (tmp.path().join("one.npy"), tmp.path().join("two.npy"));
    for (out, imgs) in [
        (&one, vec![reference.as_path()]),
        (&two, vec![&reference, &reference]),
    ] {
        let o = embed(out, &imgs);
        assert_ok(&o);
    }
    let a = blipd_data::npy::read_f32(&one).unwrap();
    let b = blipd_data::npy::read_f32(&two).unwrap();
    assert_eq!((a.shape.len(), a.shape[0]), (3, 1), "{:?}", a.shape);
    assert!(blipd_testkit::max_abs_diff(&a.data, &b.data) < 1e-6);

    // .safetensors in a copy of the folder is its cached subject embedding: `generate` without
    // --image then draws the same picture as with the reference image.
    let model = tmp.path().join("model");
    copy_dir(&pipeline_fixture(), &model);
    let o = embed(
        &model.join("ctx_embeddings_cache.safetensors"),
        &[&reference],
    );
    assert_ok(&o);
    let (with_image, cached) = (tmp.path().join("a.png"), tmp.path().join("b.png"));
    generate_16px(&pipeline_fixture(), "dog", "on a beach", &with_image);
    let out = blipd()
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args(["--subject", "dog", "--prompt", "on a beach", "--steps", "3"])
        .args(["--height", "16", "--width", "16", "--out"])
        .arg(&cached)
        .output()
        .unwrap();
    assert_ok(&out);
    let (x, y) = (
        image::open(&with_image).unwrap().to_rgb8(),
        image::open(&cached).unwrap().to_rgb8(),
    );
    let diff = x
        .as_raw()
        .iter()
        .zip(y.as_raw())
        .map(|(p, q)| p.abs_diff(*q))
        .max()
        .unwrap();
    assert!(
        diff <= 1,
        "cached vs computed subject embedding: max pixel difference {diff}"
    );

    // Bad input: a wrong extension and a missing image are named; nothing is written.
    let bad = tmp.path().join("emb.bin");
    let o = embed(&bad, &[&reference]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(".npy or .safetensors"));
    let o = embed(
        &tmp.path().join("x.npy"),
        &[&tmp.path().join("missing.png")],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("missing.png"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!tmp.path().join("x.npy").exists());
}

#[test]
fn generate_from_fixed_latents_matches_diffusers_and_writes_npy() {
    let tmp = tempfile::tempdir().unwrap();
    let io =
        blipd_models::weights::StateDict::read(&pipeline_fixture().join("io.safetensors")).unwrap();
    let lat = io.data("latents0").unwrap().convert::<f32>();
    let (lat_shape, lat) = (lat.shape.clone(), lat.to_vec::<f32>().unwrap());
    // diffusers' image is NCHW; ours NHWC.
    let (want_nhwc, [h, w, c]) = fixture_image_nhwc(&io);
    // Two copies of diffusers' initial latents: two images, each diffusers' image.
    let latents = tmp.path().join("latents.npy");
    let mut shape2 = lat_shape.clone();
    shape2[0] = 2;
    blipd_data::npy::write_f32(&latents, &shape2, &[lat.clone(), lat].concat()).unwrap();
    let run = |extra: &[&str], out: &Path| {
        fixture_generate()
            .arg("--latents")
            .arg(&latents)
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let npy = tmp.path().join("images.npy");
    let o = run(&[], &npy);
    assert_ok(&o);
    let got = blipd_data::npy::read_f32(&npy).unwrap();
    assert_eq!(got.shape, vec![2, h, w, c]);
    for k in 0..2 {
        let e = blipd_testkit::assert_close_slice(
            &format!("image {k} vs diffusers"),
            &got.data[k * h * w * c..(k + 1) * h * w * c],
            &want_nhwc,
            1e-4,
        );
        println!("generate --latents, image {k}: max |Δ| {e:.2e} vs diffusers 0.33.1");
    }
    // PNGs: one file per image.
    let png = tmp.path().join("img.png");
    let o = run(&[], &png);
    assert_ok(&o);
    for k in 0..2 {
        assert!(tmp.path().join(format!("img_{k}.png")).is_file());
    }
    // A size that disagrees with the latents, and a count that does: errors naming both.
    let o = run(&["--height", "64"], &tmp.path().join("bad.npy"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--height 64") && err.contains(&format!("{w}×{h}")),
        "{err}"
    );
    let o = run(&["--num-images", "3"], &tmp.path().join("bad.npy"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("2 latents"));
    assert!(!tmp.path().join("bad.npy").exists());
}

#[test]
fn generate_with_ddim_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = pipeline_fixture().join("../pipeline_ddim/io.safetensors");
    let io = blipd_models::weights::StateDict::read(&fixture).unwrap();
    let lat = io.data("latents0").unwrap().convert::<f32>();
    let latents = tmp.path().join("latents.npy");
    blipd_data::npy::write_f32(&latents, &lat.shape.clone(), &lat.to_vec::<f32>().unwrap())
        .unwrap();
    let (want_nhwc, _) = fixture_image_nhwc(&io);
    let npy = tmp.path().join("ddim.npy");
    let o = fixture_generate()
        .args(["--scheduler", "ddim", "--latents"])
        .arg(&latents)
        .arg("--out")
        .arg(&npy)
        .output()
        .unwrap();
    assert_ok(&o);
    let got = blipd_data::npy::read_f32(&npy).unwrap();
    let e =
        blipd_testkit::assert_close_slice("DDIM image vs diffusers", &got.data, &want_nhwc, 1e-4);
    println!("generate --scheduler ddim: max |Δ| {e:.2e} vs diffusers 0.33.1 DDIMScheduler");
}

/// `blipd interpolate`: a row A → B from one noise whose end cells are the subjects alone (what
/// `blipd generate` renders for each with the same seed), whose middle is neither, with the weights
/// beside it; a single subject or a missing --subject is a clear error.
#[test]
fn interpolate_blends_two_subjects_between_their_own_generations() {
    let tmp = tempfile::tempdir().unwrap();
    let a = pipeline_fixture().join("reference.png");
    let b = tmp.path().join("b.png");
    image::imageops::rotate90(&image::open(&a).unwrap().to_rgb8())
        .save(&b)
        .unwrap();
    let out = tmp.path().join("grid.png");
    let run = blipd()
        .arg("interpolate")
        .arg("--model")
        .arg(pipeline_fixture())
        .arg("--image")
        .arg(&a)
        .arg("--image")
        .arg(&b)
        .args([
            "--subject",
            "dog",
            "--subject",
            "dog",
            "--prompt",
            "on the beach",
        ])
        .args([
            "--side", "3", "--steps", "3", "--height", "16", "--width", "16",
        ])
        .args(["--batch", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_ok(&run);
    let grid = image::open(&out).unwrap().to_rgb8();
    assert_eq!(grid.dimensions(), (48, 16));
    let cell = |i: u32| image::imageops::crop_imm(&grid, i * 16, 0, 16, 16).to_image();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(meta["weights"][1], serde_json::json!([0.5, 0.5]), "{meta}");

    let alone = |img: &Path, name: &str| {
        let p = tmp.path().join(name);
        let o = blipd()
            .arg("generate")
            .arg("--model")
            .arg(pipeline_fixture())
            .arg("--image")
            .arg(img)
            .args([
                "--subject",
                "dog",
                "--prompt",
                "on the beach",
                "--steps",
                "3",
            ])
            .args(["--height", "16", "--width", "16", "--out"])
            .arg(&p)
            .output()
            .unwrap();
        assert_ok(&o);
        image::open(&p).unwrap().to_rgb8()
    };
    let max_diff = |x: &image::RgbImage, y: &image::RgbImage| {
        x.as_raw()
            .iter()
            .zip(y.as_raw())
            .map(|(p, q)| p.abs_diff(*q))
            .max()
            .unwrap()
    };
    let (ga, gb) = (alone(&a, "a.png"), alone(&b, "b_alone.png"));
    // Batched cells may round differently from a batch of one: a level or two of 255.
    let (da, db) = (max_diff(&cell(0), &ga), max_diff(&cell(2), &gb));
    println!(
        "end cells vs generate: {da}, {db} levels; A vs B: {}",
        max_diff(&ga, &gb)
    );
    assert!(
        da <= 2 && db <= 2,
        "end cells differ from the subjects alone: {da}, {db}"
    );
    assert!(
        max_diff(&ga, &gb) > 8,
        "the two subjects render alike: the test cannot tell"
    );
    assert!(max_diff(&cell(1), &ga) > 2 && max_diff(&cell(1), &gb) > 2);

    let one = blipd()
        .arg("interpolate")
        .arg("--model")
        .arg(pipeline_fixture())
        .arg("--image")
        .arg(&a)
        .args(["--subject", "dog", "--prompt", "x"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&one.stderr);
    assert!(
        !one.status.success() && e.contains("2 to 4 subjects"),
        "{e}"
    );
    let missing = blipd()
        .arg("interpolate")
        .arg("--model")
        .arg(pipeline_fixture())
        .arg("--image")
        .arg(&a)
        .arg("--image")
        .arg(&b)
        .args(["--subject", "dog", "--prompt", "x"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && e.contains("one subject per image"),
        "{e}"
    );
}

/// `blipd stylize` = `generate` with the style image as the subject and Canny edges of the structure
/// photo as the ControlNet condition: the edge map it writes, given back to `generate` as the
/// condition, gives the same image; bad thresholds are refused before any model is loaded.
#[test]
fn stylize_is_generate_with_canny_edges_of_the_structure_photo() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = pipeline_fixture();
    let cn = fx.join("../pipeline_controlnet/controlnet");
    // The structure: a bright square on a dark ground (the fixture's 45×31 photos are too small to
    // keep edges once scaled to 512).
    let photo = tmp.path().join("structure.png");
    let mut img = image::RgbImage::from_pixel(128, 96, image::Rgb([30, 40, 50]));
    for y in 24..72 {
        for x in 40..88 {
            img.put_pixel(x, y, image::Rgb([230, 210, 190]));
        }
    }
    img.save(&photo).unwrap();
    let out = tmp.path().join("stylized.png");
    let common = [
        "--prompt",
        "on a marble table",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
    ];
    let o = blipd()
        .arg("stylize")
        .arg("--model")
        .arg(&fx)
        .arg("--controlnet")
        .arg(&cn)
        .arg("--style-image")
        .arg(fx.join("small.png"))
        .args(["--style-subject", "flower", "--target-subject", "teapot"])
        .arg("--structure")
        .arg(&photo)
        .args(common)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_ok(&o);
    let edges = image::open(tmp.path().join("stylized.canny.png"))
        .unwrap()
        .to_rgb8();
    let (w, h) = edges.dimensions();
    assert_eq!((w, h), (704, 512), "shorter side 512, sides rounded to 64s");
    let lit = edges.pixels().filter(|p| p[0] == 255).count();
    assert!(
        edges.pixels().all(|p| p[0] == 0 || p[0] == 255),
        "binary map"
    );
    assert!(lit > 100 && lit < (w * h / 2) as usize, "{lit} edge pixels");

    let again = tmp.path().join("generated.png");
    let o = blipd()
        .arg("generate")
        .arg("--model")
        .arg(&fx)
        .arg("--controlnet")
        .arg(&cn)
        .arg("--image")
        .arg(fx.join("small.png"))
        .args(["--subject", "flower", "--target-subject", "teapot"])
        .arg("--control-image")
        .arg(tmp.path().join("stylized.canny.png"))
        .args(common)
        .arg("--out")
        .arg(&again)
        .output()
        .unwrap();
    assert_ok(&o);
    assert_eq!(
        image::open(&out).unwrap().to_rgb8().as_raw(),
        image::open(&again).unwrap().to_rgb8().as_raw(),
        "stylize and generate with its edge map differ"
    );

    let o = blipd()
        .arg("stylize")
        .arg("--model")
        .arg(tmp.path().join("no-such-model"))
        .arg("--style-image")
        .arg(&photo)
        .args(["--style-subject", "flower", "--target-subject", "teapot"])
        .arg("--structure")
        .arg(&photo)
        .args(["--canny", "70,30", "--prompt", "x"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("LOW,HIGH"), "{e}");
}
