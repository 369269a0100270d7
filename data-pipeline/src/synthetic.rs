//! Procedural subjects with exact masks on procedural backgrounds: the embedded tiny dataset of
//! `blipd pretrain` (no downloads), built the same way as the real pairs — the subject is cut out
//! with its mask and alpha-composited onto a different background (input); the original scene is
//! the target; the caption describes the target and the class names the subject.

use image::{GrayImage, Luma, Rgb, RgbImage};

/// Subject colours.
pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [230, 210, 40]),
    ("purple", [150, 60, 190]),
    ("orange", [240, 140, 30]),
];
/// Subject classes.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "ring"];
/// Background kinds.
pub const BACKGROUNDS: [&str; 4] = ["striped", "checkered", "dotted", "plain"];
/// Words of the captions other than the above.
pub const OTHER_WORDS: [&str; 8] = ["a", "photo", "of", "on", "the", "is", "background", ","];

/// Every word a synthetic caption or class can contain (for building tiny vocabularies).
pub fn vocabulary() -> Vec<&'static str> {
    let mut v: Vec<&str> = OTHER_WORDS.to_vec();
    v.extend(COLORS.iter().map(|c| c.0));
    v.extend(SHAPES);
    v.extend(BACKGROUNDS);
    v
}

/// One synthetic training pair.
#[derive(Clone, Debug)]
pub struct SyntheticPair {
    pub id: String,
    /// The subject composited onto a different background.
    pub input: RgbImage,
    /// The original scene.
    pub target: RgbImage,
    /// The subject's exact (anti-aliased) mask in the target.
    pub mask: GrayImage,
    pub subject: String,
    pub caption: String,
}

/// SplitMix64: a tiny deterministic generator for procedural content.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn background(kind: usize, size: u32, rng: &mut SplitMix) -> RgbImage {
    let base = [
        (60.0 + 150.0 * rng.unit()) as u8,
        (60.0 + 150.0 * rng.unit()) as u8,
        (60.0 + 150.0 * rng.unit()) as u8,
    ];
    let alt = [255 - base[0] / 2, 255 - base[1] / 2, 255 - base[2] / 2];
    let period = (size as f64 * (0.12 + 0.15 * rng.unit())).max(2.0);
    RgbImage::from_fn(size, size, |x, y| {
        let (fx, fy) = (x as f64 / period, y as f64 / period);
        let on = match kind {
            0 => (fx.floor() as i64) % 2 == 0,
            1 => ((fx.floor() + fy.floor()) as i64) % 2 == 0,
            2 => {
                let (dx, dy) = (fx.fract() - 0.5, fy.fract() - 0.5);
                dx * dx + dy * dy < 0.08
            }
            _ => false,
        };
        Rgb(if on { alt } else { base })
    })
}

/// Coverage of the subject shape at pixel centre (x, y), anti-aliased by 4×4 supersampling.
fn coverage(shape: usize, cx: f64, cy: f64, r: f64, x: u32, y: u32) -> f64 {
    let mut hit = 0;
    for sy in 0..4 {
        for sx in 0..4 {
            let px = x as f64 + (sx as f64 + 0.5) / 4.0 - cx;
            let py = y as f64 + (sy as f64 + 0.5) / 4.0 - cy;
            let inside = match shape {
                0 => px * px + py * py <= r * r,
                1 => px.abs() <= r * 0.85 && py.abs() <= r * 0.85,
                2 => py <= r * 0.8 && py >= -r && px.abs() <= (py + r) * 0.6,
                _ => {
                    let d = (px * px + py * py).sqrt();
                    d <= r && d >= r * 0.55
                }
            };
            hit += inside as u32;
        }
    }
    hit as f64 / 16.0
}

