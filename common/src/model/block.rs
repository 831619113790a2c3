//! The transformer block of every architecture Realm runs, its parts chosen by the
//! [`ModelConfig`] and by which tensors the file holds:
//!
//! - RMSNorm before attention and the MLP; Gemma adds norms after both ("sandwich" norms);
//! - Q/K/V as three matrices or one fused matrix (Phi-3), each with an optional bias (Qwen 2);
//! - an RMS norm on every query and key head before RoPE (Qwen 3, Gemma 3);
//! - RoPE on adjacent pairs (llama, whose GGUF Q/K are permuted for it) or on halves (the
//!   others), with per-pair frequency factors (Llama 3's `rope_freqs`, Phi-3's LongRoPE) and
//!   a sliding window on the local layers of Gemma, with their own RoPE base;
//! - attention scores soft-capped (Gemma 2);
//! - a gated MLP, SwiGLU or GeGLU, gate and up as two matrices or one (Phi-3), or a mixture of
//!   experts (Mixtral-style llama, Qwen 3 MoE).

use candle_core::{Device, Tensor};

use super::attention::{attend, positions, split_heads, Rope, Segment};
use super::config::block_tensors::*;
use super::config::{Activation, ModelConfig};
use super::elementwise::{add, gated};
use super::experts::MixtureOfExperts;
use super::norm::rms_norm;
use super::{load_vector, Block, Linear};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// A matrix with an optional bias: `x @ W^T + b`.
#[derive(Debug)]
pub(super) struct Projection {
    weight: Linear,
    bias: Option<Tensor>,
}

impl Projection {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// The tensors of one layer, loaded by name under `blk.{layer}.`.
struct LayerTensors<'a> {
    file: &'a GgufFile,
    layer: usize,
    device: &'a Device,
}

impl LayerTensors<'_> {
    fn name(&self, n: &str) -> String {
        format!("blk.{}.{n}", self.layer)
    }

    fn has(&self, n: &str) -> bool {
        self.file.tensors.contains_key(&self.name(n))
    }

    fn matrix(&self, n: &str) -> Result<Linear> {
        Linear::load(self.file, &self.name(n), self.device)
    }

    fn vector(&self, n: &str, len: usize) -> Result<Tensor> {
        load_vector(self.file, &self.name(n), len, self.device)
    }

    fn optional_vector(&self, n: &str, len: usize) -> Result<Option<Tensor>> {
        self.has(n).then(|| self.vector(n, len)).transpose()
    }

    /// A matrix of `rows` outputs, with the bias `bias` if the file has it.
    fn projection(&self, n: &str, bias: &str, rows: usize) -> Result<Projection> {
        let weight = self.matrix(n)?;
        check_rows(&self.name(n), &weight, rows)?;
        Ok(Projection {
            weight,
            bias: self.optional_vector(bias, rows)?,
        })
    }
}

fn check_rows(name: &str, m: &Linear, rows: usize) -> Result<()> {
    if m.rows() != rows {
        return Err(Error::Tensor {
            name: name.to_string(),
            problem: format!("{} outputs where the model needs {rows}", m.rows()),
        });
    }
    Ok(())
}

/// Queries, keys and values from the normalized input.
#[derive(Debug)]
enum Qkv {
    Separate {
        q: Projection,
        k: Projection,
        v: Projection,
    },
    /// One matrix whose outputs are the queries, then the keys, then the values.
    Fused(Projection),
}

#[derive(Debug)]
enum Mlp {
    /// `down(act(gate(x)) · up(x))`; `gate` is `None` where `up` computes both, gate first.
    Gated {
        gate: Option<Projection>,
        up: Projection,
        down: Projection,
    },
    Experts(MixtureOfExperts),
}

#[derive(Debug)]
pub(super) struct DecoderBlock {
    attn_norm: Tensor,
    qkv: Qkv,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    output: Projection,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    mlp: Mlp,
    post_ffn_norm: Option<Tensor>,
    activation: Activation,
    rope: Rope,
    /// `Some` on sliding-window layers.
    window: Option<usize>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    eps: f64,
    scale: f64,
    scale_queries: bool,
    softcap: Option<f32>,
    device: Device,
}

