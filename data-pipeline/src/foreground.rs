//! Multi-level foreground estimation (Germer, Uelwer, Conrad & Harmeling 2020) with pymatting's
//! `estimate_foreground_ml` semantics: f32 buffers, 1×1 initialisation with the mean colours of α>0.9 and
//! α<0.1, levels `round(w^(i/L))` for `i = 0..=L` with `L = ⌈log₂ max(w, h)⌉`, nearest resampling
//! `src = ⌊dst·src_size/dst_size⌋`, and in-place raster-order Gauss–Seidel sweeps of the per-pixel 2×2 system
//! (10 sweeps on levels whose sides are both ≤ 32, else 2), F and B clamped to `[0, 1]`.

use crate::buffer::{Gray, Rgb};
use crate::error::Result;
use crate::matting::pool::{Buf, Pooled};

/// Options of [`estimate_foreground_ml`] (pymatting defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FgOptions {
    pub regularization: f32,
    pub n_small_iterations: usize,
    pub n_big_iterations: usize,
    pub small_size: usize,
    pub gradient_weight: f32,
}

impl Default for FgOptions {
    fn default() -> Self {
        FgOptions {
            regularization: 1e-5,
            n_small_iterations: 10,
            n_big_iterations: 2,
            small_size: 32,
            gradient_weight: 1.0,
        }
    }
}

/// Estimates the foreground colours F (interleaved RGB, f64 from the f32 computation), as pymatting's
/// `estimate_foreground_ml(image, alpha)` does by default (`return_background=False`).
pub fn estimate_foreground_ml(image: &Rgb, alpha: &Gray, opts: &FgOptions) -> Result<Rgb> {
    Ok(estimate(image, alpha, opts, false)?.0)
}

/// Estimates the foreground and background colours (F, B), pymatting's `return_background=True`.
pub fn estimate_foreground_background_ml(
    image: &Rgb,
    alpha: &Gray,
    opts: &FgOptions,
) -> Result<(Rgb, Rgb)> {
    let (f, b) = estimate(image, alpha, opts, true)?;
    Ok((f, b.expect("asked for the background")))
}

