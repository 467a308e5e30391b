//! What PPO optimises: anything that scores (prompt, response) pairs. The learned reward model
//! and the built-in tasks' exact (gold) scorers both implement it.

use crate::error::Result;

pub trait Scorer {
    /// One score per pair. `responses` hold the sampled ids, including the EOS id when one was
    /// emitted.
    fn score(&self, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Vec<f32>>;
}

impl<F> Scorer for F
where
    F: Fn(&[Vec<u32>], &[Vec<u32>]) -> Result<Vec<f32>>,
{
    fn score(&self, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        self(prompts, responses)
    }
}
