//! Seeded random numbers: one ChaCha stream per purpose, so one seed fixes init, data order,
//! dropout and sampling, and the state can be saved and restored exactly.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub type PalmRng = ChaCha8Rng;

pub fn seeded(seed: u64) -> PalmRng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A derived stream: `seed` mixed with a purpose tag, so streams never overlap.
pub fn stream(seed: u64, purpose: u64) -> PalmRng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(purpose);
    r
}

/// `n` draws from N(0, std^2) (Box-Muller).
pub fn normal(rng: &mut PalmRng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32 * std);
        if out.len() < n {
            out.push((r * t.sin()) as f32 * std);
        }
    }
    out
}

/// `n` draws from U(lo, hi).
pub fn uniform(rng: &mut PalmRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| lo + (hi - lo) * rng.random::<f32>())
        .collect()
}

/// Serialisable RNG position: (seed, stream, word position).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub seed: [u8; 32],
    pub stream: u64,
    pub word_pos: u128,
}

pub fn save_state(rng: &PalmRng) -> RngState {
    RngState {
        seed: rng.get_seed(),
        stream: rng.get_stream(),
        word_pos: rng.get_word_pos(),
    }
}

pub fn restore_state(s: &RngState) -> PalmRng {
    let mut r = ChaCha8Rng::from_seed(s.seed);
    r.set_stream(s.stream);
    r.set_word_pos(s.word_pos);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn state_round_trips() {
        let mut a = seeded(7);
        let _ = normal(&mut a, 13, 1.0);
        let s = save_state(&a);
        let mut b = restore_state(&s);
        assert_eq!(normal(&mut a, 5, 1.0), normal(&mut b, 5, 1.0));
    }
    #[test]
    fn normal_has_unit_variance() {
        let mut a = seeded(1);
        let v = normal(&mut a, 20000, 1.0);
        let m: f32 = v.iter().sum::<f32>() / v.len() as f32;
        let var: f32 = v.iter().map(|x| (x - m) * (x - m)).sum::<f32>() / v.len() as f32;
        assert!(m.abs() < 0.03 && (var - 1.0).abs() < 0.05, "{m} {var}");
    }
}
