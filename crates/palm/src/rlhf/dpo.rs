//! Direct preference optimisation (Rafailov et al. 2023) and its variants, on the same
//! preference pairs as the reward model: sigmoid (DPO; with label smoothing = cDPO), IPO, robust
//! DPO, hinge (SLiC), and the reference-free SimPO and ORPO.
//!
//! Log-probabilities of a response are SUMMED over its tokens (the prompt is not scored), as in
//! TRL and OpenRLHF; IPO, SimPO and ORPO use the per-token mean (sum / length), as TRL does.
//! With h_w = log pi(y_w) - log ref(y_w), h_l likewise, z = beta * (h_w - h_l):
//! - sigmoid: -(1 - e) log s(z) - e log s(-z)            (e = label smoothing; e = 0: DPO)
//! - robust:  [-(1 - e) log s(z) + e log s(-z)] / (1 - 2e)   (Chowdhury et al. 2024)
//! - hinge:   relu(1 - z)
//! - ipo:     (d - 1 / (2 beta))^2, d = h_w / |y_w| - h_l / |y_l|
//! - simpo:   -log s(beta * (a_w - a_l) - gamma), a = mean token log-prob (no reference)
//! - orpo:    -a_w - beta * log s(log-odds), log-odds = (a_w - a_l) - (log(1 - e^a_w) -
//!   log(1 - e^a_l)) (the chosen NLL plus the odds-ratio term; no reference)
//!
//! Implicit rewards (logged): beta * (log pi - log ref) per side; SimPO and ORPO: beta * a.
//!
//! The reference's log-probs are computed ONCE, before the first step, with the policy's LoRA
//! switched off (or the initial weights, for full fine-tuning), and cached in the run
//! ([`REF_FILE`]); a sample is checked against a fresh reference forward whenever the cache is
//! made or a LoRA run resumes. The trainer ([`train`]) resumes exactly: the pair order is a
//! function of (seed, epoch), and there is no dropout.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{read_json, write_dir_atomic, write_json_atomic};
use crate::config::LoraSpec;
use crate::dist::{self, ddp};
use crate::error::{Error, Result};
use crate::model::{Forward, Model};
use crate::params::{read_tensors, write_safetensors};
use crate::rlhf::preference_data::EncodedPair;
use crate::rlhf::rollout::{response_logprobs, Layout};
use crate::rng;
use crate::train::metrics::MetricsLog;
use crate::train::optim::{
    clip_grad_norm, grads_non_finite, grads_of, lr_at, OptimConfig, Optimizer,
};

/// The LoRA scope DPO trains.
pub const SCOPE: &str = "dpo";
pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const POLICY_DIR: &str = "policy";
pub const SUMMARY_FILE: &str = "summary.json";
/// The cached reference log-probs: `chosen` [N] and `rejected` [N], summed over tokens.
pub const REF_FILE: &str = "reference_logps.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const TRAINER_FILE: &str = "trainer.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DpoLoss {
    #[default]
    Sigmoid,
    Ipo,
    Robust,
    Hinge,
    Simpo,
    Orpo,
}

impl DpoLoss {
    /// SimPO and ORPO need no reference model.
    pub fn uses_reference(self) -> bool {
        !matches!(self, DpoLoss::Simpo | DpoLoss::Orpo)
    }
}

impl FromStr for DpoLoss {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "sigmoid" => Self::Sigmoid,
            "ipo" => Self::Ipo,
            "robust" => Self::Robust,
            "hinge" => Self::Hinge,
            "simpo" => Self::Simpo,
            "orpo" => Self::Orpo,
            _ => {
                return Err(Error::msg(format!(
                    "unknown DPO loss `{s}` (expected sigmoid, ipo, robust, hinge, simpo or orpo)"
                )))
            }
        })
    }
}

/// The loss and its constants.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub loss: DpoLoss,
    pub beta: f64,
    /// sigmoid: cDPO's label smoothing; robust: the label-flip rate epsilon in [0, 0.5).
    pub label_smoothing: f64,
    /// SimPO's target margin gamma.
    pub simpo_gamma: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            loss: DpoLoss::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
        }
    }
}

/// Summed response log-probs [B] of both sides under the policy and the reference (the
/// reference is ignored by SimPO and ORPO), and the response lengths.
pub struct PairLogps<'a> {
    pub chosen: &'a Tensor,
    pub rejected: &'a Tensor,
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
    pub chosen_len: &'a Tensor,
    pub rejected_len: &'a Tensor,
}

/// Per-pair losses [B] and implicit rewards [B] of each side.
pub struct LossOut {
    pub losses: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), stable for any x.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_abs = x.abs()?.neg()?;
    Ok((x.minimum(&x.zeros_like()?)? - (neg_abs.exp()? + 1.0)?.log()?)?)
}

