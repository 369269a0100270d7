//! Data parallelism with real processes on the tiny stage-2 model: this test binary re-runs itself as
//! the ranks (`RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT` on a free port, as torchrun sets them).
//!
//! - 2 ranks × batch B reach the parameters of 1 rank × batch 2B (`[data] per_sample_rng`: each
//!   sample's timestep / subject drop / noise come from its global position, not from its rank);
//! - a 2-rank run whose rank 1 hangs (SIGSTOP) makes rank 0 exit with a timeout error naming rank 1
//!   within the configured collective timeout; after killing it, the resumed 2-rank run's losses and
//!   weights are bit-identical to the uninterrupted run's;
//! - a rank killed with SIGKILL makes its peer exit promptly with an error naming it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blipd_stage2::run::{build, fit_stage2, Stage2RunConfig};
use blipd_train::parse_config;

type B = blipd_testkit::CpuTrain;

/// Set in the children: the path of the config the rank trains with.
const WORKER_ENV: &str = "BLIPD_DDP_TEST_CONFIG";
const STEPS: u64 = 4;
const TIMEOUT_S: u64 = 3;

fn config_text(dir: &Path, batch: usize, steps: u64) -> String {
    format!(
        r#"
[run]
dir = "{}"
seed = 11

[train]
max_steps = {steps}
batch_size = {batch}
progress = false

[optimizer]
lr = 0.001
weight_decay = 0.01
max_grad_norm = 1.0

[checkpoint]
every = 2
at_end = true
keep_last = 0

[stage]
preset = "tiny"
subject_drop_prob = 0.15

[data]
target_size = 32
shuffle = true
per_sample_rng = true

[data.synthetic]
pairs = 10
seed = 2
"#,
        dir.display()
    )
}

/// `run_stage2` with the Q-Former's dropout (p = 0.1, BERT's) turned off: dropout masks are drawn
/// per rank for the whole micro-batch tensor, so they cannot match between 1 × 2B and 2 × B; everything
/// else random in stage 2 is per sample (`per_sample_rng`).
fn train(cfg: &Stage2RunConfig) -> blipd_train::Result<blipd_train::RunSummary> {
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, cfg.run.seed);
    let (stage, mut model, data) = build::<B>(cfg, &device)?;
    model.qformer.set_dropout(0.0);
    fit_stage2(cfg, device, (stage, model, data))
}

