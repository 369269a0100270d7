//! Generic training loop for blipd stages.
//!
//! - [`Stage`]: what a stage implements (forward + losses, sampling, its own state).
//! - [`Trainer`]: the loop — resume → { batch → stage step → backward → gradient sync →
//!   global-norm clip → AdamW → EMA → log → sample / checkpoint when due }.
//! - [`AdamW`] with PyTorch semantics and per-path state; [`LrSchedule`]; [`Ema`].
//! - [`GradSync`]: the data-parallel gradient all-reduce interface ([`LocalSync`] for one process).
//! - Checkpoints ([`checkpoint`]): atomic, checksummed, last-N retention, newest-valid discovery.
//! - Run configs ([`config`]): strict TOML with `--set key.sub=value` overrides.
//! - Metrics JSONL ([`metrics`]), progress bar, and PNG loss curves ([`plot`]).
//!
//! Exact resume: every random stream ([`TrainRng`]) and the data cursor are checkpointed with
//! weights, optimizer and EMA state, so on CPU a resumed run's loss sequence is bit-identical
//! to an uninterrupted one (tested, including SIGKILL during a step and during a checkpoint write).

pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod data;
pub mod dist_sync;
pub mod ema;
pub mod error;
pub mod fit;
mod fused;
pub mod grads;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod plot;
pub mod rng;
pub mod run_lock;
pub mod schedule;
pub mod stage;
pub mod tensorboard;
pub mod trainer;

pub use config::{load_config, parse_config, MixedPrecision, RunConfig, TrainerConfig};
pub use data::{BatchSource, EpochSampler, KeyedSource};
pub use ema::{Ema, EmaConfig};
pub use error::{ConfigError, Result, TrainError};
pub use fit::{fit, join_from_env, RankSlice};
pub use grads::{GradEntry, GradSet, GradSync, LocalSync};
pub use optim::{AdamW, AdamWConfig};
pub use plot::{plot_metrics, plot_series, PlotOptions, Series};
pub use rng::{RngState, TrainRng};
pub use run_lock::RunLock;
pub use schedule::{LrSchedule, ScheduleConfig, ScheduleKind};
pub use stage::{SampleContext, Stage, StepOutput};
pub use trainer::{RunSummary, StepStats, Trainer};
