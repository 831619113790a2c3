//! A small benchmark of one configuration: K in-process workers on loopback (or, with K = 0, the
//! whole model in this process), one warm-up of the same prompt (two tokens generated, so the
//! measured run finds its buffers' memory as a serving process would, as the reference
//! engine's bench warms up before its timed runs), then one greedy generation from a fixed
//! prompt of an exact token length. It reports what the run measured and nothing it did not:
//!
//! - prefill tokens/s: prompt tokens over the time to the first token;
//! - decode tokens/s: tokens after the first over the time after the first;
//! - per-hop overhead: over the decode steps, a worker call's round trip minus the compute time
//!   the worker reports (encoding, loopback transport, decoding, scheduling);
//! - peak RSS: the process's high-water mark (`VmHWM`), coordinator and in-process workers
//!   together. Run one configuration per process to compare them (the CLI does);
//! - the bytes of weights a decode step reads, and the rate decode reads them at against the
//!   machine's read bandwidth, measured after the run by the same threads (see [`bandwidth`]);
//! - with a memory budget (the Memory64 layer manager on the workers): the budget, the prefetch
//!   depth and the hit rate, hits and prefetch hits over all layer accesses, from each worker's
//!   `Info` after the run (warm-up included).

use std::path::{Path, PathBuf};

use anyhow::Context;
use realm_common::generate::{generate, GenerationParams};
use realm_common::sampling::SamplingParams;
use realm_common::tokenizer::Tokenizer;
use realm_common::wire::WireDType;

use realm_common::gguf::GgufFile;
use realm_common::model::{decode_step_bytes, layer_bytes, LayerRange, ModelConfig};
use realm_proto::pb;
use realm_proto::pb::worker_client::WorkerClient;

use crate::cluster::Cluster;
use crate::local::LocalWorkers;
use crate::model::{model_id, CoordinatorModel};
use crate::plan::PlanSpec;
use crate::LocalModel;

mod bandwidth;

/// Text repeated to build the benchmark prompt.
const PROMPT_TEXT: &str = "The quick brown fox jumps over the lazy dog while the river runs \
    past the old mill, and the village wakes to the smell of bread. ";

/// One configuration to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub model: PathBuf,
    /// 0 runs the whole model in this process.
    pub workers: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Compute threads (reported; the thread pool is sized by the caller).
    pub threads: usize,
    pub wire_dtype: WireDType,
    /// The workers' layer budget; `None` runs them as without `--memory-budget`.
    pub memory: Option<MemoryConfig>,
}

/// How much of its shard each in-process worker keeps materialized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BudgetSpec {
    /// No budget: the whole shard resident (the layer manager off).
    Full,
    /// This percentage of the model's layer bytes over the worker count, at least one layer.
    Percent(f64),
    /// The largest layer's bytes: every layer streams.
    OneLayer,
    Bytes(u64),
}

impl std::str::FromStr for BudgetSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("full") {
            return Ok(Self::Full);
        }
        if s.eq_ignore_ascii_case("1layer") {
            return Ok(Self::OneLayer);
        }
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("budget `{s}`: not a percentage"))?;
            return if p > 0.0 && p <= 100.0 {
                Ok(Self::Percent(p))
            } else {
                Err(format!("budget `{s}`: the percentage must be in (0, 100]"))
            };
        }
        realm_worker::parse_size(s)
            .map(Self::Bytes)
            .map_err(|e| format!("budget `{s}` (full, N%, 1layer or a size): {e}"))
    }
}

impl std::fmt::Display for BudgetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Full => f.write_str("full"),
            Self::Percent(p) => write!(f, "{p}%"),
            Self::OneLayer => f.write_str("1layer"),
            Self::Bytes(b) => write!(f, "{b}"),
        }
    }
}

impl BudgetSpec {
    /// Bytes per worker for a model whose layers weigh `layers` bytes each, over `workers`
    /// workers; `None` for [`BudgetSpec::Full`]. Never less than the largest layer, which the
    /// layer manager needs.
    pub fn bytes(&self, layers: &[u64], workers: usize) -> Option<u64> {
        let largest = layers.iter().copied().max().unwrap_or(0);
        let per_worker = layers.iter().sum::<u64>() as f64 / workers.max(1) as f64;
        let bytes = match *self {
            Self::Full => return None,
            Self::Percent(p) => (per_worker * p / 100.0) as u64,
            Self::OneLayer => largest,
            Self::Bytes(b) => b,
        };
        Some(bytes.max(largest))
    }
}

