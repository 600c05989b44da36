//! Run-time choice of the instruction set the kernels use.

use std::sync::OnceLock;

/// The instruction sets the micro-kernels are built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust, whatever the compiler makes of it for the base target.
    Portable,
    /// 256-bit vectors with fused multiply-add (x86-64).
    Avx2Fma,
    /// 512-bit vectors (x86-64, `avx512f`).
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU supports, detected once.
    ///
    /// `FASTFLOW_ISA=portable|avx2|avx512` caps it (for measurements and
    /// tests); a value the CPU does not support is ignored.
    pub fn detect() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let best = Self::supported().into_iter().max().unwrap_or(Isa::Portable);
            let cap = match std::env::var("FASTFLOW_ISA").as_deref() {
                Ok("portable") => Some(Isa::Portable),
                Ok("avx2") => Some(Isa::Avx2Fma),
                Ok("avx512") => Some(Isa::Avx512),
                _ => None,
            };
            cap.map_or(best, |c| c.min(best))
        })
    }

    /// Every instruction set this CPU can run, the portable one first.
    pub fn supported() -> Vec<Isa> {
        let mut out = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                out.push(Isa::Avx2Fma);
            }
            if is_x86_feature_detected!("avx512f") {
                out.push(Isa::Avx512);
            }
        }
        out
    }

    /// Whether this CPU can run `self` (detected once).
    pub fn is_supported(self) -> bool {
        static SUPPORTED: OnceLock<Vec<Isa>> = OnceLock::new();
        SUPPORTED.get_or_init(Self::supported).contains(&self)
    }

    /// A short name for reports: `avx512`, `avx2+fma` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Avx512 => "avx512",
        }
    }
}

/// Which implementation the models run on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// This crate's kernels (the default).
    Kernels,
    /// candle's own device-generic operations, as on other devices; chosen
    /// with `FASTFLOW_KERNELS=generic`, so that the route every other device
    /// takes can be checked against the reference on the CPU too.
    Generic,
}

impl Route {
    /// The route in force: `FASTFLOW_KERNELS=generic` selects
    /// [`Route::Generic`], anything else (or nothing) [`Route::Kernels`].
    /// Read on every call, so a test can switch it.
    pub fn current() -> Route {
        match std::env::var("FASTFLOW_KERNELS").as_deref() {
            Ok("generic") => Route::Generic,
            _ => Route::Kernels,
        }
    }
}
