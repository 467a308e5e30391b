//! Language-model training: pre-training on text and supervised fine-tuning (SFT), for the whole
//! model or one LoRA scope, with exact resume.
//!
//! One step (see [`Trainer::train_step`]):
//! 1. learning rate from the schedule (linear warmup, cosine decay to `min_lr`);
//! 2. `grad_accum` micro-batches: loss ([`lm_loss`]) / K, backward, gradients accumulated;
//! 3. NaN/inf guard on the loss and the gradients;
//! 4. global-norm clipping;
//! 5. optimiser update (AdamW or Lion) of the parameters in scope only;
//! 6. metrics; validation, a sample and a checkpoint when due.
//!
//! A run directory holds `metrics.jsonl`, `loss.svg`, `checkpoints/step-XXXXXX/` (model files,
//! `optimizer.safetensors`, `trainer.json`), `final/` and `summary.json`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{read_json, write_json_atomic};
use crate::config::LoraSpec;
use crate::dist::{self, ddp};
use crate::error::{Error, Result};
use crate::model::{cross_entropy, Forward, Model};
use crate::params::write_safetensors;
use crate::sample::{generate, GenerateRequest, Sampling};
use crate::tokenizer::Tokenizer;
use crate::train::data::{Batch, BatchOrder, Corpus, DataLoader, DataState};
use crate::train::metrics::MetricsLog;
use crate::train::optim::{
    accumulate, grad_norm, grads_take, lr_at, Grads, OptimConfig, Optimizer,
};
use crate::train::run::{check_finite, progress_bar, Checkpoints};

/// Train only a LoRA scope (created if the model lacks it); the base weights stay frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraTrain {
    pub scope: String,
    pub r: usize,
}

/// Everything that defines a training run (saved in every checkpoint's `trainer.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimiser steps in the run (each over `batch_size * grad_accum` sequences).
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// T: tokens the model sees per sequence.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    pub warmup: usize,
    pub optimizer: OptimConfig,
    /// Global gradient-norm clip (0: off).
    pub max_grad_norm: f64,
    /// Validate every N steps (and at the end); 0: only at the end.
    pub eval_every: usize,
    /// Validation loss is the mean over this many batches.
    pub eval_batches: usize,
    /// Print a sample every N steps (0: never).
    pub sample_every: usize,
    pub sample_tokens: usize,
    /// Checkpoint every N steps (0: only at the end / on interrupt).
    pub save_every: usize,
    pub keep_checkpoints: usize,
    pub seed: u64,
    pub order: BatchOrder,
    pub val_fraction: f64,
    pub lora: Option<LoraTrain>,
    /// Also write `RUN_DIR/batches.safetensors` (every training and validation batch) and
    /// `RUN_DIR/initial/` (the initial model), for comparisons with other implementations.
    #[serde(default)]
    pub export_batches: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 16,
            grad_accum: 1,
            seq_len: 256,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup: 100,
            optimizer: OptimConfig::adamw(),
            max_grad_norm: 0.5,
            eval_every: 100,
            eval_batches: 10,
            sample_every: 500,
            sample_tokens: 200,
            save_every: 500,
            keep_checkpoints: 3,
            seed: 0,
            order: BatchOrder::Random,
            val_fraction: 0.1,
            lora: None,
            export_batches: false,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 || self.seq_len == 0 {
            return bad("steps, batch size, grad accumulation and seq len must be positive".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) || self.min_lr.is_nan() || self.min_lr < 0.0 {
            return bad(format!(
                "learning rates must be positive (lr {}, min_lr {})",
                self.lr, self.min_lr
            ));
        }
        if self.min_lr > self.lr {
            return bad(format!(
                "min_lr {} is above lr {}: the schedule decays from lr down to min_lr",
                self.min_lr, self.lr
            ));
        }
        if self.eval_batches == 0 {
            return bad("eval batches must be positive".into());
        }
        if let Some(l) = &self.lora {
            if l.r == 0 || l.scope.is_empty() {
                return bad("a LoRA scope needs a name and a rank > 0".into());
            }
        }
        Ok(())
    }
}

/// `trainer.json`: where a run is, so `--resume` continues it exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps completed.
    pub step: usize,
    pub data: DataState,
    /// Seconds of training before this checkpoint.
    pub elapsed: f64,
    pub tokens_seen: u64,
    pub last_train_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub config: TrainConfig,
    /// `bytes` or the tokenizer file the run was started with.
    pub tokenizer: String,
    pub data_files: Vec<PathBuf>,
    /// Processes the run was trained with (`mpirun -n N`; 1 for older runs): a resume must use
    /// the same number.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

