//! The synthesis chain: kept subjects → mask → trimap → closed-form α → foreground → composite on a
//! background → Parquet shards ([`synth`]).
//!
//! * **Input list.** The filter's subjects CSV (`ImageID,LabelName,ClassName,XMin,XMax,YMin,YMax[,Width,
//!   Height]`, parsed by header name). Row `i` is the `i`-th data record, malformed ones included, so the
//!   slice of rows a shard covers never depends on what is in them.
//! * **Shards.** Shard `k` covers rows `[k·S, (k+1)·S)` with `S = rows_per_shard`, and is named
//!   `pairs-{k:05}.parquet`. Rows inside a shard are processed in parallel (rayon, `threads`) and written in
//!   row order, so the output is a pure function of the inputs and the configuration.
//! * **Resumable, idempotent.** A shard is written to a temp name, fsynced and renamed when complete, then
//!   recorded in `manifest.json` (also replaced atomically) with its size, SHA-256 and bad inputs. A rerun
//!   skips every shard whose manifest entry matches the file on disk (size, and SHA-256 unless
//!   `verify_existing = false`), and rebuilds the rest; `kill -9` at any point followed by a rerun gives
//!   byte-identical files. The manifest stores a fingerprint of the configuration, the subjects file, the
//!   captions file and the background list; a rerun with another fingerprint is refused instead of mixing
//!   two datasets in one folder.
//! * **Bad inputs** (malformed CSV row, missing/corrupt image, missing mask, trimap without foreground or
//!   background, solver failure, unreadable background, …) are recorded with their row, image id, stage and
//!   reason in the shard's manifest entry; the run goes on.
//! * **Images.** The image is decoded (EXIF orientation applied), downscaled (Catmull-Rom, antialiased) so
//!   that its longer side is at most `max_side`, and matted at that size; the background is drawn from
//!   `(ImageID, seed)` among the sorted files of `backgrounds_dir` and cover-fit-cropped
//!   ([`crate::composite`]).

use crate::composite::{background_index, composite, fit_background, Captions};
use crate::error::{DataError, Result};
use crate::imageio::{decode_image, ReadLimits};
use crate::masks::{MaskSource, MaskStore};
use crate::openimages::{FilterConfig, Subject};
use crate::shards::{sha256_bytes, sha256_file, BadInput, Manifest, PairRecord, Part, ShardEntry};
use crate::{
    estimate_alpha_cf, estimate_foreground_ml, trimap_from_mask, CfOptions, FgOptions, Rgb,
    TrimapOptions,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Encoding of a stored image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Png,
    Jpeg,
    /// Target only: the source file's bytes when the image was not resized (EXIF orientation then stays in
    /// the file: decode with [`crate::imageio::decode_image`] or another EXIF-aware reader), else JPEG.
    Original,
}

/// `[synth]` section of `configs/data/pipeline.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthOptions {
    /// The filter's kept-subjects CSV.
    pub subjects_csv: Option<PathBuf>,
    /// Folder of `<ImageID>.<ext>` images.
    pub images_dir: Option<PathBuf>,
    /// Extensions tried in order when looking up an image.
    pub image_extensions: Vec<String>,
    pub mask_source: MaskSource,
    pub masks_dir: Option<PathBuf>,
    /// Folder of background images (jpg/jpeg/png), sorted by file name.
    pub backgrounds_dir: Option<PathBuf>,
    /// Optional `ImageID<TAB>caption` file; otherwise `a photo of a {class}`.
    pub captions: Option<PathBuf>,
    /// Shard folder.
    pub out_dir: Option<PathBuf>,
    pub seed: u64,
    /// Longer side after downscaling (0 keeps the original size).
    pub max_side: u32,
    /// Only the first `limit` rows of the subjects CSV.
    pub limit: Option<u64>,
    pub rows_per_shard: u64,
    pub rows_per_group: u64,
    pub input_format: Encoding,
    pub target_format: Encoding,
    pub jpeg_quality: u8,
    /// Worker threads (0: all cores).
    pub threads: usize,
    /// Recompute the SHA-256 of completed shards on a rerun (else sizes only).
    pub verify_existing: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            subjects_csv: None,
            images_dir: None,
            image_extensions: vec!["jpg".into(), "jpeg".into(), "png".into()],
            mask_source: MaskSource::Dir,
            masks_dir: None,
            backgrounds_dir: None,
            captions: None,
            out_dir: None,
            seed: 0,
            max_side: 512,
            limit: None,
            rows_per_shard: 1000,
            rows_per_group: 16,
            input_format: Encoding::Png,
            target_format: Encoding::Jpeg,
            jpeg_quality: 95,
            threads: 0,
            verify_existing: true,
        }
    }
}

