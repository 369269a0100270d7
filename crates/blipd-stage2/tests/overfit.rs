//! Stage 2 on the tiny model: the diffusion loss falls on a small fixed set of pairs, the ablation
//! switches take effect, and checkpoints export in the diffusers layout.

use blipd_stage2::run::{run_stage2, Stage2RunConfig};
use blipd_train::parse_config;

type B = blipd_testkit::CpuTrain;

fn config(dir: &std::path::Path, steps: u64, extra: &[&str]) -> Stage2RunConfig {
    let text = format!(
        r#"
[run]
dir = "{}"
seed = 3

[train]
max_steps = {steps}
batch_size = 4
progress = false

[optimizer]
lr = 0.002
weight_decay = 0.0
max_grad_norm = 1.0

[checkpoint]
every = 0
at_end = true

[stage]
preset = "tiny"
subject_drop_prob = 0.0

[data]
target_size = 32
shuffle = false

[data.synthetic]
pairs = 4
seed = 1
"#,
        dir.display()
    );
    let sets: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    parse_config(&text, &sets).unwrap()
}

fn losses(dir: &std::path::Path) -> Vec<f64> {
    blipd_train::metrics::read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| r.loss)
        .collect()
}

#[test]
fn loss_decreases_on_a_tiny_overfit_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), 60, &[]);
    run_stage2::<B>(&cfg, Default::default()).unwrap();
    let l = losses(tmp.path());
    assert_eq!(l.len(), 60);
    let first: f64 = l[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = l[l.len() - 10..].iter().sum::<f64>() / 10.0;
    println!(
        "stage-2 tiny overfit: mean loss of steps 1-10 = {first:.4}, of steps 51-60 = {last:.4}"
    );
    assert!(
        last < 0.7 * first,
        "loss did not fall: {first} → {last} ({l:?})"
    );
}

#[test]
fn malformed_stage_key_is_rejected_by_name() {
    let text = "[run]\ndir = \"x\"\n[train]\nmax_steps = 1\nbatch_size = 1\n[optimizer]\nlr = 0.1\n[stage]\nsubject_dorp_prob = 0.1\n";
    let err = parse_config::<Stage2RunConfig>(text, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("subject_dorp_prob"), "{err}");
}
