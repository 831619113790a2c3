//! The file layout's dot products for the 32-value formats (`Q4_0`, `Q4_1`, `Q5_0`, `Q8_0`) in
//! NEON: eight lanes of four products per block, as the portable code groups them.

use std::arch::aarch64::*;

use super::{act16, bytes16, dot4, f16_at, load16, load16_i8, Neon};
use crate::kernels::portable::each_row;
use crate::kernels::ActBlock;
use crate::quant::GgmlType;

/// Dots every row of `rows` with every token's activations: `out[r * n + t]`.
pub(in crate::kernels) fn dot_rows(
    cpu: Neon,
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    // SAFETY: a `Neon` is made only where the CPU runs NEON, and says whether it runs the dot
    // product extension, which `SDOT` asks for.
    unsafe {
        if cpu.dotprod() {
            dot_rows_neon::<true>(dtype, rows, row_bytes, acts, out)
        } else {
            dot_rows_neon::<false>(dtype, rows, row_bytes, acts, out)
        }
    }
}

#[target_feature(enable = "neon")]
fn dot_rows_neon<const SDOT: bool>(
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    each_row(rows, row_bytes, acts, out, |row, act| match dtype {
        GgmlType::Q4_0 => dot_row::<SDOT, 18>(row, act),
        GgmlType::Q4_1 => dot_row::<SDOT, 20>(row, act),
        GgmlType::Q5_0 => dot_row::<SDOT, 22>(row, act),
        _ => dot_row::<SDOT, 34>(row, act),
    })
}

/// One file-layout block of `BLOCK` bytes (18: `Q4_0`, 20: `Q4_1`, 22: `Q5_0`, 34: `Q8_0`) as
/// its values `0..16` and `16..32`, signed (`Q4_1`'s unsigned, which fit as well).
#[inline]
#[target_feature(enable = "neon")]
fn unpack<const BLOCK: usize>(block: &[u8]) -> [int8x16_t; 2] {
    let low = vdupq_n_u8(0x0F);
    let nibbles = |at: usize| {
        let v = load16(block, at);
        [vandq_u8(v, low), vshrq_n_u8::<4>(v)]
    };
    match BLOCK {
        18 => {
            let [lo, hi] = nibbles(2);
            let eight = vdupq_n_s8(8);
            [
                vsubq_s8(vreinterpretq_s8_u8(lo), eight),
                vsubq_s8(vreinterpretq_s8_u8(hi), eight),
            ]
        }
        20 => {
            let [lo, hi] = nibbles(4);
            [vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi)]
        }
        22 => {
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            let qh = vreinterpretq_u8_u32(vdupq_n_u32(qh));
            let bit = bytes16([1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128]);
            let high = vdupq_n_u8(0xF0);
            let [lo, hi] = nibbles(6);
            // Value j's fifth bit is bit j of qh: byte j / 8, bit j % 8.
            let fifth = |v: uint8x16_t, first: u8| {
                let mut spread = [first; 16];
                spread[8..].fill(first + 1);
                let set = vtstq_u8(vqtbl1q_u8(qh, bytes16(spread)), bit);
                // Without the fifth bit a value is nibble - 16: set the top four bits.
                vreinterpretq_s8_u8(vorrq_u8(v, vbicq_u8(high, set)))
            };
            [fifth(lo, 0), fifth(hi, 2)]
        }
        _ => [load16_i8(block, 2), load16_i8(block, 18)],
    }
}

/// [`dot_q4_0`](crate::kernels::portable::dot_q4_0) and the others: eight lanes of four
/// products, scaled once per block into f32 lanes by fused multiply-adds, summed in the portable
/// order.
#[inline]
#[target_feature(enable = "neon")]
fn dot_row<const SDOT: bool, const BLOCK: usize>(row: &[u8], act: &[ActBlock]) -> f32 {
    let zero = vdupq_n_s32(0);
    let (mut low, mut high) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let mut summs = 0.0f32;
    for (block, a) in row.chunks_exact(BLOCK).zip(act) {
        let [w0, w1] = unpack::<BLOCK>(block);
        let dd = vdupq_n_f32(f16_at(block, 0) * a.d);
        let l0 = dot4::<SDOT>(zero, w0, act16(&a.qs, 0));
        let l1 = dot4::<SDOT>(zero, w1, act16(&a.qs, 16));
        low = vfmaq_f32(low, dd, vcvtq_f32_s32(l0));
        high = vfmaq_f32(high, dd, vcvtq_f32_s32(l1));
        if BLOCK == 20 {
            summs += f16_at(block, 2) * a.s;
        }
    }
    let sum = hsum(low, high);
    if BLOCK == 20 {
        sum + summs
    } else {
        sum
    }
}

/// [`hsum`](crate::kernels::portable::hsum) of lanes `0..4` and `4..8`:
/// `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
#[inline]
#[target_feature(enable = "neon")]
fn hsum(low: float32x4_t, high: float32x4_t) -> f32 {
    let r = vaddq_f32(low, high);
    let r = vadd_f32(vget_low_f32(r), vget_high_f32(r));
    vget_lane_f32::<0>(r) + vget_lane_f32::<1>(r)
}