/// The whole of `configs/data/pipeline.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    pub filter: FilterConfig,
    pub trimap: TrimapOptions,
    pub matting: CfOptions,
    pub foreground: FgOptions,
    pub read: ReadLimits,
    pub synth: SynthOptions,
}

impl PipelineConfig {
    /// Parses a TOML file (unknown keys are errors).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        toml::from_str(&text).map_err(|e| DataError::Config(format!("{}: {e}", path.display())))
    }
}

/// A data row of the subjects CSV, or why it is unusable.
pub type SubjectRow = std::result::Result<Subject, BadInput>;

/// Reads the kept-subjects CSV. Only an unreadable file or a missing column is an error; a bad row becomes
/// a [`BadInput`] at its position.
pub fn read_subjects_csv(path: &Path) -> Result<Vec<SubjectRow>> {
    let csv_err = |reason: String| DataError::Csv {
        path: path.to_path_buf(),
        reason,
    };
    let mut r = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| csv_err(e.to_string()))?;
    let headers = r.headers().map_err(|e| csv_err(e.to_string()))?.clone();
    let col = |name: &str| -> Result<usize> {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| csv_err(format!("missing column {name} (header {headers:?})")))
    };
    let cols = [
        col("ImageID")?,
        col("LabelName")?,
        col("ClassName")?,
        col("XMin")?,
        col("XMax")?,
        col("YMin")?,
        col("YMax")?,
    ];
    let opt_w = headers.iter().position(|h| h.trim() == "Width");
    let opt_h = headers.iter().position(|h| h.trim() == "Height");
    let mut out = Vec::new();
    let mut rec = csv::StringRecord::new();
    loop {
        let row = out.len() as u64;
        match r.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => out.push(parse_subject(&rec, row, &cols, opt_w, opt_h)),
            Err(e) => {
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    return Err(csv_err(e.to_string()));
                }
                let line = e.position().map_or(0, |p| p.line());
                out.push(Err(BadInput {
                    row,
                    image_id: format!("line {line}"),
                    stage: "csv".into(),
                    reason: e.to_string(),
                }));
            }
        }
    }
    Ok(out)
}

