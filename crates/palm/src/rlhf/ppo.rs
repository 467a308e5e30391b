//! PPO for language models (the standard recipe of InstructGPT / TRL / OpenRLHF), and the
//! original palm-rlhf-pytorch variant as [`Recipe::PalmRlhfPytorch`].
//!
//! One step of [`PpoTrainer::step`]:
//! 1. draw a batch of prompts;
//! 2. roll out: sample responses with the actor (KV cache), record per-token log-probs under the
//!    policy and the frozen reference (same base, LoRA off) and the critic's values;
//! 3. score the responses (learned reward model or any [`Scorer`]), and the gold score if a gold
//!    scorer is given (logged, never optimised);
//! 4. shape scores (normalisation fitted on the first batch, missing-EOS penalty, clipping);
//! 5. rewards and advantages: standard = per-token -beta*KL_t + score at the last token, GAE,
//!    whitening over valid tokens; original = sequence reward R = score - beta*sum_t KL_t and
//!    advantage normalize(R - V) per sequence;
//! 6. several epochs over shuffled minibatches: clipped policy loss minus the entropy bonus
//!    (actor LoRA), clipped value loss (critic LoRA + value head), each with global-norm clipping;
//! 7. adapt beta (adaptive KL controller) and log metrics.
//!
//! Differences from the original `ppo.py`, all deliberate: the KL is against the frozen reference
//! (the original's is between old and new policy, ~1e-8), in the reward, from the sampled tokens
//! only; log-probs are aligned with left-padded prompts; means are masked (the original averages
//! over padding); the HL-Gauss value clipping masks the gradient of clipped samples (the original
//! passes a scalar to a loss that expects logits); batched rollouts with a KV cache.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::config::LoraSpec;
use crate::dist::{self, ddp};
use crate::error::{Error, Result};
use crate::model::{Forward, Model};
use crate::params::{read_tensors, write_safetensors};
use crate::rlhf::advantage::{self, ScoreShaping};
use crate::rlhf::kl::{KlController, KlEstimator};
use crate::rlhf::reward::{HeadKind, Pooling, RewardModel};
use crate::rlhf::rollout::{
    self, take_rows, Actors, Critic, Layout, Rollout, RolloutConfig, Scored, ACTOR, CRITIC,
};
use crate::rlhf::scorer::Scorer;
use crate::rlhf::value::{ValueHead, ValueKind};
use crate::rng::{self, PalmRng, RngState};
use crate::train::metrics::MetricsLog;
use crate::train::optim::{self, OptimConfig, Optimizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Recipe {
    /// Token-level KL reward, GAE, whitened advantages, scalar token-level critic.
    #[default]
    Standard,
    /// The original's: sequence-level advantage normalize(R - V), pooled 6-bin HL-Gauss critic
    /// on [0, 5], KL (to the reference) in the reward, clip 0.2, value clip 0.4, entropy 0.01,
    /// KL weight 0.1.
    PalmRlhfPytorch,
}

/// What the policy trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ActorMode {
    /// A LoRA scope `actor` on the base; the reference is the same base with LoRA off (no copy),
    /// the critic a scope `critic` on the same base.
    #[default]
    Lora,
    /// Every base weight; the reference is a separate frozen copy of the initial model, which
    /// also carries the critic's LoRA scope (so the critic does not drift with the policy).
    Full,
}

/// How the critic (its LoRA scope and value head) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CriticInit {
    /// A fresh scope (LoRA B = 0) and a zero value head: every value starts at 0.
    #[default]
    Zeros,
    /// A copy of the reward model: its LoRA scope (spec and weights) becomes the `critic` scope,
    /// its scalar head the value head and its segment embeddings the critic's, so the first
    /// values are the reward model's scores of each prefix. Needs a reward model with a LoRA
    /// scope, last-token pooling and a scalar head on the policy's own base weights, and the
    /// standard recipe's token-level scalar critic.
    Reward,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    pub recipe: Recipe,
    /// LoRA actor (default) or full fine-tuning against a frozen copy.
    pub actor: ActorMode,
    pub critic_init: CriticInit,
    pub seed: u64,
    /// PPO iterations (rollout + update).
    pub steps: usize,
    /// Prompts per rollout.
    pub batch_size: usize,
    pub minibatch_size: usize,
    /// Passes over each rollout.
    pub epochs: usize,
    /// Fixed maximum response length.
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub actor_lr: f64,
    pub critic_lr: f64,
    /// Global gradient-norm clip (per optimiser).
    pub max_grad_norm: f64,
    pub clip_range: f32,
    pub clip_range_value: f32,
    pub ent_coef: f32,
    pub gamma: f32,
    pub lam: f32,
    pub kl_estimator: KlEstimator,
    /// Initial (or fixed) KL coefficient beta.
    pub kl_coef: f64,
    /// Target sequence KL for the adaptive controller (None: fixed beta).
    pub kl_target: Option<f64>,
    pub kl_horizon: f64,
    /// Subtracted from the score of responses that never emit EOS.
    pub missing_eos_penalty: f32,
    /// Scores clipped to [-clip, clip] after shaping.
    pub reward_clip: Option<f32>,
    /// Fit (bias, gain) on the first rollout's scores so they have mean 0 and std 1.
    pub normalize_scores: bool,
    /// For the HL-Gauss critic: scores are shifted by this before entering the reward, so
    /// normalised scores land inside the critic's support.
    pub score_offset: f32,
    pub lora_r: usize,
    pub critic_lora_r: usize,
    pub value: ValueKind,
    pub pooled_values: bool,
    /// Steps at the start that train the critic only.
    pub critic_warmup_steps: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self::for_recipe(Recipe::Standard)
    }
}

