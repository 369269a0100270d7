//! AVX2+FMA and AVX-512 kernels for the closed-form matting solver's short-run loops (runs of unknown pixels are
//! typically 30–80 pixels long at 512², so the compiler's 16-wide vectorised loops would leave much of each run
//! to a scalar remainder). Tails use masked loads and stores. Only called after run-time detection of the
//! features each kernel is compiled for.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// How the `group5_*` kernels combine the five-band product `Σ aᵢ·xᵢ` with `out`.
pub(crate) const SET: u8 = 0;
pub(crate) const ADD: u8 = 1;
pub(crate) const SUB: u8 = 2;
/// `out = (out − Σ) · scale`.
pub(crate) const SUB_SCALE: u8 = 3;

// Full blocks use plain unaligned moves and only the tail a masked one: AMD's Zen 2 and Zen 3 run a VEX masked
// store (`vmaskmovps m256`) as a long microcoded sequence, slower than the five multiply-adds of a block. (The
// `_mm256_loadu_*` wrappers go through `copy_nonoverlapping`, whose precondition checks would cost more than the
// arithmetic in a debug-assertion build: the dev profile builds this crate without debug assertions, so the
// tests run these moves as the release build does.)
/// Eight `f32` at `p`: all of them (`FULL`) or the lanes enabled in `m`.
#[inline(always)]
unsafe fn ld8f<const FULL: bool>(p: *const f32, m: __m256i) -> __m256 {
    // SAFETY: the caller guarantees that the lanes enabled in m (all eight when FULL) are readable and AVX
    // support.
    unsafe {
        if FULL {
            _mm256_loadu_ps(p)
        } else {
            _mm256_maskload_ps(p, m)
        }
    }
}

/// Stores the lanes of `v` enabled in `m` (all eight when `FULL`) at `p`.
#[inline(always)]
unsafe fn st8f<const FULL: bool>(p: *mut f32, m: __m256i, v: __m256) {
    // SAFETY: the caller guarantees that the lanes enabled in m (all eight when FULL) are writable and AVX
    // support.
    unsafe {
        if FULL {
            _mm256_storeu_ps(p, v)
        } else {
            _mm256_maskstore_ps(p, m, v)
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn mask8(rem: usize) -> __m256i {
    let m = |i: usize| if i < rem { -1 } else { 0 };
    _mm256_setr_epi32(m(0), m(1), m(2), m(3), m(4), m(5), m(6), m(7))
}

/// Eight bf16 values (the high halves of `f32`s) at `p` as `f32`; `m2` enables the 32-bit pairs to read
/// (the pair holding the last wanted value may hold one more, which must be readable and is ignored; all four
/// pairs when `FULL`).
#[inline(always)]
unsafe fn ld8bf<const FULL: bool>(p: *const u16, m2: __m128i) -> __m256 {
    // SAFETY: the caller guarantees that the pairs enabled in m2 are readable and AVX2 support.
    unsafe {
        let w = if FULL {
            _mm_loadu_si128(p as *const __m128i)
        } else {
            _mm_maskload_epi32(p as *const i32, m2)
        };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(w)))
    }
}

/// Mask of the 32-bit pairs that hold the first `rem` bf16 values (at most four pairs).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn mask_pairs4(rem: usize) -> __m128i {
    let pairs = rem.div_ceil(2);
    let m = |i: usize| if i < pairs { -1 } else { 0 };
    _mm_setr_epi32(m(0), m(1), m(2), m(3))
}

/// Runs `block::<true>(k, ·, ·)` over the full blocks of eight of `0..len` and `block::<false>` with the tail's
/// masks on the rest.
macro_rules! blocks8 {
    ($len:expr, |$full:ident, $k:ident, $m:ident, $m2:ident| $body:expr) => {{
        let len = $len;
        let mut $k = 0;
        {
            let ($m, $m2) = (_mm256_set1_epi32(-1), _mm_set1_epi32(-1));
            const $full: bool = true;
            while $k + 8 <= len {
                $body;
                $k += 8;
            }
        }
        if $k < len {
            let ($m, $m2) = (mask8(len - $k), mask_pairs4(len - $k));
            const $full: bool = false;
            $body;
        }
    }};
}

