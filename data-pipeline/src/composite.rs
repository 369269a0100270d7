//! Training-pair construction: the estimated foreground is pasted onto a background drawn deterministically
//! from (image id, seed); the target is the original image; the caption comes from a user captions file
//! with a `"a photo of a {class}"` fallback (class display name, lower-cased).
//!
//! The background is scaled to *cover* the subject image (aspect ratio kept, bilinear via `image`'s Triangle
//! filter) and cropped at an offset drawn from the same hash, so every (id, seed) pair always yields the same
//! input.

use crate::buffer::{Gray, Rgb};
use crate::error::{DataError, Result};
use std::collections::HashMap;
use std::path::Path;

/// 64-bit FNV-1a of the id followed by the seed, finished with a splitmix64 round (stable across platforms and
/// releases, unlike `std`'s hasher).
pub fn stable_hash(id: &str, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes().chain(seed.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix(h)
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Index of the background for `(image_id, seed)` among `n` backgrounds.
pub fn background_index(image_id: &str, seed: u64, n: usize) -> Option<usize> {
    (n > 0).then(|| (stable_hash(image_id, seed) % n as u64) as usize)
}

/// Scales `bg` to cover `width × height` and crops it at an offset drawn from `(image_id, seed)`.
pub fn fit_background(
    bg: &image::RgbImage,
    width: u32,
    height: u32,
    image_id: &str,
    seed: u64,
) -> Result<Rgb> {
    if bg.width() == 0 || bg.height() == 0 || width == 0 || height == 0 {
        return Err(DataError::Config(format!(
            "cannot fit a {}x{} background to {width}x{height}",
            bg.width(),
            bg.height()
        )));
    }
    let scale =
        (f64::from(width) / f64::from(bg.width())).max(f64::from(height) / f64::from(bg.height()));
    let sw = ((f64::from(bg.width()) * scale).ceil() as u32).max(width);
    let sh = ((f64::from(bg.height()) * scale).ceil() as u32).max(height);
    let scaled = if (sw, sh) == bg.dimensions() {
        bg.clone()
    } else {
        image::imageops::resize(bg, sw, sh, image::imageops::FilterType::Triangle)
    };
    let h = splitmix(stable_hash(image_id, seed));
    let ox = (h % u64::from(sw - width + 1)) as u32;
    let oy = ((h >> 32) % u64::from(sh - height + 1)) as u32;
    let crop = image::imageops::crop_imm(&scaled, ox, oy, width, height).to_image();
    Ok(Rgb::from_rgb8(&crop))
}

/// `α·F + (1 − α)·B`.
pub fn composite(fg: &Rgb, alpha: &Gray, bg: &Rgb) -> Result<Rgb> {
    alpha.check_size("alpha", fg.width, fg.height)?;
    let bg_size = Gray {
        width: bg.width,
        height: bg.height,
        data: Vec::new(),
    };
    bg_size.check_size("background", fg.width, fg.height)?;
    let mut data = Vec::with_capacity(fg.data.len());
    for (q, &a) in alpha.data.iter().enumerate() {
        let a = a.clamp(0.0, 1.0);
        for c in 0..3 {
            data.push(a * fg.data[q * 3 + c] + (1.0 - a) * bg.data[q * 3 + c]);
        }
    }
    Rgb::new(fg.width, fg.height, data)
}

/// User captions: a UTF-8 file of `ImageID<TAB>caption` lines (`#` comments and blank lines ignored).
#[derive(Debug, Default, Clone)]
pub struct Captions {
    map: HashMap<String, String>,
}

impl Captions {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let mut map = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, cap) = line.split_once('\t').ok_or_else(|| DataError::Csv {
                path: path.to_path_buf(),
                reason: format!("line {}: expected ImageID<TAB>caption", i + 1),
            })?;
            map.insert(id.trim().to_string(), cap.trim().to_string());
        }
        Ok(Captions { map })
    }

    /// The user's caption, or `"a photo of a {class}"` with the class lower-cased.
    pub fn caption(&self, image_id: &str, class_name: &str) -> String {
        match self.map.get(image_id) {
            Some(c) if !c.is_empty() => c.clone(),
            _ => format!("a photo of a {}", class_name.trim().to_lowercase()),
        }
    }
}

/// One training example of subject representation learning.
#[derive(Debug, Clone)]
pub struct Sample {
    pub image_id: String,
    /// Subject pasted on a random background (the BLIP-2 subject encoder input).
    pub input: Rgb,
    /// The original image (the diffusion target).
    pub target: Rgb,
    pub caption: String,
    pub class_name: String,
    /// Which background was used.
    pub background: usize,
}

/// Builds a [`Sample`] from the image, its foreground estimate and α, and a background pool.
#[allow(clippy::too_many_arguments)]
pub fn make_sample(
    image_id: &str,
    class_name: &str,
    image: &Rgb,
    fg: &Rgb,
    alpha: &Gray,
    backgrounds: &[image::RgbImage],
    captions: &Captions,
    seed: u64,
) -> Result<Sample> {
    let k = background_index(image_id, seed, backgrounds.len())
        .ok_or_else(|| DataError::Config("empty background pool".into()))?;
    let bg = fit_background(
        &backgrounds[k],
        image.width as u32,
        image.height as u32,
        image_id,
        seed,
    )?;
    Ok(Sample {
        image_id: image_id.to_string(),
        input: composite(fg, alpha, &bg)?,
        target: image.clone(),
        caption: captions.caption(image_id, class_name),
        class_name: class_name.to_string(),
        background: k,
    })
}
