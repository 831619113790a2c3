//! Request ids: one per client request, created here (or taken from the client's `x-request-id`),
//! sent with every worker call (as gRPC metadata `x-request-id`, or in the step message on a step
//! stream, which serves many requests), and recorded as the `request_id` field of a `request`
//! span on every process, so each log line about a request carries it.
//!
//! The id of the request being served lives in a task-local, set around the generation's task,
//! so the cluster code tags its worker calls without the id threaded through every signature.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tracing::Span;

/// The HTTP header and gRPC metadata key that carries a request id.
pub const HEADER: &str = "x-request-id";

/// Longest request id accepted from a client; longer ones are replaced by a fresh id.
const MAX_LEN: usize = 128;

tokio::task_local! {
    static CURRENT: RequestId;
}

/// One request's id: printable ASCII, at most [`MAX_LEN`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(Arc<str>);

impl RequestId {
    /// A fresh random id (32 hex digits).
    pub fn new() -> Self {
        Self(format!("{:032x}", rand::random::<u128>()).into())
    }

    /// The client's id if it is usable (1 to 128 printable ASCII characters, no spaces), else a
    /// fresh one.
    pub fn from_client(value: Option<&str>) -> Self {
        match value {
            Some(v)
                if !v.is_empty()
                    && v.len() <= MAX_LEN
                    && v.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Self(v.into())
            }
            _ => Self::new(),
        }
    }

    /// The id a gRPC client sent in its metadata, or a fresh one.
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Self {
        Self::from_client(metadata.get(HEADER).and_then(|v| v.to_str().ok()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The span every log line about this request is written in. At ERROR level so that it is
    /// enabled whenever any log line is: a span filtered out would drop the id from the lines
    /// logged inside it.
    pub fn span(&self) -> Span {
        tracing::error_span!("request", request_id = %self)
    }

    /// Runs `f` with this id as the current request's (see [`current`]).
    pub async fn scope<F: Future>(self, f: F) -> F::Output {
        CURRENT.scope(self, f).await
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of the request the current task serves, if any.
pub fn current() -> Option<RequestId> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Wraps a worker call's message, carrying `id` (if any) as `x-request-id` metadata.
pub fn tagged<T>(message: T, id: Option<&RequestId>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = id.and_then(|id| id.as_str().parse().ok()) {
        request.metadata_mut().insert(HEADER, value);
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_when_usable() {
        assert_eq!(RequestId::from_client(Some("abc-123")).as_str(), "abc-123");
        for bad in [None, Some(""), Some("has space"), Some("é")] {
            let id = RequestId::from_client(bad);
            assert_eq!(id.as_str().len(), 32, "{bad:?}");
        }
        let long = "x".repeat(MAX_LEN + 1);
        assert_ne!(RequestId::from_client(Some(&long)).as_str(), long);
        assert_ne!(RequestId::new(), RequestId::new());
    }

    #[test]
    fn worker_calls_carry_the_id() {
        let id = RequestId::from_client(Some("req-7"));
        let request = tagged((), Some(&id));
        assert_eq!(request.metadata().get(HEADER).unwrap(), "req-7");
        assert!(tagged((), None).metadata().get(HEADER).is_none());
    }

    #[tokio::test]
    async fn the_current_id_is_scoped_to_its_task() {
        assert_eq!(current(), None);
        let id = RequestId::from_client(Some("req-8"));
        let seen = id.clone().scope(async { current() }).await;
        assert_eq!(seen, Some(id));
    }
}
