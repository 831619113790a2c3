//! The `gemma3` architecture. What sets it apart from llama:
//! - embeddings scaled by √d_model (done in the embedding stage);
//! - RMSNorm on every query and key head (QK-norm) before NeoX-style RoPE;
//! - norms both before and after attention and the MLP ("sandwich" norms);
//! - a GELU (tanh approximation) gated MLP, with GELU evaluated at f16 precision like the
//!   reference GGUF engines (whose perplexity Realm matches);
//! - five sliding-window layers (own RoPE base) for every global layer; the window applies to
//!   every step, single-token decode included.
//!
//! GGUF norm weights already include Gemma's `1 +` offset, so they multiply as stored.

use candle_core::{Device, Tensor};

use super::attention::{attend, positions, split_heads, Rope, RopeStyle, Segment};
use super::elementwise::{add, combine, SLICE};
use super::llama::names::*;
use super::norm::rms_norm;
use super::{load_vector, Block, Linear, ModelConfig};
use crate::error::Result;
use crate::gguf::GgufFile;

const ATTN_Q_NORM: &str = "attn_q_norm.weight";
const ATTN_K_NORM: &str = "attn_k_norm.weight";
const POST_ATTN_NORM: &str = "post_attention_norm.weight";
const POST_FFN_NORM: &str = "post_ffw_norm.weight";

#[derive(Debug)]
pub(super) struct Gemma3Block {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    wo: Linear,
    post_attn_norm: Tensor,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Tensor,
    rope: Rope,
    /// `Some` on sliding-window layers.
    window: Option<usize>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    eps: f64,
    scale: f64,
    device: Device,
}

impl Gemma3Block {
    pub fn load(
        file: &GgufFile,
        config: &ModelConfig,
        layer: usize,
        device: &Device,
    ) -> Result<Self> {
        let name = |n: &str| format!("blk.{layer}.{n}");
        let matmul = |n: &str| Linear::load(file, &name(n), device);
        let vector = |n: &str, len: usize| load_vector(file, &name(n), len, device);
        let sliding = config.is_sliding(layer);
        let rope = if sliding {
            Rope::new(
                RopeStyle::Neox,
                config.head_dim,
                config.rope_base_local,
                1.0,
            )
        } else {
            Rope::new(
                RopeStyle::Neox,
                config.head_dim,
                config.rope_base,
                config.rope_position_scale,
            )
        };
        Ok(Self {
            attn_norm: vector(ATTN_NORM, config.d_model)?,
            wq: matmul(ATTN_Q)?,
            wk: matmul(ATTN_K)?,
            wv: matmul(ATTN_V)?,
            q_norm: vector(ATTN_Q_NORM, config.head_dim)?,
            k_norm: vector(ATTN_K_NORM, config.head_dim)?,
            wo: matmul(ATTN_OUTPUT)?,
            post_attn_norm: vector(POST_ATTN_NORM, config.d_model)?,
            ffn_norm: vector(FFN_NORM, config.d_model)?,
            gate: matmul(FFN_GATE)?,
            up: matmul(FFN_UP)?,
            down: matmul(FFN_DOWN)?,
            post_ffn_norm: vector(POST_FFN_NORM, config.d_model)?,
            rope,
            window: if sliding { config.sliding_window } else { None },
            n_heads: config.n_heads,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            eps: config.rms_eps,
            scale: config.attention_scale,
            device: device.clone(),
        })
    }
}

impl Block for Gemma3Block {
    fn forward(&self, x: &Tensor, segments: &mut [Segment<'_>]) -> Result<Tensor> {
        let positions = positions(segments);
        let n = x.dim(0)?;
        let h = rms_norm(x, &self.attn_norm, self.eps)?;
        let q = self
            .wq
            .forward(&h)?
            .reshape((n, self.n_heads, self.head_dim))?;
        let k = self
            .wk
            .forward(&h)?
            .reshape((n, self.n_kv_heads, self.head_dim))?;
        let q = rms_norm(&q, &self.q_norm, self.eps)?
            .transpose(0, 1)?
            .contiguous()?;
        let k = rms_norm(&k, &self.k_norm, self.eps)?
            .transpose(0, 1)?
            .contiguous()?;
        let v = split_heads(&self.wv.forward(&h)?, self.n_kv_heads, self.head_dim)?;
        let q = self.rope.apply(&q, &positions, &self.device)?;
        let k = self.rope.apply(&k, &positions, &self.device)?;
        let attn = attend(&q, &k, &v, segments, self.window, self.scale)?;
        let attn = rms_norm(&self.wo.forward(&attn)?, &self.post_attn_norm, self.eps)?;
        let x = add(x, &attn)?;

        let h = rms_norm(&x, &self.ffn_norm, self.eps)?;
        let mlp = geglu(&self.gate.forward(&h)?, &self.up.forward(&h)?)?;
        let mlp = rms_norm(&self.down.forward(&mlp)?, &self.post_ffn_norm, self.eps)?;
        add(&x, &mlp)
    }
}

/// `gelu(gate) * up`, GELU in its tanh form evaluated on the f16-rounded input and rounded to
/// f16 (saturating to 0 and identity beyond ±10), the precision the reference engines tabulate
/// it at. Exact f32 GELU moves gemma3's perplexity by about 1% against them. Since it depends
/// on the f16 input alone, it is tabulated once for all 65,536 of them, as f32. The inputs are
/// rounded to f16 a slice at a time (one instruction per eight where the CPU has F16C) and the
/// slices share the kernels' threads.
fn geglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
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
                table[b.to_bits() as usize] * u
            };
        }
    })
}

/// GELU (tanh form) of every f16, rounded to f16 (and held as f32), indexed by the input's bits.
fn gelu_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        const COEF_A: f32 = 0.044_715;
        (0..=u16::MAX)
            .map(|bits| {
                let x = half::f16::from_bits(bits).to_f32();
                let gelu = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh());
                half::f16::from_f32(gelu).to_f32()
            })
            .collect()
    })
}
