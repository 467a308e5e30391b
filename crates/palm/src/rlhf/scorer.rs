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

/// A `palm reward train` model as a PPO reward: the score at the last real token of
/// prompt ++ response ++ [eos], truncated as in training ([`RewardModel::score_pairs`]).
pub struct RewardModelScorer {
    pub model: crate::rlhf::reward::RewardModel,
    /// The EOS id training appended (the tokenizer's); `None`: nothing appended.
    pub eos: Option<u32>,
    pub batch_size: usize,
}

impl Scorer for RewardModelScorer {
    fn score(&self, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        self.model
            .score_pairs(prompts, responses, self.eos, self.batch_size)
    }
}

/// The VADER sentiment judge as a reward: the compound score (in [-1, 1]) of the response
/// decoded with the policy's tokenizer (a trailing EOS is dropped; the prompt is not scored).
pub struct VaderScorer {
    pub vader: crate::judges::Vader,
    pub tokenizer: crate::tokenizer::Tokenizer,
}

impl VaderScorer {
    pub fn text(&self, response: &[u32]) -> Result<String> {
        let r = match (response.last(), self.tokenizer.eos_id()) {
            (Some(&l), Some(e)) if l == e => &response[..response.len() - 1],
            _ => response,
        };
        self.tokenizer.decode(r)
    }
}

impl Scorer for VaderScorer {
    fn score(&self, prompts: &[Vec<u32>], responses: &[Vec<u32>]) -> Result<Vec<f32>> {
        debug_assert_eq!(prompts.len(), responses.len());
        responses
            .iter()
            .map(|r| Ok(self.vader.compound(&self.text(r)?) as f32))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vader_scorer_scores_the_decoded_response_without_eos() {
        let Some(dir) = crate::fixtures::require(crate::fixtures::data_path("judges/vader")) else {
            return;
        };
        let s = VaderScorer {
            vader: crate::judges::Vader::from_dir(&dir).unwrap(),
            tokenizer: crate::tokenizer::Tokenizer::Bytes,
        };
        let eos = s.tokenizer.eos_id().unwrap();
        let ids = |t: &str| t.bytes().map(u32::from).collect::<Vec<u32>>();
        let mut good = ids("What a wonderful, happy day!");
        good.push(eos);
        let bad = ids("This is a terrible, sad mess.");
        let got = s.score(&[vec![1], vec![1]], &[good, bad.clone()]).unwrap();
        // the reference: the judge on the same text directly
        let want_good = s.vader.compound("What a wonderful, happy day!") as f32;
        let want_bad = s.vader.compound("This is a terrible, sad mess.") as f32;
        assert_eq!(got, vec![want_good, want_bad]);
        assert!(got[0] > 0.5 && got[1] < -0.5, "{got:?}");
    }
}
