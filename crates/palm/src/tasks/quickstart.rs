//! The whole RLHF pipeline on the paths task, small enough for a laptop CPU, on the library's
//! own stages (what `palm train`, `palm reward train` and `palm ppo` run):
//! 1. SFT: a small PaLM learns random walks (valid, mostly suboptimal paths) with the LM/SFT
//!    [`Trainer`] (loss on response tokens);
//! 2. preference pairs: two samples per prompt from the SFT model, labelled by the gold scorer
//!    with some label noise (humans disagree); held-out pairs keep clean labels;
//! 3. reward model: [`RewardModel`] on the SFT model (a LoRA scope `reward` + a scalar head read
//!    at the last token, EOS), trained with the Bradley-Terry loss by [`reward_train::train`];
//! 4. PPO against the LEARNED reward model, with the gold score logged beside it (the standard
//!    recipe's critic starts as a copy of the reward model);
//! 5. gold score and share of optimal answers of the policy before and after, RM held-out
//!    accuracy, KL, time per stage. Everything is seeded.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::{LoraSpec, LoraTargets, PalmConfig};
use crate::error::{Error, Result};
use crate::model::{Model, Palm};
use crate::rlhf::dpo::{self, DpoConfig};
use crate::rlhf::online::{self, Algorithm, RlConfig, RlTrainer};
use crate::rlhf::ppo::{self, CriticInit, PpoConfig, PpoTrainer, Recipe};
use crate::rlhf::preference_data::{truncate, EncodedPair, TruncationStats};
use crate::rlhf::reward::{RewardConfig, RewardModel};
use crate::rlhf::reward_train::{self, RewardSummary, RewardTrainConfig, StepInfo};
use crate::rlhf::rollout::{Actors, RolloutConfig};
use crate::rlhf::scorer::RewardModelScorer;
use crate::rng;
use crate::sample::{generate, GenerateRequest, Sampling};
use crate::tasks::paths::PathsTask;
use crate::tokenizer::{Tokenizer, BYTE_EOS};
use crate::train::data::{BatchOrder, Corpus, Example};
use crate::train::optim::OptimConfig;
use crate::train::trainer::{DataSpec, Summary as TrainSummary, TrainConfig, Trainer};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuickstartConfig {
    pub seed: u64,
    pub model: PalmConfig,
    pub sft_examples: usize,
    pub sft_steps: usize,
    pub sft_batch: usize,
    pub sft_lr: f64,
    /// Sampling rounds over all prompts for preference pairs (two samples each).
    pub pair_rounds: usize,
    pub label_noise: f32,
    pub heldout_fraction: f32,
    /// Passes over the training pairs.
    pub rm_epochs: usize,
    pub rm_batch: usize,
    pub rm_lr: f64,
    pub rm_lora_r: usize,
    pub ppo: PpoConfig,
    /// The critic-free algorithms (`--algorithm grpo|...|all`); the algorithm field is set per run.
    pub online: RlConfig,
    /// DPO on the labelled pairs (`--algorithm dpo|all`).
    pub dpo: DpoConfig,
}

