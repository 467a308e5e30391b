//! Ranking tasks: creating and assigning them, showing them, and storing rankings.

use std::collections::HashSet;

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::export::rfc3339_utc_ms;
use super::{flag, new_id, no_nul, now_ms, Context, Prompt, Ranking, RankingSubmission, Reply};
use super::{Result, Store, StoreError, TaskView};

/// The most replies a task may show.
pub const MAX_REPLIES: usize = 4;

/// Loads a task's prompt and replies (in position order); None if the task does not exist.
async fn load_view(tx: &mut Transaction<'static, Any>, task_id: &str) -> Result<Option<TaskView>> {
    let Some(row) = sqlx::query(
        "SELECT p.text FROM tasks t JOIN prompts p ON p.id = t.prompt_id WHERE t.id = $1",
    )
    .bind(task_id)
    .fetch_optional(&mut **tx)
    .await
    .ctx("loading a task")?
    else {
        return Ok(None);
    };
    let prompt: String = row.try_get("text").ctx("reading a task")?;
    let rows = sqlx::query(
        "SELECT g.id, g.text FROM task_replies r JOIN generations g ON g.id = r.generation_id \
         WHERE r.task_id = $1 ORDER BY r.position",
    )
    .bind(task_id)
    .fetch_all(&mut **tx)
    .await
    .ctx("loading a task's replies")?;
    let replies = rows
        .iter()
        .map(|r| {
            Ok(Reply {
                id: r.try_get("id")?,
                text: r.try_get("text")?,
            })
        })
        .collect::<std::result::Result<_, sqlx::Error>>()
        .ctx("reading a task's replies")?;
    Ok(Some(TaskView {
        task_id: task_id.to_string(),
        prompt,
        replies,
    }))
}

/// The state of `user_id`'s assignment to `task_id`, if assigned.
async fn assignment_state(
    tx: &mut Transaction<'static, Any>,
    task_id: &str,
    user_id: &str,
) -> Result<Option<String>> {
    let row = sqlx::query("SELECT state FROM assignments WHERE task_id = $1 AND user_id = $2")
        .bind(task_id)
        .bind(user_id)
        .fetch_optional(&mut **tx)
        .await
        .ctx("looking up an assignment")?;
    row.map(|r| r.try_get("state"))
        .transpose()
        .ctx("reading an assignment")
}

fn ranking_from_row(row: &AnyRow) -> Result<Ranking> {
    let read = || -> std::result::Result<_, sqlx::Error> {
        Ok((
            row.try_get::<String, _>("ranking")?,
            row.try_get::<i64, _>("tie")?,
            row.try_get::<i64, _>("all_bad")?,
            row.try_get::<Option<String>, _>("skip_reason")?,
            row.try_get::<Option<String>, _>("draft")?,
            row.try_get::<i64, _>("created_at")?,
        ))
    };
    let (ranking, tie, all_bad, skip, draft, created_at) = read().ctx("reading a ranking")?;
    let ranking = serde_json::from_str(&ranking)
        .map_err(|e| StoreError::Invalid(format!("stored ranking is not a JSON list: {e}")))?;
    Ok(Ranking {
        ranking,
        tie: tie != 0,
        all_bad: all_bad != 0,
        skip,
        draft,
        time: rfc3339_utc_ms(created_at),
    })
}

/// Checks a submission against the task's reply ids (see [`RankingSubmission`]).
fn validate(sub: &RankingSubmission, reply_ids: &[String]) -> Result<()> {
    let invalid = |m: &str| Err(StoreError::Invalid(m.to_string()));
    no_nul("the skip reason", sub.skip.as_deref().unwrap_or(""))?;
    no_nul("the draft", sub.draft.as_deref().unwrap_or(""))?;
    if let Some(reason) = &sub.skip {
        if reason.trim().is_empty() {
            return invalid("a skip needs a reason");
        }
        if !sub.ranking.is_empty() || sub.tie || sub.all_bad {
            return invalid("a skip carries no ranking, tie or all_bad");
        }
        return Ok(());
    }
    if sub.ranking.is_empty() {
        if sub.tie || sub.all_bad {
            return Ok(());
        }
        return invalid("the ranking is empty (mark tie or all bad, or skip, instead)");
    }
    let given: HashSet<&String> = sub.ranking.iter().collect();
    if given.len() != sub.ranking.len() {
        return invalid("the ranking lists a reply twice");
    }
    let expected: HashSet<&String> = reply_ids.iter().collect();
    if given != expected {
        return invalid("the ranking must list exactly this task's replies");
    }
    Ok(())
}