fn parse_subject(
    rec: &csv::StringRecord,
    row: u64,
    cols: &[usize; 7],
    opt_w: Option<usize>,
    opt_h: Option<usize>,
) -> SubjectRow {
    let line = rec.position().map_or(0, |p| p.line());
    let id = rec.get(cols[0]).map(str::trim).unwrap_or("");
    let bad = |reason: String| BadInput {
        row,
        image_id: if id.is_empty() {
            format!("line {line}")
        } else {
            id.to_string()
        },
        stage: "csv".into(),
        reason: format!("line {line}: {reason}"),
    };
    if id.is_empty() {
        return Err(bad("empty ImageID".into()));
    }
    if id.contains(['/', '\\']) || id == "." || id == ".." {
        return Err(bad(format!("ImageID {id:?} is not a file name")));
    }
    let field = |k: usize, name: &str| -> std::result::Result<&str, BadInput> {
        rec.get(cols[k])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad(format!("missing {name}")))
    };
    let num = |k: usize, name: &str| -> std::result::Result<f64, BadInput> {
        let s = field(k, name)?;
        s.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| bad(format!("{name} {s:?} is not a number")))
    };
    let mid = field(1, "LabelName")?.to_string();
    let class_name = field(2, "ClassName")?.to_string();
    let (x_min, x_max, y_min, y_max) = (
        num(3, "XMin")?,
        num(4, "XMax")?,
        num(5, "YMin")?,
        num(6, "YMax")?,
    );
    if !(0.0..=1.0).contains(&x_min)
        || !(0.0..=1.0).contains(&x_max)
        || !(0.0..=1.0).contains(&y_min)
        || !(0.0..=1.0).contains(&y_max)
        || x_min >= x_max
        || y_min >= y_max
    {
        return Err(bad(format!(
            "box ({x_min}, {x_max}, {y_min}, {y_max}) is not inside [0,1] or is empty"
        )));
    }
    let dim = |c: Option<usize>| {
        c.and_then(|k| rec.get(k))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(Subject {
        image_id: id.to_string(),
        mid,
        class_name,
        x_min,
        x_max,
        y_min,
        y_max,
        width: dim(opt_w),
        height: dim(opt_h),
    })
}

/// Progress notifications of [`synth`] (for a progress bar).
#[derive(Debug, Clone)]
pub enum SynthEvent {
    /// After planning: rows of the list, rows already covered by valid shards.
    Started {
        rows: u64,
        rows_done: u64,
        shards_total: u64,
        shards_done: u64,
    },
    /// One row processed (`ok`: a pair was made).
    Row {
        ok: bool,
    },
    /// A manifest entry did not match its file; the shard is rebuilt.
    ShardInvalid {
        index: u64,
        reason: String,
    },
    ShardWritten {
        index: u64,
        rows: u64,
        bad: u64,
    },
}

/// Outcome of [`synth`].
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub out_dir: PathBuf,
    pub shards_total: u64,
    pub shards_written: u64,
    pub shards_skipped: u64,
    /// Pairs in all shards.
    pub pairs_total: u64,
    /// Pairs made by this run.
    pub pairs_new: u64,
    /// Rows processed by this run.
    pub rows_new: u64,
    /// Every bad input of the dataset (this part's, with a part), this run's and earlier runs', in
    /// row order.
    pub bad: Vec<BadInput>,
    pub elapsed_s: f64,
    /// The part this run made (`None`: the whole set).
    pub part: Option<Part>,
    /// `manifest.json` is complete: a whole-set run, or the part that completed the set.
    pub merged: bool,
}

impl SynthReport {
    /// Pairs made per second of this run.
    pub fn pairs_per_s(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.pairs_new as f64 / self.elapsed_s
        } else {
            0.0
        }
    }

    /// Bad inputs per stage.
    pub fn bad_by_stage(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for b in &self.bad {
            *m.entry(b.stage.clone()).or_insert(0) += 1;
        }
        m
    }
}

/// File name of shard `k`.
pub fn shard_name(k: u64) -> String {
    format!("pairs-{k:05}.parquet")
}

struct Ctx<'a> {
    cfg: &'a PipelineConfig,
    images_dir: PathBuf,
    masks: MaskStore,
    backgrounds: Vec<(String, PathBuf)>,
    captions: Captions,
    has_captions_file: bool,
}

fn required<'a>(p: &'a Option<PathBuf>, key: &str) -> Result<&'a PathBuf> {
    p.as_ref()
        .ok_or_else(|| DataError::Config(format!("[synth] {key} is not set")))
}

fn list_backgrounds(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| DataError::Config(format!("backgrounds dir {}: {e}", dir.display())))?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|e| DataError::io(dir, e))?;
        let p = e.path();
        let ok = p.is_file()
            && p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"));
        if let (true, Some(name)) = (ok, p.file_name().and_then(|n| n.to_str())) {
            v.push((name.to_string(), p.clone()));
        }
    }
    v.sort();
    if v.is_empty() {
        return Err(DataError::Config(format!(
            "no backgrounds (*.jpg, *.jpeg, *.png) in {}",
            dir.display()
        )));
    }
    Ok(v)
}

