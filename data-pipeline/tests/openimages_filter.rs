//! OpenImages filter on tiny crafted CSVs: every rule, both header layouts, malformed rows, image labels.

use blipd_data::openimages::{
    filter_openimages, write_subjects_csv, FilterConfig, FilterInputs, Rule,
};
use std::collections::HashMap;
use std::io::Write;

const H13: &str = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside";
const H21: &str = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside,XClick1X,XClick2X,XClick3X,XClick4X,XClick1Y,XClick2Y,XClick3Y,XClick4Y";

const CLASSES: &str = "/m/0bt9lr,Dog\n/m/01yrx,Cat\n/m/07j7r,Tree\n/m/01g317,Person\n/m/0k65p,Human hand\n/m/04bcr3,Table\n";

/// (ImageID, LabelName, XMin, XMax, YMin, YMax, IsTruncated, IsGroupOf, IsDepiction, IsInside)
type Row<'a> = (&'a str, &'a str, f64, f64, f64, f64, i32, i32, i32, i32);

fn rows_13(rows: &[Row]) -> String {
    let mut s = format!("{H13}\n");
    for r in rows {
        s += &format!(
            "{},xclick,{},1,{},{},{},{},0,{},{},{},{}\n",
            r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9
        );
    }
    s
}

fn rows_21(rows: &[Row]) -> String {
    // Same content, 21 columns and a different (but header-named) layout of the extra XClick columns.
    let mut s = format!("{H21}\n");
    for r in rows {
        s += &format!(
            "{},xclick,{},1,{},{},{},{},0,{},{},{},{},0.1,0.2,0.3,0.4,0.1,0.2,0.3,0.4\n",
            r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9
        );
    }
    s
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    p
}

fn crafted() -> Vec<Row<'static>> {
    vec![
        // img_a: kept dog (area 0.5·0.8 = 0.4, 640x480 → aspect (0.5·640)/(0.8·480) = 0.83).
        ("img_a", "/m/0bt9lr", 0.1, 0.6, 0.1, 0.9, 0, 0, 0, 0),
        // img_a: group-of cat box.
        ("img_a", "/m/01yrx", 0.0, 0.6, 0.0, 0.6, 0, 1, 0, 0),
        // img_b: inside.
        ("img_b", "/m/0bt9lr", 0.1, 0.7, 0.1, 0.8, 0, 0, 0, 1),
        // img_c: human, human body part, cluttered (tree), cluttered (table).
        ("img_c", "/m/01g317", 0.1, 0.7, 0.1, 0.8, 0, 0, 0, 0),
        ("img_c", "/m/0k65p", 0.1, 0.7, 0.1, 0.8, 0, 0, 0, 0),
        ("img_c", "/m/07j7r", 0.1, 0.7, 0.1, 0.8, 0, 0, 0, 0),
        ("img_c", "/m/04bcr3", 0.1, 0.7, 0.1, 0.8, 0, 0, 0, 0),
        // img_d: too small (0.04) and too large (0.9).
        ("img_d", "/m/0bt9lr", 0.0, 0.2, 0.0, 0.2, 0, 0, 0, 0),
        ("img_d", "/m/01yrx", 0.0, 1.0, 0.0, 0.9, 0, 0, 0, 0),
        // img_e: 1000x200 image: box 0.6x0.6 normalised is 600x120 px → aspect 5 > 2 (normalised aspect would be 1).
        ("img_e", "/m/0bt9lr", 0.2, 0.8, 0.2, 0.8, 0, 0, 0, 0),
        // img_f: image unreadable.
        ("img_f", "/m/0bt9lr", 0.2, 0.8, 0.2, 0.8, 0, 0, 0, 0),
        // img_g: two passing boxes: larger kept, other "not largest"; plus a depiction/truncated one (kept by default).
        ("img_g", "/m/0bt9lr", 0.1, 0.7, 0.1, 0.7, 0, 0, 0, 0),
        ("img_g", "/m/01yrx", 0.1, 0.8, 0.1, 0.8, 1, 0, 1, 0),
        // img_h: passing box but the image has a verified Person label.
        ("img_h", "/m/01yrx", 0.1, 0.8, 0.1, 0.8, 0, 0, 0, 0),
    ]
}

fn sizes() -> impl FnMut(&str) -> Result<(u32, u32), String> {
    let table: HashMap<&str, (u32, u32)> = [
        ("img_a", (640, 480)),
        ("img_e", (1000, 200)),
        ("img_g", (500, 500)),
        ("img_h", (500, 500)),
    ]
    .into_iter()
    .collect();
    move |id: &str| {
        table
            .get(id)
            .copied()
            .ok_or_else(|| format!("{id}.jpg: no such file"))
    }
}

fn run(
    csv_text: &str,
    labels: Option<&str>,
    cfg: &FilterConfig,
) -> blipd_data::openimages::FilterReport {
    let dir = tempfile::tempdir().unwrap();
    let boxes = write(&dir, "boxes.csv", csv_text);
    let classes = write(&dir, "classes.csv", CLASSES);
    let labels = labels.map(|t| write(&dir, "labels.csv", t));
    let inputs = FilterInputs {
        boxes_csv: &boxes,
        class_descriptions_csv: &classes,
        image_labels_csv: labels.as_deref(),
    };
    let mut s = sizes();
    filter_openimages(&inputs, cfg, &mut s).unwrap()
}