/// The oldest task with between 1 and `overlap - 1` assignments whose prompt `user_id` has
/// no task for (restricted to `only` if given).
async fn shared_candidate(
    tx: &mut Transaction<'static, Any>,
    user_id: &str,
    overlap: usize,
    only: Option<&str>,
) -> Result<Option<String>> {
    let row = sqlx::query(
        "SELECT t.id FROM tasks t \
         WHERE ($3 = '' OR t.id = $3) \
           AND (SELECT COUNT(*) FROM assignments a WHERE a.task_id = t.id) BETWEEN 1 AND $2 \
           AND NOT EXISTS (SELECT 1 FROM tasks t2 JOIN assignments a2 ON a2.task_id = t2.id \
                           WHERE t2.prompt_id = t.prompt_id AND a2.user_id = $1) \
         ORDER BY t.created_at, t.id LIMIT 1",
    )
    .bind(user_id)
    .bind(overlap as i64 - 1)
    .bind(only.unwrap_or(""))
    .fetch_optional(&mut **tx)
    .await
    .ctx("finding a shared task")?;
    row.map(|r| r.try_get("id"))
        .transpose()
        .ctx("reading a shared task")
}

impl Store {
    /// The caller's oldest pending assignment.
    pub async fn pending_task(&self, user_id: &str) -> Result<Option<TaskView>> {
        let mut tx = self.pool.begin().await.ctx("beginning a read")?;
        let row = sqlx::query(
            "SELECT task_id FROM assignments WHERE user_id = $1 AND state = 'pending' \
             ORDER BY created_at, task_id LIMIT 1",
        )
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await
        .ctx("finding a pending task")?;
        let Some(row) = row else { return Ok(None) };
        let task_id: String = row.try_get("task_id").ctx("reading a pending task")?;
        let view = load_view(&mut tx, &task_id).await?;
        tx.commit().await.ctx("ending a read")?;
        Ok(view)
    }

    /// Assigns the caller (pending) the oldest task that already has at least one and fewer
    /// than `overlap` assignments and whose prompt the caller has no task for; returns it.
    /// None when `overlap < 2` or no task qualifies.
    pub async fn assign_shared_task(
        &self,
        user_id: &str,
        overlap: usize,
    ) -> Result<Option<TaskView>> {
        if overlap < 2 {
            return Ok(None);
        }
        // On PostgreSQL another labeller may take the last place between the choice and the
        // insert; the candidate's row is locked and the choice checked again, then retried.
        for _ in 0..5 {
            let mut tx = self.begin_write("assigning a shared task").await?;
            let Some(task_id) = shared_candidate(&mut tx, user_id, overlap, None).await? else {
                return Ok(None);
            };
            sqlx::query("UPDATE tasks SET prompt_id = prompt_id WHERE id = $1")
                .bind(&task_id)
                .execute(&mut *tx)
                .await
                .ctx("locking a shared task")?;
            if shared_candidate(&mut tx, user_id, overlap, Some(&task_id))
                .await?
                .is_none()
            {
                continue;
            }
            sqlx::query(
                "INSERT INTO assignments (task_id, user_id, state, created_at) \
                 VALUES ($1, $2, 'pending', $3)",
            )
            .bind(&task_id)
            .bind(user_id)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .ctx("assigning a shared task")?;
            let view = load_view(&mut tx, &task_id).await?;
            tx.commit().await.ctx("committing an assignment")?;
            return Ok(view);
        }
        Ok(None)
    }

