//! `blipd data …`: the synthetic-pair data pipeline from the command line.
//!
//! `filter` (OpenImages CSVs → kept subjects), `masks` (CLIPSeg prompted with the class name, or OpenImages
//! segmentation masks → a `<ImageID>.png` mask folder), `synth` (subjects → masks → trimap → matting → foreground → composite → Parquet shards),
//! `preview` (a PNG grid of stored input/target pairs with their class names and captions) and `matte` (one image).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use blipd_apps::segment::{write_clipseg_masks, ClipSegSegmenter, MaskEvent, MaskJobOptions};
use blipd_data::masks::{MaskSource, MaskStore};
use blipd_data::openimages::{filter_openimages, write_subjects_csv, FilterInputs, ImageDirSizes};
use blipd_data::shards::Manifest;
use blipd_data::shards::Part;
use blipd_data::synth::{read_subjects_csv, synth_part, PipelineConfig, SynthEvent};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MaskSourceArg {
    Dir,
    Openimages,
}

/// Mask sources of `blipd data masks` (CLIPSeg computes masks; `synth` reads folders only).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MasksSourceArg {
    Openimages,
    Dir,
    Clipseg,
}

impl From<MaskSourceArg> for MaskSource {
    fn from(a: MaskSourceArg) -> Self {
        match a {
            MaskSourceArg::Dir => MaskSource::Dir,
            MaskSourceArg::Openimages => MaskSource::OpenImages,
        }
    }
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Cache the VAE posterior of every shard's target images for stage 2 (docs/data-pipeline.md,
    /// "Cached VAE moments"): each pair's mean and std at `--size`, preprocessed as stage 2 does, one
    /// side file per shard and `moments.json`, keyed by the VAE's weights, the size and the crop rule.
    /// A stage-2 run over the folder with that VAE and `[data] target_size` then skips the VAE encoder
    /// (and refuses a cache made for anything else). Resumable: current side files are kept.
    EncodeLatents(EncodeLatentsArgs),
    /// OpenImages V6 subject filter (paper appendix A.5): box CSV + class descriptions (+ image labels)
    /// → kept-subjects CSV, with per-rule drop counts.
    Filter(FilterArgs),
    /// One mask per kept subject into a <ImageID>.png folder (the `dir` mask source of `synth`).
    ///
    /// `--source clipseg` (the paper's way): CLIPSeg rd64-refined prompted with the subject's class name
    /// (`--prompt`, default "{}" = the class name alone). `--from` is a local copy of
    /// CIDAS/clipseg-rd64-refined in the transformers layout (config.json, model.safetensors or
    /// pytorch_model.bin, preprocessor_config.json, vocab.json + merges.txt); nothing is downloaded.
    /// `--images` holds <ImageID>.{jpg,jpeg,png}. Writes sigmoid probabilities at the image size as 16-bit
    /// grey PNGs; batched (`--batch-size`), resumable (masks already in `--out` are skipped), bad images
    /// are listed in <out>/bad_inputs.tsv and the run goes on. Runs on the GPU in a `--features cuda` build.
    ///
    /// `--source openimages`: OpenImages segmentation masks in `--from` (<ImageID>_<mid>_<BoxID>.png, the
    /// one whose box best overlaps the subject's). `--source dir`: re-export a <ImageID>.png folder.
    Masks(MasksArgs),
    /// The whole chain into resumable Parquet shards (rerun after an interruption to finish; completed
    /// shards are kept).
    Synth(SynthArgs),
    /// Join the manifests of a synth run split into N parts (`synth --shard I/N`) into manifest.json,
    /// once every part is complete (the part finishing last does it too); lists the parts still missing.
    MergeManifests(MergeManifestsArgs),
    /// A PNG grid of the first stored pairs: input (subject on a new background) | target, one pair per row,
    /// with the class name, ImageID and caption written under each row.
    Preview(PreviewArgs),
    /// Closed-form matting of one image: trimap grey levels ≤ 10% background, ≥ 90% foreground, else
    /// unknown; α written as a 16-bit grey PNG.
    Matte(MatteArgs),
}

/// Arguments of `blipd data encode-latents`.
#[derive(Args)]
pub struct EncodeLatentsArgs {
    /// Shard folder (`blipd data synth` output).
    #[arg(long)]
    pub shards: PathBuf,
    /// A diffusers pipeline folder (its `vae/`) or a VAE component folder: the VAE stage 2 will use.
    #[arg(long)]
    pub model: PathBuf,
    /// Target side in pixels (stage 2's `[data] target_size`).
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Images per VAE batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
}

