//! Storage tests. Every scenario runs on SQLite (a temporary file) and on PostgreSQL (a
//! throwaway database on the server named by PALM_TEST_POSTGRES_URL; skipped loudly if unset,
//! an error with PALM_REQUIRE_POSTGRES=1).

use std::future::Future;

use palm_serve::store::{
    rfc3339_utc_ms, testing, DbKind, NewGeneration, RankingSubmission, Store, StoreError, User,
};
use sqlx::Row;

/// Runs `scenario` on a fresh SQLite store and then on a fresh PostgreSQL store. The scenario
/// gets the open store and its URL (to reopen it).
async fn on_both<F, Fut>(scenario: F)
where
    F: Fn(Store, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let url = testing::sqlite_url(dir.path());
    let store = Store::open(&url).await.expect("opening SQLite");
    assert_eq!(store.kind(), DbKind::Sqlite);
    eprintln!("--- SQLite {url}");
    scenario(store.clone(), url).await;
    store.close().await;

    if let Some(db) = testing::postgres_db().await {
        let store = Store::open(&db.url).await.expect("opening PostgreSQL");
        assert_eq!(store.kind(), DbKind::Postgres);
        eprintln!("--- PostgreSQL {}", db.url);
        scenario(store.clone(), db.url.clone()).await;
        store.close().await;
        db.drop_db().await;
    }
}

