//! Robust image reading: every failure becomes a typed [`DataError::Image`] carrying the sample id, so a
//! dataset run can count it and go on.
//!
//! * Decoding goes through `image` with [`ReadLimits`] (width, height and allocation caps) against
//!   decompression bombs.
//! * JPEGs must end with an EOI marker after their last SOS marker: a truncated download is an error instead of
//!   an image silently padded with grey (the decoder itself is lenient).
//! * Greyscale, 16-bit, CMYK (converted by the JPEG decoder) and alpha images all come out as RGB; the alpha
//!   channel is dropped (colours kept, as PIL's `convert("RGB")` does).
//! * EXIF orientation is applied, so the pixels are in display orientation.
//! * 8-bit data becomes exactly `v / 255` in f64 (what pymatting sees), 16-bit data `v / 65535`.

use crate::buffer::Rgb;
use crate::error::{DataError, Result};
use image::{DynamicImage, ImageDecoder, ImageReader};
use std::io::Cursor;
use std::path::Path;

/// Caps applied before and during decoding.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReadLimits {
    pub max_width: u32,
    pub max_height: u32,
    /// Maximum bytes the decoder may allocate.
    pub max_alloc: u64,
    /// Reject JPEGs without an EOI marker after the last scan.
    pub reject_truncated_jpeg: bool,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_width: 16_384,
            max_height: 16_384,
            max_alloc: 1 << 30,
            reject_truncated_jpeg: true,
        }
    }
}

fn err(id: &str, reason: impl ToString) -> DataError {
    DataError::Image {
        id: id.to_string(),
        reason: reason.to_string(),
    }
}

fn reader<'a>(
    bytes: &'a [u8],
    id: &str,
    limits: &ReadLimits,
) -> Result<ImageReader<Cursor<&'a [u8]>>> {
    let mut r = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(id, format!("format detection: {e}")))?;
    if r.format().is_none() {
        return Err(err(id, "unrecognised image format"));
    }
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_width);
    l.max_image_height = Some(limits.max_height);
    l.max_alloc = Some(limits.max_alloc);
    r.limits(l);
    Ok(r)
}

/// True when a JPEG byte stream has an EOI marker (FF D9) after its last SOS marker (FF DA).
pub fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let eoi = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    matches!((sos, eoi), (Some(s), Some(e)) if e > s)
}

/// Decodes an image held in memory (see the module docs); `id` names it in errors.
pub fn decode_image(bytes: &[u8], id: &str, limits: &ReadLimits) -> Result<DynamicImage> {
    let r = reader(bytes, id, limits)?;
    let is_jpeg = r.format() == Some(image::ImageFormat::Jpeg);
    if is_jpeg && limits.reject_truncated_jpeg && !jpeg_is_complete(bytes) {
        return Err(err(
            id,
            "truncated JPEG (no EOI marker after the last scan)",
        ));
    }
    let mut decoder = r
        .into_decoder()
        .map_err(|e| err(id, format!("header: {e}")))?;
    // Some decoders do not enforce `max_alloc` themselves: check the output size before decoding.
    let need = decoder.total_bytes();
    if need > limits.max_alloc {
        return Err(err(
            id,
            format!(
                "decoded size {need} B exceeds the {} B limit",
                limits.max_alloc
            ),
        ));
    }
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img =
        DynamicImage::from_decoder(decoder).map_err(|e| err(id, format!("decode: {e}")))?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(err(id, "empty image"));
    }
    Ok(img)
}

/// Converts any decoded image to [`Rgb`] (alpha dropped; 8-bit exact `v/255`, deeper data `v/65535`).
pub fn to_rgb(img: &DynamicImage) -> Rgb {
    match img {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => Rgb::from_rgb8(&img.to_rgb8()),
        _ => {
            let i = img.to_rgb16();
            Rgb {
                width: i.width() as usize,
                height: i.height() as usize,
                data: i.as_raw().iter().map(|&v| f64::from(v) / 65535.0).collect(),
            }
        }
    }
}

/// Reads and decodes an image file as [`Rgb`].
pub fn read_rgb(path: &Path, id: &str, limits: &ReadLimits) -> Result<Rgb> {
    let bytes = std::fs::read(path).map_err(|e| err(id, format!("{}: {e}", path.display())))?;
    Ok(to_rgb(&decode_image(&bytes, id, limits)?))
}

/// Reads a single-channel image (mask, trimap) in `[0, 1]`; colour images are converted to luma.
pub fn read_gray(path: &Path, id: &str, limits: &ReadLimits) -> Result<crate::Gray> {
    let bytes = std::fs::read(path).map_err(|e| err(id, format!("{}: {e}", path.display())))?;
    let img = decode_image(&bytes, id, limits)?;
    Ok(match img {
        DynamicImage::ImageLuma8(g) => crate::Gray::from_luma8(&g),
        DynamicImage::ImageLuma16(g) => crate::Gray::from_luma16(&g),
        other if other.color().bytes_per_pixel() / other.color().channel_count() > 1 => {
            crate::Gray::from_luma16(&other.to_luma16())
        }
        other => crate::Gray::from_luma8(&other.to_luma8()),
    })
}

/// Stored pixel size and whether EXIF orientation swaps width and height for display, read from the header
/// only (no pixel decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderSize {
    pub width: u32,
    pub height: u32,
    pub orientation_swaps_axes: bool,
}

impl HeaderSize {
    /// Size in display orientation.
    pub fn display(&self) -> (u32, u32) {
        if self.orientation_swaps_axes {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }
}

/// Reads an image's size from its header. Reads at most the first 256 KiB of the file.
pub fn read_header_size(path: &Path, id: &str, limits: &ReadLimits) -> Result<HeaderSize> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| err(id, format!("{}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    f.take(256 * 1024)
        .read_to_end(&mut bytes)
        .map_err(|e| err(id, format!("{}: {e}", path.display())))?;
    let r = reader(&bytes, id, limits)?;
    let mut decoder = r
        .into_decoder()
        .map_err(|e| err(id, format!("header: {e}")))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(err(id, "empty image"));
    }
    use image::metadata::Orientation::*;
    let swaps = matches!(
        decoder.orientation().unwrap_or(NoTransforms),
        Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH
    );
    Ok(HeaderSize {
        width,
        height,
        orientation_swaps_axes: swaps,
    })
}
