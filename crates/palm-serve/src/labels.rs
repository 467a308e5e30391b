//! The labelling API the pages use (documented with curl examples in the README):
//!
//! - `GET /api/me`: the caller and their progress.
//! - `POST /api/tasks/next`: the caller's pending task, else a task another labeller ranked (so
//!   agreement can be measured, up to `--overlap` labellers), else a new task: a prompt with
//!   `--replies` replies sampled by the served model. `{"task_id", "prompt", "replies": [{"id",
//!   "text"}], "progress"}`; reward-model scores are never sent.
//! - `POST /api/tasks/{id}/ranking`: `{"ranking": [ids, best first]}`, or `{"ranking": [],
//!   "tie": true}` (all equally good), or `{"ranking": [...], "all_bad": true}`, or
//!   `{"skip": "reason", "draft": "note"}`.
//! - `GET /api/tasks/{id}`: the task and the caller's ranking. Another user's task is 404.
//! - `POST /api/write/next`, `POST /api/write`, `POST /api/write/skip`: demonstrations.
//! - `POST /api/conversations`, `POST /api/conversations/{id}/messages`,
//!   `POST /api/messages/{id}/thumbs`: chats and thumbs.
//! - Admins: `GET|POST /api/admin/users`, `POST /api/admin/prompts`, `GET /api/admin/agreement`,
//!   `GET /api/admin/export?kind=pairs|sft[&min_agreement=X]` (JSONL).

use std::path::Path;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use palm::chat::Message;
use palm::sample::Sampling;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::Job;
use crate::server::{ApiError, ApiJson, AppState, Served};
use crate::store::{NewGeneration, RankingSubmission, Store, User};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/me", get(me))
        .route("/api/tasks/next", post(next_task))
        .route("/api/tasks/{id}", get(get_task))
        .route("/api/tasks/{id}/ranking", post(rank))
        .route("/api/write/next", post(next_write))
        .route("/api/write", post(write))
        .route("/api/write/skip", post(skip_write))
        .route("/api/conversations", post(new_conversation))
        .route("/api/conversations/{id}/messages", post(add_message))
        .route("/api/messages/{id}/thumbs", post(thumbs))
        .route("/api/admin/users", get(list_users).post(add_user))
        .route("/api/admin/prompts", post(add_prompts))
        .route("/api/admin/agreement", get(agreement))
        .route("/api/admin/export", get(export))
}

/// An empty object or nothing: the body of the `next` calls.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

async fn me(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
) -> Result<Json<Value>, ApiError> {
    let progress = s.store.progress(&u.id).await?;
    Ok(Json(
        json!({"name": u.name, "admin": u.admin, "progress": progress}),
    ))
}

async fn next_task(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    ApiJson(_): ApiJson<Empty>,
) -> Result<Json<Value>, ApiError> {
    let task = match s.store.pending_task(&u.id).await? {
        Some(t) => t,
        None => match s.store.assign_shared_task(&u.id, s.cfg.overlap).await? {
            Some(t) => t,
            None => {
                let Some(prompt) = s.store.prompt_for_new_task(&u.id).await? else {
                    return Err(ApiError::not_found(
                        "no prompt is left to label: an admin imports prompts at /admin or with `palm serve --prompts FILE`",
                    ));
                };
                let replies = sample_replies(&s, &prompt.text).await?;
                let rewards = score_replies(&s, &prompt.text, &replies).await?;
                let mut ids = Vec::with_capacity(replies.len());
                for (r, reward) in replies.into_iter().zip(rewards) {
                    let g = NewGeneration {
                        prompt_id: prompt.id.clone(),
                        model: r.model,
                        params: r.params,
                        text: r.text,
                        reward,
                    };
                    ids.push(s.store.add_generation(&g).await?);
                }
                s.store.create_task(&u.id, &prompt.id, &ids).await?
            }
        },
    };
    let progress = s.store.progress(&u.id).await?;
    let mut v = serde_json::to_value(&task).map_err(|e| ApiError::internal(e.to_string()))?;
    v["progress"] =
        serde_json::to_value(progress).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(v))
}

/// A sampled labelling reply: its text, the model and the sampling parameters it came from.
struct Sampled {
    text: String,
    model: String,
    params: Value,
}

