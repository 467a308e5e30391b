//! The OpenAI API over the engine: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.
//!
//! Requests take `temperature` (0-2; 0 is greedy), `top_p`, `top_k` (an extension, as vLLM),
//! `max_tokens` or `max_completion_tokens`, `n`, `seed`, `stop` (a string or up to 4), `stream`
//! and `stream_options.include_usage`. Fields this server does not implement are refused by name
//! when they would change the output (`logprobs`, `echo`, `suffix`, `tools`, penalties other than
//! 0) and ignored otherwise (`user`, `metadata`, ...). A stream is Server-Sent Events of
//! `data: {chunk}` lines ending with `data: [DONE]`; with `include_usage`, a last chunk with
//! empty `choices` carries `usage`.

use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use palm::chat::Message;
use palm::sample::Sampling;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{Event, FinishReason, Job};
use crate::server::{ApiError, ApiJson, AppState, Served};

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct Params {
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub n: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub tools: Option<Value>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub params: Params,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Value,
    #[serde(flatten)]
    pub params: Params,
}

pub async fn models(State(s): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = s.models.iter().map(|m| model_card(&s, m)).collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn model(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let m = s.model(Some(&id))?;
    Ok(Json(model_card(&s, m)))
}

fn model_card(s: &AppState, m: &Served) -> Value {
    json!({"id": m.id, "object": "model", "created": s.created, "owned_by": "palm",
           "max_model_len": m.max_seq_len})
}

/// A chat message's text: a string, or the text parts of a content array.
fn content_text(m: &ChatMessage, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match &m.content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => {
                        return Err(ApiError::bad(
                            &param,
                            "only text content parts are supported",
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::bad(
            &param,
            "content must be a string or an array of text parts",
        )),
    }
}

/// The chat messages as template messages (`developer` is the system role).
fn chat_messages(req: &ChatRequest) -> Result<Vec<Message>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::bad("messages", "messages must not be empty"));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::bad(
                        &format!("messages[{i}].role"),
                        format!(
                            "role `{other}` is not supported (system, developer, user, assistant)"
                        ),
                    ))
                }
            };
            Ok(Message::new(role, content_text(m, i)?))
        })
        .collect()
}

/// A validated request: the engine job and how to answer.
pub struct Plan {
    pub job: Job,
    pub stream: bool,
    pub include_usage: bool,
}

