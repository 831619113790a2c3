//! The `realm.v1.Worker` gRPC service: handshake, shard assignment, forward steps and session ends.
//!
//! Every check a request needs happens here or in `realm_common::wire`, and each failure maps to
//! one precise status: INVALID_ARGUMENT for a malformed or inconsistent request,
//! FAILED_PRECONDITION for a request this worker cannot serve in its present state (no shard, or
//! another model), INTERNAL for a failure of the worker itself. No request can panic the worker or
//! disturb sessions other than its own.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use futures_util::Stream;
use realm_common::gguf::GgufFile;
use realm_common::model::{
    layer_bytes, LayerBudget, LayerRange, LayerStats, ModelConfig, Precision, SessionRows, Shard,
};
use realm_common::shard::Manifest;
use realm_common::transfer::TransferProgress;
use realm_common::wire::{Activations, ModelIdentity, WireDType};
use realm_common::Error;
use realm_proto::pb;
use realm_proto::PROTOCOL_VERSION;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, trace, trace_span, warn, Instrument};

use crate::cache::{Lookup, ShardCache};
use crate::metrics::WorkerMetrics;
use crate::sessions::{Sessions, Step};
use crate::system;
use crate::WorkerConfig;

/// The only device this worker computes on, for now.
const DEVICE: &str = "cpu";

/// Everything the worker holds: where it finds layers (its model files, its shard cache) and,
/// once assigned, a shard of each model it serves and the sessions of each.
#[derive(Debug)]
pub(crate) struct WorkerState {
    /// The worker's own copies of model files (`--model`).
    local: Vec<LocalModel>,
    /// Shards delivered by the coordinator (`--cache-dir`).
    cache: Option<Arc<ShardCache>>,
    threads: usize,
    /// How the layer manager of every assigned shard may use memory.
    budget: LayerBudget,
    /// The layer managers' access count when their stats were last logged.
    logged_accesses: AtomicU64,
    /// One shard per model, in the order assigned, each with its sessions and replaced as one: a
    /// step in flight keeps the shard it started on alive, and sessions never outlive the
    /// weights they were computed with.
    loaded: RwLock<Vec<Arc<Loaded>>>,
    /// Serialises shard assignments and deliveries, so two never write or load at once.
    assigning: tokio::sync::Mutex<()>,
    /// Bound on the bytes all sessions' KV caches may hold together, of every model.
    max_kv_bytes: Option<u64>,
    /// Set when the worker serves `/metrics`.
    metrics: Option<WorkerMetrics>,
}

/// A model file and what it holds.
#[derive(Debug)]
struct LocalModel {
    file: GgufFile,
    config: ModelConfig,
    identity: ModelIdentity,
}

impl LocalModel {
    fn open(path: &std::path::Path) -> realm_common::Result<Self> {
        let file = GgufFile::open_without_vocabulary(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let identity = ModelIdentity::of(&file, &config);
        Ok(Self {
            file,
            config,
            identity,
        })
    }
}

/// The worker's state at one moment, for the metrics.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub active_sessions: usize,
    pub kv_cache_bytes: u64,
    pub shard_layers: usize,
    /// `None` when the shard is fully resident (or none is assigned).
    pub layer_stats: Option<LayerStats>,
}

/// An assigned shard and the sessions running through it.
#[derive(Debug)]
struct Loaded {
    shard: Shard,
    sessions: Sessions,
    /// The file the shard's weights are mapped from: the model file, or a cached shard file.
    file: GgufFile,
    config: ModelConfig,
    identity: ModelIdentity,
}

impl WorkerState {
    /// Opens and checks the model file and the shard cache the worker is given; loads no
    /// weights.
    pub fn open(worker: &WorkerConfig, max_kv_bytes: Option<u64>) -> anyhow::Result<Self> {
        use anyhow::Context;
        if worker.models.is_empty() && worker.cache_dir.is_none() {
            anyhow::bail!("a worker needs a model file (--model) or a shard cache (--cache-dir)");
        }
        let mut local: Vec<LocalModel> = Vec::with_capacity(worker.models.len());
        for path in &worker.models {
            let model = LocalModel::open(path)
                .with_context(|| format!("cannot serve {}", path.display()))?;
            if let Some(twin) = local
                .iter()
                .find(|m| m.identity.same_model(&model.identity))
            {
                anyhow::bail!(
                    "{} and {} are the same model: give each model once",
                    twin.file.path().display(),
                    path.display()
                );
            }
            local.push(model);
        }
        let cache = worker
            .cache_dir
            .as_deref()
            .map(|dir| ShardCache::open(dir, worker.threads).map(Arc::new))
            .transpose()?;
        Ok(Self {
            local,
            cache,
            threads: worker.threads,
            budget: LayerBudget {
                bytes: worker.memory_budget,
                prefetch: worker.prefetch,
            },
            logged_accesses: AtomicU64::new(0),
            loaded: RwLock::new(Vec::new()),
            assigning: tokio::sync::Mutex::new(()),
            metrics: None,
            max_kv_bytes,
        })
    }