const LABELS: &str = "ImageID,Source,LabelName,Confidence\nimg_a,verification,/m/01g317,0\nimg_g,verification,/m/0bt9lr,1\nimg_h,verification,/m/01g317,1\nzzz,verification,/m/01g317,1\n";

fn check_paper_rules(r: &blipd_data::openimages::FilterReport) {
    let kept: Vec<(&str, &str)> = r
        .kept
        .iter()
        .map(|s| (s.image_id.as_str(), s.class_name.as_str()))
        .collect();
    assert_eq!(kept, vec![("img_a", "Dog"), ("img_g", "Cat")], "{r:?}");
    assert_eq!(r.dropped(Rule::GroupOf), 1);
    assert_eq!(r.dropped(Rule::Inside), 1);
    assert_eq!(r.dropped(Rule::Human), 2);
    assert_eq!(r.dropped(Rule::Cluttered), 2);
    assert_eq!(r.dropped(Rule::Area), 2);
    assert_eq!(r.dropped(Rule::Aspect), 1);
    assert_eq!(r.dropped(Rule::ImageUnreadable), 1);
    assert_eq!(r.dropped(Rule::NotLargest), 1);
    assert_eq!(r.dropped(Rule::HumanLabel), 1);
    assert_eq!(r.boxes_seen, 14);
    assert_eq!(r.images_seen, 8);
    assert_eq!(r.unsorted_ids, 0);
    let total: u64 = r.drops.values().sum();
    assert_eq!(total + r.kept.len() as u64, r.boxes_seen);
    assert!(r
        .problems
        .iter()
        .any(|p| p.image_id == "img_f" && p.reason.contains("no such file")));
    let a = &r.kept[0];
    assert_eq!((a.width, a.height, a.mid.as_str()), (640, 480, "/m/0bt9lr"));
}

#[test]
fn every_paper_rule_13_columns() {
    check_paper_rules(&run(
        &rows_13(&crafted()),
        Some(LABELS),
        &FilterConfig::default(),
    ));
}

#[test]
fn every_paper_rule_21_columns() {
    check_paper_rules(&run(
        &rows_21(&crafted()),
        Some(LABELS),
        &FilterConfig::default(),
    ));
}

#[test]
fn optional_rules() {
    let cfg = FilterConfig {
        drop_depiction: true,
        single_instance: true,
        ..FilterConfig::default()
    };
    let mut rows = crafted();
    rows.push(("img_i", "/m/0bt9lr", 0.1, 0.7, 0.1, 0.7, 0, 0, 0, 0));
    rows.push(("img_i", "/m/0bt9lr", 0.0, 0.1, 0.0, 0.1, 0, 0, 0, 0));
    let r = run(&rows_13(&rows), None, &cfg);
    assert_eq!(r.dropped(Rule::Depiction), 1);
    assert_eq!(r.dropped(Rule::MultipleInstances), 2);
    assert_eq!(r.dropped(Rule::HumanLabel), 0, "no labels file given");
    assert!(r.kept.iter().any(|s| s.image_id == "img_h"));
    assert!(!r.kept.iter().any(|s| s.image_id == "img_i"));
    let cfg = FilterConfig {
        drop_truncated: true,
        ..FilterConfig::default()
    };
    assert_eq!(
        run(&rows_13(&crafted()), None, &cfg).dropped(Rule::Truncated),
        1
    );
}

#[test]
fn malformed_rows_are_counted_with_their_id() {
    let mut text = rows_13(&crafted()[..1]);
    text += "img_m,xclick,/m/0bt9lr,1,abc,0.5,0.1,0.9,0,0,0,0,0\n"; // bad number
    text += "img_m,xclick,/m/0bt9lr,1,0.6,0.5,0.1,0.9,0,0,0,0,0\n"; // inverted box
    text += "img_m,xclick,/m/0bt9lr,1,0.1,0.5,0.1\n"; // short row
    text += "img_m,xclick,/m/0bt9lr,1,0.1,0.7,0.1,0.9,0,0,2,0,0\n"; // bad flag
    text += "img_n,xclick,,1,0.1,0.7,0.1,0.9,0,0,0,0,0\n"; // empty label
    let r = run(&text, None, &FilterConfig::default());
    assert_eq!(r.dropped(Rule::Malformed), 5);
    assert_eq!(r.kept.len(), 1);
    let lines: Vec<(u64, &str)> = r
        .problems
        .iter()
        .map(|p| (p.line, p.image_id.as_str()))
        .collect();
    assert_eq!(
        lines,
        vec![
            (3, "img_m"),
            (4, "img_m"),
            (5, "img_m"),
            (6, "img_m"),
            (7, "img_n")
        ]
    );
    assert!(r.problems[0].reason.contains("XMin"), "{:?}", r.problems[0]);
}

