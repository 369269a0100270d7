//! PNG plots of metrics from `metrics.jsonl`, drawn with `plotters` (bitmap backend; DejaVu Sans
//! embedded through the `dejavu` crate, so no system font is needed): labelled axes, a legend, linear
//! or logarithmic y, the raw curve faint under its TensorBoard-style smoothing, and one curve per run
//! when several runs share a figure (`blipd plot` over a sweep).

use std::path::Path;
use std::sync::Once;

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Result, TrainError};
use crate::metrics::read_series;

/// Options of [`plot_metrics`] and [`plot_series`].
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

/// One curve: a label for the legend and its `(step, value)` points in step order.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Colours of the curves, in order (the first is the single-run colour).
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(20, 70, 170),
    RGBColor(200, 80, 20),
    RGBColor(30, 140, 60),
    RGBColor(150, 40, 150),
    RGBColor(120, 120, 20),
    RGBColor(20, 140, 150),
];

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TrueType font shipped by the crate.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Plots `key` against `step` from a metrics JSONL file into a PNG; returns the number of
/// points drawn.
pub fn plot_metrics(metrics_jsonl: &Path, png: &Path, opts: &PlotOptions) -> Result<usize> {
    let points = read_series(metrics_jsonl, &opts.key)?;
    let label = metrics_jsonl
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    plot_series(&[Series { label, points }], png, opts).map_err(|e| match e {
        TrainError::Plot { reason, .. } => TrainError::Plot {
            path: metrics_jsonl.to_path_buf(),
            reason,
        },
        e => e,
    })
}

/// Plots several runs' curves into one PNG; returns the number of points drawn.
pub fn plot_series(series: &[Series], png: &Path, opts: &PlotOptions) -> Result<usize> {
    let img = render(series, opts).map_err(|reason| TrainError::Plot {
        path: png.to_path_buf(),
        reason,
    })?;
    img.save(png).map_err(|e| TrainError::Plot {
        path: png.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(series.iter().map(|s| s.points.len()).sum())
}

/// The finite points (positive ones with a log axis).
fn usable(points: &[(f64, f64)], log_y: bool) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0))
        .copied()
        .collect()
}

/// TensorBoard's smoothing: a debiased exponential moving average with weight `w`.
fn smooth(points: &[(f64, f64)], w: f64) -> Vec<(f64, f64)> {
    let mut ema = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            ema = w * ema + (1.0 - w) * y;
            (x, ema / (1.0 - w.powi(i as i32 + 1)))
        })
        .collect()
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

