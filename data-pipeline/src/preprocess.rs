//! Training-time image preprocessing shared by both stages (LAVIS `blip_diffusion_inp_image_*` and
//! `blip_diffusion_tgt_image_train`, BLIP-2's eval transform): shorter side to `size` (bicubic), centre
//! crop, channel-first `f32`.

/// OpenAI CLIP normalisation (diffusers `OPENAI_CLIP_MEAN/STD`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// `[3, size, size]`, CLIP-normalised: the vision tower's input.
pub fn clip_input(img: &image::RgbImage, size: usize) -> Vec<f32> {
    to_chw(&resize_crop(img, size), |c, v| {
        (v / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
    })
}

/// `[3, size, size]` in [−1, 1]: the VAE's input.
pub fn vae_target(img: &image::RgbImage, size: usize) -> Vec<f32> {
    to_chw(&resize_crop(img, size), |_, v| v / 127.5 - 1.0)
}

/// A CLIP-normalised `[3, S, S]` image back to RGB (for sample sheets).
pub fn clip_pixels_to_rgb(pixels: &[f32], size: usize) -> image::RgbImage {
    image::RgbImage::from_fn(size as u32, size as u32, |x, y| {
        let mut p = [0u8; 3];
        for (c, pc) in p.iter_mut().enumerate() {
            let v = pixels[c * size * size + y as usize * size + x as usize] * CLIP_STD[c]
                + CLIP_MEAN[c];
            *pc = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
        }
        image::Rgb(p)
    })
}

/// Shorter side to `size` (bicubic, Catmull–Rom), then the centre `size`×`size` crop.
pub fn resize_crop(img: &image::RgbImage, size: usize) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let s = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * s).round() as u32).max(size as u32),
        ((h as f64 * s).round() as u32).max(size as u32),
    );
    let r = image::imageops::resize(img, nw, nh, image::imageops::FilterType::CatmullRom);
    let (x0, y0) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    image::imageops::crop_imm(&r, x0, y0, size as u32, size as u32).to_image()
}

fn to_chw(img: &image::RgbImage, f: impl Fn(usize, f32) -> f32) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            out[c * w * h + y as usize * w + x as usize] = f(c, p[c] as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_the_centre_and_normalises() {
        // 40×20: the shorter side goes to 10, then the centre 10×10 of 20×10.
        let img =
            image::RgbImage::from_fn(40, 20, |x, _| image::Rgb([if x < 20 { 0 } else { 255 }; 3]));
        let v = vae_target(&img, 10);
        assert_eq!(v.len(), 300);
        assert!(
            (v[0] + 1.0).abs() < 1e-6 && (v[9] - 1.0).abs() < 1e-6,
            "{:?}",
            &v[..10]
        );
        let c = clip_input(&img, 10);
        let back = clip_pixels_to_rgb(&c, 10);
        assert_eq!(back.get_pixel(0, 0)[0], 0);
        assert_eq!(back.get_pixel(9, 0)[0], 255);
    }
}