/// F, and B if `background`, dispatched to the AVX2/FMA build where the CPU has it ([`crate::cpu::level`]; the
/// same code otherwise).
fn estimate(
    image: &Rgb,
    alpha: &Gray,
    opts: &FgOptions,
    background: bool,
) -> Result<(Rgb, Option<Rgb>)> {
    alpha.check_size("alpha", image.width, image.height)?;
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::level() >= crate::cpu::SimdLevel::Avx2 {
        // SAFETY: the CPU supports the features `estimate_avx2` is compiled for (`cpu::level` is at most the
        // detected level).
        return Ok(unsafe { estimate_avx2(image, alpha, opts, background) });
    }
    Ok(estimate_generic(image, alpha, opts, background))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn estimate_avx2(
    image: &Rgb,
    alpha: &Gray,
    opts: &FgOptions,
    background: bool,
) -> (Rgb, Option<Rgb>) {
    estimate_generic(image, alpha, opts, background)
}

#[inline(always)]
fn estimate_generic(
    image: &Rgb,
    alpha: &Gray,
    opts: &FgOptions,
    background: bool,
) -> (Rgb, Option<Rgb>) {
    let fb = estimate_fb(image, alpha, opts);
    let f = plane(&fb, image, 0);
    (f, background.then(|| plane(&fb, image, 1)))
}

/// F (`off` 0) or B (`off` 1) of every pixel as an f64 RGB image of `like`'s size.
#[inline(always)]
fn plane(fb: &[Fb], like: &Rgb, off: usize) -> Rgb {
    // Written into the spare capacity, not zeroed first (zeroing a reused 6 MB block was 4 % of the estimate).
    let n = fb.len() * 3;
    let mut data = Vec::with_capacity(n);
    for (o, v) in data.spare_capacity_mut()[..n].chunks_exact_mut(3).zip(fb) {
        o[0].write(f64::from(v[off]));
        o[1].write(f64::from(v[off + 2]));
        o[2].write(f64::from(v[off + 4]));
    }
    // SAFETY: all `n` entries were written above.
    unsafe { data.set_len(n) };
    Rgb {
        width: like.width,
        height: like.height,
        data,
    }
}

/// The multi-level estimate, one [`Fb`] per pixel of the full-size level, on checked inputs. The level
/// buffers come from the thread's pool: a worker that estimates many foregrounds touches the same pages again
/// (fresh 512² buffers cost more in page faults than the sweeps themselves). Everything it calls per pixel is
/// `#[inline(always)]`, so the AVX2 build covers it (a function compiled on its own would lose the target
/// features and turn `mul_add` into a libm call).
#[inline(always)]
fn estimate_fb(image: &Rgb, alpha: &Gray, opts: &FgOptions) -> Buf<Fb> {
    let (w0, h0) = (image.width, image.height);
    let img0 = Buf::collect(
        w0 * h0,
        image
            .data
            .chunks_exact(3)
            .map(|c| [c[0] as f32, c[1] as f32, c[2] as f32, 0.0]),
    );
    let a0 = Buf::collect(w0 * h0, alpha.data.iter().map(|&v| v as f32));
    let (mut fm, mut bm) = ([0.0f32; 3], [0.0f32; 3]);
    let (mut fc, mut bc) = (0usize, 0usize);
    for (px, &a) in img0.iter().zip(a0.iter()) {
        if a > 0.9 {
            for c in 0..3 {
                fm[c] += px[c];
            }
            fc += 1;
        }
        if a < 0.1 {
            for c in 0..3 {
                bm[c] += px[c];
            }
            bc += 1;
        }
    }
    let mut fb_prev = Buf::collect(w0 * h0, [[0.0f32; 8]]);
    for c in 0..3 {
        fb_prev[0][2 * c] = fm[c] / (fc as f32 + 1e-5);
        fb_prev[0][2 * c + 1] = bm[c] / (bc as f32 + 1e-5);
    }
    let (mut wp, mut hp) = (1usize, 1usize);
    let n_levels = (w0.max(h0) as f64).log2().ceil().max(0.0) as i32;
    // Every level buffer is taken at full size, so that none grows (a grown vector is a fresh allocation).
    let n = w0 * h0;
    let (mut img, mut al) = (Buf::collect(n, []), Buf::collect(n, []));
    let mut fb = Buf::collect(n, []);
    let mut co = Coefs::default();
    for level in 0..=n_levels {
        let e = if n_levels == 0 {
            1.0
        } else {
            f64::from(level) / f64::from(n_levels)
        };
        let w = ((w0 as f64).powf(e).round() as usize).max(1);
        let h = ((h0 as f64).powf(e).round() as usize).max(1);
        resize_nearest(&mut fb, w, h, &fb_prev, wp, hp);
        // The full-size level reads the inputs themselves.
        let (img_l, al_l) = if (w, h) == (w0, h0) {
            (&img0[..], &a0[..])
        } else {
            resize_nearest(&mut img, w, h, &img0, w0, h0);
            resize_nearest(&mut al, w, h, &a0, w0, h0);
            (&img[..], &al[..])
        };
        let n_iter = if w <= opts.small_size && h <= opts.small_size {
            opts.n_small_iterations
        } else {
            opts.n_big_iterations
        };
        sweeps(img_l, al_l, &mut fb, &mut co, w, h, n_iter, opts);
        std::mem::swap(&mut fb, &mut fb_prev);
        wp = w;
        hp = h;
    }
    fb_prev
}

/// One pixel's colour, padded to four lanes.
type Px = [f32; 4];
/// One pixel's F and B, `[F_r, B_r, F_g, B_g, F_b, B_b, 0, 0]`: the per-pixel 2×2 solve is one 8-lane
/// multiply-add with neighbouring lanes swapped (an in-lane shuffle), so a pixel's update is a handful of
/// 256-bit operations.
type Fb = [f32; 8];

/// Nearest resampling, `src = ⌊dst·src_size/dst_size⌋` (the column map computed once per call).
#[inline(always)]
fn resize_nearest<T: Pooled>(
    dst: &mut Buf<T>,
    dw: usize,
    dh: usize,
    src: &[T],
    sw: usize,
    sh: usize,
) {
    let cols: Vec<usize> = (0..dw).map(|x| (x * sw / dw).min(sw - 1)).collect();
    dst.clear();
    for y in 0..dh {
        let row = &src[(y * sh / dh).min(sh - 1) * sw..][..sw];
        dst.extend(cols.iter().map(|&x| row[x]));
    }
}

/// Rows updated together, each one pixel behind the row above it.
const ROWS: usize = 4;

/// What the updates of a block of [`ROWS`] rows need besides the neighbours' F and B, one [`Coef`] per pixel
/// (row-major within the block). It depends on the image and α alone, so it is computed once per block and
/// level, in vectorisable passes over contiguous rows, and the update loop only multiplies and adds.
#[derive(Default)]
struct Coefs {
    ents: Vec<Coef>,
    /// One row's scratch, by x: the weights by direction (left, right, up, down), then `1 − α`, `m00`,
    /// `m11` and `m01`, before they are packed into `ents`.
    row: [Vec<f32>; 8],
}

/// One pixel's coefficients in one cache line, read from one pointer by the update: the data term
/// `p0 = [α I_r, (1 − α) I_r, α I_g, …, 0, 0]` (lanes as in [`Fb`]), the neighbour weights
/// `reg + gw·|α − α_n|` (right, down, up, left: the order of [`solve`]), the inverse's diagonal
/// `[m00, m11]` and its off-diagonal entry `m01`. (The data term computed here rather than in the update: the
/// update no longer reads the colours, and the sweeps after the first skip that product.)
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Coef {
    p0: Fb,
    w: [f32; 4],
    mm: [f32; 2],
    m01: f32,
}

impl Coefs {
    fn len(&self) -> usize {
        self.ents.len()
    }

    fn resize(&mut self, len: usize, w: usize) {
        self.ents.resize(len, Coef::default());
        for v in &mut self.row {
            v.resize(w, 0.0);
        }
    }

    /// Row `y` of the level (colours `img`, α `al`) into entries `at..at + w`, with pymatting's arithmetic:
    /// the weights and `a00` in f32, `a11`, `a01` and the inverse in f64 (numba promotes `1.0 − a0` to a
    /// double). Its order of the weights in `a00` and `a11`: left, right, up, down.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &mut self,
        img: &[Px],
        al: &[f32],
        w: usize,
        h: usize,
        y: usize,
        at: usize,
        o: &FgOptions,
    ) {
        let (reg, gw) = (o.regularization, o.gradient_weight);
        let row = |r: usize| &al[r * w..(r + 1) * w];
        let (a, up, down) = (row(y), row(y.saturating_sub(1)), row((y + 1).min(h - 1)));
        let px = &img[y * w..(y + 1) * w];
        let [wl, wr, wu, wd, a1s, m00, m11, m01] = &mut self.row;
        let (wl, wr, wu, wd) = (&mut wl[..w], &mut wr[..w], &mut wu[..w], &mut wd[..w]);
        // A border pixel is its own neighbour there: weight `reg`.
        wl[0] = reg;
        for ((o, &x), &l) in wl[1..].iter_mut().zip(&a[1..]).zip(a) {
            *o = reg + gw * (x - l).abs();
        }
        wr[..w - 1].copy_from_slice(&wl[1..]);
        wr[w - 1] = reg;
        for ((o, &x), &n) in wu.iter_mut().zip(a).zip(up) {
            *o = reg + gw * (x - n).abs();
        }
        for ((o, &x), &n) in wd.iter_mut().zip(a).zip(down) {
            *o = reg + gw * (x - n).abs();
        }
        let (a1s, m00, m11, m01) = (&mut a1s[..w], &mut m00[..w], &mut m11[..w], &mut m01[..w]);
        for x in 0..w {
            let a0 = a[x];
            let (l, r, u, d) = (wl[x], wr[x], wu[x], wd[x]);
            let a1 = 1.0 - f64::from(a0);
            let a00 = a0 * a0 + l + r + u + d;
            let a11 = a1 * a1 + f64::from(l) + f64::from(r) + f64::from(u) + f64::from(d);
            let a01 = f64::from(a0) * a1;
            let inv = 1.0 / (f64::from(a00) * a11 - a01 * a01);
            a1s[x] = a1 as f32;
            m00[x] = (inv * a11) as f32;
            m11[x] = (inv * f64::from(a00)) as f32;
            m01[x] = (inv * -a01) as f32;
        }
        for (x, e) in self.ents[at..at + w].iter_mut().enumerate() {
            let ab = [a[x], a1s[x]];
            *e = Coef {
                p0: std::array::from_fn(|l| ab[l & 1] * px[x][l >> 1]),
                w: [wr[x], wd[x], wu[x], wl[x]],
                mm: [m00[x], m11[x]],
                m01: m01[x],
            };
        }
    }
}

