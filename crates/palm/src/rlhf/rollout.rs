//! Rollouts: sample responses for a batch of prompts with the KV cache, then ONE batched
//! forward each for the policy, the reference and the critic to get, per response token, the
//! sampled token's log-probability under the policy and the reference, and the value.
//! Only these per-token numbers are kept; full-vocabulary tensors never outlive a forward.
//!
//! Layout of a batch ([`Layout`]): prompts left-padded to width P, responses right-padded to
//! width R, so every response starts at column P. Column P + k holds response token k, which is
//! predicted by the hidden state at column P + k - 1; the forward runs on columns 0..P+R-1 and
//! keeps columns P-1..P+R-2. `key_mask` is 1 on real tokens only (left and right pads masked),
//! so each row sees exactly the attention it would get alone.
//!
//! The three roles ([`Actors`]): with a LoRA actor the policy is the model with the `actor` LoRA
//! scope, the reference is the same model with LoRA disabled (no copy), and the critic is the
//! model with the `critic` scope plus a value head. With full fine-tuning the policy is the
//! trained model itself (no scope), and a separate frozen copy of the initial weights is the
//! reference and carries the critic's scope.

use candle_core::{DType, Device, Tensor, Var, D};

use crate::dist::{self, ddp, Communicator};
use crate::error::{Error, Result};
use crate::model::palm::log_softmax_last;
use crate::model::{Forward, Model};
use crate::rlhf::scorer::Scorer;
use crate::rlhf::value::ValueHead;
use crate::sample::{generate_rows, GenerateRequest, Sampling};

pub const ACTOR: &str = "actor";
pub const CRITIC: &str = "critic";

/// A batch of prompt + response rows in the layout described in the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub b: usize,
    /// Prompt width (longest prompt).
    pub p: usize,
    /// Response width (longest response, at least 1).
    pub r: usize,
    /// [B, P+R] ids (pads 0).
    pub ids: Vec<i64>,
    /// [B, P+R] 1 = real token.
    pub key_mask: Vec<u8>,
    /// [B, R] 1 = real response token.
    pub mask: Vec<f32>,
}

impl Layout {
    pub fn new(prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Self> {
        if prompts.len() != responses.len() {
            return Err(Error::msg(
                "rollout: as many responses as prompts are needed",
            ));
        }
        let b = prompts.len();
        let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let r = responses.iter().map(Vec::len).max().unwrap_or(0).max(1);
        if p == 0 || prompts.iter().any(Vec::is_empty) {
            return Err(Error::msg("rollout: every prompt needs at least one token"));
        }
        let l = p + r;
        let mut ids = vec![0i64; b * l];
        let mut key_mask = vec![0u8; b * l];
        let mut mask = vec![0f32; b * r];
        for (row, (pr, resp)) in prompts.iter().zip(responses).enumerate() {
            let o = row * l + (p - pr.len());
            for (k, &t) in pr.iter().enumerate() {
                ids[o + k] = t as i64;
                key_mask[o + k] = 1;
            }
            for (k, &t) in resp.iter().enumerate() {
                ids[row * l + p + k] = t as i64;
                key_mask[row * l + p + k] = 1;
                mask[row * r + k] = 1.0;
            }
        }
        Ok(Self {
            b,
            p,
            r,
            ids,
            key_mask,
            mask,
        })
    }

    /// The rows `idx`, keeping the widths (so per-token arrays stay aligned).
    pub fn rows(&self, idx: &[usize]) -> Self {
        let l = self.p + self.r;
        let mut out = Self {
            b: idx.len(),
            p: self.p,
            r: self.r,
            ids: Vec::with_capacity(idx.len() * l),
            key_mask: Vec::with_capacity(idx.len() * l),
            mask: Vec::with_capacity(idx.len() * self.r),
        };
        for &i in idx {
            out.ids.extend_from_slice(&self.ids[i * l..(i + 1) * l]);
            out.key_mask
                .extend_from_slice(&self.key_mask[i * l..(i + 1) * l]);
            out.mask
                .extend_from_slice(&self.mask[i * self.r..(i + 1) * self.r]);
        }
        out
    }

    pub fn mask_tensor(&self, dev: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.mask, (self.b, self.r), dev)?)
    }

    /// Hidden states predicting each response token: [B, R, C].
    pub fn response_hidden(&self, model: &Model, opts: Forward) -> Result<Tensor> {
        let dev = model.device();
        let l = self.p + self.r;
        let ids = Tensor::from_slice(&self.ids, (self.b, l), dev)?.narrow(1, 0, l - 1)?; // [B, L-1]
        let km = Tensor::from_slice(&self.key_mask, (self.b, l), dev)?.narrow(1, 0, l - 1)?;
        let opts = Forward {
            key_mask: Some(&km),
            ..opts
        };
        let h = model.embeddings(&ids, &opts, None)?; // [B, L-1, C]
        Ok(h.narrow(1, self.p - 1, self.r)?) // [B, R, C]
    }

    /// Response token ids [B, R] (pads 0).
    pub fn targets(&self, dev: &Device) -> Result<Tensor> {
        let l = self.p + self.r;
        Ok(Tensor::from_slice(&self.ids, (self.b, l), dev)?
            .narrow(1, self.p, self.r)?
            .contiguous()?)
    }
}

