//! Our CPU kernels for the products, norms, activations and attention of the networks, and the one
//! place that decides when they run instead of Burn's ops.
//!
//! Burn 0.21's CPU backend (burn-flex) computes each op in a fresh buffer, convolves through an
//! unfolded copy of the whole input, normalises with several reductions and element-wise passes, and
//! walks permuted tensors element by element; on a full-size generation most of the time went there
//! rather than into arithmetic (docs/performance.md). The kernels here work on `f32` slices, call the
//! `gemm` crate (the GEMM burn-flex itself uses) with strides instead of copying, fuse what runs
//! back to back (GroupNorm + SiLU, bias + residual into the product, GEGLU), and reuse scratch memory.
//!
//! # When they run
//!
//! Every network calls the functions of [`crate::amp`] and [`crate::nn`]; those take the path here
//! when the input qualifies: the backend is burn-flex itself (inference, `flex.rs`) or `Autodiff<Flex>`
//! (training: each kernel becomes one node of Burn's autodiff graph with our backward pass,
//! `autodiff.rs`), the tensor is `f32`, no autocast scope is active, and the kernels are not switched
//! off (`BLIPD_CPU_KERNELS=burn`, or [`set_enabled`]). Otherwise the same functions run Burn's ops,
//! which is also how the CUDA build runs. The unit tests compare each kernel with a direct reference and
//! each backward pass with directional derivatives; the models' parity suite runs through them.
//! [`profile`] keeps the time spent in each kernel (`blipd bench` prints it).

pub mod attention;
pub mod conv;
pub mod gemm;
pub mod math;
pub mod norm;

pub(crate) mod autodiff;
pub(crate) mod flex;
pub(crate) mod ops;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};

/// 0: not yet read from the environment, 1: on, 2: off.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Whether our kernels may replace Burn's ops (default on; `BLIPD_CPU_KERNELS=burn` turns them off).
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = !matches!(
                std::env::var("BLIPD_CPU_KERNELS").as_deref(),
                Ok("burn") | Ok("off") | Ok("0")
            );
            ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Turns our kernels on or off for the whole process (benchmarks and tests compare both paths).
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether 3×3 convolutions may use Winograd's F(2×2, 3×3) (default on; `BLIPD_WINOGRAD=0` turns it
/// off, for comparisons).
pub(crate) fn winograd_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("BLIPD_WINOGRAD").as_deref(),
            Ok("0") | Ok("off")
        )
    })
}

/// Threads the kernels split work over (rayon's pool).
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// A vector of `n` floats every element of which the caller writes before reading.
///
/// The allocation is not zeroed: a fresh multi-megabyte buffer would otherwise be written twice (the
/// kernel's zero pages, then ours).
pub(crate) fn output(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: `f32` has no invalid bit patterns and every caller overwrites all `n` elements (the
    // products write with `read_dst = false` or after a fill) before anything reads them.
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    v
}

thread_local! {
    static SCRATCH: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch buffer of at least `n` floats (contents unspecified), reused across
/// calls on this thread so that large temporaries (unfolded convolution inputs, attention scores)
/// do not map fresh pages every call. Nested calls get distinct buffers.
pub(crate) fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    if buf.len() < n {
        drop(std::mem::take(&mut buf));
        buf = output(n);
    }
    let r = f(&mut buf[..n]);
    SCRATCH.with(|s| s.borrow_mut().push(buf));
    r
}

/// A raw pointer that may cross to rayon's threads: each task writes a disjoint region, which the
/// code handing it out guarantees.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: see the type's docs; the pointee outlives the parallel section that uses it.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// Where the kernels' time goes: seconds and calls per kernel since the last [`take_profile`], for
/// `blipd bench` (one relaxed atomic add per call; always on).
pub mod profile {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    /// The kernels timed, in report order.
    pub const KERNELS: [&str; 14] = [
        "conv2d",
        "conv2d backward",
        "linear",
        "linear backward",
        "attention",
        "attention backward",
        "group_norm",
        "group_norm backward",
        "layer_norm",
        "layer_norm backward",
        "activation",
        "activation backward",
        "1x1 conv <-> tokens",
        "embedding backward",
    ];

    static NANOS: [AtomicU64; 14] = [const { AtomicU64::new(0) }; 14];
    static CALLS: [AtomicU64; 14] = [const { AtomicU64::new(0) }; 14];

    /// Adds the time since `start` to kernel `k` (an index of [`KERNELS`]).
    pub(crate) fn add(k: usize, start: Instant) {
        NANOS[k].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        CALLS[k].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds its lifetime to kernel `k` when dropped.
    pub(crate) struct Timer(usize, Instant);

    impl Timer {
        pub(crate) fn start(k: usize) -> Self {
            Self(k, Instant::now())
        }
    }

    impl Drop for Timer {
        fn drop(&mut self) {
            add(self.0, self.1);
        }
    }

    /// `(kernel, seconds, calls)` since the last call, resetting the counts.
    pub fn take() -> Vec<(&'static str, f64, u64)> {
        KERNELS
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (
                    *name,
                    NANOS[i].swap(0, Ordering::Relaxed) as f64 / 1e9,
                    CALLS[i].swap(0, Ordering::Relaxed),
                )
            })
            .collect()
    }
}