impl PpoConfig {
    pub fn for_recipe(recipe: Recipe) -> Self {
        let standard = Self {
            recipe,
            actor: ActorMode::Lora,
            critic_init: CriticInit::Zeros,
            seed: 0,
            steps: 100,
            batch_size: 64,
            minibatch_size: 16,
            epochs: 4,
            max_new_tokens: 16,
            temperature: 1.0,
            actor_lr: 1e-3,
            critic_lr: 1e-3,
            max_grad_norm: 1.0,
            clip_range: 0.2,
            clip_range_value: 0.2,
            ent_coef: 0.0,
            gamma: 1.0,
            lam: 0.95,
            kl_estimator: KlEstimator::K1,
            kl_coef: 0.05,
            kl_target: None,
            kl_horizon: 10_000.0,
            missing_eos_penalty: 1.0,
            reward_clip: Some(5.0),
            normalize_scores: true,
            score_offset: 0.0,
            lora_r: 8,
            critic_lora_r: 8,
            value: ValueKind::Scalar,
            pooled_values: false,
            critic_warmup_steps: 0,
            save_every: 0,
        };
        match recipe {
            Recipe::Standard => standard,
            Recipe::PalmRlhfPytorch => Self {
                clip_range: 0.2,
                clip_range_value: 0.4,
                ent_coef: 0.01,
                kl_coef: 0.1,
                value: ValueKind::original_hl_gauss(),
                pooled_values: true,
                score_offset: 2.5,
                ..standard
            },
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.batch_size == 0 || self.minibatch_size == 0 || self.epochs == 0 {
            return bad("ppo: batch_size, minibatch_size and epochs must be positive".into());
        }
        if self.minibatch_size > self.batch_size {
            return bad(format!(
                "ppo: minibatch_size {} exceeds batch_size {}",
                self.minibatch_size, self.batch_size
            ));
        }
        if self.max_new_tokens == 0 {
            return bad("ppo: max_new_tokens must be at least 1".into());
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return bad("ppo: temperature must be positive (rollouts sample)".into());
        }
        if self.lora_r == 0 || self.critic_lora_r == 0 {
            return bad("ppo: LoRA ranks must be positive".into());
        }
        if self.recipe == Recipe::PalmRlhfPytorch && !self.pooled_values {
            return bad("ppo: the palm-rlhf-pytorch recipe uses pooled values".into());
        }
        if self.critic_init == CriticInit::Reward
            && (self.value != ValueKind::Scalar || self.pooled_values)
        {
            return bad(format!(
                "ppo: critic_init reward copies a reward model's scalar last-token head, which \
                 only maps exactly onto a token-level scalar critic; this config's critic is {} \
                 ({:?} values){}",
                if self.pooled_values {
                    "pooled"
                } else {
                    "token-level"
                },
                self.value,
                if self.recipe == Recipe::PalmRlhfPytorch {
                    ": use --critic-init zeros with the palm-rlhf-pytorch recipe"
                } else {
                    ""
                }
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Losses (pure functions of tensors)

/// sum(x * mask) / max(sum(mask), 1).
pub fn masked_mean_t(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let n = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
    Ok(((x * mask)?.sum_all()? / n as f64)?)
}

fn masked_mean_scalar(x: &Tensor, mask: &Tensor) -> Result<f32> {
    Ok(masked_mean_t(&x.to_dtype(DType::F32)?, mask)?.to_scalar::<f32>()?)
}

/// The clipped surrogate: ratio = exp(logp - old), loss = masked mean of
/// max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)). Also returns clipfrac (share of tokens
/// where the clipped term is the larger) and approx-KL 0.5 * mean((logp - old)^2).
pub fn clipped_policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    clip: f32,
) -> Result<(Tensor, f32, f32)> {
    let log_ratio = (logp - old_logp)?;
    let ratio = log_ratio.exp()?;
    let pg1 = (adv.neg()? * &ratio)?;
    let pg2 = (adv.neg()? * ratio.clamp(1.0 - clip, 1.0 + clip)?)?;
    let loss = masked_mean_t(&pg1.maximum(&pg2)?, mask)?;
    let clipfrac = masked_mean_scalar(&pg2.gt(&pg1)?, mask)?;
    let approxkl = 0.5 * masked_mean_scalar(&log_ratio.sqr()?, mask)?;
    Ok((loss, clipfrac, approxkl))
}

/// The clipped value loss: 0.5 * masked mean of max((V - R)^2, (V_old + clip(V - V_old, +-eps) - R)^2),
/// and the share of elements where the clipped term is the larger.
pub fn clipped_value_loss(
    v: &Tensor,
    old_v: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip: f32,
) -> Result<(Tensor, f32)> {
    let v_clipped = (old_v + (v - old_v)?.clamp(-clip, clip)?)?;
    let l1 = (v - returns)?.sqr()?;
    let l2 = (v_clipped - returns)?.sqr()?;
    let loss = (masked_mean_t(&l1.maximum(&l2)?, mask)? * 0.5)?;
    let clipfrac = masked_mean_scalar(&l2.gt(&l1)?, mask)?;
    Ok((loss, clipfrac))
}

/// HL-Gauss value loss with PPO value clipping: the cross-entropy of elements whose clipped
/// squared error exceeds the unclipped one (where PPO's max picks the clipped branch, whose
/// gradient is zero) is dropped. `logits` [N, K], `v`/`old_v`/`returns`/`mask` [N].
pub fn clipped_hl_gauss_loss(
    head: &ValueHead,
    logits: &Tensor,
    v: &Tensor,
    old_v: &Tensor,
    returns: &[f32],
    mask: &Tensor,
    clip: f32,
) -> Result<(Tensor, f32)> {
    let ce = head.hl_loss(logits, returns)?; // [N]
    let r = Tensor::from_slice(returns, returns.len(), v.device())?;
    let v = v.detach();
    let v_clipped = (old_v + (&v - old_v)?.clamp(-clip, clip)?)?;
    let l1 = (&v - &r)?.sqr()?;
    let l2 = (v_clipped - &r)?.sqr()?;
    let clipped = l2.gt(&l1)?.to_dtype(DType::F32)?;
    let keep = (mask * (1.0 - &clipped)?)?;
    let n = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
    let loss = ((ce * keep)?.sum_all()? / n as f64)?;
    let clipfrac = masked_mean_scalar(&clipped, mask)?;
    Ok((loss, clipfrac))
}

// ---------------------------------------------------------------------------------------------
// Trainer

/// Per-token (or per-sequence) training targets of one rollout.
#[derive(Debug, Clone)]
struct Targets {
    /// [B, R] advantages (0 on pads).
    adv: Vec<f32>,
    /// [B, R] returns, or [B] for a pooled critic.
    returns: Vec<f32>,
}

/// Everything a PPO run carries from step to step; [`PpoTrainer::save`] writes all of it.
pub struct PpoTrainer {
    pub cfg: PpoConfig,
    /// The policy. With a LoRA actor also the critic trunk (scope `critic`) and, with LoRA
    /// off, the reference; with full fine-tuning its base weights are what trains.
    pub model: Model,
    /// Full fine-tuning only: the frozen copy of the initial policy, the reference and the
    /// critic's trunk (scope `critic`). Never given to an optimiser, except its critic scope.
    pub frozen: Option<Model>,
    pub critic: Critic,
    actor_opt: Optimizer,
    critic_opt: Optimizer,
    pub kl: KlController,
    rng: PalmRng,
    /// Steps completed.
    pub step: usize,
    /// (bias, gain) fitted on the first rollout's scores.
    pub score_norm: Option<(f32, f32)>,
}

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    kl: KlController,
    rng: RngState,
    score_norm: Option<(f32, f32)>,
    config: PpoConfig,
    /// Processes the run was trained with (`mpirun -n N`; 1 for older runs).
    #[serde(default = "one")]
    world_size: usize,
}

fn one() -> usize {
    1
}

const STATE_FILE: &str = "trainer.json";
const HEAD_FILE: &str = "value_head.safetensors";
const ACTOR_OPT_FILE: &str = "optimizer_actor.safetensors";
const CRITIC_OPT_FILE: &str = "optimizer_critic.safetensors";
/// Full fine-tuning: the frozen copy (with the critic scope) inside a checkpoint.
const FROZEN_DIR: &str = "frozen";
const SEGMENT_NAMES: [&str; 2] = ["critic.prompt_embed", "critic.response_embed"];

/// A copy of `model` that shares no storage with it (written and read back).
fn deep_copy(model: &Model) -> Result<Model> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("palm-ppo-copy-{}-{n}", std::process::id()));
    model.save(&tmp)?;
    let copy = crate::load::load_model(&tmp, model.device());
    let _ = std::fs::remove_dir_all(&tmp);
    copy
}

/// The LoRA spec of `scope` in `model`, if it has one.
fn scope_spec(model: &Model, scope: &str) -> Option<LoraSpec> {
    match model {
        Model::Palm(m) => m.scopes.get(scope).map(|s| s.spec.clone()),
        Model::Hf(m) => m.scopes.get(scope).map(|s| s.spec.clone()),
    }
}

/// The base (non-LoRA) weights of a model by name, as f32 values.
fn base_weights(model: &Model) -> Result<Vec<(String, Vec<f32>)>> {
    model
        .vars()
        .iter()
        .filter(|(k, _)| !k.starts_with("finetune_modules."))
        .map(|(k, v)| {
            let t = v.as_tensor().to_dtype(DType::F32)?.flatten_all()?;
            Ok((k.clone(), t.to_vec1::<f32>()?))
        })
        .collect()
}

/// Adds the `critic` scope to `trunk` as a copy of the reward model's LoRA scope and returns a
/// value head (and segment embeddings) copied from its head: the critic's value at a position
/// is then the reward model's score of the sequence ending there. Refuses, naming the reason,
/// a reward model that is not a LoRA scope + scalar last-token head on `trunk`'s base weights.
fn critic_from_reward(
    trunk: &mut Model,
    rm: &RewardModel,
    cfg: &PpoConfig,
) -> Result<(ValueHead, Option<(Var, Var)>)> {
    let refuse = |why: String| Err(Error::Config(format!("--critic-init reward: {why}")));
    let Some(scope) = rm.cfg.scope.as_deref() else {
        return refuse(
            "the reward model was fully fine-tuned; only a reward model that is a LoRA scope on \
             the policy's base weights can become the critic"
                .into(),
        );
    };
    if rm.cfg.head != HeadKind::Scalar {
        return refuse("the reward model's head is binned; the critic's head is a scalar".into());
    }
    if rm.cfg.pooling != Pooling::LastToken {
        return refuse(format!(
            "the reward model pools with {:?}; the token-level critic reads each position (last-token pooling is needed)",
            rm.cfg.pooling
        ));
    }
    if cfg.value != ValueKind::Scalar || cfg.pooled_values {
        return refuse("the critic must be token-level and scalar (standard recipe)".into());
    }
    let spec = scope_spec(&rm.trunk, scope).ok_or_else(|| {
        Error::Config(format!(
            "--critic-init reward: the reward model has no LoRA scope `{scope}`"
        ))
    })?;
    let (ours, theirs) = (base_weights(trunk)?, base_weights(&rm.trunk)?);
    let names = |w: &[(String, Vec<f32>)]| w.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    if names(&ours) != names(&theirs) {
        return refuse(
            "the reward model's trunk has other parameters than the policy (a different model)"
                .into(),
        );
    }
    if let Some((name, _)) = ours
        .iter()
        .zip(&theirs)
        .find(|(a, b)| a.1 != b.1)
        .map(|x| x.0)
    {
        return refuse(format!(
            "the reward model's base weights differ from the policy's (first: `{name}`); it must \
             be trained as a LoRA scope on the same model the policy starts from"
        ));
    }
    trunk.add_scope(CRITIC, spec, cfg.seed)?;
    let from = format!("finetune_modules.{scope}.");
    for (name, var) in rm.trunk.vars().with_prefix(&from) {
        let to = format!("finetune_modules.{CRITIC}.{}", &name[from.len()..]);
        let dst = trunk.vars().get(&to).ok_or_else(|| {
            Error::msg(format!("critic scope has no `{to}` to copy `{name}` into"))
        })?;
        if dst.shape() != var.shape() {
            return refuse(format!(
                "`{name}` has shape {:?} but the critic's `{to}` has {:?}",
                var.shape(),
                dst.shape()
            ));
        }
        dst.set(&var.as_tensor().to_dtype(dst.dtype())?)?;
    }
    let get = |n: &str| -> Result<Tensor> {
        Ok(rm
            .head_vars
            .get(n)
            .ok_or_else(|| Error::msg(format!("reward model has no `{n}`")))?
            .as_tensor()
            .detach()
            .copy()?)
    };
    let head = ValueHead::new(trunk.dim(), ValueKind::Scalar, trunk.device())?;
    head.weight.set(&get("to_pred.0.weight")?)?;
    let segments = if rm.cfg.segment_embeds {
        Some((
            Var::from_tensor(&get("prompt_embed")?)?,
            Var::from_tensor(&get("response_embed")?)?,
        ))
    } else {
        None
    };
    Ok((head, segments))
}

fn optim_cfg() -> OptimConfig {
    OptimConfig {
        weight_decay: 0.0,
        betas: (0.9, 0.999),
        ..OptimConfig::adamw()
    }
}

impl PpoTrainer {
    /// Starts a run from a policy (SFT) model: with a LoRA actor adds the `actor` and `critic`
    /// LoRA scopes; with full fine-tuning makes a frozen copy of the model (the reference) and
    /// adds the `critic` scope to the copy. The value head starts at zero (`critic_init` must be
    /// `zeros`; see [`PpoTrainer::with_reward_model`]).
    pub fn new(model: Model, cfg: PpoConfig) -> Result<Self> {
        Self::with_reward_model(model, cfg, None)
    }

    /// As [`PpoTrainer::new`]; with `critic_init: reward` the critic (scope and value head) is a
    /// copy of `rm`, which must then be given.
    pub fn with_reward_model(
        mut model: Model,
        cfg: PpoConfig,
        rm: Option<&RewardModel>,
    ) -> Result<Self> {
        cfg.validate()?;
        for s in [ACTOR, CRITIC] {
            if model.has_scope(s) {
                return Err(Error::Config(format!(
                    "the policy model already has a LoRA scope `{s}`; PPO adds its own"
                )));
            }
        }
        let mut frozen = match cfg.actor {
            ActorMode::Lora => {
                model.add_scope(ACTOR, LoraSpec::new(cfg.lora_r), cfg.seed)?;
                None
            }
            ActorMode::Full => Some(deep_copy(&model)?),
        };
        let trunk = match frozen.as_mut() {
            Some(f) => f,
            None => &mut model,
        };
        let (head, segments) =
            match (cfg.critic_init, rm) {
                (CriticInit::Zeros, _) => {
                    trunk.add_scope(CRITIC, LoraSpec::new(cfg.critic_lora_r), cfg.seed)?;
                    (
                        ValueHead::new(trunk.dim(), cfg.value, trunk.device())?,
                        None,
                    )
                }
                (CriticInit::Reward, Some(rm)) => critic_from_reward(trunk, rm, &cfg)?,
                (CriticInit::Reward, None) => return Err(Error::Config(
                    "ppo: critic_init reward needs the reward model (a `palm reward train` model)"
                        .into(),
                )),
            };
        Self::assemble(model, frozen, head, segments, cfg)
    }

    fn assemble(
        model: Model,
        frozen: Option<Model>,
        head: ValueHead,
        segments: Option<(Var, Var)>,
        cfg: PpoConfig,
    ) -> Result<Self> {
        let actor_params = match cfg.actor {
            ActorMode::Lora => model
                .vars()
                .with_prefix(&format!("finetune_modules.{ACTOR}.")),
            ActorMode::Full => model
                .vars()
                .iter()
                .filter(|(k, _)| !k.starts_with("finetune_modules."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let mut critic_params = frozen
            .as_ref()
            .unwrap_or(&model)
            .vars()
            .with_prefix(&format!("finetune_modules.{CRITIC}."));
        critic_params.extend(head.params());
        if let Some((p, r)) = &segments {
            critic_params.push((SEGMENT_NAMES[0].into(), p.clone()));
            critic_params.push((SEGMENT_NAMES[1].into(), r.clone()));
        }
        let critic = Critic {
            head,
            scope: CRITIC.into(),
            pooled: cfg.pooled_values,
            segments,
        };
        // data-parallel: every rank starts from rank 0's trained weights
        let comm = dist::world();
        ddp::check_batch("--batch-size", cfg.batch_size, comm.world_size())?;
        ddp::broadcast_params(comm, &actor_params)?;
        ddp::broadcast_params(comm, &critic_params)?;
        Ok(Self {
            kl: match cfg.kl_target {
                Some(t) => KlController::adaptive(cfg.kl_coef, t, cfg.kl_horizon),
                None => KlController::fixed(cfg.kl_coef),
            },
            rng: rng::stream(cfg.seed, 0x9907),
            actor_opt: Optimizer::new(actor_params, optim_cfg()),
            critic_opt: Optimizer::new(critic_params, optim_cfg()),
            cfg,
            model,
            frozen,
            critic,
            step: 0,
            score_norm: None,
        })
    }

    /// The model that is the reference (LoRA off) and the critic's trunk.
    pub fn frozen_model(&self) -> &Model {
        self.frozen.as_ref().unwrap_or(&self.model)
    }

    /// The policy's LoRA scope (`actor`), or none when the base weights are the policy.
    pub fn policy_scope(&self) -> Option<&'static str> {
        match self.cfg.actor {
            ActorMode::Lora => Some(ACTOR),
            ActorMode::Full => None,
        }
    }

    /// Policy, reference and critic, for rollouts.
    pub fn actors(&self) -> Actors<'_> {
        Actors {
            policy: &self.model,
            policy_scope: self.policy_scope(),
            frozen: self.frozen_model(),
            critic: Some(&self.critic),
        }
    }

    /// Writes the whole PPO state into `dir` atomically: model (base + scopes; with full
    /// fine-tuning the trained base, and the frozen copy with the critic scope in `frozen/`),
    /// value head, both optimisers, KL controller, RNG, score normalisation, config.
    /// Only rank 0 writes in a data-parallel run (every rank holds the same state).
    pub fn save(&self, dir: &Path) -> Result<()> {
        if !dist::is_main() {
            return Ok(());
        }
        checkpoint::write_dir_atomic(dir, |tmp| {
            self.model.write_files(tmp)?;
            if let Some(f) = &self.frozen {
                let d = tmp.join(FROZEN_DIR);
                std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
                f.write_files(&d)?;
            }
            let mut head = self.critic.head.tensors();
            if let Some((p, r)) = &self.critic.segments {
                head.insert(SEGMENT_NAMES[0].into(), p.as_tensor().clone());
                head.insert(SEGMENT_NAMES[1].into(), r.as_tensor().clone());
            }
            write_safetensors(&tmp.join(HEAD_FILE), &head)?;
            write_safetensors(&tmp.join(ACTOR_OPT_FILE), &self.actor_opt.state()?)?;
            write_safetensors(&tmp.join(CRITIC_OPT_FILE), &self.critic_opt.state()?)?;
            checkpoint::write_json_atomic(
                &tmp.join(STATE_FILE),
                &TrainerState {
                    step: self.step,
                    kl: self.kl,
                    rng: rng::save_state(&self.rng),
                    score_norm: self.score_norm,
                    config: self.cfg.clone(),
                    world_size: dist::world().world_size(),
                },
            )
        })
    }

    /// Restores a run saved by [`PpoTrainer::save`]. `steps` may extend the run.
    pub fn resume(dir: &Path, device: &Device, steps: Option<usize>) -> Result<Self> {
        let dir = checkpoint::resolve_dir(dir);
        let st: TrainerState = checkpoint::read_json(&dir.join(STATE_FILE))?;
        ddp::check_resume_world(&dir, st.world_size, "palm ppo")?;
        let model = crate::load::load_model(&dir, device)?;
        let mut cfg = st.config;
        let frozen = match cfg.actor {
            ActorMode::Lora => None,
            ActorMode::Full => Some(crate::load::load_model(&dir.join(FROZEN_DIR), device)?),
        };
        let need: &[(&Model, &str)] = match &frozen {
            None => &[(&model, ACTOR), (&model, CRITIC)],
            Some(f) => &[(f, CRITIC)],
        };
        for (m, s) in need {
            if !m.has_scope(s) {
                return Err(Error::msg(format!(
                    "{}: checkpoint has no `{s}` LoRA scope: not a PPO checkpoint",
                    dir.display()
                )));
            }
        }
        if let Some(s) = steps {
            cfg.steps = s;
        }
        let head = ValueHead::new(model.dim(), cfg.value, device)?;
        let hp = dir.join(HEAD_FILE);
        let ht = read_tensors(&hp, device)?;
        head.load(&ht, &hp)?;
        let segments = match (ht.get(SEGMENT_NAMES[0]), ht.get(SEGMENT_NAMES[1])) {
            (Some(p), Some(r)) => Some((Var::from_tensor(p)?, Var::from_tensor(r)?)),
            _ => None,
        };
        let mut t = Self::assemble(model, frozen, head, segments, cfg)?;
        t.actor_opt.load_state_file(&dir.join(ACTOR_OPT_FILE))?;
        t.critic_opt.load_state_file(&dir.join(CRITIC_OPT_FILE))?;
        t.kl = st.kl;
        t.rng = rng::restore_state(&st.rng);
        t.step = st.step;
        t.score_norm = st.score_norm;
        Ok(t)
    }

    /// The trained policy as a plain model: a copy of the base with the actor scope merged
    /// (full fine-tuning: the trained model as it is).
    pub fn export_policy(&self, dir: &Path) -> Result<()> {
        if !dist::is_main() {
            return Ok(());
        }
        if self.cfg.actor == ActorMode::Full {
            return self.model.save(dir);
        }
        crate::rlhf::export_merged(&self.model, &[CRITIC], ACTOR, dir)
    }

    /// One PPO iteration; returns its metrics.
    pub fn step(
        &mut self,
        prompts: &[Vec<u32>],
        eos: Option<u32>,
        scorer: &dyn Scorer,
        gold: Option<&dyn Scorer>,
    ) -> Result<serde_json::Value> {
        let cfg = self.cfg.clone();
        let t_start = std::time::Instant::now();
        let step = self.step + 1;
        if prompts.is_empty() {
            return Err(Error::msg("ppo: no prompts"));
        }

        // 1. draw a batch of prompts (without replacement when there are enough)
        let mut idx: Vec<usize> = (0..prompts.len()).collect();
        idx.shuffle(&mut self.rng);
        let batch: Vec<Vec<u32>> = (0..cfg.batch_size)
            .map(|i| prompts[idx[i % idx.len()]].clone())
            .collect();

        // 2. roll out and 3. score (and gold-score): data-parallel, each rank its rows, then
        //    every rank holds the whole batch
        let Scored {
            mut ro,
            scores: raw,
            gold: gold_scores,
            score_seconds,
        } = rollout::collect_scored(
            &self.actors(),
            &batch,
            1,
            &RolloutConfig {
                max_new_tokens: cfg.max_new_tokens,
                temperature: cfg.temperature,
                eos: eos.into_iter().collect(),
                seed: cfg.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                first_row: 0,
                forward_batch: 0,
                policy_logprobs: true,
            },
            scorer,
            gold,
            &format!("ppo step {step}"),
        )?;
        let (b, r) = (ro.layout.b, ro.layout.r);

        // 4. shape the scores; 5. rewards and advantages
        let scores = self.shaped_scores(&raw, &mut ro)?;
        let mask = &ro.layout.mask;
        let kl_tok = cfg.kl_estimator.estimate_all(&ro.logp, &ro.ref_logp, mask);
        let k1_tok = KlEstimator::K1.estimate_all(&ro.logp, &ro.ref_logp, mask);
        let k3_tok = KlEstimator::K3.estimate_all(&ro.logp, &ro.ref_logp, mask);
        let seq_sum = |x: &[f32]| -> Vec<f32> { x.chunks(r).map(|c| c.iter().sum()).collect() };
        let kl_seq = seq_sum(&kl_tok);
        let beta = self.kl.beta as f32;
        let targets = self.targets(&scores, &ro, &kl_tok, &kl_seq);
        let (val_mask, old_values): (Vec<f32>, &[f32]) = if cfg.pooled_values {
            (vec![1f32; b], &ro.values)
        } else {
            (mask.clone(), &ro.values)
        };
        let explained_var = advantage::explained_variance(old_values, &targets.returns, &val_mask);

        // 6. PPO epochs over minibatches
        let t_update = std::time::Instant::now();
        let train_actor = self.step >= cfg.critic_warmup_steps;
        let mut stats = UpdateStats::default();
        for _epoch in 0..cfg.epochs {
            let mut order: Vec<usize> = (0..b).collect();
            order.shuffle(&mut self.rng);
            for mb in order.chunks(cfg.minibatch_size) {
                self.update_minibatch(&ro, &targets, mb, train_actor, step, &mut stats)?;
            }
        }
        let update_seconds = t_update.elapsed().as_secs_f64();

        // 7. KL controller and metrics
        let mean = |x: &[f32]| x.iter().map(|&v| v as f64).sum::<f64>() / x.len().max(1) as f64;
        let kl_mean = mean(&seq_sum(&k1_tok));
        self.kl.update(mean(&kl_seq), b);
        self.step = step;
        let lengths: Vec<f32> = ro.responses.iter().map(|x| x.len() as f32).collect();
        let n_tokens: f32 = lengths.iter().sum();
        let neg_logp: Vec<f32> = ro.logp.iter().map(|x| -x).collect();
        let rlhf_reward: Vec<f32> = scores
            .iter()
            .zip(&kl_seq)
            .map(|(s, k)| s - cfg.score_offset - beta * k)
            .collect();
        let eos_frac = ro.ended_with_eos.iter().filter(|&&e| e).count() as f64 / b as f64;
        let rollout_s = ro.generate_seconds + ro.forward_seconds;
        let m = PpoMetrics {
            step,
            kl: kl_mean,
            kl_k3: mean(&seq_sum(&k3_tok)),
            entropy: mean(&seq_sum(&neg_logp)),
            scores: mean(&raw),
            rlhf_reward: mean(&rlhf_reward),
            kl_coef: beta,
            approxkl: mean_opt(&stats.approxkl),
            clipfrac: mean_opt(&stats.clipfrac),
            policy_entropy: mean_opt(&stats.entropy),
            policy_loss: mean_opt(&stats.policy_loss),
            value_loss: mean_opt(&stats.value_loss),
            val_clipfrac: mean_opt(&stats.val_clipfrac),
            explained_var,
            value_mean: mean(&ro.values),
            length: mean(&lengths),
            eos_fraction: eos_frac,
            rollout_tokens_per_s: n_tokens as f64 / rollout_s.max(1e-9),
            update_tokens_per_s: (cfg.epochs * b * (ro.layout.p + r)) as f64
                / update_seconds.max(1e-9),
            rollout_s,
            score_s: score_seconds,
            update_s: update_seconds,
            step_s: t_start.elapsed().as_secs_f64(),
            gold: gold_scores.map(|g| mean(&g)),
        };
        serde_json::to_value(m).map_err(|e| Error::msg(format!("ppo metrics: {e}")))
    }

    /// Step 4: the scores the rewards start from: normalised (fitted on the first rollout; a
    /// critic copied from the reward model learns the normalised scale, so its head and this
    /// rollout's values are rescaled once), missing-EOS penalty, clip, offset.
    fn shaped_scores(&mut self, raw: &[f32], ro: &mut Rollout) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        if cfg.normalize_scores && self.score_norm.is_none() {
            let (bias, gain) = advantage::fit_normalisation(raw);
            self.score_norm = Some((bias, gain));
            if cfg.critic_init == CriticInit::Reward {
                self.critic.head.normalise_scalar(bias, gain)?;
                for (v, m) in ro.values.iter_mut().zip(&ro.layout.mask) {
                    if *m > 0.0 {
                        *v = (*v - bias) * gain;
                    }
                }
            }
        }
        let mut scores = advantage::shape_scores(
            raw,
            &ro.ended_with_eos,
            &ScoreShaping {
                norm: self.score_norm,
                missing_eos_penalty: cfg.missing_eos_penalty,
                clip: cfg.reward_clip,
            },
        );
        scores.iter_mut().for_each(|s| *s += cfg.score_offset);
        Ok(scores)
    }

    /// Step 5: advantages and returns. Standard: per-token rewards (KL each token, the score at
    /// the last), GAE, whitened advantages. The original's recipe: the sequence reward
    /// R = score - beta * sum_t KL_t, A = whiten(R - V) on every token of the response.
    fn targets(&self, scores: &[f32], ro: &Rollout, kl_tok: &[f32], kl_seq: &[f32]) -> Targets {
        let (cfg, mask) = (&self.cfg, &ro.layout.mask);
        let (b, r, beta) = (ro.layout.b, ro.layout.r, self.kl.beta as f32);
        match cfg.recipe {
            Recipe::Standard => {
                let rewards = advantage::token_rewards(scores, kl_tok, mask, r, beta);
                let (adv, returns) =
                    advantage::gae(&rewards, &ro.values, mask, r, cfg.gamma, cfg.lam);
                Targets {
                    adv: advantage::whiten(&adv, mask, true),
                    returns,
                }
            }
            Recipe::PalmRlhfPytorch => {
                let big_r: Vec<f32> = scores
                    .iter()
                    .zip(kl_seq)
                    .map(|(s, k)| s - beta * k)
                    .collect();
                let diff: Vec<f32> = big_r.iter().zip(&ro.values).map(|(a, v)| a - v).collect();
                let a_seq = advantage::whiten(&diff, &vec![1f32; b], true);
                let adv = (0..b * r)
                    .map(|i| if mask[i] > 0.0 { a_seq[i / r] } else { 0.0 })
                    .collect();
                Targets {
                    adv,
                    returns: big_r,
                }
            }
        }
    }

    /// One PPO update on minibatch `rows` of the rollout: the actor's clipped surrogate, then
    /// the critic's clipped value loss, each one optimiser step. Data-parallel: each rank takes
    /// its slice of `rows`; its masked means weigh its share of the minibatch's tokens (rows,
    /// for pooled values), and gradients and statistics are summed across ranks before the
    /// guards and clipping.
    fn update_minibatch(
        &mut self,
        ro: &Rollout,
        tg: &Targets,
        rows: &[usize],
        train_actor: bool,
        step: usize,
        stats: &mut UpdateStats,
    ) -> Result<()> {
        let comm = dist::world();
        let (lo, hi) = ddp::rows_of(rows.len(), comm.rank(), comm.world_size());
        let local = &rows[lo..hi];
        let r = ro.layout.r;
        let tokens = |idx: &[usize]| -> f64 {
            idx.iter()
                .map(|&i| ro.layout.mask[i * r..(i + 1) * r].iter().sum::<f32>() as f64)
                .sum()
        };
        let w_tok = tokens(local) / tokens(rows).max(1.0);
        let w_row = local.len() as f64 / rows.len().max(1) as f64;
        if train_actor {
            // pg, clipfrac, approxkl, entropy, each weighted
            let (mut g, mut v) = match local.is_empty() {
                true => (vec![], vec![0.0; 4]),
                false => self.actor_grads(ro, tg, local, w_tok)?,
            };
            ddp::all_reduce_grads_of(comm, &self.actor_opt.params, &mut g)?;
            ddp::sum_f64(comm, &mut v)?;
            let lv = (v[0] - self.cfg.ent_coef as f64 * v[3]) as f32;
            if !lv.is_finite() {
                return Err(Error::msg(format!(
                    "ppo step {step}: policy loss is {lv}; stopping"
                )));
            }
            crate::train::run::test_poison_gradient(step, &mut g);
            non_finite_guard(&g, step, "policy")?;
            optim::clip_grad_norm(&mut g, self.cfg.max_grad_norm);
            self.actor_opt.step(&g, self.cfg.actor_lr)?;
            stats.policy_loss.push(v[0] as f32);
            stats.clipfrac.push(v[1] as f32);
            stats.approxkl.push(v[2] as f32);
            stats.entropy.push(v[3] as f32);
        }
        let w = if self.cfg.pooled_values { w_row } else { w_tok };
        let (mut g, mut v) = match local.is_empty() {
            true => (vec![], vec![0.0; 2]),
            false => self.critic_grads(ro, tg, local, w)?,
        };
        ddp::all_reduce_grads_of(comm, &self.critic_opt.params, &mut g)?;
        ddp::sum_f64(comm, &mut v)?;
        let lv = v[0] as f32;
        if !lv.is_finite() {
            return Err(Error::msg(format!(
                "ppo step {step}: value loss is {lv}; stopping"
            )));
        }
        non_finite_guard(&g, step, "value")?;
        optim::clip_grad_norm(&mut g, self.cfg.max_grad_norm);
        self.critic_opt.step(&g, self.cfg.critic_lr)?;
        stats.value_loss.push(lv);
        stats.val_clipfrac.push(v[1] as f32);
        Ok(())
    }

    /// The actor's gradients on `rows` (its loss scaled by `w`, this rank's share) and its
    /// statistics times `w`: [policy loss, clip fraction, approx KL, entropy].
    fn actor_grads(
        &self,
        ro: &Rollout,
        tg: &Targets,
        rows: &[usize],
        w: f64,
    ) -> Result<(optim::Grads, Vec<f64>)> {
        let cfg = &self.cfg;
        let dev = self.model.device().clone();
        let r = ro.layout.r;
        let lay: Layout = ro.layout.rows(rows);
        let take = |x: &[f32]| take_rows(x, rows, r);
        let n = rows.len();
        let mask = lay.mask_tensor(&dev)?; // [n, R]
                                           // each block one graph node; the gradients come from Model::backward
        let opts = Forward {
            scope: self.policy_scope(),
            freeze_base: cfg.actor == ActorMode::Lora,
            fused_blocks: true,
            ..Default::default()
        };
        let (logp, logits) = rollout::response_logprobs(&self.model, &lay, opts, cfg.temperature)?;
        let old = Tensor::from_vec(take(&ro.logp), (n, r), &dev)?;
        let adv = Tensor::from_vec(take(&tg.adv), (n, r), &dev)?;
        let (pg, clipfrac, approxkl) =
            clipped_policy_loss(&logp, &old, &adv, &mask, cfg.clip_range)?;
        let ent = masked_mean_t(&rollout::entropy(&logits)?, &mask)?;
        let mut loss = (&pg - (&ent * cfg.ent_coef as f64)?)?;
        if w != 1.0 {
            loss = (loss * w)?;
        }
        let grads = self.model.backward(&loss)?;
        let g = optim::grads_of(&self.actor_opt.params, &grads)?;
        let stat = |x: f32| f64::from(x) * w;
        Ok((
            g,
            vec![
                stat(pg.to_scalar::<f32>()?),
                stat(clipfrac),
                stat(approxkl),
                stat(ent.to_scalar::<f32>()?),
            ],
        ))
    }

    /// The critic's gradients on `rows` (its loss scaled by `w`) and [value loss, value clip
    /// fraction] times `w`.
    fn critic_grads(
        &self,
        ro: &Rollout,
        tg: &Targets,
        rows: &[usize],
        w: f64,
    ) -> Result<(optim::Grads, Vec<f64>)> {
        let cfg = &self.cfg;
        let dev = self.model.device().clone();
        let r = ro.layout.r;
        let lay: Layout = ro.layout.rows(rows);
        let take = |x: &[f32]| take_rows(x, rows, r);
        let take_seq = |x: &[f32]| -> Vec<f32> { rows.iter().map(|&i| x[i]).collect() };
        let n = rows.len();
        let mask = lay.mask_tensor(&dev)?; // [n, R]
        let (v, logits) = self.critic.values(self.frozen_model(), &lay, true, true)?;
        let (vloss, vclip) = if cfg.pooled_values {
            let old = Tensor::from_vec(take_seq(&ro.values), n, &dev)?;
            let ret = take_seq(&tg.returns);
            let ones = Tensor::ones(n, DType::F32, &dev)?;
            match cfg.value {
                ValueKind::HlGauss { .. } => clipped_hl_gauss_loss(
                    &self.critic.head,
                    &logits,
                    &v,
                    &old,
                    &ret,
                    &ones,
                    cfg.clip_range_value,
                )?,
                ValueKind::Scalar => {
                    let ret = Tensor::from_vec(ret, n, &dev)?;
                    clipped_value_loss(&v, &old, &ret, &ones, cfg.clip_range_value)?
                }
            }
        } else {
            let old = Tensor::from_vec(take(&ro.values), (n, r), &dev)?;
            let ret_v = take(&tg.returns);
            match cfg.value {
                ValueKind::Scalar => {
                    let ret = Tensor::from_vec(ret_v, (n, r), &dev)?;
                    clipped_value_loss(&v, &old, &ret, &mask, cfg.clip_range_value)?
                }
                ValueKind::HlGauss { bins, .. } => clipped_hl_gauss_loss(
                    &self.critic.head,
                    &logits.reshape((n * r, bins))?,
                    &v.flatten_all()?,
                    &old.flatten_all()?,
                    &ret_v,
                    &mask.flatten_all()?,
                    cfg.clip_range_value,
                )?,
            }
        };
        let lv = vloss.to_scalar::<f32>()?;
        let vloss = if w != 1.0 { (vloss * w)? } else { vloss };
        let grads = self.frozen_model().backward(&vloss)?;
        let g = optim::grads_of(&self.critic_opt.params, &grads)?;
        Ok((g, vec![f64::from(lv) * w, f64::from(vclip) * w]))
    }
}

/// A NaN or infinite gradient stops the run before it reaches the weights (clipping would
/// spread it to every one), so the last checkpoint stays the last good state.
fn non_finite_guard(g: &optim::Grads, step: usize, what: &str) -> Result<()> {
    if optim::grads_non_finite(g) {
        return Err(Error::msg(format!(
            "ppo step {step}: a {what} gradient is NaN or infinite; stopping (the last \
             checkpoint is kept)"
        )));
    }
    Ok(())
}

#[derive(Default)]
struct UpdateStats {
    policy_loss: Vec<f32>,
    value_loss: Vec<f32>,
    clipfrac: Vec<f32>,
    approxkl: Vec<f32>,
    entropy: Vec<f32>,
    val_clipfrac: Vec<f32>,
}

/// The mean, or None (null in the metrics) when nothing was measured (the critic's warm-up
/// steps have no policy statistics).
fn mean_opt(x: &[f32]) -> Option<f64> {
    (!x.is_empty()).then(|| x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64)
}

/// One PPO iteration's metrics, under TRL's PPOTrainer names (one line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize)]
pub struct PpoMetrics {
    pub step: usize,
    /// Mean over responses of the summed k1 KL to the reference (nats).
    #[serde(rename = "objective/kl")]
    pub kl: f64,
    #[serde(rename = "objective/kl_k3")]
    pub kl_k3: f64,
    /// Mean over responses of the summed negative log-probs.
    #[serde(rename = "objective/entropy")]
    pub entropy: f64,
    /// Mean raw score of the scorer.
    #[serde(rename = "objective/scores")]
    pub scores: f64,
    /// Mean of score - beta * summed KL.
    #[serde(rename = "objective/rlhf_reward")]
    pub rlhf_reward: f64,
    #[serde(rename = "objective/kl_coef")]
    pub kl_coef: f32,
    #[serde(rename = "policy/approxkl")]
    pub approxkl: Option<f64>,
    #[serde(rename = "policy/clipfrac")]
    pub clipfrac: Option<f64>,
    #[serde(rename = "policy/entropy")]
    pub policy_entropy: Option<f64>,
    #[serde(rename = "loss/policy")]
    pub policy_loss: Option<f64>,
    #[serde(rename = "loss/value")]
    pub value_loss: Option<f64>,
    #[serde(rename = "val/clipfrac")]
    pub val_clipfrac: Option<f64>,
    #[serde(rename = "val/explained_var")]
    pub explained_var: f32,
    #[serde(rename = "val/mean")]
    pub value_mean: f64,
    #[serde(rename = "response/length")]
    pub length: f64,
    #[serde(rename = "response/eos_fraction")]
    pub eos_fraction: f64,
    #[serde(rename = "speed/rollout_tokens_per_s")]
    pub rollout_tokens_per_s: f64,
    #[serde(rename = "speed/update_tokens_per_s")]
    pub update_tokens_per_s: f64,
    #[serde(rename = "time/rollout_s")]
    pub rollout_s: f64,
    #[serde(rename = "time/score_s")]
    pub score_s: f64,
    #[serde(rename = "time/update_s")]
    pub update_s: f64,
    #[serde(rename = "time/step_s")]
    pub step_s: f64,
    /// Mean gold score of the responses, when a gold scorer is given.
    #[serde(rename = "gold/score", skip_serializing_if = "Option::is_none")]
    pub gold: Option<f64>,
}

/// Where a PPO run writes: `metrics.jsonl`, plots, `checkpoint/`, `policy/` (actor merged).
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint")
    }
    pub fn policy(&self) -> PathBuf {
        self.root.join("policy")
    }
}

