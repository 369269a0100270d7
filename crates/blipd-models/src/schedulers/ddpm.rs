//! DDPM scheduler (Ho et al. 2020), as diffusers 0.33.1 `DDPMScheduler`: the forward process used for
//! training (`add_noise`, `get_velocity`, [`DdpmScheduler::training_target`]) and the ancestral
//! sampling `step`.
//!
//! BLIP-Diffusion fine-tuning (LAVIS) builds `DDPMScheduler.from_config(SD-1.5 scheduler folder)`:
//! 1000 steps, scaled_linear β, ε-prediction ([`DdpmScheduler::sd15`]).
//! Dynamic thresholding (`thresholding: true`) is not implemented and is rejected when building.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::Distribution;
use serde::{Deserialize, Serialize};

use super::{
    check_num_steps, checked_timesteps, defaults, descending_timesteps, BetaSchedule,
    NoiseSchedule, PredictionType, TimestepSpacing,
};
use crate::{read_json, ModelError};

/// How the reverse-process variance is chosen (diffusers `variance_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// σ² = β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t (posterior variance, clamped at 1e-20).
    FixedSmall,
    /// σ = exp(½·log β̃_t).
    FixedSmallLog,
    /// σ² = β_t.
    FixedLarge,
    /// log β_t, used as diffusers uses it (its square root is NaN: kept for parity with diffusers).
    FixedLargeLog,
    /// The model predicts σ² in its second half of channels.
    Learned,
    /// The model predicts an interpolation between log β̃_t and log β_t (improved DDPM).
    LearnedRange,
}

/// diffusers `DDPMScheduler` config (`scheduler_config.json` names; missing fields take
/// `DDPMScheduler.__init__` defaults; unknown fields such as `set_alpha_to_one` are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdpmSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub variance_type: VarianceType,
    pub clip_sample: bool,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub clip_sample_range: f64,
    pub sample_max_value: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdpmSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: defaults::num_train_timesteps(),
            beta_start: defaults::beta_start(),
            beta_end: defaults::beta_end(),
            beta_schedule: defaults::beta_schedule(),
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: defaults::yes(),
            prediction_type: defaults::prediction_type(),
            thresholding: false,
            dynamic_thresholding_ratio: defaults::dynamic_thresholding_ratio(),
            clip_sample_range: defaults::one(),
            sample_max_value: defaults::one(),
            timestep_spacing: defaults::timestep_spacing(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdpmSchedulerConfig {
    /// `DDPMScheduler.from_config(runwayml/stable-diffusion-v1-5/scheduler)` (LAVIS training
    /// scheduler): scaled_linear 0.00085–0.012, `clip_sample` false, `steps_offset` 1, ε-prediction,
    /// `fixed_small` variance.
    pub fn sd15() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            clip_sample: false,
            steps_offset: 1,
            ..Self::default()
        }
    }

    /// Read a diffusers `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        read_json(path)
    }
}

/// Result of one DDPM step.
#[derive(Clone, Debug)]
pub struct DdpmStepOutput<B: Backend, const D: usize> {
    pub prev_sample: Tensor<B, D>,
    pub pred_original_sample: Tensor<B, D>,
}

/// DDPM forward process and ancestral sampler.
#[derive(Clone, Debug)]
pub struct DdpmScheduler {
    config: DdpmSchedulerConfig,
    schedule: NoiseSchedule,
    num_inference_steps: Option<usize>,
    custom_timesteps: bool,
    timesteps: Vec<usize>,
}

