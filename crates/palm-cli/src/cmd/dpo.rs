//! `palm dpo`: direct preference optimisation on preference pairs, and `palm dpo eval`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use palm::rlhf::dpo::{self, DpoConfig, DpoLoss, LossConfig};
use palm::rlhf::preference_data::{encode_pairs, EncodedPair, TruncationStats};

use super::reward::{
    check_vocab, read_data, report_truncation, template_pairs, text_of, TemplateArg,
};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossArg {
    Sigmoid,
    Ipo,
    Robust,
    Hinge,
    Simpo,
    Orpo,
}

/// Direct preference optimisation: train a policy on preference pairs (the files `palm reward
/// train` reads, HH dialogues included), with the reference's log-probs computed once and
/// cached in the run. `palm dpo eval` reports implicit-reward accuracy on held-out pairs.
///
/// Writes OUT/metrics.jsonl (rewards/{chosen,rejected,margins,accuracies}, logps/*),
/// metrics.svg, reference_logps*.safetensors, checkpoint/ (resumable), policy/ (merged) and
/// summary.json.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<DpoCommand>,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum DpoCommand {
    /// Implicit-reward accuracy of a DPO run's policy on pairs (JSON on stdout).
    Eval(EvalArgs),
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The starting policy (also the reference).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Preference files (JSONL/Parquet: prompt/chosen/rejected, or HH chosen/rejected dialogues),
    /// or a `palm serve` database (`sqlite://FILE`, `postgres://...`): its rankings as pairs.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Held-out pairs, evaluated before and after.
    #[arg(long, num_args = 1..)]
    pub eval: Vec<PathBuf>,
    /// Run directory (metrics, plots, reference log-probs, checkpoint, policy/).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue OUT/checkpoint exactly.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, value_enum, default_value_t = LossArg::Sigmoid)]
    pub loss: LossArg,
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// sigmoid: cDPO label smoothing; robust: the label-flip rate in [0, 0.5).
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    #[arg(long, default_value_t = 0.5)]
    pub simpo_gamma: f64,
    /// LoRA rank of the `dpo` scope.
    #[arg(long, default_value_t = 8, conflicts_with = "full")]
    pub lora_r: usize,
    /// Train every weight instead of a LoRA scope.
    #[arg(long)]
    pub full: bool,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Pairs per step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Tokens of prompt + response kept (the prompt's end, the response's start).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Use at most this many training pairs (a seeded subsample).
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// `bytes`, a tokenizer.json or a llama2.c .bin (default: the model's own).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// `auto`: render pairs with the model's chat template (when it has one); `none`: raw text.
    #[arg(long, value_enum, default_value_t = TemplateArg::Auto)]
    pub chat_template: TemplateArg,
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A `palm dpo` run directory.
    #[arg(long)]
    pub run: PathBuf,
    /// Held-out preference files (the same formats as `palm dpo --data`).
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// Token budget per pair (default and most: the model's context).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Evaluate at most this many pairs.
    #[arg(long)]
    pub limit: Option<usize>,
    /// `bytes`, a tokenizer.json or a llama2.c .bin (default: the model's own).
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[arg(long, value_enum, default_value_t = TemplateArg::Auto)]
    pub chat_template: TemplateArg,
}

pub fn run(a: Args) -> Result<()> {
    match a.command {
        Some(DpoCommand::Eval(e)) => run_eval(e),
        None => run_train(a.train),
    }
}

/// Reads, renders (chat template), tokenizes and truncates preference pairs.
fn load_pairs(
    files: &[PathBuf],
    model: &Path,
    tokenizer: Option<&str>,
    t: TemplateArg,
    max_len: usize,
    limit: Option<usize>,
    seed: u64,
) -> Result<(Vec<EncodedPair>, TruncationStats)> {
    if files.is_empty() {
        return Ok((vec![], TruncationStats::default()));
    }
    let (tok, template) = text_of(model, tokenizer, t)?;
    let mut data = read_data(files)?;
    if !data.ratings.is_empty() {
        bail!("{files:?}: DPO needs preference pairs, not ratings");
    }
    if let Some(n) = limit {
        palm::rlhf::preference_data::subsample(&mut data.pairs, n, seed);
    }
    template_pairs(&mut data.pairs, template.as_ref())?;
    let mut st = TruncationStats::default();
    let enc = encode_pairs(&data.pairs, &tok, max_len, &mut st)?;
    Ok((enc, st))
}

