//! Data-parallel training over the [`blipd_dist`] rendezvous: [`DistSync`] (a [`GradSync`] that
//! all-reduces gradients in buckets), the initial-weights broadcast ([`DistSync::broadcast_module`]),
//! and [`from_env`] (joins the job torchrun / SLURM / `blipd launch` describe); the settings are
//! [`DistConfig`] (`config.rs`), the broadcast's module walk is `broadcast.rs`.
//!
//! This is the portable path: gradients are packed on the host and summed over the TCP control
//! channel itself ([`Transport::Tcp`], the default: rank 0 sums the contributions in rank order, then
//! sends the sum back) or, opt-in, by burn-collective's ring all-reduce between the processes
//! ([`crate::collective`], [`Transport::BurnCollective`]). Either way every rank gets identical values. It is meant for CPU runs, tests and small jobs; on GPUs the NCCL path
//! (`blipd-dist` feature `nccl`) replaces the transport. Like PyTorch DDP, and unlike a naive
//! per-tensor loop:
//! - only trainable parameters are reduced, flattened into buckets of [`DistConfig::bucket_mb`]
//!   (25 MiB, DDP's `bucket_cap_mb`), a tensor larger than a bucket being sent in bucket-sized pieces;
//! - nothing is sent on accumulation micro-steps (`no_sync()`), only on the final one;
//! - a parameter that got no gradient on some rank (unused by that rank's batch) contributes zeros,
//!   and the sum is still divided by the world size (DDP's `find_unused_parameters` semantics); one
//!   that got no gradient on any rank stays without gradient (the optimizer skips it, as in PyTorch);
//! - optional bf16 gradient compression ([`DistConfig::bf16_grads`], DDP's `bf16_compress_hook`).
//!
//! Differences from DDP: no overlap of communication with backward (the trainer calls
//! [`GradSync::sync_grads`] after backward), so buckets are reduced in parameter order, not in
//! reverse; and on the `tcp` transport (a star) rank 0's link carries `2·(W−1)` times the gradient
//! bytes per step (a ring carries `2·(W−1)/W`). See `docs/distributed.md` for the costs.
//!
//! Non-finite gradients: every rank counts the non-finite values of its own gradients before
//! reducing; the counts travel with the reduction, so every rank learns which ranks produced them and
//! logs it. NaN and ±Inf survive the sum, so the reduced gradients — identical on every rank — are
//! non-finite everywhere, and the trainer's check of the (reduced) grad-norm and of the (averaged)
//! loss takes the same decision on every rank: all skip the update (`optimizer.skip_nonfinite`) or all
//! stop with [`crate::TrainError::NonFinite`].
//!
//! Failures: every collective has the rendezvous' operation timeout ([`DistConfig::collective_timeout_s`],
//! env `BLIPD_COLLECTIVE_TIMEOUT_S`); a peer that stops answering is an error naming this rank, the
//! operation and the silent peer, and a peer that dies is a connection error naming it. The
//! trainer returns the error, so the process exits instead of hanging.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use blipd_dist::{DistError, Rendezvous, World};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use crate::collective::{CollectiveLink, LinkError};
use crate::error::{Result, TrainError};
use crate::grads::{GradEntry, GradSet, GradSync};
use crate::params::{param_infos, PathStack};

mod broadcast;
mod config;

use broadcast::BroadcastMapper;
pub use config::*;

/// Joins the data-parallel job described by the environment (torchrun's `RANK`/`WORLD_SIZE`/
/// `MASTER_ADDR`/`MASTER_PORT`, or SLURM's variables) and returns its gradient sync, or `None` for a
/// single process (`WORLD_SIZE` unset or 1).
pub fn from_env(cfg: &DistConfig) -> Result<Option<DistSync>> {
    let world = World::from_env().map_err(|e| TrainError::Sync(e.to_string()))?;
    // A world of one is a single process, except that NCCL runs when asked for explicitly
    // (`WORLD_SIZE=1 BLIPD_GRAD_TRANSPORT=nccl`), to check that path on one GPU.
    let nccl_of_one = cfg.transport == Transport::Nccl && std::env::var_os("WORLD_SIZE").is_some();
    if world.world_size <= 1 && !nccl_of_one {
        return Ok(None);
    }
    DistSync::establish(&world, cfg.clone()).map(Some)
}

/// Traffic counters of a [`DistSync`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SyncStats {
    /// Gradient synchronisations (optimizer steps).
    pub syncs: u64,
    /// Messages sent for gradients (buckets and bucket pieces, plus one control message per sync).
    pub messages: u64,
    /// Gradient payload bytes this rank sent (f32 on this transport).
    pub bytes: u64,
    /// Wall time spent in gradient synchronisation (host copies included).
    pub seconds: f64,
}

/// One trainable parameter in the reduction layout.
#[derive(Clone, Debug, PartialEq)]
struct Slot {
    path: String,
    id: burn::module::ParamId,
    shape: Vec<usize>,
}