/// The pair number `index` of the dataset with `seed`, at `size`×`size` pixels.
pub fn synth_pair(index: u64, seed: u64, size: u32) -> SyntheticPair {
    let mut rng = SplitMix::new(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    let color = rng.below(COLORS.len());
    let shape = rng.below(SHAPES.len());
    let scene_kind = rng.below(BACKGROUNDS.len());
    let mut other_kind = rng.below(BACKGROUNDS.len());
    if other_kind == scene_kind {
        other_kind = (other_kind + 1) % BACKGROUNDS.len();
    }
    let scene = background(scene_kind, size, &mut rng);
    let other = background(other_kind, size, &mut rng);
    let s = size as f64;
    let r = s * (0.22 + 0.12 * rng.unit());
    let cx = r + (s - 2.0 * r) * rng.unit();
    let cy = r + (s - 2.0 * r) * rng.unit();
    let rgb = COLORS[color].1;
    let mut mask = GrayImage::new(size, size);
    let mut target = scene.clone();
    let mut input = other;
    for y in 0..size {
        for x in 0..size {
            let a = coverage(shape, cx, cy, r, x, y);
            if a <= 0.0 {
                continue;
            }
            // Shading so the subject is not flat colour.
            let shade = 0.8
                + 0.2
                    * (1.0 - ((x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)).sqrt() / r)
                        .max(0.0);
            let fg = [0, 1, 2].map(|c| (rgb[c] as f64 * shade).min(255.0));
            mask.put_pixel(x, y, Luma([(a * 255.0).round() as u8]));
            for img in [&mut target, &mut input] {
                let p = img.get_pixel_mut(x, y);
                for c in 0..3 {
                    p[c] = (fg[c] * a + p[c] as f64 * (1.0 - a)).round() as u8;
                }
            }
        }
    }
    let subject = SHAPES[shape].to_string();
    let caption = format!(
        "a photo of a {} {} on a {} background",
        COLORS[color].0, subject, BACKGROUNDS[scene_kind]
    );
    SyntheticPair {
        id: format!("synthetic-{seed}-{index:06}"),
        input,
        target,
        mask,
        subject,
        caption,
    }
}

/// `pairs` procedural pairs ([`synth_pair`] at `size` px, PNG-encoded) as one shard
/// `pairs-00000.parquet` in `dir` with its `manifest.json`: a complete shard folder in the format
/// `blipd data synth` writes, for tests and quick experiments that want shard-backed training data
/// without the OpenImages chain. Captions are the pairs' own; provenance says "synthetic".
pub fn write_synthetic_shards(
    dir: &std::path::Path,
    pairs: u64,
    seed: u64,
    size: u32,
    rows_per_group: usize,
) -> crate::error::Result<crate::shards::Manifest> {
    use crate::shards::{sha256_file, Manifest, PairRecord, ShardEntry, ShardReader, ShardWriter};
    let io = |e: std::io::Error| crate::error::DataError::io(dir, e);
    std::fs::create_dir_all(dir).map_err(io)?;
    let png = |img: &RgbImage| -> crate::error::Result<Vec<u8>> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .map_err(|e| crate::error::DataError::io(dir, std::io::Error::other(e)))?;
        Ok(out.into_inner())
    };
    let name = "pairs-00000.parquet";
    let file = dir.join(name);
    let mut w = ShardWriter::create(&file, rows_per_group.max(1))?;
    for i in 0..pairs {
        let p = synth_pair(i, seed, size);
        w.push(PairRecord {
            row: i,
            image_id: p.id.clone(),
            mid: "/m/synthetic".into(),
            class_name: p.subject.clone(),
            caption: p.caption.clone(),
            caption_source: "synthetic".into(),
            bbox: [0.0, 1.0, 0.0, 1.0],
            width: size,
            height: size,
            background_id: "procedural".into(),
            seed,
            input_image: png(&p.input)?,
            target_image: png(&p.target)?,
            provenance: "{\"source\": \"blipd_data::synthetic\"}".into(),
        })?;
    }
    let rows = w.finish()?;
    let mut m = Manifest::new(format!("synthetic-{seed}-{size}"), pairs, pairs);
    m.shards.push(ShardEntry {
        index: 0,
        file: name.into(),
        first_row: 0,
        slice_rows: pairs,
        rows,
        bytes: std::fs::metadata(&file).map_err(io)?.len(),
        sha256: sha256_file(&file)?,
        row_groups: ShardReader::open(&file)?.row_group_sizes(),
        bad: vec![],
    });
    m.save(dir)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_consistent() {
        let a = synth_pair(3, 7, 32);
        let b = synth_pair(3, 7, 32);
        assert_eq!(a.input, b.input);
        assert_eq!(a.target, b.target);
        assert_eq!(a.caption, b.caption);
        let c = synth_pair(4, 7, 32);
        assert_ne!(a.target, c.target);
        // Where the mask is full, input and target show the same subject pixel.
        let mut full = 0;
        for (x, y, m) in a.mask.enumerate_pixels() {
            if m[0] == 255 {
                assert_eq!(a.input.get_pixel(x, y), a.target.get_pixel(x, y));
                full += 1;
            }
        }
        assert!(full > 20, "subject covers {full} pixels");
        // Where the mask is empty, the backgrounds differ somewhere.
        let differs = a
            .mask
            .enumerate_pixels()
            .filter(|(x, y, m)| {
                m[0] == 0 && a.input.get_pixel(*x, *y) != a.target.get_pixel(*x, *y)
            })
            .count();
        assert!(differs > 0);
        for w in a.caption.split(' ') {
            assert!(vocabulary().contains(&w), "{w} not in the vocabulary");
        }
    }
}
