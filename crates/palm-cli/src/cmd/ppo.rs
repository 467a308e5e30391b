use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use palm::rlhf::kl::KlEstimator;
use palm::rlhf::ppo::{self, ActorMode, CriticInit, PpoConfig, PpoTrainer, Recipe};
use palm::rlhf::scorer::{RewardModelScorer, Scorer, VaderScorer};
use palm::tokenizer::Tokenizer;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecipeArg {
    /// Token-level KL reward, GAE, whitened advantages, scalar critic (InstructGPT/TRL).
    Standard,
    /// The original's: sequence-level normalize(R - V), pooled 6-bin HL-Gauss critic.
    PalmRlhfPytorch,
}

impl From<RecipeArg> for Recipe {
    fn from(r: RecipeArg) -> Self {
        match r {
            RecipeArg::Standard => Recipe::Standard,
            RecipeArg::PalmRlhfPytorch => Recipe::PalmRlhfPytorch,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActorArg {
    /// A LoRA scope `actor`; the reference is the same base with LoRA off (no copy).
    Lora,
    /// Every base weight; the reference is a frozen copy of the starting policy, which also
    /// carries the critic's LoRA scope.
    Full,
}

impl From<ActorArg> for ActorMode {
    fn from(a: ActorArg) -> Self {
        match a {
            ActorArg::Lora => ActorMode::Lora,
            ActorArg::Full => ActorMode::Full,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CriticInitArg {
    /// A fresh critic scope and a zero value head (every value starts at 0).
    Zeros,
    /// A copy of the --reward model (its LoRA scope, scalar head and segment embeddings): needs
    /// a `palm reward train` LoRA model with last-token pooling on the policy's base weights,
    /// and the standard recipe.
    Reward,
}

impl From<CriticInitArg> for CriticInit {
    fn from(a: CriticInitArg) -> Self {
        match a {
            CriticInitArg::Zeros => CriticInit::Zeros,
            CriticInitArg::Reward => CriticInit::Reward,
        }
    }
}

/// PPO against a reward model: the policy trains a LoRA scope `actor` (or, with --actor full,
/// every base weight against a frozen copy), the critic a scope `critic` plus a value head; the
/// reference is the same base with LoRA off (or the frozen copy).
///
/// Writes RUN_DIR/metrics.jsonl, reward.svg, kl.svg, gold_vs_reward.svg, checkpoint/ (the whole
/// PPO state, for --resume) and policy/ (the actor merged into a plain model).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The policy to start from (checkpoint directory), usually an SFT model.
    #[arg(long, required_unless_present = "resume")]
    pub policy: Option<PathBuf>,
    /// The reward: a `palm reward train` output (run dir or model dir; `palm quickstart` writes
    /// one in DIR/reward), or `vader` / `vader:DIR` (the VADER sentiment compound of the decoded
    /// response; bare `vader` looks in PALM_VADER_DIR, then judges/vader beside the binary, then
    /// the shared data's judges/vader).
    #[arg(long)]
    pub reward: String,
    /// Prompts: records with a "prompt" field (.jsonl, .jsonl.gz, .parquet or a directory of
    /// shards), or plain text with one prompt per line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Run directory (metrics, plots, checkpoint, final policy).
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run saved in OUT/checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// A PpoConfig JSON file; flags below override its fields.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub recipe: Option<RecipeArg>,
    /// What the policy trains: `lora` (default) or `full` (every base weight; the reference is a
    /// frozen copy of the starting policy).
    #[arg(long, value_enum)]
    pub actor: Option<ActorArg>,
    /// How the critic starts: `zeros` (default) or `reward` (a copy of the --reward model).
    #[arg(long, value_enum)]
    pub critic_init: Option<CriticInitArg>,
    /// `bytes`, a tokenizer.json or a llama2.c .bin (default: the policy's own, as in
    /// `palm generate`; bytes when none is found or on --resume without --policy).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// PPO iterations (each: a batch of rollouts, then the updates) [default: 100; with
    /// --resume, the run's own: more extends it].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Rollouts (prompt + sampled response) per iteration [default: 64].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Rollouts per gradient update [default: 16].
    #[arg(long)]
    pub minibatch_size: Option<usize>,
    /// Passes over each iteration's rollouts [default: 4].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Most tokens of a sampled response [default: 16].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Rollout temperature (pure temperature sampling; also used for the log-probs).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Learning rate of the policy (LoRA or full) [default: 1e-3].
    #[arg(long)]
    pub actor_lr: Option<f64>,
    /// Learning rate of the critic (its LoRA scope and value head) [default: 1e-3].
    #[arg(long)]
    pub critic_lr: Option<f64>,
    /// KL coefficient beta (initial value when --kl-target is given).
    #[arg(long)]
    pub kl_coef: Option<f64>,
    /// Target KL per response for the adaptive controller.
    #[arg(long)]
    pub kl_target: Option<f64>,
    /// KL estimator: k1 (log-ratio), k2 (squared log-ratio / 2) or k3 (ratio - 1 - log-ratio)
    /// [default: k1].
    #[arg(long)]
    pub kl_estimator: Option<String>,
    /// Fixes LoRA init, prompt order and sampling [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N iterations (0: only at the end) [default: 0].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Before and after training, sample N responses per prompt (seed 0, the run's temperature and
    /// max_new_tokens) with the starting policy and with RUN/policy, score them with the reward,
    /// and report the means (`score_before`, `score_after` on stdout; samples in
    /// RUN/eval_{before,after}.jsonl).
    #[arg(long, default_value_t = 0)]
    pub eval_samples: usize,
}

/// Samples `n` responses per prompt with `model` (fixed seed 0) and scores them: the mean
/// score, and (prompt, response, score) records.
fn evaluate(
    model: &palm::Model,
    prompts: &[Vec<u32>],
    n: usize,
    cfg: &PpoConfig,
    eos: Option<u32>,
    tok: &Tokenizer,
    scorer: &dyn Scorer,
) -> Result<(f64, Vec<serde_json::Value>)> {
    let rep: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), n))
        .collect();
    let req = palm::sample::GenerateRequest {
        prompts: rep.clone(),
        max_new_tokens: cfg.max_new_tokens,
        eos: eos.into_iter().collect(),
        sampling: palm::sample::Sampling {
            temperature: cfg.temperature,
            ..Default::default()
        },
        seed: 0,
        scope: None,
        disable_lora: false,
    };
    let g = palm::sample::generate(model, &req, |_, _| {})?;
    let scores = scorer.score(&rep, &g.completions)?;
    let mean = scores.iter().map(|&x| x as f64).sum::<f64>() / scores.len().max(1) as f64;
    let recs = rep
        .iter()
        .zip(&g.completions)
        .zip(&scores)
        .map(|((p, r), s)| {
            Ok(serde_json::json!({
                "prompt": tok.decode(p)?, "response": tok.decode(r)?, "score": s
            }))
        })
        .collect::<Result<_>>()?;
    Ok((mean, recs))
}

pub(crate) fn write_jsonl(path: &Path, recs: &[serde_json::Value]) -> Result<()> {
    let body: String = recs.iter().map(|r| format!("{r}\n")).collect();
    palm::checkpoint::write_atomic(path, body.as_bytes())?;
    Ok(())
}

fn apply_flags(cfg: &mut PpoConfig, a: &Args) -> Result<()> {
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { cfg.$f = v; } )* };
    }
    set!(
        steps,
        batch_size,
        minibatch_size,
        epochs,
        max_new_tokens,
        temperature,
        actor_lr,
        critic_lr,
        kl_coef,
        seed,
        save_every
    );
    if a.kl_target.is_some() {
        cfg.kl_target = a.kl_target;
    }
    if let Some(x) = a.actor {
        cfg.actor = x.into();
    }
    if let Some(x) = a.critic_init {
        cfg.critic_init = x.into();
    }
    if let Some(k) = &a.kl_estimator {
        cfg.kl_estimator = k.parse::<KlEstimator>()?;
    }
    Ok(())
}

