//! RMS normalization: each row multiplied by `1 / sqrt(mean(x²) + eps)`, then by the weight.
//! The rounding of the normalized activations decides which way 8-bit activation quantization
//! rounds downstream: one value rounded differently moves a product by ~1e-3 of its size, and
//! those steps add up over a deep model. So the operations are the reference's, in its order:
//! squares rounded to f32 and summed in f64, the mean rounded to f32, its reciprocal root in
//! f32, and each value scaled by it, then by the weight. This gives the reference's bits.
//!
//! The CPU backend's norm (see `backend::cpu`).

use candle_core::Tensor;

use super::elementwise::for_each_row;
use crate::error::{Error, Result};

/// Normalizes every row (last dimension) of `x` and scales it by `w`.
pub(crate) fn rms_norm(x: &Tensor, w: &[f32], eps: f64) -> Result<Tensor> {
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
    for_each_row(&mut values, width, |_, row| {
        let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (sum / width as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, w) in row.iter_mut().zip(w) {
            *v = *v * scale * w;
        }
    });
    Ok(Tensor::from_vec(values, x.shape().clone(), x.device())?)
}
