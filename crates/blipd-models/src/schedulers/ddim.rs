//! DDIM scheduler (Song et al. 2021), as diffusers 0.33.1 `DDIMScheduler`, plus the DDIM
//! **inversion** step LAVIS uses for real-image editing (`BlipDiffusion._noise_latent_step`,
//! model.md §5.2).
//!
//! Dynamic thresholding (`thresholding: true`, for pixel-space models) is not implemented and is
//! rejected when the scheduler is built; `clip_sample` is supported.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::Distribution;
use serde::{Deserialize, Serialize};

use super::{
    check_num_steps, checked_timesteps, defaults, descending_timesteps, BetaSchedule,
    NoiseSchedule, PredictionType, TimestepSpacing,
};
use crate::{read_json, ModelError};

/// diffusers `DDIMScheduler` config (`scheduler_config.json` field names; missing fields take
/// `DDIMScheduler.__init__` defaults, unknown fields are ignored as `from_config` does — so the SD-1.5
/// PNDM `scheduler_config.json` reads into the DDIM scheduler LAVIS builds from it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdimSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: defaults::num_train_timesteps(),
            beta_start: defaults::beta_start(),
            beta_end: defaults::beta_end(),
            beta_schedule: defaults::beta_schedule(),
            trained_betas: None,
            clip_sample: defaults::yes(),
            set_alpha_to_one: defaults::yes(),
            steps_offset: 0,
            prediction_type: defaults::prediction_type(),
            thresholding: false,
            dynamic_thresholding_ratio: defaults::dynamic_thresholding_ratio(),
            clip_sample_range: defaults::one(),
            sample_max_value: defaults::one(),
            timestep_spacing: defaults::timestep_spacing(),
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimSchedulerConfig {
    /// `DDIMScheduler.from_config(runwayml/stable-diffusion-v1-5/scheduler)` as LAVIS builds it
    /// (`use_ddim=True` and real-image editing): scaled_linear 0.00085–0.012, `clip_sample` false,
    /// `set_alpha_to_one` false, `steps_offset` 1.
    pub fn sd15() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            clip_sample: false,
            set_alpha_to_one: false,
            steps_offset: 1,
            ..Self::default()
        }
    }

    /// Read a diffusers `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        read_json(path)
    }
}

/// Result of one DDIM step.
#[derive(Clone, Debug)]
pub struct DdimStepOutput<B: Backend, const D: usize> {
    /// x_{t−Δ}.
    pub prev_sample: Tensor<B, D>,
    /// The model's estimate of x₀ (after clipping, if enabled).
    pub pred_original_sample: Tensor<B, D>,
}

/// DDIM sampler and inverter. Stateless apart from the timestep grid, so `step` takes `&self`.
#[derive(Clone, Debug)]
pub struct DdimScheduler {
    config: DdimSchedulerConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    num_inference_steps: Option<usize>,
    timesteps: Vec<usize>,
}

impl DdimScheduler {
    pub fn new(config: DdimSchedulerConfig) -> Result<Self, ModelError> {
        if config.thresholding {
            return Err(ModelError::Invalid(
                "DDIMScheduler: dynamic thresholding (`thresholding: true`) is not supported"
                    .into(),
            ));
        }
        if config.beta_schedule == BetaSchedule::Sigmoid && config.trained_betas.is_none() {
            return Err(ModelError::Invalid(
                "DDIMScheduler: beta_schedule `sigmoid` is not implemented for DDIM in diffusers"
                    .into(),
            ));
        }
        let schedule = NoiseSchedule::new(
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas.as_deref(),
            config.rescale_betas_zero_snr,
        )?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        // Before set_timesteps diffusers exposes the full reversed training grid.
        let timesteps = (0..config.num_train_timesteps).rev().collect();
        Ok(Self {
            config,
            schedule,
            final_alpha_cumprod,
            num_inference_steps: None,
            timesteps,
        })
    }

    /// [`DdimSchedulerConfig::sd15`].
    pub fn sd15() -> Self {
        Self::new(DdimSchedulerConfig::sd15()).expect("valid preset")
    }

