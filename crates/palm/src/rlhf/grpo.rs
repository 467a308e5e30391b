//! GRPO's group-relative advantages (DeepSeekMath; TRL `scale_rewards`), and Dr. GRPO's
//! mean-centring (Liu et al. 2025). Rewards are laid out group by group: completions
//! `g*G .. (g+1)*G` answer the same prompt. One scalar per completion, broadcast to its tokens
//! by the trainer ([`crate::rlhf::online`]).
//!
//! The std of a group is Bessel-corrected (TRL, veRL). A group whose rewards are all equal gets
//! exactly 0; a group whose std is below `std_floor` is only mean-centred (fp32 residue of a
//! constant group would otherwise be divided by ~1e-8: NeMo-RL #4161).

/// Per-group mean and Bessel-corrected std of `rewards` in groups of `g`.
pub fn group_stats(rewards: &[f32], g: usize) -> Vec<(f64, f64)> {
    rewards
        .chunks(g)
        .map(|c| {
            let n = c.len() as f64;
            let mean = c.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = if c.len() > 1 {
                c.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)
            } else {
                0.0
            };
            (mean, var.sqrt())
        })
        .collect()
}

/// True when every reward of the group is the same number.
pub fn is_constant(group: &[f32]) -> bool {
    group.windows(2).all(|w| w[0] == w[1])
}

/// GRPO: A_i = (R_i - mean_g) / (std_g + eps); a constant group gives 0, a group with
/// std < `std_floor` is only mean-centred. TRL uses eps = 1e-4.
pub fn group_norm(rewards: &[f32], g: usize, eps: f32, std_floor: f32) -> Vec<f32> {
    let stats = group_stats(rewards, g);
    rewards
        .chunks(g)
        .zip(stats)
        .flat_map(|(c, (mean, std))| {
            let constant = is_constant(c);
            c.iter().map(move |&r| {
                if constant {
                    0.0
                } else if std < std_floor as f64 {
                    (r as f64 - mean) as f32
                } else {
                    ((r as f64 - mean) / (std + eps as f64)) as f32
                }
            })
        })
        .collect()
}

/// Dr. GRPO: A_i = R_i - mean_g (no std division); a constant group gives exactly 0.
pub fn group_mean(rewards: &[f32], g: usize) -> Vec<f32> {
    rewards
        .chunks(g)
        .flat_map(|c| {
            let constant = is_constant(c);
            let mean = c.iter().map(|&x| x as f64).sum::<f64>() / c.len() as f64;
            c.iter().map(move |&r| {
                if constant {
                    0.0
                } else {
                    (r as f64 - mean) as f32
                }
            })
        })
        .collect()
}

/// The original's MaxRL: A_i = (R_i - mean_g) / |mean_g|, for success rates in [0, 1] (a group
/// solved 1 time in 8 weighs 8 times a group solved every time but one). A constant group gives
/// 0; a group with |mean| below `floor` is only mean-centred (the original divides by ~1e-8).
pub fn max_rl(rewards: &[f32], g: usize, floor: f32) -> Vec<f32> {
    rewards
        .chunks(g)
        .flat_map(|c| {
            let constant = is_constant(c);
            let mean = c.iter().map(|&x| x as f64).sum::<f64>() / c.len() as f64;
            let d = if mean.abs() < floor as f64 {
                1.0
            } else {
                mean.abs()
            };
            c.iter().map(move |&r| {
                if constant {
                    0.0
                } else {
                    ((r as f64 - mean) / d) as f32
                }
            })
        })
        .collect()
}

/// Share of groups whose rewards are all equal (TRL's `frac_reward_zero_std`: no signal).
pub fn frac_zero_std(rewards: &[f32], g: usize) -> f32 {
    let n = rewards.len().div_ceil(g).max(1);
    rewards.chunks(g).filter(|c| is_constant(c)).count() as f32 / n as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_norm_hand_computed() {
        // group 1: 0, 1, 1, 2 -> mean 1, Bessel var (1+0+0+1)/3 = 2/3
        // group 2: constant 0.1 -> exactly 0 (0.1 is not dyadic: the mean has fp residue)
        let r = [0.0, 1.0, 1.0, 2.0, 0.1, 0.1, 0.1, 0.1];
        let a = group_norm(&r, 4, 1e-4, 1e-3);
        let s = (2.0f64 / 3.0).sqrt() + 1e-4;
        let want = [-1.0 / s, 0.0, 0.0, 1.0 / s];
        for (x, w) in a[..4].iter().zip(want) {
            assert!((*x as f64 - w).abs() < 1e-6, "{a:?}");
        }
        assert_eq!(&a[4..], &[0.0; 4]);
        // group sums are 0
        assert!(a[..4].iter().sum::<f32>().abs() < 1e-6);
        // a tiny but real spread is only centred (below the floor)
        let t = group_norm(&[1.0, 1.0 + 1e-4], 2, 1e-4, 1e-3);
        assert!(
            (t[0] + 5e-5).abs() < 1e-7 && (t[1] - 5e-5).abs() < 1e-7,
            "{t:?}"
        );
    }

    #[test]
    fn max_rl_hand_computed() {
        // mean 0.25: (1 - 0.25) / 0.25 = 3, (0 - 0.25) / 0.25 = -1
        assert_eq!(
            max_rl(&[1.0, 0.0, 0.0, 0.0], 4, 1e-3),
            vec![3.0, -1.0, -1.0, -1.0]
        );
        assert_eq!(max_rl(&[0.0; 4], 4, 1e-3), vec![0.0; 4]);
        // a mean near 0 (a centred reward model) is only centred
        assert_eq!(max_rl(&[1.0, -1.0], 2, 1e-3), vec![1.0, -1.0]);
    }

    #[test]
    fn group_mean_and_zero_std_fraction() {
        let r = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        assert_eq!(
            group_mean(&r, 3),
            vec![2.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(frac_zero_std(&r, 3), 0.5);
        assert_eq!(frac_zero_std(&r, 2), 1.0 / 3.0);
    }
}
