//! Pre-tokenization for BPE: cutting text into the words that merges run inside.
//!
//! Each vocabulary names its pre-tokenizer (`tokenizer.ggml.pre`), which the reference defines as
//! a list of regular expressions applied in turn: every pattern cuts each word left by the
//! previous ones at its matches, the text between two matches staying one word. The patterns are
//! matched here by hand rather than by a regex engine. The reference runs the common ones through
//! hand-written matchers that differ from a true regex in small ways (a word boundary ends every
//! run, a lone trailing space is its own word), and the rest through a regex engine that sees every
//! non-ASCII character only through its category and every non-ASCII space as `\v`; both are
//! reproduced exactly, in linear time.
//!
//! Character classes follow Unicode 15.1 ([`super::unicode`]), the version the reference tables
//! were built from, so that the split is identical for every code point.

use std::ops::Range;

use super::unicode::{in_ranges, CharInfo};

/// How a BPE vocabulary cuts text into words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PreTokenizer {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` (GPT-2).
    Gpt2,
    /// Every numeric character (`\p{N}`) stands alone; the GPT-2 pattern then runs on the text
    /// between them, never across them (StarCoder, SmolLM).
    IsolatedDigitsGpt2,
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    /// (Llama 3).
    Llama3,
    /// Llama 3's pattern with `\p{N}` alone rather than up to three (Qwen 2).
    Qwen2,
    /// Qwen 2's pattern with combining marks (`\p{M}`) counting as letters (Qwen 3.5).
    Qwen35,
    /// DeepSeek LLM: line breaks alone, then cased letters and ASCII/CJK punctuation each with an
    /// optional leading space, trailing spaces, CJK runs, number runs.
    DeepseekLlm,
    /// DeepSeek Coder: line breaks alone, then letters and punctuation each with an optional
    /// leading space, CJK runs, every numeric character alone.
    DeepseekCoder,
    /// Falcon: punctuation runs, then the GPT-2 pattern, then ASCII digits in threes.
    Falcon,
    /// `[^\n]+|[\n]+`: runs of line feeds and runs of everything else (Gemma 4, whose BPE runs on
    /// the whole text).
    Newlines,
}

/// One pattern of a pre-tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The GPT-2 pattern, which leaves nothing unmatched.
    Gpt2,
    /// The Llama 3 family of patterns, which leaves nothing unmatched. Numbers go in runs of up
    /// to `digits`; with `marks`, combining marks count as letters.
    Llama3 { digits: usize, marks: bool },
    /// `\s+$`: the spaces that end the word.
    TrailingSpace,
    /// Any other pattern: its matches are words, and so is the text between them.
    Matches(Pattern),
}

/// A pattern matched at one position, as a backtracking regex engine would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// `class`
    One(Class),
    /// `class+`
    Run(Class),
    /// `\s?class+`
    SpacedRun(Class),
    /// `[0-9][0-9][0-9]`
    ThreeDigits,
    /// `[^\n]+|[\n]+`
    NewlineRuns,
}

/// A character class of a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// `[\r\n]`
    LineBreak,
    /// `\p{L}`
    Letter,
    /// `\p{N}`
    Number,
    /// `\p{P}`
    Punctuation,
    /// `[\p{P}\$\+<=>\^~\|`]`
    PunctuationAndSymbols,
    /// The explicit cased-letter ranges of DeepSeek LLM's pattern.
    DeepseekLetter,
    /// `[!-/:-~！-／：-～‘-‟　-。]`
    DeepseekPunctuation,
    /// `[一-龥ࠀ-一가-퟿]`
    Cjk,
}