/// The rows `idx` of a per-token array [B, R] (minibatches of a rollout).
pub fn take_rows(x: &[f32], idx: &[usize], r: usize) -> Vec<f32> {
    idx.iter()
        .flat_map(|&i| x[i * r..(i + 1) * r].iter().copied())
        .collect()
}

/// Log-probabilities [B, R] of the response tokens and the tempered logits [B, R, V] they come
/// from, under the model run with `opts` (policy: actor scope; reference: LoRA disabled).
pub fn response_logprobs(
    model: &Model,
    lay: &Layout,
    opts: Forward,
    temperature: f32,
) -> Result<(Tensor, Tensor)> {
    let h = lay.response_hidden(model, opts)?; // [B, R, C]
    let logits = model.logits_from(&h, opts.freeze_base)?; // [B, R, V]
    let logits = if temperature != 1.0 {
        (logits / temperature as f64)?
    } else {
        logits
    };
    let logp_all = log_softmax_last(&logits)?; // [B, R, V]
    let tgt = lay.targets(model.device())?.unsqueeze(2)?; // [B, R, 1]
    let logp = logp_all.gather(&tgt, 2)?.squeeze(2)?; // [B, R]
    Ok((logp, logits))
}

/// Entropy [B, R] of the distributions given by logits [B, R, V].
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last(logits)?;
    Ok((logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?)
}

/// The critic: the model with its own LoRA scope plus a value head; token values [B, R], or
/// one pooled value per sequence [B] (the original's `pooled_values`: the head reads the mean
/// hidden state over the response positions).
#[derive(Debug, Clone)]
pub struct Critic {
    pub head: ValueHead,
    pub scope: String,
    pub pooled: bool,
    /// Segment embeddings (prompt, response), each [1, 1, C], added to the token embeddings of
    /// prompt and response columns; present when the critic was initialised from a reward model
    /// that has them (so its values are the reward model's scores).
    pub segments: Option<(Var, Var)>,
}

impl Critic {
    /// (values, head outputs): [B, R] and [B, R, K], or [B] and [B, K] when pooled.
    pub fn values(
        &self,
        model: &Model,
        lay: &Layout,
        freeze_base: bool,
        fused_blocks: bool,
    ) -> Result<(Tensor, Tensor)> {
        let extra = self.segment_embeds(lay, model.dim(), model.device())?;
        let opts = Forward {
            scope: Some(&self.scope),
            freeze_base,
            extra_embed: extra.as_ref(),
            fused_blocks,
            ..Default::default()
        };
        let h = lay.response_hidden(model, opts)?; // [B, R, C]
        let h = if self.pooled {
            let m = lay.mask_tensor(model.device())?; // [B, R]
            let n = m.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?; // [B, 1]
            h.broadcast_mul(&m.unsqueeze(2)?)?
                .sum(1)?
                .broadcast_div(&n)? // [B, C]
        } else {
            h
        };
        let logits = self.head.logits(&h)?;
        let v = self.head.value_from_logits(&logits)?;
        Ok((v, logits))
    }
}

impl Critic {
    /// [B, L-1, C]: `prompt_embed` on the prompt columns (< P), `response_embed` after, as the
    /// reward model's segment embeddings (pads are masked keys, their value is irrelevant).
    fn segment_embeds(&self, lay: &Layout, c: usize, dev: &Device) -> Result<Option<Tensor>> {
        let Some((pe, re)) = &self.segments else {
            return Ok(None);
        };
        let l1 = lay.p + lay.r - 1;
        let pm: Vec<f32> = (0..l1).map(|j| if j < lay.p { 1.0 } else { 0.0 }).collect();
        let pm = Tensor::from_vec(pm, (1, l1, 1), dev)?;
        let e =
            (pm.broadcast_mul(pe.as_tensor())? + (1.0 - &pm)?.broadcast_mul(re.as_tensor())?)?;
        Ok(Some(e.broadcast_as((lay.b, l1, c))?.contiguous()?))
    }
}

