//! The K formats' prefill on AVX-512 VNNI, sixteen rows at a time, with no reductions.
//!
//! A product of several tokens unpacks each super-block of sixteen rows once into vectors whose
//! 32-bit lane `i` holds four quants of row `i` (the layout of [`crate::kernels::wide`]), then dots them
//! with a few tokens at a time: one `vpdpbusd`, its four activation bytes broadcast, multiplies
//! and sums four values of all sixteen rows. Each sub-block's sixteen sums are multiplied by
//! the rows' sub-block scales in one instruction and added to the super-block's totals, which
//! come out one row per lane: the conversion, the scale and the accumulation cost one
//! instruction for sixteen rows, and no lanes are summed across.
//!
//! The integers are those of the portable code (exact, in whatever order): `Q4_K`'s quants as
//! they are, its minimums taken off through the activations' 16-value sums; `Q6_K`'s quants
//! unsigned, their offset of 32 taken off through the same sums. Every f32 operation is the
//! portable code's, in its order: the same bits.

use std::arch::x86_64::*;

use super::{dpwssd, f16_at, X86};
use crate::kernels::portable::q4_k_scales;
use crate::kernels::KBlock;
use crate::quant::GgmlType;

/// Rows in one tile.
pub const ROWS: usize = 16;
/// Four-value steps of a super-block.
const STEPS: usize = 64;
/// Tokens dotted together with each unpacked super-block.
const TOKENS: usize = 6;

/// One super-block of a tile's sixteen rows, unpacked.
#[derive(Clone, Copy)]
struct Tile {
    /// Step `g`: row `i`'s values `4g..4g + 4` (unsigned) in lane `i`.
    q: [__m512i; STEPS],
    /// Sub-block `s`'s scale of row `i` in lane `i` (`Q4_K`: 8 sub-blocks of 32 values,
    /// `Q6_K`: 16 of 16).
    sc: [__m512i; 16],
    /// Multipliers of the activations' sums `2k` and `2k + 1`, as a pair of i16 in lane `i`:
    /// `Q4_K`'s minimums (taken off with `dmin`), `Q6_K`'s offset, -32 × the scales.
    corr: [__m512i; 8],
    d: __m512,
    dmin: __m512,
}

/// Super-block `b` of the sixteen rows `rows` (`row_bytes` each), unpacked.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn unpack(dtype: GgmlType, rows: &[u8], row_bytes: usize, b: usize) -> Tile {
    let size = dtype.type_size();
    // Each row's 256 values in order, a quarter per vector: `values[c][i]` is row `i`'s
    // values `64c..64c + 64`.
    let mut values = [[_mm512_setzero_si512(); ROWS]; 4];
    let mut sc = [[0i32; ROWS]; 16];
    let mut corr = [[0u32; ROWS]; 8];
    let (mut d, mut dmin) = ([0.0f32; ROWS], [0.0f32; ROWS]);
    let pair = |lo: i16, hi: i16| lo as u16 as u32 | (hi as u16 as u32) << 16;
    let low = _mm256_set1_epi8(0x0F);
    // SAFETY: `at..at + 32` lies within `block`, as the slicing checks.
    let bytes32 =
        |block: &[u8], at: usize| unsafe { _mm256_loadu_si256(block[at..at + 32].as_ptr().cast()) };
    let join = |a: __m256i, b: __m256i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
    for i in 0..ROWS {
        let block = &rows[i * row_bytes + b * size..][..size];
        if dtype == GgmlType::Q4K {
            d[i] = f16_at(block, 0);
            dmin[i] = f16_at(block, 2);
            let (s, m) = q4_k_scales(&block[4..16]);
            for (c, values) in values.iter_mut().enumerate() {
                // Sub-blocks 2c and 2c + 1: the low and high nibbles of the same 32 bytes.
                let packed = bytes32(block, 16 + 32 * c);
                let high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                values[i] = join(_mm256_and_si256(packed, low), high);
            }
            for sub in 0..8 {
                sc[sub][i] = s[sub] as i32;
                corr[sub][i] = pair(m[sub] as i16, m[sub] as i16);
            }
        } else {
            // Chunk 4 half + part: the low (part < 2) or high nibbles of ql's 32 bytes
            // 64 half + 32 (part % 2), and bits 2 part.. of the half's 32 qh bytes.
            let high = _mm256_set1_epi8(0x30);
            for half in 0..2 {
                let ql0 = bytes32(block, 64 * half);
                let ql1 = bytes32(block, 64 * half + 32);
                let qh = bytes32(block, 128 + 32 * half);
                let chunk = |l: __m256i, shift: i32, h: __m256i| {
                    let l = _mm256_and_si256(_mm256_srl_epi16(l, _mm_cvtsi32_si128(shift)), low);
                    _mm256_or_si256(l, _mm256_and_si256(h, high))
                };
                let parts = [
                    chunk(ql0, 0, _mm256_slli_epi16::<4>(qh)),
                    chunk(ql1, 0, _mm256_slli_epi16::<2>(qh)),
                    chunk(ql0, 4, qh),
                    chunk(ql1, 4, _mm256_srli_epi16::<2>(qh)),
                ];
                values[2 * half][i] = join(parts[0], parts[1]);
                values[2 * half + 1][i] = join(parts[2], parts[3]);
            }
            let scales = &block[192..208];
            d[i] = f16_at(block, 208);
            for (sc, &s) in sc.iter_mut().zip(scales) {
                sc[i] = s as i8 as i32;
            }
            for (k, corr) in corr.iter_mut().enumerate() {
                let offset = |j: usize| -32 * scales[j] as i8 as i16;
                corr[i] = pair(offset(2 * k), offset(2 * k + 1));
            }
        }
    }
    let mut q = [_mm512_setzero_si512(); STEPS];
    for (values, q) in values.iter().zip(q.chunks_exact_mut(16)) {
        q.copy_from_slice(&transpose(values));
    }
    // SAFETY: each array is sixteen 32-bit values, 64 bytes (AVX-512 F is this function's).
    unsafe {
        Tile {
            q,
            sc: std::array::from_fn(|s| _mm512_loadu_si512(sc[s].as_ptr().cast())),
            corr: std::array::from_fn(|k| _mm512_loadu_si512(corr[k].as_ptr().cast())),
            d: _mm512_loadu_ps(d.as_ptr()),
            dmin: _mm512_loadu_ps(dmin.as_ptr()),
        }
    }
}

