//! BPE over pre-tokenized words (the `gpt2` and `gemma4` tokenizer models).
//!
//! Text is cut into words by the pre-tokenizer and each word is spelled as symbols: byte-level
//! vocabularies (GPT-2 style) spell a word's UTF-8 bytes with the byte-to-character alphabet
//! (printable bytes stand for themselves, the rest map to U+0100 and up), SentencePiece-style
//! ones (Gemma 4) spell it as its own characters, spaces already written as `▁`. Adjacent symbols
//! are merged lowest-rank first, the leftmost pair winning ties. A final symbol that is not a
//! token falls back to its bytes' tokens (single alphabet characters, or `<0xNN>`).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write as _;

use super::pretokenize::PreTokenizer;
use super::{Symbol, Vocab};

/// The character that spells `byte` in the byte-level alphabet.
pub(crate) fn byte_to_char(byte: u8) -> char {
    byte_alphabet().0[usize::from(byte)]
}

/// The byte a character of the byte-level alphabet spells, if it is one.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let code = u32::from(c);
    byte_alphabet()
        .1
        .get(usize::try_from(code).ok()?)
        .copied()
        .flatten()
}

type ByteAlphabet = ([char; 256], [Option<u8>; 0x144]);

fn byte_alphabet() -> &'static ByteAlphabet {
    static ALPHABET: std::sync::OnceLock<ByteAlphabet> = std::sync::OnceLock::new();
    ALPHABET.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut to_char = ['\0'; 256];
        let mut to_byte = [None; 0x144];
        let mut next_unprintable = 0x100u32;
        for byte in 0..=255u8 {
            let code = if printable(byte) {
                u32::from(byte)
            } else {
                next_unprintable += 1;
                next_unprintable - 1
            };
            // Every code here is below 0x144, a valid scalar value.
            let c = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
            to_char[usize::from(byte)] = c;
            to_byte[code as usize] = Some(byte);
        }
        (to_char, to_byte)
    })
}

/// How the words of a vocabulary are spelled as symbols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spelling {
    /// Each UTF-8 byte as one character of the byte-level alphabet.
    ByteLevel,
    /// The text's own characters; bytes missing from the vocabulary become `<0xNN>` tokens.
    Raw,
}

/// Options of a BPE vocabulary besides its merges.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BpeOptions {
    pub pre: PreTokenizer,
    pub spelling: Spelling,
    /// A word that is a token as a whole becomes that token without merging (Llama 3).
    pub ignore_merges: bool,
    /// A word of line feeds alone that is a token becomes that token without merging (Gemma 4).
    pub whole_newlines: bool,
}

/// The merge table and word splitting of a BPE vocabulary.
#[derive(Debug)]
pub(crate) struct Bpe {
    /// The merge's own spelling `"left right"` to its rank (lower ranks merge first) and the
    /// length of its left side: the first space after the first byte separates the sides.
    ranks: HashMap<String, (u32, usize)>,
    options: BpeOptions,
}

impl Bpe {
    pub(crate) fn new(merges: &[&str], options: BpeOptions) -> Self {
        let mut ranks = HashMap::with_capacity(merges.len());
        for (rank, merge) in merges.iter().enumerate() {
            // An entry without a separating space never matches; the first of duplicates wins.
            let Some(split) = merge.bytes().skip(1).position(|b| b == b' ').map(|i| i + 1) else {
                continue;
            };
            let rank = u32::try_from(rank).unwrap_or(u32::MAX);
            ranks.entry((*merge).to_string()).or_insert((rank, split));
        }
        Self { ranks, options }
    }

