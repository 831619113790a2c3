//! The forward pass, split the way Realm distributes it: an [`Embedding`] stage, a run of
//! transformer [`Block`]s grouped in a [`Shard`] that owns a [`LayerRange`], and a [`Head`].
//!
//! Blocks load only their own `blk.{i}.*` tensors, so a worker can hold any contiguous range.
//! Blocks hold weights only; the attention state of a sequence lives in a [`SessionKv`] owned by
//! that session, so many sessions run through the same weights at once.
//!
//! The architectures compute through a [`Backend`], chosen when the weights are loaded and held
//! with them: `load` loads onto the [`Cpu`], `load_on` onto any backend (see `backend`).

mod attention;
mod backend;
mod block;
pub mod config;
mod elementwise;
pub use elementwise::with_values;
mod experts;
mod layers;
mod norm;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo};
use crate::kv::SessionKv;
use crate::quant::qtensor_from_bytes;
use config::tensors::{OUTPUT, OUTPUT_BIAS, OUTPUT_NORM, TOKEN_EMBD};

pub use attention::{Precision, Segment};
pub use backend::{Backend, Cpu, Residence, Scoring};
pub use config::{Architecture, ModelConfig};
pub use layers::{layer_bytes, LayerBudget, LayerStats};
use layers::{layer_tensors, release_copied, LayerManager};

/// A contiguous, non-empty range of transformer blocks `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerRange {
    pub start: usize,
    pub end: usize,
}

impl LayerRange {
    pub fn new(start: usize, end: usize) -> Result<Self> {
        if start >= end {
            return Err(Error::InvalidArgument(format!(
                "layer range {start}..{end} is empty"
            )));
        }
        Ok(Self { start, end })
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn contains(&self, layer: usize) -> bool {
        (self.start..self.end).contains(&layer)
    }

    pub fn iter(&self) -> std::ops::Range<usize> {
        self.start..self.end
    }
}

impl std::fmt::Display for LayerRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end - 1)
    }
}

/// One transformer block: weights of `blk.{i}.*` and the forward pass over them.
pub trait Block: Send + Sync + std::fmt::Debug {
    /// Runs the block on `x` (`[rows, d_model]`), the rows of one or more sessions in the order
    /// of `segments`: the matrix products over every row at once, attention per session against
    /// its own cache, to which each segment's keys and values are appended.
    fn forward(&self, x: &Tensor, segments: &mut [Segment<'_>]) -> Result<Tensor>;
}

fn load_block<B: Backend>(
    backend: &B,
    file: &GgufFile,
    config: &ModelConfig,
    layer: usize,
    residence: Residence,
) -> Result<Box<dyn Block>> {
    Ok(Box::new(block::DecoderBlock::load(
        backend, file, config, layer, residence,
    )?))
}

/// The matrix `info` describes, loaded through `backend` for `residence`; anything but a
/// matrix is refused.
fn load_matrix<B: Backend>(
    backend: &B,
    file: &GgufFile,
    info: &TensorInfo,
    residence: Residence,
) -> Result<B::Matrix> {
    if info.dims.len() != 2 {
        return Err(Error::Tensor {
            name: info.name.clone(),
            problem: format!("expected a matrix, found dimensions {:?}", info.dims),
        });
    }
    backend.load_matrix(file, info, residence)
}

/// The tensor `name` of `file`, checked to be a vector of `len` values.
fn vector_info<'f>(file: &'f GgufFile, name: &str, len: usize) -> Result<&'f TensorInfo> {
    let info = file.tensor_info(name)?;
    if info.dims.len() != 1 || info.dims[0] as usize != len {
        return Err(Error::Tensor {
            name: name.to_string(),
            problem: format!(
                "expected a vector of {len}, found dimensions {:?}",
                info.dims
            ),
        });
    }
    Ok(info)
}

/// The vector `name` of `len` values (norm weights, a bias), loaded through `backend`.
fn load_vector<B: Backend>(
    backend: &B,
    file: &GgufFile,
    name: &str,
    len: usize,
) -> Result<B::Vector> {
    backend.load_vector(file, vector_info(file, name, len)?)
}

