//! BLIP-Diffusion networks in Burn.
//!
//! One file per network, each with a serde config (field names follow the reference `config.json`),
//! presets that cite their source and a `tiny()` preset for tests. Models are single-device and free of
//! training code. Weights load strictly through [`weights`].

pub mod amp;
pub mod cpu;
pub mod efficient_attention;
pub mod flops;
pub mod nn;
pub mod weights;

pub mod clip;
pub mod clip_vision;
pub mod clipseg;
pub mod conditioning;
pub mod controlnet;
pub mod ctx_clip_text;
pub mod dino;
pub mod lora;
pub mod proj;
pub mod qformer;
pub mod sampling;
pub mod schedulers;
pub mod tokenizers;
pub mod unet;
pub mod vae;

pub mod error;
pub use error::{read_json, write_json, ModelError};
