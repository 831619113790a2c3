//! Rotary position embeddings and grouped-query attention over a session's KV cache, shared by
//! the architectures.

use candle_core::{Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::error::Result;
use crate::kv::LayerKv;

mod dot;

/// How a block's rotary embedding pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: GGUF llama weights are permuted for this layout.
    Interleaved,
    /// Halves `(i, i + d/2)`.
    Neox,
}

#[derive(Debug, Clone)]
pub(crate) struct Rope {
    pub style: RopeStyle,
    /// `base^(-2i/d)` for `i` in `0..d/2`.
    inv_freq: Vec<f32>,
    position_scale: f32,
}

impl Rope {
    pub fn new(style: RopeStyle, head_dim: usize, base: f32, position_scale: f32) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| base.powf(-2.0 * i as f32 / head_dim as f32))
            .collect();
        Self {
            style,
            inv_freq,
            position_scale,
        }
    }

    /// Rotates `x` (`[heads, n_tokens, head_dim]`) whose first token is at `position`.
    pub fn apply(&self, x: &Tensor, position: usize, device: &Device) -> Result<Tensor> {
        let n = x.dims()[1];
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in position..position + n {
            let p = p as f32 * self.position_scale;
            for &f in &self.inv_freq {
                let (s, c) = (p * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        let cos = Tensor::from_vec(cos, (n, half), device)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?;
        let x = x.unsqueeze(0)?.contiguous()?;
        let out = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
            RopeStyle::Neox => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
        };
        Ok(out.squeeze(0)?)
    }
}

/// Scaled dot-product attention with grouped KV heads over a session's f16 cache.
///
/// `q` is `[n_heads, n, head_dim]`, `k` and `v` are `[n_kv_heads, n, head_dim]` for the new
/// tokens (already rotated); they are appended to `kv` first. Token `i` sits at
/// `position + i` and sees cached positions `j <= position + i`, and with a `window` only those
/// with `position + i - j < window`. Returns `[n, n_heads * head_dim]`.
///
/// One pass per query with an online softmax, rescaled whenever a new maximum score appears.
/// Small batches (decode) round the query to f16 like the keys and accumulate the weighted
/// values in f16; batches of [`WIDE_BATCH`] tokens or more (long prefills) keep both in f32.
/// This is the numerics of the fused attention kernels other GGUF engines run on CPU by default,
/// which keeps greedy output and perplexity identical to theirs where candidates nearly tie.
pub(crate) const WIDE_BATCH: usize = 64;

pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv: &mut LayerKv,
    position: usize,
    window: Option<usize>,
    scale: f64,
) -> Result<Tensor> {
    let (n_heads, n, head_dim) = q.dims3()?;
    let n_kv_heads = k.dims()[0];
    let group = n_heads / n_kv_heads;
    // Position-major `[n][kv_heads * head_dim]` for the cache.
    let position_major = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.transpose(0, 1)?.flatten_all()?.to_vec1::<f32>()?)
    };
    kv.append(
        n_kv_heads * head_dim,
        &position_major(k)?,
        &position_major(v)?,
    );
    let device = q.device().clone();
    let q = q.flatten_all()?.to_vec1::<f32>()?;
    let scale = scale as f32;
    let narrow = n < WIDE_BATCH;
    let mut out = vec![0.0f32; n * n_heads * head_dim];
    // One task per (token, head): each writes its own `head_dim` slice of `out`.
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(task, out)| {
            let (i, h) = (task / n_heads, task % n_heads);
            let p = position + i;
            let kv_head = h / group;
            let mut query = q[(h * n + i) * head_dim..(h * n + i + 1) * head_dim].to_vec();
            let first = window.map_or(0, |w| (p + 1).saturating_sub(w));
            if narrow {
                let mut q16 = vec![f16::ZERO; head_dim];
                q16.convert_from_f32_slice(&query);
                q16.convert_to_f32_slice(&mut query);
            }
            let mut buf = Vec::new();
            let scores = dot::scores(&query, kv, kv_head, first, p + 1 - first, &mut buf);
            let mut softmax = dot::OnlineSoftmax::new(head_dim, narrow);
            for (j, &s) in (first..=p).zip(scores) {
                softmax.push(s * scale, kv.value(j, kv_head, head_dim));
            }
            softmax.finish(out);
        });
    Ok(Tensor::from_vec(out, (n, n_heads * head_dim), &device)?)
}

/// `[n, heads * head_dim]` → `[heads, n, head_dim]`, contiguous.
pub(crate) fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    Ok(x.reshape((n, heads, head_dim))?
        .transpose(0, 1)?
        .contiguous()?)
}
