//! The sixteen-row layout's group products (see [`crate::kernels::wide`]) in AVX-512 VNNI,
//! which is the only path that uses that layout.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::{pass_accumulators, prefetch_ahead, TOKENS_PER_PASS, X86};
use crate::kernels::interleaved::formats::{format, Q4_0, Q4_1};
use crate::kernels::wide::{group_block_bytes, ROWS};
use crate::kernels::ActBlock;
use crate::quant::GgmlType;

/// One group's products with every token: `out[t * ROWS + i]` for row `i` of the group. The
/// layout is chosen only where `cpu` runs AVX-512.
pub(in crate::kernels) fn group_matmul(
    cpu: X86,
    dtype: GgmlType,
    group: &[u8],
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    assert!(
        cpu.avx512(),
        "the wide layout is used only where AVX-512 VNNI is"
    );
    // SAFETY: `cpu` says this CPU runs AVX-512 F, BW and VNNI, with AVX2, FMA and F16C.
    unsafe {
        match dtype {
            GgmlType::Q4_0 if acts.len() == 1 => one_token::<Q4_0>(group, &acts[0], out),
            GgmlType::Q4_1 if acts.len() == 1 => one_token::<Q4_1>(group, &acts[0], out),
            GgmlType::Q4_0 => by_block::<Q4_0>(group, acts, out),
            GgmlType::Q4_1 => by_block::<Q4_1>(group, acts, out),
            _ => q8_0(group, acts, out),
        }
    }
}

/// The sixteen rows' f16 at `bytes[..32]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) fn f16s(bytes: &[u8]) -> __m512 {
    // SAFETY: `bytes` holds at least 32 bytes, sixteen f16.
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(bytes[..32].as_ptr().cast()) })
}

/// Activation bytes `4k..4k + 4` as one 32-bit lane, to broadcast.
#[inline(always)]
fn act_four(a: &ActBlock, k: usize) -> i32 {
    let bytes: [i8; 4] = a.qs[4 * k..4 * k + 4].try_into().expect("4 bytes");
    i32::from_le_bytes(bytes.map(|b| b as u8))
}

/// The 4-bit formats, one integer per block and row: each group-block's nibbles unpacked
/// once per pass, for every token of the pass.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn by_block<const F: u8>(group: &[u8], acts: &[Vec<ActBlock>], out: &mut [f32]) {
    let gb_bytes = group_block_bytes(format(F));
    let quants_at = if F == Q4_1 { 64 } else { 32 };
    let low = _mm512_set1_epi8(0x0F);
    let decode = acts.len() == 1;
    for (acts, out) in acts
        .chunks(TOKENS_PER_PASS)
        .zip(out.chunks_mut(TOKENS_PER_PASS * ROWS))
    {
        let n = acts.len();
        let mut room = [const { MaybeUninit::uninit() }; TOKENS_PER_PASS];
        let accs = pass_accumulators(&mut room, n, [_mm512_setzero_ps(); 2]);
        for (b, gb) in group.chunks_exact(gb_bytes).enumerate() {
            if decode {
                prefetch_ahead(gb);
            }
            let d = f16s(gb);
            let m = if F == Q4_1 { f16s(&gb[32..]) } else { d };
            let nibbles = &gb[quants_at..][..256];
            let mut u = [_mm512_setzero_si512(); 8];
            for p in 0..4 {
                // SAFETY: `nibbles` is 256 bytes, four vectors of 64.
                let v = unsafe { _mm512_loadu_si512(nibbles[64 * p..].as_ptr().cast()) };
                u[p] = _mm512_and_si512(v, low);
                u[4 + p] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            }
            for ([rows, summs], act) in accs.iter_mut().zip(acts) {
                let a = &act[b];
                // Two chains of exact integer sums.
                let zero = _mm512_setzero_si512();
                let mut x = zero;
                let mut y = zero;
                for k in (0..8).step_by(2) {
                    x = _mm512_dpbusd_epi32(x, u[k], _mm512_set1_epi32(act_four(a, k)));
                    y = _mm512_dpbusd_epi32(y, u[k + 1], _mm512_set1_epi32(act_four(a, k + 1)));
                }
                let mut dot = _mm512_add_epi32(x, y);
                if F == Q4_0 {
                    dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(8 * a.sum));
                }
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d));
                *rows = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), *rows);
                if F == Q4_1 {
                    *summs = _mm512_add_ps(*summs, _mm512_mul_ps(m, _mm512_set1_ps(a.s)));
                }
            }
        }
        for ([rows, summs], ys) in accs.iter().zip(out.chunks_exact_mut(ROWS)) {
            let v = if F == Q4_1 {
                _mm512_add_ps(*rows, *summs)
            } else {
                *rows
            };
            // SAFETY: `ys` holds ROWS f32.
            unsafe { _mm512_storeu_ps(ys[..ROWS].as_mut_ptr(), v) }
        }
    }
}

