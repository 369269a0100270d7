//! OpenImages V6 subject filter (BLIP-Diffusion appendix A.5).
//!
//! The box CSV is streamed row by row (never loaded whole) and parsed by header name, so the 13-column
//! validation/test files and the 21-column train file both work. Each box is a candidate subject; it is
//! dropped by the **first** failing rule in this order, and that rule's counter goes up by one:
//!
//! 1. `malformed`: missing/unparsable field or coordinates outside `[0, 1]` / inverted (the row's line and
//!    ImageID are recorded; the run goes on). A row is one line (OpenImages fields never span lines), so
//!    an unterminated quote is an error of its own line and the lines after it are read as usual;
//! 2. `unknown_class`: `LabelName` is not in the class descriptions (each such MID is also recorded as a
//!    problem, with its box count and first line);
//! 3. `group_of`: `IsGroupOf == 1` (paper (i)); with `single_instance`, also every box of an image that has
//!    more than one box of the same `LabelName` (`multiple_instances`);
//! 4. `inside`: `IsInside == 1` (paper (ii));
//! 5. `depiction`, `truncated`: optional, off by default (not in the paper);
//! 6. `human`: `LabelName` in the human-related list (paper (v));
//! 7. `cluttered`: `LabelName` in the cluttered list (paper (vi));
//! 8. `area`: `(XMax−XMin)·(YMax−YMin)` outside `[area_min, area_max]` = [0.3, 0.8] (paper (iv));
//! 9. `human_label`: the image has a human-verified positive label (Confidence 1) of one of
//!    `human_label_mids` (optional labels file, streamed in step since it is also sorted by ImageID);
//! 10. `image_unreadable`: the image size could not be read (the error is recorded with the id);
//! 11. `aspect`: `max(w/h, h/w) > max_aspect` (2) with `w = (XMax−XMin)·W`, `h = (YMax−YMin)·H` and W, H the
//!     real pixel size read from the image header (paper (iii)).
//!
//! With `one_per_image` (default) the kept box of largest area represents its image; the other passing boxes
//! count under `not_largest`.

use crate::error::{DataError, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Human-related MIDs of paper rule (v) (checked against the boxable class list; see
/// `/work/shared/reference/data-pipeline.md` §1).
pub const HUMAN_MIDS: [&str; 20] = [
    "/m/01bl7v",  // Boy
    "/m/05r655",  // Girl
    "/m/01g317",  // Person
    "/m/04yx4",   // Man
    "/m/04rky",   // Mammal
    "/m/03bt1vf", // Woman
    "/m/02p0tk3", // Human body
    "/m/04hgtk",  // Human head
    "/m/03q69",   // Human hair
    "/m/0dzf4",   // Human arm
    "/m/0dzct",   // Human face
    "/m/035r7c",  // Human leg
    "/m/0k65p",   // Human hand
    "/m/031n1",   // Human foot
    "/m/014sv8",  // Human eye
    "/m/0283dt1", // Human mouth
    "/m/0k0pj",   // Human nose
    "/m/039xj_",  // Human ear
    "/m/09j2d",   // Clothing
    "/m/01xyhv",  // Suit
];

/// Cluttered MIDs of paper rule (vi).
pub const CLUTTERED_MIDS: [&str; 7] = [
    "/m/07j7r",  // Tree
    "/m/05s2s",  // Plant
    "/m/03fp41", // Houseplant
    "/m/01y9k5", // Desk
    "/m/04bcr3", // Table
    "/m/01n5jq", // Poster
    "/m/01knjb", // Billboard
];

/// Image-level labels whose verified presence marks an image as containing people.
pub const HUMAN_LABEL_MIDS: [&str; 6] = [
    "/m/01g317",
    "/m/04yx4",
    "/m/03bt1vf",
    "/m/01bl7v",
    "/m/05r655",
    "/m/02p0tk3",
];

/// Filter rules; defaults follow the paper.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterConfig {
    pub area_min: f64,
    pub area_max: f64,
    pub max_aspect: f64,
    pub drop_group_of: bool,
    /// Stricter reading of rule (i): drop images with more than one box of the subject's class.
    pub single_instance: bool,
    pub drop_inside: bool,
    pub drop_depiction: bool,
    pub drop_truncated: bool,
    pub human_mids: Vec<String>,
    pub cluttered_mids: Vec<String>,
    pub human_label_mids: Vec<String>,
    /// Use the EXIF-oriented (display) size for the aspect rule instead of the stored size.
    pub use_exif_orientation: bool,
    pub one_per_image: bool,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            area_min: 0.3,
            area_max: 0.8,
            max_aspect: 2.0,
            drop_group_of: true,
            single_instance: false,
            drop_inside: true,
            drop_depiction: false,
            drop_truncated: false,
            human_mids: HUMAN_MIDS.iter().map(|s| s.to_string()).collect(),
            cluttered_mids: CLUTTERED_MIDS.iter().map(|s| s.to_string()).collect(),
            human_label_mids: HUMAN_LABEL_MIDS.iter().map(|s| s.to_string()).collect(),
            use_exif_orientation: false,
            one_per_image: true,
        }
    }
}

