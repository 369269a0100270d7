//! PNDM scheduler (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"), as
//! diffusers 0.33.1 `PNDMScheduler`: Runge–Kutta warm-up (PRK) followed by linear multistep (PLMS), or
//! PLMS only with `skip_prk_steps` — the configuration BLIP-Diffusion samples with.
//!
//! With `skip_prk_steps` the first Adams–Bashforth step is replaced by a Heun-like pair: the second
//! timestep of the grid is evaluated twice, so N inference steps cost N + 1 network evaluations
//! (e.g. N = 50, offset 0 → `[980, 960, 960, 940, …, 20, 0]`).

use std::path::Path;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::{
    base_timesteps, checked_timesteps, defaults, BetaSchedule, NoiseSchedule, PredictionType,
    TimestepSpacing,
};
use crate::{read_json, ModelError};

/// diffusers `PNDMScheduler` config (`scheduler_config.json` field names; missing fields take
/// diffusers' `PNDMScheduler.__init__` defaults, unknown fields such as `_class_name` or
/// `clip_sample` are ignored as `from_config` does).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PndmSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub skip_prk_steps: bool,
    pub set_alpha_to_one: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
}

impl Default for PndmSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: defaults::num_train_timesteps(),
            beta_start: defaults::beta_start(),
            beta_end: defaults::beta_end(),
            beta_schedule: defaults::beta_schedule(),
            trained_betas: None,
            skip_prk_steps: false,
            set_alpha_to_one: false,
            prediction_type: defaults::prediction_type(),
            timestep_spacing: defaults::timestep_spacing(),
            steps_offset: 0,
        }
    }
}

impl PndmSchedulerConfig {
    /// The scheduler BLIP-Diffusion samples with: LAVIS `BlipDiffusion.pndm_scheduler` and the
    /// diffusers conversion script both build `PNDMScheduler(beta_start=0.00085, beta_end=0.012,
    /// beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True)`, hence
    /// `steps_offset` 0 (model.md §0.5, §1.6).
    pub fn blip_diffusion() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            skip_prk_steps: true,
            set_alpha_to_one: false,
            steps_offset: 0,
            ..Self::default()
        }
    }

    /// `runwayml/stable-diffusion-v1-5/scheduler/scheduler_config.json` (PNDMScheduler, scaled_linear
    /// 0.00085–0.012, `skip_prk_steps` true, `set_alpha_to_one` false, `steps_offset` 1).
    pub fn sd15() -> Self {
        Self {
            steps_offset: 1,
            ..Self::blip_diffusion()
        }
    }

    /// Read a diffusers `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        read_json(path)
    }
}

/// PNDM / PLMS sampler over tensors of rank `D` (latents: `[B, C, H, W]`).
///
/// Stateful like its diffusers original: [`Self::set_timesteps`] resets the multistep history, and
/// [`Self::step`] must be called once per entry of [`Self::timesteps`], in order.
#[derive(Clone, Debug)]
pub struct PndmScheduler<B: Backend, const D: usize = 4> {
    config: PndmSchedulerConfig,
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    num_inference_steps: Option<usize>,
    prk_timesteps: Vec<usize>,
    timesteps: Vec<usize>,
    counter: usize,
    cur_model_output: Option<Tensor<B, D>>,
    cur_sample: Option<Tensor<B, D>>,
    ets: Vec<Tensor<B, D>>,
}

impl<B: Backend, const D: usize> PndmScheduler<B, D> {
    /// Number of past model outputs PLMS combines.
    pub const PNDM_ORDER: usize = 4;

