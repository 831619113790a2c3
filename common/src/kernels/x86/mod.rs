//! The x86-64 versions of the kernels: AVX2 with FMA and F16C on every CPU that runs them, and
//! AVX-512 F, BW and VNNI where the CPU has those too ([`X86::avx512`]). They compute the
//! portable code's bits.
//!
//! Each kernel's safe entry takes the [`X86`] that [`Isa`](super::Isa) made after checking the
//! CPU's features, and calls its `target_feature` code on that word: the `unsafe` of these
//! modules is that call, SIMD loads and stores within bounds the code has just checked, and
//! the accumulators of [`pass_accumulators`].
//!
//! - this file: the activations' quantization, and what the kernels share;
//! - [`rows`] and [`k`]: the file layout's dot products, 32-value and K formats;
//! - [`wide_k`]: the K formats on AVX-512, sixteen rows at a time: the sixteen-row layout's
//!   products, and the file layout's prefill;
//! - [`interleaved`] and [`wide`]: the grouped layouts' products;
//! - [`attention`]: attention's scores and value sums.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::isa::X86;
use super::{ActBlock, KBlock, LANES, QK, QK_K};

pub(super) mod attention;
pub(super) mod interleaved;
pub(super) mod k;
pub(super) mod rows;
pub(super) mod wide;
pub(super) mod wide_k;

/// Tokens of a several-token product whose accumulators one pass over a group of rows keeps
/// (on the stack): each group-block of weights is unpacked once per pass.
const TOKENS_PER_PASS: usize = 16;

/// A pass's accumulators: `room`'s first `n` (at most [`TOKENS_PER_PASS`]), set to `init`; the
/// rest of the room stays untouched, so a pass of few tokens clears no more than it uses.
fn pass_accumulators<A: Copy>(
    room: &mut [MaybeUninit<A>; TOKENS_PER_PASS],
    n: usize,
    init: A,
) -> &mut [A] {
    let used = &mut room[..n];
    for acc in used.iter_mut() {
        acc.write(init);
    }
    // SAFETY: the first `n` elements were written just above, and `MaybeUninit<A>` has `A`'s
    // layout.
    unsafe { std::slice::from_raw_parts_mut(used.as_mut_ptr().cast::<A>(), n) }
}

/// How far ahead of the weights in use the one-token products ask for more: far enough that
/// the lines arrive before the loop reaches them (a pair of rows is too close to hide the
/// memory's latency).
const PREFETCH_AHEAD: usize = 4096;

/// Asks for the cache lines `PREFETCH_AHEAD` bytes past `span`, every line the span covers
/// whatever its alignment. Prefetches never fault, so the addresses may run past the matrix's
/// end.
///
/// The hint is non-temporal: a decode step reads each weight once, and lines fetched for one use
/// should not push out of the caches what is used again — the activations and KV rows, and
/// between a worker's steps the code and buffers of the hop. With the default hint a gemma3
/// step's 235 MB sweep left the hop after it cold: the coordinator's send to the first worker
/// took ~160 µs after the head, ~95 µs with this one, for no loss of decode speed.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn prefetch_ahead(span: &[u8]) {
    let start = span.as_ptr().wrapping_add(PREFETCH_AHEAD);
    for off in (0..span.len() + 63).step_by(64) {
        _mm_prefetch::<_MM_HINT_NTA>(start.wrapping_add(off).cast());
    }
}

/// The f16 at `block[at..at + 2]`, converted in one instruction.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_at(block: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([block[at], block[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn group(a: &[i8; 32]) -> __m256i {
    // SAFETY: `a` is 32 bytes.
    unsafe { _mm256_loadu_si256(a.as_ptr().cast()) }
}

/// 32 bytes of `block` from `at`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bytes32(block: &[u8], at: usize) -> __m256i {
    let b = &block[at..at + 32];
    // SAFETY: `b` is 32 bytes.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

/// The sum of eight i32 lanes (exact in any order).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_i32(v: __m256i) -> i32 {
    let x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let x = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
    let x = _mm_add_epi32(x, _mm_shuffle_epi32::<0b01>(x));
    _mm_cvtsi128_si32(x)
}

/// Quantizes one activation row into `Q8_0`/`Q8_1` blocks.
pub(super) fn quantize_row(_: X86, x: &[f32], out: &mut Vec<ActBlock>) {
    // SAFETY: an `X86` is made only where the CPU runs AVX2, FMA and F16C.
    unsafe { quantize_row_avx2(x, out) }
}