/// A budget and a prefetch depth for the workers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryConfig {
    pub budget: BudgetSpec,
    pub prefetch: usize,
}

/// What the layer managers of one configuration did.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryResult {
    /// As requested (`full`, `50%`, ...).
    pub budget: String,
    /// Bytes of layer weights each worker may keep materialized, in MB of 2^20 bytes like
    /// `peak_rss_mb` (so the two compare directly); with `full`, the
    /// model's layer bytes over the worker count.
    pub budget_mb: f64,
    pub prefetch: usize,
    /// Hits and prefetch hits over all accesses, over all workers (1 with `full`: every layer
    /// stays resident); `None` where no worker reported any access.
    pub hit_rate: Option<f64>,
    /// Layers materialized, over all workers (at assignment, on misses and by prefetch).
    pub loads: u64,
    /// Time spent materializing them, in ms, on any thread.
    pub load_ms: f64,
}

/// What one configuration measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    pub model: String,
    pub workers: usize,
    pub threads: usize,
    pub prompt_tokens: usize,
    /// May fall short of the request if the model ends the text.
    pub generated_tokens: usize,
    pub prefill_tps: f64,
    pub decode_tps: f64,
    pub ttft_ms: f64,
    /// Mean decode-step overhead per worker hop, in µs; `None` without workers.
    pub hop_us: Option<f64>,
    /// `None` where `/proc/self/status` is unavailable.
    pub peak_rss_mb: Option<f64>,
    /// Bytes of weights one decode step reads, in MB of 2^20 bytes.
    pub step_mb: f64,
    /// The machine's read bandwidth for the compute threads, in GB/s of 10^9 bytes.
    pub read_gbs: f64,
    /// Only when the configuration set a memory budget.
    pub memory: Option<MemoryResult>,
}

impl BenchResult {
    /// The rate decode reads weights at, over the machine's read bandwidth.
    pub fn bandwidth_fraction(&self) -> f64 {
        self.step_mb * (1u64 << 20) as f64 * self.decode_tps / (self.read_gbs * 1e9)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "model": self.model,
            "workers": self.workers,
            "threads": self.threads,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_tps": round(self.prefill_tps, 1),
            "decode_tps": round(self.decode_tps, 2),
            "ttft_ms": round(self.ttft_ms, 1),
            "hop_us": self.hop_us.map(|v| round(v, 1)),
            "peak_rss_mb": self.peak_rss_mb.map(|v| round(v, 1)),
            "step_mb": round(self.step_mb, 2),
            "read_gbs": round(self.read_gbs, 2),
            "bandwidth_fraction": round(self.bandwidth_fraction(), 3),
        });
        if let (Some(m), Some(map)) = (&self.memory, v.as_object_mut()) {
            map.insert("budget".into(), m.budget.clone().into());
            map.insert("budget_mb".into(), round(m.budget_mb, 1).into());
            map.insert("prefetch".into(), m.prefetch.into());
            map.insert("hit_rate".into(), m.hit_rate.map(|r| round(r, 4)).into());
            map.insert("loads".into(), m.loads.into());
            map.insert("load_ms".into(), round(m.load_ms, 1).into());
        }
        v
    }

    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        let n = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .map(|n| n as usize)
        };
        Some(Self {
            model: v.get("model")?.as_str()?.to_string(),
            workers: n("workers")?,
            threads: n("threads")?,
            prompt_tokens: n("prompt_tokens")?,
            generated_tokens: n("generated_tokens")?,
            prefill_tps: f("prefill_tps")?,
            decode_tps: f("decode_tps")?,
            ttft_ms: f("ttft_ms")?,
            hop_us: f("hop_us"),
            peak_rss_mb: f("peak_rss_mb"),
            step_mb: f("step_mb")?,
            read_gbs: f("read_gbs")?,
            memory: match v.get("budget") {
                None => None,
                Some(budget) => Some(MemoryResult {
                    budget: budget.as_str()?.to_string(),
                    budget_mb: f("budget_mb")?,
                    prefetch: n("prefetch")?,
                    hit_rate: f("hit_rate"),
                    loads: v.get("loads")?.as_u64()?,
                    load_ms: f("load_ms")?,
                }),
            },
        })
    }
}

