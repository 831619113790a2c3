//! The K formats on AVX-512 VNNI, sixteen rows at a time, with no reductions: the products of
//! the sixteen-row layout ([`crate::kernels::wide`]), and the file layout's prefill.
//!
//! Sixteen rows' super-blocks are dotted with one `vpdpbusd` per four values, its four
//! activation bytes broadcast, one row per 32-bit lane. Each sub-block's sixteen sums are
//! multiplied by the rows' sub-block scales in one instruction and added to the super-block's
//! totals, which come out one row per lane: the conversion, the scale and the accumulation cost
//! one instruction for sixteen rows, and no lanes are summed across.
//!
//! In the sixteen-row layout the quants already lie one row per lane: decode (one token) takes
//! them from memory with an `and` and a shift as it goes, a prefill gathers each super-block of
//! a group once ([`Tile`]) for all its tokens. The file layout (a matrix computed from the
//! mapped file) has its super-blocks transposed into tiles first, for prefills only; its decode
//! goes row by row (`x86::k`).
//!
//! The integers are those of the portable code (exact, in whatever order): `Q4_K`'s quants as
//! they are, its minimums taken off through the activations' 16-value sums; `Q6_K`'s quants
//! unsigned, their offset of 32 taken off through the same sums. Every f32 operation is the
//! portable code's, in its order: the same bits.

use std::arch::x86_64::*;

use super::wide::f16s;
use super::{dpwssd, f16_at, PREFETCH_AHEAD, X86};
use crate::kernels::portable::q4_k_scales;
use crate::kernels::wide::{
    group_block_bytes, q6k_slot, word_at, Q4K_DMIN_AT, Q4K_FIRST_WORD, Q4K_NIBBLES, Q6K_D_AT,
    Q6K_SCALES,
};
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

/// What a tile takes of one row's super-block besides its quants: its f16 scale (`Q4_K`: and
/// minimum) and its sub-block scales (`Q4_K`: the 12 packed bytes; `Q6_K`: 16 signed bytes).
#[derive(Clone, Copy, Default)]
struct RowScales {
    d: f32,
    dmin: f32,
    scales: [u8; 16],
}

/// A tile's scales, minimums and offsets, from its rows'.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn tile_scales(
    q4k: bool,
    rows: &[RowScales; ROWS],
) -> ([__m512i; 16], [__m512i; 8], __m512, __m512) {
    let mut sc = [[0i32; ROWS]; 16];
    let mut corr = [[0u32; ROWS]; 8];
    let pair = |lo: i16, hi: i16| lo as u16 as u32 | (hi as u16 as u32) << 16;
    for (i, row) in rows.iter().enumerate() {
        if q4k {
            let (s, m) = q4_k_scales(&row.scales[..12]);
            for sub in 0..8 {
                sc[sub][i] = s[sub] as i32;
                corr[sub][i] = pair(m[sub] as i16, m[sub] as i16);
            }
        } else {
            for (sc, &s) in sc.iter_mut().zip(&row.scales) {
                sc[i] = s as i8 as i32;
            }
            for (k, corr) in corr.iter_mut().enumerate() {
                let offset = |j: usize| -32 * row.scales[j] as i8 as i16;
                corr[i] = pair(offset(2 * k), offset(2 * k + 1));
            }
        }
    }
    let d: [f32; ROWS] = std::array::from_fn(|i| rows[i].d);
    let dmin: [f32; ROWS] = std::array::from_fn(|i| rows[i].dmin);
    // SAFETY: each array is sixteen 32-bit values, 64 bytes (AVX-512 F is this function's).
    unsafe {
        (
            std::array::from_fn(|s| _mm512_loadu_si512(sc[s].as_ptr().cast())),
            std::array::from_fn(|k| _mm512_loadu_si512(corr[k].as_ptr().cast())),
            _mm512_loadu_ps(d.as_ptr()),
            _mm512_loadu_ps(dmin.as_ptr()),
        )
    }
}

