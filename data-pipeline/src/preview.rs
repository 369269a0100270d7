//! A contact sheet of input/target pairs from shards (`blipd data preview`): each row the input and
//! the target scaled into `cell`×`cell` boxes side by side, then the class name (and ImageID, where
//! it fits) and the caption (wrapped, at most 4 lines) in DejaVu Sans ([`crate::font`]).

use std::path::Path;

use crate::error::{DataError, Result};
use crate::font::TextStyle;
use crate::imageio::{decode_image, ReadLimits};
use crate::shards::{Manifest, PairRecord, ShardReader};

/// The first `n` pairs of the dataset in `shards` (in shard order).
pub fn first_pairs(shards: &Path, n: usize) -> Result<Vec<PairRecord>> {
    let m = Manifest::load(shards)?.ok_or_else(|| DataError::Shard {
        path: shards.to_path_buf(),
        reason: "no manifest.json (not a shard folder, or the run has not finished)".into(),
    })?;
    let mut entries = m.shards.clone();
    entries.sort_by_key(|e| e.index);
    let mut recs = Vec::new();
    for e in &entries {
        let r = ShardReader::open(&shards.join(&e.file))?;
        for g in 0..r.num_row_groups() {
            for rec in r.read_group(g)? {
                recs.push(rec);
                if recs.len() >= n {
                    return Ok(recs);
                }
            }
        }
    }
    if recs.is_empty() {
        return Err(DataError::Shard {
            path: shards.to_path_buf(),
            reason: "holds no pairs".into(),
        });
    }
    Ok(recs)
}

/// The contact sheet of `recs` with `cell`-pixel image boxes.
pub fn preview_grid(recs: &[PairRecord], cell: u32) -> Result<image::RgbImage> {
    let gap = 4u32;
    let style = TextStyle::new(if cell >= 160 { 18.0 } else { 12.0 });
    let line_h = style.line_height();
    let text_w = 2 * cell + gap;
    let labels: Vec<(String, Vec<String>)> = recs
        .iter()
        .map(|rec| {
            // The ImageID only when it fits beside the class name.
            let full = format!("[{}] {}", rec.class_name, rec.image_id);
            let head = if style.width(&full) <= text_w {
                full
            } else {
                style
                    .wrap(&format!("[{}]", rec.class_name), text_w, 1)
                    .concat()
            };
            (head, style.wrap(&rec.caption, text_w, 4))
        })
        .collect();
    let row_h: Vec<u32> = labels
        .iter()
        .map(|(_, c)| cell + gap + (1 + c.len() as u32) * line_h + gap)
        .collect();
    let mut grid = image::RgbImage::from_pixel(
        2 * cell + 3 * gap,
        row_h.iter().sum::<u32>() + gap,
        image::Rgb([255, 255, 255]),
    );
    let limits = ReadLimits::default();
    let mut y0 = gap;
    for (i, rec) in recs.iter().enumerate() {
        for (j, bytes) in [&rec.input_image, &rec.target_image]
            .into_iter()
            .enumerate()
        {
            let img = decode_image(bytes, &rec.image_id, &limits)?.to_rgb8();
            let s = f64::from(cell) / f64::from(img.width().max(img.height()));
            let (w, h) = (
                ((f64::from(img.width()) * s).round() as u32).clamp(1, cell),
                ((f64::from(img.height()) * s).round() as u32).clamp(1, cell),
            );
            let small = image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle);
            let x = gap + j as u32 * (cell + gap) + (cell - w) / 2;
            let y = y0 + (cell - h) / 2;
            image::imageops::replace(&mut grid, &small, i64::from(x), i64::from(y));
        }
        let (head, caption) = &labels[i];
        let tx = i64::from(gap);
        let mut ty = i64::from(y0 + cell + gap);
        style.draw(&mut grid, tx, ty, head, image::Rgb([20, 60, 160]));
        for line in caption {
            ty += i64::from(line_h);
            style.draw(&mut grid, tx, ty, line, image::Rgb([0, 0, 0]));
        }
        y0 += row_h[i];
    }
    Ok(grid)
}
