//! Per-session attention state. A [`SessionKv`] belongs to one sequence and covers the layers of
//! one shard; block weights never hold it, so any number of sessions share the same blocks.

use half::f16;

/// Keys and values of one layer for one sequence, stored in f16 (half the memory of f32, and
/// the precision other GGUF engines cache at). Layout is position-major, `[seq][kv_head][dim]`,
/// so appending a step never moves what is already cached.
#[derive(Debug, Default, Clone)]
pub struct LayerKv {
    k: Vec<f16>,
    v: Vec<f16>,
    /// Values per position: `kv_heads * head_dim`.
    width: usize,
}

impl LayerKv {
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.k.len().checked_div(self.width).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.k.is_empty()
    }

    /// Appends `n` positions of keys and values, each `[n][kv_heads * head_dim]`.
    pub(crate) fn append(&mut self, width: usize, k: &[f32], v: &[f32]) {
        debug_assert!(self.width == 0 || self.width == width);
        self.width = width;
        self.k.extend(k.iter().map(|&x| f16::from_f32(x)));
        self.v.extend(v.iter().map(|&x| f16::from_f32(x)));
    }

    /// Keys of position `pos`, KV head `head`.
    #[inline]
    pub(crate) fn key(&self, pos: usize, head: usize, head_dim: usize) -> &[f16] {
        let at = pos * self.width + head * head_dim;
        &self.k[at..at + head_dim]
    }

    #[inline]
    pub(crate) fn value(&self, pos: usize, head: usize, head_dim: usize) -> &[f16] {
        let at = pos * self.width + head * head_dim;
        &self.v[at..at + head_dim]
    }

    /// Bytes held by this layer's cache.
    pub fn bytes(&self) -> usize {
        (self.k.capacity() + self.v.capacity()) * std::mem::size_of::<f16>()
    }
}

/// The KV caches of one sequence for the consecutive layers of a shard.
#[derive(Debug, Clone)]
pub struct SessionKv {
    layers: Vec<LayerKv>,
}

impl SessionKv {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); n_layers],
        }
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Positions cached (equal across layers after every completed step).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn layers_mut(&mut self) -> &mut [LayerKv] {
        &mut self.layers
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }
}
