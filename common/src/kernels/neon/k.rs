//! The file layout's dot products for the K formats (`Q4_K`, `Q6_K`) in NEON: decode row by
//! row, prefill in tiles of rows unpacked once for every token. The integer totals are exact,
//! and every f32 operation is the portable code's, in its order: the same bits.

use std::arch::aarch64::*;

use super::{act16, dot4, f16_at, load16, load_f32, Neon};
use crate::kernels::portable::{each_row, q4_k_min_sum, q4_k_scales, Q4_K_SIZE, Q6_K_SIZE};
use crate::kernels::{KBlock, QK, QK_K};
use crate::quant::GgmlType;

/// Dots every row of `rows` with every token's activations: `out[r * n + t]`.
pub(in crate::kernels) fn dot_rows_k(
    cpu: Neon,
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<KBlock>],
    out: &mut [f32],
) {
    // SAFETY: a `Neon` is made only where the CPU runs NEON, and says whether it runs the dot
    // product extension, which `SDOT` asks for.
    unsafe {
        if cpu.dotprod() {
            dot_rows_k_neon::<true>(dtype, rows, row_bytes, acts, out)
        } else {
            dot_rows_k_neon::<false>(dtype, rows, row_bytes, acts, out)
        }
    }
}

/// One token (decode): row by row, each block unpacked as it goes. Several (prefill): tiles of
/// [`K_TILE`] rows unpacked once for every token, each activation load serving the tile's
/// rows; the rows left over after the last whole tile go row by row.
#[target_feature(enable = "neon")]
fn dot_rows_k_neon<const SDOT: bool>(
    dtype: GgmlType,
    mut rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<KBlock>],
    mut out: &mut [f32],
) {
    let n = acts.len();
    if n > 1 {
        let block_bytes = dtype.type_size();
        let blocks = row_bytes / block_bytes;
        let mut unpacked: Vec<KUnpacked> = Vec::with_capacity(K_TILE * blocks);
        let mut tiles = rows.chunks_exact(K_TILE * row_bytes);
        let mut tile_outs = out.chunks_exact_mut(K_TILE * n);
        for (tile, ys) in (&mut tiles).zip(&mut tile_outs) {
            unpacked.clear();
            for block in tile.chunks_exact(block_bytes) {
                unpacked.push(KUnpacked::new(dtype, block));
            }
            let tile_rows: [&[KUnpacked]; K_TILE] =
                std::array::from_fn(|r| &unpacked[r * blocks..(r + 1) * blocks]);
            // Each super-block's scales for the tile's rows, gathered once for every token.
            let scales: Vec<[float32x4_t; 2]> = (0..blocks)
                .map(|b| {
                    let d: [f32; K_TILE] = std::array::from_fn(|r| tile_rows[r][b].d);
                    let dmin: [f32; K_TILE] = std::array::from_fn(|r| tile_rows[r][b].dmin);
                    [load_f32(&d, 0), load_f32(&dmin, 0)]
                })
                .collect();
            for (t, act) in acts.iter().enumerate() {
                let y = dot_k_tile::<SDOT>(dtype, tile_rows, &scales, act);
                for (r, y) in y.into_iter().enumerate() {
                    ys[r * n + t] = y;
                }
            }
        }
        rows = tiles.remainder();
        out = tile_outs.into_remainder();
    }
    each_row(rows, row_bytes, acts, out, |row, act| match dtype {
        GgmlType::Q4K => dot_q4_k::<SDOT>(row, act),
        _ => dot_q6_k::<SDOT>(row, act),
    })
}

/// Values `16h..16h + 16` of each 32-value part of half `half` of a `Q6_K` super-block,
/// unsigned (0..63): the low bits from `ql`, the high two from `qh` (see
/// [`dot_q6_k`](crate::kernels::portable::dot_q6_k)).
#[inline]
#[target_feature(enable = "neon")]
fn q6_k_parts(block: &[u8], half: usize, h: usize) -> [uint8x16_t; 4] {
    let low = vdupq_n_u8(0x0F);
    let high = vdupq_n_u8(0x30);
    let ql0 = load16(block, 64 * half + 16 * h);
    let ql1 = load16(block, 64 * half + 32 + 16 * h);
    let qh = load16(block, 128 + 32 * half + 16 * h);
    [
        vorrq_u8(vandq_u8(ql0, low), vandq_u8(vshlq_n_u8::<4>(qh), high)),
        vorrq_u8(vandq_u8(ql1, low), vandq_u8(vshlq_n_u8::<2>(qh), high)),
        vorrq_u8(vshrq_n_u8::<4>(ql0), vandq_u8(qh, high)),
        vorrq_u8(vshrq_n_u8::<4>(ql1), vandq_u8(vshrq_n_u8::<2>(qh), high)),
    ]
}

