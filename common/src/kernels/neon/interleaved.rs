//! The interleaved layout's group products (see [`crate::kernels::interleaved`]) in NEON.
//!
//! A 16-byte register holds 16 bytes of one of a group-block's four unpacked vectors `k`: rows
//! `2j` and `2j + 1`, each row's values `8k..8k + 4` and `8k + 4..8k + 8` in 32-bit lanes, the
//! file-layout kernels' lanes `2k` and `2k + 1`. An activation register holds bytes
//! `8k..8k + 8` twice, so one four-product dot per lane ([`dot4`]) meets all four lanes.
//! Quants are taken signed: `Q5_0`'s offset of 16 comes off each byte, `Q8_0`'s quants are
//! stored signed, and `Q4_0`'s offset of 8 comes off the integer totals.

use std::arch::aarch64::*;

use super::{bytes16, dot4, f16x8, load16, load16_i8, Neon};
use crate::kernels::interleaved::formats::{format, lanes, Q4_0, Q4_1, Q5_0, Q8_0};
use crate::kernels::interleaved::{
    group_block_bytes, nibbles_at, MASKS_AT, NIBBLES, ROWS, UNPACKED,
};
use crate::kernels::ActBlock;
use crate::quant::GgmlType;

/// One group's products with every token: `out[t * ROWS + i]` for row `i` of the group.
pub(in crate::kernels) fn group_matmul(
    cpu: Neon,
    dtype: GgmlType,
    group: &[u8],
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    // SAFETY: a `Neon` is made only where the CPU runs NEON, and says whether it runs the dot
    // product extension, which `SDOT` asks for.
    unsafe {
        match (cpu.dotprod(), dtype) {
            (true, GgmlType::Q4_0) => group_matmul_neon::<true, Q4_0>(group, acts, out),
            (true, GgmlType::Q4_1) => group_matmul_neon::<true, Q4_1>(group, acts, out),
            (true, GgmlType::Q5_0) => group_matmul_neon::<true, Q5_0>(group, acts, out),
            (true, _) => group_matmul_neon::<true, Q8_0>(group, acts, out),
            (false, GgmlType::Q4_0) => group_matmul_neon::<false, Q4_0>(group, acts, out),
            (false, GgmlType::Q4_1) => group_matmul_neon::<false, Q4_1>(group, acts, out),
            (false, GgmlType::Q5_0) => group_matmul_neon::<false, Q5_0>(group, acts, out),
            (false, _) => group_matmul_neon::<false, Q8_0>(group, acts, out),
        }
    }
}

/// A group-block's quants, `[k][j]`: vector `k = 2h + p` (see the module's header of
/// [`crate::kernels::interleaved`]) for rows `2j` and `2j + 1`.
type Quants = [[int8x16_t; 4]; 4];

/// Activation bytes `8k..8k + 8`, twice.
#[inline]
#[target_feature(enable = "neon")]
fn act_pair(a: &ActBlock, k: usize) -> int8x16_t {
    let bytes = &a.qs[8 * k..8 * k + 8];
    // SAFETY: `bytes` is 8 bytes.
    vreinterpretq_s8_s64(unsafe { vld1q_dup_s64(bytes.as_ptr().cast()) })
}

/// A group-block unpacked: once for every token of a prefill, or for its one use in decode.
#[derive(Clone, Copy)]
struct Unpacked {
    q: Quants,
    /// The rows' scales, rows `0..4` and `4..8`.
    d: [float32x4_t; 2],
    /// (`Q4_1`) the rows' minimums.
    m: [float32x4_t; 2],
}

