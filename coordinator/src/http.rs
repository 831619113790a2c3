//! The OpenAI-compatible HTTP API, served beside the gRPC API by `realm-coordinator serve
//! --http-listen ADDR`: `POST /v1/completions`, `POST /v1/chat/completions` (server-sent events
//! with `"stream": true`, ending in `data: [DONE]`), `GET /v1/models`, `GET /health` and, when a
//! metrics recorder is installed, `GET /metrics` in the Prometheus text format.
//!
//! Requests become the same [`Job`]s the gRPC `Generate` service runs, through the same
//! [`generation`] path; this module only translates. Errors have the OpenAI shape
//! `{"error": {"message", "type", "param", "code"}}`, with the HTTP status the gRPC status of the
//! same error maps to (400 for a bad request, 404 for an unknown model or path, 429 when
//! overloaded, 503 when a worker is unavailable).
//!
//! Sampling follows the OpenAI defaults (`temperature` 1, `top_p` 1); `max_tokens` defaults to
//! Realm's [`DEFAULT_MAX_TOKENS`]. Realm's own `top_k`, `min_p` and `repetition_penalty` are
//! accepted too. Every field of a request is honoured, refused with a 400 that names it, or (a
//! few that change nothing Realm does, like `user`) accepted and ignored: `SHARED_FIELDS`,
//! `COMPLETION_FIELDS` and `CHAT_FIELDS` say which; a field Realm does not know is refused.
//!
//! Log-probabilities (`logprobs`) come in OpenAI's two shapes: the legacy completions' `tokens`,
//! `token_logprobs`, `top_logprobs` and `text_offset` lists, and chat's `content` entries with
//! `bytes`. They cover exactly the tokens whose text is returned (see [`realm_common::logprobs`]);
//! streamed, each chunk carries the entries of the tokens whose text it carries.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use realm_common::auth::{RequireBearer, Secret};
use realm_common::chat::ChatMessage;
use realm_common::generate::{GenerationParams, DEFAULT_MAX_TOKENS};
use realm_common::logprobs::{token_string, TokenLogprob, MAX_TOP_LOGPROBS};
use realm_common::tokenizer::Tokenizer;
use realm_proto::pb;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::Code;
use tracing::{debug, info, Instrument};

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::generation::{self, Done, Event, Job};
use crate::models::{Models, Served};
use crate::request_id::{self, RequestId};
use crate::service::generation_params;

/// Temperature when a request gives none, as in the OpenAI API.
const DEFAULT_TEMPERATURE: f32 = 1.0;

/// The most alternatives `/v1/completions` reports per token (`logprobs`), as OpenAI's legacy
/// completions; chat's `top_logprobs` goes to [`MAX_TOP_LOGPROBS`].
const MAX_COMPLETION_LOGPROBS: usize = 5;

/// What the API logs in place of a log-probability JSON cannot hold (an impossible token's -inf),
/// as OpenAI does for a very unlikely token.
const UNLIKELY_LOGPROB: f64 = -9999.0;

/// Who may use the HTTP API and what `/metrics` renders.
#[derive(Clone)]
pub struct HttpOptions {
    /// API keys accepted as `Authorization: Bearer <key>` on `/v1/*`; empty admits any client.
    pub api_keys: Vec<Secret>,
    /// The Prometheus recorder `/metrics` renders; `None` answers 404 there.
    pub metrics: Option<PrometheusHandle>,
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    models: Arc<Models>,
    metrics: Option<PrometheusHandle>,
}

/// The HTTP API's routes over the `models` served. `/health` and `/metrics` stay open for probes
/// and scrapers; the `/v1` API needs one of the API keys when any is set.
pub fn router(models: Arc<Models>, options: HttpOptions) -> Router {
    let gate = RequireBearer::new(&options.api_keys, "API key", "set REALM_API_KEY");
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route_layer(middleware::from_fn(move |request: Request, next: Next| {
            let gate = gate.clone();
            async move {
                let metadata =
                    tonic::metadata::MetadataMap::from_headers(request.headers().clone());
                match gate.check(&metadata) {
                    Ok(()) => next.run(request).await,
                    Err(status) => ApiError {
                        status: http_status(status.code()),
                        message: status.message().to_string(),
                        param: None,
                        code: Some("invalid_api_key"),
                    }
                    .into_response(),
                }
            }
        }));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .with_state(AppState {
            models,
            metrics: options.metrics,
        })
}

/// Serves the HTTP API on `listener` until `shutdown` resolves; responses in flight (streams
/// included) are then allowed to finish.
pub async fn serve(
    listener: TcpListener,
    models: Arc<Models>,
    options: HttpOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_or_else(|e| format!("unknown address ({e})"), |a| a.to_string());
    info!(%addr, "serving the OpenAI-compatible HTTP API");
    axum::serve(listener, router(models, options))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Internal(format!("HTTP server: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An error in the OpenAI shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// The OpenAI error `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (param, code) = match &e {
            Error::UnknownModel { .. } => (Some("model".to_string()), Some("model_not_found")),
            Error::Model(realm_common::Error::ContextOverflow { .. }) => {
                (None, Some("context_length_exceeded"))
            }
            _ => (None, None),
        };
        let message = e.to_string();
        // The gRPC mapping decides what kind of failure this is; HTTP follows it.
        let status = http_status(tonic::Status::from(e).code());
        Self {
            status,
            message,
            param,
            code,
        }
    }
}

