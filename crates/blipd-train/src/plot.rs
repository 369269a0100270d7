//! PNG plots of a metric from `metrics.jsonl` (lines drawn by hand; no plotting crate).

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{Result, TrainError};
use crate::metrics::read_series;

/// Options of [`plot_metrics`].
#[derive(Clone, Debug, PartialEq)]
pub struct PlotOptions {
    pub width: u32,
    pub height: u32,
    /// Metric to plot (a key of the JSON lines), `loss` by default.
    pub key: String,
    /// TensorBoard-style smoothing of the bold line (debiased EMA weight, 0 = none).
    pub smoothing: f64,
    /// Logarithmic y axis (non-positive values are dropped).
    pub log_y: bool,
}

impl Default for PlotOptions {
    fn default() -> Self {
        Self {
            width: 900,
            height: 500,
            key: "loss".into(),
            smoothing: 0.9,
            log_y: false,
        }
    }
}

const BG: Rgb<u8> = Rgb([255, 255, 255]);
const AXIS: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const RAW: Rgb<u8> = Rgb([160, 190, 235]);
/// Colour of the smoothed curve.
pub const LINE: Rgb<u8> = Rgb([20, 70, 170]);

const LEFT: u32 = 78;
const RIGHT: u32 = 20;
const TOP: u32 = 16;
const BOTTOM: u32 = 34;
const SCALE: u32 = 2;

/// Plots `key` against `step` from a metrics JSONL file into a PNG; returns the number of
/// points drawn.
pub fn plot_metrics(metrics_jsonl: &Path, png: &Path, opts: &PlotOptions) -> Result<usize> {
    let series = read_series(metrics_jsonl, &opts.key)?;
    let img = render(&series, opts).map_err(|reason| TrainError::Plot {
        path: metrics_jsonl.to_path_buf(),
        reason,
    })?;
    img.save(png).map_err(|e| TrainError::Plot {
        path: png.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(series.len())
}

/// Renders `(x, y)` points (in x order) into an image.
pub fn render(series: &[(f64, f64)], opts: &PlotOptions) -> Result<RgbImage, String> {
    if opts.width < LEFT + RIGHT + 20 || opts.height < TOP + BOTTOM + 20 {
        return Err(format!(
            "plot size {}×{} too small",
            opts.width, opts.height
        ));
    }
    let pts: Vec<(f64, f64)> = series
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!opts.log_y || *y > 0.0))
        .map(|&(x, y)| (x, if opts.log_y { y.log10() } else { y }))
        .collect();
    if pts.is_empty() {
        return Err(format!("no finite `{}` values to plot", opts.key));
    }
    let mut img = RgbImage::from_pixel(opts.width, opts.height, BG);
    let (x0, x1) = range(pts.iter().map(|p| p.0));
    let (y0, y1) = range(pts.iter().map(|p| p.1));
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let pw = (opts.width - LEFT - RIGHT) as f64;
    let ph = (opts.height - TOP - BOTTOM) as f64;
    let to_px = |x: f64, y: f64| -> (f64, f64) {
        (
            LEFT as f64 + (x - x0) / (x1 - x0) * pw,
            TOP as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph,
        )
    };

    // Grid and tick labels.
    for t in ticks(y0, y1) {
        let (_, py) = to_px(x0, t);
        hline(&mut img, LEFT, opts.width - RIGHT, py.round() as i64, GRID);
        let label = if opts.log_y {
            fmt_tick(10f64.powf(t), 10f64.powf(t) / 10.0)
        } else {
            fmt_tick(t, (y1 - y0) / 5.0)
        };
        let w = text_width(&label);
        text(
            &mut img,
            LEFT as i64 - 6 - w as i64,
            py.round() as i64 - 5,
            &label,
            AXIS,
        );
    }
    for t in ticks(x0, x1) {
        let (px, _) = to_px(t, y0);
        vline(&mut img, px.round() as i64, TOP, opts.height - BOTTOM, GRID);
        let label = fmt_tick(t, (x1 - x0) / 5.0);
        let w = text_width(&label);
        text(
            &mut img,
            px.round() as i64 - w as i64 / 2,
            (opts.height - BOTTOM + 8) as i64,
            &label,
            AXIS,
        );
    }
    hline(
        &mut img,
        LEFT,
        opts.width - RIGHT,
        (opts.height - BOTTOM) as i64,
        AXIS,
    );
    vline(&mut img, LEFT as i64, TOP, opts.height - BOTTOM, AXIS);

    // Raw curve, then the smoothed one on top.
    let px: Vec<(f64, f64)> = pts.iter().map(|&(x, y)| to_px(x, y)).collect();
    polyline(&mut img, &px, RAW, 1);
    if opts.smoothing > 0.0 && pts.len() > 1 {
        let mut ema = 0.0;
        let mut smoothed = Vec::with_capacity(pts.len());
        for (i, &(x, y)) in pts.iter().enumerate() {
            ema = opts.smoothing * ema + (1.0 - opts.smoothing) * y;
            let debias = 1.0 - opts.smoothing.powi(i as i32 + 1);
            smoothed.push(to_px(x, ema / debias));
        }
        polyline(&mut img, &smoothed, LINE, 2);
    } else {
        polyline(&mut img, &px, LINE, 2);
    }
    Ok(img)
}

