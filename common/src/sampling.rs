//! Token sampling: turns the logits of the last position into the next token id.
//!
//! The chain is the usual one of GGUF engines: a repetition penalty over the recent history and
//! OpenAI's presence and frequency penalties over the tokens generated so far, then either
//! greedy argmax (temperature 0) or top-k → top-p → min-p → temperature → softmax → a draw from
//! a seeded RNG. Top-p and min-p look at the probabilities *before* temperature, as
//! is usual, so temperature only reshapes the distribution among the survivors.
//!
//! A [`Sampler`] belongs to one generation: it owns the RNG (the same seed and the same logits give
//! the same tokens) and scratch buffers reused from step to step, so sampling a vocabulary of a
//! quarter of a million entries does not allocate on every token.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Temperature 0 means greedy decoding.
pub const DEFAULT_TEMPERATURE: f32 = 0.0;
/// 0 disables top-k.
pub const DEFAULT_TOP_K: usize = 0;
/// 1.0 disables top-p.
pub const DEFAULT_TOP_P: f32 = 1.0;
/// 0.0 disables min-p.
pub const DEFAULT_MIN_P: f32 = 0.0;
/// 1.0 disables the repetition penalty.
pub const DEFAULT_REPETITION_PENALTY: f32 = 1.0;
/// The customary default window for the repetition penalty.
pub const DEFAULT_REPEAT_LAST_N: usize = 64;
/// The presence and frequency penalties' bound either way, as OpenAI's.
pub const MAX_OCCURRENCE_PENALTY: f32 = 2.0;

/// Top-p without top-k first tries this many best candidates before sorting the whole
/// vocabulary: with any peaked distribution the nucleus is far smaller.
const TOP_P_FIRST_TRY: usize = 256;

