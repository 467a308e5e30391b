//! `palm rl`: the online RL family on one interface (PPO goes to `palm ppo`'s trainer).

use palm::dist;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use palm::chat::Message;
use palm::pretrained::TextSide;
use palm::rlhf::kl::KlEstimator;
use palm::rlhf::online::{self, Algorithm, KlPlacement, RlConfig, RlTrainer};
use palm::rlhf::policy_loss::LossAgg;
use palm::rlhf::scorer::Scorer;
use palm::tasks::arithmetic::{self, ArithmeticScorer, ArithmeticTask};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlgorithmArg {
    Ppo,
    Grpo,
    DrGrpo,
    Dapo,
    Rloo,
    #[value(name = "reinforce++")]
    ReinforcePp,
    #[value(name = "reinforce++-baseline")]
    ReinforcePpBaseline,
    MaxRl,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnlineRecipeArg {
    /// Each algorithm's usual settings (TRL / veRL / OpenRLHF).
    Standard,
    /// The original palm-rlhf-pytorch 0.8.0 GRPO settings, without its bugs (README).
    PalmRlhfPytorch,
}

impl AlgorithmArg {
    fn online(self) -> Option<Algorithm> {
        Some(match self {
            AlgorithmArg::Ppo => return None,
            AlgorithmArg::Grpo => Algorithm::Grpo,
            AlgorithmArg::DrGrpo => Algorithm::DrGrpo,
            AlgorithmArg::Dapo => Algorithm::Dapo,
            AlgorithmArg::Rloo => Algorithm::Rloo,
            AlgorithmArg::ReinforcePp => Algorithm::ReinforcePp,
            AlgorithmArg::ReinforcePpBaseline => Algorithm::ReinforcePpBaseline,
            AlgorithmArg::MaxRl => Algorithm::MaxRl,
        })
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlInArg {
    Reward,
    Loss,
}

/// Online RL from a policy model: PPO, GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++ or
/// REINFORCE++-baseline, against a reward model, a judge (`vader`) or a verifiable task
/// (`--task arithmetic:LEVEL`). Every algorithm starts from its usual settings (TRL / veRL /
/// OpenRLHF); each flag below overrides one.
///
/// Writes OUT/metrics.jsonl (TRL's metric names), reward.svg, kl.svg, length.svg,
/// OUT/checkpoint (resumable) and OUT/policy (the LoRA merged).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, value_enum, default_value = "grpo")]
    pub algorithm: AlgorithmArg,
    /// Starting settings: `standard`, or the original's GRPO (`palm-rlhf-pytorch`: groups of
    /// 11, KL weight 0.1 to the frozen reference, entropy bonus 0.01, lr 1e-4).
    #[arg(long, value_enum, default_value = "standard")]
    pub recipe: OnlineRecipeArg,
    /// The starting policy (our checkpoint, HF directory or GGUF). With --resume the weights
    /// come from OUT/checkpoint; give --policy again to read its tokenizer and chat template.
    #[arg(long, required_unless_present = "resume")]
    pub policy: Option<PathBuf>,
    /// A `palm reward train` model, or `vader` / `vader:DIR`.
    #[arg(long, required_unless_present = "task", conflicts_with = "task")]
    pub reward: Option<String>,
    /// A verifiable task instead of a reward: `arithmetic[:LEVEL]` (levels 1-5). Prompts are
    /// generated (train and held-out sets from different seeds) and rendered with the model's
    /// chat template; the reward is 1 for a correct <answer>, else 0.
    #[arg(long)]
    pub task: Option<String>,
    /// Prompts (JSONL or text) when a reward model or judge scores.
    #[arg(long, required_unless_present = "task")]
    pub prompts: Option<PathBuf>,
    /// Run directory (metrics, plots, checkpoint, policy/).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue OUT/checkpoint exactly (only --steps may change).
    #[arg(long)]
    pub resume: bool,
    /// `bytes`, a tokenizer.json or a llama2.c .bin (default: the policy's own).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Responses per prompt (G); at least 2 for group estimators.
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Iterations [default: 100; with --resume, the run's own: more extends it].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Prompts per step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Passes over each rollout.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Responses per optimiser step (0: the whole rollout).
    #[arg(long)]
    pub minibatch_size: Option<usize>,
    /// Responses per forward within an optimiser step (gradient accumulation; 0: all).
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    /// Most tokens of a sampled completion [default: 16].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; the training forward divides the logits by it too [default: 1.0].
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Learning rate of the policy [default: 1e-3].
    #[arg(long)]
    pub lr: Option<f64>,
    /// KL coefficient beta (0 turns the KL term off) [default: the algorithm's].
    #[arg(long)]
    pub kl_coef: Option<f64>,
    /// k1, k2 or k3.
    #[arg(long)]
    pub kl_estimator: Option<String>,
    #[arg(long, value_enum)]
    pub kl_in: Option<KlInArg>,
    /// token-mean, seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm.
    #[arg(long)]
    pub loss_agg: Option<String>,
    /// Lower clip range of the ratio (1 - eps_low) [default: 0.2].
    #[arg(long)]
    pub clip_low: Option<f32>,
    /// Upper clip range of the ratio (1 + eps_high; DAPO raises it) [default: 0.2, DAPO 0.28].
    #[arg(long)]
    pub clip_high: Option<f32>,
    /// DAPO's dynamic sampling: drop groups whose rewards are all equal.
    #[arg(long)]
    pub dynamic_sampling: Option<bool>,
    /// Responses without an end id get no loss.
    #[arg(long)]
    pub overlong_filter: Option<bool>,
    /// SPO's penalty instead of the clip (eps = --clip-low).
    #[arg(long)]
    pub spo: Option<bool>,
    /// Entropy bonus coefficient.
    #[arg(long)]
    pub ent_coef: Option<f32>,
    /// Entropy-shaped advantages: A_t += min(0.4 H_t, |A_t| / 2).
    #[arg(long)]
    pub entropy_advantage: Option<bool>,
    /// LoRA rank of the policy scope [default: 8].
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// Fixes LoRA init, prompt order and sampling [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N iterations (0: only at the end) [default: 0].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Run pi_old's log-prob forward in the rollout even when the update is one on-policy
    /// optimiser step (one epoch, one minibatch, KL in the loss), where by default the update's
    /// own forward supplies it (as TRL with num_iterations 1); logs `ratio/first_step_max_dev`.
    #[arg(long)]
    pub rollout_old_logprobs: Option<bool>,
    /// Held-out task prompts scored greedily before and after (with --task).
    #[arg(long, default_value_t = 100)]
    pub heldout: usize,
    /// Training task prompts (with --task).
    #[arg(long, default_value_t = 512)]
    pub train_prompts: usize,
    /// With --task: do not open the assistant's reply with `<answer>` (by default the prompt
    /// ends with it, and the verifier reads `<answer>` + the response).
    #[arg(long)]
    pub no_prefill: bool,
    /// With --task: two worked examples (question, `<answer>N</answer>`) as earlier chat turns.
    #[arg(long)]
    pub few_shot: bool,
    /// With --task: only print the starting policy's held-out accuracy (a base rate) and exit.
    #[arg(long, requires = "task")]
    pub eval_only: bool,
}

fn config(a: &Args, alg: Algorithm) -> Result<RlConfig> {
    let mut c = match a.recipe {
        OnlineRecipeArg::Standard => RlConfig::for_algorithm(alg),
        OnlineRecipeArg::PalmRlhfPytorch => RlConfig::palm_rlhf_pytorch(alg),
    };
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { c.$f = v; } )* };
    }
    set!(
        group_size,
        steps,
        batch_size,
        epochs,
        minibatch_size,
        micro_batch_size,
        max_new_tokens,
        temperature,
        lr,
        kl_coef,
        clip_low,
        clip_high,
        dynamic_sampling,
        overlong_filter,
        spo,
        ent_coef,
        entropy_advantage,
        lora_r,
        seed,
        save_every,
        rollout_old_logprobs
    );
    if let Some(k) = &a.kl_estimator {
        c.kl_estimator = k.parse::<KlEstimator>()?;
    }
    if let Some(k) = a.kl_in {
        c.kl_placement = match k {
            KlInArg::Reward => KlPlacement::Reward,
            KlInArg::Loss => KlPlacement::Loss,
        };
    }
    if let Some(l) = &a.loss_agg {
        c.loss_agg = l.parse::<LossAgg>()?;
    }
    c.validate()?;
    Ok(c)
}

