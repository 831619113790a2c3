//! Running CPU-heavy model code from async handlers.

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
}
