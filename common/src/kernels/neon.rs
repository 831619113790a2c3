//! NEON (aarch64) versions of the activation quantization and of the file-layout dot products:
//! the same integer totals and the same f32 operations in the same order as the portable code,
//! so the same bits.
//!
//! Integer dot products take four byte products per 32-bit lane, the grouping of the portable
//! code's lanes. With the dot product extension (`Path::Dotprod`) one `sdot` instruction does
//! this; plain NEON (`Path::Neon`) widens the products to 16 bits and adds them in pairs, which
//! is exact too, as every product here fits 16 bits.

use std::arch::aarch64::*;
use std::arch::asm;
use std::sync::OnceLock;

use super::{q4_k_min_sum, q4_k_scales, ActBlock, KBlock, LANES, Q4_K_SIZE, Q6_K_SIZE, QK, QK_K};
use crate::quant::GgmlType;

/// An instruction set the NEON kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// NEON with the dot product extension (FEAT_DotProd): four byte products summed into
    /// each 32-bit lane in one instruction.
    Dotprod,
    /// NEON alone: the same sums from widening multiplies and pairwise adds.
    Neon,
}

impl Path {
    /// The fastest path this CPU runs; `None` leaves the portable code.
    pub fn best() -> Option<Self> {
        static BEST: OnceLock<Option<Path>> = OnceLock::new();
        *BEST.get_or_init(|| {
            [Self::Dotprod, Self::Neon]
                .into_iter()
                .find(|p| p.available())
        })
    }

    pub fn available(self) -> bool {
        let neon = std::arch::is_aarch64_feature_detected!("neon");
        match self {
            Self::Neon => neon,
            Self::Dotprod => neon && std::arch::is_aarch64_feature_detected!("dotprod"),
        }
    }
}

/// Whether this CPU runs the NEON quantization (every path does).
pub fn available() -> bool {
    Path::Neon.available()
}

/// `acc` plus, in each 32-bit lane, the sum of the four products of the lane's bytes of `a` and
/// `b`: `sdot` (`SDOT`, which only a caller that checked [`Path::Dotprod`] may ask for) or
/// widening multiplies. Every product of two bytes fits 16 bits, so both are exact.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn dot4<const SDOT: bool>(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    if SDOT {
        // SAFETY: `sdot` only reads and writes these registers; callers asking for it checked
        // the dot product extension on this CPU.
        unsafe {
            asm!(
                ".arch_extension dotprod",
                "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        return acc;
    }
    let low = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let high = vmull_high_s8(a, b);
    vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(low), vpaddlq_s16(high)))
}

/// 16 bytes of `bytes` from `at`.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn load16(bytes: &[u8], at: usize) -> uint8x16_t {
    let b = &bytes[at..at + 16];
    // SAFETY: `b` is 16 bytes.
    unsafe { vld1q_u8(b.as_ptr()) }
}

/// 16 bytes of `bytes` from `at`, as signed bytes.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn load16_i8(bytes: &[u8], at: usize) -> int8x16_t {
    vreinterpretq_s8_u8(load16(bytes, at))
}

/// A constant vector of 16 bytes.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn bytes16(b: [u8; 16]) -> uint8x16_t {
    load16(&b, 0)
}

/// The 16 activation bytes of `a` from `at`.
#[inline]
#[target_feature(enable = "neon")]
fn act16(a: &[i8; QK], at: usize) -> int8x16_t {
    let a = &a[at..at + 16];
    // SAFETY: `a` is 16 bytes.
    unsafe { vld1q_s8(a.as_ptr()) }
}

