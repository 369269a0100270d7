//! AdamW with PyTorch semantics (`torch.optim.AdamW`, single-tensor path), written over the
//! flat gradients of a [`GradSet`] so that its state is keyed by parameter path and can be
//! checkpointed exactly.
//!
//! Burn 0.21's own `AdamW` decays every parameter alike (no per-parameter groups in 0.21),
//! defaults to ε = 1e-5 and weight decay 1e-4, and computes the bias corrections in f32; this
//! one follows PyTorch: per step `t` of each parameter,
//!
//! ```text
//! p ← p · (1 − lr·wd)                     (only where decay applies, see below)
//! m ← m + (g − m)·(1 − β1)                (torch.lerp)
//! v ← v·β2 + g·(1 − β2)·g                 (torch.addcmul)
//! p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)
//! ```
//!
//! with the bias corrections in f64 on the host. Weight decay applies to parameters with at
//! least `decay_min_ndim` dimensions (2 by default: matrices, convolutions, embeddings; not
//! biases or norm scales — LAVIS's rule) whose path contains none of `no_decay`. Parameters
//! without a gradient this step are left alone and their step count does not advance.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{AutodiffModule, ModuleMapper, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::grads::GradSet;
use crate::params::{param_infos, view_to_data, write_tensors, PathStack, TensorFile};

/// AdamW hyper-parameters (PyTorch defaults, except the weight-decay rule).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Peak learning rate (the schedule scales it).
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay (PyTorch AdamW default 0.01).
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// Weight decay only on parameters with at least this many dimensions.
    #[serde(default = "default_decay_min_ndim")]
    pub decay_min_ndim: usize,
    /// No weight decay on parameters whose path contains one of these substrings.
    #[serde(default)]
    pub no_decay: Vec<String>,
    /// Global-norm gradient clipping (`clip_grad_norm_`); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// On a non-finite loss or gradient norm: skip the update with a warning (true) or stop
    /// with an error (false, default).
    #[serde(default)]
    pub skip_nonfinite: bool,
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_wd() -> f64 {
    0.01
}
fn default_decay_min_ndim() -> usize {
    2
}

impl AdamWConfig {
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: default_wd(),
            decay_min_ndim: default_decay_min_ndim(),
            no_decay: Vec::new(),
            max_grad_norm: None,
            skip_nonfinite: false,
        }
    }

    /// Whether weight decay applies to the parameter at `path` with `ndim` dimensions.
    pub fn decays(&self, path: &str, ndim: usize) -> bool {
        self.weight_decay != 0.0
            && ndim >= self.decay_min_ndim
            && !self.no_decay.iter().any(|s| path.contains(s.as_str()))
    }
}

/// Per-parameter state.
#[derive(Clone, Debug)]
pub struct AdamWParamState<B: Backend> {
    pub step: u64,
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
}

/// AdamW over a [`GradSet`]; `B` is the inner (non-autodiff) backend.
#[derive(Clone, Debug)]
pub struct AdamW<B: Backend> {
    config: AdamWConfig,
    state: BTreeMap<String, AdamWParamState<B>>,
}

