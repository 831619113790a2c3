//! The Memory64 layer manager: a shard run within a memory budget computes exactly what the fully
//! resident shard computes, and its counters move as the policy (a pinned prefix of layers, the
//! rest streamed through the remaining room) predicts. Real models in-process, a synthetic model
//! larger than the budget through a real worker over gRPC, and concurrent sessions.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use candle_core::Tensor;
use realm_common::gguf::GgufFile;
use realm_common::kv::SessionKv;
use realm_common::model::{
    layer_bytes, Embedding, Head, LayerBudget, LayerRange, LayerStats, ModelConfig, Shard,
};
use realm_common::synthetic::{self, SyntheticDType, SyntheticSpec};
use realm_common::wire::{Activations, ModelIdentity, WireDType};
use realm_proto::pb;
use realm_proto::pb::worker_client::WorkerClient;
use realm_tests::*;
use tonic::Code;

/// Tokens generated greedily per run (plus the prompt's step: one sweep each).
const GENERATED: usize = 6;

struct Loaded {
    file: GgufFile,
    config: ModelConfig,
    embedding: Embedding,
    head: Head,
    all: LayerRange,
}

fn open(path: &Path) -> Loaded {
    let file = GgufFile::open(path).expect("open model");
    let config = ModelConfig::from_gguf(&file).expect("config");
    Loaded {
        embedding: Embedding::load(&file, &config).expect("embedding"),
        head: Head::load(&file, &config).expect("head"),
        all: LayerRange::new(0, config.n_layers).expect("range"),
        file,
        config,
    }
}

impl Loaded {
    fn sizes(&self) -> Vec<u64> {
        layer_bytes(&self.file, self.all)
    }

    fn managed(&self, bytes: Option<u64>, prefetch: usize) -> Shard {
        let budget = LayerBudget { bytes, prefetch };
        Shard::load_managed(&self.file, &self.config, self.all, budget).expect("managed shard")
    }

    fn resident(&self) -> Shard {
        Shard::load(&self.file, &self.config, self.all).expect("shard")
    }

    /// Greedy continuation of `prompt`: `GENERATED` token ids.
    fn greedy(&self, shard: &Shard, prompt: &[u32]) -> Vec<u32> {
        let mut kv = SessionKv::new(self.config.n_layers);
        let mut input = prompt.to_vec();
        let mut out = Vec::new();
        while out.len() < GENERATED {
            let x = self.embedding.forward(&input).expect("embed");
            let h = shard.forward(&x, kv.len(), &mut kv).expect("forward");
            let last = h.narrow(0, input.len() - 1, 1).expect("last row");
            let logits = self.head.forward(&last).expect("head");
            let next = argmax(&logits);
            out.push(next);
            input = vec![next];
        }
        out
    }
}

