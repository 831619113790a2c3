//! The `llama` architecture (SmolLM2 and kin): pre-norm blocks with RMSNorm, grouped-query
//! attention with interleaved RoPE (GGUF stores Q/K permuted for adjacent-pair rotation), and a
//! SwiGLU MLP. Embeddings are unscaled; the head may be tied to the embedding table.

use candle_core::{Device, Tensor};

use super::attention::{attend, positions, split_heads, Rope, RopeStyle, Segment};
use super::elementwise::{add, swiglu};
use super::norm::rms_norm;
use super::{load_vector, Block, Linear, ModelConfig};
use crate::error::Result;
use crate::gguf::GgufFile;

/// Names of a llama block's tensors, under `blk.{i}.`.
pub(super) mod names {
    pub const ATTN_NORM: &str = "attn_norm.weight";
    pub const ATTN_Q: &str = "attn_q.weight";
    pub const ATTN_K: &str = "attn_k.weight";
    pub const ATTN_V: &str = "attn_v.weight";
    pub const ATTN_OUTPUT: &str = "attn_output.weight";
    pub const FFN_NORM: &str = "ffn_norm.weight";
    pub const FFN_GATE: &str = "ffn_gate.weight";
    pub const FFN_UP: &str = "ffn_up.weight";
    pub const FFN_DOWN: &str = "ffn_down.weight";
}

#[derive(Debug)]
pub(super) struct LlamaBlock {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    rope: Rope,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    eps: f64,
    scale: f64,
    device: Device,
}

impl LlamaBlock {
    pub fn load(
        file: &GgufFile,
        config: &ModelConfig,
        layer: usize,
        device: &Device,
    ) -> Result<Self> {
        let name = |n: &str| format!("blk.{layer}.{n}");
        let matmul = |n: &str| Linear::load(file, &name(n), device);
        Ok(Self {
            attn_norm: load_vector(file, &name(names::ATTN_NORM), config.d_model, device)?,
            wq: matmul(names::ATTN_Q)?,
            wk: matmul(names::ATTN_K)?,
            wv: matmul(names::ATTN_V)?,
            wo: matmul(names::ATTN_OUTPUT)?,
            ffn_norm: load_vector(file, &name(names::FFN_NORM), config.d_model, device)?,
            gate: matmul(names::FFN_GATE)?,
            up: matmul(names::FFN_UP)?,
            down: matmul(names::FFN_DOWN)?,
            rope: Rope::new(
                RopeStyle::Interleaved,
                config.head_dim,
                config.rope_base,
                config.rope_position_scale,
            ),
            n_heads: config.n_heads,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            eps: config.rms_eps,
            scale: config.attention_scale,
            device: device.clone(),
        })
    }
}

impl Block for LlamaBlock {
    fn forward(&self, x: &Tensor, segments: &mut [Segment<'_>]) -> Result<Tensor> {
        let positions = positions(segments);
        let h = rms_norm(x, &self.attn_norm, self.eps)?;
        let q = split_heads(&self.wq.forward(&h)?, self.n_heads, self.head_dim)?;
        let k = split_heads(&self.wk.forward(&h)?, self.n_kv_heads, self.head_dim)?;
        let v = split_heads(&self.wv.forward(&h)?, self.n_kv_heads, self.head_dim)?;
        let q = self.rope.apply(&q, &positions, &self.device)?;
        let k = self.rope.apply(&k, &positions, &self.device)?;
        let attn = attend(&q, &k, &v, segments, None, self.scale)?;
        let x = add(x, &self.wo.forward(&attn)?)?;

        let h = rms_norm(&x, &self.ffn_norm, self.eps)?;
        let mlp = swiglu(&self.gate.forward(&h)?, &self.up.forward(&h)?)?;
        add(&x, &self.down.forward(&mlp)?)
    }
}
