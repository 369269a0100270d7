//! Trimap, robust image reading, compositing, `matte_file`, and an end-to-end run on a DreamBench photo.

use blipd_data::composite::{
    background_index, composite, fit_background, make_sample, stable_hash, Captions,
};
use blipd_data::imageio::{decode_image, read_header_size, to_rgb, ReadLimits};
use blipd_data::trimap::{erode, resize_bilinear, trimap_from_mask, TrimapOptions};
use blipd_data::{
    estimate_alpha_cf, estimate_foreground_ml, matte_file, read_gray, read_rgb, CfOptions,
    DataError, FgOptions, Gray, Rgb,
};
use image::{ImageEncoder, RgbImage};
use std::path::PathBuf;

fn jpeg(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
        .encode_image(img)
        .unwrap();
    out
}

fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128])
    })
}

#[test]
fn erosion_matches_disk_definition() {
    let (w, h) = (21, 17);
    let set: Vec<bool> = (0..w * h).map(|q| !(q % w == 10 && q / w == 8)).collect();
    let r = 3.0;
    let e = erode(&set, w, h, r);
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x as f64 - 10.0, y as f64 - 8.0);
            assert_eq!(e[y * w + x], dx * dx + dy * dy > r * r, "({x},{y})");
        }
    }
    // Border pixels do not erode.
    assert!(erode(&[true; 25], 5, 5, 2.0).iter().all(|&v| v));
}

#[test]
fn trimap_thresholds_and_band() {
    let (w, h) = (40, 20);
    // Soft mask: 1 for x < 15, ramp to 0 at x = 25.
    let mask = Gray::new(
        w,
        h,
        (0..w * h)
            .map(|q| (1.0 - ((q % w) as f64 - 15.0) / 10.0).clamp(0.0, 1.0))
            .collect(),
    )
    .unwrap();
    let opts = TrimapOptions {
        fg_threshold: 0.9,
        bg_threshold: 0.1,
        erode_radius: 2.0,
        dilate_radius: 3.0,
    };
    let t = trimap_from_mask(&mask, &opts).unwrap();
    let row: Vec<f64> = (0..w).map(|x| t.data[5 * w + x]).collect();
    // fg where p ≥ 0.9 ⇔ x ≤ 16, eroded by 2 → x ≤ 14; bg where p ≤ 0.1 ⇔ x ≥ 24, eroded by 3 → x ≥ 27.
    for (x, &v) in row.iter().enumerate() {
        let want = if x <= 14 {
            1.0
        } else if x >= 27 {
            0.0
        } else {
            0.5
        };
        assert_eq!(v, want, "x={x} row={row:?}");
    }
    assert!(trimap_from_mask(
        &mask,
        &TrimapOptions {
            fg_threshold: 0.1,
            bg_threshold: 0.5,
            ..opts
        }
    )
    .is_err());
}

#[test]
fn bilinear_resize_is_centre_aligned() {
    let src = Gray::new(2, 1, vec![0.0, 1.0]).unwrap();
    let up = resize_bilinear(&src, 4, 1);
    assert_eq!(up.data, vec![0.0, 0.25, 0.75, 1.0]);
}

#[test]
fn truncated_jpeg_is_a_typed_error() {
    let bytes = jpeg(&gradient(64, 48));
    let cut = &bytes[..bytes.len() * 2 / 3];
    match decode_image(cut, "img_trunc", &ReadLimits::default()) {
        Err(DataError::Image { id, reason }) => {
            assert_eq!(id, "img_trunc");
            assert!(reason.contains("truncated"), "{reason}");
        }
        other => panic!("expected an image error, got {other:?}"),
    }
    assert!(decode_image(b"not an image at all", "junk", &ReadLimits::default()).is_err());
    assert!(decode_image(&bytes, "ok", &ReadLimits::default()).is_ok());
}

#[test]
fn decompression_bomb_limits() {
    let bytes = jpeg(&gradient(300, 200));
    let limits = ReadLimits {
        max_width: 100,
        ..ReadLimits::default()
    };
    let err = decode_image(&bytes, "bomb", &limits).unwrap_err();
    assert!(
        matches!(err, DataError::Image { ref id, .. } if id == "bomb"),
        "{err}"
    );
    let limits = ReadLimits {
        max_alloc: 1000,
        ..ReadLimits::default()
    };
    assert!(decode_image(&bytes, "bomb", &limits).is_err());
}

