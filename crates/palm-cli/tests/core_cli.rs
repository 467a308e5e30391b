//! CLI snapshots for `palm info` and `palm generate`: exit code, stdout and stderr.

use assert_cmd::Command;
use candle_core::Device;
use palm::{Model, Palm, PalmConfig};

fn palm_cmd() -> Command {
    let mut c = Command::cargo_bin("palm").unwrap();
    c.env("NO_COLOR", "1").env_remove("RUST_LOG");
    c
}

fn tiny_checkpoint(dir: &std::path::Path) {
    let cfg = PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len: 64,
        ..PalmConfig::new(256, 16, 1)
    };
    Model::from(Palm::new(&cfg, 0, &Device::Cpu).unwrap())
        .save(dir)
        .unwrap();
}

/// Replaces the temp dir in output so snapshots are stable.
fn scrub(s: &[u8], dir: &std::path::Path) -> String {
    String::from_utf8_lossy(s).replace(&dir.display().to_string(), "[TMP]")
}

#[test]
fn info_prints_config_and_parameter_count() {
    let root = tempfile::tempdir().unwrap();
    let ckpt = root.path().join("m");
    tiny_checkpoint(&ckpt);
    let out = palm_cmd()
        .args(["info", "--model"])
        .arg(&ckpt)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // 256*16 embedding + 16 final norm + one block: 16 norm + fused (16+16+16+128)*16 + attn_out 16*16 + ff_out 16*64
    let expected = 256 * 16 + 16 + 16 + (16 + 8 + 8 + 2 * 64) * 16 + 16 * 16 + 16 * 64;
    assert_eq!(v["parameters"], expected);
    assert_eq!(v["architecture"], "palm");
    insta::assert_snapshot!(scrub(&out.stdout, root.path()));
}

#[test]
fn generate_streams_only_the_completion_to_stdout() {
    let root = tempfile::tempdir().unwrap();
    let ckpt = root.path().join("m");
    tiny_checkpoint(&ckpt);
    let run = || {
        palm_cmd()
            .args([
                "generate",
                "--greedy",
                "--ignore-eos",
                "--max-new-tokens",
                "8",
                "--prompt",
                "Hi",
                "--model",
            ])
            .arg(&ckpt)
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // exactly the 8 greedy tokens the library samples from the same checkpoint (the byte
    // tokenizer: "Hi" is ids 72, 105), decoded, plus a newline; status went to stderr
    let model = palm::load::load_model(&ckpt, &Device::Cpu).unwrap();
    let req = palm::sample::GenerateRequest {
        prompts: vec![vec![72, 105]],
        max_new_tokens: 8,
        eos: vec![],
        sampling: palm::sample::Sampling::greedy(),
        seed: 0,
        scope: None,
        disable_lora: false,
    };
    let ids = palm::sample::generate(&model, &req, |_, _| {})
        .unwrap()
        .completions[0]
        .clone();
    assert_eq!(ids.len(), 8);
    let bytes: Vec<u8> = ids.iter().map(|&i| u8::try_from(i).unwrap()).collect();
    let want = format!("{}\n", String::from_utf8_lossy(&bytes));
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    assert!(String::from_utf8_lossy(&out.stderr).contains("8 tokens in"));
    // the same command twice gives the same completion
    let again = run();
    assert_eq!(out.stdout, again.stdout);
}

#[test]
fn bad_inputs_exit_1_with_a_clear_message() {
    let root = tempfile::tempdir().unwrap();
    let ckpt = root.path().join("m");
    tiny_checkpoint(&ckpt);
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "missing_model",
            vec![
                "info".into(),
                "--model".into(),
                root.path().join("nope").display().to_string(),
            ],
        ),
        (
            "empty_prompt",
            vec![
                "generate".into(),
                "--prompt".into(),
                "".into(),
                "--model".into(),
                ckpt.display().to_string(),
            ],
        ),
        (
            "prompt_too_long",
            vec![
                "generate".into(),
                "--prompt".into(),
                "x".repeat(60),
                "--max-new-tokens".into(),
                "10".into(),
                "--model".into(),
                ckpt.display().to_string(),
            ],
        ),
        (
            "bad_top_p",
            vec![
                "generate".into(),
                "--prompt".into(),
                "a".into(),
                "--top-p".into(),
                "1.5".into(),
                "--model".into(),
                ckpt.display().to_string(),
            ],
        ),
    ];
    for (name, args) in cases {
        let out = palm_cmd().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert!(out.stdout.is_empty(), "{name}: nothing on stdout");
        insta::assert_snapshot!(name, scrub(&out.stderr, root.path()));
    }
}

#[test]
fn nan_weights_are_an_error_naming_the_model_not_garbage() {
    let d = tempfile::tempdir().unwrap();
    tiny_checkpoint(d.path());
    // every weight NaN
    let file = d.path().join("model.safetensors");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let nan: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k, (t * f64::NAN).unwrap()))
        .collect();
    candle_core::safetensors::save(&nan, &file).unwrap();
    let out = palm_cmd()
        .args([
            "generate",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "3",
            "--model",
        ])
        .arg(d.path())
        .assert()
        .code(1);
    let e = scrub(&out.get_output().stderr, d.path());
    assert!(e.contains("generating with [TMP]"), "{e}");
    assert!(e.contains("non-finite logit"), "{e}");
}

