//! The 32-value formats (`Q4_0`, `Q4_1`, `Q5_0`, `Q8_0`) repacked at load time into groups of
//! eight rows, so that one register holds quants of each of eight rows and one activation
//! broadcast multiplies all eight at once.
//!
//! In the file, each row's blocks follow each other, and a dot product pays its unpacking, its
//! int-to-float conversion and its scale once per row and block. Interleaved, the eight rows'
//! integer dot products of one block land in the lanes of one register: the conversion, the
//! scales and the accumulation cost one instruction for eight rows, and prefill unpacks each
//! block once for every token.
//!
//! A group-block (eight rows × one 32-value block) holds, in order:
//! - the eight rows' f16 scales `d` (16 bytes);
//! - `Q4_1`: their f16 minimums `m` (16 bytes);
//!   `Q5_0`: four 64-bit masks of fifth bits (32 bytes), mask `k = 2h + p` bit `8i + t` being
//!   the fifth bit of row `i`'s value `16h + 8p + t`: one masked add (AVX-512) or a broadcast,
//!   a shuffle, an `and` and a compare (AVX2) spreads a mask over the bytes it belongs to;
//! - the nibbles (128 bytes): two 64-byte vectors, vector `p` holding at bytes `8i..8i + 8` row
//!   `i`'s nibble bytes `8p..8p + 8`. Their low nibbles are values `8p..8p + 8`, their high
//!   nibbles values `16 + 8p..16 + 8p + 8`, as in the file's blocks;
//!   `Q8_0`: the quants (256 bytes), already unpacked (below), as signed bytes.
//!
//! Unpacked, the quants form four 64-byte vectors `k = 2h + p` (low nibbles `h = 0`, high
//! `h = 1`) whose 32-bit lanes `2i` and `2i + 1` are row `i`'s values `8k..8k + 4` and
//! `8k + 4..8k + 8`: the lanes of the file-layout kernels, `l = 2k` and `2k + 1`. One 64-bit
//! broadcast of activation bytes `8k..8k + 8` meets them all; AVX-512 VNNI multiplies and sums
//! them in one instruction, AVX2 works on rows `0..4` and `4..8` apart, NEON on two rows per
//! register. The x86 products take unsigned quants: `Q8_0`'s are offset by 128
//! (AVX2 moves the sign onto the activations instead, as its 16-bit pair sums would overflow).
//! NEON's products are signed: it takes `Q8_0`'s quants as stored, `Q5_0`'s minus 16, and
//! takes `Q4_0`'s offset off the integer totals.
//!
//! Each group-block has exactly the bytes of its eight blocks, so memory budgets are unchanged.
//! Products are exact integers (the offsets of 8, 16 and 128 come off in integers), scaled by `d_w · d_a` with one fused multiply-add per row into f32; `Q4_1`'s
//! minimums are summed apart and added at the end. How the integers are grouped before scaling
//! depends on the format:
//! - `Q4_0`, `Q4_1`: one integer per block and row, one accumulator per row, as in the
//!   reference engine's portable code. SmolLM2's greedy output is still the reference's.
//! - `Q5_0`, `Q8_0`: one integer per four values (eight lanes per row), summed at the end in
//!   the file-layout kernels' order, whose bits these are. This is the reference engine's AVX2
//!   order; gemma3's perplexity on the reference text, at 252 scored tokens, moves by 0.8% with
//!   the accumulation order (7.33 with lanes, 7.38 with one integer per block; 7.29 measured).
//!
//! Every path (AVX-512 VNNI, AVX2, NEON with or without the dot product extension, portable)
//! computes the same bits.

use super::{ActBlock, QK};
use crate::quant::GgmlType;

/// Rows in one group.
pub(super) const ROWS: usize = 8;
/// Bytes of a group's nibbles for one block.
pub(super) const NIBBLES: usize = ROWS * QK / 2;
/// Bytes of a group's unpacked quants for one block, four vectors of 64.
pub(super) const UNPACKED: usize = ROWS * QK;
/// Where a `Q5_0` group-block's fifth-bit masks start.
pub(super) const MASKS_AT: usize = 16;

/// Whether a `[rows, cols]` matrix of `dtype` is repacked: one of the formats above, whole groups.
pub fn repacks(dtype: GgmlType, rows: usize) -> bool {
    matches!(
        dtype,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0
    ) && rows.is_multiple_of(ROWS)
}

