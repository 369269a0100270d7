//! The instruction-set level the hot loops (closed-form matting, foreground estimation) run at: the best this CPU
//! has, optionally capped by the environment variable `BLIPD_SIMD` (`generic`, `avx2` or
//! `avx512`) to compare the code paths on one machine. All levels compute the same result up to rounding (the
//! matting tests compare them). The matting solver takes AVX2 on Zen 4 unless asked for AVX-512
//! ([`short_run_level`]).

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

/// `BLIPD_SIMD`, parsed (read once; empty is unset; an unknown value is reported once on stderr and ignored).
fn requested() -> Option<SimdLevel> {
    static REQUESTED: OnceLock<Option<SimdLevel>> = OnceLock::new();
    *REQUESTED.get_or_init(|| {
        let v = std::env::var("BLIPD_SIMD")
            .ok()
            .filter(|v| !v.trim().is_empty())?;
        let parsed = SimdLevel::parse(&v);
        if parsed.is_none() {
            eprintln!(
                "BLIPD_SIMD={v:?} is not one of generic, avx2, avx512: using the detected level"
            );
        }
        parsed
    })
}

/// The level in use: [`detected`], capped by `BLIPD_SIMD` when it is set.
pub fn level() -> SimdLevel {
    let best = detected();
    requested().map_or(best, |cap| best.min(cap))
}

/// The level for loops over short runs of pixels (the closed-form matting solver): [`level`], except AVX2 where
/// the CPU executes 512-bit operations as two 256-bit halves (AMD family 19h, Zen 4) unless `BLIPD_SIMD=avx512`
/// asks for AVX-512. Measured on a Zen 4, alternated runs of the matting benchmark: the AVX2 build 0.285–0.306 s
/// against the AVX-512 build's 0.306–0.323 s for the six photos (docs/bench/matting.md, session 6).
pub fn short_run_level() -> SimdLevel {
    // Decided once: CPUID is a VM exit under a hypervisor, and this is asked on every solve.
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let l = level();
        if l == SimdLevel::Avx512 && splits_512_bit() && requested() != Some(SimdLevel::Avx512) {
            SimdLevel::Avx2
        } else {
            l
        }
    })
}

/// Whether this is an AMD family 19h CPU (Zen 3 and Zen 4; of these only Zen 4 has AVX-512, on 256-bit units).
fn splits_512_bit() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        #[allow(unused_unsafe)]
        // SAFETY: CPUID is available on every x86-64 CPU.
        let (v, f) = unsafe { (__cpuid(0), __cpuid(1)) };
        let amd = [v.ebx, v.edx, v.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163]; // "AuthenticAMD"
        let family = ((f.eax >> 8) & 0xf) + ((f.eax >> 20) & 0xff);
        amd && family == 0x19
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
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
        assert!(short_run_level() <= level());
    }
}
