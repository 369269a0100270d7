//! A synthesis run split across machines (`synth --shard I/N`) equals the single run, file for file and
//! byte for byte, once its parts are joined; rerunning a part that lost a shard redoes only that shard
//! and leaves the result unchanged; a part never touches another part's files. Procedural inputs (no
//! ../shared needed).

use blipd_data::shards::{merge_parts, Manifest, Part};
use blipd_data::synth::{synth, synth_part, PipelineConfig, SynthEvent};
use std::collections::BTreeMap;
use std::path::Path;

fn quiet(_: SynthEvent) {}

/// 7 subjects (one with no mask: a bad input), 3 backgrounds; 2 rows per shard → 4 shards.
fn sample(dir: &Path) -> PipelineConfig {
    let (images, masks, bgs) = (dir.join("images"), dir.join("masks"), dir.join("bgs"));
    for d in [&images, &masks, &bgs] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut csv = String::from("ImageID,LabelName,ClassName,XMin,XMax,YMin,YMax,Width,Height\n");
    for i in 0..7u32 {
        let id = format!("{:016x}", 0xa000 + i);
        let (w, h) = (96, 80);
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 2 + i * 30) as u8,
                (y * 3 + i * 11) as u8,
                ((x ^ y) * 5) as u8,
            ])
        })
        .save(images.join(format!("{id}.jpg")))
        .unwrap();
        if i != 4 {
            image::GrayImage::from_fn(w, h, |x, y| {
                let (dx, dy) = ((x as f64 - 48.0) / 30.0, (y as f64 - 40.0) / 24.0);
                image::Luma([if dx * dx + dy * dy < 1.0 { 255 } else { 0 }])
            })
            .save(masks.join(format!("{id}.png")))
            .unwrap();
        }
        csv.push_str(&format!(
            "{id},/m/0x{i},thing{i},0.15,0.85,0.15,0.85,{w},{h}\n"
        ));
    }
    std::fs::write(dir.join("subjects.csv"), csv).unwrap();
    for b in 0..3u32 {
        image::RgbImage::from_fn(120, 100, |x, y| {
            image::Rgb([(x * b) as u8, (y + 40 * b) as u8, 200 - (x / 2) as u8])
        })
        .save(bgs.join(format!("bg{b}.jpg")))
        .unwrap();
    }
    let mut cfg = PipelineConfig::default();
    cfg.synth.subjects_csv = Some(dir.join("subjects.csv"));
    cfg.synth.images_dir = Some(images);
    cfg.synth.masks_dir = Some(masks);
    cfg.synth.backgrounds_dir = Some(bgs);
    cfg.synth.max_side = 64;
    cfg.synth.rows_per_shard = 2;
    cfg.synth.rows_per_group = 1;
    cfg.synth.seed = 3;
    cfg.synth.threads = 1;
    cfg.trimap.erode_radius = 3.0;
    cfg.trimap.dilate_radius = 3.0;
    cfg
}

