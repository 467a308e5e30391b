//! Models. `palm` is the PaLM of the original; `Model` is what the rest of the crate (sampling,
//! training, reward model, PPO, CLI) works with, so imported architectures plug in beside it.

pub mod gguf_export;
pub mod gguf_export_tokenizer;
pub mod gguf_import;
pub mod hf;
pub mod hf_checkpoint;
pub mod hf_config;
pub mod hf_decode;
pub mod hf_export;
pub mod palm;
pub mod palm_decode;

use std::path::Path;

use candle_core::{Device, Tensor};

pub use hf::HfModel;
pub use palm::{cross_entropy, Forward, Palm};

use crate::config::LoraSpec;
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::params::VarStore;

/// Any language model the pipeline can run.
#[derive(Debug)]
pub enum Model {
    Palm(Palm),
    /// A Hugging Face decoder (Llama, Falcon, GPT-NeoX, GPT-2).
    Hf(HfModel),
}

impl From<Palm> for Model {
    fn from(p: Palm) -> Self {
        Model::Palm(p)
    }
}

impl From<HfModel> for Model {
    fn from(m: HfModel) -> Self {
        Model::Hf(m)
    }
}

impl Model {
    /// Final-norm hidden states [B, T, C] (see [`Palm::embeddings`]).
    pub fn embeddings(
        &self,
        ids: &Tensor,
        opts: &Forward,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        match self {
            Model::Palm(m) => m.embeddings(ids, opts, cache),
            Model::Hf(m) => m.embeddings(ids, opts, cache),
        }
    }

    /// The fast CPU decoder for `batch` rows of up to `capacity` positions, where it applies
    /// (f32 on the CPU: a causal PaLM, or an HF decoder of the Llama family, see
    /// [`hf_decode`]); `None` means: use the graph path with a [`KvCache`].
    pub fn fast_decoder(
        &self,
        opts: &Forward,
        batch: usize,
        capacity: usize,
    ) -> Result<Option<FastDecoder>> {
        // PALM_GRAPH_DECODE=1: always the graph path (to compare the two, or to debug one)
        if std::env::var_os("PALM_GRAPH_DECODE").is_some_and(|v| v == "1") {
            return Ok(None);
        }
        let dec = match self {
            Model::Palm(m) => {
                palm_decode::PalmDecoder::new(m, opts, batch, capacity)?.map(Decoder::Palm)
            }
            Model::Hf(m) => hf_decode::HfDecoder::new(m, opts, batch, capacity)?.map(Decoder::Hf),
        };
        Ok(dec.map(|dec| FastDecoder {
            dec,
            shared_prefill: None,
        }))
    }

    /// Logits [.., V] from hidden states [.., C].
    pub fn logits_from(&self, emb: &Tensor, freeze_base: bool) -> Result<Tensor> {
        match self {
            Model::Palm(m) => m.logits_from(emb, freeze_base),
            Model::Hf(m) => m.logits_from(emb, freeze_base),
        }
    }

    /// Logits [B, T, V].
    pub fn forward(&self, ids: &Tensor, opts: &Forward) -> Result<Tensor> {
        let emb = self.embeddings(ids, opts, None)?;
        self.logits_from(&emb, opts.freeze_base)
    }

    /// Next-token loss as the original's `return_loss=True`: forward on ids[:, :-1], mean
    /// cross-entropy against ids[:, 1:] over labels != `ignore_index()`.
    pub fn lm_loss(&self, ids: &Tensor, opts: &Forward) -> Result<Tensor> {
        palm::next_token_loss(ids, self.ignore_index(), |inp| self.forward(inp, opts))
    }

