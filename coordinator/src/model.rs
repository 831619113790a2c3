//! The coordinator's share of a model in cluster mode: tokenizer, chat template, embeddings and
//! head, but none of the transformer blocks (the workers hold those). Also how a prompt becomes
//! token ids, shared with the single-process path so both see the same tokens.

use std::path::Path;
use std::sync::Arc;

use realm_common::chat::{ChatMessage, ChatTemplate};
use realm_common::gguf::GgufFile;
use realm_common::model::{Embedding, Head, ModelConfig};
use realm_common::tokenizer::Tokenizer;
use realm_common::wire::ModelIdentity;

use crate::open_model_file;

/// Turns a prompt into token ids: as raw text, or (with `chat`) as a user message after an
/// optional system message (`chat` is that message; empty for none), rendered through the
/// model's chat template.
pub fn prompt_tokens(
    file: &GgufFile,
    tokenizer: &Tokenizer,
    prompt: &str,
    chat: Option<&str>,
) -> realm_common::Result<Vec<u32>> {
    let Some(system) = chat else {
        return tokenizer.encode(prompt, true, true);
    };
    let mut messages = Vec::new();
    if !system.is_empty() {
        messages.push(ChatMessage::system(system));
    }
    messages.push(ChatMessage::user(prompt));
    chat_tokens(file, tokenizer, &messages)
}

/// Token ids of a conversation rendered through the model's chat template, ready for the
/// assistant's reply.
pub fn chat_tokens(
    file: &GgufFile,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
) -> realm_common::Result<Vec<u32>> {
    let text_of = |id: Option<u32>| {
        id.and_then(|id| tokenizer.token_text(id))
            .unwrap_or_default()
            .to_string()
    };
    let template = ChatTemplate::from_gguf(
        file,
        &text_of(tokenizer.bos_id()),
        &text_of(tokenizer.eos_id()),
    )?;
    let rendered = template.render(messages, true)?;
    let add_special = !template.starts_with_bos(&rendered);
    tokenizer.encode(&rendered, add_special, true)
}

/// What the coordinator loads of a model: everything but the blocks.
#[derive(Debug, Clone)]
pub struct CoordinatorModel {
    /// The name clients pass as `model`: the file's stem.
    pub id: String,
    pub file: GgufFile,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub identity: ModelIdentity,
    /// Shared with blocking threads, which run the embedding and head off the async runtime.
    pub embedding: Arc<Embedding>,
    pub head: Arc<Head>,
}

impl CoordinatorModel {
    /// Loads the tokenizer, embeddings and head of the GGUF file at `path` (on the CPU).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let file = open_model_file(path)?;
        let config = ModelConfig::from_gguf(&file)
            .with_context(|| format!("cannot read the model in {}", path.display()))?;
        let tokenizer = Tokenizer::from_gguf(&file).context("cannot build the tokenizer")?;
        let embedding = Embedding::load(&file, &config).context("cannot load the embeddings")?;
        let head = Head::load(&file, &config).context("cannot load the output head")?;
        Ok(Self {
            id: model_id(path),
            identity: ModelIdentity::of(&file, &config),
            embedding: Arc::new(embedding),
            head: Arc::new(head),
            file,
            config,
            tokenizer,
        })
    }

    /// Token ids of a prompt; see [`prompt_tokens`].
    pub fn prompt_tokens(
        &self,
        prompt: &str,
        chat: Option<&str>,
    ) -> realm_common::Result<Vec<u32>> {
        prompt_tokens(&self.file, &self.tokenizer, prompt, chat)
    }

    /// Token ids of a conversation; see [`chat_tokens`].
    pub fn chat_tokens(&self, messages: &[ChatMessage]) -> realm_common::Result<Vec<u32>> {
        chat_tokens(&self.file, &self.tokenizer, messages)
    }
}

/// A model's id: its file name without the `.gguf` extension.
pub fn model_id(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_id_is_the_file_stem() {
        assert_eq!(
            model_id(Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "SmolLM2-135M-Instruct.Q4_1"
        );
        assert_eq!(model_id(Path::new("/m/gemma.gguf")), "gemma");
    }
}
