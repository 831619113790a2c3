//! `Q4_0`, `Q4_1`, `Q8_0` and the K formats repacked for AVX-512 VNNI into groups of sixteen
//! rows whose 32-bit lanes each hold four quants of one row: one `vpdpbusd` multiplies four
//! values of all sixteen rows by four activation bytes, broadcast from memory by the
//! instruction itself.
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
//!
//! The K formats (`Q4_K`, `Q6_K`) take the same sixteen-row groups, one super-block of each row
//! per group-block, their bytes moved but not changed: the 32-bit words of the sixteen blocks
//! transposed, so that the 64-byte vector at `64w` holds word `w` of each row, row `i`'s at
//! bytes `4i..4i + 4` — four nibble bytes (`Q4_K`: the low nibbles four values of one
//! sub-block, the high nibbles the same four of the next; `Q6_K`'s `ql` likewise, its `qh` four
//! bytes of high bits) or four scale bytes. One `and` (and a shift) turns a vector of them into
//! four unsigned quants of each of sixteen rows, one row per lane, for one `vpdpbusd`: nothing is
//! unpacked across lanes at run time. The words that are no whole word of every row are gathered
//! apart, sixteen f16 in a row:
//! - `Q4_K` (144 bytes a block): the rows' scales `d` (bytes 0..32), their minimums `dmin`
//!   (32..64), then words 1..36 (the packed sub-block scales and minimums, words 1..4; the
//!   nibbles, words 4..36) at `64w`;
//! - `Q6_K` (210 bytes): words 0..52 (`ql` 0..32, `qh` 32..48, the sub-block scales 48..52),
//!   the values' words reordered so that each step of a product reads three neighbours
//!   ([`q6k_slot`]), then the rows' scales `d` (bytes 3328..3360).
//!
//! The kernels are in `x86::wide` and (the K formats) `x86::wide_k`.

use super::QK;
use crate::quant::GgmlType;

/// Rows in one group.
pub(super) const ROWS: usize = 16;

/// Whether a `[rows, cols]` matrix of `dtype` can take this layout: one of its formats, whole
/// groups (the CPU must run AVX-512 VNNI too).
pub(super) fn repacks(dtype: GgmlType, rows: usize) -> bool {
    (quants(dtype).is_some() || super::is_k(dtype)) && rows.is_multiple_of(ROWS)
}

/// Where a `Q4_K` group-block keeps its rows' f16 minimums (their scales at 0).
pub(super) const Q4K_DMIN_AT: usize = 32;
/// Where a `Q6_K` group-block keeps its rows' f16 scales.
pub(super) const Q6K_D_AT: usize = 64 * Q6K_WORDS;
/// The whole 32-bit words of a `Q6_K` block (its last two bytes are its scale).
const Q6K_WORDS: usize = 52;
/// The first of a `Q4_K` block's words kept as words (its first holds its two f16): words 1..4
/// are its packed sub-block scales and minimums.
pub(super) const Q4K_FIRST_WORD: usize = 1;
/// Where a `Q4_K` block's nibbles start, in words: word `4 + 8c + j` holds values `4j..4j + 4`
/// of sub-blocks `2c` (low nibbles) and `2c + 1` (high).
pub(super) const Q4K_NIBBLES: usize = 4;
/// Where a `Q6_K` block's sub-block scales start, in words: word `48 + m` holds scales
/// `4m..4m + 4`.
pub(super) const Q6K_SCALES: usize = 48;

/// Where a `Q6_K` group-block keeps its blocks' word `w`: the three words that a step of its
/// products reads together lie together, in the order it reads them (for each half `h` of the
/// block and step `j`, `ql` words `16h + j` and `16h + 8 + j`, then `qh` word `32 + 8h + j`),
/// then the sub-block scales (words 48..52).
pub(super) const fn q6k_slot(w: usize) -> usize {
    match w {
        0..32 => 24 * (w / 16) + 3 * (w % 8) + w % 16 / 8,
        32..Q6K_SCALES => 24 * ((w - 32) / 8) + 3 * ((w - 32) % 8) + 2,
        _ => w,
    }
}

/// Where a K-format group-block keeps word `w` of its rows' blocks (`Q6_K`: slot `w`, see
/// [`q6k_slot`]).
pub(super) const fn word_at(w: usize) -> usize {
    64 * w
}

/// Where a format's group-block keeps its quants, and how many bytes of quants a block of one
/// row has in the file and from where.
fn quants(dtype: GgmlType) -> Option<Quants> {
    match dtype {
        GgmlType::Q4_0 => Some(Quants {
            at: 32,
            file_at: 2,
            file_len: QK / 2,
        }),
        GgmlType::Q4_1 => Some(Quants {
            at: 64,
            file_at: 4,
            file_len: QK / 2,
        }),
        GgmlType::Q8_0 => Some(Quants {
            at: 32,
            file_at: 2,
            file_len: QK,
        }),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy)]
struct Quants {
    at: usize,
    file_at: usize,
    file_len: usize,
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
    if super::is_k(dtype) {
        return repack_k(dtype, row_bytes, bytes, out, done);
    }
    let Some(q) = quants(dtype) else {
        unreachable!("only formats with a wide layout are repacked into it")
    };
    super::repack_groups::<ROWS>(dtype, row_bytes, bytes, out, done, |src, dst| {
        for (i, src) in src.iter().enumerate() {
            dst[2 * i..2 * i + 2].copy_from_slice(&src[..2]);
            if dtype == GgmlType::Q4_1 {
                dst[32 + 2 * i..32 + 2 * i + 2].copy_from_slice(&src[2..4]);
            }
            let file_quants = &src[q.file_at..][..q.file_len];
            for (p, four) in file_quants.chunks_exact(4).enumerate() {
                let to = &mut dst[q.at + 64 * p + 4 * i..][..4];
                to.copy_from_slice(four);
                if dtype == GgmlType::Q8_0 {
                    to.iter_mut().for_each(|q| *q ^= 0x80);
                }
            }
        }
    });
}

/// [`repack`] for the K formats: each group-block's words transposed, its f16 gathered.
fn repack_k(
    dtype: GgmlType,
    row_bytes: usize,
    bytes: &[u8],
    out: &mut [u8],
    done: impl FnMut(usize),
) {
    let q4k = dtype == GgmlType::Q4K;
    let words = if q4k {
        Q4K_FIRST_WORD..dtype.type_size() / 4
    } else {
        0..Q6K_WORDS
    };
    super::repack_groups::<ROWS>(dtype, row_bytes, bytes, out, done, |src, dst| {
        for (i, src) in src.iter().enumerate() {
            if q4k {
                dst[2 * i..2 * i + 2].copy_from_slice(&src[..2]);
                dst[Q4K_DMIN_AT + 2 * i..][..2].copy_from_slice(&src[2..4]);
            } else {
                dst[Q6K_D_AT + 2 * i..][..2].copy_from_slice(&src[4 * Q6K_WORDS..][..2]);
            }
            for w in words.clone() {
                let slot = if q4k { w } else { q6k_slot(w) };
                dst[word_at(slot) + 4 * i..][..4].copy_from_slice(&src[4 * w..][..4]);
            }
        }
    });
}