/// Super-block `b` of the sixteen rows `rows` (`row_bytes` each, the file's layout), unpacked.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn unpack(dtype: GgmlType, rows: &[u8], row_bytes: usize, b: usize) -> Tile {
    let size = dtype.type_size();
    // Each row's 256 values in order, a quarter per vector: `values[c][i]` is row `i`'s
    // values `64c..64c + 64`.
    let mut values = [[_mm512_setzero_si512(); ROWS]; 4];
    let mut scales = [RowScales::default(); ROWS];
    let low = _mm256_set1_epi8(0x0F);
    // SAFETY: `at..at + 32` lies within `block`, as the slicing checks.
    let bytes32 =
        |block: &[u8], at: usize| unsafe { _mm256_loadu_si256(block[at..at + 32].as_ptr().cast()) };
    let join = |a: __m256i, b: __m256i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
    for (i, row) in scales.iter_mut().enumerate() {
        let block = &rows[i * row_bytes + b * size..][..size];
        if dtype == GgmlType::Q4K {
            row.d = f16_at(block, 0);
            row.dmin = f16_at(block, 2);
            row.scales[..12].copy_from_slice(&block[4..16]);
            for (c, values) in values.iter_mut().enumerate() {
                // Sub-blocks 2c and 2c + 1: the low and high nibbles of the same 32 bytes.
                let packed = bytes32(block, 16 + 32 * c);
                let high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
                values[i] = join(_mm256_and_si256(packed, low), high);
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
            row.scales.copy_from_slice(&block[192..208]);
            row.d = f16_at(block, 208);
        }
    }
    let mut q = [_mm512_setzero_si512(); STEPS];
    for (values, q) in values.iter().zip(q.chunks_exact_mut(16)) {
        q.copy_from_slice(&transpose(values));
    }
    let (sc, corr, d, dmin) = tile_scales(dtype == GgmlType::Q4K, &scales);
    Tile {
        q,
        sc,
        corr,
        d,
        dmin,
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
        products(dtype, &tiles, acts, |first, ys| {
            for (t, y) in ys.iter().enumerate() {
                for (r, &y) in y.iter().enumerate() {
                    out[r * n + first + t] = y;
                }
            }
        });
    }
}

