//! Pure per-token maths of PPO for language models, on [B, T] batches stored row-major with a
//! 0/1 mask (1 = a real response token). Responses are right-padded: row b's tokens are
//! positions 0..len_b, so "the last real token" is the last position whose mask is 1.
//!
//! Everything is a masked statistic: padding never enters a mean, a variance or a return.

/// Mean of `x` over positions where `mask` is 1 (0 when the mask is empty).
pub fn masked_mean(x: &[f32], mask: &[f32]) -> f32 {
    let (mut s, mut n) = (0f64, 0f64);
    for (&v, &m) in x.iter().zip(mask) {
        s += v as f64 * m as f64;
        n += m as f64;
    }
    if n > 0.0 {
        (s / n) as f32
    } else {
        0.0
    }
}

/// Variance of `x` over the masked positions; `unbiased` applies Bessel's correction n/(n-1)
/// (as TRL's `masked_var`).
pub fn masked_var(x: &[f32], mask: &[f32], unbiased: bool) -> f32 {
    let mean = masked_mean(x, mask) as f64;
    let (mut s, mut n) = (0f64, 0f64);
    for (&v, &m) in x.iter().zip(mask) {
        let d = v as f64 - mean;
        s += d * d * m as f64;
        n += m as f64;
    }
    if n == 0.0 {
        return 0.0;
    }
    let var = s / n;
    if unbiased && n > 1.0 {
        (var * n / (n - 1.0)) as f32
    } else {
        var as f32
    }
}

/// Whitening over the valid positions: (x - mean) / sqrt(var + 1e-8), with the mean added back
/// when `shift_mean` is false (TRL whitens rewards that way). Padding comes out as 0.
pub fn whiten(x: &[f32], mask: &[f32], shift_mean: bool) -> Vec<f32> {
    let mean = masked_mean(x, mask);
    let var = masked_var(x, mask, true);
    let inv = 1.0 / ((var as f64) + 1e-8).sqrt();
    x.iter()
        .zip(mask)
        .map(|(&v, &m)| {
            if m == 0.0 {
                return 0.0;
            }
            let w = ((v - mean) as f64 * inv) as f32;
            if shift_mean {
                w
            } else {
                w + mean
            }
        })
        .collect()
}

/// Generalised advantage estimation over the response tokens of each row (rows of length `t`):
/// delta_k = r_k + gamma * V_{k+1} - V_k (V after the last real token is 0),
/// A_k = delta_k + gamma * lambda * A_{k+1}; returns R_k = A_k + V_k. Pads get 0.
pub fn gae(
    rewards: &[f32],
    values: &[f32],
    mask: &[f32],
    t: usize,
    gamma: f32,
    lam: f32,
) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0f32; n];
    let mut ret = vec![0f32; n];
    for row in 0..n / t {
        let o = row * t;
        let mut next_adv = 0f32;
        let mut next_value = 0f32;
        for k in (0..t).rev() {
            if mask[o + k] == 0.0 {
                next_adv = 0.0;
                next_value = 0.0;
                continue;
            }
            let delta = rewards[o + k] + gamma * next_value - values[o + k];
            let a = delta + gamma * lam * next_adv;
            adv[o + k] = a;
            ret[o + k] = a + values[o + k];
            next_adv = a;
            next_value = values[o + k];
        }
    }
    (adv, ret)
}

/// Index of the last real token of each row (None for an empty response).
pub fn last_token(mask: &[f32], t: usize) -> Vec<Option<usize>> {
    mask.chunks(t)
        .map(|row| row.iter().rposition(|&m| m > 0.0))
        .collect()
}

/// Per-token rewards r_k = -beta * KL_k on every response token, plus the sequence score at
/// the last real token (InstructGPT / TRL). Pads get 0.
pub fn token_rewards(scores: &[f32], kl: &[f32], mask: &[f32], t: usize, beta: f32) -> Vec<f32> {
    let mut r: Vec<f32> = kl
        .iter()
        .zip(mask)
        .map(|(&k, &m)| if m > 0.0 { -beta * k } else { 0.0 })
        .collect();
    for (row, last) in last_token(mask, t).into_iter().enumerate() {
        if let Some(k) = last {
            r[row * t + k] += scores[row];
        }
    }
    r
}

/// How raw scores become the reward: `(s - bias) * gain` (normalisation, fitted once on the
/// initial policy's samples as OpenAI did), minus `missing_eos_penalty` for responses that never
/// emitted EOS, then clipped to `[-clip, clip]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreShaping {
    pub norm: Option<(f32, f32)>,
    pub missing_eos_penalty: f32,
    pub clip: Option<f32>,
}

pub fn shape_scores(raw: &[f32], ended_with_eos: &[bool], s: &ScoreShaping) -> Vec<f32> {
    raw.iter()
        .zip(ended_with_eos)
        .map(|(&x, &eos)| {
            let mut v = match s.norm {
                Some((bias, gain)) => (x - bias) * gain,
                None => x,
            };
            if !eos {
                v -= s.missing_eos_penalty;
            }
            if let Some(c) = s.clip {
                v = v.clamp(-c, c);
            }
            v
        })
        .collect()
}

