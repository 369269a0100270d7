//! Reference-image preprocessing for the Q-Former's ViT, reproducing both reference implementations
//! byte for byte (model.md §1.7):
//!
//! - **diffusers** `BlipImageProcessor`: resize straight to `S×S` (aspect not kept, PIL bicubic),
//!   `× (1/255)` in f64 → f32, `(x − mean) / std` in f32 (the centre crop is a no-op);
//! - **LAVIS** `blip_diffusion_inp_image_eval`: torchvision `Resize(S)` (shorter side to `S`, PIL bicubic),
//!   `CenterCrop(S)`, `ToTensor` (`u8 / 255` in f32), `Normalize` (f32).
//!
//! Resizing is a port of Pillow's `ImagingResample` for 8-bit images: separable convolution (horizontal
//! pass first) with the Keys bicubic kernel (a = −0.5), support widened by the scale factor when
//! shrinking (antialiasing), coefficients normalised and quantised to 22-bit fixed point, and the
//! intermediate rows rounded and clipped to `u8` — so results equal `PIL.Image.resize(…, BICUBIC)`.

use std::path::Path;

use burn::prelude::*;

use crate::AppError;

/// OpenAI CLIP normalisation (diffusers `OPENAI_CLIP_MEAN/STD`, LAVIS `BlipImageEvalProcessor`).
/// The literals are the reference's decimal strings (rounded to f32 as numpy/torch round them).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// An 8-bit RGB image, `H × W × 3`, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self, AppError> {
        if data.len() != width * height * 3 || width == 0 || height == 0 {
            return Err(AppError::Image(format!(
                "RGB image {width}×{height} needs {} bytes, got {}",
                width * height * 3,
                data.len()
            )));
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// Open any format the `image` crate reads (PNG, JPEG, WebP), the way the data pipeline reads its
    /// images ([`blipd_data::imageio::decode_image`]): a truncated JPEG is refused instead of padded
    /// with grey, size bombs are refused, EXIF orientation is applied (as diffusers' `load_image`), and
    /// the result is RGB (alpha dropped, as PIL's `convert("RGB")`).
    pub fn open(path: &Path) -> Result<Self, AppError> {
        let bytes = std::fs::read(path)
            .map_err(|e| AppError::Image(format!("reading {}: {e}", path.display())))?;
        let limits = blipd_data::imageio::ReadLimits::default();
        let img = blipd_data::imageio::decode_image(&bytes, &path.display().to_string(), &limits)
            .map_err(|e| AppError::Image(e.to_string()))?
            .to_rgb8();
        let (w, h) = img.dimensions();
        Self::new(w as usize, h as usize, img.into_raw())
    }

    /// `PIL.Image.resize((width, height), Image.BICUBIC)` (no `reducing_gap`): [`pil_resize`].
    pub fn resize_bicubic(&self, width: usize, height: usize) -> Result<Self, AppError> {
        pil_resize(self, width, height, PilResample::Bicubic)
    }

    /// Crop `[left, left + w) × [top, top + h)`.
    pub fn crop(&self, left: usize, top: usize, w: usize, h: usize) -> Result<Self, AppError> {
        if left + w > self.width || top + h > self.height {
            return Err(AppError::Image(format!(
                "crop {w}×{h} at ({left}, {top}) exceeds the {}×{} image",
                self.width, self.height
            )));
        }
        let mut data = Vec::with_capacity(w * h * 3);
        for y in top..top + h {
            let row = (y * self.width + left) * 3;
            data.extend_from_slice(&self.data[row..row + w * 3]);
        }
        Self::new(w, h, data)
    }
}

// ---------------------------------------------------------------------------------------------
// Pillow resampling
// ---------------------------------------------------------------------------------------------

