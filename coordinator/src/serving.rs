//! The serving benchmark: load over the OpenAI-compatible HTTP API, so Realm and any other
//! server of `POST /v1/completions` (llama.cpp's `llama-server`) are measured by the same client.
//!
//! [`drive`] runs `concurrency` clients, each sending `requests_per_client` streaming greedy
//! completions back to back, prompts round-robin from [`PROMPTS`]. Per request it records the
//! time to first token (send to the first SSE chunk carrying text), every inter-token gap
//! (arrival of consecutive such chunks) and the completion tokens (from `usage` when the server
//! sends it, else the chunks counted). It can also send one long prompt once every client has
//! its first token, and measure the running streams' gaps while that prompt is prefilled.
//!
//! Token chunks. Both servers send one SSE event per generated token, `data: {json}`, with the
//! token's text in `choices[0].text`, and end with `data: [DONE]`:
//! - Realm sends no event for a token whose text is empty (an incomplete UTF-8 sequence), a last
//!   chunk with empty text and the `finish_reason`, then, when `stream_options.include_usage` is
//!   set, a chunk with `"choices": []` and `usage`.
//! - llama-server sends no event for an incomplete UTF-8 sequence either, but does send one with
//!   empty text for a token it holds back or does not render (a possible stop string, an
//!   end-of-generation token). Its last chunk carries empty text, the `finish_reason` and, on
//!   `/v1/completions`, always `usage` (and `timings`), whatever `include_usage` says: that
//!   option only governs its chat endpoint, which adds a separate `"choices": []` usage chunk.
//!   It may send `:` comment lines as keep-alive pings, and an error part-way is a
//!   `data: {"error": ...}` event without `[DONE]`.
//!
//! So a token chunk is an event whose first choice has non-empty `text` (or chat
//! `delta.content`); empty ones, finish chunks, usage chunks and comments are not tokens, and
//! `usage.completion_tokens` is read from whichever chunk carries it.
//!
//! [`bench_cluster`] starts a Realm cluster of processes on loopback (K `realm-worker`s and a
//! `realm-coordinator serve` with the HTTP API), drives it at each requested concurrency and
//! stops every process it started, also on error.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{header, Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// Short English prompts that make a model write a long continuation: a task and the first words
/// of the answer (a bare instruction often gets a one-line answer and the end of the text from an
/// instruct model). Greedy, each writes 64 tokens without stopping on both project models (128
/// but the last on SmolLM2). Client `c`'s request `r` takes prompt `(r * concurrency + c) % 16`,
/// so every server gets the same prompts in the same order.
pub const PROMPTS: [&str; 16] = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle. Chapter 1:",
    "Write a long story about a dragon who is afraid of the dark. Chapter 1:",
    "Describe a busy market in an old harbour town, from dawn until night. At dawn,",
    "Write a letter from a sailor to his family about his long voyage. Dear family,",
    "Explain how a steam engine works, step by step, to a curious child. First,",
    "Write a long story about two friends lost in a forest during a storm. Chapter 1:",
    "Describe the life of a honeybee from the day it hatches. On the first day,",
    "Write a long story about a robot who wants to learn how to paint. Chapter 1:",
    "Tell the history of a small mountain village over three hundred years. In the beginning,",
    "Write the diary of an explorer crossing a desert on a camel. Day 1:",
    "Explain why the seasons change, with examples from around the world. To begin with,",
    "Write a long story about a baker whose bread makes people remember their dreams. Chapter 1:",
    "Describe a train journey across the country in winter. The train",
    "Write a long story about a girl who can talk to the birds in her garden. Chapter 1:",
    "Write a speech for the opening of a new public library. Ladies and gentlemen,",
    "Describe how a city changes during one day, from the first bus to the last light. At five in the morning,",
];

/// The long prompt is this paragraph repeated.
const LONG_PROMPT_PARAGRAPH: &str = "The committee met again on Thursday morning to review the \
    plans for the new bridge across the river. The engineers presented three designs, each with \
    its own costs, risks and timelines, and the members asked many questions about the \
    foundations, the traffic during construction and the maintenance over the coming decades. ";

/// Characters per token of the long prompt's paragraph, repeated, in the vocabularies of both
/// project models (11,200 characters are 1,979 SmolLM2 and 1,980 Gemma 3 tokens); the request's
/// usage gives the exact count.
const CHARS_PER_TOKEN: f64 = 5.6;

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a started process may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// Compute threads of the coordinator process [`bench_cluster`] starts, unless told otherwise.
pub const DEFAULT_COORDINATOR_THREADS: usize = 2;

/// Lines of a started process's stderr kept to explain a failure.
const STDERR_TAIL: usize = 20;

/// One load to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSpec {
    /// Clients sending at once.
    pub concurrency: usize,
    /// Requests each client sends, one after the other.
    pub requests_per_client: usize,
    /// `max_tokens` of every request.
    pub gen_tokens: usize,
    /// Once every client has its first token, send one prompt of about this many tokens
    /// (`max_tokens` 1) and measure the running streams while it is prefilled.
    pub long_prompt_tokens: Option<usize>,
}

