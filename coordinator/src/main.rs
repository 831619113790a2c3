//! `realm-coordinator`: command-line entry point. Parses arguments, starts logging and the
//! runtime, and calls the library.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::Command as Process;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use realm_common::auth::{check_exposure, Secret, API_KEY_ENV, CLUSTER_TOKEN_ENV};
use realm_common::chat::DEFAULT_SYSTEM_PROMPT;
use realm_common::generate::{Completion, Decoding, GenerationParams, DEFAULT_MAX_TOKENS};
use realm_common::logging::LogFormat;
use realm_common::sampling::SamplingParams;
use realm_common::synthetic::{self, SyntheticArch, SyntheticDType, SyntheticSpec};
use realm_common::tls::ClientTls;
use realm_common::wire::WireDType;
use realm_coordinator::bench::{
    bench_one, load_model, BenchConfig, BenchResult, BudgetSpec, MemoryConfig,
};
use realm_coordinator::cluster::{ClusterOptions, Liveness};
use realm_coordinator::local::LocalWorkers;
use realm_coordinator::progress;
use realm_coordinator::scheduler::{self, Scheduling};
use realm_coordinator::server::{self, ServerConfig};
use realm_coordinator::serving::{self, ClusterSpec, LoadResult, LoadSpec};
use realm_coordinator::{Cluster, LocalModel, PlanSpec, DEFAULT_MODEL};
use tokio::net::TcpListener;

/// mimalloc keeps freed memory for reuse: the large activation buffers of each step come back
/// without page faults, where glibc's allocator hands them to the OS and faults them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "realm-coordinator",
    version,
    about = "Realm: distributed LLM inference over GGUF models"
)]
struct Cli {
    /// Worker threads for the math (default: all cores).
    #[arg(long, global = true, env = "REALM_THREADS")]
    threads: Option<usize>,
    /// Threads for the network and the driving of steps (see `realm_common::runtime`). One
    /// keeps a step's hand-offs on one thread: each thread woken costs tens of µs where idle
    /// CPUs halt, as on virtual machines.
    #[arg(long, global = true, env = "REALM_ASYNC_THREADS", default_value_t = 1)]
    async_threads: usize,
    /// Log line format on stderr: `text` or `json` (one object per line, with the request id of
    /// every line about a request). The filter is `REALM_LOG` (default `warn`).
    #[arg(long, global = true, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion and stream it to stdout (only the completion; timings go to stderr).
    /// By default the layers run on in-process workers over loopback gRPC; --workers 0 runs
    /// them all in this process.
    Run(RunArgs),
    /// Serve the Realm gRPC API over workers started elsewhere (and, with --http-listen, the
    /// OpenAI-compatible HTTP API and Prometheus metrics).
    Serve(ServeArgs),
    /// Measure prefill and decode speed, per-hop overhead and memory for worker counts.
    Bench(BenchArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(TokenizeArgs),
    /// Compute perplexity over a text file (non-overlapping chunks, second half of each scored).
    Perplexity(PerplexityArgs),
    /// Write a synthetic llama model (random weights, byte-level tokenizer) of any size, for
    /// benchmarks of the Memory64 layer manager.
    Synth(SynthArgs),
}

#[derive(Args)]
struct ModelArg {
    /// GGUF model file.
    #[arg(long, env = "REALM_MODEL", default_value = DEFAULT_MODEL)]
    model: PathBuf,
}

/// How the layers are spread and how activations travel.
#[derive(Args)]
struct ClusterArgs {
    /// Layer placement: `auto` (by the memory workers report) or inclusive ranges in worker
    /// order, e.g. 0-14,15-29.
    #[arg(long, env = "REALM_PLAN", default_value = "auto", value_parser = parse_plan)]
    plan: PlanSpec,
    /// Element type of activations between coordinator and workers.
    #[arg(long, env = "REALM_WIRE_DTYPE", default_value = "f32", value_parser = parse_wire_dtype)]
    wire_dtype: WireDType,
}

fn parse_plan(s: &str) -> Result<PlanSpec, String> {
    s.parse()
        .map_err(|e: realm_coordinator::Error| e.to_string())
}

fn parse_wire_dtype(s: &str) -> Result<WireDType, String> {
    s.parse().map_err(|e: realm_common::Error| e.to_string())
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArg,
    /// In-process workers to spread the layers over (real gRPC over loopback); 0 runs the
    /// whole model in this process.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Render the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat; an empty string sends none (the template's own default applies).
    #[arg(long, default_value = DEFAULT_SYSTEM_PROMPT)]
    system: String,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Penalty for tokens among the last --repeat-last-n (1: off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Window of the repetition penalty, in tokens.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Text to tokenize.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    text: Option<String>,
    /// File whose contents to tokenize.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Do not add BOS even where the model adds it.
    #[arg(long)]
    no_bos: bool,
    /// Treat special-token text such as `<|im_start|>` as plain text.
    #[arg(long)]
    no_parse_special: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// GGUF model file to serve; repeat it for several models over the same workers
    /// (REALM_MODEL takes them comma-separated). Clients name a model by its file's stem.
    #[arg(
        long = "model",
        value_name = "PATH",
        env = "REALM_MODEL",
        value_delimiter = ',',
        default_value = DEFAULT_MODEL
    )]
    models: Vec<PathBuf>,
    /// A worker's address, `host:port` or `http://host:port`; repeat for each worker, in layer
    /// order (the environment variable takes them comma-separated).
    #[arg(
        long = "worker",
        value_name = "URL",
        env = "REALM_WORKERS",
        value_delimiter = ',',
        required = true
    )]
    workers: Vec<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Address to serve the Realm API on (port 0 picks a free one).
    #[arg(long, env = "REALM_LISTEN", default_value = "127.0.0.1:7000")]
    listen: String,
    /// Also serve the OpenAI-compatible HTTP API (`/v1/completions`, `/v1/chat/completions`,
    /// `/v1/models`), `/health` and Prometheus `/metrics` on this address (port 0 picks a free
    /// one). Default: no HTTP API.
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<String>,
    /// How long to keep retrying workers that are not reachable yet (0: fail at once).
    #[arg(long, env = "REALM_WORKER_WAIT_SECS", default_value_t = 60)]
    worker_wait_secs: u64,
    #[command(flatten)]
    scheduling: SchedulingArgs,
    #[command(flatten)]
    guard: GuardArgs,
}

