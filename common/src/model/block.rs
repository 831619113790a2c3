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
//!
//! The block computes through the [`Backend`] it was loaded on (products, norms, RoPE, attention,
//! residuals, activations); what it does itself is arrange the activations: heads, the parts of
//! fused projections.

use candle_core::Tensor;

use super::attention::{positions, split_heads, Rope, Segment};
use super::backend::{Backend, Residence, Scoring};
use super::config::block_tensors::*;
use super::config::{Activation, ModelConfig};
use super::experts::MixtureOfExperts;
use super::{load_matrix, load_vector, vector_info, Block};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::quant::load_f32;

/// A matrix with an optional bias: `x @ W^T + b`.
#[derive(Debug)]
struct Projection<B: Backend> {
    weight: B::Matrix,
    bias: Option<B::Vector>,
}

impl<B: Backend> Projection<B> {
    fn forward(&self, backend: &B, x: &Tensor) -> Result<Tensor> {
        backend.matmul(x, &self.weight, self.bias.as_ref())
    }
}

/// The tensors of one layer, loaded by name under `blk.{layer}.`.
struct LayerTensors<'a, B> {
    backend: &'a B,
    file: &'a GgufFile,
    layer: usize,
    residence: Residence,
}

impl<B: Backend> LayerTensors<'_, B> {
    fn name(&self, n: &str) -> String {
        format!("blk.{}.{n}", self.layer)
    }

    fn has(&self, n: &str) -> bool {
        self.file.tensors.contains_key(&self.name(n))
    }

    fn vector(&self, n: &str, len: usize) -> Result<B::Vector> {
        load_vector(self.backend, self.file, &self.name(n), len)
    }

    fn optional_vector(&self, n: &str, len: usize) -> Result<Option<B::Vector>> {
        self.has(n).then(|| self.vector(n, len)).transpose()
    }

    /// A matrix of `rows` outputs, with the bias `bias` if the file has it.
    fn projection(&self, n: &str, bias: &str, rows: usize) -> Result<Projection<B>> {
        let name = self.name(n);
        let info = self.file.tensor_info(&name)?;
        let weight = load_matrix(self.backend, self.file, info, self.residence)?;
        if info.dims[1] as usize != rows {
            return Err(Error::Tensor {
                name,
                problem: format!("{} outputs where the model needs {rows}", info.dims[1]),
            });
        }
        Ok(Projection {
            weight,
            bias: self.optional_vector(bias, rows)?,
        })
    }
}

impl<B: Backend> LayerTensors<'_, B> {
    /// The matrices `parts` (name, outputs) as one projection whose outputs are theirs in
    /// turn, where none has a bias and the backend stacks them (see
    /// [`Backend::stack_matrices`]).
    fn stacked<const N: usize>(
        &self,
        parts: [(&str, usize); N],
        biases: [&str; N],
    ) -> Result<Option<Projection<B>>> {
        if biases.iter().any(|b| self.has(b)) {
            return Ok(None);
        }
        let mut infos = Vec::with_capacity(N);
        for (n, rows) in parts {
            let name = self.name(n);
            let info = self.file.tensor_info(&name)?;
            if info.dims.len() != 2 || info.dims[1] as usize != rows {
                // Loaded one by one, where the mismatch is reported.
                return Ok(None);
            }
            infos.push(info);
        }
        Ok(self
            .backend
            .stack_matrices(self.file, &infos)?
            .map(|weight| Projection { weight, bias: None }))
    }
}

/// Queries, keys and values from the normalized input.
#[derive(Debug)]
enum Qkv<B: Backend> {
    Separate {
        q: Projection<B>,
        k: Projection<B>,
        v: Projection<B>,
    },
    /// One matrix whose outputs are the queries, then the keys, then the values, or (with `v`)
    /// the queries and keys alone, the values apart (a stack of the two where the values'
    /// matrix is of another type).
    Fused {
        stack: Projection<B>,
        v: Option<Projection<B>>,
    },
}