/// The per-pair loss of `cfg.loss` (module docs give each formula).
pub fn loss(cfg: &LossConfig, lp: &PairLogps) -> Result<LossOut> {
    let (beta, e) = (cfg.beta, cfg.label_smoothing);
    let h_w = (lp.chosen - lp.ref_chosen)?;
    let h_l = (lp.rejected - lp.ref_rejected)?;
    let z = ((&h_w - &h_l)? * beta)?;
    let (a_w, a_l) = (
        (lp.chosen / lp.chosen_len)?,
        (lp.rejected / lp.rejected_len)?,
    );
    let losses = match cfg.loss {
        DpoLoss::Sigmoid => ((log_sigmoid(&z)? * -(1.0 - e))? - (log_sigmoid(&z.neg()?)? * e)?)?,
        DpoLoss::Robust => {
            (((log_sigmoid(&z)? * -(1.0 - e))? + (log_sigmoid(&z.neg()?)? * e)?)?
                / (1.0 - 2.0 * e))?
        }
        DpoLoss::Hinge => (1.0 - z)?.relu()?,
        DpoLoss::Ipo => {
            let d = ((&h_w / lp.chosen_len)? - (&h_l / lp.rejected_len)?)?;
            (d - 1.0 / (2.0 * beta))?.sqr()?
        }
        DpoLoss::Simpo => {
            let s = (((&a_w - &a_l)? * beta)? - cfg.simpo_gamma)?;
            ((log_sigmoid(&s)? * -(1.0 - e))? - (log_sigmoid(&s.neg()?)? * e)?)?
        }
        DpoLoss::Orpo => (a_w.neg()? - (orpo_odds_term(&a_w, &a_l, beta)?))?,
    };
    let (chosen_rewards, rejected_rewards) = if cfg.loss.uses_reference() {
        ((h_w * beta)?.detach(), (h_l * beta)?.detach())
    } else {
        ((&a_w * beta)?.detach(), (&a_l * beta)?.detach())
    };
    Ok(LossOut {
        losses,
        chosen_rewards,
        rejected_rewards,
    })
}

/// ORPO's odds-ratio term beta * log s(log-odds) from mean token log-probs (as TRL's
/// `odds_ratio_loss` returns it; the loss subtracts it).
pub fn orpo_odds_term(a_w: &Tensor, a_l: &Tensor, beta: f64) -> Result<Tensor> {
    let log1mexp = |a: &Tensor| -> Result<Tensor> { Ok((1.0 - a.exp()?)?.log()?) };
    let log_odds = ((a_w - a_l)? - (log1mexp(a_w)? - log1mexp(a_l)?)?)?;
    Ok((log_sigmoid(&log_odds)? * beta)?)
}

// ---------------------------------------------------------------------------------------------
// Sequence log-probs

/// Summed log-probs [n] of each (prompt, response) under `model` run with `opts`, and the
/// response lengths. Rows are laid out as in rollouts (left-padded prompts, right-padded
/// responses, pads masked).
pub fn sequence_logps(
    model: &Model,
    seqs: &[(&[u32], &[u32])],
    opts: Forward,
) -> Result<(Tensor, Vec<f32>)> {
    let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| s.0.to_vec()).collect();
    let responses: Vec<Vec<u32>> = seqs.iter().map(|s| s.1.to_vec()).collect();
    let lay = Layout::new(&prompts, &responses)?;
    let (logp, _) = response_logprobs(model, &lay, opts, 1.0)?; // [n, R]
    let mask = lay.mask_tensor(model.device())?;
    let sums = (logp * mask)?.sum(1)?; // [n]
    let lens = responses.iter().map(|r| r.len().max(1) as f32).collect();
    Ok((sums, lens))
}

/// The reference's forward: the policy's scope with LoRA off (LoRA runs), or the untouched
/// model (full fine-tuning, before the first update).
fn reference_forward(scope: Option<&str>) -> Forward<'_> {
    Forward {
        scope,
        disable_lora: scope.is_some(),
        fused_blocks: true,
        ..Default::default()
    }
}

/// Reference log-probs (chosen, rejected) of every pair, in batches of `batch` pairs.
pub fn reference_logps(
    model: &Model,
    scope: Option<&str>,
    pairs: &[EncodedPair],
    batch: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut c, mut r) = (vec![], vec![]);
    for chunk in pairs.chunks(batch.max(1)) {
        let seqs: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|p| p.chosen.as_pair())
            .chain(chunk.iter().map(|p| p.rejected.as_pair()))
            .collect();
        let (s, _) = sequence_logps(model, &seqs, reference_forward(scope))?;
        let s: Vec<f32> = s.to_vec1()?;
        c.extend_from_slice(&s[..chunk.len()]);
        r.extend_from_slice(&s[chunk.len()..]);
    }
    Ok((c, r))
}

/// Checks cached reference log-probs against a fresh reference forward of up to `n` pairs,
/// one pair at a time (other padding than the cache's batches). Returns the largest difference.
pub fn check_reference(
    model: &Model,
    scope: Option<&str>,
    pairs: &[EncodedPair],
    cache: &(Vec<f32>, Vec<f32>),
    n: usize,
    path: &Path,
) -> Result<f32> {
    let mut worst = 0f32;
    let step = (pairs.len() / n.max(1)).max(1);
    for i in (0..pairs.len()).step_by(step).take(n) {
        let (c, r) = reference_logps(model, scope, &pairs[i..i + 1], 1)?;
        for (live, cached) in [(c[0], cache.0[i]), (r[0], cache.1[i])] {
            let d = (live - cached).abs();
            worst = worst.max(d);
            if d > 1e-3 * (1.0 + cached.abs()) {
                return Err(Error::msg(format!(
                    "{}: cached reference log-prob of pair {i} is {cached} but the reference \
                     model gives {live}: the cache belongs to another model or data; delete it",
                    path.display()
                )));
            }
        }
    }
    Ok(worst)
}

