//! The `blipd` command line.

mod arrays;
mod bench_cmd;
mod data_cmd;
mod edit_cmd;
mod eval_cmd;
mod generate_cmd;
mod interpolate_cmd;
mod plan;
mod stylize_cmd;
mod sweep;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use plan::PretrainPlan;

#[cfg(feature = "cuda")]
type Inner = burn::backend::Cuda<f32>;
#[cfg(all(feature = "flex", not(feature = "cuda")))]
type Inner = burn::backend::Flex;
#[cfg(not(any(feature = "cuda", feature = "flex")))]
type Inner = burn::backend::NdArray<f32>;
type Train = burn::backend::Autodiff<Inner>;

#[derive(Parser)]
#[command(
    name = "blipd",
    version,
    about = "BLIP-Diffusion pre-training, fine-tuning and inference on Burn"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `blipd_train=debug`. burn-collective's
    /// per-transfer chatter is kept at `warn` by default.
    #[arg(
        long,
        global = true,
        default_value = "info,burn_collective=warn,burn_communication=warn",
        env = "BLIPD_LOG"
    )]
    log: String,
    #[command(subcommand)]
    command: Command,
}

/// `--mixed-precision` of inference commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Precision {
    No,
    Bf16,
}

impl From<Precision> for blipd_train::MixedPrecision {
    fn from(p: Precision) -> Self {
        match p {
            Precision::No => blipd_train::MixedPrecision::No,
            Precision::Bf16 => blipd_train::MixedPrecision::Bf16,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Pre-train: stage 1 then stage 2 of a plan (with no --config: the embedded tiny default, a few
    /// minutes on a CPU).
    Pretrain {
        /// A plan config (configs/tiny.toml, configs/stage2/sd15.toml, ...).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key, e.g. `--set stage2.train.max_steps=10` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Root folder of the run (replaces the config's `dir`).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// When the run folder has checkpoints and none of them is valid, set them aside and start
        /// from step 0 (without it, the run stops and lists what was rejected).
        #[arg(long)]
        restart: bool,
    },
    /// Continue a run from its newest valid checkpoint (exact on CPU).
    Resume {
        /// The run folder (holding plan.toml).
        run_dir: PathBuf,
        /// Override a config key (e.g. a longer `stage2.train.max_steps`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// When no checkpoint of a stage is valid, set them aside and start that stage from step 0
        /// (without it, resume stops and lists what was rejected and why).
        #[arg(long)]
        restart: bool,
    },
    /// Fine-tune on a few photos of one subject (the released recipe: U-Net + cached subject
    /// embedding, 40–120 steps) and export a pipeline folder that generates that subject.
    Finetune {
        /// A fine-tuning config (configs/finetune/dreambench-dog.toml, configs/finetune/tiny.toml).
        #[arg(long)]
        config: PathBuf,
        /// Override a config key, e.g. `--set train.max_steps=80` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// The run folder (replaces the config's `run.dir`).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// When the run folder has checkpoints and none of them is valid, set them aside and start
        /// from step 0.
        #[arg(long)]
        restart: bool,
        /// Train LoRA adapters of this rank on the frozen U-Net's attention projections (with the
        /// subject embedding) instead of the whole U-Net, and export them as a few-MB adapter in the
        /// diffusers/PEFT layout (sets `[stage.lora] rank`). A higher learning rate than the full
        /// recipe's 5e-6 suits it (diffusers' LoRA scripts: 1e-4).
        #[arg(long, value_name = "RANK")]
        lora: Option<usize>,
        /// `lora_alpha` (default: the rank, scale 1).
        #[arg(long, requires = "lora")]
        lora_alpha: Option<f64>,
    },
    /// Run the variants of a sweep file (the paper's ablations) and write one comparison table.
    Sweep {
        /// e.g. configs/sweeps/ablation.toml
        file: PathBuf,
        /// Override applied to every variant.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Runs at once (the file's `jobs`); the cores are split between them.
        #[arg(long)]
        jobs: Option<usize>,
        /// Seeds per variant (the file's `seeds`).
        #[arg(long)]
        seeds: Option<usize>,
    },
    /// Write loss curves (PNG) for every metrics.jsonl under a run folder, and one figure with all
    /// of them when there are several (`<key>-all.png`).
    Plot {
        run_dir: PathBuf,
        /// Metric to plot.
        #[arg(long, default_value = "loss")]
        key: String,
        /// Logarithmic y axis.
        #[arg(long)]
        log_y: bool,
    },
    /// List each component of a diffusers folder with its parameter count and dtype, and load it
    /// strictly; exits non-zero with every problem listed.
    InspectWeights { dir: PathBuf },
    /// Zero-shot subject-driven generation from a diffusers BLIP-Diffusion folder
    /// (`Salesforce/blipdiffusion` layout), as diffusers' `BlipDiffusionPipeline`.
    Generate(generate_cmd::GenerateArgs),
    /// The subject embedding `[1, Q, D]` of reference images (the Q-Former's output after the
    /// projection, averaged over the images): what fine-tuning caches and interpolation mixes, for
    /// comparing with another implementation. `.npy` (float32) or `.safetensors` (tensor
    /// `ctx_embeddings_cache`: dropped into a pipeline folder it makes `generate` use it, as a
    /// fine-tuned folder's does).
    EmbedSubject {
        #[arg(long)]
        model: PathBuf,
        /// Reference images (repeatable; the embeddings are averaged).
        #[arg(long, required = true)]
        image: Vec<PathBuf>,
        /// The subject's class noun, e.g. "dog".
        #[arg(long)]
        subject: String,
        /// LAVIS preprocessing instead of diffusers'.
        #[arg(long)]
        lavis: bool,
        #[arg(long)]
        bert_vocab: Option<PathBuf>,
        /// Output file: `*.npy` or `*.safetensors`.
        #[arg(long)]
        out: PathBuf,
    },
    /// The synthetic-pair data pipeline (filter, masks, matting, compositing, shards).
    Data(data_cmd::DataArgs),
    /// Where the time and memory of a generation go, per phase, with the achieved GFLOP/s
    /// (side by side with PyTorch: scripts/bench/vs_torch.sh).
    Bench(bench_cmd::BenchArgs),
    /// DreamBench DINO / CLIP-I / CLIP-T scores of generated images (DreamBooth's protocol, docs/eval.md).
    Eval(eval_cmd::EvalArgs),
    /// Subject interpolation (paper fig. 9): 2–4 subjects' embeddings blended bilinearly and rendered
    /// in one context from one noise, as a PNG grid whose corners are the subjects themselves.
    Interpolate(interpolate_cmd::InterpolateArgs),
    /// Subject-driven editing with prompt-to-prompt (paper fig. 4 right, fig. 5 rows 9–10; LAVIS's
    /// algorithm): the --src-subject of a generated scene, or of a photo (DDIM inversion), becomes the
    /// reference subject.
    Edit(edit_cmd::EditArgs),
    /// Stylization (paper fig. 10): a style image as the subject, the structure as Canny edges of a
    /// photo through ControlNet-canny, a target subject in the prompt.
    Stylize(stylize_cmd::StylizeArgs),
    /// Run a command as N local worker processes with torchrun's variables set
    /// (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
    Launch {
        /// Workers on this machine (one per GPU).
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
        /// Machines in the job.
        #[arg(long, default_value_t = 1)]
        nnodes: usize,
        /// This machine's index in the job.
        #[arg(long, default_value_t = 0)]
        node_rank: usize,
        #[arg(long, default_value = "127.0.0.1")]
        master_addr: String,
        #[arg(long, default_value_t = 29500)]
        master_port: u16,
        /// The blipd arguments each worker runs (after `--`), e.g. `-- pretrain --config ...`.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `": "`, each cause once: library errors often print their
/// source in their own message (`"{path}: {source}"`) and also return it as `source()`, which
/// `{:#}` would print a second time.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if msg.is_empty() || out.ends_with(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Pretrain {
            config,
            sets,
            run_dir,
            restart,
        } => {
            let plan = match &config {
                Some(path) => PretrainPlan::load(path, &sets, run_dir.as_deref())?,
                None => PretrainPlan::parse(plan::TINY, &sets, run_dir.as_deref())
                    .context("the embedded configs/tiny.toml")?,
            };
            pretrain(plan, restart, "pretrain")
        }
        Command::Resume {
            run_dir,
            sets,
            restart,
        } => {
            let plan = PretrainPlan::open_run(&run_dir, &sets)?;
            pretrain(plan, restart, "resume")
        }
        Command::Finetune {
            config,
            sets,
            run_dir,
            restart,
            lora,
            lora_alpha,
        } => finetune(&config, &sets, run_dir, restart, lora, lora_alpha),
        Command::Sweep {
            file,
            sets,
            jobs,
            seeds,
        } => {
            sweep::run(&file, &sets, sweep::Overrides { jobs, seeds })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot {
            run_dir,
            key,
            log_y,
        } => plot(&run_dir, &key, log_y),
        Command::InspectWeights { dir } => inspect(&dir),
        Command::Data(args) => data_cmd::run(args),
        Command::Bench(args) => {
            bench_cmd::run::<Train>(args, &device())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(args) => eval_cmd::run(args),
        Command::Interpolate(args) => interpolate_cmd::run(args),
        Command::Edit(args) => edit_cmd::run(args),
        Command::Stylize(args) => stylize_cmd::run(args),
        Command::Generate(args) => generate_cmd::run(args),
        Command::EmbedSubject {
            model,
            image,
            subject,
            lavis,
            bert_vocab,
            out,
        } => embed_subject(&model, &image, &subject, lavis, bert_vocab.as_deref(), &out),
        Command::Launch {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            args,
        } => launch(blipd_dist::launch::LaunchSpec {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            program: std::env::current_exe().context("locating the blipd binary")?,
            args,
        }),
    }
}

/// `blipd finetune`: a fine-tuning run (LoRA when `lora` is set) and its export.
fn finetune(
    config: &Path,
    sets: &[String],
    run_dir: Option<PathBuf>,
    restart: bool,
    lora: Option<usize>,
    lora_alpha: Option<f64>,
) -> Result<ExitCode> {
    let mut cfg: blipd_stage2::finetune::FinetuneRunConfig = blipd_train::load_config(config, sets)
        .with_context(|| format!("reading {}", config.display()))?;
    if let Some(d) = run_dir {
        cfg.run.dir = d;
    }
    if let Some(rank) = lora {
        let mut spec = cfg
            .stage
            .lora
            .take()
            .unwrap_or_else(|| blipd_models::lora::LoraSpec::new(rank));
        spec.rank = rank;
        if lora_alpha.is_some() {
            spec.alpha = lora_alpha;
        }
        cfg.stage.lora = Some(spec);
    }
    warn_restart_key(cfg.checkpoint.restart, restart);
    cfg.checkpoint.restart = restart;
    let _lock = blipd_train::RunLock::acquire(&cfg.run.dir, rank(), "finetune")?;
    let start = Instant::now();
    tracing::info!(
        "fine-tuning {:?}: {} steps × batch {} in {}",
        cfg.stage.subject,
        cfg.train.max_steps,
        cfg.train.batch_size,
        cfg.run.dir.display()
    );
    let summary = blipd_stage2::finetune::run_finetune::<Train>(&cfg, device())
        .with_context(|| format!("fine-tuning in {}", cfg.run.dir.display()))?;
    report("finetune", &summary, start, &cfg.run.dir);
    if blipd_dist::World::from_env().map_or(true, |w| w.rank == 0) {
        let out = blipd_stage2::finetune::export_dir(&cfg);
        if cfg.stage.lora.is_some() {
            println!(
                "finetune: LoRA adapter and subject embedding exported to {} (blipd generate --model {} --lora {} needs no --image)",
                out.display(),
                cfg.stage.model_dir.display(),
                out.display()
            );
        } else {
            println!(
                "finetune: pipeline exported to {} (blipd generate --model … needs no --image)",
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `blipd launch`: the local worker processes, torchrun-style; fails when any worker fails.
fn launch(spec: blipd_dist::launch::LaunchSpec) -> Result<ExitCode> {
    if spec.nproc_per_node == 0 || spec.nnodes == 0 || spec.node_rank >= spec.nnodes {
        bail!("need nproc-per-node ≥ 1, nnodes ≥ 1 and node-rank < nnodes");
    }
    let out = blipd_dist::launch::launch(&spec)?;
    Ok(
        match out.failure_summary(spec.node_rank * spec.nproc_per_node) {
            None => ExitCode::SUCCESS,
            Some(line) => {
                eprintln!("error: {line}");
                ExitCode::FAILURE
            }
        },
    )
}

/// The compute device: the CPU.
#[cfg(not(feature = "cuda"))]
fn device() -> <Inner as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}

/// The compute device: GPU `LOCAL_RANK` (torchrun and `blipd launch` give each rank of a node its
/// own GPU; SLURM's `SLURM_LOCALID`; 0 for a single process). It is probed once, so a machine
/// without a usable CUDA driver gets one clear error instead of a panic deep in a kernel launch.
#[cfg(feature = "cuda")]
fn device() -> <Inner as burn::tensor::backend::BackendTypes>::Device {
    use burn::backend::cuda::CudaDevice;
    static DEVICE: std::sync::OnceLock<CudaDevice> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let index = ["LOCAL_RANK", "SLURM_LOCALID"]
                .iter()
                .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let dev = CudaDevice::new(index);
            // Panics during the probe (also on the runtime's own threads, where the real cause
            // is) are collected for the message instead of printed.
            static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|info| {
                let p = info.payload();
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown failure".into());
                if let Ok(mut seen) = SEEN.lock() {
                    seen.push(msg);
                }
            }));
            let probe = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                burn::tensor::Tensor::<Inner, 1>::ones([4], &dev)
                    .sum()
                    .into_scalar()
            }));
            std::panic::set_hook(hook);
            if probe.is_err() {
                let why = SEEN
                    .lock()
                    .map(|s| s.join("; "))
                    .unwrap_or_else(|_| "unknown failure".into());
                eprintln!(
                    "error: CUDA device {index} is not usable: {why}\n\
                     (this blipd was built with `--features cuda`; it needs an NVIDIA driver and \
                     GPU {index}; build without the feature for the CPU)"
                );
                std::process::exit(1);
            }
            dev
        })
        .clone()
}