/// The task's prompts as chat ids with their answers: (train, held-out).
type TaskPrompts = (Vec<(Vec<u32>, i64)>, Vec<(Vec<u32>, i64)>);
fn task_prompts(spec: &str, text: &TextSide, a: &Args, seed: u64) -> Result<TaskPrompts> {
    let task = ArithmeticTask::parse(spec)?;
    let (train, held) = task.split(a.train_prompts, a.heldout, seed);
    let prefill = prefill(a);
    let enc = |ps: Vec<arithmetic::Problem>| -> Result<Vec<(Vec<u32>, i64)>> {
        ps.iter()
            .map(|p| {
                let mut msgs = vec![];
                if a.few_shot {
                    for (q, r) in task.examples() {
                        msgs.push(Message::new("user", q));
                        msgs.push(Message::new("assistant", r));
                    }
                }
                msgs.push(Message::new("user", task.user_message(p)));
                let chat = text.render_chat(&msgs)?;
                Ok((
                    text.tokenizer.encode(&format!("{chat}{prefill}"))?,
                    p.answer,
                ))
            })
            .collect()
    };
    Ok((enc(train)?, enc(held)?))
}

/// Greedy accuracy (and the share with an answer tag) of `scope`'s policy on task prompts.
fn task_accuracy(
    model: &palm::Model,
    scope: Option<&str>,
    held: &[(Vec<u32>, i64)],
    text: &TextSide,
    max_new: usize,
    prefill: &str,
) -> Result<(f64, f64, Vec<serde_json::Value>)> {
    // in batches of 16: a prefill's logits are [batch, prompt, vocab]
    let mut completions = vec![];
    for chunk in held.chunks(16) {
        let req = palm::sample::GenerateRequest {
            prompts: chunk.iter().map(|h| h.0.clone()).collect(),
            max_new_tokens: max_new,
            eos: text.end_ids(),
            sampling: palm::sample::Sampling {
                greedy: true,
                ..Default::default()
            },
            seed: 0,
            scope: scope.map(String::from),
            disable_lora: false,
        };
        completions.extend(palm::sample::generate(model, &req, |_, _| {})?.completions);
    }
    let (mut right, mut tagged, mut samples) = (0usize, 0usize, vec![]);
    for ((_, ans), ids) in held.iter().zip(&completions) {
        let t = format!("{prefill}{}", text.tokenizer.decode(ids)?);
        let r = arithmetic::reward(*ans, &t);
        right += usize::from(r == 1.0);
        tagged += usize::from(arithmetic::has_answer_tag(&t));
        samples.push(serde_json::json!({"answer": ans, "completion": t, "reward": r}));
    }
    let n = held.len().max(1) as f64;
    Ok((right as f64 / n, tagged as f64 / n, samples))
}