/// Rows of a K-format prefill tile.
const K_TILE: usize = 4;

/// A K super-block unpacked once for many tokens.
#[derive(Clone, Copy)]
struct KUnpacked {
    /// Values `16c..16c + 16` as signed bytes: `Q4_K`'s 0..15, `Q6_K`'s -32..31 (its offset
    /// taken off).
    q: [int8x16_t; QK_K / 16],
    /// The scale of each 16 values (`Q4_K`'s sub-block scales, each twice).
    sc: [i32; QK_K / 16],
    /// (`Q4_K`) the eight sub-block minimums.
    m: int16x8_t,
    d: f32,
    dmin: f32,
}

impl KUnpacked {
    #[inline]
    #[target_feature(enable = "neon")]
    fn new(dtype: GgmlType, block: &[u8]) -> Self {
        let mut u = Self {
            q: [vdupq_n_s8(0); QK_K / 16],
            sc: [0; QK_K / 16],
            m: vdupq_n_s16(0),
            d: 0.0,
            dmin: 0.0,
        };
        if dtype == GgmlType::Q4K {
            u.d = f16_at(block, 0);
            u.dmin = f16_at(block, 2);
            let (sc, m) = q4_k_scales(&block[4..16]);
            let low = vdupq_n_u8(0x0F);
            // Sub-blocks 2j and 2j + 1 are the low and high nibbles of bytes 16 + 32j...
            for j in 0..4 {
                for h in 0..2 {
                    let packed = load16(block, 16 + 32 * j + 16 * h);
                    u.q[4 * j + h] = vreinterpretq_s8_u8(vandq_u8(packed, low));
                    u.q[4 * j + 2 + h] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed));
                }
            }
            for (c, sc16) in u.sc.iter_mut().enumerate() {
                *sc16 = sc[c / 2] as i32;
            }
            let m: [i16; 8] = std::array::from_fn(|s| m[s] as i16);
            // SAFETY: `m` is eight i16.
            u.m = unsafe { vld1q_s16(m.as_ptr()) };
            return u;
        }
        let offset = vdupq_n_s8(32);
        u.d = f16_at(block, 208);
        for half in 0..2 {
            for h in 0..2 {
                for (part, q) in q6_k_parts(block, half, h).into_iter().enumerate() {
                    let chunk = 4 * half + part;
                    u.q[2 * chunk + h] = vsubq_s8(vreinterpretq_s8_u8(q), offset);
                }
            }
        }
        for (sc16, &s) in u.sc.iter_mut().zip(&block[192..208]) {
            *sc16 = s as i8 as i32;
        }
        u
    }
}

/// [`dot_q4_k`] and [`dot_q6_k`] for [`K_TILE`] rows at once: the same integer totals, and the
/// same f32 operations per row (one lane each), so the same bits.
#[inline]
#[target_feature(enable = "neon")]
fn dot_k_tile<const SDOT: bool>(
    dtype: GgmlType,
    rows: [&[KUnpacked]; K_TILE],
    scales: &[[float32x4_t; 2]],
    act: &[KBlock],
) -> [f32; K_TILE] {
    let zero = vdupq_n_s32(0);
    let (mut acc, mut acc_min) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    for (b, a) in act.iter().enumerate() {
        let mut sumi = [zero; K_TILE];
        for (c, y) in a.qs.as_flattened().chunks_exact(16).enumerate() {
            // SAFETY: `y` is 16 bytes.
            let y = unsafe { vld1q_s8(y.as_ptr()) };
            for (sumi, row) in sumi.iter_mut().zip(&rows) {
                let u = &row[b];
                *sumi = vmlaq_n_s32(*sumi, dot4::<SDOT>(zero, u.q[c], y), u.sc[c]);
            }
        }
        // The four rows' totals, exact.
        let totals = vpaddq_s32(vpaddq_s32(sumi[0], sumi[1]), vpaddq_s32(sumi[2], sumi[3]));
        let [d, dmin] = scales[b];
        acc = vfmaq_f32(acc, vcvtq_f32_s32(totals), vmulq_n_f32(d, a.d));
        if dtype == GgmlType::Q4K {
            // `Σ m[sub] · Σ activations of sub`: the 16 sums in pairs, times the minimums.
            // SAFETY: `a.bsums` is 16 i16.
            let bsums = unsafe { vld1q_s16_x2(a.bsums.as_ptr()) };
            let pairs = vpaddq_s16(bsums.0, bsums.1);
            let mut mins = [0i32; K_TILE];
            for (min, row) in mins.iter_mut().zip(&rows) {
                let m = row[b].m;
                let low = vmull_s16(vget_low_s16(pairs), vget_low_s16(m));
                *min = vaddvq_s32(vmlal_high_s16(low, pairs, m));
            }
            // SAFETY: `mins` is four i32.
            let mins = unsafe { vld1q_s32(mins.as_ptr()) };
            acc_min = vfmaq_f32(acc_min, vcvtq_f32_s32(mins), vmulq_n_f32(dmin, a.d));
        }
    }
    let result = if dtype == GgmlType::Q4K {
        vsubq_f32(acc, acc_min)
    } else {
        acc
    };
    let mut out = [0.0f32; K_TILE];
    // SAFETY: `out` is four f32.
    unsafe { vst1q_f32(out.as_mut_ptr(), result) };
    out
}

