//! WordPiece (the `bert` tokenizer model).
//!
//! Text is normalized and cut into words the way BERT's basic tokenizer does: optionally
//! lowercased and stripped of accents (each character reduced to the first code point of its
//! canonical decomposition, combining marks dropped), control characters dropped, spaces
//! separating words, and every punctuation character, ASCII symbol and CJK ideograph a word of
//! its own. Each word, written with a leading `▁` as the vocabulary spells word starts, is then
//! covered greedily by the longest tokens from the left; a word that cannot be covered entirely
//! becomes the unknown token.

use super::unicode::{decomposed_base, to_lower, Category, CharInfo};
use super::Vocab;

/// How a WordPiece vocabulary normalizes text before cutting it into words.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WpmOptions {
    pub lowercase: bool,
    pub strip_accents: bool,
    /// The token that stands for a word the vocabulary cannot spell.
    pub unknown: u32,
}

/// Tokenizes one fragment of text.
pub(crate) fn encode(vocab: &Vocab, options: WpmOptions, text: &str, out: &mut Vec<u32>) {
    let longest = vocab.longest_text();
    let mut spelled = String::new();
    for word in words(text, options) {
        spelled.clear();
        spelled.push(super::spm::SPACE_MARK);
        spelled.push_str(&word);

        let before = out.len();
        let mut at = 0;
        while at < spelled.len() {
            // The longest token starting here; a cut inside a character is no token.
            let limit = spelled.len().min(at + longest);
            let found = (at + 1..=limit)
                .rev()
                .find_map(|end| Some((end, vocab.id(spelled.get(at..end)?)?)));
            match found {
                Some((end, id)) => {
                    out.push(id);
                    at = end;
                }
                None => {
                    out.truncate(before);
                    break;
                }
            }
        }
        if out.len() == before {
            out.push(options.unknown);
        }
    }
}

/// The normalized words of `text`.
fn words(text: &str, options: WpmOptions) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        let c = if options.strip_accents {
            decomposed_base(c)
        } else {
            c
        };
        let info = CharInfo::of(c);
        if info.space {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            continue;
        }
        if c == '\0' || c == char::REPLACEMENT_CHARACTER || info.category == Category::Control {
            continue;
        }
        if options.strip_accents && info.is_mark() {
            continue;
        }
        let alone = info.is_punctuation()
            || (c.is_ascii() && info.category == Category::Symbol)
            || is_cjk_ideograph(c);
        let c = if options.lowercase { to_lower(c) } else { c };
        if alone {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            words.push(c.to_string());
        } else {
            word.push(c);
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// The CJK ideograph blocks BERT isolates (including its shifted start of extension E).
fn is_cjk_ideograph(c: char) -> bool {
    matches!(u32::from(c),
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x2_0000..=0x2_A6DF
        | 0x2_A700..=0x2_B73F
        | 0x2_B740..=0x2_B81F
        | 0x2_B920..=0x2_CEAF
        | 0xF900..=0xFAFF
        | 0x2_F800..=0x2_FA1F)
}

#[cfg(test)]
mod tests {
    use super::super::vocab::attr;
    use super::*;

    const OPTIONS: WpmOptions = WpmOptions {
        lowercase: true,
        strip_accents: true,
        unknown: 0,
    };

    #[test]
    fn words_are_normalized_and_cut() {
        assert_eq!(
            words("Héllo, WORLD!  a\u{301}\tb日本", OPTIONS),
            ["hello", ",", "world", "!", "a", "b", "日", "本"]
        );
        assert_eq!(
            words("x$y\u{20AC}z\u{200B}", OPTIONS),
            ["x", "$", "y\u{20AC}z"]
        );
        let keep = WpmOptions {
            lowercase: false,
            strip_accents: false,
            unknown: 0,
        };
        assert_eq!(words("Héllo", keep), ["Héllo"]);
    }

    #[test]
    fn longest_tokens_cover_words() {
        let texts = ["[UNK]", "▁un", "▁unaffable", "aff", "able", "▁x", "y"];
        let vocab = Vocab::new(&texts, vec![0.0; 7], vec![attr::NORMAL; 7]).expect("vocab");
        let mut out = Vec::new();
        encode(&vocab, OPTIONS, "unaffable unaffablez xy xz", &mut out);
        // "▁unaffablez" starts with "▁unaffable" but "z" is no token: the whole word is unknown.
        assert_eq!(out, [2, 0, 5, 6, 0]);
        out.clear();
        encode(&vocab, OPTIONS, "unable", &mut out);
        assert_eq!(out, [1, 4]);
    }
}
