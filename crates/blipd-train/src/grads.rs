//! Gradients of the trainable parameters, accumulation, global-norm clipping, and the
//! gradient-synchronisation interface used for data parallelism.

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use crate::error::Result;
use crate::params::PathStack;

/// The gradient of one trainable parameter, flattened to 1-D (`shape` keeps the logical shape).
#[derive(Clone, Debug)]
pub struct GradEntry<B: Backend> {
    pub path: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
    pub grad: Tensor<B, 1>,
}

/// Gradients of the trainable parameters of a model, in the model's parameter order.
///
/// Parameters that received no gradient (frozen, or unused by this step) have no entry. The
/// order is deterministic (module field order), so reductions over it are reproducible.
#[derive(Clone, Debug, Default)]
pub struct GradSet<B: Backend> {
    entries: Vec<GradEntry<B>>,
}

impl<B: Backend> GradSet<B> {
    /// Extracts the gradients of `model`'s parameters from the result of `loss.backward()`.
    pub fn from_backward<AB, M>(model: &M, mut grads: AB::Gradients) -> Self
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        struct V<'a, AB: AutodiffBackend> {
            stack: PathStack,
            grads: &'a mut AB::Gradients,
            out: Vec<GradEntry<AB::InnerBackend>>,
        }
        impl<AB: AutodiffBackend> ModuleVisitor<AB> for V<'_, AB> {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.stack.enter(name);
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.stack.exit();
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
                let t = param.val();
                if let Some(g) = t.grad_remove(self.grads) {
                    let shape = g.dims().to_vec();
                    let n = shape.iter().product::<usize>();
                    self.out.push(GradEntry {
                        path: self.stack.path(),
                        id: param.id,
                        shape,
                        grad: g.reshape([n]),
                    });
                }
            }
        }
        let mut v = V::<AB> {
            stack: PathStack::default(),
            grads: &mut grads,
            out: Vec::new(),
        };
        model.visit(&mut v);
        Self { entries: v.out }
    }

    /// A set made of `entries` (in that order), e.g. gradients rebuilt after an all-reduce.
    pub fn from_entries(entries: Vec<GradEntry<B>>) -> Self {
        Self { entries }
    }

    /// The entries, in order.
    pub fn into_entries(self) -> Vec<GradEntry<B>> {
        self.entries
    }

    pub fn entries(&self) -> &[GradEntry<B>] {
        &self.entries
    }

    pub fn entries_mut(&mut self) -> &mut [GradEntry<B>] {
        &mut self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds `other` into `self` (gradient accumulation). Entries present in only one side are
    /// kept as they are; the order follows `self`, then new entries of `other`.
    pub fn accumulate(&mut self, other: GradSet<B>) {
        if self.entries.is_empty() {
            *self = other;
            return;
        }
        let index: HashMap<String, usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.clone(), i))
            .collect();
        for e in other.entries {
            match index.get(&e.path) {
                Some(&i) => {
                    let mine = &mut self.entries[i];
                    mine.grad = mine.grad.clone().add(e.grad);
                }
                None => self.entries.push(e),
            }
        }
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) {
        for e in &mut self.entries {
            e.grad = e.grad.clone().mul_scalar(factor);
        }
    }

    /// Global L2 norm of all gradients, as a 1-element tensor (no host synchronisation):
    /// the norm of the per-tensor norms, as `torch.nn.utils.clip_grad_norm_` computes it.
    pub fn global_norm(&self) -> Option<Tensor<B, 1>> {
        // One reduction per gradient on the CPU backend (f64 accumulation).
        if let Some(first) = self.entries.first() {
            let sq: Option<f64> = self
                .entries
                .iter()
                .map(|e| crate::fused::sum_squares(&e.grad))
                .sum();
            if let Some(sq) = sq {
                return Some(Tensor::from_floats(
                    [sq.sqrt() as f32],
                    &first.grad.device(),
                ));
            }
        }
        let norms: Vec<Tensor<B, 1>> = self
            .entries
            .iter()
            .map(|e| e.grad.clone().powi_scalar(2).sum().sqrt())
            .collect();
        if norms.is_empty() {
            return None;
        }
        Some(Tensor::cat(norms, 0).powi_scalar(2).sum().sqrt())
    }

    /// Clips the gradients to a global L2 norm of at most `max_norm`, as
    /// `torch.nn.utils.clip_grad_norm_(params, max_norm)` does:
    /// `g *= min(1, max_norm / (total_norm + 1e-6))`. Returns the total norm before clipping
    /// (on the device), or `None` when there are no gradients.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Option<Tensor<B, 1>> {
        let total = self.global_norm()?;
        let coef = total
            .clone()
            .add_scalar(1e-6)
            .recip()
            .mul_scalar(max_norm)
            .clamp_max(1.0);
        for e in &mut self.entries {
            e.grad = e.grad.clone().mul(coef.clone());
        }
        Some(total)
    }
}

/// Averages gradients over data-parallel ranks (DDP's all-reduce).
///
/// The trainer calls [`GradSync::sync_grads`] after the backward pass of every micro-step with
/// the gradients accumulated so far on this rank. An implementation must all-reduce-average them
/// over ranks when `is_final_micro_step` is true, and should do nothing otherwise (DDP's
/// `no_sync()`: no communication during gradient accumulation). Every rank must hold the same
/// entries in the same order; a rank missing a parameter's gradient (unused on that rank) must
/// contribute zeros for it (implementations can add zero entries before reducing).
///
/// The other methods exist so that all ranks take the same decisions: host scalars (loss,
/// metrics, grad-norm) are averaged so every rank logs and checks the same values, and the
/// barrier orders checkpoint writes (rank 0 commits after every rank has written its files).
pub trait GradSync<B: Backend> {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of data-parallel ranks.
    fn world_size(&self) -> usize;
    /// All-reduce-average the gradients when `is_final_micro_step` (see the trait docs).
    fn sync_grads(&mut self, grads: &mut GradSet<B>, is_final_micro_step: bool) -> Result<()>;
    /// All-reduce-average host scalars in place.
    fn all_reduce_mean(&mut self, values: &mut [f64]) -> Result<()>;
    /// Blocks until every rank reached this point.
    fn barrier(&mut self) -> Result<()>;
    /// Every rank's `values` (the same length on every rank), concatenated in rank order: for
    /// losses that couple samples across ranks (stage 1's ITC/ITM, LAVIS's `concat_all_gather`).
    /// Exact (no arithmetic on the values).
    fn all_gather(&mut self, values: &[f32]) -> Result<Vec<f32>> {
        if self.world_size() == 1 {
            Ok(values.to_vec())
        } else {
            Err(crate::TrainError::Sync(
                "this gradient synchronisation cannot all-gather".into(),
            ))
        }
    }
}

/// Single-process "synchronisation": rank 0 of 1, nothing to communicate.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalSync;

impl<B: Backend> GradSync<B> for LocalSync {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn sync_grads(&mut self, _grads: &mut GradSet<B>, _is_final: bool) -> Result<()> {
        Ok(())
    }
    fn all_reduce_mean(&mut self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
