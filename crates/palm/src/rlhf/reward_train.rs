//! Reward-model training (one config struct, one loop) on preference pairs with the
//! Bradley-Terry loss, or on rated responses: MSE regression with a scalar head, or cross-entropy
//! against the nearest bin with a binned head (reward = expected bin value). A run directory holds `metrics.jsonl`, `metrics.svg`, `checkpoint/` (the reward model,
//! `optimizer.safetensors`, `trainer.json`; written atomically), `reward_model/` (the final model)
//! and `summary.json`. Resume continues the same run exactly: the data order is a function of
//! (seed, epoch) and dropout is reseeded from (seed, step).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{read_json, write_dir_atomic, write_json_atomic};
use crate::dist::{self, ddp};
use crate::error::{Error, Result};
use crate::params::write_safetensors;
use crate::rlhf::preference_data::{EncodedPair, EncodedRating, TruncationStats};
use crate::rlhf::reward::{
    binned_cross_entropy, bradley_terry_loss, expected_bin_value, mse_loss, HeadKind, Padding,
    RewardBatch, RewardForward, RewardModel,
};
use crate::rng;
use crate::train::metrics::MetricsLog;
use crate::train::optim::{
    clip_grad_norm, grads_non_finite, grads_of, lr_at, OptimConfig, Optimizer,
};

pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const FINAL_DIR: &str = "reward_model";
pub const SUMMARY_FILE: &str = "summary.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const TRAINER_FILE: &str = "trainer.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardTrainConfig {
    pub epochs: usize,
    /// Pairs per step (each step runs 2 x batch_size sequences).
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// Bradley-Terry margin: the loss wants r_chosen - r_rejected > margin.
    pub margin: f64,
    pub max_grad_norm: f64,
    pub optim: OptimConfig,
    pub seed: u64,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
}

impl Default for RewardTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 8,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            margin: 0.0,
            max_grad_norm: 1.0,
            optim: OptimConfig {
                weight_decay: 0.0,
                ..OptimConfig::adamw()
            },
            seed: 0,
            eval_every: 0,
            save_every: 100,
        }
    }
}

/// Pairwise evaluation: accuracy (r_chosen > r_rejected; a tie counts half), mean margin
/// r_chosen - r_rejected, and the mean Bradley-Terry loss (margin 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub accuracy: f64,
    pub pairs: usize,
    pub mean_margin: f64,
    pub loss: f64,
}

/// Scores every pair without gradients.
pub fn evaluate(
    model: &RewardModel,
    pairs: &[EncodedPair],
    batch_size: usize,
) -> Result<EvalResult> {
    let seqs: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .flat_map(|p| [p.chosen.as_pair(), p.rejected.as_pair()])
        .collect();
    let r = model.score(&seqs, 2 * batch_size.max(1))?;
    Ok(eval_from_scores(&r))
}

/// Metrics from interleaved scores [c0, r0, c1, r1, ...].
pub fn eval_from_scores(r: &[f32]) -> EvalResult {
    let n = r.len() / 2;
    let (mut correct, mut margin, mut loss) = (0.0f64, 0.0f64, 0.0f64);
    for i in 0..n {
        let d = (r[2 * i] - r[2 * i + 1]) as f64;
        correct += if d > 0.0 {
            1.0
        } else if d == 0.0 {
            0.5
        } else {
            0.0
        };
        margin += d;
        // -log sigmoid(d), stable
        loss += (-d).max(0.0) + (-d.abs()).exp().ln_1p();
    }
    let k = n.max(1) as f64;
    EvalResult {
        accuracy: correct / k,
        pairs: n,
        mean_margin: margin / k,
        loss: loss / k,
    }
}

