//! Data parallelism over MPI (`cargo test -p palm-cli --features mpi`): `mpirun -n 2 palm train`
//! lands where one process lands with the same global batch, a rank that dies ends the job
//! instead of hanging it, and a run resumes only with its own world size.
//!
//! Without the `mpi` feature these tests say so (and fail under `PALM_REQUIRE_MPI=1`, as in CI).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn palm() -> PathBuf {
    assert_cmd::cargo::cargo_bin("palm")
}

/// Whether this build can run the tests: the `mpi` feature and an `mpirun` on PATH.
fn mpi_ready() -> bool {
    let has_mpirun = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if cfg!(feature = "mpi") && has_mpirun {
        return true;
    }
    let why = if cfg!(feature = "mpi") {
        "mpirun is not on PATH (apt-get install openmpi-bin)"
    } else {
        "palm-cli was built without the `mpi` feature (cargo test --features palm-cli/mpi)"
    };
    if std::env::var("PALM_REQUIRE_MPI").as_deref() == Ok("1") {
        panic!("{why}, and PALM_REQUIRE_MPI=1");
    }
    palm::fixtures::skipped(why);
    false
}

/// `mpirun --oversubscribe -n N palm ARGS`, one thread per rank (2 ranks on 2 cores), allowed as
/// root (CI runs as root).
fn mpirun(n: usize, dir: &Path) -> Command {
    let mut c = Command::new("mpirun");
    c.current_dir(dir)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .args([
            "--oversubscribe",
            "-n",
            &n.to_string(),
            "-x",
            "RAYON_NUM_THREADS=1",
        ])
        .arg(palm());
    c
}

fn single(dir: &Path) -> Command {
    let mut c = Command::new(palm());
    c.current_dir(dir)
        .env("NO_COLOR", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("RUST_LOG");
    c
}

fn run_ok(c: &mut Command, what: &str) -> std::process::Output {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn tiny_train_setup(dir: &Path) -> Vec<String> {
    let data = palm::fixtures::data_path("corpora/tinyshakespeare.txt");
    std::fs::write(
        dir.join("tiny.json"),
        r#"{"dim": 32, "num_tokens": 256, "depth": 2, "heads": 2, "dim_head": 16, "max_seq_len": 64}"#,
    )
    .unwrap();
    [
        "train",
        "--quiet",
        "--config",
        "tiny.json",
        "--data",
        data.to_str().unwrap(),
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--steps",
        "20",
        "--eval-every",
        "10",
        "--eval-batches",
        "2",
        "--save-every",
        "10",
        "--seed",
        "7",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn losses(run: &Path) -> Vec<(u64, f64, Option<f64>)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["val_loss"].as_f64(),
            )
        })
        .collect()
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    weights_in(dir, "model.safetensors")
}

fn weights_in(dir: &Path, file: &str) -> Vec<(String, Vec<f32>)> {
    let t = palm::params::read_tensors(&dir.join(file), &candle_core::Device::Cpu).unwrap();
    t.into_iter()
        .map(|(k, v)| {
            let v = v
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (k, v)
        })
        .collect()
}