/// `RUN_DIR/summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub steps: usize,
    pub tokens_per_sec: f64,
    pub parameters: usize,
    pub trained_parameters: usize,
    pub elapsed_sec: f64,
    /// False when the run was interrupted before `steps`.
    pub completed: bool,
}

/// The language-model loss of one batch: mean cross-entropy of the next-token predictions over
/// the tokens flagged in `batch.loss` (all tokens for plain text), also skipping the model's
/// `ignore_index` labels when it has one.
pub fn lm_loss(model: &Model, batch: &Batch, fwd: &Forward) -> Result<Tensor> {
    let (inputs, labels, mask) = batch.tensors(model.device())?; // [B, T] each
    let logits = model.forward(&inputs, fwd)?; // [B, T, V]
    let mask = match (mask, model.ignore_index()) {
        (m, None) => m,
        (None, Some(ig)) => Some(labels.to_dtype(DType::I64)?.ne(ig)?),
        (Some(m), Some(ig)) => Some(m.mul(&labels.to_dtype(DType::I64)?.ne(ig)?)?),
    };
    cross_entropy(&logits, &labels, mask.as_ref())
}

/// Training in progress.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub model: Model,
    pub tok: Tokenizer,
    tokenizer_arg: String,
    data_files: Vec<PathBuf>,
    pub data: DataLoader,
    params: Vec<(String, Var)>,
    opt: Optimizer,
    run_dir: PathBuf,
    checkpoints: Checkpoints,
    pub metrics: MetricsLog,
    /// Steps completed.
    pub step: usize,
    elapsed: f64,
    tokens_seen: u64,
    last_train_loss: Option<f64>,
    last_val_loss: Option<f64>,
    val: Option<Vec<Batch>>,
    /// Hide the progress bar (tests).
    pub quiet: bool,
}

/// Where a run's data came from: the tokenizer (and how it was named) and the files.
pub struct DataSpec {
    pub tokenizer: Tokenizer,
    /// `bytes` or the tokenizer file, stored in `trainer.json`.
    pub tokenizer_arg: String,
    pub files: Vec<PathBuf>,
    pub corpus: Corpus,
}

impl Trainer {
    /// Starts a fresh run in `run_dir` (created; an existing run there is an error).
    /// Everything is validated before anything is written.
    pub fn new(cfg: TrainConfig, mut model: Model, data: DataSpec, run_dir: &Path) -> Result<Self> {
        cfg.validate()?;
        let checkpoints = Checkpoints::new(run_dir, cfg.keep_checkpoints);
        checkpoints.clean_temporaries()?;
        if !checkpoints.list()?.is_empty() || run_dir.join("final").exists() {
            return Err(Error::msg(format!(
                "{} already holds a training run: use --resume to continue it, or another --out",
                run_dir.display()
            )));
        }
        if let Some(l) = &cfg.lora {
            if !model.has_scope(&l.scope) {
                model.add_scope(&l.scope, LoraSpec::new(l.r), cfg.seed)?;
            }
        }
        let loader = DataLoader::new(
            data.corpus,
            cfg.batch_size,
            cfg.seq_len,
            cfg.order,
            cfg.seed,
        )?;
        check_vocab(&model, &loader)?;
        let comm = dist::world();
        ddp::check_batch("--batch-size", cfg.batch_size, comm.world_size())?;
        let params = trained_params(&model, &cfg);
        // DDP: every rank starts from rank 0's weights
        ddp::broadcast_params(comm, &params)?;
        let opt = Optimizer::new(params.clone(), cfg.optimizer);
        // every rank has checked the run directory before rank 0 writes into it
        comm.barrier()?;
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        let metrics = if dist::is_main() {
            MetricsLog::open(run_dir, None)?
        } else {
            MetricsLog::discard()
        };
        let t = Self::assemble(
            cfg,
            model,
            data.tokenizer,
            data.tokenizer_arg,
            data.files,
            loader,
            params,
            opt,
            run_dir,
            checkpoints,
            metrics,
        );
        if t.cfg.export_batches {
            t.export_batches()?;
        }
        Ok(t)
    }

