//! Chat templates: turning a list of messages into the prompt text a model was trained on.
//!
//! A GGUF model usually carries its Hugging Face Jinja template under `tokenizer.chat_template`;
//! Realm renders it with minijinja, configured like the `transformers` renderer (`trim_blocks`,
//! `lstrip_blocks`, Python string methods such as `.strip()` through minijinja-contrib's
//! pycompat, and a `raise_exception` function). The variables are `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`.
//!
//! A model without a template gets a built-in one chosen by `general.architecture`: Gemma's turn
//! format for `gemma3` and `gemma2`, ChatML for a model whose vocabulary has the ChatML markers,
//! and otherwise an error, because guessing a format the model never saw produces fluent
//! nonsense.
//!
//! Templates that begin with `{{ bos_token }}` put the BOS text into the rendered prompt. A caller
//! that encodes such a prompt must not add a second BOS: see [`ChatTemplate::starts_with_bos`].

use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

pub const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
pub const KEY_ARCHITECTURE: &str = "general.architecture";
/// The system message Realm's chat mode sends when the caller gives none. Some templates insert a
/// long default of their own when there is no system message, which derails small models (SmolLM2
/// answers "What is the capital of France?" with nonsense under its template's default).
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful assistant.";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";

const TEMPLATE_NAME: &str = "chat";

const CHATML_START: &str = "<|im_start|>";
const CHATML_END: &str = "<|im_end|>";

/// ChatML, for models that know its markers but ship no template.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages -%}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}";

/// Gemma 3's official template, restricted to text content: a system message becomes a prefix of
/// the first user turn, `assistant` is called `model`, and roles must alternate.
pub const GEMMA3_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"#;

/// One message of a conversation. `role` is usually `system`, `user` or `assistant`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Where a [`ChatTemplate`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// The model's own `tokenizer.chat_template`.
    Model,
    /// Realm's built-in template for Gemma 3.
    Gemma3,
    /// Realm's built-in ChatML template.
    ChatMl,
    /// Given by the caller through [`ChatTemplate::new`].
    Custom,
}

