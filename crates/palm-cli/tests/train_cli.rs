//! `palm train` from the command line: bad input is refused before RUN_DIR is touched (stderr
//! snapshots), a tiny run writes its run directory, and `--resume` extends it.

use std::path::Path;

use assert_cmd::Command;

fn palm_cmd() -> Command {
    let mut c = Command::cargo_bin("palm").unwrap();
    c.env("NO_COLOR", "1").env_remove("RUST_LOG");
    c
}

/// Replaces the temp dir in output so snapshots are stable.
fn scrub(s: &[u8], dir: &std::path::Path) -> String {
    String::from_utf8_lossy(s).replace(&dir.display().to_string(), "[TMP]")
}

fn tiny_config(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("tiny.json");
    std::fs::write(
        &p,
        r#"{"dim": 16, "num_tokens": 256, "depth": 1, "heads": 2, "dim_head": 8, "max_seq_len": 64}"#,
    )
    .unwrap();
    p
}

#[test]
fn bad_data_is_refused_before_anything_is_written() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::write(r.join("empty.txt"), "").unwrap();
    std::fs::write(
        r.join("bad.jsonl"),
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\" \"response\": 1}\n",
    )
    .unwrap();
    std::fs::write(
        r.join("wrong.jsonl"),
        "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"question\": \"a\"}\n",
    )
    .unwrap();
    std::fs::write(r.join("short.txt"), "too short").unwrap();
    let cases = [
        ("train_missing_file", "missing.txt"),
        ("train_empty_file", "empty.txt"),
        ("train_bad_jsonl_line", "bad.jsonl"),
        ("train_wrong_jsonl_fields", "wrong.jsonl"),
        ("train_too_short_for_seq_len", "short.txt"),
    ];
    for (name, file) in cases {
        let out_dir = r.join(format!("run-{name}"));
        let out = palm_cmd()
            .current_dir(r)
            .args(["train", "--quiet", "--steps", "2", "--data", file, "--out"])
            .arg(&out_dir)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(out.stdout.is_empty(), "{name}: nothing on stdout");
        assert!(!out_dir.exists(), "{name}: RUN_DIR was created");
        insta::assert_snapshot!(name, scrub(&out.stderr, r));
    }
}

#[test]
fn resume_without_a_run_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let out = palm_cmd()
        .args(["train", "--resume", "--out"])
        .arg(root.path().join("nothing"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = scrub(&out.stderr, root.path());
    assert!(err.contains("no checkpoint to resume from"), "{err}");
}

#[test]
fn tiny_run_then_resume_to_more_steps() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::write(
        r.join("t.txt"),
        "to be or not to be, that is the question. ".repeat(40),
    )
    .unwrap();
    let cfg = tiny_config(r);
    let run = r.join("run");
    let args = |steps: &str| {
        let mut v: Vec<String> = [
            "train",
            "--quiet",
            "--data",
            "t.txt",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--eval-every",
            "2",
            "--eval-batches",
            "2",
            "--save-every",
            "2",
            "--steps",
            steps,
            "--config",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(cfg.display().to_string());
        v.push("--out".into());
        v.push(run.display().to_string());
        v
    };
    let out = palm_cmd().current_dir(r).args(args("4")).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["steps"], 4);
    assert_eq!(s["completed"], true);
    assert!(s["final_val_loss"].as_f64().unwrap() > 0.0);
    assert!(run.join("final/model.safetensors").exists());
    assert!(run.join("loss.svg").exists());

    // the same command again is refused (the run exists)
    let again = palm_cmd().current_dir(r).args(args("4")).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));

    // --resume with more steps continues from step 4
    let out = palm_cmd()
        .current_dir(r)
        .args(["train", "--quiet", "--resume", "--steps", "6", "--out"])
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["steps"], 6);
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);

    // --resume refuses flags that differ from the run's settings, naming them and the run's values
    std::fs::write(r.join("other.txt"), "another corpus entirely. ".repeat(40)).unwrap();
    let resume = |extra: &[&str]| {
        palm_cmd()
            .current_dir(r)
            .args(["train", "--quiet", "--resume", "--steps", "7"])
            .args(extra)
            .arg("--out")
            .arg(&run)
            .output()
            .unwrap()
    };
    let out = resume(&[
        "--batch-size",
        "4",
        "--data",
        "other.txt",
        "--seq-len",
        "16",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = scrub(&out.stderr, r);
    assert!(e.contains("--batch-size 4 (the run's: 2)"), "{e}");
    assert!(
        e.contains("--data other.txt (the run's: [TMP]/t.txt)"),
        "{e}"
    );
    assert!(!e.contains("--seq-len"), "the same value is fine: {e}");
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
        lines,
        "nothing ran"
    );
    // the same values and the same data are accepted
    let out = resume(&["--batch-size", "2", "--data", "t.txt"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGTERM (what `timeout`, `docker stop` and Slurm send) saves a checkpoint and exits 130, and
/// `--resume` continues from it.
#[test]
fn sigterm_saves_and_exits_130_then_resume_continues() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::write(
        r.join("t.txt"),
        "to be or not to be, that is the question. ".repeat(40),
    )
    .unwrap();
    let cfg = tiny_config(r);
    let run = r.join("run");
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("palm"))
        .current_dir(r)
        .args([
            "train",
            "--quiet",
            "--data",
            "t.txt",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
        ])
        .args([
            "--save-every",
            "1000000",
            "--eval-every",
            "1000000",
            "--steps",
            "1000000",
            "--config",
        ])
        .arg(&cfg)
        .arg("--out")
        .arg(&run)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait until it trains (its metrics file appears), then SIGTERM
    let t0 = std::time::Instant::now();
    while !run.join("metrics.jsonl").exists() {
        assert!(t0.elapsed().as_secs() < 60, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["completed"], false);
    let steps = s["steps"].as_u64().unwrap();
    assert!(!run.join("final").exists(), "no final model after a stop");
    // no temporary checkpoint directory is left behind
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.iter().all(|n| !n.contains(".tmp")),
        "{leftovers:?}"
    );
    let out = palm_cmd()
        .current_dir(r)
        .args([
            "train",
            "--quiet",
            "--resume",
            "--steps",
            &(steps + 2).to_string(),
            "--out",
        ])
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["steps"].as_u64(), Some(steps + 2));
    assert_eq!(s["completed"], true);
}