/// `n` raster-order Gauss–Seidel sweeps, [`ROWS`] rows at a time as a wavefront, the sweeps one block
/// behind each other. Within a block, at step `t` row `y0 + k` updates pixel `t − k`: pixel `(y, x)` then
/// still sees its left and upper neighbours updated and its right and lower ones not (row `y + 1` reaches `x`
/// one step later), so every value is the raster order's, while the rows' dependency chains (each pixel waits
/// for its left neighbour) run side by side. Sweep `j` updates block `b` right after sweep `j − 1` updated
/// block `b + 1`: its lower neighbours then hold sweep `j − 1`'s values and its upper ones its own, exactly as
/// in `n` separate sweeps, but the level streams through memory once instead of `n` times.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn sweeps(
    img: &[Px],
    al: &[f32],
    fb: &mut [Fb],
    co: &mut Coefs,
    w: usize,
    h: usize,
    n: usize,
    o: &FgOptions,
) {
    assert!(img.len() == w * h && al.len() == w * h && fb.len() == w * h);
    let blocks = h.div_ceil(ROWS);
    // Block `b`'s coefficients live in slot `b % n` from sweep 0's visit to sweep n − 1's.
    co.resize(n * ROWS * w, w);
    for step in 0..(blocks + n).saturating_sub(1) {
        for j in 0..n {
            let Some(b) = step.checked_sub(j).filter(|&b| b < blocks) else {
                continue;
            };
            let (y0, base) = (b * ROWS, (b % n) * ROWS * w);
            let rows = ROWS.min(h - y0);
            if j == 0 {
                for k in 0..rows {
                    co.fill(img, al, w, h, y0 + k, base + k * w, o);
                }
            }
            // Each row's last result: its next pixel's left neighbour, carried instead of read back.
            let mut left = [[0.0f32; 8]; ROWS];
            // Steps at which every row of a full block away from the image's top and bottom rows is at an
            // interior pixel take the unchecked kernel; the others (and small levels) this loop.
            let inner = if rows == ROWS && y0 >= 1 && y0 + ROWS < h && w > ROWS + 1 {
                ROWS..w - 1
            } else {
                0..0
            };
            for t in 0..w + rows - 1 {
                if t == inner.start && !inner.is_empty() {
                    steady(fb, co, w, h, y0, base, inner.clone(), &mut left);
                }
                if !inner.contains(&t) {
                    edge(fb, co, w, h, y0, rows, base, t, &mut left);
                }
            }
        }
    }
}