fn prefill(a: &Args) -> &'static str {
    if a.no_prefill {
        ""
    } else {
        arithmetic::ASSISTANT_PREFILL
    }
}

fn run_ppo(a: Args) -> Result<()> {
    if a.task.is_some() {
        bail!("--algorithm ppo scores with --reward (a reward model or vader); --task is for the critic-free algorithms");
    }
    super::ppo::run(super::ppo::Args {
        policy: a.policy,
        reward: a.reward.context("--reward is required")?,
        prompts: a.prompts.context("--prompts is required")?,
        out: a.out,
        resume: a.resume,
        config: None,
        recipe: None,
        actor: None,
        critic_init: None,
        tokenizer: a.tokenizer,
        steps: a.steps,
        batch_size: a.batch_size,
        minibatch_size: a.minibatch_size,
        epochs: a.epochs,
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        actor_lr: a.lr,
        critic_lr: None,
        kl_coef: a.kl_coef,
        kl_target: None,
        kl_estimator: a.kl_estimator,
        seed: a.seed,
        save_every: a.save_every,
        eval_samples: 0,
    })
}

/// A task run records its prompt flags in OUT/task.json; `--resume` must repeat them, since
/// the prompts are regenerated from them.
fn check_task_args(a: &Args) -> Result<()> {
    let Some(task) = &a.task else { return Ok(()) };
    if a.eval_only {
        return Ok(());
    }
    let now = serde_json::json!({"task": task, "train_prompts": a.train_prompts,
        "heldout": a.heldout, "few_shot": a.few_shot, "no_prefill": a.no_prefill});
    let path = a.out.join("task.json");
    if a.resume {
        if let Ok(then) = palm::checkpoint::read_json::<serde_json::Value>(&path) {
            if then != now {
                bail!(
                    "{}: the run's task flags were {then}; --resume needs the same (got {now})",
                    path.display()
                );
            }
        }
        return Ok(());
    }
    if palm::checkpoint::resolve_dir(&a.out.join("checkpoint")).exists() || !dist::is_main() {
        return Ok(()); // refused below: the run is not overwritten; rank 0 writes
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    Ok(palm::checkpoint::write_json_atomic(&path, &now)?)
}

/// Greedy held-out accuracy and answer-tag share of the policy before training (`scope` None,
/// samples to heldout_before.jsonl) or after (the actor, heldout_after.jsonl); with `counted`,
/// read from the samples that file holds instead.
fn held_out(
    a: &Args,
    model: &palm::Model,
    scope: Option<&str>,
    held: &[(Vec<u32>, i64)],
    text: &TextSide,
    max_new: usize,
    counted: Option<&std::path::Path>,
) -> Result<(f64, f64)> {
    if let Some(file) = counted {
        return heldout_before(file);
    }
    let (acc, fmt, samples) = task_accuracy(model, scope, held, text, max_new, prefill(a))?;
    let when = if scope.is_some() { "after" } else { "before" };
    tracing::info!(
        "held-out {when}: accuracy {acc:.3}, answer tag {fmt:.3} ({} prompts)",
        held.len()
    );
    super::ppo::write_jsonl(&a.out.join(format!("heldout_{when}.jsonl")), &samples)?;
    Ok((acc, fmt))
}

/// A resumed task run's held-out accuracy before training (and its answer-tag share), counted
/// from the samples the run wrote when it started (their completions carry the prefill), as
/// [`task_accuracy`] counts them.
fn heldout_before(path: &std::path::Path) -> Result<(f64, f64)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--resume: reading {}", path.display()))?;
    let (mut n, mut right, mut tagged) = (0usize, 0usize, 0usize);
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON sample", path.display(), i + 1))?;
        let (Some(ans), Some(t)) = (v["answer"].as_i64(), v["completion"].as_str()) else {
            bail!("{}:{}: no answer or completion", path.display(), i + 1);
        };
        n += 1;
        right += usize::from(arithmetic::reward(ans, t) == 1.0);
        tagged += usize::from(arithmetic::has_answer_tag(t));
    }
    let n = n.max(1) as f64;
    Ok((right as f64 / n, tagged as f64 / n))
}

