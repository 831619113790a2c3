//! The coordinator's metrics: their names, as `/metrics` shows them, and their help texts.

/// Names of the coordinator's metrics, as `/metrics` shows them.
pub mod names {
    /// Generation requests received, by `api` (`grpc`, `completions`, `chat`) and `model`.
    ///
    /// Every series below but the shard ones carries the `model` label too.
    pub const REQUESTS: &str = "realm_requests_total";
    /// Generation requests refused or failed, by `api`.
    pub const REQUEST_ERRORS: &str = "realm_request_errors_total";
    /// Generations running now.
    pub const ACTIVE_SESSIONS: &str = "realm_active_sessions";
    /// Prompt tokens of the generations started.
    pub const PROMPT_TOKENS: &str = "realm_prompt_tokens_total";
    /// Tokens generated (the end-of-generation token included, as in `usage`).
    pub const GENERATED_TOKENS: &str = "realm_generated_tokens_total";
    /// From receiving a request to its first token.
    pub const TIME_TO_FIRST_TOKEN: &str = "realm_time_to_first_token_seconds";
    /// Between consecutive tokens of a generation.
    pub const INTER_TOKEN: &str = "realm_inter_token_seconds";
    /// One worker's part of one step as the coordinator sees it (round trip), by `worker` and
    /// `model`.
    pub const WORKER_FORWARD: &str = "realm_worker_forward_seconds";
    /// Rows of one step (micro-batch): decode rows and prompt chunks of all its sessions.
    pub const STEP_ROWS: &str = "realm_step_rows";
    /// Sessions in one step (micro-batch).
    pub const STEP_SESSIONS: &str = "realm_step_sessions";
    /// From receiving a request to its first step: admission and the scheduler's queue.
    pub const QUEUE_WAIT: &str = "realm_queue_wait_seconds";
    /// Bytes of shard tensors sent to workers without the model file, by `worker`.
    pub const SHARD_BYTES_SENT: &str = "realm_shard_bytes_sent_total";
    /// Shard assignments, by `worker` and `source`: `file` (the worker's model file), `cache`
    /// (its shard cache, nothing sent) or `delivered` (tensors sent first).
    pub const SHARD_ASSIGNMENTS: &str = "realm_shard_assignments_total";
    /// Time to deliver a shard's wanted tensors to a worker.
    pub const SHARD_DELIVERY: &str = "realm_shard_delivery_seconds";
}

/// Gives the metrics their help text (shown by `/metrics`).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(names::REQUESTS, "Generation requests received, by API");
    describe_counter!(
        names::REQUEST_ERRORS,
        "Generation requests refused or failed, by API"
    );
    describe_gauge!(names::ACTIVE_SESSIONS, "Generations running now");
    describe_counter!(
        names::PROMPT_TOKENS,
        "Prompt tokens of the generations started"
    );
    describe_counter!(names::GENERATED_TOKENS, "Tokens generated");
    describe_histogram!(
        names::TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "From receiving a request to its first token"
    );
    describe_histogram!(
        names::INTER_TOKEN,
        Unit::Seconds,
        "Between consecutive tokens of a generation"
    );
    describe_histogram!(
        names::STEP_ROWS,
        "Rows of one step: decode rows and prompt chunks of all its sessions"
    );
    describe_histogram!(names::STEP_SESSIONS, "Sessions in one step");
    describe_histogram!(
        names::QUEUE_WAIT,
        Unit::Seconds,
        "From receiving a request to its first step"
    );
    describe_histogram!(
        names::WORKER_FORWARD,
        Unit::Seconds,
        "Round trip of one worker's part of one step, by worker"
    );
    describe_counter!(
        names::SHARD_BYTES_SENT,
        Unit::Bytes,
        "Bytes of shard tensors sent to workers, by worker"
    );
    describe_counter!(
        names::SHARD_ASSIGNMENTS,
        "Shard assignments, by worker and by where the layers came from"
    );
    describe_histogram!(
        names::SHARD_DELIVERY,
        Unit::Seconds,
        "Time to deliver a shard's wanted tensors to a worker"
    );
}

/// Shows the series of a model served from the start, at 0: a scraper sees every series before
/// it moves.
pub fn register_model(model: &str) {
    for api in api::ALL {
        metrics::counter!(names::REQUESTS, "api" => api, "model" => model.to_string()).increment(0);
        metrics::counter!(names::REQUEST_ERRORS, "api" => api, "model" => model.to_string())
            .increment(0);
    }
    metrics::counter!(names::PROMPT_TOKENS, "model" => model.to_string()).increment(0);
    metrics::counter!(names::GENERATED_TOKENS, "model" => model.to_string()).increment(0);
    metrics::gauge!(names::ACTIVE_SESSIONS, "model" => model.to_string()).increment(0.0);
}

/// The `api` label's values: the gRPC API and the HTTP API's two generation endpoints.
pub mod api {
    pub const GRPC: &str = "grpc";
    pub const COMPLETIONS: &str = "completions";
    pub const CHAT: &str = "chat";
    pub const ALL: [&str; 3] = [GRPC, COMPLETIONS, CHAT];
}