    /// Where the worker finds layers, for its logs.
    pub fn describe(&self) -> String {
        let local = self
            .local
            .iter()
            .map(|m| format!("{} ({})", m.file.path().display(), m.identity));
        let cache = self
            .cache
            .as_ref()
            .map(|c| format!("shard cache {}", c.dir().display()));
        local.chain(cache).collect::<Vec<_>>().join(", ")
    }

    pub fn cache(&self) -> Option<&ShardCache> {
        self.cache.as_deref()
    }

    /// Records the worker's metrics into `metrics` from now on.
    pub fn with_metrics(mut self, metrics: WorkerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn metrics(&self) -> Option<&WorkerMetrics> {
        self.metrics.as_ref()
    }

    /// Every model's shard summed: sessions, KV bytes, layers and the layer managers' counters.
    pub fn snapshot(&self) -> Snapshot {
        let mut now = Snapshot::default();
        for loaded in self.all_loaded() {
            now.active_sessions += loaded.sessions.len();
            now.kv_cache_bytes += loaded.sessions.kv_bytes();
            now.shard_layers += loaded.shard.range().len();
            if let Some(s) = loaded.shard.layer_stats() {
                now.layer_stats = Some(match now.layer_stats {
                    Some(sum) => sum.plus(&s),
                    None => s,
                });
            }
        }
        now
    }

    /// Every shard held, in the order assigned.
    fn all_loaded(&self) -> Vec<Arc<Loaded>> {
        // Nothing panics while holding this lock; a poisoned one still holds a valid value.
        self.loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The shard of the model whose header digest is `model`; an empty `model` names the only
    /// shard held, if the worker holds exactly one.
    fn loaded(&self, model: &str) -> Result<Arc<Loaded>, Status> {
        let all = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
        if model.is_empty() {
            return match all.as_slice() {
                [only] => Ok(Arc::clone(only)),
                [] => Err(no_shard()),
                several => Err(Status::invalid_argument(format!(
                    "this worker holds shards of {} models: the request must name its model",
                    several.len()
                ))),
            };
        }
        all.iter()
            .find(|l| l.identity.header_sha256 == model)
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "this worker holds no shard of model {model} (none assigned, it was released, \
                     or one is loading): AssignShard first"
                ))
            })
    }

    /// Takes the shard of `identity`'s model out, if one is held.
    fn take_loaded(&self, identity: &ModelIdentity) -> Option<Arc<Loaded>> {
        let mut all = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
        let at = all.iter().position(|l| l.identity.same_model(identity))?;
        Some(all.remove(at))
    }

    fn put_loaded(&self, loaded: Arc<Loaded>) {
        let mut all = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
        all.retain(|l| !l.identity.same_model(&loaded.identity));
        all.push(loaded);
    }

    /// Frees the sessions of every shard idle for longer than `timeout`.
    pub fn expire_idle(&self, timeout: Duration) {
        for loaded in self.all_loaded() {
            let expired = loaded.sessions.expire_idle(timeout);
            if expired > 0 {
                debug!(expired, remaining = loaded.sessions.len(), "idle sweep");
            }
        }
    }

    /// Logs the layer managers' counters if steps ran since they were last logged.
    pub fn log_layer_stats(&self) {
        let managed: Vec<(Arc<Loaded>, LayerStats)> = self
            .all_loaded()
            .into_iter()
            .filter_map(|l| l.shard.layer_stats().map(|s| (l, s)))
            .collect();
        let accesses = managed.iter().map(|(_, s)| s.accesses()).sum();
        if self.logged_accesses.swap(accesses, Ordering::Relaxed) != accesses {
            for (loaded, stats) in &managed {
                log_stats(loaded.shard.range(), stats, "layer manager");
            }
        }
    }

    /// Drops the shard of `identity`'s model and its sessions (steps still in flight on it keep
    /// it alive until they end); the number of sessions it held, if it was held.
    fn drop_shard(&self, identity: &ModelIdentity, why: &'static str) -> Option<usize> {
        let previous = self.take_loaded(identity)?;
        if let Some(stats) = previous.shard.layer_stats() {
            log_stats(
                previous.shard.range(),
                &stats,
                "layer manager of the dropped shard",
            );
        }
        let sessions = previous.sessions.len();
        info!(
            model = %previous.identity,
            layers = %previous.shard.range(),
            sessions,
            "{why}"
        );
        Some(sessions)
    }
}

