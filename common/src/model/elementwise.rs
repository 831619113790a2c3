//! Elementwise operations of the blocks, on the kernels' threads: the CPU backend's.
//!
//! candle's CPU backend runs elementwise operations on tensors of 64 Ki values or more over a
//! pool of its own whose threads spin while they wait: beside the kernels' pool on a shared
//! machine, that spinning takes cores from the work. These loops run on the kernels' pool
//! instead, in slices. The results are candle's bits: the same f32 operations.

use candle_core::{CpuStorage, Storage, Tensor};
use rayon::prelude::*;

use super::config::Activation;
use crate::error::{Error, Result};

/// Values per slice handed to a thread: enough to amortize a task, few enough to spread a
/// prefill's rows.
pub(crate) const SLICE: usize = 8192;

/// The fewest values a slice is given.
const MIN_SLICE: usize = 1024;

/// Row-wise work on fewer values than this stays on the calling thread: a decode step's few
/// rows (a row, or its heads) take less time than handing some to another thread.
const PARALLEL_VALUES: usize = 16 * 1024;

/// `f(i, row)` for every row `i` of `width` values of `values`: a prefill's rows spread over the
/// threads, a decode step's on this one.
pub(crate) fn for_each_row(
    values: &mut [f32],
    width: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    let f = |(i, row): (usize, &mut [f32])| f(i, row);
    if values.len() < PARALLEL_VALUES {
        values.chunks_exact_mut(width).enumerate().for_each(f);
    } else {
        values.par_chunks_exact_mut(width).enumerate().for_each(f);
    }
}

/// The values of `t` (any shape) as one row.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Runs `f` on the values of `t` (any shape) as one row: in place where `t` is a contiguous
/// f32 tensor in host memory, which spares the copy, else on a copy.
pub fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            if let Some(v) = v.get(start..end) {
                return Ok(f(v));
            }
        }
    }
    Ok(f(&values(t)?))
}

fn same_shape(x: &Tensor, y: &Tensor, what: &str) -> Result<()> {
    if x.shape() != y.shape() {
        return Err(Error::InvalidArgument(format!(
            "{what} of shapes {:?} and {:?}",
            x.dims(),
            y.dims()
        )));
    }
    Ok(())
}

/// `x` with `f(x_slice, y_slice)` applied over same-shaped slices of `x` and `y` in turn, the
/// slices spread over the threads: the one loop every elementwise operation here runs.
pub(crate) fn combine(
    x: &Tensor,
    y: &Tensor,
    what: &str,
    f: impl Fn(&mut [f32], &[f32]) + Sync,
) -> Result<Tensor> {
    same_shape(x, y, what)?;
    let mut out = values(x)?;
    // A decode step's few thousand values are split in as many slices as there are threads
    // (each at least MIN_SLICE): its activations take longer than handing a slice over.
    let threads = rayon::current_num_threads();
    let slice = out
        .len()
        .div_ceil(threads)
        .next_multiple_of(64)
        .clamp(MIN_SLICE, SLICE);
    with_values(y, |y| {
        out.par_chunks_mut(slice)
            .zip(y.par_chunks(slice))
            .for_each(|(x, y)| f(x, y))
    })?;
    Ok(Tensor::from_vec(out, x.shape().clone(), x.device())?)
}

/// `x + y`: a residual connection.
pub(crate) fn add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    combine(x, y, "cannot add tensors", |s, y| {
        s.iter_mut().zip(y).for_each(|(s, y)| *s += y)
    })
}

/// `silu(gate) · up`, SiLU being `x / (1 + e^-x)`: the gated MLP of llama-like blocks.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    combine(gate, up, "cannot gate tensors", |g, u| {
        for (g, u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    })
}

/// `act(gate) · up`.
pub(crate) fn gated(activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match activation {
        Activation::Silu => swiglu(gate, up),
        Activation::Gelu => geglu(gate, up),
    }
}

/// `gelu(gate) * up`, GELU in its tanh form evaluated on the f16-rounded input and rounded to
/// f16 (saturating to 0 and identity beyond ±10), the precision the reference engines tabulate
/// it at. Exact f32 GELU moves gemma3's perplexity by about 1% against them. Since it depends
/// on the f16 input alone, it is tabulated once for all 65,536 of them, as f32. The inputs are
/// rounded to f16 a slice at a time (one instruction per eight where the CPU has F16C) and the
/// slices share the kernels' threads.
pub(crate) fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    use half::slice::HalfFloatSliceExt;

    let table = gelu_table();
    combine(gate, up, "cannot gate tensors", |g, u| {
        let mut bits = [half::f16::ZERO; SLICE];
        let bits = &mut bits[..g.len()];
        bits.convert_from_f32_slice(g);
        for ((x, &u), b) in g.iter_mut().zip(u).zip(bits.iter()) {
            *x = if *x <= -10.0 {
                0.0
            } else if *x >= 10.0 {
                *x * u
            } else {
                table[b.to_bits() as usize].to_f32() * u
            };
        }
    })
}

/// GELU (tanh form) of every f16, rounded to f16, indexed by the input's bits: 128 KiB, half
/// of what f32 entries would take from the caches the weights stream through.
fn gelu_table() -> &'static [half::f16] {
    static TABLE: std::sync::OnceLock<Vec<half::f16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        const COEF_A: f32 = 0.044_715;
        (0..=u16::MAX)
            .map(|bits| {
                let x = half::f16::from_bits(bits).to_f32();
                let gelu = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh());
                half::f16::from_f32(gelu)
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{add, swiglu};

    fn tensor(n: usize, seed: f32) -> Tensor {
        // Past 64 Ki values, where candle would go parallel.
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * seed).sin() * 9.0).collect();
        Tensor::from_vec(v, (n / 64, 64), &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    #[test]
    fn the_same_bits_as_candle() {
        let n = 80 * 1024;
        let (x, y) = (tensor(n, 0.37), tensor(n, 1.91));
        assert_eq!(bits(&add(&x, &y).unwrap()), bits(&(&x + &y).unwrap()));
        let candle = (candle_nn::ops::silu(&x).unwrap() * &y).unwrap();
        assert_eq!(bits(&swiglu(&x, &y).unwrap()), bits(&candle));
    }

    #[test]
    fn shapes_must_agree() {
        let x = tensor(128, 0.5);
        let y = x.reshape((1, 128)).unwrap();
        assert!(add(&x, &y).is_err());
        assert!(swiglu(&x, &y).is_err());
    }
}
