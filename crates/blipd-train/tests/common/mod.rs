//! A small test stage: a 2-layer MLP regressing a deterministic synthetic dataset, with a
//! shuffled data order, randomness from both the stage stream and the backend generator, and
//! a bit of its own resumable state. Hooks let a test make it fail or hang at a chosen point.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use blipd_train::config::{parse_config, RunConfig};
use blipd_train::{
    EpochSampler, KeyedSource, Result, SampleContext, Stage, StepOutput, TrainError, TrainRng,
    Trainer,
};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use rand::Rng;
use serde::{Deserialize, Serialize};

pub type B = blipd_testkit::CpuTrain;
pub type Inner = blipd_testkit::Cpu;

/// The backend generator of burn-ndarray is process-global: trainer runs in one test binary
/// must not interleave.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub const N: usize = 96;
pub const IN: usize = 4;
pub const HID: usize = 16;
pub const OUT: usize = 2;

#[derive(Module, Debug)]
pub struct Layer<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Param<Tensor<B, 1>>,
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub layers: Vec<Layer<B>>,
}

impl<B: Backend> Mlp<B> {
    /// Deterministic init from `seed` (host RNG), so both runs of a comparison start equal.
    pub fn new(seed: u64, device: &B::Device) -> Self {
        let mut rng = TrainRng::new(seed, 999);
        let mut layer = |i: usize, o: usize| {
            let s = 1.0 / (i as f32).sqrt();
            let w: Vec<f32> = (0..i * o).map(|_| rng.random_range(-s..s)).collect();
            let b: Vec<f32> = (0..o).map(|_| rng.random_range(-s..s)).collect();
            Layer {
                weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [i, o]), device)),
                bias: Param::from_tensor(Tensor::from_data(TensorData::new(b, [o]), device)),
            }
        };
        Mlp {
            layers: vec![layer(IN, HID), layer(HID, OUT)],
        }
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let l0 = &self.layers[0];
        let h = x.matmul(l0.weight.val()) + l0.bias.val().unsqueeze();
        let h = h.tanh();
        let l1 = &self.layers[1];
        h.matmul(l1.weight.val()) + l1.bias.val().unsqueeze()
    }
}

/// Sample `i`: features and target of a smooth nonlinear function.
pub fn sample(i: usize) -> ([f32; IN], [f32; OUT]) {
    let mut x = [0f32; IN];
    for (j, v) in x.iter_mut().enumerate() {
        *v = ((i as f32) * 0.37 + (j as f32) * 1.3).sin();
    }
    let y = [0.3 * (x[0] + x[1]).powi(2) - x[2], x[1] * x[3] + 0.1 * x[0]];
    (x, y)
}

pub type Batch = (Tensor<B, 2>, Tensor<B, 2>);

pub fn data_source(
    seed: u64,
    batch: usize,
) -> KeyedSource<impl FnMut(&[usize], &[u64]) -> Result<Batch>> {
    let device = Default::default();
    KeyedSource::new(
        EpochSampler::new(N, batch, seed, true),
        batch,
        move |idx: &[usize], _keys: &[u64]| {
            let mut xs = Vec::with_capacity(idx.len() * IN);
            let mut ys = Vec::with_capacity(idx.len() * OUT);
            for &i in idx {
                let (x, y) = sample(i);
                xs.extend(x);
                ys.extend(y);
            }
            Ok((
                Tensor::from_data(TensorData::new(xs, [idx.len(), IN]), &device),
                Tensor::from_data(TensorData::new(ys, [idx.len(), OUT]), &device),
            ))
        },
    )
}

/// Where the stage should stop: `Fail` returns an error (a crash the process survives),
/// `Hang` writes `<run_dir>/PAUSED` and sleeps until killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    None,
    FailAtCall(u64),
    HangAtCall(u64),
    /// Hang inside `save_state` of the checkpoint of this step (after weights and optimizer
    /// state have been written into the temporary folder).
    HangInCheckpoint(u64),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpStageConfig {
    pub noise: f64,
    pub feature_drop: f64,
}

