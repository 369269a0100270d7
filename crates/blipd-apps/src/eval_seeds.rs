//! DreamBench over several seeds in the paper's layout (`blipd eval --model … --seeds N`): per subject
//! DINO / CLIP-I / CLIP-T as in tables 5 and 6, their average as in table 1, each as mean ± std over
//! the seeds; and a contact sheet of each subject's real photo beside its generated images.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::eval::{read_rgb, EvalError, EvalReport, Scores};

/// A decoded image as the `image` crate's buffer.
fn to_buffer(img: crate::preprocess::RgbImage) -> Option<image::RgbImage> {
    image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data)
}

/// Mean and sample standard deviation (n − 1; 0 for one value).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let m = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (m, 0.0);
    }
    let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
    (m, v.sqrt())
}

/// One metric triple as mean ± std over seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoresSpread {
    pub mean: Scores,
    pub std: Scores,
}

impl ScoresSpread {
    fn of(items: &[Scores]) -> Self {
        let pick = |f: fn(&Scores) -> f64| mean_std(&items.iter().map(f).collect::<Vec<_>>());
        let (d, c, t) = (pick(|s| s.dino), pick(|s| s.clip_i), pick(|s| s.clip_t));
        Self {
            mean: Scores {
                dino: d.0,
                clip_i: c.0,
                clip_t: t.0,
            },
            std: Scores {
                dino: d.1,
                clip_i: c.1,
                clip_t: t.1,
            },
        }
    }

    fn json(&self) -> Value {
        json!({
            "dino": {"mean": self.mean.dino, "std": self.std.dino},
            "clip_i": {"mean": self.mean.clip_i, "std": self.std.clip_i},
            "clip_t": {"mean": self.mean.clip_t, "std": self.std.clip_t},
        })
    }

    fn cells(&self) -> String {
        format!(
            "{:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3}",
            self.mean.dino,
            self.std.dino,
            self.mean.clip_i,
            self.std.clip_i,
            self.mean.clip_t,
            self.std.clip_t
        )
    }
}

/// The evaluation of one generation per seed.
#[derive(Debug, Clone)]
pub struct SeedsReport {
    pub seeds: Vec<u64>,
    /// One report per seed, in `seeds` order.
    pub reports: Vec<EvalReport>,
}

impl SeedsReport {
    /// Subjects scored in every seed's report, in the first report's order.
    pub fn subjects(&self) -> Vec<(String, String)> {
        let Some(first) = self.reports.first() else {
            return Vec::new();
        };
        first
            .subjects
            .iter()
            .filter(|s| {
                self.reports
                    .iter()
                    .all(|r| r.subjects.iter().any(|t| t.subject == s.subject))
            })
            .map(|s| (s.subject.clone(), s.class_name.clone()))
            .collect()
    }

    /// A subject's scores over the seeds (tables 5 / 6).
    pub fn subject(&self, name: &str) -> ScoresSpread {
        let items: Vec<Scores> = self
            .reports
            .iter()
            .filter_map(|r| r.subjects.iter().find(|s| s.subject == name))
            .map(|s| s.scores)
            .collect();
        ScoresSpread::of(&items)
    }

    /// The average over subjects of each seed, then mean ± std over seeds (table 1).
    pub fn average(&self) -> Option<ScoresSpread> {
        let items: Vec<Scores> = self
            .reports
            .iter()
            .map(|r| r.mean_of_subjects)
            .collect::<Option<_>>()?;
        Some(ScoresSpread::of(&items))
    }

