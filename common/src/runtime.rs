//! Running CPU-heavy model code from async handlers.

/// Runs `f` to completion off the async tasks' way. On a multi-threaded runtime it runs right
/// on this thread, which first hands its other tasks to the runtime's other threads: a step
/// costs no wake-up of a blocking-pool thread and none back. On any other runtime it goes to
/// the blocking pool.
pub async fn compute<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if tokio::runtime::Handle::current().runtime_flavor()
        == tokio::runtime::RuntimeFlavor::MultiThread
    {
        Ok(tokio::task::block_in_place(f))
    } else {
        tokio::task::spawn_blocking(f).await
    }
}
