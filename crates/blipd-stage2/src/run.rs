//! A whole stage-2 run from its TOML config: networks, data, trainer.

use std::path::PathBuf;

use blipd_data::loader::{LoaderOptions, PairLoader};
use blipd_data::synthetic::{held_out_ids, render_pair, synth_pair, vocabulary, Identity, SCENES};
use blipd_train::KeyedSource;
use blipd_train::{BatchSource, EpochSampler, RunConfig, RunSummary, TrainRng, Trainer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::model::Stage2Components;
use crate::stage::{clip_input, vae_target, Stage2, Stage2Batch, Targets};
use crate::tiny::tiny_tokenizers;
use crate::{Stage2Config, Stage2Error};

/// `[data]` of a stage-2 run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage2Data {
    /// Procedural pairs (the embedded default): `pairs` subjects composited onto procedural scenes.
    #[serde(default)]
    pub synthetic: Option<SyntheticData>,
    /// Parquet shards written by `blipd data synth` (a folder with `manifest.json`). Takes precedence
    /// over `synthetic`.
    #[serde(default)]
    pub shards: Option<PathBuf>,
    /// Target (VAE) resolution: 512 for SD-1.5; the tiny model uses 32.
    #[serde(default = "default_target")]
    pub target_size: usize,
    /// Where data-order shuffling starts from (the trainer's data stream is seeded from `run.seed`).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Draw each sample's randomness (timestep, subject drop, VAE and diffusion noise) from its own
    /// stream `(run.seed, PER_SAMPLE_STREAM + global sample position)` instead of the rank's stream:
    /// the run then does not depend on how the global batch is split over ranks and micro-batches
    /// (1 × 2B, 2 × B and B with 2 accumulation steps draw the same numbers).
    #[serde(default)]
    pub per_sample_rng: bool,
    /// Use the shards' cached VAE moments (`blipd data encode-latents`) when the folder has them:
    /// targets are then not encoded on every step. A cache made with other VAE weights, another
    /// `target_size` or other shard bytes stops the run with the reason; `false` ignores caches.
    #[serde(default = "yes")]
    pub latent_cache: bool,
}

/// Base of the per-sample random streams (`[data] per_sample_rng`), apart from the trainer's.
pub const PER_SAMPLE_STREAM: u64 = 0x5053_0000_0000_0000;

/// `[data.synthetic]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticData {
    pub pairs: usize,
    #[serde(default)]
    pub seed: u64,
}

fn default_target() -> usize {
    512
}
fn yes() -> bool {
    true
}

impl Default for Stage2Data {
    fn default() -> Self {
        Self {
            synthetic: Some(SyntheticData { pairs: 64, seed: 0 }),
            shards: None,
            target_size: 512,
            shuffle: true,
            per_sample_rng: false,
            latent_cache: true,
        }
    }
}

/// The full stage-2 run config.
pub type Stage2RunConfig = RunConfig<Stage2Config, Stage2Data>;

/// Checks a whole stage-2 run config without building or reading anything large: the trainer's
/// sections, `[stage]`, `[data]`, and that the files it names exist. `blipd pretrain` calls it for
/// every stage of a plan before the first one starts, so a bad stage-2 value costs no stage-1 time.
pub fn validate_config(cfg: &Stage2RunConfig) -> Result<(), Stage2Error> {
    cfg.trainer()
        .validate()
        .map_err(|e| Stage2Error::Config(e.to_string()))?;
    cfg.stage.validate()?;
    let bad = |m: String| Err(Stage2Error::Config(m));
    if cfg.data.target_size == 0 {
        return bad("[data] target_size = 0: must be a positive number of pixels".into());
    }
    match (&cfg.data.shards, &cfg.data.synthetic) {
        (None, None) => return bad("[data] needs shards or [data.synthetic]".into()),
        (None, Some(syn)) if syn.pairs == 0 => {
            return bad("[data.synthetic] pairs = 0: no samples to train on".into())
        }
        _ => {}
    }
    if let Some(dir) = &cfg.data.shards {
        blipd_data::shards::require_shard_dir("[data] shards", dir).or_else(bad)?;
    }
    let named = [
        ("[stage] model_dir", cfg.stage.model_dir.as_ref()),
        ("[stage] bert_vocab", cfg.stage.bert_vocab.as_ref()),
    ];
    if cfg.stage.vae_dir.is_some() && cfg.stage.model_dir.is_some() {
        return bad("[stage] vae_dir and model_dir: give one (model_dir has its own vae/)".into());
    }
    blipd_train::config::require_existing(named).or_else(bad)?;
    // The VAE that will encode the targets: from model_dir, or the preset's.
    let vae = match &cfg.stage.model_dir {
        Some(dir) => blipd_models::vae::VaeConfig::from_file(&dir.join("vae").join("config.json"))
            .map_err(|e| {
                Stage2Error::Config(format!("[stage] model_dir = {}: {e}", dir.display()))
            })?,
        None => match &cfg.stage.vae_dir {
            Some(dir) if dir.join("config.json").is_file() => {
                blipd_models::vae::VaeConfig::from_file(&dir.join("config.json")).map_err(|e| {
                    Stage2Error::Config(format!("[stage] vae_dir = {}: {e}", dir.display()))
                })?
            }
            // Not trained yet (a plan's [vae] stage writes it): the preset's has the same shape.
            _ => crate::model::preset_configs(&cfg.stage.preset, 0)?.3,
        },
    };
    let factor = vae.downsample_factor();
    if !cfg.data.target_size.is_multiple_of(factor) {
        return bad(format!(
            "[data] target_size = {}: must be a positive multiple of {factor} (the VAE's \
             down-sampling factor)",
            cfg.data.target_size
        ));
    }
    Ok(())
}

