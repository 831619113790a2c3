//! Quantized matrix × activation products computed by Realm itself.
//!
//! Activations are quantized to 8 bits per 32-value block (`Q8_0`, or `Q8_1` which also carries
//! the block's scaled sum), then each weight row is dotted with them in integers and scaled
//! once per block. The rounding of activations (ties to even), the per-block scale products and
//! the eight-lane accumulation order follow the de-facto reference numerics of GGUF engines, so
//! greedy decoding agrees with them token for token even where two candidates nearly tie.
//!
//! Matrices whose rows come in whole groups of eight, in the 4-bit 32-value formats, are
//! repacked at load with their rows interleaved (see [`interleaved`]), which changes how the
//! integers are grouped before scaling for `Q4_0` and `Q4_1` (one total per block).
//!
//! The K formats (`Q4_K`, `Q6_K`) work on super-blocks of 256 values: activations are quantized
//! to `Q8_K` (one f32 scale per 256 values, and the sums of each 16 quants so that a weight
//! block's minimum or offset costs one integer product per sub-block). Every sub-block scale is
//! applied in integers, and each super-block's integer total is scaled into one f32 accumulator
//! with one fused multiply-add (minimums into a second one, subtracted at the end). Of the
//! accumulation orders tried, this one agrees best with the reference engine's output on gemma3
//! (63 of 64 teacher-forced tokens, against 60 with eight lanes per row).
//!
//! Every kernel has a portable version, which defines the bits of the results, and SIMD
//! versions chosen at run time by what the CPU has: AVX2 and AVX-512 VNNI on x86-64, NEON on
//! aarch64 (with the dot product extension where the CPU has it). They group the integer sums
//! as suits them (integers are exact) but do every f32 operation of the portable code, in the
//! same order with the same rounding, so every path computes the same bits.
//!
//! Formats without a kernel here fall back to candle's (see `model::Linear`).

use std::sync::Arc;

use half::f16;
use rayon::prelude::*;

use crate::gguf::TensorData;
use crate::quant::GgmlType;

mod interleaved;
pub use interleaved::repacks;
#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod neon;
mod wide;

const QK: usize = 32;
/// Values in a K-format super-block and in a `Q8_K` activation block.
const QK_K: usize = 256;
/// Accumulator lanes: each lane sums four adjacent products of a 32-value block.
const LANES: usize = 8;

/// Tokens of a several-token product whose accumulators one pass over a group of rows keeps
/// (on the stack): each group-block of weights is unpacked once per pass.
const TOKENS_PER_PASS: usize = 16;

/// A pass's accumulators: `room`'s first `n` (at most [`TOKENS_PER_PASS`]), set to `init`; the
/// rest of the room stays untouched, so a pass of few tokens clears no more than it uses.
#[allow(unsafe_code)]
fn pass_accumulators<A: Copy>(
    room: &mut [std::mem::MaybeUninit<A>; TOKENS_PER_PASS],
    n: usize,
    init: A,
) -> &mut [A] {
    let used = &mut room[..n];
    for acc in used.iter_mut() {
        acc.write(init);
    }
    // SAFETY: the first `n` elements were written just above, and `MaybeUninit<A>` has `A`'s
    // layout.
    unsafe { std::slice::from_raw_parts_mut(used.as_mut_ptr().cast::<A>(), n) }
}

/// Walks `bytes` (a matrix in the file's layout) a group of `group_len` bytes at a time for a
/// repacking into `out` (as long as `bytes`), calling `each(g, group, out_group)` for group `g`,
/// and telling `done(n)`, every few hundred KiB, that the first `n` bytes of `bytes` will not be
/// read again.
fn repack_groups(
    bytes: &[u8],
    out: &mut [u8],
    group_len: usize,
    mut done: impl FnMut(usize),
    mut each: impl FnMut(usize, &[u8], &mut [u8]),
) {
    const REPORT_EVERY: usize = 256 << 10;
    assert_eq!(
        out.len(),
        bytes.len(),
        "a repacked copy has the original's size"
    );
    let mut reported = 0;
    for (g, (group, to)) in bytes
        .chunks_exact(group_len)
        .zip(out.chunks_exact_mut(group_len))
        .enumerate()
    {
        let consumed = g * group_len;
        if consumed >= reported + REPORT_EVERY {
            done(consumed);
            reported = consumed;
        }
        each(g, group, to);
    }
    done(bytes.len());
}

/// Weight formats with a kernel here.
pub fn supported(dtype: GgmlType) -> bool {
    matches!(
        dtype,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q6K
    )
}

/// Whether a `[rows, cols]` matrix of `dtype` has a kernel here: its rows must be whole blocks
/// (a K-format tensor narrower than a super-block is stored in another format anyway).
pub fn supported_shape(dtype: GgmlType, cols: usize) -> bool {
    supported(dtype) && cols.is_multiple_of(dtype.block_size())
}

/// Whether this CPU runs the AVX2 paths (AVX2, FMA and F16C), here and in attention.
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd_available() -> bool {
    simd::available()
}

/// Whether this CPU runs the NEON paths, here and in attention.
#[cfg(target_arch = "aarch64")]
pub(crate) fn neon_available() -> bool {
    neon::available()
}

/// f16 conversions in NEON registers, for attention.
#[cfg(target_arch = "aarch64")]
pub(crate) use neon::{narrow_f16, widen_f16};

/// Whether this CPU runs the AVX-512 paths (F, BW and VNNI, with the AVX2 ones).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512_available() -> bool {
    simd::avx512_available()
}

/// K formats pair with `Q8_K` activations, the others with `Q8_0`/`Q8_1`.
fn is_k(dtype: GgmlType) -> bool {
    matches!(dtype, GgmlType::Q4K | GgmlType::Q6K)
}

/// One activation block: 32 signed 8-bit values, their scale, (`Q8_1`) scale × sum, their sum
/// (for kernels that store quants with an offset), and for the kernels that need them
/// ([`interleaved::prepare`]) minus 16 × each lane's sum (`Q5_0`'s offset, added to each lane's
/// integer); zeros otherwise.
#[derive(Debug, Clone, Copy, Default)]
struct ActBlock {
    d: f32,
    s: f32,
    sum: i32,
    lane_bias: [i32; LANES],
    qs: [i8; QK],
}

/// Quantizes one activation row (`len % 32 == 0`) into `out`.
fn quantize_row(x: &[f32], out: &mut Vec<ActBlock>) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        return simd::quantize_row(x, out);
    }
    #[cfg(target_arch = "aarch64")]
    if neon::available() {
        return neon::quantize_row(x, out);
    }
    quantize_row_portable(x, out)
}

#[inline(always)]
fn quantize_row_portable(x: &[f32], out: &mut Vec<ActBlock>) {
    out.clear();
    for block in x.chunks_exact(QK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut qs = [0i8; QK];
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(block) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        out.push(ActBlock {
            d: f16::from_f32(d).to_f32(),
            s: f16::from_f32(d * sum as f32).to_f32(),
            sum,
            lane_bias: [0; LANES],
            qs,
        });
    }
}

/// One `Q8_K` activation block: 256 signed 8-bit values in eight 32-value groups, their f32
/// scale, and the sum of each 16 consecutive quants.
#[derive(Debug, Clone, Copy)]
struct KBlock {
    d: f32,
    qs: [[i8; QK]; QK_K / QK],
    bsums: [i16; QK_K / 16],
}

/// Quantizes one activation row (`len % 256 == 0`) into `Q8_K` blocks.
fn quantize_row_k(x: &[f32], out: &mut Vec<KBlock>) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        return simd::quantize_row_k(x, out);
    }
    #[cfg(target_arch = "aarch64")]
    if neon::available() {
        return neon::quantize_row_k(x, out);
    }
    quantize_row_k_portable(x, out)
}

/// The scale maps the block's largest magnitude to exactly -127 (its sign folded into the
/// scale); rounding is to nearest, ties to even.
#[inline(always)]
fn quantize_row_k_portable(x: &[f32], out: &mut Vec<KBlock>) {
    out.clear();
    for block in x.chunks_exact(QK_K) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in block {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let mut q = KBlock {
            d: 0.0,
            qs: [[0; QK]; QK_K / QK],
            bsums: [0; QK_K / 16],
        };
        if amax != 0.0 {
            let iscale = -127.0 / max;
            for (q, &v) in q.qs.as_flattened_mut().iter_mut().zip(block) {
                *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
            }
            for (sum, qs) in q.bsums.iter_mut().zip(q.qs.as_flattened().chunks_exact(16)) {
                *sum = qs.iter().map(|&v| v as i16).sum();
            }
            q.d = 1.0 / iscale;
        }
        out.push(q);
    }
}

