//! Several models served at once over one pool of workers: real worker and coordinator
//! processes on loopback. Every stream equals its model's single-process output, whichever
//! other models run beside it, are added or are removed.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use realm_common::auth::{Bearer, Secret};
use realm_common::synthetic::{self, SyntheticDType, SyntheticSpec};
use realm_proto::pb;
use realm_proto::pb::admin_client::AdminClient;
use realm_proto::pb::realm_client::RealmClient;
use realm_proto::pb::worker_client::WorkerClient;
use realm_tests::http;
use realm_tests::process::{self, Process};
use realm_tests::*;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

const PROMPT: &str = "The capital of France is";
const STEPS: usize = 16;
const TOKEN: &str = "models-test-cluster-token";
const WITH_TOKEN: [(&str, &str); 1] = [("REALM_CLUSTER_TOKEN", TOKEN)];

fn start_worker(args: &[&str]) -> Process {
    let mut all = vec!["--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    process::start("realm-worker", &all, &WITH_TOKEN)
}

/// `realm-coordinator serve` of `models` over `workers`, with the HTTP API and the cluster token,
/// then `extra`.
fn start_coordinator(models: &[&Path], workers: &[&Process], extra: &[&str]) -> Process {
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
    ];
    for m in models {
        args.push("--model".into());
        args.push(m.to_str().unwrap().into());
    }
    for w in workers {
        args.push("--worker".into());
        args.push(w.url());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    process::start("realm-coordinator", &args, &WITH_TOKEN)
}

fn id_of(model: &Path) -> String {
    model.file_stem().unwrap().to_str().unwrap().to_string()
}

async fn client(c: &Process) -> RealmClient<Channel> {
    RealmClient::connect(c.url()).await.unwrap()
}

async fn admin(
    c: &Process,
    token: Option<&str>,
) -> AdminClient<InterceptedService<Channel, Bearer>> {
    let channel = Channel::from_shared(c.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = token.map(|t| Secret::new(t).unwrap());
    AdminClient::with_interceptor(channel, Bearer::new(token.as_ref()))
}

async fn worker_info(w: &Process) -> pb::InfoResponse {
    let channel = Channel::from_shared(w.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = Secret::new(TOKEN).unwrap();
    WorkerClient::with_interceptor(channel, Bearer::new(Some(&token)))
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The architectures of the shards a worker holds, in the order assigned.
async fn shard_models(w: &Process) -> Vec<String> {
    worker_info(w)
        .await
        .shards
        .into_iter()
        .map(|s| s.model.unwrap().architecture)
        .collect()
}

fn request(model: &str, max_tokens: usize) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.to_string(),
        prompt: PROMPT.to_string(),
        max_tokens: max_tokens as u32,
        ..Default::default()
    }
}

/// The ids and text of a greedy stream of `model`, or the status that ended it.
async fn stream(
    c: &Process,
    model: &str,
    max_tokens: usize,
) -> Result<(Vec<u32>, String), tonic::Status> {
    stream_at(c.url(), model.to_string(), max_tokens).await
}

/// As [`stream`], from the coordinator at `url` (for a task of its own).
async fn stream_at(
    url: String,
    model: String,
    max_tokens: usize,
) -> Result<(Vec<u32>, String), tonic::Status> {
    let mut stream = RealmClient::connect(url)
        .await
        .unwrap()
        .generate(request(&model, max_tokens))
        .await?
        .into_inner();
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(message) = stream.message().await? {
        ids.extend(message.token_ids);
        text.push_str(&message.text);
    }
    Ok((ids, text))
}

/// What `realm` prints for `args` against `coordinator`, and whether it succeeded.
fn realm(coordinator: &Process, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut all = vec!["--coordinator".to_string(), coordinator.url()];
    all.extend(args.iter().map(|s| s.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = process::command("realm", &all, env)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn metric(url: &str, series: &str) -> f64 {
    let body = http::curl(&format!("{url}/metrics"), None, &[]).body;
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no series {series} in:\n{body}"))
}

/// Peak resident memory of a process, in MiB, from `/proc`.
fn peak_rss_mib(p: &Process) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_coordinator_serves_smollm2_and_gemma3_over_the_same_workers() {
    let (smol, gemma) = (model_path(SMOLLM2), model_path(GEMMA3));
    let (smol_id, gemma_id) = (id_of(&smol), id_of(&gemma));
    let want_smol = single_process(&smol, PROMPT, STEPS);
    let want_gemma = single_process(&gemma, PROMPT, STEPS);
    // One worker holds both files; the other holds neither and receives its layers of both.
    let cache = tempfile::tempdir().unwrap();
    let a = start_worker(&[
        "--model",
        smol.to_str().unwrap(),
        "--model",
        gemma.to_str().unwrap(),
    ]);
    let mut b = start_worker(&["--cache-dir", cache.path().to_str().unwrap()]);
    let standby_cache = tempfile::tempdir().unwrap();
    let standby = start_worker(&["--cache-dir", standby_cache.path().to_str().unwrap()]);
    let coordinator =
        start_coordinator(&[&smol, &gemma], &[&a, &b], &["--standby", &standby.url()]);
    let http_url = format!("http://{}", coordinator.served("HTTP"));

    // Both are listed, with their architectures and plans.
    let listed = http::curl(&format!("{http_url}/v1/models"), None, &[]).json();
    let data = listed["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [smol_id.as_str(), gemma_id.as_str()], "{listed}");
    assert_eq!(data[0]["architecture"], "llama");
    assert_eq!(data[1]["architecture"], "gemma3");
    assert_eq!(data[0]["plan"], "0-14,15-29", "{listed}");
    assert_eq!(data[1]["plan"], "0-8,9-17", "{listed}");
    let (ok, out, err) = realm(&coordinator, &["models"], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("{smol_id}\tllama\t30 layers")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{gemma_id}\tgemma3\t18 layers")),
        "{out}"
    );
    // Every worker holds a shard of each model.
    assert_eq!(shard_models(&a).await, ["llama", "gemma3"]);
    assert_eq!(shard_models(&b).await, ["llama", "gemma3"]);
    let (ok, out, err) = realm(&coordinator, &["workers"], &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("{smol_id}:")) && out.contains(&format!("{gemma_id}:")),
        "{out}"
    );

    // Three streams of each model at once: each equals its model's single-process output.
    let runs: Vec<_> = (0..6)
        .map(|i| {
            let model = if i % 2 == 0 {
                smol_id.clone()
            } else {
                gemma_id.clone()
            };
            let addr = coordinator.url();
            tokio::spawn(async move {
                let (ids, text) = stream_at(addr, model.clone(), STEPS).await.unwrap();
                (model, ids, text)
            })
        })
        .collect();
    for run in runs {
        let (model, ids, text) = run.await.unwrap();
        let want = if model == smol_id {
            &want_smol
        } else {
            &want_gemma
        };
        assert_eq!(ids, want.tokens, "{model}");
        assert_eq!(text, want.text, "{model}");
    }
    // The HTTP API routes by name too.
    let body = format!(
        r#"{{"model":"{gemma_id}","prompt":"{PROMPT}","max_tokens":{STEPS},"temperature":0}}"#
    );
    let reply = http::curl(&format!("{http_url}/v1/completions"), Some(&body), &[]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["choices"][0]["text"], want_gemma.text.as_str());
    assert_eq!(reply.json()["model"], gemma_id.as_str());

    // A request must name its model; an unknown one is not found.
    let unnamed = stream(&coordinator, "", 4).await.unwrap_err();
    assert_eq!(unnamed.code(), Code::InvalidArgument, "{unnamed:?}");
    assert!(
        unnamed
            .message()
            .contains(&format!("`{smol_id}`, `{gemma_id}`")),
        "{unnamed:?}"
    );
    let body = format!(r#"{{"prompt":"{PROMPT}","max_tokens":4}}"#);
    let reply = http::curl(&format!("{http_url}/v1/completions"), Some(&body), &[]);
    assert_eq!(reply.status, 400, "{}", reply.body);
    let unknown = stream(&coordinator, "gpt-4", 4).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let reply = http::curl(&format!("{http_url}/v1/models/gpt-4"), None, &[]);
    assert_eq!(reply.status, 404, "{}", reply.body);

    // The metrics count each model's tokens apart.
    let counted = [
        (&smol_id, 3 * want_smol.usage.generated_tokens),
        (&gemma_id, 4 * want_gemma.usage.generated_tokens),
    ];
    for (id, n) in counted {
        let generated = metric(
            &http_url,
            &format!("realm_generated_tokens_total{{model=\"{id}\"}}"),
        );
        assert_eq!(generated, n as f64, "{id}");
    }

    // A worker lost while both models stream: each model moves its layers of that worker to the
    // standby (delivered, as it holds no file), and both streams go on with their own text.
    let long = 2 * STEPS;
    let want_long = [
        (smol_id.clone(), single_process(&smol, PROMPT, long).tokens),
        (
            gemma_id.clone(),
            single_process(&gemma, PROMPT, long).tokens,
        ),
    ];
    let (tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let runs: Vec<_> = want_long
        .iter()
        .map(|(model, _)| {
            let (model, addr, tx) = (model.clone(), coordinator.url(), tx.clone());
            tokio::spawn(async move {
                let mut c = RealmClient::connect(addr).await.unwrap();
                let mut s = c
                    .generate(request(&model, long))
                    .await
                    .unwrap()
                    .into_inner();
                let mut ids = Vec::new();
                while let Some(m) = s.message().await.unwrap() {
                    ids.extend(m.token_ids);
                    if ids.len() == 4 {
                        let _ = tx.send(());
                    }
                }
                ids
            })
        })
        .collect();
    for _ in 0..2 {
        started.recv().await.unwrap();
    }
    b.kill();
    for (run, (model, want)) in runs.into_iter().zip(&want_long) {
        assert_eq!(&run.await.unwrap(), want, "{model} across the failover");
    }
    // The two models recover each on its own, in either order.
    let mut taken = shard_models(&standby).await;
    taken.sort();
    assert_eq!(taken, ["gemma3", "llama"]);

    eprintln!(
        "peak RSS with both models placed: worker with both files {:.0} MiB, standby with the \
         shard cache {:.0} MiB, coordinator {:.0} MiB",
        peak_rss_mib(&a),
        peak_rss_mib(&standby),
        peak_rss_mib(&coordinator)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_is_added_and_removed_while_another_streams() {
    let smol = model_path(SMOLLM2);
    let smol_id = id_of(&smol);
    let dir = tempfile::tempdir().unwrap();
    let synth = dir.path().join("synth-ten.gguf");
    synthetic::write(
        &synth,
        &SyntheticSpec::small(10, 1024, SyntheticDType::Q8_0),
    )
    .unwrap();
    let want_smol = single_process(&smol, PROMPT, STEPS);
    let want_synth = single_process(&synth, PROMPT, STEPS);
    let (cache_a, cache_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_worker(&[
        "--model",
        smol.to_str().unwrap(),
        "--cache-dir",
        cache_a.path().to_str().unwrap(),
    ]);
    let b = start_worker(&["--cache-dir", cache_b.path().to_str().unwrap()]);
    let coordinator = start_coordinator(&[&smol], &[&a, &b], &[]);
    let http_url = format!("http://{}", coordinator.served("HTTP"));
    let synth_path = synth.to_str().unwrap();

    // SmolLM2 streams back to back, each checked, for as long as models come and go.
    let running = Arc::new(AtomicBool::new(true));
    let background = {
        let (running, addr, want) = (
            Arc::clone(&running),
            coordinator.url(),
            want_smol.tokens.clone(),
        );
        let model = smol_id.clone();
        tokio::spawn(async move {
            let mut streams = 0;
            while running.load(Ordering::Relaxed) {
                let (ids, _) = stream_at(addr.clone(), model.clone(), STEPS).await.unwrap();
                assert_eq!(ids, want, "SmolLM2 stream {streams}");
                streams += 1;
            }
            streams
        })
    };

    // Only the cluster token may change the models.
    let add = pb::AddModelRequest {
        path: synth_path.to_string(),
        plan: String::new(),
    };
    for token in [None, Some("not-the-token")] {
        let refused = admin(&coordinator, token)
            .await
            .add_model(add.clone())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    }
    let (ok, _, err) = realm(&coordinator, &["models", "add", synth_path], &[]);
    assert!(!ok && err.contains("cluster token"), "{err}");

    let (ok, out, err) = realm(&coordinator, &["models", "add", synth_path], &WITH_TOKEN);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("added synth-ten\tllama\t10 layers"),
        "{out}"
    );
    let again = admin(&coordinator, Some(TOKEN))
        .await
        .add_model(add)
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
    let listed = http::curl(&format!("{http_url}/v1/models"), None, &[]).json();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [smol_id.as_str(), "synth-ten"]);
    assert_eq!(shard_models(&b).await, ["llama", "llama"]);
    let (ids, text) = stream(&coordinator, "synth-ten", STEPS).await.unwrap();
    assert_eq!(
        (ids, text),
        (want_synth.tokens.clone(), want_synth.text.clone())
    );

    // A stream of the model being removed ends with a clear status.
    let mut long = client(&coordinator)
        .await
        .generate(request("synth-ten", 1000))
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0;
    while seen < 2 {
        seen += long
            .message()
            .await
            .unwrap()
            .expect("tokens before the removal")
            .token_ids
            .len();
    }
    let (ok, out, err) = realm(
        &coordinator,
        &["models", "remove", "synth-ten"],
        &WITH_TOKEN,
    );
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "removed synth-ten\t1 running streams ended");
    let ended = loop {
        match long.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream of a removed model ended as if it had finished"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(
        ended.message().contains("synth-ten` was removed"),
        "{ended:?}"
    );

    // It is gone everywhere: the API, the workers' memory.
    let gone = stream(&coordinator, "synth-ten", 4).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let gone = admin(&coordinator, Some(TOKEN))
        .await
        .remove_model(pb::RemoveModelRequest {
            model: "synth-ten".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert_eq!(shard_models(&a).await, ["llama"]);
    assert_eq!(shard_models(&b).await, ["llama"]);
    let listed = http::curl(&format!("{http_url}/v1/models"), None, &[]).json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");

    // SmolLM2 streamed all along, undisturbed; a request naming no model goes to it again.
    running.store(false, Ordering::Relaxed);
    let streams = background.await.unwrap();
    assert!(streams >= 1);
    let (ids, _) = stream(&coordinator, "", STEPS).await.unwrap();
    assert_eq!(ids, want_smol.tokens);
}
