//! Quantized matrix × activation products computed by Realm itself.
//!
//! Activations are quantized to 8 bits per 32-value block (`Q8_0`, or `Q8_1` which also carries
//! the block's scaled sum), then each weight row is dotted with them in integers and scaled
//! once per block. The rounding of activations (ties to even), the per-block scale products and
//! the eight-lane accumulation order follow the de-facto reference numerics of GGUF engines, so
//! greedy decoding agrees with them token for token even where two candidates nearly tie.
//!
//! Formats without a kernel here fall back to candle's (see `model::Linear`).

use half::f16;
use rayon::prelude::*;

use crate::gguf::TensorData;
use crate::quant::GgmlType;

const QK: usize = 32;
/// Accumulator lanes: each lane sums four adjacent products of a 32-value block.
const LANES: usize = 8;

/// Weight formats with a kernel here.
pub fn supported(dtype: GgmlType) -> bool {
    matches!(dtype, GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0)
}

/// One activation block: 32 signed 8-bit values, their scale, and (`Q8_1`) scale × sum.
#[derive(Debug, Clone, Copy, Default)]
struct ActBlock {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

/// Quantizes one activation row (`len % 32 == 0`) into `out`.
fn quantize_row(x: &[f32], out: &mut Vec<ActBlock>) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        return simd::quantize_row(x, out);
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
            qs,
        });
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

/// A quantized weight matrix `[rows, cols]` (row-major, ggml block layout).
#[derive(Debug, Clone)]
pub struct QMatrix {
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Storage,
}

/// Where a matrix's bytes live: a copy of its own, or the mapped model file itself.
#[derive(Debug, Clone)]
enum Storage {
    Owned(Vec<u8>),
    Mapped(TensorData),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Mapped(t) => t.bytes(),
        }
    }
}