// ---------------------------------------------------------------------------------------------
// Trainer

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    pub loss: LossConfig,
    /// LoRA rank of the `dpo` scope; None: full fine-tuning.
    pub lora_r: Option<usize>,
    /// What the scope adapts.
    pub lora_targets: crate::config::LoraTargets,
    pub epochs: usize,
    /// Pairs per step (2 x batch_size sequences).
    pub batch_size: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Evaluate on the held-out pairs every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Pairs of the reference cache re-checked against a live reference forward.
    pub ref_check: usize,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            loss: LossConfig::default(),
            lora_r: Some(8),
            lora_targets: crate::config::LoraTargets::Attention,
            epochs: 1,
            batch_size: 8,
            lr: 5e-4,
            min_lr: 5e-5,
            warmup_steps: 5,
            max_grad_norm: 1.0,
            seed: 0,
            eval_every: 0,
            save_every: 0,
            ref_check: 4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    cfg: DpoConfig,
    train_pairs: usize,
    /// The evaluation before the first step, for the summary of a resumed run.
    #[serde(default)]
    initial_eval: Option<EvalBits>,
    /// Processes the run was trained with (`mpirun -n N`; 1 for older runs).
    #[serde(default = "one")]
    world_size: usize,
}

fn one() -> usize {
    1
}

/// A [`DpoEval`] whose numbers come back from JSON bit for bit: as their f64 bits (serde_json
/// may read a float back one ulp off).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct EvalBits {
    pairs: usize,
    loss: u64,
    accuracy: u64,
    margin: u64,
}

impl From<DpoEval> for EvalBits {
    fn from(e: DpoEval) -> Self {
        Self {
            pairs: e.pairs,
            loss: e.loss.to_bits(),
            accuracy: e.accuracy.to_bits(),
            margin: e.margin.to_bits(),
        }
    }
}

impl From<EvalBits> for DpoEval {
    fn from(e: EvalBits) -> Self {
        Self {
            pairs: e.pairs,
            loss: f64::from_bits(e.loss),
            accuracy: f64::from_bits(e.accuracy),
            margin: f64::from_bits(e.margin),
        }
    }
}

/// Implicit-reward evaluation on pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoEval {
    pub pairs: usize,
    pub loss: f64,
    /// Share with chosen reward > rejected reward (ties count 0, as TRL).
    pub accuracy: f64,
    pub margin: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DpoSummary {
    pub train_pairs: usize,
    pub steps: u64,
    pub initial_eval: Option<DpoEval>,
    pub eval: Option<DpoEval>,
    /// The largest |cached - live| reference log-prob seen by the checks.
    pub reference_check_max_diff: f32,
    pub seconds: f64,
}

/// The pair order of one epoch: a permutation fixed by (seed, epoch).
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng::stream(seed, 0xd90_0000 + epoch as u64));
    idx
}

/// The policy: the `dpo` scope on the frozen base, or the whole model.
fn policy_forward(cfg: &DpoConfig, fused: bool) -> Forward<'static> {
    Forward {
        scope: cfg.lora_r.map(|_| SCOPE),
        freeze_base: cfg.lora_r.is_some(),
        fused_blocks: fused,
        ..Default::default()
    }
}

/// Loss and metrics of the pairs `idx` (policy forward with gradient).
fn batch_loss(
    model: &Model,
    cfg: &DpoConfig,
    pairs: &[EncodedPair],
    refs: &(Vec<f32>, Vec<f32>),
    idx: &[usize],
    fused: bool,
) -> Result<(Tensor, serde_json::Value, Vec<f32>)> {
    let b = idx.len();
    let dev = model.device();
    let seqs: Vec<(&[u32], &[u32])> = idx
        .iter()
        .map(|&i| pairs[i].chosen.as_pair())
        .chain(idx.iter().map(|&i| pairs[i].rejected.as_pair()))
        .collect();
    let (s, lens) = sequence_logps(model, &seqs, policy_forward(cfg, fused))?;
    let (pc, pr) = (s.narrow(0, 0, b)?, s.narrow(0, b, b)?);
    let pick = |v: &[f32]| Tensor::from_vec(idx.iter().map(|&i| v[i]).collect(), b, dev);
    let (rc, rr) = if cfg.loss.loss.uses_reference() {
        (pick(&refs.0)?, pick(&refs.1)?)
    } else {
        (
            Tensor::zeros(b, DType::F32, dev)?,
            Tensor::zeros(b, DType::F32, dev)?,
        )
    };
    let lc = Tensor::from_slice(&lens[..b], b, dev)?;
    let lr = Tensor::from_slice(&lens[b..], b, dev)?;
    let out = loss(
        &cfg.loss,
        &PairLogps {
            chosen: &pc,
            rejected: &pr,
            ref_chosen: &rc,
            ref_rejected: &rr,
            chosen_len: &lc,
            rejected_len: &lr,
        },
    )?;
    let mean_loss = out.losses.mean_all()?;
    let cw: Vec<f32> = out.chosen_rewards.to_vec1()?;
    let cl: Vec<f32> = out.rejected_rewards.to_vec1()?;
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    let margins: Vec<f32> = cw.iter().zip(&cl).map(|(a, b)| a - b).collect();
    let acc: Vec<f32> = margins.iter().map(|&m| f32::from(m > 0.0)).collect();
    let m = serde_json::json!({
        "loss": mean_loss.to_scalar::<f32>()?,
        "rewards/chosen": mean(&cw),
        "rewards/rejected": mean(&cl),
        "rewards/margins": mean(&margins),
        "rewards/accuracies": mean(&acc),
        "logps/chosen": mean(&pc.detach().to_vec1::<f32>()?),
        "logps/rejected": mean(&pr.detach().to_vec1::<f32>()?),
    });
    let per_pair: Vec<f32> = out.losses.detach().to_vec1()?;
    Ok((mean_loss, m, per_pair))
}

