//! The reward model: a PaLM trunk (its own LoRA scope `reward`, as the original, or full
//! fine-tuning), a pooling of the final hidden states, and a head.
//!
//! Dimensions: B batch (sequences), T sequence length, C model dim, K bins of a binned head.
//!
//! Parameter names are the original's (`RewardModel.state_dict()`): the trunk's under `palm.`,
//! `prompt_embed` and `response_embed` [1, 1, C], and the head `to_pred.0.weight` [1, C] (scalar,
//! no bias) or `to_pred.weight` [K, C] + `to_pred.bias` [K] (binned).
//!
//! Differences from the original, all deliberate and documented in the README:
//! - pooling defaults to the hidden state at the last real token; the original's masked mean is
//!   `Pooling::MaskedMean`;
//! - a binned head's reward is the expected bin value (deterministic); the original's gumbel
//!   sampling of a bin is `BinReadout::Sample`;
//! - the segment embeddings are trainable (the original leaves them out of its trainable set);
//! - losses include the pairwise Bradley-Terry loss, which the original lacks.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::config::LoraSpec;
use crate::error::{Error, Result};
use crate::model::palm::{log_softmax_last, softmax_last};
use crate::model::{Forward, Model};
use crate::params::{read_tensors, write_safetensors, VarStore};
use crate::rng::{self, PalmRng};

/// The reward model's own config file inside a saved reward model directory.
pub const REWARD_CONFIG_FILE: &str = "reward.json";
/// The head (and segment embedding) tensors inside a saved reward model directory.
pub const HEAD_FILE: &str = "reward_head.safetensors";
/// The default LoRA scope name, as in the original.
pub const REWARD_SCOPE: &str = "reward";

/// How the hidden states [B, T, C] become one vector per sequence [B, C].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The hidden state at the last real token (the EOS appended to every sequence).
    #[default]
    LastToken,
    /// Mean over the real tokens (the original's `masked_mean`).
    MaskedMean,
}

/// The head on top of the pooled vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// One number: `to_pred.0.weight` [1, C], no bias.
    Scalar,
    /// K logits over bins: `to_pred.weight` [K, C], `to_pred.bias` [K]. The reward is read from
    /// the bins' values (default 0..K, the original's class indices).
    Binned { bins: usize, values: Vec<f32> },
}

impl HeadKind {
    /// A binned head whose bin values are the class indices 0..K, as in the original.
    pub fn binned(bins: usize) -> Self {
        HeadKind::Binned {
            bins,
            values: (0..bins).map(|k| k as f32).collect(),
        }
    }
}

/// How a binned head's logits become a reward at inference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BinReadout {
    /// Sum over bins of softmax(logits) * value: deterministic.
    #[default]
    Expected,
    /// The value of one bin sampled (gumbel-max) at `temperature`, as the original.
    Sample { temperature: f32 },
}

/// Everything that defines a reward model besides its trunk's config (`reward.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    pub pooling: Pooling,
    pub head: HeadKind,
    /// LoRA scope trained on the trunk; `None` = full fine-tuning.
    pub scope: Option<String>,
    /// Add `prompt_embed` / `response_embed` to the token embeddings.
    pub segment_embeds: bool,
    #[serde(default)]
    pub bin_readout: BinReadout,
    /// Token budget of a (prompt, response, EOS) sequence used in training; scoring truncates
    /// the same way. `None`: the trunk's `max_seq_len`.
    #[serde(default)]
    pub max_len: Option<usize>,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            pooling: Pooling::LastToken,
            head: HeadKind::Scalar,
            scope: Some(REWARD_SCOPE.to_string()),
            segment_embeds: true,
            bin_readout: BinReadout::Expected,
            max_len: None,
        }
    }
}

/// A batch of token sequences for the reward model.
#[derive(Debug, Clone)]
pub struct RewardBatch {
    /// Token ids [B, T] i64 (padding positions hold 0).
    pub ids: Tensor,
    /// [B, T] u8, 1 = real token.
    pub mask: Tensor,
    /// [B, T] u8, 1 = prompt token (segment embeddings), if known.
    pub prompt_mask: Option<Tensor>,
    /// Per row, the position of the last real token.
    pub last: Vec<usize>,
}

/// Where padding goes when sequences of different lengths share a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    Left,
    Right,
}

