//! The instruction-set level the hot loops (closed-form matting, foreground estimation) run at: the best this CPU
//! has, detected once, optionally capped by the environment variable `BLIPD_SIMD` (`generic`, `avx2` or
//! `avx512`) to compare the code paths on one machine. All levels compute the same result up to rounding (the
//! matting tests compare them).

use std::sync::OnceLock;

/// An instruction-set level, ordered from the plainest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable code (what the compiler's baseline target allows).
    Generic,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512F + VL (with AVX2 and FMA).
    Avx512,
}

impl SimdLevel {
    /// The name `BLIPD_SIMD` takes.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Generic => "generic",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<SimdLevel> {
        [SimdLevel::Generic, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .find(|l| l.name() == s.trim().to_ascii_lowercase())
    }
}

/// The best level this CPU supports.
pub fn detected() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            if has!("avx512f") && has!("avx512vl") {
                return SimdLevel::Avx512;
            }
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Generic
}

/// The level in use: [`detected`], capped by `BLIPD_SIMD` when it is set (read once; an unknown value is
/// reported once on stderr and ignored).
pub fn level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = detected();
        match std::env::var("BLIPD_SIMD") {
            Ok(v) => match SimdLevel::parse(&v) {
                Some(cap) => best.min(cap),
                None => {
                    eprintln!(
                        "BLIPD_SIMD={v:?} is not one of generic, avx2, avx512: using {}",
                        best.name()
                    );
                    best
                }
            },
            Err(_) => best,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_levels_are_ordered() {
        for l in [SimdLevel::Generic, SimdLevel::Avx2, SimdLevel::Avx512] {
            assert_eq!(SimdLevel::parse(l.name()), Some(l));
        }
        assert_eq!(SimdLevel::parse(" AVX2 "), Some(SimdLevel::Avx2));
        assert_eq!(SimdLevel::parse("sse"), None);
        assert!(SimdLevel::Generic < SimdLevel::Avx2 && SimdLevel::Avx2 < SimdLevel::Avx512);
        assert!(level() <= detected());
    }
}
