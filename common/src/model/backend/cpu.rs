//! The CPU backend: Realm's own quantized kernels ([`QMatrix`]) for the formats they cover, on
//! copies in the weight arena's huge pages (`mmap.rs`; repacked where the kernels have a layout
//! of their own), or, for a layer the layer manager streams, straight from the mapped file where
//! the layout allows; candle's `QMatMul` on the CPU for the others (F32, F16, Q5_1, Q5_K…); the
//! norm, RoPE, attention and elementwise loops of `model::{norm, attention, elementwise}`, on
//! the kernels' thread pool. Weights live in host memory (or stay in the file's pages),
//! activations are host tensors.

use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

use super::{Backend, Residence, Scoring};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo};
use crate::kernels::{self, QMatrix};
use crate::model::attention::{self, Rope, Segment};
use crate::model::config::Activation;
use crate::model::{elementwise, norm};
use crate::quant::{load_f32, load_qtensor};

/// The CPU backend (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

/// A weight matrix on the CPU.
#[derive(Debug, Clone)]
pub enum Matrix {
    /// In a format Realm's kernels compute: from the mapped file or a repacked copy.
    Realm(QMatrix),
    /// Any other format, copied into candle's quantized tensor.
    Candle(QMatMul),
}

impl Backend for Cpu {
    type Matrix = Matrix;
    type Vector = Vec<f32>;

    /// Matrices in a format of Realm's kernels that the kernels do not repack (a repacked
    /// matrix is a copy in another layout). An expert tensor's `dims[0]` and `dims[1]` are the
    /// width and height of each expert's matrix.
    fn borrows_mapping(&self, info: &TensorInfo, residence: Residence) -> bool {
        residence == Residence::Streamed
            && matches!(info.dims.len(), 2 | 3)
            && kernels::supported_shape(info.dtype, info.dims[0] as usize)
            && !kernels::repacks(info.dtype, info.dims[1] as usize)
    }

    fn load_matrix(
        &self,
        file: &GgufFile,
        info: &TensorInfo,
        residence: Residence,
    ) -> Result<Matrix> {
        let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
        if self.borrows_mapping(info, residence) {
            if let Some(m) = QMatrix::mapped(info.dtype, rows, cols, file.tensor_data(info)?) {
                // Fault the pages in now, at load time, rather than during the first step.
                file.populate_tensor(info)?;
                return Ok(Matrix::Realm(m));
            }
        } else if kernels::supported_shape(info.dtype, cols) {
            let bytes = file.tensor_bytes(info)?;
            // The copy is all the kernels read: the file's pages can go, as the copy proceeds
            // (best effort; the whole tensor's release below reports errors).
            let release = |n| drop(file.release_tensor_part(info, n));
            if let Some(m) = QMatrix::new_releasing(info.dtype, rows, cols, bytes, release) {
                file.release_tensor(info)?;
                return Ok(Matrix::Realm(m));
            }
        }
        Ok(Matrix::Candle(QMatMul::from_qtensor(load_qtensor(
            file, info,
        )?)?))
    }

    /// Matrices the kernels would each repack (so copy) anyway: their stack is a copy of the
    /// same size, and one product pays one hand-over to the threads and one activation
    /// quantization instead of one per part.
    fn stack_matrices(&self, file: &GgufFile, infos: &[&TensorInfo]) -> Result<Option<Matrix>> {
        let Some(first) = infos.first() else {
            return Ok(None);
        };
        let (dtype, cols) = (first.dtype, first.dims[0] as usize);
        let copied = |i: &TensorInfo| {
            i.dims.len() == 2
                && i.dtype == dtype
                && i.dims[0] == first.dims[0]
                && kernels::supported_shape(dtype, cols)
                && kernels::repacks(dtype, i.dims[1] as usize)
        };
        if infos.len() < 2 || !infos.iter().all(|i| copied(i)) {
            return Ok(None);
        }
        let parts = infos
            .iter()
            .map(|i| file.tensor_bytes(i))
            .collect::<Result<Vec<_>>>()?;
        // Each part's file pages go as soon as it is repacked; the first error is reported.
        let mut released = Ok(());
        let done = |i: usize| {
            if let (Ok(()), Err(e)) = (&released, file.release_tensor(infos[i])) {
                released = Err(e);
            }
        };
        let stacked = QMatrix::stacked(dtype, cols, &parts, done);
        released?;
        Ok(stacked.map(Matrix::Realm))
    }

    fn load_vector(&self, file: &GgufFile, info: &TensorInfo) -> Result<Vec<f32>> {
        load_f32(file, info)
    }

    fn matmul(&self, x: &Tensor, w: &Matrix, bias: Option<&Vec<f32>>) -> Result<Tensor> {
        match w {
            Matrix::Candle(m) => {
                let y = m.forward(x)?;
                Ok(match bias {
                    Some(b) => y.broadcast_add(&Tensor::from_slice(b, b.len(), x.device())?)?,
                    None => y,
                })
            }
            Matrix::Realm(m) => {
                let (n, cols) = x.dims2()?;
                if cols != m.cols() {
                    return Err(Error::InvalidArgument(format!(
                        "activation width {cols} does not match weight width {}",
                        m.cols()
                    )));
                }
                let mut out = vec![0.0f32; n * m.rows()];
                elementwise::with_values(x, |input| m.matmul(input, n, &mut out))?;
                if let Some(b) = bias {
                    // In place, the same sum a broadcast addition makes.
                    for row in out.chunks_exact_mut(m.rows()) {
                        row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                    }
                }
                Ok(Tensor::from_vec(out, (n, m.rows()), x.device())?)
            }
        }
    }

    fn rms_norm(&self, x: &Tensor, weight: &Vec<f32>, eps: f64) -> Result<Tensor> {
        norm::rms_norm(x, weight, eps)
    }

    fn rope(&self, x: &Tensor, rope: &Rope, angles: &[(f32, f32)]) -> Result<Tensor> {
        rope.apply(x, angles)
    }

    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &mut [Segment<'_>],
        scoring: Scoring,
    ) -> Result<Tensor> {
        let Scoring {
            window,
            scale,
            softcap,
        } = scoring;
        attention::attend(q, k, v, segments, window, scale, softcap)
    }

    fn add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        elementwise::add(x, y)
    }

    fn gated(&self, activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        elementwise::gated(activation, gate, up)
    }
}
