//! `palm reward train|eval|score`: the reward model on preference pairs or rated responses.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use palm::config::LoraSpec;
use palm::rlhf::preference_data::{
    encode_pairs, encode_ratings, read_files, EncodedPair, PreferenceData, TruncationStats,
};
use palm::rlhf::reward::{HeadKind, Pooling, RewardConfig, RewardModel, REWARD_SCOPE};
use palm::rlhf::reward_train::{
    checkpoint_dir, evaluate, evaluate_ratings, train_examples, Examples, RewardSummary,
    RewardTrainConfig, FINAL_DIR,
};
use palm::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: RewardCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum RewardCommand {
    /// Train a reward model on preference pairs (Bradley-Terry loss) or ratings (MSE, or
    /// cross-entropy over bins with --bins).
    Train(TrainArgs),
    /// Pairwise accuracy on preference pairs, or mse/mae on ratings (one JSON object on stdout).
    Eval(EvalArgs),
    /// The reward of one (prompt, response) (a number on stdout).
    Score(ScoreArgs),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum PoolingArg {
    /// The hidden state at the last real token (the EOS).
    Last,
    /// The mean over real tokens (the original's).
    Mean,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Base model (the trunk): checkpoint directory, or a weights file with config.json beside it.
    #[arg(long)]
    pub model: PathBuf,
    /// Preference files (.jsonl, .jsonl.gz, .parquet or a directory of shards):
    /// {"prompt","chosen","rejected"} or HH {"chosen","rejected"};
    /// or rating files {"prompt","response","score"} (all records of one kind);
    /// or a `palm serve` database (`sqlite://FILE`, `postgres://...`): its rankings as pairs.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Run directory: metrics.jsonl, metrics.svg, checkpoint/, reward_model/, summary.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Held-out preference files, evaluated during and after training.
    #[arg(long, num_args = 1..)]
    pub eval: Vec<PathBuf>,
    /// LoRA rank of the `reward` scope.
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// Fine-tune every trunk parameter instead of a LoRA scope.
    #[arg(long)]
    pub full: bool,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Peak learning rate (warmup, then cosine decay to a tenth of it).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 20)]
    pub warmup_steps: usize,
    /// Pairs per step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per (prompt, response, EOS) sequence; longer ones keep the prompt's end and the
    /// response's start (default: the model's max_seq_len).
    #[arg(long)]
    pub max_len: Option<usize>,
    #[arg(long, value_enum, default_value_t = PoolingArg::Last)]
    pub pooling: PoolingArg,
    /// Bradley-Terry margin: the loss wants r_chosen - r_rejected above it.
    #[arg(long, default_value_t = 0.0)]
    pub margin: f64,
    /// Ratings only: a binned head of K bins evenly valued over [--score-min, --score-max],
    /// trained with cross-entropy against the nearest bin; its reward is the expected bin value.
    /// Without it, ratings train a scalar head with MSE.
    #[arg(long)]
    pub bins: Option<usize>,
    /// Lowest bin value (default: the lowest training score).
    #[arg(long, requires = "bins")]
    pub score_min: Option<f64>,
    /// Highest bin value (default: the highest training score).
    #[arg(long, requires = "bins")]
    pub score_max: Option<f64>,
    /// Do not add the (trainable) prompt/response segment embeddings.
    #[arg(long)]
    pub no_segment_embeds: bool,
    /// Use at most this many training pairs or ratings (after shuffling with the seed).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Evaluate every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Checkpoint every N steps (0: at the end only).
    #[arg(long, default_value_t = 200)]
    pub save_every: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue the run in --out from its last checkpoint, with the same arguments.
    #[arg(long)]
    pub resume: bool,
    /// `bytes` or a tokenizer.json (default: the model's own: GGUF metadata or tokenizer.json,
    /// else bytes).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// `auto`: render every pair through the model's chat template when it has one (an HH
    /// dialogue becomes its conversation, any other prompt a user message; the response the
    /// assistant's reply); `none`: the raw text.
    #[arg(long, value_enum, default_value_t = TemplateArg::Auto)]
    pub chat_template: TemplateArg,
}

