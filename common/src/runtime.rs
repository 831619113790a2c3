//! Running CPU-heavy model code from async handlers.
//!
//! A decode step takes a few milliseconds; handing it to another thread and back cost a worker
//! hop some 70–110 µs more on the project's VM, where an idle virtual CPU halts and every
//! thread woken costs an interrupt and a hypervisor exit. So steps of at most
//! [`INLINE_TOKENS`] tokens stay with the async thread that received them: run right
//! there ([`inline`]), or, when their work is parallel and never waits for another step, as one
//! job of the compute pool that the async thread waits for ([`pooled`]). Only longer steps
//! (prefills, which may take seconds) are moved off it ([`compute`]), so that the thread's other
//! tasks (health checks, other sessions) go on meanwhile.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Steps of at most this many tokens (every decode step) stay with the async thread: it runs
/// them or waits for them.
pub const INLINE_TOKENS: usize = 16;

/// Runs `f` here, on the calling (async) thread; a panic in `f` comes back as an error.
pub fn inline<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| "the computation panicked".to_string())
}

/// Runs `f` as one job on the compute threads (rayon's pool) and sleeps until it is done, or
/// runs it here when this is one of those threads. A panic in `f` comes back as an error.
///
/// The waiting thread is woken once, by the job's last act. Waiting inside rayon instead (a
/// `rayon::scope` or a parallel loop entered from outside the pool) wakes it under a lock the
/// waker still holds, so it wakes, blocks on that lock and is woken again (10–15 µs a hand-over
/// on the project's VM), and work that runs several parallel loops from outside the pool hands
/// over once per loop. `f` must never wait for another step: it may run under one on a pool
/// thread's stack.
pub fn pooled<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    if rayon::current_thread_index().is_some() {
        return inline(f);
    }
    let (done, result) = std::sync::mpsc::sync_channel(1);
    rayon::spawn(move || {
        // The receiver waits until this is sent; nothing else can close it.
        let _ = done.send(catch_unwind(AssertUnwindSafe(f)));
    });
    match result.recv() {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err("the computation panicked".to_string()),
        Err(_) => Err("the computation was dropped unfinished".to_string()),
    }
}

/// A step over `tokens` tokens: up to [`INLINE_TOKENS`], [`pooled`] when `parallel` (its work
/// never waits for another step's), else [`inline`]; longer ones [`compute`].
pub async fn step<T: Send + 'static>(
    tokens: usize,
    parallel: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if tokens > INLINE_TOKENS {
        compute(f).await
    } else if parallel {
        pooled(f)
    } else {
        inline(f)
    }
}

/// Runs `f` to completion off the async tasks' way. On a multi-threaded runtime it runs right
/// on this thread, which first hands its other tasks to the runtime's other threads: a step
/// costs no wake-up of a blocking-pool thread and none back. On any other runtime it goes to
/// the blocking pool. A panic in `f` comes back as an error, on either path.
pub async fn compute<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        catch_unwind(AssertUnwindSafe(|| tokio::task::block_in_place(f)))
            .map_err(|_| "the computation panicked".to_string())
    } else {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::compute;

    async fn both_outcomes() {
        assert_eq!(compute(|| 6 * 7).await, Ok(42));
        let panicked = compute(|| -> u32 { panic!("model code failed") }).await;
        assert!(panicked.is_err(), "{panicked:?}");
        // The runtime still runs work afterwards.
        assert_eq!(compute(|| 1).await, Ok(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_is_an_error_in_place() {
        both_outcomes().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_is_an_error_on_the_blocking_pool() {
        both_outcomes().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn short_steps_run_in_place_and_long_ones_move_off() {
        let here = std::thread::current().id();
        let short = super::step(super::INLINE_TOKENS, false, std::thread::current).await;
        assert_eq!(short.map(|t| t.id()), Ok(here));
        let panicked = super::step(1, false, || -> u32 { panic!("model code failed") }).await;
        assert!(panicked.is_err(), "{panicked:?}");
        // A long step still runs (on this thread, which hands its async work to another).
        assert_eq!(
            super::step(super::INLINE_TOKENS + 1, false, || 7).await,
            Ok(7)
        );
    }

    #[test]
    fn a_pooled_job_runs_on_the_compute_threads() {
        let on_pool = super::pooled(rayon::current_thread_index);
        assert!(matches!(on_pool, Ok(Some(_))), "{on_pool:?}");
        let panicked = super::pooled(|| -> u32 { panic!("model code failed") });
        assert_eq!(panicked, Err("the computation panicked".to_string()));
        // From a compute thread it runs right there, not queued behind itself.
        let nested = rayon::scope(|_| {
            let here = rayon::current_thread_index();
            super::pooled(rayon::current_thread_index).map(|inner| inner == here)
        });
        assert_eq!(nested, Ok(true));
    }
}
