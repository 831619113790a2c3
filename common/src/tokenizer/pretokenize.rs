//! Pre-tokenization for byte-level BPE: cutting text into the words that merges run inside.
//!
//! The GPT-2 pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` is
//! matched by hand rather than by a regex engine: the reference tokenizer does the same, and its
//! hand-written matcher differs from a true regex in small ways (contractions are case-sensitive,
//! a segment boundary ends every run). Character classes follow Unicode 15.1 general categories,
//! the version the reference tables were built from, so that the split is identical for every
//! code point, including ones a newer Unicode release would classify differently.

use std::sync::OnceLock;

/// How a byte-level BPE vocabulary cuts text into words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PreTokenizer {
    /// The GPT-2 pattern alone.
    Gpt2,
    /// Every numeric character (`\p{N}`) stands alone; the GPT-2 pattern then runs on the text
    /// between them, never across them.
    IsolatedDigitsGpt2,
}

impl PreTokenizer {
    /// The words of `text`, in order; they concatenate back to `text`.
    pub(crate) fn split(self, text: &str) -> Vec<&str> {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let classes: Vec<CharClass> = chars.iter().map(|&(_, c)| CharClass::of(c)).collect();
        let mut lengths = Vec::with_capacity(chars.len() / 3 + 1);
        match self {
            PreTokenizer::Gpt2 => split_gpt2(&chars, &classes, &mut lengths),
            PreTokenizer::IsolatedDigitsGpt2 => {
                let mut start = 0;
                for (i, class) in classes.iter().enumerate() {
                    if *class == CharClass::Number {
                        split_gpt2(&chars[start..i], &classes[start..i], &mut lengths);
                        lengths.push(1);
                        start = i + 1;
                    }
                }
                split_gpt2(&chars[start..], &classes[start..], &mut lengths);
            }
        }

        let mut words = Vec::with_capacity(lengths.len());
        let mut first = 0;
        for len in lengths {
            let last = first + len;
            let begin = chars[first].0;
            let end = chars.get(last).map_or(text.len(), |&(offset, _)| offset);
            words.push(&text[begin..end]);
            first = last;
        }
        words
    }
}

/// The four classes the GPT-2 pattern distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CharClass {
    /// `\p{L}`
    Letter,
    /// `\p{N}`
    Number,
    /// `\s` (the Unicode White_Space property)
    Space,
    /// Everything else, unassigned code points included.
    Other,
}

impl CharClass {
    pub(crate) fn of(c: char) -> Self {
        if c.is_ascii() {
            return match c {
                'a'..='z' | 'A'..='Z' => CharClass::Letter,
                '0'..='9' => CharClass::Number,
                '\t' | '\n' | '\u{b}' | '\u{c}' | '\r' | ' ' => CharClass::Space,
                _ => CharClass::Other,
            };
        }
        if c.is_whitespace() {
            return CharClass::Space;
        }
        let tables = unicode_tables();
        if in_ranges(&tables.letters, c) {
            CharClass::Letter
        } else if in_ranges(&tables.numbers, c) {
            CharClass::Number
        } else {
            CharClass::Other
        }
    }
}

/// Splits one segment by the GPT-2 pattern, appending each word's length in characters.
/// Nothing outside `chars` is visible: a run stops at the segment's end.
fn split_gpt2(chars: &[(usize, char)], classes: &[CharClass], lengths: &mut Vec<usize>) {
    let n = chars.len();
    let class_at = |i: usize| classes.get(i).copied();
    let mut pos = 0;
    let mut word_start = 0;
    let mut emit = |end: usize, lengths: &mut Vec<usize>| {
        if end > word_start {
            lengths.push(end - word_start);
        }
        word_start = end;
    };

    while pos < n {
        let c = chars[pos].1;

        // 's 't 're 've 'm 'll 'd
        if c == '\'' && pos + 1 < n {
            let c1 = chars[pos + 1].1;
            if matches!(c1, 's' | 't' | 'm' | 'd') {
                pos += 2;
                emit(pos, lengths);
                continue;
            }
            if pos + 2 < n {
                let c2 = chars[pos + 2].1;
                if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += 3;
                    emit(pos, lengths);
                    continue;
                }
            }
        }

        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional leading space, then a run of
        // one class.
        let lead = if c == ' ' {
            class_at(pos + 1)
        } else {
            class_at(pos)
        };
        if let Some(run @ (CharClass::Letter | CharClass::Number | CharClass::Other)) = lead {
            if c == ' ' {
                pos += 1;
            }
            while class_at(pos) == Some(run) {
                pos += 1;
            }
            emit(pos, lengths);
            continue;
        }

        let spaces = (pos..n)
            .take_while(|&i| classes[i] == CharClass::Space)
            .count();
        if spaces > 1 && pos + spaces < n {
            // `\s+(?!\S)`: leave the last space to lead the next word.
            pos += spaces - 1;
        } else if spaces > 0 {
            pos += spaces;
        } else {
            pos += 1;
        }
        emit(pos, lengths);
    }
}