/// How the next token is chosen. The defaults are greedy decoding with every filter off.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Finite and `>= 0`; 0 selects greedy decoding, which ignores the filters below.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; in `(0, 1]`,
    /// 1.0 disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; in `[0, 1]`, 0 disables.
    pub min_p: f32,
    /// Finite and `> 0`: positive logits of recent tokens are divided by it, negative ones
    /// multiplied. 1.0 disables.
    pub repetition_penalty: f32,
    /// How many of the last tokens of the history the penalty looks at; 0 disables the penalty.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of each token generated so far (OpenAI's
    /// `presence_penalty`); in `[-2, 2]`, 0 disables.
    pub presence_penalty: f32,
    /// Subtracted from the logit of each token generated so far once per time it was generated
    /// (OpenAI's `frequency_penalty`); in `[-2, 2]`, 0 disables.
    pub frequency_penalty: f32,
    /// Seed of the RNG; `None` seeds from the operating system.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: DEFAULT_TEMPERATURE,
            top_k: DEFAULT_TOP_K,
            top_p: DEFAULT_TOP_P,
            min_p: DEFAULT_MIN_P,
            repetition_penalty: DEFAULT_REPETITION_PENALTY,
            repeat_last_n: DEFAULT_REPEAT_LAST_N,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: the default parameters.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Whether these parameters pick the argmax rather than drawing.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Rejects parameters that have no meaning, naming the field and the value.
    pub fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(Error::InvalidArgument(msg));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return invalid(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        // Written so that NaN fails too.
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return invalid(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return invalid(format!(
                "repetition_penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if value.is_nan() || value.abs() > MAX_OCCURRENCE_PENALTY {
                return invalid(format!(
                    "{name} must be in [-{MAX_OCCURRENCE_PENALTY}, {MAX_OCCURRENCE_PENALTY}], got \
                     {value}"
                ));
            }
        }
        Ok(())
    }

    fn penalty_active(&self) -> bool {
        self.repetition_penalty != 1.0 && self.repeat_last_n > 0
    }

    /// Whether the presence or frequency penalty is on.
    fn occurrence_penalty_active(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// Chooses tokens for one generation. See the module documentation for the chain.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// The logits after the repetition penalty; only filled when the penalty is active.
    penalized: Vec<f32>,
    /// Distinct recent token ids, for the penalty.
    recent: Vec<u32>,
    /// `(token id, logit)` of the tokens still in the running; then their probabilities.
    candidates: Vec<(u32, f32)>,
    /// How often each token was generated; kept only for the presence and frequency penalties.
    generated: HashMap<u32, u32>,
}

impl Sampler {
    /// Validates `params` and seeds the RNG.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self {
            params,
            rng,
            penalized: Vec::new(),
            recent: Vec::new(),
            candidates: Vec::new(),
            generated: HashMap::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`, the scores of the last position (one per vocabulary
    /// entry). `history` is every token so far, prompt and generated, for the repetition penalty;
    /// ids outside the vocabulary are ignored. NaN logits count as impossible tokens. The token
    /// returned counts as generated, for the presence and frequency penalties.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        let token = self.choose(logits, history)?;
        if self.params.occurrence_penalty_active() {
            *self.generated.entry(token).or_insert(0) += 1;
        }
        Ok(token)
    }

    fn choose(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::InvalidArgument(
                "cannot sample from an empty logits vector".to_string(),
            ));
        }
        if u32::try_from(logits.len()).is_err() {
            return Err(Error::InvalidArgument(format!(
                "{} logits exceed the range of token ids",
                logits.len()
            )));
        }

        let logits = if self.params.penalty_active() || self.params.occurrence_penalty_active() {
            self.apply_penalty(logits, history);
            &self.penalized[..]
        } else {
            logits
        };

        if self.params.is_greedy() {
            return Ok(argmax(logits));
        }

        let candidates = &mut self.candidates;
        candidates.clear();
        candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, if l.is_nan() { f32::NEG_INFINITY } else { l })),
        );

        let mut sorted = false;
        let k = self.params.top_k;
        if k > 0 && k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            candidates.truncate(k);
            candidates.sort_unstable_by(by_logit_desc);
            sorted = true;
        }

        let max = candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        // Nothing finite to normalise against (every logit -inf, or some +inf): the distribution
        // is degenerate, and its mode is the only sensible answer.
        if !max.is_finite() {
            return Ok(argmax(logits));
        }

        if self.params.top_p < 1.0 {
            top_p(candidates, self.params.top_p, max, sorted);
        }

        if self.params.min_p > 0.0 {
            // p_i >= min_p * p_max  <=>  l_i >= l_max + ln(min_p); the max always survives.
            let threshold = max + self.params.min_p.ln();
            candidates.retain(|c| c.1 >= threshold);
        }

        // Temperature, then softmax in place: the second field becomes an unnormalised weight.
        let inv_t = 1.0 / self.params.temperature;
        let scaled_max = max * inv_t;
        let mut total = 0.0f64;
        for c in candidates.iter_mut() {
            let w = ((c.1 * inv_t) - scaled_max).exp();
            c.1 = w;
            total += w as f64;
        }
        if !(total > 0.0 && total.is_finite()) {
            return Ok(argmax(logits));
        }

        let target = self.rng.random::<f64>() * total;
        let mut acc = 0.0f64;
        for c in candidates.iter() {
            acc += c.1 as f64;
            if target < acc {
                return Ok(c.0);
            }
        }
        // Rounding left `target` at the very top of the range: the last candidate with weight.
        Ok(candidates
            .iter()
            .rev()
            .find(|c| c.1 > 0.0)
            .map_or_else(|| argmax(logits), |c| c.0))
    }

    /// Fills `self.penalized` with `logits`, penalising each distinct token among the last
    /// `repeat_last_n` of `history` once, then each generated token by its occurrences.
    fn apply_penalty(&mut self, logits: &[f32], history: &[u32]) {
        self.penalized.clear();
        self.penalized.extend_from_slice(logits);
        if self.params.penalty_active() {
            self.apply_repetition_penalty(history);
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        for (&id, &n) in &self.generated {
            if let Some(l) = self.penalized.get_mut(id as usize) {
                *l -= presence + frequency * n as f32;
            }
        }
    }

    /// Penalises each distinct token among the last `repeat_last_n` of `history` once.
    fn apply_repetition_penalty(&mut self, history: &[u32]) {
        let window = &history[history.len().saturating_sub(self.params.repeat_last_n)..];
        self.recent.clear();
        self.recent.extend_from_slice(window);
        self.recent.sort_unstable();
        self.recent.dedup();

        let penalty = self.params.repetition_penalty;
        for &id in &self.recent {
            if let Some(l) = self.penalized.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// Descending logit, ties broken by ascending id, so selection and sorting are deterministic.
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The id of the largest logit; ties go to the lowest id and NaN never wins. Requires a
/// non-empty slice whose length fits `u32` (checked by [`Sampler::sample`]).
/// The first id of the largest logit (NaN never wins; 0 when none is above −∞). The largest
/// is found lane by lane, a loop the compiler turns into vector maxima, then its first
/// position a vector's worth at a time: 13 µs over gemma3's 262,144 logits on the project's
/// machine, where one comparison after the other took up to 215.
fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            *m = if l > *m { l } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    let chunk = logits
        .chunks(LANES)
        .position(|c| c.iter().fold(false, |found, &l| found | (l == max)))
        .unwrap_or(0);
    let within = logits[chunk * LANES..]
        .iter()
        .position(|&l| l == max)
        .unwrap_or(0);
    (chunk * LANES + within) as u32
}

/// Keeps the smallest prefix of the most likely candidates whose probability (at temperature 1)
/// reaches `p`, at least one. `max` is the largest logit; on return the candidates are sorted.
fn top_p(candidates: &mut Vec<(u32, f32)>, p: f32, max: f32, sorted: bool) {
    let total: f64 = candidates.iter().map(|c| ((c.1 - max).exp()) as f64).sum();
    let target = p as f64 * total;

    // The nucleus is usually tiny: sort a small head first, and the whole set only if the head
    // does not reach `p`.
    if !sorted {
        let head = TOP_P_FIRST_TRY.min(candidates.len());
        if head < candidates.len() {
            candidates.select_nth_unstable_by(head - 1, by_logit_desc);
        }
        candidates[..head].sort_unstable_by(by_logit_desc);
        if let Some(keep) = nucleus_len(&candidates[..head], max, target) {
            candidates.truncate(keep);
            return;
        }
        candidates.sort_unstable_by(by_logit_desc);
    }
    let keep = nucleus_len(candidates, max, target).unwrap_or(candidates.len());
    candidates.truncate(keep);
}

/// How many of the sorted `candidates` it takes for their weight to reach `target`.
fn nucleus_len(candidates: &[(u32, f32)], max: f32, target: f64) -> Option<usize> {
    let mut acc = 0.0f64;
    for (i, c) in candidates.iter().enumerate() {
        acc += ((c.1 - max).exp()) as f64;
        if acc >= target {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params).expect("valid params")
    }

    fn seeded(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn default_is_greedy_and_valid() {
        let p = SamplingParams::default();
        assert!(p.is_greedy());
        p.validate().unwrap();
    }

    #[test]
    fn greedy_picks_argmax() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 2.5, -1.0, 2.4], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[-5.0, -3.0, -4.0], &[]).unwrap(), 1);
    }

    #[test]
    fn argmax_is_the_first_id_of_the_largest_logit() {
        let sequential = |logits: &[f32]| {
            let (mut best, mut best_logit) = (0usize, f32::NEG_INFINITY);
            for (i, &l) in logits.iter().enumerate() {
                if l > best_logit {
                    (best, best_logit) = (i, l);
                }
            }
            best as u32
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for len in [1, 15, 16, 17, 100, 1000] {
            for _ in 0..50 {
                // Few distinct values: ties, and zeros of both signs.
                let mut logits: Vec<f32> = (0..len)
                    .map(|_| [-0.0, 0.0, 1.0, -2.0, 7.5][rng.random_range(0..5)])
                    .collect();
                if rng.random_bool(0.3) {
                    logits[rng.random_range(0..len)] = f32::NAN;
                }
                assert_eq!(argmax(&logits), sequential(&logits), "{logits:?}");
            }
        }
        for logits in [
            vec![f32::NAN; 20],
            vec![f32::NEG_INFINITY; 20],
            vec![f32::NAN, f32::NEG_INFINITY, f32::INFINITY, f32::INFINITY],
        ] {
            assert_eq!(argmax(&logits), sequential(&logits), "{logits:?}");
        }
    }

    #[test]
    fn greedy_ties_go_to_lowest_id_and_nan_never_wins() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, 3.0], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NAN, 0.5, f32::NAN], &[]).unwrap(), 1);
    }

    #[test]
    fn empty_logits_are_an_error() {
        let mut s = sampler(SamplingParams::greedy());
        assert!(matches!(s.sample(&[], &[]), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01)
            .collect();
        let want = argmax(&logits);
        let mut s = sampler(SamplingParams {
            top_k: 1,
            ..seeded(1.5, 7)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits, &[]).unwrap(), want);
        }
    }

    #[test]
    fn tiny_top_p_picks_the_top_token() {
        // Flat enough that a plain draw at temperature 2 would wander.
        let logits: Vec<f32> = (0..5000).map(|i| (i % 17) as f32 * 0.05).collect();
        let want = argmax(&logits);
        let mut s = sampler(SamplingParams {
            top_p: 1e-6,
            ..seeded(2.0, 11)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits, &[]).unwrap(), want);
        }
    }

    #[test]
    fn top_p_keeps_exactly_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps the first two (0.5 + 0.3 reaches 0.8).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        let mut s = sampler(SamplingParams {
            top_p: 0.79,
            ..seeded(1.0, 3)
        });
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits, &[]).unwrap() as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
    }

    #[test]
    fn top_p_with_a_wide_nucleus_sorts_everything() {
        // A flat distribution over more than TOP_P_FIRST_TRY tokens: the head cannot reach p.
        let logits = vec![0.0f32; 4 * TOP_P_FIRST_TRY];
        let mut s = sampler(SamplingParams {
            top_p: 0.5,
            ..seeded(1.0, 5)
        });
        let mut max_id = 0;
        for _ in 0..2000 {
            max_id = max_id.max(s.sample(&logits, &[]).unwrap());
        }
        // Ties sort by id, so the nucleus is ids 0..2*TOP_P_FIRST_TRY.
        assert!(max_id as usize >= TOP_P_FIRST_TRY, "{max_id}");
        assert!((max_id as usize) < 2 * TOP_P_FIRST_TRY, "{max_id}");
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Probabilities 0.6, 0.3, 0.1: min_p 0.4 keeps those >= 0.24.
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let mut s = sampler(SamplingParams {
            min_p: 0.4,
            ..seeded(1.0, 9)
        });
        let mut seen = [0usize; 3];
        for _ in 0..2000 {
            seen[s.sample(&logits, &[]).unwrap() as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2], 0, "{seen:?}");
    }

    #[test]
    fn repetition_penalty_demotes_a_repeated_token() {
        let logits = [1.0, 2.0, 1.8, -0.5];
        let mut plain = sampler(SamplingParams::greedy());
        assert_eq!(plain.sample(&logits, &[1, 1, 1]).unwrap(), 1);

        let mut penalised = sampler(SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::greedy()
        });
        // 2.0 / 1.5 < 1.8: token 2 now wins.
        assert_eq!(penalised.sample(&logits, &[1, 1, 1]).unwrap(), 2);
        // Penalised once per distinct token, not once per occurrence: 2.0 / 1.5 = 1.33 still beats
        // 1.2, which 2.0 / 1.5 / 1.5 = 0.89 would not.
        assert_eq!(penalised.sample(&[1.2, 2.0], &[1, 1, 1, 1]).unwrap(), 1);
        // A negative logit is multiplied, pushing it further down.
        penalised.sample(&logits, &[3]).unwrap();
        assert_eq!(penalised.penalized[3], -0.75);
        // Out-of-vocabulary ids in the history are ignored.
        assert_eq!(penalised.sample(&logits, &[u32::MAX, 99]).unwrap(), 1);
    }

    #[test]
    fn presence_and_frequency_penalties_demote_generated_tokens() {
        let logits = [1.0, 2.0, 1.5];
        let run = |params: SamplingParams| {
            let mut s = sampler(params);
            // The history (a prompt full of token 1) does not count: only what was generated.
            (0..4)
                .map(|_| s.sample(&logits, &[1, 1, 1]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(SamplingParams::greedy()), [1, 1, 1, 1]);
        // Once generated, token 1 is at 2.0 - 0.6 = 1.4 < 1.5; then token 2 at 0.9.
        let presence = SamplingParams {
            presence_penalty: 0.6,
            ..SamplingParams::greedy()
        };
        assert_eq!(run(presence), [1, 2, 1, 1]);
        // 2.0 - 0.3 = 1.7 still wins; 2.0 - 0.6 = 1.4 no longer; 1.5 - 0.3 = 1.2 < 1.4.
        let frequency = SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::greedy()
        };
        assert_eq!(run(frequency), [1, 1, 2, 1]);
        // Negative values encourage repeats.
        let encourage = SamplingParams {
            presence_penalty: -2.0,
            ..SamplingParams::greedy()
        };
        assert_eq!(run(encourage), [1, 1, 1, 1]);
    }

    #[test]
    fn repetition_penalty_only_sees_the_window() {
        let logits = [1.0, 2.0, 1.8];
        let mut s = sampler(SamplingParams {
            repetition_penalty: 1.5,
            repeat_last_n: 2,
            ..SamplingParams::greedy()
        });
        // Token 1 is three tokens back, outside the window of 2.
        assert_eq!(s.sample(&logits, &[1, 0, 0]).unwrap(), 1);
        assert_eq!(s.sample(&logits, &[0, 0, 1]).unwrap(), 2);
    }

    #[test]
    fn same_seed_same_choices() {
        let logits: Vec<f32> = (0..300).map(|i| ((i * 37) % 101) as f32 * 0.03).collect();
        let params = SamplingParams {
            top_k: 50,
            top_p: 0.9,
            ..seeded(0.8, 1234)
        };
        let run = |params: SamplingParams| -> Vec<u32> {
            let mut s = sampler(params);
            (0..200).map(|_| s.sample(&logits, &[]).unwrap()).collect()
        };
        let a = run(params.clone());
        assert_eq!(a, run(params.clone()));
        let other = run(SamplingParams {
            seed: Some(4321),
            ..params
        });
        assert_ne!(a, other, "a different seed should change some draw");
        // And the draws are not all the same token.
        assert!(a.iter().any(|&t| t != a[0]));
    }

    #[test]
    fn draws_follow_the_distribution() {
        let probs = [0.5f32, 0.3, 0.2];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        let mut s = sampler(seeded(1.0, 42));
        let n = 20_000;
        let mut seen = [0usize; 3];
        for _ in 0..n {
            seen[s.sample(&logits, &[]).unwrap() as usize] += 1;
        }
        for (i, &p) in probs.iter().enumerate() {
            let f = seen[i] as f32 / n as f32;
            assert!((f - p).abs() < 0.02, "token {i}: {f} vs {p} ({seen:?})");
        }
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [1.0f32, 0.0];
        let share_of_top = |t: f32| {
            let mut s = sampler(seeded(t, 8));
            let hits = (0..10_000)
                .filter(|_| s.sample(&logits, &[]).unwrap() == 0)
                .count();
            hits as f32 / 10_000.0
        };
        // p(top) = 1 / (1 + e^(-1/t)): 0.73 at t = 1, 0.88 at t = 0.5, 0.62 at t = 2.
        let (cold, normal, hot) = (share_of_top(0.5), share_of_top(1.0), share_of_top(2.0));
        assert!((normal - 0.731).abs() < 0.02, "{normal}");
        assert!((cold - 0.881).abs() < 0.02, "{cold}");
        assert!((hot - 0.622).abs() < 0.02, "{hot}");
    }

    #[test]
    fn degenerate_logits_do_not_panic() {
        let mut s = sampler(seeded(1.0, 1));
        let all_neg_inf = [f32::NEG_INFINITY; 4];
        assert_eq!(s.sample(&all_neg_inf, &[]).unwrap(), 0);
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0], &[]).unwrap(), 1);
        assert_eq!(s.sample(&[f32::NAN, f32::NAN, 2.0], &[]).unwrap(), 2);
    }

    #[test]
    fn invalid_params_are_rejected() {
        let cases = [
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: -0.01,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: -1.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: f32::NAN,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::NAN,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
        ];
        for (params, field) in cases {
            match Sampler::new(params.clone()) {
                Err(Error::InvalidArgument(msg)) => {
                    assert!(msg.starts_with(field), "{params:?}: {msg}")
                }
                other => panic!("{params:?} accepted: {other:?}"),
            }
        }
    }
}
