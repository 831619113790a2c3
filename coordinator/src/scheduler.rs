//! Continuous batching: one task that owns every live session between its steps and, whenever
//! a pipeline slot is free, gathers the ready work of all of them into a micro-batch — one
//! decode row per generating session, then chunks of waiting prompts within the step's token
//! budget — and runs it through the workers ([`crate::batch`]).
//!
//! With K workers up to K micro-batches are in flight (`Scheduling::pipeline_depth`), each
//! holding about 1/K of the sessions: while worker 2 runs micro-batch A, worker 1 runs B, so
//! every stage is busy. Sessions join and leave between steps; nobody waits for a batch to
//! drain. A long prompt goes in chunks, so it never stops the tokens of the running streams for
//! longer than one step's budget, and every chunk attends at the precision of the whole prompt,
//! so chunking never changes its numbers.
//!
//! A step that fails because of a worker sends its sessions here: the scheduler pauses, has the
//! workers checked and, if one is lost, re-planned ([`Workers::recover`]); those sessions then
//! replay their tokens on the topology in force, and any other session whose caches were on the
//! old topology replays when its turn comes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use metrics::histogram;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::batch::{MicroBatch, Returned, Stages};
use crate::error::{Error, Result};
use crate::session::Session;
use crate::telemetry::names;
use crate::topology::{Topology, Workers};

/// Failed steps (each followed by a recovery) a session goes through before its error stands.
const MAX_RECOVERIES_PER_STEP: usize = 3;

/// Rows a step carries while sessions decode, when not configured.
pub const DEFAULT_STEP_TOKENS: usize = 32;
/// The longest piece of one prompt in a step, when not configured.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// How the scheduler fills its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduling {
    /// Rows a step carries at most while any session is decoding: every decode row first, then
    /// chunks of waiting prompts in the room left (and never less than a quarter of it, so
    /// prompts go on even when decode rows fill a step). Bounds how long a running stream waits
    /// for its next token while a long prompt is prefilled.
    pub step_tokens: usize,
    /// The longest piece of one prompt a step carries; while nothing decodes, a step carries up
    /// to this many rows.
    pub prefill_chunk: usize,
    /// Micro-batches in flight at once; `None` for one per worker.
    pub pipeline_depth: Option<usize>,
}

impl Default for Scheduling {
    fn default() -> Self {
        Self {
            step_tokens: DEFAULT_STEP_TOKENS,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            pipeline_depth: None,
        }
    }
}

impl Scheduling {
    /// Refuses settings that would stall the scheduler.
    pub fn check(&self) -> Result<()> {
        if self.step_tokens == 0 || self.prefill_chunk == 0 || self.pipeline_depth == Some(0) {
            return Err(realm_common::Error::InvalidArgument(format!(
                "--step-tokens ({}), --prefill-chunk ({}) and --pipeline-depth ({}) must be at \
                 least 1",
                self.step_tokens,
                self.prefill_chunk,
                self.pipeline_depth
                    .map_or("one per worker".to_string(), |d| d.to_string())
            ))
            .into());
        }
        Ok(())
    }
}

/// The scheduler's inbox: where new sessions are submitted.
pub(crate) type Inbox = mpsc::UnboundedSender<Session>;

/// Starts the scheduler of the model `model` over `workers`; it runs until the inbox's every
/// sender is gone and its last session has ended, or until `closing` turns true: then every
/// session fails with [`Error::ModelRemoved`] as soon as it is between steps.
pub(crate) fn spawn(
    model: Arc<str>,
    workers: Arc<Workers>,
    stages: Arc<Stages>,
    scheduling: Scheduling,
    cost: RowCost,
    closing: watch::Receiver<bool>,
) -> (Inbox, JoinHandle<()>) {
    let (inbox, submitted) = mpsc::unbounded_channel();
    let scheduler = Scheduler {
        step_rows: histogram!(names::STEP_ROWS, "model" => model.to_string()),
        step_sessions: histogram!(names::STEP_SESSIONS, "model" => model.to_string()),
        queue_wait: histogram!(names::QUEUE_WAIT, "model" => model.to_string()),
        model,
        workers,
        stages,
        scheduling,
        cost,
        closing,
        closed: false,
        watching: true,
        submitted,
        ready: VecDeque::new(),
        running: JoinSet::new(),
        in_flight: InFlight::default(),
        after_recovery: Vec::new(),
        recovery: None,
    };
    (inbox, tokio::spawn(scheduler.run()))
}

