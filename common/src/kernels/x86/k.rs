//! The file layout's dot products for the K formats (`Q4_K`, `Q6_K`): AVX2, and the prefill
//! tile in AVX-512 VNNI where the CPU has it. Integer totals are exact whatever their grouping,
//! and every f32 operation is the portable code's, in its order: the same bits.

use std::arch::x86_64::*;

use super::{bytes32, dpwssd, f16_at, group, hsum_i32, prefetch_ahead, wide_k, X86};
use crate::kernels::portable::{each_row, q4_k_scales, Q4_K_SIZE, Q6_K_SIZE};
use crate::kernels::KBlock;
use crate::quant::GgmlType;

/// Dots every row of `rows` with every token's activations: `out[r * n + t]`.
pub(in crate::kernels) fn dot_rows_k(
    cpu: X86,
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<KBlock>],
    out: &mut [f32],
) {
    // SAFETY: an `X86` is made only where the CPU runs AVX2, FMA and F16C.
    unsafe { dot_rows_k_avx2(cpu, dtype, rows, row_bytes, acts, out) }
}

/// Row by row, the next row requested ahead of use. One token (decode) unpacks each block
/// as it goes; several (prefill) unpack a tile of rows once and dot it with every token, on
/// the AVX-512 tile where `cpu` runs it.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_rows_k_avx2(
    cpu: X86,
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<KBlock>],
    out: &mut [f32],
) {
    let n = acts.len();
    if n > 1 {
        // Whole tiles of sixteen rows on AVX-512, the rest in tiles of four.
        let (rows, out) = if cpu.avx512() {
            let whole = rows.len() / (wide_k::ROWS * row_bytes) * wide_k::ROWS;
            let (tiles, rows) = rows.split_at(whole * row_bytes);
            let (tile_outs, out) = out.split_at_mut(whole * n);
            wide_k::dot_rows(cpu, dtype, tiles, row_bytes, acts, tile_outs);
            (rows, out)
        } else {
            (rows, out)
        };
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
            if cpu.avx512() {
                // SAFETY: `cpu` says this CPU runs AVX-512 F, BW and VNNI.
                unsafe { avx512::dot_unpacked_k_tiles(dtype, tile_rows, &scales, acts, ys) };
                continue;
            }
            for (t, act) in acts.iter().enumerate() {
                let y = dot_unpacked_k_tile(dtype, tile_rows, &scales, act);
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
    each_row(rows, row_bytes, acts, out, |row, act| {
        prefetch_ahead(row);
        match dtype {
            GgmlType::Q4K => dot_q4_k(row, act),
            _ => dot_q6_k(row, act),
        }
    })
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
            self.acc_min = _mm_fmadd_ps(_mm_cvtepi32_ps(corr), _mm_mul_ps(dmin, ad), self.acc_min);
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

    /// Tokens of a K-format prefill tile dotted together: each row's unpacked quants and
    /// scales, loaded once, serve all of them.
    pub(in crate::kernels) const K_TOKENS: usize = 4;

    /// Every token of `acts` dotted with a tile's rows, [`K_TOKENS`] at a time: for each,
    /// [`dot_unpacked_k_tile`]'s operations, so its bits; `out[r * n + t]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) fn dot_unpacked_k_tiles(
        dtype: GgmlType,
        rows: [&[KUnpacked]; K_TILE],
        scales: &[[__m128; 2]],
        acts: &[Vec<KBlock>],
        out: &mut [f32],
    ) {
        let n = acts.len();
        let mut put = |first: usize, ys: &[[f32; K_TILE]]| {
            for (t, y) in ys.iter().enumerate() {
                for (r, y) in y.iter().enumerate() {
                    out[r * n + first + t] = *y;
                }
            }
        };
        let mut tiles = acts.chunks_exact(K_TOKENS);
        for (i, acts) in (&mut tiles).enumerate() {
            let acts = std::array::from_fn(|t| &acts[t][..]);
            put(
                i * K_TOKENS,
                &dot_k_tokens::<K_TOKENS>(dtype, rows, scales, acts),
            );
        }
        let rest = tiles.remainder();
        let first = n - rest.len();
        match rest {
            [] => {}
            [a] => put(first, &dot_k_tokens::<1>(dtype, rows, scales, [a])),
            [a, b] => put(first, &dot_k_tokens::<2>(dtype, rows, scales, [a, b])),
            [a, b, c, ..] => put(first, &dot_k_tokens::<3>(dtype, rows, scales, [a, b, c])),
        }
    }

    /// `T` tokens' products with a tile's rows: [`dot_unpacked_k_tile`] for each, with
    /// the rows' quants and scales loaded once for all of them.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn dot_k_tokens<const T: usize>(
        dtype: GgmlType,
        rows: [&[KUnpacked]; K_TILE],
        scales: &[[__m128; 2]],
        acts: [&[KBlock]; T],
    ) -> [[f32; K_TILE]; T] {
        let blocks = scales.len();
        let rows: [&[KUnpacked]; K_TILE] = rows.map(|r| &r[..blocks]);
        let acts: [&[KBlock]; T] = acts.map(|a| &a[..blocks]);
        let mut acc: [KTileAcc; T] = std::array::from_fn(|_| KTileAcc::new());
        for (b, &scales) in scales.iter().enumerate() {
            let mut sumi = [[_mm512_setzero_si512(); K_TILE]; T];
            for pair in 0..4 {
                // SAFETY: `qs` holds eight groups of 32 bytes, contiguous.
                let y: [__m512i; T] = std::array::from_fn(|t| unsafe {
                    _mm512_loadu_si512(acts[t][b].qs[2 * pair].as_ptr().cast())
                });
                for (r, row) in rows.iter().enumerate() {
                    let u = &row[b];
                    // SAFETY: groups 2 pair and 2 pair + 1 are adjacent in each array.
                    let (q, sc) = unsafe {
                        (
                            _mm512_loadu_si512(u.q[2 * pair..].as_ptr().cast()),
                            _mm512_loadu_si512(u.sc[2 * pair..].as_ptr().cast()),
                        )
                    };
                    for (sumi, y) in sumi.iter_mut().zip(&y) {
                        sumi[r] = dpwssd(sumi[r], _mm512_maddubs_epi16(q, *y), sc);
                    }
                }
            }
            for ((acc, sumi), act) in acc.iter_mut().zip(sumi).zip(&acts) {
                let a = &act[b];
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
                acc.add(dtype, scales, a.d, sumi, corr);
            }
        }
        acc.map(|acc| acc.finish())
    }
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
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), sc));
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