/// A 16 × 16 transpose of 32-bit values: lane `i` of vector `j` out is lane `j` of `r[i]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn transpose(r: &[__m512i; 16]) -> [__m512i; 16] {
    // Within each 128-bit lane `l`: pairs of rows' values 4l, 4l + 1 (lo) and 4l + 2, 4l + 3.
    let a: [__m512i; 16] = std::array::from_fn(|x| {
        let k = x / 2;
        if x % 2 == 0 {
            _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1])
        } else {
            _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1])
        }
    });
    // `b[4k + m]`'s 128-bit lane `l`: rows 4k..4k + 4 of value 4l + m.
    let b: [__m512i; 16] = std::array::from_fn(|x| {
        let (k, m) = (x / 4, x % 4);
        let (p, q) = (a[4 * k + m / 2], a[4 * k + 2 + m / 2]);
        if m % 2 == 0 {
            _mm512_unpacklo_epi64(p, q)
        } else {
            _mm512_unpackhi_epi64(p, q)
        }
    });
    let mut out = [_mm512_setzero_si512(); 16];
    for m in 0..4 {
        // The 128-bit lanes of b[m], b[4 + m], b[8 + m], b[12 + m] transposed.
        let x: [__m512i; 4] = std::array::from_fn(|k| b[4 * k + m]);
        let c0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(x[0], x[1]);
        let c1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(x[0], x[1]);
        let c2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(x[2], x[3]);
        let c3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(x[2], x[3]);
        out[m] = _mm512_shuffle_i32x4::<0b10_00_10_00>(c0, c2);
        out[4 + m] = _mm512_shuffle_i32x4::<0b11_01_11_01>(c0, c2);
        out[8 + m] = _mm512_shuffle_i32x4::<0b10_00_10_00>(c1, c3);
        out[12 + m] = _mm512_shuffle_i32x4::<0b11_01_11_01>(c1, c3);
    }
    out
}