/// Runs PPO until `trainer.cfg.steps`, logging metrics and plots into `out` and checkpointing.
/// `on_step(metrics)` is called after every step (progress bars).
pub fn run(
    trainer: &mut PpoTrainer,
    prompts: &[Vec<u32>],
    eos: Option<u32>,
    scorer: &dyn Scorer,
    gold: Option<&dyn Scorer>,
    out: &Path,
    on_step: impl FnMut(&serde_json::Value),
) -> Result<()> {
    let never = std::sync::atomic::AtomicBool::new(false);
    run_until_stopped(trainer, prompts, eos, scorer, gold, out, &never, on_step)
}

/// [`run`], and when `stop` is set (Ctrl-C, SIGTERM) the run checkpoints after the current step
/// and returns with `trainer.step` below `trainer.cfg.steps` (no `policy/`).
#[allow(clippy::too_many_arguments)]
pub fn run_until_stopped(
    trainer: &mut PpoTrainer,
    prompts: &[Vec<u32>],
    eos: Option<u32>,
    scorer: &dyn Scorer,
    gold: Option<&dyn Scorer>,
    out: &Path,
    stop: &std::sync::atomic::AtomicBool,
    mut on_step: impl FnMut(&serde_json::Value),
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let dir = RunDir {
        root: out.to_path_buf(),
    };
    let resume_at = if trainer.step > 0 {
        Some(trainer.step as u64)
    } else {
        None
    };
    // data-parallel: rank 0 keeps the log and plots; a stop on any rank stops all at one step
    let mut log = if dist::is_main() {
        MetricsLog::open(out, resume_at)?
    } else {
        MetricsLog::discard()
    };
    while trainer.step < trainer.cfg.steps {
        let m = trainer.step(prompts, eos, scorer, gold)?;
        log.log(m.clone())?;
        on_step(&m);
        let every = trainer.cfg.save_every;
        let stopping = dist::any(
            dist::world(),
            stop.load(std::sync::atomic::Ordering::SeqCst),
        )?;
        if (stopping || (every > 0 && trainer.step.is_multiple_of(every)))
            && trainer.step < trainer.cfg.steps
        {
            trainer.save(&dir.checkpoint())?;
            plot(&log, out)?;
            if stopping {
                tracing::warn!(
                    "ppo: stopped at step {}; checkpoint in {} (resume with --resume)",
                    trainer.step,
                    dir.checkpoint().display()
                );
                return Ok(());
            }
        }
    }
    trainer.save(&dir.checkpoint())?;
    trainer.export_policy(&dir.policy())?;
    plot(&log, out)
}

