//! The whole RLHF pipeline on the paths task, small enough for a laptop CPU:
//! 1. SFT: a small PaLM learns random walks (valid, mostly suboptimal paths);
//! 2. preference pairs: two samples per prompt from the SFT model, labelled by the gold scorer
//!    with some label noise (humans disagree); held-out pairs keep clean labels;
//! 3. reward model: the SFT model + a LoRA scope `reward` + a scalar head read at the last
//!    token (EOS), trained with the Bradley-Terry loss;
//! 4. PPO against the LEARNED reward model, with the gold score logged beside it;
//! 5. gold score of the policy before and after, RM held-out accuracy, KL, time per stage.
//!
//! The SFT and reward-model loops here are deliberately minimal (the crate's LM and
//! reward-model trainers are the general tools); everything is seeded.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{LoraSpec, LoraTargets, PalmConfig};
use crate::error::{Error, Result};
use crate::model::{cross_entropy, Forward, Model, Palm};
use crate::rlhf::ppo::{self, PpoConfig, PpoTrainer, Recipe};
use crate::rlhf::scorer::Scorer;
use crate::rlhf::value::{ValueHead, ValueKind};
use crate::rng;
use crate::sample::{generate, GenerateRequest, Sampling};
use crate::tasks::paths::PathsTask;
use crate::tokenizer::BYTE_EOS;
use crate::train::metrics::MetricsLog;
use crate::train::optim::{self, OptimConfig, Optimizer};

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
    pub rm_steps: usize,
    pub rm_batch: usize,
    pub rm_lr: f64,
    pub rm_lora_r: usize,
    pub ppo: PpoConfig,
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
            rm_steps: 300,
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
                ..PpoConfig::default()
            },
        }
    }
}

/// Right-padded (prompt ++ response) rows: ids [B, L], key mask [B, L], lengths.
fn right_padded(
    prompts: &[Vec<u32>],
    responses: &[Vec<u32>],
    dev: &Device,
) -> Result<(Tensor, Tensor, Vec<usize>)> {
    let seqs: Vec<Vec<u32>> = prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| p.iter().chain(r).copied().collect())
        .collect();
    let l = seqs.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let b = seqs.len();
    let mut ids = vec![0i64; b * l];
    let mut km = vec![0u8; b * l];
    for (i, s) in seqs.iter().enumerate() {
        for (j, &t) in s.iter().enumerate() {
            ids[i * l + j] = t as i64;
            km[i * l + j] = 1;
        }
    }
    Ok((
        Tensor::from_vec(ids, (b, l), dev)?,
        Tensor::from_vec(km, (b, l), dev)?,
        seqs.iter().map(Vec::len).collect(),
    ))
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
            eos: Some(BYTE_EOS),
            sampling: Sampling::default(),
            seed,
            scope: scope.map(String::from),
            disable_lora: false,
        },
        |_, _| {},
    )?
    .completions)
}

/// Mean gold score over `rounds` samples for every query of the task.
pub fn gold_eval(
    task: &PathsTask,
    model: &Model,
    scope: Option<&str>,
    rounds: usize,
    seed: u64,
) -> Result<f32> {
    let qs = task.queries();
    let prompts: Vec<Vec<u32>> = qs.iter().map(|&q| task.prompt_ids(q)).collect();
    let mut total = 0.0;
    for k in 0..rounds {
        let resp = sample_responses(model, scope, &prompts, task.max_nodes + 1, seed + k as u64)?;
        total += qs
            .iter()
            .zip(&resp)
            .map(|(&q, r)| task.score(q, r))
            .sum::<f32>();
    }
    Ok(total / (rounds * qs.len()) as f32)
}

// ---------------------------------------------------------------------------------------------
// 1. SFT