/// What one load measured. Durations are in ms, rounded to 0.01 ms; the percentiles are
/// nearest-rank, `None` where there was no sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadResult {
    /// What was measured: the base URL, or a description of the Realm cluster.
    pub server: String,
    /// The first model the server lists (empty where it lists none).
    pub model: String,
    /// Realm's worker processes and compute threads per worker, where this benchmark started them.
    pub workers: Option<usize>,
    pub threads: Option<usize>,
    pub concurrency: usize,
    pub requests_per_client: usize,
    pub gen_tokens: usize,
    /// Requests that ended with `[DONE]` (the long prompt not included).
    pub completed: usize,
    pub failed: usize,
    /// Completion tokens of the completed requests.
    pub completion_tokens: u64,
    /// From the first request sent to the last one finished.
    pub wall_s: f64,
    /// `completion_tokens` over `wall_s`.
    pub tokens_per_s: f64,
    /// Time to first token of the completed requests.
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    /// Gaps between consecutive token chunks of the completed requests.
    pub itl_p50_ms: Option<f64>,
    pub itl_p99_ms: Option<f64>,
    pub long_prompt: Option<LongPromptResult>,
    /// The first failure's message, if any request failed.
    pub first_error: Option<String>,
}

/// The long prompt sent into a running load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongPromptResult {
    /// As the server counted them (`None` where it sent no usage).
    pub prompt_tokens: Option<u64>,
    /// `None` where the request failed before its first token.
    pub ttft_ms: Option<f64>,
    /// The running streams' gaps that overlap its prefill (from its send to its first token).
    pub itl_p50_ms: Option<f64>,
    pub itl_p99_ms: Option<f64>,
    /// How many gaps those are.
    pub gaps: usize,
}

impl LoadResult {
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    pub fn from_json(v: &Value) -> Option<Self> {
        serde_json::from_value(v.clone()).ok()
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("n/a".to_string(), |v| format!("{v:.1}"))
}

impl std::fmt::Display for LoadResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} concurrency={}: {} completed, {} failed, {} tokens in {:.2} s = {:.1} tok/s; \
             TTFT p50 {} p99 {} ms; ITL p50 {} p99 {} ms",
            self.server,
            self.concurrency,
            self.completed,
            self.failed,
            self.completion_tokens,
            self.wall_s,
            self.tokens_per_s,
            ms(self.ttft_p50_ms),
            ms(self.ttft_p99_ms),
            ms(self.itl_p50_ms),
            ms(self.itl_p99_ms),
        )?;
        if let Some(l) = &self.long_prompt {
            let tokens = l.prompt_tokens.map_or("?".to_string(), |n| n.to_string());
            write!(
                f,
                " [long prompt of {tokens} tokens: TTFT {} ms; ITL during its prefill p50 {} p99 {} ms over {} gaps]",
                ms(l.ttft_ms),
                ms(l.itl_p50_ms),
                ms(l.itl_p99_ms),
                l.gaps,
            )?;
        }
        if let Some(e) = &self.first_error {
            write!(f, " (first error: {e})")?;
        }
        Ok(())
    }
}

/// The `p`-th percentile (0 < p ≤ 100) of `values` by the nearest-rank method: the smallest value
/// that at least `p`% of them do not exceed. `None` for no values.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Splits a byte stream into the data of server-sent events, as the bytes arrive in any pieces.
/// Lines end in `\n` or `\r\n`; `:` lines are comments; fields other than `data` are ignored.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes; returns the data of every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            let line = String::from_utf8_lossy(&self.line).into_owned();
            self.line.clear();
            if line.is_empty() {
                events.extend(self.data.take());
            } else if let Some(value) = line.strip_prefix("data") {
                // `data` alone is a field with an empty value; `database: x` is another field.
                let value = match value.strip_prefix(':') {
                    Some(v) => v.strip_prefix(' ').unwrap_or(v),
                    None if value.is_empty() => "",
                    None => continue,
                };
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_string()),
                }
            }
        }
        events
    }
}

/// What one SSE event of a streamed completion says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Chunk {
    /// `data: [DONE]`: the stream is complete.
    pub done: bool,
    /// It carries generated text (a token; more than one where a server merges them).
    pub token: bool,
    /// `usage.completion_tokens`, where it carries usage.
    pub completion_tokens: Option<u64>,
    pub prompt_tokens: Option<u64>,
    /// An error object's message.
    pub error: Option<String>,
}

