//! The forward pass, split the way Realm distributes it: an [`Embedding`] stage, a run of
//! transformer [`Block`]s grouped in a [`Shard`] that owns a [`LayerRange`], and a [`Head`].
//!
//! Blocks load only their own `blk.{i}.*` tensors, so a worker can hold any contiguous range.
//! Blocks hold weights only; the attention state of a sequence lives in a [`SessionKv`] owned by
//! that session, so many sessions run through the same weights at once.

mod attention;
mod block;
pub mod config;
mod elementwise;
mod experts;
mod layers;
mod norm;

use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo};
use crate::kernels::{self, QMatrix};
use crate::kv::SessionKv;
use crate::quant::{load_qtensor, qtensor_from_bytes};
use config::tensors::{OUTPUT, OUTPUT_BIAS, OUTPUT_NORM, TOKEN_EMBD};
use norm::rms_norm;

pub use attention::{Precision, Segment};
pub use config::{Architecture, ModelConfig};
pub use layers::{layer_bytes, LayerBudget, LayerStats};
use layers::{layer_tensors, LayerManager};

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

/// A weight matrix applied as `x @ W^T`: Realm's own kernels where the format has one (on CPU),
/// computing straight from the mapped file; candle's otherwise, from a copy.
#[derive(Debug, Clone)]
pub(crate) enum Linear {
    Realm(QMatrix),
    Candle(QMatMul),
}

/// Whether a tensor is computed from the mapped file's pages rather than from a copy: the layer
/// manager keeps such pages mapped while the layer is resident, and releases copied ones.
/// Formats that Realm's kernels repack are copied (in another layout). A three-dimensional
/// tensor holds one matrix per expert, `dims[0]` wide and `dims[1]` high, each loaded as a
/// slice of the mapping like a matrix of its own.
pub(crate) fn borrows_mapping(info: &TensorInfo, device: &Device) -> bool {
    device.is_cpu()
        && matches!(info.dims.len(), 2 | 3)
        && kernels::supported_shape(info.dtype, info.dims[0] as usize)
        && !kernels::repacks(info.dtype, info.dims[1] as usize)
}

impl Linear {
    pub fn load(file: &GgufFile, name: &str, device: &Device) -> Result<Self> {
        Self::from_info(file, file.tensor_info(name)?, device)
    }

    /// The matrix `info` describes (a tensor of `file`, or a slice of one).
    pub fn from_info(file: &GgufFile, info: &TensorInfo, device: &Device) -> Result<Self> {
        if info.dims.len() != 2 {
            return Err(Error::Tensor {
                name: info.name.clone(),
                problem: format!("expected a matrix, found dimensions {:?}", info.dims),
            });
        }
        if device.is_cpu() {
            let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
            if borrows_mapping(info, device) {
                if let Some(m) = QMatrix::mapped(info.dtype, rows, cols, file.tensor_data(info)?) {
                    // Fault the pages in now, at load time, rather than during the first step.
                    file.populate_tensor(info)?;
                    return Ok(Self::Realm(m));
                }
            } else if kernels::supported_shape(info.dtype, cols) {
                let bytes = file.tensor_bytes(info)?;
                // The repacked copy is all the kernels read: the file's pages can go, as the
                // copy proceeds (best effort; the whole tensor's release below reports errors).
                let release = |n| drop(file.release_tensor_part(info, n));
                if let Some(m) = QMatrix::new_releasing(info.dtype, rows, cols, bytes, release) {
                    file.release_tensor(info)?;
                    return Ok(Self::Realm(m));
                }
            }
        }
        Ok(Self::Candle(QMatMul::from_qtensor(load_qtensor(
            file, info, device,
        )?)?))
    }

    /// Outputs per input row.
    pub fn rows(&self) -> usize {
        match self {
            Self::Realm(m) => m.rows(),
            Self::Candle(m) => match m {
                QMatMul::QTensor(t) => t.shape().dims()[0],
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims()[0],
            },
        }
    }

