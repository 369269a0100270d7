//! The burn-collective gradient transport between real processes: this test binary re-runs itself
//! as the rank processes (burn-collective keeps one node per process, so threads cannot stand in
//! for ranks), each joining through torchrun's variables.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blipd_train::dist_sync::{DistConfig, DistSync};
use blipd_train::{GradEntry, GradSet, GradSync};
use burn::tensor::{Tensor, TensorData};

type Nd = blipd_testkit::Cpu;

const WORKER_ENV: &str = "BLIPD_TEST_COLLECTIVE_OUT";

fn entry(path: &str, values: Vec<f32>) -> GradEntry<Nd> {
    let n = values.len();
    GradEntry {
        path: path.into(),
        id: burn::module::ParamId::new(),
        shape: vec![n],
        grad: Tensor::from_data(TensorData::new(values, [n]), &Default::default()),
    }
}

/// Rank `r`'s gradients at step `step`: sizes chosen so buckets split, pieces are not a multiple of
/// the world size, and one parameter is unused on rank 1 at the last step.
fn grads(r: usize, step: usize) -> GradSet<Nd> {
    let f = (r + 1) as f32 * (step + 1) as f32;
    let mut e = vec![entry("a", (0..7).map(|i| i as f32 * f + 0.5).collect())];
    // The layout is fixed by the first sync; later, `b` goes unused on rank 1.
    if !(r == 1 && step == 2) {
        e.push(entry("b", vec![f; 3]));
    }
    e.push(entry("c", (0..101).map(|i| (i as f32).sin() * f).collect()));
    GradSet::from_entries(e)
}

fn expected(world: usize, step: usize) -> Vec<(String, Vec<f32>)> {
    let sets: Vec<GradSet<Nd>> = (0..world).map(|r| grads(r, step)).collect();
    let mut out = Vec::new();
    for p in ["a", "b", "c"] {
        let mut sum: Option<Vec<f64>> = None;
        for g in &sets {
            if let Some(e) = g.entries().iter().find(|e| e.path == p) {
                let v: Vec<f32> = e.grad.clone().into_data().to_vec().unwrap();
                let s = sum.get_or_insert_with(|| vec![0.0; v.len()]);
                for (s, x) in s.iter_mut().zip(v) {
                    *s += x as f64;
                }
            }
        }
        let s = sum.unwrap();
        out.push((
            p.to_string(),
            s.iter().map(|x| (x / world as f64) as f32).collect(),
        ));
    }
    out
}

/// Not a test by itself: the body of a rank process.
#[test]
#[ignore = "the worker of a multi-process test, started by it (not a test by itself)"]
fn rank_process_entry() {
    let Ok(out) = std::env::var(WORKER_ENV) else {
        return;
    };
    let world = blipd_dist::World::from_env().unwrap();
    let cfg = DistConfig::from_env().unwrap();
    let mut sync = match DistSync::establish(&world, cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("RANK FAILED: {e}");
            std::process::exit(3);
        }
    };
    let mut lines = Vec::new();
    for step in 0..3 {
        let mut g = grads(world.rank, step);
        if let Err(e) = GradSync::<Nd>::sync_grads(&mut sync, &mut g, true) {
            eprintln!("RANK FAILED: {e}");
            std::process::exit(3);
        }
        for e in g.entries() {
            let v: Vec<f32> = e.grad.clone().into_data().to_vec().unwrap();
            lines.push(format!("{step} {} {v:?}", e.path));
        }
    }
    std::fs::write(out, lines.join("\n")).unwrap();
    std::process::exit(0);
}

fn free_port() -> u16 {
    blipd_train::collective::free_port().unwrap()
}