/// Checks the shared fields and builds the job for `prompt` ids on model `m`.
pub fn plan(p: &Params, prompt: Vec<u32>, s: &AppState, m: &Served) -> Result<Plan, ApiError> {
    refuse_unsupported(p)?;
    let temperature = p.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature",
            "temperature must be between 0 and 2",
        ));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", "top_p must be in (0, 1]"));
    }
    let top_k = match p.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(_) => {
            return Err(ApiError::bad(
                "top_k",
                "top_k must be positive (or -1 for none)",
            ))
        }
    };
    let n = p.n.unwrap_or(1);
    // the choices of one request decode together, so `n` is bounded by the batch as well
    let max_n = s.cfg.max_n.min(s.cfg.max_batch.max(1));
    if n < 1 || n as usize > max_n {
        return Err(ApiError::bad(
            "n",
            format!("n must be between 1 and {max_n}"),
        ));
    }
    let stop = match &p.stop {
        None => vec![],
        Some(Stop::One(x)) => vec![x.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(ApiError::bad("stop", "at most 4 stop sequences"));
    }
    let ctx = m.max_seq_len;
    if prompt.is_empty() {
        return Err(ApiError::bad("prompt", "the prompt is empty"));
    }
    if prompt.len() >= ctx {
        return Err(context_error(ctx, prompt.len(), 1));
    }
    let room = ctx - prompt.len();
    let max_tokens = match p.max_completion_tokens.or(p.max_tokens) {
        None => s.cfg.default_max_tokens.min(room),
        Some(m) if m < 1 => {
            return Err(ApiError::bad("max_tokens", "max_tokens must be at least 1"))
        }
        Some(m) if m as usize > room => return Err(context_error(ctx, prompt.len(), m as usize)),
        Some(m) => m as usize,
    };
    let sampling = Sampling {
        temperature,
        top_k,
        top_p: (top_p < 1.0).then_some(top_p),
        greedy: temperature == 0.0,
    };
    let seed = p.seed.map(|x| x as u64).unwrap_or_else(rand::random);
    Ok(Plan {
        job: Job {
            prompt,
            n: n as usize,
            max_tokens,
            sampling,
            seed,
            stop,
        },
        stream: p.stream.unwrap_or(false),
        include_usage: p.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

fn context_error(ctx: usize, prompt: usize, asked: usize) -> ApiError {
    ApiError::bad(
        "messages",
        format!(
            "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt} in the messages, {asked} in the completion). Please reduce the length of the messages or completion.",
            prompt + asked
        ),
    )
    .code("context_length_exceeded")
}

fn refuse_unsupported(p: &Params) -> Result<(), ApiError> {
    let truthy = |v: &Option<Value>| {
        v.as_ref()
            .is_some_and(|v| !v.is_null() && *v != json!(false) && *v != json!(0))
    };
    if truthy(&p.logprobs) || truthy(&p.top_logprobs) {
        return Err(ApiError::bad(
            "logprobs",
            "logprobs are not supported by this server",
        ));
    }
    if p.echo == Some(true) {
        return Err(ApiError::bad(
            "echo",
            "echo is not supported by this server",
        ));
    }
    if p.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad(
            "suffix",
            "suffix is not supported by this server",
        ));
    }
    if p.tools
        .as_ref()
        .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::bad(
            "tools",
            "tool calls are not supported by this server",
        ));
    }
    for (name, v) in [
        ("presence_penalty", p.presence_penalty),
        ("frequency_penalty", p.frequency_penalty),
    ] {
        if v.is_some_and(|x| x != 0.0) {
            return Err(ApiError::bad(
                name,
                format!("{name} is not supported by this server"),
            ));
        }
    }
    if p.logit_bias
        .as_ref()
        .is_some_and(|b| b.as_object().is_some_and(|o| !o.is_empty()))
    {
        return Err(ApiError::bad(
            "logit_bias",
            "logit_bias is not supported by this server",
        ));
    }
    Ok(())
}

/// Which endpoint answers: the objects differ in name and in where the text goes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

pub async fn chat_completions(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let messages = chat_messages(&req)?;
    let m = s.model(req.params.model.as_deref())?;
    let ids = m
        .text
        .chat_ids(&messages)
        .map_err(|e| ApiError::bad("messages", format!("the chat template failed: {e}")))?;
    let plan = plan(&req.params, ids, &s, m)?;
    answer(m, plan, Kind::Chat).await
}

pub async fn completions(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let text = match &req.prompt {
        Value::String(t) => t.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return Err(ApiError::bad(
                "prompt",
                "prompt must be a string (or a list of one string)",
            ))
        }
    };
    let m = s.model(req.params.model.as_deref())?;
    let ids = m
        .text
        .tokenizer
        .encode_prompt(&text)
        .map_err(|e| ApiError::bad("prompt", format!("tokenizing the prompt failed: {e}")))?;
    let plan = plan(&req.params, ids, &s, m)?;
    answer(m, plan, Kind::Text).await
}