    /// `x` is `[n, cols]`; returns `[n, rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(m) => Ok(m.forward(x)?),
            Self::Realm(m) => {
                let (n, cols) = x.dims2()?;
                if cols != m.cols() {
                    return Err(Error::InvalidArgument(format!(
                        "activation width {cols} does not match weight width {}",
                        m.cols()
                    )));
                }
                let mut out = vec![0.0f32; n * m.rows()];
                elementwise::with_values(x, |input| m.matmul(input, n, &mut out))?;
                Ok(Tensor::from_vec(out, (n, m.rows()), x.device())?)
            }
        }
    }
}

/// One transformer block: weights of `blk.{i}.*` and the forward pass over them.
pub trait Block: Send + Sync + std::fmt::Debug {
    /// Runs the block on `x` (`[rows, d_model]`), the rows of one or more sessions in the order
    /// of `segments`: the matrix products over every row at once, attention per session against
    /// its own cache, to which each segment's keys and values are appended.
    fn forward(&self, x: &Tensor, segments: &mut [Segment<'_>]) -> Result<Tensor>;
}

fn load_block(
    file: &GgufFile,
    config: &ModelConfig,
    layer: usize,
    device: &Device,
) -> Result<Box<dyn Block>> {
    Ok(Box::new(block::DecoderBlock::load(
        file, config, layer, device,
    )?))
}

/// Token embeddings. The table stays quantized in the file mapping; a lookup dequantizes only
/// the rows it needs.
#[derive(Debug, Clone)]
pub struct Embedding {
    file: GgufFile,
    info: TensorInfo,
    d_model: usize,
    vocab: usize,
    /// Gemma scales embeddings by √d_model; 1 for llama.
    scale: f64,
    device: Device,
}

impl Embedding {
    pub fn load(file: &GgufFile, config: &ModelConfig, device: &Device) -> Result<Self> {
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
            device: device.clone(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// `[tokens.len(), d_model]` hidden states for `tokens`.
    pub fn forward(&self, tokens: &[u32]) -> Result<Tensor> {
        let row_bytes = self.info.size as usize / self.vocab;
        let bytes = self.file.tensor_bytes(&self.info)?;
        let mut rows = Vec::with_capacity(tokens.len());
        for &t in tokens {
            let t = t as usize;
            if t >= self.vocab {
                return Err(Error::InvalidArgument(format!(
                    "token id {t} is outside the vocabulary of {} tokens",
                    self.vocab
                )));
            }
            let row = &bytes[t * row_bytes..(t + 1) * row_bytes];
            let q = qtensor_from_bytes(self.info.dtype, row, &[self.d_model as u64], &Device::Cpu)?;
            rows.push(q.dequantize(&Device::Cpu)?);
            // Reading a row maps up to 64 KiB of the table around it (the kernel's fault-around):
            // giving those pages back keeps the table out of the resident memory, where it
            // would otherwise grow with every token seen.
            self.file
                .release_tensor_range(&self.info, t * row_bytes, row_bytes)?;
        }
        let x = Tensor::stack(&rows, 0)?.to_device(&self.device)?;
        Ok(if self.scale != 1.0 {
            (x * self.scale)?
        } else {
            x
        })
    }
}

/// Final norm and output projection.
#[derive(Debug, Clone)]
pub struct Head {
    norm: Tensor,
    output: Linear,
    bias: Option<Tensor>,
    /// Gemma 2: logits pass through `c · tanh(l / c)`.
    softcap: Option<f32>,
    eps: f64,
}

impl Head {
    pub fn load(file: &GgufFile, config: &ModelConfig, device: &Device) -> Result<Self> {
        // Tied embeddings: without an output matrix the embedding table doubles as the head.
        let output_name = if file.tensors.contains_key(OUTPUT) {
            OUTPUT
        } else {
            TOKEN_EMBD
        };
        let output = Linear::load(file, output_name, device)?;
        let bias = if file.tensors.contains_key(OUTPUT_BIAS) {
            Some(load_vector(file, OUTPUT_BIAS, output.rows(), device)?)
        } else {
            None
        };
        Ok(Self {
            norm: load_vector(file, OUTPUT_NORM, config.d_model, device)?,
            output,
            bias,
            softcap: config.final_softcap,
            eps: config.rms_eps,
        })
    }

    /// Logits `[n, vocab]` for every row of `x` (`[n, d_model]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = rms_norm(&x.contiguous()?, &self.norm, self.eps)?;
        let mut logits = self.output.forward(&x)?;
        if let Some(bias) = &self.bias {
            logits = logits.broadcast_add(bias)?;
        }
        if let Some(cap) = self.softcap {
            logits = ((logits * cap.recip() as f64)?.tanh()? * cap as f64)?;
        }
        Ok(logits)
    }
}

/// The blocks of one contiguous layer range.
#[derive(Debug)]
pub struct Shard {
    range: LayerRange,
    layers: Layers,
}

/// Where a shard's blocks come from.
#[derive(Debug)]
enum Layers {
    /// Every block loaded up front and kept (the single-process model).
    Resident(Vec<Box<dyn Block>>),
    /// Blocks materialized within a memory budget (a worker; see `layers`).
    Managed(LayerManager),
}

impl Shard {
    /// Loads only the `blk.{i}.*` tensors of `range`, every block resident.
    pub fn load(
        file: &GgufFile,
        config: &ModelConfig,
        range: LayerRange,
        device: &Device,
    ) -> Result<Self> {
        check_range(config, range)?;
        let blocks = range
            .iter()
            .map(|layer| load_block(file, config, layer, device))
            .collect::<Result<_>>()?;
        // Each copy gave its tensor's pages back as it went, but reading the next tensor maps
        // its neighbours' cached pages in again (the kernel's fault-around, up to 64 KiB
        // around each fault): once every block is loaded, the copied tensors go for good.
        for layer in range.iter() {
            for info in layer_tensors(file, layer) {
                if !borrows_mapping(&info, device) {
                    file.release_tensor(&info)?;
                }
            }
        }
        Ok(Self {
            range,
            layers: Layers::Resident(blocks),
        })
    }

    /// A shard whose blocks are materialized within `budget` by the Memory64 layer manager:
    /// the pinned prefix is loaded now, the rest on use and by prefetch. Fails with
    /// [`Error::InvalidArgument`] when the budget cannot hold the largest layer.
    pub fn load_managed(
        file: &GgufFile,
        config: &ModelConfig,
        range: LayerRange,
        device: &Device,
        budget: LayerBudget,
    ) -> Result<Self> {
        check_range(config, range)?;
        Ok(Self {
            range,
            layers: Layers::Managed(LayerManager::new(file, config, range, device, budget)?),
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
pub struct Model {
    pub config: ModelConfig,
    pub embedding: Embedding,
    pub shard: Shard,
    pub head: Head,
}

impl Model {
    pub fn load(file: &GgufFile, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_gguf(file)?;
        let all = LayerRange::new(0, config.n_layers)?;
        Ok(Self {
            embedding: Embedding::load(file, &config, device)?,
            shard: Shard::load(file, &config, all, device)?,
            head: Head::load(file, &config, device)?,
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
        let x = self.embedding.forward(tokens)?;
        let x = self.shard.forward(&x, position, kv)?;
        let x = if all_logits {
            x
        } else {
            x.narrow(0, tokens.len() - 1, 1)?
        };
        self.head.forward(&x)
    }
}

/// Loads a 1-D f32 tensor (norm weights) and checks its length.
fn load_vector(file: &GgufFile, name: &str, len: usize, device: &Device) -> Result<Tensor> {
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
    let q = crate::quant::load_qtensor(file, info, device)?;
    Ok(q.dequantize(device)?)
}