impl DdpmScheduler {
    pub fn new(config: DdpmSchedulerConfig) -> Result<Self, ModelError> {
        if config.thresholding {
            return Err(ModelError::Invalid(
                "DDPMScheduler: dynamic thresholding (`thresholding: true`) is not supported"
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
        let timesteps = (0..config.num_train_timesteps).rev().collect();
        Ok(Self {
            config,
            schedule,
            num_inference_steps: None,
            custom_timesteps: false,
            timesteps,
        })
    }

    /// [`DdpmSchedulerConfig::sd15`].
    pub fn sd15() -> Self {
        Self::new(DdpmSchedulerConfig::sd15()).expect("valid preset")
    }

    /// Build from a diffusers `scheduler_config.json`.
    pub fn from_config_file(path: &Path) -> Result<Self, ModelError> {
        Self::new(DdpmSchedulerConfig::from_file(path)?)
    }

    pub fn config(&self) -> &DdpmSchedulerConfig {
        &self.config
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    pub fn betas(&self) -> &[f32] {
        &self.schedule.betas
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    pub fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// Sampling timesteps, descending (all training timesteps until `set_timesteps` is called).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn scale_model_input<B: Backend, const D: usize>(
        &self,
        sample: Tensor<B, D>,
        _timestep: usize,
    ) -> Tensor<B, D> {
        sample
    }

    /// diffusers `set_timesteps(num_inference_steps)`.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), ModelError> {
        let t_train = self.config.num_train_timesteps;
        check_num_steps(num_inference_steps, t_train, "DDPMScheduler.set_timesteps")?;
        let v = descending_timesteps(
            self.config.timestep_spacing,
            t_train,
            num_inference_steps,
            self.config.steps_offset,
        );
        self.timesteps = checked_timesteps(v, t_train, "DDPMScheduler.set_timesteps")?;
        self.num_inference_steps = Some(num_inference_steps);
        self.custom_timesteps = false;
        Ok(())
    }

    /// diffusers `set_timesteps(timesteps=[…])`: a strictly descending custom list.
    pub fn set_custom_timesteps(&mut self, timesteps: &[usize]) -> Result<(), ModelError> {
        if timesteps.windows(2).any(|w| w[1] >= w[0]) {
            return Err(ModelError::Invalid(
                "DDPMScheduler: custom timesteps must be in descending order".into(),
            ));
        }
        match timesteps.first() {
            None => {
                return Err(ModelError::Invalid(
                    "DDPMScheduler: custom timesteps are empty".into(),
                ))
            }
            Some(&t) if t >= self.config.num_train_timesteps => {
                return Err(ModelError::Invalid(format!(
                    "DDPMScheduler: custom timesteps must start before {}, got {t}",
                    self.config.num_train_timesteps
                )))
            }
            _ => {}
        }
        self.timesteps = timesteps.to_vec();
        self.custom_timesteps = true;
        self.num_inference_steps = None;
        Ok(())
    }

    /// The timestep after `t` in the sampling order (−1 after the last), or `t − 1` before
    /// `set_timesteps` (diffusers `previous_timestep`).
    pub fn previous_timestep(&self, timestep: usize) -> Result<i64, ModelError> {
        if self.custom_timesteps || self.num_inference_steps.is_some() {
            let i = self
                .timesteps
                .iter()
                .position(|&t| t == timestep)
                .ok_or_else(|| {
                    ModelError::Invalid(format!(
                        "DDPMScheduler: timestep {timestep} is not in the sampling schedule"
                    ))
                })?;
            Ok(self.timesteps.get(i + 1).map_or(-1, |&t| t as i64))
        } else {
            Ok(timestep as i64 - 1)
        }
    }

    /// `(ᾱ_t, ᾱ_prev, β_t^{cur})` with ᾱ_prev = 1 for t's last step.
    fn alphas_at(&self, timestep: usize) -> Result<(f32, f32), ModelError> {
        let prev = self.previous_timestep(timestep)?;
        let a_t = self.schedule.alpha_cumprod(timestep)?;
        let a_prev = if prev >= 0 {
            self.schedule.alpha_cumprod(prev as usize)?
        } else {
            1.0
        };
        Ok((a_t, a_prev))
    }

    /// The regression target of the network for `prediction_type`: ε, v (`get_velocity`) or x₀.
    pub fn training_target<B: Backend, const D: usize>(
        &self,
        original_samples: Tensor<B, D>,
        noise: Tensor<B, D>,
        timesteps: Tensor<B, 1, Int>,
    ) -> Tensor<B, D> {
        match self.config.prediction_type {
            PredictionType::Epsilon => noise,
            PredictionType::VPrediction => self.get_velocity(original_samples, noise, timesteps),
            PredictionType::Sample => original_samples,
        }
    }

    /// One ancestral step x_t → x_{t_prev} (diffusers `DDPMScheduler.step`). `noise` is the standard
    /// normal draw added for t > 0 (shape of `sample`); `None` draws it from the backend's RNG.
    /// With `learned`/`learned_range` variance and a model output of twice the sample's channels
    /// (dim 1), the second half is the predicted variance.
    pub fn step<B: Backend, const D: usize>(
        &self,
        model_output: Tensor<B, D>,
        timestep: usize,
        sample: Tensor<B, D>,
        noise: Option<Tensor<B, D>>,
    ) -> Result<DdpmStepOutput<B, D>, ModelError> {
        let vt = self.config.variance_type;
        let c = sample.dims()[1];
        let (model_output, predicted_variance) = if model_output.dims()[1] == 2 * c
            && matches!(vt, VarianceType::Learned | VarianceType::LearnedRange)
        {
            (
                model_output.clone().narrow(1, 0, c),
                Some(model_output.narrow(1, c, c)),
            )
        } else {
            (model_output, None)
        };
        let (a_t, a_prev) = self.alphas_at(timestep)?;
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let mut pred_x0 = match self.config.prediction_type {
            PredictionType::Epsilon => {
                (sample.clone() - model_output.mul_scalar(b_t.sqrt())).div_scalar(a_t.sqrt())
            }
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => {
                sample.clone().mul_scalar(a_t.sqrt()) - model_output.mul_scalar(b_t.sqrt())
            }
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            pred_x0 = pred_x0.clamp(-r, r);
        }
        let x0_coeff = (a_prev.sqrt() * cur_beta) / b_t;
        let cur_coeff = cur_alpha.sqrt() * b_prev / b_t;
        let mut prev = pred_x0.clone().mul_scalar(x0_coeff) + sample.mul_scalar(cur_coeff);
        if timestep > 0 {
            let noise = match noise {
                Some(n) => {
                    if n.dims() != prev.dims() {
                        return Err(ModelError::Invalid(format!(
                            "DDPMScheduler.step: noise shape {:?} differs from sample {:?}",
                            n.dims(),
                            prev.dims()
                        )));
                    }
                    n
                }
                None => prev.random_like(Distribution::Normal(0.0, 1.0)),
            };
            // β̃_t, clamped like diffusers.
            let small = ((1.0 - a_prev) / (1.0 - a_t) * cur_beta).max(1e-20);
            let need_pv = || {
                predicted_variance.clone().ok_or_else(|| {
                    ModelError::Invalid(format!(
                        "DDPMScheduler: variance_type {vt:?} needs a model output with {} channels",
                        2 * c
                    ))
                })
            };
            let variance = match vt {
                VarianceType::FixedSmall => noise.mul_scalar(small.sqrt()),
                VarianceType::FixedSmallLog => noise.mul_scalar((0.5 * small.ln()).exp()),
                VarianceType::FixedLarge => noise.mul_scalar(cur_beta.sqrt()),
                VarianceType::FixedLargeLog => noise.mul_scalar(cur_beta.ln().sqrt()),
                VarianceType::Learned => need_pv()?.sqrt() * noise,
                VarianceType::LearnedRange => {
                    let (min_log, max_log) = (small.ln(), cur_beta.ln());
                    let frac = need_pv()?.add_scalar(1.0).div_scalar(2.0);
                    let v = frac.clone().mul_scalar(max_log)
                        + frac.neg().add_scalar(1.0).mul_scalar(min_log);
                    v.mul_scalar(0.5).exp() * noise
                }
            };
            prev = prev + variance;
        }
        Ok(DdpmStepOutput {
            prev_sample: prev,
            pred_original_sample: pred_x0,
        })
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

    /// `√ᾱ_t·ε − √(1 − ᾱ_t)·x₀` (see [`NoiseSchedule::get_velocity`]).
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
    fn previous_timestep_follows_schedule() {
        let mut s = DdpmScheduler::sd15();
        assert_eq!(s.previous_timestep(10).unwrap(), 9);
        s.set_timesteps(10).unwrap();
        assert_eq!(s.timesteps()[0], 901);
        assert_eq!(s.previous_timestep(901).unwrap(), 801);
        assert_eq!(s.previous_timestep(1).unwrap(), -1);
        assert!(s.previous_timestep(5).is_err());
        assert!(s.set_custom_timesteps(&[10, 20]).is_err());
    }
}
