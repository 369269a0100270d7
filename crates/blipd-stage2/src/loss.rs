//! The denoising loss of pre-training and fine-tuning, one function for both, with the two options
//! users of other diffusion trainers expect (both off by default, so the default loss is the paper's
//! and the released code's ε-prediction MSE, bit for bit):
//!
//! * **min-SNR-γ weighting** (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
//!   Strategy"; diffusers `train_text_to_image.py --snr_gamma`): each sample's MSE is weighted by
//!   `min(SNR(t), γ) / SNR(t)` with `SNR(t) = ᾱ_t / (1 − ᾱ_t)` (ε-prediction), then averaged. γ = 5 is
//!   the paper's recommendation.
//! * **noise offset** (Guttenberg 2023, "Diffusion with Offset Noise"; diffusers `--noise_offset`): the
//!   diffusion noise gets `offset · δ` added, `δ ~ N(0, 1)` per sample and channel (`[B, C, 1, 1]`),
//!   so the model learns to shift the mean brightness of an image. It is the target too.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Stage2Error;

/// `[stage]` keys of the loss, shared by stage 2 and fine-tuning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LossOptions {
    /// γ of min-SNR weighting (`None`: every timestep weighs 1, the paper's loss).
    pub min_snr_gamma: Option<f64>,
    /// Scale of the per-channel noise offset (0: none).
    pub noise_offset: f64,
}

impl LossOptions {
    pub fn validate(&self) -> Result<(), Stage2Error> {
        if let Some(g) = self.min_snr_gamma {
            if !(g.is_finite() && g > 0.0) {
                return Err(Stage2Error::Config(format!(
                    "min_snr_gamma = {g} must be a positive number (5 in the paper), or left out"
                )));
            }
        }
        if !(self.noise_offset.is_finite() && self.noise_offset >= 0.0) {
            return Err(Stage2Error::Config(format!(
                "noise_offset = {} must be ≥ 0 (0.05–0.1 are usual; 0 turns it off)",
                self.noise_offset
            )));
        }
        Ok(())
    }

    /// Whether [`Self::offset_noise`] needs per-channel draws.
    pub fn wants_offset(&self) -> bool {
        self.noise_offset > 0.0
    }

    /// `noise + noise_offset · delta` (`delta` `[B, C, 1, 1]` standard normal), or `noise` when off.
    pub fn offset_noise<B: Backend>(
        &self,
        noise: Tensor<B, 4>,
        delta: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        if !self.wants_offset() {
            return noise;
        }
        let dims = noise.dims();
        noise + delta.mul_scalar(self.noise_offset).expand(dims)
    }

    /// Per-sample weights `min(SNR(t), γ) / SNR(t)` for the timesteps `t` of a batch, from the
    /// schedule's `ᾱ` (`None` without min-SNR).
    pub fn snr_weights(&self, t: &[i64], alphas_cumprod: &[f32]) -> Option<Vec<f32>> {
        let gamma = self.min_snr_gamma?;
        Some(
            t.iter()
                .map(|&t| {
                    let a = alphas_cumprod[t as usize] as f64;
                    let snr = a / (1.0 - a);
                    (snr.min(gamma) / snr) as f32
                })
                .collect(),
        )
    }

    /// The loss of the predicted noise `pred` against `target` at timesteps `t`: the mean squared
    /// error over all elements, or with min-SNR the weighted mean of the per-sample MSEs.
    pub fn loss<B: Backend>(
        &self,
        pred: Tensor<B, 4>,
        target: Tensor<B, 4>,
        t: &[i64],
        alphas_cumprod: &[f32],
    ) -> Tensor<B, 1> {
        let sq = (pred - target).powi_scalar(2);
        match self.snr_weights(t, alphas_cumprod) {
            None => sq.mean(),
            Some(w) => {
                let b = w.len();
                let per_sample = sq.reshape([b as i32, -1]).mean_dim(1).reshape([b]);
                let w = Tensor::<B, 1>::from_data(TensorData::new(w, [b]), &per_sample.device());
                (per_sample * w).mean()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    #[test]
    fn off_is_the_plain_mse_and_min_snr_weighs_each_sample() {
        let dev = Default::default();
        let pred = Tensor::<B, 4>::from_floats([[[[1.0, 2.0]]], [[[0.0, 4.0]]]], &dev);
        let target = Tensor::<B, 4>::zeros([2, 1, 1, 2], &dev);
        // ᾱ: SNR(0) = 9 (a = 0.9), SNR(1) = 0.25 (a = 0.2).
        let ac = [0.9f32, 0.2];
        let t = [0i64, 1];
        let plain = LossOptions::default().loss(pred.clone(), target.clone(), &t, &ac);
        let (plain, expected) = (plain.into_scalar(), (1.0 + 4.0 + 0.0 + 16.0) / 4.0);
        assert_eq!(plain, expected);

        let opts = LossOptions {
            min_snr_gamma: Some(5.0),
            ..Default::default()
        };
        let w = opts.snr_weights(&t, &ac).unwrap();
        // min(9, 5)/9 for the clean sample, 1 for the noisy one (SNR below γ).
        blipd_testkit::assert_close_slice("weights", &w, &[5.0 / 9.0, 1.0], 1e-6);
        let weighted = opts.loss(pred, target, &t, &ac).into_scalar() as f64;
        let expected = (2.5 * 5.0 / 9.0 + 8.0 * 1.0) / 2.0;
        assert!(
            (weighted - expected).abs() < 1e-6,
            "{weighted} vs {expected}"
        );
    }

    #[test]
    fn the_offset_is_one_value_per_sample_and_channel() {
        let dev = Default::default();
        let noise = Tensor::<B, 4>::zeros([2, 3, 4, 4], &dev);
        let delta = Tensor::<B, 4>::from_floats(
            [[[[1.0]], [[2.0]], [[3.0]]], [[[-1.0]], [[0.0]], [[0.5]]]],
            &dev,
        );
        let off = LossOptions::default().offset_noise(noise.clone(), delta.clone());
        assert_eq!(off.clone().abs().sum().into_scalar(), 0.0, "off by default");
        let opts = LossOptions {
            noise_offset: 0.1,
            ..Default::default()
        };
        let v = opts
            .offset_noise(noise, delta)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert!((v[0] - 0.1).abs() < 1e-7 && (v[15] - 0.1).abs() < 1e-7);
        assert!((v[16] - 0.2).abs() < 1e-7 && (v[3 * 16 + 5] + 0.1).abs() < 1e-7);
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        let bad = |g, o| {
            LossOptions {
                min_snr_gamma: g,
                noise_offset: o,
            }
            .validate()
            .unwrap_err()
            .to_string()
        };
        assert!(bad(Some(0.0), 0.0).contains("min_snr_gamma"));
        assert!(bad(Some(f64::NAN), 0.0).contains("min_snr_gamma"));
        assert!(bad(None, -0.1).contains("noise_offset"));
        assert!(LossOptions::default().validate().is_ok());
    }
}
