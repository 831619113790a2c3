//! Model hyper-parameters read from GGUF metadata, with the GGUF key names in one place.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

const KEY_ARCHITECTURE: &str = "general.architecture";
/// Gemma 3 alternates five sliding-window layers with one global layer.
const GEMMA3_SWA_PATTERN: usize = 6;
/// Gemma 3's local (sliding-window) layers use their own RoPE base.
const GEMMA3_ROPE_BASE_LOCAL: f32 = 10_000.0;
const DEFAULT_ROPE_BASE: f32 = 10_000.0;
const DEFAULT_RMS_EPS: f32 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Gemma3,
}

impl Architecture {
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Gemma3 => "gemma3",
        }
    }
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
    /// RoPE base of global-attention layers.
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (equal to `rope_base` where there are none).
    pub rope_base_local: f32,
    /// Linear RoPE scaling of global layers: positions are multiplied by this.
    pub rope_position_scale: f32,
    /// Sliding-window size in tokens, for architectures with local layers.
    pub sliding_window: Option<usize>,
    pub embedding_scale: f64,
    pub attention_scale: f64,
}

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch_name = file.get_str(KEY_ARCHITECTURE)?;
        let architecture = match arch_name {
            "llama" => Architecture::Llama,
            "gemma3" => Architecture::Gemma3,
            other => {
                return Err(Error::Unsupported(format!(
                    "architecture `{other}` (Realm runs llama and gemma3)"
                )))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let n_layers = file.get_usize(&key("block_count"))?;
        let d_model = file.get_usize(&key("embedding_length"))?;
        let ffn_dim = file.get_usize(&key("feed_forward_length"))?;
        let n_heads = file.get_usize(&key("attention.head_count"))?;
        let n_kv_heads = match file.get(&key("attention.head_count_kv")) {
            Some(_) => file.get_usize(&key("attention.head_count_kv"))?,
            None => n_heads,
        };
        if n_layers == 0
            || d_model == 0
            || n_heads == 0
            || n_kv_heads == 0
            || n_heads % n_kv_heads != 0
        {
            return Err(Error::Unsupported(format!(
                "inconsistent shape: {n_layers} layers, d_model {d_model}, {n_heads} heads, {n_kv_heads} KV heads"
            )));
        }
        let head_dim = match file.get(&key("attention.key_length")) {
            Some(_) => file.get_usize(&key("attention.key_length"))?,
            None => d_model / n_heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::Unsupported(format!(
                "head dimension {head_dim} must be even"
            )));
        }
        let context_length = file.get_usize(&key("context_length"))?;
        let optional_f32 = |k: &str, default: f32| -> Result<f32> {
            match file.get(&key(k)) {
                Some(_) => file.get_f32(&key(k)),
                None => Ok(default),
            }
        };
        let rms_eps = optional_f32("attention.layer_norm_rms_epsilon", DEFAULT_RMS_EPS)? as f64;
        let rope_base = optional_f32("rope.freq_base", DEFAULT_ROPE_BASE)?;
        let rope_position_scale = match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str())
        {
            None | Some("none") => 1.0,
            Some("linear") => 1.0 / optional_f32("rope.scaling.factor", 1.0)?,
            Some(other) => return Err(Error::Unsupported(format!("RoPE scaling `{other}`"))),
        };

        let (rope_base_local, sliding_window, embedding_scale) = match architecture {
            Architecture::Llama => (rope_base, None, 1.0),
            Architecture::Gemma3 => (
                optional_f32("rope.freq_base_swa", GEMMA3_ROPE_BASE_LOCAL)?,
                Some(file.get_usize(&key("attention.sliding_window"))?),
                (d_model as f64).sqrt(),
            ),
        };
        Ok(Self {
            architecture,
            n_layers,
            d_model,
            ffn_dim,
            n_heads,
            n_kv_heads,
            head_dim,
            context_length,
            rms_eps,
            rope_base,
            rope_base_local,
            rope_position_scale,
            sliding_window,
            embedding_scale,
            attention_scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// Whether `layer` attends through a sliding window (Gemma 3's local layers).
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && layer % GEMMA3_SWA_PATTERN < GEMMA3_SWA_PATTERN - 1
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
