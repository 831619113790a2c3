//! How a step reaches a worker: one request carrying the rows of every session of a micro-batch,
//! one reply with the rows after the worker's blocks.
//!
//! Steps as short as a decode step go as messages on pooled step streams ([`StepStreams`]);
//! longer ones (prompt chunks) as unary calls, whose buffers go with them. A worker runs one
//! micro-batch at a time for this coordinator: each link has a turn, taken in arrival order, so
//! micro-batches pass through a worker in the order they reach it, as stages of a pipeline do,
//! instead of splitting its cores between them.
//!
//! A worker that stops answering (stopped, or its machine frozen: the socket stays open and
//! nothing replies) is caught two ways: the coordinator checks every worker's gRPC health in the
//! background ([`WorkerLink::check_health`]), and a worker that misses [`HEALTH_MISSES`] checks
//! in a row fails the steps waiting on it; a step that outlasts [`Liveness::step_timeout`] fails
//! too. Either way the scheduler fails over as for a dead worker.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use realm_common::auth::Bearer;
use realm_common::model::LayerRange;
use realm_common::runtime::INLINE_TOKENS;
use realm_common::wire::WireDType;
use realm_proto::pb;
use realm_proto::pb::worker_client::WorkerClient;
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tracing::{trace, warn};

use crate::error::{Error, Result};
use crate::telemetry::names;

mod step_stream;
use step_stream::StepStreams;

/// A worker's gRPC client, sending the cluster token with every call.
pub type WorkerRpc = WorkerClient<InterceptedService<Channel, Bearer>>;
/// The same worker's gRPC health client.
pub type HealthRpc = HealthClient<InterceptedService<Channel, Bearer>>;

/// Health checks missed in a row after which a worker counts as hung.
pub const HEALTH_MISSES: u32 = 3;

/// How the coordinator notices a worker that stops answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// How often every worker's health is checked, each check answered within the same time;
    /// `None` checks none. A hung worker is caught after about [`HEALTH_MISSES`] intervals.
    pub health_interval: Option<Duration>,
    /// The longest a worker's part of one step may take (waiting for its turn included).
    pub step_timeout: Duration,
}

/// Health checks every second, when not configured.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// The longest step, when not configured: far beyond any step's work (a prompt chunk with
/// layers loaded from disk takes seconds), it catches what health checks cannot, a worker that
/// answers them but never finishes a step.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for Liveness {
    fn default() -> Self {
        Self {
            health_interval: Some(DEFAULT_HEALTH_INTERVAL),
            step_timeout: DEFAULT_STEP_TIMEOUT,
        }
    }
}

/// Clients of one worker: its service and its health.
#[derive(Debug, Clone)]
pub(crate) struct WorkerClients {
    pub worker: WorkerRpc,
    pub health: HealthRpc,
}

impl WorkerClients {
    pub fn new(channel: Channel, bearer: Bearer, max_message_bytes: usize) -> Self {
        Self {
            worker: WorkerClient::with_interceptor(channel.clone(), bearer.clone())
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
            health: HealthClient::with_interceptor(channel, bearer),
        }
    }
}

/// What the health checks of one worker found, shared by the clones of its link.
#[derive(Debug, Default)]
struct Watch {
    /// Checks missed in a row.
    misses: AtomicU32,
    /// Woken, for every step waiting on the worker, by each check missed from the
    /// [`HEALTH_MISSES`]th on.
    hung: Notify,
}

/// What a worker reported in its handshake.
#[derive(Debug, Clone)]
pub struct WorkerSummary {
    pub url: String,
    pub device: String,
    pub threads: u32,
    pub memory_available_bytes: u64,
    /// Bytes the worker holds for other models' layers (each shard's weights, or its Memory64
    /// budget when smaller): not available to this model's.
    pub held_for_other_models: u64,
}

impl WorkerSummary {
    /// Memory left for this model's layers: what the worker reports, less what it holds for
    /// other models.
    pub fn room(&self) -> u64 {
        self.memory_available_bytes
            .saturating_sub(self.held_for_other_models)
    }
}

/// Which model a link's steps run: its id (the metrics' `model` label) and the digest of its
/// GGUF header (how a worker serving several models tells them apart).
#[derive(Debug, Clone)]
pub(crate) struct ModelKey {
    pub id: Arc<str>,
    pub digest: Arc<str>,
}