/// The HTTP status of a gRPC status code.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint: Realm serves POST /v1/completions, POST /v1/chat/completions, \
                  GET /v1/models, GET /health and GET /metrics"
            .to_string(),
        param: None,
        code: Some("unknown_url"),
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A completion prompt: text, a batch of one text, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
    /// OpenAI pads chunks to hide their sizes; Realm sends none to pad, so this changes nothing.
    #[serde(default, rename = "include_obfuscation")]
    _include_obfuscation: Option<bool>,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Sampling {
    #[serde(default)]
    model: String,
    max_tokens: Option<u32>,
    /// The chat endpoint's newer name for `max_tokens`.
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop: Option<Stop>,
    seed: Option<u64>,
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    /// `/v1/completions`: how many alternatives to report; chat: `true` to report.
    logprobs: Option<Value>,
    /// Chat: how many alternatives to report with `logprobs: true`.
    top_logprobs: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<RequestMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
struct RequestMessage {
    role: String,
    #[serde(default)]
    content: Value,
    /// A participant's name: accepted and ignored, as the chat templates have no place for it.
    #[serde(default, rename = "name")]
    _name: Option<String>,
    /// Every other field (`tool_calls`, `tool_call_id`, `audio`, ...): refused when set.
    #[serde(flatten)]
    other: Map<String, Value>,
}

/// Parses a JSON body for `endpoint`, refusing it in the OpenAI shape (axum's own rejection is
/// plain text), and any field Realm would not honour (see [`policy`]).
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes, endpoint: Endpoint) -> Result<T, ApiError> {
    let invalid = |e: serde_json::Error| {
        ApiError::invalid(format!("the request body is not valid: {e}"), None)
    };
    let value: Value = serde_json::from_slice(body).map_err(invalid)?;
    let Value::Object(fields) = &value else {
        return Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ));
    };
    for (field, value) in fields {
        check_field(endpoint, field, value)?;
    }
    serde_json::from_value(value).map_err(invalid)
}

/// What the HTTP API does with a request field.
#[derive(Clone, Copy)]
enum Policy {
    /// Honoured; its value is checked where it is read.
    Honoured,
    /// Accepted and ignored: it would change nothing Realm does.
    Ignored,
    /// Refused (400, naming it) unless its value asks for nothing (`harmless`); `why` ends the
    /// message.
    Refused {
        harmless: fn(&Value) -> bool,
        why: &'static str,
    },
}

use Policy::{Honoured, Ignored, Refused};

/// The fields of both endpoints (README: "Request fields").
const SHARED_FIELDS: &[(&str, Policy)] = &[
    ("model", Honoured),
    ("max_tokens", Honoured),
    ("max_completion_tokens", Honoured),
    ("temperature", Honoured),
    ("top_p", Honoured),
    ("n", Honoured),
    ("stream", Honoured),
    ("stream_options", Honoured),
    ("stop", Honoured),
    ("seed", Honoured),
    ("logprobs", Honoured),
    ("top_k", Honoured),
    ("min_p", Honoured),
    ("repetition_penalty", Honoured),
    ("presence_penalty", Honoured),
    ("frequency_penalty", Honoured),
    (
        "logit_bias",
        Refused {
            harmless: is_empty,
            why: "Realm does not bias logits",
        },
    ),
    (
        "store",
        Refused {
            harmless: is_false,
            why: "Realm stores no completions",
        },
    ),
    ("user", Ignored),
    ("safety_identifier", Ignored),
    ("metadata", Ignored),
    ("service_tier", Ignored),
    ("prompt_cache_key", Ignored),
];

/// The fields of `/v1/completions` alone.
const COMPLETION_FIELDS: &[(&str, Policy)] = &[
    ("prompt", Honoured),
    (
        "echo",
        Refused {
            harmless: is_false,
            why: "Realm does not return the prompt with the completion",
        },
    ),
    (
        "best_of",
        Refused {
            harmless: is_one,
            why: "Realm generates one completion per request; best_of must be 1",
        },
    ),
    (
        "suffix",
        Refused {
            harmless: is_empty,
            why: "Realm does not complete text with a suffix (no fill-in-the-middle)",
        },
    ),
    (
        "top_logprobs",
        Refused {
            harmless: never,
            why: "on /v1/completions, `logprobs: N` asks for the N most likely tokens",
        },
    ),
];

