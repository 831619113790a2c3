//! One generation as the scheduler carries it from step to step: its tokens and text, how many
//! of its tokens the workers have cached (and on which topology), its claim on the workers' KV
//! caches, and the channel its events go out on.
//!
//! The coordinator keeps every session's tokens, so the workers' caches can always be rebuilt:
//! a session whose caches were lost (a worker died, the layers were re-planned) replays its
//! tokens from position 0, in chunks like a prompt, and goes on.

use std::time::{Duration, Instant};

use realm_common::generate::{Completion, Decoding, FinishReason};
use realm_common::logprobs::TokenLogprob;
use realm_common::tokenizer::Tokenizer;
use realm_proto::pb;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, trace, warn, Instrument};

use crate::error::{Error, Result};
use crate::request_id::{self, RequestId};
use crate::topology::Topology;
use crate::transport::{Hop, HopStats, WorkerLink};

/// How long ending a session on a worker may take before the coordinator stops waiting (the
/// worker's idle timeout frees what is left).
const END_SESSION_TIMEOUT: Duration = Duration::from_secs(5);

/// What one generated token added to the output.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub token: u32,
    /// Text that became final with this token (may be empty).
    pub text: String,
    /// When the generation reports log-probabilities: the entries of the tokens whose text is
    /// `text` (they can trail `token`: text held back goes out later, with its tokens).
    pub logprobs: Vec<TokenLogprob>,
}

/// A finished distributed generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub completion: Completion,
    /// Worker hops of the steps that ran the prompt (and any replay).
    pub prefill: HopStats,
    /// Worker hops of the decode steps.
    pub decode: HopStats,
}

/// What a session reports to the caller that submitted it.
#[derive(Debug)]
pub(crate) enum SessionEvent {
    Delta(Delta),
    /// The last event of a generation that finished.
    Done(Box<Generation>),
    /// The last event of a generation that failed.
    Failed(Error),
}

/// One generation in the scheduler's hands.
#[derive(Debug)]
pub(crate) struct Session {
    pub id: String,
    /// The client request it serves: sent with its rows, so worker logs carry it.
    request_id: Option<RequestId>,
    /// The request's span: every line logged about the session is written in it.
    pub span: tracing::Span,
    decoding: Decoding,
    /// Tokens the workers have cached for this session, on the topology of `kv_generation`.
    cached: usize,
    kv_generation: u64,
    /// Where the step in progress ends (a prompt or a replay goes in chunks): `cached` reaches
    /// it when the step's logits are due.
    step_end: usize,
    /// Tokens of the step in progress, which fix the attention precision of all its chunks.
    step_tokens: usize,
    /// Whether the step in progress started from position 0 (a prompt or a replay).
    step_from_start: bool,
    text: String,
    /// When the request arrived (before admission), for the queue-wait metric.
    pub received: Instant,
    /// When the session was submitted: the generation's clock.
    started: Instant,
    first_token_at: Option<Duration>,
    /// Whether a step of the session has been scheduled yet.
    pub scheduled: bool,
    prefill: HopStats,
    decode: HopStats,
    /// Consecutive failed steps, each followed by a recovery.
    pub recoveries: usize,
    claim: Claim,
    events: mpsc::UnboundedSender<SessionEvent>,
}

/// The rows a session contributes to a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rows {
    /// Its first row's position: tokens cached before the step.
    pub position: usize,
    pub rows: usize,
    /// Tokens of the session's whole step (see `pb::SessionRows::step_tokens`).
    pub step_tokens: usize,
}

impl Session {
    pub fn new(
        id: String,
        decoding: Decoding,
        events: mpsc::UnboundedSender<SessionEvent>,
        received: Instant,
    ) -> Self {
        Self {
            id,
            request_id: request_id::current(),
            span: tracing::Span::current(),
            cached: 0,
            kv_generation: 0,
            step_end: 0,
            step_tokens: 0,
            step_from_start: true,
            text: String::new(),
            received,
            started: Instant::now(),
            first_token_at: None,
            scheduled: false,
            prefill: HopStats::default(),
            decode: HopStats::default(),
            recoveries: 0,
            claim: Claim::default(),
            events,
            decoding,
        }
    }

