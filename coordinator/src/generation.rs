//! One generation as every client API runs it (the gRPC `Generate` service and the
//! OpenAI-compatible HTTP API): validated up front, then run over the cluster in its own task
//! that reports each token, the finish or the failure as an [`Event`], under the request's id and
//! span, recording the coordinator's metrics on the way.
//!
//! When the receiver of the events goes away (a client disconnected), the next token cannot be
//! reported, so the task stops the generation, which ends the session on every worker.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use realm_common::generate::{Completion, GenerationParams};
use tokio::sync::mpsc;
use tracing::{debug, info, Instrument};

use crate::admission::Slot;
use crate::cluster::{Cluster, Delta};
use crate::error::{Error, Result};
use crate::request_id::RequestId;
use crate::telemetry::names;

/// What a running generation reports.
#[derive(Debug)]
pub enum Event {
    /// A token was generated.
    Delta(Delta),
    /// The generation finished; the last event.
    Done(Box<Done>),
    /// The generation failed; the last event.
    Failed(Error),
}

/// A finished generation.
#[derive(Debug)]
pub struct Done {
    pub completion: Completion,
    /// From receiving the request (not from starting the generation) to the first token.
    pub time_to_first_token: Duration,
}

/// A generation request, already turned into tokens.
#[derive(Debug)]
pub struct Job {
    pub tokens: Vec<u32>,
    pub params: GenerationParams,
    /// When the request arrived, so the time to first token includes tokenizing.
    pub received: Instant,
    pub id: RequestId,
    /// Which API the request came through, for the metrics' `api` label.
    pub api: &'static str,
    /// Report log-probabilities, with this many alternatives at each position; `None` computes
    /// none.
    pub logprobs: Option<usize>,
}

/// Counts a request of `api` for `model` (empty when it names none served) refused before its
/// generation could start.
pub fn count_refused(api: &'static str, model: &str) {
    let model = model.to_string();
    counter!(names::REQUESTS, "api" => api, "model" => model.clone()).increment(1);
    counter!(names::REQUEST_ERRORS, "api" => api, "model" => model).increment(1);
}

/// Checks `job` and starts its generation; a bad request is an error here, before any event.
///
/// `slot` is the generation's admission; it is given back when the generation ends.
pub fn start(
    cluster: &Arc<Cluster>,
    job: Job,
    slot: Slot,
) -> Result<mpsc::UnboundedReceiver<Event>> {
    let Job {
        tokens,
        params,
        received,
        id,
        api,
        logprobs,
    } = job;
    let model = cluster.model().id.clone();
    let context = cluster.model().config.context_length;
    if params.max_tokens > context {
        count_refused(api, &model);
        return Err(realm_common::Error::InvalidArgument(format!(
            "max_tokens {} exceeds the model's context window of {context} tokens",
            params.max_tokens
        ))
        .into());
    }
    let decoding = cluster.decoding(tokens, &params).and_then(|mut d| {
        if let Some(top) = logprobs {
            d.report_logprobs(top)?;
        }
        Ok(d)
    });
    let decoding = match decoding {
        Ok(d) => d,
        Err(e) => {
            count_refused(api, &model);
            return Err(e);
        }
    };
    counter!(names::REQUESTS, "api" => api, "model" => model.clone()).increment(1);
    counter!(names::PROMPT_TOKENS, "model" => model.clone())
        .increment(decoding.prompt().len() as u64);

    // Unbounded: a generation reports at most `max_tokens` small events, and a slow reader must
    // not hold the workers' KV caches longer than the generation itself needs.
    let (tx, rx) = mpsc::unbounded_channel();
    let cluster = Arc::clone(cluster);
    // The caller's request span when it opened one (it logs its checks there), else a new one.
    let span = match tracing::Span::current() {
        current if current.is_none() => id.span(),
        current => current,
    };
    let task = async move {
        let _slot = slot;
        let _active = ActiveSession::begin(&model);
        let before_run = received.elapsed();
        let mut last_token = None::<Instant>;
        // Looked up once, not per token.
        let first_token = histogram!(names::TIME_TO_FIRST_TOKEN, "model" => model.clone());
        let inter_token = histogram!(names::INTER_TOKEN, "model" => model.clone());
        let generated = counter!(names::GENERATED_TOKENS, "model" => model.clone());
        let result = cluster
            .run(decoding, received, |delta| {
                let now = Instant::now();
                match last_token.replace(now) {
                    None => first_token.record(now.duration_since(received).as_secs_f64()),
                    Some(before) => inter_token.record(now.duration_since(before).as_secs_f64()),
                }
                generated.increment(1);
                if tx.send(Event::Delta(delta)).is_ok() {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            })
            .await;
        match result {
            Ok(generation) => {
                let completion = generation.completion;
                debug!(
                    generated = completion.usage.generated_tokens,
                    finish = completion.finish.as_str(),
                    "request done"
                );
                // The cluster's clock starts after tokenizing; the client's at the request.
                let first = before_run + completion.usage.time_to_first_token;
                let _ = tx.send(Event::Done(Box::new(Done {
                    completion,
                    time_to_first_token: first,
                })));
            }
            Err(Error::Stopped) => info!("client went away; generation stopped"),
            Err(e) => {
                counter!(names::REQUEST_ERRORS, "api" => api, "model" => model.clone())
                    .increment(1);
                let _ = tx.send(Event::Failed(e));
            }
        }
    };
    tokio::spawn(id.scope(task).instrument(span));
    Ok(rx)
}

/// Holds the active-sessions gauge of a model up for as long as a generation runs, however it
/// ends.
struct ActiveSession(metrics::Gauge);

impl ActiveSession {
    fn begin(model: &str) -> Self {
        let gauge = gauge!(names::ACTIVE_SESSIONS, "model" => model.to_string());
        gauge.increment(1.0);
        Self(gauge)
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
