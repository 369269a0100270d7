//! Run folders that cannot be lost (issue 11): `blipd resume` of the README's relative run dir, from
//! another working directory, after `mv` and from a copy; one writer per run dir (a second process is
//! refused naming the holder, a `kill -9`'ed holder's lock is taken over); no silent restart when every
//! checkpoint is invalid; the whole plan validated before stage 1 starts.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use blipd_testkit::copy_dir;
use common::text;

fn blipd(cwd: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_blipd"));
    c.env("BLIPD_LOG", "warn").current_dir(cwd);
    c
}

/// Short schedules for the embedded plan (`configs/tiny.toml`).
fn short(stage2_steps: usize) -> Vec<String> {
    [
        "stage1.train.max_steps=2".to_string(),
        format!("stage2.train.max_steps={stage2_steps}"),
        "stage2.checkpoint.every=1".into(),
        "stage2.sample.every=0".into(),
        "stage2.sample.at_end=false".into(),
        "stage2.data.synthetic.pairs=8".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

fn ok(o: &Output) -> String {
    let t = text(o);
    assert!(o.status.success(), "{t}");
    t
}

fn resume(cwd: &Path, run: &str, stage2_steps: usize) -> String {
    ok(&blipd(cwd)
        .args(["resume", run, "--set"])
        .arg(format!("stage2.train.max_steps={stage2_steps}"))
        .output()
        .unwrap())
}

/// Every file under `dir` with its contents (the tree of a run folder, to show it is untouched).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn the_readme_run_dir_resumes_in_place_from_anywhere_moved_or_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();

    // The README: `blipd pretrain` (writes runs/tiny), then `blipd resume runs/tiny`.
    let t = ok(&blipd(&a).arg("pretrain").args(short(2)).output().unwrap());
    assert!(t.contains("stage 2: step 2"), "{t}");
    let plan = std::fs::read_to_string(a.join("runs/tiny/plan.toml")).unwrap();
    assert!(
        plan.contains("dir = \".\""),
        "plan.toml is self-relative:\n{plan}"
    );
    assert!(!plan.contains("runs/tiny"), "{plan}");

    // 1. the relative path, from the directory it was started in
    let t = resume(&a, "runs/tiny", 3);
    assert!(
        t.contains("stage 2: step 3 (1 step run, resumed from step 2)"),
        "{t}"
    );
    assert!(!a.join("runs/tiny/runs").exists(), "nested run folder: {t}");
    let metrics = std::fs::read_to_string(a.join("runs/tiny/stage2/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);

    // 2. from another working directory
    let t = resume(&b, "../a/runs/tiny", 4);
    assert!(t.contains("resumed from step 3"), "{t}");
    assert!(
        !b.join("runs").exists() && !b.join("stage2").exists(),
        "{t}"
    );

    // 3. after `mv`
    let moved = tmp.path().join("moved");
    std::fs::rename(a.join("runs/tiny"), &moved).unwrap();
    let t = resume(tmp.path(), "moved", 5);
    assert!(t.contains("resumed from step 4"), "{t}");
    assert!(
        !a.join("runs/tiny").exists(),
        "wrote into the old place: {t}"
    );

    // 4. a copy continues in the copy; the original is not touched
    let copy = tmp.path().join("copy");
    copy_dir(&moved, &copy);
    let before = tree(&moved);
    let t = resume(tmp.path(), "copy", 6);
    assert!(t.contains("resumed from step 5"), "{t}");
    assert_eq!(
        std::fs::read_to_string(copy.join("stage2/metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        6
    );
    let after = tree(&moved);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the original's files changed"
    );
    assert!(before == after, "the original's contents changed");
    // The export of the copy is in the copy.
    assert!(copy.join("stage2/export/model_index.json").is_file());
}

fn newest_checkpoint_step(stage_dir: &Path) -> Option<u64> {
    std::fs::read_dir(stage_dir.join("checkpoints"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_prefix("step-")?.parse::<u64>().ok()
        })
        .max()
}

#[test]
fn one_writer_per_run_dir_and_a_killed_holder_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // A long stage 2 that is killed part-way.
    let mut child = blipd(tmp.path())
        .args(["pretrain", "--run-dir", "run"])
        .args(short(10_000))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while newest_checkpoint_step(&run.join("stage2")).is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "no stage-2 checkpoint"
        );
        assert!(child.try_wait().unwrap().is_none(), "pretrain ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A second writer is refused, naming the holder.
    let o = blipd(tmp.path()).args(["resume", "run"]).output().unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains(&format!("pid {}", child.id())), "{t}");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the holder was disturbed"
    );

    // kill -9: its lock is stale, and resume continues from the newest checkpoint.
    child.kill().unwrap();
    child.wait().unwrap();
    let step = newest_checkpoint_step(&run.join("stage2")).unwrap();
    let t = resume(tmp.path(), "run", step as usize + 1);
    assert!(t.contains(&format!("resumed from step {step}")), "{t}");
}

#[test]
fn no_silent_restart_when_every_checkpoint_is_invalid() {
    let tmp = tempfile::tempdir().unwrap();
    ok(&blipd(tmp.path())
        .args(["pretrain", "--run-dir", "run"])
        .args(short(2))
        .output()
        .unwrap());
    let ckpts = tmp.path().join("run/stage2/checkpoints");
    let mut n = 0;
    for e in std::fs::read_dir(&ckpts).unwrap().flatten() {
        let m = e.path().join("manifest.json");
        assert!(m.is_file(), "{}", m.display());
        std::fs::write(&m, "{ not json").unwrap();
        n += 1;
    }
    assert!(n >= 1);
    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        v.sort();
        v
    };
    let before = names(&ckpts);
    let o = blipd(tmp.path())
        .args(["resume", "run", "--set", "stage2.train.max_steps=3"])
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("no valid checkpoint"), "{t}");
    assert!(t.contains("manifest"), "says why: {t}");
    assert!(t.contains("--restart"), "{t}");
    assert_eq!(names(&ckpts), before, "nothing renamed");

    // --restart starts stage 2 over, setting the bad checkpoints aside.
    let t = ok(&blipd(tmp.path())
        .args([
            "resume",
            "run",
            "--restart",
            "--set",
            "stage2.train.max_steps=3",
        ])
        .output()
        .unwrap());
    assert!(t.contains("stage 2: step 3 (3 steps run)"), "{t}");
    assert!(std::fs::read_dir(&ckpts)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains(".invalid")));
}

