//! The critic-free policy losses of the GRPO/RLOO/REINFORCE++ family, as pure functions of
//! per-token tensors [n, T] (0/1 mask, right padding):
//! - the clipped surrogate with separate low/high clips (DAPO's clip-higher),
//!   l = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A);
//! - the KL to the reference in the loss, beta * k(logp, ref) with gradient through logp;
//! - the aggregation of per-token losses into one number ([`LossAgg`]), as per-token weights
//!   whose normaliser is computed ONCE per optimiser step over exactly the tokens accumulated
//!   into it, so k micro-batches of B/k rows give the gradient of one batch of B rows.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::rlhf::kl::KlEstimator;

/// How per-token losses L[i, t] become the loss (veRL's names; TRL's in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossAgg {
    /// sum m*L / sum m over every token of the optimiser step (TRL `dapo`, OpenRLHF, veRL).
    TokenMean,
    /// mean over sequences of each sequence's token mean (TRL `grpo`; GRPO's length bias).
    SeqMeanTokenMean,
    /// mean over sequences of each sequence's token sum.
    SeqMeanTokenSum,
    /// sum m*L / (number of sequences * max response length) (TRL `dr_grpo`).
    SeqMeanTokenSumNorm,
}

impl std::str::FromStr for LossAgg {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "token-mean" => Self::TokenMean,
            "seq-mean-token-mean" => Self::SeqMeanTokenMean,
            "seq-mean-token-sum" => Self::SeqMeanTokenSum,
            "seq-mean-token-sum-norm" => Self::SeqMeanTokenSumNorm,
            _ => {
                return Err(crate::error::Error::msg(format!(
                    "unknown loss aggregation `{s}` (expected token-mean, seq-mean-token-mean, \
                     seq-mean-token-sum or seq-mean-token-sum-norm)"
                )))
            }
        })
    }
}

/// What the aggregation divides by, fixed for one optimiser step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normaliser {
    pub agg: LossAgg,
    /// Sequences in the optimiser step.
    pub seqs: usize,
    /// Valid tokens in the optimiser step.
    pub tokens: usize,
    /// The maximum response length (the constant of Dr. GRPO).
    pub max_len: usize,
}

impl Normaliser {
    /// Over all rows of `mask` ([rows, t]), the whole optimiser step.
    pub fn new(agg: LossAgg, mask: &[f32], t: usize, max_len: usize) -> Self {
        Self {
            agg,
            seqs: mask.len() / t.max(1),
            tokens: mask.iter().filter(|&&m| m > 0.0).count(),
            max_len,
        }
    }

    /// Per-token weights of rows `mask` ([n, t], any subset of the step): loss = sum W * L.
    pub fn weights(&self, mask: &[f32], t: usize) -> Vec<f32> {
        let seqs = self.seqs.max(1) as f64;
        mask.chunks(t)
            .flat_map(|row| {
                let len = row.iter().filter(|&&m| m > 0.0).count().max(1) as f64;
                let w = match self.agg {
                    LossAgg::TokenMean => 1.0 / self.tokens.max(1) as f64,
                    LossAgg::SeqMeanTokenMean => 1.0 / (seqs * len),
                    LossAgg::SeqMeanTokenSum => 1.0 / seqs,
                    LossAgg::SeqMeanTokenSumNorm => 1.0 / (seqs * self.max_len.max(1) as f64),
                };
                row.iter()
                    .map(move |&m| if m > 0.0 { w as f32 } else { 0.0 })
            })
            .collect()
    }
}

/// Clip ranges of the ratio: [1 - low, 1 + high]. With `spo` the clip is replaced by the
/// simple policy optimisation penalty (Xie et al. 2025, the original's `use_spo`):
/// l = -rho * A + (rho - 1)^2 * |A| / (2 * low), smooth where the clip is flat.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Clip {
    pub low: f32,
    pub high: f32,
    #[serde(default)]
    pub spo: bool,
}

/// The KL term in the loss: beta * estimator(logp, ref).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlInLoss {
    pub beta: f64,
    pub estimator: KlEstimator,
}

/// Per-token KL estimates [n, T] with gradient through `logp` (k1 = d, k2 = d^2/2,
/// k3 = exp(-d) - 1 + d, d = logp - ref).
pub fn kl_tensor(logp: &Tensor, ref_logp: &Tensor, est: KlEstimator) -> Result<Tensor> {
    let d = (logp - ref_logp)?;
    Ok(match est {
        KlEstimator::K1 => d,
        KlEstimator::K2 => (d.sqr()? * 0.5)?,
        KlEstimator::K3 => ((d.neg()?.exp()? - 1.0)? + &d)?,
    })
}

/// TRL's clip metrics over valid tokens: `low` = rho < 1 - eps_low with A < 0, `high` = rho >
/// 1 + eps_high with A > 0 (the tokens whose gradient the clip removes), `region` = either.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ClipStats {
    pub low_mean: f32,
    pub high_mean: f32,
    pub region_mean: f32,
}

