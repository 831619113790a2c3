//! The 32-value formats with 4-bit quants (`Q4_0`, `Q4_1`, `Q5_0`) repacked at load time into
//! groups of eight rows, so that one register holds four quants of each of eight rows and one
//! activation broadcast multiplies all eight at once.
//!
//! In the file, each row's blocks follow each other, and a dot product pays its unpacking, its
//! int-to-float conversion and its scale once per row and block. Interleaved, the eight rows'
//! integer dot products of one block land in the eight lanes of one register: the conversion,
//! the scales and the accumulation cost one instruction for eight rows, and the unpacked quants
//! are reused by every token of a prefill.
//!
//! A group-block (eight rows × one 32-value block) holds, in order:
//! - the eight rows' f16 scales `d` (16 bytes);
//! - `Q4_1`: their f16 minimums `m` (16 bytes);
//!   `Q5_0`: eight 32-bit words of fifth bits (32 bytes), word `v` bit `8t + i` being the fifth
//!   bit of row `i`'s value `4v + t`, so that a broadcast, an `and` and a compare spread a
//!   word over the bytes it belongs to;
//! - the nibbles (128 bytes): four 32-byte vectors, vector `c` holding at bytes `4i..4i + 4`
//!   row `i`'s nibble bytes `4c..4c + 4`. Their low nibbles are values `4c..4c + 4`, their high
//!   nibbles values `16 + 4c..16 + 4c + 4`, as in the file's blocks.
//!
//! Each group-block has exactly the bytes of its eight blocks, so memory budgets are unchanged.
//! Products are exact integers (`Q4_0` and `Q5_0` take their offsets of 8 and 16 off in
//! integers), scaled by `d_w · d_a` with one fused multiply-add per row into f32; `Q4_1`'s
//! minimums are summed apart and added at the end. How the integers are grouped before scaling
//! depends on the format:
//! - `Q4_0`, `Q4_1`: one integer per block and row, one accumulator per row, as in the
//!   reference engine's portable code. SmolLM2's greedy output is still the reference's.
//! - `Q5_0`: one integer per four values (eight lanes per row), summed at the end in the
//!   file-layout kernels' order, whose bits these are. This is the reference engine's AVX2
//!   order; gemma3's perplexity on the reference text, at 252 scored tokens, moves by 0.8% with
//!   the accumulation order (7.33 with lanes, 7.38 with one integer per block; 7.29 measured).

use super::{hsum, ActBlock, LANES, QK};
use crate::quant::GgmlType;

/// Rows in one group.
pub const ROWS: usize = 8;
/// Bytes of a group's nibbles for one block.
const NIBBLES: usize = ROWS * QK / 2;

/// Whether a `[rows, cols]` matrix of `dtype` is repacked: one of the formats above, whole groups.
pub fn repacks(dtype: GgmlType, rows: usize) -> bool {
    matches!(dtype, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0) && rows % ROWS == 0
}

/// Where a group-block's nibbles start.
const fn nibbles_at(dtype: GgmlType) -> usize {
    match dtype {
        GgmlType::Q4_1 => 32,
        GgmlType::Q5_0 => 48,
        _ => 16,
    }
}

/// Bytes of one group-block of `dtype`.
pub fn group_block_bytes(dtype: GgmlType) -> usize {
    ROWS * dtype.type_size()
}

/// Repacks `bytes` (`rows` rows in the file's layout, `row_bytes` each) into groups of
/// [`ROWS`] rows. `repacks(dtype, rows)` must hold.
pub fn repack(dtype: GgmlType, rows: usize, row_bytes: usize, bytes: &[u8]) -> Vec<u8> {
    let block = dtype.type_size();
    let blocks = row_bytes / block;
    let gb = group_block_bytes(dtype);
    debug_assert_eq!(bytes.len(), rows * row_bytes);
    // Where each format keeps its 16 nibble bytes.
    let qs_at = match dtype {
        GgmlType::Q4_1 => 4,
        GgmlType::Q5_0 => 6,
        _ => 2,
    };
    let mut out = vec![0u8; bytes.len()];
    for (g, group) in bytes.chunks_exact(ROWS * row_bytes).enumerate() {
        for b in 0..blocks {
            let dst = &mut out[(g * blocks + b) * gb..][..gb];
            let src = |i: usize| &group[i * row_bytes + b * block..][..block];
            for i in 0..ROWS {
                dst[2 * i..2 * i + 2].copy_from_slice(&src(i)[..2]);
                if dtype == GgmlType::Q4_1 {
                    dst[16 + 2 * i..16 + 2 * i + 2].copy_from_slice(&src(i)[2..4]);
                }
                for c in 0..4 {
                    let to = nibbles_at(dtype) + 32 * c + 4 * i;
                    dst[to..to + 4].copy_from_slice(&src(i)[qs_at + 4 * c..qs_at + 4 * c + 4]);
                }
            }
            if dtype == GgmlType::Q5_0 {
                let qh: [u32; ROWS] = std::array::from_fn(|i| {
                    u32::from_le_bytes(src(i)[2..6].try_into().expect("4 bytes"))
                });
                for v in 0..8 {
                    let mut word = 0u32;
                    for t in 0..4 {
                        for (i, qh) in qh.iter().enumerate() {
                            word |= ((qh >> (4 * v + t)) & 1) << (8 * t + i);
                        }
                    }
                    dst[16 + 4 * v..16 + 4 * v + 4].copy_from_slice(&word.to_le_bytes());
                }
            }
        }
    }
    out
}

