//! `realm`: the command-line client of a Realm coordinator. Streams completions to stdout (only
//! the completion; the usage line goes to stderr), tokenizes text, lists the served models and,
//! with the cluster token, adds and removes models while the coordinator serves.
//! `realm health` checks any Realm server's gRPC health, for container health checks.
//! A server error is printed as its gRPC status code and message, with exit status 1.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use realm_common::auth::{Bearer, Secret, API_KEY_ENV, CLUSTER_TOKEN_ENV};
use realm_common::tls::ClientTls;
use realm_coordinator::load::Client;
use realm_coordinator::net::{error_chain, normalize_url, secure_endpoint, MAX_MESSAGE_BYTES};
use realm_proto::pb;
use realm_proto::pb::admin_client::AdminClient;
use realm_proto::pb::realm_client::RealmClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Parser)]
#[command(name = "realm", version, about = "Client of a Realm coordinator")]
struct Cli {
    /// The coordinator's address, `host:port` or `http://host:port`.
    #[arg(
        long,
        global = true,
        env = "REALM_COORDINATOR",
        default_value = "http://127.0.0.1:7000"
    )]
    coordinator: String,
    /// API key, when the coordinator requires one.
    #[arg(long, global = true, env = API_KEY_ENV, hide_env_values = true)]
    api_key: Option<Secret>,
    /// CA certificate (PEM) that signed an `https://` coordinator's certificate.
    #[arg(long, global = true, value_name = "PEM")]
    ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion, streaming it to stdout as it arrives.
    Generate(GenerateArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(TokenizeArgs),
    /// List the models the coordinator serves; `add` and `remove` change them while it serves
    /// (with the cluster token).
    Models(ModelsArgs),
    /// Show each worker: its layers, sessions, KV memory and layer-manager counters.
    Workers,
    /// Ask a coordinator or worker for its gRPC health (grpc.health.v1); exit 0 when serving,
    /// 1 otherwise. For container health checks.
    Health(HealthArgs),
    /// Load test: concurrent streaming clients for a bounded time and request count.
    Load(LoadArgs),
}

#[derive(Args)]
struct ModelsArgs {
    /// The cluster token the coordinator was started with, for `add` and `remove`.
    #[arg(long, env = CLUSTER_TOKEN_ENV, hide_env_values = true)]
    cluster_token: Option<Secret>,
    #[command(subcommand)]
    change: Option<ModelChange>,
}

#[derive(Subcommand)]
enum ModelChange {
    /// Serve one more model: a GGUF file on the coordinator's machine, planned over the workers
    /// beside the models they hold.
    Add {
        /// The file's path, as the coordinator's machine sees it.
        path: String,
        /// Layer placement: `auto`, or inclusive ranges in worker order, e.g. 0-14,15-29.
        #[arg(long, default_value = "auto")]
        plan: String,
    },
    /// Stop serving a model: its running streams end, the workers free its layers.
    Remove {
        /// The model's id, as `realm models` lists it.
        model: String,
    },
}