/// `--eval-only`: the starting policy's greedy held-out accuracy, as JSON on stdout.
fn eval_only(
    a: &Args,
    alg: Algorithm,
    model_path: &std::path::Path,
    held: &[(Vec<u32>, i64)],
    text: &TextSide,
) -> Result<()> {
    let max_new = config(a, alg)?.max_new_tokens;
    let model = palm::load::load_model(model_path, &super::device())
        .with_context(|| format!("loading {}", model_path.display()))?;
    let t0 = std::time::Instant::now();
    let (acc, fmt, samples) = task_accuracy(&model, None, held, text, max_new, prefill(a))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    super::ppo::write_jsonl(&a.out.join("heldout_before.jsonl"), &samples)?;
    let r = serde_json::json!({"task": a.task, "prompts": held.len(), "accuracy": acc,
        "format": fmt, "max_new_tokens": max_new, "seconds": t0.elapsed().as_secs_f64()});
    println!("{r}");
    Ok(())
}

/// The training prompts, the scorer, and the held-out task prompts (with their answers) of a
/// `--task` run; or the `--prompts` file scored by `--reward`.
#[allow(clippy::type_complexity)]
fn prompts_and_scorer(
    a: &Args,
    text: &TextSide,
    seed: u64,
) -> Result<(Vec<Vec<u32>>, Box<dyn Scorer>, Option<Vec<(Vec<u32>, i64)>>)> {
    Ok(match (&a.task, &a.reward) {
        (Some(spec), _) => {
            let (train, held) = task_prompts(spec, text, a, seed)?;
            let s = ArithmeticScorer::new(
                text.tokenizer.clone(),
                &[train.clone(), held.clone()].concat(),
            );
            (
                train.into_iter().map(|p| p.0).collect(),
                Box::new(s),
                Some(held),
            )
        }
        (None, Some(r)) => {
            let path = a
                .prompts
                .as_ref()
                .context("--prompts is required with --reward")?;
            let texts = palm::rlhf::prompts::read_prompts(path)?;
            let ids = texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let ids = text.tokenizer.encode_prompt(t)?;
                    if ids.is_empty() {
                        bail!("{}: prompt {} is empty", path.display(), i + 1);
                    }
                    Ok(ids)
                })
                .collect::<Result<_>>()?;
            (ids, super::ppo::load_reward(r, &text.tokenizer)?.0, None)
        }
        (None, None) => bail!("give --reward or --task"),
    })
}