impl Chunk {
    /// Reads one event's data (either server's shape, completions or chat).
    pub fn parse(data: &str) -> Self {
        if data.trim() == "[DONE]" {
            return Self {
                done: true,
                ..Self::default()
            };
        }
        let v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                return Self {
                    error: Some(format!("unreadable event `{data}`: {e}")),
                    ..Self::default()
                }
            }
        };
        if let Some(error) = v.get("error") {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_string);
            return Self {
                error: Some(message),
                ..Self::default()
            };
        }
        let choice = v.get("choices").and_then(|c| c.get(0));
        let text = choice.and_then(|c| {
            c.get("text")
                .or_else(|| c.get("delta").and_then(|d| d.get("content")))
                .and_then(Value::as_str)
        });
        let usage = v.get("usage");
        let count = |key: &str| usage.and_then(|u| u.get(key)).and_then(Value::as_u64);
        Self {
            done: false,
            token: text.is_some_and(|t| !t.is_empty()),
            completion_tokens: count("completion_tokens"),
            prompt_tokens: count("prompt_tokens"),
            error: None,
        }
    }
}

/// What happened to one request.
#[derive(Debug, Clone)]
struct Record {
    sent: Instant,
    /// Arrival of each token chunk.
    tokens: Vec<Instant>,
    completion_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    finished: Instant,
    error: Option<String>,
}

impl Record {
    fn new(sent: Instant) -> Self {
        Self {
            sent,
            tokens: Vec::new(),
            completion_tokens: None,
            prompt_tokens: None,
            finished: sent,
            error: None,
        }
    }

    fn completion_tokens(&self) -> u64 {
        self.completion_tokens.unwrap_or(self.tokens.len() as u64)
    }

    fn gaps(&self) -> impl Iterator<Item = (Instant, Instant)> + '_ {
        self.tokens.windows(2).map(|w| (w[0], w[1]))
    }
}

/// The URLs a base URL (`http://host:port`, with or without `/v1`) gives.
#[derive(Debug, Clone, PartialEq)]
struct Endpoints {
    completions: Uri,
    models: Uri,
}

impl Endpoints {
    fn new(base_url: &str) -> anyhow::Result<Self> {
        let base = base_url.trim().trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        let base = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        if !base.starts_with("http://") {
            bail!("`{base_url}`: the serving benchmark speaks plain http:// only");
        }
        let uri = |path: &str| -> anyhow::Result<Uri> {
            format!("{base}{path}")
                .parse()
                .with_context(|| format!("`{base_url}` is not a valid base URL"))
        };
        Ok(Self {
            completions: uri("/v1/completions")?,
            models: uri("/v1/models")?,
        })
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The HTTP side of a load: one connection pool, the endpoints and the key.
#[derive(Clone)]
struct Target {
    client: HttpClient,
    endpoints: Endpoints,
    authorization: Option<String>,
}

impl Target {
    fn request(
        &self,
        method: Method,
        uri: &Uri,
        body: Bytes,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut request = Request::builder()
            .method(method)
            .uri(uri.clone())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(auth) = &self.authorization {
            request = request.header(header::AUTHORIZATION, auth);
        }
        request
            .body(Full::new(body))
            .context("cannot build the request")
    }

    /// The first model id the server lists; also the check that it answers.
    async fn model(&self) -> anyhow::Result<String> {
        let request = self.request(Method::GET, &self.endpoints.models, Bytes::new())?;
        let response = self
            .client
            .request(request)
            .await
            .with_context(|| format!("cannot reach {}", self.endpoints.models))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .context("cannot read the model list")?
            .to_bytes();
        if status != StatusCode::OK {
            bail!(
                "{} answered {status}: {}",
                self.endpoints.models,
                String::from_utf8_lossy(&body)
            );
        }
        let list: Value = serde_json::from_slice(&body).context("the model list is not JSON")?;
        Ok(list
            .pointer("/data/0/id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string())
    }

    /// Sends one streaming completion and records it; `first_token` is told when its first
    /// token arrives (or when it ends without one).
    async fn complete(
        &self,
        prompt: &str,
        max_tokens: usize,
        first_token: Option<oneshot::Sender<()>>,
    ) -> Record {
        let sent = Instant::now();
        let mut record = Record::new(sent);
        let mut first_token = first_token;
        let run = self.stream(prompt, max_tokens, &mut record, &mut first_token);
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, run).await;
        record.error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())),
        };
        record.finished = Instant::now();
        if let Some(tx) = first_token {
            let _ = tx.send(());
        }
        record
    }