/// Letter and number ranges as of Unicode 15.1, sorted and disjoint.
struct UnicodeTables {
    letters: Vec<(char, char)>,
    numbers: Vec<(char, char)>,
}

fn unicode_tables() -> &'static UnicodeTables {
    static TABLES: OnceLock<UnicodeTables> = OnceLock::new();
    TABLES.get_or_init(|| UnicodeTables {
        letters: class_ranges(r"[\p{L}&&\p{Age=V15_1}]"),
        numbers: class_ranges(r"[\p{N}&&\p{Age=V15_1}]"),
    })
}

/// The ranges of a constant Unicode class expression.
fn class_ranges(pattern: &str) -> Vec<(char, char)> {
    use regex_syntax::hir::{Class, HirKind};
    // The patterns are constants of this module, so failing to parse them is a build defect.
    let hir = regex_syntax::parse(pattern).expect("constant Unicode class pattern");
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => class
            .ranges()
            .iter()
            .map(|r| (r.start(), r.end()))
            .collect(),
        other => panic!("constant pattern {pattern} is not a Unicode class: {other:?}"),
    }
}

fn in_ranges(ranges: &[(char, char)], c: char) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2(text: &str) -> Vec<&str> {
        PreTokenizer::Gpt2.split(text)
    }

    fn digits(text: &str) -> Vec<&str> {
        PreTokenizer::IsolatedDigitsGpt2.split(text)
    }

    #[test]
    fn classes() {
        assert_eq!(CharClass::of('é'), CharClass::Letter);
        assert_eq!(CharClass::of('日'), CharClass::Letter);
        assert_eq!(CharClass::of('٣'), CharClass::Number);
        assert_eq!(CharClass::of('½'), CharClass::Number);
        assert_eq!(CharClass::of('\u{3000}'), CharClass::Space);
        assert_eq!(CharClass::of('\u{85}'), CharClass::Space);
        assert_eq!(CharClass::of('€'), CharClass::Other);
        assert_eq!(CharClass::of('\u{301}'), CharClass::Other);
        // Garay (Unicode 16) was unassigned in 15.1.
        assert_eq!(CharClass::of('\u{10D50}'), CharClass::Other);
        // CJK extension I arrived in 15.1.
        assert_eq!(CharClass::of('\u{2EBF0}'), CharClass::Letter);
    }

    #[test]
    fn gpt2_words() {
        assert_eq!(
            gpt2("Hello, world! It's"),
            ["Hello", ",", " world", "!", " It", "'s"]
        );
        assert_eq!(gpt2("a   b"), ["a", "  ", " b"]);
        assert_eq!(gpt2("a \n\n b"), ["a", " \n\n", " b"]);
        assert_eq!(gpt2("x\n\ny"), ["x", "\n", "\n", "y"]);
        assert_eq!(gpt2("end  "), ["end", "  "]);
        assert_eq!(gpt2("I'M 'Ll"), ["I", "'", "M", " '", "Ll"]);
        assert_eq!(gpt2(" ...!!"), [" ...!!"]);
        assert_eq!(gpt2(""), Vec::<&str>::new());
    }

    #[test]
    fn isolated_digits() {
        assert_eq!(digits("x=1234;"), ["x", "=", "1", "2", "3", "4", ";"]);
        assert_eq!(digits(" 2026-11"), [" ", "2", "0", "2", "6", "-", "1", "1"]);
        // A digit ends the whitespace run before it: no lookahead across segments.
        assert_eq!(digits("a  1"), ["a", "  ", "1"]);
    }
}