fn spawn(dir: &Path, world: usize, mode: &str, timeout_s: f64) -> Vec<(Child, PathBuf, PathBuf)> {
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    (0..world)
        .map(|r| {
            let out = dir.join(format!("rank{r}.txt"));
            let log = dir.join(format!("rank{r}.log"));
            let child = Command::new(&exe)
                .args(["rank_process_entry", "--exact", "--ignored", "--nocapture"])
                .env(WORKER_ENV, &out)
                .env("BLIPD_FAILPOINT_HANG", mode)
                .env("RANK", r.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("BLIPD_GRAD_TRANSPORT", "burn-collective")
                .env("BLIPD_BUCKET_MB", format!("{}", 48.0 * 4.0 / 1048576.0))
                .env("BLIPD_COLLECTIVE_TIMEOUT_S", timeout_s.to_string())
                .env("BLIPD_JOIN_TIMEOUT_S", "60")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            (child, out, log)
        })
        .collect()
}

fn wait(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn three_processes_average_gradients_through_burn_collective() {
    if std::env::var(WORKER_ENV).is_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let world = 3;
    let t0 = Instant::now();
    let mut ranks = spawn(tmp.path(), world, "", 60.0);
    for (r, (child, _, log)) in ranks.iter_mut().enumerate() {
        let st = wait(child, Duration::from_secs(120));
        let text = std::fs::read_to_string(&*log).unwrap_or_default();
        assert!(
            matches!(st, Some(s) if s.success()),
            "rank {r} ended with {st:?}:\n{text}"
        );
    }
    println!(
        "{world} processes, 3 syncs each, in {:.2}s",
        t0.elapsed().as_secs_f64()
    );
    let mut want = Vec::new();
    for step in 0..3 {
        for (p, v) in expected(world, step) {
            want.push((step, p, v));
        }
    }
    let mut outputs = Vec::new();
    for (_, out, _) in &ranks {
        outputs.push(std::fs::read_to_string(out).unwrap());
    }
    assert_eq!(outputs[0], outputs[1], "ranks disagree");
    assert_eq!(outputs[0], outputs[2], "ranks disagree");
    let lines: Vec<&str> = outputs[0].lines().collect();
    assert_eq!(lines.len(), want.len());
    for ((step, p, v), line) in want.iter().zip(&lines) {
        let (head, vals) = line.split_once(' ').unwrap().1.split_once(' ').unwrap();
        assert_eq!(head, p, "step {step}: {line}");
        let got: Vec<f32> = vals
            .trim_matches(|c| c == '[' || c == ']')
            .split(", ")
            .map(|x| x.parse().unwrap())
            .collect();
        let err = blipd_testkit::max_rel_diff(&got, v, 1.0);
        assert!(err <= 1e-6, "step {step} `{p}`: {got:?} vs {v:?} ({err:e})");
    }
}

#[test]
fn a_silent_rank_is_named_after_the_collective_timeout() {
    if std::env::var(WORKER_ENV).is_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Not shorter: a healthy burn-collective call (websocket handshakes included) can take over
    // 2 s on 2 loaded cores, which this test would misread as the hang.
    let timeout = 5.0;
    let mut ranks = spawn(tmp.path(), 2, "1:1", timeout);
    let t0 = Instant::now();
    let st = wait(&mut ranks[0].0, Duration::from_secs(90));
    let waited = t0.elapsed().as_secs_f64();
    let _ = ranks[1].0.kill();
    let _ = ranks[1].0.wait();
    let log = std::fs::read_to_string(&ranks[0].2).unwrap();
    let err = log
        .lines()
        .find(|l| l.contains("RANK FAILED"))
        .unwrap_or_else(|| panic!("rank 0 ended with {st:?} and no error:\n{log}"));
    println!("rank 0 exited after {waited:.2}s (timeout {timeout}s): {err}");
    assert!(
        err.contains("burn-collective"),
        "failed inside the bucket all-reduce: {err}"
    );
    assert!(
        waited >= timeout && waited <= timeout * 1.5 + 5.0,
        "exited after {waited:.2}s"
    );
    assert!(err.contains("rank 0 of 2"), "{err}");
    assert!(err.contains("gradient all-reduce"), "names the op: {err}");
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains("rank 1"), "names the silent peer: {err}");
}
