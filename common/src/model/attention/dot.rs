//! The inner loops of attention: query–key scores and the online softmax over values, with
//! AVX2 (x86-64) and NEON (aarch64) paths chosen at run time and portable code that computes
//! the same bits.
//!
//! A score is one chain over the dimensions, `((q₀k₀ + q₁k₁) + q₂k₂) + …`, each product rounded
//! before it is added; eight keys (a block of the cache) are scored side by side, one per lane,
//! and several blocks at once so that their chains hide each other's latency. On a new maximum
//! score the value accumulator is rescaled in the same step that adds the value:
//! `acc = v · weight + acc · rescale`, in f16 (rounded after each step) or f32.

use half::f16;

use crate::kv::{LayerKv, KEY_BLOCK};

/// `q · key j` for the `count` keys from `first` of KV head `head`, in that order. Scores are
/// computed a whole block of keys at a time, into `buf`.
pub(super) fn scores<'a>(
    q: &[f32],
    kv: &LayerKv,
    head: usize,
    first: usize,
    count: usize,
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    let head_dim = q.len();
    let (start, end) = (first / KEY_BLOCK, (first + count).div_ceil(KEY_BLOCK));
    buf.clear();
    buf.resize((end - start) * KEY_BLOCK, 0.0);
    #[cfg(target_arch = "x86_64")]
    let done = simd::available() && {
        simd::score_blocks(q, kv, head, start, buf);
        true
    };
    #[cfg(target_arch = "aarch64")]
    let done = neon::available() && {
        neon::score_blocks(q, kv, head, start, buf);
        true
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let done = false;
    if !done {
        for (b, out) in buf.chunks_exact_mut(KEY_BLOCK).enumerate() {
            let keys = kv.key_block(start + b, head, head_dim);
            for (lane, out) in out.iter_mut().enumerate() {
                *out = q.iter().enumerate().fold(0.0f32, |acc, (d, &q)| {
                    acc + q * keys[d * KEY_BLOCK + lane].to_f32()
                });
            }
        }
    }
    let skip = first - start * KEY_BLOCK;
    &buf[skip..skip + count]
}

