//! The file layout's dot products for the 32-value formats (`Q4_0`, `Q4_1`, `Q5_0`, `Q8_0`) in
//! AVX2: the same lane grouping and accumulation order as the portable code, one instruction per
//! step. Decode runs two rows at a time, prefill tiles of rows unpacked once for every token.

use std::arch::x86_64::*;

use super::{f16_at, prefetch_ahead, X86};
use crate::kernels::portable::hsum;
use crate::kernels::{ActBlock, LANES};
use crate::quant::GgmlType;

/// Dots every row of `rows` with every token's activations: `out[r * n + t]`.
pub(in crate::kernels) fn dot_rows(
    _: X86,
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    // SAFETY: an `X86` is made only where the CPU runs AVX2, FMA and F16C.
    unsafe { dot_rows_avx2(dtype, rows, row_bytes, acts, out) }
}

/// Constants the block unpacking needs, built once per call.
struct Consts {
    ones: __m256i,
    low_nibbles: __m128i,
    /// Spreads the 32 bits of a Q5_0 block's high-bit word over 32 bytes.
    byte_of_bit: __m256i,
    bit_mask: __m256i,
}

/// One weight block ready for the integer dot: 32 values as bytes (unsigned 0..15 for Q4_1,
/// signed otherwise), its scale and (Q4_1) its minimum.
struct Unpacked {
    x: __m256i,
    signed: bool,
    d: f32,
    m: f32,
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack(dtype: GgmlType, block: &[u8], k: &Consts) -> Unpacked {
    let d = f16_at(block, 0);
    match dtype {
        GgmlType::Q4_1 => {
            // SAFETY: a Q4_1 block is 20 bytes; bytes 4..20 are its 16 nibble bytes.
            let packed = unsafe { _mm_loadu_si128(block[4..20].as_ptr().cast()) };
            let lo = _mm_and_si128(packed, k.low_nibbles);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(packed), k.low_nibbles);
            Unpacked {
                x: _mm256_set_m128i(hi, lo),
                signed: false,
                d,
                m: f16_at(block, 2),
            }
        }
        GgmlType::Q4_0 => {
            // SAFETY: a Q4_0 block is 18 bytes; bytes 2..18 are its 16 nibble bytes.
            let packed = unsafe { _mm_loadu_si128(block[2..18].as_ptr().cast()) };
            let lo = _mm_and_si128(packed, k.low_nibbles);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(packed), k.low_nibbles);
            Unpacked {
                x: _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8)),
                signed: true,
                d,
                m: 0.0,
            }
        }
        GgmlType::Q5_0 => {
            // SAFETY: a Q5_0 block is 22 bytes; bytes 6..22 are its 16 nibble bytes.
            let packed = unsafe { _mm_loadu_si128(block[6..22].as_ptr().cast()) };
            let lo = _mm_and_si128(packed, k.low_nibbles);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(packed), k.low_nibbles);
            let nibbles = _mm256_set_m128i(hi, lo);
            let qh = i32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            // Byte j of `set` is 0xFF where bit j of qh is set.
            let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(qh), k.byte_of_bit);
            let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, k.bit_mask), _mm256_set1_epi8(-1));
            // Without the fifth bit a value is nibble - 16: set the top four bits.
            let x = _mm256_or_si256(
                nibbles,
                _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8)),
            );
            Unpacked {
                x,
                signed: true,
                d,
                m: 0.0,
            }
        }
        _ => Unpacked {
            // SAFETY: a Q8_0 block is 34 bytes; bytes 2..34 are its 32 quants.
            x: unsafe { _mm256_loadu_si256(block[2..34].as_ptr().cast()) },
            signed: true,
            d,
            m: 0.0,
        },
    }
}

/// Eight lane sums, each of four adjacent products of the block with `a`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_sums(w: &Unpacked, a: &ActBlock, k: &Consts) -> __m256 {
    // SAFETY: `a.qs` is 32 bytes.
    let qy = unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) };
    block_sums_with(w, qy, k)
}