    /// A prompt the caller has no task for: fewest tasks first, then oldest.
    pub async fn prompt_for_new_task(&self, user_id: &str) -> Result<Option<Prompt>> {
        let row = sqlx::query(
            "SELECT p.id, p.text FROM prompts p \
             WHERE NOT EXISTS (SELECT 1 FROM tasks t JOIN assignments a ON a.task_id = t.id \
                               WHERE t.prompt_id = p.id AND a.user_id = $1) \
             ORDER BY (SELECT COUNT(*) FROM tasks t WHERE t.prompt_id = p.id), \
                      p.created_at, p.seq, p.id \
             LIMIT 1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await
        .ctx("choosing a prompt")?;
        row.map(|r| {
            Ok(Prompt {
                id: r.try_get("id")?,
                text: r.try_get("text")?,
            })
        })
        .transpose()
        .ctx("reading a prompt")
    }

    /// Creates a task showing `generation_ids` (2 to 4 distinct generations of `prompt_id`,
    /// in this order) and assigns it to the caller (pending).
    pub async fn create_task(
        &self,
        user_id: &str,
        prompt_id: &str,
        generation_ids: &[String],
    ) -> Result<TaskView> {
        let n = generation_ids.len();
        if !(2..=MAX_REPLIES).contains(&n) {
            return Err(StoreError::Invalid(format!(
                "a task needs 2 to {MAX_REPLIES} replies, got {n}"
            )));
        }
        if generation_ids.iter().collect::<HashSet<_>>().len() != n {
            return Err(StoreError::Invalid("a task lists a reply twice".into()));
        }
        let mut tx = self.begin_write("creating a task").await?;
        let prompt = sqlx::query("SELECT text FROM prompts WHERE id = $1")
            .bind(prompt_id)
            .fetch_optional(&mut *tx)
            .await
            .ctx("looking up a prompt")?
            .ok_or_else(|| StoreError::Invalid(format!("unknown prompt {prompt_id:?}")))?
            .try_get::<String, _>("text")
            .ctx("reading a prompt")?;
        let mut replies = Vec::with_capacity(n);
        for id in generation_ids {
            let row = sqlx::query("SELECT text FROM generations WHERE id = $1 AND prompt_id = $2")
                .bind(id)
                .bind(prompt_id)
                .fetch_optional(&mut *tx)
                .await
                .ctx("looking up a generation")?
                .ok_or_else(|| {
                    StoreError::Invalid(format!("no generation {id:?} for prompt {prompt_id:?}"))
                })?;
            let text = row.try_get("text").ctx("reading a generation")?;
            replies.push(Reply {
                id: id.clone(),
                text,
            });
        }
        let task_id = new_id();
        let now = now_ms();
        sqlx::query("INSERT INTO tasks (id, prompt_id, created_at) VALUES ($1, $2, $3)")
            .bind(&task_id)
            .bind(prompt_id)
            .bind(now)
            .execute(&mut *tx)
            .await
            .ctx("creating a task")?;
        for (position, id) in generation_ids.iter().enumerate() {
            sqlx::query(
                "INSERT INTO task_replies (task_id, generation_id, position) VALUES ($1, $2, $3)",
            )
            .bind(&task_id)
            .bind(id)
            .bind(position as i64)
            .execute(&mut *tx)
            .await
            .ctx("adding a task reply")?;
        }
        sqlx::query(
            "INSERT INTO assignments (task_id, user_id, state, created_at) \
             VALUES ($1, $2, 'pending', $3)",
        )
        .bind(&task_id)
        .bind(user_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .ctx("assigning a new task")?;
        tx.commit().await.ctx("committing a new task")?;
        Ok(TaskView {
            task_id,
            prompt,
            replies,
        })
    }

    /// The task and the caller's ranking of it, if any. None unless the task is assigned to
    /// the caller: another user's task looks exactly like a missing one.
    pub async fn task_for_user(
        &self,
        task_id: &str,
        user_id: &str,
    ) -> Result<Option<(TaskView, Option<Ranking>)>> {
        let mut tx = self.pool.begin().await.ctx("beginning a read")?;
        if assignment_state(&mut tx, task_id, user_id).await?.is_none() {
            return Ok(None);
        }
        let Some(view) = load_view(&mut tx, task_id).await? else {
            return Ok(None);
        };
        let row = sqlx::query(
            "SELECT ranking, tie, all_bad, skip_reason, draft, created_at FROM rankings \
             WHERE task_id = $1 AND user_id = $2",
        )
        .bind(task_id)
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await
        .ctx("loading a ranking")?;
        tx.commit().await.ctx("ending a read")?;
        let ranking = row.as_ref().map(ranking_from_row).transpose()?;
        Ok(Some((view, ranking)))
    }

    /// Stores the caller's answer to a task assigned to them (`NotFound` otherwise),
    /// replacing any earlier one, and marks the assignment done (or skipped). `Invalid` unless
    /// the submission fits the task (see [`RankingSubmission`]).
    pub async fn submit_ranking(
        &self,
        task_id: &str,
        user_id: &str,
        sub: &RankingSubmission,
    ) -> Result<Ranking> {
        let mut tx = self.begin_write("submitting a ranking").await?;
        if assignment_state(&mut tx, task_id, user_id).await?.is_none() {
            return Err(StoreError::NotFound(format!("task {task_id:?}")));
        }
        let rows = sqlx::query("SELECT generation_id FROM task_replies WHERE task_id = $1")
            .bind(task_id)
            .fetch_all(&mut *tx)
            .await
            .ctx("loading a task's replies")?;
        let reply_ids = rows
            .iter()
            .map(|r| r.try_get("generation_id"))
            .collect::<std::result::Result<Vec<String>, _>>()
            .ctx("reading a task's replies")?;
        validate(sub, &reply_ids)?;
        let now = now_ms();
        let ranking_json = serde_json::to_string(&sub.ranking).expect("a list of strings");
        sqlx::query(
            "INSERT INTO rankings \
             (id, task_id, user_id, ranking, tie, all_bad, skip_reason, draft, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (task_id, user_id) DO UPDATE SET ranking = excluded.ranking, \
             tie = excluded.tie, all_bad = excluded.all_bad, skip_reason = excluded.skip_reason, \
             draft = excluded.draft, created_at = excluded.created_at",
        )
        .bind(new_id())
        .bind(task_id)
        .bind(user_id)
        .bind(&ranking_json)
        .bind(flag(sub.tie))
        .bind(flag(sub.all_bad))
        .bind(sub.skip.as_deref())
        .bind(sub.draft.as_deref())
        .bind(now)
        .execute(&mut *tx)
        .await
        .ctx("storing a ranking")?;
        let state = if sub.skip.is_some() {
            "skipped"
        } else {
            "done"
        };
        sqlx::query("UPDATE assignments SET state = $1 WHERE task_id = $2 AND user_id = $3")
            .bind(state)
            .bind(task_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .ctx("updating an assignment")?;
        tx.commit().await.ctx("committing a ranking")?;
        Ok(Ranking {
            ranking: sub.ranking.clone(),
            tie: sub.tie,
            all_bad: sub.all_bad,
            skip: sub.skip.clone(),
            draft: sub.draft.clone(),
            time: rfc3339_utc_ms(now),
        })
    }
}
