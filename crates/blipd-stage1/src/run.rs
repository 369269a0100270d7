//! A whole stage-1 run from its TOML config: networks, data, trainer, export.

use std::path::{Path, PathBuf};

use blipd_data::loader::{LoaderOptions, PairLoader};
use blipd_data::synthetic::synth_pair;
use blipd_train::KeyedSource;
use blipd_train::{
    BatchSource, EpochSampler, RunConfig, RunSummary, TrainError, TrainRng, Trainer,
};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::augment::{Augment, AUGMENT_STREAM};
use crate::data::{prepare, read_entry, read_list, Stage1Batch, Stage1Data};
use crate::model::{export, Stage1Components, Stage1Model};
use crate::stage::Stage1;
use crate::{Stage1Config, Stage1Error};

/// The full stage-1 run config.
pub type Stage1RunConfig = RunConfig<Stage1Config, Stage1Data>;

/// Builds a batch from sample indices and the samples' positions in the run's global sample stream
/// (which key the per-sample augmentation streams).
pub type MakeBatch = Box<dyn FnMut(&[usize], &[u64]) -> blipd_train::Result<Stage1Batch>>;
/// The stage-1 data source: procedural scenes or a list file (indexed), or Parquet shards.
pub enum Source {
    Indexed(KeyedSource<MakeBatch>),
    Shards(Box<ShardSource>),
}

