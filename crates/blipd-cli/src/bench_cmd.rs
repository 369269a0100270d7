//! `blipd bench infer|train`: where the time and memory of a generation or a training step go, with
//! the achieved GFLOP/s. Side-by-side runs against PyTorch are `scripts/bench/vs_torch.sh`; nothing
//! here is a timed test.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorData;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(clap::Subcommand)]
enum BenchWhat {
    /// Zero-shot generation (subject embedding, text, each U-Net call, VAE decode) from a diffusers
    /// BLIP-Diffusion folder, e.g. the one `../shared/bench/torch_cpu.py infer` writes.
    Infer(InferArgs),
    /// Stage-2 training steps (the trainer's own step: frozen VAE encode and ViT, Q-Former →
    /// subject embeddings → text encoder → U-Net ε-MSE, backward, AdamW) on random inputs, from a
    /// diffusers folder such as the one `../shared/bench/torch_cpu.py train` writes.
    Train(TrainArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// The pipeline folder (diffusers `Salesforce/blipdiffusion` layout) whose networks are trained.
    #[arg(long)]
    model: PathBuf,
    /// Target side in pixels (the VAE input; latents are size/8).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Samples per step.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Learning rate and weight decay of AdamW (torch_cpu.py: 2e-6, 0.01).
    #[arg(long, default_value_t = 2e-6)]
    lr: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value = "dog")]
    subject: String,
    #[arg(long, default_value = "swimming underwater")]
    prompt: String,
    /// BERT-uncased vocab.txt for the Q-Former (else <model>/qformer/vocab.txt).
    #[arg(long)]
    bert_vocab: Option<PathBuf>,
    /// Targets as cached VAE moments (what `blipd data encode-latents` provides) instead of pixels:
    /// the step skips the VAE encoder, work the PyTorch reference does. Random mean and std of the
    /// latent shape; reading them from a side file (32 KiB a sample at 256²) is not timed.
    #[arg(long)]
    cached_moments: bool,
    /// Write the measurements as JSON here (one object; also printed as the last stdout line).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct InferArgs {
    /// The pipeline folder (diffusers `Salesforce/blipdiffusion` layout).
    #[arg(long)]
    model: PathBuf,
    /// Reference image of the subject.
    #[arg(long)]
    image: PathBuf,
    #[arg(long, default_value = "dog")]
    subject: String,
    #[arg(long, default_value = "swimming underwater")]
    prompt: String,
    /// Output side in pixels (square), unless --latents decides it.
    #[arg(long, default_value_t = 256)]
    size: usize,
    #[arg(long, default_value_t = 3)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// Initial latents, float32 `(1, 4, h, w)` (`latents_in.npy` of torch_cpu.py): the size is
    /// `h·f × w·f`.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Reference images, float32 NHWC in [0, 1] (`generate_<N>steps.npy`): prints the max-abs
    /// difference.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Write the generated images here (float32 NHWC in [0, 1]).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the measurements as JSON here (one object; also printed as the last stdout line).
    #[arg(long)]
    json: Option<PathBuf>,
    /// BERT-uncased vocab.txt for the Q-Former (else <model>/qformer/vocab.txt).
    #[arg(long)]
    bert_vocab: Option<PathBuf>,
}

pub fn run<A: AutodiffBackend>(args: BenchArgs, device: &A::Device) -> Result<()> {
    match args.what {
        BenchWhat::Infer(a) => infer::<A::InnerBackend>(a, device),
        BenchWhat::Train(a) => train::<A>(a, device),
    }
}

/// Random stage-2 batches shaped like torch_cpu.py's (`randn` subject images and targets).
struct RandomBatches {
    batch: usize,
    image_size: usize,
    target_size: usize,
    subject: String,
    caption: String,
    /// `Some([C, h, w])`: targets as cached moments of that latent shape.
    moments: Option<[usize; 3]>,
    rng: blipd_train::TrainRng,
}

impl blipd_train::BatchSource for RandomBatches {
    type Batch = blipd_stage2::Stage2Batch;