/// Why a box was dropped (see the module docs for the order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    Malformed,
    UnknownClass,
    GroupOf,
    MultipleInstances,
    Inside,
    Depiction,
    Truncated,
    Human,
    Cluttered,
    Area,
    HumanLabel,
    ImageUnreadable,
    Aspect,
    NotLargest,
}

/// A kept subject.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Subject {
    pub image_id: String,
    pub mid: String,
    pub class_name: String,
    pub x_min: f64,
    pub x_max: f64,
    pub y_min: f64,
    pub y_max: f64,
    /// Pixel size used by the aspect rule.
    pub width: u32,
    pub height: u32,
}

impl Subject {
    pub fn area(&self) -> f64 {
        (self.x_max - self.x_min) * (self.y_max - self.y_min)
    }
}

/// One problem row or image, with where to find it.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// 1-based line in the CSV (0 for image-level problems).
    pub line: u64,
    pub image_id: String,
    pub reason: String,
}

/// Outcome of a filter run.
#[derive(Debug, Default, Clone)]
pub struct FilterReport {
    pub kept: Vec<Subject>,
    pub drops: BTreeMap<Rule, u64>,
    pub problems: Vec<Problem>,
    pub boxes_seen: u64,
    pub images_seen: u64,
    /// ImageIDs that appeared again after another id (the file is not sorted; grouping is then per run).
    pub unsorted_ids: u64,
    /// Boxes whose MID is not in the class descriptions (dropped under [`Rule::UnknownClass`]; each
    /// MID is one [`Problem`]).
    pub unknown_classes: u64,
}

impl FilterReport {
    fn drop(&mut self, rule: Rule) {
        *self.drops.entry(rule).or_insert(0) += 1;
    }
    pub fn dropped(&self, rule: Rule) -> u64 {
        self.drops.get(&rule).copied().unwrap_or(0)
    }
}

/// Reads `class-descriptions-boxable.csv` (no header: `MID,DisplayName`). A malformed line is an
/// error naming it (a class list with holes would silently drop every box of the missing classes).
pub fn read_class_descriptions(path: &Path) -> Result<HashMap<String, String>> {
    let mut lines = CsvLines::open(path)?;
    let mut out = HashMap::new();
    while let Some((line, rec)) = lines.next_record() {
        let rec = rec.map_err(|reason| csv_err(path, format!("line {line}: {reason}")))?;
        match (rec.get(0), rec.get(1)) {
            (Some(mid), Some(name)) => {
                out.insert(mid.trim().to_string(), name.trim().to_string());
            }
            _ => {
                return Err(csv_err(
                    path,
                    format!("line {line}: expected MID,DisplayName"),
                ))
            }
        }
    }
    Ok(out)
}

/// A CSV file read one line per record (OpenImages fields never contain line breaks): a broken line
/// (an unterminated quote, invalid UTF-8) is an error of that line alone, with its number, instead
/// of a quoted field that swallows every line after it. Empty lines are skipped.
struct CsvLines {
    reader: std::io::BufReader<std::fs::File>,
    path: PathBuf,
    line: u64,
    buf: Vec<u8>,
    /// An I/O error ended the file early (reported once, as a record error).
    failed: bool,
}