fn argmax(logits: &Tensor) -> u32 {
    let v = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A worker's shard that fits its budget (every layer pinned) keeps its weights as a resident
/// shard does, as copies, none of the file's pages: the K formats, which the kernels can compute
/// from the file's layout, too. Run through a few steps, every weight read, the file's pages stay
/// out of this process.
#[test]
fn a_pinned_shard_keeps_no_pages_of_its_file() {
    let path = std::env::temp_dir().join(format!("realm-pinned-{}.gguf", std::process::id()));
    synthetic::write(&path, &SyntheticSpec::small(4, 256, SyntheticDType::Q4KM)).expect("write");
    let size_kib = std::fs::metadata(&path).expect("size").len() / 1024;
    let model = open(&path);
    let shard = model.managed(None, 1);
    model.greedy(&shard, &[1, 2, 3, 4, 5]);
    let stats = shard.layer_stats().expect("a managed shard");
    assert_eq!(
        stats.pinned_layers, model.config.n_layers as u64,
        "{stats:?}"
    );
    let resident = mapped_rss_kib(&path);
    std::fs::remove_file(&path).ok();
    // The head and embedding tables (not the shard's) are read from the file in this test.
    let layers_kib = model.sizes().iter().sum::<u64>() / 1024;
    assert!(
        resident * 2 < layers_kib,
        "{resident} KiB of the {size_kib} KiB file stay resident, its layers {layers_kib} KiB"
    );
}

/// Checks the counters of a single-session run of `sweeps` steps over `n` layers.
fn check_counters(stats: &LayerStats, n: u64, sweeps: u64, prefetch: usize, what: &str) {
    let p = stats.pinned_layers;
    assert_eq!(stats.accesses(), n * sweeps, "{what}: {stats:?}");
    // Pinned layers hit on every sweep; the streaming area never holds a streamed layer across
    // a whole sweep, so no other access hits.
    assert_eq!(stats.hits, p * sweeps, "{what}: {stats:?}");
    if prefetch == 0 {
        assert_eq!(stats.misses, (n - p) * sweeps, "{what}: {stats:?}");
        assert_eq!(
            (stats.prefetch_hits, stats.waits, stats.prefetches),
            (0, 0, 0)
        );
    }
    assert!(
        stats.resident_bytes <= stats.budget_bytes,
        "{what}: {stats:?}"
    );
    if p < n {
        // Every streamed access loads it, and all but the last few loads evicted a layer.
        assert!(stats.evictions + n >= (n - p) * sweeps, "{what}: {stats:?}");
    } else {
        assert_eq!((stats.misses, stats.evictions), (0, 0), "{what}: {stats:?}");
    }
}

/// Budgets of 100%, 50% and one layer give the fully resident output, token for token.
fn budgets_match_resident(model: &str, prompt: &[u32]) {
    let m = open(&model_path(model));
    let expected = m.greedy(&m.resident(), prompt);
    let sizes = m.sizes();
    let n = sizes.len() as u64;
    let total: u64 = sizes.iter().sum();
    let largest = *sizes.iter().max().unwrap();
    for (label, bytes) in [
        ("whole shard", None),
        ("half", Some(total / 2)),
        ("one layer", Some(largest)),
    ] {
        for prefetch in [0, 2] {
            let what = format!("{model}, {label}, prefetch {prefetch}");
            let shard = m.managed(bytes, prefetch);
            assert_eq!(m.greedy(&shard, prompt), expected, "{what}");
            let stats = shard.layer_stats().expect("managed");
            eprintln!("{what}: {stats:?}");
            check_counters(&stats, n, GENERATED as u64, prefetch, &what);
            match label {
                "whole shard" => assert_eq!(stats.pinned_layers, n),
                "half" => assert!(stats.pinned_layers > 0 && stats.pinned_layers < n / 2 + 1),
                _ => assert_eq!(stats.pinned_layers, 0),
            }
        }
    }
}

#[test]
fn smollm2_budgets_give_the_resident_output() {
    budgets_match_resident(SMOLLM2, &[1, 504, 3458, 314, 4649, 8212]);
}

#[test]
fn gemma3_budgets_give_the_resident_output() {
    budgets_match_resident(GEMMA3, &[2, 818, 5279, 529, 7001, 563]);
}

fn synthetic(dir: &Path, dtype: SyntheticDType) -> std::path::PathBuf {
    let path = dir.join(format!("synthetic-{dtype:?}.gguf"));
    synthetic::write(&path, &SyntheticSpec::small(8, 256, dtype)).expect("write synthetic model");
    path
}

#[test]
fn a_budget_smaller_than_the_largest_layer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = open(&synthetic(dir.path(), SyntheticDType::Q8_0));
    let largest = *m.sizes().iter().max().unwrap();
    let budget = LayerBudget {
        bytes: Some(largest - 1),
        prefetch: 1,
    };
    let err = Shard::load_managed(&m.file, &m.config, m.all, budget).expect_err("budget too small");
    assert!(
        err.to_string().contains(&format!("{largest} bytes")),
        "{err}"
    );
}

