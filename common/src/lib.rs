//! Realm's model core: everything needed to run a GGUF model, shared by the coordinator and the
//! workers. Reading files (`gguf`), weights (`quant`), text (`tokenizer`, `chat`), the forward pass
//! (`model`), per-session state (`kv`) and token choice (`sampling`, `generate`).
#![deny(unsafe_code)]

pub mod auth;
pub mod chat;
pub mod error;
pub mod fuzzing;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod kv;
pub mod logging;
pub mod logprobs;
mod mmap;
pub mod model;
pub mod perplexity;
pub mod quant;
pub mod runtime;
pub mod sampling;
pub mod shard;
pub mod stop;
pub mod synthetic;
pub mod tls;
pub mod tokenizer;
pub mod transfer;
pub mod wire;

pub use error::{Error, Result};
