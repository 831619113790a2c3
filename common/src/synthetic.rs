//! Synthetic models: GGUF files with random weights, of any depth and width, in the tensor
//! layouts and metadata of the architectures Realm runs (see [`SyntheticArch`]), quantized to
//! Q4_0, Q8_0 or the Q4_K_M mix. They serve two purposes: shards larger than a worker's memory
//! budget (tests use tiny ones, benchmarks large), and models of the architectures no real
//! weights of are at hand, which the reference engines run too, so Realm's numerics can be
//! checked against theirs. Their weights are scaled so the next-token distribution is peaked
//! and moves with the context, as a trained model's does, and so each architectural feature
//! (biases, norms, RoPE factors, windows, soft caps, routing) changes the answers.
//!
//! Each carries a minimal byte-level BPE tokenizer (`gpt2`, pre-tokenizer `gpt-2`): one token
//! per byte, no merges, an `<|endoftext|>` control token as BOS and EOS, and unused padding
//! tokens up to the vocabulary size, so the coordinator and the single-process path run them
//! like any model. The head's rows of the tokens past ASCII are zero, so greedy generation
//! emits ASCII and never stops before its token budget.
//!
//! The file is written as it is generated, tensor by tensor, so a multi-gigabyte model needs
//! only one tensor's worth of memory. The same spec and seed always give the same bytes.

use std::io::{BufWriter, Write};
use std::path::Path;

use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

const ALIGNMENT: u64 = 32;
const QK: usize = 32;
/// Values of a K-quant super-block.
const QK_K: usize = 256;
const TYPE_I32: u32 = 5;
const TYPE_U32: u32 = 4;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

/// Tokens of the synthetic tokenizer: one per byte, then this control token (BOS and EOS).
const BYTE_TOKENS: usize = 256;
/// The byte tokens a synthetic model predicts: ASCII.
const ASCII_TOKENS: usize = 128;
const END_OF_TEXT: &str = "<|endoftext|>";
const EMBEDDING: &str = "token_embd.weight";
/// GGUF token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_UNUSED: i32 = 5;

/// The architecture a synthetic model is written as: its tensors, shapes and metadata are
/// those the reference engines read for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticArch {
    /// `llama` as SmolLM2 and Llama 2 store it.
    Llama,
    /// `llama` as Llama 3.1+ stores it: a `rope_freqs` factor table and 128-dimension heads.
    Llama3,
    /// `llama` with Mixtral-style experts: a router and three-dimensional expert tensors.
    Mixtral,
    /// `qwen2`: biases on the queries, keys and values.
    Qwen2,
    /// `qwen3`: an RMS norm on every query and key head, 128-dimension heads.
    Qwen3,
    /// `qwen3moe`: Qwen 3 attention over a mixture of experts.
    Qwen3Moe,
    /// `phi3`: fused QKV and gate/up matrices, LongRoPE factors beyond the original context.
    Phi3,
    /// `gemma2`: sandwich norms, GeGLU, alternating sliding-window layers, soft-capped
    /// attention scores and logits, a tied head.
    Gemma2,
}

impl SyntheticArch {
    pub const ALL: [Self; 8] = [
        Self::Llama,
        Self::Llama3,
        Self::Mixtral,
        Self::Qwen2,
        Self::Qwen3,
        Self::Qwen3Moe,
        Self::Phi3,
        Self::Gemma2,
    ];

    /// The name `realm-coordinator synth --arch` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Llama3 => "llama3",
            Self::Mixtral => "mixtral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3moe",
            Self::Phi3 => "phi3",
            Self::Gemma2 => "gemma2",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|a| a.name()).collect();
                Error::InvalidArgument(format!(
                    "synthetic architecture `{name}` (one of {})",
                    known.join(", ")
                ))
            })
    }

    /// `general.architecture`.
    fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama | Self::Llama3 | Self::Mixtral => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3moe",
            Self::Phi3 => "phi3",
            Self::Gemma2 => "gemma2",
        }
    }

    fn has_experts(self) -> bool {
        matches!(self, Self::Mixtral | Self::Qwen3Moe)
    }

    fn is_gemma(self) -> bool {
        self == Self::Gemma2
    }
}

/// Weight format of a synthetic model's matrices (norms, biases, factors and expert routers
/// are always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticDType {
    Q4_0,
    Q8_0,
    /// The mix of the reference quantizer's Q4_K_M: Q4_K, with Q6_K for the head and for the
    /// value and down projections of some layers.
    Q4KM,
}

impl SyntheticDType {
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "q4_0" => Ok(Self::Q4_0),
            "q8_0" => Ok(Self::Q8_0),
            "q4_k_m" => Ok(Self::Q4KM),
            other => Err(Error::InvalidArgument(format!(
                "dtype `{other}` (supported: q4_0, q8_0, q4_k_m)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "q4_0",
            Self::Q8_0 => "q8_0",
            Self::Q4KM => "q4_k_m",
        }
    }
}

/// The storage format of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    F32,
    Q4_0,
    Q8_0,
    Q4K,
    Q6K,
}

impl Format {
    fn ggml_id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::Q4_0 => 2,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q6K => 14,
        }
    }

    /// (values, bytes) of one block.
    fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::Q4_0 => (QK, 2 + QK / 2),
            Self::Q8_0 => (QK, 2 + QK),
            Self::Q4K => (QK_K, 144),
            Self::Q6K => (QK_K, 210),
        }
    }

    fn bytes(self, elements: u64) -> u64 {
        let (values, bytes) = self.block();
        elements / values as u64 * bytes as u64
    }
}