/// What the micro-batches in flight hold.
#[derive(Debug, Default, Clone, Copy)]
struct InFlight {
    sessions: usize,
    decoding: usize,
}

/// A finished micro-batch: what it held and what it gives back.
struct Finished {
    held: InFlight,
    returned: Vec<Returned>,
}

struct Scheduler {
    model: Arc<str>,
    workers: Arc<Workers>,
    stages: Arc<Stages>,
    scheduling: Scheduling,
    cost: RowCost,
    /// Turns true when the model stops being served.
    closing: watch::Receiver<bool>,
    /// Set once `closing` was seen: every session fails as soon as it is between steps.
    closed: bool,
    /// Whether `closing` may still change.
    watching: bool,
    step_rows: metrics::Histogram,
    step_sessions: metrics::Histogram,
    queue_wait: metrics::Histogram,
    submitted: mpsc::UnboundedReceiver<Session>,
    /// Sessions between steps, longest waiting first.
    ready: VecDeque<Session>,
    running: JoinSet<Finished>,
    in_flight: InFlight,
    /// Sessions whose step failed because of a worker, waiting for the recovery.
    after_recovery: Vec<(Session, Error)>,
    recovery: Option<JoinHandle<Result<Arc<Topology>>>>,
}

impl Scheduler {
    async fn run(mut self) {
        let mut open = true;
        loop {
            if self.recovery.is_none() {
                self.launch();
            }
            if !open
                && self.ready.is_empty()
                && self.running.is_empty()
                && self.after_recovery.is_empty()
                && self.recovery.is_none()
            {
                debug!("scheduler stopped: no sessions left");
                return;
            }
            tokio::select! {
                submitted = self.submitted.recv(), if open => match submitted {
                    Some(session) => {
                        self.ready.push_back(session);
                        // Everything submitted meanwhile joins the same round.
                        while let Ok(session) = self.submitted.try_recv() {
                            self.ready.push_back(session);
                        }
                    }
                    None => open = false,
                },
                Some(finished) = self.running.join_next() => self.finished(finished),
                recovered = recovery(&mut self.recovery) => self.recovered(recovered),
                changed = self.closing.changed(), if self.watching => match changed {
                    Ok(()) if *self.closing.borrow() => {
                        self.close();
                        open = false;
                    }
                    Ok(()) => {}
                    // The cluster is gone: its inbox closes too.
                    Err(_) => self.watching = false,
                },
                else => {
                    warn!("scheduler stopped with sessions it cannot run");
                    return;
                }
            }
        }
    }

    /// The model is no longer served: every session between steps fails now, the others as
    /// their step returns.
    fn close(&mut self) {
        self.closed = true;
        self.watching = false;
        let mut ended = self.in_flight.sessions;
        while let Ok(session) = self.submitted.try_recv() {
            self.ready.push_back(session);
        }
        for session in self.ready.drain(..) {
            ended += 1;
            session.fail(Error::ModelRemoved(self.model.to_string()));
        }
        for (session, _) in self.after_recovery.drain(..) {
            ended += 1;
            session.fail(Error::ModelRemoved(self.model.to_string()));
        }
        info!(model = %self.model, sessions = ended, "model removed; its generations end");
    }

    /// Sends `session` back to wait for its next step, or ends it if the model was removed.
    fn requeue(&mut self, session: Session) {
        if self.closed {
            session.fail(Error::ModelRemoved(self.model.to_string()));
        } else {
            self.ready.push_back(session);
        }
    }

    /// Launches micro-batches while a pipeline slot is free and work is ready.
    fn launch(&mut self) {
        let topology = self.workers.current();
        let depth = self
            .scheduling
            .pipeline_depth
            .unwrap_or(topology.workers.len())
            .max(1);
        while self.running.len() < depth {
            let Some(batch) = self.form(&topology, depth) else {
                return;
            };
            let held = InFlight {
                sessions: batch.entries.len(),
                decoding: batch
                    .entries
                    .iter()
                    .filter(|(_, r)| r.step_tokens == 1)
                    .count(),
            };
            self.step_rows.record(batch.rows() as f64);
            self.step_sessions.record(held.sessions as f64);
            self.in_flight.sessions += held.sessions;
            self.in_flight.decoding += held.decoding;
            let stages = Arc::clone(&self.stages);
            self.running.spawn(async move {
                let returned = batch.run(stages).await;
                Finished { held, returned }
            });
        }
    }