impl PreTokenizer {
    fn stages(self) -> &'static [Stage] {
        use Class::*;
        use Pattern::*;
        use Stage::Matches;
        match self {
            PreTokenizer::Gpt2 => &[Stage::Gpt2],
            PreTokenizer::IsolatedDigitsGpt2 => &[Matches(One(Number)), Stage::Gpt2],
            PreTokenizer::Llama3 => &[Stage::Llama3 {
                digits: 3,
                marks: false,
            }],
            PreTokenizer::Qwen2 => &[Stage::Llama3 {
                digits: 1,
                marks: false,
            }],
            PreTokenizer::Qwen35 => &[Stage::Llama3 {
                digits: 1,
                marks: true,
            }],
            PreTokenizer::DeepseekLlm => &[
                Matches(One(LineBreak)),
                Matches(SpacedRun(DeepseekLetter)),
                Matches(SpacedRun(DeepseekPunctuation)),
                Stage::TrailingSpace,
                Matches(Run(Cjk)),
                Matches(Run(Number)),
            ],
            PreTokenizer::DeepseekCoder => &[
                Matches(One(LineBreak)),
                Matches(SpacedRun(Letter)),
                Matches(SpacedRun(Punctuation)),
                Matches(Run(Cjk)),
                Matches(One(Number)),
            ],
            PreTokenizer::Falcon => &[
                Matches(Run(PunctuationAndSymbols)),
                Stage::Gpt2,
                Matches(ThreeDigits),
            ],
            PreTokenizer::Newlines => &[Matches(NewlineRuns)],
        }
    }

    /// The words of `text`, in order; they concatenate back to `text`.
    pub(crate) fn split(self, text: &str) -> Vec<&str> {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let infos: Vec<CharInfo> = chars.iter().map(|&(_, c)| CharInfo::of(c)).collect();
        let text_chars = Text {
            chars: &chars,
            infos: &infos,
        };

        // Word lengths in characters; each stage cuts the words of the previous one.
        let mut lengths = Vec::new();
        if !chars.is_empty() {
            lengths.push(chars.len());
        }
        let mut next = Vec::with_capacity(chars.len() / 3 + 1);
        for stage in self.stages() {
            next.clear();
            let mut start = 0;
            for &len in &lengths {
                let word = start..start + len;
                match *stage {
                    Stage::Gpt2 => split_gpt2(&text_chars, word, &mut next),
                    Stage::Llama3 { digits, marks } => {
                        split_llama3(&text_chars, word, digits, marks, &mut next)
                    }
                    Stage::TrailingSpace => split_trailing_space(&text_chars, word, &mut next),
                    Stage::Matches(pattern) => split_matches(&text_chars, word, pattern, &mut next),
                }
                start += len;
            }
            std::mem::swap(&mut lengths, &mut next);
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

/// The characters of the text being split and their properties.
struct Text<'a> {
    chars: &'a [(usize, char)],
    infos: &'a [CharInfo],
}

impl Text<'_> {
    fn char(&self, i: usize) -> char {
        self.chars[i].1
    }
}

/// Appends word lengths for one word of the previous stage, skipping empty ones.
struct Emitter<'a> {
    lengths: &'a mut Vec<usize>,
    word_start: usize,
}

impl Emitter<'_> {
    fn emit(&mut self, end: usize) {
        if end > self.word_start {
            self.lengths.push(end - self.word_start);
        }
        self.word_start = end;
    }
}

/// The three classes of the GPT-2 pattern plus everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gpt2Class {
    Letter,
    Number,
    Space,
    Other,
}

impl Gpt2Class {
    fn of(info: CharInfo) -> Self {
        if info.space {
            Gpt2Class::Space
        } else if info.is_letter() {
            Gpt2Class::Letter
        } else if info.is_number() {
            Gpt2Class::Number
        } else {
            Gpt2Class::Other
        }
    }
}