    /// Continues the run in `run_dir` from its latest checkpoint: model, optimiser state, step,
    /// data position and RNG. `steps` (if given) replaces the planned number of steps (which
    /// changes the learning-rate schedule after the checkpoint). `data` must be the run's data
    /// (see [`Trainer::resume_state`] for its files and tokenizer).
    pub fn resume(run_dir: &Path, steps: Option<usize>, data: DataSpec) -> Result<Self> {
        let (ckpt, st) = Self::resume_state(run_dir)?;
        let mut cfg = st.config.clone();
        if let Some(s) = steps {
            cfg.steps = s;
        }
        cfg.validate()?;
        ddp::check_resume_world(run_dir, st.world_size, "palm train")?;
        let model = crate::load::load_model(&ckpt, &candle_core::Device::Cpu)?;
        let mut loader = DataLoader::new(
            data.corpus,
            cfg.batch_size,
            cfg.seq_len,
            cfg.order,
            cfg.seed,
        )?;
        loader.restore(&st.data)?;
        check_vocab(&model, &loader)?;
        let params = trained_params(&model, &cfg);
        let mut opt = Optimizer::new(params.clone(), cfg.optimizer);
        opt.load_state_file(&ckpt.join("optimizer.safetensors"))?;
        let metrics = if dist::is_main() {
            MetricsLog::open(run_dir, Some(st.step as u64))?
        } else {
            MetricsLog::discard()
        };
        let checkpoints = Checkpoints::new(run_dir, cfg.keep_checkpoints);
        if dist::is_main() {
            checkpoints.clean_temporaries()?;
        }
        let mut t = Self::assemble(
            cfg,
            model,
            data.tokenizer,
            data.tokenizer_arg,
            data.files,
            loader,
            params,
            opt,
            run_dir,
            checkpoints,
            metrics,
        );
        t.step = st.step;
        t.elapsed = st.elapsed;
        t.tokens_seen = st.tokens_seen;
        t.last_train_loss = st.last_train_loss;
        t.last_val_loss = st.last_val_loss;
        tracing::info!("resuming {} at step {}", run_dir.display(), st.step);
        Ok(t)
    }

    /// The latest checkpoint of `run_dir` and its `trainer.json`.
    pub fn resume_state(run_dir: &Path) -> Result<(PathBuf, TrainerState)> {
        let checkpoints = Checkpoints::new(run_dir, 1);
        let (_, ckpt) = checkpoints.latest()?.ok_or_else(|| {
            Error::msg(format!(
                "{}: no checkpoint to resume from (expected {}/step-XXXXXX/)",
                run_dir.display(),
                checkpoints.dir.display()
            ))
        })?;
        let st: TrainerState = read_json(&ckpt.join("trainer.json"))?;
        Ok((ckpt, st))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: TrainConfig,
        model: Model,
        tok: Tokenizer,
        tokenizer_arg: String,
        data_files: Vec<PathBuf>,
        data: DataLoader,
        params: Vec<(String, Var)>,
        opt: Optimizer,
        run_dir: &Path,
        checkpoints: Checkpoints,
        metrics: MetricsLog,
    ) -> Self {
        let val = data.val_batches(cfg.eval_batches);
        if val.is_none() {
            tracing::warn!("no validation data (too little data for one validation batch)");
        }
        Self {
            cfg,
            model,
            tok,
            tokenizer_arg,
            data_files,
            data,
            params,
            opt,
            run_dir: run_dir.to_path_buf(),
            checkpoints,
            metrics,
            step: 0,
            elapsed: 0.0,
            tokens_seen: 0,
            last_train_loss: None,
            last_val_loss: None,
            val,
            quiet: false,
        }
    }