    fn next_batch(&mut self) -> blipd_train::Result<Self::Batch> {
        let b = self.batch;
        let normal = |rng: &mut blipd_train::TrainRng, n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    use rand::Rng;
                    let u1: f64 = rng.random::<f64>().max(1e-12);
                    let u2: f64 = rng.random();
                    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect()
        };
        let (si, st) = (self.image_size, self.target_size);
        let input = TensorData::new(normal(&mut self.rng, b * 3 * si * si), [b, 3, si, si]);
        let target = match self.moments {
            None => blipd_stage2::Targets::Pixels(TensorData::new(
                normal(&mut self.rng, b * 3 * st * st),
                [b, 3, st, st],
            )),
            Some([c, h, w]) => {
                let n = b * c * h * w;
                let std = normal(&mut self.rng, n)
                    .into_iter()
                    .map(|v| 0.1 * v.abs() + 1e-3)
                    .collect();
                blipd_stage2::Targets::Moments {
                    mean: TensorData::new(normal(&mut self.rng, n), [b, c, h, w]),
                    std: TensorData::new(std, [b, c, h, w]),
                }
            }
        };
        Ok(blipd_stage2::Stage2Batch {
            input,
            target,
            subjects: vec![self.subject.clone(); b],
            captions: vec![self.caption.clone(); b],
            sample_rngs: None,
        })
    }

    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn load_state(&mut self, _state: &serde_json::Value) -> blipd_train::Result<()> {
        Ok(())
    }
}

