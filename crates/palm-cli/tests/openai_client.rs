//! The official `openai` Python client, unchanged, against `palm serve` on SmolLM2-135M-Instruct
//! (scripts/openai-client.sh: its own venv from PyPI; models, a plain and a streamed chat
//! completion, max_completion_tokens, stop, n, text completions, and the 400/401/404 errors).
//!
//! Skipped loudly without python3; `PALM_REQUIRE_OPENAI=1` (CI) makes that a failure.

use std::path::Path;
use std::process::Command;

#[test]
fn the_official_openai_client_works_unchanged() {
    let have_python = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_python {
        if std::env::var("PALM_REQUIRE_OPENAI").as_deref() == Ok("1") {
            panic!("python3 is missing and PALM_REQUIRE_OPENAI=1");
        }
        palm::fixtures::skipped("python3 is absent (CI sets PALM_REQUIRE_OPENAI=1)");
        return;
    }
    let Some(model) = palm::fixtures::require(palm::fixtures::data_path(
        "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    )) else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/openai-client.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--palm")
        .arg(assert_cmd::cargo::cargo_bin("palm"))
        .arg("--model")
        .arg(&model)
        .args(["--max-tokens", "12"])
        .output()
        .expect("running scripts/openai-client.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai-client.sh failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("all checks passed") || stderr.contains("all checks passed"),
        "{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");
}
