//! Bringing a cluster up when the workers start alongside the coordinator (compose, Kubernetes):
//! the coordinator waits for workers that are not reachable yet, with a bounded backoff and a log
//! line per attempt, instead of failing at once.

use std::time::Duration;

use realm_common::wire::WireDType;
use tokio::time::Instant;
use tracing::warn;

use crate::cluster::ClusterOptions;
use crate::scheduler::Scheduling;
use crate::{Cluster, CoordinatorModel, Error, PlanSpec, Result};

/// First pause between attempts; each failed attempt doubles it up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// [`Cluster::connect`], retried while a worker is unreachable, for at most `wait` in all.
///
/// Only [`Error::Unreachable`] is retried (a worker not listening yet, a name not resolving yet,
/// a handshake that gets no answer yet); a worker that answers and refuses, or a bad plan, fails
/// at once. With a zero `wait` this is one attempt.
pub async fn connect_when_ready(
    model: CoordinatorModel,
    worker_urls: &[String],
    plan: &PlanSpec,
    wire_dtype: WireDType,
    options: ClusterOptions,
    scheduling: Scheduling,
    wait: Duration,
) -> Result<Cluster> {
    let deadline = Instant::now() + wait;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let attempt = Cluster::connect_with(
            model.clone(),
            worker_urls,
            plan,
            wire_dtype,
            options.clone(),
            scheduling,
        );
        match attempt.await {
            Err(e @ Error::Unreachable { .. }) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(e);
                }
                let pause = backoff.min(left);
                warn!(
                    error = %e,
                    retry_in_ms = pause.as_millis() as u64,
                    gives_up_in_s = left.as_secs(),
                    "waiting for the workers to come up"
                );
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            other => return other,
        }
    }
}
