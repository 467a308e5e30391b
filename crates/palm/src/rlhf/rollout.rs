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

use crate::error::{Error, Result};
use crate::model::palm::log_softmax_last;
use crate::model::{Forward, Model};
use crate::rlhf::value::ValueHead;
use crate::sample::{generate, GenerateRequest, Sampling};

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
    /// The policy's forward (base weights frozen with a LoRA actor, trained without).
    pub fn policy_forward(&self) -> Forward<'a> {
        Forward {
            scope: self.policy_scope,
            freeze_base: self.policy_scope.is_some(),
            ..Default::default()
        }
    }

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
    pub seed: u64,
    /// Rows per scoring forward (0: the whole batch in one); bounds the memory of the
    /// log-prob forwards on large models.
    pub forward_batch: usize,
}

/// One batch of experience.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub prompts: Vec<Vec<u32>>,
    /// Sampled ids, truncated after the first EOS (included).
    pub responses: Vec<Vec<u32>>,
    pub ended_with_eos: Vec<bool>,
    pub layout: Layout,
    /// [B, R] log pi_old(y_k), 0 on pads.
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

/// Samples responses with the policy and records per-token log-probs (policy, reference) and
/// values.
pub fn collect(actors: &Actors, prompts: &[Vec<u32>], cfg: &RolloutConfig) -> Result<Rollout> {
    if cfg.max_new_tokens == 0 {
        return Err(Error::msg("rollout: max_new_tokens must be at least 1"));
    }
    // 1. sample with the KV cache (actor scope, pure temperature)
    let t0 = std::time::Instant::now();
    // in chunks of `forward_batch` rows when set (each with its own seed): a graph forward
    // through trainable LoRA weights keeps its activations until the step ends
    let gen_chunk = if cfg.forward_batch == 0 {
        prompts.len().max(1)
    } else {
        cfg.forward_batch
    };
    let (mut completions, mut ended) = (vec![], vec![]);
    for (c, chunk) in prompts.chunks(gen_chunk).enumerate() {
        let g = generate(
            actors.policy,
            &GenerateRequest {
                prompts: chunk.to_vec(),
                max_new_tokens: cfg.max_new_tokens,
                eos: cfg.eos.clone(),
                sampling: Sampling {
                    temperature: cfg.temperature,
                    ..Sampling::default()
                },
                seed: cfg.seed ^ (c as u64).wrapping_mul(0xd1b5_4a32_d192_ed03),
                scope: actors.policy_scope.map(String::from),
                disable_lora: false,
            },
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
        let (lp, _) = response_logprobs(actors.policy, &part, policy, cfg.temperature)?;
        logp.extend(masked_vec(&lp, &part.mask)?);
        drop(lp);
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
