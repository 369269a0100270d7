//! Weights round trip and strict loading, EMA, gradient accumulation and the GradSync calls,
//! and config files rejected with the offending key named.

mod common;

use std::sync::{Arc, Mutex};

use blipd_train::params::{load_module, param_infos, save_module};
use blipd_train::{
    load_config, ConfigError, Ema, EmaConfig, GradSet, GradSync, Result, Stage, TrainRng,
};
use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData};
use common::*;

#[test]
fn module_weights_round_trip_and_strict_errors() {
    let t = tempfile::tempdir().unwrap();
    let dev = Default::default();
    let a = Mlp::<B>::new(1, &dev);
    let infos = param_infos(&a);
    let paths: Vec<&str> = infos.iter().map(|i| i.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "layers.0.weight",
            "layers.0.bias",
            "layers.1.weight",
            "layers.1.bias"
        ]
    );
    assert!(infos.iter().all(|i| i.trainable));
    let f = t.path().join("w.safetensors");
    save_module(&a, &f, Default::default()).unwrap();
    let b = load_module(Mlp::<B>::new(2, &dev), &f).unwrap();
    for (x, y) in [(0, 0), (1, 1)] {
        let (la, lb) = (&a.layers[x], &b.layers[y]);
        assert_eq!(la.weight.val().to_data(), lb.weight.val().to_data());
        assert_eq!(la.bias.val().to_data(), lb.bias.val().to_data());
    }
    assert!(
        b.layers[0].weight.val().is_require_grad(),
        "trainable flag kept"
    );
    // A module with another architecture: every problem is named.
    let mut c = Mlp::<B>::new(3, &dev);
    c.layers.push(Layer {
        weight: burn::module::Param::from_tensor(Tensor::zeros([2, 2], &dev)),
        bias: burn::module::Param::from_tensor(Tensor::zeros([2], &dev)),
    });
    c.layers[0].bias = burn::module::Param::from_tensor(Tensor::zeros([5], &dev));
    let err = load_module(c, &f).unwrap_err().to_string();
    assert!(err.contains("missing `layers.2.weight`"), "{err}");
    assert!(
        err.contains("`layers.0.bias`: shape [16] in file, [5] in module"),
        "{err}"
    );
    let d = Mlp::<B> {
        layers: vec![Mlp::<B>::new(4, &dev).layers.remove(0)],
    };
    let err = load_module(d, &f).unwrap_err().to_string();
    assert!(err.contains("unexpected `layers.1.weight`"), "{err}");
}

#[test]
fn ema_follows_diffusers_update() {
    let dev = Default::default();
    let online = Mlp::<B>::new(1, &dev);
    let cfg = EmaConfig {
        enabled: true,
        decay: 0.5,
        ..EmaConfig::default()
    };
    let mut ema: Ema<Inner, Mlp<Inner>> = Ema::new::<B, _>(cfg, &online);
    let start: Vec<f32> = online.layers[1].bias.val().to_data().to_vec().unwrap();
    // Update 1 has decay 0: the EMA becomes the online weights.
    let shift = |m: Mlp<B>, by: f32| {
        let mut m = m;
        let b = m.layers[1].bias.val().inner() + by;
        m.layers[1].bias = burn::module::Param::from_tensor(Tensor::from_inner(b));
        m
    };
    let online = shift(online, 1.0);
    ema.update::<B, _>(&online);
    let e: Vec<f32> = ema.model().layers[1].bias.val().to_data().to_vec().unwrap();
    for (x, s) in e.iter().zip(&start) {
        assert!((x - (s + 1.0)).abs() < 1e-6);
    }
    // Update 2: decay = min(0.5, 2/11) = 2/11 → ema = ema − (9/11)(ema − p).
    let online = shift(online, 1.0);
    ema.update::<B, _>(&online);
    let e: Vec<f32> = ema.model().layers[1].bias.val().to_data().to_vec().unwrap();
    for (x, s) in e.iter().zip(&start) {
        let want = (s + 1.0) - (9.0 / 11.0) * ((s + 1.0) - (s + 2.0));
        assert!((x - want).abs() < 1e-6, "{x} vs {want}");
    }
    assert_eq!(ema.optimization_step, 2);
    let _ = online.valid();
}

/// Records the calls the trainer makes.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(usize, bool)>>>);

