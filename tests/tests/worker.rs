//! The worker over real gRPC, in-process on port 0 and as the `realm-worker` process: handshake,
//! shard assignment, forward steps equal to the in-process model bit for bit, the session
//! lifecycle, idle expiry, and the refusal of malformed requests with precise status codes.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use candle_core::{Device, Tensor};
use realm_common::gguf::GgufFile;
use realm_common::kv::SessionKv;
use realm_common::model::{Embedding, LayerRange, ModelConfig, Shard};
use realm_common::wire::{Activations, ModelIdentity, WireDType};
use realm_proto::pb;
use realm_proto::pb::worker_client::WorkerClient;
use realm_proto::PROTOCOL_VERSION;
use realm_tests::*;
use tokio::io::AsyncBufReadExt;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Token ids fed to SmolLM2 (any ids inside its vocabulary do).
const TOKENS: [u32; 6] = [1, 504, 3458, 314, 4649, 8212];
const OTHER_TOKENS: [u32; 4] = [2, 9690, 198, 30];
const LONG: Duration = Duration::from_secs(300);

/// SmolLM2 in this process: the oracle the worker must equal.
struct Reference {
    file: GgufFile,
    config: ModelConfig,
    embedding: Embedding,
    /// Every block, 0..n_layers.
    shard: Shard,
}

fn smollm2() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let file = GgufFile::open(model_path(SMOLLM2)).expect("open model");
        let config = ModelConfig::from_gguf(&file).expect("config");
        let all = LayerRange::new(0, config.n_layers).expect("range");
        Reference {
            embedding: Embedding::load(&file, &config).expect("embedding"),
            shard: Shard::load(&file, &config, all).expect("blocks"),
            file,
            config,
        }
    })
}

impl Reference {
    fn identity(&self) -> pb::ModelIdentity {
        pb::ModelIdentity::from(&ModelIdentity::of(&self.file, &self.config))
    }

    fn embed(&self, tokens: &[u32]) -> Tensor {
        self.embedding.forward(tokens).expect("embed")
    }

    /// Runs `steps` of one session through `shard`; the hidden state after each step.
    fn run(&self, shard: &Shard, steps: &[&[u32]]) -> Vec<Vec<Vec<f32>>> {
        let mut kv = SessionKv::new(shard.range().len());
        steps
            .iter()
            .map(|tokens| {
                let position = kv.len();
                let out = shard
                    .forward(&self.embed(tokens), position, &mut kv)
                    .expect("forward");
                out.to_vec2::<f32>().expect("to vec")
            })
            .collect()
    }
}

fn layers(start: u32, end: u32) -> Option<pb::LayerRange> {
    Some(pb::LayerRange { start, end })
}

fn wire(hidden: &Tensor) -> pb::Tensor {
    Activations::to_wire(hidden, WireDType::F32).expect("to wire")
}

/// The rows of one session in a step.
fn rows(session: &str, position: u64, rows: u32) -> pb::SessionRows {
    pb::SessionRows {
        session_id: session.to_string(),
        position,
        rows,
        ..Default::default()
    }
}

/// A step of the sessions `sessions` over `hidden` (their rows, in order).
fn batch(
    sessions: Vec<pb::SessionRows>,
    hidden: pb::Tensor,
    range: (u32, u32),
) -> pb::ForwardRequest {
    pb::ForwardRequest {
        hidden: Some(hidden),
        layers: layers(range.0, range.1),
        sessions,
        ..Default::default()
    }
}

/// A step of one session over all the rows of `hidden`.
fn step(session: &str, position: u64, hidden: pb::Tensor, range: (u32, u32)) -> pb::ForwardRequest {
    let n = hidden.shape.first().copied().unwrap_or(0) as u32;
    batch(vec![rows(session, position, n)], hidden, range)
}

/// The status a refused session of a step reads as.
fn refusal(f: &pb::SessionFailure) -> tonic::Status {
    let e = f.error.as_ref().expect("a refusal says why");
    tonic::Status::new(Code::from_i32(e.code), e.message.clone())
}

fn values(response: &pb::ForwardResponse) -> Vec<Vec<f32>> {
    let hidden = response.hidden.as_ref().expect("hidden state");
    assert_eq!(hidden.dtype, pb::DataType::F32 as i32);
    Activations::from_wire(hidden, smollm2().config.d_model)
        .expect("decode")
        .hidden
        .to_vec2::<f32>()
        .expect("to vec")
}