/// The shape of a synthetic model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticSpec {
    pub arch: SyntheticArch,
    pub n_layers: usize,
    /// Hidden width; a multiple of 32 (of 256 for Q4_K_M).
    pub d_model: usize,
    /// MLP width (each expert's, with experts); a multiple of 32 (of 256 for Q4_K_M).
    pub ffn_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Dimensions per head; `d_model / n_heads` when 0.
    pub head_dim: usize,
    /// Experts per MoE block, and how many each token uses (architectures with experts).
    pub experts: usize,
    pub experts_used: usize,
    /// Vocabulary size; raised to 257 (256 byte tokens and `<|endoftext|>`) where smaller.
    pub vocab: usize,
    pub context_length: usize,
    pub dtype: SyntheticDType,
    pub seed: u64,
}

/// The roles tensors play, which decide their values.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// A matrix multiplying activations of width `fan_in`: values of standard deviation
    /// `gain / √fan_in`.
    Matrix { gain: f32 },
    /// The embedding table (and, tied, the head).
    Embedding,
    /// The untied head.
    Output,
    /// A norm's weights, around `centre`.
    Norm { centre: f32 },
    /// A bias vector.
    Bias,
    /// RoPE frequency divisors, one per rotated pair.
    RopeFactors(RopeTable),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RopeTable {
    /// Llama 3's scaling of the slow frequencies.
    Llama3,
    PhiShort,
    PhiLong,
}

struct TensorSpec {
    name: String,
    /// ggml order: innermost first.
    dims: Vec<u64>,
    format: Format,
    role: Role,
}

/// Llama 3-style RoPE scaling of the synthetic models: frequencies of wavelength beyond
/// `LLAMA3_ORIGINAL / LOW` tokens slow down by `LLAMA3_FACTOR`, those below
/// `LLAMA3_ORIGINAL / HIGH` keep theirs, with a smooth blend between. The original context is
/// small so that the factors act within a short test text.
const LLAMA3_ORIGINAL: f32 = 64.0;
const LLAMA3_FACTOR: f32 = 8.0;
const LLAMA3_LOW: f32 = 1.0;
const LLAMA3_HIGH: f32 = 4.0;
const ROPE_BASE: f32 = 10_000.0;
/// Phi-3's original context; the synthetic model declares twice as much, so the long factors
/// apply.
const PHI3_ORIGINAL_CONTEXT: usize = 4096;
/// Gemma 2's window, small enough for a short test text to cross it, and its soft caps, low
/// enough to bend the synthetic scores and logits.
const GEMMA2_WINDOW: usize = 32;
const GEMMA2_ATTN_SOFTCAP: f32 = 10.0;
const GEMMA2_FINAL_SOFTCAP: f32 = 10.0;
/// Standard deviation of the logits: a peaked next-token distribution, as a trained model's.
const LOGIT_SCALE: f32 = 4.0;

impl SyntheticSpec {
    /// A small llama model: `n_layers` blocks of width `d_model` (MLP 4× wider), 4 heads,
    /// 2 KV heads.
    pub fn small(n_layers: usize, d_model: usize, dtype: SyntheticDType) -> Self {
        Self {
            arch: SyntheticArch::Llama,
            n_layers,
            d_model,
            ffn_dim: 4 * d_model,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 0,
            experts: 0,
            experts_used: 0,
            vocab: 256,
            context_length: 2048,
            dtype,
            seed: 0x5eed,
        }
    }

    /// The model of `arch` the agreement fixtures are made from: 4 blocks of width 256, a
    /// 768-wide MLP (four 256-wide experts, two used, with experts), heads of 64 dimensions
    /// (128 where the architecture's real models have them).
    pub fn fixture(arch: SyntheticArch, dtype: SyntheticDType) -> Self {
        let wide_heads = matches!(
            arch,
            SyntheticArch::Llama3 | SyntheticArch::Qwen3 | SyntheticArch::Qwen3Moe
        ) || arch.is_gemma();
        Self {
            arch,
            n_layers: 4,
            d_model: 256,
            ffn_dim: if arch.has_experts() { 256 } else { 768 },
            n_heads: if arch.is_gemma() { 2 } else { 4 },
            n_kv_heads: if arch.is_gemma() { 1 } else { 2 },
            head_dim: if wide_heads { 128 } else { 64 },
            experts: if arch.has_experts() { 4 } else { 0 },
            experts_used: if arch.has_experts() { 2 } else { 0 },
            vocab: 257,
            context_length: if arch == SyntheticArch::Phi3 {
                2 * PHI3_ORIGINAL_CONTEXT
            } else {
                4096
            },
            dtype,
            seed: 0x5eed,
        }
    }

    /// The vocabulary the file holds: `vocab`, at least the byte tokens and `<|endoftext|>`.
    pub fn vocab_size(&self) -> usize {
        self.vocab.max(BYTE_TOKENS + 1)
    }

    fn head_dim(&self) -> usize {
        if self.head_dim == 0 {
            self.d_model / self.n_heads.max(1)
        } else {
            self.head_dim
        }
    }