/// Who plays which part in a rollout and an update. With a LoRA actor `policy` and `frozen`
/// are the same model and the policy runs the `actor` scope; with full fine-tuning `policy` is
/// the trained model (no scope) and `frozen` a separate copy of the initial weights. The
/// reference is always `frozen` with LoRA off, the critic `frozen` with the critic's scope.
#[derive(Clone, Copy)]
pub struct Actors<'a> {
    pub policy: &'a Model,
    pub policy_scope: Option<&'a str>,
    pub frozen: &'a Model,
    /// None for critic-free algorithms (GRPO, RLOO, REINFORCE++): no values are computed.
    pub critic: Option<&'a Critic>,
}

impl<'a> Actors<'a> {
    /// The reference's forward on `frozen`: no LoRA.
    pub fn reference_forward(&self) -> Forward<'a> {
        Forward {
            scope: self.policy_scope,
            disable_lora: true,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutConfig {
    pub max_new_tokens: usize,
    /// Pure temperature sampling (no top-k/top-p), also applied when recomputing log-probs.
    pub temperature: f32,
    /// Ids that end a response (any of them; kept as its last token).
    pub eos: Vec<u32>,
    /// With the row's index in the whole batch, seeds its sampling stream (see [`row_seed`]).
    pub seed: u64,
    /// The index in the whole batch of the first prompt given to [`collect`] (a data-parallel
    /// rank's slice starts past 0).
    pub first_row: usize,
    /// Rows per scoring forward (0: the whole batch in one); bounds the memory of the
    /// log-prob forwards on large models.
    pub forward_batch: usize,
    /// Run the policy's log-prob forward (pi_old). Off when the update takes pi_old from its
    /// own first forward (one on-policy optimiser step); `Rollout::logp` is then all 0.
    pub policy_logprobs: bool,
}

/// One batch of experience.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub prompts: Vec<Vec<u32>>,
    /// Sampled ids, truncated after the first EOS (included).
    pub responses: Vec<Vec<u32>>,
    pub ended_with_eos: Vec<bool>,
    pub layout: Layout,
    /// [B, R] log pi_old(y_k), 0 on pads (all 0 without `RolloutConfig::policy_logprobs`).
    pub logp: Vec<f32>,
    /// [B, R] log pi_ref(y_k), 0 on pads.
    pub ref_logp: Vec<f32>,
    /// [B, R] values (or [B] when the critic pools; empty without a critic).
    pub values: Vec<f32>,
    /// Seconds spent sampling and in the scoring forwards.
    pub generate_seconds: f64,
    pub forward_seconds: f64,
}

fn masked_vec(t: &Tensor, mask: &[f32]) -> Result<Vec<f32>> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter()
        .zip(mask)
        .map(|(x, m)| if *m > 0.0 { *x } else { 0.0 })
        .collect())
}

/// The sampling seed of row `row` of a batch: each row has its own random stream, so its
/// response does not depend on the rows sampled beside it (chunks, data-parallel ranks).
pub fn row_seed(seed: u64, row: usize) -> u64 {
    seed ^ (row as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03)
}

