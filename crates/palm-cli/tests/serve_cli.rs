//! `palm serve` and `palm feedback` as processes: kill -9 the server while rankings arrive, and
//! every ranking that got a 2xx is in the database after a restart; the exports feed
//! `palm reward train`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use palm::model::{Model, Palm};
use palm::PalmConfig;
use serde_json::{json, Value};

/// Rankings the server acknowledged: (task id, reply ids best first).
type Acked = Vec<(String, Vec<Value>)>;

fn palm_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("palm")
}

fn tiny_model(dir: &Path) -> PathBuf {
    let cfg = PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len: 128,
        ..PalmConfig::new(256, 16, 1)
    };
    let p = dir.join("model");
    Model::Palm(Palm::new(&cfg, 0, &Device::Cpu).expect("model"))
        .save(&p)
        .expect("save");
    p
}

fn feedback(args: &[&str]) -> String {
    let out = Command::new(palm_bin())
        .arg("feedback")
        .args(args)
        .output()
        .expect("palm feedback runs");
    assert!(
        out.status.success(),
        "palm feedback {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Starts `palm serve` on a free port; returns the child and its base URL.
fn serve(model: &Path, db: &str) -> (Child, String) {
    let mut child = Command::new(palm_bin())
        .args([
            "serve",
            "--port",
            "0",
            "--replies",
            "2",
            "--label-max-tokens",
            "4",
            "--db",
            db,
        ])
        .arg("--model")
        .arg(model)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("palm serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let base = loop {
        let line = lines.next().expect("server output").expect("readable");
        if let Some(rest) = line.split("on http://").nth(1) {
            break format!(
                "http://{}",
                rest.split_whitespace().next().expect("address")
            );
        }
    };
    // keep draining stderr so the server never blocks on a full pipe
    std::thread::spawn(move || for _ in lines {});
    (child, base)
}

fn post(base: &str, token: &str, path: &str, body: Value) -> Result<(u16, Value), String> {
    match ureq::post(&format!("{base}{path}"))
        .set("Authorization", &format!("Bearer {token}"))
        .timeout(Duration::from_secs(20))
        .send_json(body)
    {
        Ok(r) => Ok((r.status(), r.into_json().map_err(|e| e.to_string())?)),
        Err(ureq::Error::Status(c, r)) => Ok((c, r.into_json().unwrap_or(Value::Null))),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn kill_9_while_rankings_arrive_loses_no_acknowledged_ranking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = tiny_model(dir.path());
    let db = format!("sqlite://{}", dir.path().join("f.sqlite").display());
    let token = feedback(&["user", "add", "lab", "--db", &db])
        .trim()
        .to_string();
    let admin = feedback(&["user", "add", "boss", "--admin", "--db", &db])
        .trim()
        .to_string();
    let prompts = dir.path().join("prompts.txt");
    let body: String = (0..400).map(|i| format!("Prompt number {i}?\n")).collect();
    std::fs::write(&prompts, body).expect("prompts");
    feedback(&["prompts", "--db", &db, prompts.to_str().expect("path")]);

    let (mut child, base) = serve(&model, &db);
    // a labeller ranks as fast as it can; every 2xx is recorded
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (acked, stop, base, token) = (acked.clone(), stop.clone(), base.clone(), token.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok((200, t)) = post(&base, &token, "/api/tasks/next", json!({})) else {
                    break; // the server is gone
                };
                let id = t["task_id"].as_str().expect("task id").to_string();
                let mut order: Vec<Value> = t["replies"]
                    .as_array()
                    .expect("replies")
                    .iter()
                    .map(|r| r["id"].clone())
                    .collect();
                order.reverse();
                match post(
                    &base,
                    &token,
                    &format!("/api/tasks/{id}/ranking"),
                    json!({"ranking": order}),
                ) {
                    Ok((200, _)) => acked.lock().expect("lock").push((id, order)),
                    _ => break,
                }
            }
        })
    };
    // kill -9 once some rankings have landed, while more are in flight
    let t0 = Instant::now();
    while acked.lock().expect("lock").len() < 8 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no rankings landed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("worker");
    let acked = acked.lock().expect("lock").clone();
    eprintln!("{} rankings acknowledged before kill -9", acked.len());

    // after a restart every acknowledged ranking is there, as sent
    let (mut child, base) = serve(&model, &db);
    for (id, order) in &acked {
        let r = ureq::get(&format!("{base}/api/tasks/{id}"))
            .set("Authorization", &format!("Bearer {token}"))
            .call()
            .expect("task after restart");
        let v: Value = r.into_json().expect("json");
        assert_eq!(&v["ranking"]["ranking"], &json!(order), "task {id}");
    }
    child.kill().expect("stop");
    child.wait().expect("reaped");

    // the export has one pair per ranking (2 replies) and trains a reward model
    let pairs = dir.path().join("pairs.jsonl");
    feedback(&[
        "export",
        "--db",
        &db,
        "--out",
        pairs.to_str().expect("path"),
    ]);
    let text = std::fs::read_to_string(&pairs).expect("pairs");
    assert!(
        text.lines().count() >= acked.len(),
        "{} pairs for {} rankings",
        text.lines().count(),
        acked.len()
    );
    let first: Value = serde_json::from_str(text.lines().next().expect("a pair")).expect("json");
    for k in ["prompt", "chosen", "rejected", "labeller", "time"] {
        assert!(first.get(k).is_some(), "pair without {k}: {first}");
    }
    let _ = admin;
    let out = Command::new(palm_bin())
        .args([
            "reward",
            "train",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--max-len",
            "48",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&pairs)
        .arg("--out")
        .arg(dir.path().join("rm"))
        .output()
        .expect("palm reward train runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // and straight from the database: the run keeps a snapshot of the pairs it trained on
    let rm2 = dir.path().join("rm2");
    let out = Command::new(palm_bin())
        .args([
            "reward",
            "train",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--max-len",
            "48",
        ])
        .arg("--model")
        .arg(&model)
        .args(["--data", &db])
        .arg("--out")
        .arg(&rm2)
        .output()
        .expect("palm reward train runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap = std::fs::read_to_string(rm2.join("feedback-pairs-0.jsonl")).expect("snapshot");
    assert_eq!(snap, text, "the snapshot is the export");

    // the rest of the loop: PPO against the people's reward model, then serve the new policy
    let ppo = dir.path().join("ppo");
    let out = Command::new(palm_bin())
        .args([
            "ppo",
            "--steps",
            "1",
            "--batch-size",
            "3",
            "--minibatch-size",
            "3",
        ])
        .args(["--epochs", "1", "--max-new-tokens", "4", "--seed", "3"])
        .arg("--policy")
        .arg(&model)
        .arg("--reward")
        .arg(&rm2)
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&ppo)
        .output()
        .expect("palm ppo runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut child, base) = serve(&ppo.join("policy"), &db);
    let (st, v) = post(
        &base,
        &token,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Prompt number 1?"}], "max_tokens": 4}),
    )
    .expect("the new policy answers");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["model"], "policy");
    child.kill().expect("stop");
    child.wait().expect("reaped");
}
