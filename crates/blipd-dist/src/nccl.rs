//! NCCL transport for data-parallel gradients on CUDA devices (feature `nccl`).
//!
//! **Untested**: written and compiled (`cargo check -p blipd-dist --features nccl`) on machines
//! without a GPU; it has never run. `blipd_train::dist_sync::DistSync` uses it for
//! `BLIPD_GRAD_TRANSPORT=nccl` (blipd built with `--features nccl`): the packed host buckets are
//! staged into one device buffer, summed with `ncclAllReduce`, and copied back
//! ([`NcclComm::all_reduce_host_sum`]); `examples/nccl_bandwidth.rs` measures a 1 GiB all-reduce
//! against a device-to-device copy.
//!
//! Bootstrap, as PyTorch's NCCL process group does it: rank 0 creates the NCCL unique id
//! (`ncclGetUniqueId`, 128 bytes that embed rank 0's bootstrap socket) and ships it to every rank as
//! the [`Rendezvous`] payload; each rank then builds its communicator with `ncclCommInitRank`
//! ([`Comm::from_rank`]) on its own device. The rendezvous stays open for control decisions and
//! barriers. Collectives run on device buffers on the communicator's stream; every wait polls an
//! event against the operation timeout, and a timed-out communicator is aborted (`ncclCommAbort`,
//! when the [`Comm`] is dropped) so that a dead peer is an error naming the operation, never a hang.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::{DistError, Rendezvous, RendezvousConfig, World};

/// Size of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// A rank's NCCL communicator plus the TCP control channel.
pub struct NcclGroup {
    pub rv: Rendezvous,
    pub comm: NcclComm,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup")
            .field("world", &self.rv.world)
            .field("alive", &self.comm.comm.is_some())
            .finish()
    }
}

/// The NCCL communicator of one rank, its stream and a reusable device staging buffer.
pub struct NcclComm {
    rank: usize,
    comm: Option<Comm>,
    stream: Arc<CudaStream>,
    op_timeout: Duration,
    staging: Option<CudaSlice<f32>>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("alive", &self.comm.is_some())
            .finish()
    }
}

impl NcclGroup {
    /// Joins `world` on CUDA device `ordinal` (usually `world.local_rank`).
    pub fn establish(
        world: &World,
        ordinal: usize,
        cfg: RendezvousConfig,
    ) -> Result<Self, DistError> {
        let rank = world.rank;
        let io = |op: &str, message: String| DistError::Io {
            rank,
            op: op.into(),
            message,
        };
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| io("CUDA init", format!("device {ordinal}: {e:?}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| io("CUDA init", format!("stream on device {ordinal}: {e:?}")))?;
        let payload = if rank == 0 {
            let id = Id::new().map_err(|e| io("ncclGetUniqueId", format!("{e:?}")))?;
            id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>()
        } else {
            Vec::new()
        };
        let op_timeout = cfg.op_timeout;
        let mut rv = Rendezvous::establish(world, &payload, cfg)?;
        if rv.payload.len() != NCCL_ID_BYTES {
            return Err(io(
                "NCCL bootstrap",
                format!(
                    "rank 0 sent a {}-byte payload, expected the {NCCL_ID_BYTES}-byte NCCL id",
                    rv.payload.len()
                ),
            ));
        }
        let mut internal = [0 as core::ffi::c_char; NCCL_ID_BYTES];
        for (d, s) in internal.iter_mut().zip(&rv.payload) {
            *d = *s as core::ffi::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), rank, world.world_size, Id::uninit(internal))
            .map_err(|e| io("ncclCommInitRank", format!("{e:?}")))?;
        // Everyone has a communicator before anyone issues a collective.
        rv.barrier("NCCL communicator init")?;
        Ok(Self {
            rv,
            comm: NcclComm {
                rank,
                comm: Some(comm),
                stream,
                op_timeout,
                staging: None,
            },
        })
    }
}

impl NcclComm {
    /// The stream the collectives run on (gradients must be ready on it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn comm(&self, op: &str) -> Result<&Comm, DistError> {
        self.comm.as_ref().ok_or_else(|| DistError::Io {
            rank: self.rank,
            op: op.into(),
            message: "the NCCL communicator was aborted by an earlier failure".into(),
        })
    }

