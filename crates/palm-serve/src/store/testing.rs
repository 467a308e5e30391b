//! Test support: throwaway PostgreSQL databases and SQLite URLs. Not part of the API.

use std::path::Path;

use sqlx::postgres::PgConnection;
use sqlx::Connection;

use super::redact_url;

/// The SQLite URL of a database file `palm.db` in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("palm.db").display())
}

/// A PostgreSQL database made for one test. Call [`TempDb::drop_db`] when done; if it is not
/// called (a test panicked), dropping the value removes the database on a helper thread.
#[derive(Debug)]
pub struct TempDb {
    /// The URL of the new database.
    pub url: String,
    admin_url: String,
    name: String,
    dropped: bool,
}

/// Creates a fresh database on the server named by `PALM_TEST_POSTGRES_URL` (for example
/// `postgres://postgres@127.0.0.1:5432/test`). When the variable is unset: panics if
/// `PALM_REQUIRE_POSTGRES=1`, otherwise prints a loud SKIPPED line and returns None.
pub async fn postgres_db() -> Option<TempDb> {
    let admin_url = match std::env::var("PALM_TEST_POSTGRES_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => {
            if std::env::var("PALM_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!(
                    "PALM_REQUIRE_POSTGRES=1 but PALM_TEST_POSTGRES_URL is not set \
                     (set it to e.g. postgres://postgres@127.0.0.1:5432/test)"
                );
            }
            palm::fixtures::skipped(
                "PALM_TEST_POSTGRES_URL is not set, so the PostgreSQL half of this test did not \
                 run (set it to e.g. postgres://postgres@127.0.0.1:5432/test; \
                 PALM_REQUIRE_POSTGRES=1 makes this an error)",
            );
            return None;
        }
    };
    let name = format!("palm_test_{:032x}", rand::random::<u128>());
    let mut conn = PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", redact_url(&admin_url)));
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
    conn.close().await.ok();
    Some(TempDb {
        url: with_database(&admin_url, &name),
        admin_url,
        name,
        dropped: false,
    })
}

/// `url` with its database name replaced by `name` (query parameters kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let host_start = base.find("://").map_or(0, |i| i + 3);
    let root = match base[host_start..].find('/') {
        Some(slash) => &base[..host_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

async fn drop_database(admin_url: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut conn = PgConnection::connect(admin_url).await?;
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    conn.close().await
}

impl TempDb {
    /// Drops the database (terminating any connections still open to it).
    pub async fn drop_db(mut self) {
        self.dropped = true;
        if let Err(e) = drop_database(&self.admin_url, &self.name).await {
            panic!("dropping test database {}: {e}", self.name);
        }
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // A runtime of its own on a thread of its own: this may run inside another runtime.
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            if let Err(e) = rt.block_on(drop_database(&admin_url, &name)) {
                eprintln!("warning: could not drop test database {name}: {e}");
            }
        });
        let _ = handle.join();
    }
}
