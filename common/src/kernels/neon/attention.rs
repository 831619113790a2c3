//! Attention's inner loops (see [`crate::kernels::attention`]) in NEON registers, four lanes at
//! a time: each product rounded before it is added, as the portable code does, so the same
//! bits.

use std::arch::aarch64::*;

use half::f16;

use super::{narrow_f16, widen_f16, Neon};
use crate::kernels::portable;
use crate::kv::{LayerKv, KEY_BLOCK};

/// Eight f16 at `x[at..at + 8]` widened, as values `0..4` and `4..8`.
#[inline]
#[target_feature(enable = "neon")]
fn load_f16(x: &[f16], at: usize) -> [float32x4_t; 2] {
    let x = &x[at..at + 8];
    // SAFETY: `x` holds eight f16, 16 bytes.
    let h = unsafe { vld1q_u16(x.as_ptr().cast()) };
    [widen_f16(vget_low_u16(h)), widen_f16(vget_high_u16(h))]
}

/// Scores `q` against the key blocks from `start` of KV head `head`, one block of keys per
/// `KEY_BLOCK` values of `out`.
pub(in crate::kernels) fn score_blocks(
    _: Neon,
    q: &[f32],
    kv: &LayerKv,
    head: usize,
    start: usize,
    out: &mut [f32],
) {
    // SAFETY: a `Neon` is made only where the CPU runs NEON.
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

/// `acc = v · weight + acc · rescale`, rounded to f16 when `narrow`.
pub(in crate::kernels) fn accumulate(
    _: Neon,
    acc: &mut [f32],
    v: &[f16],
    rescale: f32,
    weight: f32,
    narrow: bool,
) {
    // SAFETY: a `Neon` is made only where the CPU runs NEON.
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
    portable::accumulate(&mut acc[whole..], &v[whole..], rescale, weight, narrow);
}
