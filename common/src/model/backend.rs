//! The compute backend seam: the operations the architectures run (a block, a mixture of
//! experts, the head), behind one trait, so that the architectures say *what* they compute and a
//! backend says *where and how*. [`Cpu`] is the one backend today.
//!
//! # What is behind the trait
//!
//! Every weight and every operation whose numerics Realm defines: loading a matrix or a vector
//! of weights from a GGUF tensor into the backend's own handle ([`Backend::Matrix`],
//! [`Backend::Vector`]), the quantized matrix product with its bias, RMS norm, RoPE, attention
//! against each session's KV cache, the residual addition and the gated activations (SwiGLU,
//! GeGLU). A mixture of experts needs nothing more: its experts are matrices (slices of one
//! tensor, loaded like any other) and gated activations.
//!
//! What candle computes alike on every device stays plain candle in the architectures:
//! arranging activations (`reshape`, `narrow`, `transpose`, `contiguous`, `index_select`), a
//! scalar factor on the queries, the head's `tanh` soft-cap, and reading values back
//! (`to_vec2`, a copy from any device). Some parts of a step are host work whatever the
//! backend: the positions and their RoPE angles (one table per step, `Rope::table`, shared by
//! queries and keys), the expert router (each token's logits alone, in f64 sums, so a token
//! routes the same way in any batch) and the embedding lookup.
//!
//! # Types
//!
//! Activations are `candle_core::Tensor`, `[rows, width]` f32. candle has CUDA and Metal
//! tensors, so a GPU backend keeps a step's activations on its device from one operation to the
//! next with no activation type of Realm's. They enter a shard and leave it on the host (from
//! the wire or the embedding, to the wire or the head): such a backend moves them to its device
//! in its first operation, and candle reads them back. The CPU backend's are host tensors,
//! which its loops read and write in place, as before the seam.
//!
//! Weights are associated types, not tensors: the CPU backend computes straight from the
//! mapped file in its kernels' layouts (or from repacked copies), a GPU one would from device
//! memory in its kernels' layouts, and neither can be handed the other's. The KV cache stays the
//! session's [`LayerKv`](crate::kv::LayerKv), in host memory; a GPU backend wanting it on the
//! device would make the cache a backend type as well.
//!
//! # Choosing a backend
//!
//! The backend is a type parameter of whatever holds weights (the blocks, the experts, the
//! [`Head`](super::Head), and so the [`Shard`](super::Shard) and the [`Model`](super::Model),
//! [`Cpu`] by default) and a value they hold: it is chosen once, when they are loaded
//! (`load_on`; `load` picks the CPU), and every operation after that is a static call, with no
//! dispatch or device check per operation. Blocks are still erased behind `dyn Block`, which
//! the layer manager and the shard hold whatever the backend. A new backend is a module beside
//! `cpu` implementing [`Backend`] inside this crate (the trait's arguments include the crate's
//! own `Rope` and `Segment`); `block.rs`, `experts.rs` and the head do not change.

mod cpu;

use candle_core::Tensor;

use super::attention::{Rope, Segment};
use super::config::Activation;
use crate::error::Result;
use crate::gguf::{GgufFile, TensorInfo};

pub use cpu::Cpu;

/// Which cached positions a query sees and how its scores are scaled: a row at position `p`
/// sees its session's positions `j <= p`, and with a `window` only those with `p - j <
/// window`; a score is `scale · q·k`, then `c · tanh(s / c)` with a `softcap` `c`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring {
    pub window: Option<usize>,
    pub scale: f64,
    pub softcap: Option<f32>,
}

/// How long the weights a backend loads stay, which decides where it keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residence {
    /// For the life of their shard (no layer manager): where they compute fastest, whatever the
    /// copy costs at load (on the CPU, every matrix the kernels compute is a copy in the weight
    /// arena's huge pages, and the file's pages go).
    Kept,
    /// While the layer manager keeps their layer: from the file's mapped pages where the backend
    /// computes from them, so that a layer is materialized by mapping its pages in, no copy,
    /// and evicted by giving them back.
    Streamed,
}