/// What a reward model trains on: preference pairs or rated responses (never both).
#[derive(Debug, Clone, Copy)]
pub enum Examples<'a> {
    Pairs(&'a [EncodedPair]),
    Ratings(&'a [EncodedRating]),
}

impl Examples<'_> {
    pub fn len(&self) -> usize {
        match self {
            Examples::Pairs(p) => p.len(),
            Examples::Ratings(r) => r.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rating evaluation: mean squared and absolute error of the reward against the score, and the
/// pairwise ordering accuracy over every two records with different scores (the reward orders
/// them as the scores do; a tie counts half).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RatingEval {
    pub mse: f64,
    pub mae: f64,
    pub records: usize,
    pub ordering_accuracy: f64,
    pub ordered_pairs: usize,
}

/// Scores every rated response without gradients.
pub fn evaluate_ratings(
    model: &RewardModel,
    ratings: &[EncodedRating],
    batch_size: usize,
) -> Result<RatingEval> {
    let seqs: Vec<(&[u32], &[u32])> = ratings.iter().map(|r| r.seq.as_pair()).collect();
    let pred = model.score(&seqs, batch_size.max(1))?;
    let score: Vec<f32> = ratings.iter().map(|r| r.score).collect();
    Ok(rating_eval_from_scores(&pred, &score))
}

/// Rating metrics from predicted rewards and target scores.
pub fn rating_eval_from_scores(pred: &[f32], score: &[f32]) -> RatingEval {
    let n = pred.len().min(score.len());
    let (mut se, mut ae) = (0.0f64, 0.0f64);
    for i in 0..n {
        let d = (pred[i] - score[i]) as f64;
        se += d * d;
        ae += d.abs();
    }
    let (mut correct, mut pairs) = (0.0f64, 0usize);
    for i in 0..n {
        for j in i + 1..n {
            if score[i] == score[j] {
                continue;
            }
            pairs += 1;
            let (hi, lo) = if score[i] > score[j] { (i, j) } else { (j, i) };
            correct += if pred[hi] > pred[lo] {
                1.0
            } else if pred[hi] == pred[lo] {
                0.5
            } else {
                0.0
            };
        }
    }
    let k = n.max(1) as f64;
    RatingEval {
        mse: se / k,
        mae: ae / k,
        records: n,
        ordering_accuracy: correct / pairs.max(1) as f64,
        ordered_pairs: pairs,
    }
}

/// The bin whose value is nearest `score` (the first on a tie).
pub fn nearest_bin(values: &[f32], score: f32) -> usize {
    let mut best = (f32::INFINITY, 0);
    for (k, &v) in values.iter().enumerate() {
        let d = (v - score).abs();
        if d < best.0 {
            best = (d, k);
        }
    }
    best.1
}

/// Evaluates `examples`: the metrics record for `metrics.jsonl` (keys `eval_*`) and the results.
fn evaluate_examples(
    model: &RewardModel,
    examples: Examples,
    batch_size: usize,
    step: u64,
) -> Result<(serde_json::Value, Option<EvalResult>, Option<RatingEval>)> {
    Ok(match examples {
        Examples::Pairs(p) => {
            let e = evaluate(model, p, batch_size)?;
            tracing::info!(
                "step {step}: eval accuracy {:.4} on {} pairs",
                e.accuracy,
                e.pairs
            );
            (
                serde_json::json!({
                    "step": step, "eval_accuracy": e.accuracy, "eval_margin": e.mean_margin, "eval_loss": e.loss,
                }),
                Some(e),
                None,
            )
        }
        Examples::Ratings(r) => {
            let e = evaluate_ratings(model, r, batch_size)?;
            tracing::info!(
                "step {step}: eval mse {:.4}, mae {:.4}, ordering accuracy {:.4} on {} records",
                e.mse,
                e.mae,
                e.ordering_accuracy,
                e.records
            );
            (
                serde_json::json!({
                    "step": step, "eval_mse": e.mse, "eval_mae": e.mae,
                    "eval_ordering_accuracy": e.ordering_accuracy,
                }),
                None,
                Some(e),
            )
        }
    })
}

/// What the run ends with (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardSummary {
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub eval_accuracy: Option<f64>,
    pub eval_mean_margin: Option<f64>,
    pub eval_loss: Option<f64>,
    /// Rating runs: records trained and evaluated on, and the rating metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_ratings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_ratings: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_mse: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_mae: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_ordering_accuracy: Option<f64>,
    /// Pairs: the share ranked right. Ratings: the bin accuracy of a binned head, the mean
    /// squared error of a scalar head.
    pub train_accuracy_last_epoch: f64,
    pub steps: u64,
    pub seconds: f64,
    pub truncation: Option<TruncationStats>,
}

/// One step's numbers, for progress display.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    /// Pairs: the share ranked right. Ratings: bin accuracy (binned head) or NaN (scalar head).
    pub accuracy: f64,
    /// Pairs: mean r_chosen - r_rejected. Ratings: the batch's mean squared error.
    pub margin: f64,
}

/// One batch's loss and its metrics (logged and shown).
struct StepOut {
    loss: Tensor,
    accuracy: f64,
    margin: f64,
    /// The extra keys of the step's metrics record.
    metrics: serde_json::Value,
}

/// Pairs: the Bradley-Terry loss over one batch of pairs (`idx` into `pairs`).
fn pair_step(
    model: &RewardModel,
    pairs: &[EncodedPair],
    idx: &[usize],
    margin: f64,
    fwd: RewardForward,
) -> Result<StepOut> {
    // one batch of 2B sequences: chosen rows first, then rejected rows
    let b = idx.len();
    let seqs: Vec<(&[u32], &[u32])> = idx
        .iter()
        .map(|&i| pairs[i].chosen.as_pair())
        .chain(idx.iter().map(|&i| pairs[i].rejected.as_pair()))
        .collect();
    let batch = RewardBatch::new(&seqs, Padding::Right, model.trunk.device())?;
    let r = model.rewards(&batch, fwd, None)?; // [2B]
    let (rc, rr) = (r.narrow(0, 0, b)?, r.narrow(0, b, b)?);
    let loss = bradley_terry_loss(&rc, &rr, margin)?;
    let d: Vec<f32> = (&rc - &rr)?.detach().to_vec1()?;
    let acc = d
        .iter()
        .map(|&x| {
            if x > 0.0 {
                1.0
            } else if x == 0.0 {
                0.5
            } else {
                0.0
            }
        })
        .sum::<f64>()
        / b as f64;
    let margin = d.iter().map(|&x| x as f64).sum::<f64>() / b as f64;
    Ok(StepOut {
        loss,
        accuracy: acc,
        margin,
        metrics: serde_json::json!({ "accuracy": acc, "margin": margin }),
    })
}