/// Where bare `--reward vader` finds its lexicon, first found: `PALM_VADER_DIR`, `judges/vader`
/// beside the executable (or in `../share/palm/` from it, for an installed binary), then the
/// shared data folder (`PALM_SHARED_DIR`, or `../shared` of the checkout it was built in).
fn default_vader_dir() -> Result<PathBuf> {
    let mut tried: Vec<PathBuf> = vec![];
    if let Some(d) = std::env::var_os("PALM_VADER_DIR") {
        tried.push(PathBuf::from(d));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        tried.push(exe_dir.join("judges/vader"));
        tried.push(exe_dir.join("../share/palm/judges/vader"));
    }
    tried.push(palm::fixtures::data_path("judges/vader"));
    if let Some(d) = tried.iter().find(|d| d.join("vader_lexicon.txt").is_file()) {
        return Ok(d.clone());
    }
    let list: Vec<String> = tried.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "--reward vader: no VADER lexicon (vader_lexicon.txt) in {}; give its folder with \
         --reward vader:DIR or PALM_VADER_DIR",
        list.join(", ")
    )
}

/// What `--reward` names, loaded: the scorer and the vocabulary it expects (None: text-based).
pub(crate) fn load_reward(
    arg: &str,
    tok: &Tokenizer,
) -> Result<(Box<dyn Scorer + Send>, Option<usize>)> {
    if arg == "vader" || arg.starts_with("vader:") {
        let dir = match arg.strip_prefix("vader:") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => default_vader_dir()?,
        };
        let vader = palm::judges::Vader::from_dir(&dir)
            .with_context(|| format!("loading the VADER lexicon from {}", dir.display()))?;
        let s = VaderScorer {
            vader,
            tokenizer: tok.clone(),
        };
        return Ok((Box::new(s), None));
    }
    let path = PathBuf::from(arg);
    if !path.exists() {
        bail!(
            "--reward {arg}: no such file or directory (expected a `palm reward train` run or model \
             directory, a `palm quickstart` reward model, or `vader` / `vader:DIR`)"
        );
    }
    let final_dir = path.join(palm::rlhf::reward_train::FINAL_DIR);
    if path.join("reward.json").exists() || final_dir.join("reward.json").exists() {
        let model = super::reward::load_reward_model(&path)?;
        let vocab = model.trunk.vocab_size();
        let s = RewardModelScorer {
            model,
            eos: tok.eos_id(),
            batch_size: 32,
        };
        return Ok((Box::new(s), Some(vocab)));
    }
    bail!(
        "--reward {}: not a `palm reward train` output (no reward.json in it or in its {}/)",
        path.display(),
        palm::rlhf::reward_train::FINAL_DIR
    )
}

