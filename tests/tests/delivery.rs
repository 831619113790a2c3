//! Workers without the model file (`realm-worker --cache-dir`): the coordinator delivers each its
//! layers. Real worker and coordinator processes on loopback; the text equals the
//! single-process model's, and the caches are checked on disk.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use realm_common::auth::{Bearer, Secret};
use realm_common::gguf::GgufFile;
use realm_common::model::{LayerRange, ModelConfig};
use realm_common::shard::{self, digest_tensors, ShardLayout};
use realm_common::synthetic::{self, SyntheticDType, SyntheticSpec};
use realm_common::wire::ModelIdentity;
use realm_proto::pb;
use realm_proto::pb::realm_client::RealmClient;
use realm_proto::pb::worker_client::WorkerClient;
use realm_tests::http;
use realm_tests::process::{self, Process};
use realm_tests::*;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

const PROMPT: &str = "The capital of France is";
const STEPS: usize = 12;
const TOKEN: &str = "delivery-test-cluster-token";

fn start_worker(cache: &Path, extra: &[&str]) -> Process {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    process::start("realm-worker", &args, &[])
}

fn start_model_worker(model: &Path) -> Process {
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--model",
        model.to_str().unwrap(),
    ];
    process::start("realm-worker", &args, &[])
}

fn start_coordinator(model: &Path, workers: &[&Process], extra: &[&str]) -> Process {
    let args = process::serve_args(model, workers, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    process::start("realm-coordinator", &args, &[])
}

async fn worker_client(
    w: &Process,
    token: Option<&str>,
) -> WorkerClient<InterceptedService<Channel, Bearer>> {
    let channel = Channel::from_shared(w.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = token.map(|t| Secret::new(t).unwrap());
    WorkerClient::with_interceptor(channel, Bearer::new(token.as_ref()))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

async fn info(w: &Process) -> pb::InfoResponse {
    info_with(w, None).await
}

async fn info_with(w: &Process, token: Option<&str>) -> pb::InfoResponse {
    worker_client(w, token)
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn cache_stats(w: &Process) -> pb::ShardCacheStats {
    info(w)
        .await
        .shard_cache
        .expect("a worker with --cache-dir reports its cache")
}

/// What `realm workers` prints for the cluster behind `coordinator`.
fn realm_workers(coordinator: &Process) -> String {
    let out = std::process::Command::new(binary("realm"))
        .args(["--coordinator", &coordinator.url(), "workers"])
        .env_remove("REALM_API_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The layers a worker serves, as it reports them.
async fn layers(w: &Process) -> LayerRange {
    let shards = info(w).await.shards;
    assert_eq!(shards.len(), 1, "{shards:?}");
    let r = shards[0].layers.expect("a shard's layers");
    LayerRange::new(r.start as usize, r.end as usize).unwrap()
}

/// Greedy ids of `PROMPT` through the coordinator.
async fn cluster_ids(coordinator: &Process) -> Vec<u32> {
    generate_ids(coordinator, None).await
}

/// As [`cluster_ids`], killing `victim` (SIGKILL) once four tokens have arrived.
async fn cluster_ids_killing(coordinator: &Process, victim: &mut Process) -> Vec<u32> {
    generate_ids(coordinator, Some(victim)).await
}

async fn generate_ids(coordinator: &Process, mut victim: Option<&mut Process>) -> Vec<u32> {
    let mut c = RealmClient::connect(coordinator.url()).await.unwrap();
    let request = pb::GenerateRequest {
        prompt: PROMPT.to_string(),
        max_tokens: STEPS as u32,
        ..Default::default()
    };
    let mut stream = c.generate(request).await.unwrap().into_inner();
    let mut ids = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        ids.extend(msg.token_ids);
        if ids.len() >= 4 {
            if let Some(victim) = victim.take() {
                victim.kill();
            }
        }
    }
    ids
}

/// Greedy ids of `PROMPT` by the single-process model core.
fn single_process_ids(model: &Path) -> Vec<u32> {
    single_process(model, PROMPT, STEPS).tokens
}

/// The files of a cache folder with extension `ext`.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect()
}

/// The one shard file of a cache folder.
fn shard_file(dir: &Path) -> PathBuf {
    let shards = files(dir, "gguf");
    assert_eq!(shards.len(), 1, "{shards:?}");
    shards[0].clone()
}

/// The bytes of `model`'s tensors a worker of `range` needs.
fn range_bytes(model: &GgufFile, range: LayerRange) -> u64 {
    shard::shard_tensors(model, range)
        .iter()
        .map(|t| t.size)
        .sum()
}

/// Checks that the cache in `dir` holds exactly the tensors of `range` of `model`, byte for byte.
fn assert_holds_only(dir: &Path, model: &GgufFile, range: LayerRange) {
    assert!(
        files(dir, "partial").is_empty(),
        "a finished delivery leaves no partial file"
    );
    let shard = GgufFile::open(shard_file(dir)).unwrap();
    let want: BTreeSet<&str> = shard::shard_tensors(model, range)
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let held: BTreeSet<&str> = shard.tensors.keys().map(String::as_str).collect();
    assert_eq!(held, want, "the cache of layers {range}");
    for name in held {
        let a = shard
            .tensor_bytes(shard.tensor_info(name).unwrap())
            .unwrap();
        let b = model
            .tensor_bytes(model.tensor_info(name).unwrap())
            .unwrap();
        assert!(a == b, "tensor {name} differs from the model's");
    }
}

/// The value of the Prometheus series `series` (name and labels, as printed) at `url`.
fn metric(url: &str, series: &str) -> f64 {
    let text = http::curl(url, None, &[]).body;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} at {url}:\n{text}"))
}

/// Two workers without the model give gemma3 its single-process tokens; each cache holds its
/// layers and received exactly their bytes, as the metrics of both ends say too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_less_workers_give_gemma3_its_single_process_tokens() {
    let model = model_path(GEMMA3);
    let want = single_process_ids(&model);
    let file = GgufFile::open(&model).unwrap();
    let caches = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let workers: Vec<Process> = caches
        .iter()
        .map(|c| start_worker(c.path(), &["--metrics-listen", "127.0.0.1:0"]))
        .collect();
    let refs: Vec<&Process> = workers.iter().collect();
    let coordinator = start_coordinator(&model, &refs, &["--http-listen", "127.0.0.1:0"]);
    assert_eq!(
        cluster_ids(&coordinator).await,
        want,
        "gemma3 through model-less workers"
    );
    let coordinator_metrics = format!("http://{}/metrics", coordinator.served("HTTP"));
    for (w, cache) in workers.iter().zip(&caches) {
        let range = layers(w).await;
        let bytes = range_bytes(&file, range);
        let stats = cache_stats(w).await;
        assert_eq!(stats.bytes_received, bytes, "{range}");
        assert_eq!((stats.hits, stats.misses), (0, 1), "{stats:?}");
        assert_holds_only(cache.path(), &file, range);
        let worker_metrics = format!("http://{}/metrics", w.served("metrics"));
        let received = metric(&worker_metrics, "realm_worker_shard_bytes_received_total");
        assert_eq!(received, bytes as f64);
        let url = w.url();
        let sent = metric(
            &coordinator_metrics,
            &format!("realm_shard_bytes_sent_total{{worker=\"{url}\"}}"),
        );
        assert_eq!(sent, bytes as f64);
        let delivered = format!(
            "realm_shard_assignments_total{{worker=\"{url}\",model=\"gemma-3-270m-q4_k_m\",source=\"delivered\"}}"
        );
        assert_eq!(metric(&coordinator_metrics, &delivered), 1.0);
    }
}

/// SmolLM2 through two workers without the model; then restarts: from the cache nothing is sent
/// (as `realm workers` shows through the coordinator), a damaged tensor is found and sent again
/// alone, and a lost checks file costs no transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_is_reused_after_a_restart_and_repaired_when_damaged() {
    let model = model_path(SMOLLM2);
    let want = single_process_ids(&model);
    let file = GgufFile::open(&model).unwrap();
    let caches = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let run = |expect: &'static str| {
        let (model, want, caches) = (&model, &want, &caches);
        async move {
            let workers: Vec<Process> =
                caches.iter().map(|c| start_worker(c.path(), &[])).collect();
            let refs: Vec<&Process> = workers.iter().collect();
            let coordinator = start_coordinator(model, &refs, &[]);
            assert_eq!(&cluster_ids(&coordinator).await, want, "{expect}");
            let mut stats = Vec::new();
            for w in &workers {
                stats.push((layers(w).await, cache_stats(w).await));
            }
            (stats, realm_workers(&coordinator))
        }
    };

    let (first, listing) = run("first run").await;
    for ((range, stats), cache) in first.iter().zip(&caches) {
        assert_eq!(stats.bytes_received, range_bytes(&file, *range));
        assert_holds_only(cache.path(), &file, *range);
    }
    // `realm workers` shows each worker's delivery through the coordinator.
    assert_eq!(listing.lines().count(), 2, "{listing}");
    assert_eq!(
        listing.matches("\tcache: 0 hits, 1 miss, ").count(),
        2,
        "{listing}"
    );
    assert!(!listing.contains(" 0 B received"), "{listing}");

    // Restarted: every shard comes from the cache.
    let (again, listing) = run("restarted").await;
    for (range, stats) in &again {
        assert_eq!(
            (stats.hits, stats.misses, stats.bytes_received),
            (1, 0, 0),
            "{range}: {stats:?}"
        );
    }
    assert_eq!(
        listing
            .matches("\tcache: 1 hit, 0 misses, 0 B received, ")
            .count(),
        2,
        "{listing}"
    );

    // One byte of one tensor of the first cache flipped, the second cache's checks file lost.
    let shard0 = shard_file(caches[0].path());
    let held = GgufFile::open(&shard0).unwrap();
    let victim = held.tensor_info("blk.3.ffn_down.weight").unwrap().clone();
    drop(held);
    let mut bytes = std::fs::read(&shard0).unwrap();
    bytes[(victim.offset + victim.size / 2) as usize] ^= 0x5a;
    std::fs::write(&shard0, bytes).unwrap();
    for checks in files(caches[1].path(), "checks") {
        std::fs::remove_file(checks).unwrap();
    }
    let (repaired, _) = run("repaired").await;
    let (_, s0) = &repaired[0];
    assert_eq!(
        (
            s0.tensors_damaged,
            s0.tensors_received,
            s0.bytes_received,
            s0.misses
        ),
        (1, 1, victim.size, 1),
        "{s0:?}"
    );
    let (_, s1) = &repaired[1];
    assert_eq!(
        (s1.hits, s1.bytes_received, s1.tensors_damaged),
        (1, 0, 0),
        "{s1:?}"
    );
    for ((range, _), cache) in repaired.iter().zip(&caches) {
        assert_holds_only(cache.path(), &file, *range);
    }
}

