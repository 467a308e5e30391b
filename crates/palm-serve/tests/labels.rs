//! The labelling API over HTTP, on SQLite and on PostgreSQL: the task flow of two labellers,
//! isolation (another user's task is 404, admin routes are 403), verbatim storage of SQL
//! metacharacters and markup, login cookies, demonstrations, chats with thumbs, and the exports.

mod common;

use common::{error_of, read, Db, TestServer};
use serde_json::{json, Value};

const TRICKY: &str =
    "'); DROP TABLE users; -- \"quoted\" \\back\\slash <script>alert(1)</script> ünï €";

fn flow(db: Db) {
    let Some(s) = TestServer::start(db, |c| {
        c.replies = 3;
        c.overlap = 2;
    }) else {
        return; // PostgreSQL not configured: skipped loudly
    };
    let a = s.user("ann");
    let b = s.user("bob");
    // no prompts yet
    let (st, v) = s.post(&a, "/api/tasks/next", &json!({}));
    assert_eq!(st, 404, "{v}");
    error_of(&v);
    // only admins import prompts
    let (st, _) = s.post(&a, "/api/admin/prompts", &json!({"prompts": ["x"]}));
    assert_eq!(st, 403);
    let (st, v) = s.post(
        &s.admin,
        "/api/admin/prompts",
        &json!({"prompts": [TRICKY, "Say hi.", TRICKY]}),
    );
    assert_eq!((st, v["added"].clone()), (200, json!(2)), "{v}");

    // ann gets a task with 3 replies; asking again gives the same pending task
    let (st, t) = s.post(&a, "/api/tasks/next", &json!({}));
    assert_eq!(st, 200, "{t}");
    let task = t["task_id"].as_str().expect("task id").to_string();
    let ids: Vec<String> = t["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(t["replies"][0].get("reward").is_none(), "scores are hidden");
    let (_, again) = s.post(&a, "/api/tasks/next", &json!({}));
    assert_eq!(again["task_id"], t["task_id"]);
    // bob cannot see or rank ann's task
    let (st, _) = s.get(&b, &format!("/api/tasks/{task}"));
    assert_eq!(st, 404);
    let (st, _) = s.post(
        &b,
        &format!("/api/tasks/{task}/ranking"),
        &json!({"ranking": ids}),
    );
    assert_eq!(st, 404);
    // a ranking that is not a permutation of the replies is refused
    let (st, v) = s.post(
        &a,
        &format!("/api/tasks/{task}/ranking"),
        &json!({"ranking": [ids[0], ids[0], ids[1]]}),
    );
    assert_eq!(st, 400, "{v}");
    let (st, _) = s.post(
        &a,
        &format!("/api/tasks/{task}/ranking"),
        &json!({"ranking": ["nope"]}),
    );
    assert_eq!(st, 400);
    let (st, _) = s.post(
        &a,
        &format!("/api/tasks/{task}/ranking"),
        &json!({"skip": ""}),
    );
    assert_eq!(st, 400);
    // ann ranks [2, 0, 1]
    let order = vec![ids[2].clone(), ids[0].clone(), ids[1].clone()];
    let (st, v) = s.post(
        &a,
        &format!("/api/tasks/{task}/ranking"),
        &json!({"ranking": order}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["progress"]["ranked"], 1);
    let (st, g) = s.get(&a, &format!("/api/tasks/{task}"));
    assert_eq!(st, 200);
    assert_eq!(g["ranking"]["ranking"], json!(order));
    // bob is given ann's task (overlap 2) and ranks [2, 1, 0]: agreement 2/3
    let (_, tb) = s.post(&b, "/api/tasks/next", &json!({}));
    assert_eq!(tb["task_id"], t["task_id"], "the shared task first");
    let (st, _) = s.post(
        &b,
        &format!("/api/tasks/{task}/ranking"),
        &json!({"ranking": [ids[2], ids[1], ids[0]]}),
    );
    assert_eq!(st, 200);
    let (st, ag) = s.get(&s.admin, "/api/admin/agreement");
    assert_eq!(st, 200, "{ag}");
    assert_eq!(ag["shared_tasks"], 1);
    assert!(
        (ag["mean"].as_f64().expect("mean") - 2.0 / 3.0).abs() < 1e-9,
        "{ag}"
    );
    assert_eq!(s.get(&a, "/api/admin/agreement").0, 403);
    // the prompt and the replies come back verbatim
    let prompt = t["prompt"].as_str().expect("prompt");
    assert!(prompt == TRICKY || prompt == "Say hi.", "{prompt}");
    // exports: 3 pairs per ranking; min agreement 0.5 keeps the task, 0.9 drops it
    let export = |q: &str| -> Vec<Value> {
        let r = ureq::get(&s.url(&format!("/api/admin/export?{q}")))
            .set("Authorization", &format!("Bearer {}", s.admin))
            .call()
            .expect("export");
        r.into_string()
            .expect("body")
            .lines()
            .map(|l| serde_json::from_str(l).expect("jsonl"))
            .collect()
    };
    let pairs = export("kind=pairs");
    assert_eq!(pairs.len(), 6);
    let text_of = |id: &str| {
        t["replies"]
            .as_array()
            .and_then(|r| r.iter().find(|x| x["id"] == id))
            .map(|x| x["text"].clone())
            .expect("reply")
    };
    let ann: Vec<&Value> = pairs.iter().filter(|p| p["labeller"] == "ann").collect();
    assert_eq!(ann[0]["chosen"], text_of(&ids[2]));
    assert_eq!(ann[0]["rejected"], text_of(&ids[0]));
    assert_eq!(ann[0]["prompt"], json!(prompt));
    assert_eq!(export("kind=pairs&min_agreement=0.5").len(), 6);
    assert_eq!(export("kind=pairs&min_agreement=0.9").len(), 0);

    // demonstrations: write one, skip one (the draft is kept), export as SFT messages
    let (st, w) = s.post(&a, "/api/write/next", &json!({}));
    assert_eq!(st, 200, "{w}");
    let (st, _) = s.post(
        &a,
        "/api/write",
        &json!({"prompt_id": w["prompt_id"], "text": TRICKY}),
    );
    assert_eq!(st, 200);
    let (_, w2) = s.post(&a, "/api/write/next", &json!({}));
    assert_ne!(w2["prompt_id"], w["prompt_id"]);
    let (st, _) = s.post(
        &a,
        "/api/write/skip",
        &json!({"prompt_id": w2["prompt_id"], "reason": "unclear", "draft": "half a reply"}),
    );
    assert_eq!(st, 200);
    let (st, _) = s.post(&a, "/api/write/next", &json!({}));
    assert_eq!(st, 404, "nothing left for ann");
    let sft = export("kind=sft");
    assert_eq!(sft.len(), 1);
    assert_eq!(
        sft[0]["messages"][1],
        json!({"role": "assistant", "content": TRICKY})
    );

    // chats: ann's conversation and thumbs; bob cannot touch them
    let (_, c) = s.post(&a, "/api/conversations", &json!({}));
    let cid = c["id"].as_str().expect("conversation id");
    let (_, m) = s.post(
        &a,
        &format!("/api/conversations/{cid}/messages"),
        &json!({"role": "assistant", "content": "<script>x</script>"}),
    );
    let mid = m["id"].as_str().expect("message id");
    assert_eq!(
        s.post(
            &b,
            &format!("/api/messages/{mid}/thumbs"),
            &json!({"thumbs": 1})
        )
        .0,
        404
    );
    assert_eq!(
        s.post(
            &b,
            &format!("/api/conversations/{cid}/messages"),
            &json!({"role": "user", "content": "hi"})
        )
        .0,
        404
    );
    assert_eq!(
        s.post(
            &a,
            &format!("/api/messages/{mid}/thumbs"),
            &json!({"thumbs": 5})
        )
        .0,
        400
    );
    assert_eq!(
        s.post(
            &a,
            &format!("/api/messages/{mid}/thumbs"),
            &json!({"thumbs": -1})
        )
        .0,
        200
    );
    let (_, me) = s.get(&a, "/api/me");
    assert_eq!(me["progress"]["thumbs"], 1);
    let (_, users) = s.get(&s.admin, "/api/admin/users");
    let ann_row = users["users"]
        .as_array()
        .and_then(|u| u.iter().find(|x| x["name"] == "ann"))
        .cloned()
        .expect("ann");
    assert_eq!(
        (ann_row["ranked"].clone(), ann_row["written"].clone()),
        (json!(1), json!(1))
    );
    s.stop();
}

#[test]
fn labelling_flow_on_sqlite() {
    flow(Db::Sqlite);
}

#[test]
fn labelling_flow_on_postgres() {
    flow(Db::Postgres);
}

#[test]
fn login_sets_a_safe_cookie_and_bodies_must_be_json() {
    let s = TestServer::start(Db::Sqlite, |_| {}).expect("sqlite always runs");
    let tok = s.user("cat");
    let r = ureq::post(&s.url("/login")).send_json(json!({"token": "palm-wrong"}));
    assert_eq!(read(r).0, 401);
    let r = ureq::post(&s.url("/login"))
        .send_json(json!({"token": tok}))
        .expect("login");
    let cookie = r.header("set-cookie").expect("a cookie").to_string();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    let pair = cookie.split(';').next().expect("name=value");
    let (st, me) = read(ureq::get(&s.url("/api/me")).set("Cookie", pair).call());
    assert_eq!((st, me["name"].clone()), (200, json!("cat")));
    // a form post (what another site could send) is not JSON: refused
    let r = ureq::post(&s.url("/api/tasks/next"))
        .set("Cookie", pair)
        .set("Content-Type", "application/x-www-form-urlencoded")
        .send_string("a=1");
    assert_eq!(read(r).0, 400);
    // pages carry a strict Content-Security-Policy
    let r = ureq::get(&s.url("/label")).call().expect("page");
    let csp = r
        .header("content-security-policy")
        .expect("csp")
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    s.stop();
}

/// `--reward`: every labelling reply is scored and the score stored, never sent.
#[test]
fn reward_scores_are_stored_and_hidden() {
    use std::sync::{Arc, Mutex};
    // the score of a reply: its number of ids
    let rm: palm_serve::server::RewardFn =
        Arc::new(Mutex::new(|_p: &[u32], r: &[u32]| Ok(r.len() as f32)));
    let s = TestServer::start_with(Db::Sqlite, |c| c.replies = 2, Some(rm))
        .expect("sqlite always runs");
    s.rt.block_on(s.state().store.add_prompts(&["Score me".to_string()], "t"))
        .expect("prompts");
    let (st, t) = s.post(&s.admin, "/api/tasks/next", &json!({}));
    assert_eq!(st, 200, "{t}");
    assert!(!t.to_string().contains("reward"), "{t}");
    for r in t["replies"].as_array().expect("replies") {
        let id = r["id"].as_str().expect("id");
        let text = r["text"].as_str().expect("text");
        let row: (f64,) =
            s.rt.block_on(
                sqlx::query_as("SELECT reward FROM generations WHERE id = $1")
                    .bind(id)
                    .fetch_one(s.state().store.pool()),
            )
            .expect("generation row");
        // bytes tokenizer: one id per byte of the (trimmed) reply
        assert_eq!(row.0, text.len() as f64, "{id}");
    }
    s.stop();
}

/// `--compare`: both models are served, and a task's replies come from both, shuffled.
#[test]
fn a_second_model_is_served_and_shares_the_replies() {
    let second = tempfile::tempdir().expect("tempdir");
    let cfg = palm::config::PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len: 256,
        ..palm::config::PalmConfig::new(256, 32, 2)
    };
    let m2 = second.path().join("policy-b");
    palm::Model::from(palm::Palm::new(&cfg, 99, &candle_core::Device::Cpu).expect("model"))
        .save(&m2)
        .expect("save");
    let s = TestServer::start(Db::Sqlite, |c| {
        c.replies = 4;
        c.compare = Some(m2.clone());
    })
    .expect("sqlite always runs");
    let (_, models) = s.get(&s.admin, "/v1/models");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["model", "policy-b"]);
    let ask = |model: &str| {
        s.post(
            &s.admin,
            "/v1/completions",
            &json!({"model": model, "prompt": "abc", "max_tokens": 8, "temperature": 0}),
        )
    };
    let (st, a) = ask("model");
    let (st2, b) = ask("policy-b");
    assert_eq!((st, st2), (200, 200));
    assert_eq!(b["model"], "policy-b");
    assert_ne!(
        a["choices"][0]["text"], b["choices"][0]["text"],
        "two different models"
    );
    s.rt.block_on(s.state().store.add_prompts(&["Compare".to_string()], "t"))
        .expect("prompts");
    let (st, t) = s.post(&s.admin, "/api/tasks/next", &json!({}));
    assert_eq!(st, 200, "{t}");
    let mut by_model = std::collections::BTreeMap::new();
    for r in t["replies"].as_array().expect("replies") {
        let row: (String,) =
            s.rt.block_on(
                sqlx::query_as("SELECT model FROM generations WHERE id = $1")
                    .bind(r["id"].as_str().expect("id"))
                    .fetch_one(s.state().store.pool()),
            )
            .expect("generation");
        *by_model.entry(row.0).or_insert(0) += 1;
    }
    assert_eq!(
        by_model,
        [("model".to_string(), 2), ("policy-b".to_string(), 2)]
            .into_iter()
            .collect()
    );
    s.stop();
}