/// The operations the architectures run. Activations are f32 [`Tensor`]s of `[rows, width]`
/// unless said otherwise; every operation returns a new tensor and leaves its inputs as they
/// were. A backend computes the same bits for a row whatever else is in its step (the batched
/// service's promise that a session's output does not depend on who shares its steps).
pub trait Backend: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// A weight matrix `[rows, cols]`, applied as `x @ W^T`.
    type Matrix: Send + Sync + std::fmt::Debug;
    /// A vector of weights: a norm's scales, a bias.
    type Vector: Send + Sync + std::fmt::Debug;

    /// Whether the weights [`load_matrix`](Self::load_matrix) makes of `info` for `residence`
    /// are computed from the file's mapped pages rather than from a copy: the layer manager
    /// keeps such pages mapped while their layer is resident, and gives back the pages of every
    /// other tensor of a layer once it is loaded. A three-dimensional tensor (one matrix per
    /// expert) is judged as its matrices are.
    fn borrows_mapping(&self, info: &TensorInfo, residence: Residence) -> bool;

    /// The matrix `info` describes: a tensor of `file`, or a slice of one (an expert's);
    /// `info.dims` is `[cols, rows]`.
    fn load_matrix(
        &self,
        file: &GgufFile,
        info: &TensorInfo,
        residence: Residence,
    ) -> Result<Self::Matrix>;

    /// One matrix of the rows of every tensor of `infos` in turn (each `[cols, rows_i]`, all of
    /// one type and width), where this backend computes the stack faster than its parts one
    /// by one and holds it in no more memory; `None` where it would not. A step's queries, keys
    /// and values are one product then (one pass over the threads instead of three), and so
    /// are an MLP's gate and up; their rows are the bits the parts would give.
    fn stack_matrices(
        &self,
        file: &GgufFile,
        infos: &[&TensorInfo],
    ) -> Result<Option<Self::Matrix>>;

    /// The one-dimensional tensor `info` describes.
    fn load_vector(&self, file: &GgufFile, info: &TensorInfo) -> Result<Self::Vector>;

    /// `x @ W^T + bias`: `x` is `[n, cols]`; returns `[n, rows]`.
    fn matmul(&self, x: &Tensor, w: &Self::Matrix, bias: Option<&Self::Vector>) -> Result<Tensor>;

    /// Every row (last dimension) of `x`, of any rank, RMS-normalized and scaled by `weight`.
    fn rms_norm(&self, x: &Tensor, weight: &Self::Vector, eps: f64) -> Result<Tensor>;

    /// `x` (`[heads, n, head_dim]`) rotated by `angles`, the `rope.table` of the step's
    /// positions.
    fn rope(&self, x: &Tensor, rope: &Rope, angles: &[(f32, f32)]) -> Result<Tensor>;

    /// Grouped-query attention of a step. `q` is `[n_heads, n, head_dim]`, `k` and `v`
    /// `[n_kv_heads, n, head_dim]` (already rotated), their rows divided among the sessions by
    /// `segments` in order; each segment's keys and values are appended to its cache, then
    /// each row attends against its own session's cache as `scoring` says, in the segment's
    /// [`Precision`](super::Precision). Returns `[n, n_heads * head_dim]`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        segments: &mut [Segment<'_>],
        scoring: Scoring,
    ) -> Result<Tensor>;

    /// `x + y`, of one shape: a residual connection.
    fn add(&self, x: &Tensor, y: &Tensor) -> Result<Tensor>;

    /// `act(gate) · up`, of one shape: a gated MLP's hidden state (one expert's, in a mixture).
    fn gated(&self, activation: Activation, gate: &Tensor, up: &Tensor) -> Result<Tensor>;
}
