//! ggml tensor types: block geometry of every format Realm reads, and the bridge from raw GGUF
//! bytes to candle's quantized tensors (which keep the weights quantized in memory).
//!
//! candle reinterprets the bytes it is given as its block structs in place, without checking their
//! length or alignment, so [`qtensor_from_bytes`] checks both before handing bytes over.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo};

/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Alignment candle's block structs may need: their widest fields are `f32` scales (and `f32`
/// elements), none wider than 8 bytes. Misaligned input is copied to an aligned buffer.
const BLOCK_ALIGN: usize = 8;

/// The ggml tensor types Realm can load. Ids are ggml's `enum ggml_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The type's id in GGUF files (`enum ggml_type`).
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Q8K => 15,
            Self::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K | Self::Q8K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Q8K => 292,
        }
    }

    /// Bytes of a tensor of this type with `dims` (ggml order), or why no such tensor can exist:
    /// no or a zero dimension, element or byte counts that overflow, rows that are not a whole
    /// number of blocks.
    pub fn checked_size(self, dims: &[u64]) -> std::result::Result<u64, String> {
        let Some(&row) = dims.first() else {
            return Err("no dimensions".to_string());
        };
        let mut elements: u64 = 1;
        for &d in dims {
            if d == 0 {
                return Err(format!("zero dimension in {dims:?}"));
            }
            elements = elements
                .checked_mul(d)
                .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
        }
        let block = self.block_size() as u64;
        if row % block != 0 {
            return Err(format!(
                "row of {row} elements is not a whole number of {self:?} blocks of {block}"
            ));
        }
        (elements / block)
            .checked_mul(self.type_size() as u64)
            .ok_or_else(|| format!("byte size of dimensions {dims:?} overflows"))
    }

    fn candle(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q8_1 => GgmlDType::Q8_1,
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3K => GgmlDType::Q3K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q8K => GgmlDType::Q8K,
        }
    }
}

/// Builds a quantized tensor from raw ggml bytes. `dims` are in ggml order (innermost first) and
/// `bytes` must hold exactly the tensor. Q8_1 and Q8_K (ggml's activation formats) are refused.
pub fn qtensor_from_bytes(
    dtype: GgmlType,
    bytes: &[u8],
    dims: &[u64],
    device: &Device,
) -> Result<QTensor> {
    if matches!(dtype, GgmlType::Q8_1 | GgmlType::Q8K) {
        return Err(Error::Unsupported(format!(
            "{dtype:?} weights (an activation format, not a weight format)"
        )));
    }
    if dims.len() > MAX_DIMS {
        return Err(Error::InvalidArgument(format!(
            "tensor dimensions {dims:?}: more than {MAX_DIMS}"
        )));
    }
    let size = dtype
        .checked_size(dims)
        .map_err(|problem| Error::InvalidArgument(format!("{dtype:?} tensor: {problem}")))?;
    if bytes.len() as u64 != size {
        return Err(Error::InvalidArgument(format!(
            "{dtype:?} tensor of dimensions {dims:?} takes {size} bytes, got {}",
            bytes.len()
        )));
    }
    // candle wants the outermost dimension first.
    let shape = dims
        .iter()
        .rev()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<usize>, _>>()
        .map_err(|_| {
            Error::InvalidArgument(format!("tensor dimensions {dims:?} do not fit in memory"))
        })?;
    let copy;
    let bytes = if bytes.as_ptr().addr().is_multiple_of(BLOCK_ALIGN) {
        bytes
    } else {
        copy = AlignedCopy::new(bytes);
        copy.bytes()
    };
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype.candle(),
        bytes,
        shape,
        device,
    )?)
}

