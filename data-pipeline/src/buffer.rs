//! Plain float image buffers used by the pure stages (no Burn, no `image` types in the maths).

use crate::error::{DataError, Result};

/// Interleaved RGB image with channels in `[0, 1]`, row-major, `data.len() == width * height * 3`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f64>,
}

/// Single-channel image (alpha, trimap, mask), row-major, `data.len() == width * height`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gray {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f64>,
}

impl Rgb {
    /// Wraps interleaved data, checking its length.
    pub fn new(width: usize, height: usize, data: Vec<f64>) -> Result<Self> {
        if data.len() != width * height * 3 {
            return Err(DataError::Config(format!(
                "Rgb {width}x{height} needs {} values, got {}",
                width * height * 3,
                data.len()
            )));
        }
        Ok(Rgb {
            width,
            height,
            data,
        })
    }

    /// Converts an 8-bit RGB image (values divided by 255, as pymatting's `load_image`).
    pub fn from_rgb8(img: &image::RgbImage) -> Self {
        Rgb {
            width: img.width() as usize,
            height: img.height() as usize,
            data: img.as_raw().iter().map(|&v| f64::from(v) / 255.0).collect(),
        }
    }

    /// Rounds to an 8-bit RGB image.
    pub fn to_rgb8(&self) -> image::RgbImage {
        let raw = self.data.iter().map(|&v| to_u8(v)).collect();
        image::RgbImage::from_raw(self.width as u32, self.height as u32, raw)
            .expect("length checked at construction")
    }

    /// Pixel `(x, y)` as `[r, g, b]`.
    #[inline]
    pub fn pixel(&self, x: usize, y: usize) -> [f64; 3] {
        let o = (y * self.width + x) * 3;
        [self.data[o], self.data[o + 1], self.data[o + 2]]
    }
}

impl Gray {
    /// Wraps data, checking its length.
    pub fn new(width: usize, height: usize, data: Vec<f64>) -> Result<Self> {
        if data.len() != width * height {
            return Err(DataError::Config(format!(
                "Gray {width}x{height} needs {} values, got {}",
                width * height,
                data.len()
            )));
        }
        Ok(Gray {
            width,
            height,
            data,
        })
    }

    /// Converts an 8-bit grey image (divided by 255).
    pub fn from_luma8(img: &image::GrayImage) -> Self {
        Gray {
            width: img.width() as usize,
            height: img.height() as usize,
            data: img.as_raw().iter().map(|&v| f64::from(v) / 255.0).collect(),
        }
    }

    /// Converts a 16-bit grey image (divided by 65535).
    pub fn from_luma16(img: &image::ImageBuffer<image::Luma<u16>, Vec<u16>>) -> Self {
        Gray {
            width: img.width() as usize,
            height: img.height() as usize,
            data: img
                .as_raw()
                .iter()
                .map(|&v| f64::from(v) / 65535.0)
                .collect(),
        }
    }

    /// Rounds to an 8-bit grey image (values clamped to `[0, 1]`).
    pub fn to_luma8(&self) -> image::GrayImage {
        let raw = self.data.iter().map(|&v| to_u8(v)).collect();
        image::GrayImage::from_raw(self.width as u32, self.height as u32, raw)
            .expect("length checked at construction")
    }

    /// Rounds to a 16-bit grey image (values clamped to `[0, 1]`).
    pub fn to_luma16(&self) -> image::ImageBuffer<image::Luma<u16>, Vec<u16>> {
        let raw = self
            .data
            .iter()
            .map(|&v| (v.clamp(0.0, 1.0) * 65535.0).round() as u16)
            .collect();
        image::ImageBuffer::from_raw(self.width as u32, self.height as u32, raw)
            .expect("length checked at construction")
    }

    /// Checks that this buffer has the given size.
    pub fn check_size(&self, what: &str, width: usize, height: usize) -> Result<()> {
        if self.width != width || self.height != height {
            return Err(DataError::SizeMismatch {
                what: what.to_string(),
                expected_w: width as u32,
                expected_h: height as u32,
                actual_w: self.width as u32,
                actual_h: self.height as u32,
            });
        }
        Ok(())
    }
}

#[inline]
pub(crate) fn to_u8(v: f64) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}