impl std::fmt::Display for BenchResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("n/a".to_string(), |v| format!("{v:.0} {unit}"));
        write!(
            f,
            "{} workers={}: prefill {:.1} tok/s, decode {:.2} tok/s, TTFT {:.1} ms, hop overhead {}, peak RSS {} ({} prompt + {} generated tokens, {} threads)",
            self.model,
            self.workers,
            self.prefill_tps,
            self.decode_tps,
            self.ttft_ms,
            opt(self.hop_us, "µs"),
            opt(self.peak_rss_mb, "MB"),
            self.prompt_tokens,
            self.generated_tokens,
            self.threads,
        )?;
        write!(
            f,
            "; a decode step reads {:.1} MB of weights: {:.1} GB/s, {:.0}% of the measured read bandwidth ({:.1} GB/s)",
            self.step_mb,
            self.step_mb * (1u64 << 20) as f64 * self.decode_tps / 1e9,
            self.bandwidth_fraction() * 100.0,
            self.read_gbs,
        )?;
        if let Some(m) = &self.memory {
            let hit = m
                .hit_rate
                .map_or("n/a".to_string(), |r| format!("{:.1}%", r * 100.0));
            write!(
                f,
                " [budget {} = {:.1} MB, prefetch {}, hit rate {hit}, {} layer loads in {:.0} ms]",
                m.budget, m.budget_mb, m.prefetch, m.loads, m.load_ms
            )?;
        }
        Ok(())
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (v * scale).round() / scale
}

/// Exactly `n` prompt tokens: BOS (where the model adds it) and a repeated sentence, cut short.
pub fn bench_prompt(tokenizer: &Tokenizer, n: usize) -> anyhow::Result<Vec<u32>> {
    anyhow::ensure!(n > 0, "the prompt needs at least one token");
    let mut text = String::from(PROMPT_TEXT);
    loop {
        let mut tokens = tokenizer.encode(&text, true, false)?;
        if tokens.len() >= n {
            tokens.truncate(n);
            return Ok(tokens);
        }
        text.push_str(PROMPT_TEXT);
    }
}

fn greedy(max_tokens: usize) -> GenerationParams {
    GenerationParams {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
    }
}

/// Measures one configuration.
pub async fn bench_one(config: &BenchConfig) -> anyhow::Result<BenchResult> {
    anyhow::ensure!(config.gen_tokens > 0, "--gen-tokens must be at least 1");
    anyhow::ensure!(
        config.memory.is_none() || config.workers > 0,
        "a memory budget needs workers (--workers 1 or more)"
    );
    let (usage, hop_us, memory) = if config.workers == 0 {
        let path = config.model.clone();
        let (prompt_tokens, gen_tokens) = (config.prompt_tokens, config.gen_tokens);
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let local = LocalModel::load(&path)?;
            let prompt = bench_prompt(&local.tokenizer, prompt_tokens)?;
            generate(
                &local.model,
                &local.tokenizer,
                prompt.clone(),
                &greedy(2),
                |_| {},
            )?;
            let c = generate(
                &local.model,
                &local.tokenizer,
                prompt,
                &greedy(gen_tokens),
                |_| {},
            )?;
            Ok((c.usage, None, None))
        })
        .await
        .context("the benchmark thread failed")??
    } else {
        bench_cluster(config).await?
    };
    // Measured once the run is over: the probe's buffer stays out of the peak RSS.
    let peak_rss_mb = peak_rss_mb();
    let path = config.model.clone();
    let (step_bytes, read_bandwidth) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let file = GgufFile::open_without_vocabulary(&path)?;
        let model = ModelConfig::from_gguf(&file)?;
        Ok((
            decode_step_bytes(&file, &model),
            bandwidth::read_bandwidth(),
        ))
    })
    .await
    .context("the bandwidth probe failed")??;
    Ok(BenchResult {
        model: model_id(&config.model),
        workers: config.workers,
        threads: config.threads,
        prompt_tokens: usage.prompt_tokens,
        generated_tokens: usage.generated_tokens,
        prefill_tps: usage.prefill_tokens_per_second(),
        decode_tps: usage.decode_tokens_per_second(),
        ttft_ms: usage.time_to_first_token.as_secs_f64() * 1e3,
        hop_us,
        peak_rss_mb,
        step_mb: step_bytes as f64 / (1u64 << 20) as f64,
        read_gbs: read_bandwidth / 1e9,
        memory,
    })
}

