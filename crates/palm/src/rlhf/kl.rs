//! KL between the policy and the frozen reference, per sampled token, and the adaptive KL
//! coefficient of Ziegler et al. (2019).
//!
//! With y ~ pi and log-ratio l = log pi(y) - log ref(y), the estimators of KL(pi || ref) are
//! (Schulman, "Approximating KL divergence"):
//! - k1 = l (unbiased, can be negative per token),
//! - k2 = l^2 / 2 (biased, low variance; TRL's approx-KL),
//! - k3 = (rho - 1) - log rho with rho = ref(y) / pi(y) = exp(-l) (unbiased, always >= 0).

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    #[default]
    K1,
    K2,
    K3,
}

impl FromStr for KlEstimator {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "k1" => Ok(Self::K1),
            "k2" => Ok(Self::K2),
            "k3" => Ok(Self::K3),
            _ => Err(Error::msg(format!(
                "unknown KL estimator `{s}` (expected k1, k2 or k3)"
            ))),
        }
    }
}

impl KlEstimator {
    /// Per-token estimate from the sampled token's log-probabilities under the policy and the
    /// reference.
    pub fn estimate(self, logp: f32, ref_logp: f32) -> f32 {
        let l = logp as f64 - ref_logp as f64; // log pi/ref
        let k = match self {
            KlEstimator::K1 => l,
            KlEstimator::K2 => 0.5 * l * l,
            // rho - 1 - log rho, rho = exp(-l); exp_m1 keeps precision near l = 0
            KlEstimator::K3 => (-l).exp_m1() + l,
        };
        k as f32
    }

    /// Estimates for a whole [B, T] batch (0 where `mask` is 0).
    pub fn estimate_all(self, logp: &[f32], ref_logp: &[f32], mask: &[f32]) -> Vec<f32> {
        logp.iter()
            .zip(ref_logp)
            .zip(mask)
            .map(|((&a, &b), &m)| if m > 0.0 { self.estimate(a, b) } else { 0.0 })
            .collect()
    }
}

/// The KL coefficient beta: fixed, or adapted towards a target KL (Ziegler et al.):
/// e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KlController {
    pub beta: f64,
    /// Target KL per sequence (nats); None = fixed beta.
    pub target: Option<f64>,
    /// Number of samples over which beta may change by a factor of about e^{0.2}.
    pub horizon: f64,
}

impl KlController {
    pub fn fixed(beta: f64) -> Self {
        Self {
            beta,
            target: None,
            horizon: 1.0,
        }
    }

    pub fn adaptive(init_beta: f64, target: f64, horizon: f64) -> Self {
        Self {
            beta: init_beta,
            target: Some(target),
            horizon,
        }
    }

    /// Updates beta after a batch of `n_steps` samples whose mean sequence KL was `kl`.
    pub fn update(&mut self, kl: f64, n_steps: usize) {
        if let Some(target) = self.target {
            let e = (kl / target - 1.0).clamp(-0.2, 0.2);
            self.beta *= 1.0 + e * n_steps as f64 / self.horizon;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // pi and ref over three outcomes; exact KL(pi || ref) = sum pi log(pi / ref)
    const PI: [f64; 3] = [0.5, 0.3, 0.2];
    const REF: [f64; 3] = [0.2, 0.5, 0.3];

    fn exact_kl() -> f64 {
        PI.iter().zip(REF).map(|(p, q)| p * (p / q).ln()).sum()
    }

    fn expectation(est: KlEstimator) -> f64 {
        PI.iter()
            .zip(REF)
            .map(|(p, q)| p * est.estimate(p.ln() as f32, q.ln() as f32) as f64)
            .sum()
    }

    #[test]
    fn k1_and_k3_are_unbiased_on_a_known_distribution() {
        let kl = exact_kl(); // 0.5 ln 2.5 + 0.3 ln 0.6 + 0.2 ln(2/3) = 0.22380...
        assert!((kl - 0.223_804).abs() < 1e-5, "{kl}");
        assert!((expectation(KlEstimator::K1) - kl).abs() < 1e-6);
        assert!((expectation(KlEstimator::K3) - kl).abs() < 1e-6);
        // k2 is biased (here upwards)
        assert!(expectation(KlEstimator::K2) > kl + 0.01);
    }

    #[test]
    fn k3_is_never_negative_and_k1_can_be() {
        for (p, q) in PI.iter().zip(REF) {
            assert!(KlEstimator::K3.estimate(p.ln() as f32, q.ln() as f32) >= 0.0);
        }
        // outcome 1: pi 0.3 < ref 0.5, so k1 is negative there
        assert!(KlEstimator::K1.estimate(0.3f32.ln(), 0.5f32.ln()) < 0.0);
        // hand value: rho = 0.5 / 0.3, k3 = rho - 1 - ln rho
        let rho: f64 = 0.5 / 0.3;
        let want = rho - 1.0 - rho.ln();
        let got = KlEstimator::K3.estimate(0.3f32.ln(), 0.5f32.ln()) as f64;
        assert!((got - want).abs() < 1e-6, "{got} {want}");
        assert_eq!(KlEstimator::K3.estimate(-1.0, -1.0), 0.0);
    }

    #[test]
    fn mask_zeroes_padding() {
        let k = KlEstimator::K1.estimate_all(&[-1.0, -2.0], &[-3.0, -0.5], &[1.0, 0.0]);
        assert_eq!(k, vec![2.0, 0.0]);
    }

    #[test]
    fn adaptive_controller_hand_computed() {
        let mut c = KlController::adaptive(0.2, 6.0, 10_000.0);
        // KL 9: e = clip(0.5) = 0.2; beta = 0.2 * (1 + 0.2 * 256 / 10000)
        c.update(9.0, 256);
        assert!((c.beta - 0.2 * (1.0 + 0.2 * 256.0 / 10_000.0)).abs() < 1e-12);
        // KL 3: e = -0.5 -> -0.2
        let b = c.beta;
        c.update(3.0, 100);
        assert!((c.beta - b * (1.0 - 0.2 * 100.0 / 10_000.0)).abs() < 1e-12);
        // KL 6.6: e = 0.1 (inside the clip)
        let b = c.beta;
        c.update(6.6, 1000);
        assert!((c.beta - b * (1.0 + 0.1 * 1000.0 / 10_000.0)).abs() < 1e-9);
        let mut f = KlController::fixed(0.05);
        f.update(100.0, 1000);
        assert_eq!(f.beta, 0.05);
    }
}
