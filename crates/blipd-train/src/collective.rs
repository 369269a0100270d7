//! The gradient transport through **burn-collective** 0.21 (Burn's collective library): every
//! process is one burn-collective *node* with one device, rank 0 also hosts the global
//! orchestrator, and gradient buckets are summed with its ring all-reduce (`2·(W−1)/W` of the
//! bucket bytes per link, like NCCL's ring), moving tensors peer to peer over websockets.
//!
//! [`crate::DistSync`] keeps its TCP rendezvous as the control plane (join, layout check, control
//! message, barriers, broadcasts) — the role torch's `TCPStore` plays beside NCCL — and sends the
//! gradient buckets through this link when [`crate::dist_sync::Transport::BurnCollective`] is chosen.
//!
//! **A burn-collective 0.21 bug and its workaround.** Its multi-node all-reduce ends every call with
//! a `SyncService::sync` that waits until the set of peers that reported in equals the node list,
//! then means to clear that set but clears a copy of it (`global/node/sync.rs`). The second
//! all-reduce in a process therefore waits forever (reproduced by `tests/collective.rs` before the
//! workaround: the first bucket went through, the second hung). Each call is therefore its own
//! session: register (a fresh node, fresh sync state), all-reduce, `finish_collective`. That costs a
//! few websocket handshakes per bucket: 49–62 ms per sync of a 1.1 MB bucket on 2 local processes
//! here, against 8–16 ms through the `tcp` star (docs/distributed.md); the default 25 MiB buckets
//! keep the calls few.
//!
//! burn-collective has no timeouts of its own (a dead peer blocks its calls forever), so every call
//! runs on a helper thread and is waited for with the configured collective timeout; on expiry the
//! error names this rank, the operation and the transport, and the trainer returns it (the stuck
//! helper thread dies with the process — burn-collective's state cannot be aborted, like an NCCL
//! communicator after `ncclCommAbort`).

use std::net::IpAddr;
use std::sync::mpsc;
use std::time::Duration;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_collective::{AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation};

use crate::error::{Result, TrainError};

/// How a burn-collective call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkError {
    /// No answer within the collective timeout (seconds).
    Timeout(f64),
    /// burn-collective returned an error or panicked, or the tensor could not be read back.
    Failed(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout(s) => write!(f, "timed out after {s:.1}s"),
            Self::Failed(m) => f.write_str(m),
        }
    }
}

/// burn-collective 0.21 prints two `Connecting to ws://…` lines with `println!` every time a node
/// connects to the orchestrator — here, every call (see the workaround above). While a call is in
/// flight, standard output (file descriptor 1) points at `/dev/null`; blipd itself writes nothing to
/// stdout during training (logs and progress go to stderr). `BLIPD_COLLECTIVE_STDOUT=1` keeps it.
struct StdoutMute {
    #[cfg(unix)]
    saved: Option<i32>,
}

impl StdoutMute {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use std::io::Write;
            if std::env::var_os("BLIPD_COLLECTIVE_STDOUT").is_some_and(|v| v == "1") {
                return Self { saved: None };
            }
            let _ = std::io::stdout().flush();
            // SAFETY: plain POSIX calls on file descriptors we own; on any failure nothing is
            // redirected.
            let saved = unsafe {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
                if null < 0 {
                    None
                } else {
                    let saved = libc::dup(1);
                    let ok = saved >= 0 && libc::dup2(null, 1) >= 0;
                    libc::close(null);
                    if ok {
                        Some(saved)
                    } else {
                        if saved >= 0 {
                            libc::close(saved);
                        }
                        None
                    }
                }
            };
            Self { saved }
        }
        #[cfg(not(unix))]
        Self {}
    }
}

impl Drop for StdoutMute {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(fd) = self.saved.take() {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            // SAFETY: `fd` is the duplicate of stdout made in `new`.
            unsafe {
                libc::dup2(fd, 1);
                libc::close(fd);
            }
        }
    }
}

/// Addresses of one rank's burn-collective node.
#[derive(Clone, Debug)]
pub struct CollectiveLink {
    rank: usize,
    world_size: usize,
    /// `ws://MASTER_ADDR:port` of the orchestrator (hosted by rank 0).
    orchestrator: String,
    /// `ws://<this rank's ip>:<data port>`.
    node_address: String,
    data_port: u16,
    timeout: Duration,
}

/// A port that is free on every interface now and outside the kernel's ephemeral range, so no
/// outgoing connection can take it before it is bound ([`blipd_dist::unused_port`]).
pub fn free_port() -> std::io::Result<u16> {
    blipd_dist::unused_port()
}

