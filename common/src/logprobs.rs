//! Log-probabilities of generated tokens, as the OpenAI API reports them.
//!
//! A token's log-probability is the log-softmax of the model's raw logits at its position: before
//! the repetition penalty, temperature, top-k or top-p, as OpenAI and llama-server (with its
//! default `post_sampling_probs=false`) report them, so the same text has the same numbers
//! whatever the sampling settings. With it go the most likely tokens at that position.
//!
//! Text goes out later than tokens are chosen: a character split over several tokens waits for
//! its last byte, and text that may begin a stop string waits until it cannot. A [`Trail`] holds
//! each token's entry until its text has gone out, so that a streamed piece of text carries the
//! entries of exactly the tokens whose text it holds, and a stop string that cuts the text off
//! drops the entries of the tokens cut away.

use std::collections::VecDeque;

/// The most alternatives a request may ask for at each position (OpenAI's `top_logprobs` bound).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One of the most likely tokens at a position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// A generated token's log-probability, for a token whose text was returned.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The token's bytes in the returned text: all of them, unless a stop string cut the token,
    /// then those before the cut. A token may hold part of a character (a character split over
    /// several tokens), so these need not be UTF-8 on their own; joined in order, the entries'
    /// bytes are the returned text.
    pub bytes: Vec<u8>,
    /// Where the token's text begins in the generated text, in bytes. A token that holds only
    /// the first bytes of a character begins where that character does.
    pub offset: usize,
    /// The most likely tokens at its position, most likely first (ties: lower id first).
    pub top: Vec<TopLogprob>,
}

/// The log-probability of `chosen` and the `top` most likely tokens under the softmax of
/// `logits`. NaN logits count as impossible tokens. `scratch` is reused from call to call.
pub fn of_logits(
    logits: &[f32],
    chosen: u32,
    top: usize,
    scratch: &mut Vec<(u32, f32)>,
) -> (f32, Vec<TopLogprob>) {
    let logit = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let max = logits
        .iter()
        .map(|&l| logit(l))
        .fold(f32::NEG_INFINITY, f32::max);
    // ln Σ exp(l - max), in f64 so that a vocabulary of a quarter of a million entries sums
    // without losing the small ones.
    let ln_sum = if max.is_finite() {
        logits
            .iter()
            .map(|&l| f64::from(logit(l) - max).exp())
            .sum::<f64>()
            .ln()
    } else {
        // Every logit -inf (nothing is possible), or some +inf (those are certain): there is no
        // finite normaliser, and the formula below gives -inf, 0 or NaN as the limits do.
        0.0
    };
    let logprob = |l: f32| (f64::from(logit(l) - max) - ln_sum) as f32;
    let chosen_logprob = logits
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |&l| logprob(l));

    let top = top.min(logits.len());
    if top == 0 {
        return (chosen_logprob, Vec::new());
    }
    scratch.clear();
    scratch.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, logit(l))),
    );
    let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if top < scratch.len() {
        scratch.select_nth_unstable_by(top - 1, by_logit_desc);
        scratch.truncate(top);
    }
    scratch.sort_unstable_by(by_logit_desc);
    let alternatives = scratch
        .iter()
        .map(|&(token, l)| TopLogprob {
            token,
            logprob: logprob(l),
        })
        .collect();
    (chosen_logprob, alternatives)
}

/// A token's bytes as a JSON-safe string: the text where they are UTF-8, and each byte of an
/// incomplete or invalid sequence written `\xNN` (as OpenAI writes a token that holds part of a
/// character; its `bytes` field has the bytes themselves).
pub fn token_string(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                out.push_str(valid);
                break;
            }
            Err(e) => {
                let (valid, tail) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                let bad = e.error_len().unwrap_or(tail.len());
                for b in &tail[..bad] {
                    out.push_str(&format!("\\x{b:02x}"));
                }
                rest = &tail[bad..];
            }
        }
    }
    out
}