    /// Bytes of the file `write` writes for this spec, tokenizer metadata aside.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|t| {
                t.format
                    .bytes(t.dims.iter().product())
                    .next_multiple_of(ALIGNMENT)
            })
            .sum()
    }

    fn check(&self) -> Result<()> {
        let width = match self.dtype {
            SyntheticDType::Q4KM => QK_K,
            _ => QK,
        };
        let head_dim = self.head_dim();
        let q_width = self.n_heads * head_dim;
        let ok = self.n_layers > 0
            && self.d_model > 0
            && self.ffn_dim > 0
            && self.d_model.is_multiple_of(width)
            && self.ffn_dim.is_multiple_of(width)
            && q_width.is_multiple_of(width)
            && self.n_heads > 0
            && self.n_kv_heads > 0
            && self.n_heads.is_multiple_of(self.n_kv_heads)
            && head_dim > 0
            && head_dim.is_multiple_of(2)
            && (self.head_dim != 0 || self.d_model.is_multiple_of(self.n_heads))
            && (!self.arch.has_experts()
                || (self.experts > 0 && (1..=self.experts).contains(&self.experts_used)))
            && self.vocab > 0;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "synthetic model shape {self:?}: widths (and heads × head dimensions) must be \
                 multiples of {width}, head dimensions even, KV heads divide heads, and a model \
                 with experts uses between 1 and all of them"
            )))
        }
    }

    /// The format of a matrix: the dtype, or the Q4_K_M mix.
    fn matrix_format(&self, name: &str, layer: Option<usize>) -> Format {
        match self.dtype {
            SyntheticDType::Q4_0 => Format::Q4_0,
            SyntheticDType::Q8_0 => Format::Q8_0,
            SyntheticDType::Q4KM => {
                let more_bits = layer.is_some_and(|i| {
                    let n = self.n_layers;
                    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
                });
                let sensitive = ["attn_v.", "ffn_down.", "ffn_down_exps."]
                    .iter()
                    .any(|p| name.ends_with(&format!("{p}weight")));
                if name == "output.weight" || (sensitive && more_bits) {
                    Format::Q6K
                } else {
                    Format::Q4K
                }
            }
        }
    }

    /// Every tensor, in file order.
    fn tensors(&self) -> Vec<TensorSpec> {
        let arch = self.arch;
        let d = self.d_model as u64;
        let head_dim = self.head_dim() as u64;
        let q = self.n_heads as u64 * head_dim;
        let kv = self.n_kv_heads as u64 * head_dim;
        let f = self.ffn_dim as u64;
        let e = self.experts as u64;
        let mut t = Vec::new();
        let mut push = |name: String, dims: Vec<u64>, role: Role, layer: Option<usize>| {
            let format = match role {
                Role::Matrix { .. } | Role::Embedding | Role::Output => {
                    self.matrix_format(&name, layer)
                }
                _ => Format::F32,
            };
            t.push(TensorSpec {
                name,
                dims,
                format,
                role,
            })
        };
        let norm = Role::Norm { centre: 1.0 };
        push(
            EMBEDDING.to_string(),
            vec![d, self.vocab_size() as u64],
            Role::Embedding,
            None,
        );
        push(
            "output_norm.weight".to_string(),
            vec![d],
            Role::Norm {
                centre: if arch.is_gemma() { LOGIT_SCALE } else { 1.0 },
            },
            None,
        );
        if !arch.is_gemma() {
            push(
                "output.weight".to_string(),
                vec![d, self.vocab_size() as u64],
                Role::Output,
                None,
            );
        }
        match arch {
            SyntheticArch::Llama3 => push(
                "rope_freqs.weight".to_string(),
                vec![head_dim / 2],
                Role::RopeFactors(RopeTable::Llama3),
                None,
            ),
            SyntheticArch::Phi3 => {
                push(
                    "rope_factors_long.weight".to_string(),
                    vec![head_dim / 2],
                    Role::RopeFactors(RopeTable::PhiLong),
                    None,
                );
                push(
                    "rope_factors_short.weight".to_string(),
                    vec![head_dim / 2],
                    Role::RopeFactors(RopeTable::PhiShort),
                    None,
                );
            }
            _ => {}
        }
        // Scores of a few units: softmax neither uniform nor one-hot (Gemma 2's more, for
        // its soft cap to bend).
        let qk_gain = if arch.is_gemma() { 1.6 } else { 1.2 };
        let unit = Role::Matrix { gain: 1.0 };
        for i in 0..self.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let l = Some(i);
            push(n("attn_norm.weight"), vec![d], norm, l);
            if arch == SyntheticArch::Phi3 {
                push(
                    n("attn_qkv.weight"),
                    vec![d, q + 2 * kv],
                    Role::Matrix { gain: qk_gain },
                    l,
                );
            } else {
                push(
                    n("attn_q.weight"),
                    vec![d, q],
                    Role::Matrix { gain: qk_gain },
                    l,
                );
                push(
                    n("attn_k.weight"),
                    vec![d, kv],
                    Role::Matrix { gain: qk_gain },
                    l,
                );
                push(n("attn_v.weight"), vec![d, kv], unit, l);
            }
            if arch == SyntheticArch::Qwen2 {
                push(n("attn_q.bias"), vec![q], Role::Bias, l);
                push(n("attn_k.bias"), vec![kv], Role::Bias, l);
                push(n("attn_v.bias"), vec![kv], Role::Bias, l);
            }
            if matches!(arch, SyntheticArch::Qwen3 | SyntheticArch::Qwen3Moe) {
                push(n("attn_q_norm.weight"), vec![head_dim], norm, l);
                push(n("attn_k_norm.weight"), vec![head_dim], norm, l);
            }
            push(n("attn_output.weight"), vec![q, d], unit, l);
            if arch.is_gemma() {
                push(n("post_attention_norm.weight"), vec![d], norm, l);
            }
            push(n("ffn_norm.weight"), vec![d], norm, l);
            if arch.has_experts() {
                push(
                    n("ffn_gate_inp.weight"),
                    vec![d, e],
                    Role::Matrix { gain: 2.0 },
                    l,
                );
                push(n("ffn_gate_exps.weight"), vec![d, f, e], unit, l);
                push(n("ffn_up_exps.weight"), vec![d, f, e], unit, l);
                push(n("ffn_down_exps.weight"), vec![f, d, e], unit, l);
            } else if arch == SyntheticArch::Phi3 {
                push(n("ffn_up.weight"), vec![d, 2 * f], unit, l);
                push(n("ffn_down.weight"), vec![f, d], unit, l);
            } else {
                push(n("ffn_gate.weight"), vec![d, f], unit, l);
                push(n("ffn_up.weight"), vec![d, f], unit, l);
                push(n("ffn_down.weight"), vec![f, d], unit, l);
            }
            if arch.is_gemma() {
                push(n("post_ffw_norm.weight"), vec![d], norm, l);
            }
        }
        // The router stays f32, as the reference quantizer leaves it.
        for tensor in &mut t {
            if tensor.name.ends_with("ffn_gate_inp.weight") {
                tensor.format = Format::F32;
            }
        }
        t
    }

    /// The architecture's hyper-parameters, under `{arch}.`.
    fn metadata(&self) -> Vec<(String, Meta)> {
        let arch = self.arch.gguf_name();
        let key = |k: &str| format!("{arch}.{k}");
        let u32_kv = |k: &str, v: usize| (key(k), Meta::U32(v as u32));
        let mut meta = vec![
            u32_kv("block_count", self.n_layers),
            u32_kv("embedding_length", self.d_model),
            u32_kv(
                "feed_forward_length",
                if self.arch.has_experts() && self.arch == SyntheticArch::Qwen3Moe {
                    3 * self.ffn_dim
                } else {
                    self.ffn_dim
                },
            ),
            u32_kv("attention.head_count", self.n_heads),
            u32_kv("attention.head_count_kv", self.n_kv_heads),
            u32_kv("context_length", self.context_length),
            (key("attention.layer_norm_rms_epsilon"), Meta::F32(1e-6)),
            (key("rope.freq_base"), Meta::F32(ROPE_BASE)),
        ];
        if self.head_dim != 0 {
            meta.push(u32_kv("attention.key_length", self.head_dim));
            meta.push(u32_kv("attention.value_length", self.head_dim));
        }
        if self.arch.has_experts() {
            meta.push(u32_kv("expert_count", self.experts));
            meta.push(u32_kv("expert_used_count", self.experts_used));
        }
        if self.arch == SyntheticArch::Qwen3Moe {
            meta.push(u32_kv("expert_feed_forward_length", self.ffn_dim));
        }
        match self.arch {
            SyntheticArch::Phi3 => {
                let scale = self.context_length as f32 / PHI3_ORIGINAL_CONTEXT as f32;
                let attn_factor = (1.0 + scale.ln() / (PHI3_ORIGINAL_CONTEXT as f32).ln()).sqrt();
                meta.push(u32_kv(
                    "rope.scaling.original_context_length",
                    PHI3_ORIGINAL_CONTEXT,
                ));
                meta.push((key("rope.scaling.attn_factor"), Meta::F32(attn_factor)));
                meta.push(u32_kv("rope.dimension_count", self.head_dim()));
            }
            SyntheticArch::Gemma2 => {
                meta.push(u32_kv("attention.sliding_window", GEMMA2_WINDOW));
                meta.push((
                    key("attn_logit_softcapping"),
                    Meta::F32(GEMMA2_ATTN_SOFTCAP),
                ));
                meta.push((
                    key("final_logit_softcapping"),
                    Meta::F32(GEMMA2_FINAL_SOFTCAP),
                ));
            }
            _ => {}
        }
        meta
    }
}

