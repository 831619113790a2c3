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

use super::{hsum, ActBlock, LANES, QK};
use crate::quant::GgmlType;

/// Rows in one group.
pub const ROWS: usize = 8;
/// Bytes of a group's nibbles for one block.
const NIBBLES: usize = ROWS * QK / 2;
/// Bytes of a group's unpacked quants for one block, four vectors of 64.
const UNPACKED: usize = ROWS * QK;
/// Where a `Q5_0` group-block's fifth-bit masks start.
const MASKS_AT: usize = 16;

/// Whether a `[rows, cols]` matrix of `dtype` is repacked: one of the formats above, whole groups.
pub fn repacks(dtype: GgmlType, rows: usize) -> bool {
    matches!(
        dtype,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q8_0
    ) && rows.is_multiple_of(ROWS)
}

/// Where a group-block's nibbles (`Q8_0`: quants) start.
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
/// [`ROWS`] rows, in `out` (as long as `bytes`). `repacks(dtype, rows)` must hold. `done(n)`
/// hears, every few hundred KiB, that the first `n` bytes of `bytes` will not be read again.
pub fn repack(
    dtype: GgmlType,
    rows: usize,
    row_bytes: usize,
    bytes: &[u8],
    out: &mut [u8],
    done: impl FnMut(usize),
) {
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
    super::repack_groups(bytes, out, ROWS * row_bytes, done, |_, group, out| {
        for b in 0..blocks {
            let dst = &mut out[b * gb..][..gb];
            let src = |i: usize| &group[i * row_bytes + b * block..][..block];
            for i in 0..ROWS {
                dst[2 * i..2 * i + 2].copy_from_slice(&src(i)[..2]);
                if dtype == GgmlType::Q4_1 {
                    dst[16 + 2 * i..16 + 2 * i + 2].copy_from_slice(&src(i)[2..4]);
                }
                let vectors = if dtype == GgmlType::Q8_0 { 4 } else { 2 };
                for p in 0..vectors {
                    let to = nibbles_at(dtype) + 64 * p + 8 * i;
                    dst[to..to + 8].copy_from_slice(&src(i)[qs_at + 8 * p..qs_at + 8 * p + 8]);
                }
            }
            if dtype == GgmlType::Q5_0 {
                let qh: [u32; ROWS] = std::array::from_fn(|i| {
                    u32::from_le_bytes(src(i)[2..6].try_into().expect("4 bytes"))
                });
                for k in 0..4 {
                    let mut mask = 0u64;
                    for (i, qh) in qh.iter().enumerate() {
                        for t in 0..8 {
                            mask |= u64::from((qh >> (8 * k + t)) & 1) << (8 * i + t);
                        }
                    }
                    dst[MASKS_AT + 8 * k..MASKS_AT + 8 * k + 8]
                        .copy_from_slice(&mask.to_le_bytes());
                }
            }
        }
    });
}

/// The value offset of `dtype`'s quants: taken unsigned, they stand for `q - offset`.
const fn offset(dtype: GgmlType) -> i32 {
    match dtype {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        GgmlType::Q8_0 => 128,
        _ => 0,
    }
}