    /// Sums `buf` over all ranks in place (fp32) and divides by the world size if `mean`.
    pub fn all_reduce_f32(
        &mut self,
        buf: &mut CudaSlice<f32>,
        mean: bool,
        op: &str,
    ) -> Result<(), DistError> {
        let red = if mean { ReduceOp::Avg } else { ReduceOp::Sum };
        self.comm(op)?
            .all_reduce_in_place(buf, &red)
            .map_err(|e| DistError::Io {
                rank: self.rank,
                op: op.into(),
                message: format!("ncclAllReduce: {e:?}"),
            })?;
        self.wait(op)
    }

    /// Sums host values over all ranks in place: staged into a device buffer (kept between calls,
    /// grown when needed), `ncclAllReduce` (sum) on it, copied back. The copy back is issued only
    /// after the reduction completed within the timeout, so a dead peer cannot block the host.
    pub fn all_reduce_host_sum(&mut self, data: &mut [f32], op: &str) -> Result<(), DistError> {
        let rank = self.rank;
        let cuda = |what: &str, e: cudarc::driver::DriverError| DistError::Io {
            rank,
            op: op.into(),
            message: format!("{what}: {e:?}"),
        };
        let n = data.len();
        if n == 0 {
            return Ok(());
        }
        if self.staging.as_ref().is_none_or(|b| b.len() < n) {
            self.staging = None;
            self.staging = Some(
                self.stream
                    .alloc_zeros::<f32>(n)
                    .map_err(|e| cuda("allocating the staging buffer", e))?,
            );
        }
        let mut buf = self.staging.take().expect("staging buffer allocated");
        let result = (|| {
            {
                let mut view = buf.slice_mut(0..n);
                self.stream
                    .memcpy_htod(&*data, &mut view)
                    .map_err(|e| cuda("copy to the device", e))?;
                self.comm(op)?
                    .all_reduce_in_place(&mut view, &ReduceOp::Sum)
                    .map_err(|e| DistError::Io {
                        rank,
                        op: op.into(),
                        message: format!("ncclAllReduce: {e:?}"),
                    })?;
            }
            self.wait(op)?;
            let view = buf.slice(0..n);
            self.stream
                .memcpy_dtoh(&view, &mut *data)
                .map_err(|e| cuda("copy to the host", e))?;
            self.stream
                .synchronize()
                .map_err(|e| cuda("synchronising the copy", e))
        })();
        self.staging = Some(buf);
        result
    }

    /// Replaces `buf` by rank 0's values on every rank.
    pub fn broadcast_f32(&mut self, buf: &mut CudaSlice<f32>, op: &str) -> Result<(), DistError> {
        self.comm(op)?
            .broadcast_in_place(buf, 0)
            .map_err(|e| DistError::Io {
                rank: self.rank,
                op: op.into(),
                message: format!("ncclBroadcast: {e:?}"),
            })?;
        self.wait(op)
    }

    /// Waits for the stream's work with the operation timeout; on timeout, aborts the communicator.
    fn wait(&mut self, op: &str) -> Result<(), DistError> {
        let rank = self.rank;
        let event = self.stream.record_event(None).map_err(|e| DistError::Io {
            rank,
            op: op.into(),
            message: format!("cuEventRecord: {e:?}"),
        })?;
        let start = Instant::now();
        while !event.is_complete() {
            if start.elapsed() > self.op_timeout {
                // Dropping the communicator calls ncclCommAbort, which unblocks the kernels.
                self.comm = None;
                return Err(DistError::Timeout {
                    rank,
                    op: op.into(),
                    secs: self.op_timeout.as_secs_f64(),
                    detail: "NCCL collective did not complete; communicator aborted".into(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        event.synchronize().map_err(|e| DistError::Io {
            rank,
            op: op.into(),
            message: format!("CUDA error after the collective: {e:?}"),
        })
    }
}
