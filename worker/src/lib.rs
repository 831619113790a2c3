//! Realm's worker: serves one contiguous range of a model's transformer blocks over gRPC and keeps
//! the KV caches of every live session for those blocks.
//!
//! [`run`] opens the worker's local GGUF file and its shard cache, if it has them (a bad file
//! fails before anything is served), then serves the `realm.v1.Worker` service and the standard
//! gRPC health service until its shutdown future resolves. The coordinator assigns the shard
//! after its handshake, from the worker's file or, for a worker without it, by delivering the
//! shard's tensors into the cache ([`cache`]); until then the worker holds no weights. A background sweep frees sessions left idle for longer than
//! [`WorkerConfig::idle_timeout`].
#![forbid(unsafe_code)]

mod cache;
mod metrics;
mod service;
mod sessions;
mod system;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use realm_common::auth::{RequireBearer, Secret};
use realm_proto::pb::worker_server::WorkerServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::ServerTlsConfig;
use tracing::info;

use crate::service::{WorkerService, WorkerState};

/// Sessions untouched for this long are freed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest gRPC message the worker sends or accepts. A step's hidden state is
/// `n_tokens * d_model * 4` bytes in f32: a full 8192-token prefill of a 576-wide model is 18 MiB,
/// so 64 MiB leaves room for wider models while still bounding what a peer can make us buffer.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// HTTP/2 flow-control windows for receiving: a prefill's hidden state or a shard's tensors
/// stream in without waiting for window updates.
const STREAM_WINDOW_BYTES: u32 = 8 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
/// Largest HTTP/2 frame the worker accepts: a shard's 4 MiB chunks arrive in 4 frames, not 256
/// of the default 16 KiB (each a write and a read on both ends).
const MAX_FRAME_BYTES: u32 = 1 << 20;

/// The idle sweep runs at most this far apart, so a session outlives its timeout by at most this
/// much.
const MAX_SWEEP_PERIOD: Duration = Duration::from_secs(1);
/// ...and at least this far apart, so a tiny timeout does not turn the sweep into a busy loop.
const MIN_SWEEP_PERIOD: Duration = Duration::from_millis(10);

/// How often the layer manager's counters are logged (only when steps ran since).
const STATS_LOG_PERIOD: Duration = Duration::from_secs(30);

/// How a worker is set up.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The worker's local copies of GGUF files, one per model it holds.
    pub models: Vec<PathBuf>,
    /// Where shards delivered by the coordinator are kept, if anywhere: a worker without the
    /// model file receives its layers there.
    pub cache_dir: Option<PathBuf>,
    /// Compute threads (reported in the handshake).
    pub threads: usize,
    /// Sessions idle for longer are freed. Zero keeps sessions until they are ended.
    pub idle_timeout: Duration,
    /// Bytes of layer weights the Memory64 layer manager keeps materialized; `None` keeps the
    /// whole shard resident. Must hold the shard's largest layer.
    pub memory_budget: Option<u64>,
    /// Layers the layer manager loads ahead of the one computing (0 disables prefetching).
    pub prefetch: usize,
}

/// Layers prefetched ahead when not configured.
pub const DEFAULT_PREFETCH: usize = 1;

/// Parses a byte size: a number with an optional unit, `B`, `KB`/`MB`/`GB`/`TB` (powers of
/// 1000) or `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024), case-insensitive; `48MiB`, `2GiB`, `1000`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "tb" | "t" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, MB, MiB, GB, GiB...)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 48MiB or 2GiB"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(format!("size `{text}` is out of range"));
    }
    Ok(bytes as u64)
}

/// How a worker guards itself: who may call it and how much KV memory its sessions may hold.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The cluster token every worker RPC must carry; `None` admits any caller.
    pub token: Option<Secret>,
    /// Bytes the KV caches of all sessions may hold together; a step that would pass it is
    /// refused with RESOURCE_EXHAUSTED. `None`: no bound.
    pub max_kv_bytes: Option<u64>,
    /// TLS for the listener (with a client CA: mutual TLS); `None` serves plaintext.
    pub tls: Option<ServerTlsConfig>,
}

/// Serves the worker service on `listener` until `shutdown` resolves, open to any caller.
///
/// Shutdown is graceful: the listener closes at once, steps in flight finish and their responses
/// are sent, then this returns.
pub async fn run(
    listener: TcpListener,
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(listener, None, config, ServeOptions::default(), shutdown).await
}