impl Loaded {
    fn shard_info(&self, prefetch: usize) -> pb::ShardInfo {
        pb::ShardInfo {
            model: Some(pb::ModelIdentity::from(&self.identity)),
            layers: Some(pb::LayerRange::from(self.shard.range())),
            weight_bytes: self.weight_bytes(),
            active_sessions: u32::try_from(self.sessions.len()).unwrap_or(u32::MAX),
            kv_cache_bytes: self.sessions.kv_bytes(),
            layer_manager: self
                .shard
                .layer_stats()
                .map(|stats| stats_to_wire(&stats, prefetch)),
        }
    }

    /// Bytes of the file's tensors for the blocks of the shard (`blk.{i}.*`).
    fn weight_bytes(&self) -> u64 {
        layer_bytes(&self.file, self.shard.range())
            .into_iter()
            .fold(0, u64::saturating_add)
    }

    /// Checks that `n_tokens` new tokens after `position` fit the model's context window.
    fn check_fits(&self, position: usize, n_tokens: usize) -> Result<(), Status> {
        self.config
            .check_fits(position, n_tokens)
            .map_err(|e| match e {
                Error::ContextOverflow { context, .. } => Status::invalid_argument(format!(
                    "position past the context: {n_tokens} tokens at position {position} end past \
                     the model's context window of {context} tokens"
                )),
                other => other.into(),
            })
    }

    /// KV bytes `n_tokens` new tokens of a session add on this shard: keys and values in f16.
    fn kv_bytes_for(&self, n_tokens: usize) -> u64 {
        let per_token =
            self.shard.range().len() * 2 * self.config.n_kv_heads * self.config.head_dim * 2;
        per_token as u64 * n_tokens as u64
    }
}

impl WorkerState {
    /// Refuses a session whose step would take the KV caches past the worker's bound, with
    /// `needed` bytes more for this step (its own and those of the sessions before it); the
    /// caches of every model's sessions count.
    fn check_kv_room(&self, held: u64, sessions: usize, needed: u64) -> Result<(), Status> {
        let Some(max) = self.max_kv_bytes else {
            return Ok(());
        };
        if held.saturating_add(needed) > max {
            return Err(Status::resource_exhausted(format!(
                "KV cache memory is full: {held} of {max} bytes held by {sessions} sessions, this \
                 step needs {needed} more; retry when sessions end, or raise --max-kv-memory"
            )));
        }
        Ok(())
    }
}

/// The gRPC face of a [`WorkerState`].
#[derive(Debug, Clone)]
pub(crate) struct WorkerService {
    state: Arc<WorkerState>,
    closing: watch::Receiver<bool>,
}

/// The replies of one `ForwardStream`, in the order of its requests.
pub(crate) type ReplyStream =
    Pin<Box<dyn Stream<Item = Result<pb::ForwardReply, Status>> + Send + 'static>>;

impl WorkerService {
    /// `closing` turns true when the worker begins to shut down.
    pub fn new(state: Arc<WorkerState>, closing: watch::Receiver<bool>) -> Self {
        Self { state, closing }
    }