impl RewardBatch {
    /// Pads `(prompt, response)` id sequences into one batch; the sequence is prompt ++ response.
    pub fn new(seqs: &[(&[u32], &[u32])], padding: Padding, device: &Device) -> Result<Self> {
        let b = seqs.len();
        if b == 0 {
            return Err(Error::msg("empty reward batch"));
        }
        let t = seqs
            .iter()
            .map(|(p, r)| p.len() + r.len())
            .max()
            .unwrap_or(0);
        if t == 0 {
            return Err(Error::msg("every sequence of the reward batch is empty"));
        }
        let mut ids = vec![0i64; b * t];
        let mut mask = vec![0u8; b * t];
        let mut pmask = vec![0u8; b * t];
        let mut last = Vec::with_capacity(b);
        for (i, (p, r)) in seqs.iter().enumerate() {
            let n = p.len() + r.len();
            if n == 0 {
                return Err(Error::msg(format!(
                    "sequence {i} of the reward batch is empty"
                )));
            }
            let start = match padding {
                Padding::Left => t - n,
                Padding::Right => 0,
            };
            for (j, &id) in p.iter().chain(r.iter()).enumerate() {
                ids[i * t + start + j] = id as i64;
                mask[i * t + start + j] = 1;
                pmask[i * t + start + j] = u8::from(j < p.len());
            }
            last.push(start + n - 1);
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, t), device)?,
            prompt_mask: Some(Tensor::from_vec(pmask, (b, t), device)?),
            last,
        })
    }

    /// A batch from given tensors (ids [B, T] with negative ids as padding, as the original).
    pub fn from_tensors(ids: &Tensor, mask: &Tensor, prompt_mask: Option<&Tensor>) -> Result<Self> {
        let b = ids.dim(0)?;
        let m: Vec<Vec<u8>> = mask.to_dtype(DType::U8)?.to_vec2()?;
        let mut last = Vec::with_capacity(b);
        for (i, row) in m.iter().enumerate() {
            let l = row
                .iter()
                .rposition(|&x| x != 0)
                .ok_or_else(|| Error::msg(format!("row {i} of the mask has no real token")))?;
            last.push(l);
        }
        Ok(Self {
            ids: ids.to_dtype(DType::I64)?,
            mask: mask.to_dtype(DType::U8)?,
            prompt_mask: prompt_mask.map(|p| p.to_dtype(DType::U8)).transpose()?,
            last,
        })
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// Options of one reward-model forward.
#[derive(Debug, Clone, Copy, Default)]
pub struct RewardForward {
    /// Dropout on.
    pub train: bool,
    /// Run the trunk with the reward LoRA off.
    pub disable_lora: bool,
    /// Pool over every position, padding included (the original with `mask=None`).
    pub pool_all: bool,
    /// Each trunk block as one graph node ([`Forward::fused_blocks`]): faster training; the
    /// loss's gradients must then come from [`RewardModel::backward`].
    pub fused_blocks: bool,
}

/// What one forward returns.
#[derive(Debug, Clone)]
pub struct RewardOutput {
    /// [B, C] pooled hidden states.
    pub pooled: Tensor,
    /// Scalar head: rewards [B]. Binned head: logits [B, K].
    pub head: Tensor,
}

#[derive(Debug)]
pub struct RewardModel {
    pub trunk: Model,
    pub cfg: RewardConfig,
    /// Head and segment embeddings, by the original's names.
    pub head_vars: VarStore,
}

impl RewardModel {
    /// A new reward model on `trunk`: adds the LoRA scope (rank `lora`, none = full fine-tuning),
    /// and a freshly initialised head (nn.Linear's init, U(-1/sqrt(C), 1/sqrt(C))) and zero
    /// segment embeddings, as the original.
    pub fn new(
        mut trunk: Model,
        cfg: RewardConfig,
        lora: Option<LoraSpec>,
        seed: u64,
    ) -> Result<Self> {
        match (&cfg.scope, lora) {
            (Some(scope), Some(spec)) => {
                if !trunk.has_scope(scope) {
                    trunk.add_scope(scope, spec, seed)?;
                }
            }
            (Some(scope), None) => {
                if !trunk.has_scope(scope) {
                    return Err(Error::Config(format!(
                        "reward LoRA scope `{scope}` needs a rank (or use full fine-tuning)"
                    )));
                }
            }
            (None, _) => {}
        }
        let c = trunk.dim();
        let dev = trunk.device().clone();
        let mut r = rng::stream(seed, 0x7e3a);
        let bound = 1.0 / (c as f32).sqrt();
        let mut head_vars = VarStore::new();
        match &cfg.head {
            HeadKind::Scalar => {
                let w = rng::uniform(&mut r, c, -bound, bound);
                head_vars.insert("to_pred.0.weight", Tensor::from_vec(w, (1, c), &dev)?)?;
            }
            HeadKind::Binned { bins, values } => {
                if *bins < 2 || values.len() != *bins {
                    return Err(Error::Config(format!(
                        "a binned head needs at least 2 bins and one value per bin (got {bins} bins, {} values)",
                        values.len()
                    )));
                }
                let w = rng::uniform(&mut r, bins * c, -bound, bound);
                head_vars.insert("to_pred.weight", Tensor::from_vec(w, (*bins, c), &dev)?)?;
                let b = rng::uniform(&mut r, *bins, -bound, bound);
                head_vars.insert("to_pred.bias", Tensor::from_vec(b, *bins, &dev)?)?;
            }
        }
        if cfg.segment_embeds {
            for name in ["prompt_embed", "response_embed"] {
                head_vars.insert(name, Tensor::zeros((1, 1, c), DType::F32, &dev)?)?;
            }
        }
        Ok(Self {
            trunk,
            cfg,
            head_vars,
        })
    }

    /// Overwrites the head (and segment embeddings) from tensors by the original's names.
    /// Other names (e.g. the trunk's `palm.*`) are ignored.
    pub fn load_head(&self, tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
        let picked: BTreeMap<String, Tensor> = tensors
            .iter()
            .filter(|(k, _)| self.head_vars.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.head_vars.assign_from(&picked, path, |_| false)
    }

    /// Loads a reward model directory written by [`RewardModel::save`].
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let dir = crate::checkpoint::resolve_dir(dir);
        let cfg_path = dir.join(REWARD_CONFIG_FILE);
        if !cfg_path.exists() {
            return Err(Error::msg(format!(
                "{}: not a reward model directory (no {REWARD_CONFIG_FILE})",
                dir.display()
            )));
        }
        let cfg: RewardConfig = crate::checkpoint::read_json(&cfg_path)?;
        let trunk = crate::load::load_model(&dir, device)?;
        if let Some(s) = &cfg.scope {
            if !trunk.has_scope(s) {
                return Err(Error::msg(format!(
                    "{}: {REWARD_CONFIG_FILE} names LoRA scope `{s}` but the trunk has none",
                    dir.display()
                )));
            }
        }
        let model = Self::new(trunk, cfg, None, 0)?;
        let head_path = dir.join(HEAD_FILE);
        let tensors = read_tensors(&head_path, device)?;
        model
            .head_vars
            .assign_from(&tensors, &head_path, |_| false)?;
        Ok(model)
    }

    /// Writes the trunk's files, the head tensors and `reward.json` into an existing directory.
    pub fn write_files(&self, dir: &Path) -> Result<()> {
        self.trunk.write_files(dir)?;
        write_safetensors(&dir.join(HEAD_FILE), &self.head_vars.tensors())?;
        crate::checkpoint::write_json_atomic(&dir.join(REWARD_CONFIG_FILE), &self.cfg)
    }

    /// Saves as a directory, atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::checkpoint::write_dir_atomic(dir, |tmp| self.write_files(tmp))
    }

    /// The parameters training updates: the head, the segment embeddings (when on), and the
    /// LoRA scope (or every trunk parameter with full fine-tuning). Trunk names get `palm.`.
    pub fn trainable_params(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .head_vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let trunk = match &self.cfg.scope {
            Some(s) => self
                .trunk
                .vars()
                .with_prefix(&format!("finetune_modules.{s}.")),
            None => self.trunk.vars().with_prefix(""),
        };
        out.extend(trunk.into_iter().map(|(k, v)| (format!("palm.{k}"), v)));
        out
    }

    fn head_var(&self, name: &str) -> Result<Tensor> {
        Ok(self
            .head_vars
            .get(name)
            .ok_or_else(|| Error::msg(format!("reward head has no `{name}`")))?
            .as_tensor()
            .clone())
    }

    /// `loss.backward()`, plus the trunk's fused-block weight gradients (see
    /// [`RewardForward::fused_blocks`]).
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        self.trunk.backward(loss)
    }

    /// Pooled hidden states and the head's output.
    pub fn forward(&self, batch: &RewardBatch, opts: RewardForward) -> Result<RewardOutput> {
        let (b, t) = batch.ids.dims2()?;
        let c = self.trunk.dim();

        // 1. segment embeddings: prompt_embed on prompt positions, response_embed elsewhere
        let extra = match (&batch.prompt_mask, self.cfg.segment_embeds) {
            (Some(pm), true) => {
                let pm = pm.to_dtype(DType::F32)?.unsqueeze(2)?; // [B, T, 1]
                let pe = self.head_var("prompt_embed")?; // [1, 1, C]
                let re = self.head_var("response_embed")?;
                let e = (pm.broadcast_mul(&pe)? + (1.0 - &pm)?.broadcast_mul(&re)?)?;
                Some(e) // [B, T, C]
            }
            _ => None,
        };

        // 2. trunk: final-norm hidden states [B, T, C]
        let fwd = Forward {
            scope: self.cfg.scope.as_deref(),
            disable_lora: opts.disable_lora,
            extra_embed: extra.as_ref(),
            key_mask: Some(&batch.mask),
            freeze_base: self.cfg.scope.is_some(),
            train: opts.train,
            fused_blocks: opts.fused_blocks,
        };
        let emb = self.trunk.embeddings(&batch.ids, &fwd, None)?;

        // 3. pooling -> [B, C]
        let pooled = if opts.pool_all {
            emb.mean(1)?
        } else {
            match self.cfg.pooling {
                Pooling::LastToken => {
                    let idx: Vec<u32> = batch
                        .last
                        .iter()
                        .enumerate()
                        .map(|(i, &l)| (i * t + l) as u32)
                        .collect();
                    let idx = Tensor::from_vec(idx, b, emb.device())?;
                    emb.reshape((b * t, c))?.index_select(&idx, 0)?
                }
                Pooling::MaskedMean => masked_mean(&emb, &batch.mask)?,
            }
        };

        // 4. head
        let head = match &self.cfg.head {
            HeadKind::Scalar => {
                let w = self.head_var("to_pred.0.weight")?; // [1, C]
                pooled.matmul(&w.t()?)?.squeeze(1)? // [B]
            }
            HeadKind::Binned { .. } => {
                let w = self.head_var("to_pred.weight")?; // [K, C]
                let bias = self.head_var("to_pred.bias")?; // [K]
                pooled.matmul(&w.t()?)?.broadcast_add(&bias)? // [B, K]
            }
        };
        Ok(RewardOutput { pooled, head })
    }

    /// Rewards [B]: the scalar head's output, or a binned head read by `bin_readout`
    /// (`rng` is used only by `BinReadout::Sample`).
    pub fn rewards(
        &self,
        batch: &RewardBatch,
        opts: RewardForward,
        rng: Option<&mut PalmRng>,
    ) -> Result<Tensor> {
        let out = self.forward(batch, opts)?;
        match (&self.cfg.head, self.cfg.bin_readout) {
            (HeadKind::Scalar, _) => Ok(out.head),
            (HeadKind::Binned { values, .. }, BinReadout::Expected) => {
                expected_bin_value(&out.head, values)
            }
            (HeadKind::Binned { values, .. }, BinReadout::Sample { temperature }) => {
                let rng = rng.ok_or_else(|| Error::msg("sampling a bin needs an RNG"))?;
                let logits: Vec<Vec<f32>> = out.head.to_vec2()?;
                let picked: Vec<f32> = logits
                    .iter()
                    .map(|row| values[gumbel_argmax(row, temperature, rng)])
                    .collect();
                Ok(Tensor::from_vec(picked, logits.len(), out.head.device())?)
            }
        }
    }

    /// Scores token sequences (prompt, response) in batches of `batch_size`, without gradients.
    pub fn score(&self, seqs: &[(&[u32], &[u32])], batch_size: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(seqs.len());
        let mut rng = rng::stream(0, 0xb1a5);
        for chunk in seqs.chunks(batch_size.max(1)) {
            let batch = RewardBatch::new(chunk, Padding::Right, self.trunk.device())?;
            // no backward follows: fused blocks are only a faster forward here
            let opts = RewardForward {
                fused_blocks: true,
                ..Default::default()
            };
            let r = self.rewards(&batch, opts, Some(&mut rng))?;
            out.extend(r.detach().to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

impl RewardModel {
    /// The token budget of one scored sequence.
    pub fn max_len(&self) -> usize {
        self.cfg
            .max_len
            .unwrap_or(self.trunk.max_seq_len())
            .min(self.trunk.max_seq_len())
    }

    /// Scores responses to one prompt as training saw them: a trailing EOS is dropped and one
    /// appended (`eos`), then truncated to [`RewardModel::max_len`] (prompt end, response start).
    pub fn score_responses(
        &self,
        prompt: &[u32],
        responses: &[Vec<u32>],
        eos: Option<u32>,
        batch_size: usize,
    ) -> Result<Vec<f32>> {
        let mut stats = crate::rlhf::preference_data::TruncationStats::default();
        let enc: Vec<_> = responses
            .iter()
            .map(|r| {
                let r = match (r.last(), eos) {
                    (Some(&l), Some(e)) if l == e => &r[..r.len() - 1],
                    _ => &r[..],
                };
                crate::rlhf::preference_data::truncate(prompt, r, eos, self.max_len(), &mut stats)
            })
            .collect();
        let seqs: Vec<(&[u32], &[u32])> = enc.iter().map(|e| e.as_pair()).collect();
        self.score(&seqs, batch_size)
    }
    /// [`RewardModel::score_responses`] for (prompt, response) pairs with different prompts,
    /// batched: one score per pair.
    pub fn score_pairs(
        &self,
        prompts: &[Vec<u32>],
        responses: &[Vec<u32>],
        eos: Option<u32>,
        batch_size: usize,
    ) -> Result<Vec<f32>> {
        if prompts.len() != responses.len() {
            return Err(Error::msg(format!(
                "score_pairs: {} prompts but {} responses",
                prompts.len(),
                responses.len()
            )));
        }
        let mut stats = crate::rlhf::preference_data::TruncationStats::default();
        let enc: Vec<_> = prompts
            .iter()
            .zip(responses)
            .map(|(p, r)| {
                let r = match (r.last(), eos) {
                    (Some(&l), Some(e)) if l == e => &r[..r.len() - 1],
                    _ => &r[..],
                };
                crate::rlhf::preference_data::truncate(p, r, eos, self.max_len(), &mut stats)
            })
            .collect();
        let seqs: Vec<(&[u32], &[u32])> = enc.iter().map(|e| e.as_pair()).collect();
        self.score(&seqs, batch_size)
    }
}

/// sum(x * mask, T) / max(sum(mask, T), 1e-3): x [B, T, C], mask [B, T] -> [B, C].
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [B, T, 1]
    let num = x.broadcast_mul(&m)?.sum(1)?; // [B, C]
    let den = m.sum(1)?.maximum(1e-3)?; // [B, 1]
    Ok(num.broadcast_div(&den)?)
}

/// Sum over bins of softmax(logits) * value: logits [B, K] -> [B].
pub fn expected_bin_value(logits: &Tensor, values: &[f32]) -> Result<Tensor> {
    let k = logits.dim(D::Minus1)?;
    if values.len() != k {
        return Err(Error::msg(format!(
            "{} bin values for {k} logits",
            values.len()
        )));
    }
    let v = Tensor::from_slice(values, (k, 1), logits.device())?;
    Ok(softmax_last(logits)?.matmul(&v)?.squeeze(1)?)
}

/// argmax(logits / temperature + gumbel noise): a sample from softmax(logits / temperature).
fn gumbel_argmax(logits: &[f32], temperature: f32, rng: &mut PalmRng) -> usize {
    use rand::Rng;
    let mut best = (f32::NEG_INFINITY, 0);
    for (i, &l) in logits.iter().enumerate() {
        let u: f32 = rng.random::<f32>().clamp(1e-20, 1.0);
        let g = -(-(u.ln())).max(1e-20).ln();
        let s = l / temperature.max(1e-10) + g;
        if s > best.0 {
            best = (s, i);
        }
    }
    best.1
}

// ---------------------------------------------------------------------------------------------
// Losses (pure functions of the head's outputs).

/// Which loss trains the head.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardLoss {
    /// Pairwise: mean of -log sigmoid(r_chosen - r_rejected - margin).
    BradleyTerry { margin: f64 },
    /// Ratings: mean squared error against the score (the original's scalar mode).
    Mse,
    /// Ratings: cross-entropy against the bin index (the original's binned mode).
    BinnedCrossEntropy,
}

/// mean(-log sigmoid(r_chosen - r_rejected - margin)) over pairs, computed as the stable
/// softplus(-x) = max(-x, 0) + log(1 + exp(-|x|)).
pub fn bradley_terry_loss(chosen: &Tensor, rejected: &Tensor, margin: f64) -> Result<Tensor> {
    let x = ((chosen - rejected)? - margin)?;
    let neg = x.neg()?;
    let sp = (neg.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(sp.mean_all()?)
}

/// mean((pred - target)^2), as F.mse_loss.
pub fn mse_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok((pred - target)?.sqr()?.mean_all()?)
}

/// mean over rows of -log softmax(logits)[label]: logits [B, K], labels [B] (integer bins).
pub fn binned_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    let labels = labels.to_dtype(DType::I64)?;
    let v: Vec<i64> = labels.to_vec1()?;
    if let Some(bad) = v.iter().find(|&&l| l < 0 || l >= k as i64) {
        return Err(Error::msg(format!("bin label {bad} outside 0..{k}")));
    }
    let logp = log_softmax_last(logits)?;
    let picked = logp.gather(&labels.reshape((b, 1))?, 1)?; // [B, 1]
    Ok(picked.neg()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PalmConfig;
    use crate::model::Palm;

    fn tiny(causal: bool) -> Model {
        let cfg = PalmConfig {
            heads: 2,
            dim_head: 8,
            causal,
            ..PalmConfig::new(32, 16, 2)
        };
        Model::Palm(Palm::new(&cfg, 3, &Device::Cpu).unwrap())
    }

    /// Makes LoRA B non-zero and the segment embeddings distinct, so every path matters.
    fn perturb(rm: &RewardModel) {
        let mut r = rng::seeded(11);
        for (_, v) in rm.trainable_params() {
            let n = rng::normal(&mut r, v.elem_count(), 0.1);
            v.set(&Tensor::from_vec(n, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    fn v1(t: &Tensor) -> Vec<f32> {
        t.to_vec1().unwrap()
    }

    #[test]
    fn bradley_terry_value_and_gradient_hand_computed() {
        // x = rc - rr - m: 1 - 0 - 0.5 = 0.5 and -1 - 1 - 0.5 = -2.5
        let rc = Var::new(&[1.0f32, -1.0], &Device::Cpu).unwrap();
        let rr = Var::new(&[0.0f32, 1.0], &Device::Cpu).unwrap();
        let loss = bradley_terry_loss(rc.as_tensor(), rr.as_tensor(), 0.5).unwrap();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want = (-(sig(0.5).ln()) - sig(-2.5).ln()) / 2.0;
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // d/d rc_i = -(1 - sigmoid(x_i)) / 2, d/d rr_i = +(1 - sigmoid(x_i)) / 2
        let g = loss.backward().unwrap();
        let gc = v1(g.get(rc.as_tensor()).unwrap());
        let gr = v1(g.get(rr.as_tensor()).unwrap());
        for (i, x) in [0.5f64, -2.5].iter().enumerate() {
            let d = (1.0 - sig(*x)) / 2.0;
            assert!((gc[i] as f64 + d).abs() < 1e-6, "{gc:?}");
            assert!((gr[i] as f64 - d).abs() < 1e-6, "{gr:?}");
        }
        // stable for large margins: -log sigmoid(-100) = 100 (log(1+e^-100) ~ 0)
        let big = bradley_terry_loss(
            &Tensor::new(&[-100.0f32], &Device::Cpu).unwrap(),
            &Tensor::new(&[0.0f32], &Device::Cpu).unwrap(),
            0.0,
        )
        .unwrap();
        assert!((big.to_scalar::<f32>().unwrap() - 100.0).abs() < 1e-4);
    }

    #[test]
    fn mse_and_binned_ce_hand_computed() {
        let p = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let t = Tensor::new(&[0.0f32, 4.0], &Device::Cpu).unwrap();
        assert!((mse_loss(&p, &t).unwrap().to_scalar::<f32>().unwrap() - 2.5).abs() < 1e-6);
        // logits [0, ln 3] -> p = [1/4, 3/4]; labels [1, 0] -> (-ln .75 - ln .25) / 2
        let l = Tensor::new(&[[0.0f32, 3f32.ln()], [0.0, 3f32.ln()]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[1i64, 0], &Device::Cpu).unwrap();
        let want = (-(0.75f64.ln()) - 0.25f64.ln()) / 2.0;
        let got = binned_cross_entropy(&l, &y)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((got - want).abs() < 1e-6);
        assert!(binned_cross_entropy(&l, &Tensor::new(&[2i64, 0], &Device::Cpu).unwrap()).is_err());
    }

    #[test]
    fn binned_expected_value_hand_computed() {
        // logits [0, ln 3] -> [1/4, 3/4]; values [-1, 2] -> -1/4 + 6/4 = 1.25
        // logits [ln 2, 0, ln 2] (p = [2/5, 1/5, 2/5]), values 0,1,2 -> 1/5 + 4/5 = 1.0
        let l = Tensor::new(&[[0.0f32, 3f32.ln()]], &Device::Cpu).unwrap();
        let e = v1(&expected_bin_value(&l, &[-1.0, 2.0]).unwrap());
        assert!((e[0] - 1.25).abs() < 1e-6, "{e:?}");
        let l = Tensor::new(&[[2f32.ln(), 0.0, 2f32.ln()]], &Device::Cpu).unwrap();
        let e = v1(&expected_bin_value(&l, &[0.0, 1.0, 2.0]).unwrap());
        assert!((e[0] - 1.0).abs() < 1e-6, "{e:?}");
    }

    #[test]
    fn binned_reward_is_deterministic_and_sampling_is_an_option() {
        let mut rm = RewardModel::new(
            tiny(true),
            RewardConfig {
                head: HeadKind::binned(4),
                ..Default::default()
            },
            Some(LoraSpec::new(2)),
            0,
        )
        .unwrap();
        perturb(&rm);
        let seqs: Vec<(&[u32], &[u32])> = vec![(&[1, 2, 3], &[4, 5])];
        let a = rm.score(&seqs, 1).unwrap();
        let b = rm.score(&seqs, 1).unwrap();
        assert_eq!(a, b);
        // equal to the expected value computed from the logits by hand
        let batch = RewardBatch::new(&seqs, Padding::Right, &Device::Cpu).unwrap();
        let logits: Vec<f32> = rm
            .forward(&batch, RewardForward::default())
            .unwrap()
            .head
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        let want: f32 = logits
            .iter()
            .enumerate()
            .map(|(k, l)| k as f32 * l.exp() / z)
            .sum();
        assert!((a[0] - want).abs() < 1e-5);
        // sampling returns bin values, and not always the same one
        rm.cfg.bin_readout = BinReadout::Sample { temperature: 50.0 };
        let many: Vec<(&[u32], &[u32])> = vec![(&[1, 2, 3], &[4, 5]); 64];
        let s = rm.score(&many, 64).unwrap();
        assert!(s.iter().all(|x| [0.0, 1.0, 2.0, 3.0].contains(x)), "{s:?}");
        assert!(s.iter().any(|&x| x != s[0]), "{s:?}");
    }

    /// The same sequences alone, right-padded and left-padded in a batch give the same rewards:
    /// pooling reads the right token (or mean) under both paddings, for causal and bidirectional
    /// trunks.
    #[test]
    fn pooling_reads_the_right_tokens_under_left_and_right_padding() {
        for causal in [true, false] {
            for pooling in [Pooling::LastToken, Pooling::MaskedMean] {
                let rm = RewardModel::new(
                    tiny(causal),
                    RewardConfig {
                        pooling,
                        ..Default::default()
                    },
                    Some(LoraSpec::new(2)),
                    0,
                )
                .unwrap();
                perturb(&rm);
                let seqs: Vec<(&[u32], &[u32])> = vec![
                    (&[1, 2, 3], &[4, 5, 6, 7]),
                    (&[9], &[10, 11]),
                    (&[12, 13], &[14]),
                ];
                let alone: Vec<f32> = seqs
                    .iter()
                    .map(|s| rm.score(std::slice::from_ref(s), 1).unwrap()[0])
                    .collect();
                for padding in [Padding::Left, Padding::Right] {
                    let batch = RewardBatch::new(&seqs, padding, &Device::Cpu).unwrap();
                    let r = v1(&rm.rewards(&batch, RewardForward::default(), None).unwrap());
                    for (a, b) in alone.iter().zip(&r) {
                        assert!(
                            (a - b).abs() < 1e-4,
                            "causal {causal} {pooling:?} {padding:?}: alone {alone:?} batch {r:?}"
                        );
                    }
                }
                // and the rewards differ between sequences (the test can fail)
                assert!((alone[0] - alone[1]).abs() > 1e-4);
            }
        }
    }

    #[test]
    fn last_token_pooling_is_not_the_padding_position() {
        // A wrong index (the last column) would read padding for the shorter rows.
        let seqs: Vec<(&[u32], &[u32])> = vec![(&[1, 2, 3], &[4]), (&[5], &[6])];
        let l = RewardBatch::new(&seqs, Padding::Left, &Device::Cpu).unwrap();
        let r = RewardBatch::new(&seqs, Padding::Right, &Device::Cpu).unwrap();
        assert_eq!(l.last, vec![3, 3]);
        assert_eq!(r.last, vec![3, 1]);
        let ids: Vec<Vec<i64>> = r.ids.to_vec2().unwrap();
        assert_eq!(ids[1], vec![5, 6, 0, 0]);
        let ids: Vec<Vec<i64>> = l.ids.to_vec2().unwrap();
        assert_eq!(ids[1], vec![0, 0, 5, 6]);
    }

    /// With a LoRA scope, only LoRA, the head and the segment embeddings get gradients; with full
    /// fine-tuning every trunk parameter does too. Fused blocks give the composed gradients.
    #[test]
    fn only_lora_head_and_segment_embeddings_receive_gradients() {
        for (segment_embeds, full) in [(true, false), (false, false), (true, true)] {
            let rm = RewardModel::new(
                tiny(true),
                RewardConfig {
                    segment_embeds,
                    scope: if full {
                        None
                    } else {
                        Some(REWARD_SCOPE.into())
                    },
                    ..Default::default()
                },
                if full { None } else { Some(LoraSpec::new(2)) },
                0,
            )
            .unwrap();
            perturb(&rm);
            let seqs: Vec<(&[u32], &[u32])> = vec![(&[1, 2], &[3, 4]), (&[1, 2], &[5])];
            let batch = RewardBatch::new(&seqs, Padding::Right, &Device::Cpu).unwrap();
            // composed blocks, then fused blocks (one node per block): the same gradients
            let grads = |fused_blocks: bool| {
                let opts = RewardForward {
                    fused_blocks,
                    ..Default::default()
                };
                let r = rm.rewards(&batch, opts, None).unwrap();
                let loss = bradley_terry_loss(
                    &r.narrow(0, 0, 1).unwrap(),
                    &r.narrow(0, 1, 1).unwrap(),
                    0.0,
                )
                .unwrap();
                rm.backward(&loss).unwrap()
            };
            let (g, gf) = (grads(false), grads(true));
            for (name, var) in rm.trunk.vars().iter().chain(rm.head_vars.iter()) {
                let (a, b) = (g.get(var.as_tensor()), gf.get(var.as_tensor()));
                assert_eq!(
                    a.is_some(),
                    b.is_some(),
                    "{name}: fused and composed differ"
                );
                if let (Some(a), Some(b)) = (a, b) {
                    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                    let d = d.to_scalar::<f32>().unwrap();
                    assert!(d < 1e-5, "{name}: fused gradient differs by {d}");
                }
            }
            for (name, var) in rm.trunk.vars().iter() {
                let has = g.get(var.as_tensor()).is_some();
                let want = full || name.starts_with("finetune_modules.reward.");
                assert_eq!(has, want, "trunk param {name} (full {full})");
            }
            for (name, var) in rm.head_vars.iter() {
                assert!(g.get(var.as_tensor()).is_some(), "head param {name}");
            }
            assert_eq!(rm.head_vars.contains("prompt_embed"), segment_embeds);
            let names: Vec<String> = rm.trainable_params().into_iter().map(|(n, _)| n).collect();
            assert_eq!(names.iter().any(|n| n == "prompt_embed"), segment_embeds);
            assert_eq!(
                names.iter().filter(|n| n.starts_with("palm.")).count(),
                if full {
                    rm.trunk.vars().len()
                } else {
                    2 * 4 * 2
                }
            );
        }
    }

    #[test]
    fn save_and_load_round_trip() {
        let rm = RewardModel::new(
            tiny(true),
            RewardConfig::default(),
            Some(LoraSpec::new(2)),
            0,
        )
        .unwrap();
        perturb(&rm);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rm");
        rm.save(&p).unwrap();
        let back = RewardModel::load(&p, &Device::Cpu).unwrap();
        assert_eq!(back.cfg, rm.cfg);
        let seqs: Vec<(&[u32], &[u32])> = vec![(&[1, 2], &[3, 4])];
        assert_eq!(rm.score(&seqs, 1).unwrap(), back.score(&seqs, 1).unwrap());
    }
}