fn train<A: AutodiffBackend>(a: TrainArgs, device: &A::Device) -> Result<()> {
    if a.batch == 0 || a.iters == 0 {
        bail!("--batch and --iters must be at least 1");
    }
    let backend = A::name(device);
    // What torch_cpu.py trains: every sample keeps its subject (no dropping), the released prompt
    // (`"a {subject} {prompt}"` ×20, the embeddings spliced at position 2), the text encoder trained.
    let cfg = blipd_stage2::Stage2Config {
        model_dir: Some(a.model.clone()),
        subject_drop_prob: 0.0,
        bert_vocab: a.bert_vocab.clone(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let parts = blipd_stage2::Stage2Components::<A>::from_diffusers(&a.model, &cfg, device)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let image_size = parts.image_size;
    let factor = parts.vae_config.downsample_factor();
    let latent_channels = parts.vae_config.latent_channels;
    let (stage, model) = blipd_stage2::Stage2::new(cfg, parts, a.size, device.clone())?;
    let trainable: usize = blipd_train::params::param_infos(&model)
        .iter()
        .filter(|p| p.trainable)
        .map(|p| p.numel())
        .sum();
    let dir = std::env::temp_dir().join(format!("blipd-bench-train-{}", std::process::id()));
    let toml = format!(
        "[run]\ndir = {dir:?}\nseed = 0\n[train]\nmax_steps = {}\nbatch_size = {}\nprogress = false\n\
         [optimizer]\nlr = {:e}\nweight_decay = {:e}\n",
        a.iters + 1,
        a.batch,
        a.lr,
        a.weight_decay
    );
    let config: blipd_train::TrainerConfig =
        toml::from_str(&toml).context("the bench's trainer config")?;
    let mut trainer = blipd_train::Trainer::new(config, toml, stage, model, device.clone())?;
    let mut data = RandomBatches {
        batch: a.batch,
        image_size,
        target_size: a.size,
        subject: a.subject.clone(),
        caption: a.prompt.clone(),
        moments: a
            .cached_moments
            .then_some([latent_channels, a.size / factor, a.size / factor]),
        rng: blipd_train::TrainRng::new(0, 7),
    };
    println!(
        "bench train: {backend}, {} trainable parameters, batch {}, {}² targets{}, {}² subject images",
        trainable,
        a.batch,
        a.size,
        if a.cached_moments {
            " as cached VAE moments"
        } else {
            ""
        },
        image_size
    );
    let mut step_s = Vec::with_capacity(a.iters + 1);
    for i in 0..=a.iters {
        blipd_models::flops::take();
        if i == 1 {
            blipd_models::cpu::profile::take();
        }
        let t = Instant::now();
        let stats = trainer.train_step(&mut data)?;
        A::sync(device)?;
        let s = t.elapsed().as_secs_f64();
        let gf = blipd_models::flops::take() as f64 / 1e9;
        println!(
            "step {i}{}: {s:.3} s, loss {:.5}, grad-norm {:.4e}, forward {gf:.1} GFLOP counted",
            if i == 0 { " (warm-up)" } else { "" },
            stats.loss,
            stats.grad_norm
        );
        step_s.push(s);
    }
    let timed = &step_s[1..];
    let mean = timed.iter().sum::<f64>() / timed.len() as f64;
    let rss = peak_rss();
    report_kernels(a.iters as f64, mean);
    println!(
        "train: {mean:.3} s/step, {:.4} samples/s (mean of {} steps after the warm-up); load {load_s:.2} s",
        a.batch as f64 / mean,
        timed.len()
    );
    if let Some(r) = rss {
        println!("peak RSS: {:.2} GB", r as f64 / 1e9);
    }
    let json = serde_json::json!({
        "mode": "train",
        "backend": backend,
        "batch": a.batch,
        "size": a.size,
        "cached_moments": a.cached_moments,
        "trainable": trainable,
        "load_s": load_s,
        "step_s": mean,
        "steps_s": timed,
        "samples_per_s": a.batch as f64 / mean,
        "peak_rss_bytes": rss,
    });
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{json}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Peak resident set of this process so far (`VmHWM`), in bytes; `None` off Linux.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Times one phase: runs `f`, waits for the device, and records seconds and counted FLOPs.
struct Phases<B: Backend> {
    device: B::Device,
    rows: Vec<(String, f64, u64)>,
}

impl<B: Backend> Phases<B> {
    fn time<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        B::sync(&self.device)?;
        blipd_models::flops::take();
        let t0 = Instant::now();
        let out = f()?;
        B::sync(&self.device)?;
        self.rows.push((
            name.to_string(),
            t0.elapsed().as_secs_f64(),
            blipd_models::flops::take(),
        ));
        Ok(out)
    }

    fn report(&self) {
        println!(
            "{:<28} {:>9} {:>10} {:>9}",
            "phase", "s", "GFLOP", "GFLOP/s"
        );
        for (name, s, f) in &self.rows {
            let g = *f as f64 / 1e9;
            let rate = if *f > 0 && *s > 0.0 {
                format!("{:.1}", g / s)
            } else {
                "-".into()
            };
            println!("{name:<28} {s:>9.3} {g:>10.1} {rate:>9}");
        }
    }

    fn seconds(&self, prefix: &str) -> f64 {
        self.rows
            .iter()
            .filter(|r| r.0.starts_with(prefix))
            .map(|r| r.1)
            .sum()
    }
}

fn infer<B: Backend>(a: InferArgs, device: &B::Device) -> Result<()> {
    let mut ph = Phases::<B> {
        device: device.clone(),
        rows: Vec::new(),
    };
    let backend = B::name(device);
    let pipe = ph.time("load", || {
        blipd_apps::BlipDiffusionPipeline::<B>::load(&a.model, a.bert_vocab.as_deref(), device)
            .with_context(|| format!("loading {}", a.model.display()))
    })?;
    let f = pipe.latent_factor();
    let latents = match &a.latents {
        None => None,
        Some(p) => {
            let (l, _, _) = crate::arrays::read_latents::<B>(p, f, None, None, device)?;
            let n = l.dims()[0];
            if n != 1 {
                bail!(
                    "{}: {n} latents; bench infer renders one image",
                    p.display()
                );
            }
            Some(l)
        }
    };
    let (height, width) = match &latents {
        Some(l) => {
            let [_, _, h, w] = l.dims();
            (h * f, w * f)
        }
        None => (a.size, a.size),
    };
    let opts = blipd_apps::GenerateOptions {
        num_inference_steps: a.steps,
        guidance_scale: a.guidance_scale,
        height,
        width,
        seed: 0,
        ..Default::default()
    };
    pipe.check_request(1, &opts)?;
    let reference = blipd_apps::RgbImage::open(&a.image)?;
    blipd_models::cpu::profile::take();
    let total = Instant::now();
    let ctx = ph.time("subject embedding", || {
        Ok(pipe.reference_embedding(&reference, &a.subject, &opts)?)
    })?;
    let text = ph.time("text encoder (cond + uncond)", || {
        Ok(pipe.text_embeddings(ctx, &[&a.prompt], &[&a.subject], &opts)?)
    })?;
    let latents = latents.unwrap_or_else(|| pipe.initial_latents(1, &opts));
    // Each U-Net call (CFG: one call on the doubled batch) and its scheduler step, timed from the
    // step callback, which runs after the step's latents exist.
    let mut marks: Vec<(f64, u64)> = Vec::new();
    B::sync(device)?;
    blipd_models::flops::take();
    let t0 = Instant::now();
    let latents = pipe.denoise(latents, text, &opts, &mut |info| {
        let _ = info.latents.clone().into_data(); // the step is done (lazy/async backends)
        marks.push((t0.elapsed().as_secs_f64(), blipd_models::flops::take()));
    })?;
    let mut prev = 0.0;
    for (i, (t, fl)) in marks.iter().enumerate() {
        ph.rows
            .push((format!("U-Net call {i} + PNDM step"), t - prev, *fl));
        prev = *t;
    }
    let images = ph.time("VAE decode", || Ok(pipe.decode(latents)))?;
    let (pixels, dims) = crate::arrays::nhwc_values(images)?;
    let generate_s = total.elapsed().as_secs_f64();
    let rss = peak_rss();
    let kernels = blipd_models::cpu::profile::take();

    println!(
        "bench infer: {backend}, {width}×{height}, {} PNDM steps, guidance {}",
        a.steps, a.guidance_scale
    );
    ph.report();
    let unet_s = ph.seconds("U-Net");
    let counted: u64 = ph.rows.iter().map(|r| r.2).sum();
    println!(
        "generate (all but load): {generate_s:.2} s; U-Net {unet_s:.2} s; {:.1} GFLOP counted, {:.1} GFLOP/s overall",
        counted as f64 / 1e9,
        counted as f64 / 1e9 / generate_s
    );
    println!("FLOPs: {}", blipd_models::flops::CONVENTION);
    for (name, s, calls) in kernels.iter().filter(|r| r.2 > 0) {
        println!(
            "  kernel {name:<22} {s:>8.3} s {:>5.1}% {calls:>6} calls",
            100.0 * s / generate_s
        );
    }
    if let Some(r) = rss {
        println!("peak RSS: {:.2} GB", r as f64 / 1e9);
    }
    let mut diff = None;
    if let Some(p) = &a.compare {
        let reference = blipd_data::npy::read_f32(p)?;
        if reference.shape != dims {
            bail!(
                "{}: images {:?}, blipd made {dims:?}",
                p.display(),
                reference.shape
            );
        }
        let d = max_abs_diff(&pixels, &reference.data);
        println!("max |Δ| vs {}: {d:.3e}", p.display());
        diff = Some(d);
    }
    if let Some(p) = &a.out {
        blipd_data::npy::write_f32(p, &dims, &pixels)?;
    }
    let json = serde_json::json!({
        "mode": "infer",
        "backend": backend,
        "size": [height, width],
        "steps": a.steps,
        "load_s": ph.seconds("load"),
        "embed_s": ph.seconds("subject"),
        "text_s": ph.seconds("text"),
        "unet_s": unet_s,
        "vae_s": ph.seconds("VAE"),
        "generate_s": generate_s,
        "gflop": counted as f64 / 1e9,
        "peak_rss_bytes": rss,
        "max_abs_diff": diff,
    });
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{json}");
    Ok(())
}

/// Seconds per step in each of our CPU kernels (`blipd_models::cpu::profile`), over `steps` steps of
/// `step_s` seconds each; nothing when no kernel ran (another backend).
fn report_kernels(steps: f64, step_s: f64) {
    let rows: Vec<_> = blipd_models::cpu::profile::take()
        .into_iter()
        .filter(|r| r.2 > 0)
        .collect();
    if rows.is_empty() {
        return;
    }
    println!(
        "{:<24} {:>9} {:>7} {:>8}",
        "kernel (per step)", "s", "share", "calls"
    );
    let mut total = 0.0;
    for (name, s, calls) in &rows {
        let per = s / steps;
        total += per;
        println!(
            "{name:<24} {per:>9.3} {:>6.1}% {:>8.0}",
            100.0 * per / step_s,
            *calls as f64 / steps
        );
    }
    println!(
        "{:<24} {:>9.3} {:>6.1}%  (the rest: Burn's own ops, the graph, data, the optimizer)",
        "our kernels, total",
        total,
        100.0 * total / step_s
    );
}

/// Largest |a − b|; infinite when either side has a NaN/Inf or the lengths differ.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let mut m = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        m = m.max((x - y).abs() as f64);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_abs_diff_fails_on_nan_and_length() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
        assert_eq!(max_abs_diff(&[1.0, f32::NAN], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(max_abs_diff(&[1.0], &[1.0, 2.0]), f64::INFINITY);
    }

    #[test]
    fn peak_rss_is_read() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss().unwrap() > 0);
        }
    }
}
