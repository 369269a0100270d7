//! `blipd data matte`: library entry point the CLI calls.

use crate::error::{DataError, Result};
use crate::imageio::{read_gray, read_rgb, ReadLimits};
use crate::{estimate_alpha_cf, estimate_foreground_ml, CfOptions, CfStats, FgOptions};
use std::path::Path;

/// Mattes one image with a trimap file and writes α as a 16-bit grey PNG, and optionally the estimated
/// foreground colours as an RGB PNG.
///
/// The trimap is any grey image (8- or 16-bit; colour is converted to luma): values ≤ 10 % of full scale are
/// background, ≥ 90 % foreground, anything else unknown (pymatting's `trimap_split`).
pub fn matte_file(
    image: &Path,
    trimap: &Path,
    out_alpha_png16: &Path,
    fg_png: Option<&Path>,
) -> Result<CfStats> {
    let id = image.display().to_string();
    let limits = ReadLimits::default();
    let img = read_rgb(image, &id, &limits)?;
    let tri = read_gray(trimap, &trimap.display().to_string(), &limits)?;
    tri.check_size("trimap", img.width, img.height)?;
    let (alpha, stats) =
        estimate_alpha_cf(&img, &tri, &CfOptions::default()).map_err(|e| match e {
            DataError::Trimap { reason, .. } => DataError::Trimap {
                id: trimap.display().to_string(),
                reason,
            },
            e => e,
        })?;
    save(out_alpha_png16, alpha.to_luma16().save(out_alpha_png16))?;
    if let Some(fg_path) = fg_png {
        let fg = estimate_foreground_ml(&img, &alpha, &FgOptions::default())?;
        save(fg_path, fg.to_rgb8().save(fg_path))?;
    }
    Ok(stats)
}

fn save(path: &Path, r: image::ImageResult<()>) -> Result<()> {
    r.map_err(|e| match e {
        image::ImageError::IoError(io) => DataError::io(path, io),
        other => DataError::Image {
            id: path.display().to_string(),
            reason: format!("encode: {other}"),
        },
    })
}