/// The two 16-byte halves of an activation group.
#[inline]
#[target_feature(enable = "neon")]
fn group(a: &[i8; QK]) -> [int8x16_t; 2] {
    [act16(a, 0), act16(a, 16)]
}

/// [`dot_q4_k`](crate::kernels::portable::dot_q4_k): each sub-block's products summed in lanes,
/// multiplied by its scale in integers; the super-block's total and its minimums scaled as the
/// portable code does.
#[inline]
#[target_feature(enable = "neon")]
fn dot_q4_k<const SDOT: bool>(row: &[u8], act: &[KBlock]) -> f32 {
    let low = vdupq_n_u8(0x0F);
    let zero = vdupq_n_s32(0);
    let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
    for (block, a) in row.chunks_exact(Q4_K_SIZE).zip(act) {
        let d = f16_at(block, 0) * a.d;
        let dmin = f16_at(block, 2) * a.d;
        let (sc, m) = q4_k_scales(&block[4..16]);
        let mut sumi = zero;
        for j in 0..4 {
            let packed = [load16(block, 16 + 32 * j), load16(block, 32 + 32 * j)];
            let lo: [int8x16_t; 2] =
                std::array::from_fn(|h| vreinterpretq_s8_u8(vandq_u8(packed[h], low)));
            let hi: [int8x16_t; 2] =
                std::array::from_fn(|h| vreinterpretq_s8_u8(vshrq_n_u8::<4>(packed[h])));
            let (y_lo, y_hi) = (group(&a.qs[2 * j]), group(&a.qs[2 * j + 1]));
            let p_lo = dot4::<SDOT>(dot4::<SDOT>(zero, lo[0], y_lo[0]), lo[1], y_lo[1]);
            let p_hi = dot4::<SDOT>(dot4::<SDOT>(zero, hi[0], y_hi[0]), hi[1], y_hi[1]);
            sumi = vmlaq_n_s32(sumi, p_lo, sc[2 * j] as i32);
            sumi = vmlaq_n_s32(sumi, p_hi, sc[2 * j + 1] as i32);
        }
        acc = (vaddvq_s32(sumi) as f32).mul_add(d, acc);
        acc_min = (q4_k_min_sum(&m, a) as f32).mul_add(dmin, acc_min);
    }
    acc - acc_min
}

/// [`dot_q6_k`](crate::kernels::portable::dot_q6_k): values built from their low and high bits,
/// the offset of 32 taken off each byte (values -32..32), each 16 products multiplied by their
/// signed scale in integers.
#[inline]
#[target_feature(enable = "neon")]
fn dot_q6_k<const SDOT: bool>(row: &[u8], act: &[KBlock]) -> f32 {
    let offset = vdupq_n_s8(32);
    let zero = vdupq_n_s32(0);
    let mut acc = 0.0f32;
    for (block, a) in row.chunks_exact(Q6_K_SIZE).zip(act) {
        let d = f16_at(block, 208) * a.d;
        let scales = &block[192..208];
        let mut sumi = zero;
        for half in 0..2 {
            for h in 0..2 {
                for (part, q) in q6_k_parts(block, half, h).into_iter().enumerate() {
                    let chunk = 4 * half + part;
                    let w = vsubq_s8(vreinterpretq_s8_u8(q), offset);
                    let dot = dot4::<SDOT>(zero, w, act16(&a.qs[chunk], 16 * h));
                    sumi = vmlaq_n_s32(sumi, dot, scales[2 * chunk + h] as i8 as i32);
                }
            }
        }
        acc = (vaddvq_s32(sumi) as f32).mul_add(d, acc);
    }
    acc
}
