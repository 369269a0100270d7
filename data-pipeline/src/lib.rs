//! `blipd-data`: the BLIP-Diffusion subject-representation data pipeline.
//!
//! Pure stages (no Burn): OpenImages V6 filtering, trimap construction from a soft mask, closed-form matting
//! and multi-level foreground estimation (pymatting semantics), and compositing onto random backgrounds.
//! The CLIPSeg network lives in `blipd-models` and its mask writer in `blipd-apps` (`blipd data masks
//! --source clipseg`); this crate consumes the masks as images.

pub mod buffer;
pub mod composite;
pub mod cpu;
pub mod error;
pub mod font;
pub mod foreground;
pub mod imageio;
pub mod loader;
pub mod masks;
pub mod matte;
pub mod matting;
pub mod moments;
pub mod npy;
pub mod openimages;
pub mod preprocess;
pub mod preview;
pub mod shards;
pub mod synth;
pub mod synthetic;
pub mod trimap;

pub use buffer::{Gray, Rgb};
pub use error::{DataError, Result};
pub use foreground::{estimate_foreground_background_ml, estimate_foreground_ml, FgOptions};
pub use imageio::{read_gray, read_rgb, ReadLimits};
pub use matte::matte_file;
pub use matting::{estimate_alpha_cf, CfOptions, CfStats};
pub use trimap::{trimap_from_mask, TrimapOptions};