/// As [`run`], guarded by `options`, and also serving Prometheus `GET /metrics` on `metrics`
/// when given.
pub async fn run_with(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: WorkerConfig,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut state = WorkerState::open(&config, options.max_kv_bytes)?;
    if metrics.is_some() {
        state = state.with_metrics(metrics::WorkerMetrics::new()?);
    }
    let state = Arc::new(state);
    // One shutdown stops both servers.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|&s| s).await;
        }
    };
    let metrics = metrics.map(|listener| {
        tokio::spawn(metrics::serve(
            listener,
            Arc::clone(&state),
            until_stopped(),
        ))
    });
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    let addr = listener
        .local_addr()
        .context("the listener has no local address")?;
    info!(
        %addr,
        layers_from = %state.describe(),
        threads = config.threads,
        idle_timeout_s = config.idle_timeout.as_secs_f64(),
        memory_budget = ?config.memory_budget,
        prefetch = config.prefetch,
        authenticated = options.token.is_some(),
        tls = options.tls.is_some(),
        max_kv_bytes = ?options.max_kv_bytes,
        "worker serving"
    );

    let _sweep = AbortOnDrop(tokio::spawn(sweep_idle(
        Arc::clone(&state),
        config.idle_timeout,
    )));

    let _stats = AbortOnDrop(tokio::spawn(log_layer_stats(Arc::clone(&state))));

    let (closing, closing_seen) = tokio::sync::watch::channel(false);
    let worker = WorkerServer::new(WorkerService::new(state, closing_seen))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Health stays open (it tells nothing and probes carry no token); every worker RPC needs it.
    let gate = RequireBearer::new(
        options.token.as_slice(),
        "cluster token",
        "give the coordinator the workers' REALM_CLUSTER_TOKEN",
    );
    let worker = InterceptedService::new(worker, gate);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WorkerServer<WorkerService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let shutdown = async move {
        shutdown.await;
        info!("worker shutting down: finishing the steps in flight");
        // Open step streams end after their step in flight, so the server's drain can finish.
        closing.send_replace(true);
        health
            .set_not_serving::<WorkerServer<WorkerService>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    };

    // Every step is one small request and one small response: Nagle's delay would add up to a
    // round trip per step.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(Some(MAX_FRAME_BYTES));
    if let Some(tls) = options.tls {
        server = server
            .tls_config(tls)
            .context("the TLS certificate or key cannot be used")?;
    }
    server
        .trace_fn(request_span)
        .add_service(health_service)
        .add_service(worker)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("the worker's gRPC server failed")?;
    if let Some(metrics) = metrics {
        metrics
            .await
            .context("the metrics server did not finish")?
            .context("the metrics server failed")?;
    }
    info!("worker stopped");
    Ok(())
}

/// The span of one gRPC call: the coordinator's request id (`x-request-id` metadata) when it
/// sent one, so every line logged about a request carries it. At ERROR level so it is enabled
/// whenever any line is: a span filtered out would drop the id from the lines inside it.
fn request_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok());
    request_span_for(id.unwrap_or_default())
}

/// The span of one step on a `ForwardStream`, which carries its request id in the message: one
/// stream serves the steps of many requests.
pub(crate) fn request_span_for(id: &str) -> tracing::Span {
    if id.is_empty() {
        tracing::Span::none()
    } else {
        tracing::error_span!("request", request_id = %id)
    }
}

/// Frees sessions idle for longer than `timeout`, until the task is aborted.
async fn sweep_idle(state: Arc<WorkerState>, timeout: Duration) {
    if timeout.is_zero() {
        return;
    }
    let period = (timeout / 4).clamp(MIN_SWEEP_PERIOD, MAX_SWEEP_PERIOD);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        state.expire_idle(timeout);
    }
}

/// Logs the layer manager's counters every [`STATS_LOG_PERIOD`] while steps run.
async fn log_layer_stats(state: Arc<WorkerState>) {
    let mut ticks = tokio::time::interval(STATS_LOG_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        state.log_layer_stats();
    }
}

/// Aborts a background task when the server it serves stops, however `run` ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("48MiB"), Ok(48 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("500mb"), Ok(500_000_000));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }
}