impl Slot {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// [`GradSync`] over a [`Rendezvous`]: bucketed, deterministic sum-then-divide all-reduce of the
/// trainable parameters' gradients (see the module docs).
pub struct DistSync {
    rv: Rendezvous,
    cfg: DistConfig,
    /// The gradient link when [`Transport::BurnCollective`] (world > 1).
    link: Option<CollectiveLink>,
    /// The NCCL communicator when [`Transport::Nccl`].
    #[cfg(feature = "nccl")]
    nccl: Option<blipd_dist::nccl::NcclComm>,
    layout: Option<Vec<Slot>>,
    stats: SyncStats,
    last_nonfinite: Vec<usize>,
}

impl Drop for DistSync {
    /// The communication bill of the run (the cost the all-reduce adds to each step, since it runs
    /// after backward rather than overlapped with it).
    fn drop(&mut self) {
        let st = &self.stats;
        if st.syncs > 0 {
            tracing::info!(
                "rank {}: gradient sync ({:?}): {} syncs, {} messages, {:.1} MB sent, {:.2} s in \
                 all ({:.1} ms per sync)",
                self.rv.world.rank,
                self.cfg.transport,
                st.syncs,
                st.messages,
                st.bytes as f64 / 1e6,
                st.seconds,
                1e3 * st.seconds / st.syncs as f64
            );
        }
    }
}

impl std::fmt::Debug for DistSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistSync")
            .field("world", &self.rv.world)
            .field("cfg", &self.cfg)
            .field("params", &self.layout.as_ref().map(Vec::len))
            .finish()
    }
}

impl DistSync {
    /// Establishes the rendezvous of `world` (CPU path: no payload) and wraps it.
    pub fn establish(world: &World, cfg: DistConfig) -> Result<Self> {
        cfg.validate()?;
        if cfg.transport == Transport::Nccl {
            return Self::establish_nccl(world, cfg);
        }
        let t = Instant::now();
        let rv = Rendezvous::establish(world, &[], cfg.rendezvous()).map_err(|e| {
            TrainError::Sync(format!("rank {} of {}: {e}", world.rank, world.world_size))
        })?;
        tracing::info!(
            "data parallel: rank {} of {} joined {}:{} in {:.2}s (bucket {} MiB, bf16 grads: {}, \
             collective timeout {}s)",
            world.rank,
            world.world_size,
            world.master_addr,
            world.master_port,
            t.elapsed().as_secs_f64(),
            cfg.bucket_mb,
            cfg.bf16_grads,
            cfg.collective_timeout_s
        );
        let mut sync = Self::new(rv, cfg);
        if sync.cfg.transport == Transport::BurnCollective && world.world_size > 1 {
            sync.link = Some(sync.connect_collective()?);
        }
        Ok(sync)
    }

    #[cfg(feature = "nccl")]
    fn establish_nccl(world: &World, cfg: DistConfig) -> Result<Self> {
        let t = Instant::now();
        let group =
            blipd_dist::nccl::NcclGroup::establish(world, world.local_rank, cfg.rendezvous())
                .map_err(|e| {
                    TrainError::Sync(format!("rank {} of {}: {e}", world.rank, world.world_size))
                })?;
        tracing::info!(
            "data parallel: rank {} of {} joined with NCCL on GPU {} in {:.2}s",
            world.rank,
            world.world_size,
            world.local_rank,
            t.elapsed().as_secs_f64()
        );
        let mut sync = Self::new(group.rv, cfg);
        sync.nccl = Some(group.comm);
        Ok(sync)
    }

    #[cfg(not(feature = "nccl"))]
    fn establish_nccl(world: &World, _cfg: DistConfig) -> Result<Self> {
        Err(TrainError::Sync(format!(
            "rank {}: BLIPD_GRAD_TRANSPORT=nccl needs blipd built with `--features nccl`",
            world.rank
        )))
    }

    /// Whether gradients go through NCCL (then even a world of one synchronises, to exercise it).
    fn uses_nccl(&self) -> bool {
        #[cfg(feature = "nccl")]
        {
            self.nccl.is_some()
        }
        #[cfg(not(feature = "nccl"))]
        {
            false
        }
    }

    /// Rank 0 starts burn-collective's orchestrator on a free port and tells the others; every
    /// rank picks a free port for its node's data service. Nodes register per call (a session for
    /// each all-reduce, see [`crate::collective`]), with the gradients' backend.
    fn connect_collective(&mut self) -> Result<CollectiveLink> {
        let rank = self.rv.world.rank;
        let port_err = |e: std::io::Error| {
            TrainError::Sync(format!(
                "rank {rank}: choosing a port for burn-collective: {e}"
            ))
        };
        let mine = if rank == 0 {
            let p = crate::collective::free_port().map_err(port_err)?;
            crate::collective::spawn_orchestrator(p)?;
            p.to_le_bytes().to_vec()
        } else {
            Vec::new()
        };
        let got = self
            .rv
            .broadcast(&mine, "burn-collective orchestrator port")
            .map_err(|e| self.err(e))?;
        let orchestrator_port = match got.as_slice() {
            [a, b] => u16::from_le_bytes([*a, *b]),
            _ => {
                return Err(TrainError::Sync(format!(
                    "rank {rank}: bad orchestrator port message ({} bytes)",
                    got.len()
                )))
            }
        };
        let ip = self.rv.local_ip().ok_or_else(|| {
            TrainError::Sync(format!(
                "rank {rank}: cannot tell this rank's address for burn-collective"
            ))
        })?;
        let data_port = crate::collective::free_port().map_err(port_err)?;
        let link = CollectiveLink::new(
            rank,
            self.rv.world.world_size,
            &self.rv.world.master_addr,
            orchestrator_port,
            ip,
            data_port,
            Duration::from_secs_f64(self.cfg.collective_timeout_s),
        );
        tracing::info!(
            "rank {rank}: gradient transport burn-collective (ring), node {}",
            link.node_address()
        );
        Ok(link)
    }