#[derive(Args)]
struct LoadArgs {
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Stop sending new requests after this many seconds.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,
    /// Stop after this many requests in all.
    #[arg(long, default_value_t = 10_000)]
    max_requests: usize,
    /// Tokens generated per request (greedy).
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Model id (default: the coordinator's only model).
    #[arg(long, default_value = "")]
    model: String,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct HealthArgs {
    /// The server to check, `host:port` or `http://host:port` (default: --coordinator).
    addr: Option<String>,
    /// The service to ask about (default: the server as a whole).
    #[arg(long, default_value = "")]
    service: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
}

#[derive(Args)]
struct GenerateArgs {
    /// The prompt text (the user message with --chat).
    #[arg(long)]
    prompt: String,
    /// Render the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the server's; empty for none).
    #[arg(long)]
    system: Option<String>,
    /// Model id (default: the coordinator's only model).
    #[arg(long, default_value = "")]
    model: String,
    /// Maximum tokens to generate (default: the server's).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long)]
    top_p: Option<f32>,
    /// Repetition penalty (1: off).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print each generated token's log-probability and the N most likely tokens at its
    /// position (0 to 20) to stderr, one line per token.
    #[arg(long, value_name = "N")]
    logprobs: Option<u32>,
}

#[derive(Args)]
struct TokenizeArgs {
    /// Text to tokenize.
    #[arg(long)]
    text: String,
    /// Model id (default: the coordinator's only model).
    #[arg(long, default_value = "")]
    model: String,
    /// Do not add BOS even where the model adds it.
    #[arg(long)]
    no_bos: bool,
    /// Treat special-token text such as `<|im_start|>` as plain text.
    #[arg(long)]
    no_parse_special: bool,
}

/// What ends the client with an error: a message ready to print.
struct Failure(String);

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Self(format!("server error {:?}: {}", s.code(), s.message()))
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self(format!("cannot write the output: {e}"))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REALM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message)) => {
            eprintln!("realm: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let coordinator = &cli.coordinator;
    let ca = cli.ca.as_deref();
    let connect = || connect(coordinator, cli.api_key.as_ref(), ca);
    match cli.command {
        Command::Generate(args) => generate(connect().await?, args).await,
        Command::Tokenize(args) => tokenize(connect().await?, args).await,
        Command::Models(ModelsArgs { change: None, .. }) => models(connect().await?).await,
        Command::Models(ModelsArgs {
            change: Some(change),
            cluster_token,
        }) => change_models(coordinator, ca, cluster_token, change).await,
        Command::Workers => workers(connect().await?).await,
        Command::Load(args) => load(connect().await?, args).await,
        Command::Health(args) => health(coordinator, ca, args).await,
    }
}

async fn connect(
    raw: &str,
    api_key: Option<&Secret>,
    ca: Option<&Path>,
) -> Result<Client, Failure> {
    let channel = open_channel(raw, "coordinator", ca)
        .await
        .map_err(|Failure(message)| {
            Failure(format!(
                "{message} (is `realm-coordinator serve` running there? point --coordinator or \
             REALM_COORDINATOR at it)"
            ))
        })?;
    Ok(RealmClient::with_interceptor(channel, Bearer::new(api_key))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A channel to the server at `raw`, naming it as `what` in any error.
async fn open_channel(raw: &str, what: &str, ca: Option<&Path>) -> Result<Channel, Failure> {
    let url =
        normalize_url(raw).map_err(|problem| Failure(format!("{what} URL `{raw}`: {problem}")))?;
    let tls = ca
        .map(|ca| ClientTls::new(ca, None))
        .transpose()
        .map_err(Failure)?;
    let endpoint = secure_endpoint(&url, tls.as_ref())
        .map_err(|problem| Failure(format!("{what} URL `{url}`: {problem}")))?;
    endpoint.connect().await.map_err(|e| {
        Failure(format!(
            "cannot reach the {what} at {url}: {}",
            error_chain(&e)
        ))
    })
}

async fn health(coordinator: &str, ca: Option<&Path>, args: HealthArgs) -> Result<(), Failure> {
    let raw = args.addr.as_deref().unwrap_or(coordinator);
    let check = async {
        let channel = open_channel(raw, "server", ca).await?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await?
            .into_inner();
        Ok::<_, Failure>(reply.status())
    };
    let status = tokio::time::timeout(Duration::from_secs(args.timeout_secs), check)
        .await
        .map_err(|_| {
            Failure(format!(
                "{raw}: no health reply within {} s",
                args.timeout_secs
            ))
        })??;
    let name = status.as_str_name();
    if status == ServingStatus::Serving {
        writeln!(std::io::stdout(), "{name}")?;
        Ok(())
    } else {
        Err(Failure(format!("{raw} is {name}")))
    }
}

async fn generate(mut client: Client, args: GenerateArgs) -> Result<(), Failure> {
    let request = pb::GenerateRequest {
        model: args.model,
        prompt: args.prompt,
        chat: args.chat,
        system: args.system,
        max_tokens: args.max_tokens.unwrap_or(0),
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        stop: args.stop,
        logprobs: args.logprobs.is_some(),
        top_logprobs: args.logprobs.unwrap_or(0),
        ..Default::default()
    };
    let mut stream = client.generate(request).await?.into_inner();
    let mut stdout = std::io::stdout().lock();
    while let Some(message) = stream.message().await? {
        stdout.write_all(message.text.as_bytes())?;
        stdout.flush()?;
        for entry in &message.logprobs {
            eprintln!("{}", logprob_line(entry));
        }
        if let Some(finish) = message.finish {
            writeln!(stdout)?;
            let u = finish.usage.unwrap_or_default();
            eprintln!(
                "[{} prompt tokens, {} generated, finish {}; time to first token {:.0} ms, decode {:.1} tok/s]",
                u.prompt_tokens,
                u.generated_tokens,
                finish.reason,
                u.time_to_first_token_ms,
                u.tokens_per_second,
            );
            return Ok(());
        }
    }
    writeln!(stdout)?;
    Err(Failure(
        "the stream ended without a finish message".to_string(),
    ))
}

/// One token's log-probability as `realm generate --logprobs` prints it: the logprob, the
/// token (quoted, bytes that are not UTF-8 as `\xNN`) and its alternatives.
fn logprob_line(entry: &pb::TokenLogprob) -> String {
    use realm_common::logprobs::token_string;
    let mut line = format!("{:>9.4}\t{:?}", entry.logprob, token_string(&entry.bytes));
    for t in &entry.top_logprobs {
        line.push_str(&format!("\t{:?} {:.4}", token_string(&t.bytes), t.logprob));
    }
    line
}

async fn load(client: Client, args: LoadArgs) -> Result<(), Failure> {
    let config = realm_coordinator::load::LoadConfig {
        clients: args.clients,
        duration: std::time::Duration::from_secs(args.duration_secs),
        max_requests: args.max_requests,
        max_tokens: args.max_tokens,
        model: args.model,
    };
    let report = realm_coordinator::load::run(client, &config).await;
    if args.json {
        writeln!(std::io::stdout(), "{}", report.to_json())?;
    } else {
        writeln!(std::io::stdout(), "{report}")?;
        for e in &report.errors {
            eprintln!("error: {e}");
        }
    }
    if report.failed > 0 || report.inconsistent > 0 {
        return Err(Failure(format!(
            "{} requests failed and {} completions were inconsistent",
            report.failed, report.inconsistent
        )));
    }
    Ok(())
}

async fn tokenize(mut client: Client, args: TokenizeArgs) -> Result<(), Failure> {
    let reply = client
        .tokenize(pb::TokenizeRequest {
            model: args.model,
            text: args.text,
            add_special: !args.no_bos,
            parse_special: !args.no_parse_special,
        })
        .await?
        .into_inner();
    let json = serde_json::to_string(&reply.token_ids)
        .map_err(|e| Failure(format!("cannot print the ids: {e}")))?;
    writeln!(std::io::stdout(), "{json}")?;
    Ok(())
}

async fn models(mut client: Client) -> Result<(), Failure> {
    let reply = client
        .list_models(pb::ListModelsRequest {})
        .await?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    for m in reply.models {
        writeln!(
            stdout,
            "{}\t{}\t{} layers\tcontext {}\tplan {}",
            m.id, m.architecture, m.n_layers, m.context_length, m.plan
        )?;
    }
    Ok(())
}

async fn change_models(
    coordinator: &str,
    ca: Option<&Path>,
    token: Option<Secret>,
    change: ModelChange,
) -> Result<(), Failure> {
    let token = token.ok_or_else(|| {
        Failure(format!(
            "adding and removing models needs the cluster token: give --cluster-token or set \
             {CLUSTER_TOKEN_ENV}"
        ))
    })?;
    let channel = open_channel(coordinator, "coordinator", ca).await?;
    let mut admin = AdminClient::with_interceptor(channel, Bearer::new(Some(&token)));
    let mut stdout = std::io::stdout().lock();
    match change {
        ModelChange::Add { path, plan } => {
            let plan = if plan == "auto" { String::new() } else { plan };
            let m = admin
                .add_model(pb::AddModelRequest { path, plan })
                .await?
                .into_inner()
                .model
                .unwrap_or_default();
            writeln!(
                stdout,
                "added {}\t{}\t{} layers\tcontext {}\tplan {}",
                m.id, m.architecture, m.n_layers, m.context_length, m.plan
            )?;
        }
        ModelChange::Remove { model } => {
            let reply = admin
                .remove_model(pb::RemoveModelRequest {
                    model: model.clone(),
                })
                .await?
                .into_inner();
            writeln!(
                stdout,
                "removed {model}\t{} running streams ended",
                reply.streams_ended
            )?;
        }
    }
    Ok(())
}

async fn workers(mut client: Client) -> Result<(), Failure> {
    let reply = client
        .list_workers(pb::ListWorkersRequest {})
        .await?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    // A coordinator serving several models lists each model's workers under its name.
    let several = reply
        .workers
        .iter()
        .any(|w| w.model != reply.workers[0].model);
    let mut model = None;
    for w in reply.workers {
        if several && model.as_ref() != Some(&w.model) {
            writeln!(stdout, "{}:", w.model)?;
            model = Some(w.model.clone());
        }
        if !w.reachable {
            writeln!(
                stdout,
                "{}\tlayers {}\tunreachable: {}",
                w.url, w.layers, w.error
            )?;
            continue;
        }
        write!(
            stdout,
            "{}\tlayers {}\tsessions {}\tkv {:.1} MiB",
            w.url,
            w.layers,
            w.active_sessions,
            w.kv_cache_bytes as f64 / (1 << 20) as f64
        )?;
        if let Some(m) = w.layer_manager {
            let accesses = m.hits + m.misses + m.prefetch_hits + m.waits;
            let hit_rate = if accesses == 0 {
                0.0
            } else {
                (m.hits + m.prefetch_hits) as f64 / accesses as f64
            };
            write!(
                stdout,
                "\tresident {:.1}/{:.1} MiB ({} layers, {} pinned)\thits {} prefetch hits {} misses {} waits {} evictions {} (hit rate {:.2})",
                m.resident_bytes as f64 / (1 << 20) as f64,
                m.budget_bytes as f64 / (1 << 20) as f64,
                m.resident_layers,
                m.pinned_layers,
                m.hits,
                m.prefetch_hits,
                m.misses,
                m.waits,
                m.evictions,
                hit_rate
            )?;
        }
        if let Some(c) = w.shard_cache {
            write!(stdout, "\t{}", shard_cache_line(&c))?;
        }
        writeln!(stdout)?;
    }
    Ok(())
}

/// A worker's shard cache as `realm workers` prints it: whether its shard came from the cache
/// (hits) or had tensors delivered first (misses), what was received, and what the cache holds.
fn shard_cache_line(c: &pb::ShardCacheStats) -> String {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut line = format!(
        "cache: {}, {}, {} received, {} held",
        plural(c.hits, "hit", "hits"),
        plural(c.misses, "miss", "misses"),
        bytes(c.bytes_received),
        bytes(c.cached_bytes)
    );
    if c.bytes_reused > 0 {
        line += &format!(", {} reused", bytes(c.bytes_reused));
    }
    if c.tensors_damaged > 0 {
        line += &format!(
            ", {} damaged",
            plural(c.tensors_damaged, "tensor", "tensors")
        );
    }
    line
}

/// `n` bytes in the largest binary unit that keeps the figure at least 1, to one decimal.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_cache_line_says_where_the_shard_came_from() {
        let delivered = pb::ShardCacheStats {
            misses: 1,
            tensors_received: 90,
            bytes_received: 33_240_000,
            cached_bytes: 33_240_000,
            ..Default::default()
        };
        assert_eq!(
            shard_cache_line(&delivered),
            "cache: 0 hits, 1 miss, 31.7 MiB received, 31.7 MiB held"
        );
        let cached = pb::ShardCacheStats {
            hits: 1,
            cached_bytes: 33_240_000,
            ..Default::default()
        };
        assert_eq!(
            shard_cache_line(&cached),
            "cache: 1 hit, 0 misses, 0 B received, 31.7 MiB held"
        );
        let repaired = pb::ShardCacheStats {
            hits: 2,
            misses: 3,
            tensors_received: 1,
            bytes_received: 1536,
            tensors_damaged: 1,
            cached_bytes: 5 << 30,
            bytes_reused: 3 << 20,
        };
        assert_eq!(
            shard_cache_line(&repaired),
            "cache: 2 hits, 3 misses, 1.5 KiB received, 5.0 GiB held, 3.0 MiB reused, 1 tensor \
             damaged"
        );
    }
}