/// Token embeddings. The table stays quantized in the file mapping; a lookup dequantizes only
/// the rows it needs, on the host.
#[derive(Debug, Clone)]
pub struct Embedding {
    file: GgufFile,
    info: TensorInfo,
    d_model: usize,
    vocab: usize,
    /// Gemma scales embeddings by √d_model; 1 for llama.
    scale: f64,
}

impl Embedding {
    pub fn load(file: &GgufFile, config: &ModelConfig) -> Result<Self> {
        let info = file.tensor_info(TOKEN_EMBD)?.clone();
        if info.dims.len() != 2 || info.dims[0] as usize != config.d_model {
            return Err(Error::Tensor {
                name: TOKEN_EMBD.to_string(),
                problem: format!(
                    "shape {:?} does not match d_model {}",
                    info.dims, config.d_model
                ),
            });
        }
        Ok(Self {
            file: file.clone(),
            vocab: info.dims[1] as usize,
            info,
            d_model: config.d_model,
            scale: config.embedding_scale,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// `[tokens.len(), d_model]` hidden states for `tokens`.
    pub fn forward(&self, tokens: &[u32]) -> Result<Tensor> {
        let row_bytes = self.info.size as usize / self.vocab;
        let mut rows = vec![0u8; tokens.len() * row_bytes];
        for (&t, row) in tokens.iter().zip(rows.chunks_exact_mut(row_bytes)) {
            let t = t as usize;
            if t >= self.vocab {
                return Err(Error::InvalidArgument(format!(
                    "token id {t} is outside the vocabulary of {} tokens",
                    self.vocab
                )));
            }
            // Read from the file, not the mapping: a read through the mapping would map up to
            // 64 KiB of the table around the row (the kernel's fault-around), pages that then
            // stay resident, growing with every token seen, or cost a page fault and a TLB
            // flush on every thread to give back (~12 µs a token).
            self.file
                .read_tensor_range(&self.info, t * row_bytes, row)?;
        }
        let dims = [self.d_model as u64, tokens.len() as u64];
        let x = qtensor_from_bytes(self.info.dtype, &rows, &dims, &Device::Cpu)?
            .dequantize(&Device::Cpu)?;
        Ok(if self.scale != 1.0 {
            (x * self.scale)?
        } else {
            x
        })
    }
}

/// The head's matrix: the output matrix, or with tied embeddings the embedding table, which
/// then doubles as the head.
fn head_matrix(file: &GgufFile) -> &'static str {
    if file.tensors.contains_key(OUTPUT) {
        OUTPUT
    } else {
        TOKEN_EMBD
    }
}

/// Bytes of weights one decode step reads: every tensor of the layers (of a mixture of experts,
/// the share of its experts a token uses: an expert tensor is three-dimensional, one matrix per
/// expert), the head's matrix and its norm. The embedding lookup reads one row, left out.
pub fn decode_step_bytes(file: &GgufFile, config: &ModelConfig) -> u64 {
    let expert_share = config
        .experts
        .as_ref()
        .map_or(1.0, |e| e.used as f64 / e.count.max(1) as f64);
    let layers: f64 = (0..config.n_layers)
        .flat_map(|layer| layer_tensors(file, layer))
        .map(|t| match t.dims.len() {
            3 => t.size as f64 * expert_share,
            _ => t.size as f64,
        })
        .sum();
    let head: u64 = [head_matrix(file), OUTPUT_NORM]
        .iter()
        .filter_map(|name| file.tensors.get(*name))
        .map(|t| t.size)
        .sum();
    layers as u64 + head
}

/// Final norm and output projection.
#[derive(Debug)]
pub struct Head<B: Backend = Cpu> {
    backend: B,
    norm: B::Vector,
    output: B::Matrix,
    bias: Option<B::Vector>,
    /// Gemma 2: logits pass through `c · tanh(l / c)`.
    softcap: Option<f32>,
    eps: f64,
}

impl Head {
    /// [`load_on`](Self::load_on) the CPU.
    pub fn load(file: &GgufFile, config: &ModelConfig) -> Result<Self> {
        Self::load_on(Cpu, file, config)
    }
}

impl<B: Backend> Head<B> {
    /// The final norm and the output matrix (the embedding table, where the file ties them),
    /// with its bias if the file has one.
    pub fn load_on(backend: B, file: &GgufFile, config: &ModelConfig) -> Result<Self> {
        let info = file.tensor_info(head_matrix(file))?;
        let output = load_matrix(&backend, file, info, Residence::Kept)?;
        let bias = if file.tensors.contains_key(OUTPUT_BIAS) {
            let vocab = info.dims[1] as usize;
            Some(load_vector(&backend, file, OUTPUT_BIAS, vocab)?)
        } else {
            None
        };
        Ok(Self {
            norm: load_vector(&backend, file, OUTPUT_NORM, config.d_model)?,
            output,
            bias,
            softcap: config.final_softcap,
            eps: config.rms_eps,
            backend,
        })
    }

    /// Logits `[n, vocab]` for every row of `x` (`[n, d_model]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self
            .backend
            .rms_norm(&x.contiguous()?, &self.norm, self.eps)?;
        let mut logits = self.backend.matmul(&x, &self.output, self.bias.as_ref())?;
        if let Some(cap) = self.softcap {
            logits = ((logits * cap.recip() as f64)?.tanh()? * cap as f64)?;
        }
        Ok(logits)
    }
}

/// The blocks of one contiguous layer range.
#[derive(Debug)]
pub struct Shard<B: Backend = Cpu> {
    range: LayerRange,
    layers: Layers<B>,
}

/// Where a shard's blocks come from.
#[derive(Debug)]
enum Layers<B: Backend> {
    /// Every block loaded up front and kept (the single-process model).
    Resident(Vec<Box<dyn Block>>),
    /// Blocks materialized within a memory budget (a worker; see `layers`).
    Managed(LayerManager<B>),
}

impl Shard {
    /// [`load_on`](Self::load_on) the CPU.
    pub fn load(file: &GgufFile, config: &ModelConfig, range: LayerRange) -> Result<Self> {
        Self::load_on(Cpu, file, config, range)
    }

