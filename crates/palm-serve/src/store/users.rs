//! Accounts, token lookup and contribution counts.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{flag, new_id, now_ms, sha256_hex, Context, Progress, Result, Store, StoreError};
use super::{User, UserStats};

/// Counts shared by [`Store::progress`] and [`Store::list_users`], for the user `u.id`.
const COUNTS: &str = "\
    (SELECT COUNT(*) FROM assignments a WHERE a.user_id = u.id AND a.state = 'done') AS ranked, \
    (SELECT COUNT(*) FROM assignments a WHERE a.user_id = u.id AND a.state = 'skipped') \
        + (SELECT COUNT(*) FROM write_skips w WHERE w.user_id = u.id) AS skipped, \
    (SELECT COUNT(*) FROM demonstrations d WHERE d.user_id = u.id) AS written, \
    (SELECT COUNT(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id \
        WHERE c.user_id = u.id AND m.thumbs IS NOT NULL) AS thumbs, \
    (SELECT COUNT(*) FROM assignments a WHERE a.user_id = u.id AND a.state = 'pending') AS pending";

/// A fresh bearer token: `palm-` and 32 random bytes as 64 hex digits.
fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("palm-{hex}")
}

fn user_from_row(row: &AnyRow) -> std::result::Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        admin: row.try_get::<i64, _>("is_admin")? != 0,
    })
}

impl Store {
    /// Creates an account and returns it with its token. Only the token's sha256 is stored,
    /// so the token cannot be shown again. The name is trimmed; `Invalid` if it is empty or
    /// taken.
    pub async fn add_user(&self, name: &str, admin: bool) -> Result<(User, String)> {
        let name = name.trim();
        if name.is_empty() {
            return Err(StoreError::Invalid("user name is empty".into()));
        }
        if name.chars().any(char::is_control) {
            return Err(StoreError::Invalid(
                "user name contains control characters".into(),
            ));
        }
        let user = User {
            id: new_id(),
            name: name.to_string(),
            admin,
        };
        let token = new_token();
        let res = sqlx::query(
            "INSERT INTO users (id, name, token_hash, is_admin, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&user.id)
        .bind(&user.name)
        .bind(sha256_hex(&token))
        .bind(flag(admin))
        .bind(now_ms())
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok((user, token)),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Invalid(format!("user name {name:?} is taken")))
            }
            Err(e) => Err(e).ctx("adding a user"),
        }
    }

    /// The account holding `token`, if any.
    pub async fn user_by_token(&self, token: &str) -> Result<Option<User>> {
        let row = sqlx::query("SELECT id, name, is_admin FROM users WHERE token_hash = $1")
            .bind(sha256_hex(token))
            .fetch_optional(&self.pool)
            .await
            .ctx("looking up a token")?;
        row.as_ref()
            .map(user_from_row)
            .transpose()
            .ctx("reading a user")
    }

    /// Every account with its counts, in creation order.
    pub async fn list_users(&self) -> Result<Vec<UserStats>> {
        let sql = format!(
            "SELECT u.name, u.is_admin, {COUNTS} FROM users u ORDER BY u.created_at, u.name"
        );
        let rows = sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .ctx("listing users")?;
        rows.iter()
            .map(|r| {
                Ok(UserStats {
                    name: r.try_get("name")?,
                    admin: r.try_get::<i64, _>("is_admin")? != 0,
                    ranked: r.try_get("ranked")?,
                    skipped: r.try_get("skipped")?,
                    written: r.try_get("written")?,
                    thumbs: r.try_get("thumbs")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .ctx("reading users")
    }

    /// The counts of one user (all zero for an unknown id).
    pub async fn progress(&self, user_id: &str) -> Result<Progress> {
        let sql = format!("SELECT {COUNTS} FROM (SELECT $1 AS id) u");
        let row = sqlx::query(&sql)
            .bind(user_id)
            .fetch_one(&self.pool)
            .await
            .ctx("counting progress")?;
        let read = || -> std::result::Result<Progress, sqlx::Error> {
            Ok(Progress {
                ranked: row.try_get("ranked")?,
                skipped: row.try_get("skipped")?,
                written: row.try_get("written")?,
                thumbs: row.try_get("thumbs")?,
                pending: row.try_get("pending")?,
            })
        };
        read().ctx("reading progress")
    }
}