/// Four f16 widened to f32, exactly (`fcvtl`, base NEON).
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn widen_f16(h: uint16x4_t) -> float32x4_t {
    let f: float32x4_t;
    // SAFETY: `fcvtl` only reads and writes these registers.
    unsafe {
        asm!(
            "fcvtl {f:v}.4s, {h:v}.4h",
            f = lateout(vreg) f,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    f
}

/// Four f32 rounded to the nearest f16, ties to even (`fcvtn`, base NEON), as
/// `f16::from_f32` rounds.
#[inline]
#[target_feature(enable = "neon")]
pub(crate) fn narrow_f16(f: float32x4_t) -> uint16x4_t {
    let h: uint16x4_t;
    // SAFETY: `fcvtn` only reads and writes these registers.
    unsafe {
        asm!(
            "fcvtn {h:v}.4h, {f:v}.4s",
            h = lateout(vreg) h,
            f = in(vreg) f,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    h
}

/// The eight f16 at `bytes[at..at + 16]` converted exactly, as values `0..4` and `4..8`.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn f16x8(bytes: &[u8], at: usize) -> [float32x4_t; 2] {
    let h = vreinterpretq_u16_u8(load16(bytes, at));
    [widen_f16(vget_low_u16(h)), widen_f16(vget_high_u16(h))]
}

/// The f16 at `bytes[at..at + 2]`, converted exactly.
#[inline]
#[target_feature(enable = "neon")]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    vgetq_lane_f32::<0>(widen_f16(vdup_n_u16(bits)))
}

/// `[d, s]` each rounded to the nearest f16 (ties to even) and back, as
/// `f16::from_f32(x).to_f32()`.
#[inline]
#[target_feature(enable = "neon")]
fn through_f16(d: f32, s: f32) -> [f32; 2] {
    let v = vsetq_lane_f32::<1>(s, vdupq_n_f32(d));
    let v = widen_f16(narrow_f16(v));
    [vgetq_lane_f32::<0>(v), vgetq_lane_f32::<1>(v)]
}

/// 32-bit lanes narrowed to bytes, keeping the low eight bits as `as i8` does.
#[inline]
#[target_feature(enable = "neon")]
fn narrow(v: &[int32x4_t]) -> int8x16_t {
    let low = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1]));
    let high = vcombine_s16(vmovn_s32(v[2]), vmovn_s32(v[3]));
    vcombine_s8(vmovn_s16(low), vmovn_s16(high))
}

/// Stores 16 bytes into `out[at..at + 16]`.
#[inline]
#[target_feature(enable = "neon")]
fn store16(out: &mut [i8], at: usize, v: int8x16_t) {
    let out = &mut out[at..at + 16];
    // SAFETY: `out` is 16 bytes.
    unsafe { vst1q_s8(out.as_mut_ptr(), v) }
}

/// Four f32 of `x` from `at`.
#[inline]
#[target_feature(enable = "neon")]
fn load_f32(x: &[f32], at: usize) -> float32x4_t {
    let x = &x[at..at + 4];
    // SAFETY: `x` is four f32.
    unsafe { vld1q_f32(x.as_ptr()) }
}

/// The largest magnitude of `v`, by `fmaxnm` from zero as the portable `f32::max` fold takes
/// it (exact in any order; NaNs are passed over).
#[inline]
#[target_feature(enable = "neon")]
fn amax(v: &[float32x4_t]) -> f32 {
    let m = v
        .iter()
        .fold(vdupq_n_f32(0.0), |m, &v| vmaxnmq_f32(m, vabsq_f32(v)));
    vmaxnmvq_f32(m)
}

pub fn quantize_row(x: &[f32], out: &mut Vec<ActBlock>) {
    assert!(available(), "this CPU has no NEON");
    // SAFETY: NEON was just checked on this CPU.
    unsafe { quantize_row_neon(x, out) }
}

/// The portable quantization in registers: the largest magnitude by `fmaxnm`, the products
/// rounded to nearest, ties to even, by `fcvtns` (saturating, NaN to zero, as `as i32`), and
/// truncated to bytes; the scales through f16 as the portable code does. The same bits.
#[target_feature(enable = "neon")]
fn quantize_row_neon(x: &[f32], out: &mut Vec<ActBlock>) {
    out.clear();
    for block in x.chunks_exact(QK) {
        let v: [float32x4_t; 8] = std::array::from_fn(|i| load_f32(block, 4 * i));
        let amax = amax(&v);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let q: [int32x4_t; 8] = std::array::from_fn(|i| vcvtnq_s32_f32(vmulq_n_f32(v[i], id)));
        let sum = vaddvq_s32(vaddq_s32(
            vaddq_s32(vaddq_s32(q[0], q[1]), vaddq_s32(q[2], q[3])),
            vaddq_s32(vaddq_s32(q[4], q[5]), vaddq_s32(q[6], q[7])),
        ));
        let mut qs = [0i8; QK];
        store16(&mut qs, 0, narrow(&q[..4]));
        store16(&mut qs, 16, narrow(&q[4..]));
        let [d, s] = through_f16(d, d * sum as f32);
        out.push(ActBlock {
            d,
            s,
            sum,
            lane_bias: [0; LANES],
            qs,
        });
    }
}

pub fn quantize_row_k(x: &[f32], out: &mut Vec<KBlock>) {
    assert!(available(), "this CPU has no NEON");
    // SAFETY: NEON was just checked on this CPU.
    unsafe { quantize_row_k_neon(x, out) }
}