    /// [`load_managed_on`](Self::load_managed_on) the CPU.
    pub fn load_managed(
        file: &GgufFile,
        config: &ModelConfig,
        range: LayerRange,
        budget: LayerBudget,
    ) -> Result<Self> {
        Self::load_managed_on(Cpu, file, config, range, budget)
    }
}

impl<B: Backend> Shard<B> {
    /// Loads only the `blk.{i}.*` tensors of `range`, every block resident.
    pub fn load_on(
        backend: B,
        file: &GgufFile,
        config: &ModelConfig,
        range: LayerRange,
    ) -> Result<Self> {
        check_range(config, range)?;
        let blocks = range
            .iter()
            .map(|layer| load_block(&backend, file, config, layer, Residence::Kept))
            .collect::<Result<_>>()?;
        // Each copy gave its tensor's pages back as it went, but reading the next tensor maps
        // its neighbours' cached pages in again (the kernel's fault-around, up to 64 KiB
        // around each fault): once every block is loaded, the copied tensors go for good.
        for layer in range.iter() {
            release_copied(&backend, file, &layer_tensors(file, layer), Residence::Kept);
        }
        Ok(Self {
            range,
            layers: Layers::Resident(blocks),
        })
    }

    /// A shard whose blocks are materialized within `budget` by the Memory64 layer manager:
    /// the pinned prefix is loaded now, the rest on use and by prefetch. Fails with
    /// [`Error::InvalidArgument`] when the budget cannot hold the largest layer.
    pub fn load_managed_on(
        backend: B,
        file: &GgufFile,
        config: &ModelConfig,
        range: LayerRange,
        budget: LayerBudget,
    ) -> Result<Self> {
        check_range(config, range)?;
        Ok(Self {
            range,
            layers: Layers::Managed(LayerManager::new(backend, file, config, range, budget)?),
        })
    }

    pub fn range(&self) -> LayerRange {
        self.range
    }

    /// The layer manager's counters; `None` for a fully resident shard.
    pub fn layer_stats(&self) -> Option<LayerStats> {
        match &self.layers {
            Layers::Resident(_) => None,
            Layers::Managed(manager) => Some(manager.stats()),
        }
    }

    /// Whether a pass never waits for a layer to load (every layer resident or pinned), so it
    /// may run on rayon's threads.
    pub fn never_waits(&self) -> bool {
        match &self.layers {
            Layers::Resident(_) => true,
            Layers::Managed(manager) => manager.all_pinned(),
        }
    }

