//! The coordinator's error type: everything planning, the worker handshake, a distributed step or
//! a client request can fail with, each naming the worker or the argument at fault, and the one
//! mapping into gRPC statuses for the client service.

use tonic::Code;

/// Everything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model core refused (bad prompt, sampling values, context overflow, model file...).
    #[error(transparent)]
    Model(#[from] realm_common::Error),
    /// A layer plan that does not fit the model or the workers.
    #[error("layer plan: {0}")]
    Plan(String),
    /// A worker address that cannot be used.
    #[error("worker URL `{url}`: {problem}")]
    WorkerUrl { url: String, problem: String },
    /// A worker that cannot be connected to.
    #[error("cannot reach worker {url}: {problem}")]
    Unreachable { url: String, problem: String },
    /// A worker that answers but cannot serve this coordinator (versions, model, shard).
    #[error("worker {url} refused: {problem}")]
    Refused { url: String, problem: String },
    /// A worker call that failed during generation.
    #[error("worker {url}: {}", describe(status))]
    Worker { url: String, status: tonic::Status },
    /// A worker that answered with a malformed message.
    #[error("worker {url} sent a malformed reply: {problem}")]
    Protocol { url: String, problem: String },
    /// A request for a model this coordinator does not serve; `served` lists those it serves.
    #[error("model `{requested}` is not served here (this coordinator serves {served})")]
    UnknownModel { requested: String, served: String },
    /// A request that names no model, to a coordinator serving several.
    #[error("this coordinator serves several models ({served}): name one in `model`")]
    NoModelNamed { served: String },
    /// A model added while it, or a model of its id, is served; says which.
    #[error("{0}: remove it first")]
    ModelExists(String),
    /// The model of a generation was removed while it ran.
    #[error("model `{0}` was removed from this server")]
    ModelRemoved(String),
    /// A worker was lost and no worker is left to take its layers.
    #[error("no capacity: {0}")]
    NoCapacity(String),
    /// Every generation slot and every queue place is taken.
    #[error("server busy: {0}")]
    Busy(String),
    /// The server is shutting down and takes no new generations.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The consumer of a generation asked it to stop (a client went away).
    #[error("generation stopped: its consumer went away")]
    Stopped,
    /// Work moved to a blocking thread panicked or was cancelled.
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether a step failed because of a worker (gone, restarted, re-planned under it), so the
    /// step is worth retrying on live workers. Refusals that retrying cannot cure are not, nor is
    /// a step whose output the wire's element type cannot carry (`OutOfRange`: an f16 wire and
    /// activations past its range), which would fail the same way on any worker.
    pub fn is_worker_failure(&self) -> bool {
        match self {
            Error::Worker { status, .. } => !matches!(
                status.code(),
                Code::ResourceExhausted
                    | Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::OutOfRange
            ),
            Error::Unreachable { .. } | Error::Protocol { .. } => true,
            _ => false,
        }
    }
}

impl Error {
    /// The same error for another of the sessions it ended, when one failure ends several (a
    /// micro-batch's step). The model core's errors carry what cannot be copied (I/O and tensor
    /// errors) and come through as their message.
    pub fn duplicate(&self) -> Error {
        let s = |v: &String| v.clone();
        match self {
            Error::Model(e) => match e {
                realm_common::Error::InvalidArgument(m) => {
                    Error::Model(realm_common::Error::InvalidArgument(s(m)))
                }
                realm_common::Error::ContextOverflow { tokens, context } => {
                    Error::Model(realm_common::Error::ContextOverflow {
                        tokens: *tokens,
                        context: *context,
                    })
                }
                other => Error::Internal(other.to_string()),
            },
            Error::Plan(m) => Error::Plan(s(m)),
            Error::WorkerUrl { url, problem } => Error::WorkerUrl {
                url: s(url),
                problem: s(problem),
            },
            Error::Unreachable { url, problem } => Error::Unreachable {
                url: s(url),
                problem: s(problem),
            },
            Error::Refused { url, problem } => Error::Refused {
                url: s(url),
                problem: s(problem),
            },
            Error::Worker { url, status } => Error::Worker {
                url: s(url),
                status: status.clone(),
            },
            Error::Protocol { url, problem } => Error::Protocol {
                url: s(url),
                problem: s(problem),
            },
            Error::UnknownModel { requested, served } => Error::UnknownModel {
                requested: s(requested),
                served: s(served),
            },
            Error::NoModelNamed { served } => Error::NoModelNamed { served: s(served) },
            Error::ModelExists(m) => Error::ModelExists(s(m)),
            Error::ModelRemoved(m) => Error::ModelRemoved(s(m)),
            Error::NoCapacity(m) => Error::NoCapacity(s(m)),
            Error::Busy(m) => Error::Busy(s(m)),
            Error::ShuttingDown => Error::ShuttingDown,
            Error::Stopped => Error::Stopped,
            Error::Internal(m) => Error::Internal(s(m)),
        }
    }
}

/// `code: message` of a status, without tonic's metadata and details noise.
pub fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Model(e) => tonic::Status::from(e),
            Error::UnknownModel { .. } => tonic::Status::not_found(message),
            Error::NoModelNamed { .. } => tonic::Status::invalid_argument(message),
            Error::ModelExists(_) => tonic::Status::already_exists(message),
            Error::ModelRemoved(_) => tonic::Status::unavailable(message),
            // A worker that is down, overloaded or slow is the cluster's availability problem;
            // anything else a worker refuses in a step Realm built is a bug on one side.
            Error::Worker { status, .. } => match status.code() {
                Code::Unavailable | Code::Cancelled => tonic::Status::unavailable(message),
                Code::ResourceExhausted => tonic::Status::resource_exhausted(message),
                Code::DeadlineExceeded => tonic::Status::deadline_exceeded(message),
                _ => tonic::Status::internal(message),
            },
            Error::Unreachable { .. } | Error::NoCapacity(_) | Error::ShuttingDown => {
                tonic::Status::unavailable(message)
            }
            Error::Busy(_) => tonic::Status::resource_exhausted(message),
            Error::Plan(_) | Error::WorkerUrl { .. } | Error::Refused { .. } => {
                tonic::Status::failed_precondition(message)
            }
            Error::Stopped => tonic::Status::cancelled(message),
            Error::Protocol { .. } | Error::Internal(_) => tonic::Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(code: Code) -> Error {
        Error::Worker {
            url: "http://127.0.0.1:1".to_string(),
            status: tonic::Status::new(code, "step"),
        }
    }

    #[test]
    fn steps_a_retry_cannot_cure_are_not_worker_failures() {
        for code in [
            Code::Unavailable,
            Code::Internal,
            Code::DeadlineExceeded,
            Code::Unknown,
        ] {
            assert!(worker(code).is_worker_failure(), "{code:?}");
        }
        for code in [
            Code::OutOfRange,
            Code::ResourceExhausted,
            Code::Unauthenticated,
            Code::PermissionDenied,
        ] {
            assert!(!worker(code).is_worker_failure(), "{code:?}");
        }
    }
}