/// Implicit-reward accuracy, margin and loss of the policy on `pairs` (no gradient).
pub fn evaluate(
    model: &Model,
    cfg: &DpoConfig,
    pairs: &[EncodedPair],
    refs: &(Vec<f32>, Vec<f32>),
) -> Result<DpoEval> {
    let (mut loss, mut acc, mut margin) = (0f64, 0f64, 0f64);
    let idx: Vec<usize> = (0..pairs.len()).collect();
    for chunk in idx.chunks(cfg.batch_size.max(1)) {
        let (_, m, per_pair) = batch_loss(model, cfg, pairs, refs, chunk, true)?;
        let n = chunk.len() as f64;
        loss += per_pair.iter().map(|&x| x as f64).sum::<f64>();
        acc += m["rewards/accuracies"].as_f64().unwrap_or(0.0) * n;
        margin += m["rewards/margins"].as_f64().unwrap_or(0.0) * n;
    }
    let n = pairs.len().max(1) as f64;
    Ok(DpoEval {
        pairs: pairs.len(),
        loss: loss / n,
        accuracy: acc / n,
        margin: margin / n,
    })
}

fn write_refs(path: &Path, refs: &(Vec<f32>, Vec<f32>)) -> Result<()> {
    let mut t = std::collections::BTreeMap::new();
    t.insert(
        "chosen".to_string(),
        Tensor::from_slice(&refs.0, refs.0.len(), &Device::Cpu)?,
    );
    t.insert(
        "rejected".to_string(),
        Tensor::from_slice(&refs.1, refs.1.len(), &Device::Cpu)?,
    );
    write_safetensors(path, &t)
}

fn read_refs(path: &Path, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let t = read_tensors(path, &Device::Cpu)?;
    let get = |k: &str| -> Result<Vec<f32>> {
        let v: Vec<f32> = t
            .get(k)
            .ok_or_else(|| Error::msg(format!("{}: no tensor `{k}`", path.display())))?
            .to_vec1()?;
        if v.len() != n {
            return Err(Error::msg(format!(
                "{}: `{k}` has {} values for {n} pairs: the data changed since the cache was made",
                path.display(),
                v.len()
            )));
        }
        Ok(v)
    };
    Ok((get("chosen")?, get("rejected")?))
}

/// Prepares a fresh run: adds the `dpo` scope (LoRA runs) and caches the reference log-probs of
/// the training and held-out pairs (checked against single-pair forwards). Returns (train,
/// eval) caches and the largest check difference.
type Refs = (Vec<f32>, Vec<f32>);
fn prepare(
    model: &mut Model,
    cfg: &DpoConfig,
    train_pairs: &[EncodedPair],
    eval_pairs: &[EncodedPair],
    run_dir: &Path,
    resume: bool,
) -> Result<(Refs, Refs, f32)> {
    let scope = cfg.lora_r.map(|_| SCOPE);
    let (tp, ep) = (
        run_dir.join(REF_FILE),
        run_dir.join("reference_logps_eval.safetensors"),
    );
    if !resume {
        if let Some(r) = cfg.lora_r {
            if model.has_scope(SCOPE) {
                return Err(Error::Config(format!(
                    "the model already has a LoRA scope `{SCOPE}`; DPO adds its own"
                )));
            }
            let spec = LoraSpec {
                targets: cfg.lora_targets,
                ..LoraSpec::new(r)
            };
            model.add_scope(SCOPE, spec, cfg.seed)?;
        }
    }
    if !cfg.loss.loss.uses_reference() {
        let z = |n: usize| (vec![0f32; n], vec![0f32; n]);
        return Ok((z(train_pairs.len()), z(eval_pairs.len()), 0.0));
    }
    let fresh = !resume || !tp.exists();
    if fresh && resume && cfg.lora_r.is_none() {
        return Err(Error::msg(format!(
            "{}: missing, and a fully fine-tuned policy is no longer the reference",
            tp.display()
        )));
    }
    let (tr, er) = if fresh {
        let b = cfg.batch_size.max(1);
        let tr = reference_logps(model, scope, train_pairs, b)?;
        let er = reference_logps(model, scope, eval_pairs, b)?;
        if dist::is_main() {
            std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
            write_refs(&tp, &tr)?;
            write_refs(&ep, &er)?;
        }
        (tr, er)
    } else {
        (
            read_refs(&tp, train_pairs.len())?,
            read_refs(&ep, eval_pairs.len())?,
        )
    };
    // the live reference: always at the start; on resume only where LoRA-off is the reference
    let diff = if fresh || cfg.lora_r.is_some() {
        check_reference(model, scope, train_pairs, &tr, cfg.ref_check, &tp)?
    } else {
        0.0
    };
    Ok((tr, er, diff))
}

