//! The instruction set the kernels run on, detected once.
//!
//! Which version of a kernel runs is an [`Isa`]: the CPU is asked once per process
//! ([`Isa::detect`]), then the value is handed down. A [`QMatrix`](super::QMatrix) keeps the one
//! it was built for (its layout depends on it) and attention takes the detected one per call, so
//! no kernel asks the CPU again, and no inner loop reads more than a value in a register.
//!
//! An `Isa` that names SIMD carries an [`X86`] or a [`Neon`], which only this module makes, after
//! checking the CPU's features: holding one is the word that this CPU runs those instructions,
//! and the SIMD modules' `unsafe` calls of their `target_feature` functions rest on it. Tests
//! take every path the CPU runs ([`Isa::every`]), not only the fastest, and check its bits
//! against the portable code's.

use std::sync::OnceLock;

/// What the kernels run on: the portable code, or a SIMD path this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// No SIMD: the code that defines the bits.
    Portable,
    #[cfg(target_arch = "x86_64")]
    X86(X86),
    #[cfg(target_arch = "aarch64")]
    Neon(Neon),
}

/// x86-64 with AVX2, FMA and F16C, and AVX-512 F, BW and VNNI where [`avx512`](Self::avx512).
/// Only [`Isa`] makes one, where the CPU has them.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct X86 {
    avx512: bool,
}

#[cfg(target_arch = "x86_64")]
impl X86 {
    /// Whether the AVX-512 paths run too: integer dot products in one instruction (VNNI), the
    /// K formats' prefill tile, the sixteen-row layout, sixteen-lane value sums in attention.
    pub(crate) fn avx512(self) -> bool {
        self.avx512
    }
}

/// aarch64 with NEON, and the dot product extension (FEAT_DotProd) where
/// [`dotprod`](Self::dotprod). Only [`Isa`] makes one, where the CPU has them.
#[cfg(target_arch = "aarch64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Neon {
    dotprod: bool,
}

#[cfg(target_arch = "aarch64")]
impl Neon {
    /// Whether four byte products are summed into each 32-bit lane in one instruction (`sdot`)
    /// rather than by widening multiplies and pairwise adds.
    pub(crate) fn dotprod(self) -> bool {
        self.dotprod
    }
}

impl Isa {
    /// The fastest path this CPU runs, asked of the CPU on the first call only.
    pub(crate) fn detect() -> Self {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| Self::every()[0])
    }

    /// Every path this CPU runs, fastest first; the portable code last.
    pub(crate) fn every() -> Vec<Self> {
        let mut every = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
            {
                every.push(Self::X86(X86 { avx512: true }));
            }
            every.push(Self::X86(X86 { avx512: false }));
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            if std::arch::is_aarch64_feature_detected!("dotprod") {
                every.push(Self::Neon(Neon { dotprod: true }));
            }
            every.push(Self::Neon(Neon { dotprod: false }));
        }
        every.push(Self::Portable);
        every
    }
}
