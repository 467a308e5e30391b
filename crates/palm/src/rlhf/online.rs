//! The critic-free online RL family beside PPO, one trainer with the algorithm as an enum:
//! GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++ and REINFORCE++-baseline. Each choice the
//! frameworks make silently is a named config field here (see `shared/docs/rl-algorithms.md`):
//! - the advantage estimator ([`Algorithm`]: [`grpo`], [`rloo`], [`reinforce`]);
//! - the loss aggregation ([`LossAgg`]), its normaliser fixed once per optimiser step;
//! - the KL: estimator k1/k2/k3 x placement in the reward (sequence sum before the baseline, as
//!   TRL's RLOO; per token for REINFORCE++) or in the loss (GRPO);
//! - the clip range [1 - clip_low, 1 + clip_high] (DAPO's clip-higher);
//! - DAPO's dynamic sampling (groups with equal rewards are dropped and more are drawn) and
//!   overlong filtering (responses without an end id get no loss).
//!
//! One step of [`RlTrainer::step`]: draw `batch_size` prompts, sample `group_size` responses
//! each with the policy (the `actor` LoRA scope; the reference is the same base with LoRA off),
//! record per-token log-probs under the policy and the reference (tempered as sampled), score,
//! compute advantages, then `epochs` passes of minibatch updates of the clipped surrogate. The
//! ratio is exactly 1 on the first minibatch of the first epoch. When the rollout feeds one
//! optimiser step only (one epoch, one minibatch, KL in the loss), the policy's rollout forward
//! is skipped and the update's forward, detached, is pi_old (TRL's `num_iterations = 1`; see
//! [`RlConfig::old_logprobs_from_update`]).

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::checkpoint;
use crate::config::LoraSpec;
use crate::dist::{self, ddp};
use crate::error::{Error, Result};
use crate::model::{Forward, Model};
use crate::params::write_safetensors;
use crate::rlhf::advantage::token_rewards;
use crate::rlhf::kl::KlEstimator;
use crate::rlhf::policy_loss::{
    policy_loss, token_entropy, Clip, ClipStats, KlInLoss, LossAgg, Normaliser,
};
use crate::rlhf::rollout::{self, take_rows, Actors, Layout, RolloutConfig, ACTOR};
use crate::rlhf::scorer::Scorer;
use crate::rlhf::{grpo, reinforce, rloo};
use crate::rng::{self, PalmRng, RngState};
use crate::train::metrics::MetricsLog;
use crate::train::optim::{self, OptimConfig, Optimizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Group-normalised advantages (R - mean) / (std + eps), KL (k3) in the loss.
    Grpo,
    /// Mean-centred advantages, sum / (sequences x max length) aggregation, no KL.
    DrGrpo,
    /// GRPO advantages, token-mean, clip-higher, dynamic sampling, overlong filtering, no KL.
    Dapo,
    /// Leave-one-out baseline, KL (k1) in the reward before the baseline.
    Rloo,
    /// No baseline: KL-shaped token rewards, returns, whitened over the whole batch.
    #[serde(rename = "reinforce++")]
    ReinforcePp,
    /// Group-mean baseline, then REINFORCE++'s token rewards, returns and global whitening.
    #[serde(rename = "reinforce++-baseline")]
    ReinforcePpBaseline,
    /// The original's MaxRL advantage (R - mean) / |mean| (for success-rate rewards in [0, 1]);
    /// a group whose |mean| is below the std floor is only mean-centred.
    MaxRl,
}

impl Algorithm {
    pub const ALL: [Algorithm; 7] = [
        Algorithm::Grpo,
        Algorithm::DrGrpo,
        Algorithm::Dapo,
        Algorithm::Rloo,
        Algorithm::ReinforcePp,
        Algorithm::ReinforcePpBaseline,
        Algorithm::MaxRl,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Grpo => "grpo",
            Algorithm::DrGrpo => "dr-grpo",
            Algorithm::Dapo => "dapo",
            Algorithm::Rloo => "rloo",
            Algorithm::ReinforcePp => "reinforce++",
            Algorithm::ReinforcePpBaseline => "reinforce++-baseline",
            Algorithm::MaxRl => "max-rl",
        }
    }

    /// Needs a group of at least two responses per prompt.
    pub fn is_group_estimator(self) -> bool {
        self != Algorithm::ReinforcePp
    }
}

impl std::str::FromStr for Algorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                Error::msg(format!(
                    "unknown algorithm `{s}` (expected ppo, grpo, dr-grpo, dapo, rloo, \
                     reinforce++, reinforce++-baseline or max-rl)"
                ))
            })
    }
}