/// Validates the settings; with `resume`, checks they are the run's and returns its step and
/// its evaluation before the first step.
fn check_resume(
    n: usize,
    cfg: &DpoConfig,
    ck: &Path,
    resume: bool,
) -> Result<(u64, Option<DpoEval>)> {
    if n == 0 || cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(Error::Config(
            "dpo: needs training pairs, and a batch size and epochs of at least 1".into(),
        ));
    }
    if cfg.loss.loss == DpoLoss::Robust && !(0.0..0.5).contains(&cfg.loss.label_smoothing) {
        return Err(Error::Config(
            "dpo: robust DPO's label smoothing (flip rate) must be in [0, 0.5)".into(),
        ));
    }
    if !resume {
        return Ok((0, None));
    }
    let st: TrainerState = read_json(&ck.join(TRAINER_FILE))?;
    if st.cfg != *cfg || st.train_pairs != n {
        return Err(Error::Config(format!(
            "{}: the run was started with other settings or data ({} pairs, {:?}); resume \
             with the same ones",
            ck.join(TRAINER_FILE).display(),
            st.train_pairs,
            st.cfg
        )));
    }
    ddp::check_resume_world(ck, st.world_size, "palm dpo")?;
    tracing::info!("resuming DPO at step {}", st.step);
    Ok((st.step, st.initial_eval.map(DpoEval::from)))
}

/// The trained parameters (the `dpo` scope, or every base weight) and their AdamW, restored
/// from the checkpoint on resume.
type Params = Vec<(String, candle_core::Var)>;
fn optimiser(
    model: &Model,
    cfg: &DpoConfig,
    ck: &Path,
    resume: bool,
) -> Result<(Params, Optimizer)> {
    let params: Params = match cfg.lora_r {
        Some(_) => model
            .vars()
            .with_prefix(&format!("finetune_modules.{SCOPE}.")),
        None => model
            .vars()
            .iter()
            .filter(|(k, _)| !k.starts_with("finetune_modules."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let mut opt = Optimizer::new(
        params.clone(),
        OptimConfig {
            weight_decay: 0.0,
            ..OptimConfig::adamw()
        },
    );
    if resume {
        opt.load_state_file(&ck.join(OPTIMIZER_FILE))?;
    }
    Ok((params, opt))
}

/// Where a run's checkpoint lives: `RUN_DIR/checkpoint` (resume loads the model from there).
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINT_DIR)
}

/// One DPO step's numbers, for progress display.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub accuracy: f64,
}

/// Trains `model` with DPO on `train_pairs`, evaluating on `eval_pairs`, into `run_dir`
/// (metrics.jsonl, metrics.svg, the reference caches, checkpoint/, policy/ with the scope
/// merged, summary.json). With `resume` the model must come from [`checkpoint_dir`]. When
/// `stop` is set (Ctrl-C) the run checkpoints after the current step and returns.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &mut Model,
    train_pairs: &[EncodedPair],
    eval_pairs: &[EncodedPair],
    cfg: &DpoConfig,
    run_dir: &Path,
    resume: bool,
    stop: &std::sync::atomic::AtomicBool,
    mut on_step: impl FnMut(&StepInfo),
) -> Result<DpoSummary> {
    let n = train_pairs.len();
    let t0 = std::time::Instant::now();
    let ck = checkpoint_dir(run_dir);
    // a write killed between its two renames leaves the checkpoint at `checkpoint.old`
    let saved = crate::checkpoint::resolve_dir(&ck);
    let (mut step, resumed_eval) = check_resume(n, cfg, &saved, resume)?;
    let (refs, eval_refs, check) = prepare(model, cfg, train_pairs, eval_pairs, run_dir, resume)?;
    let (params, mut opt) = optimiser(model, cfg, &saved, resume)?;
    let comm = dist::world();
    ddp::check_batch("--batch-size", cfg.batch_size, comm.world_size())?;
    // DDP: every rank starts from rank 0's weights, and has checked the run before rank 0 writes
    ddp::broadcast_params(comm, &params)?;
    comm.barrier()?;
    // rank 0 evaluates (every rank holds the same weights)
    let main = dist::is_main();
    let initial_eval = if !resume && !eval_pairs.is_empty() && main {
        Some(evaluate(model, cfg, eval_pairs, &eval_refs)?)
    } else {
        resumed_eval
    };
    let steps_per_epoch = n.div_ceil(cfg.batch_size);
    let total = (steps_per_epoch * cfg.epochs) as u64;
    let mut log = if main {
        MetricsLog::open(run_dir, if resume { Some(step) } else { None })?
    } else {
        MetricsLog::discard()
    };
    let save = |model: &Model, opt: &Optimizer, step: u64| -> Result<()> {
        if !main {
            return Ok(()); // rank 0 writes for every rank
        }
        write_dir_atomic(&ck, |tmp| {
            model.write_files(tmp)?;
            write_safetensors(&tmp.join(OPTIMIZER_FILE), &opt.state()?)?;
            let st = TrainerState {
                step,
                cfg: cfg.clone(),
                train_pairs: n,
                initial_eval: initial_eval.map(EvalBits::from),
                world_size: dist::world().world_size(),
            };
            write_json_atomic(&tmp.join(TRAINER_FILE), &st)
        })
    };
    let summary = |steps: u64, eval: Option<DpoEval>| DpoSummary {
        train_pairs: n,
        steps,
        initial_eval,
        eval,
        reference_check_max_diff: check,
        seconds: t0.elapsed().as_secs_f64(),
    };
    let plot = |log: &MetricsLog| {
        log.plot(
            &run_dir.join("metrics.svg"),
            "DPO",
            "step",
            &[
                "loss",
                "rewards/margins",
                "rewards/accuracies",
                "eval/rewards/accuracies",
            ],
        )
    };
    while step < total {
        let epoch = step as usize / steps_per_epoch;
        let within = step as usize % steps_per_epoch;
        let order = epoch_order(n, cfg.seed, epoch);
        let idx = &order[within * cfg.batch_size..((within + 1) * cfg.batch_size).min(n)];
        let lr = lr_at(
            step as usize,
            cfg.lr,
            cfg.min_lr,
            cfg.warmup_steps,
            total as usize,
        );
        let batch = Batch {
            pairs: train_pairs,
            refs: &refs,
            idx,
        };
        let (mut m, lv) = update(model, cfg, &batch, &params, &mut opt, step, lr, &ck)?;
        step += 1;
        m["step"] = step.into();
        m["epoch"] = epoch.into();
        let acc = m["rewards/accuracies"].as_f64().unwrap_or(f64::NAN);
        log.log(m)?;
        on_step(&StepInfo {
            step,
            total_steps: total,
            loss: lv,
            accuracy: acc,
        });
        if cfg.eval_every > 0
            && step.is_multiple_of(cfg.eval_every as u64)
            && step < total
            && !eval_pairs.is_empty()
            && main
        {
            let e = evaluate(model, cfg, eval_pairs, &eval_refs)?;
            log.log(eval_record(&e, step))?;
        }
        // a signal that reached one rank stops every rank at the same step
        if dist::any(comm, stop.load(std::sync::atomic::Ordering::Relaxed))? && step < total {
            save(model, &opt, step)?;
            plot(&log)?;
            tracing::warn!(
                "dpo: stopped at step {step} of {total}; checkpoint in {} (resume with --resume)",
                ck.display()
            );
            return Ok(summary(step, None));
        }
        if cfg.save_every > 0 && step.is_multiple_of(cfg.save_every as u64) && step < total {
            save(model, &opt, step)?;
            plot(&log)?;
        }
    }
    let eval = if eval_pairs.is_empty() || !main {
        None
    } else {
        let e = evaluate(model, cfg, eval_pairs, &eval_refs)?;
        // resumed from the final checkpoint (killed before the summary): logged already
        if !crate::train::run::logged_at(&log, step, "eval/loss") {
            log.log(eval_record(&e, step))?;
        }
        Some(e)
    };
    save(model, &opt, step)?;
    if main {
        export_policy(model, cfg, &run_dir.join(POLICY_DIR))?;
    }
    plot(&log)?;
    let summary = summary(step, eval);
    if main {
        write_json_atomic(&run_dir.join(SUMMARY_FILE), &summary)?;
    }
    Ok(summary)
}

