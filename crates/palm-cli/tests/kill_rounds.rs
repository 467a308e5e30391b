//! kill -9 at seeded random moments, resuming after each, for every trainer other than
//! `palm train` (train_cli.rs has its own): `palm reward train`, `palm rl --algorithm grpo`,
//! `palm ppo` and `palm dpo`. Checkpoint writes are slowed down (`PALM_TEST_CHECKPOINT_DELAY_MS`)
//! so that kills land inside them. After every kill the newest checkpoint loads; at the end the
//! run's per-step metrics (all but the timing fields each command names), final weights (the
//! bytes of its safetensors files) and `summary.json` equal an uninterrupted run's.
//!
//! `palm reward train` and `palm ppo` also get SIGTERM: they save, exit 130, and `--resume`
//! ends with the uninterrupted run's weights. And every command refuses to start a new run over
//! a finished one without `--resume`.
//!
//! `PALM_KILL_ROUNDS` sets the number of kills per command (default 20; each run is given
//! 2 x rounds + 6 steps, so that they land before its end).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

mod common;
use common::{leftovers, metrics, same_value, summary};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use palm::config::LoraSpec;
use palm::model::{Model, Palm};
use palm::rlhf::reward::{RewardConfig, RewardModel};
use palm::PalmConfig;

/// Milliseconds every directory write waits between its files and its rename.
const WRITE_DELAY_MS: &str = "60";

fn palm() -> Command {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("palm"));
    c.env("NO_COLOR", "1").env_remove("RUST_LOG");
    c
}

fn tiny_config() -> PalmConfig {
    PalmConfig {
        heads: 2,
        dim_head: 8,
        max_seq_len: 64,
        ..PalmConfig::new(256, 16, 1)
    }
}

/// `dir/base`: a tiny byte-level policy; `dir/rm`: a reward model on it (LoRA, scalar head).
fn tiny_models(dir: &Path) {
    let base = Model::Palm(Palm::new(&tiny_config(), 0, &Device::Cpu).unwrap());
    base.save(&dir.join("base")).unwrap();
    let trunk = Model::Palm(Palm::new(&tiny_config(), 0, &Device::Cpu).unwrap());
    RewardModel::new(trunk, RewardConfig::default(), Some(LoraSpec::new(4)), 7)
        .unwrap()
        .save(&dir.join("rm"))
        .unwrap();
}

fn pairs_file(dir: &Path) {
    let mut body = String::new();
    for i in 0..12 {
        body.push_str(&format!(
            "{{\"prompt\":\"Q{i}:\",\"chosen\":\" good {i}\",\"rejected\":\" bad no {i}\"}}\n"
        ));
    }
    std::fs::write(dir.join("pairs.jsonl"), body).unwrap();
    std::fs::write(dir.join("prompts.txt"), "Q1:\nQ22:\nQ333:\nhow are you\n").unwrap();
}

fn args(words: &[&str]) -> Vec<OsString> {
    words.iter().map(OsString::from).collect()
}

/// Kills per command: `PALM_KILL_ROUNDS`, default 20 (about 15 s a command in a debug build).
fn rounds() -> usize {
    std::env::var("PALM_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Steps of each run: a kill lets a run progress about two steps on average, so that many
/// kills land before the end.
fn steps() -> usize {
    2 * rounds() + 6
}

/// One trainer under test.
struct Subject {
    /// For messages: `reward train`, `ppo`...
    name: &'static str,
    /// The arguments of a new run and of `--resume`, both without `--out`.
    fresh: Vec<OsString>,
    resume: Vec<OsString>,
    /// The final model's files, relative to the run directory, compared byte for byte.
    weights: &'static [&'static str],
    /// Fields of metrics.jsonl and summary.json that measure time, left out of comparisons.
    timing: &'static [&'static str],
    /// Whether the run ends with summary.json.
    summary: bool,
}

impl Subject {
    fn start(&self, root: &Path, run: &Path, resume: bool) -> Child {
        let mut c = palm();
        c.current_dir(root)
            .env("PALM_TEST_CHECKPOINT_DELAY_MS", WRITE_DELAY_MS)
            .args(if resume { &self.resume } else { &self.fresh })
            .arg("--out")
            .arg(run)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c.spawn().unwrap()
    }