    fn forward_opts(&self, train: bool) -> Forward<'_> {
        Forward {
            scope: self.cfg.lora.as_ref().map(|l| l.scope.as_str()),
            freeze_base: self.cfg.lora.is_some(),
            train,
            // one graph node per block where it applies; the loss goes through Model::backward
            fused_blocks: train,
            ..Default::default()
        }
    }

    /// Number of parameters the optimiser updates.
    pub fn trained_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// One optimiser step (steps 1-5 of the module docs). Returns (loss, grad norm, lr).
    pub fn train_step(&mut self) -> Result<(f64, f64, f64)> {
        let step = self.step + 1; // the step being taken, counted from 1
                                  // 1. learning rate
        let lr = lr_at(
            self.step,
            self.cfg.lr,
            self.cfg.min_lr,
            self.cfg.warmup,
            self.cfg.steps,
        );
        // dropout masks depend on (seed, step) only, so a resumed run draws the same ones
        self.model
            .set_seed(self.cfg.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // 2. micro-batches: loss / K, backward, accumulate
        let k = self.cfg.grad_accum;
        let comm = dist::world();
        let mut acc: Grads = Vec::new();
        let mut loss_sum = 0.0;
        for _ in 0..k {
            let batch = self.data.next_batch();
            self.tokens_seen += (batch.b * (batch.l - 1)) as u64;
            // DDP: this rank's rows of the global batch, weighted by their share of its tokens
            // (the whole batch and weight 1 in one process)
            let (batch, weight) = ddp::lm_slice(comm, &batch, self.model.ignore_index());
            let mut loss = lm_loss(&self.model, &batch, &self.forward_opts(true))?;
            if comm.world_size() > 1 {
                loss = (loss * weight)?;
            }
            let value = loss.to_scalar::<f32>()? as f64;
            // 3. NaN/inf guard (before the weights are touched)
            check_finite(step, "loss", value, self.last_checkpoint().as_deref())?;
            loss_sum += value;
            // the graph is freed with the loss at the end of this statement
            let store = self.model.backward(&(loss / k as f64)?)?;
            let g = grads_take(&self.params, store)?;
            if acc.is_empty() {
                acc = g;
            } else {
                accumulate(&mut acc, &g, 1.0);
            }
        }
        crate::train::run::test_poison_gradient(step, &mut acc);
        // DDP: the global gradient (the sum of the weighted slices) and the global loss, before
        // the guard and the clipping, so every rank sees the same norm and takes the same step
        ddp::all_reduce_grads(comm, &mut acc)?;
        if comm.world_size() > 1 {
            let mut l = [loss_sum];
            ddp::sum_f64(comm, &mut l)?;
            loss_sum = l[0];
        }
        // the norm is NaN or infinite exactly when a gradient is (f32 squares cannot overflow
        // an f64 sum), so one pass serves the guard, the report and the clipping
        let norm = grad_norm(&acc);
        if !norm.is_finite() {
            check_finite(
                step,
                "gradient",
                f64::NAN,
                self.last_checkpoint().as_deref(),
            )?;
        }
        // 4-5. clipping (the norm is reported before clipping) and the update, in one pass
        self.opt
            .step_clipped_with_norm(&acc, lr, self.cfg.max_grad_norm, norm)?;
        self.step = step;
        Ok((loss_sum / k as f64, norm, lr))
    }

    /// Mean loss over the validation batches (dropout off). None without validation data.
    pub fn evaluate(&self) -> Result<Option<f64>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        let fwd = self.forward_opts(false);
        let mut sum = 0.0;
        for b in val {
            sum += lm_loss(&self.model, b, &fwd)?.to_scalar::<f32>()? as f64;
        }
        Ok(Some(sum / val.len() as f64))
    }

    /// A sample continuing the data's sample prompt (seeded by the step, so it does not disturb
    /// any other random stream).
    pub fn sample(&self) -> Result<String> {
        let prompt = self.data.sample_prompt(32);
        if prompt.is_empty() {
            return Ok(String::new());
        }
        let room = self.model.max_seq_len().saturating_sub(prompt.len());
        let req = GenerateRequest {
            prompts: vec![prompt.clone()],
            max_new_tokens: self.cfg.sample_tokens.min(room),
            eos: self.tok.eos_id().into_iter().collect(),
            sampling: Sampling {
                temperature: 0.8,
                top_k: Some(40),
                top_p: None,
                greedy: false,
            },
            seed: self.cfg.seed ^ self.step as u64,
            scope: self.cfg.lora.as_ref().map(|l| l.scope.clone()),
            disable_lora: false,
        };
        let g = generate(&self.model, &req, |_, _| {})?;
        let mut ids = prompt;
        ids.extend(&g.completions[0]);
        self.tok.decode(&ids)
    }

    fn last_checkpoint(&self) -> Option<PathBuf> {
        self.checkpoints.latest().ok().flatten().map(|(_, p)| p)
    }

    /// Writes `checkpoints/step-XXXXXX/` (rotating old ones out).
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        if !dist::is_main() {
            // rank 0 writes for every rank (they hold the same weights and optimiser state)
            return Ok(self.checkpoints.path(self.step));
        }
        let state = TrainerState {
            step: self.step,
            data: self.data.state(),
            elapsed: self.elapsed,
            tokens_seen: self.tokens_seen,
            last_train_loss: self.last_train_loss,
            last_val_loss: self.last_val_loss,
            config: self.cfg.clone(),
            tokenizer: self.tokenizer_arg.clone(),
            data_files: self.data_files.clone(),
            world_size: dist::world().world_size(),
        };
        let last_good = self.last_checkpoint();
        self.checkpoints
            .write(self.step, |dir| {
                self.write_model_files(dir)?;
                write_safetensors(&dir.join("optimizer.safetensors"), &self.opt.state()?)?;
                write_json_atomic(&dir.join("trainer.json"), &state)
            })
            .map_err(|e| {
                let keep = match last_good {
                    Some(p) => format!("the last good checkpoint is {}", p.display()),
                    None => "no checkpoint was written before".to_string(),
                };
                Error::msg(format!(
                    "step {}: checkpoint not saved, training stopped ({keep}): {e}",
                    self.step
                ))
            })
    }

    /// The model's files plus the tokenizer file (when not byte-level and not already written
    /// with the model: an HF model carries its tokenizer files, a GGUF-imported one the files
    /// made from its metadata).
    fn write_model_files(&self, dir: &Path) -> Result<()> {
        self.model.write_files(dir)?;
        if self.tokenizer_arg == "bytes" || dir.join("tokenizer.json").exists() {
            return Ok(());
        }
        let src = Path::new(&self.tokenizer_arg);
        let file = if src.is_dir() {
            src.join("tokenizer.json")
        } else {
            src.to_path_buf()
        };
        if crate::load::is_gguf_path(&file) || !file.exists() {
            return Ok(()); // a model's own tokenizer, written with the model where it has one
        }
        let name = match file.extension().and_then(|e| e.to_str()) {
            Some("bin") => file
                .file_name()
                .map_or("tokenizer.bin".into(), |n| n.to_string_lossy().into_owned()),
            _ => "tokenizer.json".to_string(),
        };
        std::fs::copy(&file, dir.join(name)).map_err(|e| Error::io(&file, e))?;
        Ok(())
    }

    /// Runs to `cfg.steps`. See [`Trainer::run_until`].
    pub fn run(&mut self, stop: &AtomicBool) -> Result<Summary> {
        self.run_until(self.cfg.steps, stop)
    }

    /// Trains until step `until` (at most `cfg.steps`), or until `stop` is set (Ctrl-C): then a
    /// checkpoint is written and the run can be resumed. At `cfg.steps` the final model goes to
    /// `RUN_DIR/final/`. Writes `summary.json` either way.
    pub fn run_until(&mut self, until: usize, stop: &AtomicBool) -> Result<Summary> {
        let until = until.min(self.cfg.steps);
        let comm = dist::world();
        let pb = progress_bar(
            self.cfg.steps as u64,
            self.step as u64,
            self.quiet || !dist::is_main(),
        );
        let t_session = Instant::now();
        let elapsed0 = self.elapsed;
        let mut interrupted = false;
        while self.step < until {
            // a signal that reached one rank stops every rank at the same step
            if dist::any(comm, stop.load(Ordering::SeqCst))? {
                interrupted = true;
                break;
            }
            let t0 = Instant::now();
            let tokens0 = self.tokens_seen;
            let (loss, norm, lr) = self.train_step()?;
            let dt = t0.elapsed().as_secs_f64();
            let tps = (self.tokens_seen - tokens0) as f64 / dt.max(1e-9);
            self.last_train_loss = Some(loss);
            let step = self.step;

            // 6. validation, metrics, sample, checkpoint
            let eval_due = (self.cfg.eval_every > 0 && step.is_multiple_of(self.cfg.eval_every))
                || step == self.cfg.steps;
            // rank 0 evaluates and samples (the others would repeat the same work)
            let val_loss = if eval_due && dist::is_main() {
                self.evaluate()?
            } else {
                None
            };
            if let Some(v) = val_loss {
                check_finite(
                    step,
                    "validation loss",
                    v,
                    self.last_checkpoint().as_deref(),
                )?;
                self.last_val_loss = Some(v);
            }
            self.elapsed = elapsed0 + t_session.elapsed().as_secs_f64();
            let mut rec = serde_json::json!({
                "step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                "tokens_per_sec": tps, "elapsed": self.elapsed,
            });
            if let Some(v) = val_loss {
                rec["val_loss"] = v.into();
            }
            self.metrics.log(rec)?;
            pb.set_position(step as u64);
            pb.set_message(format!(
                "loss {loss:.4}{} | {tps:.0} tok/s",
                self.last_val_loss
                    .map(|v| format!(" val {v:.4}"))
                    .unwrap_or_default()
            ));
            if eval_due {
                self.metrics.plot(
                    &self.run_dir.join("loss.svg"),
                    "loss",
                    "step",
                    &["loss", "val_loss"],
                )?;
                if let Some(v) = val_loss {
                    pb.suspend(|| tracing::info!("step {step}: val_loss {v:.4}"));
                }
            }
            if self.cfg.sample_every > 0
                && step.is_multiple_of(self.cfg.sample_every)
                && dist::is_main()
            {
                let s = self.sample()?;
                pb.suspend(|| eprintln!("--- sample at step {step} ---\n{s}\n---"));
            }
            if self.cfg.save_every > 0
                && step.is_multiple_of(self.cfg.save_every)
                && step < self.cfg.steps
            {
                let p = self.save_checkpoint()?;
                pb.suspend(|| tracing::info!("saved {}", p.display()));
            }
        }
        pb.finish_and_clear();
        self.elapsed = elapsed0 + t_session.elapsed().as_secs_f64();
        let completed = self.step >= self.cfg.steps;
        self.metrics.plot(
            &self.run_dir.join("loss.svg"),
            "loss",
            "step",
            &["loss", "val_loss"],
        )?;
        // a checkpoint at the stopping point (Ctrl-C, `until`, or the end)
        let p = self.save_checkpoint()?;
        if interrupted {
            tracing::info!("interrupted at step {}: saved {}", self.step, p.display());
        }
        if completed && dist::is_main() {
            crate::checkpoint::write_dir_atomic(&self.run_dir.join("final"), |d| {
                self.write_model_files(d)
            })?;
            tracing::info!("final model: {}", self.run_dir.join("final").display());
        }
        let summary = Summary {
            final_train_loss: self.last_train_loss,
            final_val_loss: self.last_val_loss,
            steps: self.step,
            tokens_per_sec: self.tokens_seen as f64 / self.elapsed.max(1e-9),
            parameters: self.model.num_parameters(),
            trained_parameters: self.trained_parameters(),
            elapsed_sec: self.elapsed,
            completed,
        };
        if dist::is_main() {
            write_json_atomic(&self.run_dir.join("summary.json"), &summary)?;
        }
        Ok(summary)
    }

    /// Writes every training batch of the run and the validation batches to
    /// `RUN_DIR/batches.safetensors` (`train` [steps * K, B, T+1] u32 as i64, `val` [E, B, T+1]),
    /// and the initial model to `RUN_DIR/initial/`. Plain-text data only.
    fn export_batches(&self) -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let mut d = self.data.clone();
        let n = self.cfg.steps * self.cfg.grad_accum;
        let (b, t1) = (self.cfg.batch_size, self.cfg.seq_len + 1);
        let mut train = Vec::with_capacity(n * b * t1);
        for _ in 0..n {
            let batch = d.next_batch();
            if batch.loss.is_some() || batch.l != t1 {
                return Err(Error::msg("batch export works on plain-text data only"));
            }
            train.extend(batch.ids.iter().map(|&x| x as i64));
        }
        let mut map = std::collections::BTreeMap::new();
        map.insert(
            "train".to_string(),
            Tensor::from_vec(train, (n, b, t1), &dev)?,
        );
        if let Some(val) = &self.val {
            let v: Vec<i64> = val
                .iter()
                .flat_map(|bt| bt.ids.iter().map(|&x| x as i64))
                .collect();
            map.insert(
                "val".to_string(),
                Tensor::from_vec(v, (val.len(), b, t1), &dev)?,
            );
        }
        write_safetensors(&self.run_dir.join("batches.safetensors"), &map)?;
        self.model.save(&self.run_dir.join("initial"))
    }
}

/// The parameters a run updates: a LoRA scope's, or all.
fn trained_params(model: &Model, cfg: &TrainConfig) -> Vec<(String, Var)> {
    match &cfg.lora {
        Some(l) => model
            .vars()
            .with_prefix(&format!("finetune_modules.{}.", l.scope)),
        None => model
            .vars()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn check_vocab(model: &Model, data: &DataLoader) -> Result<()> {
    let max = data.max_token() as usize;
    if max >= model.vocab_size() {
        return Err(Error::Config(format!(
            "the data has token id {max} but the model's vocabulary has {} ids (wrong --tokenizer?)",
            model.vocab_size()
        )));
    }
    Ok(())
}