    async fn stream(
        &self,
        prompt: &str,
        max_tokens: usize,
        record: &mut Record,
        first_token: &mut Option<oneshot::Sender<()>>,
    ) -> anyhow::Result<()> {
        let body = json!({
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let request = self.request(
            Method::POST,
            &self.endpoints.completions,
            Bytes::from(body.to_string()),
        )?;
        record.sent = Instant::now();
        let response = self
            .client
            .request(request)
            .await
            .context("the request failed")?;
        let status = response.status();
        let mut body = response.into_body();
        if status != StatusCode::OK {
            let text = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            bail!("{status}: {}", String::from_utf8_lossy(&text).trim());
        }
        let mut parser = SseParser::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the stream broke")?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let arrived = Instant::now();
            for event in parser.push(&data) {
                let chunk = Chunk::parse(&event);
                if let Some(e) = chunk.error {
                    bail!("the server sent an error: {e}");
                }
                if chunk.done {
                    return Ok(());
                }
                if chunk.token {
                    record.tokens.push(arrived);
                    if let Some(tx) = first_token.take() {
                        let _ = tx.send(());
                    }
                }
                record.completion_tokens = chunk.completion_tokens.or(record.completion_tokens);
                record.prompt_tokens = chunk.prompt_tokens.or(record.prompt_tokens);
            }
        }
        bail!("the stream ended before [DONE]")
    }
}

/// A prompt of about `tokens` tokens.
fn long_prompt(tokens: usize) -> String {
    let chars = (tokens as f64 * CHARS_PER_TOKEN).round() as usize;
    let mut text = String::with_capacity(chars + LONG_PROMPT_PARAGRAPH.len());
    while text.len() < chars {
        text.push_str(LONG_PROMPT_PARAGRAPH);
    }
    // The paragraph is ASCII: any length is a character boundary.
    text.truncate(chars);
    text
}

/// Applies `spec` to the OpenAI-compatible server at `base_url` (`http://host:port`).
pub async fn drive(
    base_url: &str,
    api_key: Option<&str>,
    spec: &LoadSpec,
) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(spec.concurrency > 0, "the concurrency must be at least 1");
    anyhow::ensure!(
        spec.requests_per_client > 0,
        "each client must send at least one request"
    );
    anyhow::ensure!(spec.gen_tokens > 0, "--gen-tokens must be at least 1");
    let target = Target {
        // A fresh connection per request (a loopback connect is some 0.1 ms, in every TTFT
        // alike): a pooled one can be closed by the server as it is reused (llama-server closes
        // connections idle for 5 s), which fails that request for nothing the load did.
        client: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http(),
        endpoints: Endpoints::new(base_url)?,
        authorization: api_key.map(|k| format!("Bearer {k}")),
    };
    let model = target.model().await?;

    let start = Instant::now();
    let mut first_tokens = Vec::with_capacity(spec.concurrency);
    let mut clients = Vec::with_capacity(spec.concurrency);
    for c in 0..spec.concurrency {
        let (tx, rx) = oneshot::channel();
        first_tokens.push(rx);
        let target = target.clone();
        let spec = spec.clone();
        clients.push(tokio::spawn(async move {
            let mut first_token = Some(tx);
            let mut records = Vec::with_capacity(spec.requests_per_client);
            for r in 0..spec.requests_per_client {
                let prompt = PROMPTS[(r * spec.concurrency + c) % PROMPTS.len()];
                records.push(
                    target
                        .complete(prompt, spec.gen_tokens, first_token.take())
                        .await,
                );
            }
            records
        }));
    }
    let long = spec.long_prompt_tokens.map(|tokens| {
        let target = target.clone();
        tokio::spawn(async move {
            for rx in first_tokens {
                let _ = rx.await;
            }
            target.complete(&long_prompt(tokens), 1, None).await
        })
    });
    let mut records = Vec::with_capacity(spec.concurrency * spec.requests_per_client);
    for client in clients {
        records.extend(client.await.context("a client task failed")?);
    }
    let long = match long {
        Some(task) => Some(task.await.context("the long-prompt task failed")?),
        None => None,
    };
    let mut result = summarize(spec, start, &records, long.as_ref());
    result.server = base_url.to_string();
    result.model = model;
    Ok(result)
}

