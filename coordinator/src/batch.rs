//! One micro-batch through the cluster: the rows of several sessions embedded here, sent through
//! the workers in plan order (one request per worker, whatever the number of sessions), the head
//! applied to the last row of each session whose step is done, and each of those sessions'
//! next token sampled and reported.
//!
//! A session a worker refuses leaves the batch there (the others go on); a session whose step
//! failed because of a worker goes back to the scheduler, which recovers the workers and has it
//! replay its tokens.

use std::sync::Arc;

use candle_core::Tensor;
use realm_common::model::{Embedding, Head};
use realm_common::runtime::INLINE_TOKENS;
use realm_common::tokenizer::Tokenizer;
use realm_common::wire::{Activations, WireDType};
use realm_proto::pb;
use tracing::debug;

use crate::error::{Error, Result};
use crate::session::{Rows, Session};
use crate::topology::Topology;
use crate::transport::check_hidden;

/// What a micro-batch needs of the coordinator's model.
#[derive(Debug, Clone)]
pub(crate) struct Stages {
    pub embedding: Arc<Embedding>,
    pub head: Arc<Head>,
    pub tokenizer: Tokenizer,
    pub d_model: usize,
    pub dtype: WireDType,
}

/// Sessions and their rows, in row order, on one topology.
#[derive(Debug)]
pub(crate) struct MicroBatch {
    pub topology: Arc<Topology>,
    pub entries: Vec<(Session, Rows)>,
}

/// A session handed back by a micro-batch.
#[derive(Debug)]
pub(crate) enum Returned {
    /// Ready for its next step.
    Ready(Session),
    /// Its step failed because of a worker of `topology`: the workers need checking, and the
    /// session replaying.
    Retry {
        session: Session,
        error: Error,
        topology: Arc<Topology>,
    },
}

impl MicroBatch {
    pub fn rows(&self) -> usize {
        self.entries.iter().map(|(_, r)| r.rows).sum()
    }

    /// Runs the batch; returns the sessions that go on. Sessions that finished, failed for good
    /// or whose consumer went away have been ended.
    pub async fn run(self, stages: Arc<Stages>) -> Vec<Returned> {
        let MicroBatch { topology, entries } = self;
        let mut out = Vec::with_capacity(entries.len());
        let mut alive = entries;

        let tokens: Vec<u32> = alive
            .iter()
            .flat_map(|(s, rows)| s.tokens(*rows).iter().copied())
            .collect();
        let mut hidden = match embed(&stages, tokens).await {
            Ok(h) => h,
            Err(e) => {
                fail_all(alive, &e);
                return out;
            }
        };

        for worker in &topology.workers {
            let sessions = alive.iter().map(|(s, rows)| s.wire(*rows)).collect();
            let reply = match worker.step(hidden, sessions).await {
                Ok(reply) => reply,
                Err(error) => {
                    give_back(alive, &error, &topology, &mut out);
                    return out;
                }
            };
            // Refused sessions leave the batch; the others' rows are the reply's.
            let mut refused = reply.failed.into_iter().peekable();
            let mut kept = Vec::with_capacity(alive.len());
            for (i, entry) in alive.into_iter().enumerate() {
                match refused.next_if(|(index, _)| *index == i) {
                    None => kept.push(entry),
                    Some((_, status)) => {
                        let error = Error::Worker {
                            url: worker.url.clone(),
                            status,
                        };
                        give_back(vec![entry], &error, &topology, &mut out);
                    }
                }
            }
            alive = kept;
            if alive.is_empty() {
                return out;
            }
            let rows = alive.iter().map(|(_, r)| r.rows).sum();
            if let Err(problem) = check_hidden(&reply.hidden, rows, stages.d_model, stages.dtype) {
                give_back(alive, &worker.malformed(problem), &topology, &mut out);
                return out;
            }
            for (session, _) in alive.iter_mut() {
                session.hop(&reply.hop);
            }
            hidden = reply.hidden;
        }

        // The last row of each session whose step is done feeds the head.
        let row_bytes = stages.d_model * stages.dtype.size();
        let mut last_rows = Vec::new();
        let mut due = Vec::with_capacity(alive.len());
        let mut end = 0;
        for (session, rows) in alive.iter_mut() {
            end += rows.rows;
            let done = session.ran(*rows);
            if done {
                last_rows.extend_from_slice(&hidden.data[(end - 1) * row_bytes..end * row_bytes]);
            }
            due.push(done);
        }
        let due_count = due.iter().filter(|&&d| d).count();
        let logits = match head(&stages, last_rows, hidden.dtype, due_count).await {
            Ok(logits) => logits,
            Err(e) => {
                fail_all(alive, &e);
                return out;
            }
        };
        let mut unsampled = Some(alive);
        let mut sample = |logits: &[f32]| {
            if let Some(alive) = unsampled.take() {
                sample_all(alive, &due, due_count, logits, &stages.tokenizer, &mut out);
            }
        };
        // The logits read in place: a copy of a large vocabulary's costs tens of µs a token.
        let read = match &logits {
            Some(logits) => realm_common::model::with_values(logits, &mut sample),
            None => {
                sample(&[]);
                Ok(())
            }
        };
        if let (Err(e), Some(alive)) = (read, unsampled) {
            fail_all(alive, &Error::from(e));
        }
        out
    }
}

