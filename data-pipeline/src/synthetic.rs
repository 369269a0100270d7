//! The micro world: procedural subjects with identities, the embedded dataset of `blipd pretrain` (no
//! downloads). A subject's identity is shape × palette × pattern ([`IDENTITIES`] of them; a tenth,
//! [`held_out_ids`], is never drawn for training). The *target* shows the subject at a random position
//! and scale in a scene the caption names ("a star on grass", "a cross at night"); the *input* is the
//! same subject cut out with its exact mask and composited ([`crate::composite::composite`]) onto an
//! unrelated procedural texture — the paper's prompted context generation. The class word (the shape)
//! is in the text; palette and pattern are only in the subject image, so a model can render them for a
//! subject it never saw only through its subject embedding.

use image::{GrayImage, Luma, Rgb, RgbImage};

/// Subject classes (the class word of the prompt).
pub const SHAPES: [&str; 6] = ["circle", "square", "triangle", "star", "diamond", "cross"];
/// Base colours of the palettes.
const COLORS: [[u8; 3]; 8] = [
    [225, 35, 35],  // red
    [245, 145, 25], // orange
    [240, 220, 40], // yellow
    [225, 45, 205], // magenta
    [40, 215, 225], // cyan
    [35, 65, 235],  // blue
    [115, 40, 175], // purple
    [20, 20, 20],   // black
];
const COLOR_NAMES: [&str; 8] = [
    "red", "orange", "yellow", "magenta", "cyan", "blue", "purple", "black",
];
/// Palettes: a primary colour (one per palette, so a solid subject still tells its palette) and the
/// secondary colour three places on.
pub const NUM_PALETTES: usize = 8;
/// How the two colours of a palette are laid out on the subject.
pub const PATTERNS: [&str; 4] = ["solid", "halves", "stripes", "core"];
/// Scenes of the targets, as the caption names them.
pub const SCENES: [&str; 5] = [
    "on grass",
    "in snow",
    "at night",
    "on the beach",
    "in a room",
];
/// Textures the input's subject is composited onto (unrelated to the scene).
pub const TEXTURES: [&str; 4] = ["striped", "checkered", "dotted", "plain"];
/// Number of identities (shape × palette × pattern).
pub const IDENTITIES: usize = SHAPES.len() * NUM_PALETTES * PATTERNS.len();

/// One subject identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub shape: usize,
    pub palette: usize,
    pub pattern: usize,
}

impl Identity {
    /// Identity number `id` (< [`IDENTITIES`]): shape fastest, then palette, then pattern.
    pub fn from_id(id: usize) -> Self {
        Self {
            shape: id % SHAPES.len(),
            palette: (id / SHAPES.len()) % NUM_PALETTES,
            pattern: id / (SHAPES.len() * NUM_PALETTES),
        }
    }
    pub fn id(&self) -> usize {
        self.shape + SHAPES.len() * (self.palette + NUM_PALETTES * self.pattern)
    }
    /// The palette's two colours.
    pub fn colors(&self) -> ([u8; 3], [u8; 3]) {
        (
            COLORS[self.palette],
            COLORS[(self.palette + 3) % COLORS.len()],
        )
    }
    /// "red-magenta striped star" (for people reading sheets; never in a prompt).
    pub fn describe(&self) -> String {
        format!(
            "{}-{} {} {}",
            COLOR_NAMES[self.palette],
            COLOR_NAMES[(self.palette + 3) % COLORS.len()],
            PATTERNS[self.pattern],
            SHAPES[self.shape]
        )
    }
}

/// The identities never drawn for training: a tenth of all, chosen by a fixed hash (the same in
/// every build), sorted.
pub fn held_out_ids() -> Vec<usize> {
    split().0.clone()
}

/// The identities training draws from.
pub fn train_ids() -> Vec<usize> {
    split().1.clone()
}

/// (held out, training) identities, computed once per process: every training pair draws from them.
fn split() -> &'static (Vec<usize>, Vec<usize>) {
    static SPLIT: std::sync::OnceLock<(Vec<usize>, Vec<usize>)> = std::sync::OnceLock::new();
    SPLIT.get_or_init(|| {
        let mut ids: Vec<(u64, usize)> = (0..IDENTITIES)
            .map(|id| (SplitMix::new(0x5EED_0000 + id as u64).next_u64(), id))
            .collect();
        ids.sort_unstable();
        let mut held: Vec<usize> = ids[..IDENTITIES / 10].iter().map(|&(_, id)| id).collect();
        held.sort_unstable();
        let train = (0..IDENTITIES).filter(|id| !held.contains(id)).collect();
        (held, train)
    })
}

/// The prompt text of a scene for a subject class: "a star on grass".
pub fn caption(shape: usize, scene: usize) -> String {
    format!("a {} {}", SHAPES[shape], SCENES[scene])
}

/// Words of the captions other than shapes (for building tiny vocabularies).
pub const OTHER_WORDS: [&str; 13] = [
    "a", "photo", "of", "on", "in", "at", "the", "grass", "snow", "night", "beach", "room", ",",
];