#[test]
fn grey_16bit_and_alpha_become_rgb() {
    let mut png = Vec::new();
    let g16 = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(4, 3, |x, _| {
        image::Luma([x as u16 * 20000])
    });
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(
            g16.as_raw()
                .iter()
                .flat_map(|v| v.to_ne_bytes())
                .collect::<Vec<_>>()
                .as_slice(),
            4,
            3,
            image::ExtendedColorType::L16,
        )
        .unwrap();
    let rgb = to_rgb(&decode_image(&png, "g16", &ReadLimits::default()).unwrap());
    assert_eq!((rgb.width, rgb.height), (4, 3));
    assert!((rgb.pixel(1, 0)[0] - 20000.0 / 65535.0).abs() < 1e-12);
    assert_eq!(rgb.pixel(3, 2)[0], rgb.pixel(3, 2)[2]);

    let rgba = image::RgbaImage::from_fn(3, 2, |x, _| image::Rgba([10 * x as u8, 20, 30, 0]));
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(rgba.as_raw(), 3, 2, image::ExtendedColorType::Rgba8)
        .unwrap();
    let rgb = to_rgb(&decode_image(&png, "rgba", &ReadLimits::default()).unwrap());
    assert_eq!(rgb.pixel(2, 1), [20.0 / 255.0, 20.0 / 255.0, 30.0 / 255.0]);

    let grey = image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(x * 30 + y) as u8]));
    let bytes = {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 100)
            .encode_image(&grey)
            .unwrap();
        out
    };
    let rgb = to_rgb(&decode_image(&bytes, "grey", &ReadLimits::default()).unwrap());
    let p = rgb.pixel(5, 5);
    assert!(p[0] == p[1] && p[1] == p[2]);
}

/// Inserts an EXIF APP1 segment with the given orientation right after the JPEG SOI marker.
fn with_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one IFD entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes());
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn exif_rotation_is_applied_and_reported_in_header_size() {
    let bytes = with_orientation(&jpeg(&gradient(64, 32)), 6);
    let img = decode_image(&bytes, "rot", &ReadLimits::default()).unwrap();
    assert_eq!((img.width(), img.height()), (32, 64));
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rot.jpg");
    std::fs::write(&p, &bytes).unwrap();
    let s = read_header_size(&p, "rot", &ReadLimits::default()).unwrap();
    assert_eq!(
        (s.width, s.height, s.orientation_swaps_axes),
        (64, 32, true)
    );
    assert_eq!(s.display(), (32, 64));
}

#[test]
fn background_choice_is_deterministic_and_spread() {
    assert_eq!(stable_hash("abc", 1), stable_hash("abc", 1));
    assert_ne!(stable_hash("abc", 1), stable_hash("abc", 2));
    let mut counts = [0usize; 5];
    for i in 0..1000 {
        counts[background_index(&format!("{i:016x}"), 7, 5).unwrap()] += 1;
    }
    assert!(counts.iter().all(|&c| c > 150), "{counts:?}");
    assert_eq!(background_index("x", 0, 0), None);
    // Cover-fit: a 100x50 background fitted to 40x40 is scaled to 80x40 and cropped.
    let bg = gradient(100, 50);
    let a = fit_background(&bg, 40, 40, "img", 3).unwrap();
    let b = fit_background(&bg, 40, 40, "img", 3).unwrap();
    assert_eq!((a.width, a.height), (40, 40));
    assert_eq!(a, b);
}

#[test]
fn composite_and_captions() {
    let fg = Rgb::new(2, 1, vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0]).unwrap();
    let bg = Rgb::new(2, 1, vec![0.0, 0.0, 1.0, 0.0, 0.0, 1.0]).unwrap();
    let alpha = Gray::new(2, 1, vec![1.0, 0.25]).unwrap();
    let out = composite(&fg, &alpha, &bg).unwrap();
    assert_eq!(out.data, vec![1.0, 0.0, 0.0, 0.25, 0.0, 0.75]);
    assert!(composite(&fg, &Gray::new(1, 1, vec![0.0]).unwrap(), &bg).is_err());

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("captions.tsv");
    std::fs::write(&p, "# id\tcaption\nimg_a\ta dog on a sofa\n\nimg_b\t\n").unwrap();
    let c = Captions::load(&p).unwrap();
    assert_eq!(c.caption("img_a", "Dog"), "a dog on a sofa");
    assert_eq!(c.caption("img_b", "Teddy bear"), "a photo of a teddy bear");
    assert_eq!(c.caption("img_z", "Cat"), "a photo of a cat");
    std::fs::write(&p, "no tab here\n").unwrap();
    assert!(Captions::load(&p).is_err());
}

