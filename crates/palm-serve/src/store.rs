//! Storage for `palm serve`: accounts, prompts, sampled generations, ranking tasks, rankings,
//! demonstrations, chat conversations, and the exports made from them.
//!
//! One [`sqlx::AnyPool`] serves both SQLite (a file, created if missing, WAL journal) and
//! PostgreSQL (a `postgres://` URL) with the same embedded migrations and the same queries:
//! `$n` placeholders, ids are random 128-bit lowercase hex strings made here, times are BIGINT
//! unix milliseconds, booleans BIGINT 0/1 and floats DOUBLE PRECISION, so the SQL stays portable.
//!
//! Map: this file (types, errors, opening, migrations, helpers), `users` (accounts, progress),
//! `tasks` (ranking tasks and rankings), `writing` (demonstrations), `chat` (conversations),
//! `export` (agreement, preference pairs, SFT records), `testing` (test databases).

mod chat;
mod export;
mod prompts;
mod tasks;
mod users;
mod writing;

#[doc(hidden)]
pub mod testing;

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::pool::PoolConnectionMetadata;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Any, AnyConnection, AnyPool, ConnectOptions, Executor, Row, Transaction};

pub use export::rfc3339_utc_ms;

/// The embedded migrations, in order: (version, SQL). A version once released never changes;
/// schema changes are new files.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../migrations/0001_init.sql"))];

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed; `context` says what was being done (and, when opening or
    /// migrating, the URL with any password redacted).
    #[error("{context}: {source}")]
    Db {
        context: String,
        #[source]
        source: sqlx::Error,
    },
    /// The thing asked for does not exist, or is not the caller's.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is malformed (a bad ranking, an empty name, an unknown role, ...).
    #[error("invalid: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Attaches a description of the operation to a database error.
pub(crate) trait Context<T> {
    fn ctx(self, context: &str) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, sqlx::Error> {
    fn ctx(self, context: &str) -> Result<T> {
        self.map_err(|source| StoreError::Db {
            context: context.to_string(),
            source,
        })
    }
}

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

/// The storage handle; cheap to clone (it wraps the connection pool).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    kind: DbKind,
}

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: String,
    pub name: String,
    pub admin: bool,
}

/// One account with its contribution counts (see [`Store::progress`] for their meaning).
#[derive(Debug, Clone, Serialize)]
pub struct UserStats {
    pub name: String,
    pub admin: bool,
    pub ranked: i64,
    pub skipped: i64,
    pub written: i64,
    pub thumbs: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Prompt {
    pub id: String,
    pub text: String,
}

/// A sampled reply to store. `reward` (a reward model's score) is kept for analysis and is
/// never shown to labellers.
#[derive(Debug, Clone, Serialize)]
pub struct NewGeneration {
    pub prompt_id: String,
    pub model: String,
    pub params: serde_json::Value,
    pub text: String,
    pub reward: Option<f64>,
}

/// A reply as a labeller sees it: id and text only, never the reward.
#[derive(Debug, Clone, Serialize)]
pub struct Reply {
    pub id: String,
    pub text: String,
}

/// A ranking task: a prompt and its 2-4 replies in display order.
#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    pub task_id: String,
    pub prompt: String,
    pub replies: Vec<Reply>,
}

/// What a labeller sends for a task. Either a skip (`skip` holds a non-empty reason; `ranking`
/// empty, `tie` and `all_bad` false; `draft` optional), or a ranking: `ranking` lists exactly
/// the task's reply ids, best first; it may be empty only when `tie` or `all_bad` is set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankingSubmission {
    #[serde(default)]
    pub ranking: Vec<String>,
    #[serde(default)]
    pub tie: bool,
    #[serde(default)]
    pub all_bad: bool,
    #[serde(default)]
    pub skip: Option<String>,
    #[serde(default)]
    pub draft: Option<String>,
}

/// A stored ranking; `time` is RFC 3339 UTC.
#[derive(Debug, Clone, Serialize)]
pub struct Ranking {
    pub ranking: Vec<String>,
    pub tie: bool,
    pub all_bad: bool,
    pub skip: Option<String>,
    pub draft: Option<String>,
    pub time: String,
}

