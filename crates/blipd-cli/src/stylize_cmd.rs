//! `blipd stylize`: BLIP-Diffusion's stylization (paper fig. 10; model.md §5.4) — a style image as the
//! subject (e.g. a flower photo with subject "flower"), the structure as Canny edges of another photo
//! through ControlNet-canny, and a target subject named in the prompt ("a teapot on a marble table").
//! It is `blipd generate` with those inputs: one generation path.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::generate_cmd::{self, GenerateArgs, SchedulerArg};
use super::Precision;

#[derive(Args)]
pub struct StylizeArgs {
    /// The pipeline folder; with a `controlnet/` (`Salesforce/blipdiffusion-controlnet`) or --controlnet.
    #[arg(long)]
    pub model: PathBuf,
    /// A diffusers ControlNetModel folder (lllyasviel/sd-controlnet-canny) when --model has none.
    #[arg(long)]
    pub controlnet: Option<PathBuf>,
    /// The style image (the subject whose look is carried over).
    #[arg(long)]
    pub style_image: PathBuf,
    /// The style image's category, fed to the Q-Former (e.g. "flower").
    #[arg(long)]
    pub style_subject: String,
    /// The photo whose structure (Canny edges) the result follows.
    #[arg(long)]
    pub structure: PathBuf,
    /// Canny thresholds LOW,HIGH (LAVIS' stylization notebook: 30,70).
    #[arg(long, default_value = "30,70", value_name = "LOW,HIGH")]
    pub canny: String,
    /// The object named in the prompt (e.g. "teapot").
    #[arg(long)]
    pub target_subject: String,
    /// The context, e.g. "on a marble table".
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 1.0)]
    pub controlnet_scale: f64,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    #[arg(long, default_value = "")]
    pub neg_prompt: String,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// LAVIS preprocessing of the style image instead of diffusers'.
    #[arg(long)]
    pub lavis: bool,
    #[arg(long)]
    pub bert_vocab: Option<PathBuf>,
    /// The result; the edge map goes beside it as `<stem>.canny.png`.
    #[arg(long, default_value = "stylized.png")]
    pub out: PathBuf,
}

pub fn run(a: StylizeArgs) -> Result<ExitCode> {
    generate_cmd::run(GenerateArgs {
        model: a.model,
        image: vec![a.style_image],
        subject: vec![a.style_subject],
        ratio: Vec::new(),
        control_image: Some(a.structure),
        canny: Some(a.canny),
        controlnet: a.controlnet,
        controlnet_scale: a.controlnet_scale,
        mixed_precision: Precision::No,
        target_subject: Some(a.target_subject),
        prompt: a.prompt,
        steps: a.steps,
        guidance_scale: a.guidance_scale,
        neg_prompt: a.neg_prompt,
        height: Some(a.height),
        width: Some(a.width),
        seed: a.seed,
        latents: None,
        num_images: None,
        scheduler: SchedulerArg::Pndm,
        lavis: a.lavis,
        lora: None,
        lora_scale: 1.0,
        bert_vocab: a.bert_vocab,
        out: a.out,
    })
}
