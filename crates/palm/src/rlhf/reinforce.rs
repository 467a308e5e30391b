//! REINFORCE++ (Hu et al. 2025, OpenRLHF `reinforce`) and REINFORCE++-baseline
//! (`reinforce_baseline`): no critic. Token rewards r_t = -beta * KL_t plus the (optionally
//! group-centred) outcome reward at the last real token; the advantage is the return
//! G_t = sum_{s >= t} gamma^(s-t) r_s, whitened over ALL valid tokens of the batch (mean 0,
//! population std 1; sqrt(max(var, 1e-8)) as OpenRLHF). Rows are right-padded to width `t`.

use crate::rlhf::advantage::{masked_mean, masked_var};

/// Returns G_t = r_t + gamma * G_{t+1} within each row's valid tokens (pads 0).
pub fn returns(rewards: &[f32], mask: &[f32], t: usize, gamma: f32) -> Vec<f32> {
    let mut out = vec![0f32; rewards.len()];
    for (row, (r, m)) in rewards.chunks(t).zip(mask.chunks(t)).enumerate() {
        let mut g = 0f64;
        for k in (0..t).rev() {
            if m[k] == 0.0 {
                g = 0.0;
                continue;
            }
            g = r[k] as f64 + gamma as f64 * g;
            out[row * t + k] = g as f32;
        }
    }
    out
}

/// Global whitening over the valid tokens: (x - mean) / sqrt(max(var, 1e-8)) with the
/// population variance; pads come out 0.
pub fn whiten_global(x: &[f32], mask: &[f32]) -> Vec<f32> {
    let mean = masked_mean(x, mask) as f64;
    let var = masked_var(x, mask, false) as f64;
    let inv = 1.0 / var.max(1e-8).sqrt();
    x.iter()
        .zip(mask)
        .map(|(&v, &m)| {
            if m > 0.0 {
                ((v as f64 - mean) * inv) as f32
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_hand_computed() {
        // row 0: r = 1, 2, 3 (gamma 0.5): G = 1 + 0.5*(2 + 0.5*3) = 2.75, 3.5, 3; row 1: 4, pad, pad
        let r = [1.0, 2.0, 3.0, 4.0, 9.0, 9.0];
        let m = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        assert_eq!(returns(&r, &m, 3, 0.5), vec![2.75, 3.5, 3.0, 4.0, 0.0, 0.0]);
    }

    #[test]
    fn whitening_is_global_and_ignores_padding() {
        let x = [1.0, 2.0, 3.0, 6.0, 123.0, -50.0];
        let m = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        let w = whiten_global(&x, &m);
        let mean: f32 = w[..4].iter().sum::<f32>() / 4.0;
        let var: f32 = w[..4].iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5, "{w:?}");
        assert_eq!(&w[4..], &[0.0, 0.0]);
        // hand value: mean 3, population var (4+1+0+9)/4 = 3.5
        assert!((w[0] - (-2.0 / 3.5f32.sqrt())).abs() < 1e-6);
        // changing a pad changes nothing
        let y = [1.0, 2.0, 3.0, 6.0, -7.0, 1e6];
        assert_eq!(whiten_global(&y, &m), w);
    }
}
