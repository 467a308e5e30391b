//! Demonstrations: reference replies written by people, their skips and unfinished drafts.

use sqlx::Row;

use super::{new_id, no_nul, now_ms, Context, Prompt, Result, Store, StoreError};

impl Store {
    /// The next prompt for the caller to write a reply to: one they have neither answered nor
    /// skipped; prompts they left a draft on come first (most recent draft first), then those
    /// with the fewest demonstrations, then the oldest. With the caller's saved draft, if any.
    pub async fn next_write_prompt(
        &self,
        user_id: &str,
    ) -> Result<Option<(Prompt, Option<String>)>> {
        let row = sqlx::query(
            "SELECT p.id, p.text, dr.draft FROM prompts p \
             LEFT JOIN write_drafts dr ON dr.prompt_id = p.id AND dr.user_id = $1 \
             WHERE NOT EXISTS (SELECT 1 FROM demonstrations d \
                               WHERE d.prompt_id = p.id AND d.user_id = $1) \
               AND NOT EXISTS (SELECT 1 FROM write_skips s \
                               WHERE s.prompt_id = p.id AND s.user_id = $1) \
             ORDER BY CASE WHEN dr.draft IS NULL THEN 1 ELSE 0 END, dr.updated_at DESC, \
                      (SELECT COUNT(*) FROM demonstrations d WHERE d.prompt_id = p.id), \
                      p.created_at, p.seq, p.id \
             LIMIT 1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await
        .ctx("choosing a prompt to write for")?;
        row.map(|r| {
            Ok((
                Prompt {
                    id: r.try_get("id")?,
                    text: r.try_get("text")?,
                },
                r.try_get("draft")?,
            ))
        })
        .transpose()
        .ctx("reading a prompt")
    }

    /// Stores the caller's reply to a prompt (verbatim) and drops their draft of it.
    /// `Invalid` if the text is blank or the prompt unknown.
    pub async fn add_demonstration(
        &self,
        user_id: &str,
        prompt_id: &str,
        text: &str,
    ) -> Result<String> {
        if text.trim().is_empty() {
            return Err(StoreError::Invalid("the reply is empty".into()));
        }
        no_nul("the reply", text)?;
        let mut tx = self.begin_write("adding a demonstration").await?;
        self.check_prompt(&mut tx, prompt_id).await?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO demonstrations (id, prompt_id, user_id, text, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&id)
        .bind(prompt_id)
        .bind(user_id)
        .bind(text)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .ctx("adding a demonstration")?;
        delete_draft(&mut tx, user_id, prompt_id).await?;
        tx.commit().await.ctx("committing a demonstration")?;
        Ok(id)
    }

    /// Records that the caller will not write for this prompt (it is not offered to them
    /// again), keeping what they had typed. `Invalid` if the reason is blank or the prompt
    /// unknown. Skipping again replaces the reason and draft.
    pub async fn skip_write(
        &self,
        user_id: &str,
        prompt_id: &str,
        reason: &str,
        draft: &str,
    ) -> Result<()> {
        if reason.trim().is_empty() {
            return Err(StoreError::Invalid("a skip needs a reason".into()));
        }
        no_nul("the reason", reason)?;
        no_nul("the draft", draft)?;
        let mut tx = self.begin_write("skipping a prompt").await?;
        self.check_prompt(&mut tx, prompt_id).await?;
        sqlx::query(
            "INSERT INTO write_skips (prompt_id, user_id, reason, draft, created_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (prompt_id, user_id) DO UPDATE SET reason = excluded.reason, \
             draft = excluded.draft, created_at = excluded.created_at",
        )
        .bind(prompt_id)
        .bind(user_id)
        .bind(reason)
        .bind(draft)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .ctx("skipping a prompt")?;
        delete_draft(&mut tx, user_id, prompt_id).await?;
        tx.commit().await.ctx("committing a skip")?;
        Ok(())
    }

    /// Saves the caller's unfinished reply to a prompt (returned by [`Store::next_write_prompt`]
    /// until they submit or skip); an empty draft deletes it. `Invalid` if the prompt is unknown.
    pub async fn save_write_draft(
        &self,
        user_id: &str,
        prompt_id: &str,
        draft: &str,
    ) -> Result<()> {
        no_nul("the draft", draft)?;
        let mut tx = self.begin_write("saving a draft").await?;
        self.check_prompt(&mut tx, prompt_id).await?;
        if draft.is_empty() {
            delete_draft(&mut tx, user_id, prompt_id).await?;
        } else {
            sqlx::query(
                "INSERT INTO write_drafts (prompt_id, user_id, draft, updated_at) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (prompt_id, user_id) DO UPDATE SET draft = excluded.draft, \
                 updated_at = excluded.updated_at",
            )
            .bind(prompt_id)
            .bind(user_id)
            .bind(draft)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .ctx("saving a draft")?;
        }
        tx.commit().await.ctx("committing a draft")?;
        Ok(())
    }

    async fn check_prompt(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        prompt_id: &str,
    ) -> Result<()> {
        let row = sqlx::query("SELECT id FROM prompts WHERE id = $1")
            .bind(prompt_id)
            .fetch_optional(&mut **tx)
            .await
            .ctx("looking up a prompt")?;
        match row {
            Some(_) => Ok(()),
            None => Err(StoreError::Invalid(format!("unknown prompt {prompt_id:?}"))),
        }
    }
}

async fn delete_draft(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    user_id: &str,
    prompt_id: &str,
) -> Result<()> {
    sqlx::query("DELETE FROM write_drafts WHERE prompt_id = $1 AND user_id = $2")
        .bind(prompt_id)
        .bind(user_id)
        .execute(&mut **tx)
        .await
        .ctx("deleting a draft")?;
    Ok(())
}