/// Sessions running at once through a one-layer budget with prefetch share loads and still
/// compute exactly what the resident shard computes.
#[test]
fn concurrent_sessions_through_a_tight_budget() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [SyntheticDType::Q4_0, SyntheticDType::Q8_0] {
        let m = open(&synthetic(dir.path(), dtype));
        let largest = *m.sizes().iter().max().unwrap();
        let prompts: Vec<Vec<u32>> = (0..4).map(|s| vec![s, 7 + s, 100 + s, 42]).collect();
        let resident = m.resident();
        let expected: Vec<Vec<u32>> = prompts.iter().map(|p| m.greedy(&resident, p)).collect();
        for (bytes, prefetch) in [(largest, 1), (2 * largest, 1), (3 * largest, 2)] {
            let shard = m.managed(Some(bytes), prefetch);
            let got: Vec<Vec<u32>> = std::thread::scope(|s| {
                let handles: Vec<_> = prompts
                    .iter()
                    .map(|p| s.spawn(|| m.greedy(&shard, p)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(
                got, expected,
                "{dtype:?}, budget {bytes}, prefetch {prefetch}"
            );
            let stats = shard.layer_stats().unwrap();
            eprintln!("{dtype:?} concurrent, budget {bytes}, prefetch {prefetch}: {stats:?}");
            assert_eq!(stats.accesses(), 8 * 4 * GENERATED as u64);
            assert!(stats.resident_bytes <= bytes);
        }
    }
}

/// A worker whose budget holds half the synthetic model: its steps equal the resident shard bit
/// for bit, and Info reports the counters the policy predicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_a_shard_larger_than_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthetic(dir.path(), SyntheticDType::Q8_0);
    let m = open(&path);
    let sizes = m.sizes();
    assert!(
        sizes.iter().all(|&s| s == sizes[0]),
        "synthetic layers are equal"
    );
    let layer = sizes[0];

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = realm_worker::WorkerConfig {
        models: vec![path.clone()],
        cache_dir: None,
        threads: 2,
        idle_timeout: Duration::from_secs(300),
        // Four layers of eight: one streaming slot (no prefetch), three pinned.
        memory_budget: Some(4 * layer),
        prefetch: 0,
    };
    let task = tokio::spawn(realm_worker::run(listener, config, async move {
        let _ = stopped.await;
    }));
    let mut client = WorkerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let identity = pb::ModelIdentity::from(&ModelIdentity::of(&m.file, &m.config));

    let assign = |start: u32, end: u32| pb::AssignShardRequest {
        model: Some(identity.clone()),
        layers: Some(pb::LayerRange { start, end }),
        manifest: None,
    };

    client.assign_shard(assign(0, 8)).await.expect("assign");
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    let stats = info.shards[0].layer_manager.expect("layer manager stats");
    assert_eq!(stats.budget_bytes, 4 * layer);
    assert_eq!(stats.pinned_layers, 3);
    assert_eq!(stats.resident_bytes, 3 * layer);
    assert_eq!((stats.hits, stats.misses), (0, 0));

    let resident = m.resident();
    let mut kv = SessionKv::new(8);
    let steps: [&[u32]; 4] = [&[1, 2, 3, 4, 5], &[6], &[7], &[8]];
    for tokens in steps {
        let x = m.embedding.forward(tokens).unwrap();
        let position = kv.len();
        let want = resident.forward(&x, position, &mut kv).unwrap();
        let response = client
            .forward(pb::ForwardRequest {
                hidden: Some(Activations::to_wire(&x, WireDType::F32).unwrap()),
                layers: Some(pb::LayerRange { start: 0, end: 8 }),
                sessions: vec![pb::SessionRows {
                    session_id: "s".to_string(),
                    position: position as u64,
                    rows: tokens.len() as u32,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .expect("forward")
            .into_inner();
        let got = Activations::from_wire(&response.hidden.unwrap(), 256)
            .unwrap()
            .hidden;
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
    }
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    let stats = info.shards[0].layer_manager.expect("layer manager stats");
    eprintln!("worker, budget 4 of 8 layers, prefetch 0: {stats:?}");
    // Per step: layers 0-2 hit, layers 3-7 miss through the one streaming slot.
    assert_eq!((stats.hits, stats.misses), (3 * 4, 5 * 4));
    assert_eq!((stats.prefetch_hits, stats.waits), (0, 0));
    assert_eq!(stats.evictions, 5 * 4 - 1);
    assert_eq!(stats.resident_bytes, 4 * layer);
    assert_eq!(stats.resident_layers, 4);

    drop(client);
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    // A worker whose budget is below one layer refuses the shard, naming the layer's size.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = realm_worker::WorkerConfig {
        models: vec![path],
        cache_dir: None,
        threads: 2,
        idle_timeout: Duration::from_secs(300),
        memory_budget: Some(layer / 2),
        prefetch: 1,
    };
    let task = tokio::spawn(realm_worker::run(listener, config, async move {
        let _ = stopped.await;
    }));
    let mut client = WorkerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let status = client
        .assign_shard(assign(0, 8))
        .await
        .expect_err("budget below one layer");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(&format!("{layer} bytes")),
        "{}",
        status.message()
    );
    drop(client);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// A `realm-worker` process's resident memory from `/proc`: (VmRSS, VmHWM) in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// What the test allows a worker beyond its baseline, its budget and its KV caches.
const WORKER_SLACK: u64 = 16 << 20;

/// A real worker process with a Memory64 budget, driven by a real coordinator through a greedy
/// generation: its peak RSS (VmHWM from `/proc`) stays within the RSS it had before it got a
/// shard, plus the budget, plus the session's KV cache, plus [`WORKER_SLACK`]. Returns the
/// baseline and the peak.
async fn worker_peak_within_budget(model: &Path, budget: u64) -> (u64, u64) {
    use realm_tests::process::start;
    let m = model.to_str().unwrap();
    let budget_arg = budget.to_string();
    let worker = start(
        "realm-worker",
        &[
            "--listen",
            "127.0.0.1:0",
            "--model",
            m,
            "--memory-budget",
            &budget_arg,
        ],
        &[],
    );
    // Settled: the listening line comes once the file is open and checked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (baseline, _) = rss(worker.child.id());
    let coordinator = start(
        "realm-coordinator",
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--model",
            m,
            "--worker",
            &worker.url(),
        ],
        &[],
    );
    let mut client = pb::realm_client::RealmClient::connect(coordinator.url())
        .await
        .unwrap();
    let prompt = "Once upon a time, in a small village at the edge of a forest,";
    let max_tokens = 48;
    let mut stream = client
        .generate(pb::GenerateRequest {
            prompt: prompt.to_string(),
            max_tokens,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut usage = None;
    while let Some(msg) = stream.message().await.unwrap() {
        usage = msg.finish.and_then(|f| f.usage).or(usage);
    }
    let usage = usage.expect("usage");
    let (_, peak) = rss(worker.child.id());

    let file = GgufFile::open(model).unwrap();
    let config = ModelConfig::from_gguf(&file).unwrap();
    let tokens = u64::from(usage.prompt_tokens + usage.generated_tokens);
    // Keys and values in f16 for every layer; a growing vector may hold twice what it uses.
    let kv =
        2 * tokens * config.n_layers as u64 * 2 * (config.n_kv_heads * config.head_dim) as u64 * 2;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "{}: worker RSS before its shard {:.1} MiB, peak {:.1} MiB (budget {:.1} MiB, KV at most {:.1} MiB)",
        model.display(),
        mib(baseline),
        mib(peak),
        mib(budget),
        mib(kv)
    );
    assert!(
        peak <= baseline + budget + kv + WORKER_SLACK,
        "{}: peak RSS {:.1} MiB exceeds {:.1} MiB before the shard + budget {:.1} + KV {:.1} + {:.0}",
        model.display(),
        mib(peak),
        mib(baseline),
        mib(budget),
        mib(kv),
        mib(WORKER_SLACK)
    );
    (baseline, peak)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_stay_within_their_budgets() {
    // The project models, each under a budget of a fraction of its layers.
    worker_peak_within_budget(&model_path(SMOLLM2), 8 << 20).await;
    worker_peak_within_budget(&model_path(GEMMA3), 6 << 20).await;
    // A synthetic model about five times larger than its budget.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synthetic-large.gguf");
    let spec = SyntheticSpec::small(12, 768, SyntheticDType::Q8_0);
    synthetic::write(&path, &spec).expect("write synthetic model");
    let budget = 24 << 20;
    assert!(spec.weight_bytes() > 4 * budget, "{}", spec.weight_bytes());
    worker_peak_within_budget(&path, budget).await;
}