/// Ratings: MSE of a scalar head's reward against the score, or a binned head's cross-entropy
/// against the bin nearest the score (its `mse` metric reads the expected bin value).
fn rating_step(
    model: &RewardModel,
    ratings: &[EncodedRating],
    idx: &[usize],
    fwd: RewardForward,
) -> Result<StepOut> {
    let b = idx.len();
    let seqs: Vec<(&[u32], &[u32])> = idx.iter().map(|&i| ratings[i].seq.as_pair()).collect();
    let score: Vec<f32> = idx.iter().map(|&i| ratings[i].score).collect();
    let dev = model.trunk.device();
    let batch = RewardBatch::new(&seqs, Padding::Right, dev)?;
    let out = model.forward(&batch, fwd)?;
    let target = Tensor::from_vec(score.clone(), b, dev)?; // [B]
    match &model.cfg.head {
        HeadKind::Scalar => {
            let loss = mse_loss(&out.head, &target)?; // head: rewards [B]
            let mse = loss.to_scalar::<f32>()? as f64;
            Ok(StepOut {
                loss,
                accuracy: f64::NAN,
                margin: mse,
                metrics: serde_json::json!({ "mse": mse }),
            })
        }
        HeadKind::Binned { values, .. } => {
            let labels: Vec<i64> = score
                .iter()
                .map(|&s| nearest_bin(values, s) as i64)
                .collect();
            let loss = binned_cross_entropy(&out.head, &Tensor::new(labels.as_slice(), dev)?)?;
            let logits = out.head.detach(); // [B, K]
            let mse = mse_loss(&expected_bin_value(&logits, values)?, &target)?
                .to_scalar::<f32>()? as f64;
            let argmax: Vec<u32> = logits.argmax(1)?.to_vec1()?;
            let acc = argmax
                .iter()
                .zip(&labels)
                .filter(|(&a, &l)| a as i64 == l)
                .count() as f64
                / b as f64;
            Ok(StepOut {
                loss,
                accuracy: acc,
                margin: mse,
                metrics: serde_json::json!({ "mse": mse, "bin_accuracy": acc }),
            })
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    cfg: RewardTrainConfig,
    /// Training examples (pairs or ratings).
    train_pairs: usize,
    /// A rating run.
    #[serde(default)]
    ratings: bool,
    /// The current epoch's (sum of accuracy x examples, examples) so far, for the summary's
    /// `train_accuracy_last_epoch`; the sum as its f64 bits, which come back exactly (a JSON
    /// float may not).
    #[serde(default)]
    epoch_correct: Option<(u64, usize)>,
    /// Processes the run was trained with (`mpirun -n N`; 1 for older runs).
    #[serde(default = "one")]
    world_size: usize,
}

fn one() -> usize {
    1
}

/// The pair order of one epoch: a permutation fixed by (seed, epoch).
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut idx: Vec<usize> = (0..n).collect();
    let mut r = rng::stream(seed, 0x5eed_0000 + epoch as u64);
    idx.shuffle(&mut r);
    idx
}

/// The model to continue a run from: `RUN_DIR/checkpoint`.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINT_DIR)
}

/// Trains `model` on `train` pairs; evaluates on `eval`. With `resume`, the model must have been
/// loaded from `RUN_DIR/checkpoint` (see [`checkpoint_dir`]) and the optimiser state and step
/// are restored from there.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &RewardModel,
    train_pairs: &[EncodedPair],
    eval_pairs: &[EncodedPair],
    cfg: &RewardTrainConfig,
    run_dir: &Path,
    resume: bool,
    truncation: Option<TruncationStats>,
    on_step: impl FnMut(&StepInfo),
) -> Result<RewardSummary> {
    train_examples(
        model,
        Examples::Pairs(train_pairs),
        Examples::Pairs(eval_pairs),
        cfg,
        run_dir,
        resume,
        truncation,
        &AtomicBool::new(false),
        on_step,
    )
}

/// [`train`] on pairs or ratings: `train` and `eval` must be of the same kind, and ratings need
/// the model's head to be scalar (MSE) or binned (cross-entropy). When `stop` is set (Ctrl-C,
/// SIGTERM) the run checkpoints after the current step and returns a summary with
/// `steps` below the total, without the final model or `summary.json`.
#[allow(clippy::too_many_arguments)]
pub fn train_examples(
    model: &RewardModel,
    train: Examples,
    eval: Examples,
    cfg: &RewardTrainConfig,
    run_dir: &Path,
    resume: bool,
    truncation: Option<TruncationStats>,
    stop: &AtomicBool,
    mut on_step: impl FnMut(&StepInfo),
) -> Result<RewardSummary> {
    let ratings = match (train, eval) {
        (Examples::Pairs(_), Examples::Pairs(_)) => false,
        (Examples::Ratings(_), Examples::Ratings(_)) => true,
        (_, e) if e.is_empty() => matches!(train, Examples::Ratings(_)),
        _ => {
            return Err(Error::Config(
                "training and evaluation data must be of one kind: preference pairs or ratings"
                    .into(),
            ))
        }
    };
    let eval = if eval.is_empty() { None } else { Some(eval) };
    if train.is_empty() {
        return Err(Error::msg("no training examples"));
    }
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(Error::Config(
            "batch size and epochs must be at least 1".into(),
        ));
    }
    let comm = dist::world();
    ddp::check_batch("--batch-size", cfg.batch_size, comm.world_size())?;
    let mut run = Run::start(model, cfg, run_dir, resume, train.len(), ratings)?;
    let total = run.total;
    let mut order: Option<(usize, Vec<usize>)> = None;
    while run.step < total {
        let info = run.train_step(train, &mut order)?;
        on_step(&info);
        let step = run.step;
        // rank 0 evaluates (every rank holds the same weights)
        if let Some(ev) = eval.filter(|_| {
            cfg.eval_every > 0
                && step.is_multiple_of(cfg.eval_every as u64)
                && step < total
                && dist::is_main()
        }) {
            run.log
                .log(evaluate_examples(model, ev, cfg.batch_size, step)?.0)?;
        }
        // a signal that reached one rank stops every rank at the same step
        let stopping = dist::any(comm, stop.load(Ordering::SeqCst))?;
        let due = cfg.save_every > 0 && step.is_multiple_of(cfg.save_every as u64);
        if (stopping || due) && step < total {
            run.save()?;
            run.plot()?;
            if stopping {
                tracing::warn!(
                    "reward train: stopped at step {step} of {total}; checkpoint in {} (resume with --resume)",
                    checkpoint_dir(run_dir).display()
                );
                return Ok(run.summary(None, None, truncation));
            }
        }
    }
    run.finish(eval, truncation)
}