/// Step `t` of the wavefront over the `rows` rows from `y0` (row `k` at pixel `t − k`, if that is a pixel),
/// with clamped, checked neighbour indices: the block's first and last steps and the image's top and bottom
/// blocks. (A function, not a closure, so that it is compiled with the caller's target features.)
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn edge(
    fb: &mut [Fb],
    co: &Coefs,
    w: usize,
    h: usize,
    y0: usize,
    rows: usize,
    base: usize,
    t: usize,
    left: &mut [Fb; ROWS],
) {
    for (k, left) in left[..rows].iter_mut().enumerate() {
        let Some(x) = t.checked_sub(k).filter(|&x| x < w) else {
            continue;
        };
        let y = y0 + k;
        let q = y * w + x;
        let (up, down) = (y.saturating_sub(1) * w + x, (y + 1).min(h - 1) * w + x);
        let (l, r) = (q - usize::from(x > 0), q + usize::from(x + 1 < w));
        if x == 0 {
            *left = fb[l];
        }
        let out = solve([fb[r], fb[down], fb[up], *left], &co.ents[base + k * w + x]);
        fb[q] = out;
        *left = out;
    }
}

/// The wavefront's steady state: steps `steps` of the full block at rows `y0..y0 + ROWS`, where row `k`'s
/// pixel `x = t − k` is interior (`1 ≤ x ≤ w − 2`) and so are its rows above and below, with the rows
/// unrolled and unchecked indexing (the asserts bound every index).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn steady(
    fb: &mut [Fb],
    co: &Coefs,
    w: usize,
    h: usize,
    y0: usize,
    base: usize,
    steps: std::ops::Range<usize>,
    left: &mut [Fb; ROWS],
) {
    assert!(y0 >= 1 && y0 + ROWS < h && steps.start >= ROWS && steps.end < w);
    assert!(fb.len() == w * h && co.len() >= base + ROWS * w);
    // One pointer per row: rows y0 − 1 ..= y0 + ROWS of F and B, the block's rows of coefficients.
    let f = fb.as_mut_ptr();
    // SAFETY (both): 1 ≤ y0 and y0 + ROWS < h, so every row starts inside `fb`; base + ROWS·w ≤ co.len().
    let rows: [*mut Fb; ROWS + 2] = std::array::from_fn(|i| unsafe { f.add((y0 + i - 1) * w) });
    let cs: [*const Coef; ROWS] =
        std::array::from_fn(|k| unsafe { co.ents.as_ptr().add(base + k * w) });
    // A local copy, so that the unrolled rows keep their last results in registers (the caller's array is
    // also indexed dynamically, which would leave it in memory and put a store-to-load forward on the chain).
    let mut last = *left;
    for t in steps {
        // The previous step's results: row k − 1's is the upper neighbour of row k's pixel now (the same x),
        // taken from a register rather than read back from the store just made (a store-to-load forward on
        // the chain that links the rows, which set the pace of the whole wavefront).
        let above = last;
        for (k, left) in last.iter_mut().enumerate() {
            let x = t - k;
            // SAFETY: 1 ≤ x ≤ w − 2 (steps ⊂ ROWS..w − 1, k < ROWS), so x ± 1 stay inside each row of `w`
            // entries at `rows[i]` and `cs[k]`. `fb` is only accessed through these pointers here; a pixel
            // is written after its neighbours are read.
            unsafe {
                let q = rows[k + 1].add(x);
                let up = if k == 0 {
                    *rows[0].add(x)
                } else {
                    above[k - 1]
                };
                let nb = [*q.add(1), *rows[k + 2].add(x), up, *left];
                let out = solve(nb, &*cs[k].add(x));
                *q = out;
                *left = out;
            }
        }
    }
    *left = last;
}

