//! The reference tokenizer test suite: the vocabulary-only GGUF files `ggml-vocab-*.gguf` that
//! llama.cpp ships, each with test texts (`.inp`, separated by a marker line) and the ids the
//! reference gives for them (`.out`, one line per text). `deploy/fetch-vocabs.sh` puts them under
//! `models/vocab/` (or `$REALM_VOCAB_DIR`).
//!
//! As in the reference's `test-tokenizer-0`, every text is encoded without BOS/EOS and without
//! parsing special tokens. Where the reference also checks decoding (`test-tokenizer-1-spm`, run
//! on `llama-spm` only), every token and every code point must survive decode(encode(..)).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use realm_common::gguf::GgufFile;
use realm_common::tokenizer::Tokenizer;
use realm_tests::repo_root;

/// The vocabularies that come with test vectors, and how many texts each has.
const VOCABS: [(&str, usize); 15] = [
    ("bert-bge", 46),
    ("command-r", 46),
    ("deepseek-coder", 46),
    ("deepseek-llm", 46),
    ("falcon", 46),
    ("gemma-4", 46),
    ("gpt-2", 46),
    ("llama-bpe", 46),
    ("llama-spm", 46),
    ("mpt", 46),
    ("phi-3", 46),
    ("qwen2", 46),
    ("qwen35", 50),
    ("refact", 46),
    ("starcoder", 46),
];

/// The line between two texts of a `.inp` file.
const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

fn vocab_dir() -> PathBuf {
    let dir = std::env::var_os("REALM_VOCAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models/vocab"));
    assert!(
        dir.is_dir(),
        "{} is missing: run deploy/fetch-vocabs.sh first",
        dir.display()
    );
    dir
}

fn vocab_path(name: &str) -> PathBuf {
    let path = vocab_dir().join(format!("ggml-vocab-{name}.gguf"));
    assert!(
        path.exists(),
        "{} is missing: run deploy/fetch-vocabs.sh first",
        path.display()
    );
    path
}