/// One worker as the coordinator drives it: its client, its layers, and the state shared by the
/// clones of the link (step streams, turn).
#[derive(Debug, Clone)]
pub(crate) struct WorkerLink {
    /// Normalized `http://host:port`.
    pub url: String,
    pub client: WorkerRpc,
    health: HealthRpc,
    pub range: LayerRange,
    pub summary: WorkerSummary,
    pub model: ModelKey,
    step_timeout: Duration,
    /// This worker's series of the forward-latency histogram, looked up once rather than per hop.
    forward_latency: metrics::Histogram,
    /// The step streams to this worker that are between steps.
    streams: Arc<StepStreams>,
    /// Held by the micro-batch this worker is running.
    turn: Arc<tokio::sync::Mutex<()>>,
    watch: Arc<Watch>,
}

/// A worker's reply to one step: the rows of the sessions that ran, and the sessions it refused.
#[derive(Debug)]
pub(crate) struct StepReply {
    pub hidden: pb::Tensor,
    /// `(index of the session in the request, why)`, in the request's order.
    pub failed: Vec<(usize, tonic::Status)>,
    pub hop: Hop,
}

impl WorkerLink {
    pub fn new(
        clients: WorkerClients,
        summary: WorkerSummary,
        range: LayerRange,
        liveness: &Liveness,
        model: &ModelKey,
    ) -> Self {
        let forward_latency = metrics::histogram!(
            names::WORKER_FORWARD,
            "worker" => summary.url.clone(),
            "model" => model.id.to_string()
        );
        Self {
            url: summary.url.clone(),
            client: clients.worker,
            health: clients.health,
            range,
            summary,
            model: model.clone(),
            step_timeout: liveness.step_timeout,
            forward_latency,
            streams: Arc::default(),
            turn: Arc::default(),
            watch: Arc::default(),
        }
    }

    /// The worker's clients, for a link of it to other layers.
    pub fn clients(&self) -> WorkerClients {
        WorkerClients {
            worker: self.client.clone(),
            health: self.health.clone(),
        }
    }

    /// Checks the worker's health, waiting at most `deadline` for its answer. From the
    /// [`HEALTH_MISSES`]th check missed in a row (no answer, or not serving) the worker counts as
    /// hung, and every check missed fails the steps waiting on it.
    pub async fn check_health(&self, deadline: Duration) {
        let mut health = self.health.clone();
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let serving = matches!(
            tokio::time::timeout(deadline, health.check(request)).await,
            Ok(Ok(reply)) if reply.get_ref().status() == ServingStatus::Serving
        );
        if serving {
            if self.watch.misses.swap(0, Ordering::Relaxed) >= HEALTH_MISSES {
                warn!(worker = %self.url, "worker answers its health checks again");
            }
            return;
        }
        let misses = self.watch.misses.fetch_add(1, Ordering::Relaxed) + 1;
        if misses >= HEALTH_MISSES {
            if misses == HEALTH_MISSES {
                warn!(worker = %self.url, layers = %self.range, misses, "worker stopped answering its health checks");
            }
            self.watch.hung.notify_waiters();
        }
    }

    /// Whether the worker missed its last [`HEALTH_MISSES`] health checks, or a step outlasted
    /// its deadline since it last answered one.
    pub fn hung(&self) -> bool {
        self.watch.misses.load(Ordering::Relaxed) >= HEALTH_MISSES
    }

