//! The training loop.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    checkpoints_root, list_checkpoints, prune_checkpoints, remove_stale, scan_checkpoints,
    set_aside, write_file_synced, PendingCheckpoint,
};
use crate::config::{to_toml_string, RunConfig, TrainerConfig};
use crate::data::BatchSource;
use crate::ema::Ema;
use crate::error::{Result, TrainError};
use crate::grads::{GradSet, GradSync, LocalSync};
use crate::metrics::{MetricsRecord, MetricsWriter, METRICS_FILE};
use crate::optim::AdamW;
use crate::params::{
    load_module, load_module_subset, param_infos, save_module_subset, trainable_paths,
};
use crate::plot::{plot_metrics, PlotOptions};
use crate::rng::{streams, RngState, TrainRng};
use crate::schedule::LrSchedule;
use crate::stage::{SampleContext, Stage};
use crate::tensorboard::EventWriter;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;
type InnerModel<B, S> = <<S as Stage<B>>::Model as AutodiffModule<B>>::InnerModule;

/// Files of a checkpoint written by the trainer.
pub mod files {
    pub const MODEL: &str = "model.safetensors";
    pub const OPTIMIZER: &str = "optimizer.safetensors";
    pub const EMA: &str = "ema.safetensors";
    pub const TRAINER: &str = "trainer.json";
    pub const CONFIG: &str = "config.toml";
    pub const STAGE_DIR: &str = "stage";
    /// `rank-<r>.json`: that rank's stage RNG and data-source state.
    pub fn rank(r: usize) -> String {
        format!("rank-{r}.json")
    }
}

/// `trainer.json` of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerState {
    pub format: String,
    /// Optimizer steps completed.
    pub step: u64,
    /// Samples consumed over all ranks.
    pub samples: u64,
    /// Updates skipped for non-finite values.
    pub skipped: u64,
    pub world_size: usize,
    /// EMA updates applied (absent without EMA).
    pub ema_step: Option<u64>,
    /// [`Stage::frozen_source`] when the checkpoint holds only the trainable parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_source: Option<String>,
}

/// `rank-<r>.json` of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankState {
    pub rank: usize,
    pub stage_rng: RngState,
    pub data: serde_json::Value,
}

const STATE_FORMAT: &str = "blipd-trainer-1";

/// Result of one optimizer step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// Steps completed after this one.
    pub step: u64,
    /// Loss averaged over micro-steps and ranks (f32 value widened to f64).
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub metrics: BTreeMap<String, f64>,
    pub seconds: f64,
    pub samples: u64,
    /// Whether the update was skipped (non-finite, with `skip_nonfinite`).
    pub skipped: bool,
}

/// Summary returned by [`Trainer::fit`].
#[derive(Clone, Debug, PartialEq)]
pub struct RunSummary {
    pub resumed_from: Option<u64>,
    pub final_step: u64,
    pub steps_run: u64,
    pub last: Option<StepStats>,
}

/// Runs a [`Stage`]: data → step → backward → gradient sync → clip → AdamW → EMA → log →
/// sample / checkpoint when due, with exact resume.
pub struct Trainer<B: AutodiffBackend, S: Stage<B>> {
    config: TrainerConfig,
    config_toml: String,
    device: B::Device,
    stage: S,
    model: Option<S::Model>,
    optim: AdamW<Inner<B>>,
    ema: Option<Ema<Inner<B>, InnerModel<B, S>>>,
    schedule: LrSchedule,
    sync: Box<dyn GradSync<Inner<B>>>,
    rng: TrainRng,
    step: u64,
    samples: u64,
    skipped: u64,
    resumed_from: Option<u64>,
    checked_resume: bool,
    metrics: Option<MetricsWriter>,
    tensorboard: Option<EventWriter>,
    progress: Option<ProgressBar>,
    window: Vec<StepStats>,
}