    /// One forward step, for both `Forward` and `ForwardStream`: every session that passes its
    /// checks runs; the others are listed in the reply's `failed`.
    async fn step(&self, request: pb::ForwardRequest) -> Result<pb::ForwardResponse, Status> {
        let PreparedStep {
            loaded,
            mut sessions,
            failed,
            hidden,
            dtype,
        } = self
            .prepare_step(request)
            .await
            .map_err(|status| refused("Forward", status))?;
        let d_model = loaded.config.d_model;
        let rows = hidden
            .as_ref()
            .map_or(Ok(0), |h| h.dim(0))
            .map_err(Error::from)?;
        let Some(hidden) = hidden else {
            // Every session was refused: nothing runs.
            return Ok(pb::ForwardResponse {
                hidden: Some(empty_rows(d_model, dtype)?),
                compute_us: 0,
                failed,
            });
        };

        let span = trace_span!("forward", sessions = sessions.len(), rows);
        // A shard that never waits for a layer to load runs a short step as one job of the
        // compute pool, its parallel loops forking there (see `realm_common::runtime`).
        let parallel = loaded.shard.never_waits();
        let joined = realm_common::runtime::step(rows, parallel, move || {
            let _span = span.enter();
            let started = Instant::now();
            // A panic in the model code must not take the worker down: it fails this step alone.
            let computed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut batch: Vec<SessionRows> = sessions
                    .iter_mut()
                    .map(|s| SessionRows {
                        position: s.position,
                        rows: s.rows,
                        precision: s.precision,
                        kv: &mut s.step.kv,
                    })
                    .collect();
                loaded.shard.forward_batch(&hidden, &mut batch)
            }));
            let compute = started.elapsed();
            let failed = |e: &dyn std::fmt::Display| {
                Status::internal(format!("forward pass failed, its sessions dropped: {e}"))
            };
            let wire = match computed {
                Ok(Ok(hidden)) => Activations::to_wire(&hidden, dtype).map_err(|e| {
                    // The same step would fail the same way on any worker: not one to retry.
                    Status::out_of_range(format!(
                        "the step's output cannot go on the wire, its sessions dropped: {e}"
                    ))
                }),
                Ok(Err(e)) => Err(failed(&e)),
                Err(_) => Err(failed(&"the forward pass panicked")),
            };
            for s in &sessions {
                let _span = s.span.enter();
                match &wire {
                    Ok(_) => loaded.sessions.finish_step(&s.step),
                    // Some blocks may have cached this step and others not: the cache is unusable.
                    Err(error) => {
                        let error = error.message();
                        warn!(session = %s.id, position = s.position, %error, "forward failed: session dropped");
                        loaded.sessions.discard(&s.id, &s.step);
                    }
                }
            }
            trace!(compute_us = compute.as_micros(), "step done");
            wire.map(|hidden| (hidden, compute))
        })
        .await;
        // The request was checked before the step ran, so a failure here is the worker's own.
        if let (Some(m), Ok(Ok((_, compute)))) = (self.state.metrics(), &joined) {
            m.forwards.increment(1);
            m.forward_tokens.increment(rows as u64);
            m.forward_compute.record(compute.as_secs_f64());
        }
        match joined {
            Ok(Ok((hidden, compute))) => Ok(pb::ForwardResponse {
                hidden: Some(hidden),
                compute_us: u64::try_from(compute.as_micros()).unwrap_or(u64::MAX),
                failed,
            }),
            Ok(Err(status)) => Err(status),
            Err(e) => Err(Status::internal(format!("forward pass did not run: {e}"))),
        }
    }
}

/// A `[0, d_model]` hidden state: the reply of a step none of whose sessions ran.
fn empty_rows(d_model: usize, dtype: WireDType) -> Result<pb::Tensor, Status> {
    let none =
        Tensor::zeros((0, d_model), candle_core::DType::F32, &Device::Cpu).map_err(Error::from)?;
    Ok(Activations::to_wire(&none, dtype)?)
}

/// An assignment's answer when the cache lacks the shard.
fn wanted(manifest: bool, tensors: Vec<u32>) -> pb::AssignShardResponse {
    pb::AssignShardResponse {
        wanted: Some(pb::ShardWanted { manifest, tensors }),
        ..Default::default()
    }
}

fn no_shard() -> Status {
    Status::failed_precondition(
        "this worker holds no shard (none assigned yet, or one is loading): AssignShard first",
    )
}