/// A reward-model run in progress: the model, its optimiser, the step and the log.
struct Run<'a> {
    model: &'a RewardModel,
    cfg: &'a RewardTrainConfig,
    run_dir: &'a Path,
    params: Vec<(String, candle_core::Var)>,
    opt: Optimizer,
    log: MetricsLog,
    /// Steps completed, and the run's total.
    step: u64,
    total: u64,
    steps_per_epoch: usize,
    n_train: usize,
    ratings: bool,
    /// The current epoch's (sum of accuracy x examples, examples) so far.
    epoch_correct: (f64, usize),
    t0: std::time::Instant,
}

impl<'a> Run<'a> {
    /// A fresh run, or (`resume`) the one saved in `RUN_DIR/checkpoint`: optimiser state, step
    /// and the epoch's running accuracy, with `metrics.jsonl` cut back to the checkpoint's step.
    fn start(
        model: &'a RewardModel,
        cfg: &'a RewardTrainConfig,
        run_dir: &'a Path,
        resume: bool,
        n_train: usize,
        ratings: bool,
    ) -> Result<Self> {
        let params = model.trainable_params();
        // DDP: every rank starts from rank 0's weights
        ddp::broadcast_params(dist::world(), &params)?;
        let mut opt = Optimizer::new(params.clone(), cfg.optim);
        let steps_per_epoch = n_train.div_ceil(cfg.batch_size);
        let total = (steps_per_epoch * cfg.epochs) as u64;
        let (mut step, mut epoch_correct) = (0u64, (0.0f64, 0usize));
        if resume {
            let ck = crate::checkpoint::resolve_dir(&checkpoint_dir(run_dir));
            let st: TrainerState = read_json(&ck.join(TRAINER_FILE))?;
            check_resume(&ck.join(TRAINER_FILE), &st, cfg, n_train, ratings)?;
            ddp::check_resume_world(&ck, st.world_size, "palm reward train")?;
            if st.step > total {
                return Err(Error::Config(format!(
                    "--epochs {} gives {total} steps, but the run is already at step {}",
                    cfg.epochs, st.step
                )));
            }
            opt.load_state_file(&ck.join(OPTIMIZER_FILE))?;
            step = st.step;
            if let Some((bits, n)) = st.epoch_correct {
                epoch_correct = (f64::from_bits(bits), n);
            }
            tracing::info!("resuming at step {step} of {total}");
        }
        // every rank has checked the run before rank 0 writes into it
        dist::world().barrier()?;
        let log = if dist::is_main() {
            std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
            MetricsLog::open(run_dir, resume.then_some(step))?
        } else {
            MetricsLog::discard()
        };
        Ok(Self {
            model,
            cfg,
            run_dir,
            params,
            opt,
            log,
            step,
            total,
            steps_per_epoch,
            n_train,
            ratings,
            epoch_correct,
            t0: std::time::Instant::now(),
        })
    }

    /// Writes `RUN_DIR/checkpoint` atomically.
    fn save(&self) -> Result<()> {
        if !dist::is_main() {
            return Ok(()); // rank 0 writes for every rank
        }
        write_dir_atomic(&checkpoint_dir(self.run_dir), |tmp| {
            self.model.write_files(tmp)?;
            write_safetensors(&tmp.join(OPTIMIZER_FILE), &self.opt.state()?)?;
            write_json_atomic(
                &tmp.join(TRAINER_FILE),
                &TrainerState {
                    step: self.step,
                    cfg: self.cfg.clone(),
                    train_pairs: self.n_train,
                    ratings: self.ratings,
                    epoch_correct: Some((self.epoch_correct.0.to_bits(), self.epoch_correct.1)),
                    world_size: dist::world().world_size(),
                },
            )
        })
    }

    fn plot(&self) -> Result<()> {
        self.log.plot(
            &self.run_dir.join("metrics.svg"),
            "reward model",
            "step",
            &if self.ratings {
                ["loss", "mse", "bin_accuracy", "eval_mse", "eval_mae"]
            } else {
                ["loss", "accuracy", "margin", "eval_accuracy", "eval_loss"]
            },
        )
    }

