//! Bad requests to `blipd generate` are clear errors before any work: truncated images, sizes the
//! networks cannot take or the machine cannot hold, non-finite guidance.

use std::path::PathBuf;
use std::process::Command;

fn pipeline_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../blipd-models/tests/fixtures/pipeline")
}

/// Runs `blipd generate` on the fixture with `extra` arguments; returns (success, stderr).
fn generate(image: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_blipd"))
        .env("BLIPD_LOG", "warn")
        .arg("generate")
        .arg("--model")
        .arg(pipeline_fixture())
        .arg("--image")
        .arg(image)
        .args(["--subject", "dog"])
        .args(if extra.contains(&"--prompt") {
            &[][..]
        } else {
            &["--prompt", "on a beach"][..]
        })
        .args(if extra.contains(&"--steps") {
            &[][..]
        } else {
            &["--steps", "1"][..]
        })
        .args(extra)
        .arg("--out")
        .arg(tmp.path().join("out.png"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked") && out.status.code().is_some(),
        "a bad request must be an error, not a crash: {stderr}"
    );
    (out.status.success(), stderr)
}

#[test]
fn bad_generate_requests_are_clear_errors() {
    let reference = pipeline_fixture().join("reference.png");
    // The fixture's U-Net has 2 levels: latent factor 2, minimum 4×4.
    let cases: &[(&[&str], &str)] = &[
        (&["--height", "0", "--width", "16"], "both must be positive"),
        (&["--height", "16", "--width", "0"], "both must be positive"),
        (
            &["--height", "15", "--width", "16"],
            "must be a multiple of 2",
        ),
        (
            &["--height", "2", "--width", "16"],
            "below this U-Net's minimum of 4×4",
        ),
        (
            &["--height", "100000", "--width", "100000"],
            "GiB available",
        ),
        (
            &["--height", "16", "--width", "16", "--guidance-scale", "NaN"],
            "guidance scale NaN is not a finite number",
        ),
        (
            &["--height", "16", "--width", "16", "--guidance-scale", "inf"],
            "guidance scale inf is not a finite number",
        ),
        (
            &["--height", "16", "--width", "16", "--steps", "0"],
            "at least one denoising step",
        ),
    ];
    for (args, expected) in cases {
        let (ok, stderr) = generate(&reference, args);
        assert!(!ok, "{args:?} was accepted");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected {expected:?} in: {stderr}"
        );
        eprintln!("{args:?} -> {}", stderr.trim().lines().last().unwrap_or(""));
    }
    // The smallest accepted size works.
    let (ok, stderr) = generate(&reference, &["--height", "4", "--width", "6"]);
    assert!(ok, "{stderr}");
}

#[test]
fn a_truncated_jpeg_reference_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]));
    let full = tmp.path().join("full.jpg");
    img.save(&full).unwrap();
    let bytes = std::fs::read(&full).unwrap();
    let cut = tmp.path().join("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let (ok, stderr) = generate(&full, &["--height", "16", "--width", "16"]);
    assert!(ok, "the complete JPEG works: {stderr}");
    let (ok, stderr) = generate(&cut, &["--height", "16", "--width", "16"]);
    assert!(!ok, "a truncated JPEG was accepted");
    assert!(
        stderr.contains("truncated JPEG") && stderr.contains("cut.jpg"),
        "{stderr}"
    );
}

/// A prompt longer than the text encoder's budget still generates, with a warning that says how many
/// of its tokens were dropped; a short one has no warning.
#[test]
fn an_over_budget_prompt_is_reported_with_the_tokens_dropped() {
    let reference = pipeline_fixture().join("reference.png");
    let size = ["--height", "8", "--width", "8"];
    let long = vec!["on the green grass"; 20].join(" and ");
    let mut args = size.to_vec();
    args.extend(["--prompt", &long, "--neg-prompt", &long]);
    let (ok, stderr) = generate(&reference, &args);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("tokens are dropped"), "{stderr}");
    assert!(stderr.contains("negative prompt is"), "{stderr}");
    eprintln!("{stderr}");
    let (ok, stderr) = generate(&reference, &size);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("dropped"), "{stderr}");
}

fn blipd_in(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_blipd"))
        .env("BLIPD_LOG", "warn")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.success(), stderr)
}

/// `data matte` with a trimap that marks no pixel known says so (instead of writing an all-zero α);
/// the same image with a usable trimap works.
#[test]
fn matting_without_known_pixels_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    image::RgbImage::from_fn(24, 20, |x, y| image::Rgb([x as u8 * 9, y as u8 * 11, 60]))
        .save(d.join("img.png"))
        .unwrap();
    image::GrayImage::from_pixel(24, 20, image::Luma([128]))
        .save(d.join("grey.png"))
        .unwrap();
    image::GrayImage::from_fn(24, 20, |x, _| {
        image::Luma([if x < 6 {
            0
        } else if x > 18 {
            255
        } else {
            128
        }])
    })
    .save(d.join("tri.png"))
    .unwrap();
    let (ok, stderr) = blipd_in(
        d,
        &[
            "data", "matte", "--image", "img.png", "--trimap", "grey.png", "--out", "a.png",
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains("trimap grey.png: no known pixel"),
        "{stderr}"
    );
    assert!(!d.join("a.png").exists());
    let (ok, stderr) = blipd_in(
        d,
        &[
            "data", "matte", "--image", "img.png", "--trimap", "tri.png", "--out", "a.png",
        ],
    );
    assert!(ok, "{stderr}");
}

/// A missing backgrounds folder is one cause, said once.
#[test]
fn a_missing_backgrounds_dir_is_one_clear_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(
        d.join("s.csv"),
        "ImageID,LabelName,ClassName,XMin,XMax,YMin,YMax,Width,Height\n",
    )
    .unwrap();
    std::fs::create_dir_all(d.join("img")).unwrap();
    std::fs::create_dir_all(d.join("masks")).unwrap();
    let config =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/data/pipeline.toml");
    let (ok, stderr) = blipd_in(
        d,
        &[
            "data",
            "synth",
            "--config",
            config.to_str().unwrap(),
            "--subjects",
            "s.csv",
            "--images",
            "img",
            "--masks",
            "masks",
            "--mask-source",
            "dir",
            "--backgrounds",
            "nobgs",
            "--out",
            "out",
        ],
    );
    assert!(!ok);
    let line = stderr
        .lines()
        .find(|l| l.contains("error:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains("backgrounds dir nobgs: No such file or directory"),
        "{stderr}"
    );
    assert_eq!(line.matches("No such file").count(), 1, "{line}");
}

/// `eval --seeds` needs `--model` (there is nothing to regenerate per seed otherwise) and at least one
/// seed; both refused before any model loads.
#[test]
fn eval_seeds_without_a_model_or_with_zero_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let common = [
        "eval",
        "--generated",
        "gen",
        "--dreambench",
        "bench",
        "--clip",
        "clip",
        "--dino",
        "dino",
    ];
    let (ok, stderr) = blipd_in(tmp.path(), &[&common[..], &["--seeds", "2"]].concat());
    assert!(!ok && stderr.contains("--model"), "{stderr}");
    let fixture = pipeline_fixture().display().to_string();
    let (ok, stderr) = blipd_in(
        tmp.path(),
        &[&common[..], &["--model", fixture.as_str(), "--seeds", "0"]].concat(),
    );
    assert!(
        !ok && stderr.contains("--seeds must be at least 1"),
        "{stderr}"
    );
}
