//! Which worker runs which layers: the handshake with every worker (Realm and protocol
//! versions), the plan, shard assignment (a worker accepts only a shard of the same model file),
//! and recovery when a worker is lost.
//!
//! The [`Topology`] in force is replaced whole: every re-plan bumps its generation, so a session
//! whose caches were built on an older one knows to rebuild them.

use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use realm_common::auth::{Bearer, Secret};
use realm_common::tls::ClientTls;
use realm_common::wire::ModelIdentity;
use realm_proto::pb;
use tracing::{debug, info, warn};

use crate::delivery::{ShardOffer, ShardSource};
use crate::error::{Error, Result};
use crate::net::{connect_worker, normalize_url, MAX_MESSAGE_BYTES};
use crate::plan::{Plan, PlanSpec};
use crate::telemetry::names;
use crate::transport::{Liveness, ModelKey, WorkerClients, WorkerLink, WorkerSummary};

/// Realm's release version, which workers must share.
pub const REALM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long a worker may take to answer the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a liveness probe of a worker may take while re-planning.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// How a cluster reaches and replaces its workers.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// The cluster token, sent with every worker RPC.
    pub token: Option<Secret>,
    /// Workers held in reserve: they take over the layers of a worker that dies.
    pub standby: Vec<String>,
    /// TLS for `https://` workers: the CA to trust and, for mutual TLS, this coordinator's
    /// certificate.
    pub tls: Option<ClientTls>,
    /// How a worker that stops answering is caught.
    pub liveness: Liveness,
}

/// The workers running the layers now.
#[derive(Debug)]
pub(crate) struct Topology {
    /// Bumped on every re-plan: a session whose caches were built on an older topology rebuilds
    /// them.
    pub generation: u64,
    pub plan: Plan,
    /// In plan order: `workers[i].range == plan.ranges()[i]`.
    pub workers: Vec<WorkerLink>,
}

/// The workers of a cluster: the topology in force and how to replace it.
#[derive(Debug)]
pub(crate) struct Workers {
    topology: RwLock<Arc<Topology>>,
    /// Every worker URL known, given and standby: the candidates when re-planning.
    known: Vec<String>,
    /// Serialises re-plans.
    recovering: tokio::sync::Mutex<()>,
    bearer: Bearer,
    tls: Option<ClientTls>,
    identity: ModelIdentity,
    /// The model as the links name it.
    key: ModelKey,
    /// The model, for workers that receive their layers.
    source: Arc<ShardSource>,
    n_layers: usize,
    liveness: Liveness,
}

/// A worker found by a handshake: its clients and what it reported.
type Found = (WorkerClients, WorkerSummary);

/// Runs `futures` concurrently; their results in the order given.
async fn in_order<T>(futures: impl IntoIterator<Item = impl Future<Output = T>>) -> Vec<T> {
    join_all(futures).await
}