/// The fields of `/v1/chat/completions` alone.
const CHAT_FIELDS: &[(&str, Policy)] = &[
    ("messages", Honoured),
    ("top_logprobs", Honoured),
    (
        "response_format",
        Refused {
            harmless: is_text_format,
            why: "Realm generates free text only; response_format must be {\"type\": \"text\"}",
        },
    ),
    (
        "tools",
        Refused {
            harmless: is_empty,
            why: "Realm does not call tools",
        },
    ),
    (
        "tool_choice",
        Refused {
            harmless: is_none_or_auto,
            why: "Realm does not call tools",
        },
    ),
    ("parallel_tool_calls", Ignored),
    (
        "functions",
        Refused {
            harmless: is_empty,
            why: "Realm does not call functions",
        },
    ),
    (
        "function_call",
        Refused {
            harmless: is_none_or_auto,
            why: "Realm does not call functions",
        },
    ),
    (
        "modalities",
        Refused {
            harmless: is_text_only,
            why: "Realm generates text only",
        },
    ),
    (
        "audio",
        Refused {
            harmless: never,
            why: "Realm generates text only",
        },
    ),
    (
        "prediction",
        Refused {
            harmless: never,
            why: "Realm has no predicted outputs",
        },
    ),
    (
        "reasoning_effort",
        Refused {
            harmless: never,
            why: "Realm's models have no reasoning settings",
        },
    ),
    (
        "verbosity",
        Refused {
            harmless: never,
            why: "Realm's models have no verbosity setting",
        },
    ),
    (
        "web_search_options",
        Refused {
            harmless: never,
            why: "Realm does not search the web",
        },
    ),
];

/// What `endpoint` does with `field`; `None` for a field it does not know.
fn policy(endpoint: Endpoint, field: &str) -> Option<Policy> {
    let own = match endpoint {
        Endpoint::Completions => COMPLETION_FIELDS,
        Endpoint::Chat => CHAT_FIELDS,
    };
    SHARED_FIELDS
        .iter()
        .chain(own)
        .find(|(name, _)| *name == field)
        .map(|(_, policy)| *policy)
}

/// Refuses `field` if `endpoint` would not honour its `value`. A null value is an absent field.
fn check_field(endpoint: Endpoint, field: &str, value: &Value) -> Result<(), ApiError> {
    if value.is_null() {
        return Ok(());
    }
    match policy(endpoint, field) {
        Some(Honoured | Ignored) => Ok(()),
        Some(Refused { harmless, .. }) if harmless(value) => Ok(()),
        Some(Refused { why, .. }) => Err(ApiError::invalid(
            format!("`{field}` is not supported: {why}"),
            Some(field),
        )),
        None => Err(ApiError::invalid(
            format!(
                "unknown parameter `{field}`: Realm refuses the fields it does not know rather \
                 than ignore them"
            ),
            Some(field),
        )),
    }
}

fn is_one(v: &Value) -> bool {
    v.as_f64() == Some(1.0)
}

fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}

/// An empty object, list or string.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

fn is_none_or_auto(v: &Value) -> bool {
    matches!(v.as_str(), Some("none" | "auto"))
}

fn is_text_format(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("text")
        && v.as_object().is_some_and(|o| o.len() == 1)
}

fn is_text_only(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")))
}

fn never(_: &Value) -> bool {
    false
}