impl QMatrix {
    /// `bytes` hold `rows` rows of `cols` values of `dtype`; callers check `supported(dtype)`
    /// and the sizes (the GGUF reader already has).
    pub fn new(dtype: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Option<Self> {
        Self::with_storage(dtype, rows, cols, Storage::Owned(bytes.to_vec()))
    }

    /// A matrix computed straight from the mapped model file: no copy is made, and the
    /// process's resident memory holds the weights only while their pages are mapped in.
    pub fn mapped(dtype: GgmlType, rows: usize, cols: usize, data: TensorData) -> Option<Self> {
        Self::with_storage(dtype, rows, cols, Storage::Mapped(data))
    }

    fn with_storage(dtype: GgmlType, rows: usize, cols: usize, data: Storage) -> Option<Self> {
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let ok = supported(dtype) && cols % QK == 0 && data.bytes().len() == rows * row_bytes;
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
        let acts: Vec<Vec<ActBlock>> = x
            .chunks_exact(self.cols)
            .map(|row| {
                let mut q = Vec::with_capacity(self.cols / QK);
                quantize_row(row, &mut q);
                q
            })
            .collect();
        // Parallel over weight rows: each task reads a slice of the matrix once for all tokens.
        const ROWS_PER_TASK: usize = 64;
        let mut transposed = vec![0.0f32; n * self.rows];
        transposed
            .par_chunks_mut(ROWS_PER_TASK * n)
            .enumerate()
            .for_each(|(task, chunk)| {
                let first = task * ROWS_PER_TASK;
                let rows = &self.data.bytes()
                    [first * self.row_bytes..(first + chunk.len() / n) * self.row_bytes];
                dot_rows(self.dtype, rows, self.row_bytes, &acts, chunk);
            });
        for r in 0..self.rows {
            for t in 0..n {
                out[t * self.rows + r] = transposed[r * n + t];
            }
        }
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
    let n = acts.len();
    for (row, ys) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        for (y, act) in ys.iter_mut().zip(acts) {
            *y = match dtype {
                GgmlType::Q4_1 => dot_q4_1(row, act),
                GgmlType::Q5_0 => dot_q5_0(row, act),
                _ => dot_q8_0(row, act),
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

    use super::{hsum, ActBlock, LANES};
    use crate::quant::GgmlType;

    pub fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
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

    /// The portable loop compiled for AVX2, where rounding to even is one instruction and the
    /// block loops vectorize; the results are the same bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn quantize_row_avx2(x: &[f32], out: &mut Vec<ActBlock>) {
        super::quantize_row_portable(x, out)
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

    /// The bytes right after `pair` within `rows`, as long as `pair` (empty at the end).
    #[inline]
    fn rows_after<'a>(rows: &'a [u8], pair: &[u8]) -> Option<&'a [u8]> {
        let start = pair.as_ptr() as usize - rows.as_ptr() as usize + pair.len();
        rows.get(start..start + pair.len())
    }

    /// Decode: two rows at a time, so two independent accumulation chains hide each other's
    /// latency and every activation block is loaded once for both. Each row keeps its own
    /// accumulator, so results are the same as one row at a time.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_one_token<const BLOCK: usize>(
        dtype: GgmlType,
        rows: &[u8],
        row_bytes: usize,
        act: &[ActBlock],
        out: &mut [f32],
        k: &Consts,
    ) {
        let mut pairs = rows.chunks_exact(2 * row_bytes);
        let mut ys = out.chunks_exact_mut(2);
        for (pair, y) in (&mut pairs).zip(&mut ys) {
            let (r0, r1) = pair.split_at(row_bytes);
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let (mut summs0, mut summs1) = (0.0f32, 0.0f32);
            // The next pair of rows follows these in memory: ask for it ahead of use.
            if let Some(next) = rows_after(rows, pair) {
                for line in next.chunks(CACHE_LINE) {
                    _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
                }
            }
            for ((b0, b1), a) in r0.chunks_exact(BLOCK).zip(r1.chunks_exact(BLOCK)).zip(act) {
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
                GgmlType::Q4_1 => rows_one_token::<20>(dtype, rows, row_bytes, act, out, &k),
                GgmlType::Q5_0 => rows_one_token::<22>(dtype, rows, row_bytes, act, out, &k),
                _ => rows_one_token::<34>(dtype, rows, row_bytes, act, out, &k),
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
        for block in bytes.chunks_exact_mut(dtype.type_size()) {
            let d = f16::from_f32(rng.random_range(0.001..0.02));
            block[..2].copy_from_slice(&d.to_le_bytes());
            if dtype == GgmlType::Q4_1 {
                let m = f16::from_f32(rng.random_range(-0.1..0.0));
                block[2..4].copy_from_slice(&m.to_le_bytes());
            }
        }
        bytes
    }

    #[test]
    fn every_kernel_matches_the_dequantized_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // An odd row count reaches the decode path's leftover row; n = 1 is decode, 3 prefill.
        let (rows, cols) = (7, 256);
        for (dtype, n) in [GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0]
            .into_iter()
            .flat_map(|d| [(d, 1), (d, 3)])
        {
            let bytes = random_matrix(dtype, rows, cols, &mut rng);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let m = QMatrix::new(dtype, rows, cols, &bytes).unwrap();
            let mut got = vec![0.0; n * rows];
            m.matmul(&x, n, &mut got);

            let w = qtensor_from_bytes(dtype, &bytes, &[cols as u64, rows as u64], &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut acts = Vec::new();
            for t in 0..n {
                let (mut q, mut portable) = (Vec::new(), Vec::new());
                quantize_row(&x[t * cols..(t + 1) * cols], &mut q);
                quantize_row_portable(&x[t * cols..(t + 1) * cols], &mut portable);
                for (a, b) in q.iter().zip(&portable) {
                    assert_eq!(
                        (a.d.to_bits(), a.s.to_bits(), a.qs),
                        (b.d.to_bits(), b.s.to_bits(), b.qs)
                    );
                }
                acts.push(q);
            }
            for t in 0..n {
                for r in 0..rows {
                    let exact: f32 = (0..cols).map(|c| w[r][c] * x[t * cols + c]).sum();
                    let g = got[t * rows + r];
                    // Each activation is off by at most half a quantization step, amax/254 of
                    // its block; the product can be off by that much times each |weight|.
                    let xs = &x[t * cols..(t + 1) * cols];
                    let bound: f32 = (0..cols)
                        .map(|c| {
                            let block = &xs[c / QK * QK..(c / QK + 1) * QK];
                            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                            w[r][c].abs() * amax / 254.0
                        })
                        .sum();
                    let tolerance = 1.01 * bound + 1e-3;
                    assert!(
                        (g - exact).abs() < tolerance,
                        "{dtype:?} [{t}][{r}]: {g} vs {exact}"
                    );
                    // The portable code computes the very same numbers as the SIMD path.
                    let row = &bytes[r * m.row_bytes..(r + 1) * m.row_bytes];
                    let portable = match dtype {
                        GgmlType::Q4_1 => dot_q4_1(row, &acts[t]),
                        GgmlType::Q5_0 => dot_q5_0(row, &acts[t]),
                        _ => dot_q8_0(row, &acts[t]),
                    };
                    assert_eq!(portable.to_bits(), g.to_bits(), "{dtype:?} [{t}][{r}]");
                }
            }
        }
    }
}