/// `out[k] ⊕= Σ_{i<5} a[i][k] · x[i][k]` in `f32` with bf16 bands `a` (and bf16 `scale` for `SUB_SCALE`),
/// eight lanes.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` must hold at least `out.len()` elements, `a` and `scale` (for
/// `SUB_SCALE`) one more when `out.len()` is odd (the safe wrapper in `matting_solver.rs` checks this).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn group5_bf16<const MODE: u8>(
    a: [&[u16]; 5],
    x: [&[f32]; 5],
    out: &mut [f32],
    scale: &[u16],
) {
    let ap = a.map(|s| s.as_ptr());
    let xp = x.map(|s| s.as_ptr());
    let op = out.as_mut_ptr();
    let sp = scale.as_ptr();
    blocks8!(out.len(), |FULL, k, m, m2| {
        // SAFETY: only lanes below `len` (and the pair partner of the last one) are enabled.
        unsafe {
            let mut acc = _mm256_mul_ps(
                ld8bf::<FULL>(ap[0].wrapping_add(k), m2),
                ld8f::<FULL>(xp[0].wrapping_add(k), m),
            );
            for i in 1..5 {
                acc = _mm256_fmadd_ps(
                    ld8bf::<FULL>(ap[i].wrapping_add(k), m2),
                    ld8f::<FULL>(xp[i].wrapping_add(k), m),
                    acc,
                );
            }
            let v = match MODE {
                SET => acc,
                ADD => _mm256_add_ps(ld8f::<FULL>(op.wrapping_add(k), m), acc),
                SUB => _mm256_sub_ps(ld8f::<FULL>(op.wrapping_add(k), m), acc),
                _ => _mm256_mul_ps(
                    _mm256_sub_ps(ld8f::<FULL>(op.wrapping_add(k), m), acc),
                    ld8bf::<FULL>(sp.wrapping_add(k), m2),
                ),
            };
            st8f::<FULL>(op.wrapping_add(k), m, v);
        }
    });
}

/// `z[j] −= Σ_{i<5} l[i][j + 4 − i] · t[j + 4 − i]` for `j < z.len()` with bf16 `l` (see
/// `matting_solver::scatter_row5`).
///
/// # Safety
/// The CPU must support AVX2 and FMA; `l[i]` and `t` must hold at least `z.len() + 5` values.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn scatter_row5(l: [&[u16]; 5], t: &[f32], z: &mut [f32]) {
    let lp = l.map(|s| s.as_ptr());
    let (tp, zp) = (t.as_ptr(), z.as_mut_ptr());
    blocks8!(z.len(), |FULL, k, m, m2| {
        // SAFETY: lane j reads l[i] and t at j + 4 − i ≤ len + 3 (+1 for the pair), z at j < len.
        unsafe {
            let mut acc = _mm256_mul_ps(
                ld8bf::<FULL>(lp[0].wrapping_add(k + 4), m2),
                ld8f::<FULL>(tp.wrapping_add(k + 4), m),
            );
            for i in 1..5 {
                acc = _mm256_fmadd_ps(
                    ld8bf::<FULL>(lp[i].wrapping_add(k + 4 - i), m2),
                    ld8f::<FULL>(tp.wrapping_add(k + 4 - i), m),
                    acc,
                );
            }
            let v = _mm256_sub_ps(ld8f::<FULL>(zp.wrapping_add(k), m), acc);
            st8f::<FULL>(zp.wrapping_add(k), m, v);
        }
    });
}

// ---- AVX-512 (F) versions: twice the lanes, native masked tails. ----

/// All-lanes or tail mask for 8 f64 lanes.
#[inline(always)]
fn kmask8(rem: usize) -> __mmask8 {
    if rem >= 8 {
        0xff
    } else {
        ((1u32 << rem) - 1) as __mmask8
    }
}

/// All-lanes or tail mask for 16 f32 lanes.
#[inline(always)]
fn kmask16(rem: usize) -> __mmask16 {
    if rem >= 16 {
        0xffff
    } else {
        ((1u32 << rem) - 1) as __mmask16
    }
}

/// Sixteen bf16 values at `p` as `f32`; `m2` enables the 32-bit pairs to read (see [`ld8bf`]).
#[inline(always)]
unsafe fn ld16bf(p: *const u16, m2: __mmask8) -> __m512 {
    // SAFETY: the caller guarantees that the pairs enabled in m2 are readable and AVX-512 support.
    unsafe {
        let w = _mm256_maskz_loadu_epi32(m2, p as *const i32);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(w)))
    }
}