/// Entries of chosen tokens waiting for their text to go out.
///
/// Offsets count bytes of the generated text before stop strings: each token's span is the
/// text its bytes completed (a token that holds the first bytes of a character has an empty
/// span where the character begins; the token that completes it spans the whole character).
/// The text given out is always a prefix of that text.
#[derive(Debug, Default)]
pub struct Trail {
    held: VecDeque<Held>,
    /// Bytes of text the tokens so far have completed.
    produced: usize,
}

#[derive(Debug)]
struct Held {
    entry: TokenLogprob,
    /// Where its span ends; `entry.offset` is where it begins.
    end: usize,
}

impl Trail {
    /// Records a chosen token whose bytes completed `completed` bytes of text.
    pub fn push(&mut self, mut entry: TokenLogprob, completed: usize) {
        entry.offset = self.produced;
        self.produced += completed;
        self.held.push_back(Held {
            entry,
            end: self.produced,
        });
    }

    /// Gives the last token `len` more bytes of text: the flush of an unfinished character at
    /// the end of the generation, which the last tokens' bytes began.
    pub fn extend_last(&mut self, len: usize) {
        self.produced += len;
        if let Some(last) = self.held.back_mut() {
            last.end = self.produced;
        }
    }

    /// The entries of the tokens whose text is now all out, `given` bytes being out.
    pub fn release(&mut self, given: usize) -> Vec<TokenLogprob> {
        let mut out = Vec::new();
        while let Some(front) = self.held.front() {
            // An empty span goes with the text after it: its bytes are part of that character
            // (or it has no text at all, like a control token).
            if front.end <= given && front.entry.offset < given {
                out.extend(self.held.pop_front().map(|h| h.entry));
            } else {
                break;
            }
        }
        out
    }