/// Every token's products with the sixteen rows whose super-blocks are `tiles`, [`TOKENS`] at
/// a time: `put(first, ys)` takes tokens `first..first + ys.len()`, row `i` at `ys[t][i]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn products(
    dtype: GgmlType,
    tiles: &[Tile],
    acts: &[Vec<KBlock>],
    mut put: impl FnMut(usize, &[[f32; ROWS]]),
) {
    let n = acts.len();
    let q4k = dtype == GgmlType::Q4K;
    let mut chunks = acts.chunks_exact(TOKENS);
    for (c, acts) in (&mut chunks).enumerate() {
        let acts: [&[KBlock]; TOKENS] = std::array::from_fn(|t| &acts[t][..]);
        let ys = if q4k {
            tokens::<true, TOKENS>(tiles, acts)
        } else {
            tokens::<false, TOKENS>(tiles, acts)
        };
        put(c * TOKENS, &ys);
    }
    let rest = chunks.remainder();
    let first = n - rest.len();
    match (q4k, rest) {
        (_, []) => {}
        (true, [a]) => put(first, &tokens::<true, 1>(tiles, [a])),
        (false, [a]) => put(first, &tokens::<false, 1>(tiles, [a])),
        (true, [a, b]) => put(first, &tokens::<true, 2>(tiles, [a, b])),
        (false, [a, b]) => put(first, &tokens::<false, 2>(tiles, [a, b])),
        (true, [a, b, c]) => put(first, &tokens::<true, 3>(tiles, [a, b, c])),
        (false, [a, b, c]) => put(first, &tokens::<false, 3>(tiles, [a, b, c])),
        (true, [a, b, c, d]) => put(first, &tokens::<true, 4>(tiles, [a, b, c, d])),
        (false, [a, b, c, d]) => put(first, &tokens::<false, 4>(tiles, [a, b, c, d])),
        (true, [a, b, c, d, e, ..]) => put(first, &tokens::<true, 5>(tiles, [a, b, c, d, e])),
        (false, [a, b, c, d, e, ..]) => put(first, &tokens::<false, 5>(tiles, [a, b, c, d, e])),
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

/// One group of the sixteen-row layout with every token: `out[t * ROWS + i]` for row `i` of
/// the group. The layout is chosen only where `cpu` runs AVX-512.
pub(in crate::kernels) fn group_matmul(
    cpu: X86,
    dtype: GgmlType,
    group: &[u8],
    acts: &[Vec<KBlock>],
    out: &mut [f32],
) {
    assert!(
        cpu.avx512(),
        "the wide layout is used only where AVX-512 VNNI is"
    );
    // SAFETY: `cpu` says this CPU runs AVX-512 F, BW and VNNI, with AVX2, FMA and F16C.
    unsafe {
        match (dtype, acts) {
            (GgmlType::Q4K, [act]) => one_token_q4k(group, act, out),
            (_, [act]) => one_token_q6k(group, act, out),
            _ => {
                let tiles: Vec<Tile> = group
                    .chunks_exact(group_block_bytes(dtype))
                    .map(|gb| gather(dtype, gb))
                    .collect();
                products(dtype, &tiles, acts, |first, ys| {
                    for (t, y) in ys.iter().enumerate() {
                        out[(first + t) * ROWS..][..ROWS].copy_from_slice(y);
                    }
                });
            }
        }
    }
}

/// Word `w` of a group-block's sixteen rows, row `i`'s in lane `i`; the line
/// [`PREFETCH_AHEAD`] bytes further asked for with the same hint as [`prefetch_ahead`]'s.
///
/// One request per line loaded, spread over the loop: a group-block of the K formats is 36 and
/// 52 lines, and asking for all of them at its start (as the 32-value formats' kernels do for
/// their 5 to 9) filled the core's queue of misses ahead of the loads (decode of a 4096 × 4096
/// `Q4_K` matrix from memory, one thread: 8–12 GB/s that way, 18 with no prefetch, 25 this way).
///
/// [`prefetch_ahead`]: super::prefetch_ahead
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn word(gb: &[u8], w: usize) -> __m512i {
    let bytes = &gb[word_at(w)..][..64];
    _mm_prefetch::<_MM_HINT_NTA>(bytes.as_ptr().wrapping_add(PREFETCH_AHEAD).cast());
    // SAFETY: `bytes` is 64 bytes.
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

/// Activation bytes `4g..4g + 4` of a super-block (four values of sub-block `g / 8`) as one
/// 32-bit value, to broadcast.
#[inline(always)]
fn act_four(a: &KBlock, g: usize) -> i32 {
    let q = &a.qs.as_flattened()[4 * g..4 * g + 4];
    i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
}

/// Byte `k` of each 32-bit lane, unsigned.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn byte_u(v: __m512i, k: usize) -> __m512i {
    let shifted = _mm512_srl_epi32(v, _mm_cvtsi32_si128(8 * k as i32));
    _mm512_and_si512(shifted, _mm512_set1_epi32(0xFF))
}

/// Byte `k` of each 32-bit lane, signed.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn byte_i(v: __m512i, k: usize) -> __m512i {
    let top = _mm512_sll_epi32(v, _mm_cvtsi32_si128(24 - 8 * k as i32));
    _mm512_srai_epi32::<24>(top)
}

/// A `Q4_K` group-block's sub-block scales and minimums, four a vector: bytes `0..4` of lane
/// `i` are row `i`'s scales (or minimums) `0..4`, then `4..8` — the portable
/// [`q4_k_scales`], sixteen rows at once.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q4k_scales(gb: &[u8]) -> ([__m512i; 2], [__m512i; 2]) {
    let w = Q4K_FIRST_WORD;
    let (first, second, third) = (word(gb, w), word(gb, w + 1), word(gb, w + 2));
    let six = _mm512_set1_epi8(0x3f);
    let nibble = _mm512_set1_epi8(0x0f);
    let two = _mm512_set1_epi8(0x03);
    let top = |x: __m512i| _mm512_slli_epi32::<4>(_mm512_and_si512(_mm512_srli_epi32::<6>(x), two));
    (
        [
            _mm512_and_si512(first, six),
            _mm512_or_si512(_mm512_and_si512(third, nibble), top(first)),
        ],
        [
            _mm512_and_si512(second, six),
            _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi32::<4>(third), nibble),
                top(second),
            ),
        ],
    )
}

