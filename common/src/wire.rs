//! The edge between wire messages (`realm_proto::pb`) and the model core's types. Every check a
//! peer's message needs happens here: an unknown dtype, a shape that does not match the byte
//! length, an empty or inverted layer range are explicit errors, never a panic or a guess.

use candle_core::{Device, Tensor};
use half::{bf16, f16};
use realm_proto::pb;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::model::{LayerRange, ModelConfig};

/// Element type of activations on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireDType {
    #[default]
    F32,
    F16,
    BF16,
}

impl WireDType {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }
}

impl std::str::FromStr for WireDType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::BF16),
            other => Err(Error::InvalidArgument(format!(
                "unknown activation dtype `{other}` (f32, f16 or bf16)"
            ))),
        }
    }
}

impl TryFrom<i32> for WireDType {
    type Error = Error;

    fn try_from(v: i32) -> Result<Self> {
        match pb::DataType::try_from(v) {
            Ok(pb::DataType::F32) => Ok(Self::F32),
            Ok(pb::DataType::F16) => Ok(Self::F16),
            Ok(pb::DataType::Bf16) => Ok(Self::BF16),
            Ok(pb::DataType::Unspecified) | Err(_) => Err(Error::InvalidArgument(format!(
                "tensor dtype {v} is not one of f32, f16, bf16"
            ))),
        }
    }
}

impl From<WireDType> for pb::DataType {
    fn from(d: WireDType) -> Self {
        match d {
            WireDType::F32 => pb::DataType::F32,
            WireDType::F16 => pb::DataType::F16,
            WireDType::BF16 => pb::DataType::Bf16,
        }
    }
}

/// Hidden states of a step, `[n_tokens, d_model]` in f32, with the dtype they travelled in.
#[derive(Debug, Clone)]
pub struct Activations {
    pub hidden: Tensor,
    pub dtype: WireDType,
}

impl Activations {
    /// Decodes a wire tensor, which must be `[n_tokens, d_model]` with `n_tokens >= 1`, into
    /// host memory.
    pub fn from_wire(t: &pb::Tensor, d_model: usize) -> Result<Self> {
        let dtype = WireDType::try_from(t.dtype)?;
        let [n, width] = t.shape[..] else {
            return Err(Error::InvalidArgument(format!(
                "hidden state must have shape [n_tokens, d_model], got {:?}",
                t.shape
            )));
        };
        if width as usize != d_model || n == 0 {
            return Err(Error::InvalidArgument(format!(
                "hidden state shape [{n}, {width}] does not fit this model's d_model {d_model}"
            )));
        }
        let elements = n
            .checked_mul(width)
            .and_then(|e| usize::try_from(e).ok())
            .ok_or_else(|| Error::InvalidArgument(format!("shape [{n}, {width}] overflows")))?;
        let want = elements.checked_mul(dtype.size());
        if want != Some(t.data.len()) {
            return Err(Error::InvalidArgument(format!(
                "tensor of shape [{n}, {width}] in {} needs {} bytes, got {}",
                dtype.name(),
                elements.saturating_mul(dtype.size()),
                t.data.len()
            )));
        }
        let values: Vec<f32> = match dtype {
            WireDType::F32 => t
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            WireDType::F16 => t
                .data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            WireDType::BF16 => t
                .data
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(
                "hidden state holds NaN or infinite values".to_string(),
            ));
        }
        let hidden = Tensor::from_vec(values, (n as usize, d_model), &Device::Cpu)?;
        Ok(Self { hidden, dtype })
    }

    /// Encodes `hidden` (`[n_tokens, d_model]`, f32) in `dtype`.
    pub fn to_wire(hidden: &Tensor, dtype: WireDType) -> Result<pb::Tensor> {
        let (n, d) = hidden.dims2()?;
        let values = hidden.flatten_all()?.to_vec1::<f32>()?;
        let mut data = Vec::with_capacity(values.len() * dtype.size());
        match dtype {
            WireDType::F32 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&v.to_le_bytes())),
            WireDType::F16 => {
                for v in &values {
                    let h = f16::from_f32(*v);
                    // A finite value f16 cannot hold would arrive as infinity: say so here,
                    // where the cause is known (gemma3's hidden states reach past its range).
                    if h.is_infinite() && v.is_finite() {
                        return Err(Error::InvalidArgument(format!(
                            "the hidden state holds {v}, beyond f16's range (±65504): this \
                             model's activations need --wire-dtype bf16 or f32"
                        )));
                    }
                    data.extend_from_slice(&h.to_le_bytes());
                }
            }
            WireDType::BF16 => values
                .iter()
                .for_each(|v| data.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        }
        Ok(pb::Tensor {
            shape: vec![n as u64, d as u64],
            dtype: pb::DataType::from(dtype) as i32,
            data,
        })
    }
}

impl From<LayerRange> for pb::LayerRange {
    fn from(r: LayerRange) -> Self {
        Self {
            start: r.start as u32,
            end: r.end as u32,
        }
    }
}

impl TryFrom<Option<&pb::LayerRange>> for LayerRange {
    type Error = Error;

    fn try_from(r: Option<&pb::LayerRange>) -> Result<Self> {
        let r = r.ok_or_else(|| Error::InvalidArgument("layer range is missing".to_string()))?;
        LayerRange::new(r.start as usize, r.end as usize)
    }
}

/// What makes two model files the same model (see `ModelIdentity` in the protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIdentity {
    pub header_sha256: String,
    pub file_bytes: u64,
    pub architecture: String,
    pub n_layers: usize,
}

