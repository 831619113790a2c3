//! Generation: prefill the prompt in one batched pass, then decode token by token.
//!
//! [`Decoding`] is the text side of one generation (sampler, streaming detokenizer, stop
//! strings, limits) and knows nothing of where logits come from, so the same state machine runs
//! over an in-process [`Model`] ([`generate`]) or over a cluster of workers.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::logprobs::{self, TokenLogprob, Trail, MAX_TOP_LOGPROBS};
use crate::model::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Tokens generated when the caller does not say.
pub const DEFAULT_MAX_TOKENS: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings; the stop string itself is not emitted.
    pub stop: Vec<String>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: DEFAULT_MAX_TOKENS,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token, or a stop string appeared.
    Stop,
    /// `max_tokens` were generated, or the context window is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// What one decoding step produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub token: u32,
    /// Text that became final with this token (possibly empty).
    pub text: String,
    pub finish: Option<FinishReason>,
    /// When the generation reports log-probabilities: the entries of the tokens whose text went
    /// out with this step's `text` (see [`crate::logprobs::Trail`]), which may trail `token`.
    pub logprobs: Vec<TokenLogprob>,
}

/// The text side of one generation.
#[derive(Debug)]
pub struct Decoding {
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    /// Prompt and generated tokens so far.
    history: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    context_length: usize,
    /// Set when the request asked for log-probabilities; nothing is computed otherwise.
    logprobs: Option<Logprobs>,
}

/// The log-probability side of a generation that reports them.
#[derive(Debug)]
struct Logprobs {
    /// Alternatives reported at each position.
    top: usize,
    trail: Trail,
    /// Bytes of text given out so far.
    given: usize,
    scratch: Vec<(u32, f32)>,
}

impl Decoding {
    /// Validates the request against the context window and sets up the sampler.
    pub fn new(
        tokenizer: &Tokenizer,
        prompt: Vec<u32>,
        params: &GenerationParams,
        context_length: usize,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("the prompt is empty".to_string()));
        }
        if prompt.len() >= context_length {
            return Err(Error::ContextOverflow {
                tokens: prompt.len(),
                context: context_length,
            });
        }
        if params.max_tokens == 0 {
            return Err(Error::InvalidArgument(
                "max_tokens must be at least 1".to_string(),
            ));
        }
        Ok(Self {
            sampler: Sampler::new(params.sampling.clone())?,
            decoder: tokenizer.stream_decoder(),
            stops: StopMatcher::new(params.stop.clone())?,
            prompt_len: prompt.len(),
            history: prompt,
            max_tokens: params.max_tokens,
            context_length,
            logprobs: None,
        })
    }

    /// Reports each token's log-probability and the `top` most likely tokens at its position
    /// (at most [`MAX_TOP_LOGPROBS`]) with the text of each step.
    pub fn report_logprobs(&mut self, top: usize) -> Result<()> {
        if top > MAX_TOP_LOGPROBS {
            return Err(Error::InvalidArgument(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}, got {top}"
            )));
        }
        self.logprobs = Some(Logprobs {
            top,
            trail: Trail::default(),
            given: 0,
            scratch: Vec::new(),
        });
        Ok(())
    }

    pub fn prompt(&self) -> &[u32] {
        &self.history[..self.prompt_len]
    }

    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// The prompt and the tokens generated so far: what the model has to have seen before the
    /// next token is sampled.
    pub fn tokens(&self) -> &[u32] {
        &self.history
    }

    /// Samples the next token from `logits` (the last position's) and turns it into text.
    pub fn step(&mut self, tokenizer: &Tokenizer, logits: &[f32]) -> Result<Step> {
        let token = self.sampler.sample(logits, &self.history)?;
        self.history.push(token);
        let entry = match &mut self.logprobs {
            Some(lp) => {
                let (logprob, top) = logprobs::of_logits(logits, token, lp.top, &mut lp.scratch);
                Some(TokenLogprob {
                    token,
                    logprob,
                    bytes: tokenizer.token_bytes(token, false)?,
                    offset: 0,
                    top,
                })
            }
            None => None,
        };
        if tokenizer.is_end_of_generation(token) {
            // Its own text is not returned, so neither is its entry.
            let (text, stopped) = self.flush();
            let logprobs = self.give(&text, Some(stopped));
            return Ok(Step {
                token,
                text,
                finish: Some(FinishReason::Stop),
                logprobs,
            });
        }
        let piece = self.decoder.push(tokenizer, token)?;
        if let (Some(lp), Some(entry)) = (&mut self.logprobs, entry) {
            lp.trail.push(entry, piece.len());
        }
        let outcome = self.stops.push(&piece);
        if outcome.stopped() {
            let logprobs = self.give(&outcome.text, Some(true));
            return Ok(Step {
                token,
                text: outcome.text,
                finish: Some(FinishReason::Stop),
                logprobs,
            });
        }
        let mut text = outcome.text;
        let full =
            self.generated().len() >= self.max_tokens || self.history.len() >= self.context_length;
        let (finish, end) = if full {
            let (tail, stopped) = self.flush();
            text.push_str(&tail);
            (Some(FinishReason::Length), Some(stopped))
        } else {
            (None, None)
        };
        let logprobs = self.give(&text, end);
        Ok(Step {
            token,
            text,
            finish,
            logprobs,
        })
    }

    /// The entries of the tokens whose text is out once `text` goes out; `end` is set at the
    /// end of the generation, to whether a stop string cut the text.
    fn give(&mut self, text: &str, end: Option<bool>) -> Vec<TokenLogprob> {
        let Some(lp) = &mut self.logprobs else {
            return Vec::new();
        };
        lp.given += text.len();
        match end {
            None => lp.trail.release(lp.given),
            Some(stopped) => lp.trail.finish(stopped.then_some(lp.given)),
        }
    }

    /// The finished generation: its tokens, `text`, why it ended and how long it took.
    pub fn completion(
        &self,
        text: String,
        finish: FinishReason,
        time_to_first_token: Duration,
        total: Duration,
    ) -> Completion {
        Completion {
            usage: Usage {
                prompt_tokens: self.prompt().len(),
                generated_tokens: self.generated().len(),
                time_to_first_token,
                total,
            },
            tokens: self.generated().to_vec(),
            text,
            finish,
        }
    }

    /// Releases text held back for a possible stop string or an unfinished character, and
    /// whether a stop string cut it.
    fn flush(&mut self) -> (String, bool) {
        let tail = self.decoder.finish();
        if let Some(lp) = &mut self.logprobs {
            lp.trail.extend_last(tail.len());
        }
        let mut text = self.stops.push(&tail).text;
        let stopped = self.stops.is_stopped();
        if !stopped {
            text.push_str(&self.stops.finish());
        }
        (text, stopped)
    }
}