/// A tick label: fixed decimals for moderate values, scientific notation otherwise.
fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e6).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Renders the curves into an image.
pub fn render(series: &[Series], opts: &PlotOptions) -> Result<RgbImage, String> {
    if opts.width < 200 || opts.height < 150 {
        return Err(format!(
            "plot size {}×{} too small (200×150 at least)",
            opts.width, opts.height
        ));
    }
    let curves: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|s| (s.label.clone(), usable(&s.points, opts.log_y)))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    if curves.is_empty() {
        return Err(format!("no finite `{}` values to plot", opts.key));
    }
    register_font();
    let (x0, x1) = range(curves.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)));
    let (y0, y1) = range(curves.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    let (w, h) = (opts.width, opts.height);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .margin(14)
            .x_label_area_size(42)
            .y_label_area_size(72);
        // Steps are whole numbers: no labels between them.
        let x_fmt = |v: &f64| {
            if (v - v.round()).abs() > 1e-9 {
                String::new()
            } else {
                fmt_tick(*v)
            }
        };
        // The same drawing on a linear or a logarithmic y axis (two coordinate types).
        macro_rules! draw {
            ($chart:expr, $y_desc:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc("step")
                    .y_desc($y_desc)
                    .label_style((FONT, 14))
                    .axis_desc_style((FONT, 16))
                    .light_line_style(RGBColor(240, 240, 240))
                    .bold_line_style(RGBColor(215, 215, 215))
                    .x_label_formatter(&x_fmt)
                    .y_label_formatter(&|v| fmt_tick(*v))
                    .draw()
                    .map_err(|e| err(&e))?;
                for (i, (label, pts)) in curves.iter().enumerate() {
                    let color = PALETTE[i % PALETTE.len()];
                    let smoothing = opts.smoothing > 0.0 && pts.len() > 1;
                    if smoothing {
                        chart
                            .draw_series(LineSeries::new(pts.iter().copied(), color.mix(0.3)))
                            .map_err(|e| err(&e))?;
                    }
                    let bold = if smoothing {
                        smooth(pts, opts.smoothing)
                    } else {
                        pts.clone()
                    };
                    chart
                        .draw_series(LineSeries::new(bold, color.stroke_width(2)))
                        .map_err(|e| err(&e))?
                        .label(label.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                        });
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .label_font((FONT, 14))
                    .background_style(WHITE.mix(0.85))
                    .border_style(RGBColor(200, 200, 200))
                    .draw()
                    .map_err(|e| err(&e))?;
            }};
        }
        if opts.log_y {
            let (lo, hi) = (y0 / 1.1, y1 * 1.1);
            let chart = builder
                .build_cartesian_2d(x0..x1, (lo..hi).log_scale())
                .map_err(|e| err(&e))?;
            draw!(chart, format!("{} (log scale)", opts.key));
        } else {
            let pad = (y1 - y0) * 0.05;
            let chart = builder
                .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
                .map_err(|e| err(&e))?;
            draw!(chart, opts.key.clone());
        }
        root.present().map_err(|e| err(&e))?;
    }
    RgbImage::from_raw(w, h, buf).ok_or_else(|| "plot buffer of the wrong size".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of column `col` whose pixel is `c`.
    fn rows_of(img: &RgbImage, col: u32, c: RGBColor) -> Vec<u32> {
        (0..img.height())
            .filter(|&y| img.get_pixel(col, y).0 == [c.0, c.1, c.2])
            .collect()
    }

    fn write_metrics(path: &Path, scale: f64) {
        let mut text = String::new();
        for s in 1..=200u64 {
            let loss = scale
                * (2.0 * (-(s as f64) / 60.0).exp() + 0.1 + 0.02 * ((s * 7919 % 13) as f64 / 13.0));
            text.push_str(&format!("{{\"step\":{s},\"loss\":{loss},\"lr\":0.001}}\n"));
        }
        text.push_str("{\"step\":201,\"lo"); // torn last line is ignored
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_decreasing_curve_goes_down_with_labelled_axes() {
        let t = tempfile::tempdir().unwrap();
        let jsonl = t.path().join("metrics.jsonl");
        write_metrics(&jsonl, 1.0);
        let png = t.path().join("loss.png");
        let opts = PlotOptions::default();
        assert_eq!(plot_metrics(&jsonl, &png, &opts).unwrap(), 200);
        if let Ok(d) = std::env::var("BLIPD_PLOT_KEEP") {
            std::fs::copy(&png, Path::new(&d).join("loss.png")).unwrap();
        }
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (opts.width, opts.height));
        // The bold curve: high near the left edge of the plot area, low near the right.
        let cols: Vec<u32> = (0..img.width())
            .filter(|&x| !rows_of(&img, x, PALETTE[0]).is_empty())
            .collect();
        let (first, last) = (cols[0], *cols.last().unwrap());
        assert!(last - first > opts.width / 2, "{first}..{last}");
        let (l, r) = (
            rows_of(&img, first + 2, PALETTE[0]),
            rows_of(&img, last - 2, PALETTE[0]),
        );
        assert!(l[0] + 100 < r[0], "left {l:?} right {r:?}");
        // Text (tick labels, axis names) is drawn left of the plot area and below it.
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (x0..x1)
                .flat_map(|x| (y0..y1).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&v| v < 160))
                .count()
        };
        let (left, below) = (
            dark(0, first.saturating_sub(8), 0, opts.height),
            dark(first, last, opts.height - 40, opts.height),
        );
        assert!(
            left > 100 && below > 100,
            "text pixels: left {left}, below {below}"
        );
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
    fn several_runs_share_one_figure_in_their_own_colours() {
        let t = tempfile::tempdir().unwrap();
        let mut series = Vec::new();
        for (i, scale) in [1.0, 3.0].iter().enumerate() {
            let p = t.path().join(format!("m{i}.jsonl"));
            write_metrics(&p, *scale);
            series.push(Series {
                label: format!("run {i}"),
                points: read_series(&p, "loss").unwrap(),
            });
        }
        let png = t.path().join("sweep.png");
        assert_eq!(
            plot_series(&series, &png, &PlotOptions::default()).unwrap(),
            400
        );
        let img = image::open(&png).unwrap().to_rgb8();
        for c in &PALETTE[..2] {
            let n = (0..img.width())
                .filter(|&x| !rows_of(&img, x, *c).is_empty())
                .count();
            assert!(n > 300, "colour {c:?} in {n} columns");
        }
    }

    #[test]
    fn tick_labels() {
        assert_eq!(fmt_tick(0.25), "0.25");
        assert_eq!(fmt_tick(1500.0), "1500");
        assert_eq!(fmt_tick(0.0001), "1.0e-4");
        assert_eq!(fmt_tick(2.0), "2");
    }
}
