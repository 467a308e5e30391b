//! Sampling and batched generation with a KV cache.
//!
//! Filters use their standard meanings, applied in this order: temperature, top-k (keep the k
//! most likely ids), top-p (keep the smallest set of most likely ids whose probability mass
//! reaches p). The original's `filter_thres` is inverted: its `top_k(thres)` keeps
//! `ceil((1 - thres) * V)` ids (so its default 0.9 keeps the top 10 %), and its `top_p(thres)`
//! keeps mass `1 - thres`. Greedy (or temperature 0) takes the argmax, ties to the lowest id.
//!
//! Batched generation left-pads prompts of different lengths and masks the padding keys; since
//! rotary and xPos depend only on relative positions, every row gets exactly the attention it
//! would get alone. Each row stops at its first EOS.

use candle_core::{DType, Tensor};
use rand::Rng;

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::model::{Forward, Model};
use crate::rng::{self, PalmRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; <= 0 means greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub greedy: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            greedy: false,
        }
    }
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            greedy: true,
            ..Self::default()
        }
    }

    /// The original's `generate(filter_logits_fn=top_k, filter_thres=thres)` as standard top-k.
    pub fn from_original_top_k(thres: f32, vocab: usize, temperature: f32) -> Self {
        let k = ((1.0 - thres) * vocab as f32).ceil().max(1.0) as usize;
        Self {
            temperature,
            top_k: Some(k),
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::msg(format!("top-p must be in (0, 1], got {p}")));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::msg("top-k must be at least 1"));
        }
        if !self.temperature.is_finite() {
            return Err(Error::msg("temperature must be finite"));
        }
        Ok(())
    }
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Ids sorted before the draw looks past them; most draws end inside this many.
const SORTED_PREFIX: usize = 256;

/// Draws one id from `logits` [V]: ids in descending logit order (ties: the lower id first),
/// truncated to the top k, their softmax at the temperature truncated to the top-p mass, and the
/// first id whose cumulative probability exceeds a uniform draw. Only a prefix of the order is
/// sorted (a selection puts the top [`SORTED_PREFIX`] ids first), the rest only when the top-p
/// walk or the draw reaches past it; the result is that of sorting all V ids.
pub fn sample_token(logits: &[f32], s: &Sampling, rng: &mut PalmRng) -> u32 {
    if s.greedy || s.temperature <= 0.0 {
        return argmax(logits);
    }
    draw_token(logits, s, rng.random::<f64>())
}

/// [`sample_token`]'s draw (not greedy) given its one uniform number `u` in [0, 1), so that the
/// rows of a batch can draw in parallel once their numbers are taken from the streams in order.
fn draw_token(logits: &[f32], s: &Sampling, u: f64) -> u32 {
    let before = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    // the top k ids first (any order), then the top of those sorted
    let k = s.top_k.map_or(idx.len(), |k| k.clamp(1, idx.len()));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, before);
        idx.truncate(k);
    }
    let mut sorted = SORTED_PREFIX.min(idx.len());
    if sorted < idx.len() {
        idx.select_nth_unstable_by(sorted - 1, before);
    }
    idx[..sorted].sort_unstable_by(before);
    // sorts the rest of the candidates when a walk in order goes past the sorted prefix
    let sort_rest = |idx: &mut Vec<usize>, sorted: &mut usize| {
        if *sorted < idx.len() {
            idx[*sorted..].sort_unstable_by(before);
            *sorted = idx.len();
        }
    };
    let max = logits[idx[0]];
    let weight = |i: usize| (((logits[i] - max) / s.temperature) as f64).exp();
    let total: f64 = idx.iter().map(|&i| weight(i)).sum();
    let prob = |i: usize| weight(i) / total;
    let mut keep = idx.len();
    // with top-p, the kept probabilities are renormalised by their sum
    let mut renorm = None;
    if let Some(p) = s.top_p {
        let mut mass = 0.0;
        for n in 0..idx.len() {
            if n == sorted {
                sort_rest(&mut idx, &mut sorted);
            }
            mass += prob(idx[n]);
            if mass >= p as f64 {
                keep = n + 1;
                break;
            }
        }
        renorm = Some(idx[..keep].iter().map(|&i| prob(i)).sum::<f64>());
    }
    let mut acc = 0.0;
    for n in 0..keep {
        if n == sorted {
            sort_rest(&mut idx, &mut sorted);
        }
        acc += match renorm {
            Some(t) => prob(idx[n]) / t,
            None => prob(idx[n]),
        };
        if u < acc {
            return idx[n] as u32;
        }
    }
    idx[keep - 1] as u32
}

