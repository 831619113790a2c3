//! The coordinator's side of a distributed model: its share of the model (tokenizer,
//! embeddings, head), the workers that run the layers ([`crate::topology`]) and the scheduler
//! that batches every live generation's steps through them ([`crate::scheduler`]).
//!
//! [`Cluster::run`] submits one generation and relays its tokens as they come; any number run at
//! once, sharing every step.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use realm_common::generate::{Decoding, GenerationParams};
use realm_common::model::LayerRange;
use realm_common::wire::WireDType;
use realm_proto::pb;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use crate::batch::Stages;
use crate::delivery::ShardSource;
use crate::error::{Error, Result};
use crate::model::CoordinatorModel;
use crate::plan::{Plan, PlanSpec};
use crate::scheduler::{self, Inbox, RowCost, Scheduling};
use crate::session::{Session, SessionEvent};
use crate::topology::Workers;

pub use crate::session::{Delta, Generation};
pub use crate::topology::{ClusterOptions, REALM_VERSION};
pub use crate::transport::{Hop, HopStats, Liveness, WorkerSummary};

/// The coordinator's model, the workers and the scheduler that drives them.
///
/// When a step fails on a worker, the workers are probed; a dead worker's layers go to a standby
/// (or a worker that came back), or else every layer is re-planned over the workers still alive,
/// and the affected generations replay their tokens so far on the new topology.
#[derive(Debug)]
pub struct Cluster {
    model: CoordinatorModel,
    workers: Arc<Workers>,
    wire_dtype: WireDType,
    scheduling: Scheduling,
    inbox: Inbox,
    /// Taken by whoever waits for the scheduler's end ([`Cluster::close`], [`Cluster::shutdown`]).
    scheduler: Mutex<Option<JoinHandle<()>>>,
    /// Set when the model stops being served.
    closing: watch::Sender<bool>,
    sessions_started: AtomicU64,
    /// Generations running now.
    running: Arc<AtomicUsize>,
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
            Scheduling::default(),
        )
        .await
    }

    /// As [`Cluster::connect`], with a cluster token, standby workers and TLS, and how steps are
    /// batched.
    pub async fn connect_with(
        model: CoordinatorModel,
        worker_urls: &[String],
        plan: &PlanSpec,
        wire_dtype: WireDType,
        options: ClusterOptions,
        scheduling: Scheduling,
    ) -> Result<Self> {
        scheduling.check()?;
        let source = Arc::new(ShardSource::new(model.file.clone(), model.identity.clone()));
        let workers = Workers::connect(
            source,
            &model.id,
            model.config.n_layers,
            worker_urls,
            plan,
            options,
        )
        .await?;
        let workers = Arc::new(workers);
        workers.watch();
        let stages = Arc::new(Stages {
            embedding: Arc::clone(&model.embedding),
            head: Arc::clone(&model.head),
            tokenizer: model.tokenizer.clone(),
            d_model: model.config.d_model,
            dtype: wire_dtype,
        });
        let cost = RowCost::of(&model.config);
        let (closing, closed) = watch::channel(false);
        let (inbox, scheduler) = scheduler::spawn(
            model.id.as_str().into(),
            Arc::clone(&workers),
            stages,
            scheduling,
            cost,
            closed,
        );
        Ok(Self {
            model,
            workers,
            wire_dtype,
            scheduling,
            inbox,
            scheduler: Mutex::new(Some(scheduler)),
            closing,
            sessions_started: AtomicU64::new(0),
            running: Arc::default(),
        })
    }

    pub fn model(&self) -> &CoordinatorModel {
        &self.model
    }

    /// The plan in force now.
    pub fn plan(&self) -> Plan {
        self.workers.current().plan.clone()
    }

    pub fn wire_dtype(&self) -> WireDType {
        self.wire_dtype
    }

    pub fn scheduling(&self) -> Scheduling {
        self.scheduling
    }

    /// The workers in plan order, as they reported themselves, with their ranges.
    pub fn workers(&self) -> Vec<(WorkerSummary, LayerRange)> {
        self.workers
            .current()
            .workers
            .iter()
            .map(|w| (w.summary.clone(), w.range))
            .collect()
    }

    /// Asks every worker for its state now; in plan order, with its URL and range.
    pub async fn worker_status(&self) -> Vec<(String, LayerRange, Result<pb::InfoResponse>)> {
        self.workers.status().await
    }

    /// A fresh session id: unique within this coordinator (a counter) and across coordinators
    /// sharing workers (a random part).
    pub fn new_session_id(&self) -> String {
        let n = self.sessions_started.fetch_add(1, Ordering::Relaxed);
        format!("s{n}-{:016x}", rand::random::<u64>())
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
        self.run(decoding, Instant::now(), on_delta).await
    }

    /// Runs a generation set up by [`Cluster::decoding`] for a request that arrived at
    /// `received`, among every other generation in flight. The session is ended on every worker
    /// whatever happens: before the result comes back, or, if this future is dropped part-way
    /// (its caller gone), at the scheduler's next look at it.
    pub async fn run(
        &self,
        decoding: Decoding,
        received: Instant,
        mut on_delta: impl FnMut(Delta) -> ControlFlow<()> + Send,
    ) -> Result<Generation> {
        if *self.closing.borrow() {
            return Err(Error::ModelRemoved(self.model.id.clone()));
        }
        let _running = Running::begin(&self.running);
        let (events, mut next) = mpsc::unbounded_channel();
        let id = self.new_session_id();
        debug!(session = %id, prompt_tokens = decoding.prompt().len(), "generation started");
        let session = Session::new(id, decoding, events, received);
        self.inbox.send(session).map_err(|_| Error::ShuttingDown)?;
        while let Some(event) = next.recv().await {
            match event {
                SessionEvent::Delta(delta) => {
                    if on_delta(delta).is_break() {
                        return Err(Error::Stopped);
                    }
                }
                SessionEvent::Done(generation) => return Ok(*generation),
                SessionEvent::Failed(error) => return Err(error),
            }
        }
        Err(Error::Internal(
            "the scheduler dropped the generation".to_string(),
        ))
    }

    /// Stops taking generations and waits until those in flight have ended.
    pub async fn shutdown(self) {
        let Self {
            inbox, scheduler, ..
        } = self;
        drop(inbox);
        let scheduler = scheduler
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(scheduler) = scheduler {
            if let Err(e) = scheduler.await {
                info!(error = %e, "the scheduler did not finish cleanly");
            }
        }
    }

    /// Stops serving the model: every generation of it ends with [`Error::ModelRemoved`] (those
    /// in a step as soon as it returns), then every worker drops the model's shard. Returns how
    /// many generations were running.
    pub async fn close(&self) -> usize {
        let running = self.running.load(Ordering::Relaxed);
        let _ = self.closing.send(true);
        let scheduler = self
            .scheduler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(scheduler) = scheduler {
            if let Err(e) = scheduler.await {
                info!(error = %e, "the scheduler did not finish cleanly");
            }
        }
        self.workers.release().await;
        running
    }
}

/// Holds a generation in the count of those running, however it ends.
struct Running(Arc<AtomicUsize>);

impl Running {
    fn begin(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
