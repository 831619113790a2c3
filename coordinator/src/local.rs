//! Workers inside the coordinator's process, for `run --workers K` and the benchmark: each is the
//! real worker service on its own loopback port, so every step still crosses real gRPC over real
//! sockets.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// How long a stopping worker may take to finish its calls in flight.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Running in-process workers.
#[derive(Debug)]
pub struct LocalWorkers {
    urls: Vec<String>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl LocalWorkers {
    /// Starts `count` workers serving `model` on `127.0.0.1:0`, each reporting `threads`, with
    /// the whole shard resident.
    pub async fn start(model: &Path, count: usize, threads: usize) -> anyhow::Result<Self> {
        Self::start_with_budget(model, count, threads, None, realm_worker::DEFAULT_PREFETCH).await
    }

    /// As [`LocalWorkers::start`], each worker's layer manager keeping at most `memory_budget`
    /// bytes of layer weights materialized (`None`: the whole shard) and prefetching `prefetch`
    /// layers ahead.
    pub async fn start_with_budget(
        model: &Path,
        count: usize,
        threads: usize,
        memory_budget: Option<u64>,
        prefetch: usize,
    ) -> anyhow::Result<Self> {
        let mut workers = Self {
            urls: Vec::with_capacity(count),
            stops: Vec::with_capacity(count),
            tasks: Vec::with_capacity(count),
        };
        for _ in 0..count {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .context("cannot bind a loopback port for a worker")?;
            let addr = listener.local_addr()?;
            let config = realm_worker::WorkerConfig {
                models: vec![model.to_path_buf()],
                cache_dir: None,
                threads,
                idle_timeout: realm_worker::DEFAULT_IDLE_TIMEOUT,
                memory_budget,
                prefetch,
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let shutdown = async move {
                // A dropped sender stops the worker too.
                let _ = stopped.await;
            };
            debug!(%addr, "starting an in-process worker");
            workers
                .tasks
                .push(tokio::spawn(realm_worker::run(listener, config, shutdown)));
            workers.stops.push(stop);
            workers.urls.push(format!("http://{addr}"));
        }
        Ok(workers)
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Stops the workers after `error` and returns the better explanation: a worker's own
    /// failure (which explains a refused connection) if one failed, else `error`.
    pub async fn fail(self, error: anyhow::Error) -> anyhow::Error {
        match self.stop().await {
            Err(worker_error) => worker_error,
            Ok(()) => error,
        }
    }

    /// Stops every worker and waits for them (drop clients of the workers first: a worker
    /// finishes the calls in flight before it stops).
    pub async fn stop(self) -> anyhow::Result<()> {
        for stop in self.stops {
            let _ = stop.send(());
        }
        let mut first_error = None;
        for (url, task) in self.urls.iter().zip(self.tasks) {
            let result = match tokio::time::timeout(STOP_TIMEOUT, task).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => Err(anyhow::anyhow!("panicked: {e}")),
                Err(_) => Err(anyhow::anyhow!("did not stop within {STOP_TIMEOUT:?}")),
            };
            if let Err(e) = result {
                warn!(worker = %url, error = %e, "in-process worker failed");
                first_error.get_or_insert(e.context(format!("in-process worker {url}")));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