/// How `serve` batches the steps of concurrent generations.
#[derive(Args)]
struct SchedulingArgs {
    /// Rows a step carries at most while any generation is decoding: one row per decoding
    /// generation first, then chunks of waiting prompts in the room left. Bounds how long
    /// running streams wait for a token while a long prompt is prefilled.
    #[arg(long, env = "REALM_STEP_TOKENS", default_value_t = scheduler::DEFAULT_STEP_TOKENS)]
    step_tokens: usize,
    /// The longest piece of one prompt a step carries (long prompts go in chunks).
    #[arg(long, env = "REALM_PREFILL_CHUNK", default_value_t = scheduler::DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// Micro-batches in flight at once, each with its share of the generations (default: one
    /// per worker, so every worker is busy).
    #[arg(long, env = "REALM_PIPELINE_DEPTH")]
    pipeline_depth: Option<usize>,
}

impl SchedulingArgs {
    fn scheduling(&self) -> Scheduling {
        Scheduling {
            step_tokens: self.step_tokens,
            prefill_chunk: self.prefill_chunk,
            pipeline_depth: self.pipeline_depth,
        }
    }
}

/// Authentication, failover and admission limits of `serve`.
#[derive(Args)]
struct GuardArgs {
    /// The cluster token the workers require, sent with every worker RPC.
    #[arg(long, env = CLUSTER_TOKEN_ENV, hide_env_values = true)]
    cluster_token: Option<Secret>,
    /// API key clients must send (repeat, or comma-separate in the variable, for several).
    /// Required to listen on a non-loopback address (unless --insecure).
    #[arg(long, env = API_KEY_ENV, hide_env_values = true, value_delimiter = ',')]
    api_key: Vec<Secret>,
    /// Listen on a non-loopback address without API keys.
    #[arg(long)]
    insecure: bool,
    /// A standby worker that takes over the layers of a worker that dies (repeatable).
    #[arg(long, value_name = "URL")]
    standby: Vec<String>,
    /// How often every worker's gRPC health is checked, each check answered within the same
    /// time (0: no checks). A worker that misses 3 in a row counts as hung: its steps fail and
    /// its layers fail over as a dead worker's, about 3 intervals after it stopped answering.
    #[arg(long, env = "REALM_HEALTH_INTERVAL_MS", default_value_t = 1000)]
    health_interval_ms: u64,
    /// The longest a worker's part of one step may take before the step fails over.
    #[arg(long, env = "REALM_STEP_TIMEOUT_SECS", default_value_t = 60)]
    step_timeout_secs: u64,
    /// Generations running at once.
    #[arg(long, default_value_t = realm_coordinator::admission::DEFAULT_MAX_ACTIVE)]
    max_active: usize,
    /// Generations waiting for a slot; beyond, requests are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = realm_coordinator::admission::DEFAULT_MAX_QUEUED)]
    max_queued: usize,
    /// TLS certificate chain (PEM) for the client API; needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the client API.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that signed the certificates of `https://` workers.
    #[arg(long, value_name = "PEM")]
    worker_ca: Option<PathBuf>,
    /// This coordinator's certificate (PEM) for workers that require mutual TLS.
    #[arg(long, value_name = "PEM", requires_all = ["worker_key", "worker_ca"])]
    worker_cert: Option<PathBuf>,
    /// The private key (PEM) of --worker-cert.
    #[arg(long, value_name = "PEM", requires = "worker_cert")]
    worker_key: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Worker counts to measure, each in its own process; 0 is the single-process mode.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3")]
    workers: Vec<usize>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to generate (greedy; fewer if the model ends the text).
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Element type of activations between coordinator and workers.
    #[arg(long, env = "REALM_WIRE_DTYPE", default_value = "f32", value_parser = parse_wire_dtype)]
    wire_dtype: WireDType,
    /// Memory budgets of the in-process workers' layer managers, each measured with every
    /// --prefetch: `full` (no budget), `N%` of the layer bytes per worker, `1layer` (the largest
    /// layer) or a size such as `48MiB`. Without it, the workers keep their shards resident.
    #[arg(long, value_delimiter = ',')]
    memory_budgets: Vec<BudgetSpec>,
    /// Layers prefetched ahead, for each of --memory-budgets.
    #[arg(long, value_delimiter = ',', default_values_t = [realm_worker::DEFAULT_PREFETCH])]
    prefetch: Vec<usize>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Serving benchmark: streaming clients sending at once over the OpenAI-compatible HTTP API,
    /// each load in turn (e.g. 1,4,16), against a Realm cluster of processes started for each
    /// --workers count of 1 or more (--threads per worker), or against --server.
    /// --gen-tokens is each request's max_tokens.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Serving benchmark: requests each client sends, one after the other.
    #[arg(long, default_value_t = 4, requires = "concurrency")]
    requests_per_client: usize,
    /// Serving benchmark: once every client has its first token, one more client sends a
    /// prompt of about this many tokens, and the streams' inter-token gaps during its prefill
    /// are reported.
    #[arg(long, requires = "concurrency")]
    long_prompt_tokens: Option<usize>,
    /// Serving benchmark: drive this running OpenAI-compatible server (`http://host:port`, e.g.
    /// llama.cpp's llama-server) instead of starting a Realm cluster.
    #[arg(long, value_name = "URL", requires = "concurrency")]
    server: Option<String>,
    /// Serving benchmark: the API key --server wants (unused without --server; not required
    /// with it, so the variable set for a client never breaks another benchmark).
    #[arg(long, env = API_KEY_ENV, hide_env_values = true)]
    api_key: Option<String>,
    /// Serving benchmark: compute threads of the Realm coordinator process.
    #[arg(long, default_value_t = realm_coordinator::serving::DEFAULT_COORDINATOR_THREADS)]
    coordinator_threads: usize,
}