/// A compiled chat template with the special-token texts it renders with.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: TemplateOrigin,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("source_len", &self.source.len())
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the *texts* of those tokens (`<s>`,
    /// `<bos>`, ...), exposed to the template as `bos_token` and `eos_token`.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        Self::compile(
            source.into(),
            TemplateOrigin::Custom,
            bos_token.into(),
            eos_token.into(),
        )
    }

    /// The template of `file`: its `tokenizer.chat_template`, or else a built-in one for its
    /// architecture (see the module documentation). Errors if neither applies, or if the template
    /// does not compile.
    pub fn from_gguf(file: &GgufFile, bos_token: &str, eos_token: &str) -> Result<Self> {
        let (source, origin) = if file.get(KEY_CHAT_TEMPLATE).is_some() {
            (
                file.get_str(KEY_CHAT_TEMPLATE)?.to_string(),
                TemplateOrigin::Model,
            )
        } else {
            let arch = file.get_str(KEY_ARCHITECTURE).unwrap_or("unknown");
            if arch == "gemma3" || arch == "gemma2" {
                (GEMMA3_TEMPLATE.to_string(), TemplateOrigin::Gemma3)
            } else if has_chatml_markers(file) {
                (CHATML_TEMPLATE.to_string(), TemplateOrigin::ChatMl)
            } else {
                return Err(Error::Template(format!(
                    "{}: the model has no chat template (no `{KEY_CHAT_TEMPLATE}`, and Realm has \
                     no built-in template for architecture `{arch}`); use a raw prompt instead",
                    file.path().display()
                )));
            }
        };
        Self::compile(source, origin, bos_token.to_string(), eos_token.to_string())
    }

    fn compile(
        source: String,
        origin: TemplateOrigin,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self> {
        let mut env = Environment::new();
        // As `transformers` renders chat templates.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(template_error)?;
        Ok(Self {
            env,
            source,
            origin,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages`; with `add_generation_prompt`, ends with the header of an assistant turn
    /// so the model answers next. Errors raised by the template (`raise_exception`, a missing
    /// variable used wrongly) come back as [`Error::Template`].
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::Template("no messages to render".to_string()));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(template_error)
    }

    /// Whether `rendered` already begins with the BOS text. When it does, encode it without
    /// adding special tokens (the tokenizer turns the BOS text into the BOS token), or the model
    /// sees two BOS tokens.
    pub fn starts_with_bos(&self, rendered: &str) -> bool {
        !self.bos_token.is_empty() && rendered.starts_with(&self.bos_token)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn origin(&self) -> TemplateOrigin {
        self.origin
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// `raise_exception(message)`, as Hugging Face templates call it to reject a conversation.
fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// The error with its causes, without the source excerpt minijinja's alternate form adds.
fn template_error(err: minijinja::Error) -> Error {
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    Error::Template(message)
}

fn has_chatml_markers(file: &GgufFile) -> bool {
    let Ok(tokens) = file.get_array(KEY_TOKENS) else {
        return false;
    };
    let has = |marker: &str| tokens.iter().any(|t| t.as_str() == Some(marker));
    has(CHATML_START) && has(CHATML_END)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
    const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

    fn model(name: &str) -> GgufFile {
        let dir = std::env::var_os("REALM_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"));
        let path = dir.join(name);
        assert!(
            path.exists(),
            "{} is missing: run deploy/fetch-models.sh",
            path.display()
        );
        GgufFile::open(&path).expect("model opens")
    }

    fn question() -> Vec<ChatMessage> {
        vec![ChatMessage::user("What is the capital of France?")]
    }

    #[test]
    fn smollm2_renders_its_own_template() {
        let file = model(SMOLLM2);
        let t = ChatTemplate::from_gguf(&file, "<|im_start|>", "<|im_end|>").unwrap();
        assert_eq!(t.origin(), TemplateOrigin::Model);
        // The model's template injects this system prompt when the first message is not a system
        // message; checking the source keeps the expectation honest.
        assert!(t.source().contains(
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        ));
        let rendered = t.render(&question(), true).unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
             <|im_start|>assistant\n"
        );

        // Without the generation prompt the assistant header is absent.
        let rendered = t.render(&question(), false).unwrap();
        assert!(rendered.ends_with("What is the capital of France?<|im_end|>\n"));

        // A caller's system message replaces the default one.
        let messages = [
            ChatMessage::system("Be brief."),
            ChatMessage::user("Hi"),
            ChatMessage::assistant("Hello."),
            ChatMessage::user("Bye"),
        ];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn gemma3_model_gets_the_builtin_template() {
        let file = model(GEMMA3);
        assert!(file.get(KEY_CHAT_TEMPLATE).is_none());
        let t = ChatTemplate::from_gguf(&file, "<bos>", "<eos>").unwrap();
        assert_eq!(t.origin(), TemplateOrigin::Gemma3);
        let rendered = t.render(&question(), true).unwrap();
        assert_eq!(
            rendered,
            "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n\
             <start_of_turn>model\n"
        );
        assert!(t.starts_with_bos(&rendered));
    }

    #[test]
    fn gemma3_folds_the_system_message_into_the_first_user_turn() {
        let t = ChatTemplate::new(GEMMA3_TEMPLATE, "<bos>", "<eos>").unwrap();
        let messages = [
            ChatMessage::system("Answer in French."),
            ChatMessage::user("  Hello  "),
            ChatMessage::assistant("Bonjour."),
            ChatMessage::user("Thanks"),
        ];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<bos><start_of_turn>user\nAnswer in French.\n\nHello<end_of_turn>\n\
             <start_of_turn>model\nBonjour.<end_of_turn>\n\
             <start_of_turn>user\nThanks<end_of_turn>\n\
             <start_of_turn>model\n"
        );
    }

    #[test]
    fn gemma3_rejects_roles_that_do_not_alternate() {
        let t = ChatTemplate::new(GEMMA3_TEMPLATE, "<bos>", "<eos>").unwrap();
        let messages = [ChatMessage::user("a"), ChatMessage::user("b")];
        match t.render(&messages, true) {
            Err(Error::Template(msg)) => assert!(msg.contains("must alternate"), "{msg}"),
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn chatml_builtin() {
        let t = ChatTemplate::new(CHATML_TEMPLATE, "", "<|im_end|>").unwrap();
        let messages = [ChatMessage::system("S"), ChatMessage::user("U")];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert!(!t.starts_with_bos("<|im_start|>system"));
    }

    #[test]
    fn python_string_methods_and_special_tokens_work() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m.content.startswith('!') %}\
                      [{{ m.content.strip('!').upper() }}]{% else %}{{ m.content.strip() }}\
                      {% endif %}{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        let messages = [ChatMessage::user("!loud!"), ChatMessage::user("  quiet ")];
        assert_eq!(t.render(&messages, false).unwrap(), "<s>[LOUD]quiet</s>");
        assert!(t.starts_with_bos("<s>[LOUD]"));
    }

    #[test]
    fn broken_template_is_an_error_not_a_panic() {
        match ChatTemplate::new("{% for m in messages %}{{ m.content", "", "") {
            Err(Error::Template(msg)) => assert!(!msg.is_empty()),
            other => panic!("expected a template error, got {other:?}"),
        }
        // Compiles, fails at render time.
        let t = ChatTemplate::new("{{ messages[0].content + 1 }}", "", "").unwrap();
        assert!(matches!(
            t.render(&question(), true),
            Err(Error::Template(_))
        ));
        assert!(matches!(t.render(&[], true), Err(Error::Template(_))));
    }
}