/// Lane `l`'s integer products of one group-block's unsigned quants with one activation block,
/// per row: lane `l` covers values `4l..4l + 4`, as in the file-layout kernels.
#[inline(always)]
fn lane_dots(dtype: GgmlType, gb: &[u8], a: &ActBlock, l: usize) -> [i32; ROWS] {
    // Values 4l..4l + 4 are 16h + 8p + 4s + t for t < 4.
    let (h, p, s) = (l / 4, l / 2 % 2, l % 2);
    if dtype == GgmlType::Q8_0 {
        let quants = &gb[nibbles_at(dtype)..][..UNPACKED];
        return std::array::from_fn(|i| {
            (0..4)
                .map(|t| {
                    (quants[64 * (l / 2) + 8 * i + 4 * s + t] ^ 0x80) as i32
                        * a.qs[4 * l + t] as i32
                })
                .sum()
        });
    }
    let nibbles = &gb[nibbles_at(dtype)..][..NIBBLES];
    let mask = u64::from_le_bytes(
        gb[MASKS_AT + 8 * (l / 2)..][..8]
            .try_into()
            .expect("8 bytes"),
    );
    std::array::from_fn(|i| {
        let mut dot = 0i32;
        for t in 0..4 {
            let byte = nibbles[64 * p + 8 * i + 4 * s + t];
            let mut q = if h == 1 { byte >> 4 } else { byte & 0x0F } as i32;
            if dtype == GgmlType::Q5_0 {
                q |= (((mask >> (8 * i + 4 * s + t)) & 1) << 4) as i32;
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
/// results are the portable code's bits on every path.
pub fn group_matmul(dtype: GgmlType, group: &[u8], acts: &[Vec<ActBlock>], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(path) = simd::Path::best() {
        return simd::group_matmul(path, dtype, group, acts, out);
    }
    #[cfg(target_arch = "aarch64")]
    if let Some(path) = neon::Path::best() {
        return neon::group_matmul(path, dtype, group, acts, out);
    }
    group_matmul_portable(dtype, group, acts, out)
}

/// Fills in what `dtype`'s kernels need of the activation blocks beyond their quantization:
/// the lane biases of the formats that accumulate by lanes.
pub fn prepare(dtype: GgmlType, acts: &mut [Vec<ActBlock>]) {
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
pub const fn by_lanes(dtype: GgmlType) -> bool {
    matches!(dtype, GgmlType::Q5_0 | GgmlType::Q8_0)
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
                        let dot = lanes[l][i] + a.lane_bias[l];
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

/// The formats as the SIMD kernels' const generic parameter.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod formats {
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
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use formats::{format, lanes, Q4_0, Q4_1, Q5_0, Q8_0};

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
pub(super) mod neon;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::{
        format, group_block_bytes, lanes, nibbles_at, ActBlock, MASKS_AT, NIBBLES, Q4_0, Q4_1,
        Q5_0, Q8_0, ROWS, UNPACKED,
    };
    use crate::quant::GgmlType;

    /// An instruction set the kernels below are written for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Path {
        /// AVX-512 F/BW with VNNI: sixteen lanes, one instruction per four byte products.
        Avx512,
        /// AVX2 with FMA and F16C.
        Avx2,
    }

    impl Path {
        /// The fastest path this CPU runs; `None` leaves the portable code.
        pub fn best() -> Option<Self> {
            static BEST: OnceLock<Option<Path>> = OnceLock::new();
            *BEST.get_or_init(|| {
                [Self::Avx512, Self::Avx2]
                    .into_iter()
                    .find(|p| p.available())
            })
        }

        pub fn available(self) -> bool {
            match self {
                Self::Avx2 => crate::kernels::simd_available(),
                Self::Avx512 => crate::kernels::avx512_available(),
            }
        }
    }

    /// [`super::group_matmul`] on `path`, which this CPU must run.
    pub fn group_matmul(
        path: Path,
        dtype: GgmlType,
        group: &[u8],
        acts: &[Vec<ActBlock>],
        out: &mut [f32],
    ) {
        assert!(path.available(), "{path:?} is not available on this CPU");
        // SAFETY: the features of `path` were just checked on this CPU.
        unsafe {
            match (path, dtype) {
                (Path::Avx512, GgmlType::Q4_0) => avx512::group_matmul::<Q4_0>(group, acts, out),
                (Path::Avx512, GgmlType::Q4_1) => avx512::group_matmul::<Q4_1>(group, acts, out),
                (Path::Avx512, GgmlType::Q5_0) => avx512::group_matmul::<Q5_0>(group, acts, out),
                (Path::Avx512, _) => avx512::group_matmul::<Q8_0>(group, acts, out),
                (Path::Avx2, GgmlType::Q4_0) => avx2::group_matmul::<Q4_0>(group, acts, out),
                (Path::Avx2, GgmlType::Q4_1) => avx2::group_matmul::<Q4_1>(group, acts, out),
                (Path::Avx2, GgmlType::Q5_0) => avx2::group_matmul::<Q5_0>(group, acts, out),
                (Path::Avx2, _) => avx2::group_matmul::<Q8_0>(group, acts, out),
            }
        }
    }

    use std::mem::MaybeUninit;

    use crate::kernels::{pass_accumulators, TOKENS_PER_PASS};

    /// Activation bytes `8k..8k + 8` as one 64-bit lane, to broadcast.
    #[inline(always)]
    fn act_pair(a: &ActBlock, k: usize) -> i64 {
        let bytes: [i8; 8] = a.qs[8 * k..8 * k + 8].try_into().expect("8 bytes");
        i64::from_le_bytes(bytes.map(|b| b as u8))
    }

    /// Lane biases `2k` and `2k + 1` as one 64-bit lane, to broadcast.
    #[inline(always)]
    fn bias_pair(a: &ActBlock, k: usize) -> i64 {
        (a.lane_bias[2 * k] as u32 as i64) | ((a.lane_bias[2 * k + 1] as i64) << 32)
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

    /// A group-block's eight f16 at `bytes[..16]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn f16s(bytes: &[u8]) -> __m256 {
        // SAFETY: `bytes` holds at least 16 bytes, eight f16.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(bytes[..16].as_ptr().cast()) })
    }

    /// Adds one group-block of a format with one integer per block: the eight rows' integer
    /// totals `dot` (the quants' offset taken off here), scaled by `d_w · d_a`, into `rows`,
    /// and (`Q4_1`) the minimums `m` times the activations' scaled sum into `summs`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn add_rows<const F: u8>(
        rows: &mut __m256,
        summs: &mut __m256,
        dot: __m256i,
        d: __m256,
        m: __m256,
        a: &ActBlock,
    ) {
        let dot = match F {
            Q4_0 => _mm256_sub_epi32(dot, _mm256_set1_epi32(8 * a.sum)),
            _ => dot,
        };
        let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
        *rows = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *rows);
        if F == Q4_1 {
            *summs = _mm256_add_ps(*summs, _mm256_mul_ps(m, _mm256_set1_ps(a.s)));
        }
    }

    /// Eight rows' f32 results in order, from `(r0, r1, r4, r5, r2, r3, r6, r7)`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_in_order(v: __m256) -> __m256 {
        _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
    }

    mod avx512 {
        use super::*;

        /// The unsigned quants of a group-block, vectors `k = 2h + p`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        fn unpack<const F: u8>(gb: &[u8]) -> [__m512i; 4] {
            if F == Q8_0 {
                let quants = &gb[nibbles_at(format(F))..][..UNPACKED];
                let offset = _mm512_set1_epi8(0x80u8 as i8);
                return std::array::from_fn(|k| {
                    // SAFETY: `quants` is 256 bytes, four vectors of 64.
                    let v = unsafe { _mm512_loadu_si512(quants[64 * k..].as_ptr().cast()) };
                    _mm512_xor_si512(v, offset)
                });
            }
            let low = _mm512_set1_epi8(0x0F);
            let nibbles = &gb[nibbles_at(format(F))..][..NIBBLES];
            let mut q = [_mm512_setzero_si512(); 4];
            for p in 0..2 {
                // SAFETY: `nibbles` is 128 bytes, two vectors of 64.
                let v = unsafe { _mm512_loadu_si512(nibbles[64 * p..].as_ptr().cast()) };
                q[p] = _mm512_and_si512(v, low);
                q[2 + p] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            }
            if F == Q5_0 {
                let fifth = _mm512_set1_epi8(0x10);
                for (k, q) in q.iter_mut().enumerate() {
                    let at = MASKS_AT + 8 * k;
                    let mask = u64::from_le_bytes(gb[at..at + 8].try_into().expect("8 bytes"));
                    *q = _mm512_mask_add_epi8(*q, mask, *q, fifth);
                }
            }
            q
        }

        /// One token's accumulators for the eight rows of a group.
        #[derive(Clone, Copy)]
        struct Acc {
            /// (`Q5_0`, `Q8_0`) file lanes `2k` and `2k + 1` of each row, in vector `k`.
            lanes: [__m512; 4],
            /// (`Q4_0`, `Q4_1`) one per row.
            rows: __m256,
            /// (`Q4_1`) the minimums' sum.
            summs: __m256,
        }

        impl Acc {
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
            fn new() -> Self {
                Self {
                    lanes: [_mm512_setzero_ps(); 4],
                    rows: _mm256_setzero_ps(),
                    summs: _mm256_setzero_ps(),
                }
            }

            /// Adds one group-block: quants `q`, scales `d` (and, by lanes, `dd`: each twice),
            /// minimums `m`.
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
            fn add<const F: u8>(
                &mut self,
                q: &[__m512i; 4],
                d: __m256,
                dd: __m512,
                m: __m256,
                a: &ActBlock,
            ) {
                if lanes(F) {
                    let scale = _mm512_mul_ps(dd, _mm512_set1_ps(a.d));
                    for (k, (q, acc)) in q.iter().zip(&mut self.lanes).enumerate() {
                        let bias = _mm512_set1_epi64(bias_pair(a, k));
                        let dot = _mm512_dpbusd_epi32(bias, *q, _mm512_set1_epi64(act_pair(a, k)));
                        *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), *acc);
                    }
                    return;
                }
                // Two chains of exact integer sums; lanes 2i and 2i + 1 are row i's halves.
                let zero = _mm512_setzero_si512();
                let x = _mm512_dpbusd_epi32(zero, q[0], _mm512_set1_epi64(act_pair(a, 0)));
                let y = _mm512_dpbusd_epi32(zero, q[1], _mm512_set1_epi64(act_pair(a, 1)));
                let x = _mm512_dpbusd_epi32(x, q[2], _mm512_set1_epi64(act_pair(a, 2)));
                let y = _mm512_dpbusd_epi32(y, q[3], _mm512_set1_epi64(act_pair(a, 3)));
                let s = _mm512_add_epi32(x, y);
                // Each row's total in its even lane, then the even lanes packed.
                let s = _mm512_add_epi32(s, _mm512_srli_epi64::<32>(s));
                add_rows::<F>(
                    &mut self.rows,
                    &mut self.summs,
                    _mm512_cvtepi64_epi32(s),
                    d,
                    m,
                    a,
                );
            }

            /// The eight rows' results; lanes are summed in the file-layout kernels' order.
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
            fn store<const F: u8>(&self, ys: &mut [f32]) {
                let v = match F {
                    Q5_0 | Q8_0 => {
                        let l = &self.lanes;
                        // Even lanes (l0 + l4) + (l2 + l6), odd lanes (l1 + l5) + (l3 + l7).
                        let x = _mm512_add_ps(_mm512_add_ps(l[0], l[2]), _mm512_add_ps(l[1], l[3]));
                        let x = _mm512_add_ps(x, _mm512_permute_ps::<0b10_11_00_01>(x));
                        _mm256_castsi256_ps(_mm512_cvtepi64_epi32(_mm512_castps_si512(x)))
                    }
                    Q4_1 => _mm256_add_ps(self.rows, self.summs),
                    _ => self.rows,
                };
                // SAFETY: `ys` holds ROWS f32.
                unsafe { _mm256_storeu_ps(ys[..ROWS].as_mut_ptr(), v) }
            }
        }

        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        pub(super) fn group_matmul<const F: u8>(
            group: &[u8],
            acts: &[Vec<ActBlock>],
            out: &mut [f32],
        ) {
            let gb_bytes = group_block_bytes(format(F));
            let twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
            if let [act] = acts {
                // Decode: each block unpacked for its one use.
                let mut acc = Acc::new();
                for (gb, a) in group.chunks_exact(gb_bytes).zip(act) {
                    prefetch_ahead(gb);
                    let d = f16s(gb);
                    let dd = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(d));
                    let m = if F == Q4_1 { f16s(&gb[16..]) } else { d };
                    acc.add::<F>(&unpack::<F>(gb), d, dd, m, a);
                }
                return acc.store::<F>(out);
            }
            // Several tokens: each group-block unpacked once per pass, for every token of the
            // pass, whose accumulators stay on the stack. Each token's sums run in the order
            // decode runs them: the same bits.
            for (acts, out) in acts
                .chunks(TOKENS_PER_PASS)
                .zip(out.chunks_mut(TOKENS_PER_PASS * ROWS))
            {
                let mut room = [const { MaybeUninit::uninit() }; TOKENS_PER_PASS];
                let accs = pass_accumulators(&mut room, acts.len(), Acc::new());
                for (b, gb) in group.chunks_exact(gb_bytes).enumerate() {
                    let d = f16s(gb);
                    let dd = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(d));
                    let m = if F == Q4_1 { f16s(&gb[16..]) } else { d };
                    let q = unpack::<F>(gb);
                    for (acc, act) in accs.iter_mut().zip(acts) {
                        acc.add::<F>(&q, d, dd, m, &act[b]);
                    }
                }
                for (acc, ys) in accs.iter().zip(out.chunks_exact_mut(ROWS)) {
                    acc.store::<F>(ys);
                }
            }
        }
    }

    mod avx2 {
        use super::*;

        /// The unsigned quants of a group-block: `[k][j]`, vector `k = 2h + p` (see the
        /// module's header) for rows `4j..4j + 4`.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn unpack<const F: u8>(gb: &[u8]) -> [[__m256i; 2]; 4] {
            if F == Q8_0 {
                // Signed: `add` moves the signs onto the activations.
                let quants = &gb[nibbles_at(format(F))..][..UNPACKED];
                return std::array::from_fn(|k| {
                    std::array::from_fn(|j| {
                        // SAFETY: `quants` is 256 bytes, eight vectors of 32.
                        unsafe { _mm256_loadu_si256(quants[64 * k + 32 * j..].as_ptr().cast()) }
                    })
                });
            }
            let low = _mm256_set1_epi8(0x0F);
            let nibbles = &gb[nibbles_at(format(F))..][..NIBBLES];
            let mut q = [[_mm256_setzero_si256(); 2]; 4];
            for p in 0..2 {
                for half in 0..2 {
                    // SAFETY: `nibbles` is 128 bytes, four vectors of 32.
                    let v = unsafe {
                        _mm256_loadu_si256(nibbles[64 * p + 32 * half..].as_ptr().cast())
                    };
                    q[p][half] = _mm256_and_si256(v, low);
                    q[2 + p][half] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                }
            }
            if F == Q5_0 {
                // Byte 8j + t of a vector takes bit t of the mask's byte j, its row's.
                let spread = _mm256_setr_epi8(
                    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                    3, 3, 3, 3, 3, 3,
                );
                let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                let fifth = _mm256_set1_epi8(0x10);
                for (k, q) in q.iter_mut().enumerate() {
                    for (half, q) in q.iter_mut().enumerate() {
                        let at = MASKS_AT + 8 * k + 4 * half;
                        let word = i32::from_le_bytes(gb[at..at + 4].try_into().expect("4 bytes"));
                        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(word), spread);
                        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
                        *q = _mm256_or_si256(*q, _mm256_and_si256(set, fifth));
                    }
                }
            }
            q
        }

        /// One token's accumulators for the eight rows of a group.
        #[derive(Clone, Copy)]
        struct Acc {
            /// (`Q5_0`, `Q8_0`) `[k][j]`: file lanes `2k` and `2k + 1` of rows `4j..4j + 4`.
            lanes: [[__m256; 2]; 4],
            /// (`Q4_0`, `Q4_1`) one per row.
            rows: __m256,
            /// (`Q4_1`) the minimums' sum.
            summs: __m256,
        }

        impl Acc {
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            fn new() -> Self {
                Self {
                    lanes: [[_mm256_setzero_ps(); 2]; 4],
                    rows: _mm256_setzero_ps(),
                    summs: _mm256_setzero_ps(),
                }
            }

            /// Adds one group-block: quants `q`, scales `d` (and, by lanes, `dd`: each twice,
            /// rows `0..4` and `4..8`), minimums `m`.
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            fn add<const F: u8>(
                &mut self,
                q: &[[__m256i; 2]; 4],
                d: __m256,
                dd: [__m256; 2],
                m: __m256,
                a: &ActBlock,
            ) {
                let ones = _mm256_set1_epi16(1);
                if lanes(F) {
                    let da = _mm256_set1_ps(a.d);
                    let scale = dd.map(|dd| _mm256_mul_ps(dd, da));
                    for (k, (q, acc)) in q.iter().zip(&mut self.lanes).enumerate() {
                        let act = _mm256_set1_epi64x(act_pair(a, k));
                        let bias = _mm256_set1_epi64x(bias_pair(a, k));
                        for half in 0..2 {
                            let dot = if F == Q8_0 {
                                // |w| · (a with w's sign); activations stay within ±127, so
                                // pairs stay within 16 bits.
                                let pairs = _mm256_maddubs_epi16(
                                    _mm256_abs_epi8(q[half]),
                                    _mm256_sign_epi8(act, q[half]),
                                );
                                _mm256_madd_epi16(pairs, ones)
                            } else {
                                let pairs = _mm256_maddubs_epi16(q[half], act);
                                _mm256_add_epi32(_mm256_madd_epi16(pairs, ones), bias)
                            };
                            let dot = _mm256_cvtepi32_ps(dot);
                            acc[half] = _mm256_fmadd_ps(scale[half], dot, acc[half]);
                        }
                    }
                    return;
                }
                // Four pairs of 4-bit products, at most 4 × 2 × 15 × 128, fit 16 bits.
                let acts: [__m256i; 4] =
                    std::array::from_fn(|k| _mm256_set1_epi64x(act_pair(a, k)));
                let half = |h: usize| {
                    let pairs = |k: usize| _mm256_maddubs_epi16(q[k][h], acts[k]);
                    let sum = _mm256_add_epi16(
                        _mm256_add_epi16(pairs(0), pairs(1)),
                        _mm256_add_epi16(pairs(2), pairs(3)),
                    );
                    _mm256_madd_epi16(sum, ones)
                };
                let (low, high) = (half(0), half(1));
                // Each row's two lanes summed, rows (0, 1, 4, 5, 2, 3, 6, 7), then in order.
                let dot = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_hadd_epi32(low, high));
                add_rows::<F>(&mut self.rows, &mut self.summs, dot, d, m, a);
            }

            /// The eight rows' results; lanes are summed in the file-layout kernels' order.
            #[inline]
            #[target_feature(enable = "avx2,fma,f16c")]
            fn store<const F: u8>(&self, ys: &mut [f32]) {
                let v = match F {
                    Q5_0 | Q8_0 => {
                        let l = &self.lanes;
                        // Even lanes (l0 + l4) + (l2 + l6), odd lanes (l1 + l5) + (l3 + l7).
                        let x = |h: usize| {
                            _mm256_add_ps(
                                _mm256_add_ps(l[0][h], l[2][h]),
                                _mm256_add_ps(l[1][h], l[3][h]),
                            )
                        };
                        rows_in_order(_mm256_hadd_ps(x(0), x(1)))
                    }
                    Q4_1 => _mm256_add_ps(self.rows, self.summs),
                    _ => self.rows,
                };
                // SAFETY: `ys` holds ROWS f32.
                unsafe { _mm256_storeu_ps(ys[..ROWS].as_mut_ptr(), v) }
            }
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) fn group_matmul<const F: u8>(
            group: &[u8],
            acts: &[Vec<ActBlock>],
            out: &mut [f32],
        ) {
            let gb_bytes = group_block_bytes(format(F));
            let twice = [
                _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
                _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
            ];
            if let [act] = acts {
                // Decode: each block unpacked for its one use.
                let mut acc = Acc::new();
                for (gb, a) in group.chunks_exact(gb_bytes).zip(act) {
                    prefetch_ahead(gb);
                    let d = f16s(gb);
                    let dd = twice.map(|t| _mm256_permutevar8x32_ps(d, t));
                    let m = if F == Q4_1 { f16s(&gb[16..]) } else { d };
                    acc.add::<F>(&unpack::<F>(gb), d, dd, m, a);
                }
                return acc.store::<F>(out);
            }
            // Several tokens: each group-block unpacked once per pass, for every token of the
            // pass, whose accumulators stay on the stack. Each token's sums run in the order
            // decode runs them: the same bits.
            for (acts, out) in acts
                .chunks(TOKENS_PER_PASS)
                .zip(out.chunks_mut(TOKENS_PER_PASS * ROWS))
            {
                let mut room = [const { MaybeUninit::uninit() }; TOKENS_PER_PASS];
                let accs = pass_accumulators(&mut room, acts.len(), Acc::new());
                for (b, gb) in group.chunks_exact(gb_bytes).enumerate() {
                    let d = f16s(gb);
                    let dd = twice.map(|t| _mm256_permutevar8x32_ps(d, t));
                    let m = if F == Q4_1 { f16s(&gb[16..]) } else { d };
                    let q = unpack::<F>(gb);
                    for (acc, act) in accs.iter_mut().zip(acts) {
                        acc.add::<F>(&q, d, dd, m, &act[b]);
                    }
                }
                for (acc, ys) in accs.iter().zip(out.chunks_exact_mut(ROWS)) {
                    acc.store::<F>(ys);
                }
            }
        }
    }
}