/// Pair mask for the first `rem` of sixteen bf16 values.
#[inline(always)]
fn kpairs8(rem: usize) -> __mmask8 {
    kmask8(rem.div_ceil(2))
}

/// AVX-512 version of [`group5_bf16`] (sixteen f32 lanes).
///
/// # Safety
/// As [`group5_bf16`], with AVX-512F instead of AVX2.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) unsafe fn group5_bf16_512<const MODE: u8>(
    a: [&[u16]; 5],
    x: [&[f32]; 5],
    out: &mut [f32],
    scale: &[u16],
) {
    let len = out.len();
    let ap = a.map(|s| s.as_ptr());
    let xp = x.map(|s| s.as_ptr());
    let op = out.as_mut_ptr();
    let sp = scale.as_ptr();
    let mut k = 0;
    while k < len {
        let m = kmask16(len - k);
        let m2 = kpairs8(len - k);
        // SAFETY: only lanes below `len` (and the pair partner of the last one) are enabled.
        unsafe {
            let ld = |p: *const f32| _mm512_maskz_loadu_ps(m, p.wrapping_add(k));
            let lb = |p: *const u16| ld16bf(p.wrapping_add(k), m2);
            let mut acc = _mm512_mul_ps(lb(ap[0]), ld(xp[0]));
            for i in 1..5 {
                acc = _mm512_fmadd_ps(lb(ap[i]), ld(xp[i]), acc);
            }
            let v = match MODE {
                SET => acc,
                ADD => _mm512_add_ps(ld(op), acc),
                SUB => _mm512_sub_ps(ld(op), acc),
                _ => _mm512_mul_ps(_mm512_sub_ps(ld(op), acc), lb(sp)),
            };
            _mm512_mask_storeu_ps(op.wrapping_add(k), m, v);
        }
        k += 16;
    }
}

/// AVX-512 version of [`scatter_row5`].
///
/// # Safety
/// As [`scatter_row5`], with AVX-512F instead of AVX2.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) unsafe fn scatter_row5_512(l: [&[u16]; 5], t: &[f32], z: &mut [f32]) {
    let len = z.len();
    let lp = l.map(|s| s.as_ptr());
    let (tp, zp) = (t.as_ptr(), z.as_mut_ptr());
    let mut k = 0;
    while k < len {
        let m = kmask16(len - k);
        let m2 = kpairs8(len - k);
        // SAFETY: lane j reads l[i] and t at j + 4 − i ≤ len + 3 (+1 for the pair), z at j < len.
        unsafe {
            let lt = |i: usize| {
                (
                    ld16bf(lp[i].wrapping_add(k + 4 - i), m2),
                    _mm512_maskz_loadu_ps(m, tp.wrapping_add(k + 4 - i)),
                )
            };
            let (l0, t0) = lt(0);
            let mut acc = _mm512_mul_ps(l0, t0);
            for i in 1..5 {
                let (li, ti) = lt(i);
                acc = _mm512_fmadd_ps(li, ti, acc);
            }
            let v = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, zp.wrapping_add(k)), acc);
            _mm512_mask_storeu_ps(zp.wrapping_add(k), m, v);
        }
        k += 16;
    }
}

/// `out[k] ⊕= Σ_{i<5} a[i][k] · x[i][k]` in `f32` for `k < out.len()` (⊕ chosen by `MODE`), eight lanes.
///
/// # Safety
/// The CPU must support AVX2 and FMA; every slice must hold at least `out.len()` elements (the safe
/// wrapper in `matting_solver.rs` slices them to that length).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn group5_f32<const MODE: u8>(
    a: [&[f32]; 5],
    x: [&[f32]; 5],
    out: &mut [f32],
    scale: &[f32],
) {
    let ap = a.map(|s| s.as_ptr());
    let xp = x.map(|s| s.as_ptr());
    let op = out.as_mut_ptr();
    let sp = scale.as_ptr();
    blocks8!(out.len(), |FULL, k, m, _m2| {
        // SAFETY: only lanes below `len` are enabled in `m`.
        unsafe {
            let mut acc = _mm256_mul_ps(
                ld8f::<FULL>(ap[0].wrapping_add(k), m),
                ld8f::<FULL>(xp[0].wrapping_add(k), m),
            );
            for i in 1..5 {
                acc = _mm256_fmadd_ps(
                    ld8f::<FULL>(ap[i].wrapping_add(k), m),
                    ld8f::<FULL>(xp[i].wrapping_add(k), m),
                    acc,
                );
            }
            let v = match MODE {
                SET => acc,
                ADD => _mm256_add_ps(ld8f::<FULL>(op.wrapping_add(k), m), acc),
                SUB => _mm256_sub_ps(ld8f::<FULL>(op.wrapping_add(k), m), acc),
                _ => _mm256_mul_ps(
                    _mm256_sub_ps(ld8f::<FULL>(op.wrapping_add(k), m), acc),
                    ld8f::<FULL>(sp.wrapping_add(k), m),
                ),
            };
            st8f::<FULL>(op.wrapping_add(k), m, v);
        }
    });
}

