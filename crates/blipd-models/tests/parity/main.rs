//! Parity of every network against tiny random-weight reference models built by
//! `scripts/reference/generate.sh` (pinned torch / transformers / diffusers). Fixtures live in
//! `tests/fixtures/<network>/`: `config.json` (the reference config), `weights.safetensors` (reference
//! key layout) and `io.safetensors` (inputs and outputs).

mod common;

mod clip;
mod clip_vision;
mod clipseg;
mod controlnet;
mod ctx_clip_text;
mod dino;
mod lora;
mod proj;
mod qformer;
mod schedulers;
mod tokenizers;
mod unet;
mod vae;