impl Default for QuickstartConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            model: PalmConfig {
                heads: 4,
                dim_head: 16,
                max_seq_len: 32,
                ..PalmConfig::new(256, 64, 2)
            },
            sft_examples: 4000,
            sft_steps: 600,
            sft_batch: 32,
            sft_lr: 3e-3,
            pair_rounds: 12,
            label_noise: 0.1,
            heldout_fraction: 0.2,
            rm_epochs: 2,
            rm_batch: 32,
            rm_lr: 2e-3,
            rm_lora_r: 8,
            ppo: PpoConfig {
                steps: 100,
                batch_size: 64,
                minibatch_size: 16,
                epochs: 4,
                max_new_tokens: 11,
                actor_lr: 1e-3,
                critic_lr: 2e-3,
                kl_coef: 0.3,
                critic_init: CriticInit::Reward,
                ..PpoConfig::default()
            },
            // the PPO budget: 100 steps of 64 responses (16 prompts x 4), 4 epochs of
            // minibatches of 16, LoRA rank 8, PPO's KL coefficient 0.3 for every algorithm (each
            // keeps its own estimator and placement); lr 2e-3 (GRPO's gold 0.741 at 1e-3, 0.773 at
            // 2e-3 on seed 0)
            online: RlConfig {
                steps: 100,
                batch_size: 16,
                group_size: 4,
                max_new_tokens: 11,
                epochs: 4,
                minibatch_size: 16,
                lr: 2e-3,
                kl_coef: 0.3,
                ..RlConfig::for_algorithm(Algorithm::Grpo)
            },
            dpo: DpoConfig {
                loss: crate::rlhf::dpo::LossConfig {
                    beta: 0.5,
                    ..Default::default()
                },
                epochs: 2,
                batch_size: 32,
                lr: 2e-3,
                min_lr: 2e-4,
                lora_targets: LoraTargets::AttentionAndFf,
                ..DpoConfig::default()
            },
        }
    }
}

/// Samples one response per prompt (temperature 1, the PPO rollout distribution).
pub fn sample_responses(
    model: &Model,
    scope: Option<&str>,
    prompts: &[Vec<u32>],
    max_new: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    Ok(generate(
        model,
        &GenerateRequest {
            prompts: prompts.to_vec(),
            max_new_tokens: max_new,
            eos: vec![BYTE_EOS],
            sampling: Sampling::default(),
            seed,
            scope: scope.map(String::from),
            disable_lora: false,
        },
        |_, _| {},
    )?
    .completions)
}

/// The gold scorer's verdict on a policy: mean score and the share of answers that are a
/// shortest valid path (score 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GoldEval {
    pub score: f32,
    pub optimal_fraction: f32,
}

/// Gold score and optimal share over `rounds` samples (temperature 1) for every query.
pub fn gold_eval(
    task: &PathsTask,
    model: &Model,
    scope: Option<&str>,
    rounds: usize,
    seed: u64,
) -> Result<GoldEval> {
    let qs = task.queries();
    let prompts: Vec<Vec<u32>> = qs.iter().map(|&q| task.prompt_ids(q)).collect();
    let (mut total, mut optimal) = (0.0, 0usize);
    for k in 0..rounds {
        let resp = sample_responses(model, scope, &prompts, task.max_nodes + 1, seed + k as u64)?;
        for (&q, r) in qs.iter().zip(&resp) {
            let s = task.score(q, r);
            total += s;
            optimal += usize::from(s == 1.0);
        }
    }
    let n = (rounds * qs.len()).max(1) as f32;
    Ok(GoldEval {
        score: total / n,
        optimal_fraction: optimal as f32 / n,
    })
}

// ---------------------------------------------------------------------------------------------
// 1. SFT with the library's trainer (what `palm train` runs)

/// Where the SFT stage writes its final model (the trainer's `final/`).
pub fn sft_model_dir(sft_run: &Path) -> PathBuf {
    sft_run.join("final")
}

/// SFT examples of the task as the trainer's corpus: prompt ++ response, loss on the response
/// (path letters and EOS) only.
pub fn sft_corpus(task: &PathsTask, cfg: &QuickstartConfig) -> Corpus {
    let mut r = rng::stream(cfg.seed, 0x5f7);
    let to_example = |(p, resp): (Vec<u32>, Vec<u32>)| Example {
        loss: std::iter::repeat_n(0u8, p.len())
            .chain(std::iter::repeat_n(1u8, resp.len()))
            .collect(),
        ids: p.into_iter().chain(resp).collect(),
    };
    let train = task.sft_examples(cfg.sft_examples, &mut r);
    let val = task.sft_examples(SFT_VAL_EXAMPLES, &mut r);
    Corpus::Sft {
        train: train.into_iter().map(to_example).collect(),
        val: val.into_iter().map(to_example).collect(),
    }
}

const SFT_VAL_EXAMPLES: usize = 128;

