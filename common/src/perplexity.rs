//! Perplexity over a token stream, computed the standard way so figures compare with other
//! engines: non-overlapping chunks of `ctx` tokens, each evaluated from an empty cache with BOS as
//! its first token (where the model adds BOS), and only the second half of each chunk scored, so
//! every scored token sees at least `ctx / 2` tokens of context.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;

#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityReport {
    pub ctx: usize,
    pub chunks: usize,
    pub scored_tokens: usize,
    /// Running perplexity after each chunk; the last entry is the result.
    pub per_chunk: Vec<f64>,
}

impl PerplexityReport {
    pub fn perplexity(&self) -> f64 {
        self.per_chunk.last().copied().unwrap_or(f64::NAN)
    }
}

/// Scores `tokens` (the tokenized text, BOS included where the model adds it) in chunks of `ctx`.
/// `bos` replaces the first token of every chunk when given.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    mut on_chunk: impl FnMut(usize, f64),
) -> Result<PerplexityReport> {
    if ctx < 4 {
        return Err(Error::InvalidArgument(format!(
            "context of {ctx} tokens is too small to score"
        )));
    }
    model.config.check_fits(0, ctx)?;
    let chunks = tokens.len() / ctx;
    if chunks < 1 {
        return Err(Error::InvalidArgument(format!(
            "the text has {} tokens, fewer than one chunk of {ctx}",
            tokens.len()
        )));
    }
    let first = ctx / 2;
    let mut nll = 0.0f64;
    let mut count = 0usize;
    let mut per_chunk = Vec::with_capacity(chunks);
    for chunk in 0..chunks {
        let mut input = tokens[chunk * ctx..(chunk + 1) * ctx].to_vec();
        if let Some(bos) = bos {
            input[0] = bos;
        }
        let mut kv = model.new_session_kv();
        let logits = model.forward(&input, &mut kv, true)?;
        // Position j predicts token j + 1; score positions first..ctx-1.
        let scored = logits.narrow(0, first, ctx - 1 - first)?;
        let log_probs = log_softmax_rows(&scored)?;
        for (row, j) in log_probs.iter().zip(first..ctx - 1) {
            let target = input[j + 1] as usize;
            let lp = row.get(target).copied().ok_or_else(|| {
                Error::InvalidArgument(format!("token {target} is outside the model's vocabulary"))
            })?;
            nll -= lp;
            count += 1;
        }
        let ppl = (nll / count as f64).exp();
        per_chunk.push(ppl);
        on_chunk(chunk, ppl);
    }
    Ok(PerplexityReport {
        ctx,
        chunks,
        scored_tokens: count,
        per_chunk,
    })
}

/// Row-wise log-softmax in f64, for stable sums over large vocabularies.
fn log_softmax_rows(logits: &Tensor) -> Result<Vec<Vec<f64>>> {
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let log_sum = row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            row.into_iter().map(|x| x as f64 - log_sum).collect()
        })
        .collect())
}
