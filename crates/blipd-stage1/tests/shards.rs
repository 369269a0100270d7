//! Stage 1 trains from Parquet shards (the `blipd data synth` format: it reads each pair's target
//! image — the original photo — and caption), with BLIP-2's augmentation, and resumes exactly there.

use blipd_data::synthetic::write_synthetic_shards;
use blipd_stage1::run::{run_stage1, Stage1RunConfig};
use blipd_train::parse_config;

type B = blipd_testkit::CpuTrain;

/// Runs seed NdArray's process-wide generator: tests in this binary must not interleave.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// 8 synthetic pairs in one shard (2 row groups) with its manifest.
fn write_shards(dir: &std::path::Path) {
    write_synthetic_shards(dir, 8, 9, 32, 4).unwrap();
}

fn config(run: &std::path::Path, data: &str, steps: u64) -> Stage1RunConfig {
    let text = format!(
        "[run]\ndir = {:?}\nseed = 1\n[train]\nmax_steps = {steps}\nbatch_size = 2\nprogress = false\n\
         [optimizer]\nlr = 0.003\n[checkpoint]\nevery = 2\n[stage]\npreset = \"tiny\"\n\
         [data]\n{data}\n[data.augment]\n",
        run.display().to_string(),
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
    let data = format!("shards = {:?}", shards.display().to_string());

    let full = tmp.path().join("full");
    run_stage1::<B>(&config(&full, &data, 6), Default::default()).unwrap();
    let reference = losses(&full);
    assert_eq!(reference.len(), 6);
    assert!(reference.iter().all(|b| f64::from_bits(*b).is_finite()));
    assert!(full.join("export/qformer/model.safetensors").is_file());

    // Stop at step 4 (a checkpoint), then continue to 6: the same loss bits (the shard cursor and
    // the per-sample augmentation streams resume with it).
    let split = tmp.path().join("split");
    run_stage1::<B>(&config(&split, &data, 4), Default::default()).unwrap();
    let summary = run_stage1::<B>(&config(&split, &data, 6), Default::default()).unwrap();
    assert_eq!(summary.resumed_from, Some(4));
    assert_eq!(losses(&split), reference);
}

#[test]
fn two_sources_or_missing_shards_are_clear_errors() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let missing = format!(
        "shards = {:?}",
        tmp.path().join("nope").display().to_string()
    );
    let err = match run_stage1::<B>(&config(&run, &missing, 1), Default::default()) {
        Ok(_) => panic!("a run without shards must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("nope"), "{err}");
    let both = format!("{missing}\n[data.synthetic]\npairs = 4");
    let err = match run_stage1::<B>(&config(&run, &both, 1), Default::default()) {
        Ok(_) => panic!("two sources must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("exactly one source"), "{err}");
}
