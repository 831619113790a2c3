//! Realm's coordinator: loads a model's tokenizer, embeddings and head and drives generation.
//! Today it runs every block in-process; the cluster subcommands build on the same pieces.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use realm_common::chat::{ChatMessage, ChatTemplate};
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
        let model = Model::load(&file, &Device::Cpu).context("cannot load the model weights")?;
        Ok(Self {
            file,
            model,
            tokenizer,
        })
    }

    /// Turns a prompt into token ids: as raw text, or (with `chat`) as a user message after an
    /// optional system message, rendered through the model's chat template.
    pub fn prompt_tokens(&self, prompt: &str, chat: Option<&str>) -> anyhow::Result<Vec<u32>> {
        let Some(system) = chat else {
            return Ok(self.tokenizer.encode(prompt, true, true)?);
        };
        let text_of = |id: Option<u32>| {
            id.and_then(|id| self.tokenizer.token_text(id))
                .unwrap_or_default()
                .to_string()
        };
        let template = ChatTemplate::from_gguf(
            &self.file,
            &text_of(self.tokenizer.bos_id()),
            &text_of(self.tokenizer.eos_id()),
        )?;
        let mut messages = Vec::new();
        if !system.is_empty() {
            messages.push(ChatMessage::system(system));
        }
        messages.push(ChatMessage::user(prompt));
        let rendered = template.render(&messages, true)?;
        let add_special = !template.starts_with_bos(&rendered);
        Ok(self.tokenizer.encode(&rendered, add_special, true)?)
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