/// Build the stage, its model and its data source (seeded from `run.seed`), and train to
/// `train.max_steps` (resuming from the newest valid checkpoint of the run directory when there is one).
pub fn run_stage2<B: AutodiffBackend>(
    cfg: &Stage2RunConfig,
    device: B::Device,
) -> Result<RunSummary, blipd_train::TrainError> {
    let parts = build::<B>(cfg, &device)?;
    fit_stage2(cfg, device, parts)
}

/// Trains the pieces [`build`] made with [`blipd_train::fit`]: when the process was launched as one
/// rank of several (`WORLD_SIZE > 1`: torchrun, `blipd launch`, srun) it joins the job, takes rank
/// 0's weights (trainable model and frozen VAE) and trains on its slice of every global batch; rank 0
/// exports the pipeline (the EMA weights when EMA is on, as diffusers' training scripts save).
pub fn fit_stage2<B: AutodiffBackend>(
    cfg: &Stage2RunConfig,
    device: B::Device,
    parts: (Stage2<B>, crate::Stage2Model<B>, Source),
) -> Result<RunSummary, blipd_train::TrainError> {
    let export = |trainer: &Trainer<B, Stage2<B>>| -> blipd_train::Result<()> {
        if !cfg.stage.export {
            return Ok(());
        }
        let dir = match trainer.ema_model() {
            Some(ema) => crate::export::export_pipeline(trainer.stage(), ema, &export_dir(cfg))?,
            None => {
                crate::export::export_pipeline(trainer.stage(), trainer.model(), &export_dir(cfg))?
            }
        };
        tracing::info!(
            "stage 2: exported the pipeline{} to {}",
            if trainer.ema_model().is_some() {
                " (EMA weights)"
            } else {
                ""
            },
            dir.display()
        );
        Ok(())
    };
    let summary = blipd_train::fit(
        cfg,
        device,
        parts,
        blipd_train::join_from_env()?,
        "stage-2 model",
        export,
    )?;
    let truncated = blipd_models::conditioning::truncated_prompts();
    if truncated > 0 {
        tracing::warn!(
            "stage 2: {truncated} training prompt{} did not fit the text encoder and lost their last \
             tokens (the first are named above)",
            if truncated == 1 { "" } else { "s" }
        );
    }
    Ok(summary)
}

/// Where [`fit_stage2`] exports the trained pipeline: `<run.dir>/export` (a BlipDiffusion folder, see
/// [`crate::export`]).
pub fn export_dir(cfg: &Stage2RunConfig) -> PathBuf {
    cfg.run.dir.join("export")
}

/// Builds a batch from sample indices and the samples' global positions.
pub type MakeBatch = Box<dyn FnMut(&[usize], &[u64]) -> blipd_train::Result<Stage2Batch>>;

/// The stage-2 data source (one rank of one; `with_rank` splits it): procedural pairs or shards.
pub enum Source {
    Synthetic(KeyedSource<MakeBatch>),
    Shards(Box<ShardSource>),
}

