//! `palm generate` on a Hugging Face model directory, from text to text: stories260K with its
//! llama2.c tokenizer found in the parent folder, greedy, equal to transformers' greedy text.

use assert_cmd::Command;

#[test]
fn generate_stories260k_text_to_text() {
    let Some(dir) = palm::fixtures::require(palm::fixtures::data_path("models/stories260K")) else {
        return;
    };
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("hf/reference_greedy.json")).unwrap(),
    )
    .unwrap();
    let out = Command::cargo_bin("palm")
        .unwrap()
        .args(["generate", "--model"])
        .arg(dir.join("hf"))
        .args([
            "--prompt",
            "Once upon a time",
            "--greedy",
            "--max-new-tokens",
            "95",
        ])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(out).unwrap();
    // stdout is the completion only; prompt + completion = the reference text
    let want = r["greedy_text"].as_str().unwrap();
    assert_eq!(
        format!("Once upon a time{}", text.trim_end_matches('\n')),
        want
    );
}