/// A worker served in this process.
struct Running {
    client: WorkerClient<Channel>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(idle_timeout: Duration) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = realm_worker::WorkerConfig {
        models: vec![model_path(SMOLLM2)],
        cache_dir: None,
        threads: 2,
        idle_timeout,
        memory_budget: None,
        prefetch: realm_worker::DEFAULT_PREFETCH,
    };
    let task = tokio::spawn(realm_worker::run(listener, config, async move {
        let _ = stopped.await;
    }));
    let client = WorkerClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    Running { client, stop, task }
}

impl Running {
    async fn info(&mut self) -> pb::InfoResponse {
        self.client
            .info(pb::InfoRequest {})
            .await
            .expect("info")
            .into_inner()
    }

    async fn assign(&mut self, start: u32, end: u32) -> pb::AssignShardResponse {
        self.client
            .assign_shard(pb::AssignShardRequest {
                model: Some(smollm2().identity()),
                layers: layers(start, end),
                manifest: None,
            })
            .await
            .expect("assign shard")
            .into_inner()
    }

    /// Runs a step; a step of one session that the worker refuses reads as its refusal.
    async fn forward(
        &mut self,
        request: pb::ForwardRequest,
    ) -> Result<pb::ForwardResponse, tonic::Status> {
        let alone = request.sessions.len() == 1;
        let response = self.client.forward(request).await?.into_inner();
        match &response.failed[..] {
            [refused] if alone => Err(refusal(refused)),
            _ => Ok(response),
        }
    }

    async fn end(&mut self, session: &str) -> bool {
        self.client
            .end_session(pb::EndSessionRequest {
                session_id: session.to_string(),
                ..Default::default()
            })
            .await
            .expect("end session")
            .into_inner()
            .ended
    }

    /// Shuts the worker down gracefully and checks it stopped cleanly.
    async fn stop(self) {
        drop(self.client);
        let _ = self.stop.send(());
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("worker stops")
            .expect("worker task");
        assert!(result.is_ok(), "worker failed: {result:?}");
    }
}