/// A synthetic model large enough that its delivery can be cut: the coordinator is killed once
/// the first tensors are in. The cache then holds no shard file, only the partial one; the next
/// coordinator sends exactly the tensors that were not checked in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_delivery_leaves_no_usable_shard_and_resumes_by_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("synthetic.gguf");
    synthetic::write(
        &model,
        &SyntheticSpec::small(10, 1024, SyntheticDType::Q8_0),
    )
    .unwrap();
    let file = GgufFile::open(&model).unwrap();
    let want = single_process_ids(&model);
    let cache = tempfile::tempdir().unwrap();
    let worker = start_worker(cache.path(), &[]);
    let total = range_bytes(&file, LayerRange::new(0, 10).unwrap());

    let args = process::serve_args(&model, &[&worker], &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut first = process::command("realm-coordinator", &args, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let checks_lines = || -> usize {
        files(cache.path(), "checks").first().map_or(0, |p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .count()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while checks_lines() < 2 {
        assert!(Instant::now() < deadline, "no tensor was delivered");
        std::thread::sleep(Duration::from_millis(1));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let kept = checks_lines();
    assert!(
        files(cache.path(), "gguf").is_empty(),
        "a cut delivery leaves no shard file"
    );
    assert_eq!(files(cache.path(), "partial").len(), 1);
    let cut = cache_stats(&worker).await;
    assert!(
        kept < 60 && cut.bytes_received < total,
        "the cut came too late: {cut:?}"
    );

    let coordinator = start_coordinator(&model, &[&worker], &[]);
    assert_eq!(cluster_ids(&coordinator).await, want);
    let done = cache_stats(&worker).await;
    // Every tensor was checked in once: the first delivery's, then the rest.
    assert_eq!(done.bytes_received, total, "{cut:?} then {done:?}");
    assert_eq!(done.misses, 2, "{done:?}");
    assert_holds_only(cache.path(), &file, LayerRange::new(0, 10).unwrap());
}

/// A worker guards its cache: the cluster token is required, a damaged tensor is refused with
/// DATA_LOSS and not kept, chunks out of order are refused, and a full disk is refused before
/// anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deliveries_are_refused_and_leave_nothing_usable() {
    let model = model_path(SMOLLM2);
    let file = GgufFile::open(&model).unwrap();
    let config = ModelConfig::from_gguf(&file).unwrap();
    let identity = ModelIdentity::of(&file, &config);
    let range = LayerRange::new(0, 2).unwrap();
    let layout = ShardLayout::of(&file, &identity, range).unwrap();
    let digests = digest_tensors(&file, layout.tensors(), 2).unwrap();
    let header = layout.header(&digests);
    let cache = tempfile::tempdir().unwrap();
    let worker = process::start(
        "realm-worker",
        &[
            "--listen",
            "127.0.0.1:0",
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ],
        &[("REALM_CLUSTER_TOKEN", TOKEN)],
    );
    let manifest = || pb::ShardDelivery {
        part: Some(pb::shard_delivery::Part::Manifest(pb::ShardManifest {
            header: header.clone(),
        })),
    };
    let chunk = |tensor: u32, offset: u64, data: Vec<u8>| pb::ShardDelivery {
        part: Some(pb::shard_delivery::Part::Chunk(pb::TensorChunk {
            tensor,
            offset,
            data: data.into(),
        })),
    };
    let first = &layout.tensors()[0];
    let bytes = file.tensor_bytes(first).unwrap().to_vec();
    let send = |token: Option<&'static str>, parts: Vec<pb::ShardDelivery>| {
        let worker = &worker;
        async move {
            worker_client(worker, token)
                .await
                .deliver_shard(tokio_stream::iter(parts))
                .await
        }
    };

    let e = send(None, vec![manifest()]).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // A worker with a model file and no cache has nowhere to put a shard.
    let without_cache = start_model_worker(&model);
    let e = worker_client(&without_cache, None)
        .await
        .deliver_shard(tokio_stream::iter(vec![manifest()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("--cache-dir"), "{e:?}");

    let e = send(Some(TOKEN), vec![chunk(0, 0, bytes.clone())])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("starts with the shard's manifest"),
        "{e:?}"
    );

    let garbage = pb::ShardDelivery {
        part: Some(pb::shard_delivery::Part::Manifest(pb::ShardManifest {
            header: b"GGUF\x03\0\0\0garbage".to_vec(),
        })),
    };
    let e = send(Some(TOKEN), vec![garbage]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    let mut damaged = bytes.clone();
    damaged[bytes.len() / 3] ^= 1;
    let e = send(Some(TOKEN), vec![manifest(), chunk(0, 0, damaged)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains(&first.name), "{e:?}");

    let half = bytes.len() / 2;
    let e = send(
        Some(TOKEN),
        vec![manifest(), chunk(0, half as u64, bytes[half..].to_vec())],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Cut inside a tensor: refused, the tensor not kept.
    let e = send(
        Some(TOKEN),
        vec![manifest(), chunk(0, 0, bytes[..half].to_vec())],
    )
    .await
    .unwrap_err();
    assert!(
        e.message().contains("stopped before its last byte"),
        "{e:?}"
    );

    // The good tensor alone: kept, the shard still incomplete, so no shard file.
    let reply = send(Some(TOKEN), vec![manifest(), chunk(0, 0, bytes.clone())])
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.tensors_received, reply.complete),
        (1, false),
        "{reply:?}"
    );
    assert!(files(cache.path(), "gguf").is_empty());
    let stats = info_with(&worker, Some(TOKEN)).await.shard_cache.unwrap();
    assert_eq!(
        (stats.tensors_received, stats.bytes_received),
        (1, first.size)
    );

    // A cache on a 16 MiB disk cannot take a 66 MB model's layers: the coordinator says so and
    // fails to start; nothing is left in the cache.
    let small = tempfile::tempdir().unwrap();
    let mut wrapped = std::process::Command::new("unshare");
    let script = format!(
        "mount -t tmpfs -o size=16m realm-cache {dir} && exec {bin} --listen 127.0.0.1:0 --cache-dir {dir}",
        dir = small.path().display(),
        bin = binary("realm-worker").display(),
    );
    wrapped
        .args(["-Urm", "sh", "-c", &script])
        .env("REALM_THREADS", "1");
    let full = process::start_command("realm-worker", wrapped, Stdio::inherit());
    let args = process::serve_args(&model, &[&full], &[]);
    let out = process::command(
        "realm-coordinator",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("MiB free") && stderr.contains("need"),
        "the coordinator names the full cache: {stderr}"
    );
}

/// A worker with the model dies mid-stream; a standby without it receives the dead worker's
/// layers and the stream ends with the undisturbed tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_less_standby_takes_over_a_dead_worker() {
    let model = model_path(SMOLLM2);
    let file = GgufFile::open(&model).unwrap();
    let mut workers = [start_model_worker(&model), start_model_worker(&model)];
    let cache = tempfile::tempdir().unwrap();
    let standby = start_worker(cache.path(), &[]);
    let refs: Vec<&Process> = workers.iter().collect();
    let coordinator = start_coordinator(&model, &refs, &["--standby", &standby.url()]);
    let want = cluster_ids(&coordinator).await;
    assert_eq!(want, single_process_ids(&model));

    let ids = cluster_ids_killing(&coordinator, &mut workers[1]).await;
    assert_eq!(ids, want, "the stream after its worker died");
    let range = layers(&standby).await;
    assert_eq!(range, LayerRange::new(15, 30).unwrap());
    let stats = cache_stats(&standby).await;
    assert_eq!(stats.bytes_received, range_bytes(&file, range), "{stats:?}");
    assert_holds_only(cache.path(), &file, range);
}

/// Three workers without the model; one dies mid-stream and no standby is left: its layers are
/// spread over the other two, which take the layers they held from their caches and receive only
/// those they lack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_planning_delivers_only_the_layers_a_worker_lacks() {
    let model = model_path(SMOLLM2);
    let file = GgufFile::open(&model).unwrap();
    let caches = [(); 3].map(|()| tempfile::tempdir().unwrap());
    let mut workers = caches.each_ref().map(|c| start_worker(c.path(), &[]));
    let refs: Vec<&Process> = workers.iter().collect();
    let coordinator = start_coordinator(&model, &refs, &[]);
    let want = cluster_ids(&coordinator).await;
    assert_eq!(want, single_process_ids(&model));
    let mut before = Vec::new();
    for w in &workers {
        before.push(layers(w).await);
    }

    let ids = cluster_ids_killing(&coordinator, &mut workers[1]).await;
    assert_eq!(ids, want, "the stream after its worker died");
    for k in [0, 2] {
        let (old, new) = (before[k], layers(&workers[k]).await);
        assert!(
            old.start >= new.start && old.end <= new.end && new.len() > old.len(),
            "{old} then {new}"
        );
        let stats = cache_stats(&workers[k]).await;
        assert_eq!(stats.bytes_reused, range_bytes(&file, old), "{stats:?}");
        // The old layers once, then the new ones only.
        assert_eq!(stats.bytes_received, range_bytes(&file, new), "{stats:?}");
        assert_eq!(
            files(caches[k].path(), "gguf").len(),
            2,
            "both shards stay cached"
        );
    }
}