fn tokenizer(name: &str) -> Tokenizer {
    let path = vocab_path(name);
    let gguf = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The texts of a vocabulary and their expected ids, in file order. The `.inp` file is cut at
/// every separator; one that ends the file ends the last text rather than starting an empty one.
fn vectors(name: &str) -> Vec<(String, Vec<u32>)> {
    let base = vocab_path(name);
    let read = |ext: &str| {
        let path = base.with_extension(format!("gguf.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let inp = read("inp");
    let out = read("out");

    let mut texts = Vec::new();
    let mut rest = inp.as_str();
    while !rest.is_empty() {
        match rest.split_once(SEPARATOR) {
            Some((text, after)) => {
                texts.push(text.to_string());
                rest = after;
            }
            None => {
                texts.push(rest.to_string());
                break;
            }
        }
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(|id| {
                    id.parse()
                        .unwrap_or_else(|e| panic!("{name}.out: token id {id:?}: {e}"))
                })
                .collect()
        })
        .collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "{name}: {} texts but {} lines of ids",
        texts.len(),
        ids.len()
    );
    texts.into_iter().zip(ids).collect()
}

#[test]
fn every_vocabulary_matches_the_reference_vectors() {
    // Every vocabulary with vectors in the directory runs, not only the expected ones.
    let mut names: Vec<String> = std::fs::read_dir(vocab_dir())
        .expect("read the vocabulary directory")
        .filter_map(|entry| {
            let file = entry.ok()?.file_name().into_string().ok()?;
            Some(
                file.strip_prefix("ggml-vocab-")?
                    .strip_suffix(".gguf.inp")?
                    .to_string(),
            )
        })
        .collect();
    names.sort();
    for (name, _) in VOCABS {
        assert!(
            names.iter().any(|n| n == name),
            "ggml-vocab-{name}.gguf.inp is missing: run deploy/fetch-vocabs.sh first"
        );
    }

    let mut summary = BTreeMap::new();
    let mut failures = String::new();
    for name in &names {
        let cases = vectors(name);
        if let Some((_, want)) = VOCABS.iter().find(|(n, _)| n == name) {
            assert_eq!(cases.len(), *want, "{name}: number of test texts");
        }
        let tok = match Tokenizer::from_gguf(
            &GgufFile::open(vocab_path(name)).unwrap_or_else(|e| panic!("{name}: {e}")),
        ) {
            Ok(tok) => tok,
            Err(e) => {
                let _ = writeln!(failures, "{name}: cannot load: {e}");
                summary.insert(name.clone(), (0, cases.len()));
                continue;
            }
        };
        let mut passed = 0;
        for (text, want) in &cases {
            match tok.encode(text, false, false) {
                Ok(got) if got == *want => passed += 1,
                Ok(got) => {
                    let _ = writeln!(
                        failures,
                        "{name}: {text:?}\n    want {want:?}\n    got  {got:?}"
                    );
                }
                Err(e) => {
                    let _ = writeln!(failures, "{name}: {text:?}: {e}");
                }
            }
        }
        summary.insert(name.clone(), (passed, cases.len()));
    }

    let (mut passed, mut total) = (0, 0);
    for (name, (p, t)) in &summary {
        eprintln!("{name:>16}: {p}/{t}");
        passed += p;
        total += t;
    }
    eprintln!("{:>16}: {passed}/{total}", "all");
    let expected: usize = VOCABS.iter().map(|(_, n)| n).sum();
    assert!(
        total >= expected,
        "only {total} vectors found, expected at least {expected}"
    );
    assert!(failures.is_empty(), "failed vectors:\n{failures}");
}

/// decode(encode(text)) gives `text` back for the text of every token and for every code point,
/// as the reference checks for SentencePiece vocabularies (control tokens rendered as text).
#[test]
fn llama_spm_round_trips_tokens_and_code_points() {
    let tok = tokenizer("llama-spm");
    let round_trip = |text: &str| -> String {
        let ids = tok.encode(text, false, true).expect("encode");
        tok.decode_with(&ids, true).expect("decode")
    };

    let mut checked = 0;
    for id in 0..tok.vocab_size() as u32 {
        let text = tok.decode_with(&[id], true).expect("decode a token");
        // Byte tokens of 0x80.. alone are not UTF-8 text, which is all `encode` accepts.
        if text.contains(char::REPLACEMENT_CHARACTER) {
            continue;
        }
        assert_eq!(round_trip(&text), text, "token {id}");
        checked += 1;
    }
    assert!(checked > 31_000, "only {checked} tokens checked");

    // As the reference, skipping the planes with no assigned characters and U+2581, which the
    // vocabulary uses for a space.
    let mut checked = 0;
    for c in (0..0x11_0000u32)
        .filter(|cp| !(0x4_0000..=0xE_0000).contains(cp))
        .filter_map(char::from_u32)
        .filter(|&c| c != '\u{2581}')
    {
        let text = c.to_string();
        assert_eq!(round_trip(&text), text, "U+{:04X}", u32::from(c));
        checked += 1;
    }
    assert!(checked > 400_000, "only {checked} code points checked");
}

/// The reference strips the whitespace after Phi-3's special tokens (all but `<unk>`, `<s>` and
/// `<|endoftext|>`) when it parses them; the suite's vectors parse none. Ids from
/// `llama-tokenize -m models/vocab/ggml-vocab-phi-3.gguf -p TEXT --ids` (special tokens parsed).
#[test]
fn phi3_special_tokens_take_the_whitespace_after_them() {
    let tok = tokenizer("phi-3");
    let cases: [(&str, &[u32]); 3] = [
        (
            "<|user|>\n  Hello there<|end|>\n\n<|assistant|>\t Hi",
            &[1, 32010, 15043, 727, 32007, 32001, 6324],
        ),
        (
            "a<|endoftext|>  b </s>  c<s>  d",
            &[1, 263, 32000, 259, 289, 29871, 2, 274, 1, 259, 270],
        ),
        ("<|system|> \r\n x<|end|>", &[1, 32006, 921, 32007]),
    ];
    for (text, want) in cases {
        assert_eq!(tok.encode(text, true, true).unwrap(), want, "{text:?}");
    }
}
