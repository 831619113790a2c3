//! `Q4_0`, `Q4_1` and `Q8_0` repacked for AVX-512 VNNI into groups of sixteen rows whose 32-bit
//! lanes each hold four quants of one row: one `vpdpbusd` multiplies four values of all sixteen
//! rows by four activation bytes, broadcast from memory by the instruction itself.
//!
//! The eight-row layout ([`super::interleaved`]) shared by every SIMD path puts eight bytes of a
//! row in each 64-bit lane, so each product needs its activations broadcast first, and the two
//! halves of a row's total meet again in a reduction before the scale is applied to eight rows
//! at once. Here a block's eight products land in one lane per row, and the scale, the
//! conversion and the accumulation cost one instruction for sixteen rows: a several-token
//! product of `Q4_1` runs some 1.7× faster on one core. Only CPUs with AVX-512 VNNI use it, so
//! the other paths keep their layout.
//!
//! A group-block (sixteen rows × one 32-value block) holds, in order:
//! - the rows' f16 scales `d` (32 bytes); `Q4_1`: then their f16 minimums `m` (32 bytes);
//! - `Q4_0`, `Q4_1`: the nibbles (256 bytes), four 64-byte vectors, vector `p` holding at bytes
//!   `4i..4i + 4` row `i`'s nibble bytes `4p..4p + 4`: low nibbles values `4p..4p + 4`, high
//!   nibbles values `16 + 4p..16 + 4p + 4`;
//! - `Q8_0`: the quants (512 bytes), eight vectors, vector `k` holding at bytes `4i..4i + 4` row
//!   `i`'s values `4k..4k + 4`, offset by 128 so they multiply unsigned.
//!
//! Each group-block has exactly the bytes of its sixteen blocks. The integers are those of the
//! other paths and every f32 operation is theirs, in their order: the same bits (`Q4_0` and
//! `Q4_1` one integer per block, `Q8_0` one per four values, its eight lanes summed at the end
//! as the file-layout kernels sum them).

use super::{ActBlock, QK};
use crate::quant::GgmlType;

/// Rows in one group.
pub const ROWS: usize = 16;

/// Whether a `[rows, cols]` matrix of `dtype` is repacked in this layout on this CPU.
pub fn used(dtype: GgmlType, rows: usize) -> bool {
    layout(dtype).is_some() && rows.is_multiple_of(ROWS) && simd::available()
}

/// Where a format's group-block keeps its quants, and how many bytes of quants a block of one
/// row has in the file and from where.
fn layout(dtype: GgmlType) -> Option<Layout> {
    match dtype {
        GgmlType::Q4_0 => Some(Layout {
            quants_at: 32,
            file_quants_at: 2,
            file_quants: QK / 2,
        }),
        GgmlType::Q4_1 => Some(Layout {
            quants_at: 64,
            file_quants_at: 4,
            file_quants: QK / 2,
        }),
        GgmlType::Q8_0 => Some(Layout {
            quants_at: 32,
            file_quants_at: 2,
            file_quants: QK,
        }),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy)]
struct Layout {
    quants_at: usize,
    file_quants_at: usize,
    file_quants: usize,
}

/// Bytes of one group-block of `dtype`.
pub fn group_block_bytes(dtype: GgmlType) -> usize {
    ROWS * dtype.type_size()
}