/// Where the KL to the reference enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KlPlacement {
    Reward,
    Loss,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlConfig {
    pub algorithm: Algorithm,
    pub seed: u64,
    /// Iterations (rollout + update).
    pub steps: usize,
    /// Prompts per rollout.
    pub batch_size: usize,
    /// Responses per prompt (G).
    pub group_size: usize,
    pub max_new_tokens: usize,
    /// Sampling temperature; the training forward divides the logits by it too.
    pub temperature: f32,
    pub lr: f64,
    pub max_grad_norm: f64,
    /// Passes over each rollout (mu).
    pub epochs: usize,
    /// Rows (responses) per optimiser step; 0: the whole rollout.
    pub minibatch_size: usize,
    /// Rows per forward/backward within an optimiser step (gradient accumulation); 0: all.
    pub micro_batch_size: usize,
    pub clip_low: f32,
    pub clip_high: f32,
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub kl_placement: KlPlacement,
    pub loss_agg: LossAgg,
    /// GRPO's epsilon in (R - mean) / (std + eps) (TRL 1e-4).
    pub std_eps: f32,
    /// Groups with a std below this are only mean-centred.
    pub std_floor: f32,
    /// DAPO: drop groups whose rewards are all equal and sample more prompts.
    pub dynamic_sampling: bool,
    /// Rollout batches drawn at most per step under dynamic sampling.
    pub max_gen_batches: usize,
    /// Responses that hit max_new_tokens without an end id get no loss.
    pub overlong_filter: bool,
    /// SPO's penalty instead of the clip (the original's `use_spo`), with eps = clip_low.
    #[serde(default)]
    pub spo: bool,
    /// Entropy bonus: the loss subtracts this times the mean token entropy.
    #[serde(default)]
    pub ent_coef: f32,
    /// Entropy-shaped advantages (Cheng et al. 2025, the original's `add_entropy_to_advantage`):
    /// A_t += min(0.4 * H_t, |A_t| / 2), H_t the detached token entropy.
    #[serde(default)]
    pub entropy_advantage: bool,
    pub lora_r: usize,
    /// What the actor's LoRA adapts (the original: attention only).
    #[serde(default)]
    pub lora_targets: crate::config::LoraTargets,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Run pi_old's log-prob forward in the rollout even when the update can take it from its
    /// own forward (see [`RlConfig::old_logprobs_from_update`]); the first step's ratio is then
    /// measured (`ratio/first_step_max_dev`) instead of being 1 by construction.
    #[serde(default)]
    pub rollout_old_logprobs: bool,
}

impl RlConfig {
    /// The algorithm's usual settings (TRL / veRL / OpenRLHF defaults; see the module docs),
    /// at a learning rate for LoRA on a small model.
    pub fn for_algorithm(algorithm: Algorithm) -> Self {
        let base = Self {
            algorithm,
            seed: 0,
            steps: 100,
            batch_size: 16,
            group_size: 4,
            max_new_tokens: 16,
            temperature: 1.0,
            lr: 1e-3,
            max_grad_norm: 1.0,
            epochs: 1,
            minibatch_size: 0,
            micro_batch_size: 0,
            clip_low: 0.2,
            clip_high: 0.2,
            kl_coef: 0.04,
            kl_estimator: KlEstimator::K3,
            kl_placement: KlPlacement::Loss,
            loss_agg: LossAgg::SeqMeanTokenMean,
            std_eps: 1e-4,
            std_floor: 1e-3,
            dynamic_sampling: false,
            max_gen_batches: 3,
            overlong_filter: false,
            spo: false,
            ent_coef: 0.0,
            entropy_advantage: false,
            lora_r: 8,
            lora_targets: crate::config::LoraTargets::Attention,
            save_every: 0,
            rollout_old_logprobs: false,
        };
        let in_reward = |beta: f64| Self {
            kl_coef: beta,
            kl_estimator: KlEstimator::K1,
            kl_placement: KlPlacement::Reward,
            loss_agg: LossAgg::TokenMean,
            ..base.clone()
        };
        match algorithm {
            Algorithm::Grpo | Algorithm::MaxRl => base,
            Algorithm::DrGrpo => Self {
                kl_coef: 0.0,
                loss_agg: LossAgg::SeqMeanTokenSumNorm,
                ..base
            },
            Algorithm::Dapo => Self {
                kl_coef: 0.0,
                clip_high: 0.28,
                loss_agg: LossAgg::TokenMean,
                dynamic_sampling: true,
                overlong_filter: true,
                ..base
            },
            Algorithm::Rloo => in_reward(0.05),
            Algorithm::ReinforcePp | Algorithm::ReinforcePpBaseline => in_reward(0.01),
        }
    }

    /// The original palm-rlhf-pytorch 0.8.0 `grpo.py` settings, without its bugs (see
    /// [`RlConfig::palm_rlhf_pytorch`]'s docs in the README): groups of 11, clip 0.2, KL weight
    /// 0.1, entropy bonus 0.01, per-sequence token means, learning rate 1e-4. Its KL is taken to
    /// the frozen reference (k3 in the loss) instead of between the rollout and current policy,
    /// from the log-probs of the distribution actually sampled, with masked means. `algorithm`
    /// picks its advantage: grpo (std), dr-grpo (its `use_dr_grpo` only rescales; ours also
    /// drops the length normaliser) or max-rl.
    pub fn palm_rlhf_pytorch(algorithm: Algorithm) -> Self {
        Self {
            group_size: 11,
            clip_low: 0.2,
            clip_high: 0.2,
            kl_coef: 0.1,
            kl_estimator: KlEstimator::K3,
            kl_placement: KlPlacement::Loss,
            ent_coef: 0.01,
            lr: 1e-4,
            ..Self::for_algorithm(algorithm)
        }
    }

