//! Closed-form matting and foreground estimation against pymatting 1.1.16.
//!
//! Fixtures (`tests/fixtures/matting/`, regenerate with
//! `/work/pyref/bin/python scripts/bench/matting_ref.py fixture data-pipeline/tests/fixtures/matting 160
//! ../shared/dreambench/{dog,teapot,cat}/00.jpg`): DreamBench photos (CC-BY 4.0, see
//! `../shared/dreambench/LICENSE.md`) bicubic-resized to 160², a trimap derived from a crude mask (ellipse trimap
//! → pymatting α → α>0.5 → erode/dilate by a disk of radius 160/32; unknown stored as 128), pymatting's α
//! (16-bit) and pymatting's F computed from that quantised α.

use blipd_data::{
    estimate_alpha_cf, estimate_foreground_background_ml, estimate_foreground_ml, CfOptions,
    FgOptions, Gray, Rgb,
};
use std::path::PathBuf;

const NAMES: [&str; 3] = ["dog_00", "teapot_00", "cat_00"];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/matting")
}

fn load(name: &str) -> (Rgb, Gray, Gray, Vec<f64>) {
    let d = dir();
    let img = image::open(d.join(format!("{name}.png")))
        .unwrap()
        .to_rgb8();
    let tri = image::open(d.join(format!("{name}_trimap.png")))
        .unwrap()
        .to_luma8();
    let alpha = image::open(d.join(format!("{name}_alpha.png")))
        .unwrap()
        .to_luma16();
    let fg = image::open(d.join(format!("{name}_fg.png")))
        .unwrap()
        .to_luma16();
    let fg = fg
        .as_raw()
        .iter()
        .map(|&v| f64::from(v) / 65535.0)
        .collect();
    (
        Rgb::from_rgb8(&img),
        Gray::from_luma8(&tri),
        Gray::from_luma16(&alpha),
        fg,
    )
}

/// (mean |Δ| over the image, mean |Δ| over unknown pixels, max |Δ|).
fn alpha_errors(ours: &Gray, reference: &Gray, trimap: &Gray) -> (f64, f64, f64) {
    let (mut sum, mut sum_u, mut n_u, mut max) = (0.0, 0.0, 0usize, 0.0f64);
    for ((&a, &b), &t) in ours.data.iter().zip(&reference.data).zip(&trimap.data) {
        let d = (a - b).abs();
        sum += d;
        max = max.max(d);
        if t > 0.1 && t < 0.9 {
            sum_u += d;
            n_u += 1;
        }
    }
    (sum / ours.data.len() as f64, sum_u / n_u.max(1) as f64, max)
}

#[test]
fn alpha_matches_pymatting_default_tolerance() {
    for name in NAMES {
        let (img, tri, reference, _) = load(name);
        let (alpha, stats) = estimate_alpha_cf(&img, &tri, &CfOptions::default()).unwrap();
        let (mean, mean_u, max) = alpha_errors(&alpha, &reference, &tri);
        println!(
            "{name}: mean|da| {mean:.6} unknown-mean {mean_u:.6} max {max:.4} stats {stats:?}"
        );
        assert!(
            stats.unknown > 1000,
            "{name}: fixture should have an unknown band"
        );
        assert!(mean <= 0.002, "{name}: mean |Δα| {mean} > 0.002");
        assert!(
            mean_u <= 0.005,
            "{name}: unknown-region mean |Δα| {mean_u} > 0.005"
        );
        // Known pixels keep their trimap value exactly.
        for (&a, &t) in alpha.data.iter().zip(&tri.data) {
            if !(t > 0.1 && t < 0.9) {
                assert_eq!(a, t);
            }
        }
    }
}

#[test]
fn alpha_matches_pymatting_tight_tolerance() {
    let opts = CfOptions {
        tolerance: 1e-7,
        ..CfOptions::default()
    };
    for name in NAMES {
        let (img, tri, reference, _) = load(name);
        let (alpha, _) = estimate_alpha_cf(&img, &tri, &opts).unwrap();
        let (mean, _, max) = alpha_errors(&alpha, &reference, &tri);
        println!("{name} (tol 1e-7): mean|da| {mean:.2e} max {max:.2e}");
        // Only the 16-bit quantisation of the reference (≤ 7.6e-6) and solver tolerance remain.
        assert!(mean <= 2e-5, "{name}: mean |Δα| {mean}");
        assert!(max <= 2e-3, "{name}: max |Δα| {max}");
    }
}