/// Every prompt and its `max_new_tokens` must fit the policy's context: checked before anything
/// is written (a too-long prompt used to fail mid-run and leave `metrics.jsonl` behind).
fn check_prompt_lengths(
    file: &Path,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    ctx: usize,
) -> Result<()> {
    if let Some((i, p)) = prompts
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() + max_new_tokens > ctx)
    {
        bail!(
            "{}: prompt {} has {} tokens; with --max-new-tokens {max_new_tokens} that exceeds the \
             policy's context of {ctx} (shorten it, or lower --max-new-tokens)",
            file.display(),
            i + 1,
            p.len()
        );
    }
    Ok(())
}

/// The trainer of `--resume`: the saved config is the run's; only its length may change.
fn resume_trainer(a: &Args, prompts: &[Vec<u32>], dev: &candle_core::Device) -> Result<PpoTrainer> {
    // the saved config is the run's; only its length may change
    if a.config.is_some()
        || a.recipe.is_some()
        || a.batch_size.is_some()
        || a.actor_lr.is_some()
        || a.kl_coef.is_some()
        || a.seed.is_some()
        || a.actor.is_some()
        || a.critic_init.is_some()
    {
        bail!("--resume continues the saved run exactly: only --steps may change");
    }
    let t = PpoTrainer::resume(&a.out.join("checkpoint"), dev, a.steps)
        .with_context(|| format!("resuming from {}", a.out.join("checkpoint").display()))?;
    check_prompt_lengths(
        &a.prompts,
        prompts,
        t.cfg.max_new_tokens,
        t.model.max_seq_len(),
    )?;
    Ok(t)
}

/// A new run never overwrites another: its checkpoint, policy or metrics.
fn refuse_existing_run(out: &Path) -> Result<()> {
    if let Some(f) = ["checkpoint", "policy", "metrics.jsonl"]
        .iter()
        .map(|f| out.join(f))
        .find(|p| p.exists())
    {
        if !palm::checkpoint::resolve_dir(&out.join("checkpoint")).exists() {
            bail!(
                "{} already holds a PPO run that stopped before its first checkpoint ({} \
                 exists, no checkpoint/ to resume from): delete it, or choose another --out",
                out.display(),
                f.display()
            );
        }
        bail!(
            "{} already holds a PPO run ({} exists): pass --resume to continue it, or choose another --out",
            out.display(),
            f.display()
        );
    }
    Ok(())
}

/// The reward model the critic starts from (`--critic-init reward`), or none (`zeros`).
fn critic_source(
    init: CriticInit,
    reward: &str,
) -> Result<Option<palm::rlhf::reward::RewardModel>> {
    Ok(match init {
        CriticInit::Zeros => None,
        CriticInit::Reward => {
            let path = PathBuf::from(reward);
            let is_rm = path.join("reward.json").exists()
                || path
                    .join(palm::rlhf::reward_train::FINAL_DIR)
                    .join("reward.json")
                    .exists();
            if !is_rm {
                bail!(
                    "--critic-init reward needs --reward to be a `palm reward train` model \
                     (run or model directory with reward.json); got `{reward}`"
                );
            }
            Some(super::reward::load_reward_model(&path)?)
        }
    })
}