/// Output of [`policy_loss`].
pub struct PolicyLoss {
    /// The aggregated loss (policy term + KL term), with gradient.
    pub loss: Tensor,
    /// The aggregated policy term alone (value).
    pub policy: f32,
    /// The aggregated KL term (value, before beta), or 0 without a KL in the loss.
    pub kl: f32,
    pub clip: ClipStats,
}

/// The per-token clipped surrogate plus `kl`, aggregated with `weights` ([n, T], from
/// [`Normaliser::weights`]). `adv` is per token [n, T] (a sequence advantage broadcast).
#[allow(clippy::too_many_arguments)]
pub fn policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    adv: &Tensor,
    mask: &Tensor,
    weights: &Tensor,
    clip: Clip,
    kl: Option<KlInLoss>,
) -> Result<PolicyLoss> {
    let ratio = (logp - old_logp)?.exp()?;
    let l1 = (&ratio * adv)?;
    let per_token = if clip.spo {
        let pen = (((&ratio - 1.0)?.sqr()? * adv.abs()?)? / (2.0 * clip.low as f64))?;
        (pen - l1)?
    } else {
        let l2 = (ratio.clamp(1.0 - clip.low, 1.0 + clip.high)? * adv)?;
        l1.minimum(&l2)?.neg()?
    };
    let policy = (&per_token * weights)?.sum_all()?;
    let (loss, kl_value) = match (kl, ref_logp) {
        (Some(k), Some(r)) if k.beta != 0.0 => {
            let kt = (kl_tensor(logp, r, k.estimator)? * weights)?.sum_all()?;
            let v = kt.to_scalar::<f32>()?;
            ((&policy + (kt * k.beta)?)?, v)
        }
        _ => (policy.clone(), 0.0),
    };
    // clip metrics (no gradient)
    let (r, a) = (ratio.detach(), adv.detach());
    let zero = a.zeros_like()?;
    let low = (r.lt(1.0 - clip.low)?.to_dtype(candle_core::DType::F32)?
        * a.lt(&zero)?.to_dtype(candle_core::DType::F32)?)?;
    let high = (r.gt(1.0 + clip.high)?.to_dtype(candle_core::DType::F32)?
        * a.gt(&zero)?.to_dtype(candle_core::DType::F32)?)?;
    let n = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
    let mean = |x: &Tensor| -> Result<f32> { Ok((x * mask)?.sum_all()?.to_scalar::<f32>()? / n) };
    let clip_stats = ClipStats {
        low_mean: mean(&low)?,
        high_mean: mean(&high)?,
        region_mean: mean(&(&low + &high)?)?,
    };
    Ok(PolicyLoss {
        policy: policy.to_scalar::<f32>()?,
        loss,
        kl: kl_value,
        clip: clip_stats,
    })
}