/// Whether preference text goes through the model's chat template.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateArg {
    Auto,
    None,
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Reward model directory (or a run directory holding reward_model/).
    #[arg(long)]
    pub model: PathBuf,
    /// Held-out preference pairs or ratings (the same formats as `palm reward train --data`).
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Token budget per sequence (default: the one the model was trained with).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Sequences scored per forward.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// `bytes`, a tokenizer.json or a llama2.c .bin (default: the reward model's own).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// As for `palm reward train` (use the training run's choice).
    #[arg(long, value_enum, default_value_t = TemplateArg::Auto)]
    pub chat_template: TemplateArg,
}

#[derive(clap::Args, Debug)]
pub struct ScoreArgs {
    /// Reward model directory (or a run directory holding reward_model/).
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt (or the user turn, with the chat template).
    #[arg(long)]
    pub prompt: String,
    /// The response to score.
    #[arg(long)]
    pub response: String,
    /// `bytes`, a tokenizer.json or a llama2.c .bin (default: the reward model's own).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// As for `palm reward train` (use the training run's choice).
    #[arg(long, value_enum, default_value_t = TemplateArg::Auto)]
    pub chat_template: TemplateArg,
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        RewardCommand::Train(t) => run_train(t),
        RewardCommand::Eval(e) => run_eval(e),
        RewardCommand::Score(s) => run_score(s),
    }
}

/// A reward model directory, or a run directory's `reward_model/`.
fn reward_dir(path: &Path) -> PathBuf {
    if path.join(FINAL_DIR).join("reward.json").exists() {
        path.join(FINAL_DIR)
    } else {
        path.to_path_buf()
    }
}

/// Loads a reward model directory, or a run directory's `reward_model/`.
pub fn load_reward_model(path: &Path) -> Result<RewardModel> {
    let dir = reward_dir(path);
    RewardModel::load(&dir, &super::device())
        .with_context(|| format!("loading reward model {}", dir.display()))
}

/// The tokenizer of `model` (or `--tokenizer`) and, with `auto`, its chat template.
pub(crate) fn text_of(
    model: &Path,
    tokenizer: Option<&str>,
    t: TemplateArg,
) -> Result<(Tokenizer, Option<palm::chat::ChatTemplate>)> {
    let text = palm::pretrained::TextSide::load(model, tokenizer)?;
    let template = match t {
        TemplateArg::Auto => text.template,
        TemplateArg::None => None,
    };
    if let Some(tm) = &template {
        tracing::info!("pairs rendered with the chat template of {}", tm.origin());
    }
    Ok((text.tokenizer, template))
}

/// Renders every pair through `template` (see `--chat-template`).
pub(crate) fn template_pairs(
    pairs: &mut [palm::rlhf::preference_data::PreferencePair],
    template: Option<&palm::chat::ChatTemplate>,
) -> Result<()> {
    let Some(t) = template else { return Ok(()) };
    for p in pairs {
        let (prompt, chosen) = palm::dialogue::template_pair(t, &p.prompt, &p.chosen)?;
        let (_, rejected) = palm::dialogue::template_pair(t, &p.prompt, &p.rejected)?;
        (p.prompt, p.chosen, p.rejected) = (prompt, chosen, rejected);
    }
    Ok(())
}

pub(crate) fn check_vocab(tok: &Tokenizer, vocab: usize) -> Result<()> {
    if tok.vocab_size() > vocab {
        bail!(
            "the tokenizer has {} ids but the model only {vocab}: use the model's own tokenizer",
            tok.vocab_size()
        );
    }
    Ok(())
}

/// Reads preference or rating files: all records must be of one kind.
pub(crate) fn read_data(files: &[PathBuf]) -> Result<PreferenceData> {
    let data = read_files(files)?;
    if !data.ratings.is_empty()
        && data.pairs.len() + data.skipped_ties + data.skipped_prompt_mismatch > 0
    {
        bail!(
            "{:?} mix {} rating records ({{\"prompt\",\"response\",\"score\"}}) with {} preference pairs: use files of one kind",
            files,
            data.ratings.len(),
            data.pairs.len() + data.skipped_ties + data.skipped_prompt_mismatch
        );
    }
    if data.skipped_ties + data.skipped_prompt_mismatch > 0 {
        tracing::warn!(
            "skipped {} pairs with identical chosen and rejected, {} HH pairs whose dialogues differ before the last turn",
            data.skipped_ties,
            data.skipped_prompt_mismatch
        );
    }
    Ok(data)
}

