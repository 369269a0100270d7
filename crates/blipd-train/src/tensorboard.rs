//! TensorBoard event files beside `metrics.jsonl`: `<run_dir>/tensorboard/events.out.tfevents.<time>.<host>.<pid>`,
//! readable by `tensorboard --logdir <run_dir>` (or a folder of runs, for sweeps).
//!
//! The format is TensorFlow's: a TFRecord stream (`u64` length, masked CRC-32C of the length, the
//! bytes, masked CRC-32C of the bytes) of `Event` protocol buffers (`tensorflow/core/util/event.proto`,
//! `summary.proto`), of which we write the fields TensorBoard reads for scalars and images. A resumed
//! run opens a new file that starts with a `SessionLog START` event at the first step it will write:
//! TensorBoard then drops the events of the earlier files from that step on (those written after the
//! checkpoint being resumed), as PyTorch's `SummaryWriter(purge_step=…)` does.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{Result, TrainError};

/// Sub-folder of the run directory holding the event files.
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// `tensorflow.Event` (the fields we use; `file_version` = 3, `summary` = 5 and `session_log` = 7 are
/// members of its oneof `what`; 6 is the deprecated `log_message`).
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    pub session_log: Option<SessionLog>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` (`simple_value` and `image` are a oneof).
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    pub image: Option<SummaryImage>,
}

/// `tensorflow.Summary.Image`: an encoded PNG.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryImage {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// `tensorflow.SessionLog`.
#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    /// 1 = START (TensorBoard purges later steps of earlier files at it).
    #[prost(int32, tag = "1")]
    pub status: i32,
}

const SESSION_START: i32 = 1;

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Appends events to one new event file of a run.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates a new event file in `<run_dir>/tensorboard/`. `first_step` is the first step this
    /// writer will log: above 1 (a resume) the file starts with a `SessionLog START` at it.
    pub fn open(run_dir: &Path, first_step: u64) -> Result<Self> {
        let dir = run_dir.join(TENSORBOARD_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        let time = now();
        let mut n = 0;
        let path = loop {
            let p = dir.join(format!(
                "events.out.tfevents.{}.{}.{}.{n}",
                time as u64,
                hostname(),
                std::process::id()
            ));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let file = File::create(&path).map_err(|e| TrainError::io(&path, e))?;
        let mut w = Self {
            path,
            out: BufWriter::new(file),
        };
        w.write(&Event {
            wall_time: time,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            ..Default::default()
        })?;
        if first_step > 1 {
            w.write(&Event {
                wall_time: time,
                step: first_step as i64,
                session_log: Some(SessionLog {
                    status: SESSION_START,
                }),
                ..Default::default()
            })?;
        }
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let path = &self.path;
        (|| {
            self.out.write_all(&len)?;
            self.out.write_all(&masked_crc(&len).to_le_bytes())?;
            self.out.write_all(&data)?;
            self.out.write_all(&masked_crc(&data).to_le_bytes())
        })()
        .map_err(|e| TrainError::io(path, e))
    }

    fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| TrainError::io(&self.path, e))
    }

    /// One event with a scalar per `(tag, value)` at `step`, flushed.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue {
                tag: tag.to_string(),
                simple_value: Some(*v as f32),
                image: None,
            })
            .collect();
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            summary: Some(Summary { value }),
            ..Default::default()
        })?;
        self.flush()
    }

    /// A PNG file as an image summary `tag` at `step`, flushed.
    pub fn png(&mut self, step: u64, tag: &str, png: &Path) -> Result<()> {
        let bytes = std::fs::read(png).map_err(|e| TrainError::io(png, e))?;
        let img =
            image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).map_err(|e| {
                TrainError::TensorBoard {
                    path: png.to_path_buf(),
                    reason: format!("not a PNG: {e}"),
                }
            })?;
        let colorspace = i32::from(img.color().channel_count());
        self.write(&Event {
            wall_time: now(),
            step: step as i64,
            summary: Some(Summary {
                value: vec![SummaryValue {
                    tag: tag.to_string(),
                    simple_value: None,
                    image: Some(SummaryImage {
                        height: img.height() as i32,
                        width: img.width() as i32,
                        colorspace,
                        encoded_image_string: bytes,
                    }),
                }],
            }),
            ..Default::default()
        })?;
        self.flush()
    }
}

/// Every event of one event file, checking both checksums of each record; a torn last record (a
/// killed writer) ends the list.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| TrainError::io(path, e))?;
    let bad = |at: usize, what: &str| TrainError::TensorBoard {
        path: path.to_path_buf(),
        reason: format!("event record at byte {at}: {what}"),
    };
    let mut events = Vec::new();
    let mut at = 0;
    while at + 12 <= bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        if masked_crc(len_bytes) != crc {
            return Err(bad(at, "length checksum mismatch"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let start = at + 12;
        let Some(end) = start.checked_add(len).filter(|e| e + 4 <= bytes.len()) else {
            break;
        };
        let data = &bytes[start..end];
        let crc = u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes"));
        if masked_crc(data) != crc {
            return Err(bad(at, "data checksum mismatch"));
        }
        events.push(Event::decode(data).map_err(|e| bad(at, &format!("not an Event: {e}")))?);
        at = end + 4;
    }
    Ok(events)
}

/// The event files of a run, oldest first.
pub fn event_files(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = run_dir.join(TENSORBOARD_DIR);
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| TrainError::io(&dir, e))? {
        let entry = entry.map_err(|e| TrainError::io(&dir, e))?;
        let name = entry.file_name();
        if name.to_string_lossy().contains("tfevents") {
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .map_err(|e| TrainError::io(entry.path(), e))?;
            files.push((modified, entry.path()));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// `(step, value)` of one scalar tag over a run's event files as TensorBoard shows it: a
/// `SessionLog START` at step `s` drops the earlier files' points from `s` on.
pub fn read_scalars(run_dir: &Path, tag: &str) -> Result<Vec<(u64, f32)>> {
    let mut out: Vec<(u64, f32)> = Vec::new();
    for file in event_files(run_dir)? {
        for e in read_events(&file)? {
            if e.session_log
                .as_ref()
                .is_some_and(|s| s.status == SESSION_START)
            {
                out.retain(|(s, _)| (*s as i64) < e.step);
            }
            for v in e.summary.iter().flat_map(|s| &s.value) {
                if v.tag == tag {
                    if let Some(x) = v.simple_value {
                        out.push((e.step as u64, x));
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // tf.compat.v1.io / tensorboard's masked_crc32c of b"" and of the 8-byte length 0.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b""), 0xa282_ead8);
    }

    #[test]
    fn scalars_and_images_round_trip_and_a_resume_purges() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let mut w = EventWriter::open(run, 1).unwrap();
        for step in 1..=4 {
            w.scalars(
                step,
                &[("train/loss", 1.0 / step as f64), ("train/lr", 1e-3)],
            )
            .unwrap();
        }
        let png = run.join("sheet.png");
        image::RgbImage::from_pixel(5, 3, image::Rgb([10, 20, 30]))
            .save(&png)
            .unwrap();
        w.png(4, "samples/sheet", &png).unwrap();
        let first = w.path().to_path_buf();
        drop(w);

        let events = read_events(&first).unwrap();
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let img = events
            .iter()
            .flat_map(|e| e.summary.iter().flat_map(|s| &s.value))
            .find_map(|v| v.image.clone())
            .unwrap();
        assert_eq!((img.width, img.height, img.colorspace), (5, 3, 3));
        assert_eq!(img.encoded_image_string, std::fs::read(&png).unwrap());

        // Resumed from the checkpoint of step 2: steps 3.. are written again.
        let mut w = EventWriter::open(run, 3).unwrap();
        w.scalars(3, &[("train/loss", 7.0)]).unwrap();
        drop(w);
        let loss = read_scalars(run, "train/loss").unwrap();
        assert_eq!(loss, vec![(1, 1.0), (2, 0.5), (3, 7.0)]);

        // A torn last record (killed writer) is ignored; a flipped byte is an error.
        let mut bytes = std::fs::read(&first).unwrap();
        let n = bytes.len();
        std::fs::write(&first, &bytes[..n - 3]).unwrap();
        assert_eq!(read_events(&first).unwrap().len(), events.len() - 1);
        bytes[20] ^= 1;
        std::fs::write(&first, &bytes).unwrap();
        let err = read_events(&first).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
    }
}
