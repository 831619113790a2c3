//! Synthetic models: llama-architecture GGUF files with random weights, of any depth and width,
//! quantized to Q4_0 or Q8_0. They compute nothing meaningful; they exist to make shards larger
//! than a worker's memory budget (tests use tiny ones, benchmarks large). Each carries a minimal
//! byte-level BPE tokenizer (`gpt2`, pre-tokenizer `gpt-2`): one token per byte, no merges, an
//! `<|endoftext|>` control token as BOS and EOS, and unused padding tokens up to the vocabulary
//! size, so the coordinator and the single-process path run them like any model. The embedding
//! rows of the tokens past the bytes are zero, so greedy generation emits bytes and never stops
//! before its token budget.
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
const TYPE_I32: u32 = 5;
const TYPE_U32: u32 = 4;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const GGML_F32: u32 = 0;

/// Tokens of the synthetic tokenizer: one per byte, then this control token (BOS and EOS).
const BYTE_TOKENS: usize = 256;
const END_OF_TEXT: &str = "<|endoftext|>";
const EMBEDDING: &str = "token_embd.weight";
/// GGUF token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_UNUSED: i32 = 5;

/// Weight format of a synthetic model's matrices (norms are always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticDType {
    Q4_0,
    Q8_0,
}

impl SyntheticDType {
    fn ggml_id(self) -> u32 {
        match self {
            Self::Q4_0 => 2,
            Self::Q8_0 => 8,
        }
    }

    /// Bytes of one block of 32 values.
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 2 + QK / 2,
            Self::Q8_0 => 2 + QK,
        }
    }
}

/// The shape of a synthetic llama model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyntheticSpec {
    pub n_layers: usize,
    /// Hidden width; a multiple of 32 and of `n_heads`.
    pub d_model: usize,
    /// MLP width; a multiple of 32.
    pub ffn_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Vocabulary size (rows of the tied embedding table); raised to 257 (256 byte tokens and
    /// `<|endoftext|>`) where smaller.
    pub vocab: usize,
    pub context_length: usize,
    pub dtype: SyntheticDType,
    pub seed: u64,
}

impl SyntheticSpec {
    /// A small model: `n_layers` blocks of width `d_model` (MLP 4× wider), 4 heads, 2 KV heads.
    pub fn small(n_layers: usize, d_model: usize, dtype: SyntheticDType) -> Self {
        Self {
            n_layers,
            d_model,
            ffn_dim: 4 * d_model,
            n_heads: 4,
            n_kv_heads: 2,
            vocab: 256,
            context_length: 2048,
            dtype,
            seed: 0x5eed,
        }
    }

    /// The vocabulary the file holds: `vocab`, at least the byte tokens and `<|endoftext|>`.
    pub fn vocab_size(&self) -> usize {
        self.vocab.max(BYTE_TOKENS + 1)
    }

    /// Bytes of the file `write_llama` writes for this spec, tokenizer metadata aside.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, dims, q)| self.tensor_bytes(dims, *q).next_multiple_of(ALIGNMENT))
            .sum()
    }

    fn check(&self) -> Result<()> {
        let ok = self.n_layers > 0
            && self.d_model.is_multiple_of(QK)
            && self.ffn_dim.is_multiple_of(QK)
            && self.d_model > 0
            && self.ffn_dim > 0
            && self.n_heads > 0
            && self.n_kv_heads > 0
            && self.n_heads.is_multiple_of(self.n_kv_heads)
            && self.d_model.is_multiple_of(self.n_heads)
            && (self.d_model / self.n_heads).is_multiple_of(2)
            && self.vocab > 0;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "synthetic model shape {self:?}: widths must be multiples of 32, heads divide \
                 d_model into even head dimensions, KV heads divide heads"
            )))
        }
    }

    /// Every tensor: name, ggml dims (innermost first), quantized or f32.
    fn tensors(&self) -> Vec<(String, Vec<u64>, bool)> {
        let d = self.d_model as u64;
        let kv = (self.d_model / self.n_heads * self.n_kv_heads) as u64;
        let f = self.ffn_dim as u64;
        let mut t = vec![
            (
                EMBEDDING.to_string(),
                vec![d, self.vocab_size() as u64],
                true,
            ),
            ("output_norm.weight".to_string(), vec![d], false),
        ];
        for i in 0..self.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            t.push((n("attn_norm.weight"), vec![d], false));
            t.push((n("attn_q.weight"), vec![d, d], true));
            t.push((n("attn_k.weight"), vec![d, kv], true));
            t.push((n("attn_v.weight"), vec![d, kv], true));
            t.push((n("attn_output.weight"), vec![d, d], true));
            t.push((n("ffn_norm.weight"), vec![d], false));
            t.push((n("ffn_gate.weight"), vec![d, f], true));
            t.push((n("ffn_up.weight"), vec![d, f], true));
            t.push((n("ffn_down.weight"), vec![f, d], true));
        }
        t
    }

    fn tensor_bytes(&self, dims: &[u64], quantized: bool) -> u64 {
        let elements: u64 = dims.iter().product();
        if quantized {
            elements / QK as u64 * self.dtype.block_bytes() as u64
        } else {
            elements * 4
        }
    }
}

