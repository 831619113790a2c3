//! Admission control for generations: at most `max_active` run at once and at most `max_queued`
//! wait for a slot; a request beyond both is refused at once with RESOURCE_EXHAUSTED, so a burst
//! of clients costs a bounded amount of memory and every accepted request is served.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

/// Generations running at once when not configured.
pub const DEFAULT_MAX_ACTIVE: usize = 16;
/// Generations waiting for a slot when not configured.
pub const DEFAULT_MAX_QUEUED: usize = 64;

/// The slots of running generations and the bounded queue in front of them.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    max_active: usize,
    max_queued: usize,
}

/// A running generation's slot, given back when dropped.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Admission {
    pub fn new(max_active: usize, max_queued: usize) -> Self {
        let max_active = max_active.max(1);
        Self {
            slots: Arc::new(Semaphore::new(max_active)),
            queued: AtomicUsize::new(0),
            max_active,
            max_queued,
        }
    }

    /// A slot now, or after waiting in the queue; refused when the queue is full.
    pub async fn admit(&self) -> Result<Slot> {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(Slot(permit));
        }
        let waiting = self.queued.fetch_add(1, Ordering::AcqRel);
        let _in_queue = Dequeue(&self.queued);
        if waiting >= self.max_queued {
            return Err(Error::Busy(format!(
                "{} generations running and {} waiting (the limits); retry later",
                self.max_active, self.max_queued
            )));
        }
        Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map(Slot)
            .map_err(|_| Error::ShuttingDown)
    }

    /// Generations waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// Leaves the queue however the wait ends (admitted, refused, or the client gone).
struct Dequeue<'a>(&'a AtomicUsize);

impl Drop for Dequeue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn beyond_the_slots_and_the_queue_requests_are_refused_at_once() {
        let admission = Arc::new(Admission::new(1, 1));
        let first = admission.admit().await.unwrap();
        let waiting = tokio::spawn({
            let a = Arc::clone(&admission);
            async move { a.admit().await.map(|_| ()) }
        });
        while admission.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = tonic::Status::from(admission.admit().await.unwrap_err());
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("server busy"), "{refused:?}");
        drop(first);
        assert!(waiting.await.unwrap().is_ok());
        assert_eq!(admission.queued(), 0);
        // The slot is free again.
        assert!(admission.admit().await.is_ok());
    }
}
