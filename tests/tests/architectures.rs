//! Every architecture Realm runs, checked against llama.cpp on synthetic models: the test writes
//! each model again with `realm_common::synthetic` (deterministic: the bytes must hash to the
//! file llama.cpp ran, recorded in the fixture) and compares Realm's teacher-forced next-token
//! distributions with llama.cpp's over held-out prose, one byte per token, against llama.cpp's
//! agreement with itself across its own settings (flash attention, batch size) on the same file
//! (see `realm_tests::agreement::judge` for the bars).
//!
//! Fixtures: tests/fixtures/logprobs/synthetic-*.json, made by `deploy/reference-logprobs.py
//! --all` (see tests/fixtures/logprobs/manifest.json).

use std::path::Path;

use realm_common::gguf::GgufFile;
use realm_common::model::Model;
use realm_common::synthetic::{self, SyntheticArch, SyntheticDType, SyntheticSpec};
use realm_tests::agreement::{judge, Fixture};
use realm_tests::repo_root;
use sha2::Digest;

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read model");
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn check(arch: SyntheticArch) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut failures = Vec::new();
    for dtype in [SyntheticDType::Q8_0, SyntheticDType::Q4KM] {
        let name = format!("{}-{}", arch.name(), dtype.name());
        let fixture_path = repo_root()
            .join("tests/fixtures/logprobs")
            .join(format!("synthetic-{name}.json"));
        let fixture = Fixture::read(&fixture_path);
        let path = dir.path().join(format!("{name}.gguf"));
        synthetic::write(&path, &SyntheticSpec::fixture(arch, dtype)).expect("write model");
        assert_eq!(
            sha256(&path),
            fixture.model_sha256,
            "{name}: the synthetic model is not the file llama.cpp ran; regenerate the fixture"
        );
        let model = Model::load(&GgufFile::open(&path).expect("open")).expect("load");
        match judge(&name, &model, &fixture) {
            Ok(line) => println!("{line}"),
            Err(line) => failures.push(line),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn llama3_rope_factors_agree_with_llama_cpp() {
    check(SyntheticArch::Llama3);
}

#[test]
fn mixtral_experts_agree_with_llama_cpp() {
    check(SyntheticArch::Mixtral);
}

#[test]
fn qwen2_agrees_with_llama_cpp() {
    check(SyntheticArch::Qwen2);
}

#[test]
fn qwen3_agrees_with_llama_cpp() {
    check(SyntheticArch::Qwen3);
}

#[test]
fn qwen3moe_agrees_with_llama_cpp() {
    check(SyntheticArch::Qwen3Moe);
}

#[test]
fn phi3_longrope_agrees_with_llama_cpp() {
    check(SyntheticArch::Phi3);
}

#[test]
fn gemma2_agrees_with_llama_cpp() {
    check(SyntheticArch::Gemma2);
}
