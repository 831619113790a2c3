//! Realm's next-token distributions against llama.cpp's on the project models, teacher-forced
//! over held-out prose (tests/fixtures/heldout.txt), fixtures from
//! `deploy/reference-logprobs.py`; the bars are those of [`judge`].

use realm_common::gguf::GgufFile;
use realm_common::model::Model;
use realm_tests::agreement::{judge, Fixture};
use realm_tests::*;

fn check(model_file: &str, fixture: &str) {
    let fixture = Fixture::read(&repo_root().join("tests/fixtures/logprobs").join(fixture));
    assert_eq!(
        fixture.model, model_file,
        "the fixture was made with another model"
    );
    let file = GgufFile::open(model_path(model_file)).expect("open model");
    let model = Model::load(&file).expect("load model");
    match judge(model_file, &model, &fixture) {
        Ok(line) => println!("{line}"),
        Err(line) => panic!("{line}"),
    }
}

#[test]
fn gemma3_agrees_with_llama_cpp_as_well_as_llama_cpp_with_itself() {
    check(GEMMA3, "gemma3-heldout.json");
}

#[test]
fn smollm2_agrees_with_llama_cpp_as_well_as_llama_cpp_with_itself() {
    check(SMOLLM2, "smollm2-heldout.json");
}
