//! Parquet shards of training pairs and their `manifest.json`.
//!
//! One row per pair (schema [`SCHEMA`]): the subject-on-background input and the original target as encoded
//! image bytes (PNG or JPEG, stored uncompressed since they are already compressed), the class name and MID,
//! the caption and where it came from, the subject box (normalised `x_min, x_max, y_min, y_max`), the image
//! and background ids, the seed, the row's index in the kept-subjects list and a JSON object naming the
//! source of every derived field (`provenance`). Strings are Snappy-compressed. Row groups hold
//! `rows_per_group` rows so a reader can fetch a few pairs without reading a whole shard.
//!
//! Writing is atomic: [`ShardWriter`] writes `<name>.tmp`, fsyncs it, renames it to `<name>` and fsyncs the
//! directory, so a shard is either absent or complete. [`Manifest`] is replaced the same way after each shard.

use crate::error::{DataError, Result};
use parquet::basic::{Compression, Repetition, Type as PhysicalType};
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::RowAccessor;
use parquet::schema::types::{ColumnPath, Type};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Manifest format tag.
pub const MANIFEST_FORMAT: &str = "blipd-pairs-v1";
/// Manifest file name inside a shard directory.
pub const MANIFEST_NAME: &str = "manifest.json";

/// Checks that a config's shards folder (named by `key`, e.g. `[data] shards`) is a `blipd data
/// synth` output folder, by its manifest, without reading the shards; the message names the key.
pub fn require_shard_dir(key: &str, dir: &Path) -> std::result::Result<(), String> {
    if dir.join(MANIFEST_NAME).is_file() {
        return Ok(());
    }
    Err(format!(
        "{key} = {}: no {MANIFEST_NAME} there (is it a `blipd data synth` output folder?)",
        dir.display()
    ))
}

/// Column names and types, in file order.
pub const SCHEMA: [(&str, &str); 17] = [
    ("row", "int64: index in the kept-subjects list"),
    ("image_id", "utf8"),
    ("mid", "utf8: OpenImages LabelName"),
    ("class_name", "utf8: class DisplayName"),
    ("caption", "utf8"),
    ("caption_source", "utf8: captions_file | template"),
    ("box_x_min", "double, normalised"),
    ("box_x_max", "double"),
    ("box_y_min", "double"),
    ("box_y_max", "double"),
    ("width", "int32: pixel width of both images"),
    ("height", "int32"),
    ("background_id", "utf8: background file name"),
    ("seed", "int64"),
    ("input_image", "binary: encoded subject-on-background image"),
    ("target_image", "binary: encoded original image"),
    ("provenance", "utf8: JSON object, one source per field"),
];

/// One training pair as stored in a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct PairRecord {
    pub row: u64,
    pub image_id: String,
    pub mid: String,
    pub class_name: String,
    pub caption: String,
    pub caption_source: String,
    /// `[x_min, x_max, y_min, y_max]`, normalised to `[0, 1]`.
    pub bbox: [f64; 4],
    pub width: u32,
    pub height: u32,
    pub background_id: String,
    pub seed: u64,
    /// Encoded (PNG/JPEG) input image.
    pub input_image: Vec<u8>,
    /// Encoded (PNG/JPEG) target image.
    pub target_image: Vec<u8>,
    /// JSON object: field → source.
    pub provenance: String,
}

