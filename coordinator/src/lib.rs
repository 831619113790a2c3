//! Realm's coordinator: holds a model's tokenizer, embeddings and head, plans which worker runs
//! which layers ([`plan`]), batches the steps of every live generation through the workers
//! ([`cluster`], [`scheduler`]) and serves the client API ([`service`], and the OpenAI-compatible
//! HTTP API in [`http`]). [`LocalModel`] runs every block in this process instead: the
//! single-process mode, and the oracle the distributed output must equal.
#![forbid(unsafe_code)]

pub mod admission;
mod batch;
pub mod bench;
pub mod cluster;
mod delivery;
pub mod error;
pub mod generation;
pub mod http;
pub mod load;
pub mod local;
pub mod model;
pub mod models;
pub mod net;
pub mod plan;
pub mod progress;
pub mod request_id;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod serving;
mod session;
pub mod startup;
mod telemetry;
mod topology;
mod transport;

pub use cluster::Cluster;
pub use error::{Error, Result};
pub use model::CoordinatorModel;
pub use models::Models;
pub use plan::{Plan, PlanSpec};
pub use service::{serve, serve_with, ServiceOptions};

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use realm_common::generate::{generate, Completion, GenerationParams};
use realm_common::gguf::GgufFile;
use realm_common::model::Model;
use realm_common::perplexity::{perplexity, PerplexityReport};
use realm_common::tokenizer::Tokenizer;

/// The model used when none is named: SmolLM2 as fetched by `deploy/fetch-models.sh`.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Opens a GGUF file with an error that says how to get the project models.
pub fn open_model_file(path: &Path) -> anyhow::Result<GgufFile> {
    if !path.exists() {
        bail!(
            "model file {} not found (run deploy/fetch-models.sh to fetch the project models, or pass --model PATH)",
            path.display()
        );
    }
    GgufFile::open(path).with_context(|| format!("cannot load {}", path.display()))
}

/// A model loaded whole in this process, with its tokenizer.
pub struct LocalModel {
    pub file: GgufFile,
    pub model: Model,
    pub tokenizer: Tokenizer,
}

impl LocalModel {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file = open_model_file(path)?;
        let tokenizer = Tokenizer::from_gguf(&file).context("cannot build the tokenizer")?;
        let model = Model::load(&file).context("cannot load the model weights")?;
        Ok(Self {
            file,
            model,
            tokenizer,
        })
    }

    /// Turns a prompt into token ids: as raw text, or (with `chat`) as a user message after an
    /// optional system message, rendered through the model's chat template.
    pub fn prompt_tokens(&self, prompt: &str, chat: Option<&str>) -> anyhow::Result<Vec<u32>> {
        Ok(model::prompt_tokens(
            &self.file,
            &self.tokenizer,
            prompt,
            chat,
        )?)
    }

    /// Generates, writing text to `out` as it becomes final. `chat` is the system message of a
    /// chat (empty for none), or `None` for a raw prompt.
    pub fn complete(
        &self,
        prompt: &str,
        chat: Option<&str>,
        params: &GenerationParams,
        out: &mut impl Write,
    ) -> anyhow::Result<Completion> {
        let tokens = self.prompt_tokens(prompt, chat)?;
        let mut write_error = None;
        let completion = generate(&self.model, &self.tokenizer, tokens, params, |text| {
            if write_error.is_none() {
                if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                    write_error = Some(e);
                }
            }
        })?;
        if let Some(e) = write_error {
            return Err(e).context("cannot write the completion");
        }
        Ok(completion)
    }

    /// Perplexity of the text in `path` over chunks of `ctx` tokens.
    pub fn perplexity(
        &self,
        path: &PathBuf,
        ctx: usize,
        on_chunk: impl FnMut(usize, f64),
    ) -> anyhow::Result<PerplexityReport> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let tokens = self.tokenizer.encode(&text, true, false)?;
        let bos = if self.tokenizer.add_bos() {
            self.tokenizer.bos_id()
        } else {
            None
        };
        Ok(perplexity(&self.model, &tokens, ctx, bos, on_chunk)?)
    }
}

/// Resolves on SIGINT or SIGTERM: when a server should stop taking requests.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!(signal = "SIGINT", "shutting down"),
        _ = terminate => tracing::info!(signal = "SIGTERM", "shutting down"),
    }
}
