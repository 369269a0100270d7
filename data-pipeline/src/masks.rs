//! Subject masks for the synthesis chain.
//!
//! Two sources, both folders of grey PNGs (8- or 16-bit; colour is converted to luma; values in `[0, 1]`,
//! soft or binary; any size — they are resized bilinearly to the image):
//!
//! * [`MaskSource::Dir`]: `<dir>/<ImageID>.png` — e.g. masks written by `blipd data masks` (from CLIPSeg or
//!   OpenImages) or by any external segmenter;
//! * [`MaskSource::OpenImages`]: the OpenImages V5 segmentation masks as unzipped, named
//!   `<ImageID>_<MID without slashes>_<BoxID>.png` (any folder depth, e.g. `train-masks-0/`…`-f/`). Among
//!   the masks of the subject's image and class, the one whose `> 0.5` bounding box best overlaps the
//!   subject box (IoU) is used.

use crate::buffer::Gray;
use crate::error::{DataError, Result};
use crate::imageio::{read_gray, ReadLimits};
use crate::openimages::Subject;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where masks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskSource {
    /// `<dir>/<ImageID>.png`.
    #[default]
    Dir,
    /// OpenImages segmentation masks `<ImageID>_<mid>_<BoxID>.png` (`"open_images"`, or
    /// `"openimages"` as the CLI's `--mask-source` spells it).
    #[serde(alias = "openimages")]
    OpenImages,
}

/// A resolved mask source over one folder.
pub struct MaskStore {
    source: MaskSource,
    dir: PathBuf,
    /// OpenImages: (ImageID, MID without slashes) → mask files, sorted.
    index: HashMap<(String, String), Vec<PathBuf>>,
}

/// A loaded mask and the file it came from.
pub struct LoadedMask {
    pub mask: Gray,
    pub file: PathBuf,
}

/// `/m/0abc` → `m0abc` (the OpenImages mask file naming).
pub fn mid_for_filename(mid: &str) -> String {
    mid.replace('/', "")
}

/// Splits an OpenImages mask file stem `<ImageID>_<mid>_<BoxID>` into its parts (MIDs may contain `_`).
pub fn parse_openimages_mask_name(stem: &str) -> Option<(&str, &str, &str)> {
    let (id, rest) = stem.split_once('_')?;
    let (mid, box_id) = rest.rsplit_once('_')?;
    (!id.is_empty() && !mid.is_empty() && !box_id.is_empty()).then_some((id, mid, box_id))
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let p = entry.path();
        let ft = entry.file_type().map_err(|e| DataError::io(&p, e))?;
        if ft.is_dir() && depth > 0 {
            walk(&p, depth - 1, out)?;
        } else if ft.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

impl MaskStore {
    /// Opens a mask folder; for OpenImages the folder (and up to 2 levels of subfolders) is indexed once.
    pub fn open(source: MaskSource, dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(DataError::Config(format!(
                "mask folder {} does not exist",
                dir.display()
            )));
        }
        let mut index: HashMap<(String, String), Vec<PathBuf>> = HashMap::new();
        if source == MaskSource::OpenImages {
            let mut files = Vec::new();
            walk(dir, 2, &mut files)?;
            for f in files {
                let is_png = f.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
                let Some(stem) = f.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                if let (true, Some((id, mid, _))) = (is_png, parse_openimages_mask_name(stem)) {
                    index
                        .entry((id.to_string(), mid.to_string()))
                        .or_default()
                        .push(f.clone());
                }
            }
            for v in index.values_mut() {
                v.sort();
            }
        }
        Ok(MaskStore {
            source,
            dir: dir.to_path_buf(),
            index,
        })
    }

    pub fn source(&self) -> MaskSource {
        self.source
    }

    /// Number of indexed OpenImages masks (0 for a plain folder).
    pub fn indexed(&self) -> usize {
        self.index.values().map(Vec::len).sum()
    }

    /// Loads the subject's mask at `width × height` (bilinear resize when the file has another size).
    pub fn load(
        &self,
        subject: &Subject,
        width: usize,
        height: usize,
        limits: &ReadLimits,
    ) -> Result<LoadedMask> {
        let loaded = self.load_native(subject, limits)?;
        let mask = if (loaded.mask.width, loaded.mask.height) == (width, height) {
            loaded.mask
        } else {
            crate::trimap::resize_bilinear(&loaded.mask, width, height)
        };
        Ok(LoadedMask {
            mask,
            file: loaded.file,
        })
    }

    /// Loads the subject's mask at the file's own size.
    pub fn load_native(&self, subject: &Subject, limits: &ReadLimits) -> Result<LoadedMask> {
        let id = &subject.image_id;
        let loaded = match self.source {
            MaskSource::Dir => {
                let file = self.dir.join(format!("{id}.png"));
                if !file.is_file() {
                    return Err(DataError::Image {
                        id: id.clone(),
                        reason: format!("no mask {}", file.display()),
                    });
                }
                let mask = read_gray(&file, id, limits)?;
                LoadedMask { mask, file }
            }
            MaskSource::OpenImages => {
                let key = (id.clone(), mid_for_filename(&subject.mid));
                let files = self.index.get(&key).ok_or_else(|| DataError::Image {
                    id: id.clone(),
                    reason: format!(
                        "no OpenImages mask {id}_{}_*.png under {}",
                        key.1,
                        self.dir.display()
                    ),
                })?;
                let sbox = [subject.x_min, subject.x_max, subject.y_min, subject.y_max];
                let mut best: Option<(f64, LoadedMask)> = None;
                for f in files {
                    let mask = read_gray(f, id, limits)?;
                    let iou = mask_bbox(&mask).map_or(0.0, |b| box_iou(&b, &sbox));
                    if best.as_ref().is_none_or(|(bi, _)| iou > *bi) {
                        best = Some((
                            iou,
                            LoadedMask {
                                mask,
                                file: f.clone(),
                            },
                        ));
                    }
                }
                best.expect("index entries are non-empty").1
            }
        };
        Ok(loaded)
    }
}

