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

/// A special token as the partition matches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Special {
    pub id: u32,
    pub text: String,
    /// A user-defined token, matched even when special-token parsing is off.
    pub always: bool,
    /// The whitespace after the token is dropped (Phi-3's special tokens, as the reference
    /// tokenizes them).
    pub rstrip: bool,
}

/// The special tokens a text can contain, in matching order.
#[derive(Debug, Default)]
pub(crate) struct SpecialTokens {
    /// Longest text first (ties by id).
    tokens: Vec<Special>,
    /// All token texts, to find in one pass which tokens occur in a text at all.
    trie: Trie,
}

impl SpecialTokens {
    pub(crate) fn new(mut tokens: Vec<Special>) -> Self {
        tokens.retain(|t| !t.text.is_empty());
        tokens.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        let mut trie = Trie::default();
        for (index, t) in tokens.iter().enumerate() {
            trie.insert(t.text.as_bytes(), index);
        }
        Self { tokens, trie }
    }

    /// Splits `text` into fragments. With `parse_special` off only user-defined tokens match.
    pub(crate) fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text(0..text.len())];

        // Fragments are substrings of `text`, so a token absent from `text` matches nowhere.
        let occurs = self.trie.occurring(text.as_bytes(), self.tokens.len());
        for (special, _) in self.tokens.iter().zip(&occurs).filter(|(_, &o)| o) {
            if !(parse_special || special.always) {
                continue;
            }
            let token = special.text.as_str();
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(range) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut at = range.start;
                for (offset, _) in text[range.clone()].match_indices(token) {
                    let start = range.start + offset;
                    if start < at {
                        // Inside whitespace the token before took.
                        continue;
                    }
                    if start > at {
                        next.push(Fragment::Text(at..start));
                    }
                    next.push(Fragment::Token(special.id));
                    at = start + token.len();
                    if special.rstrip {
                        // C's isspace: space, \t, \n, \v, \f, \r.
                        while at < range.end && matches!(text.as_bytes()[at], b' ' | b'\t'..=b'\r')
                        {
                            at += 1;
                        }
                    }
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

/// A byte trie over the special token texts.
#[derive(Debug)]
struct Trie {
    /// Node 0 is the root.
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Default)]
struct TrieNode {
    /// `(byte, child node)`, sorted by byte.
    children: Vec<(u8, usize)>,
    /// The index of the token whose text ends here.
    token: Option<usize>,
}

impl Default for Trie {
    fn default() -> Self {
        Self {
            nodes: vec![TrieNode::default()],
        }
    }
}

impl Trie {
    fn insert(&mut self, text: &[u8], token: usize) {
        let mut node = 0;
        for &b in text {
            node = match self.child(node, b) {
                Some(child) => child,
                None => {
                    let child = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    let children = &mut self.nodes[node].children;
                    let at = children.partition_point(|&(c, _)| c < b);
                    children.insert(at, (b, child));
                    child
                }
            };
        }
        self.nodes[node].token.get_or_insert(token);
    }

    fn child(&self, node: usize, b: u8) -> Option<usize> {
        let children = &self.nodes[node].children;
        children
            .binary_search_by_key(&b, |&(c, _)| c)
            .ok()
            .map(|i| children[i].1)
    }

    /// Which of `n` tokens occur anywhere in `text`.
    fn occurring(&self, text: &[u8], n: usize) -> Vec<bool> {
        let mut found = vec![false; n];
        for start in 0..text.len() {
            let mut node = 0;
            for &b in &text[start..] {
                let Some(child) = self.child(node, b) else {
                    break;
                };
                node = child;
                if let Some(token) = self.nodes[node].token {
                    found[token] = true;
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specials() -> SpecialTokens {
        let special = |id, text: &str, always| Special {
            id,
            text: text.to_string(),
            always,
            rstrip: false,
        };
        SpecialTokens::new(vec![
            special(1, "<s>", false),
            special(2, "<s><s>", false),
            special(3, "  ", true),
            special(4, "   ", true),
        ])
    }

    #[test]
    fn a_token_that_strips_takes_the_whitespace_after_it() {
        let specials = SpecialTokens::new(vec![Special {
            id: 7,
            text: "<|end|>".to_string(),
            always: false,
            rstrip: true,
        }]);
        let text = "a<|end|> \r\n\tb<|end|><|end|>  ";
        assert_eq!(
            specials.partition(text, true),
            vec![
                Fragment::Text(0..1),
                Fragment::Token(7),
                Fragment::Text(12..13),
                Fragment::Token(7),
                Fragment::Token(7),
            ]
        );
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