    /// Wraps an established rendezvous (gradient buckets over the rendezvous, whatever
    /// `cfg.transport` says; [`DistSync::establish`] sets up burn-collective).
    pub fn new(rv: Rendezvous, cfg: DistConfig) -> Self {
        Self {
            rv,
            cfg,
            link: None,
            #[cfg(feature = "nccl")]
            nccl: None,
            layout: None,
            stats: SyncStats::default(),
            last_nonfinite: Vec::new(),
        }
    }

    pub fn world(&self) -> &World {
        &self.rv.world
    }

    pub fn config(&self) -> &DistConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &SyncStats {
        &self.stats
    }

    /// Ranks whose local gradients held NaN/Inf at the last synchronisation (empty if none).
    pub fn last_nonfinite_ranks(&self) -> &[usize] {
        &self.last_nonfinite
    }

    fn err(&self, e: DistError) -> TrainError {
        TrainError::Sync(format!(
            "rank {} of {}: {e}",
            self.rv.world.rank, self.rv.world.world_size
        ))
    }

    /// A failed burn-collective call, explained. After a failure or a timeout, a short barrier on
    /// the control channel finds the dead or silent peer (burn-collective cannot tell which node it
    /// lost or waits for): the error names it, at most 5 s after a failure and `min(T/2, 10 s)` after
    /// the collective timeout `T`.
    fn link_failure(&mut self, e: LinkError, op: &str) -> TrainError {
        let (rank, w) = (self.rv.world.rank, self.rv.world.world_size);
        let what = format!("rank {rank} of {w}: {op} (burn-collective ring)");
        const PROBE: &str = "finding the dead or silent peer (control channel)";
        match e {
            // burn-collective's own error (e.g. `LocalServerMissing` when the orchestrator's
            // process died) does not say which peer is gone: the control channel does.
            LinkError::Failed(m) => {
                let found = self.rv.barrier_within(PROBE, Duration::from_secs(5));
                TrainError::Sync(match found {
                    Err(de) => format!("{what}: {m}; {de}"),
                    Ok(()) => format!("{what}: {m}"),
                })
            }
            LinkError::Timeout(secs) => {
                let probe = Duration::from_secs_f64((secs / 2.0).min(10.0));
                let found = self.rv.barrier_within(PROBE, probe);
                TrainError::Sync(match found {
                    Err(de) => format!("{what} timed out after {secs:.1}s; {de}"),
                    Ok(()) => format!(
                        "{what} timed out after {secs:.1}s, yet every rank answers on the control \
                         channel (a burn-collective failure, not a dead peer)"
                    ),
                })
            }
        }
    }

    fn reduce(&mut self, data: &mut [f32], op: &str) -> Result<()> {
        self.rv.all_reduce_sum(data, op).map_err(|e| self.err(e))
    }

    /// Gathers `values` of every rank (the same length everywhere): rank `r`'s values are at
    /// `[r·n, (r+1)·n)` of the result. Exact (a sum with zeros elsewhere).
    fn all_gather(&mut self, values: &[f32], op: &str) -> Result<Vec<f32>> {
        let (n, w, r) = (values.len(), self.rv.world.world_size, self.rv.world.rank);
        let mut buf = vec![0f32; n * w];
        buf[r * n..(r + 1) * n].copy_from_slice(values);
        self.reduce(&mut buf, op)?;
        Ok(buf)
    }

    /// Fixes the reduction layout to the trainable parameters of `model` (in visiting order, the
    /// order of [`GradSet`]) and checks that every rank has the same layout: a rank whose model
    /// differs (another config, another code version) is an error on every rank, naming the first
    /// differing parameter, instead of a silent reduction of mismatched tensors. Without this call
    /// the layout is taken from the first synchronised [`GradSet`], which only works when every
    /// parameter gets a gradient on every rank at the first step.
    pub fn track_params<B: Backend, M: Module<B>>(&mut self, model: &M) -> Result<()> {
        let slots: Vec<Slot> = param_infos::<B, M>(model)
            .into_iter()
            .filter(|p| p.trainable)
            .map(|p| Slot {
                path: p.path,
                id: p.id,
                shape: p.shape,
            })
            .collect();
        let manifest: Vec<(String, Vec<usize>)> = slots
            .iter()
            .map(|s| (s.path.clone(), s.shape.clone()))
            .collect();
        self.check_same_everywhere(&manifest, "trainable parameter layout")?;
        self.layout = Some(slots);
        Ok(())
    }