/// Not a test by itself: the body of a rank process started by the tests below.
#[test]
#[ignore = "the worker of a multi-process test, started by it (not a test by itself)"]
fn rank_process_entry() {
    let Ok(path) = std::env::var(WORKER_ENV) else {
        return;
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg: Stage2RunConfig = parse_config(&text, &[]).unwrap();
    if let Err(e) = train(&cfg) {
        eprintln!("RANK FAILED: {e}");
        std::process::exit(3);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `world` rank processes training `config` (a file); stderr of rank r goes to
/// `<config>.rank<r>.log`.
fn spawn_ranks(config: &Path, world: usize) -> Vec<(Child, PathBuf)> {
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    (0..world)
        .map(|r| {
            let log = config.with_extension(format!("rank{r}.log"));
            let child = Command::new(&exe)
                .args([
                    "rank_process_entry",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(WORKER_ENV, config)
                .env("RANK", r.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("BLIPD_COLLECTIVE_TIMEOUT_S", TIMEOUT_S.to_string())
                .env("BLIPD_JOIN_TIMEOUT_S", "60")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            (child, log)
        })
        .collect()
}

fn write_config(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn wait_all(children: Vec<(Child, PathBuf)>) {
    for (r, (mut c, log)) in children.into_iter().enumerate() {
        let st = c.wait().unwrap();
        assert!(
            st.success(),
            "rank {r} failed ({st}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}

fn losses(dir: &Path) -> Vec<f64> {
    blipd_train::metrics::read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| r.loss)
        .collect()
}

fn final_weights(dir: &Path) -> blipd_models::weights::StateDict {
    let ckpt = blipd_train::checkpoint::checkpoint_dir(dir, STEPS);
    blipd_models::weights::StateDict::read(&ckpt.join("model.safetensors")).unwrap()
}

fn values(sd: &blipd_models::weights::StateDict, key: &str) -> Vec<f32> {
    sd.data(key)
        .unwrap()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {}", child.id());
}

/// Waits until rank 0 has logged `n` steps (or a rank died).
fn wait_for_steps(dir: &Path, n: usize, children: &mut [(Child, PathBuf)]) {
    let t0 = Instant::now();
    loop {
        let logged = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if logged >= n {
            return;
        }
        for (r, (c, log)) in children.iter_mut().enumerate() {
            if let Some(st) = c.try_wait().unwrap() {
                panic!(
                    "rank {r} exited ({st}) before step {n}:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(180), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` to exit by itself within `limit`; returns how long it took and its log.
fn wait_exit(child: &mut Child, log: &Path, limit: Duration) -> (Duration, String) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            assert!(!st.success(), "the surviving rank should fail:\n{text}");
            return (t0.elapsed(), text);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!(
                "the surviving rank still runs after {limit:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_ranks_match_one_rank_resume_is_exact_and_a_stopped_rank_times_out() {
    if std::env::var(WORKER_ENV).is_ok() {
        return;
    }
    let t_all = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, single) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("single"),
    );

    // (a) 2 ranks × 2 samples, uninterrupted, next to 1 rank × 4 samples in this process.
    let cfg_a = tmp.path().join("cfg/a.toml");
    write_config(&cfg_a, &config_text(&a, 2, STEPS));
    let ranks = spawn_ranks(&cfg_a, 2);
    let cfg_single: Stage2RunConfig = parse_config(&config_text(&single, 4, STEPS), &[]).unwrap();
    train(&cfg_single).unwrap();
    wait_all(ranks);
    println!("(a) done after {:.1}s", t_all.elapsed().as_secs_f64());

    let (la, ls) = (losses(&a), losses(&single));
    assert_eq!(la.len(), STEPS as usize);
    let loss_rel = blipd_testkit::max_rel_diff(&la, &ls, 0.0);
    let (wa, ws) = (final_weights(&a), final_weights(&single));
    let keys: Vec<String> = ws.keys().cloned().collect();
    assert_eq!(wa.len(), ws.len());
    let (mut max_abs, mut diff2, mut norm2, mut max_rel_tensor) = (0f64, 0f64, 0f64, 0f64);
    let mut worst = String::new();
    for k in &keys {
        let (x, y) = (values(&wa, k), values(&ws, k));
        let (mut d2, mut n2) = (0f64, 0f64);
        for (p, q) in x.iter().zip(&y) {
            let d = (*p as f64 - *q as f64).abs();
            max_abs = max_abs.max(d);
            d2 += d * d;
            n2 += (*q as f64) * (*q as f64);
        }
        diff2 += d2;
        norm2 += n2;
        let rel = (d2 / n2.max(1e-30)).sqrt();
        if rel > max_rel_tensor {
            max_rel_tensor = rel;
            worst = k.clone();
        }
    }
    let rel_all = (diff2 / norm2).sqrt();
    println!(
        "(a) 2×2 vs 1×4 after {STEPS} steps: losses {la:?} vs {ls:?} (max rel {loss_rel:.2e}); \
         weights over {} tensors: ‖Δ‖/‖θ‖ = {rel_all:.2e}, worst tensor {worst} {max_rel_tensor:.2e}, \
         max |Δ| = {max_abs:.2e}",
        keys.len()
    );
    assert!(loss_rel < 1e-5, "losses differ: {la:?} vs {ls:?}");
    assert!(
        rel_all <= 1e-6,
        "weights differ: ‖Δ‖/‖θ‖ = {rel_all:.3e} (worst {worst})"
    );
    // Element-wise: far below one AdamW step (lr = 1e-3); only near-zero gradients, where AdamW's
    // g/(|g|+ε) amplifies f32 summation-order differences, move at all.
    assert!(max_abs <= 1e-4, "max |Δ| = {max_abs:.3e}");

    // (b, c) The same 2-rank run; after step 3, rank 1 hangs (SIGSTOP): rank 0 must give up within
    // the collective timeout, naming rank 1.
    let cfg_b = tmp.path().join("cfg/b.toml");
    write_config(&cfg_b, &config_text(&b, 2, STEPS));
    let mut ranks = spawn_ranks(&cfg_b, 2);
    wait_for_steps(&b, 3, &mut ranks);
    signal(&ranks[1].0, "-STOP");
    let stopped = Instant::now();
    let (r0, rest) = ranks.split_at_mut(1);
    let (waited, log0) = wait_exit(&mut r0[0].0, &r0[0].1, Duration::from_secs(TIMEOUT_S + 30));
    let waited_since_stop = stopped.elapsed().min(waited + Duration::from_millis(50));
    signal(&rest[0].0, "-KILL");
    let _ = rest[0].0.wait();
    let err = log0
        .lines()
        .find(|l| l.contains("RANK FAILED"))
        .unwrap_or_else(|| panic!("no error line from rank 0:\n{log0}"));
    println!(
        "(c) rank 0 exited {:.2}s after rank 1 was stopped (timeout {TIMEOUT_S}s): {err}",
        waited_since_stop.as_secs_f64()
    );
    assert!(
        err.contains("rank 0 of 2") && err.contains("timed out") && err.contains("rank 1"),
        "{err}"
    );
    assert!(
        err.contains("all-reduce") || err.contains("barrier"),
        "names the operation: {err}"
    );
    assert!(waited_since_stop >= Duration::from_secs(TIMEOUT_S) - Duration::from_millis(100));

    // (b) Relaunch: resumes from the step-2 checkpoint and finishes bit-identically.
    let ranks = spawn_ranks(&cfg_b, 2);
    wait_all(ranks);
    let lb = losses(&b);
    println!("(b) resumed run losses {lb:?}");
    assert_eq!(lb, la, "resumed losses differ from the uninterrupted run's");
    let wb = final_weights(&b);
    for k in &keys {
        assert_eq!(values(&wb, k), values(&wa, k), "`{k}` differs after resume");
    }

    // (d) Elastic resume: the 2-rank checkpoint of step 4 continued by 1 process × 4 samples (the
    // same global batch) to step 6, next to the 1-process run continued to step 6. Every random
    // draw is keyed per sample, so both continue the same global stream from (nearly) the same
    // weights: their steps 5–6 must agree like the 2×2 and 1×4 runs did.
    let cfg_b6: Stage2RunConfig = parse_config(&config_text(&b, 4, STEPS + 2), &[]).unwrap();
    let sb = train(&cfg_b6).unwrap();
    assert_eq!(
        sb.resumed_from,
        Some(STEPS),
        "resumed the 2-rank checkpoint"
    );
    let cfg_s6: Stage2RunConfig = parse_config(&config_text(&single, 4, STEPS + 2), &[]).unwrap();
    train(&cfg_s6).unwrap();
    let (le, ls6) = (losses(&b), losses(&single));
    assert_eq!(le.len(), STEPS as usize + 2);
    let rel = blipd_testkit::max_rel_diff(&le[STEPS as usize..], &ls6[STEPS as usize..], 0.0);
    println!(
        "(d) 2 ranks → 1 process resume: steps 5–6 {:?} vs {:?} (max rel {rel:.2e})",
        &le[STEPS as usize..],
        &ls6[STEPS as usize..]
    );
    assert!(rel < 1e-5, "elastic resume diverged: {le:?} vs {ls6:?}");
    println!("total {:.1}s", t_all.elapsed().as_secs_f64());
}

#[test]
fn a_killed_rank_makes_its_peer_exit_naming_it() {
    if std::env::var(WORKER_ENV).is_ok() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("k");
    let cfg = tmp.path().join("cfg/k.toml");
    write_config(&cfg, &config_text(&dir, 2, 1000));
    let mut ranks = spawn_ranks(&cfg, 2);
    wait_for_steps(&dir, 1, &mut ranks);
    // Kill rank 0 (the rendezvous server): rank 1 loses its only link.
    signal(&ranks[0].0, "-KILL");
    let _ = ranks[0].0.wait();
    let (r1, log1) = &mut ranks[1];
    let (waited, log) = wait_exit(r1, log1, Duration::from_secs(TIMEOUT_S + 30));
    let err = log
        .lines()
        .find(|l| l.contains("RANK FAILED"))
        .unwrap_or_else(|| panic!("no error line from rank 1:\n{log}"));
    println!(
        "rank 1 exited {:.2}s after rank 0 was killed: {err}",
        waited.as_secs_f64()
    );
    assert!(
        err.contains("rank 1 of 2") && err.contains("rank 0"),
        "{err}"
    );
    assert!(
        waited <= Duration::from_secs(TIMEOUT_S + 5),
        "took {waited:?}"
    );
}