/// Normalised `[x_min, x_max, y_min, y_max]` of the pixels `> 0.5` (pixel edges), `None` when empty.
pub fn mask_bbox(mask: &Gray) -> Option<[f64; 4]> {
    let (w, h) = (mask.width, mask.height);
    let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
    for y in 0..h {
        for x in 0..w {
            if mask.data[y * w + x] > 0.5 {
                x0 = x0.min(x);
                x1 = x1.max(x + 1);
                y0 = y0.min(y);
                y1 = y1.max(y + 1);
            }
        }
    }
    (x0 != usize::MAX).then(|| {
        [
            x0 as f64 / w as f64,
            x1 as f64 / w as f64,
            y0 as f64 / h as f64,
            y1 as f64 / h as f64,
        ]
    })
}

/// IoU of two `[x_min, x_max, y_min, y_max]` boxes.
pub fn box_iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let iw = (a[1].min(b[1]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[2].max(b[2])).max(0.0);
    let inter = iw * ih;
    let union = (a[1] - a[0]) * (a[3] - a[2]) + (b[1] - b[0]) * (b[3] - b[2]) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openimages_names_with_underscore_mids() {
        assert_eq!(
            parse_openimages_mask_name("0a1b2c3d4e5f6a7b_m039xj__a1b2c3d4"),
            Some(("0a1b2c3d4e5f6a7b", "m039xj_", "a1b2c3d4"))
        );
        assert_eq!(parse_openimages_mask_name("abc.png"), None);
        assert_eq!(mid_for_filename("/m/039xj_"), "m039xj_");
    }

    #[test]
    fn bbox_and_iou() {
        let mut m = Gray::new(10, 10, vec![0.0; 100]).unwrap();
        for y in 2..6 {
            for x in 1..5 {
                m.data[y * 10 + x] = 1.0;
            }
        }
        let b = mask_bbox(&m).unwrap();
        assert_eq!(b, [0.1, 0.5, 0.2, 0.6]);
        assert!((box_iou(&b, &b) - 1.0).abs() < 1e-12);
        assert_eq!(box_iou(&b, &[0.6, 0.9, 0.6, 0.9]), 0.0);
        let half = box_iou(&[0.0, 1.0, 0.0, 1.0], &[0.0, 0.5, 0.0, 1.0]);
        assert!((half - 0.5).abs() < 1e-12);
    }
}
