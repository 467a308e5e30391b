//! `palm`: PaLM + RLHF from the command line. Each subcommand lives in `cmd/<name>.rs`.
//! stdout carries data (completions, JSON results); stderr carries progress and logs.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod cmd;

/// mimalloc keeps freed memory for reuse: candle allocates every op's output afresh, and with
/// glibc's malloc each large buffer was a new mmap (page faults and zeroing: a third of a training
/// step in the profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (index 15 in both its v2 and v3 headers; the Rust
/// bindings do not name it). -1: never hand freed pages back to the OS. The default (10 ms)
/// returned them between steps, and the next step paid a page fault and the zeroing of a huge
/// page for each: twice the time of a PPO iteration. The environment variable, when set, wins.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

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
    /// Generate text from a prompt, streamed to stdout (`--chat`: through the chat template).
    Generate(cmd::generate::Args),
    /// Chat with a model through its chat template (one user turn a line of stdin).
    Chat(cmd::chat::Args),
    /// Print the ids a model's tokenizer gives a text (JSON array on stdout).
    Tokenize(cmd::tokenize::Args),
    /// Write a model (LoRA merged) as a Hugging Face directory or a GGUF file.
    Export(cmd::export::Args),
    /// Measure throughput: train, sample, decode, reward, ppo (JSON lines on stdout).
    Bench(cmd::bench::Args),
    /// Pre-train on text or fine-tune on JSONL (SFT), full model or a LoRA scope; resumable.
    Train(cmd::train::Args),
    /// Reward model: train on preference pairs, evaluate, score.
    Reward(cmd::reward::Args),
    /// PPO against a reward model (LoRA or full actor, LoRA critic, frozen reference).
    Ppo(Box<cmd::ppo::Args>),
    /// Online RL: PPO, GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++ (against a reward model, a judge
    /// or a verifiable task).
    Rl(Box<cmd::rl::Args>),
    /// Direct preference optimisation (DPO, IPO, robust, hinge, SimPO, ORPO) on preference pairs.
    Dpo(Box<cmd::dpo::Args>),
    /// The whole RLHF pipeline on a built-in task, in minutes on a CPU.
    Quickstart(cmd::quickstart::Args),
    /// Serve a model: an OpenAI-compatible API and web pages to chat, rank replies and write
    /// demonstrations (stored in SQLite or PostgreSQL).
    Serve(Box<cmd::serve::Args>),
    /// People's feedback from `palm serve`: accounts, prompts, exports for training.
    Feedback(cmd::feedback::Args),
}

fn main() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a documented mimalloc option before any threads start.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    // negative numbers are values, not flags (`--clip-low -0.2`, `--seed -1` gets clap's range error)
    let matches = Cli::command().mut_subcommands(negatives).get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Train(a), Some(("train", m))) = (&mut cli.command, matches.subcommand()) {
        a.explicit = explicit_flags(m);
    }
    // under `mpirun -n N`: MPI first (before threads start); ranks other than 0 log warnings only
    let comm = palm::dist::init_from_env().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    let level = if comm.rank() == 0 {
        cli.log.as_str()
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // colour only on a terminal (and never with NO_COLOR): logs sent to a file stay plain text
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let command = cli.command;
    if comm.world_size() > 1 {
        tracing::info!("{}", comm.describe());
    }
    let result = match command {
        _ if comm.world_size() > 1 && !data_parallel(&command) => Err(anyhow::anyhow!(
            "this command runs in one process; under mpirun (here {} processes) palm runs \
             `train`, `reward train`, `dpo`, `rl` and `ppo`",
            comm.world_size()
        )),
        // async commands: their own runtime; the server's engine thread joins rayon's pool itself
        Command::Serve(a) => cmd::serve::run(*a),
        Command::Feedback(a) => cmd::feedback::run(a),
        other => run_on_pool(other),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        // Print each cause once: library errors often already end with their source's text.
        let mut shown = e.to_string();
        for cause in e.chain().skip(1) {
            let c = cause.to_string();
            if !shown.ends_with(&c) {
                eprintln!("  caused by: {c}");
            }
            shown = c;
        }
        // no MPI_Finalize: mpirun sees the failed rank and ends the others
        std::process::exit(1);
    }
    palm::dist::finalize();
}

/// The commands that run data-parallel under `mpirun -n N`.
fn data_parallel(c: &Command) -> bool {
    match c {
        Command::Train(_)
        | Command::Dpo(_)
        | Command::Rl(_)
        | Command::Ppo(_)
        | Command::Info(_) => true,
        Command::Reward(a) => matches!(a.command, cmd::reward::RewardCommand::Train(_)),
        _ => false,
    }
}

/// Lets a command and all its subcommands take negative numbers as values.
fn negatives(c: clap::Command) -> clap::Command {
    c.allow_negative_numbers(true).mut_subcommands(negatives)
}

/// The ids of the arguments given on the command line (not those left at their defaults).
fn explicit_flags(m: &clap::ArgMatches) -> Vec<String> {
    m.ids()
        .filter(|id| m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect()
}

/// Runs a command on a worker of rayon's pool: every parallel op forks from inside it (see
/// `palm::ops::on_rayon_worker`).
fn run_on_pool(command: Command) -> anyhow::Result<()> {
    palm::ops::on_rayon_worker(move || match command {
        Command::Info(a) => cmd::info::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::Tokenize(a) => cmd::tokenize::run(a),
        Command::Export(a) => cmd::export::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Reward(a) => cmd::reward::run(a),
        Command::Ppo(a) => cmd::ppo::run(*a),
        Command::Rl(a) => cmd::rl::run(*a),
        Command::Dpo(a) => cmd::dpo::run(*a),
        Command::Quickstart(a) => cmd::quickstart::run(a),
        Command::Serve(_) | Command::Feedback(_) => Err(anyhow::anyhow!(
            "serve and feedback run on their own runtime"
        )),
    })
}