    /// Compares `manifest` with rank 0's; every rank fails (together) if any rank differs.
    fn check_same_everywhere(
        &mut self,
        manifest: &[(String, Vec<usize>)],
        what: &str,
    ) -> Result<()> {
        if self.rv.world.world_size == 1 {
            return Ok(());
        }
        let text = manifest
            .iter()
            .map(|(p, s)| format!("{p}:{s:?}"))
            .collect::<Vec<_>>()
            .join("\n");
        let op = format!("{what} check");
        let theirs = self
            .rv
            .broadcast(text.as_bytes(), &op)
            .map_err(|e| self.err(e))?;
        let theirs = String::from_utf8_lossy(&theirs).into_owned();
        let mine = difference(&text, &theirs);
        let flags = self.all_gather(&[if mine.is_some() { 1.0 } else { 0.0 }], &op)?;
        let bad: Vec<usize> = (0..flags.len()).filter(|&r| flags[r] != 0.0).collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(TrainError::Sync(format!(
            "rank {} of {}: {what} differs from rank 0's on rank(s) {bad:?}{}",
            self.rv.world.rank,
            self.rv.world.world_size,
            match mine {
                Some(d) => format!(" (here: {d})"),
                None => String::new(),
            }
        )))
    }

    /// Replaces every float parameter of `module` (trainable or frozen) by rank 0's value, so all
    /// ranks start from the same weights whatever their own initialisation (PyTorch DDP does this
    /// when it wraps a model). The parameter layout (paths, shapes, dtypes) is checked first, on
    /// every rank. Values travel in buckets of [`DistConfig::bucket_mb`] in their own dtype, bit for
    /// bit; `require_grad` and parameter ids are kept. `what` names the module in errors.
    pub fn broadcast_module<B: Backend, M: Module<B>>(
        &mut self,
        module: M,
        what: &str,
    ) -> Result<M> {
        let infos = param_infos::<B, M>(&module);
        let manifest: Vec<(String, Vec<usize>)> = infos
            .iter()
            .map(|p| (format!("{} {:?}", p.path, p.dtype), p.shape.clone()))
            .collect();
        self.check_same_everywhere(&manifest, &format!("{what} parameter layout"))?;
        if self.rv.world.world_size == 1 {
            return Ok(module);
        }
        let t = Instant::now();
        let op = format!("broadcast of {what} from rank 0");
        let cap = self.cfg.bucket_elems() * 4;
        let mut mapper = BroadcastMapper::<B> {
            sync: self,
            op: op.clone(),
            cap,
            stack: PathStack::default(),
            pending: Vec::new(),
            queue: std::collections::VecDeque::new(),
            error: None,
            bytes: 0,
            _b: std::marker::PhantomData,
        };
        let module = module.map(&mut mapper);
        if mapper.error.is_none() && mapper.sync.rv.world.rank == 0 && !mapper.pending.is_empty() {
            let frame = std::mem::take(&mut mapper.pending);
            mapper.bytes += frame.len();
            if let Err(e) = mapper.sync.rv.broadcast(&frame, &op) {
                mapper.error = Some(mapper.sync.err(e));
            }
        }
        if let Some(e) = mapper.error {
            return Err(e);
        }
        if !mapper.queue.is_empty() {
            return Err(TrainError::Sync(format!(
                "rank {}: {op}: {} values left over (layouts differ)",
                mapper.sync.rv.world.rank,
                mapper.queue.len()
            )));
        }
        let bytes = mapper.bytes;
        tracing::info!(
            "{op}: {} tensors, {:.1} MB in {:.2}s",
            infos.len(),
            bytes as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        Ok(module)
    }

    fn layout_from(&mut self, grads: &GradSet<impl Backend>) -> Result<Vec<Slot>> {
        let slots: Vec<Slot> = grads
            .entries()
            .iter()
            .map(|e| Slot {
                path: e.path.clone(),
                id: e.id,
                shape: e.shape.clone(),
            })
            .collect();
        let manifest: Vec<(String, Vec<usize>)> = slots
            .iter()
            .map(|s| (s.path.clone(), s.shape.clone()))
            .collect();
        self.check_same_everywhere(&manifest, "gradient layout (call DistSync::track_params)")?;
        Ok(slots)
    }

    /// The bucketed all-reduce (see the module docs).
    fn sync_now<B: Backend>(&mut self, grads: &mut GradSet<B>) -> Result<()> {
        let t0 = Instant::now();
        let layout = match self.layout.take() {
            Some(l) => l,
            None => self.layout_from(grads)?,
        };
        let result = self.reduce_layout(&layout, grads);
        self.layout = Some(layout);
        self.stats.syncs += 1;
        self.stats.seconds += t0.elapsed().as_secs_f64();
        result
    }

    fn reduce_layout<B: Backend>(&mut self, layout: &[Slot], grads: &mut GradSet<B>) -> Result<()> {
        let (w, rank) = (self.rv.world.world_size, self.rv.world.rank);
        let index: HashMap<&str, usize> = layout
            .iter()
            .enumerate()
            .map(|(i, s)| (s.path.as_str(), i))
            .collect();
        let mut local: Vec<Option<GradEntry<B>>> = (0..layout.len()).map(|_| None).collect();
        let entries = std::mem::take(grads).into_entries();
        let device = entries.first().map(|e| e.grad.device()).unwrap_or_default();
        for e in entries {
            let Some(&i) = index.get(e.path.as_str()) else {
                return Err(TrainError::Sync(format!(
                    "rank {rank}: gradient of `{}` is not in the reduction layout (not a \
                     trainable parameter of the tracked model)",
                    e.path
                )));
            };
            if e.shape != layout[i].shape {
                return Err(TrainError::Sync(format!(
                    "rank {rank}: gradient of `{}` has shape {:?}, the layout says {:?}",
                    e.path, e.shape, layout[i].shape
                )));
            }
            local[i] = Some(e);
        }

        // Control message first: which ranks have each gradient, and non-finite counts per rank.
        let mut control = vec![0f32; layout.len() + w];
        for (i, e) in local.iter().enumerate() {
            if e.is_some() {
                control[i] = 1.0;
            }
        }
        // Bucket plan: consecutive parameters up to the cap (a larger one is a bucket of its own,
        // sent in cap-sized pieces).
        let cap = self.cfg.bucket_elems();
        let mut buckets: Vec<std::ops::Range<usize>> = Vec::new();
        let (mut start, mut size) = (0usize, 0usize);
        for (i, s) in layout.iter().enumerate() {
            if size > 0 && size + s.numel() > cap {
                buckets.push(start..i);
                start = i;
                size = 0;
            }
            size += s.numel();
        }
        if start < layout.len() {
            buckets.push(start..layout.len());
        }
        // Host copies of the local gradients, bucket by bucket; non-finite values are counted while
        // packing, so the control message must follow the packing. Pack all first (one pass over the
        // device), count, then send control, then the buckets.
        let bf16 = self.cfg.bf16_grads;
        let mut packed: Vec<Vec<f32>> = Vec::with_capacity(buckets.len());
        let mut nonfinite = 0usize;
        for b in &buckets {
            let n: usize = layout[b.clone()].iter().map(Slot::numel).sum();
            let mut buf = Vec::with_capacity(n);
            for i in b.clone() {
                match &local[i] {
                    Some(e) => {
                        let v = host_f32(&e.grad)?;
                        nonfinite += v.iter().filter(|x| !x.is_finite()).count();
                        if bf16 {
                            buf.extend(v.into_iter().map(round_bf16));
                        } else {
                            buf.extend(v);
                        }
                    }
                    None => buf.resize(buf.len() + layout[i].numel(), 0.0),
                }
            }
            packed.push(buf);
        }
        control[layout.len() + rank] = nonfinite.min(1 << 24) as f32;
        let op = "gradient all-reduce (control: presence and non-finite counts)";
        self.reduce(&mut control, op)?;
        self.stats.messages += 1;
        self.last_nonfinite = (0..w)
            .filter(|&r| control[layout.len() + r] != 0.0)
            .collect();
        if !self.last_nonfinite.is_empty() && rank == 0 {
            tracing::warn!(
                "non-finite gradients on rank(s) {:?} ({} values here); the reduced gradients are \
                 non-finite on every rank",
                self.last_nonfinite,
                nonfinite
            );
        }

        failpoint_hang_after_control(rank, self.stats.syncs);

        let nb = buckets.len();
        let inv = 1.0 / w as f32;
        let mut out: Vec<GradEntry<B>> = Vec::with_capacity(layout.len());
        for (k, (b, mut buf)) in buckets.into_iter().zip(packed).enumerate() {
            let pieces = buf.len().div_ceil(cap).max(1);
            for (p, chunk) in buf.chunks_mut(cap).enumerate() {
                let op = if pieces == 1 {
                    format!("gradient all-reduce (bucket {}/{nb})", k + 1)
                } else {
                    format!(
                        "gradient all-reduce (bucket {}/{nb}, piece {}/{pieces})",
                        k + 1,
                        p + 1
                    )
                };
                #[cfg(feature = "nccl")]
                if let Some(n) = self.nccl.as_mut() {
                    let rank = self.rv.world.rank;
                    n.all_reduce_host_sum(chunk, &op)
                        .map_err(|e| TrainError::Sync(format!("rank {rank} of {w}: {e} (NCCL)")))?;
                    self.stats.messages += 1;
                    self.stats.bytes += (chunk.len() * 4) as u64;
                    continue;
                }
                match self.link.as_mut() {
                    Some(link) => {
                        if let Err(e) = link.all_reduce_sum::<B>(chunk, &device) {
                            return Err(self.link_failure(e, &op));
                        }
                    }
                    None => self.reduce(chunk, &op)?,
                }
                self.stats.messages += 1;
                self.stats.bytes += (chunk.len() * 4) as u64;
            }
            for v in buf.iter_mut() {
                *v *= inv;
                if bf16 {
                    *v = round_bf16(*v);
                }
            }
            let mut off = 0;
            for i in b {
                let s = &layout[i];
                let n = s.numel();
                let present = control[i] > 0.0;
                if present {
                    let (dtype, id) = match &local[i] {
                        Some(e) => (e.grad.dtype(), e.id),
                        None => (DType::F32, s.id),
                    };
                    let data = TensorData::new(buf[off..off + n].to_vec(), [n]);
                    let data = if dtype == DType::F32 {
                        data
                    } else {
                        data.convert_dtype(dtype)
                    };
                    out.push(GradEntry {
                        path: s.path.clone(),
                        id,
                        shape: s.shape.clone(),
                        grad: Tensor::from_data(data, (&device, dtype)),
                    });
                }
                off += n;
            }
        }
        *grads = GradSet::from_entries(out);
        Ok(())
    }
}

impl<B: Backend> GradSync<B> for DistSync {
    fn rank(&self) -> usize {
        self.rv.world.rank
    }