/// `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))`: the horizontal-sum order of an 8-lane register.
#[inline(always)]
fn hsum(acc: [f32; LANES]) -> f32 {
    let r = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// Integer dot product of one block, as eight lane sums of four adjacent products.
#[inline(always)]
fn lane_sums(w: &[i32; QK], a: &[i8; QK]) -> [i32; LANES] {
    let mut lanes = [0i32; LANES];
    for (l, lane) in lanes.iter_mut().enumerate() {
        for j in 4 * l..4 * l + 4 {
            *lane += w[j] * a[j] as i32;
        }
    }
    lanes
}

#[inline(always)]
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

#[inline(always)]
fn dot_q4_1(row: &[u8], act: &[ActBlock]) -> f32 {
    const SIZE: usize = 20;
    let mut acc = [0.0f32; LANES];
    let mut summs = 0.0f32;
    for (block, a) in row.chunks_exact(SIZE).zip(act) {
        let d = f16_at(block, 0);
        let m = f16_at(block, 2);
        summs += m * a.s;
        let mut w = [0i32; QK];
        for j in 0..QK / 2 {
            w[j] = (block[4 + j] & 0x0F) as i32;
            w[j + QK / 2] = (block[4 + j] >> 4) as i32;
        }
        let dd = d * a.d;
        for (acc, lane) in acc.iter_mut().zip(lane_sums(&w, &a.qs)) {
            *acc = dd.mul_add(lane as f32, *acc);
        }
    }
    hsum(acc) + summs
}

#[inline(always)]
fn dot_q4_0(row: &[u8], act: &[ActBlock]) -> f32 {
    const SIZE: usize = 18;
    let mut acc = [0.0f32; LANES];
    for (block, a) in row.chunks_exact(SIZE).zip(act) {
        let d = f16_at(block, 0);
        let mut w = [0i32; QK];
        for j in 0..QK / 2 {
            w[j] = (block[2 + j] & 0x0F) as i32 - 8;
            w[j + QK / 2] = (block[2 + j] >> 4) as i32 - 8;
        }
        let dd = d * a.d;
        for (acc, lane) in acc.iter_mut().zip(lane_sums(&w, &a.qs)) {
            *acc = dd.mul_add(lane as f32, *acc);
        }
    }
    hsum(acc)
}

#[inline(always)]
fn dot_q5_0(row: &[u8], act: &[ActBlock]) -> f32 {
    const SIZE: usize = 22;
    let mut acc = [0.0f32; LANES];
    for (block, a) in row.chunks_exact(SIZE).zip(act) {
        let d = f16_at(block, 0);
        let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        let mut w = [0i32; QK];
        for j in 0..QK / 2 {
            let lo = (block[6 + j] & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32;
            let hi = (block[6 + j] >> 4) as i32 | (((qh >> (j + QK / 2)) & 1) << 4) as i32;
            w[j] = lo - 16;
            w[j + QK / 2] = hi - 16;
        }
        let dd = d * a.d;
        for (acc, lane) in acc.iter_mut().zip(lane_sums(&w, &a.qs)) {
            *acc = dd.mul_add(lane as f32, *acc);
        }
    }
    hsum(acc)
}

#[inline(always)]
fn dot_q8_0(row: &[u8], act: &[ActBlock]) -> f32 {
    const SIZE: usize = 34;
    let mut acc = [0.0f32; LANES];
    for (block, a) in row.chunks_exact(SIZE).zip(act) {
        let d = f16_at(block, 0);
        let mut w = [0i32; QK];
        for (w, &b) in w.iter_mut().zip(&block[2..SIZE]) {
            *w = b as i8 as i32;
        }
        let dd = d * a.d;
        for (acc, lane) in acc.iter_mut().zip(lane_sums(&w, &a.qs)) {
            *acc = dd.mul_add(lane as f32, *acc);
        }
    }
    hsum(acc)
}

/// Bytes of a `Q4_K` super-block: f16 scale and minimum scale, 12 bytes of 6-bit sub-block
/// scales and minimums, 128 bytes of 4-bit quants.
const Q4_K_SIZE: usize = 144;
/// Bytes of a `Q6_K` super-block: 128 bytes of low 4 bits, 64 of high 2 bits, 16 signed 8-bit
/// sub-block scales, then the f16 scale.
const Q6_K_SIZE: usize = 210;

/// The eight 6-bit scales and eight 6-bit minimums of a `Q4_K` super-block: sub-blocks 0..4 keep
/// theirs in the low six bits of bytes 0..4 (scales) and 4..8 (minimums); sub-blocks 4..8 keep
/// their low four bits in the nibbles of bytes 8..12 and their top two in the spare bits above.
#[inline(always)]
fn q4_k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    // Four bytes at a time: scales 0..4 and minimums 0..4 are the low six bits of bytes 0..4 and
    // 4..8; scales and minimums 4..8 take their low four bits from the nibbles of bytes 8..12
    // and their top two from the top bits of bytes 0..4 and 4..8.
    const SIX: u32 = 0x3f3f_3f3f;
    const NIBBLE: u32 = 0x0f0f_0f0f;
    const TWO: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (first, second, third) = (word(0), word(1), word(2));
    let halves = |low: u32, high: u32| {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&low.to_le_bytes());
        out[4..].copy_from_slice(&high.to_le_bytes());
        out
    };
    (
        halves(first & SIX, (third & NIBBLE) | ((first >> 6) & TWO) << 4),
        halves(
            second & SIX,
            ((third >> 4) & NIBBLE) | ((second >> 6) & TWO) << 4,
        ),
    )
}

/// `Σ m[sub] · Σ activations of sub` in integers: what the minimums take off a super-block.
#[inline(always)]
fn q4_k_min_sum(m: &[u8; 8], a: &KBlock) -> i32 {
    (0..8)
        .map(|s| m[s] as i32 * (a.bsums[2 * s] as i32 + a.bsums[2 * s + 1] as i32))
        .sum()
}

/// In each 64-value group of a `Q4_K` super-block, values 0..32 are the low nibbles of 32 bytes
/// and 32..64 the high nibbles; sub-block `s` (32 values) has scale `sc[s]` and minimum `m[s]`.
#[inline(always)]
fn dot_q4_k(row: &[u8], act: &[KBlock]) -> f32 {
    let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
    for (block, a) in row.chunks_exact(Q4_K_SIZE).zip(act) {
        let d = f16_at(block, 0) * a.d;
        let dmin = f16_at(block, 2) * a.d;
        let (sc, m) = q4_k_scales(&block[4..16]);
        let mut lanes = [0i32; LANES];
        for (sub, a) in a.qs.iter().enumerate() {
            let bytes = &block[16 + 32 * (sub / 2)..16 + 32 * (sub / 2) + QK];
            let shift = 4 * (sub % 2);
            let mut w = [0i32; QK];
            for (w, &b) in w.iter_mut().zip(bytes) {
                *w = ((b >> shift) & 0x0F) as i32;
            }
            for (lane, s) in lanes.iter_mut().zip(lane_sums(&w, a)) {
                *lane += sc[sub] as i32 * s;
            }
        }
        acc = (lanes.iter().sum::<i32>() as f32).mul_add(d, acc);
        acc_min = (q4_k_min_sum(&m, a) as f32).mul_add(dmin, acc_min);
    }
    acc - acc_min
}

/// A `Q6_K` value is 4 low bits from `ql` and 2 high bits from `qh`, minus 32. In each 128-value
/// half, 32-value part `p` takes the low (p < 2) or high nibbles of `ql[32 (p % 2)..]` and bits
/// `2p..2p+2` of the half's 32 `qh` bytes; every 16 values share one signed scale.
#[inline(always)]
fn dot_q6_k(row: &[u8], act: &[KBlock]) -> f32 {
    let mut acc = 0.0f32;
    for (block, a) in row.chunks_exact(Q6_K_SIZE).zip(act) {
        let (ql, rest) = block.split_at(128);
        let (qh, rest) = rest.split_at(64);
        let (scales, d) = rest.split_at(16);
        let d = f16_at(d, 0) * a.d;
        let mut lanes = [0i32; LANES];
        for (chunk, a) in a.qs.iter().enumerate() {
            let (half, part) = (chunk / 4, chunk % 4);
            let low = &ql[64 * half + 32 * (part % 2)..][..QK];
            let high = &qh[32 * half..][..QK];
            let mut w = [0i32; QK];
            for ((w, &l), &h) in w.iter_mut().zip(low).zip(high) {
                let v = ((l >> (4 * (part / 2))) & 0x0F) | (((h >> (2 * part)) & 3) << 4);
                *w = v as i32 - 32;
            }
            for (l, (lane, s)) in lanes.iter_mut().zip(lane_sums(&w, a)).enumerate() {
                *lane += scales[2 * chunk + l / 4] as i8 as i32 * s;
            }
        }
        acc = (lanes.iter().sum::<i32>() as f32).mul_add(d, acc);
    }
    acc
}

/// A quantized weight matrix `[rows, cols]`: in the file's layout (row-major, ggml blocks), or
/// repacked into groups of rows (see [`interleaved`]).
#[derive(Debug, Clone)]
pub struct QMatrix {
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Storage,
}

/// Where a matrix's bytes live, and in which layout. Clones share the bytes.
#[derive(Debug, Clone)]
enum Storage {
    /// A copy in the file's layout.
    Owned(Arc<[u8]>),
    /// The mapped model file itself.
    Mapped(TensorData),
    /// A copy repacked into groups of [`interleaved::ROWS`] rows, in memory of its own
    /// (huge pages where the OS gives them).
    Interleaved(Arc<memmap2::Mmap>),
    /// As `Interleaved`, in groups of [`wide::ROWS`] rows for AVX-512 VNNI.
    Wide(Arc<memmap2::Mmap>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Interleaved(v) | Self::Wide(v) => v,
            Self::Mapped(t) => t.bytes(),
        }
    }
}

