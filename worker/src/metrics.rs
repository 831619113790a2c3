//! The worker's Prometheus metrics, served on `GET /metrics` of its own small HTTP listener
//! (`realm-worker --metrics-listen ADDR`): steps served and their compute time, recorded as they
//! happen, and the state read at each scrape (sessions, KV cache bytes, the shard, and the
//! Memory64 layer manager's counters).
//!
//! Each worker has its own recorder rather than the process-wide one, so workers started in one
//! process (`realm-coordinator run`, tests) keep separate counts.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics::{Counter, Histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::net::TcpListener;
use tracing::info;

use crate::service::WorkerState;

/// Histogram buckets of the step compute time, in seconds: 100 µs to 30 s.
const COMPUTE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Names of the worker's metrics.
pub mod names {
    pub const FORWARDS: &str = "realm_worker_forwards_total";
    pub const FORWARD_TOKENS: &str = "realm_worker_forward_tokens_total";
    pub const FORWARD_COMPUTE: &str = "realm_worker_forward_compute_seconds";
    pub const ACTIVE_SESSIONS: &str = "realm_worker_active_sessions";
    pub const KV_CACHE_BYTES: &str = "realm_worker_kv_cache_bytes";
    pub const SHARD_LAYERS: &str = "realm_worker_shard_layers";
    pub const LAYER_HITS: &str = "realm_worker_layer_hits_total";
    pub const LAYER_MISSES: &str = "realm_worker_layer_misses_total";
    pub const LAYER_PREFETCH_HITS: &str = "realm_worker_layer_prefetch_hits_total";
    pub const LAYER_WAITS: &str = "realm_worker_layer_waits_total";
    pub const LAYER_EVICTIONS: &str = "realm_worker_layer_evictions_total";
    pub const LAYER_LOADS: &str = "realm_worker_layer_loads_total";
    pub const LAYER_RESIDENT_BYTES: &str = "realm_worker_layer_resident_bytes";
    pub const LAYER_BUDGET_BYTES: &str = "realm_worker_layer_budget_bytes";
    pub const SHARD_CACHE_HITS: &str = "realm_worker_shard_cache_hits_total";
    pub const SHARD_CACHE_MISSES: &str = "realm_worker_shard_cache_misses_total";
    pub const SHARD_BYTES_RECEIVED: &str = "realm_worker_shard_bytes_received_total";
    pub const SHARD_BYTES_REUSED: &str = "realm_worker_shard_bytes_reused_total";
    pub const SHARD_TENSORS_DAMAGED: &str = "realm_worker_shard_tensors_damaged_total";
    pub const SHARD_CACHED_BYTES: &str = "realm_worker_shard_cached_bytes";
}