/// Writes the model described by `spec` to `path`.
pub fn write_llama(path: &Path, spec: &SyntheticSpec) -> Result<()> {
    spec.check()?;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut out = BufWriter::new(std::fs::File::create(path).map_err(io)?);
    let tensors = spec.tensors();
    let u32_kv = |k: &str, v: usize| (format!("llama.{k}"), Meta::U32(v as u32));
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Meta::Str("llama".into()),
        ),
        (
            "general.name".to_string(),
            Meta::Str("realm-synthetic".into()),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".to_string(),
            Meta::F32(1e-5),
        ),
        u32_kv("block_count", spec.n_layers),
        u32_kv("embedding_length", spec.d_model),
        u32_kv("feed_forward_length", spec.ffn_dim),
        u32_kv("attention.head_count", spec.n_heads),
        u32_kv("attention.head_count_kv", spec.n_kv_heads),
        u32_kv("context_length", spec.context_length),
        ("general.alignment".to_string(), Meta::U32(ALIGNMENT as u32)),
    ];
    meta.extend(tokenizer_metadata(spec.vocab_size()));

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
    for (name, dims, quantized) in &tensors {
        put_string(&mut header, name);
        header.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            header.extend_from_slice(&d.to_le_bytes());
        }
        let ty = if *quantized {
            spec.dtype.ggml_id()
        } else {
            GGML_F32
        };
        header.extend_from_slice(&ty.to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + spec.tensor_bytes(dims, *quantized)).next_multiple_of(ALIGNMENT);
    }
    pad(&mut header, 0);
    out.write_all(&header).map_err(io)?;

    let mut rng = StdRng::seed_from_u64(spec.seed);
    for (name, dims, quantized) in &tensors {
        let mut data = Vec::new();
        if *quantized {
            // Uniform in ±1/√fan_in keeps activations in range through many random layers.
            let bound = 1.0 / (dims[0] as f32).sqrt();
            let mut values: Vec<f32> = (0..dims.iter().product::<u64>())
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            if name == EMBEDDING {
                // The head is tied to the embeddings: zero rows give `<|endoftext|>` and the
                // padding a logit of 0, below the largest of 256 random byte logits, so greedy
                // generation never ends early (benchmarks get the tokens they ask for) and
                // prints bytes.
                values[BYTE_TOKENS * dims[0] as usize..].fill(0.0);
            }
            for block in values.chunks_exact(QK) {
                quantize_block(spec.dtype, block, &mut data);
            }
        } else {
            for _ in 0..dims[0] {
                data.extend_from_slice(&rng.random_range(0.8f32..1.2).to_le_bytes());
            }
        }
        pad(&mut data, 0);
        out.write_all(&data).map_err(io)?;
    }
    out.flush().map_err(io)
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

/// Appends one ggml block of 32 values.
fn quantize_block(dtype: SyntheticDType, x: &[f32], out: &mut Vec<u8>) {
    match dtype {
        SyntheticDType::Q8_0 => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
        }
        SyntheticDType::Q4_0 => {
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
    }
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
            write_llama(&path, &spec).expect("write");
            let file = GgufFile::open(&path).expect("open");
            let config = ModelConfig::from_gguf(&file).expect("config");
            assert_eq!(config.n_layers, 3);
            assert_eq!(config.d_model, 64);
            assert_eq!(file.tensors.len(), 2 + 3 * 9);
            let q = file.tensor_info("blk.2.ffn_down.weight").expect("tensor");
            assert_eq!(q.size, 256 * 64 / 32 * dtype.block_bytes() as u64);
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
        write_llama(&path, &spec).expect("write");
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

        let model = Model::load(&file, &candle_core::Device::Cpu).expect("model");
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
        assert!(c.tokens.iter().all(|&t| t < 256), "{:?}", c.tokens);
        // Greedy is deterministic: the same prompt picks the same token again.
        let again = generate(&model, &tokenizer, ids, &params, |_| {}).expect("generate");
        assert_eq!(again.tokens, c.tokens);
    }
}