/// The portable quantization in registers: the largest magnitude by `max` (exact, in any
/// order), rounding to even in one instruction, packing to bytes with the order restored
/// afterwards. The results are the same bits.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_row_avx2(x: &[f32], out: &mut Vec<ActBlock>) {
    out.clear();
    let sign = _mm256_set1_ps(-0.0);
    // `packs` interleaves the 128-bit halves; this puts the 32-bit groups back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for block in x.chunks_exact(QK) {
        // SAFETY: `block` is 32 f32, four loads of eight.
        let v: [__m256; 4] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(block[8 * i..].as_ptr()) });
        let abs = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let q = v.map(|v| {
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(_mm256_mul_ps(v, id)))
        });
        let sum = hsum_i32(_mm256_add_epi32(
            _mm256_add_epi32(q[0], q[1]),
            _mm256_add_epi32(q[2], q[3]),
        ));
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let mut qs = [0i8; QK];
        // SAFETY: `qs` is 32 bytes.
        unsafe {
            _mm256_storeu_si256(
                qs.as_mut_ptr().cast(),
                _mm256_permutevar8x32_epi32(bytes, order),
            )
        };
        out.push(ActBlock {
            d: through_f16(d),
            s: through_f16(d * sum as f32),
            sum,
            lane_bias: [0; LANES],
            qs,
        });
    }
}

/// `x` rounded to the nearest f16 (ties to even) and back, as `f16::from_f32(x).to_f32()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn through_f16(x: f32) -> f32 {
    let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x));
    _mm_cvtss_f32(_mm_cvtph_ps(h))
}

/// Quantizes one activation row into `Q8_K` blocks.
pub(super) fn quantize_row_k(_: X86, x: &[f32], out: &mut Vec<KBlock>) {
    // SAFETY: an `X86` is made only where the CPU runs AVX2, FMA and F16C.
    unsafe { quantize_row_k_avx2(x, out) }
}

/// The portable `Q8_K` quantization in registers: the largest magnitude by `max`, the
/// first value of that magnitude found by comparing, then the same products, rounding and
/// clamp as the portable code, so the same bits.
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_row_k_avx2(x: &[f32], out: &mut Vec<KBlock>) {
    out.clear();
    let sign = _mm256_set1_ps(-0.0);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let top = _mm256_set1_epi32(127);
    for block in x.chunks_exact(QK_K) {
        // SAFETY: `block` is 256 f32, 32 loads of eight.
        let v: [__m256; 32] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(block[8 * i..].as_ptr()) });
        let abs = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = abs
            .iter()
            .fold(_mm256_setzero_ps(), |m, &a| _mm256_max_ps(a, m));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let mut q = KBlock {
            d: 0.0,
            qs: [[0; QK]; QK_K / QK],
            bsums: [0; QK_K / 16],
        };
        if amax != 0.0 {
            let at = abs
                .iter()
                .enumerate()
                .find_map(|(i, &a)| {
                    let hits =
                        _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(a, _mm256_set1_ps(amax)));
                    (hits != 0).then(|| 8 * i + hits.trailing_zeros() as usize)
                })
                .expect("the largest magnitude is one of the values");
            let iscale = -127.0 / block[at];
            let scale = _mm256_set1_ps(iscale);
            for (g, qs) in q.qs.iter_mut().enumerate() {
                let r: [__m256i; 4] = std::array::from_fn(|i| {
                    let p = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                        _mm256_mul_ps(scale, v[4 * g + i]),
                    );
                    _mm256_min_epi32(_mm256_cvtps_epi32(p), top)
                });
                for (h, sum) in q.bsums[2 * g..2 * g + 2].iter_mut().enumerate() {
                    *sum = hsum_i32(_mm256_add_epi32(r[2 * h], r[2 * h + 1])) as i16;
                }
                let bytes = _mm256_packs_epi16(
                    _mm256_packs_epi32(r[0], r[1]),
                    _mm256_packs_epi32(r[2], r[3]),
                );
                // SAFETY: `qs` is 32 bytes.
                unsafe {
                    _mm256_storeu_si256(
                        qs.as_mut_ptr().cast(),
                        _mm256_permutevar8x32_epi32(bytes, order),
                    )
                };
            }
            q.d = 1.0 / iscale;
        }
        out.push(q);
    }
}

/// `acc + Σ a · b` over each 32-bit lane's two 16-bit pairs, in one instruction: LLVM
/// splits `_mm512_dpwssd_epi32` into a multiply and an add (two instructions where
/// one does) on CPUs it does not know to have fast VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: the instruction reads and writes only these registers; the CPU has
    // AVX-512 VNNI (this function's features).
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}