    /// Runs every block of the shard over the `[n, d_model]` rows `x` of one session whose
    /// first token sits at `position`. `kv` must be the session's cache for exactly this range.
    pub fn forward(&self, x: &Tensor, position: usize, kv: &mut SessionKv) -> Result<Tensor> {
        let rows = x.dim(0)?;
        self.forward_batch(
            x,
            &mut [SessionRows {
                position,
                rows,
                precision: Precision::of_step(rows),
                kv,
            }],
        )
    }

    /// Runs every block of the shard once over the rows `x` of several sessions, in the order of
    /// `sessions`: each block's weights are read once for all of them, and each session attends
    /// against its own cache (for exactly this range). A session gets the same bits as it would
    /// on its own.
    pub fn forward_batch(&self, x: &Tensor, sessions: &mut [SessionRows<'_>]) -> Result<Tensor> {
        let rows = x.dim(0)?;
        for s in sessions.iter() {
            if s.kv.n_layers() != self.range.len() {
                return Err(Error::InvalidArgument(format!(
                    "KV cache holds {} layers, shard {} has {}",
                    s.kv.n_layers(),
                    self.range,
                    self.range.len()
                )));
            }
            if s.kv.len() != s.position {
                return Err(Error::InvalidArgument(format!(
                    "position {} does not follow the {} tokens already cached",
                    s.position,
                    s.kv.len()
                )));
            }
            if s.rows == 0 {
                return Err(Error::InvalidArgument(
                    "a session of a step has no rows".to_string(),
                ));
            }
        }
        let total: usize = sessions.iter().map(|s| s.rows).sum();
        if total != rows {
            return Err(Error::InvalidArgument(format!(
                "the sessions of a step hold {total} rows, its hidden state {rows}"
            )));
        }
        // A pass that never waits runs on rayon's threads, so each parallel loop in it forks
        // and joins there, instead of being handed over from this thread, which would sleep
        // until the loop ends: two context switches per loop, hundreds per token. A shard that
        // streams layers stays off the pool: its steps may wait for each other's layers, and a
        // waiting step must not sit under another on one thread's stack.
        if !self.never_waits() {
            return self.pass(x.clone(), sessions);
        }
        let threads = rayon::current_num_threads();
        if threads < 2 || sessions.len() < 2 {
            return rayon::scope(|_| self.pass(x.clone(), sessions));
        }
        // Several sessions: split between the threads, each group running every layer on its
        // own. A matrix product of a few rows is too short to split well: the second thread,
        // woken for each of a step's hundreds of products, would arrive when the product is
        // nearly done. The weights are read once per group, and each row's numbers are the
        // same in any group.
        let groups = split_rows(sessions, threads);
        let mut parts = Vec::with_capacity(groups.len());
        let mut first = 0;
        for group in groups {
            let rows: usize = group.iter().map(|s| s.rows).sum();
            parts.push((x.narrow(0, first, rows)?, group));
            first += rows;
        }
        use rayon::prelude::*;
        let outs = parts
            .into_par_iter()
            .map(|(x, group)| self.pass(x, group))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Every layer of the shard over `x`, the rows of `sessions`.
    fn pass(&self, x: Tensor, sessions: &mut [SessionRows<'_>]) -> Result<Tensor> {
        let mut x = x;
        for layer in 0..self.range.len() {
            let mut segments = layer_segments(sessions, layer);
            x = match &self.layers {
                Layers::Resident(blocks) => blocks[layer].forward(&x, &mut segments)?,
                // One layer in use at a time: the guard drops before the next is acquired.
                Layers::Managed(manager) => manager.acquire(layer)?.forward(&x, &mut segments)?,
            };
        }
        Ok(x)
    }
}

/// `sessions` cut into at most `parts` runs of consecutive sessions with about as many rows
/// each.
fn split_rows<'s, 'a>(
    sessions: &'s mut [SessionRows<'a>],
    parts: usize,
) -> Vec<&'s mut [SessionRows<'a>]> {
    let total: usize = sessions.iter().map(|s| s.rows).sum();
    let mut groups = Vec::with_capacity(parts);
    let mut rest = sessions;
    for part in (1..=parts).rev() {
        if rest.is_empty() {
            break;
        }
        let left: usize = rest.iter().map(|s| s.rows).sum();
        let target = left.div_ceil(part).max(1);
        let mut rows = 0;
        let mut take = 0;
        while take < rest.len() && (rows < target || take == 0) {
            rows += rest[take].rows;
            take += 1;
        }
        let (group, tail) = std::mem::take(&mut rest).split_at_mut(take);
        groups.push(group);
        rest = tail;
    }
    debug_assert_eq!(
        groups
            .iter()
            .flat_map(|g| g.iter())
            .map(|s| s.rows)
            .sum::<usize>(),
        total
    );
    groups
}

/// Each session's cache of one layer, as that layer's block sees the step.
fn layer_segments<'a>(sessions: &'a mut [SessionRows<'_>], layer: usize) -> Vec<Segment<'a>> {
    sessions
        .iter_mut()
        .map(|s| Segment {
            position: s.position,
            rows: s.rows,
            precision: s.precision,
            kv: &mut s.kv.layers_mut()[layer],
        })
        .collect()
}

/// One session's rows in a batched step through a [`Shard`].
#[derive(Debug)]
pub struct SessionRows<'a> {
    /// The position of the first row: the number of tokens already in `kv`.
    pub position: usize,
    /// Consecutive rows of the step's hidden state.
    pub rows: usize,
    /// How the rows attend; see [`Precision::of_step`].
    pub precision: Precision,
    /// The session's cache for exactly the shard's layers.
    pub kv: &'a mut SessionKv,
}

fn check_range(config: &ModelConfig, range: LayerRange) -> Result<()> {
    if range.end > config.n_layers {
        return Err(Error::InvalidArgument(format!(
            "layer range {range} exceeds the model's {} layers",
            config.n_layers
        )));
    }
    Ok(())
}

/// A whole model in one process: embedding, every block, head.
#[derive(Debug)]
pub struct Model<B: Backend = Cpu> {
    pub config: ModelConfig,
    pub embedding: Embedding,
    pub shard: Shard<B>,
    pub head: Head<B>,
}

impl Model {
    /// [`load_on`](Self::load_on) the CPU.
    pub fn load(file: &GgufFile) -> Result<Self> {
        Self::load_on(Cpu, file)
    }
}

impl<B: Backend> Model<B> {
    /// Every weight of `file`, every block resident.
    pub fn load_on(backend: B, file: &GgufFile) -> Result<Self> {
        let config = ModelConfig::from_gguf(file)?;
        let all = LayerRange::new(0, config.n_layers)?;
        Ok(Self {
            embedding: Embedding::load(file, &config)?,
            shard: Shard::load_on(backend.clone(), file, &config, all)?,
            head: Head::load_on(backend, file, &config)?,
            config,
        })
    }