/// Where a group-block's nibbles (`Q8_0`: quants) start.
pub(super) const fn nibbles_at(dtype: GgmlType) -> usize {
    match dtype {
        GgmlType::Q4_1 => 32,
        GgmlType::Q5_0 => 48,
        _ => 16,
    }
}

/// Bytes of one group-block of `dtype`.
pub(super) fn group_block_bytes(dtype: GgmlType) -> usize {
    ROWS * dtype.type_size()
}

/// Repacks `bytes` (rows in the file's layout, `row_bytes` each) into groups of [`ROWS`] rows,
/// in `out` (as long as `bytes`). `repacks(dtype, rows)` must hold. `done(n)` hears, every few
/// hundred KiB, that the first `n` bytes of `bytes` will not be read again.
pub(super) fn repack(
    dtype: GgmlType,
    row_bytes: usize,
    bytes: &[u8],
    out: &mut [u8],
    done: impl FnMut(usize),
) {
    // Where each format keeps its 16 nibble bytes.
    let qs_at = match dtype {
        GgmlType::Q4_1 => 4,
        GgmlType::Q5_0 => 6,
        _ => 2,
    };
    super::repack_groups::<ROWS>(dtype, row_bytes, bytes, out, done, |src, dst| {
        for (i, src) in src.iter().enumerate() {
            dst[2 * i..2 * i + 2].copy_from_slice(&src[..2]);
            if dtype == GgmlType::Q4_1 {
                dst[16 + 2 * i..16 + 2 * i + 2].copy_from_slice(&src[2..4]);
            }
            let vectors = if dtype == GgmlType::Q8_0 { 4 } else { 2 };
            for p in 0..vectors {
                let to = nibbles_at(dtype) + 64 * p + 8 * i;
                dst[to..to + 8].copy_from_slice(&src[qs_at + 8 * p..qs_at + 8 * p + 8]);
            }
        }
        if dtype == GgmlType::Q5_0 {
            let qh: [u32; ROWS] = std::array::from_fn(|i| {
                u32::from_le_bytes(src[i][2..6].try_into().expect("4 bytes"))
            });
            for k in 0..4 {
                let mut mask = 0u64;
                for (i, qh) in qh.iter().enumerate() {
                    for t in 0..8 {
                        mask |= u64::from((qh >> (8 * k + t)) & 1) << (8 * i + t);
                    }
                }
                dst[MASKS_AT + 8 * k..MASKS_AT + 8 * k + 8].copy_from_slice(&mask.to_le_bytes());
            }
        }
    });
}

/// The value offset of `dtype`'s quants: taken unsigned, they stand for `q - offset`.
pub(super) const fn offset(dtype: GgmlType) -> i32 {
    match dtype {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        GgmlType::Q8_0 => 128,
        _ => 0,
    }
}

/// Fills in what `dtype`'s kernels need of the activation blocks beyond their quantization:
/// the lane biases of the formats that accumulate by lanes.
pub(super) fn prepare(dtype: GgmlType, acts: &mut [Vec<ActBlock>]) {
    use rayon::prelude::*;
    if by_lanes(dtype) {
        acts.par_iter_mut().flatten().for_each(|a| {
            a.lane_bias = std::array::from_fn(|l| {
                -offset(dtype)
                    * a.qs[4 * l..4 * l + 4]
                        .iter()
                        .map(|&q| q as i32)
                        .sum::<i32>()
            });
        });
    }
}

/// Whether `dtype` accumulates eight lanes per row rather than one integer per block (`Q5_0`
/// and `Q8_0`, whose lane biases the activation blocks carry).
pub(super) const fn by_lanes(dtype: GgmlType) -> bool {
    matches!(dtype, GgmlType::Q5_0 | GgmlType::Q8_0)
}

/// The formats as the SIMD kernels' const generic parameter.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(super) mod formats {
    use crate::quant::GgmlType;

    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q5_0: u8 = 2;
    pub const Q8_0: u8 = 3;

    pub const fn format(f: u8) -> GgmlType {
        match f {
            Q4_0 => GgmlType::Q4_0,
            Q4_1 => GgmlType::Q4_1,
            Q5_0 => GgmlType::Q5_0,
            _ => GgmlType::Q8_0,
        }
    }

    /// Whether format `f` accumulates by lanes (see [`super::by_lanes`]).
    pub const fn lanes(f: u8) -> bool {
        super::by_lanes(format(f))
    }
}