/// Pillow's resampling filters, by their `PIL.Image.Resampling` value (what `resample` holds in a
/// `preprocessor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PilResample {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl PilResample {
    pub fn from_pil(v: i64) -> Option<Self> {
        Some(match v {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return None,
        })
    }

    /// Half-width of the kernel at scale 1 (Pillow's `filter->support`).
    fn support(self) -> f64 {
        match self {
            Self::Nearest | Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn kernel(self, x: f64) -> f64 {
        use std::f64::consts::PI;
        match self {
            Self::Nearest | Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * PI;
                    x.sin() / x * (0.46 + 0.54 * x.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                let sinc = |x: f64| {
                    if x == 0.0 {
                        1.0
                    } else {
                        (x * PI).sin() / (x * PI)
                    }
                };
                if -3.0 < x && x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel source window and 8-bit fixed-point weights (Pillow `precompute_coeffs` +
/// `normalize_coeffs_8bpc`).
struct PilCoeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
}

impl PilCoeffs {
    fn new(in_size: usize, out_size: usize, filter: PilResample) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size);
        let mut kk = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            // C `(int)` truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax.saturating_sub(xmin).min(ksize);
            let mut total = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                *wx = filter.kernel((x as f64 + xmin as f64 - center + 0.5) * ss);
                total += *wx;
            }
            for x in 0..n {
                let v = if total != 0.0 { w[x] / total } else { w[x] };
                let f = v * f64::from(1u32 << PRECISION_BITS);
                kk[xx * ksize + x] = if v < 0.0 {
                    (-0.5 + f) as i32
                } else {
                    (0.5 + f) as i32
                };
            }
            bounds.push((xmin, n));
        }
        Self { ksize, bounds, kk }
    }

    fn weights(&self, i: usize) -> (usize, &[i32]) {
        let (first, n) = self.bounds[i];
        (first, &self.kk[i * self.ksize..i * self.ksize + n])
    }
}

fn clip8(ss: i64) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `PIL.Image.resize((width, height), resample)` of an 8-bit RGB image (no `box`, no `reducing_gap`),
/// equal to Pillow's output byte for byte: separable fixed-point convolution, horizontal pass first, rows
/// rounded and clipped to `u8` between the passes; `Nearest` is Pillow's affine nearest-neighbour scaling.
pub fn pil_resize(
    img: &RgbImage,
    width: usize,
    height: usize,
    filter: PilResample,
) -> Result<RgbImage, AppError> {
    if width == 0 || height == 0 {
        return Err(AppError::Image(format!(
            "cannot resize to {width}×{height}"
        )));
    }
    if (width, height) == (img.width, img.height) {
        return Ok(img.clone());
    }
    if filter == PilResample::Nearest {
        return Ok(pil_resize_nearest(img, width, height));
    }
    let mut cur = img.clone();
    if width != cur.width {
        let c = PilCoeffs::new(cur.width, width, filter);
        let mut out = vec![0u8; width * cur.height * 3];
        for (src, dst) in cur
            .data
            .chunks_exact(cur.width * 3)
            .zip(out.chunks_exact_mut(width * 3))
        {
            for xx in 0..width {
                let (first, k) = c.weights(xx);
                for ch in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        ss += i64::from(src[(first + i) * 3 + ch]) * i64::from(w);
                    }
                    dst[xx * 3 + ch] = clip8(ss);
                }
            }
        }
        cur = RgbImage {
            width,
            height: cur.height,
            data: out,
        };
    }
    if height != cur.height {
        let c = PilCoeffs::new(cur.height, height, filter);
        let row = width * 3;
        let mut out = vec![0u8; height * row];
        for (yy, dst) in out.chunks_exact_mut(row).enumerate() {
            let (first, k) = c.weights(yy);
            for (x, d) in dst.iter_mut().enumerate() {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &w) in k.iter().enumerate() {
                    ss += i64::from(cur.data[(first + i) * row + x]) * i64::from(w);
                }
                *d = clip8(ss);
            }
        }
        cur = RgbImage {
            width,
            height,
            data: out,
        };
    }
    Ok(cur)
}