    /// Runs to the end, failing the test with stderr if it fails.
    fn finish(&self, mut child: Child) {
        let st = child.wait().unwrap();
        if !st.success() {
            let mut e = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut e).unwrap();
            panic!("palm {}: {st}\n{e}", self.name);
        }
    }
}

/// `RUN/checkpoint`, or `RUN/checkpoint.old` where a write was killed between its two renames.
fn checkpoint(run: &Path) -> Option<PathBuf> {
    let ck = palm::checkpoint::resolve_dir(&run.join("checkpoint"));
    ck.is_dir().then_some(ck)
}

/// The newest checkpoint loads: its model, and its trainer state as JSON.
fn assert_loads(ck: &Path, what: &str) {
    palm::load::load_model(ck, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{what}: {} does not load: {e}", ck.display()));
    let st = std::fs::read_to_string(ck.join("trainer.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&st)
        .unwrap_or_else(|e| panic!("{what}: {}/trainer.json: {e}", ck.display()));
}

/// What a kill interrupted: `Some(true)` a periodic checkpoint's write (its temporary directory
/// is there, or the checkpoint is only at `.old`), `Some(false)` the final model's, `None`
/// no directory write.
fn interrupted_write(run: &Path, pid: u32) -> Option<bool> {
    let tmp = format!(".tmp-{pid}");
    let mut found = None;
    for e in std::fs::read_dir(run).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() && name.ends_with(&tmp) {
            found = Some(found.unwrap_or(false) | name.starts_with("checkpoint."));
        }
    }
    if !run.join("checkpoint").exists() && run.join("checkpoint.old").exists() {
        found = Some(true);
    }
    found
}

/// `palm rl`'s timing fields.
const RL_TIMING: &[&str] = &[
    "time/generate_s",
    "time/logprobs_s",
    "time/rollout_s",
    "time/update_s",
    "time/step_s",
];

/// The run ends as the reference did: metrics (timing fields aside), final weights, summary.
fn assert_same_run(s: &Subject, run: &Path, reference: &Path) {
    let (a, b) = (metrics(run, s.timing), metrics(reference, s.timing));
    assert_eq!(a.len(), b.len(), "{}: metrics.jsonl lines", s.name);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        // the log keeps its lines' text on resume (`MetricsLog::open`), so they are equal exactly
        assert!(
            x == y,
            "{}: metrics.jsonl line {}:\n{x}\nthe uninterrupted run's:\n{y}",
            s.name,
            i + 1
        );
    }
    for f in s.weights {
        let bytes = |d: &Path| std::fs::read(d.join(f)).unwrap();
        assert!(
            bytes(run) == bytes(reference),
            "{}: {f} differs from the uninterrupted run's",
            s.name
        );
    }
    if s.summary {
        let (a, b) = (summary(run, s.timing), summary(reference, s.timing));
        assert!(
            same_value(&a, &b),
            "{}: summary.json:\n{a}\nthe uninterrupted run's:\n{b}",
            s.name
        );
    }
}

/// Timings of the uninterrupted run: (ms until its first metrics line, ms per step after it).
struct Pace {
    first_ms: u64,
    step_ms: u64,
}

/// The uninterrupted run, timed.
fn reference_run(s: &Subject, root: &Path, run: &Path) -> Pace {
    let t0 = Instant::now();
    let mut child = s.start(root, run, false);
    let mut first = None;
    loop {
        if first.is_none()
            && std::fs::metadata(run.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0)
        {
            first = Some(t0.elapsed());
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    s.finish(child);
    let total = t0.elapsed();
    let first = first.unwrap_or(total);
    let steps = metrics(run, &[]).len().max(1) as u128;
    Pace {
        first_ms: first.as_millis() as u64,
        step_ms: ((total - first).as_millis() / steps).max(1) as u64,
    }
}

/// The highest step in a run's metrics.jsonl (0 without one; a line cut by a kill is skipped).
fn last_step(run: &Path) -> u64 {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Which file `RUN/metrics.jsonl` is (its inode): every start and resume writes a new one.
fn metrics_file_id(run: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(run.join("metrics.jsonl"))
        .ok()
        .map(|m| m.ino())
}

/// What one command's kill rounds did.
#[derive(Default)]
struct Tally {
    kills: usize,
    /// Kills inside the write of a periodic checkpoint, and of the final model.
    in_checkpoint: usize,
    in_final: usize,
    /// Kills after the last step (final checkpoint, model, summary).
    at_end: usize,
    /// Kills before the first checkpoint (the run started over).
    restarts: usize,
}

/// When a round's kill comes.
enum Moment {
    /// This long after the start.
    After(Duration),
    /// This long after the run logged its last step.
    AfterLastStep(u64, Duration),
}

/// Starts the run (resuming it when it has a checkpoint, else from scratch) and kills it at
/// `moment`, unless it ends first: then returns true. The newest checkpoint must load after
/// every kill.
fn round(s: &Subject, root: &Path, run: &Path, moment: Moment, t: &mut Tally) -> bool {
    let resume = checkpoint(run).is_some();
    if !resume && run.exists() {
        // killed before its first checkpoint: nothing to resume, start over
        std::fs::remove_dir_all(run).unwrap();
        t.restarts += 1;
    }
    let before = metrics_file_id(run);
    let mut child = s.start(root, run, resume);
    let at_end = match moment {
        Moment::After(d) => {
            std::thread::sleep(d);
            false
        }
        Moment::AfterLastStep(total, d) => {
            // this process's metrics.jsonl (a resume writes a new one), at its last step
            let t0 = Instant::now();
            while (metrics_file_id(run) == before || last_step(run) < total)
                && child.try_wait().unwrap().is_none()
            {
                assert!(t0.elapsed() < Duration::from_secs(120), "{}: stuck", s.name);
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(d);
            true
        }
    };
    if child.try_wait().unwrap().is_some() {
        s.finish(child);
        return true;
    }
    let pid = child.id();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    t.kills += 1;
    t.at_end += usize::from(at_end);
    match interrupted_write(run, pid) {
        Some(true) => t.in_checkpoint += 1,
        Some(false) => t.in_final += 1,
        None => {}
    }
    if let Some(ck) = checkpoint(run) {
        assert_loads(&ck, &format!("{} after kill {}", s.name, t.kills));
    }
    false
}

/// kill -9 at seeded random moments, resuming after each (or starting over while there is no
/// checkpoint yet): `rounds()` kills from a little before the first step to a few steps after
/// it, then up to 3 just after the last step (in the final checkpoint, model and summary
/// writes), then one last resume to the end. The run must end as `reference` did.
fn kill_rounds(s: &Subject, root: &Path, reference: &Path, pace: &Pace) {
    let rounds = rounds();
    let run = root.join(format!("killed-{}", s.name.replace(' ', "-")));
    let mut seed: u64 = 0x5eed ^ s.name.len() as u64;
    let mut random = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n.max(1)
    };
    let mut t = Tally::default();
    let mut finished = false;
    let (lo, span) = (
        pace.first_ms * 7 / 10,
        pace.first_ms * 3 / 10 + 4 * pace.step_ms,
    );
    while t.kills < rounds && !finished {
        let wait = Duration::from_millis(lo + random(span));
        finished = round(s, root, &run, Moment::After(wait), &mut t);
    }
    let total = last_step(reference);
    let delay: u64 = WRITE_DELAY_MS.parse().unwrap();
    for _ in 0..3 {
        if finished {
            break;
        }
        // the final checkpoint's write takes `delay`, then the final model's
        let wait = Duration::from_millis(delay / 2 + random(3 * delay));
        finished = round(s, root, &run, Moment::AfterLastStep(total, wait), &mut t);
    }
    if !finished {
        let resume = checkpoint(&run).is_some();
        if !resume && run.exists() {
            std::fs::remove_dir_all(&run).unwrap();
        }
        s.finish(s.start(root, &run, resume));
    }
    eprintln!(
        "palm {}: {} kills survived, {} during a checkpoint write ({} of a periodic checkpoint, \
         {} of the final model); {} after the last step; {} before the first checkpoint \
         (started over)",
        s.name,
        t.kills,
        t.in_checkpoint + t.in_final,
        t.in_checkpoint,
        t.in_final,
        t.at_end,
        t.restarts
    );
    assert!(
        t.kills > 0,
        "{}: no kill landed before the run ended",
        s.name
    );
    if rounds >= 10 {
        assert!(
            t.in_checkpoint + t.in_final > 0,
            "{}: no kill landed inside a write",
            s.name
        );
    }
    assert_eq!(leftovers(&run), Vec::<PathBuf>::new(), "{}", s.name);
    assert_same_run(s, &run, reference);
}

/// SIGTERM (what `timeout`, `docker stop` and Slurm send) once training has started: the run
/// saves a loadable checkpoint, exits 130 without a final model, and `--resume` ends with the
/// uninterrupted run's weights.
fn sigterm_then_resume(s: &Subject, root: &Path, reference: &Path, final_dir: &str) {
    let run = root.join(format!("sigterm-{}", s.name.replace(' ', "-")));
    let mut c = palm();
    let mut child = c
        .current_dir(root)
        .args(&s.fresh)
        .arg("--out")
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !std::fs::metadata(run.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let st = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(st.code(), Some(130), "palm {}: {st}\n{err}", s.name);
    assert!(err.contains("--resume"), "says how to continue: {err}");
    let ck = checkpoint(&run).expect("a checkpoint after SIGTERM");
    assert_loads(&ck, &format!("{} after SIGTERM", s.name));
    let step = |p: &Path| -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p.join("trainer.json")).unwrap())
                .unwrap();
        v["step"].as_u64().unwrap()
    };
    let total = metrics(reference, &[])
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .max()
        .unwrap();
    let stopped = step(&ck);
    assert!(
        stopped >= 1 && stopped < total,
        "stopped at {stopped} of {total}"
    );
    assert!(!run.join(final_dir).exists(), "no final model after a stop");
    assert_eq!(leftovers(&run), Vec::<PathBuf>::new());
    let mut c = palm();
    let out = c
        .current_dir(root)
        .args(&s.resume)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "palm {}: SIGTERM at step {stopped} of {total}, resumed",
        s.name
    );
    assert_same_run(s, &run, reference);
}

/// A new run over a finished one, without `--resume`, is refused and changes nothing.
fn refuses_to_overwrite(s: &Subject, root: &Path, run: &Path) {
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let weights: Vec<Vec<u8>> = s
        .weights
        .iter()
        .map(|f| std::fs::read(run.join(f)).unwrap())
        .collect();
    let out = palm()
        .current_dir(root)
        .args(&s.fresh)
        .arg("--out")
        .arg(run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "palm {}: {err}", s.name);
    assert!(
        err.contains(&run.display().to_string()) && err.contains("--resume"),
        "palm {}: names the run and --resume: {err}",
        s.name
    );
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
    for (f, w) in s.weights.iter().zip(&weights) {
        assert!(&std::fs::read(run.join(f)).unwrap() == w, "{f} changed");
    }
}

/// The whole check of one command: reference, refusal, kill rounds (and SIGTERM).
fn check(s: &Subject, root: &Path, sigterm_final_dir: Option<&str>) {
    let t0 = Instant::now();
    let reference = root.join(format!("reference-{}", s.name.replace(' ', "-")));
    let pace = reference_run(s, root, &reference);
    refuses_to_overwrite(s, root, &reference);
    kill_rounds(s, root, &reference, &pace);
    if let Some(d) = sigterm_final_dir {
        sigterm_then_resume(s, root, &reference, d);
    }
    eprintln!(
        "palm {}: {:.1} s in all (first step after {} ms, then {} ms a step)",
        s.name,
        t0.elapsed().as_secs_f64(),
        pace.first_ms,
        pace.step_ms
    );
}

#[test]
fn reward_train_survives_kill_9_and_sigterm() {
    let d = tempfile::tempdir().unwrap();
    tiny_models(d.path());
    pairs_file(d.path());
    let epochs = steps().div_ceil(3).to_string(); // 3 steps an epoch
    let common = [
        "reward",
        "train",
        "--model",
        "base",
        "--data",
        "pairs.jsonl",
        "--eval",
        "pairs.jsonl",
        "--epochs",
        &epochs,
        "--batch-size",
        "4",
        "--max-len",
        "32",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "2",
        "--save-every",
        "1",
        "--eval-every",
        "4",
    ];
    let s = Subject {
        name: "reward train",
        fresh: args(&common),
        resume: args(&[&common[..], &["--resume"]].concat()),
        weights: &[
            "reward_model/model.safetensors",
            "reward_model/reward_head.safetensors",
        ],
        timing: &["seconds"],
        summary: true,
    };
    check(&s, d.path(), Some("reward_model"));
}

#[test]
fn rl_grpo_survives_kill_9() {
    let d = tempfile::tempdir().unwrap();
    tiny_models(d.path());
    pairs_file(d.path());
    let s = Subject {
        name: "rl grpo",
        fresh: args(&[
            "rl",
            "--algorithm",
            "grpo",
            "--reward",
            "rm",
            "--prompts",
            "prompts.txt",
            "--policy",
            "base",
            "--steps",
            &steps().to_string(),
            "--batch-size",
            "2",
            "--group-size",
            "2",
            "--max-new-tokens",
            "4",
            "--save-every",
            "1",
        ]),
        resume: args(&[
            "rl",
            "--algorithm",
            "grpo",
            "--reward",
            "rm",
            "--prompts",
            "prompts.txt",
            "--resume",
        ]),
        weights: &["policy/model.safetensors"],
        timing: RL_TIMING,
        summary: true,
    };
    check(&s, d.path(), None);
}

#[test]
fn ppo_survives_kill_9_and_sigterm() {
    let d = tempfile::tempdir().unwrap();
    tiny_models(d.path());
    pairs_file(d.path());
    let s = Subject {
        name: "ppo",
        fresh: args(&[
            "ppo",
            "--reward",
            "rm",
            "--prompts",
            "prompts.txt",
            "--policy",
            "base",
            "--steps",
            &steps().to_string(),
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
            "--save-every",
            "1",
        ]),
        resume: args(&[
            "ppo",
            "--reward",
            "rm",
            "--prompts",
            "prompts.txt",
            "--resume",
        ]),
        weights: &["policy/model.safetensors"],
        timing: &[
            "time/rollout_s",
            "time/score_s",
            "time/update_s",
            "time/step_s",
            "speed/rollout_tokens_per_s",
            "speed/update_tokens_per_s",
        ],
        summary: false,
    };
    check(&s, d.path(), Some("policy"));
}

#[test]
fn dpo_survives_kill_9() {
    let d = tempfile::tempdir().unwrap();
    tiny_models(d.path());
    pairs_file(d.path());
    let epochs = steps().div_ceil(3).to_string(); // 3 steps an epoch
    let common = [
        "dpo",
        "--model",
        "base",
        "--data",
        "pairs.jsonl",
        "--eval",
        "pairs.jsonl",
        "--batch-size",
        "4",
        "--epochs",
        &epochs,
        "--lr",
        "1e-2",
        "--save-every",
        "1",
        "--eval-every",
        "4",
    ];
    let s = Subject {
        name: "dpo",
        fresh: args(&common),
        resume: args(&[&common[..], &["--resume"]].concat()),
        weights: &["policy/model.safetensors"],
        timing: &["seconds"],
        summary: true,
    };
    check(&s, d.path(), None);
}

/// A task run (`--task arithmetic:1`) stopped after one step and resumed ends as an
/// uninterrupted run, its summary's held-out accuracy before training included (which the
/// resumed process counts from the samples the run wrote when it started).
#[test]
fn rl_task_run_resumed_ends_as_an_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    // byte-level chat prompts of the default template are ~100 tokens
    let cfg = PalmConfig {
        max_seq_len: 192,
        ..tiny_config()
    };
    Model::Palm(Palm::new(&cfg, 0, &Device::Cpu).unwrap())
        .save(&d.path().join("base"))
        .unwrap();
    let run = |out: &str, extra: &[&str]| {
        let o = palm()
            .current_dir(d.path())
            .args(["rl", "--algorithm", "grpo", "--task", "arithmetic:1"])
            .args(["--heldout", "4", "--train-prompts", "8", "--out", out])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let first = [
        "--policy",
        "base",
        "--group-size",
        "2",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "3",
        "--save-every",
        "1",
    ];
    run("reference", &[&first[..], &["--steps", "2"]].concat());
    run("resumed", &[&first[..], &["--steps", "1"]].concat());
    run("resumed", &["--resume", "--steps", "2"]);
    let s = Subject {
        name: "rl task",
        fresh: vec![],
        resume: vec![],
        weights: &["policy/model.safetensors"],
        timing: RL_TIMING,
        summary: true,
    };
    let sum = summary(&d.path().join("resumed"), &[]);
    assert!(sum["heldout_before"]["accuracy"].is_number(), "{sum}");
    assert_same_run(&s, &d.path().join("resumed"), &d.path().join("reference"));
}