type ClusterRun = (
    realm_common::generate::Usage,
    Option<f64>,
    Option<MemoryResult>,
);

async fn bench_cluster(config: &BenchConfig) -> anyhow::Result<ClusterRun> {
    let model = load_model(&config.model).await?;
    let prompt = bench_prompt(&model.tokenizer, config.prompt_tokens)?;
    let layers = layer_bytes(&model.file, LayerRange::new(0, model.config.n_layers)?);
    let budget = config
        .memory
        .and_then(|m| m.budget.bytes(&layers, config.workers));
    let prefetch = config
        .memory
        .map_or(realm_worker::DEFAULT_PREFETCH, |m| m.prefetch);
    let workers = LocalWorkers::start_with_budget(
        &config.model,
        config.workers,
        config.threads,
        budget,
        prefetch,
    )
    .await?;
    let cluster =
        match Cluster::connect(model, workers.urls(), &PlanSpec::Auto, config.wire_dtype).await {
            Ok(c) => c,
            Err(e) => return Err(workers.fail(e.into()).await),
        };
    let run = async {
        cluster
            .generate(prompt.clone(), &greedy(2), |_| {
                std::ops::ControlFlow::Continue(())
            })
            .await?;
        cluster
            .generate(prompt, &greedy(config.gen_tokens), |_| {
                std::ops::ControlFlow::Continue(())
            })
            .await
    };
    let result = run.await;
    cluster.shutdown().await;
    let memory = match (&result, config.memory) {
        (Ok(_), Some(m)) => match layer_manager_stats(workers.urls()).await {
            Ok(stats) => Some(memory_result(m, budget, &layers, config.workers, &stats)),
            Err(e) => return Err(workers.fail(e).await),
        },
        _ => None,
    };
    workers.stop().await?;
    let g = result?;
    let hop_us = g.decode.mean_overhead().map(|d| d.as_secs_f64() * 1e6);
    Ok((g.completion.usage, hop_us, memory))
}

/// Each worker's layer manager counters (`None` where it runs none), through its `Info`.
async fn layer_manager_stats(
    urls: &[String],
) -> anyhow::Result<Vec<Option<pb::LayerManagerStats>>> {
    let mut stats = Vec::with_capacity(urls.len());
    for url in urls {
        let mut client = WorkerClient::connect(url.clone())
            .await
            .with_context(|| format!("cannot reach the worker at {url}"))?;
        let info = client
            .info(pb::InfoRequest {})
            .await
            .with_context(|| format!("Info on {url} failed"))?
            .into_inner();
        stats.push(info.shards.into_iter().next().and_then(|s| s.layer_manager));
    }
    Ok(stats)
}

fn memory_result(
    config: MemoryConfig,
    budget: Option<u64>,
    layers: &[u64],
    workers: usize,
    stats: &[Option<pb::LayerManagerStats>],
) -> MemoryResult {
    let bytes = budget.unwrap_or_else(|| layers.iter().sum::<u64>() / workers.max(1) as u64) as f64;
    let (hits, accesses) = stats.iter().flatten().fold((0, 0), |(h, a), s| {
        (
            h + s.hits + s.prefetch_hits,
            a + s.hits + s.prefetch_hits + s.misses + s.waits,
        )
    });
    let loads = stats.iter().flatten().map(|s| s.loads).sum();
    let load_us: u64 = stats.iter().flatten().map(|s| s.load_us).sum();
    MemoryResult {
        loads,
        load_ms: load_us as f64 / 1e3,
        budget: config.budget.to_string(),
        budget_mb: bytes / (1u64 << 20) as f64,
        prefetch: config.prefetch,
        hit_rate: (accesses > 0).then(|| hits as f64 / accesses as f64),
    }
}

/// Loads the coordinator's share of a model off the async threads.
pub async fn load_model(path: &Path) -> anyhow::Result<CoordinatorModel> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || CoordinatorModel::load(&path))
        .await
        .context("loading the model did not finish")?
}

