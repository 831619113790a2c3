//! The coordinator's side of a distributed model: the workers, their shards, and the generation
//! loop over them.
//!
//! [`Cluster::connect`] shakes hands with every worker (Realm and protocol versions), plans the
//! layers, and assigns each worker its shard, which the worker accepts only for the same model
//! file. A step ([`Cluster::forward`]) embeds the new tokens here, sends the hidden state through
//! the workers in plan order (one round trip each; a worker's reply goes to the next worker as
//! it came), and applies the head to the last position. [`Cluster::generate`] runs
//! [`Decoding`] over those steps, exactly as the single-process loop does over a whole model.
//!
//! A `Cluster` is shared by every generation in flight and holds no lock: while one session's
//! step is on the second worker, another's can be on the first. Each generation has its own
//! session id; its KV caches on the workers are freed when it ends, fails, or is dropped.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use realm_common::auth::{Bearer, Secret};
use realm_common::generate::{Completion, Decoding, GenerationParams};
use realm_common::model::{Embedding, LayerRange};
use realm_common::runtime::INLINE_TOKENS;
use realm_common::tls::ClientTls;
use realm_common::wire::{Activations, ModelIdentity, WireDType};
use realm_proto::pb;
use realm_proto::pb::worker_client::WorkerClient;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::{debug, info, trace, warn, Instrument};

use crate::error::{Error, Result};
use crate::generation::names;
use crate::model::CoordinatorModel;
use crate::net::{connect_worker, normalize_url, MAX_MESSAGE_BYTES};
use crate::plan::{Plan, PlanSpec};
use crate::request_id;
use crate::step_stream::StepStreams;

/// Realm's release version, which workers must share.
pub const REALM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long a worker may take to answer the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long ending a session on a worker may take before the coordinator stops waiting (the
/// worker's idle timeout frees what is left).
const END_SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a liveness probe of a worker may take while re-planning.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Re-plans one step may go through before its error stands.
const MAX_RECOVERIES_PER_STEP: usize = 3;

/// A worker's gRPC client, sending the cluster token with every call.
pub type WorkerRpc = WorkerClient<InterceptedService<Channel, Bearer>>;

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
}

/// One worker as the coordinator drives it.
#[derive(Debug, Clone)]
struct WorkerLink {
    /// Normalized `http://host:port`.
    url: String,
    client: WorkerRpc,
    range: LayerRange,
    summary: WorkerSummary,
    /// This worker's series of the forward-latency histogram, looked up once rather than per hop.
    forward_latency: metrics::Histogram,
    /// The step streams to this worker that are between steps.
    streams: Arc<StepStreams>,
}

impl WorkerLink {
    fn new(client: WorkerRpc, summary: WorkerSummary, range: LayerRange) -> Self {
        let forward_latency =
            metrics::histogram!(names::WORKER_FORWARD, "worker" => summary.url.clone());
        Self {
            url: summary.url.clone(),
            client,
            range,
            summary,
            forward_latency,
            streams: Arc::default(),
        }
    }

    /// Runs one step of `n` tokens on this worker. Steps as short as a decode step (up to
    /// [`INLINE_TOKENS`]) go on a step stream; longer ones (prefills) are unary calls, as a
    /// stream keeps buffers the size of the largest message it has carried, and a prefill's
    /// would stay with every pooled stream.
    async fn forward(
        &self,
        mut request: pb::ForwardRequest,
        n: usize,
        id: Option<&request_id::RequestId>,
    ) -> std::result::Result<pb::ForwardResponse, tonic::Status> {
        if n <= INLINE_TOKENS {
            request.request_id = id.map(|id| id.as_str().to_string()).unwrap_or_default();
            return self.streams.forward(&self.client, request).await;
        }
        let request = request_id::tagged(request, id);
        let reply = self.client.clone().forward(request).await?;
        Ok(reply.into_inner())
    }
}

/// The workers running the layers now. Replaced whole when a worker dies.
#[derive(Debug)]
struct Topology {
    /// Bumped on every re-plan: a session whose step ran on an older topology rebuilds its caches.
    generation: u64,
    plan: Plan,
    /// In plan order: `workers[i].range == plan.ranges()[i]`.
    workers: Vec<WorkerLink>,
}

