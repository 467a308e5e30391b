//! `palm reward train|eval|score` and `palm generate --best-of` end to end on a tiny model.

use std::path::Path;

use assert_cmd::Command;
use candle_core::Device;
use palm::model::{Model, Palm};
use palm::PalmConfig;

fn tiny_base(dir: &Path) -> std::path::PathBuf {
    let cfg = PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len: 64,
        ..PalmConfig::new(256, 16, 1)
    };
    let p = dir.join("base");
    Model::Palm(Palm::new(&cfg, 0, &Device::Cpu).unwrap())
        .save(&p)
        .unwrap();
    p
}

fn pairs_file(dir: &Path) -> std::path::PathBuf {
    let mut body = String::new();
    for i in 0..12 {
        body.push_str(&format!(
            "{{\"prompt\":\"Q{i}:\",\"chosen\":\" good {i}\",\"rejected\":\" bad {i}\"}}\n"
        ));
    }
    let p = dir.join("pairs.jsonl");
    std::fs::write(&p, body).unwrap();
    p
}

fn palm() -> Command {
    Command::cargo_bin("palm").unwrap()
}

fn json(out: &[u8]) -> serde_json::Value {
    let s = String::from_utf8_lossy(out);
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one JSON line on stdout: {s}");
    serde_json::from_str(lines[0]).unwrap()
}

#[test]
fn train_eval_score_and_best_of() {
    let d = tempfile::tempdir().unwrap();
    let base = tiny_base(d.path());
    let data = pairs_file(d.path());
    let run = d.path().join("run");
    let train = |extra: &[&str]| {
        let mut c = palm();
        c.args(["reward", "train", "--model"])
            .arg(&base)
            .arg("--data")
            .arg(&data)
            .arg("--eval")
            .arg(&data)
            .arg("--out")
            .arg(&run)
            .args([
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--max-len",
                "32",
                "--lr",
                "1e-2",
            ])
            .args(extra);
        c
    };
    let out = train(&[]).assert().success().get_output().stdout.clone();
    let s = json(&out);
    assert_eq!(s["train_pairs"], 12);
    assert_eq!(s["eval_pairs"], 12);
    let acc = s["eval_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["eval_accuracy"].as_f64().unwrap(), acc);
    assert!(run.join("metrics.jsonl").exists() && run.join("metrics.svg").exists());

    // a second run into the same directory is refused; --resume of a finished run is a no-op
    let e = train(&[]).assert().failure().get_output().stderr.clone();
    assert!(String::from_utf8_lossy(&e).contains("--resume"));
    train(&["--resume"]).assert().success();

    // eval: one JSON object with accuracy, pairs, mean_margin (same numbers as training's eval)
    let out = palm()
        .args(["reward", "eval", "--model"])
        .arg(&run)
        .arg("--data")
        .arg(&data)
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let e = json(&out);
    assert_eq!(e["pairs"], 12);
    assert!((e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9);
    assert!(e["mean_margin"].is_number());
    // " good i" is one character longer than " bad i": the longer response always wins
    assert_eq!(e["longer_response_accuracy"].as_f64().unwrap(), 1.0);

    // score: one number
    let out = palm()
        .args(["reward", "score", "--model"])
        .arg(&run)
        .args(["--prompt", "Q1:", "--response", " good 1"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: f64 = String::from_utf8_lossy(&out).trim().parse().unwrap();
    assert!(v.is_finite());

    // best-of-N generation scored by the reward model
    palm()
        .args(["generate", "--model"])
        .arg(&base)
        .args([
            "--prompt",
            "Q1:",
            "--max-new-tokens",
            "4",
            "--best-of",
            "3",
            "--reward",
        ])
        .arg(&run)
        .assert()
        .success();

    // a model of another vocabulary is refused by name, not with an index error
    let other_cfg = PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len: 64,
        ..PalmConfig::new(300, 16, 1)
    };
    let other = d.path().join("other");
    Model::Palm(Palm::new(&other_cfg, 0, &Device::Cpu).unwrap())
        .save(&other)
        .unwrap();
    let out = palm()
        .args(["generate", "--tokenizer", "bytes", "--model"])
        .arg(&other)
        .args([
            "--prompt",
            "Q1:",
            "--max-new-tokens",
            "4",
            "--best-of",
            "2",
            "--reward",
        ])
        .arg(&run)
        .assert()
        .failure();
    let e = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        e.contains("vocabulary (256) differs from the model's (300)"),
        "{e}"
    );
}

#[test]
fn bad_data_names_file_and_line_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let base = tiny_base(d.path());
    let bad = d.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\n{\"prompt\":\"a\"\n",
    )
    .unwrap();
    let run = d.path().join("run");
    let out = palm()
        .args(["reward", "train", "--model"])
        .arg(&base)
        .arg("--data")
        .arg(&bad)
        .arg("--out")
        .arg(&run)
        .assert()
        .failure()
        .get_output()
        .stderr
        .clone();
    let msg = String::from_utf8_lossy(&out);
    assert!(msg.contains(&format!("{}:2:", bad.display())), "{msg}");
    assert!(!run.exists(), "nothing written before the inputs are valid");
}

#[test]
fn resume_extends_epochs_and_names_what_differs() {
    let d = tempfile::tempdir().unwrap();
    let base = tiny_base(d.path());
    let data = pairs_file(d.path());
    let run = d.path().join("rm");
    let train = |extra: &[&str]| {
        palm()
            .args(["reward", "train", "--max-len", "32", "--model"])
            .arg(&base)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&run)
            .args(extra)
            .assert()
    };
    train(&["--epochs", "1", "--batch-size", "4"]).success();
    let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
    assert_eq!(lines(&run.join("metrics.jsonl")), 3);
    // more epochs continue the run
    let out = train(&["--epochs", "2", "--batch-size", "4", "--resume"]).success();
    assert_eq!(json(&out.get_output().stdout)["steps"], 6);
    assert_eq!(lines(&run.join("metrics.jsonl")), 6);
    // other settings are refused by name, with the run's values, and nothing runs
    let out = train(&["--epochs", "3", "--batch-size", "2", "--resume"]).failure();
    let e = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(e.contains("batch_size: 2 (the run's: 4)"), "{e}");
    assert!(!e.contains("RewardTrainConfig {"), "no Debug dump: {e}");
    assert_eq!(lines(&run.join("metrics.jsonl")), 6);
}
