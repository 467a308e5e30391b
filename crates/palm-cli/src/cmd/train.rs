//! `palm train`: pre-training on text or supervised fine-tuning on JSONL/Parquet, with exact resume.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use palm::config::PalmConfig;
use palm::model::{Model, Palm};
use palm::pretrained::TextSide;
use palm::tokenizer::Tokenizer;
use palm::train::data::{load_corpus_with, BatchOrder};
use palm::train::optim::OptimConfig;
use palm::train::trainer::{DataSpec, LoraTrain, TrainConfig, Trainer};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum OptimizerArg {
    /// AdamW: betas (0.9, 0.95), eps 1e-8, decoupled weight decay 0.1.
    Adamw,
    /// Lion (the original's train.py): betas (0.9, 0.99), no weight decay. Use a ~3-10x lower --lr.
    Lion,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum OrderArg {
    /// Each window (or example) drawn at random, as the original's train.py.
    Random,
    /// Each window (or example) once per epoch, in a seeded shuffle.
    Epoch,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "\
Data: plain text files (.txt, or anything not .jsonl/.parquet; .gz is read directly) for language
modelling, or data set records: JSONL (.jsonl, .jsonl.gz, one object a line), Parquet (.parquet, one
record a row, as Hugging Face datasets store them) or a directory of shards (its .parquet/.jsonl files
in name order), each record one of
  {\"prompt\": \"...\", \"response\": \"...\"}                      supervised fine-tuning (SFT)
  {\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}, ...]}
  {\"text\": \"...\"}                                           pre-training text (then EOS)
SFT trains on response tokens only and appends an end-of-sequence token to every response. The
last --val-fraction of the data is held out for validation.

The run directory gets metrics.jsonl, loss.svg, checkpoints/step-XXXXXX/, final/ and summary.json.
Ctrl-C saves a checkpoint; --resume continues exactly where it stopped.

Examples:
  palm train --data shakespeare.txt --out runs/shakespeare --config small --steps 2000
  palm train --data chat.jsonl --out runs/sft --model runs/shakespeare/final --lora-scope sft --lora-r 8
  palm train --out runs/shakespeare --resume")]
pub struct Args {
    /// Training data: text files, JSONL or Parquet files, shard directories (see below), or a
    /// `palm serve` database (`sqlite://FILE`, `postgres://...`): its written demonstrations as
    /// SFT messages. With --resume, defaults to the run's files.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Run directory (metrics, plots, checkpoints, final model).
    #[arg(long)]
    pub out: PathBuf,
    /// Matrix-product precision of the linear layers: bf16 rounds their operands to bf16 and
    /// accumulates in f32, on Intel AMX or else AVX512-BF16 (weights, gradients and optimiser
    /// state stay f32).
    #[arg(long, value_enum, default_value_t = super::Precision::F32)]
    pub precision: super::Precision,
    /// Start from this model (checkpoint directory or weights file with config.json beside it).
    #[arg(long, conflicts_with = "config")]
    pub model: Option<PathBuf>,
    /// A fresh model: preset `tiny`, `small` (dim 256, depth 4) or `base` (dim 512, depth 8), or a
    /// config.json. Default: small. Its vocabulary is set to the tokenizer's.
    #[arg(long)]
    pub config: Option<String>,
    /// `bytes`, a tokenizer.json (or a directory holding one), a llama2.c .bin, or a GGUF
    /// [default: the --model's own (GGUF metadata, tokenizer.json), else bytes].
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Optimiser steps [default: 1000; with --resume, the run's own].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Sequences per micro-batch (B).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Tokens per training sequence (T).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Peak learning rate [default: 1e-3 for AdamW, 1e-4 for Lion].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Final learning rate of the cosine decay [default: lr / 10].
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Linear warmup steps [default: min(100, steps / 10)].
    #[arg(long)]
    pub warmup: Option<usize>,
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerArg,
    /// AdamW weight decay [default: 0.1].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 0.5)]
    pub max_grad_norm: f64,
    /// Validate every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,
    /// Batches averaged for the validation loss.
    #[arg(long, default_value_t = 10)]
    pub eval_batches: usize,
    /// Print a sample to stderr every N steps (0: never).
    #[arg(long, default_value_t = 500)]
    pub sample_every: usize,
    /// Checkpoint every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 500)]
    pub save_every: usize,
    /// Checkpoints kept (the oldest are removed).
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Fixes init, data order, dropout and samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// How training batches are drawn.
    #[arg(long, value_enum, default_value = "random")]
    pub order: OrderArg,
    /// Fraction of the data held out for validation (the end of it).
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Continue the run in --out from its latest checkpoint (same config; --steps may extend it).
    #[arg(long)]
    pub resume: bool,
    /// Train only this LoRA scope (created if absent); the base model stays frozen.
    #[arg(long)]
    pub lora_scope: Option<String>,
    /// Rank of a new LoRA scope.
    #[arg(long, default_value_t = 8, requires = "lora_scope")]
    pub lora_r: usize,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Recompute each layer in the backward instead of keeping its activations: less memory,
    /// one more forward per step, the same gradients (Hugging Face and GGUF models; may differ
    /// on --resume).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Also write every batch and the initial model into --out (for scripts/compare-train.sh).
    #[arg(long, hide = true)]
    pub export_batches: bool,
    /// The flags given on the command line (not defaulted), set by main: `--resume` refuses
    /// those that differ from the run's saved settings.
    #[arg(skip)]
    pub explicit: Vec<String>,
}

fn train_config(a: &Args) -> TrainConfig {
    let mut optimizer = match a.optimizer {
        OptimizerArg::Adamw => OptimConfig::adamw(),
        OptimizerArg::Lion => OptimConfig::lion(),
    };
    if let Some(wd) = a.weight_decay {
        optimizer.weight_decay = wd;
    }
    let lr = a.lr.unwrap_or(match a.optimizer {
        OptimizerArg::Adamw => 1e-3,
        OptimizerArg::Lion => 1e-4,
    });
    let steps = a.steps.unwrap_or(1000);
    TrainConfig {
        steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        seq_len: a.seq_len,
        lr,
        min_lr: a.min_lr.unwrap_or(lr / 10.0),
        warmup: a.warmup.unwrap_or((steps / 10).min(100)),
        optimizer,
        max_grad_norm: a.max_grad_norm,
        eval_every: a.eval_every,
        eval_batches: a.eval_batches,
        sample_every: a.sample_every,
        sample_tokens: 200,
        save_every: a.save_every,
        keep_checkpoints: a.keep_checkpoints,
        seed: a.seed,
        order: match a.order {
            OrderArg::Random => BatchOrder::Random,
            OrderArg::Epoch => BatchOrder::Epoch,
        },
        val_fraction: a.val_fraction,
        lora: a.lora_scope.as_ref().map(|s| LoraTrain {
            scope: s.clone(),
            r: a.lora_r,
        }),
        export_batches: a.export_batches,
    }
}

/// `--resume` continues the run with the settings saved in its checkpoint: a flag given on the
/// command line that differs from them is refused by name (with the run's value), rather than
/// silently ignored. `--steps` may extend the run; `--out`, `--quiet`, `--precision`,
/// `--gradient-checkpointing` and a
/// `--data` naming the same files are fine.
fn check_resume_flags(
    a: &Args,
    saved: &TrainConfig,
    saved_files: &[PathBuf],
    saved_tokenizer: &str,
) -> Result<()> {
    let given = serde_json::to_value(train_config(a))?;
    let run = serde_json::to_value(saved)?;
    // flag id -> the saved setting it sets (a JSON pointer into TrainConfig)
    const FLAGS: &[(&str, &str)] = &[
        ("batch_size", "/batch_size"),
        ("grad_accum", "/grad_accum"),
        ("seq_len", "/seq_len"),
        ("lr", "/lr"),
        ("min_lr", "/min_lr"),
        ("warmup", "/warmup"),
        ("optimizer", "/optimizer"),
        ("weight_decay", "/optimizer"),
        ("max_grad_norm", "/max_grad_norm"),
        ("eval_every", "/eval_every"),
        ("eval_batches", "/eval_batches"),
        ("sample_every", "/sample_every"),
        ("save_every", "/save_every"),
        ("keep_checkpoints", "/keep_checkpoints"),
        ("seed", "/seed"),
        ("order", "/order"),
        ("val_fraction", "/val_fraction"),
        ("lora_scope", "/lora/scope"),
        ("lora_r", "/lora/r"),
        ("export_batches", "/export_batches"),
    ];
    let flag = |id: &str| format!("--{}", id.replace('_', "-"));
    let mut differ = Vec::new();
    for id in &a.explicit {
        if let Some((_, ptr)) = FLAGS.iter().find(|(f, _)| f == id) {
            let (g, r) = (given.pointer(ptr), run.pointer(ptr));
            if g != r {
                let show =
                    |v: Option<&serde_json::Value>| v.map_or("none".to_string(), |v| v.to_string());
                differ.push(format!("{} {} (the run's: {})", flag(id), show(g), show(r)));
            }
        }
    }
    for id in ["model", "config"] {
        if a.explicit.iter().any(|e| e == id) {
            differ.push(format!(
                "{} (the run's model comes from its checkpoint)",
                flag(id)
            ));
        }
    }
    if let Some(t) = a.tokenizer.as_ref().filter(|t| {
        let abs = std::fs::canonicalize(t).map(|p| p.display().to_string());
        t.as_str() != saved_tokenizer && abs.as_deref().ok() != Some(saved_tokenizer)
    }) {
        differ.push(format!("--tokenizer {t} (the run's: {saved_tokenizer})"));
    }
    if !a.data.is_empty() {
        let abs: Vec<PathBuf> = a
            .data
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
            .collect();
        if abs != saved_files {
            let names = |v: &[PathBuf]| {
                v.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            differ.push(format!(
                "--data {} (the run's: {})",
                names(&a.data),
                names(saved_files)
            ));
        }
    }
    if !differ.is_empty() {
        bail!(
            "--resume continues {} with its saved settings, and these flags differ from them:\n  {}\n\
             drop them (only --steps may change on resume), or start a new run with another --out",
            a.out.display(),
            differ.join("\n  ")
        );
    }
    Ok(())
}

/// The fresh model of `--config` (default `small`), with the tokenizer's vocabulary.
fn fresh_model(config: Option<&str>, tok: &Tokenizer, seed: u64) -> Result<Model> {
    let name = config.unwrap_or("small");
    let mut cfg = if Path::new(name).is_file() {
        PalmConfig::load(Path::new(name))?
    } else {
        PalmConfig::preset(name)?
    };
    if !Path::new(name).is_file() {
        cfg.num_tokens = tok.vocab_size();
    }
    Ok(Model::Palm(Palm::new(&cfg, seed, &super::device())?))
}

/// The tokenizer and chat template named by a saved or given tokenizer argument: `bytes`, a
/// model (GGUF file or directory: its own tokenizer and template) or a tokenizer file.
fn text_side(arg: &str) -> Result<TextSide> {
    let p = Path::new(arg);
    if arg != "bytes" && arg != "byte" && (p.is_dir() || palm::load::is_gguf_path(p)) {
        return Ok(TextSide::load(p, None)?);
    }
    Ok(TextSide {
        tokenizer: Tokenizer::from_arg(arg)?,
        template: None,
    })
}

fn read_data(files: &[PathBuf], tokenizer: &str, val_fraction: f64) -> Result<DataSpec> {
    let text = text_side(tokenizer)?;
    let template = text.template_or_default();
    let tok = text.tokenizer;
    let corpus = load_corpus_with(files, &tok, &template, val_fraction)?;
    // absolute paths in trainer.json, so --resume works from any directory
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let tokenizer_arg = match tok {
        Tokenizer::Bytes => "bytes".to_string(),
        _ => abs(Path::new(tokenizer)).display().to_string(),
    };
    Ok(DataSpec {
        tokenizer: tok,
        tokenizer_arg,
        files: files.iter().map(|p| abs(p.as_path())).collect(),
        corpus,
    })
}

pub fn run(mut a: Args) -> Result<()> {
    a.precision.apply();
    // a feedback database (`sqlite://`, `postgres://`) becomes an SFT snapshot in the run
    a.data = super::feedback::materialise(&a.data, super::feedback::Kind::Sft, &a.out)?;
    let stop = palm::train::run::stop_flag();
    let mut trainer = if a.resume {
        let (ckpt, st) = Trainer::resume_state(&a.out)?;
        check_resume_flags(&a, &st.config, &st.data_files, &st.tokenizer)?;
        let files = if a.data.is_empty() {
            st.data_files.clone()
        } else {
            a.data.clone()
        };
        let data = read_data(&files, &st.tokenizer, st.config.val_fraction)?;
        let steps = a.steps.filter(|&s| s != st.config.steps);
        if let Some(s) = steps {
            tracing::warn!(
                "--steps {s} replaces the run's {} (the learning-rate schedule changes)",
                st.config.steps
            );
        }
        tracing::info!(
            "resuming from {} (other training options come from the checkpoint)",
            ckpt.display()
        );
        Trainer::resume(&a.out, steps, data)?
    } else {
        if a.data.is_empty() {
            bail!("--data is required (one or more text, JSONL or Parquet files, or shard directories)");
        }
        let cfg = train_config(&a);
        cfg.validate()?;
        // read and validate all data before anything is written to --out
        // the tokenizer (and chat template) of --model unless --tokenizer names one
        let tokenizer = match (&a.tokenizer, &a.model) {
            (Some(t), _) => t.clone(),
            (None, Some(m)) => m.display().to_string(),
            (None, None) => "bytes".to_string(),
        };
        let data = read_data(&a.data, &tokenizer, cfg.val_fraction)?;
        let model = match &a.model {
            Some(p) => palm::load::load_model(p, &super::device())
                .with_context(|| format!("loading model {}", p.display()))?,
            None => fresh_model(a.config.as_deref(), &data.tokenizer, a.seed)?,
        };
        Trainer::new(cfg, model, data, &a.out)?
    };
    trainer.quiet = a.quiet;
    trainer
        .model
        .set_gradient_checkpointing(a.gradient_checkpointing)?;
    tracing::info!(
        "{} parameters, training {}; {} steps of {} x {} x {} tokens",
        trainer.model.num_parameters(),
        trainer.trained_parameters(),
        trainer.cfg.steps,
        trainer.cfg.grad_accum,
        trainer.cfg.batch_size,
        trainer.cfg.seq_len
    );
    let summary = trainer.run(stop)?;
    if palm::dist::is_main() {
        // one summary per job, not one per rank
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    if !summary.completed {
        tracing::info!(
            "stopped at step {}; continue with: palm train --out {} --resume",
            summary.steps,
            a.out.display()
        );
        // as Unix programs do after an interrupt: `palm train ... && palm generate --model
        // RUN/final` must not go on to a model that was not written
        std::process::exit(130);
    }
    Ok(())
}
