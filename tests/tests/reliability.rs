//! Reliability and security as a user meets them, with real `realm-worker` and
//! `realm-coordinator` processes on loopback: secrets required and never logged, bad requests
//! refused with precise statuses, bounded admission and KV memory, and generations that survive
//! a worker killed with SIGKILL in the middle of their stream.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use realm_common::auth::{Bearer, Secret};
use realm_proto::pb;
use realm_proto::pb::realm_client::RealmClient;
use realm_proto::pb::worker_client::WorkerClient;
use realm_tests::http::curl;
use realm_tests::process::{serve_args, start, start_with, Process};
use realm_tests::*;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const TOKEN: &str = "cluster-secret-3b9f0e";
const KEY: &str = "api-key-77c1d4";
const PROMPT: &str = "Once upon a time, in a small village,";
/// Long enough to kill a worker in the middle, short enough for CI.
const TOKENS: u32 = 32;
/// Tokens received before the kill.
const KILL_AFTER: usize = 8;

type Client = RealmClient<InterceptedService<Channel, Bearer>>;

fn smollm2() -> PathBuf {
    model_path(SMOLLM2)
}

fn start_worker(model: &Path, env: &[(&str, &str)], extra: &[&str]) -> Process {
    start_worker_at(model, "127.0.0.1:0", env, extra)
}

fn start_worker_at(model: &Path, listen: &str, env: &[(&str, &str)], extra: &[&str]) -> Process {
    let mut args = vec!["--listen", listen, "--model", model.to_str().unwrap()];
    args.extend_from_slice(&["--threads", "1", "--idle-timeout-secs", "60"]);
    args.extend_from_slice(extra);
    start("realm-worker", &args, env)
}

