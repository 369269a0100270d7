//! BLIP-Diffusion applications built on `blipd-models`.
//!
//! - [`generate`]: zero-shot subject-driven generation, the equivalent of diffusers'
//!   `BlipDiffusionPipeline` (and of LAVIS `BlipDiffusion.generate` with its preprocessing options).
//! - [`preprocess`]: reference-image preprocessing (diffusers squash-resize or LAVIS shorter-side resize +
//!   centre crop), byte-exact with Pillow's bicubic resampling.
//! - [`canny`]: Canny edge maps of photos for ControlNet-canny, prepared as LAVIS does.
//! - [`dreambench`]: zero-shot DreamBench generation in the layout [`eval`] scores.
//! - [`eval`]: DreamBench DINO / CLIP-I / CLIP-T scores (DreamBooth's protocol).
//! - [`interpolate`]: subject interpolation grids (bilinear blends of 2–4 subject embeddings, fig. 9).
//! - [`micro`]: zero-shot vs text-only subject fidelity in the procedural micro world, scored by a
//!   probe classifier (the evaluation of `configs/micro.toml`).
//! - [`segment`]: CLIPSeg subject masks from class names (`blipd data masks --source clipseg`).

pub mod canny;
pub mod dreambench;
pub mod edit;
pub mod error;
pub mod eval;
pub mod eval_seeds;
pub mod generate;
pub mod inspect;
pub mod interpolate;
pub mod micro;
pub mod preprocess;
pub mod segment;

pub use error::AppError;
pub use generate::{BlipDiffusionPipeline, GenerateOptions, GenerateOutput, Sampler};
pub use preprocess::{preprocess_reference, ReferenceResize, RgbImage};