/// A batched generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompts: Vec<Vec<u32>>,
    pub max_new_tokens: usize,
    /// End ids: sampling any of them ends its row (the tokenizer's EOS, `generation_config.json`'s
    /// list, the chat template's end-of-turn token). Empty: never stop early.
    pub eos: Vec<u32>,
    pub sampling: Sampling,
    pub seed: u64,
    /// LoRA scope to sample from (e.g. the PPO actor).
    pub scope: Option<String>,
    pub disable_lora: bool,
}

/// What `generate` returns: per row, the new ids (up to and including the first EOS).
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub completions: Vec<Vec<u32>>,
    /// Whether the row stopped at an EOS.
    pub ended_with_eos: Vec<bool>,
}

/// Every prompt has a token, ids inside the vocabulary, and room for the new tokens.
fn check_prompts(model: &Model, req: &GenerateRequest) -> Result<()> {
    let vocab = model.vocab_size() as u32;
    for (i, p) in req.prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(Error::msg(format!(
                "prompt {i} is empty: give at least one token"
            )));
        }
        if let Some(&bad) = p.iter().find(|&&t| t >= vocab) {
            return Err(Error::msg(format!(
                "prompt {i} has token id {bad}, outside the model's vocabulary of {vocab}"
            )));
        }
        if p.len() + req.max_new_tokens > model.max_seq_len() {
            return Err(Error::msg(format!(
                "prompt {i} has {} tokens; with {} new tokens that exceeds the model's context of {} (max_seq_len)",
                p.len(),
                req.max_new_tokens,
                model.max_seq_len()
            )));
        }
    }
    Ok(())
}

/// Generates for every prompt at once with a KV cache. `on_token(row, id)` is called for each
/// new id as soon as it is sampled (streaming). The rows share one random stream from
/// `req.seed`, so a row's sample depends on the rows batched with it; see [`generate_rows`].
pub fn generate(
    model: &Model,
    req: &GenerateRequest,
    on_token: impl FnMut(usize, u32),
) -> Result<Generation> {
    generate_rows(model, req, None, on_token)
}