pub struct MlpStage {
    pub cfg: MlpStageConfig,
    pub calls: u64,
    pub hook: Hook,
    pub run_dir: PathBuf,
    pub accum: u64,
    pub samples_written: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct MlpStageState {
    calls: u64,
}

fn hang(run_dir: &Path, what: &str) -> ! {
    std::fs::write(run_dir.join("PAUSED"), what).unwrap();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

impl Stage<B> for MlpStage {
    type Model = Mlp<B>;
    type Batch = Batch;

    fn step(&mut self, model: &Mlp<B>, (x, y): Batch, rng: &mut TrainRng) -> Result<StepOutput<B>> {
        self.calls += 1;
        match self.hook {
            Hook::FailAtCall(c) if c == self.calls => {
                return Err(TrainError::stage(format!("injected failure at call {c}")))
            }
            Hook::HangAtCall(c) if c == self.calls => hang(&self.run_dir, "step"),
            _ => {}
        }
        let [n, f] = x.dims();
        // Stage-stream randomness: a host-side feature-drop mask.
        let mask: Vec<f32> = (0..n * f)
            .map(|_| {
                if rng.random::<f64>() < self.cfg.feature_drop {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [n, f]), &x.device());
        // Backend randomness (seeded by the trainer from the stage stream): input noise.
        let noise = Tensor::<B, 2>::random([n, f], Distribution::Normal(0.0, 1.0), &x.device());
        let x = x * mask + noise * self.cfg.noise;
        let pred = model.forward(x);
        let loss = (pred - y).powi_scalar(2).mean();
        let calls = Tensor::<B, 1>::from_floats([self.calls as f32], &loss.device());
        Ok(StepOutput::new(loss.clone())
            .with_metric("mse", loss.detach())
            .with_metric("calls", calls))
    }

    fn sample(&mut self, model: &Mlp<Inner>, ctx: SampleContext) -> Result<()> {
        let device = Default::default();
        let (x, _) = sample(0);
        let pred = model.forward(Tensor::from_data(
            TensorData::new(x.to_vec(), [1, IN]),
            &device,
        ));
        let text = format!("{:?}", pred.to_data().to_vec::<f32>().unwrap());
        std::fs::write(ctx.dir.join("pred.txt"), text).map_err(TrainError::stage)?;
        self.samples_written.push(ctx.step);
        Ok(())
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        if let Hook::HangInCheckpoint(step) = self.hook {
            if self.calls == step * self.accum {
                hang(&self.run_dir, "checkpoint");
            }
        }
        let text = serde_json::to_string(&MlpStageState { calls: self.calls }).unwrap();
        std::fs::write(dir.join("state.json"), text).map_err(TrainError::stage)
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        let text = std::fs::read_to_string(dir.join("state.json")).map_err(TrainError::stage)?;
        let s: MlpStageState = serde_json::from_str(&text).map_err(TrainError::stage)?;
        self.calls = s.calls;
        Ok(())
    }
}

pub type Cfg = RunConfig<MlpStageConfig>;

/// The test run: 24 steps of 2 × 8 samples over 96 (so epochs wrap mid-run), warm-up +
/// cosine, clipping, weight decay, EMA, checkpoints every 5 steps (last 2 kept), samples every 10.
pub fn config(run_dir: &Path, overrides: &[&str]) -> Cfg {
    let text = format!(
        r#"
[run]
dir = "{}"
seed = 7

[train]
max_steps = 24
batch_size = 8
grad_accum_steps = 2
progress = false

[optimizer]
lr = 0.03
weight_decay = 0.05
max_grad_norm = 0.5

[schedule]
kind = "cosine"
warmup_steps = 3
min_lr = 0.003

[ema]
enabled = true
decay = 0.9

[checkpoint]
every = 5
keep_last = 2

[sample]
every = 10

[stage]
noise = 0.05
feature_drop = 0.1
"#,
        run_dir.display()
    );
    let sets: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    parse_config(&text, &sets).unwrap()
}

pub fn trainer(cfg: &Cfg, hook: Hook) -> Trainer<B, MlpStage> {
    let device = Default::default();
    let stage = MlpStage {
        cfg: cfg.stage.clone(),
        calls: 0,
        hook,
        run_dir: cfg.run.dir.clone(),
        accum: cfg.train.grad_accum_steps as u64,
        samples_written: Vec::new(),
    };
    let model = Mlp::<B>::new(cfg.run.seed, &device);
    Trainer::from_run_config(cfg, stage, model, device).unwrap()
}

/// Runs `cfg` to completion (resuming if there is a checkpoint) with `hook`.
pub fn run(cfg: &Cfg, hook: Hook) -> Result<blipd_train::RunSummary> {
    let mut t = trainer(cfg, hook);
    let mut data = data_source(cfg.run.seed, cfg.train.batch_size);
    t.fit(&mut data)
}

/// Every metrics line of a run, with the timing field zeroed (everything else must match
/// bit for bit between an uninterrupted and a resumed run).
pub fn records(run_dir: &Path) -> Vec<blipd_train::metrics::MetricsRecord> {
    blipd_train::metrics::read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|mut r| {
            r.samples_per_s = 0.0;
            r
        })
        .collect()
}

/// Asserts two runs logged the same sequence, comparing losses by their bits.
pub fn assert_same_run(reference: &Path, resumed: &Path) {
    let a = records(reference);
    let b = records(resumed);
    let steps: Vec<u64> = b.iter().map(|r| r.step).collect();
    assert_eq!(
        steps,
        (1..=a.len() as u64).collect::<Vec<_>>(),
        "each step logged once"
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            x.loss.to_bits(),
            y.loss.to_bits(),
            "loss at step {}: {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
        assert_eq!(x, y, "metrics at step {}", x.step);
    }
    assert_eq!(a.len(), b.len());
    // TensorBoard shows the same curve: the resumed run's new event file purges the steps logged
    // after its checkpoint from the earlier file.
    let tb = |dir: &Path| blipd_train::tensorboard::read_scalars(dir, "train/loss").unwrap();
    let expected: Vec<(u64, f32)> = a.iter().map(|r| (r.step, r.loss as f32)).collect();
    assert_eq!(
        tb(reference),
        expected,
        "TensorBoard loss of the reference run"
    );
    assert_eq!(tb(resumed), expected, "TensorBoard loss of the resumed run");
}

/// Bytes of a file of the final checkpoint.
pub fn final_file(run_dir: &Path, step: u64, name: &str) -> Vec<u8> {
    std::fs::read(blipd_train::checkpoint::checkpoint_dir(run_dir, step).join(name)).unwrap()
}