impl CsvLines {
    fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| DataError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Ok(CsvLines {
            reader: std::io::BufReader::with_capacity(1 << 20, f),
            path: path.to_path_buf(),
            line: 0,
            buf: Vec::new(),
            failed: false,
        })
    }

    /// The header line (the first non-empty line; a UTF-8 BOM is dropped).
    fn header(&mut self) -> Result<csv::StringRecord> {
        match self.next_record() {
            Some((_, Ok(h))) => Ok(h),
            Some((line, Err(reason))) => Err(csv_err(&self.path, format!("line {line}: {reason}"))),
            None => Err(csv_err(&self.path, "empty file (no header line)")),
        }
    }

    /// The next record with its 1-based line number; `None` at the end of the file.
    fn next_record(&mut self) -> Option<(u64, std::result::Result<csv::StringRecord, String>)> {
        use std::io::BufRead;
        loop {
            if self.failed {
                return None;
            }
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    self.failed = true;
                    return Some((self.line + 1, Err(format!("reading: {e}"))));
                }
            }
            self.line += 1;
            let mut bytes = self.buf.as_slice();
            if self.line == 1 {
                bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
            }
            while let Some(b) = bytes
                .strip_suffix(b"\n")
                .or_else(|| bytes.strip_suffix(b"\r"))
            {
                bytes = b;
            }
            if bytes.is_empty() {
                continue;
            }
            return Some((self.line, parse_line(bytes)));
        }
    }
}

/// One CSV line as a record: plain comma splitting when it has no quotes (every OpenImages row), the
/// `csv` parser otherwise, after checking that every quote is closed.
fn parse_line(bytes: &[u8]) -> std::result::Result<csv::StringRecord, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not valid UTF-8 ({e})"))?;
    if !text.contains('"') {
        return Ok(csv::StringRecord::from(text.split(',').collect::<Vec<_>>()));
    }
    // Quotes are doubled inside quoted fields, so a line whose quotes are all closed has an even count.
    if text.bytes().filter(|&b| b == b'"').count() % 2 == 1 {
        return Err("unterminated quote (a quoted field is not closed on its line)".into());
    }
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut rec = csv::StringRecord::new();
    match r.read_record(&mut rec) {
        Ok(true) => Ok(rec),
        Ok(false) => Ok(csv::StringRecord::new()),
        Err(e) => Err(e.to_string()),
    }
}