/// reward.svg, kl.svg and gold_vs_reward.svg (gold and proxy score against KL); rank 0 only.
pub fn plot(log: &MetricsLog, out: &Path) -> Result<()> {
    if !dist::is_main() {
        return Ok(());
    }
    log.plot(
        &out.join("reward.svg"),
        "PPO: scores and reward",
        "step",
        &["objective/scores", "objective/rlhf_reward", "gold/score"],
    )?;
    log.plot(
        &out.join("kl.svg"),
        "PPO: KL to the reference (nats per response)",
        "step",
        &["objective/kl", "objective/kl_k3"],
    )?;
    log.plot(
        &out.join("gold_vs_reward.svg"),
        "Gold score and reward-model score as KL grows",
        "objective/kl",
        &["objective/scores", "gold/score"],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t2(v: &[f32], b: usize, t: usize) -> Tensor {
        Tensor::from_slice(v, (b, t), &Device::Cpu).unwrap()
    }
    fn scalar(x: &Tensor) -> f32 {
        x.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn policy_loss_hand_computed() {
        // 3 real tokens + 1 pad; log-ratios ln 1.5, ln 0.5, 0; advantages 1, 1, -2; eps 0.2
        let old = t2(&[0.0, 0.0, -1.0, 0.0], 1, 4);
        let logp = t2(&[1.5f32.ln(), 0.5f32.ln(), -1.0, 50.0], 1, 4);
        let adv = t2(&[1.0, 1.0, -2.0, 100.0], 1, 4);
        let mask = t2(&[1.0, 1.0, 1.0, 0.0], 1, 4);
        let (loss, clipfrac, approxkl) =
            clipped_policy_loss(&logp, &old, &adv, &mask, 0.2).unwrap();
        // token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5;
        // token 2: ratio 1: max(2, 2) = 2 -> mean (-1.2 - 0.5 + 2) / 3 = 0.1
        assert!((scalar(&loss) - 0.1).abs() < 1e-6, "{}", scalar(&loss));
        assert!((clipfrac - 1.0 / 3.0).abs() < 1e-6);
        let want = 0.5 * (1.5f32.ln().powi(2) + 0.5f32.ln().powi(2)) / 3.0;
        assert!((approxkl - want).abs() < 1e-6);
        // gradient: only token 1 (unclipped, ratio 0.5) moves: d/dlogp = -A*ratio/3 = -1/6
        let var = candle_core::Var::from_tensor(&logp).unwrap();
        let (loss, _, _) = clipped_policy_loss(var.as_tensor(), &old, &adv, &mask, 0.2).unwrap();
        let g: Vec<f32> = loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = [0.0, -0.5 / 3.0, 2.0 / 3.0, 0.0];
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{g:?}");
        }
    }

    #[test]
    fn value_loss_hand_computed() {
        // V 1.0 (old 0.5, R 2): unclipped 1, clipped (0.7 - 2)^2 = 1.69 -> 1.69, clipped
        // V 0.0 (old 0.5, R 0): unclipped 0, clipped (0.3)^2 = 0.09 -> 0.09, clipped
        // V 3.0 (old 3.1, R 0): 9 vs (2.9)^2 = 8.41 -> 9, not clipped; pad ignored
        let v = t2(&[1.0, 0.0, 3.0, 7.0], 1, 4);
        let old = t2(&[0.5, 0.5, 3.1, 0.0], 1, 4);
        let ret = t2(&[2.0, 0.0, 0.0, 0.0], 1, 4);
        let mask = t2(&[1.0, 1.0, 1.0, 0.0], 1, 4);
        let (loss, clipfrac) = clipped_value_loss(&v, &old, &ret, &mask, 0.2).unwrap();
        let want = 0.5 * (1.69 + 0.09 + 9.0) / 3.0;
        assert!((scalar(&loss) - want).abs() < 1e-5, "{}", scalar(&loss));
        assert!((clipfrac - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn masked_mean_ignores_padding_values() {
        let mask = t2(&[1.0, 0.0], 1, 2);
        let a = masked_mean_t(&t2(&[2.0, 1e9], 1, 2), &mask).unwrap();
        assert_eq!(scalar(&a), 2.0);
    }

    #[test]
    fn hl_gauss_clipped_elements_get_no_gradient() {
        let head = ValueHead::new(2, ValueKind::original_hl_gauss(), &Device::Cpu).unwrap();
        let logits = candle_core::Var::zeros((2, 6), DType::F32, &Device::Cpu).unwrap();
        let v = head.value_from_logits(logits.as_tensor()).unwrap(); // 2.5, 2.5
                                                                     // row 0: old 2.4, target 5 -> moving within the clip: kept
                                                                     // row 1: old 1.0, target 5 -> V - old = 1.5 > 0.4: clipped branch larger? clipped
                                                                     //        value 1.4 is further from 5 than 2.5 -> clipped, dropped
        let old = Tensor::new(&[2.4f32, 1.0], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[1.0f32, 1.0], &Device::Cpu).unwrap();
        let (loss, clipfrac) =
            clipped_hl_gauss_loss(&head, logits.as_tensor(), &v, &old, &[5.0, 5.0], &mask, 0.4)
                .unwrap();
        assert_eq!(clipfrac, 0.5);
        let g = loss.backward().unwrap();
        let g: Vec<Vec<f32>> = g.get(logits.as_tensor()).unwrap().to_vec2().unwrap();
        assert!(g[0].iter().any(|x| x.abs() > 1e-4));
        assert!(g[1].iter().all(|x| *x == 0.0));
        // the kept row's loss is its cross-entropy / 2
        let ce: f32 = head
            .hl_loss(
                &Tensor::zeros((1, 6), DType::F32, &Device::Cpu).unwrap(),
                &[5.0],
            )
            .unwrap()
            .to_vec1()
            .unwrap()[0];
        assert!((scalar(&loss) - ce / 2.0).abs() < 1e-6);
    }
}