/// Logs a refused request (at debug: a peer's mistake is not the worker's trouble) and passes
/// the status on.
fn refused(rpc: &'static str, status: Status) -> Status {
    debug!(rpc, code = ?status.code(), message = status.message(), "request refused");
    status
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let shards = self.state.all_loaded();
        Ok(Response::new(pb::InfoResponse {
            realm_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: PROTOCOL_VERSION,
            device: DEVICE.to_string(),
            threads: u32::try_from(self.state.threads).unwrap_or(u32::MAX),
            memory_available_bytes: system::memory_available_bytes(),
            active_sessions: u32::try_from(shards.iter().map(|l| l.sessions.len()).sum::<usize>())
                .unwrap_or(u32::MAX),
            kv_cache_bytes: shards.iter().map(|l| l.sessions.kv_bytes()).sum(),
            shards: shards
                .iter()
                .map(|l| l.shard_info(self.state.budget.prefetch))
                .collect(),
            shard_cache: self.state.cache().map(|c| {
                let n = |v: &AtomicU64| v.load(Ordering::Relaxed);
                let k = &c.counters;
                pb::ShardCacheStats {
                    hits: n(&k.hits),
                    misses: n(&k.misses),
                    tensors_received: n(&k.tensors_received),
                    bytes_received: n(&k.bytes_received),
                    tensors_damaged: n(&k.tensors_damaged),
                    cached_bytes: c.cached_bytes(),
                    bytes_reused: n(&k.bytes_reused),
                }
            }),
        }))
    }

    async fn assign_shard(
        &self,
        request: Request<pb::AssignShardRequest>,
    ) -> Result<Response<pb::AssignShardResponse>, Status> {
        let request = request.into_inner();
        let state = &self.state;
        let theirs = ModelIdentity::try_from(request.model.as_ref())
            .map_err(|e| refused("AssignShard", e.into()))?;
        let range = LayerRange::try_from(request.layers.as_ref())
            .map_err(|e| refused("AssignShard", e.into()))?;
        if range.end > theirs.n_layers {
            return Err(refused(
                "AssignShard",
                Status::invalid_argument(format!(
                    "layer range {range} lies outside the model's {} layers (0-{})",
                    theirs.n_layers,
                    theirs.n_layers.saturating_sub(1)
                )),
            ));
        }
        let manifest = request
            .manifest
            .map(|m| Manifest::parse(m.header))
            .transpose()
            .map_err(|e| refused("AssignShard", e.into()))?;
        if let Some(m) = &manifest {
            if !m.identity().same_model(&theirs) || m.range() != range {
                return Err(refused(
                    "AssignShard",
                    Status::invalid_argument(format!(
                        "the manifest is of layers {} of the {}, not of layers {range} of the {theirs}",
                        m.range(),
                        m.identity()
                    )),
                ));
            }
        }

        let _assigning = state.assigning.lock().await;
        // Where the layers come from: the worker's model file if it is that model, else the
        // shard cache, which may want tensors delivered first.
        let local = state.local.iter().find(|m| m.identity.same_model(&theirs));
        let (file, config, identity, from_cache) = match (local, &state.cache) {
            (Some(m), _) => (m.file.clone(), m.config.clone(), m.identity.clone(), false),
            (None, Some(cache)) => {
                let asked_manifest = manifest.is_some();
                let lookup = {
                    let cache = Arc::clone(cache);
                    tokio::task::spawn_blocking(move || match &manifest {
                        Some(m) => cache.prepare(m),
                        None => cache.find(&theirs, range),
                    })
                    .await
                    .map_err(|e| Status::internal(format!("the shard cache failed: {e}")))??
                };
                let path = match lookup {
                    Lookup::Ready(path) => path,
                    Lookup::NeedManifest => return Ok(Response::new(wanted(true, Vec::new()))),
                    Lookup::Wanted(tensors) => {
                        cache.counters.misses.fetch_add(1, Ordering::Relaxed);
                        info!(layers = %range, tensors = tensors.len(), "shard wanted from the coordinator");
                        return Ok(Response::new(wanted(false, tensors)));
                    }
                };
                if !asked_manifest {
                    cache.counters.hits.fetch_add(1, Ordering::Relaxed);
                }
                let file = GgufFile::open_without_vocabulary(&path)?;
                let config = ModelConfig::from_gguf(&file)?;
                // The shard's keys name the model it was cut from: the model asked for.
                let identity = ModelIdentity::of(&file, &config);
                (file, config, identity, true)
            }
            (None, None) => {
                let ours = state
                    .local
                    .iter()
                    .map(|m| format!("{} is {}", m.file.path().display(), m.identity))
                    .collect::<Vec<_>>()
                    .join("; ");
                warn!(ours = %ours, theirs = %theirs, "refused a shard of another model");
                return Err(Status::failed_precondition(format!(
                    "model mismatch: the coordinator holds {theirs}, and none of this worker's \
                     model files is that model ({ours}); give the worker that file with --model, \
                     or --cache-dir to receive the layers"
                )));
            }
        };

        // Free this model's previous shard and its sessions before loading the next, so the
        // worker never needs room for both (steps still in flight on it keep it alive until they
        // end). Other models' shards are not touched.
        state.drop_shard(&identity, "dropped shard");
        let started = Instant::now();
        let budget = state.budget;
        let (load_file, load_config) = (file.clone(), config.clone());
        let shard = tokio::task::spawn_blocking(move || {
            Shard::load_managed(&load_file, &load_config, range, budget)
        })
        .await
        .map_err(|e| Status::internal(format!("loading layers {range} failed: {e}")))?
        .map_err(|e| {
            warn!(layers = %range, error = %e, "cannot load shard");
            Status::from(e)
        })?;
        let load_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let stats = shard.layer_stats().unwrap_or_default();
        state.logged_accesses.store(0, Ordering::Relaxed);
        let loaded = Arc::new(Loaded {
            sessions: Sessions::new(range.len()),
            shard,
            file,
            config,
            identity,
        });
        let shard_info = loaded.shard_info(state.budget.prefetch);
        let weight_bytes = shard_info.weight_bytes;
        info!(
            model = %loaded.identity,
            layers = %range,
            ms = load_ms,
            weight_bytes,
            from_cache,
            budget_bytes = stats.budget_bytes,
            pinned_layers = stats.pinned_layers,
            resident_bytes = stats.resident_bytes,
            prefetch = state.budget.prefetch,
            "loaded shard"
        );
        state.put_loaded(loaded);
        Ok(Response::new(pb::AssignShardResponse {
            shard: Some(shard_info),
            weight_bytes,
            load_ms,
            wanted: None,
            from_cache,
        }))
    }

    async fn deliver_shard(
        &self,
        request: Request<Streaming<pb::ShardDelivery>>,
    ) -> Result<Response<pb::DeliverShardResponse>, Status> {
        let state = &self.state;
        let cache = state.cache.clone().ok_or_else(|| {
            refused(
                "DeliverShard",
                Status::failed_precondition(
                    "this worker keeps no shard cache: start it with --cache-dir to receive layers",
                ),
            )
        })?;
        let mut parts = request.into_inner();
        let manifest = match parts.message().await? {
            Some(pb::ShardDelivery {
                part: Some(pb::shard_delivery::Part::Manifest(m)),
            }) => Arc::new(Manifest::parse(m.header)?),
            _ => {
                return Err(refused(
                    "DeliverShard",
                    Status::invalid_argument("a delivery starts with the shard's manifest"),
                ))
            }
        };
        let _assigning = state.assigning.lock().await;
        let range = manifest.range();
        let mut receiver = {
            let manifest = Arc::clone(&manifest);
            tokio::task::spawn_blocking(move || cache.receiver(manifest))
                .await
                .map_err(|e| Status::internal(format!("the shard cache failed: {e}")))??
        };
        let mut progress = TransferProgress::new(
            format!("receiving layers {range}"),
            receiver.remaining_bytes(),
        );
        let outcome = loop {
            let chunk = match parts.message().await {
                Ok(Some(pb::ShardDelivery {
                    part: Some(pb::shard_delivery::Part::Chunk(chunk)),
                })) => chunk,
                Ok(None) => break Ok(()),
                Ok(Some(_)) => {
                    break Err(Status::invalid_argument(
                        "a delivery carries one manifest, first, then tensor chunks",
                    ))
                }
                Err(status) => break Err(status),
            };
            let n = chunk.data.len() as u64;
            let written = tokio::task::spawn_blocking(move || {
                receiver
                    .chunk(chunk.tensor, chunk.offset, &chunk.data)
                    .map(|()| receiver)
            })
            .await
            .map_err(|e| Status::internal(format!("the shard cache failed: {e}")))
            .and_then(|r| r);
            match written {
                Ok(r) => receiver = r,
                Err(status) => {
                    progress.abandon();
                    warn!(layers = %range, error = %status.message(), "shard delivery failed");
                    return Err(status);
                }
            }
            progress.advance(n);
        };
        if let Err(status) = outcome {
            progress.abandon();
            warn!(layers = %range, error = %status.message(), "shard delivery cut short; the tensors checked so far are kept");
            return Err(status);
        }
        let (tensors_received, bytes_received) = (receiver.tensors, receiver.bytes);
        let complete = tokio::task::spawn_blocking(move || receiver.finish())
            .await
            .map_err(|e| Status::internal(format!("the shard cache failed: {e}")))??;
        progress.finish();
        Ok(Response::new(pb::DeliverShardResponse {
            tensors_received,
            bytes_received,
            complete,
        }))
    }

    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        self.step(request.into_inner()).await.map(Response::new)
    }

    type ForwardStreamStream = ReplyStream;

    async fn forward_stream(
        &self,
        request: Request<Streaming<pb::ForwardRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let state = (self.clone(), request.into_inner());
        let replies = futures_util::stream::unfold(Some(state), |state| async move {
            let (mut service, mut steps) = state?;
            // Between steps, a worker shutting down ends the stream: the coordinator opens
            // another (to a standby, if this worker is gone) for its next step.
            let next = tokio::select! {
                biased;
                next = steps.message() => next,
                _ = service.closing.wait_for(|closing| *closing) => return None,
            };
            match next {
                Ok(Some(request)) => {
                    let result = match service.step(request).await {
                        Ok(response) => pb::forward_reply::Result::Response(response),
                        Err(status) => pb::forward_reply::Result::Error(pb::StepError {
                            code: status.code() as i32,
                            message: status.message().to_string(),
                        }),
                    };
                    let reply = pb::ForwardReply {
                        result: Some(result),
                    };
                    Some((Ok(reply), Some((service, steps))))
                }
                // The coordinator closed its side: it has no more steps for this stream.
                Ok(None) => None,
                // A message that cannot be read ends the stream with its status.
                Err(status) => Some((Err(status), None)),
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn end_session(
        &self,
        request: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::EndSessionResponse>, Status> {
        let request = request.into_inner();
        let id = request.session_id;
        // A session of a model no longer held ended with its shard.
        let ended = self
            .state
            .loaded(&request.model)
            .is_ok_and(|loaded| loaded.sessions.end(&id));
        debug!(session = %id, ended, "end session");
        Ok(Response::new(pb::EndSessionResponse { ended }))
    }

    async fn release_shard(
        &self,
        request: Request<pb::ReleaseShardRequest>,
    ) -> Result<Response<pb::ReleaseShardResponse>, Status> {
        let model = request.into_inner().model;
        if model.is_empty() {
            return Err(refused(
                "ReleaseShard",
                Status::invalid_argument("name the model whose shard to release"),
            ));
        }
        let _assigning = self.state.assigning.lock().await;
        let held = self.state.loaded(&model).ok();
        let ended = held.and_then(|l| self.state.drop_shard(&l.identity, "released shard"));
        Ok(Response::new(pb::ReleaseShardResponse {
            released: ended.is_some(),
            sessions_ended: ended.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        }))
    }
}

fn log_stats(range: LayerRange, s: &LayerStats, message: &'static str) {
    info!(
        layers = %range,
        hits = s.hits,
        misses = s.misses,
        prefetch_hits = s.prefetch_hits,
        waits = s.waits,
        evictions = s.evictions,
        prefetches = s.prefetches,
        loads = s.loads,
        load_ms = s.load_us / 1000,
        resident_bytes = s.resident_bytes,
        resident_layers = s.resident_layers,
        budget_bytes = s.budget_bytes,
        "{message}"
    );
}

fn stats_to_wire(s: &LayerStats, prefetch: usize) -> pb::LayerManagerStats {
    let small = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    pb::LayerManagerStats {
        hits: s.hits,
        misses: s.misses,
        prefetch_hits: s.prefetch_hits,
        waits: s.waits,
        evictions: s.evictions,
        prefetches: s.prefetches,
        loads: s.loads,
        load_us: s.load_us,
        resident_bytes: s.resident_bytes,
        resident_layers: small(s.resident_layers),
        pinned_layers: small(s.pinned_layers),
        budget_bytes: s.budget_bytes,
        prefetch_depth: u32::try_from(prefetch).unwrap_or(u32::MAX),
    }
}

/// A validated step: the sessions that run, locked, in the request's order, and the rows of
/// exactly those sessions; the sessions refused, with why.
struct PreparedStep {
    loaded: Arc<Loaded>,
    sessions: Vec<ReadySession>,
    failed: Vec<pb::SessionFailure>,
    /// `None` when every session was refused.
    hidden: Option<Tensor>,
    dtype: WireDType,
}

/// One session of a step, locked for it.
struct ReadySession {
    id: String,
    /// The span of the client request it serves: every line logged about it carries the id.
    span: tracing::Span,
    position: usize,
    rows: usize,
    precision: Precision,
    step: Step,
}

/// A session's part of a request, checked for its shape.
struct Part {
    index: usize,
    id: String,
    span: tracing::Span,
    position: usize,
    rows: usize,
    precision: Precision,
    /// Its first row in the request's hidden state.
    first_row: usize,
}

impl WorkerService {
    /// Checks a forward request against the shard and its sessions against their caches, and
    /// locks the sessions that may run. A malformed request fails whole; a session that cannot
    /// run (unknown, out of step with its cache, past the context or the KV bound) is refused
    /// alone.
    async fn prepare_step(&self, request: pb::ForwardRequest) -> Result<PreparedStep, Status> {
        let state = &self.state;
        let loaded = state.loaded(&request.model)?;
        let layers = LayerRange::try_from(request.layers.as_ref())?;
        if layers != loaded.shard.range() {
            return Err(Status::invalid_argument(format!(
                "layer range {layers} is not this worker's shard {}",
                loaded.shard.range()
            )));
        }
        let hidden = request
            .hidden
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("hidden state is missing"))?;
        let activations = Activations::from_wire(hidden, loaded.config.d_model)?;
        let (n_rows, _) = activations.hidden.dims2().map_err(Error::from)?;
        let parts = parts_of(request.sessions, n_rows)?;

        let mut failed = Vec::new();
        let mut fail = |part: &Part, status: Status| {
            part.span.in_scope(|| {
                debug!(session = %part.id, code = ?status.code(), message = status.message(), "session refused");
            });
            failed.push(pb::SessionFailure {
                index: part.index as u32,
                error: Some(pb::StepError {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                }),
            });
        };
        // The KV bound admits sessions in order while their new tokens fit, beside every
        // model's sessions (summed only under a bound: it walks every session).
        let (held, held_sessions) = match state.max_kv_bytes {
            Some(_) => state
                .all_loaded()
                .iter()
                .fold((0u64, 0usize), |(bytes, n), l| {
                    (bytes + l.sessions.kv_bytes(), n + l.sessions.len())
                }),
            None => (0, 0),
        };
        let mut admitted = Vec::with_capacity(parts.len());
        let mut needed = 0;
        for part in parts {
            let checked = loaded.check_fits(part.position, part.rows).and_then(|()| {
                let more = loaded.kv_bytes_for(part.rows);
                state
                    .check_kv_room(held, held_sessions, needed + more)
                    .map(|()| more)
            });
            match checked {
                Ok(more) => {
                    needed += more;
                    admitted.push(part);
                }
                Err(status) => fail(&part, status),
            }
        }
        // Locked in the order of their ids, so two steps sharing sessions never wait on each
        // other in a cycle.
        admitted.sort_by(|a, b| a.id.cmp(&b.id));
        let mut sessions = Vec::with_capacity(admitted.len());
        for part in admitted {
            let began = loaded
                .sessions
                .begin_step(&part.id, part.position)
                .instrument(part.span.clone())
                .await;
            match began {
                Ok(step) => sessions.push((part, step)),
                Err(e) => fail(&part, Status::invalid_argument(e.to_string())),
            }
        }
        sessions.sort_by_key(|(part, _)| part.index);
        failed.sort_by_key(|f| f.index);

        let all_run = failed.is_empty();
        let hidden = if sessions.is_empty() {
            None
        } else if all_run {
            Some(activations.hidden)
        } else {
            let pieces = sessions
                .iter()
                .map(|(p, _)| activations.hidden.narrow(0, p.first_row, p.rows))
                .collect::<candle_core::Result<Vec<_>>>()
                .and_then(|pieces| Tensor::cat(&pieces, 0))
                .map_err(Error::from)?;
            Some(pieces)
        };
        Ok(PreparedStep {
            loaded,
            sessions: sessions
                .into_iter()
                .map(|(part, step)| ReadySession {
                    id: part.id,
                    span: part.span,
                    position: part.position,
                    rows: part.rows,
                    precision: part.precision,
                    step,
                })
                .collect(),
            failed,
            hidden,
            dtype: activations.dtype,
        })
    }
}

/// The sessions of a request with their rows, checked to be well formed: at least one, each
/// named once, with at least one row, the rows adding up to the `n_rows` of the hidden state.
fn parts_of(sessions: Vec<pb::SessionRows>, n_rows: usize) -> Result<Vec<Part>, Status> {
    if sessions.is_empty() {
        return Err(Status::invalid_argument("the step names no session"));
    }
    let mut parts: Vec<Part> = Vec::with_capacity(sessions.len());
    let mut first_row = 0usize;
    for (index, s) in sessions.into_iter().enumerate() {
        if s.session_id.is_empty() {
            return Err(Status::invalid_argument(format!(
                "session id {index} of the step is empty"
            )));
        }
        if parts.iter().any(|p| p.id == s.session_id) {
            return Err(Status::invalid_argument(format!(
                "session {} appears twice in the step",
                s.session_id
            )));
        }
        let rows = s.rows as usize;
        if rows == 0 {
            return Err(Status::invalid_argument(format!(
                "session {} has no rows in the step",
                s.session_id
            )));
        }
        let position = usize::try_from(s.position).map_err(|_| {
            Status::invalid_argument(format!(
                "position past the context: position {} does not fit this machine",
                s.position
            ))
        })?;
        let step_tokens = if s.step_tokens == 0 {
            rows
        } else {
            s.step_tokens as usize
        };
        if step_tokens < rows {
            return Err(Status::invalid_argument(format!(
                "session {} has {rows} rows of a step of {step_tokens} tokens",
                s.session_id
            )));
        }
        parts.push(Part {
            index,
            span: crate::request_span_for(&s.request_id),
            id: s.session_id,
            position,
            rows,
            precision: Precision::of_step(step_tokens),
            first_row,
        });
        first_row += rows;
    }
    if first_row != n_rows {
        return Err(Status::invalid_argument(format!(
            "the step's sessions hold {first_row} rows, its hidden state {n_rows}"
        )));
    }
    Ok(parts)
}
