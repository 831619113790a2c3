//! The distributed cluster as a user runs it: real `realm-worker` and `realm-coordinator`
//! processes on loopback, driven over gRPC, checked against the single-process model core.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use realm_common::generate::{generate, GenerationParams};
use realm_common::gguf::GgufFile;
use realm_common::model::Model;
use realm_common::tokenizer::Tokenizer;
use realm_proto::pb;
use realm_proto::pb::realm_client::RealmClient;
use realm_proto::pb::worker_client::WorkerClient;
use realm_tests::process::{self, Process};
use realm_tests::*;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

/// Starts `bin` with `args` and waits for its `<bin> listening on ADDR` line on stdout.
fn start(bin: &str, args: &[&str]) -> Process {
    process::start(bin, args, &[])
}

fn start_worker(model: &Path) -> Process {
    start(
        "realm-worker",
        &[
            "--listen",
            "127.0.0.1:0",
            "--model",
            model.to_str().unwrap(),
            "--threads",
            "1",
        ],
    )
}

fn start_coordinator(model: &Path, workers: &[Process]) -> Process {
    start_coordinator_with(model, workers, &[])
}

fn start_coordinator_with(model: &Path, workers: &[Process], extra: &[&str]) -> Process {
    let workers: Vec<&Process> = workers.iter().collect();
    let args = process::serve_args(model, &workers, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start("realm-coordinator", &args)
}

async fn client(p: &Process) -> RealmClient<Channel> {
    RealmClient::connect(format!("http://{}", p.addr))
        .await
        .expect("connect to coordinator")
}

async fn worker_client(p: &Process) -> WorkerClient<Channel> {
    WorkerClient::connect(format!("http://{}", p.addr))
        .await
        .expect("connect to worker")
}

/// Sessions live on all `workers` together.
async fn active_sessions(workers: &[Process]) -> u32 {
    let mut active = 0;
    for w in workers {
        let info = worker_client(w)
            .await
            .info(pb::InfoRequest {})
            .await
            .unwrap();
        active += info.into_inner().active_sessions;
    }
    active
}

fn greedy_request(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: prompt.to_string(),
        max_tokens,
        ..Default::default()
    }
}

/// Generated token ids and text of one streamed generation.
async fn stream_generate(
    c: &mut RealmClient<Channel>,
    req: pb::GenerateRequest,
) -> (Vec<u32>, String, pb::Finish) {
    let mut stream = c.generate(req).await.expect("generate").into_inner();
    let (mut ids, mut text, mut finish) = (Vec::new(), String::new(), None);
    while let Some(msg) = stream.message().await.expect("stream message") {
        assert!(finish.is_none(), "no message after the finish");
        ids.extend(msg.token_ids);
        text.push_str(&msg.text);
        finish = msg.finish;
    }
    (
        ids,
        text,
        finish.expect("the last message carries the finish"),
    )
}

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "The largest planet in the solar system is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
];
const STEPS: usize = 12;

/// Greedy ids of the single-process model core for each prompt.
fn single_process(model: &Path) -> Vec<Vec<u32>> {
    let file = GgufFile::open(model).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let m = Model::load(&file).unwrap();
    let params = GenerationParams {
        max_tokens: STEPS,
        ..GenerationParams::default()
    };
    PROMPTS
        .iter()
        .map(|p| {
            let ids = tokenizer.encode(p, true, true).unwrap();
            generate(&m, &tokenizer, ids, &params, |_| {})
                .unwrap()
                .tokens
        })
        .collect()
}

async fn cluster_equals_single_process(model_file: &str) {
    cluster_equals_single_process_at(&model_path(model_file), model_file).await
}

