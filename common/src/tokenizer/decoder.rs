//! Turning token bytes back into text: incremental UTF-8 assembly for streaming, and the
//! optional cleanup of spaces before punctuation that some BPE vocabularies ask for.

use super::Tokenizer;
use crate::error::Result;

/// Incremental detokenizer for generated tokens.
///
/// A token may end in the middle of a UTF-8 character (byte-fallback tokens always carry one
/// byte); such bytes wait until the character is complete. Bytes that can never form a
/// character become U+FFFD as soon as that is certain. Control tokens contribute nothing. Unlike
/// [`Tokenizer::decode`], the stream neither strips a leading space (it continues a text) nor
/// applies any cleanup that needs to see text on both sides of a token.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.pending.extend(tok.token_bytes(id, false)?);
        Ok(self.take_complete())
    }

    /// Flushes whatever is left: an incomplete trailing character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }

    /// Whether bytes are waiting for the rest of a character.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    out.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, tail) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        // The tail is the start of a character that more bytes may complete.
                        None => {
                            rest = tail;
                            break;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &tail[bad..];
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drop = self.pending.len() - keep;
        self.pending.drain(..drop);
        out
    }
}

/// Removes the spaces a word-level detokenizer would have inserted: before `?`, `!`, `.` and
/// `,`; around a lone `'`; and before the contractions `'s`, `'m`, `'re` and `'ve`.
pub(crate) fn clean_spaces(text: &mut Vec<u8>) {
    // " ?" " !" " ." " ,"
    let src = std::mem::take(text);
    for (i, &x) in src.iter().enumerate() {
        if i > 0 && src[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            text.pop();
        }
        text.push(x);
    }

    // " ' " becomes "'"; the swallowed space no longer counts as a space to the next byte.
    let mut src = std::mem::take(text);
    let mut i = 0;
    while i < src.len() {
        let x = src[i];
        if i > 0 && x == b'\'' && i + 1 < src.len() && src[i - 1] == b' ' && src[i + 1] == b' ' {
            text.pop();
            src[i + 1] = 0;
            text.push(x);
            i += 2;
            continue;
        }
        text.push(x);
        i += 1;
    }

    // " 's" " 'm" " 're" " 've"
    let src = std::mem::take(text);
    for (i, &x) in src.iter().enumerate() {
        if i > 0 && src[i - 1] == b' ' && x == b'\'' && i + 1 < src.len() {
            let x1 = src[i + 1];
            let x2 = src.get(i + 2).copied();
            let contraction = match x1 {
                b's' | b'm' => true,
                b'r' | b'v' => x2 == Some(b'e'),
                _ => false,
            };
            if contraction {
                text.pop();
            }
        }
        text.push(x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cleaned(s: &str) -> String {
        let mut bytes = s.as_bytes().to_vec();
        clean_spaces(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn spaces_before_punctuation_and_contractions_go() {
        assert_eq!(cleaned("Hi , you ! ok ."), "Hi, you! ok.");
        assert_eq!(
            cleaned("it 's we 're I 'm they 've"),
            "it's we're I'm they've"
        );
        assert_eq!(cleaned("don 't we 'll I 'd"), "don 't we 'll I 'd");
        assert_eq!(cleaned("a ' b"), "a'b");
        assert_eq!(cleaned(" ,"), ",");
        assert_eq!(cleaned(""), "");
    }

    #[test]
    fn pending_bytes_wait_for_the_rest_of_a_character() {
        let mut d = StreamDecoder::new();
        let euro = "€".as_bytes();
        d.pending.extend_from_slice(&euro[..1]);
        assert_eq!(d.take_complete(), "");
        d.pending.extend_from_slice(&euro[1..]);
        d.pending.extend_from_slice(b"x");
        assert_eq!(d.take_complete(), "€x");
        assert!(!d.has_pending());
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut d = StreamDecoder::new();
        d.pending.extend_from_slice(b"a\xffb\xe2\x82");
        assert_eq!(d.take_complete(), "a\u{FFFD}b");
        assert!(d.has_pending());
        assert_eq!(d.finish(), "\u{FFFD}");
        assert!(!d.has_pending());
    }
}