/// Steps `8c + j` and `8(c + 1) + j` of a `Q4_K` group-block: sub-blocks `2c` and `2c + 1`'s
/// values `4j..4j + 4`, unsigned, one row per lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q4k_quants(gb: &[u8], c: usize, j: usize) -> [__m512i; 2] {
    let low = _mm512_set1_epi8(0x0F);
    let q = word(gb, Q4K_NIBBLES + 8 * c + j);
    [
        _mm512_and_si512(q, low),
        _mm512_and_si512(_mm512_srli_epi32::<4>(q), low),
    ]
}

/// Step `j` of each of a `Q6_K` group-block's four 32-value chunks `4 half..4 half + 4`:
/// their values `4j..4j + 4`, unsigned (the offset of 32 not taken off), one row per lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn q6k_quants(gb: &[u8], half: usize, j: usize) -> [__m512i; 4] {
    // `ql` is words 0..32, `qh` words 32..48: as in the file's block, chunk `4 half + part`
    // takes the low (part < 2) or high nibbles of `ql` bytes `64 half + 32 (part % 2)..` and
    // bits `2 part..` of `qh` bytes `32 half..`.
    let (l0, l1, h) = (
        word(gb, q6k_slot(16 * half + j)),
        word(gb, q6k_slot(16 * half + 8 + j)),
        word(gb, q6k_slot(32 + 8 * half + j)),
    );
    let (low, high) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
    let join = |l: __m512i, h: __m512i| {
        _mm512_or_si512(_mm512_and_si512(l, low), _mm512_and_si512(h, high))
    };
    [
        join(l0, _mm512_slli_epi32::<4>(h)),
        join(l1, _mm512_slli_epi32::<2>(h)),
        join(_mm512_srli_epi32::<4>(l0), h),
        join(_mm512_srli_epi32::<4>(l1), _mm512_srli_epi32::<2>(h)),
    ]
}

/// One super-block of a group-block gathered for a prefill's tokens.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn gather(dtype: GgmlType, gb: &[u8]) -> Tile {
    let mut q = [_mm512_setzero_si512(); STEPS];
    let mut scales = [RowScales::default(); ROWS];
    if dtype == GgmlType::Q4K {
        for c in 0..4 {
            for j in 0..8 {
                let [lo, hi] = q4k_quants(gb, c, j);
                q[8 * (2 * c) + j] = lo;
                q[8 * (2 * c + 1) + j] = hi;
            }
        }
        for (i, row) in scales.iter_mut().enumerate() {
            row.d = f16_at(gb, 2 * i);
            row.dmin = f16_at(gb, Q4K_DMIN_AT + 2 * i);
            for w in 0..3 {
                let at = word_at(Q4K_FIRST_WORD + w) + 4 * i;
                row.scales[4 * w..4 * w + 4].copy_from_slice(&gb[at..at + 4]);
            }
        }
    } else {
        for half in 0..2 {
            for j in 0..8 {
                for (part, v) in q6k_quants(gb, half, j).into_iter().enumerate() {
                    q[8 * (4 * half + part) + j] = v;
                }
            }
        }
        for (i, row) in scales.iter_mut().enumerate() {
            row.d = f16_at(gb, Q6K_D_AT + 2 * i);
            for w in 0..4 {
                let at = word_at(Q6K_SCALES + w) + 4 * i;
                row.scales[4 * w..4 * w + 4].copy_from_slice(&gb[at..at + 4]);
            }
        }
    }
    let (sc, corr, d, dmin) = tile_scales(dtype == GgmlType::Q4K, &scales);
    Tile {
        q,
        sc,
        corr,
        d,
        dmin,
    }
}

