//! Reward-model training (one config struct, one loop) on preference pairs with the
//! Bradley-Terry loss, or on rated responses: MSE regression with a scalar head, or cross-entropy
//! against the nearest bin with a binned head (reward = expected bin value). A run directory holds `metrics.jsonl`, `metrics.svg`, `checkpoint/` (the reward model,
//! `optimizer.safetensors`, `trainer.json`; written atomically), `reward_model/` (the final model)
//! and `summary.json`. Resume continues the same run exactly: the data order is a function of
//! (seed, epoch) and dropout is reseeded from (seed, step).

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{read_json, write_dir_atomic, write_json_atomic};
use crate::error::{Error, Result};
use crate::params::{read_tensors, write_safetensors};
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
        on_step,
    )
}

/// [`train`] on pairs or ratings: `train` and `eval` must be of the same kind, and ratings need
/// the model's head to be scalar (MSE) or binned (cross-entropy).
#[allow(clippy::too_many_arguments)]
pub fn train_examples(
    model: &RewardModel,
    train: Examples,
    eval: Examples,
    cfg: &RewardTrainConfig,
    run_dir: &Path,
    resume: bool,
    truncation: Option<TruncationStats>,
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
    let n_train = train.len();
    if n_train == 0 {
        return Err(Error::msg("no training examples"));
    }
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(Error::Config(
            "batch size and epochs must be at least 1".into(),
        ));
    }
    let t0 = std::time::Instant::now();
    let params = model.trainable_params();
    let mut opt = Optimizer::new(params.clone(), cfg.optim);
    let steps_per_epoch = n_train.div_ceil(cfg.batch_size);
    let total = (steps_per_epoch * cfg.epochs) as u64;

    // resume: optimiser state and step from the checkpoint
    let mut step: u64 = 0;
    if resume {
        let ck = checkpoint_dir(run_dir);
        let st: TrainerState = read_json(&ck.join(TRAINER_FILE))?;
        check_resume(&ck.join(TRAINER_FILE), &st, cfg, n_train, ratings)?;
        if st.step > total {
            return Err(Error::Config(format!(
                "--epochs {} gives {total} steps, but the run is already at step {}",
                cfg.epochs, st.step
            )));
        }
        opt.load_state(&read_tensors(
            &ck.join(OPTIMIZER_FILE),
            &candle_core::Device::Cpu,
        )?)?;
        step = st.step;
        tracing::info!("resuming at step {step} of {total}");
    }
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let mut log = MetricsLog::open(run_dir, if resume { Some(step) } else { None })?;

    let save = |opt: &Optimizer, step: u64| -> Result<()> {
        write_dir_atomic(&checkpoint_dir(run_dir), |tmp| {
            model.write_files(tmp)?;
            write_safetensors(&tmp.join(OPTIMIZER_FILE), &opt.state()?)?;
            write_json_atomic(
                &tmp.join(TRAINER_FILE),
                &TrainerState {
                    step,
                    cfg: cfg.clone(),
                    train_pairs: n_train,
                    ratings,
                },
            )
        })
    };
    let plot = |log: &MetricsLog| -> Result<()> {
        log.plot(
            &run_dir.join("metrics.svg"),
            "reward model",
            "step",
            &if ratings {
                ["loss", "mse", "bin_accuracy", "eval_mse", "eval_mae"]
            } else {
                ["loss", "accuracy", "margin", "eval_accuracy", "eval_loss"]
            },
        )
    };

    let mut epoch_correct = (0.0f64, 0usize);
    let mut order: Option<(usize, Vec<usize>)> = None;
    while step < total {
        // 1. this step's examples: epoch permutation, then a slice of it
        let epoch = (step as usize) / steps_per_epoch;
        let within = (step as usize) % steps_per_epoch;
        if within == 0 {
            epoch_correct = (0.0, 0);
        }
        if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            order = Some((epoch, epoch_order(n_train, cfg.seed, epoch)));
        }
        let idx = &order
            .as_ref()
            .map(|(_, o)| o)
            .ok_or_else(|| Error::msg("no order"))?
            [within * cfg.batch_size..((within + 1) * cfg.batch_size).min(n_train)];

        // 2. forward and loss of the batch's objective
        let b = idx.len();
        model
            .trunk
            .set_seed(cfg.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let fwd = RewardForward {
            train: true,
            fused_blocks: true,
            ..Default::default()
        };
        let out = match train {
            Examples::Pairs(p) => pair_step(model, p, idx, cfg.margin, fwd)?,
            Examples::Ratings(r) => rating_step(model, r, idx, fwd)?,
        };

        // 3. gradients
        let loss = out.loss;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        if !loss_v.is_finite() {
            return Err(Error::msg(format!(
                "loss is {loss_v} at step {step}: stopping (lower the learning rate?)"
            )));
        }
        let store = model.backward(&loss)?;
        let mut grads = grads_of(&params, &store)?;
        if grads_non_finite(&grads) {
            return Err(Error::msg(format!(
                "non-finite gradient at step {step}: stopping (lower the learning rate?)"
            )));
        }

        // 4. clip and update
        let norm = clip_grad_norm(&mut grads, cfg.max_grad_norm);
        let lr = lr_at(
            step as usize,
            cfg.lr,
            cfg.min_lr,
            cfg.warmup_steps,
            total as usize,
        );
        opt.step(&grads, lr)?;
        step += 1;

        // 5. metrics
        let (acc, margin) = (out.accuracy, out.margin);
        epoch_correct.0 += if acc.is_nan() { margin } else { acc } * b as f64;
        epoch_correct.1 += b;
        let mut rec = serde_json::json!({
            "step": step, "epoch": epoch, "loss": loss_v, "lr": lr, "grad_norm": norm,
        });
        if let (Some(r), Some(m)) = (rec.as_object_mut(), out.metrics.as_object()) {
            r.extend(m.clone());
        }
        log.log(rec)?;
        on_step(&StepInfo {
            step,
            total_steps: total,
            loss: loss_v,
            accuracy: acc,
            margin,
        });

        // 6. evaluation and checkpoints
        if let Some(ev) = eval.filter(|_| {
            cfg.eval_every > 0 && step.is_multiple_of(cfg.eval_every as u64) && step < total
        }) {
            log.log(evaluate_examples(model, ev, cfg.batch_size, step)?.0)?;
        }
        if cfg.save_every > 0 && step.is_multiple_of(cfg.save_every as u64) && step < total {
            save(&opt, step)?;
            plot(&log)?;
        }
    }

    // 7. final evaluation, checkpoint, model and summary
    let (e, re) = match eval {
        None => (None, None),
        Some(ev) => {
            let (rec, e, re) = evaluate_examples(model, ev, cfg.batch_size, step)?;
            log.log(rec)?;
            (e, re)
        }
    };
    save(&opt, step)?;
    model.save(&run_dir.join(FINAL_DIR))?;
    plot(&log)?;
    let summary = RewardSummary {
        train_pairs: if ratings { 0 } else { n_train },
        eval_pairs: e.map_or(0, |e| e.pairs),
        eval_accuracy: e.map(|e| e.accuracy),
        eval_mean_margin: e.map(|e| e.mean_margin),
        eval_loss: e.map(|e| e.loss),
        train_ratings: ratings.then_some(n_train),
        eval_ratings: ratings.then(|| re.map_or(0, |e| e.records)),
        eval_mse: re.map(|e| e.mse),
        eval_mae: re.map(|e| e.mae),
        eval_ordering_accuracy: re.map(|e| e.ordering_accuracy),
        train_accuracy_last_epoch: epoch_correct.0 / epoch_correct.1.max(1) as f64,
        steps: step,
        seconds: t0.elapsed().as_secs_f64(),
        truncation,
    };
    write_json_atomic(&run_dir.join(SUMMARY_FILE), &summary)?;
    Ok(summary)
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
        let s = train_examples(&m, t, e, &rating_cfg(), &full, false, None, |_| {}).unwrap();
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
            train_examples(&m2, t, e, &rating_cfg(), &half, false, None, |i| {
                if i.step == 17 {
                    panic!("simulated kill");
                }
            })
        }));
        assert!(r.is_err());
        let m3 = RewardModel::load(&checkpoint_dir(&half), &Device::Cpu).unwrap();
        let s2 = train_examples(&m3, t, e, &rating_cfg(), &half, true, None, |_| {}).unwrap();
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
        let s = train_examples(&m, t, e, &rating_cfg(), dir.path(), false, None, |_| {}).unwrap();
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