#[test]
fn coarse_to_fine_and_single_level_agree() {
    let (img, tri, reference, _) = load("dog_00");
    let opts = CfOptions {
        coarse_to_fine: false,
        tolerance: 1e-6,
        ..CfOptions::default()
    };
    let (alpha, stats) = estimate_alpha_cf(&img, &tri, &opts).unwrap();
    assert_eq!(stats.levels, 1);
    let (mean, _, _) = alpha_errors(&alpha, &reference, &tri);
    assert!(mean <= 1e-4, "single-level mean |Δα| {mean}");
    // The fixture is small (~4k unknowns, below the default `min_coarse_unknowns`): force the pyramid.
    let opts = CfOptions {
        tolerance: 1e-6,
        min_coarse_unknowns: 500,
        ..CfOptions::default()
    };
    let (alpha, stats) = estimate_alpha_cf(&img, &tri, &opts).unwrap();
    assert!(stats.levels >= 3, "levels {}", stats.levels);
    assert!(stats.coarse_iterations > 0);
    let (mean, _, _) = alpha_errors(&alpha, &reference, &tri);
    assert!(mean <= 1e-4, "coarse-to-fine mean |Δα| {mean} ({stats:?})");
}

#[test]
fn foreground_matches_pymatting() {
    for name in NAMES {
        let (img, _, alpha, fg_ref) = load(name);
        let (fg, bg) =
            estimate_foreground_background_ml(&img, &alpha, &FgOptions::default()).unwrap();
        assert_eq!(
            (fg.width, fg.height, bg.width, bg.height),
            (img.width, img.height, img.width, img.height)
        );
        // pymatting's default call returns F alone: the same F.
        let fg_only = estimate_foreground_ml(&img, &alpha, &FgOptions::default()).unwrap();
        assert_eq!(fg_only.data, fg.data);
        // Where α = 0 the background is the image (the data term pins it), up to the smoothness prior.
        let (mut sum, mut n) = (0.0, 0usize);
        for (q, &a) in alpha.data.iter().enumerate() {
            if a == 0.0 {
                for c in 0..3 {
                    sum += (bg.data[q * 3 + c] - img.data[q * 3 + c]).abs();
                    n += 1;
                }
            }
        }
        assert!(
            n > 0 && sum / (n as f64) < 1e-2,
            "{name}: mean |B − I| where α = 0: {}",
            sum / n as f64
        );
        let (mut sum, mut n, mut max) = (0.0, 0usize, 0.0f64);
        for (q, &a) in alpha.data.iter().enumerate() {
            for c in 0..3 {
                let d = (fg.data[q * 3 + c] - fg_ref[q * 3 + c]).abs();
                max = max.max(d);
                if a > 0.01 {
                    sum += d;
                    n += 1;
                }
            }
        }
        let mean = sum / n as f64;
        println!("{name}: foreground mean|dF| (α>0.01) {mean:.2e} max {max:.2e}");
        // Both sides compute in f32; differences are rounding order and 16-bit quantisation.
        assert!(mean <= 1e-4, "{name}: mean |ΔF| {mean}");
        assert!(max <= 2e-2, "{name}: max |ΔF| {max}");
    }
}

#[test]
fn fully_known_trimap_returns_trimap() {
    let img = Rgb::new(8, 6, (0..8 * 6 * 3).map(|i| (i % 7) as f64 / 7.0).collect()).unwrap();
    let tri = Gray::new(
        8,
        6,
        (0..48)
            .map(|i| if i % 3 == 0 { 0.95 } else { 0.0 })
            .collect(),
    )
    .unwrap();
    let (alpha, stats) = estimate_alpha_cf(&img, &tri, &CfOptions::default()).unwrap();
    assert_eq!(stats.unknown, 0);
    assert_eq!(alpha.data, tri.data);
}

#[test]
fn unknown_band_between_flat_regions_interpolates() {
    // Left half black, right half white, unknown columns 6..10 on a flat grey ramp-free image:
    // with a constant-colour image the Laplacian is a plain smoothness prior, so α must be monotone in x.
    let (w, h) = (16, 12);
    let img = Rgb::new(w, h, vec![0.5; w * h * 3]).unwrap();
    let tri = Gray::new(
        w,
        h,
        (0..w * h)
            .map(|q| match q % w {
                0..=5 => 0.0,
                6..=9 => 0.5,
                _ => 1.0,
            })
            .collect(),
    )
    .unwrap();
    let (alpha, _) = estimate_alpha_cf(&img, &tri, &CfOptions::default()).unwrap();
    let row: Vec<f64> = (0..w).map(|x| alpha.data[5 * w + x]).collect();
    for x in 6..10 {
        assert!(
            row[x] > row[x - 1] - 1e-9 && row[x] < row[x + 1] + 1e-9,
            "row {row:?}"
        );
        assert!(row[x] > 0.0 && row[x] < 1.0, "row {row:?}");
    }
}

#[test]
fn size_mismatch_is_an_error() {
    let img = Rgb::new(4, 4, vec![0.0; 48]).unwrap();
    let tri = Gray::new(4, 3, vec![0.5; 12]).unwrap();
    let err = estimate_alpha_cf(&img, &tri, &CfOptions::default()).unwrap_err();
    assert!(err.to_string().contains("trimap"), "{err}");
}
