//! Bad requests are clear errors before any work and write nothing: `blipd generate`'s truncated images,
//! sizes the networks cannot take or the machine cannot hold, non-finite guidance; the matrix of every
//! application command (generate, embed-subject, interpolate, stylize, edit) × missing and unreadable
//! images, folders missing a component, wrong latents, ratios, LoRA files for another network; data and
//! eval errors.

use blipd_testkit::copy_dir;

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

/// The application commands × the bad inputs a user sends them: a missing reference, an unreadable
/// one (not an image), a model folder missing a component, and each command's own (latents of the wrong
/// shape or dtype, ratios that do not sum to 1, a LoRA for another network, an unknown output format).
/// Each: exit non-zero, no panic, a message naming the problem, and no output file or folder.
#[test]
fn every_command_refuses_bad_input_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let fx = pipeline_fixture();
    let reference = fx.join("reference.png").display().to_string();
    let missing = root.join("missing.png").display().to_string();
    let garbage = root.join("garbage.png");
    std::fs::write(&garbage, b"this is not a PNG").unwrap();
    let garbage = garbage.display().to_string();
    // A folder without its VAE.
    let no_vae = root.join("no_vae");
    copy_dir(&fx, &no_vae);
    std::fs::remove_dir_all(no_vae.join("vae")).unwrap();
    let no_vae = no_vae.display().to_string();
    let model = fx.display().to_string();
    let cn = fx
        .join("../pipeline_controlnet/controlnet")
        .display()
        .to_string();
    // Latents of the wrong rank, and integer ones (float16/32/64 are read and converted).
    let bad_shape = root.join("rank3.npy");
    blipd_data::npy::write_f32(&bad_shape, &[4, 8, 8], &[0.0; 256]).unwrap();
    let f64_npy = root.join("int64.npy");
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let header = "{'descr': '<i8', 'fortran_order': False, 'shape': (1, 4, 8, 8), }";
    let pad = 64 - (10 + header.len() + 1) % 64;
    let header = format!("{header}{}\n", " ".repeat(pad));
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(vec![0u8; 8 * 256]);
    std::fs::write(&f64_npy, bytes).unwrap();
    let (bad_shape, f64_npy) = (
        bad_shape.display().to_string(),
        f64_npy.display().to_string(),
    );
    let other_lora = fx.join("../lora/adapter").display().to_string();
    let size = ["--height", "16", "--width", "16", "--steps", "1"];

    let out_of = |cmd: &str| root.join(format!("{cmd}-out.png"));
    type Case<'a> = (&'a str, Vec<String>, &'a str);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let gen = |extra: &[&str]| {
        let mut v = s(&["--subject", "dog", "--prompt", "on a beach"]);
        v.extend(s(&size));
        v.extend(s(extra));
        v
    };
    let cases: Vec<Case> = vec![
        (
            "generate",
            gen(&["--model", &model, "--image", &missing]),
            "missing.png",
        ),
        (
            "generate",
            gen(&["--model", &model, "--image", &garbage]),
            "garbage.png",
        ),
        (
            "generate",
            gen(&["--model", &no_vae, "--image", &reference]),
            "no vae/",
        ),
        (
            "generate",
            gen(&[
                "--model",
                &model,
                "--image",
                &reference,
                "--latents",
                &bad_shape,
            ]),
            "expected (K, 4, h, w)",
        ),
        (
            "generate",
            gen(&[
                "--model",
                &model,
                "--image",
                &reference,
                "--latents",
                &f64_npy,
            ]),
            "float16/32/64",
        ),
        (
            "generate",
            gen(&[
                "--model",
                &model,
                "--image",
                &reference,
                "--image",
                &reference,
                "--subject",
                "cat",
                "--ratio",
                "0.3",
                "--ratio",
                "0.3",
            ]),
            "sum to 1",
        ),
        (
            "generate",
            gen(&[
                "--model",
                &model,
                "--image",
                &reference,
                "--lora",
                &other_lora,
            ]),
            "does not fit this U-Net",
        ),
        (
            "generate",
            gen(&["--model", &model, "--image", &reference, "--lora", &missing]),
            "missing.png",
        ),
        (
            "embed-subject",
            s(&["--model", &model, "--image", &missing, "--subject", "dog"]),
            "missing.png",
        ),
        (
            "embed-subject",
            s(&["--model", &model, "--image", &garbage, "--subject", "dog"]),
            "garbage.png",
        ),
        (
            "embed-subject",
            s(&[
                "--model",
                &no_vae,
                "--image",
                &reference,
                "--subject",
                "dog",
            ]),
            "no vae/",
        ),
        (
            "interpolate",
            s(&[
                "--model",
                &model,
                "--image",
                &reference,
                "--image",
                &missing,
                "--subject",
                "a",
                "--subject",
                "b",
                "--prompt",
                "x",
                "--height",
                "16",
                "--width",
                "16",
                "--steps",
                "1",
            ]),
            "missing.png",
        ),
        (
            "interpolate",
            s(&[
                "--model",
                &no_vae,
                "--image",
                &reference,
                "--image",
                &reference,
                "--subject",
                "a",
                "--subject",
                "b",
                "--prompt",
                "x",
                "--height",
                "16",
                "--width",
                "16",
                "--steps",
                "1",
            ]),
            "vae",
        ),
        (
            "stylize",
            s(&[
                "--model",
                &model,
                "--controlnet",
                &cn,
                "--style-image",
                &garbage,
                "--style-subject",
                "flower",
                "--structure",
                &reference,
                "--target-subject",
                "teapot",
                "--prompt",
                "x",
                "--height",
                "16",
                "--width",
                "16",
                "--steps",
                "1",
            ]),
            "garbage.png",
        ),
        (
            "stylize",
            s(&[
                "--model",
                &model,
                "--controlnet",
                &missing,
                "--style-image",
                &reference,
                "--style-subject",
                "flower",
                "--structure",
                &reference,
                "--target-subject",
                "teapot",
                "--prompt",
                "x",
                "--height",
                "16",
                "--width",
                "16",
                "--steps",
                "1",
            ]),
            "missing.png",
        ),
        (
            "edit",
            s(&[
                "--model",
                &model,
                "--image",
                &garbage,
                "--cond-subject",
                "dog",
                "--src-subject",
                "cat",
                "--prompt",
                "x",
                "--height",
                "32",
                "--width",
                "32",
                "--steps",
                "1",
            ]),
            "garbage.png",
        ),
        (
            "edit",
            s(&[
                "--model",
                &model,
                "--image",
                &reference,
                "--cond-subject",
                "dog",
                "--src-subject",
                "cat",
                "--prompt",
                "x",
                "--source-image",
                &missing,
                "--height",
                "32",
                "--width",
                "32",
                "--steps",
                "1",
            ]),
            "missing.png",
        ),
        (
            "edit",
            s(&[
                "--model",
                &no_vae,
                "--image",
                &reference,
                "--cond-subject",
                "dog",
                "--src-subject",
                "cat",
                "--prompt",
                "x",
                "--height",
                "32",
                "--width",
                "32",
                "--steps",
                "1",
            ]),
            "vae",
        ),
    ];
    for (i, (cmd, args, needle)) in cases.iter().enumerate() {
        let out = if *cmd == "embed-subject" {
            root.join(format!("emb-{i}.npy"))
        } else if *cmd == "edit" {
            root.join(format!("edit-{i}"))
        } else {
            out_of(&format!("{cmd}-{i}"))
        };
        let flag = if *cmd == "edit" { "--out-dir" } else { "--out" };
        let o = Command::new(env!("CARGO_BIN_EXE_blipd"))
            .env("BLIPD_LOG", "warn")
            .arg(cmd)
            .args(args)
            .arg(flag)
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains("panicked") && o.status.code().is_some(),
            "{cmd} {args:?} crashed: {err}"
        );
        assert!(!o.status.success(), "{cmd} {args:?} was accepted");
        assert!(
            err.contains(needle),
            "{cmd} {args:?}: expected {needle:?} in: {err}"
        );
        assert!(!out.exists(), "{cmd} {args:?} wrote {}", out.display());
        eprintln!("{cmd} → {}", err.trim().lines().last().unwrap_or(""));
    }
}
