//! The models a coordinator serves over one pool of workers: one [`Cluster`] each, with its own
//! plan, scheduler and admission, looked up by the name clients pass as `model`, and added or
//! removed while the others serve.
//!
//! Every model is planned over the same workers; a worker counts the layers it holds for other
//! models against its memory ([`crate::transport::WorkerSummary::room`]), so each model is planned
//! beside those placed before it. A request that names no model goes to the only model, or is
//! refused when several are served.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use realm_common::wire::WireDType;
use tracing::info;

use crate::admission::Admission;
use crate::cluster::{Cluster, ClusterOptions};
use crate::error::{Error, Result};
use crate::plan::PlanSpec;
use crate::scheduler::Scheduling;

/// How the coordinator brings a model up over its workers.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The workers' addresses, in layer order.
    pub workers: Vec<String>,
    pub wire_dtype: WireDType,
    /// Cluster token, standby workers and TLS towards the workers.
    pub cluster: ClusterOptions,
    pub scheduling: Scheduling,
    /// Admission limits of each model: generations running, and waiting for a slot.
    pub max_active: usize,
    pub max_queued: usize,
    /// How long to keep retrying workers that are not reachable yet.
    pub worker_wait: Duration,
}

/// A model being served: its cluster and the admission of its generations.
#[derive(Debug, Clone)]
pub struct Served {
    pub cluster: Arc<Cluster>,
    pub admission: Arc<Admission>,
}

impl Served {
    pub fn id(&self) -> &str {
        &self.cluster.model().id
    }
}

/// Every model served, in the order added.
#[derive(Debug)]
pub struct Models {
    served: RwLock<Vec<Served>>,
    /// How further models are brought up; `None` where models cannot be added.
    setup: Option<Setup>,
    /// Serialises additions and removals.
    changing: tokio::sync::Mutex<()>,
}

impl Models {
    /// No models yet; [`Models::add`] brings them up by `setup`.
    pub fn new(setup: Setup) -> Self {
        Self {
            served: RwLock::new(Vec::new()),
            setup: Some(setup),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// One model over `cluster`, its generations bounded by `admission`; no others can be added.
    pub fn one(cluster: Arc<Cluster>, admission: Arc<Admission>) -> Self {
        crate::telemetry::register_model(&cluster.model().id);
        Self {
            served: RwLock::new(vec![Served { cluster, admission }]),
            setup: None,
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// Every model served, in the order added.
    pub fn all(&self) -> Vec<Served> {
        // Nothing panics while holding this lock; a poisoned one still holds a valid value.
        self.served
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The model a request names; an empty name is the only model served.
    pub fn get(&self, requested: &str) -> Result<Served> {
        let served = self.all();
        if requested.is_empty() {
            return match served.as_slice() {
                [only] => Ok(only.clone()),
                _ => Err(Error::NoModelNamed {
                    served: names(&served),
                }),
            };
        }
        served
            .iter()
            .find(|s| s.id() == requested)
            .cloned()
            .ok_or_else(|| Error::UnknownModel {
                requested: requested.to_string(),
                served: names(&served),
            })
    }

    /// Loads the GGUF file at `path`, plans its layers by `plan` over the workers (beside the
    /// models they hold) and serves it once every worker holds its shard.
    pub async fn add(&self, path: &Path, plan: &PlanSpec) -> Result<Served> {
        let setup = self
            .setup
            .as_ref()
            .ok_or_else(|| Error::Internal("this coordinator cannot add models".to_string()))?;
        let _changing = self.changing.lock().await;
        let model = crate::bench::load_model(path).await.map_err(|e| {
            Error::Model(realm_common::Error::InvalidArgument(format!(
                "cannot serve {}: {e:#}",
                path.display()
            )))
        })?;
        for s in self.all() {
            if s.id() == model.id {
                return Err(Error::ModelExists(format!(
                    "a model `{}` is served already",
                    model.id
                )));
            }
            if s.cluster.model().identity.same_model(&model.identity) {
                return Err(Error::ModelExists(format!(
                    "`{}` is the same model as `{}`, served already",
                    model.id,
                    s.id()
                )));
            }
        }
        let id = model.id.clone();
        let cluster = crate::startup::connect_when_ready(
            model,
            &setup.workers,
            plan,
            setup.wire_dtype,
            setup.cluster.clone(),
            setup.scheduling,
            setup.worker_wait,
        )
        .await?;
        info!(model = %id, plan = %cluster.plan(), "model served");
        crate::telemetry::register_model(&id);
        let served = Served {
            cluster: Arc::new(cluster),
            admission: Arc::new(Admission::new(setup.max_active, setup.max_queued)),
        };
        self.served
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(served.clone());
        Ok(served)
    }

    /// Stops serving the model `id`: new requests for it are refused at once, its running
    /// generations end with [`Error::ModelRemoved`], and the workers drop its shards. Returns
    /// how many generations were running.
    pub async fn remove(&self, id: &str) -> Result<usize> {
        let _changing = self.changing.lock().await;
        let removed = {
            let mut served = self.served.write().unwrap_or_else(PoisonError::into_inner);
            let at = served.iter().position(|s| s.id() == id);
            at.map(|at| served.remove(at))
        };
        let Some(removed) = removed else {
            return Err(Error::UnknownModel {
                requested: id.to_string(),
                served: names(&self.all()),
            });
        };
        let ended = removed.cluster.close().await;
        info!(model = %id, generations_ended = ended, "model removed");
        Ok(ended)
    }

    /// Stops taking generations and waits until those in flight have ended, model by model.
    pub async fn shutdown(self) {
        let served = self
            .served
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        for s in served {
            if let Ok(cluster) = Arc::try_unwrap(s.cluster) {
                cluster.shutdown().await;
            }
        }
    }
}

/// The ids of `served`, for messages: "`a`, `b`".
fn names(served: &[Served]) -> String {
    if served.is_empty() {
        return "no model".to_string();
    }
    served
        .iter()
        .map(|s| format!("`{}`", s.id()))
        .collect::<Vec<_>>()
        .join(", ")
}