    /// The next micro-batch from the ready sessions, if any work is ready.
    fn form(&mut self, topology: &Arc<Topology>, depth: usize) -> Option<MicroBatch> {
        // Sessions whose consumer went away leave here.
        let (gone, ready): (Vec<Session>, Vec<Session>) =
            self.ready.drain(..).partition(Session::cancelled);
        self.ready = ready.into();
        for session in gone {
            session
                .span
                .in_scope(|| debug!(session = %session.id, "client went away"));
            session.end();
        }
        if self.ready.is_empty() {
            return None;
        }
        for session in self.ready.iter_mut() {
            session.prepare(topology);
        }
        let live = self.ready.len() + self.in_flight.sessions;
        let decoding_anywhere =
            self.in_flight.decoding > 0 || self.ready.iter().any(Session::decoding);
        let waiting: Vec<Waiting> = self
            .ready
            .iter()
            .map(|s| Waiting {
                pending: s.pending(),
                position: s.position(),
            })
            .collect();
        let picked = pick(
            &waiting,
            live,
            depth,
            decoding_anywhere,
            &self.scheduling,
            self.cost,
        );
        if picked.is_empty() {
            return None;
        }
        let mut sessions: Vec<Option<Session>> = self.ready.drain(..).map(Some).collect();
        let mut taken: Vec<_> = picked
            .into_iter()
            .filter_map(|(i, rows)| {
                let mut session = sessions[i].take()?;
                let rows = session.take(rows);
                Some((session, rows))
            })
            .collect();
        self.ready = sessions.into_iter().flatten().collect();
        let now = Instant::now();
        for (session, _) in taken.iter_mut() {
            if !session.scheduled {
                session.scheduled = true;
                self.queue_wait
                    .record(now.duration_since(session.received).as_secs_f64());
            }
        }
        Some(MicroBatch {
            topology: Arc::clone(topology),
            entries: taken,
        })
    }

    fn finished(&mut self, finished: std::result::Result<Finished, tokio::task::JoinError>) {
        let Ok(Finished { held, returned }) = finished else {
            // A micro-batch's task panicked: its sessions were dropped, which ended them on the
            // workers and their consumers' channels.
            warn!("a micro-batch failed; its sessions were dropped");
            return;
        };
        self.in_flight.sessions -= held.sessions;
        self.in_flight.decoding -= held.decoding;
        for r in returned {
            match r {
                Returned::Ready(session) => self.requeue(session),
                Returned::Retry { session, .. } if self.closed => {
                    session.fail(Error::ModelRemoved(self.model.to_string()))
                }
                Returned::Retry {
                    mut session,
                    error,
                    topology,
                } => {
                    session.recoveries += 1;
                    if session.recoveries > MAX_RECOVERIES_PER_STEP {
                        session.fail(error);
                        continue;
                    }
                    session.span.in_scope(|| {
                        warn!(session = %session.id, error = %error, "step failed; checking the workers")
                    });
                    self.after_recovery.push((session, error));
                    if self.recovery.is_none() {
                        let workers = Arc::clone(&self.workers);
                        self.recovery =
                            Some(tokio::spawn(
                                async move { workers.recover(&topology).await },
                            ));
                    }
                }
            }
        }
    }

    fn recovered(&mut self, recovered: Result<Arc<Topology>>) {
        self.recovery = None;
        let waiting = std::mem::take(&mut self.after_recovery);
        match recovered {
            Ok(topology) => {
                info!(
                    plan = %topology.plan,
                    sessions = waiting.len(),
                    "workers checked; the failed steps replay"
                );
                for (mut session, _) in waiting {
                    session.replay();
                    self.requeue(session);
                }
            }
            Err(error) => {
                for (session, _) in waiting {
                    session.fail(error.duplicate());
                }
            }
        }
    }
}

/// What [`pick`] knows of a ready session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiting {
    /// Tokens to run before its next token can be sampled: 1 for a decode row.
    pending: usize,
    /// Tokens its caches hold: where its next rows sit.
    position: usize,
}

/// What a step's rows cost, in rows of matrix products: a row at `position` also attends to
/// that many cached keys, which weighs as much as its matrix products at `attention_context`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowCost {
    pub attention_context: usize,
}

/// How many times slower than the quantized matrix products attention runs per multiply-add
/// (its online softmax goes one key at a time). Measured: a 16-row chunk of a SmolLM2 prompt
/// at position 1,500 costs 5× the same chunk at position 0, beside 16 decode rows.
const ATTENTION_SLOWDOWN: usize = 8;