    /// `loss.backward()`; for PaLM also the weight gradients of fused blocks
    /// ([`Forward::fused_blocks`], see [`Palm::backward`]).
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        match self {
            Model::Palm(m) => m.backward(loss),
            Model::Hf(m) => m.backward(loss),
        }
    }

    /// Turns gradient checkpointing on or off (Hugging Face and GGUF models: see
    /// [`HfModel::gradient_checkpointing`]). PaLM blocks already train as fused nodes that keep
    /// few activations, so turning it on for one is refused.
    pub fn set_gradient_checkpointing(&mut self, on: bool) -> Result<()> {
        match self {
            Model::Hf(m) => m.gradient_checkpointing = on,
            Model::Palm(_) if on => {
                return Err(Error::Config(
                    "gradient checkpointing is for Hugging Face and GGUF models; PaLM blocks \
                     already train as fused nodes that keep few activations"
                        .into(),
                ))
            }
            Model::Palm(_) => {}
        }
        Ok(())
    }

    pub fn vars(&self) -> &VarStore {
        match self {
            Model::Palm(m) => &m.vars,
            Model::Hf(m) => &m.vars,
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            Model::Palm(m) => m.device(),
            Model::Hf(m) => m.device(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Model::Palm(m) => m.cfg.num_tokens,
            Model::Hf(m) => m.spec.vocab,
        }
    }

    pub fn dim(&self) -> usize {
        match self {
            Model::Palm(m) => m.cfg.dim,
            Model::Hf(m) => m.spec.dim,
        }
    }

    pub fn depth(&self) -> usize {
        match self {
            Model::Palm(m) => m.cfg.depth,
            Model::Hf(m) => m.spec.depth,
        }
    }

    pub fn max_seq_len(&self) -> usize {
        match self {
            Model::Palm(m) => m.cfg.max_seq_len,
            Model::Hf(m) => m.spec.max_pos,
        }
    }

    pub fn causal(&self) -> bool {
        match self {
            Model::Palm(m) => m.cfg.causal,
            Model::Hf(_) => true,
        }
    }

    /// Label id the language-model loss ignores, if any.
    pub fn ignore_index(&self) -> Option<i64> {
        match self {
            Model::Palm(m) => m.cfg.cross_entropy_ignore_index,
            // transformers' convention: labels of -100 are ignored
            Model::Hf(_) => Some(-100),
        }
    }

    pub fn num_parameters(&self) -> usize {
        self.vars().num_elements()
    }

    pub fn has_scope(&self, name: &str) -> bool {
        match self {
            Model::Palm(m) => m.scopes.contains_key(name),
            Model::Hf(m) => m.scopes.contains_key(name),
        }
    }

    /// The names of the model's LoRA scopes, sorted.
    pub fn scope_names(&self) -> Vec<String> {
        match self {
            Model::Palm(m) => m.scopes.keys().cloned().collect(),
            Model::Hf(m) => m.scopes.keys().cloned().collect(),
        }
    }

    pub fn add_scope(&mut self, name: &str, spec: LoraSpec, seed: u64) -> Result<()> {
        match self {
            Model::Palm(m) => m.add_scope(name, spec, seed),
            Model::Hf(m) => m.add_scope(name, spec, seed),
        }
    }

    pub fn remove_scope(&mut self, name: &str) -> Result<()> {
        match self {
            Model::Palm(m) => m.remove_scope(name).map(|_| ()),
            Model::Hf(m) => m.remove_scope(name).map(|_| ()),
        }
    }

    pub fn merge_scope(&mut self, name: &str) -> Result<()> {
        match self {
            Model::Palm(m) => m.merge_scope(name),
            Model::Hf(m) => m.merge_scope(name),
        }
    }

    /// Reseeds dropout.
    pub fn set_seed(&self, seed: u64) {
        match self {
            Model::Palm(m) => m.set_seed(seed),
            Model::Hf(m) => m.set_seed(seed),
        }
    }

    /// Writes the model's own files (config and weights) into an existing directory.
    pub fn write_files(&self, dir: &Path) -> Result<()> {
        match self {
            Model::Palm(m) => crate::load::write_palm_files(m, dir),
            Model::Hf(m) => hf::write_hf_files(m, dir),
        }
    }

    /// Saves as a checkpoint directory, atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::checkpoint::write_dir_atomic(dir, |tmp| self.write_files(tmp))
    }

    /// A short human description (architecture and sizes).
    pub fn describe(&self) -> serde_json::Value {
        match self {
            Model::Palm(m) => serde_json::json!({
                "architecture": "palm",
                "config": m.cfg,
                "parameters": self.num_parameters(),
                "lora_scopes": m.scopes.keys().collect::<Vec<_>>(),
            }),
            Model::Hf(m) => m.describe(),
        }
    }
}

/// A plain-buffer decoder ([`Model::fast_decoder`]).
pub struct FastDecoder {
    dec: Decoder,
    /// Rows the first step ran when its rows repeated (see [`FastDecoder::step`]).
    pub shared_prefill: Option<usize>,
}

enum Decoder {
    Palm(palm_decode::PalmDecoder),
    Hf(hf_decode::HfDecoder),
}

/// The distinct rows of `x` ([B, T] row-major with its mask) in order of first appearance,
/// and for each row the index of its distinct row among them.
fn distinct_rows<T: PartialEq>(ids: &[T], mask: &[u8], t: usize) -> (Vec<usize>, Vec<usize>) {
    let row = |r: usize| (&ids[r * t..(r + 1) * t], &mask[r * t..(r + 1) * t]);
    let (mut distinct, mut of): (Vec<usize>, Vec<usize>) = (vec![], vec![]);
    for r in 0..ids.len() / t.max(1) {
        match distinct.iter().position(|&d| row(d) == row(r)) {
            Some(j) => of.push(j),
            None => {
                of.push(distinct.len());
                distinct.push(r);
            }
        }
    }
    (distinct, of)
}

