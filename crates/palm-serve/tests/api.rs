//! The OpenAI API against a server on a free loopback port: every endpoint, streaming, `n`,
//! `seed`, `stop`, each error code, batching (outputs equal to the same requests alone),
//! cancellation, and a full queue.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::atomic::Ordering;

use common::{error_of, read, Db, TestServer};
use serde_json::{json, Value};

fn chat(s: &TestServer, body: Value) -> (u16, Value) {
    s.post(&s.admin, "/v1/chat/completions", &body)
}

fn text_of(v: &Value, i: usize) -> String {
    v["choices"][i]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {v}"))
        .to_string()
}

/// Reads an SSE stream: the JSON chunks, and whether it ended with `[DONE]`.
fn sse(s: &TestServer, path: &str, body: Value) -> (Vec<Value>, bool) {
    let r = ureq::post(&s.url(path))
        .set("Authorization", &format!("Bearer {}", s.admin))
        .send_json(body)
        .expect("stream starts");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let mut chunks = Vec::new();
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.expect("line");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return (chunks, true);
        }
        chunks.push(serde_json::from_str(data).expect("chunk is JSON"));
    }
    (chunks, false)
}

#[test]
fn endpoints_auth_and_errors() {
    // a small body limit: a body far over it would be cut off mid-send (a broken pipe)
    let s = TestServer::start(Db::Sqlite, |c| c.max_body = 16 << 10).expect("sqlite always runs");
    // models
    let (st, v) = s.get(&s.admin, "/v1/models");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "list");
    let id = v["data"][0]["id"].as_str().expect("model id").to_string();
    assert_eq!(id, "model");
    assert_eq!(s.get(&s.admin, "/v1/models/model").0, 200);
    // 401: no token, bad token
    let (st, v) = read(ureq::get(&s.url("/v1/models")).call());
    assert_eq!(st, 401);
    assert_eq!(error_of(&v)["code"], "invalid_api_key");
    assert_eq!(s.get("palm-nope", "/v1/models").0, 401);
    // 404: unknown route, unknown model
    let (st, v) = s.get(&s.admin, "/v1/nothing");
    assert_eq!(st, 404);
    error_of(&v);
    let (st, v) = chat(
        &s,
        json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(st, 404);
    assert_eq!(error_of(&v)["code"], "model_not_found");
    // 400: malformed JSON, a bad field (named), an unsupported field
    let r = ureq::post(&s.url("/v1/chat/completions"))
        .set("Authorization", &format!("Bearer {}", s.admin))
        .set("Content-Type", "application/json")
        .send_string("{\"messages\": [");
    let (st, v) = read(r);
    assert_eq!(st, 400);
    error_of(&v);
    let (st, v) = chat(
        &s,
        json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}),
    );
    assert_eq!(st, 400);
    assert_eq!(error_of(&v)["param"], "temperature");
    let (st, v) = chat(
        &s,
        json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true}),
    );
    assert_eq!(
        (st, error_of(&v)["param"].clone()),
        (400, json!("logprobs"))
    );
    let (st, v) = chat(&s, json!({"messages": [], "max_tokens": 3}));
    assert_eq!(
        (st, error_of(&v)["param"].clone()),
        (400, json!("messages"))
    );
    let (st, v) = chat(
        &s,
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}),
    );
    assert_eq!(
        (st, error_of(&v)["code"].clone()),
        (400, json!("context_length_exceeded"))
    );
    // 413: a body over the limit
    let big = "x".repeat(20 << 10);
    let (st, v) = chat(&s, json!({"messages": [{"role": "user", "content": big}]}));
    assert_eq!(st, 413, "{v}");
    assert_eq!(error_of(&v)["code"], "request_too_large");
    s.stop();
}