/// What a worker reported in its handshake.
#[derive(Debug, Clone)]
pub struct WorkerSummary {
    pub url: String,
    pub device: String,
    pub threads: u32,
    pub memory_available_bytes: u64,
}

/// Timing of one worker's part of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hop {
    /// From sending the request to having the reply, as the coordinator sees it.
    pub round_trip: Duration,
    /// Time the worker reports computing.
    pub compute: Duration,
}

impl Hop {
    /// What the hop cost beyond the worker's computation: encoding, transport, decoding.
    pub fn overhead(&self) -> Duration {
        self.round_trip.saturating_sub(self.compute)
    }
}

/// Hops of many steps, summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HopStats {
    pub hops: u64,
    pub round_trip: Duration,
    pub compute: Duration,
}

impl HopStats {
    pub fn add(&mut self, hop: &Hop) {
        self.hops += 1;
        self.round_trip += hop.round_trip;
        self.compute += hop.compute;
    }

    /// Mean overhead per hop (round trip minus worker compute); `None` without hops.
    pub fn mean_overhead(&self) -> Option<Duration> {
        let hops = u32::try_from(self.hops).ok().filter(|&h| h > 0)?;
        Some(self.round_trip.saturating_sub(self.compute) / hops)
    }
}

/// One step's result.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Logits of the last position, one per vocabulary entry.
    pub logits: Vec<f32>,
    /// One per worker, in plan order.
    pub hops: Vec<Hop>,
}

/// What one generated token added to the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub token: u32,
    /// Text that became final with this token (may be empty).
    pub text: String,
}

/// A finished distributed generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub completion: Completion,
    /// Worker hops of the prefill step.
    pub prefill: HopStats,
    /// Worker hops of the decode steps.
    pub decode: HopStats,
}

/// The coordinator's model, the workers and the plan that places the layers on them.
///
/// When a step fails on a worker, [`Cluster::recover`] probes the workers, gives a dead worker's
/// layers to a standby (or a worker that came back), or else re-plans every layer over the
/// workers still alive, and the generation replays its tokens so far on the new topology.
#[derive(Debug)]
pub struct Cluster {
    model: CoordinatorModel,
    topology: RwLock<Arc<Topology>>,
    /// Every worker URL known, given and standby: the candidates when re-planning.
    known: Vec<String>,
    /// Serialises re-plans.
    recovering: tokio::sync::Mutex<()>,
    bearer: Bearer,
    tls: Option<ClientTls>,
    wire_dtype: WireDType,
    sessions_started: AtomicU64,
}

impl Cluster {
    /// Connects to the workers at `worker_urls` (`host:port` or `http://host:port`), checks
    /// their versions, plans the layers by `plan` and assigns every worker its shard. Activations
    /// travel in `wire_dtype`.
    pub async fn connect(
        model: CoordinatorModel,
        worker_urls: &[String],
        plan: &PlanSpec,
        wire_dtype: WireDType,
    ) -> Result<Self> {
        Self::connect_with(
            model,
            worker_urls,
            plan,
            wire_dtype,
            ClusterOptions::default(),
        )
        .await
    }

