//! A load generator for a running coordinator (`realm load`): a fixed number of concurrent
//! streaming clients send greedy requests until a time limit or a request count is reached, and
//! the report says how many completed, were refused by admission control (RESOURCE_EXHAUSTED) or
//! failed, the time to first token at p50 and p99, and the tokens per second delivered. Every
//! completed stream is checked: it ends with a finish message whose usage matches the tokens
//! received, and a prompt's greedy tokens are the same in every completion (nothing accepted is
//! lost or corrupted).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use realm_common::auth::Bearer;
use realm_proto::pb;
use realm_proto::pb::realm_client::RealmClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The client every load task clones (one HTTP/2 connection, many streams).
pub type Client = RealmClient<InterceptedService<Channel, Bearer>>;

/// Prompts cycled through by the clients.
const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The largest planet in the solar system is",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub clients: usize,
    pub duration: Duration,
    /// No more requests than this in all.
    pub max_requests: usize,
    pub max_tokens: u32,
    /// The model asked for; empty for the coordinator's only model.
    pub model: String,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub completed: usize,
    pub rejected: usize,
    pub failed: usize,
    /// Completed streams whose tokens differ from another completion of the same prompt.
    pub inconsistent: usize,
    pub tokens: u64,
    pub wall: Duration,
    pub ttft_p50: Option<Duration>,
    pub ttft_p99: Option<Duration>,
    /// The first few failure messages.
    pub errors: Vec<String>,
}

impl LoadReport {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        serde_json::json!({
            "completed": self.completed,
            "rejected": self.rejected,
            "failed": self.failed,
            "inconsistent": self.inconsistent,
            "tokens": self.tokens,
            "wall_s": self.wall.as_secs_f64(),
            "tokens_per_second": self.tokens_per_second(),
            "ttft_p50_ms": ms(self.ttft_p50),
            "ttft_p99_ms": ms(self.ttft_p99),
            "errors": self.errors,
        })
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Option<Duration>| {
            d.map_or("-".to_string(), |d| {
                format!("{:.0} ms", d.as_secs_f64() * 1e3)
            })
        };
        write!(
            f,
            "completed {}, rejected {}, failed {}, inconsistent {}; {} tokens in {:.1} s = {:.1} tok/s; \
             time to first token p50 {}, p99 {}",
            self.completed,
            self.rejected,
            self.failed,
            self.inconsistent,
            self.tokens,
            self.wall.as_secs_f64(),
            self.tokens_per_second(),
            ms(self.ttft_p50),
            ms(self.ttft_p99),
        )
    }
}

enum Outcome {
    Completed {
        prompt: usize,
        ids: Vec<u32>,
        ttft: Duration,
    },
    Rejected,
    Failed(String),
}

/// Runs the load and reports.
pub async fn run(client: Client, config: &LoadConfig) -> LoadReport {
    let started = Instant::now();
    let issued = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.clients.max(1) {
        let (mut client, issued, outcomes, config) = (
            client.clone(),
            Arc::clone(&issued),
            Arc::clone(&outcomes),
            config.clone(),
        );
        tasks.spawn(async move {
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= config.max_requests || started.elapsed() >= config.duration {
                    return;
                }
                let outcome = one(&mut client, n % PROMPTS.len(), &config).await;
                let rejected = matches!(outcome, Outcome::Rejected);
                outcomes
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(outcome);
                if rejected {
                    // Refused at once: back off a little rather than spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let wall = started.elapsed();
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(PoisonError::into_inner));
    summarize(outcomes, wall)
}

async fn one(client: &mut Client, prompt: usize, config: &LoadConfig) -> Outcome {
    let sent = Instant::now();
    let request = pb::GenerateRequest {
        model: config.model.clone(),
        prompt: PROMPTS[prompt].to_string(),
        max_tokens: config.max_tokens,
        ..Default::default()
    };
    let mut stream = match client.generate(request).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::ResourceExhausted => return Outcome::Rejected,
        Err(s) => return Outcome::Failed(format!("{:?}: {}", s.code(), s.message())),
    };
    let (mut ids, mut ttft) = (Vec::new(), None);
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if !m.token_ids.is_empty() {
                    ttft.get_or_insert_with(|| sent.elapsed());
                }
                ids.extend(m.token_ids);
                if let Some(finish) = m.finish {
                    let generated = finish.usage.map_or(0, |u| u.generated_tokens as usize);
                    if generated != ids.len() {
                        return Outcome::Failed(format!(
                            "usage says {generated} tokens, the stream carried {}",
                            ids.len()
                        ));
                    }
                    return Outcome::Completed {
                        prompt,
                        ids,
                        ttft: ttft.unwrap_or_else(|| sent.elapsed()),
                    };
                }
            }
            Ok(None) => return Outcome::Failed("the stream ended without a finish".to_string()),
            Err(s) => return Outcome::Failed(format!("{:?}: {}", s.code(), s.message())),
        }
    }
}

fn summarize(outcomes: Vec<Outcome>, wall: Duration) -> LoadReport {
    let mut report = LoadReport {
        wall,
        ..LoadReport::default()
    };
    let mut first: HashMap<usize, Vec<u32>> = HashMap::new();
    let mut ttfts = Vec::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Completed { prompt, ids, ttft } => {
                report.completed += 1;
                report.tokens += ids.len() as u64;
                ttfts.push(ttft);
                let reference = first.entry(prompt).or_insert_with(|| ids.clone());
                if *reference != ids {
                    report.inconsistent += 1;
                }
            }
            Outcome::Rejected => report.rejected += 1,
            Outcome::Failed(e) => {
                report.failed += 1;
                if report.errors.len() < 5 {
                    report.errors.push(e);
                }
            }
        }
    }
    ttfts.sort();
    let at = |q: f64| {
        (!ttfts.is_empty()).then(|| ttfts[((ttfts.len() - 1) as f64 * q).round() as usize])
    };
    report.ttft_p50 = at(0.5);
    report.ttft_p99 = at(0.99);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_count_outcomes_percentiles_and_inconsistencies() {
        let done = |prompt, ids: &[u32], ms| Outcome::Completed {
            prompt,
            ids: ids.to_vec(),
            ttft: Duration::from_millis(ms),
        };
        let r = summarize(
            vec![
                done(0, &[1, 2], 10),
                done(0, &[1, 2], 30),
                done(0, &[1, 3], 20),
                done(1, &[5], 40),
                Outcome::Rejected,
                Outcome::Failed("boom".into()),
            ],
            Duration::from_secs(1),
        );
        assert_eq!(
            (r.completed, r.rejected, r.failed, r.inconsistent),
            (4, 1, 1, 1)
        );
        assert_eq!(r.tokens, 7);
        assert_eq!(r.ttft_p50, Some(Duration::from_millis(30)));
        assert_eq!(r.ttft_p99, Some(Duration::from_millis(40)));
        assert_eq!(r.errors, ["boom"]);
    }
}