pub fn train_sft(
    task: &PathsTask,
    cfg: &QuickstartConfig,
    out: &Path,
    dev: &Device,
    mut progress: impl FnMut(usize, f32),
) -> Result<Model> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut r = rng::stream(cfg.seed, 0x5f7);
    let data = task.sft_examples(cfg.sft_examples, &mut r);
    let model: Model = Palm::new(&cfg.model, cfg.seed, dev)?.into();
    let params: Vec<_> = model
        .vars()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut opt = Optimizer::new(params, OptimConfig::adamw());
    let mut log = MetricsLog::open(out, None)?;
    for step in 0..cfg.sft_steps {
        let batch: Vec<&(Vec<u32>, Vec<u32>)> = (0..cfg.sft_batch)
            .map(|_| &data[r.random_range(0..data.len())])
            .collect();
        let ps: Vec<Vec<u32>> = batch.iter().map(|x| x.0.clone()).collect();
        let rs: Vec<Vec<u32>> = batch.iter().map(|x| x.1.clone()).collect();
        let (ids, _, lens) = right_padded(&ps, &rs, dev)?;
        let l = ids.dim(1)?;
        // labels are ids[:, 1:]; only response tokens count
        let mut mask = vec![0f32; batch.len() * (l - 1)];
        for (i, (p, len)) in ps.iter().zip(&lens).enumerate() {
            for j in p.len()..*len {
                mask[i * (l - 1) + j - 1] = 1.0;
            }
        }
        let mask = Tensor::from_vec(mask, (batch.len(), l - 1), dev)?;
        let logits = model.forward(&ids.narrow(1, 0, l - 1)?, &Forward::default())?;
        let loss = cross_entropy(&logits, &ids.narrow(1, 1, l - 1)?, Some(&mask))?;
        let lv = loss.to_scalar::<f32>()?;
        if !lv.is_finite() {
            return Err(Error::msg(format!(
                "sft step {step}: loss is {lv}; stopping"
            )));
        }
        let g = loss.backward()?;
        let mut grads = optim::grads_of(&opt.params, &g)?;
        optim::clip_grad_norm(&mut grads, 1.0);
        let lr = optim::lr_at(
            step,
            cfg.sft_lr,
            cfg.sft_lr * 0.1,
            cfg.sft_steps / 20,
            cfg.sft_steps,
        );
        opt.step(&grads, lr)?;
        log.log(json!({"step": step + 1, "loss": lv, "lr": lr}))?;
        progress(step + 1, lv);
    }
    log.plot(
        &out.join("loss.svg"),
        "SFT loss (response tokens)",
        "step",
        &["loss"],
    )?;
    model.save(&out.join("model"))?;
    Ok(model)
}

// ---------------------------------------------------------------------------------------------
// 2-3. Preference pairs and a LoRA reward model

pub const REWARD: &str = "reward";

/// A reward model: a model with the `reward` LoRA scope and a scalar head on the hidden state
/// of the last real token.
pub struct LoraRewardModel {
    pub model: Model,
    pub head: ValueHead,
}