/// One optimiser step's pairs: the training pairs, their cached reference log-probs, and the
/// batch's indices into both.
struct Batch<'a> {
    pairs: &'a [EncodedPair],
    refs: &'a (Vec<f32>, Vec<f32>),
    idx: &'a [usize],
}

/// One optimiser step on `batch` (this rank's rows of it under DDP, its mean loss weighted by
/// its share of the pairs): loss and gradients, the all-reduce, the non-finite guard, clipping,
/// AdamW at `lr`. Returns the batch's metrics (with `lr` and `grad_norm`) and its loss.
#[allow(clippy::too_many_arguments)]
fn update(
    model: &Model,
    cfg: &DpoConfig,
    batch: &Batch,
    params: &[(String, candle_core::Var)],
    opt: &mut Optimizer,
    step: u64,
    lr: f64,
    ck: &Path,
) -> Result<(serde_json::Value, f64)> {
    let comm = dist::world();
    let idx = batch.idx;
    let (lo, hi) = ddp::rows_of(idx.len(), comm.rank(), comm.world_size());
    let w = (hi - lo) as f64 / idx.len() as f64;
    let (mut loss_t, mut m, _) =
        batch_loss(model, cfg, batch.pairs, batch.refs, &idx[lo..hi], true)?;
    if comm.world_size() > 1 {
        loss_t = (loss_t * w)?;
    }
    let mut lv = loss_t.to_scalar::<f32>()? as f64;
    if !lv.is_finite() {
        return Err(Error::msg(format!(
            "dpo: loss is {lv} at step {}: stopping (lower the learning rate?)",
            step + 1
        )));
    }
    let mut grads = grads_of(params, &model.backward(&loss_t)?)?;
    crate::train::run::test_poison_gradient(step as usize + 1, &mut grads);
    // DDP: the global gradient, loss and batch metrics, before the guard and the clipping
    ddp::all_reduce_grads(comm, &mut grads)?;
    if comm.world_size() > 1 {
        let mut v = [lv];
        ddp::reduce_means(comm, &mut m, &mut v, w)?;
        lv = v[0];
    }
    if grads_non_finite(&grads) {
        return Err(Error::msg(format!(
            "dpo: non-finite gradient at step {}: stopping (the last checkpoint, if any, is kept \
             in {})",
            step + 1,
            ck.display()
        )));
    }
    let norm = clip_grad_norm(&mut grads, cfg.max_grad_norm);
    opt.step(&grads, lr)?;
    m["lr"] = lr.into();
    m["grad_norm"] = norm.into();
    Ok((m, lv))
}

fn eval_record(e: &DpoEval, step: u64) -> serde_json::Value {
    serde_json::json!({
        "step": step,
        "eval/loss": e.loss,
        "eval/rewards/accuracies": e.accuracy,
        "eval/rewards/margins": e.margin,
    })
}

