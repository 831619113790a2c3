//! Memory64 layer manager: runs a shard whose weights need not all be resident at once.
//!
//! A layer's weights stay memory-mapped in the GGUF file; *materializing* a layer copies them into
//! an owned [`Block`] (what the kernels compute with), *evicting* it drops that block and gives
//! the layer's mapped pages back to the OS (`madvise(MADV_DONTNEED)`), so resident memory follows
//! the budget, not the file size. The budget bounds the bytes of materialized layers (counted as
//! their bytes in the file) plus the layers being loaded.
//!
//! # Policy: a pinned prefix and a streaming area
//!
//! Every step sweeps the shard's layers in the same order, a cyclic scan. On a cyclic scan of `n`
//! layers with room for `k < n`, LRU evicts exactly the layer needed soonest and never hits.
//! Instead the budget is split once, when the shard is assigned:
//! - the **streaming area** gets room for `1 + prefetch` of the largest layers (all of the budget
//!   if that is less): the layer computing and the ones prefetched behind it;
//! - the **pinned prefix**: the first layers of the shard that fit in the rest are loaded at once
//!   and never evicted.
//!
//! Pinned layers hit on every sweep: they are kept as a resident shard keeps its layers (every
//! matrix a copy, the file's pages given back) and a step takes one without the table's lock.
//! Every other layer passes through the streaming area, loaded by the prefetcher while the layer
//! before it computes (or on demand, a miss). So a decode step over `n` layers of which `p` are
//! pinned costs exactly `p` hits and `n - p` loads, whatever the order of the steps: the same hit
//! rate as the optimal (MRU) policy for the scan, less the slots given to prefetching, with
//! counters that do not drift. When the whole shard fits, every layer is pinned and every access
//! is a hit. Within the streaming area eviction is LRU among layers not in use, which serves
//! arbitrary access (any reuse inside the area hits); a layer loaded by the prefetcher and not
//! used yet is evicted only by a demand load, never by another prefetch.
//!
//! # Concurrency
//!
//! Many sessions run forward through the same shard at once. One mutex guards the layer table and
//! one condvar announces every change (a load done, a layer released). A layer in use is held by
//! a [`LayerGuard`] and is never evicted; a step holds one layer at a time, so a request waiting
//! for room always waits on steps that make progress. A layer being loaded is shared: whoever
//! asks for it meanwhile waits for that load (a *wait*) instead of loading it again. Loads run
//! outside the lock.
//!
//! # Prefetch
//!
//! After acquiring layer `i`, a step asks for the next `prefetch` layers of the sweep (wrapping
//! from the last layer to the first, where the next step starts). A dedicated thread loads them
//! if there is room without evicting a layer in use or another prefetched one, and skips them
//! otherwise: prefetching never blocks a step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tracing::{debug, warn};

use super::{load_block, Backend, Block, LayerRange, ModelConfig, Residence};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo};

/// How a managed shard may use memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerBudget {
    /// Bytes of materialized layer weights; `None` keeps the whole shard resident.
    pub bytes: Option<u64>,
    /// Layers loaded ahead of the one computing (0 disables prefetching).
    pub prefetch: usize,
}

/// Counters of a layer manager since the shard was assigned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Accesses that found the layer resident (pinned, or reused in the streaming area).
    pub hits: u64,
    /// Accesses that loaded the layer themselves.
    pub misses: u64,
    /// Accesses that found the layer resident because the prefetcher loaded it.
    pub prefetch_hits: u64,
    /// Accesses that waited for a load already in flight (a prefetch or another step's miss).
    pub waits: u64,
    /// Layers evicted.
    pub evictions: u64,
    /// Layers loaded by the prefetcher.
    pub prefetches: u64,
    /// Layers materialized in all (at assignment, on misses and by prefetch).
    pub loads: u64,
    /// Time spent loading layers, in microseconds (on any thread).
    pub load_us: u64,
    /// Bytes of the layers materialized or being loaded now.
    pub resident_bytes: u64,
    /// Layers materialized now.
    pub resident_layers: u64,
    /// Layers pinned (never evicted).
    pub pinned_layers: u64,
    /// The budget in bytes (the shard's size when the whole shard is resident).
    pub budget_bytes: u64,
}