/// SHA-256 of everything that determines the output bytes.
fn fingerprint(
    cfg: &PipelineConfig,
    subjects_sha: &str,
    captions_sha: Option<&str>,
    backgrounds: &[(String, PathBuf)],
) -> Result<String> {
    let s = &cfg.synth;
    let mut bgs = Vec::new();
    for (name, p) in backgrounds {
        let len = std::fs::metadata(p).map_err(|e| DataError::io(p, e))?.len();
        bgs.push(serde_json::json!([name, len]));
    }
    let v = serde_json::json!({
        "format": crate::shards::MANIFEST_FORMAT,
        "trimap": cfg.trimap,
        "matting": cfg.matting,
        "foreground": cfg.foreground,
        "read": cfg.read,
        "synth": {
            "image_extensions": s.image_extensions,
            "mask_source": s.mask_source,
            "seed": s.seed,
            "max_side": s.max_side,
            "limit": s.limit,
            "rows_per_shard": s.rows_per_shard,
            "rows_per_group": s.rows_per_group,
            "input_format": s.input_format,
            "target_format": s.target_format,
            "jpeg_quality": s.jpeg_quality,
        },
        "subjects_sha256": subjects_sha,
        "captions_sha256": captions_sha,
        "backgrounds": bgs,
    });
    Ok(sha256_bytes(v.to_string().as_bytes()))
}

fn encode(
    img: &image::RgbImage,
    enc: Encoding,
    quality: u8,
) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match enc {
        Encoding::Png => {
            image::codecs::png::PngEncoder::new(&mut out)
                .write_image(
                    img.as_raw(),
                    img.width(),
                    img.height(),
                    image::ExtendedColorType::Rgb8,
                )
                .map_err(|e| format!("PNG encode: {e}"))?;
        }
        Encoding::Jpeg | Encoding::Original => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
                .write_image(
                    img.as_raw(),
                    img.width(),
                    img.height(),
                    image::ExtendedColorType::Rgb8,
                )
                .map_err(|e| format!("JPEG encode: {e}"))?;
        }
    }
    Ok(out)
}
use image::ImageEncoder;

fn enc_name(enc: Encoding, quality: u8) -> String {
    match enc {
        Encoding::Png => "png".into(),
        Encoding::Jpeg | Encoding::Original => format!("jpeg q{quality}"),
    }
}