/// Splits one word by the GPT-2 pattern. Nothing outside `word` is visible: a run stops at its
/// end.
fn split_gpt2(text: &Text, word: Range<usize>, lengths: &mut Vec<usize>) {
    let n = word.end;
    let class_at = |i: usize| (i < n).then(|| Gpt2Class::of(text.infos[i]));
    let mut out = Emitter {
        lengths,
        word_start: word.start,
    };
    let mut pos = word.start;

    while pos < n {
        let c = text.char(pos);

        // 's 't 're 've 'm 'll 'd
        if c == '\'' && pos + 1 < n {
            let c1 = text.char(pos + 1);
            if matches!(c1, 's' | 't' | 'm' | 'd') {
                pos += 2;
                out.emit(pos);
                continue;
            }
            if pos + 2 < n {
                let c2 = text.char(pos + 2);
                if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += 3;
                    out.emit(pos);
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
        if let Some(run @ (Gpt2Class::Letter | Gpt2Class::Number | Gpt2Class::Other)) = lead {
            if c == ' ' {
                pos += 1;
            }
            while class_at(pos) == Some(run) {
                pos += 1;
            }
            out.emit(pos);
            continue;
        }

        let spaces = (pos..n).take_while(|&i| text.infos[i].space).count();
        if spaces > 1 && pos + spaces < n {
            // `\s+(?!\S)`: leave the last space to lead the next word.
            pos += spaces - 1;
        } else if spaces > 0 {
            pos += spaces;
        } else {
            pos += 1;
        }
        out.emit(pos);
    }
}

/// Splits one word by the Llama 3 pattern (see [`PreTokenizer::Llama3`]); `digits` is the
/// longest number run and `marks` makes combining marks count as letters.
fn split_llama3(
    text: &Text,
    word: Range<usize>,
    digits: usize,
    marks: bool,
    lengths: &mut Vec<usize>,
) {
    let n = word.end;
    let info = |i: usize| (i < n).then(|| text.infos[i]);
    let letter = |i: usize| info(i).is_some_and(|f| f.is_letter() || (marks && f.is_mark()));
    let number = |i: usize| info(i).is_some_and(CharInfo::is_number);
    let space = |i: usize| info(i).is_some_and(|f| f.space);
    let line_break = |i: usize| i < n && matches!(text.char(i), '\r' | '\n');
    let mut out = Emitter {
        lengths,
        word_start: word.start,
    };
    let mut pos = word.start;

    while pos < n {
        let c = text.char(pos);

        // (?i:'s|'t|'re|'ve|'m|'ll|'d). No non-ASCII character lowercases to one of these
        // letters, so ASCII case folding is the whole of it.
        if c == '\'' && pos + 1 < n {
            let c1 = text.char(pos + 1).to_ascii_lowercase();
            if matches!(c1, 's' | 't' | 'm' | 'd') {
                pos += 2;
                out.emit(pos);
                continue;
            }
            if pos + 2 < n {
                let c2 = text.char(pos + 2).to_ascii_lowercase();
                if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += 3;
                    out.emit(pos);
                    continue;
                }
            }
        }

        // `[^\r\n\p{L}\p{N}]?\p{L}+`
        if !line_break(pos) && !number(pos) && (letter(pos) || letter(pos + 1)) {
            pos += 1;
            while letter(pos) {
                pos += 1;
            }
            out.emit(pos);
            continue;
        }

        // `\p{N}{1,digits}`, repeated over the whole run.
        if number(pos) {
            let mut run = 0;
            while number(pos) {
                pos += 1;
                run += 1;
                if run == digits {
                    out.emit(pos);
                    run = 0;
                }
            }
            out.emit(pos);
            continue;
        }

        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let other = |i: usize| info(i).is_some_and(|f| !f.space && !f.is_number()) && !letter(i);
        let lead = if c == ' ' { pos + 1 } else { pos };
        if other(lead) {
            pos = lead;
            while other(pos) {
                pos += 1;
            }
            while line_break(pos) {
                pos += 1;
            }
            out.emit(pos);
            continue;
        }

        let spaces = (pos..n).take_while(|&i| space(i)).count();
        // `\s*[\r\n]+`: through the last line break of the space run.
        if let Some(last) = (pos..pos + spaces).rev().find(|&i| line_break(i)) {
            pos = last + 1;
        } else if spaces > 1 && pos + spaces < n {
            // `\s+(?!\S)`
            pos += spaces - 1;
        } else if spaces > 0 {
            // `\s+`
            pos += spaces;
        } else {
            pos += 1;
        }
        out.emit(pos);
    }
}

/// `\s+$`: cuts the spaces that end `word` from the rest.
fn split_trailing_space(text: &Text, word: Range<usize>, lengths: &mut Vec<usize>) {
    let spaces = word
        .clone()
        .rev()
        .take_while(|&i| text.infos[i].space)
        .count();
    let mut out = Emitter {
        lengths,
        word_start: word.start,
    };
    out.emit(word.end - spaces);
    out.emit(word.end);
}

/// Cuts `word` at every match of `pattern`, leftmost first and without overlaps; a match and
/// the text between two matches are each a word. The pattern sees `word` as its whole input.
fn split_matches(text: &Text, word: Range<usize>, pattern: Pattern, lengths: &mut Vec<usize>) {
    let mut out = Emitter {
        lengths,
        word_start: word.start,
    };
    let mut pos = word.start;
    while pos < word.end {
        match pattern.match_at(text, word.end, pos) {
            Some(len) => {
                out.emit(pos);
                pos += len;
                out.emit(pos);
            }
            None => pos += 1,
        }
    }
    out.emit(word.end);
}

impl Pattern {
    /// The length of the match that starts at `pos`, if any, in a word ending at `end`. Every
    /// match is at least one character long.
    fn match_at(self, text: &Text, end: usize, pos: usize) -> Option<usize> {
        let class_at = |class: Class, i: usize| i < end && class.contains(text, i);
        let run = |class: Class, from: usize| {
            (from..end).take_while(|&i| class.contains(text, i)).count()
        };
        match self {
            Pattern::One(class) => class_at(class, pos).then_some(1),
            Pattern::Run(class) => Some(run(class, pos)).filter(|&len| len > 0),
            Pattern::SpacedRun(class) => {
                // The classes used here hold no spaces, so at most one reading can match.
                let from = if text.infos[pos].space { pos + 1 } else { pos };
                let len = run(class, from);
                (len > 0).then_some(from - pos + len)
            }
            Pattern::ThreeDigits => (pos + 3 <= end
                && (pos..pos + 3).all(|i| text.char(i).is_ascii_digit()))
            .then_some(3),
            Pattern::NewlineRuns => {
                let newline = text.char(pos) == '\n';
                Some(
                    (pos..end)
                        .take_while(|&i| (text.char(i) == '\n') == newline)
                        .count(),
                )
            }
        }
    }
}

impl Class {
    /// Whether character `i` belongs to the class. Classes written with `\p{..}` see a
    /// character's category; the others see the character itself, except that the reference
    /// hands its regex engine every non-ASCII space as `\v`, so no space belongs to those.
    fn contains(self, text: &Text, i: usize) -> bool {
        let c = text.char(i);
        let info = text.infos[i];
        match self {
            Class::LineBreak => matches!(c, '\r' | '\n'),
            Class::Letter => info.is_letter(),
            Class::Number => info.is_number(),
            Class::Punctuation => info.is_punctuation(),
            Class::PunctuationAndSymbols => {
                info.is_punctuation()
                    || matches!(c, '$' | '+' | '<' | '=' | '>' | '^' | '~' | '|' | '`')
            }
            Class::DeepseekLetter => !info.space && in_ranges(DEEPSEEK_LETTERS, c),
            Class::DeepseekPunctuation => !info.space && in_ranges(DEEPSEEK_PUNCTUATION, c),
            Class::Cjk => !info.space && in_ranges(CJK, c),
        }
    }
}

/// The letter class of DeepSeek LLM's pre-tokenizer pattern (its `tokenizer.json`): the cased
/// letters of an older Unicode release, listed explicitly.
const DEEPSEEK_LETTERS: &[(char, char)] = &[
    ('\u{41}', '\u{5A}'),
    ('\u{61}', '\u{7A}'),
    ('\u{B5}', '\u{B5}'),
    ('\u{C0}', '\u{D6}'),
    ('\u{D8}', '\u{F6}'),
    ('\u{F8}', '\u{1BA}'),
    ('\u{1BC}', '\u{1BF}'),
    ('\u{1C4}', '\u{293}'),
    ('\u{295}', '\u{2AF}'),
    ('\u{370}', '\u{373}'),
    ('\u{376}', '\u{377}'),
    ('\u{37B}', '\u{37D}'),
    ('\u{37F}', '\u{37F}'),
    ('\u{386}', '\u{386}'),
    ('\u{388}', '\u{38A}'),
    ('\u{38C}', '\u{38C}'),
    ('\u{38E}', '\u{3A1}'),
    ('\u{3A3}', '\u{3F5}'),
    ('\u{3F7}', '\u{481}'),
    ('\u{48A}', '\u{52F}'),
    ('\u{531}', '\u{556}'),
    ('\u{10A0}', '\u{10C5}'),
    ('\u{13A0}', '\u{13F5}'),
    ('\u{13F8}', '\u{13FD}'),
    ('\u{1C90}', '\u{1CBA}'),
    ('\u{1CBD}', '\u{1CBF}'),
    ('\u{1D00}', '\u{1D2B}'),
    ('\u{1D6B}', '\u{1D77}'),
    ('\u{1D79}', '\u{1D9A}'),
    ('\u{1E00}', '\u{1F15}'),
    ('\u{1F18}', '\u{1F1D}'),
    ('\u{1F20}', '\u{1F45}'),
    ('\u{1F48}', '\u{1F4D}'),
    ('\u{1F50}', '\u{1F57}'),
    ('\u{1F59}', '\u{1F59}'),
    ('\u{1F5B}', '\u{1F5B}'),
    ('\u{1F5D}', '\u{1F5D}'),
    ('\u{1F5F}', '\u{1F7D}'),
    ('\u{1F80}', '\u{1FB4}'),
    ('\u{1FB6}', '\u{1FBC}'),
    ('\u{1FBE}', '\u{1FBE}'),
    ('\u{1FC2}', '\u{1FC4}'),
    ('\u{1FC6}', '\u{1FCC}'),
    ('\u{1FD0}', '\u{1FD3}'),
    ('\u{1FD6}', '\u{1FDB}'),
    ('\u{1FE0}', '\u{1FEC}'),
    ('\u{1FF2}', '\u{1FF4}'),
    ('\u{1FF6}', '\u{1FFC}'),
    ('\u{2102}', '\u{2102}'),
    ('\u{2107}', '\u{2107}'),
    ('\u{210A}', '\u{2113}'),
    ('\u{2115}', '\u{2115}'),
    ('\u{2119}', '\u{211D}'),
    ('\u{2124}', '\u{2124}'),
    ('\u{2126}', '\u{2126}'),
    ('\u{2128}', '\u{2128}'),
    ('\u{212A}', '\u{212D}'),
    ('\u{212F}', '\u{2134}'),
    ('\u{2139}', '\u{2139}'),
    ('\u{213C}', '\u{213F}'),
    ('\u{2145}', '\u{2149}'),
    ('\u{214E}', '\u{214E}'),
    ('\u{2183}', '\u{2184}'),
    ('\u{2C00}', '\u{2C7B}'),
    ('\u{2C7E}', '\u{2CE4}'),
    ('\u{2CEB}', '\u{2CEE}'),
    ('\u{2CF2}', '\u{2CF3}'),
    ('\u{A640}', '\u{A66D}'),
    ('\u{A680}', '\u{A69B}'),
    ('\u{A722}', '\u{A76F}'),
    ('\u{A771}', '\u{A787}'),
    ('\u{A78B}', '\u{A78E}'),
    ('\u{AB70}', '\u{ABBF}'),
    ('\u{FB00}', '\u{FB06}'),
    ('\u{FB13}', '\u{FB17}'),
    ('\u{FF21}', '\u{FF3A}'),
    ('\u{FF41}', '\u{FF5A}'),
    ('\u{10400}', '\u{1044F}'),
    ('\u{104B0}', '\u{104D3}'),
    ('\u{104D8}', '\u{104FB}'),
    ('\u{10C80}', '\u{10CB2}'),
    ('\u{10CC0}', '\u{10CF2}'),
    ('\u{118A0}', '\u{118DF}'),
    ('\u{1E900}', '\u{1E943}'),
];

/// ASCII punctuation and symbols with the letters (`!-/`, `:-~`), fullwidth forms, curly
/// quotes and the ideographic comma and full stop.
const DEEPSEEK_PUNCTUATION: &[(char, char)] = &[
    ('!', '/'),
    (':', '~'),
    ('\u{2018}', '\u{201F}'),
    ('\u{3000}', '\u{3002}'),
    ('\u{FF01}', '\u{FF0F}'),
    ('\u{FF1A}', '\u{FF5E}'),
];

/// `ࠀ-一`, `一-龥` (overlapping at U+4E00, merged here) and `가-퟿`.
const CJK: &[(char, char)] = &[('\u{800}', '\u{9FA5}'), ('\u{AC00}', '\u{D7FF}')];

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pre: PreTokenizer, text: &str) -> Vec<&str> {
        pre.split(text)
    }

    #[test]
    fn tables_are_sorted_and_disjoint() {
        for table in [DEEPSEEK_LETTERS, DEEPSEEK_PUNCTUATION, CJK] {
            for pair in table.windows(2) {
                assert!(pair[0].0 <= pair[0].1 && pair[0].1 < pair[1].0, "{pair:?}");
            }
        }
    }

    #[test]
    fn gpt2_words() {
        let gpt2 = |t| split(PreTokenizer::Gpt2, t);
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
        let digits = |t| split(PreTokenizer::IsolatedDigitsGpt2, t);
        assert_eq!(digits("x=1234;"), ["x", "=", "1", "2", "3", "4", ";"]);
        assert_eq!(digits(" 2026-11"), [" ", "2", "0", "2", "6", "-", "1", "1"]);
        // A digit ends the whitespace run before it: no lookahead across words.
        assert_eq!(digits("a  1"), ["a", "  ", "1"]);
    }

    #[test]
    fn llama3_words() {
        let llama3 = |t| split(PreTokenizer::Llama3, t);
        assert_eq!(
            llama3("I'M here, 12345 ok"),
            ["I", "'M", " here", ",", " ", "123", "45", " ok"]
        );
        // One non-letter may lead a word; punctuation takes the line breaks after it.
        assert_eq!(llama3("(x)\n\n  y"), ["(x", ")\n\n", " ", " y"]);
        assert_eq!(llama3("a \n \n b"), ["a", " \n \n", " b"]);
        assert_eq!(llama3("a   b"), ["a", "  ", " b"]);
        assert_eq!(llama3("\tword"), ["\tword"]);
        assert_eq!(llama3("x  "), ["x", "  "]);
    }

    #[test]
    fn qwen_words() {
        let qwen2 = |t| split(PreTokenizer::Qwen2, t);
        assert_eq!(qwen2("x 123"), ["x", " ", "1", "2", "3"]);
        // U+0301 (combining acute) is a mark: Qwen 3.5 keeps it in the word.
        assert_eq!(qwen2("cafe\u{301}s"), ["cafe", "\u{301}s"]);
        let qwen35 = |t| split(PreTokenizer::Qwen35, t);
        assert_eq!(qwen35("cafe\u{301}s"), ["cafe\u{301}s"]);
    }

    #[test]
    fn deepseek_words() {
        let llm = |t| split(PreTokenizer::DeepseekLlm, t);
        assert_eq!(llm("Hello world!\n"), ["Hello", " world", "!", "\n"]);
        assert_eq!(
            llm("x 42 \u{4E2D}\u{6587}"),
            ["x", " ", "42", " ", "\u{4E2D}\u{6587}"]
        );
        assert_eq!(llm("ok  "), ["ok", "  "]);
        let coder = |t| split(PreTokenizer::DeepseekCoder, t);
        assert_eq!(coder("a=12;"), ["a", "=", "1", "2", ";"]);
        assert_eq!(coder(" {x}"), [" {", "x", "}"]);
    }

    #[test]
    fn falcon_words() {
        let falcon = |t| split(PreTokenizer::Falcon, t);
        assert_eq!(falcon("x+=1234567;"), ["x", "+=", "123", "456", "7", ";"]);
        assert_eq!(falcon("a 12345b"), ["a", " ", "123", "45", "b"]);
    }

    #[test]
    fn newline_runs() {
        let newlines = |t| split(PreTokenizer::Newlines, t);
        assert_eq!(newlines("a b\n\nc\n"), ["a b", "\n\n", "c", "\n"]);
    }
}