/// Arguments of `blipd data filter`.
#[derive(Args)]
pub struct FilterArgs {
    /// e.g. oidv6-train-annotations-bbox.csv (13 or 21 columns).
    #[arg(long)]
    pub boxes: PathBuf,
    /// class-descriptions-boxable.csv (no header).
    #[arg(long)]
    pub classes: PathBuf,
    /// Optional human-verified image labels (drops images with people).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Folder of <ImageID>.jpg (pixel sizes for the aspect rule are read from the headers).
    #[arg(long)]
    pub images: PathBuf,
    /// Pipeline config ([filter], [read]); defaults when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kept subjects CSV; problems go to <out>.problems.tsv.
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `blipd data masks`.
#[derive(Args)]
pub struct MasksArgs {
    /// Kept-subjects CSV (`blipd data filter`): ImageID, ClassName (the CLIPSeg prompt), box, …
    #[arg(long)]
    pub subjects: PathBuf,
    #[arg(long, value_enum, default_value = "openimages")]
    pub source: MasksSourceArg,
    /// Folder of source masks (openimages, dir) or the CLIPSeg model folder (clipseg).
    #[arg(long)]
    pub from: PathBuf,
    /// Folder of <ImageID>.<ext> images (clipseg).
    #[arg(long)]
    pub images: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// Images per CLIPSeg forward.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// CLIPSeg prompt; `{}` is replaced by the class name.
    #[arg(long, default_value = "{}")]
    pub prompt: String,
    /// Pipeline config: [read] limits and [synth] image_extensions (defaults when absent).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Only part I of N of the images (by a hash of the ImageID), for splitting the run across
    /// machines into one shared --out; default: a SLURM array's task or RANK/WORLD_SIZE when set.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
}

/// Arguments of `blipd data synth`.
#[derive(Args)]
pub struct SynthArgs {
    /// e.g. configs/data/pipeline.toml
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub subjects: Option<PathBuf>,
    #[arg(long)]
    pub images: Option<PathBuf>,
    #[arg(long)]
    pub masks: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub mask_source: Option<MaskSourceArg>,
    #[arg(long)]
    pub backgrounds: Option<PathBuf>,
    #[arg(long)]
    pub captions: Option<PathBuf>,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub limit: Option<u64>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub max_side: Option<u32>,
    #[arg(long)]
    pub rows_per_shard: Option<u64>,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Make part I of N only (the shards k with k mod N = I), for splitting the run across
    /// machines; default: a SLURM job array's task (SLURM_ARRAY_TASK_ID/COUNT) or RANK/WORLD_SIZE
    /// when set. The part that completes the set writes manifest.json (else `merge-manifests`).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
}

/// Arguments of `blipd data merge-manifests`.
#[derive(Args)]
pub struct MergeManifestsArgs {
    /// The shard folder.
    #[arg(long)]
    pub shards: PathBuf,
    /// N, the number of parts.
    #[arg(long)]
    pub parts: u64,
}

/// Arguments of `blipd data preview`.
#[derive(Args)]
pub struct PreviewArgs {
    #[arg(long)]
    pub shards: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Pairs shown.
    #[arg(long, default_value_t = 8)]
    pub n: usize,
    /// Cell size in pixels.
    #[arg(long, default_value_t = 192)]
    pub cell: u32,
}

/// Arguments of `blipd data matte`.
#[derive(Args)]
pub struct MatteArgs {
    #[arg(long)]
    pub image: PathBuf,
    #[arg(long)]
    pub trimap: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the estimated foreground colours (RGB PNG).
    #[arg(long)]
    pub foreground: Option<PathBuf>,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}, {{per_sec}}] {{msg}}"
        ))
        .expect("static template"),
    );
    pb
}

fn load_config(path: Option<&Path>) -> Result<PipelineConfig> {
    Ok(match path {
        Some(p) => PipelineConfig::from_file(p)?,
        None => PipelineConfig::default(),
    })
}

