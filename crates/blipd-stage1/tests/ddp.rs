//! Stage 1 data-parallel: real rank processes (this test binary re-runs itself) through
//! `run_stage1`, whose ITC compares each sample with the whole global batch (the all-gather of
//! features) and whose ITM draws each sample's hard negatives from the global batch with a stream
//! keyed by the sample — so 2 ranks × 2 samples must train like 1 process × 4. `ln_vision` is frozen
//! for the comparison (the ITM gradient through another rank's negative image tokens is not sent
//! back, see `Stage1::step_dist`); a second run with it trainable checks that path runs. BLIP-2's
//! random resized crop and flip are on: their per-sample streams are keyed by the global sample
//! position too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use blipd_models::weights::StateDict;
use blipd_stage1::run::{run_stage1, Stage1RunConfig};
use blipd_train::parse_config;

type B = blipd_testkit::CpuTrain;

const WORKER_ENV: &str = "BLIPD_TEST_STAGE1_DDP_CONFIG";
const STEPS: u64 = 4;

fn config_text(dir: &Path, batch: usize, train_ln_vision: bool) -> String {
    format!(
        r#"
[run]
dir = "{}"
seed = 5

[train]
max_steps = {STEPS}
batch_size = {batch}
progress = false

[optimizer]
lr = 0.003
weight_decay = 0.05
max_grad_norm = 1.0

[checkpoint]
every = 0
at_end = true

[stage]
preset = "tiny"
dropout = 0.0
train_ln_vision = {train_ln_vision}

[data]
shuffle = true
list = "{}"

[data.augment]
scale = [0.5, 1.0]
"#,
        dir.display(),
        dir.parent().unwrap().join("pairs.tsv").display()
    )
}

/// Twelve procedural pairs as a list file beside the run folders, with captions of one length
/// ("a star grass"): ITG averages over each rank's caption tokens, as LAVIS under DDP does, so two
/// ranks equal one process exactly only when every rank holds as many caption tokens.
fn write_pairs(root: &Path) {
    let imgs = root.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let mut tsv = String::new();
    for i in 0..12u64 {
        let p = blipd_data::synthetic::synth_pair(i, 2, 32);
        let name = format!("{i}.png");
        p.target.save(imgs.join(&name)).unwrap();
        let scene = p.caption.rsplit(' ').next().unwrap();
        tsv.push_str(&format!("imgs/{name}\ta {} {scene}\n", p.subject));
    }
    std::fs::write(root.join("pairs.tsv"), tsv).unwrap();
}