/// One labeller's counts: `ranked` tasks ranked (done), `skipped` ranking tasks skipped plus
/// writing prompts skipped, `written` demonstrations, `thumbs` chat messages rated, `pending`
/// ranking tasks assigned and not yet answered.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub ranked: i64,
    pub skipped: i64,
    pub written: i64,
    pub thumbs: i64,
    pub pending: i64,
}

/// Inter-labeller agreement over tasks with at least two usable rankings.
/// `per_labeller`: (name, mean agreement of that labeller's shared tasks, number of them),
/// sorted by name.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub shared_tasks: usize,
    pub mean: Option<f64>,
    pub per_labeller: Vec<(String, f64, usize)>,
}

/// One preference pair for reward-model / DPO training.
#[derive(Debug, Clone, Serialize)]
pub struct PairRecord {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub labeller: String,
    pub time: String,
    pub task_id: String,
}

/// One demonstration as a chat-format SFT example.
#[derive(Debug, Clone, Serialize)]
pub struct SftRecord {
    pub messages: Vec<serde_json::Value>,
    pub labeller: String,
    pub time: String,
}

/// A new random id: 128 bits as 32 lowercase hex digits.
pub(crate) fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Lowercase hex sha256 of `s`.
pub(crate) fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `Invalid` if `text` contains a NUL character, which PostgreSQL cannot store in TEXT (so
/// both databases refuse it alike).
pub(crate) fn no_nul(what: &str, text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(StoreError::Invalid(format!(
            "{what} contains a NUL character"
        )));
    }
    Ok(())
}

/// Booleans are stored as BIGINT 0/1.
pub(crate) fn flag(b: bool) -> i64 {
    i64::from(b)
}

/// `url` with any password (in the user info or a `password=` query parameter) replaced by
/// `***`, for error messages and logs.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = base.to_string();
    if let Some(scheme_end) = base.find("://") {
        let host_start = scheme_end + 3;
        let authority_end = base[host_start..]
            .find('/')
            .map_or(base.len(), |i| host_start + i);
        if let Some(at) = base[host_start..authority_end].rfind('@') {
            let userinfo = &base[host_start..host_start + at];
            if let Some(colon) = userinfo.find(':') {
                out = format!(
                    "{}{}:***{}",
                    &base[..host_start],
                    &userinfo[..colon],
                    &base[host_start + at..]
                );
            }
        }
    }
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{out}?{}", params.join("&"));
    }
    out
}

/// Per-connection SQLite settings. `synchronous = FULL`: in WAL mode every commit then fsyncs
/// the WAL, so a transaction that returned (and whose request got a 2xx) survives a kill -9 of
/// the server and also a power loss. NORMAL would survive a process kill too (the WAL is in
/// the OS page cache) but may lose the last commits on power loss; labels are worth the fsync.
const SQLITE_PRAGMAS: &[&str] = &[
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA busy_timeout = 5000",
];

/// Turns `sqlite://PATH`, `sqlite:PATH` or a bare path into a sqlx SQLite URL that creates
/// the file if missing (unless the URL names its own `mode`). Relative paths are made
/// absolute: in a URL `sqlite://data.db` the file name would be parsed (and lowercased) as a
/// host name.
fn sqlite_any_url(url: &str) -> Result<String> {
    let invalid = |e: String| StoreError::Invalid(format!("bad SQLite URL {url:?}: {e}"));
    let mut opts = if url.starts_with("sqlite:") {
        let opts = SqliteConnectOptions::from_str(url).map_err(|e| invalid(e.to_string()))?;
        let has_mode = url
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|kv| kv.starts_with("mode=")));
        if has_mode {
            opts
        } else {
            opts.create_if_missing(true)
        }
    } else {
        SqliteConnectOptions::new()
            .filename(url)
            .create_if_missing(true)
    };
    let memory = url.contains(":memory:") || url.contains("mode=memory");
    if !memory && opts.get_filename().is_relative() {
        let cwd = std::env::current_dir().map_err(|e| invalid(e.to_string()))?;
        let absolute = cwd.join(opts.get_filename());
        opts = opts.filename(absolute);
    }
    Ok(opts.to_url_lossy().to_string())
}