fn csv_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Csv {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Source of image pixel sizes for the aspect rule.
pub trait SizeSource {
    /// `(width, height)` of an image, or a reason it is unavailable.
    fn size(&mut self, image_id: &str) -> std::result::Result<(u32, u32), String>;
}

/// Reads sizes from `<dir>/<ImageID>.jpg` headers.
pub struct ImageDirSizes {
    pub dir: PathBuf,
    pub use_exif_orientation: bool,
    pub limits: crate::ReadLimits,
}

impl SizeSource for ImageDirSizes {
    fn size(&mut self, image_id: &str) -> std::result::Result<(u32, u32), String> {
        let p = self.dir.join(format!("{image_id}.jpg"));
        let s = crate::imageio::read_header_size(&p, image_id, &self.limits)
            .map_err(|e| e.to_string())?;
        Ok(if self.use_exif_orientation {
            s.display()
        } else {
            (s.width, s.height)
        })
    }
}

impl<F: FnMut(&str) -> std::result::Result<(u32, u32), String>> SizeSource for F {
    fn size(&mut self, image_id: &str) -> std::result::Result<(u32, u32), String> {
        self(image_id)
    }
}

#[derive(Debug, Clone)]
struct BoxRow {
    line: u64,
    mid: String,
    x_min: f64,
    x_max: f64,
    y_min: f64,
    y_max: f64,
    group_of: bool,
    inside: bool,
    depiction: bool,
    truncated: bool,
}

struct Columns {
    image_id: usize,
    label: usize,
    coords: [usize; 4],
    group_of: usize,
    inside: usize,
    depiction: usize,
    truncated: usize,
}

fn column(headers: &csv::StringRecord, name: &str, path: &Path) -> Result<usize> {
    headers
        .iter()
        .position(|h| h.trim() == name)
        .ok_or_else(|| DataError::Csv {
            path: path.to_path_buf(),
            reason: format!(
                "missing column {name} (header: {})",
                headers.iter().collect::<Vec<_>>().join(",")
            ),
        })
}

/// Streams human-verified image labels (`ImageID,Source,LabelName,Confidence`, sorted by ImageID).
struct LabelCursor {
    records: CsvLines,
    cols: (usize, usize, usize),
    pending: Option<csv::StringRecord>,
}

impl LabelCursor {
    fn open(path: &Path) -> Result<Self> {
        let mut records = CsvLines::open(path)?;
        let h = records.header()?;
        let cols = (
            column(&h, "ImageID", path)?,
            column(&h, "LabelName", path)?,
            column(&h, "Confidence", path)?,
        );
        Ok(LabelCursor {
            records,
            cols,
            pending: None,
        })
    }

    /// Positive labels of `image_id`; rows of smaller ids are skipped. Malformed rows are counted.
    fn positives(&mut self, image_id: &str, malformed: &mut u64) -> HashSet<String> {
        let mut out = HashSet::new();
        loop {
            let rec = match self.pending.take() {
                Some(r) => r,
                None => match self.records.next_record() {
                    None => return out,
                    Some((_, Ok(r))) => r,
                    Some((line, Err(e))) => {
                        *malformed += 1;
                        tracing::warn!(
                            path = %self.records.path.display(),
                            "label row at line {line}: {e}"
                        );
                        continue;
                    }
                },
            };
            let id = rec.get(self.cols.0).unwrap_or("");
            match id.cmp(image_id) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Greater => {
                    self.pending = Some(rec);
                    return out;
                }
                std::cmp::Ordering::Equal => {
                    if rec.get(self.cols.2).map(str::trim) == Some("1") {
                        if let Some(l) = rec.get(self.cols.1) {
                            out.insert(l.trim().to_string());
                        }
                    }
                }
            }
        }
    }
}

/// Inputs of [`filter_openimages`].
pub struct FilterInputs<'a> {
    pub boxes_csv: &'a Path,
    pub class_descriptions_csv: &'a Path,
    /// Optional human-verified image labels file.
    pub image_labels_csv: Option<&'a Path>,
}

/// Runs the filter (see the module docs). Only a missing column or an unreadable file aborts the run.
pub fn filter_openimages(
    inputs: &FilterInputs,
    cfg: &FilterConfig,
    sizes: &mut dyn SizeSource,
) -> Result<FilterReport> {
    let classes = read_class_descriptions(inputs.class_descriptions_csv)?;
    let path = inputs.boxes_csv;
    let mut r = CsvLines::open(path)?;
    let h = r.header()?;
    let cols = Columns {
        image_id: column(&h, "ImageID", path)?,
        label: column(&h, "LabelName", path)?,
        coords: [
            column(&h, "XMin", path)?,
            column(&h, "XMax", path)?,
            column(&h, "YMin", path)?,
            column(&h, "YMax", path)?,
        ],
        group_of: column(&h, "IsGroupOf", path)?,
        inside: column(&h, "IsInside", path)?,
        depiction: column(&h, "IsDepiction", path)?,
        truncated: column(&h, "IsTruncated", path)?,
    };
    let mut labels = inputs.image_labels_csv.map(LabelCursor::open).transpose()?;
    let mut label_malformed = 0u64;
    let human: HashSet<&str> = cfg.human_mids.iter().map(String::as_str).collect();
    let cluttered: HashSet<&str> = cfg.cluttered_mids.iter().map(String::as_str).collect();
    let human_labels: HashSet<&str> = cfg.human_label_mids.iter().map(String::as_str).collect();
    let mut report = FilterReport::default();
    let mut seen_ids: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut group: Vec<BoxRow> = Vec::new();
    let mut unknown: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut rec = csv::StringRecord::new();
    let mut line;
    loop {
        let more = match r.next_record() {
            None => {
                line = r.line;
                false
            }
            Some((l, Ok(next))) => {
                line = l;
                rec = next;
                true
            }
            Some((l, Err(reason))) => {
                report.boxes_seen += 1;
                report.drop(Rule::Malformed);
                report.problems.push(Problem {
                    line: l,
                    image_id: String::new(),
                    reason,
                });
                continue;
            }
        };
        let id = if more {
            rec.get(cols.image_id).unwrap_or("").trim().to_string()
        } else {
            String::new()
        };
        if !more || current.as_deref() != Some(id.as_str()) {
            if let Some(img) = current.take() {
                let pos = labels
                    .as_mut()
                    .map(|l| l.positives(&img, &mut label_malformed));
                finish_image(
                    &img,
                    std::mem::take(&mut group),
                    pos,
                    cfg,
                    &classes,
                    &human,
                    &cluttered,
                    &human_labels,
                    sizes,
                    &mut unknown,
                    &mut report,
                );
            }
            if !more {
                break;
            }
            if !seen_ids.insert(id.clone()) {
                report.unsorted_ids += 1;
            }
            report.images_seen += 1;
            current = Some(id.clone());
        }
        report.boxes_seen += 1;
        match parse_row(&rec, &cols, line) {
            Ok(b) => group.push(b),
            Err(reason) => {
                report.drop(Rule::Malformed);
                report.problems.push(Problem {
                    line,
                    image_id: id,
                    reason,
                });
            }
        }
    }
    for (mid, (n, first)) in unknown {
        report.problems.push(Problem {
            line: first,
            image_id: String::new(),
            reason: format!(
                "class {mid} is not in {}: {n} box{} dropped (first on line {first})",
                inputs.class_descriptions_csv.display(),
                if n == 1 { "" } else { "es" }
            ),
        });
    }
    if label_malformed > 0 {
        report.problems.push(Problem {
            line: 0,
            image_id: String::new(),
            reason: format!("{label_malformed} malformed rows in the image-labels file"),
        });
    }
    Ok(report)
}

