//! RMS normalization: each row divided by `sqrt(mean(x²) + eps)`, then scaled by the weight.
//! The rounding of the normalized activations decides which way 8-bit activation quantization
//! rounds downstream, so this order of operations is fixed and tested by greedy agreement with
//! the reference outputs.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Normalizes every row (last dimension) of `x` and scales it by `weight`.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let w = weight.to_vec1::<f32>()?;
    let width = w.len();
    if x.dims().last() != Some(&width) {
        return Err(Error::InvalidArgument(format!(
            "cannot RMS-normalize shape {:?} with a weight of {width}",
            x.dims()
        )));
    }
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    let eps = eps as f32;
    // Rows are independent: a prefill's spread over the threads.
    values.par_chunks_exact_mut(width).for_each(|row| {
        let sum: f32 = row.iter().map(|&v| v * v).sum();
        let rms = (sum / width as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(&w) {
            *v = *v / rms * w;
        }
    });
    Ok(Tensor::from_vec(values, x.shape().clone(), x.device())?)
}