    fn world_size(&self) -> usize {
        self.rv.world.world_size
    }

    fn sync_grads(&mut self, grads: &mut GradSet<B>, is_final_micro_step: bool) -> Result<()> {
        if !is_final_micro_step || (self.rv.world.world_size == 1 && !self.uses_nccl()) {
            return Ok(());
        }
        self.sync_now(grads)
    }

    /// Exact mean: each value travels as an f32 pair (high part, remainder), all ranks' pairs are
    /// gathered, and every rank adds them in rank order in f64 — identical results everywhere.
    fn all_reduce_mean(&mut self, values: &mut [f64]) -> Result<()> {
        let w = self.rv.world.world_size;
        if w == 1 || values.is_empty() {
            return Ok(());
        }
        let n = values.len();
        let mut mine = Vec::with_capacity(2 * n);
        for &v in values.iter() {
            let hi = v as f32;
            let lo = if v.is_finite() && (hi as f64).is_finite() {
                (v - hi as f64) as f32
            } else {
                0.0
            };
            mine.push(hi);
            mine.push(lo);
        }
        let all = self.all_gather(&mine, "scalar all-reduce (loss and metrics)")?;
        for (i, v) in values.iter_mut().enumerate() {
            let mut s = 0f64;
            for r in 0..w {
                let base = r * 2 * n + 2 * i;
                s += all[base] as f64 + all[base + 1] as f64;
            }
            *v = s / w as f64;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.rv.barrier("barrier").map_err(|e| self.err(e))
    }

    fn all_gather(&mut self, values: &[f32]) -> Result<Vec<f32>> {
        if self.rv.world.world_size == 1 {
            return Ok(values.to_vec());
        }
        // Every rank must bring the same length: agree on it first, so a mismatch is an error
        // naming the ranks instead of a garbled gather.
        let (w, r) = (self.rv.world.world_size, self.rv.world.rank);
        let n = values.len();
        // Two exact f32 parts (low 20 bits, the rest): lengths beyond 2^24 stay exact.
        let parts = [(n & 0xF_FFFF) as f32, (n >> 20) as f32];
        let got = DistSync::all_gather(self, &parts, "all-gather (lengths)")?;
        let lens: Vec<usize> = got
            .chunks_exact(2)
            .map(|c| c[0] as usize | ((c[1] as usize) << 20))
            .collect();
        if lens.iter().any(|&l| l != n) {
            return Err(TrainError::Sync(format!(
                "rank {r} of {w}: all-gather of unequal lengths {lens:?} (per rank)"
            )));
        }
        DistSync::all_gather(self, values, "all-gather (stage values)")
    }
}

/// Fault injection for the failure tests: `BLIPD_FAILPOINT_HANG=<rank>:<sync>` makes that rank go
/// silent (sleep) right after the control message of its `<sync>`-th gradient synchronisation
/// (0-based), i.e. while its peers are inside the bucket all-reduce.
fn failpoint_hang_after_control(rank: usize, sync: u64) {
    // Read once per process: this runs on every synchronisation.
    static POINT: std::sync::OnceLock<Option<(usize, u64)>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| {
        let v = std::env::var("BLIPD_FAILPOINT_HANG").ok()?;
        let (r, s) = v.split_once(':')?;
        Some((r.trim().parse().ok()?, s.trim().parse().ok()?))
    });
    if *point == Some((rank, sync)) {
        tracing::warn!("BLIPD_FAILPOINT_HANG: rank {rank} goes silent at sync {sync}");
        std::thread::sleep(Duration::from_secs(24 * 3600));
    }
}

/// The gradient on the host as f32.
fn host_f32<B: Backend>(t: &Tensor<B, 1>) -> Result<Vec<f32>> {
    let data = t.clone().into_data();
    let data = if data.dtype == DType::F32 {
        data
    } else {
        data.convert::<f32>()
    };
    data.to_vec::<f32>()
        .map_err(|e| TrainError::Sync(format!("reading a gradient back: {e:?}")))
}

/// f32 → nearest bf16 (ties to even), returned as f32. NaN stays NaN, overflow becomes ±Inf.
pub fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return f32::NAN;
    }
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(rounded)
}