#[test]
fn unsorted_input_is_reported() {
    let rows = crafted();
    let mut v = vec![rows[0], rows[2], rows[1]];
    v[2].0 = "img_a";
    let r = run(&rows_13(&v), None, &FilterConfig::default());
    assert_eq!(r.unsorted_ids, 1);
}

#[test]
fn missing_column_is_an_error_and_subjects_csv_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let boxes = write(&dir, "b.csv", "ImageID,LabelName,XMin\nx,/m/1,0.1\n");
    let classes = write(&dir, "c.csv", CLASSES);
    let inputs = FilterInputs {
        boxes_csv: &boxes,
        class_descriptions_csv: &classes,
        image_labels_csv: None,
    };
    let mut s = sizes();
    let err = filter_openimages(&inputs, &FilterConfig::default(), &mut s).unwrap_err();
    assert!(err.to_string().contains("missing column XMax"), "{err}");

    let r = run(&rows_13(&crafted()), None, &FilterConfig::default());
    let out = dir.path().join("subjects.csv");
    write_subjects_csv(&out, &r.kept).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with("ImageID,LabelName,ClassName,XMin"));
    assert!(
        text.contains("img_a,/m/0bt9lr,Dog,0.1,0.6,0.1,0.9,640,480"),
        "{text}"
    );
}

/// An unterminated quote is a problem of its own line; the lines after it are read as usual (a CSV
/// reader would read them all into the quoted field and lose them). Quoted fields that close, CRLF
/// line ends and a BOM still parse.
#[test]
fn an_unterminated_quote_is_reported_with_its_line_and_later_rows_survive() {
    let rows = crafted();
    let mut text = format!("\u{feff}{H13}\r\n");
    text += "img_0,xclick,\"/m/0bt9lr,1,0.1,0.6,0.1,0.9,0,0,0,0,0\r\n"; // line 2: quote never closed
    let body = rows_13(&rows);
    for l in body.lines().skip(1) {
        text += l;
        text += "\r\n";
    }
    // A quoted field that closes is fine.
    text += "img_q,\"xclick, verified\",/m/0bt9lr,1,0.1,0.6,0.1,0.9,0,0,0,0,0\r\n";
    let r = run(&text, None, &FilterConfig::default());
    let reference = run(&body, None, &FilterConfig::default());
    assert_eq!(r.dropped(Rule::Malformed), 1, "{:?}", r.problems);
    let p = &r.problems[0];
    assert_eq!(p.line, 2, "{p:?}");
    assert!(p.reason.contains("unterminated quote"), "{p:?}");
    // Every later row was read: the same result as without the broken line, plus img_q (its image
    // size is unknown to the fixture, so it counts as unreadable, not as malformed).
    assert_eq!(r.kept, reference.kept);
    assert_eq!(r.boxes_seen, reference.boxes_seen + 2);
    assert_eq!(
        r.dropped(Rule::ImageUnreadable),
        reference.dropped(Rule::ImageUnreadable) + 1
    );
}

/// A box whose class is not in the class file is dropped and counted, with one problem per MID
/// naming the count and the first line; it is never kept with the MID as its class name.
#[test]
fn boxes_of_unknown_classes_are_dropped_and_reported_per_class() {
    let mut rows = crafted();
    rows[0].1 = "/m/unknown1"; // img_a's dog (it would be kept)
    rows.push(("img_z", "/m/unknown2", 0.1, 0.6, 0.1, 0.9, 0, 0, 0, 0));
    rows.push(("img_z", "/m/unknown2", 0.1, 0.6, 0.1, 0.9, 0, 0, 0, 0));
    let r = run(&rows_13(&rows), None, &FilterConfig::default());
    assert_eq!(r.dropped(Rule::UnknownClass), 3);
    assert_eq!(r.unknown_classes, 3);
    assert!(
        r.kept.iter().all(|s| !s.class_name.starts_with("/m/")),
        "{:?}",
        r.kept
    );
    assert!(r.kept.iter().all(|s| s.image_id != "img_a"), "{:?}", r.kept);
    let unknown: Vec<(u64, &str)> = r
        .problems
        .iter()
        .filter(|p| p.reason.contains("is not in"))
        .map(|p| (p.line, p.reason.as_str()))
        .collect();
    assert_eq!(unknown.len(), 2, "{unknown:?}");
    assert_eq!(unknown[0].0, 2);
    assert!(
        unknown[0].1.contains("class /m/unknown1 is not in")
            && unknown[0].1.contains("1 box dropped")
    );
    let n = rows.len() as u64;
    assert_eq!(unknown[1].0, n); // first img_z row: header is line 1, so row k is line k + 1
    assert!(unknown[1].1.contains("/m/unknown2") && unknown[1].1.contains("2 boxes dropped"));
}

/// A malformed class-description line is an error naming the line.
#[test]
fn a_broken_class_file_is_an_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let classes = write(
        &dir,
        "c.csv",
        "/m/0bt9lr,Dog\n/m/01yrx,\"Cat\n/m/07j7r,Tree\n",
    );
    let err = blipd_data::openimages::read_class_descriptions(&classes).unwrap_err();
    assert!(
        err.to_string().contains("line 2: unterminated quote"),
        "{err}"
    );
}