    /// A fresh KV cache for one sequence through every layer.
    pub fn new_session_kv(&self) -> SessionKv {
        SessionKv::new(self.config.n_layers)
    }

    /// Runs `tokens` (placed after the `kv.len()` tokens already cached) and returns logits:
    /// for every position when `all_logits`, else only for the last one (`[1, vocab]`).
    pub fn forward(&self, tokens: &[u32], kv: &mut SessionKv, all_logits: bool) -> Result<Tensor> {
        let position = kv.len();
        self.config.check_fits(position, tokens.len())?;
        // The whole step on the kernels' threads, handed over once: the blocks and the head
        // each handed over from this thread would wake a sleeping thread twice as often.
        rayon::scope(|_| {
            let x = self.embedding.forward(tokens)?;
            let x = self.shard.forward(&x, position, kv)?;
            let x = if all_logits {
                x
            } else {
                x.narrow(0, tokens.len() - 1, 1)?
            };
            self.head.forward(&x)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{self, SyntheticArch, SyntheticDType, SyntheticSpec};

    #[test]
    fn a_decode_step_reads_the_layers_and_the_head() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("llama.gguf");
        synthetic::write(&path, &SyntheticSpec::small(3, 64, SyntheticDType::Q8_0)).expect("write");
        let file = GgufFile::open(&path).expect("open");
        let config = ModelConfig::from_gguf(&file).expect("config");
        let all: u64 = file.tensors.values().map(|t| t.size).sum();
        let layers: u64 = file
            .tensors
            .values()
            .filter(|t| t.name.starts_with("blk."))
            .map(|t| t.size)
            .sum();
        let step = decode_step_bytes(&file, &config);
        if file.tensors.contains_key(OUTPUT) {
            assert_eq!(
                step,
                all - file.tensors[TOKEN_EMBD].size,
                "all but the embedding table"
            );
        } else {
            assert_eq!(step, all, "the tied table is the head");
        }
        assert!(step > layers);

        // A mixture of experts: a token reads two of four experts.
        let path = dir.path().join("moe.gguf");
        let spec = SyntheticSpec::fixture(SyntheticArch::Qwen3Moe, SyntheticDType::Q8_0);
        synthetic::write(&path, &spec).expect("write");
        let file = GgufFile::open(&path).expect("open");
        let config = ModelConfig::from_gguf(&file).expect("config");
        let experts: u64 = file
            .tensors
            .values()
            .filter(|t| t.dims.len() == 3)
            .map(|t| t.size)
            .sum();
        let all_layers: u64 = file
            .tensors
            .values()
            .filter(|t| t.name.starts_with("blk."))
            .map(|t| t.size)
            .sum();
        let head = file.tensors[head_matrix(&file)].size + file.tensors[OUTPUT_NORM].size;
        assert!(experts > 0);
        let want = all_layers - experts + experts / 2 + head;
        assert!(decode_step_bytes(&file, &config).abs_diff(want) <= 1);
    }

    #[test]
    fn stacked_queries_keys_and_values_give_their_parts_bits() {
        use crate::model::backend::Backend;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("llama.gguf");
        let spec = SyntheticSpec::fixture(SyntheticArch::Llama, SyntheticDType::Q8_0);
        synthetic::write(&path, &spec).expect("write");
        let file = GgufFile::open(&path).expect("open");
        let names = [
            "blk.0.attn_q.weight",
            "blk.0.attn_k.weight",
            "blk.0.attn_v.weight",
        ];
        let infos: Vec<&TensorInfo> = names.iter().map(|n| file.tensor_info(n).unwrap()).collect();
        let cols = infos[0].dims[0] as usize;
        let x = Tensor::from_vec(
            (0..2 * cols)
                .map(|i| (i as f32 * 0.37).sin())
                .collect::<Vec<f32>>(),
            (2, cols),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let stacked = Cpu
            .stack_matrices(&file, &infos)
            .expect("read")
            .expect("three repacked Q8_0 matrices stack");
        let whole = Cpu
            .matmul(&x, &stacked, None)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let parts: Vec<Vec<Vec<f32>>> = infos
            .iter()
            .map(|info| {
                let m = load_matrix(&Cpu, &file, info, Residence::Kept).unwrap();
                Cpu.matmul(&x, &m, None).unwrap().to_vec2::<f32>().unwrap()
            })
            .collect();
        for (t, row) in whole.iter().enumerate() {
            let want: Vec<u32> = parts
                .iter()
                .flat_map(|p| p[t].iter().map(|v| v.to_bits()))
                .collect();
            let got: Vec<u32> = row.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "token {t}");
        }
        // Parts of different widths or types stay apart.
        let mixed = [infos[0], file.tensor_info("blk.0.ffn_down.weight").unwrap()];
        assert!(Cpu.stack_matrices(&file, &mixed).unwrap().is_none());
    }

    #[test]
    fn only_a_matrix_loads_as_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("llama.gguf");
        let spec = SyntheticSpec::fixture(SyntheticArch::Llama, SyntheticDType::Q8_0);
        synthetic::write(&path, &spec).expect("write");
        let file = GgufFile::open(&path).expect("open");
        let matrix = |name| load_matrix(&Cpu, &file, file.tensor_info(name)?, Residence::Kept);
        matrix("blk.0.attn_q.weight").expect("a matrix");
        assert!(matches!(
            matrix("blk.0.attn_norm.weight"),
            Err(Error::Tensor { .. })
        ));
        assert!(matches!(
            matrix("blk.99.attn_q.weight"),
            Err(Error::MissingTensor(_))
        ));
    }
}