    /// Runs one step of `sessions` over `hidden` (their rows) on this worker, once its turn
    /// comes. The sessions the worker refused are checked to be sessions of the step; the rows
    /// of the others are the caller's to check.
    pub async fn step(
        &self,
        hidden: pb::Tensor,
        sessions: Vec<pb::SessionRows>,
    ) -> Result<StepReply> {
        let rows: usize = sessions.iter().map(|s| s.rows as usize).sum();
        let n_sessions = sessions.len();
        let request = pb::ForwardRequest {
            hidden: Some(hidden),
            layers: Some(self.range.into()),
            sessions,
            model: self.model.digest.to_string(),
        };
        // Created before the hung check: a check missed from here on wakes it.
        let hung = self.watch.hung.notified();
        if self.hung() {
            return Err(self.failed(not_answering()));
        }
        let run = async {
            let turn = self.turn.lock().await;
            let sent = Instant::now();
            let reply = self.forward(request, rows).await;
            (turn, sent, reply)
        };
        let (turn, sent, reply) = tokio::select! {
            done = tokio::time::timeout(self.step_timeout, run) => done.map_err(|_| {
                // It counts as hung until it answers a health check again.
                self.watch.misses.fetch_max(HEALTH_MISSES, Ordering::Relaxed);
                self.watch.hung.notify_waiters();
                warn!(worker = %self.url, layers = %self.range, timeout = ?self.step_timeout, "a step outlasted its deadline");
                self.failed(tonic::Status::deadline_exceeded(format!(
                    "no reply to a step within {:?} (--step-timeout-secs)",
                    self.step_timeout
                )))
            })?,
            () = hung => return Err(self.failed(not_answering())),
        };
        let reply = reply.map_err(|status| self.failed(status))?;
        let hop = Hop {
            round_trip: sent.elapsed(),
            compute: Duration::from_micros(reply.compute_us),
        };
        drop(turn);
        self.forward_latency.record(hop.round_trip.as_secs_f64());
        trace!(
            worker = %self.url,
            sessions = n_sessions,
            rows,
            rtt_us = hop.round_trip.as_micros() as u64,
            compute_us = reply.compute_us,
            "hop"
        );
        let mut failed = Vec::with_capacity(reply.failed.len());
        for f in reply.failed {
            let index = f.index as usize;
            if index >= n_sessions || failed.iter().any(|(i, _)| *i == index) {
                return Err(self.malformed(format!("refused session {index} is not in the step")));
            }
            let error = f.error.unwrap_or_default();
            failed.push((index, step_status(error)));
        }
        let hidden = reply
            .hidden
            .ok_or_else(|| self.malformed("no hidden state".to_string()))?;
        Ok(StepReply {
            hidden,
            failed,
            hop,
        })
    }

    /// Sends a step of `rows` rows: steps as short as a decode step (up to [`INLINE_TOKENS`])
    /// on a step stream, longer ones as unary calls, as a stream keeps buffers the size of the
    /// largest message it has carried, and a prompt chunk's would stay with every pooled stream.
    async fn forward(
        &self,
        request: pb::ForwardRequest,
        rows: usize,
    ) -> std::result::Result<pb::ForwardResponse, tonic::Status> {
        if rows <= INLINE_TOKENS {
            return self.streams.forward(&self.client, request).await;
        }
        let reply = self.client.clone().forward(request).await?;
        Ok(reply.into_inner())
    }

    fn failed(&self, status: tonic::Status) -> Error {
        Error::Worker {
            url: self.url.clone(),
            status,
        }
    }

    pub fn malformed(&self, problem: String) -> Error {
        Error::Protocol {
            url: self.url.clone(),
            problem,
        }
    }
}

/// Why a step on a hung worker failed.
fn not_answering() -> tonic::Status {
    tonic::Status::unavailable(format!(
        "the worker stopped answering ({HEALTH_MISSES} health checks missed in a row, or a step \
         past its deadline)"
    ))
}

/// The status a refused session's or a failed step's [`pb::StepError`] stands for. A code out of
/// range, or OK, is the worker's mistake: it reads as UNKNOWN.
pub(crate) fn step_status(e: pb::StepError) -> tonic::Status {
    let code = match tonic::Code::from_i32(e.code) {
        tonic::Code::Ok => tonic::Code::Unknown,
        code => code,
    };
    tonic::Status::new(code, e.message)
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

/// Checks that a worker's reply is the `[rows, d_model]` tensor in `dtype` it must be.
pub(crate) fn check_hidden(
    t: &pb::Tensor,
    rows: usize,
    d_model: usize,
    dtype: WireDType,
) -> std::result::Result<(), String> {
    if t.shape != [rows as u64, d_model as u64] {
        return Err(format!(
            "hidden state of shape {:?}, expected [{rows}, {d_model}]",
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
    let want = rows * d_model * dtype.size();
    if t.data.len() != want {
        return Err(format!(
            "hidden state of {} bytes, expected {want}",
            t.data.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_replies_are_checked() {
        let t = |shape: Vec<u64>, dtype: pb::DataType, bytes: usize| pb::Tensor {
            shape,
            dtype: dtype as i32,
            data: vec![0; bytes],
        };
        assert!(check_hidden(&t(vec![2, 3], pb::DataType::F32, 24), 2, 3, WireDType::F32).is_ok());
        assert!(check_hidden(&t(vec![0, 3], pb::DataType::F32, 0), 0, 3, WireDType::F32).is_ok());
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
    fn step_errors_keep_their_code() {
        let e = |code: i32| pb::StepError {
            code,
            message: "why".to_string(),
        };
        let s = step_status(e(tonic::Code::InvalidArgument as i32));
        assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::InvalidArgument, "why")
        );
        assert_eq!(step_status(e(0)).code(), tonic::Code::Unknown);
        assert_eq!(step_status(e(999)).code(), tonic::Code::Unknown);
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