#[derive(Args)]
struct SynthArgs {
    /// Where to write the GGUF file.
    #[arg(long)]
    out: PathBuf,
    /// Architecture: llama, llama3 (rope_freqs, 128-dimension heads), mixtral (llama with
    /// experts), qwen2, qwen3, qwen3moe, phi3 or gemma2. Without shape flags, the small model
    /// of the agreement fixtures.
    #[arg(long, value_parser = parse_synthetic_arch)]
    arch: Option<SyntheticArch>,
    /// Transformer blocks.
    #[arg(long)]
    layers: Option<usize>,
    /// Hidden width (a multiple of 32, of 256 for q4_k_m).
    #[arg(long)]
    d_model: Option<usize>,
    /// MLP width (each expert's, with experts); default 4 × --d-model for llama.
    #[arg(long)]
    ffn: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    heads: Option<usize>,
    /// Key/value heads (divide --heads).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Dimensions per head; default --d-model / --heads (the architecture's fixture model's
    /// without --d-model and --heads).
    #[arg(long)]
    head_dim: Option<usize>,
    /// Experts per block and experts per token (architectures with experts).
    #[arg(long)]
    experts: Option<usize>,
    #[arg(long)]
    experts_used: Option<usize>,
    /// Vocabulary size (at least 257: 256 bytes and <|endoftext|>).
    #[arg(long)]
    vocab: Option<usize>,
    /// Context length the model declares.
    #[arg(long)]
    context: Option<usize>,
    /// Weight format of the matrices: q4_0, q8_0 or q4_k_m.
    #[arg(long, default_value = "q8_0", value_parser = parse_synthetic_dtype)]
    dtype: SyntheticDType,
    /// Seed of the random weights (the same spec and seed give the same file).
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
}