/// Per-token entropy [n, T] of `logits` [n, T, V], with gradient.
pub fn token_entropy(logits: &Tensor) -> Result<Tensor> {
    let logp = crate::model::palm::log_softmax_last(logits)?;
    Ok((logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32], n: usize, k: usize) -> Tensor {
        Tensor::from_slice(v, (n, k), &Device::Cpu).unwrap()
    }

    // rows: lengths 3 and 1 (T = 3); per-token losses L
    const L: [f32; 6] = [1.0, 2.0, 3.0, 10.0, 0.0, 0.0];
    const M: [f32; 6] = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0];

    fn agg(a: LossAgg, max_len: usize) -> f32 {
        let w = Normaliser::new(a, &M, 3, max_len).weights(&M, 3);
        w.iter().zip(L).map(|(w, l)| w * l).sum()
    }

    #[test]
    fn aggregation_modes_hand_computed() {
        // token-mean: (1+2+3+10)/4 = 4
        assert!((agg(LossAgg::TokenMean, 3) - 4.0).abs() < 1e-6);
        // seq-mean-token-mean: (2 + 10)/2 = 6
        assert!((agg(LossAgg::SeqMeanTokenMean, 3) - 6.0).abs() < 1e-6);
        // seq-mean-token-sum: (6 + 10)/2 = 8
        assert!((agg(LossAgg::SeqMeanTokenSum, 3) - 8.0).abs() < 1e-6);
        // seq-mean-token-sum-norm with max length 4: 16 / (2*4) = 2
        assert!((agg(LossAgg::SeqMeanTokenSumNorm, 4) - 2.0).abs() < 1e-6);
    }

    #[test]
    fn accumulating_micro_batches_equals_one_batch() {
        // 4 rows of unequal length; the step normaliser is over all 4; micro-batches of 1, 2, 4
        let mask = [1., 1., 0., 1., 0., 0., 1., 1., 1., 1., 1., 0.];
        let lt = [
            0.3, -1.2, 5.0, 2.0, 7.0, 7.0, -0.5, 0.25, 1.0, 4.0, -2.0, 9.0,
        ];
        for a in [
            LossAgg::TokenMean,
            LossAgg::SeqMeanTokenMean,
            LossAgg::SeqMeanTokenSum,
            LossAgg::SeqMeanTokenSumNorm,
        ] {
            let norm = Normaliser::new(a, &mask, 3, 3);
            let whole: f32 = norm
                .weights(&mask, 3)
                .iter()
                .zip(lt)
                .map(|(w, l)| w * l)
                .sum();
            for k in [1usize, 2, 4] {
                let rows = 4 / k;
                let mut acc = 0f32;
                for c in 0..k {
                    let r = c * rows * 3..(c + 1) * rows * 3;
                    let w = norm.weights(&mask[r.clone()], 3);
                    acc += w.iter().zip(&lt[r]).map(|(w, l)| w * l).sum::<f32>();
                }
                assert!((acc - whole).abs() < 1e-6, "{a:?} k={k}: {acc} vs {whole}");
            }
            // a micro-batch's own normaliser is NOT the same (the bug this avoids)
            let own = Normaliser::new(a, &mask[..3], 3, 3).weights(&mask[..3], 3);
            let step = norm.weights(&mask[..3], 3);
            assert_ne!(own, step, "{a:?}");
        }
    }

    #[test]
    fn clipped_surrogate_with_clip_higher() {
        // tokens: rho = 1.5 (A=+1, clipped high at 1.28), rho = 0.5 (A=-1, clipped low at 0.8),
        //         rho = 1.1 (A=+2, inside), pad
        let old = t(&[0.0, 0.0, 0.0, 0.0], 1, 4);
        let lp = [1.5f32.ln(), 0.5f32.ln(), 1.1f32.ln(), 9.0];
        let var = Var::from_tensor(&t(&lp, 1, 4)).unwrap();
        let adv = t(&[1.0, -1.0, 2.0, 5.0], 1, 4);
        let mask = t(&[1.0, 1.0, 1.0, 0.0], 1, 4);
        let mv = [1.0, 1.0, 1.0, 0.0];
        let w = Tensor::from_vec(
            Normaliser::new(LossAgg::TokenMean, &mv, 4, 4).weights(&mv, 4),
            (1, 4),
            &Device::Cpu,
        )
        .unwrap();
        let clip = Clip {
            low: 0.2,
            high: 0.28,
            spo: false,
        };
        let out = policy_loss(var.as_tensor(), &old, None, &adv, &mask, &w, clip, None).unwrap();
        // -min(1.5, 1.28) = -1.28; -min(-0.5, -0.8) = 0.8; -min(2.2, 2.2) = -2.2 -> mean -0.8933
        let want = (-1.28 + 0.8 - 2.2) / 3.0;
        assert!((out.policy - want).abs() < 1e-5, "{}", out.policy);
        assert!((out.clip.high_mean - 1.0 / 3.0).abs() < 1e-6);
        assert!((out.clip.low_mean - 1.0 / 3.0).abs() < 1e-6);
        assert!((out.clip.region_mean - 2.0 / 3.0).abs() < 1e-6);
        // only the unclipped token has a gradient: d/dlogp of -rho*A/3 = -1.1*2/3
        let g: Vec<f32> = out
            .loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(g[0] == 0.0 && g[1] == 0.0 && g[3] == 0.0, "{g:?}");
        assert!((g[2] + 2.2 / 3.0).abs() < 1e-5, "{g:?}");
    }

    #[test]
    fn spo_penalty_hand_computed() {
        // rho = 1.5, A = 2, eps 0.25: -3 + 0.25 * 2 / 0.5 = -2; d/dlogp = rho * (-A + 2 (rho - 1) |A| / (2 eps)) = 1.5 * (-2 + 4) = 3
        let var = Var::from_tensor(&t(&[1.5f32.ln()], 1, 1)).unwrap();
        let one = t(&[1.0], 1, 1);
        let clip = Clip {
            low: 0.25,
            high: 0.25,
            spo: true,
        };
        let out = policy_loss(
            var.as_tensor(),
            &t(&[0.0], 1, 1),
            None,
            &t(&[2.0], 1, 1),
            &one,
            &one,
            clip,
            None,
        )
        .unwrap();
        assert!((out.policy + 2.0).abs() < 1e-5, "{}", out.policy);
        let g = out
            .loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((g[0] - 3.0).abs() < 1e-4, "{g:?}");
    }

    #[test]
    fn kl_estimators_in_the_loss() {
        let lp = t(&[-1.0, -2.0, -0.5], 1, 3);
        let rf = t(&[-1.0, -1.0, -1.5], 1, 3);
        for est in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            let k: Vec<f32> = kl_tensor(&lp, &rf, est)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // the same numbers as the scalar estimators used in rewards
            for (i, x) in k.iter().enumerate() {
                let want = est.estimate([-1.0, -2.0, -0.5][i], [-1.0, -1.0, -1.5][i]);
                assert!((x - want).abs() < 1e-6, "{est:?} {k:?}");
            }
            // 0 at pi = ref
            assert_eq!(k[0], 0.0);
            if est != KlEstimator::K1 {
                assert!(k.iter().all(|&v| v >= 0.0));
            }
        }
    }
}
