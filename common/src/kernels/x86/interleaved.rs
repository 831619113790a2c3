//! The interleaved layout's group products (see [`crate::kernels::interleaved`]) in AVX-512
//! VNNI, sixteen lanes and one instruction per four byte products, or in AVX2, rows `0..4` and
//! `4..8` apart. Quants are unsigned: `Q8_0`'s offset by 128 (AVX2 moves their sign onto the
//! activations instead, as its 16-bit pair sums would overflow).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::{pass_accumulators, prefetch_ahead, TOKENS_PER_PASS, X86};
use crate::kernels::interleaved::formats::{format, lanes, Q4_0, Q4_1, Q5_0, Q8_0};
use crate::kernels::interleaved::{
    group_block_bytes, nibbles_at, MASKS_AT, NIBBLES, ROWS, UNPACKED,
};
use crate::kernels::ActBlock;
use crate::quant::GgmlType;

/// One group's products with every token: `out[t * ROWS + i]` for row `i` of the group, on
/// AVX-512 where `cpu` runs it.
pub(in crate::kernels) fn group_matmul(
    cpu: X86,
    dtype: GgmlType,
    group: &[u8],
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    if cpu.avx512() {
        // SAFETY: `cpu` says this CPU runs AVX-512 F, BW and VNNI, with AVX2, FMA and F16C.
        unsafe {
            match dtype {
                GgmlType::Q4_0 => avx512::group_matmul::<Q4_0>(group, acts, out),
                GgmlType::Q4_1 => avx512::group_matmul::<Q4_1>(group, acts, out),
                GgmlType::Q5_0 => avx512::group_matmul::<Q5_0>(group, acts, out),
                _ => avx512::group_matmul::<Q8_0>(group, acts, out),
            }
        }
    } else {
        // SAFETY: an `X86` is made only where the CPU runs AVX2, FMA and F16C.
        unsafe {
            match dtype {
                GgmlType::Q4_0 => avx2::group_matmul::<Q4_0>(group, acts, out),
                GgmlType::Q4_1 => avx2::group_matmul::<Q4_1>(group, acts, out),
                GgmlType::Q5_0 => avx2::group_matmul::<Q5_0>(group, acts, out),
                _ => avx2::group_matmul::<Q8_0>(group, acts, out),
            }
        }
    }
}

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
    pub(super) fn group_matmul<const F: u8>(group: &[u8], acts: &[Vec<ActBlock>], out: &mut [f32]) {
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
        if lanes(F) {
            return group_matmul_tiled::<F>(group, acts, out);
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

    /// Tokens whose accumulators (four vectors each) a several-token product of the
    /// formats by lanes keeps in registers.
    const TILE: usize = 4;

    /// A group-block unpacked for every token: its quants and its rows' scales, each twice.
    #[derive(Clone, Copy)]
    struct Unpacked {
        q: [__m512i; 4],
        dd: __m512,
    }

    /// Several tokens of a format by lanes: the group's blocks unpacked once, then
    /// [`TILE`] tokens at a time dotted with all of them, their accumulators in registers.
    /// Each token's operations are [`Acc::add`]'s, in its order: the same bits.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn group_matmul_tiled<const F: u8>(group: &[u8], acts: &[Vec<ActBlock>], out: &mut [f32]) {
        let twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let blocks: Vec<Unpacked> = group
            .chunks_exact(group_block_bytes(format(F)))
            .map(|gb| Unpacked {
                q: unpack::<F>(gb),
                dd: _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(f16s(gb))),
            })
            .collect();
        let mut tiles = acts.chunks_exact(TILE);
        let mut outs = out.chunks_exact_mut(TILE * ROWS);
        for (acts, out) in (&mut tiles).zip(&mut outs) {
            lanes_tile::<F, TILE>(&blocks, acts, out);
        }
        let (acts, out) = (tiles.remainder(), outs.into_remainder());
        match acts.len() {
            0 => {}
            1 => lanes_tile::<F, 1>(&blocks, acts, out),
            2 => lanes_tile::<F, 2>(&blocks, acts, out),
            _ => lanes_tile::<F, 3>(&blocks, acts, out),
        }
    }

    /// `T` tokens' products with a group's unpacked blocks, into `out[t * ROWS..]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn lanes_tile<const F: u8, const T: usize>(
        blocks: &[Unpacked],
        acts: &[Vec<ActBlock>],
        out: &mut [f32],
    ) {
        let acts: [&[ActBlock]; T] = std::array::from_fn(|t| &acts[t][..blocks.len()]);
        let mut acc = [[_mm512_setzero_ps(); 4]; T];
        for (b, u) in blocks.iter().enumerate() {
            for (acc, act) in acc.iter_mut().zip(&acts) {
                let a = &act[b];
                let scale = _mm512_mul_ps(u.dd, _mm512_set1_ps(a.d));
                for (k, (q, acc)) in u.q.iter().zip(acc).enumerate() {
                    let bias = _mm512_set1_epi64(bias_pair(a, k));
                    let dot = _mm512_dpbusd_epi32(bias, *q, _mm512_set1_epi64(act_pair(a, k)));
                    *acc = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), *acc);
                }
            }
        }
        let zero = _mm256_setzero_ps();
        for (lanes, ys) in acc.into_iter().zip(out.chunks_exact_mut(ROWS)) {
            let acc = Acc {
                lanes,
                rows: zero,
                summs: zero,
            };
            acc.store::<F>(ys);
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
                let v =
                    unsafe { _mm256_loadu_si256(nibbles[64 * p + 32 * half..].as_ptr().cast()) };
                q[p][half] = _mm256_and_si256(v, low);
                q[2 + p][half] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            }
        }
        if F == Q5_0 {
            // Byte 8j + t of a vector takes bit t of the mask's byte j, its row's.
            let spread = _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
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
            let acts: [__m256i; 4] = std::array::from_fn(|k| _mm256_set1_epi64x(act_pair(a, k)));
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
    pub(super) fn group_matmul<const F: u8>(group: &[u8], acts: &[Vec<ActBlock>], out: &mut [f32]) {
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
