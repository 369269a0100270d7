//! Noise schedulers: DDPM (training), PNDM/PLMS and DDIM (sampling, inversion).
//!
//! Each scheduler mirrors its diffusers 0.33.1 counterpart (`scheduling_{ddpm,pndm,ddim}.py`) number
//! for number: configs use the field names of diffusers' `scheduler_config.json` (and read such a file,
//! also one written for another scheduler class, as `from_config` does), timestep lists are identical,
//! and the β / ᾱ tables are computed the way torch computes them in float32 on the CPU:
//!
//! - `torch.linspace(a, b, n, dtype=float32)` evaluates `a + step·i` (first half) and `b − step·(n−1−i)`
//!   (second half) with one rounding (fused multiply-add), `step = (b − a) / (n − 1)` in f32;
//! - `torch.cumprod` on a float32 CPU tensor accumulates in **f64** and rounds each output to f32.
//!
//! Per-step coefficients are computed in f32 in the same order as diffusers' 0-dim float32 tensor
//! arithmetic, so trajectories match the reference to a few ulps.
//!
//! Timesteps are `usize` (diffusers' int64 timesteps are never negative); a negative "previous
//! timestep" selects the scheduler's final ᾱ.

pub mod ddim;
pub mod ddpm;
pub mod pndm;

pub use ddim::{DdimScheduler, DdimSchedulerConfig, DdimStepOutput};
pub use ddpm::{DdpmScheduler, DdpmSchedulerConfig, DdpmStepOutput, VarianceType};
pub use pndm::{PndmScheduler, PndmSchedulerConfig};

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::ModelError;

/// How β_t is laid out over the training timesteps (diffusers `beta_schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)`.
    Linear,
    /// `linspace(√beta_start, √beta_end, T)²` (Stable Diffusion / BLIP-Diffusion).
    ScaledLinear,
    /// Glide cosine schedule (`betas_for_alpha_bar`, max β 0.999).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    /// `sigmoid(linspace(-6, 6, T))·(end − start) + start` (DDPM only in diffusers).
    Sigmoid,
}

/// How inference timesteps are spread over the training range (diffusers `timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `t_i = i·(T // N) + steps_offset`.
    Leading,
    /// `round(linspace(0, T − 1, N))`.
    Linspace,
    /// `round(arange(T, 0, −T/N)) − 1`.
    Trailing,
}

/// What the denoising network predicts (diffusers `prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise ε.
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀ (Imagen Video §2.4).
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