fn sqlite_after_connect<'c>(
    conn: &'c mut AnyConnection,
    _meta: PoolConnectionMetadata,
) -> futures_core_compat::BoxFuture<'c, std::result::Result<(), sqlx::Error>> {
    Box::pin(async move {
        for pragma in SQLITE_PRAGMAS {
            conn.execute(*pragma).await?;
        }
        Ok(())
    })
}

/// The boxed-future type `after_connect` wants, without a direct `futures` dependency.
mod futures_core_compat {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
}

/// Splits a migration into statements: drops `--` comment lines and splits on `;`.
fn split_statements(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl Store {
    /// Connects to `url` (`postgres://...`/`postgresql://...`, or SQLite as `sqlite://PATH`,
    /// `sqlite:PATH` or a bare path; the SQLite file is created if missing) and applies any
    /// migrations not yet applied.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        if url.trim().is_empty() {
            return Err(StoreError::Invalid("the database URL is empty".into()));
        }
        let shown = redact_url(url);
        let is_pg = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let (kind, any_url) = if is_pg {
            (DbKind::Postgres, url.to_string())
        } else if url.contains("://") && !url.starts_with("sqlite://") {
            return Err(StoreError::Invalid(format!(
                "unsupported database URL {shown} (use postgres://..., sqlite://PATH or a path)"
            )));
        } else {
            (DbKind::Sqlite, sqlite_any_url(url)?)
        };
        let opts =
            AnyConnectOptions::from_str(&any_url).ctx(&format!("parsing database URL {shown}"))?;
        let mut pool = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(10));
        pool = match kind {
            DbKind::Sqlite => pool.max_connections(8).after_connect(sqlite_after_connect),
            DbKind::Postgres => pool.max_connections(16),
        };
        let pool = pool
            .connect_with(opts)
            .await
            .ctx(&format!("connecting to {shown}"))?;
        let store = Store { pool, kind };
        store.migrate().await.map_err(|e| match e {
            StoreError::Db { context, source } => StoreError::Db {
                context: format!("migrating {shown}: {context}"),
                source,
            },
            other => other,
        })?;
        Ok(store)
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The pool, for tests and maintenance queries.
    #[doc(hidden)]
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`, waiting up to the busy timeout): a deferred transaction that reads
    /// and then writes fails at once with SQLITE_BUSY when another connection wrote meanwhile.
    pub(crate) async fn begin_write(&self, context: &str) -> Result<Transaction<'static, Any>> {
        match self.kind {
            DbKind::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            DbKind::Postgres => self.pool.begin().await,
        }
        .ctx(context)
    }

    /// Applies the embedded migrations not yet recorded in `schema_migrations`, each in its
    /// own transaction.
    async fn migrate(&self) -> Result<()> {
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .ctx("creating schema_migrations")?;
        for &(version, sql) in MIGRATIONS {
            let mut tx = self.begin_write("beginning a migration").await?;
            if self.kind == DbKind::Postgres {
                // Serialises servers starting at the same time against one database.
                sqlx::raw_sql("LOCK TABLE schema_migrations IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await
                    .ctx("locking schema_migrations")?;
            }
            let done = sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await
                .ctx("reading schema_migrations")?;
            if done.is_some() {
                continue;
            }
            for stmt in split_statements(sql) {
                tx.execute(sqlx::raw_sql(&stmt)).await.ctx(&format!(
                    "migration {version}: {}",
                    stmt.lines().next().unwrap_or("")
                ))?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .ctx("recording a migration")?;
            tx.commit()
                .await
                .ctx(&format!("committing migration {version}"))?;
            tracing::info!(version, "applied database migration");
        }
        Ok(())
    }

    /// The versions recorded in `schema_migrations`, ascending.
    #[doc(hidden)]
    pub async fn migration_versions(&self) -> Result<Vec<i64>> {
        let rows = sqlx::query("SELECT version FROM schema_migrations ORDER BY version")
            .fetch_all(&self.pool)
            .await
            .ctx("reading schema_migrations")?;
        rows.iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<std::result::Result<_, _>>()
            .ctx("reading schema_migrations")
    }
}