impl Unpacked {
    /// The quants of a group-block, unsigned for `Q4_0` and `Q4_1` (0..15), signed for `Q5_0`
    /// (its offset taken off) and `Q8_0`, with the rows' scales (and minimums).
    ///
    /// `SDOT` changes nothing here but gives each kernel its own copy, which then has one
    /// caller and is inlined into it.
    #[inline]
    #[target_feature(enable = "neon")]
    fn new<const SDOT: bool, const F: u8>(gb: &[u8]) -> Self {
        let d = f16x8(gb, 0);
        let m = if F == Q4_1 { f16x8(gb, 16) } else { d };
        if F == Q8_0 {
            let quants = &gb[nibbles_at(format(F))..][..UNPACKED];
            let q = std::array::from_fn(|k| {
                std::array::from_fn(|j| load16_i8(quants, 64 * k + 16 * j))
            });
            return Self { q, d, m };
        }
        let low = vdupq_n_u8(0x0F);
        let nibbles = &gb[nibbles_at(format(F))..][..NIBBLES];
        let packed: [[uint8x16_t; 4]; 2] =
            std::array::from_fn(|p| std::array::from_fn(|j| load16(nibbles, 64 * p + 16 * j)));
        // Low nibbles are vectors 0 and 1, high nibbles 2 and 3.
        let mut q: [[uint8x16_t; 4]; 4] = std::array::from_fn(|k| {
            std::array::from_fn(|j| {
                if k < 2 {
                    vandq_u8(packed[k][j], low)
                } else {
                    vshrq_n_u8::<4>(packed[k - 2][j])
                }
            })
        });
        if F == Q5_0 {
            // Byte b of register j takes bit b % 8 of mask k's byte 2j + b / 8, its row's; masks
            // are looked up in pairs, mask k in bytes 8 (k % 2)..8 (k % 2) + 8 of the pair.
            let bit = bytes16([1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128]);
            let spread: [[uint8x16_t; 4]; 2] = std::array::from_fn(|odd| {
                std::array::from_fn(|j| {
                    let first = (8 * odd + 2 * j) as u8;
                    let mut at = [first; 16];
                    at[8..].fill(first + 1);
                    bytes16(at)
                })
            });
            let high = vdupq_n_u8(0xF0);
            for (k, q) in q.iter_mut().enumerate() {
                let masks = load16(gb, MASKS_AT + 16 * (k / 2));
                for (q, spread) in q.iter_mut().zip(&spread[k % 2]) {
                    let set = vtstq_u8(vqtbl1q_u8(masks, *spread), bit);
                    // Without the fifth bit a value is nibble - 16: set the top four bits.
                    *q = vorrq_u8(*q, vbicq_u8(high, set));
                }
            }
        }
        Self {
            q: std::array::from_fn(|k| std::array::from_fn(|j| vreinterpretq_s8_u8(q[k][j]))),
            d,
            m,
        }
    }
}

/// One token's accumulators for the eight rows of a group.
struct Acc {
    /// (`Q5_0`, `Q8_0`) `[k][j]`: file lanes `2k` and `2k + 1` of rows `2j` and `2j + 1`.
    lanes: [[float32x4_t; 4]; 4],
    /// (`Q4_0`, `Q4_1`) one per row, rows `0..4` and `4..8`.
    rows: [float32x4_t; 2],
    /// (`Q4_1`) the minimums' sum.
    summs: [float32x4_t; 2],
}

impl Acc {
    #[inline]
    #[target_feature(enable = "neon")]
    fn new() -> Self {
        let zero = vdupq_n_f32(0.0);
        Self {
            lanes: [[zero; 4]; 4],
            rows: [zero; 2],
            summs: [zero; 2],
        }
    }

