//! The HTTP server: state, errors in OpenAI's shape, authentication, and the router.
//!
//! Every `/v1` and `/api` route needs a user: `Authorization: Bearer TOKEN`, or the HttpOnly,
//! SameSite=Strict session cookie that `POST /login` sets from the same token. Bodies are JSON
//! (a request without `Content-Type: application/json` is refused, which also keeps other sites'
//! forms out) and bounded (`--max-body`, 413 beyond it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use palm::pretrained::{Pretrained, TextSide};
use serde::Serialize;

use crate::engine::{Engine, EngineConfig, SubmitError};
use crate::store::{Store, StoreError, User};

/// What `palm serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// A GGUF file, a Hugging Face directory or a checkpoint directory.
    pub model: PathBuf,
    /// The model's id in the API (default: the file or folder name).
    pub model_name: Option<String>,
    pub tokenizer: Option<String>,
    /// `sqlite://FILE` (or a path) or `postgres://...`.
    pub db: String,
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// Prompts to import for labelling (JSONL with `prompt` or `messages`, or one per line).
    pub prompts: Option<PathBuf>,
    /// A second model: served beside the first (pick it with `model`), and about half of every
    /// labelling task's replies come from it, shuffled, to compare two policies.
    pub compare: Option<PathBuf>,
    pub max_batch: usize,
    pub queue: usize,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Most choices per request (`n`).
    pub max_n: usize,
    /// `max_tokens` when a request gives none (capped by the context).
    pub default_max_tokens: usize,
    /// Replies sampled per labelling task (2-4).
    pub replies: usize,
    /// How many labellers rank each task (agreement needs 2).
    pub overlap: usize,
    /// Sampling of the labelling replies.
    pub label_temperature: f32,
    pub label_max_tokens: usize,
}

impl ServeConfig {
    pub fn new(model: PathBuf, db: String) -> Self {
        Self {
            model,
            model_name: None,
            tokenizer: None,
            db,
            host: "127.0.0.1".into(),
            port: 8080,
            prompts: None,
            compare: None,
            max_batch: 8,
            queue: 32,
            max_body: 1 << 20,
            max_n: 8,
            default_max_tokens: 256,
            replies: 3,
            overlap: 2,
            label_temperature: 1.0,
            label_max_tokens: 200,
        }
    }
}

/// Scores a reply (prompt ids, reply ids) for the labelling tasks: `palm serve --reward RM`.
/// Scores are stored with the generations and never sent to labellers.
pub type RewardFn = Arc<std::sync::Mutex<dyn FnMut(&[u32], &[u32]) -> Result<f32, String> + Send>>;

/// A served model: its engine, tokenizer and template, id and context.
pub struct Served {
    pub id: String,
    pub engine: Engine,
    pub text: Arc<TextSide>,
    pub max_seq_len: usize,
}

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    /// The served models; the first is the default (`--model`), a second one is `--compare`.
    pub models: Arc<Vec<Served>>,
    pub store: Store,
    pub created: u64,
    pub cfg: Arc<ServeConfig>,
    pub reward: Option<RewardFn>,
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl AppState {
    /// The default model.
    pub fn main(&self) -> &Served {
        &self.models[0]
    }

    /// The model a request names (`None` or empty: the default), or 404.
    pub fn model(&self, id: Option<&str>) -> Result<&Served, ApiError> {
        match id {
            None | Some("") => Ok(self.main()),
            Some(id) => self.models.iter().find(|m| m.id == id).ok_or_else(|| {
                let ids: Vec<String> = self.models.iter().map(|m| format!("`{}`", m.id)).collect();
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!(
                        "the model `{id}` does not exist; this server serves {}",
                        ids.join(", ")
                    ),
                )
                .code("model_not_found")
            }),
        }
    }
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }
    /// 400, naming the request field at fault.
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.to_string());
        e
    }
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message).code("not_found")
    }
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "a valid token is needed: send `Authorization: Bearer TOKEN` or log in (palm feedback user add NAME prints one)",
        )
        .code("invalid_api_key")
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message).code("forbidden")
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::not_found(m),
            StoreError::Invalid(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", m)
            }
            other => {
                tracing::error!("storage: {other}");
                ApiError::internal("storage failed; the server log has the details")
            }
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                e.to_string(),
            )
            .code("queue_full"),
            SubmitError::Stopped => ApiError::internal(e.to_string()),
        }
    }
}

/// JSON bodies with errors in the API's shape: 413 beyond the body limit, 400 for anything
/// malformed (bad JSON, wrong types, a missing `Content-Type: application/json`).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(json_rejection(rej)),
        }
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "the request body is larger than the server's limit (--max-body)",
        )
        .code("request_too_large");
    }
    let msg = match &rej {
        JsonRejection::MissingJsonContentType(_) => {
            "the body must be JSON with `Content-Type: application/json`".to_string()
        }
        _ => format!("malformed JSON body: {}", rej.body_text()),
    };
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", msg).code("invalid_json")
}

/// The caller's token: `Authorization: Bearer TOKEN`, else the session cookie.
fn token_of(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    }
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    cookies.split(';').find_map(|c| {
        c.trim()
            .strip_prefix(concat!("palm_session", "="))
            .map(str::to_string)
    })
}