/// A step whose output an f16 wire cannot hold fails with `OUT_OF_RANGE`, naming the wider
/// types (the coordinator does not retry it: any worker would fail it the same way), and the
/// worker goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_past_the_wires_range_is_out_of_range() {
    let r = smollm2();
    let mut w = start(LONG).await;
    let n = r.config.n_layers as u32;
    w.assign(0, n).await;
    // Every value at f16's largest: the residual stream passes it as soon as a layer adds
    // anything positive.
    let edge = Tensor::full(65504f32, (1, r.config.d_model), &Device::Cpu).expect("tensor");
    let sent = Activations::to_wire(&edge, WireDType::F16).expect("to wire");
    let refused = w
        .forward(step("edge", 0, sent, (0, n)))
        .await
        .expect_err("an output past f16's range");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(refused.message().contains("bf16"), "{}", refused.message());
    let fine = w
        .forward(step("fine", 0, wire(&r.embed(&TOKENS[..1])), (0, n)))
        .await
        .expect("the next step");
    assert_eq!(values(&fine).len(), 1);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_model_shard_equals_the_in_process_model() {
    let r = smollm2();
    let mut w = start(LONG).await;

    let info = w.info().await;
    assert_eq!(info.realm_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.protocol_version, PROTOCOL_VERSION);
    assert_eq!(info.device, "cpu");
    assert_eq!(info.threads, 2);
    assert!(info.memory_available_bytes > 0);
    assert!(info.shards.is_empty());
    assert_eq!((info.active_sessions, info.kv_cache_bytes), (0, 0));

    let n = r.config.n_layers as u32;
    let assigned = w.assign(0, n).await;
    let shard = pb::ShardInfo {
        model: Some(r.identity()),
        layers: layers(0, n),
        ..Default::default()
    };
    let held = assigned.shard.clone().expect("the shard loaded");
    assert_eq!(
        (held.model, held.layers),
        (shard.model.clone(), shard.layers)
    );
    let block_bytes: u64 = r
        .file
        .tensors
        .values()
        .filter(|t| t.name.starts_with("blk."))
        .map(|t| t.size)
        .sum();
    assert_eq!(assigned.weight_bytes, block_bytes);
    let held = w.info().await.shards;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        (&held[0].model, &held[0].layers, held[0].weight_bytes),
        (&shard.model, &shard.layers, block_bytes)
    );

    // A prefill of four tokens, then one decode step, each bit-identical to the in-process run.
    let expected = r.run(&r.shard, &[&TOKENS[..4], &TOKENS[4..5]]);
    let prefill = w
        .forward(step("s", 0, wire(&r.embed(&TOKENS[..4])), (0, n)))
        .await
        .expect("prefill");
    assert_eq!(values(&prefill), expected[0]);
    assert!(prefill.compute_us > 0);
    let decode = w
        .forward(step("s", 4, wire(&r.embed(&TOKENS[4..5])), (0, n)))
        .await
        .expect("decode");
    assert_eq!(values(&decode), expected[1]);

    // The answer comes back in the dtype sent.
    let x = r.embed(&TOKENS[..2]);
    let sent = Activations::to_wire(&x, WireDType::F16).expect("to wire");
    let received = Activations::from_wire(&sent, r.config.d_model).expect("decode");
    let mut kv = SessionKv::new(r.config.n_layers);
    let out = r
        .shard
        .forward(&received.hidden, 0, &mut kv)
        .expect("forward");
    let half = w
        .forward(step("h", 0, sent, (0, n)))
        .await
        .expect("f16 step");
    assert_eq!(
        half.hidden,
        Some(Activations::to_wire(&out, WireDType::F16).expect("to wire"))
    );

    let info = w.info().await;
    assert_eq!(info.active_sessions, 2);
    assert!(info.kv_cache_bytes > 0);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_on_one_stream_equal_the_model_and_a_failed_step_fails_alone() {
    let r = smollm2();
    let mut w = start(LONG).await;
    let n = r.config.n_layers as u32;
    w.assign(0, n).await;

    let (requests, outgoing) = tokio::sync::mpsc::channel(1);
    let mut replies = w
        .client
        .forward_stream(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .expect("open a step stream")
        .into_inner();
    let mut send = async |request: pb::ForwardRequest| -> pb::forward_reply::Result {
        requests.send(request).await.expect("send a step");
        let reply = replies
            .message()
            .await
            .expect("a reply")
            .expect("not the end");
        reply.result.expect("a result")
    };
    let ok = |result| match result {
        pb::forward_reply::Result::Response(response) => values(&response),
        pb::forward_reply::Result::Error(e) => panic!("step failed: {e:?}"),
    };
    let refused = |result| match result {
        pb::forward_reply::Result::Error(e) => (tonic::Code::from_i32(e.code), e.message),
        pb::forward_reply::Result::Response(r) => match &r.failed[..] {
            [f] => {
                let status = refusal(f);
                (status.code(), status.message().to_string())
            }
            _ => panic!("a bad step ran"),
        },
    };

    let expected = r.run(&r.shard, &[&TOKENS[..3], &TOKENS[3..4], &TOKENS[4..5]]);
    let e = |t: &[u32]| wire(&r.embed(t));
    assert_eq!(
        ok(send(step("s", 0, e(&TOKENS[..3]), (0, n))).await),
        expected[0]
    );
    // Bad steps get their errors as replies, and the stream and the session go on.
    let (code, message) = refused(send(step("s", 7, e(&TOKENS[3..4]), (0, n))).await);
    assert_eq!(code, Code::InvalidArgument, "{message}");
    let (code, message) = refused(send(step("s", 3, e(&TOKENS[3..4]), (0, 2))).await);
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(message.contains("not this worker's shard"), "{message}");
    assert_eq!(
        ok(send(step("s", 3, e(&TOKENS[3..4]), (0, n))).await),
        expected[1]
    );
    assert_eq!(
        ok(send(step("s", 4, e(&TOKENS[4..5]), (0, n))).await),
        expected[2]
    );

    // A worker shutting down ends the streams open between steps, so its drain can finish.
    w.stop().await;
    assert!(!matches!(replies.message().await, Ok(Some(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_step_runs_each_session_as_alone_and_refuses_a_session_alone() {
    let r = smollm2();
    let n = r.config.n_layers as u32;
    let mut w = start(LONG).await;
    w.assign(0, n).await;
    let one = r.run(&r.shard, &[&TOKENS[..3], &TOKENS[3..4], &TOKENS[4..6]]);
    let two = r.run(&r.shard, &[&OTHER_TOKENS[..], &TOKENS[..1]]);
    let e = |t: &[u32]| wire(&r.embed(t));

    // Both prompts in one step.
    let prompts = [&TOKENS[..3], &OTHER_TOKENS[..]].concat();
    let both = w
        .forward(batch(
            vec![rows("one", 0, 3), rows("two", 0, 4)],
            e(&prompts),
            (0, n),
        ))
        .await
        .expect("two prompts");
    assert!(both.failed.is_empty(), "{:?}", both.failed);
    assert_eq!(values(&both), [one[0].clone(), two[0].clone()].concat());

    // A decode row of each around a session the worker does not hold: that one is refused,
    // the others run.
    let decode = w
        .forward(batch(
            vec![rows("one", 3, 1), rows("ghost", 5, 1), rows("two", 4, 1)],
            e(&[TOKENS[3], TOKENS[0], TOKENS[0]]),
            (0, n),
        ))
        .await
        .expect("a step with a refused session");
    assert_eq!(decode.failed.len(), 1, "{:?}", decode.failed);
    assert_eq!(decode.failed[0].index, 1);
    let why = refusal(&decode.failed[0]);
    assert_eq!(why.code(), Code::InvalidArgument, "{why:?}");
    assert!(why.message().contains("unknown session"), "{why:?}");
    assert_eq!(values(&decode), [one[1].clone(), two[1].clone()].concat());

    // Their caches are what running alone leaves.
    let next = w
        .forward(step("one", 4, e(&TOKENS[4..6]), (0, n)))
        .await
        .expect("the session goes on");
    assert_eq!(values(&next), one[2]);
    assert_eq!(w.info().await.active_sessions, 2);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_sessions_across_two_workers_equal_one_process() {
    let r = smollm2();
    let (n, split) = (r.config.n_layers as u32, 12);
    let (mut a, mut b) = (start(LONG).await, start(LONG).await);
    a.assign(0, split).await;
    b.assign(split, n).await;

    // Runs one step of `session` through both workers.
    async fn through(
        a: &mut Running,
        b: &mut Running,
        session: &str,
        position: u64,
        x: Tensor,
        (split, n): (u32, u32),
    ) -> Vec<Vec<f32>> {
        let mid = a
            .forward(step(session, position, wire(&x), (0, split)))
            .await
            .expect("first worker");
        let hidden = mid.hidden.expect("hidden");
        let out = b
            .forward(step(session, position, hidden, (split, n)))
            .await
            .expect("second worker");
        values(&out)
    }

    let one = r.run(&r.shard, &[&TOKENS[..3], &TOKENS[3..4], &TOKENS[4..5]]);
    let two = r.run(&r.shard, &[&OTHER_TOKENS[..], &TOKENS[..1]]);
    let ranges = (split, n);
    let e = |t: &[u32]| r.embed(t);
    assert_eq!(
        through(&mut a, &mut b, "one", 0, e(&TOKENS[..3]), ranges).await,
        one[0]
    );
    assert_eq!(
        through(&mut a, &mut b, "two", 0, e(&OTHER_TOKENS), ranges).await,
        two[0]
    );
    assert_eq!(
        through(&mut a, &mut b, "one", 3, e(&TOKENS[3..4]), ranges).await,
        one[1]
    );

    // Both sessions at once on the same worker.
    let (mut a2, mut b2) = (a.client.clone(), b.client.clone());
    let (left, right) = tokio::join!(
        a.client
            .forward(step("one", 4, wire(&e(&TOKENS[4..5])), (0, split))),
        a2.forward(step("two", 4, wire(&e(&TOKENS[..1])), (0, split))),
    );
    let (left, right) = (
        left.expect("one").into_inner(),
        right.expect("two").into_inner(),
    );
    let (left, right) = tokio::join!(
        b.client
            .forward(step("one", 4, left.hidden.expect("hidden"), (split, n))),
        b2.forward(step("two", 4, right.hidden.expect("hidden"), (split, n))),
    );
    assert_eq!(values(&left.expect("one").into_inner()), one[2]);
    assert_eq!(values(&right.expect("two").into_inner()), two[1]);
    assert_eq!(a.info().await.active_sessions, 2);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_session_or_reassigning_frees_its_cache() {
    let r = smollm2();
    let mut w = start(LONG).await;
    w.assign(0, 2).await;
    for session in ["a", "b"] {
        w.forward(step(session, 0, wire(&r.embed(&TOKENS[..4])), (0, 2)))
            .await
            .expect("step");
    }
    let both = w.info().await;
    assert_eq!(both.active_sessions, 2);

    assert!(w.end("a").await);
    assert!(!w.end("a").await);
    let one = w.info().await;
    assert_eq!(one.active_sessions, 1);
    assert!(0 < one.kv_cache_bytes && one.kv_cache_bytes < both.kv_cache_bytes);
    let gone = w
        .forward(step("a", 4, wire(&r.embed(&TOKENS[4..5])), (0, 2)))
        .await
        .expect_err("ended session");
    assert_eq!(gone.code(), Code::InvalidArgument, "{gone:?}");
    assert!(gone.message().contains("unknown session"), "{gone:?}");

    // A new shard starts with no sessions.
    w.assign(2, 4).await;
    let info = w.info().await;
    assert_eq!(info.shards.len(), 1);
    assert_eq!(info.shards[0].layers, layers(2, 4));
    assert_eq!((info.active_sessions, info.kv_cache_bytes), (0, 0));
    assert!(!w.end("b").await);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_freed() {
    let r = smollm2();
    let mut w = start(Duration::from_secs(1)).await;
    w.assign(0, 1).await;
    w.forward(step("idle", 0, wire(&r.embed(&TOKENS[..2])), (0, 1)))
        .await
        .expect("step");
    assert_eq!(w.info().await.active_sessions, 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = w.info().await;
        if info.active_sessions == 0 {
            assert_eq!(info.kv_cache_bytes, 0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle session was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = w
        .forward(step("idle", 2, wire(&r.embed(&TOKENS[2..3])), (0, 1)))
        .await
        .expect_err("expired session");
    assert_eq!(gone.code(), Code::InvalidArgument, "{gone:?}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_the_worker_keeps_serving() {
    let r = smollm2();
    let d = r.config.d_model as u64;
    let mut w = start(LONG).await;
    let x = wire(&r.embed(&TOKENS[..3]));

    let early = w
        .forward(step("s", 0, x.clone(), (0, 2)))
        .await
        .expect_err("no shard");
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");

    let gemma = GgufFile::open(model_path(GEMMA3)).expect("open gemma");
    let gemma_config = ModelConfig::from_gguf(&gemma).expect("gemma config");
    let other = w
        .client
        .assign_shard(pb::AssignShardRequest {
            model: Some(pb::ModelIdentity::from(&ModelIdentity::of(
                &gemma,
                &gemma_config,
            ))),
            layers: layers(0, 2),
            manifest: None,
        })
        .await
        .expect_err("another model");
    assert_eq!(other.code(), Code::FailedPrecondition, "{other:?}");
    assert!(other.message().contains("model mismatch"), "{other:?}");
    assert!(other.message().contains("gemma3"), "{other:?}");

    let beyond = w
        .client
        .assign_shard(pb::AssignShardRequest {
            model: Some(r.identity()),
            layers: layers(0, r.config.n_layers as u32 + 1),
            manifest: None,
        })
        .await
        .expect_err("too many layers");
    assert_eq!(beyond.code(), Code::InvalidArgument, "{beyond:?}");
    assert!(w.info().await.shards.is_empty());

    w.assign(0, 2).await;
    w.forward(step("s", 0, x.clone(), (0, 2)))
        .await
        .expect("first step");

    let with = |f: &dyn Fn(&mut pb::ForwardRequest)| {
        let mut request = step("fresh", 0, x.clone(), (0, 2));
        f(&mut request);
        request
    };
    let tensor =
        |f: &dyn Fn(&mut pb::Tensor)| with(&|request| f(request.hidden.as_mut().expect("hidden")));
    let cases: Vec<(&str, pb::ForwardRequest, Code, &str)> = vec![
        (
            "wrong byte length",
            tensor(&|t| {
                t.data.pop();
            }),
            Code::InvalidArgument,
            "bytes",
        ),
        (
            "unknown dtype",
            tensor(&|t| t.dtype = 7),
            Code::InvalidArgument,
            "dtype",
        ),
        (
            "wrong shape",
            tensor(&|t| t.shape = vec![3 * d]),
            Code::InvalidArgument,
            "shape",
        ),
        (
            "wrong width",
            tensor(&|t| t.shape = vec![6, d / 2]),
            Code::InvalidArgument,
            "d_model",
        ),
        (
            "not finite",
            tensor(&|t| t.data[..4].copy_from_slice(&f32::NAN.to_le_bytes())),
            Code::InvalidArgument,
            "NaN",
        ),
        (
            "no hidden state",
            with(&|request| request.hidden = None),
            Code::InvalidArgument,
            "missing",
        ),
        (
            "unknown session at position > 0",
            with(&|request| request.sessions[0].position = 3),
            Code::InvalidArgument,
            "unknown session",
        ),
        (
            "position mismatch",
            step("s", 5, x.clone(), (0, 2)),
            Code::InvalidArgument,
            "3 tokens",
        ),
        (
            "position past the context",
            step("s", r.config.context_length as u64 - 2, x.clone(), (0, 2)),
            Code::InvalidArgument,
            "position past the context",
        ),
        (
            "a layer range the worker does not own",
            with(&|request| request.layers = layers(0, 3)),
            Code::InvalidArgument,
            "not this worker's shard",
        ),
        (
            "no layer range",
            with(&|request| request.layers = None),
            Code::InvalidArgument,
            "layer range",
        ),
        (
            "empty session id",
            with(&|request| request.sessions[0].session_id.clear()),
            Code::InvalidArgument,
            "session id",
        ),
        (
            "no session",
            with(&|request| request.sessions.clear()),
            Code::InvalidArgument,
            "names no session",
        ),
        (
            "a session twice",
            batch(vec![rows("a", 0, 1), rows("a", 0, 2)], x.clone(), (0, 2)),
            Code::InvalidArgument,
            "appears twice",
        ),
        (
            "rows that do not add up to the hidden state",
            batch(vec![rows("fresh", 0, 2)], x.clone(), (0, 2)),
            Code::InvalidArgument,
            "hold 2 rows",
        ),
        (
            "a session without rows",
            batch(
                vec![rows("b", 0, 0), rows("fresh", 0, 3)],
                x.clone(),
                (0, 2),
            ),
            Code::InvalidArgument,
            "no rows",
        ),
        (
            "more rows than its step has tokens",
            with(&|request| request.sessions[0].step_tokens = 2),
            Code::InvalidArgument,
            "a step of 2 tokens",
        ),
    ];
    for (case, request, code, says) in cases {
        let status = w.forward(request).await.expect_err(case);
        assert_eq!(status.code(), code, "{case}: {status:?}");
        assert!(status.message().contains(says), "{case}: {status:?}");
    }

    // Nothing refused created a session or disturbed the one in progress.
    let info = w.info().await;
    assert_eq!(info.active_sessions, 1);
    let two =
        Shard::load(&r.file, &r.config, LayerRange::new(0, 2).expect("range")).expect("blocks");
    let expected = r.run(&two, &[&TOKENS[..3], &TOKENS[3..4]]);
    let next = w
        .forward(step("s", 3, wire(&r.embed(&TOKENS[3..4])), (0, 2)))
        .await
        .expect("the session goes on");
    assert_eq!(values(&next), expected[1]);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_announces_its_port_serves_and_stops_on_sigterm() {
    let model = model_path(SMOLLM2);
    let mut child = tokio::process::Command::new(binary("realm-worker"))
        .args(["--listen", "127.0.0.1:0", "--threads", "1", "--model"])
        .arg(&model)
        .env("REALM_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start realm-worker");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("announces its address in time")
        .expect("read stdout")
        .expect("a line on stdout");
    let addr = line
        .strip_prefix("realm-worker listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let addr: SocketAddr = addr.parse().expect("an address");
    assert_ne!(addr.port(), 0);

    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = WorkerClient::new(channel.clone());
    let info = client
        .info(pb::InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.protocol_version, PROTOCOL_VERSION);
    assert_eq!(info.threads, 1);
    assert!(info.shards.is_empty());

    let mut health = HealthClient::new(channel);
    for service in ["", "realm.v1.Worker"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    drop((client, health));

    let pid = child.id().expect("pid").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    assert_eq!(lines.next_line().await.expect("read stdout"), None);
}

#[test]
fn the_binary_refuses_devices_it_cannot_use() {
    let out = std::process::Command::new(binary("realm-worker"))
        .args(["--listen", "127.0.0.1:0", "--device", "cuda", "--model"])
        .arg(model_path(SMOLLM2))
        .output()
        .expect("run realm-worker");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("device `cuda` is not supported"),
        "{stderr}"
    );
}
