//! BLIP-Diffusion's projection layer (`ProjLayer`), mapping the Q-Former's 16 multimodal query
//! embeddings into the CLIP text-token space ("ctx embeddings").
//!
//! Reference: diffusers 0.33.1 `pipelines/blip_diffusion/modeling_blip2.py::ProjLayer`, identical to
//! LAVIS `lavis/models/blip_diffusion_models/blip_diffusion.py::ProjLayer`. Despite the source comment
//! ("… Res -> Norm") it is **pre-norm**: the LayerNorm is applied to the input and the *un-normalised*
//! input is added back; the output is not normalised.
//!
//! `y = x + Dropout(Dense2(QuickGELU(Dense1(LayerNorm(x)))))`
//!
//! Keys (diffusers `qformer/…proj_layer.*`, LAVIS `proj_layer/proj_weight.pt`): `dense1`, `dense2`,
//! `LayerNorm` (→ our `layer_norm`).

use crate::nn::{LayerNorm, LayerNormConfig};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::nn::{linear, quick_gelu};
use crate::weights::{load_strict, KeyMap, StateDict, WeightsError};
use crate::ModelError;

fn default_drop_p() -> f64 {
    0.1
}

fn default_eps() -> f64 {
    1e-12
}

/// Constructor arguments of `ProjLayer(in_dim, out_dim, hidden_dim, drop_p=0.1, eps=1e-12)`.
///
/// diffusers builds it from the Q-Former width (`in = out = hidden_size`, `hidden = 4 × hidden_size`);
/// it has no config file of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjConfig {
    pub in_dim: usize,
    pub out_dim: usize,
    pub hidden_dim: usize,
    #[serde(default = "default_drop_p")]
    pub drop_p: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
}

impl ProjConfig {
    /// BLIP-Diffusion: `ProjLayer(768, 768, 3072, 0.1, 1e-12)` (diffusers `Blip2QFormerModel.__init__`,
    /// LAVIS `BlipDiffusion.__init__`).
    pub fn blipdiffusion() -> Self {
        Self::for_hidden_size(768)
    }

    /// The layer diffusers' `Blip2QFormerModel` builds for a Q-Former of width `hidden`.
    pub fn for_hidden_size(hidden: usize) -> Self {
        Self {
            in_dim: hidden,
            out_dim: hidden,
            hidden_dim: 4 * hidden,
            drop_p: 0.1,
            eps: 1e-12,
        }
    }

    /// Tiny layer for tests (width 32).
    pub fn tiny() -> Self {
        Self::for_hidden_size(32)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        if self.in_dim != self.out_dim {
            return Err(ModelError::Invalid(format!(
                "ProjLayer: the residual needs in_dim == out_dim (got {} and {})",
                self.in_dim, self.out_dim
            )));
        }
        if self.in_dim == 0 || self.hidden_dim == 0 {
            return Err(ModelError::Invalid("ProjLayer: zero width".into()));
        }
        if !(0.0..=1.0).contains(&self.drop_p) {
            return Err(ModelError::Invalid(format!(
                "ProjLayer: drop_p {} not in [0, 1]",
                self.drop_p
            )));
        }
        Ok(())
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<ProjLayer<B>, ModelError> {
        self.validate()?;
        Ok(ProjLayer {
            dense1: linear(self.in_dim, self.hidden_dim, true, device),
            dense2: linear(self.hidden_dim, self.out_dim, true, device),
            layer_norm: LayerNormConfig::new(self.in_dim)
                .with_epsilon(self.eps)
                .init(device),
            dropout: DropoutConfig::new(self.drop_p).init(),
        })
    }
}

/// `ProjLayer`. Dropout is active only on autodiff backends (Burn's convention for training mode).
#[derive(Module, Debug)]
pub struct ProjLayer<B: Backend> {
    pub dense1: Linear<B>,
    pub dense2: Linear<B>,
    pub layer_norm: LayerNorm<B>,
    pub dropout: Dropout,
}

impl<B: Backend> ProjLayer<B> {
    /// `[B, L, in_dim]` → `[B, L, out_dim]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.layer_norm.forward(x.clone());
        let h = crate::amp::linear(
            &self.dense2,
            quick_gelu(crate::amp::linear(&self.dense1, h)),
        );
        self.dropout.forward(h) + x
    }

    /// Load weights in the reference layout (`dense1.*`, `dense2.*`, `LayerNorm.*`), strictly.
    pub fn load(self, sd: StateDict) -> Result<Self, WeightsError> {
        load_strict(self, sd, &key_map(), "proj_layer")
    }
}

/// Reference (diffusers / LAVIS) key → our module path.
pub fn key_map() -> KeyMap {
    KeyMap::new(&[(r"(^|\.)LayerNorm\.", "${1}layer_norm.")])
}

/// Our module path → reference key (for saving).
pub fn reverse_key_map() -> KeyMap {
    KeyMap::new(&[(r"(^|\.)layer_norm\.", "${1}LayerNorm.")])
}