/// One request of `gen_tokens`, unmeasured, so the loads after it find a server that has run
/// once (its first request pays for page faults and buffers the next ones reuse).
pub async fn warm_up(
    base_url: &str,
    api_key: Option<&str>,
    gen_tokens: usize,
) -> anyhow::Result<()> {
    let once = LoadSpec {
        concurrency: 1,
        requests_per_client: 1,
        gen_tokens,
        long_prompt_tokens: None,
    };
    match drive(base_url, api_key, &once).await?.first_error {
        Some(e) => bail!("the warm-up request to {base_url} failed: {e}"),
        None => Ok(()),
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (v * scale).round() / scale
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50 and p99 in ms, rounded.
fn p50_p99(values: &[f64]) -> (Option<f64>, Option<f64>) {
    let p = |q| percentile(values, q).map(|v| round(v, 2));
    (p(50.0), p(99.0))
}

/// The figures of a load from its requests' records (`long` is the long prompt's).
fn summarize(
    spec: &LoadSpec,
    start: Instant,
    records: &[Record],
    long: Option<&Record>,
) -> LoadResult {
    let completed: Vec<&Record> = records.iter().filter(|r| r.error.is_none()).collect();
    let completion_tokens = completed.iter().map(|r| r.completion_tokens()).sum();
    let end = records.iter().map(|r| r.finished).max().unwrap_or(start);
    let wall = end.saturating_duration_since(start).as_secs_f64();
    let ttft: Vec<f64> = completed
        .iter()
        .filter_map(|r| {
            r.tokens
                .first()
                .map(|t| millis(t.saturating_duration_since(r.sent)))
        })
        .collect();
    let itl: Vec<f64> = completed
        .iter()
        .flat_map(|r| r.gaps())
        .map(|(a, b)| millis(b.saturating_duration_since(a)))
        .collect();
    let (ttft_p50_ms, ttft_p99_ms) = p50_p99(&ttft);
    let (itl_p50_ms, itl_p99_ms) = p50_p99(&itl);
    let long_prompt = long.map(|l| {
        let first = l.tokens.first().copied();
        // The window of its prefill: gaps of the running streams that overlap it.
        let window_end = first.unwrap_or(l.finished);
        let during: Vec<f64> = match first {
            Some(_) => completed
                .iter()
                .flat_map(|r| r.gaps())
                .filter(|&(a, b)| b > l.sent && a < window_end)
                .map(|(a, b)| millis(b.saturating_duration_since(a)))
                .collect(),
            None => Vec::new(),
        };
        let (itl_p50_ms, itl_p99_ms) = p50_p99(&during);
        LongPromptResult {
            prompt_tokens: l.prompt_tokens,
            ttft_ms: first.map(|t| round(millis(t.saturating_duration_since(l.sent)), 2)),
            itl_p50_ms,
            itl_p99_ms,
            gaps: during.len(),
        }
    });
    let first_error = records.iter().chain(long).find_map(|r| r.error.clone());
    LoadResult {
        server: String::new(),
        model: String::new(),
        workers: None,
        threads: None,
        concurrency: spec.concurrency,
        requests_per_client: spec.requests_per_client,
        gen_tokens: spec.gen_tokens,
        completed: completed.len(),
        failed: records.len() - completed.len(),
        completion_tokens,
        wall_s: round(wall, 3),
        tokens_per_s: round(completion_tokens as f64 / wall.max(1e-9), 2),
        ttft_p50_ms,
        ttft_p99_ms,
        itl_p50_ms,
        itl_p99_ms,
        long_prompt,
        first_error,
    }
}

/// A Realm cluster of processes to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    pub model: PathBuf,
    /// `realm-worker` processes (at least 1); the layers are planned over them by memory.
    pub workers: usize,
    /// Compute threads of each worker.
    pub threads: usize,
    /// Compute threads of the coordinator (head, sampling).
    pub coordinator_threads: usize,
}

/// A process this benchmark started: killed when dropped, so no error path leaves it running.
struct Launched {
    name: String,
    child: Child,
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_task: tokio::task::JoinHandle<()>,
}

impl Launched {
    /// Starts `command` and reads its stdout until a line containing `ready`; returns the
    /// process and the lines read so far.
    async fn start(
        name: String,
        mut command: Command,
        ready: &str,
    ) -> anyhow::Result<(Self, Vec<String>)> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let stderr_task = tokio::spawn(keep_tail(child.stderr.take(), Arc::clone(&stderr)));
        let mut launched = Self {
            name,
            child,
            stderr,
            stderr_task,
        };
        let mut stdout = match launched.child.stdout.take() {
            Some(out) => BufReader::new(out).lines(),
            None => bail!("{}: no stdout", launched.name),
        };
        let mut seen = Vec::new();
        let wait = async {
            while let Some(line) = stdout.next_line().await? {
                let found = line.contains(ready);
                seen.push(line);
                if found {
                    return Ok(true);
                }
            }
            Ok::<_, std::io::Error>(false)
        };
        let outcome = tokio::time::timeout(START_TIMEOUT, wait).await;
        match outcome {
            Ok(Ok(true)) => {
                // Keep reading so the process never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
                Ok((launched, seen))
            }
            Ok(Ok(false)) => Err(launched.failure("exited before it was ready").await),
            Ok(Err(e)) => Err(launched
                .failure(&format!("cannot read its output: {e}"))
                .await),
            Err(_) => {
                let why = format!("not ready within {} s", START_TIMEOUT.as_secs());
                Err(launched.failure(&why).await)
            }
        }
    }

    /// An error naming the process, its exit status and the end of its stderr; kills it.
    async fn failure(mut self, what: &str) -> anyhow::Error {
        let _ = self.child.start_kill();
        let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.stderr_task).await;
        let status = match status {
            Ok(Ok(s)) => format!(" ({s})"),
            _ => String::new(),
        };
        let tail = self
            .stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        anyhow::anyhow!("{} {what}{status}; its stderr ends:\n{tail}", self.name)
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Keeps the last lines of a process's stderr.
async fn keep_tail(stream: Option<impl AsyncRead + Unpin>, tail: Arc<Mutex<VecDeque<String>>>) {
    let Some(stream) = stream else { return };
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
        if tail.len() == STDERR_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

/// `name` beside this executable (`target/release/`), or one folder up when this is a test
/// binary in `target/release/deps/`.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let dir = exe.parent().context("this executable has no folder")?;
    [dir, dir.parent().unwrap_or(dir)]
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no {name} beside {} (build it: cargo build --release --bin {name})",
                exe.display()
            )
        })
}

