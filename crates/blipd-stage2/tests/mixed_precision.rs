//! `[train] mixed_precision = "bf16"` on a backend with bf16 kernels (burn-flex on the CPU here; the
//! cuda build on a GPU): the stage-2 forward runs its matrix products in bf16 while the weights, the
//! gradients and the optimizer stay f32. Checked against the f32 run of the same seed: the losses
//! differ (bf16 was used) by about bf16's precision, and training still converges. On ndarray, which
//! has no bf16, the setting is refused with a message.

use blipd_stage2::run::{export_dir, run_stage2, Stage2RunConfig};
use blipd_train::parse_config;

type Flex = burn::backend::Autodiff<burn::backend::Flex>;
type Nd = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

fn config(dir: &std::path::Path, steps: u64, precision: &str) -> Stage2RunConfig {
    let text = format!(
        "[run]\ndir = {:?}\nseed = 7\n[train]\nmax_steps = {steps}\nbatch_size = 2\nprogress = false\n\
         mixed_precision = {precision:?}\n[optimizer]\nlr = 0.002\nweight_decay = 0.0\nmax_grad_norm = 1.0\n\
         [checkpoint]\nevery = 0\n[sample]\nat_end = false\n[stage]\npreset = \"tiny\"\nsubject_drop_prob = 0.0\n\
         [data]\ntarget_size = 32\nshuffle = false\n[data.synthetic]\npairs = 2\nseed = 1\n",
        dir.display().to_string()
    );
    parse_config(&text, &[]).unwrap()
}

fn losses(dir: &std::path::Path) -> Vec<f64> {
    blipd_train::metrics::read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| r.loss)
        .collect()
}

#[test]
fn bf16_autocast_trains_close_to_f32_with_f32_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 30;
    let f32_cfg = config(&tmp.path().join("f32"), steps, "no");
    let bf16_cfg = config(&tmp.path().join("bf16"), steps, "bf16");
    run_stage2::<Flex>(&f32_cfg, Default::default()).unwrap();
    run_stage2::<Flex>(&bf16_cfg, Default::default()).unwrap();
    let (a, b) = (losses(&f32_cfg.run.dir), losses(&bf16_cfg.run.dir));
    assert_eq!((a.len(), b.len()), (steps as usize, steps as usize));
    let rel = (a[0] - b[0]).abs() / a[0];
    println!(
        "step 1 loss: f32 {:.6}, bf16 {:.6} (relative difference {rel:.2e})",
        a[0], b[0]
    );
    assert!(
        a[0] != b[0],
        "the bf16 run computed exactly the f32 loss: autocast did nothing"
    );
    assert!(
        rel < 2e-2,
        "step 1: f32 {} vs bf16 {} ({rel:.2e})",
        a[0],
        b[0]
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&b[..5]), mean(&b[b.len() - 5..]));
    let (first32, last32) = (mean(&a[..5]), mean(&a[a.len() - 5..]));
    println!(
        "mean loss of steps 1-5 → {}-{}: f32 {first32:.4} → {last32:.4}, bf16 {first:.4} → {last:.4}",
        steps - 4,
        steps
    );
    assert!(b.iter().all(|l| l.is_finite()), "{b:?}");
    assert!(last < 0.7 * first, "bf16 loss did not fall: {b:?}");
    assert!(
        (last - last32).abs() < 0.25 * last32,
        "bf16 ended at {last}, f32 at {last32}"
    );
    // The weights stay f32 (master weights): the export holds f32 tensors.
    let sd = blipd_models::weights::StateDict::read(
        &export_dir(&bf16_cfg).join("unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let key = sd.keys().next().unwrap().clone();
    assert_eq!(
        sd.data(&key).unwrap().dtype,
        burn::tensor::DType::F32,
        "{key}"
    );
}

#[test]
fn bf16_on_a_backend_without_bf16_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), 1, "bf16");
    let err = run_stage2::<Nd>(&cfg, Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mixed_precision") && err.contains("ndarray"),
        "{err}"
    );
    let err = parse_config::<Stage2RunConfig>(
        "[run]\ndir = \"x\"\n[train]\nmax_steps = 1\nbatch_size = 1\nmixed_precision = \"fp16\"\n[optimizer]\nlr = 0.1\n[stage]\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("fp16") && err.contains("bf16"), "{err}");
}
