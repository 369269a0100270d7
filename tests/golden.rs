//! A golden loss curve, as torchtitan keeps one: the embedded tiny plan (`configs/tiny.toml`), 20 steps
//! of stage 1 then 20 of stage 2 (the Q-Former handed over), run by the binary, against the committed
//! per-step losses in `tests/golden/tiny_losses.json`. Any change to a network, a loss, the data, the
//! optimizer or the randomness moves the curve; the tolerance (relative 1e-3) only absorbs rounding
//! differences between CPUs (the kernels pick AVX2 + FMA or the baseline build at run time).
//!
//! A change that is meant to move the curve regenerates the file and says why in its commit:
//!     BLIPD_UPDATE_GOLDEN=1 cargo test -p blipd-cli --test golden

use std::path::PathBuf;
use std::process::Command;

const STEPS: u64 = 20;
const REL_TOL: f64 = 1e-3;

fn golden_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/tiny_losses.json")
}

fn losses(run: &std::path::Path, stage: &str) -> Vec<f64> {
    let m = blipd_train::metrics::read_metrics(&run.join(stage).join("metrics.jsonl")).unwrap();
    assert_eq!(
        m.iter().map(|r| r.step).collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>(),
        "{stage}: one record per step"
    );
    m.iter().map(|r| r.loss).collect()
}

#[test]
fn tiny_plan_follows_the_golden_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_blipd"))
        .env("BLIPD_LOG", "warn")
        .arg("pretrain")
        .arg("--run-dir")
        .arg(&run)
        .args(["--set", &format!("stage1.train.max_steps={STEPS}")])
        .args(["--set", "stage1.train.log_every=1"])
        .args(["--set", &format!("stage2.train.max_steps={STEPS}")])
        .args(["--set", "stage2.train.log_every=1"])
        .args([
            "--set",
            "stage2.sample.every=0",
            "--set",
            "stage2.sample.at_end=false",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let now = serde_json::json!({
        "plan": "configs/tiny.toml",
        "steps": STEPS,
        "stage1": losses(&run, "stage1"),
        "stage2": losses(&run, "stage2"),
    });
    let path = golden_file();
    if std::env::var_os("BLIPD_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&now).unwrap() + "\n").unwrap();
        println!("wrote {}", path.display());
        return;
    }
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (BLIPD_UPDATE_GOLDEN=1 writes it)", path.display())
        }))
        .unwrap();
    for stage in ["stage1", "stage2"] {
        let want: Vec<f64> = serde_json::from_value(golden[stage].clone()).unwrap();
        let got: Vec<f64> = serde_json::from_value(now[stage].clone()).unwrap();
        assert_eq!(got.len(), want.len(), "{stage}: number of steps");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(g.is_finite(), "{stage} step {}: loss {g}", i + 1);
            let rel = (g - w).abs() / w.abs().max(1e-12);
            println!(
                "{stage} step {:>2}: {g:.6} (golden {w:.6}, rel {rel:.1e})",
                i + 1
            );
            assert!(
                rel <= REL_TOL,
                "{stage} step {}: loss {g} vs golden {w} (relative {rel:.2e} > {REL_TOL:e}); if the \
                 change is meant to move the curve, rerun with BLIPD_UPDATE_GOLDEN=1 and say why",
                i + 1
            );
        }
    }
}
