//! `palm ppo` against a `palm reward train` model on a tiny policy: 2 steps, then `--resume` 1
//! step; bad prompts files are refused before anything is written.

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

fn palm() -> Command {
    Command::cargo_bin("palm").unwrap()
}

fn ppo(dir: &Path, prompts: &str, out: &str, extra: &[&str]) -> Command {
    let mut c = palm();
    c.current_dir(dir)
        .args(["ppo", "--reward", "rm", "--prompts", prompts, "--out", out])
        .args(extra);
    c
}

#[test]
fn ppo_with_a_trained_reward_model_then_resume() {
    let d = ppo_then_resume(&[]);
    // a new run on the same --out is refused, and the run is untouched
    let metrics = d.path().join("run/metrics.jsonl");
    let before = std::fs::read(&metrics).unwrap();
    let out = ppo(
        d.path(),
        "prompts.txt",
        "run",
        &["--policy", "base", "--steps", "1"],
    )
    .assert()
    .failure();
    let e = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(e.contains("already holds a PPO run"), "{e}");
    assert_eq!(std::fs::read(&metrics).unwrap(), before);

    // a prompt too long for the context is refused before anything is written
    let long = "Q".repeat(70);
    std::fs::write(d.path().join("long.txt"), format!("Q1:\n{long}\n")).unwrap();
    let out = ppo(
        d.path(),
        "long.txt",
        "run-long",
        &["--policy", "base", "--steps", "1"],
    )
    .assert()
    .failure();
    let e = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(e.contains("long.txt: prompt 2 has"), "{e}");
    assert!(!d.path().join("run-long").exists(), "nothing written");
}

#[test]
fn ppo_full_fine_tuning_with_the_critic_from_the_reward_model_then_resume() {
    let d = ppo_then_resume(&["--actor", "full", "--critic-init", "reward"]);
    assert!(d
        .path()
        .join("run/checkpoint/frozen/model.safetensors")
        .exists());
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("run/checkpoint/trainer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["config"]["actor"], "full");
    assert_eq!(st["config"]["critic_init"], "reward");
    // the original's pooled HL-Gauss critic has no exact copy of a scalar reward head
    let out = ppo(
        d.path(),
        "prompts.txt",
        "run2",
        &[
            "--policy",
            "base",
            "--critic-init",
            "reward",
            "--recipe",
            "palm-rlhf-pytorch",
        ],
    )
    .assert()
    .failure();
    let e = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(e.contains("critic_init reward"), "{e}");
    assert!(!d.path().join("run2").exists(), "nothing written");
}

fn ppo_then_resume(extra: &[&str]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let base = tiny_base(d.path());
    let mut pairs = String::new();
    for i in 0..8 {
        pairs.push_str(&format!(
            "{{\"prompt\":\"Q{i}:\",\"chosen\":\" good\",\"rejected\":\" bad\"}}\n"
        ));
    }
    std::fs::write(d.path().join("pairs.jsonl"), pairs).unwrap();
    palm()
        .current_dir(d.path())
        .args(["reward", "train", "--model"])
        .arg(&base)
        .args(["--data", "pairs.jsonl", "--out", "rm", "--epochs", "1"])
        .args(["--batch-size", "4", "--max-len", "32"])
        .assert()
        .success();
    std::fs::write(d.path().join("prompts.txt"), "Q1:\nQ22:\nQ333:\n").unwrap();
    let small = [
        "--batch-size",
        "3",
        "--minibatch-size",
        "3",
        "--epochs",
        "1",
        "--max-new-tokens",
        "4",
        "--seed",
        "3",
    ];
    let mut args = vec!["--policy", "base", "--steps", "2"];
    args.extend(small);
    args.extend(extra);
    let out = ppo(d.path(), "prompts.txt", "run", &args)
        .assert()
        .success();
    // stderr is a pipe here: a progress line per step instead of a bar
    let e = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        e.contains("ppo step 1/2: score") && e.contains("ppo step 2/2"),
        "{e}"
    );
    let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().count();
    let metrics = d.path().join("run/metrics.jsonl");
    assert_eq!(lines(&metrics), 2);
    ppo(
        d.path(),
        "prompts.txt",
        "run",
        &["--resume", "--steps", "3"],
    )
    .assert()
    .success();
    assert_eq!(lines(&metrics), 3);
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["step"], 3);
    assert!(last["objective/scores"].as_f64().unwrap().is_finite());
    assert!(d.path().join("run/policy").exists());
    d
}

#[test]
fn bad_prompts_file_and_unknown_reward_are_refused() {
    let d = tempfile::tempdir().unwrap();
    tiny_base(d.path());
    std::fs::write(
        d.path().join("bad.jsonl"),
        "{\"prompt\": \"ok\"}\n{\"text\": \"no prompt\"}\n",
    )
    .unwrap();
    let err = |c: &mut Command| {
        String::from_utf8_lossy(&c.assert().failure().get_output().stderr).into_owned()
    };
    let e = err(&mut ppo(
        d.path(),
        "bad.jsonl",
        "run",
        &["--policy", "base"],
    ));
    insta::assert_snapshot!("ppo_bad_prompts", e.trim());
    assert!(!d.path().join("run").exists(), "nothing written");
    std::fs::write(d.path().join("p.txt"), "hi\n").unwrap();
    let e = err(&mut ppo(d.path(), "p.txt", "run", &["--policy", "base"]));
    assert!(e.contains("--reward rm: no such file"), "{e}");
    assert!(!d.path().join("run").exists(), "nothing written");
}
