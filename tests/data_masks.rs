//! `blipd data masks --source clipseg` end to end on the tiny CLIPSeg fixture of blipd-apps (a complete
//! transformers-layout folder and two photos): masks written as 16-bit PNGs at the image size, a corrupt
//! and a missing image reported without stopping the run, a rerun skipping what is there, and clear errors
//! for a broken model folder.

use blipd_testkit::copy_dir;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const IDS: [&str; 2] = ["0a1b2c3d4e5f6071", "1f2e3d4c5b6a7988"];

fn blipd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_blipd"));
    c.env("BLIPD_LOG", "warn");
    c
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../blipd-apps/tests/fixtures/clipseg_masks")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn masks(model: &Path, images: &Path, csv: &Path, out: &Path) -> Output {
    blipd()
        .args(["data", "masks", "--source", "clipseg", "--batch-size", "2"])
        .arg("--from")
        .arg(model)
        .arg("--images")
        .arg(images)
        .arg("--subjects")
        .arg(csv)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn clipseg_masks_are_written_and_bad_images_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    copy_dir(&fixture().join("images"), &images);
    // A corrupt JPEG (truncated header) and a PNG cut in half.
    std::fs::write(
        images.join("c0ffee0000000001.jpg"),
        b"\xff\xd8\xff\xe0\x00\x10JFIF",
    )
    .unwrap();
    let png = std::fs::read(images.join(format!("{}.png", IDS[1]))).unwrap();
    std::fs::write(images.join("c0ffee0000000003.png"), &png[..png.len() / 2]).unwrap();
    let csv = tmp.path().join("kept.csv");
    std::fs::write(
        &csv,
        format!(
            "ImageID,LabelName,ClassName,XMin,XMax,YMin,YMax\n\
             {},/m/0bt9lr,Dog,0.1,0.9,0.05,0.95\n\
             c0ffee0000000001,/m/01yrx,Cat,0.1,0.9,0.1,0.9\n\
             c0ffee0000000002,/m/01yrx,Cat,0.1,0.9,0.1,0.9\n\
             c0ffee0000000003,/m/0kmg4,Stuffed animal,0.2,0.8,0.1,0.9\n\
             {},/m/0kmg4,Stuffed animal,0.2,0.8,0.1,0.9\n",
            IDS[0], IDS[1]
        ),
    )
    .unwrap();
    let out = tmp.path().join("masks");
    let o = masks(&fixture().join("model"), &images, &csv, &out);
    let t = text(&o);
    println!("{t}");
    assert!(o.status.success(), "{t}");
    assert!(t.contains("2 masks written"), "{t}");
    assert!(t.contains("3 bad"), "{t}");
    for id in ["c0ffee0000000001", "c0ffee0000000002", "c0ffee0000000003"] {
        assert!(t.contains(id), "{id} not reported:\n{t}");
        assert!(!out.join(format!("{id}.png")).exists());
    }
    let tsv = std::fs::read_to_string(out.join("bad_inputs.tsv")).unwrap();
    assert_eq!(tsv.lines().count(), 4, "{tsv}");
    assert!(tsv.contains("c0ffee0000000002\timage\tnot found"), "{tsv}");

    // 16-bit grey at each image's size, soft values spanning both trimap ends.
    for id in IDS {
        let img = image::open(images.join(format!("{id}.png"))).unwrap();
        let m = match image::open(out.join(format!("{id}.png"))).unwrap() {
            image::DynamicImage::ImageLuma16(m) => m,
            other => panic!("{id}: {:?} is not 16-bit grey", other.color()),
        };
        assert_eq!(m.dimensions(), (img.width(), img.height()), "{id}");
        let (lo, hi) = (
            m.as_raw().iter().filter(|&&v| v <= 6553).count(),
            m.as_raw().iter().filter(|&&v| v >= 58982).count(),
        );
        assert!(lo > 0 && hi > 0, "{id}: {lo} ≤ 0.1, {hi} ≥ 0.9");
    }

    // Rerun: nothing left to do except the bad ones, which are reported again.
    let before = std::fs::read(out.join(format!("{}.png", IDS[0]))).unwrap();
    let o = masks(&fixture().join("model"), &images, &csv, &out);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("0 masks written, 2 already present, 3 bad"),
        "{t}"
    );
    assert_eq!(
        std::fs::read(out.join(format!("{}.png", IDS[0]))).unwrap(),
        before
    );

    // The masks feed `synth`'s `dir` source; re-exported through it they stay 16-bit with the same
    // levels, and a rerun keeps what is there.
    let copy = tmp.path().join("copy");
    let dir_masks = || {
        blipd()
            .args(["data", "masks", "--source", "dir"])
            .arg("--from")
            .arg(&out)
            .arg("--subjects")
            .arg(&csv)
            .arg("--out")
            .arg(&copy)
            .output()
            .unwrap()
    };
    let o = dir_masks();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("2 masks") && t.contains("0 already present"),
        "{t}"
    );
    let a = image::open(out.join(format!("{}.png", IDS[0]))).unwrap();
    let b = image::open(copy.join(format!("{}.png", IDS[0]))).unwrap();
    assert!(
        matches!(b, image::DynamicImage::ImageLuma16(_)),
        "{:?}",
        b.color()
    );
    assert_eq!(a.to_luma16(), b.to_luma16());
    let o = dir_masks();
    let t = text(&o);
    assert!(
        t.contains("0 masks") && t.contains("2 already present"),
        "{t}"
    );
}

