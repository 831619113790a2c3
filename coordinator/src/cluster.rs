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
use std::time::{Duration, Instant};

use candle_core::Device;
use realm_common::generate::{Completion, Decoding, GenerationParams};
use realm_common::model::LayerRange;
use realm_common::wire::{Activations, ModelIdentity, WireDType};
use realm_proto::pb;
use realm_proto::pb::worker_client::WorkerClient;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tracing::{debug, info, trace, warn, Instrument};

use crate::error::{Error, Result};
use crate::generation::names;
use crate::model::CoordinatorModel;
use crate::net::{connect_worker, MAX_MESSAGE_BYTES};
use crate::plan::{Plan, PlanSpec};
use crate::request_id;

/// Realm's release version, which workers must share.
pub const REALM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long a worker may take to answer the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long ending a session on a worker may take before the coordinator stops waiting (the
/// worker's idle timeout frees what is left).
const END_SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// One worker as the coordinator drives it.
#[derive(Debug, Clone)]
struct WorkerLink {
    /// Normalized `http://host:port`.
    url: String,
    client: WorkerClient<Channel>,
    range: LayerRange,
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
#[derive(Debug)]
pub struct Cluster {
    model: CoordinatorModel,
    plan: Plan,
    /// In plan order: `workers[i].range == plan.ranges()[i]`.
    workers: Vec<WorkerLink>,
    summaries: Vec<WorkerSummary>,
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
        if worker_urls.is_empty() {
            return Err(Error::Plan("no workers given".to_string()));
        }
        // Handshakes run concurrently; results come back in the order given.
        let mut handshakes = JoinSet::new();
        for (i, raw) in worker_urls.iter().enumerate() {
            let raw = raw.clone();
            handshakes.spawn(async move { (i, handshake(&raw).await) });
        }
        let mut found = vec![None; worker_urls.len()];
        while let Some(joined) = handshakes.join_next().await {
            let (i, result) = joined.map_err(|e| Error::Internal(e.to_string()))?;
            found[i] = Some(result?);
        }
        let found: Vec<(WorkerClient<Channel>, WorkerSummary)> =
            found.into_iter().flatten().collect();
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
            let link = WorkerLink {
                url: summary.url.clone(),
                client: client.clone(),
                range: *range,
            };
            let identity = model.identity.clone();
            assignments.spawn(async move { (i, assign(link, &identity).await) });
        }
        let mut workers = vec![None; found.len()];
        while let Some(joined) = assignments.join_next().await {
            let (i, result) = joined.map_err(|e| Error::Internal(e.to_string()))?;
            workers[i] = Some(result?);
        }
        Ok(Self {
            model,
            plan,
            workers: workers.into_iter().flatten().collect(),
            summaries: found.into_iter().map(|(_, s)| s).collect(),
            wire_dtype,
            sessions_started: AtomicU64::new(0),
        })
    }

    pub fn model(&self) -> &CoordinatorModel {
        &self.model
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn wire_dtype(&self) -> WireDType {
        self.wire_dtype
    }

    /// The workers in plan order, as they reported themselves, with their ranges.
    pub fn workers(&self) -> impl Iterator<Item = (&WorkerSummary, LayerRange)> {
        self.summaries
            .iter()
            .zip(self.workers.iter().map(|w| w.range))
    }

    /// Asks every worker for its state now; in plan order, with its URL and range.
    pub async fn worker_status(&self) -> Vec<(String, LayerRange, Result<pb::InfoResponse>)> {
        let mut out = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
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
        self.model.config.check_fits(position, tokens.len())?;
        let n = tokens.len();
        let d_model = self.model.config.d_model;
        let dtype = self.wire_dtype;

        let embedding = self.model.embedding.clone();
        let tokens = tokens.to_vec();
        let mut hidden = blocking(move || {
            let x = embedding.forward(&tokens)?;
            Ok(Activations::to_wire(&x, dtype)?)
        })
        .await?;

        let mut hops = Vec::with_capacity(self.workers.len());
        let request_id = request_id::current();
        for worker in &self.workers {
            let request = request_id::tagged(
                pb::ForwardRequest {
                    session_id: session.to_string(),
                    position: position as u64,
                    hidden: Some(hidden),
                    layers: Some(worker.range.into()),
                },
                request_id.as_ref(),
            );
            let sent = Instant::now();
            let reply = worker
                .client
                .clone()
                .forward(request)
                .await
                .map_err(|status| Error::Worker {
                    url: worker.url.clone(),
                    status,
                })?
                .into_inner();
            let hop = Hop {
                round_trip: sent.elapsed(),
                compute: Duration::from_micros(reply.compute_us),
            };
            metrics::histogram!(names::WORKER_FORWARD, "worker" => worker.url.clone())
                .record(hop.round_trip.as_secs_f64());
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

        let last_url = self
            .workers
            .last()
            .map(|w| w.url.clone())
            .unwrap_or_default();
        let head = self.model.head.clone();
        let logits = blocking(move || {
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
        })
        .await?;
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
        let session = Session::open(self, self.new_session_id());
        debug!(session = %session.id, prompt_tokens = decoding.prompt().len(), "generation started");
        let result = self.drive(&session.id, decoding, on_delta).await;
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
        session: &str,
        mut decoding: Decoding,
        mut on_delta: impl FnMut(Delta) -> ControlFlow<()> + Send,
    ) -> Result<Generation> {
        let start = Instant::now();
        let tokenizer = &self.model.tokenizer;
        let mut input = decoding.prompt().to_vec();
        let mut position = 0;
        let mut text = String::new();
        let mut first_token_at = None;
        let (mut prefill, mut decode) = (HopStats::default(), HopStats::default());
        loop {
            let out = self.forward(session, &input, position).await?;
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
        end_everywhere(self.workers.clone(), session.to_string()).await;
    }
}

/// A session's claim on the workers' KV caches, released on every path out of a generation.
struct Session {
    id: String,
    workers: Vec<WorkerLink>,
    open: bool,
}

impl Session {
    fn open(cluster: &Cluster, id: String) -> Self {
        Self {
            id,
            workers: cluster.workers.clone(),
            open: true,
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
async fn handshake(raw_url: &str) -> Result<(WorkerClient<Channel>, WorkerSummary)> {
    let (url, channel) = connect_worker(raw_url).await?;
    let mut client = WorkerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let info = match tokio::time::timeout(HANDSHAKE_TIMEOUT, client.info(pb::InfoRequest {})).await
    {
        Ok(Ok(reply)) => reply.into_inner(),
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
        url,
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

/// Runs CPU-heavy model code off the async runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
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
