//! Stage-1 data: (image, caption) pairs from the procedural synthetic set or from a list file, image
//! preprocessing for the vision tower, and caption tokenization.

use std::path::{Path, PathBuf};

use blipd_data::imageio::{decode_image, ReadLimits};
use blipd_models::tokenizers::{blip_caption, BertTokenizer};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::losses::TextBatch;
use crate::Stage1Error;

/// Image preprocessing shared with stage 2.
pub use blipd_data::preprocess::{clip_input, CLIP_MEAN, CLIP_STD};

/// One micro-batch of stage 1, on the host.
#[derive(Clone, Debug)]
pub struct Stage1Batch {
    /// Images for the vision tower, `[B, 3, S, S]`, CLIP-normalised.
    pub pixels: TensorData,
    /// Captions (raw; the stage normalises and tokenizes them).
    pub captions: Vec<String>,
    /// Each sample's position in the run's global sample stream (independent of the number of
    /// ranks); keys its ITM negative draws. Empty: negatives come from the rank's stage stream.
    pub keys: Vec<u64>,
}

impl Stage1Batch {
    pub fn len(&self) -> usize {
        self.captions.len()
    }
    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }
}

/// `[data]` of a stage-1 run: exactly one source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage1Data {
    /// Procedural scenes with their captions (the embedded default).
    #[serde(default)]
    pub synthetic: Option<SyntheticData>,
    /// An (image path, caption) list: `.jsonl` lines `{"image": "...", "caption": "..."}`, otherwise
    /// TSV lines `path<TAB>caption` (blank lines and lines starting with `#` are skipped). Relative
    /// paths are resolved against `image_root`, else the list file's folder.
    #[serde(default)]
    pub list: Option<PathBuf>,
    #[serde(default)]
    pub image_root: Option<PathBuf>,
    /// Parquet shards written by `blipd data synth`: stage 1 trains on their target images (the
    /// original photos) and captions, through the shard loader (per-rank slices, resumable cursor).
    #[serde(default)]
    pub shards: Option<PathBuf>,
    /// Shuffle the sample order each epoch (seeded from `run.seed`).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// BLIP-2's random resized crop + horizontal flip ([`crate::augment::Augment`]); absent: the
    /// evaluation transform (shorter side to the input size, centre crop).
    #[serde(default)]
    pub augment: Option<crate::augment::Augment>,
}

/// `[data.synthetic]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticData {
    pub pairs: usize,
    #[serde(default)]
    pub seed: u64,
    /// Side of the rendered scene before resizing to the vision tower's input.
    #[serde(default = "default_synth_size")]
    pub size: u32,
}

fn default_synth_size() -> u32 {
    64
}
fn yes() -> bool {
    true
}

impl Default for Stage1Data {
    fn default() -> Self {
        Self {
            synthetic: Some(SyntheticData {
                pairs: 64,
                seed: 0,
                size: default_synth_size(),
            }),
            list: None,
            image_root: None,
            shards: None,
            shuffle: true,
            augment: None,
        }
    }
}

/// transformers `tokenizer(texts, padding="max_length", truncation=True, max_length=max_len)`:
/// `[CLS] wordpieces[:max_len−2] [SEP]`, right-padded with `[PAD]`.
pub fn tokenize_captions(
    tok: &BertTokenizer,
    captions: &[String],
    max_len: usize,
) -> Result<TextBatch, Stage1Error> {
    if max_len < 2 {
        return Err(Stage1Error::Config(format!("max_txt_len {max_len} < 2")));
    }
    let mut ids = Vec::with_capacity(captions.len());
    let mut mask = Vec::with_capacity(captions.len());
    for c in captions {
        let mut row: Vec<i64> = tok.encode(c)?.into_iter().map(i64::from).collect();
        if row.len() > max_len {
            row.truncate(max_len - 1);
            row.push(i64::from(tok.sep_id()));
        }
        let n = row.len();
        let mut m = vec![1i64; n];
        row.resize(max_len, i64::from(tok.pad_id()));
        m.resize(max_len, 0);
        ids.push(row);
        mask.push(m);
    }
    TextBatch::from_rows(&ids, &mask)
}

/// LAVIS `blip_caption` normalisation with `max_words` (0: unchanged).
pub fn normalize_caption(caption: &str, max_words: usize) -> String {
    if max_words == 0 {
        caption.to_string()
    } else {
        blip_caption(caption, max_words)
    }
}

/// One line of a list file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    /// 1-based line number in the list file.
    pub line: usize,
    pub image: PathBuf,
    pub caption: String,
}

#[derive(Deserialize)]
struct JsonEntry {
    image: String,
    caption: String,
}

