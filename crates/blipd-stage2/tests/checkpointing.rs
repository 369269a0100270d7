//! Gradient checkpointing of the U-Net blocks (`blipd_stage2::checkpoint`) gives the gradients of the
//! ordinary backward: every parameter of the tiny U-Net (plain and cross-attention blocks, the middle block,
//! the skip connections, the time embedding) and the text states.

use blipd_models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use blipd_stage2::checkpoint;
use blipd_testkit::{assert_close, assert_close_slice, values};
use blipd_train::GradSet;
use burn::prelude::*;
use burn::tensor::Distribution;

type AD = burn::backend::Autodiff<burn::backend::Flex>;
type I = burn::backend::Flex;

#[test]
fn checkpointed_backward_equals_the_ordinary_one() {
    // The backend's generator is process-global: the whole-run test must not draw from it meanwhile.
    let _serial = blipd_testkit::serial();
    let dev = Default::default();
    <AD as Backend>::seed(&dev, 7);
    let unet: UNet2DConditionModel<AD> = UNet2DConditionConfig::tiny().init(&dev).unwrap();
    let sample = Tensor::<I, 4>::random([2, 4, 8, 8], Distribution::Normal(0.0, 1.0), &dev);
    let t = Tensor::<I, 1>::from_floats([17.0, 803.0], &dev);
    let states = Tensor::<I, 3>::random([2, 7, 24], Distribution::Normal(0.0, 1.0), &dev);
    let g = Tensor::<I, 4>::random([2, 4, 8, 8], Distribution::Normal(0.0, 1.0), &dev);

    // Ordinary: one graph through the whole U-Net, loss Σ pred · g.
    let s = Tensor::<AD, 3>::from_inner(states.clone()).require_grad();
    let pred = unet.forward(
        Tensor::from_inner(sample.clone()),
        Tensor::from_inner(t.clone()),
        s.clone(),
        None,
    );
    let mut grads = (pred.clone() * Tensor::from_inner(g.clone()))
        .sum()
        .backward();
    let want_states = s.grad_remove(&mut grads).unwrap();
    let want = GradSet::from_backward::<AD, _>(&unet, grads);

    // Checkpointed: no graph in the forward, then block by block.
    let fwd = checkpoint::forward(&unet, sample, t, states);
    assert_close("prediction", fwd.pred.clone(), pred.inner(), 1e-5);
    let got = checkpoint::backward(&unet, &unet, fwd, g);
    assert_close(
        "text states gradient",
        got.states.unwrap(),
        want_states,
        1e-5,
    );
    assert_eq!(got.params.len(), want.len(), "parameters with a gradient");
    for w in want.entries() {
        let e = got
            .params
            .entries()
            .iter()
            .find(|e| e.path == w.path)
            .unwrap_or_else(|| panic!("{}: no gradient with checkpointing", w.path));
        let (a, b) = (values(e.grad.clone()), values(w.grad.clone()));
        // The tolerance scales with the gradient; a NaN or infinity fails in `assert_close_slice` itself.
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        assert_close_slice(&w.path, &a, &b, 1e-5 * f64::from(scale));
    }
    assert!(want.len() > 50, "{} parameters", want.len());
}

/// `(loss, grad norm)` of every step of a tiny stage-2 run with `extra` in `[stage]` and `train` in `[train]`.
fn run(tmp: &std::path::Path, name: &str, train: &str, extra: &str) -> Vec<(f64, f64)> {
    use blipd_stage2::run::{run_stage2, Stage2RunConfig};
    let _serial = blipd_testkit::serial();
    let text = format!(
        "[run]\ndir = {:?}\nseed = 7\n[train]\nmax_steps = 3\nbatch_size = 2\nprogress = false\n{train}\n\
         [optimizer]\nlr = 0.002\nweight_decay = 0.0\n[checkpoint]\nevery = 0\n[sample]\nat_end = false\n\
         [stage]\npreset = \"tiny\"\nexport = false\n{extra}\n\
         [data]\ntarget_size = 32\nshuffle = false\n[data.synthetic]\npairs = 4\nseed = 1\n",
        tmp.join(name).display().to_string()
    );
    let cfg: Stage2RunConfig = blipd_train::parse_config(&text, &[]).unwrap();
    run_stage2::<AD>(&cfg, Default::default()).unwrap();
    let out: Vec<(f64, f64)> =
        blipd_train::metrics::read_metrics(&cfg.run.dir.join("metrics.jsonl"))
            .unwrap()
            .into_iter()
            .map(|r| (r.loss, r.grad_norm.expect("grad norm logged")))
            .collect();
    println!("{name}: (loss, grad norm) {out:?}");
    assert!(
        out.iter().all(|(l, g)| l.is_finite() && g.is_finite()),
        "{name}: {out:?}"
    );
    out
}

#[test]
fn a_checkpointed_run_trains_as_the_ordinary_one() {
    let tmp = tempfile::tempdir().unwrap();
    for train in ["", "grad_accum_steps = 2"] {
        let plain = run(tmp.path(), &format!("plain{}", train.len()), train, "");
        let ckpt = run(
            tmp.path(),
            &format!("ckpt{}", train.len()),
            train,
            "gradient_checkpointing = true",
        );
        assert_eq!(plain.len(), 3);
        assert_eq!(ckpt.len(), plain.len());
        // Same gradients, so the same updates: the later steps' losses agree as well.
        for ((l0, g0), (l1, g1)) in plain.iter().zip(&ckpt) {
            assert!(
                (l0 - l1).abs() <= 1e-4 * l0.abs(),
                "{train}: loss {l0} vs {l1}"
            );
            assert!(
                (g0 - g1).abs() <= 1e-4 * g0.abs(),
                "{train}: grad norm {g0} vs {g1}"
            );
        }
    }
}