/// Samples the next token of each session of `alive` whose step is `due`, from its row of
/// `logits` (one row per session due, in order), and hands back those that go on.
fn sample_all(
    alive: Vec<(Session, Rows)>,
    due: &[bool],
    due_count: usize,
    logits: &[f32],
    tokenizer: &Tokenizer,
    out: &mut Vec<Returned>,
) {
    // One row of logits per session due (none when every step was a prompt chunk).
    let vocab = logits.len().checked_div(due_count).unwrap_or(0).max(1);
    let mut logits = logits.chunks_exact(vocab);
    for ((mut session, _), &done) in alive.into_iter().zip(due) {
        if !done {
            out.push(Returned::Ready(session));
            continue;
        }
        let Some(row) = logits.next() else {
            session.fail(Error::Internal("the head gave too few rows".to_string()));
            continue;
        };
        match session.sample(tokenizer, row) {
            Ok(true) if session.cancelled() => session.end(),
            Ok(true) => out.push(Returned::Ready(session)),
            // Finished and reported, or its consumer went away.
            Ok(false) => {
                if session.cancelled() {
                    session
                        .span
                        .in_scope(|| debug!(session = %session.id, "client went away"));
                }
                session.end()
            }
            Err(e) => session.fail(e),
        }
    }
}

/// Hands sessions whose step failed with `error` back: to be retried if a worker is at fault,
/// else failed.
fn give_back(
    entries: Vec<(Session, Rows)>,
    error: &Error,
    topology: &Arc<Topology>,
    out: &mut Vec<Returned>,
) {
    for (session, _) in entries {
        let error = error.duplicate();
        if error.is_worker_failure() {
            out.push(Returned::Retry {
                session,
                error,
                topology: Arc::clone(topology),
            });
        } else {
            session.fail(error);
        }
    }
}

fn fail_all(entries: Vec<(Session, Rows)>, error: &Error) {
    for (session, _) in entries {
        session.fail(error.duplicate());
    }
}

/// The hidden state of `tokens` on the wire. Decode-size steps are embedded in place
/// (`realm_common::runtime`), longer ones off the async thread.
async fn embed(stages: &Arc<Stages>, tokens: Vec<u32>) -> Result<pb::Tensor> {
    let dtype = stages.dtype;
    let embed = move |embedding: &Embedding, tokens: &[u32]| -> Result<pb::Tensor> {
        let x = embedding.forward(tokens)?;
        Ok(Activations::to_wire(&x, dtype)?)
    };
    if tokens.len() <= INLINE_TOKENS {
        return in_place(|| embed(&stages.embedding, &tokens));
    }
    let embedding = Arc::clone(&stages.embedding);
    blocking(move || embed(&embedding, &tokens)).await
}

/// Logits `[n, vocab]` of the `n` rows `rows` (bytes of `dtype` on the wire); `None` when `n`
/// is 0.
async fn head(stages: &Arc<Stages>, rows: Vec<u8>, dtype: i32, n: usize) -> Result<Option<Tensor>> {
    if n == 0 {
        return Ok(None);
    }
    let d_model = stages.d_model;
    let run = move |head: &Head| -> Result<Option<Tensor>> {
        let wire = pb::Tensor {
            shape: vec![n as u64, d_model as u64],
            dtype,
            data: rows,
        };
        let x = Activations::from_wire(&wire, d_model)?.hidden;
        Ok(Some(head.forward(&x)?))
    };
    let head = Arc::clone(&stages.head);
    // One row (a lone stream's step) as one job of the compute pool that this thread waits
    // for, where moving off the async thread would cost more than the row; the rows of several
    // sessions off the async thread, so that the replies of the other micro-batches in flight
    // pass on to their next worker meanwhile.
    if n == 1 {
        return pooled(move || run(&head));
    }
    blocking(move || run(&head)).await
}

/// Runs CPU-heavy model code (see [`realm_common::runtime::compute`]).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    realm_common::runtime::compute(f)
        .await
        .map_err(|e| Error::Internal(format!("model computation did not finish: {e}")))?
}

/// [`blocking`] for parallel work short enough for the async thread to wait for: one job of the
/// compute pool (see [`realm_common::runtime::pooled`]).
fn pooled<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    realm_common::runtime::pooled(f)
        .map_err(|e| Error::Internal(format!("model computation did not finish: {e}")))?
}

/// [`blocking`] for work short enough to run on the async thread itself.
fn in_place<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    realm_common::runtime::inline(f)
        .map_err(|e| Error::Internal(format!("model computation did not finish: {e}")))?
}
