//! Cutting special tokens out of text before the tokenizer model sees it.
//!
//! Special tokens are tried one at a time, longest text first; each splits every remaining text
//! fragment at all of its (non-overlapping, leftmost-first) occurrences. The order matters: a
//! longer token claims its text before any shorter token that overlaps it.

use std::ops::Range;

/// A piece of the input: raw text still to tokenize, or a special token already recognized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

/// The special tokens a text can contain, in matching order.
#[derive(Debug, Default)]
pub(crate) struct SpecialTokens {
    /// `(id, text, always)`, longest text first (ties by id). `always` marks user-defined tokens,
    /// which are matched even when special-token parsing is off.
    tokens: Vec<(u32, String, bool)>,
}

impl SpecialTokens {
    pub(crate) fn new(mut tokens: Vec<(u32, String, bool)>) -> Self {
        tokens.retain(|(_, text, _)| !text.is_empty());
        tokens.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        Self { tokens }
    }

    /// Splits `text` into fragments. With `parse_special` off only user-defined tokens match.
    pub(crate) fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text(0..text.len())];

        // Fragments are substrings of `text`, so a token absent from `text` matches nowhere;
        // checking its first two bytes against those present skips most tokens cheaply.
        let bytes = text.as_bytes();
        let mut singles = [false; 256];
        let mut pairs = vec![false; 1 << 16];
        for (i, &b) in bytes.iter().enumerate() {
            singles[usize::from(b)] = true;
            if let Some(&next) = bytes.get(i + 1) {
                pairs[usize::from(b) << 8 | usize::from(next)] = true;
            }
        }
        let may_occur = |t: &[u8]| match t {
            [a] => singles[usize::from(*a)],
            [a, b, ..] => pairs[usize::from(*a) << 8 | usize::from(*b)],
            [] => false,
        };

        for (id, token, always) in &self.tokens {
            if !(parse_special || *always) || !may_occur(token.as_bytes()) {
                continue;
            }
            if !text.contains(token.as_str()) {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(range) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut at = range.start;
                for (offset, _) in text[range.clone()].match_indices(token.as_str()) {
                    let start = range.start + offset;
                    if start > at {
                        next.push(Fragment::Text(at..start));
                    }
                    next.push(Fragment::Token(*id));
                    at = start + token.len();
                }
                if at < range.end {
                    next.push(Fragment::Text(at..range.end));
                }
            }
            fragments = next;
        }
        fragments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specials() -> SpecialTokens {
        SpecialTokens::new(vec![
            (1, "<s>".into(), false),
            (2, "<s><s>".into(), false),
            (3, "  ".into(), true),
            (4, "   ".into(), true),
        ])
    }

    fn show(text: &str, fragments: &[Fragment]) -> Vec<String> {
        fragments
            .iter()
            .map(|f| match f {
                Fragment::Text(r) => format!("{:?}", &text[r.clone()]),
                Fragment::Token(id) => format!("#{id}"),
            })
            .collect()
    }

    #[test]
    fn longest_token_first() {
        let text = "a<s><s><s>b";
        let parts = specials().partition(text, true);
        assert_eq!(show(text, &parts), ["\"a\"", "#2", "#1", "\"b\""]);
    }

    #[test]
    fn user_defined_tokens_match_without_parsing() {
        let text = "x     <s>";
        let parts = specials().partition(text, false);
        assert_eq!(show(text, &parts), ["\"x\"", "#4", "#3", "\"<s>\""]);
        let parts = specials().partition(text, true);
        assert_eq!(show(text, &parts), ["\"x\"", "#4", "#3", "#1"]);
    }

    #[test]
    fn empty_text_has_no_fragments() {
        assert!(specials().partition("", true).is_empty());
    }
}