impl<B: AutodiffBackend, S: Stage<B>> Trainer<B, S> {
    /// A trainer for `stage` and its trainable `model` on `device`. `config_toml` is the full
    /// resolved config (stage and data sections included) saved in the run directory and in
    /// every checkpoint; [`Trainer::from_run_config`] fills it in.
    pub fn new(
        config: TrainerConfig,
        config_toml: String,
        stage: S,
        model: S::Model,
        device: B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let schedule = LrSchedule::new(
            config.schedule.clone(),
            config.optimizer.lr,
            config.train.max_steps,
        );
        let ema = config
            .ema
            .enabled
            .then(|| Ema::new::<B, S::Model>(config.ema.clone(), &model));
        Ok(Self {
            rng: TrainRng::new(config.run.seed, streams::STAGE),
            optim: AdamW::new(config.optimizer.clone()),
            config,
            config_toml,
            device,
            stage,
            model: Some(model),
            ema,
            schedule,
            sync: Box::new(LocalSync),
            step: 0,
            samples: 0,
            skipped: 0,
            resumed_from: None,
            checked_resume: false,
            metrics: None,
            tensorboard: None,
            progress: None,
            window: Vec::new(),
        })
    }

    /// [`Trainer::new`] from a whole run config.
    pub fn from_run_config<SC: Serialize, DC: Serialize>(
        config: &RunConfig<SC, DC>,
        stage: S,
        model: S::Model,
        device: B::Device,
    ) -> Result<Self> {
        let toml = to_toml_string(config)?;
        Self::new(config.trainer(), toml, stage, model, device)
    }

    /// Uses `sync` for data parallelism (call before [`Trainer::resume`] / [`Trainer::fit`]).
    /// The stage stream becomes this rank's (`STAGE + rank`).
    pub fn with_grad_sync(mut self, sync: Box<dyn GradSync<Inner<B>>>) -> Self {
        self.rng = TrainRng::new(self.config.run.seed, streams::STAGE + sync.rank() as u64);
        self.sync = sync;
        self
    }

    /// Resumes (if configured) and trains until `train.max_steps`.
    pub fn fit<D: BatchSource<Batch = S::Batch>>(&mut self, data: &mut D) -> Result<RunSummary> {
        if self.config.checkpoint.resume && !self.checked_resume {
            self.resume(data)?;
        } else if !self.checked_resume && !list_checkpoints(&self.config.run.dir)?.is_empty() {
            tracing::warn!(
                "checkpoint.resume = false: starting from step 0 in {}, whose checkpoints will be \
                 replaced and pruned",
                self.config.run.dir.display()
            );
        }
        self.open_outputs()?;
        let (start, max) = (self.step, self.config.train.max_steps);
        let mut last = None;
        while self.step < max {
            let stats = self.train_step(data)?;
            self.log(&stats, data)?;
            if due(
                self.step,
                self.config.sample.every,
                max,
                self.config.sample.at_end,
            ) {
                self.sample()?;
            }
            if due(
                self.step,
                self.config.checkpoint.every,
                max,
                self.config.checkpoint.at_end,
            ) {
                self.save_checkpoint(data)?;
            }
            last = Some(stats);
        }
        self.finish();
        Ok(RunSummary {
            resumed_from: self.resumed_from,
            final_step: self.step,
            steps_run: self.step - start,
            last,
        })
    }