    /// As [`Cluster::connect`], with a cluster token and standby workers.
    pub async fn connect_with(
        model: CoordinatorModel,
        worker_urls: &[String],
        plan: &PlanSpec,
        wire_dtype: WireDType,
        options: ClusterOptions,
    ) -> Result<Self> {
        if worker_urls.is_empty() {
            return Err(Error::Plan("no workers given".to_string()));
        }
        let bearer = Bearer::new(options.token.as_ref());
        // Handshakes run concurrently; results come back in the order given.
        let mut handshakes = JoinSet::new();
        for (i, raw) in worker_urls.iter().enumerate() {
            let raw = raw.clone();
            let bearer = bearer.clone();
            let tls = options.tls.clone();
            handshakes.spawn(async move { (i, handshake(&raw, bearer, tls.as_ref()).await) });
        }
        let mut found = vec![None; worker_urls.len()];
        while let Some(joined) = handshakes.join_next().await {
            let (i, result) = joined.map_err(|e| Error::Internal(e.to_string()))?;
            found[i] = Some(result?);
        }
        let found: Vec<(WorkerRpc, WorkerSummary)> = found.into_iter().flatten().collect();
        for (i, (_, a)) in found.iter().enumerate() {
            if found[..i].iter().any(|(_, b)| b.url == a.url) {
                return Err(Error::WorkerUrl {
                    url: a.url.clone(),
                    problem: "listed more than once".to_string(),
                });
            }
        }

        let memory: Vec<u64> = found
            .iter()
            .map(|(_, s)| s.memory_available_bytes)
            .collect();
        let plan = Plan::from_spec(plan, model.config.n_layers, &memory)?;
        info!(plan = %plan, workers = found.len(), model = %model.id, "layers planned");

        let mut assignments = JoinSet::new();
        for (i, ((client, summary), range)) in found.iter().zip(plan.ranges()).enumerate() {
            let link = WorkerLink::new(client.clone(), summary.clone(), *range);
            let identity = model.identity.clone();
            assignments.spawn(async move { (i, assign(link, &identity).await) });
        }
        let mut workers = vec![None; found.len()];
        while let Some(joined) = assignments.join_next().await {
            let (i, result) = joined.map_err(|e| Error::Internal(e.to_string()))?;
            workers[i] = Some(result?);
        }
        let mut known: Vec<String> = found.iter().map(|(_, s)| s.url.clone()).collect();
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
            model,
            topology: RwLock::new(Arc::new(Topology {
                generation: 0,
                plan,
                workers: workers.into_iter().flatten().collect(),
            })),
            known,
            recovering: tokio::sync::Mutex::new(()),
            bearer,
            tls: options.tls,
            wire_dtype,
            sessions_started: AtomicU64::new(0),
        })
    }

    pub fn model(&self) -> &CoordinatorModel {
        &self.model
    }

    fn topology(&self) -> Arc<Topology> {
        // Nothing panics while holding this lock; a poisoned one still holds a valid value.
        self.topology
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The plan in force now.
    pub fn plan(&self) -> Plan {
        self.topology().plan.clone()
    }

    pub fn wire_dtype(&self) -> WireDType {
        self.wire_dtype
    }

    /// The workers in plan order, as they reported themselves, with their ranges.
    pub fn workers(&self) -> Vec<(WorkerSummary, LayerRange)> {
        self.topology()
            .workers
            .iter()
            .map(|w| (w.summary.clone(), w.range))
            .collect()
    }

    /// Asks every worker for its state now; in plan order, with its URL and range.
    pub async fn worker_status(&self) -> Vec<(String, LayerRange, Result<pb::InfoResponse>)> {
        let topology = self.topology();
        let mut out = Vec::with_capacity(topology.workers.len());
        for w in &topology.workers {
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
            out.push((w.url.clone(), w.range, info));
        }
        out
    }

    /// A fresh session id: unique within this coordinator (a counter) and across coordinators
    /// sharing workers (a random part).
    pub fn new_session_id(&self) -> String {
        let n = self.sessions_started.fetch_add(1, Ordering::Relaxed);
        format!("s{n}-{:016x}", rand::random::<u64>())
    }

    /// Runs one step of `session`: `tokens` are placed after the `position` tokens the session
    /// has cached on every worker (0 starts the session). Returns the last position's logits.
    pub async fn forward(
        &self,
        session: &str,
        tokens: &[u32],
        position: usize,
    ) -> Result<StepOutput> {
        self.forward_on(&self.topology(), session, tokens, position)
            .await
    }

    async fn forward_on(
        &self,
        topology: &Topology,
        session: &str,
        tokens: &[u32],
        position: usize,
    ) -> Result<StepOutput> {
        self.model.config.check_fits(position, tokens.len())?;
        let n = tokens.len();
        let d_model = self.model.config.d_model;
        let dtype = self.wire_dtype;

        let embed = move |embedding: &Embedding, tokens: &[u32]| -> Result<pb::Tensor> {
            let x = embedding.forward(tokens)?;
            Ok(Activations::to_wire(&x, dtype)?)
        };
        // Steps as short as a decode step are embedded in place (`realm_common::runtime`).
        let mut hidden = if n <= INLINE_TOKENS {
            in_place(|| embed(&self.model.embedding, tokens))?
        } else {
            let embedding = self.model.embedding.clone();
            let tokens = tokens.to_vec();
            blocking(move || embed(&embedding, &tokens)).await?
        };

        let mut hops = Vec::with_capacity(topology.workers.len());
        let request_id = request_id::current();
        for worker in &topology.workers {
            let request = pb::ForwardRequest {
                session_id: session.to_string(),
                position: position as u64,
                hidden: Some(hidden),
                layers: Some(worker.range.into()),
                request_id: String::new(),
            };
            let sent = Instant::now();
            let reply = worker
                .forward(request, n, request_id.as_ref())
                .await
                .map_err(|status| Error::Worker {
                    url: worker.url.clone(),
                    status,
                })?;
            let hop = Hop {
                round_trip: sent.elapsed(),
                compute: Duration::from_micros(reply.compute_us),
            };
            worker.forward_latency.record(hop.round_trip.as_secs_f64());
            trace!(
                session,
                worker = %worker.url,
                tokens = n,
                rtt_us = hop.round_trip.as_micros() as u64,
                compute_us = reply.compute_us,
                "hop"
            );
            hops.push(hop);
            hidden = reply.hidden.ok_or_else(|| Error::Protocol {
                url: worker.url.clone(),
                problem: "no hidden state".to_string(),
            })?;
            check_hidden(&hidden, n, d_model, dtype).map_err(|problem| Error::Protocol {
                url: worker.url.clone(),
                problem,
            })?;
        }

        let last_url = topology
            .workers
            .last()
            .map(|w| w.url.clone())
            .unwrap_or_default();
        let head = &self.model.head;
        // One row, whatever the step's length: in place, as a decode step is.
        let logits = in_place(move || {
            // Only the last position feeds the head: decode just its row.
            let row = d_model * dtype.size();
            let last = pb::Tensor {
                shape: vec![1, d_model as u64],
                dtype: hidden.dtype,
                data: hidden.data.split_off((n - 1) * row),
            };
            let x = Activations::from_wire(&last, d_model, &Device::Cpu)
                .map_err(|e| Error::Protocol {
                    url: last_url,
                    problem: e.to_string(),
                })?
                .hidden;
            let logits = head.forward(&x)?;
            let logits = logits.squeeze(0).and_then(|l| l.to_vec1::<f32>());
            Ok(logits.map_err(realm_common::Error::from)?)
        })?;
        Ok(StepOutput { logits, hops })
    }

    /// Validates a request and sets up its text-side state; errors are the caller's fault.
    pub fn decoding(&self, prompt: Vec<u32>, params: &GenerationParams) -> Result<Decoding> {
        Ok(Decoding::new(
            &self.model.tokenizer,
            prompt,
            params,
            self.model.config.context_length,
        )?)
    }

    /// Generates from `prompt` across the workers, calling `on_delta` for every token as it is
    /// chosen; `on_delta` returning `Break` ends the generation early with [`Error::Stopped`].
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        params: &GenerationParams,
        on_delta: impl FnMut(Delta) -> ControlFlow<()> + Send,
    ) -> Result<Generation> {
        let decoding = self.decoding(prompt, params)?;
        self.run(decoding, on_delta).await
    }

    /// Runs a generation set up by [`Cluster::decoding`]. The session is ended on every worker
    /// whatever happens: awaited when the generation finishes or fails, spawned if this future is
    /// dropped part-way.
    pub async fn run(
        &self,
        decoding: Decoding,
        on_delta: impl FnMut(Delta) -> ControlFlow<()> + Send,
    ) -> Result<Generation> {
        let mut session = Session::open(&self.topology(), self.new_session_id());
        debug!(session = %session.id, prompt_tokens = decoding.prompt().len(), "generation started");
        let result = self.drive(&mut session, decoding, on_delta).await;
        match &result {
            Ok(g) => debug!(
                session = %session.id,
                generated = g.completion.usage.generated_tokens,
                finish = g.completion.finish.as_str(),
                "generation finished"
            ),
            Err(e) => warn!(session = %session.id, error = %e, "generation failed"),
        }
        session.end().await;
        result
    }

    async fn drive(
        &self,
        session: &mut Session,
        mut decoding: Decoding,
        mut on_delta: impl FnMut(Delta) -> ControlFlow<()> + Send,
    ) -> Result<Generation> {
        let start = Instant::now();
        let tokenizer = &self.model.tokenizer;
        let mut input = decoding.prompt().to_vec();
        // The tokens the workers have cached for this session: what a new topology replays.
        let mut fed: Vec<u32> = Vec::new();
        let mut position = 0;
        let mut text = String::new();
        let mut first_token_at = None;
        let (mut prefill, mut decode) = (HopStats::default(), HopStats::default());
        let mut topology = self.topology();
        loop {
            let out = match self
                .forward_on(&topology, &session.id, &input, position)
                .await
            {
                Ok(out) => out,
                Err(error) if error.is_worker_failure() => {
                    let (out, now) = self.replay(session, topology, error, &fed, &input).await?;
                    topology = now;
                    out
                }
                Err(error) => return Err(error),
            };
            fed.extend_from_slice(&input);
            let stats = if position == 0 {
                &mut prefill
            } else {
                &mut decode
            };
            out.hops.iter().for_each(|h| stats.add(h));
            position += input.len();
            let step = decoding.step(tokenizer, &out.logits)?;
            first_token_at.get_or_insert_with(|| start.elapsed());
            text.push_str(&step.text);
            let delta = Delta {
                token: step.token,
                text: step.text,
            };
            if on_delta(delta).is_break() {
                return Err(Error::Stopped);
            }
            if let Some(finish) = step.finish {
                return Ok(Generation {
                    completion: decoding.completion(
                        text,
                        finish,
                        first_token_at.unwrap_or_default(),
                        start.elapsed(),
                    ),
                    prefill,
                    decode,
                });
            }
            input = vec![step.token];
        }
    }

    /// Ends `session` on every worker, concurrently; failures are logged, not returned (the
    /// workers' idle timeout frees anything left).
    pub async fn end_session(&self, session: &str) {
        end_everywhere(self.topology().workers.clone(), session.to_string()).await;
    }

    /// After a step of `session` failed on `seen` with `error`: re-plans if a worker is lost and
    /// runs the session's tokens so far (`fed`, then the step's `input`) from position 0 on the
    /// topology in force, which rebuilds its KV caches and gives the step's logits.
    async fn replay(
        &self,
        session: &mut Session,
        mut seen: Arc<Topology>,
        mut error: Error,
        fed: &[u32],
        input: &[u32],
    ) -> Result<(StepOutput, Arc<Topology>)> {
        let mut tokens = fed.to_vec();
        tokens.extend_from_slice(input);
        for _ in 0..MAX_RECOVERIES_PER_STEP {
            warn!(session = %session.id, error = %error, "step failed; checking the workers");
            let topology = self.recover(&seen).await?;
            session.adopt(&topology);
            info!(
                session = %session.id,
                tokens = tokens.len(),
                plan = %topology.plan,
                "replaying the session to rebuild its caches"
            );
            match self.forward_on(&topology, &session.id, &tokens, 0).await {
                Ok(out) => return Ok((out, topology)),
                Err(e) if e.is_worker_failure() => {
                    error = e;
                    seen = topology;
                }
                Err(e) => return Err(e),
            }
        }
        Err(error)
    }

    /// Makes sure every layer has a live worker after a step failed on topology `seen`; returns
    /// the topology to continue on. Re-plans at most once per failure: a caller that saw an older
    /// topology than the one in force gets the newer one at once.
    async fn recover(&self, seen: &Arc<Topology>) -> Result<Arc<Topology>> {
        let _recovering = self.recovering.lock().await;
        let current = self.topology();
        if current.generation != seen.generation {
            return Ok(current);
        }
        // Which workers still hold the layers they were given?
        let mut probes = JoinSet::new();
        for (i, w) in current.workers.iter().enumerate() {
            let w = w.clone();
            probes.spawn(async move { (i, holds_shard(&w).await) });
        }
        let mut healthy = vec![false; current.workers.len()];
        while let Some(joined) = probes.join_next().await {
            if let Ok((i, ok)) = joined {
                healthy[i] = ok;
            }
        }
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
        // Spares: every known worker not serving now (standbys, and lost workers that are back).
        let serving: Vec<&str> = current
            .workers
            .iter()
            .zip(&healthy)
            .filter(|(_, &h)| h)
            .map(|(w, _)| w.url.as_str())
            .collect();
        let mut handshakes = JoinSet::new();
        for (i, url) in self.known.iter().enumerate() {
            if serving.contains(&url.as_str()) {
                continue;
            }
            let (url, bearer, tls) = (url.clone(), self.bearer.clone(), self.tls.clone());
            handshakes.spawn(async move {
                let found =
                    tokio::time::timeout(PROBE_TIMEOUT, handshake(&url, bearer, tls.as_ref()))
                        .await;
                (i, found)
            });
        }
        let mut spares = Vec::new();
        while let Some(joined) = handshakes.join_next().await {
            if let Ok((i, Ok(Ok(found)))) = joined {
                spares.push((i, found));
            }
        }
        // In the order given, so a lost worker that came back is preferred for its own layers.
        spares.sort_by_key(|(i, _)| *i);
        let mut spares: Vec<(WorkerRpc, WorkerSummary)> =
            spares.into_iter().map(|(_, f)| f).collect();

        let identity = &self.model.identity;
        let links: Vec<WorkerLink> = if spares.len() >= lost.len() {
            // Each lost range goes to a spare; the others keep theirs, and their caches.
            let mut assignments = JoinSet::new();
            let mut links: Vec<Option<WorkerLink>> = Vec::new();
            for (i, (w, &h)) in current.workers.iter().zip(&healthy).enumerate() {
                if h {
                    links.push(Some(w.clone()));
                    continue;
                }
                links.push(None);
                let pick = spares.iter().position(|(_, s)| s.url == w.url).unwrap_or(0);
                let (client, summary) = spares.remove(pick);
                let link = WorkerLink::new(client, summary, w.range);
                let identity = identity.clone();
                assignments.spawn(async move { (i, assign(link, &identity).await) });
            }
            while let Some(joined) = assignments.join_next().await {
                let (i, result) = joined.map_err(|e| Error::Internal(e.to_string()))?;
                links[i] = Some(result.map_err(|e| self.no_capacity(&e.to_string()))?);
            }
            links.into_iter().flatten().collect()
        } else {
            // Too few spares: spread every layer over the workers left, where their memory allows.
            let mut left: Vec<(WorkerRpc, WorkerSummary)> = current
                .workers
                .iter()
                .zip(&healthy)
                .filter(|(_, &h)| h)
                .map(|(w, _)| (w.client.clone(), w.summary.clone()))
                .collect();
            left.append(&mut spares);
            if left.is_empty() {
                return Err(self.no_capacity("no worker is reachable"));
            }
            let memory: Vec<u64> = left.iter().map(|(_, s)| s.memory_available_bytes).collect();
            let plan = Plan::auto(self.model.config.n_layers, &memory)
                .map_err(|e| self.no_capacity(&e.to_string()))?;
            let layer_bytes = identity.file_bytes / self.model.config.n_layers.max(1) as u64;
            let mut assignments = JoinSet::new();
            for (i, ((client, summary), range)) in left.into_iter().zip(plan.ranges()).enumerate() {
                let needed = layer_bytes * range.len() as u64;
                if needed > summary.memory_available_bytes {
                    return Err(self.no_capacity(&format!(
                        "worker {} has {} MiB available, layers {range} need about {} MiB",
                        summary.url,
                        summary.memory_available_bytes >> 20,
                        needed >> 20
                    )));
                }
                let link = WorkerLink::new(client, summary, *range);
                let identity = identity.clone();
                assignments.spawn(async move { (i, assign(link, &identity).await) });
            }
            let mut links = vec![None; plan.n_workers()];
            while let Some(joined) = assignments.join_next().await {
                let (i, result) = joined.map_err(|e| Error::Internal(e.to_string()))?;
                links[i] = Some(result.map_err(|e| self.no_capacity(&e.to_string()))?);
            }
            links.into_iter().flatten().collect()
        };
        let plan = Plan::new(
            links.iter().map(|w| w.range).collect(),
            self.model.config.n_layers,
        )?;
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

    fn no_capacity(&self, why: &str) -> Error {
        Error::NoCapacity(format!(
            "a worker was lost and its layers cannot be placed ({why}); start a worker at one of \
             {} (or give the coordinator a --standby), and the next request uses it",
            self.known.join(", ")
        ))
    }
}