    /// Tokens the workers have yet to see before the next token can be sampled.
    pub fn pending(&self) -> usize {
        self.decoding.tokens().len() - self.cached
    }

    /// Tokens the workers hold in its caches: where its next rows sit.
    pub fn position(&self) -> usize {
        self.cached
    }

    /// Whether the session's next step is one decode row.
    pub fn decoding(&self) -> bool {
        self.pending() == 1
    }

    /// Whether the session's consumer has gone away.
    pub fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Makes ready for a step on `topology`: caches built on another topology are gone, so the
    /// session replays its tokens from position 0.
    pub fn prepare(&mut self, topology: &Topology) {
        if self.cached > 0 && self.kv_generation != topology.generation {
            self.replay();
        }
        self.claim.adopt(topology);
        self.kv_generation = topology.generation;
    }

    /// Forgets what the workers cached: the next steps run every token again from position 0.
    pub fn replay(&mut self) {
        if self.cached > 0 {
            self.span.in_scope(|| {
                debug!(session = %self.id, tokens = self.decoding.tokens().len(), "replaying the session to rebuild its caches")
            });
        }
        self.cached = 0;
        self.step_end = 0;
    }

    /// The next rows of the session, at most `max`, starting its next step if the last one is
    /// done.
    pub fn take(&mut self, max: usize) -> Rows {
        if self.cached == self.step_end {
            self.step_end = self.decoding.tokens().len();
            self.step_tokens = self.step_end - self.cached;
            self.step_from_start = self.cached == 0;
        }
        Rows {
            position: self.cached,
            rows: (self.step_end - self.cached).min(max),
            step_tokens: self.step_tokens,
        }
    }

    /// The tokens of `rows`.
    pub fn tokens(&self, rows: Rows) -> &[u32] {
        &self.decoding.tokens()[rows.position..rows.position + rows.rows]
    }

    /// The wire description of `rows`.
    pub fn wire(&self, rows: Rows) -> pb::SessionRows {
        pb::SessionRows {
            session_id: self.id.clone(),
            position: rows.position as u64,
            rows: rows.rows as u32,
            step_tokens: u32::try_from(rows.step_tokens).unwrap_or(u32::MAX),
            request_id: self
                .request_id
                .as_ref()
                .map(|id| id.as_str().to_string())
                .unwrap_or_default(),
        }
    }

    /// Records one worker's hop of a step the session took part in.
    pub fn hop(&mut self, hop: &Hop) {
        if self.step_from_start {
            self.prefill.add(hop);
        } else {
            self.decode.add(hop);
        }
    }

    /// Records that the workers ran `rows`; whether the step is done (its logits are due).
    pub fn ran(&mut self, rows: Rows) -> bool {
        self.cached = rows.position + rows.rows;
        self.recoveries = 0;
        self.cached == self.step_end
    }

    /// Samples the next token from the logits of the session's last row and reports it.
    /// Returns whether the session goes on: `false` once it has finished (and reported so) or
    /// its consumer has gone away.
    pub fn sample(&mut self, tokenizer: &Tokenizer, logits: &[f32]) -> Result<bool> {
        let step = self.decoding.step(tokenizer, logits)?;
        self.first_token_at
            .get_or_insert_with(|| self.started.elapsed());
        self.text.push_str(&step.text);
        let delta = Delta {
            token: step.token,
            text: step.text,
            logprobs: step.logprobs,
        };
        if self.events.send(SessionEvent::Delta(delta)).is_err() {
            return Ok(false);
        }
        match step.finish {
            None => Ok(true),
            Some(finish) => {
                self.finish(finish);
                Ok(false)
            }
        }
    }

    fn finish(&mut self, finish: FinishReason) {
        let completion = self.decoding.completion(
            std::mem::take(&mut self.text),
            finish,
            self.first_token_at.unwrap_or_default(),
            self.started.elapsed(),
        );
        self.span.in_scope(|| {
            debug!(
                session = %self.id,
                generated = completion.usage.generated_tokens,
                finish = completion.finish.as_str(),
                "generation finished"
            )
        });
        let generation = Generation {
            completion,
            prefill: self.prefill,
            decode: self.decode,
        };
        self.close(SessionEvent::Done(Box::new(generation)));
    }