impl Source {
    /// This rank's slice of every global batch.
    pub fn with_rank(self, rank: usize, world_size: usize) -> Result<Self, Stage1Error> {
        Ok(match self {
            Source::Indexed(s) => Source::Indexed(s.with_rank(rank, world_size)),
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
    type Batch = Stage1Batch;
    fn next_batch(&mut self) -> blipd_train::Result<Stage1Batch> {
        match self {
            Source::Indexed(s) => s.next_batch(),
            Source::Shards(s) => s.next_batch(),
        }
    }
    fn state(&self) -> serde_json::Value {
        match self {
            Source::Indexed(s) => s.state(),
            Source::Shards(s) => s.state(),
        }
    }
    fn load_state(&mut self, state: &serde_json::Value) -> blipd_train::Result<()> {
        match self {
            Source::Indexed(s) => s.load_state(state),
            Source::Shards(s) => s.load_state(state),
        }
    }
}

/// Stage-1 batches from `blipd data synth` shards: each pair's target image (the original photo)
/// and its caption; the augmentation stream of a sample is keyed by the loader's global key.
pub struct ShardSource {
    dir: PathBuf,
    opts: LoaderOptions,
    loader: PairLoader,
    batch_size: usize,
    image_size: usize,
    augment: Option<Augment>,
    run_seed: u64,
}

impl ShardSource {
    pub fn open(dir: &Path, cfg: &Stage1RunConfig, image_size: usize) -> Result<Self, Stage1Error> {
        let opts = LoaderOptions {
            seed: cfg.run.seed,
            shuffle: cfg.data.shuffle,
            ..LoaderOptions::default()
        };
        let loader = PairLoader::open(dir, opts.clone())
            .map_err(|e| Stage1Error::Config(format!("[data] shards = {}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            opts,
            loader,
            batch_size: cfg.train.batch_size,
            image_size,
            augment: cfg.data.augment.clone(),
            run_seed: cfg.run.seed,
        })
    }

    pub fn len(&self) -> usize {
        self.loader.len() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.loader.is_empty()
    }

    pub fn with_rank(mut self, rank: usize, world_size: usize) -> Result<Self, Stage1Error> {
        self.opts.rank = rank;
        self.opts.world_size = world_size;
        self.loader = PairLoader::open(&self.dir, self.opts.clone()).map_err(|e| {
            Stage1Error::Config(format!("[data] shards = {}: {e}", self.dir.display()))
        })?;
        Ok(self)
    }
}

impl BatchSource for ShardSource {
    type Batch = Stage1Batch;
    fn next_batch(&mut self) -> blipd_train::Result<Stage1Batch> {
        let items = self
            .loader
            .next_items(self.batch_size)
            .map_err(TrainError::data)?;
        let (s, b) = (self.image_size, items.len());
        let mut pixels = Vec::with_capacity(b * 3 * s * s);
        let mut captions = Vec::with_capacity(b);
        let mut keys = Vec::with_capacity(b);
        for it in items {
            let mut rng = TrainRng::new(self.run_seed, AUGMENT_STREAM + it.key);
            pixels.extend(prepare(&it.target, s, self.augment.as_ref(), &mut rng));
            captions.push(it.record.caption);
            keys.push(it.key);
        }
        Ok(Stage1Batch {
            pixels: TensorData::new(pixels, [b, 3, s, s]),
            captions,
            keys,
        })
    }
    fn state(&self) -> serde_json::Value {
        self.loader.state_json()
    }
    fn load_state(&mut self, state: &serde_json::Value) -> blipd_train::Result<()> {
        self.loader.load_state_json(state).map_err(TrainError::data)
    }
}

/// Checks a whole stage-1 run config without building or reading anything large: the trainer's
/// sections, `[stage]`, `[data]` (exactly one source), and that the files it names exist. `blipd
/// pretrain` calls it for every stage of a plan before the first one starts.
pub fn validate_config(cfg: &Stage1RunConfig) -> Result<(), Stage1Error> {
    cfg.trainer()
        .validate()
        .map_err(|e| Stage1Error::Config(e.to_string()))?;
    cfg.stage.validate()?;
    if let Some(a) = &cfg.data.augment {
        a.validate()?;
    }
    let bad = |m: String| Err(Stage1Error::Config(m));
    let d = &cfg.data;
    let sources = [d.shards.is_some(), d.list.is_some(), d.synthetic.is_some()];
    if sources.iter().filter(|&&x| x).count() != 1 {
        return bad("[data] needs exactly one source: shards, list or [data.synthetic]".into());
    }
    if d.synthetic.as_ref().is_some_and(|s| s.pairs == 0) {
        return bad("[data.synthetic] pairs = 0: no samples to train on".into());
    }
    if let Some(dir) = &d.shards {
        blipd_data::shards::require_shard_dir("[data] shards", dir).or_else(bad)?;
    }
    let s = &cfg.stage;
    let named = [
        ("[stage] model_dir", s.model_dir.as_ref()),
        ("[stage] bert_init", s.bert_init.as_ref()),
        ("[stage] heads_init", s.heads_init.as_ref()),
        ("[stage] bert_vocab", s.bert_vocab.as_ref()),
        ("[data] list", d.list.as_ref()),
        ("[data] image_root", d.image_root.as_ref()),
    ];
    blipd_train::config::require_existing(named).or_else(bad)
}

/// Where [`run_stage1`] exports the trained model: `<run.dir>/export` (`qformer/` + heads).
pub fn export_dir(cfg: &Stage1RunConfig) -> PathBuf {
    cfg.run.dir.join("export")
}

/// Build the stage, its model and its data source, train to `train.max_steps` (resuming from the newest
/// valid checkpoint of the run directory when there is one), then export the Q-Former to
/// [`export_dir`] (`export/qformer/model.safetensors` is what stage 2's `qformer_init = { stage1 =
/// … }` takes).
///
/// When the process is one rank of several (`WORLD_SIZE > 1`: torchrun, `blipd launch`, srun), it
/// joins the job ([`blipd_train::dist_sync::from_env`]), takes rank 0's weights (the frozen ViT
/// included), trains on its slice of every global batch with ITC/ITM seeing the whole global batch
/// ([`Stage1`]'s `step_dist`) and the gradients averaged; rank 0 exports.
pub fn run_stage1<B: AutodiffBackend>(
    cfg: &Stage1RunConfig,
    device: B::Device,
) -> Result<RunSummary, TrainError> {
    let (stage, model, data, blip) = build::<B>(cfg, &device)?;
    let export = |trainer: &Trainer<B, Stage1<B>>| -> blipd_train::Result<()> {
        let model: &Stage1Model<B> = trainer.model();
        export(model, &blip, &trainer.stage().tokenizer, &export_dir(cfg))?;
        Ok(())
    };
    // Stage 2 (next in a plan) reads the export on every rank: `fit` ends at a barrier.
    blipd_train::fit(
        cfg,
        device,
        (stage, model, data),
        blipd_train::join_from_env()?,
        "stage-1 model",
        export,
    )
}

/// The pieces of a stage-1 run (for callers that drive the trainer themselves), plus the Q-Former
/// config for exporting.
pub fn build<B: AutodiffBackend>(
    cfg: &Stage1RunConfig,
    device: &B::Device,
) -> Result<
    (
        Stage1<B>,
        Stage1Model<B>,
        Source,
        blipd_models::qformer::Blip2Config,
    ),
    Stage1Error,
> {
    cfg.train
        .mixed_precision
        .check_backend(&B::name(device), "[train] mixed_precision")
        .map_err(Stage1Error::Config)?;
    B::seed(device, cfg.run.seed);
    let parts = Stage1Components::<B>::from_config(&cfg.stage, device)?;
    let blip = parts.blip_config.clone();
    let size = parts.image_size;
    let (mut stage, model) = Stage1::new(cfg.stage.clone(), parts, device.clone())?;
    stage.sample_seed = cfg.run.seed;
    stage.autocast = cfg.train.mixed_precision.dtype();
    // Parameters initialise lazily: materialise them now, in module order, so the draws do not
    // depend on what touches them first (the trainer, the optimizer, a data-parallel broadcast).
    blipd_train::params::param_infos::<B, _>(&model);
    let bs = cfg.train.batch_size;
    if let Some(a) = &cfg.data.augment {
        a.validate()?;
    }
    let (augment, run_seed) = (cfg.data.augment.clone(), cfg.run.seed);
    let rng_of = move |key: u64| TrainRng::new(run_seed, AUGMENT_STREAM + key);
    if let Some(dir) = &cfg.data.shards {
        if cfg.data.synthetic.is_some() || cfg.data.list.is_some() {
            return Err(Stage1Error::Config(
                "[data] needs exactly one source: shards, list or [data.synthetic]".into(),
            ));
        }
        let src = ShardSource::open(dir, cfg, size)?;
        check_len(src.len(), cfg)?;
        return Ok((stage, model, Source::Shards(Box::new(src)), blip));
    }
    let (len, make): (usize, MakeBatch) = match (&cfg.data.synthetic, &cfg.data.list) {
        (Some(syn), None) => {
            let (seed, px) = (syn.seed, syn.size);
            let make: MakeBatch = Box::new(move |idx: &[usize], keys: &[u64]| {
                let mut pixels = Vec::with_capacity(idx.len() * 3 * size * size);
                let mut captions = Vec::with_capacity(idx.len());
                for (&i, &k) in idx.iter().zip(keys) {
                    // Stage 1 sees the original scene and its caption.
                    let p = synth_pair(i as u64, seed, px);
                    pixels.extend(prepare(&p.target, size, augment.as_ref(), &mut rng_of(k)));
                    captions.push(p.caption);
                }
                Ok(Stage1Batch {
                    pixels: TensorData::new(pixels, [idx.len(), 3, size, size]),
                    captions,
                    keys: keys.to_vec(),
                })
            });
            (syn.pairs, make)
        }
        (None, Some(list)) => {
            let entries = read_list(list, cfg.data.image_root.as_deref())?;
            let list = list.clone();
            let n = entries.len();
            let make: MakeBatch = Box::new(move |idx: &[usize], keys: &[u64]| {
                let mut pixels = Vec::with_capacity(idx.len() * 3 * size * size);
                let mut captions = Vec::with_capacity(idx.len());
                for (&i, &k) in idx.iter().zip(keys) {
                    let e = &entries[i];
                    let img = read_entry(&list, e).map_err(TrainError::data)?;
                    pixels.extend(prepare(&img, size, augment.as_ref(), &mut rng_of(k)));
                    captions.push(e.caption.clone());
                }
                Ok(Stage1Batch {
                    pixels: TensorData::new(pixels, [idx.len(), 3, size, size]),
                    captions,
                    keys: keys.to_vec(),
                })
            });
            (n, make)
        }
        _ => return Err(Stage1Error::Config(
            "[data] needs exactly one source: [data.synthetic] pairs = N, or list = \"pairs.tsv\""
                .into(),
        )),
    };
    check_len(len, cfg)?;
    let sampler = EpochSampler::new(len, bs, cfg.run.seed, cfg.data.shuffle);
    Ok((
        stage,
        model,
        Source::Indexed(KeyedSource::new(sampler, bs, make)),
        blip,
    ))
}

fn check_len(len: usize, cfg: &Stage1RunConfig) -> Result<(), Stage1Error> {
    let bs = cfg.train.batch_size;
    if len < bs {
        return Err(Stage1Error::Config(format!(
            "the data has {len} pairs, fewer than train.batch_size = {bs}"
        )));
    }
    if cfg.stage.itm && bs < 2 {
        return Err(Stage1Error::Config(
            "ITM draws its negatives from the batch: train.batch_size must be ≥ 2 (or itm = false)"
                .into(),
        ));
    }
    Ok(())
}

/// The run directory of a config.
pub fn run_dir(cfg: &Stage1RunConfig) -> &Path {
    &cfg.run.dir
}