impl Workers {
    /// Shakes hands with the workers at `worker_urls` (`host:port` or `http://host:port`), plans
    /// the layers of the model of `identity` by `plan` and assigns every worker its shard.
    pub async fn connect(
        source: Arc<ShardSource>,
        model_id: &str,
        n_layers: usize,
        worker_urls: &[String],
        plan: &PlanSpec,
        options: ClusterOptions,
    ) -> Result<Self> {
        if worker_urls.is_empty() {
            return Err(Error::Plan("no workers given".to_string()));
        }
        let bearer = Bearer::new(options.token.as_ref());
        let tls = options.tls.as_ref();
        let identity = source.identity().clone();
        let key = ModelKey {
            id: model_id.into(),
            digest: identity.header_sha256.as_str().into(),
        };
        let found = in_order(
            worker_urls
                .iter()
                .map(|raw| handshake(raw, bearer.clone(), tls, &identity)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
        for (i, (_, a)) in found.iter().enumerate() {
            if found[..i].iter().any(|(_, b)| b.url == a.url) {
                return Err(Error::WorkerUrl {
                    url: a.url.clone(),
                    problem: "listed more than once".to_string(),
                });
            }
        }
        let memory: Vec<u64> = found.iter().map(|(_, s)| s.room()).collect();
        let plan = Plan::from_spec(plan, n_layers, &memory)?;
        // Beside other models a worker may not have room for this one's layers.
        if found.iter().any(|(_, s)| s.held_for_other_models > 0) {
            for ((_, summary), range) in found.iter().zip(plan.ranges()) {
                check_room(summary, &identity, n_layers, *range).map_err(Error::NoCapacity)?;
            }
        }
        info!(plan = %plan, workers = found.len(), model = %identity, "layers planned");
        let workers = assign_all(
            found.into_iter().zip(plan.ranges().iter().copied()),
            &source,
            &options.liveness,
            &key,
        )
        .await?;

        let mut known: Vec<String> = workers.iter().map(|w| w.url.clone()).collect();
        for raw in &options.standby {
            let url = normalize_url(raw).map_err(|problem| Error::WorkerUrl {
                url: raw.clone(),
                problem,
            })?;
            if known.contains(&url) {
                return Err(Error::WorkerUrl {
                    url,
                    problem: "listed as a worker and as a standby".to_string(),
                });
            }
            known.push(url);
        }
        Ok(Self {
            topology: RwLock::new(Arc::new(Topology {
                generation: 0,
                plan,
                workers,
            })),
            known,
            recovering: tokio::sync::Mutex::new(()),
            bearer,
            tls: options.tls,
            identity,
            key,
            source,
            n_layers,
            liveness: options.liveness,
        })
    }

    /// The topology in force.
    pub fn current(&self) -> Arc<Topology> {
        // Nothing panics while holding this lock; a poisoned one still holds a valid value.
        self.topology
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Asks every worker for its state now; in plan order, with its URL and range.
    pub async fn status(
        &self,
    ) -> Vec<(
        String,
        realm_common::model::LayerRange,
        Result<pb::InfoResponse>,
    )> {
        let topology = self.current();
        in_order(topology.workers.iter().map(|w| async move {
            let mut client = w.client.clone();
            let info = match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                client.info(pb::InfoRequest {}),
            )
            .await
            {
                Ok(Ok(reply)) => Ok(reply.into_inner()),
                Ok(Err(status)) => Err(Error::Worker {
                    url: w.url.clone(),
                    status,
                }),
                Err(_) => Err(Error::Worker {
                    url: w.url.clone(),
                    status: tonic::Status::deadline_exceeded("no answer to Info"),
                }),
            };
            (w.url.clone(), w.range, info)
        }))
        .await
    }

    /// Makes sure every layer has a live worker after a step failed on topology `seen`; returns
    /// the topology to continue on. Re-plans at most once per failure: a caller that saw an older
    /// topology than the one in force gets the newer one at once.
    pub async fn recover(&self, seen: &Topology) -> Result<Arc<Topology>> {
        let _recovering = self.recovering.lock().await;
        let current = self.current();
        if current.generation != seen.generation {
            return Ok(current);
        }
        // Which workers still hold the layers they were given? One that missed its health
        // checks is not asked: it would not answer.
        let healthy = in_order(
            current
                .workers
                .iter()
                .map(|w| async move { !w.hung() && holds_shard(w).await }),
        )
        .await;
        if healthy.iter().all(|&h| h) {
            debug!("every worker holds its layers; the step is retried");
            return Ok(current);
        }
        let lost: Vec<&WorkerLink> = current
            .workers
            .iter()
            .zip(&healthy)
            .filter(|(_, &h)| !h)
            .map(|(w, _)| w)
            .collect();
        for w in &lost {
            warn!(worker = %w.url, layers = %w.range, "worker lost");
        }
        // Spares: every known worker not serving now (standbys, and lost workers that are back),
        // in the order given, so a lost worker that came back is preferred for its own layers.
        let serving: Vec<&str> = current
            .workers
            .iter()
            .zip(&healthy)
            .filter(|(_, &h)| h)
            .map(|(w, _)| w.url.as_str())
            .collect();
        // A hung worker would not answer the handshake either.
        let hung: Vec<&str> = lost
            .iter()
            .filter(|w| w.hung())
            .map(|w| w.url.as_str())
            .collect();
        let tls = self.tls.as_ref();
        let mut spares: Vec<Found> = in_order(
            self.known
                .iter()
                .filter(|url| !serving.contains(&url.as_str()) && !hung.contains(&url.as_str()))
                .map(|url| {
                    tokio::time::timeout(
                        PROBE_TIMEOUT,
                        handshake(url, self.bearer.clone(), tls, &self.identity),
                    )
                }),
        )
        .await
        .into_iter()
        .filter_map(|found| found.ok()?.ok())
        .collect();

        let placed: Vec<(Found, realm_common::model::LayerRange)> = if spares.len() >= lost.len() {
            // Each lost range goes to a spare; the others keep theirs, and their caches.
            current
                .workers
                .iter()
                .zip(&healthy)
                .map(|(w, &h)| {
                    let worker = if h {
                        (w.clients(), w.summary.clone())
                    } else {
                        let pick = spares.iter().position(|(_, s)| s.url == w.url).unwrap_or(0);
                        spares.remove(pick)
                    };
                    (worker, w.range)
                })
                .collect()
        } else {
            // Too few spares: spread every layer over the workers left, where their memory
            // allows.
            let mut left: Vec<Found> = current
                .workers
                .iter()
                .zip(&healthy)
                .filter(|(_, &h)| h)
                .map(|(w, _)| (w.clients(), w.summary.clone()))
                .collect();
            left.append(&mut spares);
            if left.is_empty() {
                return Err(self.no_capacity("no worker is reachable"));
            }
            let memory: Vec<u64> = left.iter().map(|(_, s)| s.room()).collect();
            let plan =
                Plan::auto(self.n_layers, &memory).map_err(|e| self.no_capacity(&e.to_string()))?;
            for ((_, summary), range) in left.iter().zip(plan.ranges()) {
                check_room(summary, &self.identity, self.n_layers, *range)
                    .map_err(|problem| self.no_capacity(&problem))?;
            }
            left.into_iter()
                .zip(plan.ranges().iter().copied())
                .collect()
        };
        // Workers that keep their layers keep their links (step streams, caches): assigning
        // them again would drop their sessions.
        let kept: Vec<Option<WorkerLink>> = placed
            .iter()
            .map(|((_, summary), range)| {
                current
                    .workers
                    .iter()
                    .zip(&healthy)
                    .find(|(w, &h)| h && w.url == summary.url && w.range == *range)
                    .map(|(w, _)| w.clone())
            })
            .collect();
        let (source, liveness, key) = (&self.source, &self.liveness, &self.key);
        let links = in_order(placed.into_iter().zip(kept).map(
            |(((clients, summary), range), kept)| async move {
                match kept {
                    Some(link) => Ok(link),
                    None => {
                        let link = WorkerLink::new(clients, summary, range, liveness, key);
                        assign(link, source).await
                    }
                }
            },
        ))
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()
        .map_err(|e| self.no_capacity(&e.to_string()))?;
        let plan = Plan::new(links.iter().map(|w| w.range).collect(), self.n_layers)?;
        let next = Arc::new(Topology {
            generation: current.generation + 1,
            plan,
            workers: links,
        });
        warn!(
            plan = %next.plan,
            workers = ?next.workers.iter().map(|w| w.url.as_str()).collect::<Vec<_>>(),
            "layers re-planned after losing a worker"
        );
        *self
            .topology
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::clone(&next);
        Ok(next)
    }

    /// Checks the health of every worker of the topology in force, every
    /// [`Liveness::health_interval`] (if any), in the background until the workers are dropped.
    pub fn watch(self: &Arc<Self>) {
        let Some(interval) = self.liveness.health_interval else {
            return;
        };
        let workers = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(topology) = workers.upgrade().map(|w| w.current()) else {
                    return;
                };
                join_all(topology.workers.iter().map(|w| w.check_health(interval))).await;
            }
        });
    }

    /// Drops this model's shard on every worker of the topology in force (the model is no
    /// longer served); a worker that does not answer frees it when it restarts.
    pub async fn release(&self) {
        let topology = self.current();
        in_order(topology.workers.iter().map(|w| async move {
            let mut client = w.client.clone();
            let request = pb::ReleaseShardRequest {
                model: w.model.digest.to_string(),
            };
            match tokio::time::timeout(PROBE_TIMEOUT, client.release_shard(request)).await {
                Ok(Ok(reply)) => {
                    let reply = reply.into_inner();
                    info!(worker = %w.url, layers = %w.range, released = reply.released, sessions_ended = reply.sessions_ended, "shard released");
                }
                Ok(Err(status)) => {
                    warn!(worker = %w.url, error = %crate::error::describe(&status), "cannot release the shard")
                }
                Err(_) => warn!(worker = %w.url, "releasing the shard timed out"),
            }
        }))
        .await;
    }

    fn no_capacity(&self, why: &str) -> Error {
        Error::NoCapacity(format!(
            "a worker was lost and its layers cannot be placed ({why}); start a worker at one of \
             {} (or give the coordinator a --standby), and the next request uses it",
            self.known.join(", ")
        ))
    }
}

