//! Reward-model training on preference pairs with the Bradley-Terry loss (one config struct, one
//! loop). A run directory holds `metrics.jsonl`, `metrics.svg`, `checkpoint/` (the reward model,
//! `optimizer.safetensors`, `trainer.json`; written atomically), `reward_model/` (the final model)
//! and `summary.json`. Resume continues the same run exactly: the data order is a function of
//! (seed, epoch) and dropout is reseeded from (seed, step).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{read_json, write_dir_atomic, write_json_atomic};
use crate::error::{Error, Result};
use crate::params::{read_tensors, write_safetensors};
use crate::rlhf::preference_data::{EncodedPair, TruncationStats};
use crate::rlhf::reward::{bradley_terry_loss, Padding, RewardBatch, RewardForward, RewardModel};
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

/// What the run ends with (`summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardSummary {
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub eval_accuracy: Option<f64>,
    pub eval_mean_margin: Option<f64>,
    pub eval_loss: Option<f64>,
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
    pub accuracy: f64,
    pub margin: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    cfg: RewardTrainConfig,
    train_pairs: usize,
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
    mut on_step: impl FnMut(&StepInfo),
) -> Result<RewardSummary> {
    if train_pairs.is_empty() {
        return Err(Error::msg("no training pairs"));
    }
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(Error::Config(
            "batch size and epochs must be at least 1".into(),
        ));
    }
    let t0 = std::time::Instant::now();
    let device = model.trunk.device().clone();
    let params = model.trainable_params();
    let mut opt = Optimizer::new(params.clone(), cfg.optim);
    let steps_per_epoch = train_pairs.len().div_ceil(cfg.batch_size);
    let total = (steps_per_epoch * cfg.epochs) as u64;

    // resume: optimiser state and step from the checkpoint
    let mut step: u64 = 0;
    if resume {
        let ck = checkpoint_dir(run_dir);
        let st: TrainerState = read_json(&ck.join(TRAINER_FILE))?;
        if st.cfg != *cfg || st.train_pairs != train_pairs.len() {
            return Err(Error::Config(format!(
                "{}: the run was started with other settings or data ({} pairs, {:?}); resume with the same ones",
                ck.join(TRAINER_FILE).display(),
                st.train_pairs,
                st.cfg
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
                    train_pairs: train_pairs.len(),
                },
            )
        })
    };
    let plot = |log: &MetricsLog| -> Result<()> {
        log.plot(
            &run_dir.join("metrics.svg"),
            "reward model",
            "step",
            &["loss", "accuracy", "margin", "eval_accuracy", "eval_loss"],
        )
    };

    let mut epoch_correct = (0.0f64, 0usize);
    let mut order: Option<(usize, Vec<usize>)> = None;
    while step < total {
        // 1. this step's pairs: epoch permutation, then a slice of it
        let epoch = (step as usize) / steps_per_epoch;
        let within = (step as usize) % steps_per_epoch;
        if within == 0 {
            epoch_correct = (0.0, 0);
        }
        if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            order = Some((epoch, epoch_order(train_pairs.len(), cfg.seed, epoch)));
        }
        let idx = &order
            .as_ref()
            .map(|(_, o)| o)
            .ok_or_else(|| Error::msg("no order"))?
            [within * cfg.batch_size..((within + 1) * cfg.batch_size).min(train_pairs.len())];

        // 2. one batch of 2B sequences: chosen rows first, then rejected rows
        let b = idx.len();
        let seqs: Vec<(&[u32], &[u32])> = idx
            .iter()
            .map(|&i| train_pairs[i].chosen.as_pair())
            .chain(idx.iter().map(|&i| train_pairs[i].rejected.as_pair()))
            .collect();
        let batch = RewardBatch::new(&seqs, Padding::Right, &device)?;
        model
            .trunk
            .set_seed(cfg.seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let fwd = RewardForward {
            train: true,
            ..Default::default()
        };
        let r = model.rewards(&batch, fwd, None)?; // [2B]
        let (rc, rr) = (r.narrow(0, 0, b)?, r.narrow(0, b, b)?);

        // 3. loss, gradients
        let loss = bradley_terry_loss(&rc, &rr, cfg.margin)?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        if !loss_v.is_finite() {
            return Err(Error::msg(format!(
                "loss is {loss_v} at step {step}: stopping (lower the learning rate?)"
            )));
        }
        let store = loss.backward()?;
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
        epoch_correct.0 += acc * b as f64;
        epoch_correct.1 += b;
        log.log(serde_json::json!({
            "step": step, "epoch": epoch, "loss": loss_v, "accuracy": acc, "margin": margin,
            "lr": lr, "grad_norm": norm,
        }))?;
        on_step(&StepInfo {
            step,
            total_steps: total,
            loss: loss_v,
            accuracy: acc,
            margin,
        });

        // 6. evaluation and checkpoints
        if cfg.eval_every > 0
            && step.is_multiple_of(cfg.eval_every as u64)
            && step < total
            && !eval_pairs.is_empty()
        {
            let e = evaluate(model, eval_pairs, cfg.batch_size)?;
            log.log(serde_json::json!({
                "step": step, "eval_accuracy": e.accuracy, "eval_margin": e.mean_margin, "eval_loss": e.loss,
            }))?;
            tracing::info!(
                "step {step}: eval accuracy {:.4} on {} pairs",
                e.accuracy,
                e.pairs
            );
        }
        if cfg.save_every > 0 && step.is_multiple_of(cfg.save_every as u64) && step < total {
            save(&opt, step)?;
            plot(&log)?;
        }
    }

    // 7. final evaluation, checkpoint, model and summary
    let e = if eval_pairs.is_empty() {
        None
    } else {
        let e = evaluate(model, eval_pairs, cfg.batch_size)?;
        log.log(serde_json::json!({
            "step": step, "eval_accuracy": e.accuracy, "eval_margin": e.mean_margin, "eval_loss": e.loss,
        }))?;
        Some(e)
    };
    save(&opt, step)?;
    model.save(&run_dir.join(FINAL_DIR))?;
    plot(&log)?;
    let summary = RewardSummary {
        train_pairs: train_pairs.len(),
        eval_pairs: eval_pairs.len(),
        eval_accuracy: e.map(|e| e.accuracy),
        eval_mean_margin: e.map(|e| e.mean_margin),
        eval_loss: e.map(|e| e.loss),
        train_accuracy_last_epoch: epoch_correct.0 / epoch_correct.1.max(1) as f64,
        steps: step,
        seconds: t0.elapsed().as_secs_f64(),
        truncation,
    };
    write_json_atomic(&run_dir.join(SUMMARY_FILE), &summary)?;
    Ok(summary)
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
}