/// [`block_sums`] with the activation block already loaded.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_sums_with(w: &Unpacked, qy: __m256i, k: &Consts) -> __m256 {
    let pairs = if w.signed {
        // maddubs multiplies unsigned by signed: move the weight's sign onto the activation.
        _mm256_maddubs_epi16(_mm256_sign_epi8(w.x, w.x), _mm256_sign_epi8(qy, w.x))
    } else {
        _mm256_maddubs_epi16(w.x, qy)
    };
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, k.ones))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn finish(dtype: GgmlType, acc: __m256, summs: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    // SAFETY: `lanes` holds 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    if dtype == GgmlType::Q4_1 {
        hsum(lanes) + summs
    } else {
        hsum(lanes)
    }
}

/// Rows a prefill tile computes together: one activation load serves them all.
const ROW_TILE: usize = 4;

/// The 32-value format whose blocks are `block` bytes long: a constant wherever `block` is,
/// so the per-format branches of [`unpack`] and [`finish`] fold away in the decode loop.
const fn format_of(block: usize) -> GgmlType {
    match block {
        18 => GgmlType::Q4_0,
        20 => GgmlType::Q4_1,
        22 => GgmlType::Q5_0,
        _ => GgmlType::Q8_0,
    }
}

/// Blocks whose weight scales are converted and multiplied together in decode.
const SCALE_GROUP: usize = 8;

/// `d_w · d_a` for [`SCALE_GROUP`] consecutive blocks of one row (`blocks`) and their
/// activation scales: eight f16 conversions and products in one instruction each, the same
/// f32 values as one at a time. The decode loop then broadcasts each from memory, which
/// spares the shuffle unit it shares with the unpacking.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn group_scales<const BLOCK: usize>(blocks: &[u8], act_scales: &[f32]) -> [f32; SCALE_GROUP] {
    let bits = |j: usize| i16::from_le_bytes([blocks[j * BLOCK], blocks[j * BLOCK + 1]]);
    let d = _mm256_cvtph_ps(_mm_setr_epi16(
        bits(0),
        bits(1),
        bits(2),
        bits(3),
        bits(4),
        bits(5),
        bits(6),
        bits(7),
    ));
    let act_scales = &act_scales[..SCALE_GROUP];
    // SAFETY: `act_scales` holds 8 f32.
    let ad = unsafe { _mm256_loadu_ps(act_scales.as_ptr()) };
    let mut out = [0.0f32; SCALE_GROUP];
    // SAFETY: `out` holds 8 f32.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(d, ad)) };
    out
}

