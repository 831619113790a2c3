//! The coordinator as a server, from its configuration to its shutdown: loads the model's share,
//! brings the workers up (waiting for those not reachable yet), then serves the Realm gRPC API
//! and, where asked, the OpenAI-compatible HTTP API until `shutdown` resolves, letting the
//! generations in flight finish. `realm-coordinator serve` is this with flags; tests run it
//! in-process on port 0.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use realm_common::auth::Secret;
use realm_common::wire::WireDType;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::{Admission, DEFAULT_MAX_ACTIVE, DEFAULT_MAX_QUEUED};
use crate::cluster::{Cluster, ClusterOptions};
use crate::http::HttpOptions;
use crate::plan::PlanSpec;
use crate::scheduler::Scheduling;
use crate::service::ServiceOptions;

/// Everything a coordinator server is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The GGUF file (the workers hold copies of it).
    pub model: PathBuf,
    /// The workers' addresses, in layer order.
    pub workers: Vec<String>,
    pub plan: PlanSpec,
    pub wire_dtype: WireDType,
    /// How long to keep retrying workers that are not reachable yet.
    pub worker_wait: Duration,
    /// Cluster token, standby workers and TLS towards the workers.
    pub cluster: ClusterOptions,
    pub scheduling: Scheduling,
    /// Keys clients must send; empty admits any client.
    pub api_keys: Vec<Secret>,
    pub max_active: usize,
    pub max_queued: usize,
    /// Certificate chain and key (PEM) of the gRPC client API, for TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl ServerConfig {
    /// A configuration with Realm's defaults for everything but the model and the workers.
    pub fn new(model: PathBuf, workers: Vec<String>) -> Self {
        Self {
            model,
            workers,
            plan: PlanSpec::Auto,
            wire_dtype: WireDType::F32,
            worker_wait: Duration::ZERO,
            cluster: ClusterOptions::default(),
            scheduling: Scheduling::default(),
            api_keys: Vec::new(),
            max_active: DEFAULT_MAX_ACTIVE,
            max_queued: DEFAULT_MAX_QUEUED,
            tls: None,
        }
    }
}

/// Where the server listens: the Realm gRPC API and, optionally, the HTTP API.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: Option<TcpListener>,
}

/// Serves `config` on `listeners` until `shutdown` resolves. `ready` is called once the workers
/// hold their shards and the APIs are about to serve.
pub async fn run(
    config: ServerConfig,
    listeners: Listeners,
    ready: impl FnOnce(&Cluster),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = match listeners.http {
        Some(_) => Some(crate::http::install_metrics()?),
        None => None,
    };
    let model = crate::progress::step(
        &format!("loading {}", config.model.display()),
        crate::bench::load_model(&config.model),
    )
    .await?;
    let api_tls = match &config.tls {
        Some((cert, key)) => {
            Some(realm_common::tls::server_config(cert, key, None).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    let cluster = crate::progress::step(
        &format!(
            "planning the layers over {} workers and assigning their shards",
            config.workers.len()
        ),
        crate::startup::connect_when_ready(
            model,
            &config.workers,
            &config.plan,
            config.wire_dtype,
            config.cluster.clone(),
            config.scheduling,
            config.worker_wait,
        ),
    )
    .await
    .context("cannot set up the cluster (are the workers running, each with the same model file or a --cache-dir?)")?;
    tracing::info!(plan = %cluster.plan(), "cluster ready");
    ready(&cluster);
    let cluster = Arc::new(cluster);

    // One shutdown stops both servers; each lets its requests in flight finish.
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|&s| s).await;
        }
    };
    let admission = Arc::new(Admission::new(config.max_active, config.max_queued));
    let http = listeners.http.map(|listener| {
        let options = HttpOptions {
            api_keys: config.api_keys.clone(),
            admission: Arc::clone(&admission),
            metrics,
        };
        tokio::spawn(crate::http::serve(
            listener,
            Arc::clone(&cluster),
            options,
            until_stopped(),
        ))
    });
    let service = ServiceOptions {
        api_keys: config.api_keys,
        admission,
        tls: api_tls,
    };
    crate::service::serve_with(
        listeners.grpc,
        Arc::clone(&cluster),
        service,
        until_stopped(),
    )
    .await?;
    if let Some(http) = http {
        http.await.context("the HTTP server did not finish")??;
    }
    // The servers are done; the generations they started have ended with them.
    if let Ok(cluster) = Arc::try_unwrap(cluster) {
        cluster.shutdown().await;
    }
    Ok(())
}