/// [`by_block`] for one token (decode): the accumulators in registers, each block's eight
/// products in four independent chains (integers, so the same total), the f32 operations
/// [`by_block`]'s, in its order.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn one_token<const F: u8>(group: &[u8], act: &[ActBlock], out: &mut [f32]) {
    let gb_bytes = group_block_bytes(format(F));
    let quants_at = if F == Q4_1 { 64 } else { 32 };
    let low = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    let mut rows = _mm512_setzero_ps();
    let mut summs = _mm512_setzero_ps();
    for (gb, a) in group.chunks_exact(gb_bytes).zip(act) {
        prefetch_ahead(gb);
        let nibbles = &gb[quants_at..][..256];
        let mut chains = [zero; 4];
        for (p, chain) in chains.iter_mut().enumerate() {
            // SAFETY: `nibbles` is 256 bytes, four vectors of 64.
            let v = unsafe { _mm512_loadu_si512(nibbles[64 * p..].as_ptr().cast()) };
            let lo = _mm512_and_si512(v, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            *chain = _mm512_dpbusd_epi32(zero, lo, _mm512_set1_epi32(act_four(a, p)));
            *chain = _mm512_dpbusd_epi32(*chain, hi, _mm512_set1_epi32(act_four(a, 4 + p)));
        }
        let mut dot = _mm512_add_epi32(
            _mm512_add_epi32(chains[0], chains[1]),
            _mm512_add_epi32(chains[2], chains[3]),
        );
        if F == Q4_0 {
            dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(8 * a.sum));
        }
        let scale = _mm512_mul_ps(f16s(gb), _mm512_set1_ps(a.d));
        rows = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), rows);
        if F == Q4_1 {
            summs = _mm512_add_ps(summs, _mm512_mul_ps(f16s(&gb[32..]), _mm512_set1_ps(a.s)));
        }
    }
    let v = if F == Q4_1 {
        _mm512_add_ps(rows, summs)
    } else {
        rows
    };
    // SAFETY: `out` holds ROWS f32.
    unsafe { _mm512_storeu_ps(out[..ROWS].as_mut_ptr(), v) }
}

/// `Q8_0`, eight lanes per row: one token at a time over the group, whose quants need no
/// unpacking, its eight lane accumulators in registers; the lanes summed as the file-layout
/// kernels sum them.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q8_0(group: &[u8], acts: &[Vec<ActBlock>], out: &mut [f32]) {
    let gb_bytes = group_block_bytes(GgmlType::Q8_0);
    let decode = acts.len() == 1;
    for (act, ys) in acts.iter().zip(out.chunks_exact_mut(ROWS)) {
        let mut lanes = [_mm512_setzero_ps(); 8];
        for (gb, a) in group.chunks_exact(gb_bytes).zip(act) {
            if decode {
                prefetch_ahead(gb);
            }
            let scale = _mm512_mul_ps(f16s(gb), _mm512_set1_ps(a.d));
            let quants = &gb[32..][..512];
            for (k, lane) in lanes.iter_mut().enumerate() {
                // SAFETY: `quants` is 512 bytes, eight vectors of 64.
                let q = unsafe { _mm512_loadu_si512(quants[64 * k..].as_ptr().cast()) };
                let bias = _mm512_set1_epi32(a.lane_bias[k]);
                let dot = _mm512_dpbusd_epi32(bias, q, _mm512_set1_epi32(act_four(a, k)));
                *lane = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), *lane);
            }
        }
        let l = &lanes;
        let v = _mm512_add_ps(
            _mm512_add_ps(_mm512_add_ps(l[0], l[4]), _mm512_add_ps(l[2], l[6])),
            _mm512_add_ps(_mm512_add_ps(l[1], l[5]), _mm512_add_ps(l[3], l[7])),
        );
        // SAFETY: `ys` holds ROWS f32.
        unsafe { _mm512_storeu_ps(ys[..ROWS].as_mut_ptr(), v) }
    }
}
