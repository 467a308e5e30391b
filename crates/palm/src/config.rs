//! `PalmConfig`: every constructor argument of the original `PaLM(...)` (palm-rlhf-pytorch 0.8.0),
//! with the same defaults, plus a few explicit extensions. Serialised as `config.json`.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{Error, Result};

/// Which projections a LoRA scope adapts. The original adapts q, k, v and the attention output;
/// `ff` adds the feed-forward input (value and gate halves) and output projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoraTargets {
    /// q, k, v, o (the original).
    #[default]
    Attention,
    /// q, k, v, o and the feed-forward projections.
    AttentionAndFf,
}

/// How a LoRA scope is shaped; scopes are stored with the model's config so a checkpoint
/// reloads with the same adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub r: usize,
    /// Defaults to `r` (scale 1), as in the original.
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default)]
    pub targets: LoraTargets,
}

impl LoraSpec {
    pub fn new(r: usize) -> Self {
        Self {
            r,
            alpha: None,
            targets: LoraTargets::Attention,
        }
    }
    pub fn scale(&self) -> f64 {
        self.alpha.unwrap_or(self.r as f64) / self.r as f64
    }
}

fn d_true() -> bool {
    true
}
fn d_dim_head() -> usize {
    64
}
fn d_heads() -> usize {
    8
}
fn d_ff_mult() -> usize {
    4
}
fn d_lora_r() -> usize {
    8
}
fn d_xpos() -> usize {
    512
}
fn d_max_seq_len() -> usize {
    2048
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PalmConfig {
    pub dim: usize,
    pub num_tokens: usize,
    pub depth: usize,
    #[serde(default = "d_true")]
    pub causal: bool,
    #[serde(default = "d_dim_head")]
    pub dim_head: usize,
    #[serde(default = "d_heads")]
    pub heads: usize,
    #[serde(default = "d_ff_mult")]
    pub ff_mult: usize,
    #[serde(default)]
    pub attn_dropout: f64,
    #[serde(default)]
    pub ff_dropout: f64,
    /// The original's "qk rmsnorm" is an L2 normalisation times learned `q_scale`/`k_scale`.
    #[serde(default)]
    pub qk_rmsnorm: bool,
    /// Default LoRA rank for `finetune_scopes` and `add_scope` without an explicit spec.
    #[serde(default = "d_lora_r")]
    pub lora_r: usize,
    #[serde(default = "d_xpos")]
    pub rotary_xpos_scale_base: usize,
    /// Accepted for compatibility; attention is always computed exactly (same numbers).
    #[serde(default)]
    pub flash_attn: bool,
    /// Scopes created at construction with rank `lora_r` (as the original).
    #[serde(default)]
    pub finetune_scopes: Vec<String>,
    /// Label id ignored by the loss. The original ignores 0 (a real token for real tokenizers);
    /// here the default is none. Set `0` for the original's behaviour.
    #[serde(default)]
    pub cross_entropy_ignore_index: Option<i64>,
    /// Extension: longest sequence accepted by `generate` (prompt + new tokens).
    #[serde(default = "d_max_seq_len")]
    pub max_seq_len: usize,
    /// Extension: LoRA scopes with explicit shapes (name -> spec), saved with checkpoints.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub lora_scopes: std::collections::BTreeMap<String, LoraSpec>,
}

impl PalmConfig {
    /// The original's required arguments; everything else at its default.
    pub fn new(num_tokens: usize, dim: usize, depth: usize) -> Self {
        Self {
            dim,
            num_tokens,
            depth,
            causal: true,
            dim_head: d_dim_head(),
            heads: d_heads(),
            ff_mult: d_ff_mult(),
            attn_dropout: 0.0,
            ff_dropout: 0.0,
            qk_rmsnorm: false,
            lora_r: d_lora_r(),
            rotary_xpos_scale_base: d_xpos(),
            flash_attn: false,
            finetune_scopes: vec![],
            cross_entropy_ignore_index: None,
            max_seq_len: d_max_seq_len(),
            lora_scopes: Default::default(),
        }
    }

    /// Byte-level presets: `small` (dim 256, depth 4) and `base` (dim 512, depth 8).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self {
                heads: 4,
                dim_head: 32,
                max_seq_len: 512,
                ..Self::new(256, 128, 2)
            }),
            "small" => Ok(Self {
                heads: 4,
                dim_head: 64,
                max_seq_len: 1024,
                ..Self::new(256, 256, 4)
            }),
            "base" => Ok(Self {
                heads: 8,
                dim_head: 64,
                ..Self::new(256, 512, 8)
            }),
            other if other.ends_with(".json") || other.contains(std::path::MAIN_SEPARATOR) => {
                Err(Error::Config(format!(
                    "{other}: no such file (a --config is a preset: tiny, small or base, or a config.json)"
                )))
            }
            other => Err(Error::Config(format!(
                "unknown preset `{other}` (expected tiny, small or base, or a JSON file)"
            ))),
        }
    }

    /// Parameters of the model this config describes (embedding, blocks, final norm; the output
    /// projection is tied), for a memory estimate before anything is allocated.
    pub fn num_parameters(&self) -> u128 {
        let (d, v) = (self.dim as u128, self.num_tokens as u128);
        let fused = self.fused_dim() as u128;
        let attn_out = self.attn_inner_dim() as u128 * d;
        let ff_out = self.ff_inner_dim() as u128 * d;
        let block = d + fused * d + attn_out + ff_out;
        v * d + self.depth as u128 * block + d
    }

    pub fn attn_inner_dim(&self) -> usize {
        self.heads * self.dim_head
    }
    pub fn ff_inner_dim(&self) -> usize {
        self.dim * self.ff_mult
    }
    /// Rows of the fused input projection: q (H*D), k (D), v (D), ff (2 * ff_inner).
    pub fn fused_dim(&self) -> usize {
        self.attn_inner_dim() + 2 * self.dim_head + 2 * self.ff_inner_dim()
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if self.dim == 0 || self.num_tokens == 0 || self.depth == 0 || self.heads == 0 {
            return bad("dim, num_tokens, depth and heads must be positive");
        }
        if self.dim_head == 0 || !self.dim_head.is_multiple_of(2) {
            return bad("dim_head must be even and positive (rotary embeddings rotate halves)");
        }
        if !(0.0..1.0).contains(&self.attn_dropout) || !(0.0..1.0).contains(&self.ff_dropout) {
            return bad("dropout must be in [0, 1)");
        }
        for (name, spec) in &self.lora_scopes {
            if spec.r == 0 {
                return Err(Error::Config(format!("LoRA scope `{name}` has rank 0")));
            }
        }
        Ok(())
    }

    pub fn from_json_str(s: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// All scopes with their specs: `finetune_scopes` (rank `lora_r`) and `lora_scopes`.
    pub fn all_scopes(&self) -> Vec<(String, LoraSpec)> {
        let mut out: Vec<(String, LoraSpec)> = self
            .finetune_scopes
            .iter()
            .filter(|s| !self.lora_scopes.contains_key(*s))
            .map(|s| (s.clone(), LoraSpec::new(self.lora_r)))
            .collect();
        out.extend(self.lora_scopes.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_original() {
        let c = PalmConfig::from_json_str(r#"{"dim":64,"num_tokens":256,"depth":2}"#).unwrap();
        assert_eq!(c, PalmConfig::new(256, 64, 2));
        assert_eq!((c.dim_head, c.heads, c.ff_mult, c.lora_r), (64, 8, 4, 8));
        assert!(c.causal && !c.qk_rmsnorm);
        assert_eq!(c.rotary_xpos_scale_base, 512);
    }

    #[test]
    fn num_parameters_counts_what_palm_new_allocates() {
        for name in ["tiny", "small"] {
            let c = PalmConfig::preset(name).unwrap();
            let m = crate::Palm::new(&c, 0, &candle_core::Device::Cpu).unwrap();
            assert_eq!(c.num_parameters(), m.vars.num_elements() as u128, "{name}");
        }
    }

    #[test]
    fn a_config_too_big_for_memory_is_refused_before_allocating() {
        let c = PalmConfig::new(256, 200_000, 4);
        let e = crate::Palm::new(&c, 0, &candle_core::Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GiB of f32 weights") && e.contains("memory available"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_config_file_says_so() {
        let e = PalmConfig::preset("missing.json").unwrap_err().to_string();
        assert!(e.contains("missing.json: no such file"), "{e}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let e = PalmConfig::from_json_str(r#"{"dim":64,"num_tokens":256,"depth":2,"dimm":3}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `dimm`"), "{e}");
    }
}