impl Sampling {
    /// The request as a gRPC `GenerateRequest` (without prompt), so both APIs check parameters
    /// the same way.
    fn params(&self) -> Result<GenerationParams, ApiError> {
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::invalid(
                "stream_options is only allowed with \"stream\": true",
                Some("stream_options"),
            ));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid(
                "n must be 1: Realm generates one choice per request",
                Some("n"),
            ));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if max_tokens == Some(0) {
            return Err(ApiError::invalid(
                "max_tokens must be at least 1",
                Some("max_tokens"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        let request = pb::GenerateRequest {
            model: self.model.clone(),
            max_tokens: max_tokens.unwrap_or(DEFAULT_MAX_TOKENS as u32),
            temperature: self.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_k: self.top_k.unwrap_or(0),
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            stop,
            ..Default::default()
        };
        let checked = generation_params(&request).and_then(|mut params| {
            if let Some(min_p) = self.min_p {
                params.sampling.min_p = min_p;
                params.sampling.validate()?;
            }
            Ok(params)
        });
        checked.map_err(|e| named(e.into()))
    }

    /// How many alternatives to report with each token's log-probability, if `endpoint`'s
    /// request asks for log-probabilities.
    fn logprobs(&self, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
        let count = |v: &Value, max: usize| v.as_u64().filter(|&n| n <= max as u64);
        match endpoint {
            Endpoint::Completions => match &self.logprobs {
                // Asks for none, as some clients write it.
                None | Some(Value::Bool(false)) => Ok(None),
                Some(v) => match count(v, MAX_COMPLETION_LOGPROBS) {
                    Some(n) => Ok(Some(n as usize)),
                    None => Err(ApiError::invalid(
                        format!(
                            "logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS} on \
                             /v1/completions: how many of the most likely tokens to report \
                             beside the chosen one"
                        ),
                        Some("logprobs"),
                    )),
                },
            },
            Endpoint::Chat => {
                let on = match &self.logprobs {
                    None => false,
                    Some(Value::Bool(on)) => *on,
                    Some(_) => {
                        return Err(ApiError::invalid(
                            "logprobs must be true or false on /v1/chat/completions \
                             (top_logprobs says how many of the most likely tokens to report)",
                            Some("logprobs"),
                        ))
                    }
                };
                let top = match &self.top_logprobs {
                    None => None,
                    Some(v) => Some(count(v, MAX_TOP_LOGPROBS).ok_or_else(|| {
                        ApiError::invalid(
                            format!("top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}"),
                            Some("top_logprobs"),
                        )
                    })?),
                };
                if top.is_some() && !on {
                    return Err(ApiError::invalid(
                        "top_logprobs needs \"logprobs\": true",
                        Some("top_logprobs"),
                    ));
                }
                Ok(on.then_some(top.unwrap_or(0) as usize))
            }
        }
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// The sampling fields whose checks say `<field> must ...`.
const CHECKED_FIELDS: &[&str] = &[
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
];

/// `e` with the field its message is about as its `param`.
fn named(mut e: ApiError) -> ApiError {
    if e.param.is_none() {
        e.param = CHECKED_FIELDS
            .iter()
            .find(|f| e.message.contains(&format!("{f} must")))
            .map(|f| f.to_string());
    }
    e
}

/// A chat message's text: a string, or the concatenated text parts of a list of parts.
fn message_text(content: &Value, index: usize) -> Result<String, ApiError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(
                |part| match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => Ok(text),
                    _ => Err(ApiError::invalid(
                        format!("messages[{index}].content: only text parts are supported"),
                        Some("messages"),
                    )),
                },
            )
            .collect(),
        _ => Err(ApiError::invalid(
            format!("messages[{index}].content must be a string or a list of text parts"),
            Some("messages"),
        )),
    }
}

fn chat_messages(messages: &[RequestMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages is empty: give at least one message",
            Some("messages"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        format!(
                            "messages[{i}].role `{other}` is not supported (use system, \
                             developer, user or assistant)"
                        ),
                        Some("messages"),
                    ))
                }
            };
            if let Some((field, _)) = m.other.iter().find(|(_, v)| !v.is_null()) {
                return Err(ApiError::invalid(
                    format!(
                        "messages[{i}].{field} is not supported: Realm's messages have a role, \
                         content and (ignored) name"
                    ),
                    Some("messages"),
                ));
            }
            Ok(ChatMessage::new(role, message_text(&m.content, i)?))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Handlers

/// Which endpoint a generation came through: its metrics label and its response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn api(self) -> &'static str {
        match self {
            Self::Completions => crate::telemetry::api::COMPLETIONS,
            Self::Chat => crate::telemetry::api::CHAT,
        }
    }
}

async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let received = Instant::now();
    let id = request_id_of(&headers);
    let span = id.span();
    let parsed = span.in_scope(|| {
        let req = parse::<CompletionRequest>(&body, Endpoint::Completions)?;
        let params = req.sampling.params()?;
        let logprobs = req.sampling.logprobs(Endpoint::Completions)?;
        let served = state.models.get(&req.sampling.model)?;
        let model = served.cluster.model();
        let tokens = match &req.prompt {
            Prompt::Text(text) => model.prompt_tokens(text, None).map_err(Error::from)?,
            Prompt::Texts(texts) => match &texts[..] {
                [text] => model.prompt_tokens(text, None).map_err(Error::from)?,
                _ => {
                    return Err(ApiError::invalid(
                        "prompt must be one text: Realm completes one prompt per request",
                        Some("prompt"),
                    ))
                }
            },
            Prompt::Tokens(ids) => {
                let vocab = model.tokenizer.vocab_size();
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(ApiError::invalid(
                        format!("prompt token {bad} is outside the vocabulary of {vocab} tokens"),
                        Some("prompt"),
                    ));
                }
                ids.clone()
            }
        };
        Ok(Parsed {
            served: served.clone(),
            sampling: req.sampling,
            params,
            tokens,
            logprobs,
        })
    });
    respond(Endpoint::Completions, received, id, parsed)
        .instrument(span)
        .await
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Instant::now();
    let id = request_id_of(&headers);
    let span = id.span();
    let parsed = span.in_scope(|| {
        let req = parse::<ChatRequest>(&body, Endpoint::Chat)?;
        let params = req.sampling.params()?;
        let logprobs = req.sampling.logprobs(Endpoint::Chat)?;
        let served = state.models.get(&req.sampling.model)?;
        let messages = chat_messages(&req.messages)?;
        let tokens = served
            .cluster
            .model()
            .chat_tokens(&messages)
            .map_err(Error::from)?;
        Ok(Parsed {
            served,
            sampling: req.sampling,
            params,
            tokens,
            logprobs,
        })
    });
    respond(Endpoint::Chat, received, id, parsed)
        .instrument(span)
        .await
}

/// A generation request, checked and tokenized, and the model it runs on.
struct Parsed {
    served: Served,
    sampling: Sampling,
    params: GenerationParams,
    tokens: Vec<u32>,
    /// Alternatives per token when log-probabilities are asked for.
    logprobs: Option<usize>,
}

