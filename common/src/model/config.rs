//! Model hyper-parameters read from GGUF metadata, with the GGUF key names in one place.
//!
//! Loading honours every tensor and metadata key that changes the math of the architectures
//! Realm runs, or refuses the file naming what it does not support: a tensor Realm would not
//! read (a shared expert, a scale tensor, a bias the architecture has no place for) or a key
//! with a value Realm does not implement (YaRN RoPE scaling, partial rotary dimensions, a
//! sigmoid expert router) is an error, never silently ignored.

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};

const KEY_ARCHITECTURE: &str = "general.architecture";
const DEFAULT_ROPE_BASE: f32 = 10_000.0;
const DEFAULT_RMS_EPS: f32 = 1e-5;
/// Gemma 2's sliding window where the file does not say.
const GEMMA2_DEFAULT_WINDOW: usize = 4096;
/// Gemma 3's local (sliding-window) layers use their own RoPE base.
const GEMMA3_ROPE_BASE_LOCAL: f32 = 10_000.0;
/// The expert router's gating function as GGUF numbers it: softmax.
const GATING_SOFTMAX: usize = 1;

/// Global tensors: the embedding table, the final norm and head, RoPE frequency factors.
pub(crate) mod tensors {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    pub const OUTPUT: &str = "output.weight";
    pub const OUTPUT_BIAS: &str = "output.bias";
    /// Llama 3.1+ RoPE frequency factors (one per rotated pair).
    pub const ROPE_FREQS: &str = "rope_freqs.weight";
    /// Phi-3 LongRoPE factors, for contexts beyond the original length and within it.
    pub const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";
    pub const ROPE_FACTORS_SHORT: &str = "rope_factors_short.weight";
}

/// Names of a block's tensors, under `blk.{i}.`.
pub(crate) mod block_tensors {
    pub const ATTN_NORM: &str = "attn_norm.weight";
    pub const ATTN_Q: &str = "attn_q.weight";
    pub const ATTN_K: &str = "attn_k.weight";
    pub const ATTN_V: &str = "attn_v.weight";
    pub const ATTN_Q_BIAS: &str = "attn_q.bias";
    pub const ATTN_K_BIAS: &str = "attn_k.bias";
    pub const ATTN_V_BIAS: &str = "attn_v.bias";
    pub const ATTN_QKV: &str = "attn_qkv.weight";
    pub const ATTN_QKV_BIAS: &str = "attn_qkv.bias";
    pub const ATTN_Q_NORM: &str = "attn_q_norm.weight";
    pub const ATTN_K_NORM: &str = "attn_k_norm.weight";
    pub const ATTN_OUTPUT: &str = "attn_output.weight";
    pub const ATTN_OUTPUT_BIAS: &str = "attn_output.bias";
    pub const POST_ATTN_NORM: &str = "post_attention_norm.weight";
    pub const FFN_NORM: &str = "ffn_norm.weight";
    pub const FFN_GATE: &str = "ffn_gate.weight";
    pub const FFN_UP: &str = "ffn_up.weight";
    pub const FFN_DOWN: &str = "ffn_down.weight";
    pub const FFN_GATE_BIAS: &str = "ffn_gate.bias";
    pub const FFN_UP_BIAS: &str = "ffn_up.bias";
    pub const FFN_DOWN_BIAS: &str = "ffn_down.bias";
    pub const POST_FFN_NORM: &str = "post_ffw_norm.weight";
    pub const FFN_GATE_INP: &str = "ffn_gate_inp.weight";
    pub const FFN_GATE_EXPS: &str = "ffn_gate_exps.weight";
    pub const FFN_UP_EXPS: &str = "ffn_up_exps.weight";
    pub const FFN_DOWN_EXPS: &str = "ffn_down_exps.weight";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    Phi3,
    Gemma2,
    Gemma3,
}