#[test]
fn chat_completion_shape_seed_n_and_stop() {
    let s = TestServer::start(Db::Sqlite, |_| {}).expect("sqlite always runs");
    let ask = |seed: i64, extra: Value| {
        let mut b = json!({"model": "model", "messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hello there"}],
                           "max_tokens": 12, "seed": seed, "temperature": 0.9});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            b[k] = v;
        }
        chat(&s, b)
    };
    let (st, a) = ask(1, json!({}));
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["choices"][0]["message"]["role"], "assistant");
    assert_eq!(a["choices"][0]["finish_reason"], "length");
    let u = &a["usage"];
    assert_eq!(u["completion_tokens"], 12);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap_or(0) + 12)
    );
    // the prompt is the template's rendering, one id per byte
    let rendered = s.state().main().text.render_chat(&[
        palm::chat::Message::new("system", "Be brief."),
        palm::chat::Message::new("user", "Hello there"),
    ]);
    assert_eq!(
        u["prompt_tokens"].as_u64(),
        Some(rendered.expect("render").len() as u64)
    );
    // the same seed gives the same text, another seed another
    let (_, b) = ask(1, json!({}));
    assert_eq!(text_of(&a, 0), text_of(&b, 0));
    let (_, c) = ask(2, json!({}));
    assert_ne!(text_of(&a, 0), text_of(&c, 0));
    // n = 3: three choices; choice 0 is the n = 1 reply of the same seed
    let (st, m) = ask(1, json!({"n": 3}));
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["choices"].as_array().map(Vec::len), Some(3));
    assert_eq!(text_of(&m, 0), text_of(&a, 0));
    assert_eq!(m["usage"]["completion_tokens"], 36);
    // stop: cut the reply before a stop string taken from its own middle
    let full = text_of(&a, 0);
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[3..5].iter().collect();
    let want: String = full[..full.find(&stop).expect("stop in text")].to_string();
    let (_, d) = ask(1, json!({"stop": [stop]}));
    assert_eq!(text_of(&d, 0), want);
    assert_eq!(d["choices"][0]["finish_reason"], "stop");
    // temperature 0 is greedy whatever the seed
    let (_, g1) = ask(1, json!({"temperature": 0}));
    let (_, g2) = ask(99, json!({"temperature": 0}));
    assert_eq!(text_of(&g1, 0), text_of(&g2, 0));
    // text completions
    let (st, t) = s.post(
        &s.admin,
        "/v1/completions",
        &json!({"prompt": "Once upon", "max_tokens": 5, "seed": 3}),
    );
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["object"], "text_completion");
    assert!(t["choices"][0]["text"].is_string());
    assert_eq!(t["usage"]["prompt_tokens"], 9);
    s.stop();
}

#[test]
fn streaming_equals_the_whole_reply() {
    let s = TestServer::start(Db::Sqlite, |_| {}).expect("sqlite always runs");
    let body = json!({"messages": [{"role": "user", "content": "Stream this"}], "max_tokens": 14,
                      "seed": 5, "n": 2, "stop": ["zz"]});
    let (_, whole) = chat(&s, body.clone());
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (chunks, done) = sse(&s, "/v1/chat/completions", sb);
    assert!(done, "the stream ends with [DONE]");
    let mut texts = [String::new(), String::new()];
    let mut reasons = [Value::Null, Value::Null];
    let mut roles = 0;
    for c in &chunks {
        assert!(c["object"] == "chat.completion.chunk", "{c}");
        let Some(ch) = c["choices"].as_array().and_then(|a| a.first()) else {
            continue;
        };
        let i = ch["index"].as_u64().expect("index") as usize;
        if ch["delta"]["role"] == "assistant" {
            roles += 1;
        }
        if let Some(t) = ch["delta"]["content"].as_str() {
            texts[i].push_str(t);
        }
        if !ch["finish_reason"].is_null() {
            reasons[i] = ch["finish_reason"].clone();
        }
    }
    assert_eq!(roles, 2);
    for i in 0..2 {
        assert_eq!(texts[i], text_of(&whole, i), "choice {i}");
        assert_eq!(reasons[i], whole["choices"][i]["finish_reason"]);
    }
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);
    // text completions stream too
    let (chunks, done) = sse(
        &s,
        "/v1/completions",
        json!({"prompt": "abc", "max_tokens": 4, "stream": true, "seed": 1}),
    );
    assert!(done);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    let (_, t) = s.post(
        &s.admin,
        "/v1/completions",
        &json!({"prompt": "abc", "max_tokens": 4, "seed": 1}),
    );
    assert_eq!(text, t["choices"][0]["text"].as_str().expect("text"));
    s.stop();
}