impl RowCost {
    /// The cost model of `config`'s blocks: a block's weights against the query-key products
    /// and weighted values of every head.
    pub fn of(config: &realm_common::model::ModelConfig) -> Self {
        Self::new(
            config.d_model,
            config.ffn_dim,
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
    }

    /// The cost model of blocks `d` wide with an MLP of `ffn`, `heads` query heads and
    /// `kv_heads` key/value heads of `dim` dimensions.
    fn new(d: usize, ffn: usize, heads: usize, kv_heads: usize, dim: usize) -> Self {
        let weights = 2 * d * heads * dim + 2 * d * kv_heads * dim + 3 * d * ffn;
        let per_position = 2 * heads * dim * ATTENTION_SLOWDOWN;
        Self {
            attention_context: (weights / per_position.max(1)).max(1),
        }
    }

    /// The cost of `rows` rows from `position`.
    fn rows(&self, position: usize, rows: usize) -> f64 {
        let mean_position = position as f64 + rows.saturating_sub(1) as f64 / 2.0;
        rows as f64 * (1.0 + mean_position / self.attention_context as f64)
    }
}

/// Which of the ready sessions (longest waiting first) a micro-batch takes, and how many rows
/// of each, in row order.
///
/// Decode rows come first, one per generating session, up to the micro-batch's share of the
/// `live` sessions (`live / depth`, so the pipeline's stages stay evenly loaded). Then chunks of
/// prompts, in arrival order, in the room the budget leaves. While any session decodes, the
/// budget is `step_tokens` rows' worth of work, counting what each row's attention to the keys
/// before it costs ([`RowCost`]): a chunk deep into a long prompt gets fewer rows, so a step's
/// time, which every running stream waits for, stays bounded. The first prompt always gets a
/// quarter of the budget, so prompts go on while decode rows fill the steps. While nothing
/// decodes, a step carries up to `prefill_chunk` rows, whatever they cost.
fn pick(
    waiting: &[Waiting],
    live: usize,
    depth: usize,
    decoding_anywhere: bool,
    scheduling: &Scheduling,
    cost: RowCost,
) -> Vec<(usize, usize)> {
    let share = live.div_ceil(depth.max(1));
    let mut picked: Vec<(usize, usize)> = waiting
        .iter()
        .enumerate()
        .filter(|(_, w)| w.pending == 1)
        .take(share)
        .map(|(i, _)| (i, 1))
        .collect();
    // While nothing decodes, rows cost one each, whatever they attend to.
    let cost = |position: usize, rows: usize| {
        if decoding_anywhere {
            cost.rows(position, rows)
        } else {
            rows as f64
        }
    };
    let mut spent: f64 = picked
        .iter()
        .map(|&(i, _)| cost(waiting[i].position, 1))
        .sum();
    let budget = if decoding_anywhere {
        scheduling.step_tokens
    } else {
        scheduling.prefill_chunk
    } as f64;
    let floor = (scheduling.step_tokens / 4).max(1) as f64;
    let prompts = waiting.iter().enumerate().filter(|(_, w)| w.pending > 1);
    for (nth, (i, w)) in prompts.enumerate() {
        let room = budget - spent;
        let room = if nth == 0 { room.max(floor) } else { room };
        if room < 1.0 {
            break;
        }
        // The most rows that fit (the cost grows with the rows), and at least one.
        let most = w.pending.min(scheduling.prefill_chunk);
        let (mut fits, mut over) = (0, most + 1);
        while over - fits > 1 {
            let mid = (fits + over) / 2;
            // (A hair over the room is rounding, not cost.)
            if cost(w.position, mid) <= room + 1e-9 {
                fits = mid;
            } else {
                over = mid;
            }
        }
        if fits == 0 && nth > 0 {
            break;
        }
        let rows = fits.max(1);
        picked.push((i, rows));
        spent += cost(w.position, rows);
    }
    picked
}

/// Resolves with the recovery's outcome once it has one; never while there is none.
async fn recovery(
    running: &mut Option<JoinHandle<Result<Arc<Topology>>>>,
) -> Result<Arc<Topology>> {
    match running {
        Some(handle) => match handle.await {
            Ok(outcome) => outcome,
            Err(e) => Err(Error::Internal(format!("the recovery failed: {e}"))),
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduling(step_tokens: usize, prefill_chunk: usize) -> Scheduling {
        Scheduling {
            step_tokens,
            prefill_chunk,
            pipeline_depth: None,
        }
    }

    /// Attention that costs nothing: every row costs one.
    const FREE: RowCost = RowCost {
        attention_context: usize::MAX,
    };

    fn waiting(pending: &[usize]) -> Vec<Waiting> {
        pending
            .iter()
            .map(|&pending| Waiting {
                pending,
                position: if pending == 1 { 20 } else { 0 },
            })
            .collect()
    }

    #[test]
    fn decode_rows_come_first_up_to_the_share_of_the_pipeline() {
        let s = scheduling(64, 256);
        // Sixteen decoding sessions, two stages: eight a micro-batch.
        let all = waiting(&[1; 16]);
        let picked = pick(&all, 16, 2, true, &s, FREE);
        assert_eq!(picked, (0..8).map(|i| (i, 1)).collect::<Vec<_>>());
        // With eight more in flight, the other eight.
        assert_eq!(pick(&all[..8], 16, 2, true, &s, FREE).len(), 8);
        // One stage takes them all.
        assert_eq!(pick(&all, 16, 1, true, &s, FREE).len(), 16);
    }

    #[test]
    fn prompts_fill_the_room_decode_rows_leave_in_arrival_order() {
        let s = scheduling(64, 256);
        // A 2,000-token prompt behind four decoding sessions: a chunk of the 60 rows left.
        assert_eq!(
            pick(&waiting(&[2000, 1, 1, 1, 1]), 5, 1, true, &s, FREE),
            [(1, 1), (2, 1), (3, 1), (4, 1), (0, 60)]
        );
        // Short prompts share the room; the last one gets what is left, then none.
        assert_eq!(
            pick(&waiting(&[1, 30, 30, 30]), 4, 1, true, &s, FREE),
            [(0, 1), (1, 30), (2, 30), (3, 3)]
        );
        // Decode rows filling the budget still leave a quarter of it to the first prompt.
        let mut pending = vec![1; 70];
        pending.push(500);
        let picked = pick(&waiting(&pending), 71, 1, true, &s, FREE);
        assert_eq!(picked.len(), 71);
        assert_eq!(picked.last(), Some(&(70, 16)));
    }

    #[test]
    fn a_chunk_deep_into_a_long_prompt_gets_fewer_rows() {
        let s = scheduling(32, 256);
        let cost = RowCost {
            attention_context: 400,
        };
        let chunk_at = |position: usize| {
            let mut w = waiting(&[1; 16]);
            w.push(Waiting {
                pending: 2000,
                position,
            });
            pick(&w, 17, 1, true, &s, cost).last().copied()
        };
        // Sixteen decode rows at position 20 cost 16.8 of 32: 14 rows of the prompt fit.
        assert_eq!(chunk_at(0), Some((16, 14)));
        // At position 1,200 a row costs four: three rows.
        assert_eq!(chunk_at(1200), Some((16, 3)));
        // A row that costs more than the room left still goes: the prompt never stops.
        assert_eq!(chunk_at(8000), Some((16, 1)));
        assert!(cost.rows(1200, 3) <= 15.2 && cost.rows(1200, 4) > 15.2);
        // With nothing decoding, attention is not counted: whole chunks.
        let alone = [Waiting {
            pending: 800,
            position: 1200,
        }];
        assert_eq!(pick(&alone, 1, 1, false, &s, cost), [(0, 256)]);
    }

    #[test]
    fn with_nothing_decoding_a_step_carries_a_whole_chunk() {
        let s = scheduling(64, 256);
        assert_eq!(pick(&waiting(&[2000]), 1, 1, false, &s, FREE), [(0, 256)]);
        assert_eq!(
            pick(&waiting(&[100, 200]), 2, 1, false, &s, FREE),
            [(0, 100), (1, 156)]
        );
        // The budget counts every session's rows, in flight or not.
        assert_eq!(pick(&waiting(&[2000]), 1, 1, true, &s, FREE), [(0, 64)]);
        assert!(pick(&[], 3, 1, true, &s, FREE).is_empty());
    }

    #[test]
    fn the_cost_model_follows_the_model_shape() {
        // SmolLM2-135M: 576 wide, an MLP of 1,536, 9 heads of 64, 3 KV heads.
        assert_eq!(RowCost::new(576, 1536, 9, 3, 64).attention_context, 384);
        // Wider heads attend at a higher cost per position.
        assert!(RowCost::new(640, 2048, 4, 1, 256).attention_context < 384);
    }

    #[test]
    fn settings_that_would_stall_are_refused() {
        assert!(Scheduling::default().check().is_ok());
        assert!(scheduling(0, 256).check().is_err());
        assert!(scheduling(64, 0).check().is_err());
        let no_pipeline = Scheduling {
            pipeline_depth: Some(0),
            ..Scheduling::default()
        };
        assert!(no_pipeline.check().is_err());
    }
}