impl LayerStats {
    /// Accesses of any kind.
    pub fn accesses(&self) -> u64 {
        self.hits + self.misses + self.prefetch_hits + self.waits
    }

    /// The counters of two layer managers together (a worker serving several models).
    pub fn plus(&self, other: &Self) -> Self {
        Self {
            hits: self.hits + other.hits,
            misses: self.misses + other.misses,
            prefetch_hits: self.prefetch_hits + other.prefetch_hits,
            waits: self.waits + other.waits,
            evictions: self.evictions + other.evictions,
            prefetches: self.prefetches + other.prefetches,
            loads: self.loads + other.loads,
            load_us: self.load_us + other.load_us,
            resident_bytes: self.resident_bytes + other.resident_bytes,
            resident_layers: self.resident_layers + other.resident_layers,
            pinned_layers: self.pinned_layers + other.pinned_layers,
            budget_bytes: self.budget_bytes + other.budget_bytes,
        }
    }
}

/// The shard's layers, loaded and evicted within a budget. See the module documentation.
#[derive(Debug)]
pub(crate) struct LayerManager<B: Backend> {
    inner: Arc<Inner<B>>,
    /// Layers (shard-relative) for the prefetch thread; `None` when prefetching is off.
    prefetch: Option<Mutex<mpsc::Sender<usize>>>,
}

#[derive(Debug)]
struct Inner<B: Backend> {
    backend: B,
    file: GgufFile,
    config: ModelConfig,
    range: LayerRange,
    /// Bytes of each layer (shard-relative index), as in the file.
    sizes: Vec<u64>,
    /// The tensors of each layer, for releasing their pages.
    tensors: Vec<Vec<TensorInfo>>,
    /// Layers `0..pinned.len()`, loaded up front and kept for the shard's life: the weights are
    /// copies like a resident shard's, and a step takes one without the table's lock (its slot
    /// in the table only counts it as resident).
    pinned: Vec<Arc<dyn Block>>,
    /// Room for the layers `pinned..`.
    stream_capacity: u64,
    budget: u64,
    depth: usize,
    table: Mutex<Table>,
    changed: Condvar,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    prefetch_hits: AtomicU64,
    waits: AtomicU64,
    evictions: AtomicU64,
    prefetches: AtomicU64,
    loads: AtomicU64,
    load_us: AtomicU64,
}

#[derive(Debug)]
struct Table {
    slots: Vec<Slot>,
    /// Bytes of the streaming layers resident or being loaded.
    stream_bytes: u64,
    /// Logical time, for LRU.
    clock: u64,
}

#[derive(Debug)]
enum Slot {
    Absent,
    Loading,
    Resident {
        block: Arc<dyn Block>,
        last_use: u64,
        /// Loaded by the prefetcher and not used since.
        prefetched: bool,
    },
}

/// Who needs room: a demand load may evict an unused prefetched layer, a prefetch may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Demand,
    Prefetch,
}