/// The SFT stage's training config (random batches of examples, loss on responses, AdamW,
/// warmup 5 % then cosine to lr / 10, clip 1).
pub fn sft_train_config(cfg: &QuickstartConfig) -> TrainConfig {
    TrainConfig {
        steps: cfg.sft_steps,
        batch_size: cfg.sft_batch,
        grad_accum: 1,
        seq_len: cfg.model.max_seq_len,
        lr: cfg.sft_lr,
        min_lr: cfg.sft_lr * 0.1,
        warmup: cfg.sft_steps / 20,
        optimizer: OptimConfig::adamw(),
        max_grad_norm: 1.0,
        eval_every: (cfg.sft_steps / 6).max(1),
        eval_batches: SFT_VAL_EXAMPLES.div_ceil(cfg.sft_batch.max(1)),
        sample_every: 0,
        sample_tokens: 0,
        save_every: 0,
        keep_checkpoints: 1,
        seed: cfg.seed,
        order: BatchOrder::Random,
        val_fraction: 0.0,
        lora: None,
        export_batches: false,
    }
}

/// Pre-trains/SFTs a fresh small PaLM on random walks with [`Trainer`] in `out` (metrics.jsonl,
/// loss.svg, checkpoints/, final/). Returns the model and the trainer's summary.
pub fn train_sft(
    task: &PathsTask,
    cfg: &QuickstartConfig,
    out: &Path,
    dev: &Device,
) -> Result<(Model, TrainSummary)> {
    let model: Model = Palm::new(&cfg.model, cfg.seed, dev)?.into();
    let data = DataSpec {
        tokenizer: Tokenizer::Bytes,
        tokenizer_arg: "bytes".into(),
        files: vec![],
        corpus: sft_corpus(task, cfg),
    };
    let mut trainer = Trainer::new(sft_train_config(cfg), model, data, out)?;
    let summary = trainer.run(&std::sync::atomic::AtomicBool::new(false))?;
    Ok((trainer.model, summary))
}

// ---------------------------------------------------------------------------------------------
// 2-3. Preference pairs and a LoRA reward model (`RewardModel` + `reward_train`, what
// `palm reward train` runs)

/// A preference pair; `chosen` has the higher gold score (before label noise).
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

/// Samples pairs from `model` and labels them with the gold scorer (ties dropped). Returns
/// (train pairs with label noise, held-out pairs with clean labels).
pub fn make_pairs(
    task: &PathsTask,
    model: &Model,
    cfg: &QuickstartConfig,
) -> Result<(Vec<Pair>, Vec<Pair>)> {
    let mut r = rng::stream(cfg.seed, 0xba1);
    let qs = task.queries();
    let prompts: Vec<Vec<u32>> = qs.iter().map(|&q| task.prompt_ids(q)).collect();
    let mut pairs = vec![];
    for round in 0..cfg.pair_rounds {
        let a = sample_responses(
            model,
            None,
            &prompts,
            task.max_nodes + 1,
            cfg.seed + 1000 + 2 * round as u64,
        )?;
        let b = sample_responses(
            model,
            None,
            &prompts,
            task.max_nodes + 1,
            cfg.seed + 1001 + 2 * round as u64,
        )?;
        for (i, &q) in qs.iter().enumerate() {
            let (sa, sb) = (task.score(q, &a[i]), task.score(q, &b[i]));
            if sa == sb {
                continue;
            }
            let (c, rj) = if sa > sb {
                (&a[i], &b[i])
            } else {
                (&b[i], &a[i])
            };
            pairs.push(Pair {
                prompt: prompts[i].clone(),
                chosen: c.clone(),
                rejected: rj.clone(),
            });
        }
    }
    // shuffle, split, then add noise to the training labels only
    use rand::seq::SliceRandom;
    pairs.shuffle(&mut r);
    let n_held = ((pairs.len() as f32) * cfg.heldout_fraction).round() as usize;
    let held = pairs.split_off(pairs.len() - n_held);
    for p in pairs.iter_mut() {
        if r.random::<f32>() < cfg.label_noise {
            std::mem::swap(&mut p.chosen, &mut p.rejected);
        }
    }
    Ok((pairs, held))
}