impl Source {
    /// This rank's slice of every global batch.
    pub fn with_rank(self, rank: usize, world_size: usize) -> Result<Self, Stage2Error> {
        Ok(match self {
            Source::Synthetic(s) => Source::Synthetic(s.with_rank(rank, world_size)),
            Source::Shards(s) => Source::Shards(Box::new(s.with_rank(rank, world_size)?)),
        })
    }
}

impl blipd_train::RankSlice for Source {
    fn rank_slice(self, rank: usize, world_size: usize) -> blipd_train::Result<Self> {
        Ok(self.with_rank(rank, world_size)?)
    }
}

impl BatchSource for Source {
    type Batch = Stage2Batch;
    fn next_batch(&mut self) -> blipd_train::Result<Stage2Batch> {
        match self {
            Source::Synthetic(s) => s.next_batch(),
            Source::Shards(s) => s.next_batch(),
        }
    }
    fn state(&self) -> serde_json::Value {
        match self {
            Source::Synthetic(s) => s.state(),
            Source::Shards(s) => s.state(),
        }
    }
    fn load_state(&mut self, state: &serde_json::Value) -> blipd_train::Result<()> {
        match self {
            Source::Synthetic(s) => s.load_state(state),
            Source::Shards(s) => s.load_state(state),
        }
    }
}

/// Batches from Parquet shards (`blipd data synth` output) through [`blipd_data::loader::PairLoader`]:
/// deterministic per-epoch shuffle independent of the world size, per-rank slices, a saveable cursor.
pub struct ShardSource {
    dir: PathBuf,
    opts: LoaderOptions,
    loader: PairLoader,
    batch_size: usize,
    image_size: usize,
    target_size: usize,
    run_seed: u64,
    per_sample_rng: bool,
    /// The folder's cached VAE moments for this run's VAE and target size, when used.
    moments: Option<std::sync::Arc<blipd_data::moments::MomentsReader>>,
}

impl ShardSource {
    /// Opens the shards of `cfg`; with `cache_key` (this run's VAE and target size) and
    /// `[data] latent_cache`, the folder's matching moments are read instead of encoding targets,
    /// and a stale cache is an error naming why.
    pub fn open(
        dir: &std::path::Path,
        cfg: &Stage2RunConfig,
        image_size: usize,
        cache_key: Option<&blipd_data::moments::MomentsKey>,
    ) -> Result<Self, Stage2Error> {
        let opts = LoaderOptions {
            seed: cfg.run.seed,
            shuffle: cfg.data.shuffle,
            ..LoaderOptions::default()
        };
        let loader = PairLoader::open(dir, opts.clone())
            .map_err(|e| Stage2Error::Config(format!("[data] shards = {}: {e}", dir.display())))?;
        if (loader.len() as usize) < cfg.train.batch_size {
            return Err(Stage2Error::Config(format!(
                "[data] shards = {}: {} pairs, fewer than train.batch_size = {}",
                dir.display(),
                loader.len(),
                cfg.train.batch_size
            )));
        }
        let moments = match cache_key.filter(|_| cfg.data.latent_cache) {
            None => None,
            Some(key) => {
                use blipd_data::moments::{open_cache, CacheStatus};
                match open_cache(dir, loader.manifest(), key).map_err(|e| {
                    Stage2Error::Config(format!("[data] shards = {}: {e}", dir.display()))
                })? {
                    CacheStatus::None => None,
                    CacheStatus::Ready(r) => {
                        tracing::info!(
                            "stage 2: targets from the cached VAE moments in {} (cache {})",
                            dir.display(),
                            key.id()
                        );
                        Some(std::sync::Arc::new(r))
                    }
                    CacheStatus::Stale(why) => {
                        return Err(Stage2Error::Config(format!(
                        "{why}. Rerun `blipd data encode-latents --shards {} …` with this run's \
                             VAE and target size, or set [data] latent_cache = false to encode \
                             targets on every step",
                        dir.display()
                    )))
                    }
                }
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            opts,
            loader,
            batch_size: cfg.train.batch_size,
            image_size,
            target_size: cfg.data.target_size,
            run_seed: cfg.run.seed,
            per_sample_rng: cfg.data.per_sample_rng,
            moments,
        })
    }

