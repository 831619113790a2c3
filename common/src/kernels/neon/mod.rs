//! The aarch64 versions of the kernels, in NEON, with the dot product extension where the CPU
//! has it ([`Neon::dotprod`]): the same integer totals and the same f32 operations in the same
//! order as the portable code, so the same bits.
//!
//! Integer dot products take four byte products per 32-bit lane, the grouping of the portable
//! code's lanes. With the dot product extension one `sdot` instruction does this; plain NEON
//! widens the products to 16 bits and adds them in pairs, which is exact too, as every product
//! here fits 16 bits. Kernels take the choice as a const generic `SDOT`.
//!
//! Each kernel's safe entry takes the [`Neon`] that [`Isa`](super::Isa) made after checking the
//! CPU's features, and calls its `target_feature` code on that word.
//!
//! - this file: the activations' quantization, and what the kernels share;
//! - [`rows`] and [`k`]: the file layout's dot products, 32-value and K formats;
//! - [`interleaved`]: the interleaved layout's group products;
//! - [`attention`]: attention's scores and value sums.

use std::arch::aarch64::*;
use std::arch::asm;

use super::isa::Neon;
use super::{ActBlock, KBlock, LANES, QK, QK_K};

pub(super) mod attention;
pub(super) mod interleaved;
pub(super) mod k;
pub(super) mod rows;

/// `acc` plus, in each 32-bit lane, the sum of the four products of the lane's bytes of `a` and
/// `b`: `sdot` (`SDOT`, which only a caller whose [`Neon`] runs the dot product extension may
/// ask for) or widening multiplies. Every product of two bytes fits 16 bits, so both are exact.
#[inline]
#[target_feature(enable = "neon")]
fn dot4<const SDOT: bool>(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
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
fn load16(bytes: &[u8], at: usize) -> uint8x16_t {
    let b = &bytes[at..at + 16];
    // SAFETY: `b` is 16 bytes.
    unsafe { vld1q_u8(b.as_ptr()) }
}

/// 16 bytes of `bytes` from `at`, as signed bytes.
#[inline]
#[target_feature(enable = "neon")]
fn load16_i8(bytes: &[u8], at: usize) -> int8x16_t {
    vreinterpretq_s8_u8(load16(bytes, at))
}

/// A constant vector of 16 bytes.
#[inline]
#[target_feature(enable = "neon")]
fn bytes16(b: [u8; 16]) -> uint8x16_t {
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
fn widen_f16(h: uint16x4_t) -> float32x4_t {
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
fn narrow_f16(f: float32x4_t) -> uint16x4_t {
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
fn f16x8(bytes: &[u8], at: usize) -> [float32x4_t; 2] {
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

/// Quantizes one activation row into `Q8_0`/`Q8_1` blocks.
pub(super) fn quantize_row(_: Neon, x: &[f32], out: &mut Vec<ActBlock>) {
    // SAFETY: a `Neon` is made only where the CPU runs NEON.
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

/// Quantizes one activation row into `Q8_K` blocks.
pub(super) fn quantize_row_k(_: Neon, x: &[f32], out: &mut Vec<KBlock>) {
    // SAFETY: a `Neon` is made only where the CPU runs NEON.
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