impl<B: Backend> LayerManager<B> {
    /// Plans the budget for `range`, loads the pinned prefix and starts the prefetcher.
    ///
    /// Fails with [`Error::InvalidArgument`] when the budget cannot hold the largest layer.
    pub fn new(
        backend: B,
        file: &GgufFile,
        config: &ModelConfig,
        range: LayerRange,
        budget: LayerBudget,
    ) -> Result<Self> {
        let tensors: Vec<Vec<TensorInfo>> = range
            .iter()
            .map(|layer| layer_tensors(file, layer))
            .collect();
        let sizes: Vec<u64> = tensors
            .iter()
            .map(|t| t.iter().map(|i| i.size).fold(0, u64::saturating_add))
            .collect();
        let total = sizes.iter().copied().fold(0, u64::saturating_add);
        let (largest_at, largest) = sizes
            .iter()
            .copied()
            .enumerate()
            .max_by_key(|&(i, s)| (s, std::cmp::Reverse(i)))
            .unwrap_or((0, 0));
        let budget_bytes = budget.bytes.unwrap_or(total);
        if budget_bytes < largest {
            return Err(Error::InvalidArgument(format!(
                "memory budget of {budget_bytes} bytes cannot hold layer {} of shard {range}, \
                 the largest, of {largest} bytes: give the worker at least that much",
                range.start + largest_at
            )));
        }
        let (pinned, stream_capacity) = if total <= budget_bytes {
            (sizes.len(), 0)
        } else {
            let slots = u64::try_from(budget.prefetch)
                .unwrap_or(u64::MAX)
                .saturating_add(1);
            let stream = largest.saturating_mul(slots).min(budget_bytes);
            let mut room = budget_bytes - stream;
            let pinned = sizes
                .iter()
                .take_while(|&&s| {
                    let fits = s <= room;
                    room = room.saturating_sub(s);
                    fits
                })
                .count();
            let pinned_bytes: u64 = sizes[..pinned].iter().sum();
            (pinned, budget_bytes - pinned_bytes)
        };

        let counters = Counters::default();
        let started = Instant::now();
        let blocks = (0..pinned)
            .map(|i| load_block(&backend, file, config, range.start + i, Residence::Kept))
            .collect::<Result<Vec<_>>>()?;
        // As for a resident shard: the copied tensors' pages go once every block is loaded
        // (loading the next tensor faults its neighbours' pages in again).
        for layer_tensors in &tensors[..pinned] {
            release_copied(&backend, file, layer_tensors, Residence::Kept);
        }
        let pinned: Vec<Arc<dyn Block>> = blocks.into_iter().map(Arc::from).collect();
        counters.loads.store(pinned.len() as u64, Ordering::Relaxed);
        let load_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        counters.load_us.store(load_us, Ordering::Relaxed);
        let mut slots: Vec<Slot> = (0..sizes.len()).map(|_| Slot::Absent).collect();
        for (slot, block) in slots.iter_mut().zip(&pinned) {
            *slot = Slot::Resident {
                block: Arc::clone(block),
                last_use: 0,
                prefetched: false,
            };
        }
        let inner = Arc::new(Inner {
            backend,
            file: file.clone(),
            config: config.clone(),
            range,
            tensors,
            pinned,
            stream_capacity,
            budget: budget_bytes,
            depth: budget.prefetch,
            table: Mutex::new(Table {
                slots,
                stream_bytes: 0,
                clock: 0,
            }),
            sizes,
            changed: Condvar::new(),
            counters,
        });
        let pinned = inner.pinned.len();
        // With every layer pinned there is nothing to prefetch.
        let prefetch = (budget.prefetch > 0 && pinned < inner.sizes.len()).then(|| {
            let (sender, receiver) = mpsc::channel::<usize>();
            let worker = Arc::clone(&inner);
            std::thread::Builder::new()
                .name(format!("realm-prefetch-{range}"))
                .spawn(move || {
                    // Ends when the manager (the only sender) is dropped.
                    while let Ok(layer) = receiver.recv() {
                        worker.prefetch(layer);
                    }
                })
                .map(|_| Mutex::new(sender))
        });
        let prefetch = match prefetch {
            Some(Ok(sender)) => Some(sender),
            Some(Err(e)) => {
                warn!(error = %e, "cannot start the prefetch thread: loading on demand only");
                None
            }
            None => None,
        };
        debug!(
            layers = %range,
            budget_bytes,
            shard_bytes = total,
            pinned,
            stream_capacity,
            prefetch = budget.prefetch,
            "layer manager ready"
        );
        Ok(Self { inner, prefetch })
    }

    pub fn n_layers(&self) -> usize {
        self.inner.sizes.len()
    }

    /// Whether the budget holds the whole shard: every layer pinned, so no access ever waits
    /// for a load.
    pub fn all_pinned(&self) -> bool {
        self.inner.pinned.len() == self.n_layers()
    }

    /// Layer `layer` (shard-relative), materialized, held in use until the guard drops. Asks the
    /// prefetcher for the layers after it.
    pub fn acquire(&self, layer: usize) -> Result<LayerGuard<'_, B>> {
        let block = match self.inner.pinned.get(layer) {
            Some(block) => {
                self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                Held::Pinned(block)
            }
            None => Held::Streaming(Some(self.inner.acquire(layer)?)),
        };
        if let Some(sender) = &self.prefetch {
            let n = self.n_layers();
            let sender = sender.lock().unwrap_or_else(PoisonError::into_inner);
            for ahead in 1..=self.inner.depth.min(n - 1) {
                let next = (layer + ahead) % n;
                // Pinned layers are always resident; the thread is gone only during teardown.
                if next >= self.inner.pinned.len() {
                    let _ = sender.send(next);
                }
            }
        }
        Ok(LayerGuard {
            block,
            inner: &self.inner,
        })
    }

    pub fn stats(&self) -> LayerStats {
        self.inner.stats()
    }
}