#[test]
fn clipseg_model_folder_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture().join("model"), &model);
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let out = tmp.path().join("masks");
    let o = masks(
        &model,
        &fixture().join("images"),
        &fixture().join("subjects.csv"),
        &out,
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("model.safetensors or pytorch_model.bin"), "{t}");

    let o = blipd()
        .args(["data", "masks", "--source", "clipseg"])
        .arg("--from")
        .arg(fixture().join("model"))
        .arg("--subjects")
        .arg(fixture().join("subjects.csv"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("--images"), "{t}");
}

/// `data masks --shard I/N`: the parts, run into one folder, make the single run's masks (each image in
/// exactly one part, by its ImageID), each part listing its own bad inputs.
#[test]
fn masks_split_into_parts_make_the_single_run_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    copy_dir(&fixture().join("images"), &images);
    let csv = tmp.path().join("kept.csv");
    std::fs::write(
        &csv,
        format!(
            "ImageID,LabelName,ClassName,XMin,XMax,YMin,YMax\n\
             {},/m/0bt9lr,Dog,0.1,0.9,0.05,0.95\n\
             c0ffee0000000002,/m/01yrx,Cat,0.1,0.9,0.1,0.9\n\
             {},/m/0kmg4,Stuffed animal,0.2,0.8,0.1,0.9\n",
            IDS[0], IDS[1]
        ),
    )
    .unwrap();
    let single = tmp.path().join("single");
    let o = masks(&fixture().join("model"), &images, &csv, &single);
    assert!(o.status.success(), "{}", text(&o));
    let split = tmp.path().join("split");
    let mut seen = 0;
    for i in 0..3 {
        let o = blipd()
            .args(["data", "masks", "--source", "clipseg", "--batch-size", "2"])
            .arg("--from")
            .arg(fixture().join("model"))
            .arg("--images")
            .arg(&images)
            .arg("--subjects")
            .arg(&csv)
            .arg("--out")
            .arg(&split)
            .args(["--shard", &format!("{i}/3")])
            .output()
            .unwrap();
        let t = text(&o);
        assert!(o.status.success(), "{t}");
        let rows: usize = t
            .split(&format!("part {i}/3: "))
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no part line:\n{t}"));
        seen += rows;
    }
    assert_eq!(seen, 3, "every row in exactly one part");
    for id in IDS {
        let a = image::open(single.join(format!("{id}.png")))
            .unwrap()
            .to_luma16();
        let b = image::open(split.join(format!("{id}.png")))
            .unwrap()
            .to_luma16();
        let d = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        println!("{id}: max |Δ| {d} of 65535 between the split and the single run");
        // Batches of other images may round a last bit differently.
        assert!(d <= 2, "{id}: {d}");
    }
    let bad: Vec<_> = std::fs::read_dir(&split)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with("bad_inputs.part-").then_some(n)
        })
        .collect();
    assert_eq!(bad.len(), 1, "one part had the missing image: {bad:?}");
    let o = blipd()
        .args(["data", "masks", "--source", "dir", "--shard", "3/3"])
        .arg("--from")
        .arg(&single)
        .arg("--subjects")
        .arg(&csv)
        .arg("--out")
        .arg(&split)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("I/N"),
        "{}",
        text(&o)
    );
}