/// Pairs as the reward trainer takes them: a trailing EOS is dropped and one appended, as
/// `palm reward train` encodes its data and as [`RewardModelScorer`] scores PPO's responses.
pub fn encode_pairs(pairs: &[Pair], max_len: usize) -> (Vec<EncodedPair>, TruncationStats) {
    let mut stats = TruncationStats::default();
    let enc = |p: &[u32], r: &[u32], st: &mut TruncationStats| {
        let r = match r.split_last() {
            Some((&BYTE_EOS, body)) => body,
            _ => r,
        };
        truncate(p, r, Some(BYTE_EOS), max_len, st)
    };
    let out = pairs
        .iter()
        .map(|p| EncodedPair {
            chosen: enc(&p.prompt, &p.chosen, &mut stats),
            rejected: enc(&p.prompt, &p.rejected, &mut stats),
        })
        .collect();
    (out, stats)
}

/// The reward-model stage's training config.
pub fn rm_train_config(cfg: &QuickstartConfig, train_pairs: usize) -> RewardTrainConfig {
    let steps = train_pairs.div_ceil(cfg.rm_batch.max(1)) * cfg.rm_epochs;
    RewardTrainConfig {
        epochs: cfg.rm_epochs,
        batch_size: cfg.rm_batch,
        lr: cfg.rm_lr,
        min_lr: cfg.rm_lr * 0.1,
        warmup_steps: steps / 20,
        seed: cfg.seed,
        eval_every: (steps / 6).max(1),
        save_every: 0,
        ..RewardTrainConfig::default()
    }
}

/// Trains a reward model on the SFT model: a LoRA scope `reward` (attention and feed-forward)
/// and a scalar head at the last token (EOS), Bradley-Terry, with [`reward_train::train`] in
/// `out` (metrics.jsonl, metrics.svg, checkpoint/, reward_model/, summary.json). Returns the
/// model and the trainer's summary (held-out accuracy on clean labels).
pub fn train_rm(
    sft_dir: &Path,
    train: &[Pair],
    held: &[Pair],
    cfg: &QuickstartConfig,
    out: &Path,
    dev: &Device,
    on_step: impl FnMut(&StepInfo),
) -> Result<(RewardModel, RewardSummary)> {
    if train.is_empty() {
        return Err(Error::msg(
            "reward model: no preference pairs (every sampled pair tied)",
        ));
    }
    let trunk = crate::load::load_model(sft_dir, dev)?;
    let rm = RewardModel::new(
        trunk,
        RewardConfig::default(),
        Some(LoraSpec {
            r: cfg.rm_lora_r,
            alpha: None,
            targets: LoraTargets::AttentionAndFf,
        }),
        cfg.seed,
    )?;
    let (tr, stats) = encode_pairs(train, rm.max_len());
    let (he, _) = encode_pairs(held, rm.max_len());
    let summary = reward_train::train(
        &rm,
        &tr,
        &he,
        &rm_train_config(cfg, tr.len()),
        out,
        false,
        Some(stats),
        on_step,
    )?;
    Ok((rm, summary))
}

// ---------------------------------------------------------------------------------------------
// 4-5. PPO and the summary

#[derive(Debug, Clone, Serialize)]
pub struct PpoReport {
    pub recipe: Recipe,
    pub gold_score_ppo: f32,
    pub gold_optimal_fraction_ppo: f32,
    pub critic_init: CriticInit,
    pub rm_score_final: f64,
    pub kl: f64,
    pub seconds: f64,
    pub dir: PathBuf,
}