    /// One optimiser step over the next batch of the epoch's permutation (`order` caches it),
    /// logged to `metrics.jsonl`.
    fn train_step(
        &mut self,
        train: Examples,
        order: &mut Option<(usize, Vec<usize>)>,
    ) -> Result<StepInfo> {
        let cfg = self.cfg;
        let (step, taking) = (self.step, self.step as usize + 1);
        // 1. this step's examples: epoch permutation, then a slice of it
        let epoch = (step as usize) / self.steps_per_epoch;
        let within = (step as usize) % self.steps_per_epoch;
        if within == 0 {
            self.epoch_correct = (0.0, 0);
        }
        if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            *order = Some((epoch, epoch_order(self.n_train, cfg.seed, epoch)));
        }
        let idx = &order
            .as_ref()
            .map(|(_, o)| o)
            .ok_or_else(|| Error::msg("no order"))?
            [within * cfg.batch_size..((within + 1) * cfg.batch_size).min(self.n_train)];

        // 2. forward and loss of the batch's objective
        let b = idx.len();
        self.model
            .trunk
            .set_seed(cfg.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let fwd = RewardForward {
            train: true,
            fused_blocks: true,
            ..Default::default()
        };
        // DDP: this rank's rows of the batch; its mean loss weighs local / global rows
        let comm = dist::world();
        let (lo, hi) = ddp::rows_of(b, comm.rank(), comm.world_size());
        let local = &idx[lo..hi];
        let mut out = match train {
            Examples::Pairs(p) => pair_step(self.model, p, local, cfg.margin, fwd)?,
            Examples::Ratings(r) => rating_step(self.model, r, local, fwd)?,
        };
        let mut loss = out.loss.clone();
        if comm.world_size() > 1 {
            loss = (loss * ((hi - lo) as f64 / b as f64))?;
        }

        // 3. gradients, guarded: a NaN or inf stops the run before the weights are touched
        let mut loss_v = loss.to_scalar::<f32>()? as f64;
        let keep = || self.last_good();
        if !loss_v.is_finite() {
            return Err(Error::msg(format!(
                "step {taking}: loss is {loss_v}; training stopped ({}). Lower the learning rate?",
                keep()
            )));
        }
        let store = self.model.backward(&loss)?;
        let mut grads = grads_of(&self.params, &store)?;
        crate::train::run::test_poison_gradient(taking, &mut grads);
        // DDP: the global gradient, loss and batch metrics (every rank then clips the same norm)
        ddp::all_reduce_grads(comm, &mut grads)?;
        if comm.world_size() > 1 {
            // NaN accuracy (scalar ratings) stays NaN on every rank
            let w = (hi - lo) as f64 / b as f64;
            let mut v = [loss_v, w * out.accuracy, w * out.margin];
            ddp::reduce_means(comm, &mut out.metrics, &mut v, w)?;
            (loss_v, out.accuracy, out.margin) = (v[0], v[1], v[2]);
        }
        if grads_non_finite(&grads) {
            return Err(Error::msg(format!(
                "step {taking}: a gradient is NaN or infinite; training stopped ({}). Lower the \
                 learning rate?",
                keep()
            )));
        }

        // 4. clip and update
        let norm = clip_grad_norm(&mut grads, cfg.max_grad_norm);
        let lr = lr_at(
            step as usize,
            cfg.lr,
            cfg.min_lr,
            cfg.warmup_steps,
            self.total as usize,
        );
        self.opt.step(&grads, lr)?;
        self.step += 1;

        // 5. metrics
        let (acc, margin) = (out.accuracy, out.margin);
        self.epoch_correct.0 += if acc.is_nan() { margin } else { acc } * b as f64;
        self.epoch_correct.1 += b;
        let mut rec = serde_json::json!({
            "step": self.step, "epoch": epoch, "loss": loss_v, "lr": lr, "grad_norm": norm,
        });
        if let (Some(r), Some(m)) = (rec.as_object_mut(), out.metrics.as_object()) {
            r.extend(m.clone());
        }
        self.log.log(rec)?;
        Ok(StepInfo {
            step: self.step,
            total_steps: self.total,
            loss: loss_v,
            accuracy: acc,
            margin,
        })
    }

    /// What a stopped run keeps: its checkpoint (written at every save), named for errors.
    fn last_good(&self) -> String {
        let ck = crate::checkpoint::resolve_dir(&checkpoint_dir(self.run_dir));
        if ck.join(TRAINER_FILE).exists() {
            format!("the last good checkpoint, {}, is kept", ck.display())
        } else {
            "no checkpoint was written yet".to_string()
        }
    }

    fn summary(
        &self,
        e: Option<EvalResult>,
        re: Option<RatingEval>,
        truncation: Option<TruncationStats>,
    ) -> RewardSummary {
        let ratings = self.ratings;
        RewardSummary {
            train_pairs: if ratings { 0 } else { self.n_train },
            eval_pairs: e.map_or(0, |e| e.pairs),
            eval_accuracy: e.map(|e| e.accuracy),
            eval_mean_margin: e.map(|e| e.mean_margin),
            eval_loss: e.map(|e| e.loss),
            train_ratings: ratings.then_some(self.n_train),
            eval_ratings: ratings.then(|| re.map_or(0, |e| e.records)),
            eval_mse: re.map(|e| e.mse),
            eval_mae: re.map(|e| e.mae),
            eval_ordering_accuracy: re.map(|e| e.ordering_accuracy),
            train_accuracy_last_epoch: self.epoch_correct.0 / self.epoch_correct.1.max(1) as f64,
            steps: self.step,
            seconds: self.t0.elapsed().as_secs_f64(),
            truncation,
        }
    }