/// Every row of `rows` (whole tiles of [`ROWS`], `row_bytes` each) dotted with every token of
/// `acts`: `out[r * n + t]`, on AVX-512, which `cpu` must run.
pub(super) fn dot_rows(
    cpu: X86,
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<KBlock>],
    out: &mut [f32],
) {
    assert!(cpu.avx512(), "this CPU has no AVX-512 VNNI");
    // SAFETY: `cpu` says this CPU runs AVX-512 F, BW and VNNI, with AVX2, FMA and F16C.
    unsafe { dot_rows_avx512(dtype, rows, row_bytes, acts, out) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn dot_rows_avx512(
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<KBlock>],
    out: &mut [f32],
) {
    let n = acts.len();
    let blocks = row_bytes / dtype.type_size();
    let mut tiles: Vec<Tile> = Vec::with_capacity(blocks);
    for (tile, out) in rows
        .chunks_exact(ROWS * row_bytes)
        .zip(out.chunks_exact_mut(ROWS * n))
    {
        tiles.clear();
        tiles.extend((0..blocks).map(|b| unpack(dtype, tile, row_bytes, b)));
        let mut put = |first: usize, ys: &[[f32; ROWS]]| {
            for (t, y) in ys.iter().enumerate() {
                for (r, &y) in y.iter().enumerate() {
                    out[r * n + first + t] = y;
                }
            }
        };
        let q4k = dtype == GgmlType::Q4K;
        let mut chunks = acts.chunks_exact(TOKENS);
        for (c, acts) in (&mut chunks).enumerate() {
            let acts: [&[KBlock]; TOKENS] = std::array::from_fn(|t| &acts[t][..]);
            let ys = if q4k {
                tokens::<true, TOKENS>(&tiles, acts)
            } else {
                tokens::<false, TOKENS>(&tiles, acts)
            };
            put(c * TOKENS, &ys);
        }
        let rest = chunks.remainder();
        let first = n - rest.len();
        match (q4k, rest) {
            (_, []) => {}
            (true, [a]) => put(first, &tokens::<true, 1>(&tiles, [a])),
            (false, [a]) => put(first, &tokens::<false, 1>(&tiles, [a])),
            (true, [a, b]) => put(first, &tokens::<true, 2>(&tiles, [a, b])),
            (false, [a, b]) => put(first, &tokens::<false, 2>(&tiles, [a, b])),
            (true, [a, b, c]) => put(first, &tokens::<true, 3>(&tiles, [a, b, c])),
            (false, [a, b, c]) => put(first, &tokens::<false, 3>(&tiles, [a, b, c])),
            (true, [a, b, c, d]) => put(first, &tokens::<true, 4>(&tiles, [a, b, c, d])),
            (false, [a, b, c, d]) => put(first, &tokens::<false, 4>(&tiles, [a, b, c, d])),
            (true, [a, b, c, d, e, ..]) => put(first, &tokens::<true, 5>(&tiles, [a, b, c, d, e])),
            (false, [a, b, c, d, e, ..]) => {
                put(first, &tokens::<false, 5>(&tiles, [a, b, c, d, e]))
            }
        }
    }
}

/// `T` tokens' products with a tile's sixteen rows, whose super-blocks are `tiles`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn tokens<const Q4K: bool, const T: usize>(
    tiles: &[Tile],
    acts: [&[KBlock]; T],
) -> [[f32; ROWS]; T] {
    let acts = acts.map(|a| &a[..tiles.len()]);
    let (subs, steps) = if Q4K { (8, 8) } else { (16, 4) };
    let mut acc = [_mm512_setzero_ps(); T];
    let mut acc_min = [_mm512_setzero_ps(); T];
    for (b, u) in tiles.iter().enumerate() {
        let a: [&KBlock; T] = std::array::from_fn(|t| &acts[t][b]);
        // Four activation bytes (or two sums) at a time, as one 32-bit value.
        let word = |bytes: &[u8], at: usize| {
            i32::from_le_bytes(bytes[4 * at..4 * at + 4].try_into().expect("4 bytes"))
        };
        // SAFETY: `qs` is 256 i8 in a row, `bsums` 16 i16.
        let qs: [&[u8]; T] =
            a.map(|a| unsafe { std::slice::from_raw_parts(a.qs.as_ptr().cast::<u8>(), 256) });
        let bsums: [&[u8]; T] =
            a.map(|a| unsafe { std::slice::from_raw_parts(a.bsums.as_ptr().cast::<u8>(), 32) });
        let mut total = [_mm512_setzero_si512(); T];
        for s in 0..subs {
            let mut sums = [_mm512_setzero_si512(); T];
            for j in 0..steps {
                let g = s * steps + j;
                for (sum, qs) in sums.iter_mut().zip(&qs) {
                    let y = _mm512_set1_epi32(word(qs, g));
                    *sum = _mm512_dpbusd_epi32(*sum, u.q[g], y);
                }
            }
            for (total, sum) in total.iter_mut().zip(sums) {
                *total = _mm512_add_epi32(*total, _mm512_mullo_epi32(sum, u.sc[s]));
            }
        }
        let mut mins = [_mm512_setzero_si512(); T];
        let corr = if Q4K { &mut mins } else { &mut total };
        for (k, &c) in u.corr.iter().enumerate() {
            for (corr, bsums) in corr.iter_mut().zip(&bsums) {
                *corr = dpwssd(*corr, c, _mm512_set1_epi32(word(bsums, k)));
            }
        }
        for t in 0..T {
            let ad = _mm512_set1_ps(a[t].d);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total[t]), _mm512_mul_ps(u.d, ad), acc[t]);
            if Q4K {
                acc_min[t] = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(mins[t]),
                    _mm512_mul_ps(u.dmin, ad),
                    acc_min[t],
                );
            }
        }
    }
    std::array::from_fn(|t| {
        let y = if Q4K {
            _mm512_sub_ps(acc[t], acc_min[t])
        } else {
            acc[t]
        };
        let mut out = [0.0f32; ROWS];
        // SAFETY: `out` holds sixteen f32.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), y) };
        out
    })
}