/// The address at the end of a `... listening on ADDR` line.
fn address_in(lines: &[String], marker: &str) -> Option<String> {
    lines.iter().find_map(|l| {
        l.split_once(marker)
            .map(|(_, addr)| addr.trim().to_string())
            .filter(|a| !a.is_empty())
    })
}

/// Starts a Realm cluster of processes on loopback (`cluster.workers` `realm-worker`s and a
/// `realm-coordinator serve` with the HTTP API), sends one warm-up request, applies each load in
/// turn and stops every process. Results come in the order of `loads`.
pub async fn bench_cluster(
    cluster: &ClusterSpec,
    loads: &[LoadSpec],
) -> anyhow::Result<Vec<LoadResult>> {
    anyhow::ensure!(cluster.workers > 0, "the cluster needs at least one worker");
    let worker_bin = sibling_binary("realm-worker")?;
    let coordinator_bin = sibling_binary("realm-coordinator")?;
    let mut processes = Vec::with_capacity(cluster.workers + 1);
    let mut worker_addrs = Vec::with_capacity(cluster.workers);
    for i in 0..cluster.workers {
        let mut command = Command::new(&worker_bin);
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--model")
            .arg(&cluster.model)
            .arg("--threads")
            .arg(cluster.threads.to_string());
        let (worker, lines) =
            Launched::start(format!("realm-worker {}", i + 1), command, "listening on ").await?;
        let addr = address_in(&lines, "listening on ");
        processes.push(worker);
        worker_addrs.push(addr.context("a worker printed no address")?);
    }
    let max_concurrency = loads.iter().map(|l| l.concurrency).max().unwrap_or(1);
    let long = usize::from(loads.iter().any(|l| l.long_prompt_tokens.is_some()));
    let mut command = Command::new(&coordinator_bin);
    command
        .arg("--threads")
        .arg(cluster.coordinator_threads.to_string())
        .arg("serve")
        .arg("--model")
        .arg(&cluster.model)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--http-listen")
        .arg("127.0.0.1:0")
        // Every client is admitted or queued, never refused, and a long prompt runs at once
        // beside the clients rather than waiting for one to finish.
        .arg("--max-active")
        .arg(
            (max_concurrency + long)
                .max(crate::admission::DEFAULT_MAX_ACTIVE)
                .to_string(),
        )
        .arg("--max-queued")
        .arg(
            max_concurrency
                .max(crate::admission::DEFAULT_MAX_QUEUED)
                .to_string(),
        )
        // Keys from the environment would lock the benchmark out; the API is on loopback only.
        .env_remove(realm_common::auth::API_KEY_ENV);
    for addr in &worker_addrs {
        command.arg("--worker").arg(addr);
    }
    let (coordinator, lines) =
        Launched::start("realm-coordinator".to_string(), command, "listening on ").await?;
    processes.push(coordinator);
    let http = address_in(&lines, "serving HTTP on ")
        .context("the coordinator printed no HTTP address")?;
    let base_url = format!("http://{http}");
    let server = format!(
        "realm {} workers x {} threads",
        cluster.workers, cluster.threads
    );

    let run = async {
        warm_up(&base_url, None, loads.first().map_or(8, |l| l.gen_tokens)).await?;
        let mut results = Vec::with_capacity(loads.len());
        for load in loads {
            let mut result = drive(&base_url, None, load).await?;
            result.server = server.clone();
            result.workers = Some(cluster.workers);
            result.threads = Some(cluster.threads);
            results.push(result);
        }
        Ok(results)
    };
    let results = run.await;
    for process in processes {
        process.stop().await;
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 99.0), Some(4.0));
    }

    #[test]
    fn sse_events_are_split_however_the_bytes_arrive() {
        let stream = b": ping\n\ndata: {\"a\":1}\n\ndata: first\r\ndata: second\r\n\r\nevent: x\nid: 3\ndatabase: no\ndata:[DONE]\n\n";
        let whole = SseParser::default().push(stream);
        assert_eq!(whole, ["{\"a\":1}", "first\nsecond", "[DONE]"]);
        // Byte by byte: the same events, each complete only at its blank line.
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for b in stream.chunks(1) {
            events.extend(parser.push(b));
        }
        assert_eq!(events, whole);
        assert!(SseParser::default().push(b"data: {\"a\":1}\n").is_empty());
    }

    #[test]
    fn realm_chunks() {
        let token = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":null}]}"#;
        let finish = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"length"}]}"#;
        let usage = r#"{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":64,"total_tokens":76}}"#;
        let error = r#"{"error":{"message":"worker unavailable","type":"server_error","param":null,"code":null}}"#;
        assert!(Chunk::parse(token).token);
        assert_eq!(Chunk::parse(finish), Chunk::default());
        let u = Chunk::parse(usage);
        assert!(!u.token);
        assert_eq!((u.prompt_tokens, u.completion_tokens), (Some(12), Some(64)));
        assert_eq!(
            Chunk::parse(error).error.as_deref(),
            Some("worker unavailable")
        );
        assert!(Chunk::parse("[DONE]").done);
    }

    #[test]
    fn llama_server_chunks() {
        let token = r#"{"choices":[{"text":" Once","index":0,"logprobs":null,"finish_reason":null}],"created":1,"model":"m.gguf","system_fingerprint":"b1-0c1e570","object":"text_completion","id":"chatcmpl-x"}"#;
        let held_back = r#"{"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":null}],"created":1,"model":"m.gguf","object":"text_completion","id":"chatcmpl-x"}"#;
        let last = r#"{"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"created":1,"model":"m.gguf","object":"text_completion","usage":{"completion_tokens":64,"prompt_tokens":14,"total_tokens":78,"prompt_tokens_details":{"cached_tokens":0}},"id":"chatcmpl-x","timings":{"predicted_n":64}}"#;
        let error = r#"{"error":{"code":500,"message":"slot unavailable","type":"server_error"}}"#;
        assert!(Chunk::parse(token).token);
        assert!(!Chunk::parse(held_back).token);
        let l = Chunk::parse(last);
        assert!(!l.token && !l.done);
        assert_eq!((l.prompt_tokens, l.completion_tokens), (Some(14), Some(64)));
        assert_eq!(
            Chunk::parse(error).error.as_deref(),
            Some("slot unavailable")
        );
        // The chat endpoint's shapes: role chunk, content, usage chunk.
        let role = r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"object":"chat.completion.chunk"}"#;
        let content = r#"{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" Once"}}],"object":"chat.completion.chunk"}"#;
        assert!(!Chunk::parse(role).token);
        assert!(Chunk::parse(content).token);
        assert!(Chunk::parse("not json").error.is_some());
    }

    #[test]
    fn base_urls() {
        let e = Endpoints::new("http://127.0.0.1:8080/").expect("url");
        assert_eq!(e.completions, "http://127.0.0.1:8080/v1/completions");
        assert_eq!(e.models, "http://127.0.0.1:8080/v1/models");
        assert_eq!(Endpoints::new("127.0.0.1:8080/v1").expect("url"), e);
        assert!(Endpoints::new("https://127.0.0.1:8080").is_err());
    }

    #[test]
    fn prompts_are_distinct() {
        let distinct: std::collections::HashSet<_> = PROMPTS.iter().collect();
        assert_eq!(distinct.len(), PROMPTS.len());
    }

    #[test]
    fn long_prompts_have_the_asked_size() {
        let p = long_prompt(2000);
        assert_eq!(p.len(), 11_200);
        assert!(p.starts_with(LONG_PROMPT_PARAGRAPH));
    }

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    /// Two requests with known arrivals: the figures follow from them exactly.
    #[test]
    fn summaries_follow_from_the_records() {
        let start = Instant::now();
        let spec = LoadSpec {
            concurrency: 2,
            requests_per_client: 1,
            gen_tokens: 4,
            long_prompt_tokens: Some(100),
        };
        let record = |sent: u64, tokens: &[u64], finished: u64, usage: Option<u64>| Record {
            sent: at(start, sent),
            tokens: tokens.iter().map(|&t| at(start, t)).collect(),
            completion_tokens: usage,
            prompt_tokens: None,
            finished: at(start, finished),
            error: None,
        };
        let a = record(0, &[100, 110, 120, 130], 131, Some(4));
        // No usage: its token chunks count.
        let b = record(0, &[200, 250, 400], 400, None);
        let failed = Record {
            error: Some("boom".to_string()),
            ..record(0, &[150], 2000, None)
        };
        // Sent at 115, first token at 300: overlaps a's 110-120 and 120-130, b's 200-250 and
        // 250-400.
        let long = Record {
            prompt_tokens: Some(98),
            ..record(115, &[300], 301, Some(1))
        };
        let r = summarize(&spec, start, &[a, b, failed], Some(&long));
        assert_eq!((r.completed, r.failed), (2, 1));
        assert_eq!(r.completion_tokens, 7);
        assert_eq!(r.wall_s, 2.0);
        assert_eq!(r.tokens_per_s, 3.5);
        assert_eq!((r.ttft_p50_ms, r.ttft_p99_ms), (Some(100.0), Some(200.0)));
        // Gaps 10, 10, 10, 50, 150.
        assert_eq!((r.itl_p50_ms, r.itl_p99_ms), (Some(10.0), Some(150.0)));
        assert_eq!(r.first_error.as_deref(), Some("boom"));
        let l = r.long_prompt.expect("long prompt figures");
        assert_eq!(l.ttft_ms, Some(185.0));
        assert_eq!(l.prompt_tokens, Some(98));
        assert_eq!(l.gaps, 4);
        assert_eq!((l.itl_p50_ms, l.itl_p99_ms), (Some(10.0), Some(150.0)));
    }

    /// A stand-in for llama-server: token chunks a few ms apart, keep-alive comments, an
    /// empty-text chunk, events split across writes, usage only in the last chunk; it wants
    /// the API key. Prompt 1 (the dragon's) fails part-way.
    async fn mock_completions(
        headers: axum::http::HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer k") {
            return (axum::http::StatusCode::UNAUTHORIZED, "no key").into_response();
        }
        let request: Value = serde_json::from_slice(&body).expect("request body");
        assert_eq!(request["stream"], true);
        assert_eq!(request["temperature"], 0);
        let max = request["max_tokens"].as_u64().expect("max_tokens");
        let prompt = request["prompt"].as_str().expect("prompt").to_string();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(4);
        tokio::spawn(async move {
            let send = |s: String| {
                let tx = tx.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let _ = tx.send(Ok(Bytes::from(s))).await;
                }
            };
            send(": ping\n\n".to_string()).await;
            for i in 0..max {
                let chunk = json!({"choices": [{"text": format!(" t{i}"), "index": 0, "finish_reason": null}]});
                let event = format!("data: {chunk}\n\n");
                let (a, b) = event.split_at(event.len() / 2);
                send(a.to_string()).await;
                send(b.to_string()).await;
                if i == 0 {
                    send("data: {\"choices\": [{\"text\": \"\", \"index\": 0}]}\n\n".to_string())
                        .await;
                    if prompt == PROMPTS[1] {
                        send("data: {\"error\": {\"message\": \"boom\"}}\n\n".to_string()).await;
                        return;
                    }
                }
            }
            let last = json!({
                "choices": [{"text": "", "index": 0, "finish_reason": "length"}],
                "usage": {
                    "completion_tokens": max,
                    "prompt_tokens": (prompt.len() as f64 / CHARS_PER_TOKEN).round() as u64,
                },
            });
            send(format!("data: {last}\n\ndata: [DONE]\n\n")).await;
        });
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
            .expect("response")
    }

    #[tokio::test]
    async fn drives_a_streaming_server() {
        let app = axum::Router::new()
            .route(
                "/v1/models",
                axum::routing::get(|| async { axum::Json(json!({"data": [{"id": "mock"}]})) }),
            )
            .route("/v1/completions", axum::routing::post(mock_completions));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let spec = LoadSpec {
            concurrency: 3,
            requests_per_client: 2,
            gen_tokens: 5,
            long_prompt_tokens: Some(50),
        };
        let r = drive(&url, Some("k"), &spec).await.expect("drive");
        assert_eq!(r.model, "mock");
        // Prompt 1 (client 1's first request) is the dragon: it fails after one token.
        assert_eq!((r.completed, r.failed), (5, 1));
        assert_eq!(
            r.first_error.as_deref(),
            Some("the server sent an error: boom")
        );
        assert_eq!(r.completion_tokens, 25);
        assert!(r.ttft_p50_ms.is_some() && r.itl_p99_ms.is_some());
        assert!(r.tokens_per_s > 0.0 && r.wall_s > 0.0);
        let l = r.long_prompt.expect("long prompt");
        assert_eq!(l.prompt_tokens, Some(50));
        assert!(l.ttft_ms.is_some());

        let unauthorized = drive(&url, None, &spec).await.expect("drive");
        assert_eq!((unauthorized.completed, unauthorized.failed), (0, 6));
        assert!(unauthorized
            .first_error
            .is_some_and(|e| e.contains("401") && e.contains("no key")));
    }

    #[test]
    fn results_round_trip_through_json() {
        let r = LoadResult {
            server: "realm 2 workers x 1 threads".to_string(),
            model: "m".to_string(),
            workers: Some(2),
            threads: Some(1),
            concurrency: 4,
            requests_per_client: 4,
            gen_tokens: 64,
            completed: 16,
            failed: 0,
            completion_tokens: 1024,
            wall_s: 12.5,
            tokens_per_s: 81.92,
            ttft_p50_ms: Some(40.25),
            ttft_p99_ms: Some(90.5),
            itl_p50_ms: Some(12.0),
            itl_p99_ms: None,
            long_prompt: Some(LongPromptResult {
                prompt_tokens: Some(2010),
                ttft_ms: Some(1500.0),
                itl_p50_ms: Some(30.0),
                itl_p99_ms: Some(400.0),
                gaps: 120,
            }),
            first_error: None,
        };
        let json = r.to_json();
        for key in [
            "concurrency",
            "tokens_per_s",
            "ttft_p99_ms",
            "itl_p50_ms",
            "long_prompt",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert_eq!(LoadResult::from_json(&json), Some(r.clone()));
        let line = serde_json::to_string(&json).expect("json");
        let back: Value = serde_json::from_str(&line).expect("parse");
        assert_eq!(LoadResult::from_json(&back), Some(r.clone()));
        let plain = LoadResult {
            long_prompt: None,
            ..r
        };
        assert_eq!(LoadResult::from_json(&plain.to_json()), Some(plain.clone()));
        assert!(plain.to_string().contains("81.9 tok/s"));
    }
}
