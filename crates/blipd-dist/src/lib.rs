//! Data-parallel plumbing: who am I ([`World`], from torchrun's or SLURM's variables), how do the ranks
//! find each other ([`rendezvous`]: rank 0 serves on `MASTER_ADDR:MASTER_PORT`, the others connect with
//! retries and a deadline), and the control channel used for collective decisions.

pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod port;
pub mod rendezvous;
pub mod world;

pub use port::unused_port;
pub use rendezvous::{Rendezvous, RendezvousConfig};
pub use world::{Launcher, World};

/// Errors of the distributed layer; each names the rank and the operation involved.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("environment variable {var}={value:?}: {message}")]
    Env {
        var: String,
        value: String,
        message: String,
    },
    #[error("rank {rank}: {op} failed: {message}")]
    Io {
        rank: usize,
        op: String,
        message: String,
    },
    #[error("rank {rank}: {op} timed out after {secs:.1}s ({detail})")]
    Timeout {
        rank: usize,
        op: String,
        secs: f64,
        detail: String,
    },
    #[error("rendezvous rejected rank {rank}: {message}")]
    Rejected { rank: usize, message: String },
}