/// RoPE frequency divisors for the `pairs` rotated pairs of a head.
fn rope_factors(table: RopeTable, pairs: usize) -> Vec<f32> {
    (0..pairs)
        .map(|i| {
            let inv_freq = ROPE_BASE.powf(-(i as f32) / pairs as f32);
            match table {
                RopeTable::Llama3 => {
                    let wavelength = 2.0 * std::f32::consts::PI / inv_freq;
                    if wavelength < LLAMA3_ORIGINAL / LLAMA3_HIGH {
                        1.0
                    } else if wavelength > LLAMA3_ORIGINAL / LLAMA3_LOW {
                        LLAMA3_FACTOR
                    } else {
                        let smooth = (LLAMA3_ORIGINAL / wavelength - LLAMA3_LOW)
                            / (LLAMA3_HIGH - LLAMA3_LOW);
                        1.0 / ((1.0 - smooth) / LLAMA3_FACTOR + smooth)
                    }
                }
                RopeTable::PhiShort => 1.0 + 0.1 * i as f32 / pairs as f32,
                RopeTable::PhiLong => 1.0 + 15.0 * (i as f32 / pairs as f32).powi(2),
            }
        })
        .collect()
}

/// Writes the model described by `spec` to `path`.
pub fn write(path: &Path, spec: &SyntheticSpec) -> Result<()> {
    write_edited(path, spec, |_, _| {})
}