/// The value offset of `dtype`'s quants: stored unsigned, they stand for `q - offset`.
const fn offset(dtype: GgmlType) -> i32 {
    match dtype {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        _ => 0,
    }
}

/// Lane `l`'s integer products of one group-block's unsigned quants with one activation block,
/// per row: lane `l` covers values `4l..4l + 4`, as in the file-layout kernels.
#[inline(always)]
fn lane_dots(dtype: GgmlType, gb: &[u8], a: &ActBlock, l: usize) -> [i32; ROWS] {
    let nibbles = &gb[nibbles_at(dtype)..][..NIBBLES];
    let (c, high) = (l % 4, l >= 4);
    let word = u32::from_le_bytes(gb[16 + 4 * l..16 + 4 * l + 4].try_into().expect("4 bytes"));
    std::array::from_fn(|i| {
        let mut dot = 0i32;
        for t in 0..4 {
            let byte = nibbles[32 * c + 4 * i + t];
            let mut q = if high { byte >> 4 } else { byte & 0x0F } as i32;
            if dtype == GgmlType::Q5_0 {
                q |= (((word >> (8 * t + i)) & 1) << 4) as i32;
            }
            dot += q * a.qs[4 * l + t] as i32;
        }
        dot
    })
}

fn f16s(bytes: &[u8]) -> [f32; ROWS] {
    std::array::from_fn(|i| super::f16_at(bytes, 2 * i))
}

/// One group's products with every token: `out[t * ROWS + i]` for row `i` of the group. The
/// results are the file-layout kernels' bits.
pub fn group_matmul(dtype: GgmlType, group: &[u8], acts: &[Vec<ActBlock>], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::available() {
        return simd::group_matmul(dtype, group, acts, out);
    }
    group_matmul_portable(dtype, group, acts, out)
}

/// Fills in what `dtype`'s kernels need of the activation blocks beyond their quantization:
/// the lane offsets of the formats that accumulate by lanes.
pub fn prepare(dtype: GgmlType, acts: &mut [Vec<ActBlock>]) {
    if by_lanes(dtype) {
        for a in acts.iter_mut().flatten() {
            a.lane_offsets = std::array::from_fn(|l| {
                offset(dtype)
                    * a.qs[4 * l..4 * l + 4]
                        .iter()
                        .map(|&q| q as i32)
                        .sum::<i32>()
            });
        }
    }
}

/// Whether `dtype` accumulates eight lanes per row rather than one integer per block (only
/// `Q5_0`, whose lane offsets the activation blocks carry).
pub const fn by_lanes(dtype: GgmlType) -> bool {
    matches!(dtype, GgmlType::Q5_0)
}

