//! `palm`: PaLM + RLHF from the command line. Each subcommand lives in `cmd/<name>.rs`.
//! stdout carries data (completions, JSON results); stderr carries progress and logs.

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser, Debug)]
#[command(
    name = "palm",
    version,
    about = "PaLM + RLHF in Rust: pre-train, fine-tune, reward-model, PPO, generate",
    long_about = "PaLM + RLHF in Rust.\n\nStart with `palm quickstart`: the whole RLHF pipeline on a built-in task, in minutes on a CPU."
)]
struct Cli {
    /// Log level for stderr (error, warn, info, debug, trace); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a model's config and parameter count (JSON on stdout).
    Info(cmd::info::Args),
    /// Generate text from a prompt, streamed to stdout.
    Generate(cmd::generate::Args),
    /// PPO against a reward model (LoRA actor and critic, frozen reference).
    Ppo(Box<cmd::ppo::Args>),
    /// The whole RLHF pipeline on a built-in task, in minutes on a CPU.
    Quickstart(cmd::quickstart::Args),
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let result = match cli.command {
        Command::Info(a) => cmd::info::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Ppo(a) => cmd::ppo::run(*a),
        Command::Quickstart(a) => cmd::quickstart::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}
