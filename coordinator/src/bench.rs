//! A small benchmark of one configuration: K in-process workers on loopback (or, with K = 0, the
//! whole model in this process), one warm-up, then one greedy generation from a fixed prompt of
//! an exact token length. It reports what the run measured and nothing it did not:
//!
//! - prefill tokens/s: prompt tokens over the time to the first token;
//! - decode tokens/s: tokens after the first over the time after the first;
//! - per-hop overhead: over the decode steps, a worker call's round trip minus the compute time
//!   the worker reports (encoding, loopback transport, decoding, scheduling);
//! - peak RSS: the process's high-water mark (`VmHWM`), coordinator and in-process workers
//!   together. Run one configuration per process to compare them (the CLI does).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use realm_common::generate::{generate, GenerationParams};
use realm_common::sampling::SamplingParams;
use realm_common::tokenizer::Tokenizer;
use realm_common::wire::WireDType;

use crate::cluster::Cluster;
use crate::local::LocalWorkers;
use crate::model::{model_id, CoordinatorModel};
use crate::plan::PlanSpec;
use crate::LocalModel;

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
}

impl BenchResult {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
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
        })
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
        )
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
    let (usage, hop_us) = if config.workers == 0 {
        let path = config.model.clone();
        let (prompt_tokens, gen_tokens) = (config.prompt_tokens, config.gen_tokens);
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let local = LocalModel::load(&path)?;
            let prompt = bench_prompt(&local.tokenizer, prompt_tokens)?;
            let warm = prompt[..prompt.len().min(4)].to_vec();
            generate(&local.model, &local.tokenizer, warm, &greedy(2), |_| {})?;
            let c = generate(
                &local.model,
                &local.tokenizer,
                prompt,
                &greedy(gen_tokens),
                |_| {},
            )?;
            Ok((c.usage, None))
        })
        .await
        .context("the benchmark thread failed")??
    } else {
        bench_cluster(config).await?
    };
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
        peak_rss_mb: peak_rss_mb(),
    })
}

async fn bench_cluster(
    config: &BenchConfig,
) -> anyhow::Result<(realm_common::generate::Usage, Option<f64>)> {
    let model = load_model(&config.model).await?;
    let prompt = bench_prompt(&model.tokenizer, config.prompt_tokens)?;
    let workers = LocalWorkers::start(&config.model, config.workers, config.threads).await?;
    let cluster =
        match Cluster::connect(model, workers.urls(), &PlanSpec::Auto, config.wire_dtype).await {
            Ok(c) => Arc::new(c),
            Err(e) => return Err(workers.fail(e.into()).await),
        };
    let run = async {
        let warm = prompt[..prompt.len().min(4)].to_vec();
        cluster
            .generate(warm, &greedy(2), |_| std::ops::ControlFlow::Continue(()))
            .await?;
        cluster
            .generate(prompt, &greedy(config.gen_tokens), |_| {
                std::ops::ControlFlow::Continue(())
            })
            .await
    };
    let result = run.await;
    drop(cluster);
    workers.stop().await?;
    let g = result?;
    let hop_us = g.decode.mean_overhead().map(|d| d.as_secs_f64() * 1e6);
    Ok((g.completion.usage, hop_us))
}

/// Loads the coordinator's share of a model off the async threads.
pub async fn load_model(path: &Path) -> anyhow::Result<CoordinatorModel> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || CoordinatorModel::load(&path))
        .await
        .context("loading the model did not finish")?
}

/// The process's peak resident set (`VmHWM`), in MB.
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
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert_eq!(BenchResult::from_json(&json), Some(r.clone()));
        let single = BenchResult { hop_us: None, ..r };
        assert!(single.to_json()["hop_us"].is_null());
        assert_eq!(BenchResult::from_json(&single.to_json()), Some(single));
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_mb().is_some_and(|mb| mb > 0.0));
        }
    }
}