/// Assigns each worker its range, concurrently; the links in the order given.
async fn assign_all(
    placed: impl Iterator<
        Item = (
            (WorkerClients, WorkerSummary),
            realm_common::model::LayerRange,
        ),
    >,
    source: &Arc<ShardSource>,
    liveness: &Liveness,
    key: &ModelKey,
) -> Result<Vec<WorkerLink>> {
    in_order(placed.map(|((clients, summary), range)| {
        assign(
            WorkerLink::new(clients, summary, range, liveness, key),
            source,
        )
    }))
    .await
    .into_iter()
    .collect()
}

/// Whether `w` answers and still holds the layers of its model it was given.
async fn holds_shard(w: &WorkerLink) -> bool {
    let mut client = w.client.clone();
    match tokio::time::timeout(PROBE_TIMEOUT, client.info(pb::InfoRequest {})).await {
        Ok(Ok(reply)) => {
            let held = reply
                .into_inner()
                .shards
                .into_iter()
                .find(|s| is_of_model(s, &w.model.digest))
                .and_then(|s| s.layers)
                .map(|r| (r.start as usize, r.end as usize));
            held == Some((w.range.start, w.range.end))
        }
        _ => false,
    }
}

/// Whether a worker's `shard` is of the model whose GGUF header digest is `digest`.
pub(crate) fn is_of_model(shard: &pb::ShardInfo, digest: &str) -> bool {
    shard
        .model
        .as_ref()
        .is_some_and(|m| m.header_sha256 == digest)
}