    /// This rank's slice: the shards reopened for `rank` of `world_size`. A failure is an error (a
    /// rank that kept the whole-dataset loader would silently train on every rank's samples).
    pub fn with_rank(mut self, rank: usize, world_size: usize) -> Result<Self, Stage2Error> {
        self.opts.rank = rank;
        self.opts.world_size = world_size;
        self.loader = PairLoader::open(&self.dir, self.opts.clone()).map_err(|e| {
            Stage2Error::Config(format!(
                "[data] shards = {} (rank {rank} of {world_size}): {e}",
                self.dir.display()
            ))
        })?;
        Ok(self)
    }
}

impl BatchSource for ShardSource {
    type Batch = Stage2Batch;
    fn next_batch(&mut self) -> blipd_train::Result<Stage2Batch> {
        let items = self
            .loader
            .next_items(self.batch_size)
            .map_err(blipd_train::TrainError::data)?;
        let (s, t, b) = (self.image_size, self.target_size, items.len());
        let mut input = Vec::with_capacity(b * 3 * s * s);
        let mut target = Vec::new();
        let (mut mean, mut std) = (Vec::new(), Vec::new());
        let mut subjects = Vec::with_capacity(b);
        let mut captions = Vec::with_capacity(b);
        let mut keys = Vec::with_capacity(b);
        for it in items {
            input.extend(clip_input(&it.input, s));
            match &self.moments {
                Some(m) => m
                    .read(it.location.shard, it.location.row, &mut mean, &mut std)
                    .map_err(blipd_train::TrainError::data)?,
                None => target.extend(vae_target(&it.target, t)),
            }
            subjects.push(it.record.class_name);
            captions.push(it.record.caption);
            keys.push(it.key);
        }
        let target = match &self.moments {
            Some(m) => {
                let [c, h, w] = m.latent_shape();
                Targets::Moments {
                    mean: TensorData::new(mean, [b, c, h, w]),
                    std: TensorData::new(std, [b, c, h, w]),
                }
            }
            None => Targets::Pixels(TensorData::new(target, [b, 3, t, t])),
        };
        let (run_seed, per) = (self.run_seed, self.per_sample_rng);
        Ok(Stage2Batch {
            input: TensorData::new(input, [b, 3, s, s]),
            target,
            subjects,
            captions,
            sample_rngs: per.then(|| {
                keys.iter()
                    .map(|&k| TrainRng::new(run_seed, PER_SAMPLE_STREAM + k))
                    .collect()
            }),
        })
    }
    fn state(&self) -> serde_json::Value {
        self.loader.state_json()
    }
    fn load_state(&mut self, state: &serde_json::Value) -> blipd_train::Result<()> {
        self.loader
            .load_state_json(state)
            .map_err(blipd_train::TrainError::data)
    }
}