/// Every word a synthetic caption or class can contain (for building tiny vocabularies).
pub fn vocabulary() -> Vec<&'static str> {
    let mut v: Vec<&str> = OTHER_WORDS.to_vec();
    v.extend(SHAPES);
    v
}

/// One synthetic training pair.
#[derive(Clone, Debug)]
pub struct SyntheticPair {
    pub id: String,
    /// The subject composited onto an unrelated texture.
    pub input: RgbImage,
    /// The subject in its scene.
    pub target: RgbImage,
    /// The subject's exact (anti-aliased) mask in the target.
    pub mask: GrayImage,
    /// The class word (the shape).
    pub subject: String,
    /// "a star on grass".
    pub caption: String,
    pub identity: Identity,
    /// Index into [`SCENES`].
    pub scene: usize,
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

/// An unrelated texture for the input (stripes, checks, dots or plain, random colours).
fn texture(kind: usize, size: u32, rng: &mut SplitMix) -> RgbImage {
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

/// A scene: sky/wall above a horizon, ground below, with jittered colours and a little texture.
fn scene_image(scene: usize, size: u32, rng: &mut SplitMix) -> RgbImage {
    let (top, bottom): ([f64; 3], [f64; 3]) = match scene {
        0 => ([135.0, 190.0, 235.0], [70.0, 150.0, 55.0]), // grass under a blue sky
        1 => ([185.0, 190.0, 200.0], [242.0, 244.0, 248.0]), // snow under a grey sky
        2 => ([12.0, 16.0, 48.0], [28.0, 32.0, 44.0]),     // night
        3 => ([150.0, 200.0, 240.0], [228.0, 204.0, 150.0]), // beach: sky, sea band, sand
        _ => ([222.0, 208.0, 178.0], [120.0, 78.0, 48.0]), // room: wall and floor
    };
    let jitter = |c: [f64; 3], rng: &mut SplitMix| c.map(|v| v + 24.0 * (rng.unit() - 0.5));
    let (top, bottom) = (jitter(top, rng), jitter(bottom, rng));
    let s = size as f64;
    let horizon = s * (0.35 + 0.25 * rng.unit());
    let sea = [30.0, 105.0, 185.0];
    let phase = rng.unit() * 100.0;
    RgbImage::from_fn(size, size, |x, y| {
        let (fx, fy) = (x as f64, y as f64);
        let mut c = if fy < horizon { top } else { bottom };
        match scene {
            // Stars in the night sky.
            2 if fy < horizon => {
                let h = SplitMix::new((x as u64) << 32 ^ y as u64 ^ phase.to_bits()).unit();
                if h < 0.03 {
                    c = [235.0, 235.0, 200.0];
                }
            }
            // A band of sea between sky and sand.
            3 if fy >= horizon && fy < horizon + s * 0.12 => c = sea,
            // Floor boards.
            4 if fy >= horizon && ((fx + phase) / (s * 0.2)).floor() as i64 % 2 == 0 => {
                c = c.map(|v| v * 0.85)
            }
            // Blades of grass / snow drifts: a gentle ripple.
            0 | 1 if fy >= horizon => {
                let r = ((fx * 1.3 + fy * 0.7 + phase).sin() * 0.5 + 0.5) * 14.0;
                c = c.map(|v| v - r)
            }
            _ => {}
        }
        Rgb(c.map(|v| v.clamp(0.0, 255.0) as u8))
    })
}

/// Coverage of the shape at pixel (x, y) relative to the centre, anti-aliased by 4×4 supersampling;
/// also the share of the covered samples that take the secondary colour under `pattern`.
fn coverage(id: Identity, cx: f64, cy: f64, r: f64, x: u32, y: u32) -> (f64, f64) {
    let (mut hit, mut second) = (0u32, 0u32);
    for sy in 0..4 {
        for sx in 0..4 {
            let px = x as f64 + (sx as f64 + 0.5) / 4.0 - cx;
            let py = y as f64 + (sy as f64 + 0.5) / 4.0 - cy;
            let (ax, ay) = (px.abs(), py.abs());
            let inside = match id.shape {
                0 => px * px + py * py <= r * r,
                1 => ax <= r * 0.85 && ay <= r * 0.85,
                2 => py <= r * 0.8 && py >= -r && ax <= (py + r) * 0.6,
                3 => {
                    // A five-pointed star: radius varying with the angle.
                    let a = py.atan2(px) + std::f64::consts::FRAC_PI_2;
                    let k = (a * 5.0 / std::f64::consts::TAU).rem_euclid(1.0);
                    let t = (k - 0.5).abs() * 2.0; // 1 at a point, 0 between points
                    (px * px + py * py).sqrt() <= r * (0.5 + 0.5 * t)
                }
                4 => ax + ay <= r,
                _ => (ax <= r * 0.35 && ay <= r) || (ay <= r * 0.35 && ax <= r),
            };
            if !inside {
                continue;
            }
            hit += 1;
            let secondary = match id.pattern {
                0 => false,
                1 => px > 0.0,
                2 => ((py + r) / (r * 0.5)).floor() as i64 % 2 == 1,
                _ => px * px + py * py <= (r * 0.45) * (r * 0.45),
            };
            second += secondary as u32;
        }
    }
    let a = hit as f64 / 16.0;
    (
        a,
        if hit > 0 {
            second as f64 / hit as f64
        } else {
            0.0
        },
    )
}

/// Identity `identity` in scene `scene`, position and scale drawn from `rng`, at `size`² pixels; the
/// input's texture too.
pub fn render(
    identity: Identity,
    scene: usize,
    rng: &mut SplitMix,
    size: u32,
) -> (RgbImage, RgbImage, GrayImage) {
    use crate::buffer::{Gray, Rgb as RgbF};
    let target_scene = scene_image(scene, size, rng);
    let tex = texture(rng.below(TEXTURES.len()), size, rng);
    let s = size as f64;
    let r = s * (0.24 + 0.12 * rng.unit());
    let cx = r + (s - 2.0 * r) * rng.unit();
    let cy = r + (s - 2.0 * r) * rng.unit();
    let (c1, c2) = identity.colors();
    let n = (size * size) as usize;
    let mut fg = vec![0f64; n * 3];
    let mut alpha = vec![0f64; n];
    for y in 0..size {
        for x in 0..size {
            let (a, sec) = coverage(identity, cx, cy, r, x, y);
            if a <= 0.0 {
                continue;
            }
            // Shading so the subject is not flat colour.
            let d = ((x as f64 + 0.5 - cx).powi(2) + (y as f64 + 0.5 - cy).powi(2)).sqrt() / r;
            let shade = 0.85 + 0.15 * (1.0 - d).max(0.0);
            let q = (y * size + x) as usize;
            for c in 0..3 {
                let v = c1[c] as f64 * (1.0 - sec) + c2[c] as f64 * sec;
                fg[q * 3 + c] = (v * shade).min(255.0) / 255.0;
            }
            alpha[q] = a;
        }
    }
    let (w, h) = (size as usize, size as usize);
    let fg = RgbF::new(w, h, fg).expect("sizes agree");
    let alpha = Gray::new(w, h, alpha).expect("sizes agree");
    let over = |bg: &RgbImage| -> RgbImage {
        let out =
            crate::composite::composite(&fg, &alpha, &RgbF::from_rgb8(bg)).expect("sizes agree");
        out.to_rgb8()
    };
    let mask = GrayImage::from_fn(size, size, |x, y| {
        Luma([(alpha.data[(y * size + x) as usize] * 255.0).round() as u8])
    });
    (over(&tex), over(&target_scene), mask)
}

/// A pair of `identity` in `scene`, its pose and textures drawn from `(seed, index)`.
pub fn render_pair(
    identity: Identity,
    scene: usize,
    index: u64,
    seed: u64,
    size: u32,
) -> SyntheticPair {
    let mut rng = SplitMix::new(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407) ^ 0x00D1_5EA5);
    let (input, target, mask) = render(identity, scene, &mut rng, size);
    SyntheticPair {
        id: format!("synthetic-{seed}-{index:06}"),
        input,
        target,
        mask,
        subject: SHAPES[identity.shape].to_string(),
        caption: caption(identity.shape, scene),
        identity,
        scene,
    }
}

/// Training pair number `index` of the dataset with `seed`, at `size`×`size` pixels: an identity
/// drawn from [`train_ids`] (never a held-out one) in a random scene.
pub fn synth_pair(index: u64, seed: u64, size: u32) -> SyntheticPair {
    let train = &split().1;
    let mut rng = SplitMix::new(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    let identity = Identity::from_id(train[rng.below(train.len())]);
    let scene = rng.below(SCENES.len());
    render_pair(identity, scene, index, seed, size)
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
        assert_eq!(a.caption, caption(a.identity.shape, a.scene));
    }

    #[test]
    fn held_out_identities_are_never_trained_and_cover_every_factor() {
        let held = held_out_ids();
        assert_eq!(held.len(), IDENTITIES / 10);
        for i in 0..2000 {
            let p = synth_pair(i, 0, 16);
            assert!(
                !held.contains(&p.identity.id()),
                "pair {i} drew a held-out identity"
            );
        }
        // Each palette and pattern of a held-out identity is seen in training (on other shapes).
        let train = train_ids();
        for &h in &held {
            let id = Identity::from_id(h);
            assert_eq!(id.id(), h);
            assert!(train
                .iter()
                .any(|&t| Identity::from_id(t).palette == id.palette
                    && Identity::from_id(t).pattern == id.pattern));
        }
        let shapes: std::collections::BTreeSet<_> =
            held.iter().map(|&h| Identity::from_id(h).shape).collect();
        assert!(shapes.len() >= 4, "held-out shapes {shapes:?}");
    }

    #[test]
    fn the_caption_names_shape_and_scene_but_not_palette_or_pattern() {
        let p = render_pair(Identity::from_id(17), 2, 0, 0, 32);
        assert_eq!(p.caption, "a star at night".replace("star", SHAPES[17 % 6]));
        for w in ["solid", "halves", "stripes", "core", "red", "blue"] {
            assert!(!p.caption.contains(w));
        }
    }
}