fn parse_row(
    rec: &csv::StringRecord,
    c: &Columns,
    line: u64,
) -> std::result::Result<BoxRow, String> {
    let get = |i: usize, name: &str| {
        rec.get(i)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(format!("missing {name}"))
    };
    let num = |i: usize, name: &str| -> std::result::Result<f64, String> {
        let s = get(i, name)?;
        s.parse::<f64>()
            .map_err(|_| format!("{name} = {s:?} is not a number"))
    };
    let flag = |i: usize, name: &str| -> std::result::Result<bool, String> {
        match get(i, name)? {
            "1" => Ok(true),
            "0" | "-1" => Ok(false),
            s => Err(format!("{name} = {s:?} is not 1, 0 or -1")),
        }
    };
    let mid = get(c.label, "LabelName")?.to_string();
    let [x_min, x_max, y_min, y_max] = [
        num(c.coords[0], "XMin")?,
        num(c.coords[1], "XMax")?,
        num(c.coords[2], "YMin")?,
        num(c.coords[3], "YMax")?,
    ];
    let in01 = |v: f64| (0.0..=1.0).contains(&v);
    if !(in01(x_min) && in01(x_max) && in01(y_min) && in01(y_max))
        || x_max <= x_min
        || y_max <= y_min
    {
        return Err(format!(
            "box [{x_min}, {x_max}] x [{y_min}, {y_max}] is not inside [0,1]² with min < max"
        ));
    }
    Ok(BoxRow {
        line,
        mid,
        x_min,
        x_max,
        y_min,
        y_max,
        group_of: flag(c.group_of, "IsGroupOf")?,
        inside: flag(c.inside, "IsInside")?,
        depiction: flag(c.depiction, "IsDepiction")?,
        truncated: flag(c.truncated, "IsTruncated")?,
    })
}