/// Counts and timings of a finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub time_to_first_token: Duration,
    pub total: Duration,
}

impl Usage {
    /// Decode speed: tokens after the first over the time after the first.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let decode = self
            .total
            .saturating_sub(self.time_to_first_token)
            .as_secs_f64();
        if self.generated_tokens < 2 || decode <= 0.0 {
            return 0.0;
        }
        (self.generated_tokens - 1) as f64 / decode
    }

    /// Prefill speed: prompt tokens over the time to the first token.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        let t = self.time_to_first_token.as_secs_f64();
        if t <= 0.0 {
            return 0.0;
        }
        self.prompt_tokens as f64 / t
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub usage: Usage,
}

/// Generates in this process, calling `on_text` with each piece of text as it becomes final.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: Vec<u32>,
    params: &GenerationParams,
    mut on_text: impl FnMut(&str),
) -> Result<Completion> {
    let start = Instant::now();
    let mut decoding = Decoding::new(tokenizer, prompt, params, model.config.context_length)?;
    let mut kv = model.new_session_kv();
    let mut input = decoding.prompt().to_vec();
    let mut text = String::new();
    let mut first_token_at = None;
    loop {
        let logits = model.forward(&input, &mut kv, false)?;
        // Read in place: a copy of a large vocabulary's logits costs tens of µs a token.
        let step = crate::model::with_values(&logits, |logits| decoding.step(tokenizer, logits))??;
        first_token_at.get_or_insert_with(|| start.elapsed());
        if !step.text.is_empty() {
            on_text(&step.text);
            text.push_str(&step.text);
        }
        if let Some(finish) = step.finish {
            let first = first_token_at.unwrap_or_default();
            return Ok(decoding.completion(text, finish, first, start.elapsed()));
        }
        input = vec![step.token];
    }
}