/// Looks the caller up and puts the [`User`] into the request, or answers 401.
async fn authenticate(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(token) = token_of(req.headers()) else {
        return ApiError::unauthorized().into_response();
    };
    match s.store.user_by_token(&token).await {
        Ok(Some(user)) => {
            req.extensions_mut().insert(user);
            next.run(req).await
        }
        Ok(None) => ApiError::unauthorized().into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

#[derive(Serialize)]
struct Me {
    name: String,
    admin: bool,
}

/// `POST /login {"token"}`: checks the token and sets the session cookie.
async fn login(
    State(s): State<AppState>,
    ApiJson(l): ApiJson<Login>,
) -> Result<Response, ApiError> {
    let user = s
        .store
        .user_by_token(l.token.trim())
        .await?
        .ok_or_else(ApiError::unauthorized)?;
    if !l
        .token
        .trim()
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ApiError::unauthorized());
    }
    let cookie = format!(
        "palm_session={}; HttpOnly; SameSite=Strict; Path=/; Max-Age=2592000",
        l.token.trim()
    );
    let mut r = Json(Me {
        name: user.name,
        admin: user.admin,
    })
    .into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal(e.to_string()))?,
    );
    Ok(r)
}

async fn logout() -> Response {
    let mut r = Json(serde_json::json!({"ok": true})).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("palm_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    r
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; the API is under /v1 (OpenAI) and /api (labelling)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "this route does not take that method",
    )
}

/// The application: API routes behind authentication, pages and login open.
pub fn router(state: AppState) -> Router {
    let max_body = state.cfg.max_body;
    let api = Router::new()
        .route("/v1/models", get(crate::openai::models))
        .route("/v1/models/{id}", get(crate::openai::model))
        .route(
            "/v1/chat/completions",
            post(crate::openai::chat_completions),
        )
        .route("/v1/completions", post(crate::openai::completions))
        .merge(crate::labels::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(api)
        .merge(crate::web::routes())
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"ok": true})) }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// The user behind a request (set by `authenticate`).
pub type Caller = Extension<User>;

/// A running server.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stops accepting, finishes the requests in flight, and waits for the server to end.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    /// Waits until the server ends (Ctrl-C, or an I/O error).
    pub async fn wait(self) -> std::io::Result<()> {
        self.task
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }
}

/// Error of [`start`], with what failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading model {path}: {source}")]
    Model { path: PathBuf, source: palm::Error },
    #[error("opening the database: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Prompts(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Loads the model, opens the database, imports `--prompts`, binds and serves in the background.
pub async fn start(cfg: ServeConfig) -> Result<Running, StartError> {
    start_with_reward(cfg, None).await
}

/// [`start`], with a reward model that scores every labelling reply.
pub async fn start_with_reward(
    cfg: ServeConfig,
    reward: Option<RewardFn>,
) -> Result<Running, StartError> {
    let mut models = vec![load_served(&cfg, &cfg.model, cfg.model_name.clone())?];
    if let Some(c) = &cfg.compare {
        let second = load_served(&cfg, c, None)?;
        if second.id == models[0].id {
            return Err(StartError::Prompts(format!(
                "--compare {}: both models are called `{}`; name the first with --model-name",
                c.display(),
                second.id
            )));
        }
        models.push(second);
    }
    let store = Store::open(&cfg.db).await?;
    if let Some(p) = &cfg.prompts {
        let texts = crate::labels::read_prompts(p).map_err(StartError::Prompts)?;
        let added = store.add_prompts(&texts, &p.display().to_string()).await?;
        tracing::info!("{}: {} prompts, {added} new", p.display(), texts.len());
    }
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let state = AppState {
        models: Arc::new(models),
        store,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        cfg: Arc::new(cfg),
        reward,
    };
    let app = router(state.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
    });
    Ok(Running {
        addr: local,
        state,
        shutdown: Some(tx),
        task,
    })
}

/// Loads one model and starts its engine.
fn load_served(
    cfg: &ServeConfig,
    path: &std::path::Path,
    name: Option<String>,
) -> Result<Served, StartError> {
    let device = candle_core::Device::Cpu;
    let pre = Pretrained::load(path, cfg.tokenizer.as_deref(), &device).map_err(|source| {
        StartError::Model {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let id = name.unwrap_or_else(|| model_id_of(path));
    let max_seq_len = pre.model.max_seq_len();
    let Pretrained {
        model,
        text,
        end_ids,
        ..
    } = pre;
    let engine = Engine::start(
        model,
        text.tokenizer.clone(),
        end_ids,
        EngineConfig {
            max_batch: cfg.max_batch,
            queue: cfg.queue,
        },
    );
    Ok(Served {
        id,
        engine,
        text: Arc::new(text),
        max_seq_len,
    })
}

/// The API's model id: the model file's stem or the folder's name.
pub fn model_id_of(path: &std::path::Path) -> String {
    let p = palm::checkpoint::resolve_dir(path);
    let name = if p.is_file() {
        p.file_stem()
    } else {
        p.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "palm".into())
}