impl LoraRewardModel {
    pub fn scores_t(&self, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Tensor> {
        let dev = self.model.device();
        let (ids, km, lens) = right_padded(prompts, responses, dev)?;
        let (b, l) = ids.dims2()?;
        let opts = Forward {
            scope: Some(REWARD),
            key_mask: Some(&km),
            freeze_base: true,
            ..Default::default()
        };
        let h = self.model.embeddings(&ids, &opts, None)?; // [B, L, C]
        let c = h.dim(2)?;
        let last: Vec<u32> = lens
            .iter()
            .enumerate()
            .map(|(i, n)| (i * l + n - 1) as u32)
            .collect();
        let idx = Tensor::from_vec(last, b, dev)?;
        let h_last = h.reshape((b * l, c))?.index_select(&idx, 0)?; // [B, C]
        self.head.value_from_logits(&self.head.logits(&h_last)?)
    }
}

impl Scorer for LoraRewardModel {
    fn score(&self, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(prompts.len());
        for (p, r) in prompts.chunks(64).zip(responses.chunks(64)) {
            out.extend(
                self.scores_t(p, r)?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(out)
    }
}

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

pub fn pair_accuracy(rm: &LoraRewardModel, pairs: &[Pair]) -> Result<f32> {
    if pairs.is_empty() {
        return Ok(f32::NAN);
    }
    let ps: Vec<Vec<u32>> = pairs.iter().map(|p| p.prompt.clone()).collect();
    let c: Vec<Vec<u32>> = pairs.iter().map(|p| p.chosen.clone()).collect();
    let rj: Vec<Vec<u32>> = pairs.iter().map(|p| p.rejected.clone()).collect();
    let (sc, sr) = (rm.score(&ps, &c)?, rm.score(&ps, &rj)?);
    Ok(sc.iter().zip(&sr).filter(|(a, b)| a > b).count() as f32 / pairs.len() as f32)
}

#[allow(clippy::too_many_arguments)]
pub fn train_rm(
    sft_dir: &Path,
    train: &[Pair],
    held: &[Pair],
    cfg: &QuickstartConfig,
    out: &Path,
    dev: &Device,
    mut progress: impl FnMut(usize, f32),
) -> Result<(LoraRewardModel, f32)> {
    if train.is_empty() {
        return Err(Error::msg(
            "reward model: no preference pairs (every sampled pair tied)",
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut model = crate::load::load_model(sft_dir, dev)?;
    model.add_scope(
        REWARD,
        LoraSpec {
            r: cfg.rm_lora_r,
            alpha: None,
            targets: LoraTargets::AttentionAndFf,
        },
        cfg.seed,
    )?;
    let head = ValueHead::new(model.dim(), ValueKind::Scalar, dev)?;
    let mut params = model
        .vars()
        .with_prefix(&format!("finetune_modules.{REWARD}."));
    params.extend(head.params());
    let rm = LoraRewardModel { model, head };
    let mut opt = Optimizer::new(
        params,
        OptimConfig {
            weight_decay: 0.0,
            ..OptimConfig::adamw()
        },
    );
    let mut r = rng::stream(cfg.seed, 0x4e3);
    let mut log = MetricsLog::open(out, None)?;
    for step in 0..cfg.rm_steps {
        let batch: Vec<&Pair> = (0..cfg.rm_batch)
            .map(|_| &train[r.random_range(0..train.len())])
            .collect();
        let ps: Vec<Vec<u32>> = batch
            .iter()
            .flat_map(|p| [p.prompt.clone(), p.prompt.clone()])
            .collect();
        let rs: Vec<Vec<u32>> = batch
            .iter()
            .flat_map(|p| [p.chosen.clone(), p.rejected.clone()])
            .collect();
        let s = rm.scores_t(&ps, &rs)?.reshape((batch.len(), 2))?; // [B, 2]: chosen, rejected
        let d = (s.narrow(1, 0, 1)? - s.narrow(1, 1, 1)?)?; // [B, 1]
                                                            // -log sigmoid(d) = log(1 + exp(-d))
        let loss = (d.neg()?.exp()? + 1.0)?.log()?.mean_all()?;
        let lv = loss.to_scalar::<f32>()?;
        if !lv.is_finite() {
            return Err(Error::msg(format!(
                "reward model step {step}: loss is {lv}; stopping"
            )));
        }
        let acc = d
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .filter(|&&x| x > 0.0)
            .count() as f32
            / batch.len() as f32;
        let g = loss.backward()?;
        let mut grads = optim::grads_of(&opt.params, &g)?;
        optim::clip_grad_norm(&mut grads, 1.0);
        let lr = optim::lr_at(
            step,
            cfg.rm_lr,
            cfg.rm_lr * 0.1,
            cfg.rm_steps / 20,
            cfg.rm_steps,
        );
        opt.step(&grads, lr)?;
        let mut rec = json!({"step": step + 1, "loss": lv, "train_accuracy": acc});
        if (step + 1) % 50 == 0 || step + 1 == cfg.rm_steps {
            rec["heldout_accuracy"] = json!(pair_accuracy(&rm, held)?);
        }
        log.log(rec)?;
        progress(step + 1, lv);
    }
    log.plot(
        &out.join("loss.svg"),
        "Reward model (Bradley-Terry)",
        "step",
        &["loss", "train_accuracy", "heldout_accuracy"],
    )?;
    let acc = pair_accuracy(&rm, held)?;
    Ok((rm, acc))
}

// ---------------------------------------------------------------------------------------------
// 4-5. PPO and the summary

#[derive(Debug, Clone, Serialize)]
pub struct PpoReport {
    pub recipe: Recipe,
    pub gold_score_ppo: f32,
    pub rm_score_final: f64,
    pub kl: f64,
    pub seconds: f64,
    pub dir: PathBuf,
}

#[allow(clippy::too_many_arguments)]
pub fn run_ppo(
    task: &PathsTask,
    sft_dir: &Path,
    rm: &LoraRewardModel,
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
    }
    let mut trainer = PpoTrainer::new(model, pcfg)?;
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
        gold_score_ppo: gold,
        rm_score_final: last["objective/scores"].as_f64().unwrap_or(f64::NAN),
        kl: last["objective/kl"].as_f64().unwrap_or(f64::NAN),
        seconds: t0.elapsed().as_secs_f64(),
        dir: out.to_path_buf(),
    })
}

const RM_HEAD_FILE: &str = "value_head.safetensors";

impl LoraRewardModel {
    /// Saves the model (with its `reward` scope) and the head into `dir`, atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::checkpoint::write_dir_atomic(dir, |tmp| {
            self.model.write_files(tmp)?;
            crate::params::write_safetensors(&tmp.join(RM_HEAD_FILE), &self.head.tensors())
        })
    }

    /// Loads a reward model saved by [`LoraRewardModel::save`].
    pub fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let dir = crate::checkpoint::resolve_dir(dir);
        let model = crate::load::load_model(&dir, dev)?;
        if !model.has_scope(REWARD) {
            return Err(Error::msg(format!(
                "{}: not a reward model (no `{REWARD}` LoRA scope)",
                dir.display()
            )));
        }
        let head = ValueHead::new(model.dim(), ValueKind::Scalar, dev)?;
        let hp = dir.join(RM_HEAD_FILE);
        head.load(&crate::params::read_tensors(&hp, dev)?, &hp)?;
        Ok(Self { model, head })
    }
}