fn pq(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Shard {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn schema() -> Arc<Type> {
    let field = |name: &str, t: PhysicalType, utf8: bool| {
        let mut b = Type::primitive_type_builder(name, t).with_repetition(Repetition::REQUIRED);
        if utf8 {
            b = b.with_logical_type(Some(parquet::basic::LogicalType::String));
        }
        Arc::new(b.build().expect("static schema is valid"))
    };
    let fields = SCHEMA
        .iter()
        .map(|(name, ty)| {
            let (t, utf8) = if ty.starts_with("int64") {
                (PhysicalType::INT64, false)
            } else if ty.starts_with("int32") {
                (PhysicalType::INT32, false)
            } else if ty.starts_with("double") {
                (PhysicalType::DOUBLE, false)
            } else if ty.starts_with("binary") {
                (PhysicalType::BYTE_ARRAY, false)
            } else {
                (PhysicalType::BYTE_ARRAY, true)
            };
            field(name, t, utf8)
        })
        .collect();
    Arc::new(
        Type::group_type_builder("blipd_pair")
            .with_fields(fields)
            .build()
            .expect("static schema is valid"),
    )
}

fn properties(rows_per_group: usize) -> Arc<WriterProperties> {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(rows_per_group.max(1)))
        .set_created_by(format!("blipd-data {}", env!("CARGO_PKG_VERSION")));
    for col in ["input_image", "target_image"] {
        let c = ColumnPath::from(col);
        b = b
            .set_column_compression(c.clone(), Compression::UNCOMPRESSED)
            .set_column_dictionary_enabled(c.clone(), false)
            .set_column_statistics_enabled(c, EnabledStatistics::None);
    }
    Arc::new(b.build())
}

/// Writes one shard atomically (see the module docs). Rows are buffered per row group.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    writer: Option<SerializedFileWriter<BufWriter<File>>>,
    pending: Vec<PairRecord>,
    rows_per_group: usize,
    rows: u64,
}