async fn cluster_equals_single_process_at(model: &Path, model_file: &str) {
    let model = model.to_path_buf();
    let want = single_process(&model);
    let workers: Vec<Process> = (0..3).map(|_| start_worker(&model)).collect();
    for k in 1..=3 {
        let coordinator = start_coordinator(&model, &workers[..k]);
        let mut c = client(&coordinator).await;
        for (prompt, want) in PROMPTS.iter().zip(&want) {
            let (got, text, _) =
                stream_generate(&mut c, greedy_request(prompt, STEPS as u32)).await;
            assert_eq!(
                &got, want,
                "{model_file} through {k} workers, prompt {prompt:?} gave {text:?}"
            );
        }
    }

    // A long prompt goes in chunks of at most 64 tokens, and of 16 rows a step in all while
    // another stream decodes beside it; the single-process model runs it in one pass. Every
    // chunk attends at the precision of the whole prompt: the same tokens.
    let long = long_prompt();
    let file = GgufFile::open(&model).unwrap();
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let ids = tokenizer.encode(&long, true, true).unwrap();
    assert!(ids.len() > 250, "{} tokens", ids.len());
    let m = Model::load(&file).unwrap();
    let params = GenerationParams {
        max_tokens: STEPS,
        ..GenerationParams::default()
    };
    let want_long = generate(&m, &tokenizer, ids, &params, |_| {})
        .unwrap()
        .tokens;
    drop(m);
    let chunked = ["--prefill-chunk", "64", "--step-tokens", "16"];
    let coordinator = start_coordinator_with(&model, &workers[..2], &chunked);
    let mut c = client(&coordinator).await;
    let mut beside = c.clone();
    let running = tokio::spawn(async move {
        stream_generate(&mut beside, greedy_request(PROMPTS[0], 40))
            .await
            .0
    });
    let (got, text, _) = stream_generate(&mut c, greedy_request(&long, STEPS as u32)).await;
    assert_eq!(
        got, want_long,
        "{model_file}: a chunked prompt gave {text:?}"
    );
    assert_eq!(running.await.unwrap()[..STEPS], want[0][..]);
}

