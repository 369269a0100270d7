//! Benchmark driver used by `scripts/bench/matting.sh`: for every `<name>.png` + `<name>_trimap.png` in a
//! folder, runs closed-form matting and foreground estimation, writes `<name>_alpha_rs.png` (16-bit) and
//! `<name>_fg_rs.png`, and prints per-image thread CPU times (α: best of `--repeat`; foreground: best of
//! `--fg-repeat`, default 10) and an all-core throughput run.
//!
//! Usage: `matting_bench DIR [--repeat N] [--fg-repeat N] [--tolerance T] [--coarse-tolerance T]
//! [--suffix S]` (outputs `<name>_alpha_rs<S>.png` and `<name>_fg_rs<S>.png`; `RS_TOLERANCE` names the
//! stopping tolerance).

use blipd_data::{estimate_alpha_cf, estimate_foreground_ml, CfOptions, FgOptions, Gray, Rgb};
use rayon::prelude::*;
use std::time::Instant;

/// CPU seconds of the calling thread (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`, nanosecond resolution), the
/// counterpart of Python's `time.process_time()` for a single-threaded run. (`/proc/thread-self/schedstat`,
/// used before, advances in scheduler ticks of 4 ms on kernels without schedstats.)
fn cpu_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID needs no other argument.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(args.get(1).expect(
        "usage: matting_bench DIR [--repeat N] [--fg-repeat N] [--tolerance T] [--suffix S]",
    ));
    let mut repeat = 3usize;
    let mut fg_repeat = 10usize;
    let mut suffix = String::new();
    let mut opts = CfOptions::default();
    let mut i = 2;
    while i < args.len() {
        match args[i].as_str() {
            "--repeat" => repeat = args[i + 1].parse().expect("--repeat N"),
            "--fg-repeat" => fg_repeat = args[i + 1].parse().expect("--fg-repeat N"),
            "--tolerance" => opts.tolerance = args[i + 1].parse().expect("--tolerance T"),
            "--suffix" => suffix = args[i + 1].clone(),
            "--min-coarse-unknowns" => {
                opts.min_coarse_unknowns = args[i + 1].parse().expect("--min-coarse-unknowns N")
            }
            "--coarse-tolerance" => {
                opts.coarse_tolerance = args[i + 1].parse().expect("--coarse-tolerance T")
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("read dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix("_trimap.png").map(str::to_string))
        .collect();
    names.sort();
    let inputs: Vec<(String, Rgb, Gray)> = names
        .iter()
        .map(|n| {
            let img = image::open(dir.join(format!("{n}.png")))
                .expect("image")
                .to_rgb8();
            let tri = image::open(dir.join(format!("{n}_trimap.png")))
                .expect("trimap")
                .to_luma8();
            (n.clone(), Rgb::from_rgb8(&img), Gray::from_luma8(&tri))
        })
        .collect();
    println!("RS_TOLERANCE {:e}", opts.tolerance);
    // The instruction-set level the α solver runs at (`BLIPD_SIMD` caps it; see `cpu::short_run_level`).
    println!(
        "RS_SIMD {} (detected {})",
        blipd_data::cpu::short_run_level().name(),
        blipd_data::cpu::detected().name()
    );
    let fg_opts = FgOptions::default();
    let pool1 = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    pool1.install(|| {
        // One untimed pass over every image first: the timed calls then find the thread's buffer pool (which
        // keeps the solver's and the foreground's buffers between calls) filled, as a worker matting many
        // images does. Without it the first images' best-of-3 still included fresh pages (foreground 7–12 ms
        // instead of 5.3 ms). pymatting's best-of-N likewise leaves out its JIT warm-up.
        for (_, img, tri) in &inputs {
            let (alpha, _) = estimate_alpha_cf(img, tri, &opts).expect("matting");
            estimate_foreground_ml(img, &alpha, &fg_opts).expect("foreground");
        }
        for (name, img, tri) in &inputs {
            let (mut best_cf, mut best_fg) = (f64::MAX, f64::MAX);
            let mut out = None;
            for _ in 0..repeat {
                let t0 = cpu_time();
                let (alpha, stats) = estimate_alpha_cf(img, tri, &opts).expect("matting");
                best_cf = best_cf.min(cpu_time() - t0);
                out = Some((alpha, stats));
            }
            let (alpha, stats) = out.expect("repeat >= 1");
            // The foreground takes milliseconds: its best of `fg_repeat` (as on pymatting's side) is steadier.
            let mut fg = None;
            for _ in 0..fg_repeat.max(1) {
                let t0 = cpu_time();
                let f = estimate_foreground_ml(img, &alpha, &fg_opts).expect("foreground");
                best_fg = best_fg.min(cpu_time() - t0);
                fg = Some(f);
            }
            let fg = fg.expect("fg_repeat >= 1");
            alpha.to_luma16().save(dir.join(format!("{name}_alpha_rs{suffix}.png"))).expect("save alpha");
            fg.to_rgb8().save(dir.join(format!("{name}_fg_rs{suffix}.png"))).expect("save fg");
            println!(
                "RS {name} cf_s {best_cf:.4} fg_s {best_fg:.4} unknown {} it {} coarse_it {} levels {} shift {:e} rel {:.2e} restarts {}",
                stats.unknown, stats.iterations, stats.coarse_iterations, stats.levels, stats.shift, stats.relative_residual, stats.restarts
            );
        }
    });
    let threads = rayon::current_num_threads();
    let t = Instant::now();
    inputs.par_iter().for_each(|(_, img, tri)| {
        let (alpha, _) = estimate_alpha_cf(img, tri, &opts).expect("matting");
        estimate_foreground_ml(img, &alpha, &fg_opts).expect("foreground");
    });
    println!(
        "RS_ALLCORE images {} threads {threads} wall_s {:.4}",
        inputs.len(),
        t.elapsed().as_secs_f64()
    );
}