/// [`write`], with the tensor list and the metadata passed through `edit` first (tests make
/// files Realm must refuse this way).
fn write_edited(
    path: &Path,
    spec: &SyntheticSpec,
    edit: impl FnOnce(&mut Vec<TensorSpec>, &mut Vec<(String, Meta)>),
) -> Result<()> {
    spec.check()?;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut out = BufWriter::new(std::fs::File::create(path).map_err(io)?);
    let mut tensors = spec.tensors();
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Meta::Str(spec.arch.gguf_name().into()),
        ),
        (
            "general.name".to_string(),
            Meta::Str("realm-synthetic".into()),
        ),
        ("general.alignment".to_string(), Meta::U32(ALIGNMENT as u32)),
    ];
    meta.extend(spec.metadata());
    meta.extend(tokenizer_metadata(spec.vocab_size()));
    edit(&mut tensors, &mut meta);

    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, value) in &meta {
        put_string(&mut header, key);
        value.write(&mut header);
    }
    let mut offset = 0u64;
    for t in &tensors {
        put_string(&mut header, &t.name);
        header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            header.extend_from_slice(&d.to_le_bytes());
        }
        header.extend_from_slice(&t.format.ggml_id().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.format.bytes(t.dims.iter().product())).next_multiple_of(ALIGNMENT);
    }
    pad(&mut header, 0);
    out.write_all(&header).map_err(io)?;

    let mut rng = StdRng::seed_from_u64(spec.seed);
    for t in &tensors {
        let values = tensor_values(spec, t, &mut rng);
        let mut data = Vec::new();
        encode(t.format, &values, &mut data);
        pad(&mut data, 0);
        out.write_all(&data).map_err(io)?;
    }
    out.flush().map_err(io)
}

/// Uniform values of standard deviation `std`.
fn uniform(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    let bound = std * 3f32.sqrt();
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

fn tensor_values(spec: &SyntheticSpec, t: &TensorSpec, rng: &mut StdRng) -> Vec<f32> {
    let n = t.dims.iter().product::<u64>() as usize;
    let fan_in = t.dims[0] as f32;
    match t.role {
        Role::Matrix { gain } => uniform(rng, n, gain / fan_in.sqrt()),
        Role::Embedding => {
            // Gemma scales embeddings by √d_model: its rows are that much smaller. The head
            // of a tied model reads them too (see `Role::Output`).
            let std = if spec.arch.is_gemma() {
                1.0 / fan_in.sqrt()
            } else {
                1.0
            };
            let mut v = uniform(rng, n, std);
            if spec.arch.is_gemma() {
                v[ASCII_TOKENS * t.dims[0] as usize..].fill(0.0);
            }
            v
        }
        Role::Output => {
            // Zero rows give the bytes past ASCII, `<|endoftext|>` and the padding a logit of
            // 0, below the largest of 128 random ASCII logits: greedy generation never ends
            // early (benchmarks get the tokens they ask for) and prints ASCII text, which
            // every engine returns token by token (a byte inside a UTF-8 character is held
            // back until the character completes).
            let mut v = uniform(rng, n, LOGIT_SCALE / fan_in.sqrt());
            v[ASCII_TOKENS * t.dims[0] as usize..].fill(0.0);
            v
        }
        Role::Norm { centre } => (0..n)
            .map(|_| centre * rng.random_range(0.8f32..1.2))
            .collect(),
        Role::Bias => uniform(rng, n, 0.5),
        Role::RopeFactors(table) => rope_factors(table, n),
    }
}

/// A metadata value, as far as synthetic files need them.
enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

impl Meta {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Self::U32(v) => {
                out.extend_from_slice(&TYPE_U32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Self::F32(v) => {
                out.extend_from_slice(&TYPE_F32.to_le_bytes());
                out.extend_from_slice(&v.to_le_bytes());
            }
            Self::Bool(v) => {
                out.extend_from_slice(&TYPE_BOOL.to_le_bytes());
                out.push(u8::from(*v));
            }
            Self::Str(v) => {
                out.extend_from_slice(&TYPE_STRING.to_le_bytes());
                put_string(out, v);
            }
            Self::Strs(items) => {
                out.extend_from_slice(&TYPE_ARRAY.to_le_bytes());
                out.extend_from_slice(&TYPE_STRING.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    put_string(out, item);
                }
            }
            Self::I32s(items) => {
                out.extend_from_slice(&TYPE_ARRAY.to_le_bytes());
                out.extend_from_slice(&TYPE_I32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    out.extend_from_slice(&item.to_le_bytes());
                }
            }
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The `tokenizer.ggml.*` keys of a byte-level vocabulary of `vocab` tokens (at least 257).
fn tokenizer_metadata(vocab: usize) -> Vec<(String, Meta)> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
    let mut types = vec![TOKEN_NORMAL; BYTE_TOKENS];
    tokens.push(END_OF_TEXT.to_string());
    types.push(TOKEN_CONTROL);
    for i in tokens.len()..vocab {
        tokens.push(format!("<|unused_{i}|>"));
        types.push(TOKEN_UNUSED);
    }
    let key = |k: &str| format!("tokenizer.ggml.{k}");
    let eot = BYTE_TOKENS as u32;
    vec![
        (key("model"), Meta::Str("gpt2".into())),
        (key("pre"), Meta::Str("gpt-2".into())),
        (key("tokens"), Meta::Strs(tokens)),
        (key("token_type"), Meta::I32s(types)),
        (key("merges"), Meta::Strs(Vec::new())),
        (key("bos_token_id"), Meta::U32(eot)),
        (key("eos_token_id"), Meta::U32(eot)),
        (key("add_bos_token"), Meta::Bool(false)),
    ]
}

/// The character that spells `byte` in GPT-2's byte-level alphabet: printable Latin-1 bytes
/// spell themselves, the others take the code points from U+0100 up, in byte order.
fn byte_to_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
    if printable(byte) {
        return char::from(byte);
    }
    let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(0x100 + rank).unwrap_or('?')
}

fn pad(bytes: &mut Vec<u8>, with: u8) {
    let len = (bytes.len() as u64).next_multiple_of(ALIGNMENT) as usize;
    bytes.resize(len, with);
}

/// Appends `values` in `format`.
fn encode(format: Format, values: &[f32], out: &mut Vec<u8>) {
    let (block, _) = format.block();
    for x in values.chunks_exact(block) {
        match format {
            Format::F32 => out.extend_from_slice(&x[0].to_le_bytes()),
            Format::Q8_0 => {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
            }
            Format::Q4_0 => {
                // As ggml: the value of largest magnitude maps to -8.
                let max = x
                    .iter()
                    .copied()
                    .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..QK / 2).map(|j| q(x[j]) | (q(x[j + QK / 2]) << 4)));
            }
            Format::Q4K => encode_q4_k(x, out),
            Format::Q6K => encode_q6_k(x, out),
        }
    }
}