/// This process's rank in a data-parallel job (0 alone).
fn rank() -> usize {
    blipd_dist::World::from_env().map_or(0, |w| w.rank)
}

fn embed_subject(
    model: &Path,
    images: &[PathBuf],
    subject: &str,
    lavis: bool,
    bert_vocab: Option<&Path>,
    out: &Path,
) -> Result<ExitCode> {
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !matches!(ext, "npy" | "safetensors") {
        bail!(
            "--out {}: the file must end in .npy or .safetensors",
            out.display()
        );
    }
    if subject.trim().is_empty() {
        bail!("--subject is empty: give the subject's class noun, e.g. \"dog\"");
    }
    let opts = if lavis {
        blipd_apps::GenerateOptions::lavis()
    } else {
        blipd_apps::GenerateOptions::default()
    };
    let pipe = blipd_apps::BlipDiffusionPipeline::<Inner>::load(model, bert_vocab, &device())
        .with_context(|| format!("loading {}", model.display()))?;
    // Every image is read before the first embedding, so a bad path fails fast.
    let references = images
        .iter()
        .map(|p| blipd_apps::RgbImage::open(p).map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let mut sum: Option<burn::tensor::Tensor<Inner, 3>> = None;
    for reference in &references {
        let e = pipe.reference_embedding(reference, subject, &opts)?;
        sum = Some(match sum {
            None => e,
            Some(s) => s + e,
        });
    }
    let ctx = sum.expect("at least one image (clap requires --image)") / references.len() as f64;
    let dims = ctx.dims();
    let data = ctx.into_data().convert::<f32>();
    let tmp = out.with_extension(format!("{ext}.tmp"));
    if ext == "npy" {
        blipd_data::npy::write_f32(
            &tmp,
            &dims,
            &data.to_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?,
        )?;
    } else {
        blipd_models::weights::write_safetensors(
            &tmp,
            &[(blipd_models::ctx_clip_text::CTX_CACHE_KEY.to_string(), data)],
            None,
        )?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{}: subject embedding {dims:?} of {subject:?}, mean over {} image{}",
        out.display(),
        references.len(),
        if references.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}

/// `checkpoint.restart` from a file or `--set` is replaced by the `--restart` flag (setting invalid
/// checkpoints aside is a decision for one invocation, never saved with the run): say so when they differ.
fn warn_restart_key(from_config: bool, flag: bool) {
    if from_config && !flag {
        tracing::warn!(
            "checkpoint.restart = true in the config is ignored: pass --restart to set invalid \
             checkpoints aside in this invocation"
        );
    }
}

/// Runs a validated plan (`what`: the command, named in the run folder's lock file).
fn pretrain(mut plan: PretrainPlan, restart: bool, what: &str) -> Result<ExitCode> {
    // One writer per run folder: taken before plan.toml is (re)written.
    let _lock = blipd_train::RunLock::acquire(&plan.dir, rank(), what)?;
    let path = plan.write()?;
    // `--restart` is for this invocation only: it is not in plan.toml.
    for c in plan.checkpoint_sections_mut() {
        warn_restart_key(c.restart, restart);
        c.restart = restart;
    }
    tracing::info!(
        "run folder {} (resolved config: {})",
        plan.dir.display(),
        path.display()
    );
    let mut stage2 = plan.stage2.clone();
    if let Some(cfg) = &plan.vae {
        let start = Instant::now();
        tracing::info!(
            "vae: {} steps × batch {} in {}",
            cfg.train.max_steps,
            cfg.train.batch_size,
            cfg.run.dir.display()
        );
        let summary = blipd_stage2::autoencoder::run_vae::<Train>(cfg, device())
            .with_context(|| format!("vae in {}", cfg.run.dir.display()))?;
        report("vae", &summary, start, &cfg.run.dir);
        if let Some(s2) = stage2.as_mut() {
            if s2.stage.vae_dir.is_none() && s2.stage.model_dir.is_none() {
                let export = blipd_stage2::autoencoder::export_dir(cfg);
                tracing::info!("stage 2: VAE from the [vae] stage ({})", export.display());
                s2.stage.vae_dir = Some(export);
            }
        }
    }
    if let Some(cfg) = &plan.stage1 {
        let start = Instant::now();
        tracing::info!(
            "stage 1: {} steps × batch {} in {}",
            cfg.train.max_steps,
            cfg.train.batch_size,
            cfg.run.dir.display()
        );
        let summary = blipd_stage1::run::run_stage1::<Train>(cfg, device())
            .with_context(|| format!("stage 1 in {}", cfg.run.dir.display()))?;
        report("stage 1", &summary, start, &cfg.run.dir);
        // Stage 2 starts from the multimodal pre-training unless told otherwise.
        if let Some(s2) = stage2.as_mut() {
            if s2.stage.qformer_init == blipd_stage2::QFormerInit::Pretrained {
                let export = blipd_stage1::run::export_dir(cfg).join("qformer/model.safetensors");
                tracing::info!("stage 2: Q-Former from stage 1 ({})", export.display());
                s2.stage.qformer_init = blipd_stage2::QFormerInit::Stage1(export);
            }
        }
    }
    if let Some(cfg) = &stage2 {
        let start = Instant::now();
        tracing::info!(
            "stage 2: {} steps × batch {} in {}",
            cfg.train.max_steps,
            cfg.train.batch_size,
            cfg.run.dir.display()
        );
        let summary = blipd_stage2::run::run_stage2::<Train>(cfg, device())
            .with_context(|| format!("stage 2 in {}", cfg.run.dir.display()))?;
        report("stage 2", &summary, start, &cfg.run.dir);
        if cfg.stage.export && blipd_dist::World::from_env().map_or(true, |w| w.rank == 0) {
            println!(
                "stage 2: pipeline exported to {} (blipd generate --model …)",
                blipd_stage2::run::export_dir(cfg).display()
            );
        }
    }
    if let (Some(eval), Some(cfg)) = (&plan.eval, &stage2) {
        if blipd_dist::World::from_env().map_or(true, |w| w.rank == 0) {
            micro_eval(
                eval,
                &blipd_stage2::run::export_dir(cfg),
                &plan.dir.join("eval"),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The plan's `[eval]`: train the probe, generate the held-out subjects zero-shot and text-only with
/// the exported pipeline, write `zero_shot.json` and `zero_shot.png` into `out`, print the table.
fn micro_eval(cfg: &blipd_apps::micro::MicroEvalConfig, model: &Path, out: &Path) -> Result<()> {
    use blipd_apps::micro;
    let start = Instant::now();
    let dev = device();
    tracing::info!(
        "eval: training the probe classifier ({} steps)",
        cfg.probe_steps
    );
    let (probe, accuracy) = micro::train_probe::<Train>(cfg, &dev);
    tracing::info!(
        "eval: probe accuracy on held-out renders: palette {:.3}, pattern {:.3}, scene {:.3}, shape \
         {:.3}",
        accuracy.palette,
        accuracy.pattern,
        accuracy.scene,
        accuracy.shape
    );
    let pipe = blipd_apps::BlipDiffusionPipeline::<Inner>::load(model, None, &dev)
        .with_context(|| format!("loading {}", model.display()))?;
    let (report, sheet) = micro::evaluate(&pipe, &probe, accuracy, cfg)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("zero_shot.json");
    blipd_models::weights::atomic_write(&json, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", json.display()))?;
    let png = out.join("zero_shot.png");
    let big = image::imageops::resize(
        &sheet,
        sheet.width() * 4,
        sheet.height() * 4,
        image::imageops::FilterType::Nearest,
    );
    big.save(&png)
        .with_context(|| format!("writing {}", png.display()))?;
    let (z, t) = (&report.zero_shot, &report.text_only);
    println!(
        "eval: {} {} subjects, {} images ({:.1} s); probe on held-out renders: palette {:.2}, \
         pattern {:.2}, scene {:.2}",
        report.held_out_subjects,
        match cfg.split {
            micro::Split::HeldOut => "held-out",
            micro::Split::Train => "training (diagnostic)",
        },
        report.images,
        start.elapsed().as_secs_f64(),
        report.probe.palette,
        report.probe.pattern,
        report.probe.scene
    );
    print_details(&[("zero-shot", z), ("text-only", t)]);
    println!(
        "  (chance subject fidelity {:.3}; rows of {}: reference, zero-shot, text-only)",
        report.chance_subject_fidelity,
        png.display()
    );
    if let Some(ft) = cfg.finetune.as_ref().filter(|f| f.subjects > 0) {
        micro_finetune_eval(cfg, ft, model, out, &pipe, &probe)?;
    }
    Ok(())
}

/// The micro evaluation's table: one row per condition.
fn print_details(rows: &[(&str, &blipd_apps::micro::Detail)]) {
    println!("             subject fidelity   text alignment   palette  pattern");
    for (name, d) in rows {
        println!(
            "  {name:<10} {:.3} ± {:.3}      {:.3} ± {:.3}    {:.3}    {:.3}",
            d.subject_fidelity.mean,
            d.subject_fidelity.ci95,
            d.text_alignment.mean,
            d.text_alignment.ci95,
            d.palette,
            d.pattern
        );
    }
}

/// `[eval.finetune]`: fine-tunes the exported pipeline on each of the first held-out subjects
/// (`<out>/finetune/<k>/`: its renders in `images/`, the run in `run/`), then compares each
/// fine-tuned pipeline with zero-shot generation → `finetune.json`, `finetune.png`, a table.
fn micro_finetune_eval(
    cfg: &blipd_apps::micro::MicroEvalConfig,
    ft: &blipd_apps::micro::MicroFinetuneConfig,
    model: &Path,
    out: &Path,
    base: &blipd_apps::BlipDiffusionPipeline<Inner>,
    probe: &blipd_apps::micro::Probe<Inner>,
) -> Result<()> {
    use blipd_apps::micro;
    let start = Instant::now();
    let dev = device();
    let mut tuned = Vec::with_capacity(ft.subjects);
    for j in 0..ft.subjects {
        let (k, identity, images) = micro::finetune_subject(cfg, j)?;
        let dir = out.join("finetune").join(k.to_string());
        let img_dir = dir.join("images");
        std::fs::create_dir_all(&img_dir)
            .with_context(|| format!("creating {}", img_dir.display()))?;
        for (j, img) in images.iter().enumerate() {
            let p = img_dir.join(format!("{j:02}.png"));
            img.save(&p)
                .with_context(|| format!("writing {}", p.display()))?;
        }
        let subject = blipd_data::synthetic::SHAPES[identity.shape];
        let toml_text = format!(
            "[run]\ndir = {run:?}\nseed = {seed}\n\n[train]\nmax_steps = {steps}\nbatch_size = \
             {batch}\nlog_every = {log}\n\n[optimizer]\nlr = {lr:e}\nweight_decay = 0.01\n\n\
             [schedule]\nkind = \"constant\"\n\n[checkpoint]\nevery = 0\n\n[sample]\nevery = \
             0\nat_end = false\n\n[stage]\nmodel_dir = {model:?}\nsubject = {subject:?}\n\n[data]\n\
             images = {images:?}\ntarget_size = {size}\n",
            run = dir.join("run").display().to_string(),
            seed = cfg.seed + k as u64,
            steps = ft.steps,
            batch = ft.batch_size,
            log = ft.steps.div_ceil(4),
            lr = ft.lr,
            model = model.display().to_string(),
            images = img_dir.display().to_string(),
            size = cfg.size,
        ) + &ft
            .lora_rank
            .map(|r| format!("\n[stage.lora]\nrank = {r}\n"))
            .unwrap_or_default();
        let run_cfg: blipd_stage2::finetune::FinetuneRunConfig =
            toml::from_str(&toml_text).context("the fine-tuning config of [eval.finetune]")?;
        tracing::info!(
            "eval: fine-tuning on held-out subject {k} ({}), {} steps",
            identity.describe(),
            ft.steps
        );
        blipd_stage2::finetune::run_finetune_single::<Train>(&run_cfg, device())
            .with_context(|| format!("fine-tuning in {}", dir.display()))?;
        let export = blipd_stage2::finetune::export_dir(&run_cfg);
        let pipe = match ft.lora_rank {
            None => blipd_apps::BlipDiffusionPipeline::<Inner>::load(&export, None, &dev),
            Some(_) => blipd_apps::BlipDiffusionPipeline::<Inner>::load(model, None, &dev)
                .and_then(|p| p.with_lora(&export, 1.0)),
        }
        .with_context(|| format!("loading {}", export.display()))?;
        tuned.push((k, pipe));
    }
    let pairs: Vec<(usize, &blipd_apps::BlipDiffusionPipeline<Inner>)> =
        tuned.iter().map(|(k, p)| (*k, p)).collect();
    let (report, sheet) = micro::compare_finetuned(base, &pairs, probe, cfg)?;
    let json = out.join("finetune.json");
    blipd_models::weights::atomic_write(&json, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", json.display()))?;
    let png = out.join("finetune.png");
    image::imageops::resize(
        &sheet,
        sheet.width() * 4,
        sheet.height() * 4,
        image::imageops::FilterType::Nearest,
    )
    .save(&png)
    .with_context(|| format!("writing {}", png.display()))?;
    println!(
        "eval: fine-tuned ({}{} steps, lr {:e}) vs zero-shot on {} held-out subjects, {} images ({:.1} s)",
        ft.lora_rank
            .map(|r| format!("LoRA rank {r}, "))
            .unwrap_or_default(),
        ft.steps,
        ft.lr,
        report.subjects.len(),
        report.images,
        start.elapsed().as_secs_f64()
    );
    print_details(&[
        ("zero-shot", &report.zero_shot),
        ("fine-tuned", &report.finetuned),
    ]);
    println!(
        "  (rows of {}: reference, zero-shot, fine-tuned)",
        png.display()
    );
    Ok(())
}

fn report(stage: &str, summary: &blipd_train::RunSummary, start: Instant, dir: &Path) {
    // In a data-parallel job every rank ends with the same summary: rank 0 prints it.
    if blipd_dist::World::from_env().is_ok_and(|w| w.rank != 0) {
        return;
    }
    let secs = start.elapsed().as_secs_f64();
    let last = summary
        .last
        .as_ref()
        .map(|s| format!("{:.4}", s.loss))
        .unwrap_or_else(|| "-".into());
    println!(
        "{stage}: step {} ({} step{} run{}), last loss {last}, {secs:.1} s; outputs in {}",
        summary.final_step,
        summary.steps_run,
        if summary.steps_run == 1 { "" } else { "s" },
        summary
            .resumed_from
            .map(|s| format!(", resumed from step {s}"))
            .unwrap_or_default(),
        dir.display()
    );
}

fn plot(run_dir: &Path, key: &str, log_y: bool) -> Result<ExitCode> {
    let mut found = Vec::new();
    for dir in [run_dir.to_path_buf()].into_iter().chain(
        std::fs::read_dir(run_dir)
            .with_context(|| format!("reading {}", run_dir.display()))?
            .flatten()
            .map(|e| e.path()),
    ) {
        let m = dir.join("metrics.jsonl");
        if m.is_file() {
            found.push((dir, m));
        }
    }
    if found.is_empty() {
        bail!(
            "no metrics.jsonl in {} or its sub-folders",
            run_dir.display()
        );
    }
    let opts = blipd_train::PlotOptions {
        key: key.to_string(),
        log_y,
        ..Default::default()
    };
    for (dir, m) in &found {
        let png = dir.join(format!("{key}.png"));
        let n = blipd_train::plot_metrics(m, &png, &opts)?;
        println!("{} ({n} points)", png.display());
    }
    // Several runs (the stages of a plan, the variants of a sweep): also one figure with them all.
    if found.len() > 1 {
        let series = found
            .iter()
            .map(|(dir, m)| {
                let label = dir
                    .strip_prefix(run_dir)
                    .ok()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(dir)
                    .display()
                    .to_string();
                Ok(blipd_train::Series {
                    label,
                    points: blipd_train::metrics::read_series(m, key)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let png = run_dir.join(format!("{key}-all.png"));
        let n = blipd_train::plot_series(&series, &png, &opts)?;
        println!("{} ({} runs, {n} points)", png.display(), series.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(dir: &Path) -> Result<ExitCode> {
    let reports = blipd_apps::inspect::inspect_folder::<Inner>(dir, &device())?;
    let mut bad = 0;
    println!(
        "{:<16} {:<24} {:>15}  {:<12} status",
        "component", "class", "parameters", "dtype"
    );
    for r in &reports {
        let dtypes: Vec<&str> = r.dtypes.iter().map(String::as_str).collect();
        println!(
            "{:<16} {:<24} {:>15}  {:<12} {}",
            r.name,
            r.class.as_deref().unwrap_or("-"),
            if r.weight_file.is_some() {
                group(r.num_params)
            } else {
                "-".into()
            },
            if dtypes.is_empty() {
                "-".into()
            } else {
                dtypes.join(",")
            },
            if r.problems.is_empty() {
                "ok"
            } else {
                "FAILED"
            }
        );
    }
    for r in &reports {
        for p in &r.problems {
            bad += 1;
            eprintln!("\n{}: {p}", r.name);
        }
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// 859520964 → "859,520,964".
fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a `thiserror` `#[error("{path}: {source}")]` with `#[source]` produces.
    #[derive(Debug)]
    struct Io {
        path: String,
        source: std::io::Error,
    }

    impl std::fmt::Display for Io {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}: {}", self.path, self.source)
        }
    }

    impl std::error::Error for Io {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    /// A cause that its parent already printed is not printed again; new causes are.
    #[test]
    fn error_chain_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(Io {
            path: "nobgs".into(),
            source: io,
        })
        .context("data synth");
        assert_eq!(
            error_chain(&e),
            "data synth: nobgs: No such file or directory"
        );
        assert_eq!(
            format!("{e:#}"),
            "data synth: nobgs: No such file or directory: No such file or directory"
        );
    }
}