impl ShardWriter {
    /// Starts `<path>.tmp` (an existing temp file of a killed run is replaced).
    pub fn create(path: &Path, rows_per_group: usize) -> Result<Self> {
        let tmp = tmp_path(path);
        let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        let writer =
            SerializedFileWriter::new(BufWriter::new(file), schema(), properties(rows_per_group))
                .map_err(|e| pq(&tmp, e))?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            writer: Some(writer),
            pending: Vec::new(),
            rows_per_group: rows_per_group.max(1),
            rows: 0,
        })
    }

    /// Appends a row.
    pub fn push(&mut self, rec: PairRecord) -> Result<()> {
        self.pending.push(rec);
        if self.pending.len() >= self.rows_per_group {
            self.flush_group()?;
        }
        Ok(())
    }

    fn flush_group(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let recs = std::mem::take(&mut self.pending);
        let tmp = self.tmp.clone();
        let writer = self.writer.as_mut().expect("writer open until finish");
        let mut rg = writer.next_row_group().map_err(|e| pq(&tmp, e))?;
        let mut col = 0usize;
        while let Some(mut cw) = rg.next_column().map_err(|e| pq(&tmp, e))? {
            let name = SCHEMA[col].0;
            let strs = |f: &dyn Fn(&PairRecord) -> &[u8]| -> Vec<ByteArray> {
                recs.iter()
                    .map(|r| ByteArray::from(f(r).to_vec()))
                    .collect()
            };
            let res = match name {
                "row" => cw.typed::<Int64Type>().write_batch(
                    &recs.iter().map(|r| r.row as i64).collect::<Vec<_>>(),
                    None,
                    None,
                ),
                "seed" => cw.typed::<Int64Type>().write_batch(
                    &recs.iter().map(|r| r.seed as i64).collect::<Vec<_>>(),
                    None,
                    None,
                ),
                "width" | "height" => cw.typed::<Int32Type>().write_batch(
                    &recs
                        .iter()
                        .map(|r| if name == "width" { r.width } else { r.height } as i32)
                        .collect::<Vec<_>>(),
                    None,
                    None,
                ),
                "box_x_min" | "box_x_max" | "box_y_min" | "box_y_max" => {
                    let k = col - 6;
                    cw.typed::<DoubleType>().write_batch(
                        &recs.iter().map(|r| r.bbox[k]).collect::<Vec<_>>(),
                        None,
                        None,
                    )
                }
                "image_id" => cw.typed::<ByteArrayType>().write_batch(
                    &strs(&|r| r.image_id.as_bytes()),
                    None,
                    None,
                ),
                "mid" => cw.typed::<ByteArrayType>().write_batch(
                    &strs(&|r| r.mid.as_bytes()),
                    None,
                    None,
                ),
                "class_name" => cw.typed::<ByteArrayType>().write_batch(
                    &strs(&|r| r.class_name.as_bytes()),
                    None,
                    None,
                ),
                "caption" => cw.typed::<ByteArrayType>().write_batch(
                    &strs(&|r| r.caption.as_bytes()),
                    None,
                    None,
                ),
                "caption_source" => cw.typed::<ByteArrayType>().write_batch(
                    &strs(&|r| r.caption_source.as_bytes()),
                    None,
                    None,
                ),
                "background_id" => cw.typed::<ByteArrayType>().write_batch(
                    &strs(&|r| r.background_id.as_bytes()),
                    None,
                    None,
                ),
                "input_image" => {
                    cw.typed::<ByteArrayType>()
                        .write_batch(&strs(&|r| &r.input_image), None, None)
                }
                "target_image" => {
                    cw.typed::<ByteArrayType>()
                        .write_batch(&strs(&|r| &r.target_image), None, None)
                }
                "provenance" => cw.typed::<ByteArrayType>().write_batch(
                    &strs(&|r| r.provenance.as_bytes()),
                    None,
                    None,
                ),
                other => unreachable!("column {other} not in SCHEMA"),
            };
            res.map_err(|e| pq(&tmp, format!("column {name}: {e}")))?;
            cw.close().map_err(|e| pq(&tmp, e))?;
            col += 1;
        }
        rg.close().map_err(|e| pq(&tmp, e))?;
        self.rows += recs.len() as u64;
        Ok(())
    }

    /// Flushes, fsyncs, renames the temp file into place and fsyncs the directory. Returns the row count.
    pub fn finish(mut self) -> Result<u64> {
        self.flush_group()?;
        let writer = self.writer.take().expect("writer open until finish");
        let buf = writer.into_inner().map_err(|e| pq(&self.tmp, e))?;
        let file = buf
            .into_inner()
            .map_err(|e| DataError::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| DataError::io(&self.tmp, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| DataError::io(&self.path, e))?;
        sync_dir(&self.path)?;
        Ok(self.rows)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // An abandoned writer (error mid-shard) leaves no temp file behind.
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `<path>.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".tmp");
    PathBuf::from(s)
}

/// fsyncs the directory holding `path` (makes a rename durable).
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let d = File::open(dir).map_err(|e| DataError::io(dir, e))?;
    d.sync_all().map_err(|e| DataError::io(dir, e))
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, directory fsync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| DataError::io(&tmp, e))?;
        f.sync_all().map_err(|e| DataError::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))?;
    sync_dir(path)
}

/// Lower-case hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Lower-case hex SHA-256 of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An input that produced no pair, with where to find it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BadInput {
    /// Index in the kept-subjects list (data rows, 0-based).
    pub row: u64,
    /// ImageID, or `line N` when the CSV row has none.
    pub image_id: String,
    /// Stage that rejected it: `csv`, `image`, `mask`, `trimap`, `matting`, `foreground`, `background`,
    /// `encode`.
    pub stage: String,
    pub reason: String,
}

/// One completed shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub index: u64,
    pub file: String,
    /// First row of the kept-subjects list this shard covers.
    pub first_row: u64,
    /// Rows of the list it covers (pairs + bad inputs).
    pub slice_rows: u64,
    /// Pairs written.
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
    /// Row-group sizes in order (what a reader needs to locate a row without opening the file).
    pub row_groups: Vec<u64>,
    pub bad: Vec<BadInput>,
}

/// `manifest.json` of a shard directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// SHA-256 of everything that determines the output (config, subjects file, background list).
    pub fingerprint: String,
    /// Rows of the kept-subjects list.
    pub subjects: u64,
    pub rows_per_shard: u64,
    pub shards_total: u64,
    pub columns: Vec<String>,
    /// Completed shards, by index.
    pub shards: Vec<ShardEntry>,
}

impl Manifest {
    pub fn new(fingerprint: String, subjects: u64, rows_per_shard: u64) -> Self {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            fingerprint,
            subjects,
            rows_per_shard,
            shards_total: subjects.div_ceil(rows_per_shard.max(1)),
            columns: SCHEMA.iter().map(|(n, _)| n.to_string()).collect(),
            shards: Vec::new(),
        }
    }

    /// Reads `dir/manifest.json`; `Ok(None)` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        Self::load_file(&dir.join(MANIFEST_NAME))
    }

    /// Reads a manifest file (`manifest.json` or a part's); `Ok(None)` when there is none.
    pub fn load_file(path: &Path) -> Result<Option<Self>> {
        let path = path.to_path_buf();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DataError::io(&path, e)),
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| pq(&path, e))?;
        if m.format != MANIFEST_FORMAT {
            return Err(pq(
                &path,
                format!("format {:?}, expected {MANIFEST_FORMAT:?}", m.format),
            ));
        }
        Ok(Some(m))
    }

    /// Writes `dir/manifest.json` atomically, shards sorted by index.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_file(&dir.join(MANIFEST_NAME))
    }

    /// Writes a manifest file atomically, shards sorted by index.
    pub fn save_file(&self, path: &Path) -> Result<()> {
        let mut m = self.clone();
        m.shards.sort_by_key(|s| s.index);
        let mut text = serde_json::to_string_pretty(&m).expect("manifest serialises");
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }

    /// Shard indices of `part` (all of them without one) that are not complete yet.
    pub fn missing(&self, part: Option<Part>) -> Vec<u64> {
        let done: std::collections::HashSet<u64> = self.shards.iter().map(|e| e.index).collect();
        (0..self.shards_total)
            .filter(|k| part.is_none_or(|p| p.owns(*k)) && !done.contains(k))
            .collect()
    }

    /// Pairs in completed shards.
    pub fn rows(&self) -> u64 {
        self.shards.iter().map(|s| s.rows).sum()
    }

    /// Bad inputs of completed shards, in row order.
    pub fn bad(&self) -> Vec<BadInput> {
        let mut v: Vec<BadInput> = self.shards.iter().flat_map(|s| s.bad.clone()).collect();
        v.sort_by_key(|b| b.row);
        v
    }

    /// True when every shard is complete.
    pub fn is_complete(&self) -> bool {
        self.shards.len() as u64 == self.shards_total
    }
}

/// One part of a synthesis split across machines (`blipd data synth --shard I/N`): the shards whose
/// index `k` has `k mod N = I`. Shard `k` always covers the same rows and is made from them alone, so
/// the parts' files are the single run's files; each part records its shards in its own manifest
/// ([`Part::manifest_name`]) and [`merge_parts`] joins them into `manifest.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub index: u64,
    pub count: u64,
}

impl Part {
    /// `"I/N"` with `I < N`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            DataError::Config(format!(
                "--shard {s:?}: expected I/N with 0 ≤ I < N, e.g. 3/16"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u64 = i.trim().parse().map_err(|_| bad())?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }

    /// The part a job array gives this process: `SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN` of
    /// `SLURM_ARRAY_TASK_COUNT`, else torchrun's `RANK` of `WORLD_SIZE`; `None` when neither is set
    /// (or the world is one process).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<u64>> {
            match var(k) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    DataError::Config(format!("environment variable {k}={v:?} is not a number"))
                }),
            }
        };
        let (index, count) = match (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
            (Some(id), Some(n)) => (id - num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0).min(id), n),
            _ => match (num("RANK")?, num("WORLD_SIZE")?) {
                (Some(r), Some(w)) => (r, w),
                _ => return Ok(None),
            },
        };
        if count <= 1 {
            return Ok(None);
        }
        Self::parse(&format!("{index}/{count}")).map(Some)
    }

    pub fn owns(&self, shard: u64) -> bool {
        shard % self.count == self.index
    }

    /// Whether the row of `image_id` is this part's in a per-image job (`data masks`): FNV-1a of the
    /// ImageID mod N, so every row of one image lands in one part whatever the row order.
    pub fn owns_image(&self, image_id: &str) -> bool {
        let h = image_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        h % self.count == self.index
    }

    /// `manifest.part-IIIII-of-NNNNN.json`.
    pub fn manifest_name(&self) -> String {
        format!("manifest.part-{:05}-of-{:05}.json", self.index, self.count)
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Joins the manifests of all `count` parts in `dir` into `manifest.json` (the single run's manifest,
/// byte for byte) once every part is complete. An error names the parts still missing or incomplete,
/// and parts of another configuration (fingerprint).
pub fn merge_parts(dir: &Path, count: u64) -> Result<Manifest> {
    let mut merged: Option<Manifest> = None;
    let mut waiting = Vec::new();
    for index in 0..count {
        let part = Part { index, count };
        let path = dir.join(part.manifest_name());
        let Some(m) = Manifest::load_file(&path)? else {
            waiting.push(format!("{part} (no {})", part.manifest_name()));
            continue;
        };
        let missing = m.missing(Some(part));
        if !missing.is_empty() {
            waiting.push(format!("{part} ({} shard(s) to go)", missing.len()));
        }
        match &mut merged {
            None => merged = Some(m),
            Some(all) => {
                if all.fingerprint != m.fingerprint
                    || all.subjects != m.subjects
                    || all.rows_per_shard != m.rows_per_shard
                {
                    return Err(DataError::Config(format!(
                        "{}: part {part} is of another configuration or input (fingerprint {} ≠ {})",
                        dir.display(),
                        m.fingerprint,
                        all.fingerprint
                    )));
                }
                all.shards.extend(m.shards);
            }
        }
    }
    if !waiting.is_empty() {
        return Err(DataError::Config(format!(
            "{}: not every part of {count} is complete: {}",
            dir.display(),
            waiting.join(", ")
        )));
    }
    let m = merged.ok_or_else(|| DataError::Config("no parts to merge".into()))?;
    m.save(dir)?;
    Ok(m)
}

/// Reads a shard's row groups on demand.
pub struct ShardReader {
    path: PathBuf,
    reader: SerializedFileReader<File>,
}

impl ShardReader {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| DataError::io(path, e))?;
        let reader = SerializedFileReader::new(f).map_err(|e| pq(path, e))?;
        let cols: Vec<String> = reader
            .metadata()
            .file_metadata()
            .schema_descr()
            .columns()
            .iter()
            .map(|c| c.name().to_string())
            .collect();
        let expected: Vec<&str> = SCHEMA.iter().map(|(n, _)| *n).collect();
        if cols != expected {
            return Err(pq(path, format!("columns {cols:?}, expected {expected:?}")));
        }
        Ok(ShardReader {
            path: path.to_path_buf(),
            reader,
        })
    }

    pub fn num_row_groups(&self) -> usize {
        self.reader.num_row_groups()
    }

    /// Rows of each row group.
    pub fn row_group_sizes(&self) -> Vec<u64> {
        self.reader
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows() as u64)
            .collect()
    }

    /// All rows of row group `i`.
    pub fn read_group(&self, i: usize) -> Result<Vec<PairRecord>> {
        let p = &self.path;
        let g = self.reader.get_row_group(i).map_err(|e| pq(p, e))?;
        let iter = g.get_row_iter(None).map_err(|e| pq(p, e))?;
        let mut out = Vec::new();
        for row in iter {
            let r = row.map_err(|e| pq(p, e))?;
            let s = |k: usize| -> Result<String> {
                r.get_string(k)
                    .cloned()
                    .map_err(|e| pq(p, format!("column {}: {e}", SCHEMA[k].0)))
            };
            let b = |k: usize| -> Result<Vec<u8>> {
                r.get_bytes(k)
                    .map(|v| v.data().to_vec())
                    .map_err(|e| pq(p, format!("column {}: {e}", SCHEMA[k].0)))
            };
            let d = |k: usize| -> Result<f64> {
                r.get_double(k)
                    .map_err(|e| pq(p, format!("column {}: {e}", SCHEMA[k].0)))
            };
            let l = |k: usize| -> Result<i64> {
                r.get_long(k)
                    .map_err(|e| pq(p, format!("column {}: {e}", SCHEMA[k].0)))
            };
            let i32_ = |k: usize| -> Result<i32> {
                r.get_int(k)
                    .map_err(|e| pq(p, format!("column {}: {e}", SCHEMA[k].0)))
            };
            out.push(PairRecord {
                row: l(0)? as u64,
                image_id: s(1)?,
                mid: s(2)?,
                class_name: s(3)?,
                caption: s(4)?,
                caption_source: s(5)?,
                bbox: [d(6)?, d(7)?, d(8)?, d(9)?],
                width: i32_(10)? as u32,
                height: i32_(11)? as u32,
                background_id: s(12)?,
                seed: l(13)? as u64,
                input_image: b(14)?,
                target_image: b(15)?,
                provenance: s(16)?,
            });
        }
        Ok(out)
    }

    /// Every row of the shard.
    pub fn read_all(&self) -> Result<Vec<PairRecord>> {
        let mut out = Vec::new();
        for i in 0..self.num_row_groups() {
            out.extend(self.read_group(i)?);
        }
        Ok(out)
    }
}