    /// The entries of the last tokens, at the end of the generation: every one if all the text
    /// went out, or, when a stop string cut the text at `cut` bytes, those of the tokens with
    /// text before the cut (a token the cut falls in keeps only the bytes before it).
    pub fn finish(&mut self, cut: Option<usize>) -> Vec<TokenLogprob> {
        let held = std::mem::take(&mut self.held);
        let Some(cut) = cut else {
            return held.into_iter().map(|h| h.entry).collect();
        };
        held.into_iter()
            .filter(|h| h.entry.offset < cut)
            .map(|Held { mut entry, end }| {
                let beyond = end.saturating_sub(cut);
                entry
                    .bytes
                    .truncate(entry.bytes.len().saturating_sub(beyond));
                entry
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(token: u32, bytes: &[u8]) -> TokenLogprob {
        TokenLogprob {
            token,
            logprob: -1.0,
            bytes: bytes.to_vec(),
            offset: 0,
            top: Vec::new(),
        }
    }

    fn tokens(entries: &[TokenLogprob]) -> Vec<u32> {
        entries.iter().map(|e| e.token).collect()
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_the_top_ones_sorted() {
        let probs = [0.1f32, 0.6, 0.3];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() + 7.0).collect();
        let mut scratch = Vec::new();
        let (chosen, top) = of_logits(&logits, 2, 2, &mut scratch);
        assert!((chosen - 0.3f32.ln()).abs() < 1e-6, "{chosen}");
        assert_eq!(top.iter().map(|t| t.token).collect::<Vec<_>>(), [1, 2]);
        assert!((top[0].logprob - 0.6f32.ln()).abs() < 1e-6);
        let (_, all) = of_logits(&logits, 0, 10, &mut scratch);
        assert_eq!(all.len(), 3);
        let total: f32 = all.iter().map(|t| t.logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert!(of_logits(&logits, 0, 0, &mut scratch).1.is_empty());
    }

    #[test]
    fn logprobs_survive_large_vocabularies_and_odd_logits() {
        // A quarter of a million equal logits: each is -ln(n).
        let n = 262_144usize;
        let logits = vec![3.5f32; n];
        let (chosen, top) = of_logits(&logits, 7, 3, &mut Vec::new());
        assert!((chosen + (n as f32).ln()).abs() < 1e-4, "{chosen}");
        // Ties go to the lower ids.
        assert_eq!(top.iter().map(|t| t.token).collect::<Vec<_>>(), [0, 1, 2]);

        let (nan, top) = of_logits(&[f32::NAN, 0.0, 0.0], 0, 3, &mut Vec::new());
        assert_eq!(nan, f32::NEG_INFINITY);
        assert_eq!(top[2].token, 0);
        assert!((top[0].logprob - 0.5f32.ln()).abs() < 1e-6);
        // Out of the vocabulary: impossible.
        assert_eq!(
            of_logits(&[0.0], 9, 0, &mut Vec::new()).0,
            f32::NEG_INFINITY
        );
    }

    #[test]
    fn token_strings_escape_what_is_not_utf8() {
        assert_eq!(token_string(b" Paris"), " Paris");
        assert_eq!(token_string("€".as_bytes()), "€");
        assert_eq!(token_string(&"€".as_bytes()[..2]), "\\xe2\\x82");
        assert_eq!(token_string(b"a\xffb\xac"), "a\\xffb\\xac");
        assert_eq!(token_string(b""), "");
    }

    #[test]
    fn entries_go_out_with_their_text() {
        let mut t = Trail::default();
        t.push(entry(1, b"Hello"), 5);
        assert_eq!(tokens(&t.release(5)), [1]);
        // "€" over three byte tokens: the first two complete nothing.
        let euro = "€".as_bytes();
        t.push(entry(2, &euro[..1]), 0);
        t.push(entry(3, &euro[1..2]), 0);
        assert!(t.release(5).is_empty());
        t.push(entry(4, &euro[2..]), 3);
        let out = t.release(8);
        assert_eq!(tokens(&out), [2, 3, 4]);
        assert_eq!(
            out.iter().map(|e| e.offset).collect::<Vec<_>>(),
            [5, 5, 5],
            "the character's tokens begin where it does"
        );
        let bytes: Vec<u8> = out.iter().flat_map(|e| e.bytes.clone()).collect();
        assert_eq!(bytes, euro);
        // Text held back (it may begin a stop string) holds its token back.
        t.push(entry(5, b" <"), 2);
        assert!(t.release(9).is_empty());
        t.push(entry(6, b"b"), 1);
        assert_eq!(tokens(&t.release(11)), [5, 6]);
        assert!(t.finish(None).is_empty());
    }

    #[test]
    fn a_stop_string_drops_the_tokens_it_cuts_away() {
        // " Paris" ".\n" "Next": stop string "\n" cuts after "." (7 bytes out).
        let mut t = Trail::default();
        t.push(entry(1, b" Paris"), 6);
        assert_eq!(tokens(&t.release(6)), [1]);
        t.push(entry(2, b".\n"), 2);
        t.push(entry(3, b"Next"), 4);
        let out = t.finish(Some(7));
        assert_eq!(tokens(&out), [2]);
        assert_eq!(out[0].bytes, b".");
        assert_eq!(out[0].offset, 6);

        // A stop string over whole tokens: "<|" "end|>" after "ok".
        let mut t = Trail::default();
        t.push(entry(1, b"ok"), 2);
        t.push(entry(2, b"<|"), 2);
        t.push(entry(3, b"end|>"), 5);
        assert_eq!(tokens(&t.release(2)), [1]);
        assert!(t.finish(Some(2)).is_empty());
    }

    #[test]
    fn the_end_releases_everything_left() {
        let mut t = Trail::default();
        t.push(entry(1, b"a"), 1);
        // An unfinished character at the end: its flush (U+FFFD, 3 bytes) is the last token's.
        t.push(entry(2, b"\xe2"), 0);
        t.extend_last(3);
        assert!(t.release(1).len() == 1);
        assert_eq!(tokens(&t.finish(None)), [2]);
    }
}