fn invalid<T: std::fmt::Debug>(r: Result<T, StoreError>) -> String {
    match r {
        Err(StoreError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn not_found<T: std::fmt::Debug>(r: Result<T, StoreError>) {
    match r {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("expected NotFound, got {other:?}"),
    }
}

fn rank(ids: &[&String]) -> RankingSubmission {
    RankingSubmission {
        ranking: ids.iter().map(|s| s.to_string()).collect(),
        tie: false,
        all_bad: false,
        skip: None,
        draft: None,
    }
}

fn empty() -> RankingSubmission {
    rank(&[])
}

async fn user(s: &Store, name: &str) -> User {
    s.add_user(name, false).await.unwrap().0
}

/// Adds `prompt` (if new) and one generation per text; returns (prompt id, generation ids).
async fn prompt_with_replies(s: &Store, prompt: &str, replies: &[&str]) -> (String, Vec<String>) {
    s.add_prompts(&[prompt.to_string()], "test").await.unwrap();
    let id: String = sqlx::query("SELECT id FROM prompts WHERE text = $1")
        .bind(prompt)
        .fetch_one(s.pool())
        .await
        .unwrap()
        .get("id");
    let mut gens = Vec::new();
    for (i, text) in replies.iter().enumerate() {
        let g = NewGeneration {
            prompt_id: id.clone(),
            model: "palm-test".into(),
            params: serde_json::json!({"temperature": 0.7, "seed": i}),
            text: text.to_string(),
            reward: Some(i as f64 - 0.5),
        };
        gens.push(s.add_generation(&g).await.unwrap());
    }
    (id, gens)
}

async fn count(s: &Store, sql: &str) -> i64 {
    sqlx::query(sql).fetch_one(s.pool()).await.unwrap().get(0)
}

#[tokio::test]
async fn migrations_are_idempotent() {
    on_both(|s, url| async move {
        assert_eq!(s.migration_versions().await.unwrap(), vec![1]);
        user(&s, "alice").await;
        for _ in 0..2 {
            let again = Store::open(&url).await.expect("reopening");
            assert_eq!(again.migration_versions().await.unwrap(), vec![1]);
            assert_eq!(again.list_users().await.unwrap().len(), 1, "data kept");
            again.close().await;
        }
        assert_eq!(count(&s, "SELECT COUNT(*) FROM schema_migrations").await, 1);
    })
    .await;
}

#[tokio::test]
async fn sqlite_url_forms_and_settings() {
    let dir = tempfile::tempdir().unwrap();
    for (i, form) in ["sqlite://", "sqlite:", ""].iter().enumerate() {
        let path = dir.path().join(format!("sub {i}.db"));
        let url = format!("{form}{}", path.display());
        let s = Store::open(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(path.exists(), "{url} created the file");
        let mut conn = s.pool().acquire().await.unwrap();
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
            .get(0);
        assert_eq!(mode, "wal");
        let sync: i64 = sqlx::query("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
            .get(0);
        assert_eq!(sync, 2, "synchronous = FULL");
        let fk: i64 = sqlx::query("PRAGMA foreign_keys")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
            .get(0);
        assert_eq!(fk, 1);
        let busy: i64 = sqlx::query("PRAGMA busy_timeout")
            .fetch_one(&mut *conn)
            .await
            .unwrap()
            .get(0);
        assert_eq!(busy, 5000);
        drop(conn);
        s.close().await;
    }
    invalid(Store::open("mysql://root@localhost/x").await);
}

#[tokio::test]
async fn open_errors_redact_the_password() {
    let err = Store::open("postgres://palm:s3cret@127.0.0.1:1/none")
        .await
        .expect_err("nothing listens on port 1");
    let shown = err.to_string();
    assert!(matches!(err, StoreError::Db { .. }), "{err:?}");
    assert!(shown.contains("palm:***@127.0.0.1:1/none"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert_eq!(
        palm_serve::store::redact_url("postgres://u@h/db?sslmode=disable&password=x"),
        "postgres://u@h/db?sslmode=disable&password=***"
    );
    assert_eq!(
        palm_serve::store::redact_url("postgres://u:p@h/db"),
        "postgres://u:***@h/db"
    );
    assert_eq!(
        palm_serve::store::redact_url("postgres://u:p:q@h:5432"),
        "postgres://u:***@h:5432"
    );
    assert_eq!(
        palm_serve::store::redact_url("/tmp/a@b:c/x.db"),
        "/tmp/a@b:c/x.db"
    );
}

#[tokio::test]
async fn time_format() {
    assert_eq!(rfc3339_utc_ms(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(rfc3339_utc_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
    assert_eq!(
        rfc3339_utc_ms(1_709_210_096_789),
        "2024-02-29T12:34:56.789Z"
    );
    assert_eq!(rfc3339_utc_ms(-1), "1969-12-31T23:59:59.999Z");
    assert_eq!(
        rfc3339_utc_ms(4_102_444_800_000),
        "2100-01-01T00:00:00.000Z"
    );
}

#[tokio::test]
async fn users_and_tokens() {
    on_both(|s, _| async move {
        let (alice, token) = s.add_user("alice", true).await.unwrap();
        assert!(alice.admin);
        assert!(token.starts_with("palm-") && token.len() == 69, "{token}");
        assert!(token[5..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let (bob, bob_token) = s.add_user(" bob ", false).await.unwrap();
        assert_eq!(bob.name, "bob");
        assert_ne!(token, bob_token);

        let found = s
            .user_by_token(&token)
            .await
            .unwrap()
            .expect("alice by token");
        assert_eq!(
            (found.id.as_str(), found.name.as_str(), found.admin),
            (alice.id.as_str(), "alice", true)
        );
        assert_eq!(
            s.user_by_token(&bob_token).await.unwrap().unwrap().id,
            bob.id
        );
        assert!(s.user_by_token("palm-wrong").await.unwrap().is_none());
        assert!(s.user_by_token("").await.unwrap().is_none());

        invalid(s.add_user("alice", false).await);
        invalid(s.add_user("   ", false).await);
        invalid(s.add_user("a\0b", false).await);

        let stored: String = sqlx::query("SELECT token_hash FROM users WHERE id = $1")
            .bind(&alice.id)
            .fetch_one(s.pool())
            .await
            .unwrap()
            .get(0);
        assert_ne!(stored, token);
        assert!(!stored.contains(&token[5..]));
        assert_eq!(stored.len(), 64);

        let users = s.list_users().await.unwrap();
        let names: Vec<_> = users.iter().map(|u| (u.name.as_str(), u.admin)).collect();
        assert_eq!(names, [("alice", true), ("bob", false)]);
    })
    .await;
}

#[tokio::test]
async fn prompts_dedupe() {
    on_both(|s, _| async move {
        let texts: Vec<String> = ["first", "second", "first", "", "  \n", "third"]
            .iter()
            .map(|t| t.to_string())
            .collect();
        assert_eq!(s.add_prompts(&texts, "file.jsonl").await.unwrap(), 3);
        assert_eq!(
            s.add_prompts(&["third".into(), "fourth".into()], "x")
                .await
                .unwrap(),
            1
        );
        assert_eq!(s.prompt_count().await.unwrap(), 4);
        // A prompt longer than a PostgreSQL btree entry may be.
        let long = "long prompt ".repeat(2000);
        assert_eq!(s.add_prompts(&[long.clone(), long], "x").await.unwrap(), 1);
        assert_eq!(s.prompt_count().await.unwrap(), 5);
        invalid(s.add_prompts(&["nul\0".into()], "x").await);
        assert_eq!(s.prompt_count().await.unwrap(), 5);
        // Import order is creation order.
        let u = user(&s, "u").await;
        assert_eq!(
            s.prompt_for_new_task(&u.id).await.unwrap().unwrap().text,
            "first"
        );
        invalid(
            s.add_generation(&NewGeneration {
                prompt_id: "nope".into(),
                model: "m".into(),
                params: serde_json::json!({}),
                text: "t".into(),
                reward: None,
            })
            .await,
        );
    })
    .await;
}

#[tokio::test]
async fn task_flow() {
    on_both(|s, _| async move {
        let a = user(&s, "alice").await;
        let b = user(&s, "bob").await;
        let (p, g) = prompt_with_replies(&s, "Say hi", &["hi", "hello", "hey"]).await;
        let (q, other) = prompt_with_replies(&s, "Other", &["x", "y"]).await;

        invalid(s.create_task(&a.id, &p, &g[..1]).await);
        let five = [g.clone(), g.clone()].concat()[..5].to_vec();
        invalid(s.create_task(&a.id, &p, &five).await);
        invalid(
            s.create_task(&a.id, &p, &[g[0].clone(), g[0].clone()])
                .await,
        );
        invalid(
            s.create_task(&a.id, &p, &[g[0].clone(), other[0].clone()])
                .await,
        );
        invalid(s.create_task(&a.id, "nope", &g).await);
        assert!(s.pending_task(&a.id).await.unwrap().is_none());

        let task = s.create_task(&a.id, &p, &g).await.unwrap();
        assert_eq!(task.prompt, "Say hi");
        let texts: Vec<_> = task.replies.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, ["hi", "hello", "hey"]);
        let json = serde_json::to_value(&task).unwrap();
        let keys: Vec<_> = json["replies"][0]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["id", "text"], "a reply never shows its reward");

        assert_eq!(
            s.pending_task(&a.id).await.unwrap().unwrap().task_id,
            task.task_id
        );
        assert!(s.pending_task(&b.id).await.unwrap().is_none());
        assert!(s
            .task_for_user(&task.task_id, &b.id)
            .await
            .unwrap()
            .is_none());
        assert!(s.task_for_user("missing", &a.id).await.unwrap().is_none());
        let (view, ranking) = s
            .task_for_user(&task.task_id, &a.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(view.replies.len(), 3);
        assert!(ranking.is_none());

        let t = &task.task_id;
        not_found(
            s.submit_ranking(t, &b.id, &rank(&[&g[0], &g[1], &g[2]]))
                .await,
        );
        not_found(
            s.submit_ranking("missing", &a.id, &rank(&[&g[0], &g[1], &g[2]]))
                .await,
        );
        let wrong = "f".repeat(32);
        invalid(
            s.submit_ranking(t, &a.id, &rank(&[&g[0], &g[1], &wrong]))
                .await,
        );
        invalid(
            s.submit_ranking(t, &a.id, &rank(&[&g[0], &g[0], &g[1]]))
                .await,
        );
        invalid(s.submit_ranking(t, &a.id, &rank(&[&g[0], &g[1]])).await);
        invalid(
            s.submit_ranking(t, &a.id, &rank(&[&g[0], &g[1], &g[2], &g[2]]))
                .await,
        );
        invalid(
            s.submit_ranking(t, &a.id, &rank(&[&g[0], &g[1], &other[0]]))
                .await,
        );
        invalid(s.submit_ranking(t, &a.id, &empty()).await);
        let blank_skip = RankingSubmission {
            skip: Some("  ".into()),
            ..empty()
        };
        invalid(s.submit_ranking(t, &a.id, &blank_skip).await);
        let skip_and_rank = RankingSubmission {
            skip: Some("why".into()),
            ..rank(&[&g[0], &g[1], &g[2]])
        };
        invalid(s.submit_ranking(t, &a.id, &skip_and_rank).await);
        assert!(
            s.task_for_user(t, &a.id)
                .await
                .unwrap()
                .unwrap()
                .1
                .is_none(),
            "nothing stored"
        );

        let r = s
            .submit_ranking(t, &a.id, &rank(&[&g[1], &g[0], &g[2]]))
            .await
            .unwrap();
        assert_eq!(r.ranking, [g[1].clone(), g[0].clone(), g[2].clone()]);
        assert!(r.time.ends_with('Z') && r.time.len() == 24, "{}", r.time);
        let stored = s.task_for_user(t, &a.id).await.unwrap().unwrap().1.unwrap();
        assert_eq!(stored.ranking, r.ranking);
        assert_eq!(stored.time, r.time);
        assert!(s.pending_task(&a.id).await.unwrap().is_none());
        let p1 = s.progress(&a.id).await.unwrap();
        assert_eq!((p1.ranked, p1.skipped, p1.pending), (1, 0, 0));

        let resubmit = RankingSubmission {
            draft: Some("second thoughts".into()),
            ..rank(&[&g[2], &g[1], &g[0]])
        };
        s.submit_ranking(t, &a.id, &resubmit).await.unwrap();
        let stored = s.task_for_user(t, &a.id).await.unwrap().unwrap().1.unwrap();
        assert_eq!(stored.ranking, [g[2].clone(), g[1].clone(), g[0].clone()]);
        assert_eq!(stored.draft.as_deref(), Some("second thoughts"));
        assert_eq!(
            count(&s, "SELECT COUNT(*) FROM rankings").await,
            1,
            "replaced, not added"
        );

        let skip = RankingSubmission {
            skip: Some("offensive".into()),
            draft: Some("half typed".into()),
            ..empty()
        };
        s.submit_ranking(t, &a.id, &skip).await.unwrap();
        let stored = s.task_for_user(t, &a.id).await.unwrap().unwrap().1.unwrap();
        assert_eq!(stored.skip.as_deref(), Some("offensive"));
        assert_eq!(stored.draft.as_deref(), Some("half typed"));
        assert!(stored.ranking.is_empty());
        let p2 = s.progress(&a.id).await.unwrap();
        assert_eq!((p2.ranked, p2.skipped, p2.pending), (0, 1, 0));
        let state: String = sqlx::query("SELECT state FROM assignments WHERE task_id = $1")
            .bind(t)
            .fetch_one(s.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(state, "skipped");

        for sub in [
            RankingSubmission {
                tie: true,
                ..empty()
            },
            RankingSubmission {
                all_bad: true,
                ..empty()
            },
            RankingSubmission {
                tie: true,
                ..rank(&[&g[0], &g[1], &g[2]])
            },
            RankingSubmission {
                tie: true,
                all_bad: true,
                ..empty()
            },
        ] {
            let r = s.submit_ranking(t, &a.id, &sub).await.unwrap();
            let stored = s.task_for_user(t, &a.id).await.unwrap().unwrap().1.unwrap();
            assert_eq!(
                (stored.tie, stored.all_bad, &stored.ranking),
                (sub.tie, sub.all_bad, &sub.ranking)
            );
            assert_eq!(
                (r.tie, r.all_bad, stored.skip),
                (sub.tie, sub.all_bad, None)
            );
        }
        invalid(
            s.submit_ranking(
                t,
                &a.id,
                &RankingSubmission {
                    tie: true,
                    ..rank(&[&g[0]])
                },
            )
            .await,
        );
        assert_eq!(s.progress(&a.id).await.unwrap().ranked, 1);

        // A second task on another prompt is pending until answered.
        s.create_task(&a.id, &q, &other).await.unwrap();
        assert_eq!(s.progress(&a.id).await.unwrap().pending, 1);

        let parsed: RankingSubmission = serde_json::from_str("{}").unwrap();
        assert!(parsed.ranking.is_empty() && !parsed.tie && parsed.skip.is_none());
        assert!(serde_json::from_str::<RankingSubmission>(r#"{"rank":[]}"#).is_err());
    })
    .await;
}

#[tokio::test]
async fn shared_tasks_and_agreement() {
    on_both(|s, _| async move {
        let a = user(&s, "alice").await;
        let b = user(&s, "bob").await;
        let c = user(&s, "carol").await;
        let (p, g) = prompt_with_replies(&s, "P", &["a", "b", "c"]).await;
        assert!(
            s.assign_shared_task(&b.id, 2).await.unwrap().is_none(),
            "no tasks yet"
        );
        let task = s.create_task(&a.id, &p, &g).await.unwrap();
        let t = &task.task_id;
        s.submit_ranking(t, &a.id, &rank(&[&g[0], &g[1], &g[2]]))
            .await
            .unwrap();

        assert!(s.assign_shared_task(&b.id, 1).await.unwrap().is_none());
        assert!(
            s.assign_shared_task(&a.id, 3).await.unwrap().is_none(),
            "alice has it"
        );
        let shared = s
            .assign_shared_task(&b.id, 2)
            .await
            .unwrap()
            .expect("shared with bob");
        assert_eq!(&shared.task_id, t);
        assert_eq!(shared.replies.len(), 3);
        assert_eq!(s.pending_task(&b.id).await.unwrap().unwrap().task_id, *t);
        assert!(
            s.assign_shared_task(&b.id, 3).await.unwrap().is_none(),
            "bob has it"
        );
        assert!(
            s.assign_shared_task(&c.id, 2).await.unwrap().is_none(),
            "overlap reached"
        );
        assert!(s.task_for_user(t, &b.id).await.unwrap().is_some());

        let none = s.agreement().await.unwrap();
        assert_eq!((none.shared_tasks, none.mean), (0, None));
        assert!(none.per_labeller.is_empty());

        s.submit_ranking(t, &b.id, &rank(&[&g[0], &g[2], &g[1]]))
            .await
            .unwrap();
        let ag = s.agreement().await.unwrap();
        assert_eq!(ag.shared_tasks, 1);
        assert!((ag.mean.unwrap() - 2.0 / 3.0).abs() < 1e-9, "{ag:?}");
        let names: Vec<_> = ag
            .per_labeller
            .iter()
            .map(|(n, _, k)| (n.as_str(), *k))
            .collect();
        assert_eq!(names, [("alice", 1), ("bob", 1)]);
        assert!(ag
            .per_labeller
            .iter()
            .all(|(_, v, _)| (v - 2.0 / 3.0).abs() < 1e-9));

        // A third labeller who skips changes nothing; one who ranks does.
        assert_eq!(
            s.assign_shared_task(&c.id, 3)
                .await
                .unwrap()
                .unwrap()
                .task_id,
            *t
        );
        let skip = RankingSubmission {
            skip: Some("unsure".into()),
            ..empty()
        };
        s.submit_ranking(t, &c.id, &skip).await.unwrap();
        assert!((s.agreement().await.unwrap().mean.unwrap() - 2.0 / 3.0).abs() < 1e-9);
        s.submit_ranking(t, &c.id, &rank(&[&g[2], &g[1], &g[0]]))
            .await
            .unwrap();
        // alice-bob 2/3, alice-carol 0, bob-carol 1/3: mean 1/3.
        let ag = s.agreement().await.unwrap();
        assert!((ag.mean.unwrap() - 1.0 / 3.0).abs() < 1e-9, "{ag:?}");
        assert_eq!(ag.per_labeller.len(), 3);

        // New tasks go to the prompts with the fewest tasks.
        s.add_prompts(&["Q".into()], "t").await.unwrap();
        let d = user(&s, "dave").await;
        assert_eq!(
            s.prompt_for_new_task(&d.id).await.unwrap().unwrap().text,
            "Q"
        );
        assert_eq!(
            s.prompt_for_new_task(&a.id).await.unwrap().unwrap().text,
            "Q"
        );
        let (q, qg) = prompt_with_replies(&s, "Q", &["q1", "q2"]).await;
        s.create_task(&d.id, &q, &qg).await.unwrap();
        assert!(
            s.prompt_for_new_task(&d.id).await.unwrap().is_some(),
            "dave has no task for P"
        );
        assert_eq!(
            s.prompt_for_new_task(&d.id).await.unwrap().unwrap().text,
            "P"
        );
        assert!(s.prompt_for_new_task(&a.id).await.unwrap().unwrap().text == "Q");
    })
    .await;
}

#[tokio::test]
async fn export_pairs_and_filter() {
    on_both(|s, _| async move {
        let a = user(&s, "alice").await;
        let b = user(&s, "bob").await;
        let (p, g) = prompt_with_replies(&s, "P", &["text a", "text b", "text c"]).await;
        let t1 = s.create_task(&a.id, &p, &g).await.unwrap().task_id;
        s.submit_ranking(&t1, &a.id, &rank(&[&g[0], &g[1], &g[2]]))
            .await
            .unwrap();
        let pairs = s.export_pairs(None).await.unwrap();
        let got: Vec<_> = pairs
            .iter()
            .map(|r| (r.chosen.as_str(), r.rejected.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("text a", "text b"),
                ("text a", "text c"),
                ("text b", "text c")
            ]
        );
        assert!(pairs
            .iter()
            .all(|r| r.prompt == "P" && r.labeller == "alice" && r.task_id == t1));
        assert!(pairs[0].time.ends_with('Z'));

        s.assign_shared_task(&b.id, 2).await.unwrap().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        s.submit_ranking(&t1, &b.id, &rank(&[&g[0], &g[2], &g[1]]))
            .await
            .unwrap();
        let pairs = s.export_pairs(None).await.unwrap();
        assert_eq!(pairs.len(), 6);
        let bobs: Vec<_> = pairs[3..]
            .iter()
            .map(|r| (r.labeller.as_str(), r.chosen.as_str(), r.rejected.as_str()))
            .collect();
        assert_eq!(
            bobs,
            [
                ("bob", "text a", "text c"),
                ("bob", "text a", "text b"),
                ("bob", "text c", "text b")
            ]
        );

        // Tie, all-bad and skipped rankings give no pairs; a single-labeller task has no
        // agreement, so it is kept only without a threshold.
        for (i, sub) in [
            RankingSubmission {
                tie: true,
                ..empty()
            },
            RankingSubmission {
                all_bad: true,
                ..empty()
            },
            RankingSubmission {
                skip: Some("bad prompt".into()),
                ..empty()
            },
            rank(&[]),
        ]
        .into_iter()
        .enumerate()
        {
            let (pi, gi) = prompt_with_replies(&s, &format!("P{i}"), &["u", "v"]).await;
            let ti = s.create_task(&a.id, &pi, &gi).await.unwrap().task_id;
            let sub = if i == 3 { rank(&[&gi[1], &gi[0]]) } else { sub };
            s.submit_ranking(&ti, &a.id, &sub).await.unwrap();
        }
        let pairs = s.export_pairs(None).await.unwrap();
        assert_eq!(pairs.len(), 7);
        assert_eq!(
            (
                pairs[6].prompt.as_str(),
                pairs[6].chosen.as_str(),
                pairs[6].rejected.as_str()
            ),
            ("P3", "v", "u")
        );

        let kept = s.export_pairs(Some(0.5)).await.unwrap();
        assert_eq!(kept.len(), 6);
        assert!(kept.iter().all(|r| r.task_id == t1));
        assert!(s.export_pairs(Some(0.9)).await.unwrap().is_empty());
        assert_eq!(s.export_pairs(Some(0.0)).await.unwrap().len(), 6);
        // Deterministic.
        let again = s.export_pairs(None).await.unwrap();
        let key = |v: &Vec<palm_serve::store::PairRecord>| {
            v.iter()
                .map(|r| (r.task_id.clone(), r.chosen.clone(), r.labeller.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&pairs), key(&again));
    })
    .await;
}

const NASTY: &[&str] = &[
    "'); DROP TABLE users; --",
    "Robert\"); DROP TABLE prompts;-- ' \" `",
    "back\\slash \\n \\\\ \\' %s %d $1 ?1 :name @x",
    "unicode: héllo wörld — 日本語 🎉 \u{202e}rtl \u{feff}",
    "<script>alert('x')</script> &amp; &lt;",
    "line1\nline2\r\n\ttab\u{7}",
];

#[tokio::test]
async fn sql_metacharacters_round_trip() {
    on_both(|s, _| async move {
        let (a, token) = s.add_user(NASTY[0], true).await.unwrap();
        assert_eq!(
            s.user_by_token(&token).await.unwrap().unwrap().name,
            NASTY[0]
        );
        for (i, nasty) in NASTY.iter().enumerate() {
            let prompt = format!("{nasty} #{i}");
            let bang = format!("{nasty}!");
            let (p, g) = prompt_with_replies(&s, &prompt, &[nasty, bang.as_str()]).await;
            let task = s.create_task(&a.id, &p, &g).await.unwrap();
            assert_eq!(task.prompt, prompt);
            assert_eq!(task.replies[0].text, *nasty);
            let sub = RankingSubmission {
                draft: Some(nasty.to_string()),
                ..rank(&[&g[0], &g[1]])
            };
            s.submit_ranking(&task.task_id, &a.id, &sub).await.unwrap();
            let stored = s
                .task_for_user(&task.task_id, &a.id)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(stored.0.replies[1].text, format!("{nasty}!"));
            assert_eq!(stored.1.unwrap().draft.as_deref(), Some(*nasty));
            s.add_demonstration(&a.id, &p, nasty).await.unwrap();
        }
        // Rankings made within one millisecond are ordered by task id, so match by prompt.
        let pairs = s.export_pairs(None).await.unwrap();
        assert_eq!(pairs.len(), NASTY.len());
        for (i, nasty) in NASTY.iter().enumerate() {
            let r = pairs
                .iter()
                .find(|r| r.prompt == format!("{nasty} #{i}"))
                .expect("a pair");
            assert_eq!(
                (r.chosen.as_str(), r.rejected.clone()),
                (*nasty, format!("{nasty}!"))
            );
            assert_eq!(r.labeller, NASTY[0]);
        }
        let sft = s.export_sft().await.unwrap();
        assert_eq!(sft.len(), NASTY.len());
        for (i, nasty) in NASTY.iter().enumerate() {
            let r = sft
                .iter()
                .find(|r| r.messages[0]["content"] == format!("{nasty} #{i}"))
                .unwrap();
            assert_eq!(r.messages[1]["content"], *nasty);
        }
        let conv = s.new_conversation(&a.id, NASTY[1]).await.unwrap();
        for nasty in NASTY {
            s.add_message(&conv, &a.id, "user", nasty).await.unwrap();
        }
        let rows =
            sqlx::query("SELECT content FROM messages WHERE conversation_id = $1 ORDER BY idx")
                .bind(&conv)
                .fetch_all(s.pool())
                .await
                .unwrap();
        let contents: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(contents, NASTY);
        // Still all there.
        assert_eq!(s.list_users().await.unwrap().len(), 1);
        assert_eq!(s.prompt_count().await.unwrap(), NASTY.len());
        // NUL cannot be stored by PostgreSQL; both refuse it the same way.
        invalid(s.add_message(&conv, &a.id, "user", "a\0b").await);
    })
    .await;
}

#[tokio::test]
async fn demonstrations_and_sft() {
    on_both(|s, _| async move {
        let a = user(&s, "alice").await;
        let b = user(&s, "bob").await;
        let c = user(&s, "carol").await;
        assert!(s.next_write_prompt(&a.id).await.unwrap().is_none());
        s.add_prompts(&["p1".into(), "p2".into(), "p3".into()], "t").await.unwrap();
        let (p1, draft) = s.next_write_prompt(&a.id).await.unwrap().unwrap();
        assert_eq!((p1.text.as_str(), draft), ("p1", None));

        let p2 = {
            let row = sqlx::query("SELECT id FROM prompts WHERE text = 'p2'").fetch_one(s.pool()).await.unwrap();
            row.get::<String, _>(0)
        };
        s.save_write_draft(&a.id, &p2, "so far").await.unwrap();
        let (next, draft) = s.next_write_prompt(&a.id).await.unwrap().unwrap();
        assert_eq!((next.id.as_str(), draft.as_deref()), (p2.as_str(), Some("so far")));
        assert_eq!(s.next_write_prompt(&b.id).await.unwrap().unwrap().1, None, "drafts are per user");

        invalid(s.add_demonstration(&a.id, &p2, " \n ").await);
        invalid(s.add_demonstration(&a.id, "nope", "text").await);
        s.add_demonstration(&a.id, &p2, "answer two").await.unwrap();
        let (next, draft) = s.next_write_prompt(&a.id).await.unwrap().unwrap();
        assert_eq!((next.text.as_str(), draft), ("p1", None));

        invalid(s.skip_write(&a.id, &p1.id, " ", "x").await);
        invalid(s.skip_write(&a.id, "nope", "why", "x").await);
        s.skip_write(&a.id, &p1.id, "don't know", "typed so far").await.unwrap();
        assert_eq!(s.next_write_prompt(&a.id).await.unwrap().unwrap().0.text, "p3");
        let kept: String = sqlx::query("SELECT draft FROM write_skips WHERE user_id = $1")
            .bind(&a.id)
            .fetch_one(s.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(kept, "typed so far");

        // Fewest demonstrations first: p1 and p2 have one each once bob answers p1.
        s.add_demonstration(&b.id, &p1.id, "answer one").await.unwrap();
        assert_eq!(s.next_write_prompt(&c.id).await.unwrap().unwrap().0.text, "p3");

        let sft = s.export_sft().await.unwrap();
        assert_eq!(sft.len(), 2);
        assert_eq!(
            serde_json::to_value(&sft[0].messages).unwrap(),
            serde_json::json!([{"role": "user", "content": "p2"}, {"role": "assistant", "content": "answer two"}])
        );
        assert_eq!((sft[0].labeller.as_str(), sft[1].labeller.as_str()), ("alice", "bob"));
        assert!(sft[1].time.ends_with('Z'));

        let pa = s.progress(&a.id).await.unwrap();
        assert_eq!((pa.written, pa.skipped), (1, 1));
        let stats = s.list_users().await.unwrap();
        assert_eq!((stats[1].name.as_str(), stats[1].written), ("bob", 1));
    })
    .await;
}

#[tokio::test]
async fn conversations_and_thumbs() {
    on_both(|s, _| async move {
        let a = user(&s, "alice").await;
        let b = user(&s, "bob").await;
        let conv = s.new_conversation(&a.id, "palm-small").await.unwrap();
        let sys = s
            .add_message(&conv, &a.id, "system", "be brief")
            .await
            .unwrap();
        let m1 = s.add_message(&conv, &a.id, "user", "hi").await.unwrap();
        let m2 = s
            .add_message(&conv, &a.id, "assistant", "hello")
            .await
            .unwrap();
        not_found(s.add_message(&conv, &b.id, "user", "intruding").await);
        not_found(s.add_message("missing", &a.id, "user", "hi").await);
        invalid(s.add_message(&conv, &a.id, "robot", "beep").await);
        let idx: Vec<i64> =
            sqlx::query("SELECT idx FROM messages WHERE conversation_id = $1 ORDER BY idx")
                .bind(&conv)
                .fetch_all(s.pool())
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
        assert_eq!(idx, [0, 1, 2]);

        invalid(s.set_thumbs(&m1, &a.id, Some(1)).await);
        invalid(s.set_thumbs(&sys, &a.id, Some(1)).await);
        not_found(s.set_thumbs(&m2, &b.id, Some(1)).await);
        not_found(s.set_thumbs("missing", &a.id, Some(1)).await);
        invalid(s.set_thumbs(&m2, &a.id, Some(2)).await);
        invalid(s.set_thumbs(&m2, &a.id, Some(0)).await);
        s.set_thumbs(&m2, &a.id, Some(-1)).await.unwrap();
        assert_eq!(s.progress(&a.id).await.unwrap().thumbs, 1);
        assert_eq!(s.progress(&b.id).await.unwrap().thumbs, 0);
        let stats = s.list_users().await.unwrap();
        assert_eq!((stats[0].name.as_str(), stats[0].thumbs), ("alice", 1));
        s.set_thumbs(&m2, &a.id, Some(1)).await.unwrap();
        assert_eq!(s.progress(&a.id).await.unwrap().thumbs, 1);
        s.set_thumbs(&m2, &a.id, None).await.unwrap();
        assert_eq!(s.progress(&a.id).await.unwrap().thumbs, 0);

        // Another conversation's indices start again at 0.
        let conv2 = s.new_conversation(&b.id, "palm-small").await.unwrap();
        s.add_message(&conv2, &b.id, "user", "yo").await.unwrap();
        assert_eq!(count(&s, "SELECT MAX(idx) FROM messages").await, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes() {
    on_both(|s, _| async move {
        let a = user(&s, "alice").await;
        let conv = s.new_conversation(&a.id, "m").await.unwrap();
        // Six labellers racing for the two free places of a task with overlap 3.
        let (p, g) = prompt_with_replies(&s, "shared", &["s1", "s2"]).await;
        let t = s.create_task(&a.id, &p, &g).await.unwrap().task_id;
        let mut racers = Vec::new();
        for i in 0..6 {
            let s = s.clone();
            racers.push(tokio::spawn(async move {
                let u = user(&s, &format!("racer{i}")).await;
                s.assign_shared_task(&u.id, 3)
                    .await
                    .unwrap()
                    .map(|v| v.task_id)
            }));
        }
        let mut got = Vec::new();
        for r in racers {
            got.extend(r.await.unwrap());
        }
        assert_eq!(got, [t.clone(), t.clone()]);
        let mut handles = Vec::new();
        for i in 0..16 {
            let (s, uid, conv) = (s.clone(), a.id.clone(), conv.clone());
            handles.push(tokio::spawn(async move {
                s.add_message(&conv, &uid, "user", &format!("m{i}"))
                    .await
                    .unwrap();
            }));
        }
        for i in 0..8 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                let u = user(&s, &format!("user{i}")).await;
                let (p, g) =
                    prompt_with_replies(&s, &format!("prompt {i}"), &["x", "y", "z"]).await;
                let t = s.create_task(&u.id, &p, &g).await.unwrap();
                s.submit_ranking(&t.task_id, &u.id, &rank(&[&g[2], &g[0], &g[1]]))
                    .await
                    .unwrap();
                s.add_demonstration(&u.id, &p, "w").await.unwrap();
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(
            count(&s, "SELECT COUNT(DISTINCT idx) FROM messages").await,
            16
        );
        assert_eq!(s.export_pairs(None).await.unwrap().len(), 8 * 3);
        assert_eq!(s.export_sft().await.unwrap().len(), 8);
    })
    .await;
}

#[tokio::test]
async fn temp_db_is_dropped_when_a_scenario_panics() {
    let Some(db) = testing::postgres_db().await else {
        return;
    };
    let name = db.url.rsplit('/').next().unwrap().to_string();
    let store = Store::open(&db.url).await.unwrap();
    user(&store, "alice").await;
    // The panic below is expected; TempDb's Drop must remove the database anyway, even with
    // the store's connections still open.
    let outcome = tokio::spawn(async move {
        let _db = db;
        let _store = store;
        panic!("(expected) a scenario failed");
    })
    .await;
    assert!(outcome.is_err());
    let admin = std::env::var("PALM_TEST_POSTGRES_URL").unwrap();
    // A plain connection: opening a Store on the admin database would migrate it.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
        .await
        .unwrap();
    let left = sqlx::query("SELECT COUNT(*) FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get::<i64, _>(0);
    assert_eq!(left, 0, "{name} was not dropped");
}