fn run_train(mut a: TrainArgs) -> Result<()> {
    // a feedback database (`sqlite://`, `postgres://`) becomes a pairs snapshot in the run
    if let Some(out) = &a.out {
        a.data = super::feedback::materialise(&a.data, super::feedback::Kind::Pairs, out)?;
    }
    let (Some(model_path), Some(out)) = (&a.model, &a.out) else {
        bail!("palm dpo needs --model and --out (and --data); see palm dpo --help");
    };
    if a.data.is_empty() {
        bail!("--data: give at least one preference file");
    }
    // (a write killed between its two renames leaves the checkpoint at `checkpoint.old`)
    let ck = palm::checkpoint::resolve_dir(&dpo::checkpoint_dir(out));
    if a.resume && !ck.exists() {
        bail!(
            "--resume: {} has no checkpoint to resume from",
            ck.display()
        );
    }
    if !a.resume && ck.exists() {
        bail!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    let loss = match a.loss {
        LossArg::Sigmoid => DpoLoss::Sigmoid,
        LossArg::Ipo => DpoLoss::Ipo,
        LossArg::Robust => DpoLoss::Robust,
        LossArg::Hinge => DpoLoss::Hinge,
        LossArg::Simpo => DpoLoss::Simpo,
        LossArg::Orpo => DpoLoss::Orpo,
    };
    let cfg = DpoConfig {
        loss: LossConfig {
            loss,
            beta: a.beta,
            label_smoothing: a.label_smoothing,
            simpo_gamma: a.simpo_gamma,
        },
        lora_r: (!a.full).then_some(a.lora_r),
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        min_lr: a.lr * 0.1,
        seed: a.seed,
        eval_every: a.eval_every,
        save_every: a.save_every,
        ..DpoConfig::default()
    };
    let dev = super::device();
    let mut model = if a.resume {
        palm::load::load_model(&ck, &dev).with_context(|| format!("loading {}", ck.display()))?
    } else {
        palm::load::load_model(model_path, &dev)
            .with_context(|| format!("loading {}", model_path.display()))?
    };
    let max_len = a
        .max_len
        .unwrap_or(model.max_seq_len())
        .min(model.max_seq_len());
    let text = |files: &[PathBuf], limit| {
        load_pairs(
            files,
            model_path,
            a.tokenizer.as_deref(),
            a.chat_template,
            max_len,
            limit,
            a.seed,
        )
    };
    let (train, st) = text(&a.data, a.limit)?;
    let (eval, est) = text(&a.eval, None)?;
    let (tok, _) = text_of(model_path, a.tokenizer.as_deref(), TemplateArg::None)?;
    check_vocab(&tok, model.vocab_size())?;
    report_truncation("training pairs", &st);
    report_truncation("held-out pairs", &est);
    if train.is_empty() {
        bail!("no preference pairs in {:?}", a.data);
    }
    let total = (train.len().div_ceil(a.batch_size.max(1)) * a.epochs) as u64;
    // one progress bar and one summary per job: rank 0's
    let main = palm::dist::is_main();
    let bar = palm::train::run::progress_bar(total, 0, !main);
    let stop = palm::train::run::stop_flag();
    let s = dpo::train(&mut model, &train, &eval, &cfg, out, a.resume, stop, |i| {
        bar.set_position(i.step);
        bar.set_message(format!("loss {:.4} acc {:.2}", i.loss, i.accuracy));
    })?;
    bar.finish();
    if s.steps < total {
        std::process::exit(130);
    }
    if main {
        println!("{}", serde_json::to_string(&s)?);
    }
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let ck = palm::checkpoint::resolve_dir(&dpo::checkpoint_dir(&a.run));
    let cfg = dpo::run_config(&a.run).with_context(|| format!("reading {}", a.run.display()))?;
    if cfg.lora_r.is_none() && cfg.loss.loss.uses_reference() {
        bail!(
            "{}: a fully fine-tuned policy has no reference inside it; evaluate the run's \
             policy/ against its starting model with a LoRA run instead",
            a.run.display()
        );
    }
    let model = palm::load::load_model(&ck, &super::device())?;
    let max_len = a
        .max_len
        .unwrap_or(model.max_seq_len())
        .min(model.max_seq_len());
    let (pairs, st) = load_pairs(
        &a.data,
        &ck,
        a.tokenizer.as_deref(),
        a.chat_template,
        max_len,
        a.limit,
        cfg.seed,
    )?;
    report_truncation("pairs", &st);
    let refs = dpo::reference_logps(
        &model,
        cfg.lora_r.map(|_| dpo::SCOPE),
        &pairs,
        cfg.batch_size,
    )?;
    let e = dpo::evaluate(&model, &cfg, &pairs, &refs)?;
    println!("{}", serde_json::to_string(&e)?);
    Ok(())
}
