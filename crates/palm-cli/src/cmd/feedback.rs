//! `palm feedback`: accounts, prompt import and exports of the people's labels
//! (`palm serve`'s database) as training data.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use palm_serve::labels::{export_lines, jsonl, ExportKind};
use palm_serve::store::{redact_url, Store};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Labeller accounts.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Import prompts to label (JSONL with `prompt` or `messages`, or one per line).
    Prompts {
        /// The database: `sqlite://FILE` or `postgres://...`.
        #[arg(long)]
        db: String,
        file: PathBuf,
    },
    /// Export rankings as preference pairs, or demonstrations as SFT data (JSONL).
    Export {
        /// The database: `sqlite://FILE` or `postgres://...`.
        #[arg(long)]
        db: String,
        /// Output file (`-` for stdout).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = Kind::Pairs)]
        kind: Kind,
        /// Keep only tasks ranked by 2+ labellers whose mean pairwise agreement is at least X.
        #[arg(long)]
        min_agreement: Option<f64>,
    },
    /// Agreement between labellers on shared tasks (JSON).
    Agreement {
        /// The database: `sqlite://FILE` or `postgres://...`.
        #[arg(long)]
        db: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum UserCommand {
    /// Add a user and print their token on stdout (shown once; only its hash is stored).
    Add {
        name: String,
        /// The database: `sqlite://FILE` or `postgres://...`.
        #[arg(long)]
        db: String,
        /// The user can manage users and prompts, and export.
        #[arg(long)]
        admin: bool,
    },
    /// List users with their counts (JSON lines).
    List {
        /// The database: `sqlite://FILE` or `postgres://...`.
        #[arg(long)]
        db: String,
    },
}

impl From<Kind> for ExportKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Pairs => ExportKind::Pairs,
            Kind::Sft => ExportKind::Sft,
        }
    }
}

/// `--kind`: what to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// `{"prompt", "chosen", "rejected"}` per ordered pair of each ranking (for `palm reward
    /// train` and `palm dpo`).
    Pairs,
    /// `{"messages": [...]}` per written demonstration (for `palm train`).
    Sft,
}

pub fn run(a: Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(dispatch(a.command))
}

async fn open(db: &str) -> Result<Store> {
    Store::open(db)
        .await
        .with_context(|| format!("opening the database {}", redact_url(db)))
}

async fn dispatch(c: Command) -> Result<()> {
    match c {
        Command::User {
            command: UserCommand::Add { name, db, admin },
        } => {
            let store = open(&db).await?;
            let (user, token) = store.add_user(name.trim(), admin).await?;
            println!("{token}");
            eprintln!(
                "added {} `{}`; hand the token over privately: it is not shown again",
                if user.admin { "admin" } else { "labeller" },
                user.name
            );
        }
        Command::User {
            command: UserCommand::List { db },
        } => {
            for u in open(&db).await?.list_users().await? {
                println!("{}", serde_json::to_string(&u)?);
            }
        }
        Command::Prompts { db, file } => {
            let texts = palm_serve::labels::read_prompts(&file).map_err(anyhow::Error::msg)?;
            let added = open(&db)
                .await?
                .add_prompts(&texts, &file.display().to_string())
                .await?;
            eprintln!("{}: {} prompts, {added} new", file.display(), texts.len());
        }
        Command::Export {
            db,
            out,
            kind,
            min_agreement,
        } => {
            let store = open(&db).await?;
            let lines = export_lines(&store, kind.into(), min_agreement)
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            write_lines(&out, &lines)?;
            eprintln!(
                "wrote {} {} records to {}",
                lines.len(),
                ExportKind::from(kind).name(),
                out.display()
            );
        }
        Command::Agreement { db } => {
            let a = open(&db).await?.agreement().await?;
            println!("{}", serde_json::to_string_pretty(&a)?);
        }
    }
    Ok(())
}

/// Writes JSONL to `out` (atomically for a file) or stdout for `-`.
fn write_lines(out: &Path, lines: &[String]) -> Result<()> {
    let text = jsonl(lines);
    if out.as_os_str() == "-" {
        std::io::stdout().write_all(text.as_bytes())?;
        return Ok(());
    }
    palm::checkpoint::write_atomic(out, text.as_bytes())
        .with_context(|| format!("writing {}", out.display()))
}

/// Whether a `--data` value names a feedback database rather than a file.
fn is_db_url(p: &Path) -> bool {
    let s = p.to_string_lossy();
    s.starts_with("sqlite:") || s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// `--data` values that are database URLs (`sqlite://...`, `postgres://...`) become a JSONL
/// snapshot in the run directory (`feedback-pairs-I.jsonl` / `feedback-sft-I.jsonl`): the
/// rankings as pairs, or the demonstrations as messages. A snapshot that exists is reused, so a
/// resumed run trains on the same data even if labels arrived since. Files pass through.
pub fn materialise(data: &[PathBuf], kind: Kind, out: &Path) -> Result<Vec<PathBuf>> {
    if !data.iter().any(|p| is_db_url(p)) {
        return Ok(data.to_vec());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let name = ExportKind::from(kind).name();
    let mut files = Vec::with_capacity(data.len());
    for (i, p) in data.iter().enumerate() {
        if !is_db_url(p) {
            files.push(p.clone());
            continue;
        }
        let snap = out.join(format!("feedback-{name}-{i}.jsonl"));
        if snap.exists() {
            tracing::info!(
                "{}: reusing the snapshot {}",
                redact_url(&p.to_string_lossy()),
                snap.display()
            );
        } else {
            let url = p.to_string_lossy().into_owned();
            let lines = rt.block_on(async {
                let store = open(&url).await?;
                let lines = export_lines(&store, kind.into(), None)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?;
                store.close().await;
                anyhow::Ok(lines)
            })?;
            if lines.is_empty() {
                anyhow::bail!(
                    "{}: the database has no {name} to train on yet",
                    redact_url(&url)
                );
            }
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            write_lines(&snap, &lines)?;
            tracing::info!(
                "{}: {} {name} records -> {}",
                redact_url(&url),
                lines.len(),
                snap.display()
            );
        }
        files.push(snap);
    }
    Ok(files)
}
