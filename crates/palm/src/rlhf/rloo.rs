//! RLOO's leave-one-out baseline (Ahmadian et al. 2024): each completion is compared with the
//! mean reward of the other G - 1 completions of its prompt,
//! A_i = R_i - (sum_{j != i} R_j) / (G - 1) = G / (G - 1) * (R_i - mean_g).
//! Groups are laid out as in [`crate::rlhf::grpo`]; G >= 2 (checked by the trainer's config).

/// Leave-one-out advantages of `rewards` in groups of `g` (a constant group gives exactly 0).
pub fn leave_one_out(rewards: &[f32], g: usize) -> Vec<f32> {
    rewards
        .chunks(g)
        .flat_map(|c| {
            let constant = crate::rlhf::grpo::is_constant(c);
            let sum = c.iter().map(|&x| x as f64).sum::<f64>();
            let k = (c.len() as f64 - 1.0).max(1.0);
            c.iter().map(move |&r| {
                if constant {
                    0.0
                } else {
                    (r as f64 - (sum - r as f64) / k) as f32
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leave_one_out_is_scaled_centring() {
        let r = [3.0, 1.0, 0.0, 4.0, 2.0, 2.0, 5.0, -1.0];
        let a = leave_one_out(&r, 4);
        for (grp, ag) in r.chunks(4).zip(a.chunks(4)) {
            let mean = grp.iter().sum::<f32>() / 4.0;
            for (x, y) in grp.iter().zip(ag) {
                assert!((y - 4.0 / 3.0 * (x - mean)).abs() < 1e-5, "{a:?}");
            }
            assert!(ag.iter().sum::<f32>().abs() < 1e-5);
        }
        // hand value: 3 - (1 + 0 + 4) / 3 = 4/3
        assert!((a[0] - 4.0 / 3.0).abs() < 1e-6);
        assert_eq!(leave_one_out(&[0.3, 0.3, 0.3], 3), vec![0.0; 3]);
    }
}