    /// One optimizer step over `grad_accum_steps` micro-batches.
    pub fn train_step<D: BatchSource<Batch = S::Batch>>(
        &mut self,
        data: &mut D,
    ) -> Result<StepStats> {
        let t0 = Instant::now();
        let accum = self.config.train.grad_accum_steps;
        let model = self.model.take().expect("model present");
        let mut grads = GradSet::<Inner<B>>::default();
        let mut loss_sum: Option<Tensor<Inner<B>, 1>> = None;
        let mut metric_sums: BTreeMap<String, Tensor<Inner<B>, 1>> = BTreeMap::new();
        let result = (|| {
            for micro in 0..accum {
                let batch = data.next_batch()?;
                if self.config.train.seed_backend {
                    B::seed(&self.device, self.rng.next_u64());
                }
                let t_fwd = Instant::now();
                let out = self
                    .stage
                    .step_dist(&model, batch, &mut self.rng, self.sync.as_mut())?;
                let fwd_s = t_fwd.elapsed().as_secs_f64();
                let detached = out.loss.clone().inner();
                loss_sum = Some(match loss_sum.take() {
                    Some(s) => s.add(detached),
                    None => detached,
                });
                for (k, v) in out.metrics {
                    let v = match metric_sums.remove(&k) {
                        Some(s) => s.add(v),
                        None => v,
                    };
                    metric_sums.insert(k, v);
                }
                let t_bwd = Instant::now();
                let micro_grads = match out.grads {
                    Some(mut g) => {
                        if accum > 1 {
                            g.scale(1.0 / accum as f64);
                        }
                        g
                    }
                    None => {
                        let loss = if accum > 1 {
                            out.loss.div_scalar(accum as f64)
                        } else {
                            out.loss
                        };
                        GradSet::from_backward::<B, _>(&model, loss.backward())
                    }
                };
                grads.accumulate(micro_grads);
                tracing::debug!(
                    forward_s = fwd_s,
                    backward_s = t_bwd.elapsed().as_secs_f64(),
                    "micro-step {micro}"
                );
                self.sync.sync_grads(&mut grads, micro + 1 == accum)?;
            }
            Ok::<_, TrainError>(())
        })();
        if let Err(e) = result {
            self.model = Some(model);
            return Err(e);
        }
        let norm = match self.config.optimizer.max_grad_norm {
            Some(max) => grads.clip_global_norm(max),
            None => grads.global_norm(),
        };
        let Some(norm) = norm else {
            self.model = Some(model);
            return Err(TrainError::Stage(
                "no gradients: no trainable parameter of the model depends on the loss".into(),
            ));
        };
        // One device→host read per step: loss, metrics, grad-norm.
        let mut scalars = vec![loss_sum.expect("accum >= 1").div_scalar(accum as f64)];
        let names: Vec<String> = metric_sums.keys().cloned().collect();
        scalars.extend(
            metric_sums
                .into_values()
                .map(|v| v.div_scalar(accum as f64)),
        );
        scalars.push(norm);
        let mut host: Vec<f64> = Tensor::cat(scalars, 0).into_data().iter::<f64>().collect();
        let grad_norm = host.pop().expect("norm read back");
        self.sync.all_reduce_mean(&mut host)?;
        let loss = host[0];
        let metrics: BTreeMap<String, f64> =
            names.into_iter().zip(host[1..].iter().copied()).collect();

        let lr = self.schedule.lr(self.step);
        let finite = loss.is_finite() && grad_norm.is_finite();
        let skipped = !finite;
        let model = if finite {
            let t_opt = Instant::now();
            let model = self.optim.step::<B, _>(model, &grads, lr);
            tracing::debug!(optimizer_s = t_opt.elapsed().as_secs_f64(), "AdamW update");
            if let Some(ema) = &mut self.ema {
                ema.update::<B, _>(&model);
            }
            model
        } else if self.config.optimizer.skip_nonfinite {
            self.skipped += 1;
            tracing::warn!(
                "step {}: non-finite loss {loss} or grad-norm {grad_norm}; update skipped",
                self.step + 1
            );
            model
        } else {
            self.model = Some(model);
            return Err(TrainError::NonFinite {
                step: self.step + 1,
                what: format!("loss {loss} / grad-norm {grad_norm}"),
            });
        };
        self.model = Some(model);
        self.step += 1;
        let step_samples = (self.config.train.batch_size * accum * self.sync.world_size()) as u64;
        self.samples += step_samples;
        Ok(StepStats {
            step: self.step,
            loss,
            lr,
            grad_norm,
            metrics,
            seconds: t0.elapsed().as_secs_f64(),
            samples: step_samples,
            skipped,
        })
    }