fn start_coordinator(
    model: &Path,
    workers: &[&Process],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Process {
    let args = serve_args(model, workers, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start("realm-coordinator", &args, env)
}

async fn client(p: &Process, key: Option<&str>) -> Client {
    let channel = Channel::from_shared(p.url())
        .unwrap()
        .connect()
        .await
        .expect("connect to the coordinator");
    let key = key.map(|k| Secret::new(k).unwrap());
    RealmClient::with_interceptor(channel, Bearer::new(key.as_ref()))
}

async fn worker_client(
    p: &Process,
    token: Option<&str>,
) -> WorkerClient<InterceptedService<Channel, Bearer>> {
    let channel = Channel::from_shared(p.url())
        .unwrap()
        .connect()
        .await
        .expect("connect to the worker");
    let token = token.map(|k| Secret::new(k).unwrap());
    WorkerClient::with_interceptor(channel, Bearer::new(token.as_ref()))
}

fn greedy(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.to_string(),
        max_tokens,
        ..Default::default()
    }
}

/// The token ids of a whole generation, or the status that ended its stream.
async fn generate(c: &mut Client, req: pb::GenerateRequest) -> Result<Vec<u32>, tonic::Status> {
    generate_then(c, req, 0, || {}).await
}

/// As [`generate`], calling `then` once after `after` tokens arrived.
async fn generate_then(
    c: &mut Client,
    req: pb::GenerateRequest,
    after: usize,
    mut then: impl FnMut(),
) -> Result<Vec<u32>, tonic::Status> {
    let mut stream = c.generate(req).await?.into_inner();
    let mut ids = Vec::new();
    let mut called = false;
    let mut finished = false;
    while let Some(msg) = stream.message().await? {
        assert!(!finished, "no message after the finish");
        ids.extend(msg.token_ids);
        finished = msg.finish.is_some();
        if !called && after > 0 && ids.len() >= after {
            called = true;
            then();
        }
    }
    assert!(finished, "the stream ended without a finish message");
    Ok(ids)
}

async fn plan(c: &mut Client) -> Vec<String> {
    c.list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
        .into_iter()
        .map(|w| format!("{} {}", w.url, w.layers))
        .collect()
}

/// A temporary file for a process's stderr, and its contents later.
fn log_file(dir: &tempfile::TempDir, name: &str) -> (PathBuf, Stdio) {
    let path = dir.path().join(name);
    let file = File::create(&path).unwrap();
    (path, Stdio::from(file))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_the_client_api_require_their_secrets_and_never_log_them() {
    let model = smollm2();
    let logs = tempfile::tempdir().unwrap();
    // The most verbose logs: every line a request, a hop or a handshake writes.
    let debug = [("REALM_CLUSTER_TOKEN", TOKEN), ("REALM_LOG", "trace")];
    let (worker_log, stderr) = log_file(&logs, "worker.log");
    let m = model.to_str().unwrap();
    let worker = start_with(
        "realm-worker",
        &["--listen", "127.0.0.1:0", "--model", m, "--threads", "1"],
        &debug,
        stderr,
    );

    // Worker RPCs need the token; health stays open for probes.
    let none = worker_client(&worker, None)
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    assert!(none.message().contains("missing cluster token"), "{none:?}");
    let wrong = worker_client(&worker, Some("not-the-token"))
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    assert!(wrong.message().contains("wrong cluster token"), "{wrong:?}");
    assert!(worker_client(&worker, Some(TOKEN))
        .await
        .info(pb::InfoRequest {})
        .await
        .is_ok());
    let channel = Channel::from_shared(worker.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert!(HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .is_ok());

    // A coordinator without the token is refused at the handshake, and says what to do.
    let args = serve_args(&model, &[&worker], &[]);
    let out = Command::new(binary("realm-coordinator"))
        .args(&args)
        .env_remove("REALM_CLUSTER_TOKEN")
        .env_remove("REALM_API_KEY")
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("REALM_CLUSTER_TOKEN") && err.contains(&worker.addr),
        "{err}"
    );

    // With the token it serves; its own API wants a key.
    let (coordinator_log, stderr) = log_file(&logs, "coordinator.log");
    let args = serve_args(&model, &[&worker], &["--http-listen", "127.0.0.1:0"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let coordinator = start_with(
        "realm-coordinator",
        &args,
        &[
            ("REALM_CLUSTER_TOKEN", TOKEN),
            ("REALM_API_KEY", KEY),
            ("REALM_LOG", "trace"),
        ],
        stderr,
    );
    // The HTTP API wants the key on /v1/*; its health and metrics stay open for probes and
    // scrapers.
    let http = coordinator.served("HTTP");
    let completion = r#"{"prompt": "Hello", "max_tokens": 2}"#;
    for (path, body) in [
        ("/v1/completions", Some(completion)),
        (
            "/v1/chat/completions",
            Some(r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}"#),
        ),
        ("/v1/models", None),
    ] {
        for key in [None, Some("wrong-key")] {
            assert_eq!(
                http_status(http, path, key, body),
                401,
                "{path} with key {key:?}"
            );
        }
        assert_eq!(http_status(http, path, Some(KEY), body), 200, "{path}");
    }
    for open in ["/health", "/metrics"] {
        assert_eq!(http_status(http, open, None, None), 200, "{open}");
    }
    for key in [None, Some("wrong-key")] {
        let status = generate(&mut client(&coordinator, key).await, greedy(PROMPT, 2))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{key:?}: {status:?}");
        assert!(status.message().contains("API key"), "{status:?}");
    }
    let mut c = client(&coordinator, Some(KEY)).await;
    assert_eq!(generate(&mut c, greedy(PROMPT, 2)).await.unwrap().len(), 2);

    // The `realm` client sends its key from the environment.
    let out = Command::new(binary("realm"))
        .args([
            "--coordinator",
            &coordinator.url(),
            "generate",
            "--prompt",
            PROMPT,
        ])
        .args(["--max-tokens", "2"])
        .env("REALM_API_KEY", KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    drop(coordinator);
    drop(worker);
    for log in [worker_log, coordinator_log] {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.is_empty(), "{} logged nothing", log.display());
        assert!(
            !text.contains(TOKEN) && !text.contains(KEY),
            "a secret leaked into {}:\n{text}",
            log.display()
        );
    }
}

/// The HTTP status of a request to `path` on `addr`, with `key` as its bearer token, POSTing
/// `body` as JSON if given.
fn http_status(addr: &str, path: &str, key: Option<&str>, body: Option<&str>) -> u16 {
    let auth = key.map(|k| format!("Authorization: Bearer {k}"));
    let headers: Vec<&str> = auth.iter().map(String::as_str).collect();
    curl(&format!("http://{addr}{path}"), body, &headers).status
}

#[test]
fn servers_refuse_to_listen_beyond_loopback_without_a_secret() {
    let model = smollm2();
    // The check comes before binding, so nothing listens on the open address even briefly.
    let worker = Command::new(binary("realm-worker"))
        .args(["--listen", "0.0.0.0:0", "--model", model.to_str().unwrap()])
        .env_remove("REALM_CLUSTER_TOKEN")
        .output()
        .unwrap();
    assert!(!worker.status.success());
    let err = String::from_utf8_lossy(&worker.stderr);
    assert!(
        err.contains("REALM_CLUSTER_TOKEN") && err.contains("--insecure"),
        "{err}"
    );

    let coordinator = Command::new(binary("realm-coordinator"))
        .args(["serve", "--listen", "0.0.0.0:0", "--worker", "127.0.0.1:1"])
        .env_remove("REALM_API_KEY")
        .output()
        .unwrap();
    assert!(!coordinator.status.success());
    let err = String::from_utf8_lossy(&coordinator.stderr);
    assert!(
        err.contains("API key") && err.contains("--insecure"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_requests_get_precise_statuses_and_the_server_keeps_serving() {
    let model = smollm2();
    let worker = start_worker(&model, &[], &[]);
    let coordinator = start_coordinator(&model, &[&worker], &[], &[]);
    let mut c = client(&coordinator, None).await;
    let context = c
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models[0]
        .context_length;
    let cases: Vec<(&str, pb::GenerateRequest, Code, &str)> = vec![
        (
            "empty prompt",
            greedy("", 4),
            Code::InvalidArgument,
            "empty",
        ),
        (
            "prompt longer than the context",
            greedy(&"hello ".repeat(context as usize + 10), 4),
            Code::InvalidArgument,
            "context window",
        ),
        (
            "absurd max_tokens",
            greedy(PROMPT, u32::MAX),
            Code::InvalidArgument,
            "max_tokens",
        ),
        (
            "negative temperature",
            pb::GenerateRequest {
                temperature: -1.0,
                ..greedy(PROMPT, 4)
            },
            Code::InvalidArgument,
            "temperature",
        ),
        (
            "top_p out of range",
            pb::GenerateRequest {
                top_p: Some(1.5),
                ..greedy(PROMPT, 4)
            },
            Code::InvalidArgument,
            "top_p",
        ),
        (
            "unknown model",
            pb::GenerateRequest {
                model: "no-such-model".into(),
                ..greedy(PROMPT, 4)
            },
            Code::NotFound,
            "no-such-model",
        ),
    ];
    for (case, request, code, says) in cases {
        let status = c.generate(request).await.expect_err(case);
        assert_eq!(status.code(), code, "{case}: {status:?}");
        assert!(status.message().contains(says), "{case}: {status:?}");
    }
    // max_tokens 0 is the documented default, not an error.
    assert!(!generate(&mut c, greedy(PROMPT, 0))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_worker_messages_are_refused() {
    let model = smollm2();
    let worker = start_worker(&model, &[], &[]);
    let mut w = worker_client(&worker, None).await;
    let request = pb::ForwardRequest {
        hidden: Some(pb::Tensor {
            shape: vec![1],
            dtype: pb::DataType::F32 as i32,
            data: vec![0; 65 << 20],
        }),
        layers: Some(pb::LayerRange { start: 0, end: 1 }),
        sessions: vec![pb::SessionRows {
            session_id: "big".into(),
            rows: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    let status = w.forward(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(
        status.message().contains("message length too large"),
        "{status:?}"
    );
    assert!(
        w.info(pb::InfoRequest {}).await.is_ok(),
        "the worker goes on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_and_kv_memory_are_bounded() {
    let model = smollm2();
    let worker = start_worker(&model, &[], &[]);
    let coordinator = start_coordinator(
        &model,
        &[&worker],
        &["--max-active", "1", "--max-queued", "0"],
        &[],
    );
    let mut c = client(&coordinator, None).await;
    let mut long = c.generate(greedy(PROMPT, 200)).await.unwrap().into_inner();
    long.message().await.unwrap().expect("a first token");
    let busy = generate(&mut client(&coordinator, None).await, greedy(PROMPT, 2))
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::ResourceExhausted, "{busy:?}");
    assert!(busy.message().contains("server busy"), "{busy:?}");
    // The slot comes back once the running generation's client goes away.
    drop(long);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match generate(&mut c, greedy(PROMPT, 2)).await {
            Ok(ids) => break assert_eq!(ids.len(), 2),
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    }

    // A worker's KV bound: about five tokens of SmolLM2's 30 layers fit in 128 KiB.
    let small = start_worker(&model, &[], &["--max-kv-memory", "128KiB"]);
    let coordinator = start_coordinator(&model, &[&small], &[], &[]);
    let mut c = client(&coordinator, None).await;
    let full = generate(&mut c, greedy(PROMPT, 4)).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(
        full.message().contains("KV cache memory is full"),
        "{full:?}"
    );
    assert_eq!(generate(&mut c, greedy("Hi", 1)).await.unwrap().len(), 1);
}

/// Kills `workers[victim]` after [`KILL_AFTER`] tokens of a greedy stream and checks the stream
/// completes with the tokens of an undisturbed run; returns the plan afterwards.
async fn survive_a_kill(
    mut workers: Vec<Process>,
    standby: Option<&Process>,
    victim: usize,
) -> Vec<String> {
    let model = smollm2();
    let refs: Vec<&Process> = workers.iter().collect();
    let extra: Vec<String> = standby
        .map(|s| vec!["--standby".to_string(), s.url()])
        .unwrap_or_default();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let logs = tempfile::tempdir().unwrap();
    let (log, stderr) = log_file(&logs, "coordinator.log");
    let args = serve_args(&model, &refs, &extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let coordinator = start_with("realm-coordinator", &args, &[], stderr);
    let mut c = client(&coordinator, None).await;
    let undisturbed = generate(&mut c, greedy(PROMPT, TOKENS)).await.unwrap();
    assert_eq!(undisturbed.len(), TOKENS as usize);

    let victim_pid = workers[victim].child.id();
    let got = generate_then(&mut c, greedy(PROMPT, TOKENS), KILL_AFTER, || {
        // SIGKILL: no goodbye, the process is gone mid-step.
        signal(victim_pid, "-KILL")
    })
    .await
    .expect("the stream survives the dead worker");
    assert_eq!(got, undisturbed, "greedy tokens after a worker died");
    // The worker died while the stream was running, not after it.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("step failed") && logged.contains("re-planned"),
        "{logged}"
    );
    workers[victim].kill();
    // Later requests run on the new plan.
    assert_eq!(
        generate(&mut c, greedy(PROMPT, 4)).await.unwrap(),
        undisturbed[..4]
    );
    plan(&mut c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_is_replaced_by_the_standby() {
    let model = smollm2();
    let workers: Vec<Process> = (0..3).map(|_| start_worker(&model, &[], &[])).collect();
    let standby = start_worker(&model, &[], &[]);
    let victim = workers[1].addr.clone();
    let plan = survive_a_kill(workers, Some(&standby), 1).await;
    assert_eq!(plan.len(), 3, "{plan:?}");
    assert_eq!(plan[1], format!("{} 10-19", standby.url()), "{plan:?}");
    assert!(!plan.iter().any(|p| p.contains(&victim)), "{plan:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_has_its_layers_spread_over_the_others() {
    let model = smollm2();
    let workers: Vec<Process> = (0..3).map(|_| start_worker(&model, &[], &[])).collect();
    let victim = workers[2].addr.clone();
    let plan = survive_a_kill(workers, None, 2).await;
    assert_eq!(plan.len(), 2, "{plan:?}");
    assert!(!plan.iter().any(|p| p.contains(&victim)), "{plan:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_capacity_streams_end_unavailable_and_a_restarted_worker_rejoins() {
    let model = smollm2();
    let mut worker = start_worker(&model, &[], &[]);
    let addr = worker.addr.clone();
    let coordinator = start_coordinator(&model, &[&worker], &[], &[]);
    let mut c = client(&coordinator, None).await;
    let undisturbed = generate(&mut c, greedy(PROMPT, TOKENS)).await.unwrap();

    let pid = worker.child.id();
    let status = generate_then(&mut c, greedy(PROMPT, TOKENS), KILL_AFTER, || {
        signal(pid, "-KILL")
    })
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("no capacity"), "{status:?}");
    assert!(status.message().contains(&addr), "{status:?}");
    worker.kill();
    let status = generate(&mut c, greedy(PROMPT, 2)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // The worker comes back on its address: the next request finds it and runs as before.
    let _back = start_worker_at(&model, &addr, &[], &[]);
    assert_eq!(
        generate(&mut c, greedy(PROMPT, TOKENS)).await.unwrap(),
        undisturbed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_streams_in_flight() {
    let model = smollm2();
    let worker = start_worker(&model, &[], &[]);
    let mut coordinator = start_coordinator(&model, &[&worker], &[], &[]);
    let mut c = client(&coordinator, None).await;
    let undisturbed = generate(&mut c, greedy(PROMPT, TOKENS)).await.unwrap();
    let pid = coordinator.child.id();
    let got = generate_then(&mut c, greedy(PROMPT, TOKENS), 2, || signal(pid, "-TERM"))
        .await
        .expect("the stream in flight completes");
    assert_eq!(got, undisturbed);
    // Then the coordinator exits by itself, successfully.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = coordinator.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the coordinator did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

/// How a client reads one greedy stream: the text it prints, chunk by chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    /// `realm.v1.Realm/Generate`: the `text` of each message.
    Grpc,
    /// `POST /v1/completions` with `"stream": true`: the `text` of each SSE chunk.
    Sse,
}

/// When a worker is killed during a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillAt {
    /// This long after the request was sent: for a short prompt (0), before or about its first
    /// token; for a long prompt, during its prefill, which the test checks.
    Sent(Duration),
    /// Right after the first chunk of text arrived.
    FirstToken,
    /// After this many chunks.
    Chunks(usize),
}

/// The text of a greedy stream of `prompt` through `api`, calling `then` once when `at` comes.
async fn stream_text(
    api: Api,
    coordinator: &Process,
    prompt: &str,
    max_tokens: u32,
    at: Option<KillAt>,
    then: impl FnOnce() + Send + 'static,
) -> (String, Duration) {
    let fire = Trigger::new(then);
    let chunks_before = match at {
        Some(KillAt::Sent(_)) | None => usize::MAX,
        Some(KillAt::FirstToken) => 1,
        Some(KillAt::Chunks(n)) => n,
    };
    let kill_after_send = match at {
        Some(KillAt::Sent(delay)) => Some(delay),
        _ => None,
    };
    match api {
        Api::Grpc => {
            let mut c = client(coordinator, None).await;
            let request = greedy(prompt, max_tokens);
            let sent = Instant::now();
            let mut first = None;
            let mut stream = c.generate(request).await.expect("generate").into_inner();
            let _killer = kill_after_send.map(|delay| {
                let fire = fire.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    fire.pull();
                })
            });
            let (mut text, mut chunks, mut finished) = (String::new(), 0, false);
            while let Some(msg) = stream.message().await.expect("the stream goes on") {
                assert!(!finished, "no message after the finish");
                text.push_str(&msg.text);
                first.get_or_insert_with(|| sent.elapsed());
                chunks += 1;
                finished = msg.finish.is_some();
                if chunks == chunks_before {
                    fire.pull();
                }
            }
            assert!(finished, "the stream ended without a finish message");
            (text, first.unwrap_or_default())
        }
        Api::Sse => {
            let url = format!("http://{}/v1/completions", coordinator.served("HTTP"));
            let body = serde_json::json!({
                "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true,
            })
            .to_string();
            tokio::task::spawn_blocking(move || {
                let mut curl = Command::new("curl")
                    .args([
                        "-sSN",
                        "--max-time",
                        "120",
                        "-H",
                        "Content-Type: application/json",
                    ])
                    .args(["-d", &body, &url])
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("run curl");
                let sent = Instant::now();
                let lines = std::io::BufRead::lines(std::io::BufReader::new(
                    curl.stdout.take().expect("curl's stdout"),
                ));
                let (mut text, mut chunks, mut done) = (String::new(), 0, false);
                let mut first = None;
                if let Some(delay) = kill_after_send {
                    std::thread::sleep(delay.saturating_sub(sent.elapsed()));
                    fire.pull();
                }
                for line in lines {
                    let line = line.expect("read the event stream");
                    let Some(data) = line.strip_prefix("data: ") else {
                        continue;
                    };
                    assert!(!done, "no event after [DONE]");
                    if data == "[DONE]" {
                        done = true;
                        continue;
                    }
                    let event: serde_json::Value = serde_json::from_str(data).expect("JSON event");
                    assert!(event.get("error").is_none(), "the stream failed: {event}");
                    let piece = event["choices"][0]["text"].as_str().unwrap_or_default();
                    text.push_str(piece);
                    first.get_or_insert_with(|| sent.elapsed());
                    chunks += 1;
                    if chunks == chunks_before {
                        fire.pull();
                    }
                }
                assert!(curl.wait().expect("curl").success());
                assert!(done, "the event stream ended without [DONE]");
                (text, first.unwrap_or_default())
            })
            .await
            .expect("the SSE reader")
        }
    }
}

/// Something done once, by whichever of its holders comes first.
#[derive(Clone)]
struct Trigger(Arc<std::sync::Mutex<Option<Action>>>);

type Action = Box<dyn FnOnce() + Send>;

impl Trigger {
    fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(Box::new(f)))))
    }

    fn pull(&self) {
        let f = self.0.lock().unwrap().take();
        if let Some(f) = f {
            f()
        }
    }
}

/// How long after a long prompt's request a worker is killed: well inside its prefill.
const PREFILL_KILL_DELAY: Duration = Duration::from_millis(300);

/// A prompt of about 1,400 tokens.
fn long_prompt() -> String {
    let text = std::fs::read_to_string(repo_root().join("tests/fixtures/ppl.txt")).unwrap();
    format!("{text}\n{text}\nIn short,")
}

/// Sends SIGKILL (or any `signal`) to `pid`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Three workers and a standby under a coordinator that also serves HTTP. A worker killed at
/// any point of a stream — during a long prompt's prefill, right after the first token, mid-stream
/// — leaves each API's client with exactly the text of an undisturbed run: nothing lost, nothing
/// twice. After each kill a worker comes back on the dead one's address, a spare for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_read_the_undisturbed_text_whenever_a_worker_dies() {
    let model = smollm2();
    let mut workers: Vec<Process> = (0..4).map(|_| start_worker(&model, &[], &[])).collect();
    let refs: Vec<&Process> = workers[..3].iter().collect();
    let standby = workers[3].url();
    let logs = tempfile::tempdir().unwrap();
    let (log, stderr) = log_file(&logs, "coordinator.log");
    let args = serve_args(
        &model,
        &refs,
        &["--standby", &standby, "--http-listen", "127.0.0.1:0"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let coordinator = start_with("realm-coordinator", &args, &[], stderr);

    let long = long_prompt();
    let cases = [
        (PROMPT, 40, KillAt::Sent(Duration::ZERO)),
        (long.as_str(), 16, KillAt::Sent(PREFILL_KILL_DELAY)),
        (PROMPT, 40, KillAt::FirstToken),
        (PROMPT, 40, KillAt::Chunks(20)),
    ];
    let mut undisturbed = std::collections::HashMap::new();
    for (prompt, tokens, at) in &cases {
        let (grpc, first) =
            stream_text(Api::Grpc, &coordinator, prompt, *tokens, None, || {}).await;
        let (sse, _) = stream_text(Api::Sse, &coordinator, prompt, *tokens, None, || {}).await;
        assert_eq!(grpc, sse, "the two APIs print the same text");
        assert!(!grpc.is_empty());
        if *at == KillAt::Sent(PREFILL_KILL_DELAY) {
            // What makes the kill land in the prefill.
            assert!(
                first > 2 * PREFILL_KILL_DELAY,
                "the long prompt's first token came after {first:?}"
            );
        }
        undisturbed.insert(prompt.to_string(), grpc);
    }

    let mut failovers = 0;
    for api in [Api::Grpc, Api::Sse] {
        for (prompt, tokens, at) in &cases {
            // The worker serving the middle layers now.
            let mut c = client(&coordinator, None).await;
            let middle = plan(&mut c).await[1].clone();
            let victim = workers
                .iter()
                .position(|w| middle.starts_with(&w.url()))
                .unwrap_or_else(|| panic!("{middle} is one of ours"));
            let (pid, addr) = (workers[victim].child.id(), workers[victim].addr.clone());
            let (text, _) = stream_text(api, &coordinator, prompt, *tokens, Some(*at), move || {
                signal(pid, "-KILL")
            })
            .await;
            assert_eq!(
                text, undisturbed[*prompt],
                "{api:?}, killed at {at:?}: the text a client reads"
            );
            failovers += 1;
            let logged = std::fs::read_to_string(&log).unwrap();
            assert_eq!(
                logged.matches("layers re-planned").count(),
                failovers,
                "{api:?} {at:?}: the kill hit the stream\n{logged}"
            );
            // The dead worker comes back: a spare for the next kill.
            workers[victim].kill();
            workers[victim] = start_worker_at(&model, &addr, &[], &[]);
        }
    }
}

/// A worker stopped mid-stream (SIGSTOP: its socket stays open and nothing replies) is caught —
/// by missed health checks, or, with them off, by the step deadline — and the stream goes on on
/// the standby with the text of an undisturbed run, within `bound`.
async fn survive_a_hung_worker(extra: &[&str], bound: Duration) {
    let model = smollm2();
    let workers: Vec<Process> = (0..3).map(|_| start_worker(&model, &[], &[])).collect();
    let standby = start_worker(&model, &[], &[]);
    let refs: Vec<&Process> = workers.iter().collect();
    let mut args = vec!["--standby", standby.addr.as_str()];
    args.extend_from_slice(extra);
    let coordinator = start_coordinator(&model, &refs, &args, &[]);
    let (undisturbed, _) = stream_text(Api::Grpc, &coordinator, PROMPT, TOKENS, None, || {}).await;

    let pid = workers[1].child.id();
    let stopped = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let at = Arc::clone(&stopped);
    let streamed = tokio::time::timeout(
        bound + Duration::from_secs(30),
        stream_text(
            Api::Grpc,
            &coordinator,
            PROMPT,
            TOKENS,
            Some(KillAt::Chunks(KILL_AFTER)),
            move || {
                signal(pid, "-STOP");
                *at.lock().unwrap() = Some(Instant::now());
            },
        ),
    )
    .await;
    // Let it go, so it can be killed and reaped.
    signal(pid, "-CONT");
    let (text, _) = streamed.expect("the stream does not hang on a stopped worker");
    let stalled = stopped.lock().unwrap().expect("stopped").elapsed();
    eprintln!("stream finished {stalled:?} after the worker stopped ({extra:?})");
    assert_eq!(text, undisturbed, "the text after a worker hung");
    assert!(
        stalled < bound,
        "{stalled:?} exceeds the stated bound {bound:?}"
    );
    let mut c = client(&coordinator, None).await;
    let now = plan(&mut c).await;
    assert_eq!(now[1], format!("{} 10-19", standby.url()), "{now:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_is_caught_by_its_health_checks() {
    // Three missed checks of 500 ms, then the standby loads its shard and the stream replays.
    survive_a_hung_worker(&["--health-interval-ms", "500"], Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_is_caught_by_the_step_deadline() {
    // The deadline, then the standby loads its shard and the stream replays.
    survive_a_hung_worker(
        &["--health-interval-ms", "0", "--step-timeout-secs", "2"],
        Duration::from_secs(10),
    )
    .await;
}

/// Eight streams running through a worker that is killed: all eight go on, each with the text it
/// reads undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_streams_survive_their_worker() {
    let model = smollm2();
    let workers: Vec<Process> = (0..3).map(|_| start_worker(&model, &[], &[])).collect();
    let standby = start_worker(&model, &[], &[]);
    let refs: Vec<&Process> = workers.iter().collect();
    let coordinator = start_coordinator(&model, &refs, &["--standby", &standby.addr], &[]);
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Story number {i}: once upon a time,"))
        .collect();
    let undisturbed = futures_util::future::join_all(
        prompts
            .iter()
            .map(|p| stream_text(Api::Grpc, &coordinator, p, TOKENS, None, || {})),
    )
    .await;

    let pid = workers[1].child.id();
    let streams = prompts.iter().enumerate().map(|(i, p)| {
        let at = (i == 0).then_some(KillAt::Chunks(KILL_AFTER));
        stream_text(Api::Grpc, &coordinator, p, TOKENS, at, move || {
            signal(pid, "-KILL")
        })
    });
    let disturbed = futures_util::future::join_all(streams).await;
    for ((prompt, (want, _)), (got, _)) in prompts.iter().zip(&undisturbed).zip(&disturbed) {
        assert_eq!(got, want, "{prompt}");
    }
    let mut c = client(&coordinator, None).await;
    let now = plan(&mut c).await;
    assert_eq!(now[1], format!("{} 10-19", standby.url()), "{now:?}");
}

/// The coordinator killed while workers run: its client gets a clear error, never a hang; a new
/// coordinator re-assigns the workers, which free the old sessions, and serves the same text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_takes_over_the_workers() {
    let model = smollm2();
    let workers: Vec<Process> = (0..2).map(|_| start_worker(&model, &[], &[])).collect();
    let refs: Vec<&Process> = workers.iter().collect();
    let mut first = start_coordinator(&model, &refs, &[], &[]);
    let (undisturbed, _) = stream_text(Api::Grpc, &first, PROMPT, TOKENS, None, || {}).await;

    let mut c = client(&first, None).await;
    let mut stream = c.generate(greedy(PROMPT, 200)).await.unwrap().into_inner();
    let mut chunks = 0;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
            Err(_) => panic!("the stream hangs after its coordinator died"),
            Ok(Ok(Some(_))) => {
                chunks += 1;
                if chunks == KILL_AFTER {
                    first.kill();
                }
            }
            Ok(Ok(None)) => panic!("the stream finished as if nothing happened"),
            Ok(Err(status)) => break status,
        }
    };
    assert!(chunks >= KILL_AFTER, "{ended:?}");
    assert!(
        matches!(
            ended.code(),
            Code::Unavailable | Code::Unknown | Code::Internal
        ),
        "{ended:?}"
    );
    let second = start_coordinator(&model, &refs, &[], &[]);
    for w in &workers {
        let mut client = worker_client(w, None).await;
        let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
        assert_eq!(
            info.active_sessions, 0,
            "re-assigned, the worker freed the old sessions"
        );
        assert_eq!(info.kv_cache_bytes, 0);
    }
    let (text, _) = stream_text(Api::Grpc, &second, PROMPT, TOKENS, None, || {}).await;
    assert_eq!(text, undisturbed);
}

/// A worker killed during a long prompt's prefill comes back on its address while the
/// coordinator replays the prompt over the workers left: the stream still reads the undisturbed
/// text, and the worker that came back serves the next failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_comes_back_during_a_replay() {
    let model = smollm2();
    let mut workers: Vec<Process> = (0..3).map(|_| start_worker(&model, &[], &[])).collect();
    let refs: Vec<&Process> = workers.iter().collect();
    let logs = tempfile::tempdir().unwrap();
    let (log, stderr) = log_file(&logs, "coordinator.log");
    let args = serve_args(&model, &refs, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let coordinator = start_with("realm-coordinator", &args, &[], stderr);
    let long = long_prompt();
    let (undisturbed, _) = stream_text(Api::Grpc, &coordinator, &long, 16, None, || {}).await;

    let (pid, addr) = (workers[1].child.id(), workers[1].addr.clone());
    let back = {
        let (model, addr) = (model.clone(), addr.clone());
        tokio::spawn(async move {
            // Once the replay over the two workers left is under way.
            tokio::time::sleep(PREFILL_KILL_DELAY * 3).await;
            tokio::task::spawn_blocking(move || start_worker_at(&model, &addr, &[], &[]))
                .await
                .unwrap()
        })
    };
    let (text, _) = stream_text(
        Api::Grpc,
        &coordinator,
        &long,
        16,
        Some(KillAt::Sent(PREFILL_KILL_DELAY)),
        move || signal(pid, "-KILL"),
    )
    .await;
    assert_eq!(
        text, undisturbed,
        "the text after a kill and a return mid-replay"
    );
    workers[1].kill();
    workers[1] = back.await.unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("layers re-planned"), "{logged}");

    // The worker that came back is a spare: the next worker lost hands it its layers.
    let mut c = client(&coordinator, None).await;
    let before = plan(&mut c).await;
    let victim = workers
        .iter()
        .position(|w| before.iter().any(|p| p.starts_with(&w.url())) && w.addr != addr)
        .expect("a worker of the plan");
    let pid = workers[victim].child.id();
    let (text, _) = stream_text(
        Api::Grpc,
        &coordinator,
        PROMPT,
        TOKENS,
        Some(KillAt::Chunks(KILL_AFTER)),
        move || signal(pid, "-KILL"),
    )
    .await;
    let (alone, _) = {
        let fresh = start_worker(&model, &[], &[]);
        let c2 = start_coordinator(&model, &[&fresh], &[], &[]);
        stream_text(Api::Grpc, &c2, PROMPT, TOKENS, None, || {}).await
    };
    assert_eq!(text, alone);
    let after = plan(&mut c).await;
    assert!(
        after
            .iter()
            .any(|p| p.starts_with(&format!("http://{addr}"))),
        "the worker that came back serves again: {after:?}"
    );
}
