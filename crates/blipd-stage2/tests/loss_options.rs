//! `[stage] min_snr_gamma` and `noise_offset` (off by default) through whole tiny stage-2 runs: a γ so
//! large that every weight is 1 gives the default loss, a small γ and a noise offset change it, and
//! bad values stop the run before the first step with the key named.

use blipd_stage2::run::{run_stage2, Stage2RunConfig};
use blipd_train::parse_config;

type B = burn::backend::Autodiff<burn::backend::Flex>;

fn config(dir: &std::path::Path, extra: &str) -> Stage2RunConfig {
    let text = format!(
        "[run]\ndir = {:?}\nseed = 7\n[train]\nmax_steps = 2\nbatch_size = 2\nprogress = false\n\
         [optimizer]\nlr = 0.002\nweight_decay = 0.0\n[checkpoint]\nevery = 0\n[sample]\nat_end = false\n\
         [stage]\npreset = \"tiny\"\nexport = false\n{extra}\n\
         [data]\ntarget_size = 32\nshuffle = false\n[data.synthetic]\npairs = 2\nseed = 1\n",
        dir.display().to_string()
    );
    parse_config(&text, &[]).unwrap()
}

fn losses(tmp: &std::path::Path, name: &str, extra: &str) -> Vec<f64> {
    let _serial = blipd_testkit::serial();
    let cfg = config(&tmp.join(name), extra);
    run_stage2::<B>(&cfg, Default::default()).unwrap();
    let out: Vec<f64> = blipd_train::metrics::read_metrics(&cfg.run.dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| r.loss)
        .collect();
    assert!(out.iter().all(|l| l.is_finite()), "{name}: {out:?}");
    println!("{name}: losses {out:?}");
    out
}

#[test]
fn min_snr_and_noise_offset_change_the_loss_only_when_set() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = losses(tmp.path(), "plain", "");
    // Every SNR of the schedule is below 1e30: all weights 1, the per-sample means averaged.
    let huge = losses(tmp.path(), "huge-gamma", "min_snr_gamma = 1e30");
    assert_eq!(huge.len(), plain.len());
    for (a, b) in plain.iter().zip(&huge) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{a} vs {b}");
    }
    let snr = losses(tmp.path(), "gamma-1", "min_snr_gamma = 1.0");
    assert!(
        (snr[0] - plain[0]).abs() > 1e-4 * plain[0],
        "γ = 1 weighs the low-noise timesteps down: {} vs {}",
        snr[0],
        plain[0]
    );
    let offset = losses(tmp.path(), "offset", "noise_offset = 0.5");
    assert!(
        (offset[0] - plain[0]).abs() > 1e-4 * plain[0],
        "{} vs {}",
        offset[0],
        plain[0]
    );
}

#[test]
fn bad_values_are_refused_before_the_first_step() {
    // Building the stage draws from burn-flex's process-global generator, as the other test does.
    let _serial = blipd_testkit::serial();
    let tmp = tempfile::tempdir().unwrap();
    for (extra, key) in [
        ("min_snr_gamma = 0.0", "min_snr_gamma"),
        ("noise_offset = -0.1", "noise_offset"),
    ] {
        let cfg = config(&tmp.path().join(key), extra);
        let err = run_stage2::<B>(&cfg, Default::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{err}");
        assert!(!cfg.run.dir.join("metrics.jsonl").exists());
    }
}