/// Decode: two rows at a time, so two independent accumulation chains hide each other's
/// latency and every activation block is loaded once for both. Each row keeps its own
/// accumulator, so results are the same as one row at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn rows_one_token<const BLOCK: usize>(
    rows: &[u8],
    row_bytes: usize,
    act: &[ActBlock],
    out: &mut [f32],
    k: &Consts,
) {
    let dtype = format_of(BLOCK);
    let act_scales: Vec<f32> = act.iter().map(|a| a.d).collect();
    let mut pairs = rows.chunks_exact(2 * row_bytes);
    let mut ys = out.chunks_exact_mut(2);
    for (pair, y) in (&mut pairs).zip(&mut ys) {
        let (r0, r1) = pair.split_at(row_bytes);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut summs0, mut summs1) = (0.0f32, 0.0f32);
        prefetch_ahead(pair);
        let mut groups0 = r0.chunks_exact(SCALE_GROUP * BLOCK);
        let mut groups1 = r1.chunks_exact(SCALE_GROUP * BLOCK);
        let mut act_groups = act.chunks_exact(SCALE_GROUP);
        let groups = (&mut groups0)
            .zip(&mut groups1)
            .zip(&mut act_groups)
            .zip(act_scales.chunks_exact(SCALE_GROUP));
        for (((g0, g1), ga), gd) in groups {
            let (sc0, sc1) = (group_scales::<BLOCK>(g0, gd), group_scales::<BLOCK>(g1, gd));
            for (j, a) in ga.iter().enumerate() {
                let w0 = unpack(dtype, &g0[j * BLOCK..(j + 1) * BLOCK], k);
                let w1 = unpack(dtype, &g1[j * BLOCK..(j + 1) * BLOCK], k);
                let s0 = block_sums(&w0, a, k);
                let s1 = block_sums(&w1, a, k);
                acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(&sc0[j]), s0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(&sc1[j]), s1, acc1);
                summs0 += w0.m * a.s;
                summs1 += w1.m * a.s;
            }
        }
        let rest = groups0
            .remainder()
            .chunks_exact(BLOCK)
            .zip(groups1.remainder().chunks_exact(BLOCK))
            .zip(act_groups.remainder());
        for ((b0, b1), a) in rest {
            let w0 = unpack(dtype, b0, k);
            let w1 = unpack(dtype, b1, k);
            let s0 = block_sums(&w0, a, k);
            let s1 = block_sums(&w1, a, k);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(w0.d * a.d), s0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(w1.d * a.d), s1, acc1);
            summs0 += w0.m * a.s;
            summs1 += w1.m * a.s;
        }
        y[0] = finish(dtype, acc0, summs0);
        y[1] = finish(dtype, acc1, summs1);
    }
    for (row, y) in pairs
        .remainder()
        .chunks_exact(row_bytes)
        .zip(ys.into_remainder())
    {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0.0f32;
        for (block, a) in row.chunks_exact(BLOCK).zip(act) {
            let w = unpack(dtype, block, k);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(w.d * a.d), block_sums(&w, a, k), acc);
            summs += w.m * a.s;
        }
        *y = finish(dtype, acc, summs);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_rows_avx2(
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    let k = Consts {
        ones: _mm256_set1_epi16(1),
        low_nibbles: _mm_set1_epi8(0x0F),
        byte_of_bit: _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        ),
        bit_mask: _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe),
    };
    let block_bytes = dtype.type_size();
    let n = acts.len();
    if let [act] = acts {
        // One token (decode), monomorphized per format so the block loop has no branches.
        match dtype {
            GgmlType::Q4_0 => rows_one_token::<18>(rows, row_bytes, act, out, &k),
            GgmlType::Q4_1 => rows_one_token::<20>(rows, row_bytes, act, out, &k),
            GgmlType::Q5_0 => rows_one_token::<22>(rows, row_bytes, act, out, &k),
            _ => rows_one_token::<34>(rows, row_bytes, act, out, &k),
        }
        return;
    }
    // Several tokens (prefill): tiles of rows, each unpacked once for all the tokens, with
    // the tile's accumulators in registers.
    let blocks = row_bytes / block_bytes;
    let mut unpacked: Vec<Unpacked> = Vec::with_capacity(ROW_TILE * blocks);
    let mut tiles = rows.chunks_exact(ROW_TILE * row_bytes);
    let mut tile_outs = out.chunks_exact_mut(ROW_TILE * n);
    for (tile, ys) in (&mut tiles).zip(&mut tile_outs) {
        unpacked.clear();
        unpacked.extend(
            tile.chunks_exact(block_bytes)
                .map(|block| unpack(dtype, block, &k)),
        );
        for (t, act) in acts.iter().enumerate() {
            let mut acc = [_mm256_setzero_ps(); ROW_TILE];
            let mut summs = [0.0f32; ROW_TILE];
            for (b, a) in act.iter().enumerate() {
                // SAFETY: `a.qs` is 32 bytes.
                let qy = unsafe { _mm256_loadu_si256(a.qs.as_ptr().cast()) };
                for r in 0..ROW_TILE {
                    let w = &unpacked[r * blocks + b];
                    let sums = block_sums_with(w, qy, &k);
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(w.d * a.d), sums, acc[r]);
                    summs[r] += w.m * a.s;
                }
            }
            for r in 0..ROW_TILE {
                ys[r * n + t] = finish(dtype, acc[r], summs[r]);
            }
        }
    }
    // Rows left over after the last whole tile, one at a time.
    for (row, ys) in tiles
        .remainder()
        .chunks_exact(row_bytes)
        .zip(tile_outs.into_remainder().chunks_exact_mut(n))
    {
        unpacked.clear();
        unpacked.extend(
            row.chunks_exact(block_bytes)
                .map(|block| unpack(dtype, block, &k)),
        );
        for (y, act) in ys.iter_mut().zip(acts) {
            let mut acc = _mm256_setzero_ps();
            let mut summs = 0.0f32;
            for (w, a) in unpacked.iter().zip(act) {
                acc = _mm256_fmadd_ps(_mm256_set1_ps(w.d * a.d), block_sums(w, a, &k), acc);
                summs += w.m * a.s;
            }
            *y = finish(dtype, acc, summs);
        }
    }
}