    pub(crate) fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let mut session = Session::default();
        let mut buffer = String::new();
        for word in self.options.pre.split(text) {
            let spelled: &str = match self.options.spelling {
                Spelling::ByteLevel => {
                    buffer.clear();
                    buffer.extend(word.bytes().map(byte_to_char));
                    &buffer
                }
                Spelling::Raw => word,
            };
            let whole = self.options.ignore_merges
                || (self.options.whole_newlines && spelled.bytes().all(|b| b == b'\n'));
            if let Some(id) = whole.then(|| vocab.id(spelled)).flatten() {
                out.push(id);
                continue;
            }
            session.merge(self, spelled);
            for (start, len) in session.pieces() {
                let piece = &spelled[start..start + len];
                match vocab.id(piece) {
                    Some(id) => out.push(id),
                    None => self.push_bytes(vocab, piece, out),
                }
            }
        }
    }

    /// The byte tokens of a piece that is not a token itself; bytes without one are dropped.
    fn push_bytes(&self, vocab: &Vocab, piece: &str, out: &mut Vec<u32>) {
        match self.options.spelling {
            // Only single bytes of the spelled piece can be tokens here.
            Spelling::ByteLevel => {
                for i in 0..piece.len() {
                    if let Some(id) = piece.get(i..i + 1).and_then(|b| vocab.id(b)) {
                        out.push(id);
                    }
                }
            }
            Spelling::Raw => {
                let mut name = String::with_capacity(6);
                for byte in piece.bytes() {
                    name.clear();
                    let _ = write!(name, "<0x{byte:02X}>");
                    out.extend(vocab.id(&name));
                }
            }
        }
    }

    fn rank(&self, key: &mut String, left: &str, right: &str) -> Option<u32> {
        key.clear();
        key.push_str(left);
        key.push(' ');
        key.push_str(right);
        self.ranks
            .get(key.as_str())
            .filter(|&&(_, split)| split == left.len())
            .map(|&(rank, _)| rank)
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Candidate {
    rank: u32,
    left: usize,
    right: usize,
    /// Bytes of the merged pair when queued; a mismatch later means either side has changed.
    len: usize,
}

impl Ord for Candidate {
    /// The max-heap yields the lowest rank first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Buffers reused across the words of one text.
#[derive(Default)]
struct Session {
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Candidate>,
    key: String,
}

impl Session {
    fn merge(&mut self, bpe: &Bpe, word: &str) {
        self.symbols.clear();
        self.queue.clear();
        let count = word.chars().count();
        for (i, (start, c)) in word.char_indices().enumerate() {
            self.symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: (i + 1 < count).then_some(i + 1),
            });
        }
        for i in 1..self.symbols.len() {
            self.queue_pair(bpe, word, i - 1, i);
        }

        while let Some(top) = self.queue.pop() {
            let (left, right) = (self.symbols[top.left], self.symbols[top.right]);
            if left.len == 0 || right.len == 0 || left.len + right.len != top.len {
                continue;
            }
            self.symbols[top.left].len += right.len;
            self.symbols[top.left].next = right.next;
            self.symbols[top.right].len = 0;
            if let Some(next) = right.next {
                self.symbols[next].prev = Some(top.left);
            }
            if let Some(prev) = left.prev {
                self.queue_pair(bpe, word, prev, top.left);
            }
            if let Some(next) = right.next {
                self.queue_pair(bpe, word, top.left, next);
            }
        }
    }

    fn queue_pair(&mut self, bpe: &Bpe, word: &str, left: usize, right: usize) {
        let (l, r) = (self.symbols[left], self.symbols[right]);
        let left_text = &word[l.start..l.start + l.len];
        let right_text = &word[r.start..r.start + r.len];
        if let Some(rank) = bpe.rank(&mut self.key, left_text, right_text) {
            self.queue.push(Candidate {
                rank,
                left,
                right,
                len: l.len + r.len,
            });
        }
    }

    /// The surviving symbols in text order, as byte ranges of the word.
    fn pieces(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.symbols
            .iter()
            .filter(|s| s.len > 0)
            .map(|s| (s.start, s.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_round_trips() {
        let mut seen = std::collections::HashSet::new();
        for byte in 0..=255u8 {
            let c = byte_to_char(byte);
            assert!(seen.insert(c), "{c:?} spells two bytes");
            assert_eq!(char_to_byte(c), Some(byte));
        }
        assert_eq!(byte_to_char(b'A'), 'A');
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(0), '\u{100}');
        assert_eq!(byte_to_char(0xAD), '\u{143}');
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte('日'), None);
    }

    fn bpe(merges: &[&str]) -> Bpe {
        Bpe::new(
            merges,
            BpeOptions {
                pre: PreTokenizer::Gpt2,
                spelling: Spelling::ByteLevel,
                ignore_merges: false,
                whole_newlines: false,
            },
        )
    }

    #[test]
    fn merges_lowest_rank_first() {
        let bpe = bpe(&["b c", "a b", "a bc"]);
        let mut session = Session::default();
        session.merge(&bpe, "abcab");
        let pieces: Vec<_> = session.pieces().map(|(s, l)| &"abcab"[s..s + l]).collect();
        assert_eq!(pieces, ["abc", "ab"]);
    }

    #[test]
    fn ties_go_to_the_leftmost_pair() {
        let bpe = bpe(&["a a"]);
        let mut session = Session::default();
        session.merge(&bpe, "aaa");
        let pieces: Vec<_> = session.pieces().map(|(s, l)| &"aaa"[s..s + l]).collect();
        assert_eq!(pieces, ["aa", "a"]);
    }

    #[test]
    fn sides_split_at_the_first_space_after_the_first_byte() {
        // " a b" merges " a" with "b"; "a b c" merges "a" with "b c", never "a b" with "c".
        let bpe = bpe(&[" a b", "a b c", "é x"]);
        let mut key = String::new();
        assert_eq!(bpe.rank(&mut key, " a", "b"), Some(0));
        assert_eq!(bpe.rank(&mut key, "a", "b c"), Some(1));
        assert_eq!(bpe.rank(&mut key, "a b", "c"), None);
        // The first byte is skipped, not the first character.
        assert_eq!(bpe.rank(&mut key, "é", "x"), Some(2));
    }

    fn vocab(texts: &[&str]) -> Vocab {
        let n = texts.len();
        Vocab::new(
            texts,
            vec![0.0; n],
            vec![super::super::vocab::attr::NORMAL; n],
        )
        .expect("vocab")
    }

    #[test]
    fn whole_words_skip_merging_when_asked() {
        let v = vocab(&["a", "b", "c", "abc", "ab"]);
        let mut options = BpeOptions {
            pre: PreTokenizer::Gpt2,
            spelling: Spelling::ByteLevel,
            ignore_merges: false,
            whole_newlines: false,
        };
        let mut out = Vec::new();
        Bpe::new(&["a b"], options).encode(&v, "abc", &mut out);
        assert_eq!(out, [4, 2]);
        options.ignore_merges = true;
        out.clear();
        Bpe::new(&["a b"], options).encode(&v, "abc", &mut out);
        assert_eq!(out, [3]);
    }

    #[test]
    fn raw_spelling_keeps_newline_runs_and_falls_back_to_byte_tokens() {
        let v = vocab(&["a", "b", "ab", "\n", "\n\n\n", "<0xC3>", "<0xA9>"]);
        let mut options = BpeOptions {
            pre: PreTokenizer::Newlines,
            spelling: Spelling::Raw,
            ignore_merges: false,
            whole_newlines: true,
        };
        let mut out = Vec::new();
        Bpe::new(&["a b"], options).encode(&v, "ab\n\n\né", &mut out);
        assert_eq!(out, [2, 4, 5, 6]);
        // Without the rule, the line feeds stay apart: no merge joins them.
        options.whole_newlines = false;
        out.clear();
        Bpe::new(&["a b"], options).encode(&v, "ab\n\n\n", &mut out);
        assert_eq!(out, [2, 3, 3, 3]);
    }
}
