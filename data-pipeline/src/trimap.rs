//! Trimap from a soft mask (e.g. CLIPSeg's probability map resized to the image).
//!
//! `p ≥ fg_threshold` → foreground, `p ≤ bg_threshold` → background; the foreground region is then eroded by
//! `erode_radius` and the background region by `dilate_radius` (i.e. the unknown band grows by that much on
//! the background side), both with a Euclidean disk (`dx² + dy² ≤ r²`, as `scipy.ndimage` with a disk
//! footprint). Pixels outside the image do not erode: a subject touching the border stays foreground there.
//! Output values: 1 (fg), 0 (bg), 0.5 (unknown), ready for [`crate::estimate_alpha_cf`].

use crate::buffer::Gray;
use crate::error::{DataError, Result};

/// Trimap construction parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrimapOptions {
    /// Mask values ≥ this are foreground before erosion.
    pub fg_threshold: f64,
    /// Mask values ≤ this are background before erosion.
    pub bg_threshold: f64,
    /// Erosion radius of the foreground region, pixels.
    pub erode_radius: f64,
    /// Erosion radius of the background region (dilation of the non-background), pixels.
    pub dilate_radius: f64,
}

impl Default for TrimapOptions {
    fn default() -> Self {
        TrimapOptions {
            fg_threshold: 0.9,
            bg_threshold: 0.1,
            erode_radius: 8.0,
            dilate_radius: 8.0,
        }
    }
}

/// Squared Euclidean distance from each pixel to the nearest pixel where `set` is false
/// (Felzenszwalb–Huttenlocher exact transform; `f64::INFINITY` when there is none).
pub fn sq_distance_to_false(set: &[bool], w: usize, h: usize) -> Vec<f64> {
    let inf = f64::INFINITY;
    let mut g: Vec<f64> = set.iter().map(|&s| if s { inf } else { 0.0 }).collect();
    let mut f = vec![0.0; w.max(h)];
    let mut d = vec![0.0; w.max(h)];
    let mut v = vec![0usize; w.max(h)];
    let mut z = vec![0.0; w.max(h) + 1];
    // Columns, then rows.
    for x in 0..w {
        for y in 0..h {
            f[y] = g[y * w + x];
        }
        edt_1d(&f[..h], &mut d[..h], &mut v, &mut z);
        for y in 0..h {
            g[y * w + x] = d[y];
        }
    }
    for y in 0..h {
        f[..w].copy_from_slice(&g[y * w..(y + 1) * w]);
        edt_1d(&f[..w], &mut d[..w], &mut v, &mut z);
        g[y * w..(y + 1) * w].copy_from_slice(&d[..w]);
    }
    g
}

fn edt_1d(f: &[f64], d: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    // Lower envelope of parabolas rooted at finite samples.
    let mut k: isize = -1;
    for q in 0..n {
        if f[q].is_infinite() {
            continue;
        }
        loop {
            if k < 0 {
                k = 0;
                v[0] = q;
                z[0] = f64::NEG_INFINITY;
                z[1] = f64::INFINITY;
                break;
            }
            let p = v[k as usize];
            let s =
                ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * (q as f64 - p as f64));
            if s <= z[k as usize] {
                k -= 1;
                continue;
            }
            k += 1;
            v[k as usize] = q;
            z[k as usize] = s;
            z[k as usize + 1] = f64::INFINITY;
            break;
        }
    }
    if k < 0 {
        d.iter_mut().for_each(|x| *x = f64::INFINITY);
        return;
    }
    let mut j = 0usize;
    for (q, dq) in d.iter_mut().enumerate() {
        while z[j + 1] < q as f64 {
            j += 1;
        }
        let p = v[j];
        *dq = (q as f64 - p as f64).powi(2) + f[p];
    }
}

/// Erodes `set` by a disk of radius `r` (a pixel survives when no false pixel lies within distance ≤ r).
pub fn erode(set: &[bool], w: usize, h: usize, r: f64) -> Vec<bool> {
    if r <= 0.0 {
        return set.to_vec();
    }
    sq_distance_to_false(set, w, h)
        .iter()
        .map(|&d| d > r * r)
        .collect()
}

/// Builds a trimap from a soft mask in `[0, 1]`.
pub fn trimap_from_mask(mask: &Gray, opts: &TrimapOptions) -> Result<Gray> {
    if opts.bg_threshold.partial_cmp(&opts.fg_threshold) != Some(std::cmp::Ordering::Less)
        || opts.erode_radius < 0.0
        || opts.dilate_radius < 0.0
    {
        return Err(DataError::Config(format!(
            "invalid trimap options {opts:?}"
        )));
    }
    let (w, h) = (mask.width, mask.height);
    let fg: Vec<bool> = mask.data.iter().map(|&p| p >= opts.fg_threshold).collect();
    let bg: Vec<bool> = mask.data.iter().map(|&p| p <= opts.bg_threshold).collect();
    let fg = erode(&fg, w, h, opts.erode_radius);
    let bg = erode(&bg, w, h, opts.dilate_radius);
    let data = fg
        .iter()
        .zip(&bg)
        .map(|(&f, &b)| {
            if f {
                1.0
            } else if b {
                0.0
            } else {
                0.5
            }
        })
        .collect();
    Gray::new(w, h, data)
}

/// Bilinear resize with pixel centres aligned (PyTorch `align_corners=False` without antialiasing), for
/// bringing a 352² CLIPSeg map to the image size.
pub fn resize_bilinear(src: &Gray, width: usize, height: usize) -> Gray {
    let (sw, sh) = (src.width, src.height);
    let sx = sw as f64 / width as f64;
    let sy = sh as f64 / height as f64;
    let mut data = Vec::with_capacity(width * height);
    for y in 0..height {
        let v = ((y as f64 + 0.5) * sy - 0.5).max(0.0);
        let y0 = (v.floor() as usize).min(sh - 1);
        let y1 = (y0 + 1).min(sh - 1);
        let fy = v - y0 as f64;
        for x in 0..width {
            let u = ((x as f64 + 0.5) * sx - 0.5).max(0.0);
            let x0 = (u.floor() as usize).min(sw - 1);
            let x1 = (x0 + 1).min(sw - 1);
            let fx = u - x0 as f64;
            let a = src.data[y0 * sw + x0] * (1.0 - fx) + src.data[y0 * sw + x1] * fx;
            let b = src.data[y1 * sw + x0] * (1.0 - fx) + src.data[y1 * sw + x1] * fx;
            data.push(a * (1.0 - fy) + b * fy);
        }
    }
    Gray {
        width,
        height,
        data,
    }
}