    pub fn to_json(&self) -> Value {
        json!({
            "protocol": "DreamBench DINO / CLIP-I / CLIP-T per seed (see each seed's scores.json); \
                         per subject and averaged over subjects, mean ± sample std over the seeds",
            "seeds": self.seeds,
            "subjects": self.subjects().iter().map(|(s, c)| {
                let mut v = self.subject(s).json();
                v["subject"] = json!(s);
                v["class"] = json!(c);
                v
            }).collect::<Vec<_>>(),
            "average": self.average().map(|a| a.json()).unwrap_or(Value::Null),
            "per_seed": self.reports.iter().zip(&self.seeds).map(|(r, seed)| json!({
                "seed": seed,
                "generated": r.generated.display().to_string(),
                "n_images": r.n_images(),
                "mean_of_subjects": r.mean_of_subjects.map(|m| json!({
                    "dino": m.dino, "clip_i": m.clip_i, "clip_t": m.clip_t,
                })),
            })).collect::<Vec<_>>(),
        })
    }

    /// Tables 5 / 6 (one row per subject) and table 1 (the average), mean ± std over the seeds.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "DreamBench over {} seed{} ({}), mean ± std over seeds\n\n",
            self.seeds.len(),
            if self.seeds.len() == 1 { "" } else { "s" },
            self.seeds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        s.push_str("| subject | class | DINO | CLIP-I | CLIP-T |\n|---|---|---:|---:|---:|\n");
        for (name, class) in self.subjects() {
            s.push_str(&format!(
                "| {name} | {class} | {} |\n",
                self.subject(&name).cells()
            ));
        }
        if let Some(a) = self.average() {
            s.push_str(&format!("| **average** | | {} |\n", a.cells()));
        }
        s
    }

    /// The JSON at `path` and the Markdown beside it (`.md`).
    pub fn write(&self, path: &Path) -> Result<PathBuf, EvalError> {
        crate::eval::write_report(path, &self.to_json(), &self.to_markdown())
    }
}

/// A contact sheet of `report`: one row per subject — its first real photo, then up to `per_row`
/// of its generated images (prompt order) — in `cell`-pixel squares, the subject's name above each
/// row. Unreadable images leave their cell grey.
pub fn contact_sheet(
    bench: &crate::eval::DreamBench,
    report: &EvalReport,
    per_row: usize,
    cell: u32,
) -> image::RgbImage {
    let style = blipd_data::font::TextStyle::new(14.0);
    let (gap, label) = (4u32, style.line_height());
    let rows: Vec<(String, Vec<PathBuf>)> = report
        .subjects
        .iter()
        .map(|s| {
            let mut imgs: Vec<&crate::eval::ImageScore> = report
                .images
                .iter()
                .filter(|i| i.subject == s.subject)
                .collect();
            imgs.sort_by_key(|i| (i.prompt_index, i.sample_index));
            let mut paths: Vec<PathBuf> = bench
                .subject(&s.subject)
                .and_then(|b| b.images.first().cloned())
                .into_iter()
                .collect();
            paths.extend(imgs.iter().take(per_row).map(|i| i.path.clone()));
            (s.subject.clone(), paths)
        })
        .collect();
    let cols = rows.iter().map(|(_, p)| p.len()).max().unwrap_or(1).max(1) as u32;
    let row_h = label + cell + gap;
    let mut sheet = image::RgbImage::from_pixel(
        gap + cols * (cell + gap),
        gap + rows.len() as u32 * row_h,
        image::Rgb([255, 255, 255]),
    );
    for (r, (name, paths)) in rows.iter().enumerate() {
        let y = gap + r as u32 * row_h;
        style.draw(
            &mut sheet,
            i64::from(gap),
            i64::from(y),
            name,
            image::Rgb([0, 0, 0]),
        );
        for (c, p) in paths.iter().enumerate() {
            let x = gap + c as u32 * (cell + gap);
            let tile = match read_rgb(p).ok().and_then(to_buffer) {
                Some(img) => {
                    image::imageops::resize(&img, cell, cell, image::imageops::FilterType::Triangle)
                }
                None => image::RgbImage::from_pixel(cell, cell, image::Rgb([128, 128, 128])),
            };
            image::imageops::replace(&mut sheet, &tile, i64::from(x), i64::from(y + label));
        }
    }
    sheet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean_std(&[2.0]), (2.0, 0.0));
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert!(
            (m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12,
            "{m} {s}"
        );
        assert!(mean_std(&[]).0.is_nan());
    }
}