impl DecoderBlock {
    pub fn load(
        file: &GgufFile,
        config: &ModelConfig,
        layer: usize,
        device: &Device,
    ) -> Result<Self> {
        let t = LayerTensors {
            file,
            layer,
            device,
        };
        let d = config.d_model;
        let q_width = config.n_heads * config.head_dim;
        let kv_width = config.n_kv_heads * config.head_dim;
        let qkv = if t.has(ATTN_QKV) {
            Qkv::Fused(t.projection(ATTN_QKV, ATTN_QKV_BIAS, q_width + 2 * kv_width)?)
        } else {
            Qkv::Separate {
                q: t.projection(ATTN_Q, ATTN_Q_BIAS, q_width)?,
                k: t.projection(ATTN_K, ATTN_K_BIAS, kv_width)?,
                v: t.projection(ATTN_V, ATTN_V_BIAS, kv_width)?,
            }
        };
        let (q_norm, k_norm) = if config.qk_norm {
            (
                Some(t.vector(ATTN_Q_NORM, config.head_dim)?),
                Some(t.vector(ATTN_K_NORM, config.head_dim)?),
            )
        } else {
            (None, None)
        };
        let sandwich = |n: &str| config.sandwich_norms.then(|| t.vector(n, d)).transpose();
        let mlp = match &config.experts {
            Some(experts) => Mlp::Experts(MixtureOfExperts::load(
                file,
                layer,
                d,
                experts,
                config.activation,
                device,
            )?),
            None if config.fused_gate_up => Mlp::Gated {
                gate: None,
                up: t.projection(FFN_UP, FFN_UP_BIAS, 2 * config.ffn_dim)?,
                down: t.projection(FFN_DOWN, FFN_DOWN_BIAS, d)?,
            },
            None => Mlp::Gated {
                gate: Some(t.projection(FFN_GATE, FFN_GATE_BIAS, config.ffn_dim)?),
                up: t.projection(FFN_UP, FFN_UP_BIAS, config.ffn_dim)?,
                down: t.projection(FFN_DOWN, FFN_DOWN_BIAS, d)?,
            },
        };
        let sliding = config.is_sliding(layer);
        let factors = match config.rope_factors {
            Some(name) => {
                Some(load_vector(file, name, config.head_dim / 2, device)?.to_vec1::<f32>()?)
            }
            None => None,
        };
        let (base, position_scale) = if sliding {
            (config.rope_base_local, 1.0)
        } else {
            (config.rope_base, config.rope_position_scale)
        };
        let rope = Rope::new(
            config.rope_style,
            config.head_dim,
            base,
            position_scale,
            factors.as_deref(),
            config.rope_attn_factor,
        );
        Ok(Self {
            attn_norm: t.vector(ATTN_NORM, d)?,
            qkv,
            q_norm,
            k_norm,
            output: t.projection(ATTN_OUTPUT, ATTN_OUTPUT_BIAS, d)?,
            post_attn_norm: sandwich(POST_ATTN_NORM)?,
            ffn_norm: t.vector(FFN_NORM, d)?,
            mlp,
            post_ffn_norm: sandwich(POST_FFN_NORM)?,
            activation: config.activation,
            rope,
            window: if sliding { config.sliding_window } else { None },
            n_heads: config.n_heads,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            eps: config.rms_eps,
            scale: config.attention_scale,
            scale_queries: config.scale_queries,
            softcap: config.attention_softcap,
            device: device.clone(),
        })
    }

    /// `[heads, n, head_dim]` from `[n, heads * head_dim]`, each head RMS-normalized by `norm`
    /// where there is one.
    fn heads(&self, x: &Tensor, heads: usize, norm: Option<&Tensor>) -> Result<Tensor> {
        match norm {
            None => split_heads(x, heads, self.head_dim),
            Some(norm) => {
                let n = x.dim(0)?;
                let x = x.reshape((n, heads, self.head_dim))?;
                Ok(rms_norm(&x, norm, self.eps)?
                    .transpose(0, 1)?
                    .contiguous()?)
            }
        }
    }
}

impl Block for DecoderBlock {
    fn forward(&self, x: &Tensor, segments: &mut [Segment<'_>]) -> Result<Tensor> {
        let positions = positions(segments);
        let h = rms_norm(x, &self.attn_norm, self.eps)?;
        let q_width = self.n_heads * self.head_dim;
        let kv_width = self.n_kv_heads * self.head_dim;
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => (q.forward(&h)?, k.forward(&h)?, v.forward(&h)?),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(&h)?;
                (
                    y.narrow(1, 0, q_width)?.contiguous()?,
                    y.narrow(1, q_width, kv_width)?.contiguous()?,
                    y.narrow(1, q_width + kv_width, kv_width)?.contiguous()?,
                )
            }
        };
        let q = self.heads(&q, self.n_heads, self.q_norm.as_ref())?;
        let k = self.heads(&k, self.n_kv_heads, self.k_norm.as_ref())?;
        let v = split_heads(&v, self.n_kv_heads, self.head_dim)?;
        let angles = self.rope.table(&positions);
        let q = self.rope.apply(&q, &angles, &self.device)?;
        let k = self.rope.apply(&k, &angles, &self.device)?;
        let (q, scale) = if self.scale_queries {
            ((q * self.scale)?, 1.0)
        } else {
            (q, self.scale)
        };
        let attn = attend(&q, &k, &v, segments, self.window, scale, self.softcap)?;
        let mut attn = self.output.forward(&attn)?;
        if let Some(norm) = &self.post_attn_norm {
            attn = rms_norm(&attn, norm, self.eps)?;
        }
        let x = add(x, &attn)?;

        let h = rms_norm(&x, &self.ffn_norm, self.eps)?;
        let mut mlp = match &self.mlp {
            Mlp::Gated { gate, up, down } => {
                let hidden = match gate {
                    Some(gate) => gated(self.activation, &gate.forward(&h)?, &up.forward(&h)?)?,
                    None => {
                        let both = up.forward(&h)?;
                        let width = both.dim(1)? / 2;
                        gated(
                            self.activation,
                            &both.narrow(1, 0, width)?.contiguous()?,
                            &both.narrow(1, width, width)?.contiguous()?,
                        )?
                    }
                };
                down.forward(&hidden)?
            }
            Mlp::Experts(experts) => experts.forward(&h)?,
        };
        if let Some(norm) = &self.post_ffn_norm {
            mlp = rms_norm(&mlp, norm, self.eps)?;
        }
        add(&x, &mlp)
    }
}