pub(crate) fn report_truncation(what: &str, st: &TruncationStats) {
    if st.truncated_prompts + st.truncated_responses > 0 {
        tracing::info!(
            "{what}: truncated {} prompts (kept their end) and {} responses (kept their start) of {} sequences",
            st.truncated_prompts,
            st.truncated_responses,
            st.sequences
        );
    }
}

/// The head of `--bins` (binned over the scores' range unless --score-min/--score-max), else
/// scalar.
fn head_kind(a: &TrainArgs, rated: &[palm::rlhf::preference_data::Rating]) -> Result<HeadKind> {
    Ok(match a.bins {
        None => HeadKind::Scalar,
        Some(k) => {
            let lo = a
                .score_min
                .unwrap_or_else(|| rated.iter().map(|r| r.score).fold(f64::INFINITY, f64::min));
            let hi = a.score_max.unwrap_or_else(|| {
                rated
                    .iter()
                    .map(|r| r.score)
                    .fold(f64::NEG_INFINITY, f64::max)
            });
            if k < 2 || hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
                bail!("--bins {k} over [{lo}, {hi}]: needs at least 2 bins and --score-min < --score-max");
            }
            let values = (0..k)
                .map(|i| (lo + (hi - lo) * i as f64 / (k - 1) as f64) as f32)
                .collect();
            HeadKind::Binned { bins: k, values }
        }
    })
}

/// A fresh reward model on `base`: a LoRA scope (or the whole trunk with --full) and `head`.
fn new_reward_model(
    a: &TrainArgs,
    base: palm::Model,
    head: HeadKind,
    max_len: usize,
) -> Result<RewardModel> {
    let cfg = RewardConfig {
        pooling: match a.pooling {
            PoolingArg::Last => Pooling::LastToken,
            PoolingArg::Mean => Pooling::MaskedMean,
        },
        head,
        scope: if a.full {
            None
        } else {
            Some(REWARD_SCOPE.to_string())
        },
        segment_embeds: !a.no_segment_embeds,
        max_len: Some(max_len),
        ..Default::default()
    };
    let lora = (!a.full).then(|| LoraSpec::new(a.lora_r));
    Ok(RewardModel::new(base, cfg, lora, a.seed)?)
}

/// Prints the summary of a finished run, or exits 130 (as Unix programs do after an
/// interrupt: no reward_model/ was written) when Ctrl-C or SIGTERM stopped it.
fn report(out: &Path, summary: &RewardSummary, total: u64, ratings: bool) -> Result<()> {
    let kind = if ratings { "ratings" } else { "pairs" };
    if summary.steps < total {
        tracing::info!(
            "stopped at step {} of {total}; continue with: palm reward train --resume --out {} \
             (and the same other arguments)",
            summary.steps,
            out.display()
        );
        std::process::exit(130);
    }
    let (what, value, n) = if ratings {
        ("mse", summary.eval_mse, summary.eval_ratings.unwrap_or(0))
    } else {
        ("accuracy", summary.eval_accuracy, summary.eval_pairs)
    };
    tracing::info!(
        "done in {:.0}s: eval {what} {} on {n} {kind}; model in {}",
        summary.seconds,
        value
            .map(|x| format!("{x:.4}"))
            .unwrap_or_else(|| "-".into()),
        out.join(FINAL_DIR).display()
    );
    if palm::dist::is_main() {
        // one summary per job, not one per rank
        println!("{}", serde_json::to_string(summary)?);
    }
    Ok(())
}

/// The run directory agrees with --resume, and the sizes are positive.
fn check_train_args(a: &TrainArgs, ck: &std::path::Path) -> Result<()> {
    if a.resume && !ck.exists() {
        bail!(
            "--resume: {} has no checkpoint to resume from",
            ck.display()
        );
    }
    if !a.resume && ck.exists() {
        bail!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            a.out.display()
        );
    }
    if a.batch_size == 0 || a.epochs == 0 || (!a.full && a.lora_r == 0) {
        bail!("--batch-size, --epochs and --lora-r must be at least 1");
    }
    Ok(())
}

