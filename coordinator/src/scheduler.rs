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
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::batch::{MicroBatch, Returned, Stages};
use crate::error::{Error, Result};
use crate::generation::names;
use crate::session::Session;
use crate::topology::{Topology, Workers};

/// Failed steps (each followed by a recovery) a session goes through before its error stands.
const MAX_RECOVERIES_PER_STEP: usize = 3;

/// Rows a step carries while sessions decode, when not configured.
pub const DEFAULT_STEP_TOKENS: usize = 64;
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
            return Err(Error::Plan(format!(
                "step tokens ({}), prefill chunk ({}) and pipeline depth ({:?}) must be at least 1",
                self.step_tokens, self.prefill_chunk, self.pipeline_depth
            )));
        }
        Ok(())
    }
}

/// The scheduler's inbox: where new sessions are submitted.
pub(crate) type Inbox = mpsc::UnboundedSender<Session>;

/// Starts the scheduler over `workers`; it runs until the inbox's every sender is gone and its
/// last session has ended.
pub(crate) fn spawn(
    workers: Arc<Workers>,
    stages: Arc<Stages>,
    scheduling: Scheduling,
) -> (Inbox, JoinHandle<()>) {
    let (inbox, submitted) = mpsc::unbounded_channel();
    let scheduler = Scheduler {
        workers,
        stages,
        scheduling,
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
    workers: Arc<Workers>,
    stages: Arc<Stages>,
    scheduling: Scheduling,
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
                else => {
                    warn!("scheduler stopped with sessions it cannot run");
                    return;
                }
            }
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
            histogram!(names::STEP_ROWS).record(batch.rows() as f64);
            histogram!(names::STEP_SESSIONS).record(held.sessions as f64);
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
        let pending: Vec<usize> = self.ready.iter().map(Session::pending).collect();
        let picked = pick(&pending, live, depth, decoding_anywhere, &self.scheduling);
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
                histogram!(names::QUEUE_WAIT)
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
                Returned::Ready(session) => self.ready.push_back(session),
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
                    self.ready.push_back(session);
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

/// Which of the ready sessions (by the tokens each has `pending`, longest waiting first) a
/// micro-batch takes, and how many rows of each, in row order: decode rows first, one per
/// generating session, up to the micro-batch's share of the `live` sessions (`live / depth`, so
/// the pipeline's stages stay evenly loaded); then chunks of prompts, in arrival order, in the
/// room the budget leaves (never less than a quarter of `step_tokens` for the first, so prompts
/// go on while decode rows fill the steps). While nothing decodes the budget is a whole
/// `prefill_chunk`.
fn pick(
    pending: &[usize],
    live: usize,
    depth: usize,
    decoding_anywhere: bool,
    scheduling: &Scheduling,
) -> Vec<(usize, usize)> {
    let share = live.div_ceil(depth.max(1));
    let budget = if decoding_anywhere {
        scheduling.step_tokens
    } else {
        scheduling.prefill_chunk
    };
    let floor = (scheduling.step_tokens / 4).max(1);
    let mut picked: Vec<(usize, usize)> = pending
        .iter()
        .enumerate()
        .filter(|(_, &p)| p == 1)
        .take(share)
        .map(|(i, _)| (i, 1))
        .collect();
    let mut rows = picked.len();
    let prompts = pending.iter().enumerate().filter(|(_, &p)| p > 1);
    for (nth, (i, &p)) in prompts.enumerate() {
        let room = budget.saturating_sub(rows);
        let room = if nth == 0 { room.max(floor) } else { room };
        if room == 0 {
            break;
        }
        let chunk = p.min(room).min(scheduling.prefill_chunk);
        picked.push((i, chunk));
        rows += chunk;
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

    #[test]
    fn decode_rows_come_first_up_to_the_share_of_the_pipeline() {
        let s = scheduling(64, 256);
        // Sixteen decoding sessions, two stages: eight a micro-batch.
        let pending = [1; 16];
        let picked = pick(&pending, 16, 2, true, &s);
        assert_eq!(picked, (0..8).map(|i| (i, 1)).collect::<Vec<_>>());
        // With eight more in flight, the other eight.
        assert_eq!(pick(&pending[..8], 16, 2, true, &s).len(), 8);
        // One stage takes them all.
        assert_eq!(pick(&pending, 16, 1, true, &s).len(), 16);
    }

    #[test]
    fn prompts_fill_the_room_decode_rows_leave_in_arrival_order() {
        let s = scheduling(64, 256);
        // A 2,000-token prompt behind four decoding sessions: a chunk of the 60 rows left.
        assert_eq!(
            pick(&[2000, 1, 1, 1, 1], 5, 1, true, &s),
            [(1, 1), (2, 1), (3, 1), (4, 1), (0, 60)]
        );
        // Short prompts share the room; the last one gets what is left, then none.
        assert_eq!(
            pick(&[1, 30, 30, 30], 4, 1, true, &s),
            [(0, 1), (1, 30), (2, 30), (3, 3)]
        );
        // Decode rows filling the budget still leave a quarter of it to the first prompt.
        let mut pending = vec![1; 70];
        pending.push(500);
        let picked = pick(&pending, 71, 1, true, &s);
        assert_eq!(picked.len(), 71);
        assert_eq!(picked.last(), Some(&(70, 16)));
    }

    #[test]
    fn with_nothing_decoding_a_step_carries_a_whole_chunk() {
        let s = scheduling(64, 256);
        assert_eq!(pick(&[2000], 1, 1, false, &s), [(0, 256)]);
        assert_eq!(pick(&[100, 200], 2, 1, false, &s), [(0, 100), (1, 156)]);
        // The budget counts every session's rows, in flight or not.
        assert_eq!(pick(&[2000], 1, 1, true, &s), [(0, 64)]);
        assert!(pick(&[], 3, 1, true, &s).is_empty());
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
