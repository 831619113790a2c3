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
//!
//! The kernels are in `x86::wide`.

use super::QK;
use crate::quant::GgmlType;

/// Rows in one group.
pub(super) const ROWS: usize = 16;

/// Whether a `[rows, cols]` matrix of `dtype` can take this layout: one of its formats, whole
/// groups (the CPU must run AVX-512 VNNI too).
pub(super) fn repacks(dtype: GgmlType, rows: usize) -> bool {
    quants(dtype).is_some() && rows.is_multiple_of(ROWS)
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
