//! The denoising loop with classifier-free guidance: the one sampler that generation, stage 2's
//! sample sheets and fine-tuning's samples run (diffusers `BlipDiffusionPipeline.__call__` and
//! `BlipDiffusionControlNetPipeline.__call__`, LAVIS `BlipDiffusion.generate`).

use burn::prelude::*;

use crate::controlnet::ControlNetModel;
use crate::schedulers::{DdimScheduler, PndmScheduler};
use crate::unet::{AttentionHook, UNet2DConditionModel, UNetExtras};
use crate::ModelError;

/// The denoising sampler of a generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sampler {
    /// PNDM (PLMS, `skip_prk_steps`): diffusers' pipeline.
    #[default]
    Pndm,
    /// DDIM with η = 0 (LAVIS `use_ddim`).
    Ddim,
}

/// A scheduler ready to step, timesteps set: the schedulers' common surface for [`denoise`].
pub enum Steps<B: Backend> {
    Pndm(PndmScheduler<B>),
    Ddim(DdimScheduler),
}

impl<B: Backend> Steps<B> {
    /// PNDM as the released pipeline configures it, with `steps` inference steps.
    pub fn blip_diffusion_pndm(steps: usize) -> Result<Self, ModelError> {
        let mut s = PndmScheduler::<B>::blip_diffusion();
        s.set_timesteps(steps)?;
        Ok(Self::Pndm(s))
    }

    pub fn timesteps(&self) -> Vec<usize> {
        match self {
            Steps::Pndm(s) => s.timesteps().to_vec(),
            Steps::Ddim(s) => s.timesteps().to_vec(),
        }
    }

    pub fn init_noise_sigma(&self) -> f32 {
        match self {
            Steps::Pndm(s) => s.init_noise_sigma(),
            Steps::Ddim(s) => s.init_noise_sigma(),
        }
    }

    pub fn scale_model_input(&self, x: Tensor<B, 4>, t: usize) -> Tensor<B, 4> {
        match self {
            Steps::Pndm(s) => s.scale_model_input(x, t),
            Steps::Ddim(s) => s.scale_model_input(x, t),
        }
    }

    pub fn step(
        &mut self,
        eps: Tensor<B, 4>,
        t: usize,
        latents: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, ModelError> {
        match self {
            Steps::Pndm(s) => s.step(eps, t, latents),
            Steps::Ddim(s) => Ok(s.step(eps, t, latents)?.prev_sample),
        }
    }
}

/// What [`denoise`] reports after each scheduler step.
pub struct StepInfo<'a, B: Backend> {
    /// Index of the network call (0-based; `num_inference_steps + 1` calls in all for PNDM).
    pub index: usize,
    pub timestep: usize,
    /// Guided noise prediction of this call.
    pub noise_pred: &'a Tensor<B, 4>,
    /// Latents after the step.
    pub latents: &'a Tensor<B, 4>,
}

/// A ControlNet and its condition for [`denoise`].
pub struct Control<'a, B: Backend> {
    pub net: &'a ControlNetModel<B>,
    /// `[B or 1, 3, H, W]` in `[0, 1]`.
    pub image: Tensor<B, 4>,
    /// diffusers' `controlnet_conditioning_scale` (1.0).
    pub scale: f64,
}

/// Classifier-free guidance runs only when the scale is above 1 (diffusers `do_classifier_free_guidance`).
pub fn guided(guidance_scale: f64) -> bool {
    guidance_scale > 1.0
}

/// The sampling loop: `latents` `[B, C, h, w]` (× the scheduler's `init_noise_sigma`), text states
/// `[uncond; cond]` (`[2B, L, D]`) when [`guided`], else `[B, L, D]`; each step the U-Net (and the
/// ControlNet, on the same inputs, its residuals added to the U-Net's skips) predicts the noise,
/// `ε = ε_u + g·(ε_c − ε_u)`, and the scheduler steps. `on_step` sees every network call.
pub fn denoise<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    control: Option<Control<'_, B>>,
    scheduler: Steps<B>,
    latents: Tensor<B, 4>,
    states: Tensor<B, 3>,
    guidance_scale: f64,
    on_step: &mut dyn FnMut(StepInfo<'_, B>),
) -> Result<Tensor<B, 4>, ModelError> {
    denoise_with(
        unet,
        control,
        scheduler,
        latents,
        states,
        guidance_scale,
        Edit::default(),
        on_step,
    )
}