fn parse_synthetic_dtype(s: &str) -> Result<SyntheticDType, String> {
    SyntheticDType::parse(s).map_err(|e| e.to_string())
}

fn parse_synthetic_arch(s: &str) -> Result<SyntheticArch, String> {
    SyntheticArch::parse(s).map_err(|e| e.to_string())
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Text file to score.
    #[arg(long)]
    file: PathBuf,
    /// Chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    realm_common::logging::init(cli.log_format, "warn");
    if let Some(threads) = cli.threads {
        // Read by the math library's thread pool when it first starts, which is after this.
        std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string());
    }
    let threads = cli.threads.unwrap_or_else(default_threads).max(1);
    ASYNC_THREADS
        .set(cli.async_threads.max(1))
        .expect("set once, at start");
    match cli.command {
        Command::Run(args) if args.workers == 0 => run(args),
        Command::Run(args) => on_runtime(run_cluster(args, threads)),
        Command::Serve(args) => runtime()?.block_on(serve(args)),
        Command::Bench(args) => bench(args, threads),
        Command::Tokenize(args) => tokenize(args),
        Command::Perplexity(args) => perplexity(args),
        Command::Synth(args) => synth(args),
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `--async-threads`, for every runtime this process starts.
static ASYNC_THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(ASYNC_THREADS.get().copied().unwrap_or(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Runs `command` as a task on a fresh runtime's worker threads rather than on this thread: a
/// future driven by `block_on` is woken across threads every time it awaits a worker's reply
/// (each hop of each step), where a task is woken on the thread that received the reply.
fn on_runtime<T: Send + 'static>(
    command: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    runtime()?.block_on(async {
        tokio::spawn(command)
            .await
            .context("the command's task failed")?
    })
}

fn generation_params(args: &RunArgs) -> GenerationParams {
    GenerationParams {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            repeat_last_n: args.repeat_last_n,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop: args.stop.clone(),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let model = LocalModel::load(&args.model.model)?;
    let params = generation_params(&args);
    let mut stdout = std::io::stdout().lock();
    let chat = args.chat.then_some(args.system.as_str());
    let completion = model.complete(&args.prompt, chat, &params, &mut stdout)?;
    writeln!(stdout).context("cannot write the completion")?;
    print_usage(&completion);
    Ok(())
}

/// `run` over in-process workers: same output as the single-process path.
async fn run_cluster(args: RunArgs, threads: usize) -> anyhow::Result<()> {
    let model = progress::step_on_terminal(
        &format!("loading {}", args.model.model.display()),
        load_model(&args.model.model),
    )
    .await?;
    // The request is checked before any worker starts.
    let chat = args.chat.then_some(args.system.as_str());
    let tokens = model.prompt_tokens(&args.prompt, chat)?;
    let decoding = Decoding::new(
        &model.tokenizer,
        tokens,
        &generation_params(&args),
        model.config.context_length,
    )?;

    let workers = LocalWorkers::start(&args.model.model, args.workers, threads).await?;
    let cluster = match progress::step_on_terminal(
        &format!("assigning shards to {} workers", args.workers),
        Cluster::connect(
            model,
            workers.urls(),
            &args.cluster.plan,
            args.cluster.wire_dtype,
        ),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return Err(workers.fail(e.into()).await),
    };
    tracing::info!(plan = %cluster.plan(), "cluster ready");

    // Not locked across the generation: the callback must be `Send`.
    let mut stdout = std::io::stdout();
    let mut write_error = None;
    let generation = cluster
        .run(decoding, std::time::Instant::now(), |delta| {
            match stdout
                .write_all(delta.text.as_bytes())
                .and_then(|_| stdout.flush())
            {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    write_error = Some(e);
                    ControlFlow::Break(())
                }
            }
        })
        .await;
    cluster.shutdown().await;
    let stopped = workers.stop().await;
    if let Some(e) = write_error {
        return Err(e).context("cannot write the completion");
    }
    let generation = generation?;
    stopped?;
    writeln!(stdout).context("cannot write the completion")?;
    print_usage(&generation.completion);
    Ok(())
}

fn print_usage(completion: &Completion) {
    let u = &completion.usage;
    eprintln!(
        "[{} prompt tokens, {} generated, finish {}; time to first token {:.0} ms, prefill {:.1} tok/s, decode {:.1} tok/s]",
        u.prompt_tokens,
        u.generated_tokens,
        completion.finish.as_str(),
        u.time_to_first_token.as_secs_f64() * 1e3,
        u.prefill_tokens_per_second(),
        u.decode_tokens_per_second(),
    );
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let guard = args.guard;
    let scheduling = args.scheduling.scheduling();
    scheduling.check()?;
    anyhow::ensure!(
        guard.step_timeout_secs > 0,
        "--step-timeout-secs must be at least 1"
    );
    let liveness = Liveness {
        health_interval: (guard.health_interval_ms > 0)
            .then(|| Duration::from_millis(guard.health_interval_ms)),
        step_timeout: Duration::from_secs(guard.step_timeout_secs),
    };
    // Checked before binding: an open API is never reachable, not even for a moment.
    for listen in std::iter::once(&args.listen).chain(&args.http_listen) {
        for addr in tokio::net::lookup_host(listen)
            .await
            .with_context(|| format!("cannot resolve {listen}"))?
        {
            check_exposure(
                addr,
                !guard.api_key.is_empty(),
                guard.insecure,
                "Give clients an API key (REALM_API_KEY or --api-key)",
            )
            .map_err(anyhow::Error::msg)?;
        }
    }
    // Bound first, so a taken port fails before any worker loads a shard.
    let grpc = TcpListener::bind(&args.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (is another coordinator running? choose another --listen)",
            args.listen
        )
    })?;
    let http =
        match &args.http_listen {
            Some(http) => Some(TcpListener::bind(http).await.with_context(|| {
                format!("cannot listen on {http} (choose another --http-listen)")
            })?),
            None => None,
        };
    let worker_tls = match &guard.worker_ca {
        Some(ca) => Some(
            ClientTls::new(
                ca,
                guard
                    .worker_cert
                    .as_deref()
                    .zip(guard.worker_key.as_deref()),
            )
            .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let addrs = (
        grpc.local_addr()?,
        http.as_ref().map(TcpListener::local_addr).transpose()?,
    );
    let config = ServerConfig {
        plans: vec![args.cluster.plan],
        wire_dtype: args.cluster.wire_dtype,
        worker_wait: Duration::from_secs(args.worker_wait_secs),
        cluster: ClusterOptions {
            token: guard.cluster_token,
            standby: guard.standby,
            tls: worker_tls,
            liveness,
        },
        scheduling,
        api_keys: guard.api_key,
        max_active: guard.max_active,
        max_queued: guard.max_queued,
        tls: guard.tls_cert.zip(guard.tls_key),
        ..ServerConfig::new(args.models, args.workers)
    };
    let ready = |models: &realm_coordinator::Models| {
        for served in models.all() {
            eprintln!("  {}:", served.id());
            for (worker, range) in served.cluster.workers() {
                eprintln!("    {} serves layers {range}", worker.url);
            }
        }
        let mut stdout = std::io::stdout().lock();
        if let Some(http) = addrs.1 {
            let _ = writeln!(stdout, "realm-coordinator serving HTTP on {http}");
        }
        let _ = writeln!(stdout, "realm-coordinator listening on {}", addrs.0)
            .and_then(|_| stdout.flush());
    };
    let listeners = server::Listeners { grpc, http };
    server::run(
        config,
        listeners,
        ready,
        realm_coordinator::shutdown_signal(),
    )
    .await
}

/// One configuration (worker count, budget, prefetch) runs here; several run each in a fresh
/// process of this binary, so peak memory and warm caches do not leak from one configuration
/// into the next.
fn bench(args: BenchArgs, threads: usize) -> anyhow::Result<()> {
    if !args.concurrency.is_empty() {
        return serving_bench(args, threads);
    }
    let print = |r: &BenchResult| {
        if args.json {
            println!("{}", r.to_json());
        } else {
            println!("{r}");
        }
    };
    let memories: Vec<Option<MemoryConfig>> = if args.memory_budgets.is_empty() {
        vec![None]
    } else {
        anyhow::ensure!(!args.prefetch.is_empty(), "--prefetch needs a value");
        args.memory_budgets
            .iter()
            .flat_map(|&budget| {
                args.prefetch
                    .iter()
                    .map(move |&prefetch| Some(MemoryConfig { budget, prefetch }))
            })
            .collect()
    };
    let model = &args.model.model;
    let configs: Vec<BenchConfig> = args
        .workers
        .iter()
        .flat_map(|&workers| {
            // Without workers there is no layer manager: the single-process mode runs once.
            let memories = if workers == 0 {
                &[None][..]
            } else {
                &memories[..]
            };
            memories.iter().map(move |&memory| BenchConfig {
                model: model.clone(),
                workers,
                prompt_tokens: args.prompt_tokens,
                gen_tokens: args.gen_tokens,
                threads,
                wire_dtype: args.wire_dtype,
                memory,
            })
        })
        .collect();
    if let [config] = &configs[..] {
        let config = config.clone();
        let result = on_runtime(async move { bench_one(&config).await })?;
        print(&result);
        return Ok(());
    }
    let exe = std::env::current_exe().context("cannot find this executable")?;
    for config in &configs {
        let mut child = Process::new(&exe);
        child
            .arg("--threads")
            .arg(threads.to_string())
            .arg("--async-threads")
            .arg(ASYNC_THREADS.get().copied().unwrap_or(1).to_string())
            .arg("bench")
            .arg("--model")
            .arg(&config.model)
            .arg("--workers")
            .arg(config.workers.to_string())
            .arg("--prompt-tokens")
            .arg(config.prompt_tokens.to_string())
            .arg("--gen-tokens")
            .arg(config.gen_tokens.to_string())
            .arg("--wire-dtype")
            .arg(config.wire_dtype.name())
            .arg("--json");
        if let Some(m) = config.memory {
            child
                .arg("--memory-budgets")
                .arg(m.budget.to_string())
                .arg("--prefetch")
                .arg(m.prefetch.to_string());
        }
        let what = match config.memory {
            None => format!("{} workers", config.workers),
            Some(m) => format!(
                "{} workers, budget {}, prefetch {}",
                config.workers, m.budget, m.prefetch
            ),
        };
        let output = child
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("cannot start a benchmark process")?;
        anyhow::ensure!(
            output.status.success(),
            "the benchmark with {what} failed ({})",
            output.status
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let result = stdout
            .lines()
            .last()
            .and_then(|line| serde_json::from_str(line).ok())
            .and_then(|v| BenchResult::from_json(&v))
            .with_context(|| format!("unexpected benchmark output: {stdout}"))?;
        print(&result);
    }
    Ok(())
}

/// `bench --concurrency`: the serving benchmark, over --server or a Realm cluster per worker count.
fn serving_bench(args: BenchArgs, threads: usize) -> anyhow::Result<()> {
    let loads: Vec<LoadSpec> = args
        .concurrency
        .iter()
        .map(|&concurrency| LoadSpec {
            concurrency,
            requests_per_client: args.requests_per_client,
            gen_tokens: args.gen_tokens,
            long_prompt_tokens: args.long_prompt_tokens,
        })
        .collect();
    let print = |r: &LoadResult| {
        if args.json {
            println!("{}", r.to_json());
        } else {
            println!("{r}");
        }
    };
    if let Some(url) = args.server.clone() {
        let api_key = args.api_key.clone();
        let gen_tokens = args.gen_tokens;
        let results = on_runtime(async move {
            serving::warm_up(&url, api_key.as_deref(), gen_tokens).await?;
            let mut results = Vec::with_capacity(loads.len());
            for load in &loads {
                results.push(serving::drive(&url, api_key.as_deref(), load).await?);
            }
            Ok(results)
        })?;
        results.iter().for_each(print);
        return Ok(());
    }
    let counts: Vec<usize> = args.workers.iter().copied().filter(|&w| w > 0).collect();
    anyhow::ensure!(
        !counts.is_empty(),
        "the serving benchmark needs --workers 1 or more (or --server URL)"
    );
    for workers in counts {
        let cluster = ClusterSpec {
            model: args.model.model.clone(),
            workers,
            threads,
            coordinator_threads: args.coordinator_threads.max(1),
        };
        let loads = loads.clone();
        let results = on_runtime(async move { serving::bench_cluster(&cluster, &loads).await })?;
        results.iter().for_each(print);
    }
    Ok(())
}

fn synth(args: SynthArgs) -> anyhow::Result<()> {
    let base = match args.arch {
        Some(arch) => SyntheticSpec::fixture(arch, args.dtype),
        None => SyntheticSpec {
            vocab: 512,
            ..SyntheticSpec::small(4, 256, args.dtype)
        },
    };
    let d_model = args.d_model.unwrap_or(base.d_model);
    let spec = SyntheticSpec {
        n_layers: args.layers.unwrap_or(base.n_layers),
        d_model,
        ffn_dim: args.ffn.unwrap_or(match args.arch {
            None => 4 * d_model,
            Some(_) => base.ffn_dim,
        }),
        n_heads: args.heads.unwrap_or(base.n_heads),
        n_kv_heads: args.kv_heads.unwrap_or(base.n_kv_heads),
        // A new width or head count without --head-dim divides the width evenly.
        head_dim: args
            .head_dim
            .unwrap_or(if args.d_model.is_some() || args.heads.is_some() {
                0
            } else {
                base.head_dim
            }),
        experts: args.experts.unwrap_or(base.experts),
        experts_used: args.experts_used.unwrap_or(base.experts_used),
        vocab: args.vocab.unwrap_or(base.vocab),
        context_length: args.context.unwrap_or(base.context_length),
        seed: args.seed,
        ..base
    };
    synthetic::write(&args.out, &spec)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let bytes = std::fs::metadata(&args.out)
        .with_context(|| format!("cannot read {}", args.out.display()))?
        .len();
    println!(
        "{}: {bytes} bytes ({:.1} MiB)",
        args.out.display(),
        bytes as f64 / (1 << 20) as f64,
    );
    Ok(())
}

fn tokenize(args: TokenizeArgs) -> anyhow::Result<()> {
    let file = realm_coordinator::open_model_file(&args.model.model)?;
    let tokenizer = realm_common::tokenizer::Tokenizer::from_gguf(&file)?;
    let text = match (args.text, args.file) {
        (Some(text), _) => text,
        (None, Some(path)) => std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        (None, None) => anyhow::bail!("give --text or --file"),
    };
    let ids = tokenizer.encode(&text, !args.no_bos, !args.no_parse_special)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

fn perplexity(args: PerplexityArgs) -> anyhow::Result<()> {
    let model = LocalModel::load(&args.model.model)?;
    let report = model.perplexity(&args.file, args.ctx, |chunk, ppl| {
        eprintln!("[chunk {}] running PPL = {ppl:.4}", chunk + 1);
    })?;
    println!(
        "{} chunks of {} tokens, {} tokens scored",
        report.chunks, report.ctx, report.scored_tokens
    );
    println!("PPL = {:.4}", report.perplexity());
    Ok(())
}