    /// Adds one group-block.
    #[inline]
    #[target_feature(enable = "neon")]
    fn add<const SDOT: bool, const F: u8>(&mut self, u: &Unpacked, a: &ActBlock) {
        let zero = vdupq_n_s32(0);
        let acts: [int8x16_t; 4] = std::array::from_fn(|k| act_pair(a, k));
        // `d_w · d_a` per row, as the portable code rounds it.
        let dd = [vmulq_n_f32(u.d[0], a.d), vmulq_n_f32(u.d[1], a.d)];
        if lanes(F) {
            // Row 2j's scale in lanes 0 and 1, row 2j + 1's in lanes 2 and 3.
            let scale = [
                vzip1q_f32(dd[0], dd[0]),
                vzip2q_f32(dd[0], dd[0]),
                vzip1q_f32(dd[1], dd[1]),
                vzip2q_f32(dd[1], dd[1]),
            ];
            for ((q, acc), y) in u.q.iter().zip(&mut self.lanes).zip(&acts) {
                for ((q, acc), scale) in q.iter().zip(acc).zip(&scale) {
                    let dot = vcvtq_f32_s32(dot4::<SDOT>(zero, *q, *y));
                    *acc = vfmaq_f32(*acc, *scale, dot);
                }
            }
            return;
        }
        // Each pair of rows' lanes, then each row's two lanes summed: exact integers.
        let pairs: [int32x4_t; 4] =
            std::array::from_fn(|j| (0..4).fold(zero, |s, k| dot4::<SDOT>(s, u.q[k][j], acts[k])));
        let dots = [
            vpaddq_s32(pairs[0], pairs[1]),
            vpaddq_s32(pairs[2], pairs[3]),
        ];
        for h in 0..2 {
            let dot = if F == Q4_0 {
                vsubq_s32(dots[h], vdupq_n_s32(8 * a.sum))
            } else {
                dots[h]
            };
            self.rows[h] = vfmaq_f32(self.rows[h], dd[h], vcvtq_f32_s32(dot));
            if F == Q4_1 {
                self.summs[h] = vaddq_f32(self.summs[h], vmulq_n_f32(u.m[h], a.s));
            }
        }
    }

    /// The eight rows' results; lanes are summed in the file-layout kernels' order.
    #[inline]
    #[target_feature(enable = "neon")]
    fn store<const F: u8>(&self, ys: &mut [f32]) {
        let v = if lanes(F) {
            let l = &self.lanes;
            // Even lanes (l0 + l4) + (l2 + l6), odd lanes (l1 + l5) + (l3 + l7), then the two.
            let x: [float32x4_t; 4] = std::array::from_fn(|j| {
                vaddq_f32(vaddq_f32(l[0][j], l[2][j]), vaddq_f32(l[1][j], l[3][j]))
            });
            [vpaddq_f32(x[0], x[1]), vpaddq_f32(x[2], x[3])]
        } else if F == Q4_1 {
            [
                vaddq_f32(self.rows[0], self.summs[0]),
                vaddq_f32(self.rows[1], self.summs[1]),
            ]
        } else {
            self.rows
        };
        let ys = &mut ys[..ROWS];
        // SAFETY: `ys` holds ROWS (eight) f32.
        unsafe {
            vst1q_f32(ys.as_mut_ptr(), v[0]);
            vst1q_f32(ys[4..].as_mut_ptr(), v[1]);
        }
    }
}

#[target_feature(enable = "neon")]
fn group_matmul_neon<const SDOT: bool, const F: u8>(
    group: &[u8],
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    let gb_bytes = group_block_bytes(format(F));
    // Prefill unpacks each block for the first token and keeps it for the others; decode
    // unpacks each block for its one use. (One place unpacks and one adds, so both inline.)
    let prefill = acts.len() > 1;
    let mut blocks: Vec<Unpacked> =
        Vec::with_capacity(if prefill { group.len() / gb_bytes } else { 0 });
    for (act, ys) in acts.iter().zip(out.chunks_exact_mut(ROWS)) {
        let mut acc = Acc::new();
        for (b, (gb, a)) in group.chunks_exact(gb_bytes).zip(act).enumerate() {
            let u = match blocks.get(b) {
                Some(u) => *u,
                None => {
                    let u = Unpacked::new::<SDOT, F>(gb);
                    if prefill {
                        blocks.push(u);
                    }
                    u
                }
            };
            acc.add::<SDOT, F>(&u, a);
        }
        acc.store::<F>(ys);
    }
}