/// What prompt-to-prompt editing adds to the sampling loop (LAVIS `generate_then_edit`).
pub struct Edit<'a, B: Backend> {
    /// The attention controller: sees (and may replace) the attention probabilities of every U-Net
    /// forward, and transforms the latents after every scheduler step
    /// ([`AttentionHook::step_callback`], LAVIS `controller.step_callback`).
    pub controller: Option<&'a mut dyn AttentionHook<B>>,
    /// The first `unguided_rows` rows step with their conditional noise, unguided (LAVIS's
    /// reconstruction row when editing an inverted photo: `noise_pred[2]`); the others with the
    /// guided noise.
    pub unguided_rows: usize,
}

impl<B: Backend> Default for Edit<'_, B> {
    fn default() -> Self {
        Self {
            controller: None,
            unguided_rows: 0,
        }
    }
}

/// [`denoise`] with an [`Edit`].
#[allow(clippy::too_many_arguments)]
pub fn denoise_with<B: Backend>(
    unet: &UNet2DConditionModel<B>,
    control: Option<Control<'_, B>>,
    mut scheduler: Steps<B>,
    latents: Tensor<B, 4>,
    states: Tensor<B, 3>,
    guidance_scale: f64,
    mut edit: Edit<'_, B>,
    on_step: &mut dyn FnMut(StepInfo<'_, B>),
) -> Result<Tensor<B, 4>, ModelError> {
    let cfg = guided(guidance_scale);
    let [b, _, _, _] = latents.dims();
    let [sb, _, _] = states.dims();
    let expected = if cfg { 2 * b } else { b };
    if sb != expected {
        return Err(ModelError::Invalid(format!(
            "{sb} text embeddings for {b} latents (expected {expected}{})",
            if cfg { " with guidance" } else { "" }
        )));
    }
    let control = control.map(|c| {
        let cb = c.image.dims()[0];
        let image = if cb == 1 && b > 1 {
            c.image.repeat_dim(0, b)
        } else {
            c.image
        };
        let image = if cfg {
            Tensor::cat(vec![image.clone(), image], 0)
        } else {
            image
        };
        (c.net, image, c.scale)
    });
    let device = latents.device();
    let timesteps = scheduler.timesteps();
    let mut latents = latents.mul_scalar(scheduler.init_noise_sigma());
    for (index, &t) in timesteps.iter().enumerate() {
        let input = if cfg {
            Tensor::cat(vec![latents.clone(), latents.clone()], 0)
        } else {
            latents.clone()
        };
        let input = scheduler.scale_model_input(input, t);
        let tt = Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32], [1]), &device);
        let extras = control.as_ref().map(|(net, image, scale)| {
            net.forward(
                input.clone(),
                tt.clone(),
                states.clone(),
                image.clone(),
                *scale,
            )
            .into_extras()
        });
        let extras = match edit.controller.as_deref_mut() {
            None => extras,
            Some(h) => Some(match extras {
                None => UNetExtras::hook(h),
                Some(e) => e.with_hook(h),
            }),
        };
        let eps = unet.forward(input, tt, states.clone(), extras);
        let eps = if cfg {
            let mut halves = eps.chunk(2, 0);
            let cond = halves.pop().expect("two halves");
            let uncond = halves.pop().expect("two halves");
            let guided = uncond.clone() + (cond.clone() - uncond).mul_scalar(guidance_scale);
            match edit.unguided_rows.min(b) {
                0 => guided,
                k if k == b => cond,
                k => Tensor::cat(vec![cond.narrow(0, 0, k), guided.narrow(0, k, b - k)], 0),
            }
        } else {
            eps
        };
        latents = scheduler.step(eps.clone(), t, latents)?;
        if let Some(h) = edit.controller.as_deref_mut() {
            latents = h.step_callback(latents);
        }
        on_step(StepInfo {
            index,
            timestep: t,
            noise_pred: &eps,
            latents: &latents,
        });
    }
    Ok(latents)
}