/// `blipd data encode-latents`.
fn encode_latents(args: EncodeLatentsArgs) -> Result<ExitCode> {
    let EncodeLatentsArgs {
        shards,
        model,
        size,
        batch,
    } = args;
    let (shards, model) = (shards.as_path(), model.as_path());
    let vae_dir = if model.join("vae").join("config.json").is_file() {
        model.join("vae")
    } else {
        model.to_path_buf()
    };
    let device = crate::device();
    let dir = blipd_models::weights::ComponentDir {
        name: "vae".into(),
        dir: vae_dir.clone(),
    };
    let (vae, cfg) = blipd_models::vae::AutoencoderKL::<crate::Inner>::load(&dir, &device)
        .with_context(|| format!("loading the VAE from {}", vae_dir.display()))?;
    let start = Instant::now();
    let pb = bar(0, "encode-latents");
    let summary = blipd_stage2::latents::encode_latents(
        shards,
        &vae,
        &cfg,
        size,
        batch,
        &device,
        |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    )?;
    pb.finish_and_clear();
    println!(
        "{}: cache {} ({size}² targets, VAE {}): {} shards encoded ({} pairs), {} already current; {:.1} s",
        shards.display(),
        summary.key_id,
        vae_dir.display(),
        summary.encoded,
        summary.pairs,
        summary.skipped,
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// The progress bar's updates for the events of a CLIPSeg mask job: planned work, then one tick per
/// image with the written / bad counts.
fn mask_progress<'a>(
    pb: &'a ProgressBar,
    out: &'a Path,
    ok: &'a AtomicU64,
    bad: &'a AtomicU64,
) -> impl Fn(MaskEvent) + 'a {
    move |e: MaskEvent| match e {
        MaskEvent::Planned {
            todo,
            existing,
            duplicates,
        } => {
            pb.set_length(todo);
            pb.reset_eta();
            if existing > 0 {
                pb.println(format!(
                    "resuming: {existing} masks already in {}",
                    out.display()
                ));
            }
            if duplicates > 0 {
                pb.println(format!(
                    "{duplicates} rows repeat an earlier ImageID (one mask per image: the first row's class is used)"
                ));
            }
        }
        MaskEvent::Image { ok: good } => {
            if good { ok } else { bad }.fetch_add(1, Ordering::Relaxed);
            pb.inc(1);
            pb.set_message(format!(
                "{} written, {} bad",
                ok.load(Ordering::Relaxed),
                bad.load(Ordering::Relaxed)
            ));
        }
    }
}