/// The first line where `mine` and `theirs` differ, described.
fn difference(mine: &str, theirs: &str) -> Option<String> {
    if mine == theirs {
        return None;
    }
    let (a, b): (Vec<&str>, Vec<&str>) = (mine.lines().collect(), theirs.lines().collect());
    for i in 0..a.len().max(b.len()) {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) if x == y => continue,
            (x, y) => {
                return Some(format!(
                    "entry {i}: `{}` here, `{}` on rank 0 ({} entries here, {} on rank 0)",
                    x.unwrap_or(&"<none>"),
                    y.unwrap_or(&"<none>"),
                    a.len(),
                    b.len()
                ))
            }
        }
    }
    Some("contents differ".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blipd_dist::Launcher;
    use burn::backend::NdArray;

    type Nd = NdArray<f32>;

    fn world(rank: usize, n: usize, port: u16) -> World {
        World {
            rank,
            local_rank: rank,
            world_size: n,
            local_world_size: n,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            launcher: Launcher::Torchrun,
        }
    }

    fn free_port() -> u16 {
        crate::collective::free_port().unwrap()
    }

    fn cfg(bucket_mb: f64) -> DistConfig {
        DistConfig {
            bucket_mb,
            collective_timeout_s: 5.0,
            join_timeout_s: 10.0,
            // Ranks are threads of one process here; burn-collective keeps one node per process,
            // so its transport is tested with real processes (blipd-train/tests/collective.rs).
            transport: Transport::Tcp,
            ..DistConfig::default()
        }
    }

    fn entry(path: &str, values: Vec<f32>) -> GradEntry<Nd> {
        let n = values.len();
        GradEntry {
            path: path.into(),
            id: burn::module::ParamId::new(),
            shape: vec![n],
            grad: Tensor::from_data(TensorData::new(values, [n]), &Default::default()),
        }
    }

    fn values(g: &GradSet<Nd>) -> Vec<(String, Vec<f32>)> {
        g.entries()
            .iter()
            .map(|e| (e.path.clone(), host_f32(&e.grad).unwrap()))
            .collect()
    }

    /// Runs `f(rank, sync)` on `n` threads joined through a real rendezvous.
    fn on_ranks<T: Send + 'static>(
        n: usize,
        c: DistConfig,
        f: impl Fn(usize, &mut DistSync) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let port = free_port();
        let f = std::sync::Arc::new(f);
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (f, c) = (f.clone(), c.clone());
                std::thread::spawn(move || {
                    let mut s = DistSync::establish(&world(r, n, port), c).unwrap();
                    f(r, &mut s)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn buckets_average_exactly_and_unused_params_contribute_zeros() {
        // Bucket of 16 floats: `a` (10) and `b` (10) go to separate buckets, `c` (40) is split in
        // three pieces; `b` is unused on rank 1, `d` is unused everywhere.
        let out = on_ranks(3, cfg(16.0 * 4.0 / 1048576.0), |r, s| {
            let layout = ["a", "b", "c", "d"]
                .iter()
                .zip([10usize, 10, 40, 3])
                .map(|(p, n)| Slot {
                    path: p.to_string(),
                    id: burn::module::ParamId::new(),
                    shape: vec![n],
                })
                .collect::<Vec<_>>();
            s.layout = Some(layout);
            let rf = r as f32;
            let mut entries = vec![entry("a", (0..10).map(|i| i as f32 + rf).collect())];
            if r != 1 {
                entries.push(entry("b", vec![rf + 1.0; 10]));
            }
            entries.push(entry(
                "c",
                (0..40).map(|i| (i as f32) * (rf + 1.0)).collect(),
            ));
            let mut g = GradSet::from_entries(entries);
            let before = values(&g);
            GradSync::<Nd>::sync_grads(s, &mut g, false).unwrap();
            assert_eq!(values(&g), before, "no communication on accumulation steps");
            GradSync::<Nd>::sync_grads(s, &mut g, true).unwrap();
            (values(&g), s.stats().clone())
        });
        for (v, stats) in &out {
            assert_eq!(v.len(), 3, "`d` has no gradient anywhere and stays absent");
            assert_eq!(v[0].0, "a");
            assert_eq!(v[0].1, (0..10).map(|i| i as f32 + 1.0).collect::<Vec<_>>());
            // b: (1 + 0 + 3) / 3 — divided by the world size, as DDP does.
            assert_eq!(v[1].1, vec![4.0 / 3.0; 10]);
            let c: Vec<f32> = (0..40).map(|i| i as f32 * 6.0 / 3.0).collect();
            assert_eq!(v[2].1, c);
            // control, [a], [b], [c] in 3 pieces, [d] (zeros everywhere).
            assert_eq!(stats.messages, 7, "{stats:?}");
            assert_eq!(stats.bytes, (10 + 10 + 40 + 3) * 4, "{stats:?}");
        }
        assert_eq!(out[0].0, out[1].0);
        assert_eq!(out[0].0, out[2].0);
    }

    #[test]
    fn nonfinite_on_one_rank_is_seen_by_all() {
        let out = on_ranks(2, cfg(25.0), |r, s| {
            let v = if r == 1 {
                vec![1.0, f32::NAN, 2.0]
            } else {
                vec![1.0, 1.0, 1.0]
            };
            let mut g = GradSet::from_entries(vec![entry("w", v), entry("u", vec![1.0; 4])]);
            GradSync::<Nd>::sync_grads(s, &mut g, true).unwrap();
            let norm = g.global_norm().unwrap().into_scalar();
            (norm.is_finite(), s.last_nonfinite_ranks().to_vec())
        });
        for (finite, ranks) in out {
            assert!(
                !finite,
                "the reduced grad-norm must be non-finite on every rank"
            );
            assert_eq!(ranks, vec![1]);
        }
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to the even one (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(-0.3), -round_bf16(0.3));
        let out = on_ranks(
            2,
            DistConfig {
                bf16_grads: true,
                ..cfg(25.0)
            },
            |r, s| {
                let mut g = GradSet::from_entries(vec![entry("w", vec![0.1 + r as f32 * 0.2])]);
                GradSync::<Nd>::sync_grads(s, &mut g, true).unwrap();
                values(&g)[0].1[0]
            },
        );
        let expected = round_bf16((round_bf16(0.1) + round_bf16(0.3)) / 2.0);
        assert_eq!(out, vec![expected, expected]);
        assert!((expected - 0.2).abs() < 0.2 / 256.0 * 2.0);
    }

    #[test]
    fn scalar_mean_is_exact_in_f64() {
        let out = on_ranks(3, cfg(25.0), |r, s| {
            let mut v = vec![
                0.1f64 + r as f64,
                1e-9 * r as f64,
                f64::NAN * (r == 2) as u8 as f64,
            ];
            GradSync::<Nd>::all_reduce_mean(s, &mut v).unwrap();
            v
        });
        for v in &out {
            assert!((v[0] - (0.3 + 3.0) / 3.0).abs() < 1e-15, "{}", v[0]);
            assert!((v[1] - 1e-9).abs() < 1e-22, "{}", v[1]);
            assert!(v[2].is_nan());
        }
    }

    #[test]
    fn broadcast_replaces_weights_and_layout_mismatch_fails_everywhere() {
        use burn::nn::{Linear, LinearConfig};
        let out = on_ranks(2, cfg(1e-4), |r, s| {
            let dev = Default::default();
            // Different random weights on each rank; a frozen bias to check require_grad is kept.
            let lin: Linear<Nd> = LinearConfig::new(64, 32).init(&dev);
            let mine = lin.weight.val().into_data();
            let lin = s.broadcast_module(lin, "test model").unwrap();
            let got = lin.weight.val().into_data();
            let other = if r == 0 {
                LinearConfig::new(64, 32).init::<Nd>(&dev)
            } else {
                LinearConfig::new(64, 33).init::<Nd>(&dev)
            };
            let err = s
                .broadcast_module(other, "mismatched")
                .err()
                .map(|e| e.to_string());
            (mine, got, err)
        });
        assert_eq!(out[0].1, out[0].0, "rank 0 keeps its weights");
        assert_eq!(out[1].1, out[0].0, "rank 1 gets rank 0's weights");
        assert_ne!(out[1].0, out[0].0);
        for (_, _, err) in &out {
            let e = err
                .as_ref()
                .expect("layout mismatch is an error on every rank");
            assert!(e.contains("differs from rank 0's on rank(s) [1]"), "{e}");
        }
        assert!(
            out[1].2.as_ref().unwrap().contains("weight"),
            "{:?}",
            out[1].2
        );
    }

    #[test]
    fn silent_peer_times_out_naming_rank_and_operation() {
        let port = free_port();
        let c = DistConfig {
            collective_timeout_s: 1.0,
            ..cfg(25.0)
        };
        let c2 = c.clone();
        let peer = std::thread::spawn(move || {
            let s = DistSync::establish(&world(1, 2, port), c2).unwrap();
            std::thread::sleep(Duration::from_secs(3));
            drop(s);
        });
        let mut s = DistSync::establish(&world(0, 2, port), c).unwrap();
        let t = Instant::now();
        let g0 = entry("w", vec![1.0]);
        s.layout = Some(vec![Slot {
            path: "w".into(),
            id: g0.id,
            shape: vec![1],
        }]);
        let mut g = GradSet::from_entries(vec![g0]);
        let e = GradSync::<Nd>::sync_grads(&mut s, &mut g, true)
            .unwrap_err()
            .to_string();
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(e.contains("rank 0 of 2"), "{e}");
        assert!(e.contains("timed out") && e.contains("rank 1"), "{e}");
        assert!(e.contains("gradient all-reduce"), "{e}");
        peer.join().unwrap();
    }

    #[test]
    fn env_overrides_and_validation() {
        let vars = |k: &str| match k {
            ENV_COLLECTIVE_TIMEOUT => Some("7.5".to_string()),
            ENV_BUCKET_MB => Some("1".to_string()),
            ENV_GRAD_BF16 => Some("true".to_string()),
            _ => None,
        };
        // The star is the default CPU transport; burn-collective only when asked for.
        assert_eq!(DistConfig::default().transport, Transport::Tcp);
        let c = DistConfig::default()
            .with_vars(|k| (k == ENV_GRAD_TRANSPORT).then(|| "burn-collective".to_string()))
            .unwrap();
        assert_eq!(c.transport, Transport::BurnCollective);
        let c = DistConfig::default().with_vars(vars).unwrap();
        assert_eq!(c.transport, Transport::Tcp);
        assert_eq!(c.collective_timeout_s, 7.5);
        assert_eq!(c.bucket_elems(), 262_144);
        assert!(c.bf16_grads);
        assert_eq!(c.rendezvous().op_timeout, Duration::from_millis(7500));
        let e = DistConfig::default()
            .with_vars(|k| (k == ENV_COLLECTIVE_TIMEOUT).then(|| "-1".to_string()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(ENV_COLLECTIVE_TIMEOUT), "{e}");
    }
}