/// kill -9 at seeded random moments (the checkpoint writes slowed down so kills land inside
/// them), resuming after each: the newest checkpoint always loads, and the run ends with the
/// same per-step losses and the same final weights, bit for bit, as an uninterrupted run.
/// `PALM_KILL_ROUNDS` sets the number of kills (default 6).
#[test]
fn kill_9_at_random_moments_then_resume_ends_where_an_uninterrupted_run_ends() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::write(
        r.join("t.txt"),
        "to be or not to be, that is the question. ".repeat(40),
    )
    .unwrap();
    let cfg = tiny_config(r);
    let start = |run: &Path, resume: bool| {
        let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("palm"));
        c.current_dir(r)
            .env("PALM_TEST_CHECKPOINT_DELAY_MS", "40")
            .args(["train", "--quiet"]);
        if resume {
            c.arg("--resume");
        } else {
            c.args([
                "--data",
                "t.txt",
                "--seq-len",
                "16",
                "--batch-size",
                "2",
                "--steps",
                "40",
            ]);
            c.args([
                "--save-every",
                "2",
                "--eval-every",
                "4",
                "--eval-batches",
                "2",
                "--config",
            ])
            .arg(&cfg);
        }
        c.arg("--out")
            .arg(run)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c.spawn().unwrap()
    };
    // the uninterrupted run
    let reference = r.join("reference");
    assert!(start(&reference, false).wait().unwrap().success());
    // the killed one
    let run = r.join("killed");
    let rounds: usize = std::env::var("PALM_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let mut seed: u64 = 0x5eed;
    let (mut kills, mut finished, mut in_writes) = (0, false, 0);
    while kills < rounds && !finished {
        let has_checkpoint = run.join("checkpoints").read_dir().is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| !e.file_name().to_string_lossy().contains(".tmp-")))
        });
        let mut child = start(&run, has_checkpoint);
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait_ms = 20 + (seed >> 33) % 250;
        std::thread::sleep(std::time::Duration::from_millis(wait_ms));
        match child.try_wait().unwrap() {
            Some(st) => {
                assert!(st.success(), "round {kills}: the run failed on its own");
                finished = true;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                let mid_write = run.join("checkpoints").read_dir().is_ok_and(|mut d| {
                    d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().contains(".tmp-")))
                });
                in_writes += usize::from(mid_write);
            }
        }
    }
    if !finished {
        let has_checkpoint = run.join("checkpoints").exists();
        assert!(
            start(&run, has_checkpoint).wait().unwrap().success(),
            "the last resume"
        );
    }
    eprintln!("{kills} kills survived, {in_writes} of them during a checkpoint write");
    // same per-step losses, same final weights
    let losses = |run: &Path| -> Vec<(u64, String)> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss"].to_string())
            })
            .collect()
    };
    assert_eq!(losses(&run), losses(&reference));
    let weights = |run: &Path| std::fs::read(run.join("final/model.safetensors")).unwrap();
    assert!(weights(&run) == weights(&reference), "final weights differ");
    let summary = |run: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
    };
    for k in ["final_train_loss", "final_val_loss", "steps", "completed"] {
        assert_eq!(summary(&run)[k], summary(&reference)[k], "{k}");
    }
}