/// A materialized layer in use: it cannot be evicted until this drops.
pub(crate) struct LayerGuard<'a, B: Backend> {
    block: Held<'a>,
    inner: &'a Inner<B>,
}

/// The block a guard holds.
enum Held<'a> {
    /// A pinned layer: never evicted, so nothing to hold or release.
    Pinned(&'a Arc<dyn Block>),
    /// A layer of the streaming area, `Some` until the guard drops.
    Streaming(Option<Arc<dyn Block>>),
}

impl<B: Backend> std::ops::Deref for LayerGuard<'_, B> {
    type Target = dyn Block;

    fn deref(&self) -> &Self::Target {
        match &self.block {
            Held::Pinned(block) => block.as_ref(),
            // Present until drop.
            Held::Streaming(block) => block.as_deref().expect("layer guard holds its block"),
        }
    }
}

impl<B: Backend> Drop for LayerGuard<'_, B> {
    fn drop(&mut self) {
        let Held::Streaming(block) = &mut self.block else {
            return;
        };
        // Released under the lock, so a request checking for evictable layers cannot miss it.
        let table = self.inner.lock();
        *block = None;
        drop(table);
        self.inner.changed.notify_all();
    }
}

impl<B: Backend> Inner<B> {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Nothing panics while holding the table lock; a poisoned one still holds a valid table.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, table: MutexGuard<'a, Table>) -> MutexGuard<'a, Table> {
        self.changed
            .wait(table)
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn acquire(&self, layer: usize) -> Result<Arc<dyn Block>> {
        let mut table = self.lock();
        let mut waited = false;
        loop {
            table.clock += 1;
            let now = table.clock;
            match &mut table.slots[layer] {
                Slot::Resident {
                    block,
                    last_use,
                    prefetched,
                } => {
                    let counter = if waited {
                        &self.counters.waits
                    } else if *prefetched {
                        &self.counters.prefetch_hits
                    } else {
                        &self.counters.hits
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    *last_use = now;
                    *prefetched = false;
                    return Ok(Arc::clone(block));
                }
                Slot::Loading => {
                    waited = true;
                    table = self.wait(table);
                }
                Slot::Absent => {
                    if !self.make_room(&mut table, layer, Need::Demand) {
                        // Every other streaming layer is in use or loading: wait for one.
                        table = self.wait(table);
                        continue;
                    }
                    drop(table);
                    let loaded = self.load(layer);
                    let mut table = self.lock();
                    let result = match loaded {
                        Ok(block) => {
                            self.counters.misses.fetch_add(1, Ordering::Relaxed);
                            table.clock += 1;
                            table.slots[layer] = Slot::Resident {
                                block: Arc::clone(&block),
                                last_use: table.clock,
                                prefetched: false,
                            };
                            Ok(block)
                        }
                        Err(e) => {
                            table.slots[layer] = Slot::Absent;
                            table.stream_bytes -= self.sizes[layer];
                            Err(e)
                        }
                    };
                    drop(table);
                    self.changed.notify_all();
                    return result;
                }
            }
        }
    }

    /// Loads `layer` in the background if it is absent and there is room without evicting what
    /// a step still needs.
    fn prefetch(&self, layer: usize) {
        let mut table = self.lock();
        if !matches!(table.slots[layer], Slot::Absent)
            || !self.make_room(&mut table, layer, Need::Prefetch)
        {
            return;
        }
        drop(table);
        let loaded = self.load(layer);
        let mut table = self.lock();
        match loaded {
            Ok(block) => {
                self.counters.prefetches.fetch_add(1, Ordering::Relaxed);
                table.slots[layer] = Slot::Resident {
                    block,
                    last_use: 0,
                    prefetched: true,
                };
            }
            Err(e) => {
                // The step that needs it will load it itself and report the error.
                warn!(layer = self.range.start + layer, error = %e, "prefetch failed");
                table.slots[layer] = Slot::Absent;
                table.stream_bytes -= self.sizes[layer];
            }
        }
        drop(table);
        self.changed.notify_all();
    }

    /// Evicts streaming layers until `layer` fits, then marks it loading and reserves its bytes.
    /// Returns false, changing nothing but evictions, when no more layers can be evicted.
    fn make_room(&self, table: &mut Table, layer: usize, need: Need) -> bool {
        let size = self.sizes[layer];
        while table.stream_bytes + size > self.stream_capacity {
            let victim = table
                .slots
                .iter()
                .enumerate()
                .skip(self.pinned.len())
                .filter_map(|(i, slot)| match slot {
                    // Only the table holds it: not in use by any step.
                    Slot::Resident {
                        block,
                        last_use,
                        prefetched,
                    } if Arc::strong_count(block) == 1 && (need == Need::Demand || !prefetched) => {
                        // Unused prefetched layers go last.
                        Some(((*prefetched, *last_use), i))
                    }
                    _ => None,
                })
                .min()
                .map(|(_, i)| i);
            let Some(victim) = victim else {
                return false;
            };
            table.slots[victim] = Slot::Absent;
            table.stream_bytes -= self.sizes[victim];
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            // The block's owned copy was dropped with the slot; now the file's pages.
            self.release_pages(victim);
        }
        table.slots[layer] = Slot::Loading;
        table.stream_bytes += size;
        true
    }

    /// Materializes streaming `layer` (shard-relative): matrices the backend computes from the
    /// mapped pages keep them, mapped in by loading, until eviction; the pages of tensors the
    /// block copied are given back at once.
    fn load(&self, layer: usize) -> Result<Arc<dyn Block>> {
        let started = Instant::now();
        let block = load_block(
            &self.backend,
            &self.file,
            &self.config,
            self.range.start + layer,
            Residence::Streamed,
        )?;
        release_copied(
            &self.backend,
            &self.file,
            &self.tensors[layer],
            Residence::Streamed,
        );
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.counters.loads.fetch_add(1, Ordering::Relaxed);
        self.counters.load_us.fetch_add(us, Ordering::Relaxed);
        Ok(Arc::from(block))
    }

    fn release_pages(&self, layer: usize) {
        for info in &self.tensors[layer] {
            if let Err(e) = self.file.release_tensor(info) {
                debug!(tensor = %info.name, error = %e, "cannot release mapped pages");
            }
        }
    }

    fn stats(&self) -> LayerStats {
        let table = self.lock();
        let resident_layers = table
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Resident { .. }))
            .count();
        let c = &self.counters;
        LayerStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            prefetch_hits: c.prefetch_hits.load(Ordering::Relaxed),
            waits: c.waits.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            prefetches: c.prefetches.load(Ordering::Relaxed),
            loads: c.loads.load(Ordering::Relaxed),
            load_us: c.load_us.load(Ordering::Relaxed),
            resident_bytes: self.sizes[..self.pinned.len()].iter().sum::<u64>()
                + table.stream_bytes,
            resident_layers: resident_layers as u64,
            pinned_layers: self.pinned.len() as u64,
            budget_bytes: self.budget,
        }
    }
}

