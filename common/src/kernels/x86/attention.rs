//! Attention's inner loops (see [`crate::kernels::attention`]) in AVX2, and the value sums in
//! AVX-512 where the CPU has it: each product rounded before it is added, as the portable code
//! does, so the same bits.

use std::arch::x86_64::*;

use half::f16;

use super::X86;
use crate::kernels::portable;
use crate::kv::{LayerKv, KEY_BLOCK};

/// Eight f16 at `x[at..at + 8]` widened.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_f16(x: &[f16], at: usize) -> __m256 {
    let x = &x[at..at + 8];
    // SAFETY: `x` holds eight f16, 16 bytes.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(x.as_ptr().cast()) })
}

/// Scores `q` against the key blocks from `start` of KV head `head`, one block of keys per
/// `KEY_BLOCK` values of `out`.
pub(in crate::kernels) fn score_blocks(
    _: X86,
    q: &[f32],
    kv: &LayerKv,
    head: usize,
    start: usize,
    out: &mut [f32],
) {
    // SAFETY: an `X86` is made only where the CPU runs AVX2, FMA and F16C.
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

/// `acc = v · weight + acc · rescale`, rounded to f16 when `narrow`.
pub(in crate::kernels) fn accumulate(
    _: X86,
    acc: &mut [f32],
    v: &[f16],
    rescale: f32,
    weight: f32,
    narrow: bool,
) {
    // SAFETY: an `X86` is made only where the CPU runs AVX2, FMA and F16C.
    unsafe { accumulate_avx2(acc, v, rescale, weight, narrow) }
}

/// Dimensions whose accumulators one AVX2 pass over the keys keeps in registers.
const DIMS_PER_PASS: usize = 64;

/// Sixteen-lane accumulators an AVX-512 pass keeps in registers, over the queries of a group:
/// as many chains as hide the latency of a step (two products, a sum and the f16 rounding),
/// half the register file.
const CHAINS: usize = 16;

/// The weighted sums of `value(j)` over each query's `steps` into `out` (zeros, `head_dim`
/// values per query, the steps `steps.len() / queries` per query, one query after the other),
/// the accumulators in registers over every key: the same operations as
/// [`portable::accumulate`], in the same order. Where `cpu` runs AVX-512, up to four queries go
/// together, sharing each load of a value, in passes of as many dimensions as keep
/// [`CHAINS`] accumulators; else each query in AVX2 passes of [`DIMS_PER_PASS`]. Returns how
/// many leading dimensions of each query it covered (the same for all).
pub(in crate::kernels) fn weighted_sums<'a>(
    cpu: X86,
    out: &mut [f32],
    head_dim: usize,
    steps: &[(f32, f32)],
    value: &impl Fn(usize) -> &'a [f16],
    narrow: bool,
) -> usize {
    let queries = out.len() / head_dim;
    let count = steps.len() / queries.max(1);
    if cpu.avx512() && queries <= 4 {
        let mut at = 0;
        // Passes of 16·V dimensions, V vectors per query, the widest first.
        for v in [16, 8, 4] {
            if queries * v > CHAINS {
                continue;
            }
            while head_dim - at >= 16 * v {
                // One instance per shape, the accumulators' count fixed for the registers.
                macro_rules! pass {
                    ($(($q:literal, $v:literal)),*) => {
                        match (queries, v) {
                            $(($q, $v) => group_pass::<$q, $v>(
                                out, head_dim, steps, count, value, at, narrow,
                            ),)*
                            _ => unreachable!("queries * v <= CHAINS"),
                        }
                    };
                }
                // SAFETY: `cpu` says this CPU runs AVX-512 F, with AVX2, FMA and F16C.
                unsafe { pass!((1, 16), (1, 8), (1, 4), (2, 8), (2, 4), (3, 4), (4, 4)) }
                at += 16 * v;
            }
        }
        return at;
    }
    let covered = head_dim / DIMS_PER_PASS * DIMS_PER_PASS;
    for (acc, steps) in out
        .chunks_exact_mut(head_dim)
        .zip(steps.chunks_exact(count))
    {
        for (pass, acc) in acc[..covered].chunks_exact_mut(DIMS_PER_PASS).enumerate() {
            // SAFETY: an `X86` is made only where the CPU runs AVX2, FMA and F16C.
            unsafe { weighted_pass_avx2(acc, steps, value, pass * DIMS_PER_PASS, narrow) }
        }
    }
    covered
}

/// One pass of [`weighted_sums`] over dimensions `at..at + 16 * V` of `Q` queries.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn group_pass<'a, const Q: usize, const V: usize>(
    out: &mut [f32],
    head_dim: usize,
    steps: &[(f32, f32)],
    count: usize,
    value: &impl Fn(usize) -> &'a [f16],
    at: usize,
    narrow: bool,
) {
    let mut a = [[_mm512_setzero_ps(); V]; Q];
    for j in 0..count {
        let v = &value(j)[at..at + 16 * V];
        let w: [__m512; Q] = std::array::from_fn(|q| _mm512_set1_ps(steps[q * count + j].1));
        let r: [__m512; Q] = std::array::from_fn(|q| _mm512_set1_ps(steps[q * count + j].0));
        for k in 0..V {
            // SAFETY: `v` holds 16·V f16, sixteen per vector.
            let x = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(v[16 * k..].as_ptr().cast()) });
            for q in 0..Q {
                let mut y = _mm512_add_ps(_mm512_mul_ps(x, w[q]), _mm512_mul_ps(a[q][k], r[q]));
                if narrow {
                    y = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(y));
                }
                a[q][k] = y;
            }
        }
    }
    for (q, a) in a.iter().enumerate() {
        let acc = &mut out[q * head_dim + at..][..16 * V];
        for (k, a) in a.iter().enumerate() {
            // SAFETY: `acc` holds 16·V f32, sixteen per vector.
            unsafe { _mm512_storeu_ps(acc[16 * k..].as_mut_ptr(), *a) };
        }
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
            let mut x = _mm256_add_ps(_mm256_mul_ps(load_f16(v, 8 * k), w), _mm256_mul_ps(*a, r));
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
    portable::accumulate(&mut acc[whole..], &v[whole..], rescale, weight, narrow);
}