/// Starts burn-collective's global orchestrator on `port` on a thread of its own (a one-worker
/// tokio runtime), for the life of the process.
pub fn spawn_orchestrator(port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("burn-collective-orchestrator")
        .enable_all()
        .build()
        .map_err(|e| TrainError::Sync(format!("starting the collective orchestrator: {e}")))?;
    std::thread::Builder::new()
        .name("burn-collective-orchestrator".into())
        .spawn(move || rt.block_on(burn_collective::start_global_orchestrator(port)))
        .map_err(|e| TrainError::Sync(format!("starting the collective orchestrator: {e}")))?;
    Ok(())
}

fn ws(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("ws://[{ip}]:{port}")
    } else {
        format!("ws://{ip}:{port}")
    }
}

impl CollectiveLink {
    /// The link of `rank`: the orchestrator at `master_addr:orchestrator_port`, this node's data
    /// service at `local_ip:data_port`.
    pub fn new(
        rank: usize,
        world_size: usize,
        master_addr: &str,
        orchestrator_port: u16,
        local_ip: IpAddr,
        data_port: u16,
        timeout: Duration,
    ) -> Self {
        Self {
            rank,
            world_size,
            orchestrator: ws(master_addr, orchestrator_port),
            node_address: ws(&local_ip.to_string(), data_port),
            data_port,
            timeout,
        }
    }

    pub fn node_address(&self) -> &str {
        &self.node_address
    }

    fn config(&self) -> Result<CollectiveConfig> {
        let parse = |s: &str| {
            s.parse()
                .map_err(|e| TrainError::Sync(format!("collective address `{s}`: {e}")))
        };
        Ok(CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(self.world_size as u32)
            .with_global_address(parse(&self.orchestrator)?)
            .with_node_address(parse(&self.node_address)?)
            .with_data_service_port(self.data_port)
            .with_global_all_reduce_strategy(AllReduceStrategy::Ring))
    }

    /// Runs `f` on a helper thread and waits at most the collective timeout for it.
    fn deadline<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::result::Result<T, String> + Send + 'static,
    ) -> std::result::Result<T, LinkError> {
        let _quiet = StdoutMute::new();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("burn-collective-call".into())
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                    .unwrap_or_else(|_| Err("burn-collective panicked".into()));
                let _ = tx.send(r);
            })
            .map_err(|e| LinkError::Failed(format!("starting a collective call: {e}")))?;
        match rx.recv_timeout(self.timeout) {
            Ok(r) => r.map_err(LinkError::Failed),
            Err(_) => Err(LinkError::Timeout(self.timeout.as_secs_f64())),
        }
    }

    /// Sums `data` over all ranks in place (every rank gets the same values). The buffer travels
    /// as a `B` tensor on `device`, zero-padded to a multiple of the world size (the ring slices it
    /// into `W` equal parts).
    pub fn all_reduce_sum<B: Backend>(
        &mut self,
        data: &mut [f32],
        device: &B::Device,
    ) -> std::result::Result<(), LinkError> {
        let cfg = self
            .config()
            .map_err(|e| LinkError::Failed(e.to_string()))?;
        let w = self.world_size;
        let n = data.len();
        let padded = n.div_ceil(w).max(1) * w;
        let mut buf = Vec::with_capacity(padded);
        buf.extend_from_slice(data);
        buf.resize(padded, 0.0);
        let t: Tensor<B, 1> = Tensor::from_data(TensorData::new(buf, [padded]), device);
        let prim = t.into_primitive().tensor();
        let (id, device) = (PeerId(self.rank as u32), device.clone());
        // One session per call, the workaround for burn-collective 0.21's node sync (module docs):
        // register (a fresh node), all-reduce, finish — all inside one deadline.
        let out = self.deadline(move || {
            burn_collective::register::<B>(id, device, cfg)
                .map_err(|e| format!("registering with the orchestrator: {e:?}"))?;
            let out = burn_collective::all_reduce::<B>(id, prim, ReduceOperation::Sum)
                .map_err(|e| format!("{e:?}"))?;
            burn_collective::finish_collective::<B>(id).map_err(|e| format!("finish: {e:?}"))?;
            Ok(out)
        })?;
        let out: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(out));
        let v = out
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| LinkError::Failed(format!("reading the reduced tensor back: {e:?}")))?;
        data.copy_from_slice(&v[..n]);
        Ok(())
    }
}