    /// Whether the update takes pi_old's log-probs from its own forward, detached (TRL with
    /// `num_iterations = 1`): the rollout is used by exactly one optimiser step (one epoch, one
    /// minibatch), so pi_old is the policy that step's forward runs, and the KL is not in the
    /// reward (the advantages need no pi_old). Saves the rollout's policy forward.
    pub fn old_logprobs_from_update(&self) -> bool {
        !self.rollout_old_logprobs
            && self.epochs == 1
            && (self.minibatch_size == 0
                || self.minibatch_size >= self.batch_size * self.group_size)
            && (self.kl_placement == KlPlacement::Loss || self.kl_coef == 0.0)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("rl: {m}")));
        if self.algorithm.is_group_estimator() && self.group_size < 2 {
            return bad(format!(
                "{} compares responses within a group: --group-size must be at least 2 (got {})",
                self.algorithm.name(),
                self.group_size
            ));
        }
        if self.batch_size == 0 || self.group_size == 0 || self.epochs == 0 {
            return bad("batch size, group size and epochs must be at least 1".into());
        }
        if self.max_new_tokens == 0 || self.lora_r == 0 || self.max_gen_batches == 0 {
            return bad("max_new_tokens, lora_r and max_gen_batches must be at least 1".into());
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return bad("temperature must be positive (rollouts sample)".into());
        }
        if !(self.clip_low >= 0.0 && self.clip_low < 1.0 && self.clip_high >= 0.0) {
            return bad("clip_low must be in [0, 1) and clip_high >= 0".into());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Advantages (pure)

/// Per-token advantages [B, R] of one batch laid out group by group (`scores` [B], per-token
/// `kl` [B, R] from the configured estimator, 0 on pads; `mask` [B, R]).
pub fn advantages(cfg: &RlConfig, scores: &[f32], kl: &[f32], mask: &[f32], r: usize) -> Vec<f32> {
    let g = cfg.group_size;
    let beta = match cfg.kl_placement {
        KlPlacement::Reward => cfg.kl_coef as f32,
        KlPlacement::Loss => 0.0,
    };
    let broadcast = |a: Vec<f32>| -> Vec<f32> {
        (0..mask.len())
            .map(|i| if mask[i] > 0.0 { a[i / r] } else { 0.0 })
            .collect()
    };
    // sequence reward: the score minus beta * the response's summed KL (KL in the reward)
    let seq_reward: Vec<f32> = scores
        .iter()
        .zip(kl.chunks(r))
        .map(|(s, k)| s - beta * k.iter().sum::<f32>())
        .collect();
    match cfg.algorithm {
        Algorithm::Grpo | Algorithm::Dapo => {
            broadcast(grpo::group_norm(&seq_reward, g, cfg.std_eps, cfg.std_floor))
        }
        Algorithm::DrGrpo => broadcast(grpo::group_mean(&seq_reward, g)),
        Algorithm::MaxRl => broadcast(grpo::max_rl(&seq_reward, g, cfg.std_floor)),
        Algorithm::Rloo => broadcast(rloo::leave_one_out(&seq_reward, g)),
        Algorithm::ReinforcePp | Algorithm::ReinforcePpBaseline => {
            let outcome = if cfg.algorithm == Algorithm::ReinforcePpBaseline {
                grpo::group_mean(scores, g)
            } else {
                scores.to_vec()
            };
            let rewards = token_rewards(&outcome, kl, mask, r, beta);
            reinforce::whiten_global(&reinforce::returns(&rewards, mask, r, 1.0), mask)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Trainer

/// One scored response of a rollout.
#[derive(Debug, Clone)]
struct Sample {
    prompt: Vec<u32>,
    response: Vec<u32>,
    logp: Vec<f32>,
    ref_logp: Vec<f32>,
    ended: bool,
    score: f32,
    gold: Option<f32>,
}

/// The training batch of one step: samples laid out group by group, per-token arrays [B, R].
struct Batch {
    lay: Layout,
    logp: Vec<f32>,
    ref_logp: Vec<f32>,
    /// The layout's mask, minus filtered (overlong) rows: which tokens get a loss.
    loss_mask: Vec<f32>,
    adv: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    rng: RngState,
    config: RlConfig,
    /// Processes the run was trained with (`mpirun -n N`; 1 for older runs).
    #[serde(default = "one")]
    world_size: usize,
}

fn one() -> usize {
    1
}

const STATE_FILE: &str = "trainer.json";
const OPT_FILE: &str = "optimizer.safetensors";

/// Everything an online run carries from step to step; [`RlTrainer::save`] writes all of it.
pub struct RlTrainer {
    pub cfg: RlConfig,
    /// The base with the `actor` scope (the policy); LoRA off it is the reference.
    pub model: Model,
    opt: Optimizer,
    rng: PalmRng,
    /// Steps completed.
    pub step: usize,
}

fn optim_cfg() -> OptimConfig {
    OptimConfig {
        weight_decay: 0.0,
        betas: (0.9, 0.999),
        ..OptimConfig::adamw()
    }
}

impl RlTrainer {
    /// Starts a run from a policy (SFT) model: adds the `actor` LoRA scope.
    pub fn new(mut model: Model, cfg: RlConfig) -> Result<Self> {
        cfg.validate()?;
        if model.has_scope(ACTOR) {
            return Err(Error::Config(format!(
                "the policy model already has a LoRA scope `{ACTOR}`; rl adds its own"
            )));
        }
        let spec = LoraSpec {
            targets: cfg.lora_targets,
            ..LoraSpec::new(cfg.lora_r)
        };
        model.add_scope(ACTOR, spec, cfg.seed)?;
        Self::assemble(model, cfg)
    }

    /// The trainer around a model with the actor scope; data-parallel ranks start from rank 0's
    /// actor weights and check their batch has a group for every rank.
    fn assemble(model: Model, cfg: RlConfig) -> Result<Self> {
        let params = model
            .vars()
            .with_prefix(&format!("finetune_modules.{ACTOR}."));
        let comm = dist::world();
        ddp::check_batch(
            "--batch-size (prompts per step)",
            cfg.batch_size,
            comm.world_size(),
        )?;
        ddp::broadcast_params(comm, &params)?;
        Ok(Self {
            opt: Optimizer::new(params, optim_cfg()),
            rng: rng::stream(cfg.seed, 0x6790),
            cfg,
            model,
            step: 0,
        })
    }

    /// Writes the model (base + scope), optimiser, RNG and config into `dir` atomically; only
    /// rank 0 writes in a data-parallel run (every rank holds the same state).
    pub fn save(&self, dir: &Path) -> Result<()> {
        if !dist::is_main() {
            return Ok(());
        }
        checkpoint::write_dir_atomic(dir, |tmp| {
            self.model.write_files(tmp)?;
            write_safetensors(&tmp.join(OPT_FILE), &self.opt.state()?)?;
            checkpoint::write_json_atomic(
                &tmp.join(STATE_FILE),
                &TrainerState {
                    step: self.step,
                    rng: rng::save_state(&self.rng),
                    config: self.cfg.clone(),
                    world_size: dist::world().world_size(),
                },
            )
        })
    }

    /// The config a run saved by [`RlTrainer::save`] was started with.
    pub fn saved_config(dir: &Path) -> Result<RlConfig> {
        let dir = checkpoint::resolve_dir(dir);
        let st: TrainerState = checkpoint::read_json(&dir.join(STATE_FILE))?;
        Ok(st.config)
    }

    /// Restores a run saved by [`RlTrainer::save`]; `steps` may extend it.
    pub fn resume(dir: &Path, device: &Device, steps: Option<usize>) -> Result<Self> {
        let dir = checkpoint::resolve_dir(dir);
        let st: TrainerState = checkpoint::read_json(&dir.join(STATE_FILE))?;
        let model = crate::load::load_model(&dir, device)?;
        if !model.has_scope(ACTOR) {
            return Err(Error::msg(format!(
                "{}: no `{ACTOR}` LoRA scope: not a `palm rl` checkpoint",
                dir.display()
            )));
        }
        ddp::check_resume_world(&dir, st.world_size, "palm rl")?;
        let mut cfg = st.config;
        if let Some(s) = steps {
            cfg.steps = s;
        }
        let mut t = Self::assemble(model, cfg)?;
        t.opt.load_state_file(&dir.join(OPT_FILE))?;
        t.rng = rng::restore_state(&st.rng);
        t.step = st.step;
        Ok(t)
    }

    /// The trained policy as a plain model (the actor scope merged into a copy of the base);
    /// rank 0 writes it.
    pub fn export_policy(&self, dir: &Path) -> Result<()> {
        if !dist::is_main() {
            return Ok(());
        }
        crate::rlhf::export_merged(&self.model, &[], ACTOR, dir)
    }

    fn actors(&self) -> Actors<'_> {
        Actors {
            policy: &self.model,
            policy_scope: Some(ACTOR),
            frozen: &self.model,
            critic: None,
        }
    }
}

/// The kept samples, every drawn score, the batches sampled, and the seconds spent sampling and
/// in the log-prob forwards.
type Collected = (Vec<Sample>, Vec<f32>, usize, [f64; 2]);

impl RlTrainer {
    /// Samples `batch_size` prompts x `group_size` responses, scores them; under dynamic
    /// sampling keeps only groups with unequal scores, drawing up to `max_gen_batches` batches.
    /// Returns the kept samples (group by group), the groups drawn and the batches sampled.
    fn collect(
        &mut self,
        prompts: &[Vec<u32>],
        eos: &[u32],
        scorer: &dyn Scorer,
        gold: Option<&dyn Scorer>,
    ) -> Result<Collected> {
        let cfg = self.cfg.clone();
        let g = cfg.group_size;
        let (mut kept, mut all_scores, mut gen_batches, mut gen_s) = (vec![], vec![], 0, [0.0; 2]);
        while gen_batches < cfg.max_gen_batches && kept.len() < cfg.batch_size * g {
            let mut idx: Vec<usize> = (0..prompts.len()).collect();
            idx.shuffle(&mut self.rng);
            let rows: Vec<Vec<u32>> = (0..cfg.batch_size)
                .flat_map(|i| std::iter::repeat_n(prompts[idx[i % idx.len()]].clone(), g))
                .collect();
            let seed = cfg.seed
                ^ ((self.step + 1) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ (gen_batches as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            // data-parallel: each rank samples and scores its groups; all ranks get them all
            let sc = rollout::collect_scored(
                &self.actors(),
                &rows,
                g,
                &RolloutConfig {
                    max_new_tokens: cfg.max_new_tokens,
                    temperature: cfg.temperature,
                    eos: eos.to_vec(),
                    seed,
                    first_row: 0,
                    forward_batch: cfg.micro_batch_size,
                    policy_logprobs: !cfg.old_logprobs_from_update(),
                },
                scorer,
                gold,
                &format!("rl step {}", self.step + 1),
            )?;
            let (ro, scores, golds) = (sc.ro, sc.scores, sc.gold);
            gen_batches += 1;
            gen_s[0] += ro.generate_seconds;
            gen_s[1] += ro.forward_seconds;
            all_scores.extend_from_slice(&scores);
            let r = ro.layout.r;
            for (grp, sc) in scores.chunks(g).enumerate() {
                if cfg.dynamic_sampling && grpo::is_constant(sc) {
                    continue;
                }
                for k in grp * g..(grp + 1) * g {
                    let n = ro.responses[k].len();
                    kept.push(Sample {
                        prompt: ro.prompts[k].clone(),
                        response: ro.responses[k].clone(),
                        logp: ro.logp[k * r..k * r + n].to_vec(),
                        ref_logp: ro.ref_logp[k * r..k * r + n].to_vec(),
                        ended: ro.ended_with_eos[k],
                        score: scores[k],
                        gold: golds.as_ref().map(|v| v[k]),
                    });
                }
            }
            if !cfg.dynamic_sampling {
                break;
            }
        }
        kept.truncate(cfg.batch_size * g);
        Ok((kept, all_scores, gen_batches, gen_s))
    }

    /// Lays the samples out and computes advantages.
    fn batch(&self, samples: &[Sample]) -> Result<Batch> {
        let prompts: Vec<Vec<u32>> = samples.iter().map(|s| s.prompt.clone()).collect();
        let responses: Vec<Vec<u32>> = samples.iter().map(|s| s.response.clone()).collect();
        let lay = Layout::new(&prompts, &responses)?;
        let r = lay.r;
        let pad = |f: &dyn Fn(&Sample) -> &[f32]| -> Vec<f32> {
            samples
                .iter()
                .flat_map(|s| {
                    let v = f(s);
                    v.iter()
                        .copied()
                        .chain(std::iter::repeat_n(0.0, r - v.len()))
                })
                .collect()
        };
        let logp = pad(&|s| &s.logp);
        let ref_logp = pad(&|s| &s.ref_logp);
        let kl = self
            .cfg
            .kl_estimator
            .estimate_all(&logp, &ref_logp, &lay.mask);
        let scores: Vec<f32> = samples.iter().map(|s| s.score).collect();
        let adv = advantages(&self.cfg, &scores, &kl, &lay.mask, r);
        let loss_mask = lay
            .mask
            .iter()
            .enumerate()
            .map(|(i, &m)| {
                if self.cfg.overlong_filter && !samples[i / r].ended {
                    0.0
                } else {
                    m
                }
            })
            .collect();
        Ok(Batch {
            lay,
            logp,
            ref_logp,
            loss_mask,
            adv,
        })
    }
}

/// What the updates of one step measured.
#[derive(Default)]
struct UpdateStats {
    loss: Vec<f32>,
    kl_loss: Vec<f32>,
    clip: Vec<ClipStats>,
    grad_norm: Vec<f64>,
    entropy: Vec<f32>,
    /// max |ratio - 1| over the first optimiser step of the first epoch (0: exactly on-policy).
    first_ratio_dev: Option<f32>,
    /// k3 summed over response tokens, and their count, from the update's forward (when it
    /// supplies pi_old's log-probs).
    kl_k3: f64,
    kl_tokens: f64,
}

impl RlTrainer {
    /// One optimiser step over `rows` of `b`: the normaliser over exactly these rows' loss
    /// tokens, gradients accumulated over micro-batches, then clipping and AdamW. Data-parallel:
    /// each rank takes its slice of `rows` (every rank holds the whole batch), the normaliser
    /// stays global, and gradients and statistics are summed across ranks before clipping.
    fn optimiser_step(&mut self, b: &Batch, rows: &[usize], st: &mut UpdateStats) -> Result<()> {
        let cfg = self.cfg.clone();
        let r = b.lay.r;
        let step_mask = take_rows(&b.loss_mask, rows, r);
        if step_mask.iter().all(|&m| m == 0.0) {
            return Ok(()); // every row filtered: nothing to learn from
        }
        let norm = Normaliser::new(cfg.loss_agg, &step_mask, r, cfg.max_new_tokens);
        let comm = dist::world();
        let (lo, hi) = ddp::rows_of(rows.len(), comm.rank(), comm.world_size());
        let local = &rows[lo..hi];
        let micro = match cfg.micro_batch_size {
            0 => local.len().max(1),
            m => m,
        };
        let total_tokens = step_mask.iter().sum::<f32>();
        let mut acc: optim::Grads = vec![];
        let mut sums = StepSums::default();
        for mb in local.chunks(micro) {
            let g = self.micro_step(
                b,
                mb,
                &norm,
                total_tokens,
                st.first_ratio_dev.is_none(),
                &mut sums,
            )?;
            optim::accumulate(&mut acc, &g, 1.0);
        }
        // DDP: the global gradient and statistics (a rank without rows adds zeros)
        ddp::all_reduce_grads_of(comm, &self.opt.params, &mut acc)?;
        let s = sums.all_reduce(comm)?;
        if let Some((rank, lv)) = s.bad_loss {
            return Err(Error::msg(format!(
                "rl step {}: loss is {lv}{}; stopping (the last checkpoint is kept)",
                self.step + 1,
                if comm.world_size() > 1 {
                    format!(" on rank {rank}")
                } else {
                    String::new()
                }
            )));
        }
        let mut g = acc;
        crate::train::run::test_poison_gradient(self.step + 1, &mut g);
        if optim::grads_non_finite(&g) {
            return Err(Error::msg(format!(
                "rl step {}: non-finite gradient; stopping (the last checkpoint is kept)",
                self.step + 1
            )));
        }
        st.grad_norm
            .push(optim::clip_grad_norm(&mut g, cfg.max_grad_norm));
        self.opt.step(&g, cfg.lr)?;
        st.loss.push(s.loss as f32);
        st.kl_loss.push(s.kl as f32);
        st.clip.push(ClipStats {
            low_mean: s.clip[0] as f32,
            high_mean: s.clip[1] as f32,
            region_mean: s.clip[2] as f32,
        });
        st.entropy
            .push((s.entropy / s.entropy_tokens.max(1.0)) as f32);
        if !cfg.old_logprobs_from_update() {
            st.first_ratio_dev.get_or_insert(s.ratio_dev as f32);
        }
        st.kl_k3 += s.kl_k3;
        st.kl_tokens += s.kl_tokens;
        Ok(())
    }

    /// The forward and backward of one micro-batch `mb` (rows of `b`) under the step's
    /// normaliser; adds its statistics to `sums` and returns its gradients.
    fn micro_step(
        &mut self,
        b: &Batch,
        mb: &[usize],
        norm: &Normaliser,
        total_tokens: f32,
        first: bool,
        sums: &mut StepSums,
    ) -> Result<optim::Grads> {
        let cfg = &self.cfg;
        let (r, dev) = (b.lay.r, self.model.device().clone());
        let lay = b.lay.rows(mb);
        let n = mb.len();
        let t = |v: Vec<f32>| Tensor::from_vec(v, (n, r), &dev);
        let mask = take_rows(&b.loss_mask, mb, r);
        let opts = Forward {
            scope: Some(ACTOR),
            freeze_base: true,
            fused_blocks: true,
            ..Default::default()
        };
        let (logp, logits) = rollout::response_logprobs(&self.model, &lay, opts, cfg.temperature)?;
        let ref_rows = take_rows(&b.ref_logp, mb, r);
        let ref_logp = t(ref_rows.clone())?;
        let from_update = cfg.old_logprobs_from_update();
        let old = if from_update {
            // pi_old is this forward's policy: the ratio is 1 and the gradient the on-policy one
            let lp = logp.detach();
            let a: Vec<f32> = lp.flatten_all()?.to_vec1()?;
            for ((a, rf), m) in a.iter().zip(&ref_rows).zip(&lay.mask) {
                if *m > 0.0 {
                    sums.kl_k3 += f64::from(KlEstimator::K3.estimate(*a, *rf));
                    sums.kl_tokens += 1.0;
                }
            }
            lp
        } else {
            t(take_rows(&b.logp, mb, r))?
        };
        let mask_t = t(mask.clone())?;
        if first && !from_update {
            let d = ((&logp - &old)?.abs()? * &mask_t)?
                .max_all()?
                .to_scalar::<f32>()?;
            sums.ratio_dev = sums.ratio_dev.max(f64::from(d));
        }
        let adv = t(take_rows(&b.adv, mb, r))?;
        let ent_tok = token_entropy(&logits)?; // [n, R]
        let adv = if cfg.entropy_advantage {
            let bonus = (ent_tok.detach() * 0.4)?.minimum(&(adv.abs()? * 0.5)?)?;
            (adv + bonus)?
        } else {
            adv
        };
        let w_t = t(norm.weights(&mask, r))?;
        let out = policy_loss(
            &logp,
            &old,
            Some(&ref_logp),
            &adv,
            &mask_t,
            &w_t,
            Clip {
                low: cfg.clip_low,
                high: cfg.clip_high,
                spo: cfg.spo,
            },
            (cfg.kl_placement == KlPlacement::Loss).then_some(KlInLoss {
                beta: cfg.kl_coef,
                estimator: cfg.kl_estimator,
            }),
        )?;
        let loss = if cfg.ent_coef != 0.0 {
            // the bonus is a token mean under the same normaliser as the policy term
            (&out.loss - ((&ent_tok * &w_t)?.sum_all()? * cfg.ent_coef as f64)?)?
        } else {
            out.loss.clone()
        };
        let lv = loss.to_scalar::<f32>()?;
        if !lv.is_finite() && sums.bad_loss.is_none() {
            sums.bad_loss = Some(lv);
        }
        sums.entropy += f64::from(
            (ent_tok.detach() * &mask_t)?
                .sum_all()?
                .to_scalar::<f32>()?,
        );
        let tokens = mask.iter().sum::<f32>();
        sums.entropy_tokens += f64::from(tokens);
        let w = f64::from(tokens / total_tokens);
        sums.clip[0] += f64::from(out.clip.low_mean) * w;
        sums.clip[1] += f64::from(out.clip.high_mean) * w;
        sums.clip[2] += f64::from(out.clip.region_mean) * w;
        sums.loss += f64::from(lv);
        sums.kl += f64::from(out.kl);
        optim::grads_take(&self.opt.params, self.model.backward(&loss)?)
    }
}

/// What one rank's micro-batches of an optimiser step measured; sums over the rows, so the sum
/// over ranks is the whole step's.
#[derive(Default)]
struct StepSums {
    loss: f64,
    kl: f64,
    /// low, high, region: each micro-batch's mean weighted by its share of the step's tokens.
    clip: [f64; 3],
    entropy: f64,
    entropy_tokens: f64,
    /// max |ratio - 1| on the first optimiser step.
    ratio_dev: f64,
    /// k3 over response tokens and their count, when pi_old comes from the update's forward.
    kl_k3: f64,
    kl_tokens: f64,
    /// The first non-finite loss.
    bad_loss: Option<f32>,
}

/// [`StepSums`] over all ranks: the sums summed, the ratio deviation maxed, and the first rank
/// with a non-finite loss (with its value).
struct StepTotals {
    loss: f64,
    kl: f64,
    clip: [f64; 3],
    entropy: f64,
    entropy_tokens: f64,
    ratio_dev: f64,
    kl_k3: f64,
    kl_tokens: f64,
    bad_loss: Option<(usize, f32)>,
}

impl StepSums {
    fn all_reduce(self, comm: &dyn dist::Communicator) -> Result<StepTotals> {
        let (rank, world) = (comm.rank(), comm.world_size());
        let mut v = vec![self.loss, self.kl, self.clip[0], self.clip[1], self.clip[2]];
        v.extend([
            self.entropy,
            self.entropy_tokens,
            self.kl_k3,
            self.kl_tokens,
        ]);
        // per-rank slots: the ratio deviation (for a max), a bad-loss flag and its value
        let slots = v.len();
        v.resize(slots + 3 * world, 0.0);
        v[slots + rank] = self.ratio_dev;
        if let Some(lv) = self.bad_loss {
            v[slots + world + rank] = 1.0;
            v[slots + 2 * world + rank] = f64::from(lv);
        }
        ddp::sum_f64(comm, &mut v)?;
        let at = |k: usize, i: usize| v[slots + k * world + i];
        Ok(StepTotals {
            loss: v[0],
            kl: v[1],
            clip: [v[2], v[3], v[4]],
            entropy: v[5],
            entropy_tokens: v[6],
            kl_k3: v[7],
            kl_tokens: v[8],
            ratio_dev: (0..world).map(|i| at(0, i)).fold(0.0, f64::max),
            bad_loss: (0..world)
                .find(|&i| at(1, i) != 0.0)
                .map(|i| (i, at(2, i) as f32)),
        })
    }
}

fn mean(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64).sum::<f64>() / x.len().max(1) as f64
}

impl RlTrainer {
    /// One iteration (rollout, scoring, advantages, updates); returns its metrics under TRL's
    /// names (`reward`, `reward_std`, `frac_reward_zero_std`, `completions/*`, `kl`,
    /// `entropy`, `clip_ratio/*`, `loss`) plus `gold/score` when a gold scorer is given.
    pub fn step(
        &mut self,
        prompts: &[Vec<u32>],
        eos: &[u32],
        scorer: &dyn Scorer,
        gold: Option<&dyn Scorer>,
    ) -> Result<serde_json::Value> {
        if prompts.is_empty() {
            return Err(Error::msg("rl: no prompts"));
        }
        let t0 = std::time::Instant::now();
        let cfg = self.cfg.clone();
        let (samples, drawn_scores, gen_batches, gen_s) =
            self.collect(prompts, eos, scorer, gold)?;
        let g = cfg.group_size;
        let mut st = UpdateStats::default();
        let t_update = std::time::Instant::now();
        if !samples.is_empty() {
            let b = self.batch(&samples)?;
            let n = b.lay.b;
            let mb = if cfg.minibatch_size == 0 {
                n
            } else {
                cfg.minibatch_size
            };
            for _ in 0..cfg.epochs {
                let mut order: Vec<usize> = (0..n).collect();
                if mb < n {
                    order.shuffle(&mut self.rng);
                }
                for rows in order.chunks(mb) {
                    self.optimiser_step(&b, rows, &mut st)?;
                }
            }
        }
        self.step += 1;
        // metrics over everything sampled this step (kept or not)
        let group_std: Vec<f32> = grpo::group_stats(&drawn_scores, g)
            .iter()
            .map(|s| s.1 as f32)
            .collect();
        let lens: Vec<f32> = samples.iter().map(|s| s.response.len() as f32).collect();
        let clipped =
            samples.iter().filter(|s| !s.ended).count() as f64 / samples.len().max(1) as f64;
        let (mut k3, mut ntok) = (0f64, 0f64);
        if cfg.old_logprobs_from_update() {
            // the rollout has no pi_old: the update's forward measured it
            (k3, ntok) = (st.kl_k3, st.kl_tokens);
        } else {
            for s in &samples {
                for (a, r) in s.logp.iter().zip(&s.ref_logp) {
                    k3 += KlEstimator::K3.estimate(*a, *r) as f64;
                    ntok += 1.0;
                }
            }
        }
        let kl_seq = k3 / samples.len().max(1) as f64;
        let avg = |f: &dyn Fn(&ClipStats) -> f32| mean(&st.clip.iter().map(f).collect::<Vec<_>>());
        let mut m = json!({
            "step": self.step,
            "reward": mean(&drawn_scores),
            "reward_std": mean(&group_std),
            "frac_reward_zero_std": grpo::frac_zero_std(&drawn_scores, g),
            "completions/mean_length": mean(&lens),
            "completions/clipped_ratio": clipped,
            "kl": k3 / ntok.max(1.0),
            "kl_per_response": kl_seq,
            "entropy": mean(&st.entropy),
            "loss": mean(&st.loss),
            "kl_loss": mean(&st.kl_loss),
            "clip_ratio/low_mean": avg(&|c| c.low_mean),
            "clip_ratio/high_mean": avg(&|c| c.high_mean),
            "clip_ratio/region_mean": avg(&|c| c.region_mean),
            "grad_norm": st.grad_norm.iter().sum::<f64>() / st.grad_norm.len().max(1) as f64,
            "ratio/first_step_max_dev": st.first_ratio_dev,
            "num_tokens": lens.iter().map(|&l| f64::from(l)).sum::<f64>(),
            "dynamic/groups_kept": samples.len() / g,
            "dynamic/gen_batches": gen_batches,
            "time/rollout_s": gen_s[0] + gen_s[1],
            "time/generate_s": gen_s[0],
            "time/logprobs_s": gen_s[1],
            "time/update_s": t_update.elapsed().as_secs_f64(),
            "time/step_s": t0.elapsed().as_secs_f64(),
        });
        let golds: Vec<f32> = samples.iter().filter_map(|s| s.gold).collect();
        if !golds.is_empty() {
            m["gold/score"] = json!(mean(&golds));
        }
        Ok(m)
    }
}

/// Runs until `trainer.cfg.steps`, logging metrics and plots into `out`, checkpointing into
/// `out/checkpoint` every `save_every` steps and at the end, and exporting `out/policy`
/// (actor merged). `on_step(metrics)` is called after every step. When `stop` is set
/// (Ctrl-C), the run checkpoints after the current step and returns.
#[allow(clippy::too_many_arguments)]
pub fn run(
    trainer: &mut RlTrainer,
    prompts: &[Vec<u32>],
    eos: &[u32],
    scorer: &dyn Scorer,
    gold: Option<&dyn Scorer>,
    out: &Path,
    stop: &std::sync::atomic::AtomicBool,
    mut on_step: impl FnMut(&serde_json::Value),
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let ck = out.join("checkpoint");
    let resume_at = (trainer.step > 0).then_some(trainer.step as u64);
    // data-parallel: rank 0 keeps the log and plots; a stop on any rank stops all at one step
    let main = dist::is_main();
    let mut log = if main {
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
            stop.load(std::sync::atomic::Ordering::Relaxed),
        )?;
        if (stopping || (every > 0 && trainer.step.is_multiple_of(every)))
            && trainer.step < trainer.cfg.steps
        {
            trainer.save(&ck)?;
            plot(&log, out, trainer.cfg.algorithm)?;
            if stopping {
                tracing::warn!(
                    "rl: stopped at step {}; checkpoint in {} (resume with --resume)",
                    trainer.step,
                    ck.display()
                );
                return Ok(());
            }
        }
    }
    trainer.save(&ck)?;
    trainer.export_policy(&out.join("policy"))?;
    plot(&log, out, trainer.cfg.algorithm)
}

/// reward.svg (reward and gold score), kl.svg, length.svg (rank 0 only).
pub fn plot(log: &MetricsLog, out: &Path, a: Algorithm) -> Result<()> {
    if !dist::is_main() {
        return Ok(());
    }
    let name = a.name();
    log.plot(
        &out.join("reward.svg"),
        &format!("{name}: reward and gold score"),
        "step",
        &["reward", "gold/score", "frac_reward_zero_std"],
    )?;
    log.plot(
        &out.join("kl.svg"),
        &format!("{name}: KL to the reference (k3, nats per token)"),
        "step",
        &["kl"],
    )?;
    log.plot(
        &out.join("length.svg"),
        &format!("{name}: response length"),
        "step",
        &["completions/mean_length", "completions/clipped_ratio"],
    )
}