/// The portable [`group_matmul`]: the same operations in the same order, one row at a time.
pub fn group_matmul_portable(
    dtype: GgmlType,
    group: &[u8],
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    let gb_bytes = group_block_bytes(dtype);
    for (act, ys) in acts.iter().zip(out.chunks_exact_mut(ROWS)) {
        let mut acc = [[0.0f32; LANES]; ROWS];
        let mut summs = [0.0f32; ROWS];
        for (gb, a) in group.chunks_exact(gb_bytes).zip(act) {
            let d = f16s(&gb[..16]);
            let lanes: [[i32; ROWS]; LANES] = std::array::from_fn(|l| lane_dots(dtype, gb, a, l));
            for i in 0..ROWS {
                let dd = d[i] * a.d;
                if by_lanes(dtype) {
                    for l in 0..LANES {
                        let dot = lanes[l][i] - a.lane_offsets[l];
                        acc[i][l] = dd.mul_add(dot as f32, acc[i][l]);
                    }
                } else {
                    let dot = lanes.iter().map(|lane| lane[i]).sum::<i32>() - offset(dtype) * a.sum;
                    acc[i][0] = dd.mul_add(dot as f32, acc[i][0]);
                }
            }
            if dtype == GgmlType::Q4_1 {
                let m = f16s(&gb[16..32]);
                for i in 0..ROWS {
                    summs[i] += m[i] * a.s;
                }
            }
        }
        for i in 0..ROWS {
            let sum = if by_lanes(dtype) {
                hsum(acc[i])
            } else {
                acc[i][0]
            };
            ys[i] = if dtype == GgmlType::Q4_1 {
                sum + summs[i]
            } else {
                sum
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    use std::arch::x86_64::*;

    use super::{group_block_bytes, nibbles_at, ActBlock, LANES, ROWS};
    use crate::quant::GgmlType;

    pub fn group_matmul(dtype: GgmlType, group: &[u8], acts: &[Vec<ActBlock>], out: &mut [f32]) {
        // SAFETY: the caller checked AVX2, FMA and F16C on this CPU (`kernels::simd::available`).
        unsafe {
            match dtype {
                GgmlType::Q4_0 => group_matmul_avx2::<0, 1>(group, acts, out),
                GgmlType::Q4_1 => group_matmul_avx2::<1, 1>(group, acts, out),
                _ => group_matmul_avx2::<2, LANES>(group, acts, out),
            }
        }
    }

    const fn format(f: u8) -> GgmlType {
        match f {
            0 => GgmlType::Q4_0,
            1 => GgmlType::Q4_1,
            _ => GgmlType::Q5_0,
        }
    }

    /// Lanes `c` and `4 + c` of a group-block's quants as unsigned bytes: values `4c..4c + 4`
    /// and `16 + 4c..16 + 4c + 4` of each row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn unpack<const F: u8>(gb: &[u8], c: usize) -> [__m256i; 2] {
        let low = _mm256_set1_epi8(0x0F);
        let nibbles = &gb[nibbles_at(format(F))..][..super::NIBBLES];
        // SAFETY: `nibbles` is 128 bytes, four vectors of 32.
        let v = unsafe { _mm256_loadu_si256(nibbles[32 * c..].as_ptr().cast()) };
        let q = [
            _mm256_and_si256(v, low),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v), low),
        ];
        if F != 2 {
            return q;
        }
        // Byte 4i + t selects bit i, the row of that byte.
        let select = _mm256_setr_epi32(
            0x01010101,
            0x02020202,
            0x04040404,
            0x08080808,
            0x10101010,
            0x20202020,
            0x40404040,
            0x80808080u32 as i32,
        );
        let fifth = |l: usize| {
            let word = i32::from_le_bytes(gb[16 + 4 * l..16 + 4 * l + 4].try_into().expect("4"));
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_set1_epi32(word), select), select);
            _mm256_and_si256(set, _mm256_set1_epi8(0x10))
        };
        [
            _mm256_or_si256(q[0], fifth(c)),
            _mm256_or_si256(q[1], fifth(4 + c)),
        ]
    }

    /// Lane `l`'s products of quants `w` (lane `l`'s unsigned bytes) with activation block
    /// `a`, in 16-bit pairs: one row per 32-bit lane once summed.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn lane_pairs(w: __m256i, a: &ActBlock, l: usize) -> __m256i {
        let word = i32::from_le_bytes(std::array::from_fn(|k| a.qs[4 * l + k] as u8));
        _mm256_maddubs_epi16(w, _mm256_set1_epi32(word))
    }

    /// `dot` less the format's offset times the activations summed over `count`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn less_offset<const F: u8>(dot: __m256i, sum: i32) -> __m256i {
        match F {
            0 => _mm256_sub_epi32(dot, _mm256_set1_epi32(8 * sum)),
            2 => _mm256_sub_epi32(dot, _mm256_set1_epi32(16 * sum)),
            _ => dot,
        }
    }

    /// One token's accumulators for the eight rows of a group: `L` lanes (eight for `Q5_0`,
    /// one otherwise) and (`Q4_1`) the minimums' sum.
    #[derive(Clone, Copy)]
    struct Acc<const L: usize> {
        lanes: [__m256; L],
        summs: __m256,
    }

    impl<const L: usize> Acc<L> {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn new() -> Self {
            Self {
                lanes: [_mm256_setzero_ps(); L],
                summs: _mm256_setzero_ps(),
            }
        }

        /// Adds one group-block (`w(c)`: its [`unpack`] of `c`) scaled by `scale` (`d_w · d_a`).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn add<const F: u8>(
            &mut self,
            w: impl Fn(usize) -> [__m256i; 2],
            scale: __m256,
            a: &ActBlock,
        ) {
            let ones = _mm256_set1_epi16(1);
            if L == LANES {
                for c in 0..4 {
                    for (h, w) in w(c).into_iter().enumerate() {
                        let l = c + 4 * h;
                        let dot = _mm256_madd_epi16(lane_pairs(w, a, l), ones);
                        let offset = _mm256_set1_epi32(a.lane_offsets[l]);
                        let dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot, offset));
                        self.lanes[l] = _mm256_fmadd_ps(scale, dot, self.lanes[l]);
                    }
                }
                return;
            }
            // Eight pairs of 4-bit products, at most 8 × 2 × 15 × 127, fit 16 bits.
            let mut pairs = _mm256_setzero_si256();
            for c in 0..4 {
                let w = w(c);
                let both = _mm256_add_epi16(lane_pairs(w[0], a, c), lane_pairs(w[1], a, c + 4));
                pairs = _mm256_add_epi16(pairs, both);
            }
            let dot = less_offset::<F>(_mm256_madd_epi16(pairs, ones), a.sum);
            self.lanes[0] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), self.lanes[0]);
        }

        /// Adds a `Q4_1` group-block's minimums `m` times the activations' scaled sum.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn add_minimums(&mut self, m: __m256, a: &ActBlock) {
            self.summs = _mm256_add_ps(self.summs, _mm256_mul_ps(m, _mm256_set1_ps(a.s)));
        }

        /// The eight rows' results; lanes are summed in the file-layout kernels' order.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn store<const F: u8>(&self, ys: &mut [f32]) {
            let l = &self.lanes;
            let sum = if L == LANES {
                _mm256_add_ps(
                    _mm256_add_ps(_mm256_add_ps(l[0], l[4]), _mm256_add_ps(l[2], l[6])),
                    _mm256_add_ps(_mm256_add_ps(l[1], l[5]), _mm256_add_ps(l[3], l[7])),
                )
            } else {
                l[0]
            };
            let v = if F == 1 {
                _mm256_add_ps(sum, self.summs)
            } else {
                sum
            };
            // SAFETY: `ys` holds ROWS f32.
            unsafe { _mm256_storeu_ps(ys[..ROWS].as_mut_ptr(), v) }
        }
    }

    /// How far ahead of the group-block in use decode asks for weights: far enough that the
    /// lines arrive before the loop reaches them.
    const PREFETCH_AHEAD: usize = 4096;

    /// Asks for the cache lines `PREFETCH_AHEAD` bytes past `span`, as many as `span` covers.
    /// Prefetches never fault, so the addresses may run past the matrix's end.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn prefetch_ahead(span: &[u8]) {
        let start = span.as_ptr().wrapping_add(PREFETCH_AHEAD);
        for off in (0..span.len() + 63).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(off).cast());
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16s(bytes: &[u8]) -> __m256 {
        // SAFETY: `bytes` holds at least 16 bytes, eight f16.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn group_matmul_avx2<const F: u8, const L: usize>(
        group: &[u8],
        acts: &[Vec<ActBlock>],
        out: &mut [f32],
    ) {
        let gb_bytes = group_block_bytes(format(F));
        if let [act] = acts {
            // Decode: accumulators in registers, each block unpacked for its one use.
            let mut acc = Acc::<L>::new();
            for (gb, a) in group.chunks_exact(gb_bytes).zip(act) {
                prefetch_ahead(gb);
                let scale = _mm256_mul_ps(f16s(gb), _mm256_set1_ps(a.d));
                acc.add::<F>(|c| unpack::<F>(gb, c), scale, a);
                if F == 1 {
                    acc.add_minimums(f16s(&gb[16..]), a);
                }
            }
            return acc.store::<F>(out);
        }
        // Prefill: each block unpacked once for every token, accumulators in memory.
        let mut accs = vec![Acc::<L>::new(); acts.len()];
        for (b, gb) in group.chunks_exact(gb_bytes).enumerate() {
            let w: [[__m256i; 2]; 4] = std::array::from_fn(|c| unpack::<F>(gb, c));
            let d = f16s(gb);
            let m = if F == 1 { f16s(&gb[16..]) } else { d };
            for (act, acc) in acts.iter().zip(accs.iter_mut()) {
                let a = &act[b];
                acc.add::<F>(|c| w[c], _mm256_mul_ps(d, _mm256_set1_ps(a.d)), a);
                if F == 1 {
                    acc.add_minimums(m, a);
                }
            }
        }
        for (acc, ys) in accs.iter().zip(out.chunks_exact_mut(ROWS)) {
            acc.store::<F>(ys);
        }
    }
}