/// AVX-512 version of [`group5_f32`] (sixteen f32 lanes).
///
/// # Safety
/// The CPU must support AVX-512F; every slice must hold at least `out.len()` elements.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) unsafe fn group5_f32_512<const MODE: u8>(
    a: [&[f32]; 5],
    x: [&[f32]; 5],
    out: &mut [f32],
    scale: &[f32],
) {
    let len = out.len();
    let ap = a.map(|s| s.as_ptr());
    let xp = x.map(|s| s.as_ptr());
    let op = out.as_mut_ptr();
    let sp = scale.as_ptr();
    let mut k = 0;
    while k < len {
        let m = kmask16(len - k);
        // SAFETY: only lanes below `len` are enabled in `m`.
        unsafe {
            let ld = |p: *const f32| _mm512_maskz_loadu_ps(m, p.wrapping_add(k));
            let mut acc = _mm512_mul_ps(ld(ap[0]), ld(xp[0]));
            for i in 1..5 {
                acc = _mm512_fmadd_ps(ld(ap[i]), ld(xp[i]), acc);
            }
            let v = match MODE {
                SET => acc,
                ADD => _mm512_add_ps(ld(op), acc),
                SUB => _mm512_sub_ps(ld(op), acc),
                _ => _mm512_mul_ps(_mm512_sub_ps(ld(op), acc), ld(sp)),
            };
            _mm512_mask_storeu_ps(op.wrapping_add(k), m, v);
        }
        k += 16;
    }
}

/// The right-looking update of one IC pivot for the 12 rows below it (`matting_solver::Ic::factor`): for each
/// first row `si`, `row[up[si]][t] −= lv[si] · lv[sj]` over the pairs `(si, sj, t)` of `UPD`, as two masked
/// lane permutations of `lv` per row (the products and differences are rounded as in the scalar loop).
///
/// # Safety
/// The CPU must support AVX-512F; `lo` must point to rows of 16 `f64` and every `up[s]` must index one.
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
pub(crate) unsafe fn ic_update_rows_512(
    lo: *mut f64,
    up: &[usize; 12],
    lv: &[f64; 16],
    lanes: &super::solver::UpdLanes,
) {
    // SAFETY: `lv` holds 16 values; the rows are 16 values long (caller).
    unsafe {
        let a = _mm512_loadu_pd(lv.as_ptr());
        let b = _mm512_loadu_pd(lv.as_ptr().add(8));
        for si in 0..12 {
            let (ml, mh) = (lanes.mask_lo[si], lanes.mask_hi[si]);
            if ml | mh == 0 {
                continue;
            }
            let f = _mm512_set1_pd(lv[si]);
            let row = lo.add(up[si] * 16);
            let il = _mm512_loadu_si512(lanes.idx_lo[si].as_ptr().cast());
            let ih = _mm512_loadu_si512(lanes.idx_hi[si].as_ptr().cast());
            let wl = _mm512_maskz_permutex2var_pd(ml, a, il, b);
            let wh = _mm512_maskz_permutex2var_pd(mh, a, ih, b);
            let rl = _mm512_loadu_pd(row);
            let rh = _mm512_loadu_pd(row.add(8));
            _mm512_storeu_pd(row, _mm512_sub_pd(rl, _mm512_mul_pd(f, wl)));
            _mm512_storeu_pd(row.add(8), _mm512_sub_pd(rh, _mm512_mul_pd(f, wh)));
        }
    }
}
