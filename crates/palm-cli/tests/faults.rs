//! Faults while training, on real runs of `palm train` and `palm reward train`:
//! - a checkpoint write that fails (an injected full disk, `PALM_TEST_FAIL_CHECKPOINT_WRITE`, and
//!   a real one: a file-size limit, RLIMIT_FSIZE, makes the kernel refuse the write with EFBIG)
//!   stops the run with an error naming the checkpoint, leaves the previous checkpoint as it
//!   was (and loadable) and no temporary behind;
//! - a NaN injected into one gradient (`PALM_TEST_NAN_GRAD_AT_STEP`) stops the run, names the
//!   step, and keeps the last good checkpoint;
//! - after either, `--resume` ends where an uninterrupted run ends, bit for bit.

use std::path::{Path, PathBuf};

mod common;
use common::{leftovers, metrics, same_value, summary};
use std::process::{Command, Output};

use candle_core::Device;
use palm::model::{Model, Palm};
use palm::PalmConfig;

fn palm() -> Command {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("palm"));
    c.env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env_remove("PALM_TEST_FAIL_CHECKPOINT_WRITE")
        .env_remove("PALM_TEST_NAN_GRAD_AT_STEP");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

/// Fails with status 1, and returns stderr.
fn fails(o: Output) -> String {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    stderr(&o)
}

/// The `error: ...` line of stderr.
fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or("")
}

/// Every file of a checkpoint directory, by name, with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The checkpoint loads, and its trainer.json is at `step`.
fn assert_checkpoint_at(ck: &Path, step: u64) {
    palm::load::load_model(ck, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{} does not load: {e}", ck.display()));
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("trainer.json")).unwrap()).unwrap();
    assert_eq!(st["step"].as_u64(), Some(step), "{}", ck.display());
}

/// The run ended as the reference did: metrics and summary (timing fields aside), and the
/// bytes of the final weights.
fn assert_same_run(run: &Path, reference: &Path, weights: &[&str], timing: &[&str]) {
    let (a, b) = (metrics(run, timing), metrics(reference, timing));
    assert_eq!(a.len(), b.len(), "metrics.jsonl lines");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        // the log keeps its lines' text on resume (`MetricsLog::open`), so they are equal exactly
        assert!(x == y, "metrics.jsonl line {}:\n{x}\nvs\n{y}", i + 1);
    }
    let (a, b) = (summary(run, timing), summary(reference, timing));
    assert!(same_value(&a, &b), "summary.json:\n{a}\nvs\n{b}");
    for f in weights {
        let bytes = |d: &Path| std::fs::read(d.join(f)).unwrap();
        assert!(bytes(run) == bytes(reference), "{f} differs");
    }
}

