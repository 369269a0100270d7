//! Canny edge maps for a ControlNet-canny condition, prepared as LAVIS prepares them (model.md §5.3):
//! the photo's shorter side scaled to `resolution` (512) with both sides rounded to multiples of 64
//! (ControlNet's `resize_image`), edges at thresholds `low`/`high` (the stylization notebook: 30/70),
//! the single-channel map repeated to RGB. The pipeline then resizes it to the output size
//! ([`crate::BlipDiffusionPipeline::control_image`]).
//!
//! The edges come from `imageproc::edges::canny`, not OpenCV's `cv2.Canny`, and differ in three ways
//! (so the same thresholds give similar, not identical, maps): imageproc smooths the grey image with
//! a Gaussian (σ = 1.4) first, measures the gradient as `√(gx² + gy²)` (OpenCV: `|gx| + |gy|`), and
//! works on the grey image (OpenCV on a colour image takes the channel with the strongest gradient).
//! The resize uses Lanczos-3 when enlarging (OpenCV: Lanczos-4) and a triangle filter scaled to the
//! ratio when shrinking (OpenCV: `INTER_AREA`).

use image::imageops::FilterType;

use crate::error::AppError;

/// `"LOW,HIGH"` → the two hysteresis thresholds (finite, `0 ≤ LOW ≤ HIGH`).
pub fn parse_thresholds(s: &str) -> Result<(f32, f32), AppError> {
    let bad = || {
        AppError::Request(format!(
            "--canny {s:?}: expected LOW,HIGH with 0 ≤ LOW ≤ HIGH, e.g. 30,70 (LAVIS' stylization) \
             or 100,200"
        ))
    };
    let (l, h) = s.split_once(',').ok_or_else(bad)?;
    let low: f32 = l.trim().parse().map_err(|_| bad())?;
    let high: f32 = h.trim().parse().map_err(|_| bad())?;
    if !(low.is_finite() && high.is_finite() && low >= 0.0 && low <= high) {
        return Err(bad());
    }
    Ok((low, high))
}

/// ControlNet's `resize_image`: the shorter side to `resolution`, then each side rounded to a multiple
/// of 64.
pub fn lavis_resize(img: &image::RgbImage, resolution: u32) -> Result<image::RgbImage, AppError> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 || resolution < 64 {
        return Err(AppError::Request(format!(
            "Canny preparation: a {w}×{h} image at resolution {resolution} (needs a non-empty image \
             and resolution ≥ 64)"
        )));
    }
    let k = resolution as f64 / w.min(h) as f64;
    let round64 = |x: f64| (((x * k) / 64.0).round() as u32).max(1) * 64;
    let (nw, nh) = (round64(w as f64), round64(h as f64));
    let filter = if k > 1.0 {
        FilterType::Lanczos3
    } else {
        FilterType::Triangle
    };
    Ok(image::imageops::resize(img, nw, nh, filter))
}

/// Canny edges of `img` (white on black), repeated to RGB.
pub fn canny_edges(img: &image::RgbImage, low: f32, high: f32) -> image::RgbImage {
    let grey = image::imageops::grayscale(img);
    let edges = imageproc::edges::canny(&grey, low, high);
    let (w, h) = edges.dimensions();
    let mut out = image::RgbImage::new(w, h);
    for (o, e) in out.pixels_mut().zip(edges.pixels()) {
        *o = image::Rgb([e[0], e[0], e[0]]);
    }
    out
}

/// The condition image of a photo: [`lavis_resize`] to `resolution`, then [`canny_edges`].
pub fn canny_condition(
    photo: &crate::RgbImage,
    low: f32,
    high: f32,
    resolution: u32,
) -> Result<crate::RgbImage, AppError> {
    let img =
        image::RgbImage::from_raw(photo.width as u32, photo.height as u32, photo.data.clone())
            .ok_or_else(|| AppError::Image("RGB buffer of the wrong size".into()))?;
    let edges = canny_edges(&lavis_resize(&img, resolution)?, low, high);
    let (w, h) = edges.dimensions();
    crate::RgbImage::new(w as usize, h as usize, edges.into_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_and_bad_ones_say_what_to_write() {
        assert_eq!(parse_thresholds("30,70").unwrap(), (30.0, 70.0));
        assert_eq!(parse_thresholds(" 100 , 200 ").unwrap(), (100.0, 200.0));
        for bad in ["30", "70,30", "-1,5", "a,b", "30,inf"] {
            let e = parse_thresholds(bad).unwrap_err().to_string();
            assert!(e.contains("LOW,HIGH"), "{bad}: {e}");
        }
    }

    #[test]
    fn resize_follows_controlnet_rounding() {
        // 300×200 → shorter side 512: 768×512; 1000×700 → 731.4×512 → 704×512 (rounded to 64s).
        let img = image::RgbImage::new(300, 200);
        assert_eq!(lavis_resize(&img, 512).unwrap().dimensions(), (768, 512));
        let img = image::RgbImage::new(1000, 700);
        assert_eq!(lavis_resize(&img, 512).unwrap().dimensions(), (704, 512));
        assert!(lavis_resize(&image::RgbImage::new(0, 5), 512).is_err());
    }

    #[test]
    fn edges_trace_a_square_and_nothing_else() {
        // A bright square on black: edges on its outline, none inside or far outside.
        let mut img = image::RgbImage::new(64, 64);
        for y in 16..48 {
            for x in 16..48 {
                img.put_pixel(x, y, image::Rgb([220, 200, 180]));
            }
        }
        let e = canny_edges(&img, 30.0, 70.0);
        let on = |x: u32, y: u32| e.get_pixel(x, y)[0] == 255;
        assert!((14..=18).any(|x| on(x, 32)), "left side");
        assert!((46..=50).any(|x| on(x, 32)), "right side");
        assert!(
            !on(32, 32) && !on(4, 4) && !on(60, 60),
            "interior and background"
        );
        assert!(e.pixels().all(|p| p[0] == p[1] && p[1] == p[2]), "grey RGB");
    }
}