/// `Q4_K`, one token (decode): each group-block's quants taken from memory as the loop goes,
/// the accumulators in registers; the integers [`tokens`]'s, the f32 operations its.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn one_token_q4k(group: &[u8], act: &[KBlock], out: &mut [f32]) {
    let zero = _mm512_setzero_si512();
    let (mut acc, mut acc_min) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    // Two of the activations' 16-value sums (each sub-block's) as a pair of i16.
    let pair = |x: i32, y: i32| (x as i16 as u16 as u32 | (y as i16 as u16 as u32) << 16) as i32;
    for (gb, a) in group
        .chunks_exact(group_block_bytes(GgmlType::Q4K))
        .zip(act)
    {
        let (sc, m) = q4k_scales(gb);
        let mut total = zero;
        for c in 0..4 {
            let (mut lo, mut hi) = (zero, zero);
            for j in 0..8 {
                let [q_lo, q_hi] = q4k_quants(gb, c, j);
                let y_lo = _mm512_set1_epi32(act_four(a, 8 * (2 * c) + j));
                let y_hi = _mm512_set1_epi32(act_four(a, 8 * (2 * c + 1) + j));
                lo = _mm512_dpbusd_epi32(lo, q_lo, y_lo);
                hi = _mm512_dpbusd_epi32(hi, q_hi, y_hi);
            }
            // Sub-blocks 2c and 2c + 1: scale bytes 2 (c % 2) and 2 (c % 2) + 1 of vector c / 2.
            let scales = sc[c / 2];
            let k = 2 * (c % 2);
            total = _mm512_add_epi32(total, _mm512_mullo_epi32(lo, byte_u(scales, k)));
            total = _mm512_add_epi32(total, _mm512_mullo_epi32(hi, byte_u(scales, k + 1)));
        }
        // Σ m[s] · (sums 2s and 2s + 1): the minimums as i16, those of sub-blocks 4h and
        // 4h + 2 in one lane's pair, 4h + 1 and 4h + 3 in another's.
        let sub = |s: usize| a.bsums[2 * s] as i32 + a.bsums[2 * s + 1] as i32;
        let mut mins = zero;
        for (h, m) in m.into_iter().enumerate() {
            let (s, even) = (4 * h, _mm512_set1_epi32(0x00FF_00FF));
            let y = _mm512_set1_epi32(pair(sub(s), sub(s + 2)));
            mins = dpwssd(mins, _mm512_and_si512(m, even), y);
            let y = _mm512_set1_epi32(pair(sub(s + 1), sub(s + 3)));
            mins = dpwssd(mins, _mm512_srli_epi16::<8>(m), y);
        }
        let ad = _mm512_set1_ps(a.d);
        let d = _mm512_mul_ps(f16s(gb), ad);
        let dmin = _mm512_mul_ps(f16s(&gb[Q4K_DMIN_AT..]), ad);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), d, acc);
        acc_min = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mins), dmin, acc_min);
    }
    // SAFETY: `out` holds ROWS f32.
    unsafe { _mm512_storeu_ps(out[..ROWS].as_mut_ptr(), _mm512_sub_ps(acc, acc_min)) }
}

/// `Q6_K`, one token (decode), as [`one_token_q4k`]: each 16-value sum takes its offset off
/// (32 × the activations' sum) before its scale multiplies it.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn one_token_q6k(group: &[u8], act: &[KBlock], out: &mut [f32]) {
    let zero = _mm512_setzero_si512();
    let mut acc = _mm512_setzero_ps();
    for (gb, a) in group
        .chunks_exact(group_block_bytes(GgmlType::Q6K))
        .zip(act)
    {
        // The sixteen rows' scales, four 16-value groups' a word.
        let scales: [__m512i; 4] = std::array::from_fn(|m| word(gb, Q6K_SCALES + m));
        let mut total = zero;
        for half in 0..2 {
            // Chunk 4 half + part's two 16-value sums.
            let mut sums = [[zero; 2]; 4];
            for j in 0..8 {
                for (part, q) in q6k_quants(gb, half, j).into_iter().enumerate() {
                    let y = _mm512_set1_epi32(act_four(a, 8 * (4 * half + part) + j));
                    let sum = &mut sums[part][j / 4];
                    *sum = _mm512_dpbusd_epi32(*sum, q, y);
                }
            }
            for (part, sums) in sums.into_iter().enumerate() {
                for (k, sum) in sums.into_iter().enumerate() {
                    let s = 2 * (4 * half + part) + k;
                    let offset = _mm512_set1_epi32(32 * a.bsums[s] as i32);
                    let scale = byte_i(scales[s / 4], s % 4);
                    let sum = _mm512_sub_epi32(sum, offset);
                    total = _mm512_add_epi32(total, _mm512_mullo_epi32(sum, scale));
                }
            }
        }
        let d = _mm512_mul_ps(f16s(&gb[Q6K_D_AT..]), _mm512_set1_ps(a.d));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), d, acc);
    }
    // SAFETY: `out` holds ROWS f32.
    unsafe { _mm512_storeu_ps(out[..ROWS].as_mut_ptr(), acc) }
}