/// The trained policy as a plain model: the `dpo` scope merged into a copy of the base.
pub fn export_policy(model: &Model, cfg: &DpoConfig, dir: &Path) -> Result<()> {
    if cfg.lora_r.is_none() {
        return model.save(dir);
    }
    crate::rlhf::export_merged(model, &[], SCOPE, dir)
}

/// Reads a run's config (for resume and `palm dpo eval`).
pub fn run_config(run_dir: &Path) -> Result<DpoConfig> {
    let ck = crate::checkpoint::resolve_dir(&checkpoint_dir(run_dir));
    let st: TrainerState = read_json(&ck.join(TRAINER_FILE))?;
    Ok(st.cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PalmConfig;
    use crate::model::Palm;
    use crate::rlhf::preference_data::EncodedSeq;

    fn v(x: &[f32]) -> Tensor {
        Tensor::from_slice(x, x.len(), &Device::Cpu).unwrap()
    }

    fn run(
        cfg: &LossConfig,
        c: &[f32],
        r: &[f32],
        rc: &[f32],
        rr: &[f32],
        lens: &[f32],
    ) -> Vec<f32> {
        let (c, r, rc, rr, l) = (v(c), v(r), v(rc), v(rr), v(lens));
        let out = loss(
            cfg,
            &PairLogps {
                chosen: &c,
                rejected: &r,
                ref_chosen: &rc,
                ref_rejected: &rr,
                chosen_len: &l,
                rejected_len: &l,
            },
        )
        .unwrap();
        out.losses.to_vec1().unwrap()
    }

    #[test]
    fn sigmoid_is_ln2_at_initialisation_and_robust_eps0_equals_it() {
        let p = [-12.0, -3.5, -40.0];
        let q = [-9.0, -7.25, -41.0];
        let cfg = LossConfig::default();
        for x in run(&cfg, &p, &q, &p, &q, &[3.0, 3.0, 3.0]) {
            assert!((x - std::f32::consts::LN_2).abs() < 1e-6, "{x}");
        }
        // away from initialisation: hand value -log s(0.1 * ((-1 + 2) - (-3 + 2.5))) = softplus(-0.15)
        let l = run(&cfg, &[-1.0], &[-3.0], &[-2.0], &[-2.5], &[1.0])[0];
        assert!(
            (l as f64 - (1.0 + (-0.15f64).exp()).ln()).abs() < 1e-6,
            "{l}"
        );
        let robust = LossConfig {
            loss: DpoLoss::Robust,
            ..cfg
        };
        let (a, b) = ([-1.0, -5.0, 2.0], [-3.0, -4.0, -1.0]);
        let zeros = [0.0; 3];
        assert_eq!(
            run(&cfg, &a, &b, &zeros, &zeros, &[1.0; 3]),
            run(&robust, &a, &b, &zeros, &zeros, &[1.0; 3])
        );
        // robust with e = 0.1 at z: [-(0.9) log s(z) + 0.1 log s(-z)] / 0.8, z = 0.1 * 2
        let r = LossConfig {
            label_smoothing: 0.1,
            ..robust
        };
        let got = run(&r, &[-1.0], &[-3.0], &[0.0], &[0.0], &[1.0])[0] as f64;
        let ls = |x: f64| -(1.0 + (-x).exp()).ln();
        let want = (-0.9 * ls(0.2) + 0.1 * ls(-0.2)) / 0.8;
        assert!((got - want).abs() < 1e-6, "{got} {want}");
    }

    #[test]
    fn ipo_optimum_is_at_one_over_two_beta() {
        // the loss is minimal (0) where the length-normalised log-ratio gap is 1/(2 beta)
        let cfg = LossConfig {
            loss: DpoLoss::Ipo,
            beta: 0.25,
            ..LossConfig::default()
        };
        // lengths 4: gap d = (c - r)/4 with refs 0; d = 2 at c - r = 8
        let at = |gap: f32| run(&cfg, &[gap - 10.0], &[-10.0], &[0.0], &[0.0], &[4.0])[0];
        assert!(at(8.0).abs() < 1e-6);
        assert!(at(7.0) > 0.0 && at(9.0) > 0.0);
        assert!((at(6.0) - 0.25).abs() < 1e-6); // (1.5 - 2)^2
    }

    #[test]
    fn hinge_simpo_orpo_hand_computed() {
        let hinge = LossConfig {
            loss: DpoLoss::Hinge,
            beta: 0.5,
            ..LossConfig::default()
        };
        // z = 0.5 * 1 = 0.5 -> 0.5; z = 0.5 * 4 = 2 -> 0
        let h = run(
            &hinge,
            &[0.0, 0.0],
            &[-1.0, -4.0],
            &[0.0; 2],
            &[0.0; 2],
            &[1.0; 2],
        );
        assert_eq!(h, vec![0.5, 0.0]);
        let simpo = LossConfig {
            loss: DpoLoss::Simpo,
            beta: 2.0,
            simpo_gamma: 0.5,
            ..LossConfig::default()
        };
        // mean log-probs -1 and -1.5 (length 2): s = 2 * 0.5 - 0.5 = 0.5; refs are ignored
        let s = run(&simpo, &[-2.0], &[-3.0], &[9.0], &[-9.0], &[2.0])[0] as f64;
        assert!((s - (1.0 + (-0.5f64).exp()).ln()).abs() < 1e-6, "{s}");
        let orpo = LossConfig {
            loss: DpoLoss::Orpo,
            beta: 0.1,
            ..LossConfig::default()
        };
        let (aw, al) = (-0.5f64, -1.5f64);
        let lo = (aw - al) - ((1.0 - aw.exp()).ln() - (1.0 - al.exp()).ln());
        let want = -aw + 0.1 * (1.0 + (-lo).exp()).ln();
        let got = run(&orpo, &[-1.0], &[-3.0], &[0.0], &[0.0], &[2.0])[0] as f64;
        assert!((got - want).abs() < 1e-5, "{got} {want}");
    }

    fn tiny() -> Model {
        let cfg = PalmConfig {
            heads: 2,
            dim_head: 8,
            ..PalmConfig::new(16, 16, 1)
        };
        Model::Palm(Palm::new(&cfg, 3, &Device::Cpu).unwrap())
    }

    /// The chosen response contains token 7, the rejected token 3; prompts of unequal lengths.
    fn pairs(n: usize) -> Vec<EncodedPair> {
        (0..n)
            .map(|i| {
                let p: Vec<u32> = (0..1 + i % 3).map(|k| 1 + ((i + k) % 5) as u32).collect();
                let fill = 8 + (i % 4) as u32;
                let seq = |t: u32, len: usize| EncodedSeq {
                    prompt: p.clone(),
                    response: [vec![fill; len], vec![t, 0]].concat(),
                };
                EncodedPair {
                    chosen: seq(7, 1 + i % 2),
                    rejected: seq(3, 2 - i % 2),
                }
            })
            .collect()
    }

    #[test]
    fn cached_reference_equals_live_and_first_loss_is_ln2() {
        let mut m = tiny();
        m.add_scope(SCOPE, LoraSpec::new(4), 0).unwrap();
        let ps = pairs(6);
        let cache = reference_logps(&m, Some(SCOPE), &ps, 4).unwrap();
        // live: the base model without any scope, pair by pair
        for (i, p) in ps.iter().enumerate() {
            let (s, _) = sequence_logps(&m, &[p.chosen.as_pair()], Forward::default()).unwrap();
            let live = s.to_vec1::<f32>().unwrap()[0];
            assert!(
                (live - cache.0[i]).abs() < 1e-5,
                "{i}: {live} vs {}",
                cache.0[i]
            );
        }
        let worst = check_reference(&m, Some(SCOPE), &ps, &cache, 6, Path::new("x")).unwrap();
        assert!(worst < 1e-5);
        // a wrong cache is refused
        let mut bad = cache.clone();
        bad.1[0] += 1.0;
        assert!(check_reference(&m, Some(SCOPE), &ps, &bad, 6, Path::new("x")).is_err());
        // at initialisation (LoRA B = 0) the policy is the reference: loss ln 2, accuracy 0
        let cfg = DpoConfig::default();
        let (l, mt, _) = batch_loss(&m, &cfg, &ps, &cache, &[0, 1, 2], true).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - std::f32::consts::LN_2).abs() < 1e-5);
        assert_eq!(mt["rewards/accuracies"], 0.0);
    }

    fn run_dpo(
        dir: &Path,
        model: &mut Model,
        resume: bool,
        stop_at: u64,
    ) -> (DpoSummary, Vec<f32>) {
        let (train_p, eval_p) = (pairs(16), pairs(20)[16..].to_vec());
        let cfg = DpoConfig {
            epochs: 3,
            batch_size: 4,
            lr: 2e-2,
            min_lr: 2e-3,
            loss: LossConfig {
                beta: 0.5,
                ..LossConfig::default()
            },
            ..Default::default()
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        let s = train(model, &train_p, &eval_p, &cfg, dir, resume, &stop, |i| {
            if i.step == stop_at {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .unwrap();
        let w: Vec<f32> = model
            .vars()
            .with_prefix("finetune_modules.")
            .iter()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect();
        (s, w)
    }

    #[test]
    fn dpo_learns_and_resumes_exactly() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (whole, w_whole) = run_dpo(a.path(), &mut tiny(), false, 0);
        // the implicit reward learns the rule on held-out pairs
        let (e0, e1) = (whole.initial_eval.unwrap(), whole.eval.unwrap());
        assert_eq!(e0.accuracy, 0.0);
        assert!((e0.loss - std::f64::consts::LN_2).abs() < 1e-5);
        assert!(e1.accuracy == 1.0 && e1.loss < 0.6, "{e1:?}");
        // stopped after step 5, resumed from the checkpoint: the same run, bit for bit
        let (part, _) = run_dpo(b.path(), &mut tiny(), false, 5);
        assert_eq!(part.steps, 5);
        let mut m = crate::load::load_model(&checkpoint_dir(b.path()), &Device::Cpu).unwrap();
        let (resumed, w_resumed) = run_dpo(b.path(), &mut m, true, 0);
        assert_eq!(resumed.steps, 12);
        assert_eq!(w_whole, w_resumed);
        assert_eq!(whole.eval.unwrap().loss, resumed.eval.unwrap().loss);
        let losses = |d: &Path| -> Vec<f64> {
            std::fs::read_to_string(d.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .filter_map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64()
                })
                .collect()
        };
        assert_eq!(losses(a.path()), losses(b.path()));
        assert_eq!(losses(a.path()).len(), 12);
    }
}
