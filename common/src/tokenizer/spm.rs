//! SentencePiece-style BPE (the `llama` tokenizer model).
//!
//! Spaces are written as `▁` (U+2581), the text starts as one symbol per character, and the
//! adjacent pair whose concatenation is the highest-scoring token is merged first, the leftmost
//! pair winning ties. Whatever remains that is not a token is emitted byte by byte as `<0xNN>`
//! tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{Symbol, Vocab};
use crate::error::{Error, Result};

/// The character SentencePiece writes for a space.
pub(crate) const SPACE_MARK: char = '\u{2581}';

/// Appends `text` to `out` with every space written as `▁`.
pub(crate) fn push_escaped(out: &mut String, text: &str) {
    out.extend(text.chars().map(|c| if c == ' ' { SPACE_MARK } else { c }));
}

/// Tokenizes one fragment of text that has already had its spaces escaped to `▁`.
pub(crate) fn encode(vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<()> {
    let count = text.chars().count();
    let mut symbols: Vec<Symbol> = text
        .char_indices()
        .enumerate()
        .map(|(i, (start, c))| Symbol {
            start,
            len: c.len_utf8(),
            prev: i.checked_sub(1),
            next: (i + 1 < count).then_some(i + 1),
        })
        .collect();

    let mut queue = BinaryHeap::with_capacity(symbols.len());
    for i in 1..symbols.len() {
        queue_pair(vocab, text, &symbols, &mut queue, i - 1, i);
    }

    while let Some(top) = queue.pop() {
        let (left, right) = (symbols[top.left], symbols[top.right]);
        // Symbols only grow, rightwards, so an unchanged total length means an unchanged pair.
        if left.len == 0 || right.len == 0 || left.len + right.len != top.len {
            continue;
        }
        symbols[top.left].len += right.len;
        symbols[top.left].next = right.next;
        symbols[top.right].len = 0;
        if let Some(next) = right.next {
            symbols[next].prev = Some(top.left);
        }
        if let Some(prev) = left.prev {
            queue_pair(vocab, text, &symbols, &mut queue, prev, top.left);
        }
        if let Some(next) = right.next {
            queue_pair(vocab, text, &symbols, &mut queue, top.left, next);
        }
    }

    // Every merged symbol is a token by construction, so only single characters can be missing
    // from the vocabulary; those are spelled out as byte tokens.
    let mut at = (!symbols.is_empty()).then_some(0);
    while let Some(i) = at {
        let s = symbols[i];
        let piece = &text[s.start..s.start + s.len];
        match vocab.id(piece) {
            Some(id) => out.push(id),
            None => {
                for byte in piece.bytes() {
                    out.push(vocab.byte_token(byte).ok_or_else(|| {
                        Error::Tokenizer(format!(
                            "no token for byte 0x{byte:02X} of {piece:?} (vocabulary lacks byte fallback)"
                        ))
                    })?);
                }
            }
        }
        at = s.next;
    }
    Ok(())
}

#[derive(Debug)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Ord for Candidate {
    /// The max-heap yields the highest score first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

fn queue_pair(
    vocab: &Vocab,
    text: &str,
    symbols: &[Symbol],
    queue: &mut BinaryHeap<Candidate>,
    left: usize,
    right: usize,
) {
    let start = symbols[left].start;
    let len = symbols[left].len + symbols[right].len;
    if let Some(id) = vocab.id(&text[start..start + len]) {
        queue.push(Candidate {
            score: vocab.score(id),
            left,
            right,
            len,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::vocab::{attr, Vocab};
    use super::*;

    fn vocab(tokens: &[(&str, f32)]) -> Vocab {
        let texts: Vec<&str> = tokens.iter().map(|(t, _)| *t).collect();
        let scores = tokens.iter().map(|(_, s)| *s).collect();
        let mut v = Vocab::new(&texts, scores, vec![attr::NORMAL; texts.len()]).expect("vocab");
        v.resolve_byte_tokens();
        v
    }

    fn encode_str(v: &Vocab, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        encode(v, text, &mut out)?;
        Ok(out)
    }

    #[test]
    fn highest_score_merges_first() {
        // In "abc" the better-scoring of "ab" and "bc" forms; the other pair is then gone.
        let v = vocab(&[
            ("a", 0.0),
            ("b", 0.0),
            ("c", 0.0),
            ("ab", -1.0),
            ("bc", -2.0),
        ]);
        assert_eq!(encode_str(&v, "abc").expect("encode"), [3, 2]);
        let v = vocab(&[
            ("a", 0.0),
            ("b", 0.0),
            ("c", 0.0),
            ("ab", -2.0),
            ("bc", -1.0),
        ]);
        assert_eq!(encode_str(&v, "abc").expect("encode"), [0, 4]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let mut tokens = vec![("a", 0.0)];
        let hex: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
        tokens.extend(hex.iter().map(|h| (h.as_str(), 0.0)));
        let v = vocab(&tokens);
        // "é" is C3 A9.
        assert_eq!(
            encode_str(&v, "aé").expect("encode"),
            [0, 1 + 0xC3, 1 + 0xA9]
        );
        let v = vocab(&[("a", 0.0)]);
        assert!(encode_str(&v, "aé").is_err());
    }
}