/// About 300 tokens of plain prose.
fn long_prompt() -> String {
    let text = std::fs::read_to_string(repo_root().join("tests/fixtures/ppl.txt")).unwrap();
    let cut = text.char_indices().nth(1300).map_or(text.len(), |(i, _)| i);
    text[..cut].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_through_1_2_3_workers_equals_single_process() {
    cluster_equals_single_process(SMOLLM2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_through_1_2_3_workers_equals_single_process() {
    cluster_equals_single_process(GEMMA3).await;
}

/// Architectures with more parts than the project models: a mixture of experts (its router
/// and expert slices sharded like any block's tensors, each token routed the same way whatever
/// shares its step), Gemma 2's alternating windows and soft caps (the final one in the
/// coordinator's head).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_architectures_through_1_2_3_workers_equal_single_process() {
    use realm_common::synthetic::{self, SyntheticArch, SyntheticDType, SyntheticSpec};
    let dir = tempfile::tempdir().unwrap();
    for arch in [
        SyntheticArch::Mixtral,
        SyntheticArch::Gemma2,
        SyntheticArch::Phi3,
    ] {
        let name = format!("{}-q4_k_m.gguf", arch.name());
        let path = dir.path().join(&name);
        let spec = SyntheticSpec::fixture(arch, SyntheticDType::Q4KM);
        synthetic::write(&path, &spec).unwrap();
        cluster_equals_single_process_at(&path, &name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paris_concurrency_and_disconnect_through_two_workers() {
    let model = model_path(SMOLLM2);
    let workers: Vec<Process> = (0..2).map(|_| start_worker(&model)).collect();
    let coordinator = start_coordinator(&model, &workers);
    let mut c = client(&coordinator).await;

    // Paris, raw and as a chat.
    let (_, text, finish) =
        stream_generate(&mut c, greedy_request("The capital of France is", 8)).await;
    assert!(text.contains("Paris"), "{text:?}");
    let usage = finish.usage.expect("usage");
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.generated_tokens,
            finish.reason.as_str()
        ),
        (5, 8, "length")
    );
    let chat = pb::GenerateRequest {
        chat: true,
        ..greedy_request("What is the capital of France?", 32)
    };
    let (_, text, finish) = stream_generate(&mut c, chat).await;
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(finish.reason, "stop");

    // Eight concurrent streams, each equal to the same prompt run alone.
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("{} {}", PROMPTS[i % 4], i))
        .collect();
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(stream_generate(&mut c, greedy_request(p, 10)).await.0);
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = c.clone();
            let req = greedy_request(p, 10);
            tokio::spawn(async move { stream_generate(&mut c, req).await.0 })
        })
        .collect();
    for (task, want) in tasks.into_iter().zip(&alone) {
        assert_eq!(&task.await.unwrap(), want);
    }

    // A client that disconnects mid-stream frees its session on every worker, long before the
    // generation would have ended by itself (the model counts on for all 1000 tokens).
    let mut stream = c
        .generate(greedy_request("1, 2, 3, 4, 5, 6, 7, 8,", 1000))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("a first message");
    assert_eq!(
        active_sessions(&workers).await,
        2,
        "the session lives on both workers while streaming"
    );
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let active = active_sessions(&workers).await;
        if active == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{active} sessions still live after the client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_api_reports_and_refuses_clearly() {
    let model = model_path(SMOLLM2);
    let workers: Vec<Process> = (0..2).map(|_| start_worker(&model)).collect();
    let coordinator = start_coordinator(&model, &workers);
    let mut c = client(&coordinator).await;

    // The standard health service answers for the server and for the Realm service.
    let channel = Channel::from_shared(format!("http://{}", coordinator.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "realm.v1.Realm"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }

    // Server reflection lists the client service, so grpcurl works without the .proto files.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies
        .message()
        .await
        .unwrap()
        .expect("a reflection reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    assert!(
        list.service.iter().any(|s| s.name == "realm.v1.Realm"),
        "{list:?}"
    );

    let models = c
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert_eq!(
        (models[0].n_layers, models[0].plan.as_str()),
        (30, "0-14,15-29")
    );

    let ids = c
        .tokenize(pb::TokenizeRequest {
            text: "The capital of France is".into(),
            add_special: true,
            parse_special: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    assert_eq!(ids, reference_ids("smollm2", "t2"));

    // The coordinator shows each worker's state: layers, and the layer manager's counters
    // after a generation (every layer resident: every access a hit).
    stream_generate(&mut c, greedy_request("The capital of France is", 4)).await;
    let status = c
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let layers: Vec<&str> = status.iter().map(|w| w.layers.as_str()).collect();
    assert_eq!(layers, ["0-14", "15-29"]);
    for w in &status {
        assert!(w.reachable, "{w:?}");
        let m = w.layer_manager.as_ref().expect("layer manager counters");
        assert_eq!((m.misses, m.pinned_layers), (0, 15), "{m:?}");
        assert!(m.hits >= 15 * 4, "{m:?}");
    }

    let err = c.generate(greedy_request("", 8)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let unknown = pb::GenerateRequest {
        model: "no-such-model".into(),
        ..greedy_request("hi", 4)
    };
    let err = c.generate(unknown).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
}

#[test]
fn worker_with_another_model_is_refused_at_handshake() {
    let smollm2 = model_path(SMOLLM2);
    let gemma3 = model_path(GEMMA3);
    let worker = start_worker(&gemma3);
    let out = Command::new(binary("realm-coordinator"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            smollm2.to_str().unwrap(),
        ])
        .args(["--worker", &format!("http://{}", worker.addr)])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mismatch") && err.contains(&worker.addr),
        "{err}"
    );
}

/// The coordinator's library entry point, as a test or an embedding program runs it: a real
/// server in this process on port 0 over two in-process workers, serving the gRPC and HTTP APIs
/// until its shutdown future resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_serves_in_process_on_port_0() {
    use realm_coordinator::local::LocalWorkers;
    use realm_coordinator::server::{self, Listeners, ServerConfig};

    let model = model_path(SMOLLM2);
    let workers = LocalWorkers::start(&model, 2, 1).await.unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let config = ServerConfig::new(vec![model.clone()], workers.urls().to_vec());
    let (ready, planned) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(
        config,
        Listeners {
            grpc,
            http: Some(http),
        },
        move |models: &realm_coordinator::Models| {
            let _ = ready.send(models.get("").unwrap().cluster.plan().to_string());
        },
        async move {
            let _ = stopped.await;
        },
    ));
    assert_eq!(planned.await.unwrap(), "0-14,15-29");

    let mut c = RealmClient::connect(format!("http://{grpc_addr}"))
        .await
        .unwrap();
    let (_, text, finish) =
        stream_generate(&mut c, greedy_request("The capital of France is", 8)).await;
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(finish.reason, "length");
    // The HTTP API is up beside it.
    let mut socket = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    socket
        .write_all(b"GET /health HTTP/1.1\r\nhost: realm\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    socket.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    // Without a cluster token, the admin API refuses every call, whatever it is sent.
    let mut admin =
        realm_proto::pb::admin_client::AdminClient::connect(format!("http://{grpc_addr}"))
            .await
            .unwrap();
    let refused = admin
        .remove_model(pb::RemoveModelRequest {
            model: "SmolLM2-135M-Instruct.Q4_1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("cluster token"), "{refused:?}");

    drop(c);
    stop.send(()).unwrap();
    server.await.unwrap().expect("the server stops cleanly");
    workers.stop().await.unwrap();
}