impl GradSync<Inner> for Recorder {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn sync_grads(&mut self, grads: &mut GradSet<Inner>, is_final: bool) -> Result<()> {
        self.0.lock().unwrap().push((grads.len(), is_final));
        Ok(())
    }
    fn all_reduce_mean(&mut self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}

#[test]
fn accumulation_averages_micro_batches_and_syncs_once_per_step() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    // Without noise/drop, 2 micro-batches of 8 give the gradient of the batch of 16.
    let over = [
        "stage.noise=0",
        "stage.feature_drop=0",
        "ema.enabled=false",
        "optimizer.max_grad_norm=1e9",
    ];
    let cfg = config(&t.path().join("a"), &over);
    let rec = Recorder::default();
    let mut tr = trainer(&cfg, Hook::None).with_grad_sync(Box::new(rec.clone()));
    let mut data = data_source(cfg.run.seed, 8);
    let s_acc = tr.train_step(&mut data).unwrap();
    assert_eq!(*rec.0.lock().unwrap(), vec![(4, false), (4, true)]);

    let mut over1 = over.to_vec();
    over1.extend(["train.grad_accum_steps=1", "train.batch_size=16"]);
    let cfg1 = config(&t.path().join("b"), &over1);
    let mut tr1 = trainer(&cfg1, Hook::None);
    let mut data1 = data_source(cfg1.run.seed, 16);
    let s_one = tr1.train_step(&mut data1).unwrap();
    assert!(
        (s_acc.loss - s_one.loss).abs() < 1e-6,
        "{} vs {}",
        s_acc.loss,
        s_one.loss
    );
    assert!((s_acc.grad_norm - s_one.grad_norm).abs() < 1e-5 * s_one.grad_norm);
    assert_eq!(s_acc.samples, 16);
    let w_acc: Vec<f32> = tr.model().layers[0]
        .weight
        .val()
        .to_data()
        .to_vec()
        .unwrap();
    let w_one: Vec<f32> = tr1.model().layers[0]
        .weight
        .val()
        .to_data()
        .to_vec()
        .unwrap();
    let max = blipd_testkit::max_abs_diff(&w_acc, &w_one);
    assert!(max < 1e-6, "weights differ by {max}");
}

#[test]
fn malformed_config_file_is_rejected_naming_the_key() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("run.toml");
    let base = r#"
[run]
dir = "/tmp/x"
[train]
max_steps = 10
batch_size = 2
[optimizer]
lr = 1e-4
[stage]
noise = 0.0
feature_drop = 0.0
"#;
    std::fs::write(&path, base).unwrap();
    let ok: Cfg = load_config(&path, &["optimizer.lr=2e-4".into()]).unwrap();
    assert_eq!(ok.optimizer.lr, 2e-4);

    std::fs::write(
        &path,
        base.replace("batch_size = 2", "batch_size = 2\ngrad_acum_steps = 4"),
    )
    .unwrap();
    let err = load_config::<Cfg>(&path, &[]).unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("grad_acum_steps") && msg.contains("run.toml"),
        "{msg}"
    );

    std::fs::write(&path, base).unwrap();
    let err = load_config::<Cfg>(&path, &["schedule.warmup=100".into()]).unwrap_err();
    assert!(err.to_string().contains("schedule.warmup"), "{err}");
}

#[test]
fn stage_rng_is_threaded_through_steps() {
    // The stage's draws come from the trainer's stream: same seed, same draws.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Default::default();
    let mut s = MlpStage {
        cfg: MlpStageConfig {
            noise: 0.0,
            feature_drop: 0.5,
        },
        calls: 0,
        hook: Hook::None,
        run_dir: std::env::temp_dir(),
        accum: 1,
        samples_written: vec![],
    };
    let m = Mlp::<B>::new(1, &dev);
    let batch = || {
        let x = Tensor::<B, 2>::from_data(TensorData::new(vec![1f32; 8 * IN], [8, IN]), &dev);
        let y = Tensor::<B, 2>::zeros([8, OUT], &dev);
        (x, y)
    };
    let mut r1 = TrainRng::new(5, 0);
    let mut r2 = TrainRng::new(5, 0);
    let a = s.step(&m, batch(), &mut r1).unwrap().loss.into_scalar();
    let b = s.step(&m, batch(), &mut r2).unwrap().loss.into_scalar();
    assert_eq!(a.to_bits(), b.to_bits());
    let c = s.step(&m, batch(), &mut r1).unwrap().loss.into_scalar();
    assert_ne!(a.to_bits(), c.to_bits(), "the stream advances");
}