/// The issue's check: 20 steps, global batch 8, two ranks of 4 rows each against one process of
/// 8 rows: per-step losses within 1e-5, final weights within 1e-5 (absolute, every element; Adam
/// normalises updates, so float-order differences in the gradients stay at that level).
#[test]
fn two_ranks_train_like_one_process() {
    if !mpi_ready() || palm::fixtures::require(palm::fixtures::data_path("corpora")).is_none() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let args = tiny_train_setup(r);
    let t0 = Instant::now();
    run_ok(single(r).args(&args).args(["--out", "one"]), "one process");
    let t_one = t0.elapsed();
    let t0 = Instant::now();
    let o = run_ok(
        mpirun(2, r).args(&args).args(["--out", "two"]),
        "mpirun -n 2",
    );
    let t_two = t0.elapsed();
    eprintln!("20 steps: one process {t_one:.2?}, mpirun -n 2 {t_two:.2?} (with start-up)");
    // one summary on stdout (rank 0's), not one per rank
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.matches("\"completed\"").count(), 1, "{stdout}");
    let (a, b) = (losses(&r.join("one")), losses(&r.join("two")));
    assert_eq!(a.len(), 20);
    assert_eq!(
        a.len(),
        b.len(),
        "one metrics line per step, written by rank 0 only"
    );
    let mut worst: f64 = 0.0;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.0, y.0);
        worst = worst.max((x.1 - y.1).abs());
        assert!(
            (x.1 - y.1).abs() < 1e-5,
            "step {}: loss {} vs {}",
            x.0,
            x.1,
            y.1
        );
        match (x.2, y.2) {
            (Some(u), Some(v)) => assert!((u - v).abs() < 1e-5, "step {}: val {u} vs {v}", x.0),
            (None, None) => {}
            _ => panic!("step {}: validation on one side only", x.0),
        }
    }
    let (wa, wb) = (weights(&r.join("one/final")), weights(&r.join("two/final")));
    assert_eq!(wa.len(), wb.len());
    let mut wmax: f32 = 0.0;
    for ((ka, va), (kb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(ka, kb);
        for (x, y) in va.iter().zip(vb) {
            wmax = wmax.max((x - y).abs());
        }
    }
    eprintln!("largest loss difference {worst:.3e}, largest weight difference {wmax:.3e}");
    assert!(wmax < 1e-5, "final weights differ by up to {wmax}");
    // the run knows its world size: resuming it with another one is refused, naming both
    let o = single(r)
        .args(["train", "--resume", "--steps", "24", "--out", "two"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("2 processes") && err.contains("mpirun -n 2"),
        "{err}"
    );
}

/// A rank killed with SIGKILL mid-run: mpirun ends the other rank and exits with an error within
/// a bounded time (no hang in the next all-reduce), and the last checkpoint still loads.
#[test]
fn a_dead_rank_ends_the_job_and_leaves_a_loadable_checkpoint() {
    if !mpi_ready() || palm::fixtures::require(palm::fixtures::data_path("corpora")).is_none() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let mut args = tiny_train_setup(r);
    // long enough to be killed mid-run; a checkpoint every 2 steps
    set_flag(&mut args, "--steps", "100000");
    set_flag(&mut args, "--save-every", "2");
    let mut job = mpirun(2, r)
        .args(&args)
        .args(["--out", "run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ck = r.join("run/checkpoints");
    let t0 = Instant::now();
    while !ck.read_dir().is_ok_and(|mut d| {
        d.any(|e| {
            e.is_ok_and(|e| {
                e.file_name().to_string_lossy().starts_with("step-")
                    && !e.file_name().to_string_lossy().contains(".tmp")
            })
        })
    }) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint after 120 s"
        );
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended on its own"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // the ranks are mpirun's children (through its daemon on one node); kill the last one
    let ranks = children_named(job.id(), "palm");
    assert_eq!(
        ranks.len(),
        2,
        "expected 2 palm ranks under mpirun, found {ranks:?}"
    );
    let victim = *ranks.iter().max().unwrap();
    unsafe { libc_kill(victim as i32, 9) };
    let t_kill = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if t_kill.elapsed() > Duration::from_secs(60) {
            let _ = job.kill();
            panic!("mpirun still running 60 s after a rank died");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let waited = t_kill.elapsed();
    eprintln!("a killed rank ended the job in {waited:.2?} ({status})");
    assert!(!status.success());
    // the newest checkpoint loads (rank 0 may have been mid-write: the old one is then newest)
    let o = single(r)
        .args(["info", "--model"])
        .arg(newest_checkpoint(&ck))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `palm info` under mpirun says which rank and world size each process runs in.
#[test]
fn info_names_rank_and_world_size() {
    if !mpi_ready() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let mut args = tiny_train_setup(r);
    set_flag(&mut args, "--steps", "1");
    run_ok(
        single(r).args(&args).args(["--out", "run"]),
        "a one-step run",
    );
    let o = run_ok(
        mpirun(2, r).args(["info", "--model", "run/final"]),
        "mpirun palm info",
    );
    let out = String::from_utf8_lossy(&o.stdout);
    for rank in 0..2 {
        assert!(out.contains(&format!("\"rank\": {rank}")), "{out}");
    }
    assert_eq!(out.matches("\"world_size\": 2").count(), 2, "{out}");
    // a command that does not run data-parallel is refused by name
    let o = mpirun(2, r)
        .args(["generate", "--model", "run/final", "--prompt", "a"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("runs in one process"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A tiny PaLM checkpoint and 16 preference pairs, for `palm reward train` and `palm dpo`; a
/// reward model on the same trunk (LoRA, scalar head) and 6 prompts, for `palm rl` and `palm ppo`.
fn tiny_base_and_pairs(dir: &Path) {
    let cfg = palm::PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len: 64,
        ..palm::PalmConfig::new(256, 16, 1)
    };
    let tiny = || palm::Model::Palm(palm::Palm::new(&cfg, 0, &candle_core::Device::Cpu).unwrap());
    tiny().save(&dir.join("base")).unwrap();
    let lora = Some(palm::config::LoraSpec::new(4));
    let rm_cfg = palm::rlhf::reward::RewardConfig::default();
    palm::rlhf::reward::RewardModel::new(tiny(), rm_cfg, lora, 7)
        .unwrap()
        .save(&dir.join("rm"))
        .unwrap();
    std::fs::write(
        dir.join("prompts.txt"),
        "Q1:\nQ22:\nQ333:\nhow are you\nsay:\nA long prompt, longer than the rest:\n",
    )
    .unwrap();
    let mut body = String::new();
    for i in 0..16 {
        body.push_str(&format!(
            "{{\"prompt\":\"Q{i}:\",\"chosen\":\" good {i}\",\"rejected\":\" bad bad {i}\"}}\n"
        ));
    }
    std::fs::write(dir.join("pairs.jsonl"), body).unwrap();
}

/// One process against `mpirun -n 2` for a trainer: every numeric field of every metrics line
/// (timings aside) within 1e-5, and every tensor of the final model's safetensors files within
/// 1e-5 (absolute).
fn pairs_trainer_agrees(args: &[&str], final_dir: &str) {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    tiny_base_and_pairs(r);
    run_ok(single(r).args(args).args(["--out", "one"]), "one process");
    let o = run_ok(
        mpirun(2, r).args(args).args(["--out", "two"]),
        "mpirun -n 2",
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        1,
        "one summary line (rank 0's)"
    );
    let lines = |run: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(r.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (lines("one"), lines("two"));
    if std::env::var_os("PALM_TEST_VERBOSE").is_some() {
        eprintln!("{a:?}");
    }
    let steps = args
        .windows(2)
        .find(|w| w[0] == "--steps")
        .map_or(8, |w| w[1].parse().unwrap());
    assert!(a.len() >= steps, "{} metrics lines", a.len());
    assert_eq!(a.len(), b.len());
    let mut worst: f64 = 0.0;
    for (x, y) in a.iter().zip(&b) {
        let (x, y) = (x.as_object().unwrap(), y.as_object().unwrap());
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        for (k, u) in x {
            if k.starts_with("time/") || k.starts_with("speed/") {
                continue;
            }
            if let (Some(u), Some(v)) = (u.as_f64(), y[k].as_f64()) {
                worst = worst.max((u - v).abs());
                assert!((u - v).abs() < 1e-5, "{k}: {u} vs {v} in {x:?}");
            }
        }
    }
    let mut wmax: f32 = 0.0;
    for e in std::fs::read_dir(r.join("one").join(final_dir))
        .unwrap()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.ends_with(".safetensors") {
            continue;
        }
        let dir = |run: &str| r.join(run).join(final_dir);
        let (wa, wb) = (
            weights_in(&dir("one"), &name),
            weights_in(&dir("two"), &name),
        );
        assert_eq!(wa.len(), wb.len(), "{name}");
        for ((ka, va), (kb, vb)) in wa.iter().zip(&wb) {
            assert_eq!(ka, kb);
            for (x, y) in va.iter().zip(vb) {
                wmax = wmax.max((x - y).abs());
            }
        }
    }
    eprintln!(
        "{}: largest metric difference {worst:.3e}, weight {wmax:.3e}",
        args[..3].join(" ")
    );
    assert!(wmax < 1e-5, "final weights differ by up to {wmax}");
}

#[test]
fn reward_train_on_two_ranks_agrees_with_one_process() {
    if !mpi_ready() {
        return;
    }
    pairs_trainer_agrees(
        &[
            "reward",
            "train",
            "--model",
            "base",
            "--data",
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
            "3",
        ],
        "reward_model",
    );
}

#[test]
fn dpo_on_two_ranks_agrees_with_one_process() {
    if !mpi_ready() {
        return;
    }
    pairs_trainer_agrees(
        &[
            "dpo",
            "--model",
            "base",
            "--data",
            "pairs.jsonl",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
        ],
        "policy",
    );
}

/// The issue's check for the online trainers: rollouts split across the ranks (GRPO groups
/// whole on one rank), then the same statistics (rewards, group stds, KL, entropy, clip ratios,
/// REINFORCE++'s batch whitening, DAPO's kept groups) and the same weights as one process.
/// Six prompts of unequal lengths; minibatches of 3 and 5 rows split unevenly across the ranks.
#[test]
fn rl_on_two_ranks_agrees_with_one_process() {
    if !mpi_ready() {
        return;
    }
    for (alg, extra) in [
        ("grpo", &["--steps", "2"][..]),
        (
            "reinforce++",
            &["--steps", "2", "--minibatch-size", "5"][..],
        ),
        // DAPO's overlong filter off: the tiny policy rarely ends a response, and rows with
        // no loss would leave little to compare
        (
            "dapo",
            &[
                "--steps",
                "2",
                "--minibatch-size",
                "3",
                "--micro-batch-size",
                "2",
                "--overlong-filter",
                "false",
            ][..],
        ),
    ] {
        let mut args = vec![
            "rl",
            "--algorithm",
            alg,
            "--reward",
            "rm",
            "--prompts",
            "prompts.txt",
            "--policy",
            "base",
            "--batch-size",
            "4",
            "--group-size",
            "2",
            "--max-new-tokens",
            "6",
            "--seed",
            "5",
        ];
        args.extend_from_slice(extra);
        pairs_trainer_agrees(&args, "checkpoint");
    }
}

/// PPO: rollouts split across the ranks, the adaptive KL controller fed the global KL, actor
/// and critic gradients all-reduced: the same metrics and checkpoint (actor, critic, value
/// head, both optimisers) as one process.
#[test]
fn ppo_on_two_ranks_agrees_with_one_process() {
    if !mpi_ready() {
        return;
    }
    pairs_trainer_agrees(
        &[
            "ppo",
            "--reward",
            "rm",
            "--prompts",
            "prompts.txt",
            "--policy",
            "base",
            "--steps",
            "2",
            "--batch-size",
            "5",
            "--minibatch-size",
            "3",
            "--epochs",
            "2",
            "--max-new-tokens",
            "6",
            "--kl-target",
            "0.01",
            "--seed",
            "3",
        ],
        "checkpoint",
    );
}

fn set_flag(args: &mut [String], flag: &str, value: &str) {
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1] = value.into();
}

fn newest_checkpoint(ck: &Path) -> PathBuf {
    let mut steps: Vec<PathBuf> = ck
        .read_dir()
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with("step-") && !n.contains(".tmp")
        })
        .collect();
    steps.sort();
    steps.pop().expect("a checkpoint")
}

/// Processes named `name` among the descendants of `pid` (from /proc).
fn children_named(pid: u32, name: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...
            let Some(close) = stat.rfind(')') else {
                continue;
            };
            let comm = &stat[stat.find('(').unwrap_or(0) + 1..close];
            let ppid: u32 = stat[close + 2..]
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if ppid == p {
                if comm == name {
                    found.push(child);
                }
                frontier.push(child);
            }
        }
    }
    found
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