fn request_id_of(headers: &HeaderMap) -> RequestId {
    RequestId::from_client(
        headers
            .get(request_id::HEADER)
            .and_then(|v| v.to_str().ok()),
    )
}

/// Starts the generation of a parsed request and answers with a stream or one JSON body, the
/// request id in the `x-request-id` header.
async fn respond(
    endpoint: Endpoint,
    received: Instant,
    id: RequestId,
    parsed: Result<Parsed, ApiError>,
) -> Response {
    let api = endpoint.api();
    let refuse = |e: ApiError| {
        debug!(status = %e.status, error = %e.message, "request refused");
        with_request_id(e.into_response(), &id)
    };
    let Parsed {
        served,
        sampling,
        params,
        tokens,
        logprobs,
    } = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // Refused before its model was known.
            generation::count_refused(api, "");
            return refuse(e);
        }
    };
    let job = Job {
        tokens,
        params,
        received,
        id: id.clone(),
        api,
        logprobs,
    };
    let slot = match served.admission.admit().await {
        Ok(slot) => slot,
        Err(e) => {
            generation::count_refused(api, served.id());
            return refuse(e.into());
        }
    };
    // `start` counts its own refusals.
    let events = match generation::start(&served.cluster, job, slot) {
        Ok(events) => events,
        Err(e) => return refuse(e.into()),
    };
    let reply = Reply {
        endpoint,
        id: format!("{}-{id}", endpoint.id_prefix()),
        created: unix_seconds(),
        model: served.id().to_string(),
        tokenizer: logprobs.map(|_| served.cluster.model().tokenizer.clone()),
    };
    let response = if sampling.stream {
        stream_response(reply, events, sampling.include_usage()).into_response()
    } else {
        whole_response(reply, events).await
    };
    with_request_id(response, &id)
}

fn with_request_id(mut response: Response, id: &RequestId) -> Response {
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(request_id::HEADER, value);
    }
    response
}

/// A non-streamed answer: the whole generation, then one JSON body.
async fn whole_response(reply: Reply, mut events: mpsc::UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Delta(delta) => {
                text.push_str(&delta.text);
                logprobs.extend(delta.logprobs);
            }
            Event::Done(done) => {
                let logprobs = reply.logprobs(&logprobs, &text, &mut CharOffsets::default());
                return reply.whole(&text, logprobs, &done).into_response();
            }
            Event::Failed(e) => return ApiError::from(e).into_response(),
        }
    }
    ApiError::from(Error::Internal(
        "the generation ended without a result".into(),
    ))
    .into_response()
}

/// The parts of every response of one request.
struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    /// Set when the request asked for log-probabilities: names the alternatives.
    tokenizer: Option<Tokenizer>,
}

impl Endpoint {
    fn id_prefix(self) -> &'static str {
        match self {
            Self::Completions => "cmpl",
            Self::Chat => "chatcmpl",
        }
    }
}

fn usage_json(done: &Done) -> Value {
    let u = &done.completion.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.generated_tokens,
        "total_tokens": u.prompt_tokens + u.generated_tokens,
    })
}

/// A log-probability as JSON, which has no infinities: an impossible token's is
/// [`UNLIKELY_LOGPROB`].
fn logprob_json(logprob: f32) -> Value {
    let logprob = f64::from(logprob);
    json!(if logprob.is_finite() {
        logprob
    } else {
        UNLIKELY_LOGPROB
    })
}

/// Character offsets of byte offsets into a text that only grows, asked in increasing order
/// (the tokens' `text_offset` is in characters, as Python indexes the text).
#[derive(Debug, Default)]
struct CharOffsets {
    byte: usize,
    chars: usize,
}

impl CharOffsets {
    /// Characters of `text` that begin before byte `at`.
    fn at(&mut self, text: &str, at: usize) -> usize {
        if at < self.byte {
            *self = Self::default();
        }
        while self.byte < at {
            match text.get(self.byte..).and_then(|rest| rest.chars().next()) {
                Some(c) => {
                    self.byte += c.len_utf8();
                    self.chars += 1;
                }
                None => break,
            }
        }
        self.chars
    }
}

impl Reply {
    /// The bytes that name an alternative token: control tokens as their text.
    fn alternative(&self, tokenizer: &Tokenizer, token: u32) -> Vec<u8> {
        tokenizer.token_bytes(token, true).unwrap_or_default()
    }