/// The portable `Q8_K` quantization in registers: the largest magnitude by `fmaxnm`, the first
/// value of that magnitude found by comparing, then the same products, rounding and clamp as
/// the portable code, and each 16 bytes summed in 16 bits. The same bits.
#[target_feature(enable = "neon")]
fn quantize_row_k_neon(x: &[f32], out: &mut Vec<KBlock>) {
    out.clear();
    let top = vdupq_n_s32(127);
    for block in x.chunks_exact(QK_K) {
        let v: [float32x4_t; QK_K / 4] = std::array::from_fn(|i| load_f32(block, 4 * i));
        let amax = amax(&v);
        let mut q = KBlock {
            d: 0.0,
            qs: [[0; QK]; QK_K / QK],
            bsums: [0; QK_K / 16],
        };
        if amax != 0.0 {
            let target = vdupq_n_f32(amax);
            // The first four values holding the largest magnitude, then the first of them.
            let at = v
                .iter()
                .position(|&v| vmaxvq_u32(vceqq_f32(vabsq_f32(v), target)) != 0)
                .unwrap_or(0);
            let max = block[4 * at..4 * at + 4]
                .iter()
                .copied()
                .find(|v| v.abs() == amax)
                .unwrap_or(amax);
            let iscale = -127.0 / max;
            for (g, qs) in q.qs.iter_mut().enumerate() {
                let r: [int32x4_t; 8] = std::array::from_fn(|i| {
                    vminq_s32(vcvtnq_s32_f32(vmulq_n_f32(v[8 * g + i], iscale)), top)
                });
                for h in 0..2 {
                    let bytes = narrow(&r[4 * h..4 * h + 4]);
                    store16(qs, 16 * h, bytes);
                    q.bsums[2 * g + h] = vaddlvq_s8(bytes);
                }
            }
            q.d = 1.0 / iscale;
        }
        out.push(q);
    }
}

/// [`super::dot_rows`] on `path`, which this CPU must run.
pub fn dot_rows(
    path: Path,
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    assert!(path.available(), "{path:?} is not available on this CPU");
    // SAFETY: the features of `path` were just checked on this CPU.
    unsafe {
        match path {
            Path::Dotprod => dot_rows_neon::<true>(dtype, rows, row_bytes, acts, out),
            Path::Neon => dot_rows_neon::<false>(dtype, rows, row_bytes, acts, out),
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
    let n = acts.len();
    for (row, ys) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        for (y, act) in ys.iter_mut().zip(acts) {
            *y = match dtype {
                GgmlType::Q4_0 => dot_row::<SDOT, 18>(row, act),
                GgmlType::Q4_1 => dot_row::<SDOT, 20>(row, act),
                GgmlType::Q5_0 => dot_row::<SDOT, 22>(row, act),
                _ => dot_row::<SDOT, 34>(row, act),
            };
        }
    }
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

/// [`super::dot_q4_0`] and the others: eight lanes of four products, scaled once per block into
/// f32 lanes by fused multiply-adds, summed in the portable order.
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

/// [`super::hsum`] of lanes `0..4` and `4..8`: `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`.
#[inline]
#[target_feature(enable = "neon")]
fn hsum(low: float32x4_t, high: float32x4_t) -> f32 {
    let r = vaddq_f32(low, high);
    let r = vadd_f32(vget_low_f32(r), vget_high_f32(r));
    vget_lane_f32::<0>(r) + vget_lane_f32::<1>(r)
}

/// [`super::dot_rows_k`] on `path`, which this CPU must run.
pub fn dot_rows_k(
    path: Path,
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<KBlock>],
    out: &mut [f32],
) {
    assert!(path.available(), "{path:?} is not available on this CPU");
    // SAFETY: the features of `path` were just checked on this CPU.
    unsafe {
        match path {
            Path::Dotprod => dot_rows_k_neon::<true>(dtype, rows, row_bytes, acts, out),
            Path::Neon => dot_rows_k_neon::<false>(dtype, rows, row_bytes, acts, out),
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
    for (row, ys) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        for (y, act) in ys.iter_mut().zip(acts) {
            *y = match dtype {
                GgmlType::Q4K => dot_q4_k::<SDOT>(row, act),
                _ => dot_q6_k::<SDOT>(row, act),
            };
        }
    }
}

/// Values `16h..16h + 16` of each 32-value part of half `half` of a `Q6_K` super-block,
/// unsigned (0..63): the low bits from `ql`, the high two from `qh` (see
/// [`super::dot_q6_k`]).
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

/// [`super::dot_q4_k`]: each sub-block's products summed in lanes, multiplied by its scale in
/// integers; the super-block's total and its minimums scaled as the portable code does.
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

/// [`super::dot_q6_k`]: values built from their low and high bits, the offset of 32 taken off
/// each byte (values -32..32), each 16 products multiplied by their signed scale in integers.
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
