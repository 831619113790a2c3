//! Realm's worker: serves one contiguous range of a model's transformer blocks over gRPC and keeps
//! the KV caches of every live session for those blocks.
#![forbid(unsafe_code)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;

/// Sessions untouched for this long are freed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How a worker is set up.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The worker's local copy of the GGUF file.
    pub model: PathBuf,
    /// Compute threads (reported in the handshake).
    pub threads: usize,
    /// Sessions idle for longer are freed.
    pub idle_timeout: Duration,
}

/// Serves the worker service on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _ = (listener, config, shutdown);
    anyhow::bail!("the worker service is not built yet")
}
