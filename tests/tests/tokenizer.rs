//! The tokenizers against token ids measured with the reference implementation on the project
//! models (`fixtures/tokenizer.json`, plus `fixtures/tokenizer_extra.json` for harder texts),
//! and decoding back to the original text.

use std::time::Instant;

use realm_common::gguf::GgufFile;
use realm_common::tokenizer::Tokenizer;
use realm_tests::{fixture, model_path, repo_root, GEMMA3, SMOLLM2};
use serde_json::Value;

const MODELS: [(&str, &str); 2] = [("smollm2", SMOLLM2), ("gemma3", GEMMA3)];

fn tokenizer(model: &str) -> Tokenizer {
    let file = MODELS
        .iter()
        .find(|(name, _)| *name == model)
        .map(|(_, file)| *file)
        .unwrap_or_else(|| panic!("unknown model {model}"));
    let path = model_path(file);
    let gguf = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an array of token ids")
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .expect("a token id")
        })
        .collect()
}

fn texts(fixture: &Value) -> Vec<(String, String)> {
    fixture["texts"]
        .as_object()
        .expect("texts")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("text").to_string()))
        .collect()
}

/// Compares every text of a fixture file with the ids recorded for `model`.
fn check_fixture(model: &str, name: &str) {
    let tok = tokenizer(model);
    let fx = fixture(name);
    let expected = &fx["ids"][model];
    let mut checked = 0;
    for (key, text) in texts(&fx) {
        let want = ids(&expected[key.as_str()]);
        let got = tok.encode(&text, true, true).expect("encode");
        assert_eq!(
            got, want,
            "{model} {name} {key} {text:?} (special tokens parsed)"
        );
        checked += 1;

        let plain_key = format!("{key}_no_parse_special");
        if let Some(want) = expected.get(plain_key.as_str()) {
            let got = tok.encode(&text, true, false).expect("encode");
            assert_eq!(
                got,
                ids(want),
                "{model} {name} {key} {text:?} (special tokens as text)"
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "{model} {name}: only {checked} cases found");
}

#[test]
fn smollm2_matches_reference_ids() {
    check_fixture("smollm2", "tokenizer.json");
}

#[test]
fn gemma3_matches_reference_ids() {
    check_fixture("gemma3", "tokenizer.json");
}

#[test]
fn smollm2_matches_reference_ids_on_hard_texts() {
    check_fixture("smollm2", "tokenizer_extra.json");
}

#[test]
fn gemma3_matches_reference_ids_on_hard_texts() {
    check_fixture("gemma3", "tokenizer_extra.json");
}

#[test]
fn special_tokens_and_flags() {
    let smol = tokenizer("smollm2");
    assert_eq!(smol.vocab_size(), 49152);
    assert!(!smol.add_bos());
    assert_eq!(smol.bos_id(), Some(1));
    assert_eq!(smol.eos_id(), Some(2));
    assert_eq!(smol.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(smol.token_text(2), Some("<|im_end|>"));
    for id in [0, 2, 4] {
        assert!(
            smol.is_end_of_generation(id),
            "smollm2 token {id} ends generation"
        );
    }
    assert!(!smol.is_end_of_generation(1));
    assert_eq!(
        smol.encode("", true, true).expect("encode"),
        Vec::<u32>::new()
    );

    let gemma = tokenizer("gemma3");
    assert_eq!(gemma.vocab_size(), 262144);
    assert!(gemma.add_bos());
    assert_eq!(gemma.bos_id(), Some(2));
    assert_eq!(gemma.eos_id(), Some(1));
    assert_eq!(gemma.token_text(2), Some("<bos>"));
    assert_eq!(gemma.token_to_id("<end_of_turn>"), Some(106));
    for id in [1, 106, 212] {
        assert!(
            gemma.is_end_of_generation(id),
            "gemma3 token {id} ends generation"
        );
    }
    assert!(!gemma.is_end_of_generation(2));
    assert_eq!(gemma.encode("", true, true).expect("encode"), vec![2]);
    assert_eq!(
        gemma.encode("", false, true).expect("encode"),
        Vec::<u32>::new()
    );

    assert!(gemma.token_bytes(u32::MAX, false).is_err());
    assert!(gemma.decode(&[262144]).is_err());
    assert_eq!(gemma.token_bytes(2, false).expect("bos"), b"");
    assert_eq!(gemma.token_bytes(2, true).expect("bos"), b"<bos>");
    let newline = gemma.token_to_id("<0x0A>").expect("byte token");
    assert_eq!(gemma.token_bytes(newline, false).expect("byte"), b"\n");
}

#[test]
fn decoding_matches_reference() {
    let fx = fixture("tokenizer_extra.json");
    for (model, _) in MODELS {
        let tok = tokenizer(model);
        for (key, text) in texts(&fx) {
            let ids = ids(&fx["ids"][model][key.as_str()]);
            let want = fx["ids"][model][format!("{key}_decoded").as_str()]
                .as_str()
                .expect("decoded text");
            let decoded = tok.decode(&ids).expect("decode");
            assert_eq!(decoded, want, "{model} {key} {text:?}");

            let mut stream = tok.stream_decoder();
            let mut streamed = String::new();
            for &id in &ids {
                streamed += &stream.push(&tok, id).expect("push");
            }
            streamed += &stream.finish();
            assert_eq!(streamed, decoded, "{model} {key} streamed");
        }
    }
}

#[test]
fn plain_text_round_trips() {
    let fx = fixture("tokenizer.json");
    let text =
        std::fs::read_to_string(repo_root().join("tests/fixtures/ppl.txt")).expect("ppl.txt");
    for (model, _) in MODELS {
        let tok = tokenizer(model);
        for (key, text) in texts(&fx)
            .into_iter()
            .chain([("ppl".to_string(), text.clone())])
        {
            // Special-token text is kept as text; it would otherwise decode to nothing.
            let ids = tok.encode(&text, true, false).expect("encode");
            assert_eq!(tok.decode(&ids).expect("decode"), text, "{model} {key}");
        }
    }
}

#[test]
fn stream_holds_back_split_characters() {
    let gemma = tokenizer("gemma3");
    // "🙂" is F0 9F 99 82: four byte tokens, one character.
    let bytes: Vec<u32> = "🙂"
        .bytes()
        .map(|b| {
            gemma
                .token_to_id(&format!("<0x{b:02X}>"))
                .expect("byte token")
        })
        .collect();
    let mut stream = gemma.stream_decoder();
    for &id in &bytes[..3] {
        assert_eq!(stream.push(&gemma, id).expect("push"), "");
    }
    assert_eq!(stream.push(&gemma, bytes[3]).expect("push"), "🙂");
    assert_eq!(stream.finish(), "");

    for &id in &bytes[..2] {
        assert_eq!(stream.push(&gemma, id).expect("push"), "");
    }
    assert_eq!(stream.finish(), "\u{FFFD}");
}

/// Prints load and encode times for the perplexity text; asserts only that it round-trips.
#[test]
fn encode_speed_report() {
    let text =
        std::fs::read_to_string(repo_root().join("tests/fixtures/ppl.txt")).expect("ppl.txt");
    for (model, file) in MODELS {
        let path = model_path(file);
        let gguf = GgufFile::open(&path).expect("open");
        let start = Instant::now();
        let tok = Tokenizer::from_gguf(&gguf).expect("load");
        let load = start.elapsed();

        let start = Instant::now();
        let ids = tok.encode(&text, true, true).expect("encode");
        let encode = start.elapsed();
        eprintln!(
            "{model}: tokenizer built in {:.1} ms; {} bytes -> {} tokens in {:.2} ms",
            load.as_secs_f64() * 1e3,
            text.len(),
            ids.len(),
            encode.as_secs_f64() * 1e3
        );
        assert_eq!(tok.decode(&ids).expect("decode"), text);
    }
}