#[test]
fn concurrent_requests_are_batched_and_equal_to_alone() {
    let s = TestServer::start(Db::Sqlite, |c| c.max_batch = 8).expect("sqlite always runs");
    let bodies: Vec<Value> = (0..6)
        .map(|i| {
            json!({"messages": [{"role": "user", "content": "x".repeat(1 + 7 * i)}],
                   "max_tokens": 20 + 3 * i, "seed": 100 + i, "temperature": if i % 2 == 0 { 0.8 } else { 0.0 }})
        })
        .collect();
    // alone, one after the other
    let alone: Vec<String> = bodies
        .iter()
        .map(|b| text_of(&chat(&s, b.clone()).1, 0))
        .collect();
    let before = s
        .state()
        .main()
        .engine
        .stats
        .batched_steps
        .load(Ordering::SeqCst);
    // together
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = bodies
            .iter()
            .map(|b| sc.spawn(|| chat(&s, b.clone())))
            .collect();
        hs.into_iter()
            .map(|h| {
                let (st, v) = h.join().expect("thread");
                assert_eq!(st, 200, "{v}");
                text_of(&v, 0)
            })
            .collect()
    });
    let batched = s
        .state()
        .main()
        .engine
        .stats
        .batched_steps
        .load(Ordering::SeqCst)
        - before;
    let max_rows = s
        .state()
        .main()
        .engine
        .stats
        .max_rows
        .load(Ordering::SeqCst);
    eprintln!("batched steps: {batched}, largest batch: {max_rows}");
    assert!(
        batched > 0 && max_rows > 1,
        "the requests never shared a step"
    );
    assert_eq!(together, alone);
    s.stop();
}