type Fail = (&'static str, String);

/// Makes one pair (everything except I/O of the shard).
fn make_pair(ctx: &Ctx, row: u64, subject: &Subject) -> std::result::Result<PairRecord, Fail> {
    let cfg = ctx.cfg;
    let s = &cfg.synth;
    let id = subject.image_id.as_str();
    // Image.
    let mut found = None;
    for ext in &s.image_extensions {
        let p = ctx.images_dir.join(format!("{id}.{ext}"));
        if p.is_file() {
            found = Some(p);
            break;
        }
    }
    let path = found.ok_or_else(|| {
        (
            "image",
            format!(
                "not found: {}/{id}.{{{}}}",
                ctx.images_dir.display(),
                s.image_extensions.join(",")
            ),
        )
    })?;
    let bytes = std::fs::read(&path).map_err(|e| ("image", format!("{}: {e}", path.display())))?;
    let decoded = decode_image(&bytes, id, &cfg.read).map_err(|e| ("image", e.to_string()))?;
    let is_jpeg_file = bytes.starts_with(&[0xFF, 0xD8]);
    let is_png_file = bytes.starts_with(b"\x89PNG");
    let mut rgb8 = decoded.to_rgb8();
    drop(decoded);
    let (w0, h0) = rgb8.dimensions();
    let resized = s.max_side > 0 && w0.max(h0) > s.max_side;
    if resized {
        let scale = f64::from(s.max_side) / f64::from(w0.max(h0));
        let w = ((f64::from(w0) * scale).round() as u32).clamp(1, s.max_side);
        let h = ((f64::from(h0) * scale).round() as u32).clamp(1, s.max_side);
        rgb8 = image::imageops::resize(&rgb8, w, h, image::imageops::FilterType::CatmullRom);
    }
    let (w, h) = rgb8.dimensions();
    let img = Rgb::from_rgb8(&rgb8);
    // Mask → trimap.
    let mask = ctx
        .masks
        .load(subject, w as usize, h as usize, &cfg.read)
        .map_err(|e| ("mask", e.to_string()))?;
    let tri = trimap_from_mask(&mask.mask, &cfg.trimap).map_err(|e| ("trimap", e.to_string()))?;
    let fg_px = tri.data.iter().filter(|&&v| v >= 1.0).count();
    let bg_px = tri.data.iter().filter(|&&v| v <= 0.0).count();
    if fg_px == 0 {
        return Err((
            "trimap",
            format!(
                "no foreground: no mask pixel ≥ {} survives the {}-px erosion",
                cfg.trimap.fg_threshold, cfg.trimap.erode_radius
            ),
        ));
    }
    if bg_px == 0 {
        return Err((
            "trimap",
            format!(
                "no background: no mask pixel ≤ {} survives the {}-px erosion",
                cfg.trimap.bg_threshold, cfg.trimap.dilate_radius
            ),
        ));
    }
    // α and F.
    let (alpha, stats) =
        estimate_alpha_cf(&img, &tri, &cfg.matting).map_err(|e| ("matting", e.to_string()))?;
    let fg = estimate_foreground_ml(&img, &alpha, &cfg.foreground)
        .map_err(|e| ("foreground", e.to_string()))?;
    // Background.
    let k = background_index(id, s.seed, ctx.backgrounds.len()).expect("backgrounds non-empty");
    let (bg_name, bg_path) = &ctx.backgrounds[k];
    let bg_bytes = std::fs::read(bg_path)
        .map_err(|e| ("background", format!("{}: {e}", bg_path.display())))?;
    let bg = decode_image(&bg_bytes, bg_name, &cfg.read)
        .map_err(|e| ("background", e.to_string()))?
        .to_rgb8();
    let bg = fit_background(&bg, w, h, id, s.seed).map_err(|e| ("background", e.to_string()))?;
    let input = composite(&fg, &alpha, &bg).map_err(|e| ("composite", e.to_string()))?;
    // Encode.
    let input_image =
        encode(&input.to_rgb8(), s.input_format, s.jpeg_quality).map_err(|e| ("encode", e))?;
    let (target_image, target_src) = match s.target_format {
        Encoding::Original if !resized && (is_jpeg_file || is_png_file) => {
            (bytes, "original file bytes".to_string())
        }
        enc => (
            encode(&rgb8, enc, s.jpeg_quality).map_err(|e| ("encode", e))?,
            enc_name(enc, s.jpeg_quality),
        ),
    };
    let caption = ctx.captions.caption(id, &subject.class_name);
    let template = format!("a photo of a {}", subject.class_name.trim().to_lowercase());
    let caption_source = if ctx.has_captions_file && caption != template {
        "captions_file"
    } else {
        "template"
    };
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut prov = BTreeMap::new();
    let size_note = if resized {
        format!("{w0}x{h0} → {w}x{h} catmull-rom")
    } else {
        format!("{w}x{h}")
    };
    prov.insert("image", format!("{} ({size_note})", file_name(&path)));
    prov.insert(
        "mask",
        format!(
            "{}:{}",
            match ctx.masks.source() {
                MaskSource::Dir => "dir",
                MaskSource::OpenImages => "openimages",
            },
            file_name(&mask.file)
        ),
    );
    prov.insert(
        "trimap",
        format!(
            "fg>={} bg<={} erode {} dilate {}",
            cfg.trimap.fg_threshold,
            cfg.trimap.bg_threshold,
            cfg.trimap.erode_radius,
            cfg.trimap.dilate_radius
        ),
    );
    prov.insert(
        "alpha",
        format!(
            "closed-form eps={} tol={}: {} unknown, {} iterations",
            cfg.matting.epsilon, cfg.matting.tolerance, stats.unknown, stats.iterations
        ),
    );
    prov.insert("foreground", "multi-level (Germer 2020)".into());
    prov.insert(
        "background",
        format!(
            "{bg_name} (#{k} of {}), crop from (id, seed)",
            ctx.backgrounds.len()
        ),
    );
    prov.insert("input_image", enc_name(s.input_format, s.jpeg_quality));
    prov.insert("target_image", target_src);
    prov.insert("caption", caption_source.to_string());
    prov.insert("class_name", "subjects csv ClassName".into());
    prov.insert("box", "subjects csv XMin,XMax,YMin,YMax".into());
    Ok(PairRecord {
        row,
        image_id: id.to_string(),
        mid: subject.mid.clone(),
        class_name: subject.class_name.clone(),
        caption,
        caption_source: caption_source.into(),
        bbox: [subject.x_min, subject.x_max, subject.y_min, subject.y_max],
        width: w,
        height: h,
        background_id: bg_name.clone(),
        seed: s.seed,
        input_image,
        target_image,
        provenance: serde_json::to_string(&prov).expect("provenance serialises"),
    })
}

/// Runs the chain into `synth.out_dir` (see the module docs).
pub fn synth(cfg: &PipelineConfig, progress: &(dyn Fn(SynthEvent) + Sync)) -> Result<SynthReport> {
    synth_part(cfg, None, progress)
}

/// [`synth`] of one part of a run split across machines ([`Part`]): only the shards it owns, recorded
/// in its own manifest; the part that completes the set also writes `manifest.json`
/// ([`crate::shards::merge_parts`]), so the folder then equals a single run's, byte for byte. Parts may
/// run at the same time in one folder (a shared filesystem); rerunning a failed part redoes only its
/// missing shards.
pub fn synth_part(
    cfg: &PipelineConfig,
    part: Option<Part>,
    progress: &(dyn Fn(SynthEvent) + Sync),
) -> Result<SynthReport> {
    let start = Instant::now();
    let s = &cfg.synth;
    if s.rows_per_shard == 0 || s.rows_per_group == 0 {
        return Err(DataError::Config(
            "[synth] rows_per_shard and rows_per_group must be positive".into(),
        ));
    }
    if !(1..=100).contains(&s.jpeg_quality) {
        return Err(DataError::Config(format!(
            "[synth] jpeg_quality {} is not in 1..=100",
            s.jpeg_quality
        )));
    }
    if s.input_format == Encoding::Original {
        return Err(DataError::Config(
            "[synth] input_format must be png or jpeg".into(),
        ));
    }
    let subjects_csv = required(&s.subjects_csv, "subjects_csv")?;
    let images_dir = required(&s.images_dir, "images_dir")?.clone();
    let masks_dir = required(&s.masks_dir, "masks_dir")?;
    let bg_dir = required(&s.backgrounds_dir, "backgrounds_dir")?;
    let out_dir = required(&s.out_dir, "out_dir")?.clone();
    std::fs::create_dir_all(&out_dir).map_err(|e| DataError::io(&out_dir, e))?;
    // One writer per folder (per part); the OS drops the lock when the process dies (also on kill -9).
    let lock_path = out_dir.join(match part {
        None => ".synth.lock".to_string(),
        Some(p) => format!(".synth.part-{:05}-of-{:05}.lock", p.index, p.count),
    });
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| DataError::io(&lock_path, e))?;
    lock.try_lock().map_err(|_| {
        DataError::Config(format!(
            "another `synth`{} is writing {} (lock {})",
            part.map(|p| format!(" of part {p}")).unwrap_or_default(),
            out_dir.display(),
            lock_path.display()
        ))
    })?;

    let subjects_bytes = std::fs::read(subjects_csv).map_err(|e| DataError::io(subjects_csv, e))?;
    let mut rows = read_subjects_csv(subjects_csv)?;
    if let Some(limit) = s.limit {
        rows.truncate(limit.min(rows.len() as u64) as usize);
    }
    let backgrounds = list_backgrounds(bg_dir)?;
    let (captions, captions_sha) = match &s.captions {
        Some(p) => (
            Captions::load(p)?,
            Some(sha256_bytes(
                &std::fs::read(p).map_err(|e| DataError::io(p, e))?,
            )),
        ),
        None => (Captions::default(), None),
    };
    let fp = fingerprint(
        cfg,
        &sha256_bytes(&subjects_bytes),
        captions_sha.as_deref(),
        &backgrounds,
    )?;
    let ctx = Ctx {
        cfg,
        images_dir,
        masks: MaskStore::open(s.mask_source, masks_dir)?,
        backgrounds,
        captions,
        has_captions_file: s.captions.is_some(),
    };

    let n = rows.len() as u64;
    let manifest_path = out_dir.join(match part {
        None => crate::shards::MANIFEST_NAME.to_string(),
        Some(p) => p.manifest_name(),
    });
    let mut manifest = match Manifest::load_file(&manifest_path)? {
        Some(m) if m.fingerprint != fp => {
            return Err(DataError::Config(format!(
            "{} holds shards of another configuration or input (fingerprint {} ≠ {}); use another \
                 out_dir or empty this one",
            out_dir.display(),
            m.fingerprint,
            fp
        )))
        }
        Some(m) => m,
        None => Manifest::new(fp.clone(), n, s.rows_per_shard),
    };
    // Temp files of a killed run (a part removes only its own: other parts may be writing theirs).
    let mine = |k: u64| part.is_none_or(|p| p.owns(k));
    let own_tmp: std::collections::HashSet<String> = (0..manifest.shards_total)
        .filter(|&k| mine(k))
        .map(|k| format!("{}.tmp", shard_name(k)))
        .collect();
    for e in std::fs::read_dir(&out_dir).map_err(|e| DataError::io(&out_dir, e))? {
        let p = e.map_err(|e| DataError::io(&out_dir, e))?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        let ours = part.is_none() || name.is_some_and(|n| own_tmp.contains(&n));
        if p.extension().is_some_and(|x| x == "tmp") && ours {
            std::fs::remove_file(&p).map_err(|e| DataError::io(&p, e))?;
        }
    }
    // Keep the entries whose files still match.
    let mut valid = Vec::new();
    for entry in std::mem::take(&mut manifest.shards) {
        let p = out_dir.join(&entry.file);
        let why = match std::fs::metadata(&p) {
            Err(e) => Some(format!("{}: {e}", p.display())),
            Ok(m) if m.len() != entry.bytes => {
                Some(format!("size {} ≠ manifest {}", m.len(), entry.bytes))
            }
            Ok(_) if s.verify_existing => {
                let sha = sha256_file(&p)?;
                (sha != entry.sha256).then(|| format!("sha256 {sha} ≠ manifest {}", entry.sha256))
            }
            Ok(_) => None,
        };
        match why {
            None => valid.push(entry),
            Some(reason) => progress(SynthEvent::ShardInvalid {
                index: entry.index,
                reason,
            }),
        }
    }
    manifest.shards = valid;
    let done: std::collections::HashSet<u64> = manifest.shards.iter().map(|e| e.index).collect();
    let shards_total = manifest.shards_total;
    let rows_done: u64 = manifest.shards.iter().map(|e| e.slice_rows).sum();
    let rows_mine: u64 = (0..shards_total)
        .filter(|&k| mine(k))
        .map(|k| ((k + 1) * s.rows_per_shard).min(n) - k * s.rows_per_shard)
        .sum();
    progress(SynthEvent::Started {
        rows: rows_mine,
        rows_done,
        shards_total: (0..shards_total).filter(|&k| mine(k)).count() as u64,
        shards_done: done.len() as u64,
    });

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(s.threads)
        .build()
        .map_err(|e| DataError::Config(format!("thread pool: {e}")))?;
    let chunk = (s.rows_per_group as usize).max(4 * pool.current_num_threads());
    let (mut written, mut pairs_new, mut rows_new) = (0u64, 0u64, 0u64);
    for k in 0..shards_total {
        if done.contains(&k) || !mine(k) {
            continue;
        }
        let first = k * s.rows_per_shard;
        let end = (first + s.rows_per_shard).min(n);
        let name = shard_name(k);
        let path = out_dir.join(&name);
        let mut writer = crate::shards::ShardWriter::create(&path, s.rows_per_group as usize)?;
        let mut bad = Vec::new();
        let mut rows_written = 0u64;
        for c0 in (first..end).step_by(chunk) {
            let c1 = (c0 + chunk as u64).min(end);
            let results: Vec<std::result::Result<PairRecord, BadInput>> = pool.install(|| {
                (c0..c1)
                    .into_par_iter()
                    .map(|row| {
                        let r = match &rows[row as usize] {
                            Err(b) => Err(b.clone()),
                            Ok(subj) => {
                                make_pair(&ctx, row, subj).map_err(|(stage, reason)| BadInput {
                                    row,
                                    image_id: subj.image_id.clone(),
                                    stage: stage.into(),
                                    reason,
                                })
                            }
                        };
                        progress(SynthEvent::Row { ok: r.is_ok() });
                        r
                    })
                    .collect()
            });
            for r in results {
                match r {
                    Ok(rec) => {
                        writer.push(rec)?;
                        rows_written += 1;
                    }
                    Err(b) => {
                        tracing::warn!(row = b.row, id = %b.image_id, stage = %b.stage, "{}", b.reason);
                        bad.push(b);
                    }
                }
            }
        }
        let rows_in_file = writer.finish()?;
        assert_eq!(rows_in_file, rows_written);
        let bytes = std::fs::metadata(&path)
            .map_err(|e| DataError::io(&path, e))?
            .len();
        let g = s.rows_per_group;
        let mut groups = vec![g; (rows_written / g) as usize];
        if !rows_written.is_multiple_of(g) {
            groups.push(rows_written % g);
        }
        let bad_count = bad.len() as u64;
        manifest.shards.push(ShardEntry {
            index: k,
            file: name,
            first_row: first,
            slice_rows: end - first,
            rows: rows_written,
            bytes,
            sha256: sha256_file(&path)?,
            row_groups: groups,
            bad,
        });
        manifest.save_file(&manifest_path)?;
        written += 1;
        pairs_new += rows_written;
        rows_new += end - first;
        progress(SynthEvent::ShardWritten {
            index: k,
            rows: rows_written,
            bad: bad_count,
        });
    }
    if shards_total == 0 || manifest.missing(part).is_empty() {
        manifest.save_file(&manifest_path)?;
    }
    drop(lock);
    // The part that finds every part complete writes manifest.json (several may: the same bytes).
    let merged = match part {
        None => true,
        Some(p) if manifest.missing(part).is_empty() => {
            match crate::shards::merge_parts(&out_dir, p.count) {
                Ok(_) => true,
                Err(e) => {
                    tracing::info!("part {p} complete; {e}");
                    false
                }
            }
        }
        Some(_) => false,
    };
    Ok(SynthReport {
        out_dir,
        shards_total,
        shards_written: written,
        shards_skipped: done.len() as u64,
        pairs_total: manifest.rows(),
        pairs_new,
        rows_new,
        bad: manifest.bad(),
        elapsed_s: start.elapsed().as_secs_f64(),
        part,
        merged,
    })
}