impl Architecture {
    const ALL: [Self; 7] = [
        Self::Llama,
        Self::Qwen2,
        Self::Qwen3,
        Self::Qwen3Moe,
        Self::Phi3,
        Self::Gemma2,
        Self::Gemma3,
    ];

    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3moe",
            Self::Phi3 => "phi3",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3",
        }
    }

    pub fn from_gguf_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.gguf_name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|a| a.gguf_name()).collect();
                Error::Unsupported(format!(
                    "architecture `{name}` (Realm runs {})",
                    known.join(", ")
                ))
            })
    }

    fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }

    /// Block tensors (names under `blk.{i}.`) this architecture may carry, with experts or
    /// without; the blocks read every one that is present.
    fn block_tensors(self, experts: bool) -> Vec<&'static str> {
        use block_tensors::*;
        let mut names = vec![
            ATTN_NORM,
            ATTN_Q,
            ATTN_K,
            ATTN_V,
            ATTN_Q_BIAS,
            ATTN_K_BIAS,
            ATTN_V_BIAS,
            ATTN_QKV,
            ATTN_QKV_BIAS,
            ATTN_OUTPUT,
            FFN_NORM,
        ];
        match self {
            Self::Llama if experts => names.extend([
                ATTN_OUTPUT_BIAS,
                FFN_GATE_INP,
                FFN_GATE_EXPS,
                FFN_UP_EXPS,
                FFN_DOWN_EXPS,
            ]),
            Self::Llama => names.extend([
                ATTN_OUTPUT_BIAS,
                FFN_GATE,
                FFN_UP,
                FFN_DOWN,
                FFN_GATE_BIAS,
                FFN_UP_BIAS,
                FFN_DOWN_BIAS,
            ]),
            Self::Qwen2 => names.extend([FFN_GATE, FFN_UP, FFN_DOWN]),
            Self::Qwen3 => names.extend([ATTN_Q_NORM, ATTN_K_NORM, FFN_GATE, FFN_UP, FFN_DOWN]),
            Self::Qwen3Moe => names.extend([
                ATTN_Q_NORM,
                ATTN_K_NORM,
                FFN_GATE_INP,
                FFN_GATE_EXPS,
                FFN_UP_EXPS,
                FFN_DOWN_EXPS,
            ]),
            Self::Phi3 => names.extend([FFN_UP, FFN_DOWN]),
            Self::Gemma2 => {
                names.extend([POST_ATTN_NORM, FFN_GATE, FFN_UP, FFN_DOWN, POST_FFN_NORM])
            }
            Self::Gemma3 => names.extend([
                ATTN_Q_NORM,
                ATTN_K_NORM,
                POST_ATTN_NORM,
                FFN_GATE,
                FFN_UP,
                FFN_DOWN,
                POST_FFN_NORM,
            ]),
        }
        names
    }

    /// Global tensors this architecture may carry besides the embedding table and final norm.
    fn global_tensors(self) -> &'static [&'static str] {
        use tensors::*;
        match self {
            Self::Llama => &[OUTPUT, ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT],
            Self::Qwen2 => &[OUTPUT, OUTPUT_BIAS],
            Self::Phi3 => &[OUTPUT, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT],
            Self::Gemma2 => &[],
            Self::Qwen3 | Self::Qwen3Moe | Self::Gemma3 => &[OUTPUT],
        }
    }
}

/// How a block's rotary embedding pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: GGUF llama weights are permuted for this layout.
    Interleaved,
    /// Halves `(i, i + d/2)`.
    Neox,
}

/// The nonlinearity of a block's gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (SwiGLU).
    Silu,
    /// `gelu(gate) * up`, GELU in its tanh form (GeGLU).
    Gelu,
}