impl FastDecoder {
    /// Runs `t` new positions for every row (`ids`, `mask` [B, T] row-major, mask 1 = real
    /// token); the logits of each row's last new position, [B, V].
    ///
    /// A first step whose rows repeat (a group of responses to one prompt, OpenAI's `n`) runs
    /// each distinct row once and copies its cache to the repeats (prefix sharing).
    pub fn step(&mut self, ids: &[u32], mask: &[u8], t: usize) -> Result<Vec<f32>> {
        let b = self.rows();
        if self.is_empty() && t > 1 && ids.len() == b * t && mask.len() == b * t {
            let (distinct, of) = distinct_rows(ids, mask, t);
            if distinct.len() < b {
                let at = |r: &usize| r * t..(r + 1) * t;
                let ids_u: Vec<u32> = distinct.iter().flat_map(|r| ids[at(r)].to_vec()).collect();
                let mask_u: Vec<u8> = distinct.iter().flat_map(|r| mask[at(r)].to_vec()).collect();
                self.set_rows(distinct.len());
                let got = self.step_rows(&ids_u, &mask_u, t);
                self.set_rows(b);
                let logits = got?; // [U, V]
                self.copy_rows(&of);
                let v = logits.len() / distinct.len();
                self.shared_prefill = Some(distinct.len());
                return Ok(of
                    .iter()
                    .flat_map(|&j| logits[j * v..(j + 1) * v].iter().copied())
                    .collect());
            }
        }
        self.step_rows(ids, mask, t)
    }

    fn step_rows(&mut self, ids: &[u32], mask: &[u8], t: usize) -> Result<Vec<f32>> {
        match &mut self.dec {
            Decoder::Palm(d) => d.step(ids, mask, t),
            Decoder::Hf(d) => d.step(ids, mask, t),
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        match &self.dec {
            Decoder::Palm(d) => d.len(),
            Decoder::Hf(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn rows(&self) -> usize {
        match &self.dec {
            Decoder::Palm(d) => d.rows(),
            Decoder::Hf(d) => d.rows(),
        }
    }

    fn set_rows(&mut self, rows: usize) {
        match &mut self.dec {
            Decoder::Palm(d) => d.set_rows(rows),
            Decoder::Hf(d) => d.set_rows(rows),
        }
    }

    fn copy_rows(&mut self, from: &[usize]) {
        match &mut self.dec {
            Decoder::Palm(d) => d.copy_rows(from),
            Decoder::Hf(d) => d.copy_rows(from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PalmConfig;

    #[test]
    fn distinct_rows_by_hand() {
        // rows: [1 2], [1 2] padded differently, [1 2], [3 4]
        let ids = [1u32, 2, 1, 2, 1, 2, 3, 4];
        let mask = [1u8, 1, 0, 1, 1, 1, 1, 1];
        assert_eq!(
            distinct_rows(&ids, &mask, 2),
            (vec![0, 1, 3], vec![0, 1, 0, 2])
        );
    }

    /// The PaLM decoder under prefix sharing: every row's logits equal a decoder's that ran all
    /// rows (prefill, then steps where the repeats diverge).
    #[test]
    fn palm_repeated_prompts_prefill_once() -> Result<()> {
        let cfg = PalmConfig {
            heads: 2,
            dim_head: 8,
            ..PalmConfig::new(50, 32, 2)
        };
        let m = Model::from(Palm::new(&cfg, 3, &Device::Cpu)?);
        let mut shared = m
            .fast_decoder(&Forward::default(), 3, 12)?
            .ok_or_else(|| Error::msg("no fast decoder"))?;
        let Model::Palm(p) = &m else { unreachable!() };
        let mut each = palm_decode::PalmDecoder::new(p, &Forward::default(), 3, 12)?
            .ok_or_else(|| Error::msg("no fast decoder"))?;
        let (mut ids, mut mask, mut t) = (vec![7u32, 8, 9, 4, 8, 9, 7, 8, 9], vec![1u8; 9], 3);
        for step in 0..3u32 {
            let (got, want) = (shared.step(&ids, &mask, t)?, each.step(&ids, &mask, t)?);
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(err <= 1e-5, "step {step}: {err}");
            (ids, mask, t) = (vec![10 + step, 20 + step, 30 + step], vec![1; 3], 1);
        }
        assert_eq!(shared.shared_prefill, Some(2));
        Ok(())
    }
}