/// One query's softmax-weighted sum of the values of the keys from `first`, scored `scores`
/// (already scaled), written normalized to `out` (`head_dim` values). `steps` is scratch.
///
/// The softmax is online, one key at a time in order: a key scoring a new maximum rescales
/// what came before by `exp(old - new)` and weighs 1, any other weighs `exp(s - max)`. The
/// weights and rescales depend on the scores alone, so they are all worked out first; then the
/// values are summed, `acc = v · weight + acc · rescale` (in f16, rounded after each step, or
/// f32), with the accumulator in registers over all the keys.
pub(super) fn softmax_values(
    scores: &[f32],
    kv: &LayerKv,
    head: usize,
    first: usize,
    narrow: bool,
    out: &mut [f32],
    steps: &mut Vec<(f32, f32)>,
) {
    steps.clear();
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    for &s in scores {
        let (rescale, weight) = if s > max {
            let old = max;
            max = s;
            ((old - s).exp(), 1.0)
        } else {
            (1.0, (s - max).exp())
        };
        sum = sum * rescale + weight;
        steps.push((rescale, weight));
    }
    let head_dim = out.len();
    let value = |j: usize| kv.value(first + j, head, head_dim);
    out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    let done = simd::weighted_sum(out, steps, &value, narrow);
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    // What the registers did not cover (all of it without x86 SIMD), one key at a time.
    for (j, &(rescale, weight)) in steps.iter().enumerate() {
        accumulate(&mut out[done..], &value(j)[done..], rescale, weight, narrow);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// `acc = v · weight + acc · rescale`, rounded to f16 when `narrow`.
fn accumulate(acc: &mut [f32], v: &[f16], rescale: f32, weight: f32, narrow: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        return simd::accumulate(acc, v, rescale, weight, narrow);
    }
    #[cfg(target_arch = "aarch64")]
    if neon::available() {
        return neon::accumulate(acc, v, rescale, weight, narrow);
    }
    accumulate_portable(acc, v, rescale, weight, narrow)
}

fn accumulate_portable(acc: &mut [f32], v: &[f16], rescale: f32, weight: f32, narrow: bool) {
    for (a, v) in acc.iter_mut().zip(v) {
        let x = v.to_f32() * weight + *a * rescale;
        *a = if narrow { f16::from_f32(x).to_f32() } else { x };
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{LayerKv, KEY_BLOCK};

    pub fn available() -> bool {
        crate::kernels::simd_available()
    }

    /// Eight f16 at `x[at..at + 8]` widened.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_f16(x: &[f16], at: usize) -> __m256 {
        let x = &x[at..at + 8];
        // SAFETY: `x` holds eight f16, 16 bytes.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(x.as_ptr().cast()) })
    }

    pub fn score_blocks(q: &[f32], kv: &LayerKv, head: usize, start: usize, out: &mut [f32]) {
        // SAFETY: `available()` checked AVX2, FMA and F16C on this CPU.
        unsafe { score_blocks_avx2(q, kv, head, start, out) }
    }

    /// Blocks scored together: independent chains in flight.
    const AT_ONCE: usize = 4;

    #[target_feature(enable = "avx2,fma,f16c")]
    fn score_blocks_avx2(q: &[f32], kv: &LayerKv, head: usize, start: usize, out: &mut [f32]) {
        let head_dim = q.len();
        let store = |out: &mut [f32], acc: __m256| {
            // SAFETY: `out` holds KEY_BLOCK (eight) f32.
            unsafe { _mm256_storeu_ps(out[..KEY_BLOCK].as_mut_ptr(), acc) }
        };
        let mut groups = out.chunks_exact_mut(AT_ONCE * KEY_BLOCK);
        let mut block = start;
        for group in &mut groups {
            let keys: [&[f16]; AT_ONCE] =
                std::array::from_fn(|i| kv.key_block(block + i, head, head_dim));
            let mut acc = [_mm256_setzero_ps(); AT_ONCE];
            for (d, &q) in q.iter().enumerate() {
                let q = _mm256_set1_ps(q);
                for (acc, keys) in acc.iter_mut().zip(&keys) {
                    let k = load_f16(keys, d * KEY_BLOCK);
                    *acc = _mm256_add_ps(*acc, _mm256_mul_ps(q, k));
                }
            }
            for (out, acc) in group.chunks_exact_mut(KEY_BLOCK).zip(acc) {
                store(out, acc);
            }
            block += AT_ONCE;
        }
        for out in groups.into_remainder().chunks_exact_mut(KEY_BLOCK) {
            let keys = kv.key_block(block, head, head_dim);
            let mut acc = _mm256_setzero_ps();
            for (d, &q) in q.iter().enumerate() {
                let k = load_f16(keys, d * KEY_BLOCK);
                acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(q), k));
            }
            store(out, acc);
            block += 1;
        }
    }

    pub fn accumulate(acc: &mut [f32], v: &[f16], rescale: f32, weight: f32, narrow: bool) {
        // SAFETY: `available()` checked AVX2, FMA and F16C on this CPU.
        unsafe { accumulate_avx2(acc, v, rescale, weight, narrow) }
    }

    /// Dimensions whose accumulators one pass over the keys keeps in registers.
    const DIMS_PER_PASS: usize = 64;

    /// The weighted sum of `value(j)` over `steps` into `acc` (zeros), [`DIMS_PER_PASS`]
    /// dimensions at a time, the accumulators in registers over every key; the same operations
    /// as [`super::accumulate_portable`], in the same order. Returns how many leading
    /// dimensions it covered.
    pub fn weighted_sum<'a>(
        acc: &mut [f32],
        steps: &[(f32, f32)],
        value: &impl Fn(usize) -> &'a [f16],
        narrow: bool,
    ) -> usize {
        if !available() {
            return 0;
        }
        let covered = acc.len() / DIMS_PER_PASS * DIMS_PER_PASS;
        for (pass, acc) in acc[..covered].chunks_exact_mut(DIMS_PER_PASS).enumerate() {
            let at = pass * DIMS_PER_PASS;
            if crate::kernels::avx512_available() {
                // SAFETY: checked AVX-512 F (and, by `available()`, F16C) on this CPU.
                unsafe { weighted_pass_avx512(acc, steps, value, at, narrow) }
            } else {
                // SAFETY: `available()` checked AVX2, FMA and F16C on this CPU.
                unsafe { weighted_pass_avx2(acc, steps, value, at, narrow) }
            }
        }
        covered
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn weighted_pass_avx512<'a>(
        acc: &mut [f32],
        steps: &[(f32, f32)],
        value: &impl Fn(usize) -> &'a [f16],
        at: usize,
        narrow: bool,
    ) {
        const VECTORS: usize = DIMS_PER_PASS / 16;
        let mut a = [_mm512_setzero_ps(); VECTORS];
        for (j, &(rescale, weight)) in steps.iter().enumerate() {
            let v = &value(j)[at..at + DIMS_PER_PASS];
            let (w, r) = (_mm512_set1_ps(weight), _mm512_set1_ps(rescale));
            for (k, a) in a.iter_mut().enumerate() {
                // SAFETY: `v` holds DIMS_PER_PASS f16, sixteen per vector.
                let v = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(v[16 * k..].as_ptr().cast()) });
                let mut x = _mm512_add_ps(_mm512_mul_ps(v, w), _mm512_mul_ps(*a, r));
                if narrow {
                    x = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
                }
                *a = x;
            }
        }
        for (k, a) in a.iter().enumerate() {
            // SAFETY: `acc` holds DIMS_PER_PASS f32, sixteen per vector.
            unsafe { _mm512_storeu_ps(acc[16 * k..].as_mut_ptr(), *a) };
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn weighted_pass_avx2<'a>(
        acc: &mut [f32],
        steps: &[(f32, f32)],
        value: &impl Fn(usize) -> &'a [f16],
        at: usize,
        narrow: bool,
    ) {
        const VECTORS: usize = DIMS_PER_PASS / 8;
        let mut a = [_mm256_setzero_ps(); VECTORS];
        for (j, &(rescale, weight)) in steps.iter().enumerate() {
            let v = &value(j)[at..at + DIMS_PER_PASS];
            let (w, r) = (_mm256_set1_ps(weight), _mm256_set1_ps(rescale));
            for (k, a) in a.iter_mut().enumerate() {
                let mut x =
                    _mm256_add_ps(_mm256_mul_ps(load_f16(v, 8 * k), w), _mm256_mul_ps(*a, r));
                if narrow {
                    x = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
                }
                *a = x;
            }
        }
        for (k, a) in a.iter().enumerate() {
            // SAFETY: `acc` holds DIMS_PER_PASS f32, eight per vector.
            unsafe { _mm256_storeu_ps(acc[8 * k..].as_mut_ptr(), *a) };
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn accumulate_avx2(acc: &mut [f32], v: &[f16], rescale: f32, weight: f32, narrow: bool) {
        let whole = acc.len() / 8 * 8;
        let (w, r) = (_mm256_set1_ps(weight), _mm256_set1_ps(rescale));
        for at in (0..whole).step_by(8) {
            let out = &mut acc[at..at + 8];
            // SAFETY: `out` holds eight f32.
            let a = unsafe { _mm256_loadu_ps(out.as_ptr()) };
            let mut x = _mm256_add_ps(_mm256_mul_ps(load_f16(v, at), w), _mm256_mul_ps(a, r));
            if narrow {
                x = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x));
            }
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), x) };
        }
        super::accumulate_portable(&mut acc[whole..], &v[whole..], rescale, weight, narrow);
    }
}