/// Runs `c` with writes of files over `bytes` refused by the kernel (RLIMIT_FSIZE, with SIGXFSZ
/// ignored so that the write fails with EFBIG instead of killing the process), as a full
/// filesystem refuses them.
#[cfg(target_os = "linux")]
fn with_file_size_limit(c: &mut Command, bytes: u64) -> &mut Command {
    use std::os::unix::process::CommandExt;
    #[repr(C)]
    struct RLimit {
        cur: u64,
        max: u64,
    }
    extern "C" {
        fn setrlimit(resource: i32, rlim: *const RLimit) -> i32;
        fn signal(sig: i32, handler: usize) -> usize;
    }
    const RLIMIT_FSIZE: i32 = 1;
    const SIGXFSZ: i32 = 25;
    const SIG_IGN: usize = 1;
    // SAFETY: between fork and exec only async-signal-safe calls (signal, setrlimit) are made.
    unsafe {
        c.pre_exec(move || {
            signal(SIGXFSZ, SIG_IGN);
            let l = RLimit {
                cur: bytes,
                max: bytes,
            };
            if setrlimit(RLIMIT_FSIZE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

const TRAIN_TIMING: &[&str] = &["tokens_per_sec", "elapsed", "elapsed_sec"];

fn train_args(cfg: &Path) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--quiet",
        "--data",
        "t.txt",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--steps",
        "8",
        "--save-every",
        "2",
        "--keep-checkpoints",
        "5",
        "--eval-every",
        "8",
        "--eval-batches",
        "2",
        "--sample-every",
        "0",
        "--config",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(cfg.display().to_string());
    v
}

/// `palm train`: an injected full disk at the second checkpoint, then a real write refused by
/// the kernel on resume, then a NaN gradient in another run; each stops the run, keeps the last
/// good checkpoint, and `--resume` ends with the uninterrupted run's weights.
#[test]
fn train_write_faults_and_a_nan_gradient_keep_the_last_good_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::write(
        r.join("t.txt"),
        "to be or not to be, that is the question. ".repeat(40),
    )
    .unwrap();
    let cfg = r.join("tiny.json");
    std::fs::write(
        &cfg,
        r#"{"dim": 16, "num_tokens": 256, "depth": 1, "heads": 2, "dim_head": 8, "max_seq_len": 64}"#,
    )
    .unwrap();
    let train = |out: &Path| {
        let mut c = palm();
        c.current_dir(r)
            .args(train_args(&cfg))
            .arg("--out")
            .arg(out);
        c
    };
    let resume = |out: &Path| {
        let mut c = palm();
        c.current_dir(r)
            .args(["train", "--quiet", "--resume", "--out"])
            .arg(out);
        c
    };
    let reference = r.join("reference");
    ok(train(&reference).output().unwrap());
    let ck = |run: &Path, step: u32| run.join(format!("checkpoints/step-{step:06}"));

    // 1. the second checkpoint write (step 4) fails as on a full disk
    let run = r.join("full-disk");
    let e = fails(
        train(&run)
            .env("PALM_TEST_FAIL_CHECKPOINT_WRITE", "2")
            .output()
            .unwrap(),
    );
    let at4 = ck(&run, 4).display().to_string();
    assert!(
        e.contains(&format!("could not write {at4}")) && e.contains("No space left on device"),
        "names the checkpoint and the cause: {e}"
    );
    assert!(
        e.contains(&format!(
            "the last good checkpoint is {}",
            ck(&run, 2).display()
        )),
        "{e}"
    );
    assert!(!ck(&run, 4).exists() && !run.join("final").exists());
    assert_checkpoint_at(&ck(&run, 2), 2);
    assert_eq!(leftovers(&run), Vec::<PathBuf>::new(), "no temporary left");
    eprintln!("injected full disk: {}", error_line(&e));

    // 2. resumed under a file-size limit: the kernel refuses the checkpoint's weights (EFBIG)
    #[cfg(target_os = "linux")]
    {
        let before = snapshot(&ck(&run, 2));
        let weights = std::fs::metadata(ck(&run, 2).join("model.safetensors"))
            .unwrap()
            .len();
        let limit = 8 * 1024;
        assert!(
            weights > 2 * limit,
            "the weights ({weights} bytes) exceed the limit"
        );
        let e = fails(
            with_file_size_limit(&mut resume(&run), limit)
                .output()
                .unwrap(),
        );
        assert!(
            e.contains(&format!("could not write {at4}")) && e.contains("File too large"),
            "names the checkpoint and the kernel's error: {e}"
        );
        assert!(before == snapshot(&ck(&run, 2)), "step-000002 is untouched");
        assert_checkpoint_at(&ck(&run, 2), 2);
        assert!(!ck(&run, 4).exists());
        assert_eq!(leftovers(&run), Vec::<PathBuf>::new(), "no temporary left");
        eprintln!("real EFBIG: {}", error_line(&e));
    }
    ok(resume(&run).output().unwrap());
    assert_same_run(&run, &reference, &["final/model.safetensors"], TRAIN_TIMING);

    // 3. a NaN in one gradient at step 5: stopped before the update, step-000004 kept
    let run = r.join("nan");
    let e = fails(
        train(&run)
            .env("PALM_TEST_NAN_GRAD_AT_STEP", "5")
            .output()
            .unwrap(),
    );
    assert!(e.contains("step 5: gradient is NaN"), "names the step: {e}");
    assert!(
        e.contains(&format!(
            "the last good checkpoint is {}",
            ck(&run, 4).display()
        )),
        "{e}"
    );
    assert_checkpoint_at(&ck(&run, 4), 4);
    assert!(!run.join("final").exists());
    eprintln!("NaN gradient: {}", error_line(&e));
    ok(resume(&run).output().unwrap());
    assert_same_run(&run, &reference, &["final/model.safetensors"], TRAIN_TIMING);
}

/// `palm reward train`: an injected full disk at the third checkpoint write, then a NaN
/// gradient in another run.
#[test]
fn reward_train_write_fault_and_a_nan_gradient_keep_the_last_good_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    let cfg = PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len: 64,
        ..PalmConfig::new(256, 16, 1)
    };
    Model::Palm(Palm::new(&cfg, 0, &Device::Cpu).unwrap())
        .save(&r.join("base"))
        .unwrap();
    let mut body = String::new();
    for i in 0..12 {
        body.push_str(&format!(
            "{{\"prompt\":\"Q{i}:\",\"chosen\":\" good {i}\",\"rejected\":\" bad {i}\"}}\n"
        ));
    }
    std::fs::write(r.join("pairs.jsonl"), body).unwrap();
    let train = |out: &str, resume: bool| {
        let mut c = palm();
        let out = r.join(out);
        c.current_dir(r).args([
            "reward",
            "train",
            "--model",
            "base",
            "--data",
            "pairs.jsonl",
            "--eval",
            "pairs.jsonl",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--max-len",
            "32",
            "--lr",
            "1e-2",
            "--save-every",
            "1",
            "--out",
        ]);
        c.arg(out);
        if resume {
            c.arg("--resume");
        }
        c
    };
    let weights = [
        "reward_model/model.safetensors",
        "reward_model/reward_head.safetensors",
    ];
    ok(train("reference", false).output().unwrap());

    let ck = r.join("full-disk/checkpoint");
    let e = fails(
        train("full-disk", false)
            .env("PALM_TEST_FAIL_CHECKPOINT_WRITE", "3")
            .output()
            .unwrap(),
    );
    assert!(
        e.contains(&format!("could not write {}", ck.display()))
            && e.contains("No space left on device"),
        "names the checkpoint and the cause: {e}"
    );
    assert_checkpoint_at(&ck, 2);
    assert!(!r.join("full-disk/reward_model").exists());
    assert_eq!(leftovers(&r.join("full-disk")), Vec::<PathBuf>::new());
    eprintln!("injected full disk: {}", error_line(&e));
    ok(train("full-disk", true).output().unwrap());
    assert_same_run(
        &r.join("full-disk"),
        &r.join("reference"),
        &weights,
        &["seconds"],
    );

    let e = fails(
        train("nan", false)
            .env("PALM_TEST_NAN_GRAD_AT_STEP", "4")
            .output()
            .unwrap(),
    );
    let ck = r.join("nan/checkpoint");
    assert!(
        e.contains("step 4: a gradient is NaN")
            && e.contains(&format!(
                "the last good checkpoint, {}, is kept",
                ck.display()
            )),
        "names the step and the checkpoint: {e}"
    );
    assert_checkpoint_at(&ck, 3);
    eprintln!("NaN gradient: {}", error_line(&e));
    ok(train("nan", true).output().unwrap());
    assert_same_run(&r.join("nan"), &r.join("reference"), &weights, &["seconds"]);
}
