//! Per-session attention state. A [`SessionKv`] belongs to one sequence and covers the layers of
//! one shard; block weights never hold it, so any number of sessions share the same blocks.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Keys and values of one layer for one sequence, `[n_kv_heads, seq, head_dim]` each, in f16.
#[derive(Debug, Default, Clone)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl LayerKv {
    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values and returns the whole cache.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.to_dtype(DType::F16)?, v.to_dtype(DType::F16)?);
        let (k, v) = match (&self.k, &self.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, &k], 1)?, Tensor::cat(&[pv, &v], 1)?),
            _ => (k, v),
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }

    /// Bytes held by this layer's cache.
    pub fn bytes(&self) -> usize {
        let size = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes());
        size(&self.k) + size(&self.v)
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