/// The AVX2 loops in NEON registers, four lanes at a time: each product rounded before it is
/// added, as the portable code does, so the same bits.
#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod neon {
    use std::arch::aarch64::*;

    use half::f16;

    use super::{LayerKv, KEY_BLOCK};
    use crate::kernels::{narrow_f16, widen_f16};

    pub fn available() -> bool {
        crate::kernels::neon_available()
    }

    /// Eight f16 at `x[at..at + 8]` widened, as values `0..4` and `4..8`.
    #[inline]
    #[target_feature(enable = "neon")]
    fn load_f16(x: &[f16], at: usize) -> [float32x4_t; 2] {
        let x = &x[at..at + 8];
        // SAFETY: `x` holds eight f16, 16 bytes.
        let h = unsafe { vld1q_u16(x.as_ptr().cast()) };
        [widen_f16(vget_low_u16(h)), widen_f16(vget_high_u16(h))]
    }

    pub fn score_blocks(q: &[f32], kv: &LayerKv, head: usize, start: usize, out: &mut [f32]) {
        // SAFETY: `available()` checked NEON on this CPU.
        unsafe { score_blocks_neon(q, kv, head, start, out) }
    }

    /// Blocks scored together: independent chains in flight.
    const AT_ONCE: usize = 4;

    /// One block's scores: eight lanes, as values `0..4` and `4..8`.
    type Lanes = [float32x4_t; 2];

    #[target_feature(enable = "neon")]
    fn score_blocks_neon(q: &[f32], kv: &LayerKv, head: usize, start: usize, out: &mut [f32]) {
        let head_dim = q.len();
        let store = |out: &mut [f32], acc: Lanes| {
            let out = &mut out[..KEY_BLOCK];
            // SAFETY: `out` holds KEY_BLOCK (eight) f32.
            unsafe {
                vst1q_f32(out.as_mut_ptr(), acc[0]);
                vst1q_f32(out[4..].as_mut_ptr(), acc[1]);
            }
        };
        let zero = vdupq_n_f32(0.0);
        let mut groups = out.chunks_exact_mut(AT_ONCE * KEY_BLOCK);
        let mut block = start;
        for group in &mut groups {
            let keys: [&[f16]; AT_ONCE] =
                std::array::from_fn(|i| kv.key_block(block + i, head, head_dim));
            let mut acc = [[zero; 2]; AT_ONCE];
            for (d, &q) in q.iter().enumerate() {
                for (acc, keys) in acc.iter_mut().zip(&keys) {
                    let k = load_f16(keys, d * KEY_BLOCK);
                    for (acc, k) in acc.iter_mut().zip(k) {
                        *acc = vaddq_f32(*acc, vmulq_n_f32(k, q));
                    }
                }
            }
            for (out, acc) in group.chunks_exact_mut(KEY_BLOCK).zip(acc) {
                store(out, acc);
            }
            block += AT_ONCE;
        }
        for out in groups.into_remainder().chunks_exact_mut(KEY_BLOCK) {
            let keys = kv.key_block(block, head, head_dim);
            let mut acc = [zero; 2];
            for (d, &q) in q.iter().enumerate() {
                let k = load_f16(keys, d * KEY_BLOCK);
                for (acc, k) in acc.iter_mut().zip(k) {
                    *acc = vaddq_f32(*acc, vmulq_n_f32(k, q));
                }
            }
            store(out, acc);
            block += 1;
        }
    }

    pub fn accumulate(acc: &mut [f32], v: &[f16], rescale: f32, weight: f32, narrow: bool) {
        // SAFETY: `available()` checked NEON on this CPU.
        unsafe { accumulate_neon(acc, v, rescale, weight, narrow) }
    }

    #[target_feature(enable = "neon")]
    fn accumulate_neon(acc: &mut [f32], v: &[f16], rescale: f32, weight: f32, narrow: bool) {
        let whole = acc.len() / 8 * 8;
        for at in (0..whole).step_by(8) {
            let values = load_f16(v, at);
            let out = &mut acc[at..at + 8];
            for (half, v) in values.into_iter().enumerate() {
                let out = &mut out[4 * half..4 * half + 4];
                // SAFETY: `out` holds four f32.
                let a = unsafe { vld1q_f32(out.as_ptr()) };
                let mut x = vaddq_f32(vmulq_n_f32(v, weight), vmulq_n_f32(a, rescale));
                if narrow {
                    x = widen_f16(narrow_f16(x));
                }
                // SAFETY: as above.
                unsafe { vst1q_f32(out.as_mut_ptr(), x) };
            }
        }
        super::accumulate_portable(&mut acc[whole..], &v[whole..], rescale, weight, narrow);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn scores_and_accumulation_compute_the_sequential_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for head_dim in [64, 256, 12] {
            // Two heads; 45 positions fill five blocks and part of a sixth.
            let (heads, len) = (2, 45);
            let width = heads * head_dim;
            let mut kv = LayerKv::default();
            let mut rows = Vec::new();
            for _ in 0..len {
                let k: Vec<f32> = (0..width).map(|_| rng.random_range(-2.0..2.0)).collect();
                let v: Vec<f32> = (0..width).map(|_| rng.random_range(-2.0..2.0)).collect();
                kv.append(width, &k, &v);
                rows.push(k);
            }
            assert_eq!(kv.len(), len);
            let q: Vec<f32> = (0..head_dim)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            for (head, first) in [(0, 0), (1, 3), (1, 17), (0, 44)] {
                let mut buf = Vec::new();
                let got = scores(&q, &kv, head, first, len - first, &mut buf);
                assert_eq!(got.len(), len - first);
                for (j, &s) in (first..len).zip(got) {
                    let key = &rows[j][head * head_dim..(head + 1) * head_dim];
                    let want = q
                        .iter()
                        .zip(key)
                        .fold(0.0f32, |acc, (&q, &k)| acc + q * f16::from_f32(k).to_f32());
                    assert_eq!(
                        s.to_bits(),
                        want.to_bits(),
                        "{head_dim} head {head} key {j}"
                    );
                }
            }
            // The whole softmax over values against the sequential definition, key by key.
            let scores: Vec<f32> = (0..len).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            for narrow in [true, false] {
                for (head, first) in [(0, 0), (1, 5), (1, 40)] {
                    let mut got = vec![0.0; head_dim];
                    let mut steps = Vec::new();
                    let scores = &scores[first..];
                    softmax_values(scores, &kv, head, first, narrow, &mut got, &mut steps);
                    let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
                    let mut want = vec![0.0f32; head_dim];
                    for (j, &s) in scores.iter().enumerate() {
                        let (rescale, weight) = if s > max {
                            let old = max;
                            max = s;
                            ((old - s).exp(), 1.0)
                        } else {
                            (1.0, (s - max).exp())
                        };
                        sum = sum * rescale + weight;
                        let v = kv.value(first + j, head, head_dim);
                        accumulate_portable(&mut want, v, rescale, weight, narrow);
                    }
                    let want: Vec<f32> = want.iter().map(|a| a * (1.0 / sum)).collect();
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{head_dim} {narrow} {head} {first}"
                    );
                }
            }
            for narrow in [true, false] {
                let (mut a, mut b) = (vec![0.5f32; head_dim], vec![0.5f32; head_dim]);
                for (j, rescale) in [(0, 0.25), (1, 1.0), (2, 0.5)] {
                    let v = kv.value(j, 1, head_dim);
                    accumulate(&mut a, v, rescale, 0.75, narrow);
                    accumulate_portable(&mut b, v, rescale, 0.75, narrow);
                }
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "accumulate {head_dim} {narrow}");
            }
        }
    }
}
