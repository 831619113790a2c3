//! The coordinator as a server, from its configuration to its shutdown: loads each model's share,
//! brings the workers up (waiting for those not reachable yet) and plans every model over them,
//! then serves the Realm gRPC API (and its admin API) and, where asked, the OpenAI-compatible
//! HTTP API until `shutdown` resolves, letting the generations in flight finish. `realm-coordinator serve` is this with flags; tests run it
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

use crate::admission::{DEFAULT_MAX_ACTIVE, DEFAULT_MAX_QUEUED};
use crate::cluster::ClusterOptions;
use crate::http::HttpOptions;
use crate::models::{Models, Setup};
use crate::plan::PlanSpec;
use crate::scheduler::Scheduling;
use crate::service::ServiceOptions;

/// Everything a coordinator server is configured with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The GGUF files served, each planned over all the workers (which hold copies of them, or
    /// receive their layers).
    pub models: Vec<PathBuf>,
    /// The workers' addresses, in layer order.
    pub workers: Vec<String>,
    /// How each model's layers are placed: one plan for every model, or one per model in the
    /// order of `models`.
    pub plans: Vec<PlanSpec>,
    pub wire_dtype: WireDType,
    /// How long to keep retrying workers that are not reachable yet.
    pub worker_wait: Duration,
    /// Cluster token, standby workers and TLS towards the workers.
    pub cluster: ClusterOptions,
    pub scheduling: Scheduling,
    /// Keys clients must send; empty admits any client.
    pub api_keys: Vec<Secret>,
    /// Admission limits of each model.
    pub max_active: usize,
    pub max_queued: usize,
    /// Certificate chain and key (PEM) of the gRPC client API, for TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl ServerConfig {
    /// A configuration with Realm's defaults for everything but the models and the workers.
    pub fn new(models: Vec<PathBuf>, workers: Vec<String>) -> Self {
        Self {
            models,
            workers,
            plans: vec![PlanSpec::Auto],
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

impl ServerConfig {
    /// The plan of the `i`th model.
    fn plan(&self, i: usize) -> anyhow::Result<&PlanSpec> {
        match self.plans.as_slice() {
            [] => Ok(&PlanSpec::Auto),
            [one] => Ok(one),
            plans if plans.len() == self.models.len() => Ok(&plans[i]),
            plans => anyhow::bail!(
                "{} plans for {} models: give one plan for every model, or one per model",
                plans.len(),
                self.models.len()
            ),
        }
    }
}

/// Serves `config` on `listeners` until `shutdown` resolves. `ready` is called once the workers
/// hold the shards of every model and the APIs are about to serve.
pub async fn run(
    config: ServerConfig,
    listeners: Listeners,
    ready: impl FnOnce(&Models),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(!config.models.is_empty(), "no model to serve");
    config.plan(0)?;
    let metrics = match listeners.http {
        Some(_) => Some(crate::http::install_metrics()?),
        None => None,
    };
    let api_tls = match &config.tls {
        Some((cert, key)) => {
            Some(realm_common::tls::server_config(cert, key, None).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    let models = Models::new(Setup {
        workers: config.workers.clone(),
        wire_dtype: config.wire_dtype,
        cluster: config.cluster.clone(),
        scheduling: config.scheduling,
        max_active: config.max_active,
        max_queued: config.max_queued,
        worker_wait: config.worker_wait,
    });
    // One model after the other: each is planned beside the layers placed before it.
    for (i, path) in config.models.iter().enumerate() {
        let served = crate::progress::step(
            &format!(
                "loading {} and assigning its shards over {} workers",
                path.display(),
                config.workers.len()
            ),
            models.add(path, config.plan(i)?),
        )
        .await
        .with_context(|| format!("cannot serve {} (are the workers running, each with the model file or a --cache-dir?)", path.display()))?;
        tracing::info!(model = %served.id(), plan = %served.cluster.plan(), "model ready");
    }
    ready(&models);
    let models = Arc::new(models);

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
    let http = listeners.http.map(|listener| {
        let options = HttpOptions {
            api_keys: config.api_keys.clone(),
            metrics,
        };
        tokio::spawn(crate::http::serve(
            listener,
            Arc::clone(&models),
            options,
            until_stopped(),
        ))
    });
    let service = ServiceOptions {
        api_keys: config.api_keys,
        admin_token: config.cluster.token.clone(),
        tls: api_tls,
    };
    crate::service::serve_with(
        listeners.grpc,
        Arc::clone(&models),
        service,
        until_stopped(),
    )
    .await?;
    if let Some(http) = http {
        http.await.context("the HTTP server did not finish")??;
    }
    // The servers are done; the generations they started have ended with them.
    if let Ok(models) = Arc::try_unwrap(models) {
        models.shutdown().await;
    }
    Ok(())
}
