//! Realm's next-token distributions against llama.cpp's, teacher-forced over held-out prose:
//! top-1 agreement at least llama.cpp's own across its settings (flash attention, batch size),
//! fixtures from `deploy/reference-logprobs.py`.
//!
//! The assertion is on one forward pass over the whole text (a prompt's numerics); the figures of
//! token-by-token feeding (a decode's numerics, as llama.cpp's reference run was fed) are printed
//! beside it.

use candle_core::Device;
use realm_common::gguf::GgufFile;
use realm_common::model::Model;
use realm_tests::agreement::{agreement, Agreement, Feeding, Fixture};
use realm_tests::*;

fn report(model_file: &str, feeding: Feeding, fixture: &Fixture, got: &Agreement) {
    println!(
        "{model_file}, {feeding:?}: Realm agrees with llama.cpp at {}/{} = {:.3}, mean |Δ top \
         logprob| {:.4}, {} choices outside llama.cpp's top 2; differs at {:?}",
        got.agree,
        got.total,
        got.rate(),
        got.mean_abs_delta,
        got.outside_top2,
        got.disagreements
    );
    for (setting, rate) in fixture.settings.iter().zip(&got.with_settings) {
        println!(
            "  Realm's top-1 against llama.cpp {}: {rate:.3}",
            setting.name
        );
    }
}

fn check(model_file: &str, fixture: &str) {
    let fixture = Fixture::read(&repo_root().join("tests/fixtures/logprobs").join(fixture));
    assert_eq!(
        fixture.model, model_file,
        "the fixture was made with another model"
    );
    let file = GgufFile::open(model_path(model_file)).expect("open model");
    let model = Model::load(&file, &Device::Cpu).expect("load model");
    for setting in &fixture.settings {
        println!(
            "llama.cpp {} against fa-off: {:.3}, mean |Δ top logprob| {:.4}",
            setting.name, setting.top1_agreement, setting.mean_abs_delta
        );
    }
    let stepwise = agreement(&model, &fixture, Feeding::TokenByToken);
    report(model_file, Feeding::TokenByToken, &fixture, &stepwise);
    let got = agreement(&model, &fixture, Feeding::OnePass);
    report(model_file, Feeding::OnePass, &fixture, &got);
    assert!(
        got.rate() >= fixture.self_agreement,
        "{model_file}: top-1 agreement {:.3} is below llama.cpp's with itself, {:.3}",
        got.rate(),
        fixture.self_agreement
    );
}

#[test]
fn gemma3_agrees_with_llama_cpp_as_well_as_llama_cpp_with_itself() {
    check(GEMMA3, "gemma3-heldout.json");
}

/// SmolLM2 agrees at 0.955 in one pass (0.960 token by token) where llama.cpp agrees with
/// itself at 0.975-0.980 on this text: a departure not yet found.
#[test]
#[ignore = "SmolLM2 agrees with llama.cpp at 0.955, below llama.cpp's 0.975 with itself"]
fn smollm2_agrees_with_llama_cpp_as_well_as_llama_cpp_with_itself() {
    check(SMOLLM2, "smollm2-heldout.json");
}
