//! `realm-worker`: command-line entry point. Parses flags, starts logging, binds the listener,
//! announces its address on stdout and serves until SIGINT or SIGTERM.
#![forbid(unsafe_code)]

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use realm_common::auth::{check_exposure, Secret, CLUSTER_TOKEN_ENV};
use realm_common::logging::LogFormat;
use realm_worker::{
    parse_size, ServeOptions, WorkerConfig, DEFAULT_IDLE_TIMEOUT, DEFAULT_PREFETCH,
};

/// mimalloc keeps freed memory for reuse: the large activation buffers of each step come back
/// without page faults, where glibc's allocator hands them to the OS and faults them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_LISTEN: &str = "127.0.0.1:7001";
const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(
    name = "realm-worker",
    version,
    about = "Realm worker: serves a range of a model's transformer blocks to a coordinator"
)]
struct Cli {
    /// Address to listen on (port 0 picks a free port; the bound address is printed on stdout).
    #[arg(long, env = "REALM_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// A local copy of a GGUF model file; repeat it (or separate paths with commas in
    /// REALM_MODEL) for several models (default: the project model, unless --cache-dir is
    /// given).
    #[arg(long, env = "REALM_MODEL", value_delimiter = ',')]
    model: Vec<PathBuf>,
    /// Folder of the shard cache: a worker without the model file receives its layers from the
    /// coordinator and keeps them here (only its layers, checked, reused after a restart).
    #[arg(long, env = "REALM_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Worker threads for the math (default: all cores).
    #[arg(long, env = "REALM_THREADS")]
    threads: Option<usize>,
    /// Threads for the network (see `realm_common::runtime`). One keeps a step's hand-offs on
    /// one thread: each thread woken costs tens of µs where idle CPUs halt, as on virtual
    /// machines. Prefills still move off it, so health checks go on meanwhile.
    #[arg(long, env = "REALM_ASYNC_THREADS", default_value_t = 1)]
    async_threads: usize,
    /// Compute device (only `cpu` for now).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Free sessions idle for this many seconds (0: keep them until they are ended).
    #[arg(long, env = "REALM_IDLE_TIMEOUT_SECS", default_value_t = DEFAULT_IDLE_TIMEOUT.as_secs())]
    idle_timeout_secs: u64,
    /// Memory budget for materialized layer weights, e.g. `48MiB`, `2GiB`, `500MB` or bytes
    /// (default: the whole shard resident). Layers beyond it stay mapped from the file and are
    /// loaded as steps need them; it must hold the shard's largest layer.
    #[arg(long, env = "REALM_MEMORY_BUDGET", value_parser = parse_size)]
    memory_budget: Option<u64>,
    /// Layers loaded in the background ahead of the one computing (0: load on demand only).
    #[arg(long, env = "REALM_PREFETCH", default_value_t = DEFAULT_PREFETCH)]
    prefetch: usize,
    /// Serve Prometheus metrics (`GET /metrics`: steps, compute time, sessions, KV cache bytes,
    /// Memory64 counters) on this address (port 0 picks a free one; the bound address is
    /// printed on stdout). Default: no metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Log line format on stderr: `text` or `json` (one object per line, with the request id of
    /// every line about a request). The filter is `REALM_LOG` (default `info`).
    #[arg(long, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// The cluster's shared secret: every worker RPC must carry it. Required to listen on a
    /// non-loopback address (unless --insecure).
    #[arg(long, env = CLUSTER_TOKEN_ENV, hide_env_values = true)]
    token: Option<Secret>,
    /// Listen on a non-loopback address without a cluster token.
    #[arg(long)]
    insecure: bool,
    /// Bound on the memory all sessions' KV caches may hold, e.g. `512MiB` (default: none);
    /// steps beyond it are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "REALM_MAX_KV_MEMORY", value_parser = parse_size)]
    max_kv_memory: Option<u64>,
    /// TLS certificate chain (PEM) to serve with; needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) whose certificates clients must present: mutual TLS.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    realm_common::logging::init(cli.log_format, "info");
    if cli.device != "cpu" {
        anyhow::bail!(
            "device `{}` is not supported: this worker computes on `cpu` only (CUDA comes later)",
            cli.device
        );
    }
    let threads = match cli.threads {
        Some(n) => {
            // Read by the math library's thread pool when it first starts, which is after this
            // (and before the async runtime starts any thread).
            std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
            n.max(1)
        }
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let models = match (cli.model, &cli.cache_dir) {
        (models, None) if models.is_empty() => vec![PathBuf::from(DEFAULT_MODEL)],
        (models, _) => models,
    };
    if let Some(model) = models.iter().find(|m| !m.exists()) {
        anyhow::bail!(
            "model file {} not found (run deploy/fetch-models.sh to fetch the project models, \
             pass --model PATH, or give --cache-dir DIR to receive the layers from the \
             coordinator)",
            model.display()
        );
    }
    check_exposure(
        cli.listen,
        cli.token.is_some(),
        cli.insecure,
        "Set REALM_CLUSTER_TOKEN (or --token) here and on the coordinator",
    )
    .map_err(anyhow::Error::msg)?;
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some(
            realm_common::tls::server_config(cert, key, cli.tls_client_ca.as_deref())
                .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    let options = ServeOptions {
        token: cli.token,
        max_kv_bytes: cli.max_kv_memory,
        tls,
    };
    let config = WorkerConfig {
        models,
        cache_dir: cli.cache_dir,
        threads,
        idle_timeout: Duration::from_secs(cli.idle_timeout_secs),
        memory_budget: cli.memory_budget,
        prefetch: cli.prefetch,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.async_threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(cli.listen, cli.metrics_listen, config, options))
}

async fn serve(
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    config: WorkerConfig,
    options: ServeOptions,
) -> anyhow::Result<()> {
    // Signal handlers go in before the address is announced: whoever reads it may signal at once.
    let shutdown = shutdown().context("cannot install signal handlers")?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| {
        format!("cannot listen on {listen} (is another worker running there? choose another --listen)")
    })?;
    let bound = listener.local_addr().context("no bound address")?;
    let metrics = match metrics_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} (choose another --metrics-listen)")
        })?),
        None => None,
    };
    let mut stdout = std::io::stdout().lock();
    if let Some(metrics) = &metrics {
        let addr = metrics.local_addr().context("no bound metrics address")?;
        writeln!(stdout, "realm-worker serving metrics on {addr}")
            .context("cannot write to stdout")?;
    }
    writeln!(stdout, "realm-worker listening on {bound}")
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")?;
    drop(stdout);
    realm_worker::run_with(listener, metrics, config, options, shutdown).await
}

/// Resolves at the first SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled.
fn shutdown() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}