/// Gauss–Seidel update of one pixel (coefficients `c`) from its neighbours' values `[right, down, up,
/// left]` (clamped at the border, so a border pixel is its own neighbour), summed in that order: the
/// neighbours updated by this sweep last, as they are the ones the wavefront waits for (pymatting sums left,
/// right, up, down: the same terms, rounded in another order). The 2×2 system
/// `[[α² + Σw, α(1−α)], [α(1−α), (1−α)² + Σw]] (F, B) = (α I + Σ w F_n, (1−α) I + Σ w B_n)` with
/// `w = reg + gw·|α − α_n|`, solved with the precomputed inverse `M` (`out = M_diag ⊙ p + m01 · swap(p)`,
/// `swap` exchanging each F lane with its B lane) and clamped.
#[inline(always)]
fn solve(nb: [Fb; 4], c: &Coef) -> Fb {
    let mut p = c.p0;
    for (v, &wj) in nb.iter().zip(&c.w) {
        for l in 0..8 {
            p[l] = wj.mul_add(v[l], p[l]);
        }
    }
    let mut out: Fb = [0.0; 8];
    for l in 0..8 {
        out[l] = c.mm[l & 1].mul_add(p[l], c.m01 * p[l ^ 1]).clamp(0.0, 1.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random value in [0, 1) (xorshift), enough for test inputs.
    fn noise(state: &mut u64) -> f32 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Plain raster-order sweeps with the same per-pixel arithmetic: what the wavefront, the unchecked
    /// steady state and the interleaved sweeps must reproduce bit for bit.
    fn raster(img: &[Px], al: &[f32], fb: &mut [Fb], w: usize, h: usize, n: usize, o: &FgOptions) {
        let mut co = Coefs::default();
        co.resize(w * h, w);
        for y in 0..h {
            co.fill(img, al, w, h, y, y * w, o);
        }
        for _ in 0..n {
            for y in 0..h {
                for x in 0..w {
                    let q = y * w + x;
                    let (up, down) = (y.saturating_sub(1) * w + x, (y + 1).min(h - 1) * w + x);
                    let (l, r) = (q - usize::from(x > 0), q + usize::from(x + 1 < w));
                    fb[q] = solve([fb[r], fb[down], fb[up], fb[l]], &co.ents[q]);
                }
            }
        }
    }

    #[test]
    fn blocked_wavefront_sweeps_equal_raster_order() {
        let mut state = 0x9e37_79b9_7f4a_7c15;
        let o = FgOptions::default();
        for (w, h) in [
            (1, 1),
            (1, 7),
            (6, 1),
            (5, 3),
            (7, 9),
            (40, 13),
            (64, 33),
            (9, 64),
        ] {
            let img: Vec<Px> = (0..w * h)
                .map(|_| [noise(&mut state), noise(&mut state), noise(&mut state), 0.0])
                .collect();
            // Flat 0/1 regions and fractional edges, as real mattes have.
            let al: Vec<f32> = (0..w * h)
                .map(|_| match noise(&mut state) {
                    v if v < 0.3 => 0.0,
                    v if v < 0.6 => 1.0,
                    v => (v - 0.6) / 0.4,
                })
                .collect();
            let start: Vec<Fb> = (0..w * h)
                .map(|_| {
                    let mut v = [0.0; 8];
                    v[..6].iter_mut().for_each(|x| *x = noise(&mut state));
                    v
                })
                .collect();
            for n in [1, 2, 3, 10] {
                let mut want = start.clone();
                raster(&img, &al, &mut want, w, h, n, &o);
                let mut got = start.clone();
                let mut co = Coefs::default();
                sweeps(&img, &al, &mut got, &mut co, w, h, n, &o);
                assert!(
                    got == want,
                    "{w}×{h}, {n} sweeps: the blocked wavefront differs from raster order"
                );
            }
        }
    }

    #[test]
    fn dispatched_build_equals_generic_build() {
        let (w, h) = (53, 41);
        let mut state = 7;
        let image = Rgb {
            width: w,
            height: h,
            data: (0..w * h * 3)
                .map(|_| f64::from(noise(&mut state)))
                .collect(),
        };
        let alpha = Gray {
            width: w,
            height: h,
            data: (0..w * h)
                .map(|q| ((q % w) as f64 / w as f64 * 3.0 - 1.0).clamp(0.0, 1.0))
                .collect(),
        };
        let o = FgOptions::default();
        let (f, b) = estimate(&image, &alpha, &o, true).unwrap();
        let (f_generic, b_generic) = estimate_generic(&image, &alpha, &o, false);
        assert!(f == f_generic && b_generic.is_none());
        let fb = estimate_fb(&image, &alpha, &o);
        assert!(b
            .unwrap()
            .data
            .iter()
            .zip(fb.iter().flat_map(|v| [v[1], v[3], v[5]]))
            .all(|(&x, y)| x == f64::from(y)));
        // F and B stay in [0, 1] and the padding lanes at 0.
        assert!(fb
            .iter()
            .all(|v| v[..6].iter().all(|x| (0.0..=1.0).contains(x)) && v[6] == 0.0 && v[7] == 0.0));
    }
}
