//! `realm-coordinator` as a user runs it: a real process, its stdout, stderr and exit status.

use std::process::{Command, Output};

use realm_tests::*;

fn coordinator(args: &[&str]) -> Output {
    Command::new(binary("realm-coordinator"))
        .args(args)
        .current_dir(repo_root())
        .env("REALM_THREADS", "2")
        .output()
        .expect("start realm-coordinator")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn run_streams_only_the_completion_on_the_default_model() {
    model_path(SMOLLM2);
    let o = coordinator(&[
        "run",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), " Paris.\n\nThe United\n");
    assert!(
        stderr(&o).contains("decode"),
        "usage line on stderr: {}",
        stderr(&o)
    );
}

#[test]
fn run_chat_answers_paris() {
    model_path(SMOLLM2);
    let o = coordinator(&[
        "run",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "24",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "{}", stdout(&o));
}

#[test]
fn tokenize_prints_reference_ids() {
    let gemma = model_path(GEMMA3);
    let text = fixture("tokenizer.json")["texts"]["t1"]
        .as_str()
        .unwrap()
        .to_string();
    let o = coordinator(&[
        "tokenize",
        "--model",
        gemma.to_str().unwrap(),
        "--text",
        &text,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ids: Vec<u32> = serde_json::from_str(stdout(&o).trim()).expect("a JSON array");
    assert_eq!(ids, reference_ids("gemma3", "t1"));
}

#[test]
fn perplexity_prints_ppl_last() {
    model_path(SMOLLM2);
    let o = coordinator(&[
        "perplexity",
        "--file",
        "tests/fixtures/ppl.txt",
        "--ctx",
        "128",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let last = out.lines().last().unwrap_or_default();
    let ppl: f64 = last
        .strip_prefix("PPL = ")
        .expect("PPL line last")
        .parse()
        .unwrap();
    assert!((ppl - 6.9082).abs() / 6.9082 < 0.01, "{ppl}");
}

#[test]
fn bad_model_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let o = coordinator(&[
        "run",
        "--model",
        missing.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("fetch-models.sh"), "{}", stderr(&o));

    // A real model cut short in its tensor data.
    let bytes = std::fs::read(model_path(SMOLLM2)).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let o = coordinator(&[
        "run",
        "--model",
        truncated.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("malformed GGUF") && err.contains("past the end"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn prompt_longer_than_context_is_refused() {
    model_path(SMOLLM2);
    let long = "hello ".repeat(9000);
    let o = coordinator(&["run", "--prompt", &long]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("context window of 8192"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn serve_refuses_a_step_budget_that_would_stall_it() {
    for (flag, value) in [
        ("--step-tokens", "0"),
        ("--pipeline-depth", "0"),
        ("--step-timeout-secs", "0"),
    ] {
        let o = coordinator(&["serve", "--worker", "127.0.0.1:1", flag, value]);
        assert!(!o.status.success(), "{flag} {value}");
        assert!(stderr(&o).contains("must be at least 1"), "{}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
}