    /// A choice's `logprobs` for the tokens of `entries`, whose text ends `text` (the text
    /// generated so far); null when the request asked for none.
    fn logprobs(&self, entries: &[TokenLogprob], text: &str, offsets: &mut CharOffsets) -> Value {
        let Some(tokenizer) = &self.tokenizer else {
            return Value::Null;
        };
        match self.endpoint {
            Endpoint::Completions => {
                let mut tokens = Vec::with_capacity(entries.len());
                let mut token_logprobs = Vec::with_capacity(entries.len());
                let mut top_logprobs = Vec::with_capacity(entries.len());
                let mut text_offset = Vec::with_capacity(entries.len());
                for e in entries {
                    let token = token_string(&e.bytes);
                    // The alternatives and the chosen token (OpenAI: up to `logprobs` + 1
                    // entries); a token string two alternatives share keeps the likelier.
                    let mut top = Map::new();
                    for t in &e.top {
                        top.entry(token_string(&self.alternative(tokenizer, t.token)))
                            .or_insert_with(|| logprob_json(t.logprob));
                    }
                    top.entry(token.clone())
                        .or_insert_with(|| logprob_json(e.logprob));
                    tokens.push(Value::String(token));
                    token_logprobs.push(logprob_json(e.logprob));
                    top_logprobs.push(Value::Object(top));
                    text_offset.push(offsets.at(text, e.offset));
                }
                json!({
                    "tokens": tokens,
                    "token_logprobs": token_logprobs,
                    "top_logprobs": top_logprobs,
                    "text_offset": text_offset,
                })
            }
            Endpoint::Chat => {
                let content: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let top: Vec<Value> = e
                            .top
                            .iter()
                            .map(|t| {
                                let bytes = self.alternative(tokenizer, t.token);
                                json!({
                                    "token": token_string(&bytes),
                                    "logprob": logprob_json(t.logprob),
                                    "bytes": bytes,
                                })
                            })
                            .collect();
                        json!({
                            "token": token_string(&e.bytes),
                            "logprob": logprob_json(e.logprob),
                            "bytes": e.bytes,
                            "top_logprobs": top,
                        })
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
        }
    }

    /// The non-streamed body.
    fn whole(&self, text: &str, logprobs: Value, done: &Done) -> Json<Value> {
        let finish = done.completion.finish.as_str();
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish,
            }),
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        };
        Json(json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Completions => "text_completion",
                Endpoint::Chat => "chat.completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_json(done),
        }))
    }

    /// One streamed chunk: `text` with its `logprobs` and `finish` (if the last), or the usage
    /// chunk.
    fn chunk(
        &self,
        text: Option<&str>,
        logprobs: Value,
        finish: Option<&str>,
        usage: Option<Value>,
    ) -> Value {
        let choices = match (self.endpoint, text) {
            (_, None) => json!([]),
            (Endpoint::Completions, Some(text)) => json!([{
                "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish,
            }]),
            (Endpoint::Chat, Some(text)) => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
            }
        };
        let mut chunk = json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Completions => "text_completion",
                Endpoint::Chat => "chat.completion.chunk",
            },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        chunk
    }

    /// The chat stream's first chunk, which names the role.
    fn role_chunk(&self) -> Value {
        let mut chunk = self.chunk(Some(""), Value::Null, None, None);
        chunk["choices"][0]["delta"] = json!({"role": "assistant", "content": ""});
        chunk
    }
}

fn sse(value: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(value.to_string()))
}

/// The streamed answer: a chunk per token with text (and the log-probabilities of its tokens),
/// a last chunk with the finish reason, the usage chunk if asked for, then `[DONE]`. A failure
/// part-way is an error object, then `[DONE]`.
fn stream_response(
    reply: Reply,
    events: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let reply = Arc::new(reply);
    let first = match reply.endpoint {
        Endpoint::Chat => vec![sse(&reply.role_chunk())],
        Endpoint::Completions => Vec::new(),
    };
    let chunks = {
        let reply = Arc::clone(&reply);
        // The text so far, for the completions' `text_offset`.
        let mut text = String::new();
        let mut offsets = CharOffsets::default();
        tokio_stream::wrappers::UnboundedReceiverStream::new(events).flat_map(move |event| {
            let out: Vec<Result<SseEvent, Infallible>> = match event {
                Event::Delta(delta) if delta.text.is_empty() && delta.logprobs.is_empty() => {
                    Vec::new()
                }
                Event::Delta(delta) => {
                    if reply.tokenizer.is_some() {
                        text.push_str(&delta.text);
                    }
                    let logprobs = reply.logprobs(&delta.logprobs, &text, &mut offsets);
                    vec![sse(&reply.chunk(Some(&delta.text), logprobs, None, None))]
                }
                Event::Done(done) => {
                    let finish = done.completion.finish.as_str();
                    let mut out =
                        vec![sse(&reply.chunk(Some(""), Value::Null, Some(finish), None))];
                    if include_usage {
                        out.push(sse(&reply.chunk(
                            None,
                            Value::Null,
                            None,
                            Some(usage_json(&done)),
                        )));
                    }
                    out
                }
                Event::Failed(e) => vec![sse(&ApiError::from(e).body())],
            };
            stream::iter(out)
        })
    };
    let done = stream::once(async { Ok(SseEvent::default().data("[DONE]")) });
    Sse::new(stream::iter(first).chain(chunks).chain(done))
}