/// Whether `w` answers and still holds the layers it was given.
async fn holds_shard(w: &WorkerLink) -> bool {
    let mut client = w.client.clone();
    match tokio::time::timeout(PROBE_TIMEOUT, client.info(pb::InfoRequest {})).await {
        Ok(Ok(reply)) => {
            let held = reply
                .into_inner()
                .shard
                .and_then(|s| s.layers)
                .map(|r| (r.start as usize, r.end as usize));
            held == Some((w.range.start, w.range.end))
        }
        _ => false,
    }
}

/// A session's claim on the workers' KV caches, released on every path out of a generation.
struct Session {
    id: String,
    workers: Vec<WorkerLink>,
    open: bool,
}

impl Session {
    fn open(topology: &Topology, id: String) -> Self {
        Self {
            id,
            workers: topology.workers.clone(),
            open: true,
        }
    }

    /// Also ends the session on the workers of `topology` when it ends.
    fn adopt(&mut self, topology: &Topology) {
        for w in &topology.workers {
            if !self.workers.iter().any(|known| known.url == w.url) {
                self.workers.push(w.clone());
            }
        }
    }

    async fn end(mut self) {
        self.open = false;
        end_everywhere(
            std::mem::take(&mut self.workers),
            std::mem::take(&mut self.id),
        )
        .await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let workers = std::mem::take(&mut self.workers);
        let id = std::mem::take(&mut self.id);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                debug!(session = %id, "generation dropped; ending its session");
                let ending = end_everywhere(workers, id).in_current_span();
                match request_id::current() {
                    Some(request) => runtime.spawn(request.scope(ending)),
                    None => runtime.spawn(ending),
                };
            }
            Err(_) => warn!(
                session = %id,
                "generation dropped outside a runtime; workers free the session when it idles out"
            ),
        }
    }
}

