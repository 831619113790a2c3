//! Shared helpers for Realm's end-to-end tests: where the models and fixtures are.

use std::path::{Path, PathBuf};

use realm_common::generate::{generate, Completion, GenerationParams};

pub mod agreement;
pub mod http;
pub mod process;

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives in the repository")
        .to_path_buf()
}

/// Path of a project model (under `$REALM_MODELS_DIR`, else `models/`); fails the test, never
/// skips it, when the model has not been fetched.
pub fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("REALM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"));
    let path = dir.join(file);
    assert!(
        path.exists(),
        "{} is missing: run deploy/fetch-models.sh first",
        path.display()
    );
    path
}

/// The greedy completion of the raw text `prompt` by the single-process model core: the output a
/// distributed run must equal.
pub fn single_process(model: &Path, prompt: &str, max_tokens: usize) -> Completion {
    let file = realm_common::gguf::GgufFile::open(model).expect("the model file");
    let tokenizer = realm_common::tokenizer::Tokenizer::from_gguf(&file).expect("its tokenizer");
    let m = realm_common::model::Model::load(&file).expect("its weights");
    let params = GenerationParams {
        max_tokens,
        ..GenerationParams::default()
    };
    let ids = tokenizer
        .encode(prompt, true, true)
        .expect("the prompt's ids");
    generate(&m, &tokenizer, ids, &params, |_| {}).expect("a completion")
}

pub fn fixture(name: &str) -> serde_json::Value {
    let path = repo_root().join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Reference token ids of fixture text `key` (t1..t6) for `model` ("smollm2" or "gemma3").
pub fn reference_ids(model: &str, key: &str) -> Vec<u32> {
    let ids = &fixture("tokenizer.json")["ids"][model][key];
    ids.as_array()
        .unwrap_or_else(|| panic!("no reference ids for {model}/{key}"))
        .iter()
        .map(|v| v.as_u64().expect("token id") as u32)
        .collect()
}

/// Path of one of Realm's binaries, brought up to date with the sources once per test process
/// (a no-op when `cargo test --workspace` has just built it), so a test never runs a stale binary.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .to_path_buf();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let release = dir.file_name().is_some_and(|p| p == "release");
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo
            .args(["build", "--quiet", "--bin", name])
            .current_dir(repo_root());
        if release {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo build");
        assert!(status.success(), "cargo build --bin {name} failed");
        built.push(name.to_string());
    }
    dir.join(name)
}

/// Reference greedy continuation ids of prompt `index` for `model`.
pub fn reference_greedy(model: &str, index: usize) -> (String, Vec<u32>) {
    let run = &fixture("greedy.json")["runs"][model][index];
    let prompt = run["prompt"].as_str().expect("prompt").to_string();
    let ids = run["generated_ids"]
        .as_array()
        .expect("generated ids")
        .iter()
        .map(|v| v.as_u64().expect("token id") as u32)
        .collect();
    (prompt, ids)
}

/// Resident KiB of the mappings of `path` in this process (`/proc/self/smaps`).
pub fn mapped_rss_kib(path: &std::path::Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let name = path.to_str().expect("a UTF-8 path");
    let mut inside = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let is_header = line
            .split_whitespace()
            .next()
            .is_some_and(|range| range.contains('-') && !range.ends_with(':'));
        if is_header {
            inside = line.ends_with(name);
        } else if let (true, Some(rest)) = (inside, line.strip_prefix("Rss:")) {
            kib += rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    kib
}
