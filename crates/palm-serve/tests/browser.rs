//! A real browser: Debian's headless Chromium, driven through chromedriver's WebDriver API,
//! logs in as a labeller, ranks a task with the keyboard, and the ranking is found in the
//! database. It also chats on `/` and saves screenshots of `/` and `/label` (into
//! `PALM_SCREENSHOTS_DIR`, default `target/screenshots`). Model text and prompts with `<script>`
//! are shown as text.
//!
//! Without chromium and chromedriver the test is skipped loudly; with `PALM_REQUIRE_BROWSER=1`
//! (CI) it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Db, TestServer};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn browser_available() -> bool {
    if Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists() {
        return true;
    }
    if std::env::var("PALM_REQUIRE_BROWSER").as_deref() == Ok("1") {
        panic!("{CHROMIUM} or {CHROMEDRIVER} is missing and PALM_REQUIRE_BROWSER=1 (apt-get install chromium chromium-driver)");
    }
    palm::fixtures::skipped(&format!("{CHROMIUM} / {CHROMEDRIVER} absent (apt-get install chromium chromium-driver; CI sets PALM_REQUIRE_BROWSER=1)"));
    false
}

/// A chromedriver process and one browser session.
struct Driver {
    child: Child,
    base: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let t0 = Instant::now();
        while ureq::get(&format!("{base}/status")).call().is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "chromedriver did not come up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1200,900".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}});
        let mut d = Self {
            child,
            base,
            session: String::new(),
            _profile: profile,
        };
        let v = d.call("POST", "/session", Some(caps));
        d.session = v["sessionId"].as_str().expect("session id").to_string();
        d
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{}", self.base, path);
        let r = match body {
            Some(b) => ureq::request(method, &url).send_json(b),
            None => ureq::request(method, &url).call(),
        };
        let (status, v) = common::read(r);
        assert!(status < 300, "WebDriver {method} {path}: {status} {v}");
        v["value"].clone()
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{}", self.session, rest)
    }

    fn go(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({"url": url})));
    }

    /// The element matching a CSS selector, waiting up to 20 s for it to exist.
    fn find(&self, css: &str) -> String {
        let t0 = Instant::now();
        loop {
            let r = ureq::post(&format!("{}{}", self.base, self.s("/element")))
                .send_json(json!({"using": "css selector", "value": css}));
            if let (200, v) = common::read(r) {
                if let Some(id) = v["value"].as_object().and_then(|o| o.values().next()) {
                    return id.as_str().expect("element id").to_string();
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "no element `{css}`");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn count(&self, css: &str) -> usize {
        let v = self.call(
            "POST",
            &self.s("/elements"),
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_array().map_or(0, Vec::len)
    }

    fn text(&self, el: &str) -> String {
        self.call("GET", &self.s(&format!("/element/{el}/text")), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn type_into(&self, el: &str, text: &str) {
        self.call(
            "POST",
            &self.s(&format!("/element/{el}/value")),
            Some(json!({"text": text})),
        );
    }

    fn click(&self, el: &str) {
        self.call(
            "POST",
            &self.s(&format!("/element/{el}/click")),
            Some(json!({})),
        );
    }

    /// Presses keys on the page (not in a field), as a person would.
    fn press(&self, keys: &[&str]) {
        let mut actions = Vec::new();
        for k in keys {
            actions.push(json!({"type": "keyDown", "value": k}));
            actions.push(json!({"type": "keyUp", "value": k}));
        }
        self.call(
            "POST",
            &self.s("/actions"),
            Some(json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})),
        );
    }

    fn screenshot(&self, path: &Path) {
        let b64 = self.call("GET", &self.s("/screenshot"), None);
        let bytes = decode_base64(b64.as_str().expect("base64 png"));
        std::fs::write(path, bytes).expect("writing the screenshot");
    }

    fn wait_for(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !ok() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (WebDriver's screenshot encoding).
fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk.iter().take_while(|&&c| c != b'=').count();
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        let bytes = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        out.extend_from_slice(&bytes[..n.saturating_sub(1)]);
    }
    out
}

fn screenshots_dir() -> PathBuf {
    let dir = std::env::var("PALM_SCREENSHOTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots"));
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

#[test]
fn a_labeller_ranks_with_the_keyboard_in_chromium() {
    if !browser_available() {
        return;
    }
    // PALM_BROWSER_MODEL: a real model for the README's screenshots (default: the tiny one)
    let model = std::env::var("PALM_BROWSER_MODEL").ok().map(PathBuf::from);
    let s = TestServer::start(Db::Sqlite, |c| {
        c.replies = 3;
        if let Some(m) = model {
            c.model = m;
            c.label_max_tokens = 60;
        }
    })
    .expect("sqlite always runs");
    let token = s.user("lab");
    let tricky = "<script>alert('x')</script> Which reply is kinder?";
    s.rt.block_on(s.state().store.add_prompts(&[tricky.to_string()], "test"))
        .expect("prompts");
    let d = Driver::start();
    let shots = screenshots_dir();

    // log in on /label with the token
    d.go(&s.url("/label"));
    let field = d.find("#token");
    d.type_into(&field, &token);
    d.click(&d.find("#login"));
    // the task: the prompt as text, three replies
    let prompt = d.find("#prompt");
    d.wait_for("the prompt", || d.text(&prompt) == tricky);
    d.wait_for("three replies", || d.count(".reply") == 3);
    d.screenshot(&shots.join("label.png"));
    let ids: Vec<String> = d
        .call(
            "POST",
            &d.s("/elements"),
            Some(json!({"using": "css selector", "value": ".reply"})),
        )
        .as_array()
        .expect("replies")
        .iter()
        .map(|e| {
            let el = e
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(Value::as_str)
                .expect("element");
            d.call(
                "GET",
                &d.s(&format!("/element/{el}/attribute/data-id")),
                None,
            )
            .as_str()
            .expect("data-id")
            .to_string()
        })
        .collect();
    // rank with the keyboard: 3, 1, 2, then Enter
    d.press(&["3", "1", "2", "\u{E007}"]);
    let store = &s.state().store;
    let user =
        s.rt.block_on(store.user_by_token(&token))
            .expect("db")
            .expect("user");
    d.wait_for("the ranking in the database", || {
        s.rt.block_on(store.progress(&user.id))
            .is_ok_and(|p| p.ranked == 1)
    });
    // the stored order is the pressed one
    let pairs = s.rt.block_on(store.export_pairs(None)).expect("export");
    assert_eq!(pairs.len(), 3, "3 replies give 3 pairs: {pairs:?}");
    assert!(s
        .rt
        .block_on(store.pending_task(&user.id))
        .expect("db")
        .is_none());
    let (_, got) =
        s.rt.block_on(store.task_for_user(&pairs[0].task_id, &user.id))
            .expect("db")
            .expect("the labeller's task");
    let got = got.expect("a ranking").ranking;
    assert_eq!(got, vec![ids[2].clone(), ids[0].clone(), ids[1].clone()]);

    // model output with markup is shown as text and never runs: a task whose replies are HTML
    let evil = [
        "<script>window.pwned = 1</script>reply one".to_string(),
        "<img src=x onerror=\"window.pwned = 2\">reply two".to_string(),
    ];
    s.rt.block_on(async {
        store
            .add_prompts(&["Markup in replies".to_string()], "test")
            .await
            .expect("prompt");
        let p = store
            .prompt_for_new_task(&user.id)
            .await
            .expect("db")
            .expect("a prompt");
        let mut gens = Vec::new();
        for t in &evil {
            let g = palm_serve::store::NewGeneration {
                prompt_id: p.id.clone(),
                model: "test".into(),
                params: json!({}),
                text: t.clone(),
                reward: None,
            };
            gens.push(store.add_generation(&g).await.expect("generation"));
        }
        store
            .create_task(&user.id, &p.id, &gens)
            .await
            .expect("task");
    });
    d.go(&s.url("/label"));
    let prompt = d.find("#prompt");
    d.wait_for("the markup task", || d.text(&prompt) == "Markup in replies");
    let shown: Vec<String> = d
        .call(
            "POST",
            &d.s("/elements"),
            Some(json!({"using": "css selector", "value": ".reply"})),
        )
        .as_array()
        .expect("replies")
        .iter()
        .map(|e| {
            d.text(
                e.as_object()
                    .and_then(|o| o.values().next())
                    .and_then(Value::as_str)
                    .expect("element"),
            )
        })
        .collect();
    for t in &evil {
        assert!(
            shown.iter().any(|x| x.contains(t.as_str())),
            "{t:?} not shown as text in {shown:?}"
        );
    }
    let pwned = d.call(
        "POST",
        &d.s("/execute/sync"),
        Some(json!({"script": "return window.pwned || 0", "args": []})),
    );
    assert_eq!(pwned, json!(0), "markup in a reply ran");
    assert_eq!(d.count(".reply img"), 0);

    // chat on /: a reply streams in and is shown as text
    d.go(&s.url("/"));
    // the tiny model's context is 256 tokens: ask for a short reply
    let max = d.find("#max-tokens");
    d.call(
        "POST",
        &d.s(&format!("/element/{max}/clear")),
        Some(json!({})),
    );
    d.type_into(&max, "24");
    let box_ = d.find("#message");
    d.type_into(&box_, "Hello <b>there</b>\u{E007}");
    d.wait_for("the streamed reply", || d.count(".msg-assistant") == 1);
    d.wait_for("the reply's thumbs", || d.count(".thumb-up") == 1);
    let user_msg = d.find(".msg-user .content");
    assert_eq!(d.text(&user_msg), "Hello <b>there</b>");
    d.screenshot(&shots.join("chat.png"));
    eprintln!("screenshots in {}", shots.display());
    drop(d);
    s.stop();
}