/// Samples responses with the policy and records per-token log-probs (policy, reference) and
/// values.
pub fn collect(actors: &Actors, prompts: &[Vec<u32>], cfg: &RolloutConfig) -> Result<Rollout> {
    if cfg.max_new_tokens == 0 {
        return Err(Error::msg("rollout: max_new_tokens must be at least 1"));
    }
    // 1. sample with the KV cache (actor scope, pure temperature)
    let t0 = std::time::Instant::now();
    // in chunks of `forward_batch` rows when set: a graph forward through trainable LoRA
    // weights keeps its activations until the step ends
    let gen_chunk = if cfg.forward_batch == 0 {
        prompts.len().max(1)
    } else {
        cfg.forward_batch
    };
    let (mut completions, mut ended) = (vec![], vec![]);
    for (c, chunk) in prompts.chunks(gen_chunk).enumerate() {
        let first = cfg.first_row + c * gen_chunk;
        let seeds: Vec<u64> = (first..first + chunk.len())
            .map(|row| row_seed(cfg.seed, row))
            .collect();
        let g = generate_rows(
            actors.policy,
            &GenerateRequest {
                prompts: chunk.to_vec(),
                max_new_tokens: cfg.max_new_tokens,
                eos: cfg.eos.clone(),
                sampling: Sampling {
                    temperature: cfg.temperature,
                    ..Sampling::default()
                },
                seed: cfg.seed,
                scope: actors.policy_scope.map(String::from),
                disable_lora: false,
            },
            Some(&seeds),
            |_, _| {},
        )?;
        completions.extend(g.completions);
        ended.extend(g.ended_with_eos);
    }
    let generate_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let lay = Layout::new(prompts, &completions)?;
    // 2. one forward each: policy, reference (LoRA off), critic; no backward follows, so the
    //    fused blocks are only a faster forward with less memory here
    let policy = Forward {
        scope: actors.policy_scope,
        fused_blocks: true,
        ..Default::default()
    };
    let reference = Forward {
        fused_blocks: true,
        ..actors.reference_forward()
    };
    let chunk = if cfg.forward_batch == 0 {
        lay.b
    } else {
        cfg.forward_batch
    };
    let (mut logp, mut ref_logp) = (Vec::with_capacity(lay.mask.len()), vec![]);
    let rows: Vec<usize> = (0..lay.b).collect();
    for idx in rows.chunks(chunk.max(1)) {
        let part = if idx.len() == lay.b {
            lay.clone()
        } else {
            lay.rows(idx)
        };
        if cfg.policy_logprobs {
            let (lp, _) = response_logprobs(actors.policy, &part, policy, cfg.temperature)?;
            logp.extend(masked_vec(&lp, &part.mask)?);
        } else {
            logp.extend(std::iter::repeat_n(0.0, part.mask.len()));
        }
        let (rl, _) = response_logprobs(actors.frozen, &part, reference, cfg.temperature)?;
        ref_logp.extend(masked_vec(&rl, &part.mask)?);
    }
    let values = match actors.critic {
        None => vec![],
        Some(critic) => {
            let (values, _) = critic.values(actors.frozen, &lay, true, true)?;
            if critic.pooled {
                values.to_dtype(DType::F32)?.to_vec1()?
            } else {
                masked_vec(&values, &lay.mask)?
            }
        }
    };
    Ok(Rollout {
        prompts: prompts.to_vec(),
        responses: completions,
        ended_with_eos: ended,
        layout: lay,
        logp,
        ref_logp,
        values,
        generate_seconds,
        forward_seconds: t1.elapsed().as_secs_f64(),
    })
}

/// A rollout with its scores, as every rank holds it after [`collect_scored`].
#[derive(Debug, Clone)]
pub struct Scored {
    pub ro: Rollout,
    /// [B] the scorer's scores.
    pub scores: Vec<f32>,
    /// [B] the gold scorer's, when one was given.
    pub gold: Option<Vec<f32>>,
    /// Seconds this rank spent scoring.
    pub score_seconds: f64,
}

/// Rolls out `prompts` and scores the responses, data-parallel: this rank samples, runs the
/// log-prob forwards for and scores only its share of the rows (whole groups of `group` rows,
/// so a GRPO/RLOO group stays on one rank), then every rank receives the whole batch, exactly
/// (see [`gather`]). Each row is seeded by its index in the whole batch, so the result equals one
/// process rolling out everything. `what` names the step in errors ("rl step 3").
pub fn collect_scored(
    actors: &Actors,
    prompts: &[Vec<u32>],
    group: usize,
    cfg: &RolloutConfig,
    scorer: &dyn Scorer,
    gold: Option<&dyn Scorer>,
    what: &str,
) -> Result<Scored> {
    let comm = dist::world();
    let group = group.max(1);
    let (lo, hi) = ddp::rows_of(prompts.len() / group, comm.rank(), comm.world_size());
    let (lo, hi) = (lo * group, hi * group);
    if lo == hi {
        return Err(Error::msg(format!(
            "{what}: rank {} of {} got no prompts: the batch of {} groups is smaller than the \
             number of processes",
            comm.rank(),
            comm.world_size(),
            prompts.len() / group
        )));
    }
    let ro = collect(
        actors,
        &prompts[lo..hi],
        &RolloutConfig {
            first_row: cfg.first_row + lo,
            ..cfg.clone()
        },
    )?;
    let t = std::time::Instant::now();
    let scores = scorer.score(&ro.prompts, &ro.responses)?;
    if scores.len() != ro.prompts.len() {
        return Err(Error::msg(format!(
            "scorer returned {} scores for {} responses",
            scores.len(),
            ro.prompts.len()
        )));
    }
    let golds = gold
        .map(|s| s.score(&ro.prompts, &ro.responses))
        .transpose()?;
    let score_seconds = t.elapsed().as_secs_f64();
    let pooled = actors.critic.is_some_and(|c| c.pooled);
    let (ro, scores, gold) = gather(comm, ro, scores, golds, pooled)?;
    if let Some(i) = scores.iter().position(|x| !x.is_finite()) {
        return Err(Error::msg(format!(
            "{what}: the scorer gave a non-finite score ({}) to response {i}",
            scores[i]
        )));
    }
    Ok(Scored {
        ro,
        scores,
        gold,
        score_seconds,
    })
}