/// A mixture-of-experts MLP: a softmax router picks `used` of `count` experts per token, whose
/// weights are renormalized to sum to one (both architectures with experts do).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Experts {
    pub count: usize,
    pub used: usize,
    /// Each expert's MLP width.
    pub ffn_dim: usize,
    /// A factor on the experts' weights (1 for none).
    pub scale: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub n_layers: usize,
    pub d_model: usize,
    pub ffn_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_style: RopeStyle,
    /// RoPE base of global-attention layers.
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (equal to `rope_base` where there are none).
    pub rope_base_local: f32,
    /// Linear RoPE scaling of global layers: positions are multiplied by this.
    pub rope_position_scale: f32,
    /// The global tensor of per-pair RoPE frequency divisors the blocks use, if any (Llama 3's
    /// `rope_freqs`, Phi-3's long or short factors by the context length).
    pub rope_factors: Option<&'static str>,
    /// A factor on RoPE's sines and cosines (Phi-3 LongRoPE's attention factor), 1 for none.
    pub rope_attn_factor: f32,
    /// Sliding-window size in tokens, for architectures with local layers.
    pub sliding_window: Option<usize>,
    /// Which layers attend through the window.
    sliding_layers: Vec<bool>,
    pub embedding_scale: f64,
    pub attention_scale: f64,
    /// Whether the queries are multiplied by `attention_scale` before they meet the keys (so
    /// they are rounded scaled), rather than the scores after.
    pub scale_queries: bool,
    /// Gemma 2: attention scores pass through `c · tanh(s / c)`.
    pub attention_softcap: Option<f32>,
    /// Gemma 2: logits pass through `c · tanh(l / c)`.
    pub final_softcap: Option<f32>,
    /// RMS norms on every query and key head before RoPE (Qwen 3, Gemma 3).
    pub qk_norm: bool,
    /// Norms after attention and after the MLP too (Gemma).
    pub sandwich_norms: bool,
    pub activation: Activation,
    /// Phi-3: the MLP's gate and up projections are one matrix, gate rows first.
    pub fused_gate_up: bool,
    pub experts: Option<Experts>,
}

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch_name = file.get_str(KEY_ARCHITECTURE)?;
        let architecture = Architecture::from_gguf_name(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let has = |k: &str| file.get(&key(k)).is_some();
        let optional_usize = |k: &str| -> Result<Option<usize>> {
            if has(k) {
                file.get_usize(&key(k)).map(Some)
            } else {
                Ok(None)
            }
        };
        let optional_f32 = |k: &str| -> Result<Option<f32>> {
            if has(k) {
                file.get_f32(&key(k)).map(Some)
            } else {
                Ok(None)
            }
        };
        let unsupported = |what: String| -> Result<Self> {
            Err(Error::Unsupported(format!("{arch_name}: {what}")))
        };

        let n_layers = file.get_usize(&key("block_count"))?;
        let d_model = file.get_usize(&key("embedding_length"))?;
        let ffn_dim = file.get_usize(&key("feed_forward_length"))?;
        let n_heads = file.get_usize(&key("attention.head_count"))?;
        let n_kv_heads = optional_usize("attention.head_count_kv")?.unwrap_or(n_heads);
        if n_layers == 0
            || d_model == 0
            || n_heads == 0
            || n_kv_heads == 0
            || n_heads % n_kv_heads != 0
        {
            return unsupported(format!(
                "inconsistent shape: {n_layers} layers, d_model {d_model}, {n_heads} heads, {n_kv_heads} KV heads"
            ));
        }
        let head_dim = optional_usize("attention.key_length")?.unwrap_or(d_model / n_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return unsupported(format!("head dimension {head_dim} must be even"));
        }
        if let Some(v) = optional_usize("attention.value_length")? {
            if v != head_dim {
                return unsupported(format!(
                    "value heads of {v} dimensions beside key heads of {head_dim}"
                ));
            }
        }
        if let Some(rot) = optional_usize("rope.dimension_count")? {
            if rot != head_dim {
                return unsupported(format!(
                    "RoPE on {rot} of {head_dim} head dimensions (partial rotary embeddings)"
                ));
            }
        }
        let context_length = file.get_usize(&key("context_length"))?;
        let rms_eps = optional_f32("attention.layer_norm_rms_epsilon")?.unwrap_or(DEFAULT_RMS_EPS);
        let rope_base = optional_f32("rope.freq_base")?.unwrap_or(DEFAULT_ROPE_BASE);

        // RoPE scaling and frequency factors.
        let has_tensor = |name: &str| file.tensors.contains_key(name);
        let scaling = file
            .get(&key("rope.scaling.type"))
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Error::Metadata {
                        key: key("rope.scaling.type"),
                        problem: "not a string".to_string(),
                    })
                    .map(str::to_string)
            })
            .transpose()?;
        let factor = optional_f32("rope.scaling.factor")?.filter(|&f| f != 0.0);
        let mut rope_position_scale = 1.0;
        let mut rope_factors = None;
        match scaling.as_deref() {
            None | Some("none") => {}
            Some("linear") => rope_position_scale = 1.0 / factor.unwrap_or(1.0),
            Some("longrope") => {}
            Some(other) => return unsupported(format!("RoPE scaling `{other}`")),
        }
        let longrope =
            has_tensor(tensors::ROPE_FACTORS_LONG) || has_tensor(tensors::ROPE_FACTORS_SHORT);
        if has_tensor(tensors::ROPE_FREQS) {
            if longrope {
                return unsupported("both rope_freqs and LongRoPE factors".to_string());
            }
            rope_factors = Some(tensors::ROPE_FREQS);
        } else if longrope {
            // The long factors serve a context beyond the original training length.
            let original =
                optional_usize("rope.scaling.original_context_length")?.unwrap_or(context_length);
            rope_factors = Some(if context_length > original {
                tensors::ROPE_FACTORS_LONG
            } else {
                tensors::ROPE_FACTORS_SHORT
            });
        } else if scaling.as_deref() == Some("longrope") {
            return unsupported("LongRoPE scaling without its factor tensors".to_string());
        }
        if let Some(name) = rope_factors {
            let info = file.tensor_info(name)?;
            if info.dims != [head_dim as u64 / 2] {
                return Err(Error::Tensor {
                    name: name.to_string(),
                    problem: format!(
                        "expected {} factors, found dimensions {:?}",
                        head_dim / 2,
                        info.dims
                    ),
                });
            }
        }
        let rope_attn_factor = optional_f32("rope.scaling.attn_factor")?.unwrap_or(1.0);

        // Sliding windows.
        let (sliding_window, pattern) = match architecture {
            Architecture::Gemma2 => (
                Some(optional_usize("attention.sliding_window")?.unwrap_or(GEMMA2_DEFAULT_WINDOW)),
                2,
            ),
            Architecture::Gemma3 => (
                optional_usize("attention.sliding_window")?.filter(|&w| w > 0),
                6,
            ),
            // The reference engines run Phi-3 and the others without a window, whatever the
            // file says (Phi-3's window is known to be set wrongly by the converters).
            _ => (None, 1),
        };
        let sliding_layers = match (
            sliding_window,
            file.get(&key("attention.sliding_window_pattern")),
        ) {
            (None, _) => vec![false; n_layers],
            (Some(_), Some(value)) if value.as_i64().is_none() => {
                let pattern_key = key("attention.sliding_window_pattern");
                let flags = file
                    .get_array(&pattern_key)?
                    .iter()
                    .map(|v| match v {
                        Value::Bool(b) => Some(*b),
                        v => v.as_i64().map(|i| i != 0),
                    })
                    .collect::<Option<Vec<bool>>>()
                    .ok_or_else(|| Error::Metadata {
                        key: pattern_key,
                        problem: "not an array of flags".to_string(),
                    })?;
                if flags.len() != n_layers {
                    return unsupported(format!(
                        "a sliding-window pattern of {} layers for {n_layers}",
                        flags.len()
                    ));
                }
                flags
            }
            (Some(_), value) => {
                let pattern = match value {
                    Some(_) => file.get_usize(&key("attention.sliding_window_pattern"))?,
                    None => pattern,
                };
                if pattern == 0 {
                    return unsupported("a sliding-window pattern of 0".to_string());
                }
                (0..n_layers).map(|l| l % pattern < pattern - 1).collect()
            }
        };
        let rope_base_local = match architecture {
            Architecture::Gemma3 => {
                optional_f32("rope.freq_base_swa")?.unwrap_or(GEMMA3_ROPE_BASE_LOCAL)
            }
            _ => optional_f32("rope.freq_base_swa")?.unwrap_or(rope_base),
        };

        // Attention.
        let attention_scale = match architecture {
            Architecture::Llama => match optional_f32("attention.scale")? {
                Some(s) if s != 0.0 => s as f64,
                _ => 1.0 / (head_dim as f64).sqrt(),
            },
            // Gemma's 27B model scales by the width per head rather than the head size.
            Architecture::Gemma2 if n_layers == 46 => 1.0 / ((d_model / n_heads) as f64).sqrt(),
            Architecture::Gemma3 if n_layers == 62 => 1.0 / ((d_model / n_heads) as f64).sqrt(),
            _ => 1.0 / (head_dim as f64).sqrt(),
        };
        let attention_softcap = match architecture {
            Architecture::Gemma2 => optional_f32("attn_logit_softcapping")?.filter(|&c| c != 0.0),
            _ => None,
        };
        let final_softcap = if architecture.is_gemma() {
            optional_f32("final_logit_softcapping")?.filter(|&c| c != 0.0)
        } else {
            None
        };

        // Mixture of experts.
        let expert_count = optional_usize("expert_count")?.unwrap_or(0);
        let experts = match (architecture, expert_count) {
            (Architecture::Llama, 0) => None,
            (Architecture::Llama | Architecture::Qwen3Moe, count) => {
                if count == 0 {
                    return unsupported("no experts".to_string());
                }
                let used = optional_usize("expert_used_count")?.unwrap_or(0);
                if used == 0 || used > count {
                    return unsupported(format!("{used} experts used of {count}"));
                }
                if optional_usize("expert_shared_count")?.unwrap_or(0) > 0 {
                    return unsupported("shared experts".to_string());
                }
                if let Some(gating) = optional_usize("expert_gating_func")? {
                    if gating != GATING_SOFTMAX {
                        return unsupported(format!(
                            "expert gating function {gating} (Realm routes by softmax)"
                        ));
                    }
                }
                let expert_ffn = match architecture {
                    Architecture::Qwen3Moe => {
                        optional_usize("expert_feed_forward_length")?.unwrap_or(ffn_dim / used)
                    }
                    _ => ffn_dim,
                };
                Some(Experts {
                    count,
                    used,
                    ffn_dim: expert_ffn,
                    scale: optional_f32("expert_weights_scale")?
                        .filter(|&s| s != 0.0)
                        .unwrap_or(1.0),
                })
            }
            (_, 0) => None,
            (_, count) => {
                return unsupported(format!(
                    "{count} experts (Realm runs experts in llama and qwen3moe files)"
                ))
            }
        };

        let config = Self {
            architecture,
            n_layers,
            d_model,
            ffn_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            context_length,
            rms_eps: rms_eps as f64,
            rope_style: match architecture {
                Architecture::Llama => RopeStyle::Interleaved,
                _ => RopeStyle::Neox,
            },
            rope_base,
            rope_base_local,
            rope_position_scale,
            rope_factors,
            rope_attn_factor,
            sliding_window,
            sliding_layers,
            embedding_scale: if architecture.is_gemma() {
                (d_model as f64).sqrt()
            } else {
                1.0
            },
            attention_scale,
            scale_queries: matches!(
                architecture,
                Architecture::Phi3 | Architecture::Gemma2 | Architecture::Gemma3
            ),
            attention_softcap,
            final_softcap,
            qk_norm: matches!(
                architecture,
                Architecture::Qwen3 | Architecture::Qwen3Moe | Architecture::Gemma3
            ),
            sandwich_norms: architecture.is_gemma(),
            activation: if architecture.is_gemma() {
                Activation::Gelu
            } else {
                Activation::Silu
            },
            fused_gate_up: architecture == Architecture::Phi3,
            experts,
        };
        config.check_tensors(file)?;
        Ok(config)
    }

    /// Refuses a file holding a tensor Realm would not read: its math would be silently wrong.
    fn check_tensors(&self, file: &GgufFile) -> Result<()> {
        let block = self.architecture.block_tensors(self.experts.is_some());
        let global = self.architecture.global_tensors();
        for name in file.tensors.keys() {
            let known = match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
                Some((layer, rest)) => {
                    layer.parse::<usize>().is_ok_and(|l| l < self.n_layers) && block.contains(&rest)
                }
                None => {
                    name == tensors::TOKEN_EMBD
                        || name == tensors::OUTPUT_NORM
                        || global.contains(&name.as_str())
                }
            };
            if !known && self.experts.is_none() && name.contains("_exps.") {
                return Err(Error::Unsupported(format!(
                    "tensor `{name}`: expert tensors in a {} file that declares no \
                     `{}.expert_count`",
                    self.architecture.gguf_name(),
                    self.architecture.gguf_name()
                )));
            }
            if !known {
                return Err(Error::Unsupported(format!(
                    "tensor `{name}`: Realm's {} blocks have no use for it, and running \
                     without it would give wrong answers",
                    self.architecture.gguf_name()
                )));
            }
        }
        Ok(())
    }

    /// Whether `layer` attends through a sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_layers.get(layer).copied().unwrap_or(false)
    }

    /// Checks that `n_new` tokens after `position` cached ones fit the context window.
    pub fn check_fits(&self, position: usize, n_new: usize) -> Result<()> {
        if n_new == 0 {
            return Err(Error::InvalidArgument("no tokens to run".to_string()));
        }
        match position.checked_add(n_new) {
            Some(total) if total <= self.context_length => Ok(()),
            _ => Err(Error::ContextOverflow {
                tokens: position.saturating_add(n_new),
                context: self.context_length,
            }),
        }
    }
}
