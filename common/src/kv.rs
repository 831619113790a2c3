//! Per-session attention state. A [`SessionKv`] belongs to one sequence and covers the layers of
//! one shard; block weights never hold it, so any number of sessions share the same blocks.

use half::f16;

/// Keys and values of one layer for one sequence, stored in f16 (half the memory of f32, and
/// the precision other GGUF engines cache at). Appending a step never moves what is already
/// cached. Values are position-major, `[seq][kv_head][dim]`. Keys are in blocks of
/// [`KEY_BLOCK`] positions, each `[kv_head][dim][position]`, so that one load brings one
/// dimension of eight keys and a query is scored against eight keys at once.
#[derive(Debug, Default, Clone)]
pub struct LayerKv {
    k: Vec<f16>,
    v: Vec<f16>,
    /// Values per position: `kv_heads * head_dim`.
    width: usize,
    len: usize,
}

/// Positions in one block of keys.
pub const KEY_BLOCK: usize = 8;

impl LayerKv {
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `n` positions of keys and values, each `[n][kv_heads * head_dim]`.
    pub(crate) fn append(&mut self, width: usize, k: &[f32], v: &[f32]) {
        debug_assert!(self.width == 0 || self.width == width);
        self.width = width;
        self.v.extend(v.iter().map(|&x| f16::from_f32(x)));
        for row in k.chunks_exact(width) {
            let (block, lane) = (self.len / KEY_BLOCK, self.len % KEY_BLOCK);
            if lane == 0 {
                self.k.resize((block + 1) * width * KEY_BLOCK, f16::ZERO);
            }
            let keys = &mut self.k[block * width * KEY_BLOCK..][..width * KEY_BLOCK];
            for (c, &x) in row.iter().enumerate() {
                keys[c * KEY_BLOCK + lane] = f16::from_f32(x);
            }
            self.len += 1;
        }
    }

    /// Keys of positions `KEY_BLOCK * block..KEY_BLOCK * (block + 1)`, KV head `head`:
    /// `[dim][position]`. Positions past [`Self::len`] hold zeros.
    #[inline]
    pub(crate) fn key_block(&self, block: usize, head: usize, head_dim: usize) -> &[f16] {
        let at = (block * self.width + head * head_dim) * KEY_BLOCK;
        &self.k[at..at + head_dim * KEY_BLOCK]
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