fn run_train(mut a: TrainArgs) -> Result<()> {
    // a feedback database (`sqlite://`, `postgres://`) becomes a pairs snapshot in the run
    a.data = super::feedback::materialise(&a.data, super::feedback::Kind::Pairs, &a.out)?;
    // 1. validate everything before writing anything
    // (a write killed between its two renames leaves the checkpoint at `checkpoint.old`)
    let ck = palm::checkpoint::resolve_dir(&checkpoint_dir(&a.out));
    check_train_args(&a, &ck)?;
    let (tok, template) = text_of(&a.model, a.tokenizer.as_deref(), a.chat_template)?;
    let base = palm::load::load_model(&a.model, &super::device())
        .with_context(|| format!("loading base model {}", a.model.display()))?;
    check_vocab(&tok, base.vocab_size())?;
    let max_len = a.max_len.unwrap_or(base.max_seq_len());
    if max_len < 2 || max_len > base.max_seq_len() {
        bail!(
            "--max-len {max_len}: must be between 2 and the model's max_seq_len {}",
            base.max_seq_len()
        );
    }
    let mut train_data = read_data(&a.data)?;
    let mut eval_data = read_data(&a.eval)?;
    template_pairs(&mut train_data.pairs, template.as_ref())?;
    template_pairs(&mut eval_data.pairs, template.as_ref())?;
    let ratings = !train_data.ratings.is_empty();
    let kind = if ratings { "ratings" } else { "pairs" };
    if ratings == eval_data.ratings.is_empty() && !a.eval.is_empty() {
        let (data, eval) = if ratings {
            ("ratings", "preference pairs")
        } else {
            ("preference pairs", "ratings")
        };
        bail!("--data holds {data} but --eval holds {eval}: use the same kind");
    }
    if !ratings && a.bins.is_some() {
        bail!("--bins is for rating data ({{\"prompt\",\"response\",\"score\"}}), not preference pairs");
    }
    let mut pairs = train_data.pairs;
    let mut rated = train_data.ratings;
    if pairs.is_empty() && rated.is_empty() {
        bail!("no preference pairs or ratings in {:?}", a.data);
    }
    if let Some(n) = a.limit {
        palm::rlhf::preference_data::subsample(&mut pairs, n, a.seed);
        palm::rlhf::preference_data::subsample(&mut rated, n, a.seed);
    }
    let head = head_kind(&a, &rated)?;
    let mut st = TruncationStats::default();
    let train_enc = encode_pairs(&pairs, &tok, max_len, &mut st)?;
    let train_rat = encode_ratings(&rated, &tok, max_len, &mut st)?;
    report_truncation("train", &st);
    let mut est = TruncationStats::default();
    let eval_enc = encode_pairs(&eval_data.pairs, &tok, max_len, &mut est)?;
    let eval_rat = encode_ratings(&eval_data.ratings, &tok, max_len, &mut est)?;
    report_truncation("eval", &est);
    let (train_ex, eval_ex) = if ratings {
        (Examples::Ratings(&train_rat), Examples::Ratings(&eval_rat))
    } else {
        (Examples::Pairs(&train_enc), Examples::Pairs(&eval_enc))
    };

    // 2. the model: fresh on the base, or the checkpoint
    let rm = if a.resume {
        RewardModel::load(&ck, &super::device())?
    } else {
        new_reward_model(&a, base, head, max_len)?
    };
    let trainable: usize = rm
        .trainable_params()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    tracing::info!(
        "{} train {kind}, {} eval {kind}; {} trainable parameters of {}",
        train_ex.len(),
        eval_ex.len(),
        trainable,
        rm.trunk.num_parameters()
    );

    // 3. train with a progress bar
    let cfg = RewardTrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        min_lr: a.lr / 10.0,
        warmup_steps: a.warmup_steps,
        margin: a.margin,
        seed: a.seed,
        eval_every: a.eval_every,
        save_every: a.save_every,
        ..Default::default()
    };
    let total = (train_ex.len().div_ceil(a.batch_size) * a.epochs) as u64;
    // one progress bar per job: rank 0's
    let bar = if palm::dist::is_main() {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    )?);
    let mut ema: Option<(f64, f64)> = None;
    // Ctrl-C, SIGTERM or SIGHUP: a checkpoint after the current step, then exit 130
    let stop = palm::train::run::stop_flag();
    let summary = train_examples(
        &rm,
        train_ex,
        eval_ex,
        &cfg,
        &a.out,
        a.resume,
        Some(st),
        stop,
        |i| {
            let (l, acc) = match ema {
                None => (i.loss, i.accuracy),
                Some((l, acc)) => (0.95 * l + 0.05 * i.loss, 0.95 * acc + 0.05 * i.accuracy),
            };
            ema = Some((l, acc));
            bar.set_position(i.step);
            if ratings {
                bar.set_message(format!("loss {l:.4} mse {:.3}", i.margin));
            } else {
                bar.set_message(format!("loss {l:.4} acc {acc:.3}"));
            }
        },
    )?;
    bar.finish_and_clear();
    report(&a.out, &summary, total, ratings)
}