#[test]
fn the_whole_plan_is_validated_before_stage_1() {
    let tmp = tempfile::tempdir().unwrap();
    for (set, says) in [
        ("stage2.stage.subject_drop_prob=2", "subject_drop_prob"),
        ("stage2.train.batch_size=0", "batch_size"),
        ("stage2.train.max_steps=0", "max_steps"),
        ("stage2.data.target_size=30", "target_size"),
    ] {
        let o = blipd(tmp.path())
            .args(["pretrain", "--run-dir", "run", "--set", set])
            .output()
            .unwrap();
        let t = text(&o);
        assert!(!o.status.success(), "{set}: {t}");
        assert!(t.contains(says), "{set}: {t}");
        assert!(!t.contains("stage 1:"), "{set}: trained first: {t}");
        assert!(
            !tmp.path().join("run/stage1").exists(),
            "{set}: stage 1 started"
        );
    }
    // max_steps = 0 on purpose (the "without multimodal pre-training" ablation): stage 1 exports its
    // initialisation and stage 2 trains from it.
    let t = ok(&blipd(tmp.path())
        .args(["pretrain", "--run-dir", "abl"])
        .args(short(1))
        .args([
            "--set",
            "stage1.train.max_steps=0",
            "--set",
            "stage1.train.export_untrained=true",
        ])
        .output()
        .unwrap());
    assert!(t.contains("stage 1: step 0"), "{t}");
    assert!(t.contains("stage 2: step 1"), "{t}");
}