/// A copy of some bytes starting at a [`BLOCK_ALIGN`]-aligned address.
struct AlignedCopy {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedCopy {
    fn new(bytes: &[u8]) -> Self {
        let mut buf = vec![0u8; bytes.len() + BLOCK_ALIGN];
        // Distance from the allocation to the next aligned address: less than BLOCK_ALIGN.
        let start = buf.as_ptr().addr().wrapping_neg() % BLOCK_ALIGN;
        buf[start..start + bytes.len()].copy_from_slice(bytes);
        Self {
            buf,
            start,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// Loads one tensor of a GGUF file, still quantized, into host memory.
pub fn load_qtensor(file: &GgufFile, info: &TensorInfo) -> Result<QTensor> {
    let bytes = file.tensor_bytes(info)?;
    qtensor_from_bytes(info.dtype, bytes, &info.dims, &Device::Cpu).map_err(|e| Error::Tensor {
        name: info.name.clone(),
        problem: e.to_string(),
    })
}

/// The values of one tensor of a GGUF file, dequantized to f32, innermost dimension first.
pub fn load_f32(file: &GgufFile, info: &TensorInfo) -> Result<Vec<f32>> {
    let t = load_qtensor(file, info)?.dequantize(&Device::Cpu)?;
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    //! Blocks are built by hand from ggml's block layouts (`ggml-common.h`), and their expected
    //! values are written from the logical quants and scales that went in, not from any decoder.

    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Module, Tensor};
    use rand::{Rng, SeedableRng};

    fn f16(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_le_bytes()
    }

    fn dequantize(dtype: GgmlType, bytes: &[u8], dims: &[u64]) -> Vec<f32> {
        qtensor_from_bytes(dtype, bytes, dims, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    fn assert_same(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g == w || (g - w).abs() <= 1e-6 * w.abs(),
                "element {i}: got {g}, want {w}"
            );
        }
    }

    /// Checks both the decoding and the block geometry used to size the input.
    fn check(dtype: GgmlType, bytes: &[u8], dims: &[u64], want: &[f32]) {
        assert_eq!(dtype.checked_size(dims), Ok(bytes.len() as u64));
        assert_same(&dequantize(dtype, bytes, dims), want);
        // Input at an odd address decodes the same: it is copied, not reinterpreted in place.
        let mut buf = vec![0u8; bytes.len() + BLOCK_ALIGN];
        let at = (1 + BLOCK_ALIGN - buf.as_ptr().addr() % BLOCK_ALIGN) % BLOCK_ALIGN;
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        let odd = &buf[at..at + bytes.len()];
        assert_eq!(odd.as_ptr().addr() % 2, 1);
        assert_same(&dequantize(dtype, odd, dims), want);
    }

    #[test]
    fn f32_f16_bf16() {
        let values = [1.5f32, -2.0, 0.0, 3.25, 1e-3, -7e5, 42.0, 0.1];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        check(GgmlType::F32, &bytes, &[4, 2], &values);

        let bits: [u16; 6] = [0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0x8000];
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let want = [1.0, -2.0, 0.5, 65504.0, 5.960_464_5e-8, -0.0];
        check(GgmlType::F16, &bytes, &[6], &want);

        let bits: [u16; 6] = [0x3f80, 0xc040, 0x3f00, 0x4049, 0x7f7f, 0x0000];
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let want = [1.0, -3.0, 0.5, 3.140625, 3.389_531_4e38, 0.0];
        check(GgmlType::BF16, &bytes, &[3, 2], &want);
    }

    /// The 16 quant bytes of a 32-element block of 4-bit quants. ggml keeps elements 0..16 in
    /// the low nibbles and 16..32 in the high ones; here element `j` is `j` and element `16 + j`
    /// is `15 - j`.
    fn ramp_nibbles() -> Vec<u8> {
        (0..16u8).map(|j| j | ((15 - j) << 4)).collect()
    }

    /// The 4-bit quant of element `i` in [`ramp_nibbles`].
    fn ramp(i: usize) -> f32 {
        (if i < 16 { i } else { 31 - i }) as f32
    }

    #[test]
    fn q4_0() {
        // Block 0: d = 0.5, quants j | (15 - j) << 4. Block 1: d = -0.25, every byte 0x5a.
        let mut bytes = f16(0.5).to_vec();
        bytes.extend(ramp_nibbles());
        bytes.extend(f16(-0.25));
        bytes.extend([0x5a; 16]);
        let mut want: Vec<f32> = (0..32).map(|i| 0.5 * (ramp(i) - 8.0)).collect();
        want.extend((0..32).map(|i| -0.25 * (if i < 16 { 0xa - 8 } else { 0x5 - 8 }) as f32));
        assert_eq!(&want[..2], [-4.0, -3.5]);
        assert_eq!(&want[30..34], [-3.5, -4.0, -0.5, -0.5]);
        assert_eq!(want[63], 0.75);
        check(GgmlType::Q4_0, &bytes, &[64], &want);
    }

    #[test]
    fn q4_1() {
        let mut bytes = f16(0.25).to_vec();
        bytes.extend(f16(-1.0));
        bytes.extend(ramp_nibbles());
        let want: Vec<f32> = (0..32).map(|i| 0.25 * ramp(i) - 1.0).collect();
        assert_eq!(
            [want[0], want[15], want[16], want[31]],
            [-1.0, 2.75, 2.75, -1.0]
        );
        check(GgmlType::Q4_1, &bytes, &[32], &want);
    }

    /// Bit `i` of `qh` is the fifth bit of element `i`.
    const QH: u32 = 0xf0f0_a5a5;
    fn fifth_bit(i: usize) -> f32 {
        (16 * ((QH >> i) & 1)) as f32
    }

    #[test]
    fn q5_0() {
        let mut bytes = f16(0.5).to_vec();
        bytes.extend(QH.to_le_bytes());
        bytes.extend(ramp_nibbles());
        let want: Vec<f32> = (0..32)
            .map(|i| 0.5 * (ramp(i) + fifth_bit(i) - 16.0))
            .collect();
        // Element 0: nibble 0, fifth bit set: 0.5 * (16 - 16). Element 31: nibble 0, bit set.
        assert_eq!([want[0], want[1], want[31]], [0.0, -7.5, 0.0]);
        check(GgmlType::Q5_0, &bytes, &[32], &want);
    }

    #[test]
    fn q5_1() {
        let mut bytes = f16(0.25).to_vec();
        bytes.extend(f16(0.5));
        bytes.extend(QH.to_le_bytes());
        bytes.extend(ramp_nibbles());
        let want: Vec<f32> = (0..32)
            .map(|i| 0.25 * (ramp(i) + fifth_bit(i)) + 0.5)
            .collect();
        assert_eq!([want[0], want[1], want[30]], [4.5, 0.75, 4.75]);
        check(GgmlType::Q5_1, &bytes, &[32], &want);
    }

    #[test]
    fn q8_0() {
        let first: Vec<i8> = (0..32).map(|j| (4 * j - 64) as i8).collect();
        let second: Vec<i8> = (0..32).map(|j| (127 - 8 * j) as i8).collect();
        let mut bytes = f16(0.125).to_vec();
        bytes.extend(first.iter().map(|&q| q as u8));
        bytes.extend(f16(-2.0));
        bytes.extend(second.iter().map(|&q| q as u8));
        let mut want: Vec<f32> = first.iter().map(|&q| 0.125 * q as f32).collect();
        want.extend(second.iter().map(|&q| -2.0 * q as f32));
        assert_eq!(
            [want[0], want[31], want[32], want[63]],
            [-8.0, 7.5, -254.0, -2.0 * -121.0]
        );
        check(GgmlType::Q8_0, &bytes, &[32, 2], &want);
    }

    /// A deterministic, irregular 0..n pattern for logical quants and scales.
    fn pattern(i: usize, salt: usize, n: usize) -> usize {
        (i * 7 + i / 5 + salt * 13) % n
    }

    /// Packs the 2-bit fields of a 256-element super-block the way Q2_K and Q3_K do: element
    /// `128h + 32j + 16s + l` sits in byte `32h + 16s + l` at bit `2j`.
    fn pack_2bit(q: &[usize]) -> [u8; 64] {
        let mut qs = [0u8; 64];
        for (i, &v) in q.iter().enumerate() {
            let (h, j, s, l) = (i / 128, (i % 128) / 32, (i % 32) / 16, i % 16);
            qs[32 * h + 16 * s + l] |= (v as u8) << (2 * j);
        }
        qs
    }

    fn q2k_block(d: f32, dmin: f32, salt: usize) -> (Vec<u8>, Vec<f32>) {
        let q: Vec<usize> = (0..256).map(|i| pattern(i, salt, 4)).collect();
        let sc: Vec<usize> = (0..16).map(|k| pattern(k, salt + 1, 16)).collect();
        let mn: Vec<usize> = (0..16).map(|k| pattern(k, salt + 2, 16)).collect();
        let mut bytes: Vec<u8> = (0..16).map(|k| (sc[k] | mn[k] << 4) as u8).collect();
        bytes.extend(pack_2bit(&q));
        bytes.extend(f16(d));
        bytes.extend(f16(dmin));
        let want = (0..256)
            .map(|i| d * (sc[i / 16] * q[i]) as f32 - dmin * mn[i / 16] as f32)
            .collect();
        (bytes, want)
    }

    fn q3k_block(d: f32, salt: usize) -> (Vec<u8>, Vec<f32>) {
        // Quants in -4..4: two low bits (+4 if negative) in `qs`, "not negative" in `hmask`.
        let q: Vec<i32> = (0..256).map(|i| pattern(i, salt, 8) as i32 - 4).collect();
        // Scales in -32..32, stored as 6-bit values biased by 32.
        let sc: Vec<i32> = (0..16)
            .map(|k| pattern(k, salt + 1, 64) as i32 - 32)
            .collect();
        let mut hmask = [0u8; 32];
        for (i, &v) in q.iter().enumerate() {
            let (h, j, s, l) = (i / 128, (i % 128) / 32, (i % 32) / 16, i % 16);
            if v >= 0 {
                hmask[16 * s + l] |= 1 << (4 * h + j);
            }
        }
        let low: Vec<usize> = q.iter().map(|&v| (v & 3) as usize).collect();
        // 16 six-bit scales in 12 bytes: low nibbles of 0..8 then high nibbles of 0..8 carry
        // scales 0..8 and 8..16; bytes 8..12 carry the top two bits, scale k at byte 8 + k % 4,
        // bit 2 * (k / 4).
        let mut scales = [0u8; 12];
        for (k, &s) in sc.iter().enumerate() {
            let s = (s + 32) as u8;
            scales[k % 8] |= (s & 0xf) << (4 * (k / 8));
            scales[8 + k % 4] |= (s >> 4) << (2 * (k / 4));
        }
        let mut bytes = hmask.to_vec();
        bytes.extend(pack_2bit(&low));
        bytes.extend(scales);
        bytes.extend(f16(d));
        let want = (0..256).map(|i| d * (sc[i / 16] * q[i]) as f32).collect();
        (bytes, want)
    }

    /// Eight 6-bit scales and eight 6-bit mins in 12 bytes, as Q4_K and Q5_K store them.
    fn pack_scales_mins(sc: &[u8], mn: &[u8]) -> [u8; 12] {
        let mut out = [0u8; 12];
        for j in 0..4 {
            out[j] = sc[j] | (sc[j + 4] >> 4) << 6;
            out[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6;
            out[j + 8] = (sc[j + 4] & 0xf) | (mn[j + 4] & 0xf) << 4;
        }
        out
    }

    /// 4-bit quants of a 256-element super-block as Q4_K and Q5_K store them: in each 64-element
    /// group, elements 0..32 in the low nibbles of 32 bytes and 32..64 in the high nibbles.
    fn pack_4bit_k(q: &[usize]) -> [u8; 128] {
        let mut qs = [0u8; 128];
        for (i, &v) in q.iter().enumerate() {
            let (g, t, l) = (i / 64, (i % 64) / 32, i % 32);
            qs[32 * g + l] |= ((v & 0xf) as u8) << (4 * t);
        }
        qs
    }

    fn q4k_block(d: f32, dmin: f32, salt: usize) -> (Vec<u8>, Vec<f32>) {
        let q: Vec<usize> = (0..256).map(|i| pattern(i, salt, 16)).collect();
        let sc: Vec<u8> = (0..8).map(|k| pattern(k, salt + 1, 64) as u8).collect();
        let mn: Vec<u8> = (0..8).map(|k| pattern(k, salt + 2, 64) as u8).collect();
        let mut bytes = f16(d).to_vec();
        bytes.extend(f16(dmin));
        bytes.extend(pack_scales_mins(&sc, &mn));
        bytes.extend(pack_4bit_k(&q));
        let want = (0..256)
            .map(|i| d * (sc[i / 32] as usize * q[i]) as f32 - dmin * mn[i / 32] as f32)
            .collect();
        (bytes, want)
    }

    fn q5k_block(d: f32, dmin: f32, salt: usize) -> (Vec<u8>, Vec<f32>) {
        let q: Vec<usize> = (0..256).map(|i| pattern(i, salt, 32)).collect();
        let sc: Vec<u8> = (0..8).map(|k| pattern(k, salt + 1, 64) as u8).collect();
        let mn: Vec<u8> = (0..8).map(|k| pattern(k, salt + 2, 64) as u8).collect();
        // The fifth bit of element i is bit i / 32 of byte i % 32.
        let mut qh = [0u8; 32];
        for (i, &v) in q.iter().enumerate() {
            qh[i % 32] |= ((v >> 4) as u8) << (i / 32);
        }
        let mut bytes = f16(d).to_vec();
        bytes.extend(f16(dmin));
        bytes.extend(pack_scales_mins(&sc, &mn));
        bytes.extend(qh);
        bytes.extend(pack_4bit_k(&q));
        let want = (0..256)
            .map(|i| d * (sc[i / 32] as usize * q[i]) as f32 - dmin * mn[i / 32] as f32)
            .collect();
        (bytes, want)
    }

    fn q6k_block(d: f32, salt: usize) -> (Vec<u8>, Vec<f32>) {
        let q: Vec<i32> = (0..256).map(|i| pattern(i, salt, 64) as i32 - 32).collect();
        let sc: Vec<i8> = (0..16)
            .map(|k| (pattern(k, salt + 1, 256) as u8) as i8)
            .collect();
        // Element 128n + 32t + l: low nibble in ql[64n + 32(t % 2) + l] (t >= 2: high nibble),
        // top two bits in qh[32n + l] at bit 2t.
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for (i, &v) in q.iter().enumerate() {
            let u = (v + 32) as u8;
            let (n, t, l) = (i / 128, (i % 128) / 32, i % 32);
            ql[64 * n + 32 * (t % 2) + l] |= (u & 0xf) << (4 * (t / 2));
            qh[32 * n + l] |= (u >> 4) << (2 * t);
        }
        let mut bytes = ql.to_vec();
        bytes.extend(qh);
        bytes.extend(sc.iter().map(|&s| s as u8));
        bytes.extend(f16(d));
        let want = (0..256)
            .map(|i| d * (sc[i / 16] as i32 * q[i]) as f32)
            .collect();
        (bytes, want)
    }

    /// Two super-blocks, one per row of a 256 x 2 matrix.
    fn check_two(dtype: GgmlType, a: (Vec<u8>, Vec<f32>), b: (Vec<u8>, Vec<f32>)) {
        assert_eq!(a.0.len(), dtype.type_size());
        let bytes = [a.0, b.0].concat();
        let want = [a.1, b.1].concat();
        check(dtype, &bytes, &[256, 2], &want);
    }

    #[test]
    fn q2_k() {
        check_two(
            GgmlType::Q2K,
            q2k_block(0.5, 0.25, 0),
            q2k_block(-1.5, 0.125, 3),
        );
    }

    #[test]
    fn q3_k() {
        check_two(GgmlType::Q3K, q3k_block(0.5, 0), q3k_block(-0.0625, 5));
    }

    #[test]
    fn q4_k() {
        check_two(
            GgmlType::Q4K,
            q4k_block(0.5, 0.25, 0),
            q4k_block(0.125, -2.0, 9),
        );
    }

    #[test]
    fn q5_k() {
        check_two(
            GgmlType::Q5K,
            q5k_block(0.25, 0.5, 0),
            q5k_block(-0.5, 1.0, 4),
        );
    }

    #[test]
    fn q6_k() {
        check_two(GgmlType::Q6K, q6k_block(0.5, 0), q6k_block(-0.0078125, 2));
    }

    #[test]
    fn hand_patterns_reach_every_field_value() {
        // The K-quant tests above are only meaningful if the patterns cover the value ranges.
        for n in [4, 8, 16, 32, 64] {
            let seen: std::collections::BTreeSet<usize> =
                (0..256).map(|i| pattern(i, 0, n)).collect();
            assert_eq!(seen.len(), n);
        }
    }

    const QUANTIZED: [GgmlType; 10] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// Byte offsets of the f16 scale fields (`d`, `dmin`, `m`) in one block.
    fn f16_fields(dtype: GgmlType) -> &'static [usize] {
        match dtype {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q2K => &[80, 82],
            GgmlType::Q3K => &[108],
            GgmlType::Q6K => &[208],
            _ => &[],
        }
    }

    /// Random bytes for a `rows` x `cols` matrix of `dtype`, with finite, modest scales.
    fn random_matrix(dtype: GgmlType, rows: usize, cols: usize, rng: &mut impl Rng) -> Vec<u8> {
        let n = rows * cols;
        match dtype {
            GgmlType::F32 => (0..n)
                .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
                .collect(),
            GgmlType::F16 => (0..n)
                .flat_map(|_| f16(rng.random_range(-1.0f32..1.0)))
                .collect(),
            GgmlType::BF16 => (0..n)
                .flat_map(|_| half::bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_le_bytes())
                .collect(),
            _ => {
                let mut bytes = vec![0u8; n / dtype.block_size() * dtype.type_size()];
                rng.fill(&mut bytes[..]);
                for block in bytes.chunks_exact_mut(dtype.type_size()) {
                    for &at in f16_fields(dtype) {
                        let scale = rng.random_range(-0.02f32..0.02);
                        block[at..at + 2].copy_from_slice(&f16(scale));
                    }
                }
                bytes
            }
        }
    }

    /// Rows of `w` (rows x cols) dotted with rows of `x` (batch x cols), in f64.
    fn reference_matmul(x: &[f32], w: &[f32], cols: usize) -> Vec<f64> {
        x.chunks(cols)
            .flat_map(|xr| {
                w.chunks(cols)
                    .map(move |wr| xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum())
            })
            .collect()
    }

    /// How far candle's activations may stray from the exact ones in a quantized product.
    #[derive(Clone, Copy, PartialEq)]
    enum Activations {
        /// Any values: candle quantizes activations to 8 bits per block (32 for the legacy
        /// formats, 256 for the K formats), so each may be off by up to one step `amax / 127`
        /// of its block (half a step from rounding, a little more from the f16 step of Q8_0).
        Random,
        /// Values that 8-bit block quantization represents exactly; only float rounding (and
        /// the f16 block sum of Q8_1) is left.
        OnGrid,
    }

    /// Runs `QMatMul::forward` for a random 4 x 512 matrix of `dtype` against the f64 product of
    /// its dequantized weights and returns the worst ratio of error to allowed error.
    fn matmul_error(dtype: GgmlType, activations: Activations) -> f64 {
        let (rows, cols, batch) = (4usize, 512usize, 3usize);
        let mut rng = rand::rngs::StdRng::seed_from_u64(dtype.type_size() as u64);
        let bytes = random_matrix(dtype, rows, cols, &mut rng);
        let dims = [cols as u64, rows as u64];
        let q = qtensor_from_bytes(dtype, &bytes, &dims, &Device::Cpu).unwrap();
        let w = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(w.iter().all(|v| v.is_finite()));
        let x: Vec<f32> = (0..batch * cols)
            .map(|i| match activations {
                Activations::Random => rng.random_range(-1.0f32..1.0),
                // k / 128 with |k| <= 127 and |k| = 127 at every 32nd element, so every block
                // has the step 1 / 128 exactly, for Q8_0/Q8_1 (amax / 127) and Q8_K (-127 / max).
                Activations::OnGrid => {
                    let k = if i % 32 == 0 {
                        127
                    } else {
                        rng.random_range(-127i32..=127)
                    };
                    let sign = if i % 64 == 0 { -1.0 } else { 1.0 };
                    sign * k as f32 / 128.0
                }
            })
            .collect();
        let xt = Tensor::from_vec(x.clone(), (batch, cols), &Device::Cpu).unwrap();
        let got = QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got.len(), batch * rows);
        let want = reference_matmul(&x, &w, cols);

        let act_block = match dtype {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => None,
            _ => Some(if dtype.block_size() == 256 { 256 } else { 32 }),
        };
        // Q4_1 and Q5_1 multiply their f16 min `m` by the activation block's sum, which candle
        // keeps as an f16 too (relative step 2^-11).
        let block_min = |r: usize, i: usize| -> f64 {
            match dtype {
                GgmlType::Q4_1 | GgmlType::Q5_1 => {
                    let block = (r * cols + i) / 32 * dtype.type_size();
                    let m = half::f16::from_le_bytes([bytes[block + 2], bytes[block + 3]]);
                    m.to_f64().abs()
                }
                _ => 0.0,
            }
        };
        let mut worst = 0f64;
        for b in 0..batch {
            let xr = &x[b * cols..(b + 1) * cols];
            for r in 0..rows {
                let wr = &w[r * cols..(r + 1) * cols];
                let mut allowed = 1e-6;
                for i in 0..cols {
                    allowed += 1e-5 * (xr[i] as f64 * wr[i] as f64).abs();
                    if let Some(n) = act_block {
                        let block = &xr[i / n * n..][..n];
                        if activations == Activations::Random {
                            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                            allowed += wr[i].abs() as f64 * amax as f64 / 127.0 * 1.1;
                        }
                        if i % 32 == 0 {
                            let sum: f32 = xr[i..i + 32].iter().map(|v| v.abs()).sum();
                            allowed += block_min(r, i) * sum as f64 / 2048.0 * 1.1;
                        }
                    }
                }
                let err = (got[b * rows + r] as f64 - want[b * rows + r]).abs();
                worst = worst.max(err / allowed);
            }
        }
        worst
    }

    #[test]
    fn every_format_multiplies_correctly() {
        let all = QUANTIZED
            .into_iter()
            .chain([GgmlType::F32, GgmlType::F16, GgmlType::BF16]);
        for dtype in all {
            let worst = matmul_error(dtype, Activations::Random);
            assert!(worst <= 1.0, "{dtype:?}: error is {worst} times the bound");
        }
    }

    #[test]
    fn every_format_multiplies_exactly_on_the_activation_grid() {
        // With no activation rounding, the bound shrinks to float rounding: any slip in decoding
        // or indexing a block shows.
        for dtype in QUANTIZED {
            let worst = matmul_error(dtype, Activations::OnGrid);
            assert!(worst <= 1.0, "{dtype:?}: error is {worst} times the bound");
        }
    }

    #[test]
    fn activation_formats_are_refused() {
        for dtype in [GgmlType::Q8_1, GgmlType::Q8K] {
            let bytes = vec![0u8; dtype.type_size()];
            let dims = [dtype.block_size() as u64];
            assert!(matches!(
                qtensor_from_bytes(dtype, &bytes, &dims, &Device::Cpu),
                Err(Error::Unsupported(_))
            ));
        }
    }

    #[test]
    fn wrong_lengths_and_shapes_are_errors() {
        let invalid = |dtype, len: usize, dims: &[u64]| {
            matches!(
                qtensor_from_bytes(dtype, &vec![0u8; len], dims, &Device::Cpu),
                Err(Error::InvalidArgument(_))
            )
        };
        assert!(invalid(GgmlType::Q4_0, 17, &[32]));
        assert!(invalid(GgmlType::Q4_0, 19, &[32]));
        assert!(invalid(GgmlType::Q4_0, 0, &[]));
        assert!(invalid(GgmlType::Q4_0, 9, &[16]));
        assert!(invalid(GgmlType::F32, 0, &[0, 4]));
        assert!(invalid(GgmlType::F32, 4, &[1, 1, 1, 1, 1]));
        assert!(invalid(GgmlType::Q6K, 210, &[256, 1 << 62]));
        assert!(!invalid(GgmlType::Q4_0, 18, &[32]));
    }

    #[test]
    fn block_geometry_matches_ggml() {
        // (id, elements per block, bytes per block) from ggml's type traits.
        let table = [
            (0, GgmlType::F32, 1, 4),
            (1, GgmlType::F16, 1, 2),
            (2, GgmlType::Q4_0, 32, 18),
            (3, GgmlType::Q4_1, 32, 20),
            (6, GgmlType::Q5_0, 32, 22),
            (7, GgmlType::Q5_1, 32, 24),
            (8, GgmlType::Q8_0, 32, 34),
            (9, GgmlType::Q8_1, 32, 36),
            (10, GgmlType::Q2K, 256, 84),
            (11, GgmlType::Q3K, 256, 110),
            (12, GgmlType::Q4K, 256, 144),
            (13, GgmlType::Q5K, 256, 176),
            (14, GgmlType::Q6K, 256, 210),
            (15, GgmlType::Q8K, 256, 292),
            (30, GgmlType::BF16, 1, 2),
        ];
        for (id, dtype, block, size) in table {
            assert_eq!(GgmlType::from_id(id), Some(dtype));
            assert_eq!(
                (dtype.block_size(), dtype.type_size()),
                (block, size),
                "{dtype:?}"
            );
            assert_eq!(dtype.candle().block_size(), block);
            assert_eq!(dtype.candle().type_size(), size);
        }
        for id in [4, 5, 16, 17, 29, 31, 39, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), None);
        }
    }
}