/// `blipd data masks --source clipseg`.
fn clipseg_masks(
    model_dir: &Path,
    subjects: &Path,
    opts: &MaskJobOptions,
    part: Option<Part>,
) -> Result<ExitCode> {
    let t = Instant::now();
    let device = crate::device();
    let seg = ClipSegSegmenter::<crate::Inner>::load(model_dir, &device)
        .with_context(|| format!("loading CLIPSeg from {}", model_dir.display()))?;
    println!(
        "CLIPSeg from {} ({:.1} s): {}×{} input, prompt {:?}, batch {}",
        model_dir.display(),
        t.elapsed().as_secs_f64(),
        seg.map_size(),
        seg.map_size(),
        opts.prompt_template,
        opts.batch_size
    );
    let rows = part_rows(read_subjects_csv(subjects)?, part);
    let out = opts.out_dir.as_path();
    let pb = bar(0, "clipseg");
    let (ok, bad) = (AtomicU64::new(0), AtomicU64::new(0));
    let progress = mask_progress(&pb, out, &ok, &bad);
    let report = write_clipseg_masks(&seg, &rows, opts, &progress)?;
    pb.finish_and_clear();
    println!(
        "{}: {} masks written, {} already present, {} bad, of {} rows; {:.1} s = {:.2} images/s ({} batches, \
         model {:.1} s = {:.2} images/s)",
        out.display(),
        report.written,
        report.existing,
        report.bad.len(),
        report.rows,
        report.elapsed_s,
        report.images_per_s(),
        report.batches,
        report.model_s,
        if report.model_s > 0.0 {
            report.written as f64 / report.model_s
        } else {
            0.0
        }
    );
    let tsv = bad_inputs_path(out, part);
    if report.bad.is_empty() {
        if tsv.is_file() {
            std::fs::remove_file(&tsv).with_context(|| format!("removing {}", tsv.display()))?;
        }
    } else {
        write_bad_inputs(&tsv, &report.bad)?;
        println!("{} bad inputs → {}", report.bad.len(), tsv.display());
        print_bad(&report.bad);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: DataArgs) -> Result<ExitCode> {
    match args.command {
        DataCommand::EncodeLatents(a) => encode_latents(a),
        DataCommand::Filter(a) => filter(a),
        DataCommand::Masks(a) => masks(a),
        DataCommand::Synth(a) => synth(a),
        DataCommand::MergeManifests(a) => merge_manifests(a),
        DataCommand::Preview(a) => preview(a),
        DataCommand::Matte(a) => matte(a),
    }
}

/// `blipd data filter`.
fn filter(args: FilterArgs) -> Result<ExitCode> {
    let FilterArgs {
        boxes,
        classes,
        labels,
        images,
        config,
        out,
    } = args;
    let cfg = load_config(config.as_deref())?;
    let start = Instant::now();
    let mut sizes = ImageDirSizes {
        dir: images,
        use_exif_orientation: cfg.filter.use_exif_orientation,
        limits: cfg.read,
    };
    let report = filter_openimages(
        &FilterInputs {
            boxes_csv: &boxes,
            class_descriptions_csv: &classes,
            image_labels_csv: labels.as_deref(),
        },
        &cfg.filter,
        &mut sizes,
    )
    .with_context(|| format!("filtering {}", boxes.display()))?;
    write_subjects_csv(&out, &report.kept)?;
    println!(
        "{} boxes in {} images → {} subjects ({:.1} s) → {}",
        report.boxes_seen,
        report.images_seen,
        report.kept.len(),
        start.elapsed().as_secs_f64(),
        out.display()
    );
    for (rule, n) in &report.drops {
        println!("  dropped {n:>9}  {rule:?}");
    }
    if report.unknown_classes > 0 {
        println!(
            "  {} boxes of classes missing from {} were dropped (one problem row per class)",
            report.unknown_classes,
            classes.display()
        );
    }
    if report.unsorted_ids > 0 {
        println!(
            "  warning: {} ImageIDs out of order (file not sorted)",
            report.unsorted_ids
        );
    }
    if !report.problems.is_empty() {
        let mut p = out.as_os_str().to_os_string();
        p.push(".problems.tsv");
        let p = PathBuf::from(p);
        let mut text = String::from("line\tImageID\treason\n");
        for pr in &report.problems {
            text.push_str(&format!("{}\t{}\t{}\n", pr.line, pr.image_id, pr.reason));
        }
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        println!(
            "  {} problem rows/images → {}",
            report.problems.len(),
            p.display()
        );
        for pr in report.problems.iter().take(5) {
            println!("    line {} {}: {}", pr.line, pr.image_id, pr.reason);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `blipd data masks`.
fn masks(args: MasksArgs) -> Result<ExitCode> {
    let MasksArgs {
        subjects,
        source,
        from,
        images,
        out,
        batch_size,
        prompt,
        config,
        shard,
    } = args;
    let part = match &shard {
        Some(t) => Some(Part::parse(t)?),
        None => Part::from_env(|k| std::env::var(k).ok())?,
    };
    let source = match source {
        MasksSourceArg::Clipseg => {
            let images = images.context("--source clipseg needs --images <folder>")?;
            let cfg = load_config(config.as_deref())?;
            let mut opts = MaskJobOptions::new(&images, &out);
            opts.batch_size = batch_size;
            opts.prompt_template = prompt;
            opts.image_extensions = cfg.synth.image_extensions.clone();
            opts.limits = cfg.read;
            return clipseg_masks(&from, &subjects, &opts, part);
        }
        MasksSourceArg::Openimages => MaskSource::OpenImages,
        MasksSourceArg::Dir => MaskSource::Dir,
    };
    if images.is_some() {
        bail!("--images is only used by --source clipseg");
    }
    let store = MaskStore::open(source, &from)?;
    let rows = part_rows(read_subjects_csv(&subjects)?, part);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let limits = match &config {
        Some(p) => PipelineConfig::from_file(p)?.read,
        None => blipd_data::ReadLimits::default(),
    };
    let pb = bar(rows.len() as u64, "masks");
    let start = Instant::now();
    let (mut written, mut present, mut missing) = (0u64, 0u64, Vec::new());
    for r in &rows {
        match r {
            Err(b) => missing.push(format!("{} (csv: {})", b.image_id, b.reason)),
            // Resumable: a mask already written (atomically, so complete) is kept.
            Ok(s) if out.join(format!("{}.png", s.image_id)).is_file() => present += 1,
            Ok(s) => match store.load_native(s, &limits) {
                Ok(m) => {
                    // 16-bit grey like the CLIPSeg source (soft masks keep their levels),
                    // written to a temporary name and renamed into place.
                    let p = out.join(format!("{}.png", s.image_id));
                    let tmp = out.join(format!(".{}.png.tmp", s.image_id));
                    m.mask
                        .to_luma16()
                        .save_with_format(&tmp, image::ImageFormat::Png)
                        .with_context(|| format!("writing {}", tmp.display()))?;
                    std::fs::rename(&tmp, &p)
                        .with_context(|| format!("renaming into {}", p.display()))?;
                    written += 1;
                }
                Err(e) => missing.push(format!("{}: {e}", s.image_id)),
            },
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    println!(
        "{written} masks → {} ({:.1} s), {present} already present, {} subjects without a mask",
        out.display(),
        start.elapsed().as_secs_f64(),
        missing.len()
    );
    for m in missing.iter().take(10) {
        println!("  {m}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `blipd data synth`.
fn synth(args: SynthArgs) -> Result<ExitCode> {
    let SynthArgs {
        config,
        subjects,
        images,
        masks,
        mask_source,
        backgrounds,
        captions,
        out,
        limit,
        seed,
        max_side,
        rows_per_shard,
        threads,
        shard,
    } = args;
    let part = match &shard {
        Some(t) => Some(Part::parse(t)?),
        None => Part::from_env(|k| std::env::var(k).ok())?,
    };
    let mut cfg = PipelineConfig::from_file(&config)?;
    let s = &mut cfg.synth;
    s.subjects_csv = subjects.or(s.subjects_csv.take());
    s.images_dir = images.or(s.images_dir.take());
    s.masks_dir = masks.or(s.masks_dir.take());
    s.backgrounds_dir = backgrounds.or(s.backgrounds_dir.take());
    s.captions = captions.or(s.captions.take());
    s.out_dir = out.or(s.out_dir.take());
    s.limit = limit.or(s.limit);
    if let Some(v) = mask_source {
        s.mask_source = v.into();
    }
    if let Some(v) = seed {
        s.seed = v;
    }
    if let Some(v) = max_side {
        s.max_side = v;
    }
    if let Some(v) = rows_per_shard {
        s.rows_per_shard = v;
    }
    if let Some(v) = threads {
        s.threads = v;
    }
    let pb = bar(0, "synth");
    let ok = AtomicU64::new(0);
    let bad = AtomicU64::new(0);
    let progress = |e: SynthEvent| match e {
        SynthEvent::Started {
            rows,
            rows_done,
            shards_total,
            shards_done,
        } => {
            pb.set_length(rows);
            pb.set_position(rows_done);
            pb.reset_eta();
            if shards_done > 0 {
                pb.println(format!(
                    "resuming: {shards_done} of {shards_total} shards already complete"
                ));
            }
        }
        SynthEvent::Row { ok: good } => {
            if good { &ok } else { &bad }.fetch_add(1, Ordering::Relaxed);
            pb.inc(1);
            pb.set_message(format!(
                "{} pairs, {} bad",
                ok.load(Ordering::Relaxed),
                bad.load(Ordering::Relaxed)
            ));
        }
        SynthEvent::ShardInvalid { index, reason } => {
            pb.println(format!("shard {index}: {reason}; rebuilding"));
        }
        SynthEvent::ShardWritten { .. } => {}
    };
    let report = synth_part(&cfg, part, &progress)?;
    pb.finish_and_clear();
    if let Some(p) = part {
        println!(
            "part {p}: {} of its shards written, {} already complete",
            report.shards_written, report.shards_skipped
        );
    }
    println!(
        "{}: {} shards ({} written, {} already complete), {} pairs in total; this run: {} rows, {} pairs in \
         {:.1} s = {:.2} pairs/s",
        report.out_dir.display(),
        report.shards_total,
        report.shards_written,
        report.shards_skipped,
        report.pairs_total,
        report.rows_new,
        report.pairs_new,
        report.elapsed_s,
        report.pairs_per_s()
    );
    if !report.bad.is_empty() {
        let by: Vec<String> = report
            .bad_by_stage()
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let p = bad_inputs_path(&report.out_dir, part);
        write_bad_inputs(&p, &report.bad)?;
        println!(
            "{} bad inputs ({}) → {}",
            report.bad.len(),
            by.join(", "),
            p.display()
        );
        print_bad(&report.bad);
    }
    if let Some(p) = part {
        if report.merged {
            merged_outputs(&report.out_dir)?;
        } else {
            println!(
                "part {p} done; manifest.json follows when every part is (or: blipd data \
                 merge-manifests --shards {} --parts {})",
                report.out_dir.display(),
                p.count
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `blipd data merge-manifests`.
fn merge_manifests(args: MergeManifestsArgs) -> Result<ExitCode> {
    let MergeManifestsArgs { shards, parts } = args;
    blipd_data::shards::merge_parts(&shards, parts)?;
    merged_outputs(&shards)?;
    Ok(ExitCode::SUCCESS)
}

/// `blipd data preview`.
fn preview(args: PreviewArgs) -> Result<ExitCode> {
    let PreviewArgs {
        shards,
        out,
        n,
        cell,
    } = args;
    let recs = blipd_data::preview::first_pairs(&shards, n)?;
    let grid = blipd_data::preview::preview_grid(&recs, cell)?;
    for (i, rec) in recs.iter().enumerate() {
        println!(
            "row {i}: {} [{}] \"{}\" on {}",
            rec.image_id, rec.class_name, rec.caption, rec.background_id
        );
    }
    grid.save(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{} pairs (input | target) → {}", recs.len(), out.display());
    Ok(ExitCode::SUCCESS)
}

/// `blipd data matte`.
fn matte(args: MatteArgs) -> Result<ExitCode> {
    let MatteArgs {
        image,
        trimap,
        out,
        foreground,
    } = args;
    let start = Instant::now();
    let stats = blipd_data::matte_file(&image, &trimap, &out, foreground.as_deref())
        .with_context(|| format!("matting {}", image.display()))?;
    println!(
        "{}: {} unknown pixels, {} CG iterations, {:.2} s → {}",
        image.display(),
        stats.unknown,
        stats.iterations,
        start.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The rows of `part` (all without one), by a hash of their ImageID; the rest are logged as skipped.
fn part_rows(
    rows: Vec<blipd_data::synth::SubjectRow>,
    part: Option<Part>,
) -> Vec<blipd_data::synth::SubjectRow> {
    let Some(p) = part else { return rows };
    let n = rows.len();
    let id = |r: &blipd_data::synth::SubjectRow| match r {
        Ok(s) => s.image_id.clone(),
        Err(b) => b.image_id.clone(),
    };
    let mine: Vec<_> = rows.into_iter().filter(|r| p.owns_image(&id(r))).collect();
    println!("part {p}: {} of {n} rows", mine.len());
    mine
}

/// A rejected input as `blipd data masks` and `blipd data synth` report it: data row, ImageID, stage, reason.
trait BadRow {
    fn fields(&self) -> (u64, &str, &str, &str);
}

impl BadRow for blipd_data::shards::BadInput {
    fn fields(&self) -> (u64, &str, &str, &str) {
        (self.row, &self.image_id, &self.stage, &self.reason)
    }
}

impl BadRow for blipd_apps::segment::BadImage {
    fn fields(&self) -> (u64, &str, &str, &str) {
        (self.row, &self.image_id, &self.stage, &self.reason)
    }
}

/// Where a run (or its part) lists its bad inputs: `bad_inputs.tsv`, `bad_inputs.part-I-of-N.tsv`.
fn bad_inputs_path(dir: &Path, part: Option<Part>) -> PathBuf {
    dir.join(match part {
        None => "bad_inputs.tsv".to_string(),
        Some(p) => format!("bad_inputs.part-{:05}-of-{:05}.tsv", p.index, p.count),
    })
}

/// `bad_inputs.tsv`: row, ImageID, stage, reason.
fn write_bad_inputs<T: BadRow>(path: &Path, bad: &[T]) -> Result<()> {
    let mut text = String::from("row\tImageID\tstage\treason\n");
    for b in bad {
        let (row, id, stage, reason) = b.fields();
        text.push_str(&format!("{row}\t{id}\t{stage}\t{reason}\n"));
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The first ten bad inputs, one line each.
fn print_bad<T: BadRow>(bad: &[T]) {
    for b in bad.iter().take(10) {
        let (row, id, stage, reason) = b.fields();
        println!("  row {row} {id} [{stage}]: {reason}");
    }
}

/// After the parts are joined: the whole set's `bad_inputs.tsv` and a summary line.
fn merged_outputs(dir: &Path) -> Result<()> {
    let m =
        Manifest::load(dir)?.with_context(|| format!("no manifest.json in {}", dir.display()))?;
    let bad = m.bad();
    if !bad.is_empty() {
        write_bad_inputs(&dir.join("bad_inputs.tsv"), &bad)?;
    }
    println!(
        "{}: every part complete → manifest.json: {} shards, {} pairs, {} bad inputs",
        dir.display(),
        m.shards.len(),
        m.rows(),
        bad.len()
    );
    Ok(())
}