    /// Build from a diffusers `scheduler_config.json`.
    pub fn from_config_file(path: &Path) -> Result<Self, ModelError> {
        Self::new(DdimSchedulerConfig::from_file(path)?)
    }

    pub fn config(&self) -> &DdimSchedulerConfig {
        &self.config
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    pub fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// Denoising timesteps (descending).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Inversion timesteps: [`Self::timesteps`] reversed (LAVIS `reversed(scheduler.timesteps)`;
    /// SD-1.5 config, 50 steps → `1, 21, …, 981`).
    pub fn inversion_timesteps(&self) -> Vec<usize> {
        self.timesteps.iter().rev().copied().collect()
    }

    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// DDIM does not scale the network input.
    pub fn scale_model_input<B: Backend, const D: usize>(
        &self,
        sample: Tensor<B, D>,
        _timestep: usize,
    ) -> Tensor<B, D> {
        sample
    }

    /// diffusers `set_timesteps`.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), ModelError> {
        let t_train = self.config.num_train_timesteps;
        check_num_steps(num_inference_steps, t_train, "DDIMScheduler.set_timesteps")?;
        let v = descending_timesteps(
            self.config.timestep_spacing,
            t_train,
            num_inference_steps,
            self.config.steps_offset,
        );
        self.timesteps = checked_timesteps(v, t_train, "DDIMScheduler.set_timesteps")?;
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    /// `(ᾱ_t, ᾱ_{t−Δ})` with Δ = T // N; the final ᾱ when t − Δ < 0.
    fn alphas_at(&self, timestep: usize) -> Result<(f32, f32), ModelError> {
        let n = self.num_inference_steps.ok_or_else(|| {
            ModelError::Invalid("DDIMScheduler: call set_timesteps before step".into())
        })?;
        let prev = timestep as i64 - (self.config.num_train_timesteps / n) as i64;
        let a_t = self.schedule.alpha_cumprod(timestep)?;
        let a_prev = if prev >= 0 {
            self.schedule.alpha_cumprod(prev as usize)?
        } else {
            self.final_alpha_cumprod
        };
        Ok((a_t, a_prev))
    }

    /// One DDIM step with η = 0 (deterministic).
    pub fn step<B: Backend, const D: usize>(
        &self,
        model_output: Tensor<B, D>,
        timestep: usize,
        sample: Tensor<B, D>,
    ) -> Result<DdimStepOutput<B, D>, ModelError> {
        self.step_eta(model_output, timestep, sample, 0.0, false, None)
    }

    /// diffusers `DDIMScheduler.step` with all its options: `eta` (η, 0 = DDIM, 1 = DDPM-like
    /// variance), `use_clipped_model_output`, and `variance_noise` (standard normal, shape of the
    /// sample; drawn from the backend's RNG when `None` and η > 0).
    pub fn step_eta<B: Backend, const D: usize>(
        &self,
        model_output: Tensor<B, D>,
        timestep: usize,
        sample: Tensor<B, D>,
        eta: f32,
        use_clipped_model_output: bool,
        variance_noise: Option<Tensor<B, D>>,
    ) -> Result<DdimStepOutput<B, D>, ModelError> {
        let (a_t, a_prev) = self.alphas_at(timestep)?;
        let b_t = 1.0 - a_t;
        let (mut pred_x0, mut pred_eps) = match self.config.prediction_type {
            PredictionType::Epsilon => (
                (sample.clone() - model_output.clone().mul_scalar(b_t.sqrt()))
                    .div_scalar(a_t.sqrt()),
                model_output,
            ),
            PredictionType::Sample => (
                model_output.clone(),
                (sample.clone() - model_output.mul_scalar(a_t.sqrt())).div_scalar(b_t.sqrt()),
            ),
            PredictionType::VPrediction => (
                sample.clone().mul_scalar(a_t.sqrt()) - model_output.clone().mul_scalar(b_t.sqrt()),
                model_output.mul_scalar(a_t.sqrt()) + sample.clone().mul_scalar(b_t.sqrt()),
            ),
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            pred_x0 = pred_x0.clamp(-r, r);
        }
        // σ_t² = (1−ᾱ_prev)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_prev)
        let variance = ((1.0 - a_prev) / b_t) * (1.0 - a_t / a_prev);
        let std_dev_t = eta * variance.sqrt();
        if use_clipped_model_output {
            pred_eps =
                (sample.clone() - pred_x0.clone().mul_scalar(a_t.sqrt())).div_scalar(b_t.sqrt());
        }
        let direction = pred_eps.mul_scalar((1.0 - a_prev - std_dev_t * std_dev_t).sqrt());
        let mut prev = pred_x0.clone().mul_scalar(a_prev.sqrt()) + direction;
        if eta > 0.0 {
            let noise = match variance_noise {
                Some(n) => {
                    if n.dims() != prev.dims() {
                        return Err(ModelError::Invalid(format!(
                            "DDIMScheduler.step: variance_noise shape {:?} differs from sample {:?}",
                            n.dims(),
                            prev.dims()
                        )));
                    }
                    n
                }
                None => prev.random_like(Distribution::Normal(0.0, 1.0)),
            };
            prev = prev + noise.mul_scalar(std_dev_t);
        }
        Ok(DdimStepOutput {
            prev_sample: prev,
            pred_original_sample: pred_x0,
        })
    }

    /// One DDIM **inversion** step x_{t−Δ} → x_t, exactly as LAVIS `_noise_latent_step`
    /// (`backward_ddim` with swapped alphas). With ᾱ_a = ᾱ_{t−Δ} (final ᾱ if negative) and ᾱ_b = ᾱ_t:
    ///
    /// x ← √ᾱ_b · ((ᾱ_a^{−½} − ᾱ_b^{−½})·x + (√(1/ᾱ_b − 1) − √(1/ᾱ_a − 1))·ε_θ(x, t)) + x
    ///
    /// `timestep` is the entry of [`Self::inversion_timesteps`] the network was evaluated at, and
    /// `model_output` is ε_θ (ε-prediction only, as LAVIS assumes).
    pub fn inversion_step<B: Backend, const D: usize>(
        &self,
        model_output: Tensor<B, D>,
        timestep: usize,
        sample: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, ModelError> {
        if self.config.prediction_type != PredictionType::Epsilon {
            return Err(ModelError::Invalid(
                "DDIMScheduler.inversion_step: LAVIS inversion needs prediction_type `epsilon`"
                    .into(),
            ));
        }
        let (a_b, a_a) = self.alphas_at(timestep)?;
        let rsqrt = |x: f32| 1.0 / x.sqrt();
        let c_x = rsqrt(a_a) - rsqrt(a_b);
        let c_eps = (1.0 / a_b - 1.0).sqrt() - (1.0 / a_a - 1.0).sqrt();
        let inner = sample.clone().mul_scalar(c_x) + model_output.mul_scalar(c_eps);
        Ok(inner.mul_scalar(a_b.sqrt()) + sample)
    }

    /// `√ᾱ_t·x₀ + √(1 − ᾱ_t)·ε` with per-sample timesteps (see [`NoiseSchedule::add_noise`]).
    pub fn add_noise<B: Backend, const D: usize>(
        &self,
        original_samples: Tensor<B, D>,
        noise: Tensor<B, D>,
        timesteps: Tensor<B, 1, Int>,
    ) -> Tensor<B, D> {
        self.schedule.add_noise(original_samples, noise, timesteps)
    }

    /// v-prediction target (see [`NoiseSchedule::get_velocity`]).
    pub fn get_velocity<B: Backend, const D: usize>(
        &self,
        sample: Tensor<B, D>,
        noise: Tensor<B, D>,
        timesteps: Tensor<B, 1, Int>,
    ) -> Tensor<B, D> {
        self.schedule.get_velocity(sample, noise, timesteps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_timesteps_and_inversion_order() {
        let mut s = DdimScheduler::sd15();
        s.set_timesteps(50).unwrap();
        assert_eq!(s.timesteps()[0], 981);
        assert_eq!(*s.timesteps().last().unwrap(), 1);
        let inv = s.inversion_timesteps();
        assert_eq!(&inv[..3], &[1, 21, 41]);
        assert_eq!(inv.len(), 50);
        assert!(s.set_timesteps(0).is_err());
        assert!(s.set_timesteps(1001).is_err());
    }
}