/// The trainer: resumed from `ck` (only --steps may change), or new from the policy at
/// `model_path` (refused where `ck` holds a run already).
fn trainer_for(
    a: &Args,
    alg: Algorithm,
    ck: &std::path::Path,
    model_path: &std::path::Path,
    dev: &candle_core::Device,
) -> Result<RlTrainer> {
    if a.resume {
        if a.batch_size.is_some() || a.lr.is_some() || a.seed.is_some() || a.group_size.is_some() {
            bail!(
                "--resume continues the saved run exactly: only --steps may change (--policy \
                 only names where the tokenizer and chat template come from)"
            );
        }
        return RlTrainer::resume(ck, dev, a.steps)
            .with_context(|| format!("resuming from {}", ck.display()));
    }
    if ck.exists() {
        bail!(
            "{} holds a run already: add --resume to continue it, or choose another --out",
            a.out.display()
        );
    }
    let cfg = config(a, alg)?;
    let model = palm::load::load_model(model_path, dev)
        .with_context(|| format!("loading policy {}", model_path.display()))?;
    Ok(RlTrainer::new(model, cfg)?)
}

pub fn run(a: Args) -> Result<()> {
    let Some(alg) = a.algorithm.online() else {
        return run_ppo(a);
    };
    let dev = super::device();
    // a write killed between its two renames leaves the checkpoint at `checkpoint.old`
    let ck = palm::checkpoint::resolve_dir(&a.out.join("checkpoint"));
    let model_path = match (&a.policy, a.resume) {
        (Some(p), _) => p.clone(),
        (None, true) => ck.clone(),
        (None, false) => bail!("--policy is required"),
    };
    let text = TextSide::load(&model_path, a.tokenizer.as_deref())
        .with_context(|| format!("reading the tokenizer of {}", model_path.display()))?;
    // the task's prompts come from the run's seed and flags: a resumed run must see the same
    let seed = if a.resume {
        RlTrainer::saved_config(&ck)
            .with_context(|| format!("--resume: reading {}", ck.display()))?
            .seed
    } else {
        a.seed.unwrap_or(0)
    };
    check_task_args(&a)?;
    // prompts and scorer, checked before anything is written
    let (prompts, scorer, held) = prompts_and_scorer(&a, &text, seed)?;
    if a.eval_only {
        let held = held.context("--eval-only needs --task")?;
        return eval_only(&a, alg, &model_path, &held, &text);
    }
    let mut trainer = trainer_for(&a, alg, &ck, &model_path, &dev)?;
    if trainer.cfg.algorithm != alg {
        bail!(
            "{} is a {} run; --algorithm {} does not match",
            ck.display(),
            trainer.cfg.algorithm.name(),
            alg.name()
        );
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let max_new = trainer.cfg.max_new_tokens;
    let mut summary = serde_json::json!({"algorithm": alg.name(), "config": trainer.cfg});
    // data-parallel: rank 0 evaluates, shows progress and writes the summary
    let main = dist::is_main();
    if let Some(h) = held.as_ref().filter(|_| main) {
        // a resumed run counts the samples it wrote when it started
        let before = a.resume.then(|| a.out.join("heldout_before.jsonl"));
        let (acc, fmt) = held_out(
            &a,
            &trainer.model,
            None,
            h,
            &text,
            max_new,
            before.as_deref(),
        )?;
        summary["heldout_before"] = serde_json::json!({"accuracy": acc, "format": fmt});
    }
    let stop = palm::train::run::stop_flag();
    let bar = if main {
        ProgressBar::new(trainer.cfg.steps as u64).with_position(trainer.step as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(&format!(
        "{} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed}}<{{eta}}]",
        alg.name()
    ))?);
    let eos = text.end_ids();
    online::run(
        &mut trainer,
        &prompts,
        &eos,
        scorer.as_ref(),
        None,
        &a.out,
        stop,
        |m| {
            bar.set_position(m["step"].as_u64().unwrap_or(0));
            bar.set_message(format!(
                "reward {:.3} kl {:.4} len {:.1}",
                m["reward"].as_f64().unwrap_or(f64::NAN),
                m["kl"].as_f64().unwrap_or(f64::NAN),
                m["completions/mean_length"].as_f64().unwrap_or(f64::NAN)
            ));
        },
    )?;
    bar.finish();
    if trainer.step < trainer.cfg.steps {
        // stopped (Ctrl-C or SIGTERM on this or another rank): checkpointed, not finished
        std::process::exit(130);
    }
    if !main {
        return Ok(());
    }
    if let Some(h) = &held {
        let actor = Some(palm::rlhf::rollout::ACTOR);
        let (acc, fmt) = held_out(&a, &trainer.model, actor, h, &text, max_new, None)?;
        summary["heldout_after"] = serde_json::json!({"accuracy": acc, "format": fmt});
    }
    summary["steps"] = trainer.step.into();
    palm::checkpoint::write_json_atomic(&a.out.join("summary.json"), &summary)?;
    println!("{summary}");
    Ok(())
}