/// Bytes a worker holds for the shards of models other than `identity`'s: each shard's weights,
/// or its Memory64 budget when that is smaller.
fn held_for_other_models(info: &pb::InfoResponse, identity: &ModelIdentity) -> u64 {
    info.shards
        .iter()
        .filter(|s| !is_of_model(s, &identity.header_sha256))
        .map(|s| match &s.layer_manager {
            Some(m) if m.budget_bytes > 0 => s.weight_bytes.min(m.budget_bytes),
            _ => s.weight_bytes,
        })
        .fold(0, u64::saturating_add)
}

/// Refuses layers `range` of the model of `identity` (of `n_layers`) on a worker without room
/// for them beside the other models it holds.
fn check_room(
    summary: &WorkerSummary,
    identity: &ModelIdentity,
    n_layers: usize,
    range: realm_common::model::LayerRange,
) -> std::result::Result<(), String> {
    let layer_bytes = identity.file_bytes / n_layers.max(1) as u64;
    let needed = layer_bytes * range.len() as u64;
    if needed > summary.room() {
        return Err(format!(
            "worker {} has {} MiB available, {} MiB of it held for other models' layers; layers \
             {range} of the {identity} need about {} MiB",
            summary.url,
            summary.memory_available_bytes >> 20,
            summary.held_for_other_models >> 20,
            needed >> 20
        ));
    }
    Ok(())
}

