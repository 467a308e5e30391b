//! Where the shared, read-only data lives (`../shared` beside the checkout, or `PALM_SHARED_DIR`),
//! and how tests behave when it is absent: skipped loudly, or failed when `PALM_REQUIRE_SHARED=1` (CI).

use std::path::{Path, PathBuf};

/// The shared folder: `PALM_SHARED_DIR`, else `../shared` relative to the workspace root.
pub fn shared_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PALM_SHARED_DIR") {
        return PathBuf::from(dir);
    }
    // crates/palm -> workspace root -> ../shared
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.join("../../../shared")
}

/// The golden files of the PyTorch original: `PALM_REFERENCE_DIR`, else
/// `<shared>/reference/palm-rlhf-pytorch-0.8.0`.
pub fn reference_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("PALM_REFERENCE_DIR") {
        return PathBuf::from(dir);
    }
    shared_dir().join("reference/palm-rlhf-pytorch-0.8.0")
}

/// `<shared>/data/<rel>`.
pub fn data_path(rel: &str) -> PathBuf {
    shared_dir().join("data").join(rel)
}

/// Returns `Some(path)` when it exists. When it does not, panics if `PALM_REQUIRE_SHARED=1`
/// (so CI fails), else prints a loud skip message to stderr and returns `None`.
pub fn require(path: impl AsRef<Path>) -> Option<PathBuf> {
    let path = path.as_ref();
    if path.exists() {
        return Some(path.to_path_buf());
    }
    if std::env::var("PALM_REQUIRE_SHARED").as_deref() == Ok("1") {
        panic!(
            "shared fixture {} is missing and PALM_REQUIRE_SHARED=1",
            path.display()
        );
    }
    skipped(&format!(
        "shared fixture {} is absent (set PALM_SHARED_DIR; CI sets PALM_REQUIRE_SHARED=1)",
        path.display()
    ));
    None
}

/// Says loudly that a test skips part of its work, on stderr and, when `PALM_SKIP_LOG` names a
/// file, as a line appended to it: libtest hides a passing test's stderr, so CI counts skips from
/// that file (`.ci/run` prints the count and fails when it is not 0).
pub fn skipped(why: &str) {
    eprintln!("\n!!! SKIPPED: {why} !!!\n");
    if let Some(log) = std::env::var_os("PALM_SKIP_LOG") {
        use std::io::Write;
        let test = std::thread::current().name().unwrap_or("?").to_string();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}