    /// Restores the newest valid checkpoint of the run directory (skipping corrupt ones with a
    /// warning). Returns its step, or `None` when there is none (a fresh start).
    pub fn resume<D: BatchSource<Batch = S::Batch>>(
        &mut self,
        data: &mut D,
    ) -> Result<Option<u64>> {
        self.checked_resume = true;
        let run_dir = self.config.run.dir.clone();
        if self.sync.rank() == 0 {
            remove_stale(&run_dir)?;
            let (valid, rejected) = scan_checkpoints(&run_dir)?;
            if valid.is_none() && !rejected.is_empty() && !self.config.checkpoint.restart {
                // Starting over would silently throw the run away: say what was found instead.
                return Err(TrainError::NoValidCheckpoint {
                    dir: checkpoints_root(&run_dir),
                    rejected: rejected.iter().map(|r| r.to_string()).collect(),
                });
            }
            if valid.is_none() && !rejected.is_empty() {
                tracing::warn!(
                    "--restart: none of the {} checkpoints of {} is valid; starting from step 0",
                    rejected.len(),
                    run_dir.display()
                );
            }
            set_aside(&rejected)?; // invalid checkpoints newer than the one resumed
        }
        self.sync.barrier()?;
        let Some(ckpt) = list_checkpoints(&run_dir)?.pop() else {
            return Ok(None);
        };
        let dir = ckpt.dir;
        let state: TrainerState = read_json(&dir.join(files::TRAINER))?;
        // Another world size (elastic resume): the weights, optimizer and the global data cursor
        // carry over (the data order does not depend on the world size, and every rank saved the
        // same global position); the per-rank stage streams cannot be remapped, so each rank starts
        // a fresh one keyed by (seed, rank, step). Bit-identity with an uninterrupted run is lost,
        // except for what is keyed per sample (`per_sample_rng`).
        let (world, me) = (self.sync.world_size(), self.sync.rank());
        let elastic = state.world_size != world;
        let rank_file = files::rank(if elastic { 0 } else { me });
        let rank: RankState = read_json(&dir.join(&rank_file))?;
        if elastic {
            let global_now =
                (self.config.train.batch_size * self.config.train.grad_accum_steps * world) as u64;
            let global_then = state.samples.checked_div(state.step).unwrap_or(global_now);
            if me == 0 {
                tracing::warn!(
                    "resuming a checkpoint written by {} ranks with {world}: data continues at the \
                     same global sample; each rank's stage random stream restarts (not \
                     bit-identical to an uninterrupted run){}",
                    state.world_size,
                    if global_then != global_now {
                        format!(
                            "; the global batch changes from {global_then} to {global_now} \
                             samples (learning-rate settings assumed the old one)"
                        )
                    } else {
                        String::new()
                    }
                );
            }
        }

        let model = self.model.take().expect("model present");
        // A checkpoint without the frozen parameters resumes only onto the same frozen source.
        let keep = match (&state.frozen_source, self.stage.frozen_source()) {
            (None, _) => None,
            (Some(then), Some(now)) if *then == now => Some(trainable_paths(&model)),
            (Some(then), now) => {
                self.model = Some(model);
                return Err(TrainError::Checkpoint {
                    path: dir.join(files::TRAINER),
                    reason: format!(
                        "the checkpoint holds only the trainable weights, trained on frozen weights from \
                         {then}; this run {}",
                        match now {
                            Some(n) => format!("builds them from {n}"),
                            None => "needs every weight".into(),
                        }
                    ),
                });
            }
        };
        let load = |m: S::Model, p: &Path| match &keep {
            None => load_module(m, p),
            Some(k) => load_module_subset(m, p, k),
        };
        let model = load(model, &dir.join(files::MODEL))?;
        self.optim
            .load(&dir.join(files::OPTIMIZER), &model, &self.device)?;
        if let Some(ema) = &mut self.ema {
            let p = dir.join(files::EMA);
            if p.exists() {
                let m = match &keep {
                    None => load_module(ema.model().clone(), &p)?,
                    Some(k) => load_module_subset(ema.model().clone(), &p, k)?,
                };
                ema.set_model(m);
                ema.optimization_step = state.ema_step.unwrap_or(state.step);
            } else {
                tracing::warn!(
                    "checkpoint has no EMA weights: EMA starts from the resumed weights"
                );
                *ema = Ema::new::<B, S::Model>(self.config.ema.clone(), &model);
            }
        }
        self.model = Some(model);
        self.rng = if elastic {
            TrainRng::new(
                self.config.run.seed,
                streams::STAGE + me as u64 + (state.step << 16),
            )
        } else {
            TrainRng::from_state(&rank.stage_rng).map_err(|reason| TrainError::Checkpoint {
                path: dir.join(&rank_file),
                reason,
            })?
        };
        data.load_state(&rank.data)?;
        let stage_dir = dir.join(files::STAGE_DIR);
        if stage_dir.is_dir() {
            self.stage.load_state(&stage_dir)?;
        }
        self.step = state.step;
        self.samples = state.samples;
        self.skipped = state.skipped;
        self.resumed_from = Some(state.step);
        self.warn_config_changes(&dir.join(files::CONFIG));
        tracing::info!("resumed from {} (step {})", dir.display(), state.step);
        Ok(Some(state.step))
    }

