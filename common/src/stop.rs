//! Stop strings for streamed text.
//!
//! Generation produces text piece by piece, and a stop string can straddle pieces. A
//! [`StopMatcher`] releases text as soon as it is known not to begin a stop string, holds back the
//! shortest tail that still could, and cuts the stream at the earliest stop string: neither the
//! stop string nor anything after it is ever released.
//!
//! The matcher works on `&str`, so it never splits a character; turning token bytes into whole
//! characters is the detokenizer's job.

use crate::error::{Error, Result};

/// What a [`StopMatcher::push`] released.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that is safe to emit now. Never contains a stop string or anything after one.
    pub text: String,
    /// Index (in the list given to [`StopMatcher::new`]) of the stop string that ended the
    /// stream, if one did. Once set, generation should end.
    pub matched: Option<usize>,
}

impl StopOutcome {
    pub fn stopped(&self) -> bool {
        self.matched.is_some()
    }
}

/// Watches a text stream for any of a set of stop strings.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released: always a proper prefix of some stop string (or empty).
    held: String,
    /// Set once a stop string matched; later pushes release nothing.
    matched: Option<usize>,
}

impl StopMatcher {
    /// A matcher for `stops`; an empty list matches nothing. An empty stop string is rejected: it
    /// would match before the first character.
    pub fn new(stops: Vec<String>) -> Result<Self> {
        if let Some(i) = stops.iter().position(String::is_empty) {
            return Err(Error::InvalidArgument(format!(
                "stop string {i} is empty; stop strings must contain at least one character"
            )));
        }
        Ok(Self {
            stops,
            held: String::new(),
            matched: None,
        })
    }

    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// Whether a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.matched.is_some()
    }

    /// Feeds the next piece of text and returns what can be emitted now.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.matched.is_some() {
            return StopOutcome {
                text: String::new(),
                matched: self.matched,
            };
        }
        self.held.push_str(text);

        // The earliest occurrence wins; at the same position, the first in the list.
        let hit = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, stop)| self.held.find(stop.as_str()).map(|pos| (pos, i)))
            .min();
        if let Some((pos, i)) = hit {
            self.held.truncate(pos);
            self.matched = Some(i);
            return StopOutcome {
                text: std::mem::take(&mut self.held),
                matched: Some(i),
            };
        }

        let keep = self.partial_stop_len();
        let release = self.held.len() - keep;
        let tail = self.held.split_off(release);
        StopOutcome {
            text: std::mem::replace(&mut self.held, tail),
            matched: None,
        }
    }

    /// Ends the stream for another reason (length, end of sequence): releases the held-back
    /// text. Returns nothing after a stop string matched.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest tail of `held` that is a proper prefix of some stop string. A stop
    /// string cannot occur in `held` here, so only tails shorter than the longest stop matter.
    fn partial_stop_len(&self) -> usize {
        let held = self.held.as_str();
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let earliest = held.len().saturating_sub(longest.saturating_sub(1));
        (earliest..held.len())
            .filter(|&start| held.is_char_boundary(start))
            .find(|&start| {
                let tail = &held[start..];
                self.stops.iter().any(|stop| stop.starts_with(tail))
            })
            .map_or(0, |start| held.len() - start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect()).expect("valid stops")
    }

    /// Pushes every piece and returns the released text, the match, and what finish released.
    fn run(m: &mut StopMatcher, pieces: &[&str]) -> (String, Option<usize>) {
        let mut out = String::new();
        let mut matched = None;
        for piece in pieces {
            let o = m.push(piece);
            out.push_str(&o.text);
            if o.stopped() {
                matched = o.matched;
                break;
            }
        }
        out.push_str(&m.finish());
        (out, matched)
    }

    #[test]
    fn empty_stop_string_is_rejected() {
        let err = StopMatcher::new(vec!["ok".into(), String::new()]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("stop string 1")));
    }

    #[test]
    fn no_stops_passes_everything_through_at_once() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("hello").text, "hello");
        assert_eq!(m.push(" world").text, " world");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stop_within_one_piece() {
        let mut m = matcher(&["\n\n"]);
        let o = m.push("Paris.\n\nNext question");
        assert_eq!(o.text, "Paris.");
        assert_eq!(o.matched, Some(0));
        assert!(m.is_stopped());
        assert_eq!(m.push("more").text, "");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn stop_split_across_many_pushes() {
        let mut m = matcher(&["<|im_end|>"]);
        let o = m.push("Paris<");
        assert_eq!(o.text, "Paris");
        assert!(!o.stopped());
        for piece in ["|", "im", "_", "end"] {
            let o = m.push(piece);
            assert_eq!(o.text, "", "after {piece:?}");
            assert!(!o.stopped());
        }
        let o = m.push("|>trailing");
        assert_eq!(o.text, "");
        assert_eq!(o.matched, Some(0));
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn partial_prefix_that_does_not_match_is_released() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("go ST").text, "go ");
        assert_eq!(m.push("O").text, "");
        // "STOx" cannot start "STOP" anywhere: all of it goes out.
        assert_eq!(m.push("x").text, "STOx");
        // A tail that restarts the stop string inside the failed prefix is still held back.
        assert_eq!(m.push(" SS").text, " S");
        assert_eq!(m.push("TOP!").text, "");
        assert!(m.is_stopped());
    }

    #[test]
    fn finish_flushes_held_text() {
        let mut m = matcher(&["</s>"]);
        assert_eq!(m.push("end </").text, "end ");
        assert_eq!(m.finish(), "</");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, matched) = run(&mut matcher(&["world", "lo w"]), &["hel", "lo wor", "ld"]);
        assert_eq!(out, "hel");
        assert_eq!(matched, Some(1));

        // Same position: the first in the list is reported; the text is the same either way.
        let (out, matched) = run(&mut matcher(&["abc", "ab"]), &["xxab", "c"]);
        assert_eq!(out, "xx");
        assert_eq!(matched, Some(1), "\"ab\" is complete before \"abc\" can be");

        let (out, matched) = run(&mut matcher(&["abc", "ab"]), &["xxabc"]);
        assert_eq!(out, "xx");
        assert_eq!(matched, Some(0));
    }

    #[test]
    fn holds_back_only_while_some_stop_can_still_match() {
        let mut m = matcher(&["###", "User:"]);
        assert_eq!(m.push("a #").text, "a ");
        assert_eq!(m.push("#").text, "");
        // "##U" cannot become "###", but "U" may begin "User:".
        assert_eq!(m.push("U").text, "##");
        assert_eq!(m.push("se").text, "");
        assert_eq!(m.push("d").text, "Used");
    }

    #[test]
    fn multi_byte_characters_are_never_split() {
        // The stop string shares its first byte (0xC3) with "é" but not its second.
        let mut m = matcher(&["ü!"]);
        let o = m.push("café");
        assert_eq!(o.text, "café");
        let o = m.push(" grün");
        assert_eq!(o.text, " grün");
        let o = m.push(" ü");
        assert_eq!(o.text, " ");
        let o = m.push("?");
        assert_eq!(o.text, "ü?");

        let (out, matched) = run(&mut matcher(&["終わり"]), &["日本語", "の終", "わ", "り。"]);
        assert_eq!(out, "日本語の");
        assert_eq!(matched, Some(0));

        let (out, matched) = run(&mut matcher(&["🛑"]), &["go 🚀", " ok 🛑 no"]);
        assert_eq!(out, "go 🚀 ok ");
        assert_eq!(matched, Some(0));
    }

    #[test]
    fn released_text_reassembles_the_stream_when_nothing_matches() {
        let pieces = ["<|im", "_start|>", "hi <", "|", "im_e", "nd| ok"];
        let (out, matched) = run(&mut matcher(&["<|im_end|>"]), &pieces);
        assert_eq!(out, pieces.concat());
        assert_eq!(matched, None);
    }
}