/// Connects to a worker and checks its versions; what it holds for models other than
/// `identity`'s counts against its memory.
async fn handshake(
    raw_url: &str,
    bearer: Bearer,
    tls: Option<&ClientTls>,
    identity: &ModelIdentity,
) -> Result<Found> {
    let (url, channel) = connect_worker(raw_url, tls).await?;
    let clients = WorkerClients::new(channel, bearer, MAX_MESSAGE_BYTES);
    let mut client = clients.worker.clone();
    let info = match tokio::time::timeout(HANDSHAKE_TIMEOUT, client.info(pb::InfoRequest {})).await
    {
        Ok(Ok(reply)) => reply.into_inner(),
        Ok(Err(status)) if status.code() == tonic::Code::Unauthenticated => {
            return Err(Error::Refused {
                url,
                problem: format!(
                    "{}; give the coordinator the workers' cluster token (REALM_CLUSTER_TOKEN \
                     or --cluster-token)",
                    status.message()
                ),
            })
        }
        Ok(Err(status)) => {
            return Err(Error::Unreachable {
                url,
                problem: format!(
                    "handshake failed ({}); is this a Realm worker?",
                    crate::error::describe(&status)
                ),
            })
        }
        Err(_) => {
            return Err(Error::Unreachable {
                url,
                problem: format!("no handshake reply within {HANDSHAKE_TIMEOUT:?}"),
            })
        }
    };
    check_versions(&url, &info)?;
    let held_for_other_models = held_for_other_models(&info, identity);
    let summary = WorkerSummary {
        url: url.clone(),
        device: info.device,
        threads: info.threads,
        memory_available_bytes: info.memory_available_bytes,
        held_for_other_models,
    };
    info!(
        worker = %summary.url,
        device = %summary.device,
        threads = summary.threads,
        memory_mb = summary.memory_available_bytes >> 20,
        "worker connected"
    );
    Ok((clients, summary))
}

/// Refuses a worker of another Realm or protocol version.
fn check_versions(url: &str, info: &pb::InfoResponse) -> Result<()> {
    if info.protocol_version != realm_proto::PROTOCOL_VERSION {
        return Err(Error::Refused {
            url: url.to_string(),
            problem: format!(
                "it speaks protocol version {}, this coordinator {}",
                info.protocol_version,
                realm_proto::PROTOCOL_VERSION
            ),
        });
    }
    if info.realm_version != REALM_VERSION {
        return Err(Error::Refused {
            url: url.to_string(),
            problem: format!(
                "it runs Realm {}, this coordinator Realm {REALM_VERSION}; run the same release everywhere",
                info.realm_version
            ),
        });
    }
    Ok(())
}

/// Delivery attempts for one assignment: a delivery cut short resumes where it stopped.
const DELIVERY_ATTEMPTS: usize = 3;