/// Parse an (image, caption) list (see [`Stage1Data::list`]); every image must exist. Errors name the
/// file and line.
pub fn read_list(path: &Path, image_root: Option<&Path>) -> Result<Vec<ListEntry>, Stage1Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Stage1Error::Data(format!("{}: {e}", path.display())))?;
    let root = image_root
        .map(Path::to_path_buf)
        .unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).to_path_buf());
    let jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"));
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let at = |m: String| Stage1Error::Data(format!("{}:{line}: {m}", path.display()));
        let l = raw.trim_end_matches('\r');
        if l.trim().is_empty() || (!jsonl && l.starts_with('#')) {
            continue;
        }
        let (image, caption) = if jsonl {
            let e: JsonEntry = serde_json::from_str(l)
                .map_err(|e| at(format!("expected {{\"image\": …, \"caption\": …}}: {e}")))?;
            (e.image, e.caption)
        } else {
            let (a, b) = l
                .split_once('\t')
                .ok_or_else(|| at("expected `image path<TAB>caption`".into()))?;
            (a.to_string(), b.to_string())
        };
        if image.trim().is_empty() {
            return Err(at("empty image path".into()));
        }
        if caption.trim().is_empty() {
            return Err(at(format!("empty caption for {image}")));
        }
        let p = PathBuf::from(image.trim());
        let p = if p.is_absolute() { p } else { root.join(p) };
        if !p.is_file() {
            return Err(at(format!("image {} does not exist", p.display())));
        }
        out.push(ListEntry {
            line,
            image: p,
            caption,
        });
    }
    if out.is_empty() {
        return Err(Stage1Error::Data(format!(
            "{}: no (image, caption) entries",
            path.display()
        )));
    }
    Ok(out)
}

/// Read and preprocess one list entry; decoding errors name the list file and line.
pub fn load_entry(list: &Path, e: &ListEntry, size: usize) -> Result<Vec<f32>, Stage1Error> {
    Ok(clip_input(&read_entry(list, e)?, size))
}

/// The CLIP input of `img`: through `augment` (drawing from `rng`) when given, else the
/// evaluation transform.
pub fn prepare(
    img: &image::RgbImage,
    size: usize,
    augment: Option<&crate::augment::Augment>,
    rng: &mut impl rand::Rng,
) -> Vec<f32> {
    match augment {
        Some(a) => clip_input(&a.apply(img, size as u32, rng), size),
        None => clip_input(img, size),
    }
}

/// Read one list entry's image as RGB; decoding errors name the list file and line.
pub fn read_entry(list: &Path, e: &ListEntry) -> Result<image::RgbImage, Stage1Error> {
    let at = |m: String| {
        Stage1Error::Data(format!(
            "{}:{}: image {}: {m}",
            list.display(),
            e.line,
            e.image.display()
        ))
    };
    let bytes = std::fs::read(&e.image).map_err(|err| at(err.to_string()))?;
    let id = e.image.display().to_string();
    let img =
        decode_image(&bytes, &id, &ReadLimits::default()).map_err(|err| at(err.to_string()))?;
    Ok(img.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_length_padding_and_truncation() {
        let tok = crate::tiny::tiny_bert_tokenizer(&["a", "red", "circle", "on"]).unwrap();
        let t = tokenize_captions(
            &tok,
            &["a red circle".into(), "a red circle on a red circle".into()],
            6,
        )
        .unwrap();
        let (cls, sep, pad) = (
            tok.cls_id() as i64,
            tok.sep_id() as i64,
            tok.pad_id() as i64,
        );
        let a = tok.encode("a").unwrap()[1] as i64;
        let red = tok.encode("red").unwrap()[1] as i64;
        let circle = tok.encode("circle").unwrap()[1] as i64;
        let on = tok.encode("on").unwrap()[1] as i64;
        assert_eq!(&t.ids[..6], &[cls, a, red, circle, sep, pad]);
        assert_eq!(&t.mask[..6], &[1, 1, 1, 1, 1, 0]);
        assert_eq!(&t.ids[6..], &[cls, a, red, circle, on, sep]);
        assert_eq!(&t.mask[6..], &[1; 6]);
    }

    #[test]
    fn list_files_name_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::RgbImage::from_pixel(5, 4, image::Rgb([10, 200, 30]));
        img.save(dir.path().join("ok.png")).unwrap();
        std::fs::write(dir.path().join("bad.png"), b"not a png").unwrap();

        let tsv = dir.path().join("pairs.tsv");
        std::fs::write(&tsv, "# header\nok.png\ta green box\n\nbad.png\tbroken\n").unwrap();
        let entries = read_list(&tsv, None).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].line, 2);
        assert_eq!(entries[0].caption, "a green box");
        let px = load_entry(&tsv, &entries[0], 8).unwrap();
        assert_eq!(px.len(), 3 * 8 * 8);
        let err = load_entry(&tsv, &entries[1], 8).unwrap_err().to_string();
        assert!(
            err.contains("pairs.tsv:4") && err.contains("bad.png"),
            "{err}"
        );

        std::fs::write(&tsv, "ok.png\ta\nmissing.jpg\tgone\n").unwrap();
        let err = read_list(&tsv, None).unwrap_err().to_string();
        assert!(
            err.contains("pairs.tsv:2") && err.contains("missing.jpg"),
            "{err}"
        );
        std::fs::write(&tsv, "ok.png a caption without a tab\n").unwrap();
        let err = read_list(&tsv, None).unwrap_err().to_string();
        assert!(err.contains("pairs.tsv:1") && err.contains("TAB"), "{err}");

        let jsonl = dir.path().join("pairs.jsonl");
        std::fs::write(
            &jsonl,
            "{\"image\": \"ok.png\", \"caption\": \"a box\"}\n{\"image\": \"ok.png\"}\n",
        )
        .unwrap();
        let err = read_list(&jsonl, None).unwrap_err().to_string();
        assert!(
            err.contains("pairs.jsonl:2") && err.contains("caption"),
            "{err}"
        );
    }
}