/// Not a test by itself: the body of a rank process.
#[test]
#[ignore = "the worker of a multi-process test, started by it (not a test by itself)"]
fn rank_process_entry() {
    let Ok(path) = std::env::var(WORKER_ENV) else {
        return;
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg: Stage1RunConfig = parse_config(&text, &[]).unwrap();
    if let Err(e) = run_stage1::<B>(&cfg, Default::default()) {
        eprintln!("RANK FAILED: {e}");
        std::process::exit(3);
    }
}

fn free_port() -> u16 {
    blipd_train::collective::free_port().unwrap()
}

fn spawn_ranks(config: &Path, world: usize) -> Vec<(Child, PathBuf)> {
    let port = free_port();
    let exe = std::env::current_exe().unwrap();
    (0..world)
        .map(|r| {
            let log = config.with_extension(format!("rank{r}.log"));
            let child = Command::new(&exe)
                .args(["rank_process_entry", "--exact", "--ignored", "--nocapture"])
                .env(WORKER_ENV, config)
                .env("RANK", r.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("BLIPD_COLLECTIVE_TIMEOUT_S", "60")
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

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn metric(dir: &Path, name: &str) -> Vec<f64> {
    blipd_train::metrics::read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| {
            if name == "loss" {
                r.loss
            } else {
                r.extra[name]
            }
        })
        .collect()
}

/// The trained model (Q-Former, heads, temperature) of the final checkpoint.
fn weights(dir: &Path) -> StateDict {
    let ckpt = blipd_train::checkpoint::checkpoint_dir(dir, STEPS);
    StateDict::read(&ckpt.join("model.safetensors")).unwrap()
}

fn values(sd: &StateDict, key: &str) -> Vec<f32> {
    sd.data(key).unwrap().convert::<f32>().to_vec().unwrap()
}

#[test]
fn two_ranks_train_like_one_process_with_the_global_batch() {
    if std::env::var(WORKER_ENV).is_ok() {
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    write_pairs(tmp.path());
    let (two, one, itm) = (
        tmp.path().join("two"),
        tmp.path().join("one"),
        tmp.path().join("itm"),
    );
    let cfg_two = tmp.path().join("cfg/two.toml");
    write(&cfg_two, &config_text(&two, 2, false));
    let cfg_itm = tmp.path().join("cfg/itm.toml");
    write(&cfg_itm, &config_text(&itm, 2, true));
    let ranks = spawn_ranks(&cfg_two, 2);
    let single: Stage1RunConfig = parse_config(&config_text(&one, 4, false), &[]).unwrap();
    run_stage1::<B>(&single, Default::default()).unwrap();
    wait_all(ranks);
    let ranks = spawn_ranks(&cfg_itm, 2);
    wait_all(ranks);
    println!("runs done after {:.1}s", t0.elapsed().as_secs_f64());

    // Every metric is printed before any is asserted, so a failure shows which loss moved.
    let mut differ = Vec::new();
    for m in ["loss", "itc", "itm", "itg"] {
        let (a, b) = (metric(&two, m), metric(&one, m));
        assert_eq!(a.len(), STEPS as usize);
        let rel = blipd_testkit::max_rel_diff(&a, &b, 1e-12);
        println!("{m}: 2×2 {a:?} vs 1×4 {b:?} (max rel {rel:.2e})");
        if rel >= 1e-5 {
            differ.push(m);
        }
    }
    assert!(differ.is_empty(), "2×2 and 1×4 differ in {differ:?}");
    let (wa, wb) = (weights(&two), weights(&one));
    let (mut d2, mut n2, mut max_abs) = (0f64, 0f64, 0f64);
    let (mut worst, mut worst_rel) = (String::new(), 0f64);
    // Attention key biases have a zero true gradient (softmax is invariant to adding the same
    // q·b_k to every score of a query): theirs is f32 rounding noise, which AdamW's g/(√v + ε)
    // turns into ±lr steps in either run. They are compared separately, by step size.
    let noise_only = |k: &str| k.ends_with("attention.key.bias");
    let mut key_bias_max = 0f64;
    for k in wb.keys() {
        if noise_only(k) {
            for (p, q) in values(&wa, k).iter().zip(values(&wb, k)) {
                key_bias_max = key_bias_max.max((*p as f64 - q as f64).abs());
            }
            continue;
        }
        let (mut t2, mut tn) = (0f64, 0f64);
        for (p, q) in values(&wa, k).iter().zip(values(&wb, k)) {
            let d = (*p as f64 - q as f64).abs();
            max_abs = max_abs.max(d);
            t2 += d * d;
            tn += (q as f64) * (q as f64);
        }
        d2 += t2;
        n2 += tn;
        let r = (t2 / tn.max(1e-30)).sqrt();
        if r > worst_rel {
            (worst, worst_rel) = (k.clone(), r);
        }
    }
    let rel = (d2 / n2).sqrt();
    println!(
        "trained weights after {STEPS} steps: ‖Δ‖/‖θ‖ = {rel:.2e}, max |Δ| = {max_abs:.2e} over {} \
         tensors, worst {worst} {worst_rel:.2e}",
        wb.len()
    );
    println!("attention key biases (noise-driven): max |Δ| = {key_bias_max:.2e} (lr 3e-3, {STEPS} steps)");
    assert!(rel <= 1e-6, "weights differ: {rel:.3e} (worst {worst})");
    assert!(key_bias_max <= 0.003 * STEPS as f64 * 2.0, "{key_bias_max}");

    // A trainable ln_vision across ranks: trains and exports.
    let l = metric(&itm, "itm");
    assert_eq!(l.len(), STEPS as usize);
    assert!(l.iter().all(|v| v.is_finite() && *v > 0.0), "itm {l:?}");
    assert!(itm.join("export/qformer/model.safetensors").is_file());
    println!(
        "trainable ln_vision, 2 ranks: itm {l:?}; total {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