/// Accuracy of "the longer response wins" (in characters; a tie counts half).
fn longer_wins(pairs: &[palm::rlhf::preference_data::PreferencePair]) -> f64 {
    let s: f64 = pairs
        .iter()
        .map(|p| {
            let (c, r) = (p.chosen.chars().count(), p.rejected.chars().count());
            match c.cmp(&r) {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Less => 0.0,
            }
        })
        .sum();
    s / pairs.len().max(1) as f64
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let rm = load_reward_model(&a.model)?;
    let (tok, template) = text_of(
        &reward_dir(&a.model),
        a.tokenizer.as_deref(),
        a.chat_template,
    )?;
    check_vocab(&tok, rm.trunk.vocab_size())?;
    let mut data = read_data(&a.data)?;
    let raw_pairs = data.pairs.clone();
    template_pairs(&mut data.pairs, template.as_ref())?;
    let max_len = a.max_len.unwrap_or(rm.max_len());
    if !data.ratings.is_empty() {
        let mut st = TruncationStats::default();
        let enc = encode_ratings(&data.ratings, &tok, max_len, &mut st)?;
        report_truncation("eval", &st);
        let e = evaluate_ratings(&rm, &enc, a.batch_size)?;
        let out = serde_json::json!({
            "mse": e.mse,
            "mae": e.mae,
            "records": e.records,
            "ordering_accuracy": e.ordering_accuracy,
            "ordered_pairs": e.ordered_pairs,
            "truncation": st,
        });
        println!("{out}");
        return Ok(());
    }
    if data.pairs.is_empty() {
        bail!("no preference pairs or ratings in {:?}", a.data);
    }
    let mut st = TruncationStats::default();
    let enc: Vec<EncodedPair> = encode_pairs(&data.pairs, &tok, max_len, &mut st)?;
    report_truncation("eval", &st);
    let e = evaluate(&rm, &enc, a.batch_size)?;
    let out = serde_json::json!({
        "accuracy": e.accuracy,
        "pairs": e.pairs,
        "mean_margin": e.mean_margin,
        "loss": e.loss,
        "longer_response_accuracy": longer_wins(&raw_pairs),
        "chance": 0.5,
        "skipped_ties": data.skipped_ties,
        "skipped_prompt_mismatch": data.skipped_prompt_mismatch,
        "truncation": st,
    });
    println!("{out}");
    Ok(())
}

fn run_score(a: ScoreArgs) -> Result<()> {
    let rm = load_reward_model(&a.model)?;
    let (tok, template) = text_of(
        &reward_dir(&a.model),
        a.tokenizer.as_deref(),
        a.chat_template,
    )?;
    check_vocab(&tok, rm.trunk.vocab_size())?;
    let (prompt, response) = match &template {
        Some(t) => palm::dialogue::template_pair(t, &a.prompt, &a.response)?,
        None => (a.prompt.clone(), a.response.clone()),
    };
    let p = tok.encode(&prompt)?;
    let r = tok.encode(&response)?;
    if p.is_empty() && r.is_empty() {
        bail!("both --prompt and --response are empty");
    }
    let s = rm.score_responses(&p, &[r], tok.eos_id(), 1)?;
    println!("{}", s[0]);
    Ok(())
}