/// The process's peak resident set (`VmHWM`), in MB of 2^20 bytes (the kernel's kB are KiB).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_round_trip_through_json() {
        let r = BenchResult {
            model: "m".to_string(),
            workers: 2,
            threads: 4,
            prompt_tokens: 128,
            generated_tokens: 64,
            prefill_tps: 900.5,
            decode_tps: 41.5,
            ttft_ms: 142.5,
            hop_us: Some(180.0),
            peak_rss_mb: Some(210.5),
            step_mb: 100.0,
            read_gbs: 10.0,
            memory: None,
        };
        let json = r.to_json();
        for key in [
            "model",
            "workers",
            "threads",
            "prefill_tps",
            "decode_tps",
            "ttft_ms",
            "hop_us",
            "peak_rss_mb",
            "step_mb",
            "read_gbs",
            "bandwidth_fraction",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert_eq!(BenchResult::from_json(&json), Some(r.clone()));
        // 100 MiB a step at 41.5 steps a second, against 10 GB/s.
        assert!((r.bandwidth_fraction() - 0.4352).abs() < 1e-4);
        let single = BenchResult { hop_us: None, ..r };
        assert!(single.to_json()["hop_us"].is_null());
        assert_eq!(
            BenchResult::from_json(&single.to_json()),
            Some(single.clone())
        );
        assert!(
            json.get("budget").is_none(),
            "no budget keys without a budget"
        );

        let managed = BenchResult {
            memory: Some(MemoryResult {
                budget: "50%".to_string(),
                budget_mb: 40.5,
                prefetch: 2,
                hit_rate: Some(0.875),
                loads: 40,
                load_ms: 812.5,
            }),
            ..single
        };
        let json = managed.to_json();
        for key in [
            "budget",
            "budget_mb",
            "prefetch",
            "hit_rate",
            "loads",
            "load_ms",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert_eq!(BenchResult::from_json(&json), Some(managed));
    }

    #[test]
    fn budgets_parse_and_resolve() {
        let layers = [100, 300, 200, 400];
        let spec = |s: &str| s.parse::<BudgetSpec>().expect(s);
        assert_eq!(spec("full").bytes(&layers, 1), None);
        assert_eq!(spec("50%").bytes(&layers, 1), Some(500));
        assert_eq!(
            spec("25%").bytes(&layers, 2),
            Some(400),
            "never below a layer"
        );
        assert_eq!(spec("1layer").bytes(&layers, 1), Some(400));
        assert_eq!(spec("1KiB").bytes(&layers, 1), Some(1024));
        for bad in ["0%", "150%", "half"] {
            assert!(bad.parse::<BudgetSpec>().is_err(), "{bad}");
        }
        assert_eq!(spec("50%").to_string(), "50%");
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_mb().is_some_and(|mb| mb > 0.0));
        }
    }

    /// A tiny synthetic model through in-process workers with budgets: the counters come back
    /// from `Info`, with the hit rates the layer manager's policy fixes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn budgets_report_the_layer_managers_hit_rate() {
        use realm_common::synthetic::{self, SyntheticDType, SyntheticSpec};

        let path = std::env::temp_dir().join(format!("realm-bench-{}.gguf", std::process::id()));
        synthetic::write(&path, &SyntheticSpec::small(4, 64, SyntheticDType::Q8_0)).expect("write");
        let run = |budget: BudgetSpec| {
            let config = BenchConfig {
                model: path.clone(),
                workers: 1,
                prompt_tokens: 6,
                gen_tokens: 3,
                threads: 1,
                wire_dtype: WireDType::F32,
                memory: Some(MemoryConfig {
                    budget,
                    prefetch: 0,
                }),
            };
            async move { bench_one(&config).await.expect("bench") }
        };
        let full = run(BudgetSpec::Full).await;
        let streamed = run(BudgetSpec::OneLayer).await;
        let _ = std::fs::remove_file(&path);

        let full_memory = full.memory.expect("memory figures");
        assert_eq!(
            full_memory.hit_rate,
            Some(1.0),
            "the whole shard stays resident"
        );
        assert_eq!(full_memory.budget, "full");
        let m = streamed.memory.expect("memory figures");
        // One layer of room and no prefetch: nothing is pinned, every access loads its layer.
        assert_eq!(m.hit_rate, Some(0.0));
        assert!(
            m.loads > full_memory.loads,
            "streamed layers load again each step"
        );
        assert!(m.budget_mb > 0.0 && m.budget_mb < full_memory.budget_mb / 3.0);
        assert!(streamed.generated_tokens > 0);
    }
}