#[test]
fn a_full_queue_gives_503_and_loses_nothing_and_a_gone_client_is_cancelled() {
    let s = TestServer::start(Db::Sqlite, |c| {
        c.max_batch = 1;
        c.queue = 0;
    })
    .expect("sqlite always runs");
    let long =
        json!({"messages": [{"role": "user", "content": "long"}], "max_tokens": 200, "seed": 1});
    let (alone_status, alone) = chat(&s, long.clone());
    assert_eq!(alone_status, 200);
    std::thread::scope(|sc| {
        let h = sc.spawn(|| chat(&s, long.clone()));
        // wait until the long request is running
        let t0 = std::time::Instant::now();
        while s
            .state()
            .main()
            .engine
            .stats
            .in_flight
            .load(Ordering::SeqCst)
            == 0
        {
            assert!(t0.elapsed().as_secs() < 20, "the request never started");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let (st, v) = chat(
            &s,
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        );
        assert_eq!(st, 503, "{v}");
        assert_eq!(error_of(&v)["code"], "queue_full");
        let (st, v) = h.join().expect("thread");
        assert_eq!(st, 200);
        assert_eq!(
            text_of(&v, 0),
            text_of(&alone, 0),
            "the admitted request is not disturbed"
        );
    });
    // a client that goes away mid-stream is cancelled, and its slot is freed
    let before = s
        .state()
        .main()
        .engine
        .stats
        .cancelled
        .load(Ordering::SeqCst);
    {
        let mut b = long.clone();
        b["stream"] = json!(true);
        let r = ureq::post(&s.url("/v1/chat/completions"))
            .set("Authorization", &format!("Bearer {}", s.admin))
            .send_json(b)
            .expect("stream starts");
        let mut lines = BufReader::new(r.into_reader()).lines();
        let first = lines.next().expect("a first line").expect("readable");
        assert!(first.starts_with("data: "));
        // dropping the reader closes the connection
    }
    let t0 = std::time::Instant::now();
    while s
        .state()
        .main()
        .engine
        .stats
        .cancelled
        .load(Ordering::SeqCst)
        == before
    {
        assert!(
            t0.elapsed().as_secs() < 20,
            "the gone client's request was not cancelled"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let (st, _) = chat(
        &s,
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(st, 200, "the slot is free again");
    s.stop();
}

/// The same on a Hugging Face decoder (tiny random Llama; positions come from the key mask, so a
/// row prefilled alone joins a batch of any length) and on Qwen2.
#[test]
fn hf_decoders_batch_exactly_too() {
    for rel in [
        "models/tiny-random-hf/llama",
        "models/tiny-random-hf-2/qwen2",
    ] {
        let Some(model) = palm::fixtures::require(palm::fixtures::data_path(rel)) else {
            continue;
        };
        let s = TestServer::start(Db::Sqlite, |c| {
            c.model = model.clone();
            c.tokenizer = Some("bytes".into());
            c.max_batch = 8;
        })
        .expect("sqlite always runs");
        let bodies: Vec<Value> = (0..5)
            .map(|i| {
                json!({"prompt": "y".repeat(3 + 9 * i), "max_tokens": 12 + 4 * i,
                       "seed": 7 + i, "temperature": if i % 2 == 0 { 1.0 } else { 0.0 }})
            })
            .collect();
        let complete = |b: &Value| s.post(&s.admin, "/v1/completions", b);
        let alone: Vec<Value> = bodies
            .iter()
            .map(|b| complete(b).1["choices"][0]["text"].clone())
            .collect();
        let before = s
            .state()
            .main()
            .engine
            .stats
            .batched_steps
            .load(Ordering::SeqCst);
        let together: Vec<Value> = std::thread::scope(|sc| {
            let hs: Vec<_> = bodies
                .iter()
                .map(|b| sc.spawn(move || complete(b)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("thread").1["choices"][0]["text"].clone())
                .collect()
        });
        let batched = s
            .state()
            .main()
            .engine
            .stats
            .batched_steps
            .load(Ordering::SeqCst)
            - before;
        assert!(batched > 0, "{rel}: the requests never shared a step");
        assert_eq!(together, alone, "{rel}");
        s.stop();
    }
}

/// A job whose prefill fails (an id outside the vocabulary) fails alone: the running batch goes
/// on, its slot is freed, and the next job runs.
#[test]
fn a_failing_prefill_fails_its_job_alone() {
    use palm_serve::engine::{Engine, EngineConfig, Event, Job};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::tiny_model(dir.path());
    let model = palm::load::load_model(&path, &candle_core::Device::Cpu).expect("model");
    let engine = Engine::start(
        model,
        palm::tokenizer::Tokenizer::Bytes,
        vec![],
        EngineConfig {
            max_batch: 4,
            queue: 4,
        },
    );
    let job = |prompt: Vec<u32>, max_tokens: usize| Job {
        prompt,
        n: 1,
        max_tokens,
        sampling: palm::sample::Sampling::greedy(),
        seed: 0,
        stop: vec![],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let mut long = engine.submit(job(vec![1, 2, 3], 40)).expect("admitted");
        // wait for the long job's first token: it is running
        assert!(matches!(
            long.recv().await,
            Some(Event::Text { .. }) | Some(Event::Done { .. })
        ));
        let mut bad = engine.submit(job(vec![1, 999], 4)).expect("admitted");
        match bad.recv().await {
            Some(Event::Error(e)) => assert!(e.contains("999") || e.contains("index"), "{e}"),
            other => panic!("expected an error, got {other:?}"),
        }
        // the long job still ends normally
        let mut done = false;
        while let Some(ev) = long.recv().await {
            assert!(!matches!(ev, Event::Error(_)), "{ev:?}");
            if matches!(ev, Event::Done { .. }) {
                done = true;
                break;
            }
        }
        assert!(done);
        let mut ok = engine.submit(job(vec![5, 6], 3)).expect("admitted");
        let mut got_done = false;
        while let Some(ev) = ok.recv().await {
            if matches!(ev, Event::Done { tokens: 3, .. }) {
                got_done = true;
                break;
            }
        }
        assert!(got_done);
    });
    assert_eq!(
        engine.stats.in_flight.load(Ordering::SeqCst),
        0,
        "every slot is free"
    );
}
