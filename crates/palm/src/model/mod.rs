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
        Ok(match self {
            Model::Palm(m) => {
                palm_decode::PalmDecoder::new(m, opts, batch, capacity)?.map(FastDecoder::Palm)
            }
            Model::Hf(m) => {
                hf_decode::HfDecoder::new(m, opts, batch, capacity)?.map(FastDecoder::Hf)
            }
        })
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
pub enum FastDecoder {
    Palm(palm_decode::PalmDecoder),
    Hf(hf_decode::HfDecoder),
}

impl FastDecoder {
    /// Runs `t` new positions for every row (`ids`, `mask` [B, T] row-major, mask 1 = real
    /// token); the logits of each row's last new position, [B, V].
    pub fn step(&mut self, ids: &[u32], mask: &[u8], t: usize) -> Result<Vec<f32>> {
        match self {
            FastDecoder::Palm(d) => d.step(ids, mask, t),
            FastDecoder::Hf(d) => d.step(ids, mask, t),
        }
    }
}
