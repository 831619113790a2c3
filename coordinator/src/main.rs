//! `realm-coordinator`: command-line entry point.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use realm_common::chat::DEFAULT_SYSTEM_PROMPT;
use realm_common::generate::{GenerationParams, DEFAULT_MAX_TOKENS};
use realm_common::sampling::SamplingParams;
use realm_coordinator::{LocalModel, DEFAULT_MODEL};

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion and stream it to stdout (only the completion; timings go to stderr).
    Run(RunArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(TokenizeArgs),
    /// Compute perplexity over a text file (non-overlapping chunks, second half of each scored).
    Perplexity(PerplexityArgs),
}

#[derive(Args)]
struct ModelArg {
    /// GGUF model file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArg,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REALM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(threads) = cli.threads {
        // Read by the math library's thread pool when it first starts, which is after this.
        std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string());
    }
    match cli.command {
        Command::Run(args) => run(args),
        Command::Tokenize(args) => tokenize(args),
        Command::Perplexity(args) => perplexity(args),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let model = LocalModel::load(&args.model.model)?;
    let params = GenerationParams {
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
        stop: args.stop,
    };
    let mut stdout = std::io::stdout().lock();
    let chat = args.chat.then_some(args.system.as_str());
    let completion = model.complete(&args.prompt, chat, &params, &mut stdout)?;
    writeln!(stdout).context("cannot write the completion")?;
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