/// Every rank's rows of a rollout (with their scores), concatenated in rank order on every rank:
/// the layout is rebuilt over all rows and the per-token arrays re-padded to its width. Values
/// travel as f64, so ids, log-probs and scores arrive unchanged. `pooled`: one value per row.
pub fn gather(
    comm: &dyn Communicator,
    ro: Rollout,
    scores: Vec<f32>,
    gold: Option<Vec<f32>>,
    pooled: bool,
) -> Result<(Rollout, Vec<f32>, Option<Vec<f32>>)> {
    if comm.world_size() == 1 {
        return Ok((ro, scores, gold));
    }
    let r = ro.layout.r;
    let has_values = !ro.values.is_empty();
    // per row: [prompt len, response len, ended, score, gold, prompt..., response...,
    //           logp..., ref_logp..., values (one when pooled, one per token, or none)...]
    let mut buf: Vec<f64> = vec![];
    for (i, (p, y)) in ro.prompts.iter().zip(&ro.responses).enumerate() {
        let n = y.len();
        buf.extend([
            p.len() as f64,
            n as f64,
            f64::from(u8::from(ro.ended_with_eos[i])),
        ]);
        buf.push(f64::from(scores[i]));
        buf.push(gold.as_ref().map_or(0.0, |g| f64::from(g[i])));
        buf.extend(p.iter().chain(y).map(|&t| f64::from(t)));
        let tokens = |v: &[f32]| {
            v[i * r..i * r + n]
                .iter()
                .map(|&x| f64::from(x))
                .collect::<Vec<_>>()
        };
        buf.extend(tokens(&ro.logp));
        buf.extend(tokens(&ro.ref_logp));
        if has_values {
            if pooled {
                buf.push(f64::from(ro.values[i]));
            } else {
                buf.extend(tokens(&ro.values));
            }
        }
    }
    let all = dist::all_gather_f64(comm, &buf)?;
    let (mut prompts, mut responses, mut ended, mut sc, mut gd) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut logp, mut ref_logp, mut values) = (vec![], vec![], vec![]);
    let mut at = 0;
    let take = |at: &mut usize, n: usize| -> Result<&[f64]> {
        let s = all
            .get(*at..*at + n)
            .ok_or_else(|| Error::msg("rollout gather: ranks sent inconsistent rows"))?;
        *at += n;
        Ok(s)
    };
    while at < all.len() {
        let h = take(&mut at, 5)?;
        let (np, n) = (h[0] as usize, h[1] as usize);
        ended.push(h[2] != 0.0);
        sc.push(h[3] as f32);
        gd.push(h[4] as f32);
        let ids = |v: &[f64]| v.iter().map(|&t| t as u32).collect::<Vec<u32>>();
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        prompts.push(ids(take(&mut at, np)?));
        responses.push(ids(take(&mut at, n)?));
        logp.push(f32s(take(&mut at, n)?));
        ref_logp.push(f32s(take(&mut at, n)?));
        if has_values {
            values.push(f32s(take(&mut at, if pooled { 1 } else { n })?));
        }
    }
    let layout = Layout::new(&prompts, &responses)?;
    let pad = |rows: Vec<Vec<f32>>| -> Vec<f32> {
        rows.into_iter()
            .flat_map(|v| {
                let k = layout.r - v.len();
                v.into_iter().chain(std::iter::repeat_n(0.0, k))
            })
            .collect()
    };
    let values = if pooled { values.concat() } else { pad(values) };
    let ro = Rollout {
        prompts,
        responses,
        ended_with_eos: ended,
        logp: pad(logp),
        ref_logp: pad(ref_logp),
        values,
        layout,
        generate_seconds: ro.generate_seconds,
        forward_seconds: ro.forward_seconds,
    };
    Ok((ro, sc, gold.map(|_| gd)))
}
