//! The OpenAI-compatible HTTP API, Prometheus metrics and request ids as a user meets them: real
//! `realm-worker` and `realm-coordinator serve --http-listen` processes on loopback, driven by
//! the official `openai` Python package (from `tests/python/setup.sh`) and by curl.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use realm_common::generate::{generate, GenerationParams};
use realm_common::gguf::GgufFile;
use realm_common::logprobs::token_string;
use realm_common::model::Model;
use realm_common::sampling::SamplingParams;
use realm_common::tokenizer::Tokenizer;
use realm_tests::http::curl;
use realm_tests::*;
use serde_json::Value;

/// A child process killed when dropped, so a failing test leaves nothing running.
struct Process {
    child: Child,
    /// Addresses it announced on stdout, by what they serve (`listening`, `metrics`, `HTTP`).
    addrs: Vec<(String, String)>,
    log: PathBuf,
}

impl Process {
    fn addr(&self, what: &str) -> &str {
        self.addrs
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, a)| a.as_str())
            .unwrap_or_else(|| panic!("no {what} address in {:?}", self.addrs))
    }

    /// Its log so far, one JSON object per line.
    fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .expect("read log")
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin` with JSON logs (filter `log_filter`) into `log`, and reads the addresses it
/// announces until its `<bin> listening on ADDR` line.
fn start(bin: &str, args: &[String], log: PathBuf, log_filter: &str) -> Process {
    let mut child = Command::new(binary(bin))
        .args(args)
        .args(["--log-format", "json"])
        .current_dir(repo_root())
        .env("REALM_THREADS", "1")
        .env("REALM_LOG", log_filter)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log).expect("log file")))
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut addrs = Vec::new();
    loop {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read stdout");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            [b, "listening", "on", addr] if b == bin => {
                addrs.push(("listening".to_string(), addr.to_string()));
                break;
            }
            [b, "serving", what, "on", addr] if b == bin => {
                addrs.push((what.to_string(), addr.to_string()))
            }
            _ => {
                let status = child.wait().ok();
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("{bin} did not start (status {status:?}), printed {line:?}; log:\n{log}");
            }
        }
    }
    Process { child, addrs, log }
}

/// Two workers (the second under a Memory64 budget, so its layer manager counts) and a
/// coordinator serving HTTP, all with metrics and JSON debug logs.
struct TestCluster {
    workers: Vec<Process>,
    coordinator: Process,
    _logs: tempfile::TempDir,
}

impl TestCluster {
    fn start() -> Self {
        Self::of(SMOLLM2, [None, Some("12MiB")])
    }

    /// Two workers of `model_file`, each with its Memory64 budget, if any.
    fn of(model_file: &str, budgets: [Option<&str>; 2]) -> Self {
        let logs = tempfile::tempdir().expect("temp dir");
        let model = model_path(model_file);
        let model = model.to_str().unwrap();
        let workers: Vec<Process> = budgets
            .iter()
            .enumerate()
            .map(|(i, budget)| {
                let mut args: Vec<String> = [
                    "--listen",
                    "127.0.0.1:0",
                    "--metrics-listen",
                    "127.0.0.1:0",
                    "--model",
                    model,
                    "--threads",
                    "1",
                ]
                .map(String::from)
                .to_vec();
                if let Some(b) = budget {
                    args.extend(["--memory-budget".to_string(), b.to_string()]);
                }
                let log = logs.path().join(format!("worker{i}.log"));
                start("realm-worker", &args, log, "realm_worker=debug")
            })
            .collect();
        let mut args: Vec<String> = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--model",
            model,
        ]
        .map(String::from)
        .to_vec();
        for w in &workers {
            args.extend(["--worker".to_string(), w.addr("listening").to_string()]);
        }
        let log = logs.path().join("coordinator.log");
        let coordinator = start("realm-coordinator", &args, log, "realm_coordinator=debug");
        Self {
            workers,
            coordinator,
            _logs: logs,
        }
    }

    fn http(&self) -> String {
        format!("http://{}", self.coordinator.addr("HTTP"))
    }
}

/// The value of one sample (`name` or `name{labels}`) in Prometheus text, if present.
fn find_sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == series).then(|| value.parse::<f64>().expect("sample value"))
    })
}

/// The value of one sample. A series that is absent fails the test: a renamed metric must not
/// read as 0.
fn sample(text: &str, series: &str) -> f64 {
    find_sample(text, series)
        .unwrap_or_else(|| panic!("no series {series} in the metrics:\n{text}"))
}

/// As [`sample`], in metrics read before the requests a test makes: a counter the process has
/// not counted anything on yet may be absent, and reads as 0.
fn sample_before(text: &str, series: &str) -> f64 {
    find_sample(text, series).unwrap_or(0.0)
}

/// Layer accesses of a worker's layer manager, every kind (each access is one of them), as
/// `moved` counts each series.
fn layer_accesses(moved: &impl Fn(&str) -> f64) -> f64 {
    [
        "realm_worker_layer_hits_total",
        "realm_worker_layer_misses_total",
        "realm_worker_layer_prefetch_hits_total",
        "realm_worker_layer_waits_total",
    ]
    .iter()
    .map(|s| moved(s))
    .sum()
}

/// The single-process oracle's greedy completion of `prompt` in `max_tokens` tokens.
fn oracle(prompt: &str, max_tokens: usize) -> (String, usize, usize) {
    let file = GgufFile::open(model_path(SMOLLM2)).expect("open model");
    let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer");
    let model = Model::load(&file).expect("load model");
    let tokens = tokenizer.encode(prompt, true, true).expect("encode");
    let params = GenerationParams {
        max_tokens,
        sampling: SamplingParams::default(),
        stop: Vec::new(),
    };
    let c = generate(&model, &tokenizer, tokens, &params, |_| {}).expect("generate");
    (c.text, c.usage.prompt_tokens, c.usage.generated_tokens)
}

/// One generated token as the single-process model sees it: its text (as the APIs write it),
/// its log-probability and the `top` most likely tokens with theirs.
struct OracleToken {
    token: String,
    logprob: f64,
    top: Vec<(String, f64)>,
}

/// The single-process model's greedy tokens for `prompt`, each with the log-softmax of the
/// logits at its position (computed here, in f64, apart from Realm's own code).
fn oracle_logprobs(prompt: &str, max_tokens: usize, top: usize) -> Vec<OracleToken> {
    let file = GgufFile::open(model_path(SMOLLM2)).expect("open model");
    let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer");
    let model = Model::load(&file).expect("load model");
    let mut input = tokenizer.encode(prompt, true, true).expect("encode");
    let mut kv = model.new_session_kv();
    let text = |id: usize, special: bool| {
        token_string(&tokenizer.token_bytes(id as u32, special).expect("token"))
    };
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let logits: Vec<f32> = model
            .forward(&input, &mut kv, false)
            .and_then(|l| Ok(l.squeeze(0)?.to_vec1()?))
            .expect("forward");
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let log_z = max
            + logits
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let chosen = order[0];
        out.push(OracleToken {
            token: text(chosen, false),
            logprob: logits[chosen] as f64 - log_z,
            top: order[..top]
                .iter()
                .map(|&i| (text(i, true), logits[i] as f64 - log_z))
                .collect(),
        });
        input = vec![chosen as u32];
    }
    out
}

/// Realm's logprobs and the single-process model's agree within this.
const LOGPROB_TOLERANCE: f64 = 1e-3;

fn python() -> PathBuf {
    let venv = std::env::var_os("REALM_PYTHON_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/python"));
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run tests/python/setup.sh (or deploy/setup.sh) first",
        python.display()
    );
    python
}

#[test]
fn openai_client_drives_a_two_worker_cluster() {
    let cluster = TestCluster::start();
    let script = repo_root().join("tests/python/openai_check.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(format!("{}/v1", cluster.http()))
        .stderr(Stdio::inherit())
        .output()
        .expect("run the openai script");
    assert!(out.status.success(), "{}", Path::new(&script).display());
    let r: Value = serde_json::from_slice(&out.stdout).expect("script output is JSON");
    eprintln!("openai {}", r["openai_version"]);

    assert_eq!(
        r["models"],
        serde_json::json!(["SmolLM2-135M-Instruct.Q4_1"])
    );

    // Streamed chat: really streamed (many pieces), about Paris, with usage.
    let chat = &r["chat_stream"];
    let pieces = chat["pieces"].as_array().expect("pieces");
    let text: String = pieces.iter().filter_map(Value::as_str).collect();
    assert!(pieces.len() > 3, "{chat}");
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(chat["role"], "assistant");
    assert_eq!(chat["finish_reason"], "stop", "{chat}");
    let usage = &chat["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    // Non-streamed completion: the single-process output, with its token counts.
    let (want_text, want_prompt, want_generated) = oracle("The capital of France is", 8);
    let c = &r["completion"];
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["text"], want_text.as_str());
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(
        c["usage"]["prompt_tokens"].as_u64(),
        Some(want_prompt as u64)
    );
    assert_eq!(
        c["usage"]["completion_tokens"].as_u64(),
        Some(want_generated as u64)
    );
    assert_eq!(want_generated, 8);
    assert_eq!(
        c["usage"]["total_tokens"].as_u64(),
        Some((want_prompt + want_generated) as u64)
    );

    // Same seed, same sampled text; a stop string ends the text before it.
    assert_eq!(r["seeded"][0], r["seeded"][1]);
    let stopped = &r["stopped"];
    assert_eq!(stopped["finish_reason"], "stop", "{stopped}");
    let stopped_text = stopped["text"].as_str().unwrap();
    assert!(!stopped_text.contains('.'), "{stopped_text:?}");
    assert!(stopped_text.contains("Paris"), "{stopped_text:?}");

    assert_eq!(r["unknown_model"]["status"], 404, "{}", r["unknown_model"]);

    logprobs_are_the_model_s(&cluster, &r["logprobs"]);
    models_report_their_architecture(&cluster);
}

/// The logprobs the openai client read (it checked their shape and consistency itself): those
/// of the greedy completion are the single-process model's log-softmax, gRPC `Generate` gives
/// the same, and a stop string inside a token keeps the logprobs of the text before it.
fn logprobs_are_the_model_s(cluster: &TestCluster, r: &Value) {
    let c = &r["completion"];
    let tokens = c["tokens"].as_array().expect("tokens");
    let oracle = oracle_logprobs("The capital of France is", tokens.len(), 3);
    let mut worst = 0.0f64;
    for (i, want) in oracle.iter().enumerate() {
        assert_eq!(tokens[i], want.token.as_str(), "token {i}: {c}");
        let got = c["token_logprobs"][i].as_f64().expect("logprob");
        worst = worst.max((got - want.logprob).abs());
        let top = c["top_logprobs"][i].as_object().expect("top logprobs");
        // The chosen token is the likeliest: with it, the three alternatives.
        assert_eq!(top.len(), 3, "{top:?}");
        for (token, logprob) in &want.top {
            let got = top[token.as_str()]
                .as_f64()
                .expect("an alternative's logprob");
            worst = worst.max((got - logprob).abs());
        }
    }
    eprintln!("logprobs: largest difference from the single-process model {worst:.2e}");
    assert!(worst < LOGPROB_TOLERANCE, "{worst}");

    // gRPC: the same tokens, logprobs and alternatives.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let entries = runtime.block_on(async {
        use realm_proto::pb;
        let grpc = cluster.coordinator.addr("listening");
        let mut client = pb::realm_client::RealmClient::connect(format!("http://{grpc}"))
            .await
            .expect("connect");
        let request = pb::GenerateRequest {
            prompt: "The capital of France is".to_string(),
            max_tokens: tokens.len() as u32,
            logprobs: true,
            top_logprobs: 3,
            ..Default::default()
        };
        let mut stream = client
            .generate(request)
            .await
            .expect("generate")
            .into_inner();
        let mut entries = Vec::new();
        while let Some(message) = stream.message().await.expect("a message") {
            entries.extend(message.logprobs);
        }
        entries
    });
    assert_eq!(entries.len(), tokens.len());
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(token_string(&e.bytes), tokens[i].as_str().unwrap());
        // Equal as the f32 they are (serde_json may read the JSON's f64 one unit off).
        let http = c["token_logprobs"][i].as_f64().unwrap() as f32;
        assert_eq!(e.logprob, http, "{i}: {e:?}");
        assert_eq!(e.top_logprobs.len(), 3);
        for t in &e.top_logprobs {
            let http = &c["top_logprobs"][i][token_string(&t.bytes)];
            assert_eq!(
                Some(t.logprob),
                http.as_f64().map(|l| l as f32),
                "{i}: {t:?}"
            );
        }
    }

    // A character split over tokens: SmolLM2 writes " 🌟" as " \xf0\x9f", "\x8c", "\x9f". The
    // tokens' bytes join to the text; the tokens that begin the character begin where it does.
    let split = "My favourite emojis are 😀 and";
    let (entries, text) = runtime.block_on(async {
        use realm_proto::pb;
        let grpc = cluster.coordinator.addr("listening");
        let mut client = pb::realm_client::RealmClient::connect(format!("http://{grpc}"))
            .await
            .expect("connect");
        let request = pb::GenerateRequest {
            prompt: split.to_string(),
            max_tokens: 4,
            logprobs: true,
            ..Default::default()
        };
        let mut stream = client
            .generate(request)
            .await
            .expect("generate")
            .into_inner();
        let (mut entries, mut text) = (Vec::new(), String::new());
        while let Some(message) = stream.message().await.expect("a message") {
            entries.extend(message.logprobs);
            text.push_str(&message.text);
        }
        (entries, text)
    });
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.bytes.clone()).collect();
    assert_eq!(bytes, text.as_bytes(), "{entries:?}");
    assert!(
        entries
            .iter()
            .any(|e| std::str::from_utf8(&e.bytes).is_err()),
        "no token holds part of a character: {text:?}"
    );
    let url = format!("{}/v1/completions", cluster.http());
    let body = serde_json::json!({
        "prompt": split, "max_tokens": 4, "temperature": 0, "logprobs": 0,
    });
    let whole = curl(&url, Some(&body.to_string()), &[]).json();
    let choice = &whole["choices"][0];
    assert_eq!(choice["text"], text.as_str());
    assert_eq!(
        choice["logprobs"]["tokens"],
        serde_json::json!([" \\xf0\\x9f", "\\x8c", "\\x9f", "."]),
        "{whole}"
    );
    assert_eq!(
        choice["logprobs"]["text_offset"],
        serde_json::json!([0, 1, 1, 2])
    );

    // Stop strings: "." ends the text before the second token; "ar" cuts into " Paris", which
    // keeps the bytes before the cut, streamed or not.
    assert_eq!(r["stopped"]["tokens"], serde_json::json!([" Paris"]));
    let body = r#"{"prompt":"The capital of France is","max_tokens":4,"temperature":0,
                   "logprobs":1,"stop":"ar""#;
    let whole = curl(&url, Some(&format!("{body}}}")), &[]).json();
    let choice = &whole["choices"][0];
    assert_eq!(choice["text"], " P", "{whole}");
    assert_eq!(choice["logprobs"]["tokens"], serde_json::json!([" P"]));
    assert_eq!(choice["logprobs"]["text_offset"], serde_json::json!([0]));
    assert_eq!(
        choice["logprobs"]["token_logprobs"][0],
        c["token_logprobs"][0]
    );
    let streamed = curl(&url, Some(&format!(r#"{body},"stream":true}}"#)), &[]).body;
    let chunks: Vec<Value> = streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("a JSON chunk"))
        .collect();
    let streamed_tokens: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["tokens"].as_array())
        .flatten()
        .cloned()
        .collect();
    assert_eq!(streamed_tokens, [" P"], "{streamed}");
}

/// `/v1/models`, `ListModels` and `realm models` name the model's architecture.
fn models_report_their_architecture(cluster: &TestCluster) {
    let models = curl(&format!("{}/v1/models", cluster.http()), None, &[]).json();
    let model = &models["data"][0];
    assert_eq!(model["id"], "SmolLM2-135M-Instruct.Q4_1", "{models}");
    assert_eq!(model["object"], "model");
    assert_eq!(model["architecture"], "llama", "{models}");
    let one = curl(
        &format!("{}/v1/models/SmolLM2-135M-Instruct.Q4_1", cluster.http()),
        None,
        &[],
    )
    .json();
    assert_eq!(one["architecture"], "llama", "{one}");

    let out = Command::new(binary("realm"))
        .args([
            "--coordinator",
            cluster.coordinator.addr("listening"),
            "models",
        ])
        .output()
        .expect("run realm models");
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = line.trim_end().split('\t').collect();
    assert_eq!(
        fields[..2],
        ["SmolLM2-135M-Instruct.Q4_1", "llama"],
        "{line}"
    );

    // And `realm generate --logprobs` prints each token's line to stderr.
    let out = Command::new(binary("realm"))
        .args([
            "--coordinator",
            cluster.coordinator.addr("listening"),
            "generate",
        ])
        .args(["--prompt", "The capital of France is", "--max-tokens", "2"])
        .args(["--logprobs", "2"])
        .output()
        .expect("run realm generate");
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().expect("a logprob line");
    assert!(first.contains("\" Paris\""), "{stderr}");
    assert_eq!(first.split('\t').count(), 4, "{first:?}");
}

#[test]
fn errors_have_the_openai_shape_and_status() {
    let cluster = TestCluster::start();
    let base = cluster.http();
    let chat = format!("{base}/v1/chat/completions");
    let user = r#"[{"role":"user","content":"hi"}]"#;
    let cases = [
        (
            format!(r#"{{"model":"no-such-model","messages":{user}}}"#),
            404,
            Some("model_not_found"),
            Some("model"),
        ),
        (r#"{"messages": "#.to_string(), 400, None, None),
        (
            format!(r#"{{"messages":{user},"temperature":-1}}"#),
            400,
            None,
            Some("temperature"),
        ),
        (
            format!(r#"{{"messages":{user},"presence_penalty":2.5}}"#),
            400,
            None,
            Some("presence_penalty"),
        ),
        (
            format!(r#"{{"messages":{user},"n":2}}"#),
            400,
            None,
            Some("n"),
        ),
        (
            r#"{"messages":[]}"#.to_string(),
            400,
            None,
            Some("messages"),
        ),
        (
            r#"{"messages":[{"role":"tool","content":"x"}]}"#.to_string(),
            400,
            None,
            Some("messages"),
        ),
        (
            format!(r#"{{"messages":{user},"max_tokens":0}}"#),
            400,
            None,
            Some("max_tokens"),
        ),
    ];
    // Fields Realm does not honour are refused by name, never ignored.
    let refused = [
        r#""logit_bias":{"9":5}"#,
        r#""tools":[{"type":"function","function":{"name":"f"}}]"#,
        r#""tool_choice":"required""#,
        r#""functions":[{"name":"f"}]"#,
        r#""response_format":{"type":"json_object"}"#,
        r#""store":true"#,
        r#""top_logprobs":2"#,
        r#""logprobs":3"#,
        r#""stream_options":{"include_usage":true}"#,
        r#""n_probs":3"#,
    ]
    .map(|field| {
        let name = field[1..].split('"').next().unwrap().to_string();
        (
            format!(r#"{{"messages":{user},{field}}}"#),
            400,
            None,
            Some(name),
        )
    });
    let cases = cases
        .into_iter()
        .map(|(body, status, code, param)| (body, status, code, param.map(str::to_string)))
        .chain(refused)
        .map(|(body, status, code, param)| (chat.clone(), body, status, code, param));
    let completions = format!("{base}/v1/completions");
    let refused_completions = [
        (r#""echo":true"#, "echo"),
        (r#""best_of":3"#, "best_of"),
        (r#""suffix":" end.""#, "suffix"),
        (r#""logprobs":6"#, "logprobs"),
        (r#""logprobs":true"#, "logprobs"),
        (r#""top_logprobs":1"#, "top_logprobs"),
    ]
    .map(|(field, name)| {
        (
            completions.clone(),
            format!(r#"{{"prompt":"Hi",{field}}}"#),
            400,
            None,
            Some(name.to_string()),
        )
    });
    for (url, body, status, code, param) in cases.chain(refused_completions) {
        let reply = curl(&url, Some(&body), &[]);
        assert_eq!(reply.status, status, "{body}: {}", reply.body);
        let error = &reply.json()["error"];
        let kind = error["type"].as_str().expect("error type");
        assert_eq!(kind, "invalid_request_error", "{body}: {error}");
        assert!(!error["message"].as_str().unwrap().is_empty());
        assert_eq!(error["code"].as_str(), code, "{body}: {error}");
        assert_eq!(error["param"].as_str(), param.as_deref(), "{body}: {error}");
        if let Some(param) = param {
            let message = error["message"].as_str().unwrap();
            assert!(message.contains(&param), "{body}: {message}");
        }
    }
    // Fields that ask for nothing, or change nothing Realm does, are accepted.
    for (url, body) in [
        (
            &chat,
            format!(
                r#"{{"messages":{user},"max_tokens":1,"user":"u1","presence_penalty":0,
                    "logit_bias":{{}},"tools":[],"tool_choice":"none","parallel_tool_calls":false,
                    "response_format":{{"type":"text"}},"n":1,"logprobs":false,"seed":null}}"#
            ),
        ),
        (
            &completions,
            r#"{"prompt":"Hi","max_tokens":1,"echo":false,"best_of":1,"suffix":null,"user":"u1"}"#
                .to_string(),
        ),
    ] {
        let reply = curl(url, Some(&body), &[]);
        assert_eq!(reply.status, 200, "{body}: {}", reply.body);
    }
    // The presence and frequency penalties are honoured: the greedy text repeats "\n" unless
    // they keep it from it.
    let greedy = |extra: &str| {
        let body = format!(
            r#"{{"prompt":"The capital of France is","max_tokens":8,"temperature":0{extra}}}"#
        );
        let reply = curl(&completions, Some(&body), &[]);
        assert_eq!(reply.status, 200, "{body}: {}", reply.body);
        reply.json()["choices"][0]["text"]
            .as_str()
            .expect("text")
            .to_string()
    };
    let plain = greedy("");
    assert!(plain.starts_with(" Paris.\n\n"), "{plain:?}");
    for penalty in [r#","presence_penalty":2"#, r#","frequency_penalty":2"#] {
        let penalised = greedy(penalty);
        assert!(!penalised.contains("\n\n"), "{penalty}: {penalised:?}");
    }
    let missing = curl(&format!("{base}/v2/nothing"), None, &[]);
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "unknown_url");

    let health = curl(&format!("{base}/health"), None, &[]);
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
}

/// Sixteen prompts, the reference's four first.
const SIXTEEN: [&str; 16] = [
    "The capital of France is",
    "The capital of Germany is",
    "The largest planet in the solar system is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The best way to learn a new language is",
    "In 1492, Christopher Columbus",
    "The recipe for a good pancake starts with",
    "My favourite animal is the",
    "The theory of relativity says that",
    "To build a house, you first need",
    "The ocean is home to",
    "A computer program is",
    "The history of the Roman Empire",
    "Music makes people feel",
    "Tomorrow the weather will be",
];

/// The token ids, text and finish reason of one greedy stream over the Realm gRPC API.
async fn grpc_stream(addr: &str, prompt: &str, max_tokens: u32) -> (Vec<u32>, String, String) {
    use realm_proto::pb;
    let mut client = pb::realm_client::RealmClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the coordinator");
    let request = pb::GenerateRequest {
        prompt: prompt.to_string(),
        max_tokens,
        ..Default::default()
    };
    let mut stream = client
        .generate(request)
        .await
        .expect("generate")
        .into_inner();
    let (mut ids, mut text, mut finish) = (Vec::new(), String::new(), None);
    while let Some(message) = stream.message().await.expect("a stream message") {
        ids.extend(message.token_ids);
        text.push_str(&message.text);
        finish = message.finish.map(|f| f.reason);
    }
    (ids, text, finish.expect("the last message finishes"))
}

/// Sixteen greedy streams at once through two workers: each must read the very tokens and text
/// it reads alone (and, for SmolLM2, the reference's), while the steps carry many sessions each,
/// and every worker acquires each layer once per step, whatever the sessions in it.
fn batched_streams_equal_each_stream_alone(
    model_file: &str,
    budgets: [Option<&str>; 2],
    reference: Option<&str>,
) {
    const TOKENS: u32 = 16;
    let cluster = TestCluster::of(model_file, budgets);
    let grpc = cluster.coordinator.addr("listening").to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let alone: Vec<_> = SIXTEEN
        .iter()
        .map(|p| runtime.block_on(grpc_stream(&grpc, p, TOKENS)))
        .collect();

    let scrape = |url: String| curl(&url, None, &[]).body;
    let coordinator_metrics = || scrape(format!("{}/metrics", cluster.http()));
    let worker_metrics = |w: &Process| scrape(format!("http://{}/metrics", w.addr("metrics")));
    let before = coordinator_metrics();
    let workers_before: Vec<String> = cluster.workers.iter().map(worker_metrics).collect();
    let together = runtime.block_on(async {
        let streams = SIXTEEN.iter().map(|p| grpc_stream(&grpc, p, TOKENS));
        futures_util::future::join_all(streams).await
    });
    let after = coordinator_metrics();

    for ((prompt, alone), together) in SIXTEEN.iter().zip(&alone).zip(&together) {
        assert_eq!(alone.0.len(), TOKENS as usize, "{prompt:?}");
        assert_eq!(
            together, alone,
            "{model_file} {prompt:?} among fifteen others"
        );
    }
    if let Some(key) = reference {
        let runs = &fixture("greedy.json")["runs"][key];
        for (run, (ids, text, _)) in runs.as_array().expect("runs").iter().zip(&together) {
            let want: Vec<u32> = run["generated_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect();
            assert_eq!(ids, &want, "{}", run["prompt"]);
            assert_eq!(
                text,
                run["content"].as_str().expect("content"),
                "{}",
                run["prompt"]
            );
        }
    }
    // The steps carried many sessions each: sixteen decoding streams over a two-stage
    // pipeline make micro-batches of about eight.
    let moved = |series: &str| sample(&after, series) - sample_before(&before, series);
    let id = model_file.trim_end_matches(".gguf");
    let steps = moved(&format!(r#"realm_step_sessions_count{{model="{id}"}}"#));
    let sessions = moved(&format!(r#"realm_step_sessions_sum{{model="{id}"}}"#));
    assert!(steps > 0.0, "{after}");
    assert!(
        sessions / steps > 4.0,
        "{sessions} sessions in {steps} steps\n{after}"
    );
    assert!(
        moved(&format!(
            r#"realm_queue_wait_seconds_count{{model="{id}"}}"#
        )) >= 16.0,
        "{after}"
    );
    for (w, before) in cluster.workers.iter().zip(&workers_before) {
        let after = worker_metrics(w);
        let moved = |series: &str| sample(&after, series) - sample_before(before, series);
        let accesses = layer_accesses(&moved);
        let layers = sample(&after, "realm_worker_shard_layers");
        assert_eq!(
            accesses,
            moved("realm_worker_forwards_total") * layers,
            "each step acquires each layer once\n{after}"
        );
        assert!(
            moved("realm_worker_forward_tokens_total") > moved("realm_worker_forwards_total") * 4.0,
            "{after}"
        );
    }
}

#[test]
fn smollm2_batched_streams_equal_each_stream_alone_and_the_reference() {
    batched_streams_equal_each_stream_alone(SMOLLM2, [None, Some("12MiB")], Some("smollm2"));
}

#[test]
fn gemma3_batched_streams_equal_each_stream_alone() {
    batched_streams_equal_each_stream_alone(GEMMA3, [None, None], None);
}

#[test]
fn metrics_count_a_generation_exactly() {
    let cluster = TestCluster::start();
    let base = cluster.http();
    let scrape = |url: String| {
        let reply = curl(&url, None, &[]);
        assert_eq!(reply.status, 200, "{url}");
        assert!(
            reply.headers.contains("content-type: text/plain"),
            "{}",
            reply.headers
        );
        reply.body
    };
    let coordinator_metrics = || scrape(format!("{base}/metrics"));
    let worker_metrics = |w: &Process| scrape(format!("http://{}/metrics", w.addr("metrics")));

    let before = coordinator_metrics();
    let workers_before: Vec<String> = cluster.workers.iter().map(worker_metrics).collect();
    let reply = curl(
        &format!("{base}/v1/completions"),
        Some(r#"{"prompt":"The capital of France is","max_tokens":6,"temperature":0}"#),
        &[],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let usage = &reply.json()["usage"];
    let prompt = usage["prompt_tokens"].as_f64().unwrap();
    let generated = usage["completion_tokens"].as_f64().unwrap();
    assert_eq!(generated, 6.0);
    let after = coordinator_metrics();

    // Every series of a generation carries its model's name.
    let moved = |series: &str| {
        let series = series.replace("MODEL", r#"model="SmolLM2-135M-Instruct.Q4_1""#);
        sample(&after, &series) - sample_before(&before, &series)
    };
    assert_eq!(
        moved(r#"realm_requests_total{api="completions",MODEL}"#),
        1.0
    );
    assert_eq!(
        moved(r#"realm_request_errors_total{api="completions",MODEL}"#),
        0.0
    );
    assert_eq!(moved("realm_prompt_tokens_total{MODEL}"), prompt);
    assert_eq!(moved("realm_generated_tokens_total{MODEL}"), generated);
    assert_eq!(moved("realm_time_to_first_token_seconds_count{MODEL}"), 1.0);
    assert_eq!(
        moved("realm_inter_token_seconds_count{MODEL}"),
        generated - 1.0
    );
    assert!(moved("realm_time_to_first_token_seconds_sum{MODEL}") > 0.0);
    assert_eq!(
        sample(
            &after,
            r#"realm_active_sessions{model="SmolLM2-135M-Instruct.Q4_1"}"#
        ),
        0.0
    );
    // One step per generated token (the prefill yields the first), through each worker.
    for w in &cluster.workers {
        let series = format!(
            r#"realm_worker_forward_seconds_count{{worker="http://{}",MODEL}}"#,
            w.addr("listening")
        );
        assert_eq!(moved(&series), generated, "{series}\n{after}");
    }

    for (i, (w, before)) in cluster.workers.iter().zip(&workers_before).enumerate() {
        let after = worker_metrics(w);
        let moved = |series: &str| sample(&after, series) - sample_before(before, series);
        assert_eq!(moved("realm_worker_forwards_total"), generated, "{after}");
        assert_eq!(
            moved("realm_worker_forward_compute_seconds_count"),
            generated
        );
        // The prompt in one step, then one token per step.
        assert_eq!(
            moved("realm_worker_forward_tokens_total"),
            prompt + generated - 1.0
        );
        assert_eq!(sample(&after, "realm_worker_active_sessions"), 0.0);
        assert_eq!(sample(&after, "realm_worker_kv_cache_bytes"), 0.0);
        let layers = sample(&after, "realm_worker_shard_layers");
        assert!(layers >= 1.0, "{after}");
        // Every step touches every layer of the shard once, and each access is counted once.
        let accesses = layer_accesses(&moved);
        assert_eq!(accesses, generated * layers, "{after}");
        let budget = sample(&after, "realm_worker_layer_budget_bytes");
        let resident = sample(&after, "realm_worker_layer_resident_bytes");
        if i == 0 {
            // No budget: the whole shard stays resident and every access is a hit.
            assert_eq!(moved("realm_worker_layer_hits_total"), accesses, "{after}");
            assert_eq!(moved("realm_worker_layer_evictions_total"), 0.0, "{after}");
            assert_eq!(resident, budget, "{after}");
        } else {
            // 12 MiB holds a few of the 15 layers: the rest stream through, evicting.
            assert_eq!(budget, (12 << 20) as f64, "{after}");
            assert!(moved("realm_worker_layer_evictions_total") > 0.0, "{after}");
            assert!(resident > 0.0 && resident <= budget, "{after}");
        }
    }
}

#[test]
fn a_request_id_is_in_every_process_log() {
    let cluster = TestCluster::start();
    let id = "trace-me-0123";
    let reply = curl(
        &format!("{}/v1/chat/completions", cluster.http()),
        Some(r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":3,"stream":true}"#),
        &[&format!("X-Request-Id: {id}")],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.headers.contains(&format!("x-request-id: {id}")),
        "{}",
        reply.headers
    );
    assert!(
        reply.body.trim_end().ends_with("data: [DONE]"),
        "{}",
        reply.body
    );

    let about = |p: &Process, message: &str| {
        p.log_lines().into_iter().any(|l| {
            l["fields"]["message"] == message
                && l["spans"]
                    .as_array()
                    .is_some_and(|spans| spans.iter().any(|s| s["request_id"] == id))
        })
    };
    assert!(
        about(&cluster.coordinator, "generation started"),
        "{}",
        std::fs::read_to_string(&cluster.coordinator.log).unwrap()
    );
    for w in &cluster.workers {
        // The session ends after the reply: wait for the worker to log it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !about(w, "end session") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(
            about(w, "session started"),
            "{}",
            std::fs::read_to_string(&w.log).unwrap()
        );
        assert!(
            about(w, "end session"),
            "{}",
            std::fs::read_to_string(&w.log).unwrap()
        );
    }
    // Every worker log line about the session carries the id.
    for w in &cluster.workers {
        let session_lines: Vec<Value> = w
            .log_lines()
            .into_iter()
            .filter(|l| l["fields"]["session"].is_string())
            .collect();
        assert!(!session_lines.is_empty());
        for l in session_lines {
            assert_eq!(l["span"]["request_id"], id, "{l}");
        }
    }
}