#[test]
fn matte_file_writes_16bit_alpha_and_foreground() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/matting");
    let dir = tempfile::tempdir().unwrap();
    let (a, f) = (dir.path().join("alpha.png"), dir.path().join("fg.png"));
    let stats = matte_file(
        &fixtures.join("dog_00.png"),
        &fixtures.join("dog_00_trimap.png"),
        &a,
        Some(&f),
    )
    .unwrap();
    assert!(stats.unknown > 1000);
    let alpha = image::open(&a).unwrap();
    assert_eq!(alpha.color(), image::ColorType::L16);
    let reference = read_gray(
        &fixtures.join("dog_00_alpha.png"),
        "ref",
        &ReadLimits::default(),
    )
    .unwrap();
    let ours = read_gray(&a, "ours", &ReadLimits::default()).unwrap();
    let mean: f64 = ours
        .data
        .iter()
        .zip(&reference.data)
        .map(|(x, y)| (x - y).abs())
        .sum::<f64>()
        / ours.data.len() as f64;
    assert!(mean < 0.002, "mean |Δα| {mean}");
    assert_eq!(image::open(&f).unwrap().dimensions_rgb(), (160, 160));
    let err = matte_file(
        &fixtures.join("dog_00.png"),
        &fixtures.join("missing.png"),
        &a,
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("missing.png"), "{err}");
}

trait Dims {
    fn dimensions_rgb(&self) -> (u32, u32);
}
impl Dims for image::DynamicImage {
    fn dimensions_rgb(&self) -> (u32, u32) {
        (self.width(), self.height())
    }
}

/// Whole pure pipeline on a real 512² DreamBench photo (skips when ../shared is absent).
#[test]
fn dreambench_end_to_end() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/dreambench");
    let path = root.join("dog/00.jpg");
    if !path.exists() {
        println!(
            "SKIPPED dreambench_end_to_end: {} is absent",
            path.display()
        );
        return;
    }
    let img = read_rgb(&path, "dog/00", &ReadLimits::default()).unwrap();
    let (w, h) = (img.width, img.height);
    // Crude soft mask: a centred ellipse probability, as a blurry CLIPSeg map would be.
    let mask = Gray::new(
        w,
        h,
        (0..w * h)
            .map(|q| {
                let (u, v) = (
                    ((q % w) as f64 + 0.5) / w as f64,
                    ((q / w) as f64 + 0.5) / h as f64,
                );
                let d = (((u - 0.5) / 0.32).powi(2) + ((v - 0.55) / 0.42).powi(2)).sqrt();
                (1.0 - (d - 0.85) / 0.3).clamp(0.0, 1.0)
            })
            .collect(),
    )
    .unwrap();
    let tri = trimap_from_mask(
        &mask,
        &TrimapOptions {
            erode_radius: 4.0,
            dilate_radius: 4.0,
            ..TrimapOptions::default()
        },
    )
    .unwrap();
    let (alpha, stats) = estimate_alpha_cf(&img, &tri, &CfOptions::default()).unwrap();
    println!("dog/00 {w}x{h}: {stats:?}");
    assert!(stats.unknown > 10_000);
    let fg = estimate_foreground_ml(&img, &alpha, &FgOptions::default()).unwrap();
    let backgrounds = vec![gradient(300, 200), gradient(100, 400)];
    let sample = make_sample(
        "dog_00",
        "Dog",
        &img,
        &fg,
        &alpha,
        &backgrounds,
        &Captions::default(),
        0,
    )
    .unwrap();
    assert_eq!(sample.caption, "a photo of a dog");
    assert_eq!(sample.target, img);
    // Where α = 1 the input is the foreground estimate; where α = 0 it is the background.
    let bg = fit_background(
        &backgrounds[sample.background],
        w as u32,
        h as u32,
        "dog_00",
        0,
    )
    .unwrap();
    for q in (0..w * h).step_by(97) {
        if alpha.data[q] == 1.0 {
            assert_eq!(sample.input.data[q * 3], fg.data[q * 3]);
        } else if alpha.data[q] == 0.0 {
            assert_eq!(sample.input.data[q * 3], bg.data[q * 3]);
        }
    }
}
