//! Generation: prefill the prompt in one batched pass, then decode token by token.
//!
//! [`Decoding`] is the text side of one generation (sampler, streaming detokenizer, stop
//! strings, limits) and knows nothing of where logits come from, so the same state machine runs
//! over an in-process [`Model`] ([`generate`]) or over a cluster of workers.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
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
        })
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
        if tokenizer.is_end_of_generation(token) {
            let text = self.flush();
            return Ok(Step {
                token,
                text,
                finish: Some(FinishReason::Stop),
            });
        }
        let piece = self.decoder.push(tokenizer, token)?;
        let outcome = self.stops.push(&piece);
        if outcome.stopped() {
            return Ok(Step {
                token,
                text: outcome.text,
                finish: Some(FinishReason::Stop),
            });
        }
        let mut text = outcome.text;
        let full =
            self.generated().len() >= self.max_tokens || self.history.len() >= self.context_length;
        let finish = if full {
            text.push_str(&self.flush());
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(Step {
            token,
            text,
            finish,
        })
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

    /// Releases text held back for a possible stop string or an unfinished character.
    fn flush(&mut self) -> String {
        let tail = self.decoder.finish();
        let mut text = self.stops.push(&tail).text;
        if !self.stops.is_stopped() {
            text.push_str(&self.stops.finish());
        }
        text
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
        let logits: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let step = decoding.step(tokenizer, &logits)?;
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
