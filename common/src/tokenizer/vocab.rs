//! The vocabulary: token texts, scores and attributes, and the text-to-id index.
//!
//! Vocabularies reach 262k tokens, so texts live back to back in one buffer and the reverse
//! index is an open-addressing table of ids over that buffer: building it allocates three
//! vectors rather than half a million strings, and a lookup hashes the probe text once.

use crate::error::{Error, Result};

/// Token attributes, as bit flags (a token can gain `CONTROL` on top of its declared type).
pub(crate) mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;

    /// The attribute of a GGUF `token_type` value; unknown values leave the token undefined,
    /// which renders as nothing.
    pub fn from_gguf_type(t: i64) -> u16 {
        match t {
            1 => NORMAL,
            2 => UNKNOWN,
            3 => CONTROL,
            4 => USER_DEFINED,
            5 => UNUSED,
            6 => BYTE,
            _ => 0,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Vocab {
    /// All token texts, concatenated in id order.
    buffer: String,
    /// `ends[i]` is the end of token `i`'s text in `buffer`; it starts at `ends[i - 1]` (or 0).
    ends: Vec<usize>,
    scores: Vec<f32>,
    pub(crate) attrs: Vec<u16>,
    /// Open-addressing table of token ids (`EMPTY` for a free slot), probed linearly from the
    /// slot the text hashes to. At most half full.
    slots: Vec<u32>,
    /// `64 - log2(slots.len())`: the hash's top bits pick the slot.
    shift: u32,
    /// Byte-fallback token of each byte (SentencePiece vocabularies).
    byte_tokens: [Option<u32>; 256],
    /// The length in bytes of the longest token text.
    longest: usize,
}

const EMPTY: u32 = u32::MAX;

impl Vocab {
    /// Builds a vocabulary. Empty texts become `[EMPTY_<id>]` so that every token stays
    /// addressable; duplicate texts are an error.
    pub(crate) fn new(texts: &[&str], scores: Vec<f32>, attrs: Vec<u16>) -> Result<Self> {
        let n = texts.len();
        if n == 0 || n >= EMPTY as usize {
            return Err(Error::Tokenizer(format!("vocabulary of {n} tokens")));
        }
        let mut buffer = String::with_capacity(texts.iter().map(|t| t.len()).sum());
        let mut ends = Vec::with_capacity(n);
        let mut longest = 0;
        for (id, text) in texts.iter().enumerate() {
            let start = buffer.len();
            if text.is_empty() {
                buffer.push_str(&format!("[EMPTY_{id}]"));
            } else {
                buffer.push_str(text);
            }
            longest = longest.max(buffer.len() - start);
            ends.push(buffer.len());
        }

        let bits = (2 * n).next_power_of_two().trailing_zeros().max(1);
        let mut vocab = Self {
            buffer,
            ends,
            scores,
            attrs,
            slots: vec![EMPTY; 1 << bits],
            shift: 64 - bits,
            byte_tokens: [None; 256],
            longest,
        };
        for id in 0..n as u32 {
            let text = vocab.text_unchecked(id);
            let mut slot = vocab.home_slot(text);
            loop {
                match vocab.slots[slot] {
                    EMPTY => break,
                    other if vocab.text_unchecked(other) == text => {
                        return Err(Error::Tokenizer(format!(
                            "token text {text:?} appears twice in the vocabulary (ids {other} and {id})"
                        )));
                    }
                    _ => slot = (slot + 1) & (vocab.slots.len() - 1),
                }
            }
            vocab.slots[slot] = id;
        }
        Ok(vocab)
    }

    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// The token whose text is exactly `text`.
    pub(crate) fn id(&self, text: &str) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut slot = self.home_slot(text);
        loop {
            match self.slots[slot] {
                EMPTY => return None,
                id if self.text_unchecked(id) == text => return Some(id),
                _ => slot = (slot + 1) & mask,
            }
        }
    }

    /// The length in bytes of the longest token text.
    pub(crate) fn longest_text(&self) -> usize {
        self.longest
    }

    pub(crate) fn text(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.len()).then(|| self.text_unchecked(id))
    }

    pub(crate) fn score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    pub(crate) fn attr(&self, id: u32) -> u16 {
        self.attrs.get(id as usize).copied().unwrap_or(0)
    }

    pub(crate) fn byte_token(&self, byte: u8) -> Option<u32> {
        self.byte_tokens[usize::from(byte)]
    }

    /// Resolves the byte-fallback tokens: `<0xNN>`, or else the byte itself as a token.
    pub(crate) fn resolve_byte_tokens(&mut self) {
        for byte in 0..=255u8 {
            self.byte_tokens[usize::from(byte)] = self
                .id(&format!("<0x{byte:02X}>"))
                .or_else(|| std::str::from_utf8(&[byte]).ok().and_then(|s| self.id(s)));
        }
    }

    /// The first token (lowest id) whose text is one of `texts`.
    pub(crate) fn find_any(&self, texts: &[&str]) -> Option<u32> {
        texts.iter().filter_map(|t| self.id(t)).min()
    }

    /// Token `id`'s text; `id` must be below `len()`.
    fn text_unchecked(&self, id: u32) -> &str {
        let i = id as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buffer[start..self.ends[i]]
    }

    fn home_slot(&self, text: &str) -> usize {
        (hash(text.as_bytes()) >> self.shift) as usize
    }
}

/// A fast multiplicative hash; the table uses its well-mixed top bits.
fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
    }
    h ^ (h >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(texts: &[&str]) -> Result<Vocab> {
        Vocab::new(
            texts,
            vec![0.0; texts.len()],
            vec![attr::NORMAL; texts.len()],
        )
    }

    #[test]
    fn looks_up_every_token() {
        let texts: Vec<String> = (0..5000).map(|i| format!("t{i}")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let v = vocab(&refs).expect("vocab");
        for (i, t) in refs.iter().enumerate() {
            assert_eq!(v.id(t), Some(i as u32));
            assert_eq!(v.text(i as u32), Some(*t));
        }
        assert_eq!(v.id("t5000"), None);
        assert_eq!(v.id(""), None);
        assert_eq!(v.text(5000), None);
    }

    #[test]
    fn empty_texts_get_placeholders_and_duplicates_fail() {
        let v = vocab(&["a", "", "b"]).expect("vocab");
        assert_eq!(v.text(1), Some("[EMPTY_1]"));
        assert_eq!(v.id("[EMPTY_1]"), Some(1));
        assert!(vocab(&["a", "b", "a"]).is_err());
        assert!(vocab(&[]).is_err());
    }
}
