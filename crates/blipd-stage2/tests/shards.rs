//! Stage 2 trains from Parquet shards (the `blipd data synth` format) and resumes exactly there too.

use blipd_data::synthetic::write_synthetic_shards;
use blipd_stage2::run::{run_stage2, Stage2RunConfig};
use blipd_train::parse_config;

type B = blipd_testkit::CpuTrain;

/// Runs seed NdArray's process-wide generator: tests in this binary must not interleave.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// 8 synthetic pairs in one shard (2 row groups) with its manifest.
fn write_shards(dir: &std::path::Path) {
    write_synthetic_shards(dir, 8, 5, 32, 4).unwrap();
}

fn config(run: &std::path::Path, shards: &std::path::Path, steps: u64) -> Stage2RunConfig {
    let text = format!(
        "[run]\ndir = {:?}\nseed = 1\n[train]\nmax_steps = {steps}\nbatch_size = 2\nprogress = false\n\
         [optimizer]\nlr = 0.001\n[checkpoint]\nevery = 2\n[stage]\npreset = \"tiny\"\n\
         [data]\ntarget_size = 32\nshards = {:?}\n",
        run.display().to_string(),
        shards.display().to_string()
    );
    parse_config(&text, &[]).unwrap()
}

fn losses(dir: &std::path::Path) -> Vec<u64> {
    blipd_train::metrics::read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|r| r.loss.to_bits())
        .collect()
}

#[test]
fn trains_from_shards_and_resumes_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    write_shards(&shards);

    let full = tmp.path().join("full");
    run_stage2::<B>(&config(&full, &shards, 6), Default::default()).unwrap();
    let reference = losses(&full);
    assert_eq!(reference.len(), 6);

    // Stop at step 4 (a checkpoint), then continue to 6: the same loss bits.
    let split = tmp.path().join("split");
    run_stage2::<B>(&config(&split, &shards, 4), Default::default()).unwrap();
    let summary = run_stage2::<B>(&config(&split, &shards, 6), Default::default()).unwrap();
    assert_eq!(summary.resumed_from, Some(4));
    assert_eq!(losses(&split), reference);
}

#[test]
fn missing_shards_are_a_clear_error() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let err = match run_stage2::<B>(
        &config(&tmp.path().join("run"), &tmp.path().join("nope"), 1),
        Default::default(),
    ) {
        Ok(_) => panic!("a run without shards must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("nope"), "{err}");
}

/// A rank's slice that cannot be opened is an error naming the rank — never the whole dataset on
/// every rank (it used to keep the unsliced loader silently).
#[test]
fn a_rank_slice_that_cannot_be_opened_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    write_shards(&shards);
    let cfg = config(&tmp.path().join("run"), &shards, 2);
    let source = blipd_stage2::run::ShardSource::open(&shards, &cfg, 32, None).unwrap();
    std::fs::remove_dir_all(&shards).unwrap();
    let err = match source.with_rank(1, 2) {
        Ok(_) => panic!("the slice opened without its shards"),
        Err(e) => e.to_string(),
    };
    println!("{err}");
    assert!(
        err.contains("rank 1 of 2") && err.contains("shards"),
        "{err}"
    );
}