#[allow(clippy::too_many_arguments)]
fn finish_image(
    image_id: &str,
    boxes: Vec<BoxRow>,
    positives: Option<HashSet<String>>,
    cfg: &FilterConfig,
    classes: &HashMap<String, String>,
    human: &HashSet<&str>,
    cluttered: &HashSet<&str>,
    human_labels: &HashSet<&str>,
    sizes: &mut dyn SizeSource,
    unknown: &mut BTreeMap<String, (u64, u64)>,
    report: &mut FilterReport,
) {
    let mut per_class: HashMap<&str, usize> = HashMap::new();
    for b in &boxes {
        *per_class.entry(b.mid.as_str()).or_insert(0) += 1;
    }
    let has_human_label =
        positives.is_some_and(|p| p.iter().any(|l| human_labels.contains(l.as_str())));
    let mut size: Option<std::result::Result<(u32, u32), String>> = None;
    let mut kept: Vec<Subject> = Vec::new();
    for b in &boxes {
        let area = (b.x_max - b.x_min) * (b.y_max - b.y_min);
        let rule = if !classes.contains_key(&b.mid) {
            report.unknown_classes += 1;
            let e = unknown.entry(b.mid.clone()).or_insert((0, b.line));
            e.0 += 1;
            Some(Rule::UnknownClass)
        } else if cfg.drop_group_of && b.group_of {
            Some(Rule::GroupOf)
        } else if cfg.single_instance && per_class[b.mid.as_str()] > 1 {
            Some(Rule::MultipleInstances)
        } else if cfg.drop_inside && b.inside {
            Some(Rule::Inside)
        } else if cfg.drop_depiction && b.depiction {
            Some(Rule::Depiction)
        } else if cfg.drop_truncated && b.truncated {
            Some(Rule::Truncated)
        } else if human.contains(b.mid.as_str()) {
            Some(Rule::Human)
        } else if cluttered.contains(b.mid.as_str()) {
            Some(Rule::Cluttered)
        } else if area < cfg.area_min || area > cfg.area_max {
            Some(Rule::Area)
        } else if has_human_label {
            Some(Rule::HumanLabel)
        } else {
            None
        };
        if let Some(rule) = rule {
            report.drop(rule);
            continue;
        }
        let s = size.get_or_insert_with(|| sizes.size(image_id));
        let (w, h) = match s {
            Ok(wh) => *wh,
            Err(reason) => {
                report.drop(Rule::ImageUnreadable);
                report.problems.push(Problem {
                    line: b.line,
                    image_id: image_id.to_string(),
                    reason: reason.clone(),
                });
                continue;
            }
        };
        let bw = (b.x_max - b.x_min) * f64::from(w);
        let bh = (b.y_max - b.y_min) * f64::from(h);
        if (bw / bh).max(bh / bw) > cfg.max_aspect {
            report.drop(Rule::Aspect);
            continue;
        }
        let class_name = classes[&b.mid].clone();
        kept.push(Subject {
            image_id: image_id.to_string(),
            mid: b.mid.clone(),
            class_name,
            x_min: b.x_min,
            x_max: b.x_max,
            y_min: b.y_min,
            y_max: b.y_max,
            width: w,
            height: h,
        });
    }
    if cfg.one_per_image && kept.len() > 1 {
        // Largest area wins; ties keep the earlier row.
        let best = kept.iter().enumerate().fold(
            0,
            |bi, (i, s)| if s.area() > kept[bi].area() { i } else { bi },
        );
        for _ in 1..kept.len() {
            report.drop(Rule::NotLargest);
        }
        let s = kept.swap_remove(best);
        kept = vec![s];
    }
    report.kept.extend(kept);
}

/// Writes kept subjects as CSV (`ImageID,LabelName,ClassName,XMin,XMax,YMin,YMax,Width,Height`).
pub fn write_subjects_csv(path: &Path, subjects: &[Subject]) -> Result<()> {
    let mut w = csv::Writer::from_path(path).map_err(|e| csv_err(path, e))?;
    w.write_record([
        "ImageID",
        "LabelName",
        "ClassName",
        "XMin",
        "XMax",
        "YMin",
        "YMax",
        "Width",
        "Height",
    ])
    .map_err(|e| csv_err(path, e))?;
    for s in subjects {
        w.write_record([
            s.image_id.clone(),
            s.mid.clone(),
            s.class_name.clone(),
            s.x_min.to_string(),
            s.x_max.to_string(),
            s.y_min.to_string(),
            s.y_max.to_string(),
            s.width.to_string(),
            s.height.to_string(),
        ])
        .map_err(|e| csv_err(path, e))?;
    }
    w.flush().map_err(|e| DataError::io(path, e))
}
