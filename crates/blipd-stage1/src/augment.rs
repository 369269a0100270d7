//! BLIP-2's training-time image transform (LAVIS `blip2_image_train`): torchvision's
//! `RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3/4, 4/3), interpolation=BICUBIC)` then
//! `RandomHorizontalFlip()`, before the CLIP normalisation.
//!
//! Each sample draws from its own stream, keyed by its position in the global sample stream of the
//! run (`(run.seed, AUGMENT_STREAM + position)`), so the crops do not depend on the number of ranks
//! or on a resume, and the same image gets a new crop every epoch.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::Stage1Error;

/// Base of the per-sample augmentation streams, apart from the trainer's.
pub const AUGMENT_STREAM: u64 = 0x4155_0000_0000_0000;

/// `[data.augment]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Fraction of the image area the crop covers, drawn uniformly (LAVIS `min_scale`, `max_scale`).
    #[serde(default = "default_scale")]
    pub scale: [f64; 2],
    /// Crop aspect ratio range (width / height), drawn log-uniformly (torchvision's default).
    #[serde(default = "default_ratio")]
    pub ratio: [f64; 2],
    /// Mirror half of the images left–right.
    #[serde(default = "yes")]
    pub flip: bool,
}

fn default_scale() -> [f64; 2] {
    [0.5, 1.0]
}
fn default_ratio() -> [f64; 2] {
    [3.0 / 4.0, 4.0 / 3.0]
}
fn yes() -> bool {
    true
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            scale: default_scale(),
            ratio: default_ratio(),
            flip: true,
        }
    }
}

impl Augment {
    pub fn validate(&self) -> Result<(), Stage1Error> {
        let [s0, s1] = self.scale;
        let [r0, r1] = self.ratio;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            return Err(Stage1Error::Config(format!(
                "[data.augment] scale = [{s0}, {s1}]: expected 0 < min ≤ max ≤ 1"
            )));
        }
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return Err(Stage1Error::Config(format!(
                "[data.augment] ratio = [{r0}, {r1}]: expected 0 < min ≤ max"
            )));
        }
        Ok(())
    }

    /// torchvision `RandomResizedCrop.get_params`: `(x, y, w, h)` of the crop in a `width`×`height`
    /// image — ten tries at a random area and aspect ratio, else the centre crop clamped to `ratio`.
    pub fn crop_params(&self, width: u32, height: u32, rng: &mut impl Rng) -> (u32, u32, u32, u32) {
        let area = width as f64 * height as f64;
        let (lr0, lr1) = (self.ratio[0].ln(), self.ratio[1].ln());
        for _ in 0..10 {
            let target = area * rng.random_range(self.scale[0]..=self.scale[1]);
            let aspect = rng.random_range(lr0..=lr1).exp();
            let w = (target * aspect).sqrt().round() as u32;
            let h = (target / aspect).sqrt().round() as u32;
            if w > 0 && w <= width && h > 0 && h <= height {
                let y = rng.random_range(0..=height - h);
                let x = rng.random_range(0..=width - w);
                return (x, y, w, h);
            }
        }
        let in_ratio = width as f64 / height as f64;
        let (w, h) = if in_ratio < self.ratio[0] {
            (
                width,
                ((width as f64 / self.ratio[0]).round() as u32).max(1),
            )
        } else if in_ratio > self.ratio[1] {
            (
                ((height as f64 * self.ratio[1]).round() as u32).max(1),
                height,
            )
        } else {
            (width, height)
        };
        ((width - w) / 2, (height - h) / 2, w, h)
    }

    /// The crop resized to `size`×`size` (bicubic), mirrored with probability ½ when `flip`.
    pub fn apply(&self, img: &image::RgbImage, size: u32, rng: &mut impl Rng) -> image::RgbImage {
        let (x, y, w, h) = self.crop_params(img.width(), img.height(), rng);
        let crop = image::imageops::crop_imm(img, x, y, w, h).to_image();
        let mut out =
            image::imageops::resize(&crop, size, size, image::imageops::FilterType::CatmullRom);
        if self.flip && rng.random_bool(0.5) {
            image::imageops::flip_horizontal_in_place(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blipd_train::TrainRng;

    #[test]
    fn crops_respect_scale_and_ratio_and_are_keyed() {
        let a = Augment::default();
        let mut areas = Vec::new();
        for k in 0..500 {
            let mut rng = TrainRng::new(7, AUGMENT_STREAM + k);
            let (x, y, w, h) = a.crop_params(640, 480, &mut rng);
            assert!(x + w <= 640 && y + h <= 480, "{x} {y} {w} {h}");
            let frac = (w * h) as f64 / (640.0 * 480.0);
            // Rounding of w and h moves the area by a few pixels' worth.
            assert!((0.49..=1.0).contains(&frac), "area {frac}");
            let r = w as f64 / h as f64;
            assert!((0.74..=1.34).contains(&r), "ratio {r}");
            areas.push(frac);
            let mut again = TrainRng::new(7, AUGMENT_STREAM + k);
            assert_eq!(a.crop_params(640, 480, &mut again), (x, y, w, h));
        }
        let mean = areas.iter().sum::<f64>() / areas.len() as f64;
        // Large crops whose aspect ratio does not fit the image are redrawn, so the accepted areas
        // lean below the uniform mean of 0.75 (as torchvision's do).
        assert!((0.6..0.78).contains(&mean), "mean area {mean}");
        // A sliver image cannot fit the ratio: the fallback centre crop clamps it.
        let mut rng = TrainRng::new(1, 2);
        let (x, y, w, h) = a.crop_params(1000, 10, &mut rng);
        assert_eq!((w, h), (13, 10));
        assert_eq!((x, y), (493, 0));
    }

    #[test]
    fn flips_about_half_and_keeps_the_size() {
        let a = Augment {
            scale: [1.0, 1.0],
            ratio: [1.0, 1.0],
            flip: true,
        };
        let img = image::RgbImage::from_fn(8, 8, |x, _| image::Rgb([(x * 30) as u8; 3]));
        let mut flipped = 0;
        for k in 0..200 {
            let mut rng = TrainRng::new(3, AUGMENT_STREAM + k);
            let out = a.apply(&img, 8, &mut rng);
            assert_eq!(out.dimensions(), (8, 8));
            if out.get_pixel(0, 0)[0] > out.get_pixel(7, 0)[0] {
                flipped += 1;
            } else {
                assert_eq!(out, img, "full-image crop at the same size is the identity");
            }
        }
        assert!((70..130).contains(&flipped), "{flipped} of 200 flipped");
        assert!(Augment {
            scale: [0.0, 1.0],
            ..Augment::default()
        }
        .validate()
        .is_err());
    }
}
