//! The portable kernels, which define the bits: activation quantization, the file layout's block
//! dot products, the interleaved layout's group products, and attention's scores and value sums.
//! Every SIMD path computes what these compute, to the bit, and the tests hold each one against
//! them.
//!
//! They are written for clarity over speed, but they run too: on a CPU without the SIMD paths,
//! and as the tests' reference.

use half::f16;

use super::interleaved::{self, by_lanes, nibbles_at, MASKS_AT, NIBBLES, ROWS, UNPACKED};
use super::{ActBlock, KBlock, LANES, QK, QK_K};
use crate::kv::{LayerKv, KEY_BLOCK};
use crate::quant::GgmlType;

/// Quantizes one activation row (`len % 32 == 0`) into `Q8_0`/`Q8_1` blocks.
pub(super) fn quantize_row(x: &[f32], out: &mut Vec<ActBlock>) {
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

/// Quantizes one activation row (`len % 256 == 0`) into `Q8_K` blocks. The scale maps each
/// block's largest magnitude to exactly -127 (its sign folded into the scale); rounding is to
/// nearest, ties to even.
pub(super) fn quantize_row_k(x: &[f32], out: &mut Vec<KBlock>) {
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
pub(super) fn hsum(acc: [f32; LANES]) -> f32 {
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
pub(super) fn lane_sums(w: &[i32; QK], a: &[i8; QK]) -> [i32; LANES] {
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
pub(super) fn dot_q4_1(row: &[u8], act: &[ActBlock]) -> f32 {
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
pub(super) fn dot_q4_0(row: &[u8], act: &[ActBlock]) -> f32 {
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
pub(super) fn dot_q5_0(row: &[u8], act: &[ActBlock]) -> f32 {
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
pub(super) fn dot_q8_0(row: &[u8], act: &[ActBlock]) -> f32 {
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
pub(super) const Q4_K_SIZE: usize = 144;
/// Bytes of a `Q6_K` super-block: 128 bytes of low 4 bits, 64 of high 2 bits, 16 signed 8-bit
/// sub-block scales, then the f16 scale.
pub(super) const Q6_K_SIZE: usize = 210;

/// The eight 6-bit scales and eight 6-bit minimums of a `Q4_K` super-block: sub-blocks 0..4 keep
/// theirs in the low six bits of bytes 0..4 (scales) and 4..8 (minimums); sub-blocks 4..8 keep
/// their low four bits in the nibbles of bytes 8..12 and their top two in the spare bits above.
#[inline(always)]
pub(super) fn q4_k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
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
pub(super) fn q4_k_min_sum(m: &[u8; 8], a: &KBlock) -> i32 {
    (0..8)
        .map(|s| m[s] as i32 * (a.bsums[2 * s] as i32 + a.bsums[2 * s + 1] as i32))
        .sum()
}

/// In each 64-value group of a `Q4_K` super-block, values 0..32 are the low nibbles of 32 bytes
/// and 32..64 the high nibbles; sub-block `s` (32 values) has scale `sc[s]` and minimum `m[s]`.
#[inline(always)]
pub(super) fn dot_q4_k(row: &[u8], act: &[KBlock]) -> f32 {
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
pub(super) fn dot_q6_k(row: &[u8], act: &[KBlock]) -> f32 {
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

/// Dots every row of `rows` (`row_bytes` each) with every token's activations by `dot`, row by
/// row: `out[r * n + t]`.
#[inline(always)]
pub(super) fn each_row<A>(
    rows: &[u8],
    row_bytes: usize,
    acts: &[A],
    out: &mut [f32],
    dot: impl Fn(&[u8], &A) -> f32,
) {
    let n = acts.len();
    for (row, ys) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        for (y, act) in ys.iter_mut().zip(acts) {
            *y = dot(row, act);
        }
    }
}

/// Dots every row of `rows` in the file's layout with every token's activations:
/// `out[r * n + t]`.
pub(super) fn dot_rows(
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    each_row(rows, row_bytes, acts, out, |row, act| match dtype {
        GgmlType::Q4_0 => dot_q4_0(row, act),
        GgmlType::Q4_1 => dot_q4_1(row, act),
        GgmlType::Q5_0 => dot_q5_0(row, act),
        _ => dot_q8_0(row, act),
    })
}

/// [`dot_rows`] for the K formats.
pub(super) fn dot_rows_k(
    dtype: GgmlType,
    rows: &[u8],
    row_bytes: usize,
    acts: &[Vec<KBlock>],
    out: &mut [f32],
) {
    each_row(rows, row_bytes, acts, out, |row, act| match dtype {
        GgmlType::Q4K => dot_q4_k(row, act),
        _ => dot_q6_k(row, act),
    })
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
    std::array::from_fn(|i| f16_at(bytes, 2 * i))
}

/// One group of the interleaved layout's products with every token: `out[t * ROWS + i]` for row
/// `i` of the group. One row at a time, each integer lane as the file layout's kernels group it.
pub(super) fn interleaved_group_matmul(
    dtype: GgmlType,
    group: &[u8],
    acts: &[Vec<ActBlock>],
    out: &mut [f32],
) {
    let gb_bytes = interleaved::group_block_bytes(dtype);
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
                    let dot = lanes.iter().map(|lane| lane[i]).sum::<i32>()
                        - interleaved::offset(dtype) * a.sum;
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

/// Attention's scores of `q` against the key blocks from `start` of KV head `head`, one block
/// of keys per `KEY_BLOCK` values of `out`: each one chain over the dimensions.
pub(super) fn score_blocks(q: &[f32], kv: &LayerKv, head: usize, start: usize, out: &mut [f32]) {
    let head_dim = q.len();
    for (b, out) in out.chunks_exact_mut(KEY_BLOCK).enumerate() {
        let keys = kv.key_block(start + b, head, head_dim);
        for (lane, out) in out.iter_mut().enumerate() {
            *out = q.iter().enumerate().fold(0.0f32, |acc, (d, &q)| {
                acc + q * keys[d * KEY_BLOCK + lane].to_f32()
            });
        }
    }
}

/// Attention's `acc = v · weight + acc · rescale`, rounded to f16 when `narrow`.
pub(super) fn accumulate(acc: &mut [f32], v: &[f16], rescale: f32, weight: f32, narrow: bool) {
    for (a, v) in acc.iter_mut().zip(v) {
        let x = v.to_f32() * weight + *a * rescale;
        *a = if narrow { f16::from_f32(x).to_f32() } else { x };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_k_quantization_maps_the_largest_magnitude_to_minus_127() {
        let mut x: Vec<f32> = (0..QK_K).map(|i| (i as f32 - 100.0) / 50.0).collect();
        x[7] = -4.0;
        let mut q = Vec::new();
        quantize_row_k(&x, &mut q);
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
        quantize_row_k(&[0.0; QK_K], &mut zeros);
        assert_eq!((zeros[0].d, zeros[0].bsums), (0.0, [0; 16]));
    }
}