const FORMAT: &str = "blipd-adamw-1";
const META_KEY: &str = "blipd_adamw";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptimHeader {
    format: String,
    /// Update count of each parameter.
    steps: BTreeMap<String, u64>,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            state: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Replaces the hyper-parameters (e.g. a changed config on resume); the state is kept.
    pub fn set_config(&mut self, config: AdamWConfig) {
        self.config = config;
    }

    pub fn state(&self) -> &BTreeMap<String, AdamWParamState<B>> {
        &self.state
    }

    /// One update of `model` with learning rate `lr` from `grads` (gradients of `model`).
    pub fn step<AB, M>(&mut self, model: M, grads: &GradSet<B>, lr: f64) -> M
    where
        AB: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<AB>,
    {
        let by_id: HashMap<ParamId, usize> = grads
            .entries()
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id, i))
            .collect();
        let mut mapper = StepMapper::<B> {
            stack: PathStack::default(),
            optim: self,
            grads,
            by_id,
            lr,
        };
        model.map(&mut mapper)
    }

    fn update(
        &mut self,
        path: &str,
        ndim: usize,
        param: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        lr: f64,
    ) -> Tensor<B, 1> {
        let c = &self.config;
        let [beta1, beta2] = c.betas;
        let decay = c.decays(path, ndim);
        let st = self
            .state
            .entry(path.to_string())
            .or_insert_with(|| AdamWParamState {
                step: 0,
                exp_avg: grad.zeros_like(),
                exp_avg_sq: grad.zeros_like(),
            });
        st.step += 1;
        let t = st.step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2 = 1.0 - beta2.powi(t);
        let step_size = lr / bias_correction1;
        let scalars = crate::fused::AdamWScalars {
            decay: decay.then_some((1.0 - lr * c.weight_decay) as f32),
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            sqrt_bias_correction2: bias_correction2.sqrt() as f32,
            eps: c.eps as f32,
            step_size: step_size as f32,
        };
        // The moments move out of the state (an empty placeholder for the moment) so that the
        // fused path owns them and updates them in place.
        let device = grad.device();
        let moments = (
            param,
            std::mem::replace(&mut st.exp_avg, Tensor::empty([0], &device)),
            std::mem::replace(&mut st.exp_avg_sq, Tensor::empty([0], &device)),
        );
        let param = match crate::fused::adamw(moments, &grad, scalars) {
            Ok((p, m, v)) => {
                st.exp_avg = m;
                st.exp_avg_sq = v;
                return p;
            }
            Err((p, m, v)) => {
                st.exp_avg = m;
                st.exp_avg_sq = v;
                p
            }
        };
        let param = if decay {
            param.mul_scalar(1.0 - lr * c.weight_decay)
        } else {
            param
        };
        let m = st.exp_avg.clone();
        st.exp_avg = m.clone().add(grad.clone().sub(m).mul_scalar(1.0 - beta1));
        st.exp_avg_sq = st
            .exp_avg_sq
            .clone()
            .mul_scalar(beta2)
            .add(grad.clone().mul_scalar(1.0 - beta2).mul(grad));
        let denom = st
            .exp_avg_sq
            .clone()
            .sqrt()
            .div_scalar(bias_correction2.sqrt())
            .add_scalar(c.eps);
        param.sub(st.exp_avg.clone().div(denom).mul_scalar(step_size))
    }

    /// Writes the state to a safetensors file: `exp_avg.<path>` and `exp_avg_sq.<path>` with the
    /// parameter shapes, and the per-parameter step counts in the header metadata.
    pub fn save(&self, path: &Path, shapes: &HashMap<String, Vec<usize>>) -> Result<()> {
        let mut tensors = Vec::with_capacity(self.state.len() * 2);
        let mut steps = BTreeMap::new();
        for (p, st) in &self.state {
            let shape = shapes
                .get(p)
                .cloned()
                .unwrap_or_else(|| st.exp_avg.dims().to_vec());
            tensors.push((format!("exp_avg.{p}"), st.exp_avg.clone(), shape.clone()));
            tensors.push((format!("exp_avg_sq.{p}"), st.exp_avg_sq.clone(), shape));
            steps.insert(p.clone(), st.step);
        }
        // One metadata key: safetensors keeps the header map in a HashMap, so a single key
        // keeps the file bytes (and checksums) reproducible.
        let header = OptimHeader {
            format: FORMAT.to_string(),
            steps,
        };
        let mut meta = BTreeMap::new();
        meta.insert(
            META_KEY.to_string(),
            serde_json::to_string(&header).expect("header serialises"),
        );
        write_tensors(path, tensors, meta)
    }

    /// Loads state written by [`AdamW::save`]; every entry must name a parameter of `model`
    /// with the same number of elements.
    pub fn load<MB: Backend, M: burn::module::Module<MB>>(
        &mut self,
        path: &Path,
        model: &M,
        device: &B::Device,
    ) -> Result<()> {
        let file = TensorFile::read(path)?;
        let meta = file.metadata()?;
        let bad = |message: String| TrainError::StateMismatch {
            path: path.to_path_buf(),
            message,
        };
        let header: OptimHeader = serde_json::from_str(meta.get(META_KEY).ok_or_else(|| {
            bad(format!(
                "not an optimizer state file (no `{META_KEY}` metadata)"
            ))
        })?)
        .map_err(|e| bad(format!("bad `{META_KEY}` metadata: {e}")))?;
        if header.format != FORMAT {
            return Err(bad(format!(
                "optimizer state format `{}`, expected `{FORMAT}`",
                header.format
            )));
        }
        let steps = header.steps;
        let numels: HashMap<String, usize> = param_infos(model)
            .into_iter()
            .map(|i| (i.path.clone(), i.numel()))
            .collect();
        let st = file.parse()?;
        let mut state = BTreeMap::new();
        for (p, step) in steps {
            let Some(&numel) = numels.get(&p) else {
                return Err(bad(format!(
                    "state for `{p}`, which the model does not have"
                )));
            };
            let load = |prefix: &str| -> Result<Tensor<B, 1>> {
                let key = format!("{prefix}.{p}");
                let view = st.tensor(&key).map_err(|e| bad(format!("`{key}`: {e}")))?;
                let data = view_to_data(path, &key, &view)?;
                if data.num_elements() != numel {
                    return Err(bad(format!(
                        "`{key}` has {} elements, the parameter {numel}",
                        data.num_elements()
                    )));
                }
                Ok(Tensor::<B, 1>::from_data(
                    burn::tensor::TensorData::from_bytes_vec(
                        data.as_bytes().to_vec(),
                        [numel],
                        data.dtype,
                    ),
                    (device, data.dtype),
                ))
            };
            let exp_avg = load("exp_avg")?;
            let exp_avg_sq = load("exp_avg_sq")?;
            state.insert(
                p,
                AdamWParamState {
                    step,
                    exp_avg,
                    exp_avg_sq,
                },
            );
        }
        self.state = state;
        Ok(())
    }
}

struct StepMapper<'a, B: Backend> {
    stack: PathStack,
    optim: &'a mut AdamW<B>,
    grads: &'a GradSet<B>,
    by_id: HashMap<ParamId, usize>,
    lr: f64,
}

impl<AB, B> ModuleMapper<AB> for StepMapper<'_, B>
where
    B: Backend,
    AB: AutodiffBackend<InnerBackend = B>,
{
    fn enter_module(&mut self, name: &str, _: &str) {
        self.stack.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(&i) = self.by_id.get(&id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let entry = &self.grads.entries()[i];
        let require_grad = tensor.is_require_grad();
        let dims = tensor.dims();
        let n = dims.iter().product::<usize>();
        let flat = tensor.inner().reshape([n]);
        let path = self.stack.path();
        let updated = self
            .optim
            .update(&path, D, flat, entry.grad.clone(), self.lr)
            .reshape(dims);
        let mut out = Tensor::<AB, D>::from_inner(updated);
        if require_grad {
            out = out.require_grad();
        }
        Param::from_mapped_value(id, out, mapper)
    }
}