/// The dataset: shards and manifest.json (not the parts' manifests, locks or logs).
fn dataset(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n == "manifest.json" || n.ends_with(".parquet")
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

fn with_out(cfg: &PipelineConfig, out: &Path) -> PipelineConfig {
    let mut c = cfg.clone();
    c.synth.out_dir = Some(out.to_path_buf());
    c
}

#[test]
fn parts_joined_equal_the_single_run_and_a_rerun_part_redoes_only_what_it_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = sample(tmp.path());
    let single = tmp.path().join("single");
    let rep = synth(&with_out(&cfg, &single), &quiet).unwrap();
    assert_eq!(rep.shards_total, 4);
    assert_eq!(rep.bad.len(), 1, "{:?}", rep.bad);
    let want = dataset(&single);
    assert_eq!(want.len(), 5, "{:?}", want.keys());

    let split = tmp.path().join("split");
    let cfg_s = with_out(&cfg, &split);
    let part = |i| Part { index: i, count: 3 };
    // Parts in any order; the one that completes the set writes manifest.json.
    let r1 = synth_part(&cfg_s, Some(part(1)), &quiet).unwrap();
    assert_eq!((r1.shards_written, r1.merged), (1, false));
    assert!(!split.join("manifest.json").exists());
    let e = merge_parts(&split, 3).unwrap_err().to_string();
    assert!(e.contains("0/3") && e.contains("2/3"), "{e}");
    let r0 = synth_part(&cfg_s, Some(part(0)), &quiet).unwrap();
    assert_eq!(
        (r0.shards_written, r0.merged),
        (2, false),
        "part 0 owns shards 0 and 3"
    );
    let r2 = synth_part(&cfg_s, Some(part(2)), &quiet).unwrap();
    assert_eq!((r2.shards_written, r2.merged), (1, true));
    assert_eq!(
        dataset(&split),
        want,
        "the joined parts differ from the single run"
    );
    assert_eq!(Manifest::load(&split).unwrap().unwrap().bad(), rep.bad);

    // Part 2 loses its shard (a failed machine); another part's temp file is in flight meanwhile.
    let m2 = Manifest::load_file(&split.join(part(2).manifest_name()))
        .unwrap()
        .unwrap();
    std::fs::remove_file(split.join(&m2.shards[0].file)).unwrap();
    let foreign_tmp = split.join(format!(
        "{}.tmp",
        Manifest::load(&split).unwrap().unwrap().shards[0].file
    ));
    std::fs::write(&foreign_tmp, b"part 0 writing").unwrap();
    let again = synth_part(&cfg_s, Some(part(2)), &quiet).unwrap();
    assert_eq!((again.shards_written, again.shards_skipped), (1, 0));
    assert!(again.merged);
    assert!(foreign_tmp.exists(), "part 2 removed part 0's temp file");
    std::fs::remove_file(&foreign_tmp).unwrap();
    assert_eq!(dataset(&split), want, "the rerun part changed the result");
    // A part already complete does nothing.
    let idle = synth_part(&cfg_s, Some(part(1)), &quiet).unwrap();
    assert_eq!((idle.shards_written, idle.shards_skipped), (0, 1));
    assert_eq!(dataset(&split), want);

    // Parts of another configuration are refused at the join.
    let other = tmp.path().join("other");
    let mut cfg_o = with_out(&cfg, &other);
    synth_part(&cfg_o, Some(Part { index: 0, count: 2 }), &quiet).unwrap();
    cfg_o.synth.seed = 4;
    std::fs::rename(
        other.join(Part { index: 0, count: 2 }.manifest_name()),
        other.join("keep.json"),
    )
    .unwrap();
    synth_part(&cfg_o, Some(Part { index: 1, count: 2 }), &quiet).unwrap();
    std::fs::rename(
        other.join("keep.json"),
        other.join(Part { index: 0, count: 2 }.manifest_name()),
    )
    .unwrap();
    let e = merge_parts(&other, 2).unwrap_err().to_string();
    assert!(e.contains("fingerprint"), "{e}");
}

#[test]
fn part_specs_parse_from_flags_and_job_arrays() {
    assert_eq!(
        Part::parse("3/16").unwrap(),
        Part {
            index: 3,
            count: 16
        }
    );
    for bad in ["16/16", "1", "a/2", "0/0"] {
        assert!(
            Part::parse(bad).unwrap_err().to_string().contains("I/N"),
            "{bad}"
        );
    }
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let slurm = env(&[
        ("SLURM_ARRAY_TASK_ID", "12"),
        ("SLURM_ARRAY_TASK_MIN", "10"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
        ("RANK", "0"),
        ("WORLD_SIZE", "8"),
    ]);
    assert_eq!(
        Part::from_env(slurm).unwrap(),
        Some(Part { index: 2, count: 4 })
    );
    let torchrun = env(&[("RANK", "5"), ("WORLD_SIZE", "8")]);
    assert_eq!(
        Part::from_env(torchrun).unwrap(),
        Some(Part { index: 5, count: 8 })
    );
    assert_eq!(
        Part::from_env(env(&[("RANK", "0"), ("WORLD_SIZE", "1")])).unwrap(),
        None
    );
    assert_eq!(Part::from_env(env(&[])).unwrap(), None);
    assert!(Part::from_env(env(&[("RANK", "x"), ("WORLD_SIZE", "2")])).is_err());
}
