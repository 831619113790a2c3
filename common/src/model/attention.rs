//! Rotary position embeddings and grouped-query attention over a session's KV cache, shared by
//! the architectures.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::kv::LayerKv;

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

/// Scaled dot-product attention with grouped KV heads.
///
/// `q` is `[n_heads, n, head_dim]`, `k` and `v` are `[n_kv_heads, n, head_dim]` for the new
/// tokens (already rotated); they are appended to `kv` first. Token `i` sits at
/// `position + i` and sees cached positions `j <= position + i`, and with a `window` only those
/// with `position + i - j < window`. Returns `[n, n_heads * head_dim]`.
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
    let (k_all, v_all) = kv.append(k, v)?;
    let (k_all, v_all) = (k_all.to_dtype(DType::F32)?, v_all.to_dtype(DType::F32)?);
    let total = k_all.dims()[1];

    // Heads sharing a KV head are stacked along the token axis, so one batched matmul per KV
    // head serves the whole group without copying keys.
    let q = round_f16(&q.reshape((n_kv_heads, group * n, head_dim))?)?;
    let scores = (q.matmul(&k_all.t()?)? * scale)?;
    let needs_mask = n > 1 || window.is_some_and(|w| total > w);
    let scores = if needs_mask {
        let mask = attention_mask(n, total, position, window, q.device())?;
        scores
            .reshape((n_kv_heads, group, n, total))?
            .broadcast_add(&mask)?
            .reshape((n_kv_heads, group * n, total))?
    } else {
        scores
    };
    let probs = round_f16(&candle_nn::ops::softmax_last_dim(&scores)?)?;
    let out = probs.matmul(&v_all)?;
    Ok(out
        .reshape((n_heads, n, head_dim))?
        .transpose(0, 1)?
        .reshape((n, n_heads * head_dim))?)
}

/// Additive mask `[n, total]`: 0 where token `i` may attend to position `j`, -inf elsewhere.
fn attention_mask(n: usize, total: usize, position: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let mut mask = Vec::with_capacity(n * total);
    for i in 0..n {
        let p = position + i;
        for j in 0..total {
            let visible = j <= p && window.is_none_or(|w| p - j < w);
            mask.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
        }
    }
    Ok(Tensor::from_vec(mask, (n, total), device)?)
}

/// RMS-normalizes each `head_dim` row of `x` (`[n, heads, head_dim]`).
pub(crate) fn rms_norm_heads(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32)?)
}

/// `[n, heads * head_dim]` → `[heads, n, head_dim]`, contiguous.
pub(crate) fn split_heads(x: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    Ok(x.reshape((n, heads, head_dim))?.transpose(0, 1)?.contiguous()?)
}

/// Keys and values are cached in f16; the operands multiplied with them are rounded to f16 as
/// well, so every product in attention is of two f16 values accumulated in f32.
fn round_f16(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F16)?.to_dtype(DType::F32)?)
}
