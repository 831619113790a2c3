//! ggml tensor types: block geometry of every format Realm reads, and the bridge from raw GGUF
//! bytes to candle's quantized tensors (which keep the weights quantized in memory).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Device;

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo};

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

/// Builds a quantized tensor from raw ggml bytes. `dims` are in ggml order (innermost first).
pub fn qtensor_from_bytes(dtype: GgmlType, bytes: &[u8], dims: &[u64], device: &Device) -> Result<QTensor> {
    // candle wants the outermost dimension first.
    let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype.candle(),
        bytes,
        shape,
        device,
    )?)
}

/// Loads one tensor of a GGUF file, still quantized, onto `device`.
pub fn load_qtensor(file: &GgufFile, info: &TensorInfo, device: &Device) -> Result<QTensor> {
    qtensor_from_bytes(info.dtype, file.tensor_bytes(info), &info.dims, device).map_err(|e| Error::Tensor {
        name: info.name.clone(),
        problem: e.to_string(),
    })
}

/// Loads a weight matrix for `x @ W^T` products, kept quantized.
pub fn load_matmul(file: &GgufFile, name: &str, device: &Device) -> Result<QMatMul> {
    let info = file.tensor_info(name)?;
    if info.dims.len() != 2 {
        return Err(Error::Tensor {
            name: name.to_string(),
            problem: format!("expected a matrix, found dimensions {:?}", info.dims),
        });
    }
    Ok(QMatMul::from_qtensor(load_qtensor(file, info, device)?)?)
}
