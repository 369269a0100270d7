//! Exact resume on CPU: a run interrupted anywhere — an error in a step, SIGKILL in the middle
//! of a step, SIGKILL in the middle of a checkpoint write, a corrupted newest checkpoint — and
//! resumed from its newest valid checkpoint logs the same loss sequence, bit for bit, and ends
//! with the same weights, optimizer state and EMA weights as an uninterrupted run.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blipd_train::checkpoint::{checkpoint_dir, list_checkpoints};
use common::*;

const CHILD_ENV: &str = "BLIPD_TRAIN_TEST_CHILD";

fn reference(dir: &Path) -> Cfg {
    let cfg = config(dir, &[]);
    let summary = run(&cfg, Hook::None).unwrap();
    assert_eq!(summary.final_step, 24);
    assert_eq!(summary.resumed_from, None);
    cfg
}

fn assert_same_final_state(a: &Path, b: &Path) {
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "ema.safetensors",
        "rank-0.json",
    ] {
        assert!(final_file(a, 24, f) == final_file(b, 24, f), "{f} differs");
    }
}

#[test]
fn uninterrupted_runs_are_reproducible_and_learn() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    reference(&a);
    reference(&b);
    assert_same_run(&a, &b);
    assert_same_final_state(&a, &b);
    let recs = records(&a);
    let first: f64 = recs[..4].iter().map(|r| r.loss).sum::<f64>() / 4.0;
    let last: f64 = recs[20..].iter().map(|r| r.loss).sum::<f64>() / 4.0;
    assert!(last < 0.7 * first, "loss should fall: {first} -> {last}");
    // Checkpoint retention (every 5, last 2, and at the end) and samples (every 10).
    let steps: Vec<u64> = list_checkpoints(&a)
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, vec![20, 24]);
    assert!(a.join("samples/step-000000010/pred.txt").exists());
    assert!(a.join("samples/step-000000020/pred.txt").exists());
    assert!(a.join("loss.png").exists());
    assert!(a.join("config.toml").exists());
    // The data order wrapped into a second epoch (2·8 samples per step over 96).
    assert_eq!(recs.last().unwrap().epoch, Some(3));
    assert!(
        recs.iter().any(|r| r.grad_norm.unwrap() > 0.5),
        "clipping is exercised"
    );
    // A different seed gives a different run (the comparison can fail).
    let c = t.path().join("c");
    let cfg = config(&c, &["run.seed=8"]);
    run(&cfg, Hook::None).unwrap();
    assert_ne!(records(&a)[0].loss, records(&c)[0].loss);
}

#[test]
fn resume_after_error_is_bit_identical() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    reference(&a);
    let cfg = config(&b, &[]);
    // Call 27 is the second micro-step of step 14: checkpoints 5 and 10 exist.
    let err = run(&cfg, Hook::FailAtCall(27)).unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(records(&b).len(), 13);
    let summary = run(&cfg, Hook::None).unwrap();
    assert_eq!(summary.resumed_from, Some(10));
    assert_eq!(summary.steps_run, 14);
    assert_same_run(&a, &b);
    assert_same_final_state(&a, &b);
}

#[test]
fn resume_from_corrupt_newest_checkpoint_falls_back() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    reference(&a);
    let cfg = config(&b, &[]);
    run(&cfg, Hook::FailAtCall(35)).unwrap_err(); // during step 18: checkpoints 10, 15
    let newest = checkpoint_dir(&b, 15).join("optimizer.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let i = bytes.len() - 3;
    bytes[i] ^= 0x40;
    std::fs::write(&newest, bytes).unwrap();
    let summary = run(&cfg, Hook::None).unwrap();
    assert_eq!(summary.resumed_from, Some(10));
    assert!(
        checkpoint_dir(&b, 15).with_extension("invalid").exists(),
        "corrupt one set aside"
    );
    assert_same_run(&a, &b);
    assert_same_final_state(&a, &b);
}

/// Not a test by itself: the body of the child process that the SIGKILL tests start.
#[test]
#[ignore = "the worker of a multi-process test, started by it (not a test by itself)"]
fn child_process_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (dir, hook) = spec.split_once('|').unwrap();
    let hook = match hook.split_once(':').unwrap() {
        ("step", c) => Hook::HangAtCall(c.parse().unwrap()),
        ("ckpt", s) => Hook::HangInCheckpoint(s.parse().unwrap()),
        other => panic!("bad hook {other:?}"),
    };
    let cfg = config(Path::new(dir), &[]);
    run(&cfg, hook).unwrap();
    panic!("the child should have been killed while hanging");
}

/// Starts this test binary as a child that trains with `hook`, waits until it hangs at the
/// hook, and kills it with SIGKILL.
fn run_child_and_kill(dir: &Path, hook: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "child_process_entry",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, format!("{}|{hook}", dir.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let marker = dir.join("PAUSED");
    let t0 = Instant::now();
    while !marker.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child exited before reaching the hook: {status}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "child never reached the hook"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    assert!(!status.success());
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL");
    }
    std::fs::remove_file(marker).unwrap();
}

#[test]
fn sigkill_mid_step_then_resume_is_bit_identical() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    reference(&a);
    // Hang in the first micro-step of step 9 (call 17): the last checkpoint is step 5.
    run_child_and_kill(&b, "step:17");
    assert_eq!(records(&b).len(), 8, "8 steps were logged before the kill");
    let steps: Vec<u64> = list_checkpoints(&b)
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, vec![5]);
    let cfg = config(&b, &[]);
    let summary = run(&cfg, Hook::None).unwrap();
    assert_eq!(summary.resumed_from, Some(5));
    assert_same_run(&a, &b);
    assert_same_final_state(&a, &b);
}

#[test]
fn sigkill_mid_checkpoint_write_then_resume_is_bit_identical() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    reference(&a);
    // Hang while writing the checkpoint of step 15 (weights and optimizer already written).
    run_child_and_kill(&b, "ckpt:15");
    let tmp = checkpoint_dir(&b, 15).with_extension("tmp");
    assert!(tmp.join("model.safetensors").exists(), "killed mid-write");
    assert!(!tmp.join("manifest.json").exists());
    let steps: Vec<u64> = list_checkpoints(&b)
        .unwrap()
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(steps, vec![5, 10]);
    assert_eq!(
        records(&b).len(),
        15,
        "step 15 was logged before its checkpoint"
    );
    let cfg = config(&b, &[]);
    let summary = run(&cfg, Hook::None).unwrap();
    assert_eq!(summary.resumed_from, Some(10));
    assert!(!tmp.exists(), "partial checkpoint removed");
    assert_same_run(&a, &b);
    assert_same_final_state(&a, &b);
}