/// Samples `--replies` replies to `prompt` (as a user turn through each model's chat template).
/// With `--compare`, the models take turns (the first model gets the odd one), and the replies
/// are shuffled so the position does not tell which model wrote a reply.
async fn sample_replies(s: &AppState, prompt: &str) -> Result<Vec<Sampled>, ApiError> {
    let n = s.cfg.replies.clamp(2, 4);
    let k = s.models.len();
    let seed: u64 = rand::random::<u64>() >> 1;
    let mut out = Vec::with_capacity(n);
    for (j, m) in s.models.iter().enumerate() {
        let share = n / k + usize::from(j < n % k);
        if share > 0 {
            out.extend(sample_from(s, m, prompt, share, seed).await?);
        }
    }
    if k > 1 {
        use rand::seq::SliceRandom;
        let mut rng = palm::rng::seeded(seed);
        out.shuffle(&mut rng);
    }
    Ok(out)
}

/// `n` replies of model `m`, each with the sampling parameters it was drawn with.
async fn sample_from(
    s: &AppState,
    m: &Served,
    prompt: &str,
    n: usize,
    seed: u64,
) -> Result<Vec<Sampled>, ApiError> {
    let ids = m
        .text
        .chat_ids(&[Message::new("user", prompt)])
        .map_err(|e| ApiError::internal(format!("the chat template failed: {e}")))?;
    if ids.len() + 1 >= m.max_seq_len {
        return Err(ApiError::bad(
            "prompt",
            format!("the prompt fills the context of `{}`", m.id),
        ));
    }
    let max_tokens = s.cfg.label_max_tokens.min(m.max_seq_len - ids.len());
    let job = Job {
        prompt: ids,
        n,
        max_tokens,
        sampling: Sampling {
            temperature: s.cfg.label_temperature,
            top_p: Some(0.95),
            top_k: None,
            greedy: false,
        },
        seed,
        stop: vec![],
    };
    let rx = m.engine.submit(job)?;
    let (texts, _, _) = crate::openai::collect(rx, n).await?;
    Ok(texts
        .into_iter()
        .enumerate()
        .map(|(i, t)| Sampled {
            text: t.trim().to_string(),
            model: m.id.clone(),
            params: json!({"temperature": s.cfg.label_temperature, "top_p": 0.95,
                           "max_tokens": max_tokens, "seed": seed, "choice": i}),
        })
        .collect())
}

/// The reward model's score of each reply (`--reward`), off the async threads; `None` without one.
async fn score_replies(
    s: &AppState,
    prompt: &str,
    replies: &[Sampled],
) -> Result<Vec<Option<f64>>, ApiError> {
    let Some(rm) = s.reward.clone() else {
        return Ok(vec![None; replies.len()]);
    };
    let text = s.main().text.clone();
    let prompt = prompt.to_string();
    let texts: Vec<String> = replies.iter().map(|r| r.text.clone()).collect();
    let job = move || -> Result<Vec<Option<f64>>, String> {
        let p = text
            .chat_ids(&[Message::new("user", &prompt)])
            .map_err(|e| e.to_string())?;
        let mut f = rm
            .lock()
            .map_err(|_| "the reward model failed earlier".to_string())?;
        texts
            .iter()
            .map(|t| {
                let r = text.tokenizer.encode(t).map_err(|e| e.to_string())?;
                f(&p, &r).map(|x| Some(x as f64))
            })
            .collect()
    };
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(format!("the reward model failed: {e}")))
}

async fn get_task(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let Some((task, ranking)) = s.store.task_for_user(&id, &u.id).await? else {
        return Err(ApiError::not_found(format!("no task {id} for you")));
    };
    let mut v = serde_json::to_value(&task).map_err(|e| ApiError::internal(e.to_string()))?;
    v["ranking"] = serde_json::to_value(ranking).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(v))
}

async fn rank(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    UrlPath(id): UrlPath<String>,
    ApiJson(sub): ApiJson<RankingSubmission>,
) -> Result<Json<Value>, ApiError> {
    s.store.submit_ranking(&id, &u.id, &sub).await?;
    let progress = s.store.progress(&u.id).await?;
    Ok(Json(json!({"ok": true, "progress": progress})))
}