#[derive(Debug)]
enum Mlp<B: Backend> {
    /// `down(act(gate(x)) · up(x))`; `gate` is `None` where `up` computes both, gate first.
    Gated {
        gate: Option<Projection<B>>,
        up: Projection<B>,
        down: Projection<B>,
    },
    Experts(MixtureOfExperts<B>),
}

#[derive(Debug)]
pub(super) struct DecoderBlock<B: Backend> {
    backend: B,
    attn_norm: B::Vector,
    qkv: Qkv<B>,
    q_norm: Option<B::Vector>,
    k_norm: Option<B::Vector>,
    output: Projection<B>,
    post_attn_norm: Option<B::Vector>,
    ffn_norm: B::Vector,
    mlp: Mlp<B>,
    post_ffn_norm: Option<B::Vector>,
    activation: Activation,
    rope: Rope,
    /// The factor on the queries where they are scaled before they meet the keys (so they are
    /// rounded scaled), rather than the scores after.
    query_scale: Option<f64>,
    /// With a window on sliding-window layers.
    scoring: Scoring,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    eps: f64,
}

impl<B: Backend> DecoderBlock<B> {
    pub fn load(
        backend: &B,
        file: &GgufFile,
        config: &ModelConfig,
        layer: usize,
        residence: Residence,
    ) -> Result<Self> {
        let t = LayerTensors {
            backend,
            file,
            layer,
            residence,
        };
        let d = config.d_model;
        let q_width = config.n_heads * config.head_dim;
        let kv_width = config.n_kv_heads * config.head_dim;
        let qkv = if t.has(ATTN_QKV) {
            Qkv::Fused {
                stack: t.projection(ATTN_QKV, ATTN_QKV_BIAS, q_width + 2 * kv_width)?,
                v: None,
            }
        } else if let Some(stacked) = t.stacked(
            [(ATTN_Q, q_width), (ATTN_K, kv_width), (ATTN_V, kv_width)],
            [ATTN_Q_BIAS, ATTN_K_BIAS, ATTN_V_BIAS],
        )? {
            // Stacked where the backend computes the stack faster: the fused layout.
            Qkv::Fused {
                stack: stacked,
                v: None,
            }
        } else if let Some(qk) = t.stacked(
            [(ATTN_Q, q_width), (ATTN_K, kv_width)],
            [ATTN_Q_BIAS, ATTN_K_BIAS],
        )? {
            Qkv::Fused {
                stack: qk,
                v: Some(t.projection(ATTN_V, ATTN_V_BIAS, kv_width)?),
            }
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
                backend,
                file,
                layer,
                d,
                experts,
                config.activation,
                residence,
            )?),
            None if config.fused_gate_up => Mlp::Gated {
                gate: None,
                up: t.projection(FFN_UP, FFN_UP_BIAS, 2 * config.ffn_dim)?,
                down: t.projection(FFN_DOWN, FFN_DOWN_BIAS, d)?,
            },
            None => match t.stacked(
                [(FFN_GATE, config.ffn_dim), (FFN_UP, config.ffn_dim)],
                [FFN_GATE_BIAS, FFN_UP_BIAS],
            )? {
                // Stacked where the backend computes the stack faster: the fused layout.
                Some(both) => Mlp::Gated {
                    gate: None,
                    up: both,
                    down: t.projection(FFN_DOWN, FFN_DOWN_BIAS, d)?,
                },
                None => Mlp::Gated {
                    gate: Some(t.projection(FFN_GATE, FFN_GATE_BIAS, config.ffn_dim)?),
                    up: t.projection(FFN_UP, FFN_UP_BIAS, config.ffn_dim)?,
                    down: t.projection(FFN_DOWN, FFN_DOWN_BIAS, d)?,
                },
            },
        };
        let sliding = config.is_sliding(layer);
        let factors = match config.rope_factors {
            Some(name) => Some(load_f32(
                file,
                vector_info(file, name, config.head_dim / 2)?,
            )?),
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
            backend: backend.clone(),
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
            query_scale: config.scale_queries.then_some(config.attention_scale),
            scoring: Scoring {
                window: if sliding { config.sliding_window } else { None },
                scale: if config.scale_queries {
                    1.0
                } else {
                    config.attention_scale
                },
                softcap: config.attention_softcap,
            },
            n_heads: config.n_heads,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            eps: config.rms_eps,
        })
    }

    /// `[heads, n, head_dim]` from `[n, heads * head_dim]`, each head RMS-normalized by `norm`
    /// where there is one.
    fn heads(&self, x: &Tensor, heads: usize, norm: Option<&B::Vector>) -> Result<Tensor> {
        match norm {
            None => split_heads(x, heads, self.head_dim),
            Some(norm) => {
                let n = x.dim(0)?;
                let x = x.reshape((n, heads, self.head_dim))?;
                Ok(self.norm(&x, norm)?.transpose(0, 1)?.contiguous()?)
            }
        }
    }

    fn norm(&self, x: &Tensor, weight: &B::Vector) -> Result<Tensor> {
        self.backend.rms_norm(x, weight, self.eps)
    }
}

