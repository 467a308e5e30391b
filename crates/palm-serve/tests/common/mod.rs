//! A server on a free loopback port over a tiny random PaLM (bytes tokenizer, default chat
//! template), with its own database, and a blocking HTTP client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use palm::config::PalmConfig;
use palm::Palm;
use palm_serve::server::{Running, ServeConfig};
use palm_serve::store::testing;
use serde_json::Value;

/// Saves a tiny random PaLM over bytes (256 ids, context 256) in `dir/model`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    let cfg = PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len: 256,
        ..PalmConfig::new(256, 32, 2)
    };
    let m = Palm::new(&cfg, 7, &candle_core::Device::Cpu).expect("tiny model");
    let path = dir.join("model");
    palm::Model::from(m)
        .save(&path)
        .expect("saving the tiny model");
    path
}

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Db {
    Sqlite,
    Postgres,
}

pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub running: Option<Running>,
    pub base: String,
    pub admin: String,
    pub dir: tempfile::TempDir,
    pg: Option<testing::TempDb>,
}

impl TestServer {
    /// Starts a server; `None` when the database is PostgreSQL and no test server is configured
    /// (skipped loudly by `testing::postgres_db`).
    pub fn start(db: Db, tweak: impl FnOnce(&mut ServeConfig)) -> Option<Self> {
        Self::start_with(db, tweak, None)
    }

    /// [`TestServer::start`] with a reward function scoring the labelling replies.
    pub fn start_with(
        db: Db,
        tweak: impl FnOnce(&mut ServeConfig),
        reward: Option<palm_serve::server::RewardFn>,
    ) -> Option<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, pg) = match db {
            Db::Sqlite => (testing::sqlite_url(dir.path()), None),
            Db::Postgres => {
                let pg = rt.block_on(testing::postgres_db())?;
                (pg.url.clone(), Some(pg))
            }
        };
        let mut cfg = ServeConfig::new(tiny_model(dir.path()), url);
        cfg.port = 0;
        cfg.label_max_tokens = 12;
        cfg.default_max_tokens = 16;
        tweak(&mut cfg);
        let running = rt
            .block_on(palm_serve::server::start_with_reward(cfg, reward))
            .expect("server starts");
        let admin = rt
            .block_on(running.state.store.add_user("admin", true))
            .expect("admin")
            .1;
        let base = format!("http://{}", running.addr);
        Some(Self {
            rt,
            running: Some(running),
            base,
            admin,
            dir,
            pg,
        })
    }

    pub fn state(&self) -> &palm_serve::server::AppState {
        &self.running.as_ref().expect("running").state
    }

    /// A new labeller's token.
    pub fn user(&self, name: &str) -> String {
        self.rt
            .block_on(self.state().store.add_user(name, false))
            .expect("user")
            .1
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POST JSON with a token: (status, body as JSON or a string).
    pub fn post(&self, token: &str, path: &str, body: &Value) -> (u16, Value) {
        let r = ureq::post(&self.url(path))
            .set("Authorization", &format!("Bearer {token}"))
            .send_json(body.clone());
        read(r)
    }

    pub fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let r = ureq::get(&self.url(path))
            .set("Authorization", &format!("Bearer {token}"))
            .call();
        read(r)
    }

    pub fn stop(mut self) {
        if let Some(r) = self.running.take() {
            self.rt.block_on(r.stop()).expect("server stops");
        }
        if let Some(pg) = self.pg.take() {
            self.rt.block_on(pg.drop_db());
        }
    }
}

/// Status and body of a response (errors included).
pub fn read(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

/// The error object of an error response, checked for OpenAI's shape.
pub fn error_of(v: &Value) -> &Value {
    let e = v
        .get("error")
        .unwrap_or_else(|| panic!("not an error body: {v}"));
    for k in ["message", "type", "param", "code"] {
        assert!(e.get(k).is_some(), "error without `{k}`: {v}");
    }
    e
}