fn range(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in v {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if hi - lo < 1e-12 * hi.abs().max(1.0) {
        let d = hi.abs().max(1.0) * 0.01;
        (lo - d, hi + d)
    } else {
        (lo, hi)
    }
}

/// About five "nice" tick values (1, 2, 5 × 10^k) inside `[lo, hi]`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let mut out = Vec::new();
    for k in first..first + 20 {
        let t = k as f64 * step;
        if t > hi + step * 1e-9 {
            break;
        }
        out.push(t);
    }
    out
}

fn fmt_tick(v: f64, step: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e6).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn hline(img: &mut RgbImage, x0: u32, x1: u32, y: i64, c: Rgb<u8>) {
    for x in x0..=x1 {
        put(img, x as i64, y, c);
    }
}

fn vline(img: &mut RgbImage, x: i64, y0: u32, y1: u32, c: Rgb<u8>) {
    for y in y0..=y1 {
        put(img, x, y as i64, c);
    }
}

/// Bresenham segment, `thick` pixels wide.
fn segment(img: &mut RgbImage, (xa, ya): (i64, i64), (xb, yb): (i64, i64), c: Rgb<u8>, thick: i64) {
    let (dx, dy) = ((xb - xa).abs(), -(yb - ya).abs());
    let (sx, sy) = (if xa < xb { 1 } else { -1 }, if ya < yb { 1 } else { -1 });
    let (mut x, mut y, mut err) = (xa, ya, dx + dy);
    loop {
        for ox in 0..thick {
            for oy in 0..thick {
                put(img, x + ox, y + oy, c);
            }
        }
        if x == xb && y == yb {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn polyline(img: &mut RgbImage, pts: &[(f64, f64)], c: Rgb<u8>, thick: i64) {
    let r = |p: (f64, f64)| (p.0.round() as i64, p.1.round() as i64);
    if pts.len() == 1 {
        segment(img, r(pts[0]), r(pts[0]), c, thick + 1);
    }
    for w in pts.windows(2) {
        segment(img, r(w[0]), r(w[1]), c, thick);
    }
}

/// 3×5 pixel glyphs (rows top to bottom, 3 bits each, MSB = left).
fn glyph(ch: char) -> [u8; 5] {
    match ch {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b011, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        '+' => [0b000, 0b010, 0b111, 0b010, 0b000],
        'e' => [0b000, 0b111, 0b111, 0b100, 0b111],
        _ => [0; 5],
    }
}

fn text_width(s: &str) -> u32 {
    s.chars().count() as u32 * 4 * SCALE
}

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let g = glyph(ch);
        let gx = x + (i as i64) * 4 * SCALE as i64;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3 {
                if bits & (0b100 >> col) != 0 {
                    for sx in 0..SCALE as i64 {
                        for sy in 0..SCALE as i64 {
                            put(
                                img,
                                gx + col * SCALE as i64 + sx,
                                y + row as i64 * SCALE as i64 + sy,
                                c,
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_of(img: &RgbImage, col: u32, c: Rgb<u8>) -> Vec<u32> {
        (0..img.height())
            .filter(|&y| *img.get_pixel(col, y) == c)
            .collect()
    }

    #[test]
    fn decreasing_curve_goes_down_the_image() {
        let t = tempfile::tempdir().unwrap();
        let jsonl = t.path().join("metrics.jsonl");
        let mut text = String::new();
        for s in 1..=200u64 {
            let loss =
                2.0 * (-(s as f64) / 60.0).exp() + 0.1 + 0.02 * ((s * 7919 % 13) as f64 / 13.0);
            text.push_str(&format!("{{\"step\":{s},\"loss\":{loss},\"lr\":0.001}}\n"));
        }
        text.push_str("{\"step\":201,\"lo"); // torn last line is ignored
        std::fs::write(&jsonl, text).unwrap();
        let png = t.path().join("loss.png");
        let opts = PlotOptions::default();
        assert_eq!(plot_metrics(&jsonl, &png, &opts).unwrap(), 200);
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (opts.width, opts.height));
        let left = rows_of(&img, LEFT + 3, LINE);
        let right = rows_of(&img, opts.width - RIGHT - 3, LINE);
        assert!(!left.is_empty() && !right.is_empty());
        assert!(left[0] + 100 < right[0], "left {left:?} right {right:?}");
        // Axis labels were drawn left of the plot area.
        let label_px = (0..LEFT - 4)
            .flat_map(|x| (0..img.height()).map(move |y| (x, y)))
            .filter(|&(x, y)| *img.get_pixel(x, y) == AXIS)
            .count();
        assert!(label_px > 50);
        // Log scale and another key work; an absent key is an error.
        let log = PlotOptions {
            log_y: true,
            ..PlotOptions::default()
        };
        plot_metrics(&jsonl, &png, &log).unwrap();
        let lr = PlotOptions {
            key: "lr".into(),
            ..PlotOptions::default()
        };
        plot_metrics(&jsonl, &png, &lr).unwrap();
        let none = PlotOptions {
            key: "nope".into(),
            ..PlotOptions::default()
        };
        assert!(plot_metrics(&jsonl, &png, &none).is_err());
    }

    #[test]
    fn tick_labels() {
        let t = ticks(0.0, 1.0);
        assert_eq!(t.len(), 6);
        for (a, b) in t.iter().zip([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]) {
            assert!((a - b).abs() < 1e-12, "{t:?}");
        }
        assert_eq!(fmt_tick(0.25, 0.05), "0.25");
        assert_eq!(fmt_tick(1500.0, 500.0), "1500");
        assert_eq!(fmt_tick(0.0001, 0.0001), "1.0e-4");
    }
}
