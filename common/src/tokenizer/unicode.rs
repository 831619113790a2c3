//! Code point properties as the reference tokenizer sees them: general category (reduced to the
//! seven classes that pre-tokenizer patterns name), the White_Space property, the simple
//! lowercase mapping and the first code point of the canonical decomposition.
//!
//! The reference tables were generated from Unicode 15.1, so every property here is restricted
//! to code points assigned by 15.1: a character added later is unassigned, with no case mapping
//! and no decomposition, exactly as the reference treats it. The category tables come from
//! `regex-syntax` (intersected with `\p{Age=V15_1}`), case mappings from the standard library and
//! decompositions from `unicode-normalization`; both are stable for characters already assigned.

use std::cmp::Ordering;
use std::sync::OnceLock;

/// A code point's general category, as far as pre-tokenizers tell categories apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Category {
    /// `\p{L}`
    Letter,
    /// `\p{N}`
    Number,
    /// `\p{M}`
    Mark,
    /// `\p{P}`
    Punctuation,
    /// `\p{S}`
    Symbol,
    /// `\p{Z}`
    Separator,
    /// `Cc`, `Cf`, `Co` (`Cs` cannot occur in a `char`)
    Control,
    /// Not assigned in Unicode 15.1.
    Unassigned,
}

/// The properties of one code point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CharInfo {
    pub category: Category,
    /// The White_Space property (`\s`).
    pub space: bool,
}

impl CharInfo {
    pub(crate) fn of(c: char) -> Self {
        if c.is_ascii() {
            return ASCII[c as usize];
        }
        Self {
            category: category_of(c),
            space: c.is_whitespace(),
        }
    }

    pub(crate) fn is_letter(self) -> bool {
        self.category == Category::Letter
    }

    pub(crate) fn is_number(self) -> bool {
        self.category == Category::Number
    }

    pub(crate) fn is_mark(self) -> bool {
        self.category == Category::Mark
    }

    pub(crate) fn is_punctuation(self) -> bool {
        self.category == Category::Punctuation
    }
}

/// ASCII properties, by code.
const ASCII: [CharInfo; 128] = {
    let mut table = [CharInfo {
        category: Category::Control,
        space: false,
    }; 128];
    let mut i = 0;
    while i < 128 {
        let b = i as u8;
        table[i].category = match b {
            b'a'..=b'z' | b'A'..=b'Z' => Category::Letter,
            b'0'..=b'9' => Category::Number,
            b' ' => Category::Separator,
            b'$' | b'+' | b'<' | b'=' | b'>' | b'^' | b'`' | b'|' | b'~' => Category::Symbol,
            b'!'..=b'~' => Category::Punctuation,
            _ => Category::Control,
        };
        table[i].space = matches!(b, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ');
        i += 1;
    }
    table
};

/// The simple lowercase mapping of `c` (one code point; `c` itself where it has none).
pub(crate) fn to_lower(c: char) -> char {
    if c.is_ascii() {
        return c.to_ascii_lowercase();
    }
    if category_of(c) == Category::Unassigned {
        return c;
    }
    // The full mapping differs from the simple one only for U+0130, whose full lowercase
    // "i\u{307}" starts with its simple one, 'i'.
    c.to_lowercase().next().unwrap_or(c)
}

/// The first code point of the canonical decomposition of `c` (its base letter, for an accented
/// letter), or `c` itself.
pub(crate) fn decomposed_base(c: char) -> char {
    if c.is_ascii() || category_of(c) == Category::Unassigned {
        return c;
    }
    let mut first = None;
    unicode_normalization::char::decompose_canonical(c, |d| {
        first.get_or_insert(d);
    });
    first.unwrap_or(c)
}

fn category_of(c: char) -> Category {
    let ranges = &category_table().ranges;
    let at = ranges.partition_point(|&(_, hi, _)| hi < c);
    match ranges.get(at) {
        Some(&(lo, _, category)) if lo <= c => category,
        _ => Category::Unassigned,
    }
}

/// `(first, last, category)` for every assigned code point, sorted and disjoint.
struct CategoryTable {
    ranges: Vec<(char, char, Category)>,
}

fn category_table() -> &'static CategoryTable {
    static TABLE: OnceLock<CategoryTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut ranges = Vec::new();
        for (class, category) in [
            (r"\p{L}", Category::Letter),
            (r"\p{N}", Category::Number),
            (r"\p{M}", Category::Mark),
            (r"\p{P}", Category::Punctuation),
            (r"\p{S}", Category::Symbol),
            (r"\p{Z}", Category::Separator),
            (r"\p{Cc}\p{Cf}\p{Co}", Category::Control),
        ] {
            let pattern = format!(r"[[{class}]&&\p{{Age=V15_1}}]");
            ranges.extend(
                class_ranges(&pattern)
                    .into_iter()
                    .map(|(lo, hi)| (lo, hi, category)),
            );
        }
        ranges.sort_unstable_by_key(|&(lo, _, _)| lo);
        CategoryTable { ranges }
    })
}

/// The ranges of a constant Unicode class expression.
pub(crate) fn class_ranges(pattern: &str) -> Vec<(char, char)> {
    use regex_syntax::hir::{Class, HirKind};
    // The patterns are constants of this crate, so failing to parse them is a build defect.
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

/// Whether `c` lies in one of `ranges` (sorted, disjoint, inclusive).
pub(crate) fn in_ranges(ranges: &[(char, char)], c: char) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                Ordering::Less
            } else if lo > c {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn category(c: char) -> Category {
        CharInfo::of(c).category
    }

    #[test]
    fn categories() {
        assert_eq!(category('é'), Category::Letter);
        assert_eq!(category('日'), Category::Letter);
        assert_eq!(category('٣'), Category::Number);
        assert_eq!(category('½'), Category::Number);
        assert_eq!(category('€'), Category::Symbol);
        assert_eq!(category('«'), Category::Punctuation);
        assert_eq!(category('\u{301}'), Category::Mark);
        assert_eq!(category('\u{3000}'), Category::Separator);
        assert_eq!(category('\u{200B}'), Category::Control);
        assert_eq!(category('\u{E000}'), Category::Control);
        // Garay (Unicode 16) was unassigned in 15.1; CJK extension I arrived in 15.1.
        assert_eq!(category('\u{10D50}'), Category::Unassigned);
        assert_eq!(category('\u{2EBF0}'), Category::Letter);
        // ASCII agrees with the tables.
        for c in (0..128u8).map(char::from) {
            let from_tables = CharInfo {
                category: category_of(c),
                space: c.is_whitespace(),
            };
            assert_eq!(CharInfo::of(c), from_tables, "{c:?}");
        }
    }

    #[test]
    fn white_space() {
        for c in [
            '\t', '\n', '\u{b}', '\r', ' ', '\u{85}', '\u{a0}', '\u{3000}',
        ] {
            assert!(CharInfo::of(c).space, "{c:?}");
        }
        for c in ['\u{1c}', '\u{200b}', 'x'] {
            assert!(!CharInfo::of(c).space, "{c:?}");
        }
    }

    #[test]
    fn case_and_decomposition() {
        assert_eq!(to_lower('Ä'), 'ä');
        assert_eq!(to_lower('\u{130}'), 'i');
        assert_eq!(to_lower('ß'), 'ß');
        assert_eq!(decomposed_base('Ä'), 'A');
        assert_eq!(decomposed_base('ǖ'), 'u');
        // Hangul syllables decompose into their leading consonant first.
        assert_eq!(decomposed_base('가'), '\u{1100}');
        assert_eq!(decomposed_base('x'), 'x');
    }
}
