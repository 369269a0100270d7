//! `blipd launch` end to end: the embedded two-stage plan as 2 rank processes — stage 1 (ITC/ITM over
//! the global batch), rank 0's export handed to stage 2 on every rank, stage 2 with gradients over the
//! default CPU transport (the TCP star) — one summary on stdout, nothing from burn-collective there, and checkpoints that
//! record the world size.

use std::process::Command;

fn free_port() -> u16 {
    blipd_dist::unused_port().unwrap()
}

#[test]
fn two_processes_run_the_two_stage_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let t0 = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_blipd"))
        .env("BLIPD_LOG", "warn")
        .env("BLIPD_COLLECTIVE_TIMEOUT_S", "120")
        .args(["launch", "--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .args(["--", "pretrain", "--set"])
        .arg(format!("dir={}", dir.display()))
        .args([
            "--set",
            "stage1.train.max_steps=6",
            "--set",
            "stage1.train.batch_size=4",
            "--set",
            "stage1.checkpoint.every=0",
            "--set",
            "stage2.train.max_steps=3",
            "--set",
            "stage2.train.batch_size=2",
            "--set",
            "stage2.sample.every=0",
            "--set",
            "stage2.sample.at_end=false",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    println!("{:.1}s\n{stdout}\n{stderr}", t0.elapsed().as_secs_f64());
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "one summary per stage and the export line, from rank 0: {stdout}"
    );
    assert!(lines[0].starts_with("stage 1: step 6") && lines[1].starts_with("stage 2: step 3"));
    assert!(
        lines[2].starts_with("stage 2: pipeline exported"),
        "{stdout}"
    );
    assert!(dir.join("stage2/export/model_index.json").is_file());
    assert!(
        !stdout.contains("Connecting"),
        "burn-collective chatter on stdout"
    );
    assert!(dir
        .join("stage1/export/qformer/model.safetensors")
        .is_file());
    let state = std::fs::read_to_string(
        blipd_train::checkpoint::checkpoint_dir(&dir.join("stage2"), 3).join("trainer.json"),
    )
    .unwrap();
    assert!(state.contains("\"world_size\": 2"), "{state}");
}
