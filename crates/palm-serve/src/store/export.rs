//! Inter-labeller agreement and the training exports (preference pairs, SFT examples).

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::Row;

use super::{Agreement, Context, PairRecord, Result, SftRecord, Store, StoreError};

/// Formats unix milliseconds as RFC 3339 UTC with milliseconds: `2024-05-01T12:34:56.789Z`.
pub fn rfc3339_utc_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// A ranking usable for training: not skipped, not a tie, not "all bad".
struct Usable {
    task_id: String,
    prompt: String,
    labeller: String,
    order: Vec<String>,
    created_at: i64,
}

/// The fraction of item pairs that `a` and `b` order the same way (over the items both
/// rank); None when they share fewer than two items.
fn pair_agreement(a: &[String], b: &[String]) -> Option<f64> {
    let pos_b: HashMap<&String, usize> = b.iter().enumerate().map(|(i, x)| (x, i)).collect();
    let common: Vec<usize> = a.iter().filter_map(|x| pos_b.get(x).copied()).collect();
    let (mut same, mut total) = (0usize, 0usize);
    for i in 0..common.len() {
        for j in i + 1..common.len() {
            total += 1;
            same += usize::from(common[i] < common[j]);
        }
    }
    (total > 0).then(|| same as f64 / total as f64)
}