#[test]
fn logs_to_a_file_or_pipe_carry_no_colour_codes() {
    let d = tempfile::tempdir().unwrap();
    tiny_checkpoint(d.path());
    // no NO_COLOR here: stderr is a pipe, so the log must still be plain text
    let out = Command::cargo_bin("palm")
        .unwrap()
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .args([
            "generate",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--model",
        ])
        .arg(d.path())
        .assert()
        .success();
    let e = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(e.contains("INFO"), "a log line is expected: {e}");
    assert!(!e.contains('\u{1b}'), "ANSI escape in a piped log: {e:?}");
}

#[test]
fn negative_numbers_are_values() {
    let d = tempfile::tempdir().unwrap();
    tiny_checkpoint(d.path());
    // a negative temperature reaches the sampler (greedy), not clap's "unexpected argument"
    palm_cmd()
        .args([
            "generate",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--temperature",
            "-1",
            "--model",
        ])
        .arg(d.path())
        .assert()
        .success();
}

/// Every flag of every command says what it does in `--help` (half of `palm ppo --help` once had
/// no descriptions).
#[test]
fn every_flag_of_every_command_has_a_description() {
    let commands: &[&[&str]] = &[
        &["info"],
        &["generate"],
        &["chat"],
        &["tokenize"],
        &["export"],
        &["bench"],
        &["train"],
        &["reward", "train"],
        &["reward", "eval"],
        &["reward", "score"],
        &["ppo"],
        &["rl"],
        &["dpo"],
        &["dpo", "eval"],
        &["quickstart"],
        &["serve"],
        &["feedback", "user", "add"],
        &["feedback", "user", "list"],
        &["feedback", "export"],
        &["feedback", "prompts"],
        &["feedback", "agreement"],
    ];
    let mut bare = Vec::new();
    for c in commands {
        let out = palm_cmd().args(*c).arg("--help").assert().success();
        let help = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
        let lines: Vec<&str> = help.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let is_flag = l.starts_with("      --") || l.starts_with("  -");
            // short help puts the description on the flag's line, long help on the next
            let inline = l
                .trim_start()
                .split_once("  ")
                .is_some_and(|(_, d)| !d.trim().is_empty());
            let next_is_text = lines.get(i + 1).is_some_and(|n| {
                !n.trim().is_empty() && !n.starts_with("      --") && !n.starts_with("  -")
            });
            if is_flag && !inline && !next_is_text {
                bare.push(format!("palm {}: {}", c.join(" "), l.trim()));
            }
        }
    }
    assert!(
        bare.is_empty(),
        "flags without a description:\n{}",
        bare.join("\n")
    );
}

/// `palm bench train --lora-r R` trains a LoRA scope (base frozen) and says so in its JSON; the
/// flag is refused for the other workloads.
#[test]
fn bench_train_with_lora() {
    let run = |args: &[&str]| palm_cmd().args(args).output().unwrap();
    let o = run(&[
        "bench", "train", "--config", "tiny", "--runs", "1", "--lora-r", "4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["lora_r"], 4);
    assert!(v["tokens_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    let full = run(&["bench", "train", "--config", "tiny", "--runs", "1"]);
    let f: serde_json::Value = serde_json::from_slice(&full.stdout).unwrap();
    assert!(f["lora_r"].is_null());
    // the LoRA step skips the weight gradients: its FLOP count is two forwards, not three
    let per_token = |v: &serde_json::Value| {
        v["gflops"].as_f64().unwrap() / v["tokens_per_sec"].as_f64().unwrap()
    };
    let ratio = per_token(&v) / per_token(&f);
    assert!((ratio - 2.0 / 3.0).abs() < 1e-6, "{ratio}");
    let o = run(&["bench", "sample", "--config", "tiny", "--lora-r", "4"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--lora-r"));
}

/// `palm bench train --gradient-checkpointing` runs on a Hugging Face model and says so in its
/// JSON; a PaLM (whose blocks are fused nodes already) and the other workloads refuse it.
#[test]
fn bench_train_with_gradient_checkpointing() {
    let run = |args: &[&str]| palm_cmd().args(args).output().unwrap();
    let Some(root) = palm::fixtures::require(palm::fixtures::data_path("models/tiny-random-hf"))
    else {
        return;
    };
    let llama = root.join("llama");
    let llama = llama.to_str().unwrap();
    let o = run(&[
        "bench",
        "train",
        "--model",
        llama,
        "--runs",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "8",
        "--gradient-checkpointing",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["gradient_checkpointing"], true);
    let palm = run(&[
        "bench",
        "train",
        "--config",
        "tiny",
        "--runs",
        "1",
        "--gradient-checkpointing",
    ]);
    assert!(!palm.status.success());
    let err = String::from_utf8_lossy(&palm.stderr);
    assert!(err.contains("Hugging Face and GGUF models"), "{err}");
    let o = run(&[
        "bench",
        "sample",
        "--model",
        llama,
        "--gradient-checkpointing",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--gradient-checkpointing"));
}
