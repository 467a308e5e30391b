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

/// Limits of `validate`: far above any real model, low enough that products of sizes fit.
const MAX_WIDTH: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;
const MAX_DEPTH: usize = 1 << 12;
const MAX_HEADS: usize = 1 << 12;
const MAX_FF_MULT: usize = 1 << 8;
const MAX_SEQ_LEN: usize = 1 << 28;

/// The key path (`lora_scopes.actor.r`, `finetune_scopes[1]`) of the value that ends at
/// `line`:`column` (1-based, as serde_json reports them) of a JSON text whose start up to there is
/// well formed; `None` at the top level.
fn json_key_at(text: &[u8], line: usize, column: usize) -> Option<String> {
    let mut end = 0;
    for (i, l) in text.split_inclusive(|&b| b == b'\n').enumerate() {
        if i + 1 == line {
            end += column.min(l.len());
            break;
        }
        end += l.len();
    }
    enum Frame {
        Object(Option<String>),
        Array(usize),
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut expect_key = false;
    let mut i = 0;
    while i < end.min(text.len()) {
        match text[i] {
            b'{' => {
                stack.push(Frame::Object(None));
                expect_key = true;
            }
            b'[' => stack.push(Frame::Array(0)),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array(n)) => *n += 1,
                Some(Frame::Object(_)) => expect_key = true,
                None => {}
            },
            b'"' => {
                let start = i;
                i += 1;
                while i < text.len() && text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
                if expect_key {
                    expect_key = false;
                    let key = text
                        .get(start..=i)
                        .and_then(|k| serde_json::from_slice(k).ok());
                    if let Some(Frame::Object(k)) = stack.last_mut() {
                        *k = key;
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    let mut path = String::new();
    for f in &stack {
        match f {
            Frame::Object(Some(k)) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
            }
            Frame::Object(None) => {}
            Frame::Array(n) => path.push_str(&format!("[{n}]")),
        }
    }
    (!path.is_empty()).then_some(path)
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

    /// Checks every field, naming the first bad one: sizes must be positive and below limits far
    /// above any real model (so that no product of them overflows and nothing is sized from an
    /// absurd value), `dim_head` even, dropouts in [0, 1), LoRA ranks positive.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (field, v, max) in [
            ("dim", self.dim, MAX_WIDTH),
            ("num_tokens", self.num_tokens, MAX_VOCAB),
            ("depth", self.depth, MAX_DEPTH),
            ("heads", self.heads, MAX_HEADS),
            ("dim_head", self.dim_head, MAX_WIDTH),
            ("ff_mult", self.ff_mult, MAX_FF_MULT),
            ("max_seq_len", self.max_seq_len, MAX_SEQ_LEN),
        ] {
            if v == 0 {
                return bad(format!("`{field}` must be positive, found 0"));
            }
            if v > max {
                return bad(format!("`{field}` is {v}, above the limit of {max}"));
            }
        }
        if !self.dim_head.is_multiple_of(2) {
            return bad(format!(
                "`dim_head` must be even (rotary embeddings rotate halves), found {}",
                self.dim_head
            ));
        }
        for (field, p) in [
            ("attn_dropout", self.attn_dropout),
            ("ff_dropout", self.ff_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("`{field}` must be in [0, 1), found {p}"));
            }
        }
        if self.causal && self.rotary_xpos_scale_base == 0 {
            return bad(
                "`rotary_xpos_scale_base` must be positive (xPos divides positions by it)".into(),
            );
        }
        if self.lora_r > MAX_WIDTH || (self.lora_r == 0 && !self.finetune_scopes.is_empty()) {
            return bad(format!(
                "`lora_r` (the rank of `finetune_scopes`) must be in 1..={MAX_WIDTH}, found {}",
                self.lora_r
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for name in &self.finetune_scopes {
            if !seen.insert(name) {
                return bad(format!("`finetune_scopes` names scope `{name}` twice"));
            }
        }
        for (name, spec) in &self.lora_scopes {
            if spec.r == 0 || spec.r > MAX_WIDTH {
                return bad(format!(
                    "`lora_scopes`: scope `{name}` has rank `r` {}, not in 1..={MAX_WIDTH}",
                    spec.r
                ));
            }
            if spec.alpha.is_some_and(|a| !a.is_finite()) {
                return bad(format!(
                    "`lora_scopes`: scope `{name}` has a non-finite `alpha`"
                ));
            }
        }
        Ok(())
    }

    pub fn from_json_str(s: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }

    /// Reads and validates a `config.json`; every error names the file, and the field where
    /// one applies (serde's type errors give only a line and column: the field is added).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = serde_json::from_slice(&bytes).map_err(|source| {
            use serde_json::error::Category;
            let msg = source.to_string();
            let about_a_value = match source.classify() {
                Category::Data => !msg.starts_with("missing field"),
                _ => msg.starts_with("number out of range"),
            };
            match json_key_at(&bytes, source.line(), source.column()) {
                Some(key) if about_a_value => {
                    Error::Config(format!("{}: field `{key}`: {msg}", path.display()))
                }
                _ => Error::Json {
                    path: path.to_path_buf(),
                    source,
                },
            }
        })?;
        cfg.validate().map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })?;
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