impl QMatrix {
    /// `bytes` hold `rows` rows of `cols` values of `dtype` in the file's layout; `None` unless
    /// `supported_shape(dtype, cols)` and the sizes agree. The matrix keeps a copy, repacked
    /// where [`repacks`] says so.
    pub fn new(dtype: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        Self::new_releasing(dtype, rows, cols, bytes, |_| {})
    }

    /// [`new`](Self::new), telling `done(n)` as it goes that the first `n` bytes of `bytes`
    /// will not be read again: a copy out of a mapped file can give the file's pages back
    /// while it runs, so the copy and the file are never both resident.
    pub fn new_releasing(
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        done: impl FnMut(usize),
    ) -> Option<Self> {
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        if !supported_shape(dtype, cols) || bytes.len() != rows * row_bytes {
            return None;
        }
        let data = if wide::used(dtype, rows) {
            let mut copy = crate::mmap::huge_page_buffer(bytes.len()).ok()?;
            wide::repack(dtype, rows, row_bytes, bytes, &mut copy, done);
            Storage::Wide(Arc::new(copy.make_read_only().ok()?))
        } else if repacks(dtype, rows) {
            let mut copy = crate::mmap::huge_page_buffer(bytes.len()).ok()?;
            interleaved::repack(dtype, rows, row_bytes, bytes, &mut copy, done);
            Storage::Interleaved(Arc::new(copy.make_read_only().ok()?))
        } else {
            Storage::Owned(bytes.into())
        };
        Self::with_storage(dtype, rows, cols, data)
    }

    /// A matrix computed straight from the mapped model file: no copy is made, and the
    /// process's resident memory holds the weights only while their pages are mapped in.
    pub fn mapped(dtype: GgmlType, rows: usize, cols: usize, data: TensorData) -> Option<Self> {
        Self::with_storage(dtype, rows, cols, Storage::Mapped(data))
    }

