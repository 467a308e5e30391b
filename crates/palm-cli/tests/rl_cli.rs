//! `palm rl` and `palm dpo` end to end on a tiny byte-level model: a run, its files, exact
//! resume refusal rules, and clear errors for bad settings.

use assert_cmd::Command;
use candle_core::Device;
use palm::{Model, Palm, PalmConfig};

fn palm_cmd() -> Command {
    let mut c = Command::cargo_bin("palm").unwrap();
    c.env("NO_COLOR", "1").env_remove("RUST_LOG");
    c
}

fn tiny_checkpoint(dir: &std::path::Path) {
    tiny_checkpoint_len(dir, 64)
}

fn tiny_checkpoint_len(dir: &std::path::Path, max_seq_len: usize) {
    let cfg = PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len,
        ..PalmConfig::new(256, 16, 1)
    };
    Model::from(Palm::new(&cfg, 0, &Device::Cpu).unwrap())
        .save(dir)
        .unwrap();
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn rl_runs_refuses_a_group_of_one_and_an_existing_run() {
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("m");
    tiny_checkpoint(&m);
    let prompts = root.path().join("p.txt");
    std::fs::write(&prompts, "hello\nhow are you\n").unwrap();
    let out = root.path().join("run");
    let base = |c: &mut Command| {
        c.args([
            "rl",
            "--algorithm",
            "rloo",
            "--reward",
            "vader",
            "--steps",
            "2",
        ])
        .args(["--batch-size", "2", "--max-new-tokens", "4", "--policy"])
        .arg(&m)
        .arg("--prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&out);
    };
    let mut c = palm_cmd();
    base(&mut c);
    let o = c.args(["--group-size", "1"]).output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--group-size must be at least 2"),
        "{}",
        stderr(&o)
    );
    if palm::fixtures::require(palm::fixtures::data_path("judges/vader")).is_none() {
        return;
    }
    let mut c = palm_cmd();
    base(&mut c);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "metrics.jsonl",
        "reward.svg",
        "kl.svg",
        "summary.json",
        "checkpoint/trainer.json",
        "policy",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let first = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let m0: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    for k in [
        "reward",
        "frac_reward_zero_std",
        "kl",
        "clip_ratio/region_mean",
    ] {
        assert!(m0[k].is_number(), "{k}: {m0}");
    }
    let mut c = palm_cmd();
    base(&mut c);
    let o = c.output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("add --resume"), "{}", stderr(&o));
}

#[test]
fn dpo_trains_and_evaluates_pairs() {
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("m");
    tiny_checkpoint(&m);
    let data = root.path().join("pairs.jsonl");
    let mut s = String::new();
    for i in 0..12 {
        s +=
            &format!("{{\"prompt\":\"q{i}\",\"chosen\":\"yes {i}\",\"rejected\":\"no no {i}\"}}\n");
    }
    std::fs::write(&data, s).unwrap();
    let out = root.path().join("dpo");
    let o = palm_cmd()
        .args([
            "dpo",
            "--batch-size",
            "4",
            "--epochs",
            "2",
            "--lr",
            "1e-2",
            "--model",
        ])
        .arg(&m)
        .arg("--data")
        .arg(&data)
        .arg("--eval")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["steps"], 6);
    let before = summary["initial_eval"]["loss"].as_f64().unwrap();
    assert!((before - std::f64::consts::LN_2).abs() < 1e-4, "{summary}");
    assert!(
        summary["eval"]["loss"].as_f64().unwrap() < before,
        "{summary}"
    );
    assert!(out.join("reference_logps.safetensors").exists());
    let o = palm_cmd()
        .args(["dpo", "eval", "--run"])
        .arg(&out)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["pairs"], 12);
    // the run's own final evaluation on the same pairs
    let acc = summary["eval"]["accuracy"].as_f64().unwrap();
    assert!(
        (e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9,
        "{e} vs {summary}"
    );
}

#[test]
fn rl_on_a_task_resumes_with_the_same_prompts_only() {
    let root = tempfile::tempdir().unwrap();
    let m = root.path().join("m");
    // byte-level chat prompts of the default template are ~100 tokens
    tiny_checkpoint_len(&m, 192);
    let out = root.path().join("run");
    let run = |extra: &[&str]| {
        palm_cmd()
            .args([
                "rl",
                "--algorithm",
                "dr-grpo",
                "--task",
                "arithmetic:1",
                "--heldout",
                "4",
            ])
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let policy = m.display().to_string();
    let o = run(&[
        "--policy",
        &policy,
        "--steps",
        "1",
        "--train-prompts",
        "8",
        "--group-size",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        s["heldout_before"]["accuracy"].is_number() && s["heldout_after"]["format"].is_number(),
        "{s}"
    );
    // other prompt flags: refused, naming task.json
    let o = run(&["--resume", "--steps", "2", "--train-prompts", "9"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("task.json"), "{}", stderr(&o));
    // a setting of the run: refused
    let o = run(&[
        "--resume",
        "--steps",
        "2",
        "--train-prompts",
        "8",
        "--batch-size",
        "3",
    ]);
    assert!(
        stderr(&o).contains("only --steps may change"),
        "{}",
        stderr(&o)
    );
    // the same flags: one more step
    let o = run(&["--resume", "--steps", "2", "--train-prompts", "8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let n = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(n, 2);
}

/// A copied binary finds `--reward vader`'s lexicon in `judges/vader` beside it, with no shared
/// data folder; without one there, the error names where it looked and how to give it.
#[test]
fn bare_vader_finds_its_lexicon_beside_the_binary() {
    let Some(lex) = palm::fixtures::require(palm::fixtures::data_path("judges/vader")) else {
        return;
    };
    let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("palm");
    let built = assert_cmd::cargo::cargo_bin("palm");
    if std::fs::hard_link(&built, &exe).is_err() {
        std::fs::copy(&built, &exe).unwrap();
    }
    let m = root.path().join("m");
    tiny_checkpoint(&m);
    let prompts = root.path().join("p.txt");
    std::fs::write(&prompts, "hello\nhow are you\n").unwrap();
    let run = |out: &str| {
        std::process::Command::new(&exe)
            .env("NO_COLOR", "1")
            .env("PALM_SHARED_DIR", root.path().join("no-shared-here"))
            .env_remove("PALM_VADER_DIR")
            .args([
                "rl",
                "--algorithm",
                "rloo",
                "--reward",
                "vader",
                "--steps",
                "1",
            ])
            .args(["--batch-size", "2", "--max-new-tokens", "3", "--policy"])
            .arg(&m)
            .arg("--prompts")
            .arg(&prompts)
            .arg("--out")
            .arg(root.path().join(out))
            .output()
            .unwrap()
    };
    let o = run("without");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("no VADER lexicon") && err.contains("vader:DIR") && err.contains("bin"),
        "{err}"
    );
    let beside = bin.join("judges/vader");
    std::fs::create_dir_all(&beside).unwrap();
    std::fs::copy(
        lex.join("vader_lexicon.txt"),
        beside.join("vader_lexicon.txt"),
    )
    .unwrap();
    let o = run("with");
    assert!(o.status.success(), "{}", stderr(&o));
}