/// A task's agreement: the mean of [`pair_agreement`] over its pairs of rankings.
fn task_agreement(orders: &[&[String]]) -> Option<f64> {
    let mut values = Vec::new();
    for i in 0..orders.len() {
        for j in i + 1..orders.len() {
            values.extend(pair_agreement(orders[i], orders[j]));
        }
    }
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

impl Store {
    /// Every usable ranking, by time, then task id, then labeller.
    async fn usable_rankings(&self) -> Result<Vec<Usable>> {
        let rows = sqlx::query(
            "SELECT r.task_id, r.ranking, r.created_at, u.name, p.text AS prompt \
             FROM rankings r JOIN users u ON u.id = r.user_id \
             JOIN tasks t ON t.id = r.task_id JOIN prompts p ON p.id = t.prompt_id \
             WHERE r.skip_reason IS NULL AND r.tie = 0 AND r.all_bad = 0 \
             ORDER BY r.created_at, r.task_id, u.name, r.id",
        )
        .fetch_all(&self.pool)
        .await
        .ctx("loading rankings")?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let read = || -> std::result::Result<_, sqlx::Error> {
                Ok((
                    r.try_get::<String, _>("task_id")?,
                    r.try_get::<String, _>("ranking")?,
                    r.try_get::<i64, _>("created_at")?,
                    r.try_get::<String, _>("name")?,
                    r.try_get::<String, _>("prompt")?,
                ))
            };
            let (task_id, ranking, created_at, labeller, prompt) =
                read().ctx("reading rankings")?;
            let order: Vec<String> = serde_json::from_str(&ranking).map_err(|e| {
                StoreError::Invalid(format!("stored ranking of task {task_id} is bad: {e}"))
            })?;
            out.push(Usable {
                task_id,
                prompt,
                labeller,
                order,
                created_at,
            });
        }
        Ok(out)
    }

    /// Agreement per task ranked by at least two labellers, with each task's labellers.
    fn task_agreements(rankings: &[Usable]) -> BTreeMap<&str, (f64, Vec<&str>)> {
        let mut by_task: BTreeMap<&str, Vec<&Usable>> = BTreeMap::new();
        for r in rankings {
            by_task.entry(&r.task_id).or_default().push(r);
        }
        by_task
            .into_iter()
            .filter(|(_, rs)| rs.len() >= 2)
            .filter_map(|(task, rs)| {
                let orders: Vec<&[String]> = rs.iter().map(|r| r.order.as_slice()).collect();
                let labellers = rs.iter().map(|r| r.labeller.as_str()).collect();
                task_agreement(&orders).map(|a| (task, (a, labellers)))
            })
            .collect()
    }

    /// Agreement over tasks with at least two usable rankings: per task, the mean over pairs
    /// of labellers of the fraction of reply pairs both order the same way; `mean` over
    /// those tasks; per labeller, the mean over the shared tasks they ranked.
    pub async fn agreement(&self) -> Result<Agreement> {
        let rankings = self.usable_rankings().await?;
        let tasks = Self::task_agreements(&rankings);
        let mut per: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for (a, labellers) in tasks.values() {
            for l in labellers {
                per.entry(l).or_default().push(*a);
            }
        }
        let all: Vec<f64> = tasks.values().map(|(a, _)| *a).collect();
        Ok(Agreement {
            shared_tasks: tasks.len(),
            mean: mean(&all),
            per_labeller: per
                .into_iter()
                .map(|(l, v)| (l.to_string(), mean(&v).unwrap_or(0.0), v.len()))
                .collect(),
        })
    }

    /// Preference pairs: for every usable ranking, one record per pair of positions i < j
    /// (the reply at i is chosen). With `Some(x)`, only tasks whose agreement is at least x
    /// (tasks ranked by a single labeller have none and are left out). Ordered by ranking
    /// time, then task id, then labeller, then pair.
    pub async fn export_pairs(&self, min_agreement: Option<f64>) -> Result<Vec<PairRecord>> {
        let rankings = self.usable_rankings().await?;
        let keep: Option<HashSet<&str>> = min_agreement.map(|x| {
            Self::task_agreements(&rankings)
                .into_iter()
                .filter(|(_, (a, _))| *a >= x)
                .map(|(t, _)| t)
                .collect()
        });
        let texts = self.ranked_reply_texts().await?;
        let mut out = Vec::new();
        for r in &rankings {
            if keep
                .as_ref()
                .is_some_and(|k| !k.contains(&r.task_id.as_str()))
            {
                continue;
            }
            let time = rfc3339_utc_ms(r.created_at);
            for i in 0..r.order.len() {
                for j in i + 1..r.order.len() {
                    let text = |id: &String| {
                        texts.get(id).cloned().ok_or_else(|| {
                            StoreError::NotFound(format!("generation {id} of task {}", r.task_id))
                        })
                    };
                    out.push(PairRecord {
                        prompt: r.prompt.clone(),
                        chosen: text(&r.order[i])?,
                        rejected: text(&r.order[j])?,
                        labeller: r.labeller.clone(),
                        time: time.clone(),
                        task_id: r.task_id.clone(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Texts of the replies of tasks that have a usable ranking, by generation id.
    async fn ranked_reply_texts(&self) -> Result<HashMap<String, String>> {
        let rows = sqlx::query(
            "SELECT g.id, g.text FROM generations g WHERE g.id IN \
             (SELECT tr.generation_id FROM task_replies tr JOIN rankings r \
              ON r.task_id = tr.task_id \
              WHERE r.skip_reason IS NULL AND r.tie = 0 AND r.all_bad = 0)",
        )
        .fetch_all(&self.pool)
        .await
        .ctx("loading reply texts")?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("text")?)))
            .collect::<std::result::Result<_, sqlx::Error>>()
            .ctx("reading reply texts")
    }

    /// Every demonstration as a chat example, oldest first.
    pub async fn export_sft(&self) -> Result<Vec<SftRecord>> {
        let rows = sqlx::query(
            "SELECT p.text AS prompt, d.text, u.name, d.created_at FROM demonstrations d \
             JOIN prompts p ON p.id = d.prompt_id JOIN users u ON u.id = d.user_id \
             ORDER BY d.created_at, d.id",
        )
        .fetch_all(&self.pool)
        .await
        .ctx("loading demonstrations")?;
        rows.iter()
            .map(|r| {
                let prompt: String = r.try_get("prompt")?;
                let text: String = r.try_get("text")?;
                Ok(SftRecord {
                    messages: vec![
                        serde_json::json!({"role": "user", "content": prompt}),
                        serde_json::json!({"role": "assistant", "content": text}),
                    ],
                    labeller: r.try_get("name")?,
                    time: rfc3339_utc_ms(r.try_get("created_at")?),
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .ctx("reading demonstrations")
    }
}