/// As [`generate`], with one random stream per row when `row_seeds` is given (one seed per
/// prompt): a row then samples the same tokens whichever rows share its batch, chunk or process
/// (rollouts split across data-parallel ranks). `req.seed` is unused then.
pub fn generate_rows(
    model: &Model,
    req: &GenerateRequest,
    row_seeds: Option<&[u64]>,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Generation> {
    req.sampling.validate()?;
    if let Some(s) = row_seeds.filter(|s| s.len() != req.prompts.len()) {
        return Err(Error::msg(format!(
            "generate: {} row seeds for {} prompts",
            s.len(),
            req.prompts.len()
        )));
    }
    let b = req.prompts.len();
    if b == 0 {
        return Ok(Generation {
            completions: vec![],
            ended_with_eos: vec![],
        });
    }
    check_prompts(model, req)?;
    let max_len = req.prompts.iter().map(Vec::len).max().unwrap_or(0);
    let dev = model.device().clone();

    // left-pad to [B, L]; key mask 1 = real token
    let mut ids = Vec::with_capacity(b * max_len);
    let mut mask: Vec<u8> = Vec::with_capacity(b * (max_len + req.max_new_tokens));
    for p in &req.prompts {
        let pad = max_len - p.len();
        ids.extend(std::iter::repeat_n(0i64, pad));
        ids.extend(p.iter().map(|&t| t as i64));
    }
    let mut mask_rows: Vec<Vec<u8>> = req
        .prompts
        .iter()
        .map(|p| {
            let mut m = vec![0u8; max_len - p.len()];
            m.extend(std::iter::repeat_n(1u8, p.len()));
            m
        })
        .collect();
    let mask_tensor = |rows: &Vec<Vec<u8>>, mask: &mut Vec<u8>| -> Result<Tensor> {
        mask.clear();
        for r in rows {
            mask.extend_from_slice(r);
        }
        Ok(Tensor::from_vec(mask.clone(), (b, rows[0].len()), &dev)?)
    };

    let mut shared = rng::stream(req.seed, 0x5a3e);
    let mut per_row: Vec<PalmRng> = row_seeds
        .unwrap_or_default()
        .iter()
        .map(|&s| rng::stream(s, 0x5a3e))
        .collect();
    let capacity = max_len + req.max_new_tokens;
    let base_opts = Forward {
        scope: req.scope.as_deref(),
        disable_lora: req.disable_lora,
        ..Default::default()
    };
    // PaLM on the CPU decodes on plain buffers (`model::palm_decode`); other models run the
    // graph with a KV cache. Both give the same logits (tested in `palm_decode`).
    let mut fast = model.fast_decoder(&base_opts, b, capacity)?;
    let mut cache = KvCache::with_capacity(model.depth(), capacity);
    let mut completions = vec![Vec::new(); b];
    let mut done = vec![false; b];
    // new positions of this step: ids [B, T] and their key mask
    let mut step_ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let mut step_mask: Vec<u8> = mask_rows.iter().flatten().copied().collect();
    let mut t = max_len;
    for _step in 0..req.max_new_tokens {
        let logits: Vec<f32> = match fast.as_mut() {
            Some(dec) => dec.step(&step_ids, &step_mask, t)?,
            None => {
                let km = mask_tensor(&mask_rows, &mut mask)?;
                let opts = Forward {
                    key_mask: Some(&km),
                    ..base_opts
                };
                let input = Tensor::from_vec(
                    step_ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
                    (b, t),
                    &dev,
                )?;
                let emb = model.embeddings(&input, &opts, Some(&mut cache))?;
                let last = emb.narrow(1, t - 1, 1)?.squeeze(1)?; // [B, C]
                model
                    .logits_from(&last, false)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?
            }
        };
        let vsz = logits.len() / b;
        if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
            return Err(Error::msg(format!(
                "the model produced a non-finite logit ({}) for row {} at new token {}: its weights \
                 or inputs hold NaN or infinity",
                logits[i],
                i / vsz,
                completions[i / vsz].len() + 1
            )));
        }
        step_ids.clear();
        step_mask.clear();
        let toks = draw_rows(
            &logits,
            vsz,
            &done,
            &req.sampling,
            &mut per_row,
            &mut shared,
        );
        for (row, tok) in toks.into_iter().enumerate() {
            let Some(tok) = tok else {
                step_ids.push(0);
                step_mask.push(0);
                mask_rows[row].push(0);
                continue;
            };
            completions[row].push(tok);
            on_token(row, tok);
            if req.eos.contains(&tok) {
                done[row] = true;
            }
            step_ids.push(tok);
            step_mask.push(1);
            mask_rows[row].push(1);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        t = 1;
    }
    Ok(Generation {
        completions,
        ended_with_eos: done,
    })
}

/// The next token of every row not `done` (None for those), as [`sample_token`] draws it with
/// the row's stream (`per_row`, else `shared`): the uniform numbers are taken in row order, as a
/// loop over the rows would, then the rows draw in parallel (their top-k selection and softmax
/// over the vocabulary are the cost).
fn draw_rows(
    logits: &[f32],
    vsz: usize,
    done: &[bool],
    s: &Sampling,
    per_row: &mut [PalmRng],
    shared: &mut PalmRng,
) -> Vec<Option<u32>> {
    use rayon::prelude::*;
    let greedy = s.greedy || s.temperature <= 0.0;
    let mut draws = Vec::with_capacity(done.len());
    for (row, &d) in done.iter().enumerate() {
        let rng = per_row.get_mut(row).unwrap_or(&mut *shared);
        draws.push((!d && !greedy).then(|| rng.random::<f64>()));
    }
    let one = |row: usize| -> Option<u32> {
        let l = &logits[row * vsz..(row + 1) * vsz];
        match (done[row], draws[row]) {
            (true, _) => None,
            (false, None) => Some(argmax(l)),
            (false, Some(u)) => Some(draw_token(l, s, u)),
        }
    };
    (0..done.len()).into_par_iter().map(one).collect()
}

#[cfg(test)]
mod tests {
    /// The draw as it was written before the partial sort: every id sorted first.
    fn sample_token_sorting_all(logits: &[f32], s: &Sampling, rng: &mut PalmRng) -> u32 {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if let Some(k) = s.top_k {
            idx.truncate(k.min(idx.len()));
        }
        let max = logits[idx[0]];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i] - max) / s.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = s.top_p {
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (n, q) in probs.iter().enumerate() {
                mass += q;
                if mass >= p as f64 {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
            let t: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= t);
        }
        let u: f64 = rng.random::<f64>();
        let mut acc = 0.0;
        for (n, q) in probs.iter().enumerate() {
            acc += q;
            if u < acc {
                return idx[n] as u32;
            }
        }
        idx[probs.len() - 1] as u32
    }

    /// The partial sort draws the ids that sorting every id draws: vocabularies above and below
    /// the sorted prefix, ties, flat and peaked logits (draws past the prefix), top-k above and
    /// below it, top-p near 1 (walks past it), temperatures.
    #[test]
    fn partial_sort_draws_what_a_full_sort_draws() {
        use super::*;
        let mut differ = 0;
        let mut past_prefix = 0;
        for case in 0..400u64 {
            let v = [50usize, 300, 5000][case as usize % 3];
            let scale = [0.01f32, 1.0, 8.0][(case / 3) as usize % 3];
            let mut r = rng::seeded(case);
            let mut logits: Vec<f32> = rng::normal(&mut r, v, scale);
            // ties: a few logits repeated
            for j in (0..v).step_by(7) {
                logits[j] = logits[0];
            }
            let s = Sampling {
                temperature: [1.0, 0.7, 1.5][(case / 9) as usize % 3],
                top_k: [None, Some(10), Some(400)][(case / 27) as usize % 3],
                top_p: [None, Some(0.9), Some(0.999)][(case / 81) as usize % 3],
                ..Sampling::default()
            };
            let (mut a, mut b) = (rng::seeded(1000 + case), rng::seeded(1000 + case));
            for _ in 0..20 {
                let got = sample_token(&logits, &s, &mut a);
                let want = sample_token_sorting_all(&logits, &s, &mut b);
                differ += usize::from(got != want);
                let mut order: Vec<usize> = (0..v).collect();
                order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
                let rank = order.iter().position(|&i| i as u32 == want).unwrap_or(0);
                past_prefix += usize::from(rank >= SORTED_PREFIX);
            }
        }
        eprintln!("8000 draws, {past_prefix} of them past the sorted prefix, {differ} differ");
        assert_eq!(differ, 0);
        assert!(
            past_prefix > 100,
            "the cases never drew past the prefix: {past_prefix}"
        );
    }

    use super::*;

    #[test]
    fn greedy_takes_first_max() {
        let mut r = rng::seeded(0);
        assert_eq!(
            sample_token(&[1.0, 3.0, 3.0, 0.0], &Sampling::greedy(), &mut r),
            1
        );
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut r = rng::seeded(0);
        let s = Sampling {
            top_k: Some(1),
            ..Sampling::default()
        };
        for _ in 0..20 {
            assert_eq!(sample_token(&[0.5, 0.1, 2.0, 1.9], &s, &mut r), 2);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probs ~ [0.6, 0.3, 0.1]: p=0.8 keeps ids 0 and 1 only
        let logits = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        let s = Sampling {
            top_p: Some(0.8),
            ..Sampling::default()
        };
        let mut r = rng::seeded(3);
        let mut seen = [0usize; 3];
        for _ in 0..3000 {
            seen[sample_token(&logits, &s, &mut r) as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        let frac0 = seen[0] as f64 / 3000.0;
        assert!((frac0 - 2.0 / 3.0).abs() < 0.04, "{frac0}");
    }

    #[test]
    fn temperature_sampling_matches_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let s = Sampling {
            temperature: 2.0,
            ..Sampling::default()
        };
        let mut r = rng::seeded(5);
        let n = 20000;
        let mut seen = [0usize; 3];
        for _ in 0..n {
            seen[sample_token(&logits, &s, &mut r) as usize] += 1;
        }
        let z: f64 = [0.0f64, 0.5, 1.0].iter().map(|x| x.exp()).sum();
        for (i, x) in [0.0f64, 0.5, 1.0].iter().enumerate() {
            let want = x.exp() / z;
            let got = seen[i] as f64 / n as f64;
            assert!((want - got).abs() < 0.015, "{i}: {want} vs {got}");
        }
    }

    /// The rows drawn in parallel are the tokens of the loop over the rows with `sample_token`:
    /// finished rows skipped (their streams untouched), per-row and shared streams, greedy and not.
    #[test]
    fn draw_rows_equals_the_loop_over_rows() {
        let (b, v) = (7usize, 600usize);
        let mut r = rng::seeded(11);
        let logits: Vec<f32> = rng::normal(&mut r, b * v, 2.0);
        let done = [false, true, false, false, true, false, false];
        for s in [
            Sampling::default(),
            Sampling::greedy(),
            Sampling {
                temperature: 0.8,
                top_k: Some(40),
                top_p: Some(0.95),
                greedy: false,
            },
        ] {
            for with_rows in [false, true] {
                let seeds: Vec<u64> = if with_rows {
                    (0..b as u64).collect()
                } else {
                    vec![]
                };
                let streams = || -> (Vec<PalmRng>, PalmRng) {
                    let rows = seeds.iter().map(|&x| rng::stream(x, 1)).collect();
                    (rows, rng::stream(99, 1))
                };
                let (mut rows_a, mut shared_a) = streams();
                let (mut rows_b, mut shared_b) = streams();
                for _step in 0..5 {
                    let got = draw_rows(&logits, v, &done, &s, &mut rows_a, &mut shared_a);
                    let want: Vec<Option<u32>> = (0..b)
                        .map(|row| {
                            (!done[row]).then(|| {
                                let rng = rows_b.get_mut(row).unwrap_or(&mut shared_b);
                                sample_token(&logits[row * v..(row + 1) * v], &s, rng)
                            })
                        })
                        .collect();
                    assert_eq!(got, want, "{s:?} per-row streams: {with_rows}");
                }
            }
        }
    }

    #[test]
    fn original_top_k_mapping() {
        let s = Sampling::from_original_top_k(0.9, 256, 1.0);
        assert_eq!(s.top_k, Some(26));
    }
}