#[allow(clippy::too_many_arguments)]
pub fn run_ppo(
    task: &PathsTask,
    sft_dir: &Path,
    rm: &RewardModelScorer,
    recipe: Recipe,
    cfg: &QuickstartConfig,
    out: &Path,
    dev: &Device,
    mut on_step: impl FnMut(&serde_json::Value),
) -> Result<PpoReport> {
    let t0 = Instant::now();
    let model = crate::load::load_model(sft_dir, dev)?;
    let mut pcfg = PpoConfig {
        recipe,
        ..cfg.ppo.clone()
    };
    if recipe == Recipe::PalmRlhfPytorch {
        let orig = PpoConfig::for_recipe(recipe);
        pcfg.clip_range = orig.clip_range;
        pcfg.clip_range_value = orig.clip_range_value;
        pcfg.ent_coef = orig.ent_coef;
        pcfg.kl_coef = orig.kl_coef;
        pcfg.value = orig.value;
        pcfg.pooled_values = orig.pooled_values;
        pcfg.score_offset = orig.score_offset;
        // its pooled HL-Gauss critic has no exact copy of the reward model's scalar head
        pcfg.critic_init = CriticInit::Zeros;
    }
    let critic_init = pcfg.critic_init;
    let mut trainer = PpoTrainer::with_reward_model(model, pcfg, Some(&rm.model))?;
    let prompts: Vec<Vec<u32>> = task.queries().iter().map(|&q| task.prompt_ids(q)).collect();
    let mut last = serde_json::Value::Null;
    ppo::run(
        &mut trainer,
        &prompts,
        Some(BYTE_EOS),
        rm,
        Some(task),
        out,
        |m| {
            last = m.clone();
            on_step(m)
        },
    )?;
    let gold = gold_eval(
        task,
        &trainer.model,
        trainer.policy_scope(),
        4,
        cfg.seed + 77,
    )?;
    Ok(PpoReport {
        recipe,
        gold_score_ppo: gold.score,
        gold_optimal_fraction_ppo: gold.optimal_fraction,
        critic_init,
        rm_score_final: last["objective/scores"].as_f64().unwrap_or(f64::NAN),
        kl: last["objective/kl"].as_f64().unwrap_or(f64::NAN),
        seconds: t0.elapsed().as_secs_f64(),
        dir: out.to_path_buf(),
    })
}

// ---------------------------------------------------------------------------------------------
// The other algorithms on the same SFT policy and reward model (`--algorithm all`)

/// One algorithm's row of the comparison table.
#[derive(Debug, Clone, Serialize)]
pub struct AlgorithmReport {
    pub algorithm: String,
    pub gold_score: f32,
    pub optimal_fraction: f32,
    /// KL(policy || SFT reference) in nats per response (k3, summed over tokens, mean over
    /// responses sampled at temperature 1), measured the same way for every algorithm.
    pub kl: f64,
    /// The learned reward model's mean score of the same samples.
    pub rm_score: f64,
    pub seconds: f64,
    pub dir: PathBuf,
}

/// KL to the reference (LoRA off) and the reward model's score of one sample per query.
pub fn policy_kl_and_rm(
    task: &PathsTask,
    model: &Model,
    scope: Option<&str>,
    rm: &RewardModelScorer,
    seed: u64,
) -> Result<(f64, f64)> {
    use crate::rlhf::scorer::Scorer;
    let prompts: Vec<Vec<u32>> = task.queries().iter().map(|&q| task.prompt_ids(q)).collect();
    let ro = crate::rlhf::rollout::collect(
        &Actors {
            policy: model,
            policy_scope: scope,
            frozen: model,
            critic: None,
        },
        &prompts,
        &RolloutConfig {
            max_new_tokens: task.max_nodes + 1,
            temperature: 1.0,
            eos: vec![BYTE_EOS],
            seed,
            first_row: 0,
            forward_batch: 0,
            policy_logprobs: true,
        },
    )?;
    let k = crate::rlhf::kl::KlEstimator::K3.estimate_all(&ro.logp, &ro.ref_logp, &ro.layout.mask);
    let kl = k.iter().map(|&x| x as f64).sum::<f64>() / prompts.len().max(1) as f64;
    let s = rm.score(&ro.prompts, &ro.responses)?;
    let rm_mean = s.iter().map(|&x| x as f64).sum::<f64>() / s.len().max(1) as f64;
    Ok((kl, rm_mean))
}

