//! Fixtures shared by the CLI tests: the tiny DINO / CLIP folders of blipd-models and a two-subject
//! DreamBench.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `blipd` binary of this build, logging warnings only.
pub fn blipd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_blipd"));
    c.env("BLIPD_LOG", "warn");
    c
}

/// Runs `c`, asserts it succeeded (printing its output otherwise) and returns stdout + stderr.
pub fn run_ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{c:?} failed:\n{t}");
    t
}

/// The diffusers pipeline fixture of blipd-models (its `reference.png` is a subject photo).
pub fn pipeline_fixture() -> PathBuf {
    fixture("pipeline")
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../blipd-models/tests/fixtures")
        .join(name)
}

/// stdout and stderr of a finished command.
pub fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// transformers folders of the tiny models (tiny processor configs, weights as model.safetensors).
pub fn model_dir(root: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let f = fixture(name);
    std::fs::copy(f.join("config.json"), d.join("config.json")).unwrap();
    std::fs::copy(f.join("weights.safetensors"), d.join("model.safetensors")).unwrap();
    std::fs::copy(
        f.join("tiny_preprocessor_config.json"),
        d.join("preprocessor_config.json"),
    )
    .unwrap();
    for e in extra {
        std::fs::copy(f.join(e), d.join(e)).unwrap();
    }
    d
}

pub const PROMPTS_FILE: &str = "Classes

subject_name,class
dog,dog
vase,vase

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red cube shaped {0} {1}'.format(unique_token, class_token),
'a {0} {1} on top of pink fabric'.format(unique_token, class_token)
]
";

/// A DreamBench of two subjects with one photo each (`dog`: the CLIP fixture's photo, `vase`: a
/// gradient) under `root/bench`.
pub fn tiny_bench(root: &Path) -> PathBuf {
    let bench = root.join("bench");
    for d in ["dog", "vase"] {
        std::fs::create_dir_all(bench.join(d)).unwrap();
    }
    std::fs::write(bench.join("prompts_and_classes.txt"), PROMPTS_FILE).unwrap();
    std::fs::copy(fixture("clip").join("image.png"), bench.join("dog/00.png")).unwrap();
    let g = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 90])
    });
    g.save(bench.join("vase/00.png")).unwrap();
    bench
}

/// `blipd generate` at 16 px with 3 steps from the pipeline fixture's reference photo; asserts success.
pub fn generate_16px(model: &Path, subject: &str, prompt: &str, out_png: &Path) {
    run_ok(
        blipd()
            .arg("generate")
            .arg("--model")
            .arg(model)
            .arg("--image")
            .arg(pipeline_fixture().join("reference.png"))
            .args(["--subject", subject, "--prompt", prompt, "--steps", "3"])
            .args(["--height", "16", "--width", "16", "--out"])
            .arg(out_png),
    );
}
