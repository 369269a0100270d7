//! `blipd data preview`: the grid carries the class name and caption of each row, drawn in DejaVu Sans
//! (pairs made by `blipd data synth` from two photos with ellipse masks).

use std::path::{Path, PathBuf};
use std::process::Command;

fn blipd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_blipd"));
    c.env("BLIPD_LOG", "warn");
    c
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(c: &mut Command) -> String {
    let o = c.output().unwrap();
    let t = format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{t}");
    t
}

fn ellipse_mask(path: &Path, w: u32, h: u32) {
    let m = image::ImageBuffer::from_fn(w, h, |x, y| {
        let dx = (f64::from(x) + 0.5 - f64::from(w) / 2.0) / (0.33 * f64::from(w));
        let dy = (f64::from(y) + 0.5 - f64::from(h) / 2.0) / (0.36 * f64::from(h));
        image::Luma([if dx * dx + dy * dy <= 1.0 {
            65535u16
        } else {
            0
        }])
    });
    m.save(path).unwrap();
}

#[test]
fn preview_rows_have_class_and_caption_text() {
    let tmp = tempfile::tempdir().unwrap();
    let images = repo().join("crates/blipd-apps/tests/fixtures/clipseg_masks/images");
    let masks = tmp.path().join("masks");
    std::fs::create_dir_all(&masks).unwrap();
    let mut ids = Vec::new();
    for e in std::fs::read_dir(&images).unwrap().flatten() {
        let id = e.path().file_stem().unwrap().to_string_lossy().into_owned();
        let (w, h) = image::image_dimensions(e.path()).unwrap();
        ellipse_mask(&masks.join(format!("{id}.png")), w, h);
        ids.push(id);
    }
    ids.sort();
    let csv = tmp.path().join("kept.csv");
    std::fs::write(
        &csv,
        format!(
            "ImageID,LabelName,ClassName,XMin,XMax,YMin,YMax\n{},/m/0bt9lr,Dog,0.1,0.9,0.1,0.9\n\
             {},/m/0kmg4,Stuffed animal,0.1,0.9,0.1,0.9\n",
            ids[0], ids[1]
        ),
    )
    .unwrap();
    let captions = tmp.path().join("captions.tsv");
    std::fs::write(
        &captions,
        format!(
            "{}\ta small dog with a long caption that has to be wrapped over several lines of the grid\n",
            ids[0]
        ),
    )
    .unwrap();
    let pairs = tmp.path().join("pairs");
    run(blipd()
        .args(["data", "synth", "--config"])
        .arg(repo().join("configs/data/pipeline.toml"))
        .arg("--subjects")
        .arg(&csv)
        .arg("--images")
        .arg(&images)
        .arg("--masks")
        .arg(&masks)
        .args(["--mask-source", "dir", "--backgrounds"])
        .arg(&images)
        .arg("--captions")
        .arg(&captions)
        .arg("--out")
        .arg(&pairs));

    let grid_path = tmp.path().join("grid.png");
    let (cell, gap) = (96u32, 4u32);
    let t = run(blipd()
        .args(["data", "preview", "--shards"])
        .arg(&pairs)
        .arg("--out")
        .arg(&grid_path)
        .args(["--cell", &cell.to_string()]));
    assert!(t.contains("2 pairs"), "{t}");
    let grid = image::open(&grid_path).unwrap().to_rgb8();
    // Rows: image cell, then 1 label line + the wrapped caption's lines (12-px text below 160-px cells).
    let style = blipd_data::font::TextStyle::new(12.0);
    let line = style.line_height();
    let recs = blipd_data::preview::first_pairs(&pairs, 2).unwrap();
    let caption_lines: Vec<u32> = recs
        .iter()
        .map(|r| style.wrap(&r.caption, 2 * cell + gap, 4).len() as u32)
        .collect();
    assert!(
        caption_lines[0] >= 2 && caption_lines[1] == 1,
        "the long caption wraps, \"a photo of a stuffed animal\" fits: {caption_lines:?}"
    );
    let expected_h: u32 = caption_lines
        .iter()
        .map(|c| cell + gap + (1 + c) * line + gap)
        .sum::<u32>()
        + gap;
    assert_eq!(grid.dimensions(), (2 * cell + 3 * gap, expected_h));
    // Label ink (the class name's blue) under each row's images, caption ink (black) below it.
    let mut y0 = gap;
    for c in caption_lines {
        let text_top = y0 + cell + gap;
        let count = |ink: &dyn Fn([u8; 3]) -> bool, y_from: u32, y_to: u32| {
            (y_from..y_to)
                .flat_map(|y| (0..grid.width()).map(move |x| (x, y)))
                .filter(|&(x, y)| ink(grid.get_pixel(x, y).0))
                .count()
        };
        let blue = |p: [u8; 3]| p[2] > 120 && p[0] < 150 && p[2] as i32 - p[0] as i32 > 40;
        let black = |p: [u8; 3]| p.iter().all(|&v| v < 100);
        assert!(
            count(&blue, text_top, text_top + line) > 40,
            "label at {text_top}"
        );
        assert!(
            count(&black, text_top + line, text_top + (1 + c) * line) > 40 * c as usize,
            "caption at {text_top}"
        );
        y0 += cell + gap + (1 + c) * line + gap;
    }
}