    /// The end (step 7): final evaluation, checkpoint, model and summary. A run resumed from
    /// its final checkpoint (killed before its summary) does not log the final evaluation twice.
    fn finish(
        mut self,
        eval: Option<Examples>,
        truncation: Option<TruncationStats>,
    ) -> Result<RewardSummary> {
        let (e, re) = match eval.filter(|_| dist::is_main()) {
            None => (None, None),
            Some(ev) => {
                let (rec, e, re) =
                    evaluate_examples(self.model, ev, self.cfg.batch_size, self.step)?;
                let key = if self.ratings {
                    "eval_mse"
                } else {
                    "eval_accuracy"
                };
                if !crate::train::run::logged_at(&self.log, self.step, key) {
                    self.log.log(rec)?;
                }
                (e, re)
            }
        };
        self.save()?;
        self.plot()?;
        let summary = self.summary(e, re, truncation);
        if dist::is_main() {
            self.model.save(&self.run_dir.join(FINAL_DIR))?;
            write_json_atomic(&self.run_dir.join(SUMMARY_FILE), &summary)?;
        }
        Ok(summary)
    }
}

/// A resumed run must have the same data and settings, except `epochs`, which may extend it
/// (the learning-rate schedule then stretches, as `palm train --resume --steps` does). A mismatch
/// names each differing setting with both values.
fn check_resume(
    file: &Path,
    st: &TrainerState,
    cfg: &RewardTrainConfig,
    n_train: usize,
    ratings: bool,
) -> Result<()> {
    let mut differ = Vec::new();
    if st.train_pairs != n_train || st.ratings != ratings {
        let kind = |r: bool| if r { "ratings" } else { "pairs" };
        differ.push(format!(
            "data: {n_train} {} (the run's: {} {})",
            kind(ratings),
            st.train_pairs,
            kind(st.ratings)
        ));
    }
    let (now, run) = (
        serde_json::to_value(cfg).map_err(|e| Error::msg(e.to_string()))?,
        serde_json::to_value(&st.cfg).map_err(|e| Error::msg(e.to_string()))?,
    );
    if let (Some(now), Some(run)) = (now.as_object(), run.as_object()) {
        for (k, v) in now {
            if k != "epochs" && run.get(k) != Some(v) {
                let was = run.get(k).map_or("none".to_string(), |r| r.to_string());
                differ.push(format!("{k}: {v} (the run's: {was})"));
            }
        }
    }
    if !differ.is_empty() {
        return Err(Error::Config(format!(
            "{}: resume with the run's data and settings (only --epochs may change); these differ:\n  {}",
            file.display(),
            differ.join("\n  ")
        )));
    }
    if cfg.epochs != st.cfg.epochs {
        tracing::warn!(
            "--epochs {} replaces the run's {} (the learning-rate schedule stretches)",
            cfg.epochs,
            st.cfg.epochs
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LoraSpec, PalmConfig};
    use crate::model::{Model, Palm};
    use crate::rlhf::preference_data::EncodedSeq;
    use crate::rlhf::reward::RewardConfig;
    use candle_core::Device;

    fn never() -> AtomicBool {
        AtomicBool::new(false)
    }

    fn model(seed: u64) -> RewardModel {
        let cfg = PalmConfig {
            heads: 2,
            dim_head: 8,
            ..PalmConfig::new(16, 16, 1)
        };
        let trunk = Model::Palm(Palm::new(&cfg, seed, &Device::Cpu).unwrap());
        RewardModel::new(trunk, RewardConfig::default(), Some(LoraSpec::new(4)), seed).unwrap()
    }

    /// A rule a tiny model learns at once: the chosen response contains token 7, the rejected 3.
    fn pairs(n: usize) -> Vec<EncodedPair> {
        (0..n)
            .map(|i| {
                let p = vec![1 + (i % 5) as u32, 2];
                let fill = 8 + (i % 4) as u32;
                EncodedPair {
                    chosen: EncodedSeq {
                        prompt: p.clone(),
                        response: vec![fill, 7, fill, 0],
                    },
                    rejected: EncodedSeq {
                        prompt: p,
                        response: vec![fill, 3, fill, 0],
                    },
                }
            })
            .collect()
    }

    fn cfg() -> RewardTrainConfig {
        RewardTrainConfig {
            epochs: 3,
            batch_size: 4,
            lr: 3e-2,
            min_lr: 3e-3,
            warmup_steps: 2,
            save_every: 5,
            eval_every: 4,
            ..Default::default()
        }
    }

    #[test]
    fn eval_metrics_hand_computed() {
        let e = eval_from_scores(&[1.0, 0.0, 0.0, 2.0, 1.0, 1.0]);
        assert_eq!(e.pairs, 3);
        assert!((e.accuracy - 0.5).abs() < 1e-12); // right, wrong, tie
        assert!((e.mean_margin - (-1.0 / 3.0)).abs() < 1e-9);
        let sp = |x: f64| (1.0 + (-x).exp()).ln();
        assert!((e.loss - (sp(1.0) + sp(-2.0) + sp(0.0)) / 3.0).abs() < 1e-9);
    }

    #[test]
    fn learns_a_simple_rule_and_resume_is_exact() {
        let data = pairs(24);
        let dir = tempfile::tempdir().unwrap();
        // full run
        let m = model(1);
        let before = evaluate(&m, &data, 8).unwrap();
        let full = dir.path().join("full");
        let s = train(&m, &data, &data, &cfg(), &full, false, None, |_| {}).unwrap();
        assert!(
            s.eval_accuracy.unwrap() >= 0.95,
            "{s:?} (before: {before:?})"
        );
        assert!(s.eval_loss.unwrap() < before.loss);
        for f in [
            "metrics.jsonl",
            "metrics.svg",
            "summary.json",
            "reward_model/reward.json",
        ] {
            assert!(full.join(f).exists(), "{f}");
        }
        let back = RewardModel::load(&full.join(FINAL_DIR), &Device::Cpu).unwrap();
        assert_eq!(
            evaluate(&back, &data, 8).unwrap().accuracy,
            s.eval_accuracy.unwrap()
        );

        // interrupted at step 10 (checkpoint every 5), then resumed: same final model
        let half = dir.path().join("half");
        let short = RewardTrainConfig { epochs: 3, ..cfg() };
        let m2 = model(1);
        let mut count = 0;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            train(&m2, &data, &data, &short, &half, false, None, |i| {
                count = i.step;
                if i.step == 12 {
                    panic!("simulated kill");
                }
            })
        }));
        assert!(r.is_err() && count == 12);
        let m3 = RewardModel::load(&checkpoint_dir(&half), &Device::Cpu).unwrap();
        let s2 = train(&m3, &data, &data, &short, &half, true, None, |_| {}).unwrap();
        let a = evaluate(&back, &data, 8).unwrap();
        let b = evaluate(&m3, &data, 8).unwrap();
        assert_eq!(s2.steps, s.steps);
        assert!(
            (a.mean_margin - b.mean_margin).abs() < 1e-5,
            "{a:?} vs {b:?}"
        );
        let lines = std::fs::read_to_string(half.join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = lines
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("loss").is_some())
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert_eq!(
            steps,
            (1..=s.steps).collect::<Vec<_>>(),
            "one record per step after resume"
        );
    }

    /// Ctrl-C/SIGTERM in the middle of the last epoch: a checkpoint at that step, no final
    /// model; the resumed run ends with the uninterrupted run's model and summary, the last
    /// epoch's running accuracy included.
    #[test]
    fn stop_checkpoints_and_resume_ends_as_an_uninterrupted_run() {
        let data = pairs(24);
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("full");
        let m = model(1);
        let s = train(&m, &data, &data, &cfg(), &full, false, None, |_| {}).unwrap();
        let half = dir.path().join("half");
        let stop = AtomicBool::new(false);
        let m2 = model(1);
        // 6 steps an epoch: step 15 is inside the last epoch
        let part = train_examples(
            &m2,
            Examples::Pairs(&data),
            Examples::Pairs(&data),
            &cfg(),
            &half,
            false,
            None,
            &stop,
            |i| stop.store(i.step == 15, Ordering::SeqCst),
        )
        .unwrap();
        assert_eq!(part.steps, 15);
        assert!(!half.join(FINAL_DIR).exists() && !half.join(SUMMARY_FILE).exists());
        let m3 = RewardModel::load(&checkpoint_dir(&half), &Device::Cpu).unwrap();
        let s2 = train(&m3, &data, &data, &cfg(), &half, true, None, |_| {}).unwrap();
        assert_eq!(s2.steps, s.steps);
        assert_eq!(s2.train_accuracy_last_epoch, s.train_accuracy_last_epoch);
        assert_eq!(s2.eval_loss, s.eval_loss);
        let bytes = |d: &Path| std::fs::read(d.join(FINAL_DIR).join("model.safetensors")).unwrap();
        assert!(bytes(&full) == bytes(&half), "final weights differ");
    }

    /// Ratings by a known rule: score = the number of token 7 in a 6-token response, clipped
    /// to 0..5; the other tokens are drawn from 8..12 by a fixed generator.
    fn ratings(n: usize, seed: u64) -> Vec<EncodedRating> {
        use rand::Rng;
        let mut r = rng::stream(seed, 1);
        (0..n)
            .map(|i| {
                let k = i % 6; // counts 0..=5 evenly
                let mut resp: Vec<u32> = (0..6)
                    .map(|j| if j < k { 7 } else { r.random_range(8..12) })
                    .collect();
                use rand::seq::SliceRandom;
                resp.shuffle(&mut r);
                resp.push(0); // EOS
                EncodedRating {
                    seq: EncodedSeq {
                        prompt: vec![1 + (i % 3) as u32],
                        response: resp,
                    },
                    score: k.min(5) as f32,
                }
            })
            .collect()
    }

    fn variance(r: &[EncodedRating]) -> f64 {
        let n = r.len() as f64;
        let m = r.iter().map(|x| x.score as f64).sum::<f64>() / n;
        r.iter().map(|x| (x.score as f64 - m).powi(2)).sum::<f64>() / n
    }

    fn rating_model(head: HeadKind) -> RewardModel {
        let cfg = PalmConfig {
            heads: 2,
            dim_head: 8,
            ..PalmConfig::new(16, 16, 1)
        };
        let trunk = Model::Palm(Palm::new(&cfg, 2, &Device::Cpu).unwrap());
        let rc = RewardConfig {
            head,
            ..RewardConfig::default()
        };
        RewardModel::new(trunk, rc, Some(LoraSpec::new(4)), 2).unwrap()
    }

    fn rating_cfg() -> RewardTrainConfig {
        RewardTrainConfig {
            epochs: 40,
            batch_size: 8,
            lr: 3e-2,
            min_lr: 3e-3,
            warmup_steps: 2,
            save_every: 5,
            eval_every: 0,
            ..Default::default()
        }
    }

    #[test]
    fn rating_eval_hand_computed() {
        // errors 0.5, -1, 0: mse 1.25/3, mae 1.5/3; pairs with different scores:
        // (0,1) right, (0,2) wrong, (1,2) tie -> 1.5 / 3
        let e = rating_eval_from_scores(&[1.5, 0.0, 1.0], &[1.0, 1.0, 1.0]);
        assert_eq!(e.ordered_pairs, 0);
        let e = rating_eval_from_scores(&[1.5, 0.0, 0.0], &[1.0, 0.0, 2.0]);
        assert_eq!((e.records, e.ordered_pairs), (3, 3));
        assert!((e.mse - (0.25 + 0.0 + 4.0) / 3.0).abs() < 1e-9);
        assert!((e.mae - 2.5 / 3.0).abs() < 1e-9);
        // (s=1 > s=0): 1.5 > 0 right; (s=2 > s=1): 0 < 1.5 wrong; (s=2 > s=0): tie
        assert!((e.ordering_accuracy - 0.5).abs() < 1e-12);
        assert_eq!(nearest_bin(&[0.0, 1.25, 2.5], 0.7), 1);
        assert_eq!(nearest_bin(&[0.0, 1.25, 2.5], -3.0), 0);
        assert_eq!(nearest_bin(&[0.0, 1.25, 2.5], 9.0), 2);
    }

    #[test]
    fn ratings_mse_learns_the_count_and_resume_is_exact() {
        let (tr, ev) = (ratings(48, 1), ratings(24, 2));
        let var = variance(&ev);
        let dir = tempfile::tempdir().unwrap();
        let m = rating_model(HeadKind::Scalar);
        let before = evaluate_ratings(&m, &ev, 8).unwrap();
        let full = dir.path().join("full");
        let (t, e) = (Examples::Ratings(&tr), Examples::Ratings(&ev));
        let s = train_examples(
            &m,
            t,
            e,
            &rating_cfg(),
            &full,
            false,
            None,
            &never(),
            |_| {},
        )
        .unwrap();
        let mse = s.eval_mse.unwrap();
        eprintln!("scalar head: eval {s:?}, score variance {var}");
        assert!(
            mse < 0.25 * var,
            "eval mse {mse} vs score variance {var} ({s:?}; before {before:?})"
        );
        assert!(s.eval_ordering_accuracy.unwrap() > 0.85, "{s:?}");
        assert_eq!((s.train_ratings, s.eval_ratings), (Some(48), Some(24)));
        let back = RewardModel::load(&full.join(FINAL_DIR), &Device::Cpu).unwrap();
        let a = evaluate_ratings(&back, &ev, 8).unwrap();
        assert!((a.mse - mse).abs() < 1e-6);

        // killed at step 17 (checkpoint every 5), resumed: the same final model
        let half = dir.path().join("half");
        let m2 = rating_model(HeadKind::Scalar);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            train_examples(
                &m2,
                t,
                e,
                &rating_cfg(),
                &half,
                false,
                None,
                &never(),
                |i| {
                    if i.step == 17 {
                        panic!("simulated kill");
                    }
                },
            )
        }));
        assert!(r.is_err());
        let m3 = RewardModel::load(&checkpoint_dir(&half), &Device::Cpu).unwrap();
        let s2 = train_examples(
            &m3,
            t,
            e,
            &rating_cfg(),
            &half,
            true,
            None,
            &never(),
            |_| {},
        )
        .unwrap();
        assert_eq!(s2.steps, s.steps);
        let b = evaluate_ratings(&m3, &ev, 8).unwrap();
        assert!((a.mse - b.mse).abs() < 1e-5, "{a:?} vs {b:?}");
        // resuming a rating run with pairs is refused
        let m4 = RewardModel::load(&checkpoint_dir(&half), &Device::Cpu).unwrap();
        let p = pairs(4);
        let err = train(&m4, &p, &[], &rating_cfg(), &half, true, None, |_| {}).unwrap_err();
        assert!(err.to_string().contains("ratings"), "{err}");
        // mixing kinds is refused
        let err = train_examples(
            &m4,
            t,
            Examples::Pairs(&p),
            &rating_cfg(),
            &half,
            false,
            None,
            &never(),
            |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("one kind"), "{err}");
    }

    #[test]
    fn ratings_binned_learns_the_count() {
        let (tr, ev) = (ratings(48, 1), ratings(24, 2));
        let var = variance(&ev);
        let dir = tempfile::tempdir().unwrap();
        let m = rating_model(HeadKind::binned(6)); // bins valued 0..=5
        let (t, e) = (Examples::Ratings(&tr), Examples::Ratings(&ev));
        let s = train_examples(
            &m,
            t,
            e,
            &rating_cfg(),
            dir.path(),
            false,
            None,
            &never(),
            |_| {},
        )
        .unwrap();
        let mse = s.eval_mse.unwrap();
        eprintln!("binned head: eval {s:?}, score variance {var}");
        assert!(mse < 0.25 * var, "eval mse {mse} vs variance {var}: {s:?}");
        assert!(s.eval_ordering_accuracy.unwrap() > 0.85, "{s:?}");
        let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert!(log.contains("bin_accuracy"));
        // the expected-value reward is deterministic
        let seqs: Vec<_> = ev.iter().map(|r| r.seq.as_pair()).collect();
        assert_eq!(m.score(&seqs, 8).unwrap(), m.score(&seqs, 5).unwrap());
    }
}
