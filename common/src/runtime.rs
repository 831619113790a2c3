//! Running CPU-heavy model code from async handlers.
//!
//! A decode step takes a few milliseconds; handing it to another thread and back cost a worker
//! hop some 70–110 µs more on the project's VM, where an idle virtual CPU halts and every
//! thread woken costs an interrupt and a hypervisor exit. So steps of at most
//! [`INLINE_TOKENS`] tokens run right on the async thread that received them ([`inline`]), and
//! only longer ones (prefills, which may take seconds) are moved off it ([`compute`]), so that
//! the thread's other tasks (health checks, other sessions) go on meanwhile.

/// Steps of at most this many tokens (every decode step) run in place on the async thread.
pub const INLINE_TOKENS: usize = 16;

/// Runs `f` here, on the calling (async) thread; a panic in `f` comes back as an error.
pub fn inline<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| "the computation panicked".to_string())
}

/// A step over `tokens` tokens: [`inline`] up to [`INLINE_TOKENS`], else [`compute`].
pub async fn step<T: Send + 'static>(
    tokens: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if tokens <= INLINE_TOKENS {
        inline(f)
    } else {
        compute(f).await
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
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokio::task::block_in_place(f)
        }))
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
        let short = super::step(super::INLINE_TOKENS, std::thread::current).await;
        assert_eq!(short.map(|t| t.id()), Ok(here));
        let panicked = super::step(1, || -> u32 { panic!("model code failed") }).await;
        assert!(panicked.is_err(), "{panicked:?}");
        // A long step still runs (on this thread, which hands its async work to another).
        assert_eq!(super::step(super::INLINE_TOKENS + 1, || 7).await, Ok(7));
    }
}