/// Asks a worker to load its shard, delivering the tensors it wants first if it has no model
/// file, and checks that it did.
async fn assign(mut link: WorkerLink, source: &Arc<ShardSource>) -> Result<WorkerLink> {
    let identity = source.identity();
    let started = Instant::now();
    let refused = |link: &WorkerLink, status: tonic::Status| Error::Refused {
        url: link.url.clone(),
        problem: format!(
            "cannot take layers {} of {identity}: {}",
            link.range,
            crate::error::describe(&status)
        ),
    };
    let mut offer: Option<Arc<ShardOffer>> = None;
    let mut deliveries = 0;
    let mut sent = 0u64;
    let reply = loop {
        let request = pb::AssignShardRequest {
            model: Some(identity.into()),
            layers: Some(link.range.into()),
            manifest: offer.as_ref().map(|o| pb::ShardManifest {
                header: o.header.clone(),
            }),
        };
        let reply = link
            .client
            .assign_shard(request)
            .await
            .map_err(|status| refused(&link, status))?
            .into_inner();
        let Some(wanted) = reply.wanted.clone() else {
            break reply;
        };
        let offer = match &offer {
            Some(offer) if wanted.manifest => {
                return Err(link.malformed(format!(
                    "it asks again for the manifest of layers {}, which it was sent",
                    link.range
                )))
            }
            Some(offer) => Arc::clone(offer),
            None => {
                let made = source.offer(link.range).await?;
                offer = Some(Arc::clone(&made));
                if wanted.manifest {
                    continue;
                }
                made
            }
        };
        if deliveries == DELIVERY_ATTEMPTS {
            return Err(link.malformed(format!(
                "it still wants {} tensors of layers {} after {DELIVERY_ATTEMPTS} deliveries",
                wanted.tensors.len(),
                link.range
            )));
        }
        deliveries += 1;
        let delivery_started = Instant::now();
        let url = link.url.clone();
        match source
            .deliver(&mut link.client, &url, offer, &wanted.tensors)
            .await
        {
            Ok(delivered) => {
                sent += delivered.bytes;
                metrics::histogram!(names::SHARD_DELIVERY)
                    .record(delivery_started.elapsed().as_secs_f64());
                info!(
                    worker = %link.url,
                    layers = %link.range,
                    tensors = delivered.tensors,
                    bytes = delivered.bytes,
                    secs = delivered.secs,
                    mib_per_s = (delivered.bytes as f64 / delivered.secs.max(1e-9) / 1048576.0).round(),
                    "shard delivered"
                );
            }
            Err(Error::Worker { status, .. })
                if deliveries < DELIVERY_ATTEMPTS && retry_delivery(&status) =>
            {
                warn!(
                    worker = %link.url,
                    layers = %link.range,
                    error = %crate::error::describe(&status),
                    "shard delivery failed; resuming"
                );
            }
            Err(Error::Worker { status, .. }) => return Err(refused(&link, status)),
            Err(e) => return Err(e),
        }
    };
    let held = reply
        .shard
        .as_ref()
        .filter(|s| is_of_model(s, &link.model.digest))
        .and_then(|s| s.layers.as_ref())
        .map(|r| (r.start as usize, r.end as usize));
    if held != Some((link.range.start, link.range.end)) {
        return Err(link.malformed(format!(
            "asked to load layers {}, reports {held:?}",
            link.range
        )));
    }
    let from = match (reply.from_cache, deliveries) {
        (false, _) => "file",
        (true, 0) => "cache",
        (true, _) => "delivered",
    };
    metrics::counter!(
        names::SHARD_ASSIGNMENTS,
        "worker" => link.url.clone(),
        "model" => link.model.id.to_string(),
        "source" => from
    )
    .increment(1);
    info!(
        worker = %link.url,
        layers = %link.range,
        from,
        weight_bytes = reply.weight_bytes,
        sent_bytes = sent,
        load_ms = reply.load_ms,
        total_ms = started.elapsed().as_millis() as u64,
        "shard assigned"
    );
    Ok(link)
}

/// Whether a delivery that failed with `status` is worth resuming: a cut connection or a tensor
/// damaged on the way, not a full disk or a refusal.
fn retry_delivery(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::DataLoss | Code::Unavailable | Code::Cancelled | Code::Unknown | Code::Aborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(realm: &str, protocol: u32) -> pb::InfoResponse {
        pb::InfoResponse {
            realm_version: realm.to_string(),
            protocol_version: protocol,
            ..Default::default()
        }
    }

    #[test]
    fn versions_must_match() {
        assert!(check_versions(
            "http://w:1",
            &info(REALM_VERSION, realm_proto::PROTOCOL_VERSION)
        )
        .is_ok());
        let e = check_versions("http://w:1", &info("9.9.9", realm_proto::PROTOCOL_VERSION))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("worker http://w:1 refused") && e.contains("Realm 9.9.9"),
            "{e}"
        );
        let e = check_versions("http://w:1", &info(REALM_VERSION, 99))
            .unwrap_err()
            .to_string();
        assert!(e.contains("protocol version 99"), "{e}");
    }

    #[tokio::test]
    async fn results_come_in_the_order_given() {
        let slow_first = [30u64, 0, 10].map(|ms| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            ms
        });
        assert_eq!(in_order(slow_first).await, [30, 0, 10]);
    }
}
