//! Exponential moving average of the trainable weights, with diffusers `EMAModel` semantics.
//!
//! Per optimizer step `n` (counted from 1): `k = max(0, n − update_after_step − 1)`;
//! decay = 0 when `k = 0`, else `min(decay_max, (1 + k)/(10 + k))` (or, with `use_warmup`,
//! `1 − (1 + k/inv_gamma)^−power`), floored at `min_decay`; then
//! `ema ← ema − (1 − decay)·(ema − param)` for trainable parameters and `ema ← param` for
//! the others. The EMA copy lives on the inner backend and never receives gradients.

use std::collections::HashMap;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::params::{flat_params, param_infos, PathStack};

/// `[ema]` of a run config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Upper bound of the decay (diffusers `decay`, default 0.9999).
    #[serde(default = "default_decay")]
    pub decay: f64,
    #[serde(default)]
    pub min_decay: f64,
    #[serde(default)]
    pub update_after_step: u64,
    #[serde(default)]
    pub use_warmup: bool,
    #[serde(default = "one")]
    pub inv_gamma: f64,
    #[serde(default = "default_power")]
    pub power: f64,
}

fn default_decay() -> f64 {
    0.9999
}
fn one() -> f64 {
    1.0
}
fn default_power() -> f64 {
    2.0 / 3.0
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            decay: default_decay(),
            min_decay: 0.0,
            update_after_step: 0,
            use_warmup: false,
            inv_gamma: 1.0,
            power: default_power(),
        }
    }
}

impl EmaConfig {
    /// Decay used at optimizer step `optimization_step` (1-based), as `EMAModel.get_decay`.
    pub fn decay_at(&self, optimization_step: u64) -> f64 {
        let k = optimization_step.saturating_sub(self.update_after_step + 1);
        if k == 0 {
            return 0.0;
        }
        let k = k as f64;
        let d = if self.use_warmup {
            1.0 - (1.0 + k / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + k) / (10.0 + k)
        };
        d.min(self.decay).max(self.min_decay)
    }
}

/// EMA weights of a model whose inner-backend module type is `M`.
#[derive(Clone, Debug)]
pub struct Ema<B: Backend, M: Module<B>> {
    pub config: EmaConfig,
    model: Option<M>,
    /// Number of updates applied (diffusers `optimization_step`).
    pub optimization_step: u64,
    _b: std::marker::PhantomData<B>,
}

impl<B: Backend, M: Module<B>> Ema<B, M> {
    /// Starts the EMA from the current weights of `online`.
    pub fn new<AB, AM>(config: EmaConfig, online: &AM) -> Self
    where
        AB: AutodiffBackend<InnerBackend = B>,
        AM: AutodiffModule<AB, InnerModule = M>,
    {
        Self {
            config,
            model: Some(online.valid()),
            optimization_step: 0,
            _b: std::marker::PhantomData,
        }
    }

    /// One EMA update from the online model (call after each optimizer step).
    pub fn update<AB, AM>(&mut self, online: &AM)
    where
        AB: AutodiffBackend<InnerBackend = B>,
        AM: AutodiffModule<AB, InnerModule = M>,
    {
        self.optimization_step += 1;
        let decay = self.config.decay_at(self.optimization_step);
        let trainable: HashMap<String, bool> = param_infos(online)
            .into_iter()
            .map(|i| (i.path, i.trainable))
            .collect();
        let current: HashMap<String, Tensor<B, 1>> =
            flat_params(&online.valid()).into_iter().collect();
        struct U<'a, B: Backend> {
            stack: PathStack,
            trainable: &'a HashMap<String, bool>,
            current: &'a HashMap<String, Tensor<B, 1>>,
            one_minus_decay: f64,
        }
        impl<B: Backend> ModuleMapper<B> for U<'_, B> {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.stack.enter(name);
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.stack.exit();
            }
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let (id, ema, mapper) = param.consume();
                let path = self.stack.path();
                let Some(cur) = self.current.get(&path) else {
                    return Param::from_mapped_value(id, ema, mapper);
                };
                let dims = ema.dims();
                let cur = cur.clone().reshape(dims);
                let new = if self.trainable.get(&path).copied().unwrap_or(false) {
                    ema.clone()
                        .sub(ema.sub(cur).mul_scalar(self.one_minus_decay))
                } else {
                    cur
                };
                Param::from_mapped_value(id, new, mapper)
            }
        }
        let mut u = U::<B> {
            stack: PathStack::default(),
            trainable: &trainable,
            current: &current,
            one_minus_decay: 1.0 - decay,
        };
        // Take the EMA module out so its old tensors are freed as they are replaced.
        let old = self.model.take().expect("EMA model present");
        self.model = Some(old.map(&mut u));
    }

    /// The EMA weights.
    pub fn model(&self) -> &M {
        self.model.as_ref().expect("EMA model present")
    }

    /// Replaces the EMA weights (e.g. loaded from a checkpoint).
    pub fn set_model(&mut self, model: M) {
        self.model = Some(model);
    }

    /// Consumes the EMA, returning its weights.
    pub fn into_model(self) -> M {
        self.model.expect("EMA model present")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_matches_diffusers() {
        let c = EmaConfig::default();
        assert_eq!(c.decay_at(1), 0.0);
        assert!((c.decay_at(2) - 2.0 / 11.0).abs() < 1e-15);
        assert!((c.decay_at(101) - 101.0 / 110.0).abs() < 1e-15);
        assert_eq!(c.decay_at(10_000_000), 0.9999);
        let w = EmaConfig {
            use_warmup: true,
            update_after_step: 5,
            ..EmaConfig::default()
        };
        assert_eq!(w.decay_at(6), 0.0);
        assert!((w.decay_at(8) - (1.0 - 3f64.powf(-2.0 / 3.0))).abs() < 1e-15);
    }
}
