//! Thread-local reuse of the closed-form solver's large buffers.
//!
//! One 512² solve allocates about 40 MB in some forty vectors (grid vectors, matrix and factor bands, CG
//! vectors, on every level of the pyramid). Fresh allocations of that size come from `mmap`, so every page is
//! faulted in and zeroed by the kernel on first touch, and glibc hands them back on `free`: on the benchmark
//! photos that was ~4 ms of a ~48 ms solve. [`Buf`] takes its storage from a small per-thread pool and returns
//! it on drop, so a thread that mattes many images (the rayon workers of `blipd data synth`) touches the
//! same pages again. A pool keeps at most [`MAX_KEPT`] vectors and [`MAX_POOLED_BYTES`] per element type;
//! anything beyond is freed as usual.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Vectors kept per element type and thread.
const MAX_KEPT: usize = 24;
/// Bytes kept per element type and thread (a 2048² image needs about 16× the 512² working set).
const MAX_POOLED_BYTES: usize = 256 << 20;
/// Smaller vectors are not worth pooling.
const MIN_POOLED_BYTES: usize = 16 << 10;

/// Element types with a pool.
pub(crate) trait Pooled: Copy + 'static {
    /// Runs `f` on the pool; `None` during thread teardown, once the pool is gone.
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R>;
}

macro_rules! pooled {
    ($t:ty, $name:ident) => {
        thread_local! {
            static $name: RefCell<Vec<Vec<$t>>> = const { RefCell::new(Vec::new()) };
        }
        impl Pooled for $t {
            fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> Option<R> {
                $name.try_with(|p| f(&mut p.borrow_mut())).ok()
            }
        }
    };
}
pooled!(f64, POOL_F64);
pooled!(f32, POOL_F32);
pooled!(u32, POOL_U32);
pooled!(u16, POOL_U16);
pooled!(bool, POOL_BOOL);
pooled!([f32; 4], POOL_F32X4);
pooled!([f32; 8], POOL_F32X8);

/// A `Vec<T>` whose storage comes from, and returns to, the calling thread's pool.
pub(crate) struct Buf<T: Pooled>(Vec<T>);

impl<T: Pooled> Buf<T> {
    /// The pooled vector with the smallest sufficient capacity (else the largest one, which grows), with its
    /// old contents, and room for `len` elements.
    fn take(len: usize) -> Vec<T> {
        let mut v = T::with_pool(|pool| {
            let fit = (0..pool.len())
                .filter(|&i| pool[i].capacity() >= len)
                .min_by_key(|&i| pool[i].capacity());
            let pick = fit.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].capacity()));
            pick.map(|i| pool.swap_remove(i))
        })
        .flatten()
        .unwrap_or_default();
        v.reserve(len.saturating_sub(v.len()));
        v
    }

    /// `len` copies of `value` (as `vec![value; len]`).
    pub(crate) fn filled(len: usize, value: T) -> Self {
        let mut v = Self::take(len);
        v.clear();
        v.resize(len, value);
        Buf(v)
    }

    /// `len` elements for a caller that writes every one of them before reading it: the pooled storage keeps
    /// whatever it held (only elements beyond its old length are set to `value`), which saves the fill.
    pub(crate) fn for_overwrite(len: usize, value: T) -> Self {
        let mut v = Self::take(len);
        v.truncate(len);
        v.resize(len, value);
        Buf(v)
    }

    /// The elements of `it` (as `collect()`).
    pub(crate) fn collect(len_hint: usize, it: impl IntoIterator<Item = T>) -> Self {
        let mut v = Self::take(len_hint);
        v.clear();
        v.extend(it);
        Buf(v)
    }
}

impl<T: Pooled> Drop for Buf<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        let bytes = v.capacity() * std::mem::size_of::<T>();
        if bytes < MIN_POOLED_BYTES {
            return;
        }
        // During thread teardown the pool may already be gone; the vector is then freed.
        T::with_pool(|pool| {
            let held: usize =
                pool.iter().map(|b| b.capacity()).sum::<usize>() * std::mem::size_of::<T>();
            if pool.len() < MAX_KEPT && held + bytes <= MAX_POOLED_BYTES {
                pool.push(v);
            }
        });
    }
}

impl<T: Pooled> Deref for Buf<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0
    }
}

impl<T: Pooled> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.0
    }
}

impl<T: Pooled> From<Vec<T>> for Buf<T> {
    /// Adopts a vector (its storage joins the pool on drop).
    fn from(v: Vec<T>) -> Self {
        Buf(v)
    }
}

impl<'a, T: Pooled> IntoIterator for &'a Buf<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<T: Pooled + PartialEq> PartialEq for Buf<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<T: Pooled + std::fmt::Debug> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_refilled() {
        let p = {
            let mut b = Buf::<f64>::filled(10_000, 1.5);
            b[3] = 7.0;
            b.as_ptr()
        };
        // The same storage comes back, refilled.
        let b = Buf::<f64>::filled(9_000, 0.0);
        assert_eq!(b.as_ptr(), p);
        assert!(b.iter().all(|&v| v == 0.0) && b.len() == 9_000);
        // A larger request while that one is held gets other storage; small vectors are not pooled.
        let c = Buf::<f64>::filled(20_000, 2.0);
        assert_ne!(c.as_ptr(), p);
        assert_eq!(c.len(), 20_000);
        let s = Buf::<u32>::collect(3, [1, 2, 3]);
        assert_eq!(&s[..], &[1, 2, 3]);
        drop(b);
        // Storage for overwriting keeps its old contents and sets only the new tail.
        let o = Buf::<f64>::for_overwrite(9_500, 5.0);
        assert_eq!(o.as_ptr(), p);
        assert_eq!(
            (o[0], o[8_999], o[9_000], o[9_499], o.len()),
            (0.0, 0.0, 5.0, 5.0, 9_500)
        );
    }
}