async fn end_everywhere(workers: Vec<WorkerLink>, session: String) {
    let mut calls = JoinSet::new();
    let request_id = request_id::current();
    for w in workers {
        let request = request_id::tagged(
            pb::EndSessionRequest {
                session_id: session.clone(),
            },
            request_id.as_ref(),
        );
        calls.spawn(
            async move {
                let mut client = w.client;
                let result =
                    tokio::time::timeout(END_SESSION_TIMEOUT, client.end_session(request)).await;
                (w.url, result)
            }
            .in_current_span(),
        );
    }
    while let Some(joined) = calls.join_next().await {
        match joined {
            Ok((url, Ok(Ok(reply)))) => {
                trace!(session, worker = %url, ended = reply.into_inner().ended, "session ended")
            }
            Ok((url, Ok(Err(status)))) => {
                warn!(session, worker = %url, error = %crate::error::describe(&status), "cannot end session")
            }
            Ok((url, Err(_))) => warn!(session, worker = %url, "ending the session timed out"),
            Err(e) => warn!(session, error = %e, "ending the session panicked"),
        }
    }
}

/// Connects to a worker and checks its versions.
async fn handshake(
    raw_url: &str,
    bearer: Bearer,
    tls: Option<&ClientTls>,
) -> Result<(WorkerRpc, WorkerSummary)> {
    let (url, channel) = connect_worker(raw_url, tls).await?;
    let mut client = WorkerClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
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
    let summary = WorkerSummary {
        url: url.clone(),
        device: info.device,
        threads: info.threads,
        memory_available_bytes: info.memory_available_bytes,
    };
    info!(
        worker = %summary.url,
        device = %summary.device,
        threads = summary.threads,
        memory_mb = summary.memory_available_bytes >> 20,
        "worker connected"
    );
    Ok((client, summary))
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

/// Asks a worker to load its shard and checks that it did.
async fn assign(mut link: WorkerLink, identity: &ModelIdentity) -> Result<WorkerLink> {
    let request = pb::AssignShardRequest {
        model: Some(identity.into()),
        layers: Some(link.range.into()),
    };
    let reply = link
        .client
        .assign_shard(request)
        .await
        .map_err(|status| Error::Refused {
            url: link.url.clone(),
            problem: format!(
                "cannot take layers {} of {identity}: {}",
                link.range,
                crate::error::describe(&status)
            ),
        })?
        .into_inner();
    let held = reply
        .shard
        .as_ref()
        .and_then(|s| s.layers.as_ref())
        .map(|r| (r.start as usize, r.end as usize));
    if held != Some((link.range.start, link.range.end)) {
        return Err(Error::Protocol {
            url: link.url.clone(),
            problem: format!("asked to load layers {}, reports {held:?}", link.range),
        });
    }
    info!(
        worker = %link.url,
        layers = %link.range,
        weight_mb = reply.weight_bytes >> 20,
        load_ms = reply.load_ms,
        "shard assigned"
    );
    Ok(link)
}

/// Checks that a worker's reply is the `[n, d_model]` tensor in `dtype` it must be.
fn check_hidden(
    t: &pb::Tensor,
    n: usize,
    d_model: usize,
    dtype: WireDType,
) -> std::result::Result<(), String> {
    if t.shape != [n as u64, d_model as u64] {
        return Err(format!(
            "hidden state of shape {:?}, expected [{n}, {d_model}]",
            t.shape
        ));
    }
    if WireDType::try_from(t.dtype).ok() != Some(dtype) {
        return Err(format!(
            "hidden state in dtype {}, expected {}",
            t.dtype,
            dtype.name()
        ));
    }
    let want = n * d_model * dtype.size();
    if t.data.len() != want {
        return Err(format!(
            "hidden state of {} bytes, expected {want}",
            t.data.len()
        ));
    }
    Ok(())
}

/// Runs CPU-heavy model code (see [`realm_common::runtime::compute`]).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    realm_common::runtime::compute(f)
        .await
        .map_err(|e| Error::Internal(format!("model computation did not finish: {e}")))?
}

