//! The stage-2 export is a complete BlipDiffusion pipeline folder: every network comes back bit-exact,
//! the tokenizers give the same ids, a run writes it at its end, and stage 2 trains from it.

use blipd_models::weights::collect_reference;
use blipd_stage2::run::{build, export_dir, run_stage2, Stage2RunConfig};
use blipd_stage2::{export_pipeline, Stage2Components};
use blipd_train::parse_config;
use burn::module::Module;

type B = blipd_testkit::CpuTrain;

fn config(dir: &std::path::Path, steps: u64, extra: &[String]) -> Stage2RunConfig {
    let text = format!(
        "[run]\ndir = {:?}\nseed = 5\n[train]\nmax_steps = {steps}\nbatch_size = 2\nprogress = false\n\
         [optimizer]\nlr = 0.001\n[checkpoint]\nevery = 0\n[sample]\nat_end = false\n\
         [stage]\npreset = \"tiny\"\n[data]\ntarget_size = 32\n[data.synthetic]\npairs = 4\nseed = 1\n",
        dir.display().to_string()
    );
    parse_config(&text, extra).unwrap()
}

/// Every tensor of two modules under the same names, compared exactly.
fn assert_same<M1: burn_store::ModuleSnapshot<B1>, M2: burn_store::ModuleSnapshot<B2>, B1, B2>(
    what: &str,
    a: &M1,
    b: &M2,
) where
    B1: burn::tensor::backend::Backend,
    B2: burn::tensor::backend::Backend,
{
    let none = blipd_models::weights::KeyMap::new(&[]);
    let (ta, tb) = (
        collect_reference(a, &none).unwrap(),
        collect_reference(b, &none).unwrap(),
    );
    let names = |t: &[(String, burn::tensor::TensorData)]| -> Vec<String> {
        t.iter().map(|(n, _)| n.clone()).collect()
    };
    assert_eq!(names(&ta), names(&tb), "{what}: tensor names differ");
    for ((name, x), (_, y)) in ta.iter().zip(&tb) {
        let (x, y) = (x.to_vec::<f32>().unwrap(), y.to_vec::<f32>().unwrap());
        // Bit for bit: a NaN on either side is a difference.
        let worst = blipd_testkit::max_abs_diff(&x, &y);
        assert!(
            worst == 0.0 && x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what}.{name}: max |Δ| = {worst}"
        );
    }
    println!("{what}: {} tensors identical", ta.len());
}

#[test]
fn export_round_trips_every_network_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&tmp.path().join("run"), 1, &[]);
    let device = Default::default();
    let (stage, model, _) = build::<B>(&cfg, &device).unwrap();
    let dir = tmp.path().join("export");
    export_pipeline(&stage, &model, &dir).unwrap();
    for f in [
        "model_index.json",
        "qformer/config.json",
        "qformer/model.safetensors",
        "qformer/vocab.txt",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
        "image_processor/preprocessor_config.json",
    ] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    let back = Stage2Components::<B>::from_diffusers(&dir, &cfg.stage, &device).unwrap();
    assert_same("qformer", &model.qformer, &back.model.qformer);
    assert_same(
        "text_encoder",
        &model.text_encoder,
        &back.model.text_encoder,
    );
    assert_same("unet", &model.unet, &back.model.unet);
    assert_same("vae", &stage.vae, &back.vae);
    assert_eq!(back.blip_config, stage.blip_config);
    assert_eq!(back.text_config, stage.text_config);
    assert_eq!(back.vae_config, stage.vae_config);
    let text = "a photo of a red dog on the beach";
    assert_eq!(
        stage.clip_tokenizer.encode(text, 40).unwrap(),
        back.clip_tokenizer.encode(text, 40).unwrap()
    );
    assert_eq!(
        stage.bert_tokenizer.encode("a red dog").unwrap(),
        back.bert_tokenizer.encode("a red dog").unwrap()
    );
    assert_eq!(
        stage.bert_tokenizer.vocab_size(),
        back.bert_tokenizer.vocab_size()
    );

    // A second export replaces the first in place and leaves no temporary folder behind.
    let model = model.clone().no_grad();
    export_pipeline(&stage, &model, &dir).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_run_exports_at_its_end_and_stage2_trains_from_the_export() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&tmp.path().join("a"), 2, &[]);
    run_stage2::<B>(&cfg, Default::default()).unwrap();
    let export = export_dir(&cfg);
    assert!(export.join("model_index.json").is_file());
    // Continue pre-training from the exported folder (as from the released weights).
    let sets = vec![
        format!("stage.model_dir={:?}", export.display().to_string()),
        "stage.qformer_init=\"pretrained\"".to_string(),
    ];
    let cfg2 = config(&tmp.path().join("b"), 1, &sets);
    let summary = run_stage2::<B>(&cfg2, Default::default()).unwrap();
    println!("trained 1 step from the export: {summary:?}");
    assert!(export_dir(&cfg2).join("unet/config.json").is_file());
    // Benchmarks turn the export off.
    let cfg3 = config(
        &tmp.path().join("c"),
        1,
        &["stage.export=false".to_string()],
    );
    run_stage2::<B>(&cfg3, Default::default()).unwrap();
    assert!(!export_dir(&cfg3).exists());
}