pub fn run(a: Args) -> Result<()> {
    let dev = super::device();
    let tok = match (&a.policy, &a.tokenizer) {
        (Some(p), t) => super::resolve_tokenizer(t.as_deref(), p)?,
        (None, Some(t)) => Tokenizer::from_arg(t)?,
        (None, None) => Tokenizer::Bytes,
    };
    // validate every input before writing anything
    let texts = palm::rlhf::prompts::read_prompts(&a.prompts)?;
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let ids = tok.encode_prompt(t)?;
            if ids.is_empty() {
                bail!("{}: prompt {} is empty", a.prompts.display(), i + 1);
            }
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    let (scorer, rm_vocab) = load_reward(&a.reward, &tok)?;
    let mut score_before = None;
    let mut trainer = if a.resume {
        resume_trainer(&a, &prompts, &dev)?
    } else {
        refuse_existing_run(&a.out)?;
        let mut cfg = match &a.config {
            Some(p) => palm::checkpoint::read_json::<PpoConfig>(p)?,
            None => PpoConfig::for_recipe(a.recipe.map(Into::into).unwrap_or_default()),
        };
        if let Some(r) = a.recipe {
            cfg.recipe = r.into();
        }
        apply_flags(&mut cfg, &a)?;
        cfg.validate()?;
        let policy = a.policy.as_ref().context("--policy is required")?;
        let model = palm::load::load_model(policy, &dev)
            .with_context(|| format!("loading policy {}", policy.display()))?;
        check_prompt_lengths(
            &a.prompts,
            &prompts,
            cfg.max_new_tokens,
            model.max_seq_len(),
        )?;
        if let Some(v) = rm_vocab.filter(|&v| v != model.vocab_size()) {
            bail!(
                "the policy's vocabulary ({}) differs from the reward model's ({v})",
                model.vocab_size(),
            );
        }
        // data-parallel: rank 0 evaluates, shows progress and prints the result
        if a.eval_samples > 0 && palm::dist::is_main() {
            let (m, recs) = evaluate(
                &model,
                &prompts,
                a.eval_samples,
                &cfg,
                tok.eos_id(),
                &tok,
                scorer.as_ref(),
            )?;
            std::fs::create_dir_all(&a.out)
                .with_context(|| format!("creating {}", a.out.display()))?;
            write_jsonl(&a.out.join("eval_before.jsonl"), &recs)?;
            score_before = Some(m);
            tracing::info!("eval before: mean score {m:.4} over {} samples", recs.len());
        }
        let rm = critic_source(cfg.critic_init, &a.reward)?;
        PpoTrainer::with_reward_model(model, cfg, rm.as_ref())?
    };
    let total = trainer.cfg.steps as u64;
    let piped = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let main = palm::dist::is_main();
    let bar = if main {
        ProgressBar::new(total).with_position(trainer.step as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(
        "ppo {bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]",
    )?);
    // Ctrl-C, SIGTERM or SIGHUP: a checkpoint after the current step, then exit 130
    let stop = palm::train::run::stop_flag();
    ppo::run_until_stopped(
        &mut trainer,
        &prompts,
        tok.eos_id(),
        scorer.as_ref(),
        None,
        &a.out,
        stop,
        |m| {
            let msg = format!(
                "score {:.3} kl {:.3}",
                m["objective/scores"].as_f64().unwrap_or(f64::NAN),
                m["objective/kl"].as_f64().unwrap_or(f64::NAN)
            );
            bar.inc(1);
            if piped && main {
                // no bar where stderr is a file or a pipe: a log line per step instead
                tracing::info!("ppo step {}/{total}: {msg}", bar.position());
            }
            bar.set_message(msg);
        },
    )?;
    bar.finish();
    if trainer.step < trainer.cfg.steps {
        tracing::info!(
            "stopped at step {} of {total}; continue with: palm ppo --resume --out {} --reward {} \
             --prompts {}",
            trainer.step,
            a.out.display(),
            a.reward,
            a.prompts.display()
        );
        // as Unix programs do after an interrupt: no policy/ was written
        std::process::exit(130);
    }
    if !main {
        return Ok(());
    }
    let mut score_after = None;
    if a.eval_samples > 0 {
        let policy = palm::load::load_model(&a.out.join("policy"), &dev)?;
        let (m, recs) = evaluate(
            &policy,
            &prompts,
            a.eval_samples,
            &trainer.cfg,
            tok.eos_id(),
            &tok,
            scorer.as_ref(),
        )?;
        write_jsonl(&a.out.join("eval_after.jsonl"), &recs)?;
        score_after = Some(m);
        tracing::info!("eval after: mean score {m:.4} over {} samples", recs.len());
    }
    println!(
        "{}",
        serde_json::json!({"out": a.out, "steps": trainer.step, "policy": a.out.join("policy"),
            "score_before": score_before, "score_after": score_after})
    );
    Ok(())
}