/// (bias, gain) that give `raw` mean 0 and standard deviation 1.
pub fn fit_normalisation(raw: &[f32]) -> (f32, f32) {
    let ones = vec![1f32; raw.len()];
    let mean = masked_mean(raw, &ones);
    let std = masked_var(raw, &ones, false).sqrt();
    (mean, 1.0 / std.max(1e-6))
}

/// 1 - Var(returns - values) / Var(returns) over valid tokens.
pub fn explained_variance(values: &[f32], returns: &[f32], mask: &[f32]) -> f32 {
    let diff: Vec<f32> = returns.iter().zip(values).map(|(r, v)| r - v).collect();
    let var_r = masked_var(returns, mask, false);
    if var_r <= 0.0 {
        return f32::NAN;
    }
    1.0 - masked_var(&diff, mask, false) / var_r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol,
                "index {i}: {x} vs {y} ({a:?} vs {b:?})"
            );
        }
    }

    #[test]
    fn masked_stats_ignore_padding() {
        let x = [1.0, 2.0, 3.0, 100.0];
        let m = [1.0, 1.0, 1.0, 0.0];
        assert_eq!(masked_mean(&x, &m), 2.0);
        // deviations -1, 0, 1: biased 2/3, unbiased 1
        assert!((masked_var(&x, &m, false) - 2.0 / 3.0).abs() < 1e-6);
        assert!((masked_var(&x, &m, true) - 1.0).abs() < 1e-6);
        // whitened (unbiased std 1): -1, 0, 1, pad 0
        close(&whiten(&x, &m, true), &[-1.0, 0.0, 1.0, 0.0], 1e-6);
        close(&whiten(&x, &m, false), &[1.0, 2.0, 3.0, 0.0], 1e-6);
        // a pad value of any size changes nothing
        let y = [1.0, 2.0, 3.0, -7e6];
        assert_eq!(whiten(&x, &m, true), whiten(&y, &m, true));
    }

    #[test]
    fn gae_hand_computed() {
        // one row of 3 real tokens + 1 pad; gamma 0.9, lambda 0.5
        let r = [0.0, 0.0, 1.0, 9.0];
        let v = [0.5, 0.2, 0.4, 9.0];
        let m = [1.0, 1.0, 1.0, 0.0];
        let (adv, ret) = gae(&r, &v, &m, 4, 0.9, 0.5);
        // k=2: delta = 1 + 0 - 0.4 = 0.6, A2 = 0.6
        // k=1: delta = 0 + 0.9*0.4 - 0.2 = 0.16, A1 = 0.16 + 0.45*0.6 = 0.43
        // k=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32, A0 = -0.32 + 0.45*0.43 = -0.1265
        close(&adv, &[-0.1265, 0.43, 0.6, 0.0], 1e-6);
        close(&ret, &[0.3735, 0.63, 1.0, 0.0], 1e-6);
    }

    #[test]
    fn gae_with_gamma_lambda_one_is_reward_to_go_minus_value() {
        let r = [0.1, -0.2, 0.3, 0.0, 1.0, 0.0];
        let v = [0.3, 0.1, 0.2, 0.7, 0.0, 0.0];
        let m = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0];
        let (adv, ret) = gae(&r, &v, &m, 3, 1.0, 1.0);
        // row 0: to-go 0.2, 0.1, 0.3; row 1: 1.0, 1.0, pad
        close(&ret, &[0.2, 0.1, 0.3, 1.0, 1.0, 0.0], 1e-6);
        close(&adv, &[-0.1, 0.0, 0.1, 0.3, 1.0, 0.0], 1e-6);
    }

    #[test]
    fn rewards_put_the_score_on_the_last_real_token() {
        let kl = [0.5, -0.1, 0.2, 0.3, 7.0, 7.0];
        let m = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        let r = token_rewards(&[2.0, -1.0], &kl, &m, 3, 0.1);
        close(&r, &[-0.05, 0.01, 1.98, -1.03, 0.0, 0.0], 1e-6);
    }

    #[test]
    fn score_shaping_order_and_clip() {
        let s = ScoreShaping {
            norm: Some((1.0, 2.0)),
            missing_eos_penalty: 1.0,
            clip: Some(3.0),
        };
        // (3-1)*2 = 4 -> clip 3; (0-1)*2 - 1 = -3; (5-1)*2 - 1 = 7 -> 3
        let out = shape_scores(&[3.0, 0.0, 5.0], &[true, false, false], &s);
        assert_eq!(out, vec![3.0, -3.0, 3.0]);
        let (b, g) = fit_normalisation(&[1.0, 3.0]);
        assert_eq!((b, g), (2.0, 1.0));
    }

    #[test]
    fn explained_variance_hand_computed() {
        let ret = [1.0, 3.0, 9.0];
        let m = [1.0, 1.0, 0.0];
        assert!((explained_variance(&ret, &ret, &m) - 1.0).abs() < 1e-6);
        // residuals 1, -1 (var 1) vs returns var 1 -> 0
        assert!(explained_variance(&[0.0, 4.0, 0.0], &ret, &m).abs() < 1e-6);
    }
}