/// One Q4_K super-block: eight sub-blocks of 32 values `d·sc·q − dmin·m`, `q` of 4 bits, the
/// sub-blocks' scales `sc` and minimums `m` of 6 bits, in units of the block's `d` and `dmin`.
/// Each sub-block spans its values' range.
fn encode_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    for (j, sub) in x.chunks_exact(QK).enumerate() {
        let lo = sub.iter().copied().fold(0f32, f32::min);
        let hi = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scales[j] = (hi - lo) / 15.0;
        mins[j] = -lo;
    }
    let unit = |v: &[f32; 8]| f16::from_f32(v.iter().copied().fold(0f32, f32::max) / 63.0);
    let (d, dmin) = (unit(&scales), unit(&mins));
    let six_bits = |v: f32, unit: f16| {
        let unit = unit.to_f32();
        if unit > 0.0 {
            (v / unit).round().clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let sc: Vec<u8> = scales.iter().map(|&v| six_bits(v, d)).collect();
    let m: Vec<u8> = mins.iter().map(|&v| six_bits(v, dmin)).collect();
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    let mut packed = [0u8; 12];
    for j in 0..4 {
        packed[j] = sc[j] | (sc[j + 4] >> 4) << 6;
        packed[j + 4] = m[j] | (m[j + 4] >> 4) << 6;
        packed[j + 8] = (sc[j + 4] & 0xf) | (m[j + 4] & 0xf) << 4;
    }
    out.extend_from_slice(&packed);
    let mut q = [0u8; QK_K];
    for (j, sub) in x.chunks_exact(QK).enumerate() {
        let step = d.to_f32() * sc[j] as f32;
        let offset = dmin.to_f32() * m[j] as f32;
        for (l, &v) in sub.iter().enumerate() {
            q[j * QK + l] = if step > 0.0 {
                ((v + offset) / step).round().clamp(0.0, 15.0) as u8
            } else {
                0
            };
        }
    }
    for chunk in q.chunks_exact(2 * QK) {
        out.extend((0..QK).map(|l| chunk[l] | chunk[l + QK] << 4));
    }
}

/// One Q6_K super-block: sixteen sub-blocks of 16 values `d·sc·(q − 32)`, `q` of 6 bits, the
/// sub-blocks' scales `sc` signed 8-bit in units of the block's `d`.
fn encode_q6_k(x: &[f32], out: &mut Vec<u8>) {
    const SUB: usize = 16;
    let scales: Vec<f32> = x
        .chunks_exact(SUB)
        .map(|sub| sub.iter().fold(0f32, |m, v| m.max(v.abs())) / 31.0)
        .collect();
    let d = f16::from_f32(scales.iter().copied().fold(0f32, f32::max) / 127.0);
    let sc: Vec<i8> = scales
        .iter()
        .map(|&s| {
            if d.to_f32() > 0.0 {
                (s / d.to_f32()).round().clamp(-128.0, 127.0) as i8
            } else {
                0
            }
        })
        .collect();
    let q: Vec<u8> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let step = d.to_f32() * sc[i / SUB] as f32;
            let q = if step > 0.0 {
                (v / step).round().clamp(-32.0, 31.0) as i32
            } else {
                0
            };
            (q + 32) as u8
        })
        .collect();
    let (mut ql, mut qh) = ([0u8; QK_K / 2], [0u8; QK_K / 4]);
    for half in 0..2 {
        let q = &q[half * 128..][..128];
        for l in 0..32 {
            ql[half * 64 + l] = (q[l] & 0xf) | (q[l + 64] & 0xf) << 4;
            ql[half * 64 + l + 32] = (q[l + 32] & 0xf) | (q[l + 96] & 0xf) << 4;
            qh[half * 32 + l] =
                q[l] >> 4 | (q[l + 32] >> 4) << 2 | (q[l + 64] >> 4) << 4 | (q[l + 96] >> 4) << 6;
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
    use crate::model::ModelConfig;

    #[test]
    fn writes_a_model_realm_reads() {
        let dir = tempfile::tempdir().expect("temp dir");
        for dtype in [SyntheticDType::Q4_0, SyntheticDType::Q8_0] {
            let path = dir.path().join("synthetic.gguf");
            let spec = SyntheticSpec::small(3, 64, dtype);
            write(&path, &spec).expect("write");
            let file = GgufFile::open(&path).expect("open");
            let config = ModelConfig::from_gguf(&file).expect("config");
            assert_eq!(config.n_layers, 3);
            assert_eq!(config.d_model, 64);
            assert_eq!(file.tensors.len(), 3 + 3 * 9);
            let q = file.tensor_info("blk.2.ffn_down.weight").expect("tensor");
            let format = spec.matrix_format("blk.2.ffn_down.weight", Some(2));
            assert_eq!(q.size, format.bytes(256 * 64));
        }
    }

    #[test]
    fn carries_a_byte_level_tokenizer_and_generates_bytes() {
        use crate::generate::{generate, GenerationParams};
        use crate::model::Model;
        use crate::sampling::SamplingParams;
        use crate::tokenizer::Tokenizer;

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("synthetic.gguf");
        let spec = SyntheticSpec {
            vocab: 300,
            ..SyntheticSpec::small(2, 64, SyntheticDType::Q8_0)
        };
        write(&path, &spec).expect("write");
        let file = GgufFile::open(&path).expect("open");
        let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer");
        assert_eq!(tokenizer.vocab_size(), 300);
        assert_eq!(tokenizer.eos_id(), Some(256));
        assert!(!tokenizer.add_bos());
        let text = "Héllo, wörld!\n\t~";
        let ids = tokenizer.encode(text, true, true).expect("encode");
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, bytes, "one token per byte, ids equal to the bytes");
        assert_eq!(tokenizer.decode(&ids).expect("decode"), text);
        assert_eq!(
            tokenizer
                .encode("a<|endoftext|>", true, true)
                .expect("encode"),
            vec![u32::from(b'a'), 256]
        );

        let model = Model::load(&file).expect("model");
        assert_eq!(model.embedding.vocab_size(), 300);
        let params = GenerationParams {
            max_tokens: 8,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
        };
        let c = generate(&model, &tokenizer, ids.clone(), &params, |_| {}).expect("generate");
        assert_eq!(c.usage.prompt_tokens, ids.len());
        assert_eq!(
            c.usage.generated_tokens, 8,
            "greedy never picks <|endoftext|>"
        );
        assert!(c.tokens.iter().all(|&t| t < 128), "{:?}", c.tokens);
        // Greedy is deterministic: the same prompt picks the same token again.
        let again = generate(&model, &tokenizer, ids, &params, |_| {}).expect("generate");
        assert_eq!(again.tokens, c.tokens);
    }

    /// The K-quant encoders' blocks, read back by candle's decoder, give the values that went
    /// in, within each format's step.
    #[test]
    fn k_quant_blocks_decode_to_their_values() {
        use crate::quant::{qtensor_from_bytes, GgmlType};
        let mut rng = StdRng::seed_from_u64(7);
        let mut values = uniform(&mut rng, 4 * QK_K, 1.0);
        values[..QK].fill(0.25); // a constant sub-block
        values[QK_K..QK_K + 16].fill(0.0); // a zero sub-block
        for (format, dtype, tolerance) in [
            (Format::Q4K, GgmlType::Q4K, 0.16),
            (Format::Q6K, GgmlType::Q6K, 0.04),
            (Format::Q8_0, GgmlType::Q8_0, 0.01),
        ] {
            let mut bytes = Vec::new();
            encode(format, &values, &mut bytes);
            assert_eq!(bytes.len() as u64, format.bytes(values.len() as u64));
            let decoded = qtensor_from_bytes(
                dtype,
                &bytes,
                &[values.len() as u64],
                &candle_core::Device::Cpu,
            )
            .and_then(|t| Ok(t.dequantize(&candle_core::Device::Cpu)?.to_vec1::<f32>()?))
            .expect("decode");
            let worst = values
                .iter()
                .zip(&decoded)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < tolerance, "{format:?}: worst error {worst}");
        }
    }

    /// Every architecture's fixture model loads as that architecture, with the features its
    /// tensors and metadata call for, and runs to finite logits in both formats.
    #[test]
    fn every_architecture_writes_a_model_realm_runs() {
        use crate::model::{Architecture, Model};
        let dir = tempfile::tempdir().expect("temp dir");
        for arch in SyntheticArch::ALL {
            for dtype in [SyntheticDType::Q8_0, SyntheticDType::Q4KM] {
                let path = dir
                    .path()
                    .join(format!("{}-{}.gguf", arch.name(), dtype.name()));
                let spec = SyntheticSpec::fixture(arch, dtype);
                write(&path, &spec).expect("write");
                let file = GgufFile::open(&path).expect("open");
                let config = ModelConfig::from_gguf(&file).expect("config");
                assert_eq!(config.architecture.gguf_name(), arch.gguf_name());
                assert_eq!(config.experts.is_some(), arch.has_experts(), "{arch:?}");
                assert_eq!(
                    config.rope_factors,
                    match arch {
                        SyntheticArch::Llama3 => Some("rope_freqs.weight"),
                        SyntheticArch::Phi3 => Some("rope_factors_long.weight"),
                        _ => None,
                    }
                );
                if config.architecture == Architecture::Gemma2 {
                    assert_eq!(config.sliding_window, Some(GEMMA2_WINDOW));
                    assert!(config.is_sliding(0) && !config.is_sliding(1));
                    assert_eq!(config.attention_softcap, Some(GEMMA2_ATTN_SOFTCAP));
                    assert_eq!(config.final_softcap, Some(GEMMA2_FINAL_SOFTCAP));
                }
                let model = Model::load(&file).expect("model");
                let mut kv = model.new_session_kv();
                let tokens: Vec<u32> = b"The synthetic model runs."
                    .iter()
                    .map(|&b| b.into())
                    .collect();
                let logits: Vec<Vec<f32>> = model
                    .forward(&tokens, &mut kv, true)
                    .expect("forward")
                    .to_vec2()
                    .expect("logits");
                assert!(
                    logits.iter().flatten().all(|l| l.is_finite()),
                    "{arch:?} {dtype:?}"
                );
                // A peaked distribution that moves with the context.
                let top = |row: &[f32]| {
                    row.iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(i, _)| i)
                        .unwrap_or(0)
                };
                let tops: std::collections::BTreeSet<usize> =
                    logits.iter().map(|r| top(r)).collect();
                assert!(tops.len() > 3, "{arch:?} {dtype:?}: top tokens {tops:?}");
            }
        }
    }

    /// A file with a tensor or a metadata value Realm does not implement is refused with an
    /// error naming it, never run with the feature left out.
    #[test]
    fn what_realm_does_not_implement_is_refused_by_name() {
        use crate::model::Model;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("edited.gguf");
        type Edit<'e> = &'e dyn Fn(&mut Vec<TensorSpec>, &mut Vec<(String, Meta)>);
        let refusal = |arch: SyntheticArch, edit: Edit| -> String {
            let spec = SyntheticSpec::fixture(arch, SyntheticDType::Q8_0);
            write_edited(&path, &spec, |t, m| edit(t, m)).expect("write");
            let file = GgufFile::open(&path).expect("open");
            match Model::load(&file) {
                Ok(_) => panic!("{arch:?}: an edited file loaded"),
                Err(e) => e.to_string(),
            }
        };
        let set = |meta: &mut Vec<(String, Meta)>, key: &str, value: Meta| {
            meta.retain(|(k, _)| k != key);
            meta.push((key.to_string(), value));
        };
        // A tensor the file should not hold: a Q8_0 matrix or an f32 vector.
        let stray = |name: &str, dims: &[u64]| TensorSpec {
            name: name.to_string(),
            dims: dims.to_vec(),
            format: if dims.len() == 1 {
                Format::F32
            } else {
                Format::Q8_0
            },
            role: Role::Norm { centre: 1.0 },
        };
        let shared_expert = |t: &mut Vec<TensorSpec>, _: &mut Vec<(String, Meta)>| {
            t.push(stray("blk.1.ffn_gate_shexp.weight", &[256, 256]))
        };
        let e = refusal(SyntheticArch::Mixtral, &shared_expert);
        assert!(e.contains("blk.1.ffn_gate_shexp.weight"), "{e}");
        // Qwen 3's head norms in a llama file: the llama blocks have no place for them.
        let stray_norm = |t: &mut Vec<TensorSpec>, _: &mut Vec<(String, Meta)>| {
            t.push(stray("blk.0.attn_q_norm.weight", &[128]))
        };
        let e = refusal(SyntheticArch::Llama3, &stray_norm);
        assert!(
            e.contains("blk.0.attn_q_norm.weight") && e.contains("llama"),
            "{e}"
        );
        let yarn = |_: &mut Vec<TensorSpec>, m: &mut Vec<(String, Meta)>| {
            set(m, "qwen2.rope.scaling.type", Meta::Str("yarn".into()))
        };
        let e = refusal(SyntheticArch::Qwen2, &yarn);
        assert!(e.contains("yarn"), "{e}");
        let partial = |_: &mut Vec<TensorSpec>, m: &mut Vec<(String, Meta)>| {
            set(m, "qwen2.rope.dimension_count", Meta::U32(32))
        };
        let e = refusal(SyntheticArch::Qwen2, &partial);
        assert!(e.contains("32 of 64"), "{e}");
        let sigmoid = |_: &mut Vec<TensorSpec>, m: &mut Vec<(String, Meta)>| {
            set(m, "qwen3moe.expert_gating_func", Meta::U32(2))
        };
        let e = refusal(SyntheticArch::Qwen3Moe, &sigmoid);
        assert!(e.contains("gating function 2"), "{e}");
        // Experts without their count, and a dense MLP beside experts.
        let uncounted = |_: &mut Vec<TensorSpec>, m: &mut Vec<(String, Meta)>| {
            m.retain(|(k, _)| !k.starts_with("llama.expert_"))
        };
        let e = refusal(SyntheticArch::Mixtral, &uncounted);
        assert!(e.contains("expert_count"), "{e}");
        let dense_beside = |t: &mut Vec<TensorSpec>, _: &mut Vec<(String, Meta)>| {
            t.push(stray("blk.2.ffn_gate.weight", &[256, 256]))
        };
        let e = refusal(SyntheticArch::Mixtral, &dense_beside);
        assert!(e.contains("blk.2.ffn_gate.weight"), "{e}");
        // A router or expert tensor of the wrong shape for the declared experts.
        let reshape = |t: &mut Vec<TensorSpec>, name: &str, dims: &[u64]| {
            if let Some(tensor) = t.iter_mut().find(|x| x.name == name) {
                tensor.dims = dims.to_vec();
            }
        };
        let three_way_router = |t: &mut Vec<TensorSpec>, _: &mut Vec<(String, Meta)>| {
            reshape(t, "blk.1.ffn_gate_inp.weight", &[256, 3])
        };
        let e = refusal(SyntheticArch::Mixtral, &three_way_router);
        assert!(
            e.contains("blk.1.ffn_gate_inp.weight") && e.contains("4 experts"),
            "{e}"
        );
        let three_experts = |t: &mut Vec<TensorSpec>, _: &mut Vec<(String, Meta)>| {
            reshape(t, "blk.1.ffn_up_exps.weight", &[256, 256, 3])
        };
        let e = refusal(SyntheticArch::Qwen3Moe, &three_experts);
        assert!(
            e.contains("blk.1.ffn_up_exps.weight") && e.contains("[256, 256, 4]"),
            "{e}"
        );
        let unknown = |_: &mut Vec<TensorSpec>, m: &mut Vec<(String, Meta)>| {
            set(m, "general.architecture", Meta::Str("mamba".into()))
        };
        let e = refusal(SyntheticArch::Qwen2, &unknown);
        assert!(e.contains("`mamba`"), "{e}");
    }
}