impl<B: Backend> Block for DecoderBlock<B> {
    fn forward(&self, x: &Tensor, segments: &mut [Segment<'_>]) -> Result<Tensor> {
        let be = &self.backend;
        let positions = positions(segments);
        let h = self.norm(x, &self.attn_norm)?;
        let q_width = self.n_heads * self.head_dim;
        let kv_width = self.n_kv_heads * self.head_dim;
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => {
                (q.forward(be, &h)?, k.forward(be, &h)?, v.forward(be, &h)?)
            }
            Qkv::Fused { stack, v } => {
                let y = stack.forward(be, &h)?;
                let v = match v {
                    Some(v) => v.forward(be, &h)?,
                    None => y.narrow(1, q_width + kv_width, kv_width)?.contiguous()?,
                };
                (
                    y.narrow(1, 0, q_width)?.contiguous()?,
                    y.narrow(1, q_width, kv_width)?.contiguous()?,
                    v,
                )
            }
        };
        let q = self.heads(&q, self.n_heads, self.q_norm.as_ref())?;
        let k = self.heads(&k, self.n_kv_heads, self.k_norm.as_ref())?;
        let v = split_heads(&v, self.n_kv_heads, self.head_dim)?;
        let angles = self.rope.table(&positions);
        let q = be.rope(&q, &self.rope, &angles[..])?;
        let k = be.rope(&k, &self.rope, &angles[..])?;
        let q = match self.query_scale {
            Some(scale) => (q * scale)?,
            None => q,
        };
        let attn = be.attend(&q, &k, &v, segments, self.scoring)?;
        let mut attn = self.output.forward(be, &attn)?;
        if let Some(norm) = &self.post_attn_norm {
            attn = self.norm(&attn, norm)?;
        }
        let x = be.add(x, &attn)?;

        let h = self.norm(&x, &self.ffn_norm)?;
        let mut mlp = match &self.mlp {
            Mlp::Gated { gate, up, down } => {
                let hidden = match gate {
                    Some(gate) => {
                        let (g, u) = (gate.forward(be, &h)?, up.forward(be, &h)?);
                        be.gated(self.activation, &g, &u)?
                    }
                    None => {
                        let both = up.forward(be, &h)?;
                        let width = both.dim(1)? / 2;
                        be.gated(
                            self.activation,
                            &both.narrow(1, 0, width)?.contiguous()?,
                            &both.narrow(1, width, width)?.contiguous()?,
                        )?
                    }
                };
                down.forward(be, &hidden)?
            }
            Mlp::Experts(experts) => experts.forward(be, &h)?,
        };
        if let Some(norm) = &self.post_ffn_norm {
            mlp = self.norm(&mlp, norm)?;
        }
        be.add(&x, &mlp)
    }
}