    pub fn new(config: PndmSchedulerConfig) -> Result<Self, ModelError> {
        if config.prediction_type == PredictionType::Sample {
            return Err(ModelError::Invalid(
                "PNDMScheduler: prediction_type must be `epsilon` or `v_prediction`, got `sample`"
                    .into(),
            ));
        }
        let schedule = NoiseSchedule::new(
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.beta_schedule,
            config.trained_betas.as_deref(),
            false,
        )?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Self {
            config,
            schedule,
            final_alpha_cumprod,
            num_inference_steps: None,
            prk_timesteps: vec![],
            timesteps: vec![],
            counter: 0,
            cur_model_output: None,
            cur_sample: None,
            ets: vec![],
        })
    }

    /// [`PndmSchedulerConfig::blip_diffusion`].
    pub fn blip_diffusion() -> Self {
        Self::new(PndmSchedulerConfig::blip_diffusion()).expect("valid preset")
    }

    /// [`PndmSchedulerConfig::sd15`].
    pub fn sd15() -> Self {
        Self::new(PndmSchedulerConfig::sd15()).expect("valid preset")
    }

    /// Build from a diffusers `scheduler_config.json`.
    pub fn from_config_file(path: &Path) -> Result<Self, ModelError> {
        Self::new(PndmSchedulerConfig::from_file(path)?)
    }

    pub fn config(&self) -> &PndmSchedulerConfig {
        &self.config
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    /// ᾱ used when the previous timestep is negative (1 with `set_alpha_to_one`, else ᾱ_0).
    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    /// Standard deviation of the initial noise (always 1 for PNDM).
    pub fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// The timesteps to evaluate the network at, in order (PRK steps first, then PLMS).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// PNDM does not scale the network input.
    pub fn scale_model_input(&self, sample: Tensor<B, D>, _timestep: usize) -> Tensor<B, D> {
        sample
    }

    /// diffusers `set_timesteps`: build the PRK/PLMS timestep lists and reset the multistep state.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), ModelError> {
        let t_train = self.config.num_train_timesteps;
        if num_inference_steps == 0 {
            return Err(ModelError::Invalid(
                "PNDMScheduler: num_inference_steps must be > 0".into(),
            ));
        }
        let mut base = base_timesteps(
            self.config.timestep_spacing,
            t_train,
            num_inference_steps,
            self.config.steps_offset,
        );
        if self.config.timestep_spacing == TimestepSpacing::Trailing {
            base.reverse(); // `[::-1]` in diffusers: ascending like the other spacings
        }
        let len = base.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.config.skip_prk_steps {
            // concat(_timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:])[::-1]
            let mut v: Vec<i64> = base[..len.saturating_sub(1)].to_vec();
            if len >= 2 {
                v.push(base[len - 2]);
            }
            v.extend_from_slice(&base[len.saturating_sub(1)..]);
            v.reverse();
            (vec![], v)
        } else {
            // prk = repeat(_timesteps[-4:], 2) + tile([0, T // N // 2], 4); then
            // prk[:-1].repeat(2)[1:-1][::-1]; plms = _timesteps[:-3][::-1].
            let half = (t_train / num_inference_steps / 2) as i64;
            let last: Vec<i64> = base[len.saturating_sub(Self::PNDM_ORDER)..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            let mut prk: Vec<i64> = last[..last.len().saturating_sub(1)]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            prk = if prk.len() >= 2 {
                prk[1..prk.len() - 1].to_vec()
            } else {
                vec![]
            };
            prk.reverse();
            let mut plms: Vec<i64> = base[..len.saturating_sub(3)].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let what = "PNDMScheduler.set_timesteps";
        self.prk_timesteps = checked_timesteps(prk, t_train, what)?;
        let plms = checked_timesteps(plms, t_train, what)?;
        self.timesteps = self.prk_timesteps.iter().chain(&plms).copied().collect();
        self.num_inference_steps = Some(num_inference_steps);
        self.ets.clear();
        self.counter = 0;
        self.cur_model_output = None;
        self.cur_sample = None;
        Ok(())
    }

    /// One denoising step `x_t → x_{t−Δ}` (diffusers `step`): dispatches to the Runge–Kutta warm-up
    /// while it lasts, then to the linear multistep update.
    pub fn step(
        &mut self,
        model_output: Tensor<B, D>,
        timestep: usize,
        sample: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, ModelError> {
        if self.counter < self.prk_timesteps.len() && !self.config.skip_prk_steps {
            self.step_prk(model_output, timestep, sample)
        } else {
            self.step_plms(model_output, timestep, sample)
        }
    }

    fn ratio(&self) -> Result<i64, ModelError> {
        match self.num_inference_steps {
            Some(n) => Ok((self.config.num_train_timesteps / n) as i64),
            None => Err(ModelError::Invalid(
                "PNDMScheduler: call set_timesteps before step".into(),
            )),
        }
    }

    /// Fourth-order Runge–Kutta warm-up step (diffusers `step_prk`).
    pub fn step_prk(
        &mut self,
        model_output: Tensor<B, D>,
        timestep: usize,
        sample: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, ModelError> {
        let ratio = self.ratio()?;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { ratio / 2 };
        let prev_timestep = timestep as i64 - diff_to_prev;
        let anchor = *self
            .prk_timesteps
            .get(self.counter / 4 * 4)
            .ok_or_else(|| {
                ModelError::Invalid(format!(
                    "PNDMScheduler.step_prk: step {} beyond the {} Runge-Kutta timesteps",
                    self.counter,
                    self.prk_timesteps.len()
                ))
            })?;
        let add = |acc: Option<Tensor<B, D>>, x: Tensor<B, D>| match acc {
            Some(a) => a + x,
            None => x,
        };
        let model_output = match self.counter % 4 {
            0 => {
                let acc = self.cur_model_output.take();
                self.cur_model_output = Some(add(acc, model_output.clone().mul_scalar(1.0 / 6.0)));
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output
            }
            1 | 2 => {
                let acc = self.cur_model_output.take();
                self.cur_model_output = Some(add(acc, model_output.clone().mul_scalar(1.0 / 3.0)));
                model_output
            }
            _ => {
                let acc = self.cur_model_output.take();
                add(acc, model_output.mul_scalar(1.0 / 6.0))
            }
        };
        let cur_sample = self.cur_sample.clone().unwrap_or(sample);
        let prev = self.prev_sample(cur_sample, anchor as i64, prev_timestep, model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// Linear multistep step (diffusers `step_plms`), including the duplicated-timestep Heun pair that
    /// replaces the Runge–Kutta warm-up when `skip_prk_steps` is set.
    pub fn step_plms(
        &mut self,
        model_output: Tensor<B, D>,
        timestep: usize,
        sample: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, ModelError> {
        let ratio = self.ratio()?;
        if !self.config.skip_prk_steps && self.ets.len() < 3 {
            return Err(ModelError::Invalid(
                "PNDMScheduler: PLMS steps need 12 Runge-Kutta steps first (skip_prk_steps is false)"
                    .into(),
            ));
        }
        let mut t = timestep as i64;
        let mut prev_timestep = t - ratio;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = t;
            t += ratio;
        }
        let n = self.ets.len();
        let e = |k: usize| self.ets[n - k].clone(); // e(1) = newest
        let mut sample = sample;
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output
        } else if n == 1 && self.counter == 1 {
            sample = self.cur_sample.take().ok_or_else(|| {
                ModelError::Invalid("PNDMScheduler: PLMS state lost (no stored sample)".into())
            })?;
            (model_output + e(1)).div_scalar(2.0)
        } else if n == 2 {
            (e(1).mul_scalar(3.0) - e(2)).div_scalar(2.0)
        } else if n == 3 {
            (e(1).mul_scalar(23.0) - e(2).mul_scalar(16.0) + e(3).mul_scalar(5.0)).div_scalar(12.0)
        } else {
            (e(1).mul_scalar(55.0) - e(2).mul_scalar(59.0) + e(3).mul_scalar(37.0)
                - e(4).mul_scalar(9.0))
            .mul_scalar(1.0 / 24.0)
        };
        let prev = self.prev_sample(sample, t, prev_timestep, model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// PNDM eq. (9): x_prev = √(ᾱ_prev/ᾱ_t)·x − (ᾱ_prev − ᾱ_t)·ε / (ᾱ_t·√(1−ᾱ_prev) + √(ᾱ_t(1−ᾱ_t)ᾱ_prev)).
    fn prev_sample(
        &self,
        sample: Tensor<B, D>,
        timestep: i64,
        prev_timestep: i64,
        model_output: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, ModelError> {
        if timestep < 0 {
            return Err(ModelError::Invalid(format!(
                "PNDMScheduler: negative timestep {timestep}"
            )));
        }
        let a_t = self.schedule.alpha_cumprod(timestep as usize)?;
        let a_prev = if prev_timestep >= 0 {
            self.schedule.alpha_cumprod(prev_timestep as usize)?
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let model_output = match self.config.prediction_type {
            PredictionType::VPrediction => {
                model_output.mul_scalar(a_t.sqrt()) + sample.clone().mul_scalar(b_t.sqrt())
            }
            _ => model_output,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        Ok(sample.mul_scalar(sample_coeff)
            - model_output.mul_scalar(a_prev - a_t).div_scalar(denom))
    }

    /// `√ᾱ_t·x₀ + √(1 − ᾱ_t)·ε` with per-sample timesteps (see [`NoiseSchedule::add_noise`]).
    pub fn add_noise(
        &self,
        original_samples: Tensor<B, D>,
        noise: Tensor<B, D>,
        timesteps: Tensor<B, 1, Int>,
    ) -> Tensor<B, D> {
        self.schedule.add_noise(original_samples, noise, timesteps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    type Be = burn::backend::NdArray<f32>;

    #[test]
    fn blip_diffusion_plms_timesteps() {
        let mut s = PndmScheduler::<Be>::blip_diffusion();
        s.set_timesteps(50).unwrap();
        let ts = s.timesteps();
        assert_eq!(ts.len(), 51);
        assert_eq!(&ts[..4], &[980, 960, 960, 940]);
        assert_eq!(&ts[49..], &[20, 0]);
        s.set_timesteps(1).unwrap();
        assert_eq!(s.timesteps(), &[0]);
    }

    #[test]
    fn step_before_set_timesteps_is_an_error() {
        let mut s = PndmScheduler::<Be, 1>::blip_diffusion();
        let x = Tensor::<Be, 1>::zeros([2], &Default::default());
        assert!(s.step(x.clone(), 980, x).is_err());
    }
}