    /// Reports `error` as the end of the generation and ends the session on the workers.
    pub fn fail(mut self, error: Error) {
        self.span.in_scope(|| {
            warn!(session = %self.id, error = %error, "generation failed");
        });
        self.close(SessionEvent::Failed(error));
    }

    /// Ends the session on every worker that may hold its caches, then reports `last`: by the
    /// time its consumer reads the end of the generation, the workers have freed its caches.
    fn close(&mut self, last: SessionEvent) {
        let workers = std::mem::take(&mut self.claim.workers);
        self.claim.open = false;
        let (session, request_id) = (self.id.clone(), self.request_id.clone());
        let events = self.events.clone();
        let ending = async move {
            end_everywhere(workers, session, request_id).await;
            let _ = events.send(last);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(ending.instrument(self.span.clone()));
            }
            // Not reached from the scheduler, which runs on a runtime.
            Err(_) => drop(self.events.send(SessionEvent::Failed(Error::ShuttingDown))),
        }
    }

    /// Ends the session on every worker that may hold its caches (in the background), without
    /// a last event: its consumer has gone away.
    pub fn end(mut self) {
        let workers = std::mem::take(&mut self.claim.workers);
        self.claim.open = false;
        spawn_end(
            workers,
            std::mem::take(&mut self.id),
            self.request_id.take(),
            &self.span,
        );
    }
}

/// A session's claim on the workers' KV caches, released on every path out of a generation: by
/// [`Session::end`], or when the session is dropped.
#[derive(Debug)]
struct Claim {
    /// Every worker the session ran on (all topologies).
    workers: Vec<WorkerLink>,
    open: bool,
}

impl Default for Claim {
    fn default() -> Self {
        Self {
            workers: Vec::new(),
            open: true,
        }
    }
}

impl Claim {
    /// Also ends the session on the workers of `topology`.
    fn adopt(&mut self, topology: &Topology) {
        for w in &topology.workers {
            if !self.workers.iter().any(|known| known.url == w.url) {
                self.workers.push(w.clone());
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.claim.open {
            return;
        }
        debug!(session = %self.id, "generation dropped; ending its session");
        let workers = std::mem::take(&mut self.claim.workers);
        spawn_end(
            workers,
            std::mem::take(&mut self.id),
            self.request_id.take(),
            &self.span,
        );
    }
}

/// Ends `session` on `workers` in the background; failures are logged, not returned (the
/// workers' idle timeout frees anything left).
fn spawn_end(
    workers: Vec<WorkerLink>,
    session: String,
    request_id: Option<RequestId>,
    span: &tracing::Span,
) {
    if workers.is_empty() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(end_everywhere(workers, session, request_id).instrument(span.clone()));
        }
        Err(_) => span.in_scope(|| {
            warn!(
                session = %session,
                "generation dropped outside a runtime; workers free the session when it idles out"
            )
        }),
    }
}

async fn end_everywhere(workers: Vec<WorkerLink>, session: String, request_id: Option<RequestId>) {
    // Hung workers are told in the background: waiting for them would hold up the end of the
    // generation by the whole timeout.
    let (hung, workers): (Vec<WorkerLink>, Vec<WorkerLink>) =
        workers.into_iter().partition(WorkerLink::hung);
    if !hung.is_empty() {
        tokio::spawn(end_on(hung, session.clone(), request_id.clone()).in_current_span());
    }
    end_on(workers, session, request_id).await;
}

/// Ends `session` on `workers`, waiting for each at most [`END_SESSION_TIMEOUT`].
async fn end_on(workers: Vec<WorkerLink>, session: String, request_id: Option<RequestId>) {
    let mut calls = JoinSet::new();
    for w in workers {
        let request = request_id::tagged(
            pb::EndSessionRequest {
                session_id: session.clone(),
                model: w.model.digest.to_string(),
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
