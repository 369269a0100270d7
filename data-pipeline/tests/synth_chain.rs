//! End-to-end synthesis chain on a tiny OpenImages-like sample built from DreamBench photos
//! (`../shared/dreambench`, CC-BY 4.0; skipped with a message when absent):
//!
//! crafted box CSV + class descriptions → `filter_openimages` → subjects CSV (+ injected bad rows) →
//! ellipse masks per box → `synth` → Parquet shards + manifest, then: a rerun skips everything and changes
//! nothing; a child process killed with SIGKILL mid-run followed by a rerun gives byte-identical files; a
//! corrupted shard is detected by its checksum and rebuilt; another configuration is refused.
//!
//! `BLIPD_KEEP_SAMPLE=<dir>` keeps the sample (images, masks, backgrounds, CSVs, config) for CLI demos.

use blipd_data::openimages::{filter_openimages, write_subjects_csv, FilterInputs, ImageDirSizes};
use blipd_data::shards::{Manifest, ShardReader};
use blipd_data::synth::{synth, PipelineConfig, SynthEvent};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "BLIPD_SYNTH_CHILD_CONFIG";

fn dreambench() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/dreambench");
    root.join("dog/00.jpg").is_file().then_some(root)
}

/// Soft ellipse inscribed in the box (2-pixel ramp), as an 8-bit mask.
fn ellipse_mask(w: u32, h: u32, b: [f64; 4]) -> image::GrayImage {
    let (cx, cy) = (
        (b[0] + b[1]) / 2.0 * w as f64,
        (b[2] + b[3]) / 2.0 * h as f64,
    );
    let (rx, ry) = (
        (b[1] - b[0]) / 2.0 * w as f64,
        (b[3] - b[2]) / 2.0 * h as f64,
    );
    image::GrayImage::from_fn(w, h, |x, y| {
        let dx = (x as f64 + 0.5 - cx) / rx;
        let dy = (y as f64 + 0.5 - cy) / ry;
        let d = ((dx * dx + dy * dy).sqrt() - 1.0) * rx.min(ry); // ≈ signed pixel distance
        image::Luma([((0.5 - d / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8])
    })
}

struct Sample {
    cfg: PipelineConfig,
    good: Vec<String>,
    expected_bad: BTreeMap<String, &'static str>,
}

/// Builds the sample under `dir` (see the module docs); `out` is the shard folder of the config.
fn build_sample(db: &Path, dir: &Path, out: &Path) -> Sample {
    let images = dir.join("images");
    let masks = dir.join("masks");
    let bgs = dir.join("backgrounds");
    for d in [&images, &masks, &bgs] {
        std::fs::create_dir_all(d).unwrap();
    }
    let subjects = [
        "backpack",
        "bear_plushie",
        "berry_bowl",
        "can",
        "candle",
        "cat",
        "clock",
        "dog",
        "teapot",
        "vase",
    ];
    let mut boxes = String::from(
        "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n",
    );
    let mut classes = String::new();
    let mut good = Vec::new();
    let b = [0.22, 0.78, 0.18, 0.82];
    for (i, name) in subjects.iter().enumerate() {
        let id = format!("{:016x}", 0xd00d_0000u64 + i as u64);
        let mid = format!("/m/0test{i}");
        classes.push_str(&format!("{mid},{}\n", name.replace('_', " ")));
        std::fs::copy(
            db.join(name).join("00.jpg"),
            images.join(format!("{id}.jpg")),
        )
        .unwrap();
        boxes.push_str(&format!(
            "{id},xclick,{mid},1,{},{},{},{},0,0,0,0,0\n",
            b[0], b[1], b[2], b[3]
        ));
        let (w, h) = image::image_dimensions(images.join(format!("{id}.jpg"))).unwrap();
        // Masks at 256 px on the long side: the chain resizes them to the image.
        let s = 256.0 / w.max(h) as f64;
        ellipse_mask((w as f64 * s) as u32, (h as f64 * s) as u32, b)
            .save(masks.join(format!("{id}.png")))
            .unwrap();
        good.push(id);
    }
    // A person box (dropped by the filter) in the first image.
    boxes.push_str(&format!(
        "{},xclick,/m/01g317,1,0.1,0.3,0.1,0.5,0,0,0,0,0\n",
        good[0]
    ));
    classes.push_str("/m/01g317,Person\n");
    let mut expected_bad = BTreeMap::new();
    // Truncated JPEG (header intact, so the filter keeps it; decoding fails).
    let trunc = format!("{:016x}", 0xbad0_0001u64);
    let bytes = std::fs::read(db.join("duck_toy/00.jpg")).unwrap();
    std::fs::write(
        images.join(format!("{trunc}.jpg")),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    boxes.push_str(&format!(
        "{trunc},xclick,/m/0test0,1,{},{},{},{},0,0,0,0,0\n",
        b[0], b[1], b[2], b[3]
    ));
    ellipse_mask(64, 64, b)
        .save(masks.join(format!("{trunc}.png")))
        .unwrap();
    expected_bad.insert(trunc, "image");
    // No mask file.
    let nomask = format!("{:016x}", 0xbad0_0002u64);
    std::fs::copy(
        db.join("rc_car/00.jpg"),
        images.join(format!("{nomask}.jpg")),
    )
    .unwrap();
    boxes.push_str(&format!(
        "{nomask},xclick,/m/0test1,1,{},{},{},{},0,0,0,0,0\n",
        b[0], b[1], b[2], b[3]
    ));
    expected_bad.insert(nomask, "mask");
    // Empty mask: the trimap has no foreground.
    let empty = format!("{:016x}", 0xbad0_0003u64);
    std::fs::copy(
        db.join("robot_toy/00.jpg"),
        images.join(format!("{empty}.jpg")),
    )
    .unwrap();
    boxes.push_str(&format!(
        "{empty},xclick,/m/0test2,1,{},{},{},{},0,0,0,0,0\n",
        b[0], b[1], b[2], b[3]
    ));
    image::GrayImage::new(64, 64)
        .save(masks.join(format!("{empty}.png")))
        .unwrap();
    expected_bad.insert(empty, "trimap");
    std::fs::write(dir.join("boxes.csv"), boxes).unwrap();
    std::fs::write(dir.join("classes.csv"), classes).unwrap();

    let cfg0 = PipelineConfig::default();
    let mut sizes = ImageDirSizes {
        dir: images.clone(),
        use_exif_orientation: false,
        limits: cfg0.read,
    };
    let report = filter_openimages(
        &FilterInputs {
            boxes_csv: &dir.join("boxes.csv"),
            class_descriptions_csv: &dir.join("classes.csv"),
            image_labels_csv: None,
        },
        &cfg0.filter,
        &mut sizes,
    )
    .unwrap();
    assert_eq!(report.kept.len(), 13, "{:?}", report.drops);
    assert_eq!(report.dropped(blipd_data::openimages::Rule::Human), 1);
    let subjects = dir.join("subjects.csv");
    write_subjects_csv(&subjects, &report.kept).unwrap();
    // Rows the filter would never write: a malformed row and a missing image, mid-list.
    let mut text = std::fs::read_to_string(&subjects).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines.insert(
        4,
        "0000000000000bad,/m/0test3,can,0.2,oops,0.2,0.8,512,512".into(),
    );
    lines.insert(
        8,
        "00000000deadbeef,/m/0test4,candle,0.2,0.8,0.2,0.8,512,512".into(),
    );
    text = lines.join("\n") + "\n";
    std::fs::write(&subjects, text).unwrap();
    expected_bad.insert("0000000000000bad".into(), "csv");
    expected_bad.insert("00000000deadbeef".into(), "image");
    // Backgrounds: other DreamBench photos.
    for name in [
        "dog2",
        "cat2",
        "wolf_plushie",
        "shiny_sneaker",
        "fancy_boot",
    ] {
        std::fs::copy(
            db.join(name).join("01.jpg"),
            bgs.join(format!("{name}.jpg")),
        )
        .unwrap();
    }
    let mut cfg = PipelineConfig::default();
    cfg.synth.subjects_csv = Some(subjects);
    cfg.synth.images_dir = Some(images);
    cfg.synth.masks_dir = Some(masks);
    cfg.synth.backgrounds_dir = Some(bgs);
    cfg.synth.out_dir = Some(out.to_path_buf());
    cfg.synth.max_side = 160;
    cfg.synth.rows_per_shard = 2;
    cfg.synth.rows_per_group = 1;
    cfg.synth.seed = 7;
    cfg.trimap.erode_radius = 4.0;
    cfg.trimap.dilate_radius = 4.0;
    Sample {
        cfg,
        good,
        expected_bad,
    }
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

fn quiet(_: SynthEvent) {}

/// Helper process of [`chain_end_to_end`]: runs `synth` on the config named by `BLIPD_SYNTH_CHILD_CONFIG`.
#[test]
#[ignore = "child process of chain_end_to_end (needs BLIPD_SYNTH_CHILD_CONFIG)"]
fn synth_child() {
    let path = std::env::var(CHILD_ENV).expect("BLIPD_SYNTH_CHILD_CONFIG");
    let cfg = PipelineConfig::from_file(Path::new(&path)).unwrap();
    synth(&cfg, &quiet).unwrap();
}

#[test]
fn chain_end_to_end() {
    let Some(db) = dreambench() else {
        eprintln!("SKIPPED chain_end_to_end: ../shared/dreambench is absent");
        return;
    };
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = match std::env::var_os("BLIPD_KEEP_SAMPLE") {
        Some(d) => PathBuf::from(d),
        None => tmp.path().join("sample"),
    };
    let out_a = dir.join("pairs_a");
    let sample = build_sample(&db, &dir, &out_a);
    let cfg = &sample.cfg;
    std::fs::write(dir.join("pipeline.toml"), toml::to_string(cfg).unwrap()).unwrap();

    // Uninterrupted run.
    let rows_seen = std::sync::atomic::AtomicU64::new(0);
    let count = |e: SynthEvent| {
        if let SynthEvent::Row { .. } = e {
            rows_seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let rep = synth(cfg, &count).unwrap();
    let total_rows = (sample.good.len() + sample.expected_bad.len()) as u64;
    assert_eq!(rows_seen.into_inner(), total_rows);
    assert_eq!(rep.shards_total, total_rows.div_ceil(2));
    assert_eq!(rep.shards_written, rep.shards_total);
    assert_eq!(rep.pairs_total, sample.good.len() as u64);
    let bad: BTreeMap<String, String> = rep
        .bad
        .iter()
        .map(|b| (b.image_id.clone(), b.stage.clone()))
        .collect();
    let expected: BTreeMap<String, String> = sample
        .expected_bad
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    assert_eq!(bad, expected, "bad inputs: {:#?}", rep.bad);
    println!(
        "chain: {} pairs, {} bad, {:.2} pairs/s at ≤160 px",
        rep.pairs_total,
        rep.bad.len(),
        rep.pairs_per_s()
    );

    // Shard contents.
    let m = Manifest::load(&out_a).unwrap().unwrap();
    assert!(m.is_complete());
    let mut ids = Vec::new();
    for e in &m.shards {
        let r = ShardReader::open(&out_a.join(&e.file)).unwrap();
        assert_eq!(r.row_group_sizes(), e.row_groups);
        for rec in r.read_all().unwrap() {
            assert!(rec.row >= e.first_row && rec.row < e.first_row + e.slice_rows);
            let input = image::load_from_memory(&rec.input_image).unwrap().to_rgb8();
            let target = image::load_from_memory(&rec.target_image)
                .unwrap()
                .to_rgb8();
            assert_eq!(input.dimensions(), (rec.width, rec.height));
            assert_eq!(target.dimensions(), (rec.width, rec.height));
            assert_eq!(rec.width.max(rec.height), 160);
            // Inside the ellipse the subject is kept, far outside the background is replaced.
            let (w, h) = (rec.width as f64, rec.height as f64);
            let diff = |x0: f64, x1: f64, y0: f64, y1: f64| {
                let (mut s, mut n) = (0.0, 0.0);
                for y in (y0 * h) as u32..(y1 * h) as u32 {
                    for x in (x0 * w) as u32..(x1 * w) as u32 {
                        for c in 0..3 {
                            s += (f64::from(input.get_pixel(x, y)[c])
                                - f64::from(target.get_pixel(x, y)[c]))
                            .abs();
                            n += 1.0;
                        }
                    }
                }
                s / n
            };
            let inside = diff(0.42, 0.58, 0.42, 0.58);
            let corner = diff(0.0, 0.12, 0.0, 0.12);
            assert!(
                inside < 6.0,
                "{}: subject changed by {inside}",
                rec.image_id
            );
            assert!(
                corner > 8.0,
                "{}: background unchanged ({corner})",
                rec.image_id
            );
            assert!(rec.caption.starts_with("a photo of a "), "{}", rec.caption);
            assert_eq!(rec.caption_source, "template");
            assert_eq!(rec.seed, 7);
            let prov: BTreeMap<String, String> = serde_json::from_str(&rec.provenance).unwrap();
            for k in [
                "image",
                "mask",
                "trimap",
                "alpha",
                "foreground",
                "background",
                "caption",
            ] {
                assert!(prov.contains_key(k), "provenance lacks {k}: {prov:?}");
            }
            assert!(prov["background"].starts_with(&rec.background_id));
            ids.push(rec.image_id);
        }
    }
    let mut good = sample.good.clone();
    good.sort();
    ids.sort();
    assert_eq!(ids, good);
    let reference = files(&out_a);

    // A rerun skips every shard and changes nothing.
    let again = synth(cfg, &quiet).unwrap();
    assert_eq!(
        (again.shards_written, again.shards_skipped),
        (0, rep.shards_total)
    );
    assert_eq!(again.bad.len(), rep.bad.len(), "bad inputs are remembered");
    assert_eq!(files(&out_a), reference);

    // Another configuration in the same folder is refused.
    let mut other = cfg.clone();
    other.synth.seed = 8;
    let err = synth(&other, &quiet).unwrap_err().to_string();
    assert!(err.contains("fingerprint"), "{err}");

    // SIGKILL mid-run, then a rerun: identical bytes.
    let out_b = dir.join("pairs_b");
    let mut cfg_b = cfg.clone();
    cfg_b.synth.out_dir = Some(out_b.clone());
    cfg_b.synth.threads = 1;
    let cfg_path = dir.join("pipeline_b.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg_b).unwrap()).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "synth_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &cfg_path)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done_at_kill = loop {
        if let Ok(Some(m)) = Manifest::load(&out_b) {
            if !m.shards.is_empty() {
                child.kill().unwrap(); // SIGKILL on Unix
                break m.shards.len();
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        assert!(Instant::now() < deadline, "child wrote no shard in 60 s");
        std::thread::sleep(Duration::from_millis(2));
    };
    let status = child.wait().unwrap();
    assert!(!status.success(), "child was killed");
    let m = Manifest::load(&out_b).unwrap().unwrap();
    println!(
        "killed with {done_at_kill} of {} shards done (manifest then: {})",
        m.shards_total,
        m.shards.len()
    );
    assert!(!m.is_complete(), "the kill must interrupt the run");
    // Also corrupt a completed shard: its checksum no longer matches, so it is rebuilt.
    let first = out_b.join(&m.shards[0].file);
    let mut bytes = std::fs::read(&first).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&first, bytes).unwrap();
    let invalid = std::sync::Mutex::new(Vec::new());
    let note = |e: SynthEvent| {
        if let SynthEvent::ShardInvalid { index, .. } = e {
            invalid.lock().unwrap().push(index);
        }
    };
    let resumed = synth(&cfg_b, &note).unwrap();
    assert_eq!(invalid.into_inner().unwrap(), vec![m.shards[0].index]);
    assert_eq!(
        resumed.shards_written + resumed.shards_skipped,
        resumed.shards_total
    );
    assert!(resumed.shards_skipped >= 1 || m.shards.len() == 1);
    assert_eq!(
        files(&out_b),
        reference,
        "kill -9 + rerun must be byte-identical"
    );
    println!("chain_end_to_end: {:.1} s", t0.elapsed().as_secs_f64());
}