    /// Writes a checkpoint of the current step (all ranks must call it; rank 0 commits).
    pub fn save_checkpoint<D: BatchSource<Batch = S::Batch>>(
        &mut self,
        data: &D,
    ) -> Result<PathBuf> {
        let run_dir = self.config.run.dir.clone();
        let (rank, main) = (self.sync.rank(), self.sync.rank() == 0);
        let pending = if main {
            Some(PendingCheckpoint::begin(&run_dir, self.step)?)
        } else {
            None
        };
        self.sync.barrier()?;
        let dir = crate::checkpoint::checkpoint_dir(&run_dir, self.step).with_extension("tmp");
        let rank_state = RankState {
            rank,
            stage_rng: self.rng.state(),
            data: data.state(),
        };
        write_json(&dir.join(files::rank(rank)), &rank_state)?;
        if main {
            let model = self.model.as_ref().expect("model present");
            let shapes: HashMap<String, Vec<usize>> = param_infos(model)
                .into_iter()
                .map(|i| (i.path, i.shape))
                .collect();
            let mut meta = BTreeMap::new();
            meta.insert("step".to_string(), self.step.to_string());
            let frozen_source = self.stage.frozen_source();
            let keep = frozen_source.as_ref().map(|_| trainable_paths(model));
            save_module_subset(model, &dir.join(files::MODEL), meta.clone(), keep.as_ref())?;
            self.optim.save(&dir.join(files::OPTIMIZER), &shapes)?;
            if let Some(ema) = &self.ema {
                save_module_subset(ema.model(), &dir.join(files::EMA), meta, keep.as_ref())?;
            }
            write_file_synced(&dir.join(files::CONFIG), self.config_toml.as_bytes())?;
            let stage_dir = dir.join(files::STAGE_DIR);
            std::fs::create_dir_all(&stage_dir).map_err(|e| TrainError::io(&stage_dir, e))?;
            self.stage.save_state(&stage_dir)?;
            let state = TrainerState {
                format: STATE_FORMAT.into(),
                step: self.step,
                samples: self.samples,
                skipped: self.skipped,
                world_size: self.sync.world_size(),
                ema_step: self.ema.as_ref().map(|e| e.optimization_step),
                frozen_source,
            };
            write_json(&dir.join(files::TRAINER), &state)?;
        }
        self.sync.barrier()?;
        let final_dir = match pending {
            Some(p) => {
                let c = p.commit()?;
                prune_checkpoints(&run_dir, self.config.checkpoint.keep_last)?;
                c.dir
            }
            None => crate::checkpoint::checkpoint_dir(&run_dir, self.step),
        };
        self.sync.barrier()?;
        self.with_progress_suspended(|| tracing::info!("checkpoint {}", final_dir.display()));
        Ok(final_dir)
    }