/// A worker's recorder and the handles of what it records as steps run.
pub(crate) struct WorkerMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub forwards: Counter,
    pub forward_tokens: Counter,
    pub forward_compute: Histogram,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    pub fn new() -> anyhow::Result<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(COMPUTE_BUCKETS)?
            .build_recorder();
        let handle = recorder.handle();
        let (forwards, forward_tokens, forward_compute) =
            metrics::with_local_recorder(&recorder, || {
                use metrics::{describe_counter, describe_gauge, describe_histogram};
                describe_counter!(names::FORWARDS, "Forward steps served");
                describe_counter!(names::FORWARD_TOKENS, "Tokens of the forward steps served");
                describe_histogram!(
                    names::FORWARD_COMPUTE,
                    Unit::Seconds,
                    "Compute time of one forward step over the shard"
                );
                describe_gauge!(names::ACTIVE_SESSIONS, "Sessions with a KV cache here");
                describe_gauge!(names::KV_CACHE_BYTES, "Bytes of the sessions' KV caches");
                describe_gauge!(names::SHARD_LAYERS, "Layers of the assigned shard");
                describe_counter!(
                    names::LAYER_HITS,
                    "Memory64: accesses that found the layer resident"
                );
                describe_counter!(
                    names::LAYER_MISSES,
                    "Memory64: accesses that loaded the layer"
                );
                describe_counter!(
                    names::LAYER_PREFETCH_HITS,
                    "Memory64: accesses that found the layer prefetched"
                );
                describe_counter!(
                    names::LAYER_WAITS,
                    "Memory64: accesses that waited for a load"
                );
                describe_counter!(names::LAYER_EVICTIONS, "Memory64: layers evicted");
                describe_counter!(names::LAYER_LOADS, "Memory64: layers materialized");
                describe_gauge!(
                    names::LAYER_RESIDENT_BYTES,
                    "Memory64: bytes of layers materialized"
                );
                describe_gauge!(
                    names::LAYER_BUDGET_BYTES,
                    "Memory64: the layer budget in bytes"
                );
                describe_counter!(
                    names::SHARD_CACHE_HITS,
                    "Shard cache: shards assigned with nothing to deliver"
                );
                describe_counter!(
                    names::SHARD_CACHE_MISSES,
                    "Shard cache: assignments that needed tensors delivered"
                );
                describe_counter!(
                    names::SHARD_BYTES_RECEIVED,
                    Unit::Bytes,
                    "Shard cache: bytes of tensors received and verified"
                );
                describe_counter!(
                    names::SHARD_BYTES_REUSED,
                    Unit::Bytes,
                    "Shard cache: bytes of tensors copied from other cached shards"
                );
                describe_counter!(
                    names::SHARD_TENSORS_DAMAGED,
                    "Shard cache: cached tensors found damaged and delivered again"
                );
                describe_gauge!(
                    names::SHARD_CACHED_BYTES,
                    Unit::Bytes,
                    "Shard cache: bytes of the complete shards held"
                );
                (
                    metrics::counter!(names::FORWARDS),
                    metrics::counter!(names::FORWARD_TOKENS),
                    metrics::histogram!(names::FORWARD_COMPUTE),
                )
            });
        Ok(Self {
            recorder,
            handle,
            forwards,
            forward_tokens,
            forward_compute,
        })
    }

    /// The Prometheus text of every metric, the state-derived ones read from `state` now.
    fn render(&self, state: &WorkerState) -> String {
        let now = state.snapshot();
        metrics::with_local_recorder(&self.recorder, || {
            use metrics::{counter, gauge};
            gauge!(names::ACTIVE_SESSIONS).set(now.active_sessions as f64);
            gauge!(names::KV_CACHE_BYTES).set(now.kv_cache_bytes as f64);
            gauge!(names::SHARD_LAYERS).set(now.shard_layers as f64);
            let s = now.layer_stats.unwrap_or_default();
            counter!(names::LAYER_HITS).absolute(s.hits);
            counter!(names::LAYER_MISSES).absolute(s.misses);
            counter!(names::LAYER_PREFETCH_HITS).absolute(s.prefetch_hits);
            counter!(names::LAYER_WAITS).absolute(s.waits);
            counter!(names::LAYER_EVICTIONS).absolute(s.evictions);
            counter!(names::LAYER_LOADS).absolute(s.loads);
            gauge!(names::LAYER_RESIDENT_BYTES).set(s.resident_bytes as f64);
            gauge!(names::LAYER_BUDGET_BYTES).set(s.budget_bytes as f64);
            if let Some(cache) = state.cache() {
                let n =
                    |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
                let k = &cache.counters;
                counter!(names::SHARD_CACHE_HITS).absolute(n(&k.hits));
                counter!(names::SHARD_CACHE_MISSES).absolute(n(&k.misses));
                counter!(names::SHARD_BYTES_RECEIVED).absolute(n(&k.bytes_received));
                counter!(names::SHARD_BYTES_REUSED).absolute(n(&k.bytes_reused));
                counter!(names::SHARD_TENSORS_DAMAGED).absolute(n(&k.tensors_damaged));
                gauge!(names::SHARD_CACHED_BYTES).set(cache.cached_bytes() as f64);
            }
        });
        self.handle.render()
    }
}

/// Serves `GET /metrics` (and `GET /health`) for `state` on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<WorkerState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    info!(%addr, "serving metrics");
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/health", get(|| async { "ok" }))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn render(State(state): State<Arc<WorkerState>>) -> impl IntoResponse {
    let text = state
        .metrics()
        .map(|m| m.render(&state))
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