/// [`blocking`] for work short enough to run on the async thread itself.
fn in_place<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    realm_common::runtime::inline(f)
        .map_err(|e| Error::Internal(format!("model computation did not finish: {e}")))?
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

    #[test]
    fn worker_replies_are_checked() {
        let t = |shape: Vec<u64>, dtype: pb::DataType, bytes: usize| pb::Tensor {
            shape,
            dtype: dtype as i32,
            data: vec![0; bytes],
        };
        assert!(check_hidden(&t(vec![2, 3], pb::DataType::F32, 24), 2, 3, WireDType::F32).is_ok());
        assert!(
            check_hidden(&t(vec![2, 3], pb::DataType::F16, 12), 2, 3, WireDType::F32)
                .unwrap_err()
                .contains("dtype")
        );
        assert!(
            check_hidden(&t(vec![1, 3], pb::DataType::F32, 12), 2, 3, WireDType::F32)
                .unwrap_err()
                .contains("shape")
        );
        assert!(
            check_hidden(&t(vec![2, 3], pb::DataType::F32, 20), 2, 3, WireDType::F32)
                .unwrap_err()
                .contains("bytes")
        );
    }

    #[test]
    fn hop_overhead_is_round_trip_minus_compute() {
        let mut stats = HopStats::default();
        assert_eq!(stats.mean_overhead(), None);
        stats.add(&Hop {
            round_trip: Duration::from_micros(500),
            compute: Duration::from_micros(300),
        });
        stats.add(&Hop {
            round_trip: Duration::from_micros(400),
            compute: Duration::from_micros(400),
        });
        assert_eq!(stats.mean_overhead(), Some(Duration::from_micros(100)));
        let clock_skew = Hop {
            round_trip: Duration::from_micros(10),
            compute: Duration::from_micros(20),
        };
        assert_eq!(clock_skew.overhead(), Duration::ZERO);
    }
}
