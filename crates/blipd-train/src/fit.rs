//! The run glue every stage shares ([`fit`]): join the data-parallel job or not, take rank 0's
//! weights (and the stage's frozen networks, [`Stage::broadcast_frozen`]), cut the data to this
//! rank's slice, train to `train.max_steps` (resuming from the newest valid checkpoint), export on
//! rank 0, and wait for every rank so that whoever runs next can read the export.
//!
//! A stage's `run_*` function is then: seed the backend, build (stage, model, data), [`fit`].

use serde::Serialize;

use crate::config::RunConfig;
use crate::data::BatchSource;
use crate::dist_sync::{DistConfig, DistSync};
use crate::error::Result;
use crate::grads::GradSync;
use crate::stage::Stage;
use crate::trainer::{RunSummary, Trainer};
use burn::tensor::backend::AutodiffBackend;

/// A data source that can be cut to one rank's slice of every global batch.
pub trait RankSlice: BatchSource + Sized {
    /// This rank's slice (`rank` of `world_size`); an error names what could not be split (e.g. a
    /// shard folder that no longer opens).
    fn rank_slice(self, rank: usize, world_size: usize) -> Result<Self>;
}

/// Joins the data-parallel job the environment describes (torchrun's, SLURM's or `blipd launch`'s
/// variables; settings from the `BLIPD_*` environment), or `None` for a single process.
pub fn join_from_env() -> Result<Option<DistSync>> {
    crate::dist_sync::from_env(&DistConfig::from_env()?)
}

/// Trains `model` with `stage` on `data` as `cfg` says, data-parallel when `dist` is given (`what`
/// names the model in the broadcast's messages), then calls `export` on rank 0 and waits at a
/// barrier for every rank.
pub fn fit<B, S, D, SC, DC>(
    cfg: &RunConfig<SC, DC>,
    device: B::Device,
    (mut stage, model, data): (S, S::Model, D),
    dist: Option<DistSync>,
    what: &str,
    export: impl FnOnce(&Trainer<B, S>) -> Result<()>,
) -> Result<RunSummary>
where
    B: AutodiffBackend,
    S: Stage<B>,
    D: RankSlice<Batch = S::Batch>,
    SC: Serialize,
    DC: Serialize,
{
    let (mut trainer, mut data) = match dist {
        None => (Trainer::from_run_config(cfg, stage, model, device)?, data),
        Some(mut sync) => {
            let (rank, world) = (
                GradSync::<B::InnerBackend>::rank(&sync),
                GradSync::<B::InnerBackend>::world_size(&sync),
            );
            let model = sync.broadcast_module(model, what)?;
            stage.broadcast_frozen(&mut sync)?;
            sync.track_params::<B, _>(&model)?;
            let data = data.rank_slice(rank, world)?;
            let trainer =
                Trainer::from_run_config(cfg, stage, model, device)?.with_grad_sync(Box::new(sync));
            (trainer, data)
        }
    };
    let summary = trainer.fit(&mut data)?;
    if trainer.rank() == 0 {
        export(&trainer)?;
    }
    trainer.barrier()?;
    Ok(summary)
}