/// Submits the job and answers as one JSON object or as a stream.
async fn answer(m: &Served, plan: Plan, kind: Kind) -> Result<Response, ApiError> {
    let prompt_tokens = plan.job.prompt.len();
    let n = plan.job.n;
    let rx = m.engine.submit(plan.job)?;
    let id = format!(
        "{}-{:024x}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        rand::random::<u128>() >> 32
    );
    let head = Head {
        id,
        created: now(),
        model: m.id.clone(),
        kind,
    };
    if plan.stream {
        return Ok(stream(head, rx, n, prompt_tokens, plan.include_usage).into_response());
    }
    let (texts, reasons, tokens) = collect(rx, n).await?;
    let choices: Vec<Value> = (0..n)
        .map(|i| match kind {
            Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                 "finish_reason": reasons[i], "logprobs": null}),
            Kind::Text => {
                json!({"index": i, "text": texts[i], "finish_reason": reasons[i], "logprobs": null})
            }
        })
        .collect();
    Ok(Json(json!({
        "id": head.id, "object": head.object(false), "created": head.created, "model": head.model,
        "choices": choices, "system_fingerprint": null,
        "usage": usage(prompt_tokens, tokens),
    }))
    .into_response())
}

struct Head {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Head {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "system_fingerprint": null, "choices": choices})
    }

    /// A chunk with one choice's text delta (and finish reason, if it ended).
    fn delta(
        &self,
        choice: usize,
        text: Option<&str>,
        role: bool,
        reason: Option<FinishReason>,
    ) -> Value {
        let c = match self.kind {
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    d.insert("content".into(), json!(t));
                }
                json!({"index": choice, "delta": d, "finish_reason": reason, "logprobs": null})
            }
            Kind::Text => {
                json!({"index": choice, "text": text.unwrap_or(""), "finish_reason": reason, "logprobs": null})
            }
        };
        self.chunk(json!([c]))
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Waits for every choice: texts, finish reasons and the generated token count.
pub async fn collect(
    mut rx: mpsc::UnboundedReceiver<Event>,
    n: usize,
) -> Result<(Vec<String>, Vec<FinishReason>, usize), ApiError> {
    let mut texts = vec![String::new(); n];
    let mut reasons = vec![FinishReason::Length; n];
    let (mut open, mut tokens) = (n, 0);
    while open > 0 {
        match rx.recv().await {
            Some(Event::Text { choice, text }) => texts[choice].push_str(&text),
            Some(Event::Done {
                choice,
                reason,
                tokens: t,
            }) => {
                reasons[choice] = reason;
                tokens += t;
                open -= 1;
            }
            Some(Event::Error(e)) => {
                return Err(ApiError::internal(format!("generation failed: {e}")))
            }
            None => {
                return Err(ApiError::internal(
                    "the engine stopped before the reply ended",
                ))
            }
        }
    }
    Ok((texts, reasons, tokens))
}

/// The SSE stream: a role chunk per choice (chat), text deltas, a finish chunk per choice, the
/// usage chunk when asked for, then `[DONE]`. Dropping the stream (the client went away) drops
/// the engine's receiver, which cancels the rows.
fn stream(
    head: Head,
    mut rx: mpsc::UnboundedReceiver<Event>,
    n: usize,
    prompt_tokens: usize,
    include_usage: bool,
) -> impl IntoResponse {
    let (tx, out) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(SseEvent::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        if head.kind == Kind::Chat {
            for c in 0..n {
                if !send(head.delta(c, Some(""), true, None)).await {
                    return;
                }
            }
        }
        let (mut open, mut tokens) = (n, 0);
        while open > 0 {
            let chunk = match rx.recv().await {
                Some(Event::Text { choice, text }) => head.delta(choice, Some(&text), false, None),
                Some(Event::Done {
                    choice,
                    reason,
                    tokens: t,
                }) => {
                    open -= 1;
                    tokens += t;
                    head.delta(choice, None, false, Some(reason))
                }
                Some(Event::Error(e)) => {
                    json!({"error": {"message": format!("generation failed: {e}"),
                                                 "type": "server_error", "param": null, "code": null}})
                }
                None => break,
            };
            let is_error = chunk.get("error").is_some();
            if !send(chunk).await || is_error {
                return;
            }
        }
        if include_usage {
            let mut u = head.chunk(json!([]));
            u["usage"] = usage(prompt_tokens, tokens);
            if !send(u).await {
                return;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out)).keep_alive(KeepAlive::default())
}
