//! AdamW (with LAVIS weight-decay groups) and global-norm clipping against PyTorch
//! (fixture from tests/reference/gen_adamw.py, torch.optim.AdamW + clip_grad_norm_).

use std::collections::BTreeMap;

use blipd_train::{AdamW, AdamWConfig, GradSet};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

type B = blipd_testkit::CpuTrain;

#[derive(Module, Debug)]
struct Three<B: Backend> {
    w: Param<Tensor<B, 2>>,
    b: Param<Tensor<B, 1>>,
    t: Param<Tensor<B, 3>>,
}

#[derive(serde::Deserialize)]
struct Step {
    lr: f64,
    grads: BTreeMap<String, Vec<f32>>,
    total_norm: f64,
    after: BTreeMap<String, Vec<f32>>,
}

#[derive(serde::Deserialize)]
struct Fixture {
    max_norm: f64,
    weight_decay: f64,
    shapes: BTreeMap<String, Vec<usize>>,
    init: BTreeMap<String, Vec<f32>>,
    steps: Vec<Step>,
}

fn tensor<const D: usize, BB: Backend>(
    v: &[f32],
    shape: &[usize],
    dev: &BB::Device,
) -> Tensor<BB, D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape.to_vec()), dev)
}

fn values<const D: usize, BB: Backend>(t: &Tensor<BB, D>) -> Vec<f32> {
    t.to_data().to_vec::<f32>().unwrap()
}

#[test]
fn adamw_and_clipping_match_torch() {
    let text = include_str!("fixtures/adamw_torch.json");
    let fx: Fixture = serde_json::from_str(text).unwrap();
    let dev = Default::default();
    let s = &fx.shapes;
    let mut model = Three::<B> {
        w: Param::from_tensor(tensor(&fx.init["w"], &s["w"], &dev)),
        b: Param::from_tensor(tensor(&fx.init["b"], &s["b"], &dev)),
        t: Param::from_tensor(tensor(&fx.init["t"], &s["t"], &dev)),
    };
    let mut cfg = AdamWConfig::new(1e-2);
    cfg.weight_decay = fx.weight_decay;
    let mut optim = AdamW::new(cfg);
    let mut max_err = 0f32;
    let mut clipped_steps = 0;
    for (i, step) in fx.steps.iter().enumerate() {
        // loss = Σ p·g has gradient g.
        let g = |k: &str| &step.grads[k];
        let loss = model.w.val().mul(tensor(g("w"), &s["w"], &dev)).sum()
            + model.b.val().mul(tensor(g("b"), &s["b"], &dev)).sum()
            + model.t.val().mul(tensor(g("t"), &s["t"], &dev)).sum();
        let mut grads = GradSet::from_backward::<B, _>(&model, loss.backward());
        assert_eq!(grads.len(), 3);
        let paths: Vec<&str> = grads.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["w", "b", "t"]);
        let norm: f64 = grads.clip_global_norm(fx.max_norm).unwrap().into_scalar() as f64;
        assert!(
            (norm - step.total_norm).abs() <= 1e-5 * step.total_norm,
            "step {i}: norm {norm} vs torch {}",
            step.total_norm
        );
        if step.total_norm > fx.max_norm {
            clipped_steps += 1;
        }
        model = optim.step::<B, _>(model, &grads, step.lr);
        for (k, ours) in [
            ("w", values(&model.w.val())),
            ("b", values(&model.b.val())),
            ("t", values(&model.t.val())),
        ] {
            // Panics on a length mismatch, NaN or infinity.
            max_err = max_err.max(blipd_testkit::max_abs_diff(&ours, &step.after[k]) as f32);
        }
        assert!(model.w.val().is_require_grad(), "params stay trainable");
    }
    println!(
        "AdamW vs torch: max-abs error {max_err:e} over {} steps",
        fx.steps.len()
    );
    assert!(
        clipped_steps > 0 && clipped_steps < fx.steps.len(),
        "fixture exercises both cases"
    );
    assert!(max_err <= 1e-6, "max-abs error {max_err}");
    let st = optim.state();
    assert_eq!(st["w"].step, fx.steps.len() as u64);
}

#[test]
fn weight_decay_rule() {
    let mut c = AdamWConfig::new(1.0);
    assert!(c.decays("unet.conv_in.weight", 4));
    assert!(c.decays("ctx_embeddings_cache", 3));
    assert!(!c.decays("unet.conv_in.bias", 1));
    assert!(!c.decays("ln.gamma", 1));
    c.no_decay = vec!["embeddings".into()];
    assert!(!c.decays("text.embeddings.weight", 2));
    c.weight_decay = 0.0;
    assert!(!c.decays("w", 2));
}