/// The training-time noise schedule shared by all schedulers: β, α = 1 − β and ᾱ = ∏α, in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct NoiseSchedule {
    pub betas: Vec<f32>,
    pub alphas: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// Build β from a schedule (or from `trained_betas`), optionally rescaled to zero terminal SNR
    /// (Lin et al. 2023, Algorithm 1), then α and ᾱ.
    pub fn new(
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
        beta_schedule: BetaSchedule,
        trained_betas: Option<&[f64]>,
        rescale_betas_zero_snr: bool,
    ) -> Result<Self, ModelError> {
        if num_train_timesteps == 0 {
            return Err(ModelError::Invalid(
                "scheduler: num_train_timesteps must be > 0".into(),
            ));
        }
        let mut betas: Vec<f32> = match trained_betas {
            Some(tb) => {
                if tb.len() != num_train_timesteps {
                    return Err(ModelError::Invalid(format!(
                        "scheduler: trained_betas has {} values, num_train_timesteps is {num_train_timesteps}",
                        tb.len()
                    )));
                }
                tb.iter().map(|&b| b as f32).collect()
            }
            None => match beta_schedule {
                BetaSchedule::Linear => {
                    torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
                }
                BetaSchedule::ScaledLinear => {
                    torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), num_train_timesteps)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => {
                    betas_for_alpha_bar_cosine(num_train_timesteps, 0.999)
                }
                BetaSchedule::Sigmoid => {
                    let (range, start) = ((beta_end - beta_start) as f32, beta_start as f32);
                    torch_linspace_f32(-6.0, 6.0, num_train_timesteps)
                        .into_iter()
                        .map(|x| (1.0 / (1.0 + (-x).exp())) * range + start)
                        .collect()
                }
            },
        };
        if rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod_f32(&alphas);
        Ok(Self {
            betas,
            alphas,
            alphas_cumprod,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// ᾱ_t, with an error naming the valid range when `t` is out of it.
    pub fn alpha_cumprod(&self, t: usize) -> Result<f32, ModelError> {
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            ModelError::Invalid(format!(
                "scheduler: timestep {t} out of range 0..{}",
                self.alphas_cumprod.len()
            ))
        })
    }

    /// `√ᾱ_t·x₀ + √(1 − ᾱ_t)·ε` with one timestep per sample (`timesteps`: shape `[B]`, `B` = dim 0 of
    /// `original_samples`). Timesteps must lie in `0..num_train_timesteps` (not checked on the device).
    pub fn add_noise<B: Backend, const D: usize>(
        &self,
        original_samples: Tensor<B, D>,
        noise: Tensor<B, D>,
        timesteps: Tensor<B, 1, Int>,
    ) -> Tensor<B, D> {
        let (sqrt_a, sqrt_1ma) = self.per_sample_coeffs::<B, D>(&original_samples, timesteps);
        sqrt_a * original_samples + sqrt_1ma * noise
    }

    /// The v-prediction target `√ᾱ_t·ε − √(1 − ᾱ_t)·x₀` (per-sample timesteps as in [`Self::add_noise`]).
    pub fn get_velocity<B: Backend, const D: usize>(
        &self,
        sample: Tensor<B, D>,
        noise: Tensor<B, D>,
        timesteps: Tensor<B, 1, Int>,
    ) -> Tensor<B, D> {
        let (sqrt_a, sqrt_1ma) = self.per_sample_coeffs::<B, D>(&sample, timesteps);
        sqrt_a * noise - sqrt_1ma * sample
    }

    /// `(√ᾱ_t, √(1 − ᾱ_t))` gathered per sample, shaped `[B, 1, …, 1]` to broadcast against `like`.
    fn per_sample_coeffs<B: Backend, const D: usize>(
        &self,
        like: &Tensor<B, D>,
        timesteps: Tensor<B, 1, Int>,
    ) -> (Tensor<B, D>, Tensor<B, D>) {
        let device = like.device();
        let table = Tensor::<B, 1>::from_data(
            TensorData::new(self.alphas_cumprod.clone(), [self.alphas_cumprod.len()]),
            &device,
        )
        .cast(like.dtype());
        let b = timesteps.dims()[0];
        let a = table.select(0, timesteps);
        let mut shape = [1usize; D];
        shape[0] = b;
        let sqrt_a = a.clone().sqrt().reshape(shape);
        let sqrt_1ma = a.neg().add_scalar(1.0).sqrt().reshape(shape);
        (sqrt_a, sqrt_1ma)
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` bit for bit (CPU kernel): the endpoints are
/// rounded to f32, `step = (end − start)/(steps − 1)` in f32, the first half counts up from `start` and
/// the second half down from `end`, each value with a single rounding.
pub fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    match steps {
        0 => vec![],
        1 => vec![s],
        _ => {
            let step = (e - s) / (steps - 1) as f32;
            let half = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < half {
                        step.mul_add(i as f32, s)
                    } else {
                        (-step).mul_add((steps - 1 - i) as f32, e)
                    }
                })
                .collect()
        }
    }
}

/// `torch.cumprod` of a float32 CPU tensor: f64 accumulator, each output rounded to f32.
pub fn cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    x.iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers `betas_for_alpha_bar(T, max_beta, "cosine")` (computed in f64 by Python, stored in f32).
fn betas_for_alpha_bar_cosine(n: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// diffusers `rescale_zero_terminal_snr`, in f32 like its torch original.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt: Vec<f32> = cumprod_f32(&alphas).into_iter().map(f32::sqrt).collect();
    let (s0, st) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = s0 / (s0 - st);
    for v in &mut sqrt {
        *v = (*v - st) * scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// The ascending base grid `_timesteps` of diffusers' `set_timesteps` for `leading` and `linspace`
/// spacing, and the **descending** grid for `trailing` (as numpy produces it before any reversal).
/// `steps_offset` applies to `leading` only, as in diffusers.
pub(crate) fn base_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Vec<i64> {
    let t = num_train_timesteps as i64;
    let n = num_inference_steps;
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = t / n as i64;
            (0..n as i64)
                .map(|i| i * ratio + steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Linspace => {
            // np.linspace(0, T-1, n): i·step + 0, last element set to T-1 exactly.
            let stop = (num_train_timesteps - 1) as f64;
            let mut v: Vec<f64> = if n > 1 {
                let step = stop / (n - 1) as f64;
                (0..n).map(|i| i as f64 * step).collect()
            } else {
                vec![0.0; n]
            };
            if n > 1 {
                v[n - 1] = stop;
            }
            v.into_iter().map(|x| x.round_ties_even() as i64).collect()
        }
        TimestepSpacing::Trailing => {
            // np.arange(T, 0, -T/n) in f64: length ceil(-T / -r); values start, start+step, then
            // start + i·delta with delta = (start + step) − start (numpy's fill), then np.round − 1.
            let start = num_train_timesteps as f64;
            let step = -(num_train_timesteps as f64 / n as f64);
            let len = ((0.0 - start) / step).ceil().max(0.0) as usize;
            let delta = (start + step) - start;
            (0..len)
                .map(|i| match i {
                    0 => start,
                    1 => start + step,
                    _ => start + i as f64 * delta,
                })
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect()
        }
    }
}

/// Diffusers' inference timesteps in denoising order (descending), shared by DDIM and DDPM.
pub(crate) fn descending_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Vec<i64> {
    let mut v = base_timesteps(
        spacing,
        num_train_timesteps,
        num_inference_steps,
        steps_offset,
    );
    if spacing != TimestepSpacing::Trailing {
        v.reverse();
    }
    v
}

/// Check a timestep list against the training range and convert it to `usize`.
pub(crate) fn checked_timesteps(
    v: Vec<i64>,
    num_train_timesteps: usize,
    what: &str,
) -> Result<Vec<usize>, ModelError> {
    v.into_iter()
        .map(|t| {
            if t < 0 || t as usize >= num_train_timesteps {
                Err(ModelError::Invalid(format!(
                    "{what}: timestep {t} outside 0..{num_train_timesteps} (check steps_offset / \
                     num_inference_steps)"
                )))
            } else {
                Ok(t as usize)
            }
        })
        .collect()
}

pub(crate) fn check_num_steps(
    num_inference_steps: usize,
    num_train_timesteps: usize,
    what: &str,
) -> Result<(), ModelError> {
    if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
        return Err(ModelError::Invalid(format!(
            "{what}: num_inference_steps must be in 1..={num_train_timesteps}, got {num_inference_steps}"
        )));
    }
    Ok(())
}

pub(crate) mod defaults {
    pub fn num_train_timesteps() -> usize {
        1000
    }
    pub fn beta_start() -> f64 {
        0.0001
    }
    pub fn beta_end() -> f64 {
        0.02
    }
    pub fn beta_schedule() -> super::BetaSchedule {
        super::BetaSchedule::Linear
    }
    pub fn prediction_type() -> super::PredictionType {
        super::PredictionType::Epsilon
    }
    pub fn timestep_spacing() -> super::TimestepSpacing {
        super::TimestepSpacing::Leading
    }
    pub fn yes() -> bool {
        true
    }
    pub fn dynamic_thresholding_ratio() -> f64 {
        0.995
    }
    pub fn one() -> f64 {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_grids_match_numpy_examples() {
        use TimestepSpacing::*;
        assert_eq!(base_timesteps(Leading, 1000, 4, 1), vec![1, 251, 501, 751]);
        assert_eq!(base_timesteps(Linspace, 1000, 4, 0), vec![0, 333, 666, 999]);
        assert_eq!(base_timesteps(Linspace, 1000, 1, 0), vec![0]);
        // np.round(np.arange(1000, 0, -1000/3)) - 1 = [999, 666, 332]
        assert_eq!(base_timesteps(Trailing, 1000, 3, 0), vec![999, 666, 332]);
        assert_eq!(base_timesteps(Trailing, 1000, 1, 0), vec![999]);
    }

    #[test]
    fn linspace_endpoints_and_cumprod() {
        let v = torch_linspace_f32(0.1, 0.9, 5);
        assert_eq!(v[0], 0.1f32);
        assert_eq!(v[4], 0.9f32);
        assert_eq!(cumprod_f32(&[0.5, 0.5, 2.0]), vec![0.5, 0.25, 0.5]);
    }
}