impl ModelIdentity {
    /// The identity of the model in `file`: its own for a model file, the model's it was cut
    /// from for a shard file (see [`crate::shard`]).
    pub fn of(file: &GgufFile, config: &ModelConfig) -> Self {
        if let Ok(Some((source, _))) = crate::shard::source_of(&file.metadata) {
            return source;
        }
        Self {
            header_sha256: file.header_sha256(),
            file_bytes: file.file_len(),
            architecture: config.architecture.gguf_name().to_string(),
            n_layers: config.n_layers,
        }
    }

    /// Whether `other` is the same model (architecture and layer count follow from the header).
    pub fn same_model(&self, other: &Self) -> bool {
        self.header_sha256 == other.header_sha256 && self.file_bytes == other.file_bytes
    }
}

impl std::fmt::Display for ModelIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = self.header_sha256.get(..12).unwrap_or(&self.header_sha256);
        write!(
            f,
            "{} model, {} layers, {} bytes, header {short}",
            self.architecture, self.n_layers, self.file_bytes
        )
    }
}

impl From<&ModelIdentity> for pb::ModelIdentity {
    fn from(m: &ModelIdentity) -> Self {
        Self {
            header_sha256: m.header_sha256.clone(),
            file_bytes: m.file_bytes,
            architecture: m.architecture.clone(),
            n_layers: m.n_layers as u32,
        }
    }
}

impl TryFrom<Option<&pb::ModelIdentity>> for ModelIdentity {
    type Error = Error;

    fn try_from(m: Option<&pb::ModelIdentity>) -> Result<Self> {
        let m = m.ok_or_else(|| Error::InvalidArgument("model identity is missing".to_string()))?;
        Ok(Self {
            header_sha256: m.header_sha256.clone(),
            file_bytes: m.file_bytes,
            architecture: m.architecture.clone(),
            n_layers: m.n_layers as usize,
        })
    }
}

/// The one mapping from model-core errors to gRPC statuses.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::InvalidArgument(_)
            | Error::ContextOverflow { .. }
            | Error::Tokenizer(_)
            | Error::Template(_) => tonic::Status::invalid_argument(message),
            Error::Unsupported(_) => tonic::Status::failed_precondition(message),
            Error::MissingTensor(_)
            | Error::Tensor { .. }
            | Error::Gguf(_)
            | Error::Metadata { .. }
            | Error::Io { .. } => tonic::Status::failed_precondition(message),
            Error::Candle(_) => tonic::Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(shape: Vec<u64>, dtype: pb::DataType, data: Vec<u8>) -> pb::Tensor {
        pb::Tensor {
            shape,
            dtype: dtype as i32,
            data,
        }
    }

    #[test]
    fn round_trips_in_every_dtype() {
        let x = Tensor::new(&[[1.0f32, -2.5, 0.125], [3.0, 0.0, -1.0]], &Device::Cpu).unwrap();
        for dtype in [WireDType::F32, WireDType::F16, WireDType::BF16] {
            let w = Activations::to_wire(&x, dtype).unwrap();
            assert_eq!(w.data.len(), 6 * dtype.size());
            let back = Activations::from_wire(&w, 3).unwrap();
            assert_eq!(back.dtype, dtype);
            assert_eq!(
                back.hidden.to_vec2::<f32>().unwrap(),
                x.to_vec2::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn a_value_beyond_f16_is_an_error_at_the_sender_naming_the_wider_types() {
        let x = Tensor::new(&[[1.0f32, 82658.2, -3.0]], &Device::Cpu).unwrap();
        let error = Activations::to_wire(&x, WireDType::F16)
            .unwrap_err()
            .to_string();
        assert!(error.contains("82658") && error.contains("bf16"), "{error}");
        for dtype in [WireDType::F32, WireDType::BF16] {
            let wire = Activations::to_wire(&x, dtype).unwrap();
            let back = Activations::from_wire(&wire, 3).unwrap().hidden;
            let v = back.to_vec2::<f32>().unwrap()[0][1];
            assert!((v - 82658.2).abs() < 400.0, "{dtype:?}: {v}");
        }
        // f16's largest value itself still goes.
        let edge = Tensor::new(&[[65504.0f32, -65504.0, 0.0]], &Device::Cpu).unwrap();
        assert!(Activations::to_wire(&edge, WireDType::F16).is_ok());
    }

    #[test]
    fn malformed_tensors_are_errors() {
        let cases = [
            (
                wire(vec![1, 3], pb::DataType::F32, vec![0; 11]),
                "needs 12 bytes, got 11",
            ),
            (
                wire(vec![1, 3], pb::DataType::Unspecified, vec![0; 12]),
                "not one of",
            ),
            (
                wire(vec![3], pb::DataType::F32, vec![0; 12]),
                "shape [n_tokens, d_model]",
            ),
            (
                wire(vec![1, 4], pb::DataType::F32, vec![0; 16]),
                "d_model 3",
            ),
            (wire(vec![0, 3], pb::DataType::F32, vec![]), "d_model 3"),
            (
                wire(vec![u64::MAX, 3], pb::DataType::F32, vec![]),
                "overflows",
            ),
            (
                wire(
                    vec![1, 3],
                    pb::DataType::F32,
                    [f32::NAN, 0.0, 0.0]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
                "NaN",
            ),
        ];
        for (t, want) in cases {
            let err = Activations::from_wire(&t, 3).unwrap_err().to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
        let mut t = wire(vec![1, 3], pb::DataType::F32, vec![0; 12]);
        t.dtype = 99;
        assert!(Activations::from_wire(&t, 3).is_err());
    }

    #[test]
    fn layer_ranges_are_checked() {
        assert!(LayerRange::try_from(None).is_err());
        assert!(LayerRange::try_from(Some(&pb::LayerRange { start: 3, end: 3 })).is_err());
        let r = LayerRange::try_from(Some(&pb::LayerRange { start: 2, end: 5 })).unwrap();
        assert_eq!((r.start, r.end), (2, 5));
    }
}
