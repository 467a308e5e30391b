//! A real chat model from the command line: SmolLM2-135M-Instruct as a Q4_1 GGUF
//! (`palm generate --chat`, `palm chat` scripted through stdin, `palm tokenize`, `palm info`),
//! and `palm export` of a tiny Llama to GGUF and to an HF directory, re-run through `palm`.

use assert_cmd::Command;

fn palm_cmd() -> Command {
    let mut c = Command::cargo_bin("palm").unwrap();
    c.env("NO_COLOR", "1").env_remove("RUST_LOG");
    c
}

fn smollm2() -> Option<std::path::PathBuf> {
    palm::fixtures::require(palm::fixtures::data_path(
        "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    ))
}

fn reference() -> serde_json::Value {
    let p = palm::fixtures::data_path("models/smollm2-135m-instruct/reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn stdout_of(c: &mut Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "exit {:?}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn generate_chat_answers_and_stops_at_end_of_turn() {
    let Some(gguf) = smollm2() else { return };
    let out = palm_cmd()
        .args(["generate", "--chat", "--greedy", "--max-new-tokens", "48"])
        .arg("--model")
        .arg(&gguf)
        .args(["--prompt", "What is the capital of France?"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "The capital of France is Paris.\n"
    );
    assert!(stderr.contains("stopped at EOS"), "{stderr}");
}

#[test]
fn chat_session_scripted_through_stdin() {
    let Some(gguf) = smollm2() else { return };
    let script = "What is the capital of France?\n/reset\nWhat is the capital of France?\n/system Answer in one word.\n/unknown\n/exit\nnever read\n";
    let out = palm_cmd()
        .args(["chat", "--greedy", "--max-new-tokens", "32"])
        .arg("--model")
        .arg(&gguf)
        .write_stdin(script)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    // one reply per user turn, the same after /reset (same history, greedy)
    assert_eq!(
        lines,
        vec![
            "The capital of France is Paris.",
            "The capital of France is Paris."
        ],
        "stderr: {stderr}"
    );
    assert!(stderr.contains("history cleared"), "{stderr}");
    assert!(stderr.contains("unknown command /unknown"), "{stderr}");
}

#[test]
fn tokenize_plain_and_chat() {
    let Some(gguf) = smollm2() else { return };
    let r = reference();
    for case in r["tokenizer"].as_array().unwrap() {
        let out = stdout_of(
            palm_cmd()
                .arg("tokenize")
                .arg("--model")
                .arg(&gguf)
                .args(["--text", case["text"].as_str().unwrap()]),
        );
        let ids: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(ids, case["ids"], "{}", case["text"]);
    }
    let chat = &r["chat"][0];
    let out = stdout_of(
        palm_cmd()
            .args(["tokenize", "--chat"])
            .arg("--model")
            .arg(&gguf)
            .args(["--text", chat["prompt"].as_str().unwrap()]),
    );
    let ids: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ids, chat["input_ids"]);
}

#[test]
fn info_on_a_gguf_names_what_a_user_needs() {
    let Some(gguf) = smollm2() else { return };
    let out = stdout_of(palm_cmd().arg("info").arg("--model").arg(&gguf));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "gguf");
    assert!(v["quantization"].as_str().unwrap().contains("Q4_1"), "{v}");
    assert_eq!(v["context_length"], 8192);
    assert_eq!(v["vocab_size"], 49152);
    assert!(v["eos_ids"].as_array().unwrap().contains(&2.into()), "{v}");
    assert!(v["eos_tokens"]
        .as_array()
        .unwrap()
        .contains(&"<|im_end|>".into()));
    assert_eq!(v["chat_template"], true);
}

#[test]
fn export_to_gguf_and_hf_then_generate_the_same() {
    let Some(llama) =
        palm::fixtures::require(palm::fixtures::data_path("models/tiny-random-hf/llama"))
    else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let generate = |model: &std::path::Path| {
        stdout_of(
            palm_cmd()
                .arg("generate")
                .arg("--model")
                .arg(model)
                .args(["--tokenizer", "bytes", "--greedy", "--ignore-eos"])
                .args(["--max-new-tokens", "12", "--prompt", "abc"]),
        )
    };
    let want = generate(&llama);
    let gguf = root.path().join("llama.gguf");
    palm_cmd()
        .arg("export")
        .arg("--model")
        .arg(&llama)
        .args(["--format", "gguf", "--out"])
        .arg(&gguf)
        .assert()
        .success();
    assert_eq!(generate(&gguf), want);
    let hf = root.path().join("hf");
    palm_cmd()
        .arg("export")
        .arg("--model")
        .arg(&gguf)
        .args(["--format", "hf", "--out"])
        .arg(&hf)
        .assert()
        .success();
    assert_eq!(generate(&hf), want);
    // an existing --out is refused
    let out = palm_cmd()
        .arg("export")
        .arg("--model")
        .arg(&llama)
        .args(["--format", "hf", "--out"])
        .arg(&hf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
}
