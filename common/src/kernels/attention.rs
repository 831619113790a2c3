//! The inner loops of attention: query–key scores and the online softmax over values, on the
//! [`Isa`] the caller hands down: AVX2 and AVX-512 (x86-64), NEON (aarch64), or the portable
//! code ([`portable::score_blocks`], [`portable::accumulate`]), which defines the bits.
//!
//! A score is one chain over the dimensions, `((q₀k₀ + q₁k₁) + q₂k₂) + …`, each product rounded
//! before it is added; eight keys (a block of the cache) are scored side by side, one per lane,
//! and several blocks at once so that their chains hide each other's latency. On a new maximum
//! score the value accumulator is rescaled in the same step that adds the value:
//! `acc = v · weight + acc · rescale`, in f16 (rounded after each step) or f32.

use half::f16;

#[cfg(target_arch = "aarch64")]
use super::neon;
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{portable, Isa};
use crate::kv::{LayerKv, KEY_BLOCK};

/// `q · key j` for the `count` keys from `first` of KV head `head`, in that order, at
/// `buf[skip..skip + count]`, returning `skip`. Scores are computed a whole block of keys at a
/// time, into `buf`.
pub(crate) fn scores(
    isa: Isa,
    q: &[f32],
    kv: &LayerKv,
    head: usize,
    first: usize,
    count: usize,
    buf: &mut Vec<f32>,
) -> usize {
    let (start, end) = (first / KEY_BLOCK, (first + count).div_ceil(KEY_BLOCK));
    buf.clear();
    buf.resize((end - start) * KEY_BLOCK, 0.0);
    match isa {
        Isa::Portable => portable::score_blocks(q, kv, head, start, buf),
        #[cfg(target_arch = "x86_64")]
        Isa::X86(cpu) => x86::attention::score_blocks(cpu, q, kv, head, start, buf),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon(cpu) => neon::attention::score_blocks(cpu, q, kv, head, start, buf),
    }
    first - start * KEY_BLOCK
}

/// The softmax-weighted sums of the values of the keys from `first` for `m` queries of KV head
/// `head` at once (a group of grouped-query attention, which share the values): `scores` holds
/// each query's scores (already scaled), `count` apiece, one query after the other; each sum is
/// written normalized to `out`, `head_dim` values per query in the same order. `steps` and
/// `sums` are scratch.
///
/// The softmax is online, one key at a time in order: a key scoring a new maximum rescales
/// what came before by `exp(old - new)` and weighs 1, any other weighs `exp(s - max)`. The
/// weights and rescales depend on the scores alone, so they are all worked out first; then the
/// values are summed, `acc = v · weight + acc · rescale` (in f16, rounded after each step, or
/// f32), with the accumulators in registers over all the keys: each query's sums are the bits
/// it would get alone, the queries only share the loads of the values and the time each step
/// waits for the last.
#[allow(clippy::too_many_arguments)]
pub(crate) fn softmax_values(
    isa: Isa,
    scores: &[f32],
    count: usize,
    kv: &LayerKv,
    head: usize,
    first: usize,
    narrow: bool,
    out: &mut [f32],
    steps: &mut Vec<(f32, f32)>,
    sums: &mut Vec<f32>,
) {
    steps.clear();
    sums.clear();
    for scores in scores.chunks_exact(count) {
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
        sums.push(sum);
    }
    let head_dim = out.len() / sums.len().max(1);
    let value = |j: usize| kv.value(first + j, head, head_dim);
    out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    let done = match isa {
        Isa::X86(cpu) => x86::attention::weighted_sums(cpu, out, head_dim, steps, &value, narrow),
        Isa::Portable => 0,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    // What the registers did not cover (all of it without x86 SIMD), one key at a time.
    if done < head_dim {
        for (out, steps) in out
            .chunks_exact_mut(head_dim)
            .zip(steps.chunks_exact(count))
        {
            for (j, &(rescale, weight)) in steps.iter().enumerate() {
                accumulate(
                    isa,
                    &mut out[done..],
                    &value(j)[done..],
                    rescale,
                    weight,
                    narrow,
                );
            }
        }
    }
    for (out, &sum) in out.chunks_exact_mut(head_dim).zip(sums.iter()) {
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

/// `acc = v · weight + acc · rescale`, rounded to f16 when `narrow`.
fn accumulate(isa: Isa, acc: &mut [f32], v: &[f16], rescale: f32, weight: f32, narrow: bool) {
    match isa {
        Isa::Portable => portable::accumulate(acc, v, rescale, weight, narrow),
        #[cfg(target_arch = "x86_64")]
        Isa::X86(cpu) => x86::attention::accumulate(cpu, acc, v, rescale, weight, narrow),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon(cpu) => neon::attention::accumulate(cpu, acc, v, rescale, weight, narrow),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every path this CPU runs, not only the fastest, against the sequential definitions.
    #[test]
    fn scores_and_accumulation_compute_the_sequential_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for head_dim in [64, 128, 256, 80, 12] {
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
            let all_scores: Vec<f32> = (0..len).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            for isa in Isa::every() {
                for (head, first) in [(0, 0), (1, 3), (1, 17), (0, 44)] {
                    let mut buf = Vec::new();
                    let skip = scores(isa, &q, &kv, head, first, len - first, &mut buf);
                    let got = &buf[skip..][..len - first];
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
                            "{isa:?} {head_dim} head {head} key {j}"
                        );
                    }
                }
                // The whole softmax over values against the sequential definition, key by key,
                // for groups of one to five queries (each query's scores a shifted slice).
                for narrow in [true, false] {
                    for (head, first) in [(0, 0), (1, 5), (1, 40)] {
                        for m in 1..=5 {
                            let count = len - first;
                            let scores: Vec<f32> = (0..m)
                                .flat_map(|q| all_scores[first..].iter().map(move |s| s - q as f32))
                                .collect();
                            let mut got = vec![0.0; m * head_dim];
                            let (mut steps, mut sums) = (Vec::new(), Vec::new());
                            softmax_values(
                                isa, &scores, count, &kv, head, first, narrow, &mut got,
                                &mut steps, &mut sums,
                            );
                            for (q, scores) in scores.chunks_exact(count).enumerate() {
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
                                    portable::accumulate(&mut want, v, rescale, weight, narrow);
                                }
                                let want: Vec<f32> = want.iter().map(|a| a * (1.0 / sum)).collect();
                                assert_eq!(
                                    bits(&got[q * head_dim..][..head_dim]),
                                    bits(&want),
                                    "{isa:?} {head_dim} {narrow} {head} {first} query {q} of {m}"
                                );
                            }
                        }
                    }
                }
                for narrow in [true, false] {
                    let (mut a, mut b) = (vec![0.5f32; head_dim], vec![0.5f32; head_dim]);
                    for (j, rescale) in [(0, 0.25), (1, 1.0), (2, 0.5)] {
                        let v = kv.value(j, 1, head_dim);
                        accumulate(isa, &mut a, v, rescale, 0.75, narrow);
                        portable::accumulate(&mut b, v, rescale, 0.75, narrow);
                    }
                    assert_eq!(bits(&a), bits(&b), "{isa:?} accumulate {head_dim} {narrow}");
                }
            }
        }
    }
}
