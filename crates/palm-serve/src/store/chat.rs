//! Chat conversations, their messages, and thumbs up/down on replies.

use sqlx::Row;

use super::{new_id, no_nul, now_ms, Context, Result, Store, StoreError};

const ROLES: &[&str] = &["system", "user", "assistant"];

impl Store {
    /// Starts a conversation owned by the caller; returns its id.
    pub async fn new_conversation(&self, user_id: &str, model: &str) -> Result<String> {
        no_nul("the model name", model)?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO conversations (id, user_id, model, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(user_id)
        .bind(model)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .ctx("starting a conversation")?;
        Ok(id)
    }

    /// Appends a message to one of the caller's conversations (`NotFound` otherwise); `role`
    /// is system, user or assistant (`Invalid` otherwise). Returns the message id.
    pub async fn add_message(
        &self,
        conversation_id: &str,
        user_id: &str,
        role: &str,
        content: &str,
    ) -> Result<String> {
        if !ROLES.contains(&role) {
            return Err(StoreError::Invalid(format!(
                "role must be system, user or assistant, not {role:?}"
            )));
        }
        no_nul("the message", content)?;
        let mut tx = self.begin_write("adding a message").await?;
        // Ownership check and row lock in one: on PostgreSQL, appends to one conversation then
        // queue here, so each sees the previous one's index (SQLite's BEGIN IMMEDIATE already
        // serialises writers).
        let owned =
            sqlx::query("UPDATE conversations SET model = model WHERE id = $1 AND user_id = $2")
                .bind(conversation_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .ctx("looking up a conversation")?;
        if owned.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "conversation {conversation_id:?}"
            )));
        }
        let id = new_id();
        sqlx::query(
            "INSERT INTO messages (id, conversation_id, idx, role, content, created_at) \
             SELECT $1, $2, COALESCE(MAX(idx), -1) + 1, $3, $4, $5 FROM messages \
             WHERE conversation_id = $2",
        )
        .bind(&id)
        .bind(conversation_id)
        .bind(role)
        .bind(content)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .ctx("adding a message")?;
        tx.commit().await.ctx("committing a message")?;
        Ok(id)
    }

    /// Rates (1 or -1) or unrates (None) an assistant message in one of the caller's
    /// conversations. `NotFound` unless the message is the caller's; `Invalid` for other
    /// roles or values.
    pub async fn set_thumbs(
        &self,
        message_id: &str,
        user_id: &str,
        thumbs: Option<i64>,
    ) -> Result<()> {
        if !matches!(thumbs, None | Some(1) | Some(-1)) {
            return Err(StoreError::Invalid("thumbs must be 1, -1 or null".into()));
        }
        let mut tx = self.begin_write("rating a message").await?;
        let row = sqlx::query(
            "SELECT m.role FROM messages m JOIN conversations c ON c.id = m.conversation_id \
             WHERE m.id = $1 AND c.user_id = $2",
        )
        .bind(message_id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await
        .ctx("looking up a message")?
        .ok_or_else(|| StoreError::NotFound(format!("message {message_id:?}")))?;
        let role: String = row.try_get("role").ctx("reading a message")?;
        if role != "assistant" {
            return Err(StoreError::Invalid(
                "only assistant messages can be rated".into(),
            ));
        }
        sqlx::query("UPDATE messages SET thumbs = $1 WHERE id = $2")
            .bind(thumbs)
            .bind(message_id)
            .execute(&mut *tx)
            .await
            .ctx("rating a message")?;
        tx.commit().await.ctx("committing a rating")?;
        Ok(())
    }
}
