//! Prompts (deduplicated on import) and sampled generations.

use sqlx::Row;

use super::{
    new_id, no_nul, now_ms, sha256_hex, Context, NewGeneration, Result, Store, StoreError,
};

impl Store {
    /// Imports prompts, skipping empty (all-whitespace) texts and texts already stored;
    /// returns how many were new. Texts are stored verbatim; import order is kept.
    pub async fn add_prompts(&self, texts: &[String], source: &str) -> Result<usize> {
        no_nul("the source", source)?;
        for text in texts {
            no_nul("a prompt", text)?;
        }
        let mut tx = self.begin_write("importing prompts").await?;
        let now = now_ms();
        let mut added = 0;
        for text in texts {
            if text.trim().is_empty() {
                continue;
            }
            // `WHERE 1 = 1` keeps SQLite from reading `ON CONFLICT` as a join constraint.
            let res = sqlx::query(
                "INSERT INTO prompts (id, text, text_hash, source, seq, created_at) \
                 SELECT $1, $2, $3, $4, COALESCE(MAX(seq), 0) + 1, $5 FROM prompts WHERE 1 = 1 \
                 ON CONFLICT (text_hash) DO NOTHING",
            )
            .bind(new_id())
            .bind(text)
            .bind(sha256_hex(text))
            .bind(source)
            .bind(now)
            .execute(&mut *tx)
            .await
            .ctx("importing a prompt")?;
            added += res.rows_affected() as usize;
        }
        tx.commit().await.ctx("committing imported prompts")?;
        Ok(added)
    }

    pub async fn prompt_count(&self) -> Result<usize> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM prompts")
            .fetch_one(&self.pool)
            .await
            .ctx("counting prompts")?;
        let n: i64 = row.try_get("n").ctx("counting prompts")?;
        Ok(n as usize)
    }

    /// Stores a sampled reply; `Invalid` if the prompt is unknown.
    pub async fn add_generation(&self, g: &NewGeneration) -> Result<String> {
        if !self.prompt_exists(&g.prompt_id).await? {
            return Err(StoreError::Invalid(format!(
                "unknown prompt {:?}",
                g.prompt_id
            )));
        }
        no_nul("the model name", &g.model)?;
        no_nul("the reply", &g.text)?;
        if g.reward.is_some_and(|r| !r.is_finite()) {
            return Err(StoreError::Invalid("reward is not a finite number".into()));
        }
        let id = new_id();
        sqlx::query(
            "INSERT INTO generations (id, prompt_id, model, params, text, reward, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(&g.prompt_id)
        .bind(&g.model)
        .bind(g.params.to_string())
        .bind(&g.text)
        .bind(g.reward)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .ctx("adding a generation")?;
        Ok(id)
    }

    pub(crate) async fn prompt_exists(&self, prompt_id: &str) -> Result<bool> {
        let row = sqlx::query("SELECT id FROM prompts WHERE id = $1")
            .bind(prompt_id)
            .fetch_optional(&self.pool)
            .await
            .ctx("looking up a prompt")?;
        Ok(row.is_some())
    }
}