    /// Calls [`Stage::sample`] (rank 0) with the EMA weights when EMA is on.
    pub fn sample(&mut self) -> Result<()> {
        if self.sync.rank() != 0 {
            return Ok(());
        }
        let dir = self
            .config
            .run
            .dir
            .join("samples")
            .join(format!("step-{:09}", self.step));
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        let ctx = SampleContext {
            step: self.step,
            dir,
            rng: TrainRng::new(self.config.run.seed, streams::SAMPLE + self.step),
            ema: self.ema.is_some(),
        };
        let (step, dir) = (ctx.step, ctx.dir.clone());
        match &self.ema {
            Some(ema) => self.stage.sample(ema.model(), ctx)?,
            None => {
                let inner = self.model.as_ref().expect("model present").valid();
                self.stage.sample(&inner, ctx)?
            }
        }
        // Every PNG the stage wrote, as a TensorBoard image `samples/<name>`.
        if let Some(tb) = &mut self.tensorboard {
            let mut pngs: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| TrainError::io(&dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "png"))
                .collect();
            pngs.sort();
            for png in pngs {
                let name = png.file_stem().unwrap_or_default().to_string_lossy();
                tb.png(step, &format!("samples/{name}"), &png)?;
            }
        }
        Ok(())
    }

    fn open_outputs(&mut self) -> Result<()> {
        if self.sync.rank() != 0 || self.metrics.is_some() {
            return Ok(());
        }
        let dir = &self.config.run.dir;
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        write_file_synced(&dir.join("config.toml"), self.config_toml.as_bytes())?;
        self.metrics = Some(MetricsWriter::open(dir, self.step)?);
        self.tensorboard = Some(EventWriter::open(dir, self.step + 1)?);
        if self.config.train.progress {
            let pb = ProgressBar::new(self.config.train.max_steps);
            pb.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{wide_bar}] {pos}/{len} {msg} ETA {eta_precise}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            pb.set_position(self.step);
            pb.reset_eta();
            self.progress = Some(pb);
        }
        Ok(())
    }

    fn log<D: BatchSource>(&mut self, stats: &StepStats, data: &D) -> Result<()> {
        if let Some(pb) = &self.progress {
            pb.set_position(stats.step);
            pb.set_message(format!(
                "loss {:.4} | lr {:.2e} | {:.1} samples/s",
                stats.loss,
                stats.lr,
                stats.samples as f64 / stats.seconds.max(1e-9)
            ));
        }
        self.window.push(stats.clone());
        if !stats.step.is_multiple_of(self.config.train.log_every)
            && stats.step != self.config.train.max_steps
        {
            return Ok(());
        }
        let w = std::mem::take(&mut self.window);
        let n = w.len() as f64;
        let mean = |f: &dyn Fn(&StepStats) -> f64| w.iter().map(f).sum::<f64>() / n;
        let mut extra = BTreeMap::new();
        for k in stats.metrics.keys() {
            extra.insert(
                k.clone(),
                mean(&|s| s.metrics.get(k).copied().unwrap_or(f64::NAN)),
            );
        }
        let record = MetricsRecord {
            step: stats.step,
            loss: if w.len() == 1 {
                stats.loss
            } else {
                mean(&|s| s.loss)
            },
            lr: stats.lr,
            grad_norm: Some(mean(&|s| s.grad_norm)),
            samples_per_s: w.iter().map(|s| s.samples as f64).sum::<f64>()
                / w.iter().map(|s| s.seconds).sum::<f64>().max(1e-9),
            samples: self.samples,
            epoch: data.state().get("epoch").and_then(|e| e.as_u64()),
            skipped: self.skipped,
            extra,
        };
        if let Some(m) = &mut self.metrics {
            m.write(&record)?;
        }
        if let Some(tb) = &mut self.tensorboard {
            let mut scalars = vec![
                ("train/loss", record.loss),
                ("train/lr", record.lr),
                ("train/samples_per_s", record.samples_per_s),
            ];
            if let Some(g) = record.grad_norm {
                scalars.push(("train/grad_norm", g));
            }
            let extra: Vec<(String, f64)> = record
                .extra
                .iter()
                .map(|(k, v)| (format!("train/{k}"), *v))
                .collect();
            scalars.extend(extra.iter().map(|(k, v)| (k.as_str(), *v)));
            tb.scalars(record.step, &scalars)?;
        }
        self.with_progress_suspended(|| {
            tracing::info!(
                step = record.step,
                loss = record.loss,
                lr = record.lr,
                grad_norm = record.grad_norm,
                samples_per_s = record.samples_per_s,
                "train"
            )
        });
        Ok(())
    }

    fn finish(&mut self) {
        if let Some(pb) = self.progress.take() {
            pb.finish();
        }
        if self.sync.rank() == 0 {
            let dir = &self.config.run.dir;
            if let Err(e) = plot_metrics(
                &dir.join(METRICS_FILE),
                &dir.join("loss.png"),
                &PlotOptions::default(),
            ) {
                tracing::warn!("could not plot the loss curve: {e}");
            }
        }
    }

    fn with_progress_suspended(&self, f: impl FnOnce()) {
        match &self.progress {
            Some(pb) => pb.suspend(f),
            None => f(),
        }
    }

    fn warn_config_changes(&self, saved: &Path) {
        let Ok(text) = std::fs::read_to_string(saved) else {
            return;
        };
        let (Ok(old), Ok(new)) = (
            text.parse::<toml::Table>(),
            self.config_toml.parse::<toml::Table>(),
        ) else {
            return;
        };
        let mut changed = Vec::new();
        diff_tables("", &old, &new, &mut changed);
        // Where the run lives may change (a moved or copied run dir resumes in place), and so may the
        // path of what initialised the weights the checkpoint replaces.
        changed.retain(|k| {
            !MOVABLE_KEYS
                .iter()
                .any(|m| k == m || k.strip_prefix(m).is_some_and(|r| r.starts_with('.')))
        });
        if !changed.is_empty() {
            tracing::warn!(
                "config differs from the checkpoint's: {}",
                changed.join(", ")
            );
        }
    }

    /// This process's data-parallel rank (0 for a single process).
    pub fn rank(&self) -> usize {
        self.sync.rank()
    }

    /// Waits for every rank (e.g. until rank 0 has written an export the others read next).
    pub fn barrier(&mut self) -> Result<()> {
        self.sync.barrier()
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }
    pub fn run_dir(&self) -> &Path {
        &self.config.run.dir
    }
    pub fn model(&self) -> &S::Model {
        self.model.as_ref().expect("model present")
    }
    pub fn stage(&self) -> &S {
        &self.stage
    }
    pub fn stage_mut(&mut self) -> &mut S {
        &mut self.stage
    }
    pub fn optimizer(&self) -> &AdamW<Inner<B>> {
        &self.optim
    }
    pub fn ema_model(&self) -> Option<&InnerModel<B, S>> {
        self.ema.as_ref().map(|e| e.model())
    }
    pub fn device(&self) -> &B::Device {
        &self.device
    }
    /// The stage stream (its state is what the next micro-step will draw from).
    pub fn rng(&self) -> &TrainRng {
        &self.rng
    }
    /// Takes the trainer apart: the stage, the trained model and the EMA weights.
    pub fn into_parts(mut self) -> (S, S::Model, Option<InnerModel<B, S>>) {
        let model = self.model.take().expect("model present");
        (self.stage, model, self.ema.map(|e| e.into_model()))
    }
}

fn due(step: u64, every: u64, max: u64, at_end: bool) -> bool {
    (every > 0 && step.is_multiple_of(every)) || (at_end && step == max)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Json {
        path: path.to_path_buf(),
        source: e,
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    write_file_synced(path, text.as_bytes())
}

/// Config keys that name locations rather than settings: not reported as changes on resume.
const MOVABLE_KEYS: &[&str] = &["run.dir", "stage.qformer_init"];

fn diff_tables(prefix: &str, old: &toml::Table, new: &toml::Table, out: &mut Vec<String>) {
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for k in keys {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match (old.get(k), new.get(k)) {
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                diff_tables(&key, a, b, out)
            }
            (a, b) if a != b => out.push(key),
            _ => {}
        }
    }
}
