//! The data-parallel settings: `[dist]` of a run config and their environment overrides, and the
//! gradient transports.

use std::time::Duration;

use blipd_dist::RendezvousConfig;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Collective timeout in seconds (overrides [`DistConfig::collective_timeout_s`]).
pub const ENV_COLLECTIVE_TIMEOUT: &str = "BLIPD_COLLECTIVE_TIMEOUT_S";
/// Rendezvous (join) timeout in seconds.
pub const ENV_JOIN_TIMEOUT: &str = "BLIPD_JOIN_TIMEOUT_S";
/// Gradient bucket size in MiB.
pub const ENV_BUCKET_MB: &str = "BLIPD_BUCKET_MB";
/// `1`/`true`: round gradients to bf16 for the all-reduce.
pub const ENV_GRAD_BF16: &str = "BLIPD_GRAD_BF16";
/// Gradient transport: `tcp` or `burn-collective`.
pub const ENV_GRAD_TRANSPORT: &str = "BLIPD_GRAD_TRANSPORT";

/// What carries the gradient buckets (the control plane — join, layout check, control message,
/// barriers, broadcasts — is always the TCP rendezvous).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// burn-collective 0.21's ring all-reduce between processes (see [`crate::collective`]):
    /// `2·(W−1)/W` of the bucket bytes per link. Opt-in: slower than the star at CPU scale and one
    /// of its calls once hung in CI (docs/distributed.md).
    BurnCollective,
    /// The rendezvous star: rank 0 sums in rank order and sends the sum back (bit-identical and
    /// order-deterministic, but rank 0's link carries `2·(W−1)` times the bytes). The default.
    #[default]
    Tcp,
    /// NCCL on GPU `LOCAL_RANK` (blipd built with the `nccl` feature): rank 0 makes the NCCL id and
    /// sends it in the rendezvous payload; each bucket is staged to the device, `ncclAllReduce`d
    /// and copied back. With `WORLD_SIZE=1` set explicitly it still runs (a world of one), so the
    /// path can be checked on a single GPU.
    Nccl,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "burn-collective" | "burn_collective" | "collective" => Ok(Self::BurnCollective),
            "tcp" => Ok(Self::Tcp),
            "nccl" => Ok(Self::Nccl),
            _ => Err(format!(
                "`{s}`: expected `burn-collective`, `tcp` or `nccl`"
            )),
        }
    }
}

/// Settings of the data-parallel path. Every field can be overridden from the environment
/// ([`DistConfig::with_env`]); the defaults follow PyTorch DDP where it has one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistConfig {
    /// Gradient bucket size in MiB (DDP's `bucket_cap_mb`, 25). Env `BLIPD_BUCKET_MB`.
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// Round gradients to bf16 before the all-reduce and the averaged result to bf16 after it (DDP's
    /// `bf16_compress_hook`). Precision cost: bf16 keeps 8 significant bits, so each value is off by
    /// up to 2⁻⁹ ≈ 0.2 % relative before the sum and again after it (an NCCL ring that adds in bf16
    /// rounds at each of its `W−1` hops). Only worth it where the link is the bottleneck: it halves
    /// the bytes on the NCCL path; on this TCP path values still travel as f32, so it only emulates
    /// the precision (for testing a bf16 run's numerics on the CPU). Env `BLIPD_GRAD_BF16`.
    #[serde(default)]
    pub bf16_grads: bool,
    /// Timeout of one collective operation, seconds (PyTorch's process-group timeout is 10–30 min).
    /// A rank that waits longer for a peer aborts with an error naming the peer and the operation.
    /// Env `BLIPD_COLLECTIVE_TIMEOUT_S`.
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout_s: f64,
    /// How long rank 0 waits for all ranks to join, and others retry connecting. Env
    /// `BLIPD_JOIN_TIMEOUT_S`.
    #[serde(default = "default_join_timeout")]
    pub join_timeout_s: f64,
    /// What carries the gradient buckets. Env `BLIPD_GRAD_TRANSPORT` (`tcp`, the default |
    /// `burn-collective` | `nccl`).
    #[serde(default)]
    pub transport: Transport,
}

fn default_bucket_mb() -> f64 {
    25.0
}
fn default_collective_timeout() -> f64 {
    600.0
}
fn default_join_timeout() -> f64 {
    300.0
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            bucket_mb: default_bucket_mb(),
            bf16_grads: false,
            collective_timeout_s: default_collective_timeout(),
            join_timeout_s: default_join_timeout(),
            transport: Transport::default(),
        }
    }
}

impl DistConfig {
    /// The defaults, overridden by the `BLIPD_*` environment variables.
    pub fn from_env() -> Result<Self> {
        Self::default().with_env()
    }

    /// `self` overridden by the `BLIPD_*` environment variables that are set.
    pub fn with_env(self) -> Result<Self> {
        self.with_vars(|k| std::env::var(k).ok())
    }

    /// `self` overridden by the variables `get` returns (testable form of [`DistConfig::with_env`]).
    pub fn with_vars(mut self, get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |var: &str| -> Result<Option<f64>> {
            match get(var) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<f64>() {
                    Ok(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                    _ => Err(TrainError::Sync(format!(
                        "environment variable {var}={v:?}: expected a positive number"
                    ))),
                },
            }
        };
        if let Some(x) = num(ENV_COLLECTIVE_TIMEOUT)? {
            self.collective_timeout_s = x;
        }
        if let Some(x) = num(ENV_JOIN_TIMEOUT)? {
            self.join_timeout_s = x;
        }
        if let Some(x) = num(ENV_BUCKET_MB)? {
            self.bucket_mb = x;
        }
        if let Some(v) = get(ENV_GRAD_BF16) {
            self.bf16_grads = match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => true,
                "0" | "false" | "no" | "off" | "" => false,
                _ => {
                    return Err(TrainError::Sync(format!(
                        "environment variable {ENV_GRAD_BF16}={v:?}: expected 0/1/true/false"
                    )))
                }
            };
        }
        if let Some(v) = get(ENV_GRAD_TRANSPORT) {
            self.transport = v.parse().map_err(|e| {
                TrainError::Sync(format!("environment variable {ENV_GRAD_TRANSPORT}: {e}"))
            })?;
        }
        self.validate()?;
        Ok(self)
    }

    /// Rejects values that cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64| {
            Err(TrainError::Sync(format!(
                "dist config: {what} = {v} must be a positive number"
            )))
        };
        if !(self.bucket_mb.is_finite() && self.bucket_mb > 0.0) {
            return bad("bucket_mb", self.bucket_mb);
        }
        if !(self.collective_timeout_s.is_finite() && self.collective_timeout_s > 0.0) {
            return bad("collective_timeout_s", self.collective_timeout_s);
        }
        if !(self.join_timeout_s.is_finite() && self.join_timeout_s > 0.0) {
            return bad("join_timeout_s", self.join_timeout_s);
        }
        Ok(())
    }

    /// The rendezvous deadlines.
    pub fn rendezvous(&self) -> RendezvousConfig {
        RendezvousConfig {
            join_timeout: Duration::from_secs_f64(self.join_timeout_s),
            op_timeout: Duration::from_secs_f64(self.collective_timeout_s),
        }
    }

    /// Bucket capacity in f32 elements (at least 1).
    pub fn bucket_elems(&self) -> usize {
        ((self.bucket_mb * 1024.0 * 1024.0 / 4.0) as usize).max(1)
    }
}