/// Repacks `bytes` (`rows` rows in the file's layout, `row_bytes` each) into groups of
/// [`ROWS`] rows, in `out` (as long as `bytes`). `used(dtype, rows)` must hold. `done(n)`
/// hears, every few hundred KiB, that the first `n` bytes of `bytes` will not be read again.
pub fn repack(
    dtype: GgmlType,
    rows: usize,
    row_bytes: usize,
    bytes: &[u8],
    out: &mut [u8],
    done: impl FnMut(usize),
) {
    let Some(l) = layout(dtype) else {
        unreachable!("only formats with a wide layout are repacked into it")
    };
    let block = dtype.type_size();
    let blocks = row_bytes / block;
    let gb = group_block_bytes(dtype);
    assert_eq!(bytes.len(), rows * row_bytes);
    super::repack_groups(bytes, out, ROWS * row_bytes, done, |_, group, out| {
        for b in 0..blocks {
            let dst = &mut out[b * gb..][..gb];
            for i in 0..ROWS {
                let src = &group[i * row_bytes + b * block..][..block];
                dst[2 * i..2 * i + 2].copy_from_slice(&src[..2]);
                if dtype == GgmlType::Q4_1 {
                    dst[32 + 2 * i..32 + 2 * i + 2].copy_from_slice(&src[2..4]);
                }
                let quants = &src[l.file_quants_at..][..l.file_quants];
                for (p, four) in quants.chunks_exact(4).enumerate() {
                    let to = &mut dst[l.quants_at + 64 * p + 4 * i..][..4];
                    to.copy_from_slice(four);
                    if dtype == GgmlType::Q8_0 {
                        to.iter_mut().for_each(|q| *q ^= 0x80);
                    }
                }
            }
        }
    });
}

/// One group's products with every token: `out[t * ROWS + i]` for row `i` of the group.
pub fn group_matmul(dtype: GgmlType, group: &[u8], acts: &[Vec<ActBlock>], out: &mut [f32]) {
    simd::group_matmul(dtype, group, acts, out)
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{group_block_bytes, ActBlock, ROWS};
    use crate::kernels::{pass_accumulators, TOKENS_PER_PASS};
    use crate::quant::GgmlType;

    const Q4_0: u8 = 0;
    const Q4_1: u8 = 1;

    /// How far ahead of the group-block in use a one-token product asks for weights.
    const PREFETCH_AHEAD: usize = 4096;

    pub fn available() -> bool {
        crate::kernels::avx512_available()
    }

    pub fn group_matmul(dtype: GgmlType, group: &[u8], acts: &[Vec<ActBlock>], out: &mut [f32]) {
        assert!(
            available(),
            "the wide layout is used only where AVX-512 VNNI is"
        );
        // SAFETY: `available()` checked AVX-512 F, BW and VNNI, AVX2, FMA and F16C.
        unsafe {
            match dtype {
                GgmlType::Q4_0 => by_block::<Q4_0>(group, acts, out),
                GgmlType::Q4_1 => by_block::<Q4_1>(group, acts, out),
                _ => q8_0(group, acts, out),
            }
        }
    }

    /// The sixteen rows' f16 at `bytes[..32]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn f16s(bytes: &[u8]) -> __m512 {
        // SAFETY: `bytes` holds at least 32 bytes, sixteen f16.
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(bytes[..32].as_ptr().cast()) })
    }

    /// Activation bytes `4k..4k + 4` as one 32-bit lane, to broadcast.
    #[inline(always)]
    fn act_four(a: &ActBlock, k: usize) -> i32 {
        let bytes: [i8; 4] = a.qs[4 * k..4 * k + 4].try_into().expect("4 bytes");
        i32::from_le_bytes(bytes.map(|b| b as u8))
    }

    /// Asks for the cache lines `PREFETCH_AHEAD` bytes past `span`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn prefetch_ahead(span: &[u8]) {
        let start = span.as_ptr().wrapping_add(PREFETCH_AHEAD);
        for off in (0..span.len() + 63).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(off).cast());
        }
    }

    /// The 4-bit formats, one integer per block and row: each group-block's nibbles unpacked
    /// once per pass, for every token of the pass.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn by_block<const F: u8>(group: &[u8], acts: &[Vec<ActBlock>], out: &mut [f32]) {
        let dtype = if F == Q4_0 {
            GgmlType::Q4_0
        } else {
            GgmlType::Q4_1
        };
        let gb_bytes = group_block_bytes(dtype);
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
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use super::ActBlock;
    use crate::quant::GgmlType;

    pub fn available() -> bool {
        false
    }

    pub fn group_matmul(_: GgmlType, _: &[u8], _: &[Vec<ActBlock>], _: &mut [f32]) {
        unreachable!("the wide layout is used only on x86-64 with AVX-512 VNNI")
    }
}