/// Pillow `ImagingScaleAffine`: source coordinate accumulated in f64 from `scale / 2`, truncated.
fn pil_resize_nearest(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let index = |n_in: usize, n_out: usize| -> Vec<usize> {
        let a = n_in as f64 / n_out as f64;
        let mut v = a * 0.5;
        (0..n_out)
            .map(|_| {
                let i = (v as usize).min(n_in - 1);
                v += a;
                i
            })
            .collect()
    };
    let (xs, ys) = (index(img.width, width), index(img.height, height));
    let mut data = Vec::with_capacity(width * height * 3);
    for &y in &ys {
        for &x in &xs {
            let p = (y * img.width + x) * 3;
            data.extend_from_slice(&img.data[p..p + 3]);
        }
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// torchvision `Resize(size)` + `CenterCrop(size)` of a PIL image: the shorter side to `size` (the
/// longer to `int(size · long / short)`) with Pillow's `filter`, then the centre `size × size`.
pub fn resize_shorter_center_crop(
    image: &RgbImage,
    size: usize,
    filter: PilResample,
) -> Result<RgbImage, AppError> {
    let (w, h) = (image.width, image.height);
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    if short == 0 || size == 0 {
        return Err(AppError::Image(format!(
            "cannot resize a {w}×{h} image to {size}"
        )));
    }
    // torchvision: new_long = int(size * long / short)
    let new_long = ((size * long) as f64 / short as f64) as usize;
    let (nw, nh) = if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    };
    let resized = pil_resize(image, nw, nh, filter)?;
    let top = ((nh - size) as f64 / 2.0).round_ties_even() as usize;
    let left = ((nw - size) as f64 / 2.0).round_ties_even() as usize;
    resized.crop(left, top, size, size)
}

/// How the reference image is brought to the ViT's `S×S` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReferenceResize {
    /// diffusers `BlipImageProcessor`: squash to `S×S` (aspect ratio not kept).
    #[default]
    Diffusers,
    /// LAVIS `blip_diffusion_inp_image_eval`: shorter side to `S`, centre crop `S×S`.
    Lavis,
}

/// Preprocess a reference image into normalised pixels `[1, 3, S, S]` (CLIP mean/std).
pub fn preprocess_reference<B: Backend>(
    image: &RgbImage,
    size: usize,
    mode: ReferenceResize,
    mean: [f32; 3],
    std: [f32; 3],
    device: &B::Device,
) -> Result<Tensor<B, 4>, AppError> {
    let (img, to_unit): (RgbImage, fn(u8) -> f32) = match mode {
        ReferenceResize::Diffusers => (image.resize_bicubic(size, size)?, |v| {
            (f64::from(v) * (1.0 / 255.0)) as f32
        }),
        ReferenceResize::Lavis => (
            resize_shorter_center_crop(image, size, PilResample::Bicubic)?,
            |v| f32::from(v) / 255.0,
        ),
    };
    let plane = size * size;
    let mut chw = vec![0f32; 3 * plane];
    for (i, px) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * plane + i] = (to_unit(px[c]) - mean[c]) / std[c];
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(chw, [1, 3, size, size]),
        device,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_identity_and_constant() {
        let img = RgbImage::new(5, 4, (0..60).map(|v| v as u8 * 3).collect()).unwrap();
        assert_eq!(img.resize_bicubic(5, 4).unwrap(), img);
        // A constant image stays constant under any resize (weights sum to 1 in fixed point).
        let c = RgbImage::new(7, 3, vec![200; 63]).unwrap();
        for (w, h) in [(3, 5), (14, 6), (2, 2)] {
            let r = c.resize_bicubic(w, h).unwrap();
            assert!(r.data.iter().all(|&v| v == 200), "{w}×{h}");
        }
    }

    #[test]
    fn crop_bounds() {
        let img = RgbImage::new(4, 4, vec![0; 48]).unwrap();
        assert!(img.crop(1, 1, 3, 3).is_ok());
        assert!(img.crop(2, 0, 3, 3).is_err());
    }
}
