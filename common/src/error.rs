//! The error type of Realm's model core. Every failure a file, a prompt or a caller can cause is a
//! variant here, so callers can map it to a precise message (and, in the services, a gRPC status).

use std::path::PathBuf;

/// Everything that can go wrong in the model core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The GGUF file is structurally invalid: the message names the offset and the field.
    #[error("malformed GGUF: {0}")]
    Gguf(String),
    #[error("GGUF metadata key `{key}`: {problem}")]
    Metadata { key: String, problem: String },
    #[error("tensor `{0}` not found in the model file")]
    MissingTensor(String),
    #[error("tensor `{name}`: {problem}")]
    Tensor { name: String, problem: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt of {tokens} tokens does not fit the context window of {context} tokens")]
    ContextOverflow { tokens: usize, context: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