async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .all()
        .iter()
        .map(|s| model_json(&s.cluster))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    // An empty id would name the only model: here it names none.
    let found = match id.as_str() {
        "" => Err(Error::UnknownModel {
            requested: id,
            served: String::new(),
        }),
        id => state.models.get(id),
    };
    match found {
        Ok(served) => Json(model_json(&served.cluster)).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn model_json(cluster: &Cluster) -> Value {
    let model = cluster.model();
    json!({
        "id": model.id,
        "object": "model",
        "created": 0,
        "owned_by": "realm",
        "architecture": model.identity.architecture,
        "context_length": model.config.context_length,
        "plan": cluster.plan().to_string(),
    })
}

/// `ok` with the models served (and, while there is one, `model`: its id).
async fn health(State(state): State<AppState>) -> Json<Value> {
    let ids: Vec<String> = state
        .models
        .all()
        .iter()
        .map(|s| s.id().to_string())
        .collect();
    match ids.as_slice() {
        [only] => Json(json!({"status": "ok", "model": only, "models": ids})),
        _ => Json(json!({"status": "ok", "models": ids})),
    }
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError {
            status: StatusCode::NOT_FOUND,
            message: "metrics are not collected by this server".to_string(),
            param: None,
            code: None,
        }
        .into_response(),
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Histogram buckets of the latency metrics, in seconds: 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Histogram buckets of the step-size metrics (rows and sessions per step).
pub const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

/// Installs this process's metrics recorder (once per process) and returns the handle that
/// renders `/metrics`.
pub fn install_metrics() -> Result<PrometheusHandle> {
    use metrics_exporter_prometheus::Matcher;
    static INSTALLED: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(handle) = INSTALLED.get() {
        return Ok(handle.clone());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(crate::telemetry::names::STEP_ROWS.to_string()),
                COUNT_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(crate::telemetry::names::STEP_SESSIONS.to_string()),
                COUNT_BUCKETS,
            )
        })
        .and_then(|b| b.install_recorder())
        .map_err(|e| Error::Internal(format!("cannot install the metrics recorder: {e}")))?;
    crate::telemetry::describe_metrics();
    Ok(INSTALLED.get_or_init(|| handle).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(json: &str) -> Sampling {
        serde_json::from_str(json).expect("sampling fields")
    }

    #[test]
    fn parameters_follow_the_openai_defaults_and_are_checked() {
        let p = sampling("{}").params().unwrap();
        assert_eq!(p.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(p.sampling.temperature, DEFAULT_TEMPERATURE);
        assert!(p.stop.is_empty());

        let p = sampling(r#"{"max_completion_tokens":7,"max_tokens":3,"stop":".","seed":5}"#)
            .params()
            .unwrap();
        assert_eq!(p.max_tokens, 7);
        assert_eq!(p.stop, ["."]);
        assert_eq!(p.sampling.seed, Some(5));
        assert_eq!(
            sampling(r#"{"stop":["a","b"]}"#).params().unwrap().stop,
            ["a", "b"]
        );

        for (json, param) in [
            (r#"{"n":2}"#, Some("n")),
            (r#"{"max_tokens":0}"#, Some("max_tokens")),
            (r#"{"temperature":-1}"#, Some("temperature")),
            (r#"{"top_p":0}"#, Some("top_p")),
            (r#"{"min_p":2}"#, Some("min_p")),
            (r#"{"presence_penalty":2.5}"#, Some("presence_penalty")),
            (r#"{"frequency_penalty":-3}"#, Some("frequency_penalty")),
        ] {
            let e = sampling(json).params().unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{json}");
            assert_eq!(e.param.as_deref(), param, "{json}");
        }
    }

    #[test]
    fn every_field_is_honoured_ignored_or_refused_by_name() {
        let check = |endpoint, json: &str| {
            parse::<Value>(&Bytes::from(json.to_string()), endpoint).map_err(|e| {
                assert_eq!(e.status, StatusCode::BAD_REQUEST);
                e.param.expect("the refusal names the field")
            })
        };
        use Endpoint::{Chat, Completions};
        for (endpoint, json) in [
            (
                Chat,
                r#"{"user":"u","parallel_tool_calls":true,"service_tier":"auto"}"#,
            ),
            (
                Chat,
                r#"{"presence_penalty":0,"frequency_penalty":0.0,"logit_bias":{}}"#,
            ),
            (
                Chat,
                r#"{"tools":[],"tool_choice":"none","response_format":{"type":"text"}}"#,
            ),
            (
                Chat,
                r#"{"modalities":["text"],"store":false,"audio":null}"#,
            ),
            (
                Completions,
                r#"{"echo":false,"best_of":1,"suffix":"","n":1}"#,
            ),
        ] {
            assert!(check(endpoint, json).is_ok(), "{json}");
        }
        for (endpoint, json, field) in [
            (Chat, r#"{"logit_bias":{"50256":-100}}"#, "logit_bias"),
            (Chat, r#"{"tools":[{"type":"function"}]}"#, "tools"),
            (Chat, r#"{"tool_choice":"required"}"#, "tool_choice"),
            (
                Chat,
                r#"{"response_format":{"type":"json_object"}}"#,
                "response_format",
            ),
            (Chat, r#"{"reasoning_effort":"low"}"#, "reasoning_effort"),
            (Chat, r#"{"echo":true}"#, "echo"),
            (Completions, r#"{"echo":true}"#, "echo"),
            (Completions, r#"{"best_of":2}"#, "best_of"),
            (Completions, r#"{"suffix":"end"}"#, "suffix"),
            (Completions, r#"{"top_logprobs":2}"#, "top_logprobs"),
            (Completions, r#"{"n_probs":2}"#, "n_probs"),
        ] {
            assert_eq!(check(endpoint, json).unwrap_err(), field, "{json}");
        }
    }

    #[test]
    fn logprobs_take_each_endpoint_s_shape() {
        let asked = |endpoint, json: &str| sampling(json).logprobs(endpoint);
        use Endpoint::{Chat, Completions};
        assert_eq!(asked(Completions, "{}").unwrap(), None);
        assert_eq!(asked(Completions, r#"{"logprobs":false}"#).unwrap(), None);
        assert_eq!(asked(Completions, r#"{"logprobs":0}"#).unwrap(), Some(0));
        assert_eq!(asked(Completions, r#"{"logprobs":5}"#).unwrap(), Some(5));
        assert_eq!(asked(Chat, r#"{"logprobs":false}"#).unwrap(), None);
        assert_eq!(asked(Chat, r#"{"logprobs":true}"#).unwrap(), Some(0));
        assert_eq!(
            asked(Chat, r#"{"logprobs":true,"top_logprobs":20}"#).unwrap(),
            Some(20)
        );
        for (endpoint, json, field) in [
            (Completions, r#"{"logprobs":6}"#, "logprobs"),
            (Completions, r#"{"logprobs":true}"#, "logprobs"),
            (Chat, r#"{"logprobs":2}"#, "logprobs"),
            (
                Chat,
                r#"{"logprobs":true,"top_logprobs":21}"#,
                "top_logprobs",
            ),
            (Chat, r#"{"top_logprobs":2}"#, "top_logprobs"),
        ] {
            let e = asked(endpoint, json).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{json}");
        }
    }

    #[test]
    fn text_offsets_count_characters() {
        let mut offsets = CharOffsets::default();
        let text = "a€b";
        assert_eq!(offsets.at(text, 0), 0);
        assert_eq!(offsets.at(text, 1), 1);
        assert_eq!(offsets.at(text, 4), 2);
        assert_eq!(offsets.at(text, 1), 1, "asked again from the start");
        assert_eq!(
            offsets.at(text, 2),
            2,
            "inside a character: after it begins"
        );
        assert_eq!(offsets.at(text, 9), 3);
    }

    #[test]
    fn chat_messages_accept_text_in_both_shapes() {
        let messages: Vec<RequestMessage> = serde_json::from_str(
            r#"[{"role":"developer","content":"Be brief."},
                {"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]},
                {"role":"assistant","content":null}]"#,
        )
        .unwrap();
        let chat = chat_messages(&messages).unwrap();
        assert_eq!(chat[0], ChatMessage::system("Be brief."));
        assert_eq!(chat[1], ChatMessage::user("Hi there"));
        assert_eq!(chat[2], ChatMessage::assistant(""));

        let image: Vec<RequestMessage> =
            serde_json::from_str(r#"[{"role":"user","content":[{"type":"image_url"}]}]"#).unwrap();
        assert!(chat_messages(&image)
            .unwrap_err()
            .message
            .contains("text parts"));
        assert!(chat_messages(&[]).unwrap_err().message.contains("empty"));

        let named: Vec<RequestMessage> = serde_json::from_str(
            r#"[{"role":"user","content":"Hi","name":"ann","tool_calls":null}]"#,
        )
        .unwrap();
        assert_eq!(chat_messages(&named).unwrap(), [ChatMessage::user("Hi")]);
        let tool: Vec<RequestMessage> = serde_json::from_str(
            r#"[{"role":"assistant","content":"","tool_calls":[{"id":"1"}]}]"#,
        )
        .unwrap();
        let e = chat_messages(&tool).unwrap_err();
        assert!(
            e.message.contains("messages[0].tool_calls"),
            "{}",
            e.message
        );
    }

    #[test]
    fn errors_take_the_status_of_their_grpc_mapping() {
        let unknown = ApiError::from(Error::UnknownModel {
            requested: "a".into(),
            served: "b".into(),
        });
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert_eq!(unknown.body()["error"]["code"], "model_not_found");
        assert_eq!(unknown.body()["error"]["type"], "invalid_request_error");
        let overflow = ApiError::from(Error::Model(realm_common::Error::ContextOverflow {
            tokens: 9,
            context: 8,
        }));
        assert_eq!(overflow.status, StatusCode::BAD_REQUEST);
        let down = ApiError::from(Error::Unreachable {
            url: "w".into(),
            problem: "refused".into(),
        });
        assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.body()["error"]["type"], "server_error");
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