/// Gives back the mapped pages of the tensors of `tensors` that `backend` copied out of the
/// file, best effort: a tensor whose pages stay costs memory, nothing else.
pub(super) fn release_copied<B: Backend>(
    backend: &B,
    file: &GgufFile,
    tensors: &[TensorInfo],
    residence: Residence,
) {
    for info in tensors
        .iter()
        .filter(|i| !backend.borrows_mapping(i, residence))
    {
        if let Err(e) = file.release_tensor(info) {
            debug!(tensor = %info.name, error = %e, "cannot release mapped pages");
        }
    }
}

/// The tensors `blk.{layer}.*` of `file`.
pub(super) fn layer_tensors(file: &GgufFile, layer: usize) -> Vec<TensorInfo> {
    let prefix = format!("blk.{layer}.");
    file.tensors
        .range(prefix.clone()..)
        .take_while(|(name, _)| name.starts_with(&prefix))
        .map(|(_, info)| info.clone())
        .collect()
}

/// Bytes of the tensors of each layer of `range`, as in the file.
pub fn layer_bytes(file: &GgufFile, range: LayerRange) -> Vec<u64> {
    range
        .iter()
        .map(|layer| {
            layer_tensors(file, layer)
                .iter()
                .map(|i| i.size)
                .fold(0, u64::saturating_add)
        })
        .collect()
}