/// The pieces of a stage-2 run (for callers that drive the trainer themselves). Seeds the backend from
/// `run.seed` first: the same random weights for a seed, whatever the number of ranks.
pub fn build<B: AutodiffBackend>(
    cfg: &Stage2RunConfig,
    device: &B::Device,
) -> Result<(Stage2<B>, crate::Stage2Model<B>, Source), Stage2Error> {
    B::seed(device, cfg.run.seed);
    cfg.train
        .mixed_precision
        .check_backend(&B::name(device), "[train] mixed_precision")
        .map_err(Stage2Error::Config)?;
    let parts = match &cfg.stage.model_dir {
        Some(dir) => Stage2Components::<B>::from_diffusers(dir, &cfg.stage, device)?,
        None => {
            let (clip, bert) = tiny_tokenizers(&vocabulary())?;
            let mut parts =
                Stage2Components::<B>::from_preset(&cfg.stage.preset, clip, bert, device)?;
            if let crate::QFormerInit::Stage1(path) = &cfg.stage.qformer_init {
                let sd = blipd_models::weights::StateDict::read(path)?;
                parts.model.qformer = crate::model::load_partial_qformer(parts.model.qformer, sd)?;
            }
            if let Some(dir) = &cfg.stage.vae_dir {
                let comp = blipd_models::weights::ComponentDir {
                    name: "vae".into(),
                    dir: dir.clone(),
                };
                let (vae, vae_config) = blipd_models::vae::AutoencoderKL::load(&comp, device)
                    .map_err(|e| {
                        Stage2Error::Config(format!("[stage] vae_dir = {}: {e}", dir.display()))
                    })?;
                parts.vae = vae;
                parts.vae_config = vae_config;
            }
            parts
        }
    };
    let image_size = parts.image_size;
    let target_size = cfg.data.target_size;
    let (mut stage, model) = Stage2::new(cfg.stage.clone(), parts, target_size, device.clone())?;
    stage.autocast = cfg.train.mixed_precision.dtype();
    // Parameters initialise lazily: materialise them now, in module order, so the draws do not
    // depend on what touches them first (the trainer, the optimizer, a data-parallel broadcast).
    blipd_train::params::param_infos::<B, _>(&model);
    if let Some(dir) = &cfg.data.shards {
        // The latent cache's key needs the VAE's digest: computed only when the folder has a cache.
        let key = (cfg.data.latent_cache && dir.join(blipd_data::moments::INDEX_NAME).is_file())
            .then(|| crate::latents::cache_key(&stage.vae, target_size));
        let src = ShardSource::open(dir, cfg, image_size, key.as_ref())?;
        // Validation samples: the first two pairs of the shards' order.
        let mut peek = PairLoader::open(
            dir,
            LoaderOptions {
                shuffle: false,
                ..LoaderOptions::default()
            },
        )
        .map_err(|e| Stage2Error::Config(format!("[data] shards = {}: {e}", dir.display())))?;
        let n = 2.min(peek.len() as usize);
        for it in peek
            .next_items(n)
            .map_err(|e| Stage2Error::Config(format!("[data] shards = {}: {e}", dir.display())))?
        {
            stage.sample_inputs.push((
                clip_input(&it.input, image_size),
                it.record.class_name.clone(),
                "on a beach".into(),
            ));
        }
        return Ok((stage, model, Source::Shards(Box::new(src))));
    }
    let synthetic = cfg.data.synthetic.clone().ok_or_else(|| {
        Stage2Error::Config(
            "[data] needs a source: `shards = \"DIR\"` or [data.synthetic] pairs = N".into(),
        )
    })?;
    if synthetic.pairs < cfg.train.batch_size {
        return Err(Stage2Error::Config(format!(
            "[data.synthetic] pairs = {} is fewer than train.batch_size = {}",
            synthetic.pairs, cfg.train.batch_size
        )));
    }
    // Validation samples: two held-out subjects (never trained on), each in a scene.
    for (k, &id) in held_out_ids().iter().take(2).enumerate() {
        let scene = (2 * k + 1) % SCENES.len();
        let p = render_pair(
            Identity::from_id(id),
            scene,
            k as u64,
            synthetic.seed,
            target_size as u32,
        );
        stage.sample_inputs.push((
            clip_input(&p.input, image_size),
            p.subject.clone(),
            p.caption.clone(),
        ));
    }
    let seed = synthetic.seed;
    let (run_seed, per_sample_rng) = (cfg.run.seed, cfg.data.per_sample_rng);
    let make: MakeBatch = Box::new(move |idx: &[usize], keys: &[u64]| {
        let b = idx.len();
        let mut input = Vec::with_capacity(b * 3 * image_size * image_size);
        let mut target = Vec::with_capacity(b * 3 * target_size * target_size);
        let mut subjects = Vec::with_capacity(b);
        let mut captions = Vec::with_capacity(b);
        for &i in idx {
            let p = synth_pair(i as u64, seed, target_size as u32);
            input.extend(clip_input(&p.input, image_size));
            target.extend(vae_target(&p.target, target_size));
            subjects.push(p.subject);
            captions.push(p.caption);
        }
        Ok(Stage2Batch {
            input: TensorData::new(input, [b, 3, image_size, image_size]),
            target: Targets::Pixels(TensorData::new(target, [b, 3, target_size, target_size])),
            subjects,
            captions,
            sample_rngs: per_sample_rng.then(|| {
                keys.iter()
                    .map(|&k| TrainRng::new(run_seed, PER_SAMPLE_STREAM + k))
                    .collect()
            }),
        })
    });
    let sampler = EpochSampler::new(
        synthetic.pairs,
        cfg.train.batch_size,
        cfg.run.seed,
        cfg.data.shuffle,
    );
    Ok((
        stage,
        model,
        Source::Synthetic(KeyedSource::new(sampler, cfg.train.batch_size, make)),
    ))
}

/// The run directory of a config.
pub fn run_dir(cfg: &Stage2RunConfig) -> PathBuf {
    cfg.run.dir.clone()
}