/// Runs a critic-free algorithm against the learned reward model (gold logged beside it).
#[allow(clippy::too_many_arguments)]
pub fn run_online(
    task: &PathsTask,
    sft_dir: &Path,
    rm: &RewardModelScorer,
    algorithm: Algorithm,
    cfg: &QuickstartConfig,
    out: &Path,
    dev: &Device,
    on_step: impl FnMut(&serde_json::Value),
) -> Result<AlgorithmReport> {
    let t0 = Instant::now();
    let model = crate::load::load_model(sft_dir, dev)?;
    let rcfg = RlConfig {
        algorithm,
        seed: cfg.seed,
        ..cfg.online.clone()
    };
    // the algorithm's own estimator, aggregation, KL placement and clip defaults; the KL
    // coefficient is the quickstart's (one strength for every algorithm, as PPO's)
    let d = RlConfig::for_algorithm(algorithm);
    let rcfg = RlConfig {
        kl_estimator: d.kl_estimator,
        kl_placement: d.kl_placement,
        loss_agg: d.loss_agg,
        clip_high: d.clip_high,
        dynamic_sampling: d.dynamic_sampling,
        overlong_filter: d.overlong_filter,
        ..rcfg
    };
    let mut trainer = RlTrainer::new(model, rcfg)?;
    let prompts: Vec<Vec<u32>> = task.queries().iter().map(|&q| task.prompt_ids(q)).collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    online::run(
        &mut trainer,
        &prompts,
        &[BYTE_EOS],
        rm,
        Some(task),
        out,
        &stop,
        on_step,
    )?;
    let scope = Some(crate::rlhf::rollout::ACTOR);
    let gold = gold_eval(task, &trainer.model, scope, 4, cfg.seed + 77)?;
    let (kl, rm_score) = policy_kl_and_rm(task, &trainer.model, scope, rm, cfg.seed + 99)?;
    Ok(AlgorithmReport {
        algorithm: algorithm.name().into(),
        gold_score: gold.score,
        optimal_fraction: gold.optimal_fraction,
        kl,
        rm_score,
        seconds: t0.elapsed().as_secs_f64(),
        dir: out.to_path_buf(),
    })
}

/// DPO on the quickstart's labelled pairs (the reward model's training data, label noise
/// included), evaluated on the held-out pairs and by the gold scorer.
#[allow(clippy::too_many_arguments)]
pub fn run_dpo(
    task: &PathsTask,
    sft_dir: &Path,
    rm: &RewardModelScorer,
    train: &[Pair],
    held: &[Pair],
    cfg: &QuickstartConfig,
    out: &Path,
    dev: &Device,
    mut on_step: impl FnMut(u64, u64),
) -> Result<AlgorithmReport> {
    let t0 = Instant::now();
    let mut model = crate::load::load_model(sft_dir, dev)?;
    let max_len = model.max_seq_len();
    let (tr, _) = encode_pairs(train, max_len);
    let (he, _) = encode_pairs(held, max_len);
    let dcfg = DpoConfig {
        seed: cfg.seed,
        ..cfg.dpo.clone()
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    dpo::train(&mut model, &tr, &he, &dcfg, out, false, &stop, |i| {
        on_step(i.step, i.total_steps)
    })?;
    let scope = Some(dpo::SCOPE);
    let gold = gold_eval(task, &model, scope, 4, cfg.seed + 77)?;
    let (kl, rm_score) = policy_kl_and_rm(task, &model, scope, rm, cfg.seed + 99)?;
    Ok(AlgorithmReport {
        algorithm: "dpo".into(),
        gold_score: gold.score,
        optimal_fraction: gold.optimal_fraction,
        kl,
        rm_score,
        seconds: t0.elapsed().as_secs_f64(),
        dir: out.to_path_buf(),
    })
}