    /// A copy kept in the file's layout, whatever the format.
    #[cfg(test)]
    fn file_layout_for_test(dtype: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Self {
        Self::with_storage(dtype, rows, cols, Storage::Owned(bytes.into())).unwrap()
    }

    fn with_storage(dtype: GgmlType, rows: usize, cols: usize, data: Storage) -> Option<Self> {
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let ok = supported_shape(dtype, cols) && data.bytes().len() == rows * row_bytes;
        ok.then_some(Self {
            dtype,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `out[t][r] = Σ_c x[t][c] · W[r][c]` for `t < n`; `x` is `[n, cols]`, `out` `[n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        debug_assert_eq!(x.len(), n * self.cols);
        debug_assert_eq!(out.len(), n * self.rows);
        if let Storage::Wide(bytes) = &self.data {
            let group_bytes = wide::ROWS * self.row_bytes;
            let mut acts = self.quantize(x, QK, quantize_row);
            interleaved::prepare(self.dtype, &mut acts);
            return self.run_tasks(n, out, wide::ROWS, |first, results| {
                let first = first / wide::ROWS;
                for (g, ys) in results.chunks_exact_mut(n * wide::ROWS).enumerate() {
                    let group = &bytes[(first + g) * group_bytes..][..group_bytes];
                    wide::group_matmul(self.dtype, group, &acts, ys);
                }
            });
        }
        if let Storage::Interleaved(bytes) = &self.data {
            let group_bytes = interleaved::ROWS * self.row_bytes;
            let mut acts = self.quantize(x, QK, quantize_row);
            interleaved::prepare(self.dtype, &mut acts);
            return self.run_tasks(n, out, interleaved::ROWS, |first, results| {
                let first = first / interleaved::ROWS;
                for (g, ys) in results.chunks_exact_mut(n * interleaved::ROWS).enumerate() {
                    let group = &bytes[(first + g) * group_bytes..][..group_bytes];
                    interleaved::group_matmul(self.dtype, group, &acts, ys);
                }
            });
        }
        if is_k(self.dtype) {
            let acts = self.quantize(x, QK_K, quantize_row_k);
            self.run_tasks(n, out, 1, |first, results| {
                let rows = &self.data.bytes()[first * self.row_bytes..]
                    [..results.len() / n * self.row_bytes];
                dot_rows_k(self.dtype, rows, self.row_bytes, &acts, results)
            })
        } else {
            let acts = self.quantize(x, QK, quantize_row);
            self.run_tasks(n, out, 1, |first, results| {
                let rows = &self.data.bytes()[first * self.row_bytes..]
                    [..results.len() / n * self.row_bytes];
                dot_rows(self.dtype, rows, self.row_bytes, &acts, results)
            })
        }
    }

    /// Each token's activations quantized into blocks of `block` values, the tokens of a
    /// prefill spread over the threads.
    fn quantize<A: Send>(
        &self,
        x: &[f32],
        block: usize,
        quantize: fn(&[f32], &mut Vec<A>),
    ) -> Vec<Vec<A>> {
        let one = |row: &[f32]| {
            let mut q = Vec::with_capacity(self.cols / block);
            quantize(row, &mut q);
            q
        };
        if x.len() == self.cols {
            return vec![one(x)];
        }
        x.par_chunks_exact(self.cols).map(one).collect()
    }

    /// Runs `task(first_row, results)` in parallel over slices of rows (whole `unit`s of
    /// them); `results` holds the slice's rows for every token (`[rows, n]` within a unit of
    /// one row, `[n, unit]` per unit otherwise), scattered into `out`'s `[n, rows]` afterwards.
    fn run_tasks(
        &self,
        n: usize,
        out: &mut [f32],
        unit: usize,
        task: impl Fn(usize, &mut [f32]) + Sync,
    ) {
        // Enough tasks that both halves of a two-way split stay busy, few enough that each
        // streams a good stretch of the matrix.
        let units = self.rows / unit;
        let tasks = 4 * rayon::current_num_threads();
        let per_task = units.div_ceil(tasks).max(if n == 1 { 1 } else { 2 }) * unit;
        let run = |results: &mut [f32]| {
            results
                .par_chunks_mut(per_task * n)
                .enumerate()
                .for_each(|(i, chunk)| task(i * per_task, chunk))
        };
        if n == 1 {
            // One token (decode): the results' layout is already `out`'s.
            return run(out);
        }
        let mut results = vec![0.0f32; n * self.rows];
        run(&mut results);
        // Each token's row gathered from the units, the tokens spread over the threads.
        out.par_chunks_exact_mut(self.rows)
            .enumerate()
            .for_each(|(t, ys)| match unit {
                1 => {
                    for (y, r) in ys.iter_mut().zip(results[t..].iter().step_by(n)) {
                        *y = *r;
                    }
                }
                unit => {
                    let from = results
                        .chunks_exact(n * unit)
                        .map(|b| &b[t * unit..][..unit]);
                    for (to, from) in ys.chunks_exact_mut(unit).zip(from) {
                        to.copy_from_slice(from);
                    }
                }
            });
    }
}

/// Dots every row of `rows` with every activation row: `out[r * n + t]`.
fn dot_rows(
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        return simd::dot_rows(dtype, rows, row_bytes, acts, out);
    }
    #[cfg(target_arch = "aarch64")]
    if let Some(path) = neon::Path::best() {
        return neon::dot_rows(path, dtype, rows, row_bytes, acts, out);
    }
    let n = acts.len();
    for (row, ys) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        for (y, act) in ys.iter_mut().zip(acts) {
            *y = match dtype {
                GgmlType::Q4_0 => dot_q4_0(row, act),
                GgmlType::Q4_1 => dot_q4_1(row, act),
                GgmlType::Q5_0 => dot_q5_0(row, act),
                _ => dot_q8_0(row, act),
            };
        }
    }
}

/// [`dot_rows`] for the K formats.
fn dot_rows_k(
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<KBlock>],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        return simd::dot_rows_k(dtype, rows, row_bytes, acts, out);
    }
    #[cfg(target_arch = "aarch64")]
    if let Some(path) = neon::Path::best() {
        return neon::dot_rows_k(path, dtype, rows, row_bytes, acts, out);
    }
    let n = acts.len();
    for (row, ys) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        for (y, act) in ys.iter_mut().zip(acts) {
            *y = match dtype {
                GgmlType::Q4K => dot_q4_k(row, act),
                _ => dot_q6_k(row, act),
            };
        }
    }
}

/// AVX2 versions of the block dot products: the same lane grouping and accumulation order as the
/// portable code, one instruction per step.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use std::arch::x86_64::*;

    use super::{hsum, q4_k_scales, ActBlock, KBlock, LANES, Q4_K_SIZE, Q6_K_SIZE};
    use crate::quant::GgmlType;

    pub fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }

    /// Whether this CPU also runs the AVX-512 paths: F and BW with VNNI (integer dot products
    /// in one instruction), besides [`available`]'s.
    pub fn avx512_available() -> bool {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| {
            available()
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vnni")
        })
    }

    /// The f16 at `block[at..at + 2]`, converted in one instruction.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16_at(block: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([block[at], block[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    pub fn quantize_row(x: &[f32], out: &mut Vec<ActBlock>) {
        // SAFETY: `available()` checked AVX2, FMA and F16C on this CPU before dispatching here.
        unsafe { quantize_row_avx2(x, out) }
    }

    /// The portable quantization in registers: the largest magnitude by `max` (exact, in any
    /// order), rounding to even in one instruction, packing to bytes with the order restored
    /// afterwards. The results are the same bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn quantize_row_avx2(x: &[f32], out: &mut Vec<ActBlock>) {
        out.clear();
        let sign = _mm256_set1_ps(-0.0);
        // `packs` interleaves the 128-bit halves; this puts the 32-bit groups back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for block in x.chunks_exact(super::QK) {
            // SAFETY: `block` is 32 f32, four loads of eight.
            let v: [__m256; 4] =
                std::array::from_fn(|i| unsafe { _mm256_loadu_ps(block[8 * i..].as_ptr()) });
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let q = v.map(|v| {
                _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(_mm256_mul_ps(v, id)))
            });
            let sum = hsum_i32(_mm256_add_epi32(
                _mm256_add_epi32(q[0], q[1]),
                _mm256_add_epi32(q[2], q[3]),
            ));
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let mut qs = [0i8; super::QK];
            // SAFETY: `qs` is 32 bytes.
            unsafe {
                _mm256_storeu_si256(
                    qs.as_mut_ptr().cast(),
                    _mm256_permutevar8x32_epi32(bytes, order),
                )
            };
            out.push(ActBlock {
                d: through_f16(d),
                s: through_f16(d * sum as f32),
                sum,
                lane_bias: [0; LANES],
                qs,
            });
        }
    }

    /// `x` rounded to the nearest f16 (ties to even) and back, as `f16::from_f32(x).to_f32()`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn through_f16(x: f32) -> f32 {
        let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x));
        _mm_cvtss_f32(_mm_cvtph_ps(h))
    }

    pub fn quantize_row_k(x: &[f32], out: &mut Vec<KBlock>) {
        // SAFETY: `available()` checked AVX2, FMA and F16C on this CPU before dispatching here.
        unsafe { quantize_row_k_avx2(x, out) }
    }

    /// The portable `Q8_K` quantization in registers: the largest magnitude by `max`, the
    /// first value of that magnitude found by comparing, then the same products, rounding and
    /// clamp as the portable code, so the same bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn quantize_row_k_avx2(x: &[f32], out: &mut Vec<KBlock>) {
        out.clear();
        let sign = _mm256_set1_ps(-0.0);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let top = _mm256_set1_epi32(127);
        for block in x.chunks_exact(super::QK_K) {
            // SAFETY: `block` is 256 f32, 32 loads of eight.
            let v: [__m256; 32] =
                std::array::from_fn(|i| unsafe { _mm256_loadu_ps(block[8 * i..].as_ptr()) });
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = abs
                .iter()
                .fold(_mm256_setzero_ps(), |m, &a| _mm256_max_ps(a, m));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let mut q = KBlock {
                d: 0.0,
                qs: [[0; super::QK]; super::QK_K / super::QK],
                bsums: [0; super::QK_K / 16],
            };
            if amax != 0.0 {
                let at = abs
                    .iter()
                    .enumerate()
                    .find_map(|(i, &a)| {
                        let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(
                            a,
                            _mm256_set1_ps(amax),
                        ));
                        (hits != 0).then(|| 8 * i + hits.trailing_zeros() as usize)
                    })
                    .expect("the largest magnitude is one of the values");
                let iscale = -127.0 / block[at];
                let scale = _mm256_set1_ps(iscale);
                for (g, qs) in q.qs.iter_mut().enumerate() {
                    let r: [__m256i; 4] = std::array::from_fn(|i| {
                        let p = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                            _mm256_mul_ps(scale, v[4 * g + i]),
                        );
                        _mm256_min_epi32(_mm256_cvtps_epi32(p), top)
                    });
                    for (h, sum) in q.bsums[2 * g..2 * g + 2].iter_mut().enumerate() {
                        *sum = hsum_i32(_mm256_add_epi32(r[2 * h], r[2 * h + 1])) as i16;
                    }
                    let bytes = _mm256_packs_epi16(
                        _mm256_packs_epi32(r[0], r[1]),
                        _mm256_packs_epi32(r[2], r[3]),
                    );
                    // SAFETY: `qs` is 32 bytes.
                    unsafe {
                        _mm256_storeu_si256(
                            qs.as_mut_ptr().cast(),
                            _mm256_permutevar8x32_epi32(bytes, order),
                        )
                    };
                }
                q.d = 1.0 / iscale;
            }
            out.push(q);
        }
    }

    pub fn dot_rows(
        dtype: GgmlType,
        rows: &[u8],
        row_bytes: usize,
        acts: &[Vec<ActBlock>],
        out: &mut [f32],
    ) {
        // SAFETY: `available()` checked AVX2, FMA and F16C on this CPU before dispatching here.
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
                let set =
                    _mm256_cmpeq_epi8(_mm256_or_si256(spread, k.bit_mask), _mm256_set1_epi8(-1));
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

    const CACHE_LINE: usize = 64;
    /// Rows a prefill tile computes together: one activation load serves them all.
    const ROW_TILE: usize = 4;

    /// How far ahead of the rows in use the decode loops ask for weights: far enough that the
    /// lines arrive before the loop reaches them (a pair of rows is too close to hide the
    /// memory's latency).
    const PREFETCH_AHEAD: usize = 4096;

    /// Asks for the cache lines `PREFETCH_AHEAD` bytes past `span`, as many as `span` covers.
    /// Prefetches never fault, so the addresses may run past the matrix's end.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn prefetch_ahead(span: &[u8]) {
        let start = span.as_ptr().wrapping_add(PREFETCH_AHEAD);
        for off in (0..span.len()).step_by(CACHE_LINE) {
            _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(off).cast());
        }
    }

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
    pub fn dot_rows_k(
        dtype: GgmlType,
        rows: &[u8],
        row_bytes: usize,
        acts: &[Vec<KBlock>],
        out: &mut [f32],
    ) {
        dot_rows_k_on(avx512_available(), dtype, rows, row_bytes, acts, out)
    }

    /// [`dot_rows_k`] with prefill on the AVX-512 tile (`wide`, which this CPU must run) or on
    /// the AVX2 one.
    pub fn dot_rows_k_on(
        wide: bool,
        dtype: GgmlType,
        rows: &[u8],
        row_bytes: usize,
        acts: &[Vec<KBlock>],
        out: &mut [f32],
    ) {
        assert!(!wide || avx512_available(), "this CPU has no AVX-512 VNNI");
        // SAFETY: `available()` checked AVX2, FMA and F16C on this CPU before dispatching here.
        unsafe { dot_rows_k_avx2(wide, dtype, rows, row_bytes, acts, out) }
    }

    /// Row by row, the next row requested ahead of use. One token (decode) unpacks each block
    /// as it goes; several (prefill) unpack a row once and dot it with every token.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_rows_k_avx2(
        wide: bool,
        dtype: GgmlType,
        rows: &[u8],
        row_bytes: usize,
        acts: &[Vec<KBlock>],
        out: &mut [f32],
    ) {
        let n = acts.len();
        if n > 1 {
            let block_bytes = dtype.type_size();
            let blocks = row_bytes / block_bytes;
            let mut unpacked: Vec<KUnpacked> = Vec::with_capacity(K_TILE * blocks);
            // Tiles of rows: each activation group loaded once for all of them, and their
            // totals reduced together.
            let mut tiles = rows.chunks_exact(K_TILE * row_bytes);
            let mut tile_outs = out.chunks_exact_mut(K_TILE * n);
            for (tile, ys) in (&mut tiles).zip(&mut tile_outs) {
                unpacked.clear();
                unpacked.extend(
                    tile.chunks_exact(block_bytes)
                        .map(|block| unpack_k(dtype, block)),
                );
                let tile_rows: [&[KUnpacked]; K_TILE] =
                    std::array::from_fn(|r| &unpacked[r * blocks..(r + 1) * blocks]);
                // Each super-block's scales for the tile's rows, gathered once for every token.
                let scales: Vec<[__m128; 2]> = (0..blocks)
                    .map(|b| {
                        let r = |i: usize| &tile_rows[i][b];
                        [
                            _mm_setr_ps(r(0).d, r(1).d, r(2).d, r(3).d),
                            _mm_setr_ps(r(0).dmin, r(1).dmin, r(2).dmin, r(3).dmin),
                        ]
                    })
                    .collect();
                for (t, act) in acts.iter().enumerate() {
                    let y = if wide {
                        // SAFETY: the caller checked AVX-512 F, BW and VNNI on this CPU.
                        unsafe { avx512::dot_unpacked_k_tile(dtype, tile_rows, &scales, act) }
                    } else {
                        dot_unpacked_k_tile(dtype, tile_rows, &scales, act)
                    };
                    for (r, y) in y.into_iter().enumerate() {
                        ys[r * n + t] = y;
                    }
                }
            }
            for (row, ys) in tiles
                .remainder()
                .chunks_exact(row_bytes)
                .zip(tile_outs.into_remainder().chunks_exact_mut(n))
            {
                unpacked.clear();
                unpacked.extend(
                    row.chunks_exact(block_bytes)
                        .map(|block| unpack_k(dtype, block)),
                );
                for (y, act) in ys.iter_mut().zip(acts) {
                    *y = dot_unpacked_k(dtype, &unpacked, act);
                }
            }
            return;
        }
        for (row, ys) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
            prefetch_ahead(row);
            for (y, act) in ys.iter_mut().zip(acts) {
                *y = match dtype {
                    GgmlType::Q4K => dot_q4_k(row, act),
                    _ => dot_q6_k(row, act),
                };
            }
        }
    }

    /// A K super-block unpacked once for many tokens.
    #[derive(Clone, Copy)]
    struct KUnpacked {
        /// The quants of each 32-value group as unsigned bytes (0..15 or 0..63).
        q: [__m256i; 8],
        /// Each group's sub-block scales in 16-bit lanes, one per pair of products.
        sc: [__m256i; 8],
        /// Multipliers of the activations' 16 sums: `Q4_K`'s minimums (taken off with `dmin`),
        /// `Q6_K`'s offset, -32 × each sub-block scale.
        corr: __m256i,
        d: f32,
        dmin: f32,
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn unpack_k(dtype: GgmlType, block: &[u8]) -> KUnpacked {
        let low = _mm256_set1_epi8(0x0F);
        let zero = _mm256_setzero_si256();
        let mut u = KUnpacked {
            q: [zero; 8],
            sc: [zero; 8],
            corr: zero,
            d: 0.0,
            dmin: 0.0,
        };
        if dtype == GgmlType::Q4K {
            u.d = f16_at(block, 0);
            u.dmin = f16_at(block, 2);
            let (sc, m) = q4_k_scales(&block[4..16]);
            for j in 0..4 {
                let packed = bytes32(block, 16 + 32 * j);
                u.q[2 * j] = _mm256_and_si256(packed, low);
                u.q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
            }
            for (v, &s) in u.sc.iter_mut().zip(&sc) {
                *v = _mm256_set1_epi16(s as i16);
            }
            let mut mins = [0i16; 16];
            for (pair, &m) in mins.chunks_exact_mut(2).zip(&m) {
                pair.fill(m as i16);
            }
            // SAFETY: `mins` is 16 i16, 32 bytes.
            u.corr = unsafe { _mm256_loadu_si256(mins.as_ptr().cast()) };
            return u;
        }
        let high = _mm256_set1_epi8(0x30);
        u.d = f16_at(block, 208);
        let scales = &block[192..208];
        for half in 0..2 {
            let ql0 = bytes32(block, 64 * half);
            let ql1 = bytes32(block, 64 * half + 32);
            let qh = bytes32(block, 128 + 32 * half);
            u.q[4 * half] = _mm256_or_si256(
                _mm256_and_si256(ql0, low),
                _mm256_and_si256(_mm256_slli_epi16::<4>(qh), high),
            );
            u.q[4 * half + 1] = _mm256_or_si256(
                _mm256_and_si256(ql1, low),
                _mm256_and_si256(_mm256_slli_epi16::<2>(qh), high),
            );
            u.q[4 * half + 2] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low),
                _mm256_and_si256(qh, high),
            );
            u.q[4 * half + 3] = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low),
                _mm256_and_si256(_mm256_srli_epi16::<2>(qh), high),
            );
        }
        for (g, v) in u.sc.iter_mut().enumerate() {
            *v = _mm256_set_m128i(
                _mm_set1_epi16(scales[2 * g + 1] as i8 as i16),
                _mm_set1_epi16(scales[2 * g] as i8 as i16),
            );
        }
        let mut offsets = [0i16; 16];
        for (o, &s) in offsets.iter_mut().zip(scales) {
            *o = -32 * s as i8 as i16;
        }
        // SAFETY: `offsets` is 16 i16, 32 bytes.
        u.corr = unsafe { _mm256_loadu_si256(offsets.as_ptr().cast()) };
        u
    }

    /// The same integer totals, and so the same result, as [`dot_q4_k`] and [`dot_q6_k`]:
    /// `Q6_K`'s offset comes off through the activations' sums instead of pair by pair.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_unpacked_k(dtype: GgmlType, row: &[KUnpacked], act: &[KBlock]) -> f32 {
        let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
        for (u, a) in row.iter().zip(act) {
            let mut sumi = _mm256_setzero_si256();
            for ((q, sc), y) in u.q.iter().zip(&u.sc).zip(&a.qs) {
                let pairs = _mm256_maddubs_epi16(*q, group(y));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(pairs, *sc));
            }
            // SAFETY: `a.bsums` is 16 i16, 32 bytes.
            let bsums = unsafe { _mm256_loadu_si256(a.bsums.as_ptr().cast()) };
            let corr = hsum_i32(_mm256_madd_epi16(bsums, u.corr));
            if dtype == GgmlType::Q4K {
                acc = (hsum_i32(sumi) as f32).mul_add(u.d * a.d, acc);
                acc_min = (corr as f32).mul_add(u.dmin * a.d, acc_min);
            } else {
                acc = ((hsum_i32(sumi) + corr) as f32).mul_add(u.d * a.d, acc);
            }
        }
        acc - acc_min
    }

    /// Rows of a K-format prefill tile.
    const K_TILE: usize = 4;

    /// [`dot_unpacked_k`] for [`K_TILE`] rows at once: the same integer totals, reduced across
    /// lanes for the four rows together, and the same f32 operations per row, so the same bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_unpacked_k_tile(
        dtype: GgmlType,
        rows: [&[KUnpacked]; K_TILE],
        scales: &[[__m128; 2]],
        act: &[KBlock],
    ) -> [f32; K_TILE] {
        let mut acc = KTileAcc::new();
        for (b, a) in act.iter().enumerate() {
            let mut sumi = [_mm256_setzero_si256(); K_TILE];
            for (g, y) in a.qs.iter().enumerate() {
                let y = group(y);
                for (sumi, row) in sumi.iter_mut().zip(&rows) {
                    let u = &row[b];
                    let pairs = _mm256_maddubs_epi16(u.q[g], y);
                    *sumi = _mm256_add_epi32(*sumi, _mm256_madd_epi16(pairs, u.sc[g]));
                }
            }
            // SAFETY: `a.bsums` is 16 i16, 32 bytes.
            let bsums = unsafe { _mm256_loadu_si256(a.bsums.as_ptr().cast()) };
            let corr: [__m256i; K_TILE] =
                std::array::from_fn(|r| _mm256_madd_epi16(bsums, rows[r][b].corr));
            acc.add(dtype, scales[b], a.d, hsum4_i32(sumi), hsum4_i32(corr));
        }
        acc.finish()
    }

    /// A K-format tile's f32 accumulators: each super-block's four integer totals scaled by
    /// the rows' `d`, and `Q4_K`'s minimums apart, scaled by `dmin` and taken off at the end.
    struct KTileAcc {
        acc: __m128,
        acc_min: __m128,
    }

    impl KTileAcc {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn new() -> Self {
            Self {
                acc: _mm_setzero_ps(),
                acc_min: _mm_setzero_ps(),
            }
        }

        /// Adds one super-block: the rows' totals `sumi` and corrections `corr` (`Q4_K`'s
        /// minimums, or `Q6_K`'s offset, which joins the total), `[d, dmin]` of the rows and
        /// the activations' scale `ad`.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn add(
            &mut self,
            dtype: GgmlType,
            [d, dmin]: [__m128; 2],
            ad: f32,
            sumi: __m128i,
            corr: __m128i,
        ) {
            let ad = _mm_set1_ps(ad);
            if dtype == GgmlType::Q4K {
                self.acc = _mm_fmadd_ps(_mm_cvtepi32_ps(sumi), _mm_mul_ps(d, ad), self.acc);
                self.acc_min =
                    _mm_fmadd_ps(_mm_cvtepi32_ps(corr), _mm_mul_ps(dmin, ad), self.acc_min);
            } else {
                let total = _mm_cvtepi32_ps(_mm_add_epi32(sumi, corr));
                self.acc = _mm_fmadd_ps(total, _mm_mul_ps(d, ad), self.acc);
            }
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn finish(&self) -> [f32; K_TILE] {
            let mut out = [0.0f32; K_TILE];
            // SAFETY: `out` holds four f32.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), _mm_sub_ps(self.acc, self.acc_min)) };
            out
        }
    }

    /// The lane totals of four vectors, in one vector (exact: integer sums in any order).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum4_i32(v: [__m256i; 4]) -> __m128i {
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
    }

    /// The K-format prefill tile in 512-bit registers.
    mod avx512 {
        use super::*;

        /// The lane totals of four vectors, in one vector (exact: integer sums in any order).
        /// Interleaving pairs of vectors sums their lanes in place, so no horizontal adds.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        fn reduce4(v: [__m512i; 4]) -> __m128i {
            let pair =
                |a, b| _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
            let (ab, cd) = (pair(v[0], v[1]), pair(v[2], v[3]));
            // Each 128-bit lane now holds partial totals of the four vectors, in order.
            let x = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
            let y = _mm256_add_epi32(_mm512_castsi512_si256(x), _mm512_extracti64x4_epi64::<1>(x));
            _mm_add_epi32(_mm256_castsi256_si128(y), _mm256_extracti128_si256::<1>(y))
        }

        /// [`super::dot_unpacked_k_tile`] two groups at a time: the products pair up in
        /// `maddubs`, and one VNNI instruction multiplies the pairs by their sub-block scales
        /// and adds them in, for the same integer totals and so the same bits.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        pub(super) fn dot_unpacked_k_tile(
            dtype: GgmlType,
            rows: [&[KUnpacked]; K_TILE],
            scales: &[[__m128; 2]],
            act: &[KBlock],
        ) -> [f32; K_TILE] {
            let mut acc = KTileAcc::new();
            for (b, a) in act.iter().enumerate() {
                let mut sumi = [_mm512_setzero_si512(); K_TILE];
                for pair in 0..4 {
                    // SAFETY: `a.qs` holds eight groups of 32 bytes, contiguous.
                    let y = unsafe { _mm512_loadu_si512(a.qs[2 * pair].as_ptr().cast()) };
                    for (sumi, row) in sumi.iter_mut().zip(&rows) {
                        let u = &row[b];
                        // SAFETY: groups 2 pair and 2 pair + 1 are adjacent in each array.
                        let (q, sc) = unsafe {
                            (
                                _mm512_loadu_si512(u.q[2 * pair..].as_ptr().cast()),
                                _mm512_loadu_si512(u.sc[2 * pair..].as_ptr().cast()),
                            )
                        };
                        *sumi = _mm512_dpwssd_epi32(*sumi, _mm512_maddubs_epi16(q, y), sc);
                    }
                }
                // SAFETY: `a.bsums` is 16 i16, 32 bytes.
                let bsums = unsafe { _mm256_loadu_si256(a.bsums.as_ptr().cast()) };
                let corr: [__m256i; K_TILE] =
                    std::array::from_fn(|r| _mm256_madd_epi16(bsums, rows[r][b].corr));
                let (sumi, corr) = if dtype == GgmlType::Q4K {
                    (reduce4(sumi), hsum4_i32(corr))
                } else {
                    // The offset's correction joins the total before the lanes are summed.
                    let total: [__m512i; K_TILE] = std::array::from_fn(|r| {
                        _mm512_add_epi32(sumi[r], _mm512_zextsi256_si512(corr[r]))
                    });
                    (reduce4(total), _mm_setzero_si128())
                };
                acc.add(dtype, scales[b], a.d, sumi, corr);
            }
            acc.finish()
        }
    }

    /// One 32-value group of an activation block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn group(a: &[i8; 32]) -> __m256i {
        // SAFETY: `a` is 32 bytes.
        unsafe { _mm256_loadu_si256(a.as_ptr().cast()) }
    }

    /// 32 bytes of `block` from `at`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn bytes32(block: &[u8], at: usize) -> __m256i {
        let b = &block[at..at + 32];
        // SAFETY: `b` is 32 bytes.
        unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
    }

    /// The sum of eight i32 lanes (exact in any order).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum_i32(v: __m256i) -> i32 {
        let x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let x = _mm_add_epi32(x, _mm_unpackhi_epi64(x, x));
        let x = _mm_add_epi32(x, _mm_shuffle_epi32::<0b01>(x));
        _mm_cvtsi128_si32(x)
    }

    /// Each 32-byte load of quants holds two sub-blocks: low nibbles and high nibbles. Products
    /// of unsigned nibbles and signed activations pair up in `maddubs`; multiplying the pairs by
    /// the sub-block scale in `madd` leaves eight lanes of four products each.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q4_k(row: &[u8], act: &[KBlock]) -> f32 {
        let low = _mm256_set1_epi8(0x0F);
        // Shuffles that spread 16-bit lane `s` of the scales over a whole vector.
        let spread: [__m256i; 8] =
            std::array::from_fn(|s| _mm256_set1_epi16((((2 * s + 1) << 8) | (2 * s)) as i16));
        let (mut acc, mut acc_min) = (0.0f32, 0.0f32);
        for (block, a) in row.chunks_exact(Q4_K_SIZE).zip(act) {
            let d = f16_at(block, 0) * a.d;
            let dmin = f16_at(block, 2) * a.d;
            let (sc, m) = q4_k_scales(&block[4..16]);
            // SAFETY: `sc` and `m` are 8 bytes, `bsums` 16 i16 (32 bytes).
            let (scales, mins, bsums) = unsafe {
                (
                    _mm_cvtepu8_epi16(_mm_loadl_epi64(sc.as_ptr().cast())),
                    _mm_cvtepu8_epi16(_mm_loadl_epi64(m.as_ptr().cast())),
                    _mm256_loadu_si256(a.bsums.as_ptr().cast()),
                )
            };
            let scales = _mm256_broadcastsi128_si256(scales);
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let packed = bytes32(block, 16 + 32 * j);
                let lo = _mm256_and_si256(packed, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                let p_lo = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(lo, group(&a.qs[2 * j])),
                    _mm256_shuffle_epi8(scales, spread[2 * j]),
                );
                let p_hi = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(hi, group(&a.qs[2 * j + 1])),
                    _mm256_shuffle_epi8(scales, spread[2 * j + 1]),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_lo, p_hi));
            }
            // Each minimum times the sum of its sub-block's two 16-value activation sums.
            let pairs = _mm256_set_m128i(
                _mm_unpackhi_epi16(mins, mins),
                _mm_unpacklo_epi16(mins, mins),
            );
            let min_sums = _mm256_madd_epi16(bsums, pairs);
            // Both totals in one reduction: integers, so in any order.
            let t = _mm256_hadd_epi32(sumi, min_sums);
            let t = _mm256_hadd_epi32(t, t);
            let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
            acc = (_mm_cvtsi128_si32(t) as f32).mul_add(d, acc);
            acc_min = (_mm_extract_epi32::<1>(t) as f32).mul_add(dmin, acc_min);
        }
        acc - acc_min
    }

    /// Values are built unsigned (0..63) so `maddubs` applies; the offset of 32 comes off as
    /// 32 × the activations, pairwise, before the sub-block scales multiply in.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_q6_k(row: &[u8], act: &[KBlock]) -> f32 {
        let low = _mm256_set1_epi8(0x0F);
        let high = _mm256_set1_epi8(0x30);
        // Shuffles that spread 16-bit lane `2p` of a vector's low half over the low half, and
        // lane `2p + 1` over the high half: part `p`'s two 16-value scales.
        let spread: [__m256i; 4] = std::array::from_fn(|p| {
            let (a, b) = (4 * p as i8, 4 * p as i8 + 2);
            _mm256_setr_epi8(
                a,
                a + 1,
                a,
                a + 1,
                a,
                a + 1,
                a,
                a + 1,
                a,
                a + 1,
                a,
                a + 1,
                a,
                a + 1,
                a,
                a + 1,
                b,
                b + 1,
                b,
                b + 1,
                b,
                b + 1,
                b,
                b + 1,
                b,
                b + 1,
                b,
                b + 1,
                b,
                b + 1,
                b,
                b + 1,
            )
        });
        let mut acc = 0.0f32;
        for (block, a) in row.chunks_exact(Q6_K_SIZE).zip(act) {
            let d = f16_at(block, 208) * a.d;
            // SAFETY: the block's 16 scale bytes start at 192; `bsums` is 16 i16 (32 bytes).
            let (scales, bsums) = unsafe {
                (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(block.as_ptr().add(192).cast())),
                    _mm256_loadu_si256(a.bsums.as_ptr().cast()),
                )
            };
            let mut sumi = _mm256_setzero_si256();
            for half in 0..2 {
                let ql0 = bytes32(block, 64 * half);
                let ql1 = bytes32(block, 64 * half + 32);
                let qh = bytes32(block, 128 + 32 * half);
                // This half's eight scales in both 128-bit lanes.
                let half_scales = if half == 0 {
                    _mm256_permute2x128_si256::<0x00>(scales, scales)
                } else {
                    _mm256_permute2x128_si256::<0x11>(scales, scales)
                };
                let parts = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, low),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), high),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, low),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), high),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low),
                        _mm256_and_si256(qh, high),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), high),
                    ),
                ];
                for (part, q) in parts.into_iter().enumerate() {
                    let y = group(&a.qs[4 * half + part]);
                    let sc = _mm256_shuffle_epi8(half_scales, spread[part]);
                    sumi =
                        _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), sc));
                }
            }
            // The quants' offset of 32: each scale times its 16 activations' sum, taken off
            // once per block. Both totals in one reduction: integers, so in any order.
            let offsets = _mm256_madd_epi16(bsums, scales);
            let t = _mm256_hadd_epi32(sumi, offsets);
            let t = _mm256_hadd_epi32(t, t);
            let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
            let total = _mm_cvtsi128_si32(t) - 32 * _mm_extract_epi32::<1>(t);
            acc = (total as f32).mul_add(d, acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::qtensor_from_bytes;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    /// Random rows of `dtype` with sane f16 scales.
    fn random_matrix(
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        rng: &mut rand::rngs::StdRng,
    ) -> Vec<u8> {
        let mut bytes: Vec<u8> = (0..rows * cols / dtype.block_size() * dtype.type_size())
            .map(|_| rng.random())
            .collect();
        let mut f16_at = |block: &mut [u8], at: usize, range: std::ops::Range<f32>| {
            let v = f16::from_f32(rng.random_range(range));
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        };
        for block in bytes.chunks_exact_mut(dtype.type_size()) {
            match dtype {
                GgmlType::Q4K => {
                    f16_at(block, 0, 0.0005..0.002);
                    f16_at(block, 2, 0.0005..0.002);
                }
                // Signed 8-bit sub-block scales: a smaller super-block scale.
                GgmlType::Q6K => f16_at(block, 208, 0.00005..0.0002),
                _ => f16_at(block, 0, 0.001..0.02),
            }
            if dtype == GgmlType::Q4_1 {
                f16_at(block, 2, -0.1..0.0);
            }
        }
        bytes
    }

    /// The portable product of one row with one token's activations, quantized portably after
    /// checking that the dispatched quantization gives the same bits.
    fn portable_dot(dtype: GgmlType, row: &[u8], x: &[f32]) -> f32 {
        if is_k(dtype) {
            let (mut q, mut portable) = (Vec::new(), Vec::new());
            quantize_row_k(x, &mut q);
            quantize_row_k_portable(x, &mut portable);
            for (a, b) in q.iter().zip(&portable) {
                assert_eq!(
                    (a.d.to_bits(), a.qs, a.bsums),
                    (b.d.to_bits(), b.qs, b.bsums)
                );
            }
            return match dtype {
                GgmlType::Q4K => dot_q4_k(row, &portable),
                _ => dot_q6_k(row, &portable),
            };
        }
        let (mut q, mut portable) = (Vec::new(), Vec::new());
        quantize_row(x, &mut q);
        quantize_row_portable(x, &mut portable);
        for (a, b) in q.iter().zip(&portable) {
            assert_eq!(
                (a.d.to_bits(), a.s.to_bits(), a.qs),
                (b.d.to_bits(), b.s.to_bits(), b.qs)
            );
        }
        match dtype {
            GgmlType::Q4_0 => dot_q4_0(row, &portable),
            GgmlType::Q4_1 => dot_q4_1(row, &portable),
            GgmlType::Q5_0 => dot_q5_0(row, &portable),
            _ => dot_q8_0(row, &portable),
        }
    }

    #[test]
    fn dispatched_quantization_matches_the_portable_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // Blocks of many magnitudes, ties at .5 steps, an all-zero block and a lone value.
        let mut x: Vec<f32> = (0..64 * QK)
            .map(|i| rng.random_range(-1.0f32..1.0) * 10f32.powi((i / QK) as i32 % 7 - 3))
            .collect();
        x[..QK]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32 - 15.5);
        x[QK..2 * QK].fill(0.0);
        x[2 * QK..3 * QK].fill(0.0);
        x[2 * QK + 5] = -3.0;
        let (mut q, mut portable) = (Vec::new(), Vec::new());
        quantize_row(&x, &mut q);
        quantize_row_portable(&x, &mut portable);
        assert_eq!(q.len(), portable.len());
        for (a, b) in q.iter().zip(&portable) {
            assert_eq!(
                (a.d.to_bits(), a.s.to_bits(), a.qs),
                (b.d.to_bits(), b.s.to_bits(), b.qs)
            );
        }
        // Q8_K too, with a tie for the largest magnitude (the first one counts) in a block.
        x[3 * QK_K + 17] = 50.0;
        x[3 * QK_K + 200] = -50.0;
        x[5 * QK_K..6 * QK_K].fill(0.0);
        let (mut q, mut portable) = (Vec::new(), Vec::new());
        quantize_row_k(&x, &mut q);
        quantize_row_k_portable(&x, &mut portable);
        assert_eq!(q.len(), portable.len());
        for (a, b) in q.iter().zip(&portable) {
            assert_eq!(
                (a.d.to_bits(), a.qs, a.bsums),
                (b.d.to_bits(), b.qs, b.bsums)
            );
        }
    }

    #[test]
    fn q8_k_quantization_maps_the_largest_magnitude_to_minus_127() {
        let mut x: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 100.0) / 50.0).collect();
        x[7] = -4.0;
        let mut q = Vec::new();
        quantize_row_k_portable(&x, &mut q);
        let q = &q[0];
        // The largest magnitude is negative: the scale is positive and it maps to -127.
        assert_eq!(q.qs[0][7], -127);
        assert_eq!(q.d, 1.0 / (-127.0 / -4.0));
        let flat = q.qs.as_flattened();
        for (i, &v) in x.iter().enumerate() {
            assert!((flat[i] as f32 * q.d - v).abs() <= q.d / 2.0 + 1e-6, "{i}");
        }
        for (j, &sum) in q.bsums.iter().enumerate() {
            let want: i16 = flat[16 * j..16 * j + 16].iter().map(|&v| v as i16).sum();
            assert_eq!(sum, want);
        }
        let mut zeros = Vec::new();
        quantize_row_k_portable(&[0.0; QK_K], &mut zeros);
        assert_eq!((zeros[0].d, zeros[0].bsums), (0.0, [0; 16]));
    }

    /// Checks `got` (`[n, rows]`) against the product of the dequantized weights and the exact
    /// activations `x` (`[n, cols]`), within what quantizing the activations can explain.
    fn assert_near_dequantized(
        dtype: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        x: &[f32],
        got: &[f32],
    ) {
        let act_block = if is_k(dtype) { QK_K } else { QK };
        let w = qtensor_from_bytes(dtype, bytes, &[cols as u64, rows as u64], &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (t, xs) in x.chunks_exact(cols).enumerate() {
            for (r, w) in w.iter().enumerate() {
                let exact: f32 = w.iter().zip(xs).map(|(w, x)| w * x).sum();
                let g = got[t * rows + r];
                // Each activation is off by at most half a quantization step, amax/254 of its
                // block; the product can be off by that much times each |weight|.
                let bound: f32 = (0..cols)
                    .map(|c| {
                        let block = &xs[c / act_block * act_block..][..act_block];
                        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        w[c].abs() * amax / 254.0
                    })
                    .sum();
                let tolerance = 1.01 * bound + 1e-3;
                assert!(
                    (g - exact).abs() < tolerance,
                    "{dtype:?} [{t}][{r}]: {g} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn a_repacked_copy_reports_what_it_has_read_in_order_up_to_the_end() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Enough groups that the copy reports progress before its end.
        let (rows, cols) = (8 * 64, 4096);
        let bytes = random_matrix(GgmlType::Q8_0, rows, cols, &mut rng);
        let mut reports = Vec::new();
        let m = QMatrix::new_releasing(GgmlType::Q8_0, rows, cols, &bytes, |n| reports.push(n))
            .unwrap();
        assert!(reports.len() > 2, "{reports:?}");
        assert!(reports.windows(2).all(|w| w[0] < w[1]), "{reports:?}");
        assert_eq!(reports.last(), Some(&bytes.len()));
        // The copy computes what the file layout does.
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (mut got, mut want) = (vec![0.0; rows], vec![0.0; rows]);
        m.matmul(&x, 1, &mut got);
        QMatrix::file_layout_for_test(GgmlType::Q8_0, rows, cols, &bytes).matmul(&x, 1, &mut want);
        assert_eq!(got, want);
    }

    #[test]
    fn interleaved_kernels_match_the_dequantized_product_and_the_portable_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (rows, cols) = (24, 256);
        // Several tokens in one pass over a group, and more than one pass (17, 33).
        for (dtype, n) in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
        ]
        .into_iter()
        .flat_map(|d| [(d, 2), (d, 3), (d, 17), (d, 33)])
        {
            assert!(repacks(dtype, rows) && !repacks(dtype, rows + 1));
            let bytes = random_matrix(dtype, rows, cols, &mut rng);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let m = QMatrix::new(dtype, rows, cols, &bytes).unwrap();
            assert!(matches!(m.data, Storage::Interleaved(_)));
            let mut prefill = vec![0.0; n * rows];
            m.matmul(&x, n, &mut prefill);

            assert_near_dequantized(dtype, &bytes, rows, cols, &x, &prefill);
            // Formats that accumulate by lanes compute the file-layout kernels' very bits.
            if interleaved::by_lanes(dtype) {
                let file_layout = QMatrix::file_layout_for_test(dtype, rows, cols, &bytes);
                let mut reference = vec![0.0; n * rows];
                file_layout.matmul(&x, n, &mut reference);
                for (i, (&g, &r)) in prefill.iter().zip(&reference).enumerate() {
                    assert_eq!(g.to_bits(), r.to_bits(), "{dtype:?} [{i}]: {g} vs {r}");
                }
            }

            // Decode gives each token the same bits as prefill, and so does the portable code.
            let mut acts = m.quantize(&x, QK, quantize_row_portable);
            interleaved::prepare(dtype, &mut acts);
            let Storage::Interleaved(packed) = &m.data else {
                unreachable!()
            };
            let group_bytes = interleaved::ROWS * m.row_bytes;
            for (t, xs) in x.chunks_exact(cols).enumerate() {
                let mut decode = vec![0.0; rows];
                m.matmul(xs, 1, &mut decode);
                for (r, &d) in decode.iter().enumerate() {
                    assert_eq!(
                        d.to_bits(),
                        prefill[t * rows + r].to_bits(),
                        "{dtype:?} [{t}][{r}]"
                    );
                }
            }
            for (g, group) in packed.chunks_exact(group_bytes).enumerate() {
                let mut portable = vec![0.0; n * interleaved::ROWS];
                interleaved::group_matmul_portable(dtype, group, &acts, &mut portable);
                for t in 0..n {
                    for i in 0..interleaved::ROWS {
                        let (p, got) = (
                            portable[t * interleaved::ROWS + i],
                            prefill[t * rows + g * interleaved::ROWS + i],
                        );
                        assert_eq!(p.to_bits(), got.to_bits(), "{dtype:?} [{t}][{}]", g * 8 + i);
                    }
                }
                /// One path's products of one group with the tokens' activations.
                type GroupRun<'a> = dyn Fn(&[Vec<ActBlock>], &mut [f32]) + 'a;
                // Every SIMD path this CPU runs, not only the fastest, for prefill and decode.
                let check = |path: &dyn std::fmt::Debug, run: &GroupRun| {
                    let mut got = vec![0.0; n * interleaved::ROWS];
                    run(&acts, &mut got);
                    for (t, act) in acts.iter().enumerate() {
                        let mut one = vec![0.0; interleaved::ROWS];
                        run(std::slice::from_ref(act), &mut one);
                        for i in 0..interleaved::ROWS {
                            let p = portable[t * interleaved::ROWS + i].to_bits();
                            let at = (g * 8 + i, t);
                            assert_eq!(
                                got[t * interleaved::ROWS + i].to_bits(),
                                p,
                                "{path:?} {dtype:?} {at:?}"
                            );
                            assert_eq!(one[i].to_bits(), p, "{path:?} {dtype:?} decode {at:?}");
                        }
                    }
                };
                #[cfg(target_arch = "x86_64")]
                for path in [
                    interleaved::simd::Path::Avx512,
                    interleaved::simd::Path::Avx2,
                ] {
                    if path.available() {
                        check(&path, &|acts, out| {
                            interleaved::simd::group_matmul(path, dtype, group, acts, out)
                        });
                    }
                }
                #[cfg(target_arch = "aarch64")]
                for path in [
                    interleaved::neon::Path::Dotprod,
                    interleaved::neon::Path::Neon,
                ] {
                    if path.available() {
                        check(&path, &|acts, out| {
                            interleaved::neon::group_matmul(path, dtype, group, acts, out)
                        });
                    }
                }
            }
        }
    }

    /// Under an emulated CPU, `deploy/test-arm.sh` names the NEON paths it must offer
    /// (`REALM_EXPECT_NEON_PATHS`, e.g. `dotprod,neon`): a path the bit-for-bit tests skip
    /// because the CPU lacks it would otherwise pass unseen.
    #[test]
    #[cfg(target_arch = "aarch64")]
    fn the_emulated_cpu_runs_the_expected_neon_paths() {
        let Ok(expected) = std::env::var("REALM_EXPECT_NEON_PATHS") else {
            return;
        };
        let expected: Vec<&str> = expected.split(',').map(str::trim).collect();
        for (path, name) in [(neon::Path::Dotprod, "dotprod"), (neon::Path::Neon, "neon")] {
            assert_eq!(
                path.available(),
                expected.contains(&name),
                "{name}: expected paths {expected:?}"
            );
        }
        let best = if expected.contains(&"dotprod") {
            Some(neon::Path::Dotprod)
        } else if expected.contains(&"neon") {
            Some(neon::Path::Neon)
        } else {
            None
        };
        assert_eq!(neon::Path::best(), best, "the path products take");
    }

    #[test]
    fn the_wide_layout_computes_the_portable_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let (rows, cols) = (32, 256);
        for (dtype, n) in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0]
            .into_iter()
            .flat_map(|d| [(d, 1), (d, 2), (d, 3), (d, 17), (d, 33)])
        {
            let bytes = random_matrix(dtype, rows, cols, &mut rng);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let m = QMatrix::new(dtype, rows, cols, &bytes).unwrap();
            if !wide::used(dtype, rows) {
                // Without AVX-512 VNNI the eight-row layout serves, as every other test checks.
                assert!(matches!(m.data, Storage::Interleaved(_)));
                continue;
            }
            assert!(matches!(m.data, Storage::Wide(_)));
            assert!(
                !wide::used(dtype, rows + 8),
                "whole groups of sixteen rows only"
            );
            let mut got = vec![0.0; n * rows];
            m.matmul(&x, n, &mut got);
            assert_near_dequantized(dtype, &bytes, rows, cols, &x, &got);

            // The portable code over the eight-row layout defines the bits.
            let mut packed = vec![0u8; bytes.len()];
            interleaved::repack(dtype, rows, m.row_bytes, &bytes, &mut packed, |_| {});
            let mut acts = m.quantize(&x, QK, quantize_row_portable);
            interleaved::prepare(dtype, &mut acts);
            let group_bytes = interleaved::ROWS * m.row_bytes;
            for (g, group) in packed.chunks_exact(group_bytes).enumerate() {
                let mut want = vec![0.0; n * interleaved::ROWS];
                interleaved::group_matmul_portable(dtype, group, &acts, &mut want);
                for t in 0..n {
                    for i in 0..interleaved::ROWS {
                        let (w, r) = (
                            want[t * interleaved::ROWS + i],
                            got[t * rows + g * interleaved::ROWS + i],
                        );
                        assert_eq!(
                            w.to_bits(),
                            r.to_bits(),
                            "{dtype:?} x {n} [{t}][{}]",
                            g * 8 + i
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_dequantized_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // An odd row count reaches the decode path's leftover row; n = 1 is decode, 3 prefill.
        let (rows, cols) = (7, 256);
        for (dtype, n) in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4K,
            GgmlType::Q6K,
        ]
        .into_iter()
        .flat_map(|d| [(d, 1), (d, 3)])
        {
            // Two super-blocks per row for the K formats.
            let cols = if is_k(dtype) { 2 * cols } else { cols };
            let bytes = random_matrix(dtype, rows, cols, &mut rng);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let m = QMatrix::new(dtype, rows, cols, &bytes).unwrap();
            let mut got = vec![0.0; n * rows];
            m.matmul(&x, n, &mut got);

            assert_near_dequantized(dtype, &bytes, rows, cols, &x, &got);
            // Both K prefill tiles this CPU runs, not only the fastest.
            #[cfg(target_arch = "x86_64")]
            if is_k(dtype) && simd::available() {
                let acts = m.quantize(&x, QK_K, quantize_row_k);
                for wide in [false, true]
                    .into_iter()
                    .filter(|&w| !w || avx512_available())
                {
                    let mut results = vec![0.0; n * rows];
                    simd::dot_rows_k_on(wide, dtype, &bytes, m.row_bytes, &acts, &mut results);
                    for (i, y) in results.iter().enumerate() {
                        let (r, t) = (i / n, i % n);
                        assert_eq!(y.to_bits(), got[t * rows + r].to_bits(), "{dtype:?} {wide}");
                    }
                }
            }
            // Every NEON path this CPU runs, not only the fastest.
            #[cfg(target_arch = "aarch64")]
            for path in [neon::Path::Dotprod, neon::Path::Neon] {
                if !path.available() {
                    continue;
                }
                let mut results = vec![0.0; n * rows];
                if is_k(dtype) {
                    let acts = m.quantize(&x, QK_K, quantize_row_k);
                    neon::dot_rows_k(path, dtype, &bytes, m.row_bytes, &acts, &mut results);
                } else {
                    let acts = m.quantize(&x, QK, quantize_row);
                    neon::dot_rows(path, dtype, &bytes, m.row_bytes, &acts, &mut results);
                }
                for (i, y) in results.iter().enumerate() {
                    let (r, t) = (i / n, i % n);
                    assert_eq!(
                        y.to_bits(),
                        got[t * rows + r].to_bits(),
                        "{path:?} {dtype:?}"
                    );
                }
            }
            for t in 0..n {
                let xs = &x[t * cols..(t + 1) * cols];
                for r in 0..rows {
                    let g = got[t * rows + r];
                    // The portable code computes the very same numbers as the SIMD path.
                    let row = &bytes[r * m.row_bytes..(r + 1) * m.row_bytes];
                    let portable = portable_dot(dtype, row, xs);
                    assert_eq!(portable.to_bits(), g.to_bits(), "{dtype:?} [{t}][{r}]");
                }
            }
        }
    }
}
