//! `PairLoader` on shards of procedural pairs: epochs are permutations, the stream and its keys do not depend
//! on the world size, and a cursor saved at one world size resumes at another.

use blipd_data::loader::{LoaderOptions, PairLoader};
use blipd_data::shards::{sha256_file, Manifest, PairRecord, ShardEntry, ShardWriter};
use blipd_data::synthetic::synth_pair;
use std::collections::BTreeSet;
use std::path::Path;

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// 3 shards of 7, 5 and 9 rows (row groups of 3).
fn make_shards(dir: &Path) -> u64 {
    let sizes = [7u64, 5, 9];
    let total: u64 = sizes.iter().sum();
    let mut m = Manifest::new("test-fingerprint".into(), total, 9);
    let mut row = 0;
    for (k, &n) in sizes.iter().enumerate() {
        let file = format!("pairs-{k:05}.parquet");
        let path = dir.join(&file);
        let mut w = ShardWriter::create(&path, 3).unwrap();
        for _ in 0..n {
            let p = synth_pair(row, 1, 16);
            w.push(PairRecord {
                row,
                image_id: p.id.clone(),
                mid: "/m/0x".into(),
                class_name: p.subject.clone(),
                caption: p.caption.clone(),
                caption_source: "template".into(),
                bbox: [0.1, 0.9, 0.1, 0.9],
                width: 16,
                height: 16,
                background_id: "bg".into(),
                seed: 1,
                input_image: png(&p.input),
                target_image: png(&p.target),
                provenance: "{}".into(),
            })
            .unwrap();
            row += 1;
        }
        assert_eq!(w.finish().unwrap(), n);
        assert!(!dir.join(format!("{file}.tmp")).exists());
        let groups: Vec<u64> = (0..n.div_ceil(3)).map(|g| (n - 3 * g).min(3)).collect();
        m.shards.push(ShardEntry {
            index: k as u64,
            file,
            first_row: row - n,
            slice_rows: n,
            rows: n,
            bytes: std::fs::metadata(&path).unwrap().len(),
            sha256: sha256_file(&path).unwrap(),
            row_groups: groups,
            bad: vec![],
        });
    }
    m.save(dir).unwrap();
    total
}

fn opts(rank: usize, world_size: usize) -> LoaderOptions {
    LoaderOptions {
        seed: 5,
        window_blocks: 2,
        rank,
        world_size,
        ..LoaderOptions::default()
    }
}

/// Keys and rows of `steps` global batches of `global` samples, gathered from all ranks.
fn stream(dir: &Path, world: usize, global: usize, steps: usize) -> Vec<(u64, u64)> {
    let mut loaders: Vec<PairLoader> = (0..world)
        .map(|r| PairLoader::open(dir, opts(r, world)).unwrap())
        .collect();
    let mut out = Vec::new();
    for _ in 0..steps {
        for l in &mut loaders {
            for (k, rec) in l.next_records(global / world).unwrap() {
                out.push((k, rec.row));
            }
        }
    }
    out
}

#[test]
fn epochs_world_sizes_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let total = make_shards(tmp.path());

    // Decoded items match the stored pair.
    let mut l = PairLoader::open(tmp.path(), opts(0, 1)).unwrap();
    assert_eq!(l.len(), total);
    let items = l.next_items(4).unwrap();
    for it in &items {
        let p = synth_pair(it.record.row, 1, 16);
        assert_eq!(it.input, p.input);
        assert_eq!(it.target, p.target);
        assert_eq!(it.record.caption, p.caption);
    }

    // One epoch (drop_last: 21 samples, global batch 4 → 5 batches) has no repeats, and is shuffled.
    let s1 = stream(tmp.path(), 1, 4, 10);
    let epoch0: Vec<u64> = s1[..20].iter().map(|x| x.1).collect();
    assert_eq!(epoch0.iter().collect::<BTreeSet<_>>().len(), 20);
    assert_ne!(epoch0, (0..20).collect::<Vec<_>>(), "shuffled");
    let epoch1: Vec<u64> = s1[20..40].iter().map(|x| x.1).collect();
    assert_ne!(epoch0, epoch1, "each epoch has its own order");
    assert_eq!(s1[20].0, total, "keys are epoch·len + position");

    // The same global stream (rows and keys) with 2 and 4 ranks.
    for world in [2, 4] {
        let mut sw = stream(tmp.path(), world, 4, 10);
        let mut s = s1.clone();
        sw.sort();
        s.sort();
        assert_eq!(sw, s, "world size {world}");
    }

    // Save at world size 2 after 3 steps, resume at world size 4 (and 1): the global stream continues.
    let mut two: Vec<PairLoader> = (0..2)
        .map(|r| PairLoader::open(tmp.path(), opts(r, 2)).unwrap())
        .collect();
    for _ in 0..3 {
        for l in &mut two {
            l.next_records(2).unwrap();
        }
    }
    let state = two[0].state_json();
    assert_eq!(state, two[1].state_json());
    let text = serde_json::to_string(&state).unwrap();
    for world in [4, 1] {
        let mut resumed = Vec::new();
        for r in 0..world {
            let mut l = PairLoader::open(tmp.path(), opts(r, world)).unwrap();
            l.load_state_json(&serde_json::from_str(&text).unwrap())
                .unwrap();
            for _ in 0..4 {
                resumed.extend(
                    l.next_records(4 / world)
                        .unwrap()
                        .into_iter()
                        .map(|(k, rec)| (k, rec.row)),
                );
            }
        }
        resumed.sort();
        let mut expect = s1[12..28].to_vec();
        expect.sort();
        assert_eq!(resumed, expect, "resume at world size {world}");
    }

    // A state is refused by a loader with other shuffle settings or another dataset.
    let mut other = PairLoader::open(
        tmp.path(),
        LoaderOptions {
            window_blocks: 3,
            ..opts(0, 1)
        },
    )
    .unwrap();
    assert!(other.load_state_json(&state).is_err());
    let mut bad = state.clone();
    bad["fingerprint"] = "x".into();
    assert!(l.load_state_json(&bad).is_err());
    // Too large a global batch is an error, not a hang.
    assert!(PairLoader::open(tmp.path(), opts(0, 4))
        .unwrap()
        .next_records(6)
        .is_err());
}
