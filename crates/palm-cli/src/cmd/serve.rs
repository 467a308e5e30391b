//! `palm serve`: the OpenAI-compatible API and the feedback web app (chat, ranking,
//! demonstrations, admin) over one model, stored in SQLite or PostgreSQL.

use std::path::PathBuf;

use anyhow::{Context, Result};
use palm_serve::server::{start_with_reward, RewardFn, ServeConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file, a Hugging Face model directory or a checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The database: `sqlite://FILE` (created if missing) or `postgres://USER@HOST/DB`.
    #[arg(long, default_value = "sqlite://palm-feedback.sqlite")]
    pub db: String,
    /// Address to listen on (loopback by default; put a TLS proxy in front to expose it).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// A reward model (`palm reward train` output) that scores every labelling reply; the scores
    /// are stored with the replies and never shown to labellers.
    #[arg(long)]
    pub reward: Option<String>,
    /// Prompts to import for labelling: JSONL with `prompt` (or `messages`), or one per line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// A second model to compare with: served beside the first (pick it with the request's
    /// `model`), and about half of every labelling task's replies come from it, shuffled.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// The model's id in the API (default: the file or folder name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Override the tokenizer (`bytes`, a tokenizer.json or a llama2.c .bin).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Most requests waiting beyond a full batch (more get 503).
    #[arg(long, default_value_t = 32)]
    pub queue: usize,
    /// Largest request body, in bytes (larger gets 413).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body: usize,
    /// `max_tokens` of a request that gives none (capped by the context).
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Replies sampled for each ranking task (2-4).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=4))]
    pub replies: u64,
    /// Labellers per task (2 or more gives agreement between labellers).
    #[arg(long, default_value_t = 2)]
    pub overlap: usize,
    /// Temperature of the labelling replies.
    #[arg(long, default_value_t = 1.0)]
    pub label_temperature: f32,
    /// Longest labelling reply, in tokens.
    #[arg(long, default_value_t = 200)]
    pub label_max_tokens: usize,
}

pub fn run(a: Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(a))
}

/// `--reward`: the reward model as a scoring function of (prompt ids, reply ids).
fn reward_fn(arg: &str, model: &std::path::Path, tokenizer: Option<&str>) -> Result<RewardFn> {
    let tok = super::resolve_tokenizer(tokenizer, model)?;
    let (scorer, vocab) = super::ppo::load_reward(arg, &tok)?;
    if let Some(v) = vocab {
        anyhow::ensure!(
            tok.vocab_size() <= v,
            "--reward {arg}: its vocabulary ({v}) is smaller than the model's tokenizer ({})",
            tok.vocab_size()
        );
    }
    let f = move |p: &[u32], r: &[u32]| -> std::result::Result<f32, String> {
        let s = scorer
            .score(&[p.to_vec()], &[r.to_vec()])
            .map_err(|e| e.to_string())?;
        s.first()
            .copied()
            .ok_or_else(|| "the reward model gave no score".to_string())
    };
    Ok(std::sync::Arc::new(std::sync::Mutex::new(f)))
}

async fn serve(a: Args) -> Result<()> {
    let mut cfg = ServeConfig::new(a.model.clone(), a.db.clone());
    cfg.model_name = a.model_name;
    cfg.tokenizer = a.tokenizer;
    cfg.host = a.host;
    cfg.port = a.port;
    cfg.prompts = a.prompts;
    cfg.compare = a.compare;
    cfg.max_batch = a.max_batch;
    cfg.queue = a.queue;
    cfg.max_body = a.max_body;
    cfg.default_max_tokens = a.default_max_tokens;
    cfg.replies = a.replies as usize;
    cfg.overlap = a.overlap;
    cfg.label_temperature = a.label_temperature;
    cfg.label_max_tokens = a.label_max_tokens;
    let reward = match &a.reward {
        Some(r) => Some(reward_fn(r, &a.model, cfg.tokenizer.as_deref())?),
        None => None,
    };
    let running = start_with_reward(cfg, reward).await?;
    let store = &running.state.store;
    if store.list_users().await?.is_empty() {
        let (user, token) = store.add_user("admin", true).await?;
        eprintln!(
            "no users yet: created the admin account `{}`; its token (shown once) is\n    {token}\n\
             log in with it at the pages, or send `Authorization: Bearer TOKEN`; add labellers at /admin \
             or with `palm feedback user add NAME --db {}`",
            user.name, a.db
        );
    }
    let ids: Vec<String> = running
        .state
        .models
        .iter()
        .map(|m| format!("`{}`", m.id))
        .collect();
    eprintln!(
        "palm serve: model {} on http://{} (chat /, label /label, write /write, admin /admin, OpenAI API /v1); Ctrl-C stops",
        ids.join(" and "),
        running.addr
    );
    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            r.context("waiting for Ctrl-C")?;
            eprintln!("stopping: finishing the requests in flight");
            running.stop().await?;
        }
    }
    Ok(())
}