async fn next_write(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    ApiJson(_): ApiJson<Empty>,
) -> Result<Json<Value>, ApiError> {
    let Some((prompt, draft)) = s.store.next_write_prompt(&u.id).await? else {
        return Err(ApiError::not_found("no prompt is left to write a reply to"));
    };
    Ok(Json(
        json!({"prompt_id": prompt.id, "prompt": prompt.text, "draft": draft}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Demo {
    prompt_id: String,
    text: String,
}

async fn write(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    ApiJson(d): ApiJson<Demo>,
) -> Result<Json<Value>, ApiError> {
    s.store
        .add_demonstration(&u.id, &d.prompt_id, &d.text)
        .await?;
    let progress = s.store.progress(&u.id).await?;
    Ok(Json(json!({"ok": true, "progress": progress})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteSkip {
    prompt_id: String,
    reason: String,
    #[serde(default)]
    draft: String,
}

async fn skip_write(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    ApiJson(k): ApiJson<WriteSkip>,
) -> Result<Json<Value>, ApiError> {
    if k.reason.trim().is_empty() {
        return Err(ApiError::bad("reason", "say why you skip"));
    }
    s.store
        .skip_write(&u.id, &k.prompt_id, &k.reason, &k.draft)
        .await?;
    let progress = s.store.progress(&u.id).await?;
    Ok(Json(json!({"ok": true, "progress": progress})))
}

async fn new_conversation(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    ApiJson(_): ApiJson<Empty>,
) -> Result<Json<Value>, ApiError> {
    let id = s.store.new_conversation(&u.id, &s.main().id).await?;
    Ok(Json(json!({"id": id})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMessage {
    role: String,
    content: String,
}

async fn add_message(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    UrlPath(id): UrlPath<String>,
    ApiJson(m): ApiJson<NewMessage>,
) -> Result<Json<Value>, ApiError> {
    let mid = s.store.add_message(&id, &u.id, &m.role, &m.content).await?;
    Ok(Json(json!({"id": mid})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Thumbs {
    thumbs: i64,
}

async fn thumbs(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    UrlPath(id): UrlPath<String>,
    ApiJson(t): ApiJson<Thumbs>,
) -> Result<Json<Value>, ApiError> {
    let v = match t.thumbs {
        0 => None,
        1 | -1 => Some(t.thumbs),
        _ => {
            return Err(ApiError::bad(
                "thumbs",
                "thumbs is 1 (up), -1 (down) or 0 (clear)",
            ))
        }
    };
    s.store.set_thumbs(&id, &u.id, v).await?;
    Ok(Json(json!({"ok": true})))
}

fn admin_only(u: &User) -> Result<(), ApiError> {
    if u.admin {
        Ok(())
    } else {
        Err(ApiError::forbidden("this needs an admin account"))
    }
}

async fn list_users(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
) -> Result<Json<Value>, ApiError> {
    admin_only(&u)?;
    Ok(Json(json!({"users": s.store.list_users().await?})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    #[serde(default)]
    admin: bool,
}

async fn add_user(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    ApiJson(n): ApiJson<NewUser>,
) -> Result<Json<Value>, ApiError> {
    admin_only(&u)?;
    let (user, token) = s.store.add_user(n.name.trim(), n.admin).await?;
    Ok(Json(
        json!({"name": user.name, "admin": user.admin, "token": token}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Prompts {
    prompts: Vec<String>,
}

async fn add_prompts(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    ApiJson(p): ApiJson<Prompts>,
) -> Result<Json<Value>, ApiError> {
    admin_only(&u)?;
    let texts: Vec<String> = p
        .prompts
        .iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    let added = s
        .store
        .add_prompts(&texts, &format!("admin:{}", u.name))
        .await?;
    Ok(Json(json!({"added": added})))
}

async fn agreement(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
) -> Result<Json<Value>, ApiError> {
    admin_only(&u)?;
    Ok(Json(
        serde_json::to_value(s.store.agreement().await?)
            .map_err(|e| ApiError::internal(e.to_string()))?,
    ))
}

#[derive(Deserialize)]
struct ExportQuery {
    kind: Option<String>,
    min_agreement: Option<f64>,
}

async fn export(
    State(s): State<AppState>,
    Extension(u): Extension<User>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    admin_only(&u)?;
    let kind = match q.kind.as_deref().unwrap_or("pairs") {
        "pairs" => ExportKind::Pairs,
        "sft" => ExportKind::Sft,
        other => {
            return Err(ApiError::bad(
                "kind",
                format!("kind is pairs or sft, not `{other}`"),
            ))
        }
    };
    let body = jsonl(&export_lines(&s.store, kind, q.min_agreement).await?);
    let kind = kind.name();
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "application/jsonl; charset=utf-8".to_string(),
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{kind}.jsonl\""),
            ),
        ],
        body,
    )
        .into_response())
}

/// What an export holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    /// `{"prompt", "chosen", "rejected"}` per ordered pair of each usable ranking.
    Pairs,
    /// `{"messages": [...]}` per written demonstration.
    Sft,
}

impl ExportKind {
    pub fn name(self) -> &'static str {
        match self {
            ExportKind::Pairs => "pairs",
            ExportKind::Sft => "sft",
        }
    }
}

/// The JSON lines of an export: the page's download, `palm feedback export` and the
/// `--data sqlite://...` snapshots all come from here. `min_agreement` filters pairs only.
pub async fn export_lines(
    store: &Store,
    kind: ExportKind,
    min_agreement: Option<f64>,
) -> Result<Vec<String>, ApiError> {
    match kind {
        ExportKind::Pairs => to_lines(&store.export_pairs(min_agreement).await?),
        ExportKind::Sft => to_lines(&store.export_sft().await?),
    }
}

/// Lines as a JSONL text: one per line, newline-terminated (empty for none).
pub fn jsonl(lines: &[String]) -> String {
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    text
}

/// One JSON line per record.
pub fn to_lines<T: serde::Serialize>(records: &[T]) -> Result<Vec<String>, ApiError> {
    records
        .iter()
        .map(|r| serde_json::to_string(r).map_err(|e| ApiError::internal(e.to_string())))
        .collect()
}

/// Prompts from a file: JSONL lines with `prompt` (or `messages`: the first user turn), or plain
/// text with one prompt per line (gzip when the name ends in `.gz`). The file is streamed a line
/// at a time and a line may hold at most [`palm::records::MAX_LINE_BYTES`]. Errors name the file
/// and line.
pub fn read_prompts(path: &Path) -> Result<Vec<String>, String> {
    let mut lines = palm::records::lines(path).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(next) = lines.next_str() {
        let (n, line) = next.map_err(|e| e.to_string())?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if !line.starts_with('{') {
            out.push(line.to_string());
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("{}:{n}: {e}", path.display()))?;
        let p = v
            .get("prompt")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| {
                v.get("messages")?.as_array()?.iter().find_map(|m| {
                    (m.get("role")?.as_str()? == "user")
                        .then(|| m.get("content")?.as_str().map(str::to_string))?
                })
            });
        match p {
            Some(p) if !p.trim().is_empty() => out.push(p.trim().to_string()),
            _ => {
                return Err(format!(
                    "{}:{n}: a line needs a `prompt` string or a user message",
                    path.display()
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod read_prompts_tests {
    use super::read_prompts;

    #[test]
    fn prompts_stream_and_bad_lines_are_located() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.txt");
        std::fs::write(
            &p,
            "Once upon a time\r\n\n{\"prompt\": \" Q \"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        )
        .unwrap();
        assert_eq!(read_prompts(&p).unwrap(), ["Once upon a time", "Q", "hi"]);
        std::fs::write(&p, "ok\n{\"q\": 1}\n").unwrap();
        let e = read_prompts(&p).unwrap_err();
        assert!(
            e.ends_with("p.txt:2: a line needs a `prompt` string or a user message"),
            "{e}"
        );
        std::fs::write(&p, b"ok\n\xff\n").unwrap();
        let e = read_prompts(&p).unwrap_err();
        assert!(
            e.ends_with("p.txt:2: invalid UTF-8 at byte 0 of the line"),
            "{e}"
        );
        std::fs::write(&p, "ok\n{oops\n").unwrap();
        assert!(read_prompts(&p).unwrap_err().contains("p.txt:2: "));
    }
}
